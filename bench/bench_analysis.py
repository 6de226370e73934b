"""The Cell Painting demo plate end to end on this machine, timed (`python bench/bench_analysis.py`).

Same synthetic plate (cpb/demo/cellpainting.py) through:
  illumination   cpb/pipelines/illum.cppipe over every image (one process: it is unsplittable)
  analysis       cpb/pipelines/cellpainting.cppipe, one process, corrected with those functions
  uncorrected    the same analysis with flat (all-ones) functions: proves the correction matters
  nuclei         the old demo pipeline (cpb/pipelines/nuclei.cppipe) on a nuclei plate of the same
                 size and sites, for the per-site ratio
  downstream     single-cell Parquet (CytoTable), the QC report, profiles (pycytominer)

Prints per-site CellProfiler seconds (median of ExecutionTime_* summed per image set, and the
process wall time over the sets), the counts against the truth with and without correction,
and the downstream timings. `--report-to DIR` keeps the QC report there, and illumination.png:
DNA as imaged beside the outlines drawn without and with the correction. The CPU may be shared:
the load average is printed with the figures.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def cellprofiler_env() -> dict:
    env = dict(os.environ)
    env.setdefault("CPB_CELLPROFILER", str(REPO / ".venv-cp" / "bin" / "cellprofiler"))
    from cpb_worker.runner import venv_args
    env.setdefault("CPB_CELLPROFILER_ARGS", venv_args(env["CPB_CELLPROFILER"]))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = "1"
    return env


def per_site_seconds(image_csv: Path) -> list:
    with open(image_csv, newline="") as handle:
        return [sum(float(v) for k, v in row.items() if k.startswith("ExecutionTime_")) for row in csv.DictReader(handle)]


def illumination_picture(run, uncorrected: Path, dest: Path) -> Path:
    """DNA as imaged, then the outlines CellProfiler drew without and with the correction (A01 s1)."""
    import numpy as np
    import tifffile
    from PIL import Image, ImageDraw
    from analysis_support import site_counts
    truth = run.plate.truth[("A01", 1)]
    dna = tifffile.imread(run.plate.images_dir / "CP1_A01_s1_w1.tif").astype(float)
    tiles = [("DNA as imaged (uneven light)", Image.fromarray((dna / dna.max() * 255).astype("uint8"))),
             (f"uncorrected: {site_counts(uncorrected / 'Image.csv')[('A01', 1)]} nuclei (truth {truth})",
              Image.open(uncorrected / "CP1_A01_s1_w1_outlines.png")),
             (f"corrected: {site_counts(run.analysis / 'Image.csv')[('A01', 1)]} nuclei (truth {truth})",
              Image.open(run.analysis / "CP1_A01_s1_w1_outlines.png"))]
    size, label = 384, 22
    sheet = Image.new("RGB", (3 * size, size + label), "black")
    draw = ImageDraw.Draw(sheet)
    for i, (text, tile) in enumerate(tiles):
        sheet.paste(tile.convert("RGB").resize((size, size)), (i * size, label))
        draw.text((i * size + 6, 4), text, fill="white")
    sheet.save(dest)
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wells", type=int, default=4)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--report-to", type=Path)
    args = parser.parse_args()
    from analysis_support import run_plate, run_uncorrected, site_counts, well_errors
    from cpb.analysis.downstream import analyse
    from cpb.demo.synthetic import PIPELINE as NUCLEI_PIPELINE, make_plate
    from cpb_worker.local import run_local

    env = cellprofiler_env()
    wells = [f"{r}{c:02d}" for r in "ABCDEFGH" for c in range(1, 13)][:args.wells]
    print(f"load average before: {os.getloadavg()[0]:.1f} (2 cores; others may share them)")
    with tempfile.TemporaryDirectory(prefix="cpb-bench-analysis-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        run = run_plate(work / "cp", env, wells=wells, sites=args.sites, seed=7)
        both = time.monotonic() - t0
        illum, analysis = run.records["illum"], run.records["analysis"]
        n = run.plate.image_sets
        seconds = per_site_seconds(run.analysis / "Image.csv")
        print(f"plate: {len(wells)} wells x {args.sites} sites = {n} image sets of 3 channels, 256x256")
        print(f"illumination: CellProfiler {illum.timings['cellprofiler']:.1f} s (one process, all {n} sets)")
        print(f"analysis:     CellProfiler {analysis.timings['cellprofiler']:.1f} s for {n} sets "
              f"({analysis.timings['cellprofiler'] / n:.2f} s/set wall incl. start-up); "
              f"per site (ExecutionTime_* summed) median {statistics.median(seconds):.2f} s, "
              f"max {max(seconds):.2f} s")
        nuclei_plate = make_plate(work / "nuclei", wells=wells, sites=args.sites, seed=7)
        t = time.monotonic()
        run_local(NUCLEI_PIPELINE, nuclei_plate.images_dir, work / "nuclei-out", data_file=nuclei_plate.data_file,
                  workers=1, env=env)
        nuclei_wall = time.monotonic() - t
        nuclei_seconds = per_site_seconds(work / "nuclei-out" / "Image.csv")
        print(f"old nuclei.cppipe on a nuclei plate of the same size: {nuclei_wall:.1f} s wall, per site median "
              f"{statistics.median(nuclei_seconds):.2f} s -> the Cell Painting analysis costs "
              f"{statistics.median(seconds) / statistics.median(nuclei_seconds):.1f}x per site")
        corrected = well_errors(site_counts(run.analysis / "Image.csv"), run.plate.truth)
        uncorrected_dir = run_uncorrected(run, env)
        uncorrected = well_errors(site_counts(uncorrected_dir / "Image.csv"), run.plate.truth)
        print("per-well count error vs truth (tolerance 10%):")
        for well in sorted(corrected):
            print(f"  {well}: corrected {corrected[well]:6.1%}   uncorrected {uncorrected[well]:8.1%}")
        results = work / "results"
        shutil.copytree(run.analysis, results)
        t = time.monotonic()
        done = analyse(results, platemap=run.plate.platemap_file, data_file=run.plate.data_file)
        print(f"downstream (Parquet + report + profiles): {time.monotonic() - t:.1f} s; "
              f"cells per well from pycytominer {dict(sorted(done.cells_per_well.items()))}")
        print(f"CellProfiler steps together: {both:.1f} s wall")
        if args.report_to:
            args.report_to.mkdir(parents=True, exist_ok=True)
            for path in (done.report.png, done.report.html):
                shutil.copy(path, args.report_to / path.name)
            illumination_picture(run, uncorrected_dir, args.report_to / "illumination.png")
            print(f"report kept in {args.report_to}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
