"""`cpb estimate` against the demo's own measured CellProfiler time, in one run (issue 15's done-when).

Run: `python bench/bench_estimate.py` (about 3 minutes). Everything as a user types it, on this machine:

1. `cpb demo --out <tmp>`: the demo's Cell Painting plate (4 wells x 2 sites x 3 channels, seed 7) through
   the local stack: the illumination job, then the analysis array (children of 4 image sets, 1 vCPU each,
   2 at a time on 2 cores). Measured: the CellProfiler phase of every analysis child as its run record
   times it (`timings.cellprofiler`, from `cpb results`' `_cpb/runs.json`), summed.
2. The same plate's illumination functions made here (`cpb loaddata` + `cpb run --local` of illum.cppipe),
   the analysis LoadData CSV pointing at them (`cpb loaddata --illum`), then `cpb estimate` of the
   analysis laid out as the demo lays it out (`--image-sets-per-job 4 --vcpus 1`), sampling 4 image sets
   with the real worker: its "CellProfiler time summed over jobs", on the CPU clock (its default) and the
   wall clock.

The analysis is the step whose cost grows with the plate (one job per few sites); the illumination step is
one job per plate. Prints both figures, the estimate's error for each clock, and the load average (a busy
machine inflates the demo's wall-clock times; the CPU-clock estimate is what a dedicated vCPU spends).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIPELINES = REPO / "cpb" / "pipelines"
CHANNELS = ("--pattern", "imagexpress", "--channel", "1=DNA", "--channel", "2=AGP", "--channel", "3=Mito")
SETS_PER_JOB, VCPUS = 4, 1  # the demo's defaults (cpb/demo/run.py DemoSettings)
MEMORY = 3750  # what the stack gives a 1-vCPU message by default: jobMemoryMib 15000 per 4 jobVcpus


def cpb(*args: str, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "cpb", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"cpb {args[0]} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


def main() -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CPB_BUCKET", "CPB_QUEUE"))}
    env.setdefault("CPB_CELLPROFILER", str(REPO / ".venv-cp" / "bin" / "cellprofiler"))
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-estimate-"))
    try:
        load_before = os.getloadavg()[0]
        cpb("demo", "--out", str(work / "demo"), env=env)
        records = json.loads((work / "demo" / "results" / "_cpb" / "runs.json").read_text())
        measured = sum(float(r["timings"]["cellprofiler"]) for r in records)
        images = work / "demo" / "plate" / "images"
        cpb("loaddata", str(images), *CHANNELS, "--pipeline", str(PIPELINES / "illum.cppipe"),
            "-o", str(work / "illum.csv"), env=env)
        cpb("run", "--local", "--pipeline", str(PIPELINES / "illum.cppipe"), "--input", str(images),
            "--data-file", str(work / "illum.csv"), "--output", str(work / "illum"), "--unsplittable", env=env)
        cpb("loaddata", str(images), *CHANNELS, "--illum", str(work / "illum"),
            "--pipeline", str(PIPELINES / "cellpainting.cppipe"), "-o", str(work / "analysis.csv"), env=env)
        estimates = {}
        for clock in ("cpu", "wall"):
            done = cpb("estimate", "--pipeline", str(PIPELINES / "cellpainting.cppipe"), "--input", str(images),
                       "--data-file", str(work / "analysis.csv"), "--image-sets-per-job", str(SETS_PER_JOB),
                       "--vcpus", str(VCPUS), "--memory", str(MEMORY), "--max-vcpus", "2", "--clock", clock,
                       "--json", env=env)
            estimates[clock] = json.loads(done.stdout)
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {os.cpu_count()} CPUs; load average (1 min) before {load_before:.2f}, after {load_after:.2f}")
    print(f"demo plate analysis ({len(records)} array children x {SETS_PER_JOB} image sets, {VCPUS} vCPU each): "
          f"CellProfiler phase measured by the run records, summed: {measured:.1f} s")
    for clock, result in estimates.items():
        central, low, high = (result[k]["cellprofiler_seconds"] for k in ("central", "low", "high"))
        profile = result["profile"]
        print(f"cpb estimate --clock {clock}: {central:.1f} s ({low:.1f}-{high:.1f}); start-up "
              f"{sum(profile['startup_seconds']) / len(profile['startup_seconds']):.1f} s per process, "
              f"{sum(profile['set_seconds']) / len(profile['set_seconds']):.2f} s per image set; "
              f"estimate / measured = {central / measured:.2f} ({(central - measured) / measured:+.0%}; "
              f"issue 15 asks within 25 %)")
    print(f"bench_estimate took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
