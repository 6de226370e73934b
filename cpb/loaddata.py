"""`cpb loaddata`: LoadData CSVs from a folder of microscope images and their file-name pattern.

A Cell Painting plate is thousands of files whose names carry well, site and channel. This module
reads those names with a regular expression (a preset for a common microscope, or the scientist's
own), groups the files into image sets (one per plate, well, site [and plane]), maps channel ids to
the image names the pipeline uses (`--channel 1=DNA`), and writes the CSV LoadData reads:
`Metadata_Plate`, `Metadata_Well`, `Metadata_Site` [`Metadata_Plane`], then per channel
`Image_FileName_<Name>` / `Image_PathName_<Name>`, and with `--illum` the illumination functions
`Image_FileName_Illum<Name>` = `Illum<Name>.npy` / `Image_PathName_Illum<Name>` (the folder, or the
`s3://<bucket>/<output>` the worker reads them from).

It refuses, naming the first offending files: a site missing a channel, two files for one site and
channel, image files the pattern does not match (strays), channel ids with no name, and channel
names that do not match the image names the pipeline expects (`--pipeline`).

Image paths are written relative to the folder (`Image_PathName_*` is the sub-folder, empty at the
top): LoadData's Default Input Folder for `cpb run --local --input <folder>`, the job's input
prefix on AWS (the worker resolves relative paths against it).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from cpb.urls import UrlError, split_url, to_prefix


class LoadDataError(Exception):
    """The images, pattern or channels cannot make a correct LoadData CSV; the message names the files."""


IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".c01", ".dib", ".flex", ".npy")
SHOW = 3  # offending files named in one error line
GENERIC_FOLDERS = ("images", "timepoint_1")  # folder names that say nothing about the plate


@dataclass(frozen=True)
class FilePattern:
    """A file-name regex with named groups, and names of files to leave out (thumbnails)."""

    name: str
    regex: str
    ignore: Optional[str] = None
    example: str = ""

    @property
    def compiled(self) -> "re.Pattern[str]":
        return re.compile(self.regex)


PRESETS: dict[str, FilePattern] = {
    # PerkinElmer (Revvity) Opera Phenix / Operetta CLS: r<row>c<col>f<field>p<plane>-ch<ch>sk<time>fk1fl1.tiff
    "phenix": FilePattern(
        "phenix", r"^r(?P<row>\d{2})c(?P<column>\d{2})f(?P<site>\d{2,})p(?P<plane>\d{2,})-ch(?P<channel>\d+)"
                  r"sk(?P<timepoint>\d+)fk\d+fl\d+\.(?i:tiff?)$",
        example="r01c01f01p01-ch1sk1fk1fl1.tiff"),
    # Molecular Devices ImageXpress: <plate>_<well>_s<site>_w<wavelength>[<GUID>].tif; thumbnails left out
    "imagexpress": FilePattern(
        "imagexpress", r"^(?P<plate>.+?)_(?P<well>[A-Pa-p]\d{2})_s(?P<site>\d+)_w(?P<channel>\d+)"
                       r"(?:[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})?\.(?i:tiff?)$",
        ignore=r"_thumb", example="P1_A01_s1_w1.tif"),
}
ALIASES = {"opera": "phenix", "operetta": "phenix", "phenix": "phenix", "imagexpress": "imagexpress",
           "ixm": "imagexpress", "moleculardevices": "imagexpress"}


def pattern_for(text: Optional[str]) -> FilePattern:
    """A preset by name, else `text` as a regex with the named groups this module reads."""
    if not text:
        raise LoadDataError("give --pattern: a preset (phenix for Opera/Operetta r01c01f01p01-ch1sk1fk1fl1.tiff, "
                            "imagexpress for P1_A01_s1_w1.tif) or a regex with named groups plate, well (or row and "
                            "column), site (or field) and channel")
    preset = ALIASES.get(text.strip().lower())
    if preset:
        return PRESETS[preset]
    try:
        compiled = re.compile(text)
    except re.error as exc:
        raise LoadDataError(f"--pattern {text!r} is not a valid regular expression ({exc})") from None
    groups = set(compiled.groupindex)
    missing = []
    if "channel" not in groups:
        missing.append("channel")
    if "well" not in groups and not {"row", "column"} <= groups:
        missing.append("well (or row and column)")
    if "site" not in groups and "field" not in groups:
        missing.append("site (or field)")
    if missing:
        raise LoadDataError(f"--pattern needs the named group(s) {', '.join(missing)}, e.g. "
                            r"(?P<well>[A-P]\d{2}); presets: phenix, imagexpress")
    return FilePattern("custom", text)


def parse_channels(pairs: Iterable[str]) -> dict[str, Optional[str]]:
    """`1=DNA` pairs -> {channel id: image name}; `5=-` leaves channel 5 out on purpose."""
    mapping: dict[str, Optional[str]] = {}
    for pair in pairs:
        key, sep, name = pair.partition("=")
        key, name = key.strip(), name.strip()
        if not sep or not key or not name:
            raise LoadDataError(f"--channel {pair!r}: write ID=NAME, e.g. --channel 1=DNA (or ID=- to leave a "
                                "channel out)")
        if name != "-" and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
            raise LoadDataError(f"--channel {pair!r}: {name!r} is not a CellProfiler image name (letters, digits "
                                "and '_', starting with a letter)")
        if _channel_key(key) in mapping:
            raise LoadDataError(f"--channel {pair!r}: channel {key} is named twice")
        mapping[_channel_key(key)] = None if name == "-" else name
    names = [n for n in mapping.values() if n]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LoadDataError(f"--channel: the image name {dupes[0]} is given to two channels")
    return mapping


def _channel_key(value: str) -> str:
    """Channel ids compare as numbers when they are numbers (ch1, w01 and 1 are one channel)."""
    return str(int(value)) if value.isdigit() else value


def row_letter(value: str) -> str:
    """Plate row as letters: 1 -> A, 16 -> P, 27 -> AA (1536-well plates); letters stay as they are."""
    if value.isdigit():
        number, letters = int(value), ""
        if number < 1:
            raise LoadDataError(f"row {value} is not a plate row (rows start at 1)")
        while number:
            number, rest = divmod(number - 1, 26)
            letters = chr(ord("A") + rest) + letters
        return letters
    return value.upper()


def well_name(row: str, column: str) -> str:
    return f"{row_letter(row)}{int(column):02d}"


# --------------------------------------------------------------------------- sources

@dataclass
class ImageSource:
    """A folder of images: local, or a prefix of the stack's bucket."""

    label: str                      # as the user gave it, for messages
    files: list[str]                # paths relative to the folder (POSIX), hidden files left out
    local_root: Optional[Path] = None
    bucket: Optional[str] = None
    prefix: Optional[str] = None

    @property
    def name(self) -> str:
        """The default plate name: the folder's, or its parent's when the folder is a generic `Images`
        (a Phenix export's, or `<root>/<plate>/images` as cpb plate uploads it)."""
        parts = list(self.local_root.resolve().parts) if self.local_root is not None else (self.prefix or "").split("/")
        parts = [p for p in parts if p and p != "/"]
        while len(parts) > 1 and parts[-1].lower() in GENERIC_FOLDERS:
            parts.pop()
        return parts[-1] if parts else "plate"

    @property
    def remote(self) -> bool:
        return self.bucket is not None


