"""The ingress Lambda against moto S3 + Batch: seed messages, validation, fan-out, exactly-once, lists."""
from __future__ import annotations

import json
import re

import boto3
import pytest

from handlers import ingress
from ingress_moto import (BUCKET, DATA_FILE, JOB_NAME_RULE, PIPELINE, CallCounter,
                          LambdaContext, environment, failed_ids, lease, logs, message, moto_stack, resources,
                          sqs_event, sqs_record)

__all__ = ["moto_stack", "logs"]  # fixtures, imported for pytest


def run(*records: dict, remaining_s: float = 300.0) -> dict:
    return ingress.handler(sqs_event(*records), LambdaContext(remaining_s))


# ----------------------------------------------------------------------------- seed messages

def test_seed_single_object_with_numeric_strings(moto_stack):
    body = message(job_memory="8192", job_vcpu="12", output="results/seed-single/")
    record = sqs_record(json.dumps(body))
    assert run(record) == {"batchItemFailures": []}
    [job] = moto_stack.jobs()
    env = environment(job)
    assert env["CPB_BUCKET"] == BUCKET
    assert env["CPB_PIPELINE"] == PIPELINE
    assert env["CPB_INPUT"] == "examples/ExampleHuman/images"
    assert env["CPB_OUTPUT"] == "results/seed-single"  # trailing slash dropped, as the contract says
    assert env["CPB_VCPUS"] == "12"
    assert env["CPB_MESSAGE_ID"] == record["messageId"]
    assert "CPB_IMAGE_SETS_PER_JOB" not in env and "CPB_DATA_FILE" not in env
    assert resources(job["jobId"]) == {"VCPU": "12", "MEMORY": "8192"}
    assert job["tags"]["cpb:message-id"] == record["messageId"]
    assert job["tags"]["cpb:output"] == "results/seed-single"
    assert job["jobQueue"] == moto_stack.queue_arn
    assert job["jobDefinition"] == moto_stack.jobdef_arn
    assert re.match(JOB_NAME_RULE, job["jobName"]) and job["jobName"].startswith("results-seed-single-")
    saved = moto_stack.record("results/seed-single", record["messageId"])
    assert saved["status"] == "submitted" and saved["job_id"] == job["jobId"]


def test_seed_list_of_objects_gets_defaults_and_entry_ids(moto_stack):
    bodies = [message(output="results/list-a"), message(output="results/list-b", job_memory=16384, job_vcpu=4)]
    record = sqs_record(json.dumps(bodies))
    assert run(record) == {"batchItemFailures": []}
    jobs = {environment(j)["CPB_OUTPUT"]: j for j in moto_stack.jobs()}
    assert set(jobs) == {"results/list-a", "results/list-b"}
    assert environment(jobs["results/list-a"])["CPB_MESSAGE_ID"] == record["messageId"] + "#0"
    assert environment(jobs["results/list-b"])["CPB_MESSAGE_ID"] == record["messageId"] + "#1"
    assert resources(jobs["results/list-a"]["jobId"]) == {"VCPU": "2", "MEMORY": "4096"}  # stack defaults
    assert resources(jobs["results/list-b"]["jobId"]) == {"VCPU": "4", "MEMORY": "16384"}
    assert jobs["results/list-a"]["jobName"] != jobs["results/list-b"]["jobName"]
    assert moto_stack.record("results/list-b", record["messageId"] + "#1")["job_id"] == jobs["results/list-b"]["jobId"]


def test_seed_arns_own_and_allow_listed(moto_stack):
    own = message(job_definition=moto_stack.jobdef_arn, job_queue=moto_stack.queue_arn)
    allowed = message(job_queue=moto_stack.other_queue_arn)
    assert run(sqs_record(json.dumps(own)), sqs_record(json.dumps(allowed))) == {"batchItemFailures": []}
    assert [environment(j)["CPB_OUTPUT"] for j in moto_stack.jobs()] == [own["output"]]
    assert [environment(j)["CPB_OUTPUT"] for j in moto_stack.jobs(moto_stack.other_queue_arn)] == [allowed["output"]]


