"""AWS Batch's compute, on this machine: runs the jobs of one job queue as worker processes.

The Lambda (or anyone) submits real Batch API calls to the emulator; moto only records them
(`cpb.local.motobatch` keeps them SUBMITTED). This runner is what executes them, continuously and
the way Batch would:

- a job or array child waits (PENDING) for its `dependsOn` jobs (whole jobs, `N_TO_N` children,
  `SEQUENTIAL` predecessors); when one of them FAILED it fails too with Batch's reason
  `Dependent Job failed`, without running;
- RUNNABLE jobs start, oldest first (a smaller one may fill cores a bigger one cannot use), while
  their vCPUs fit in the cores given to this compute (default: the machine's); a job asking for
  more vCPUs than there are cores runs with all of them, and its log says so;
- each attempt is `python -m cpb_worker` in its own session with the job definition's and the
  submission's environment plus what Batch adds (`AWS_BATCH_JOB_ID`, `AWS_BATCH_JOB_ATTEMPT`,
  `AWS_BATCH_JOB_ARRAY_INDEX`), pinned to the cores it was given, killed when it outlives the
  job definition's `attemptDurationSeconds` (SIGTERM, then SIGKILL) or its memory (out of memory,
  exit 137, as the container's hard limit), or when `TerminateJob` names it;
- the job definition's retry strategy decides on another attempt (`evaluateOnExit`: first rule
  whose every condition matches; none matching means retry; timeouts and terminations are not
  retried);
- what Batch shows is written back into the emulator (status, reasons, attempts, exit codes, log
  streams), the attempt's output goes to the job's CloudWatch log stream as it is written and to a
  file in `log_dir`, and `on_finished(JobDetail)` hears of every job, child or array parent that
  ended (the EventBridge "Batch Job State Change" rule, `cpb.local.events`).

Worker processes never outlive the runner: `stop()` kills them with their CellProfiler children,
and each one runs under a small launcher (the container's init) that the kernel signals when the
runner dies, even by SIGKILL, and that then kills the worker's whole process group.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from cpb.local.motobatch import ACCOUNT, TERMINAL, MotoBatch

REPO = Path(__file__).resolve().parents[2]
# Host variables a container would still see or that the worker needs to find CellProfiler here.
PASS_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "CPB_CELLPROFILER", "CPB_CELLPROFILER_ARGS",
                "MPLCONFIGDIR", "JAVA_HOME")
ALL_STATES = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED")
SUCCEEDED_REASON = "Essential container in task exited"
TIMEOUT_REASON = "Job attempt duration exceeded timeout"
DEPENDENCY_REASON = "Dependent Job failed"
ARRAY_CHILD_REASON = "Array Child Job failed"
OOM_REASON = "OutOfMemoryError: Container killed due to memory usage"
# Started in front of every worker as the container's init: it runs the worker in its own process group on
# the cores it was given, passes SIGTERM on to the group, and when the runner dies (even by SIGKILL) the
# kernel's parent-death signal (Linux) makes it kill the whole group, CellProfiler processes included.
LAUNCHER = """
import os, signal, subprocess, sys
def kill_group(*_):
    os.killpg(0, signal.SIGKILL)
signal.signal(signal.SIGUSR1, kill_group)
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGUSR1)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    kill_group()
if sys.argv[2] and hasattr(os, "sched_setaffinity"):
    try:
        os.sched_setaffinity(0, {int(c) for c in sys.argv[2].split(",")})
    except OSError:
        pass
signal.signal(signal.SIGTERM, lambda *_: None)  # for the worker (the group gets it); reset by exec
child = subprocess.Popen(sys.argv[3:])
while True:
    try:
        code = child.wait()
        break
    except InterruptedError:
        pass
