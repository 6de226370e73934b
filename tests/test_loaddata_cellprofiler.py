"""The CSVs `cpb loaddata` writes, read by real CellProfiler 4.2.8.1: illumination, then analysis.

A small plate in Opera Phenix naming (2 channels, nuclei of known count, dimmer towards one
corner as a real field of view is) goes through the plate workflow on this machine with the
container's code (`cpb run --local`): `cpb loaddata` for the illumination pipeline, which saves
`IllumDNA.npy` and `IllumER.npy`; `cpb loaddata --illum <that folder>` for the analysis pipeline,
whose LoadData loads those functions beside each site's images and counts the nuclei.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from cpb.cli import cli

DATA = Path(__file__).resolve().parent / "data"
SIZE = 96


def synthetic_site(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(DNA, ER) 16-bit images: `count` separated round nuclei, ER a ring around each, under a
    field that falls to 40 % towards the bottom-right corner."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    dna = np.full((SIZE, SIZE), 0.04)
    er = np.full((SIZE, SIZE), 0.04)
    centres: list[tuple[int, int]] = []
    while len(centres) < count:
        y, x = rng.integers(14, SIZE - 14, size=2)
        if all((y - a) ** 2 + (x - b) ** 2 > 24 ** 2 for a, b in centres):
            centres.append((int(y), int(x)))
    for y, x in centres:
        distance = np.hypot(yy - y, xx - x)
        dna[distance <= 6] = 0.8
        er[(distance > 6) & (distance <= 9)] = 0.5
    field = 1.0 - 0.6 * (yy + xx) / (2 * SIZE)
    noise = lambda: rng.normal(0, 0.005, (SIZE, SIZE))  # noqa: E731
    to16 = lambda a: np.clip(a * 65535, 0, 65535).astype(np.uint16)  # noqa: E731
    return to16(dna * field + noise()), to16(er * field + noise())


def make_phenix_plate(folder: Path) -> dict[tuple[str, int], int]:
    rng = np.random.default_rng(11)
    truth = {}
    for (row, column, well), counts in (((1, 1, "A01"), (3, 2)), ((1, 2, "A02"), (1, 3))):
        for field, count in enumerate(counts, start=1):
            dna, er = synthetic_site(rng, count)
            for channel, image in ((1, dna), (2, er)):
                tifffile.imwrite(folder / f"r{row:02d}c{column:02d}f{field:02d}p01-ch{channel}sk1fk1fl1.tiff", image)
            truth[(well, field)] = count
    return truth


@pytest.mark.cellprofiler
def test_loaddata_csvs_drive_illumination_then_analysis_in_cellprofiler(cellprofiler_env, tmp_path, monkeypatch):
    for key in ("CPB_CELLPROFILER", "CPB_CELLPROFILER_ARGS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(key, cellprofiler_env[key])
    images = tmp_path / "P3" / "Images"
    images.mkdir(parents=True)
    truth = make_phenix_plate(images)
    runner = CliRunner()
    channels = ["--channel", "1=DNA", "--channel", "2=ER"]

    illum_csv = tmp_path / "illum.csv"
    made = runner.invoke(cli, ["loaddata", str(images), "--pattern", "phenix", *channels,
                               "--pipeline", str(DATA / "plate_illum.cppipe"), "-o", str(illum_csv)])
    assert made.exit_code == 0, made.output
    illum_out = tmp_path / "illum"
    ran = runner.invoke(cli, ["run", "--local", "--pipeline", str(DATA / "plate_illum.cppipe"), "--input", str(images),
                              "--output", str(illum_out), "--data-file", str(illum_csv), "--workers", "1"])
    assert ran.exit_code == 0, ran.output
    functions = {name: np.load(illum_out / f"Illum{name}.npy") for name in ("DNA", "ER")}
    assert all(f.shape == (SIZE, SIZE) for f in functions.values())
    # the function follows the field: brighter top-left than bottom-right
    assert functions["DNA"][5, 5] > functions["DNA"][-5, -5]

    analysis_csv = tmp_path / "analysis.csv"
    made = runner.invoke(cli, ["loaddata", str(images), "--pattern", "phenix", *channels, "--illum", str(illum_out),
                               "--pipeline", str(DATA / "plate_analysis.cppipe"), "-o", str(analysis_csv)])
    assert made.exit_code == 0, made.output
    out = tmp_path / "analysis"
    ran = runner.invoke(cli, ["run", "--local", "--pipeline", str(DATA / "plate_analysis.cppipe"), "--input",
                              str(images), "--output", str(out), "--data-file", str(analysis_csv), "--workers", "2"])
    assert ran.exit_code == 0, ran.output
    rows = list(csv.DictReader(open(out / "Image.csv", newline="")))
    counted = {(r["Metadata_Well"], int(float(r["Metadata_Site"]))): int(float(r["Count_Nuclei"])) for r in rows}
    assert counted == truth
    assert {r["FileName_IllumDNA"] for r in rows} == {"IllumDNA.npy"}  # LoadData loaded the function per site
