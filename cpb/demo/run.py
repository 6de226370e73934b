"""`make demo`: the whole system end to end with no AWS account.

AWS is moto's server on 127.0.0.1; everything else is the real code:
`cpb submit --upload` uploads a generated plate and sends the message, the
real Lambda handler gets the SQS batch as the event source mapping would
give it, the jobs it submits are run by `cpb.local.batch` (the real worker
with real CellProfiler, as Batch would start the container), `cpb status`
and `cpb results` report and download. The plate is synthetic with a known
number of nuclei per site, so the demo checks its own answer.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import click

from cpb.local.emulator import create_stack, environment, moto_server

REPO = Path(__file__).resolve().parents[2]
PLATE = "SYN1"
WELL_NAMES = [f"{row}{col:02d}" for row in "ABCDEFGH" for col in range(1, 13)]


@dataclass
class DemoSettings:
    """What the demo runs; the defaults are `make demo`'s."""

    out_dir: Path = Path("demo-output")
    wells: int = 2
    sites: int = 4
    sets_per_job: int = 2
    parallel: int = 2
    job_vcpus: int = 1  # CPB_VCPUS per job: CellProfiler processes inside each job
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
    exe = os.environ.get("CPB_CELLPROFILER") or str(REPO / ".venv-cp" / "bin" / "cellprofiler")
    if not Path(exe).exists() and not shutil.which(exe):
        raise click.ClickException(f"CellProfiler not found at {exe}: run `make demo` (it installs .venv-cp) "
                                   "or set CPB_CELLPROFILER")
    from cpb_worker.runner import venv_args
    return {"CPB_CELLPROFILER": exe,
            "CPB_CELLPROFILER_ARGS": os.environ.get("CPB_CELLPROFILER_ARGS", venv_args(exe)),
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _invoke(args: list[str], capture: bool = True) -> tuple[int, str]:
    """Run a `cpb` command in this process, as a user would type it; (exit code, output).

    Uncaptured, it writes to the terminal itself, so its progress bars show.
    """
    from cpb.cli import cli
    if capture:
        from click.testing import CliRunner
        result = CliRunner().invoke(cli, args)
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.output
    try:
        cli.main(args=args, prog_name="cpb", standalone_mode=False)
    except SystemExit as exit_:
        return int(exit_.code or 0), ""
    except click.ClickException as error:
        error.show()
        return error.exit_code, error.format_message()
    return 0, ""


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
    from cpb.local import batch as localbatch, mapping as localingress
    from cpb.demo.synthetic import make_plate

    steps = Steps(7, settings.echo)
    out = settings.out_dir.resolve()
    for line in clear_previous_demo(out):
        steps.say(line)
    pipeline = settings.pipeline or (REPO / "cpb" / "pipelines" / "nuclei.cppipe")
    output_prefix = f"results/{PLATE}"
    result = DemoResult(ok=False, output_prefix=output_prefix)
    quiet = {"POWERTOOLS_LOG_LEVEL": "WARNING", "POWERTOOLS_SERVICE_NAME": "cpb-ingress"}
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    with contextlib.ExitStack() as running:  # stops the emulator however the demo ends
        with steps.step("setup", "setup: AWS emulated on 127.0.0.1 (moto), stack resources, CellProfiler"):
            cp_env = cellprofiler_env()
            endpoint = result.endpoint = running.enter_context(moto_server())
        stack = create_stack(endpoint)
        steps.say(f"      bucket {stack.bucket}, queue {stack.queue_url.rsplit('/', 1)[-1]}, "
                  f"Batch queue {stack.job_queue_arn.rsplit('/', 1)[-1]} at {endpoint}")
        env = {**stack.isolation_env(), **stack.client_env(), **stack.lambda_env(), **cp_env, **quiet,
               "CPB_HOME": str(out / "cpb-home")}  # the demo's submit receipts stay in demo-output/
        with environment(env):
            with steps.step("plate", f"plate: {settings.wells} wells x {settings.sites} sites x 2 channels "
                                     "of synthetic nuclei with known counts"):
                wells = WELL_NAMES[:settings.wells]
                plate = make_plate(out / "plate", wells=wells, sites=settings.sites, seed=settings.seed,
                                   plate=PLATE)
            with steps.step("submit", "upload + submit: cpb submit --upload (array job, "
                                      f"{settings.sets_per_job} image sets per child)"):
                code, text = _invoke(["submit", "--upload", str(plate.images_dir), "--pipeline", str(pipeline),
                                      "--input", f"plates/{PLATE}", "--output", output_prefix,
                                      "--data-file", str(plate.images_dir / "load_data.csv"),
                                      "--image-sets-per-job", str(settings.sets_per_job), "--vcpus", "1",
                                      "--job-name", f"demo-{PLATE}"], capture=not settings.echo)
                if code != 0:
                    result.failures.append(f"cpb submit failed: {text.strip()}")
                    return _finish(result, steps)
            with steps.step("lambda", "Lambda: SQS batch -> handlers.ingress.handler (as the event source mapping)"):
                from handlers import ingress
                import boto3
                sqs = boto3.client("sqs")
                report = localingress.pump(sqs, stack.queue_url, ingress.handler, stack.region)
                steps.say(f"      {report.invocations} invocation(s), {len(report.deleted)} message(s) accepted, "
                          f"{len(report.failures)} failed")
                if report.failures:
                    result.failures.append(f"the Lambda rejected {len(report.failures)} message(s); "
                                           "see `cpb status` below")
            with steps.step("batch", f"Batch: running the jobs with the real worker, {settings.parallel} at a time, "
                                    f"{settings.job_vcpus} vCPU each"):
                outcomes = _run_batch(stack, out, settings, steps)
                failed = [o for o in outcomes if o.status != "SUCCEEDED"]
                for outcome in failed:
                    result.failures.append(f"job {outcome.item.label} failed: {outcome.reason} (log {outcome.log})")
            with steps.step("results", f"results: cpb status + cpb results {output_prefix}"):
                show_logs = ["--logs", "3"] if failed else []  # a failed job: show the end of its log too
                result.status_exit, result.status_output = _invoke(["status", output_prefix, *show_logs])
                steps.say(_indent(result.status_output))
                results_dir = out / "results"
                code, text = _invoke(["results", output_prefix, "--to", str(results_dir)], capture=not settings.echo)
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


class JobProgress:
    """`jobs n/m done (k running)` lines from the runner's events (called from its threads)."""

    def __init__(self, steps: Steps) -> None:
        self.steps, self.total, self.done, self.running = steps, 0, 0, 0
        self._lock = threading.Lock()

    def __call__(self, kind: str, item: Any, detail: str) -> None:
        with self._lock:
            if kind == "start" and detail == "attempt 1":
                self.running += 1
            elif kind == "done":
                self.running, self.done = self.running - 1, self.done + 1
                self.steps.say(f"      jobs {self.done}/{self.total} done ({self.running} running): "
                               f"{item.label} {detail}")
            elif kind == "retry":
                self.steps.say(f"      {item.label}: {detail}")


def _run_batch(stack: Any, out: Path, settings: DemoSettings, steps: Steps) -> list:
    """Discover the submitted jobs and run them, reporting progress as they finish."""
    import boto3

    from cpb.local import batch as localbatch
    progress = JobProgress(steps)
    runner = localbatch.LocalBatch(boto3.client("batch"), stack.job_queue_arn, stack.aws_env(), out / "logs",
                                   localbatch.MotoJobStates(stack.region), parallel=settings.parallel,
                                   vcpus_per_job=settings.job_vcpus, logs=boto3.client("logs"), on_event=progress)
    items = runner.discover()
    progress.total = len(items)
    steps.say(f"      {len(items)} job(s) found in the job queue")
    try:
        outcomes = runner.run(items)
        return outcomes + runner.drain()
    except BaseException:  # Ctrl-C: no worker or CellProfiler process may outlive the demo
        runner.stop()
        raise


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
