"""The job-events Lambda (`handlers.events.handler`) against moto: fake out-of-memory failures of real jobs.

Jobs are submitted by the real ingress handler; `jobs_keep_running` holds them RUNNING and a test moves
one to FAILED as Batch would, then builds the EventBridge event Batch sends (its `detail` is the
DescribeJobs shape: here moto's own describe_jobs output, with the fields real Batch adds for a
failure: `arrayProperties.index` for a child, the exit code and reasons). Metrics are read from the
EMF lines Powertools prints.
"""
from __future__ import annotations

import json

import pytest

from handlers import events, ingress
from ingress_moto import (BUCKET, DATA_FILE, LambdaContext, environment, jobs_keep_running, lease, message,
                          moto_stack, resources, set_job_state, sqs_event, sqs_record)

__all__ = ["moto_stack", "jobs_keep_running"]

OOM_REASON = "OutOfMemoryError: Container killed due to memory usage"


@pytest.fixture
def stack(moto_stack, jobs_keep_running, monkeypatch):
    monkeypatch.setenv("CPB_STACK", "dev")
    monkeypatch.delenv("CPB_OOM_MAX_RETRIES", raising=False)
    monkeypatch.delenv("POWERTOOLS_SERVICE_NAME", raising=False)
    events.reset_services()
    yield moto_stack
    events.reset_services()


def submit(**fields) -> dict:
    record = sqs_record(json.dumps(message(**fields)))
    assert ingress.handler(sqs_event(record), LambdaContext()) == {"batchItemFailures": []}
    return record


def job_event(stack, job_id: str, status: str = "FAILED", *, exit_code=None, container_reason=None,
              status_reason="Essential container in task exited") -> dict:
    """The EventBridge event Batch sends when `job_id` reaches `status`."""
    set_job_state(job_id, status, exit_code=exit_code, reason=status_reason)
    [detail] = stack.batch.describe_jobs(jobs=[job_id])["jobs"]
    if ":" in job_id:  # real Batch describes a child with its index
        detail["arrayProperties"] = {"index": int(job_id.rsplit(":", 1)[1])}
    container = detail.setdefault("container", {})
    if exit_code is not None:
        container["exitCode"] = exit_code
    if container_reason:
        container["reason"] = container_reason
    return {"version": "0", "id": "evt-" + job_id, "detail-type": "Batch Job State Change", "source": "aws.batch",
            "account": "123456789012", "time": "2026-11-30T12:00:00Z", "region": "us-east-1",
            "resources": [detail.get("jobArn")], "detail": detail}


def emf(capsys) -> dict:
    """Metric name -> summed value over the EMF lines printed since the last call (and their dimensions)."""
    totals, dimensions = {}, set()
    for line in capsys.readouterr().out.splitlines():
        if '"_aws"' not in line:
            continue
        blob = json.loads(line)
        for directive in blob["_aws"]["CloudWatchMetrics"]:
            assert directive["Namespace"] == "CellPaintingBatch"
            dimensions |= {tuple(d) for d in directive["Dimensions"]}
            for metric in directive["Metrics"]:
                totals[metric["Name"]] = totals.get(metric["Name"], 0) + sum(
                    blob[metric["Name"]] if isinstance(blob[metric["Name"]], list) else [blob[metric["Name"]]])
        assert blob["Stack"] == "dev"
    assert dimensions <= {("Stack",)}, dimensions
    return totals


def handle(event: dict) -> dict:
    return events.handler(event, LambdaContext())


def jobs_named(stack, name: str) -> list:
    return [j for j in stack.jobs() if j["jobName"] == name]


def event_file(output: str, job_id: str) -> dict:
    import boto3
    body = boto3.client("s3").get_object(Bucket=BUCKET, Key=f"{output}/_cpb/events/{job_id}.json")["Body"].read()
    return json.loads(body)


# ----------------------------------------------------------------------------- array child out of memory

