"""End to end: the demo (`cpb.demo.run.run_demo`, i.e. `make demo`) on a smaller plate, with real parts only.

The local stack runs on a free 127.0.0.1 port; `cpb plate --stack local` (its own process, as a user
types it) builds the LoadData CSVs, uploads the synthetic Cell Painting plate and sends ONE list
message; the real ingress Lambda submits the illumination job and the analysis array job depending
on it; the local Batch runs the real worker with real CellProfiler 4.2.8.1 in that order; `cpb status`,
`cpb results --parquet`, `cpb report` and `cpb profile` follow; then a second identical `cpb plate`
must send nothing. The oracle is the generator's known cells per site:

- the single-cell Parquet (CytoTable) aggregated with pycytominer gives one row per well whose cell
  count is the truth; the report's heatmap values are Image.csv's counts (and the truth);
- the check passes BECAUSE of the illumination correction: the same analysis on the same images
  with flat illumination functions fails the demo's per-well tolerance in every well;
- a broken illumination pipeline: the demo fails, says the analysis failed by dependency, shows the
  illumination job's log, and leaves no results.

The demo plate here is 4 wells x 1 site (2 of them negative controls, as pycytominer's normalization
needs): about 40 s on this 2-core machine while it is shared; the flat-illumination run adds about
20 s (CellProfiler measures the hundreds of false "nuclei" it finds).
"""
from __future__ import annotations

import csv
import json
import re
import socket
from pathlib import Path

import pytest

from cpb.demo.run import DemoSettings, compare_counts, run_demo

WELLS, SITES = 4, 1


@pytest.fixture(scope="module")
def cp(cellprofiler_env):
    """Point the demo's worker processes at the real CellProfiler; no AWS settings of this machine."""
    with pytest.MonkeyPatch.context() as patch:
        for key in ("CPB_CELLPROFILER", "CPB_CELLPROFILER_ARGS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            patch.setenv(key, cellprofiler_env[key])
        for key in ("CPB_BUCKET", "CPB_QUEUE_URL", "CPB_DLQ_URL", "CPB_JOB_QUEUE", "CPB_IMAGE", "AWS_ENDPOINT_URL"):
            patch.delenv(key, raising=False)
        patch.setenv("AWS_PROFILE", "a-profile-this-machine-does-not-have")  # the demo must not need AWS config
        yield


@pytest.fixture(scope="module")
def demo(cp, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(DemoSettings(out_dir=out, wells=WELLS, sites=SITES, sets_per_job=2, parallel=2, echo=False))
    return out, result


def _listening(url: str) -> bool:
    host, port = url.split("//")[1].split(":")
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, int(port))) == 0


def _truth(out: Path) -> dict[tuple[str, int], int]:
    with open(out / "plate" / "truth.csv", newline="") as handle:
        return {(r["well"], int(r["site"])): int(r["nuclei"]) for r in csv.DictReader(handle)}


def _per_well(per_site: dict) -> dict[str, int]:
    wells: dict[str, int] = {}
    for (well, _), n in per_site.items():
        wells[well] = wells.get(well, 0) + n
    return wells


