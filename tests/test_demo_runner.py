"""The local stack's stand-ins for AWS compute and the SQS → Lambda mapping, without CellProfiler.

`cpb.local.batch` must behave like Batch where the demo and `cpb local up` rely on it: run each
array child with Batch's variables, apply the job definition's retry strategy (exit 4 retried;
2, 3 and 137 not: out of memory is the job-events Lambda's to resubmit with more memory), and
decide SUCCEEDED or FAILED itself (moto's no-Docker Batch would call every job SUCCEEDED at once).
The mapping (`cpb.local.mapping`) must delete only the messages the handler did not report as
failures, so a bad message goes to the DLQ after its retries while good ones in the same batch are
submitted once.
"""
from __future__ import annotations

import json
import sys
import time

import boto3
import pytest

from cpb.local import batch as localbatch, mapping as localingress
from cpb.local.emulator import create_stack, environment, moto_server
from cpb.local.settings import load_settings

# A fake worker: behaviour chosen per array index and attempt through FAKE_PLAN (JSON).
FAKE_WORKER = r"""
import json, os, sys
plan = json.loads(os.environ["FAKE_PLAN"])
index = os.environ.get("AWS_BATCH_JOB_ARRAY_INDEX", "single")
attempt = int(os.environ["AWS_BATCH_JOB_ATTEMPT"])
with open(os.path.join(os.environ["FAKE_DIR"], f"{index}.{attempt}.env.json"), "w") as f:
    json.dump(dict(os.environ), f)
codes = plan[index]
code = codes[min(attempt, len(codes)) - 1]
print(f"worker {index} attempt {attempt} exits {code}")
sys.exit(code)
"""


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setenv("HOST_SECRET", "must-not-reach-the-job")
    with moto_server() as url:
        stack = create_stack(url, load_settings(overrides=["maxReceiveCount=3"], stack="test"))
        with environment(stack.isolation_env()):
            yield stack


def _submit_array(stack, size: int, env: dict, vcpus: str = "1") -> str:
    batch = boto3.client("batch")
    job = batch.submit_job(jobName="plate", jobQueue=stack.job_queue_arn, jobDefinition=stack.job_definition_arn,
                           arrayProperties={"size": size},
                           containerOverrides={"environment": [{"name": k, "value": v} for k, v in env.items()],
                                               "resourceRequirements": [{"type": "VCPU", "value": vcpus}]})
    return job["jobId"]


def _runner(stack, tmp_path, plan: dict, cores: int = 2, command=None) -> localbatch.LocalBatch:
    """A local Batch for the stack's queue, attached before anything is submitted (as `cpb local up` is)."""
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    runner = localbatch.LocalBatch(stack.job_queue_arn, stack.region, {
        **stack.aws_env(), "FAKE_PLAN": json.dumps(plan), "FAKE_DIR": str(tmp_path)}, tmp_path / "logs",
        cores=cores, command=command or [sys.executable, str(script)], logs=boto3.client("logs"))
    runner.attach()
    return runner


@pytest.mark.fault
def test_transient_exit_is_retried_and_pipeline_error_is_not(emulated, tmp_path):
    runner = _runner(emulated, tmp_path, {"0": [0], "1": [4, 0], "2": [3, 0]})
    job_id = _submit_array(emulated, 3, {"CPB_OUTPUT": "results/x", "CPB_IMAGE_SETS_PER_JOB": "2"})
    batch = boto3.client("batch")
    assert batch.describe_jobs(jobs=[f"{job_id}:0"])["jobs"][0]["status"] != "SUCCEEDED"  # not before it ran
    with runner:
        outcomes = {o.item.index: o for o in runner.drain(timeout=120)}
        assert {i: (o.status, o.attempts) for i, o in outcomes.items()} == \
            {0: ("SUCCEEDED", 1), 1: ("SUCCEEDED", 2), 2: ("FAILED", 1)}
        children = {j["jobId"]: j for j in batch.describe_jobs(jobs=[f"{job_id}:{i}" for i in range(3)])["jobs"]}
        assert children[f"{job_id}:1"]["status"] == "SUCCEEDED"
        assert [a["container"]["exitCode"] for a in children[f"{job_id}:1"]["attempts"]] == [4, 0]
        failed = children[f"{job_id}:2"]
        assert failed["status"] == "FAILED"
        assert failed["statusReason"] == "Essential container in task exited"  # Batch's words
        assert failed["container"]["exitCode"] == 3 and failed["arrayProperties"] == {"index": 2}
        parent = batch.describe_jobs(jobs=[job_id])["jobs"][0]
        assert (parent["status"], parent["statusReason"]) == ("FAILED", "Array Child Job failed")
        assert runner.drain(timeout=10) == []  # nothing runs twice
        stream = failed["container"]["logStreamName"]
        events = boto3.client("logs").get_log_events(logGroupName=emulated.log_group, logStreamName=stream)["events"]
        assert "worker 2 attempt 1 exits 3" in [e["message"] for e in events]  # the awslogs driver's copy


