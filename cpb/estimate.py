"""`cpb estimate`: what a plate will cost before it is submitted.

Two ways to know how long the pipeline takes per image set:

- **sample** (default): run k image sets spread over the plate with the real worker
  (`cpb_worker.local.run_local`, the code the container runs, and the project's CellProfiler) in one
  CellProfiler process, and read CellProfiler's own per-module wall times from its log;
- **records** (`--from-records`): read the run records (and CellProfiler logs) of an earlier run of the
  same pipeline, in a folder `cpb results` wrote or under an `s3://bucket/output` prefix.

Either way the measurement is split into a start-up per CellProfiler process (interpreter, Java,
pipeline load, and the first image set's warm-up) and a time per image set, because a job pays the
first once per process and the second once per image set. The plate's jobs are then laid out as
Batch would run them (image sets per job, vCPUs and memory per job, processes per job as the worker
chooses them) and priced per vCPU-hour and GiB-hour, on spot and on demand, with the spread the
samples show and every assumption printed.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import resource
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import click

# ---------------------------------------------------------------- prices (defaults, stated)

#: On-demand list prices, AWS us-east-1, Linux, as published in 2025 (not fetched live): c6i.xlarge
#: (4 vCPU, 8 GiB) $0.170/h and r6i.xlarge (4 vCPU, 32 GiB) $0.252/h. Solving 4a + 8b = 0.170 and
#: 4a + 32b = 0.252 splits an instance-hour into $0.03567 per vCPU-hour and $0.003417 per GiB-hour
#: (m6i.xlarge, 4 vCPU/16 GiB, then prices at $0.197 against its list $0.192). Other regions list
#: 5-25 % higher (eu-west-1 about 10 %).
PRICE_SOURCE = "AWS on-demand list prices, us-east-1, Linux, 2025 (c6i.xlarge $0.170/h, r6i.xlarge $0.252/h)"
ON_DEMAND_VCPU_HOUR = 0.03567
ON_DEMAND_GIB_HOUR = 0.003417
#: Spot as a fraction of on-demand: c6i/m6i/r6i spot ran 55-70 % below on-demand through 2025
#: (AWS Spot Instance Advisor); it changes by the hour and the zone.
SPOT_FRACTION = 0.35
#: FSx for Lustre, us-east-1, 2025, USD per GB-month of storage by deployment type and throughput per TiB.
FSX_GB_MONTH = {("SCRATCH_2", None): 0.140, ("PERSISTENT_1", 50): 0.145, ("PERSISTENT_1", 100): 0.210,
                ("PERSISTENT_1", 200): 0.290, ("PERSISTENT_2", 125): 0.145, ("PERSISTENT_2", 250): 0.210,
                ("PERSISTENT_2", 500): 0.340, ("PERSISTENT_2", 1000): 0.600}
HOURS_PER_MONTH = 730
#: Per job, outside the worker: Batch placing it, the container starting (the image is cached on a
#: warm host). Not measurable here; an assumption, printed.
DEFAULT_JOB_OVERHEAD_SECONDS = 15.0
#: Per CellProfiler process memory when the worker's own default cannot be read (issue 15: ~2.5 GB).
FALLBACK_PROCESS_MEMORY_MIB = 2560
#: The Pulumi.yaml defaults, used when no stack is given.
DEFAULT_MAX_VCPUS = 256
DEFAULT_JOB_VCPUS = 4
DEFAULT_JOB_MEMORY_MIB = 15000
DEFAULT_SAMPLES = 4

_MODULE_LINE = re.compile(r"Image # (\d+), module .+? # \d+: CPU_time = ([\d.]+) secs, Wall_time = ([\d.]+) secs")


class EstimateError(Exception):
    """The estimate cannot be made; the message says what to do."""


# ---------------------------------------------------------------- measurement

def set_times_from_log(text: str, clock: str = "wall") -> Dict[int, float]:
    """Seconds per image number (wall-clock, or CPU with ``clock="cpu"``), summed over the modules
    CellProfiler timed ("Times reported are CPU and Wall-clock times for each module" in its log)."""
    column = 3 if clock == "wall" else 2
    times: Dict[int, float] = {}
    for match in _MODULE_LINE.finditer(text):
        number = int(match.group(1))
        times[number] = times.get(number, 0.0) + float(match.group(column))
    return times


@dataclass
class ProcessSample:
    """One CellProfiler process: how long it ran and the time of each image set it did (in order),
    on one clock."""

    seconds: float
    set_seconds: List[float]


@dataclass
class Profile:
    """How long the pipeline takes, split into per-process start-up and per-image-set time."""

    startup_seconds: List[float]  # one per measured process
    set_seconds: List[float]  # steady per-set times (each process's first set is in its start-up)
    overhead_seconds: float  # worker time per job outside CellProfiler (stage, merge, verify, upload)
    source: str
    sets_measured: int
    pipeline_sha256: Optional[str] = None
    cellprofiler_version: Optional[str] = None
    peak_rss_mib: Optional[float] = None
    unsplittable: List[str] = field(default_factory=list)
    clock: str = "wall"  # "cpu": CPU seconds of the CellProfiler processes (what a dedicated vCPU spends)
    busy_factor: Optional[float] = None  # wall-clock / CPU seconds while sampling (1 on an idle machine)

    @property
    def startup(self) -> float:
        return statistics.mean(self.startup_seconds)

    @property
    def per_set(self) -> float:
        return statistics.mean(self.set_seconds)


def profile_from_processes(processes: Sequence[ProcessSample], overhead: float, source: str,
                           **extra: Any) -> Profile:
    """Split measured processes into start-up and per-set time. A process's first image set carries
    the warm-up every process pays once (lazy imports, the JVM's first image read), so the steady
    per-set time comes from the other sets and everything else counts as start-up."""
    usable = [p for p in processes if p.set_seconds]
    if not usable:
        raise EstimateError("CellProfiler's log names no image set timings (\"Image # n, module ...\"); "
                            "was the log kept?")
    steady = [t for p in usable for t in p.set_seconds[1:]] or [t for p in usable for t in p.set_seconds]
    per_set = statistics.mean(steady)
    startups = [max(0.0, p.seconds - len(p.set_seconds) * per_set) for p in usable]
    return Profile(startup_seconds=startups, set_seconds=steady, overhead_seconds=overhead, source=source,
                   sets_measured=sum(len(p.set_seconds) for p in usable), **extra)


def sample_rows(total: int, k: int) -> List[int]:
    """k image set numbers (1-based) spread evenly over 1..total, centred in equal strata."""
    k = max(1, min(k, total))
    return sorted({min(total, int((i + 0.5) * total / k) + 1) for i in range(k)})


def _process_memory_mib() -> int:
    """The worker's per-process memory default (docs/CONTRACTS.md CPB_PROCESS_MEMORY_MIB), if it has one."""
    try:
        from cpb_worker import ranges
    except ImportError:
        return FALLBACK_PROCESS_MEMORY_MIB
    for name in dir(ranges):
        value = getattr(ranges, name)
        if "PROCESS_MEMORY" in name.upper() and isinstance(value, int) and value > 0:
            return value
    return FALLBACK_PROCESS_MEMORY_MIB


def count_image_sets(pipeline: Path, input_dir: Path, data_file: Optional[Path]) -> Tuple[int, List[str], int]:
    """(image sets, reasons the pipeline cannot be split, LoadData rows skipped) as the worker counts them."""
    from cpb_worker.errors import WorkerError
    from cpb_worker.job import JobSpec, plan_job

    try:
        plan = plan_job(JobSpec(pipeline=pipeline.resolve(), input_dir=input_dir.resolve(),
                                data_file=data_file.resolve() if data_file else None, workers=1))
    except WorkerError as error:
        raise EstimateError(error.reason) from None
    if plan.total is None:
        raise EstimateError("the image sets cannot be counted from the pipeline's rules: give a LoadData "
                            "data file (`cpb loaddata` writes one) or --image-sets")
    return plan.total, list(plan.unsplittable), plan.rows_skipped


def _subset_data_file(data_file: Path, numbers: Sequence[int], skipped: int, into: Path) -> Path:
    """A copy of the data file with only the sampled image sets' rows (header kept)."""
    into.mkdir(parents=True, exist_ok=True)
    with open(data_file, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    subset = into / data_file.name
    with open(subset, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for number in numbers:
            writer.writerow(body[skipped + number - 1])
    return subset


def _groups(numbers: Sequence[int], parts: int) -> List[List[int]]:
    """Split the sampled image sets into `parts` groups of near-equal size (order kept)."""
    parts = max(1, min(parts, len(numbers)))
    size, extra = divmod(len(numbers), parts)
    out, start = [], 0
    for index in range(parts):
        stop = start + size + (1 if index < extra else 0)
        out.append(list(numbers[start:stop]))
        start = stop
    return out


def profile_from_sample(pipeline: Path, input_dir: Path, data_file: Optional[Path], samples: int,
                        environ: Mapping[str, str], processes: int = 2, clock: str = "cpu",
                        work: Optional[Path] = None) -> Tuple[Profile, int, List[int]]:
    """Run `samples` image sets of the plate with the real worker, in `processes` CellProfiler processes
    one after the other (each start-up is measured; they vary most). Returns (profile, image sets on the
    plate, the image set numbers sampled).

    ``clock="cpu"`` (default) times the processes' CPU seconds and CellProfiler's per-module CPU times:
    what a dedicated cloud vCPU spends, and the same whatever else this machine is doing. ``"wall"``
    times wall-clock seconds, as run records do; on a busy machine they run long."""
    from cpb_worker.errors import WorkerError
    from cpb_worker.local import run_local

    total, unsplittable, skipped = count_image_sets(pipeline, input_dir, data_file)
    numbers = sample_rows(total, samples)
    if data_file is None or skipped:  # nothing to pick rows from: a contiguous block from the middle
        if unsplittable:
            raise EstimateError("the pipeline cannot be split into image-set ranges (" + "; ".join(unsplittable)
                                + ") and there is no data file to pick sample rows from: give --data-file, or "
                                "time it from an earlier run with --from-records")
        first = max(1, (total - len(numbers)) // 2 + 1)
        numbers = list(range(first, first + len(numbers)))
        how = f"image sets {numbers[0]}-{numbers[-1]} of {total}, contiguous (no data file rows to pick)"
    else:
        how = f"image sets {', '.join(map(str, numbers))} of {total}"
    groups = [numbers] if unsplittable else _groups(numbers, processes)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    scratch = Path(tempfile.mkdtemp(prefix="cpb-estimate-", dir=work))
    measured: Dict[str, List[ProcessSample]] = {"wall": [], "cpu": []}
    overheads, record = [], None
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        for index, group in enumerate(groups):
            out = scratch / f"run-{index}"
            if data_file is not None and not skipped:
                sample_file: Optional[Path] = _subset_data_file(data_file, group, skipped, out)
                first, last = 1, len(group)
            else:
                sample_file, first, last = data_file, group[0], group[-1]
            cpu_before = _children_cpu_seconds()
            try:
                record = run_local(pipeline, input_dir, out / "out", data_file=sample_file, workers=1,
                                   first=first, last=last, env=dict(environ))
            except WorkerError as error:
                raise EstimateError(f"the sample run failed (exit {error.exit_code}): {error.reason}") from None
            cpu = _children_cpu_seconds() - cpu_before
            text = "\n".join(p.read_text(errors="replace") for p in sorted((out / "out" / "_cpb" / "logs").glob("*.log")))
            for kind, seconds in (("wall", record.timings["cellprofiler"]), ("cpu", cpu)):
                times = set_times_from_log(text, kind)
                measured[kind].append(ProcessSample(seconds=seconds, set_seconds=[times[n] for n in sorted(times)]))
            overheads.append(max(0.0, record.timings.get("total", 0.0) - record.timings["cellprofiler"]))
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        busy = f"; load average {load:.1f} on {os.cpu_count()} CPUs when it started" if load is not None else ""
        wall_total, cpu_total = (sum(p.seconds for p in measured[k]) for k in ("wall", "cpu"))
        profile = profile_from_processes(
            measured[clock], statistics.median(overheads),
            f"here, {len(numbers)} sample image sets ({how}) run with the real worker in {len(groups)} "
            f"CellProfiler process(es) one after another, {'CPU' if clock == 'cpu' else 'wall-clock'} "
            f"seconds{busy}",
            pipeline_sha256=record.pipeline_sha256 if record else None,
            cellprofiler_version=record.cellprofiler_version if record else None,
            peak_rss_mib=round(peak / 1024, 0) if peak > before else None, unsplittable=unsplittable,
            clock=clock, busy_factor=round(wall_total / cpu_total, 2) if cpu_total > 0 else None)
        return profile, total, numbers
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _children_cpu_seconds() -> float:
    """CPU seconds (user + system) of every finished child process so far (CellProfiler runs as one)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- earlier runs' records

def _records_in_folder(folder: Path) -> List[Tuple[Dict[str, Any], Dict[str, str]]]:
    """(record, {log key: text}) from a folder `cpb results` wrote (`_cpb/runs.json`) or a job's output
    (`_cpb/run.json`, `part-*/_cpb/run.json`)."""
    found: List[Tuple[Dict[str, Any], Dict[str, str]]] = []
    merged = folder / "_cpb" / "runs.json"
    sources: List[Tuple[Path, Dict[str, Any]]] = []
    if merged.is_file():
        sources += [(folder, r) for r in json.loads(merged.read_text())]
    for path in [folder / "_cpb" / "run.json", *sorted(folder.glob("part-*/_cpb/run.json"))]:
        if path.is_file():
            sources.append((path.parent.parent, json.loads(path.read_text())))
    for base, record in sources:
        logs = {}
        for entry in record.get("files") or []:
            key = entry.get("key", "")
            if key.startswith("_cpb/logs/") and (base / key).is_file():
                logs[key] = (base / key).read_text(errors="replace")
        found.append((record, logs))
    return found


def _records_in_s3(url: str) -> List[Tuple[Dict[str, Any], Dict[str, str]]]:
    """The same from `s3://bucket/output` (records of the output and its parts, and their logs)."""
    import boto3

    bucket, _, prefix = url[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    s3 = boto3.client("s3")
    keys = [obj["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
            for obj in page.get("Contents", [])]
    found = []
    for key in keys:
        rest = key[len(prefix) + 1:]
        if not re.fullmatch(r"(part-\d{5}/)?_cpb/run\.json", rest):
            continue
        base = key[:-len("_cpb/run.json")]
        record = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        logs = {}
        for entry in record.get("files") or []:
            if entry.get("key", "").startswith("_cpb/logs/") and base + entry["key"] in keys:
                logs[entry["key"]] = s3.get_object(Bucket=bucket, Key=base + entry["key"])["Body"].read().decode(
                    errors="replace")
        found.append((record, logs))
    return found


def profile_from_records(source: str, pipeline_sha256: Optional[str]) -> Profile:
    """A profile from the succeeded run records (and their CellProfiler logs) of an earlier run."""
    found = _records_in_s3(source) if source.startswith("s3://") else _records_in_folder(Path(source))
    succeeded = [(r, logs) for r, logs in found if r.get("status") == "succeeded" and not r.get("resumed_from")]
    if not succeeded:
        raise EstimateError(f"no succeeded run records in {source} (looked for _cpb/runs.json, _cpb/run.json and "
                            "part-*/_cpb/run.json)")
    if pipeline_sha256:
        matching = [(r, logs) for r, logs in succeeded if r.get("pipeline_sha256") == pipeline_sha256]
        if not matching:
            others = sorted({str(r.get("pipeline_sha256"))[:12] for r, _ in succeeded})
            raise EstimateError(f"the run records in {source} are of other pipelines (sha256 {', '.join(others)}), "
                                f"not this one ({pipeline_sha256[:12]}); estimate by sampling instead")
        succeeded = matching
    processes, overheads = [], []
    for record, logs in succeeded:
        wall = float((record.get("timings") or {}).get("cellprofiler") or 0.0)
        for text in logs.values():
            times = set_times_from_log(text)
            processes.append(ProcessSample(seconds=wall, set_seconds=[times[n] for n in sorted(times)]))
        timings = record.get("timings") or {}
        if "total" in timings:
            overheads.append(max(0.0, float(timings["total"]) - wall))
    if not processes:
        raise EstimateError(f"the run records in {source} list no CellProfiler logs to time image sets by")
    first = succeeded[0][0]
    return profile_from_processes(
        processes, statistics.median(overheads) if overheads else 0.0,
        f"run records of an earlier run ({len(succeeded)} job(s), {len(processes)} CellProfiler process(es)) "
        f"in {source}", pipeline_sha256=first.get("pipeline_sha256"),
        cellprofiler_version=first.get("cellprofiler_version"), unsplittable=list(first.get("unsplittable_reasons") or []))


# ---------------------------------------------------------------- the model

@dataclass
class Layout:
    """How the plate runs on Batch."""

    image_sets: int
    sets_per_job: Optional[int]  # None: one job for the plate
    job_vcpus: int
    job_memory_mib: int
    max_vcpus: int
    process_memory_mib: int
    unsplittable: bool = False
    job_overhead_seconds: float = DEFAULT_JOB_OVERHEAD_SECONDS
    speed_factor: float = 1.0  # cloud vCPU time / time measured here


@dataclass
class Prices:
    """USD per vCPU-hour and GiB-hour, on demand and spot; FSx per hour when the stack has it."""

    vcpu_hour: float = ON_DEMAND_VCPU_HOUR
    gib_hour: float = ON_DEMAND_GIB_HOUR
    spot_vcpu_hour: float = ON_DEMAND_VCPU_HOUR * SPOT_FRACTION
    spot_gib_hour: float = ON_DEMAND_GIB_HOUR * SPOT_FRACTION
    fsx_hour: Optional[float] = None
    source: str = PRICE_SOURCE


def fsx_hourly(deployment_type: str, storage_gib: int, throughput_per_tib: Optional[int]) -> float:
    """USD per hour an FSx for Lustre file system costs while it exists."""
    key = (deployment_type, None if deployment_type == "SCRATCH_2" else throughput_per_tib)
    if key not in FSX_GB_MONTH:
        raise EstimateError(f"no FSx price for {deployment_type} at {throughput_per_tib} MB/s/TiB; pass --fsx-hour-usd")
    return FSX_GB_MONTH[key] * storage_gib / HOURS_PER_MONTH


@dataclass
class Figures:
    """One reading of the model (central, low or high)."""

    cellprofiler_seconds: float  # sum over jobs of the CellProfiler phase's wall time (the records' timings)
    vcpu_hours: float
    gib_hours: float
    wall_seconds: float
    spot_usd: float
    on_demand_usd: float


@dataclass
class Estimate:
    """What `cpb estimate` prints."""

    layout: Layout
    profile: Profile
    prices: Prices
    jobs: int
    processes_per_job: int
    concurrent_jobs: int
    central: Figures
    low: Figures
    high: Figures
    fsx_usd: Optional[float]
    assumptions: List[str]
    notes: List[str]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _job_sizes(layout: Layout) -> List[int]:
    if layout.unsplittable or not layout.sets_per_job:
        return [layout.image_sets]
    full, rest = divmod(layout.image_sets, layout.sets_per_job)
    return [layout.sets_per_job] * full + ([rest] if rest else [])


def processes_per_job(layout: Layout, sets: int) -> int:
    """As the worker chooses: one per vCPU, no more than image sets or memory allows (1 if unsplittable)."""
    if layout.unsplittable:
        return 1
    by_memory = max(1, layout.job_memory_mib // layout.process_memory_mib)
    return max(1, min(layout.job_vcpus, sets, by_memory))


def _figures(layout: Layout, prices: Prices, startup: float, per_set: float, overhead: float) -> Figures:
    startup, per_set = startup * layout.speed_factor, per_set * layout.speed_factor
    cellprofiler = vcpu_seconds = gib_seconds = 0.0
    job_walls = []
    for sets in _job_sizes(layout):
        per_process = math.ceil(sets / processes_per_job(layout, sets))
        cp_wall = startup + per_process * per_set
        wall = cp_wall + overhead + layout.job_overhead_seconds
        cellprofiler += cp_wall
        vcpu_seconds += layout.job_vcpus * wall  # Batch reserves the job's vCPUs for all of it
        gib_seconds += layout.job_memory_mib / 1024 * wall
        job_walls.append(wall)
    concurrent = max(1, layout.max_vcpus // layout.job_vcpus)
    waves = math.ceil(len(job_walls) / concurrent)
    wall_seconds = waves * max(job_walls)
    vcpu_hours, gib_hours = vcpu_seconds / 3600, gib_seconds / 3600
    return Figures(cellprofiler_seconds=cellprofiler, vcpu_hours=vcpu_hours, gib_hours=gib_hours,
                   wall_seconds=wall_seconds,
                   spot_usd=vcpu_hours * prices.spot_vcpu_hour + gib_hours * prices.spot_gib_hour,
                   on_demand_usd=vcpu_hours * prices.vcpu_hour + gib_hours * prices.gib_hour)


def estimate_plate(profile: Profile, layout: Layout, prices: Prices) -> Estimate:
    """Lay the plate out in jobs and price it; low/high use the fastest/slowest measured start-up and
    image set for every process and set."""
    sizes = _job_sizes(layout)
    central = _figures(layout, prices, profile.startup, profile.per_set, profile.overhead_seconds)
    low = _figures(layout, prices, min(profile.startup_seconds), min(profile.set_seconds), profile.overhead_seconds)
    high = _figures(layout, prices, max(profile.startup_seconds), max(profile.set_seconds), profile.overhead_seconds)
    per_job = processes_per_job(layout, sizes[0])
    notes = []
    if layout.unsplittable:
        notes.append("the pipeline cannot be split into image-set ranges (" + "; ".join(profile.unsplittable)
                     + "): one job, one CellProfiler process for the whole plate")
    elif per_job < min(layout.job_vcpus, sizes[0]):
        notes.append(f"memory limits each job to {per_job} CellProfiler process(es) of {layout.process_memory_mib} "
                     f"MiB in {layout.job_memory_mib} MiB, so {layout.job_vcpus - per_job} of its "
                     f"{layout.job_vcpus} vCPUs idle: give jobs more memory or fewer vCPUs")
    if profile.peak_rss_mib and profile.peak_rss_mib * 1.2 > layout.process_memory_mib:
        notes.append(f"a sample CellProfiler process peaked at {profile.peak_rss_mib:.0f} MiB, close to or above "
                     f"the {layout.process_memory_mib} MiB per process the worker plans with: expect out-of-memory "
                     "retries, or give jobs more memory")
    if profile.busy_factor and profile.busy_factor > 1.3:
        if profile.clock == "cpu":
            notes.append(f"this machine was busy while sampling (wall-clock {profile.busy_factor:g}x the CPU time): "
                         "the estimate uses CPU time, what a dedicated cloud vCPU spends")
        else:
            notes.append(f"this machine was busy while sampling (wall-clock {profile.busy_factor:g}x the CPU time): "
                         "wall-clock figures run long; --clock cpu estimates from CPU time")
    if profile.source.startswith("here"):
        assumptions_extra = ["sampling runs locally: staging images from S3 (or FSx) and uploading results are "
                             "not in the worker overhead (an earlier run's records, --from-records, include them)"]
    else:
        assumptions_extra = []
    if profile.sets_measured < 3:
        notes.append(f"only {profile.sets_measured} image set(s) measured: the spread below is not meaningful")
    assumptions = [
        f"per-set and start-up times measured {profile.source}; a cloud vCPU is taken as "
        f"{layout.speed_factor:g}x this machine's core (--speed-factor)",
        f"{layout.job_overhead_seconds:g} s per job for Batch to place it and start its container "
        "(--job-overhead-seconds; a host's first job also pulls the ~3 GB image)",
        f"jobs hold {layout.job_vcpus} vCPU(s) and {layout.job_memory_mib} MiB for their whole run, billed as if "
        "hosts were packed exactly (idle host time while Batch scales adds typically 5-15 %)",
        f"wall time: {max(1, layout.max_vcpus // layout.job_vcpus)} jobs at once within maxVcpus "
        f"{layout.max_vcpus}, plus a few minutes for the first hosts to start",
        f"prices: {prices.source}; ${prices.vcpu_hour:.5f}/vCPU-h and ${prices.gib_hour:.6f}/GiB-h on demand, "
        f"${prices.spot_vcpu_hour:.5f}/vCPU-h and ${prices.spot_gib_hour:.6f}/GiB-h on spot",
        "low/high: every image set and process as fast as the fastest or as slow as the slowest measured",
    ] + assumptions_extra
    fsx_usd = None if prices.fsx_hour is None else prices.fsx_hour * central.wall_seconds / 3600
    if prices.fsx_hour is not None:
        assumptions.append(f"FSx for Lustre bills ${prices.fsx_hour:.3f}/h every hour it exists "
                           f"(${prices.fsx_hour * HOURS_PER_MONTH:.0f}/month), whether or not a plate runs")
    return Estimate(layout=layout, profile=profile, prices=prices, jobs=len(sizes), processes_per_job=per_job,
                    concurrent_jobs=max(1, layout.max_vcpus // layout.job_vcpus), central=central, low=low,
                    high=high, fsx_usd=fsx_usd, assumptions=assumptions, notes=notes)


# ---------------------------------------------------------------- presentation

def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 0.01 else f"${value:.4f}"


def _warm_up_note(profile: Profile) -> str:
    """Why fewer sets time the per-set figure than were run: each process's first set carries its
    warm-up (profile_from_processes), so it is counted in that process's start-up."""
    folded = profile.sets_measured - len(profile.set_seconds)
    if folded <= 0:
        return ""
    processes = len(profile.startup_seconds)
    return (f"; the other {folded}, the first of each of the {processes} CellProfiler process(es), carry its "
            "warm-up and are counted in the start-up")


def render(result: Estimate, label: str) -> str:
    profile, layout, c, lo, hi = result.profile, result.layout, result.central, result.low, result.high
    sets_per_job = layout.image_sets if layout.unsplittable or not layout.sets_per_job else layout.sets_per_job
    lines = [
        f"estimate for {layout.image_sets} image sets of {label}"
        + (f" (pipeline sha256 {profile.pipeline_sha256[:12]}, CellProfiler {profile.cellprofiler_version})"
           if profile.pipeline_sha256 else ""),
        f"  measured   ({'CPU' if profile.clock == 'cpu' else 'wall-clock'} time) start-up {profile.startup:.1f} s per "
        f"CellProfiler process, {profile.per_set:.2f} s per image set "
        f"({min(profile.set_seconds):.2f}-{max(profile.set_seconds):.2f} s over {len(profile.set_seconds)} set(s)"
        f"{_warm_up_note(profile)}), worker overhead {profile.overhead_seconds:.1f} s per job",
        f"  layout     {result.jobs} job(s) of up to {sets_per_job} image set(s), {layout.job_vcpus} vCPU / "
        f"{layout.job_memory_mib} MiB each, {result.processes_per_job} CellProfiler process(es) per job",
        f"  CellProfiler time   {c.cellprofiler_seconds:,.0f} s summed over jobs "
        f"({lo.cellprofiler_seconds:,.0f}-{hi.cellprofiler_seconds:,.0f})",
        f"  compute    {c.vcpu_hours:,.2f} vCPU-hours ({lo.vcpu_hours:,.2f}-{hi.vcpu_hours:,.2f}), "
        f"{c.gib_hours:,.1f} GiB-hours",
        f"  wall time  {_duration(c.wall_seconds)} ({_duration(lo.wall_seconds)}-{_duration(hi.wall_seconds)}) "
        f"at maxVcpus {layout.max_vcpus} ({result.concurrent_jobs} job(s) at once)",
        f"  cost       spot {_usd(c.spot_usd)} ({_usd(lo.spot_usd)}-{_usd(hi.spot_usd)}), on demand "
        f"{_usd(c.on_demand_usd)} ({_usd(lo.on_demand_usd)}-{_usd(hi.on_demand_usd)})",
    ]
    if result.fsx_usd is not None:
        lines.append(f"  FSx        {_usd(result.prices.fsx_hour or 0)}/h while it exists: {_usd(result.fsx_usd)} "
                     "over this plate's wall time")
    lines += [f"  note: {note}" for note in result.notes]
    lines.append("  assumptions:")
    lines += [f"    - {a}" for a in result.assumptions]
    return "\n".join(lines)


# ---------------------------------------------------------------- the command

def _stack_capacity(stack_name: Optional[str]) -> Tuple[Dict[str, Any], Optional[str]]:
    """The deployed stack's outputs `jobLimits` and `capacity`, when the Pulumi CLI can give them."""
    from cpb.stack import StackError, pulumi_outputs

    try:
        outputs = pulumi_outputs(stack_name) if stack_name or shutil.which("pulumi") else None
    except StackError as error:
        raise EstimateError(str(error)) from None
    if not outputs:
        return {}, None
    return outputs, f"stack {stack_name or '(selected)'}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@click.command("estimate")
@click.option("--pipeline", required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="The .cppipe to estimate.")
@click.option("--input", "input_dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Local folder of the plate's images (for sampling).")
@click.option("--data-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="The plate's LoadData CSV.")
@click.option("--samples", type=click.IntRange(1, 100), default=DEFAULT_SAMPLES, show_default=True,
              help="Image sets to run locally, spread over the plate.")
@click.option("--sample-processes", type=click.IntRange(1, 10), default=2, show_default=True,
              help="CellProfiler processes the samples are shared among, run one after another "
                   "(each measures a start-up).")
@click.option("--clock", type=click.Choice(["cpu", "wall"]), default="cpu", show_default=True,
              help="Time samples by CPU seconds (a dedicated cloud vCPU; unaffected by this machine's load) "
                   "or wall-clock seconds (as run records time jobs).")
@click.option("--from-records", "records", help="Folder `cpb results` wrote, or s3://bucket/output, of an earlier "
                                                "run of this pipeline: time it from those records instead of sampling.")
@click.option("--image-sets", type=click.IntRange(1), help="Image sets on the plate (default: counted).")
@click.option("--image-sets-per-job", type=click.IntRange(1), help="As in the message (default: one job).")
@click.option("--vcpus", type=click.IntRange(1, 192), help="vCPUs per job (default: the stack's, else 4).")
@click.option("--memory", "memory_mib", type=click.IntRange(512), help="MiB per job (default: the stack's, else 15000).")
@click.option("--max-vcpus", type=click.IntRange(1), help="The stack's maxVcpus (default: its output, else 256).")
@click.option("--stack", "stack_name", help="Pulumi stack whose limits, capacity and FSx to use.")
@click.option("--speed-factor", type=click.FloatRange(0.05, 20), default=1.0, show_default=True,
              help="Cloud vCPU time per second measured here.")
@click.option("--job-overhead-seconds", type=click.FloatRange(0), default=DEFAULT_JOB_OVERHEAD_SECONDS,
              show_default=True, help="Per job: placement and container start.")
@click.option("--vcpu-hour-usd", type=click.FloatRange(0), default=ON_DEMAND_VCPU_HOUR, show_default=True)
@click.option("--gib-hour-usd", type=click.FloatRange(0), default=ON_DEMAND_GIB_HOUR, show_default=True)
@click.option("--spot-fraction", type=click.FloatRange(0, 1), default=SPOT_FRACTION, show_default=True,
              help="Spot price as a fraction of on-demand.")
@click.option("--fsx-hour-usd", type=click.FloatRange(0), help="FSx cost per hour (default: from the stack's FSx).")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def estimate_command(pipeline: Path, input_dir: Optional[Path], data_file: Optional[Path], samples: int,
                     sample_processes: int, clock: str, records: Optional[str], image_sets: Optional[int], image_sets_per_job: Optional[int],
                     vcpus: Optional[int], memory_mib: Optional[int], max_vcpus: Optional[int],
                     stack_name: Optional[str], speed_factor: float, job_overhead_seconds: float,
                     vcpu_hour_usd: float, gib_hour_usd: float, spot_fraction: float,
                     fsx_hour_usd: Optional[float], as_json: bool) -> None:
    """Estimate a plate's vCPU-hours, wall time and cost before submitting it.

    Runs a few image sets locally with the real worker and CellProfiler (or reads an earlier run's
    records) and prints the plate's expected cost on spot and on demand, with its assumptions.
    """
    from cpb.runlocal import cellprofiler_defaults

    try:
        outputs, stack_source = _stack_capacity(stack_name)
        limits = outputs.get("jobLimits") or {}
        capacity = outputs.get("capacity") or {}
        sampled: List[int] = []
        if records:
            profile = profile_from_records(records, _sha256(pipeline))
            if image_sets is None:
                if input_dir is None and data_file is None:
                    raise EstimateError("give --image-sets, or --input/--data-file to count the plate's image sets")
                image_sets, reasons, _ = count_image_sets(pipeline, input_dir or Path("."), data_file)
                profile.unsplittable = profile.unsplittable or reasons
        else:
            if input_dir is None:
                raise EstimateError("give --input (the plate's images) to sample, or --from-records")
            env, note = cellprofiler_defaults(os.environ)
            if note and not as_json:
                click.echo(note, err=True)
            profile, counted, sampled = profile_from_sample(pipeline, input_dir, data_file, samples, env,
                                                            processes=sample_processes, clock=clock)
            image_sets = image_sets or counted
        if fsx_hour_usd is None and capacity.get("fsx"):
            fsx = capacity["fsx"]
            fsx_hour_usd = fsx_hourly(fsx["deploymentType"], int(fsx["storageCapacityGib"]), fsx.get("throughputPerTib"))
        layout = Layout(
            image_sets=image_sets, sets_per_job=image_sets_per_job,
            job_vcpus=vcpus or int(limits.get("defaultVcpu") or DEFAULT_JOB_VCPUS),
            job_memory_mib=memory_mib or int(limits.get("defaultMemoryMib") or DEFAULT_JOB_MEMORY_MIB),
            max_vcpus=max_vcpus or int(capacity.get("maxVcpus") or DEFAULT_MAX_VCPUS),
            process_memory_mib=_process_memory_mib(), unsplittable=bool(profile.unsplittable),
            job_overhead_seconds=job_overhead_seconds, speed_factor=speed_factor)
        prices = Prices(vcpu_hour=vcpu_hour_usd, gib_hour=gib_hour_usd, spot_vcpu_hour=vcpu_hour_usd * spot_fraction,
                        spot_gib_hour=gib_hour_usd * spot_fraction, fsx_hour=fsx_hour_usd)
        result = estimate_plate(profile, layout, prices)
        if stack_source is None and not (vcpus and memory_mib and max_vcpus):
            result.assumptions.append("no stack read: defaults of Pulumi.yaml for what was not given "
                                      f"(jobVcpus {DEFAULT_JOB_VCPUS}, jobMemoryMib {DEFAULT_JOB_MEMORY_MIB}, "
                                      f"maxVcpus {DEFAULT_MAX_VCPUS}); pass --stack to use a deployed stack's")
    except EstimateError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "sampled_image_sets": sampled}, indent=1))
    else:
        click.echo(render(result, pipeline.name))

