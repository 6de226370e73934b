"""Single-cell Parquet with CytoTable, from real CellProfiler output of the synthetic plate.

The oracle: every cell CellProfiler found is one row, carrying its own image's
Metadata_Plate/Well/Site, and its Cells_/Nuclei_ columns are those of the cell and
nucleus its cytoplasm names as parents, also when array parts number their images
from 1 each.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from moto import mock_aws

from cpb.analysis import AnalysisError
from cpb.analysis.parquet import PARQUET_NAME, to_parquet
from cpb.cli import cli

from analysis_support import TABLES, read_table, shared_plate_run, split_into_parts

pytestmark = pytest.mark.cellprofiler
REGION, BUCKET = "us-east-1", "cpb-analysis-test"


@pytest.fixture(scope="module")
def plate_run(tmp_path_factory, cellprofiler_env):
    return shared_plate_run(tmp_path_factory, cellprofiler_env)


def _copy_tables(src: Path, dest: Path, tables=TABLES) -> Path:
    dest.mkdir(parents=True)
    for name in tables:
        shutil.copy(src / f"{name}.csv", dest / f"{name}.csv")
    return dest


def _rows(path: Path, columns):
    table = pq.read_table(path, columns=list(columns))
    return list(zip(*(table.column(c).to_pylist() for c in columns)))


def _csv_index(path: Path, key_columns, value_column):
    header, rows = read_table(path)
    keys = [header.index(k) for k in key_columns]
    return {tuple(int(float(r[k])) for k in keys): float(r[header.index(value_column)]) for r in rows}


def test_one_row_per_cell_joined_to_its_own_cell_nucleus_and_image(plate_run, tmp_path):
    folder = _copy_tables(plate_run.analysis, tmp_path / "results")
    path = to_parquet(folder)
    assert path == folder / PARQUET_NAME
    truth = plate_run.plate.truth
    rows = _rows(path, ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ImageNumber",
                        "Metadata_ObjectNumber", "Metadata_Cytoplasm_Parent_Cells", "Metadata_Cytoplasm_Parent_Nuclei",
                        "Cells_AreaShape_Area", "Nuclei_AreaShape_Area", "Image_Count_Cells", "Metadata_RunId"])
    assert len(rows) == sum(truth.values())
    per_site = {}
    for plate, well, site, *_rest in rows:
        per_site[(well, int(site))] = per_site.get((well, int(site)), 0) + 1
    assert per_site == truth and {r[0] for r in rows} == {"CP1"}
    # each row's cell and nucleus columns are those of the parents its cytoplasm names
    cell_area = _csv_index(plate_run.analysis / "Cells.csv", ["ImageNumber", "ObjectNumber"], "AreaShape_Area")
    nucleus_area = _csv_index(plate_run.analysis / "Nuclei.csv", ["ImageNumber", "ObjectNumber"], "AreaShape_Area")
    for _p, well, site, image, obj, parent_cell, parent_nucleus, cell, nucleus, count, run_id in rows:
        assert cell == cell_area[(image, parent_cell)] and nucleus == nucleus_area[(image, parent_nucleus)]
        assert count == truth[(well, int(site))] and run_id == "local"
    keys = _rows(path, ["Metadata_TableNumber", "Metadata_ImageNumber", "Metadata_ObjectNumber"])
    assert len(set(keys)) == len(keys)
    columns = pq.read_schema(path).names
    for prefix in ("Cells_Intensity_MeanIntensity_CorrAGP", "Cytoplasm_Intensity_MeanIntensity_CorrMito",
                   "Nuclei_Texture_", "Cytoplasm_Texture_", "Image_ExecutionTime_", "Image_FileName_DNA"):
        assert any(c.startswith(prefix) for c in columns), prefix
    assert len(columns) == len(set(columns))


def test_array_parts_numbered_from_one_convert_without_collisions(plate_run, tmp_path):
    """Parts not merged (each numbers its images from 1) convert to the same cells as the
    merged tables: CytoTable's TableNumber keeps part 0's image 1 apart from part 1's."""
    merged = to_parquet(_copy_tables(plate_run.analysis, tmp_path / "merged"))
    parts = split_into_parts(plate_run.analysis, tmp_path / "parts", [3, 3, 2])
    assert {read_table(folder / "Image.csv")[1][0][read_table(folder / "Image.csv")[0].index("ImageNumber")]
            for folder, _f, _l in parts} == {"1"}  # really repeated ImageNumbers
    split = to_parquet(tmp_path / "parts")
    columns = ["Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber", "Cells_AreaShape_Area",
               "Nuclei_Intensity_IntegratedIntensity_CorrDNA", "Image_Count_Cells"]
    assert sorted(_rows(split, columns)) == sorted(_rows(merged, columns))
    tables = {t for (t,) in _rows(split, ["Metadata_TableNumber"])}
    assert len(tables) == 3
    keys = _rows(split, ["Metadata_TableNumber", "Metadata_ImageNumber", "Metadata_ObjectNumber"])
    assert len(set(keys)) == len(keys) == sum(plate_run.plate.truth.values())


