"""Well-level profiles from the single-cell Parquet, with pycytominer.

    from cpb.analysis.profile import make_profiles
    result = make_profiles("results/CP1", platemap="platemap.csv")   # normalize to negcon wells
    result.files["aggregated"]   # results/CP1/profiles/CP1_aggregated.parquet

The steps are pycytominer's, in the order every Cell Painting recipe runs them:
  aggregate       median of every cell feature per well (strata Metadata_Plate, Metadata_Well);
                  Metadata_Object_Count = cells in the well
  annotate        join the platemap (its well column to Metadata_Well; its columns become
                  Metadata_<column>)
  normalize       mad_robustize (or standardize) against the negative-control wells
                  (`Metadata_<control column> == <negcon>`) or the whole plate
  feature_select  drop features that barely vary, are >0.9 correlated with another,
                  are on pycytominer's blocklist, or have missing values
Files, one per plate and step: `<folder>/profiles/<plate>_<step>.parquet` with step one of
aggregated, annotated, normalized, normalized_feature_select.
"""
from __future__ import annotations

import csv
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from cpb.analysis import AnalysisError
from cpb.analysis.parquet import PARQUET_NAME, to_parquet
from cpb.analysis.report import parse_well

PROFILE_DIR = "profiles"
STEPS = ("aggregated", "annotated", "normalized", "normalized_feature_select")
FEATURE_SELECT = ["variance_threshold", "correlation_threshold", "blocklist", "drop_na_columns"]
METHODS = ("mad_robustize", "standardize")


@dataclass
class Profiles:
    """What make_profiles wrote and the numbers it printed."""

    files: Dict[str, Path] = field(default_factory=dict)       # step -> file (the last plate's for each step)
    plates: Dict[str, Dict[str, Path]] = field(default_factory=dict)  # plate -> step -> file
    wells: int = 0
    features: Dict[str, int] = field(default_factory=dict)     # step -> feature columns
    reference: str = ""
    converted: bool = False


