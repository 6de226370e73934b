"""Count image sets of an Images/NamesAndTypes pipeline from file names alone.

The worker does not rely on this count: CellProfiler counts its own image sets in every
process (cpsets.py) and the worker checks CPB_IMAGE_SET_COUNT against that. This evaluator
serves where CellProfiler cannot run: the ingress Lambda, which must know the count to cut
`image_sets_per_job` without a data file (`count_image_sets_in_listing(pipeline, keys)` on
the S3 listing), and the worker's choice of how many processes to START (never of what
they run). It evaluates the common rule forms (file/directory/extension predicates, and/or,
"Order" matching, "Metadata" matching on file/folder-name regular expressions, channels
matched by "(None)" - one file for every image set, e.g. an illumination function) and
returns None for anything else, so the Lambda refuses such a message with the fix (give a
data file). Where it answers, tests compare it with CellProfiler's own count
(tests/test_worker_metadata.py, tests/test_worker_units.py); a miscount can only fail a job
loudly, never drop image sets (CellProfiler's count is checked against it).

`isimage` follows this module's IMAGE_EXTENSIONS; CellProfiler 4.2 asks Bio-Formats, whose
list is longer: the two agree on the microscope formats listed here.
"""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from .pipeline import Pipeline

Rule = Callable[[str, str], bool]  # (relative directory, file name) -> matches

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".jp2", ".dib",
                    ".pbm", ".pgm", ".ppm", ".flex", ".zvi", ".c01", ".dcm", ".npy")
_MULTI_PLANE = (".flex", ".zvi", ".c01", ".czi", ".nd2", ".lif", ".mov", ".avi", ".stk", ".ome.tif",
                ".ome.tiff")


class Unsupported(Exception):
    """A rule form this evaluator does not understand."""




def _tokens(text: str) -> List[str]:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "()":
            out.append(ch)
            i += 1
        elif ch == '"':
            j, buf = i + 1, []
            while j < len(text) and text[j] != '"':
                if text[j] == "\\" and j + 1 < len(text):  # CellProfiler literals: backslash-anything
                    buf.append(text[j + 1])
                    j += 2
                    continue
                buf.append(text[j])
                j += 1
            out.append('"' + "".join(buf))
            i = j + 1
        else:
            j = i
            while j < len(text) and not text[j].isspace() and text[j] not in "()":
                j += 1
            out.append(text[i:j])
            i = j
    return out


def _predicate(subject: str, verb: str, op: str, value: Optional[str]) -> Rule:
    def target(directory: str, name: str) -> str:
        if subject == "file":
            return name
        if subject == "directory":
            return directory
        if subject == "extension":
            return name.lower()
        raise Unsupported(subject)

    if subject not in ("file", "directory", "extension"):
        raise Unsupported(f"rule subject {subject}")
    if op == "contain":
        test = lambda s: value in s  # noqa: E731
    elif op == "containregexp":
        pattern = re.compile(value or "")
        test = lambda s: pattern.search(s) is not None  # noqa: E731
    elif op == "startwith":
        test = lambda s: s.startswith(value)  # noqa: E731
    elif op == "endwith":
        test = lambda s: s.endswith(value)  # noqa: E731
    elif op == "eq":
        test = lambda s: s == value  # noqa: E731
    elif op == "isimage":
        test = lambda s: s.endswith(IMAGE_EXTENSIONS)  # noqa: E731
    elif op == "istif":
        test = lambda s: s.endswith((".tif", ".tiff"))  # noqa: E731
    elif op == "ispng":
        test = lambda s: s.endswith(".png")  # noqa: E731
    elif op == "isjpeg":
        test = lambda s: s.endswith((".jpg", ".jpeg"))  # noqa: E731
    else:
        raise Unsupported(f"rule operator {op}")
    negate = verb == "doesnot"
    if verb not in ("does", "doesnot"):
        raise Unsupported(f"rule verb {verb}")
    return lambda d, n: test(target(d, n)) != negate


def parse_rule(text: str) -> Rule:
    """Parse `and (file does contain "d0.tif") (...)` into a predicate."""
    tokens = _tokens(text)
    pos = 0

    def expr() -> Rule:
        nonlocal pos
        if pos >= len(tokens):
            raise Unsupported("empty rule")
        head = tokens[pos]
        if head in ("and", "or"):
            pos += 1
            parts = []
            while pos < len(tokens) and tokens[pos] == "(":
                pos += 1
                parts.append(expr())
                if pos >= len(tokens) or tokens[pos] != ")":
                    raise Unsupported("unbalanced rule")
                pos += 1
            if head == "and":
                return lambda d, n: all(p(d, n) for p in parts)
            return lambda d, n: any(p(d, n) for p in parts)
        words = []
        while pos < len(tokens) and tokens[pos] not in ("(", ")"):
            words.append(tokens[pos])
            pos += 1
        if len(words) == 3:
            return _predicate(words[0], words[1], words[2], None)
        if len(words) == 4 and words[3].startswith('"'):
            return _predicate(words[0], words[1], words[2], words[3][1:])
        raise Unsupported(f"rule {' '.join(words)}")

    rule = expr()
    if pos != len(tokens):
        raise Unsupported("trailing rule text")
    return rule


