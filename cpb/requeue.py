"""Resubmit only what failed, and redrive dead-lettered messages.

A 500-well plate with 3 failed array children should cost 3 jobs to fix,
not 500. Failed single jobs are resubmitted with the environment they ran
with; a failed array child becomes a single job with `CPB_ARRAY_INDEX` set
(Batch reserves `AWS_BATCH_*` names and has no array of one), which the
worker treats as its array index. Each resubmission is written to a
submission record under `<output>/_cpb/` so `cpb status` follows the new job
instead of the old failure.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Optional

from cpb.status import describe, output_status

REQUEUE_PREFIX = "requeue-"


class RequeueError(Exception):
    """Nothing safe to resubmit (e.g. the failed job's details are gone)."""


def _environment(job: dict, index: Optional[int]) -> list[dict]:
    """The job's environment minus Batch's own variables, plus the array index."""
    env = {e["name"]: e["value"] for e in (job.get("container") or {}).get("environment", [])
           if not e["name"].startswith("AWS_BATCH_")}
    if index is not None:
        env["CPB_ARRAY_INDEX"] = str(index)
    return [{"name": k, "value": v} for k, v in sorted(env.items())]


def _resources(job: dict) -> list[dict]:
    container = job.get("container") or {}
    found = {r["type"]: r["value"] for r in container.get("resourceRequirements", []) or []}
    if "VCPU" not in found and container.get("vcpus"):
        found["VCPU"] = str(container["vcpus"])
    if "MEMORY" not in found and container.get("memory"):
        found["MEMORY"] = str(container["memory"])
    return [{"type": k, "value": v} for k, v in sorted(found.items())]


def _resubmit(batch, job: dict, index: Optional[int]) -> dict:
    name = job.get("jobName", "cpb")[:100] + (f"-child{index}" if index is not None else "") + "-requeue"
    answer = batch.submit_job(jobName=name[:128], jobQueue=job["jobQueue"], jobDefinition=job["jobDefinition"],
                              containerOverrides={"environment": _environment(job, index),
                                                  "resourceRequirements": _resources(job)})
    return {"job_id": answer["jobId"], "job_name": name[:128], "array_index": index,
            "replaces": job["jobId"] if index is None else f"{job['jobId']}:{index}"}


def requeue_failed(s3, batch, bucket: str, output: str, dry_run: bool = False,
                   now: Callable[[], float] = time.time) -> list[str]:
    """Resubmit the failed jobs and array children of `output`; one line per action."""
    state = output_status(s3, batch, bucket, output)
    if state.verdict == "running":
        raise RequeueError(f"{state.output}: jobs are still running; wait for them (cpb status --watch) "
                           "so a retry is not started twice")
    lines: list[str] = []
    submitted: list[dict] = []
    for view in state.jobs:
        if view.status != "FAILED":
            continue
        detail = describe(batch, [view.job_id])
        if not detail:
            raise RequeueError(f"job {view.job_id} is no longer known to Batch (older than 7 days?); "
                               "send the message again with cpb submit")
        job = detail[0]
        if view.array_size:
            for index, reason, _log in view.failed_children:
                lines.append(f"{state.output}: resubmit child {index} of {view.name} (was: {reason})")
                if not dry_run:
                    submitted.append(_resubmit(batch, job, index))
        else:
            lines.append(f"{state.output}: resubmit {view.name} (was: {view.reason})")
            if not dry_run:
                submitted.append(_resubmit(batch, job, None))
    if submitted:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now()))
        record = {"message_id": f"{REQUEUE_PREFIX}{stamp}", "requeued_at": stamp, "jobs": submitted}
        key = f"{state.output}/_cpb/submission-{REQUEUE_PREFIX}{stamp}-{submitted[0]['job_id'][:8]}.json"
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(record, indent=2).encode(),
                      ContentType="application/json")
        lines.extend(f"  new job {s['job_id']} ({s['job_name']})" for s in submitted)
    return lines


def redrive_dlq(sqs, dlq_url: str, queue_url: str, validate: Callable[[str], object], force: bool = False,
                dry_run: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Move DLQ messages back to the job queue; keep those that still fail validation.

    Returns (moved message ids, [(kept id, reason)]). A message is deleted
    from the DLQ only after SQS accepted its copy, so nothing is lost.
    """
    moved: list[str] = []
    kept: dict[str, str] = {}
    idle = 0
    while idle < 2:
        got = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                  VisibilityTimeout=30)
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
            sqs.send_message(QueueUrl=queue_url, MessageBody=body)
            sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=message["ReceiptHandle"])
            moved.append(message["MessageId"])
    return moved, [(k, v) for k, v in kept.items() if v != "dry run"]
