"""End to end through moto SQS: queue -> (event source mapping, played by `cpb.local.mapping.pump`) -> handler.

What a deployed stack does with a mixed stream of messages: good ones are
submitted exactly once and deleted, bad ones are retried `maxReceiveCount`
times and land in the dead-letter queue unchanged, and one whose submission
keeps being throttled on its first delivery (with the good messages that share
its invocation) gets through on a redelivery without a second copy.
"""
from __future__ import annotations

import json

import pytest

from cpb.local.mapping import pump
from handlers import ingress
from ingress_moto import DATA_FILE, FaultInjector, message, moto_stack

__all__ = ["moto_stack"]

MAX_RECEIVE = 3


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    from handlers import submission
    monkeypatch.setattr(submission, "SUBMIT_BACKOFF_BASE_S", 0.01)


@pytest.fixture
def queues(moto_stack):
    import boto3
    sqs = boto3.client("sqs")
    dlq = sqs.create_queue(QueueName="cpb-jobs-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    main = sqs.create_queue(QueueName="cpb-jobs", Attributes={
        "VisibilityTimeout": "360",
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(MAX_RECEIVE)})})["QueueUrl"]
    return sqs, main, dlq


def drain(sqs, url: str) -> list:
    bodies = []
    while True:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if not got:
            return bodies
        for item in got:
            bodies.append(item["Body"])
            sqs.delete_message(QueueUrl=url, ReceiptHandle=item["ReceiptHandle"])


@pytest.mark.fault
def test_mixed_stream_good_once_bad_to_dlq_throttled_on_redelivery(moto_stack, queues):
    sqs, main, dlq = queues
    good = [json.dumps(message(output=f"results/stream-{i}")) for i in range(5)]
    good.append(json.dumps([message(output="results/stream-list-a"), message(output="results/stream-list-b")]))
    good.append(json.dumps(message(output="results/stream-array", data_file=DATA_FILE, image_sets_per_job=3)))
    bad = ["{not json", json.dumps(message(job_vcpu="64000")), json.dumps(message(pipeline="examples/gone.cppipe"))]
    throttled_body = json.dumps(message(output="results/stream-throttled"))
    # The first delivery of the throttled message exhausts our SubmitJob retries; the next one goes through.
    fault = FaultInjector(ingress.services().batch_submit, "SubmitJob", status=429,
                          code="TooManyRequestsException", times=0)
    sent = {body: sqs.send_message(QueueUrl=main, MessageBody=body)["MessageId"]
            for body in [throttled_body] + good + bad}

    def handler(event, context):
        if any(r["body"] == throttled_body and r["attributes"].get("ApproximateReceiveCount") == "1"
               for r in event["Records"]):
            fault.remaining = 10_000  # refuse every SubmitJob during this invocation
        try:
            return ingress.handler(event, context)
        finally:
            fault.remaining = 0

    report = pump(sqs, main, handler, "us-east-1", batch_size=4, retry_failed_now=True)

    assert drain(sqs, main) == []
    assert sorted(drain(sqs, dlq)) == sorted(bad)  # unchanged bodies, nothing else
    jobs = moto_stack.jobs()
    outputs = sorted(next(e["value"] for e in j["container"]["environment"] if e["name"] == "CPB_OUTPUT") for j in jobs)
    expected = sorted([f"results/stream-{i}" for i in range(5)]
                      + ["results/stream-list-a", "results/stream-list-b", "results/stream-array",
                         "results/stream-throttled"])
    assert outputs == expected  # every good job once, the throttled one included
    assert sorted(report.deleted) == sorted(sent[body] for body in good + [throttled_body])  # each once
    for body in bad:
        assert report.failures.count(sent[body]) == MAX_RECEIVE
    assert sent[throttled_body] in report.failures  # its first delivery did fail
