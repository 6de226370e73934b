"""LoadData CSVs: count image sets, find the image files a range needs,
and rewrite image locations to where the worker staged them.

A LoadData CSV names each image set's files in `Image_FileName_<name>` plus
`Image_PathName_<name>` (a folder), or in `Image_URL_<name>`. Relative or
absent folders are relative to the input folder. In S3 mode the worker
downloads only the rows of its range and points the CSV at local copies.
"""
from __future__ import annotations

import codecs
import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Optional, Tuple
from urllib.parse import unquote, urlparse

from .errors import BadInput

_KINDS = ("Image_FileName_", "Image_PathName_", "Image_URL_",
          "Image_ObjectsFileName_", "Image_ObjectsPathName_", "Image_ObjectsURL_")


@dataclass
class DataFile:
    """Rows of a LoadData CSV held in memory: all of them, or (an array child) only its own.

    `rows[0]` is data row `row_offset + 1` of the file (blank lines are not rows);
    `total` is the number of data rows in the whole file when the reader went to its end,
    else None (an array child that stopped after its rows)."""

    path: Path
    header: List[str]
    rows: List[List[str]]
    row_offset: int = 0
    total: Optional[int] = None

    @property
    def count(self) -> int:
        """Data rows in the file (whole reads), else the rows held."""
        return self.total if self.total is not None else len(self.rows)

    def row(self, number: int) -> List[str]:
        """Data row `number` (1-based, in the whole file); it must be one of those held."""
        index = number - 1 - self.row_offset
        if not 0 <= index < len(self.rows):
            raise IndexError(f"data row {number} is not among rows {self.row_offset + 1}-"
                             f"{self.row_offset + len(self.rows)} held")
        return self.rows[index]

    def channels(self) -> List[Tuple[str, str, Optional[str], Optional[str]]]:
        """(kind, name, file column, path-or-url column) per image/object channel."""
        out = []
        for prefix, path_prefix, url_prefix in (("Image_FileName_", "Image_PathName_", "Image_URL_"),
                                                ("Image_ObjectsFileName_", "Image_ObjectsPathName_",
                                                 "Image_ObjectsURL_")):
            names = {c[len(prefix):] for c in self.header if c.startswith(prefix)}
            names |= {c[len(url_prefix):] for c in self.header if c.startswith(url_prefix)}
            for name in sorted(names):
                out.append((prefix, name,
                            prefix + name if prefix + name in self.header else None,
                            url_prefix + name if url_prefix + name in self.header else
                            (path_prefix + name if path_prefix + name in self.header else None)))
        return out


_BLOCK = 1 << 20
_BLANK_START = (b"\n", b"\r\n", b",", b" ", b"\t")
_MAYBE_BLANK_LINE = re.compile(rb"\n[\n\r,\t ]")  # a line that could hold no value (one regex pass)


