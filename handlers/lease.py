"""The output lease `<output>/_cpb/lease.json`: one run per output at a time (docs/CONTRACTS.md).

The lease names an output's CURRENT run. It is written only with S3 conditional writes
(`IfNoneMatch: *` to create, `IfMatch: <etag>` to change), by the ingress Lambda (here, through
`handlers.submission.Submitter`), the job-events Lambda (`handlers.events`, OOM retries) and
`cpb requeue`. This module holds the protocol; the lease body is built by the submitter.

Rules for a new entry of message identity M on output O (`Leases.acquire`):
1. no lease: create it (`pending`, this invocation's `owner` and `lease_until`);
2. the lease is M's and names the same run: carry on (a redelivery or a repeat adopts);
   M's with another run (an older generation): as 3;
3. another run: `cancelled` -> replace it (`previous_run_id` = its run); `submitted` and
   FINISHED (every job in `jobs` and `retries` is SUCCEEDED/FAILED in Batch or unknown to it)
   -> replace; `pending` with a live `lease_until` -> `InProgress` (retry later); `pending`
   past its `lease_until` (its sender died before recording a job) -> its planned job names are
   looked up in Batch: none there -> replace, else judged like `submitted` on those jobs;
   otherwise `OutputBusy`, one line naming the run, message and job.

`Leases.run_outcome(lease)` judges a run for `after` (issue 13): `unfinished` (with the job ids to
depend on), `succeeded`, `failed` (a job or child failed and no retry replaced it successfully),
`cancelled` or `unknown` (its jobs are gone from Batch and no event file says how they ended).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any, Callable, Iterable, Optional

from handlers.schema import MessageError

__all__ = ["LEASE_NAME", "lease_key", "Leases", "OutputBusy", "InProgress", "LostRecord", "RunOutcome",
           "FINISHED", "conditional_failed", "error_code"]

LEASE_NAME = "_cpb/lease.json"
FINISHED = ("SUCCEEDED", "FAILED")
_DESCRIBE_LIMIT = 100  # DescribeJobs takes at most 100 job ids


class InProgress(RuntimeError):
    """Another live invocation holds this job's (or output's) lease; retry the message later."""


class LostRecord(RuntimeError):
    """A record or lease changed under us in a way the protocol does not expect."""


class OutputBusy(MessageError):
    """The output's current run belongs to another message and is not finished (retried, then DLQ)."""

    def __init__(self, reason: str, index: Optional[int] = None) -> None:
        super().__init__("output", reason, index)

    def at(self, index: Optional[int]) -> "OutputBusy":
        return OutputBusy(self.reason, index)


def lease_key(output: str) -> str:
    return f"{output}/{LEASE_NAME}"


def error_code(exc: Exception) -> str:
    return str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))


