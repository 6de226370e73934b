"""Everything after `cpb results` in one call, for the demo and scripts:

    from cpb.analysis.downstream import analyse
    done = analyse("demo-output/results", platemap="demo-output/plate/platemap.csv",
                   data_file="demo-output/plate/load_data.csv")
    done.parquet, done.report.png, done.report.html, done.profiles.files["aggregated"]
    done.cells_per_well   # {(plate, well): cells}: from the aggregated profiles (pycytominer)

Same files as `cpb results --parquet`, `cpb report` and `cpb profile` write (docs/CLI.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from cpb.analysis.parquet import to_parquet
from cpb.analysis.profile import Profiles, make_profiles
from cpb.analysis.report import Report, write_report


@dataclass
class Downstream:
    parquet: Path
    report: Report
    profiles: Optional[Profiles]
    cells_per_well: Dict[Tuple[str, str], int]


def analyse(results: "str | Path", platemap: "str | Path | None" = None, data_file: "str | Path | None" = None,
            normalize_to: str = "negcon") -> Downstream:
    """Single-cell Parquet, the plate QC report, and (with a platemap) the profiles."""
    import pandas as pd
    results = Path(results)
    parquet = to_parquet(results)
    report = write_report(results, data_file=data_file)
    profiles = make_profiles(results, platemap, normalize_to=normalize_to) if platemap else None
    counts: Dict[Tuple[str, str], int] = {}
    if profiles:
        for files in profiles.plates.values():
            frame = pd.read_parquet(files["aggregated"], columns=["Metadata_Plate", "Metadata_Well",
                                                                  "Metadata_Object_Count"])
            for plate, well, count in frame.itertuples(index=False):
                counts[(str(plate), str(well))] = int(count)
    return Downstream(parquet, report, profiles, counts)
