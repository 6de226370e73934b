"""Checks of a job request against the bucket: the pipeline exists, the input holds something, the data
file is a readable LoadData CSV.

Shared by the ingress Lambda and `cpb submit` (both pass their own boto3 S3
client), so a scientist gets the same error before sending as the Lambda would
log. Problems with the *objects* raise `handlers.schema.MessageError` (the
message is wrong); S3 failures that may pass (throttling, 5xx, network) are
re-raised unchanged so callers retry them.

API
---
`check_pipeline(s3, bucket, key)`           the pipeline object exists and is readable
`count_image_sets(s3, bucket, key) -> int`  rows of a LoadData CSV, after validating it
`check_input(s3, bucket, prefix)`           something lies under the input prefix
`check_splittable(s3, bucket, key)`        a pipeline about to be split over array children
                                            carries no state across image sets
`check_request(s3, request, limits) -> CheckedRequest`  all of them for one `JobRequest`
                                            (input only without a data file)

The splittability rules are the worker's own (`cpb_worker.pipeline`, stdlib
only, shipped in the Lambda package beside `handlers`), so the Lambda refuses
exactly what an array child would otherwise refuse after starting.
"""
from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any, Optional

from cpb_worker.errors import WorkerError
from cpb_worker.pipeline import Pipeline, parse_modules, unsplittable_reasons
from handlers.schema import MAX_ARRAY_SIZE, JobRequest, Limits, MessageError

__all__ = ["CheckedRequest", "check_pipeline", "check_input", "count_image_sets", "check_splittable", "check_request",
           "MAX_DATA_FILE_BYTES", "MAX_PIPELINE_BYTES"]

#: A LoadData CSV larger than this is refused (the Lambda reads it into memory to count rows).
MAX_DATA_FILE_BYTES = 64 * 1024 * 1024
#: Pipelines are a few hundred KiB at most; anything far larger is not a pipeline.
MAX_PIPELINE_BYTES = 16 * 1024 * 1024
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_DENIED = {"403", "AccessDenied", "Forbidden", "AllAccessDisabled", "InvalidObjectState"}


@dataclasses.dataclass(frozen=True)
class CheckedRequest:
    """A request whose objects were found; `image_set_count` is None without a data file."""

    request: JobRequest
    image_set_count: Optional[int]


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _object_error(exc: Exception, field: str, bucket: str, key: str) -> Optional[MessageError]:
    """The message's fault (missing / unreadable object) as a MessageError; None when S3 itself failed."""
    code = _code(exc)
    if code in _MISSING:
        return MessageError(field, f"s3://{bucket}/{key} does not exist; upload it or fix the key")
    if code in _DENIED:
        return MessageError(field, f"s3://{bucket}/{key} cannot be read ({code}); check the key, its storage "
                                   "class (restore Glacier objects first) and that it is in the stack's bucket")
    return None


def check_pipeline(s3: Any, bucket: str, key: str) -> None:
    """Fail when the pipeline object is missing, unreadable, empty or implausibly large."""
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except Exception as exc:  # botocore ClientError; S3 outages re-raised for retry
        error = _object_error(exc, "pipeline", bucket, key)
        if error is None:
            raise
        raise error from None
    size = int(head.get("ContentLength", 0))
    if size == 0:
        raise MessageError("pipeline", f"s3://{bucket}/{key} is empty; upload the saved .cppipe again")
    if size > MAX_PIPELINE_BYTES:
        raise MessageError("pipeline", f"s3://{bucket}/{key} is {size} bytes, too large for a pipeline; "
                                       "check the key points at the .cppipe")


def count_image_sets(s3: Any, bucket: str, key: str) -> int:
    """Validate a LoadData CSV and return its number of image sets (data rows).

    Refuses what would make CellProfiler fail later or split wrongly: not
    UTF-8, NUL bytes, no header, repeated or empty column names, no image
    column, rows whose field count differs from the header, no rows.
    """
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except Exception as exc:
        error = _object_error(exc, "data_file", bucket, key)
        if error is None:
            raise
        raise error from None
    size = int(obj.get("ContentLength", 0))
    if size > MAX_DATA_FILE_BYTES:
        obj["Body"].close()
        raise MessageError("data_file", f"s3://{bucket}/{key} is {size} bytes, more than the "
                                        f"{MAX_DATA_FILE_BYTES} a data file may have; split the plate into "
                                        "several data files")
    raw = obj["Body"].read(MAX_DATA_FILE_BYTES + 1)
    return _count_rows(raw, f"s3://{bucket}/{key}")


