"""The hostile-message corpus through `cpb submit` (issue 7, client half).

Every case of `tests/hostile_messages.py` is written to a message file and
submitted against moto: `cpb submit` must refuse it in one line that names
the same field (and list entry) the Lambda's error names, and must send
nothing to the queue. Cases only the bucket checks can catch are caught by
the client too, because it runs the Lambda's own `handlers.s3checks`.
"""
from __future__ import annotations

import os

import boto3
import pytest
from click.testing import CliRunner
from moto import mock_aws

import hostile_messages as corpus
from cpb.cli import cli


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One moto stack for the whole corpus (creating one per case would dominate the runtime)."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith("CPB_") or key == "AWS_ENDPOINT_URL":
            del os.environ[key]
    os.environ.update({
        "AWS_DEFAULT_REGION": corpus.REGION, "CPB_BUCKET": corpus.BUCKET, "CPB_REGION": corpus.REGION,
        "CPB_JOB_QUEUE": corpus.QUEUE_ARN, "CPB_JOB_DEFINITION": corpus.JOBDEF_ARN,
        "CPB_ALLOWED_ARNS": ",".join(corpus.LIMITS["allowed_arns"]),
        "CPB_MAX_VCPU": str(corpus.LIMITS["max_vcpu"]), "CPB_MAX_MEMORY_MIB": str(corpus.LIMITS["max_memory_mib"]),
        "CPB_DEFAULT_VCPU": str(corpus.LIMITS["default_vcpu"]),
        "CPB_DEFAULT_MEMORY_MIB": str(corpus.LIMITS["default_memory_mib"]),
        "CPB_HOME": str(tmp_path_factory.mktemp("cpb-home"))})
    try:
        with mock_aws():
            s3 = boto3.client("s3", region_name=corpus.REGION)
            sqs = boto3.client("sqs", region_name=corpus.REGION)
            s3.create_bucket(Bucket=corpus.BUCKET)
            for key, body in corpus.base_objects().items():
                s3.put_object(Bucket=corpus.BUCKET, Key=key, Body=body)
            s3.put_object(Bucket=corpus.BUCKET, Key=f"{corpus.INPUT}/a.tif", Body=b"II*\x00")
            queue = sqs.create_queue(QueueName="cpb-hostile")["QueueUrl"]
            os.environ["CPB_QUEUE_URL"] = queue
            yield {"s3": s3, "sqs": sqs, "queue": queue}
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _queue_depth(stack) -> int:
    attrs = stack["sqs"].get_queue_attributes(QueueUrl=stack["queue"], AttributeNames=["ApproximateNumberOfMessages"])
    return int(attrs["Attributes"]["ApproximateNumberOfMessages"])


@pytest.mark.hostile
@pytest.mark.parametrize("case", corpus.CORPUS, ids=[c.name for c in corpus.CORPUS])
def test_cpb_submit_rejects_hostile_message(stack, tmp_path, case):
    for key, body in case.objects.items():
        stack["s3"].put_object(Bucket=corpus.BUCKET, Key=key, Body=body)
    path = tmp_path / "message.json"
    path.write_bytes(case.body.encode("utf-8", "surrogatepass"))
    result = CliRunner().invoke(cli, ["submit", "--message-file", str(path)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    error = [line for line in lines if line.startswith("cpb: ")]
    assert len(error) == 1 and "Traceback" not in result.output
    assert case.expected_prefix in error[0], error[0]
    assert _queue_depth(stack) == 0


def test_good_message_after_the_corpus_is_sent(stack, tmp_path):
    path = tmp_path / "good.json"
    path.write_text(corpus.GOOD_BODY)
    result = CliRunner().invoke(cli, ["submit", "--message-file", str(path)])
    assert result.exit_code == 0, result.output
    assert _queue_depth(stack) == 1
