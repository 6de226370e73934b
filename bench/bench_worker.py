"""Worker speed-up and overhead, measured in one run (`python bench/bench_worker.py`).

Two pipelines, each run both ways on the same data:

  LoadData   ExampleHuman's 3 images listed N times in a LoadData CSV (default 8 image
             sets; a generated plate when ../shared/examples is absent)
  metadata   cpb/pipelines/metadata_illum.cppipe (Images/Metadata/NamesAndTypes, .npy
             illumination functions, no LoadData) on a generated plate of N sites, whose
             image sets CellProfiler itself counts (cpb_worker/cpsets.py)

  seed design  one `cellprofiler -c -r` process over every image set
  worker       `python -m cpb_worker` in AWS mode with CPB_VCPUS=2 against a
               moto S3 server on 127.0.0.1: download, 2 CellProfiler processes,
               merge, verify, upload, run record

Prints both wall times, their ratio (target >= 1.7x on 2 cores; 2x is the
limit), and the worker's own overhead (everything but the CellProfiler phase)
as a share of its wall time (target < 10%). Other people may share the CPU:
the load average before and after is printed with the figures.

Where the time goes, from CellProfiler's own per-module wall times in each
process's log (same run): what every process pays outside its image sets
(interpreter and CellProfiler imports, Java, listing the input and making the
image-set list, CSV export), the time per image set alone and with two
processes side by side, and this machine's own ceiling for two processes (the
same numpy/scipy work, one copy vs two at once). With those, the speed-up
expected at other job sizes: CellProfiler's start-up matters less the more
image sets a process runs. For the metadata pipeline it also times making the
image-set list of a 384-well x 9-site plate (empty files named like the
generated plate's): every process of every job makes the whole list.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = next((root / "ExampleHuman" for root in (REPO.parent / "shared" / "examples",
                                                     REPO.parent.parent / "shared" / "examples")
                 if (root / "ExampleHuman").is_dir()), REPO.parent / "shared" / "examples" / "ExampleHuman")
BUCKET = "cpb-bench"


def cellprofiler_env() -> dict:
    env = dict(os.environ)
    env.setdefault("CPB_CELLPROFILER", str(REPO / ".venv-cp" / "bin" / "cellprofiler"))
    from cpb_worker.runner import venv_args
    env.setdefault("CPB_CELLPROFILER_ARGS", venv_args(env["CPB_CELLPROFILER"]))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = "1"
    return env


def make_data(work: Path, sets: int):
    """(pipeline, images dir, data file, label) with `sets` image sets."""
    work.mkdir(parents=True, exist_ok=True)
    if EXAMPLES.is_dir():
        row = (EXAMPLES / "loaddata" / "load_data.csv").read_text().splitlines()
        data = work / "load_data.csv"
        data.write_text("\n".join([row[0]] + [row[1]] * sets) + "\n")
        return (EXAMPLES / "loaddata" / "ExampleHuman_LoadData.cppipe", EXAMPLES / "images", data,
                f"ExampleHuman x{sets}")
    sys.path.insert(0, str(REPO))
    from cpb.demo.synthetic import PIPELINE, make_plate
    wells = [f"A{i:02d}" for i in range(1, (sets + 1) // 2 + 1)]
    plate = make_plate(work / "plate", wells=wells, sites=2, seed=1, size=768, nuclei=(40, 80))
    return PIPELINE, plate.images_dir, plate.data_file, f"synthetic plate, {plate.image_sets} sets of 768x768"


def make_metadata_data(work: Path, sets: int, size: int):
    """(pipeline, images dir, None, label): a metadata-matched plate of `sets` sites."""
    sys.path.insert(0, str(REPO))
    from cpb.demo.synthetic import METADATA_PIPELINE, make_metadata_plate
    wells = [f"B{i:02d}" for i in range(1, (sets + 1) // 2 + 1)]
    plate = make_metadata_plate(work / "mplate", wells=wells, sites=2, seed=1, size=size, nuclei=(40, 80))
    return (METADATA_PIPELINE, plate.images_dir, None,
            f"metadata_illum.cppipe on a generated plate, {plate.image_sets} sets of {size}x{size}")


def child_cpu() -> float:
    """CPU seconds used by finished child processes (and the processes they waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_single(env: dict, pipeline: Path, images: Path, data: Optional[Path], out: Path) -> tuple[float, str]:
    """(wall seconds, CellProfiler's log) of one plain `cellprofiler -c -r` over every image set."""
    argv = [env["CPB_CELLPROFILER"], *env["CPB_CELLPROFILER_ARGS"].split(), "-c", "-r", "-p", str(pipeline),
            "-i", str(images), "-o", str(out)] + (["--data-file", str(data)] if data else [])
    t0 = time.monotonic()
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0 or not (out / "Image.csv").exists():
        raise SystemExit(f"single CellProfiler run failed ({proc.returncode}): {proc.stdout[-500:]}")
    return wall, proc.stdout


def run_worker(env: dict, pipeline: Path, images: Path, data: Optional[Path], work: Path, vcpus: int):
    """Upload inputs to moto, run the worker as Batch would, return (wall seconds, run record)."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log would drown the figures
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
        s3.create_bucket(Bucket=BUCKET)
        for image in images.rglob("*"):
            if image.is_file():
                s3.upload_file(str(image), BUCKET, f"in/{image.relative_to(images).as_posix()}")
        s3.upload_file(str(pipeline), BUCKET, "pipeline.cppipe")
        job = dict(env, **creds, AWS_ENDPOINT_URL=url, CPB_BUCKET=BUCKET, CPB_PIPELINE="pipeline.cppipe",
                   CPB_INPUT="in", CPB_OUTPUT="out", CPB_VCPUS=str(vcpus),
                   CPB_WORK_DIR=str(work / "scratch"), PYTHONPATH=str(REPO / "image"))
        if data is not None:
            s3.upload_file(str(data), BUCKET, "data/load_data.csv")
            job["CPB_DATA_FILE"] = "data/load_data.csv"
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "cpb_worker"], env=job, capture_output=True, text=True)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise SystemExit(f"worker failed ({proc.returncode}): {proc.stderr[-800:]}")
        record = json.loads(s3.get_object(Bucket=BUCKET, Key="out/_cpb/run.json")["Body"].read())
        record["logs"] = [s3.get_object(Bucket=BUCKET, Key=f"out/{f['key']}")["Body"].read().decode(errors="replace")
                          for f in record["files"] if f["key"].startswith("_cpb/logs/")]
        return wall, record
    finally:
        server.stop()


def measure(env: dict, case, work: Path, vcpus: int, repeat: int, jvm_ab: bool = False):
    """(single wall, single CPU, worker wall, worker CPU, record): each run `repeat` times, alternating,
    keeping each one's fastest (noisy machines). `jvm_ab`: also the worker with the JVM's default
    compilers (JAVA_TOOL_OPTIONS chooses them, so the worker adds none), in the same alternation."""
    pipeline, images, data, _ = case
    singles, workers, defaults = [], [], []
    for attempt in range(repeat):
        if jvm_ab:
            c0 = child_cpu()
            default_wall = run_worker(dict(env, JAVA_TOOL_OPTIONS="-XX:+TieredCompilation"), pipeline, images,
                                      data, work / f"jvm-default{attempt}", vcpus)[0]
            defaults.append((default_wall, child_cpu() - c0))
        c0 = child_cpu()
        single_wall, single_log = run_single(env, pipeline, images, data, work / f"single{attempt}")
        singles.append((single_wall, child_cpu() - c0, single_log))
        c0 = child_cpu()
        wall, record = run_worker(env, pipeline, images, data, work / f"worker{attempt}", vcpus)
        workers.append((wall, child_cpu() - c0, record))
    single, single_cpu, single_log = min(singles, key=lambda s: s[0])
    wall, worker_cpu, record = min(workers, key=lambda w: w[0])
    record["single_log"] = single_log
    record["jvm_default"] = min(defaults) if defaults else None
    return single, single_cpu, wall, worker_cpu, record


def count_only_seconds(env: dict, case, work: Path) -> float:
    """Wall time of asking CellProfiler for the image-set count alone (cpsets.py --count-only): what
    a separate counting start before the run would cost, which the worker's in-process count avoids."""
    sys.path.insert(0, str(REPO / "image"))
    from cpb_worker.cpsets import script_path
    from cpb_worker.runner import cellprofiler_argv, cellprofiler_python
    python, why = cellprofiler_python(env)
    if python is None:
        raise SystemExit(f"cannot ask CellProfiler to count: {why}")
    pipeline, images, _, _ = case
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    subprocess.run([python, script_path(), "--report", str(work / "count.json"), "--count-only", "--"]
                   + cellprofiler_argv(env)[1:] + ["-c", "-r", "-p", str(pipeline), "-i", str(images), "-o",
                                                   str(work / "count-out")],
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    seconds = time.monotonic() - t0
    counted = json.loads((work / "count.json").read_text())
    if counted.get("status") != "counted":
        raise SystemExit(f"CellProfiler did not count {images}: {counted}")
    return seconds


def mirror_plate(work: Path, source: Path, wells: int = 384, sites: int = 9) -> Path:
    """A 384-well x 9-site plate of EMPTY files named like the generated metadata plate's (and its .npy
    illumination functions, copied): enough for CellProfiler to make the image-set list, which never
    opens an image."""
    images = work / "mirror" / "images"
    shutil.copytree(source / "illum", images / "illum")
    for well in range(wells):
        row, column = divmod(well, 24)
        for site in range(1, sites + 1):
            for channel in (1, 2):
                (images / f"r{row + 1:02d}c{column + 1:02d}f{site:02d}p01-ch{channel}sk1fk1fl1.tiff").touch()
    return images


#: The same numpy/scipy work in one process, then in two at once (this machine's ceiling for 2 processes).
CEILING_WORK = r"""
import numpy, scipy.ndimage as ndi, time
rng = numpy.random.default_rng(0)
image = rng.random((1024, 1024))
t0 = time.monotonic()
while time.monotonic() - t0 < 0.5:  # warm up
    ndi.gaussian_filter(image, 2)
done, t0 = 0, time.monotonic()
for _ in range(24):
    smooth = ndi.gaussian_filter(image, 3)
    labels, count = ndi.label(smooth > smooth.mean())
    ndi.sum_labels(image, labels, numpy.arange(1, count + 1))
print(time.monotonic() - t0)
"""


def machine_ceiling(env: dict) -> float:
    """Throughput of two copies of CEILING_WORK at once over one copy alone (2.0 on two free cores)."""
    sys.path.insert(0, str(REPO / "image"))
    from cpb_worker.runner import cellprofiler_python
    python, _ = cellprofiler_python(env)
    command = [python or sys.executable, "-c", CEILING_WORK]
    alone = float(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout)
    pair = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    together = max(float(p.communicate()[0]) for p in pair)
    return 2 * alone / together


def set_walls(log: str) -> list:
    """Wall seconds of each image set a CellProfiler log timed (its modules' Wall_time, summed)."""
    sys.path.insert(0, str(REPO))
    from cpb.estimate import set_times_from_log
    times = set_times_from_log(log, "wall")
    return [times[n] for n in sorted(times)]


def where_time_goes(sets: int, figures, ceiling: float) -> None:
    """Split both runs into what every process pays once and what each image set costs."""
    single, _, wall, _, record = figures
    alone = set_walls(record["single_log"])
    together = [set_walls(log) for log in record["logs"]]
    if len(alone) != sets or sum(len(t) for t in together) != sets:
        print("  (CellProfiler's logs do not time every image set: no breakdown)")
        return
    per_set = sum(alone) / sets
    fixed = single - sum(alone)
    phase = record["timings"]["cellprofiler"]
    busiest = max(together, key=sum)
    fixed2 = phase - sum(busiest)  # the busiest process's start-up, listing, export (and waiting, if any)
    per_set2 = sum(sum(t) for t in together) / sets
    slowdown = per_set2 / per_set
    overhead = wall - phase
    print(f"  where the time goes (CellProfiler's per-module wall times): one process pays {fixed:.1f} s outside "
          f"its image sets (imports, Java, making the image-set list, CSV export) and {per_set:.2f} s per set; with "
          f"{len(together)} side by side each pays ~{fixed2:.1f} s and {per_set2:.2f} s per set "
          f"(x{slowdown:.2f}; this machine runs two copies of the same numpy work at {ceiling:.2f}x one)")

    def model(n: int, p: float) -> float:
        return (fixed + n * p) / (overhead + fixed2 + -(-n // len(together)) * p * slowdown)

    print(f"  split cost: the second start-up costs {fixed2:.1f} s of {wall:.1f} s; running side by side "
          f"{(slowdown - 1) * 100:.0f}% per set. Expected at other sizes (same figures): "
          + ", ".join(f"{n} sets {model(n, per_set):.2f}x" for n in (8, 16, 64, 256))
          + f"; a Cell Painting site of 60 s {model(16, 60.0):.2f}x (limit here {2 / slowdown:.2f}x)")


def report(name: str, label: str, sets: int, vcpus: int, figures) -> float:
    single, single_cpu, wall, worker_cpu, record = figures
    t = record["timings"]
    cellprofiler = t["cellprofiler"]
    overhead = wall - cellprofiler  # download, plan, merge, verify, upload, record, Python start-up
    print(f"[{name}] {label}")
    print(f"  one CellProfiler process over {sets} sets (seed design): {single:7.1f} s wall, {single_cpu:6.1f} s CPU")
    print(f"  worker, {record['processes']} processes, S3 in/out (moto):     {wall:7.1f} s wall, "
          f"{worker_cpu:6.1f} s CPU (CellProfiler phase {cellprofiler:.1f} s)")
    print(f"  speed-up: {single / wall:.2f}x  (target >= 1.7x; limit {vcpus}x); the worker kept "
          f"{worker_cpu / wall:.2f} cores busy (less than {vcpus}: other users had the rest)")
    parts = ", ".join(f"{k} {t[k]:.2f} s" for k in ("stage", "plan", "merge", "verify", "upload") if k in t)
    print(f"  worker overhead: {overhead:.2f} s = {100 * overhead / wall:.1f}% of its run (target < 10%); {parts}")
    if record.get("jvm_default"):
        default, default_cpu = record["jvm_default"]
        print(f"  the same worker with the JVM's default compilers (C2 too): {default:.1f} s wall, {default_cpu:.1f} s "
              f"CPU, speed-up {single / default:.2f}x; without C2 (the worker's default) {single / wall:.2f}x, "
              f"CPU x{worker_cpu / default_cpu:.2f}")
    return single / wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=8, help="image sets (default 8)")
    parser.add_argument("--vcpus", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--size", type=int, default=1024, help="metadata plate image size (default 1024)")
    parser.add_argument("--metadata-sets", type=int, default=16,
                        help="metadata plate sites (default 16: its sets take ~1.3 s each here, ExampleHuman's ~2.3 s, "
                             "so twice as many keep CellProfiler's start-up (~4 s CPU per process) the same share)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternate the two runs this many times and keep each one's fastest (noisy machines)")
    parser.add_argument("--only", choices=("loaddata", "metadata"), help="run one of the two pipelines")
    parser.add_argument("--jvm-ab", action="store_true",
                        help="also run the worker with the JVM's default compilers, for the C1-only JVM's effect")
    args = parser.parse_args()
    env = cellprofiler_env()
    if not Path(env["CPB_CELLPROFILER"]).exists():
        print(f"CellProfiler not found at {env['CPB_CELLPROFILER']}: run `make cellprofiler`", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    ratios = {}
    try:
        load_before = os.getloadavg()
        cases = []
        if args.only in (None, "loaddata"):
            cases.append(("LoadData", make_data(work / "loaddata", args.sets)))
        if args.only in (None, "metadata"):
            cases.append(("metadata", make_metadata_data(work / "metadata", args.metadata_sets, args.size)))
        results = [(name, case, measure(env, case, work / name, args.vcpus, args.repeat, args.jvm_ab))
                   for name, case in cases]
        counting = [(count_only_seconds(env, case, work / name),
                     count_only_seconds(env, (case[0], mirror_plate(work / name, case[1]), None, ""),
                                        work / name / "mirror-count"))
                    for name, case in cases if name == "metadata"]
        ceiling = machine_ceiling(env)
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {os.cpu_count()} CPUs; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          "(1 min; other users' work slows both runs)")
    for name, case, figures in results:
        sets = args.metadata_sets if name == "metadata" else args.sets
        ratios[name] = report(name, case[3], sets, args.vcpus, figures)
        where_time_goes(sets, figures, ceiling)
    if counting:
        here, plate = counting[0]
        print(f"[metadata] a CellProfiler start that only makes the image-set list (cpsets.py --count-only) takes "
              f"{here:.1f} s for these {args.metadata_sets} sets and {plate:.1f} s for a 384-well x 9-site plate "
              f"(3,456 sets): every process of every job pays it for the whole input folder (the worker counts "
              "inside the processes that run the sets, so no separate counting start)")
    print(f"this machine: two copies of the same numpy/scipy work run at {ceiling:.2f}x one copy "
          "(the ceiling of any 2-process speed-up here)")
    print("speed-up, 2 processes vs 1: " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
