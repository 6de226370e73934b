"""Merge per-range CellProfiler outputs into the one set a single process would write.

* Tables with an ImageNumber column (Image.csv, one per object, also the two-row headers of
  combined object files) are concatenated in range order after checking that every range
  wrote the same header. Image numbers become the run's global ones: CellProfiler 4.2.8 and
  5 number a `-f/-l` range globally already; a range numbered from 1, or a slice of the data
  file (an array child gives CellProfiler only its rows), is shifted by its offset. In the
  per-image table of a slice, `Group_Index` and `Group_Length` are made what one process over
  the whole data file writes.
* Relationship tables (`Object relationships.csv`: `First Image Number`, `Second Image
  Number`) are renumbered the same way and concatenated.
* GenePattern `.gct` files: one header, the ranges' rows concatenated, the row count fixed.
* Key/Value tables (Experiment.csv) must agree between ranges except for their timestamps;
  the first range's is kept.
* Any other file written by more than one range (a saved image with a fixed name, a table
  without image numbers) must be byte-identical in every range, else the job fails naming it:
  one copy would silently stand for all.

Which tables exist and how many rows each got is returned for verify.py and the record.
"""
from __future__ import annotations

import csv
import filecmp
import io
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .errors import PipelineFailed
from .runner import RangeResult

IMAGE_NUMBER_COLUMNS = ("ImageNumber", "ImageNumber_First", "ImageNumber_Second")
RELATIONSHIP_NUMBER_COLUMNS = ("First Image Number", "Second Image Number")
VOLATILE_EXPERIMENT_KEYS = ("Run_Timestamp", "Modification_Timestamp")
TABLE_SUFFIXES = (".csv", ".gct")

csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # Experiment.csv holds the whole pipeline text


@dataclass
class Table:
    """One merged table: its kind and (for verification) its header."""

    kind: str  # "image-numbered", "relationships", "key-value", "gct", "other"
    header: List[str]
    object_names: List[str] = field(default_factory=list)  # first header row of a combined object file


@dataclass
class MergeResult:
    files: List[str] = field(default_factory=list)  # relative paths written to the output folder
    cellprofiler_version: str = "unknown"
    renumbered: bool = False
    tables: Dict[str, Table] = field(default_factory=dict)  # relative path -> table


def _read_header(path: Path) -> List[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle), [])


def _read_headers(path: Path, rows: int = 2) -> List[List[str]]:
    out = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        for _ in range(rows):
            row = next(reader, None)
            if row is None:
                break
            out.append(row)
    return out


def _relative_files(root: Path) -> List[str]:
    out = []
    for directory, _, files in os.walk(root):
        for name in files:
            out.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(out)


