"""CellProfiler counts the image sets: run INSIDE CellProfiler's own interpreter.

    <cellprofiler's python> cpsets.py --report R.json --part I --parts N [--first F --last L]
        [--expect T] [--count-only] -- <the usual cellprofiler arguments: -c -r -p P -i DIR -o OUT ...>

This script runs CellProfiler's own `main()` with the given arguments, exactly as the
`cellprofiler` command would, with two small hooks on `cellprofiler_core.pipeline.Pipeline`:

* `prepare_run`: after CellProfiler's input modules (Images, Metadata, NamesAndTypes, Groups,
  or LoadData) have made the image-set list, the hook writes what CellProfiler found to the
  report (`count`, grouping) and keeps only image sets `split_range(F, L, N)[I]` (F, L default
  1 and the count) - the same removal CellProfiler's own `-f/-l` does in `run_with_yield`;
* `group`: iterates that same range (what `-f/-l` pass as image_set_start/end).

So N processes started together split the image sets CellProfiler itself listed, with no
extra CellProfiler start to count them first (measured: a separate counting start costs
~4-5 s, as much as two ExampleHuman image sets). Every process reports the count it saw;
the worker checks they agree and equal CPB_IMAGE_SET_COUNT (`--expect`: a mismatch stops
the process before it analyses anything). `--count-only` stops right after counting.

The report (`json`, written atomically) is one of
    {"status": "running", "count", "first", "last", "grouped"}  then processing continued;
    {"status": "counted", "count", "grouped"}                   --count-only;
    {"status": "idle", "count"}                                 more processes than image sets;
    {"status": "refused", "count", "reason"}                    expect/range/grouping mismatch;
    {"status": "unsupported", "reason"}                         this CellProfiler lacks the hooks;
    {"status": "no-image-sets"}                                 prepare_run found nothing.
No report at all means CellProfiler never got to make its image-set list (e.g. the pipeline
failed to load). Exit code: CellProfiler's; 0 for counted/idle/unsupported; 2 for refused.

Python >= 3.8, stdlib at import time; cellprofiler is imported only in `main()`, so the worker
(which never imports CellProfiler) can ship this file and find it with `script_path()`.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from typing import List, Optional, Tuple

EXIT_REFUSED = 2


def script_path() -> str:
    """This file, to run with CellProfiler's interpreter."""
    return os.path.abspath(__file__)


def split_range(first: int, last: int, parts: int) -> List[Tuple[int, int]]:
    """Same cut as cpb_worker.ranges.split_range (this file must run without the package)."""
    total = last - first + 1
    parts = max(1, min(parts, total))
    size, extra = divmod(total, parts)
    out, start = [], first
    for index in range(parts):
        stop = start + size + (1 if index < extra else 0) - 1
        out.append((start, stop))
        start = stop + 1
    return out


class _Stop(BaseException):
    """Leaves CellProfiler's run after the image-set list is known (not an Exception, so no
    handler in CellProfiler swallows it; its `finally` blocks still stop Java)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _write(path: str, payload: dict) -> None:
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle)
    os.replace(tmp, path)


def _parse(argv: List[str]) -> Tuple[argparse.Namespace, List[str]]:
    if "--" not in argv:
        raise SystemExit("cpsets.py: put the cellprofiler arguments after --")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="cpsets.py")
    parser.add_argument("--report", required=True)
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--first", type=int)
    parser.add_argument("--last", type=int)
    parser.add_argument("--expect", type=int)
    parser.add_argument("--count-only", action="store_true")
    return parser.parse_args(argv[:split]), argv[split + 1:]


def _unsupported(pipeline_class) -> Optional[str]:  # noqa: ANN001
    """Why this CellProfiler's Pipeline cannot take the hooks (None when it can)."""
    for name, wanted in (("prepare_run", ["self", "workspace"]),
                         ("group", ["self", "grouping", "image_set_start", "image_set_end"])):
        method = getattr(pipeline_class, name, None)
        if method is None:
            return f"cellprofiler_core Pipeline has no {name}()"
        params = list(inspect.signature(method).parameters)
        if params[:len(wanted)] != wanted:
            return f"cellprofiler_core Pipeline.{name}{tuple(params)} is not the expected {tuple(wanted)}"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    opts, cp_args = _parse(sys.argv[1:] if argv is None else argv)
    import numpy
    from cellprofiler_core.pipeline import Pipeline

    why = _unsupported(Pipeline)
    if why:
        _write(opts.report, {"status": "unsupported", "reason": why})
        return 0
    state = {"range": None}
    original_prepare, original_group = Pipeline.prepare_run, Pipeline.group

    def prepare_run(self, workspace, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        ok = original_prepare(self, workspace, *args, **kwargs)
        if not ok:
            _write(opts.report, {"status": "no-image-sets"})
            return ok
        m = workspace.measurements
        numbers = [int(n) for n in m.get_image_numbers()]
        count = len(numbers)
        groups = set()
        if m.has_feature("Image", "Group_Number"):
            groups = {int(g) for g in m.get_measurement("Image", "Group_Number", numbers)}
        grouped = len(groups) > 1
        report = {"count": count, "grouped": grouped}
        if numbers != list(range(1, count + 1)):
            raise _refuse(report, f"CellProfiler numbered its image sets {numbers[:3]}..., not 1..{count}")
        if opts.expect is not None and opts.expect != count:
            raise _refuse(report, f"CPB_IMAGE_SET_COUNT is {opts.expect} but CellProfiler makes {count} image "
                                  "sets from the input folder: resubmit so the count is taken again")
        if opts.count_only:
            _write(opts.report, dict(report, status="counted"))
            raise _Stop(0)
        first = 1 if opts.first is None else opts.first
        last = count if opts.last is None else opts.last
        if not 1 <= first <= last <= count:
            raise _refuse(report, f"range {first}-{last} is outside the {count} image sets CellProfiler "
                                  f"makes from the input folder (1-{count})")
        if grouped and (opts.parts > 1 or (first, last) != (1, count)):
            raise _refuse(report, f"the pipeline groups its {count} image sets into {len(groups)} groups, "
                                  "which cannot be split into ranges: set CPB_UNSPLITTABLE=1")
        ranges = split_range(first, last, opts.parts)
        if opts.part >= len(ranges):
            _write(opts.report, dict(report, status="idle"))
            raise _Stop(0)
        mine = ranges[opts.part]
        state["range"] = mine
        # Exactly what run_with_yield does for -f/-l, with the range CellProfiler's own count gives.
        drop = [n for n in numbers if n < mine[0] or n > mine[1]]
        if drop and m.has_feature("Image", "ImageNumber"):
            for number in numpy.unique(drop):
                m.remove_measurement("Image", "ImageNumber", number)
        _write(opts.report, dict(report, status="running", first=mine[0], last=mine[1]))
        return ok

    def _refuse(report: dict, reason: str) -> _Stop:
        _write(opts.report, dict(report, status="refused", reason=reason))
        return _Stop(EXIT_REFUSED)

    def group(self, grouping, image_set_start, image_set_end, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if state["range"] is not None:
            image_set_start, image_set_end = state["range"]
        return original_group(self, grouping, image_set_start, image_set_end, *args, **kwargs)

    Pipeline.prepare_run = prepare_run
    Pipeline.group = group
    import cellprofiler.__main__ as cellprofiler_main
    sys.argv = ["cellprofiler"] + cp_args
    try:
        code = cellprofiler_main.main()
    except _Stop as stop:
        return stop.code
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
