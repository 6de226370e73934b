"""`cpb local up --state-dir DIR`: the bucket survives a restart; nothing else does.

moto 5.2 keeps everything in memory and has no persistence. Its recorder
(`MOTO_ENABLE_RECORDING`, `/moto-api/recorder/replay-recording`) records HTTP requests and replays
them into a fresh server; that does not give a stack back: replayed SendMessage calls enqueue the
messages again under new message ids (the ingress Lambda would submit their jobs a second time),
replayed SubmitJob calls create jobs under new ids (the local Batch would run them again, and the
submission records and leases in the bucket name the old ids), and every poll of the queue would
be recorded too. So the local stack persists what matters to a scientist and cannot be recreated
cheaply, the bucket (pipelines, images, results, run records, submission records, leases), and
starts with empty queues and no Batch job history: a lease whose jobs Batch does not know counts
as finished (docs/CONTRACTS.md), so outputs can be submitted again.

Layout: `<DIR>/s3/<bucket>/index.json` ({key: {"file", "etag", "content_type"}}) and one file per
object under `objects/`, named by the key's sha256 (keys need not be valid paths). Saved when the
stack stops (only objects whose ETag changed are written), loaded when it starts.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable


def _folder(state_dir: Path, bucket: str) -> Path:
    return Path(state_dir) / "s3" / bucket


def _index(folder: Path) -> dict[str, dict]:
    try:
        return json.loads((folder / "index.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def restore_bucket(s3: Any, bucket: str, state_dir: Path) -> int:
    """Put every saved object back into the bucket; returns how many."""
    folder = _folder(state_dir, bucket)
    count = 0
    for key, entry in sorted(_index(folder).items()):
        path = folder / "objects" / entry["file"]
        if not path.is_file():
            continue
        extra = {"ContentType": entry["content_type"]} if entry.get("content_type") else {}
        with open(path, "rb") as body:
            s3.put_object(Bucket=bucket, Key=key, Body=body, **extra)
        count += 1
    return count


def save_bucket(s3: Any, bucket: str, state_dir: Path, say: Callable[[str], None] = lambda text: None) -> int:
    """Write the bucket's current objects to the state dir (changed ones only); returns how many objects
    the bucket holds. The index is written last, so an interrupted save leaves the previous one usable."""
    folder = _folder(state_dir, bucket)
    objects = folder / "objects"
    objects.mkdir(parents=True, exist_ok=True)
    previous = _index(folder)
    index: dict[str, dict] = {}
    written = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            key, etag = item["Key"], item["ETag"]
            name = hashlib.sha256(key.encode()).hexdigest()
            old = previous.get(key)
            if old and old.get("etag") == etag and (objects / name).is_file():
                index[key] = old
                continue
            answer = s3.get_object(Bucket=bucket, Key=key)
            tmp = objects / f"{name}.partial"
            with open(tmp, "wb") as handle:
                for chunk in answer["Body"].iter_chunks(1 << 20):
                    handle.write(chunk)
            os.replace(tmp, objects / name)
            index[key] = {"file": name, "etag": etag, "content_type": answer.get("ContentType")}
            written += 1
    tmp_index = folder / "index.json.partial"
    tmp_index.write_text(json.dumps(index, indent=1, sort_keys=True))
    os.replace(tmp_index, folder / "index.json")
    keep = {entry["file"] for entry in index.values()}
    for path in objects.iterdir():
        if path.name not in keep:
            path.unlink(missing_ok=True)
    if written:
        say(f"saved {written} changed object(s) of s3://{bucket} to {folder}")
    return len(index)
