"""The synthetic Cell Painting plate and the illumination + analysis pipelines.

The oracle is the generator's truth (nuclei = cells placed per site). With real
CellProfiler 4.2.8.1 the corrected analysis finds exactly that many nuclei, cells and
cytoplasms per site; the SAME pipeline with flat (all-ones) illumination functions fails
the demo's per-well tolerance: the correction is what makes the count right.
"""
from __future__ import annotations

import csv
import hashlib
import re

import numpy as np
import pytest
import tifffile

from cpb.demo.cellpainting import (ANALYSIS_PIPELINE, AUTOFLUORESCENCE, CAMERA_OFFSET, SCALE, CHANNELS, ILLUM_FILES, ILLUM_PIPELINE, analysis_data_file,
                                   illumination_field, make_cellpainting_plate, read_truth)
from cpb_worker.datafile import read_data_file
from cpb_worker.pipeline import check_saved_images, export_module, load_pipeline, unsplittable_reasons

from analysis_support import WELLS, run_uncorrected, shared_plate_run, site_counts, well_errors

DEMO_TOLERANCE = 0.1  # cpb demo's per-well tolerance


def _digest(paths):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(paths))).hexdigest()


def test_plate_is_deterministic_from_the_seed(tmp_path):
    a = make_cellpainting_plate(tmp_path / "a", wells=("A01", "H12"), sites=2, seed=5, size=128, cells=(3, 5))
    b = make_cellpainting_plate(tmp_path / "b", wells=("A01", "H12"), sites=2, seed=5, size=128, cells=(3, 5))
    c = make_cellpainting_plate(tmp_path / "c", wells=("A01", "H12"), sites=2, seed=6, size=128, cells=(3, 5))
    assert a.truth == b.truth and _digest(a.images) == _digest(b.images)
    assert _digest(a.images) != _digest(c.images)
    assert read_truth(a.truth_file) == a.truth and a.image_sets == 4 and len(a.images) == 12
    pixels = tifffile.imread(a.images[0])
    assert pixels.dtype == np.uint16 and pixels.shape == (128, 128)
    data = read_data_file(a.data_file)
    assert data.header == ["Image_FileName_DNA", "Image_FileName_AGP", "Image_FileName_Mito",
                           "Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    assert [r[3:] for r in data.rows] == [["CP1", "A01", "1"], ["CP1", "A01", "2"], ["CP1", "H12", "1"],
                                          ["CP1", "H12", "2"]]
    assert data.rows[0][:3] == ["CP1_A01_s1_w1.tif", "CP1_A01_s1_w2.tif", "CP1_A01_s1_w3.tif"]
    with open(a.platemap_file, newline="") as handle:
        assert list(csv.DictReader(handle)) == [
            {"well_position": "A01", "treatment": "DMSO", "control": "negcon"},
            {"well_position": "H12", "treatment": "compound-M", "control": "trt"}]


def test_every_channel_sees_the_same_uneven_light(tmp_path):
    """The far corner gets a fifth of the light the optical axis gets, on every channel: its
    background (lit autofluorescence plus the unlit camera offset) is that much dimmer."""
    plate = make_cellpainting_plate(tmp_path, wells=("A01",), sites=1, seed=1, size=256, cells=(1, 1))
    field = illumination_field(256, 0.8)
    assert field.max() == pytest.approx(1.0, abs=0.01) and field.min() == pytest.approx(0.2, abs=1e-9)
    axis, corner = (slice(70, 86), slice(82, 98)), (slice(-16, None), slice(-16, None))
    for channel, path in zip(CHANNELS, plate.images):
        pixels = tifffile.imread(path).astype(float) / SCALE
        expected = [np.median(field[w]) * AUTOFLUORESCENCE[channel] + CAMERA_OFFSET for w in (axis, corner)]
        measured = [np.median(pixels[w]) for w in (axis, corner)]
        assert measured == pytest.approx(expected, rel=0.1), channel
        assert measured[0] / measured[1] > 3, f"{channel}: background {measured} is not uneven enough"


