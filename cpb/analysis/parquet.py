"""Single-cell Parquet from a run's CellProfiler CSVs, with CytoTable.

    from cpb.analysis.parquet import to_parquet
    path = to_parquet("results/CP1")   # -> results/CP1/single_cell.parquet

CytoTable's `cellprofiler_csv` preset does the work: every table's columns are prefixed
with its compartment (`Cells_AreaShape_Area`), identifiers become `Metadata_*`, and the
cytoplasm of each cell is joined to its cell and nucleus through its parent columns
(`Parent_Cells`, `Parent_Nuclei`), one row per cell. Two things are changed from the preset,
both about keys, as its users' issues ask:
- the image table's `Metadata_Plate`, `Metadata_Well`, `Metadata_Site` and every Image
  feature (`Image_Count_Cells`, `Image_Intensity_...`, `Image_FileName_...`) are kept; the
  preset's join keeps only the image number and file names;
- every join also matches CytoTable's `TableNumber` (a checksum of the Image.csv each row
  came from): a folder holding several exports numbered from 1 (array parts downloaded
  without merging, or two runs side by side) converts without mixing their images. The
  run id from `_cpb/runs.json` is added as `Metadata_RunId`.
A pipeline with one object table (e.g. Nuclei only) gets that table joined to its image.

The tables are staged (linked) into a scratch folder first, so only Image/Cells/Nuclei/
Cytoplasm CSVs are read, whatever else the results folder holds.
"""
from __future__ import annotations

import csv
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from cpb.analysis import AnalysisError

PARQUET_NAME = "single_cell.parquet"
COMPARTMENTS = ("Cytoplasm", "Cells", "Nuclei")  # the Cell Painting objects, joined in this order
IMAGE_TABLE = "Image"
#: kept un-prefixed (as `Metadata_<name>`), so every row says where it was imaged
KEY_METADATA = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")
IDENTIFYING = ("ImageNumber", "ObjectNumber", "TableNumber", *KEY_METADATA, "Parent_Cells", "Parent_Nuclei")


def find_tables(folder: Path, only: Optional[Iterable[str]] = None) -> Dict[str, List[Path]]:
    """{table: [csv, ...]} for Image and the object tables: the merged CSVs at the top of
    the folder, else one per `part-NNNNN/` (array parts that were not merged). `only`: the files
    (relative POSIX paths) that belong to the run, e.g. those `cpb results` just wrote; any other
    table in the folder (an earlier download's) is never read."""
    allowed = None if only is None else set(only)

    def present(path: Path) -> bool:
        return path.is_file() and (allowed is None or path.relative_to(folder).as_posix() in allowed)

    top = {name: folder / f"{name}.csv" for name in (IMAGE_TABLE, *COMPARTMENTS)}
    if present(top[IMAGE_TABLE]):
        return {name: [path] for name, path in top.items() if present(path)}
    parts = sorted(p for p in folder.glob("part-*") if p.is_dir())
    found: Dict[str, List[Path]] = {}
    for part in parts:
        for name in (IMAGE_TABLE, *COMPARTMENTS):
            if present(part / f"{name}.csv"):
                found.setdefault(name, []).append(part / f"{name}.csv")
    if IMAGE_TABLE not in found:
        raise AnalysisError(f"{folder} has no Image.csv (nor part-NNNNN/Image.csv): give the folder `cpb results "
                            "OUTPUT --to DIR` wrote, from a pipeline whose ExportToSpreadsheet exports Image")
    lengths = {name: len(paths) for name, paths in found.items()}
    if len(set(lengths.values())) != 1:
        raise AnalysisError(f"{folder}: the part folders do not all hold the same tables ({lengths}); "
                            "download the run again with `cpb results`")
    return found


def _header(path: Path) -> List[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle), [])


