"""Download a finished run and merge array parts into one set of CSVs.

Only files a succeeded run record lists are downloaded, and each is checked
against the size and SHA-256 the worker recorded, so a half-written prefix
or a stale file from an earlier attempt never ends up in a scientist's
spreadsheet. Array children each wrote `part-NNNNN/<table>.csv`; the merge
keeps one header and global `ImageNumber`s (a part numbered from 1 is shifted
by its `first - 1`).
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cpb.runrecords import RunState, run_state


class IncompleteRun(Exception):
    """The run records do not say the run finished; nothing is merged."""


class ResultsError(Exception):
    """The results cannot be merged as they are (e.g. parts disagree)."""


@dataclass
class ResultsReport:
    """What `collect` wrote, for the CLI and tests."""

    dest: Path
    files: list[str] = field(default_factory=list)
    parts: int = 0
    rows: dict[str, int] = field(default_factory=dict)


def _download(s3, bucket: str, key: str, path: Path, size: int, sha256: Optional[str],
              progress: Optional[Callable[[int], None]]) -> None:
    """Fetch one object and verify it matches what the run record promised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    s3.download_file(bucket, key, str(path), Callback=progress)
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise ResultsError(f"s3://{bucket}/{key}: {actual} bytes, run record says {size}")
    if sha256:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            raise ResultsError(f"s3://{bucket}/{key}: checksum differs from its run record "
                               "(overwritten by a later attempt?): run `cpb status` and retry")


def _shift_for(rows: list[list[str]], column: int, first: int) -> int:
    """How much to add to this part's ImageNumbers to make them global.

    Zero when the worker already wrote global numbers (all >= first); else
    the part was numbered from 1 and moves up by first - 1.
    """
    numbers = [int(float(r[column])) for r in rows if len(r) > column and r[column].strip()]
    if not numbers or first <= 1 or min(numbers) >= first:
        return 0
    return first - 1


def _has_image_number(path: Path) -> bool:
    """True for per-image/per-object tables (they carry an ImageNumber column)."""
    with open(path, newline="") as handle:
        header = next(csv.reader(handle), [])
    return "ImageNumber" in header


def merge_csvs(sources: list[tuple[Path, int]], dest: Path) -> int:
    """Concatenate CSVs (path, first image set) with equal headers into `dest`.

    Returns the number of data rows. Different headers mean the parts ran
    different pipelines: refuse rather than misalign columns.
    """
    header: Optional[list[str]] = None
    count = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as out:
        writer = csv.writer(out)
        for path, first in sources:
            with open(path, newline="") as handle:
                rows = list(csv.reader(handle))
            if not rows:
                continue
            if header is None:
                header = rows[0]
                writer.writerow(header)
            elif rows[0] != header:
                raise ResultsError(f"{dest.name}: part {path.parent.name} has different columns "
                                   "from the first part; the parts did not run the same pipeline")
            body = rows[1:]
            if "ImageNumber" in header:
                col = header.index("ImageNumber")
                shift = _shift_for(body, col, first)
                if shift:
                    for row in body:
                        if len(row) > col and row[col].strip():
                            row[col] = str(int(float(row[col])) + shift)
            writer.writerows(body)
            count += len(body)
    return count


def collect(s3, bucket: str, output: str, dest: Path, expected: Optional[int] = None,
            progress: Optional[Callable[[int], None]] = None,
            on_total: Optional[Callable[[int], None]] = None) -> ResultsReport:
    """Download `output` into `dest`, merging array parts; refuse incomplete runs.

    `on_total` is told the byte total first so a progress bar can be sized.
    """
    state = run_state(s3, bucket, output, expected)
    if not state.complete:
        raise IncompleteRun(f"s3://{bucket}/{state.output} is not complete: "
                            + "; ".join(state.problems()[:5])
                            + ("" if len(state.problems()) <= 5 else f" (+{len(state.problems()) - 5} more)"))
    files = [(p, f) for p in state.parts for f in p.record.get("files", [])]
    if on_total:
        on_total(sum(int(f.get("size") or 0) for _, f in files))
    dest.mkdir(parents=True, exist_ok=True)
    report = ResultsReport(dest=dest, parts=len(state.parts) if state.array else 0)
    with tempfile.TemporaryDirectory(prefix="cpb-results-") as tmp:
        staged: dict[str, list[tuple[Path, int, str]]] = {}
        for part, entry in files:
            relative = entry["key"].lstrip("/")
            if ".." in Path(relative).parts:
                raise ResultsError(f"run record of {part.prefix or state.output} lists a key "
                                   f"outside its prefix: {relative}")
            key = "/".join(x for x in (state.output, part.prefix, relative) if x)
            local = Path(tmp) / (part.prefix or "single") / relative
            _download(s3, bucket, key, local, entry.get("size"), entry.get("sha256"), progress)
            first = int(part.record.get("first") or 1)
            staged.setdefault(relative, []).append((local, first, part.prefix))
        for relative, copies in sorted(staged.items()):
            target = dest / relative
            if relative.lower().endswith(".csv") and len(copies) > 1 and not _has_image_number(copies[0][0]):
                # Per-run metadata (Experiment.csv: CellProfiler version, pipeline text): one copy, the first part's.
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(min(copies, key=lambda c: c[1])[0], target)
            elif relative.lower().endswith(".csv") and len(copies) > 1:
                report.rows[relative] = merge_csvs(
                    [(p, first) for p, first, _ in sorted(copies, key=lambda c: c[1])], target)
            elif len(copies) == 1:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(copies[0][0], target)
            else:  # same non-CSV name in several parts: keep each, never overwrite
                for local, _first, prefix in copies:
                    kept = dest / prefix / relative
                    kept.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(local, kept)
                    report.files.append(str(kept.relative_to(dest)))
                continue
            report.files.append(relative)
    _write_provenance(state, dest)
    return report


def files_under(folder: Path) -> set[str]:
    """Every file below `folder` as a relative POSIX path (empty when it does not exist yet)."""
    if not folder.is_dir():
        return set()
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _write_provenance(state: RunState, dest: Path) -> None:
    """Keep the run records beside the results (what ran, which version)."""
    target = dest / "_cpb" / "runs.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps([{"part": p.prefix, **(p.record or {})} for p in state.parts],
                                 indent=2, sort_keys=True))
