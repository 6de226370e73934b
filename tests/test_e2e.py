"""End to end on the emulator: message → Lambda → array job → worker → merged results.

The demo's own code path (`cpb.demo.run.run_demo`) on a smaller plate, with real
CellProfiler: the local stack (`cpb.local.up.LocalCloud`) runs on a free 127.0.0.1 port,
`cpb submit --stack local --upload` (a separate process, as a user runs it) sends the message,
the event source mapping hands it to the real Lambda handler, the local Batch runs the real
worker per array child, `cpb status` and `cpb results` report and merge, and the counts are
checked against the synthetic plate's truth. Then the same with a corrupt pipeline: every child
fails, `cpb status` says so, and nothing is recorded complete.
"""
from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest

from cpb.demo.run import DemoSettings, run_demo

PIPELINE = Path(__file__).resolve().parent.parent / "cpb" / "pipelines" / "nuclei.cppipe"


@pytest.fixture
def cp(cellprofiler_env, monkeypatch):
    """Point the demo's worker processes at the real CellProfiler."""
    for key in ("CPB_CELLPROFILER", "CPB_CELLPROFILER_ARGS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(key, cellprofiler_env[key])
    for key in ("CPB_BUCKET", "CPB_QUEUE_URL", "CPB_DLQ_URL", "CPB_JOB_QUEUE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_PROFILE", "a-profile-this-machine-does-not-have")  # the demo must not need AWS config


def _listening(url: str) -> bool:
    host, port = url.split("//")[1].split(":")
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, int(port))) == 0


@pytest.mark.cellprofiler
def test_plate_end_to_end_counts_match_truth(cp, tmp_path):
    result = run_demo(DemoSettings(out_dir=tmp_path, wells=1, sites=4, sets_per_job=2, parallel=2, echo=False))
    assert result.ok, result.failures
    assert "2/2 children succeeded" in result.status_output and result.status_exit == 0
    rows = list(csv.DictReader(open(result.results_dir / "Image.csv")))
    truth = {(r["well"], int(r["site"])): int(r["nuclei"]) for r in csv.DictReader(open(tmp_path / "plate" / "truth.csv"))}
    assert len(rows) == len(truth) == 4
    assert sorted(int(r["ImageNumber"]) for r in rows) == [1, 2, 3, 4]  # global across the two parts
    counted = {(r["Metadata_Well"], int(float(r["Metadata_Site"]))): int(float(r["Count_Nuclei"])) for r in rows}
    assert counted == truth  # synthetic nuclei are well separated: the count is exact
    nuclei_rows = sum(1 for _ in csv.DictReader(open(result.results_dir / "Nuclei.csv")))
    assert nuclei_rows == sum(truth.values())
    runs = json.loads((result.results_dir / "_cpb" / "runs.json").read_text())
    assert [(r["part"], r["status"], r["first"], r["last"]) for r in runs] == \
        [("part-00000", "succeeded", 1, 2), ("part-00001", "succeeded", 3, 4)]
    assert result.montage.stat().st_size > 10_000
    assert result.table[0]["counted"] == result.table[0]["true"]
    assert result.endpoint.startswith("http://127.0.0.1:") and not _listening(result.endpoint)  # nothing left running


@pytest.mark.cellprofiler
def test_corrupt_pipeline_is_reported_failed_and_nothing_complete(cp, tmp_path):
    corrupt = tmp_path / "corrupt.cppipe"
    text = PIPELINE.read_text()
    assert "IdentifyPrimaryObjects:[" in text
    corrupt.write_text(text.replace("IdentifyPrimaryObjects:[", "IdentifyPrimaryObjectz:[", 1))
    out = tmp_path / "demo"
    (out / "results").mkdir(parents=True)
    (out / "results" / "Image.csv").write_text("stale from an earlier run\n")
    result = run_demo(DemoSettings(out_dir=out, wells=1, sites=2, sets_per_job=1, parallel=2,
                                   pipeline=corrupt, echo=False))
    assert not result.ok
    assert result.status_exit == 1
    assert "results/SYN1/: FAILED" in result.status_output
    assert "0/2 children succeeded, 2 failed" in result.status_output
    assert "child 0 failed: Essential container in task exited; exit code 3" in result.status_output
    assert "logs of demo-SYN1" in result.status_output  # the worker's output, from its CloudWatch log stream
    assert "IdentifyPrimaryObjectz" in result.status_output.split("logs of", 1)[1]
    assert any("cpb results refused" in f and "not complete" in f for f in result.failures)
    assert not (out / "results").exists()  # the stale result is gone, and nothing new was called complete


@pytest.mark.cellprofiler
def test_ctrl_c_during_the_demo_leaves_nothing_running(cp, tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from local_stack import processes_with

    proc = subprocess.Popen([sys.executable, "-m", "cpb", "demo", "--out", str(tmp_path / "demo"), "--wells", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ),
                            start_new_session=True)
    lines, endpoint = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r" at (http://127\.0\.0\.1:\d+)", line)
            endpoint = endpoint or (found.group(1) if found else None)
            if line.startswith("[5/7]"):
                break
        assert endpoint, "".join(lines)
        deadline = time.monotonic() + 60
        while not processes_with("AWS_ENDPOINT_URL", endpoint) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_with("AWS_ENDPOINT_URL", endpoint), "no job started"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(0.5)
    assert processes_with("AWS_ENDPOINT_URL", endpoint) == []
    assert not _listening(endpoint)
