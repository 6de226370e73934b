"""`cpb report`: the plate heatmap's values, read back from the figure's data AND from the
pixels of the PNG it writes, equal the per-well sums of Image.csv's counts; missing and
failed sites are marked; the HTML holds everything inline."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cpb.analysis import AnalysisError
from cpb.analysis.report import build_figure, collect, parse_well, write_report
from cpb.cli import cli

from analysis_support import read_table, shared_plate_run

RUN_ID = "3f2a00000000000000aa"


@pytest.fixture(scope="module")
def plate_run(tmp_path_factory, cellprofiler_env):
    return shared_plate_run(tmp_path_factory, cellprofiler_env)


def _records(parts):
    """Run records as `cpb results` saves them in _cpb/runs.json."""
    return [{"part": f"part-{i:05d}", "status": status, "first": first, "last": last, "image_set_count": 8,
             "array_index": i, "run_id": RUN_ID, "cellprofiler_version": "4.2.8.1",
             "pipeline_sha256": "9" * 64, "image": "123.dkr.ecr.us-east-1.amazonaws.com/cpb@sha256:" + "e" * 64,
             "resumed_from": resumed, "timings": {"total": 12.5}, "reason": None if status == "succeeded" else "exit 3"}
            for i, (status, first, last, resumed) in enumerate(parts)]


def _results(plate_run, dest: Path, parts, drop_image_numbers=()) -> Path:
    """A results folder as `cpb results` leaves it: merged CSVs and _cpb/runs.json."""
    dest.mkdir(parents=True)
    header, rows = read_table(plate_run.analysis / "Image.csv")
    col = header.index("ImageNumber")
    with open(dest / "Image.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(r for r in rows if int(r[col]) not in drop_image_numbers)
    (dest / "_cpb").mkdir()
    (dest / "_cpb" / "runs.json").write_text(json.dumps(_records(parts)))
    return dest


def _expected_wells(image_csv: Path, column="Count_Cells"):
    out = {}
    with open(image_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            out[row["Metadata_Well"]] = out.get(row["Metadata_Well"], 0) + int(float(row[column]))
    return out


def _heatmap(fig, plate):
    images = [im for ax in fig.axes for im in ax.get_images() if im.get_gid() == f"heatmap:{plate}"]
    assert len(images) == 1
    return images[0]


def _value_from_pixel(rgb, cmap, vmax):
    lut = (cmap(np.linspace(0, 1, 256))[:, :3] * 255).astype(float)
    index = int(np.argmin(((lut - np.asarray(rgb, float)) ** 2).sum(axis=1)))
    return index / 255 * vmax


def test_heatmap_values_are_image_csv_counts_in_the_figure_and_its_pixels(plate_run, tmp_path):
    folder = _results(plate_run, tmp_path / "results", [("succeeded", 1, 4, None), ("succeeded", 5, 8, None)])
    expected = _expected_wells(folder / "Image.csv")
    assert expected == plate_run.plate.well_truth()  # CellProfiler counted every cell, so the truth too
    written = write_report(folder)
    assert written.png == folder / "report" / "plate-qc.png" and written.html.is_file()

    # 1. the figure's data: the heatmap image's array at each well
    fig = build_figure(collect(folder))
    heatmap = _heatmap(fig, "CP1")
    array = np.ma.filled(heatmap.get_array().astype(float), np.nan)
    assert array.shape == (8, 12)
    for well, count in expected.items():
        assert array[parse_well(well)] == count
    assert np.isnan(array).sum() == 96 - len(expected)  # every other well: no images

    # 2. the picture: render it as write_report does, check it IS the written PNG, and read
    #    each well's colour back through the colour map
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    pixels = np.asarray(Image.open(buffer).convert("RGB"))
    assert np.array_equal(pixels, np.asarray(Image.open(written.png).convert("RGB")))
    height = pixels.shape[0]
    ax = heatmap.axes
    vmax = heatmap.norm.vmax
    for r in range(8):
        for c in range(12):
            x, y = ax.transData.transform((c - 0.3, r - 0.3))  # clear of the count written in the middle
            rgb = pixels[int(round(height - y)), int(round(x))]
            well = f"{chr(65 + r)}{c + 1:02d}"
            if well in expected:
                assert _value_from_pixel(rgb, heatmap.get_cmap(), vmax) == pytest.approx(expected[well], abs=vmax / 100)
            else:
                assert tuple(rgb) == (0xd9, 0xd9, 0xd9), well  # grey: no images
    matplotlib.pyplot.close(fig)


def test_seconds_sets_and_provenance_come_from_image_csv_and_the_records(plate_run, tmp_path):
    folder = _results(plate_run, tmp_path / "results", [("succeeded", 1, 4, "0123456789abcdef0123"),
                                                        ("succeeded", 5, 8, None)])
    qc = collect(folder)
    assert qc.sets == {"done": 4, "skipped": 4, "failed": 0, "errors": 0, "missing": 0}
    header, rows = read_table(folder / "Image.csv")
    timing = [i for i, c in enumerate(header) if c.startswith("ExecutionTime_")]
    seconds = {int(r[header.index("ImageNumber")]): sum(float(r[i]) for i in timing) for r in rows}
    assert len(timing) == 11
    assert {s.image_number: s.seconds for s in qc.plates[0].sites} == pytest.approx(seconds)
    page = write_report(folder).html.read_text()
    for text in (RUN_ID, "9" * 64, "4.2.8.1", "sha256:" + "e" * 64, "0123456789abcdef0123"):
        assert text in page


def test_missing_and_failed_sites_are_marked(plate_run, tmp_path):
    """Part 1 (image sets 5-8) failed and left no rows: with the plate's LoadData CSV, the
    report knows which sites those were; a site merely absent is 'missing'."""
    truth = plate_run.plate.truth
    folder = _results(plate_run, tmp_path / "results", [("succeeded", 1, 4, None), ("failed", 5, 8, None)],
                      drop_image_numbers=(2, 5, 6, 7, 8))
    written = write_report(folder, data_file=plate_run.plate.data_file)
    plate = written.qc.plates[0]
    status = {(s.well, s.site): s.status for s in plate.sites}
    assert status == {("A01", "1"): "ok", ("A01", "2"): "missing", ("A02", "1"): "ok", ("A02", "2"): "ok",
                      ("B01", "1"): "failed", ("B01", "2"): "failed", ("B02", "1"): "failed", ("B02", "2"): "failed"}
    assert plate.problems() == {"A01": "s2 missing", "B01": "s1 failed, s2 failed", "B02": "s1 failed, s2 failed"}
    assert written.qc.sets["failed"] == 4 and written.qc.sets["done"] == 4
    fig = build_figure(written.qc)
    array = np.ma.filled(_heatmap(fig, "CP1").get_array().astype(float), np.nan)
    assert array[parse_well("A01")] == truth[("A01", 1)] and array[parse_well("B01")] == 0
    boxes = _heatmap(fig, "CP1").axes.patches
    corners = sorted((round(b.get_x() + 0.46), round(b.get_y() + 0.46)) for b in boxes)
    assert corners == sorted((parse_well(w)[1], parse_well(w)[0]) for w in ("A01", "B01", "B02"))
    matplotlib.pyplot.close(fig)


def test_html_is_one_self_contained_file(plate_run, tmp_path):
    folder = _results(plate_run, tmp_path / "results", [("succeeded", 1, 8, None)])
    page = write_report(folder).html.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)
    assert "<link" not in page and "http://" not in page and "https://" not in page
    data = json.loads(re.search(r'<script type="application/json" id="cpb-report-data">(.*?)</script>',
                                page, re.S).group(1))
    assert data["plates"][0]["wells"] == plate_run.plate.well_truth()
    assert data["image_sets"]["done"] == 8


def test_a_384_well_plate_from_a_local_run_folder(tmp_path):
    """A local run folder (its _cpb/run.json), wells beyond H12: a 384-well layout."""
    rows = [("1", "P24", "1", "5"), ("2", "P24", "2", "6"), ("3", "A01", "1", "0")]
    with open(tmp_path / "Image.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageNumber", "Metadata_Plate", "Metadata_Well", "Metadata_Site", "Count_Nuclei",
                         "ExecutionTime_01LoadData", "ExecutionTime_02IdentifyPrimaryObjects"])
        writer.writerows((n, "P2", w, s, c, "0.5", "0.25") for n, w, s, c in rows)
    (tmp_path / "_cpb").mkdir()
    (tmp_path / "_cpb" / "run.json").write_text(json.dumps({"status": "succeeded", "first": 1, "last": 3,
                                                            "cellprofiler_version": "4.2.8.1"}))
    qc = collect(tmp_path)
    plate = qc.plates[0]
    assert plate.plate_format == 384 and plate.object_name == "Nuclei"
    grid = plate.matrix()
    assert grid.shape == (16, 24) and grid[15, 23] == 11 and grid[0, 0] == 0
    assert qc.sets["done"] == 3
    # without the LoadData CSV every well is expected to have as many sites as the fullest one
    assert [(s.well, s.site, s.seconds, s.status) for s in plate.sites] == [
        ("A01", "1", 0.75, "ok"), ("A01", "2", None, "missing"), ("P24", "1", 0.75, "ok"), ("P24", "2", 0.75, "ok")]
    with pytest.raises(AnalysisError, match="P24 is not on a 96-well plate"):
        collect(tmp_path, plate_format=96)


def test_cpb_report_prints_paths_and_refuses_a_folder_without_image_csv(plate_run, tmp_path):
    folder = _results(plate_run, tmp_path / "results", [("succeeded", 1, 8, None)])
    result = CliRunner().invoke(cli, ["report", str(folder)])
    assert result.exit_code == 0, result.output
    total = sum(plate_run.plate.truth.values())
    assert f"plate CP1: 4 wells, {total} Cells" in result.output
    assert f"report: {folder / 'report' / 'plate-qc.png'}" in result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"cpb: {tmp_path / 'empty'} has no Image.csv: give the folder `cpb results OUTPUT --to DIR` wrote"]
    shutil.copy(folder / "Image.csv", tmp_path / "empty" / "Image.csv")
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "empty"), "--object", "Mitochondria"])
    assert result.exit_code == 1 and "has no Count_Mitochondria column" in result.output


ANALYSIS_OPTIONS = {"results": ["--parquet"],
                    "report": ["--data-file", "--object", "--plate-format", "--out"],
                    "profile": ["--platemap", "--well-column", "--normalize-to", "--control-column", "--negcon",
                                "--method", "--out"]}


def test_analysis_options_are_in_help_and_in_the_cli_guide():
    guide = (Path(__file__).resolve().parent.parent / "docs" / "CLI.md").read_text()
    section = guide[guide.index("## Analysis: cpb results --parquet, cpb report, cpb profile"):]
    for command, options in ANALYSIS_OPTIONS.items():
        text = CliRunner().invoke(cli, [command, "--help"]).output
        for option in options:
            assert option in text, f"cpb {command} --help lacks {option}"
            assert option in section, f"docs/CLI.md's analysis section does not mention {command} {option}"
