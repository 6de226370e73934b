"""The SQS -> AWS Batch Lambda: validate each job message and submit its jobs exactly once.

Entry point `handlers.ingress.handler(event, context)` (docs/CONTRACTS.md).
Configuration is the "Lambda environment" of docs/CONTRACTS.md, read into
`handlers.schema.Limits`.

Per SQS record (Powertools `BatchProcessor`, partial batch responses):

1. parse and validate the body (`handlers.schema.parse_body`), work out the
   message identity (`client_token`, else the `cpb-original-message-id`
   attribute of a DLQ redrive, else the SQS message id) and read each job's
   submission record: a redelivery or a repeat of a message already submitted
   ends here (1 S3 GET per job);
2. check each job not yet submitted against the bucket, inside the time
   budget (`handlers.s3checks.check_request`: pipeline, data file streamed and
   counted as LoadData counts it, or image sets counted by file rules), its
   output's lease (`handlers.lease`: another message's unfinished run refuses
   it) and its `after` outputs (their runs' unfinished jobs become Batch
   `dependsOn`; no run, a failed or a cancelled one refuses it);
3. submit each job exactly once, in order (`handlers.submission.Submitter`),
   an `after` on an earlier entry depending on that entry's jobs.

A record that fails any step is returned in `batchItemFailures` (SQS retries
it, then moves it to the DLQ) with one structured log line saying why; the
other records go on. A list message is all-or-nothing: nothing is submitted
until every entry passed steps 1-2, entries already submitted by an earlier
delivery are not checked again, and a failure that is not a deferral (another
invocation holds an entry, or time ran out) rolls back the entries already
submitted (jobs terminated, records and output leases cancelled), so no message
waits in the DLQ half submitted. Throttling and 5xx are retried by botocore
(`adaptive` mode, bounded attempts), except SubmitJob, which
`handlers.submission` retries itself after looking for the job by name; no message and no AWS call starts when
too little of the invocation's time is left, so the Lambda returns its
failures itself instead of timing out (a timeout is still safe: redelivery
finds the submission records and jobs by name).

`boto3`/`botocore` and `aws_lambda_powertools` are vendored into the function
asset from `handlers/requirements.txt` (pinned: S3 conditional writes need
botocore >= 1.35.64, which a region's runtime SDK may not have);
`require_conditional_writes` still refuses an SDK without them, loudly.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
import uuid
from typing import Any, Callable, Optional

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from botocore.config import Config

from handlers.lease import Leases, OutputBusy
from handlers.refusals import record_refusal
from handlers.s3checks import CheckedRequest, check_request
from handlers.schema import Limits, MessageError, entry_message_id, message_identity, parse_body
from handlers.submission import InProgress, PlannedJob, Submitter

__all__ = ["handler", "process_event", "services", "reset_services", "require_conditional_writes", "Services", "Budget",
           "OutOfTime",
           "RETRY_CONFIG", "SUBMIT_CONFIG", "MESSAGE_MARGIN_S", "ENTRY_MARGIN_S", "CALL_MARGIN_S", "MAX_DEPENDS_ON",
           "logger"]

logger = Logger(service="cpb-ingress")

#: botocore retries throttling (TooManyRequestsException, SlowDown...) and 5xx with
#: exponential backoff; `adaptive` also slows the client down after throttling.
#: 5 attempts keep one call's worst case (backoff <= 1+2+4+8 s) inside CALL_MARGIN_S + timeouts.
RETRY_CONFIG = Config(retries={"mode": "adaptive", "total_max_attempts": 5}, connect_timeout=5, read_timeout=20)
#: SubmitJob is not idempotent: botocore must not retry it blindly (handlers.submission retries it).
SUBMIT_CONFIG = Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=5, read_timeout=20)
#: Do not start a message with less time left than this (seconds).
MESSAGE_MARGIN_S = 20.0
#: Do not start checking one entry of a message with less time left than this (seconds).
ENTRY_MARGIN_S = 15.0
#: Batch lets a job depend on at most this many jobs.
MAX_DEPENDS_ON = 20
#: Do not start an AWS call with less time left than this (seconds).
CALL_MARGIN_S = 10.0
#: Without a Lambda context (local runs), assume this much time.
DEFAULT_BUDGET_S = 300.0


class OutOfTime(RuntimeError):
    """Too little of the invocation is left to start more work; the message is retried later."""


@dataclasses.dataclass(frozen=True)
class Services:
    """AWS clients and limits, built once per Lambda container and reused across invocations."""

    s3: Any
    batch: Any
    batch_submit: Any  # no botocore retries: Submitter retries SubmitJob itself, looking the name up first
    limits: Limits


def require_conditional_writes(s3: Any) -> None:
    """Fail loudly when this botocore cannot send S3 conditional writes (exactly-once depends on them).

    `PutObject(IfNoneMatch=...)` needs botocore >= 1.35.17 and `IfMatch` >= 1.35.64; an older
    SDK in the Lambda runtime would reject the parameters on every message.
    """
    members = s3.meta.service_model.operation_model("PutObject").input_shape.members
    missing = [name for name in ("IfNoneMatch", "IfMatch") if name not in members]
    if missing:
        import botocore
        raise RuntimeError(f"botocore {botocore.__version__} cannot send S3 PutObject {' / '.join(missing)} "
                           "(conditional writes): attach a newer boto3 to the ingress Lambda")


@functools.lru_cache(maxsize=1)
def _services_for(settings: tuple) -> Services:
    environ = dict(settings)
    session = boto3.session.Session()
    s3 = session.client("s3", config=RETRY_CONFIG)
    require_conditional_writes(s3)
    return Services(s3=s3,
                    batch=session.client("batch", config=RETRY_CONFIG),
                    batch_submit=session.client("batch", config=SUBMIT_CONFIG),
                    limits=Limits.from_env(environ))


def services() -> Services:
    """The clients for the current environment (rebuilt when CPB_*/AWS region/endpoint settings change)."""
    relevant = ("CPB_", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    return _services_for(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(relevant))))


def reset_services() -> None:
    """Forget cached clients (tests start a fresh moto backend per test)."""
    _services_for.cache_clear()


class Budget:
    """The invocation's remaining time, from the Lambda context."""

    def __init__(self, context: Any, clock: Callable[[], float]) -> None:
        self.clock = clock
        remaining_ms = None
        if context is not None and hasattr(context, "get_remaining_time_in_millis"):
            remaining_ms = context.get_remaining_time_in_millis()
        self.deadline = clock() + (remaining_ms / 1000.0 if remaining_ms is not None else DEFAULT_BUDGET_S)

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def require(self, seconds: float, what: str) -> None:
        left = self.remaining()
        if left < seconds:
            raise OutOfTime(f"only {left:.1f} s of the invocation left, not enough to {what}; "
                            "the message will be retried")


