"""`cpb estimate`: the timing model, the records it reads, the command, and (with the real
CellProfiler) its figure against the demo plate's measured CellProfiler time."""
from __future__ import annotations

import json
import math
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner
from moto import mock_aws

from cpb import estimate as est
from cpb.cli import cli

REPO = Path(__file__).resolve().parent.parent

#: A CellProfiler 4.2.8.1 headless log as the worker keeps it (_cpb/logs/cellprofiler-<first>-<last>.log).
LOG = """/work/.venv-cp/bin/cellprofiler -c -r -p nuclei.cppipe -f 1 -l 3
Times reported are CPU and Wall-clock times for each module
Mon Nov 30 05:05:26 2026: Image # 1, module LoadData # 1: CPU_time = 0.64 secs, Wall_time = 1.61 secs
Mon Nov 30 05:05:28 2026: Image # 1, module IdentifyPrimaryObjects # 2: CPU_time = 0.07 secs, Wall_time = 0.14 secs
Mon Nov 30 05:05:28 2026: Image # 1, module ExportToSpreadsheet # 7: CPU_time = 0.00 secs, Wall_time = 0.25 secs
Mon Nov 30 05:05:28 2026: Image # 2, module LoadData # 1: CPU_time = 0.22 secs, Wall_time = 0.41 secs
Mon Nov 30 05:05:29 2026: Image # 2, module IdentifyPrimaryObjects # 2: CPU_time = 0.08 secs, Wall_time = 0.59 secs
Mon Nov 30 05:05:29 2026: Image # 3, module LoadData # 1: CPU_time = 0.22 secs, Wall_time = 0.50 secs
Mon Nov 30 05:05:29 2026: Image # 3, module IdentifyPrimaryObjects # 2: CPU_time = 0.08 secs, Wall_time = 0.70 secs
"""


def test_the_log_gives_wall_or_cpu_seconds_per_image_set() -> None:
    assert est.set_times_from_log(LOG) == pytest.approx({1: 2.0, 2: 1.0, 3: 1.2})
    assert est.set_times_from_log(LOG, "cpu") == pytest.approx({1: 0.71, 2: 0.30, 3: 0.30})
    assert est.set_times_from_log("MySQL could not be loaded.\nno timings here") == {}


def test_the_first_set_s_warm_up_counts_as_start_up() -> None:
    profile = est.profile_from_processes([est.ProcessSample(seconds=8.0, set_seconds=[2.0, 1.0, 1.2])], 0.5, "t")
    assert profile.per_set == pytest.approx(1.1)  # sets 2 and 3
    assert profile.startup == pytest.approx(8.0 - 3 * 1.1)
    assert profile.sets_measured == 3 and profile.set_seconds == [1.0, 1.2]
    with pytest.raises(est.EstimateError, match="no image set timings"):
        est.profile_from_processes([est.ProcessSample(seconds=8.0, set_seconds=[])], 0, "t")


def test_the_per_set_line_says_why_fewer_sets_than_were_run_time_it() -> None:
    """New-user review: `0.94 s per image set (0.91-0.97 s over 2 set(s))` beside "4 sample image
    sets ... run" did not say where the other 2 went (each process's first set is its warm-up)."""
    profile = est.profile_from_processes([est.ProcessSample(seconds=9.0, set_seconds=[5.0, 0.91]),
                                          est.ProcessSample(seconds=9.5, set_seconds=[5.5, 0.97])], 1.0, "test")
    layout = est.Layout(image_sets=8, sets_per_job=4, job_vcpus=1, job_memory_mib=4000, max_vcpus=2,
                        process_memory_mib=2560, job_overhead_seconds=15)
    text = est.render(est.estimate_plate(profile, layout, est.Prices()), "the plate")
    assert ("0.94 s per image set (0.91-0.97 s over 2 set(s); the other 2, the first of each of the 2 CellProfiler "
            "process(es), carry its warm-up and are counted in the start-up)") in text
    alone = est.profile_from_processes([est.ProcessSample(seconds=9.0, set_seconds=[5.0])], 1.0, "test")
    assert "over 1 set(s)), worker" in est.render(est.estimate_plate(alone, layout, est.Prices()), "the plate")