@pytest.mark.race
def test_a_job_between_attempts_is_never_started_a_second_time(emulated, tmp_path):
    """Between a failed attempt and the retry the task shows RUNNABLE (as Batch shows it) while its own
    thread goes on to the next attempt. A scheduler tick in that window must not start the task again:
    it once did (CI saw a child's attempts as [4, 0, 4, 0]). Here the tick is forced into the window."""
    runner = _runner(emulated, tmp_path, {"0": [4, 0]})
    ticks = []

    def tick_in_the_window(kind, task, detail):
        if kind == "retry":
            runner._tick()  # what the scheduler thread may do at this moment
            ticks.append(detail)

    runner.on_event = tick_in_the_window
    job_id = _submit_array(emulated, 1, {"CPB_IMAGE_SETS_PER_JOB": "2"})
    with runner:
        outcomes = runner.drain(timeout=120)
        runner.wait_idle(10)
        child = boto3.client("batch").describe_jobs(jobs=[f"{job_id}:0"])["jobs"][0]
    assert ticks, "the first attempt was not retried"
    assert [(o.status, o.attempts) for o in runner.outcomes] == [("SUCCEEDED", 2)], outcomes
    assert [a["container"]["exitCode"] for a in child["attempts"]] == [4, 0]


@pytest.mark.race
def test_a_job_terminated_between_attempts_does_not_start_its_next_attempt(emulated, tmp_path):
    runner = _runner(emulated, tmp_path, {"0": [4, 0]})
    batch = boto3.client("batch")
    job_id = _submit_array(emulated, 1, {"CPB_IMAGE_SETS_PER_JOB": "2"})

    def terminate_in_the_window(kind, task, detail):
        if kind == "retry":
            batch.terminate_job(jobId=job_id, reason="cancelled by the test")
            runner._tick()

    runner.on_event = terminate_in_the_window
    with runner:
        runner.drain(timeout=120)
        child = batch.describe_jobs(jobs=[f"{job_id}:0"])["jobs"][0]
    assert [(o.status, o.attempts, o.reason) for o in runner.outcomes] == [("FAILED", 1, "cancelled by the test")]
    assert child["status"] == "FAILED"
    assert [a["container"]["exitCode"] for a in child["attempts"]] == [4]
    assert not (tmp_path / "0.2.env.json").exists()  # the second attempt never ran


@pytest.mark.fault
def test_oom_kill_is_left_to_the_job_events_lambda_and_reported(emulated, tmp_path):
    """The worker's own 137 (a CellProfiler process was killed) fails the child after ONE attempt:
    the job definition no longer repeats it with the same memory; the child's JobDetail is what the
    job-events Lambda recognises as out of memory (it resubmits with twice the memory)."""
    from handlers.events import out_of_memory
    runner = _runner(emulated, tmp_path, {"0": [137, 0], "1": [0]})
    job_id = _submit_array(emulated, 2, {"CPB_IMAGE_SETS_PER_JOB": "1"})
    with runner:
        outcomes = {o.item.index: o for o in runner.drain(timeout=120)}
    assert (outcomes[0].status, outcomes[0].attempts, outcomes[0].exit_code) == ("FAILED", 1, 137)
    assert not (tmp_path / "0.2.env.json").exists()  # no second attempt ran
    assert outcomes[1].status == "SUCCEEDED"
    batch = boto3.client("batch")
    child = batch.describe_jobs(jobs=[f"{job_id}:0"])["jobs"][0]
    assert (child["status"], child["container"]["exitCode"]) == ("FAILED", 137)
    assert out_of_memory(child) == "exit code 137 (a process was killed: out of memory)"
    assert batch.describe_jobs(jobs=[job_id])["jobs"][0]["status"] == "FAILED"


