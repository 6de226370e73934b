"""Download an output's current run and merge its array parts into one set of results.

Only the current run's parts count (cpb.runrecords: the lease's run, each part's record of that
run and index, ranges tiling the image sets exactly once), and only the files their succeeded
records list are downloaded, each checked against the size and SHA-256 the worker recorded: a
half-written prefix, a stale file or another run's part never ends up in a scientist's spreadsheet.

Merging the parts (each `part-NNNNN/` holds its own range's tables):
- tables with image numbers (`ImageNumber`, `ImageNumber_First/_Second`, and the relationship
  table's `First Image Number` / `Second Image Number`) are concatenated in range order with one
  header, numbers made global (a part numbered from 1 is shifted by its `first - 1`, decided once
  per part from its Image.csv so every table of the part moves together);
- Key/Value tables (Experiment.csv) must agree on every key except the run's timestamps and the
  pipeline text the parts' own folders appear in (the records' pipeline sha256 must agree instead);
- GenePattern `.gct` files are concatenated (one header, the row count summed);
- any other file that several parts wrote must be identical in all of them, else it is refused by
  name: one part's copy never silently stands for all.
"""
from __future__ import annotations

import csv
import filecmp
import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cpb.runrecords import PartState, RunState, run_state, short

csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # Experiment.csv holds the whole pipeline text

IMAGE_NUMBER_COLUMNS = ("ImageNumber", "ImageNumber_First", "ImageNumber_Second",
                        "First Image Number", "Second Image Number")
# Experiment.csv keys that differ between two correct parts of one run (when the records' pipeline sha256 agree).
# ImageSet_Zip_Dictionary: CellProfiler's OME-XML of the image sets of an Images/NamesAndTypes pipeline, naming
# every image by its absolute URL, i.e. by the scratch folder each part's worker staged the inputs in.
VOLATILE_KEYS = ("Run_Timestamp", "Modification_Timestamp", "Pipeline_Pipeline", "ImageSet_Zip_Dictionary")


class IncompleteRun(Exception):
    """The current run is not complete (or not the one asked for); nothing is merged."""


class ResultsError(Exception):
    """The results cannot be merged as they are (e.g. parts disagree)."""


@dataclass
class ResultsReport:
    """What `collect` wrote, for the CLI and tests."""

    dest: Path
    files: list[str] = field(default_factory=list)
    parts: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    run_id: Optional[str] = None
    resumed: int = 0
    ignored: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # the folder's earlier run's files this run made stale
    derived: list[str] = field(default_factory=list)  # Parquet/report/profiles made from this same run, kept


@dataclass
class _Copy:
    """One part's downloaded copy of a file."""

    path: Path
    part: PartState
    offset: Optional[int] = 0  # None: the part has no Image.csv, so each table decides

    @property
    def first(self) -> int:
        return self.part.range[0] or 1

    @property
    def label(self) -> str:
        return self.part.prefix or "the run"