sys.exit(code if code >= 0 else 128 - code)
"""
PAGE_MIB = (os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096) / 2**20


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_memory_mib() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
    except (AttributeError, ValueError, OSError):
        return 0


@dataclass
class Task:
    """One container run Batch would start: a plain job or one array child."""

    job: Any
    job_id: str
    name: str
    index: Optional[int]
    environment: dict[str, str]
    vcpus: int
    memory_mib: int
    attempts: int = 1
    retry_rules: list[dict] = field(default_factory=list)
    timeout: Optional[int] = None
    deps: list[str] = field(default_factory=list)
    log_group: str = ""
    stream_prefix: str = ""
    parent_id: Optional[str] = None
    status: str = "SUBMITTED"
    cores: list[int] = field(default_factory=list)
    kill_reason: Optional[str] = None

    @property
    def label(self) -> str:
        return self.name if self.index is None else f"{self.name}[{self.index}]"


@dataclass
class Outcome:
    """How a task ended, after its attempts."""

    item: Task
    status: str
    exit_code: Optional[int]
    reason: str
    attempts: int
    log: Optional[Path]
    container_reason: Optional[str] = None


@dataclass
class _Parent:
    job: Any
    job_id: str
    children: list[Task]
    status: str = "PENDING"


def should_retry(rules: list[dict], exit_code: Optional[int], status_reason: str, reason: str) -> bool:
    """Batch's evaluateOnExit: the first rule whose every given condition matches decides; no rule
    matching (or no rules) means retry. Patterns are globs (`*` at the end)."""
    def matches(pattern: Optional[str], value: str) -> bool:
        return pattern is None or fnmatch.fnmatchcase(value, pattern)

    for rule in rules:
        if (matches(rule.get("onExitCode"), "" if exit_code is None else str(exit_code))
                and matches(rule.get("onStatusReason"), status_reason or "")
                and matches(rule.get("onReason"), reason or "")):
            return str(rule.get("action", "")).upper() == "RETRY"
    return True


class LocalBatch:
    """Runs the jobs of one emulated job queue on this machine, continuously (start/stop), or until
    nothing is left to run (drain)."""

    def __init__(self, job_queue_arn: str, region: str, endpoint_env: Mapping[str, str], log_dir: Path, *,
                 cores: Optional[int] = None, command: Optional[list[str]] = None, logs: Any = None,
                 on_event: Optional[Callable[[str, Task, str], None]] = None,
                 on_finished: Optional[Callable[[dict], None]] = None,
                 say: Optional[Callable[[str], None]] = None,
                 stop_grace: float = 30.0, poll: float = 0.5, account: str = ACCOUNT) -> None:
        self.job_queue_arn, self.endpoint_env = job_queue_arn, dict(endpoint_env)
        self.log_dir = Path(log_dir)
        self.cores = max(1, cores or machine_cores())
        self.command = command or [sys.executable, "-m", "cpb_worker"]
        self.logs = logs  # CloudWatch Logs client; None keeps job output in log_dir only
        self.on_event = on_event or (lambda kind, task, detail: None)
        self.on_finished = on_finished or (lambda detail: None)
        self.say = say or (lambda text: None)
        self.stop_grace, self.poll = stop_grace, poll
        self.moto = MotoBatch(region, account)
        try:
            available = sorted(os.sched_getaffinity(0))
        except AttributeError:
            available = []
        self._cpu_ids = [available[i % len(available)] for i in range(self.cores)] if available else []
        self._free = list(range(self.cores))  # slots; slot i runs on CPU _cpu_ids[i]
        self._known: set[str] = set()
        self._tasks: dict[str, Task] = {}
        self._order: list[Task] = []
        self._parents: dict[str, _Parent] = {}
        self._outcomes: list[Outcome] = []
        self._processes: dict[str, subprocess.Popen] = {}
        self._threads: set[threading.Thread] = set()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._scheduler: Optional[threading.Thread] = None
        self._attached = False

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> None:
        """Hold newly submitted jobs for this compute (call before anything is submitted)."""
        if not self._attached:
            self.moto.attach(lambda job: self._wake.set())
            self._attached = True

    def start(self) -> "LocalBatch":
        self.attach()
        if self._scheduler is None:
            self._stopping.clear()
            self._scheduler = threading.Thread(target=self._loop, name="local-batch", daemon=True)
            self._scheduler.start()
        return self

    def stop(self) -> None:
        """Stop scheduling and kill every worker still running (with its CellProfiler processes)."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            running = list(self._processes.values())
        for proc in running:
            _kill(proc, signal.SIGKILL)
        if self._scheduler is not None and self._scheduler is not threading.current_thread():
            self._scheduler.join(timeout=10)
        for thread in list(self._threads):
            thread.join(timeout=10)
        self._scheduler = None
        if self._attached:
            self.moto.detach()
            self._attached = False

    def __enter__(self) -> "LocalBatch":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def tasks(self) -> list[Task]:
        """Every job and array child this compute has taken on, in submission order."""
        with self._lock:
            return list(self._order)

    @property
    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def idle(self) -> bool:
        """Nothing waiting or running, and no job in the queue this compute has not seen."""
        with self._lock:
            busy = any(t.status not in TERMINAL for t in self._order)
        return not busy and not self._unseen()

    def wait_idle(self, timeout: Optional[float] = None, also_busy: Callable[[], bool] = lambda: False) -> bool:
        """Wait until idle (twice in a row, so work submitted by a finishing job is seen)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        quiet = 0
        while deadline is None or time.monotonic() < deadline:
            if self._stopping.is_set():
                return False
            quiet = quiet + 1 if (self.idle() and not also_busy()) else 0
            if quiet >= 2:
                return True
            time.sleep(min(self.poll, 0.2))
        return False

    def drain(self, timeout: Optional[float] = None) -> list[Outcome]:
        """Run everything in the queue, including jobs submitted meanwhile; the outcomes of this call."""
        before = len(self.outcomes)
        self.start()
        try:
            self.wait_idle(timeout)
        except BaseException:  # Ctrl-C while waiting: no worker may outlive us
            self.stop()
            raise
        return self.outcomes[before:]

    # ------------------------------------------------------------------ scheduler
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception as exc:  # never die silently: say why, keep serving
                self.say(f"local Batch: scheduler error (continuing): {type(exc).__name__}: {exc}")
            self._wake.wait(self.poll)
            self._wake.clear()

    def _tick(self) -> None:
        finished: list[Any] = []
        with self._lock:
            self._discover()
            finished += self._apply_stops()
            finished += self._resolve_dependencies()
            self._start_runnable()
            finished += self._settle_parents()
        self._announce(finished)

    def _unseen(self) -> bool:
        return any(self._ours(job) for job in self.moto.jobs()
                   if job.job_id not in self._known and ":" not in job.job_id)

    def _ours(self, job: Any) -> bool:
        return self.moto.queue_arn(job) == self.job_queue_arn and job.status not in TERMINAL

    def _discover(self) -> None:
        for job in self.moto.jobs():
            if job.job_id in self._known or ":" in job.job_id:
                continue
            if self.moto.queue_arn(job) != self.job_queue_arn:
                continue
            self._known.add(job.job_id)
            if job.status in TERMINAL:
                continue  # finished before this compute was attached (moto's own behaviour)
            size = self.moto.array_size(job)
            if size is None:
                task = self._task(job, index=None, deps=self._plain_deps(job))
                self._add(task)
                continue
            children = []
            for index in range(size):
                child = self.moto.job(f"{job.job_id}:{index}")
                if child is None:
                    continue
                children.append(self._task(child, index=index, deps=self._child_deps(job, index),
                                           parent_id=job.job_id))
            parent = _Parent(job=job, job_id=job.job_id, children=children)
            self._parents[job.job_id] = parent
            self.moto.set_status(job, "PENDING")
            for child in children:
                self._add(child)

    def _add(self, task: Task) -> None:
        self._tasks[task.job_id] = task
        self._order.append(task)
        self.moto.annotate(task.job, task.index)
        task.status = "PENDING" if task.deps else "RUNNABLE"
        self.moto.set_status(task.job, task.status)

    def _task(self, job: Any, index: Optional[int], deps: list[str], parent_id: Optional[str] = None) -> Task:
        strategy = self.moto.retry_strategy(job)
        vcpus, memory = self.moto.resources(job)
        options = self.moto.log_options(job)
        env = self.moto.environment(job)
        env["AWS_BATCH_JOB_ID"] = job.job_id
        env["AWS_BATCH_JQ_NAME"] = job.job_queue.name
        if index is not None:
            env["AWS_BATCH_JOB_ARRAY_INDEX"] = str(index)
        return Task(job=job, job_id=job.job_id, name=job.job_name, index=index, environment=env, vcpus=vcpus,
                    memory_mib=memory, attempts=max(1, int(strategy.get("attempts") or 1)),
                    retry_rules=list(strategy.get("evaluateOnExit") or []),
                    timeout=self.moto.timeout_seconds(job), deps=deps,
                    log_group=options.get("awslogs-group", ""),
                    stream_prefix=options.get("awslogs-stream-prefix", "") or job.job_definition.name,
                    parent_id=parent_id)

    def _plain_deps(self, job: Any) -> list[str]:
        return [d["jobId"] for d in self.moto.depends_on(job) if d.get("jobId")]

    def _child_deps(self, parent: Any, index: int) -> list[str]:
        deps = []
        for dep in self.moto.depends_on(parent):
            kind = str(dep.get("type") or "").upper()
            if kind == "SEQUENTIAL":
                if index > 0:
                    deps.append(f"{parent.job_id}:{index - 1}")
            elif kind == "N_TO_N" and dep.get("jobId"):
                deps.append(f"{dep['jobId']}:{index}")
            elif dep.get("jobId"):
                deps.append(dep["jobId"])
        return deps

    def _status_of(self, job_id: str) -> str:
        if job_id in self._tasks:
            return self._tasks[job_id].status
        if job_id in self._parents:
            return self._parents[job_id].status
        job = self.moto.job(job_id)
        return str(job.status) if job is not None else "MISSING"

    def _apply_stops(self) -> list[Any]:
        finished = []
        for task in self._order:
            if task.status in TERMINAL:
                continue
            reason = self.moto.stop_requested(task.job)
            if reason is None and task.parent_id:
                reason = self.moto.stop_requested(self._parents[task.parent_id].job)
            if reason is None:
                continue
            if task.status in ("STARTING", "RUNNING") or task.cores:  # task.cores: between attempts
                if task.kill_reason is None:
                    task.kill_reason = reason
                    proc = self._processes.get(task.job_id)
                    if proc is not None:
                        _kill(proc, signal.SIGKILL)
            else:
                finished.append(self._finish(task, Outcome(task, "FAILED", None, reason, 0, None)))
        return finished

    def _resolve_dependencies(self) -> list[Any]:
        finished = []
        for task in self._order:
            if task.status != "PENDING":
                continue
            states = [self._status_of(d) for d in task.deps]
            if any(s in ("FAILED", "MISSING") for s in states):
                missing = [d for d, s in zip(task.deps, states) if s == "MISSING"]
                if missing:
                    self.say(f"local Batch: {task.label} depends on {', '.join(missing)}, which is no job here")
                finished.append(self._finish(task, Outcome(task, "FAILED", None, DEPENDENCY_REASON, 0, None)))
            elif all(s == "SUCCEEDED" for s in states):
                task.status = "RUNNABLE"
                self.moto.set_status(task.job, "RUNNABLE")
        return finished

    def _start_runnable(self) -> None:
        if self._stopping.is_set():
            return
        for task in self._order:
            if task.status != "RUNNABLE" or task.cores:
                continue  # a task holding cores is between attempts: its own thread starts the next one
            need = min(task.vcpus, self.cores)
            if len(self._free) < need:
                continue  # a smaller job further on may still fit
            task.cores, self._free = self._free[:need], self._free[need:]
            task.status = "STARTING"
            self.moto.set_status(task.job, "STARTING")
            if task.parent_id:
                self._parent_running(task.parent_id)
            thread = threading.Thread(target=self._run_task, args=(task,), name=f"job-{task.label}", daemon=True)
            self._threads.add(thread)
            thread.start()

    def _parent_running(self, parent_id: str) -> None:
        parent = self._parents[parent_id]
        if parent.status not in TERMINAL and parent.status != "RUNNING":
            parent.status = "RUNNING"
            self.moto.set_status(parent.job, "RUNNING")

    def _settle_parents(self) -> list[Any]:
        finished = []
        for parent in self._parents.values():
            if parent.status in TERMINAL:
                continue
            states = [c.status for c in parent.children]
            if states and all(s in TERMINAL for s in states):
                failed = states.count("FAILED")
                parent.status = "FAILED" if failed else "SUCCEEDED"
                deps_failed = failed and all(c.status == "FAILED" and not c.job.attempts for c in parent.children) \
                    and any(c.deps for c in parent.children)
                reason = (DEPENDENCY_REASON if deps_failed else ARRAY_CHILD_REASON) if failed else \
                    "All child jobs succeeded"
                self.moto.finish(parent.job, parent.status, reason)
                finished.append(parent.job)
        return finished

    def _finish(self, task: Task, outcome: Outcome) -> Any:
        """Record a task's end (under the lock); returns its job for `_announce`."""
        task.status = outcome.status
        self.moto.finish(task.job, outcome.status, outcome.reason, outcome.exit_code, outcome.container_reason)
        self._outcomes.append(outcome)
        return task.job

    def _announce(self, jobs: list[Any]) -> None:
        """Tell `on_finished` (the EventBridge rule) about jobs that ended, outside the lock."""
        for job in jobs:
            try:
                self.on_finished(self.moto.describe_as_batch(job))
            except Exception as exc:
                self.say(f"local Batch: delivering the state change of {job.job_id} failed: {exc}")

    # ------------------------------------------------------------------ one task
    def _run_task(self, task: Task) -> None:
        outcome: Optional[Outcome] = None
        try:
            outcome = self._attempts(task)
        except Exception as exc:  # the runner's own failure: the job fails visibly, nothing hangs
            outcome = Outcome(task, "FAILED", None, f"local Batch could not run the job: {exc}", 0, None)
        finally:
            with self._lock:
                self._free.extend(task.cores)
                self._free.sort()
                task.cores = []
                finished = [self._finish(task, outcome)] if outcome else []
                finished += self._settle_parents()
                self._threads.discard(threading.current_thread())
            self._announce(finished)
            if outcome:
                self.on_event("done", task, outcome.status)
            self._wake.set()

    def _attempts(self, task: Task) -> Outcome:
        outcome: Optional[Outcome] = None
        for attempt in range(1, task.attempts + 1):
            if self._stopping.is_set():
                return Outcome(task, "FAILED", None, "the local stack stopped before the job ran", attempt - 1, None)
            if task.kill_reason is not None and outcome is not None:  # terminated between two attempts
                return Outcome(task, "FAILED", outcome.exit_code, task.kill_reason, attempt - 1, outcome.log)
            stream = f"{task.stream_prefix}/default/{uuid.uuid4().hex}"
            with self._lock:
                task.status = "RUNNING"
                self.moto.start_attempt(task.job, stream)
            self.on_event("start", task, f"attempt {attempt}")
            code, why, log = self._run_attempt(task, attempt, stream)
            status_reason, container_reason = SUCCEEDED_REASON, None
            if why == "timeout":
                status_reason = TIMEOUT_REASON
            elif why == "memory":
                container_reason = OOM_REASON
            elif why == "terminated":
                status_reason = task.kill_reason or "Terminated"
            elif why == "stopped":
                status_reason = "the local stack stopped while the job ran"
            with self._lock:
                self.moto.end_attempt(task.job, code, status_reason, container_reason, stream)
            status = "SUCCEEDED" if code == 0 and why is None else "FAILED"
            outcome = Outcome(task, status, code, status_reason, attempt, log, container_reason)
            if status == "SUCCEEDED" or why in ("timeout", "terminated", "stopped") or attempt == task.attempts:
                break
            if not should_retry(task.retry_rules, code, status_reason, container_reason or ""):
                break
            with self._lock:
                task.status = "RUNNABLE"  # keeps its cores: the next attempt starts at once
                self.moto.set_status(task.job, "RUNNABLE")
            self.on_event("retry", task, f"exit code {code}, retrying (attempt {attempt + 1} of {task.attempts})")
        assert outcome is not None
        return outcome

    def process_env(self, task: Task, attempt: int) -> dict[str, str]:
        """The environment of one attempt: host basics, the job's, Batch's, the emulator endpoint."""
        env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
        env.update(task.environment)
        env.update(self.endpoint_env)
        env["AWS_BATCH_JOB_ATTEMPT"] = str(attempt)
        env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = "1"
        granted = len(task.cores) or min(task.vcpus, self.cores)
        asked = env.get("CPB_VCPUS", "").strip()
        if asked.isdigit() and int(asked) > granted:
            env["CPB_VCPUS"] = str(granted)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "image"), str(REPO)])
        return env

    def header(self, task: Task, attempt: int) -> list[str]:
        """The lines the runner writes at the top of an attempt's log."""
        granted = len(task.cores) or min(task.vcpus, self.cores)
        lines = [f"cpb local: job {task.label} ({task.job_id}) attempt {attempt} of {task.attempts}: "
                 f"{granted} vCPU(s), {task.memory_mib} MiB"]
        if task.vcpus > granted:
            lines.append(f"cpb local: this job asked for {task.vcpus} vCPUs; this machine gives the local Batch "
                         f"{self.cores} core(s), so it runs with {granted} (CPB_VCPUS={granted})")
        total = machine_memory_mib()
        if total and task.memory_mib > total:
            lines.append(f"cpb local: this job asked for {task.memory_mib} MiB; this machine has {total} MiB")
        return lines

    def _run_attempt(self, task: Task, attempt: int, stream: str) -> tuple[Optional[int], Optional[str], Path]:
        """One container run: (exit code, why it was stopped or None, log file)."""
        jobs_dir = self.log_dir / "jobs"
        jobs_dir.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in task.label)
        log = jobs_dir / f"{safe}.{task.job_id.split(':')[0][:8]}.attempt{attempt}.log"
        header = self.header(task, attempt)
        log.write_text("\n".join(header) + "\n")
        workdir = Path(tempfile.mkdtemp(prefix="cpb-local-job-"))
        publisher = _LogPublisher(self.logs, task.log_group, stream, log)
        why: Optional[str] = None
        try:
            with open(log, "ab") as handle:
                cpus = ",".join(str(self._cpu_ids[i]) for i in task.cores) if self._cpu_ids else ""
                proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(os.getpid()), cpus, *self.command],
                                        env=self.process_env(task, attempt), stdout=handle,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(workdir),
                                        start_new_session=True)
            with self._lock:
                self._processes[task.job_id] = proc
            started = time.monotonic()
            next_memory_check = started
            while True:
                try:
                    code = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                publisher.flush()
                now = time.monotonic()
                if self._stopping.is_set():
                    why = why or "stopped"
                    _kill(proc, signal.SIGKILL)
                elif task.kill_reason is not None:
                    why = why or "terminated"
                    _kill(proc, signal.SIGKILL)
                elif task.timeout and now - started > task.timeout and why is None:
                    why = "timeout"
                    _stop_gracefully(proc, self.stop_grace)
                elif now >= next_memory_check and why is None:
                    next_memory_check = now + 1.0
                    used = session_rss_mib(proc.pid)
                    if used > task.memory_mib:
                        why = "memory"
                        with open(log, "a") as note:
                            note.write(f"cpb local: the job used {used:.0f} MiB of its {task.memory_mib} MiB: "
                                       "killed, as Batch's container memory limit would\n")
                        _kill(proc, signal.SIGKILL)
            if task.kill_reason is not None and why is None:
                why = "terminated"
            exit_code = code if code >= 0 else 128 - code  # a signal: as a container runtime reports it
            return exit_code, why, log
        finally:
            with self._lock:
                self._processes.pop(task.job_id, None)
            publisher.flush(final=True)
            shutil.rmtree(workdir, ignore_errors=True)


