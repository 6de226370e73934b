"""Plan and run one job on local folders: the part shared by AWS and local mode.

plan_job() reads the pipeline and data file and decides which image sets
this job runs and how they are split; run_plan() runs CellProfiler over the
ranges, merges and verifies the outputs and fills in the run record. Getting
files from S3/FSx and uploading results is aws.py's job; writing the record
locally is local.py's.
"""
from __future__ import annotations

import codecs
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

from . import datafile as df
from .errors import BadInput, WorkerError
from .filerules import count_image_sets, list_files
from .merge import merge
from .pipeline import Pipeline, check_saved_images, export_module, is_grouped, load_pipeline, unsplittable_reasons
from .ranges import Range, array_child_range, available_cpus, split_range
from .record import RunRecord, file_entry
from .runner import exit_code_text, run_ranges
from .verify import check_processes, verify_image_table

WORK_DIR = "_cpb/ranges"
LOG_DIR = "_cpb/logs"


@dataclass
class JobSpec:
    """What to run. Paths are local; ranges are 1-based inclusive."""

    pipeline: Path
    input_dir: Path
    data_file: Optional[Path] = None
    workers: Optional[int] = None
    first: Optional[int] = None
    last: Optional[int] = None
    array_index: Optional[int] = None
    sets_per_job: Optional[int] = None
    expected_count: Optional[int] = None
    force_unsplittable: bool = False
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass
class Plan:
    """The decisions made before CellProfiler starts."""

    pipeline: Pipeline
    data: Optional[df.DataFile]
    data_file: Optional[Path]
    total: Optional[int]
    first: Optional[int]
    last: Optional[int]
    ranges: List[Optional[Range]]
    unsplittable: List[str]
    grouped: bool
    rows_skipped: int = 0  # LoadData "Process just a range of rows": image set n is CSV row n + this


def _loaddata_csv(pipeline: Pipeline, spec: JobSpec) -> Optional[Path]:
    """The CSV LoadData will read: the job's data file, else the one the module names."""
    modules = pipeline.enabled("LoadData")
    if not modules:
        if spec.data_file is not None:
            raise BadInput(f"data file {spec.data_file.name} was given but pipeline {pipeline.path.name} has no "
                           "LoadData module: add LoadData, or drop the data file (--data-file, data_file)")
        return None
    if spec.data_file is not None:
        return spec.data_file
    module = modules[0]
    location = (module.get("Input data file location") or "Default Input Folder|").split("|", 1)
    name = module.get("Name of the file") or ""
    if location[0] == "Elsewhere..." and len(location) > 1 and location[1]:
        named = Path(location[1]) / name
    else:
        sub = location[1] if location[0].endswith("sub-folder") and len(location) > 1 else ""
        named = spec.input_dir / sub / name
    if not named.is_file():  # the usual cause: the CSV lives elsewhere and no data file was given
        raise BadInput(f"pipeline {pipeline.path.name} has LoadData but no data file was given, and the CSV its "
                       f"LoadData names is not there ({named}): pass the CSV with --data-file "
                       "(data_file in a job message)")
    return named


def _select_range(spec: JobSpec, total: Optional[int]) -> Tuple[Optional[int], Optional[int]]:
    """This job's image sets: an array child's slice, an explicit range, or all."""
    first, last = spec.first, spec.last
    if spec.array_index is not None:
        if total is None:
            raise BadInput("an array child needs the image set count: give a data_file "
                           "(or CPB_IMAGE_SET_COUNT) when using image_sets_per_job")
        return array_child_range(spec.array_index, spec.sets_per_job or 0, total)
    if first is not None or last is not None:
        if total is None:
            raise BadInput("a --first/--last range needs countable image sets: give a data file")
        first = 1 if first is None else first
        last = total if last is None else last
        if not 1 <= first <= last <= total:
            raise BadInput(f"range {first}-{last} is outside the {total} image sets (1-{total})")
        return first, last
    return (1, total) if total is not None else (None, None)


def plan_job(spec: JobSpec) -> Plan:
    """Count image sets, pick this job's range and cut it for the processes."""
    pipeline = load_pipeline(spec.pipeline)
    export_module(pipeline)
    check_saved_images(pipeline)
    reasons = unsplittable_reasons(pipeline)
    if spec.force_unsplittable:
        reasons.append("CPB_UNSPLITTABLE=1")
    grouped = is_grouped(pipeline)
    skipped = 0
    data_path = _loaddata_csv(pipeline, spec)
    data = df.read_data_file(data_path) if data_path is not None else None
    if data is not None:
        skipped, total = df.row_range(data, dict(pipeline.enabled("LoadData")[0].settings))
        counted: Optional[int] = total
    else:
        counted = count_image_sets(pipeline, spec.input_dir)
        if counted is None and not list_files(spec.input_dir):  # else CellProfiler "wrote no Image.csv"
            raise BadInput(f"input folder {spec.input_dir} has no files: point the input at the images "
                           "(or give a LoadData data file)")
    total = counted
    if spec.expected_count is not None:
        if counted is not None and counted != spec.expected_count:
            raise BadInput(f"CPB_IMAGE_SET_COUNT is {spec.expected_count} but the "
                           f"{'data file' if data else 'input folder'} gives {counted} image sets: "
                           "resubmit so the count is taken again")
        total = spec.expected_count
    if total is not None and total < 1:
        raise BadInput("no image sets to process: the data file or input folder is empty")

    first, last = _select_range(spec, total)
    whole = total is not None and (first, last) == (1, total)
    if reasons and total is not None and not whole:
        raise BadInput(f"pipeline {pipeline.path.name} cannot be split into image-set ranges "
                       f"({'; '.join(reasons)}): submit it without image_sets_per_job")
    if total is None:
        ranges: List[Optional[Range]] = [None]  # count unknown: one process over everything
    elif reasons:
        ranges = [None]  # the whole run in one process, exactly as CellProfiler would run it
    else:
        workers = spec.workers if spec.workers else available_cpus(spec.env)
        ranges = list(split_range(first, last, workers))
    return Plan(pipeline=pipeline, data=data, data_file=data_path, total=total, first=first, last=last,
                ranges=ranges, unsplittable=reasons, grouped=grouped, rows_skipped=skipped)


