"""`make demo`: the whole system end to end with no AWS account.

The demo starts the local stack (`cpb.local.up.LocalCloud`, the same code as `cpb local up`):
moto's server on 127.0.0.1 with the stack's resources, the SQS -> Lambda event source mapping
feeding the real handler, and the local Batch running the real worker with real CellProfiler.
Then it does what a scientist would, with the same commands, run as separate processes against
`--stack local`: `cpb submit --upload` uploads a generated plate and sends the message, and, once
the Lambda has submitted the array job and Batch has run it, `cpb status` and `cpb results` report
and download. The plate is synthetic with a known number of nuclei per site, so the demo checks
its own answer.
"""
from __future__ import annotations

import contextlib
import csv
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import click

from cpb.local.emulator import environment
from cpb.local.up import LocalCloud, LocalStackError, cellprofiler_env as local_cellprofiler_env
from cpb.local.settings import LocalSettings

REPO = Path(__file__).resolve().parents[2]
PLATE = "SYN1"
WELL_NAMES = [f"{row}{col:02d}" for row in "ABCDEFGH" for col in range(1, 13)]
DEMO_STACK = "demo"
WAIT_SECONDS = 1800  # the demo's jobs take seconds; this only stops a broken run from hanging forever


@dataclass
class DemoSettings:
    """What the demo runs; the defaults are `make demo`'s."""

    out_dir: Path = Path("demo-output")
    wells: int = 2
    sites: int = 4
    sets_per_job: int = 2
    parallel: int = 2
    job_vcpus: int = 1  # vCPUs each job asks for (CellProfiler processes inside each job)
    tolerance: float = 0.1
    seed: int = 7
    pipeline: Optional[Path] = None  # default: cpb/pipelines/nuclei.cppipe
    echo: bool = True


@dataclass
class DemoResult:
    """What the demo found, for tests and for the exit code."""

    ok: bool
    table: list[dict] = field(default_factory=list)
    output_prefix: str = ""
    endpoint: str = ""
    results_dir: Optional[Path] = None
    montage: Optional[Path] = None
    status_output: str = ""
    status_exit: Optional[int] = None
    failures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class Steps:
    """Numbered progress lines: what the demo is doing now and how long each took."""

    def __init__(self, total: int, echo: bool) -> None:
        self.total, self.echo, self.n = total, echo, 0
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str, text: str) -> Iterator[None]:
        self.n += 1
        self.say(f"[{self.n}/{self.total}] {text}")
        started = time.monotonic()
        yield
        self.timings[name] = round(time.monotonic() - started, 2)

    def say(self, text: str) -> None:
        if self.echo:
            click.echo(text, err=False)
            sys.stdout.flush()


def cellprofiler_env() -> dict[str, str]:
    """CPB_CELLPROFILER (the Makefile exports it) or the project's .venv-cp."""
    try:
        return local_cellprofiler_env()
    except LocalStackError as exc:
        raise click.ClickException(str(exc)) from None


class Cpb:
    """`cpb ... --stack local` as a user types it: `python -m cpb` in its own process."""

    def __init__(self, home: Path, environ: dict[str, str]) -> None:
        self.env = {**environ, "CPB_HOME": str(home),
                    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [environ.get("PYTHONPATH")])])}

    def __call__(self, command: str, *args: str, capture: bool = True) -> tuple[int, str]:
        argv = [sys.executable, "-m", "cpb", command, "--stack", "local", *args]
        if not capture:  # the user's terminal: progress bars show
            sys.stdout.flush()
            return subprocess.run(argv, env=self.env, timeout=WAIT_SECONDS).returncode, ""
        done = subprocess.run(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=WAIT_SECONDS)
        return done.returncode, done.stdout


DEMO_MARKER = ".cpb-demo"  # written into --out: the folder is the demo's to clean on the next run
DEMO_OWNED = ("plate", "results", "logs", "cpb-home", "plate.png")


def clear_previous_demo(out: Path) -> list[str]:
    """Start clean: delete what an earlier demo wrote, but only in a folder a demo made.
    In any other folder (`cpb demo --out ~/project`) same-named entries are the scientist's:
    they are renamed aside, never deleted. Returns one line per entry moved."""
    present = [name for name in DEMO_OWNED if (out / name).exists()]
    ours = (out / DEMO_MARKER).is_file() or (out / "cpb-home").is_dir()  # cpb-home: demos before the marker
    moved = []
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for name in present:
        target = out / name
        if not ours:
            aside = out / f"{name}.before-demo-{stamp}"
            target.rename(aside)
            moved.append(f"      {target} was not written by a demo: kept, renamed to {aside.name}")
        elif target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `cpb demo`; it deletes its own plate/ results/ logs/ "
                                   "cpb-home/ plate.png here on its next run\n")
    return moved