def _joins(compartments: Sequence[str], headers: Dict[str, List[str]]) -> str:
    """DuckDB SQL for CytoTable's join step (table aliases are the lower-case names)."""
    def drop(table: str, *always: str) -> str:
        # identifying metadata a pipeline also exported into object tables would repeat the image's
        extra = [m for m in KEY_METADATA if m in headers[table]]
        return ", ".join(dict.fromkeys([*always, *extra]))

    image_keys = [m for m in KEY_METADATA if m in headers[IMAGE_TABLE]]
    select = ["image.Metadata_TableNumber", "image.Metadata_ImageNumber", *[f"image.{m}" for m in image_keys],
              f"image.* EXCLUDE ({', '.join(['Metadata_TableNumber', 'Metadata_ImageNumber', *image_keys])})"]
    base = compartments[0].lower()
    select.append(f"{base}.* EXCLUDE ({drop(compartments[0], 'Metadata_TableNumber', 'Metadata_ImageNumber')})")
    joins = []
    for name in compartments[1:]:
        alias = name.lower()
        select.append(f"{alias}.* EXCLUDE ({drop(name, 'Metadata_TableNumber', 'Metadata_ImageNumber', 'Metadata_ObjectNumber')})")
        joins.append(f"LEFT JOIN read_parquet('{alias}.parquet') AS {alias} ON "
                     f"{alias}.Metadata_TableNumber = {base}.Metadata_TableNumber "
                     f"AND {alias}.Metadata_ImageNumber = {base}.Metadata_ImageNumber "
                     f"AND {alias}.Metadata_ObjectNumber = {base}.Metadata_{compartments[0]}_Parent_{name}")
    joins.append(f"LEFT JOIN read_parquet('image.parquet') AS image ON "
                 f"image.Metadata_TableNumber = {base}.Metadata_TableNumber "
                 f"AND image.Metadata_ImageNumber = {base}.Metadata_ImageNumber")
    return (f"SELECT {', '.join(select)} FROM read_parquet('{base}.parquet') AS {base} " + " ".join(joins))


def _compartments(tables: Dict[str, List[Path]], folder: Path) -> List[str]:
    present = [name for name in COMPARTMENTS if name in tables]
    if len(present) == len(COMPARTMENTS) or len(present) == 1:
        return present
    raise AnalysisError(f"{folder} has object tables {', '.join(present) or 'none'}: single-cell Parquet needs "
                        "Cells, Nuclei and Cytoplasm (IdentifyPrimary/Secondary/TertiaryObjects, e.g. "
                        "cpb/pipelines/cellpainting.cppipe) or exactly one object table, exported by "
                        "ExportToSpreadsheet")


def run_id_of(folder: Path) -> Optional[str]:
    """The run id the run records in `_cpb/runs.json` share (None for local runs or none saved)."""
    path = folder / "_cpb" / "runs.json"
    if not path.is_file():
        return None
    records = json.loads(path.read_text())
    if any(isinstance(r, dict) and r.get("status") == "downloading" for r in records):
        raise AnalysisError(f"{path}: a `cpb results` into {folder} was interrupted, so it holds files of two runs: "
                            "run `cpb results` again")
    ids = sorted({r.get("run_id") for r in records if isinstance(r, dict) and r.get("run_id")})
    if len(ids) > 1:
        raise AnalysisError(f"{path} mixes runs {', '.join(ids)}: download the output again with `cpb results`")
    return ids[0] if ids else None


DUCKDB_EXTENSIONS = ("sqlite_scanner", "httpfs")


def ensure_duckdb_extensions() -> None:
    """Install the DuckDB extensions CytoTable loads from the `duckdb-ext-*` PyPI packages
    (requirements-analysis.txt) into DuckDB's own extension folder, as its `INSTALL` would
    from the network: CytoTable's `INSTALL` is then a no-op and works offline."""
    import duckdb
    try:
        import duckdb_ext  # namespace package of duckdb-ext-sqlite / duckdb-ext-httpfs
        repos = [Path(p) / "extensions" for p in duckdb_ext.__path__]
    except ImportError:
        repos = []  # another platform: DuckDB downloads them itself on first use
    with duckdb.connect() as connection:
        installed = dict(connection.execute("SELECT extension_name, installed FROM duckdb_extensions()").fetchall())
        for name in DUCKDB_EXTENSIONS:
            if installed.get(name):
                continue
            for repo in repos:
                if (repo / f"v{duckdb.__version__}").is_dir():
                    connection.execute(f"INSTALL {name} FROM '{repo.as_posix()}'")
                    break


