"""How should the demo's local Batch use 2 cores: 2 jobs x 1 vCPU, or 1 job x 2 vCPUs; and how many
sites per analysis child?

Runs the demo's whole path (the local stack: emulated AWS, real Lambda handlers, real worker, real
CellProfiler; the illumination job, then the analysis array job after it) on the default plate
(4 wells x 2 sites = 8 image sets) for each layout (the local Batch gets parallel x vCPUs cores),
alternating the order over two rounds and keeping each layout's best batch-step time (both steps,
from the first job's start to the last one's end), then prints the ratios. One run, same machine, so
the ratios are comparable even when the absolute times are noisy.

    .venv/bin/python bench/bench_demo.py
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("CPB_CELLPROFILER", str(REPO / ".venv-cp" / "bin" / "cellprofiler"))

from cpb.demo.run import DemoSettings, run_demo  # noqa: E402

DEFAULT = DemoSettings()
# name, jobs at once, vCPUs per job, sites per analysis child
LAYOUTS = [("2 jobs x 1 vCPU", 2, 1, DEFAULT.sets_per_job), ("1 job x 2 vCPUs", 1, 2, DEFAULT.sets_per_job),
           ("1 job x 1 vCPU", 1, 1, DEFAULT.sets_per_job), ("2 jobs x 1 vCPU, 2 sites/child", 2, 1, 2)]


def measure(parallel: int, vcpus: int, sets_per_job: int, out: Path) -> tuple[float, float]:
    """(batch step wall seconds, CPU seconds of the worker processes)."""
    before = os.times()
    result = run_demo(DemoSettings(out_dir=out, parallel=parallel, job_vcpus=vcpus, sets_per_job=sets_per_job,
                                   echo=False))
    after = os.times()
    if not result.ok:
        raise SystemExit(f"demo failed with parallel={parallel} vcpus={vcpus}: {result.failures}")
    return result.timings["batch"], (after.children_user + after.children_system
                                      - before.children_user - before.children_system)


def main() -> None:
    best: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="cpb-bench-demo-") as tmp:
        for round_ in range(2):
            order = LAYOUTS if round_ == 0 else list(reversed(LAYOUTS))
            for name, parallel, vcpus, sets in order:
                wall, cpu = measure(parallel, vcpus, sets, Path(tmp) / "demo")
                print(f"round {round_ + 1}: {name:<31} batch step {wall:6.2f} s wall, {cpu:6.2f} s CPU "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, cpu)
    base = best["1 job x 1 vCPU"][0]
    print("\nbest of 2, relative to one job at a time with 1 vCPU (higher is faster):")
    for name, *_ in LAYOUTS:
        wall, cpu = best[name]
        print(f"  {name:<31} {wall:6.2f} s  speed-up x{base / wall:4.2f}")
    two_by_one, one_by_two = best["2 jobs x 1 vCPU"][0], best["1 job x 2 vCPUs"][0]
    print(f"2 jobs x 1 vCPU vs 1 job x 2 vCPUs: x{one_by_two / two_by_one:4.2f} "
          f"({'2 x 1 is faster: the demo default' if two_by_one < one_by_two else '1 x 2 is faster'})")
    halves = best["2 jobs x 1 vCPU, 2 sites/child"][0]
    print(f"{DEFAULT.sets_per_job} sites per child vs 2: x{halves / two_by_one:4.2f} "
          f"({'fewer, bigger children are faster: the demo default' if two_by_one < halves else '2 is faster'})")


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"bench_demo took {time.monotonic() - started:.0f} s")
