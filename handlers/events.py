"""The job-events Lambda: Batch "Job State Change" -> job outcome files, out-of-memory retries, metrics.

Entry point `handlers.events.handler(event, context)`, invoked by an EventBridge rule on
`aws.batch` / `Batch Job State Change` (status SUCCEEDED or FAILED, this stack's job queue).
`event["detail"]` is the DescribeJobs job shape. For every job or array child of a cpb run
(its container environment carries `CPB_OUTPUT` in this stack's `CPB_BUCKET`):

1. a job or child that FAILED for memory (exit code 137 that is not a timeout or a host
   failure, or `OutOfMemoryError` in a reason) is resubmitted as a plain job (a child with
   `CPB_ARRAY_INDEX` = its part) with twice its memory, at most `CPB_MAX_MEMORY_MIB`, at most
   `CPB_OOM_MAX_RETRIES` times (default 2), with the same `CPB_RUN_ID` and `CPB_OOM_RETRY=n`,
   tagged `cpb:stack` = `CPB_STACK` like every job of the stack; only while the output's lease
   still names that run. The retry's name is deterministic
   (`<name>-oom<n>` / `<name>-oom<n>-<part>`) and looked up in Batch before submitting, and the
   retry is appended to the lease's `retries` with a conditional write, so a duplicate event
   (EventBridge delivers at least once) adopts it instead of starting a second copy. Two
   invocations handling the same failed job AT ONCE (the child's own event and its parent's) are
   kept to one retry by a claim: the job's event file (2), created (`IfNoneMatch`) with a
   `retry_claim` before SubmitJob; the other invocation adopts the claimed retry or, while its
   holder has not submitted yet, leaves it to the holder;
2. `<output>/_cpb/events/<job id>.json` is written (create-only: a duplicate event finds it;
   a memory failure's is created as its retry's claim and then names the retry)
   = {"job_id", "job_name", "array_index", "status", "status_reason", "exit_code",
   "container_reason", "memory_mib", "run_id", "oom_retry", "retried_by", "at"};
3. CloudWatch metrics in EMF (Powertools Metrics), namespace `CellPaintingBatch`, one dimension
   `Stack` (= `CPB_STACK`): `JobsSucceeded` / `JobsFailed` count plain jobs and array CHILDREN
   (the units of work; array parents are not counted, their children are), once each (on the
   create of their event file); `OutOfMemoryRetries` counts retries submitted.

An array PARENT that failed also has its failed children looked up (ListJobs) and handled as in
1-2: the retries do not depend on Batch delivering an event per child.

Environment: `CPB_BUCKET`, `CPB_MAX_MEMORY_MIB` (the stack's `jobMaxMemoryMib`),
`CPB_OOM_MAX_RETRIES` (`oomMaxRetries`, default 2), `CPB_STACK` (the stack name, metric dimension).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import os
import re
import time
import uuid
from typing import Any, Callable, Optional

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

from handlers.ingress import RETRY_CONFIG, SUBMIT_CONFIG, require_conditional_writes
from handlers.lease import Leases, conditional_failed, error_code, lease_key
from handlers.schema import Limits
from handlers.submission import NAME_LIMIT, Submitter

__all__ = ["handler", "process_event", "Settings", "EventServices", "services", "reset_services", "out_of_memory",
           "retry_name", "event_key", "metrics", "logger", "NAMESPACE", "DEFAULT_OOM_MAX_RETRIES"]

logger = Logger(service="cpb-events")
NAMESPACE = "CellPaintingBatch"
#: service="" keeps Powertools from adding a `service` dimension (POWERTOOLS_SERVICE_NAME): the
#: dashboard reads these metrics by their one `Stack` dimension.
metrics = Metrics(namespace=NAMESPACE, service="")
DEFAULT_OOM_MAX_RETRIES = 2
_OOM_SUFFIX = re.compile(r"-oom[0-9]+(-[0-9]+)?$")
_DESCRIBE_LIMIT = 100


@dataclasses.dataclass(frozen=True)
class Settings:
    bucket: str
    max_memory_mib: int
    oom_max_retries: int
    stack: str  # the metrics' Stack dimension ("unknown" when CPB_STACK is not set)
    stack_tag: str = ""  # CPB_STACK as given: the `cpb:stack` tag of resubmitted jobs

    @classmethod
    def from_env(cls, environ: dict) -> "Settings":
        limits = Limits.from_env(environ)  # validates CPB_BUCKET and CPB_MAX_MEMORY_MIB
        raw = (environ.get("CPB_OOM_MAX_RETRIES") or "").strip()
        try:
            retries = int(raw) if raw else DEFAULT_OOM_MAX_RETRIES
        except ValueError:
            raise ValueError(f"CPB_OOM_MAX_RETRIES={raw!r} is not a whole number") from None
        if retries < 0:
            raise ValueError(f"CPB_OOM_MAX_RETRIES={retries} is negative")
        return cls(bucket=limits.bucket, max_memory_mib=limits.max_memory_mib, oom_max_retries=retries,
                   stack=limits.stack or "unknown", stack_tag=limits.stack)


@dataclasses.dataclass(frozen=True)
class EventServices:
    s3: Any
    batch: Any
    batch_submit: Any
    settings: Settings


@functools.lru_cache(maxsize=1)
def _services_for(settings: tuple) -> EventServices:
    session = boto3.session.Session()
    s3 = session.client("s3", config=RETRY_CONFIG)
    require_conditional_writes(s3)
    return EventServices(s3=s3, batch=session.client("batch", config=RETRY_CONFIG),
                         batch_submit=session.client("batch", config=SUBMIT_CONFIG),
                         settings=Settings.from_env(dict(settings)))


def services() -> EventServices:
    relevant = ("CPB_", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    return _services_for(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(relevant))))


def reset_services() -> None:
    _services_for.cache_clear()


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
def handler(event: dict, context: Any) -> dict:
    """Lambda entry point. Raises on AWS trouble so EventBridge's async invocation retries the event."""
    svc = services()
    metrics.set_default_dimensions(Stack=svc.settings.stack)
    return process_event(event, context, svc)


