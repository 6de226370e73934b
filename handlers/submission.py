"""Exactly-once submission of one job to AWS Batch, recorded in S3.

Why: SQS delivers at least once, and a Lambda can die between "Batch accepted
the job" and "we noted it". Process memory does not survive that, so each job
of a message owns a *submission record* at
`<output>/_cpb/submission-<id>.json` (docs/CONTRACTS.md), created with an S3
conditional write (`IfNoneMatch="*"`) and advanced with `IfMatch=<etag>`, so
two deliveries never both think they own it.

Protocol for one job (`Submitter.ensure_submitted`; the record is keyed by the message
IDENTITY, docs/CONTRACTS.md: the `client_token` when the sender gave one, so a message SQS
received twice is one submission):

1. no record            -> create `pending` (conditional), holding a *lease*
                           until this invocation's deadline;
2. `submitted`          -> done: return the recorded job (a redelivery);
3. `pending`, lease live-> another invocation is submitting it right now:
                           `InProgress` (the message is retried later);
4. `pending`, lease over-> the owner died (timeout/crash): take the lease over
                           (conditional replace);
5. `cancelled`          -> rolled back earlier: take it with generation + 1;
6. holding the lease: claim the OUTPUT lease for this run (`handlers.lease`:
   one run per output; refused with `OutputBusy` while another message's run
   is unfinished); then for each Batch job of the run (one, or several array
   jobs when the run has more than 10,000 children) look for a job already
   submitted under its deterministic name (the crash window between submit
   and record) with `ListJobs` filtered by name; adopt it, else `SubmitJob`;
   then mark the output lease and the record `submitted` with the job ids
   (conditional on our etags). SubmitJob is retried here, not by botocore: a
   5xx may hide a created job, so every retry looks the name up first.

The run id is `run_id_for(CPB_MESSAGE_ID, generation)`, so a redelivery computes the same one.

Job names are deterministic: a readable part (the message's `job_name`, else
the output prefix) plus a hash of (message identity, entry, generation), and
`-a<k>` for the k-th array job of a split run, so they are unique per job and
findable after a crash. A list message is all-or-nothing: `Submitter.rollback`
terminates its already-submitted jobs and marks their records and output
leases `cancelled`, so a later delivery submits every entry afresh.

Record (JSON object): `status` (pending|submitted|cancelled), `message_id`
(CPB_MESSAGE_ID), `sqs_message_id`, `client_token`, `entry` (list index or null),
`generation`, `run_id`, `job_name`, `job_queue`, `job_definition`, `job_id`,
`job_arn` (the first job), `jobs` (every Batch job of the run: `job_id`,
`job_name`, `job_queue`, `array_size`, `array_offset`, `vcpus`, `memory_mib`),
`array_size` (children of the whole run; null for a plain job),
`image_set_count`, `after`, `depends_on`, `request` (the message entry,
normalised), `lease_until` (epoch s), `owner`, `updated_at`, `submitted_at`.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import random
import re
import time
import unicodedata
from typing import Any, Callable, Optional

from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError

from handlers.lease import InProgress, Leases, LostRecord, conditional_failed
from handlers.s3checks import CheckedRequest
from handlers.schema import MAX_ARRAY_SIZE, Limits, entry_message_id, run_id_for, submission_id

__all__ = ["PlannedJob", "Submitter", "InProgress", "LostRecord", "job_name_for", "record_key", "record_key_for",
           "container_environment", "submit_arguments", "submit_plan", "array_chunks"]

logger = logging.getLogger("cpb-ingress.submission")
NAME_LIMIT = 128
SUBMIT_BACKOFF_BASE_S = 0.5
SUBMIT_BACKOFF_CAP_S = 8.0
_HASH_CHARS = 12


@dataclasses.dataclass(frozen=True)
class PlannedJob:
    """One job of one SQS message, checked against the bucket and ready to submit."""

    checked: CheckedRequest
    sqs_message_id: str
    index: Optional[int]  # list entry, None for a single-object message
    identity: Optional[str] = None  # the message identity (client_token...); None: the SQS message id
    depends_on: tuple = ()  # Batch job ids this entry's jobs wait for (its `after` outputs' unfinished jobs)
    #: the (lease, etag) of the output read while checking the entry (saves a read; stale is safe:
    #: the conditional write notices and the lease is read again)
    output_lease: Optional[tuple] = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def message_id(self) -> str:
        """CPB_MESSAGE_ID: the message identity, plus `#n` for list entry n."""
        return entry_message_id(self.identity or self.sqs_message_id, self.index)

    @property
    def array_size(self) -> Optional[int]:
        """Children of the whole run, or None for a plain job (Batch forbids arrays of size 1)."""
        request, count = self.checked.request, self.checked.image_set_count
        if request.image_sets_per_job is None or count is None:
            return None
        size = -(-count // request.image_sets_per_job)
        return size if size >= 2 else None


def array_chunks(array_size: Optional[int]) -> list:
    """(array_offset, size) of each Batch array job of a run: one job up to 10,000 children, else
    as few near-equal jobs as Batch's limit allows (each at least 2, as Batch requires); [(None,
    None)] for a plain job."""
    if array_size is None:
        return [(None, None)]
    count = -(-array_size // MAX_ARRAY_SIZE)
    sizes = [array_size // count + (1 if k < array_size % count else 0) for k in range(count)]
    offsets = [sum(sizes[:k]) for k in range(count)]
    return list(zip(offsets, sizes))


def record_key_for(output: str, message_id: str) -> str:
    """`<output>/_cpb/submission-<id>.json` (docs/CONTRACTS.md) for a job's CPB_MESSAGE_ID."""
    return f"{output}/_cpb/submission-{submission_id(message_id)}.json"