@logger.inject_lambda_context(clear_state=True)
def handler(event: dict, context: Any) -> dict:
    """Lambda entry point: returns `{"batchItemFailures": [...]}` for the records that failed.

    Every log line carries the Lambda request id (Powertools `inject_lambda_context`).
    """
    try:
        svc = services()
    except (ValueError, RuntimeError) as exc:  # bad Lambda environment or SDK: every message waits for a fix
        logger.error("ingress misconfigured", extra={"reason": str(exc)})
        raise
    return process_event(event, context, svc)


def process_event(event: dict, context: Any, svc: Services, clock: Callable[[], float] = time.time) -> dict:
    """Process one SQS event with the given services (the handler's body; tests pass a clock)."""
    if not isinstance(event, dict) or not event.get("Records"):
        logger.warning("event without SQS records ignored", extra={"event_keys": sorted(event)[:20]
                                                                    if isinstance(event, dict) else None})
        return {"batchItemFailures": []}
    budget = Budget(context, clock)
    owner = f"{getattr(context, 'aws_request_id', None) or 'local'}/{uuid.uuid4().hex[:8]}"
    submitter = Submitter(s3=svc.s3, batch=svc.batch, batch_submit=svc.batch_submit, limits=svc.limits,
                          owner=owner, lease_until=budget.deadline, clock=clock,
                          before_call=lambda what: budget.require(CALL_MARGIN_S, what))

    def record_handler(record: SQSRecord) -> dict:
        return _process_record(record, svc, budget, submitter)

    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    return process_partial_response(event=event, record_handler=record_handler, processor=processor,
                                    context=context)