@pytest.mark.fault
def test_a_child_out_of_memory_is_retried_with_twice_the_memory_once_per_event(stack, capsys):
    submit(output="results/oom", data_file=DATA_FILE, image_sets_per_job=5)
    [parent] = stack.jobs()
    run_id = environment(parent)["CPB_RUN_ID"]
    capsys.readouterr()
    event = job_event(stack, f"{parent['jobId']}:1", exit_code=137, container_reason=OOM_REASON)
    done = handle(event)
    [retry] = jobs_named(stack, parent["jobName"] + "-oom1-1")
    assert done["jobs"][0]["retried_by"] == retry["jobId"]
    env = environment(retry)
    assert env["CPB_RUN_ID"] == run_id and env["CPB_OOM_RETRY"] == "1" and env["CPB_ARRAY_INDEX"] == "1"
    assert env["CPB_IMAGE_SETS_PER_JOB"] == "5" and "CPB_ARRAY_OFFSET" not in env
    assert env["CPB_DATA_FILE_ETAG"] and env["CPB_DATA_FILE_ETAG"] == environment(parent)["CPB_DATA_FILE_ETAG"]
    assert env["CPB_MEMORY_MIB"] == "8192" and resources(retry["jobId"]) == {"VCPU": "2", "MEMORY": "8192"}
    assert "arrayProperties" not in retry  # a plain job running part 1
    assert retry["tags"]["cpb:oom-retry"] == "1" and retry["tags"]["cpb:run-id"] == run_id
    assert retry["tags"]["cpb:stack"] == "dev"
    [entry] = lease("results/oom")["retries"]
    assert entry["job_id"] == retry["jobId"] and entry["replaces"] == f"{parent['jobId']}:1"
    assert (entry["array_index"], entry["memory_mib"], entry["previous_memory_mib"], entry["by"]) == (1, 8192, 4096,
                                                                                                    "events")
    assert entry["reason"].startswith("OutOfMemoryError")
    recorded = event_file("results/oom", f"{parent['jobId']}:1")
    assert recorded["status"] == "FAILED" and recorded["exit_code"] == 137 and recorded["array_index"] == 1
    assert recorded["run_id"] == run_id and recorded["memory_mib"] == 4096 and recorded["retried_by"] == retry["jobId"]
    assert emf(capsys) == {"JobsFailed": 1, "OutOfMemoryRetries": 1}

    # EventBridge delivers the same event again: nothing new starts, nothing is counted twice.
    assert handle(event)["jobs"][0]["retried_by"] == retry["jobId"]
    assert len(jobs_named(stack, parent["jobName"] + "-oom1-1")) == 1 and len(lease("results/oom")["retries"]) == 1
    assert emf(capsys) == {}


@pytest.mark.fault
def test_a_retry_that_runs_out_of_memory_again_doubles_again_then_stops(stack, monkeypatch, capsys):
    monkeypatch.setenv("CPB_MAX_MEMORY_MIB", "12000")
    submit(output="results/oom2", data_file=DATA_FILE, image_sets_per_job=5)
    [parent] = stack.jobs()
    handle(job_event(stack, f"{parent['jobId']}:0", exit_code=137))  # the worker's own 137: a process was killed
    [first] = jobs_named(stack, parent["jobName"] + "-oom1-0")
    handle(job_event(stack, first["jobId"], exit_code=137, container_reason=OOM_REASON))
    [second] = jobs_named(stack, parent["jobName"] + "-oom2-0")
    env = environment(second)
    assert env["CPB_MEMORY_MIB"] == "12000" and env["CPB_OOM_RETRY"] == "2" and env["CPB_ARRAY_INDEX"] == "0"
    retries = lease("results/oom2")["retries"]
    assert [(r["replaces"], r["memory_mib"]) for r in retries] == [(f"{parent['jobId']}:0", 8192),
                                                                  (first["jobId"], 12000)]
    capsys.readouterr()
    done = handle(job_event(stack, second["jobId"], exit_code=137, container_reason=OOM_REASON))
    assert done["jobs"][0]["retried_by"] is None  # CPB_OOM_MAX_RETRIES (2) reached
    assert len(stack.jobs()) == 3 and len(lease("results/oom2")["retries"]) == 2
    assert emf(capsys) == {"JobsFailed": 1}


# ----------------------------------------------------------------------------- plain jobs and what is not memory

