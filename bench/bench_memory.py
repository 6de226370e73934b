"""Peak memory of one CellProfiler process, the basis of the worker's default per-process memory
(`cpb_worker.ranges.DEFAULT_PROCESS_MEMORY_MIB`): `python bench/bench_memory.py`.

How: each case runs ONE `cellprofiler -c -r` process (headless, OMP_NUM_THREADS=1, its JVM
in-process as in the container) from a fresh helper Python whose RUSAGE_CHILDREN max RSS is
then that process's peak resident set (Linux ru_maxrss, KiB). Cases: ExampleHuman (when
../shared/examples is there), the demo's nuclei.cppipe plate, and the metadata pipeline
(metadata_illum.cppipe: 2 channels, illumination correction, nuclei and cells) at 1080 x 1080
and 2160 x 2160 pixels, the usual Cell Painting camera sizes. Prints MiB per case, the largest,
and the worker's default next to it: the default must cover the largest measured case with
room to spare (a real 5-channel Cell Painting pipeline needs more: set CPB_PROCESS_MEMORY_MIB).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "image"))

HELPER = r"""
import json, resource, subprocess, sys, time
t0 = time.monotonic()
code = subprocess.call(json.loads(sys.argv[1]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(json.dumps({"code": code, "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "seconds": round(time.monotonic() - t0, 2)}))
"""


def examples_dir() -> Path:
    for root in (REPO.parent / "shared" / "examples", REPO.parent.parent / "shared" / "examples"):
        if root.is_dir():
            return root
    return Path("/nonexistent")


def peak(argv, env) -> dict:
    out = subprocess.run([sys.executable, "-c", HELPER, json.dumps(argv)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def main() -> int:
    from cpb.demo.synthetic import METADATA_PIPELINE, PIPELINE, make_metadata_plate, make_plate
    from cpb_worker.ranges import DEFAULT_PROCESS_MEMORY_MIB
    from cpb_worker.runner import cellprofiler_argv, venv_args

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.setdefault("CPB_CELLPROFILER", str(REPO / ".venv-cp" / "bin" / "cellprofiler"))
    env.setdefault("CPB_CELLPROFILER_ARGS", venv_args(env["CPB_CELLPROFILER"]))
    base = cellprofiler_argv(env) + ["-c", "-r"]
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    cases = []
    human = examples_dir() / "ExampleHuman"
    if human.is_dir():
        cases.append(("ExampleHuman (3 channels, 512x512)", ["-p", str(human / "ExampleHuman.cppipe"),
                                                              "-i", str(human / "images")]))
    demo = make_plate(work / "demo", wells=("A01",), sites=2, seed=1, size=256)
    cases.append(("demo nuclei.cppipe (LoadData, 256x256)", ["-p", str(PIPELINE), "-i", str(demo.images_dir),
                                                              "--data-file", str(demo.data_file)]))
    for size in (1080, 2160):
        plate = make_metadata_plate(work / f"m{size}", wells=("B03",), sites=2, seed=1, size=size,
                                    nuclei=(60, 120) if size == 1080 else (150, 300))
        cases.append((f"metadata_illum.cppipe ({size}x{size})", ["-p", str(METADATA_PIPELINE), "-i",
                                                                 str(plate.images_dir)]))
    print(f"CellProfiler: {env['CPB_CELLPROFILER']}; one process per case, 2 image sets each (1 for ExampleHuman)")
    largest = 0.0
    for label, args in cases:
        result = peak(base + args + ["-o", str(work / "out" / label.split()[0])], env)
        mib = result["maxrss_kib"] / 1024
        largest = max(largest, mib)
        print(f"  {label:44s} peak RSS {mib:7.0f} MiB  ({result['seconds']:.1f} s, exit {result['code']})")
    print(f"largest measured: {largest:.0f} MiB; worker default per process (DEFAULT_PROCESS_MEMORY_MIB): "
          f"{DEFAULT_PROCESS_MEMORY_MIB} MiB = {DEFAULT_PROCESS_MEMORY_MIB / largest:.2f}x the largest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