def _process_record(record: SQSRecord, svc: Services, budget: Budget, submitter: Submitter) -> dict:
    """Validate, check and submit one message; any exception marks it a batch item failure."""
    message_id = record.message_id
    receive_count = _receive_count(record)
    stubs: list = []
    identity: Optional[str] = None
    try:
        budget.require(MESSAGE_MARGIN_S, "start this message")
        requests = parse_body(record.body, svc.limits)
        indexes = list(range(len(requests))) if record.body.lstrip().startswith("[") else [None]
        identity = message_identity(requests, message_id, _message_attributes(record))
        stubs = [PlannedJob(checked=CheckedRequest(request=request, image_set_count=None), sqs_message_id=message_id,
                            index=index, identity=identity) for request, index in zip(requests, indexes)]
        # A redelivery (or a repeat with the same client_token) of a message already submitted is done
        # here: its objects may be gone by now.
        known = [submitter.read_record(stub.checked.request.output, stub.message_id) for stub in stubs]
        if all(saved is not None and saved.get("status") == "submitted" for saved, _ in known):
            records = [saved for saved, _ in known]
        else:
            started = any(saved is not None for saved, _ in known)  # an earlier delivery got this far
            try:
                jobs = [_check_entry(stub, saved, stubs, svc, budget, submitter) for stub, (saved, _) in zip(stubs, known)]
                started = True
                records = _submit_all(jobs, submitter, known)
            except (InProgress, OutOfTime):
                raise  # someone else is on it / no time: a later delivery completes the message
            except Exception as exc:
                if started:
                    _roll_back(stubs, known, submitter, exc)
                raise
    except OutputBusy as exc:
        _log_failure(message_id, receive_count, "busy", str(exc), field=exc.field, entry=exc.index)
        _record_refusal(record, svc, budget, submitter, exc, "busy", receive_count, identity)
        raise
    except MessageError as exc:
        _log_failure(message_id, receive_count, "invalid", str(exc), field=exc.field, entry=exc.index)
        _record_refusal(record, svc, budget, submitter, exc, "invalid", receive_count, identity)
        raise
    except (InProgress, OutOfTime) as exc:
        _log_failure(message_id, receive_count, "deferred", str(exc))
        raise
    except Exception as exc:  # AWS errors left after retries, S3 outages, a record changed under us...
        response = getattr(exc, "response", None)
        code = str((response or {}).get("Error", {}).get("Code", type(exc).__name__))
        _log_failure(message_id, receive_count, "aws" if response else "error", f"{code}: {exc}", error_code=code)
        raise
    logger.info("jobs submitted", extra={
        "message_id": message_id, "receive_count": receive_count, "identity": stubs[0].message_id if stubs else None,
        "jobs": [{"job_id": r["job_id"], "job_name": r["job_name"], "array_size": r["array_size"],
                  "run_id": r.get("run_id"), "job_ids": [j["job_id"] for j in r.get("jobs") or []],
                  "output": r["request"]["output"], "adopted": r.get("adopted")} for r in records]})
    return {"message_id": message_id, "job_ids": [r["job_id"] for r in records]}


def _record_refusal(record: SQSRecord, svc: Services, budget: Budget, submitter: Submitter, exc: MessageError,
                    kind: str, receive_count: Optional[int], identity: Optional[str]) -> None:
    """Say why under the message's outputs (`handlers.refusals`), best effort: the message still fails."""
    if budget.remaining() < CALL_MARGIN_S:
        return
    try:
        record_refusal(svc.s3, svc.limits, record.body, record.message_id, _message_attributes(record), exc, kind,
                       receive_count, submitter.clock, identity)
    except Exception as write_exc:  # the log line above still says why
        logger.warning("refusal record not written", extra={"message_id": record.message_id, "error": str(write_exc)})


def _check_entry(stub: PlannedJob, saved: Optional[dict], stubs: list, svc: Services, budget: Budget,
                 submitter: Submitter) -> PlannedJob:
    """Step 2 for one entry: the bucket, its output's lease and its `after` outputs, inside the budget.

    An entry an earlier delivery already submitted is not checked again (its objects may be gone:
    what runs is what was checked then)."""
    request, index = stub.checked.request, stub.index
    if saved is not None and saved.get("status") == "submitted":
        return stub
    budget.require(ENTRY_MARGIN_S, f"check entry {index if index is not None else 0}")
    try:
        checked = check_request(svc.s3, request, svc.limits,
                                before_call=lambda what: budget.require(CALL_MARGIN_S, what))
        seen = submitter.leases.check_available(request.output, stub.message_id, None)
        earlier = {other.checked.request.output for other in stubs[: stubs.index(stub)]}
        depends: list = []
        for upstream in request.after:
            if upstream not in earlier:
                depends += _after_dependencies(upstream, submitter.leases, svc.limits.bucket)
        _refuse_too_many_dependencies(list(dict.fromkeys(depends)), request.after)
    except MessageError as exc:
        raise exc.at(index) from None
    return dataclasses.replace(stub, checked=checked, depends_on=tuple(dict.fromkeys(depends)), output_lease=seen)


