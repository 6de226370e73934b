"""Which run records count for an output, and whether together they are complete.

The rules are docs/CONTRACTS.md's "Parts: which records count", applied identically by
`cpb status`, `cpb results` and `cpb plate` (they all call `run_state`), so they never disagree:

- The current run is the output lease's `run_id` (`<output>/_cpb/lease.json`). An output without a
  lease (from before leases, or a local run) must have all its records in one run, else it is
  refused, naming the mix.
- A plain run (`array_size` null) counts only `<output>/_cpb/run.json` of that run; part folders of
  earlier runs are ignored (and named).
- An array run counts exactly `part-00000` .. `part-<array_size-1>`, each with a record of that run
  whose `array_index` equals the folder's; their `[first, last]` ranges must tile
  `1..image_set_count` exactly once. Any other record (another run's, another index's, a part beyond
  the array) is named and never merged.
- Complete = every expected part succeeded under those rules.

A part without a record whose job (or array child) Batch failed because a job it depends on failed
(its `_cpb/events/<job id>.json` says `Dependent Job failed`) is `not run`, and its reason names the
step it runs after (the lease's `after`) that failed, and what to do.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Optional

from botocore.exceptions import ClientError

from cpb.lease import LEASE_KEY, read_lease

RUN_RECORD = "_cpb/run.json"
#: Batch's statusReason for a job (or array child) it failed without running because a job in its
#: dependsOn failed.
DEPENDENCY_FAILED = "Dependent Job failed"
SUBMISSION_PREFIX = "_cpb/submission-"
_PART = re.compile(r"^part-(\d{5})/")
_PART_RECORD = re.compile(r"^part-(\d{5})/_cpb/run\.json$")


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


def short(run_id: Optional[str]) -> str:
    """A run id as people read it (the first 8 hex digits are plenty to tell runs apart)."""
    return str(run_id)[:8] if run_id else "without a run id"


@dataclass
class PartState:
    """One job's (or array child's) outcome as its run record tells it."""

    prefix: str                 # relative to the output: "" or "part-00003"
    index: Optional[int]        # array index, None for a single job
    record: Optional[dict]      # the run record, None when missing
    stale: Optional[str] = None  # why this record does not belong to the current run's part
    not_run: Optional[str] = None  # no record because Batch never ran it: its dependency failed (why, what to do)

    @property
    def status(self) -> str:
        """`succeeded`, `failed`, `missing` (no record yet), `not run` (Batch failed it by dependency)
        or `stale` (a record of another run or job)."""
        if self.record is None:
            return "not run" if self.not_run else "missing"
        if self.stale:
            return "stale"
        return "succeeded" if self.record.get("status") == "succeeded" else "failed"

    @property
    def reason(self) -> str:
        """Why this part is not done, in one line."""
        if self.record is None:
            return self.not_run or "no run record (still running, never started, or the worker died)"
        if self.stale:
            return self.stale
        return str(self.record.get("reason") or self.record.get("status") or "unknown")

    @property
    def range(self) -> tuple[Optional[int], Optional[int]]:
        record = self.record or {}
        return _int(record.get("first")), _int(record.get("last"))

    @property
    def resumed_from(self) -> Optional[str]:
        return (self.record or {}).get("resumed_from") if self.status == "succeeded" else None


def _int(value: object) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


@dataclass
class RunState:
    """The current run of one output prefix: its expected parts and whether together they are complete."""

    output: str
    array: bool
    parts: list[PartState] = field(default_factory=list)
    expected: Optional[int] = None
    run_id: Optional[str] = None
    lease: Optional[dict] = None
    image_set_count: Optional[int] = None
    ignored: list[str] = field(default_factory=list)    # records that are not the current run's parts
    conflicts: list[str] = field(default_factory=list)  # what makes the parts unusable together

    @property
    def complete(self) -> bool:
        """True only when every expected part of the current run succeeded and their ranges tile the image sets."""
        if not self.parts or self.conflicts or any(p.status != "succeeded" for p in self.parts):
            return False
        if self.array:
            return self.expected is not None and len(self.parts) == self.expected
        return True

    @property
    def resumed(self) -> list[PartState]:
        """Parts whose record reused an earlier run's results (`resumed_from`)."""
        return [p for p in self.parts if p.resumed_from]

    def problems(self) -> list[str]:
        """One line per reason the run is not complete (parts first, then what ties them together)."""
        lines = [f"{p.prefix or self.output}: {p.status}: {p.reason}"
                 for p in self.parts if p.status not in ("succeeded", "not run")]
        not_run: dict[str, list[str]] = {}  # one line per reason: a plate's thousands of parts share one
        for part in self.parts:
            if part.status == "not run":
                not_run.setdefault(part.reason, []).append(part.prefix or self.output)
        lines[:0] = [f"{_names(names)}: not run: {reason}" for reason, names in not_run.items()]
        if not self.parts:
            lines.append(f"{self.output}: no results and no run record yet")
        elif self.array and self.expected is None:
            lines.append(f"{self.output}: cannot tell how many array parts to expect "
                         "(no lease or submission record); pass --parts N")
        lines.extend(self.conflicts)
        if lines and self.ignored:
            lines.append(f"{self.output}: not counted, never merged: " + "; ".join(self.ignored))
        return lines


