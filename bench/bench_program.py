"""The Pulumi program under mocks, timed in one run (`python bench/bench_program.py`).

What `pulumi preview` costs in Python before any provider call: building every component's
resource graph from config. Runs the program once to warm up (imports, the Lambdas' vendored
dependencies), then N times, and prints CPU seconds per build (this process's clock: a shared
machine's neighbours do not count) beside wall-clock, with the resource count. Target: under 1 s
of CPU per build.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from stack_harness import program, run_main  # noqa: E402


def main(runs: int = 5) -> int:
    program(fsxEnabled="true")  # warm
    cpu, wall, count = [], [], 0
    for _ in range(runs):
        started, clock = time.process_time(), time.perf_counter()
        recorded = run_main({"fsxEnabled": "true", "costCenter": "timing"})
        cpu.append(time.process_time() - started)
        wall.append(time.perf_counter() - clock)
        count = len(recorded.resources)
    cpu.sort()
    wall.sort()
    print(f"program under mocks ({count} registrations, {runs} builds): CPU median {cpu[runs // 2]:.2f} s "
          f"(min {cpu[0]:.2f}, max {cpu[-1]:.2f}); wall median {wall[runs // 2]:.2f} s; target < 1 s CPU: "
          f"{'met' if cpu[runs // 2] < 1.0 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