class _LogPublisher:
    """Sends an attempt's log file to its CloudWatch log stream as lines are written (awslogs driver)."""

    def __init__(self, logs: Any, group: str, stream: str, path: Path) -> None:
        self.logs, self.group, self.stream, self.path = logs, group, stream, path
        self.offset, self.created, self.failed = 0, False, False

    def flush(self, final: bool = False) -> None:
        if self.logs is None or not (self.group and self.stream) or self.failed:
            return
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return
        if not final:
            data = data[:data.rfind(b"\n") + 1]  # whole lines only until the end
        if not data:
            return
        self.offset += len(data)
        lines = data.decode("utf-8", errors="replace").splitlines() or [""]
        try:
            if not self.created:
                try:
                    self.logs.create_log_stream(logGroupName=self.group, logStreamName=self.stream)
                except self.logs.exceptions.ResourceAlreadyExistsException:
                    pass
                self.created = True
            now = int(time.time() * 1000)
            for start in range(0, len(lines), 5000):
                self.logs.put_log_events(logGroupName=self.group, logStreamName=self.stream,
                                         logEvents=[{"timestamp": now, "message": line[:200_000] or " "}
                                                    for line in lines[start:start + 5000]])
        except Exception:  # the file keeps everything; CloudWatch is a copy
            self.failed = True