def run_demo(settings: DemoSettings) -> DemoResult:
    """Run the demo; print progress, the table, where things are; return what happened."""
    from cpb.demo.synthetic import make_plate

    steps = Steps(7, settings.echo)
    out = settings.out_dir.resolve()
    for line in clear_previous_demo(out):
        steps.say(line)
    pipeline = settings.pipeline or (REPO / "cpb" / "pipelines" / "nuclei.cppipe")
    output_prefix = f"results/{PLATE}"
    result = DemoResult(ok=False, output_prefix=output_prefix)
    home = out / "cpb-home"  # the demo's local-stack state file and submit receipts stay in demo-output/
    cpb = Cpb(home, dict(os.environ))
    progress = JobProgress(steps)
    cores = settings.parallel * settings.job_vcpus

    with contextlib.ExitStack() as running:  # stops the local stack however the demo ends
        with steps.step("setup", f"setup: the local stack (moto on 127.0.0.1, the stack's resources, "
                                 f"SQS -> Lambda, Batch on {cores} core(s)), CellProfiler"):
            cellprofiler_env()
            running.enter_context(environment({"CPB_HOME": str(home)}))
            cloud = running.enter_context(LocalCloud(
                LocalSettings(stack=DEMO_STACK), port=0, log_dir=out / "logs", cores=cores, on_job=progress))
            result.endpoint = cloud.stack.endpoint
        steps.say(f"      bucket {cloud.stack.bucket}, queue {cloud.stack.queue_url.rsplit('/', 1)[-1]}, "
                  f"Batch queue {cloud.stack.job_queue_arn.rsplit('/', 1)[-1]} at {result.endpoint}")
        with steps.step("plate", f"plate: {settings.wells} wells x {settings.sites} sites x 2 channels "
                                 "of synthetic nuclei with known counts"):
            wells = WELL_NAMES[:settings.wells]
            plate = make_plate(out / "plate", wells=wells, sites=settings.sites, seed=settings.seed, plate=PLATE)
        with steps.step("submit", "upload + submit: cpb submit --stack local --upload (array job, "
                                  f"{settings.sets_per_job} image sets per child)"):
            code, text = cpb("submit", "--upload", str(plate.images_dir), "--pipeline", str(pipeline),
                             "--input", f"plates/{PLATE}", "--output", output_prefix,
                             "--data-file", str(plate.images_dir / "load_data.csv"),
                             "--image-sets-per-job", str(settings.sets_per_job), "--vcpus", str(settings.job_vcpus),
                             "--job-name", f"demo-{PLATE}", capture=not settings.echo)
            if code != 0:
                result.failures.append(f"cpb submit failed: {text.strip()}")
                return _finish(result, steps)
        with steps.step("lambda", "Lambda: the event source mapping hands the SQS batch to handlers.ingress.handler"):
            reports = _wait_for_lambda(cloud)
            handled = sum(len(r.deleted) for r in reports)
            failed = sorted({m for r in reports for m in r.failed})
            steps.say(f"      {len(reports)} invocation(s), {handled} message(s) accepted, {len(failed)} failed")
            if failed or not handled:
                reasons = {m: r.reasons.get(m) or r.error for r in reports for m in r.failed}
                result.failures.append("the Lambda accepted no message" if not failed else
                                       f"the Lambda rejected {len(failed)} message(s): "
                                       + "; ".join(str(reasons.get(m)) for m in failed))
        with steps.step("batch", f"Batch: the real worker runs each job as the container would, {cores} core(s), "
                                 f"{settings.job_vcpus} vCPU per job"):
            progress.total = len(cloud.batch.tasks())
            steps.say(f"      {progress.total} job(s) in the job queue")
            if not cloud.wait_idle(WAIT_SECONDS):
                result.failures.append(f"the jobs did not finish within {WAIT_SECONDS} s")
            failed_jobs = [o for o in cloud.batch.outcomes if o.status != "SUCCEEDED"]
            for outcome in failed_jobs:
                result.failures.append(f"job {outcome.item.label} failed: {outcome.reason} (log {outcome.log})")
        with steps.step("results", f"results: cpb status + cpb results {output_prefix}"):
            show_logs = ["--logs", "3"] if failed_jobs else []  # a failed job: show the end of its log too
            result.status_exit, result.status_output = cpb("status", output_prefix, *show_logs)
            steps.say(_indent(result.status_output))
            results_dir = out / "results"
            code, text = cpb("results", output_prefix, "--to", str(results_dir), capture=not settings.echo)
            if code != 0:
                result.failures.append(f"cpb results refused: {text.strip()}")
                return _finish(result, steps)
            result.results_dir = results_dir
        with steps.step("check", "check: counted vs true nuclei per well, and the plate picture"):
            result.table = compare_counts(results_dir / "Image.csv", plate.truth, settings.tolerance)
            steps.say(render_table(result.table, settings.tolerance))
            bad = [row for row in result.table if not row["ok"]]
            if bad:
                result.failures.append(f"{len(bad)} well(s) off by more than {settings.tolerance:.0%}")
            from cpb.demo.montage import make_montage
            result.montage = make_montage(results_dir, plate.truth, out / "plate.png",
                                          counted={(r["well"], s): c for r in result.table
                                                   for s, c in r["sites"].items()})
    result.ok = not result.failures and result.status_exit == 0
    return _finish(result, steps)


