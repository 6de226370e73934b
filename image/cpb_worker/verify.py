"""Decide from the outputs, not the exit codes, whether a run succeeded.

CellProfiler can exit 0 having processed nothing (no image sets matched, an
export module disabled) and exit 1 after finishing every image set (an error
while shutting down), or exit 1 halfway through writing its tables (a full
disk). So, on the merged tables:

* every per-image table (ImageNumber, no ObjectNumber: Image.csv) holds each of
  the job's image sets exactly once, and no image set carries a module error;
* every per-object table holds, for each image set, exactly `Count_<Object>` rows
  of Image.csv (a combined file: the largest count of its objects, as
  ExportToSpreadsheet writes it);
* relationship tables and `.gct` files name only the job's image sets;
* when the pipeline does not group, CellProfiler's own Group_Length equals the
  number of image sets it was given (a miscount would otherwise skip sets).

A nonzero exit is forgiven (a warning) only when, in addition, every range wrote
the same set of tables: `check_exit_codes`.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import Killed, PipelineFailed
from .merge import TABLE_SUFFIXES, MergeResult, Table
from .runner import RangeResult, exit_code_text


def _compress(numbers: Sequence[int]) -> str:
    """'3-5, 9' for [3, 4, 5, 9]: short enough for a one-line reason."""
    parts: List[Tuple[int, int]] = []
    for n in sorted(numbers):
        if parts and parts[-1][1] == n - 1:
            parts[-1] = (parts[-1][0], n)
        else:
            parts.append((n, n))
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts[:8])
    return text + (", ..." if len(parts) > 8 else "")


def check_processes(results: List[RangeResult]) -> None:
    """A process killed by a signal never counts as done, whatever it wrote."""
    for result in results:
        code = exit_code_text(result.exit_code)
        if code == 137 or result.exit_code == -9:
            raise Killed(f"CellProfiler for {result.describe()} was killed (SIGKILL, "
                         "usually out of memory): raise job_memory or lower image_sets_per_job")
        if result.exit_code < 0:
            raise PipelineFailed(f"CellProfiler for {result.describe()} died from signal {-result.exit_code}")
        if result.log_mentions("Failed to load pipeline"):
            # CellProfiler drops every module from the first one it cannot load and runs the rest.
            line = result.error_line()
            raise PipelineFailed("CellProfiler could not load the whole pipeline"
                                 + (f": {line}" if line else "") + " (a module missing from this CellProfiler "
                                 "version or a plugin not installed)")


def _hint(results: List[RangeResult]) -> str:
    failed = [r for r in results if r.exit_code != 0] or results
    if not failed:
        return ""
    line = failed[0].error_line()
    return f"; CellProfiler exited {exit_code_text(failed[0].exit_code)}" + (f": {line}" if line else "")


def check_group_length(results: List[RangeResult], grouped: bool) -> None:
    """In each range's own Image.csv, CellProfiler's Group_Length must be the number of image
    sets it was given (`cp_total`): else it made another list than the worker planned."""
    if grouped:
        return
    for result in results:
        image_csv = result.out_dir / "Image.csv"
        if result.idle or result.cp_total is None or not image_csv.exists():
            continue
        with open(image_csv, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if "Group_Length" not in (reader.fieldnames or []):
                continue
            seen = {int(float(row["Group_Length"])) for row in reader if row.get("Group_Length")}
        if seen and seen != {result.cp_total}:
            raise PipelineFailed(f"CellProfiler found {', '.join(map(str, sorted(seen)))} image sets but the "
                                 f"worker planned {result.cp_total}: set CPB_UNSPLITTABLE=1 or supply a data_file")


def _first_fields(path: Path, header_rows: int, columns: Sequence[int]) -> List[List[str]]:
    """The given columns of every data row (csv-parsed; a table row per image or object)."""
    out = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        for _ in range(header_rows):
            next(reader, None)
        for row in reader:
            if not row:
                continue
            out.append([row[i] if i < len(row) else "" for i in columns])
    return out


def _number(text: str, rel: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        raise PipelineFailed(f"{rel} has a non-numeric image number {text!r}") from None


def verify_tables(output_dir: Path, merged: MergeResult, expected: Optional[Tuple[int, int]],
                  results: List[RangeResult], table_objects: Mapping[str, List[str]]) -> Tuple[int, int, int, Dict[str, int]]:
    """Check every merged table against the job's image sets; return (first, last, count, rows per table).

    `table_objects` maps a table's file name to the objects it holds when the pipeline names
    files itself (ExportToSpreadsheet settings); otherwise `<Object>.csv` holds `<Object>`."""
    hint = _hint(results)
    image_csv = output_dir / "Image.csv"
    if not image_csv.exists():
        failed = [r for r in results if r.exit_code != 0] or results
        raise PipelineFailed(f"CellProfiler wrote no Image.csv{hint}; see _cpb/logs/{failed[0].log.name}")
    with open(image_csv, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        rows = list(reader)
    numbers = [_number(row["ImageNumber"], "Image.csv") for row in rows]
    if len(set(numbers)) != len(numbers):
        dupes = sorted({n for n in numbers if numbers.count(n) > 1})
        raise PipelineFailed(f"Image.csv lists image sets {_compress(dupes)} more than once")
    if expected is None:
        if not numbers:
            raise PipelineFailed(f"Image.csv has no rows: CellProfiler processed no image sets{hint}")
        expected = (1, max(numbers))
    want = set(range(expected[0], expected[1] + 1))
    missing = sorted(want - set(numbers))
    extra = sorted(set(numbers) - want)
    if missing:
        raise PipelineFailed(f"image sets {_compress(missing)} of {expected[0]}-{expected[1]} are missing "
                             f"from Image.csv{hint}")
    if extra:
        raise PipelineFailed(f"Image.csv has image sets {_compress(extra)} outside the range "
                             f"{expected[0]}-{expected[1]}")
    errors = [c for c in columns if c.startswith("ModuleError_")]
    for row in rows:
        bad = [c for c in errors if row.get(c) not in ("", "0", "0.0", None)]
        if bad:
            raise PipelineFailed(f"image set {row['ImageNumber']}: module error in {bad[0][len('ModuleError_'):]}")
    counts = {name[len("Count_"):]: {n: _count(row[name]) for n, row in zip(numbers, rows)}
              for name in columns if name.startswith("Count_")}
    table_rows: Dict[str, int] = {"Image.csv": len(rows)}
    for rel, table in sorted(merged.tables.items()):
        if rel == "Image.csv" or table.kind in ("key-value", "other"):
            continue
        table_rows[rel] = _verify_table(output_dir / rel, rel, table, want, counts, table_objects, hint)
    return expected[0], expected[1], len(numbers), table_rows


def _count(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        return 0
    return 0 if math.isnan(value) else int(value)


def _verify_table(path: Path, rel: str, table: Table, want: set, counts: Dict[str, Dict[int, int]],
                  table_objects: Mapping[str, List[str]], hint: str) -> int:
    if table.kind == "gct":
        with open(path, newline="", encoding="utf-8") as handle:
            data = [line for line in list(csv.reader(handle, delimiter="\t"))[3:] if line]
        if len(data) != len(want):
            raise PipelineFailed(f"{rel} has {len(data)} rows for {len(want)} image sets{hint}")
        return len(data)
    if table.kind == "relationships":
        cols = [table.header.index(c) for c in ("First Image Number", "Second Image Number")]
        fields = _first_fields(path, 1, cols)
        outside = sorted({_number(v, rel) for row in fields for v in row if v} - want)
        if outside:
            raise PipelineFailed(f"{rel} names image sets {_compress(outside)} outside this job's")
        return len(fields)
    header_rows = 2 if table.object_names else 1
    image_col = table.header.index("ImageNumber")
    per_object = "ObjectNumber" in table.header
    fields = _first_fields(path, header_rows, [image_col])
    seen: Dict[int, int] = {}
    for (value,) in fields:
        number = _number(value, rel)
        seen[number] = seen.get(number, 0) + 1
    outside = sorted(set(seen) - want)
    if outside:
        raise PipelineFailed(f"{rel} has rows for image sets {_compress(outside)} outside this job's")
    if not per_object:  # another per-image table
        missing = sorted(want - set(seen))
        twice = sorted(n for n, k in seen.items() if k > 1)
        if missing or twice:
            what = (f"lacks image sets {_compress(missing)}" if missing
                    else f"lists image sets {_compress(twice)} more than once")
            raise PipelineFailed(f"{rel} {what}{hint}")
        return len(fields)
    objects = table.object_names or table_objects.get(rel) or [Path(rel).stem]
    unknown = [name for name in objects if name not in counts]
    if unknown:
        raise PipelineFailed(f"cannot check {rel}: Image.csv has no Count_{unknown[0]} column to say how many "
                             "rows each image set needs; in ExportToSpreadsheet use the object name for the "
                             "file name (and export Image measurements)")
    wrong = []
    for number in sorted(want):
        need = max(counts[name].get(number, 0) for name in objects)
        if seen.get(number, 0) != need:
            wrong.append((number, seen.get(number, 0), need))
    if wrong:
        number, got, need = wrong[0]
        raise PipelineFailed(f"{rel} is incomplete: image set {number} has {got} rows but Image.csv counts "
                             f"{need} {objects[0]}" + (f" (and {len(wrong) - 1} more image sets differ)"
                                                       if len(wrong) > 1 else "") + hint)
    return len(fields)


def range_tables(result: RangeResult) -> List[str]:
    """The tables (CSV, GCT) one range wrote, relative to its folder."""
    return sorted(str(p.relative_to(result.out_dir)) for p in result.out_dir.rglob("*")
                  if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)


def tables_lacking(output_dir: Path, merged: MergeResult, exports_all: bool,
                   table_objects: Mapping[str, List[str]]) -> List[str]:
    """The object tables the pipeline writes that are not among the merged tables: with "Export all
    measurement types", one `<Object>.csv` per `Count_<Object>` column of Image.csv (CellProfiler
    writes a table for every object it measured); otherwise each object table ExportToSpreadsheet
    names; one without an image-numbered header (an empty file) counts as not written. Only a
    CellProfiler that exited nonzero can have stopped before writing one."""
    if exports_all:
        with open(output_dir / "Image.csv", newline="", encoding="utf-8") as handle:
            columns = next(csv.reader(handle), [])
        wanted = [f"{c[len('Count_'):]}.csv" for c in columns if c.startswith("Count_")]
    else:
        wanted = list(table_objects)
    return [name for name in wanted if name not in merged.tables or merged.tables[name].kind == "other"]


def check_exit_codes(results: List[RangeResult], tables_before_merge: Mapping[int, List[str]],
                     lacking: Sequence[str] = ()) -> Optional[str]:
    """None when every process exited 0; a warning when some did not but every range wrote the
    same tables, none of the tables the pipeline writes is lacking (`tables_lacking`), and the
    tables were verified complete; else the job fails naming what the failing range did not write.
    (One range, or every range stopped alike, proves nothing by agreeing with itself.)"""
    failed = [r for r in results if r.exit_code != 0]
    if not failed:
        return None
    if lacking:
        raise PipelineFailed(f"CellProfiler for {failed[0].describe()} exited {exit_code_text(failed[0].exit_code)} "
                             f"and wrote no {', '.join(lacking[:3])}{', ...' if len(lacking) > 3 else ''}, which "
                             "the pipeline's ExportToSpreadsheet writes" + _hint(failed[:1]))
    active = [r for r in results if not r.idle]
    reference = max(active, key=lambda r: (r.exit_code == 0, len(tables_before_merge[id(r)])))
    want = set(tables_before_merge[id(reference)])
    for result in active:
        have = set(tables_before_merge[id(result)])
        if have != want:
            lacking = sorted(want - have) or sorted(have - want)
            raise PipelineFailed(f"CellProfiler for {result.describe()} exited {exit_code_text(result.exit_code)} "
                                 f"and its tables differ from {reference.describe()}'s "
                                 f"({', '.join(lacking[:3])}){_hint([result])}")
    return (f"CellProfiler exit codes {[exit_code_text(r.exit_code) for r in results]} but every range wrote "
            "the same tables and every table is complete; outputs verified")
