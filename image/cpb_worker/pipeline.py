"""Read a CellProfiler text pipeline (.cppipe) far enough to plan a run.

The worker never imports CellProfiler; it only needs to know which modules are
enabled and a few of their settings: whether the pipeline can be split into
image-set ranges, whether it loads images with LoadData (and from which CSV),
and how NamesAndTypes names the images. The text format (header
`CellProfiler Pipeline: http://www.cellprofiler.org`, `Version:5`) is the same
for CellProfiler 4.2 and 5, so one parser serves the container and laptops.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import BadInput

HEADER = "CellProfiler Pipeline: http://www.cellprofiler.org"
_MODULE_LINE = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*):\[(?P<attrs>.*)\]\s*$")


@dataclass
class Module:
    """One module of the pipeline: its name, position, state and settings."""

    name: str
    number: int
    enabled: bool
    settings: List[Tuple[str, str]] = field(default_factory=list)

    def get(self, key: str, default: Optional[str] = None) -> Optional[str]:
        """The first setting named `key` (settings may repeat, e.g. per channel)."""
        for name, value in self.settings:
            if name == key:
                return value
        return default

    def get_all(self, key: str) -> List[str]:
        return [value for name, value in self.settings if name == key]


@dataclass
class Pipeline:
    """A parsed pipeline plus the bytes it came from (for the sha256)."""

    path: Path
    sha256: str
    modules: List[Module]

    def enabled(self, name: str) -> List[Module]:
        return [m for m in self.modules if m.enabled and m.name == name]

    def has(self, name: str) -> bool:
        return bool(self.enabled(name))


def load_pipeline(path: Path) -> Pipeline:
    """Parse `path`; raise BadInput naming the problem when it is not a usable .cppipe."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BadInput(f"pipeline not found: {path} (check the message's 'pipeline' key)") from None
    except OSError as exc:
        raise BadInput(f"pipeline {path} cannot be read: {exc}") from None
    if raw[:8] == b"\x89HDF\r\n\x1a\n":
        raise BadInput(f"pipeline {path.name} is a CellProfiler project (.cpproj); "
                       "save it with File > Export > Pipeline as a .cppipe")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"pipeline {path.name} is not UTF-8 text; export it from CellProfiler as a .cppipe") from None
    modules = parse_modules(text, path.name)
    return Pipeline(path=path, sha256=hashlib.sha256(raw).hexdigest(), modules=modules)


