"""`python -m cpb_worker` (AWS mode, the container entrypoint) and
`python -m cpb_worker local ...` (plain folders). Exit codes: docs/CONTRACTS.md."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import List, Optional

from .errors import EXIT_BAD_INPUT, WorkerError


def _local(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpb_worker local",
                                     description="Run a CellProfiler pipeline over local folders, split over processes.")
    parser.add_argument("--pipeline", required=True, help=".cppipe file")
    parser.add_argument("--input", required=True, help="folder with the images (CellProfiler's default input folder)")
    parser.add_argument("--output", required=True, help="folder for the merged results")
    parser.add_argument("--data-file", help="LoadData CSV listing the image sets")
    parser.add_argument("--workers", type=int, help="CellProfiler processes (default: CPB_VCPUS or the CPU count)")
    parser.add_argument("--first", type=int, help="first image set (1-based)")
    parser.add_argument("--last", type=int, help="last image set (inclusive)")
    parser.add_argument("--unsplittable", action="store_true", help="run one process (state across image sets)")
    parser.add_argument("--no-resume", action="store_true",
                        help="run CellProfiler even when the output folder holds this run's results already")
    args = parser.parse_args(argv)
    from .local import run_local
    try:
        record = run_local(args.pipeline, args.input, args.output, data_file=args.data_file, workers=args.workers,
                           first=args.first, last=args.last, unsplittable=args.unsplittable,
                           resume=False if args.no_resume else None)
    except WorkerError as error:
        print(f"cpb_worker: failed: {error.reason}", file=sys.stderr)
        return error.exit_code
    how = f"resumed from {record.resumed_from}" if record.resumed_from else f"with {record.processes} process(es)"
    print(f"cpb_worker: succeeded: image sets {record.first}-{record.last} {how} in {record.timings.get('total')} s "
          f"-> {args.output}", file=sys.stderr)
    return 0


def _exit_on_sigterm() -> None:
    """Batch stops a job with SIGTERM (then SIGKILL). Turning it into SystemExit lets
    the worker stop its CellProfiler children instead of leaving orphans writing."""
    def handler(signum, frame):  # noqa: ANN001, ARG001
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _exit_on_sigterm()
    if argv and argv[0] == "local":
        return _local(argv[1:])
    if argv and argv[0] not in ("aws",):
        print(f"cpb_worker: unknown command {argv[0]!r}: use no arguments (AWS mode, job environment) "
              "or 'local --pipeline P --input DIR --output DIR'", file=sys.stderr)
        return EXIT_BAD_INPUT
    from .aws import main_aws
    return main_aws(dict(os.environ))


if __name__ == "__main__":
    sys.exit(main())
