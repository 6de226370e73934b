"""Merge per-range CellProfiler outputs into the one set a single process would write.

Tables with an ImageNumber column (Image.csv, one per object) are
concatenated in range order after checking that every range wrote the same
header; ImageNumber is made global when a CellProfiler version numbered a
range from 1. Key/Value tables (Experiment.csv) are taken from the first
range. Any other file (saved images) is moved; if two ranges wrote the same
name, the later range wins, as the later image set would overwrite it in a
single process. A table without ImageNumber that differs between ranges
cannot be merged safely: that fails and names the file.
"""
from __future__ import annotations

import csv
import filecmp
import io
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import PipelineFailed
from .runner import RangeResult

IMAGE_NUMBER_COLUMNS = ("ImageNumber", "ImageNumber_First", "ImageNumber_Second")

csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # Experiment.csv holds the whole pipeline text


@dataclass
class MergeResult:
    files: List[str] = field(default_factory=list)  # relative paths written to the output folder
    cellprofiler_version: str = "unknown"
    renumbered: bool = False


def _read_header(path: Path) -> List[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle), [])


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
    """0 when CellProfiler numbered this range globally (5.0 does), else first-1.

    Checked on the range's own Image.csv so either numbering is handled."""
    if result.first is None:
        return 0
    numbers = _image_numbers(result.out_dir / "Image.csv")
    if not numbers or min(numbers) == result.first:
        return 0
    if min(numbers) == 1:
        return result.first - 1
    raise PipelineFailed(f"range {result.first}-{result.last}: Image.csv starts at ImageNumber "
                         f"{min(numbers)}, neither {result.first} nor 1")


def merge(results: List[RangeResult], output_dir: Path) -> MergeResult:
    """Merge the ranges' folders into output_dir (ranges in ImageNumber order)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    merged = MergeResult()
    offsets = {id(r): image_number_offset(r) if (r.out_dir / "Image.csv").exists() else 0 for r in results}
    merged.renumbered = any(offsets.values())
    names: Dict[str, List[RangeResult]] = {}
    for result in results:
        for rel in _relative_files(result.out_dir):
            names.setdefault(rel, []).append(result)
    for rel in sorted(names):
        sources = names[rel]
        target = output_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.lower().endswith(".csv"):
            header = _read_header(sources[0].out_dir / rel)
            if any(col in header for col in IMAGE_NUMBER_COLUMNS):
                _concat(rel, sources, offsets, target, output_dir)
            elif header == ["Key", "Value"]:
                shutil.copyfile(sources[0].out_dir / rel, target)
                if rel == "Experiment.csv":
                    merged.cellprofiler_version = _experiment_value(target, "CellProfiler_Version") or "unknown"
            else:
                first = sources[0].out_dir / rel
                if any(not filecmp.cmp(first, s.out_dir / rel, shallow=False) for s in sources[1:]):
                    raise PipelineFailed(f"{rel} differs between image-set ranges and has no ImageNumber "
                                         "column, so it cannot be merged: set CPB_UNSPLITTABLE=1 for this pipeline")
                shutil.copyfile(first, target)
        else:
            os.replace(sources[-1].out_dir / rel, target)  # later image set overwrites, as in one process
        merged.files.append(rel)
    return merged


def _concat(rel: str, sources: List[RangeResult], offsets: Dict[int, int], target: Path, output_dir: Path) -> None:
    """Concatenate one table's ranges. Rows are copied byte for byte unless an
    ImageNumber needs an offset or a path names the range's folder: the object
    tables (most of the data) then cost a file copy, not a CSV parse."""
    header: Optional[List[str]] = None
    tmp = target.with_name(target.name + ".partial")
    with open(tmp, "wb") as out:
        for source in sources:
            with open(source.out_dir / rel, "rb") as handle:
                first_line = handle.readline()
                if not first_line.strip():
                    continue
                this = next(csv.reader([first_line.decode("utf-8").rstrip("\r\n")]))
                if header is None:
                    header = this
                    out.write(first_line)
                elif this != header:
                    raise PipelineFailed(f"{rel} has different columns in range {source.first}-{source.last} "
                                         "than in the first range; the pipeline's measurements vary between "
                                         "image sets: set CPB_UNSPLITTABLE=1")
                offset = offsets[id(source)]
                number_cols = [i for i, col in enumerate(header) if col in IMAGE_NUMBER_COLUMNS] if offset else []
                path_cols = [i for i, col in enumerate(header)
                             if col.startswith(("PathName_", "URL_", "ObjectsPathName_", "ObjectsURL_"))]
                terminator = "\r\n" if first_line.endswith(b"\r\n") else "\n"
                if not number_cols and not path_cols:
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
