"""`make demo`: the whole system end to end with no AWS account, on a plate, as a Cell Painting lab runs one.

The demo starts the local stack (`cpb.local.up.LocalCloud`, the same code as `cpb local up`):
moto's server on 127.0.0.1 with the stack's resources, the SQS -> Lambda event source mapping
feeding the real ingress handler, the job-events Lambda, and the local Batch running the real
worker with real CellProfiler, honouring `dependsOn`. Then it does what a scientist does with a
plate, with the same commands typed as a user types them, each in its own process against
`--stack local`:

    cpb plate <images> --illum-pipeline illum.cppipe --analysis-pipeline cellpainting.cppipe ...
        builds both LoadData CSVs, uploads, sends ONE list message: the illumination job, then
        the analysis array job `after` it (Batch dependsOn)
    cpb status --watch                     until both steps have finished
    cpb results <analysis> --to results --parquet   merged CSVs + single-cell Parquet (CytoTable)
    cpb report results                     plate QC report (PNG + HTML)
    cpb profile results --platemap ...     well profiles (pycytominer)
    cpb plate ... (again)                  every step up to date: nothing sent, and it says so

The plate (`cpb.demo.cellpainting`) is synthetic, seen through an uneven light field, with a
known number of cells per site: the demo checks its own answer per well. The check passes
because the illumination step's functions are applied: the same analysis with flat functions
counts several times too many nuclei in every well of the default plate
(tests/test_e2e.py proves it on the test plate).
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
PLATE = "CP1"
WELL_NAMES = [f"{row}{col:02d}" for row in "ABCDEFGH" for col in range(1, 13)]
DEMO_STACK = "demo"
WAIT_SECONDS = 1800  # the demo's jobs take seconds; this only stops a broken run from hanging forever
ROOT = "plates"  # cpb plate's default --root: the plate's outputs are plates/CP1/illum and plates/CP1/analysis


@dataclass
class DemoSettings:
    """What the demo runs; the defaults are `make demo`'s."""

    out_dir: Path = Path("demo-output")
    wells: int = 4  # every other well a negative control (DMSO): 4 wells give pycytominer 2 control wells
    sites: int = 2
    sets_per_job: int = 4  # sites per analysis array child (cpb plate's default)
    parallel: int = 2
    job_vcpus: int = 1  # vCPUs each job asks for (CellProfiler processes inside each job)
    tolerance: float = 0.1
    seed: int = 7
    illum_pipeline: Optional[Path] = None  # default: cpb/pipelines/illum.cppipe
    analysis_pipeline: Optional[Path] = None  # default: cpb/pipelines/cellpainting.cppipe
    echo: bool = True


@dataclass
class DemoResult:
    """What the demo found, for tests and for the exit code."""

    ok: bool
    table: list[dict] = field(default_factory=list)
    output_prefix: str = ""  # the analysis output
    illum_prefix: str = ""
    endpoint: str = ""
    plate_dir: Optional[Path] = None
    results_dir: Optional[Path] = None
    parquet: Optional[Path] = None
    report_png: Optional[Path] = None
    report_html: Optional[Path] = None
    profiles: list[Path] = field(default_factory=list)
    montage: Optional[Path] = None
    plate_output: str = ""  # what the first `cpb plate` printed
    status_output: str = ""
    status_exit: Optional[int] = None
    again_output: str = ""  # what the second, identical `cpb plate` printed
    again_sent: Optional[int] = None  # messages the Lambda received after the second `cpb plate` (0: nothing sent)
    jobs: list[dict] = field(default_factory=list)  # every job the local Batch ran: label, status, started, ended
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
    """`cpb ... --stack local` as a user types it: `python -m cpb` in its own process, in this folder.

    Each call prints the command line (`$ cpb ...`) and, indented, what the command printed."""

    SETTINGS_NOTE = "stack settings from the local stack"

    def __init__(self, home: Path, environ: dict[str, str], steps: "Steps") -> None:
        self.env = {**environ, "CPB_HOME": str(home),
                    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [environ.get("PYTHONPATH")])])}
        self.steps = steps
        self._noted = False

    def __call__(self, command: str, *args: str, show: bool = True, stack: bool = True) -> tuple[int, str]:
        """`stack=False` for the commands that work on a local folder only (report, profile)."""
        options = ["--stack", "local"] if stack else []
        self.steps.say(f"      $ cpb {' '.join([command, *options, *args])}")
        argv = [sys.executable, "-m", "cpb", command, *options, *args]
        done = subprocess.run(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=WAIT_SECONDS)
        if show:
            self.show(done.stdout)
        return done.returncode, done.stdout

    def show(self, text: str) -> None:
        """The command's output, indented; where the stack settings came from is said once."""
        lines = []
        for line in text.rstrip().splitlines():
            if line.startswith(self.SETTINGS_NOTE):
                if self._noted:
                    continue
                self._noted = True
            lines.append(line)
        if lines:
            self.steps.say(_indent("\n".join(lines), 8))


