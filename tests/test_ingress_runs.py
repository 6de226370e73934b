"""Runs, output leases, reruns and races through the real ingress handler against moto (issue 11).

Each numbered case of issue 11 that lives in the Lambda is here, and fails on the code before the
lease (reruns on one output: 1; two messages at once: 2; a duplicate SendMessageBatch: 5; lists
left half submitted: 6; LoadData row ranges: 7), plus one test per refusal the lease brings.
`jobs_keep_running` keeps moto's Batch jobs RUNNING (moto's Docker-less Batch would finish them at
once) and `set_job_state` moves them on, as Batch would.
"""
from __future__ import annotations

import hashlib
import json
import time

import pytest

from handlers import ingress, submission
from ingress_moto import (BUCKET, DATA_FILE, PIPELINE, CallCounter, LambdaContext, SimulatedTimeout, crash_when,
                          environment, failed_ids, jobs_keep_running, lease, loaddata_pipeline, logs, message, moto_stack, redriven_record,
                          set_job_state, sqs_event, sqs_record)

__all__ = ["moto_stack", "logs", "jobs_keep_running"]  # fixtures, imported for pytest


def run_id_for(message_id: str, generation: int) -> str:
    """docs/CONTRACTS.md: the first 20 hex digits of sha256("<message identity>:<generation>")."""
    return hashlib.sha256(f"{message_id}:{generation}".encode()).hexdigest()[:20]


def run(*records: dict, remaining_s: float = 300.0) -> dict:
    return ingress.handler(sqs_event(*records), LambdaContext(remaining_s))


def run_later(*records: dict, seconds: float = 900.0) -> dict:
    """Deliver after `seconds` (SQS redelivers only after the visibility timeout: dead invocations' leases are over)."""
    later = time.time() + seconds
    return ingress.process_event(sqs_event(*records), LambdaContext(300, clock=lambda: later), ingress.services(),
                                 clock=lambda: later)


def live_jobs(stack, output: str) -> list:
    """Top-level jobs for `output` that were not terminated by a rollback."""
    return [j for j in stack.jobs() if environment(j)["CPB_OUTPUT"] == output
            and not str(j.get("statusReason", "")).startswith("cpb rollback")]


# ----------------------------------------------------------------------------- run ids

@pytest.mark.race
def test_every_job_carries_the_run_id_the_lease_names(moto_stack):
    record = sqs_record(json.dumps(message(output="results/p1", data_file=DATA_FILE, image_sets_per_job=3)))
    assert run(record) == {"batchItemFailures": []}
    [job] = moto_stack.jobs()
    env = environment(job)
    expected = run_id_for(record["messageId"], 0)
    assert env["CPB_RUN_ID"] == expected and job["tags"]["cpb:run-id"] == expected
    assert env["CPB_ARRAY_OFFSET"] == "0" and env["CPB_MEMORY_MIB"] == "4096" and env["CPB_RESUME"] == "1"
    current = lease("results/p1")
    assert current["run_id"] == expected and current["state"] == "submitted"
    assert current["message_id"] == record["messageId"] and current["previous_run_id"] is None
    assert current["jobs"] == [{"job_id": job["jobId"], "job_name": job["jobName"], "job_queue": moto_stack.queue_arn,
                                "array_size": 4, "array_offset": 0, "vcpus": 2, "memory_mib": 4096}]
    assert (current["array_size"], current["image_set_count"], current["image_sets_per_job"]) == (4, 10, 3)
    assert current["pipeline"] == PIPELINE and current["data_file"] == DATA_FILE and current["retries"] == []
    assert len(current["pipeline_sha256"]) == 64 and len(current["data_sha256"]) == 64
    assert current["owner"] is None and current["lease_until"] is None
    saved = moto_stack.record("results/p1", record["messageId"])
    assert saved["run_id"] == expected and [j["job_id"] for j in saved["jobs"]] == [job["jobId"]]


def test_resume_false_reaches_the_job(moto_stack):
    run(sqs_record(json.dumps(message(resume=False))))
    [job] = moto_stack.jobs()
    assert environment(job)["CPB_RESUME"] == "0"


