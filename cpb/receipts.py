"""Local receipts of what `cpb submit` sent, so `cpb status` needs no arguments.

A scientist who just submitted a plate should be able to type `cpb status`
(or paste a message id) without remembering output prefixes. Each submit
appends one JSON line per sent message to `$CPB_HOME/submissions.jsonl`
(default `~/.cpb/`); nothing else reads or sends it.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Optional


def receipts_file(environ: Mapping[str, str] = os.environ) -> Path:
    """Where receipts live: $CPB_HOME/submissions.jsonl, else ~/.cpb/submissions.jsonl."""
    home = environ.get("CPB_HOME") or str(Path.home() / ".cpb")
    return Path(home) / "submissions.jsonl"


def record(bucket: str, sent: Iterable[tuple[str, str]], environ: Mapping[str, str] = os.environ) -> Optional[Path]:
    """Append (message id, output) pairs of one submit; None when nothing was written.

    A receipt that cannot be written (read-only home) never fails a
    submission that SQS already accepted.
    """
    rows = list(sent)
    if not rows:
        return None
    path = receipts_file(environ)
    batch = uuid.uuid4().hex[:12]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            for message_id, output in rows:
                handle.write(json.dumps({"batch": batch, "sent_at": stamp, "bucket": bucket,
                                         "message_id": message_id, "output": output}) + "\n")
    except OSError:
        return None
    return path


def _read(environ: Mapping[str, str]) -> list[dict]:
    path = receipts_file(environ)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("output"):
            rows.append(row)
    return rows


def last_outputs(bucket: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Outputs of the most recent submit to `bucket` (empty when there is none)."""
    rows = [r for r in _read(environ) if r.get("bucket") == bucket]
    if not rows:
        return []
    batch = rows[-1]["batch"]
    return list(dict.fromkeys(r["output"] for r in rows if r["batch"] == batch))


def resolve(names: Iterable[str], bucket: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Turn message ids from earlier submits into their outputs; other names are outputs already."""
    by_id = {r["message_id"]: r["output"] for r in _read(environ) if r.get("bucket") == bucket}
    return list(dict.fromkeys(by_id.get(name, name) for name in names))


def sent_outputs(bucket: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Every output `cpb submit` on this machine sent to `bucket`, most recent last (for spotting typos)."""
    return list(dict.fromkeys(r["output"] for r in _read(environ) if r.get("bucket") == bucket))
