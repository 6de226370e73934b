"""Start CellProfiler processes over image-set ranges and wait for them.

One process per range, all started together, each with its own output
folder and log, OMP_NUM_THREADS=1 so N processes use N cores rather than
fighting over threads. If the worker is stopped (SIGTERM from Batch, Ctrl-C),
the children are stopped too so no orphan keeps writing.

A range is either given (`-f/-l`, when the worker knows the image sets: a LoadData CSV) or
chosen by CellProfiler's own count: process `part` of `parts` runs under `cpsets.py`, which
lets CellProfiler make its image-set list and keeps that part of it (see cpsets.py). The
interpreter for that is CellProfiler's own: `$CPB_CELLPROFILER_PYTHON`, else the one named on
the `cellprofiler` script's `#!` line (the container sets `/usr/local/bin/cpb-python`).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

from .errors import PipelineFailed


@dataclass
class Proc:
    """One CellProfiler process to start: a given range, or a part of CellProfiler's own list.

    Numbers are those CellProfiler sees (a child's sliced LoadData CSV starts at 1); `offset`
    turns them into the run's global image numbers."""

    first: Optional[int] = None  # -f (None with `last`: every image set)
    last: Optional[int] = None
    part: Optional[int] = None  # CellProfiler-counted split: this is part `part` of `parts`
    parts: Optional[int] = None
    window: Optional[Tuple[int, Optional[int]]] = None  # the job's image sets in CellProfiler's list (last None: its end)
    expect: Optional[int] = None  # CellProfiler must make exactly this many image sets
    offset: int = 0
    cp_total: Optional[int] = None  # image sets CellProfiler is given (its Group_Length), when known

    @property
    def counted_by_cellprofiler(self) -> bool:
        return self.part is not None

    def label(self) -> str:
        if self.part is not None:
            return f"part{self.part + 1:03d}of{self.parts:03d}"
        if self.first is None:
            return "all"
        return f"{self.first + self.offset:06d}-{self.last + self.offset:06d}"


@dataclass
class RangeResult:
    """What one CellProfiler process did (first/last: the image numbers CellProfiler ran;
    for a CellProfiler-counted part, from its report)."""

    first: Optional[int]
    last: Optional[int]
    out_dir: Path
    log: Path
    exit_code: int
    seconds: float
    offset: int = 0
    report: Optional[dict] = None  # cpsets.py's report for a CellProfiler-counted part
    counted: bool = False  # ran under cpsets.py
    cp_total: Optional[int] = None  # image sets CellProfiler made (its Group_Length), when known

    @property
    def idle(self) -> bool:
        """A CellProfiler-counted part beyond the image sets (more processes than sets)."""
        return bool(self.report) and self.report.get("status") == "idle"

    @property
    def global_first(self) -> Optional[int]:
        return None if self.first is None else self.first + self.offset

    @property
    def global_last(self) -> Optional[int]:
        return None if self.last is None else self.last + self.offset

    def describe(self) -> str:
        if self.first is None:
            return "all image sets"
        return f"image sets {self.global_first}-{self.global_last}"

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


def cellprofiler_python(env: Mapping[str, str]) -> Tuple[Optional[str], str]:
    """(CellProfiler's own Python, '') or (None, why not): what runs cpsets.py.

    $CPB_CELLPROFILER_PYTHON when set; else the interpreter on the `#!` line of the
    `cellprofiler` script (a pip console script names its virtualenv's python). A
    `cellprofiler` that is not a Python script (a frozen build, a shell wrapper) cannot be
    asked; the worker then runs one process over every image set, as CellProfiler would."""
    explicit = (env.get("CPB_CELLPROFILER_PYTHON") or "").strip()
    if explicit:
        return explicit, ""
    exe = env.get("CPB_CELLPROFILER") or "cellprofiler"
    found = exe if os.sep in exe else shutil.which(exe, path=env.get("PATH"))
    if not found:
        return None, f"{exe} is not on PATH"
    try:
        with open(found, "rb") as handle:
            first_line = handle.readline(512).decode("utf-8", "replace").strip()
    except OSError as exc:
        return None, f"cannot read {found}: {exc}"
    if not first_line.startswith("#!"):
        return None, f"{found} is not a Python script (no #! line)"
    words = first_line[2:].split()
    if words and os.path.basename(words[0]) == "env" and len(words) > 1:
        words = [shutil.which(words[1], path=env.get("PATH")) or words[1]] + words[2:]
    if not words or not os.path.basename(words[0]).startswith("python"):
        return None, f"{found} runs {words[0] if words else 'nothing'}, not Python"
    return words[0], ""


def installed_cellprofiler_version(env: Mapping[str, str]) -> Optional[str]:
    """The CellProfiler release installed beside CellProfiler's Python (its dist-info), without
    starting it; None when it cannot be told. Used for a local run's resume fingerprint."""
    python, _ = cellprofiler_python(env)
    if not python:
        return None
    prefix = Path(python).parent.parent
    for pattern in ("lib/python*/site-packages/cellprofiler-*.dist-info",
                    "lib/python*/site-packages/cellprofiler_nightly-*.dist-info"):
        found = sorted(prefix.glob(pattern))
        if found:
            return found[-1].name[:-len(".dist-info")].split("-", 1)[1]
    return None


def cpsets_script() -> str:
    from . import cpsets
    return cpsets.script_path()


#: JVM option for CellProfiler 4.2's in-process Java (Bio-Formats image reading, the image-set list):
#: compile with the quick C1 compiler only. Measured (bench/bench_worker.py, CellProfiler 4.2.8.1): the
#: C2 compiler spent ~2.5 s of CPU per process on its own threads (~9 % of a 16-set process) for code
#: that runs for seconds; without it the main thread's time is unchanged (image reading included) and
#: the CSVs are identical. A process alone hid that CPU on a spare core; N processes on N vCPUs pay it.
JAVA_TOOL_OPTIONS = "-XX:TieredStopAtLevel=1"


def child_env(env: Mapping[str, str]) -> dict:
    """One thread per process; one hash seed for all, so that what CellProfiler derives from set order
    (5.0 writes Experiment.csv's Metadata_Tags in set order) is the same in every range; and the JVM
    without its optimising compiler (JAVA_TOOL_OPTIONS above), unless the environment already chooses
    the JVM's compilers itself."""
    out = dict(env)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        out[name] = "1"
    out.setdefault("PYTHONHASHSEED", "0")
    given = out.get("JAVA_TOOL_OPTIONS", "")
    if "Tiered" not in given and "-Xint" not in given:
        out["JAVA_TOOL_OPTIONS"] = f"{given} {JAVA_TOOL_OPTIONS}".strip()
    return out


def process_argv(proc: Proc, base: List[str], python: Optional[str], report: Path) -> List[str]:
    """The command for one process: `cellprofiler ... [-f F -l L]`, or for a CellProfiler-counted
    part `<python> cpsets.py --report R --part I --parts N [...] -- <cellprofiler arguments>`."""
    if not proc.counted_by_cellprofiler:
        argv = list(base)
        if proc.first is not None:
            argv += ["-f", str(proc.first), "-l", str(proc.last)]
        return argv
    if python is None:
        raise PipelineFailed("internal: a CellProfiler-counted part needs CellProfiler's Python")
    argv = [python, cpsets_script(), "--report", str(report), "--part", str(proc.part), "--parts", str(proc.parts)]
    if proc.window is not None:
        argv += ["--first", str(proc.window[0])]
        if proc.window[1] is not None:
            argv += ["--last", str(proc.window[1])]
    if proc.expect is not None:
        argv += ["--expect", str(proc.expect)]
    return argv + ["--"] + base[1:]


def run_processes(pipeline: Path, input_dir: Path, data_file: Optional[Path], procs: List[Proc],
                  work_dir: Path, log_dir: Path, env: Mapping[str, str],
                  python: Optional[str] = None) -> List[RangeResult]:
    """Start one CellProfiler process per Proc, all at once, and wait for every one."""
    base = cellprofiler_argv(env) + ["-c", "-r", "-p", str(pipeline), "-i", str(input_dir)]
    if data_file is not None:
        base += ["--data-file", str(data_file)]
    log_dir.mkdir(parents=True, exist_ok=True)
    started = []
    popens: List[subprocess.Popen] = []
    try:
        for proc in procs:
            label = proc.label()
            out_dir = work_dir / f"range-{label}"
            out_dir.mkdir(parents=True, exist_ok=True)
            report = work_dir / f"report-{label}.json"
            argv = process_argv(proc, base + ["-o", str(out_dir)], python, report)
            log = log_dir / f"cellprofiler-{label}.log"
            with open(log, "wb") as handle:
                handle.write((" ".join(shlex.quote(a) for a in argv) + "\n").encode())
                handle.flush()
                try:
                    popen = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=child_env(env))
                except OSError as exc:
                    raise PipelineFailed(f"cannot start CellProfiler ({argv[0]}): {exc}; "
                                         "set CPB_CELLPROFILER to the cellprofiler executable") from None
            popens.append(popen)
            started.append((proc, out_dir, log, report, time.monotonic()))
        results = []
        for popen, (proc, out_dir, log, report, t0) in zip(popens, started):
            code = popen.wait()
            result = RangeResult(first=proc.first, last=proc.last, out_dir=out_dir, log=log, exit_code=code,
                                 seconds=round(time.monotonic() - t0, 3), offset=proc.offset,
                                 counted=proc.counted_by_cellprofiler, cp_total=proc.cp_total)
            if proc.counted_by_cellprofiler:
                result.report = _read_report(report)
                if result.report and isinstance(result.report.get("count"), int):
                    result.cp_total = result.report["count"]
                if result.report and result.report.get("status") == "running":
                    result.first, result.last = int(result.report["first"]), int(result.report["last"])
                    result.log = _rename(log, log_dir / f"cellprofiler-{result.global_first:06d}-"
                                                        f"{result.global_last:06d}.log")
            results.append(result)
        return results
    finally:
        _stop(popens)


def _read_report(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _rename(old: Path, new: Path) -> Path:
    """Name a counted part's log after the image sets it ran, like the -f/-l logs."""
    if new.exists():
        return old
    os.replace(old, new)
    return new


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
