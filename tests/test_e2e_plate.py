"""`cpb plate` through the local cloud with real parts only: the real ingress and job-events Lambdas,
the local Batch honouring `dependsOn`, the real worker, real CellProfiler 4.2.8.1, and the synthetic
Cell Painting plate whose cells per site are known.

- the chain: ONE `cpb plate` runs the illumination job, then (and only then) the analysis array job,
  and the analysis counts every cell;
- a broken illumination pipeline: the illumination job fails, Batch fails the analysis by dependency
  without running it, `cpb status` says so, and nothing of the analysis is written or complete;
- resume: one analysis child fails (its image vanished from the bucket after the illumination read
  it); a second identical `cpb plate` re-uploads the image, sends only the analysis, the worker reuses
  the part that succeeded (CellProfiler does not start for it) and reruns the other, and the results
  equal a clean run's.

Each test's plate is 2 wells x 1 site (2 image sets, one per analysis child); the file takes about
40-60 s here (2 cores, shared).
"""
from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner

from cpb.cli import cli
from cpb.demo.cellpainting import ANALYSIS_PIPELINE, CHANNEL_NUMBERS, ILLUM_PIPELINE, make_cellpainting_plate
from cpb.local.emulator import environment
from cpb.local.settings import LocalSettings
from cpb.local.up import LocalCloud
from test_worker_support import compare_outputs

WELLS, SITES, SEED, PLATE = ("A01", "A02"), 1, 11, "E1"
ILLUM, ANALYSIS = f"plates/{PLATE}/illum", f"plates/{PLATE}/analysis"
WAIT = 600