def conditional_failed(exc: Exception) -> bool:
    """412: the precondition failed; 409: a concurrent conditional write won."""
    return error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _now_iso(clock: Callable[[], float]) -> str:
    return dt.datetime.fromtimestamp(clock(), dt.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """How a run stands in Batch. `unfinished`: [(job id, status)] still to run; `failed`: one phrase
    per failure no retry made good; `unknown`: job ids neither Batch nor an event file knows."""

    status: str  # unfinished | succeeded | failed | cancelled | unknown
    unfinished: tuple = ()
    failed: tuple = ()
    unknown: tuple = ()


@dataclasses.dataclass
class Leases:
    """Reads and writes output leases for one invocation (`owner`, alive until `lease_until`)."""

    s3: Any
    batch: Any
    bucket: str
    owner: str
    lease_until: float
    clock: Callable[[], float]
    before_call: Callable[[str], None] = lambda what: None

    # ---------------------------------------------------------------- storage
    def read(self, output: str, check_time: bool = True) -> tuple:
        """(lease, etag), or (None, None) when the output has no lease."""
        if check_time:
            self.before_call("read the output lease")
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=lease_key(output))
        except Exception as exc:
            if error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None, None
            raise
        return json.loads(obj["Body"].read()), obj["ETag"]

    def write(self, output: str, lease: dict, etag: Optional[str], check_time: bool = True) -> Optional[str]:
        """Create (etag None) or replace (etag given) the lease; None when someone else got there first."""
        if check_time:
            self.before_call("write the output lease")
        lease = dict(lease, updated_at=_now_iso(self.clock))
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            response = self.s3.put_object(Bucket=self.bucket, Key=lease_key(output), ContentType="application/json",
                                          Body=json.dumps(lease, indent=1, sort_keys=True).encode(), **condition)
        except Exception as exc:
            if conditional_failed(exc):
                return None
            raise
        return response["ETag"]

    # ---------------------------------------------------------------- protocol
    def check_available(self, output: str, message_id: str, run_id: Optional[str],
                        prefetched: Optional[tuple] = None) -> tuple:
        """Raise `OutputBusy`/`InProgress` when `acquire` would; return the (lease, etag) read.

        Read-only: a list message checks every entry's output before submitting any of them."""
        lease, etag = prefetched if prefetched is not None else self.read(output)
        if lease is not None and not self._ours(lease, message_id, run_id):
            self._replaceable(output, lease)
        return lease, etag

    def acquire(self, output: str, body: dict, prefetched: Optional[tuple] = None) -> tuple:
        """Make `body` (a `pending` lease of `body['message_id']`, run `body['run_id']`) the output's
        lease, or carry on with the one already there when it is this run's. Returns (lease, etag)."""
        for _ in range(4):  # each lost race re-reads
            if prefetched is not None:
                (lease, etag), prefetched = prefetched, None
            else:
                lease, etag = self.read(output)
            if lease is None:
                etag = self.write(output, body, None)
                if etag is None:
                    continue
                return body, etag
            if self._ours(lease, body["message_id"], body["run_id"]):
                if lease.get("state") == "submitted":
                    return lease, etag  # a redelivery or a repeat: the submission records decide
                if (lease.get("state") == "pending" and lease.get("owner") != self.owner
                        and float(lease.get("lease_until") or 0) > self.clock()):
                    raise InProgress(f"another invocation ({lease.get('owner')}) is submitting run "
                                     f"{lease.get('run_id')} to {output} until {lease.get('lease_until')}")
                taken = dict(body, previous_run_id=lease.get("previous_run_id"), created_at=lease.get("created_at"))
                etag = self.write(output, taken, etag)
                if etag is None:
                    continue
                return taken, etag
            self._replaceable(output, lease)
            replacement = dict(body, previous_run_id=lease.get("run_id"))
            etag = self.write(output, replacement, etag)
            if etag is None:
                continue
            return replacement, etag
        raise LostRecord(f"s3://{self.bucket}/{lease_key(output)} kept changing while we tried to claim it")

    def mark_submitted(self, output: str, message_id: str, run_id: str, changes: dict,
                       held: Optional[tuple] = None) -> dict:
        """Set `state: submitted` and `changes` (jobs, depends_on...) on this run's lease. `held` is the
        (lease, etag) `acquire` returned. Attempted whatever the time budget says: the jobs exist."""
        lease, etag = held if held is not None else (None, None)
        for _ in range(4):
            if lease is None:
                lease, etag = self.read(output, check_time=False)
            if lease is None or not self._ours(lease, message_id, run_id):
                raise LostRecord(f"s3://{self.bucket}/{lease_key(output)} no longer names run {run_id} of "
                                 f"{message_id}; its jobs are submitted (a later delivery records them)")
            done = dict(lease, state="submitted", lease_until=None, owner=None, **changes)
            if self.write(output, done, etag, check_time=False) is not None:
                return done
            lease = None
        raise LostRecord(f"s3://{self.bucket}/{lease_key(output)} kept changing while we recorded run {run_id}")

    def cancel(self, output: str, message_id: str, run_id: str, reason: str) -> bool:
        """Mark this run's lease `cancelled` (a rolled-back list entry); False when it is not this run's."""
        for _ in range(4):
            lease, etag = self.read(output)
            if lease is None or not self._ours(lease, message_id, run_id) or lease.get("state") == "cancelled":
                return False
            if self.write(output, dict(lease, state="cancelled", cancelled_reason=reason[:1000], lease_until=None,
                                       owner=None), etag) is not None:
                return True
        return False

    @staticmethod
    def _ours(lease: dict, message_id: str, run_id: Optional[str]) -> bool:
        return lease.get("message_id") == message_id and (run_id is None or lease.get("run_id") == run_id)

    def _replaceable(self, output: str, lease: dict) -> None:
        """Raise unless another run's lease may be replaced now (rule 3)."""
        state = lease.get("state")
        if state == "cancelled":
            return
        if state == "pending":
            if float(lease.get("lease_until") or 0) > self.clock():
                raise InProgress(f"output {output} is being submitted by message {lease.get('message_id')} (run "
                                 f"{lease.get('run_id')}) until {lease.get('lease_until')}")
            lease = self._with_found_jobs(lease)
            if not lease["jobs"]:
                return  # its sender died before any job reached Batch
        elif state != "submitted":
            raise LostRecord(f"s3://{self.bucket}/{lease_key(output)} has unknown state {state!r}")
        statuses = self.statuses(self.job_ids(lease))
        unfinished = [(job_id, status) for job_id, status in statuses.items() if status not in FINISHED + ("UNKNOWN",)]
        if unfinished:
            job_id, status = unfinished[0]
            raise OutputBusy(f"{output} is in use by run {lease.get('run_id')} of message {lease.get('message_id')} "
                             f"(job {job_id} {status}); wait for it to finish (cpb status {output}) or choose "
                             "another output")

    def _with_found_jobs(self, lease: dict) -> dict:
        """A `pending` lease whose sender died: its planned jobs that did reach Batch (by name)."""
        found = []
        for job in lease.get("jobs") or []:
            if job.get("job_id"):
                found.append(job)
                continue
            if not (job.get("job_name") and job.get("job_queue")):
                continue
            self.before_call("look for a job of an abandoned lease")
            page = self.batch.list_jobs(jobQueue=job["job_queue"],
                                        filters=[{"name": "JOB_NAME", "values": [job["job_name"]]}])
            ids = [j["jobId"] for j in page.get("jobSummaryList", [])
                   if j.get("jobName") == job["job_name"] and ":" not in j["jobId"]]
            if ids:
                found.append(dict(job, job_id=ids[0]))
        return dict(lease, jobs=found)

    # ---------------------------------------------------------------- Batch
    @staticmethod
    def job_ids(lease: dict) -> list:
        """Every job id of a run: its jobs, then its retries (OOM retries, `cpb requeue`)."""
        ids = [j.get("job_id") for j in lease.get("jobs") or []] + [r.get("job_id") for r in lease.get("retries") or []]
        return [i for i in dict.fromkeys(ids) if i]

    def describe(self, job_ids: Iterable[str]) -> dict:
        """job id -> DescribeJobs detail, for the ids Batch still knows."""
        ids = list(dict.fromkeys(job_ids))
        out: dict = {}
        for start in range(0, len(ids), _DESCRIBE_LIMIT):
            self.before_call("describe the jobs of a run")
            for job in self.batch.describe_jobs(jobs=ids[start:start + _DESCRIBE_LIMIT]).get("jobs", []):
                out[job["jobId"]] = job
        return out

    def statuses(self, job_ids: Iterable[str]) -> dict:
        """job id -> Batch status, `UNKNOWN` for jobs Batch no longer knows (they count as finished)."""
        ids = list(dict.fromkeys(job_ids))
        described = self.describe(ids)
        return {job_id: (described[job_id]["status"] if job_id in described else "UNKNOWN") for job_id in ids}

    def run_outcome(self, output: str, lease: dict) -> RunOutcome:
        """How the run a lease names stands (for `after`)."""
        if lease.get("state") == "cancelled":
            return RunOutcome("cancelled")
        if lease.get("state") == "pending":
            lease = self._with_found_jobs(lease)
        ids = self.job_ids(lease)
        described = self.describe(ids)
        unfinished = tuple((i, described[i]["status"]) for i in ids
                           if i in described and described[i]["status"] not in FINISHED)
        if unfinished:
            return RunOutcome("unfinished", unfinished=unfinished)
        if lease.get("state") == "pending":
            return RunOutcome("unknown", unknown=tuple(ids) or ("(no job recorded)",))
        status = {i: described[i]["status"] for i in described}
        unknown = [i for i in ids if i not in status]
        for job_id in unknown:  # gone from Batch: the job-events Lambda may have recorded how it ended
            event = self._event(output, job_id)
            if event and event.get("status") in FINISHED:
                status[job_id] = event["status"]
        replaced_by = {r.get("replaces"): r.get("job_id") for r in lease.get("retries") or [] if r.get("job_id")}
        failed, missing = [], [i for i in ids if i not in status]

        def settle(unit: str, label: str) -> None:
            seen = set()
            while unit in replaced_by and unit not in seen:  # follow retries of retries
                seen.add(unit)
                unit = replaced_by[unit]
                if status.get(unit) == "SUCCEEDED":
                    return
                if unit not in status:
                    missing.append(unit)
                    return
            failed.append(label)

        for job in lease.get("jobs") or []:
            job_id = job.get("job_id")
            if not job_id or status.get(job_id) != "FAILED":
                continue
            if job.get("array_size"):
                for index in self._failed_children(job_id):
                    absolute = int(job.get("array_offset") or 0) + index
                    settle(f"{job_id}:{index}", f"part {absolute} (job {job_id}:{index}) failed")
            else:
                settle(job_id, f"job {job_id} failed")
        if failed:
            return RunOutcome("failed", failed=tuple(failed))
        if missing:
            return RunOutcome("unknown", unknown=tuple(dict.fromkeys(missing)))
        return RunOutcome("succeeded")

    def _failed_children(self, array_job_id: str) -> list:
        indexes, token = [], None
        while True:
            self.before_call("list the failed children of an array job")
            kwargs = {"arrayJobId": array_job_id, "jobStatus": "FAILED"}
            if token:
                kwargs["nextToken"] = token
            page = self.batch.list_jobs(**kwargs)
            for summary in page.get("jobSummaryList", []):
                index = (summary.get("arrayProperties") or {}).get("index")
                if index is None and ":" in summary.get("jobId", ""):
                    index = summary["jobId"].rsplit(":", 1)[1]
                if index is not None:
                    indexes.append(int(index))
            token = page.get("nextToken")
            if not token:
                return sorted(set(indexes))

    def _event(self, output: str, job_id: str) -> Optional[dict]:
        self.before_call("read a job event")
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=f"{output}/_cpb/events/{job_id}.json")
        except Exception as exc:
            if error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return json.loads(obj["Body"].read())