# ----------------------------------------------------------------------------- issue 11, case 1: reruns

@pytest.mark.race
def test_rerun_while_the_first_run_is_unfinished_is_refused_naming_its_run_message_and_job(
        moto_stack, jobs_keep_running, logs):
    first = sqs_record(json.dumps(message(output="results/p1", data_file=DATA_FILE, image_sets_per_job=5)))
    assert run(first) == {"batchItemFailures": []}
    [job] = moto_stack.jobs()
    second = sqs_record(json.dumps(message(output="results/p1", data_file=DATA_FILE, image_sets_per_job=2)))
    assert failed_ids(run(second)) == [second["messageId"]]
    assert [j["jobId"] for j in moto_stack.jobs()] == [job["jobId"]]  # no second run on the output
    [line] = logs.failures()
    assert line["kind"] == "busy" and line["field"] == "output"
    assert line["reason"] == (f"output: results/p1 is in use by run {run_id_for(first['messageId'], 0)} of message "
                              f"{first['messageId']} (job {job['jobId']} RUNNING); wait for it to finish (cpb status "
                              "results/p1) or choose another output")
    assert lease("results/p1")["message_id"] == first["messageId"]  # the refused message changed nothing


@pytest.mark.race
@pytest.mark.parametrize("first_fields,second_fields", [
    (dict(data_file=DATA_FILE, image_sets_per_job=5), dict(data_file=DATA_FILE, image_sets_per_job=3)),  # split 2, then 4
    (dict(data_file=DATA_FILE, image_sets_per_job=5), dict()),  # an array run, then a plain job
])
def test_once_the_run_finished_a_new_message_replaces_it(moto_stack, jobs_keep_running, first_fields, second_fields):
    first = sqs_record(json.dumps(message(output="results/p1", **first_fields)))
    run(first)
    [old] = moto_stack.jobs()
    set_job_state(old["jobId"], "SUCCEEDED", children="SUCCEEDED")
    second = sqs_record(json.dumps(message(output="results/p1", **second_fields)))
    assert run(second) == {"batchItemFailures": []}
    new = [j for j in moto_stack.jobs() if j["jobId"] != old["jobId"]]
    assert len(new) == 1
    current = lease("results/p1")
    assert current["run_id"] == environment(new[0])["CPB_RUN_ID"] == run_id_for(second["messageId"], 0)
    assert current["previous_run_id"] == environment(old)["CPB_RUN_ID"]
    assert current["array_size"] == (4 if second_fields else None)  # the parts a reader may accept now


@pytest.mark.race
def test_a_failed_run_may_be_replaced_too(moto_stack, jobs_keep_running):
    run(sqs_record(json.dumps(message(output="results/p1"))))
    [old] = moto_stack.jobs()
    set_job_state(old["jobId"], "FAILED", exit_code=3)
    second = sqs_record(json.dumps(message(output="results/p1")))
    assert run(second) == {"batchItemFailures": []}
    assert lease("results/p1")["message_id"] == second["messageId"]


@pytest.mark.race
def test_an_unfinished_oom_retry_keeps_the_output_busy(moto_stack, jobs_keep_running, logs):
    """Finished means every job in `jobs` AND `retries`: a failed job whose retry still runs is not finished."""
    first = sqs_record(json.dumps(message(output="results/p1")))
    run(first)
    [old] = moto_stack.jobs()
    set_job_state(old["jobId"], "FAILED", exit_code=137)
    retry = moto_stack.batch.submit_job(jobName="p1-oom1", jobQueue=moto_stack.queue_arn,
                                        jobDefinition=moto_stack.jobdef_arn)["jobId"]
    current = lease("results/p1")
    current["retries"] = [{"job_id": retry, "replaces": old["jobId"], "array_index": None,
                           "reason": "OutOfMemoryError", "memory_mib": 8192, "by": "events", "at": "now"}]
    moto_stack.s3.put_object(Bucket=BUCKET, Key="results/p1/_cpb/lease.json", Body=json.dumps(current).encode())
    second = sqs_record(json.dumps(message(output="results/p1")))
    assert failed_ids(run(second)) == [second["messageId"]]
    assert f"(job {retry} RUNNING)" in logs.failures()[0]["reason"]