def local_source(folder: Path) -> ImageSource:
    if not folder.is_dir():
        raise LoadDataError(f"{folder}: no such folder")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return ImageSource(str(folder), files, local_root=folder)


def s3_source(s3: Any, bucket: str, prefix: str, label: str) -> ImageSource:
    base = prefix.strip("/") + "/"
    files = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        for item in page.get("Contents", []):
            relative = item["Key"][len(base):]
            if relative and not relative.endswith("/") and not any(p.startswith(".") for p in relative.split("/")):
                files.append(relative)
    if not files:
        raise LoadDataError(f"{label}: nothing under s3://{bucket}/{base} (upload the images, or check the prefix)")
    return ImageSource(label, sorted(files), bucket=bucket, prefix=prefix.strip("/"))


def image_source(text: str, get_stack: Callable[[], Any], make_clients: Callable[[Optional[str]], Any]) -> ImageSource:
    """IMAGES as given: an existing local folder, else a prefix or URL of the stack's bucket."""
    path = Path(text).expanduser()
    if path.is_dir():
        return local_source(path)
    if split_url(text) is None and (text.startswith((".", "/", "~")) or not re.match(r"^[A-Za-z0-9_-]", text)):
        raise LoadDataError(f"{text}: no such local folder")
    stack = get_stack()
    if not stack.bucket:
        raise LoadDataError(f"{text}: no such local folder, and no bucket is known to read it from (set CPB_BUCKET, "
                            "--bucket or --stack)")
    try:
        prefix = to_prefix(text, stack.bucket, "images", stack.sources.get("bucket", ""))
    except UrlError as exc:
        raise LoadDataError(str(exc)) from None
    return s3_source(make_clients(stack.region).s3, stack.bucket, prefix, text)