@pytest.mark.cellprofiler
def test_the_demo_runs_the_plate_through_the_chain_and_counts_every_cell(demo):
    out, result = demo
    assert result.ok, result.failures
    truth = _truth(out)
    assert len(truth) == WELLS * SITES
    # one cpb plate sent both steps; the illumination job ran first, the analysis children after it
    assert result.plate_output.count("sent ") == 2 and "after plates/CP1/illum" in result.plate_output
    illum = [j for j in result.jobs if j["name"].startswith("CP1-illum")]
    children = [j for j in result.jobs if j["name"].startswith("CP1-analysis")]
    assert len(illum) == 1 and sorted(j["index"] for j in children) == [0, 1]
    assert all(j["status"] == "SUCCEEDED" for j in result.jobs)
    assert all(child["started"] > illum[0]["ended"] for child in children)
    assert result.status_exit == 0 and "runs after plates/CP1/illum: SUCCEEDED" in result.status_output
    assert "2/2 children succeeded" in result.status_output
    # the merged results: every cell found, ImageNumber global across the two parts
    with open(result.results_dir / "Image.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(int(r["ImageNumber"]) for r in rows) == [1, 2, 3, 4]
    for column in ("Count_Nuclei", "Count_Cells", "Count_Cytoplasm"):
        assert {(r["Metadata_Well"], int(float(r["Metadata_Site"]))): int(float(r[column])) for r in rows} == truth
    assert [(row["well"], row["counted"], row["true"], row["ok"]) for row in result.table] == \
        [(w, n, n, True) for w, n in sorted(_per_well(truth).items())]
    assert result.montage.stat().st_size > 10_000
    assert result.endpoint.startswith("http://127.0.0.1:") and not _listening(result.endpoint)  # nothing left running


@pytest.mark.cellprofiler
def test_parquet_aggregated_with_pycytominer_gives_one_row_per_well_with_the_true_cell_count(demo):
    import pandas as pd
    import pycytominer
    out, result = demo
    truth = _per_well(_truth(out))
    cells = pd.read_parquet(result.parquet)
    assert len(cells) == sum(truth.values())
    features = [c for c in cells.columns if c.startswith(("Cells_", "Nuclei_", "Cytoplasm_"))
                and pd.api.types.is_numeric_dtype(cells[c])]
    aggregated = pycytominer.aggregate(cells, strata=["Metadata_Plate", "Metadata_Well"], features=features[:20],
                                       operation="median", compute_object_count=True,
                                       object_feature="Metadata_ObjectNumber")
    assert len(aggregated) == len(truth)
    assert dict(zip(aggregated["Metadata_Well"], aggregated["Metadata_Object_Count"])) == truth
    # the demo's own profiles (cpb profile) say the same, and the table shows it
    demo_profile = pd.read_parquet(out / "results" / "profiles" / "CP1_aggregated.parquet")
    assert dict(zip(demo_profile["Metadata_Well"], demo_profile["Metadata_Object_Count"])) == truth
    assert {row["well"]: row["profile"] for row in result.table} == truth
    assert sorted(p.name for p in result.profiles) == ["CP1_aggregated.parquet", "CP1_annotated.parquet",
                                                       "CP1_normalized.parquet", "CP1_normalized_feature_select.parquet"]


@pytest.mark.cellprofiler
def test_the_reports_heatmap_values_are_image_csv_counts(demo):
    import matplotlib.pyplot as plt
    import numpy as np
    from cpb.analysis.report import build_figure, collect, parse_well
    out, result = demo
    with open(result.results_dir / "Image.csv", newline="") as handle:
        image_counts = _per_well({(r["Metadata_Well"], int(float(r["Metadata_Site"]))): int(float(r["Count_Cells"]))
                                  for r in csv.DictReader(handle)})
    assert image_counts == _per_well(_truth(out))
    page = result.report_html.read_text()
    data = json.loads(re.search(r'<script type="application/json" id="cpb-report-data">(.*?)</script>', page,
                                re.S).group(1))
    (plate,) = data["plates"]
    assert plate["plate"] == "CP1" and plate["object"] == "Cells" and plate["wells"] == image_counts
    assert plate["marked"] == {} and data["image_sets"]["done"] == WELLS * SITES
    fig = build_figure(collect(result.results_dir, out / "plate" / "load_data.csv"))
    (heatmap,) = [im for ax in fig.axes for im in ax.get_images() if im.get_gid() == "heatmap:CP1"]
    array = np.ma.filled(heatmap.get_array().astype(float), np.nan)
    assert {well: array[parse_well(well)] for well in image_counts} == image_counts
    assert np.isnan(array).sum() == array.size - len(image_counts)
    plt.close(fig)
    assert result.report_png.stat().st_size > 10_000


@pytest.mark.cellprofiler
def test_a_second_identical_cpb_plate_sends_nothing_and_says_so(demo):
    _, result = demo
    assert "nothing to run: every step is up to date; nothing uploaded, nothing sent" in result.again_output
    assert "1. illum" in result.again_output and "2. analysis" in result.again_output
    assert result.again_output.count(": up to date: same pipeline, data rows and image as run") == 2
    assert result.again_sent == 0  # the Lambda received no message
    assert "sent " not in result.again_output


@pytest.mark.cellprofiler
def test_the_count_is_right_only_because_of_the_illumination_correction(demo, cellprofiler_env, tmp_path):
    """The demo's images analysed by the same pipeline with flat (all-ones) illumination functions:
    the demo's check fails in every well. So its passing check is the correction's doing."""
    import numpy as np
    from cpb.demo.cellpainting import ANALYSIS_PIPELINE, CHANNELS, analysis_data_file, make_cellpainting_plate
    from cpb_worker.local import run_local
    out, result = demo
    settings = DemoSettings()
    plate = make_cellpainting_plate(tmp_path / "plate", wells=sorted(_per_well(_truth(out))), sites=SITES,
                                    seed=settings.seed, plate="CP1")
    assert plate.truth == _truth(out)  # the demo's plate, regenerated from its seed
    flat = tmp_path / "flat"
    flat.mkdir()
    for channel in CHANNELS:
        np.save(flat / f"Illum{channel}.npy", np.ones((256, 256), dtype=np.float32))
    data_file = analysis_data_file(plate, flat, tmp_path / "uncorrected.csv")
    run_local(ANALYSIS_PIPELINE, plate.images_dir, tmp_path / "uncorrected", data_file=data_file, workers=2,
              env=cellprofiler_env)
    table = compare_counts(tmp_path / "uncorrected" / "Image.csv", plate.truth, settings.tolerance)
    assert [row["ok"] for row in table] == [False] * WELLS, table
    assert all(row["counted"] > 2 * row["true"] for row in table)  # the dim corner's background splits into "nuclei"
    assert all(row["ok"] for row in result.table)


@pytest.mark.cellprofiler
def test_a_broken_illumination_pipeline_fails_the_demo_by_dependency_and_leaves_no_results(cp, tmp_path):
    from cpb.demo.cellpainting import ILLUM_PIPELINE
    broken = tmp_path / "illum.cppipe"
    broken.write_text(ILLUM_PIPELINE.read_text().replace("CorrectIlluminationCalculate:[",
                                                         "CorrectIlluminationCalculatz:["))
    out = tmp_path / "demo"
    (out / "results").mkdir(parents=True)
    (out / "results" / "Image.csv").write_text("stale from an earlier run\n")
    (out / ".cpb-demo").write_text("")
    result = run_demo(DemoSettings(out_dir=out, wells=2, sites=1, sets_per_job=1, parallel=2,
                                   illum_pipeline=broken, echo=False))
    assert not result.ok
    assert result.status_exit == 1
    assert "plates/CP1/illum/: FAILED" in result.status_output and "plates/CP1/analysis/: FAILED" in result.status_output
    assert "runs after plates/CP1/illum: FAILED" in result.status_output
    assert result.status_output.count("children 0-1 not run: Batch never started it (Dependent Job failed): the "
                                      "step they run after, plates/CP1/illum, failed") == 1
    assert "exit code 3" in result.status_output
    assert "logs of CP1-illum" in result.status_output  # the worker's output, from its CloudWatch log stream
    assert "CorrectIlluminationCalculatz" in result.status_output.split("logs of", 1)[1]
    assert [j["name"].startswith("CP1-illum") for j in result.jobs] == [True]  # the analysis never started
    assert any("cpb results refused" in f and "not complete" in f for f in result.failures)
    assert not (out / "results").exists()  # the stale result is gone, and nothing new was called complete


@pytest.mark.cellprofiler
def test_ctrl_c_during_the_demo_leaves_nothing_running(cp, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from local_stack import processes_with

    proc = subprocess.Popen([sys.executable, "-m", "cpb", "demo", "--out", str(tmp_path / "demo"), "--wells", "2",
                             "--sites", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ), start_new_session=True,
                            # as from a terminal: a runner started in the background (nohup, `&`) passes
                            # SIGINT on ignored, and a Python started so never raises KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines, endpoint = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r" at (http://127\.0\.0\.1:\d+)", line)
            endpoint = endpoint or (found.group(1) if found else None)
            if line.startswith("[5/10]"):
                break
        assert endpoint, "".join(lines)
        deadline = time.monotonic() + 60
        while not processes_with("AWS_ENDPOINT_URL", endpoint) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_with("AWS_ENDPOINT_URL", endpoint), "no job started"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(0.5)
    assert processes_with("AWS_ENDPOINT_URL", endpoint) == []
    assert not _listening(endpoint)