class _Lines:
    """Lines of a binary stream (anything with `read(n)`: a file, an S3 object's body), with a
    fast way past rows a child does not keep.

    `skip(n)` passes up to n rows a megabyte at a time, counting newlines at C speed, while
    the bytes are plain (no '"', so no quoted newline, and no line that could be blank); at
    anything else it stops and `readline` (the exact path) takes over for that block."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.buf = b""
        self.pos = 0  # start of the unread part of buf
        self.number = 0  # physical lines consumed
        self._exact = 0  # lines to read exactly before skipping fast again

    def _more(self) -> bool:
        block = self.handle.read(_BLOCK)
        if not block:
            return False
        self.buf = self.buf[self.pos:] + block
        self.pos = 0
        return True

    def readline(self) -> bytes:
        while True:
            cut = self.buf.find(b"\n", self.pos)
            if cut >= 0:
                line, self.pos = self.buf[self.pos:cut + 1], cut + 1
                break
            if not self._more():
                line, self.buf, self.pos = self.buf[self.pos:], b"", 0
                break
        if line:
            self.number += 1
            self._exact = max(0, self._exact - 1)
        return line

    def skip(self, rows: int) -> int:
        """Pass up to `rows` plain rows; return how many were passed (at a record boundary only)."""
        done = 0
        while done < rows and not self._exact:
            if self.buf.find(b"\n", self.pos) < 0 and not self._more():
                break
            cut = self.buf.rfind(b"\n", self.pos)
            if cut < 0:  # a line longer than a block: the exact path reads it
                self._exact = 1
                break
            chunk = self.buf[self.pos:cut + 1]
            if b'"' in chunk or chunk.startswith(_BLANK_START) or _MAYBE_BLANK_LINE.search(chunk):
                self._exact = chunk.count(b"\n") + 1
                break
            lines = chunk.count(b"\n")
            if done + lines > rows:
                at = self.pos - 1
                for _ in range(rows - done):
                    at = self.buf.find(b"\n", at + 1)
                self.pos = at + 1
                self.number += rows - done
                return rows
            done += lines
            self.number += lines
            self.pos = cut + 1
        return done


def _logical_rows(lines: _Lines) -> Iterator[Tuple[int, bytes]]:
    """(physical line number, bytes) of each CSV record, a quoted field's newlines included.

    Works on bytes and parses nothing: a record ends at a newline outside quotes (an even
    number of '"' so far), which the csv module agrees with for RFC 4180 files. Reads no
    further than the record it yields, so `lines.skip` may run between records."""
    while True:
        line = lines.readline()
        if not line:
            return
        start, pending, quotes = lines.number, [line], line.count(b'"')
        while quotes % 2:
            more = lines.readline()
            if not more:
                break
            pending.append(more)
            quotes += more.count(b'"')
        yield start, pending[0] if len(pending) == 1 else b"".join(pending)


def _is_blank(record: bytes) -> bool:
    """A record with no value in any cell (a trailing newline, ',,,'), as read_data_file skips."""
    if record.strip(b" \t\r\n,"):
        if b'"' not in record or record.strip(b' \t\r\n,"'):
            return False
        try:
            return not any(cell.strip() for row in csv.reader([record.decode("utf-8", "replace")]) for cell in row)
        except csv.Error:
            return False  # not blank: reading it as a row names what is wrong with it
    return True


def _decode(record: bytes, path: Path, line: int) -> str:
    try:
        return record.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"data file {path.name} line {line} is not UTF-8 text (save the CSV as UTF-8)") from None


def _parse(record: bytes, path: Path, line: int) -> List[str]:
    """One CSV record's cells; a record the csv module cannot read is BadInput naming its line (a
    carriage return alone ending lines, as old Mac Excel writes them, is the usual cause)."""
    try:
        return next(csv.reader([_decode(record, path, line)]), [])
    except csv.Error as exc:
        if re.search(rb"\r(?!\n)", record.rstrip(b"\r\n")):
            raise BadInput(f"data file {path.name} ends its lines with a carriage return alone (line {line}; old Mac "
                           "Excel \"CSV\"): save it as CSV UTF-8 (line feed or CR LF line endings)") from None
        raise BadInput(f"data file {path.name} line {line} is not a CSV row LoadData can read ({exc}): fix its "
                       "quoting") from None


def _check_header(path: Path, header: List[str]) -> List[str]:
    header = [h.strip() for h in header]
    separator = next((sep for sep in (";", "\t") if len(header) == 1 and sep in header[0]), None)
    if separator:  # a spreadsheet saving with a regional list separator: every row reads as one column
        raise BadInput(f"data file {path.name} separates its columns with {separator!r}, LoadData needs commas: "
                       "save it as CSV (comma delimited)")
    if not any(h.startswith(("Image_FileName_", "Image_URL_", "Image_ObjectsFileName_", "Image_ObjectsURL_"))
               for h in header):
        raise BadInput(f"data file {path.name} has no Image_FileName_<name> or Image_URL_<name> column "
                       "(LoadData needs one per image channel)")
    if len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise BadInput(f"data file {path.name} repeats column(s) {', '.join(dupes)}")
    return header


def read_rows(path: Path, first: int = 1, last: Optional[int] = None, count_all: bool = True) -> DataFile:
    """Stream a LoadData CSV, validating its header, and keep only data rows first..last
    (1-based, blank lines not counted; `last=None`: to the end).

    With `count_all` the reader goes on to the end so `total` is the file's row count;
    without, it stops after row `last + 1` (`total` None, or the count when the file ended
    first). Memory holds the kept rows only. BadInput names a broken header or kept row."""
    path = Path(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise BadInput(f"data file not found: {path} (check --data-file, or the job message's 'data_file' key)") from None
    header: Optional[List[str]] = None
    kept: List[List[str]] = []
    seen = 0
    finished = True
    lines = _Lines(handle)
    with handle:
        records = _logical_rows(lines)
        for line, record in records:
            if record.startswith(codecs.BOM_UTF8):
                record = record[len(codecs.BOM_UTF8):]
            if record.strip():
                header = _check_header(path, _parse(record, path, line))
                break
        while header is not None:
            if seen < first - 1:  # rows before this child's: skimmed, not parsed
                seen += lines.skip(first - 1 - seen)
            elif last is not None and seen >= last:
                if not count_all:
                    if next(records, None) is not None:
                        finished = False  # there is more; it is another child's to read
                    break
                seen += lines.skip(1 << 62)
            item = next(records, None)
            if item is None:
                break
            line, record = item
            if _is_blank(record):
                continue
            seen += 1
            if seen < first or (last is not None and seen > last):
                continue
            row = _parse(record, path, line)
            if len(row) != len(header):
                raise BadInput(f"data file {path.name} line {line} has {len(row)} fields, "
                               f"the header has {len(header)}: fix that row")
            kept.append(row)
    if header is None:
        raise BadInput(f"data file {path.name} is empty: it needs a header row and one row per image set")
    if seen == 0:
        raise BadInput(f"data file {path.name} lists no image sets (only a header)")
    return DataFile(path=path, header=header, rows=kept, row_offset=first - 1,
                    total=seen if finished else None)


def count_rows(stream: BinaryIO) -> int:
    """Image sets (data rows) of a LoadData CSV read from a binary stream (a file, or an S3
    object's body: anything with `read(n)`), counted exactly as `read_rows` counts them (blank
    lines are not rows; quoted newlines stay inside their row), in constant memory. For the
    ingress Lambda, which must agree with the worker's count (CPB_IMAGE_SET_COUNT)."""
    lines = _Lines(stream)
    records = _logical_rows(lines)
    for _, record in records:
        if record.replace(codecs.BOM_UTF8, b"", 1).strip():
            break
    else:
        return 0
    count = 0
    while True:
        count += lines.skip(1 << 62)
        item = next(records, None)
        if item is None:
            return count
        if not _is_blank(item[1]):
            count += 1