@pytest.mark.fault
def test_a_plain_job_out_of_memory_is_retried_as_a_plain_job(stack):
    submit(output="results/plain-oom", job_memory=6000, job_vcpu=3)
    [job] = stack.jobs()
    handle(job_event(stack, job["jobId"], exit_code=137, container_reason=OOM_REASON))
    [retry] = jobs_named(stack, job["jobName"] + "-oom1")
    env = environment(retry)
    assert env["CPB_MEMORY_MIB"] == "12000" and "CPB_ARRAY_INDEX" not in env
    assert resources(retry["jobId"]) == {"VCPU": "3", "MEMORY": "12000"}
    assert lease("results/plain-oom")["retries"][0]["array_index"] is None


@pytest.mark.fault
@pytest.mark.parametrize("exit_code,container_reason,status_reason", [
    (137, None, "Job attempt duration exceeded timeout"),
    (137, None, "Host EC2 (instance i-0123456789abcdef0) terminated."),
    (137, None, "cpb rollback: entry failed"),
    (3, None, "Essential container in task exited"),
    (None, "CannotPullContainerError: pull access denied", "Task failed to start"),
])
def test_failures_that_are_not_memory_are_not_retried(stack, exit_code, container_reason, status_reason):
    submit(output="results/not-oom")
    [job] = stack.jobs()
    done = handle(job_event(stack, job["jobId"], exit_code=exit_code, container_reason=container_reason,
                            status_reason=status_reason))
    assert done["jobs"][0] == {"job_id": job["jobId"], "status": "FAILED", "output": "results/not-oom",
                               "retried_by": None, "out_of_memory": False}
    assert len(stack.jobs()) == 1 and lease("results/not-oom")["retries"] == []
    assert event_file("results/not-oom", job["jobId"])["status_reason"] == status_reason


@pytest.mark.fault
def test_out_of_memory_at_the_stacks_largest_memory_is_not_retried(stack):
    submit(output="results/max", job_memory=61440)
    [job] = stack.jobs()
    assert handle(job_event(stack, job["jobId"], exit_code=137, container_reason=OOM_REASON))["jobs"][0][
        "retried_by"] is None
    assert len(stack.jobs()) == 1


@pytest.mark.race
def test_out_of_memory_in_a_superseded_run_is_not_retried(stack):
    submit(output="results/moved-on")
    [old] = stack.jobs()
    set_job_state(old["jobId"], "SUCCEEDED")
    submit(output="results/moved-on")  # a new run replaced it
    event = job_event(stack, old["jobId"], exit_code=137, container_reason=OOM_REASON)
    assert handle(event)["jobs"][0]["retried_by"] is None
    assert len(stack.jobs()) == 2 and lease("results/moved-on")["retries"] == []


# ----------------------------------------------------------------------------- outcomes, parents, strangers

def test_a_success_is_recorded_and_counted_once(stack, capsys, monkeypatch):
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "cpb-events")  # must not add a `service` dimension (emf checks)
    submit(output="results/ok", data_file=DATA_FILE, image_sets_per_job=5)
    [parent] = stack.jobs()
    capsys.readouterr()
    event = job_event(stack, f"{parent['jobId']}:0", "SUCCEEDED", exit_code=0)
    handle(event)
    handle(event)
    assert event_file("results/ok", f"{parent['jobId']}:0")["status"] == "SUCCEEDED"
    assert emf(capsys) == {"JobsSucceeded": 1}
    handle(job_event(stack, parent["jobId"], "SUCCEEDED"))  # the parent: recorded, not counted (its children are)
    assert event_file("results/ok", parent["jobId"])["array_size"] == 2
    assert emf(capsys) == {}


@pytest.mark.fault
def test_a_failed_array_parent_retries_its_children_that_ran_out_of_memory(stack):
    """Without an event per child, the parent's FAILED event is enough: its failed children are looked up.
    (moto's describe_jobs of a child has no exit code or container reason, so child 3's memory failure
    is in its status reason, where Batch also reports `OutOfMemoryError`.)"""
    submit(output="results/parent", data_file=DATA_FILE, image_sets_per_job=2)
    [parent] = stack.jobs()
    set_job_state(f"{parent['jobId']}:3", "FAILED", exit_code=137)
    set_job_state(f"{parent['jobId']}:4", "FAILED", exit_code=3)
    for index in (0, 1, 2):
        set_job_state(f"{parent['jobId']}:{index}", "SUCCEEDED")
    from ingress_moto import moto_job
    moto_job(f"{parent['jobId']}:3").job_stopped_reason = OOM_REASON
    done = handle(job_event(stack, parent["jobId"], status_reason="Array Child Job failed"))
    assert [(j["job_id"], bool(j["retried_by"])) for j in done["jobs"]] == [
        (parent["jobId"], False), (f"{parent['jobId']}:3", True), (f"{parent['jobId']}:4", False)]
    [retry] = jobs_named(stack, parent["jobName"] + "-oom1-3")
    assert environment(retry)["CPB_ARRAY_INDEX"] == "3"
    assert event_file("results/parent", f"{parent['jobId']}:4")["array_index"] == 4