def _download(s3, bucket: str, key: str, path: Path, size: Optional[int], sha256: Optional[str],
              progress: Optional[Callable[[int], None]]) -> None:
    """Fetch one object and verify it matches what the run record promised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    s3.download_file(bucket, key, str(path), Callback=progress)
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise ResultsError(f"s3://{bucket}/{key}: {actual} bytes, run record says {size}")
    if sha256:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            raise ResultsError(f"s3://{bucket}/{key}: checksum differs from its run record "
                               "(overwritten by a later attempt?): run `cpb status` and retry")


def _read_csv(path: Path, delimiter: str = ",") -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle, delimiter=delimiter))


def _number_columns(header: list[str]) -> list[int]:
    return [i for i, name in enumerate(header) if name in IMAGE_NUMBER_COLUMNS]


def _shift_for(rows: list[list[str]], column: int, first: int) -> int:
    """How much to add to a table's image numbers to make them global (tables of a part without an
    Image.csv): zero when already global (all >= first), else first - 1 (numbered from 1)."""
    numbers = [int(float(r[column])) for r in rows if len(r) > column and r[column].strip()]
    if not numbers or first <= 1 or min(numbers) >= first:
        return 0
    return first - 1


def part_offset(image_csv: Path, part: PartState) -> int:
    """A part's ImageNumber offset, from its Image.csv: 0 when numbered globally (from its `first`),
    `first - 1` when numbered from 1. Anything else is refused (the numbers match neither)."""
    rows = _read_csv(image_csv)
    if not rows or "ImageNumber" not in rows[0]:
        return 0
    column = rows[0].index("ImageNumber")
    numbers = [int(float(r[column])) for r in rows[1:] if len(r) > column and r[column].strip()]
    first = part.range[0] or 1
    if not numbers or min(numbers) == first:
        return 0
    if min(numbers) == 1:
        return first - 1
    raise ResultsError(f"{part.prefix}/Image.csv starts at ImageNumber {min(numbers)}, neither its first image "
                       f"set {first} nor 1: the part's tables cannot be numbered globally")


def merge_numbered(copies: list[_Copy], dest: Path, name: str) -> int:
    """Concatenate a table with image-number columns over the parts; returns the data rows written."""
    header: Optional[list[str]] = None
    count = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        for copy in copies:
            rows = _read_csv(copy.path)
            if not rows:
                continue
            if header is None:
                header = rows[0]
                writer.writerow(header)
            elif rows[0] != header:
                raise ResultsError(f"{name}: {copy.label} has different columns from the first part; "
                                   "the parts did not run the same pipeline")
            body = rows[1:]
            columns = _number_columns(header)
            offset = copy.offset if copy.offset is not None else 0
            if copy.offset is None and columns:  # no Image.csv in this part: decide from this table
                offset = _shift_for(body, columns[0], copy.first)
            if offset:
                for row in body:
                    for column in columns:
                        if len(row) > column and row[column].strip():
                            row[column] = str(int(float(row[column])) + offset)
            writer.writerows(body)
            count += len(body)
    return count


def merge_key_value(copies: list[_Copy], dest: Path, name: str) -> None:
    """Key/Value tables (Experiment.csv): every key but the volatile ones must agree; the first part's copy is kept."""
    first = dict(row[:2] for row in _read_csv(copies[0].path)[1:] if len(row) >= 2)
    for copy in copies[1:]:
        other = dict(row[:2] for row in _read_csv(copy.path)[1:] if len(row) >= 2)
        for key in sorted(set(first) | set(other)):
            if key in VOLATILE_KEYS:
                continue
            if first.get(key) != other.get(key):
                raise ResultsError(f"{name}: {key} is {_clip(first.get(key))} in {copies[0].label} but "
                                   f"{_clip(other.get(key))} in {copy.label}: the parts did not run alike, so "
                                   "one copy cannot stand for all; rerun the output (cpb submit again)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(copies[0].path, dest)


def _clip(value: Optional[str], limit: int = 40) -> str:
    if value is None:
        return "missing"
    return repr(value if len(value) <= limit else value[:limit - 3] + "...")


def merge_gct(copies: list[_Copy], dest: Path, name: str) -> int:
    """GenePattern GCT (`#1.2`, `<rows>\\t<measurements>`, `NAME\\tDescription\\t...`, one row per image set):
    one header, the rows of every part in range order, the row count summed. Refused by name when the
    parts' headers or measurement counts differ, or a part's row count disagrees with its rows."""
    header: Optional[list[str]] = None
    measures: Optional[str] = None
    body: list[list[str]] = []
    for copy in copies:
        rows = [r for r in _read_csv(copy.path, "\t") if r]
        if len(rows) < 3 or rows[0][:1] != ["#1.2"] or len(rows[1]) < 2:
            raise ResultsError(f"{name} in {copy.label} is not a GCT 1.2 file (#1.2, counts, header): "
                               "it cannot be merged with the other parts'")
        declared, this_measures = rows[1][0], rows[1][1]
        if str(len(rows) - 3) != declared.strip():
            raise ResultsError(f"{name} in {copy.label} says {declared} rows but holds {len(rows) - 3}: "
                               "the part's file is incomplete")
        if header is None:
            header, measures = rows[2], this_measures
        elif rows[2] != header or this_measures != measures:
            raise ResultsError(f"{name}: {copy.label} has different measurements from the first part; "
                               "the parts did not run the same pipeline")
        body.extend(rows[3:])
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, delimiter="\t")
        writer.writerow(["#1.2"])
        writer.writerow([len(body), measures])
        writer.writerow(header)
        writer.writerows(body)
    return len(body)


def merge_file(relative: str, copies: list[_Copy], dest: Path, report: ResultsReport) -> None:
    """Write one result file from its copies in the parts (see the module docstring for the rules)."""
    target = dest / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if len(copies) == 1:
        shutil.copyfile(copies[0].path, target)
        return
    lower = relative.lower()
    if lower.endswith(".csv"):
        header = (_read_csv(copies[0].path) or [[]])[0]
        if _number_columns(header):
            report.rows[relative] = merge_numbered(copies, target, relative)
            return
        if header == ["Key", "Value"]:
            merge_key_value(copies, target, relative)
            return
    if lower.endswith(".gct"):
        report.rows[relative] = merge_gct(copies, target, relative)
        return
    differing = [c.label for c in copies[1:] if not filecmp.cmp(copies[0].path, c.path, shallow=False)]
    if differing:
        raise ResultsError(f"{relative} differs between the parts ({copies[0].label} vs {', '.join(differing[:3])}"
                           f"{', ...' if len(differing) > 3 else ''}) and cannot be merged: one copy cannot stand "
                           "for all. Name such files per image set in the pipeline (e.g. SaveImages from the image "
                           f"file name), or download each part on its own (cpb results <output>/{copies[0].label})")
    shutil.copyfile(copies[0].path, target)


