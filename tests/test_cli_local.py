"""`cpb run --local`: the worker's code on this machine with real CellProfiler.

Uses the shared ExampleHuman data (beside the repository in CI); the LoadData
variant lists the one image set four times so two worker processes split it.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cpb.cli import cli


@pytest.fixture
def cp(cellprofiler_env, monkeypatch):
    for key in ("CPB_CELLPROFILER", "CPB_CELLPROFILER_ARGS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(key, cellprofiler_env[key])
    monkeypatch.delenv("CPB_VCPUS", raising=False)


@pytest.mark.cellprofiler
def test_run_local_splits_over_workers_and_merges(cp, shared_examples, tmp_path):
    human = shared_examples / "ExampleHuman"
    out = tmp_path / "out"
    out.mkdir()
    (out / "Cells_from_last_week.csv").write_text("ImageNumber\n1\n")  # a reused output folder
    result = CliRunner().invoke(cli, ["run", "--local", "--pipeline", str(human / "loaddata" / "ExampleHuman_LoadData.cppipe"),
                                      "--input", str(human / "images"), "--output", str(out),
                                      "--data-file", str(human / "loaddata" / "load_data_x4.csv"), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("succeeded: image sets 1-4 with 2 CellProfiler process(es)")
    # the scientist sees, without opening run.json, that the folder holds a file this run did not write
    assert "warning: 1 file(s) in the output folder are not from this run (e.g. Cells_from_last_week.csv)" \
        in result.output
    rows = list(csv.DictReader(open(out / "Image.csv")))
    assert sorted(int(r["ImageNumber"]) for r in rows) == [1, 2, 3, 4]
    counts = {int(float(r["Count_Nuclei"])) for r in rows}
    assert len(counts) == 1 and counts.pop() > 0  # the same image four times: the same count each time
    record = json.loads((out / "_cpb" / "run.json").read_text())
    assert record["status"] == "succeeded" and record["exit_codes"] == [0, 0]


def test_run_local_bad_pipeline_is_one_line_with_worker_exit_code(tmp_path, monkeypatch):
    monkeypatch.setenv("CPB_CELLPROFILER", "/nonexistent/cellprofiler")  # never reached: the plan fails first
    pipeline = tmp_path / "broken.cppipe"
    pipeline.write_text("this is not a pipeline\n")
    (tmp_path / "images").mkdir()
    result = CliRunner().invoke(cli, ["run", "--local", "--pipeline", str(pipeline), "--input",
                                      str(tmp_path / "images"), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output  # CONTRACTS.md: 2 = bad input
    assert result.output.startswith("FAILED (exit 2): ") and "Traceback" not in result.output
    assert json.loads((tmp_path / "out" / "_cpb" / "run.json").read_text())["status"] == "failed"


def test_run_local_refuses_a_data_file_without_the_illumination_functions_before_starting(tmp_path, monkeypatch):
    """New-user review: the demo's analysis pipeline with the plate's CSV (no Illum columns) started
    CellProfiler and failed with `ValueError: The IllumDNA image is missing from the pipeline`. The
    check cpb loaddata makes now runs first and says how to make the functions."""
    monkeypatch.setenv("CPB_CELLPROFILER", "/nonexistent/cellprofiler")  # never reached: refused first
    pipeline = Path(__file__).resolve().parent.parent / "cpb" / "pipelines" / "cellpainting.cppipe"
    images = tmp_path / "images"
    images.mkdir()
    data = tmp_path / "load_data.csv"
    columns = [f"Image_{kind}_{name}" for name in ("DNA", "AGP", "Mito") for kind in ("FileName", "PathName")]
    data.write_text("\ufeffMetadata_Plate,Metadata_Well,Metadata_Site," + ",".join(columns) + "\n"
                    "P1,A01,1," + ",".join(["a.tif", str(images)] * 3) + "\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["run", "--local", "--pipeline", str(pipeline), "--input", str(images),
                                      "--data-file", str(data), "--output", str(tmp_path / "try")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("cpb: pipeline cellpainting.cppipe loads IllumDNA, IllumAGP, IllumMito (")
    assert ("which data file load_data.csv does not list: make the illumination functions first (cpb run --local "
            "--pipeline <illumination pipeline>") in result.output
    assert "cpb loaddata ... --illum <that folder>" in result.output
    assert not (tmp_path / "try").exists()


def test_run_local_summary_says_why_fewer_processes_than_workers_ran():
    """--workers 4 on a pipeline that must run in one process, or on fewer image sets, must not look
    like a silent downgrade: the summary says why."""
    from cpb.runlocal import summarize
    from cpb_worker.record import RunRecord
    crop = RunRecord(status="succeeded", first=1, last=3, image_set_count=3, processes=1,
                     unsplittable_reasons=["Crop (module 5) crops every image set with the first set's pattern"])
    text = summarize(crop, Path("out"), workers=4)
    assert text.splitlines()[1] == ("note: 1 process(es), not --workers 4, because the pipeline must run as one "
                                    "process (Crop (module 5) crops every image set with the first set's pattern)")
    few = RunRecord(status="succeeded", first=1, last=2, image_set_count=2, processes=2)
    assert "because there are only 2 image set(s)" in summarize(few, Path("out"), workers=4)
    assert summarize(few, Path("out"), workers=2).count("\n") == 0  # got what was asked: one line


def test_run_local_more_workers_than_cpus_says_so(tmp_path, monkeypatch):
    """--workers 64 on a laptop starts 64 CellProfiler processes fighting for memory: say so up front."""
    from cpb_worker.ranges import available_cpus
    monkeypatch.setenv("CPB_CELLPROFILER", "/nonexistent/cellprofiler")  # the plan fails before any run
    cpus = available_cpus({})
    if cpus >= 64:
        pytest.skip("this machine has 64 or more CPUs, as many as --workers accepts")
    pipeline = tmp_path / "broken.cppipe"
    pipeline.write_text("this is not a pipeline\n")
    (tmp_path / "images").mkdir()
    args = ["run", "--local", "--pipeline", str(pipeline), "--input", str(tmp_path / "images"),
            "--output", str(tmp_path / "out"), "--workers"]
    result = CliRunner().invoke(cli, args + [str(cpus + 1)])
    assert f"note: --workers {cpus + 1} is more than the {cpus} CPU(s) here" in result.output
    assert f"try --workers {cpus}" in result.output
    assert "note:" not in CliRunner().invoke(cli, args + [str(cpus)]).output


def test_run_local_finds_the_projects_cellprofiler_like_the_demo(tmp_path):
    """Right after `make demo`, `cpb run --local` failed with "cannot start CellProfiler": the demo
    finds .venv-cp by itself, run --local did not. A CellProfiler the scientist chose still wins,
    and the arguments `make` recorded beside a project CellProfiler go with it however it is named."""
    from cpb.runlocal import cellprofiler_defaults
    from cpb_worker.runner import cellprofiler_argv
    exe = tmp_path / ".venv-cp" / "bin" / "cellprofiler"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    env, note = cellprofiler_defaults({"PATH": "/usr/bin"}, repo=tmp_path)
    assert env["CPB_CELLPROFILER"] == str(exe)
    assert note == f"note: using the project's CellProfiler {exe} (set CPB_CELLPROFILER to use another)"
    mine = {"CPB_CELLPROFILER": "/opt/cp/cellprofiler"}
    assert cellprofiler_defaults(mine, repo=tmp_path) == (mine, None)
    assert cellprofiler_defaults({}, repo=tmp_path / "elsewhere") == ({}, None)  # nothing to find: unchanged
    assert cellprofiler_argv(env) == [str(exe)]  # 4.2.8 (the container's) needs no arguments
    (tmp_path / ".venv-cp" / "cpb-cellprofiler-args").write_text("-e imageio_reader imageio_reader_v3\n")
    assert cellprofiler_argv(env) == [str(exe), "-e", "imageio_reader", "imageio_reader_v3"]  # a 5.0 venv's
    assert cellprofiler_argv(dict(env, CPB_CELLPROFILER_ARGS="-L 10")) == [str(exe), "-L", "10"]  # set: kept


@pytest.mark.cellprofiler
def test_run_local_reads_an_excel_csv_with_a_byte_order_mark(cp, tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark; CellProfiler's LoadData took it for part of
    the first column's name and failed with "The DNA image is missing from the pipeline"."""
    from cpb.demo.synthetic import PIPELINE, make_plate
    plate = make_plate(tmp_path / "plate", wells=("A01",), sites=1, seed=2, size=128)
    excel = tmp_path / "from_excel.csv"
    excel.write_bytes(b"\xef\xbb\xbf" + plate.data_file.read_bytes().replace(b"\n", b"\r\n"))
    result = CliRunner().invoke(cli, ["run", "--local", "--pipeline", str(PIPELINE), "--input", str(plate.images_dir),
                                      "--output", str(tmp_path / "out"), "--data-file", str(excel)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "out" / "Image.csv")))
    assert [int(float(r["Count_Nuclei"])) for r in rows] == [plate.truth[("A01", 1)]]
    assert not (tmp_path / "out" / "_cpb" / "ranges").exists()  # the mark-free copy went with the work folder