def test_bad_plate_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one well"):
        make_cellpainting_plate(tmp_path, wells=(), sites=1)
    with pytest.raises(ValueError, match="cells must be"):
        make_cellpainting_plate(tmp_path, cells=(5, 2))
    with pytest.raises(ValueError, match="illumination_strength"):
        make_cellpainting_plate(tmp_path, illumination_strength=1.0)
    with pytest.raises(ValueError, match="no treatment for well.*A02"):
        make_cellpainting_plate(tmp_path, wells=("A01", "A02"), treatments={"A01": "DMSO"})


def test_pipelines_pass_the_worker_checks():
    """ExportToSpreadsheet present and writing Image.csv; images saved into the results;
    the illumination pipeline (All: Across cycles, saves on the last cycle) detected as
    unsplittable and the per-site analysis splittable."""
    illum, analysis = load_pipeline(ILLUM_PIPELINE), load_pipeline(ANALYSIS_PIPELINE)
    for pipeline in (illum, analysis):
        export_module(pipeline)
        check_saved_images(pipeline)
        assert pipeline.modules[0].name == "LoadData"
    reasons = unsplittable_reasons(illum)
    assert sum("CorrectIlluminationCalculate" in r for r in reasons) == 3
    assert unsplittable_reasons(analysis) == []
    saved = {m.get("Enter single file name") + "." + m.get("Saved file format") for m in illum.enabled("SaveImages")}
    assert saved == set(ILLUM_FILES.values()) == {"IllumDNA.npy", "IllumAGP.npy", "IllumMito.npy"}
    names = [m.name for m in analysis.modules]
    for module in ("CorrectIlluminationApply", "IdentifyPrimaryObjects", "IdentifySecondaryObjects",
                   "IdentifyTertiaryObjects", "MeasureObjectIntensity", "MeasureObjectSizeShape", "MeasureTexture",
                   "SaveImages", "ExportToSpreadsheet"):
        assert module in names
    apply = analysis.enabled("CorrectIlluminationApply")[0]
    assert apply.get_all("Select the illumination function") == [f"Illum{c}" for c in CHANNELS]
    assert apply.get_all("Select the input image") == list(CHANNELS)


def test_pipelines_are_cellprofiler_42_text():
    for path in (ILLUM_PIPELINE, ANALYSIS_PIPELINE):
        lines = path.read_text().splitlines()
        assert lines[:2] == ["CellProfiler Pipeline: http://www.cellprofiler.org", "Version:5"]
        count = int(re.search(r"^ModuleCount:(\d+)$", path.read_text(), re.M).group(1))
        assert count == len(load_pipeline(path).modules)


def test_analysis_data_file_names_the_illumination_functions(tmp_path):
    plate = make_cellpainting_plate(tmp_path / "p", wells=("A01",), sites=2, size=96, cells=(1, 2))
    data = read_data_file(analysis_data_file(plate, tmp_path / "illum", tmp_path / "ld.csv"))
    for channel in CHANNELS:
        assert f"Image_FileName_Illum{channel}" in data.header and f"Image_PathName_Illum{channel}" in data.header
    row = dict(zip(data.header, data.rows[1]))
    assert row["Image_FileName_IllumMito"] == "IllumMito.npy"
    assert row["Image_PathName_IllumMito"] == str((tmp_path / "illum").resolve())


# ----------------------------------------------------------------------------- real CellProfiler

@pytest.fixture(scope="module")
def plate_run(tmp_path_factory, cellprofiler_env):
    return shared_plate_run(tmp_path_factory, cellprofiler_env)