def illum_location(illum: str, source: ImageSource) -> str:
    """The `Image_PathName_Illum*` value: `s3://<bucket>/<output>` for a bucket output, else a local folder."""
    if source.remote or split_url(illum) is not None:
        bucket = source.bucket
        split = split_url(illum)
        if split is not None:
            if bucket is not None and split[0] != bucket:
                raise LoadDataError(f"--illum {illum} is in bucket {split[0]!r}, the images in {bucket!r}: the worker "
                                    "reads only its own bucket")
            bucket, illum = split
        prefix = illum.strip().strip("/")
        if not prefix:
            raise LoadDataError("--illum names no output prefix")
        return f"s3://{bucket}/{prefix}"
    return str(Path(illum).expanduser().resolve())


# --------------------------------------------------------------------------- the pipeline's image names

_PRODUCED = re.compile(r"^Name (the|to assign)\b.*\b(image|images|illumination function)\b", re.IGNORECASE)
_NOT_A_NAME = {"", "None", "none", "Do not use", "Leave blank", "Do not use a mask"}


@dataclass
class PipelineNames:
    """The image names a pipeline reads from its inputs, and where it says so."""

    names: dict[str, str]           # image name -> "IdentifyPrimaryObjects (module 3)" (first use)
    loads_with: str                 # "LoadData", "NamesAndTypes" or "nothing"
    pipeline: str


def pipeline_image_names(path: Path) -> PipelineNames:
    """The image names the pipeline expects its LoadData (or NamesAndTypes) to provide.

    NamesAndTypes names them ("Name to assign these images"). With LoadData, the CSV names them,
    so they are read off the modules that use images ("Select ... image ...") minus the images
    modules make ("Name the output image", ...): a best-effort reading of the text pipeline, the
    same parser the worker uses."""
    from cpb_worker.errors import WorkerError
    from cpb_worker.pipeline import load_pipeline
    try:
        pipeline = load_pipeline(path)
    except WorkerError as error:
        raise LoadDataError(f"--pipeline: {error.reason}") from None
    enabled = [m for m in pipeline.modules if m.enabled]
    if any(m.name == "NamesAndTypes" for m in enabled) and not any(m.name == "LoadData" for m in enabled):
        names = {}
        for module in (m for m in enabled if m.name == "NamesAndTypes"):
            for value in module.get_all("Name to assign these images"):
                if value.strip() and value.strip() not in _NOT_A_NAME:
                    names.setdefault(value.strip(), f"NamesAndTypes (module {module.number})")
        return PipelineNames(names, "NamesAndTypes", path.name)
    produced: set[str] = set()
    used: dict[str, str] = {}
    for module in enabled:
        for key, value in module.settings:
            if _PRODUCED.match(key):
                produced.add(value.strip())
            elif _consumes_image(key):
                for name in (v.strip() for v in value.split(",")):
                    if name not in _NOT_A_NAME and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):  # image names are identifiers
                        used.setdefault(name, f"{module.name} (module {module.number})")
    names = {n: where for n, where in used.items() if n not in produced}
    loads = "LoadData" if any(m.name == "LoadData" for m in enabled) else "nothing"
    return PipelineNames(names, loads, path.name)


