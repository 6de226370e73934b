"""Helpers shared by the worker and synthetic-data tests (no tests here).

compare_outputs() is the oracle for "a split run equals a single-process
run": same files, same CSV columns and rows, same measurements, ignoring only
what legitimately differs between runs (timings, paths of output folders).
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
NUCLEI = REPO / "cpb" / "pipelines" / "nuclei.cppipe"
PY38 = REPO / ".venv-py38" / "bin" / "python"

# Columns that differ between two correct runs: timings and where files were written.
# ImageSet_ImageSet: the image set compressed against ImageSet_Zip_Dictionary (absolute URLs), so it
# differs between folders (a laptop's input folder, the container's staged S3 copy).
VOLATILE_PREFIXES = ("ExecutionTime_", "PathName_", "URL_", "ObjectsPathName_", "ObjectsURL_", "ImageSet_")
# ImageSet_Zip_Dictionary: CellProfiler's OME-XML of the image set, naming every image by its absolute URL.
VOLATILE_EXPERIMENT_KEYS = ("Run_Timestamp", "Modification_Timestamp", "Pipeline_Pipeline", "ImageSet_Zip_Dictionary")

csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))


def read_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _same_value(a: str, b: str) -> bool:
    if a == b:
        return True
    if a.startswith("[") and b.startswith("["):  # Metadata_Tags: CellProfiler 5 writes a set's order
        try:
            return sorted(json.loads(a)) == sorted(json.loads(b))
        except (ValueError, TypeError):
            return False
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)


def output_files(root: Path) -> List[str]:
    """Result files (not the worker's own _cpb/ folder), relative to root."""
    out = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "_cpb"]
        out += [os.path.relpath(os.path.join(directory, f), root) for f in files]
    return sorted(out)


def compare_outputs(single: Path, split: Path) -> int:
    """Assert both folders hold equivalent results; return the number of values compared."""
    assert output_files(single) == output_files(split)
    compared = 0
    for rel in output_files(single):
        if not rel.endswith(".csv"):
            continue
        a, b = read_rows(single / rel), read_rows(split / rel)
        assert len(a) == len(b), f"{rel}: {len(a)} rows vs {len(b)}"
        assert list(a[0].keys()) == list(b[0].keys()), f"{rel}: columns differ"
        if rel == "Experiment.csv":
            a = [r for r in a if r["Key"] not in VOLATILE_EXPERIMENT_KEYS]
            b = [r for r in b if r["Key"] not in VOLATILE_EXPERIMENT_KEYS]
        for index, (ra, rb) in enumerate(zip(a, b)):
            for column, value in ra.items():
                if column.startswith(VOLATILE_PREFIXES):
                    continue
                assert _same_value(value, rb[column]), f"{rel} row {index + 1} {column}: {value!r} vs {rb[column]!r}"
                compared += 1
    return compared


def check_record_files(root: Path, record: dict) -> None:
    """Every file the record lists exists with that size and checksum, and no result is unlisted."""
    import hashlib
    listed = {entry["key"] for entry in record["files"]}
    for entry in record["files"]:
        data = (root / entry["key"]).read_bytes()
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"], entry["key"]
    assert set(output_files(root)) <= listed