# ----------------------------------------------------------------------------- issue 11, case 2: at the same time

@pytest.mark.race
def test_two_messages_for_one_output_in_one_batch_start_one_run(moto_stack, jobs_keep_running, logs):
    a = sqs_record(json.dumps(message(output="results/p2", data_file=DATA_FILE, image_sets_per_job=5)))
    b = sqs_record(json.dumps(message(output="results/p2/", job_vcpu=4)))
    assert failed_ids(run(a, b)) == [b["messageId"]]
    [job] = moto_stack.jobs()
    assert environment(job)["CPB_MESSAGE_ID"] == a["messageId"]
    assert logs.failures()[0]["kind"] == "busy"


@pytest.mark.race
def test_a_message_arriving_while_another_is_mid_submission_waits_then_is_refused(moto_stack, jobs_keep_running):
    """Invocation A dies after SubmitJob and before recording it; B, delivered meanwhile, is deferred (A's lease
    is live), and once A's lease is over B finds A's job by its name in Batch: still running, so refused."""
    stop = crash_when(ingress.services().s3, "PutObject", lambda body: b'"state": "submitted"' in body)
    a = sqs_record(json.dumps(message(output="results/p3")))
    with pytest.raises(SimulatedTimeout):
        run(a, remaining_s=600)
    stop()
    [job] = moto_stack.jobs()
    assert lease("results/p3")["state"] == "pending"
    b = sqs_record(json.dumps(message(output="results/p3")))
    assert failed_ids(run(b)) == [b["messageId"]]  # deferred: A may still be running
    assert failed_ids(run_later(b)) == [b["messageId"]]  # A's job is RUNNING under A's run
    assert [j["jobId"] for j in moto_stack.jobs()] == [job["jobId"]]
    # A's redelivery records its job: one run, one job.
    assert run_later(sqs_record(a["body"], message_id=a["messageId"], receive_count=2)) == {"batchItemFailures": []}
    assert lease("results/p3")["state"] == "submitted" and lease("results/p3")["jobs"][0]["job_id"] == job["jobId"]
    assert [j["jobId"] for j in moto_stack.jobs()] == [job["jobId"]]


@pytest.mark.race
def test_an_abandoned_pending_lease_with_no_job_in_batch_is_replaced(moto_stack, jobs_keep_running):
    """A's invocation died before SubmitJob: nothing of its run exists, so B may take the output after A's lease."""
    stop = crash_when(ingress.services().batch_submit, "SubmitJob", lambda body: True)
    a = sqs_record(json.dumps(message(output="results/p4")))
    with pytest.raises(SimulatedTimeout):
        run(a, remaining_s=600)
    stop()
    b = sqs_record(json.dumps(message(output="results/p4")))
    assert run_later(b) == {"batchItemFailures": []}
    current = lease("results/p4")
    assert current["message_id"] == b["messageId"] and current["previous_run_id"] == run_id_for(a["messageId"], 0)
    # A, redelivered, now finds B's unfinished run on the output and is refused rather than running beside it.
    assert failed_ids(run_later(sqs_record(a["body"], message_id=a["messageId"], receive_count=2))) == [a["messageId"]]
    assert len(moto_stack.jobs()) == 1


# ----------------------------------------------------------------------------- issue 11, case 5: duplicate sends

@pytest.mark.race
def test_a_message_sqs_received_twice_with_one_client_token_is_one_job(moto_stack):
    """botocore retried SendMessageBatch after a 5xx that had taken effect: two SQS messages, one token."""
    body = json.dumps(message(output="results/dup", client_token="tok-0123456789abcdef"))
    first, again = sqs_record(body), sqs_record(body)
    assert run(first, again) == {"batchItemFailures": []}
    [job] = moto_stack.jobs()
    assert environment(job)["CPB_MESSAGE_ID"] == "tok-0123456789abcdef"
    assert lease("results/dup")["client_token"] == "tok-0123456789abcdef"
    # A third copy long after the job finished still adopts it.
    assert run_later(sqs_record(body)) == {"batchItemFailures": []}
    assert len(moto_stack.jobs()) == 1