def _consumes_image(key: str) -> bool:
    lowered = key.lower()
    if not lowered.startswith("select"):
        return False
    if any(word in lowered for word in ("type", "format", "method", "measurement", "color", "colour", " how ")):
        return False
    return "image" in lowered or "illumination function" in lowered


# --------------------------------------------------------------------------- building the table

@dataclass
class ImageFile:
    relative: str
    plate: str
    well: str
    site: int
    plane: Optional[int]
    channel: str

    @property
    def key(self) -> tuple:
        return (self.plate, _well_order(self.well), self.site, self.plane or 0)


def _well_order(well: str) -> tuple:
    match = re.match(r"^([A-Z]+)(\d+)$", well)
    return (len(match.group(1)), match.group(1), int(match.group(2))) if match else (0, well, 0)


@dataclass
class LoadDataTable:
    """The CSV to write, and what a person should know about it."""

    header: list[str]
    rows: list[list[str]]
    channels: list[str]                         # image names, in column order
    plates: list[str]
    source: ImageSource
    notes: list[str] = field(default_factory=list)
    illum: Optional[str] = None

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(self.header)
            writer.writerows(self.rows)
        tmp.replace(path)
        return path

    def text(self) -> str:
        import io
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.header)
        writer.writerows(self.rows)
        return buffer.getvalue()

    def summary(self, path: Path) -> str:
        wells = len({(r[0], r[1]) for r in self.rows})
        where = f"s3://{self.source.bucket}/{self.source.prefix}/" if self.source.remote else str(self.source.local_root)
        return (f"wrote {path}: {len(self.rows)} image sets ({len(self.plates)} plate(s), {wells} well(s)), channels "
                f"{', '.join(self.channels)}" + (f", illumination functions from {self.illum}" if self.illum else "")
                + f"; image paths are relative to {where} (the run's input folder)")