def test_jobs_of_other_stacks_and_other_events_are_ignored(stack):
    job = stack.batch.submit_job(jobName="someone-else", jobQueue=stack.queue_arn, jobDefinition=stack.jobdef_arn)
    assert handle(job_event(stack, job["jobId"], exit_code=137))["ignored"] == "not a cpb job of this stack"
    assert handle({"detail-type": "Scheduled Event", "detail": {}})["ignored"] == "not a Batch job state change"
    assert len(stack.jobs()) == 1


def test_out_of_memory_is_recognised_from_batch_reasons():
    assert events.out_of_memory({"container": {"exitCode": 137, "reason": OOM_REASON}})
    assert events.out_of_memory({"attempts": [{"container": {"exitCode": 137, "reason": OOM_REASON}}]})
    assert events.out_of_memory({"container": {"exitCode": 137}, "statusReason": events.CONTAINER_EXITED})
    assert not events.out_of_memory({"container": {"exitCode": 137}, "statusReason": "Job attempt duration exceeded timeout"})
    assert not events.out_of_memory({"container": {"exitCode": 1}, "statusReason": events.CONTAINER_EXITED})
    assert events.retry_name("results-p1-0123456789ab", 1, 7) == "results-p1-0123456789ab-oom1-7"
    assert events.retry_name("results-p1-0123456789ab-oom1-7", 2, 7) == "results-p1-0123456789ab-oom2-7"
    assert len(events.retry_name("x" * 128, 2, 9999)) <= 128


@pytest.mark.race
def test_a_child_handled_by_its_own_event_and_its_parents_at_once_is_retried_once(stack, monkeypatch):
    from handlers.submission import Submitter
    submit(output="results/twice", data_file=DATA_FILE, image_sets_per_job=5)
    [parent] = stack.jobs()
    child = job_event(stack, f"{parent['jobId']}:1", exit_code=137, container_reason=OOM_REASON)
    set_job_state(f"{parent['jobId']}:0", "SUCCEEDED")
    from ingress_moto import moto_job
    moto_job(f"{parent['jobId']}:1").job_stopped_reason = OOM_REASON
    parent_event = job_event(stack, parent["jobId"], status_reason="Array Child Job failed")
    original = Submitter._find_submitted
    interleaved = []

    def meanwhile_the_parent_event(self, queue, name):
        found = original(self, queue, name)
        if not interleaved:  # the other invocation runs between this one's look-up and its SubmitJob
            interleaved.append(parent_event)
            handle(parent_event)
        return found

    monkeypatch.setattr(Submitter, "_find_submitted", meanwhile_the_parent_event)
    done = handle(child)
    [retry] = jobs_named(stack, parent["jobName"] + "-oom1-1")
    assert done["jobs"][0]["retried_by"] == retry["jobId"]
    assert [r["job_id"] for r in lease("results/twice")["retries"]] == [retry["jobId"]]
    # the claim was the child's event file: it now names the retry, and the claim is gone from it
    recorded = event_file("results/twice", f"{parent['jobId']}:1")
    assert recorded["retried_by"] == retry["jobId"] and "retry_claim" not in recorded
    assert recorded["status"] == "FAILED" and recorded["array_index"] == 1


