"""The SQS -> Lambda event source mapping, played locally.

`EventSourceMapping` polls the queue continuously, as the deployed mapping does (batch size and
batching window from the stack; `ReportBatchItemFailures`): it receives up to `batch_size`
messages, invokes the function (`cpb.local.lambdas.LocalLambda`: the real handler with the
function's timeout), and deletes only the messages the response does not list in
`batchItemFailures`. An error, a timeout or an invalid response fails the whole batch. Failed
messages come back after the queue's visibility timeout (or `redeliver_after` seconds, a local
shortcut), and SQS itself moves a message to the dead-letter queue once it was received
`maxReceiveCount` times (the queue's redrive policy).

`pump` is the one-shot form the tests use: deliver what is visible now, batch by batch.
"""
from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from cpb.local.lambdas import FakeLambdaContext, LocalLambda

__all__ = ["EventSourceMapping", "BatchReport", "PumpReport", "FakeLambdaContext", "pump", "sqs_event"]


@dataclass
class PumpReport:
    """What the mapping did: invocations, deleted and failed message ids."""

    invocations: int = 0
    deleted: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@dataclass
class BatchReport:
    """One invocation of the function by the mapping."""

    received: list[str]
    deleted: list[str]
    failed: list[str]
    error: Optional[str] = None
    reasons: dict[str, str] = field(default_factory=dict)  # message id -> the handler's one-line reason
    receive_counts: dict[str, int] = field(default_factory=dict)


def sqs_event(messages: list[dict], queue_arn: str, region: str) -> dict:
    """The Lambda event for a batch of received SQS messages."""
    return {"Records": [{
        "messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m.get("Body", ""),
        "attributes": m.get("Attributes", {}), "messageAttributes": _lambda_attributes(m.get("MessageAttributes", {})),
        "md5OfBody": m.get("MD5OfBody", ""), "eventSource": "aws:sqs", "eventSourceARN": queue_arn,
        "awsRegion": region} for m in messages]}


def _lambda_attributes(attributes: dict) -> dict:
    """ReceiveMessage's MessageAttributes in the shape Lambda's SQS event gives them (camelCase keys)."""
    shaped = {}
    for name, value in (attributes or {}).items():
        binary = value.get("BinaryValue")
        shaped[name] = {"stringValue": value.get("StringValue"),
                        "binaryValue": base64.b64encode(binary).decode() if isinstance(binary, bytes) else binary,
                        "stringListValues": value.get("StringListValues", []),
                        "binaryListValues": value.get("BinaryListValues", []), "dataType": value.get("DataType")}
    return shaped


def failed_ids(response: Any, received: list[str]) -> Optional[set[str]]:
    """The message ids a partial batch response reports, or None when the response is invalid
    (then Lambda treats the whole batch as failed)."""
    if response is None:
        return set()
    if not isinstance(response, dict):
        return None
    items = response.get("batchItemFailures", [])
    if items is None:
        return set()
    if not isinstance(items, list):
        return None
    ids = set()
    for item in items:
        identifier = item.get("itemIdentifier") if isinstance(item, dict) else None
        if not identifier or identifier not in received:
            return None
        ids.add(identifier)
    return ids


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
        ids = [m["MessageId"] for m in messages]
        try:
            answer = handler(sqs_event(messages, queue_arn, region), FakeLambdaContext())
        except Exception:  # the mapping retries the whole batch; so do we
            failed: set[str] = set(ids)
        else:
            failed = failed_ids(answer, ids)
            if failed is None:
                failed = set(ids)
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
            on_batch(len(messages), len(failed & set(ids)))
    return report


