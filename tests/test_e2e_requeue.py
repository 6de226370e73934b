"""End to end: a run fails, the scientist fixes the cause, `cpb requeue` finishes it.

With the real Lambda handler, the local Batch runner and the real worker +
CellProfiler against moto's server: a broken pipeline makes both array
children fail; after the pipeline object is replaced, `cpb requeue` submits
one plain job per failed child (with `CPB_ARRAY_INDEX`), the runner runs
them, `cpb status` turns SUCCEEDED and `cpb results` merges counts that match
the synthetic plate's truth.
"""
from __future__ import annotations

import csv
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner

from cpb.cli import cli
from cpb.demo.synthetic import make_plate
from cpb.local.emulator import environment
from cpb.local.settings import LocalSettings
from cpb.local.up import LocalCloud

PIPELINE = Path(__file__).resolve().parent.parent / "cpb" / "pipelines" / "nuclei.cppipe"


@pytest.mark.cellprofiler
@pytest.mark.fault
def test_fix_the_pipeline_then_requeue_only_the_failed_children(cellprofiler_env, tmp_path, monkeypatch):
    for key in ("CPB_CELLPROFILER", "CPB_CELLPROFILER_ARGS"):
        monkeypatch.setenv(key, cellprofiler_env[key])
    plate = make_plate(tmp_path / "plate", wells=("B02",), sites=2, seed=3, plate="RQ1")
    broken = tmp_path / "nuclei.cppipe"
    broken.write_text(PIPELINE.read_text().replace("IdentifyPrimaryObjects:[", "IdentifyPrimaryObjectz:[", 1))
    with environment({"CPB_HOME": str(tmp_path / "home")}), \
            LocalCloud(LocalSettings(stack="rq"), log_dir=tmp_path / "logs", cores=2) as cloud:
        cli_run = CliRunner()
        sent = cli_run.invoke(cli, ["submit", "--stack", "local", "--upload", str(plate.images_dir),
                                    "--pipeline", str(broken), "--input", "plates/RQ1", "--output", "results/RQ1",
                                    "--data-file", str(plate.images_dir / "load_data.csv"),
                                    "--image-sets-per-job", "1", "--vcpus", "1"])
        assert sent.exit_code == 0, sent.output
        assert cloud.wait_idle(300)
        assert [r.failed for r in cloud.mapping.reports] == [[]]
        first = cloud.batch.outcomes
        assert [o.status for o in first] == ["FAILED", "FAILED"]
        failed = cli_run.invoke(cli, ["status", "--stack", "local", "--no-dlq"])
        assert failed.exit_code == 1 and "0/2 children succeeded, 2 failed" in failed.output

        # The fix: replace the pipeline object the jobs read (same key), then requeue.
        s3 = boto3.client("s3")
        pipeline_key = s3.list_objects_v2(Bucket=cloud.stack.bucket, Prefix="pipelines/")["Contents"][0]["Key"]
        s3.put_object(Bucket=cloud.stack.bucket, Key=pipeline_key, Body=PIPELINE.read_bytes())
        requeued = cli_run.invoke(cli, ["requeue", "--stack", "local", "results/RQ1"])
        assert requeued.exit_code == 0, requeued.output
        assert requeued.output.count("resubmit child") == 2
        assert cloud.wait_idle(300)
        second = cloud.batch.outcomes[len(first):]
        assert sorted(o.status for o in second) == ["SUCCEEDED", "SUCCEEDED"]
        assert all(o.item.index is None and o.item.environment["CPB_ARRAY_INDEX"] in ("0", "1") for o in second)

        done = cli_run.invoke(cli, ["status", "--stack", "local", "--no-dlq"])
        assert done.exit_code == 0, done.output
        got = cli_run.invoke(cli, ["results", "--stack", "local", "results/RQ1", "--to", str(tmp_path / "out")])
        assert got.exit_code == 0, got.output
    rows = list(csv.DictReader(open(tmp_path / "out" / "Image.csv")))
    counted = {(r["Metadata_Well"], int(float(r["Metadata_Site"]))): int(float(r["Count_Nuclei"])) for r in rows}
    assert counted == plate.truth
    assert sorted(int(r["ImageNumber"]) for r in rows) == [1, 2]