def session_rss_mib(session_id: int) -> float:
    """Resident memory (MiB) of every process in a session: the worker and its CellProfilers."""
    total = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0.0
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == session_id:
                total += int(fields[21])
        except (OSError, ValueError, IndexError):
            continue
    return total * PAGE_MIB


def _stop_gracefully(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the container's processes, SIGKILL them after `grace` seconds (as `docker stop`)."""
    _signal(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _kill(proc, signal.SIGKILL)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kill a worker and the CellProfiler processes it started (its session)."""
    _signal(proc, sig)


class MotoJobStates:
    """Set a job's state in moto's Batch backend by id (tests fake what Batch would show with it)."""

    def __init__(self, region: str, account: str = ACCOUNT) -> None:
        self._moto = MotoBatch(region, account)

    def set(self, job_id: str, status: str, reason: Optional[str] = None, exit_code: Optional[int] = None) -> None:
        job = self._moto.job(job_id)
        if job is None:
            raise RuntimeError(f"job {job_id} is not in the emulator's Batch backend")
        if status in TERMINAL:
            self._moto.finish(job, status, reason or "", exit_code)
        else:
            self._moto.set_status(job, status, reason)
        if ":" in job_id:
            parent = self._moto.job(job_id.rsplit(":", 1)[0])
            states = [c.status for c in (parent._child_jobs or [])] if parent is not None else []
            if parent is not None and states and all(s in TERMINAL for s in states):
                self._moto.finish(parent, "FAILED" if "FAILED" in states else "SUCCEEDED",
                                  ARRAY_CHILD_REASON if "FAILED" in states else "All child jobs succeeded")
            elif parent is not None:
                self._moto.set_status(parent, "RUNNING")
