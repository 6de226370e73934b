"""The hostile-message corpus (`hostile_messages.CORPUS`) through the real Lambda handler.

Each case is sent between two good messages in one SQS batch: the hostile one
must come back as the only batch item failure, with one structured log line
naming the field, submit no job, and leave both good messages submitted.
One moto stack serves the whole module (cases use distinct message ids and outputs).
This is also where every invalid case of the ingress issue is proven (not JSON, missing or
empty fields, wrong types, traversal, absolute paths, other buckets, memory/vCPU beyond the
stack, foreign ARNs, missing pipeline, unreadable data file, empty input prefix).
"""
from __future__ import annotations

import json
import uuid

import pytest
from moto import mock_aws

import hostile_messages as corpus
from handlers import ingress
from ingress_moto import MOTO_CONFIG, REGION, LambdaContext, LogLines, build_stack, failed_ids, sqs_event, sqs_record


@pytest.fixture(scope="module")
def hostile_stack():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_DEFAULT_REGION", REGION)
        patch.setenv("AWS_REGION", REGION)
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        with mock_aws(config=MOTO_CONFIG):
            stack = build_stack()
            objects = dict(corpus.base_objects())
            for case in corpus.CORPUS:
                objects.update(case.objects)
            for key, body in objects.items():
                stack.put(key, body)
            for key, value in stack.env.items():
                patch.setenv(key, value)
            ingress.reset_services()
            yield stack
            ingress.reset_services()


def test_corpus_is_large_and_matches_the_moto_stack(hostile_stack):
    assert len(corpus.CORPUS) >= 40
    assert len({case.name for case in corpus.CORPUS}) == len(corpus.CORPUS)
    assert (hostile_stack.queue_arn, hostile_stack.jobdef_arn, hostile_stack.other_queue_arn) == (
        corpus.QUEUE_ARN, corpus.JOBDEF_ARN, corpus.ALLOWED_QUEUE_ARN)
    assert corpus.corpus_limits() == ingress.services().limits


@pytest.mark.hostile
@pytest.mark.parametrize("case", corpus.CORPUS, ids=[case.name for case in corpus.CORPUS])
def test_hostile_message_is_rejected_alone(hostile_stack, case):
    goods = [sqs_record(json.dumps(corpus.good_message(output=f"results/good-{uuid.uuid4().hex[:10]}")))
             for _ in range(2)]
    bad = sqs_record(case.body)
    before = len(hostile_stack.jobs())
    log = LogLines()
    ingress.logger.addHandler(log)
    try:
        response = ingress.handler(sqs_event(goods[0], bad, goods[1]), LambdaContext())
    finally:
        ingress.logger.removeHandler(log)
    assert failed_ids(response) == [bad["messageId"]]
    [line] = log.failures()
    assert line["message_id"] == bad["messageId"] and line["kind"] == "invalid"
    assert line["field"] == case.field and line.get("entry") == case.entry
    assert line["reason"].startswith(case.expected_prefix)
    jobs = hostile_stack.jobs()
    assert len(jobs) == before + 2
    assert bad["messageId"] not in {job["tags"]["cpb:message-id"] for job in jobs}