def test_samples_are_spread_over_the_plate() -> None:
    assert est.sample_rows(8, 4) == [2, 4, 6, 8]
    assert est.sample_rows(3456, 4) == [433, 1297, 2161, 3025]
    assert est.sample_rows(3, 10) == [1, 2, 3]
    assert est.sample_rows(1, 1) == [1]


def _profile(startups=(6.0,), sets=(1.0,), overhead=2.0) -> est.Profile:
    return est.Profile(startup_seconds=list(startups), set_seconds=list(sets), overhead_seconds=overhead,
                       source="test", sets_measured=4)


def test_the_plate_is_laid_out_and_priced_as_batch_runs_it() -> None:
    """10 image sets, 4 per job -> jobs of 4, 4, 2; 2 vCPUs and 2 processes each (memory allows 3)."""
    layout = est.Layout(image_sets=10, sets_per_job=4, job_vcpus=2, job_memory_mib=8000, max_vcpus=4,
                        process_memory_mib=2560, job_overhead_seconds=10)
    prices = est.Prices(vcpu_hour=0.04, gib_hour=0.004, spot_vcpu_hour=0.01, spot_gib_hour=0.001, fsx_hour=0.23)
    result = est.estimate_plate(_profile(), layout, prices)
    assert (result.jobs, result.processes_per_job, result.concurrent_jobs) == (3, 2, 2)
    cp = [6 + 2 * 1.0, 6 + 2 * 1.0, 6 + 1 * 1.0]  # start-up + sets per process x per-set
    walls = [c + 2.0 + 10 for c in cp]  # + worker overhead + job overhead
    assert result.central.cellprofiler_seconds == pytest.approx(sum(cp))
    assert result.central.vcpu_hours == pytest.approx(2 * sum(walls) / 3600)
    assert result.central.gib_hours == pytest.approx(8000 / 1024 * sum(walls) / 3600)
    assert result.central.wall_seconds == pytest.approx(2 * max(walls))  # 3 jobs, 2 at once: two waves
    assert result.central.on_demand_usd == pytest.approx(result.central.vcpu_hours * 0.04
                                                         + result.central.gib_hours * 0.004)
    assert result.central.spot_usd == pytest.approx(result.central.vcpu_hours * 0.01 + result.central.gib_hours * 0.001)
    assert result.fsx_usd == pytest.approx(0.23 * result.central.wall_seconds / 3600)


def test_low_and_high_use_the_fastest_and_slowest_measurements() -> None:
    layout = est.Layout(image_sets=100, sets_per_job=10, job_vcpus=1, job_memory_mib=4000, max_vcpus=10,
                        process_memory_mib=2560, job_overhead_seconds=0)
    result = est.estimate_plate(_profile(startups=(5.0, 7.0), sets=(1.0, 2.0, 3.0), overhead=0), layout, est.Prices())
    assert result.low.cellprofiler_seconds == pytest.approx(10 * (5 + 10 * 1.0))
    assert result.central.cellprofiler_seconds == pytest.approx(10 * (6 + 10 * 2.0))
    assert result.high.cellprofiler_seconds == pytest.approx(10 * (7 + 10 * 3.0))


def test_memory_bounds_the_processes_and_says_so() -> None:
    layout = est.Layout(image_sets=40, sets_per_job=8, job_vcpus=8, job_memory_mib=8192, max_vcpus=64,
                        process_memory_mib=2560)
    result = est.estimate_plate(_profile(), layout, est.Prices())
    assert result.processes_per_job == 3
    assert any("memory limits each job to 3 CellProfiler process(es)" in note for note in result.notes)


