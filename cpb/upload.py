"""Upload a local folder to the bucket, skipping what is already there.

Plates are large and uploads get interrupted; re-running `cpb submit
--upload` must only send what changed. A file is "already there" when the
object has the same size and the same SHA-256. The digest is stored as object
metadata (`sha256`, hex, whole file) because S3's own ChecksumSHA256 of a
multipart upload is a checksum of part checksums, not of the file; S3's
checksum is still requested on upload so S3 verifies the bytes it received.
"""
from __future__ import annotations

import base64
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

_TRANSFER = TransferConfig(multipart_threshold=64 * 1024 * 1024, max_concurrency=4)
_CHUNK = 1024 * 1024


@dataclass
class UploadReport:
    """What an upload did, so the CLI can say it and tests can check it."""

    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    bytes_sent: int = 0


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (images can be big)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def join_key(prefix: str, relative: str) -> str:
    """`prefix/relative` without doubled or leading slashes."""
    prefix = prefix.strip("/")
    return f"{prefix}/{relative}" if prefix else relative


def local_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files to upload, hidden files ignored) under `folder`, sorted.

    Hidden files (`.DS_Store`, editor swap files) are not images; they are
    listed back to the user rather than dropped without a word.
    """
    keep, hidden = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        (hidden if any(part.startswith(".") for part in relative.parts) else keep).append(path)
    return keep, hidden


def compare(s3, bucket: str, key: str, size: int, sha256_hex: str) -> str:
    """`same` when s3://bucket/key already holds exactly these bytes, else `missing` or `changed`."""
    try:
        head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return "missing"
        raise
    if head.get("ContentLength") != size:
        return "changed"
    if head.get("Metadata", {}).get("sha256") == sha256_hex:
        return "same"
    s3_checksum = head.get("ChecksumSHA256", "")
    return "same" if s3_checksum == base64.b64encode(bytes.fromhex(sha256_hex)).decode() else "changed"


def is_same(s3, bucket: str, key: str, size: int, sha256_hex: str) -> bool:
    """True when s3://bucket/key already holds exactly these bytes."""
    return compare(s3, bucket, key, size, sha256_hex) == "same"


def compare_files(s3, bucket: str, pairs: Iterable[tuple[Path, str]], workers: int = 8,
                  progress: Optional[Callable[[int], None]] = None) -> list[str]:
    """`compare` for many (local path, key) pairs, `workers` at a time; answers in the order given.
    `progress` is told each file done (a plate is thousands of files to hash)."""
    lock = threading.Lock()

    def one(pair: tuple[Path, str]) -> str:
        path, key = pair
        answer = compare(s3, bucket, key, path.stat().st_size, sha256_file(path))
        if progress:
            with lock:
                progress(1)
        return answer
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, list(pairs)))


def upload_file(s3, bucket: str, path: Path, key: str, sha256_hex: Optional[str] = None,
                callback: Optional[Callable[[int], None]] = None) -> None:
    """Upload one file with its digest in metadata and S3 checksum verification."""
    digest = sha256_hex or sha256_file(path)
    s3.upload_file(str(path), bucket, key, Config=_TRANSFER, Callback=callback,
                   ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": digest}})


def upload_files(s3, bucket: str, pairs: Iterable[tuple[Path, str]],
                 progress: Optional[Callable[[int], None]] = None, workers: int = 8) -> UploadReport:
    """Upload (local path, key) pairs, skipping unchanged objects, `workers` files at a time.

    A plate is thousands of small TIFFs: one request at a time would leave
    the link idle, so files go in parallel (boto3 clients are thread-safe).
    `progress` receives byte counts (skipped files count as done) so one bar
    covers the whole transfer. The report lists keys in the order given.
    """
    pairs = list(pairs)
    lock = threading.Lock()

    def tick(n: int) -> None:
        if progress:
            with lock:
                progress(n)

    def one(pair: tuple[Path, str]) -> tuple[str, bool, int]:
        path, key = pair
        size = path.stat().st_size
        digest = sha256_file(path)
        if is_same(s3, bucket, key, size, digest):
            tick(size)
            return key, False, size
        upload_file(s3, bucket, path, key, digest, callback=tick)
        return key, True, size

    report = UploadReport()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for key, sent, size in pool.map(one, pairs):
            if sent:
                report.uploaded.append(key)
                report.bytes_sent += size
            else:
                report.skipped.append(key)
    return report


def upload_folder(s3, bucket: str, folder: Path, prefix: str,
                  progress: Optional[Callable[[int], None]] = None) -> UploadReport:
    """Upload every (non-hidden) file under `folder` to `prefix/<relative path>`."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--upload {folder}: not a folder")
    files, hidden = local_files(folder)
    pairs = [(p, join_key(prefix, p.relative_to(folder).as_posix())) for p in files]
    report = upload_files(s3, bucket, pairs, progress)
    report.ignored = [p.relative_to(folder).as_posix() for p in hidden]
    return report


def total_bytes(paths: Iterable[Path]) -> int:
    """Sum of file sizes, for sizing a progress bar."""
    return sum(p.stat().st_size for p in paths)
