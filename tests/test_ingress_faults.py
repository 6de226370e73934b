"""Injected AWS faults and Lambda timeouts: every message ends submitted exactly once or reported, never lost.

Faults are injected on the handler's own boto3 clients (see `ingress_moto.FaultInjector`):
the failing attempts never reach moto, the attempt that goes through is real.
"""
from __future__ import annotations

import json
import time

import pytest

from handlers import ingress, submission
from ingress_moto import (DATA_FILE, FaultInjector, LambdaContext, SimulatedTimeout, crash_when, failed_ids,
                          jobs_keep_running, message, moto_stack, sqs_event, sqs_record)

__all__ = ["moto_stack", "jobs_keep_running"]


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """Keep our own SubmitJob backoff short in tests (botocore's own backoff is left as is)."""
    monkeypatch.setattr(submission, "SUBMIT_BACKOFF_BASE_S", 0.01)


def run(*records, remaining_s: float = 300.0):
    return ingress.handler(sqs_event(*records), LambdaContext(remaining_s))


# ----------------------------------------------------------------------------- Batch faults on submit

@pytest.mark.fault
@pytest.mark.parametrize("status,code", [(429, "TooManyRequestsException"), (500, "ServerException"),
                                         (503, "ServiceUnavailableException")])
def test_submit_throttled_or_5xx_is_retried_to_one_job(moto_stack, status, code):
    fault = FaultInjector(ingress.services().batch_submit, "SubmitJob", status=status, code=code, times=3)
    record = sqs_record(json.dumps(message(output="results/throttled")))
    assert run(record) == {"batchItemFailures": []}
    assert fault.calls == 4  # three refused attempts, then the real one
    assert len(moto_stack.jobs()) == 1
    assert moto_stack.record("results/throttled", record["messageId"])["status"] == "submitted"


@pytest.mark.fault
def test_5xx_after_batch_created_the_job_does_not_submit_twice(moto_stack):
    """The response is lost but the job exists: the retry finds it by name instead of submitting again."""
    fault = FaultInjector(ingress.services().batch_submit, "SubmitJob", status=500, code="ServerException",
                          times=1, executed=True)
    record = sqs_record(json.dumps(message(output="results/lost-answer")))
    assert run(record) == {"batchItemFailures": []}
    assert fault.calls == 1
    [job] = moto_stack.jobs()
    saved = moto_stack.record("results/lost-answer", record["messageId"])
    assert saved["job_id"] == job["jobId"] and saved["adopted"] is True


@pytest.mark.fault
def test_throttling_that_never_ends_is_a_batch_item_failure_then_redelivery_submits_once(moto_stack):
    batch = ingress.services().batch_submit
    fault = FaultInjector(batch, "SubmitJob", status=429, code="TooManyRequestsException", times=10_000)
    record, other = sqs_record(json.dumps(message(output="results/stuck"))), sqs_record("not json")
    assert sorted(failed_ids(run(record, other))) == sorted([record["messageId"], other["messageId"]])
    assert fault.calls == submission.Submitter.submit_attempts
    assert moto_stack.jobs() == []
    pending = moto_stack.record("results/stuck", record["messageId"])
    assert pending["status"] == "pending" and pending["lease_until"] == 0  # released: nothing was submitted
    fault.remove()
    again = sqs_record(record["body"], message_id=record["messageId"], receive_count=2)
    assert run(again) == {"batchItemFailures": []}
    assert len(moto_stack.jobs()) == 1


@pytest.mark.fault
def test_batch_throttling_on_list_jobs_is_retried_by_botocore(moto_stack):
    fault = FaultInjector(ingress.services().batch, "ListJobs", status=429, code="TooManyRequestsException", times=2)
    assert run(sqs_record(json.dumps(message()))) == {"batchItemFailures": []}
    assert fault.calls == 3 and len(moto_stack.jobs()) == 1


@pytest.mark.fault
def test_s3_slowdown_on_record_write_is_retried(moto_stack):
    fault = FaultInjector(ingress.services().s3, "PutObject", status=503, code="SlowDown", times=2)
    record = sqs_record(json.dumps(message(output="results/slow")))
    assert run(record) == {"batchItemFailures": []}
    assert fault.calls == 6  # record pending (2 refused + 1), lease pending, lease and record submitted
    assert moto_stack.record("results/slow", record["messageId"])["status"] == "submitted"
    assert len(moto_stack.jobs()) == 1


