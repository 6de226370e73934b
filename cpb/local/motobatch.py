"""The one place that reaches into moto's in-process Batch backend (moto 5.2, pinned in requirements-dev.txt).

moto's no-Docker Batch ("batch_simple") records a submitted job and calls it SUCCEEDED on the
spot; it has no API to run jobs or to change their state. The local Batch compute
(`cpb.local.batch`) needs three things moto does not offer, all provided here:

- jobs stay SUBMITTED when submitted while a local compute is attached to their backend (so
  DescribeJobs never shows SUCCEEDED for work that has not run); without one, moto behaves as usual;
- the compute writes what Batch would show: status, statusReason, startedAt/stoppedAt, attempts,
  the container's exit code and reason;
- DescribeJobs (and so the EventBridge event detail) carries the fields of Batch's JobDetail that
  moto leaves out: `container.exitCode`, `container.reason`, the container's effective
  `resourceRequirements` (moto reports the job definition's, not the submission's), an array
  child's `arrayProperties.index` and the job's `retryStrategy`.

Tied to moto's internals: `tests/test_local_batch.py` fails loudly if they move.
"""
from __future__ import annotations

import datetime as dt
import threading
from typing import Any, Callable, Iterable, Optional

ACCOUNT = "123456789012"  # moto's default account
TERMINAL = ("SUCCEEDED", "FAILED")

_lock = threading.RLock()
_installed = False
# (account, region) -> callbacks told about each job moto registers while a compute is attached.
_attached: dict[tuple[str, str], list[Callable[[Any], None]]] = {}
# job id -> extra JobDetail fields ({"container": {...}, ...}) merged into moto's describe().
_extra: dict[str, dict[str, Any]] = {}


def install() -> None:
    """Wrap moto's simple Batch backend and Job.describe once per process (idempotent).

    Without an attached compute, and for jobs without extra fields, moto's behaviour is unchanged.
    """
    global _installed
    with _lock:
        if _installed:
            return
        from moto.batch.models import Job
        from moto.batch_simple.models import BatchSimpleBackend

        original_finish = BatchSimpleBackend._mark_job_as_finished
        original_describe = Job.describe

        def mark_job_as_finished(self: Any, include_start_attempt: bool, job: Any) -> None:
            listeners = _attached.get((self.account_id, self.region_name))
            if not listeners:
                return original_finish(self, include_start_attempt, job)
            self.backend._jobs[job.job_id] = job  # registered, left SUBMITTED for the local compute
            job.log_stream_name = None
            for listener in list(listeners):
                listener(job)

        def describe(self: Any) -> dict[str, Any]:
            result = original_describe(self)
            extra = _extra.get(self.job_id)
            if extra:
                for key, value in extra.items():
                    if isinstance(value, dict) and isinstance(result.get(key), dict):
                        result[key] = {**result[key], **value}
                    else:
                        result[key] = value
            return result

        BatchSimpleBackend._mark_job_as_finished = mark_job_as_finished
        Job.describe = describe
        _installed = True


def backend(region: str, account: str = ACCOUNT) -> Any:
    """moto's Batch backend for the region (looked up each time: a reset replaces it)."""
    from moto.batch.models import batch_backends
    return batch_backends[account][region]


