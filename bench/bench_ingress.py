"""Ingress Lambda throughput against moto: messages per second and AWS calls per message.

Run: `python bench/bench_ingress.py` (< 60 s). Drives the real handler
(`handlers.ingress.handler`) with SQS batches of 10 against in-process moto
S3 + Batch and counts every AWS API call the handler's clients make (botocore
`before-call` events). Absolute rates measure moto more than the handler, so
the figures to compare are the ratios printed at the end: calls per message
per kind of message, and what a redelivery costs relative to a first delivery.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "ERROR")  # one JSON line per message would swamp the output
os.environ["AWS_DEFAULT_REGION"] = os.environ["AWS_REGION"] = "us-east-1"
os.environ.pop("AWS_ENDPOINT_URL", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3  # noqa: E402
from moto import mock_aws  # noqa: E402

from handlers import ingress  # noqa: E402

BUCKET = "cpb-bench-data"
PIPELINE = "pipelines/bench.cppipe"
DATA_FILE = "plates/p1/load_data.csv"
BATCH_SIZE = 10  # the SQS event source mapping's default batch size


class Context:
    aws_request_id = "bench"
    function_name = "cpb-ingress"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:cpb-ingress"

    def get_remaining_time_in_millis(self) -> int:
        return 300_000


class Calls:
    """AWS calls made through the given clients, by operation."""

    def __init__(self, *clients) -> None:
        self.counts: dict = {}
        for client in clients:
            client.meta.events.register("before-call.*.*", self._count)

    def _count(self, model, **_) -> None:
        self.counts[model.name] = self.counts.get(model.name, 0) + 1

    def take(self) -> dict:
        counts, self.counts = self.counts, {}
        return counts


def build_stack() -> dict:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=PIPELINE, Body=b"CellProfiler Pipeline: http://www.cellprofiler.org\n")
    s3.put_object(Bucket=BUCKET, Key="plates/p1/images/d0.tif", Body=b"II*\x00")
    s3.put_object(Bucket=BUCKET, Key=DATA_FILE, Body=b"Image_FileName_DNA\n" + b"".join(
        b"d%d.tif\n" % i for i in range(384)))  # one 384-well plate
    role = boto3.client("iam").create_role(RoleName="bench", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    batch = boto3.client("batch")
    ce = batch.create_compute_environment(computeEnvironmentName="bench", type="UNMANAGED", state="ENABLED",
                                          serviceRole=role)["computeEnvironmentArn"]
    queue = batch.create_job_queue(jobQueueName="bench", state="ENABLED", priority=1,
                                   computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce}])["jobQueueArn"]
    jobdef = batch.register_job_definition(jobDefinitionName="bench", type="container", containerProperties={
        "image": "cellprofiler/cellprofiler:4.2.8", "resourceRequirements": [
            {"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "2048"}]})["jobDefinitionArn"]
    return {"CPB_BUCKET": BUCKET, "CPB_JOB_QUEUE": queue, "CPB_JOB_DEFINITION": jobdef, "CPB_MAX_VCPU": "16",
            "CPB_MAX_MEMORY_MIB": "61440"}


def body(kind: str) -> str:
    def one() -> dict:
        return {"pipeline": PIPELINE, "input": "plates/p1/images", "output": f"results/{uuid.uuid4().hex}"}
    if kind == "single":
        return json.dumps(one())
    if kind == "array":
        return json.dumps({**one(), "data_file": DATA_FILE, "image_sets_per_job": 16})  # 24 children
    if kind == "list of 3":
        return json.dumps([one(), one(), one()])
    if kind == "invalid":
        return json.dumps({**one(), "job_vcpu": "many"})
    raise ValueError(kind)


def records(kind: str, count: int) -> list:
    return [{"messageId": str(uuid.uuid4()), "receiptHandle": "x", "body": body(kind),
             "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {}, "eventSource": "aws:sqs"}
            for _ in range(count)]


def drive(all_records: list, calls: Calls) -> tuple:
    """Send the records in SQS-sized batches; return (seconds, calls by operation, failures)."""
    failures = 0
    start = time.perf_counter()
    for i in range(0, len(all_records), BATCH_SIZE):
        response = ingress.handler({"Records": all_records[i:i + BATCH_SIZE]}, Context())
        failures += len(response["batchItemFailures"])
    return time.perf_counter() - start, calls.take(), failures


def main() -> None:
    messages = 60
    rows = []
    with mock_aws(config={"batch": {"use_docker": False}}):
        os.environ.update(build_stack())
        ingress.reset_services()
        svc = ingress.services()
        calls = Calls(svc.s3, svc.batch, svc.batch_submit)
        for kind in ("single", "array", "list of 3", "invalid"):
            batch = records(kind, messages)
            seconds, counts, failures = drive(batch, calls)
            rows.append((kind, messages, seconds, counts, failures))
            if kind != "invalid":
                redelivered = [dict(r, attributes={"ApproximateReceiveCount": "2"}) for r in batch]
                seconds, counts, failures = drive(redelivered, calls)
                rows.append((f"{kind}, redelivered", messages, seconds, counts, failures))
        jobs = svc.batch.list_jobs(jobQueue=os.environ["CPB_JOB_QUEUE"],
                                   filters=[{"name": "JOB_NAME", "values": ["*"]}])["jobSummaryList"]
        parents = sum(1 for j in jobs if ":" not in j["jobId"])

    print(f"{'messages':<22}{'msg/s':>8}{'calls/msg':>11}{'failed':>8}  calls")
    per_message = {}
    for kind, count, seconds, counts, failures in rows:
        total = sum(counts.values())
        per_message[kind] = total / count
        detail = ", ".join(f"{op} {n / count:.1f}" for op, n in sorted(counts.items()))
        print(f"{kind:<22}{count / seconds:>8.0f}{total / count:>11.1f}{failures:>8}  {detail}")
    print(f"\nBatch jobs created: {parents} (expected {messages * (1 + 1 + 3)}: redeliveries add none)")
    print(f"redelivery / first delivery, calls per message: single "
          f"{per_message['single, redelivered'] / per_message['single']:.2f}, list of 3 "
          f"{per_message['list of 3, redelivered'] / per_message['list of 3']:.2f}")
    print(f"array (24 children) / single, calls per message: {per_message['array'] / per_message['single']:.2f}")
    print(f"invalid / single, calls per message: {per_message['invalid'] / per_message['single']:.2f}")


if __name__ == "__main__":
    main()