@pytest.fixture(scope="module")
def cp_env(cellprofiler_env):
    """The worker processes the local Batch starts find the real CellProfiler (module-wide)."""
    with pytest.MonkeyPatch.context() as patch:
        for key in ("CPB_CELLPROFILER", "CPB_CELLPROFILER_ARGS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            patch.setenv(key, cellprofiler_env[key])
        for key in ("CPB_BUCKET", "CPB_QUEUE_URL", "CPB_DLQ_URL", "CPB_JOB_QUEUE", "CPB_IMAGE", "AWS_ENDPOINT_URL"):
            patch.delenv(key, raising=False)
        yield


class Jobs:
    """When each job or child the local Batch ran started and ended (its on_job events), and an
    optional action run as a job starts (in the runner's thread, before the worker process exists)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float, str]] = []
        self.on_start = None
        self._lock = threading.Lock()

    def __call__(self, kind: str, task, detail: str) -> None:
        with self._lock:
            self.events.append((kind, task.label, time.monotonic(), detail))
        if kind == "start" and self.on_start is not None:
            self.on_start(task)

    def times(self, kind: str) -> dict[str, float]:
        return {label: at for k, label, at, _ in self.events if k == kind}


def cpb_plate(folder: Path, illum: Path = ILLUM_PIPELINE, *extra: str):
    args = ["plate", "--stack", "local", str(folder), "--illum-pipeline", str(illum),
            "--analysis-pipeline", str(ANALYSIS_PIPELINE), "--pattern", "imagexpress",
            *[a for name, number in CHANNEL_NUMBERS.items() for a in ("--channel", f"{number}={name}")],
            "--image-sets-per-job", "1", "--vcpus", "1", *extra]
    return CliRunner().invoke(cli, args)


def cpb(*args: str):
    return CliRunner().invoke(cli, [args[0], "--stack", "local", *args[1:]])


def keys(bucket: str, prefix: str) -> list[str]:
    s3 = boto3.client("s3")
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        found += [o["Key"] for o in page.get("Contents", [])]
    return found


def record(bucket: str, key: str) -> dict:
    return json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())


def counts(image_csv: Path) -> dict[tuple[str, int], tuple[int, int, int]]:
    with open(image_csv, newline="") as handle:
        return {(r["Metadata_Well"], int(float(r["Metadata_Site"]))):
                tuple(int(float(r[f"Count_{o}"])) for o in ("Nuclei", "Cells", "Cytoplasm"))
                for r in csv.DictReader(handle)}


def the_cloud(tmp: Path, jobs: Jobs):
    return LocalCloud(LocalSettings(stack="e2eplate"), log_dir=tmp / "logs", cores=2, on_job=jobs)


@pytest.fixture(scope="module")
def clean(cp_env, tmp_path_factory):
    """One clean run of the plate: `cpb plate`, Batch runs the chain, `cpb results`."""
    tmp = tmp_path_factory.mktemp("clean")
    plate = make_cellpainting_plate(tmp / "plate", wells=WELLS, sites=SITES, seed=SEED, plate=PLATE)
    jobs = Jobs()
    started = time.monotonic()
    with environment({"CPB_HOME": str(tmp / "home")}), the_cloud(tmp, jobs) as cloud:
        sent = cpb_plate(plate.images_dir)
        assert sent.exit_code == 0, sent.output
        assert cloud.wait_idle(WAIT)
        status = cpb("status", ILLUM, ANALYSIS, "--no-dlq")
        batch = boto3.client("batch")
        lease = record(cloud.stack.bucket, f"{ANALYSIS}/_cpb/lease.json")
        illum_lease = record(cloud.stack.bucket, f"{ILLUM}/_cpb/lease.json")
        analysis_job = batch.describe_jobs(jobs=[lease["jobs"][0]["job_id"]])["jobs"][0]
        got = cpb("results", ANALYSIS, "--to", str(tmp / "results"))
        illum_keys = keys(cloud.stack.bucket, ILLUM)
        outcomes = [(o.item.label, o.item.index, o.status) for o in cloud.batch.outcomes]
    return {"plate": plate, "jobs": jobs, "sent": sent, "status": status, "lease": lease, "illum_lease": illum_lease,
            "analysis_job": analysis_job, "results": got, "dir": tmp / "results", "illum_keys": illum_keys,
            "outcomes": outcomes, "seconds": time.monotonic() - started}


@pytest.mark.cellprofiler
def test_the_chain_runs_illumination_first_then_the_analysis_and_counts_every_cell(clean):
    assert "sent " in clean["sent"].output and f"after {ILLUM}" in clean["sent"].output
    # Batch was told the order: the analysis array job depends on the illumination job
    assert [d["jobId"] for d in clean["analysis_job"]["dependsOn"]] == [clean["illum_lease"]["jobs"][0]["job_id"]]
    assert clean["analysis_job"]["arrayProperties"]["size"] == 2
    # ... and kept it: every analysis child started after the illumination job had ended
    ended, started = clean["jobs"].times("done"), clean["jobs"].times("start")
    illum = [label for label in ended if label.startswith(f"{PLATE}-illum")]
    children = sorted(label for label in started if label.startswith(f"{PLATE}-analysis"))
    assert len(illum) == 1 and len(children) == 2, clean["jobs"].events
    assert all(started[child] > ended[illum[0]] for child in children)
    assert sorted(status for _, _, status in clean["outcomes"]) == ["SUCCEEDED"] * 3
    # the illumination step saved one function per channel, which the analysis read
    assert {k.rsplit("/", 1)[-1] for k in clean["illum_keys"]} >= {"IllumDNA.npy", "IllumAGP.npy", "IllumMito.npy"}
    assert clean["status"].exit_code == 0, clean["status"].output
    assert "runs after plates/E1/illum: SUCCEEDED" in clean["status"].output
    assert clean["results"].exit_code == 0, clean["results"].output
    truth = clean["plate"].truth
    assert counts(clean["dir"] / "Image.csv") == {key: (n, n, n) for key, n in truth.items()}


@pytest.mark.cellprofiler
@pytest.mark.fault
def test_a_failed_illumination_fails_the_analysis_by_dependency_and_nothing_of_it_is_written(cp_env, tmp_path):
    plate = make_cellpainting_plate(tmp_path / "plate", wells=WELLS, sites=SITES, seed=SEED, plate=PLATE)
    broken = tmp_path / "illum.cppipe"
    text = ILLUM_PIPELINE.read_text()
    assert text.count("CorrectIlluminationCalculate:[") == 3
    broken.write_text(text.replace("CorrectIlluminationCalculate:[", "CorrectIlluminationCalculatz:["))
    jobs = Jobs()
    with environment({"CPB_HOME": str(tmp_path / "home")}), the_cloud(tmp_path, jobs) as cloud:
        sent = cpb_plate(plate.images_dir, broken)
        assert sent.exit_code == 0, sent.output
        assert cloud.wait_idle(WAIT)
        outcomes = {o.item.label: o for o in cloud.batch.outcomes}
        status = cpb("status", ILLUM, ANALYSIS, "--no-dlq")
        analysis_keys = keys(cloud.stack.bucket, ANALYSIS)
        illum_record = record(cloud.stack.bucket, f"{ILLUM}/_cpb/run.json")
        refused = cpb("results", ANALYSIS, "--to", str(tmp_path / "results"))
    illum = [o for label, o in outcomes.items() if label.startswith(f"{PLATE}-illum")]
    children = [o for label, o in outcomes.items() if label.startswith(f"{PLATE}-analysis")]
    assert [(o.status, o.exit_code) for o in illum] == [("FAILED", 3)]  # CellProfiler refused the pipeline
    assert illum_record["status"] == "failed" and "CorrectIlluminationCalculatz" in json.dumps(illum_record)
    assert [(o.status, o.reason, o.attempts) for o in children] == [("FAILED", "Dependent Job failed", 0)] * 2
    assert not [e for e in jobs.events if e[0] == "start" and e[1].startswith(f"{PLATE}-analysis")]  # never ran
    # cpb status: both steps failed, the analysis because of its dependency
    assert status.exit_code == 1, status.output
    assert f"{ILLUM}/: FAILED" in status.output and f"{ANALYSIS}/: FAILED" in status.output
    assert "Dependent Job failed" in status.output, status.output
    assert "runs after plates/E1/illum: FAILED" in status.output
    # ... in one line naming the step that failed and what to do, not as parts missing their records
    fix = f"the step they run after, {ILLUM}, failed; fix that step (cpb status {ILLUM}) and send both again"
    assert [line for line in status.output.splitlines() if "not run" in line] == [
        f"  ! job {children[0].item.name} children 0-1 not run: Batch never started it (Dependent Job failed): {fix} "
        "(a second cpb plate sends only what is not up to date)"], status.output
    assert "no run record" not in status.output
    # nothing of the analysis: no part, no record, no table; only the Lambdas' bookkeeping under _cpb/
    assert analysis_keys and all(k.startswith(f"{ANALYSIS}/_cpb/") for k in analysis_keys), analysis_keys
    assert not [k for k in analysis_keys if k.endswith("run.json")]
    assert refused.exit_code != 0 and "not complete" in refused.output, refused.output
    assert (f"part-00000, part-00001: not run: Batch never started it (Dependent Job failed): the step it runs "
            f"after, {ILLUM}, failed; fix that step (cpb status {ILLUM}) and send both again") in refused.output
    assert "no run record" not in refused.output
    assert not (tmp_path / "results" / "Image.csv").exists()


@pytest.mark.cellprofiler
@pytest.mark.fault
def test_after_one_failed_child_a_second_cpb_plate_reruns_only_that_child(clean, tmp_path):
    plate = make_cellpainting_plate(tmp_path / "plate", wells=WELLS, sites=SITES, seed=SEED, plate=PLATE)
    lost = f"plates/{PLATE}/images/{PLATE}_A02_s1_w2.tif"  # site 2 = part-00001's only image set
    jobs = Jobs()
    with environment({"CPB_HOME": str(tmp_path / "home")}), the_cloud(tmp_path, jobs) as cloud:
        bucket = cloud.stack.bucket

        def lose_an_image(task) -> None:  # after the illumination read it, before the child stages it
            if task.name.startswith(f"{PLATE}-analysis") and task.index == 1:
                boto3.client("s3").delete_object(Bucket=bucket, Key=lost)
        jobs.on_start = lose_an_image
        first = cpb_plate(plate.images_dir)
        assert first.exit_code == 0, first.output
        assert cloud.wait_idle(WAIT)
        jobs.on_start = None
        ran_first = [(o.item.label, o.item.index, o.status) for o in cloud.batch.outcomes]
        failed = cpb("status", ANALYSIS, "--no-dlq", "--logs", "5")
        first_run = record(bucket, f"{ANALYSIS}/_cpb/lease.json")["run_id"]
        part0_before = record(bucket, f"{ANALYSIS}/part-00000/_cpb/run.json")

        again = cpb_plate(plate.images_dir)
        assert again.exit_code == 0, again.output
        assert cloud.wait_idle(WAIT)
        ran_again = [(o.item.label, o.item.index, o.status, o.log) for o in cloud.batch.outcomes[len(ran_first):]]
        second_run = record(bucket, f"{ANALYSIS}/_cpb/lease.json")["run_id"]
        parts = [record(bucket, f"{ANALYSIS}/part-{i:05d}/_cpb/run.json") for i in (0, 1)]
        done = cpb("status", ANALYSIS, "--no-dlq")
        got = cpb("results", ANALYSIS, "--to", str(tmp_path / "results"))

    assert sorted(s for _, _, s in ran_first) == ["FAILED", "SUCCEEDED", "SUCCEEDED"]  # illum, child 0 / child 1
    assert [i for label, i, s in ran_first if s == "FAILED"] == [1]
    assert failed.exit_code == 1 and "1/2 children succeeded, 1 failed" in failed.output, failed.output
    assert f"child 1 failed: Essential container in task exited; exit code 2; worker: download s3://{bucket}/{lost}: " \
        f"s3://{bucket} has no such key (404)" in failed.output, failed.output  # failed for the reason staged
    # the second cpb plate: the image back, only the analysis sent, only part-00001 to run
    assert "not sent: plates/E1/illum: up to date" in again.output, again.output
    assert "to run: 1 of 2 part(s) (part-00001: failed); the other 1 are up to date" in again.output
    assert "1 image/pipeline file(s) missing or changed in the bucket" in again.output
    assert [label.startswith(f"{PLATE}-analysis") for label, *_ in ran_again] == [True, True]  # no illumination
    assert all(s == "SUCCEEDED" for _, _, s, _ in ran_again)
    assert second_run != first_run
    # part-00000 came back from the first run untouched: CellProfiler did not start for it
    assert parts[0]["run_id"] == second_run and parts[0]["resumed_from"] == first_run
    assert "cellprofiler" not in parts[0]["timings"] and parts[0]["files"] == part0_before["files"]
    log0 = next(log for label, index, _, log in ran_again if index == 0)
    assert f"resumed from run {first_run}" in Path(log0).read_text()
    # part-00001 ran again, with CellProfiler
    assert parts[1]["run_id"] == second_run and parts[1]["resumed_from"] is None
    assert parts[1]["status"] == "succeeded" and parts[1]["timings"]["cellprofiler"] > 0
    assert done.exit_code == 0 and "up to date, reused from run" in done.output, done.output
    # complete, and equal to the clean run
    assert got.exit_code == 0, got.output
    assert counts(tmp_path / "results" / "Image.csv") == {k: (n, n, n) for k, n in plate.truth.items()}
    assert compare_outputs(clean["dir"], tmp_path / "results") > 1000