def test_every_job_is_tagged_with_its_stack_for_the_terminate_permission(moto_stack, monkeypatch):
    """The stack's IAM lets the ingress terminate (roll back) only jobs tagged `cpb:stack` = its stack."""
    monkeypatch.setenv("CPB_STACK", "dev")
    ingress.reset_services()
    run(sqs_record(json.dumps(message(data_file=DATA_FILE, image_sets_per_job=5))))
    [job] = moto_stack.jobs()
    assert job["tags"]["cpb:stack"] == "dev"


def test_job_name_is_readable_sanitised_and_unique(moto_stack):
    first = message(job_name="Plate 7 / Zellkern ä (rerun)!")
    second = message(job_name="Plate 7 / Zellkern ä (rerun)!")  # same name, other message
    run(sqs_record(json.dumps(first)), sqs_record(json.dumps(second)))
    names = [j["jobName"] for j in moto_stack.jobs()]
    assert len(set(names)) == 2
    for name in names:
        assert re.match(JOB_NAME_RULE, name)
        assert name.startswith("Plate-7-Zellkern-a-rerun-")


def test_long_job_name_is_cut_to_batch_limit(moto_stack):
    run(sqs_record(json.dumps(message(job_name="x" * 128))))
    [job] = moto_stack.jobs()
    assert len(job["jobName"]) <= 128 and re.match(JOB_NAME_RULE, job["jobName"])


# ----------------------------------------------------------------------------- fan-out

def test_image_sets_per_job_becomes_one_array_job_covering_every_set(moto_stack):
    record = sqs_record(json.dumps(message(data_file=DATA_FILE, image_sets_per_job=3, output="results/array")))
    assert run(record) == {"batchItemFailures": []}
    [job] = moto_stack.jobs()
    assert job["arrayProperties"]["size"] == 4  # 10 image sets in runs of 3: 3+3+3+1
    env = environment(job)
    assert env["CPB_IMAGE_SETS_PER_JOB"] == "3"
    assert env["CPB_IMAGE_SET_COUNT"] == "10"
    assert env["CPB_DATA_FILE"] == DATA_FILE
    assert moto_stack.record("results/array", record["messageId"])["array_size"] == 4
    # the data file version the Lambda counted: every child reads that one or fails (docs/CONTRACTS.md)
    counted = boto3.client("s3").head_object(Bucket=BUCKET, Key=DATA_FILE)["ETag"]
    assert env["CPB_DATA_FILE_ETAG"] == counted and lease("results/array")["data_etag"] == counted


def test_one_child_array_becomes_a_plain_job_with_the_full_range(moto_stack):
    run(sqs_record(json.dumps(message(data_file=DATA_FILE, image_sets_per_job=50))))
    [job] = moto_stack.jobs()
    assert "arrayProperties" not in job
    env = environment(job)
    assert env["CPB_IMAGE_SET_COUNT"] == "10" and "CPB_IMAGE_SETS_PER_JOB" not in env


@pytest.mark.hostile
def test_array_job_of_an_unsplittable_pipeline_is_refused_before_any_child_starts(moto_stack, logs):
    from pathlib import Path
    nuclei = (Path(__file__).resolve().parents[1] / "cpb" / "pipelines" / "nuclei.cppipe").read_text()
    assert "MeasureObjectSizeShape:[" in nuclei
    moto_stack.put("pipelines/tracking.cppipe", nuclei.replace("MeasureObjectSizeShape:[", "TrackObjects:[").encode())
    moto_stack.put("pipelines/nuclei.cppipe", nuclei.encode())
    bad = sqs_record(json.dumps(message(pipeline="pipelines/tracking.cppipe", data_file=DATA_FILE,
                                        image_sets_per_job=3)))
    good = sqs_record(json.dumps(message(pipeline="pipelines/nuclei.cppipe", data_file=DATA_FILE,
                                         image_sets_per_job=3)))
    assert failed_ids(run(bad, good)) == [bad["messageId"]]
    [job] = moto_stack.jobs()
    assert job["arrayProperties"]["size"] == 4
    [failure] = logs.failures()
    assert failure["field"] == "image_sets_per_job"
    assert "TrackObjects" in failure["reason"] and "remove image_sets_per_job" in failure["reason"]