@pytest.mark.race
def test_duplicate_sends_processed_by_two_invocations_at_once_submit_once(moto_stack):
    """Copy 1's invocation dies after SubmitJob; copy 2 waits for its lease, then adopts the job by name."""
    body = json.dumps([message(output="results/dup-a", client_token="tok-list-00000001"),
                       message(output="results/dup-b", client_token="tok-list-00000001")])
    stop = crash_when(ingress.services().s3, "PutObject", lambda b: b'"status": "submitted"' in b)
    with pytest.raises(SimulatedTimeout):
        run(sqs_record(body), remaining_s=600)
    stop()
    copy = sqs_record(body)
    assert failed_ids(run(copy)) == [copy["messageId"]]  # deferred while copy 1 may still be alive
    assert run_later(copy) == {"batchItemFailures": []}
    outputs = sorted(environment(j)["CPB_OUTPUT"] for j in moto_stack.jobs())
    assert outputs == ["results/dup-a", "results/dup-b"]
    assert moto_stack.record("results/dup-a", "tok-list-00000001#0")["adopted"] is True


@pytest.mark.race
def test_sqs_duplicate_send_message_batch_through_the_queue_is_one_job(moto_stack):
    """The same SendMessageBatch entries sent twice (what a retried 5xx does) through moto SQS and the event
    source mapping: one job, both messages deleted."""
    import boto3
    from cpb.local.mapping import pump
    sqs = boto3.client("sqs")
    url = sqs.create_queue(QueueName="cpb-dup", Attributes={"VisibilityTimeout": "360"})["QueueUrl"]
    entries = [{"Id": "0", "MessageBody": json.dumps(message(output="results/sent-twice",
                                                             client_token="tok-sent-twice-01"))}]
    ids = [sqs.send_message_batch(QueueUrl=url, Entries=entries)["Successful"][0]["MessageId"] for _ in range(2)]
    report = pump(sqs, url, ingress.handler, "us-east-1", batch_size=1, retry_failed_now=True)
    assert sorted(report.deleted) == sorted(ids) and len(moto_stack.jobs()) == 1


# ----------------------------------------------------------------------------- issue 11, case 6: half-submitted lists

@pytest.mark.race
def test_list_half_submitted_then_failing_is_rolled_back_and_a_dlq_redrive_submits_each_entry_once(
        moto_stack, jobs_keep_running, logs):
    entry1_data = "plates/p6/entry1.csv"
    moto_stack.put(entry1_data, b"Image_FileName_DNA\nd0.tif\nd1.tif\n")
    body = json.dumps([message(output="results/l0"), message(output="results/l1", data_file=entry1_data)])
    record = sqs_record(body)
    # Delivery 1 submits entry 0, then the invocation times out while submitting entry 1.
    stop = crash_when(ingress.services().batch_submit, "SubmitJob", lambda b: b"results/l1" in b)
    with pytest.raises(SimulatedTimeout):
        run(record, remaining_s=600)
    stop()
    [entry0] = moto_stack.jobs()
    moto_stack.s3.delete_object(Bucket=BUCKET, Key=entry1_data)  # entry 1 can no longer pass its checks
    # Delivery 2: entry 0 is not checked again; entry 1 fails for good, so entry 0 is rolled back.
    assert failed_ids(run_later(sqs_record(body, message_id=record["messageId"], receive_count=2))) == \
        [record["messageId"]]
    assert logs.failures()[-1]["field"] == "data_file" and logs.failures()[-1]["entry"] == 1
    assert moto_stack.record("results/l0", record["messageId"] + "#0")["status"] == "cancelled"
    assert lease("results/l0")["state"] == "cancelled"
    assert live_jobs(moto_stack, "results/l0") == []  # terminated: nothing half-done waits in the DLQ
    assert entry0["jobId"] in {j["jobId"] for j in moto_stack.jobs()}
    # The scientist restores the file and `cpb requeue --dlq` sends the message again (new SQS id).
    moto_stack.put(entry1_data, b"Image_FileName_DNA\nd0.tif\nd1.tif\n")
    assert run_later(redriven_record(body, record["messageId"])) == {"batchItemFailures": []}
    assert len(live_jobs(moto_stack, "results/l0")) == 1 and len(live_jobs(moto_stack, "results/l1")) == 1
    again = moto_stack.record("results/l0", record["messageId"] + "#0")
    assert again["status"] == "submitted" and again["generation"] == 1
    assert lease("results/l0")["run_id"] == run_id_for(record["messageId"] + "#0", 1)


