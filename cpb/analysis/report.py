"""A plate QC report from a downloaded results folder: one PNG and one self-contained HTML.

    from cpb.analysis.report import write_report
    report = write_report("results/CP1")          # -> results/CP1/report/plate-qc.{png,html}

What it shows, and where each number comes from:
- a 96- or 384-well plate heatmap of objects per well (`Count_Cells`, else `Count_Nuclei`,
  summed over the well's sites in Image.csv); wells with a missing, failed or erroring site
  are boxed in red and say why; wells without images are grey;
- per-site CellProfiler seconds: the sum of Image.csv's `ExecutionTime_*` columns per image set
  (CellProfiler 4.2 records each module's CPU seconds there, so a busy machine does not inflate them);
- image sets done / failed / skipped: from the run records (`_cpb/runs.json`, which
  `cpb results` saves; `_cpb/run.json` for a `cpb run --local` folder): a record with
  `resumed_from` was skipped (reused from an earlier run), a failed record's range failed;
- the provenance of every record: run id, status, range, CellProfiler version, image,
  pipeline sha256.
Expected sites come from the plate's LoadData CSV when given (`data_file`, rows = image
sets); otherwise every well seen is expected to have as many sites as the fullest one.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from cpb.analysis import AnalysisError

REPORT_DIR = "report"
PNG_NAME, HTML_NAME = "plate-qc.png", "plate-qc.html"
FORMATS = {96: (8, 12), 384: (16, 24)}
_WELL = re.compile(r"^([A-Pa-p])0*([1-9][0-9]?)$")


def parse_well(name: str) -> Tuple[int, int]:
    """(row, column), 0-based, of a well name like A01, a1 or P24."""
    match = _WELL.match(name.strip())
    if not match or not 1 <= int(match.group(2)) <= 24:
        raise AnalysisError(f"well {name!r} is not a plate well name like A01 or P24 "
                            "(check the Metadata_Well column)")
    return ord(match.group(1).upper()) - ord("A"), int(match.group(2)) - 1


def well_name(row: int, col: int) -> str:
    return f"{chr(ord('A') + row)}{col + 1:02d}"


@dataclass
class Site:
    plate: str
    well: str
    site: str
    image_number: Optional[int] = None
    count: Optional[int] = None
    seconds: Optional[float] = None
    status: str = "ok"          # ok | missing | failed | error
    note: str = ""


@dataclass
class PlateQC:
    """Everything the report draws for one plate."""

    plate: str
    plate_format: int
    object_name: str
    sites: List[Site]

    def well_counts(self) -> Dict[str, int]:
        """Objects per well over the sites that ran."""
        out: Dict[str, int] = {}
        for site in self.sites:
            if site.count is not None:
                out[site.well] = out.get(site.well, 0) + site.count
        return out

    def problems(self) -> Dict[str, str]:
        """Well -> why it is marked (sites missing, failed or erroring)."""
        out: Dict[str, List[str]] = {}
        for site in self.sites:
            if site.status != "ok":
                out.setdefault(site.well, []).append(f"s{site.site} {site.status}")
        return {well: ", ".join(reasons) for well, reasons in out.items()}

    def matrix(self):
        """rows x columns of objects per well; NaN where the plate has no images."""
        import numpy as np
        rows, cols = FORMATS[self.plate_format]
        grid = np.full((rows, cols), np.nan)
        counts = self.well_counts()
        for well in {s.well for s in self.sites}:
            grid[parse_well(well)] = counts.get(well, 0)
        return grid


@dataclass
class QC:
    plates: List[PlateQC]
    sets: Dict[str, int]
    records: List[dict]
    notes: List[str] = field(default_factory=list)


def _read_csv(path: Path) -> Tuple[List[str], List[Dict[str, str]]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def read_records(folder: Path) -> List[dict]:
    """The run records saved with the results (`_cpb/runs.json`), else a local run's `_cpb/run.json`."""
    for name, many in (("runs.json", True), ("run.json", False)):
        path = folder / "_cpb" / name
        if path.is_file():
            try:
                value = json.loads(path.read_text())
            except ValueError:
                raise AnalysisError(f"{path} is not valid JSON: download the results again with `cpb results`") from None
            records = value if many else [dict(value, part="")]
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise AnalysisError(f"{path} is not a list of run records: download the results again")
            if any(r.get("status") == "downloading" for r in records):
                raise AnalysisError(f"{path}: a `cpb results` into {folder} was interrupted, so it holds files of "
                                    "two runs: run `cpb results` again")
            return records
    return []


