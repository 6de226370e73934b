"""Per-child cost of an array child's data file vs plate size (issue 15): `python bench/bench_slices.py`.

For LoadData CSVs of 96, 3,456 (a 384-well plate x 9 sites), 100,000 and (with --million, or
when it fits in a minute) 1,000,000 rows of 5 channels, one array child of `image_sets_per_job`
10 is planned and staged as the worker does it in FSx mode (the data file read in place): the
data file streamed, its 10 rows kept and checked, and CellProfiler's LoadData CSV of just those
rows written with every location resolved. Each child runs in a fresh process, so its peak RSS
(ru_maxrss) is its own. Two children per size: the middle one (stops reading after its rows)
and the last one (reads to the end to check the row count against CPB_IMAGE_SET_COUNT).

Prints, per child, the data-file work alone (stream, slice, write), the whole child process
(Python start, imports, the same work: what a Batch child pays before CellProfiler starts) and
its peak MiB, with ratios to the 96-row plate: flat means ratios near 1. Memory holds one
1 MiB block and the child's rows. Time grows only with the bytes skimmed before a child's rows
(newlines counted a megabyte at a time, ~0.3 s per million rows here) and, for the last child,
after them (it checks the row count); nothing is parsed but the child's own rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from cpb_worker import datafile as df
from cpb_worker.job import JobSpec, plan_job
t0 = time.monotonic()
spec = JobSpec(pipeline=Path(sys.argv[2]), input_dir=Path(sys.argv[3]), data_file=Path(sys.argv[4]),
               array_index=int(sys.argv[5]), sets_per_job=10, expected_count=int(sys.argv[6]), workers=1, env={})
plan = plan_job(spec)
resolve = lambda loc: "/fsx/plates/p1/" + loc
out = df.rewrite(plan.data, resolve, Path(sys.argv[7]), plan.first, plan.last)
seconds = time.monotonic() - t0
rows = sum(1 for _ in open(out)) - 1
print(json.dumps({"seconds": seconds, "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "rows": rows, "first": plan.first, "last": plan.last}))
"""

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")


def write_csv(path: Path, rows: int) -> None:
    header = ([f"Image_FileName_Orig{c}" for c in CHANNELS] + [f"Image_PathName_Orig{c}" for c in CHANNELS]
              + ["Metadata_Plate", "Metadata_Well", "Metadata_Site"])
    with open(path, "w", newline="") as handle:
        handle.write(",".join(header) + "\n")
        block = []
        for n in range(rows):
            well, site = divmod(n, 9)
            r, c = divmod(well % 384, 24)
            name = f"r{r + 1:02d}c{c + 1:02d}f{site + 1:02d}p01"
            block.append(",".join([f"{name}-ch{i + 1}sk1fk1fl1.tiff" for i in range(5)] + ["images"] * 5
                                  + [f"P{well // 384 + 1}", f"{chr(65 + r)}{c + 1:02d}", str(site + 1)]) + "\n")
            if len(block) == 10000:
                handle.write("".join(block))
                block = []
        handle.write("".join(block))


def run_child(work: Path, data: Path, index: int, total: int) -> dict:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO / "image"), str(REPO / "cpb" / "pipelines" /
                          "nuclei.cppipe"), str(work), str(data), str(index), str(total),
                          str(work / f"child-{index}.csv")], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout), wall=time.monotonic() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--million", action="store_true", help="also 1,000,000 rows (always tried when 100,000 "
                                                               "rows took under 6 s per child)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-slices-"))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; image_sets_per_job 10; "
          "FSx mode (data file read in place)")
    base = None
    sizes = [96, 3456, 100_000, 1_000_000]
    for rows in sizes:
        data = work / f"plate-{rows}.csv"
        t0 = time.monotonic()
        write_csv(data, rows)
        made = time.monotonic() - t0
        children = (rows + 9) // 10
        results = {}
        for label, index in (("middle", children // 2), ("last", children - 1)):
            result = run_child(work, data, index, rows)
            assert result["rows"] == result["last"] - result["first"] + 1 <= 10
            results[label] = result
        if base is None:
            base = results
        line = [f"{rows:>9,} rows ({data.stat().st_size / 2**20:6.1f} MiB, written in {made:4.1f} s):"]
        for label in ("middle", "last"):
            r, b = results[label], base[label]
            line.append(f"{label} child: data file {r['seconds']:5.3f} s, whole child {r['wall']:5.2f} s "
                        f"({r['wall'] / b['wall']:4.2f}x), peak {r['rss_kib'] / 1024:5.1f} MiB "
                        f"({r['rss_kib'] / b['rss_kib']:4.2f}x)")
        print("  ".join(line), flush=True)
        data.unlink()
        if rows == 100_000 and not args.million and results["last"]["seconds"] > 6:
            print("1,000,000 rows skipped (would take over a minute here; --million runs it)")
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