def process_event(event: dict, context: Any, svc: EventServices, clock: Callable[[], float] = time.time) -> dict:
    """Handle one Batch job state change; returns what was done (for logs and tests)."""
    detail = (event or {}).get("detail") or {}
    if (event or {}).get("detail-type") != "Batch Job State Change" or not detail.get("jobId"):
        logger.warning("not a Batch job state change; ignored", extra={"detail_type": (event or {}).get("detail-type")})
        return {"ignored": "not a Batch job state change"}
    env = _environment(detail)
    if not env.get("CPB_OUTPUT") or env.get("CPB_BUCKET") != svc.settings.bucket:
        return {"ignored": "not a cpb job of this stack"}
    deadline = clock() + (context.get_remaining_time_in_millis() / 1000.0
                          if context is not None and hasattr(context, "get_remaining_time_in_millis") else 300.0)
    owner = f"{getattr(context, 'aws_request_id', None) or 'local'}/{uuid.uuid4().hex[:8]}"
    handling = _Handling(svc=svc, clock=clock, owner=owner, deadline=deadline, at=str(event.get("time") or ""))
    done = [handling.job(detail)]
    arrays = detail.get("arrayProperties") or {}
    if detail.get("status") == "FAILED" and "size" in arrays and arrays.get("index") is None:
        done += [handling.job(child) for child in handling.failed_children(detail["jobId"])]
    return {"jobs": done}


def _environment(detail: dict) -> dict:
    return {e.get("name"): e.get("value") for e in (detail.get("container") or {}).get("environment") or []
            if isinstance(e, dict)}


