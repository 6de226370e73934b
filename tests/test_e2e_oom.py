"""End to end (issue 15): out of memory is escalated with twice the memory, through the local stack.

The whole path with real parts: `cpb submit --stack local --upload` sends the message, the real
ingress handler submits an array job, the local Batch runs the real worker per child with the
job's memory enforced (a session over its memory is killed: exit 137, `OutOfMemoryError`), the
"Batch Job State Change" event reaches the real `handlers.events` through the local EventBridge
rule, which resubmits the child with twice the memory (same run id, lease `retries`,
`_cpb/events/`); the retry runs the real CellProfiler and succeeds; `cpb status` says why it was
retried and `cpb results` merges complete results equal to the synthetic plate's truth.

The only fake is the fault: `CPB_CELLPROFILER` is a small script that, for the parts named below,
allocates more than the job's memory unless the job was given `needs_mib` (it reads
`CPB_MEMORY_MIB`, which the worker passes on), and otherwise execs the real CellProfiler with
the same arguments. The second case is the limit: a job that needs more than the stack's
`jobMaxMemoryMib` is retried once at that maximum, runs out again, and is left FAILED with the
reason; nothing more is submitted.
"""
from __future__ import annotations

import csv
import json
import re
import stat
import sys
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner

from cpb.cli import cli
from cpb.demo.synthetic import make_plate
from cpb.local.emulator import environment
from cpb.local.settings import load_settings
from cpb.local.up import LocalCloud

PIPELINE = Path(__file__).resolve().parent.parent / "cpb" / "pipelines" / "nuclei.cppipe"
MAX_MEMORY = 2048  # the stack's jobMaxMemoryMib here: one doubling from 1024 reaches it

# Runs in place of `cellprofiler`. RULES: {output: {"parts": [part, ...] or null for a plain job,
# "needs_mib": N}}. A matching job with less memory than N fills its memory and 512 MiB more (pages
# touched, so they are resident) and waits to be killed; anything else is the real CellProfiler.
FAKE = r'''#!{python}
import json, os, sys, time
RULES = json.loads({rules!r})
REAL = {real!r}
env = os.environ
rule = RULES.get(env.get("CPB_OUTPUT", ""))
index = env.get("AWS_BATCH_JOB_ARRAY_INDEX")
part = int(index) + int(env.get("CPB_ARRAY_OFFSET") or 0) if index else (
    int(env["CPB_ARRAY_INDEX"]) if env.get("CPB_ARRAY_INDEX") else None)
memory = int(env.get("CPB_MEMORY_MIB") or 0)
if rule and (rule["parts"] is None or part in rule["parts"]) and memory < rule["needs_mib"]:
    print(f"fake cellprofiler: part {{part}} needs {{rule['needs_mib']}} MiB, the job has {{memory}}: "
          "allocating past it", flush=True)
    hog = bytearray((memory + 512) * 2**20)
    for i in range(0, len(hog), 4096):
        hog[i] = 1
    time.sleep(120)
    sys.exit(1)  # never reached when the memory limit is enforced
os.execv(REAL, [REAL] + sys.argv[1:])
'''