def test_a_pipeline_with_one_object_table_converts_too(plate_run, tmp_path):
    folder = _copy_tables(plate_run.analysis, tmp_path / "nuclei-only", ("Image", "Nuclei"))
    rows = _rows(to_parquet(folder), ["Metadata_Well", "Nuclei_AreaShape_Area", "Image_Count_Nuclei"])
    assert len(rows) == sum(plate_run.plate.truth.values())


def test_unusable_folders_get_one_clear_line(plate_run, tmp_path):
    with pytest.raises(AnalysisError, match="is not a folder"):
        to_parquet(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="has no Image.csv.*cpb results"):
        to_parquet(tmp_path / "empty")
    folder = _copy_tables(plate_run.analysis, tmp_path / "two", ("Image", "Cells", "Nuclei"))
    with pytest.raises(AnalysisError, match="needs Cells, Nuclei and Cytoplasm"):
        to_parquet(folder)


# ----------------------------------------------------------------------------- cpb results --parquet

def _upload_part(s3, output: str, folder: Path, index: int, first: int, last: int, total: int, run_id: str):
    files = []
    for path in sorted(folder.glob("*.csv")):
        body = path.read_bytes()
        s3.put_object(Bucket=BUCKET, Key=f"{output}/part-{index:05d}/{path.name}", Body=body)
        files.append({"key": path.name, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()})
    record = {"status": "succeeded", "first": first, "last": last, "image_set_count": total, "array_index": index,
              "run_id": run_id, "files": files, "cellprofiler_version": "4.2.8", "pipeline_sha256": "ab" * 32}
    s3.put_object(Bucket=BUCKET, Key=f"{output}/part-{index:05d}/_cpb/run.json", Body=json.dumps(record))


def test_cpb_results_parquet_merges_parts_then_converts(plate_run, tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("CPB_") or key in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("PATH", str(tmp_path / "no-pulumi"))
    monkeypatch.setenv("CPB_HOME", str(tmp_path / "cpb-home"))
    monkeypatch.setenv("CPB_BUCKET", BUCKET)
    parts = split_into_parts(plate_run.analysis, tmp_path / "parts", [4, 4])
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET)
        for index, (folder, first, last) in enumerate(parts):
            _upload_part(s3, "results/CP1", folder, index, first, last, 8, "3f2a00000000000000aa")
        dest = tmp_path / "downloaded"
        result = CliRunner().invoke(cli, ["results", "results/CP1", "--to", str(dest), "--parts", "2", "--parquet"])
    assert result.exit_code == 0, result.output
    assert f"single-cell Parquet: {dest / PARQUET_NAME} ({sum(plate_run.plate.truth.values())} cells x" in result.output
    rows = _rows(dest / PARQUET_NAME, ["Metadata_Well", "Metadata_Site", "Metadata_ImageNumber", "Metadata_RunId"])
    per_site = {}
    for well, site, image, run_id in rows:
        per_site[(well, int(site))] = per_site.get((well, int(site)), 0) + 1
        assert run_id == "3f2a00000000000000aa"
    assert per_site == plate_run.plate.truth
    assert sorted({image for _w, _s, image, _r in rows}) == list(range(1, 9))  # merged: global numbers


@pytest.mark.race
def test_cpb_results_parquet_reads_only_this_runs_tables(plate_run, tmp_path, monkeypatch):
    """Adversary: `cpb results ... --to DIR --parquet` into a folder that holds an earlier run's
    Cells.csv and Cytoplasm.csv, the new run's pipeline exporting Image and Nuclei only. The
    results command warned about the foreign files, then CytoTable joined the earlier run's cells
    to this run's images and nuclei: a single_cell.parquet of two runs, labelled with this run's id."""
    for key in list(os.environ):
        if key.startswith("CPB_") or key in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("PATH", str(tmp_path / "no-pulumi"))
    monkeypatch.setenv("CPB_HOME", str(tmp_path / "cpb-home"))
    monkeypatch.setenv("CPB_BUCKET", BUCKET)
    dest = _copy_tables(plate_run.analysis, tmp_path / "downloaded")  # the earlier run, all four tables
    nuclei_only = _copy_tables(plate_run.analysis, tmp_path / "new-run", ("Image", "Nuclei"))
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET)
        files = []
        for path in sorted(nuclei_only.glob("*.csv")):
            body = path.read_bytes()
            s3.put_object(Bucket=BUCKET, Key=f"results/CP2/{path.name}", Body=body)
            files.append({"key": path.name, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()})
        record = {"status": "succeeded", "first": 1, "last": 8, "image_set_count": 8, "array_index": None,
                  "run_id": "5e0b00000000000000bb", "files": files, "cellprofiler_version": "4.2.8",
                  "pipeline_sha256": "cd" * 32}
        s3.put_object(Bucket=BUCKET, Key="results/CP2/_cpb/run.json", Body=json.dumps(record))
        result = CliRunner().invoke(cli, ["results", "results/CP2", "--to", str(dest), "--parquet"])
    assert result.exit_code == 0, result.output
    assert "are not from results/CP2" in result.output  # the warning stays
    columns = pq.read_schema(dest / PARQUET_NAME).names
    assert not [c for c in columns if c.startswith(("Cells_", "Cytoplasm_"))], "joined another run's tables"
    assert any(c.startswith("Nuclei_") for c in columns)
    assert pq.read_metadata(dest / PARQUET_NAME).num_rows == sum(plate_run.plate.truth.values())
