"""A Lambda function's runtime, played in this process: context, time budget and logs.

`LocalLambda.invoke(event)` calls the real handler (`handlers.ingress.handler`,
`handlers.events.handler`) with a context carrying the function's name, memory and timeout, and
captures what the invocation prints (Powertools' JSON log lines included) as Lambda does: framed by
`START` / `END` / `REPORT` lines, appended to a file in the log folder and to the function's
CloudWatch log group (`/aws/lambda/<function>`, one stream per "container", named as Lambda names
them). An invocation that runs past the function's timeout counts as failed ("Task timed out"),
as it would on AWS, where the runtime is stopped.
"""
from __future__ import annotations

import io
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ACCOUNT = "123456789012"


@dataclass
class FakeLambdaContext:
    """The attributes handlers (and Powertools) read from a Lambda context."""

    function_name: str = "cpb-ingress"
    memory_limit_in_mb: int = 256
    timeout_seconds: float = 60.0
    invoked_function_arn: str = f"arn:aws:lambda:us-east-1:{ACCOUNT}:function:cpb-ingress"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    log_group_name: str = "/aws/lambda/cpb-ingress"
    log_stream_name: str = "local"
    function_version: str = "$LATEST"
    _deadline: float = field(default_factory=lambda: 0.0)

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


@dataclass
class Invocation:
    """What one invocation returned or raised, and how long it took."""

    request_id: str
    result: Any = None
    error: Optional[str] = None
    timed_out: bool = False
    seconds: float = 0.0
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