def list_files(root: Path) -> List[Tuple[str, str]]:
    """(relative directory, file name) of every file under root, sorted like CellProfiler's URLs."""
    found = []
    for directory, _, files in os.walk(root):
        rel = os.path.relpath(directory, root)
        rel = "" if rel == "." else rel
        for name in files:
            found.append((rel, name))
    found.sort(key=lambda item: (os.path.join(root, item[0], item[1])))
    return found


def count_image_sets(pipeline: Pipeline, root: Path) -> Optional[int]:
    """Image sets the Images/Metadata/NamesAndTypes modules would make of the files under
    `root`, or None when the rules are beyond this evaluator."""
    return count_image_sets_in_listing(pipeline, [os.path.join(d, n).replace(os.sep, "/") if d else n
                                                  for d, n in list_files(root)])


def count_image_sets_in_listing(pipeline: Pipeline, paths: Iterable[str]) -> Optional[int]:
    """The same count from a listing: paths relative to the input folder, '/'-separated (e.g.
    the keys under an S3 input prefix with the prefix removed), as the ingress Lambda has them."""
    files = []
    for path in paths:
        directory, _, name = str(path).rpartition("/")
        files.append((directory, name))
    files.sort(key=lambda item: item[0] + "/" + item[1] if item[0] else item[1])
    try:
        return _count(pipeline, files)
    except (Unsupported, re.error, ValueError, SyntaxError):
        return None


def _count(pipeline: Pipeline, files: List[Tuple[str, str]]) -> Optional[int]:
    names = pipeline.enabled("NamesAndTypes")
    if len(names) != 1:
        return None
    if any(name.lower().endswith(_MULTI_PLANE) for _, name in files):
        return None  # one file may hold many image sets
    for images in pipeline.enabled("Images"):
        mode = images.get("Filter images?", "Images only")
        if mode == "Images only":
            files = [f for f in files if f[1].lower().endswith(IMAGE_EXTENSIONS)]
        elif mode == "Custom":
            rule = parse_rule(images.get("Select the rule criteria", ""))
            files = [f for f in files if rule(*f)]
        elif mode != "No filtering":
            return None
    module = names[0]
    if module.get("Process as 3D?") == "Yes":
        return None
    if module.get("Assign a name to") == "All images":
        return len(files) or None
    assignments = int(module.get("Assignments count", "0") or 0)
    rules = [parse_rule(r) for r in module.get_all("Select the rule criteria")[:assignments]]
    if not rules:
        return None
    channels = [[f for f in files if rule(*f)] for rule in rules]
    method = module.get("Image set matching method", "Order")
    if method == "Order":
        sizes = {len(c) for c in channels}
        return sizes.pop() if len(sizes) == 1 and 0 not in sizes else None
    if method == "Metadata":
        return _count_by_metadata(pipeline, module, channels)
    return None


def _count_by_metadata(pipeline: Pipeline, names, channels: List[List[Tuple[str, str]]]) -> Optional[int]:
    """Distinct metadata keys present in every channel (file/folder-name regexes only)."""
    extract: List[Tuple[str, re.Pattern]] = []
    for meta in pipeline.enabled("Metadata"):
        if meta.get("Extract metadata?") != "Yes":
            continue
        methods = meta.get_all("Metadata extraction method")
        sources = meta.get_all("Metadata source")
        file_res = meta.get_all("Regular expression to extract from file name")
        dir_res = meta.get_all("Regular expression to extract from folder name")
        scopes = meta.get_all("Extract metadata from")
        for i, method in enumerate(methods):
            if method != "Extract from file/folder names" or (scopes[i:i + 1] or ["All images"])[0] != "All images":
                return None
            source = sources[i]
            regex = file_res[i] if source == "File name" else dir_res[i]
            extract.append((source, re.compile(regex)))
    if not extract:
        return None
    raw = names.get("Match metadata", "[]")
    matching = ast.literal_eval(raw) if raw.strip() else []
    if not matching:
        return None
    order = list(dict.fromkeys(k for entry in matching for k in entry))  # channel names, in order
    image_names = names.get_all("Name to assign these images")[1:]  # [0] is the 'All images' name
    keysets = []
    for index, files in enumerate(channels):
        if index >= len(image_names) or image_names[index] not in order:
            return None
        channel = image_names[index]
        keys = [entry.get(channel) for entry in matching]
        if all(key is None for key in keys):
            # "(None)" in every matching row: one file (e.g. a plate's illumination function) that goes
            # with every image set. More files than one would be CellProfiler's to reject.
            if len(files) != 1:
                return None
            continue
        if any(key is None for key in keys):
            return None  # matched on some keys only: CellProfiler's broadcasting rules, not evaluated here
        seen = set()
        for directory, name in files:
            values: Dict[str, str] = {}
            for source, pattern in extract:
                found = pattern.search(name if source == "File name" else directory)
                if found:
                    values.update({k: v for k, v in found.groupdict().items() if v is not None})
            if not all(k in values for k in keys):
                return None
            key = tuple(values[k] for k in keys)
            if key in seen:
                return None  # duplicates: CellProfiler would complain; let it decide in one process
            seen.add(key)
        keysets.append(seen)
    common = set.intersection(*keysets) if keysets else set()
    return len(common) or None