def expected_parts_from_submissions(submissions: Iterable[dict]) -> Optional[int]:
    """Array size from the Lambda's submission records, if any names one (outputs without a lease)."""
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


def image_sets_from_submissions(submissions: Iterable[dict]) -> Optional[int]:
    """The run's image-set count the Lambda recorded (outputs without a lease), if one names it."""
    counts = {_int(r.get("image_set_count")) for r in submissions if r.get("status") != "cancelled"} - {None}
    return counts.pop() if len(counts) == 1 else None


def load_submissions(s3, bucket: str, output: str, keys: Optional[dict[str, int]] = None) -> list[dict]:
    """The submission records under `<output>/_cpb/` (the Lambda's, and `cpb requeue`'s for outputs without a lease)."""
    keys = list_keys(s3, bucket, output) if keys is None else keys
    records = []
    for key in sorted(k for k in keys if k.startswith(SUBMISSION_PREFIX) and k.endswith(".json")):
        record = read_json(s3, bucket, f"{output.strip('/')}/{key}")
        if record is not None:
            records.append(record)
    return records


def submission_key(identity: str) -> str:
    """`_cpb/submission-<id>.json` of a message identity (relative to the output), as the Lambda names it."""
    return f"{SUBMISSION_PREFIX}{re.sub(r'[^A-Za-z0-9_.-]', '_', identity)}.json"


def taken_by_lambda(s3, bucket: str, output: str, keys: dict[str, int]):
    """A check `identity -> bool`: did the Lambda take that message for `output` (its submission record
    says `submitted`, or `cancelled` when it was rolled back)? A `pending` record is not taken: the
    Lambda is on it right now, or it lost the output to another message and will be redelivered.
    Reads only the records asked about (an output rerun often has many)."""
    def taken(identity: str) -> bool:
        key = submission_key(identity)
        if key not in keys:
            return False
        record = read_json(s3, bucket, f"{output.strip('/')}/{key}")
        return bool(record) and record.get("status") in ("submitted", "cancelled")
    return taken


REFUSAL_PREFIX = "_cpb/refusal-"


def refusal_first_at(record: Optional[dict]) -> str:
    """When the Lambda first refused a message (its refusal record's `first_at`; `at` moves with every
    redelivery of it), to the second, as the lease's `created_at` is compared."""
    return str((record or {}).get("first_at") or (record or {}).get("at") or "")[:19]