def loaddata_base(plan: Plan, input_dir: Path, output_dir: Path) -> Path:
    """Folder LoadData resolves relative image locations against."""
    module = plan.pipeline.enabled("LoadData")[0]
    kind, _, rest = (module.get("Base image location") or "Default Input Folder|").partition("|")
    if kind == "Elsewhere..." and rest:
        return Path(rest)
    if kind.startswith("Default Output Folder"):
        return output_dir / rest if kind.endswith("sub-folder") else output_dir
    return input_dir / rest if kind.endswith("sub-folder") else input_dir


def check_images(plan: Plan, data_file: Path, input_dir: Path, output_dir: Path) -> None:
    """Every image of this job's rows exists before CellProfiler starts (a clear error
    beats a traceback halfway through the run)."""
    if plan.first is None:
        return
    data = df.read_data_file(data_file)
    base = loaddata_base(plan, input_dir, output_dir)
    missing = []
    found_in_base = False  # a CSV written on another machine: its folders are wrong, its file names right
    for number, column, location in df.image_locations(data, plan.first, plan.last, plan.rows_skipped):
        local = df.url_to_path(location)
        if local is None:
            continue  # remote URL: CellProfiler fetches it
        path = Path(local) if os.path.isabs(local) else base / local
        if not path.is_file():
            missing.append(f"image set {number - plan.rows_skipped} (data file line {number + 1}) {column}: {path}")
            found_in_base = found_in_base or (base / path.name).is_file()
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        fix = (f"; files of those names are in {base}: drop the data file's Image_PathName_ columns or make "
               "them relative to it" if found_in_base else "; check the data file's paths and the input folder")
        raise BadInput(f"image not found: {'; '.join(missing[:3])}{more}{fix}")


def run_plan(plan: Plan, input_dir: Path, output_dir: Path, record: RunRecord,
             env: Mapping[str, str], data_file: Optional[Path] = None) -> RunRecord:
    """Run CellProfiler for the plan, merge into output_dir, verify; fill `record`.

    `data_file` overrides the plan's (S3 mode passes its rewritten copy).
    Raises WorkerError on failure; the record then holds what is known."""
    data_file = data_file or plan.data_file
    record.first, record.last = plan.first, plan.last
    record.image_set_count = None if plan.first is None else plan.last - plan.first + 1
    record.pipeline_sha256 = plan.pipeline.sha256
    record.unsplittable_reasons = list(plan.unsplittable)
    record.processes = len(plan.ranges)
    record.split = len(plan.ranges) > 1
    if data_file is not None:
        check_images(plan, data_file, input_dir, output_dir)
    work, logs = output_dir / WORK_DIR, output_dir / LOG_DIR
    for stale in (work, logs):
        shutil.rmtree(stale, ignore_errors=True)
    if data_file is not None:
        data_file = without_bom(data_file, work)
    t0 = time.monotonic()
    results = run_ranges(plan.pipeline.path, input_dir, data_file, plan.ranges, work, logs, env)
    record.timings["cellprofiler"] = round(time.monotonic() - t0, 3)
    record.exit_codes = [exit_code_text(r.exit_code) for r in results]
    check_processes(results)
    t0 = time.monotonic()
    merged = merge([r for r in results], output_dir)
    record.cellprofiler_version = merged.cellprofiler_version
    record.timings["merge"] = round(time.monotonic() - t0, 3)
    t0 = time.monotonic()
    expected = None if plan.first is None else (plan.first, plan.last)
    first, last, count = verify_image_table(output_dir, expected, plan.grouped, plan.total, results)
    record.first, record.last, record.image_set_count = first, last, count
    if any(code != 0 for code in record.exit_codes):
        record.warnings.append(f"CellProfiler exit codes {record.exit_codes} but every image set "
                               f"{first}-{last} is in Image.csv; outputs verified")
    shutil.rmtree(work, ignore_errors=True)
    rels = sorted(set(merged.files) | {os.path.relpath(p, output_dir) for p in logs.glob("*.log")})
    record.files = [file_entry(output_dir, rel) for rel in rels]
    record.timings["verify"] = round(time.monotonic() - t0, 3)
    return record


def without_bom(data_file: Path, work: Path) -> Path:
    """The data file, or a copy without its UTF-8 byte-order mark. Excel's "CSV UTF-8" writes
    one; CellProfiler's LoadData reads it as part of the first column's name, so that channel
    vanishes ("The DNA image is missing from the pipeline"). The worker's own reader skips it."""
    raw = data_file.read_bytes()
    if not raw.startswith(codecs.BOM_UTF8):
        return data_file
    work.mkdir(parents=True, exist_ok=True)
    copy = work / data_file.name
    copy.write_bytes(raw[len(codecs.BOM_UTF8):])
    return copy


def fail(record: RunRecord, error: WorkerError) -> RunRecord:
    record.status = "failed"
    record.reason = error.reason
    return record
