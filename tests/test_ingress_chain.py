"""Chaining (`after`, issue 13) through the real ingress handler against moto.

An entry that waits for another output gets Batch `dependsOn` on that run's unfinished jobs
(nothing when it succeeded); no run, a failed or a cancelled run refuses it in one line. moto's
Batch records `dependsOn` exactly as submitted (`describe_jobs` echoes the list), which is what
these tests read back.
"""
from __future__ import annotations

import json

import pytest

from handlers import ingress
from ingress_moto import (BUCKET, DATA_FILE, LambdaContext, environment, failed_ids, jobs_keep_running, lease, logs,
                          message, moto_stack, set_job_state, sqs_event, sqs_record)

__all__ = ["moto_stack", "logs", "jobs_keep_running"]


def run(*records: dict) -> dict:
    return ingress.handler(sqs_event(*records), LambdaContext())


def by_output(stack) -> dict:
    return {environment(j)["CPB_OUTPUT"]: j for j in stack.jobs() if "CPB_OUTPUT" in environment(j)}


def test_illumination_then_analysis_in_one_message(moto_stack, jobs_keep_running):
    """The plate chain: the analysis ARRAY job depends on the plain illumination job of the same message."""
    body = json.dumps([
        message(output="results/P1/illum", unsplittable=True),
        message(output="results/P1/analysis", data_file=DATA_FILE, image_sets_per_job=4, after="results/P1/illum"),
    ])
    record = sqs_record(body)
    assert run(record) == {"batchItemFailures": []}
    jobs = by_output(moto_stack)
    illum, analysis = jobs["results/P1/illum"], jobs["results/P1/analysis"]
    assert analysis["dependsOn"] == [{"jobId": illum["jobId"]}] and illum["dependsOn"] == []
    assert analysis["arrayProperties"]["size"] == 3
    assert environment(analysis)["CPB_AFTER"] == "results/P1/illum"
    assert illum["createdAt"] <= analysis["createdAt"]  # submitted in order
    current = lease("results/P1/analysis")
    assert current["after"] == ["results/P1/illum"] and current["depends_on"] == [illum["jobId"]]
    saved = moto_stack.record("results/P1/analysis", record["messageId"] + "#1")
    assert saved["after"] == ["results/P1/illum"] and saved["depends_on"] == [illum["jobId"]]


def test_after_an_output_submitted_earlier_depends_on_its_unfinished_jobs(moto_stack, jobs_keep_running):
    run(sqs_record(json.dumps(message(output="results/P2/illum"))))
    [illum] = moto_stack.jobs()
    record = sqs_record(json.dumps(message(output="results/P2/analysis", after=["results/P2/illum"])))
    assert run(record) == {"batchItemFailures": []}
    assert by_output(moto_stack)["results/P2/analysis"]["dependsOn"] == [{"jobId": illum["jobId"]}]


def test_after_a_run_that_already_succeeded_needs_no_dependency(moto_stack):
    run(sqs_record(json.dumps(message(output="results/P3/illum"))))  # moto's Batch finishes it at once
    assert run(sqs_record(json.dumps(message(output="results/P3/analysis", after="results/P3/illum")))) == \
        {"batchItemFailures": []}
    analysis = by_output(moto_stack)["results/P3/analysis"]
    assert analysis["dependsOn"] == [] and lease("results/P3/analysis")["depends_on"] == []


def test_after_an_array_run_whose_failed_child_was_retried_successfully(moto_stack, jobs_keep_running):
    run(sqs_record(json.dumps(message(output="results/P4/illum", data_file=DATA_FILE, image_sets_per_job=5))))
    [parent] = moto_stack.jobs()
    set_job_state(parent["jobId"], "FAILED", children="SUCCEEDED")
    set_job_state(f"{parent['jobId']}:1", "FAILED", exit_code=137)
    retry = moto_stack.batch.submit_job(jobName="illum-oom1-1", jobQueue=moto_stack.queue_arn,
                                        jobDefinition=moto_stack.jobdef_arn)["jobId"]
    set_job_state(retry, "SUCCEEDED")
    current = lease("results/P4/illum")
    current["retries"] = [{"job_id": retry, "replaces": f"{parent['jobId']}:1", "array_index": 1,
                           "reason": "OutOfMemoryError", "memory_mib": 8192, "by": "events", "at": "now"}]
    moto_stack.s3.put_object(Bucket=BUCKET, Key="results/P4/illum/_cpb/lease.json", Body=json.dumps(current).encode())
    assert run(sqs_record(json.dumps(message(output="results/P4/analysis", after="results/P4/illum")))) == \
        {"batchItemFailures": []}
    assert by_output(moto_stack)["results/P4/analysis"]["dependsOn"] == []


# ----------------------------------------------------------------------------- refusals