class _ThreadRouter(io.TextIOBase):
    """stdout/stderr that sends what a thread writes during an invocation to that invocation."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback
        self.buffers: dict[int, io.StringIO] = {}

    def write(self, text: str) -> int:
        buffer = self.buffers.get(threading.get_ident())
        if buffer is not None:
            return buffer.write(text)
        return self.fallback.write(text)

    def flush(self) -> None:
        try:
            self.fallback.flush()
        except (ValueError, OSError):
            pass

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.fallback, "encoding", "utf-8")


class OutputCapture:
    """Route stdout/stderr per thread while installed (and the logging handlers writing to them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: Optional[tuple[Any, Any]] = None
        self._moved: list[tuple[Any, Any]] = []
        self.out: Optional[_ThreadRouter] = None
        self.err: Optional[_ThreadRouter] = None

    def install(self) -> None:
        with self._lock:
            self._users += 1
            if self._users > 1:
                return
            self._saved = (sys.stdout, sys.stderr)
            self.out, self.err = _ThreadRouter(sys.stdout), _ThreadRouter(sys.stderr)
            sys.stdout, sys.stderr = self.out, self.err
            # Powertools' (and any) StreamHandler created before now holds the real stream: re-point it.
            for handler in _stream_handlers():
                stream = handler.stream
                if stream in self._saved:
                    router = self.out if stream is self._saved[0] else self.err
                    self._moved.append((handler, stream))
                    handler.setStream(router)

    def uninstall(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._saved is None:
                return
            for handler, stream in self._moved:
                if getattr(handler, "stream", None) in (self.out, self.err):
                    handler.setStream(stream)
            self._moved.clear()
            # A handler created WHILE installed (a Lambda module first imported by an invocation, as
            # Powertools' Logger is) holds our router: give it the real stream, so the next install
            # routes it again instead of it writing through this dead router to the terminal.
            for handler in _stream_handlers():
                if handler.stream is self.out or handler.stream is self.err:
                    handler.setStream(self._saved[0] if handler.stream is self.out else self._saved[1])
            if sys.stdout is self.out:
                sys.stdout = self._saved[0]
            if sys.stderr is self.err:
                sys.stderr = self._saved[1]
            self._saved = None

    def begin(self) -> io.StringIO:
        buffer = io.StringIO()
        for router in (self.out, self.err):
            if router is not None:
                router.buffers[threading.get_ident()] = buffer
        return buffer

    def end(self) -> None:
        for router in (self.out, self.err):
            if router is not None:
                router.buffers.pop(threading.get_ident(), None)


def _stream_handlers() -> list:
    """Every logging.StreamHandler of every logger (the root's included) that holds its own stream
    (logging's last-resort handler reads sys.stderr each time: nothing to re-point, and no setter)."""
    import logging
    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]
    return [h for logger in loggers for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and "stream" in vars(h)]


CAPTURE = OutputCapture()


class LocalLambda:
    """One function: its handler, settings, and where its logs go."""

    def __init__(self, function_name: str, handler: Callable[[dict, Any], Any], region: str, *,
                 timeout_seconds: float = 60.0, memory_mb: int = 256, log_file: Optional[Path] = None,
                 logs: Any = None) -> None:
        self.function_name, self.handler, self.region = function_name, handler, region
        self.timeout_seconds, self.memory_mb = timeout_seconds, memory_mb
        self.log_file, self.logs = log_file, logs
        self.log_group = f"/aws/lambda/{function_name}"
        stamp = time.strftime("%Y/%m/%d", time.gmtime())
        self.log_stream = f"{stamp}/[$LATEST]{uuid.uuid4().hex}"
        self._stream_created = False
        self._lock = threading.Lock()

    def context(self) -> FakeLambdaContext:
        return FakeLambdaContext(
            function_name=self.function_name, memory_limit_in_mb=self.memory_mb,
            timeout_seconds=self.timeout_seconds,
            invoked_function_arn=f"arn:aws:lambda:{self.region}:{ACCOUNT}:function:{self.function_name}",
            log_group_name=self.log_group, log_stream_name=self.log_stream)

    def invoke(self, event: dict) -> Invocation:
        """Call the handler once, as the Lambda service would; never raises for the handler's errors."""
        context = self.context()
        call = Invocation(request_id=context.aws_request_id)
        buffer = CAPTURE.begin() if CAPTURE.out is not None else None
        started = time.monotonic()
        try:
            call.result = self.handler(event, context)
        except Exception as exc:
            call.error = f"{type(exc).__name__}: {exc}"
            print(traceback.format_exc().rstrip())
        finally:
            call.seconds = time.monotonic() - started
            if buffer is not None:
                CAPTURE.end()
                call.output = buffer.getvalue()
        if call.seconds > self.timeout_seconds:
            call.timed_out = True
        self._write_log(call)
        return call

    def _write_log(self, call: Invocation) -> None:
        lines = [f"START RequestId: {call.request_id} Version: $LATEST"]
        lines += [line for line in call.output.splitlines() if line.strip()]
        if call.timed_out:
            lines.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime())}Z {call.request_id} "
                         f"Task timed out after {self.timeout_seconds:.2f} seconds")
        lines.append(f"END RequestId: {call.request_id}")
        lines.append(f"REPORT RequestId: {call.request_id}\tDuration: {call.seconds * 1000:.2f} ms\t"
                     f"Billed Duration: {int(call.seconds * 1000) + 1} ms\tMemory Size: {self.memory_mb} MB")
        with self._lock:
            if self.log_file is not None:
                self.log_file.parent.mkdir(parents=True, exist_ok=True)
                with open(self.log_file, "a") as handle:
                    handle.write("\n".join(lines) + "\n")
            if self.logs is not None:
                self._put(lines)

    def _put(self, lines: list[str]) -> None:
        try:
            if not self._stream_created:
                try:
                    self.logs.create_log_group(logGroupName=self.log_group)
                except self.logs.exceptions.ResourceAlreadyExistsException:
                    pass
                try:
                    self.logs.create_log_stream(logGroupName=self.log_group, logStreamName=self.log_stream)
                except self.logs.exceptions.ResourceAlreadyExistsException:
                    pass
                self._stream_created = True
            now = int(time.time() * 1000)
            self.logs.put_log_events(logGroupName=self.log_group, logStreamName=self.log_stream,
                                     logEvents=[{"timestamp": now, "message": line[:200_000]} for line in lines])
        except Exception:  # the file keeps everything; CloudWatch is a copy
            pass
