"""Out-of-memory escalation through the local stack (`cpb.local.up.LocalCloud`), end to end.

The real ingress handler, the local Batch, the EventBridge rule delivering events in-process and in
order to the real job-events handler, the real worker and CellProfiler 4.2.8.1: array child 1's
CellProfiler is SIGKILLed (what the kernel's OOM killer does) the first time it runs, so the worker
exits 137. Batch then sends the child's FAILED event and, the array being done, its parent's FAILED
event (which lists the child again): one retry must run, with twice the memory, and the plate's
results must be complete and right.
"""
from __future__ import annotations

import csv
import json
import stat

import boto3
import pytest
from click.testing import CliRunner

from cpb.cli import cli
from cpb.demo.synthetic import make_plate
from cpb.local.emulator import environment
from cpb.local.settings import LocalSettings
from cpb.local.up import LocalCloud
from test_e2e_requeue import PIPELINE

KILLED_ONCE = """#!/bin/sh
# CellProfiler, killed as by the OOM killer in array child 1 unless this is an out-of-memory retry
if [ -z "$CPB_OOM_RETRY" ] && [ "$AWS_BATCH_JOB_ARRAY_INDEX" = "1" ]; then kill -9 $$; fi
exec {real} "$@"
"""


@pytest.mark.cellprofiler
@pytest.mark.fault
def test_a_child_killed_for_memory_is_retried_once_with_twice_the_memory(cellprofiler_env, tmp_path, monkeypatch):
    wrapper = tmp_path / "cellprofiler"
    wrapper.write_text(KILLED_ONCE.format(real=cellprofiler_env["CPB_CELLPROFILER"]))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CPB_CELLPROFILER", str(wrapper))
    monkeypatch.setenv("CPB_CELLPROFILER_ARGS", cellprofiler_env["CPB_CELLPROFILER_ARGS"])
    plate = make_plate(tmp_path / "plate", wells=("C03",), sites=2, seed=5, plate="OOM1")
    with environment({"CPB_HOME": str(tmp_path / "home")}), \
            LocalCloud(LocalSettings(stack="oom"), log_dir=tmp_path / "logs", cores=2) as cloud:
        cli_run = CliRunner()
        sent = cli_run.invoke(cli, ["submit", "--stack", "local", "--upload", str(plate.images_dir),
                                    "--pipeline", str(PIPELINE), "--input", "plates/OOM1", "--output", "results/OOM1",
                                    "--data-file", str(plate.images_dir / "load_data.csv"),
                                    "--image-sets-per-job", "1", "--vcpus", "1", "--memory", "2048"])
        assert sent.exit_code == 0, sent.output
        assert cloud.wait_idle(300)
        outcomes = cloud.batch.outcomes
        delivered = [(e["detail"]["jobName"], (e["detail"].get("arrayProperties") or {}).get("index"),
                      e["detail"]["status"]) for e in cloud.rule.events]
        status = cli_run.invoke(cli, ["status", "--stack", "local", "--no-dlq", "results/OOM1"])
        got = cli_run.invoke(cli, ["results", "--stack", "local", "results/OOM1", "--to", str(tmp_path / "out")])
        lease = boto3.client("s3").get_object(Bucket=cloud.stack.bucket, Key="results/OOM1/_cpb/lease.json")
        lease = json.loads(lease["Body"].read())
    children = sorted((o.item.index, o.status, o.exit_code) for o in outcomes if o.item.index is not None)
    assert children == [(0, "SUCCEEDED", 0), (1, "FAILED", 137)]
    [retry] = [o for o in outcomes if o.item.index is None]
    assert retry.status == "SUCCEEDED" and retry.item.name.endswith("-oom1-1")
    env = retry.item.environment
    assert (env["CPB_OOM_RETRY"], env["CPB_ARRAY_INDEX"], env["CPB_MEMORY_MIB"]) == ("1", "1", "4096")
    # both FAILED events reached the events Lambda (the child's first), and only one retry was made
    failed = [d for d in delivered if d[2] == "FAILED"]
    assert [(index is None) for _, index, _ in failed] == [False, True], delivered
    assert [(r["array_index"], r["memory_mib"], r["previous_memory_mib"]) for r in lease["retries"]] == [
        (1, 4096, 2048)]
    assert status.exit_code == 0, status.output
    assert "part 1: retried with 4.0 GiB after running out of memory at 2.0 GiB" in status.output
    assert got.exit_code == 0, got.output
    rows = list(csv.DictReader(open(tmp_path / "out" / "Image.csv")))
    counted = {(r["Metadata_Well"], int(float(r["Metadata_Site"]))): int(float(r["Count_Nuclei"])) for r in rows}
    assert counted == plate.truth