def _memory_mib(detail: dict, env: dict) -> Optional[int]:
    for value in (env.get("CPB_MEMORY_MIB"),
                  next((r.get("value") for r in (detail.get("container") or {}).get("resourceRequirements") or []
                        if r.get("type") == "MEMORY"), None),
                  (detail.get("container") or {}).get("memory")):
        try:
            if value is not None and int(value) > 0:
                return int(value)
        except (TypeError, ValueError):
            continue
    return None


def _vcpus(detail: dict, env: dict) -> Optional[str]:
    value = next((r.get("value") for r in (detail.get("container") or {}).get("resourceRequirements") or []
                  if r.get("type") == "VCPU"), None)
    return str(value) if value is not None else env.get("CPB_VCPUS")


#: The status reason Batch gives whenever a job's container exits by itself (any exit code).
CONTAINER_EXITED = "Essential container in task exited"


def out_of_memory(detail: dict) -> Optional[str]:
    """Why a FAILED job failed for memory, else None: `OutOfMemoryError` in a reason (the container
    hit its memory limit), or exit code 137 with no reason but the container's own exit (the worker
    exits 137 when the kernel killed a CellProfiler process). Exit 137 after a timeout ("Job attempt
    duration exceeded timeout"), a lost host ("Host EC2 ...") or a TerminateJob (its reason) is not memory."""
    container = detail.get("container") or {}
    attempts = detail.get("attempts") or []
    last = (attempts[-1] if attempts else {}) or {}
    reasons = [container.get("reason"), detail.get("statusReason"), (last.get("container") or {}).get("reason"),
               last.get("statusReason")]
    reasons = [str(r) for r in reasons if r]
    oom = next((r for r in reasons if "OutOfMemoryError" in r), None)
    if oom:
        return oom[:200]
    exit_code = container.get("exitCode", (last.get("container") or {}).get("exitCode"))
    if exit_code == 137 and all(r == CONTAINER_EXITED for r in reasons):
        return "exit code 137 (a process was killed: out of memory)"
    return None


def retry_name(job_name: str, attempt: int, part: Optional[int]) -> str:
    """Deterministic name of out-of-memory retry `attempt` of a job (`part`: its array index)."""
    base = _OOM_SUFFIX.sub("", job_name) or "cpb"
    suffix = f"-oom{attempt}" + (f"-{part}" if part is not None else "")
    return base[: NAME_LIMIT - len(suffix)].rstrip("-_") + suffix


def event_key(output: str, job_id: str) -> str:
    return f"{output}/_cpb/events/{job_id}.json"


class _ClaimedElsewhere:
    """`_retry`'s answer when another live invocation holds the retry's claim and has not submitted yet."""


_CLAIMED_ELSEWHERE = _ClaimedElsewhere()