@pytest.mark.race
def test_dlq_redrive_of_a_message_already_submitted_adopts_it(moto_stack):
    record = sqs_record(json.dumps([message(output="results/r0"), message(output="results/r1")]))
    run(record)
    svc = ingress.services()
    counter = CallCounter(svc.s3, svc.batch, svc.batch_submit)
    assert run(redriven_record(record["body"], record["messageId"])) == {"batchItemFailures": []}
    assert len(moto_stack.jobs()) == 2 and counter.counts == {"GetObject": 2}


@pytest.mark.race
def test_entries_already_submitted_are_not_checked_again(moto_stack, jobs_keep_running):
    """Delivery 1 submits entry 0 and dies; entry 0's pipeline is then deleted: delivery 2 still completes entry 1."""
    moto_stack.put("pipelines/only-once.cppipe", b"CellProfiler Pipeline: http://www.cellprofiler.org\n")
    body = json.dumps([message(output="results/c0", pipeline="pipelines/only-once.cppipe"),
                       message(output="results/c1")])
    record = sqs_record(body)
    stop = crash_when(ingress.services().batch_submit, "SubmitJob", lambda b: b"results/c1" in b)
    with pytest.raises(SimulatedTimeout):
        run(record, remaining_s=600)
    stop()
    moto_stack.s3.delete_object(Bucket=BUCKET, Key="pipelines/only-once.cppipe")
    assert run_later(sqs_record(body, message_id=record["messageId"], receive_count=2)) == {"batchItemFailures": []}
    assert sorted(environment(j)["CPB_OUTPUT"] for j in moto_stack.jobs()) == ["results/c0", "results/c1"]


@pytest.mark.race
def test_list_entry_refused_because_its_output_is_busy_submits_nothing(moto_stack, jobs_keep_running, logs):
    run(sqs_record(json.dumps(message(output="results/busy"))))
    record = sqs_record(json.dumps([message(output="results/free"), message(output="results/busy")]))
    assert failed_ids(run(record)) == [record["messageId"]]
    assert [environment(j)["CPB_OUTPUT"] for j in moto_stack.jobs()] == ["results/busy"]
    assert lease("results/free") is None
    assert logs.failures()[0]["entry"] == 1 and logs.failures()[0]["kind"] == "busy"


# ----------------------------------------------------------------------------- issue 11, case 7: row ranges

@pytest.mark.race
def test_loaddata_row_range_is_counted_as_the_worker_counts_it(moto_stack):
    moto_stack.put("pipelines/ranged.cppipe", loaddata_pipeline("3,8", ranged=True))
    record = sqs_record(json.dumps(message(pipeline="pipelines/ranged.cppipe", data_file=DATA_FILE,
                                           image_sets_per_job=2, output="results/ranged")))
    assert run(record) == {"batchItemFailures": []}
    [job] = moto_stack.jobs()
    assert environment(job)["CPB_IMAGE_SET_COUNT"] == "6"  # rows 3..8 of 10, as LoadData and the worker count
    assert job["arrayProperties"]["size"] == 3