def record_key(job: PlannedJob) -> str:
    return record_key_for(job.checked.request.output, job.message_id)


def job_name_for(job: PlannedJob, generation: int, chunk: int = 0, chunks: int = 1) -> str:
    """Readable, Batch-valid (`[A-Za-z0-9][A-Za-z0-9_-]{0,127}`), deterministic and unique per job
    (`-a<chunk>` for each array job of a run split over several)."""
    request = job.checked.request
    readable = request.job_name or request.output
    ascii_text = unicodedata.normalize("NFKD", readable).encode("ascii", "ignore").decode("ascii")
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", ascii_text)
    base = re.sub(r"-{2,}", "-", base).strip("-_")
    if not base:
        base = "cpb"
    identity = job.identity or job.sqs_message_id
    digest = hashlib.sha256(f"{identity}\0{job.index}\0{generation}".encode()).hexdigest()[:_HASH_CHARS]
    suffix = f"-{digest}" + (f"-a{chunk}" if chunks > 1 else "")
    base = base[: NAME_LIMIT - len(suffix)].rstrip("-_") or "cpb"
    return f"{base}{suffix}"


def container_environment(job: PlannedJob, limits: Limits, run_id: Optional[str] = None,
                          array_offset: Optional[int] = None) -> list:
    """The "Job environment" of docs/CONTRACTS.md, as Batch `containerOverrides.environment`."""
    request, count = job.checked.request, job.checked.image_set_count
    env = {
        "CPB_BUCKET": limits.bucket,
        "CPB_PIPELINE": request.pipeline,
        "CPB_INPUT": request.input,
        "CPB_OUTPUT": request.output,
        "CPB_VCPUS": str(request.vcpus(limits)),
        "CPB_MEMORY_MIB": str(request.memory_mib(limits)),
        "CPB_MESSAGE_ID": job.message_id,
        "CPB_RESUME": "1" if request.resume else "0",
    }
    if run_id is not None:
        env["CPB_RUN_ID"] = run_id
    if request.data_file is not None:
        env["CPB_DATA_FILE"] = request.data_file
        if job.checked.data_etag:  # the version the Lambda counted: the worker reads only that one
            env["CPB_DATA_FILE_ETAG"] = job.checked.data_etag
    if count is not None:
        env["CPB_IMAGE_SET_COUNT"] = str(count)
    if job.array_size is not None:
        env["CPB_IMAGE_SETS_PER_JOB"] = str(request.image_sets_per_job)
        env["CPB_ARRAY_OFFSET"] = str(array_offset or 0)
    if request.unsplittable:
        env["CPB_UNSPLITTABLE"] = "1"
    if request.after:
        env["CPB_AFTER"] = ",".join(request.after)
    return [{"name": name, "value": value} for name, value in env.items()]


