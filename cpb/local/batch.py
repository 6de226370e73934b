"""A local stand-in for AWS Batch compute: runs submitted jobs as processes.

The Lambda submits real Batch API calls to the emulator; moto's no-Docker
Batch only records them (and calls them SUCCEEDED at once). This runner is
what actually executes them, the way Batch would start the container: it
finds the jobs in the job queue, expands array jobs into children, and
starts `python -m cpb_worker` with the job's environment plus what Batch
adds (`AWS_BATCH_JOB_ID`, `AWS_BATCH_JOB_ARRAY_INDEX`, `AWS_BATCH_JOB_ATTEMPT`)
and `AWS_ENDPOINT_URL`. It applies the job definition's retry strategy and
timeout, and it decides success or failure from the worker's exit code,
writing that back into the emulator so `cpb status` sees what Batch would
show.
"""
from __future__ import annotations

import datetime as dt
import fnmatch
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

REPO = Path(__file__).resolve().parents[2]
ALL_STATES = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED")
# Host variables a container would still see or that the worker needs to find CellProfiler here.
PASS_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "CPB_CELLPROFILER", "CPB_CELLPROFILER_ARGS",
                "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MPLCONFIGDIR")


class JobStates(Protocol):
    """Where the runner records what Batch would show for a job."""

    def set(self, job_id: str, status: str, reason: Optional[str] = None,
            exit_code: Optional[int] = None) -> None: ...


class MotoJobStates:
    """Writes job states into moto's Batch backend in this process.

    moto's no-Docker Batch marks every job SUCCEEDED when submitted and has
    no API to change a state, so the runner sets the job's fields directly.
    Tied to moto 5.2 (pinned in requirements-dev.txt); the end-to-end test
    fails loudly if moto's internals move.
    """

    def __init__(self, region: str, account: str = "123456789012") -> None:
        from moto.batch.models import batch_backends
        self._jobs = batch_backends[account][region]._jobs
        self._lock = threading.Lock()

    def _job(self, job_id: str):
        try:
            return self._jobs[job_id]
        except KeyError:
            raise RuntimeError(f"job {job_id} is not in the emulator's Batch backend") from None

    def set(self, job_id: str, status: str, reason: Optional[str] = None,
            exit_code: Optional[int] = None) -> None:
        with self._lock:
            job = self._job(job_id)
            now = dt.datetime.now()
            job.status = status
            if status in ("SUCCEEDED", "FAILED"):
                job.job_stopped, job.job_stopped_at = True, now
                job.exit_code = exit_code
                job.job_stopped_reason = reason
            else:
                job.job_stopped = False
                job.job_stopped_reason = None
                if status == "RUNNING":
                    job.job_started_at = now
            if ":" in job_id:
                self._update_parent(job_id.rsplit(":", 1)[0])

    def _update_parent(self, parent_id: str) -> None:
        parent = self._job(parent_id)
        states = [c.status for c in parent._child_jobs or []]
        if any(s not in ("SUCCEEDED", "FAILED") for s in states):
            parent.status, parent.job_stopped = "RUNNING", False
        else:
            parent.status = "FAILED" if "FAILED" in states else "SUCCEEDED"
            parent.job_stopped, parent.job_stopped_at = True, dt.datetime.now()
            if parent.status == "FAILED":
                parent.job_stopped_reason = f"{states.count('FAILED')} of {len(states)} children failed"


@dataclass
class WorkItem:
    """One container run Batch would start: a plain job or one array child."""

    job_id: str
    name: str
    index: Optional[int]
    environment: dict[str, str]
    attempts: int = 1
    retry_rules: list[dict] = field(default_factory=list)
    timeout: Optional[int] = None
    log_stream: str = ""
    log_group: str = ""

    @property
    def label(self) -> str:
        return self.name if self.index is None else f"{self.name}[{self.index}]"


@dataclass
class Outcome:
    """How a work item ended, after retries."""

    item: WorkItem
    status: str
    exit_code: Optional[int]
    reason: str
    attempts: int
    log: Path