def test_an_unsplittable_pipeline_is_one_job_and_one_process() -> None:
    layout = est.Layout(image_sets=96, sets_per_job=4, job_vcpus=4, job_memory_mib=15000, max_vcpus=256,
                        process_memory_mib=2560, unsplittable=True, job_overhead_seconds=0)
    profile = _profile(overhead=0)
    profile.unsplittable = ["CorrectIlluminationCalculate aggregates over all image sets"]
    result = est.estimate_plate(profile, layout, est.Prices())
    assert (result.jobs, result.processes_per_job) == (1, 1)
    assert result.central.cellprofiler_seconds == pytest.approx(6 + 96 * 1.0)
    assert "cannot be split" in result.notes[0]


def test_fsx_prices_per_hour() -> None:
    assert est.fsx_hourly("SCRATCH_2", 1200, None) == pytest.approx(0.14 * 1200 / 730)
    assert est.fsx_hourly("PERSISTENT_2", 2400, 250) == pytest.approx(0.21 * 2400 / 730)
    with pytest.raises(est.EstimateError, match="--fsx-hour-usd"):
        est.fsx_hourly("PERSISTENT_2", 2400, 333)


def _write_run(folder: Path, sha: str = "a" * 64, parts: int = 2, wall: float = 8.0) -> None:
    """An output's parts as a job writes them: part-NNNNN/_cpb/run.json and its CellProfiler log."""
    for index in range(parts):
        part = folder / f"part-{index:05d}"
        log_key = f"_cpb/logs/cellprofiler-{2 * index + 1:06d}-{2 * index + 3:06d}.log"
        (part / log_key).parent.mkdir(parents=True)
        (part / log_key).write_text(LOG)
        (part / "_cpb" / "run.json").write_text(json.dumps({
            "status": "succeeded", "pipeline_sha256": sha, "cellprofiler_version": "4.2.8.1", "processes": 1,
            "first": 2 * index + 1, "last": 2 * index + 3, "timings": {"cellprofiler": wall, "total": wall + 1.5},
            "files": [{"key": log_key, "size": len(LOG)}], "unsplittable_reasons": []}))


def test_an_earlier_runs_records_time_the_pipeline(tmp_path: Path) -> None:
    _write_run(tmp_path)
    profile = est.profile_from_records(str(tmp_path), "a" * 64)
    assert profile.set_seconds == pytest.approx([1.0, 1.2, 1.0, 1.2])
    assert profile.startup_seconds == pytest.approx([8.0 - 3 * 1.1] * 2)
    assert profile.overhead_seconds == pytest.approx(1.5)
    assert "2 job(s), 2 CellProfiler process(es)" in profile.source
    with pytest.raises(est.EstimateError, match=r"are of other pipelines \(sha256 aaaaaaaaaaaa\), not this one"):
        est.profile_from_records(str(tmp_path), "b" * 64)
    with pytest.raises(est.EstimateError, match="no succeeded run records"):
        est.profile_from_records(str(tmp_path / "nothing"), None)