@dataclasses.dataclass
class _Handling:
    svc: EventServices
    clock: Callable[[], float]
    owner: str
    deadline: float
    at: str

    def __post_init__(self) -> None:
        limits = Limits(bucket=self.svc.settings.bucket, max_memory_mib=max(self.svc.settings.max_memory_mib, 4096))
        self.leases = Leases(s3=self.svc.s3, batch=self.svc.batch, bucket=self.svc.settings.bucket, owner=self.owner,
                             lease_until=self.deadline, clock=self.clock)
        self.submitter = Submitter(s3=self.svc.s3, batch=self.svc.batch, batch_submit=self.svc.batch_submit,
                                   limits=limits, owner=self.owner, lease_until=self.deadline, clock=self.clock,
                                   leases=self.leases)

    # ---------------------------------------------------------------- one job
    def job(self, detail: dict) -> dict:
        env = _environment(detail)
        output, job_id, status = env.get("CPB_OUTPUT", ""), detail["jobId"], detail.get("status")
        arrays = detail.get("arrayProperties") or {}
        is_parent = "size" in arrays and arrays.get("index") is None and ":" not in job_id
        part = self._part(job_id, env, arrays)
        memory = _memory_mib(detail, env)
        container = detail.get("container") or {}
        record = {"job_id": job_id, "job_name": detail.get("jobName"), "array_index": part, "status": status,
                  "status_reason": detail.get("statusReason"), "exit_code": container.get("exitCode"),
                  "container_reason": container.get("reason"), "memory_mib": memory, "run_id": env.get("CPB_RUN_ID"),
                  "oom_retry": int(env["CPB_OOM_RETRY"]) if (env.get("CPB_OOM_RETRY") or "").isdigit() else None,
                  "retried_by": None, "array_size": arrays.get("size") if is_parent else None,
                  "at": self.at or dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc).isoformat(timespec="seconds")}
        reason = out_of_memory(detail) if status == "FAILED" and not is_parent else None
        retried, first = None, None
        if reason:
            retried, first = self._retry(detail, env, part, memory, reason, record)
            if retried is _CLAIMED_ELSEWHERE:
                logger.info("out-of-memory retry left to the invocation holding its claim",
                            extra={"output": output, "job_id": job_id})
                return {"job_id": job_id, "status": status, "output": output, "retried_by": None,
                        "out_of_memory": True, "retry_claimed_elsewhere": True}
            record["retried_by"] = retried
        if first is None:  # not written as a retry's claim: written now
            first = self._record(output, job_id, record)
        if first and not is_parent and status in ("SUCCEEDED", "FAILED"):
            metrics.add_metric(name="JobsSucceeded" if status == "SUCCEEDED" else "JobsFailed", unit=MetricUnit.Count,
                               value=1)
        logger.info("job event", extra={"output": output, **record, "first_record": first})
        return {"job_id": job_id, "status": status, "output": output, "retried_by": retried,
                "out_of_memory": bool(reason)}

    @staticmethod
    def _part(job_id: str, env: dict, arrays: dict) -> Optional[int]:
        """The run's part (array index, offset included) a job or child runs; None for a plain job."""
        index = arrays.get("index")
        if index is None and ":" in job_id and job_id.rsplit(":", 1)[1].isdigit():
            index = job_id.rsplit(":", 1)[1]  # a child's id is "<array job id>:<index>"
        if index is not None:
            return int(env.get("CPB_ARRAY_OFFSET") or 0) + int(index)
        if (env.get("CPB_ARRAY_INDEX") or "").isdigit():
            return int(env["CPB_ARRAY_INDEX"])
        return None

    def _record(self, output: str, job_id: str, record: dict) -> bool:
        """Create the event file; False when it already exists (a duplicate event)."""
        return self._write_event(event_key(output, job_id), record, None) is not None

    # ---------------------------------------------------------------- out-of-memory retries
    def _retry(self, detail: dict, env: dict, part: Optional[int], memory: Optional[int], reason: str,
               record: dict) -> tuple:
        """`(retry, created)`: the retry's job id (None when it is not retried, `_CLAIMED_ELSEWHERE` when
        another invocation holds its claim and is submitting it right now), and whether this invocation
        created the job's event file `record` (None: it did not touch it, the caller writes it)."""
        settings, output, run_id = self.svc.settings, env["CPB_OUTPUT"], env.get("CPB_RUN_ID")
        attempt = int(env["CPB_OOM_RETRY"]) + 1 if (env.get("CPB_OOM_RETRY") or "").isdigit() else 1
        where = {"output": output, "job_id": detail["jobId"], "array_index": part, "run_id": run_id}
        if attempt > settings.oom_max_retries:
            logger.warning("out of memory again; no retries left", extra={**where, "retries": attempt - 1})
            return None, None
        if memory is None or memory >= settings.max_memory_mib:
            logger.warning("out of memory at the stack's largest memory; not retried",
                           extra={**where, "memory_mib": memory, "max_memory_mib": settings.max_memory_mib})
            return None, None
        new_memory = min(2 * memory, settings.max_memory_mib)
        lease, etag = self.leases.read(output)
        if not run_id or lease is None or lease.get("run_id") != run_id or lease.get("state") == "cancelled":
            logger.info("out of memory in a run the output no longer runs; not retried",
                        extra={**where, "current_run_id": (lease or {}).get("run_id")})
            return None, None
        replaces = detail["jobId"]
        known = next((r for r in lease.get("retries") or [] if r.get("replaces") == replaces), None)
        if known:
            return known.get("job_id"), None  # a duplicate event: the retry exists and is recorded
        new_env = {k: v for k, v in env.items() if k.startswith("CPB_")}
        new_env.update(CPB_MEMORY_MIB=str(new_memory), CPB_OOM_RETRY=str(attempt))
        if part is not None:
            new_env.pop("CPB_ARRAY_OFFSET", None)
            new_env["CPB_ARRAY_INDEX"] = str(part)
        requirements = [{"type": "MEMORY", "value": str(new_memory)}]
        vcpus = _vcpus(detail, env)
        if vcpus:
            requirements.insert(0, {"type": "VCPU", "value": vcpus})
        tags = {k: v for k, v in (detail.get("tags") or {}).items() if k.startswith("cpb:")}
        tags.update({"cpb:run-id": run_id, "cpb:output": tags.get("cpb:output") or output[:256],
                     "cpb:oom-retry": str(attempt)})
        if settings.stack_tag:
            tags["cpb:stack"] = settings.stack_tag  # the stack's IAM lets TerminateJob stop only jobs tagged so
        arguments = {"jobName": retry_name(detail.get("jobName") or "cpb", attempt, part),
                     "jobQueue": detail["jobQueue"], "jobDefinition": detail["jobDefinition"],
                     "containerOverrides": {"environment": [{"name": k, "value": v} for k, v in new_env.items()],
                                            "resourceRequirements": requirements},
                     "tags": tags, "propagateTags": True}
        job_id, adopted, created = self._claim_and_submit(output, record, arguments, where)
        if job_id is _CLAIMED_ELSEWHERE:
            return job_id, created
        entry = {"job_id": job_id, "job_name": arguments["jobName"], "replaces": replaces, "array_index": part,
                 "reason": reason, "memory_mib": new_memory, "previous_memory_mib": memory, "oom_retry": attempt,
                 "by": "events", "at": dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(5):
            if lease is None or lease.get("run_id") != run_id or lease.get("state") == "cancelled":
                # The output moved on to another run while we submitted: the retry's worker reads the
                # lease first and exits 5 (superseded) without writing anything.
                logger.warning("out-of-memory retry left to exit: the run was superseded meanwhile",
                               extra={**where, "retry": job_id})
                return None, created
            if any(r.get("replaces") == replaces for r in lease.get("retries") or []):
                return job_id, created
            updated = dict(lease, retries=list(lease.get("retries") or []) + [entry])
            if self.leases.write(output, updated, etag, check_time=False) is not None:
                metrics.add_metric(name="OutOfMemoryRetries", unit=MetricUnit.Count, value=1)
                logger.info("out-of-memory retry submitted", extra={**where, "retry": job_id, "adopted": adopted,
                                                                    "memory_mib": new_memory, "attempt": attempt})
                return job_id, created
            lease, etag = self.leases.read(output, check_time=False)
        raise RuntimeError(f"s3://{settings.bucket}/{lease_key(output)} kept changing while recording retry {job_id}")

    def _claim_and_submit(self, output: str, record: dict, arguments: dict, where: dict) -> tuple:
        """`(job id, adopted, created)` of the out-of-memory retry of the job `record` describes, submitted
        only while holding its claim; job id `_CLAIMED_ELSEWHERE` when another live invocation holds it and
        has not submitted yet (it will, and records the retry). `created`: this invocation created the
        job's event file.

        The child's own FAILED event and its array parent's (which lists failed children) can arrive
        together: a name look-up in each is not a claim (both find nothing and both submit), and the
        events role may not stop the second copy. The claim is the failed job's own event file, created
        (`IfNoneMatch: *`) with `retried_by: null` and `retry_claim: {job_name, owner, until}` before
        SubmitJob, and given `retried_by` (claim dropped) after it. Another invocation finding it adopts
        the retry (`retried_by`, or a job under the claimed name) or, while the claim is live, stops; a
        claim whose holder died (`until` passed) or released it (`until: 0`: SubmitJob certainly
        submitted nothing), or an event file without one, is taken over with `IfMatch`."""
        key, queue, name = event_key(output, record["job_id"]), arguments["jobQueue"], arguments["jobName"]
        claim = {"job_name": name, "owner": self.owner, "until": self.deadline}
        body = dict(record, retried_by=None, retry_claim=claim)
        etag = self._write_event(key, body, None)
        created = etag is not None
        for _ in range(5):
            if etag is not None:
                break
            held, held_etag = self._read_event(key)
            if held is None:  # no one deletes event files; if it went anyway, create it again
                etag = self._write_event(key, body, None)
                created = created or etag is not None
                continue
            if held.get("retried_by"):
                return str(held["retried_by"]), True, created
            found = self.submitter.find_job(queue, name)
            if found is not None:
                return found["jobId"], True, created
            held_claim = held.get("retry_claim") or {}
            until = held_claim.get("until")
            if held_claim.get("owner") not in (None, self.owner) and isinstance(until, (int, float)) \
                    and until > self.clock():
                logger.info("another invocation is submitting this out-of-memory retry; left to it",
                            extra={**where, "claimed_by": held_claim.get("owner")})
                return _CLAIMED_ELSEWHERE, False, created
            body = dict(held, retried_by=None, retry_claim=claim)  # its holder died or released it: take over
            etag = self._write_event(key, body, held_etag)
        else:
            raise RuntimeError(f"s3://{self.svc.settings.bucket}/{key} kept changing while claiming retry {name}")

        def release() -> None:  # SubmitJob certainly submitted nothing: a redelivered event may claim at once
            try:
                self._write_event(key, dict(body, retry_claim=dict(claim, owner=None, until=0)), etag)
            except Exception:
                logger.warning("could not release the out-of-memory retry claim in %s", key, exc_info=True)

        job_id, _, adopted = self.submitter.find_or_submit(arguments, release=release)
        done = {k: v for k, v in body.items() if k != "retry_claim"}
        try:  # best effort: the lease's `retries` is the record; this saves a loser a Batch look-up
            self._write_event(key, dict(done, retried_by=job_id), etag)
        except Exception:
            logger.warning("could not name the retry in the event file %s", key, exc_info=True)
        return job_id, adopted, created

    def _write_event(self, key: str, body: dict, etag: Optional[str]) -> Optional[str]:
        """Create (etag None) or replace an event file; None when someone else's write got there first."""
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            response = self.svc.s3.put_object(Bucket=self.svc.settings.bucket, Key=key, ContentType="application/json",
                                              Body=json.dumps(body, indent=1, sort_keys=True).encode(), **condition)
        except Exception as exc:
            if conditional_failed(exc):
                return None
            raise
        return response["ETag"]

    def _read_event(self, key: str) -> tuple:
        try:
            obj = self.svc.s3.get_object(Bucket=self.svc.settings.bucket, Key=key)
        except Exception as exc:
            if error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None, None
            raise
        return json.loads(obj["Body"].read()), obj["ETag"]

    # ---------------------------------------------------------------- array parents
    def failed_children(self, array_job_id: str) -> list:
        """DescribeJobs details of the FAILED children of an array job."""
        ids, token = [], None
        while True:
            kwargs = {"arrayJobId": array_job_id, "jobStatus": "FAILED"}
            if token:
                kwargs["nextToken"] = token
            page = self.svc.batch.list_jobs(**kwargs)
            ids += [j["jobId"] for j in page.get("jobSummaryList", []) if ":" in j.get("jobId", "")]
            token = page.get("nextToken")
            if not token:
                break
        out = []
        for start in range(0, len(ids), _DESCRIBE_LIMIT):
            out += self.svc.batch.describe_jobs(jobs=ids[start:start + _DESCRIBE_LIMIT]).get("jobs", [])
        return [d for d in out if d.get("status") == "FAILED"]