def _count_rows(raw: bytes, where: str) -> int:
    def bad(reason: str) -> MessageError:
        return MessageError("data_file", f"{where} {reason}")

    if len(raw) > MAX_DATA_FILE_BYTES:
        raise bad(f"is larger than {MAX_DATA_FILE_BYTES} bytes; split it into several data files")
    if b"\x00" in raw:
        raise bad("contains NUL bytes, so it is not a text CSV; export it again as CSV")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise bad(f"is not UTF-8 text (byte {exc.start}); save it as a UTF-8 CSV") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if not header or not any(column.strip() for column in header):
            raise bad("has no header row; the first line must name the LoadData columns")
        names = [column.strip() for column in header]
        if any(not name for name in names):
            raise bad(f"has an empty column name in its header (column {names.index('') + 1}); name every column")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise bad(f"repeats the column(s) {', '.join(repeated)} in its header; keep each column once")
        if not any(("FileName_" in name or "URL_" in name) for name in names):
            raise bad("has no image column (Image_FileName_<channel> or Image_URL_<channel>); LoadData "
                      "would load no images")
        rows = 0
        for row in reader:
            if not row or not any(cell.strip() for cell in row):
                continue  # blank lines are skipped by LoadData too
            if len(row) != len(names):
                raise bad(f"line {reader.line_num} has {len(row)} fields but the header has {len(names)}; "
                          "fix that row (a missing or extra comma?)")
            rows += 1
    except csv.Error as exc:
        raise bad(f"is not a well-formed CSV near line {reader.line_num} ({exc}); fix the quoting") from None
    if rows == 0:
        raise bad("has a header but no image set rows; add one row per image set")
    return rows


def check_input(s3: Any, bucket: str, prefix: str) -> None:
    """Fail when nothing lies under the input prefix (a typo would otherwise run CellProfiler on nothing)."""
    try:
        listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/", MaxKeys=1)
    except Exception as exc:
        error = _object_error(exc, "input", bucket, prefix + "/")
        if error is None:
            raise
        raise error from None
    if not (listing.get("KeyCount") or listing.get("Contents")):
        raise MessageError("input", f"nothing under s3://{bucket}/{prefix}/; upload the images there or fix "
                                    "the prefix")


def check_splittable(s3: Any, bucket: str, key: str) -> None:
    """Refuse to split a pipeline that carries state across image sets (TrackObjects, Crop from the
    first set, illumination over all images, grouping...): its array children would each see only
    their own range and produce silently wrong results.

    A pipeline that cannot be parsed is left to the worker, which fails the job with the parse error
    in its run record (the scientist then sees it in `cpb status`).
    """
    try:
        raw = s3.get_object(Bucket=bucket, Key=key)["Body"].read(MAX_PIPELINE_BYTES + 1)
    except Exception as exc:
        error = _object_error(exc, "pipeline", bucket, key)
        if error is None:
            raise
        raise error from None
    try:
        modules = parse_modules(raw.decode("utf-8"), key)
    except (UnicodeDecodeError, WorkerError):
        return
    reasons = unsplittable_reasons(Pipeline(path=key, sha256="", modules=modules))
    if reasons:
        raise MessageError("image_sets_per_job", f"s3://{bucket}/{key} cannot be split across array jobs: "
                                                 f"{'; '.join(reasons)}; remove image_sets_per_job to run "
                                                 "it as one job")


def check_request(s3: Any, request: JobRequest, limits: Limits) -> CheckedRequest:
    """Run the bucket checks of one request and size its array job.

    Without a data file the input prefix must hold something; with one, the
    CSV names the images (possibly under other prefixes), so it is the check.
    """
    check_pipeline(s3, limits.bucket, request.pipeline)
    count = None
    if request.data_file is None:
        check_input(s3, limits.bucket, request.input)
    else:
        count = count_image_sets(s3, limits.bucket, request.data_file)
        if request.image_sets_per_job is not None:
            children = -(-count // request.image_sets_per_job)
            if children > MAX_ARRAY_SIZE:
                smallest = -(-count // MAX_ARRAY_SIZE)
                raise MessageError("image_sets_per_job", f"{request.image_sets_per_job} makes {children} array "
                                                         f"children for {count} image sets, more than Batch's "
                                                         f"{MAX_ARRAY_SIZE}; use at least {smallest}")
            if children > 1:
                check_splittable(s3, limits.bucket, request.pipeline)
    return CheckedRequest(request=request, image_set_count=count)