def _image_numbers(image_csv: Path) -> List[int]:
    with open(image_csv, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if "ImageNumber" not in (reader.fieldnames or []):
            raise PipelineFailed(f"{image_csv.name} has no ImageNumber column: keep ExportToSpreadsheet's defaults")
        return [int(float(row["ImageNumber"])) for row in reader]


def image_number_offset(result: RangeResult) -> int:
    """What to add to this range's ImageNumbers to make them the run's global numbers:
    the slice offset, plus first-1 when CellProfiler numbered the range from 1 (checked
    on the range's own Image.csv so either numbering is handled)."""
    if result.first is None:
        return result.offset
    numbers = _image_numbers(result.out_dir / "Image.csv")
    if not numbers or min(numbers) == result.first:
        return result.offset
    if min(numbers) == 1:
        return result.offset + result.first - 1
    raise PipelineFailed(f"range {result.first}-{result.last}: Image.csv starts at ImageNumber "
                         f"{min(numbers)}, neither {result.first} nor 1")


def table_kind(path: Path) -> Table:
    """What kind of table `path` is, from its first header row(s)."""
    if path.suffix.lower() == ".gct":
        return Table("gct", [])
    headers = _read_headers(path)
    if not headers:
        return Table("other", [])
    first = headers[0]
    if first == ["Key", "Value"]:
        return Table("key-value", first)
    if any(col in first for col in IMAGE_NUMBER_COLUMNS):
        return Table("image-numbered", first)
    if all(col in first for col in RELATIONSHIP_NUMBER_COLUMNS):
        return Table("relationships", first)
    if len(headers) == 2 and "ImageNumber" in headers[1] and "ObjectNumber" in headers[1]:
        # ExportToSpreadsheet combining several objects: object names, then feature names
        names = [name for name in dict.fromkeys(first) if name != "Image"]
        return Table("image-numbered", headers[1], object_names=names)
    return Table("other", first)


def merge(results: List[RangeResult], output_dir: Path, total: Optional[int] = None) -> MergeResult:
    """Merge the ranges' folders into output_dir (ranges in ImageNumber order).

    `total` is the run's image-set count (for Group_Length of a sliced data file)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    results = [r for r in results if not r.idle]
    merged = MergeResult()
    offsets = {id(r): image_number_offset(r) if (r.out_dir / "Image.csv").exists() else r.offset for r in results}
    merged.renumbered = any(offsets.values())
    names: Dict[str, List[RangeResult]] = {}
    for result in results:
        for rel in _relative_files(result.out_dir):
            names.setdefault(rel, []).append(result)
    for rel in sorted(names):
        sources = names[rel]
        target = output_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.lower().endswith(TABLE_SUFFIXES):
            table = table_kind(sources[0].out_dir / rel)
            if table.kind in ("image-numbered", "relationships"):
                _concat(rel, table, sources, offsets, target, output_dir, total)
            elif table.kind == "gct":
                _merge_gct(rel, sources, target)
            elif table.kind == "key-value":
                _same_key_values(rel, sources)
                shutil.copyfile(sources[0].out_dir / rel, target)
                if rel == "Experiment.csv":
                    merged.cellprofiler_version = _experiment_value(target, "CellProfiler_Version") or "unknown"
            else:
                _same_everywhere(rel, sources, "has no ImageNumber column")
                shutil.copyfile(sources[0].out_dir / rel, target)
            merged.tables[rel] = table
        else:
            _same_everywhere(rel, sources, "is written by several image-set ranges")
            os.replace(sources[0].out_dir / rel, target)
        merged.files.append(rel)
    return merged


def _same_everywhere(rel: str, sources: List[RangeResult], what: str) -> None:
    first = sources[0].out_dir / rel
    for other in sources[1:]:
        if not filecmp.cmp(first, other.out_dir / rel, shallow=False):
            raise PipelineFailed(f"{rel} {what} and differs between {sources[0].describe()} and "
                                 f"{other.describe()}, so no one copy is the result: name such files per image "
                                 "set (e.g. from the image file name or metadata), or set CPB_UNSPLITTABLE=1")


def _key_values(path: Path) -> Dict[str, object]:
    """Key -> value; a JSON list (Metadata_Tags) as a sorted list: CellProfiler 5 writes it in set order."""
    with open(path, newline="", encoding="utf-8") as handle:
        values: Dict[str, object] = {row[0]: row[1] if len(row) > 1 else "" for row in csv.reader(handle) if row}
    for key, value in values.items():
        if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
            try:
                parsed = json.loads(value)
            except ValueError:
                continue
            if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
                values[key] = sorted(parsed)
    return values


def _same_key_values(rel: str, sources: List[RangeResult]) -> None:
    first = _key_values(sources[0].out_dir / rel)
    for other in sources[1:]:
        values = _key_values(other.out_dir / rel)
        differ = sorted(k for k in set(first) | set(values)
                        if k not in VOLATILE_EXPERIMENT_KEYS and first.get(k) != values.get(k))
        if differ:
            raise PipelineFailed(f"{rel} differs between {sources[0].describe()} and {other.describe()} "
                                 f"(key {differ[0]}), so no one copy is the result: set CPB_UNSPLITTABLE=1")


def _merge_gct(rel: str, sources: List[RangeResult], target: Path) -> None:
    """GenePattern GCT: `#1.2`, `<rows>\\t<columns>`, a header, one row per image set."""
    head: Optional[List[List[str]]] = None
    rows: List[List[str]] = []
    for source in sources:
        with open(source.out_dir / rel, newline="", encoding="utf-8") as handle:
            lines = list(csv.reader(handle, delimiter="\t"))
        if len(lines) < 3 or lines[0][:1] != ["#1.2"] or len(lines[1]) < 2:
            raise PipelineFailed(f"{rel} of {source.describe()} is not a GCT file (#1.2, counts, header)")
        if head is None:
            head = lines[:3]
        elif lines[2] != head[2] or lines[1][1] != head[1][1]:
            raise PipelineFailed(f"{rel} has different columns in {source.describe()} than in "
                                 f"{sources[0].describe()}: set CPB_UNSPLITTABLE=1")
        data = [line for line in lines[3:] if line]
        if str(len(data)) != lines[1][0]:
            raise PipelineFailed(f"{rel} of {source.describe()} says {lines[1][0]} rows but holds {len(data)}")
        rows.extend(data)
    assert head is not None
    tmp = target.with_name(target.name + ".partial")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(head[0])
        writer.writerow([str(len(rows))] + head[1][1:])
        writer.writerow(head[2])
        writer.writerows(rows)
    os.replace(tmp, target)


def _concat(rel: str, table: Table, sources: List[RangeResult], offsets: Dict[int, int], target: Path,
            output_dir: Path, total: Optional[int]) -> None:
    """Concatenate one table's ranges. Rows are copied byte for byte unless a number needs an
    offset or a path names the range's folder: the object tables (most of the data) then cost
    a file copy, not a CSV parse."""
    header_rows = 2 if table.object_names else 1
    number_names = RELATIONSHIP_NUMBER_COLUMNS if table.kind == "relationships" else IMAGE_NUMBER_COLUMNS
    header: Optional[List[bytes]] = None
    tmp = target.with_name(target.name + ".partial")
    with open(tmp, "wb") as out:
        for source in sources:
            with open(source.out_dir / rel, "rb") as handle:
                lines = [handle.readline() for _ in range(header_rows)]
                if not lines[0].strip():
                    continue
                if header is None:
                    header = lines
                    for line in lines:
                        out.write(line)
                elif [line.rstrip(b"\r\n") for line in lines] != [line.rstrip(b"\r\n") for line in header]:
                    raise PipelineFailed(f"{rel} has different columns in {source.describe()} than in "
                                         f"{sources[0].describe()}; the pipeline's measurements vary between "
                                         "image sets: set CPB_UNSPLITTABLE=1")
                columns = next(csv.reader([lines[-1].decode("utf-8").rstrip("\r\n")]))
                offset = offsets[id(source)]
                number_cols = [i for i, col in enumerate(columns) if col in number_names] if offset else []
                sliced = source.offset != 0 and table.kind == "image-numbered" and not table.object_names
                group_index = [i for i, col in enumerate(columns) if col == "Group_Index"] if sliced else []
                group_length = [i for i, col in enumerate(columns) if col == "Group_Length"] if sliced else []
                path_cols = [i for i, col in enumerate(columns)
                             if col.startswith(("PathName_", "URL_", "ObjectsPathName_", "ObjectsURL_"))]
                terminator = "\r\n" if lines[-1].endswith(b"\r\n") else "\n"
                if not number_cols and not path_cols and not group_index and not group_length:
                    shutil.copyfileobj(handle, out, 1 << 20)
                    if _last_byte(source.out_dir / rel) not in (b"\n", b""):
                        out.write(terminator.encode())  # never glue the next range's first row onto this one
                    continue
                old, new = str(source.out_dir), str(output_dir)
                text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
                buffer = io.StringIO()
                writer = csv.writer(buffer, lineterminator=terminator)
                for row in csv.reader(text):
                    for i in number_cols:
                        if row[i]:
                            row[i] = str(int(float(row[i])) + offset)
                    for i in group_index:  # position in the one group of an ungrouped run
                        if row[i]:
                            row[i] = str(int(float(row[i])) + source.offset)
                    for i in group_length:
                        if row[i] and total is not None:
                            row[i] = str(total)
                    for i in path_cols:
                        if old in row[i]:
                            row[i] = row[i].replace(old, new)
                    writer.writerow(row)
                out.write(buffer.getvalue().encode("utf-8"))
    os.replace(tmp, target)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return b""
        handle.seek(-1, os.SEEK_END)
        return handle.read(1)


def _experiment_value(path: Path, key: str) -> Optional[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.reader(handle):
            if len(row) >= 2 and row[0] == key:
                return row[1]
    return None
