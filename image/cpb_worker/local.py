"""Local mode: run a pipeline over plain folders, as `cpb run --local` does.

    from cpb_worker.local import run_local
    record = run_local("nuclei.cppipe", "images/", "out/", data_file="load_data.csv", workers=2)

Results land in the output folder exactly as a Batch job's land in its S3
prefix (merged CSVs, images, `_cpb/logs/`, and `_cpb/run.json` written last).

A rerun into the same output folder resumes: when the folder's succeeded record has the
fingerprint of what would run now (pipeline, data-file rows or input files, CellProfiler
version) and every file it lists is there at its size, CellProfiler does not run again and
the new record says `resumed_from`. `resume=False` (or CPB_RESUME=0) always reruns.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Union

from .errors import WorkerError
from .job import JobSpec, fail, plan_job, run_plan
from .record import RECORD_KEY, RunRecord, read_local, utc_now, write_local
from .resume import current_fingerprint, resume_enabled, resumed_record, reuse_refusal
from .runner import installed_cellprofiler_version

PathLike = Union[str, "os.PathLike[str]"]


def run_local(pipeline: PathLike, input_dir: PathLike, output_dir: PathLike, data_file: Optional[PathLike] = None,
              workers: Optional[int] = None, first: Optional[int] = None, last: Optional[int] = None,
              unsplittable: bool = False, env: Optional[Mapping[str, str]] = None,
              resume: Optional[bool] = None) -> RunRecord:
    """Run CellProfiler over input_dir into output_dir and return the run record.

    `workers` CellProfiler processes (default: $CPB_VCPUS or the CPUs this
    process may use) each take a contiguous range of image sets; `first`/`last`
    restrict the run to a range. The record is also written to
    `<output_dir>/_cpb/run.json`. On failure a record with status `failed` is
    written and WorkerError is raised (its `.exit_code`, `.reason`, `.record`).
    `resume` (default: unless CPB_RESUME=0) reuses the folder's earlier results when
    nothing they depend on changed (module docstring).
    """
    env = dict(os.environ if env is None else env)
    resume = resume_enabled(env) if resume is None else resume
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    try:
        old = read_local(output)
    except ValueError:
        old = None  # a corrupt record vouches for nothing
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
        record.fingerprint = current_fingerprint(plan.pipeline.sha256, plan.data_sha256, env.get("CPB_IMAGE"),
                                                 installed_cellprofiler_version(env), None)
        if resume and old is not None:
            why = reuse_refusal(old, plan.first, plan.last, None, record.fingerprint, _sizes(output))
            if why is None:
                resumed_record(old, record)
                print(f"cpb_worker: {record.warnings[0]}", file=sys.stderr)
                _finish(record, output, t_start)
                return record
        stale = output / RECORD_KEY
        if stale.exists():
            stale.unlink()  # a previous run's record must not vouch for this run's files
        run_plan(plan, spec.input_dir, output, record, env)
        record.fingerprint["cellprofiler_version"] = record.cellprofiler_version
        _warn_unlisted(record, output)
        record.status = "succeeded"
    except WorkerError as error:
        fail(record, error)
        error.record = record
        _finish(record, output, t_start)
        raise
    _finish(record, output, t_start)
    return record


def _sizes(output: Path) -> dict:
    out = {}
    for path in output.rglob("*"):
        if path.is_file():
            out[str(path.relative_to(output)).replace(os.sep, "/")] = path.stat().st_size
    return out


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