def _after_dependencies(upstream: str, leases: Leases, bucket: str) -> list:
    """The unfinished jobs of `upstream`'s current run (none when it succeeded), or a refusal."""
    lease, _ = leases.read(upstream)
    if lease is None:
        raise MessageError("after", f"{upstream!r} has no run (no s3://{bucket}/{upstream}/_cpb/lease.json); submit "
                                    "that step first (in this message before this entry, or earlier) or drop after")
    if lease.get("state") == "pending" and float(lease.get("lease_until") or 0) > leases.clock():
        raise InProgress(f"after: {upstream} is being submitted by message {lease.get('message_id')} right now")
    outcome = leases.run_outcome(upstream, lease)
    run = f"run {lease.get('run_id')} of {upstream!r}"
    if outcome.status == "unfinished":
        return [job_id for job_id, _ in outcome.unfinished]
    if outcome.status == "succeeded":
        return []
    if outcome.status == "failed":
        raise MessageError("after", f"{run} failed ({outcome.failed[0]}); rerun that step (cpb requeue "
                                    f"{upstream}) before sending this one")
    if outcome.status == "cancelled":
        raise MessageError("after", f"{run} was cancelled ({lease.get('cancelled_reason') or 'rolled back'}); "
                                    "submit that step again before this one")
    raise MessageError("after", f"cannot tell whether {run} succeeded: job(s) {', '.join(outcome.unknown[:3])} are no "
                                f"longer known to Batch and have no event record; check `cpb status {upstream}`, "
                                "then resubmit that step or drop after")


def _submit_all(jobs: list, submitter: Submitter, known: list) -> list:
    """Submit every job of one message in order (`known`: the (record, etag) already read for each).

    An `after` naming an earlier entry's output depends on that entry's jobs."""
    records: list = []
    jobs_of: dict = {}
    for job, prefetched in zip(jobs, known):
        request = job.checked.request
        internal = [job_id for upstream in request.after for job_id in jobs_of.get(upstream, [])]
        depends = tuple(dict.fromkeys(job.depends_on + tuple(internal)))
        try:
            _refuse_too_many_dependencies(depends, request.after)
        except MessageError as exc:
            raise exc.at(job.index) from None
        try:
            saved = submitter.ensure_submitted(dataclasses.replace(job, depends_on=depends), prefetched)
        except MessageError as exc:  # the output became busy since it was checked
            raise exc.at(job.index) from None
        records.append(saved)
        jobs_of[request.output] = [j["job_id"] for j in saved.get("jobs") or []] or [saved["job_id"]]
    return records


def _refuse_too_many_dependencies(depends: Any, after: tuple) -> None:
    if len(depends) > MAX_DEPENDS_ON:
        raise MessageError("after", f"waits for {len(depends)} unfinished jobs ({', '.join(after)}), more than the "
                                    f"{MAX_DEPENDS_ON} a Batch job may depend on; send this step once those have "
                                    "finished")


def _roll_back(stubs: list, known: list, submitter: Submitter, exc: Exception) -> None:
    """A list message that failed for good: terminate what it submitted, cancel records and leases."""
    if len(stubs) < 2:
        return  # a single job failed before (or while) submitting: its record says so, nothing ran twice
    try:
        terminated = submitter.rollback(stubs, f"entry failed: {exc}")
        logger.warning("list message rolled back", extra={"message_id": stubs[0].sqs_message_id,
                                                           "terminated_job_ids": terminated})
    except Exception as rollback_exc:  # the records still say what runs; redelivery completes it
        logger.error("rollback incomplete", extra={"message_id": stubs[0].sqs_message_id, "error": str(rollback_exc)})


def _message_attributes(record: SQSRecord) -> dict:
    """String message attributes of the record (e.g. `cpb-original-message-id`)."""
    raw = (record.raw_event or {}).get("messageAttributes") or {}
    return {name: value.get("stringValue") for name, value in raw.items()
            if isinstance(value, dict) and isinstance(value.get("stringValue"), str)}


def _receive_count(record: SQSRecord) -> Optional[int]:
    try:
        return int(record.attributes.approximate_receive_count)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


def _log_failure(message_id: str, receive_count: Optional[int], kind: str, reason: str, **extra: Any) -> None:
    """The one structured line per failed message (CloudWatch Logs Insights: filter kind/field)."""
    logger.warning("job message failed", extra={"message_id": message_id, "receive_count": receive_count,
                                                  "kind": kind, "reason": reason, **extra})
