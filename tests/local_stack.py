"""Test support: `cpb local up` as a separate process, and what processes it leaves behind.

`LocalUp` starts the command a user types (`python -m cpb local up --port 0 ...`) with its own
`CPB_HOME`, waits for its "ready" line, hands out the environment `aws`/`cpb` need (read from the
state file it wrote), and always stops it: SIGINT first (as Ctrl-C), SIGKILL of its whole process
group if it does not stop in time, so no test leaves a process running.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
AWS = str(Path(sys.executable).with_name("aws"))


def processes_with(variable: str, value: str) -> list[int]:
    """Live processes whose environment has `variable=value` (workers and CellProfiler inherit it)."""
    needle = f"{variable}={value}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    with open(f"/proc/{name}/stat") as stat:
                        if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                            found.append(int(name))
        except OSError:
            continue
    return found


class LocalUp:
    """One `cpb local up` process."""

    def __init__(self, home: Path, *args: str, env: Optional[dict] = None, ready_timeout: float = 90.0) -> None:
        self.home = home
        self.env = {**os.environ, **(env or {}), "CPB_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        for key in [k for k in self.env if k.startswith("AWS_") or (k.startswith("CPB_") and k not in (
                "CPB_HOME", "CPB_CELLPROFILER", "CPB_CELLPROFILER_ARGS"))]:
            if not (env and key in env):
                del self.env[key]
        self.proc = subprocess.Popen([sys.executable, "-m", "cpb", "local", "up", "--port", "0", *args],
                                     env=self.env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + ready_timeout
        while not any(" ready in " in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("cpb local up did not start:\n" + self.output)
            time.sleep(0.1)
        self.state = json.loads((home / "local-stack.json").read_text())
        self.endpoint = self.state["endpoint"]
        self.outputs = self.state["outputs"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def aws_env(self) -> dict[str, str]:
        """What the `export` lines `cpb local up` printed set (read back from its output)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CPB_"))}
        for line in self.lines:
            line = line.strip()
            if line.startswith("export "):
                for pair in line[len("export "):].split():
                    key, _, value = pair.partition("=")
                    env[key] = value
        env["CPB_HOME"] = str(self.home)
        return env

    def run(self, *argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """A command as the user types it in the other terminal (after pasting the export lines)."""
        done = subprocess.run(list(argv), env=self.aws_env(), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def cpb(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "cpb", *args, check=check)

    def wait_for(self, text: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never appeared in cpb local up's output:\n{self.output}")

    def interrupt(self, timeout: float = 60.0) -> int:
        """Ctrl-C, as in the terminal; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        """Never leave it running: SIGINT, then SIGKILL of its process group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._reader.join(timeout=5)