def no_longer_coming(s3, bucket: str, output: str, keys: dict[str, int], lease: Optional[dict]):
    """A check `identity -> bool` for this machine's receipts: the Lambda took that message for `output`
    (`taken_by_lambda`), or refused it as invalid before the current run began. An invalid message never
    runs as it is (it ends in the dead-letter queue, or is purged): the run that began after it is the one
    sent to replace it, and its receipt must not keep the output WAITING for SQS's 14-day retention."""
    taken = taken_by_lambda(s3, bucket, output, keys)
    since = str((lease or {}).get("created_at") or "")[:19]

    def settled(identity: str) -> bool:
        if taken(identity):
            return True
        key = f"{REFUSAL_PREFIX}{re.sub(r'[^A-Za-z0-9_.-]', '_', identity)}.json"
        if not since or key not in keys:
            return False
        record = read_json(s3, bucket, f"{output.strip('/')}/{key}")
        return (bool(record) and record.get("message_id") == identity and record.get("kind") == "invalid"
                and bool(refusal_first_at(record)) and refusal_first_at(record) < since)
    return settled


def dependency_failure(after: Iterable[str], failed: Iterable[str] = (), they: bool = False) -> str:
    """Why a part was not run when Batch failed it by dependency, and what to do (one line): `failed`
    are the `after` outputs whose run did not succeed (all of `after` when none is known)."""
    ups = list(failed) or list(after)
    runs = "they run" if they else "it runs"
    if not ups:
        return (f"Batch never started it ({DEPENDENCY_FAILED}): a job it waits for failed; find it with "
                "cpb status, fix it and send both again")
    steps = ", ".join(ups)
    return (f"Batch never started it ({DEPENDENCY_FAILED}): the step {runs} after, {steps}, failed; fix that step "
            f"(cpb status {ups[0]}) and send both again (a second cpb plate sends only what is not up to date)")


def run_state(s3, bucket: str, output: str, expected: Optional[int] = None,
              keys: Optional[dict[str, int]] = None, explain: bool = True) -> RunState:
    """Read the lease and every run record under `output` and say what the current run has done
    (`explain`: also why parts without a record were not run, from the job events and the upstream)."""
    output = output.strip("/")
    keys = list_keys(s3, bucket, output) if keys is None else keys
    part_keys = {int(m.group(1)): k for k in keys if (m := _PART_RECORD.match(k))}
    with ThreadPoolExecutor(max_workers=8) as pool:  # a plate's array run is thousands of records
        records = dict(zip(part_keys, pool.map(lambda k: read_json(s3, bucket, f"{output}/{k}"), part_keys.values())))
    folders = {int(m.group(1)) for k in keys if (m := _PART.match(k))}
    top = read_json(s3, bucket, f"{output}/{RUN_RECORD}") if RUN_RECORD in keys else None
    lease = read_lease(s3, bucket, output)[0] if LEASE_KEY in keys else None
    if lease is not None:
        state = _with_lease(output, lease, top, records, expected)
    else:
        state = _without_lease(s3, bucket, output, keys, top, records, folders, expected)
    state.conflicts.extend(_tiling(state))
    state.conflicts.extend(_mixed_upstream(state))
    if explain and lease is not None:
        _explain_not_run(s3, bucket, state, keys)
    return state


def _last_jobs(lease: dict, array: bool, indices: Iterable[Optional[int]]) -> dict[Optional[int], str]:
    """Part index (None for a plain run) -> Batch id of the job or child that ran it last (a retry's, if any)."""
    wanted, ids = set(indices), {}
    for job in lease.get("jobs") or []:
        if not isinstance(job, dict) or not job.get("job_id"):
            continue
        if not array:
            ids.setdefault(None, str(job["job_id"]))
            continue
        offset, size = _int(job.get("array_offset")) or 0, _int(job.get("array_size")) or 0
        for index in wanted:
            if index is not None and offset <= index < offset + size:
                ids[index] = f"{job['job_id']}:{index - offset}"
    for retry in lease.get("retries") or []:
        if isinstance(retry, dict) and retry.get("job_id"):
            index = _int(retry.get("array_index")) if array else None
            if index in wanted:
                ids[index] = str(retry["job_id"])
    return ids