class EventSourceMapping:
    """Polls one queue and invokes one function, continuously, until stopped."""

    def __init__(self, sqs: Any, queue_url: str, function: LocalLambda, region: str, *, batch_size: int = 10,
                 batching_window: float = 1.0, redeliver_after: Optional[float] = None, idle_poll: float = 0.2,
                 on_batch: Optional[Callable[[BatchReport], None]] = None,
                 say: Optional[Callable[[str], None]] = None) -> None:
        self.sqs, self.queue_url, self.function, self.region = sqs, queue_url, function, region
        self.batch_size, self.batching_window = batch_size, batching_window
        self.redeliver_after, self.idle_poll = redeliver_after, idle_poll
        self.on_batch = on_batch or (lambda report: None)
        self.say = say or (lambda text: None)
        self.reports: list[BatchReport] = []
        self._queue_arn: Optional[str] = None
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._busy = False
        self._lock = threading.Lock()

    def start(self) -> "EventSourceMapping":
        self._queue_arn = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="sqs-mapping", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.function.timeout_seconds + 5)
        self._thread = None

    def idle(self) -> bool:
        """No invocation running and no message visible in the queue (failed ones waiting out their
        visibility timeout are not counted: they come back on their own)."""
        with self._lock:
            if self._busy:
                return False
        attributes = self.sqs.get_queue_attributes(QueueUrl=self.queue_url,
                                                   AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
        return int(attributes.get("ApproximateNumberOfMessages", "0")) == 0

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if self.poll_once() is None:
                    self._stopping.wait(self.idle_poll)  # short polls: Ctrl-C never waits for a long poll
            except Exception as exc:  # the endpoint went away (shutting down) or a bug: say it, keep polling
                if self._stopping.is_set():
                    return
                self.say(f"SQS -> Lambda mapping: polling failed (retrying): {type(exc).__name__}: {exc}")
                self._stopping.wait(1.0)

    def _receive(self, count: int, wait: int) -> list[dict]:
        return self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=count, WaitTimeSeconds=wait,
                                        AttributeNames=["All"], MessageAttributeNames=["All"]).get("Messages", [])

    def poll_once(self) -> Optional[BatchReport]:
        """One poll and, when it got messages, one invocation."""
        messages = self._receive(self.batch_size, 0)
        if not messages:
            return None
        with self._lock:
            self._busy = True
        try:
            deadline = time.monotonic() + self.batching_window  # MaximumBatchingWindowInSeconds
            while len(messages) < self.batch_size and time.monotonic() < deadline and not self._stopping.is_set():
                more = self._receive(self.batch_size - len(messages), 0)
                if more:
                    messages += more
                else:
                    time.sleep(0.1)
            return self._invoke(messages)
        finally:
            with self._lock:
                self._busy = False

    def _invoke(self, messages: list[dict]) -> BatchReport:
        ids = [m["MessageId"] for m in messages]
        call = self.function.invoke(sqs_event(messages, self._queue_arn or "", self.region))
        error = call.error or ("Task timed out" if call.timed_out else None)
        failed = failed_ids(call.result, ids) if call.ok else set(ids)
        if failed is None:
            error, failed = f"invalid partial batch response: {json.dumps(call.result)[:200]}", set(ids)
        report = BatchReport(received=ids, deleted=[], failed=[i for i in ids if i in failed], error=error,
                             reasons=_reasons(call.output),
                             receive_counts={m["MessageId"]: int(m.get("Attributes", {})
                                                                 .get("ApproximateReceiveCount", "1"))
                                             for m in messages})
        done = [m for m in messages if m["MessageId"] not in failed]
        for start in range(0, len(done), 10):
            chunk = done[start:start + 10]
            self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(chunk)])
        report.deleted = [m["MessageId"] for m in done]
        if self.redeliver_after is not None:
            back = [m for m in messages if m["MessageId"] in failed]
            for start in range(0, len(back), 10):
                chunk = back[start:start + 10]
                self.sqs.change_message_visibility_batch(QueueUrl=self.queue_url, Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"],
                     "VisibilityTimeout": int(self.redeliver_after)} for i, m in enumerate(chunk)])
        self.reports.append(report)
        self.on_batch(report)
        return report


def _reasons(output: str) -> dict[str, str]:
    """message id -> reason, from the handler's structured "failed" log lines (Powertools JSON)."""
    reasons = {}
    for line in output.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("message_id") and record.get("reason"):
            reasons[str(record["message_id"])] = str(record["reason"])
    return reasons