def typed(path: Path) -> str:
    """A path as a user would type it here: relative to this folder when it lies inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


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
    """Run the demo; print progress, the commands and what they said, the table, where things are."""
    from cpb.demo.cellpainting import ANALYSIS_PIPELINE, CHANNEL_NUMBERS, ILLUM_PIPELINE, make_cellpainting_plate

    steps = Steps(10, settings.echo)
    out = settings.out_dir.resolve()
    for line in clear_previous_demo(out):
        steps.say(line)
    illum_pipeline = settings.illum_pipeline or ILLUM_PIPELINE
    analysis_pipeline = settings.analysis_pipeline or ANALYSIS_PIPELINE
    illum_prefix, analysis_prefix = f"{ROOT}/{PLATE}/illum", f"{ROOT}/{PLATE}/analysis"
    result = DemoResult(ok=False, output_prefix=analysis_prefix, illum_prefix=illum_prefix)
    home = out / "cpb-home"  # the demo's local-stack state file and receipts stay in demo-output/
    cpb = Cpb(home, dict(os.environ), steps)
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

        with steps.step("plate", f"plate: {settings.wells} wells x {settings.sites} sites x 3 channels (DNA, AGP, "
                                 "Mito) of synthetic cells with known counts, under uneven light"):
            wells = WELL_NAMES[:settings.wells]
            plate = make_cellpainting_plate(out / "plate", wells=wells, sites=settings.sites, seed=settings.seed,
                                            plate=PLATE)
            result.plate_dir = plate.root
            steps.say(f"      {typed(plate.images_dir)}/: {len(plate.images)} TIFFs named like "
                      f"{plate.images[0].name} (ImageXpress); platemap {typed(plate.platemap_file)}: "
                      + ", ".join(f"{w} {t}" for w, t in plate.treatments.items()))

        plate_args = [typed(plate.images_dir), "--illum-pipeline", typed(illum_pipeline),
                      "--analysis-pipeline", typed(analysis_pipeline), "--pattern", "imagexpress",
                      *[a for name, number in CHANNEL_NUMBERS.items() for a in ("--channel", f"{number}={name}")],
                      "--image-sets-per-job", str(settings.sets_per_job), "--vcpus", str(settings.job_vcpus)]
        with steps.step("submit", "cpb plate: LoadData CSVs from the file names, upload, ONE message: the "
                                  "illumination job, then the analysis array job after it"):
            code, result.plate_output = cpb("plate", *plate_args)
            if code != 0:
                result.failures.append(f"cpb plate failed: {_last_line(result.plate_output)}")
                return _finish(result, steps)

        with steps.step("lambda", "Lambda: the event source mapping hands the message to handlers.ingress.handler"):
            reports = _wait_for_lambda(cloud)
            handled = sum(len(r.deleted) for r in reports)
            failed = sorted({m for r in reports for m in r.failed})
            tasks = cloud.batch.tasks()
            progress.total = len(tasks)
            steps.say(f"      {len(reports)} invocation(s), {handled} message(s) accepted, {len(failed)} failed; "
                      f"in the job queue: {_describe_jobs(tasks)}")
            if failed or not handled:
                reasons = {m: r.reasons.get(m) or r.error for r in reports for m in r.failed}
                result.failures.append("the Lambda accepted no message" if not failed else
                                       f"the Lambda rejected {len(failed)} message(s): "
                                       + "; ".join(str(reasons.get(m)) for m in failed))
                return _finish(result, steps)

        with steps.step("batch", f"Batch: the real worker runs each job as the container would ({cores} core(s), "
                                 f"{settings.job_vcpus} vCPU per job); cpb status --watch follows both steps"):
            code, watched = cpb("status", "--watch", "--interval", "1", "--timeout", str(WAIT_SECONDS), show=False)
            if not cloud.wait_idle(WAIT_SECONDS):  # the events Lambda may still be writing
                result.failures.append(f"the jobs did not finish within {WAIT_SECONDS} s")
            failed_jobs = [o for o in cloud.batch.outcomes if o.status != "SUCCEEDED"]
            if failed_jobs:  # ask again, with the end of each failed job's log
                result.status_exit, result.status_output = cpb("status", illum_prefix, analysis_prefix, "--logs", "3")
            else:  # the watch's last refresh is what the user's terminal shows at the end
                result.status_exit = code
                result.status_output = last_refresh(watched, f"s3://{cloud.stack.bucket}/{illum_prefix}/:")
                cpb.show(result.status_output)
            result.jobs = progress.jobs()
            for outcome in failed_jobs:
                result.failures.append(f"job {outcome.item.label} failed: {outcome.reason} (log {outcome.log})")
            if result.status_exit != 0:
                result.failures.append(f"cpb status exited {result.status_exit}: the plate did not succeed")

        results_dir = out / "results"
        with steps.step("results", f"results: the analysis step's parts merged, and single-cell Parquet (CytoTable)"):
            code, text = cpb("results", analysis_prefix, "--to", typed(results_dir), "--parquet")
            if code != 0:
                result.failures.append(f"cpb results refused: {_last_line(text)}")
                return _finish(result, steps)
            result.results_dir = results_dir
            result.parquet = results_dir / "single_cell.parquet"

        with steps.step("report", "report: the plate QC report (cells per well, CellProfiler seconds, provenance)"):
            code, text = cpb("report", typed(results_dir), "--data-file", typed(plate.data_file), stack=False)
            if code != 0:
                result.failures.append(f"cpb report failed: {_last_line(text)}")
            else:
                result.report_png = results_dir / "report" / "plate-qc.png"
                result.report_html = results_dir / "report" / "plate-qc.html"

        with steps.step("profile", "profiles: pycytominer aggregate, annotate, normalize, feature select"):
            controls = sum(1 for t in plate.treatments.values() if t == "DMSO")
            reference = [] if controls >= 2 else ["--normalize-to", "plate"]  # negcon needs 2 control wells
            code, text = cpb("profile", typed(results_dir), "--platemap", typed(plate.platemap_file), *reference,
                             stack=False)
            if code != 0:
                result.failures.append(f"cpb profile failed: {_last_line(text)}")
            else:
                result.profiles = sorted((results_dir / "profiles").glob("*.parquet"))

        with steps.step("check", "check: counted vs true nuclei per well (and cells in the profiles), the picture"):
            result.table = compare_counts(results_dir / "Image.csv", plate.truth, settings.tolerance)
            add_profile_counts(result.table, results_dir / "profiles" / f"{PLATE}_aggregated.parquet")
            steps.say(render_table(result.table, settings.tolerance))
            bad = [row for row in result.table if not row["ok"]]
            if bad:
                result.failures.append(f"{len(bad)} well(s) off by more than {settings.tolerance:.0%}")
            disagree = [row["well"] for row in result.table if row.get("profile") != row["cells"]]
            if disagree:
                result.failures.append(f"the profiles' cell counts differ from Image.csv's in {', '.join(disagree)}")
            from cpb.demo.montage import make_montage
            images = {key: {name: plate.images_dir / f"{PLATE}_{key[0]}_s{key[1]}_w{number}.tif"
                            for name, number in CHANNEL_NUMBERS.items()} for key in plate.truth}
            result.montage = make_montage(results_dir, plate.truth, out / "plate.png", images=images,
                                          counted={(r["well"], s): c for r in result.table
                                                   for s, c in r["sites"].items()})

        with steps.step("again", "the same cpb plate again: every step is up to date, so nothing may run"):
            before = (len(cloud.mapping.reports), len(cloud.batch.tasks()))
            code, result.again_output = cpb("plate", *plate_args)
            cloud.wait_idle(60)
            time.sleep(0.2)  # closes the gap between the mapping receiving a message and calling itself busy
            cloud.wait_idle(60)
            after = (len(cloud.mapping.reports), len(cloud.batch.tasks()))
            result.again_sent = after[0] - before[0]
            if code != 0 or "nothing to run" not in result.again_output:
                result.failures.append(f"the second cpb plate did not find the plate up to date: "
                                       f"{_last_line(result.again_output)}")
            if after != before:
                result.failures.append(f"the second cpb plate started work: {after[0] - before[0]} Lambda "
                                       f"invocation(s), {after[1] - before[1]} job(s)")
            else:
                steps.say("      the Lambda received nothing and Batch ran nothing")
    result.ok = not result.failures
    return _finish(result, steps)


def _describe_jobs(tasks: list) -> str:
    """`CP1-illum-... (1 job), CP1-analysis-... (array of 2, dependsOn CP1-illum-...)`."""
    groups: dict[str, list] = {}
    names = {task.job_id: task.name for task in tasks}
    for task in tasks:
        groups.setdefault(task.name, []).append(task)
    parts = []
    for name, members in groups.items():
        shape = "1 job" if members[0].index is None else f"array of {len(members)}"
        deps = sorted({names.get(d, d) for t in members for d in t.deps})
        parts.append(f"{name} ({shape}" + (f", dependsOn {', '.join(deps)})" if deps else ")"))
    return ", ".join(parts) or "nothing"


def last_refresh(watched: str, first_line: str) -> str:
    """The last block `cpb status --watch` printed (each refresh starts with the first output's line),
    with what it printed after the watch ended (the dead-letter queue)."""
    lines = watched.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(first_line)]
    return "\n".join(lines[starts[-1]:] if starts else lines)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _wait_for_lambda(cloud: LocalCloud, timeout: float = 120.0) -> list:
    """The mapping's invocations once the queue is empty (the message sent, handled or failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cloud.mapping.reports and cloud.mapping.idle():
            break
        time.sleep(0.1)
    return list(cloud.mapping.reports)


class JobProgress:
    """`jobs n/m done (k running)` lines from the runner's events (called from its threads), and when
    each job started and ended (for tests: the analysis starts only after the illumination ended)."""

    def __init__(self, steps: Steps) -> None:
        self.steps, self.total, self.done = steps, 0, 0
        self._running: set[str] = set()
        self._times: dict[str, dict] = {}
        self._lock = threading.Lock()

    @property
    def running(self) -> int:
        return len(self._running)

    def jobs(self) -> list[dict]:
        with self._lock:
            return sorted((dict(v) for v in self._times.values()), key=lambda j: j["started"])

    def __call__(self, kind: str, item: Any, detail: str) -> None:
        with self._lock:
            now = time.monotonic()
            if kind == "start" and detail == "attempt 1":
                self._running.add(item.job_id)
                self._times[item.job_id] = {"label": item.label, "name": item.name, "index": item.index,
                                            "started": now, "ended": None, "status": None}
            elif kind == "done":
                self._running.discard(item.job_id)
                self.done += 1
                entry = self._times.setdefault(item.job_id, {"label": item.label, "name": item.name,
                                                             "index": item.index, "started": None})
                entry.update(ended=now, status=detail)
                self.steps.say(f"      jobs {self.done}/{max(self.total, self.done)} done ({self.running} running): "
                               f"{item.label} {detail}")
            elif kind == "retry":
                self.steps.say(f"      {item.label}: {detail}")


def compare_counts(image_csv: Path, truth: dict, tolerance: float) -> list[dict]:
    """Per-well counted vs true nuclei from the merged Image.csv (and the cells, when it counts them)."""
    counted: dict[tuple[str, int], int] = {}
    cells: dict[tuple[str, int], int] = {}
    with open(image_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            key = (row["Metadata_Well"], int(float(row["Metadata_Site"])))
            counted[key] = int(float(row["Count_Nuclei"]))
            if row.get("Count_Cells") not in (None, ""):
                cells[key] = int(float(row["Count_Cells"]))
    table = []
    for well in sorted({w for w, _ in truth}):
        sites = {s: counted.get((well, s)) for w, s in truth if w == well}
        true = sum(truth[(well, s)] for s in sites)
        got = sum(c for c in sites.values() if c is not None)
        missing = [s for s, c in sites.items() if c is None]
        error = abs(got - true) / true if true else float(got > 0)
        table.append({"well": well, "sites": sites, "counted": got, "true": true, "error": error,
                      "missing": missing, "ok": not missing and error <= tolerance,
                      "cells": sum(cells.get((well, s), 0) for s in sites) if cells else None})
    return table


def add_profile_counts(table: list[dict], aggregated: Path) -> None:
    """Each row's `profile`: the cells pycytominer aggregated for the well (Metadata_Object_Count of
    the aggregated profiles, counted from the single-cell Parquet), None when there is no such file."""
    counts: dict[str, int] = {}
    if aggregated.is_file():
        import pandas as pd
        frame = pd.read_parquet(aggregated, columns=["Metadata_Well", "Metadata_Object_Count"])
        counts = {str(well): int(count) for well, count in frame.itertuples(index=False)}
    for row in table:
        row["profile"] = counts.get(row["well"])


def render_table(table: list[dict], tolerance: float) -> str:
    """The per-well table the demo prints."""
    profiles = any("profile" in row for row in table)
    extra = f"{'in profile':>12}" if profiles else ""
    lines = [f"      {'well':<6}{'sites':>6}{'counted':>9}{'true':>6}{'error':>8}{extra}  "
             f"(nuclei; tolerance {tolerance:.0%} per well)"]
    for row in table:
        note = "" if row["ok"] else ("  MISSING sites " + ",".join(map(str, row["missing"])) if row["missing"]
                                     else "  OUT OF TOLERANCE")
        cells = ""
        if profiles:
            cells = f"{'-' if row.get('profile') is None else row['profile']:>12}"
            if row.get("profile") != row.get("cells"):
                note += f"  PROFILE HAS {row.get('profile')} CELLS, Image.csv {row.get('cells')}"
        lines.append(f"      {row['well']:<6}{len(row['sites']):>6}{row['counted']:>9}{row['true']:>6}"
                     f"{row['error']:>8.1%}{cells}{note}")
    return "\n".join(lines)


def _indent(text: str, width: int = 6) -> str:
    return "\n".join(" " * width + line for line in text.strip().splitlines())


def _finish(result: DemoResult, steps: Steps) -> DemoResult:
    result.timings = dict(steps.timings)
    total = sum(steps.timings.values())
    if result.ok:
        steps.say(f"demo succeeded in {total:.0f} s: illumination then analysis through the chain, every well "
                  "within tolerance, the second cpb plate ran nothing, nothing left running")
    else:
        steps.say("demo FAILED:\n" + "\n".join(f"  - {f}" for f in result.failures))
    paths = []
    if result.results_dir:
        paths.append(("results", f"{typed(result.results_dir)}/ (Image.csv, Nuclei.csv, Cells.csv, Cytoplasm.csv, "
                                 "outline PNGs, _cpb/runs.json)"))
    if result.parquet and result.parquet.is_file():
        paths.append(("single cells", typed(result.parquet)))
    for path in (result.report_png, result.report_html):
        if path and path.is_file():
            paths.append(("report", typed(path)))
    for path in result.profiles:
        paths.append(("profiles", typed(path)))
    if result.montage:
        paths.append(("picture", f"{typed(result.montage)} (every site as imaged, and corrected with the outlines "
                                 "CellProfiler drew)"))
    if result.plate_dir:
        paths.append(("plate", f"{typed(result.plate_dir)}/ (images/, load_data.csv, platemap.csv, truth.csv)"))
    width = max((len(label) for label, _ in paths), default=0)
    for label, text in paths:
        steps.say(f"{label + ':':<{width + 1}} {text}")
    return result