def read_platemap(path: "str | Path", well_column: str = "well_position") -> List[Dict[str, str]]:
    """The platemap's rows; AnalysisError naming the problem when it cannot be used."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise AnalysisError(f"platemap {path} not found: give a CSV with a {well_column} column (A01, A02, ...) "
                            "and one column per annotation (e.g. treatment, control)") from None
    except UnicodeDecodeError:
        raise AnalysisError(f"platemap {path} is not UTF-8 text: save it as CSV (UTF-8)") from None
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    reader = csv.DictReader(text.splitlines(), delimiter=sep)
    columns = [c.strip() for c in reader.fieldnames or []]
    if well_column not in columns:
        hint = " (it looks ;-separated: save it as comma-separated CSV)" if len(columns) == 1 and ";" in columns[0] else ""
        raise AnalysisError(f"platemap {path.name} has no {well_column!r} column (it has {', '.join(columns) or 'none'})"
                            f"{hint}: name the column holding the wells {well_column}, or pass --well-column")
    rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    if not rows:
        raise AnalysisError(f"platemap {path.name} lists no wells (only a header)")
    seen: Dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        well = row[well_column]
        try:
            parse_well(well)
        except AnalysisError:
            raise AnalysisError(f"platemap {path.name} line {line}: {well_column} {well!r} is not a well like A01 "
                                "or P24: fix that row") from None
        canonical = "{}{:02d}".format(*(lambda r, c: (chr(ord('A') + r), c + 1))(*parse_well(well)))
        if canonical in seen:
            raise AnalysisError(f"platemap {path.name} lists well {canonical} twice (lines {seen[canonical]} and "
                                f"{line}): keep one row per well")
        seen[canonical] = line
        row[well_column] = canonical
    return rows


def _features(frame) -> List[str]:
    from pycytominer.cyto_utils import infer_cp_features
    return infer_cp_features(frame)


def make_profiles(folder: "str | os.PathLike[str]", platemap: "str | os.PathLike[str]",
                  well_column: str = "well_position", normalize_to: str = "negcon",
                  control_column: str = "control", negcon: str = "negcon", method: str = "mad_robustize",
                  out_dir: "str | os.PathLike[str] | None" = None) -> Profiles:
    """Aggregate, annotate, normalize and feature-select `folder/single_cell.parquet`
    (converted first from the CSVs when it is not there yet)."""
    import pandas as pd
    import pycytominer

    folder = Path(folder)
    if normalize_to not in ("negcon", "plate"):
        raise AnalysisError(f"--normalize-to {normalize_to}: choose negcon (the negative-control wells) or plate")
    if method not in METHODS:
        raise AnalysisError(f"--method {method}: choose one of {', '.join(METHODS)}")
    rows = read_platemap(platemap, well_column)
    if normalize_to == "negcon":
        if control_column not in rows[0]:
            raise AnalysisError(f"platemap {Path(platemap).name} has no {control_column!r} column to find the "
                                f"negative controls in: add it (e.g. {negcon} / trt), pass --control-column, or "
                                "normalize to the whole plate (--normalize-to plate)")
    result = Profiles()
    single_cell = folder / PARQUET_NAME
    if not single_cell.is_file():
        if not (folder / "Image.csv").is_file():
            raise AnalysisError(f"{folder} has no {PARQUET_NAME} and no Image.csv: run `cpb results OUTPUT --to "
                                f"{folder} --parquet` first")
        to_parquet(folder)
        result.converted = True
    cells = pd.read_parquet(single_cell)
    for column in ("Metadata_Plate", "Metadata_Well"):
        if column not in cells.columns:
            raise AnalysisError(f"{single_cell} has no {column} column: the pipeline's LoadData must carry "
                                "Metadata_Plate and Metadata_Well (cpb loaddata writes them)")
    cells["Metadata_Well"] = ["{}{:02d}".format(chr(ord("A") + r), c + 1)
                              for r, c in map(parse_well, cells["Metadata_Well"].astype(str))]
    listed = {row[well_column] for row in rows}
    unknown = sorted(set(cells["Metadata_Well"]) - listed)
    if unknown:
        raise AnalysisError(f"platemap {Path(platemap).name} does not list well(s) {', '.join(unknown[:8])}"
                            f"{' ...' if len(unknown) > 8 else ''} that have cells: add a row per well "
                            "(or remove those wells' images)")
    for plate, plate_cells in cells.groupby("Metadata_Plate", sort=True):
        wells = sorted(set(plate_cells["Metadata_Well"]))
        if len(wells) < 2:  # nothing to normalize against, and no variance to select features by
            raise AnalysisError(f"plate {plate}: profiles need at least 2 wells with cells to normalize and compare "
                                f"(found {len(wells)}: {', '.join(wells)}): image more wells of the plate (the "
                                "single-cell Parquet and cpb report need none)")
    if normalize_to == "negcon":
        for plate, plate_cells in cells.groupby("Metadata_Plate", sort=True):
            controls = sorted(set(plate_cells["Metadata_Well"]) & {row[well_column] for row in rows
                                                                  if row.get(control_column) == negcon})
            if len(controls) < 2:
                raise AnalysisError(f"plate {plate}: normalizing to negative controls needs at least 2 wells with "
                                    f"cells whose {control_column} is {negcon!r} in the platemap (found "
                                    f"{len(controls)}: {', '.join(controls) or 'none'}): add controls to the "
                                    "platemap, or normalize to the whole plate (--normalize-to plate)")
    platemap_frame = pd.DataFrame(rows)
    out = Path(out_dir) if out_dir else folder / PROFILE_DIR
    out.mkdir(parents=True, exist_ok=True)
    for plate, plate_cells in cells.groupby("Metadata_Plate", sort=True):
        files = _plate_profiles(str(plate), plate_cells, platemap_frame, well_column, normalize_to, control_column,
                                negcon, method, out, pycytominer, result)
        result.plates[str(plate)] = files
        result.files = files
    return result


def _plate_profiles(plate: str, cells, platemap, well_column: str, normalize_to: str, control_column: str,
                    negcon: str, method: str, out: Path, pycytominer, result: Profiles) -> Dict[str, Path]:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", plate)
    files = {step: out / f"{safe}_{step}.parquet" for step in STEPS}
    features = _features(cells)
    if not features:
        raise AnalysisError(f"plate {plate}: no Cells_/Nuclei_/Cytoplasm_ feature columns in the single-cell table")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas/sklearn chatter about dtypes and zero variance
        aggregated = pycytominer.aggregate(cells, strata=["Metadata_Plate", "Metadata_Well"], features=features,
                                           operation="median", compute_object_count=True,
                                           object_feature="Metadata_ObjectNumber")
        annotated = pycytominer.annotate(aggregated, platemap, join_on=[f"Metadata_{well_column}", "Metadata_Well"])
        column = f"Metadata_{control_column}"
        if normalize_to == "negcon":
            controls = sorted(annotated.loc[annotated[column] == negcon, "Metadata_Well"])
            samples = f"{column} == '{negcon}'"
            result.reference = f"{len(controls)} negative-control wells ({', '.join(controls)})"
        else:
            samples = "all"
            result.reference = f"all {len(annotated)} wells of the plate"
        normalized = pycytominer.normalize(annotated, features=features, samples=samples, method=method)
        selected = pycytominer.feature_select(normalized, features=features, operation=FEATURE_SELECT)
    for step, frame in zip(STEPS, (aggregated, annotated, normalized, selected)):
        partial = files[step].with_name(files[step].name + ".partial")
        frame.to_parquet(partial, index=False)
        os.replace(partial, files[step])
        result.features[step] = sum(1 for c in frame.columns if not c.startswith("Metadata_"))
    result.wells += len(aggregated)
    return files
