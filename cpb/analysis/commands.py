"""`cpb report` and `cpb profile`: click commands on a folder `cpb results` downloaded.

Registered at the end of cpb/cli.py; errors are AnalysisError (a ValueError), which
`cpb` prints as one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

_FOLDER = click.Path(path_type=Path, file_okay=False, exists=True)


@click.command()
@click.argument("folder", type=_FOLDER)
@click.option("--data-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="The plate's LoadData CSV: the sites it lists but Image.csv lacks are marked missing or failed.")
@click.option("--object", "object_name", help="Objects counted per well (Count_<object>).  [default: Cells, else Nuclei]")
@click.option("--plate-format", type=click.Choice(["96", "384"]), help="Plate layout.  [default: from the wells]")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for plate-qc.png and plate-qc.html.  [default: FOLDER/report]")
def report(folder: Path, data_file: Optional[Path], object_name: Optional[str], plate_format: Optional[str],
           out_dir: Optional[Path]) -> None:
    """Plate QC report (PNG + one self-contained HTML) of FOLDER, a `cpb results` download:
    objects per well on a plate heatmap, CellProfiler seconds per site, image sets done /
    failed / skipped, and the run records' provenance."""
    from cpb.analysis.report import write_report
    written = write_report(folder, out_dir, data_file, object_name, int(plate_format) if plate_format else None)
    sets = written.qc.sets
    for plate in written.qc.plates:
        marked = plate.problems()
        counts = plate.well_counts()
        click.echo(f"plate {plate.plate}: {len(counts)} wells, {sum(counts.values())} {plate.object_name}"
                   + (f"; marked: {', '.join(f'{w} ({why})' for w, why in marked.items())}" if marked else ""))
    click.echo(f"image sets: {sets['done']} done, {sets['failed']} failed, {sets['skipped']} skipped (resumed)")
    click.echo(f"report: {written.png}")
    click.echo(f"report: {written.html}")


@click.command()
@click.argument("folder", type=_FOLDER)
@click.option("--platemap", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="CSV with one row per well: a well column and annotation columns (e.g. treatment, control).")
@click.option("--well-column", default="well_position", show_default=True, help="The platemap's well column.")
@click.option("--normalize-to", type=click.Choice(["negcon", "plate"]), default="negcon", show_default=True,
              help="Reference for normalization: the negative-control wells, or every well of the plate.")
@click.option("--control-column", default="control", show_default=True,
              help="Platemap column that marks the negative controls.")
@click.option("--negcon", default="negcon", show_default=True, help="Value of --control-column for negative controls.")
@click.option("--method", type=click.Choice(["mad_robustize", "standardize"]), default="mad_robustize",
              show_default=True, help="pycytominer normalization method.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the profile files.  [default: FOLDER/profiles]")
def profile(folder: Path, platemap: Path, well_column: str, normalize_to: str, control_column: str, negcon: str,
            method: str, out_dir: Optional[Path]) -> None:
    """Well-level profiles of FOLDER with pycytominer: aggregate (median per well), annotate
    with the platemap, normalize, feature-select. Reads FOLDER/single_cell.parquet (made
    first from the CSVs when missing) and writes FOLDER/profiles/<plate>_<step>.parquet."""
    from cpb.analysis.profile import make_profiles
    made = make_profiles(folder, platemap, well_column, normalize_to, control_column, negcon, method, out_dir)
    if made.converted:
        click.echo(f"single-cell Parquet: {folder / 'single_cell.parquet'} (converted first)")
    click.echo(f"{made.wells} well profile(s), normalized ({method}) to {made.reference}")
    for plate, files in made.plates.items():
        for step, path in files.items():
            click.echo(f"  {step}: {path} ({made.features.get(step, 0)} features)")
