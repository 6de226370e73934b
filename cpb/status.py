"""What happened to a submission: Batch states, array progress, run records, DLQ.

Batch says whether a container ran; only the worker's run record says the
results are there (a container can exit 0 having done nothing). So an output
counts as succeeded only when both agree, and a Batch job that "succeeded"
without a record is reported as failed, never as done.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from cpb.runrecords import RunState, load_submissions, run_state

TERMINAL = {"SUCCEEDED", "FAILED"}
ACTIVE = {"SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING"}


@dataclass
class JobView:
    """One Batch job (or array parent) as the user should see it."""

    job_id: str
    name: str
    status: str
    reason: str = ""
    log_stream: str = ""
    array_size: int = 0
    children: dict[str, int] = field(default_factory=dict)
    failed_children: list[tuple[int, str, str]] = field(default_factory=list)  # index, reason, log
    array_index: Optional[int] = None  # set on a requeued array child


@dataclass
class OutputStatus:
    """Everything `cpb status` knows about one output prefix."""

    output: str
    jobs: list[JobView]
    run: RunState
    message_ids: list[str]
    dead_letters: list = field(default_factory=list)  # DeadLetter messages naming this output

    @property
    def verdict(self) -> str:
        """`succeeded`, `failed`, `running` or `waiting` (not submitted yet)."""
        if any(j.status == "FAILED" or j.failed_children for j in self.jobs):
            return "failed"
        if any(j.status in ACTIVE for j in self.jobs):
            return "running"
        if self.run.complete:
            return "succeeded"
        if any(p.status == "failed" for p in self.run.parts):
            return "failed"
        if self.jobs or self.dead_letters:  # Batch finished without records, or the message was dead-lettered
            return "failed"
        return "waiting"

    def problems(self) -> list[str]:
        """Reasons, one line each, for anything not succeeded.

        A failed array child is one line: Batch's reason plus the worker's own
        (from its run record) when Batch's does not already say it.
        """
        lines = []
        parts = {p.index: p for p in self.run.parts}
        explained: set = set()
        for job in self.jobs:
            if job.status == "FAILED" and not job.failed_children:
                lines.append(f"job {job.name} ({job.job_id}) failed: {job.reason or 'no reason given'}"
                             + (f" [log stream {job.log_stream}]" if job.log_stream else ""))
                explained.update(p.index for p in self.run.parts if job.array_index is None or p.index == job.array_index)
            for index, reason, log in job.failed_children:
                part = parts.get(index)
                worker = part.reason if part is not None and part.record is not None else ""
                text = reason or "no reason given"
                if worker and worker not in text:
                    text = f"{text}; worker: {worker}"
                lines.append(f"job {job.name} child {index} failed: {text}" + (f" [log stream {log}]" if log else ""))
                explained.add(index)
        if self.verdict != "running":
            lines.extend(f"run record {p.prefix or self.output}: {p.status}: {p.reason}"
                         for p in self.run.parts if p.status != "succeeded" and p.index not in explained)
            if not self.run.parts or (self.run.array and self.run.expected is None):
                lines.extend(f"run record {line}" for line in self.run.problems()
                             if "no results" in line or "cannot tell" in line)
        return lines


def _job_ids(submissions: Iterable[dict]) -> list[str]:
    """Job ids named by the Lambda's submission records (tolerant of key style)."""
    ids = []
    for record in submissions:
        if record.get("status") == "cancelled":  # rolled back by the Lambda: not a job to follow
            continue
        for job in record.get("jobs", []) or []:
            job_id = job.get("job_id") or job.get("jobId") if isinstance(job, dict) else job
            if job_id and job_id not in ids:
                ids.append(str(job_id))
        for key in ("job_id", "jobId"):
            if record.get(key) and record[key] not in ids:
                ids.append(str(record[key]))
    return ids


def _reason(job: dict) -> str:
    """The most specific failure reason Batch gives for a job."""
    container = job.get("container") or {}
    parts = [job.get("statusReason"), container.get("reason")]
    if container.get("exitCode") not in (None, 0):
        parts.append(f"exit code {container['exitCode']}")
    return "; ".join(str(p) for p in parts if p)


def describe(batch, job_ids: list[str]) -> list[dict]:
    """describe_jobs in chunks of 100 (the API limit)."""
    found = []
    for start in range(0, len(job_ids), 100):
        found.extend(batch.describe_jobs(jobs=job_ids[start:start + 100]).get("jobs", []))
    return found


def _children(batch, job_id: str) -> list[dict]:
    """Summaries of an array job's children (all states)."""
    children = []
    for page in batch.get_paginator("list_jobs").paginate(arrayJobId=job_id):
        children.extend(page.get("jobSummaryList", []))
    return children


def job_view(batch, job: dict) -> JobView:
    """A JobView for one described job, with array children summarised."""
    container = job.get("container") or {}
    view = JobView(job_id=job["jobId"], name=job.get("jobName", ""), status=job.get("status", "?"),
                   reason=_reason(job), log_stream=container.get("logStreamName", ""))
    array = job.get("arrayProperties") or {}
    if array.get("size"):
        view.array_size = int(array["size"])
        view.children = {k: v for k, v in (array.get("statusSummary") or {}).items() if v}
        children = _children(batch, job["jobId"])
        failed = [c for c in children if c.get("status") == "FAILED"]
        if failed:
            detailed = {d["jobId"]: d for d in describe(batch, [c["jobId"] for c in failed])}
            for child in failed:
                d = detailed.get(child["jobId"], child)
                index = int(str(child["jobId"]).rsplit(":", 1)[-1])
                view.failed_children.append(
                    (index, _reason(d), (d.get("container") or {}).get("logStreamName", "")))
        if view.children.get("FAILED") and view.status not in ACTIVE:
            view.status = "FAILED"
    return view


