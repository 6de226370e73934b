"""The run record (`_cpb/run.json`, schema in docs/CONTRACTS.md).

Written last: a record saying `succeeded` is the promise that every file it
lists is in place with that size and checksum, so consumers can trust a
prefix with such a record and treat any other prefix as incomplete.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

RECORD_KEY = "_cpb/run.json"


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class RunRecord:
    """What one job (or array child) did; `to_dict()` is the JSON written."""

    status: str = "failed"
    reason: Optional[str] = None
    first: Optional[int] = None
    last: Optional[int] = None
    image_set_count: Optional[int] = None
    array_index: Optional[int] = None
    cellprofiler_version: Optional[str] = None
    pipeline_sha256: Optional[str] = None
    image: Optional[str] = None
    started_at: str = field(default_factory=utc_now)
    finished_at: Optional[str] = None
    timings: Dict[str, float] = field(default_factory=dict)
    exit_codes: List[int] = field(default_factory=list)
    files: List[Dict[str, Any]] = field(default_factory=list)
    # Beyond the contract's keys: useful to people reading the record.
    processes: int = 0
    split: bool = False
    unsplittable_reasons: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    message_id: Optional[str] = None
    job_id: Optional[str] = None
    attempt: Optional[int] = None
    # Runs and resume (docs/CONTRACTS.md, "Run record additions").
    run_id: Optional[str] = None
    fingerprint: Optional[Dict[str, Any]] = None
    resumed_from: Optional[str] = None
    tables: Dict[str, int] = field(default_factory=dict)  # rows per merged table

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def file_entry(root: Path, rel: str) -> Dict[str, Any]:
    """{"key", "size", "sha256"} for one output file (key relative to the job prefix)."""
    digest = hashlib.sha256()
    path = root / rel
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"key": rel.replace(os.sep, "/"), "size": path.stat().st_size, "sha256": digest.hexdigest()}


def write_local(record: RunRecord, output_dir: Path) -> Path:
    """Write the record atomically (a reader never sees half a record)."""
    path = output_dir / RECORD_KEY
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(record.to_json(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_local(output_dir: Path) -> Optional[Dict[str, Any]]:
    path = output_dir / RECORD_KEY
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