def _tag_value(text: str) -> str:
    """Batch tag values: <= 256 chars of letters, digits, spaces and `_.:/=+-@`."""
    return re.sub(r"[^\w .:/=+@-]", "_", text)[:256]


def submit_arguments(job: PlannedJob, limits: Limits, generation: int, run_id: Optional[str] = None,
                     chunk: int = 0) -> dict:
    """Keyword arguments of `batch.submit_job` for job `chunk` of this entry's run (see `submit_plan`)."""
    request = job.checked.request
    chunks = array_chunks(job.array_size)
    offset, size = chunks[chunk]
    if run_id is None:
        run_id = run_id_for(job.message_id, generation)
    arguments: dict = {
        "jobName": job_name_for(job, generation, chunk, len(chunks)),
        "jobQueue": request.queue(limits),
        "jobDefinition": request.definition(limits),
        "containerOverrides": {
            "environment": container_environment(job, limits, run_id, offset),
            "resourceRequirements": [
                {"type": "VCPU", "value": str(request.vcpus(limits))},
                {"type": "MEMORY", "value": str(request.memory_mib(limits))},
            ],
        },
        "tags": {
            "cpb:message-id": _tag_value(job.sqs_message_id),
            "cpb:entry": "single" if job.index is None else str(job.index),
            "cpb:output": _tag_value(request.output),
            "cpb:run-id": run_id,
        },
        "propagateTags": True,
    }
    if limits.stack:
        arguments["tags"]["cpb:stack"] = _tag_value(limits.stack)  # the stack's IAM lets it terminate only these
    if size is not None:
        arguments["arrayProperties"] = {"size": size}
    if job.depends_on:
        arguments["dependsOn"] = [{"jobId": job_id} for job_id in job.depends_on]
    return arguments


def submit_plan(job: PlannedJob, limits: Limits, generation: int) -> list:
    """`submit_job` arguments of every Batch job of this entry's run, in order (one unless the run
    has more than 10,000 children)."""
    run_id = run_id_for(job.message_id, generation)
    return [submit_arguments(job, limits, generation, run_id, k) for k in range(len(array_chunks(job.array_size)))]


def _lease_job(arguments: dict) -> dict:
    """One entry of the lease's and the record's `jobs` for `submit_job(**arguments)` (job id unknown yet)."""
    env = {e["name"]: e["value"] for e in arguments["containerOverrides"]["environment"]}
    resources = {r["type"]: int(r["value"]) for r in arguments["containerOverrides"]["resourceRequirements"]}
    size = (arguments.get("arrayProperties") or {}).get("size")
    return {"job_id": None, "job_name": arguments["jobName"], "job_queue": arguments["jobQueue"],
            "array_size": size, "array_offset": int(env["CPB_ARRAY_OFFSET"]) if size else None,
            "vcpus": resources.get("VCPU"), "memory_mib": resources.get("MEMORY")}


def _now_iso(clock: Callable[[], float]) -> str:
    return dt.datetime.fromtimestamp(clock(), dt.timezone.utc).isoformat(timespec="seconds")


