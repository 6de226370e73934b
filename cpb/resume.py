"""Is a step up to date? The client's side of resume (docs/CONTRACTS.md, "Resume").

Before sending a step, `cpb plate` compares the fingerprint of what would run now with the
fingerprints in the output's CURRENT succeeded records, part by part, using the worker's own
functions (`cpb_worker.fingerprint`, `cpb_worker.datafile`), so the client and the worker agree
byte for byte: pipeline sha256, the data-file header and this part's rows by content, the image
(the stack's `imageUri` / `$CPB_IMAGE`), and the records of the step it runs after (`upstream`).
Never file counts or names alone. A step all of whose parts match is not sent; a step with some
matching parts is sent whole, and the worker reuses the matching parts (`resumed_from`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cpb.runrecords import RunState, run_state, short


@dataclass
class PartCheck:
    """One part of a step: its range, and whether its current record matches what would run now."""

    prefix: str
    first: int
    last: int
    up_to_date: bool
    reason: str                   # why not (empty when up to date)
    run_id: Optional[str] = None  # the run whose record matched


@dataclass
class StepCheck:
    """A step (one output) as resume sees it."""

    output: str
    parts: list[PartCheck] = field(default_factory=list)
    run_id: Optional[str] = None
    state: Optional[RunState] = None
    forced: Optional[str] = None  # a reason to send the step whatever its records say
    resume: bool = True           # False: the worker must not reuse parts either (message `resume: false`)

    @property
    def up_to_date(self) -> bool:
        return not self.forced and bool(self.parts) and all(p.up_to_date for p in self.parts)

    @property
    def stale(self) -> list[PartCheck]:
        return [p for p in self.parts if not p.up_to_date]

    def summary(self) -> str:
        """One line: why this step is skipped, or what will run."""
        if self.up_to_date:
            return f"up to date: same pipeline, data rows and image as run {short(self.run_id)}"
        if self.forced:
            return f"to run: {self.forced}"
        stale = self.stale
        if len(stale) == len(self.parts):
            return f"to run: {_reasons(stale)}"
        return (f"to run: {len(stale)} of {len(self.parts)} part(s) ({_reasons(stale)}); the other "
                f"{len(self.parts) - len(stale)} are up to date and the worker reuses them")


def _reasons(parts: list[PartCheck]) -> str:
    if len(parts) == 1 and not parts[0].prefix:  # a plain job: its reason says it all
        return parts[0].reason
    by_reason: dict[str, list[str]] = {}
    for part in parts:
        by_reason.setdefault(part.reason, []).append(part.prefix or "the job")
    return "; ".join(f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}: {reason}"
                     for reason, names in by_reason.items())


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def part_ranges(total: int, per_job: Optional[int]) -> tuple[Optional[int], list[tuple[int, int]]]:
    """(array size or None, [(first, last)]) as the Lambda splits `total` image sets: an array of
    ceil(total / per_job) children, or one plain job when that is fewer than 2 (Batch has no array of 1)."""
    if per_job:
        size = -(-total // per_job)
        if size >= 2:
            return size, [(i * per_job + 1, min((i + 1) * per_job, total)) for i in range(size)]
    return None, [(1, total)]


def upstream_of(s3, bucket: str, outputs: list[str]) -> Optional[str]:
    """The fingerprint `upstream` of a step that runs after `outputs`: their current succeeded records."""
    if not outputs:
        return None
    from cpb_worker.fingerprint import upstream_sha256
    records = []
    for output in outputs:
        state = run_state(s3, bucket, output)
        records.extend(p.record for p in state.parts if p.status == "succeeded" and p.record)
    return upstream_sha256(records)


def check_step(s3, bucket: str, output: str, pipeline_sha256: str, header: list[str], rows: list[list[str]],
               per_job: Optional[int], image: Optional[str], upstream: Optional[str]) -> StepCheck:
    """Compare the output's current records with what would run now, part by part.

    `rows` are the image sets' data-file rows (after LoadData's row range, if any)."""
    from cpb_worker.fingerprint import data_rows_sha256, differences, make
    size, ranges = part_ranges(len(rows), per_job)
    state = run_state(s3, bucket, output)
    check = StepCheck(output, run_id=state.run_id, state=state)
    names = [f"part-{i:05d}" for i in range(size)] if size is not None else [""]
    by_prefix = {p.prefix: p for p in state.parts}
    split_changed = state.parts and (state.array != (size is not None) or len(state.parts) != len(ranges))
    for name, (first, last) in zip(names, ranges):
        wanted = make(pipeline_sha256, data_rows_sha256(header, rows[first - 1:last]), image, None, upstream)
        part = by_prefix.get(name)
        if not state.parts or part is None:
            reason = "never run" if not state.parts else f"the split changed (the current run has {len(state.parts)} part(s))"
            if split_changed and state.parts:
                reason = f"the split changed (the current run has {len(state.parts)} part(s), now {len(ranges)})"
            check.parts.append(PartCheck(name, first, last, False, reason))
            continue
        if part.status != "succeeded":
            check.parts.append(PartCheck(name, first, last, False, "failed" if part.status == "failed" else
                                         ("not finished" if part.status == "missing" else "not of the current run")))
            continue
        record = part.record or {}
        if (record.get("first"), record.get("last")) != (first, last):
            check.parts.append(PartCheck(name, first, last, False,
                                         f"ran image sets {record.get('first')}-{record.get('last')}, now {first}-{last}"))
            continue
        diffs = differences(record.get("fingerprint"), wanted)
        check.parts.append(PartCheck(name, first, last, not diffs, ", ".join(diffs), state.run_id))
    if state.conflicts:
        for part in check.parts:
            part.up_to_date, part.reason = False, part.reason or "the current run's parts do not tile the image sets"
    return check