class MotoBatch:
    """Read and write one region's jobs in moto's backend, as Batch would show them."""

    def __init__(self, region: str, account: str = ACCOUNT) -> None:
        install()
        self.region, self.account = region, account
        self._listener: Optional[Callable[[Any], None]] = None

    # --------------------------------------------------------------- attach / discover
    def attach(self, listener: Callable[[Any], None]) -> None:
        """From now on, submitted jobs stay SUBMITTED and `listener(job)` hears of each one."""
        with _lock:
            self._listener = listener
            _attached.setdefault((self.account, self.region), []).append(listener)

    def detach(self) -> None:
        with _lock:
            listeners = _attached.get((self.account, self.region), [])
            if self._listener in listeners:
                listeners.remove(self._listener)
            if not listeners:
                _attached.pop((self.account, self.region), None)
            self._listener = None

    def jobs(self) -> list[Any]:
        """Every job moto holds for the region (array children included), in submission order."""
        return list(backend(self.region, self.account)._jobs.values())

    def job(self, job_id: str) -> Optional[Any]:
        return backend(self.region, self.account)._jobs.get(job_id)

    # --------------------------------------------------------------- what a job asks for
    @staticmethod
    def queue_arn(job: Any) -> str:
        return job.job_queue.arn

    @staticmethod
    def array_size(job: Any) -> Optional[int]:
        """Size of an array parent, None for a plain job or a child."""
        size = (job.array_properties or {}).get("size")
        return int(size) if size else None

    @staticmethod
    def depends_on(job: Any) -> list[dict[str, str]]:
        return list(job.depends_on or [])

    @staticmethod
    def stop_requested(job: Any) -> Optional[str]:
        """The reason given to TerminateJob/CancelJob, or None."""
        return job.job_stopped_reason if getattr(job, "stop", False) else None

    @staticmethod
    def environment(job: Any) -> dict[str, str]:
        """The container environment: the job definition's, then the submission's overrides."""
        props = job.job_definition.container_properties or {}
        env = {e["name"]: e["value"] for e in props.get("environment", []) or []}
        for item in (job.container_overrides or {}).get("environment", []) or []:
            if not str(item.get("name", "")).startswith("AWS_BATCH_"):  # moto appends its own here
                env[item["name"]] = item["value"]
        return env

    @staticmethod
    def resources(job: Any) -> tuple[int, int]:
        """(vCPUs, memory MiB): overrides' resourceRequirements, else the job definition's."""
        def pick(requirements: Iterable[dict], kind: str) -> Optional[str]:
            for item in requirements or []:
                if str(item.get("type", "")).upper() == kind:
                    return item.get("value")
            return None

        overrides = job.container_overrides or {}
        props = job.job_definition.container_properties or {}
        vcpus = (pick(overrides.get("resourceRequirements", []), "VCPU") or overrides.get("vcpus")
                 or pick(props.get("resourceRequirements", []), "VCPU") or props.get("vcpus") or 1)
        memory = (pick(overrides.get("resourceRequirements", []), "MEMORY") or overrides.get("memory")
                  or pick(props.get("resourceRequirements", []), "MEMORY") or props.get("memory") or 2048)
        return max(1, int(float(vcpus))), max(1, int(float(memory)))

    @staticmethod
    def retry_strategy(job: Any) -> dict[str, Any]:
        return dict(job.job_definition.retry_strategy or {})

    @staticmethod
    def timeout_seconds(job: Any) -> Optional[int]:
        """attemptDurationSeconds: the submission's, else the job definition's."""
        for source in (job.timeout, job.job_definition.timeout):
            if source and source.get("attemptDurationSeconds"):
                return int(source["attemptDurationSeconds"])
        return None

    @staticmethod
    def log_options(job: Any) -> dict[str, str]:
        props = job.job_definition.container_properties or {}
        return dict(((props.get("logConfiguration") or {}).get("options") or {}))

    # --------------------------------------------------------------- what Batch shows
    def set_status(self, job: Any, status: str, reason: Optional[str] = None) -> None:
        """A non-terminal status (SUBMITTED .. RUNNING)."""
        with _lock:
            job.status = status
            job.job_stopped = False
            if status == "RUNNING" and not _started(job):
                job.job_started_at = dt.datetime.now()
            if reason is not None:
                job.job_stopped_reason = reason

    def start_attempt(self, job: Any, log_stream: str) -> None:
        with _lock:
            job.job_started_at = dt.datetime.now()
            job.log_stream_name = log_stream
            job.status = "RUNNING"
            job.job_stopped = False
            self._container(job, {"logStreamName": log_stream})

    def end_attempt(self, job: Any, exit_code: Optional[int], status_reason: str,
                    container_reason: Optional[str], log_stream: str) -> None:
        """Append one finished attempt to the job's `attempts`, as Batch records it."""
        with _lock:
            container: dict[str, Any] = {"logStreamName": log_stream, "taskArn": f"local-task/{job.job_id}",
                                         "networkInterfaces": []}
            if exit_code is not None:
                container["exitCode"] = exit_code
            if container_reason:
                container["reason"] = container_reason
            job.attempts.append({"container": container, "startedAt": _ms(job.job_started_at),
                                 "stoppedAt": _ms(dt.datetime.now()), "statusReason": status_reason})

    def finish(self, job: Any, status: str, reason: str, exit_code: Optional[int] = None,
               container_reason: Optional[str] = None) -> None:
        """SUCCEEDED or FAILED, with Batch's statusReason and the container's exit code and reason."""
        with _lock:
            job.status = status
            job.job_stopped = True
            job.job_stopped_at = dt.datetime.now()
            job.job_stopped_reason = reason
            job.exit_code = exit_code
            container: dict[str, Any] = {}
            if exit_code is not None:
                container["exitCode"] = exit_code
            if container_reason:
                container["reason"] = container_reason
            if container:
                self._container(job, container)

    def describe_as_batch(self, job: Any) -> dict[str, Any]:
        """Batch's JobDetail for the job (what DescribeJobs returns and EventBridge carries)."""
        with _lock:
            return job.describe()

    def annotate(self, job: Any, index: Optional[int]) -> None:
        """JobDetail fields moto leaves out or gets wrong: retryStrategy, an array child's index, and the
        container's effective vCPUs and memory (moto ignores the submission's resourceRequirements)."""
        with _lock:
            extra = _extra.setdefault(job.job_id, {})
            strategy = self.retry_strategy(job)
            if strategy:
                extra["retryStrategy"] = strategy
            if index is not None:
                extra["arrayProperties"] = {"index": index}
            vcpus, memory = self.resources(job)
            self._container(job, {"vcpus": vcpus, "memory": memory, "resourceRequirements": [
                {"type": "VCPU", "value": str(vcpus)}, {"type": "MEMORY", "value": str(memory)}]})

    def forget(self, job_ids: Iterable[str]) -> None:
        with _lock:
            for job_id in job_ids:
                _extra.pop(job_id, None)

    @staticmethod
    def _container(job: Any, fields: dict[str, Any]) -> None:
        extra = _extra.setdefault(job.job_id, {})
        extra["container"] = {**extra.get("container", {}), **fields}


def _started(job: Any) -> bool:
    return job.job_started_at is not None and job.job_started_at.year > 1970


def _ms(when: Optional[dt.datetime]) -> Optional[int]:
    return int(when.timestamp() * 1000) if when is not None else None