def _retry(rules: list[dict], exit_code: int) -> bool:
    """Batch's evaluateOnExit for an exit code: first matching rule wins; no rule means retry."""
    for rule in rules:
        pattern = rule.get("onExitCode")
        if pattern is not None and fnmatch.fnmatch(str(exit_code), pattern):
            return str(rule.get("action", "")).upper() == "RETRY"
    return not rules


class LocalBatch:
    """Finds jobs in the emulated job queue and runs them as worker processes."""

    def __init__(self, batch, job_queue: str, endpoint_env: dict[str, str], log_dir: Path,
                 states: JobStates, parallel: int = 1, vcpus_per_job: Optional[int] = 1,
                 command: Optional[list[str]] = None, logs=None,
                 on_event: Optional[Callable[[str, WorkItem, str], None]] = None) -> None:
        self.batch, self.job_queue, self.endpoint_env = batch, job_queue, endpoint_env
        self.log_dir, self.states, self.parallel = log_dir, states, max(1, parallel)
        self.vcpus_per_job = vcpus_per_job
        self.logs = logs  # CloudWatch Logs client; None keeps the output in log_dir only
        self.command = command or [sys.executable, "-m", "cpb_worker"]
        self.on_event = on_event or (lambda kind, item, detail: None)
        self._seen: set[str] = set()
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # ----------------------------------------------------------------- discovery
    def discover(self) -> list[WorkItem]:
        """New jobs in the queue, array jobs expanded into their children."""
        summaries: dict[str, dict] = {}
        for state in ALL_STATES:
            for page in self.batch.get_paginator("list_jobs").paginate(jobQueue=self.job_queue, jobStatus=state):
                for job in page.get("jobSummaryList", []):
                    if ":" not in job["jobId"] and job["jobId"] not in self._seen:
                        summaries[job["jobId"]] = job
        items: list[WorkItem] = []
        for start in range(0, len(summaries), 100):
            for job in self.batch.describe_jobs(jobs=list(summaries)[start:start + 100])["jobs"]:
                if job.get("statusReason"):
                    continue  # terminated (e.g. rolled back by the Lambda) before it ran
                self._seen.add(job["jobId"])
                items.extend(self._items(job))
        for item in items:
            self.states.set(item.job_id, "RUNNABLE")
        return items

    def _items(self, job: dict) -> list[WorkItem]:
        definition = self.batch.describe_job_definitions(jobDefinitions=[job["jobDefinition"]])["jobDefinitions"]
        strategy = (definition[0].get("retryStrategy") if definition else None) or {}
        timeout = ((definition[0].get("timeout") if definition else None) or {}).get("attemptDurationSeconds")
        container = job.get("container") or {}
        env = {e["name"]: e["value"] for e in container.get("environment", [])}
        size = (job.get("arrayProperties") or {}).get("size")
        log_options = (((definition[0].get("containerProperties") or {}).get("logConfiguration") or {})
                       .get("options") or {}) if definition else {}
        common = dict(name=job.get("jobName", "job"), attempts=int(strategy.get("attempts") or 1),
                      retry_rules=list(strategy.get("evaluateOnExit") or []), timeout=timeout,
                      log_group=log_options.get("awslogs-group", ""))
        if not size:
            return [WorkItem(job_id=job["jobId"], index=None, environment={**env, "AWS_BATCH_JOB_ID": job["jobId"]},
                             log_stream=container.get("logStreamName", ""), **common)]
        child_ids = [f"{job['jobId']}:{i}" for i in range(int(size))]
        streams = {}
        for start in range(0, len(child_ids), 100):
            for child in self.batch.describe_jobs(jobs=child_ids[start:start + 100])["jobs"]:
                streams[child["jobId"]] = (child.get("container") or {}).get("logStreamName", "")
        return [WorkItem(job_id=child_id, index=i,
                         environment={**env, "AWS_BATCH_JOB_ID": child_id,
                                      "AWS_BATCH_JOB_ARRAY_INDEX": str(i), "AWS_BATCH_JOB_ARRAY_SIZE": str(size)},
                         log_stream=streams.get(child_id, ""), **common) for i, child_id in enumerate(child_ids)]

    # ----------------------------------------------------------------- execution
    def process_env(self, item: WorkItem, attempt: int) -> dict[str, str]:
        """The environment of one attempt: job env + Batch's + the emulator endpoint."""
        env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
        env.update(item.environment)
        env.update(self.endpoint_env)
        env["AWS_BATCH_JOB_ATTEMPT"] = str(attempt)
        env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = "1"
        if self.vcpus_per_job:
            env["CPB_VCPUS"] = str(self.vcpus_per_job)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "image"), str(REPO)])
        return env

    def run_item(self, item: WorkItem) -> Outcome:
        """Run one item through its attempts, as Batch's retry strategy says."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        safe = item.label.replace("/", "_").replace("[", "-").replace("]", "")
        outcome: Optional[Outcome] = None
        for attempt in range(1, item.attempts + 1):
            log = self.log_dir / f"{safe}.attempt{attempt}.log"
            self.states.set(item.job_id, "RUNNING")
            self.on_event("start", item, f"attempt {attempt}")
            code, timed_out = self._run_process(item, attempt, log)
            self._publish(item, log)
            if code == 0:
                outcome = Outcome(item, "SUCCEEDED", 0, "Essential container in task exited", attempt, log)
                break
            reason = ("Job attempt duration exceeded timeout" if timed_out
                      else f"Essential container in task exited (exit code {code}): {_last_line(log)}")
            outcome = Outcome(item, "FAILED", code, reason, attempt, log)
            if timed_out or not _retry(item.retry_rules, code) or attempt == item.attempts:
                break
            self.on_event("retry", item, f"exit code {code}, retrying")
        assert outcome is not None
        self.states.set(item.job_id, outcome.status, outcome.reason, outcome.exit_code)
        self.on_event("done", item, outcome.status)
        return outcome

    def _run_process(self, item: WorkItem, attempt: int, log: Path) -> tuple[int, bool]:
        """One container run: (exit code, timed out). Killed like Batch on timeout or stop()."""
        if self._stopping.is_set():
            return 143, False
        with open(log, "wb") as handle:
            proc = subprocess.Popen(self.command, env=self.process_env(item, attempt), stdout=handle,
                                    stderr=subprocess.STDOUT, cwd=str(self.log_dir), start_new_session=True)
            with self._lock:
                self._running.add(proc)
            try:
                return proc.wait(timeout=item.timeout), False
            except subprocess.TimeoutExpired:
                _kill(proc)
                return 137, True
            finally:
                with self._lock:
                    self._running.discard(proc)

    def _publish(self, item: WorkItem, log: Path) -> None:
        """Send the attempt's output to the job's CloudWatch log stream, as the awslogs driver would."""
        if self.logs is None or not (item.log_group and item.log_stream):
            return
        lines = log.read_text(errors="replace").splitlines() or ["(no output)"]
        now = int(time.time() * 1000)
        try:
            self.logs.create_log_stream(logGroupName=item.log_group, logStreamName=item.log_stream)
        except self.logs.exceptions.ResourceAlreadyExistsException:
            pass
        for start in range(0, len(lines), 5000):
            self.logs.put_log_events(logGroupName=item.log_group, logStreamName=item.log_stream,
                                     logEvents=[{"timestamp": now, "message": line[:200_000]}
                                                for line in lines[start:start + 5000]])

    def stop(self) -> None:
        """Kill every worker process still running (Ctrl-C in the demo): leave nothing behind."""
        self._stopping.set()
        with self._lock:
            running = list(self._running)
        for proc in running:
            _kill(proc)

    def run(self, items: list[WorkItem]) -> list[Outcome]:
        """Run items, `parallel` at a time (Batch packs jobs onto instances)."""
        pool = ThreadPoolExecutor(max_workers=self.parallel)
        try:
            return list(pool.map(self.run_item, items))
        except BaseException:  # Ctrl-C while waiting: kill the workers before waiting for the threads
            self.stop()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def drain(self) -> list[Outcome]:
        """Run everything in the queue, including jobs submitted meanwhile."""
        outcomes: list[Outcome] = []
        while True:
            items = self.discover()
            if not items:
                return outcomes
            outcomes.extend(self.run(items))


def _kill(proc: subprocess.Popen) -> None:
    """Kill a worker and the CellProfiler processes it started (its session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _last_line(log: Path) -> str:
    """The worker's last log line (its one-line reason on failure)."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:300] if lines else "no output"