def parse_modules(text: str, label: str = "pipeline") -> List[Module]:
    """Split pipeline text into modules; check the header and ModuleCount."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith(HEADER):
        raise BadInput(f"{label} does not start with '{HEADER}': it is not a CellProfiler .cppipe "
                       "(export the pipeline from CellProfiler)")
    header = {}
    index = 1
    while index < len(lines) and lines[index].strip():
        key, _, value = lines[index].partition(":")
        header[key.strip()] = value.strip()
        index += 1
    if header.get("Version") not in ("5", "6"):
        raise BadInput(f"{label} has pipeline format Version:{header.get('Version')}; "
                       "re-save it with CellProfiler 4.2 or later")
    modules: List[Module] = []
    current: Optional[Module] = None
    for line in lines[index:]:
        if not line.strip():
            current = None
            continue
        if line[0].isspace():
            if current is None:
                raise BadInput(f"{label} is corrupt: setting line '{line.strip()[:60]}' outside a module")
            key, sep, value = line.strip().partition(":")
            if not sep:
                raise BadInput(f"{label} is corrupt: setting line '{line.strip()[:60]}' has no ':'")
            current.settings.append((key, value))
            continue
        match = _MODULE_LINE.match(line)
        if not match:
            raise BadInput(f"{label} is corrupt: cannot read module line '{line[:60]}'")
        attrs = match.group("attrs")
        number = re.search(r"module_num:(\d+)", attrs)
        enabled = re.search(r"\|enabled:(True|False)", attrs)
        if not number:
            raise BadInput(f"{label} is corrupt: module {match.group('name')} has no module_num")
        current = Module(name=match.group("name"), number=int(number.group(1)),
                         enabled=(enabled is None or enabled.group(1) == "True"))
        modules.append(current)
    expected = header.get("ModuleCount")
    if expected is not None and expected.isdigit() and int(expected) != len(modules):
        raise BadInput(f"{label} is corrupt or truncated: header says ModuleCount:{expected} "
                       f"but {len(modules)} modules were found (re-export the pipeline)")
    if not modules:
        raise BadInput(f"{label} has no modules")
    return modules


def unsplittable_reasons(pipeline: Pipeline) -> List[str]:
    """Why this pipeline must see all its image sets in one CellProfiler process.

    Splitting by `-f/-l` ranges is only correct when every image set is
    processed independently. These modules/settings carry state across image
    sets (or aggregate over them), so a split would silently change results.
    """
    reasons: List[str] = []

    def add(module: Module, why: str) -> None:
        reasons.append(f"{module.name} (module {module.number}) {why}")

    for module in pipeline.modules:
        if not module.enabled:
            continue
        name = module.name
        if name in ("TrackObjects", "MakeProjection", "CalculateStatistics", "CreateBatchFiles"):
            add(module, "aggregates or tracks across image sets")
        elif name == "ExportToDatabase":
            add(module, "writes one database per run, which ranges cannot merge")
        elif name == "UntangleWorms":
            if (module.get("Train or untangle worms?") or "") == "Train":
                add(module, "trains a worm model over all image sets")
        elif name == "CorrectIlluminationCalculate":
            if (module.get("Calculate function for each image individually, or based on all images?") or "").startswith("All"):
                add(module, "computes an illumination function over all image sets")
        elif name == "Crop":
            if (module.get("Apply which cycle's cropping pattern?") or "") == "First":
                add(module, "crops every image set with the first set's pattern")
        elif name == "Tile":
            if (module.get("Tile assembly method") or "").startswith("Across"):
                add(module, "tiles images across cycles")
        elif name == "Groups":
            if (module.get("Do you want to group your images?") or "No") == "Yes":
                add(module, "groups image sets")
        elif name == "LoadData":
            if (module.get("Group images by metadata?") or "No") == "Yes":
                add(module, "groups image sets by metadata")
        elif name == "SaveImages":
            when = module.get("When to save") or ""
            if when in ("First cycle", "Last cycle"):
                add(module, f"saves only on the {when.lower()}")
            if (module.get("Select the type of image to save") or "").startswith("Movie"):
                add(module, "saves a movie/stack across image sets")
    return reasons


# SaveImages locations whose files end up in the job's results (the worker uploads only its output folder).
RESULT_LOCATIONS = ("Default Output Folder", "Default Output Folder sub-folder")


def check_saved_images(pipeline: Pipeline) -> None:
    """Refuse SaveImages that write beside the inputs or elsewhere: locally those files land
    in the scientist's image folder, on AWS in the container's scratch, and either way they
    are missing from the results while the run reports success."""
    for module in pipeline.enabled("SaveImages"):
        kind = (module.get("Output file location") or "Default Output Folder|").split("|", 1)[0]
        if kind not in RESULT_LOCATIONS:
            raise BadInput(f"pipeline {pipeline.path.name}: SaveImages (module {module.number}) saves to "
                           f"'{kind}', so its images would not be in the results: set its 'Output file "
                           "location' to Default Output Folder (or a sub-folder of it)")


def is_grouped(pipeline: Pipeline) -> bool:
    """Whether image sets are grouped (then Group_Length counts a group, not the run)."""
    return (any(m.get("Do you want to group your images?") == "Yes" for m in pipeline.enabled("Groups"))
            or any(m.get("Group images by metadata?") == "Yes" for m in pipeline.enabled("LoadData")))


def export_module(pipeline: Pipeline) -> Module:
    """The ExportToSpreadsheet module whose Image.csv proves which sets ran.

    Without it CellProfiler writes no per-image table and the worker could
    not tell a complete run from an empty one, so it is required."""
    modules = pipeline.enabled("ExportToSpreadsheet")
    if not modules:
        raise BadInput(f"pipeline {pipeline.path.name} has no enabled ExportToSpreadsheet module: "
                       "add one (exporting Image measurements) so results can be checked and merged")
    module = modules[0]
    if module.get("Add a prefix to file names?") == "Yes":
        raise BadInput(f"pipeline {pipeline.path.name}: ExportToSpreadsheet adds a file name prefix; "
                       "set 'Add a prefix to file names?' to No (the worker looks for Image.csv)")
    if module.get("Output file location", "").split("|")[0] not in ("Default Output Folder", ""):
        raise BadInput(f"pipeline {pipeline.path.name}: ExportToSpreadsheet must write to the "
                       "Default Output Folder (set 'Output file location')")
    if (module.get("Select the column delimiter") or "Comma").startswith("Tab"):
        raise BadInput(f"pipeline {pipeline.path.name}: ExportToSpreadsheet writes tab-separated .txt files; "
                       "set 'Select the column delimiter' to Comma (\",\") so the tables can be checked and merged")
    return module


def table_objects(pipeline: Pipeline) -> Dict[str, List[str]]:
    """{file name: objects it holds} for the object tables ExportToSpreadsheet names itself
    (a custom 'File name', or several objects combined in one file). A table not listed
    holds the object it is named after (`Nuclei.csv`: Nuclei)."""
    out: Dict[str, List[str]] = {}
    for module in pipeline.enabled("ExportToSpreadsheet"):
        if module.get("Export all measurement types?") != "No":
            continue
        names = module.get_all("Data to export")
        combine = module.get_all("Combine these object measurements with those of the previous object?")
        files = module.get_all("File name")
        use_object = module.get_all("Use the object name for the file name?")
        current: Optional[str] = None
        for index, name in enumerate(names):
            if name in ("Image", "Experiment", "Object relationships", "Do not use"):
                current = None
                continue
            if index < len(combine) and combine[index] == "Yes" and current is not None:
                out[current].append(name)
                continue
            uses_object = index >= len(use_object) or use_object[index] == "Yes"
            current = f"{name}.csv" if uses_object else (files[index] if index < len(files) else f"{name}.csv")
            out.setdefault(current, []).append(name)
    return out
