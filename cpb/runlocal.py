"""`cpb run --local`: the worker's own local mode, with a one-line verdict.

Runs `cpb_worker.local.run_local`, the code the container runs, so testing a
pipeline here exercises exactly what AWS will run (minus S3).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Tuple

import click

if TYPE_CHECKING:  # the worker package is imported lazily, as in run_local
    from cpb_worker.record import RunRecord


REPO = Path(__file__).resolve().parent.parent


def cellprofiler_defaults(environ: Mapping[str, str], repo: Path = REPO) -> Tuple[Dict[str, str], Optional[str]]:
    """The environment for the worker, and a note when it picked CellProfiler itself.

    `make demo` finds the project's .venv-cp (CellProfiler as the container runs it) on its own;
    without the same default, `cpb run --local` right after it failed with "cannot start
    CellProfiler". The arguments a project CellProfiler needs are recorded beside it by `make`
    (cpb_worker.runner.venv_args), so naming it in CPB_CELLPROFILER needs nothing more."""
    env = dict(environ)
    project = repo / ".venv-cp" / "bin" / "cellprofiler"
    if env.get("CPB_CELLPROFILER") or not project.exists():
        return env, None  # the scientist's own choice, or no project CellProfiler to offer
    env["CPB_CELLPROFILER"] = str(project)
    return env, f"note: using the project's CellProfiler {project} (set CPB_CELLPROFILER to use another)"


class LocalRunError(Exception):
    """`cpb run --local` refuses its arguments; the message says what to change."""


@dataclass
class LocalOutcome:
    """What `cpb run --local` prints and exits with."""

    ok: bool
    exit_code: int
    summary: str


def run_local_command(pipeline: Path, input_dir: Path, output_dir: Path, data_file: Optional[Path],
                      workers: Optional[int], unsplittable: bool) -> LocalOutcome:
    """`cpb run --local`: the folder rule the Lambda applies to prefixes, the default of one CellProfiler
    process per CPU (as a Batch job uses its vCPUs), then the worker."""
    from cpb_worker.ranges import available_cpus
    if output_dir.resolve() == input_dir.resolve() or input_dir.resolve() in output_dir.resolve().parents:
        # the rule the Lambda applies to S3 prefixes; here the next run would also read the outlines as images
        raise LocalRunError(f"--output {output_dir} is inside --input {input_dir}: results would mix with the "
                            "images; choose an output folder outside the input folder")
    if data_file is not None:
        check_illum_listed(pipeline, data_file)
    cpus = available_cpus({})  # this machine's CPUs (CPB_VCPUS describes a Batch job, not this machine)
    if workers is None:
        workers = cpus
    elif workers > cpus:
        click.echo(f"note: --workers {workers} is more than the {cpus} CPU(s) here: the extra CellProfiler "
                   f"processes share those CPUs (no faster) and each needs its own memory; try --workers {cpus}",
                   err=True)
    return run_local(pipeline, input_dir, output_dir, data_file, workers, unsplittable)


def check_illum_listed(pipeline: Path, data_file: Path) -> None:
    """Before CellProfiler starts: a pipeline applying illumination functions its data file does not
    list stops after start-up with `ValueError: The IllumDNA image is missing from the pipeline`.
    The check is cpb loaddata's (cpb.loaddata.illum_not_loaded); a pipeline it cannot read is left
    to the worker, which says what is wrong with it."""
    from cpb.loaddata import LoadDataError, data_file_image_names, illum_not_loaded, pipeline_image_names
    try:
        expected = pipeline_image_names(pipeline)
        loaded = data_file_image_names(data_file)
    except (LoadDataError, OSError, ValueError):
        return
    if expected.loads_with != "LoadData":
        return
    missing = illum_not_loaded(expected, loaded)
    if missing:
        raise LocalRunError(
            f"pipeline {pipeline.name} loads {', '.join(missing)} ({expected.names[missing[0]]}), which data file "
            f"{data_file.name} does not list: make the illumination functions first (cpb run --local --pipeline "
            "<illumination pipeline> --data-file <its CSV> --output <folder>), then write the CSV with `cpb "
            "loaddata ... --illum <that folder>`")


def run_local(pipeline: Path, input_dir: Path, output_dir: Path, data_file: Optional[Path],
              workers: int, unsplittable: bool) -> LocalOutcome:
    """Run the worker locally; turn its record or error into one summary."""
    from cpb_worker.errors import WorkerError
    from cpb_worker.local import run_local as worker_run_local

    env, note = cellprofiler_defaults(os.environ)
    if note:
        click.echo(note, err=True)
    try:
        record = worker_run_local(pipeline, input_dir, output_dir, data_file=data_file, workers=workers,
                                  unsplittable=unsplittable, env=env)
    except WorkerError as error:
        return LocalOutcome(False, error.exit_code,
                            f"FAILED (exit {error.exit_code}): {error.reason}\n"
                            f"run record: {Path(output_dir) / '_cpb' / 'run.json'}")
    return LocalOutcome(True, 0, summarize(record, output_dir, workers))


def summarize(record: "RunRecord", output_dir: Path, workers: int) -> str:
    """The verdict line, then what a scientist must know to trust it: the record's warnings
    (e.g. an earlier run's files left in the output folder) and why fewer processes ran than
    --workers asked for (the run record has it, but nobody opens run.json after a success)."""
    took = record.timings.get("total")
    lines = [f"succeeded: image sets {record.first}-{record.last} with {record.processes} "
             f"CellProfiler process(es) in {took}s; {len(record.files)} file(s) in {output_dir}"]
    if record.processes < workers:
        if record.unsplittable_reasons:
            why = "the pipeline must run as one process (" + "; ".join(record.unsplittable_reasons) + ")"
        elif record.image_set_count is not None and record.image_set_count < workers:
            why = f"there are only {record.image_set_count} image set(s)"
        else:
            why = "the image sets could not be counted from the pipeline's rules (give a LoadData --data-file)"
        lines.append(f"note: {record.processes} process(es), not --workers {workers}, because {why}")
    lines.extend(f"warning: {warning}" for warning in record.warnings)
    return "\n".join(lines)