def _number(value: Optional[str]) -> Optional[float]:
    try:
        number = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return None if number is None or math.isnan(number) else number


def collect(folder: "str | Path", data_file: "str | Path | None" = None, object_name: Optional[str] = None,
            plate_format: Optional[int] = None) -> QC:
    """Read Image.csv, the run records and (optionally) the LoadData CSV into a QC."""
    folder = Path(folder)
    image_csv = folder / "Image.csv"
    if not image_csv.is_file():
        raise AnalysisError(f"{folder} has no Image.csv: give the folder `cpb results OUTPUT --to DIR` wrote")
    header, rows = _read_csv(image_csv)
    for column in ("ImageNumber", "Metadata_Well", "Metadata_Site"):
        if column not in header:
            raise AnalysisError(f"{image_csv} has no {column} column: the plate report needs Metadata_Well and "
                                "Metadata_Site per image set (LoadData columns, e.g. from `cpb loaddata`)")
    counts = [c for c in header if c.startswith("Count_")]
    if object_name is None:
        object_name = next((o for o in ("Cells", "Nuclei") if f"Count_{o}" in header),
                           counts[0][len("Count_"):] if counts else None)
    if object_name is None or f"Count_{object_name}" not in header:
        raise AnalysisError(f"{image_csv} has no Count_{object_name or '<object>'} column (it has "
                            f"{', '.join(counts) or 'no Count_ columns'}): choose one with --object")
    timing = [c for c in header if c.startswith("ExecutionTime_")]
    errors = [c for c in header if c.startswith("ModuleError_")]
    records = read_records(folder)
    plate_of = lambda row: row.get("Metadata_Plate") or "plate"  # noqa: E731

    sites: Dict[Tuple[str, str, str], Site] = {}
    numbers: Dict[int, Tuple[str, str, str]] = {}
    for row in rows:
        key = (plate_of(row), row["Metadata_Well"], str(int(_number(row["Metadata_Site"]) or 0)))
        parse_well(key[1])
        bad = [c[len("ModuleError_"):] for c in errors if (_number(row.get(c)) or 0) > 0]
        count = _number(row.get(f"Count_{object_name}"))
        site = Site(*key, image_number=int(float(row["ImageNumber"])),
                    count=None if count is None else int(count),
                    seconds=sum(_number(row.get(c)) or 0.0 for c in timing) if timing else None,
                    status="error" if bad else "ok", note=f"module error in {', '.join(bad)}" if bad else "")
        sites[key] = site
        numbers[site.image_number] = key

    expected: Dict[int, Tuple[str, str, str]] = {}
    if data_file is not None:
        data_header, data_rows = _read_csv(Path(data_file))
        if "Metadata_Well" not in data_header or "Metadata_Site" not in data_header:
            raise AnalysisError(f"{data_file} has no Metadata_Well/Metadata_Site columns: give the plate's LoadData CSV")
        for number, row in enumerate(data_rows, start=1):
            expected[number] = (plate_of(row), row["Metadata_Well"], str(int(_number(row["Metadata_Site"]) or 0)))
    else:
        # every well seen is expected to have as many sites as the fullest well of its plate;
        # the image set numbers of sites that never ran are unknown (negative placeholders)
        most: Dict[str, int] = {}
        for plate, _well, site in sites:
            most[plate] = max(most.get(plate, 0), int(site))
        absent = sorted({(plate, well, str(s)) for plate, well, _site in sites
                         for s in range(1, most[plate] + 1)} - set(sites))
        expected = {-index: key for index, key in enumerate(absent, start=1)}
    failed_numbers = set()
    for record in records:
        if record.get("status") != "succeeded" and record.get("first") and record.get("last"):
            failed_numbers |= set(range(int(record["first"]), int(record["last"]) + 1))
    for number, key in expected.items():
        if key in sites:
            continue
        failed = number in failed_numbers
        sites[key] = Site(*key, image_number=number if number > 0 else None, status="failed" if failed else "missing",
                          note="its run record failed" if failed else "not in Image.csv")

    def span(record: dict) -> int:
        if record.get("first") and record.get("last"):
            return int(record["last"]) - int(record["first"]) + 1
        return int(record.get("image_set_count") or 0)

    sets = {"done": 0, "failed": 0, "skipped": 0}
    for record in records:
        if record.get("status") != "succeeded":
            sets["failed"] += span(record)
        elif record.get("resumed_from"):
            sets["skipped"] += span(record)
        else:
            sets["done"] += span(record)
    notes = []
    if not records:
        sets["done"] = len(rows)
        notes.append("no run records (_cpb/runs.json) in the folder: counts are Image.csv's rows")
    sets["errors"] = sum(1 for s in sites.values() if s.status == "error")
    sets["missing"] = sum(1 for s in sites.values() if s.status == "missing")

    plates = []
    for plate in sorted({key[0] for key in sites}):
        members = sorted((s for s in sites.values() if s.plate == plate),
                         key=lambda s: (parse_well(s.well), int(s.site)))
        fmt = plate_format or (96 if all(parse_well(s.well)[0] < 8 and parse_well(s.well)[1] < 12 for s in members)
                               else 384)
        if fmt not in FORMATS:
            raise AnalysisError(f"plate format {fmt} is not supported: use 96 or 384")
        outside = [s.well for s in members if parse_well(s.well)[0] >= FORMATS[fmt][0]
                   or parse_well(s.well)[1] >= FORMATS[fmt][1]]
        if outside:
            raise AnalysisError(f"well {outside[0]} is not on a {fmt}-well plate: use --plate-format 384")
        plates.append(PlateQC(plate, fmt, object_name, members))
    return QC(plates, sets, records, notes)


