"""End to end (issue 10): the metadata-matched pipeline through the emulated cloud, split over 2 processes.

cpb/pipelines/metadata_illum.cppipe finds its image sets with Images/Metadata/NamesAndTypes (a
Well key built from row and column, .npy illumination functions loaded as images): no LoadData,
so messages carry NO data file, as the seed's messages do. Through the local stack with every
real part - `cpb submit --stack local --upload`, the SQS -> Lambda mapping and the real ingress
handler, the local Batch running the real worker with the real CellProfiler 4.2.8.1, `cpb status`,
`cpb results` - two messages:

* a plain job with `job_vcpu` 2: the worker lets CellProfiler count the image sets and runs them
  in 2 processes (cpsets.py);
* `image_sets_per_job` 4 without a data file: the Lambda counts the 6 image sets from the
  pipeline's file rules (`cpb_worker.filerules`, proven equal to CellProfiler's count here), an
  array of 2 children, each checked against CellProfiler's own count and run in 2 processes.

Both must give what ONE plain `cellprofiler -c -r` of the same version gives: the same CSVs,
columns, rows and values (tests/test_worker_support.compare_outputs), Count_Nuclei equal to the
plate's truth.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner

from cpb.cli import cli
from cpb.demo.synthetic import METADATA_PIPELINE, make_metadata_plate
from cpb.local.emulator import environment
from cpb.local.settings import LocalSettings
from cpb.local.up import LocalCloud
from cpb_worker.runner import cellprofiler_argv

from test_worker_support import compare_outputs, read_rows

pytestmark = pytest.mark.cellprofiler


def _counts(image_csv: Path) -> dict:
    return {(r["Metadata_Well"], int(r["Metadata_Site"])): int(float(r["Count_Nuclei"])) for r in read_rows(image_csv)}


def test_metadata_pipeline_without_a_data_file_through_the_local_stack_equals_one_process(
        cellprofiler_env, tmp_path, monkeypatch):
    plate = make_metadata_plate(tmp_path / "plate", wells=("B03", "B04", "C05"), sites=2, seed=10, size=192,
                                nuclei=(5, 12))
    single = tmp_path / "single"
    argv = cellprofiler_argv(cellprofiler_env) + ["-c", "-r", "-p", str(METADATA_PIPELINE), "-i",
                                                  str(plate.images_dir), "-o", str(single)]
    oracle = subprocess.run(argv, env=cellprofiler_env, capture_output=True, text=True, timeout=600)
    assert oracle.returncode == 0, oracle.stdout[-2000:] + oracle.stderr[-2000:]
    assert _counts(single / "Image.csv") == plate.truth

    for key in ("CPB_CELLPROFILER", "CPB_CELLPROFILER_ARGS"):
        monkeypatch.setenv(key, cellprofiler_env[key])
    with environment({"CPB_HOME": str(tmp_path / "home")}), \
            LocalCloud(LocalSettings(stack="meta"), log_dir=tmp_path / "logs", cores=2) as cloud:
        cli_run = CliRunner()
        common = ["--stack", "local", "--upload", str(plate.images_dir), "--pipeline", str(METADATA_PIPELINE),
                  "--input", "plates/SYN2", "--vcpus", "2"]
        sent = cli_run.invoke(cli, ["submit", *common, "--output", "results/plain", "--job-name", "meta-plain"])
        assert sent.exit_code == 0, sent.output
        sent = cli_run.invoke(cli, ["submit", *common, "--output", "results/array", "--image-sets-per-job", "4",
                                    "--job-name", "meta-array"])
        assert sent.exit_code == 0, sent.output
        assert cloud.wait_idle(900)
        assert not any(r.failed for r in cloud.mapping.reports)  # the Lambda took both messages
        outcomes = sorted((o.item.name.split("-")[1], o.item.index, o.status) for o in cloud.batch.outcomes)
        assert outcomes == [("array", 0, "SUCCEEDED"), ("array", 1, "SUCCEEDED"), ("plain", None, "SUCCEEDED")]
        s3, bucket = boto3.client("s3"), cloud.stack.bucket
        lease = json.loads(s3.get_object(Bucket=bucket, Key="results/array/_cpb/lease.json")["Body"].read())
        assert (lease["image_set_count"], lease["array_size"], lease["data_file"]) == (6, 2, None)  # the Lambda's count
        children = [o.item.environment for o in cloud.batch.outcomes if o.item.index is not None]
        assert [(e.get("CPB_IMAGE_SET_COUNT"), e.get("CPB_DATA_FILE")) for e in children] == [("6", None)] * 2

        records = {}
        for key in ("results/plain/_cpb/run.json", "results/array/part-00000/_cpb/run.json",
                    "results/array/part-00001/_cpb/run.json"):
            records[key] = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert [(r["first"], r["last"], r["processes"], r["split"], r["exit_codes"]) for r in records.values()] == [
            (1, 6, 2, True, [0, 0]), (1, 4, 2, True, [0, 0]), (5, 6, 2, True, [0, 0])]
        oracle_version = next(r["Value"] for r in read_rows(single / "Experiment.csv")
                              if r["Key"] == "CellProfiler_Version")
        assert {r["cellprofiler_version"] for r in records.values()} == {oracle_version}  # the same CellProfiler
        assert oracle_version.startswith("4.2.8")

        for output in ("results/plain", "results/array"):
            status = cli_run.invoke(cli, ["status", "--stack", "local", "--no-dlq", output])
            assert status.exit_code == 0 and "SUCCEEDED" in status.output, status.output
            got = cli_run.invoke(cli, ["results", "--stack", "local", output, "--to", str(tmp_path / output)])
            assert got.exit_code == 0, got.output

    for output in ("results/plain", "results/array"):
        out = tmp_path / output
        assert compare_outputs(single, out) > 1000
        assert _counts(out / "Image.csv") == plate.truth
        assert sorted(int(r["ImageNumber"]) for r in read_rows(out / "Image.csv")) == [1, 2, 3, 4, 5, 6]
        truth_total = sum(plate.truth.values())
        assert len(read_rows(out / "Nuclei.csv")) == len(read_rows(out / "Cells.csv")) == truth_total