def build(source: ImageSource, pattern: FilePattern, channels: dict[str, Optional[str]], plate: Optional[str] = None,
          illum: Optional[str] = None, pipeline: Optional[Path] = None) -> LoadDataTable:
    """Group the source's files into image sets and check them; LoadDataError names what is wrong."""
    regex = pattern.compiled
    ignore = re.compile(pattern.ignore) if pattern.ignore else None
    matched: list[ImageFile] = []
    strays, skipped, ignored = [], [], []
    for relative in source.files:
        name = relative.rsplit("/", 1)[-1]
        if ignore is not None and ignore.search(name):
            ignored.append(relative)
            continue
        match = regex.match(name)
        if match is None:
            (strays if name.lower().endswith(IMAGE_SUFFIXES) else skipped).append(relative)
            continue
        matched.append(_image_file(relative, match.groupdict(), plate or source.name))
    if strays:
        raise LoadDataError(f"{len(strays)} image file(s) in {source.label} do not match the {pattern.name} pattern "
                            f"(e.g. {_first(strays)}); move them out of the folder, or fix --pattern"
                            + (f" (files look like {pattern.example})" if pattern.example else ""))
    if not matched:
        raise LoadDataError(f"no file in {source.label} matches the {pattern.name} pattern"
                            + (f" (files look like {pattern.example})" if pattern.example else "")
                            + (f"; found e.g. {_first(skipped)}" if skipped else ""))
    found = sorted({f.channel for f in matched}, key=lambda c: (len(c), c))
    if not channels:
        raise LoadDataError(f"name the channels: give --channel ID=NAME for each of {', '.join(found)} "
                            f"(e.g. --channel {found[0]}=DNA)")
    channels, read_as = _prefixed_channel_ids(channels, found)
    absent = [c for c, n in channels.items() if n and c not in found]
    if absent:  # before the unnamed: `--channel w1=DNA` for files whose ids are 1, 2, 3 is this, not "1 is unnamed"
        raise LoadDataError(f"--channel {absent[0]}={channels[absent[0]]}: no file of channel {absent[0]} in "
                            f"{source.label}: {absent[0]} matched no channel id in the file names (channel ids "
                            f"found: {', '.join(found)})")
    unnamed = [c for c in found if c not in channels]
    if unnamed:
        example = next(f.relative for f in matched if f.channel == unnamed[0])
        raise LoadDataError(f"channel {unnamed[0]} (e.g. {example}) has no --channel {unnamed[0]}=NAME: name it, or "
                            f"leave it out with --channel {unnamed[0]}=-")
    by_set: dict[tuple, dict[str, ImageFile]] = {}
    for image in matched:
        if channels.get(image.channel) is None:
            continue
        files = by_set.setdefault(image.key, {})
        if image.channel in files:
            raise LoadDataError(f"two files for {_site_text(image)} channel {image.channel}: {files[image.channel].relative} "
                                f"and {image.relative}; keep one (a second time point or a re-acquisition?)")
        files[image.channel] = image
    wanted = [c for c in channels if channels[c]]
    incomplete = [(key, [c for c in wanted if c not in files]) for key, files in sorted(by_set.items()) if
                  any(c not in files for c in wanted)]
    if incomplete:
        key, lacking = incomplete[0]
        present = next(iter(by_set[key].values()))
        raise LoadDataError(f"{len(incomplete)} site(s) lack a channel: {_site_text(present)} has no channel "
                            f"{lacking[0]} ({channels[lacking[0]]}) beside {present.relative}"
                            + (f"; also {', '.join(_site_text(next(iter(by_set[k].values()))) for k, _ in incomplete[1:SHOW])}"
                               if len(incomplete) > 1 else "")
                            + ": re-export the missing images, or move that site's files out")
    plates = sorted({k[0] for k in by_set})
    planes = len({k[3] for k in by_set}) > 1
    header = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"] + (["Metadata_Plane"] if planes else [])
    order = sorted(wanted, key=lambda c: (len(c), c))
    for channel in order:
        header += [f"Image_FileName_{channels[channel]}", f"Image_PathName_{channels[channel]}"]
    if illum:
        for channel in order:
            header += [f"Image_FileName_Illum{channels[channel]}", f"Image_PathName_Illum{channels[channel]}"]
    rows = []
    for key in sorted(by_set):
        files = by_set[key]
        first = files[order[0]]
        row = [first.plate, first.well, str(first.site)] + ([str(first.plane or 1)] if planes else [])
        for channel in order:
            relative = files[channel].relative
            folder, _, name = relative.rpartition("/")
            row += [name, folder]
        if illum:
            for channel in order:
                row += [f"Illum{channels[channel]}.npy", illum]
        rows.append(row)
    table = LoadDataTable(header, rows, [channels[c] for c in order], plates, source, illum=illum)
    if skipped:
        table.notes.append(f"{len(skipped)} file(s) that are not images left out (e.g. {_first(skipped)})")
    if ignored:
        table.notes.append(f"{len(ignored)} thumbnail(s) left out (e.g. {_first(ignored)})")
    if read_as:
        table.notes.append("--channel " + ", ".join(f"{given} read as channel {found_id}" for given, found_id in read_as)
                           + " (the id the file names carry)")
    left_out = [c for c, n in channels.items() if n is None]
    if left_out:
        table.notes.append(f"channel(s) {', '.join(left_out)} left out on purpose (--channel ID=-)")
    if pipeline is not None:
        check_pipeline_names(table, pipeline, bool(illum))
    return table


def illum_not_loaded(expected: PipelineNames, loaded: Iterable[str]) -> list[str]:
    """The illumination functions (`Illum<Name>` of an image name in `loaded`) the pipeline reads as
    input images that `loaded` (the image names a LoadData CSV gives) lacks: the pipeline applies
    functions an illumination pipeline must make first (cpb loaddata --illum, cpb run --local and
    cpb plate all ask this)."""
    loaded = set(loaded)
    return [n for n in expected.names if n.startswith("Illum") and n[5:] in loaded and n not in loaded]