def _parsl_config(run_dir: Path):
    """Threads in this process, logs in scratch: CytoTable's default starts a process pool
    (one worker per core) and writes `runinfo/` into the current folder."""
    from parsl.config import Config
    from parsl.executors import ThreadPoolExecutor
    return Config(executors=[ThreadPoolExecutor(max_threads=2, label="cpb_cytotable")], run_dir=str(run_dir),
                  usage_tracking=0)


def to_parquet(folder: "str | os.PathLike[str]", dest: "str | os.PathLike[str] | None" = None,
               run_id: Optional[str] = None, only: Optional[Iterable[str]] = None) -> Path:
    """Convert the CSVs in `folder` (a `cpb results` download) into one single-cell Parquet
    file (default `folder/single_cell.parquet`, replaced if present); return its path. `only`:
    read just these files of the folder (relative paths: the run `cpb results` downloaded)."""
    with warnings.catch_warnings():  # google-api-core (via CytoTable's cloud paths) warns about Python 3.11's
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\.")  # end of life on import
        import cytotable
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    if not folder.is_dir():
        raise AnalysisError(f"{folder} is not a folder: give the folder `cpb results OUTPUT --to DIR` wrote")
    tables = find_tables(folder, only)
    compartments = _compartments(tables, folder)
    headers = {name: _header(paths[0]) for name, paths in tables.items()}
    for name, header in headers.items():
        if "ImageNumber" not in header:
            raise AnalysisError(f"{tables[name][0]} has no ImageNumber column: it is not a CellProfiler table")
    run_id = run_id or run_id_of(folder)
    dest = Path(dest) if dest else folder / PARQUET_NAME
    ensure_duckdb_extensions()
    with tempfile.TemporaryDirectory(prefix="cpb-parquet-") as scratch:
        staged = Path(scratch) / "tables"
        for name, paths in tables.items():
            for path in paths:
                target = staged / (path.parent.name if len(paths) > 1 else "") / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(path.resolve(), target)
        out = Path(scratch) / PARQUET_NAME
        cytotable.convert(
            source_path=str(staged), dest_path=str(out), dest_datatype="parquet", source_datatype="csv",
            preset="cellprofiler_csv", metadata=[IMAGE_TABLE.lower()],
            compartments=[c.lower() for c in compartments], identifying_columns=list(IDENTIFYING),
            joins=_joins(compartments, headers), add_tablenumber=True,
            page_keys={IMAGE_TABLE.lower(): "ImageNumber", **{c.lower(): "ObjectNumber" for c in compartments},
                       "join": "Metadata_ImageNumber"},
            parsl_config=_parsl_config(Path(scratch) / "runinfo"))
        table = pq.read_table(out)
        table = table.append_column("Metadata_RunId", pa.array([run_id or "local"] * table.num_rows, pa.string()))
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        pq.write_table(table, partial)
        os.replace(partial, dest)  # never a half-written file under the final name
    _check_keys(dest)
    return dest


def _check_keys(path: Path) -> None:
    """Every cell once: (TableNumber, ImageNumber, ObjectNumber) is unique."""
    import pyarrow.parquet as pq
    keys = pq.read_table(path, columns=["Metadata_TableNumber", "Metadata_ImageNumber", "Metadata_ObjectNumber"])
    rows = list(zip(*(keys.column(i).to_pylist() for i in range(3))))
    if len(set(rows)) != len(rows):
        raise AnalysisError(f"{path}: {len(rows) - len(set(rows))} cell(s) appear twice after the join; "
                            "this is a bug in cpb (please report it with the results folder)")


def describe(path: Path) -> str:
    """`<path> (<cells> cells x <columns> columns)` for the command line."""
    import pyarrow.parquet as pq
    meta = pq.ParquetFile(path).metadata
    return f"{path} ({meta.num_rows} cells x {meta.num_columns} columns)"
