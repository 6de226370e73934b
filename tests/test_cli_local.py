"""`cpb run --local`: the worker's code on this machine with real CellProfiler.

Uses the shared ExampleHuman data (beside the repository in CI); the LoadData
variant lists the one image set four times so two worker processes split it.
"""
from __future__ import annotations

import csv
import json

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
    result = CliRunner().invoke(cli, ["run", "--local", "--pipeline", str(human / "loaddata" / "ExampleHuman_LoadData.cppipe"),
                                      "--input", str(human / "images"), "--output", str(out),
                                      "--data-file", str(human / "loaddata" / "load_data_x4.csv"), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("succeeded: image sets 1-4 with 2 CellProfiler process(es)")
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