def check_same_pipeline(state: RunState) -> None:
    """Parts merged together must have run the same pipeline (and CellProfiler) by their records."""
    for key, what in (("pipeline_sha256", "pipeline"), ("cellprofiler_version", "CellProfiler version")):
        values = {p.prefix: p.record.get(key) for p in state.parts if p.record and p.record.get(key)}
        if len(set(values.values())) > 1:
            names = sorted(values, key=lambda n: (values[n], n))
            raise ResultsError(f"{state.output}: the parts ran different {what}s ({names[0]}: "
                               f"{str(values[names[0]])[:12]}, {names[-1]}: {str(values[names[-1]])[:12]}); "
                               "their tables cannot be merged: send the output again")


def collect(s3, bucket: str, output: str, dest: Path, expected: Optional[int] = None,
            progress: Optional[Callable[[int], None]] = None,
            on_total: Optional[Callable[[int], None]] = None, run: Optional[str] = None,
            state: Optional[RunState] = None) -> ResultsReport:
    """Download `output`'s current run into `dest`, merging array parts; refuse anything incomplete.

    `run`: accept only this run id (or a prefix of it). `on_total` is told the byte total first so a
    progress bar can be sized. A `dest` holding another output's results is refused before anything
    is downloaded (check_destination); after a newer run of the same output, the earlier run's files
    it did not replace and what was made from them are removed (remove_stale)."""
    held = held_results(dest)
    check_destination(held, output, dest)
    state = state or run_state(s3, bucket, output, expected)
    if run is not None and not (state.run_id or "").startswith(run):
        raise IncompleteRun(f"s3://{bucket}/{state.output}/: the current run is {short(state.run_id)}, "
                            f"not {run}; drop --run to take the current run")
    if not state.complete:
        problems = state.problems()
        raise IncompleteRun(f"s3://{bucket}/{state.output} is not complete"
                            + (f" (run {short(state.run_id)})" if state.run_id else "") + ": "
                            + "; ".join(problems[:5]) + ("" if len(problems) <= 5 else f" (+{len(problems) - 5} more)"))
    check_same_pipeline(state)
    files = [(p, f) for p in state.parts for f in p.record.get("files", [])]
    if on_total:
        on_total(sum(int(f.get("size") or 0) for _, f in files))
    dest.mkdir(parents=True, exist_ok=True)
    report = ResultsReport(dest=dest, parts=len(state.parts) if state.array else 0, run_id=state.run_id,
                           resumed=len(state.resumed), ignored=list(state.ignored))
    with tempfile.TemporaryDirectory(prefix="cpb-results-") as tmp:
        staged: dict[str, list[_Copy]] = {}
        for part, entry in files:
            relative = str(entry.get("key", "")).lstrip("/")
            if not relative or ".." in Path(relative).parts:
                raise ResultsError(f"run record of {part.prefix or state.output} lists a key "
                                   f"outside its prefix: {relative!r}")
            key = "/".join(x for x in (state.output, part.prefix, relative) if x)
            local = Path(tmp) / (part.prefix or "single") / relative
            _download(s3, bucket, key, local, entry.get("size"), entry.get("sha256"), progress)
            staged.setdefault(relative, []).append(_Copy(local, part))
        if state.array:
            offsets: dict[str, Optional[int]] = {}
            for copy in staged.get("Image.csv", []):
                offsets[copy.part.prefix] = part_offset(copy.path, copy.part)
            for copies in staged.values():
                for copy in copies:
                    copy.offset = offsets.get(copy.part.prefix)  # None: this part has no Image.csv
        merged = Path(tmp) / "merged"  # every file merged before any reaches dest: a refusal leaves dest as it was
        for relative, copies in sorted(staged.items()):
            merge_file(relative, sorted(copies, key=lambda c: c.first), merged, report)
            report.files.append(relative)
        # Until the last file is in place the folder says so (an interrupted move leaves this run's files
        # beside the earlier run's): the analysis refuses it, and the next `cpb results` still knows
        # both runs' files. The earlier run's leftovers and what was made from them go first.
        _mark_downloading(dest, state, report.files)
        report.removed = remove_stale(held, state, dest, report.files)
        for relative in report.files:
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(merged / relative), str(dest / relative))
    if held is not None and held.output == state.output.strip("/") and held.run_ids == ({state.run_id} - {None}):
        report.derived = sorted(derived_files(dest))
    _write_provenance(state, dest)
    return report