def _explain_not_run(s3, bucket: str, state: RunState, keys: dict[str, int]) -> None:
    """Mark the parts without a record whose job Batch failed by dependency (their job event says so)."""
    missing = {p.index: p for p in state.parts if p.record is None}
    if not missing or state.lease is None:
        return
    events = {index: f"_cpb/events/{job_id}.json"
              for index, job_id in _last_jobs(state.lease, state.array, missing).items()}
    events = {index: key for index, key in events.items() if key in keys}
    if not events:
        return
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = dict(zip(events, pool.map(lambda k: read_json(s3, bucket, f"{state.output}/{k}"), events.values())))
    blocked = [index for index, event in found.items() if event and event.get("status") == "FAILED"
               and str(event.get("status_reason") or "").startswith(DEPENDENCY_FAILED)]
    if not blocked:
        return
    after = [str(a) for a in state.lease.get("after") or []]
    failed = [a for a in after if not run_state(s3, bucket, a, explain=False).complete]
    reason = dependency_failure(after, failed)
    for index in blocked:
        missing[index].not_run = reason


def _mixed_upstream(state: RunState) -> list[str]:
    """The parts of one run must have read the same results of the step they run after (their
    fingerprints' `upstream`): an upstream rerun while they ran makes one table of two inputs."""
    seen = {p.prefix: (p.record or {}).get("fingerprint") for p in state.parts if p.status == "succeeded"}
    values = {prefix: fp.get("upstream") for prefix, fp in seen.items() if isinstance(fp, dict) and fp.get("upstream")}
    if len(set(values.values())) < 2:
        return []
    names = sorted(values, key=lambda n: (values[n], n))
    return [f"{state.output}: the parts ran on different results of the step they run after ({names[0]}: "
            f"{str(values[names[0]])[:12]}, {names[-1]}: {str(values[names[-1]])[:12]}); they cannot be merged: "
            "send the output again"]


def _stale_reason(record: dict, run_id: Optional[str], index: Optional[int], prefix: str) -> Optional[str]:
    """Why `record` is not the current run's record for this part (None: it is)."""
    if record.get("run_id") != run_id:
        return (f"record of run {short(record.get('run_id'))}, not of the current run {short(run_id)} "
                "(this part of the current run has not finished, or never started)")
    if index is not None and _int(record.get("array_index")) != index:
        return (f"record says array index {record.get('array_index')}, but the folder is {prefix} "
                "(written by another job; never merged)")
    if index is None and record.get("array_index") is not None:
        return f"record of array child {record.get('array_index')}, not of a single job"
    return None


def _with_lease(output: str, lease: dict, top: Optional[dict], records: dict[int, Optional[dict]],
                expected: Optional[int]) -> RunState:
    run_id = lease.get("run_id")
    array_size = _int(lease.get("array_size"))
    state = RunState(output, array_size is not None, expected=array_size if array_size is not None else 1,
                     run_id=run_id, lease=lease, image_set_count=_int(lease.get("image_set_count")))
    if lease.get("state") == "unreadable":
        state.conflicts.append(f"{output}: its lease {LEASE_KEY} is not a JSON object, so its current run is "
                               "unknown: send the message again")
    if lease.get("state") == "cancelled":
        state.conflicts.append(f"{output}: its current run {short(run_id)} was cancelled (its message was "
                               "rolled back): send the message again")
    if expected is not None and expected != (array_size or 1):
        state.conflicts.append(f"{output}: --parts {expected}, but the current run {short(run_id)} has "
                               f"{array_size or 1} part(s); drop --parts")
    if array_size is None:
        part = PartState("", None, top)
        if top is not None:
            part.stale = _stale_reason(top, run_id, None, "")
        state.parts = [part]
        state.ignored = [f"{part_name(i)} ({_describe(r)})" for i, r in sorted(records.items()) if r is not None]
        return state
    for index in range(array_size):
        record = records.get(index)
        part = PartState(part_name(index), index, record)
        if record is not None:
            part.stale = _stale_reason(record, run_id, index, part.prefix)
        state.parts.append(part)
    state.ignored = [f"{part_name(i)} ({_describe(r)}, beyond the current run's {array_size} parts)"
                     for i, r in sorted(records.items()) if r is not None and i >= array_size]
    if top is not None:
        state.ignored.insert(0, f"_cpb/run.json ({_describe(top)}, a single job's record)")
    return state


