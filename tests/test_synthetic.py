"""Synthetic plates: deterministic, and CellProfiler's nucleus counts match the truth;
the worker's split run on them equals the single-process run."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tifffile

from cpb.demo.synthetic import PIPELINE, make_plate, read_truth
from cpb_worker.local import run_local

from test_worker_support import compare_outputs, read_rows

# Nuclei are well separated and kept off the border, so segmentation should be exact;
# we allow one nucleus per site (e.g. a dim nucleus lost to noise) and nothing more.
TOLERANCE_PER_SITE = 1


def _digest(paths):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(paths))).hexdigest()


def test_plates_are_deterministic_from_the_seed(tmp_path):
    a = make_plate(tmp_path / "a", wells=("A01", "C03"), sites=2, seed=5, size=128)
    b = make_plate(tmp_path / "b", wells=("A01", "C03"), sites=2, seed=5, size=128)
    c = make_plate(tmp_path / "c", wells=("A01", "C03"), sites=2, seed=6, size=128)
    assert a.truth == b.truth and _digest(a.images) == _digest(b.images)
    assert _digest(a.images) != _digest(c.images)
    assert read_truth(a.truth_file) == a.truth and a.image_sets == 4
    pixels = tifffile.imread(a.images[0])
    assert pixels.dtype == np.uint16 and pixels.shape == (128, 128)
    rows = read_rows(a.data_file)
    assert [(r["Metadata_Well"], r["Metadata_Site"]) for r in rows] == [("A01", "1"), ("A01", "2"),
                                                                        ("C03", "1"), ("C03", "2")]
    assert all((a.images_dir / r["Image_FileName_DNA"]).exists() for r in rows)


def test_bad_plate_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one well"):
        make_plate(tmp_path, wells=(), sites=1)
    with pytest.raises(ValueError, match="nuclei must be"):
        make_plate(tmp_path, nuclei=(5, 2))


@pytest.fixture(scope="module")
def plate_runs(tmp_path_factory, cellprofiler_env):
    root = tmp_path_factory.mktemp("synthetic")
    plate = make_plate(root / "plate", wells=("A01", "A02", "B01"), sites=2, seed=2024, size=256)
    runs = {w: run_local(PIPELINE, plate.images_dir, root / f"w{w}", data_file=plate.data_file, workers=w,
                         env=cellprofiler_env) for w in (1, 2)}
    return root, plate, runs


@pytest.mark.cellprofiler
def test_cellprofiler_counts_match_the_truth(plate_runs):
    root, plate, runs = plate_runs
    counts = {(r["Metadata_Well"], int(r["Metadata_Site"])): float(r["Count_Nuclei"])
              for r in read_rows(root / "w2" / "Image.csv")}
    assert set(counts) == set(plate.truth)
    off = {k: (counts[k], plate.truth[k]) for k in counts if abs(counts[k] - plate.truth[k]) > TOLERANCE_PER_SITE}
    assert not off, f"counts differ from truth by more than {TOLERANCE_PER_SITE}: {off}"
    assert sum(plate.truth.values()) >= 30  # a real test: plenty of nuclei


@pytest.mark.cellprofiler
def test_split_run_equals_single_process_run_on_generated_data(plate_runs):
    root, plate, runs = plate_runs
    assert runs[1].processes == 1 and runs[2].processes == 2
    assert compare_outputs(root / "w1", root / "w2") > 500
    nuclei = read_rows(root / "w2" / "Nuclei.csv")
    assert len(nuclei) == sum(float(r["Count_Nuclei"]) for r in read_rows(root / "w2" / "Image.csv"))
    assert len(list((root / "w2").glob("*_outlines.png"))) == plate.image_sets


def test_nuclei_pipeline_uses_module_versions_cellprofiler_42_runs(shared_examples):
    """CellProfiler 4.2.8 (the container's) runs the upstream ExampleHuman pipeline (its
    README gives 4.2.8.1's count), so every module of nuclei.cppipe must be saved at the
    same settings revision as there, in the same Version:5 text format."""
    import re
    pattern = re.compile(r"^(\w+):\[module_num:\d+\|svn_version:'Unknown'\|variable_revision_number:(\d+)\|", re.M)
    reference = dict(pattern.findall((shared_examples / "ExampleHuman" / "ExampleHuman.cppipe").read_text()))
    reference.update(pattern.findall(
        (shared_examples / "ExampleHuman" / "loaddata" / "ExampleHuman_LoadData.cppipe").read_text()))
    ours = PIPELINE.read_text()
    assert ours.splitlines()[:3] == ["CellProfiler Pipeline: http://www.cellprofiler.org", "Version:5",
                                     "DateRevision:400"]
    modules = pattern.findall(ours)
    assert len(modules) == 7
    assert {name: rev for name, rev in modules} == {name: reference[name] for name, _ in modules}
