"""Outputs and folders as scientists paste them: a key prefix, or a URL of the stack's bucket.

`cpb submit` prints `results: s3://<bucket>/<output>/`; every command that takes an output (or an
S3 folder) accepts that URL back, the plain prefix, and the S3 web addresses people copy from the
console or a browser. A URL of ANOTHER bucket is refused in one line naming both buckets: read as a
prefix of this stack's bucket, it once waited forever (`s3://b/s3://b/...: WAITING`).

Forms (docs/CONTRACTS.md, "Client: outputs and URLs"):
  results/p1   results/p1/                           a key prefix in the stack's bucket
  s3://<bucket>/results/p1[/]                        what `cpb submit` prints
  https://<bucket>.s3[.<region>].amazonaws.com/results/p1/     virtual-hosted web address
  https://s3[.<region>].amazonaws.com/<bucket>/results/p1/     path-style web address
  https://s3.console.aws.amazon.com/s3/buckets/<bucket>?prefix=results/p1/   the S3 console
"""
from __future__ import annotations

import re
from typing import Optional
from urllib.parse import parse_qs, unquote, urlparse


class UrlError(ValueError):
    """An output or folder argument that does not name a prefix of this stack's bucket."""


_VIRTUAL = re.compile(r"^(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])\.s3[.-]?(?:[a-z0-9-]*\.)?amazonaws\.com$")
_PATH_STYLE = re.compile(r"^s3[.-]?(?:[a-z0-9-]*\.)?amazonaws\.com$")


def split_url(text: str) -> Optional[tuple[str, str]]:
    """(bucket, key prefix) of an S3 URL or web address; None when `text` is not a URL."""
    value = text.strip()
    lowered = value.lower()
    if lowered.startswith("s3://"):
        rest = value[5:]
        bucket, _, key = rest.partition("/")
        return bucket, key
    if not lowered.startswith(("https://", "http://")):
        return None
    parsed = urlparse(value)
    host = (parsed.hostname or "").lower()
    if host.startswith("s3.console.aws.amazon.com") or host.endswith(".console.aws.amazon.com"):
        match = re.search(r"/s3/(?:buckets|object)/([^/?#]+)", parsed.path)
        if not match:
            raise UrlError(f"{text}: an S3 console address without a bucket; copy the folder's S3 URI "
                           "(s3://...) instead")
        prefix = parse_qs(parsed.query).get("prefix", [""])[0]
        return match.group(1), prefix
    virtual = _VIRTUAL.match(host)
    if virtual:
        return virtual.group("bucket"), unquote(parsed.path.lstrip("/"))
    if _PATH_STYLE.match(host):
        bucket, _, key = unquote(parsed.path.lstrip("/")).partition("/")
        return bucket, key
    raise UrlError(f"{text}: not an S3 address; give the output prefix (results/p1) or its s3:// URL")


def clean_prefix(prefix: str, original: str, what: str = "output") -> str:
    """A key prefix without leading/trailing slashes; refuses '.', '..' and empty segments."""
    key = prefix.strip().strip("/")
    if not key:
        raise UrlError(f"{original}: names no {what} prefix; give e.g. results/plate1")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UrlError(f"{original}: '{key}' has an empty, '.' or '..' folder; give the plain prefix")
    if "\\" in key:
        raise UrlError(f"{original}: contains a backslash; S3 prefixes use '/' between folders")
    return key


def to_prefix(text: str, bucket: str, what: str = "output", source: str = "") -> str:
    """The key prefix `text` names in `bucket` (the stack's), whatever form it was pasted in.

    `source` says where the stack's bucket came from (e.g. "$CPB_BUCKET") for the error line."""
    split = split_url(text)
    if split is None:
        return clean_prefix(text, text, what)
    url_bucket, key = split
    if url_bucket != bucket:
        where = f" (from {source})" if source else ""
        raise UrlError(f"{text} is in bucket '{url_bucket or '?'}', but this stack's bucket is '{bucket}'{where}: "
                       f"give a prefix of s3://{bucket}/, or point cpb at the other stack (--stack / --bucket)")
    return clean_prefix(key, text, what)


def s3_url(bucket: str, prefix: str) -> str:
    """`s3://<bucket>/<prefix>/`, the form `cpb submit` prints."""
    return f"s3://{bucket}/{prefix.strip('/')}/"