def files_under(folder: Path) -> set[str]:
    """Every file below `folder` as a relative POSIX path (empty when it does not exist yet)."""
    if not folder.is_dir():
        return set()
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


PROVENANCE = "_cpb/runs.json"


@dataclass
class HeldResults:
    """What a results folder holds already, by its `_cpb/runs.json` (an earlier `cpb results`)."""

    output: Optional[str]  # None: written before runs.json named its output
    run_ids: set[str]
    files: set[str]


def held_results(dest: Path) -> Optional[HeldResults]:
    """The results `dest` holds by its run records; None when it has none (or they are unreadable)."""
    try:
        records = json.loads((dest / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(records, list):
        return None
    records = [r for r in records if isinstance(r, dict)]
    outputs = {str(r["output"]).strip("/") for r in records if r.get("output")}
    return HeldResults(output=outputs.pop() if len(outputs) == 1 else None,
                       run_ids={str(r["run_id"]) for r in records if r.get("run_id")},
                       files={str(f.get("key", "")).lstrip("/") for r in records
                              for f in (r.get("files") or []) if isinstance(f, dict) and f.get("key")})


def check_destination(held: Optional[HeldResults], output: str, dest: Path) -> None:
    """Refuse, before anything is written, a folder holding another output's results: its Image.csv,
    Experiment.csv and run records would be replaced and the rest of its files would pass for this
    output's (`cpb report`/`cpb profile` would read a mix of the two)."""
    output = output.strip("/")
    if held is None or held.output is None or held.output == output:
        return
    suggestion = dest.parent / f"{dest.name}-{output.rsplit('/', 1)[-1]}"
    raise ResultsError(f"{dest} holds the results of {held.output} (by its {PROVENANCE}), not {output}: "
                       "downloading here would replace its Image.csv, Experiment.csv and run records and mix "
                       f"the two outputs' files. Download into another folder (e.g. --to {suggestion}), or "
                       f"remove {dest} first if you no longer need {held.output}'s results there")


def derived_files(dest: Path) -> set[str]:
    """Files `cpb results --parquet`, `cpb report` and `cpb profile` make in a results folder by default."""
    from cpb.analysis.parquet import PARQUET_NAME
    from cpb.analysis.profile import PROFILE_DIR, STEPS
    from cpb.analysis.report import HTML_NAME, PNG_NAME, REPORT_DIR
    names = {PARQUET_NAME, f"{REPORT_DIR}/{PNG_NAME}", f"{REPORT_DIR}/{HTML_NAME}"}
    profiles = dest / PROFILE_DIR
    if profiles.is_dir():
        names |= {f"{PROFILE_DIR}/{p.name}" for p in profiles.glob("*.parquet")
                  if any(p.name.endswith(f"_{step}.parquet") for step in STEPS)}
    return {n for n in names if (dest / n).is_file()}


def remove_stale(held: Optional[HeldResults], state: RunState, dest: Path, written: list[str]) -> list[str]:
    """After a newer run of the same output was downloaded over an earlier one: remove the earlier
    run's files this run did not replace, and the Parquet, report and profiles made from them (they
    would pass for this run's: `cpb profile` reads an existing single_cell.parquet as it is).
    Nothing is removed from a folder whose records do not name this output, or for the same run."""
    if held is None or held.output != state.output.strip("/") or not held.run_ids \
            or held.run_ids == {state.run_id}:
        return []
    stale = (held.files | derived_files(dest)) - set(written) - {PROVENANCE}
    removed = []
    for relative in sorted(stale):
        path = dest / relative
        if ".." not in Path(relative).parts and path.is_file():
            path.unlink()
            removed.append(relative)
    return removed


#: The `status` of the record `_cpb/runs.json` holds while `cpb results` moves files into the folder.
DOWNLOADING = "downloading"


def _mark_downloading(dest: Path, state: RunState, files: list[str]) -> None:
    """Keep the folder's earlier run records and add one saying this run is being downloaded."""
    target = dest / PROVENANCE
    try:
        earlier = json.loads(target.read_text())
    except (OSError, ValueError):
        earlier = []
    earlier = [r for r in earlier if isinstance(r, dict)] if isinstance(earlier, list) else []
    marker = {"part": None, "status": DOWNLOADING, "run_id": state.run_id, "output": state.output.strip("/"),
              "files": [{"key": f} for f in files],
              "reason": "cpb results was interrupted while moving this run's files here: run it again"}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(earlier + [marker], indent=2, sort_keys=True))


def _write_provenance(state: RunState, dest: Path) -> None:
    """Keep the run records beside the results (what ran, which version, which run, of which output)."""
    target = dest / PROVENANCE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps([{"part": p.prefix, **(p.record or {}), "output": state.output.strip("/")}
                                  for p in state.parts], indent=2, sort_keys=True))
