"""Start CellProfiler processes over image-set ranges and wait for them.

One process per range, all started together, each with its own output
folder and log, OMP_NUM_THREADS=1 so N processes use N cores rather than
fighting over threads. If the worker is stopped (SIGTERM from Batch, Ctrl-C),
the children are stopped too so no orphan keeps writing.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional

from .errors import PipelineFailed
from .ranges import Range


@dataclass
class RangeResult:
    """What one CellProfiler process did."""

    first: Optional[int]
    last: Optional[int]
    out_dir: Path
    log: Path
    exit_code: int
    seconds: float

    def log_mentions(self, text: str) -> bool:
        try:
            return text in self.log.read_text(errors="replace")
        except OSError:
            return False

    def error_line(self) -> str:
        """The first Python error CellProfiler logged, for a one-line reason."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        for line in text.splitlines():
            if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", line) and "MySQL" not in line:
                return line.strip()[:300]
        return ""


#: Written by `make` beside a project CellProfiler virtualenv: the arguments that CellProfiler needs
#: (empty for 4.2.8; the 5.0 nightly's imageio readers), so any caller naming the executable gets them.
VENV_ARGS_FILE = "cpb-cellprofiler-args"


def cellprofiler_argv(env: Mapping[str, str]) -> List[str]:
    """The CellProfiler command: $CPB_CELLPROFILER (default `cellprofiler`) plus $CPB_CELLPROFILER_ARGS,
    else the arguments `make` recorded beside that executable's virtualenv (none for the container)."""
    exe = env.get("CPB_CELLPROFILER") or "cellprofiler"
    args = env.get("CPB_CELLPROFILER_ARGS")
    if args is None:
        args = venv_args(exe)
    return [exe] + shlex.split(args)


def venv_args(exe: str) -> str:
    """Arguments recorded in `<venv>/cpb-cellprofiler-args` for `<venv>/bin/cellprofiler`, else ''."""
    try:
        return (Path(exe).parent.parent / VENV_ARGS_FILE).read_text().strip()
    except OSError:
        return ""


def child_env(env: Mapping[str, str]) -> dict:
    out = dict(env)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        out[name] = "1"
    return out


def run_ranges(pipeline: Path, input_dir: Path, data_file: Optional[Path], ranges: List[Optional[Range]],
               work_dir: Path, log_dir: Path, env: Mapping[str, str]) -> List[RangeResult]:
    """Run one CellProfiler process per range (None = all image sets) in parallel."""
    base = cellprofiler_argv(env) + ["-c", "-r", "-p", str(pipeline), "-i", str(input_dir)]
    if data_file is not None:
        base += ["--data-file", str(data_file)]
    log_dir.mkdir(parents=True, exist_ok=True)
    started = []
    procs: List[subprocess.Popen] = []
    try:
        for item in ranges:
            label = "all" if item is None else f"{item[0]:06d}-{item[1]:06d}"
            out_dir = work_dir / f"range-{label}"
            out_dir.mkdir(parents=True, exist_ok=True)
            argv = base + ["-o", str(out_dir)]
            if item is not None:
                argv += ["-f", str(item[0]), "-l", str(item[1])]
            log = log_dir / f"cellprofiler-{label}.log"
            with open(log, "wb") as handle:
                handle.write((" ".join(shlex.quote(a) for a in argv) + "\n").encode())
                handle.flush()
                try:
                    proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=child_env(env))
                except OSError as exc:
                    raise PipelineFailed(f"cannot start CellProfiler ({argv[0]}): {exc}; "
                                   "set CPB_CELLPROFILER to the cellprofiler executable") from None
            procs.append(proc)
            started.append((item, out_dir, log, time.monotonic()))
        results = []
        for proc, (item, out_dir, log, t0) in zip(procs, started):
            code = proc.wait()
            results.append(RangeResult(first=None if item is None else item[0],
                                       last=None if item is None else item[1],
                                       out_dir=out_dir, log=log, exit_code=code,
                                       seconds=round(time.monotonic() - t0, 3)))
        return results
    finally:
        _stop(procs)


def _stop(procs: List[subprocess.Popen]) -> None:
    """Terminate children still running (only when we are leaving early)."""
    alive = [p for p in procs if p.poll() is None]
    for proc in alive:
        proc.terminate()
    deadline = time.monotonic() + 10
    for proc in alive:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def exit_code_text(code: int) -> int:
    """Exit codes as the shell reports them (a SIGKILL shows as 137, not -9)."""
    return 128 - code if code < 0 else code
