"""Local mode: run a pipeline over plain folders, as `cpb run --local` does.

    from cpb_worker.local import run_local
    record = run_local("nuclei.cppipe", "images/", "out/", data_file="load_data.csv", workers=2)

Results land in the output folder exactly as a Batch job's land in its S3
prefix (merged CSVs, images, `_cpb/logs/`, and `_cpb/run.json` written last).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping, Optional, Union

from .errors import WorkerError
from .job import JobSpec, fail, plan_job, run_plan
from .record import RECORD_KEY, RunRecord, utc_now, write_local

PathLike = Union[str, "os.PathLike[str]"]


def run_local(pipeline: PathLike, input_dir: PathLike, output_dir: PathLike, data_file: Optional[PathLike] = None,
              workers: Optional[int] = None, first: Optional[int] = None, last: Optional[int] = None,
              unsplittable: bool = False, env: Optional[Mapping[str, str]] = None) -> RunRecord:
    """Run CellProfiler over input_dir into output_dir and return the run record.

    `workers` CellProfiler processes (default: $CPB_VCPUS or the CPUs this
    process may use) each take a contiguous range of image sets; `first`/`last`
    restrict the run to a range. The record is also written to
    `<output_dir>/_cpb/run.json`. On failure a record with status `failed` is
    written and WorkerError is raised (its `.exit_code`, `.reason`, `.record`).
    """
    env = dict(os.environ if env is None else env)
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    stale = output / RECORD_KEY
    if stale.exists():
        stale.unlink()  # a previous run's record must not vouch for this run's files
    record = RunRecord(started_at=utc_now(), image=env.get("CPB_IMAGE"))
    t_start = time.monotonic()
    spec = JobSpec(pipeline=Path(pipeline).resolve(), input_dir=Path(input_dir).resolve(),
                   data_file=Path(data_file).resolve() if data_file else None, workers=workers,
                   first=first, last=last, force_unsplittable=unsplittable or env.get("CPB_UNSPLITTABLE") == "1",
                   env=env)
    try:
        t0 = time.monotonic()
        plan = plan_job(spec)
        record.timings["plan"] = round(time.monotonic() - t0, 3)
        run_plan(plan, spec.input_dir, output, record, env)
        _warn_unlisted(record, output)
        record.status = "succeeded"
    except WorkerError as error:
        fail(record, error)
        error.record = record
        _finish(record, output, t_start)
        raise
    _finish(record, output, t_start)
    return record


def _warn_unlisted(record: RunRecord, output: Path) -> None:
    """A reused output folder may hold files of an earlier run: say so rather than let
    them pass for this run's results (the record lists only what this run wrote)."""
    listed = {entry["key"] for entry in record.files} | {RECORD_KEY}
    extra = sorted(str(p.relative_to(output)).replace(os.sep, "/") for p in output.rglob("*") if p.is_file()
                   and str(p.relative_to(output)).replace(os.sep, "/") not in listed)
    if extra:
        record.warnings.append(f"{len(extra)} file(s) in the output folder are not from this run "
                               f"(e.g. {extra[0]}); they are not in this record")


def _finish(record: RunRecord, output: Path, t_start: float) -> None:
    record.finished_at = utc_now()
    record.timings["total"] = round(time.monotonic() - t_start, 3)
    t0 = time.monotonic()
    write_local(record, output)
    record.timings["record"] = round(time.monotonic() - t0, 3)
