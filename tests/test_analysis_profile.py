"""`cpb profile`: the plate through CellProfiler -> merged CSVs -> Parquet (CytoTable) ->
pycytominer gives one row per well whose cell count is the generator's truth; the treated
wells' extra mitochondria show in the normalized profile; bad platemaps get one line."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cpb.analysis import AnalysisError
from cpb.analysis.downstream import analyse
from cpb.analysis.profile import STEPS, make_profiles
from cpb.cli import cli
from cpb.demo.cellpainting import NEGATIVE_CONTROL, PHENOTYPE

from analysis_support import shared_plate_run

pytestmark = pytest.mark.cellprofiler


@pytest.fixture(scope="module")
def results(tmp_path_factory, cellprofiler_env):
    """A results folder holding the run's merged CSVs, converted once to single-cell Parquet."""
    run = shared_plate_run(tmp_path_factory, cellprofiler_env)
    folder = tmp_path_factory.mktemp("profile-results")
    for name in ("Image", "Cells", "Nuclei", "Cytoplasm"):
        shutil.copy(run.analysis / f"{name}.csv", folder / f"{name}.csv")
    shutil.copytree(run.analysis / "_cpb", folder / "_cpb")
    return run, folder


def _platemap(path: Path, rows, header=("well_position", "treatment", "control")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_one_profile_per_well_whose_cell_count_is_the_truth(results, tmp_path):
    run, folder = results
    done = analyse(folder, platemap=run.plate.platemap_file, data_file=run.plate.data_file)
    assert done.parquet == folder / "single_cell.parquet" and done.report.png.is_file()
    truth = run.plate.well_truth()
    assert done.cells_per_well == {("CP1", well): count for well, count in truth.items()}
    files = done.profiles.plates["CP1"]
    assert [files[s].name for s in STEPS] == ["CP1_aggregated.parquet", "CP1_annotated.parquet",
                                              "CP1_normalized.parquet", "CP1_normalized_feature_select.parquet"]
    aggregated = pd.read_parquet(files["aggregated"])
    assert sorted(aggregated["Metadata_Well"]) == sorted(truth) and len(aggregated) == len(truth)
    # the aggregate is the median of the cells of each well
    cells = pd.read_parquet(done.parquet, columns=["Metadata_Well", "Cells_AreaShape_Area"])
    medians = cells.groupby("Metadata_Well")["Cells_AreaShape_Area"].median()
    assert aggregated.set_index("Metadata_Well")["Cells_AreaShape_Area"].to_dict() == pytest.approx(medians.to_dict())
    annotated = pd.read_parquet(files["annotated"]).set_index("Metadata_Well")
    assert annotated["Metadata_treatment"].to_dict() == run.plate.treatments
    assert done.profiles.reference == "2 negative-control wells (A01, B01)"


def test_the_treated_wells_stand_out_after_normalizing_to_controls(results):
    """The generator gives compound-M wells more and brighter mitochondria: normalized to
    the DMSO wells (mad_robustize: controls' median 0), their cytoplasmic Mito intensity is
    far above the controls'; feature selection keeps fewer features than it was given."""
    run, folder = results
    made = make_profiles(folder, run.plate.platemap_file)
    normalized = pd.read_parquet(made.files["normalized"]).set_index("Metadata_Well")
    feature = "Cytoplasm_Intensity_IntegratedIntensity_CorrMito"
    controls = [w for w, t in run.plate.treatments.items() if t == NEGATIVE_CONTROL]
    treated = [w for w, t in run.plate.treatments.items() if t == PHENOTYPE]
    assert normalized.loc[controls, feature].median() == pytest.approx(0, abs=1e-9)
    assert min(normalized.loc[treated, feature]) > 3 * max(abs(normalized.loc[controls, feature]))
    selected = pd.read_parquet(made.files["normalized_feature_select"])
    assert 0 < made.features["normalized_feature_select"] < made.features["normalized"]
    assert list(selected["Metadata_Object_Count"]) == list(normalized["Metadata_Object_Count"])


def test_cpb_profile_command(results, tmp_path):
    run, folder = results
    out = tmp_path / "p"
    result = CliRunner().invoke(cli, ["profile", str(folder), "--platemap", str(run.plate.platemap_file),
                                      "--normalize-to", "plate", "--method", "standardize", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 well profile(s), normalized (standardize) to all 4 wells of the plate" in result.output
    assert f"aggregated: {out / 'CP1_aggregated.parquet'}" in result.output


@pytest.mark.parametrize("rows, header, message", [
    ([("A01", "DMSO", "negcon"), ("A02", "x", "trt"), ("B01", "DMSO", "negcon")], None,
     "does not list well(s) B02 that have cells: add a row per well"),
    ([("A01", "DMSO", "negcon"), ("Z99", "x", "trt")], None,
     "line 3: well_position 'Z99' is not a well like A01 or P24: fix that row"),
    ([("A01", "DMSO", "negcon"), ("A1", "x", "trt")], None, "lists well A01 twice (lines 2 and 3)"),
    ([("A01", "DMSO"), ("A02", "x"), ("B01", "DMSO"), ("B02", "x")], ("well", "treatment"),
     "has no 'well_position' column (it has well, treatment): name the column holding the wells well_position"),
    ([("A01", "DMSO"), ("A02", "x"), ("B01", "DMSO"), ("B02", "x")], ("well_position", "treatment"),
     "has no 'control' column to find the negative controls in"),
    ([("A01", "DMSO", "negcon"), ("A02", "x", "trt"), ("B01", "DMSO", "trt"), ("B02", "x", "trt")], None,
     "needs at least 2 wells with cells whose control is 'negcon' in the platemap (found 1: A01)"),
])
def test_bad_platemaps_get_one_clear_line(results, tmp_path, rows, header, message):
    _run, folder = results
    platemap = _platemap(tmp_path / "platemap.csv", rows, header or ("well_position", "treatment", "control"))
    with pytest.raises(AnalysisError, match=None) as error:
        make_profiles(folder, platemap, out_dir=tmp_path / "out")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    result = CliRunner().invoke(cli, ["profile", str(folder), "--platemap", str(platemap)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1 and message in result.output


def test_a_missing_platemap_or_parquet_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="platemap .*nope.csv not found"):
        make_profiles(tmp_path / "empty", tmp_path / "nope.csv")
    platemap = _platemap(tmp_path / "pm.csv", [("A01", "DMSO", "negcon")])
    with pytest.raises(AnalysisError, match="no single_cell.parquet and no Image.csv: run `cpb results OUTPUT"):
        make_profiles(tmp_path / "empty", platemap)


def _one_well(results, tmp_path: Path, well: str = "A01") -> Path:
    """The shared run's single-cell table cut down to one well: a plate of one well."""
    _run, folder = results
    if not (folder / "single_cell.parquet").is_file():
        make_profiles(folder, _run.plate.platemap_file, out_dir=tmp_path / "first")
    cells = pd.read_parquet(folder / "single_cell.parquet")
    one = tmp_path / "one-well"
    one.mkdir(parents=True)
    cells[cells["Metadata_Well"] == well].to_parquet(one / "single_cell.parquet", index=False)
    return one


@pytest.mark.parametrize("normalize_to", ["plate", "negcon"])
def test_a_plate_of_one_well_gets_one_line_naming_the_fix(results, tmp_path, normalize_to):
    one = _one_well(results, tmp_path)
    platemap = _platemap(tmp_path / "platemap.csv", [("A01", "DMSO", "negcon")])
    with pytest.raises(AnalysisError) as error:
        make_profiles(one, platemap, normalize_to=normalize_to, out_dir=tmp_path / "out")
    message = ("plate CP1: profiles need at least 2 wells with cells to normalize and compare (found 1: A01): "
               "image more wells of the plate")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(cli, ["profile", str(one), "--platemap", str(platemap), "--normalize-to", normalize_to])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1 and message in result.output


def test_no_negative_control_wells_get_one_line_naming_the_fix(results, tmp_path):
    """Two wells, neither a negative control: normalizing to negcon names the fix (the whole plate
    works, and is what the line suggests)."""
    _run, folder = results
    cells = pd.read_parquet(_one_well(results, tmp_path / "a", "A02") / "single_cell.parquet")
    more = pd.read_parquet(_one_well(results, tmp_path / "b", "B02") / "single_cell.parquet")
    two = tmp_path / "two-treated"
    two.mkdir()
    pd.concat([cells, more]).to_parquet(two / "single_cell.parquet", index=False)
    platemap = _platemap(tmp_path / "platemap.csv", [("A02", "x", "trt"), ("B02", "x", "trt")])
    result = CliRunner().invoke(cli, ["profile", str(two), "--platemap", str(platemap)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert ("plate CP1: normalizing to negative controls needs at least 2 wells with cells whose control is "
            "'negcon' in the platemap (found 0: none): add controls to the platemap, or normalize to the whole "
            "plate (--normalize-to plate)") in result.output
    done = CliRunner().invoke(cli, ["profile", str(two), "--platemap", str(platemap), "--normalize-to", "plate"])
    assert done.exit_code == 0, done.output
