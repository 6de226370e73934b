"""Build, validate and send job messages exactly as the Lambda will read them.

Validation is `handlers.schema` itself, the module the Lambda runs, so a
message `cpb submit` accepts is one the Lambda accepts and the error a
scientist sees here is the line the Lambda would log. Each job goes out as
its own SQS message (so one bad job never takes others to the dead-letter
queue with it), in SendMessageBatch calls of at most 10.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from handlers.s3checks import CheckedRequest, check_request
from handlers.schema import JobRequest, Limits, MessageError, parse_body

SQS_BATCH = 10


class SubmitError(Exception):
    """A submission that must not be sent; the message names what to fix."""


@dataclass
class Sent:
    """One job message that SQS accepted."""

    message_id: str
    request: JobRequest


@dataclass
class SubmitReport:
    """What `send` did: accepted messages and per-entry SQS failures."""

    sent: list[Sent] = field(default_factory=list)
    failed: list[tuple[JobRequest, str]] = field(default_factory=list)


def limits_for(bucket: str, job_queue: Optional[str], job_definition: Optional[str],
               environ: Mapping[str, str]) -> Limits:
    """The Lambda's Limits as far as the client can know them.

    Ceilings come from the same `CPB_MAX_*` variables the Lambda reads (when
    the user sets them) so local validation matches the deployed stack.
    """
    merged = dict(environ)
    merged["CPB_BUCKET"] = bucket
    if job_queue:
        merged["CPB_JOB_QUEUE"] = job_queue
    if job_definition:
        merged["CPB_JOB_DEFINITION"] = job_definition
    try:
        return Limits.from_env(merged)
    except ValueError as exc:
        raise SubmitError(str(exc)) from None


def message_from_flags(pipeline: str, input_prefix: str, output: str, data_file: Optional[str] = None,
                       image_sets_per_job: Optional[int] = None, memory: Optional[int] = None,
                       vcpus: Optional[int] = None, job_name: Optional[str] = None,
                       unsplittable: bool = False) -> dict[str, Any]:
    """The message object the flags describe (unset options left out)."""
    message: dict[str, Any] = {"pipeline": pipeline, "input": input_prefix, "output": output}
    optional = {"data_file": data_file, "image_sets_per_job": image_sets_per_job, "job_memory": memory,
                "job_vcpu": vcpus, "job_name": job_name}
    message.update({k: v for k, v in optional.items() if v is not None})
    if unsplittable:
        message["unsplittable"] = True
    return message


def read_message_file(path: Path) -> str:
    """The raw text of a message file (object or list, the seed's format)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SubmitError(f"{path}: not UTF-8 text; save the message file as UTF-8 JSON") from None
    except OSError as exc:
        raise SubmitError(f"{path}: cannot read it ({exc.strerror})") from None


def validate(body: str, limits: Limits) -> list[JobRequest]:
    """Parse with the Lambda's schema; the error is the Lambda's one line."""
    try:
        return parse_body(body, limits)
    except MessageError as exc:
        raise SubmitError(f"message rejected: {exc}") from None


def check_in_bucket(s3, requests: list[JobRequest], limits: Limits) -> list[CheckedRequest]:
    """Refuse to send jobs whose pipeline, data file or input is not in the bucket.

    The pipeline and data-file checks are the Lambda's own (`handlers.s3checks`),
    so the error text matches; sending such jobs would only cost a trip
    through the Lambda to the dead-letter queue.
    """
    checked = []
    for index, request in enumerate(requests):
        where = f"entry {index}: " if len(requests) > 1 else ""
        try:
            checked.append(check_request(s3, request, limits))
        except MessageError as exc:
            raise SubmitError(f"{where}{exc}") from None
        if request.data_file is None and not has_prefix(s3, limits.bucket, request.input):
            raise SubmitError(f"{where}input: nothing under s3://{limits.bucket}/{request.input}/; "
                              "upload the images (--upload DIR) or fix the prefix")
    return checked


def existing_outputs(s3, bucket: str, requests: list[JobRequest]) -> list[str]:
    """Outputs that already hold objects. A job replaces what its output holds (the worker deletes
    the previous run's files once its own are up), so sending plate2 to plate1's output would
    silently destroy plate1's results; the client says so before sending."""
    return sorted({r.output for r in requests if has_prefix(s3, bucket, r.output)})


def has_prefix(s3, bucket: str, prefix: str) -> bool:
    """True when at least one object lies under `prefix/`."""
    got = s3.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/", MaxKeys=1)
    return bool(got.get("KeyCount") or got.get("Contents"))


def send(sqs, queue_url: str, requests: list[JobRequest]) -> SubmitReport:
    """Send each request as its own message, at most 10 per SendMessageBatch."""
    report = SubmitReport()
    for start in range(0, len(requests), SQS_BATCH):
        chunk = requests[start:start + SQS_BATCH]
        entries = [{"Id": str(i), "MessageBody": json.dumps(r.to_message(), sort_keys=True)}
                   for i, r in enumerate(chunk)]
        answer = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
        for ok in answer.get("Successful", []):
            report.sent.append(Sent(ok["MessageId"], chunk[int(ok["Id"])]))
        for bad in answer.get("Failed", []):
            report.failed.append((chunk[int(bad["Id"])], f"{bad.get('Code')}: {bad.get('Message', '')}"))
    return report
