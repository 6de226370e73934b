"""The worker with the real CellProfiler: split runs equal single runs on
ExampleHuman, unsplittable pipelines are not split, bad inputs fail with a
reason and no success record, and the worker runs on Python 3.8."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cpb_worker.errors import BadInput, PipelineFailed
from cpb_worker.local import run_local
from cpb_worker.record import read_local

from test_worker_support import NUCLEI, PY38, REPO, check_record_files, compare_outputs, read_rows

pytestmark = pytest.mark.cellprofiler


@pytest.fixture(scope="module")
def human_runs(shared_examples, cellprofiler_env, tmp_path_factory):
    """ExampleHuman (LoadData variant, 4 image sets) run by one process and by two."""
    root = shared_examples / "ExampleHuman"
    out = tmp_path_factory.mktemp("human")
    runs = {}
    for workers in (1, 2):
        runs[workers] = run_local(root / "loaddata" / "ExampleHuman_LoadData.cppipe", root / "images",
                                  out / f"w{workers}", data_file=root / "loaddata" / "load_data_x4.csv",
                                  workers=workers, env=cellprofiler_env)
    return out, runs


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    from cpb.demo.synthetic import make_plate
    return make_plate(tmp_path_factory.mktemp("plate"), wells=("B02",), sites=3, seed=11, size=160, nuclei=(4, 8))


def test_split_run_equals_single_process_run_on_example_human(human_runs, example_human_nuclei):
    out, runs = human_runs
    single, split = runs[1], runs[2]
    assert (single.processes, split.processes) == (1, 2) and split.split
    assert split.exit_codes == [0, 0] and split.status == "succeeded"
    assert (split.first, split.last, split.image_set_count) == (1, 4, 4)
    compared = compare_outputs(out / "w1", out / "w2")
    assert compared > 10000  # every measurement of every nucleus, cell and cytoplasm
    image = read_rows(out / "w2" / "Image.csv")
    assert [r["ImageNumber"] for r in image] == ["1", "2", "3", "4"]
    assert {r["Count_Nuclei"] for r in image} == {f"{example_human_nuclei}.0"}
    nuclei = read_rows(out / "w2" / "Nuclei.csv")
    assert len(nuclei) == 4 * example_human_nuclei and {r["ImageNumber"] for r in nuclei} == {"1", "2", "3", "4"}


def test_run_record_lists_every_file_with_checksums(human_runs, cellprofiler_version):
    out, runs = human_runs
    record = read_local(out / "w2")
    assert record["status"] == "succeeded" and record["cellprofiler_version"] == cellprofiler_version
    assert record["pipeline_sha256"] == runs[2].pipeline_sha256 and len(record["pipeline_sha256"]) == 64
    assert {"cellprofiler", "merge", "verify", "total"} <= set(record["timings"])
    check_record_files(out / "w2", record)
    assert sum(1 for f in record["files"] if f["key"].startswith("_cpb/logs/")) == 2
    assert not (out / "w2" / "_cpb" / "ranges").exists()  # per-range folders are merged away


def test_unsplittable_pipeline_runs_in_one_process(plate, cellprofiler_env, tmp_path):
    """Saving only on the last cycle is state across image sets: split, each range
    would save its own 'last' image. The worker must run one process and save one."""
    pipeline = tmp_path / "last-cycle.cppipe"
    pipeline.write_text(NUCLEI.read_text().replace("When to save:Every cycle", "When to save:Last cycle"))
    record = run_local(pipeline, plate.images_dir, tmp_path / "out", data_file=plate.data_file, workers=3,
                       env=cellprofiler_env)
    assert record.processes == 1 and not record.split and record.exit_codes == [0]
    assert any("last cycle" in r for r in record.unsplittable_reasons)
    assert [r["ImageNumber"] for r in read_rows(tmp_path / "out" / "Image.csv")] == ["1", "2", "3"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["SYN1_B02_s3_w1_outlines.png"]
    assert record.warnings == []
    (tmp_path / "out" / "Image.csv").rename(tmp_path / "out" / "old-Image.csv")  # a reused folder's leftovers
    again = run_local(pipeline, plate.images_dir, tmp_path / "out", data_file=plate.data_file, workers=3,
                      env=cellprofiler_env)
    assert "1 file(s) in the output folder are not from this run (e.g. old-Image.csv)" in again.warnings[0]


def _copy_plate(plate, dest: Path) -> Path:
    shutil.copytree(plate.root, dest)
    return dest


def test_missing_image_fails_before_running_with_the_row_named(plate, cellprofiler_env, tmp_path):
    root = _copy_plate(plate, tmp_path / "plate")
    (root / "images" / "SYN1_B02_s2_w2.tif").unlink()
    with pytest.raises(BadInput, match=r"image not found: image set 2 \(data file line 3\) Image_FileName_Cells: .*SYN1_B02_s2_w2.tif") as info:
        run_local(NUCLEI, root / "images", tmp_path / "out", data_file=root / "load_data.csv", workers=2,
                  env=cellprofiler_env)
    assert info.value.exit_code == 2
    record = read_local(tmp_path / "out")
    assert record["status"] == "failed" and "SYN1_B02_s2_w2.tif" in record["reason"]
    assert not (tmp_path / "out" / "Image.csv").exists()


def test_corrupt_pipeline_fails_with_a_reason_and_no_success_record(plate, cellprofiler_env, tmp_path):
    broken = tmp_path / "broken.cppipe"
    broken.write_text(NUCLEI.read_text()[:1500])  # truncated mid-module, as an interrupted upload leaves it
    with pytest.raises(BadInput, match="corrupt or truncated: header says ModuleCount:7"):
        run_local(broken, plate.images_dir, tmp_path / "out", data_file=plate.data_file, env=cellprofiler_env)
    assert read_local(tmp_path / "out")["status"] == "failed"


@pytest.mark.fault
def test_cellprofiler_exit_0_having_written_nothing_is_a_failure(plate, cellprofiler_env, tmp_path):
    """Real CellProfiler drops every module from the first unknown one on, runs the
    rest and exits 0 without an export: the worker must not call that success."""
    pipeline = tmp_path / "unknown-module.cppipe"
    pipeline.write_text(NUCLEI.read_text().replace("MeasureObjectSizeShape:[", "NoSuchPluginModule:["))
    with pytest.raises(PipelineFailed, match="could not load the whole pipeline.*NoSuchPluginModule") as info:
        run_local(pipeline, plate.images_dir, tmp_path / "out", data_file=plate.data_file, workers=1,
                  env=cellprofiler_env)
    assert info.value.exit_code == 3
    record = read_local(tmp_path / "out")
    assert record["status"] == "failed" and record["exit_codes"] == [0]


def test_worker_runs_on_python38(plate, cellprofiler_env, tmp_path):
    """The container's Python is 3.8: run the local mode there, against real CellProfiler."""
    if not PY38.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{PY38} is missing in CI (make py38 builds it)")
        pytest.skip(f"Python 3.8 virtualenv not found at {PY38} (build it with `make py38`)")
    version = subprocess.run([str(PY38), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert version == "(3, 8)"
    modules = sorted(p.stem for p in (REPO / "image" / "cpb_worker").glob("*.py") if p.stem != "__main__")
    imports = subprocess.run([str(PY38), "-c", "import importlib, sys; [importlib.import_module('cpb_worker.' + m) "
                              "for m in sys.argv[1:]]; import boto3; assert boto3.__version__ == '1.37.38'"]
                             + modules, env=dict(os.environ, PYTHONPATH=str(REPO / "image")),
                             capture_output=True, text=True)
    assert imports.returncode == 0, imports.stderr  # aws/s3io too, which local mode does not import
    env = dict(cellprofiler_env, PYTHONPATH=str(REPO / "image"))
    proc = subprocess.run([str(PY38), "-m", "cpb_worker", "local", "--pipeline", str(NUCLEI),
                           "--input", str(plate.images_dir), "--output", str(tmp_path / "out"),
                           "--data-file", str(plate.data_file), "--workers", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "out" / "_cpb" / "run.json").read_text())
    assert record["status"] == "succeeded" and record["processes"] == 2 and record["image_set_count"] == 3
    check_record_files(tmp_path / "out", record)


def test_local_cli_reports_bad_range_with_exit_2(plate, cellprofiler_env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cpb_worker", "local", "--pipeline",
                           str(NUCLEI), "--input", str(plate.images_dir), "--output", str(tmp_path / "out"),
                           "--data-file", str(plate.data_file), "--first", "2", "--last", "7"],
                          env=cellprofiler_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("cpb_worker: failed: range 2-7 is outside the 3 image sets (1-3)")
