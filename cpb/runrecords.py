"""Reading the worker's run records and deciding whether a run is complete.

The rule (docs/CONTRACTS.md, "Output layout"): a prefix without a
`_cpb/run.json` whose status is `succeeded` is incomplete. An array job's
results live in `part-NNNNN/` prefixes, one per child; the run is complete
only when every expected child left a succeeded record. Both `cpb status` and
`cpb results` use this module so they can never disagree.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from botocore.exceptions import ClientError

RUN_RECORD = "_cpb/run.json"
SUBMISSION_PREFIX = "_cpb/submission-"
_PART = re.compile(r"^part-(\d{5})/")


def part_name(index: int) -> str:
    """`part-00003` for array child 3 (the worker's naming)."""
    return f"part-{index:05d}"


def list_keys(s3, bucket: str, prefix: str) -> dict[str, int]:
    """Every key under `prefix/` (relative to it) with its size."""
    base = prefix.strip("/") + "/" if prefix.strip("/") else ""
    found: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        for item in page.get("Contents", []):
            found[item["Key"][len(base):]] = item["Size"]
    return found


def read_json(s3, bucket: str, key: str) -> Optional[dict]:
    """A JSON object from the bucket, or None when the key does not exist."""
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    try:
        value = json.loads(body)
    except ValueError:
        return {"status": "failed", "reason": f"{key} is not valid JSON"}
    return value if isinstance(value, dict) else {"status": "failed", "reason": f"{key} is not an object"}


@dataclass
class PartState:
    """One job's (or array child's) outcome as its run record tells it."""

    prefix: str                 # relative to the output: "" or "part-00003"
    index: Optional[int]        # array index, None for a single job
    record: Optional[dict]      # the run record, None when missing

    @property
    def status(self) -> str:
        """`succeeded`, `failed`, or `missing` (no record yet)."""
        if self.record is None:
            return "missing"
        return "succeeded" if self.record.get("status") == "succeeded" else "failed"

    @property
    def reason(self) -> str:
        """Why this part is not done, in one line."""
        if self.record is None:
            return "no run record (still running, never started, or the worker died)"
        return str(self.record.get("reason") or self.record.get("status") or "unknown")


@dataclass
class RunState:
    """All parts of one output prefix and whether together they are complete."""

    output: str
    array: bool
    parts: list[PartState] = field(default_factory=list)
    expected: Optional[int] = None

    @property
    def complete(self) -> bool:
        """True only when every expected part has a succeeded record."""
        if not self.parts or any(p.status != "succeeded" for p in self.parts):
            return False
        if self.array:
            return self.expected is not None and len(self.parts) == self.expected
        return True

    def problems(self) -> list[str]:
        """One line per part that keeps the run from being complete."""
        lines = [f"{p.prefix or self.output}: {p.status}: {p.reason}"
                 for p in self.parts if p.status != "succeeded"]
        if not self.parts:
            lines.append(f"{self.output}: no results and no run record yet")
        elif self.array and self.expected is None:
            lines.append(f"{self.output}: cannot tell how many array parts to expect "
                         "(no submission record); pass --parts N")
        return lines


def expected_parts_from_submissions(submissions: Iterable[dict]) -> Optional[int]:
    """Array size from the Lambda's submission records, if any names one."""
    sizes = []
    for record in submissions:
        if record.get("status") == "cancelled":
            continue
        for job in record.get("jobs", []) or []:
            size = job.get("array_size") or job.get("arraySize")
            if size:
                sizes.append(int(size))
        size = record.get("array_size") or record.get("arraySize")
        if size:
            sizes.append(int(size))
    return max(sizes) if sizes else None


def load_submissions(s3, bucket: str, output: str, keys: Optional[dict[str, int]] = None) -> list[dict]:
    """The Lambda's submission records under `<output>/_cpb/`."""
    keys = list_keys(s3, bucket, output) if keys is None else keys
    records = []
    for key in sorted(k for k in keys if k.startswith(SUBMISSION_PREFIX) and k.endswith(".json")):
        record = read_json(s3, bucket, f"{output.strip('/')}/{key}")
        if record is not None:
            records.append(record)
    return records


def run_state(s3, bucket: str, output: str, expected: Optional[int] = None) -> RunState:
    """Read every run record under `output` and say what is done.

    Parts that exist as folders but have no record are reported as missing;
    when the expected array size is known, never-started children are too.
    """
    output = output.strip("/")
    keys = list_keys(s3, bucket, output)
    if expected is None:
        expected = expected_parts_from_submissions(load_submissions(s3, bucket, output, keys))
    indices = sorted({int(m.group(1)) for k in keys if (m := _PART.match(k))})
    array = bool(indices) or (expected is not None and RUN_RECORD not in keys)
    if not array:
        record = read_json(s3, bucket, f"{output}/{RUN_RECORD}") if RUN_RECORD in keys else None
        parts = [PartState("", None, record)] if (record is not None or keys) else []
        return RunState(output, False, parts, 1)
    if expected is not None:
        indices = sorted(set(indices) | set(range(expected)))
    parts = []
    for index in indices:
        prefix = part_name(index)
        record_key = f"{prefix}/{RUN_RECORD}"
        record = read_json(s3, bucket, f"{output}/{record_key}") if record_key in keys else None
        parts.append(PartState(prefix, index, record))
    return RunState(output, True, parts, expected)