def test_worker_gets_batch_variables_and_not_the_host_environment(emulated, tmp_path):
    runner = _runner(emulated, tmp_path, {"0": [0], "1": [0]}, cores=1)
    _submit_array(emulated, 2, {"CPB_OUTPUT": "results/env", "CPB_IMAGE_SETS_PER_JOB": "5", "CPB_VCPUS": "1"})
    with runner:
        runner.drain(timeout=120)
    env = json.loads((tmp_path / "1.1.env.json").read_text())
    assert env["AWS_BATCH_JOB_ARRAY_INDEX"] == "1" and env["AWS_BATCH_JOB_ATTEMPT"] == "1"
    assert env["AWS_BATCH_JOB_ID"].endswith(":1")
    assert env["AWS_ENDPOINT_URL"] == emulated.endpoint and env["CPB_VCPUS"] == "1"
    assert env["CPB_OUTPUT"] == "results/env" and env["CPB_IMAGE"]  # override + job definition environment
    assert "HOST_SECRET" not in env


@pytest.mark.hostile
def test_mapping_deletes_only_handled_messages_and_bad_ones_reach_the_dlq(emulated):
    from handlers import ingress
    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    s3.put_object(Bucket=emulated.bucket, Key="p/nuclei.cppipe", Body=b"CellProfiler Pipeline: x\nVersion:5\n")
    s3.put_object(Bucket=emulated.bucket, Key="plates/a/x.tif", Body=b"II*\x00")
    good = json.dumps({"pipeline": "p/nuclei.cppipe", "input": "plates/a", "output": "results/good"})
    sqs.send_message(QueueUrl=emulated.queue_url, MessageBody=good)
    sqs.send_message(QueueUrl=emulated.queue_url, MessageBody='{"pipeline": "p/nuclei.cppipe", "input": "plates/a"}')
    with environment({**emulated.lambda_env(), "POWERTOOLS_LOG_LEVEL": "CRITICAL"}):
        ingress.reset_services()
        report = localingress.pump(sqs, emulated.queue_url, ingress.handler, emulated.region, retry_failed_now=True)
        ingress.reset_services()
    assert len(report.deleted) == 1 and len(set(report.failures)) == 1
    assert len(report.failures) == 3  # received maxReceiveCount times, then moved to the DLQ by SQS
    dlq = sqs.receive_message(QueueUrl=emulated.dlq_url, MaxNumberOfMessages=10)["Messages"]
    assert [json.loads(m["Body"]).get("output") for m in dlq] == [None]
    jobs = [j for state in localbatch.ALL_STATES for j in boto3.client("batch").list_jobs(
        jobQueue=emulated.job_queue_arn, jobStatus=state)["jobSummaryList"]]
    assert len(jobs) == 1  # the good message, submitted once


def test_stop_kills_running_workers_and_their_children(emulated, tmp_path):
    script = tmp_path / "sleeper.py"
    pidfile = tmp_path / "child.pid"
    script.write_text("import subprocess, sys, time\n"
                      f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                      f"open({str(pidfile)!r}, 'w').write(str(p.pid))\ntime.sleep(60)\n")
    runner = _runner(emulated, tmp_path, {}, command=[sys.executable, str(script)])
    _submit_array(emulated, 2, {"CPB_IMAGE_SETS_PER_JOB": "1"})
    runner.start()
    deadline = time.monotonic() + 30
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    started = time.monotonic()
    runner.stop()
    assert time.monotonic() - started < 15
    assert all(o.status == "FAILED" for o in runner.outcomes) and len(runner.outcomes) == 2
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