def test_data_file_without_split_counts_sets_for_a_single_job(moto_stack):
    run(sqs_record(json.dumps(message(data_file=DATA_FILE, unsplittable=True))))
    [job] = moto_stack.jobs()
    env = environment(job)
    assert env["CPB_IMAGE_SET_COUNT"] == "10" and env["CPB_UNSPLITTABLE"] == "1"


# ----------------------------------------------------------------------------- validation

# Every invalid case of the issue (not JSON, missing/empty fields, wrong types, traversal, absolute
# paths, other buckets, memory/vCPU beyond the stack, foreign ARNs, missing pipeline, bad data file)
# is in the hostile corpus, sent through this handler between good messages by test_ingress_hostile.py.

@pytest.mark.hostile
def test_data_file_that_is_not_a_csv_is_rejected(moto_stack, logs):
    moto_stack.put("examples/plate.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    bad = sqs_record(json.dumps(message(data_file="examples/plate.csv", image_sets_per_job=2)))
    assert failed_ids(run(bad)) == [bad["messageId"]]
    assert moto_stack.jobs() == []
    assert logs.failures()[0]["field"] == "data_file"


# ----------------------------------------------------------------------------- exactly once

def test_redelivery_submits_nothing_new(moto_stack, logs):
    body = json.dumps([message(), message(data_file=DATA_FILE, image_sets_per_job=5)])
    record = sqs_record(body)
    run(record)
    first = [j["jobId"] for j in moto_stack.jobs()]
    assert len(first) == 2
    again = sqs_record(body, message_id=record["messageId"], receive_count=2)
    assert run(again) == {"batchItemFailures": []}
    assert [j["jobId"] for j in moto_stack.jobs()] == first
    submitted = [line for line in logs.lines if line["message"] == "jobs submitted"]
    assert [j["job_id"] for j in submitted[-1]["jobs"]] == first


def test_redelivery_after_inputs_were_deleted_is_still_done_not_failed(moto_stack):
    """Once submitted, a redelivery only reads the record: deleting the data file later does not make it fail."""
    record = sqs_record(json.dumps(message(data_file=DATA_FILE, image_sets_per_job=5)))
    run(record)
    moto_stack.s3.delete_object(Bucket=BUCKET, Key=DATA_FILE)
    moto_stack.s3.delete_object(Bucket=BUCKET, Key=PIPELINE)
    svc = ingress.services()
    counter = CallCounter(svc.s3, svc.batch, svc.batch_submit)
    assert run(sqs_record(record["body"], message_id=record["messageId"], receive_count=2)) == {"batchItemFailures": []}
    assert counter.counts == {"GetObject": 1}
    assert len(moto_stack.jobs()) == 1


def test_same_message_twice_in_one_batch_submits_once(moto_stack):
    record = sqs_record(json.dumps(message()))
    assert run(record, dict(record)) == {"batchItemFailures": []}
    assert len(moto_stack.jobs()) == 1


def test_same_body_with_new_message_id_is_a_new_job(moto_stack):
    """Idempotency is per SQS message, not per body: sending the same request again on purpose reruns it."""
    body = json.dumps(message(output="results/rerun"))
    run(sqs_record(body))
    run(sqs_record(body))
    assert len(moto_stack.jobs()) == 2


# ----------------------------------------------------------------------------- lists

@pytest.mark.hostile
def test_list_with_one_invalid_entry_submits_nothing(moto_stack, logs):
    record = sqs_record(json.dumps([message(), message(job_vcpu="lots"), message()]))
    good = sqs_record(json.dumps(message()))
    assert failed_ids(run(record, good)) == [record["messageId"]]
    assert len(moto_stack.jobs()) == 1  # only the good message's job
    [line] = logs.failures()
    assert line["entry"] == 1 and line["field"] == "job_vcpu" and line["reason"].startswith("entry 1: job_vcpu:")


@pytest.mark.hostile
def test_list_whose_later_entry_is_refused_by_batch_rolls_back(moto_stack, logs):
    """Entry 1 names an allow-listed queue that Batch no longer has: entry 0's job is terminated."""
    gone_queue = moto_stack.other_queue_arn
    moto_stack.batch.update_job_queue(jobQueue=gone_queue, state="DISABLED")
    moto_stack.batch.delete_job_queue(jobQueue=gone_queue)
    counter = CallCounter(ingress.services().batch)
    body = json.dumps([message(output="results/roll-a"), message(output="results/roll-b", job_queue=gone_queue)])
    record = sqs_record(body)
    assert failed_ids(run(record)) == [record["messageId"]]
    assert counter.counts.get("TerminateJob") == 1
    rolled = moto_stack.record("results/roll-a", record["messageId"] + "#0")
    assert rolled["status"] == "cancelled"
    [job] = moto_stack.batch.describe_jobs(jobs=[rolled["job_id"]])["jobs"]
    assert job["jobName"] == rolled["job_name"]
    assert logs.failures()[0]["kind"] == "aws"

    # Redelivered after the operator fixed the allow-list: every entry submitted afresh, once.
    moto_stack.batch.create_job_queue(jobQueueName="cpb-queue-allowed", state="ENABLED", priority=1,
                                      computeEnvironmentOrder=[{"order": 1, "computeEnvironment": "cpb-ce"}])
    assert run(sqs_record(body, message_id=record["messageId"], receive_count=2)) == {"batchItemFailures": []}
    resubmitted = moto_stack.record("results/roll-a", record["messageId"] + "#0")
    assert resubmitted["status"] == "submitted" and resubmitted["generation"] == 1
    assert resubmitted["job_id"] != rolled["job_id"] and resubmitted["job_name"] != rolled["job_name"]
    assert moto_stack.record("results/roll-b", record["messageId"] + "#1")["status"] == "submitted"


def test_aws_calls_per_message_are_few(moto_stack):
    """A plain message costs GetObject (record, pipeline, output lease), ListObjectsV2, PutObject x4 (record and
    lease, pending then submitted), ListJobs, SubmitJob."""
    svc = ingress.services()
    counter = CallCounter(svc.s3, svc.batch, svc.batch_submit)
    run(sqs_record(json.dumps(message())))
    assert counter.counts == {"ListObjectsV2": 1, "GetObject": 3, "PutObject": 4, "ListJobs": 1, "SubmitJob": 1}


def test_event_without_records_is_a_no_op(moto_stack):
    assert ingress.handler({}, LambdaContext()) == {"batchItemFailures": []}


def test_log_lines_carry_the_lambda_request_id(moto_stack, logs):
    context = LambdaContext()
    ingress.handler(sqs_event(sqs_record("{")), context)
    [line] = logs.failures()
    assert line["function_request_id"] == context.aws_request_id


def test_bad_lambda_environment_fails_the_invocation_with_a_reason(moto_stack, logs, monkeypatch):
    """Nothing is acknowledged: the whole batch comes back once the stack is fixed."""
    monkeypatch.setenv("CPB_MAX_VCPU", "many")
    with pytest.raises(ValueError, match="CPB_MAX_VCPU"):
        ingress.handler(sqs_event(sqs_record(json.dumps(message()))), LambdaContext())
    assert [line["message"] for line in logs.lines] == ["ingress misconfigured"]
    assert moto_stack.jobs() == []


def test_sdk_without_conditional_writes_is_refused_clearly(moto_stack):
    class Shape:
        members = {"Bucket": None, "Key": None, "Body": None}

    class Model:
        def operation_model(self, name):
            return type("Op", (), {"input_shape": Shape})()

    old_sdk = type("Client", (), {"meta": type("Meta", (), {"service_model": Model()})()})()
    with pytest.raises(RuntimeError, match="IfNoneMatch / IfMatch"):
        ingress.require_conditional_writes(old_sdk)
    ingress.require_conditional_writes(ingress.services().s3)  # this SDK has them
