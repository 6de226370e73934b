"""Checks of a job request against the bucket: the pipeline exists, the input holds something, the data
file is a readable LoadData CSV.

Shared by the ingress Lambda and `cpb submit` (both pass their own boto3 S3
client), so a scientist gets the same error before sending as the Lambda would
log. Problems with the *objects* raise `handlers.schema.MessageError` (the
message is wrong); S3 failures that may pass (throttling, 5xx, network) are
re-raised unchanged so callers retry them.

API
---
`check_pipeline(s3, bucket, key)`           the pipeline object exists and is readable (HEAD)
`read_pipeline(s3, bucket, key) -> PipelineObject`  its bytes, sha256 and parsed modules (None
                                            when it does not parse: the worker then reports why)
`count_image_sets(s3, bucket, key) -> int`  rows of a LoadData CSV, after validating it
`scan_data_file(s3, bucket, key, loaddata_settings) -> DataFileScan`  the same, streamed: rows,
                                            the image sets LoadData makes of them ("Process just a
                                            range of rows"), and `data_rows_sha256` of those rows
`count_input_image_sets(s3, bucket, prefix, pipeline, key) -> (count, listing sha256)`
                                            image sets of an Images/NamesAndTypes pipeline, counted
                                            by the worker's file rules over the input listing
`check_input(s3, bucket, prefix)`           something lies under the input prefix
`check_splittable(s3, bucket, key)`        a pipeline about to be split over array children
                                            carries no state across image sets
`check_request(s3, request, limits, before_call=None) -> CheckedRequest`  all of them for one
                                            `JobRequest`; `before_call(what)` runs before every S3
                                            call and every 256 KiB of a data file (the Lambda's
                                            time-budget check: it raises to stop)

The splittability rules, the LoadData row range and the file-rule counter are the
worker's own (`cpb_worker.pipeline`, `.datafile`, `.filerules`, `.fingerprint`: stdlib
only, shipped in the Lambda package beside `handlers`), so the Lambda counts and refuses
exactly what the worker would count and refuse after starting.

Memory: a data file is streamed (256 KiB reads, one CSV line at a time, lines capped at
`MAX_LINE_CHARS`), so the Lambda's memory does not grow with the file (`bench/bench_ingress_scale.py`).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from cpb_worker import filerules
from cpb_worker.datafile import loaddata_row_range
from cpb_worker.errors import WorkerError
from cpb_worker.fingerprint import data_rows_sha256, input_listing_sha256
from cpb_worker.pipeline import Pipeline, parse_modules, unsplittable_reasons
from handlers.schema import MAX_CHILDREN_PER_RUN, JobRequest, Limits, MessageError

__all__ = ["CheckedRequest", "PipelineObject", "DataFileScan", "check_pipeline", "read_pipeline", "check_input",
           "count_image_sets", "scan_data_file", "count_input_image_sets", "check_splittable", "check_request",
           "MAX_DATA_FILE_BYTES", "MAX_PIPELINE_BYTES", "MAX_LINE_CHARS", "MAX_LISTED_INPUT_FILES"]

#: A LoadData CSV larger than this is refused. Streaming keeps the Lambda's memory flat whatever
#: the size; the cap bounds the TIME one message may take (about 0.5 s per 10 MiB measured by
#: bench/bench_ingress_scale.py, so 64 MiB stays well inside the Lambda's budget) and is 17 M
#: rows of short lines, far beyond a plate (3,456 rows) or a 1,000-plate screen.
MAX_DATA_FILE_BYTES = 64 * 1024 * 1024
#: One physical CSV line longer than this (characters) is refused: it is not a LoadData row, and
#: the streaming reader must not hold an unbounded line in memory.
MAX_LINE_CHARS = 1024 * 1024
#: Input folders with more files than this are not counted by file rules (give a data file).
MAX_LISTED_INPUT_FILES = 200_000
_READ_CHUNK = 256 * 1024
#: Pipelines are a few hundred KiB at most; anything far larger is not a pipeline.
MAX_PIPELINE_BYTES = 16 * 1024 * 1024
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_DENIED = {"403", "AccessDenied", "Forbidden", "AllAccessDisabled", "InvalidObjectState"}


@dataclasses.dataclass(frozen=True)
class CheckedRequest:
    """A request whose objects were found.

    `image_set_count`: the image sets the job runs (LoadData's rows, within its row range), None
    when nothing counted them (no data file and no split). `pipeline_sha256`: of the pipeline
    object read. `data_sha256`: `data_rows_sha256` of the data file's header and image-set rows,
    or `input_listing_sha256` of the input folder when the file rules counted it, else None.
    `data_rows`: rows in the data file (before LoadData's row range). `counted_by`: "data_file",
    "file_rules" or None. `data_etag`: the ETag of the data file object read (what the jobs pin it to).
    """

    request: JobRequest
    image_set_count: Optional[int]
    pipeline_sha256: Optional[str] = None
    data_sha256: Optional[str] = None
    data_rows: Optional[int] = None
    counted_by: Optional[str] = None
    data_etag: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class PipelineObject:
    """A pipeline read from the bucket: `pipeline` is None when its text does not parse."""

    key: str
    sha256: str
    pipeline: Optional[Pipeline]


@dataclasses.dataclass(frozen=True)
class DataFileScan:
    """One pass over a LoadData CSV: `rows` data rows; LoadData skips `skipped` and makes
    `image_sets` image sets of the rest; `data_sha256` covers the header and those rows; `etag` is
    the ETag of the object version read."""

    rows: int
    skipped: int
    image_sets: int
    data_sha256: str
    etag: Optional[str] = None


def _no_check(what: str) -> None:
    return None


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


def read_pipeline(s3: Any, bucket: str, key: str, before_call: Callable[[str], None] = _no_check) -> PipelineObject:
    """GET the pipeline (refusing missing, unreadable, empty, huge) and parse its modules."""
    before_call("read the pipeline")
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except Exception as exc:
        error = _object_error(exc, "pipeline", bucket, key)
        if error is None:
            raise
        raise error from None
    size = int(obj.get("ContentLength", 0))
    if size > MAX_PIPELINE_BYTES:
        obj["Body"].close()
        raise MessageError("pipeline", f"s3://{bucket}/{key} is {size} bytes, too large for a pipeline; "
                                       "check the key points at the .cppipe")
    raw = obj["Body"].read(MAX_PIPELINE_BYTES + 1)
    if not raw:
        raise MessageError("pipeline", f"s3://{bucket}/{key} is empty; upload the saved .cppipe again")
    sha256 = hashlib.sha256(raw).hexdigest()
    try:
        pipeline: Optional[Pipeline] = Pipeline(path=key, sha256=sha256, modules=parse_modules(raw.decode("utf-8"), key))
    except (UnicodeDecodeError, WorkerError):
        pipeline = None  # the worker fails the job with the parse error in its run record
    return PipelineObject(key=key, sha256=sha256, pipeline=pipeline)


def count_image_sets(s3: Any, bucket: str, key: str) -> int:
    """Validate a LoadData CSV and return its number of data rows (streamed; see `scan_data_file`)."""
    return scan_data_file(s3, bucket, key).rows


class _TooLarge(Exception):
    pass


class _HasNul(Exception):
    pass


class _Stream(io.RawIOBase):
    """The S3 body as a raw stream for `io.BufferedReader`: counts bytes, refuses NUL bytes and
    more than `limit` bytes, and calls `before_chunk()` before every read (the time budget)."""

    def __init__(self, body: Any, limit: int, before_chunk: Callable[[], None]) -> None:
        super().__init__()
        self.body, self.limit, self.before_chunk, self.total = body, limit, before_chunk, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.before_chunk()
        data = self.body.read(len(buffer))
        self.total += len(data)
        if self.total > self.limit:
            raise _TooLarge()
        if b"\x00" in data:
            raise _HasNul()
        buffer[: len(data)] = data
        return len(data)


def scan_data_file(s3: Any, bucket: str, key: str, loaddata_settings: Optional[dict] = None,
                   before_call: Callable[[str], None] = _no_check) -> DataFileScan:
    """Validate a LoadData CSV in one streaming pass and count its image sets as LoadData does.

    Refuses what would make CellProfiler fail later or split wrongly: not UTF-8, NUL bytes, no
    header, repeated or empty column names, no image column, rows whose field count differs from
    the header, no rows, no rows inside LoadData's "Process just a range of rows". Memory stays
    flat: 256 KiB reads, one line at a time.
    """
    where = f"s3://{bucket}/{key}"
    settings = dict(loaddata_settings or {})
    try:
        # The row range as LoadData applies it (the worker's rule): rows skipped+1 .. skipped+n.
        skipped, most = loaddata_row_range(10 ** 15, settings)
    except WorkerError as exc:
        raise MessageError("pipeline", f"{exc.reason} (in its LoadData module); fix the setting and save the "
                                       "pipeline again") from None
    before_call("read the data file")
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except Exception as exc:
        error = _object_error(exc, "data_file", bucket, key)
        if error is None:
            raise
        raise error from None

    def bad(reason: str) -> MessageError:
        return MessageError("data_file", f"{where} {reason}")

    size = int(obj.get("ContentLength", 0))
    if size > MAX_DATA_FILE_BYTES:
        obj["Body"].close()
        raise bad(f"is {size} bytes, more than the {MAX_DATA_FILE_BYTES} a data file may have; split the plate "
                  "into several data files")
    raw = _Stream(obj["Body"], MAX_DATA_FILE_BYTES, lambda: before_call("read the data file"))
    text = io.TextIOWrapper(io.BufferedReader(raw, buffer_size=_READ_CHUNK), encoding="utf-8-sig", newline="")
    line_number = [0]
    bare_cr = [None]  # the line number when the last line read ended with a carriage return alone

    def lines() -> Iterator[str]:
        while True:
            line = text.readline(MAX_LINE_CHARS + 1)
            if not line:
                return
            line_number[0] += 1
            if len(line) > MAX_LINE_CHARS:
                raise bad(f"line {line_number[0]} is longer than {MAX_LINE_CHARS} characters; it is not a "
                          "LoadData row (is this the right file?)")
            bare_cr[0] = line_number[0] if line.endswith("\r") else None
            yield line

    def records() -> Iterator[list]:
        """The CSV records; one ended by a carriage return alone (old Mac Excel) and followed by more is
        refused: the worker, like most CSV tools, ends records at line feeds only."""
        ended_at = None
        for record in reader:
            if ended_at is not None:
                raise bad(f"ends its lines with a carriage return alone (line {ended_at}; old Mac Excel \"CSV\"): "
                          "save it as CSV UTF-8 (line feed or CR LF line endings)")
            ended_at = bare_cr[0]
            yield record

    reader = csv.reader(lines(), strict=True)
    rows_read = records()
    counts = {"rows": 0}
    try:
        header = next(rows_read, None)
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

        def image_set_rows() -> Iterator[list]:
            for row in rows_read:
                if not any(cell.strip(" \t\r\n") for cell in row):
                    continue  # blank lines (no cell but spaces and tabs) are not image sets: the worker's rule
                if len(row) != len(names):
                    raise bad(f"line {reader.line_num} has {len(row)} fields but the header has {len(names)}; "
                              "fix that row (a missing or extra comma?)")
                counts["rows"] += 1
                if skipped < counts["rows"] <= skipped + most:
                    yield row

        digest = data_rows_sha256(names, image_set_rows())
    except csv.Error as exc:
        raise bad(f"is not a well-formed CSV near line {reader.line_num} ({exc}); fix the quoting") from None
    except UnicodeDecodeError:
        raise bad(f"is not UTF-8 text (near line {line_number[0] + 1}); save it as a UTF-8 CSV") from None
    except _HasNul:
        raise bad("contains NUL bytes, so it is not a text CSV; export it again as CSV") from None
    except _TooLarge:
        raise bad(f"is larger than {MAX_DATA_FILE_BYTES} bytes; split it into several data files") from None
    finally:
        obj["Body"].close()
    rows = counts["rows"]
    if rows == 0:
        raise bad("has a header but no image set rows; add one row per image set")
    skipped, image_sets = loaddata_row_range(rows, settings)
    if image_sets == 0:
        chosen = settings.get("Rows to process", "")
        raise bad(f"has {rows} rows but the pipeline's LoadData processes only rows {chosen}, so no image set "
                  "would run; widen 'Rows to process' or turn 'Process just a range of rows' off")
    return DataFileScan(rows=rows, skipped=skipped, image_sets=image_sets, data_sha256=digest, etag=obj.get("ETag"))


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
    _refuse_unsplittable(read_pipeline(s3, bucket, key), bucket)


def _refuse_unsplittable(pipeline: PipelineObject, bucket: str) -> None:
    if pipeline.pipeline is None:
        return
    reasons = unsplittable_reasons(pipeline.pipeline)
    if reasons:
        raise MessageError("image_sets_per_job", f"s3://{bucket}/{pipeline.key} cannot be split across array jobs: "
                                                 f"{'; '.join(reasons)}; remove image_sets_per_job to run "
                                                 "it as one job")


_GIVE_DATA_FILE = ("give a LoadData data file (data_file; `cpb loaddata` writes one from the image names) or "
                   "drop image_sets_per_job to run one job")


def count_input_image_sets(s3: Any, bucket: str, prefix: str, pipeline: PipelineObject,
                           before_call: Callable[[str], None] = _no_check) -> tuple:
    """(image sets, input_listing_sha256) of a pipeline without a data file, counted by the worker's
    own file-rule counter (`cpb_worker.filerules.count_image_sets`) over the input listing.

    The counter is the worker's own, on the listing of the tree the worker later counts (and checks
    against CellProfiler's own count), so the two cannot disagree. Where the counter
    cannot tell (rule forms it does not evaluate, metadata it cannot match, several images per file)
    the message is refused with the fix: a data file.
    """
    where = f"s3://{bucket}/{pipeline.key}"
    if pipeline.pipeline is None:
        raise MessageError("image_sets_per_job", f"{where} cannot be read as a CellProfiler pipeline, so its image "
                                                 f"sets cannot be counted; {_GIVE_DATA_FILE}")
    if pipeline.pipeline.has("LoadData"):
        raise MessageError("image_sets_per_job", f"{where} loads its images with LoadData: give that CSV as "
                                                 "data_file so its rows can be counted and split")
    files = []
    token = None
    base = prefix.rstrip("/") + "/"
    while True:
        before_call("list the input folder")
        kwargs = {"Bucket": bucket, "Prefix": base}
        if token:
            kwargs["ContinuationToken"] = token
        try:
            page = s3.list_objects_v2(**kwargs)
        except Exception as exc:
            error = _object_error(exc, "input", bucket, base)
            if error is None:
                raise
            raise error from None
        for item in page.get("Contents", []):
            relative = item["Key"][len(base):]
            if relative and not relative.endswith("/"):  # "folder/" markers hold no image
                files.append((relative, int(item.get("Size", 0))))
        if len(files) > MAX_LISTED_INPUT_FILES:
            raise MessageError("image_sets_per_job", f"s3://{bucket}/{base} holds more than {MAX_LISTED_INPUT_FILES} "
                                                     f"files, too many to count by file rules; {_GIVE_DATA_FILE}")
        token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
        if not token:
            break
    if not files:
        raise MessageError("input", f"nothing under s3://{bucket}/{base}; upload the images there or fix the prefix")
    count = _count_on_mirror(pipeline.pipeline, [key for key, _ in files])
    if not count:
        raise MessageError("image_sets_per_job", f"the image sets of {where} cannot be counted exactly from its "
                                                 f"file rules over s3://{bucket}/{base}; {_GIVE_DATA_FILE}")
    return count, input_listing_sha256(files)


def _count_on_mirror(pipeline: Pipeline, keys: list) -> Optional[int]:
    """The worker's file-rule count of the input listing `keys` (relative, '/'-separated).

    `filerules.count_image_sets_in_listing` (the worker branch's listing entry point) when this
    cpb_worker has it; else `filerules.count_image_sets` over a temporary tree of empty files named
    like `keys` (the same evaluation; delete this fallback once every cpb_worker has the former)."""
    in_listing = getattr(filerules, "count_image_sets_in_listing", None)
    if in_listing is not None:
        if any(part in ("", ".", "..") for key in keys for part in key.split("/")):
            return None
        return in_listing(pipeline, keys)
    with tempfile.TemporaryDirectory(prefix="cpb-listing-") as root:
        for key in keys:
            parts = key.split("/")
            if any(part in ("", ".", "..") for part in parts):
                return None  # a key no file system can hold as is: the worker's view is not certain
            path = os.path.join(root, *parts)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError:  # a name too long for a file system, a file where a folder should be...
                return None
        return filerules.count_image_sets(pipeline, Path(root))


def check_request(s3: Any, request: JobRequest, limits: Limits,
                  before_call: Callable[[str], None] = _no_check) -> CheckedRequest:
    """Run the bucket checks of one request and size its array job.

    Without a data file the input prefix must hold something (and, to split, its image sets must be
    countable by file rules); with one, the CSV names the images (possibly under other prefixes), so
    it is the check, counted as LoadData counts it (its "Process just a range of rows" included).
    """
    pipeline = read_pipeline(s3, limits.bucket, request.pipeline, before_call)
    count = data_sha256 = rows = counted_by = data_etag = None
    if request.data_file is not None:
        loaddata = pipeline.pipeline.enabled("LoadData") if pipeline.pipeline is not None else []
        scan = scan_data_file(s3, limits.bucket, request.data_file, dict(loaddata[0].settings) if loaddata else None,
                              before_call)
        count, data_sha256, rows, counted_by = scan.image_sets, scan.data_sha256, scan.rows, "data_file"
        data_etag = scan.etag
    elif request.image_sets_per_job is not None:
        count, data_sha256 = count_input_image_sets(s3, limits.bucket, request.input, pipeline, before_call)
        counted_by = "file_rules"
    else:
        before_call("look at the input folder")
        check_input(s3, limits.bucket, request.input)
    if request.image_sets_per_job is not None and count is not None:
        children = -(-count // request.image_sets_per_job)
        if children > MAX_CHILDREN_PER_RUN:
            smallest = -(-count // MAX_CHILDREN_PER_RUN)
            raise MessageError("image_sets_per_job", f"{request.image_sets_per_job} makes {children} array "
                                                     f"children for {count} image sets, more than the "
                                                     f"{MAX_CHILDREN_PER_RUN} one run may have; use at least "
                                                     f"{smallest}")
        if children > 1:
            _refuse_unsplittable(pipeline, limits.bucket)
    return CheckedRequest(request=request, image_set_count=count, pipeline_sha256=pipeline.sha256,
                          data_sha256=data_sha256, data_rows=rows, counted_by=counted_by, data_etag=data_etag)
