"""The SQS → Lambda event source mapping, played locally.

Receives up to 10 messages, hands them to the real `handlers.ingress.handler`
as the SQS event Lambda would build, and deletes only the messages the
handler did not report in `batchItemFailures` (ReportBatchItemFailures). If
the handler raises, nothing is deleted: the whole batch comes back, exactly
as with a real mapping.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class FakeLambdaContext:
    """The attributes handlers (and Powertools) read from a Lambda context."""

    function_name: str = "cpb-ingress"
    memory_limit_in_mb: int = 256
    timeout_seconds: float = 60.0
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:cpb-ingress"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    log_group_name: str = "/aws/lambda/cpb-ingress"
    log_stream_name: str = "local"
    function_version: str = "$LATEST"
    _deadline: float = field(default_factory=lambda: 0.0)

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


@dataclass
class PumpReport:
    """What the mapping did: invocations, deleted and failed message ids."""

    invocations: int = 0
    deleted: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def sqs_event(messages: list[dict], queue_arn: str, region: str) -> dict:
    """The Lambda event for a batch of received SQS messages."""
    return {"Records": [{
        "messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m.get("Body", ""),
        "attributes": m.get("Attributes", {}), "messageAttributes": m.get("MessageAttributes", {}),
        "md5OfBody": m.get("MD5OfBody", ""), "eventSource": "aws:sqs", "eventSourceARN": queue_arn,
        "awsRegion": region} for m in messages]}


def pump(sqs, queue_url: str, handler: Callable[[dict, Any], Any], region: str, batch_size: int = 10,
         retry_failed_now: bool = False, max_rounds: int = 50,
         on_batch: Optional[Callable[[int, int], None]] = None) -> PumpReport:
    """Deliver everything visible in the queue to `handler`, batch by batch.

    `retry_failed_now` makes failed messages visible again at once (instead of
    after the visibility timeout), so tests can watch redelivery and the
    move to the dead-letter queue without waiting.
    """
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    report = PumpReport()
    for _ in range(max_rounds):
        got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=batch_size, WaitTimeSeconds=0,
                                  AttributeNames=["All"], MessageAttributeNames=["All"])
        messages = got.get("Messages", [])
        if not messages:
            break
        report.invocations += 1
        try:
            answer = handler(sqs_event(messages, queue_arn, region), FakeLambdaContext()) or {}
        except Exception:  # the mapping retries the whole batch; so do we
            failed = {m["MessageId"] for m in messages}
        else:
            failed = {f.get("itemIdentifier") for f in answer.get("batchItemFailures", []) or []}
        for message in messages:
            if message["MessageId"] in failed:
                report.failures.append(message["MessageId"])
                if retry_failed_now:
                    sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"],
                                                  VisibilityTimeout=0)
            else:
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
                report.deleted.append(message["MessageId"])
        if on_batch:
            on_batch(len(messages), len(failed & {m["MessageId"] for m in messages}))
    return report
