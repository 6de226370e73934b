"""What a run's results depend on, as digests: the basis of resume (docs/CONTRACTS.md, "Resume").

A succeeded run record carries a `fingerprint`; a later run of the same output reuses that
record's results only when the fingerprint of what it would run now is equal. The same
functions are used by the worker (which writes and compares fingerprints), the Lambda and the
client (which predict them before sending), so all three agree byte for byte. Stdlib only.

Never a file count or a file name alone: the data-file rows are hashed by content, the input
folder (pipelines without a data file) by the names and sizes of every file in it.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterable, List, Optional, Sequence, Tuple

FINGERPRINT_KEYS = ("pipeline_sha256", "data_sha256", "image", "cellprofiler_version", "upstream")


def data_rows_sha256(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Digest of a LoadData CSV's header and the given data rows (one image set each).

    Rows are hashed as parsed by the csv module (header cells stripped, as the worker reads
    them), one JSON array per line, so quoting, line endings and a byte-order mark do not
    matter but every cell's value does."""
    digest = hashlib.sha256()
    digest.update((json.dumps([str(h).strip() for h in header], ensure_ascii=False) + "\n").encode("utf-8"))
    for row in rows:
        digest.update((json.dumps(list(row), ensure_ascii=False) + "\n").encode("utf-8"))
    return digest.hexdigest()


def input_listing_sha256(files: Iterable[Tuple[str, int]]) -> str:
    """Digest of an input folder for pipelines without a data file: every (relative path, size),
    sorted. The image sets are whatever the folder holds, so any added, removed, renamed or
    resized file changes it."""
    digest = hashlib.sha256()
    for key, size in sorted((str(k).replace("\\", "/"), int(s)) for k, s in files):
        digest.update(f"{key}\t{size}\n".encode("utf-8"))
    return digest.hexdigest()


def upstream_sha256(records: Iterable[dict]) -> str:
    """Digest of the succeeded run records an `after` run read its inputs from (e.g. the plate's
    illumination functions): the sha256 of every file they list. A rerun upstream that wrote
    different files therefore invalidates what was computed from the old ones."""
    digest = hashlib.sha256()
    entries: List[str] = []
    for record in records:
        for entry in record.get("files") or []:
            entries.append(f"{entry.get('key')}\t{entry.get('sha256')}")
    for line in sorted(entries):
        digest.update((line + "\n").encode("utf-8"))
    return digest.hexdigest()


def make(pipeline_sha256: str, data_sha256: Optional[str], image: Optional[str],
         cellprofiler_version: Optional[str], upstream: Optional[str] = None) -> dict:
    """The `fingerprint` object of a run record."""
    return {"pipeline_sha256": pipeline_sha256, "data_sha256": data_sha256, "image": image,
            "cellprofiler_version": cellprofiler_version, "upstream": upstream}


def differences(old: Optional[dict], new: dict) -> List[str]:
    """Why a recorded fingerprint does not match what would run now, one phrase per key (empty:
    equal). `cellprofiler_version` is compared only when both sides know it (a job learns it
    from its own run; the image pins it anyway)."""
    if not isinstance(old, dict):
        return ["the earlier record has no fingerprint"]
    out = []
    for key in FINGERPRINT_KEYS:
        a, b = old.get(key), new.get(key)
        if key == "cellprofiler_version" and (a is None or b is None):
            continue
        if a != b:
            label = {"pipeline_sha256": "pipeline", "data_sha256": "data-file rows / input files",
                     "image": "container image", "cellprofiler_version": "CellProfiler version",
                     "upstream": "results of the step it runs after"}[key]
            out.append(f"{label} changed")
    return out