def output_status(s3, batch, bucket: str, output: str, expected: Optional[int] = None) -> OutputStatus:
    """Combine submission records, Batch and run records for one output prefix.

    Jobs resubmitted by `cpb requeue` replace the failure they retry: the
    old job (or array child) is no longer counted, the new one is.
    """
    output = output.strip("/")
    submissions = load_submissions(s3, bucket, output)
    ids = _job_ids(submissions)
    replaced, index_of = _requeues(submissions)
    described = describe(batch, ids) if ids else []
    jobs = []
    for job in described:
        if job["jobId"] in replaced:
            continue
        view = job_view(batch, job)
        view.array_index = index_of.get(view.job_id)
        before = len(view.failed_children)
        view.failed_children = [c for c in view.failed_children if f"{view.job_id}:{c[0]}" not in replaced]
        if view.array_size and view.status == "FAILED" and before and not view.failed_children:
            view.status, view.reason = "SUCCEEDED", "its failed children were requeued"
        jobs.append(view)
    run = run_state(s3, bucket, output, expected)
    _mark_record_failures(jobs, run, replaced)
    messages = [str(s.get("message_id") or s.get("messageId") or "") for s in submissions]
    return OutputStatus(output, jobs, run, [m for m in messages if m])


def _requeues(submissions: Iterable[dict]) -> tuple[set[str], dict[str, int]]:
    """(ids replaced by a requeue, new job id -> array index it reruns)."""
    replaced: set[str] = set()
    index_of: dict[str, int] = {}
    for record in submissions:
        for job in record.get("jobs", []) or []:
            if isinstance(job, dict) and job.get("replaces"):
                replaced.add(str(job["replaces"]))
                if job.get("array_index") is not None:
                    index_of[str(job.get("job_id"))] = int(job["array_index"])
    return replaced, index_of


def _mark_record_failures(jobs: list[JobView], run: RunState, replaced: set[str]) -> None:
    """Batch and records disagree: a finished job whose record is not
    succeeded failed, whatever Batch says (an emulator marks jobs
    SUCCEEDED on submit; a real worker can exit 0 having done nothing)."""
    parts = {p.index: p for p in run.parts}
    for job in jobs:
        if job.status in ACTIVE:
            continue
        if job.array_size:
            known = {i for i, _, _ in job.failed_children}
            for part in run.parts:
                if (part.index is not None and part.status != "succeeded" and part.index not in known
                        and f"{job.job_id}:{part.index}" not in replaced):
                    job.failed_children.append((part.index, part.reason, ""))
            job.failed_children.sort()
            if job.failed_children:
                job.status = "FAILED"
        elif job.status == "SUCCEEDED":
            if job.array_index is not None:
                part = parts.get(job.array_index)
                if part is None or part.status != "succeeded":
                    job.status = "FAILED"
                    job.reason = part.reason if part else "no run record for its part"
            elif not run.complete and not run.array:
                job.status = "FAILED"
                job.reason = "; ".join(run.problems()) or "no succeeded run record"


@dataclass
class DeadLetter:
    """One message in the dead-letter queue and why it is there."""

    message_id: str
    receive_count: int
    output: str
    reason: str
    body: str


def peek_dlq(sqs, dlq_url: str, explain: Callable[[str], str], limit: int = 50) -> tuple[int, list[DeadLetter]]:
    """(approximate total, up to `limit` messages) from the DLQ, left in place.

    Messages are received with a zero visibility timeout so they stay
    available to `cpb requeue`; `explain` re-validates each body to say why
    the Lambda gave up on it.
    """
    attrs = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["ApproximateNumberOfMessages"])
    total = int(attrs.get("Attributes", {}).get("ApproximateNumberOfMessages", 0))
    seen: dict[str, DeadLetter] = {}
    idle = 0
    while len(seen) < min(limit, total) and idle < 3:
        got = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=0,
                                  WaitTimeSeconds=0, AttributeNames=["ApproximateReceiveCount"])
        fresh = [m for m in got.get("Messages", []) if m["MessageId"] not in seen]
        idle = 0 if fresh else idle + 1
        for message in fresh:
            body = message.get("Body", "")
            seen[message["MessageId"]] = DeadLetter(
                message_id=message["MessageId"],
                receive_count=int(message.get("Attributes", {}).get("ApproximateReceiveCount", 0)),
                output=_output_of(body), reason=explain(body), body=body)
    return total, list(seen.values())[:limit]


def _output_of(body: str) -> str:
    """The `output` a message names, best effort (for matching to a prefix)."""
    import json
    try:
        value = json.loads(body)
    except ValueError:
        return ""
    items = value if isinstance(value, list) else [value]
    outs = [str(i.get("output", "")) for i in items if isinstance(i, dict)]
    return ",".join(o for o in outs if o)


def watch(fetch: Callable[[], list[OutputStatus]], show: Callable[[list[OutputStatus]], None],
          interval: float, timeout: Optional[float] = None,
          sleep: Callable[[float], None] = time.sleep) -> list[OutputStatus]:
    """Refresh until nothing is running or waiting (or `timeout` seconds pass)."""
    started = time.monotonic()
    while True:
        states = fetch()
        show(states)
        if all(s.verdict in ("succeeded", "failed") for s in states):
            return states
        if timeout is not None and time.monotonic() - started > timeout:
            return states
        sleep(interval)