def _wait_for_lambda(cloud: LocalCloud, timeout: float = 120.0) -> list:
    """The mapping's invocations once the queue is empty (the message sent, handled or failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cloud.mapping.reports and cloud.mapping.idle():
            break
        time.sleep(0.1)
    return list(cloud.mapping.reports)


class JobProgress:
    """`jobs n/m done (k running)` lines from the runner's events (called from its threads)."""

    def __init__(self, steps: Steps) -> None:
        self.steps, self.total, self.done = steps, 0, 0
        self._running: set[str] = set()
        self._lock = threading.Lock()

    @property
    def running(self) -> int:
        return len(self._running)

    def __call__(self, kind: str, item: Any, detail: str) -> None:
        with self._lock:
            if kind == "start" and detail == "attempt 1":
                self._running.add(item.job_id)
            elif kind == "done":
                self._running.discard(item.job_id)
                self.done += 1
                self.steps.say(f"      jobs {self.done}/{max(self.total, self.done)} done ({self.running} running): "
                               f"{item.label} {detail}")
            elif kind == "retry":
                self.steps.say(f"      {item.label}: {detail}")


def compare_counts(image_csv: Path, truth: dict, tolerance: float) -> list[dict]:
    """Per-well counted vs true nuclei from the merged Image.csv."""
    counted: dict[tuple[str, int], int] = {}
    with open(image_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            counted[(row["Metadata_Well"], int(float(row["Metadata_Site"])))] = int(float(row["Count_Nuclei"]))
    table = []
    for well in sorted({w for w, _ in truth}):
        sites = {s: counted.get((well, s)) for w, s in truth if w == well}
        true = sum(truth[(well, s)] for s in sites)
        got = sum(c for c in sites.values() if c is not None)
        missing = [s for s, c in sites.items() if c is None]
        error = abs(got - true) / true if true else float(got > 0)
        table.append({"well": well, "sites": sites, "counted": got, "true": true, "error": error,
                      "missing": missing, "ok": not missing and error <= tolerance})
    return table


def render_table(table: list[dict], tolerance: float) -> str:
    """The per-well table the demo prints."""
    lines = [f"      {'well':<6}{'sites':>6}{'counted':>9}{'true':>6}{'error':>8}  (tolerance {tolerance:.0%} per well)"]
    for row in table:
        note = "" if row["ok"] else ("  MISSING sites " + ",".join(map(str, row["missing"])) if row["missing"]
                                     else "  OUT OF TOLERANCE")
        lines.append(f"      {row['well']:<6}{len(row['sites']):>6}{row['counted']:>9}{row['true']:>6}"
                     f"{row['error']:>8.1%}{note}")
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.strip().splitlines())


def _finish(result: DemoResult, steps: Steps) -> DemoResult:
    result.timings = dict(steps.timings)
    total = sum(steps.timings.values())
    if result.ok:
        steps.say(f"demo succeeded in {total:.0f} s: every well within tolerance, nothing left running")
    else:
        steps.say("demo FAILED:\n" + "\n".join(f"  - {f}" for f in result.failures))
    if result.results_dir:
        steps.say(f"results: {result.results_dir} (Image.csv, Nuclei.csv, outline PNGs, _cpb/runs.json)")
    if result.montage:
        steps.say(f"picture: {result.montage} (the plate with the outlines CellProfiler drew)")
    return result