@pytest.mark.race
def test_an_invocation_that_finds_the_retry_claimed_and_submitted_adopts_it(stack, monkeypatch):
    """The other order: the child's invocation has submitted the retry but not yet recorded it in the
    lease when the parent's invocation handles the same child: it adopts the retry (named in the claim),
    records it once, and the child's invocation finds it recorded."""
    from handlers.lease import Leases
    submit(output="results/adopt", data_file=DATA_FILE, image_sets_per_job=5)
    [parent] = stack.jobs()
    child = job_event(stack, f"{parent['jobId']}:1", exit_code=137, container_reason=OOM_REASON)
    set_job_state(f"{parent['jobId']}:0", "SUCCEEDED")
    from ingress_moto import moto_job
    moto_job(f"{parent['jobId']}:1").job_stopped_reason = OOM_REASON
    parent_event = job_event(stack, parent["jobId"], status_reason="Array Child Job failed")
    original, parent_done = Leases.write, []

    def meanwhile_the_parent_event(self, output, body, etag, **kwargs):
        if not parent_done and body.get("retries"):  # the child's invocation is about to record its retry
            parent_done.append(None)
            parent_done[0] = handle(parent_event)
        return original(self, output, body, etag, **kwargs)

    monkeypatch.setattr(Leases, "write", meanwhile_the_parent_event)
    done = handle(child)
    [retry] = jobs_named(stack, parent["jobName"] + "-oom1-1")
    assert done["jobs"][0]["retried_by"] == retry["jobId"]
    assert [j["retried_by"] for j in parent_done[0]["jobs"]] == [None, retry["jobId"]]
    assert [r["job_id"] for r in lease("results/adopt")["retries"]] == [retry["jobId"]]


@pytest.mark.fault
def test_a_claim_whose_holder_died_before_submitting_is_taken_over(stack):
    """An invocation claimed the retry (the child's event file with `retry_claim`) and died (its Lambda
    timed out) before SubmitJob: once its claim has run out, the redelivered event takes it over and
    submits; a live claim of another invocation that has submitted nothing yet is left to it."""
    import boto3
    submit(output="results/dead", data_file=DATA_FILE, image_sets_per_job=5)
    [parent] = stack.jobs()
    child_id = f"{parent['jobId']}:1"
    event = job_event(stack, child_id, exit_code=137, container_reason=OOM_REASON)
    key = events.event_key("results/dead", child_id)
    s3 = boto3.client("s3")
    held = {"job_id": child_id, "status": "FAILED", "retried_by": None,
            "retry_claim": {"job_name": parent["jobName"] + "-oom1-1", "owner": "alive/1", "until": 4102444800.0}}
    s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(held).encode())  # live until the year 2100
    done = handle(event)
    assert done["jobs"][0]["retry_claimed_elsewhere"] and not jobs_named(stack, parent["jobName"] + "-oom1-1")
    assert event_file("results/dead", child_id) == held  # untouched: its holder finishes it
    held["retry_claim"].update(owner="dead/1", until=1.0)
    s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(held).encode())
    done = handle(event)
    [retry] = jobs_named(stack, parent["jobName"] + "-oom1-1")
    assert done["jobs"][0]["retried_by"] == retry["jobId"]
    assert event_file("results/dead", child_id)["retried_by"] == retry["jobId"]
    assert [r["job_id"] for r in lease("results/dead")["retries"]] == [retry["jobId"]]


@pytest.mark.fault
def test_a_refused_submit_releases_the_claim_so_the_redelivered_event_retries(stack, monkeypatch):
    from handlers.submission import Submitter
    submit(output="results/refused", data_file=DATA_FILE, image_sets_per_job=5)
    [parent] = stack.jobs()
    child_id = f"{parent['jobId']}:1"
    event = job_event(stack, child_id, exit_code=137, container_reason=OOM_REASON)
    original = Submitter.find_or_submit

    def refused(self, arguments, release=lambda: None):
        release()  # what find_or_submit does when SubmitJob certainly submitted nothing (e.g. a 4xx)
        raise RuntimeError("ClientException: refused")

    monkeypatch.setattr(Submitter, "find_or_submit", refused)
    with pytest.raises(RuntimeError):
        handle(event)
    assert event_file("results/refused", child_id)["retry_claim"]["until"] == 0
    monkeypatch.setattr(Submitter, "find_or_submit", original)
    retry = handle(event)["jobs"][0]["retried_by"]
    assert retry and [j["jobId"] for j in jobs_named(stack, parent["jobName"] + "-oom1-1")] == [retry]