@pytest.mark.cellprofiler
def test_illumination_functions_follow_the_light(plate_run):
    """One Illum<Ch>.npy per channel, image-sized, rescaled to a minimum of 1. The DNA one
    (nuclei cover little of an image) has the shape of the true background, light x
    autofluorescence + camera offset, within 5% away from the filter's edge. The cell-body
    channels cover far more of each image, so from 8 images their functions also carry the
    cells' own signal: they must still be brightest where the light is and 2-4x dimmer at
    the far corner, as the true background is."""
    light = illumination_field(256, 0.8)
    assert plate_run.records["illum"].processes == 1 and plate_run.records["illum"].unsplittable_reasons
    core = (slice(32, 224), slice(32, 224))
    axis, corner = (slice(70, 110), slice(80, 120)), (slice(-30, None), slice(-30, None))
    for channel, name in ILLUM_FILES.items():
        function = np.load(plate_run.illum / name).astype(float)
        assert function.shape == (256, 256) and function.min() == pytest.approx(1.0, abs=0.05)
        background = light * AUTOFLUORESCENCE[channel] + CAMERA_OFFSET
        true_ratio = np.median(background[axis]) / np.median(background[corner])
        ratio = np.median(function[axis]) / np.median(function[corner])
        assert 2 < ratio and abs(ratio / true_ratio - 1) < 0.35, f"{name}: {ratio:.2f} vs {true_ratio:.2f}"
        if channel == "DNA":
            shape = function[core] / background[core]
            assert np.percentile(np.abs(shape / np.median(shape) - 1), 95) < 0.05


@pytest.mark.cellprofiler
def test_corrected_analysis_counts_every_cell(plate_run):
    """Nuclei, cells and cytoplasm per site equal the truth; every cytoplasm names its cell
    and nucleus (the parent links CytoTable joins on)."""
    image_csv = plate_run.analysis / "Image.csv"
    for column in ("Count_Nuclei", "Count_Cells", "Count_Cytoplasm"):
        assert site_counts(image_csv, column) == plate_run.plate.truth, column
    assert sum(plate_run.plate.truth.values()) >= 60
    with open(plate_run.analysis / "Cytoplasm.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(plate_run.plate.truth.values())
    assert all(r["Parent_Cells"] == r["Parent_Nuclei"] == r["ObjectNumber"] for r in rows)
    with open(plate_run.analysis / "Cells.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert any(c.startswith("Intensity_MeanIntensity_CorrMito") for c in header)
    with open(plate_run.analysis / "Nuclei.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert any(c.startswith("Texture_") for c in header) and "AreaShape_Area" in header
    outlines = sorted(p.name for p in plate_run.analysis.glob("*_outlines.png"))
    assert len(outlines) == plate_run.plate.image_sets and outlines[0] == "CP1_A01_s1_w1_outlines.png"


@pytest.mark.cellprofiler
def test_without_the_correction_the_count_fails(plate_run, cellprofiler_env):
    """Same images, same pipeline, flat illumination functions: at least one well is off by
    more than the demo's tolerance, while every corrected well is within it (exact, in fact)."""
    corrected = well_errors(site_counts(plate_run.analysis / "Image.csv"), plate_run.plate.truth)
    assert set(corrected) == set(WELLS) and max(corrected.values()) == 0
    uncorrected = well_errors(site_counts(run_uncorrected(plate_run, cellprofiler_env) / "Image.csv"),
                              plate_run.plate.truth)
    failing = {w: e for w, e in uncorrected.items() if e > DEMO_TOLERANCE}
    assert failing, f"uncorrected counts stay within {DEMO_TOLERANCE:.0%}: {uncorrected}"


@pytest.mark.cellprofiler
def test_split_analysis_equals_the_single_process_run(plate_run, tmp_path, cellprofiler_env):
    """The per-site analysis may be cut into image-set ranges (array jobs, several processes):
    two processes give the same tables, measurements and outline images as one."""
    from analysis_support import run_plate
    from test_worker_support import compare_outputs
    split = run_plate(tmp_path / "split", cellprofiler_env, workers=2)
    assert split.records["analysis"].processes == 2 and split.records["analysis"].split
    assert compare_outputs(plate_run.analysis, split.analysis) > 10000
