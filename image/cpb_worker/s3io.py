"""S3 transfers for the worker: concurrent, retried, and classified.

botocore already retries throttling and 5xx responses (adaptive mode); on top
of that each whole-file transfer is retried with backoff, because a transfer
can also fail midway (connection reset, SlowDown on one multipart part).
Failures are sorted into the contract's exit codes: a missing key or a
denied bucket is bad input (no retry helps), anything else that outlasts the
retries is transient (exit 4, Batch retries the job).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, TypeVar

from .errors import BadInput, Transient

T = TypeVar("T")

_PERMANENT = ("NoSuchKey", "404", "NotFound", "NoSuchBucket", "AccessDenied", "403", "InvalidAccessKeyId",
              "AllAccessDisabled", "InvalidBucketName")
#: What S3 answers a conditional read (IfMatch) of an object that is not that version any more.
_CHANGED = ("PreconditionFailed", "412")
_CONTENT_TYPES = {".csv": "text/csv", ".json": "application/json", ".log": "text/plain", ".png": "image/png",
                  ".tif": "image/tiff", ".tiff": "image/tiff", ".jpg": "image/jpeg", ".txt": "text/plain"}


def make_client(env: Mapping[str, str]):  # noqa: ANN201 - boto3 client type is dynamic
    """An S3 client with botocore's adaptive retries; honours AWS_ENDPOINT_URL (moto, tests)."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": int(env.get("CPB_S3_MAX_ATTEMPTS", "8")), "mode": "adaptive"},
                    connect_timeout=10, read_timeout=120, max_pool_connections=64)
    kwargs = {}
    if env.get("AWS_ENDPOINT_URL"):
        kwargs["endpoint_url"] = env["AWS_ENDPOINT_URL"]
    return boto3.client("s3", config=config, **kwargs)


def safe_key_path(root: Path, key: str) -> Path:
    """Where `key` is stored under root; refuses keys that would escape it."""
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or any(p in ("..", "") for p in parts):
        raise BadInput(f"S3 key {key!r} is not a plain relative key (no leading '/', no '..')")
    return root.joinpath(*parts)


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _is_permanent(exc: BaseException) -> bool:
    code = _error_code(exc)
    if code:
        return code in _PERMANENT
    text = str(exc)
    return any(f"({c})" in text or f"An error occurred ({c})" in text for c in _PERMANENT)


@dataclass
class S3IO:
    """Transfers to and from one bucket with the worker's retry policy."""

    client: object
    bucket: str
    attempts: int = 4
    base_delay: float = 0.5
    concurrency: int = 16

    def _retry(self, what: str, action: Callable[[], T]) -> T:
        last: Optional[BaseException] = None
        for attempt in range(self.attempts):
            try:
                return action()
            except Exception as exc:  # botocore/boto3/network errors share no base class
                if _is_permanent(exc):
                    code = _error_code(exc) or str(exc)[:80]
                    if "NoSuchKey" in code or "404" in code or "NotFound" in code or "Not Found" in str(exc):
                        raise BadInput(f"{what}: s3://{self.bucket} has no such key ({code})") from None
                    raise BadInput(f"{what}: access to s3://{self.bucket} failed ({code}); check the "
                                   "bucket name and the job role's permissions") from None
                last = exc
                if attempt + 1 < self.attempts:
                    time.sleep(self.base_delay * (2 ** attempt))
        raise Transient(f"{what}: S3 still failing after {self.attempts} attempts: "
                        f"{type(last).__name__}: {str(last)[:200]}")

    def _transfer_config(self):  # noqa: ANN202
        from boto3.s3.transfer import TransferConfig
        return TransferConfig(max_concurrency=8, multipart_threshold=64 * 1024 * 1024,
                              multipart_chunksize=16 * 1024 * 1024)

    def download(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        config = self._transfer_config()

        def action() -> Path:
            self.client.download_file(self.bucket, key, str(tmp), Config=config)
            os.replace(tmp, dest)
            return dest

        return self._retry(f"download s3://{self.bucket}/{key}", action)

    def download_if_match(self, key: str, dest: Path, etag: str) -> Optional[Path]:
        """Download `key` only while it is the object version `etag` (GetObject IfMatch); None when
        it has changed since (S3 answers 412)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")

        def action() -> Optional[Path]:
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=etag)
            except Exception as exc:
                if _error_code(exc) in _CHANGED:
                    return None
                raise
            with open(tmp, "wb") as out:
                shutil.copyfileobj(response["Body"], out, 1024 * 1024)
            os.replace(tmp, dest)
            return dest

        return self._retry(f"download s3://{self.bucket}/{key}", action)

    def head(self, key: str) -> Dict:
        """HeadObject of `key` (its ETag, ContentLength...)."""
        return self._retry(f"look at s3://{self.bucket}/{key}",
                           lambda: self.client.head_object(Bucket=self.bucket, Key=key))

    def download_many(self, pairs: Iterable[Tuple[str, Path]]) -> List[Path]:
        """Download (key, dest) pairs concurrently; each file retried on its own."""
        pairs = list(dict.fromkeys(pairs))
        if not pairs:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(pairs))) as pool:
            return list(pool.map(lambda kd: self.download(kd[0], kd[1]), pairs))

    def list_keys(self, prefix: str) -> List[str]:
        def action() -> List[str]:
            keys: List[str] = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", []))
            return keys

        return self._retry(f"list s3://{self.bucket}/{prefix}", action)

    def sizes(self, prefix: str) -> Dict[str, int]:
        """{key: size} of every object under prefix (one LIST per 1000 keys)."""
        def action() -> Dict[str, int]:
            found: Dict[str, int] = {}
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                found.update({item["Key"]: int(item["Size"]) for item in page.get("Contents", [])})
            return found

        return self._retry(f"list s3://{self.bucket}/{prefix}", action)

    def upload(self, path: Path, key: str) -> None:
        extra = {"ContentType": _CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")}
        config = self._transfer_config()
        self._retry(f"upload s3://{self.bucket}/{key}",
                    lambda: self.client.upload_file(str(path), self.bucket, key, ExtraArgs=extra, Config=config))

    def upload_many(self, pairs: Iterable[Tuple[Path, str]]) -> None:
        pairs = list(pairs)
        if not pairs:
            return
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(pairs))) as pool:
            list(pool.map(lambda pk: self.upload(pk[0], pk[1]), pairs))

    def put_json(self, key: str, payload: Dict) -> None:
        body = (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")
        self._retry(f"write s3://{self.bucket}/{key}",
                    lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                                   ContentType="application/json"))

    def get_json(self, key: str) -> Optional[Dict]:
        """The JSON object at key, or None when there is none."""
        def action() -> Optional[Dict]:
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key)
            except Exception as exc:
                if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise
            try:
                return json.loads(response["Body"].read().decode("utf-8"))
            except ValueError:
                return None  # a corrupt record vouches for nothing

        return self._retry(f"read s3://{self.bucket}/{key}", action)

    def get_json_many(self, keys: Iterable[str]) -> List[Optional[Dict]]:
        """get_json of each key, concurrently, in order."""
        keys = list(keys)
        if not keys:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(keys))) as pool:
            return list(pool.map(self.get_json, keys))

    def delete_keys(self, keys: Iterable[str]) -> None:
        keys = sorted(set(keys))
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start:start + 1000]]
            self._retry(f"delete {len(chunk)} stale objects in s3://{self.bucket}",
                        lambda: self.client.delete_objects(Bucket=self.bucket,
                                                           Delete={"Objects": chunk, "Quiet": True}))
