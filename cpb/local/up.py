"""The local stack: every part of the cloud, running in this process until stopped.

`LocalCloud` starts, in order: moto's server on 127.0.0.1, the stack's resources in it
(`cpb.local.emulator`), the local Batch compute (`cpb.local.batch`, attached before anything can
be submitted), the EventBridge rule delivering job state changes to the job-events Lambda
(`cpb.local.events`), and the SQS -> Lambda event source mapping feeding the real ingress handler
(`cpb.local.mapping`). It sets the Lambdas' environment in this process, writes the state file
`cpb ... --stack local` reads (`cpb.local.state`), and undoes all of it on `stop()`: worker
processes killed, threads joined, the server stopped, the environment restored, the state file
removed. `cpb local up` (`serve`) runs it in the foreground; `cpb demo` and the tests use it too.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from cpb.local import state as local_state
from cpb.local.batch import LocalBatch, Outcome, Task, machine_cores
from cpb.local.emulator import (BATCHING_WINDOW_SECONDS, EmulatedStack, NO_PROFILE, create_stack, environment,
                                 moto_server, session_for)
from cpb.local.events import EventRule, load_handler
from cpb.local.lambdas import CAPTURE, LocalLambda
from cpb.local.mapping import BatchReport, EventSourceMapping
from cpb.local.settings import LocalSettings

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PORT = 4747


class LocalStackError(Exception):
    """The local stack cannot start; the message says what to do."""


def cellprofiler_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """How the workers find CellProfiler: CPB_CELLPROFILER (the Makefile exports it) or the project's .venv-cp."""
    exe = environ.get("CPB_CELLPROFILER") or str(REPO / ".venv-cp" / "bin" / "cellprofiler")
    if not Path(exe).exists() and not shutil.which(exe):
        raise LocalStackError(f"CellProfiler not found at {exe}: run `make local` or `make demo` (they install "
                              ".venv-cp), or set CPB_CELLPROFILER to a cellprofiler executable")
    from cpb_worker.runner import venv_args
    return {"CPB_CELLPROFILER": exe,
            "CPB_CELLPROFILER_ARGS": environ.get("CPB_CELLPROFILER_ARGS", venv_args(exe)),
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _now() -> str:
    return time.strftime("%H:%M:%S")


class LocalCloud:
    """The whole local stack (see the module docstring). Use as a context manager, or start()/stop()."""

    def __init__(self, settings: Optional[LocalSettings] = None, *, port: int = 0, log_dir: Optional[Path] = None,
                 state_dir: Optional[Path] = None, cores: Optional[int] = None,
                 worker_command: Optional[list[str]] = None, redeliver_after: Optional[float] = None,
                 batching_window: Optional[float] = None, write_state: bool = True,
                 say: Optional[Callable[[str], None]] = None,
                 on_batch: Optional[Callable[[BatchReport], None]] = None,
                 on_job: Optional[Callable[[str, Task, str], None]] = None,
                 events_handler: Any = "auto") -> None:
        self.settings = settings or LocalSettings()
        self.port, self.state_dir = port, Path(state_dir) if state_dir else None
        stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
        base = (self.state_dir / "logs") if self.state_dir else (local_state.state_path().parent / "local-logs")
        self.log_dir = Path(log_dir) if log_dir else base / stamp
        self.cores = cores or machine_cores()
        self.worker_command, self.redeliver_after = worker_command, redeliver_after
        self.batching_window = batching_window
        self.write_state = write_state
        self.say = say or (lambda text: None)
        self._on_batch, self._on_job = on_batch, on_job
        self._events_handler = events_handler
        self.stack: Optional[EmulatedStack] = None
        self.batch: Optional[LocalBatch] = None
        self.mapping: Optional[EventSourceMapping] = None
        self.rule: Optional[EventRule] = None
        self.started_at = ""
        self._exit = contextlib.ExitStack()
        self._session: Any = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "LocalCloud":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "LocalCloud":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self.write_state:
            self._refuse_second_stack()
        worker_env = {} if self.worker_command else cellprofiler_env()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # A user's AWS profile settings must neither break nor redirect anything in this process.
        self._exit.enter_context(environment(NO_PROFILE))
        try:
            endpoint = self._exit.enter_context(moto_server(self.port))
        except OSError as exc:
            raise LocalStackError(f"cannot listen on 127.0.0.1:{self.port} ({exc.strerror or exc}): another "
                                  "`cpb local up` may be running there; stop it, or pass --port 0 for a free port") \
                from None
        # The compute holds jobs from the first SubmitJob on; its queue and endpoint are set once they exist.
        self.batch = LocalBatch("", self.settings.region, {}, self.log_dir, cores=self.cores,
                                command=self.worker_command, on_event=self._job_event, say=self.say)
        self.batch.attach()
        self.stack = stack = create_stack(endpoint, self.settings)
        self._session = session = session_for(endpoint, stack.region)
        s3, sqs, logs = (session.client(s, endpoint_url=endpoint) for s in ("s3", "sqs", "logs"))
        if self.state_dir:
            from cpb.local.persist import restore_bucket
            restored = restore_bucket(s3, stack.bucket, self.state_dir)
            if restored:
                self.say(f"restored {restored} object(s) of s3://{stack.bucket} from {self.state_dir}")
        self._exit.enter_context(environment({**stack.aws_env(), **stack.lambda_env(), **worker_env,
                                              "POWERTOOLS_SERVICE_NAME": None}))
        CAPTURE.install()
        self._exit.callback(CAPTURE.uninstall)
        from handlers import ingress
        ingress.reset_services()
        self._exit.callback(ingress.reset_services)

        self.batch.job_queue_arn = stack.job_queue_arn
        self.batch.endpoint_env = stack.aws_env()
        self.batch.logs = logs
        handler = load_handler() if self._events_handler == "auto" else self._events_handler
        events_fn = LocalLambda(stack.events_function, handler, stack.region,
                                timeout_seconds=stack.lambda_timeout_seconds, memory_mb=stack.lambda_memory_mib,
                                log_file=self.log_dir / "lambda" / f"{stack.events_function}.log",
                                logs=logs) if handler else None
        self.rule = EventRule(stack.job_queue_arn, stack.region, events_fn, sqs=sqs, dlq_url=stack.events_dlq_url,
                              say=self.say).start()
        self.batch.on_finished = self.rule.put
        self.batch.start()
        ingress_fn = LocalLambda(stack.ingress_function, ingress.handler, stack.region,
                                 timeout_seconds=stack.lambda_timeout_seconds, memory_mb=stack.lambda_memory_mib,
                                 log_file=self.log_dir / "lambda" / f"{stack.ingress_function}.log", logs=logs)
        window = float(BATCHING_WINDOW_SECONDS) if self.batching_window is None else self.batching_window
        self.mapping = EventSourceMapping(sqs, stack.queue_url, ingress_fn, stack.region,
                                          batch_size=stack.batch_size, batching_window=window,
                                          redeliver_after=self.redeliver_after, on_batch=self._lambda_batch,
                                          say=self.say).start()
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        if self.write_state:
            local_state.write_local_stack(self.state_record())
            self._exit.callback(self._remove_state)

    def stop(self) -> None:
        """Stop everything; leave no process, thread, server or state file behind."""
        if self.mapping is not None:
            self.mapping.stop()
        if self.batch is not None:
            self.batch.stop()
        if self.rule is not None:
            self.rule.stop()
        if self.state_dir and self.stack is not None and self._session is not None:
            from cpb.local.persist import save_bucket
            try:
                save_bucket(self._session.client("s3", endpoint_url=self.stack.endpoint), self.stack.bucket,
                            self.state_dir, say=self.say)
            except Exception as exc:
                self.say(f"could not save s3://{self.stack.bucket} to {self.state_dir}: {exc}")
        self._exit.close()
        self._exit = contextlib.ExitStack()

    def _refuse_second_stack(self) -> None:
        try:
            running = local_state.read_local_stack()
        except local_state.LocalStackError:
            return
        raise LocalStackError(f"a local stack is already running at {running.get('endpoint')} (pid {running.get('pid')},"
                              f" {local_state.state_path()}): stop it (Ctrl-C in its terminal), or set CPB_HOME "
                              "to another folder to run a second one")

    def _remove_state(self) -> None:
        try:
            current = local_state.read_local_stack(check=False)
        except local_state.LocalStackError:
            return
        if current.get("pid") == os.getpid():
            local_state.remove_local_stack()

    # ------------------------------------------------------------------ what it offers
    def outputs(self) -> dict[str, Any]:
        assert self.stack is not None
        return self.stack.outputs()

    def state_record(self) -> dict[str, Any]:
        """The state file's content (docs/CONTRACTS.md, "Local stack")."""
        assert self.stack is not None
        return {"endpoint": self.stack.endpoint, "pid": os.getpid(), "region": self.stack.region,
                "outputs": self.outputs(), "log_dir": str(self.log_dir), "started_at": self.started_at,
                "stack": self.stack.stack, "state_dir": str(self.state_dir) if self.state_dir else None}

    def export_lines(self) -> list[str]:
        """Shell lines that point `aws`, boto3 and `cpb` at this stack (and never at real AWS)."""
        assert self.stack is not None
        env = self.stack.aws_env()
        return [f"export AWS_ENDPOINT_URL={env['AWS_ENDPOINT_URL']} AWS_DEFAULT_REGION={env['AWS_DEFAULT_REGION']}",
                f"export AWS_ACCESS_KEY_ID={env['AWS_ACCESS_KEY_ID']} "
                f"AWS_SECRET_ACCESS_KEY={env['AWS_SECRET_ACCESS_KEY']} AWS_SESSION_TOKEN={env['AWS_SESSION_TOKEN']}",
                "unset AWS_PROFILE AWS_DEFAULT_PROFILE",
                f"export BUCKET={self.stack.bucket} SQS_URL={self.stack.queue_url}"]

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Until no message is waiting, no job is waiting or running and no event is being delivered."""
        assert self.batch is not None and self.mapping is not None and self.rule is not None
        return self.batch.wait_idle(timeout, also_busy=lambda: not (self.mapping.idle() and self.rule.idle()))

    # ------------------------------------------------------------------ activity
    def _lambda_batch(self, report: BatchReport) -> None:
        assert self.stack is not None
        name = self.stack.ingress_function
        head = (f"{_now()} Lambda {name}: {len(report.received)} message(s), {len(report.deleted)} handled, "
                f"{len(report.failed)} failed")
        self.say(head + (f" ({report.error})" if report.error else ""))
        for message_id in report.failed:
            count = report.receive_counts.get(message_id, 1)
            after = ("it moves to the dead-letter queue on its next receive" if count >= self.stack.max_receive_count
                     else f"retried after the visibility timeout (receive {count} of {self.stack.max_receive_count})")
            reason = report.reasons.get(message_id) or report.error or "see the Lambda log"
            self.say(f"         message {message_id}: {reason}; {after}")
        if self._on_batch:
            self._on_batch(report)

    def _job_event(self, kind: str, task: Task, detail: str) -> None:
        if kind == "start" and detail == "attempt 1":
            note = f" (it asked for {task.vcpus}; the local Batch has {self.cores} core(s))" \
                if task.vcpus > len(task.cores) else ""
            self.say(f"{_now()} Batch {task.label}: RUNNING with {len(task.cores)} vCPU(s){note}")
        elif kind == "retry":
            self.say(f"{_now()} Batch {task.label}: {detail}")
        elif kind == "done":
            outcome = next((o for o in reversed(self.batch.outcomes) if o.item is task), None) if self.batch else None
            extra = ""
            if outcome is not None and outcome.status == "FAILED":
                extra = f" ({'; '.join(p for p in (outcome.reason, outcome.container_reason) if p)}" + \
                        (f", exit code {outcome.exit_code}" if outcome.exit_code is not None else "") + ")"
            self.say(f"{_now()} Batch {task.label}: {detail}{extra}")
        if self._on_job:
            self._on_job(kind, task, detail)


# ---------------------------------------------------------------------- `cpb local up`

def describe(cloud: LocalCloud) -> str:
    """What `cpb local up` prints once the stack is ready."""
    assert cloud.stack is not None
    stack, cfg = cloud.stack, cloud.settings.config
    width = max(len(k) for k in cloud.outputs())
    lines = [f"local stack {stack.stack!r} is up at {stack.endpoint}, mirroring a stack deployed with "
             f"{cloud.settings.source}.", "", "Stack outputs (as `pulumi stack output` prints them):"]
    for key, value in cloud.outputs().items():
        shown = value if isinstance(value, str) else __import__("json").dumps(value)
        lines.append(f"    {key:<{width}}  {shown}")
    lines += ["", "Point the AWS CLI, boto3 and cpb at it (in another terminal):"]
    lines += [f"    {line}" for line in cloud.export_lines()]
    lines += ["    aws s3 ls s3://$BUCKET/", "    cpb status --stack local <output>",
              "    (AWS CLI v1's `aws sqs` ignores AWS_ENDPOINT_URL, aws/aws-cli#8737: give it "
              "--endpoint-url $AWS_ENDPOINT_URL)", "",
              f"SQS -> Lambda {stack.ingress_function} (handlers.ingress.handler): batch size {stack.batch_size}, "
              f"visibility timeout {stack.visibility_timeout_seconds} s, dead-letter queue after "
              f"{stack.max_receive_count} receives"
              + (f", failed messages back after {cloud.redeliver_after:g} s" if cloud.redeliver_after is not None
                 else ""),
              f"Batch: {cloud.cores} core(s) here for jobs of {cfg.job_vcpus} vCPU(s) / {cfg.job_memory_mib} MiB "
              f"by default; {cfg.job_retry_attempts} attempts, timeout {cfg.job_timeout_seconds} s",
              "EventBridge job state changes -> " + (f"{stack.events_function} (handlers.events.handler)"
                                                     if cloud.rule and cloud.rule.function else
                                                     "no handlers.events module: events are built, not delivered"),
              f"Logs: {cloud.log_dir} (lambda/, jobs/) and CloudWatch Logs {stack.log_group}, "
              f"/aws/lambda/{stack.ingress_function}",
              ("State: in memory only (start with --state-dir DIR to keep the bucket across restarts)"
               if cloud.state_dir is None else
               f"State: the bucket is saved to {cloud.state_dir} on exit (queues and Batch jobs are not: "
               "moto cannot persist them)"),
              "Ctrl-C stops everything.", ""]
    return "\n".join(lines)


def serve(cloud: LocalCloud, out: Callable[[str], None] = print, ready: Optional[Callable[[], None]] = None) -> int:
    """Run the local stack in the foreground until Ctrl-C (SIGINT), SIGTERM or SIGHUP; 0 on a clean stop."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    started = time.monotonic()
    try:
        cloud.start()
        out(describe(cloud))
        out(f"{_now()} ready in {time.monotonic() - started:.1f} s")
        if ready:
            ready()
        while not stopping.wait(0.5):
            pass
        out(f"{_now()} stopping: killing running jobs, stopping the Lambda mapping and the server")
    finally:
        cloud.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    out(f"{_now()} stopped; nothing left running")
    return 0


@contextlib.contextmanager
def running(settings: Optional[LocalSettings] = None, **kwargs: Any) -> Iterator[LocalCloud]:
    """`with running(...) as cloud:` a started LocalCloud, always stopped."""
    cloud = LocalCloud(settings, **kwargs)
    with cloud:
        yield cloud


__all__ = ["DEFAULT_PORT", "LocalCloud", "LocalStackError", "Outcome", "cellprofiler_env", "describe", "running",
           "serve"]
