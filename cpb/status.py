"""What happened to an output: its current run (the lease), Batch states, run records, retries, DLQ.

Batch says whether a container ran; only the worker's run record says the results are there (a
container can exit 0 having done nothing). So an output counts as succeeded only when both agree,
and a Batch job that "succeeded" without a record of the current run is reported as failed, never
as done. The jobs followed are the current run's (the lease's `jobs` and `retries`); outputs from
before leases are followed through their submission records.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from cpb import receipts
from cpb.lease import lease_jobs, message_identity, read_lease
from cpb.runrecords import (DEPENDENCY_FAILED, RunState, dependency_failure, list_keys, load_submissions,
                             part_name, read_json, refusal_first_at, run_state, short,
                             taken_by_lambda, no_longer_coming)

#: `<output>/_cpb/refusal-<id>.json`: why the ingress Lambda refused a message (`handlers.refusals`).
REFUSAL_PREFIX = "_cpb/refusal-"

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
    failed_children: list[tuple[int, str, str]] = field(default_factory=list)  # part index, reason, log
    array_index: Optional[int] = None  # set on a retried array child (requeue or out of memory)
    array_offset: int = 0              # part index of child 0 (runs of more than 10,000 children)
    depends_on: list[str] = field(default_factory=list)
    stopped_at: dict = field(default_factory=dict)  # part index (None: the job itself) -> Batch's stoppedAt (ms)


@dataclass
class OutputStatus:
    """Everything `cpb status` knows about one output prefix."""

    output: str
    jobs: list[JobView]
    run: RunState
    message_ids: list[str]
    dead_letters: list = field(default_factory=list)  # DeadLetter messages naming this output
    upstream: list[tuple[str, str]] = field(default_factory=list)  # (after output, its verdict)
    not_taken: list[dict] = field(default_factory=list)  # receipts of messages the Lambda has not taken
    skipped_note: Optional[str] = None  # `cpb plate` found this step up to date and sent nothing
    taken: Optional[Callable[[str], bool]] = None  # identity -> taken by the Lambda, or refused as invalid before this run
    refusals: list[dict] = field(default_factory=list)  # the Lambda's refusal records of messages not taken
    oom_pending: set = field(default_factory=set)  # (job id, part index or None) out of memory, retry on its way

    @property
    def invalid_refusals(self) -> list[dict]:
        """Messages the Lambda refused as invalid: they never pass as they are."""
        return [r for r in self.refusals if r.get("kind") != "busy"]

    @property
    def busy_refusals(self) -> list[dict]:
        """Messages the Lambda left on the queue because the output was in use: they run later."""
        return [r for r in self.refusals if r.get("kind") == "busy"]

    @property
    def lease(self) -> Optional[dict]:
        return self.run.lease

    @property
    def waiting_for(self) -> list[str]:
        """`after` outputs this run still waits for."""
        return [o for o, verdict in self.upstream if verdict not in ("succeeded", "failed")]

    @property
    def dead_lettered_run(self) -> bool:
        """The message that claimed the current run (lease `pending`, no job in Batch) is in the DLQ:
        the Lambda gave up submitting it, so no job will come."""
        identity = str((self.lease or {}).get("message_id") or "")
        return bool(identity) and any(d.identity and (identity == d.identity or identity.startswith(d.identity + "#"))
                                      for d in self.dead_letters)

    @property
    def verdict(self) -> str:
        """`succeeded`, `failed`, `running`, `waiting` (for the Lambda or an `after` output)."""
        if self.lease and self.lease.get("state") == "cancelled":
            return "failed"
        if any(self._failed(j) for j in self.jobs):
            return "failed"
        if self.oom_pending:
            return "running"  # the job-events Lambda is resubmitting them with more memory
        if any(j.status in ACTIVE for j in self.jobs):
            if self.waiting_for and all(_not_started(j) for j in self.jobs if j.status in ACTIVE):
                return "waiting"
            return "running"
        if self.invalid_refusals:
            return "failed"  # the latest message for this output was refused: it never runs as it is
        if self.not_taken or self.busy_refusals:
            return "waiting"  # a newer message is on its way: the current run is not the one asked for
        if self.run.complete:
            return "succeeded"
        if any(p.status == "failed" for p in self.run.parts) or self.run.conflicts:
            return "failed"
        if self.lease and self.lease.get("state") == "pending" and not self.jobs:
            return "failed" if self.dead_lettered_run else "waiting"
        if self.jobs or self.dead_letters:  # Batch finished without records, or the message was dead-lettered
            return "failed"
        return "waiting"

    def _failed(self, job: JobView) -> bool:
        """Failed, not counting out-of-memory failures whose retry the job-events Lambda is making."""
        if job.failed_children:
            return any((job.job_id, index) not in self.oom_pending for index, _, _ in job.failed_children)
        return job.status == "FAILED" and (job.job_id, None) not in self.oom_pending

    def problems(self) -> list[str]:
        """Reasons, one line each, for anything not succeeded.

        A failed array child is one line: Batch's reason plus the worker's own (from its run
        record) when Batch's does not already say it.
        """
        lines = [refusal_line(r) for r in self.invalid_refusals]
        parts = {p.index: p for p in self.run.parts}
        explained: set = set()
        memory = _lease_memory(self.lease)
        for job in self.jobs:
            if job.status == "FAILED" and not job.failed_children:
                if job.reason.startswith(DEPENDENCY_FAILED):
                    lines.append(f"job {job.name} ({job.job_id}) not run: {self._dependency_failure(False)}")
                elif (job.job_id, None) in self.oom_pending:
                    lines.append(f"job {job.name} ({job.job_id}) {OOM_PENDING}")
                else:
                    lines.append(f"job {job.name} ({job.job_id}) failed: {job.reason or 'no reason given'}"
                                 + _memory_hint(job.reason, memory.get(job.job_id))
                                 + (f" [log stream {job.log_stream}]" if job.log_stream else ""))
                explained.update(p.index for p in self.run.parts if job.array_index is None or p.index == job.array_index)
            blocked = []  # children Batch failed by dependency: one line for all of them
            for index, reason, log in job.failed_children:
                part = parts.get(index)
                if (job.job_id, index) in self.oom_pending:
                    lines.append(f"job {job.name} child {index} {OOM_PENDING}")
                    explained.add(index)
                    continue
                if (reason or "").startswith(DEPENDENCY_FAILED) or (part is not None and part.not_run):
                    blocked.append(index)
                    continue
                worker = part.reason if part is not None and part.record is not None else ""
                text = reason or "no reason given"
                if worker and worker not in text:
                    text = f"{text}; worker: {worker}"
                lines.append(f"job {job.name} child {index} failed: {text}"
                             + _memory_hint(reason, memory.get(job.job_id)) + (f" [log stream {log}]" if log else ""))
                explained.add(index)
            if blocked:
                lines.append(f"job {job.name} {_child_span(blocked)} not run: {self._dependency_failure(len(blocked) > 1)}")
                explained.update(blocked)
        if self.verdict not in ("running", "waiting"):
            lines.extend(f"run record {p.prefix or self.output}: {p.status}: {p.reason}"
                         for p in self.run.parts if p.status != "succeeded" and p.index not in explained)
            if not self.run.parts or (self.run.array and self.run.expected is None):
                lines.extend(f"run record {line}" for line in self.run.problems()
                             if "no results" in line or "cannot tell" in line)
            lines.extend(self.run.conflicts)
        return lines


    def _dependency_failure(self, they: bool) -> str:
        """Why Batch failed a job (or children) by dependency: the `after` steps that failed, and what to do."""
        after = [str(a) for a in (self.lease or {}).get("after") or []]
        return dependency_failure(after, [o for o, verdict in self.upstream if verdict == "failed"], they)


def refusal_line(refusal: dict) -> str:
    """A refusal record as people read it: which message, when, why, and what to do."""
    when = f"delivery {refusal.get('receive_count') or '?'}, {refusal.get('at')}"
    if refusal.get("kind") == "busy":
        return (f"message {refusal.get('message_id')} waits in the queue (refused for now, {when}): "
                f"{refusal.get('reason')}. SQS redelivers it after the queue's visibility timeout and it runs once that "
                "run has ended, replacing it (after maxReceiveCount deliveries it goes to the dead-letter queue); "
                "to drop it instead, purge the queue")
    return (f"message {refusal.get('message_id')} was refused by the Lambda ({when}): {refusal.get('reason')}. It will "
            "never pass as it is: SQS retries it until maxReceiveCount, then moves it to the dead-letter queue; fix the "
            "message and send it again (and purge the queue, or the old one keeps failing until then)")


#: a message left on the queue because its output was in use is redelivered every visibility timeout
#: (6 x lambdaTimeoutSeconds, at most 90 minutes); with no delivery for this long it was purged or
#: dead-lettered and no longer keeps its output WAITING
BUSY_STALE_SECONDS = 2 * 3600


def _age_seconds(stamp: object, now: Optional[float] = None) -> float:
    """Seconds since an ISO time of the Lambda's (0 when it cannot be read: treated as recent)."""
    import datetime as dt
    try:
        when = dt.datetime.strptime(str(stamp)[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return 0.0
    return (time.time() if now is None else now) - when.timestamp()


def _refusals(s3, bucket: str, output: str, keys: dict[str, int], lease: Optional[dict],
              taken: Callable[[str], bool], now: Optional[float] = None) -> list[dict]:
    """The Lambda's refusal records of messages not taken since the current run began (all of them for an
    output without a lease), oldest first. Both times are the Lambda's clock; a busy refusal not
    delivered again for BUSY_STALE_SECONDS is left out (the message was purged or dead-lettered)."""
    names = sorted(k for k in keys if k.startswith(REFUSAL_PREFIX) and k.endswith(".json"))[-50:]
    since = str((lease or {}).get("created_at") or "")[:19]
    found = []
    for name in names:
        record = read_json(s3, bucket, f"{output}/{name}")
        identity = str((record or {}).get("message_id") or "")
        if not record or not identity or identity == (lease or {}).get("message_id") or taken(identity):
            continue
        if since and refusal_first_at(record) < since:
            continue  # first refused before the current run began (its redeliveries since change nothing): replaced
        if record.get("kind") == "busy" and _age_seconds(record.get("at"), now) > BUSY_STALE_SECONDS:
            continue  # not delivered again for hours: purged or dead-lettered, it will not come
        found.append(record)
    return sorted(found, key=lambda r: str(r.get("at")))


def _child_span(indices: list[int]) -> str:
    """`child 3`, `children 0-7` (contiguous), or `children 0, 2, 5 (+3 more)`."""
    indices = sorted(indices)
    if len(indices) == 1:
        return f"child {indices[0]}"
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"children {indices[0]}-{indices[-1]}"
    return "children " + ", ".join(map(str, indices[:6])) + (f" (+{len(indices) - 6} more)" if len(indices) > 6 else "")


def _lease_memory(lease: Optional[dict]) -> dict[str, object]:
    """MiB each job of the run (first jobs and retries) was given, by job id, from the lease."""
    memory: dict[str, object] = {}
    for entry in [*((lease or {}).get("jobs") or []), *((lease or {}).get("retries") or [])]:
        if isinstance(entry, dict) and entry.get("job_id") and entry.get("memory_mib"):
            memory[str(entry["job_id"])] = entry["memory_mib"]
    return memory


#: how long after an out-of-memory failure status waits for the job-events Lambda's retry (it runs
#: within seconds of Batch's event; beyond this, the failure stands and says why)
OOM_RETRY_GRACE_SECONDS = 300
OOM_PENDING = ("ran out of memory; the job-events Lambda is resubmitting it with more memory (RUNNING: "
               "the retry replaces it)")


def _out_of_memory(reason: str) -> bool:
    return "OutOfMemoryError" in (reason or "") or "exit code 137" in (reason or "")


def _oom_pending(s3, bucket: str, output: str, keys: dict[str, int], jobs: list[JobView],
                 now: Optional[float] = None) -> set:
    """(job id, part index or None) of out-of-memory failures whose retry is still being made: no job
    event yet, or one holding a retry claim without the retry, within OOM_RETRY_GRACE_SECONDS of the
    failure. Without this, status said FAILED (and --watch gave up) in the seconds before the retry."""
    now = time.time() if now is None else now
    found = set()
    for job in jobs:
        failures = ([(i, r) for i, r, _ in job.failed_children] if job.failed_children else
                    [(None, job.reason)] if job.status == "FAILED" else [])
        for index, reason in failures:
            if not _out_of_memory(reason):
                continue
            stopped = job.stopped_at.get(index)
            if stopped and now - stopped / 1000 > OOM_RETRY_GRACE_SECONDS:
                continue
            child = job.job_id if index is None or not job.array_size else _child_id(job, index)
            key = f"_cpb/events/{child}.json"
            if key in keys:
                event = read_json(s3, bucket, f"{output}/{key}") or {}
                if event.get("retried_by") or not event.get("retry_claim"):
                    continue  # retried (the lease names it) or decided without a retry
            found.add((job.job_id, index))
    return found


def _memory_hint(reason: str, memory_mib: object) -> str:
    """For a failure out of memory that no retry replaced: why, and what to do."""
    if "OutOfMemoryError" not in (reason or "") and "exit code 137" not in (reason or ""):
        return ""
    at = f" at {_gib(memory_mib)}" if memory_mib else ""
    return (f" (out of memory{at}, and no retry with more memory followed: the stack's jobMaxMemoryMib or "
            "oomMaxRetries was reached; send it again with a larger job_memory, fewer image sets or vCPUs per "
            "job, or raise jobMaxMemoryMib)")


def _not_started(job: JobView) -> bool:
    """Batch holds the job (or every child) back: PENDING is what a job waiting on `dependsOn` shows."""
    if job.status in ("SUBMITTED", "PENDING"):
        return True
    states = {state for state, count in job.children.items() if count}
    return bool(job.array_size and states and states <= {"SUBMITTED", "PENDING"})


def _job_ids(submissions: Iterable[dict]) -> list[str]:
    """Job ids named by submission records (outputs without a lease)."""
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


def job_view(batch, job: dict, offset: int = 0) -> JobView:
    """A JobView for one described job, with array children summarised (indices as part numbers)."""
    container = job.get("container") or {}
    view = JobView(job_id=job["jobId"], name=job.get("jobName", ""), status=job.get("status", "?"),
                   reason=_reason(job), log_stream=container.get("logStreamName", ""), array_offset=offset,
                   depends_on=[d.get("jobId", "") for d in job.get("dependsOn") or []],
                   stopped_at={None: job.get("stoppedAt")})
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
                    (offset + index, _reason(d), (d.get("container") or {}).get("logStreamName", "")))
                view.stopped_at[offset + index] = d.get("stoppedAt")
        if view.children.get("FAILED") and view.status not in ACTIVE:
            view.status = "FAILED"
    return view


def _child_id(view: JobView, part: int) -> str:
    """Batch's id of the child of `view` that ran part `part`."""
    return f"{view.job_id}:{part - view.array_offset}"


def output_status(s3, batch, bucket: str, output: str, expected: Optional[int] = None,
                  follow_after: bool = True) -> OutputStatus:
    """Combine the lease (or submission records), Batch and run records for one output prefix.

    Retries (`cpb requeue`, out-of-memory resubmissions) replace the failure they retry: the old
    job (or array child) is no longer counted, the new one is.
    """
    output = output.strip("/")
    keys = list_keys(s3, bucket, output)
    run = run_state(s3, bucket, output, expected, keys=keys)
    lease = run.lease
    offsets: dict[str, int] = {}
    if lease is not None:
        entries = lease_jobs(lease)
        ids = [e["job_id"] for e in entries]
        offsets = {e["job_id"]: int(e.get("array_offset") or 0) for e in entries if e.get("retry") is None}
        replaced = {str(e["retry"]["replaces"]) for e in entries if e.get("retry") and e["retry"].get("replaces")}
        index_of = {e["job_id"]: int(e["retry"]["array_index"]) for e in entries
                    if e.get("retry") and e["retry"].get("array_index") is not None}
        messages = [str(lease.get("message_id") or "")]
    else:
        submissions = load_submissions(s3, bucket, output, keys)
        ids = _job_ids(submissions)
        replaced, index_of = _requeues(submissions)
        messages = [str(s.get("message_id") or s.get("messageId") or "") for s in submissions]
    described = describe(batch, ids) if ids else []
    jobs = []
    for job in described:
        if job["jobId"] in replaced:
            continue
        view = job_view(batch, job, offsets.get(job["jobId"], 0))
        view.array_index = index_of.get(view.job_id)
        before = len(view.failed_children)
        view.failed_children = [c for c in view.failed_children if _child_id(view, c[0]) not in replaced]
        if view.array_size and view.status == "FAILED" and before and not view.failed_children:
            view.status, view.reason = "SUCCEEDED", "its failed children were retried"
        jobs.append(view)
    _mark_record_failures(jobs, run, replaced)
    taken = taken_by_lambda(s3, bucket, output, keys)
    state = OutputStatus(output, jobs, run, [m for m in messages if m], taken=no_longer_coming(s3, bucket, output, keys, lease),
                         refusals=_refusals(s3, bucket, output, keys, lease, taken),
                         oom_pending=_oom_pending(s3, bucket, output, keys, jobs))
    if lease is not None and follow_after:
        for after in lease.get("after") or []:
            upstream = output_status(s3, batch, bucket, after, follow_after=False)
            state.upstream.append((after, upstream.verdict))
    return state


def _requeues(submissions: Iterable[dict]) -> tuple[set[str], dict[str, int]]:
    """(ids replaced by a requeue, new job id -> array index it reruns), from submission records."""
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
    """Batch and records disagree: a finished job whose record (of the current run) is not
    succeeded failed, whatever Batch says (an emulator marks jobs SUCCEEDED on submit; a real
    worker can exit 0 having done nothing)."""
    parts = {p.index: p for p in run.parts}
    for job in jobs:
        if job.status in ACTIVE:
            continue
        if job.array_size:
            known = {i for i, _, _ in job.failed_children}
            mine = range(job.array_offset, job.array_offset + job.array_size)
            for part in run.parts:
                if (part.index is not None and part.index in mine and part.status != "succeeded"
                        and part.index not in known and _child_id(job, part.index) not in replaced):
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


def retry_lines(lease: Optional[dict]) -> list[str]:
    """The lease's retries as people read them, e.g. `part 3: retried with 29.3 GiB after running out
    of memory at 14.6 GiB`."""
    if not lease:
        return []
    memory = {str(j.get("job_id")): j.get("memory_mib") for j in lease.get("jobs") or [] if isinstance(j, dict)}
    lines = []
    for retry in lease.get("retries") or []:
        if not isinstance(retry, dict):
            continue
        replaces = str(retry.get("replaces") or "")
        before = retry.get("previous_memory_mib") or memory.get(replaces) or memory.get(replaces.split(":")[0])
        memory[str(retry.get("job_id"))] = retry.get("memory_mib")
        index = retry.get("array_index")
        what = f"part {index}" if index is not None else "the job"
        reason = str(retry.get("reason") or "")
        if retry.get("by") == "requeue":
            lines.append(f"{what}: requeued by cpb requeue as job {retry.get('job_id')}"
                         + (f" (was: {reason})" if reason else ""))
        elif "memory" in reason.lower():
            lines.append(f"{what}: retried with {_gib(retry.get('memory_mib'))} after running out of memory"
                         + (f" at {_gib(before)}" if before else "") + f" (job {retry.get('job_id')})")
        else:
            lines.append(f"{what}: retried as job {retry.get('job_id')}" + (f" ({reason})" if reason else ""))
    return lines


def _gib(mib: object) -> str:
    try:
        return f"{float(mib) / 1024:.1f} GiB"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "more memory"


def resumed_lines(run: RunState) -> list[str]:
    """Parts the worker reused from an earlier run (fingerprint equal), grouped by that run."""
    by_run: dict[str, list[str]] = {}
    for part in run.resumed:
        by_run.setdefault(str(part.resumed_from), []).append(part.prefix or run.output)
    return [f"up to date, reused from run {short(source)} (same pipeline, data rows, image and upstream "
            f"results): {_span(names)}" for source, names in by_run.items()]


def _span(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")


@dataclass
class DeadLetter:
    """One message in the dead-letter queue and why it is there."""

    message_id: str
    receive_count: int
    output: str
    reason: str
    body: str
    identity: str = ""


def peek_dlq(sqs, dlq_url: str, explain: Callable[["DeadLetter"], str], limit: int = 50) -> tuple[int, list[DeadLetter]]:
    """(approximate total, up to `limit` messages) from the DLQ, left in place.

    Messages are received with a zero visibility timeout so they stay available to `cpb
    requeue`; `explain` says why the Lambda gave up on each (re-validation, the output's lease).
    """
    attrs = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["ApproximateNumberOfMessages"])
    total = int(attrs.get("Attributes", {}).get("ApproximateNumberOfMessages", 0))
    seen: dict[str, DeadLetter] = {}
    idle = 0
    while len(seen) < min(limit, total) and idle < 3:
        got = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=0,
                                  WaitTimeSeconds=0, AttributeNames=["ApproximateReceiveCount"],
                                  MessageAttributeNames=["All"])
        fresh = [m for m in got.get("Messages", []) if m["MessageId"] not in seen]
        idle = 0 if fresh else idle + 1
        for message in fresh:
            body = message.get("Body", "")
            letter = DeadLetter(message_id=message["MessageId"],
                                receive_count=int(message.get("Attributes", {}).get("ApproximateReceiveCount", 0)),
                                output=_output_of(body), reason="", body=body,
                                identity=message_identity(_decoded(body), message["MessageId"],
                                                          message.get("MessageAttributes")))
            letter.reason = explain(letter)
            seen[message["MessageId"]] = letter
    return total, list(seen.values())[:limit]