def data_file_image_names(data_file: Path) -> set[str]:
    """The image names a LoadData CSV loads (its Image_FileName_/Image_URL_<Name> columns)."""
    with open(data_file, newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), [])
    return {column.split("_", 2)[2] for column in header
            if column.startswith(("Image_FileName_", "Image_URL_")) and column.count("_") >= 2}


def _prefixed_channel_ids(channels: dict[str, Optional[str]],
                          found: list[str]) -> tuple[dict[str, Optional[str]], list[tuple[str, str]]]:
    """`--channel w1=DNA` (ImageXpress's w1, Phenix's ch1) for file names whose channel id the
    pattern reads as 1: taken as channel 1 when that is unambiguous (1 is a channel found in the
    files, and no other --channel names it). Returns the channels by id and what was read as what."""
    resolved: dict[str, Optional[str]] = {}
    read_as: list[tuple[str, str]] = []
    for key, name in channels.items():
        match = re.fullmatch(r"[A-Za-z]+(\d+)", key)
        target = _channel_key(match.group(1)) if match and key not in found else None
        if target is not None and target in found and target not in channels and target not in resolved:
            resolved[target] = name
            read_as.append((key, target))
        else:
            resolved[key] = name
    return resolved, read_as


def check_pipeline_names(table: LoadDataTable, pipeline: Path, with_illum: bool) -> None:
    """The channels (and illumination functions) must be the image names the pipeline expects."""
    expected = pipeline_image_names(pipeline)
    given = set(table.channels) | ({f"Illum{n}" for n in table.channels} if with_illum else set())
    needs_illum = illum_not_loaded(expected, given)
    if needs_illum:
        name = needs_illum[0]
        raise LoadDataError(f"pipeline {expected.pipeline} uses the illumination function {name} "
                            f"({expected.names[name]}): pass --illum <illumination output> so the CSV loads it")
    missing = [n for n in expected.names if n not in given]
    if missing:
        name = missing[0]
        raise LoadDataError(f"pipeline {expected.pipeline} uses image {name!r} ({expected.names[name]}), but the "
                            f"channels give {', '.join(sorted(given))}: name a channel {name} "
                            "(--channel ID=" + name + "), or fix the pipeline")
    unused = [n for n in table.channels if expected.names and n not in expected.names]
    if unused:
        table.notes.append(f"pipeline {expected.pipeline} does not use image(s) {', '.join(unused)}: LoadData still "
                           "loads them (leave a channel out with --channel ID=-)")
    if expected.loads_with == "NamesAndTypes":
        table.notes.append(f"pipeline {expected.pipeline} loads images with NamesAndTypes, which ignores a LoadData "
                           "CSV: replace Images/Metadata/NamesAndTypes/Groups with LoadData to use it")


def _image_file(relative: str, groups: dict[str, Optional[str]], default_plate: str) -> ImageFile:
    well = groups.get("well")
    if not well:
        row, column = groups.get("row"), groups.get("column")
        well = well_name(row or "", column or "0")
    else:
        match = re.match(r"^([A-Za-z]+)0*(\d+)$", well)
        well = f"{match.group(1).upper()}{int(match.group(2)):02d}" if match else well
    site = groups.get("site") or groups.get("field") or "1"
    plane = groups.get("plane")
    if not site.isdigit():
        raise LoadDataError(f"{relative}: the pattern reads site {site!r}, not a number; fix --pattern")
    return ImageFile(relative=relative, plate=groups.get("plate") or default_plate, well=well, site=int(site),
                     plane=int(plane) if plane and plane.isdigit() else None,
                     channel=_channel_key(groups.get("channel") or ""))


def _site_text(image: ImageFile) -> str:
    plane = f" plane {image.plane}" if image.plane is not None else ""
    return f"plate {image.plate} well {image.well} site {image.site}{plane}"


def _first(paths: list[str]) -> str:
    return ", ".join(paths[:SHOW]) + (f" (+{len(paths) - SHOW} more)" if len(paths) > SHOW else "")