def _describe(record: Optional[dict]) -> str:
    record = record or {}
    return f"run {short(record.get('run_id'))}, {record.get('status', '?')}"


def _without_lease(s3, bucket: str, output: str, keys: dict[str, int], top: Optional[dict],
                   records: dict[int, Optional[dict]], folders: set[int], expected: Optional[int]) -> RunState:
    """Outputs from before leases, and local runs: the records must agree among themselves."""
    if expected is None:
        expected = expected_parts_from_submissions(load_submissions(s3, bucket, output, keys))
    indices = sorted(folders)
    array = bool(indices) or (expected is not None and RUN_RECORD not in keys)
    every = ([("_cpb/run.json", top)] if top is not None else []) + \
        [(part_name(i), r) for i, r in sorted(records.items()) if r is not None]
    runs: dict[Optional[str], list[str]] = {}
    for name, record in every:
        runs.setdefault(record.get("run_id"), []).append(name)
    state = RunState(output, array, expected=expected if array else 1)
    if len(runs) > 1:
        state.conflicts.append(f"{output}: records of {len(runs)} runs and no lease to say which is current: "
                               + "; ".join(f"run {short(r)}: {_names(n)}" for r, n in runs.items())
                               + "; send the message again to make one run")
    state.run_id = next(iter(runs)) if len(runs) == 1 else None
    if not array:
        state.parts = [PartState("", None, top)] if (top is not None or keys) else []
        return state
    if expected is not None:
        indices = sorted(set(indices) | set(range(expected)))
    for index in indices:
        record = records.get(index)
        part = PartState(part_name(index), index, record)
        if record is not None and record.get("array_index") is None:
            part.stale = "record of a single job whose output was this part folder, not an array child's (never merged)"
        elif record is not None and _int(record.get("array_index")) != index:
            part.stale = _stale_reason(record, record.get("run_id"), index, part.prefix)
        state.parts.append(part)
    if top is not None:
        state.ignored.append(f"_cpb/run.json ({_describe(top)}, a single job's record)")
    state.image_set_count = image_sets_from_submissions(load_submissions(s3, bucket, output, keys))
    return state


def _names(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")


def _tiling(state: RunState) -> list[str]:
    """The succeeded parts' ranges must cover 1..image_set_count exactly once (checked once all succeeded)."""
    if not state.parts or any(p.status != "succeeded" for p in state.parts):
        return []
    count = state.image_set_count  # the run's (a record's image_set_count is its own range's)
    if not state.array:
        first, last = state.parts[0].range
        child = (state.parts[0].record or {}).get("array_index") is not None  # one part downloaded on its own
        if first is not None and count is not None and not child and (first, last) != (1, count):
            return [f"{state.output}: its record covers image sets {first}-{last}, not all {count}"]
        return []
    lines = []
    ranges = sorted((p.range, p.prefix) for p in state.parts)
    following = 1
    for (first, last), prefix in ranges:
        if first is None or last is None:
            lines.append(f"{prefix}: its record names no image-set range")
            continue
        if first < following:
            lines.append(f"{prefix}: image sets {first}-{last} overlap image sets before {following} that "
                         "another part already holds (two runs mixed?)")
        elif first > following:
            lines.append(f"image sets {following}-{first - 1} are in no part (next: {prefix} from {first})")
        following = max(following, last + 1)
    if count is not None and following - 1 < count:
        lines.append(f"image sets {following}-{count} are in no part")
    elif count is not None and following - 1 > count:
        lines.append(f"the parts run up to image set {following - 1}, but the run has {count}")
    return [f"{state.output}: ranges do not tile the image sets: {line}" for line in lines]