def _decoded(body: str) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _output_of(body: str) -> str:
    """The `output` a message names, best effort (for matching to a prefix)."""
    value = _decoded(body)
    items = value if isinstance(value, list) else [value]
    outs = [str(i.get("output", "")).strip("/") for i in items if isinstance(i, dict)]
    return ",".join(o for o in outs if o)


def lease_refusal(s3, batch, bucket: str, letter: DeadLetter) -> Optional[str]:
    """Why the Lambda refused a valid dead letter, when an output it names is leased by another
    message's run: the contract's `output: ... is in use by run ...` line, as the client can tell it."""
    value = _decoded(letter.body)
    items = value if isinstance(value, list) else [value]
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not item.get("output"):
            continue
        output = str(item["output"]).strip("/")
        if output.startswith("s3://"):
            output = output.split("/", 3)[-1].strip("/")
        lease, _ = read_lease(s3, bucket, output)
        identity = letter.identity if not isinstance(value, list) else f"{letter.identity}#{index}"
        if not lease or lease.get("message_id") == identity:
            continue
        jobs = [j.get("job_id") for j in lease.get("jobs") or [] if isinstance(j, dict) and j.get("job_id")]
        states = {j["jobId"]: j.get("status") for j in describe(batch, jobs)} if jobs else {}
        busy = next(((j, s) for j, s in states.items() if s in ACTIVE), None)
        now = f"job {busy[0]} {busy[1]}" if busy else "it has finished since"
        return (f"output: {output} was in use by run {short(lease.get('run_id'))} of message "
                f"{lease.get('message_id')} ({now}); once that run has finished, move this message back "
                "with `cpb requeue --dlq`, or send it with another output")
    return None


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


