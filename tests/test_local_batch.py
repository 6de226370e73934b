"""The local Batch compute behaves as AWS Batch where `cpb local up` users and the Lambdas rely on it.

Fake workers (small Python scripts) stand in for the container so each Batch rule is checked in
seconds: dependsOn (whole jobs, N_TO_N, SEQUENTIAL; a failed dependency fails the dependent with
Batch's reason and nothing runs), packing jobs on the cores there are (a job asking more runs with
what there is and its log says so), the job definition's retry rules, timeouts, TerminateJob and
CancelJob, the container memory limit, and the "Batch Job State Change" events that reach the
job-events function with DescribeJobs' JobDetail.
"""
from __future__ import annotations

import json
import sys
import time

import boto3
import pytest

from cpb.local import batch as localbatch
from cpb.local.emulator import create_stack, environment, moto_server
from cpb.local.events import EventRule, matches, rule_pattern, state_change_event
from cpb.local.lambdas import LocalLambda
from cpb.local.settings import load_settings

# Records when it ran and with what; sleeps FAKE_SLEEP (FAKE_SLEEP_<array index>), then exits with FAKE_EXIT (both per job env).
WORKER = r"""
import json, os, sys, time
started = time.time()
index = os.environ.get("AWS_BATCH_JOB_ARRAY_INDEX", "")
time.sleep(float(os.environ.get("FAKE_SLEEP_" + index, os.environ.get("FAKE_SLEEP", "0"))))
if os.environ.get("FAKE_MEMORY_MIB"):
    hog = bytearray(int(os.environ["FAKE_MEMORY_MIB"]) * 2**20)
    for i in range(0, len(hog), 4096):
        hog[i] = 1
    time.sleep(30)
name = os.environ["AWS_BATCH_JOB_ID"].replace(":", "_") + "." + os.environ["AWS_BATCH_JOB_ATTEMPT"]
with open(os.path.join(os.environ["FAKE_DIR"], name + ".json"), "w") as f:
    json.dump({"env": dict(os.environ), "start": started, "end": time.time(),
               "cpus": sorted(os.sched_getaffinity(0))}, f)
print("fake worker done", flush=True)
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


@pytest.fixture
def stack():
    with moto_server() as url:
        stack = create_stack(url, load_settings(overrides=["jobRetryAttempts=2"], stack="lb"))
        with environment(stack.isolation_env()):
            yield stack


@pytest.fixture
def make_runner(stack, tmp_path):
    made = []

    def make(cores: int = 2) -> localbatch.LocalBatch:
        script = tmp_path / "worker.py"
        script.write_text(WORKER)
        runner = localbatch.LocalBatch(stack.job_queue_arn, stack.region,
                                       {**stack.aws_env(), "FAKE_DIR": str(tmp_path)}, tmp_path / "logs", cores=cores,
                                       command=[sys.executable, str(script)], stop_grace=1.0, poll=0.1)
        runner.attach()
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.stop()


@pytest.fixture
def runner(make_runner):
    return make_runner(2)


def submit(stack, name: str, env: dict | None = None, vcpus: int = 1, memory: int = 2048, **kwargs) -> str:
    overrides = {"environment": [{"name": k, "value": str(v)} for k, v in (env or {}).items()],
                 "resourceRequirements": [{"type": "VCPU", "value": str(vcpus)},
                                          {"type": "MEMORY", "value": str(memory)}]}
    return boto3.client("batch").submit_job(jobName=name, jobQueue=stack.job_queue_arn,
                                            jobDefinition=stack.job_definition_arn, containerOverrides=overrides,
                                            **kwargs)["jobId"]


def described(*job_ids: str) -> dict[str, dict]:
    return {j["jobId"]: j for j in boto3.client("batch").describe_jobs(jobs=list(job_ids))["jobs"]}


def ran(tmp_path, job_id: str, attempt: int = 1) -> dict:
    return json.loads((tmp_path / f"{job_id.replace(':', '_')}.{attempt}.json").read_text())


def test_a_job_waits_for_its_dependency_and_fails_with_batchs_reason_when_it_failed(stack, runner, tmp_path):
    first = submit(stack, "illum", {"FAKE_SLEEP": "1"})
    second = submit(stack, "analysis", dependsOn=[{"jobId": first}])
    bad = submit(stack, "broken", {"FAKE_EXIT": "3"})
    after_bad = submit(stack, "never", dependsOn=[{"jobId": bad}])
    array_after_bad = submit(stack, "never-array", dependsOn=[{"jobId": bad}], arrayProperties={"size": 2})
    assert described(second)[second]["status"] == "SUBMITTED"  # moto alone would say SUCCEEDED already
    runner.start()
    time.sleep(0.5)
    assert described(second)[second]["status"] == "PENDING"
    assert runner.wait_idle(60)
    jobs = described(first, second, bad, after_bad, array_after_bad, f"{array_after_bad}:0")
    assert jobs[first]["status"] == jobs[second]["status"] == "SUCCEEDED"
    assert ran(tmp_path, second)["start"] >= ran(tmp_path, first)["end"]  # it really waited
    for job_id in (after_bad, array_after_bad, f"{array_after_bad}:0"):
        assert (jobs[job_id]["status"], jobs[job_id]["statusReason"]) == ("FAILED", "Dependent Job failed")
        assert jobs[job_id]["attempts"] == [] and not (tmp_path / f"{job_id.replace(':', '_')}.1.json").exists()
    assert jobs[after_bad]["dependsOn"] == [{"jobId": bad}]


def test_n_to_n_and_sequential_array_dependencies(stack, make_runner, tmp_path):
    runner = make_runner(8)  # cores to spare: only the dependencies can make a job wait
    first = submit(stack, "illum", {"FAKE_SLEEP_0": "0.2", "FAKE_SLEEP_1": "3"}, arrayProperties={"size": 2})
    per_child = submit(stack, "per-child", arrayProperties={"size": 2},
                       dependsOn=[{"jobId": first, "type": "N_TO_N"}])
    chain = submit(stack, "chain", {"FAKE_SLEEP": "0.2"}, arrayProperties={"size": 3},
                   dependsOn=[{"type": "SEQUENTIAL"}])
    runner.start()
    assert runner.wait_idle(60)
    for index in (0, 1):
        assert ran(tmp_path, f"{per_child}:{index}")["start"] >= ran(tmp_path, f"{first}:{index}")["end"]
    assert ran(tmp_path, f"{per_child}:0")["end"] < ran(tmp_path, f"{first}:1")["end"]  # not the whole array
    starts = [ran(tmp_path, f"{chain}:{i}") for i in range(3)]
    assert starts[1]["start"] >= starts[0]["end"] and starts[2]["start"] >= starts[1]["end"]
    assert described(chain)[chain]["status"] == "SUCCEEDED"


def test_jobs_share_the_cores_and_a_job_asking_more_runs_with_what_there_is(stack, runner, tmp_path):
    big = submit(stack, "big", {"FAKE_SLEEP": "1", "CPB_VCPUS": "12"}, vcpus=12)
    small = [submit(stack, f"small{i}", {"FAKE_SLEEP": "1"}, vcpus=1) for i in range(2)]
    runner.start()
    assert runner.wait_idle(60)
    big_run, small_runs = ran(tmp_path, big), [ran(tmp_path, s) for s in small]
    assert big_run["env"]["CPB_VCPUS"] == "2" and len(big_run["cpus"]) == min(2, localbatch.machine_cores())
    assert all(s["start"] >= big_run["end"] - 0.05 for s in small_runs)  # 2 cores: big had them all
    assert abs(small_runs[0]["start"] - small_runs[1]["start"]) < 0.9  # two 1-vCPU jobs side by side
    if localbatch.machine_cores() >= 2:
        assert small_runs[0]["cpus"] != small_runs[1]["cpus"]  # each pinned to its own core
    log = next((tmp_path / "logs" / "jobs").glob("big.*.attempt1.log")).read_text()
    assert "this job asked for 12 vCPUs; this machine gives the local Batch 2 core(s), so it runs with 2" in log
    assert "fake worker done" in log


@pytest.mark.fault
def test_timeout_is_not_retried_and_terminate_and_cancel_stop_jobs(stack, runner, tmp_path):
    slow = submit(stack, "slow", {"FAKE_SLEEP": "30"}, timeout={"attemptDurationSeconds": 1})
    runner.start()
    assert runner.wait_idle(30)
    job = described(slow)[slow]
    assert (job["status"], job["statusReason"]) == ("FAILED", "Job attempt duration exceeded timeout")
    assert len(job["attempts"]) == 1 and job["container"]["exitCode"] == 143  # SIGTERM, as `docker stop`

    running = submit(stack, "running", {"FAKE_SLEEP": "30"}, vcpus=2)
    waiting = submit(stack, "waiting", {"FAKE_SLEEP": "30"}, dependsOn=[{"jobId": running}])
    deadline = time.monotonic() + 20
    while described(running)[running]["status"] != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.1)
    batch = boto3.client("batch")
    batch.cancel_job(jobId=waiting, reason="not needed any more")
    batch.terminate_job(jobId=running, reason="stopped by the scientist")
    assert runner.wait_idle(30)
    jobs = described(running, waiting)
    assert (jobs[running]["status"], jobs[running]["statusReason"]) == ("FAILED", "stopped by the scientist")
    assert (jobs[waiting]["status"], jobs[waiting]["statusReason"]) == ("FAILED", "not needed any more")
    assert len(jobs[running]["attempts"]) == 1  # terminated jobs are not retried


@pytest.mark.fault
def test_a_job_over_its_memory_is_killed_as_out_of_memory(stack, runner, tmp_path):
    hog = submit(stack, "hog", {"FAKE_MEMORY_MIB": "400"}, memory=200)
    roomy = submit(stack, "roomy", {"FAKE_MEMORY_MIB": "400", "FAKE_SLEEP": "0"}, memory=1000)
    runner.start()
    assert runner.wait_idle(90)
    jobs = described(hog, roomy)
    job = jobs[hog]
    assert job["status"] == "FAILED" and job["container"]["exitCode"] == 137
    assert job["container"]["reason"] == "OutOfMemoryError: Container killed due to memory usage"
    # The job definition no longer retries 137 (jobRetryAttempts=2 here): the same memory cannot help;
    # the job-events Lambda resubmits it with twice the memory instead (tests/test_e2e_oom.py).
    assert len(job["attempts"]) == 1
    from handlers.events import out_of_memory
    assert out_of_memory(job)  # what the job-events Lambda reads from this JobDetail: memory
    log = next((tmp_path / "logs" / "jobs").glob("hog.*.attempt1.log")).read_text()
    assert "of its 200 MiB: killed" in log
    # The same allocation within the job's memory runs to the end: the limit is the job's, not a fixed one.
    assert jobs[roomy]["status"] == "SUCCEEDED" and len(jobs[roomy]["attempts"]) == 1


def test_should_retry_follows_batchs_evaluate_on_exit():
    from components.jobdef import retry_strategy
    rules = retry_strategy(3)["evaluateOnExit"]
    assert localbatch.should_retry(rules, 4, "Essential container in task exited", "")
    assert localbatch.should_retry(rules, None, "Host EC2 (instance i-1) terminated.", "")
    assert localbatch.should_retry(rules, None, "Essential container in task exited",
                                   "CannotPullContainerError: pull access denied")
    for code in (2, 3, 5):
        assert not localbatch.should_retry(rules, code, "Essential container in task exited", "")
    # Out of memory is not retried with the same memory, whichever way Batch reports it: the worker's
    # own 137 (a CellProfiler process was killed) and the container's OutOfMemoryError.
    assert not localbatch.should_retry(rules, 137, "Essential container in task exited", "")
    assert not localbatch.should_retry(rules, 137, "Essential container in task exited",
                                       "OutOfMemoryError: Container killed due to memory usage")
    assert localbatch.should_retry([{"onExitCode": "3", "action": "EXIT"}], 4, "x", "")  # no rule matches: retry
    assert not localbatch.should_retry([{"onExitCode": "1*", "onReason": "Out*", "action": "exit"}], 137, "x",
                                       "OutOfMemoryError: Container killed")
    assert localbatch.should_retry([{"onExitCode": "1*", "onReason": "Out*", "action": "exit"}], 137, "x",
                                   "")  # every condition of a rule must match


def test_state_changes_reach_the_events_function_with_the_job_detail(stack, tmp_path):
    seen: list[dict] = []

    def handler(event, context):
        seen.append(event)
        if event["detail"]["jobName"] == "flaky" and sum(e["detail"]["jobName"] == "flaky" for e in seen) < 3:
            raise RuntimeError("not yet")  # EventBridge's async invocation retries twice
        if event["detail"]["jobName"] == "hopeless":
            raise RuntimeError("never")

    function = LocalLambda(stack.events_function, handler, stack.region, log_file=tmp_path / "events.log")
    rule = EventRule(stack.job_queue_arn, stack.region, function, sqs=boto3.client("sqs"),
                     dlq_url=stack.events_dlq_url, retry_delays=(0.05, 0.05)).start()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    runner = localbatch.LocalBatch(stack.job_queue_arn, stack.region, {**stack.aws_env(), "FAKE_DIR": str(tmp_path)},
                                   tmp_path / "logs", cores=2, command=[sys.executable, str(script)], poll=0.1,
                                   on_finished=rule.put)
    runner.attach()
    try:
        array = submit(stack, "plate", {"FAKE_EXIT": "0"}, arrayProperties={"size": 2})
        submit(stack, "flaky", memory=3000)
        submit(stack, "hopeless", {"FAKE_EXIT": "2"})
        runner.start()
        assert runner.wait_idle(60, also_busy=lambda: not rule.idle())
    finally:
        runner.stop()
        rule.stop()
    finals = {(e["detail"]["jobName"], (e["detail"].get("arrayProperties") or {}).get("index"),
               e["detail"]["status"]) for e in rule.events}
    assert finals == {("plate", 0, "SUCCEEDED"), ("plate", 1, "SUCCEEDED"), ("plate", None, "SUCCEEDED"),
                      ("flaky", None, "SUCCEEDED"), ("hopeless", None, "FAILED")}
    child = next(e for e in rule.events if e["detail"]["jobId"] == f"{array}:1")
    assert child["source"] == "aws.batch" and child["detail-type"] == "Batch Job State Change"
    assert child["resources"] == [child["detail"]["jobArn"]]
    detail = child["detail"]
    assert detail["jobQueue"] == stack.job_queue_arn and detail["container"]["exitCode"] == 0
    assert detail["attempts"][0]["container"]["logStreamName"].startswith("cpb/default/")
    assert detail["retryStrategy"]["attempts"] == 2 and detail["stoppedAt"] >= detail["startedAt"]
    flaky = next(e["detail"] for e in rule.events if e["detail"]["jobName"] == "flaky")
    assert {"type": "MEMORY", "value": "3000"} in flaky["container"]["resourceRequirements"]  # the submission's
    assert sum(e["detail"]["jobName"] == "flaky" for e in seen) == 3  # failed twice, delivered on the retry
    assert sum(e["detail"]["jobName"] == "hopeless" for e in seen) == 3
    parked = boto3.client("sqs").receive_message(QueueUrl=stack.events_dlq_url)["Messages"]
    assert [json.loads(m["Body"])["detail"]["jobName"] for m in parked] == ["hopeless"]
    assert "START RequestId" in (tmp_path / "events.log").read_text()


def test_the_rule_takes_final_states_of_its_own_queue_only():
    pattern = rule_pattern("arn:aws:batch:us-east-1:123456789012:job-queue/cpb-local-jobs")
    mine = {"jobQueue": "arn:aws:batch:us-east-1:123456789012:job-queue/cpb-local-jobs", "status": "FAILED"}
    assert matches(pattern, state_change_event(mine, "us-east-1"))
    assert not matches(pattern, state_change_event({**mine, "status": "RUNNING"}, "us-east-1"))
    assert not matches(pattern, state_change_event({**mine, "jobQueue": mine["jobQueue"] + "-other"}, "us-east-1"))
