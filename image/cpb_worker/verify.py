"""Decide from the outputs, not the exit codes, whether a run succeeded.

CellProfiler can exit 0 having processed nothing (no image sets matched, an
export module disabled) and exit 1 after finishing every image set (an error
while shutting down). So: every expected ImageNumber must be in the merged
Image.csv exactly once, no image set may carry a module error, and when the
pipeline does not group, CellProfiler's own Group_Length must equal the
worker's count (a miscount would otherwise silently skip image sets).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import List, Optional, Tuple

from .errors import Killed, PipelineFailed
from .runner import RangeResult, exit_code_text


def _compress(numbers: List[int]) -> str:
    """'3-5, 9' for [3, 4, 5, 9]: short enough for a one-line reason."""
    parts: List[str] = []
    for n in sorted(numbers):
        if parts and parts[-1][1] == n - 1:
            parts[-1] = (parts[-1][0], n)
        else:
            parts.append((n, n))
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts[:8])
    return text + (", ..." if len(parts) > 8 else "")


def check_processes(results: List[RangeResult]) -> None:
    """A process killed by a signal never counts as done, whatever it wrote."""
    for result in results:
        code = exit_code_text(result.exit_code)
        if code == 137 or result.exit_code == -9:
            raise Killed(f"CellProfiler for image sets {result.first}-{result.last} was killed (SIGKILL, "
                         "usually out of memory): raise job_memory or lower image_sets_per_job")
        if result.exit_code < 0:
            raise PipelineFailed(f"CellProfiler for image sets {result.first}-{result.last} died from signal "
                                 f"{-result.exit_code}")
        if result.log_mentions("Failed to load pipeline"):
            # CellProfiler drops every module from the first one it cannot load and runs the rest.
            line = result.error_line()
            raise PipelineFailed("CellProfiler could not load the whole pipeline"
                                 + (f": {line}" if line else "") + " (a module missing from this CellProfiler "
                                 "version or a plugin not installed)")


def verify_image_table(output_dir: Path, expected: Optional[Tuple[int, int]], grouped: bool,
                       total: Optional[int], results: List[RangeResult]) -> Tuple[int, int, int]:
    """Check Image.csv; return (first, last, count) of the image sets it holds."""
    image_csv = output_dir / "Image.csv"
    failed = [r for r in results if r.exit_code != 0] or results
    line = failed[0].error_line()
    hint = f"; CellProfiler exited {exit_code_text(failed[0].exit_code)}" + (f": {line}" if line else "")
    if not image_csv.exists():
        raise PipelineFailed(f"CellProfiler wrote no Image.csv{hint}; see _cpb/logs/{failed[0].log.name}")
    with open(image_csv, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        rows = list(reader)
    numbers = [int(float(row["ImageNumber"])) for row in rows]
    if len(set(numbers)) != len(numbers):
        dupes = sorted({n for n in numbers if numbers.count(n) > 1})
        raise PipelineFailed(f"Image.csv lists image sets {_compress(dupes)} more than once")
    if expected is None:
        if not numbers:
            raise PipelineFailed(f"Image.csv has no rows: CellProfiler processed no image sets{hint}")
        expected = (1, max(numbers))
    want = set(range(expected[0], expected[1] + 1))
    missing = sorted(want - set(numbers))
    extra = sorted(set(numbers) - want)
    if missing:
        raise PipelineFailed(f"image sets {_compress(missing)} of {expected[0]}-{expected[1]} are missing "
                             f"from Image.csv{hint}")
    if extra:
        raise PipelineFailed(f"Image.csv has image sets {_compress(extra)} outside the range "
                             f"{expected[0]}-{expected[1]}")
    errors = [c for c in columns if c.startswith("ModuleError_")]
    for row in rows:
        bad = [c for c in errors if row.get(c) not in ("", "0", "0.0", None)]
        if bad:
            raise PipelineFailed(f"image set {row['ImageNumber']}: module error in {bad[0][len('ModuleError_'):]}")
    if not grouped and "Group_Length" in columns and rows:
        lengths = {row["Group_Length"] for row in rows}
        seen = {int(float(x)) for x in lengths if x}
        if total is not None and seen and seen != {total}:
            raise PipelineFailed(f"CellProfiler found {', '.join(map(str, sorted(seen)))} image sets but "
                                 f"the worker planned {total}: set CPB_UNSPLITTABLE=1 or supply a data_file")
    return expected[0], expected[1], len(numbers)