def test_loaddata_without_a_range_counts_every_row(moto_stack):
    moto_stack.put("pipelines/all-rows.cppipe", loaddata_pipeline("3,8", ranged=False))
    run(sqs_record(json.dumps(message(pipeline="pipelines/all-rows.cppipe", data_file=DATA_FILE,
                                      image_sets_per_job=5))))
    [job] = moto_stack.jobs()
    assert environment(job)["CPB_IMAGE_SET_COUNT"] == "10" and job["arrayProperties"]["size"] == 2


@pytest.mark.race
def test_rows_beyond_the_range_end_are_counted_to_the_end_of_the_file(moto_stack):
    moto_stack.put("pipelines/tail.cppipe", loaddata_pipeline("7,500", ranged=True))
    run(sqs_record(json.dumps(message(pipeline="pipelines/tail.cppipe", data_file=DATA_FILE, image_sets_per_job=2))))
    [job] = moto_stack.jobs()
    assert environment(job)["CPB_IMAGE_SET_COUNT"] == "4" and job["arrayProperties"]["size"] == 2


# ----------------------------------------------------------------------------- runs wider than one array job

def test_array_chunks_stay_within_batch_limits():
    assert submission.array_chunks(None) == [(None, None)]
    assert submission.array_chunks(10_000) == [(0, 10_000)]
    assert submission.array_chunks(20_000) == [(0, 10_000), (10_000, 10_000)]
    chunks = submission.array_chunks(20_001)
    assert [size for _, size in chunks] == [6667, 6667, 6667] and [o for o, _ in chunks] == [0, 6667, 13334]
    for total in (10_001, 29_999, 100_000):
        chunks = submission.array_chunks(total)
        assert sum(size for _, size in chunks) == total and all(2 <= size <= 10_000 for _, size in chunks)
        assert all(chunks[k + 1][0] == chunks[k][0] + chunks[k][1] for k in range(len(chunks) - 1))


def test_a_run_wider_than_one_array_job_is_several_array_jobs_of_one_run(moto_stack, monkeypatch):
    monkeypatch.setattr(submission, "MAX_ARRAY_SIZE", 4)  # Batch's 10,000 scaled down to the 10-row data file
    record = sqs_record(json.dumps(message(output="results/wide", data_file=DATA_FILE, image_sets_per_job=1)))
    assert run(record) == {"batchItemFailures": []}
    jobs = moto_stack.jobs()
    envs = [environment(j) for j in jobs]
    assert [j["arrayProperties"]["size"] for j in jobs] == [4, 3, 3]
    assert [e["CPB_ARRAY_OFFSET"] for e in envs] == ["0", "4", "7"]
    assert {e["CPB_RUN_ID"] for e in envs} == {run_id_for(record["messageId"], 0)}
    assert len({j["jobName"] for j in jobs}) == 3
    current = lease("results/wide")
    assert current["array_size"] == 10
    assert [(j["array_offset"], j["array_size"]) for j in current["jobs"]] == [(0, 4), (4, 3), (7, 3)]
    # A redelivery adopts all three.
    assert run(sqs_record(record["body"], message_id=record["messageId"], receive_count=2)) == \
        {"batchItemFailures": []}
    assert len(moto_stack.jobs()) == 3


# ----------------------------------------------------------------------------- issue 10: counting without a data file

def test_image_sets_per_job_without_a_data_file_counted_by_file_rules(moto_stack):
    from ingress_moto import METADATA_PIPELINE
    moto_stack.put("pipelines/meta.cppipe", METADATA_PIPELINE.encode())
    for name in ["A01_s1_w1.tif", "A01_s1_w2.tif", "A01_s2_w1.tif", "A01_s2_w2.tif", "B02_s1_w1.tif",
                 "B02_s1_w2.tif", "sub/C03_s1_w1.tif", "sub/C03_s1_w2.tif", "D04_s1_w1.tif", "notes.txt"]:
        moto_stack.put(f"plates/meta/{name}", b"II*\x00")  # D04 lacks w2: no image set; notes.txt is no image
    record = sqs_record(json.dumps(message(pipeline="pipelines/meta.cppipe", input="plates/meta",
                                           image_sets_per_job=2, output="results/meta")))
    assert run(record) == {"batchItemFailures": []}
    [job] = moto_stack.jobs()
    env = environment(job)
    assert env["CPB_IMAGE_SET_COUNT"] == "4" and env["CPB_IMAGE_SETS_PER_JOB"] == "2" and "CPB_DATA_FILE" not in env
    assert job["arrayProperties"]["size"] == 2
    assert len(lease("results/meta")["data_sha256"]) == 64  # the input listing's digest


