"""cpb_worker: runs one CellProfiler Batch job (or array child), in the
container and unchanged on a laptop. Python >= 3.8, stdlib + boto3 only.

Entry points
------------
* `python -m cpb_worker` — AWS mode (the container's ENTRYPOINT). Reads the
  job environment of docs/CONTRACTS.md (CPB_BUCKET, CPB_PIPELINE, CPB_INPUT,
  CPB_OUTPUT, CPB_DATA_FILE, CPB_IMAGE_SETS_PER_JOB, CPB_IMAGE_SET_COUNT,
  CPB_VCPUS, CPB_MEMORY_MIB, CPB_PROCESS_MEMORY_MIB, CPB_UNSPLITTABLE,
  CPB_FSX_ROOT, CPB_RUN_ID, CPB_RESUME, CPB_AFTER, AWS_BATCH_JOB_ARRAY_INDEX
  + CPB_ARRAY_OFFSET or CPB_ARRAY_INDEX ...), checks the output's lease,
  reuses an unchanged earlier result of its part (resume) or reads inputs
  from `$CPB_FSX_ROOT/<key>` or S3, runs, uploads to
  `s3://$CPB_BUCKET/$CPB_OUTPUT/` (array children to `part-NNNNN/`) and
  writes `_cpb/run.json` last. Exit codes: 0 ok, 2 bad input, 3 pipeline
  failed, 4 transient S3 trouble, 5 superseded (the lease names another run;
  nothing written), 137 CellProfiler killed (OOM); one-line reason on stderr.
* `python -m cpb_worker local --pipeline P --input DIR --output DIR
  [--data-file CSV] [--workers N] [--first F --last L] [--unsplittable]`.
* Python: `cpb_worker.local.run_local(pipeline, input_dir, output_dir,
  data_file=None, workers=None, first=None, last=None, unsplittable=False,
  env=None, resume=None) -> cpb_worker.record.RunRecord` (used by `cpb run
  --local`; a rerun into the same folder resumes unless resume=False or
  CPB_RESUME=0); raises `cpb_worker.errors.WorkerError` (`.exit_code`,
  `.reason`, `.record`) after writing a failed record.

Both modes find CellProfiler through CPB_CELLPROFILER (default `cellprofiler`)
and add CPB_CELLPROFILER_ARGS (else the arguments `make` recorded beside a project venv;
none for 4.2.8, the container's release). Pipelines without LoadData are counted and
split by CellProfiler itself (`cpsets.py`, run by CellProfiler's Python:
CPB_CELLPROFILER_PYTHON, else the `cellprofiler` script's #! interpreter).
"""
from __future__ import annotations

__all__ = ["run_local"]


def run_local(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - thin re-export, documented in local.py
    """See cpb_worker.local.run_local (imported lazily: AWS mode does not need it)."""
    from .local import run_local as _run_local
    return _run_local(*args, **kwargs)