@pytest.mark.hostile
def test_after_an_output_with_no_run_is_refused(moto_stack, logs):
    record = sqs_record(json.dumps(message(output="results/P5/analysis", after="results/P5/ilum")))
    assert failed_ids(run(record)) == [record["messageId"]]
    [line] = logs.failures()
    assert line["field"] == "after" and line["reason"].startswith("after: 'results/P5/ilum' has no run")
    assert moto_stack.jobs() == []


@pytest.mark.hostile
def test_after_a_failed_run_is_refused(moto_stack, jobs_keep_running, logs):
    run(sqs_record(json.dumps(message(output="results/P6/illum"))))
    [illum] = moto_stack.jobs()
    set_job_state(illum["jobId"], "FAILED", exit_code=3)
    record = sqs_record(json.dumps(message(output="results/P6/analysis", after="results/P6/illum")))
    assert failed_ids(run(record)) == [record["messageId"]]
    reason = logs.failures()[0]["reason"]
    assert reason.startswith("after: run ") and f"job {illum['jobId']} failed" in reason
    assert "cpb requeue results/P6/illum" in reason
    assert len(moto_stack.jobs()) == 1


@pytest.mark.hostile
def test_after_an_array_run_with_a_failed_child_is_refused_naming_the_part(moto_stack, jobs_keep_running, logs):
    run(sqs_record(json.dumps(message(output="results/P7/illum", data_file=DATA_FILE, image_sets_per_job=5))))
    [parent] = moto_stack.jobs()
    set_job_state(parent["jobId"], "FAILED", children="SUCCEEDED")
    set_job_state(f"{parent['jobId']}:1", "FAILED", exit_code=3)
    record = sqs_record(json.dumps(message(output="results/P7/analysis", after="results/P7/illum")))
    assert failed_ids(run(record)) == [record["messageId"]]
    assert f"part 1 (job {parent['jobId']}:1) failed" in logs.failures()[0]["reason"]


@pytest.mark.hostile
def test_after_a_cancelled_run_is_refused(moto_stack, logs):
    """A list whose second entry Batch refuses is rolled back: a later message waiting for its first output
    is refused (that run was cancelled)."""
    gone_queue = moto_stack.other_queue_arn
    moto_stack.batch.update_job_queue(jobQueue=gone_queue, state="DISABLED")
    moto_stack.batch.delete_job_queue(jobQueue=gone_queue)
    run(sqs_record(json.dumps([message(output="results/P8/illum"),
                               message(output="results/P8/other", job_queue=gone_queue)])))
    assert lease("results/P8/illum")["state"] == "cancelled"
    record = sqs_record(json.dumps(message(output="results/P8/analysis", after="results/P8/illum")))
    assert failed_ids(run(record)) == [record["messageId"]]
    assert logs.failures()[-1]["reason"].startswith("after: run ") and "was cancelled" in logs.failures()[-1]["reason"]


def test_after_an_upstream_being_submitted_right_now_waits(moto_stack, logs):
    """Another invocation holds the upstream's pending lease: retried later, not refused."""
    moto_stack.s3.put_object(Bucket=BUCKET, Key="results/P9/illum/_cpb/lease.json", Body=json.dumps({
        "run_id": "0" * 20, "message_id": "m-up", "state": "pending", "jobs": [], "retries": [],
        "lease_until": 4_102_444_800.0, "owner": "other-invocation"}).encode())
    record = sqs_record(json.dumps(message(output="results/P9/analysis", after="results/P9/illum")))
    assert failed_ids(run(record)) == [record["messageId"]]
    assert logs.failures()[0]["kind"] == "deferred"


@pytest.mark.hostile
def test_waiting_for_more_jobs_than_batch_allows_is_refused(moto_stack, jobs_keep_running, monkeypatch, logs):
    """Batch lets a job depend on at most 20 jobs; scaled down here: an upstream run of three array jobs
    (10 children, at most 4 per array job) against a limit of 2."""
    from handlers import submission
    monkeypatch.setattr(submission, "MAX_ARRAY_SIZE", 4)
    monkeypatch.setattr(ingress, "MAX_DEPENDS_ON", 2)
    run(sqs_record(json.dumps(message(output="results/P10/illum", data_file=DATA_FILE, image_sets_per_job=1))))
    assert len(moto_stack.jobs()) == 3
    record = sqs_record(json.dumps(message(output="results/P10/analysis", after="results/P10/illum")))
    assert failed_ids(run(record)) == [record["messageId"]]
    reason = logs.failures()[0]["reason"]
    assert reason.startswith("after: waits for 3 unfinished jobs (results/P10/illum), more than the 2")
    assert len(moto_stack.jobs()) == 3 and lease("results/P10/analysis") is None