def test_records_are_read_from_s3_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    _write_run(tmp_path / "local")
    with mock_aws():
        s3 = boto3.client("s3", region_name="eu-west-1")
        s3.create_bucket(Bucket="data", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        for path in (tmp_path / "local").rglob("*"):
            if path.is_file():
                s3.put_object(Bucket="data", Key=f"results/p1/{path.relative_to(tmp_path / 'local').as_posix()}",
                              Body=path.read_bytes())
        s3.put_object(Bucket="data", Key="results/p1-other/_cpb/run.json", Body=b"{}")  # a sibling output
        profile = est.profile_from_records("s3://data/results/p1", "a" * 64)
    assert profile.set_seconds == pytest.approx([1.0, 1.2, 1.0, 1.2]) and profile.sets_measured == 6


def test_the_command_estimates_a_full_plate_from_records(tmp_path: Path) -> None:
    pipeline = REPO / "cpb" / "pipelines" / "nuclei.cppipe"
    _write_run(tmp_path / "run", sha=est._sha256(pipeline))
    result = CliRunner().invoke(cli, ["estimate", "--pipeline", str(pipeline), "--from-records", str(tmp_path / "run"),
                                      "--image-sets", "3456", "--image-sets-per-job", "8", "--vcpus", "4",
                                      "--memory", "15000", "--max-vcpus", "256", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["jobs"] == 432 and answer["processes_per_job"] == 4 and answer["concurrent_jobs"] == 64
    per_job_cp = answer["profile"]["startup_seconds"][0] + 2 * 1.1
    assert answer["central"]["cellprofiler_seconds"] == pytest.approx(432 * per_job_cp)
    assert answer["central"]["spot_usd"] < answer["central"]["on_demand_usd"]
    text = CliRunner().invoke(cli, ["estimate", "--pipeline", str(pipeline), "--from-records", str(tmp_path / "run"),
                                    "--image-sets", "3456", "--image-sets-per-job", "8"]).output
    for words in ("vCPU-hours", "wall time", "spot $", "on demand $", "assumptions:", "us-east-1", "2025"):
        assert words in text


def test_the_command_needs_images_or_records() -> None:
    result = CliRunner().invoke(cli, ["estimate", "--pipeline", str(REPO / "cpb" / "pipelines" / "nuclei.cppipe")])
    assert result.exit_code != 0 and "give --input" in result.output


@pytest.mark.cellprofiler
def test_the_estimate_is_within_25_percent_of_the_demo_plates_cellprofiler_time(tmp_path: Path,
                                                                                 cellprofiler_env) -> None:
    """Issue 15's done-when, as a test: the demo plate (`cpb demo`'s 2 wells x 4 sites, seed 7), its jobs
    as the demo lays them out (2 image sets per array child, 1 vCPU) run one by one with the real worker,
    against `cpb estimate` from 4 sampled image sets. Compared in CPU seconds of the CellProfiler
    processes, which other work on a shared machine does not inflate (wall-clock is printed too)."""
    from cpb.demo.synthetic import make_plate
    from cpb_worker.local import run_local

    plate = make_plate(tmp_path / "plate", wells=("A01", "A02"), sites=4, seed=7)
    pipeline = REPO / "cpb" / "pipelines" / "nuclei.cppipe"
    measured_cpu = measured_wall = 0.0
    for first in range(1, 9, 2):  # the demo's four array children
        before = est._children_cpu_seconds()
        record = run_local(pipeline, plate.images_dir, tmp_path / f"part-{first}", data_file=plate.data_file,
                           workers=1, first=first, last=first + 1, env=cellprofiler_env)
        measured_cpu += est._children_cpu_seconds() - before
        measured_wall += record.timings["cellprofiler"]
    profile, total, sampled = est.profile_from_sample(pipeline, plate.images_dir, plate.data_file, 4,
                                                      cellprofiler_env)
    assert total == 8 and sampled == [2, 4, 6, 8] and profile.clock == "cpu"
    assert len(profile.startup_seconds) == 2  # two sample processes, each start-up measured
    layout = est.Layout(image_sets=8, sets_per_job=2, job_vcpus=1, job_memory_mib=4096, max_vcpus=2,
                        process_memory_mib=2560)
    predicted = est.estimate_plate(profile, layout, est.Prices()).central.cellprofiler_seconds
    print(f"\ndemo plate CellProfiler time: measured {measured_cpu:.1f} s CPU ({measured_wall:.1f} s wall-clock, "
          f"busy factor {measured_wall / measured_cpu:.2f}), estimated {predicted:.1f} s CPU "
          f"({(predicted - measured_cpu) / measured_cpu:+.0%})")
    assert math.isclose(predicted, measured_cpu, rel_tol=0.25)