@pytest.mark.fault
def test_s3_outage_during_checks_fails_only_that_message(moto_stack):
    fault = FaultInjector(ingress.services().s3, "GetObject", status=500, code="InternalError", times=5)
    array = sqs_record(json.dumps(message(data_file=DATA_FILE, image_sets_per_job=2)))  # reads the CSV: fails
    assert failed_ids(run(array)) == [array["messageId"]]
    assert fault.calls == 5 and moto_stack.jobs() == []


# ----------------------------------------------------------------------------- Lambda timeouts

@pytest.mark.fault
def test_timeout_between_submit_and_record_then_redelivery_adopts_the_job(moto_stack):
    """The crash window: Batch has the job, the record still says pending."""
    stop = crash_when(ingress.services().s3, "PutObject", lambda body: b'"status": "submitted"' in body)
    body = json.dumps(message(output="results/crash", data_file=DATA_FILE, image_sets_per_job=4))
    record = sqs_record(body)
    with pytest.raises(SimulatedTimeout):
        run(record, remaining_s=60)
    stop()
    [job] = moto_stack.jobs()
    assert moto_stack.record("results/crash", record["messageId"])["status"] == "pending"

    # SQS redelivers only after the visibility timeout (>= the Lambda timeout): by then the lease is over.
    later = time.time() + 120
    response = ingress.process_event(sqs_event(sqs_record(body, message_id=record["messageId"], receive_count=2)),
                                     LambdaContext(300, clock=lambda: later), ingress.services(),
                                     clock=lambda: later)
    assert response == {"batchItemFailures": []}
    assert [j["jobId"] for j in moto_stack.jobs()] == [job["jobId"]]
    saved = moto_stack.record("results/crash", record["messageId"])
    assert saved["status"] == "submitted" and saved["job_id"] == job["jobId"] and saved["adopted"] is True


@pytest.mark.fault
def test_early_redelivery_while_the_first_invocation_may_still_run_waits(moto_stack):
    stop = crash_when(ingress.services().s3, "PutObject", lambda body: b'"status": "submitted"' in body)
    record = sqs_record(json.dumps(message(output="results/overlap")))
    with pytest.raises(SimulatedTimeout):
        run(record, remaining_s=600)
    stop()
    again = sqs_record(record["body"], message_id=record["messageId"], receive_count=2)
    assert failed_ids(run(again)) == [record["messageId"]]  # lease still live: deferred, not duplicated
    assert len(moto_stack.jobs()) == 1


@pytest.mark.fault
def test_timeout_before_submit_then_redelivery_submits_once(moto_stack):
    stop = crash_when(ingress.services().batch_submit, "SubmitJob", lambda body: True)
    record = sqs_record(json.dumps(message(output="results/early-crash")))
    with pytest.raises(SimulatedTimeout):
        run(record, remaining_s=60)
    stop()
    assert moto_stack.jobs() == []
    later = time.time() + 120
    ingress.process_event(sqs_event(sqs_record(record["body"], message_id=record["messageId"], receive_count=2)),
                          LambdaContext(300, clock=lambda: later), ingress.services(), clock=lambda: later)
    assert len(moto_stack.jobs()) == 1


@pytest.mark.fault
def test_too_little_time_left_reports_every_message_unsubmitted(moto_stack):
    records = [sqs_record(json.dumps(message())) for _ in range(3)]
    response = run(*records, remaining_s=ingress.MESSAGE_MARGIN_S - 1)
    assert failed_ids(response) == [r["messageId"] for r in records]
    assert moto_stack.jobs() == []