def _fake_cellprofiler(tmp_path: Path, real: str, rules: dict) -> str:
    path = tmp_path / "fake-bin" / "cellprofiler"
    path.parent.mkdir(parents=True)
    path.write_text(FAKE.format(python=sys.executable, rules=json.dumps(rules), real=real))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _json(s3, bucket: str, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def _events(s3, bucket: str, output: str) -> list[dict]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{output}/_cpb/events/").get("Contents", [])
    return [_json(s3, bucket, o["Key"]) for o in listed]


@pytest.mark.cellprofiler
@pytest.mark.fault
def test_out_of_memory_is_retried_with_twice_the_memory_until_the_stacks_maximum(cellprofiler_env, tmp_path,
                                                                                  monkeypatch):
    rules = {"results/OOM1": {"parts": [1], "needs_mib": 2048},      # fits after one doubling
             "results/OOM2": {"parts": None, "needs_mib": 4096}}     # more than the stack's maximum
    fake = _fake_cellprofiler(tmp_path, cellprofiler_env["CPB_CELLPROFILER"], rules)
    monkeypatch.setenv("CPB_CELLPROFILER", fake)
    monkeypatch.setenv("CPB_CELLPROFILER_ARGS", cellprofiler_env["CPB_CELLPROFILER_ARGS"])
    plate = make_plate(tmp_path / "plate", wells=("C03",), sites=4, seed=5, plate="OOM1")
    data_file = str(plate.images_dir / "load_data.csv")
    settings = load_settings(overrides=[f"jobMaxMemoryMib={MAX_MEMORY}", "jobMemoryMib=1024", "oomMaxRetries=2"],
                             stack="oom")
    with environment({"CPB_HOME": str(tmp_path / "home")}), \
            LocalCloud(settings, log_dir=tmp_path / "logs", cores=2) as cloud:
        cli_run = CliRunner()
        common = ["--stack", "local", "--upload", str(plate.images_dir), "--pipeline", str(PIPELINE),
                  "--input", "plates/OOM1", "--data-file", data_file, "--memory", "1024", "--vcpus", "1"]
        sent = cli_run.invoke(cli, ["submit", *common, "--output", "results/OOM1",
                                    "--image-sets-per-job", "2", "--job-name", "oom-array"])
        assert sent.exit_code == 0, sent.output
        sent = cli_run.invoke(cli, ["submit", *common, "--output", "results/OOM2", "--job-name", "oom-plain"])
        assert sent.exit_code == 0, sent.output
        assert cloud.wait_idle(600)
        assert all(not r.failed for r in cloud.mapping.reports)
        # Job names are the message's `job_name` plus the message's token (`-<12 hex>`), which we drop.
        outcomes = [(re.sub(r"-[0-9a-f]{12}", "", o.item.name), o.item.index, o.item.memory_mib, o.status,
                     o.exit_code, o.container_reason) for o in cloud.batch.outcomes]
        s3 = boto3.client("s3")
        bucket = cloud.stack.bucket

        # --- 1. a child out of memory at 1 GiB, retried with 2 GiB, succeeds ---------------------------
        oom = "OutOfMemoryError: Container killed due to memory usage"
        assert ("oom-array", 0, 1024, "SUCCEEDED", 0, None) in outcomes
        assert ("oom-array", 1, 1024, "FAILED", 137, oom) in outcomes
        assert ("oom-array-oom1-1", None, 2048, "SUCCEEDED", 0, None) in outcomes
        lease = _json(s3, bucket, "results/OOM1/_cpb/lease.json")
        parent_id = lease["jobs"][0]["job_id"]
        [retry] = lease["retries"]
        assert (retry["replaces"], retry["array_index"], retry["memory_mib"], retry["previous_memory_mib"],
                retry["oom_retry"], retry["by"]) == (f"{parent_id}:1", 1, 2048, 1024, 1, "events")
        retried = next(o for o in cloud.batch.outcomes if o.item.job_id == retry["job_id"])
        env = retried.item.environment
        assert (env["CPB_RUN_ID"], env["CPB_ARRAY_INDEX"], env["CPB_MEMORY_MIB"], env["CPB_OOM_RETRY"]) == \
            (lease["run_id"], "1", "2048", "1")
        assert "AWS_BATCH_JOB_ARRAY_INDEX" not in env  # a plain job rerunning part 1
        events = {e["job_id"]: e for e in _events(s3, bucket, "results/OOM1")}
        assert (events[f"{parent_id}:1"]["status"], events[f"{parent_id}:1"]["exit_code"],
                events[f"{parent_id}:1"]["retried_by"], events[f"{parent_id}:1"]["memory_mib"]) == \
            ("FAILED", 137, retry["job_id"], 1024)
        assert (events[retry["job_id"]]["status"], events[retry["job_id"]]["oom_retry"],
                events[retry["job_id"]]["memory_mib"], events[retry["job_id"]]["run_id"]) == \
            ("SUCCEEDED", 1, 2048, lease["run_id"])
        record = _json(s3, bucket, "results/OOM1/part-00001/_cpb/run.json")
        assert (record["status"], record["run_id"], record["job_id"], record["first"], record["last"]) == \
            ("succeeded", lease["run_id"], retry["job_id"], 3, 4)

        status = cli_run.invoke(cli, ["status", "--stack", "local", "--no-dlq", "results/OOM1"])
        assert status.exit_code == 0, status.output
        assert "part 1: retried with 2.0 GiB after running out of memory at 1.0 GiB" in status.output
        got = cli_run.invoke(cli, ["results", "--stack", "local", "results/OOM1", "--to", str(tmp_path / "out")])
        assert got.exit_code == 0, got.output

        # --- 2. the limit: out of memory again at the stack's maximum is not retried, and says so -----
        assert ("oom-plain", None, 1024, "FAILED", 137, oom) in outcomes
        assert ("oom-plain-oom1", None, MAX_MEMORY, "FAILED", 137, oom) in outcomes
        assert not any(name.startswith("oom-plain-oom2") for name, *_ in outcomes)
        lease2 = _json(s3, bucket, "results/OOM2/_cpb/lease.json")
        assert [(r["memory_mib"], r["previous_memory_mib"]) for r in lease2["retries"]] == [(MAX_MEMORY, 1024)]
        last = next(e for e in _events(s3, bucket, "results/OOM2") if e["job_id"] == lease2["retries"][0]["job_id"])
        assert (last["status"], last["memory_mib"], last["oom_retry"], last["retried_by"]) == \
            ("FAILED", MAX_MEMORY, 1, None)
        failed = cli_run.invoke(cli, ["status", "--stack", "local", "--no-dlq", "results/OOM2"])
        assert failed.exit_code == 1, failed.output
        assert "FAILED" in failed.output
        assert "the job: retried with 2.0 GiB after running out of memory at 1.0 GiB" in failed.output
        assert f"-oom1 ({lease2['retries'][0]['job_id']}) failed: Essential container in task exited; " \
               f"{oom}; exit code 137 (out of memory at 2.0 GiB, and no retry with more memory followed: the " \
               "stack's jobMaxMemoryMib or oomMaxRetries was reached" in failed.output
        refused = cli_run.invoke(cli, ["results", "--stack", "local", "results/OOM2", "--to", str(tmp_path / "no")])
        assert refused.exit_code != 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "Image.csv")))
    counted = {(r["Metadata_Well"], int(float(r["Metadata_Site"]))): int(float(r["Count_Nuclei"])) for r in rows}
    assert counted == plate.truth
    assert sorted(int(r["ImageNumber"]) for r in rows) == [1, 2, 3, 4]
    nuclei = list(csv.DictReader(open(tmp_path / "out" / "Nuclei.csv")))
    assert len(nuclei) == sum(plate.truth.values())
    [log] = (tmp_path / "logs" / "jobs").glob("oom-array-*-1-.*.attempt1.log")  # child 1's first (only) attempt
    assert "of its 1024 MiB: killed" in log.read_text()
