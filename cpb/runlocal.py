"""`cpb run --local`: the worker's own local mode, with a one-line verdict.

Runs `cpb_worker.local.run_local`, the code the container runs, so testing a
pipeline here exercises exactly what AWS will run (minus S3).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class LocalOutcome:
    """What `cpb run --local` prints and exits with."""

    ok: bool
    exit_code: int
    summary: str


def run_local(pipeline: Path, input_dir: Path, output_dir: Path, data_file: Optional[Path],
              workers: int, unsplittable: bool) -> LocalOutcome:
    """Run the worker locally; turn its record or error into one summary."""
    from cpb_worker.errors import WorkerError
    from cpb_worker.local import run_local as worker_run_local

    try:
        record = worker_run_local(pipeline, input_dir, output_dir, data_file=data_file, workers=workers,
                                  unsplittable=unsplittable)
    except WorkerError as error:
        return LocalOutcome(False, error.exit_code,
                            f"FAILED (exit {error.exit_code}): {error.reason}\n"
                            f"run record: {Path(output_dir) / '_cpb' / 'run.json'}")
    files = len(record.files)
    took = record.timings.get("total")
    return LocalOutcome(True, 0, f"succeeded: image sets {record.first}-{record.last} with {record.processes} "
                                 f"CellProfiler process(es) in {took}s; {files} file(s) in {output_dir}")
