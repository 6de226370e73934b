"""The EventBridge rule on Batch "Job State Change", played locally.

The local Batch (`cpb.local.batch`) hands over the JobDetail of every job, array child and array
parent that ended. `EventRule` wraps it in the event Batch sends to EventBridge, keeps it when it
matches the stack's rule (source `aws.batch`, detail-type `Batch Job State Change`, status
SUCCEEDED or FAILED, this stack's job queue) and invokes the job-events function with it
asynchronously, in order, one at a time, as EventBridge invokes a Lambda target: an invocation that
fails is retried twice (Lambda's asynchronous retries; here after 1 and 2 seconds instead of about
1 and 2 minutes), then the event goes to the rule's dead-letter queue.

The function is `handlers.events.handler` when that module exists; without it the events are still
built (and counted) so the rest of the local stack works the same.
"""
from __future__ import annotations

import datetime as dt
import importlib
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

from cpb.local.lambdas import Invocation, LocalLambda

ACCOUNT = "123456789012"
DETAIL_TYPE = "Batch Job State Change"
FINAL_STATES = ("SUCCEEDED", "FAILED")
RETRY_DELAYS = (1.0, 2.0)


def state_change_event(detail: dict, region: str, account: str = ACCOUNT) -> dict:
    """The EventBridge event Batch sends when a job's status changes (detail = DescribeJobs' JobDetail)."""
    return {"version": "0", "id": str(uuid.uuid4()), "detail-type": DETAIL_TYPE, "source": "aws.batch",
            "account": account, "time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": region, "resources": [detail.get("jobArn", "")], "detail": detail}


def rule_pattern(job_queue_arn: str) -> dict:
    """The stack's rule: final states of jobs in its own queue."""
    return {"source": ["aws.batch"], "detail-type": [DETAIL_TYPE],
            "detail": {"status": list(FINAL_STATES), "jobQueue": [job_queue_arn]}}


def matches(pattern: dict, event: dict) -> bool:
    """EventBridge matching for the patterns used here: every key's value is one of the listed values."""
    for key, wanted in pattern.items():
        value = event.get(key)
        if isinstance(wanted, dict):
            if not isinstance(value, dict) or not matches(wanted, value):
                return False
        elif value not in wanted:
            return False
    return True


def load_handler(module: str = "handlers.events") -> Optional[Callable[[dict, Any], Any]]:
    """The job-events handler, or None when the module does not exist (yet)."""
    try:
        return importlib.import_module(module).handler
    except ModuleNotFoundError as exc:
        if exc.name in (module, module.rsplit(".", 1)[0]):
            return None
        raise


@dataclass
class Delivery:
    """One event and what its invocations did."""

    event: dict
    invocations: list[Invocation]
    dead_lettered: bool = False


class EventRule:
    """Matches job state changes against the rule and delivers them to the function in order."""

    def __init__(self, job_queue_arn: str, region: str, function: Optional[LocalLambda], *, sqs: Any = None,
                 dlq_url: str = "", retry_delays: tuple[float, ...] = RETRY_DELAYS,
                 say: Optional[Callable[[str], None]] = None) -> None:
        self.pattern = rule_pattern(job_queue_arn)
        self.region, self.function = region, function
        self.sqs, self.dlq_url, self.retry_delays = sqs, dlq_url, retry_delays
        self.say = say or (lambda text: None)
        self.events: list[dict] = []        # every matching event, in order
        self.deliveries: list[Delivery] = []
        self._queue: "queue.Queue[Optional[dict]]" = queue.Queue()
        self._busy = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "EventRule":
        if self._thread is None and self.function is not None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="eventbridge-rule", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=(self.function.timeout_seconds if self.function else 0) + 5)
        self._thread = None

    def idle(self) -> bool:
        with self._lock:
            return self._busy == 0

    def put(self, detail: dict) -> Optional[dict]:
        """A job's state changed: the event, when the rule matches it (and it is queued for the function)."""
        event = state_change_event(detail, self.region)
        if not matches(self.pattern, event):
            return None
        with self._lock:
            self.events.append(event)
            if self.function is not None and not self._stopping.is_set():
                self._busy += 1
                self._queue.put(event)
        return event

    def _loop(self) -> None:
        while True:
            event = self._queue.get()
            if event is None or self._stopping.is_set():
                return
            try:
                self._deliver(event)
            finally:
                with self._lock:
                    self._busy -= 1

    def _deliver(self, event: dict) -> None:
        assert self.function is not None
        delivery = Delivery(event=event, invocations=[])
        self.deliveries.append(delivery)
        label = _label(event["detail"])
        for attempt, delay in enumerate((0.0, *self.retry_delays)):
            if delay and self._stopping.wait(delay):
                return
            call = self.function.invoke(event)
            delivery.invocations.append(call)
            if call.ok:
                return
            self.say(f"EventBridge -> {self.function.function_name}: {label} {event['detail'].get('status')}: "
                     f"invocation {attempt + 1} failed: {call.error or 'Task timed out'}")
        delivery.dead_lettered = True
        if self.sqs is not None and self.dlq_url:
            try:
                self.sqs.send_message(QueueUrl=self.dlq_url, MessageBody=json.dumps(event))
            except Exception as exc:  # the log keeps it too
                self.say(f"EventBridge: could not park the event of {label} in the dead-letter queue: {exc}")
        self.say(f"EventBridge -> {self.function.function_name}: gave up on the event of {label} after "
                 f"{len(delivery.invocations)} invocations; it is in the rule's dead-letter queue")

    def wait_idle(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.05)
        return False


def _label(detail: dict) -> str:
    index = (detail.get("arrayProperties") or {}).get("index")
    name = detail.get("jobName", detail.get("jobId", "job"))
    return name if index is None else f"{name}[{index}]"