@pytest.mark.parametrize("inside", ["", "results"])
def test_run_local_refuses_an_output_inside_the_input(tmp_path, inside):
    """The Lambda refuses an output prefix inside the input; locally the outlines would also be read as
    images by the next run. Refused before anything is written."""
    images = tmp_path / "images"
    images.mkdir()
    pipeline = tmp_path / "p.cppipe"
    pipeline.write_text("CellProfiler Pipeline: http://www.cellprofiler.org\nVersion:5\n")
    output = images / inside if inside else images
    result = CliRunner().invoke(cli, ["run", "--local", "--pipeline", str(pipeline), "--input", str(images),
                                      "--output", str(output)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().endswith(f"--output {output} is inside --input {images}: results would mix with "
                                          "the images; choose an output folder outside the input folder")
    assert sorted(images.rglob("*")) == []


def test_run_local_defaults_to_one_process_per_cpu_like_a_batch_job(tmp_path, monkeypatch):
    """Without --workers, a laptop run uses every CPU, as a Batch job uses every vCPU it was given."""
    import cpb.runlocal
    import cpb_worker.ranges
    from cpb.runlocal import LocalOutcome
    asked = {}

    def fake_run(pipeline, input_dir, output_dir, data_file, workers, unsplittable):
        asked["workers"] = workers
        return LocalOutcome(True, 0, "succeeded")

    monkeypatch.setattr(cpb_worker.ranges, "available_cpus", lambda env: 3)
    monkeypatch.setattr(cpb.runlocal, "run_local", fake_run)
    (tmp_path / "images").mkdir()
    (tmp_path / "p.cppipe").write_text("x")
    base = ["run", "--local", "--pipeline", str(tmp_path / "p.cppipe"), "--input", str(tmp_path / "images"),
            "--output", str(tmp_path / "out")]
    assert CliRunner().invoke(cli, base).exit_code == 0
    assert asked["workers"] == 3
    result = CliRunner().invoke(cli, base + ["--workers", "1"])
    assert result.exit_code == 0 and asked["workers"] == 1 and "note:" not in result.output