# ----------------------------------------------------------------------------- refusals under the output

def refusal(output: str, identity: str):
    from ingress_moto import BUCKET as bucket
    s3 = ingress.services().s3
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=f"{output}/_cpb/refusal-{identity}.json")["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def test_an_invalid_message_is_recorded_under_its_output_at_once(moto_stack, logs):
    """New-user review: a message sent with `aws sqs send-message` with a mistyped field (`job_vcpus`)
    is retried for ~30 minutes before reaching the DLQ, and meanwhile `cpb status <output>` could only
    say `no submission record yet`. The Lambda now writes why under the output's `_cpb/` on the first
    delivery (the message still fails: SQS retries it, then moves it to the DLQ, as the contract says)."""
    body = dict(message(output="results/typo"), job_vcpus=4)
    record = sqs_record(json.dumps(body), receive_count=1)
    assert failed_ids(run(record)) == [record["messageId"]]
    saved = refusal("results/typo", record["messageId"])
    assert saved is not None
    assert saved["kind"] == "invalid" and saved["field"] == "job_vcpus" and saved["entry"] is None
    assert saved["reason"] == "job_vcpus: is not a message field; did you mean 'job_vcpu'?"
    assert saved["message_id"] == record["messageId"] and saved["sqs_message_id"] == record["messageId"]
    assert saved["receive_count"] == 1 and saved["at"]
    again = sqs_record(json.dumps(body), message_id=record["messageId"], receive_count=2)
    assert failed_ids(run(again)) == [record["messageId"]]
    assert refusal("results/typo", record["messageId"])["receive_count"] == 2
    assert moto_stack.jobs() == [] and lease("results/typo") is None  # nothing else written


def test_a_refusal_is_recorded_only_under_an_output_that_is_valid_itself(moto_stack):
    for output in ("results/x/_cpb", "../up", "results/p/part-00001"):
        record = sqs_record(json.dumps(dict(message(output=output), job_vcpus=4)))
        assert failed_ids(run(record)) == [record["messageId"]]
    listed = moto_stack.s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    assert not [o["Key"] for o in listed if "/_cpb/refusal-" in o["Key"]]


def test_a_list_message_refused_is_recorded_under_each_valid_output_with_the_entry_identity(moto_stack):
    body = [message(output="results/l0", client_token="tok-list-0001"),
            message(output="results/l1", client_token="tok-list-0001", job_memory="lots")]
    record = sqs_record(json.dumps(body))
    assert failed_ids(run(record)) == [record["messageId"]]
    first, second = refusal("results/l0", "tok-list-0001_0"), refusal("results/l1", "tok-list-0001_1")
    assert first["message_id"] == "tok-list-0001#0" and second["message_id"] == "tok-list-0001#1"
    assert first["reason"] == second["reason"] and first["reason"].startswith("entry 1: job_memory:")


@pytest.mark.race
def test_a_message_for_an_output_in_use_is_recorded_as_waiting(moto_stack, jobs_keep_running):
    first = sqs_record(json.dumps(message(output="results/w")))
    assert run(first) == {"batchItemFailures": []}
    second = sqs_record(json.dumps(message(output="results/w")), receive_count=1)
    assert failed_ids(run(second)) == [second["messageId"]]
    saved = refusal("results/w", second["messageId"])
    assert saved["kind"] == "busy" and saved["field"] == "output"
    assert f"is in use by run {run_id_for(first['messageId'], 0)}" in saved["reason"]
