"""Resubmit only what failed in an output's current run, and redrive dead-lettered messages.

A 500-well plate with 3 failed array children should cost 3 jobs to fix, not 500. Failed single
jobs are resubmitted with the environment they ran with; a failed array child becomes a single
job with `CPB_ARRAY_INDEX` set to its part (Batch reserves `AWS_BATCH_*` names and has no array of
one), which the worker treats as its array index. Every resubmission carries the run's
`CPB_RUN_ID`, so its record counts for the current run (and a worker of a superseded run stops).

Exactly once: a job's name is deterministic (`<failed job's name>-rq<n>[-<part>]`, n = the part's
retries so far + 1) and is looked up before every SubmitJob attempt; SubmitJob goes through a client
without botocore retries (a 5xx may hide a job Batch created, and a blind retry would start a second
one). The retries are appended to the output lease's `retries` (`by: requeue`, conditional write),
so `cpb status` follows the new job instead of the old failure; outputs from before leases get a
submission record `<output>/_cpb/submission-requeue-<stamp>-<job>.json` instead.
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from cpb.lease import ORIGINAL_ID_ATTRIBUTE, iso, read_lease, update_lease
from cpb.runrecords import load_submissions, short
from cpb.status import ACTIVE, describe, output_status

REQUEUE_PREFIX = "requeue-"
SUBMIT_ATTEMPTS = 5
NAME_LIMIT = 128
_DROPPED = ("CPB_ARRAY_OFFSET", "CPB_OOM_RETRY")


class RequeueError(Exception):
    """Nothing safe to resubmit (e.g. the failed job's details are gone)."""


@dataclass
class Planned:
    """One resubmission: the failed job (or array child) and the job that replaces it."""

    job: dict                 # the failed job (the array parent for a child), as described by Batch
    part: Optional[int]       # the part it ran (array index), None for a plain output's job
    child: bool               # True: an array child of `job`
    name: str
    replaces: str
    was: str
    run_id: Optional[str]


def _environment(job: dict, part: Optional[int], child: bool, run_id: Optional[str]) -> list[dict]:
    """The job's environment minus Batch's own variables (and the array offset: the index given is the
    part's), plus the part index for an array child and the run id."""
    env = {e["name"]: e["value"] for e in (job.get("container") or {}).get("environment", [])
           if not e["name"].startswith("AWS_BATCH_") and e["name"] not in _DROPPED}
    if child and part is not None:
        env["CPB_ARRAY_INDEX"] = str(part)
    if run_id and not env.get("CPB_RUN_ID"):
        env["CPB_RUN_ID"] = run_id
    return [{"name": k, "value": v} for k, v in sorted(env.items())]


def _resources(job: dict) -> list[dict]:
    container = job.get("container") or {}
    found = {r["type"]: r["value"] for r in container.get("resourceRequirements", []) or []}
    if "VCPU" not in found and container.get("vcpus"):
        found["VCPU"] = str(container["vcpus"])
    if "MEMORY" not in found and container.get("memory"):
        found["MEMORY"] = str(container["memory"])
    return [{"type": k, "value": v} for k, v in sorted(found.items())]


def job_name(failed_name: str, attempt: int, part: Optional[int]) -> str:
    """`<failed job's name>-rq<attempt>[-<part>]`, within Batch's 128 characters and its alphabet."""
    suffix = f"-rq{attempt}" + (f"-{part}" if part is not None else "")
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", failed_name or "cpb")
    base = re.sub(r"-rq\d+(-\d+)?$", "", base).strip("-_") or "cpb"  # a retry of a retry: count, do not stack
    return base[: NAME_LIMIT - len(suffix)] + suffix


def _env_of(job: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in (job.get("container") or {}).get("environment", [])}


def find_job(batch: Any, queue: str, name: str, run_id: Optional[str], output: str) -> Optional[dict]:
    """A job already submitted under `name` for this run (an earlier attempt whose answer was lost)."""
    found, token = [], None
    while True:
        kwargs: dict = {"jobQueue": queue, "filters": [{"name": "JOB_NAME", "values": [name]}]}
        if token:
            kwargs["nextToken"] = token
        page = batch.list_jobs(**kwargs)
        found += [j for j in page.get("jobSummaryList", []) if j.get("jobName") == name and ":" not in j["jobId"]]
        token = page.get("nextToken")
        if not token:
            break
    for job in sorted(describe(batch, [j["jobId"] for j in found]) if found else [], key=lambda j: j.get("createdAt", 0)):
        env = _env_of(job)
        if env.get("CPB_OUTPUT", "").strip("/") == output and env.get("CPB_RUN_ID") == run_id:
            return job
    return None


def _retryable(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    code = str(response.get("Error", {}).get("Code", ""))
    return status >= 500 or code in ("TooManyRequestsException", "ThrottlingException") or not response


def submit_once(batch: Any, batch_submit: Any, plan: Planned, output: str,
                sleep: Callable[[float], None] = time.sleep) -> tuple[str, bool]:
    """(job id, adopted): the job under `plan.name`, found or submitted, never two.

    Each attempt looks the name up first; only then does it submit (through `batch_submit`, a
    client without botocore retries), so a retry after a 5xx that had created the job adopts it."""
    job = plan.job
    for attempt in range(SUBMIT_ATTEMPTS):
        existing = find_job(batch, job["jobQueue"], plan.name, plan.run_id, output)
        if existing is not None:
            return existing["jobId"], True
        try:
            answer = batch_submit.submit_job(
                jobName=plan.name, jobQueue=job["jobQueue"], jobDefinition=job["jobDefinition"],
                containerOverrides={"environment": _environment(job, plan.part, plan.child, plan.run_id),
                                    "resourceRequirements": _resources(job)},
                tags={**(job.get("tags") or {}), "cpb:output": output[:256], "cpb:requeue": plan.replaces[:256]},
                propagateTags=True)  # the run's tags (cpb:stack, cpb:run-id, ...) carry over
            return answer["jobId"], False
        except Exception as exc:  # botocore ClientError / connection errors
            if not _retryable(exc) or attempt == SUBMIT_ATTEMPTS - 1:
                raise
            sleep(random.uniform(0, min(8.0, 0.5 * 2 ** attempt)))
    raise RequeueError("unreachable")  # pragma: no cover


def _memory(job: dict) -> Optional[int]:
    for item in _resources(job):
        if item["type"] == "MEMORY":
            try:
                return int(item["value"])
            except ValueError:
                return None
    return None


def _attempts(lease: Optional[dict], submissions: list[dict], part: Optional[int], job_id: str) -> int:
    """How many times this part (or plain job) was retried already, by anyone."""
    retries = (lease or {}).get("retries") or []
    for record in submissions:
        retries = retries + [j for j in record.get("jobs") or [] if isinstance(j, dict) and j.get("replaces")]
    if part is not None:
        return sum(1 for r in retries if isinstance(r, dict) and r.get("array_index") == part)
    return sum(1 for r in retries if isinstance(r, dict) and r.get("array_index") is None)


def requeue_failed(s3, batch, bucket: str, output: str, dry_run: bool = False,
                   now: Callable[[], float] = time.time, batch_submit: Any = None,
                   sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Resubmit the failed jobs and array children of `output`'s current run; one line per action."""
    state = output_status(s3, batch, bucket, output, follow_after=False)
    if any(j.status in ACTIVE for j in state.jobs):
        raise RequeueError(f"{state.output}: jobs are still running; wait for them (cpb status --watch) "
                           "so a retry is not started twice")
    lease = state.lease
    if lease is not None and lease.get("state") != "submitted":
        raise RequeueError(f"{state.output}: its current run {short(lease.get('run_id'))} is "
                           f"{lease.get('state')}, not submitted; send the message again instead")
    run_id = lease.get("run_id") if lease else None
    submissions = [] if lease is not None else load_submissions(s3, bucket, state.output)
    lines: list[str] = []
    plans: list[Planned] = []
    for view in state.jobs:
        if view.status != "FAILED":
            continue
        detail = describe(batch, [view.job_id])
        if not detail:
            raise RequeueError(f"job {view.job_id} is no longer known to Batch (older than 7 days?); "
                               "send the message again with cpb submit")
        job = detail[0]
        job_run = _env_of(job).get("CPB_RUN_ID") or run_id
        if view.array_size:
            for part, reason, _log in view.failed_children:
                attempt = _attempts(lease, submissions, part, view.job_id) + 1
                plans.append(Planned(job, part, True, job_name(view.name, attempt, part),
                                     f"{view.job_id}:{part - view.array_offset}", reason, job_run))
                lines.append(f"{state.output}: resubmit child {part} of {view.name} (was: {reason})")
        else:
            attempt = _attempts(lease, submissions, view.array_index, view.job_id) + 1
            plans.append(Planned(job, view.array_index, False, job_name(view.name, attempt, view.array_index),
                                 view.job_id, view.reason, job_run))
            lines.append(f"{state.output}: resubmit {view.name} (was: {view.reason})")
    if dry_run or not plans:
        return lines
    done: list[dict] = []
    for plan in plans:
        job_id, adopted = submit_once(batch, batch_submit or batch, plan, state.output, sleep)
        done.append({"job_id": job_id, "job_name": plan.name, "replaces": plan.replaces, "array_index": plan.part,
                     "reason": plan.was[:300], "memory_mib": _memory(plan.job), "by": "requeue", "at": iso(now())})
        lines.append(f"  {'found already submitted' if adopted else 'new'} job {job_id} ({plan.name})")
    if lease is not None:
        _record_in_lease(s3, bucket, state.output, run_id, done)
    else:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now()))
        record = {"message_id": f"{REQUEUE_PREFIX}{stamp}", "requeued_at": stamp, "jobs": done}
        key = f"{state.output}/_cpb/submission-{REQUEUE_PREFIX}{stamp}-{done[0]['job_id'][:8]}.json"
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(record, indent=2).encode(),
                      ContentType="application/json")
    return lines