def read_data_file(path: Path) -> DataFile:
    """Read and validate a whole LoadData CSV; BadInput names the broken row/column."""
    return read_rows(path)


def row_range(data: DataFile, module_settings: Dict[str, str]) -> Tuple[int, int]:
    """(rows skipped, image sets) LoadData makes from this CSV, honouring its row-range
    setting: image set n is then CSV row n + skipped."""
    return loaddata_row_range(data.count, module_settings)


def loaddata_row_range(total_rows: int, module_settings: Dict[str, str]) -> Tuple[int, int]:
    """(rows skipped, image sets) that LoadData's "Process just a range of rows" makes of a CSV
    with `total_rows` data rows. The one rule the worker and the Lambda count by (the Lambda
    streams the CSV and knows only the row count)."""
    if module_settings.get("Process just a range of rows?") == "Yes":
        bounds = module_settings.get("Rows to process", "1,100000").split(",")
        try:
            lo, hi = int(bounds[0]), int(bounds[1])
        except (ValueError, IndexError):
            raise BadInput("LoadData 'Rows to process' must be two numbers like 1,100") from None
        lo = max(lo, 1)
        return lo - 1, max(0, min(hi, total_rows) - lo + 1)
    return 0, total_rows


def image_locations(data: DataFile, first: int, last: int, skipped: int = 0) -> List[Tuple[int, str, str]]:
    """(CSV row number, column, location) of every image file image sets first..last use.

    `location` is a relative path (to the input folder), an absolute path, or
    an `s3://`/`file://`/`http(s)://` URL, exactly as the CSV states it."""
    channels = data.channels()
    out = []
    for number in range(first + skipped, last + skipped + 1):
        row = dict(zip(data.header, data.row(number)))
        for _, _, file_col, where_col in channels:
            where = (row.get(where_col) or "").strip() if where_col else ""
            name = (row.get(file_col) or "").strip() if file_col else ""
            if where_col and where_col.startswith(("Image_URL_", "Image_ObjectsURL_")):
                if not where:
                    raise BadInput(f"data file {data.path.name} line {number + 1}: {where_col} is empty")
                out.append((number, where_col, where))
                continue
            if not name:
                raise BadInput(f"data file {data.path.name} line {number + 1}: {file_col} is empty")
            out.append((number, file_col, (where.rstrip("/") + "/" + name) if where else name))
    return out


def url_to_path(location: str) -> Optional[str]:
    """A local path for a `file:` URL or plain path; None for remote URLs."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme in ("", ) or (len(parsed.scheme) == 1 and location[1:3] in (":\\", ":/")):
        return location
    return None


def rewrite(data: DataFile, resolve, dest: Path, first: Optional[int] = None, last: Optional[int] = None) -> Path:
    """Write a LoadData CSV of data rows first..last (default: every row held), whose image
    columns point at local files.

    `resolve(location) -> local absolute path` maps what the CSV says to where
    the worker staged the file. PathName/URL columns are replaced by
    PathName/FileName pairs because LoadData reads those the same way in
    CellProfiler 4.2 and 5. With `resolve=None` the rows are written as read (a
    local run's slice: same values, no byte-order mark)."""
    first = data.row_offset + 1 if first is None else first
    last = data.row_offset + len(data.rows) if last is None else last
    selected = (data.row(n) for n in range(first, last + 1))
    dest.parent.mkdir(parents=True, exist_ok=True)
    if resolve is None:
        with open(dest, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(data.header)
            writer.writerows(selected)
        return dest
    channels = data.channels()
    drop = {col for _, _, _, col in channels if col}
    header = [h for h in data.header if h not in drop]
    added: List[str] = []
    for prefix, name, file_col, _ in channels:
        path_col = prefix.replace("FileName", "PathName") + name
        if file_col is None:
            file_col = prefix + name
            added.append(file_col)
        added.append(path_col)
    header_out = [h for h in header if h not in added] + [c for c in added]
    with open(dest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header_out)
        for row_values in selected:
            row = dict(zip(data.header, row_values))
            for prefix, name, file_col, where_col in channels:
                where = (row.get(where_col) or "").strip() if where_col else ""
                if where_col and where_col.startswith(("Image_URL_", "Image_ObjectsURL_")):
                    location = where
                else:
                    base = (row.get(file_col) or "").strip()
                    location = (where.rstrip("/") + "/" + base) if where else base
                local = Path(resolve(location))
                row[file_col or prefix + name] = local.name
                row[prefix.replace("FileName", "PathName") + name] = str(local.parent)
            writer.writerow([row.get(h, "") for h in header_out])
    return dest
