"""Resume: reuse a part's succeeded results of an earlier run when nothing they depend on changed.

docs/CONTRACTS.md, "Worker duties" 2: the earlier record of this part (another run's) is
reused when resume is on (CPB_RESUME is not 0), it succeeded, its range is this job's, its
fingerprint equals what would run now (`fingerprint.differences` empty: pipeline sha256,
this job's data rows by content or the input listing, container image, CellProfiler version,
the upstream results) and every file it lists is there at its size. Never a file count or
name alone. The new record (this run's) then lists the same files with `resumed_from`.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

from . import fingerprint
from .record import RunRecord


def reuse_refusal(old: Optional[dict], first: Optional[int], last: Optional[int], array_index: Optional[int],
                  current: dict, present: Mapping[str, int]) -> Optional[str]:
    """None when `old` (an earlier record of this part) can stand for this job; else why not.

    `first`/`last` is this job's range (None: every image set, which CellProfiler counts: the
    old range must then start at 1, and the equal input listing makes the same sets);
    `present` maps each file under the part's prefix (relative key) to its size."""
    if not isinstance(old, dict):
        return "no earlier record"
    if old.get("status") != "succeeded":
        return f"the earlier run {old.get('run_id')} did not succeed"
    if old.get("array_index") != array_index:
        return f"the earlier record is of array index {old.get('array_index')}"
    if first is not None and (old.get("first"), old.get("last")) != (first, last):
        return f"the earlier record ran image sets {old.get('first')}-{old.get('last')}, this job {first}-{last}"
    if first is None and old.get("first") != 1:
        return f"the earlier record ran image sets {old.get('first')}-{old.get('last')}, not all of them"
    changed = fingerprint.differences(old.get("fingerprint"), current)
    if changed:
        return "; ".join(changed)
    files = old.get("files")
    if not isinstance(files, list) or not files:
        return "the earlier record lists no files"
    for entry in files:
        if not isinstance(entry, dict) or present.get(str(entry.get("key"))) != entry.get("size"):
            return f"{entry.get('key') if isinstance(entry, dict) else entry} is not there at its recorded size"
    return None


def resumed_record(old: dict, record: RunRecord) -> RunRecord:
    """Fill `record` (this run's: ids, timings) from the reused one."""
    for name in ("first", "last", "image_set_count", "cellprofiler_version", "pipeline_sha256", "exit_codes",
                 "files", "processes", "split", "unsplittable_reasons", "tables"):
        if name in old and old[name] is not None:
            setattr(record, name, old[name])
    source = old.get("run_id") or f"local run of {old.get('started_at')}"
    fp = dict(old.get("fingerprint") or {})
    record.fingerprint = fp
    record.resumed_from = source
    record.status = "succeeded"
    record.reason = None
    record.warnings = [f"resumed: the results of run {source} (image sets {old.get('first')}-{old.get('last')}) "
                       "have the same fingerprint and every file is in place; CellProfiler did not run again"]
    return record


def current_fingerprint(pipeline_sha256: str, data_sha256: Optional[str], image: Optional[str],
                        cellprofiler_version: Optional[str], upstream_records: Optional[List[dict]]) -> dict:
    upstream = None if upstream_records is None else fingerprint.upstream_sha256(upstream_records)
    return fingerprint.make(pipeline_sha256, data_sha256, image, cellprofiler_version, upstream)


def resume_enabled(env: Mapping[str, str]) -> bool:
    return (env.get("CPB_RESUME") or "1").strip() != "0"


def sizes_under(files: Dict[str, int], prefix: str) -> Dict[str, int]:
    """{key relative to prefix: size} for keys under `prefix/`."""
    start = prefix.rstrip("/") + "/"
    return {key[len(start):]: size for key, size in files.items() if key.startswith(start)}