def build_figure(qc: QC):
    """The report picture: a heatmap per plate, per-site seconds, run summary and provenance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    n = len(qc.plates)
    fig = plt.figure(figsize=(11, 4.6 * n + 3.6), dpi=100)
    grid = fig.add_gridspec(n + 1, 2, height_ratios=[4.6] * n + [3.6], width_ratios=[1.35, 1])
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    for index, plate in enumerate(qc.plates):
        ax = fig.add_subplot(grid[index, :])
        values = plate.matrix()
        finite = values[~np.isnan(values)]
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        image = ax.imshow(values, cmap=cmap, vmin=0, vmax=vmax, aspect="equal")
        image.set_gid(f"heatmap:{plate.plate}")
        rows, cols = values.shape
        ax.set_xticks(range(cols), [str(c + 1) for c in range(cols)], fontsize=8 if cols > 12 else 10)
        ax.set_yticks(range(rows), [chr(ord("A") + r) for r in range(rows)], fontsize=8 if rows > 8 else 10)
        ax.tick_params(top=True, labeltop=True, bottom=False, labelbottom=False, length=0)
        problems = plate.problems()
        for r in range(rows):
            for c in range(cols):
                if not np.isnan(values[r, c]) and cols <= 12:
                    dark = values[r, c] < 0.6 * vmax
                    ax.text(c, r + 0.05, f"{int(values[r, c])}", ha="center", va="center", fontsize=9,
                            color="white" if dark else "black")
        for well in problems:
            r, c = parse_well(well)
            ax.add_patch(Rectangle((c - 0.46, r - 0.46), 0.92, 0.92, fill=False, edgecolor="#e0301e", linewidth=2.5))
        bar = fig.colorbar(image, cax=make_axes_locatable(ax).append_axes("right", size="2%", pad=0.08))
        bar.set_label(f"{plate.object_name} per well")
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        marked = f"; red box = sites missing/failed: {', '.join(f'{w} ({why})' for w, why in problems.items())}" \
            if problems else "; every expected site ran"
        ax.set_title(f"Plate {plate.plate}: {plate.object_name} per well ({plate.plate_format}-well plate, grey = no "
                     f"images){marked}", fontsize=10, loc="left")

    ax = fig.add_subplot(grid[n, 0])
    sites = [s for p in qc.plates for s in p.sites if s.seconds is not None]
    sites.sort(key=lambda s: s.image_number or 0)
    if sites:
        ax.bar(range(len(sites)), [s.seconds for s in sites], color="#3b6ea8")
        labels = [f"{s.well}\ns{s.site}" for s in sites]
        step = max(1, len(sites) // 24)
        ax.set_xticks(range(0, len(sites), step), labels[::step], fontsize=7)
        median = sorted(s.seconds for s in sites)[len(sites) // 2]
        ax.axhline(median, color="#e0801e", linewidth=1)
        ax.set_title(f"CellProfiler CPU seconds per site (ExecutionTime_* summed; median {median:.2f} s, "
                     f"total {sum(s.seconds for s in sites):.1f} s)", fontsize=9, loc="left")
        ax.set_ylabel("seconds")
    else:
        ax.text(0.5, 0.5, "no ExecutionTime_* columns in Image.csv", ha="center", va="center")
        ax.set_axis_off()

    ax = fig.add_subplot(grid[n, 1])
    ax.set_axis_off()
    lines = [f"image sets: {qc.sets['done']} done, {qc.sets['failed']} failed, {qc.sets['skipped']} skipped (resumed)",
             f"sites missing: {qc.sets['missing']}, with module errors: {qc.sets['errors']}", ""]
    for record in provenance(qc.records)[:6]:
        lines.append(f"{record['part'] or 'run'}: {record['status']}  sets {record['range']}  run {record['run_id']}")
        lines.append(f"   CellProfiler {record['cellprofiler_version']}  pipeline {record['pipeline_sha256'][:12]}")
        lines.append(f"   image {record['image'][:60]}")
    if len(qc.records) > 6:
        lines.append(f"... {len(qc.records) - 6} more run records (see the HTML report)")
    lines += qc.notes
    ax.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=8, family="monospace", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def provenance(records: List[dict]) -> List[Dict[str, str]]:
    """One line of provenance per run record, missing values as '-'."""
    out = []
    for record in records:
        first, last = record.get("first"), record.get("last")
        out.append({
            "part": str(record.get("part") or ""),
            "status": str(record.get("status") or "-") + (" (resumed)" if record.get("resumed_from") else ""),
            "range": f"{first}-{last}" if first and last else "-",
            "run_id": str(record.get("run_id") or "local"),
            "cellprofiler_version": str(record.get("cellprofiler_version") or "-"),
            "image": str(record.get("image") or (record.get("fingerprint") or {}).get("image") or "-"),
            "pipeline_sha256": str(record.get("pipeline_sha256") or "-"),
            "resumed_from": str(record.get("resumed_from") or ""),
            "seconds": str((record.get("timings") or {}).get("total", "-")),
            "reason": str(record.get("reason") or ""),
        })
    return out


def _table(header: List[str], rows: List[List[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report_data(qc: QC) -> dict:
    """The numbers the report shows, as JSON (embedded in the HTML for tools and tests)."""
    return {"plates": [{"plate": p.plate, "format": p.plate_format, "object": p.object_name,
                        "wells": p.well_counts(), "marked": p.problems(),
                        "sites": [{"well": s.well, "site": s.site, "image_number": s.image_number, "count": s.count,
                                   "seconds": s.seconds, "status": s.status, "note": s.note} for s in p.sites]}
                       for p in qc.plates],
            "image_sets": qc.sets, "provenance": provenance(qc.records), "notes": qc.notes}


def render_html(qc: QC, png: bytes, title: str) -> str:
    """One HTML file with everything inline (the picture as a data: URI, no scripts, no links)."""
    data = report_data(qc)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p><img alt="plate QC" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>',
             "<h2>Image sets</h2>",
             _table(["done", "failed", "skipped (resumed)", "sites missing", "sites with module errors"],
                    [[qc.sets["done"], qc.sets["failed"], qc.sets["skipped"], qc.sets["missing"], qc.sets["errors"]]])]
    for plate in qc.plates:
        rows, cols = FORMATS[plate.plate_format]
        counts, marked = plate.well_counts(), plate.problems()
        wells = {parse_well(s.well): s.well for s in plate.sites}
        grid = []
        for r in range(rows):
            line = [chr(ord("A") + r)]
            for c in range(cols):
                name = wells.get((r, c))
                line.append("" if name is None else f"{counts.get(name, 0)}{' !' if name in marked else ''}")
            grid.append(line)
        parts += [f"<h2>Plate {html.escape(plate.plate)}: {html.escape(plate.object_name)} per well</h2>",
                  _table([""] + [str(c + 1) for c in range(cols)], grid),
                  "<p>! = a site of that well is missing, failed or had a module error (below).</p>",
                  _table(["well", "site", "image set", plate.object_name, "CellProfiler CPU s", "status", "note"],
                         [[s.well, s.site, s.image_number or "-", "-" if s.count is None else s.count,
                           "-" if s.seconds is None else f"{s.seconds:.2f}", s.status, s.note] for s in plate.sites])]
    prov = data["provenance"]
    parts += ["<h2>Run records (provenance)</h2>",
              _table(["part", "status", "image sets", "run id", "CellProfiler", "image", "pipeline sha256",
                      "resumed from", "seconds", "reason"],
                     [[p["part"] or "-", p["status"], p["range"], p["run_id"], p["cellprofiler_version"], p["image"],
                       p["pipeline_sha256"], p["resumed_from"] or "-", p["seconds"], p["reason"]] for p in prov])]
    parts += [f"<p>{html.escape(note)}</p>" for note in qc.notes]
    style = ("body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:2px 6px;font-size:12px;text-align:right}img{max-width:100%}")
    payload = json.dumps(data, sort_keys=True).replace("</", "<\\/")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}"
            f"<script type=\"application/json\" id=\"cpb-report-data\">{payload}</script></body></html>\n")


@dataclass
class Report:
    png: Path
    html: Path
    qc: QC


def write_report(folder: "str | Path", out_dir: "str | Path | None" = None, data_file: "str | Path | None" = None,
                 object_name: Optional[str] = None, plate_format: Optional[int] = None) -> Report:
    """Write `<out_dir>/plate-qc.png` and `plate-qc.html` (default out_dir: `<folder>/report`)."""
    import matplotlib.pyplot as plt
    folder = Path(folder)
    qc = collect(folder, data_file, object_name, plate_format)
    out = Path(out_dir) if out_dir else folder / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    fig = build_figure(qc)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    png = buffer.getvalue()
    (out / PNG_NAME).write_bytes(png)
    title = f"Plate QC: {', '.join(p.plate for p in qc.plates)} ({folder.resolve().name})"
    (out / HTML_NAME).write_text(render_html(qc, png, title), encoding="utf-8")
    return Report(out / PNG_NAME, out / HTML_NAME, qc)
