"""Helpers for the analysis tests (no tests here): one real CellProfiler run of the
synthetic Cell Painting plate (illumination -> analysis), shared by every analysis test
file of a pytest session so CellProfiler runs once, not once per file."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from cpb.demo.cellpainting import (ANALYSIS_PIPELINE, CHANNELS, ILLUM_PIPELINE, CellPaintingPlate,
                                   analysis_data_file, make_cellpainting_plate)

#: The plate every CellProfiler-backed analysis test shares: 4 wells x 2 sites (8 image sets),
#: two DMSO (negative control) wells and two treated.
WELLS = ("A01", "A02", "B01", "B02")
SITES = 2
SEED = 2024


@dataclass
class PlateRun:
    root: Path
    plate: CellPaintingPlate
    illum: Path        # the illumination run's output folder (Illum<Ch>.npy, Image.csv)
    analysis: Path     # the analysis run's output folder (merged CSVs, outlines, _cpb/run.json)
    records: Dict[str, object]


_RUNS: Dict[Tuple[str, ...], PlateRun] = {}


def shared_plate_run(tmp_path_factory, env: Dict[str, str]) -> PlateRun:
    """The session's one run of the shared plate (every analysis test file uses this)."""
    return run_plate(tmp_path_factory.getbasetemp() / "cellpainting-shared", env)


def run_plate(base: Path, env: Dict[str, str], wells=WELLS, sites: int = SITES, seed: int = SEED,
              workers: Optional[int] = 1) -> PlateRun:
    """Generate the plate, run the illumination pipeline over all of it, then the analysis
    pipeline with those functions (real CellProfiler through cpb_worker.local.run_local)."""
    from cpb_worker.local import run_local
    key = (str(base), tuple(wells), str(sites), str(seed), str(workers))
    if key in _RUNS:
        return _RUNS[key]
    root = Path(base)
    plate = make_cellpainting_plate(root / "plate", wells=wells, sites=sites, seed=seed)
    illum = root / "illum"
    illum_record = run_local(ILLUM_PIPELINE, plate.images_dir, illum, data_file=plate.data_file, env=env)
    data_file = analysis_data_file(plate, illum, root / "analysis_load_data.csv")
    analysis = root / "analysis"
    record = run_local(ANALYSIS_PIPELINE, plate.images_dir, analysis, data_file=data_file, workers=workers, env=env)
    run = PlateRun(root, plate, illum, analysis, {"illum": illum_record, "analysis": record})
    _RUNS[key] = run
    return run


def run_uncorrected(run: PlateRun, env: Dict[str, str]) -> Path:
    """The same analysis pipeline on the same images with flat (all-ones) illumination
    functions: the analysis as it would be without correction."""
    from cpb_worker.local import run_local
    flat = run.root / "flat-illum"
    flat.mkdir(exist_ok=True)
    shape = np.load(run.illum / "IllumDNA.npy").shape
    for channel in CHANNELS:
        np.save(flat / f"Illum{channel}.npy", np.ones(shape, dtype=np.float32))
    data_file = analysis_data_file(run.plate, flat, run.root / "uncorrected_load_data.csv")
    out = run.root / "uncorrected"
    run_local(ANALYSIS_PIPELINE, run.plate.images_dir, out, data_file=data_file, env=env)
    return out


def site_counts(image_csv: Path, column: str = "Count_Nuclei") -> Dict[Tuple[str, int], int]:
    with open(image_csv, newline="") as handle:
        return {(row["Metadata_Well"], int(float(row["Metadata_Site"]))): int(float(row[column]))
                for row in csv.DictReader(handle)}


def well_errors(counts: Dict[Tuple[str, int], int], truth: Dict[Tuple[str, int], int]) -> Dict[str, float]:
    """Relative error of each well's total count (the demo's tolerance is per well)."""
    out = {}
    for well in sorted({w for w, _ in truth}):
        true = sum(n for (w, _), n in truth.items() if w == well)
        got = sum(n for (w, _), n in counts.items() if w == well)
        out[well] = abs(got - true) / true
    return out


TABLES = ("Image", "Cells", "Nuclei", "Cytoplasm")


def read_table(path: Path):
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        return header, list(reader)


def split_into_parts(results: Path, dest: Path, sizes) -> list:
    """Write results' tables as array parts `dest/part-NNNNN/<table>.csv`, each holding the next
    `sizes[i]` image sets renumbered from 1, as an array child's CellProfiler run numbers them.
    Returns [(part folder, first, last)]."""
    tables = {name: read_table(results / f"{name}.csv") for name in TABLES}
    parts, first = [], 1
    for index, size in enumerate(sizes):
        last = first + size - 1
        folder = dest / f"part-{index:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, (header, rows) in tables.items():
            col = header.index("ImageNumber")
            kept = [row[:col] + [str(int(row[col]) - first + 1)] + row[col + 1:] for row in rows
                    if first <= int(row[col]) <= last]
            with open(folder / f"{name}.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(header)
                writer.writerows(kept)
        parts.append((folder, first, last))
        first = last + 1
    return parts