def gather(s3, batch, sqs, bucket: str, outputs: Iterable[str], expected: Optional[int] = None,
           dlq_url: Optional[str] = None, explain: Optional[Callable[[DeadLetter], str]] = None
           ) -> tuple[list[OutputStatus], int, list[DeadLetter]]:
    """What `cpb status` shows: each output's status with this machine's notes and, when `dlq_url`
    is given, the dead letters (each matched to the outputs it names). Returns (states, DLQ total, letters)."""
    states = [output_status(s3, batch, bucket, output, expected) for output in outputs]
    for state in states:
        local_notes(state, bucket)
    total, letters = 0, []
    if dlq_url and explain is not None:
        total, letters = peek_dlq(sqs, dlq_url, explain)
        for state in states:
            state.dead_letters = [d for d in letters if state.output in d.output.split(",")]
            dead = {d.identity for d in state.dead_letters if d.identity}
            # a message the Lambda gave up on is in the DLQ (shown as such), not on its way
            state.not_taken = [r for r in state.not_taken if str(r.get("identity")).split("#")[0] not in dead
                               and r.get("identity") not in dead]
            state.refusals = [r for r in state.refusals if str(r.get("message_id")).split("#")[0] not in dead]
    return states, total, letters


def local_notes(state: OutputStatus, bucket: str) -> None:
    """What this machine's receipts add: messages sent from here not yet taken, a step `cpb plate` skipped."""
    state.not_taken = receipts.not_taken(bucket, state.output, state.lease, taken=state.taken)
    refused = {str(r.get("message_id")) for r in state.invalid_refusals}
    state.not_taken = [r for r in state.not_taken if r.get("identity") not in refused]  # shown as refused
    waiting = {str(r.get("identity")) for r in state.not_taken}
    state.refusals = [r for r in state.refusals if r.get("kind") != "busy" or str(r.get("message_id")) not in waiting]
    latest = receipts.latest(bucket, state.output)
    if latest and latest.get("kind") == "skipped":
        state.skipped_note = latest.get("note")


__all__ = ["ACTIVE", "TERMINAL", "JobView", "OutputStatus", "DeadLetter", "describe", "job_view", "output_status",
           "peek_dlq", "lease_refusal", "refusal_line", "REFUSAL_PREFIX", "retry_lines", "resumed_lines", "watch", "gather", "local_notes", "part_name"]