@pytest.mark.fault
def test_time_running_out_mid_batch_loses_nothing(moto_stack):
    """A clock racing ahead: each message is either submitted and recorded, or a batch item failure."""
    now = [time.time()]

    def clock() -> float:
        now[0] += 2.0
        return now[0]

    records = [sqs_record(json.dumps(message(output=f"results/race-{i}"))) for i in range(8)]
    response = ingress.process_event(sqs_event(*records), LambdaContext(80, clock=clock), ingress.services(),
                                     clock=clock)
    failed = set(failed_ids(response))
    submitted = {job["tags"]["cpb:message-id"] for job in moto_stack.jobs()}
    assert failed and submitted  # the budget ran out part way
    assert failed | submitted == {r["messageId"] for r in records}
    assert not failed & submitted  # a job, once submitted, is always recorded before the budget check
    # SQS redelivers the failed ones later: every message ends with exactly one job.
    ingress.handler(sqs_event(*[sqs_record(r["body"], message_id=r["messageId"], receive_count=2)
                                for r in records if r["messageId"] in failed]), LambdaContext(300))
    tags = [job["tags"]["cpb:message-id"] for job in moto_stack.jobs()]
    assert sorted(tags) == sorted(r["messageId"] for r in records)


@pytest.mark.fault
def test_no_bucket_check_starts_once_the_budget_is_spent(moto_stack):
    """S3 answering slowly (each call costs 20 s of the invocation): every AWS call, the checks of each
    entry included, starts with at least CALL_MARGIN_S left, and the message is deferred, not lost."""
    now = [time.time()]
    remaining_at_call = []
    svc = ingress.services()
    deadline = now[0] + 80

    def slow_s3(**_):
        remaining_at_call.append(deadline - now[0])
        now[0] += 20.0

    svc.s3.meta.events.register("before-call.s3.*", slow_s3)
    svc.batch.meta.events.register("before-call.batch.*", lambda **_: remaining_at_call.append(deadline - now[0]))
    try:
        body = json.dumps([message(data_file=DATA_FILE, output=f"results/slow-{i}") for i in range(3)])
        record = sqs_record(body)
        response = ingress.process_event(sqs_event(record), LambdaContext(80, clock=lambda: now[0]), svc,
                                         clock=lambda: now[0])
    finally:
        svc.s3.meta.events.unregister("before-call.s3.*", slow_s3)
    assert failed_ids(response) == [record["messageId"]]
    assert remaining_at_call and min(remaining_at_call) >= ingress.CALL_MARGIN_S
    assert moto_stack.jobs() == []
    assert run(sqs_record(body, message_id=record["messageId"], receive_count=2)) == {"batchItemFailures": []}
    assert len(moto_stack.jobs()) == 3


@pytest.mark.race
def test_a_redelivery_after_its_run_was_replaced_never_takes_the_output_back(moto_stack, jobs_keep_running):
    """Adversary: message 1's invocation dies right after SubmitJob (lease still `pending`). Its job
    runs and succeeds; message 2 for the same output finds the abandoned lease, sees the job by name
    finished, and replaces the run; its run succeeds too. Then SQS redelivers message 1: it took the
    output back, adopting its old finished job by name, so the lease named a run whose records were
    gone (replaced by run 2's): cpb status said FAILED and cpb results refused run 2's complete
    results, with nothing left running to fix it."""
    from ingress_moto import lease, set_job_state
    stop = crash_when(ingress.services().s3, "PutObject", lambda body: b'"state": "submitted"' in body)
    first = sqs_record(json.dumps(message(output="results/ghost")))
    with pytest.raises(SimulatedTimeout):
        run(first, remaining_s=60)
    stop()
    [job1] = moto_stack.jobs()
    set_job_state(job1["jobId"], "SUCCEEDED")

    def at(offset, *records):
        moment = time.time() + offset
        return ingress.process_event(sqs_event(*records), LambdaContext(300, clock=lambda: moment),
                                     ingress.services(), clock=lambda: moment)

    second = sqs_record(json.dumps(message(output="results/ghost")))
    assert at(120, second) == {"batchItemFailures": []}
    [job2] = [j for j in moto_stack.jobs() if j["jobId"] != job1["jobId"]]
    set_job_state(job2["jobId"], "SUCCEEDED")
    run2 = lease("results/ghost")["run_id"]
    assert at(400, sqs_record(first["body"], message_id=first["messageId"], receive_count=2)) == {
        "batchItemFailures": []}  # done with: its job ran, its run was replaced since
    assert lease("results/ghost")["run_id"] == run2 and lease("results/ghost")["message_id"] == second["messageId"]
    assert len(moto_stack.jobs()) == 2
    saved = moto_stack.record("results/ghost", first["messageId"])
    assert saved["status"] == "submitted" and saved["job_id"] == job1["jobId"] and saved["adopted"] is True