def _rejected(exc: Exception) -> bool:
    """True when AWS answered the call with a 4xx: the request was refused, so it did nothing."""
    status = (getattr(exc, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return 400 <= int(status or 0) < 500


_THROTTLING = {"TooManyRequestsException", "ThrottlingException", "Throttling", "RequestLimitExceeded",
               "TooManyRequests", "SlowDown", "RequestThrottled"}


def _retryable(exc: Exception) -> bool:
    """Throttling, 5xx, and connection trouble may pass; everything else is an answer."""
    if _error_code(exc) in _THROTTLING:
        return True
    status = (getattr(exc, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if int(status or 0) >= 500:
        return True
    return isinstance(exc, (BotoConnectionError, HTTPClientError))


def _error_code(exc: Exception) -> str:
    return str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))


@dataclasses.dataclass
class Submitter:
    """Submits planned jobs exactly once for one Lambda invocation.

    `lease_until` is this invocation's deadline (epoch seconds): past it, a
    later delivery may assume we died and take our pending records over.
    `before_call` is invoked before each AWS call (the handler passes its
    time-budget check, so no new call starts too close to the deadline).
    """

    s3: Any
    batch: Any
    limits: Limits
    owner: str
    lease_until: float
    clock: Callable[[], float]
    before_call: Callable[[str], None] = lambda what: None
    batch_submit: Any = None  # a Batch client WITHOUT botocore retries (see find_or_submit); default `batch`
    submit_attempts: int = 6
    sleep: Callable[[float], None] = time.sleep
    jitter: Callable[[float], float] = lambda cap: random.uniform(0, cap)
    leases: Optional[Leases] = None  # the output leases (default: built from the same clients)

    def __post_init__(self) -> None:
        if self.batch_submit is None:
            self.batch_submit = self.batch
        if self.leases is None:
            self.leases = Leases(s3=self.s3, batch=self.batch, bucket=self.limits.bucket, owner=self.owner,
                                 lease_until=self.lease_until, clock=self.clock, before_call=self.before_call)

    # ---------------------------------------------------------------- records
    def _read(self, key: str) -> tuple:
        self.before_call("read submission record")
        try:
            obj = self.s3.get_object(Bucket=self.limits.bucket, Key=key)
        except Exception as exc:
            if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None, None
            raise
        return json.loads(obj["Body"].read()), obj["ETag"]

    def _write(self, key: str, record: dict, etag: Optional[str], check_time: bool = True) -> Optional[str]:
        """Create (etag None) or replace (etag given) the record; None when someone else got there first.

        `check_time=False` for the write that follows a successful submit: it
        must be attempted whatever the budget says (skipping it only widens
        the crash window the next delivery has to repair).
        """
        if check_time:
            self.before_call("write submission record")
        record = dict(record, updated_at=_now_iso(self.clock))
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            response = self.s3.put_object(Bucket=self.limits.bucket, Key=key, ContentType="application/json",
                                          Body=json.dumps(record, indent=1, sort_keys=True).encode(), **condition)
        except Exception as exc:
            if conditional_failed(exc):  # 412 precondition failed / 409 a concurrent conditional write won
                return None
            raise
        return response["ETag"]

    def _pending(self, job: PlannedJob, generation: int) -> dict:
        request = job.checked.request
        plan = submit_plan(job, self.limits, generation)
        return {
            "status": "pending", "message_id": job.message_id, "sqs_message_id": job.sqs_message_id,
            "client_token": request.client_token, "entry": job.index, "generation": generation,
            "run_id": run_id_for(job.message_id, generation), "job_name": plan[0]["jobName"],
            "job_queue": request.queue(self.limits), "job_definition": request.definition(self.limits),
            "job_id": None, "job_arn": None, "jobs": [_lease_job(arguments) for arguments in plan],
            "array_size": job.array_size, "image_set_count": job.checked.image_set_count,
            "after": list(request.after), "depends_on": list(job.depends_on), "request": request.to_message(),
            "lease_until": self.lease_until, "owner": self.owner,
        }

    def _lease_body(self, job: PlannedJob, record: dict, planned: list) -> dict:
        """The output lease (`pending`) of the run this record is about to submit."""
        request, checked = job.checked.request, job.checked
        now = _now_iso(self.clock)
        return {
            "run_id": record["run_id"], "message_id": job.message_id, "sqs_message_id": job.sqs_message_id,
            "client_token": request.client_token, "state": "pending", "generation": int(record["generation"]),
            "jobs": planned, "array_size": job.array_size, "image_set_count": checked.image_set_count,
            "image_sets_per_job": request.image_sets_per_job, "after": list(request.after),
            "depends_on": list(job.depends_on), "pipeline": request.pipeline, "data_file": request.data_file,
            "input": request.input, "pipeline_sha256": checked.pipeline_sha256, "data_sha256": checked.data_sha256,
            "data_etag": checked.data_etag,
            "resume": request.resume, "retries": [], "previous_run_id": None, "lease_until": self.lease_until,
            "owner": self.owner, "created_at": now,
        }

    # ---------------------------------------------------------------- batch
    def find_job(self, queue: str, name: str) -> Optional[dict]:
        """The job submitted under `name` in `queue` (its ListJobs summary), None when there is none."""
        return self._find_submitted(queue, name)

    def _find_submitted(self, queue: str, name: str) -> Optional[dict]:
        """The job already submitted under `name` (an earlier attempt died before recording it)."""
        found = []
        token = None
        while True:
            self.before_call("look for an already submitted job")
            kwargs = {"jobQueue": queue, "filters": [{"name": "JOB_NAME", "values": [name]}]}
            if token:
                kwargs["nextToken"] = token
            page = self.batch.list_jobs(**kwargs)
            # Array children share the parent's name; their ids are "<parent>:<index>".
            found += [j for j in page.get("jobSummaryList", []) if j.get("jobName") == name and ":" not in j["jobId"]]
            token = page.get("nextToken")
            if not token:
                break
        found.sort(key=lambda j: j.get("createdAt", 0))
        return found[0] if found else None

    # ---------------------------------------------------------------- protocol
    def read_record(self, output: str, message_id: str) -> tuple:
        """(record, etag) of a job's submission record, (None, None) when there is none yet."""
        return self._read(record_key_for(output, message_id))

    def ensure_submitted(self, job: PlannedJob, prefetched: Optional[tuple] = None) -> dict:
        """Make sure exactly one Batch job exists for `job`; return its (submitted) record.

        `prefetched` is a `read_record` result the caller already has (saves a
        read; if it is stale, the conditional writes notice and we re-read).
        """
        key = record_key(job)
        for _ in range(4):  # each lost race re-reads; more than a few means something is wrong
            if prefetched is not None:
                (record, etag), prefetched = prefetched, None
            else:
                record, etag = self._read(key)
            if record is None:
                record = self._pending(job, 0)
                etag = self._write(key, record, None)
                if etag is None:
                    continue
            elif record.get("status") == "submitted":
                return record
            elif record.get("status") == "pending":
                if float(record.get("lease_until", 0)) > self.clock() and record.get("owner") != self.owner:
                    raise InProgress(f"another invocation ({record.get('owner')}) is submitting this job until "
                                     f"{record.get('lease_until')}")
                # Taken over (its owner died): plan again, keeping the generation and so the job names.
                record = dict(self._pending(job, int(record.get("generation", 0))), created_by=record.get("owner"))
                etag = self._write(key, record, etag)
                if etag is None:
                    continue
                found = self._submitted_then_replaced(job, record)
                if found is not None:
                    return self._record_replaced(key, record, etag, found)
            elif record.get("status") == "cancelled":
                record = self._pending(job, int(record.get("generation", 0)) + 1)
                etag = self._write(key, record, etag)
                if etag is None:
                    continue
            else:
                raise LostRecord(f"s3://{self.limits.bucket}/{key} has unknown status {record.get('status')!r}")
            return self._submit_holding_lease(job, key, record, etag)
        raise LostRecord(f"s3://{self.limits.bucket}/{key} kept changing while we tried to claim it")

    def _submit_holding_lease(self, job: PlannedJob, key: str, record: dict, etag: str) -> dict:
        generation = int(record["generation"])
        run_id = record["run_id"]
        output = job.checked.request.output
        plan = submit_plan(job, self.limits, generation)
        planned = [_lease_job(arguments) for arguments in plan]
        try:
            held = self.leases.acquire(output, self._lease_body(job, record, planned), job.output_lease)
        except BaseException:
            self._release(key, record, etag)  # nothing was submitted for this record: the next delivery needn't wait
            raise
        jobs: list = []

        def release() -> None:  # certainly nothing submitted: the next delivery needn't wait for our deadline
            if not jobs:
                self._release(key, record, etag)
                self._release_output(output, held)

        for arguments, entry in zip(plan, planned):
            job_id, job_arn, adopted = self.find_or_submit(arguments, release)
            jobs.append(dict(entry, job_id=job_id, job_arn=job_arn, adopted=adopted))
        self.leases.mark_submitted(output, job.message_id, run_id, {
            "jobs": [{k: v for k, v in j.items() if k not in ("job_arn", "adopted")} for j in jobs],
            "depends_on": list(job.depends_on)}, held)
        done = dict(record, status="submitted", job_id=jobs[0]["job_id"], job_arn=jobs[0]["job_arn"],
                    adopted=any(j["adopted"] for j in jobs), jobs=jobs, submitted_at=_now_iso(self.clock))
        if self._write(key, done, etag, check_time=False) is None:
            raise LostRecord(f"s3://{self.limits.bucket}/{key} changed while we held its lease; job(s) "
                             f"{', '.join(j['job_id'] for j in jobs)} are submitted but not recorded (a later "
                             "delivery will find them by name)")
        return done

    def _submitted_then_replaced(self, job: PlannedJob, record: dict) -> Optional[list]:
        """The jobs of a run whose owner died after submitting them, when the output has since passed to
        another run (which could only replace it once they were visible and finished, or not yet
        visible): this run happened and was replaced, and must never take the output back. None
        otherwise (nothing of it in Batch, or the lease is still its own)."""
        lease, _ = self.leases.read(job.checked.request.output)
        if lease is None or (lease.get("message_id") == job.message_id and lease.get("run_id") == record["run_id"]):
            return None
        found = [(planned, self._find_submitted(planned["job_queue"], planned["job_name"]))
                 for planned in record.get("jobs") or []]
        if not any(existing for _, existing in found):
            return None
        logger.warning("run %s of %s was submitted, then replaced by run %s; not taking the output back",
                       record["run_id"], job.message_id, lease.get("run_id"))
        return [dict(planned, job_id=existing["jobId"], job_arn=existing.get("jobArn"), adopted=True)
                for planned, existing in found if existing]

    def _record_replaced(self, key: str, record: dict, etag: str, jobs: list) -> dict:
        done = dict(record, status="submitted", job_id=jobs[0]["job_id"], job_arn=jobs[0]["job_arn"], adopted=True,
                    jobs=jobs, submitted_at=_now_iso(self.clock), lease_until=None, owner=None)
        if self._write(key, done, etag, check_time=False) is None:
            raise LostRecord(f"s3://{self.limits.bucket}/{key} changed while we recorded its replaced run")
        return done

    def find_or_submit(self, arguments: dict, release: Callable[[], None] = lambda: None) -> tuple:
        """`(job id, job arn, adopted)`: adopt the job already under `arguments["jobName"]` in its queue,
        else `submit_job(**arguments)`; retry throttling/5xx ourselves. `release()` is called when the
        call certainly submitted nothing (the caller may give up its claim early). Also used by the
        job-events Lambda for out-of-memory retries.

        SubmitJob has no idempotency token, and a 5xx or a timeout may come
        back although Batch created the job, so a blind retry (botocore's)
        could start a second copy. Each attempt therefore first looks the
        name up; only then does it submit again. Throttling (a 4xx) refused
        the call and is simply retried after a jittered backoff.
        """
        maybe_submitted = False
        try:
            for attempt in range(self.submit_attempts):
                existing = self._find_submitted(arguments["jobQueue"], arguments["jobName"])
                if existing is not None:
                    return existing["jobId"], existing.get("jobArn"), True
                self.before_call("submit the Batch job")
                try:
                    response = self.batch_submit.submit_job(**arguments)
                    return response["jobId"], response.get("jobArn"), False
                except Exception as exc:
                    maybe_submitted = maybe_submitted or not _rejected(exc)
                    if not _retryable(exc) or attempt == self.submit_attempts - 1:
                        raise
                    delay = self.jitter(min(SUBMIT_BACKOFF_CAP_S, SUBMIT_BACKOFF_BASE_S * 2 ** attempt))
                    self.before_call(f"wait {delay:.1f} s before submitting again")
                    logger.info("SubmitJob failed (%s), retrying in %.1f s", _error_code(exc) or type(exc).__name__,
                                delay)
                    self.sleep(delay)
            raise LostRecord("unreachable: the submit loop ended without a result")  # pragma: no cover
        except Exception:
            if not maybe_submitted:
                release()
            raise

    def _release_output(self, output: str, held: tuple) -> None:
        """Give up our claim on the output lease early (best effort), as `_release` does for the record."""
        lease, etag = held
        if lease.get("state") != "pending" or lease.get("owner") != self.owner:
            return
        try:
            self.leases.write(output, dict(lease, lease_until=0, owner=None), etag)
        except Exception:
            logger.warning("could not release the output lease of %s", output, exc_info=True)

    def _release(self, key: str, record: dict, etag: str) -> None:
        """Give up our lease early (best effort) when we know no job was submitted."""
        try:
            self._write(key, dict(record, lease_until=0, owner=None), etag)
        except Exception:  # the lease then simply runs out at our deadline
            logger.warning("could not release lease on %s", key, exc_info=True)

    def rollback(self, jobs: list, reason: str) -> list:
        """Terminate the submitted jobs among `jobs`, mark their records `cancelled` and cancel the
        output leases of their runs.

        Returns the job ids terminated. Best effort per job: a job whose termination fails stays
        `submitted`, and a later delivery completes the message around it instead of submitting it twice.
        """
        terminated = []
        for job in jobs:
            key = record_key(job)
            try:
                record, etag = self._read(key)
                if record is None:
                    continue
                planned = record.get("jobs") or [{"job_id": record.get("job_id"), "job_name": record.get("job_name"),
                                                  "job_queue": record.get("job_queue")}]
                if record.get("status") == "pending" and record.get("owner") == self.owner:
                    # Our submit may have reached Batch although the call failed (a timeout): look by name.
                    found = [self._find_submitted(p["job_queue"], p["job_name"]) for p in planned]
                    if any(f is None for f in found) and not any(found):
                        # Not visible (yet?): keep the lease, so the next delivery looks again after the
                        # visibility timeout and adopts it rather than starting generation + 1 beside it.
                        continue
                    planned = [dict(p, job_id=f["jobId"]) if f else p for p, f in zip(planned, found)]
                elif record.get("status") != "submitted":
                    continue
                ids = [p["job_id"] for p in planned if p.get("job_id")]
                for job_id in ids:
                    self.before_call("terminate a rolled-back job")
                    self.batch.terminate_job(jobId=job_id, reason=f"cpb rollback: {reason}"[:1000])
                    terminated.append(job_id)
                self._write(key, dict(record, status="cancelled", job_id=ids[0] if ids else record.get("job_id"),
                                      jobs=planned, cancelled_reason=reason[:1000]), etag)
                if record.get("run_id"):
                    self.leases.cancel(job.checked.request.output, job.message_id, record["run_id"], reason)
            except Exception:  # keep rolling the others back; this record still tells the truth
                logger.warning("rollback of %s incomplete", key, exc_info=True)
        return terminated
