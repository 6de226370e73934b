"""Plan and run one job on local folders: the part shared by AWS and local mode.

plan_job() reads the pipeline and data file and decides which image sets this job runs
and how they are split; run_plan() runs CellProfiler over the ranges, merges and verifies
the outputs and fills in the run record. Getting files from S3/FSx and uploading results
is aws.py's job; writing the record locally is local.py's.

Who counts the image sets:
* a LoadData CSV: the worker, from the CSV's rows (honouring LoadData's row range). Unless
  the pipeline uses "Process just a range of rows", CellProfiler is given a CSV of exactly
  this job's rows (an array child streams the data file and keeps only its own), and runs
  `-f/-l` ranges of it; image numbers are mapped back to the run's global ones in the merge;
* Images/Metadata/NamesAndTypes (no LoadData): CellProfiler itself. Each process runs under
  cpsets.py, which lets CellProfiler make its image-set list and keeps one part of it, so the
  job is split over all its processes without the worker guessing at file rules;
* a `cellprofiler` that is not a Python script cannot be asked: one process runs every image
  set, as CellProfiler would (the record says why).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from . import datafile as df
from . import fingerprint
from .errors import BadInput, PipelineFailed, WorkerError
from .filerules import count_image_sets_in_listing, list_files
from .merge import merge
from .pipeline import (Pipeline, check_saved_images, export_module, is_grouped, load_pipeline, table_objects,
                       unsplittable_reasons)
from .ranges import Range, array_child_range, available_cpus, process_count, split_range
from .record import RunRecord, file_entry
from .runner import Proc, RangeResult, cellprofiler_python, exit_code_text, run_processes
from .verify import (check_exit_codes, check_group_length, check_processes, range_tables, tables_lacking,
                     verify_tables)

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
    #: (path relative to the input folder, size) of every input file, when the caller listed
    #: them elsewhere (S3); None: the input folder is listed here.
    input_files: Optional[Sequence[Tuple[str, int]]] = None


@dataclass
class Plan:
    """The decisions made before CellProfiler starts."""

    pipeline: Pipeline
    data: Optional[df.DataFile]
    data_file: Optional[Path]
    total: Optional[int]  # image sets of the whole run (None: CellProfiler will say)
    first: Optional[int]  # this job's global range (None: every image set, counted by CellProfiler)
    last: Optional[int]
    procs: List[Proc]
    unsplittable: List[str]
    grouped: bool
    rows_skipped: int = 0  # LoadData "Process just a range of rows": image set n is CSV row n + this
    sliced: bool = False  # CellProfiler gets a CSV of only rows first..last
    counting: str = "data file"  # who counts: "data file", "CellProfiler", or why nobody can
    data_sha256: Optional[str] = None  # fingerprint of this job's rows / input listing
    tables: Dict[str, List[str]] = field(default_factory=dict)  # table file -> objects (pipeline-named)
    warnings: List[str] = field(default_factory=list)
    python: Optional[str] = None  # CellProfiler's interpreter for CellProfiler-counted parts

    @property
    def ranges(self) -> List[Optional[Range]]:
        """Global -f/-l ranges of the processes (None: CellProfiler's whole list or its own part)."""
        return [None if p.first is None else (p.first + p.offset, p.last + p.offset) for p in self.procs]


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


def _processes(spec: JobSpec, plan_warnings: List[str]) -> int:
    cpus = spec.workers if spec.workers else available_cpus(spec.env)
    count, warning = process_count(spec.env, cpus)
    if warning:
        plan_warnings.append(warning)
    return count


def _plan_loaddata(spec: JobSpec, pipeline: Pipeline, data_path: Path, reasons: List[str]) -> Plan:
    settings = dict(pipeline.enabled("LoadData")[0].settings)
    row_setting = settings.get("Process just a range of rows?") == "Yes"
    expected = spec.expected_count
    if spec.array_index is not None and not row_setting and expected is not None:
        # Stream the data file; keep only this child's rows (memory flat in plate size). Without
        # CPB_IMAGE_SET_COUNT (set by the Lambda on array jobs) the whole file is read below.
        first, last = array_child_range(spec.array_index, spec.sets_per_job or 0, expected)
        is_last_child = last == expected
        data = df.read_rows(data_path, first, last, count_all=is_last_child)
        have = len(data.rows)
        if have < last - first + 1 or (is_last_child and data.total != expected):
            found = data.total if data.total is not None else first - 1 + have
            raise BadInput(f"CPB_IMAGE_SET_COUNT is {expected} but the data file gives {found} image sets: "
                           "resubmit so the count is taken again")
        skipped, total = 0, expected
    else:
        data = df.read_data_file(data_path)
        skipped, total = df.row_range(data, settings)
        if expected is not None and total != expected:
            raise BadInput(f"CPB_IMAGE_SET_COUNT is {expected} but the data file gives {total} image sets: "
                           "resubmit so the count is taken again")
        if total < 1:
            raise BadInput("no image sets to process: the data file or input folder is empty")
        first, last = _select_range(spec, total)
    assert first is not None and last is not None
    if reasons and (first, last) != (1, total):
        raise BadInput(f"pipeline {pipeline.path.name} cannot be split into image-set ranges "
                       f"({'; '.join(reasons)}): submit it without image_sets_per_job")
    sliced = not row_setting
    warnings: List[str] = []
    size = last - first + 1
    if sliced:  # CellProfiler sees image sets 1..size; +offset makes them global
        offset, cp_first, cp_total = first - 1, 1, size
    else:  # CellProfiler applies the row range to the whole CSV and numbers globally
        offset, cp_first, cp_total = 0, first, total
    if reasons:  # the whole run (checked above), exactly as one CellProfiler process would run it
        procs = [Proc(offset=offset, cp_total=cp_total)]
    else:
        workers = _processes(spec, warnings)
        procs = [Proc(first=a, last=b, offset=offset, cp_total=cp_total)
                 for a, b in split_range(cp_first, cp_first + size - 1, workers)]
    rows = (data.row(n) for n in range(first + skipped, last + skipped + 1))
    return Plan(pipeline=pipeline, data=data, data_file=data_path, total=total, first=first, last=last,
                procs=procs, unsplittable=reasons, grouped=is_grouped(pipeline), rows_skipped=skipped,
                sliced=sliced, counting="data file", data_sha256=fingerprint.data_rows_sha256(data.header, rows),
                warnings=warnings)


def _input_listing(spec: JobSpec) -> List[Tuple[str, int]]:
    if spec.input_files is not None:
        return list(spec.input_files)
    out = []
    for directory, name in list_files(spec.input_dir):
        path = spec.input_dir / directory / name
        try:
            out.append((os.path.join(directory, name).replace(os.sep, "/"), path.stat().st_size))
        except OSError:
            continue
    return out


def _plan_cellprofiler_counts(spec: JobSpec, pipeline: Pipeline, reasons: List[str]) -> Plan:
    listing = _input_listing(spec)
    if not listing:  # else CellProfiler "wrote no Image.csv"
        raise BadInput(f"input folder {spec.input_dir} has no files: point the input at the images "
                       "(or give a LoadData data file)")
    expected = spec.expected_count
    # The job's image sets within CellProfiler's list: (first, last), last None = to its end.
    window: Optional[Tuple[int, Optional[int]]] = None
    if spec.array_index is not None or (expected is not None and (spec.first or spec.last)):
        window = _select_range(spec, expected)
    elif spec.first is not None or spec.last is not None:
        window = (spec.first or 1, spec.last)  # CellProfiler's count checks it
    whole = window is None or (expected is not None and window == (1, expected))
    if reasons and not whole:
        raise BadInput(f"pipeline {pipeline.path.name} cannot be split into image-set ranges "
                       f"({'; '.join(reasons)}): submit it without image_sets_per_job")
    python, why = cellprofiler_python(spec.env)
    warnings: List[str] = []
    first, last = window if window is not None and window[1] is not None else (None, None)
    plan = Plan(pipeline=pipeline, data=None, data_file=None, total=expected, first=first, last=last, procs=[],
                unsplittable=reasons, grouped=is_grouped(pipeline),
                data_sha256=fingerprint.input_listing_sha256(listing), warnings=warnings, python=python)
    if python is None:
        plan.counting = f"nobody: CellProfiler cannot be asked to count ({why})"
        if window is not None and window[1] is None:
            raise BadInput(f"a --first/--last range without a data file needs CellProfiler to count the image "
                           f"sets, and it cannot be asked ({why}): give a data file")
        if window is not None:  # the Lambda's count gives the range; Group_Length checks it afterwards
            plan.procs = [Proc(first=window[0], last=window[1], cp_total=expected)]
        else:
            plan.procs = [Proc(cp_total=expected)]
        plan.warnings.append(f"one CellProfiler process over every image set: {plan.counting}")
        return plan
    plan.counting = "CellProfiler"
    parts = 1 if reasons else _processes(spec, warnings)
    if window is not None and window[1] is not None:
        parts = min(parts, window[1] - window[0] + 1)
    elif parts > 1:
        # Only a hint, so that a 1-set folder does not start idle processes: the file-rule count
        # decides how many processes start, CellProfiler's own count what each of them runs.
        hint = count_image_sets_in_listing(pipeline, [path for path, _ in listing])
        if hint is not None:
            parts = max(1, min(parts, hint - (window[0] - 1 if window else 0)))
    plan.procs = [Proc(part=i, parts=parts, window=window, expect=expected) for i in range(parts)]
    return plan


def plan_job(spec: JobSpec) -> Plan:
    """Count image sets (or arrange for CellProfiler to), pick this job's range and cut it."""
    pipeline = load_pipeline(spec.pipeline)
    export_module(pipeline)
    check_saved_images(pipeline)
    reasons = unsplittable_reasons(pipeline)
    if spec.force_unsplittable:
        reasons.append("CPB_UNSPLITTABLE=1")
    data_path = _loaddata_csv(pipeline, spec)
    if data_path is not None:
        plan = _plan_loaddata(spec, pipeline, data_path, reasons)
    else:
        plan = _plan_cellprofiler_counts(spec, pipeline, reasons)
    plan.tables = table_objects(pipeline)
    return plan


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
    beats a traceback halfway through the run). The rows are the plan's, or `data_file`'s when
    that is another CSV."""
    if plan.first is None or plan.data is None:
        return
    data = plan.data
    if data_file is not None and Path(data_file) != plan.data_file:
        data = df.read_rows(Path(data_file), plan.first + plan.rows_skipped, plan.last + plan.rows_skipped,
                            count_all=False)
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


def cellprofiler_data_file(plan: Plan, work: Path) -> Optional[Path]:
    """The LoadData CSV CellProfiler reads in a local run: this job's rows only (no byte-order
    mark) when sliced, else every row as the worker read them (no byte-order mark, no blank lines:
    LoadData's own row range counts a blank line as a row, so the worker's image set n would not be
    CellProfiler's), as S3 mode writes it."""
    if plan.data is None or plan.data_file is None:
        return None
    if plan.sliced:
        return df.rewrite(plan.data, None, work / "data" / "load_data.csv", plan.first, plan.last)
    return df.rewrite(plan.data, None, work / "data" / "load_data.csv")


def run_plan(plan: Plan, input_dir: Path, output_dir: Path, record: RunRecord,
             env: Mapping[str, str], data_file: Optional[Path] = None) -> RunRecord:
    """Run CellProfiler for the plan, merge into output_dir, verify; fill `record`.

    `data_file` is the CSV CellProfiler reads (S3 mode passes its rewritten copy of this
    job's rows); by default the local one of `cellprofiler_data_file`.
    Raises WorkerError on failure; the record then holds what is known."""
    record.first, record.last = plan.first, plan.last
    record.image_set_count = None if plan.first is None else plan.last - plan.first + 1
    record.pipeline_sha256 = plan.pipeline.sha256
    record.unsplittable_reasons = list(plan.unsplittable)
    record.processes = len(plan.procs)
    record.split = len(plan.procs) > 1
    record.warnings.extend(w for w in plan.warnings if w not in record.warnings)
    work, logs = output_dir / WORK_DIR, output_dir / LOG_DIR
    for stale in (work, logs):
        shutil.rmtree(stale, ignore_errors=True)
    if plan.data is not None:
        check_images(plan, plan.data_file, input_dir, output_dir)
        if data_file is None:
            data_file = cellprofiler_data_file(plan, work)
    t0 = time.monotonic()
    results = run_processes(plan.pipeline.path, input_dir, data_file, plan.procs, work, logs, env, plan.python)
    if plan.counting == "CellProfiler" and all(r.report and r.report.get("status") == "unsupported"
                                               for r in results):
        plan.counting = f"nobody: this CellProfiler cannot split by its own count ({results[0].report['reason']})"
        record.warnings.append(f"this CellProfiler cannot split by its own count ({results[0].report['reason']}); "
                               "one process ran every image set")
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
        plan.procs = [Proc(cp_total=plan.total)] if plan.first is None else [
            Proc(first=plan.first, last=plan.last, cp_total=plan.total)]
        record.processes, record.split = 1, False
        results = run_processes(plan.pipeline.path, input_dir, data_file, plan.procs, work, logs, env)
    record.timings["cellprofiler"] = round(time.monotonic() - t0, 3)
    record.exit_codes = [exit_code_text(r.exit_code) for r in results]
    check_processes(results)
    if plan.counting == "CellProfiler":
        _check_reports(plan, results, record)
    check_group_length(results, plan.grouped)
    tables_before = {id(r): range_tables(r) for r in results}
    t0 = time.monotonic()
    merged = merge(results, output_dir, total=plan.total)
    record.cellprofiler_version = merged.cellprofiler_version
    record.timings["merge"] = round(time.monotonic() - t0, 3)
    t0 = time.monotonic()
    expected = None if plan.first is None else (plan.first, plan.last)
    first, last, count, rows = verify_tables(output_dir, merged, expected, results, plan.tables)
    record.first, record.last, record.image_set_count = first, last, count
    record.tables = rows
    exports_all = export_module(plan.pipeline).get("Export all measurement types?") != "No"
    lacking = tables_lacking(output_dir, merged, exports_all, plan.tables)
    warning = check_exit_codes(results, tables_before, lacking)  # after the tables: their reasons say more
    if warning:
        record.warnings.append(warning)
    shutil.rmtree(work, ignore_errors=True)
    rels = sorted(set(merged.files) | {os.path.relpath(p, output_dir) for p in logs.glob("*.log")})
    record.files = [file_entry(output_dir, rel) for rel in rels]
    record.timings["verify"] = round(time.monotonic() - t0, 3)
    return record


def _check_reports(plan: Plan, results: List[RangeResult], record: RunRecord) -> None:
    """What the CellProfiler-counted parts said: one count, their parts tile the job's range."""
    for result in results:
        report = result.report or {}
        status = report.get("status")
        if status == "refused":
            raise BadInput(report.get("reason") or "CellProfiler refused the range")
        if status == "no-image-sets":
            raise PipelineFailed("CellProfiler found no image sets in the input folder: check the pipeline's "
                                 "Images/Metadata/NamesAndTypes rules against the file names"
                                 + (f" ({result.error_line()})" if result.error_line() else ""))
        if status not in ("running", "idle"):
            line = result.error_line()
            raise PipelineFailed(f"CellProfiler stopped before making its image-set list (exit "
                                 f"{exit_code_text(result.exit_code)}" + (f": {line}" if line else "")
                                 + f"); see _cpb/logs/{result.log.name}")
    counts = {int(r.report["count"]) for r in results}
    if len(counts) != 1:
        raise PipelineFailed(f"CellProfiler's processes made different image-set lists ({sorted(counts)} sets) "
                             "from the same input folder: set CPB_UNSPLITTABLE=1")
    count = counts.pop()
    if plan.total is None:
        plan.total = count
    window = plan.procs[0].window if plan.procs else None
    first = plan.first if plan.first is not None else (window[0] if window else 1)
    last = plan.last if plan.last is not None else (window[1] if window and window[1] is not None else count)
    covered = sorted((r.first, r.last) for r in results if not r.idle)
    expect_next = first
    for a, b in covered:
        if a != expect_next:
            break
        expect_next = b + 1
    if expect_next != last + 1:
        raise PipelineFailed(f"CellProfiler's processes ran {covered}, which do not tile image sets {first}-{last}")
    plan.first, plan.last = first, last
    record.first, record.last, record.image_set_count = first, last, last - first + 1
    idle = sum(1 for r in results if r.idle)
    record.processes = len(results) - idle
    record.split = record.processes > 1
    if idle:
        record.warnings.append(f"{idle} of {len(results)} CellProfiler processes had no image set to run "
                               f"(CellProfiler made {count})")


def fail(record: RunRecord, error: WorkerError) -> RunRecord:
    record.status = "failed"
    record.reason = error.reason
    return record