def _record_in_lease(s3, bucket: str, output: str, run_id: Optional[str], done: list[dict]) -> None:
    """Append the retries to the lease (conditional write), once each, if it still names this run."""
    def change(lease: dict) -> Optional[dict]:
        if lease.get("run_id") != run_id:
            raise RequeueError(f"{output}: a new run {short(lease.get('run_id'))} replaced run {short(run_id)} "
                               "while requeueing; its jobs stop on their own (superseded)")
        known = {r.get("job_id") for r in lease.get("retries") or [] if isinstance(r, dict)}
        fresh = [r for r in done if r["job_id"] not in known]
        if not fresh:
            return None
        lease["retries"] = list(lease.get("retries") or []) + fresh
        return lease
    update_lease(s3, bucket, output, change)


def redrive_dlq(sqs, dlq_url: str, queue_url: str, validate: Callable[[str], object], force: bool = False,
                dry_run: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Move DLQ messages back to the job queue; keep those that still fail validation.

    Returns (moved message ids, [(kept id, reason)]). A message is deleted from the DLQ only after
    SQS accepted its copy, so nothing is lost. The copy carries the message attribute
    `cpb-original-message-id` (the first id it had), so the Lambda knows it for the message it
    already ran parts of, and never submits an entry twice under the new id.
    """
    moved: list[str] = []
    kept: dict[str, str] = {}
    idle = 0
    while idle < 2:
        got = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                  VisibilityTimeout=30, MessageAttributeNames=["All"])
        messages = []
        for message in got.get("Messages", []):
            if message["MessageId"] in kept:  # seen and kept: leave it visible for the next look
                sqs.change_message_visibility(QueueUrl=dlq_url, ReceiptHandle=message["ReceiptHandle"],
                                              VisibilityTimeout=0)
            else:
                messages.append(message)
        if not messages:
            idle += 1
            continue
        idle = 0
        for message in messages:
            body = message.get("Body", "")
            try:
                validate(body)
                problem = None
            except Exception as exc:  # the schema's one-line reason
                problem = str(exc)
            if dry_run or (problem and not force):
                if problem:
                    kept[message["MessageId"]] = problem
                elif dry_run:
                    moved.append(message["MessageId"])
                    kept[message["MessageId"]] = "dry run"
                sqs.change_message_visibility(QueueUrl=dlq_url, ReceiptHandle=message["ReceiptHandle"],
                                              VisibilityTimeout=0)
                continue
            attributes = dict(message.get("MessageAttributes") or {})
            original = (attributes.get(ORIGINAL_ID_ATTRIBUTE) or {}).get("StringValue") or message["MessageId"]
            attributes[ORIGINAL_ID_ATTRIBUTE] = {"DataType": "String", "StringValue": original}
            sqs.send_message(QueueUrl=queue_url, MessageBody=body, MessageAttributes=_sendable(attributes))
            sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=message["ReceiptHandle"])
            moved.append(message["MessageId"])
    return moved, [(k, v) for k, v in kept.items() if v != "dry run"]


def _sendable(attributes: dict) -> dict:
    """Received message attributes in SendMessage's shape (no list values, which SQS does not accept back)."""
    out = {}
    for name, value in attributes.items():
        kept = {k: v for k, v in value.items() if k in ("DataType", "StringValue", "BinaryValue")}
        if kept.get("DataType"):
            out[name] = kept
    return out


__all__ = ["RequeueError", "requeue_failed", "redrive_dlq", "job_name", "find_job", "submit_once", "read_lease"]
