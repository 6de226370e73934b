"""Issue 10: a pipeline whose image sets come from Images/Metadata/NamesAndTypes (no LoadData)
is counted by CellProfiler itself and split over every process, locally (`cpb run --local`)
and in AWS mode against moto, with the same results as ONE plain `cellprofiler -c -r`.

The pipeline (cpb/pipelines/metadata_illum.cppipe) matches channels by a Well key built from
row and column, loads .npy illumination functions through NamesAndTypes and divides them out;
the plate (cpb.demo.synthetic.make_metadata_plate) knows its nucleus count per site."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from cpb.demo.synthetic import METADATA_PIPELINE, make_metadata_plate
from cpb_worker.filerules import count_image_sets
from cpb_worker.pipeline import load_pipeline
from cpb_worker.runner import cellprofiler_argv, cellprofiler_python

from test_worker_support import REPO, compare_outputs, read_rows

pytestmark = pytest.mark.cellprofiler
BUCKET = "cpb-metadata-test"


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    return make_metadata_plate(tmp_path_factory.mktemp("mplate"), wells=("B03", "B04", "C05"), sites=2, seed=10,
                               size=192, nuclei=(5, 12))


@pytest.fixture(scope="module")
def single(plate, cellprofiler_env, tmp_path_factory):
    """The oracle: one plain CellProfiler process of the same version over the whole plate."""
    out = tmp_path_factory.mktemp("single")
    argv = cellprofiler_argv(cellprofiler_env) + ["-c", "-r", "-p", str(METADATA_PIPELINE), "-i",
                                                  str(plate.images_dir), "-o", str(out)]
    proc = subprocess.run(argv, env=cellprofiler_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def _counts(image_csv: Path):
    return {(r["Metadata_Well"], int(r["Metadata_Site"])): int(float(r["Count_Nuclei"])) for r in read_rows(image_csv)}


def test_one_plain_process_finds_the_known_nuclei(plate, single):
    """The oracle itself is right: every site's nuclei found, through the illumination correction."""
    assert _counts(single / "Image.csv") == plate.truth
    image = read_rows(single / "Image.csv")
    assert {r["FileName_IllumDNA"] for r in image} == {"SYN2_IllumDNA.npy"}  # one .npy for every image set
    assert len(read_rows(single / "Object relationships.csv")) == sum(plate.truth.values())


def test_cpb_run_local_splits_it_over_two_processes_like_one(plate, single, cellprofiler_env, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "cpb", "run", "--local", "--pipeline", str(METADATA_PIPELINE),
                           "--input", str(plate.images_dir), "--output", str(out), "--workers", "2"],
                          env=cellprofiler_env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "succeeded: image sets 1-6 with 2 CellProfiler process(es)" in proc.stdout + proc.stderr
    record = json.loads((out / "_cpb" / "run.json").read_text())
    assert (record["processes"], record["split"], record["exit_codes"]) == (2, True, [0, 0])
    assert (record["first"], record["last"], record["image_set_count"]) == (1, 6, 6)
    assert sorted(f["key"] for f in record["files"] if f["key"].startswith("_cpb/logs/")) == [
        "_cpb/logs/cellprofiler-000001-000003.log", "_cpb/logs/cellprofiler-000004-000006.log"]
    assert compare_outputs(single, out) > 1000
    assert _counts(out / "Image.csv") == plate.truth
    truth_total = sum(plate.truth.values())
    assert record["tables"] == {"Image.csv": 6, "Nuclei.csv": truth_total, "Cells.csv": truth_total,
                                "Object relationships.csv": truth_total}


@pytest.fixture(scope="module")
def moto(plate):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    for path in plate.images:
        s3.upload_file(str(path), BUCKET, f"plates/m1/{path.relative_to(plate.images_dir).as_posix()}")
    s3.upload_file(str(METADATA_PIPELINE), BUCKET, "pipelines/metadata_illum.cppipe")
    yield url, s3
    server.stop()


def _job(cellprofiler_env, url, **extra):
    env = dict(cellprofiler_env, AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1", CPB_BUCKET=BUCKET, CPB_PIPELINE="pipelines/metadata_illum.cppipe",
               CPB_INPUT="plates/m1", CPB_VCPUS="2", PYTHONPATH=str(REPO / "image"))
    for name in ("AWS_BATCH_JOB_ARRAY_INDEX", "CPB_DATA_FILE", "CPB_IMAGE_SET_COUNT", "CPB_IMAGE_SETS_PER_JOB",
                 "CPB_FSX_ROOT", "CPB_RUN_ID", "AWS_PROFILE"):
        env.pop(name, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _download(s3, prefix: str, dest: Path) -> dict:
    record = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}/_cpb/run.json")["Body"].read())
    for entry in record["files"]:
        target = dest / entry["key"]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(BUCKET, f"{prefix}/{entry['key']}", str(target))
    return record


def test_aws_mode_splits_it_over_two_processes_like_one(plate, single, moto, cellprofiler_env, tmp_path):
    url, s3 = moto
    proc = subprocess.run([sys.executable, "-m", "cpb_worker"], env=_job(cellprofiler_env, url, CPB_OUTPUT="res/all"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = _download(s3, "res/all", tmp_path / "out")
    assert (record["status"], record["processes"], record["split"]) == ("succeeded", 2, True)
    assert (record["first"], record["last"]) == (1, 6)
    assert compare_outputs(single, tmp_path / "out") > 1000
    from cpb_worker.fingerprint import input_listing_sha256
    listing = [(p.relative_to(plate.images_dir).as_posix(), p.stat().st_size) for p in plate.images]
    assert record["fingerprint"]["data_sha256"] == input_listing_sha256(listing)  # every input file, .npy too
    assert record["fingerprint"]["cellprofiler_version"] == record["cellprofiler_version"] != "unknown"


def test_aws_array_child_runs_its_share_of_cellprofilers_list(plate, single, moto, cellprofiler_env, tmp_path):
    """CPB_IMAGE_SET_COUNT from the Lambda gives the child 5-6 of CellProfiler's 6 sets."""
    url, s3 = moto
    env = _job(cellprofiler_env, url, CPB_OUTPUT="res/array", CPB_IMAGE_SETS_PER_JOB=4, CPB_IMAGE_SET_COUNT=6,
               AWS_BATCH_JOB_ARRAY_INDEX=1)
    proc = subprocess.run([sys.executable, "-m", "cpb_worker"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = _download(s3, "res/array/part-00001", tmp_path / "part")
    assert (record["first"], record["last"], record["processes"], record["array_index"]) == (5, 6, 2, 1)
    rows = read_rows(tmp_path / "part" / "Image.csv")
    oracle = [r for r in read_rows(single / "Image.csv") if r["ImageNumber"] in ("5", "6")]
    assert [(r["ImageNumber"], r["Metadata_Well"], r["Metadata_Site"], r["Count_Nuclei"]) for r in rows] == \
        [(r["ImageNumber"], r["Metadata_Well"], r["Metadata_Site"], r["Count_Nuclei"]) for r in oracle]
    nuclei = read_rows(tmp_path / "part" / "Nuclei.csv")
    assert len(nuclei) == sum(int(float(r["Count_Nuclei"])) for r in oracle)


def test_a_wrong_image_set_count_stops_before_any_image_set_runs(plate, moto, cellprofiler_env):
    """The Lambda's count (CPB_IMAGE_SET_COUNT) disagrees with CellProfiler's: a clear failure
    (exit 2), never a silent drop of the sets beyond the Lambda's count."""
    url, s3 = moto
    env = _job(cellprofiler_env, url, CPB_OUTPUT="res/miscount", CPB_IMAGE_SETS_PER_JOB=4, CPB_IMAGE_SET_COUNT=5,
               AWS_BATCH_JOB_ARRAY_INDEX=0)
    proc = subprocess.run([sys.executable, "-m", "cpb_worker"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "cpb_worker: failed: CPB_IMAGE_SET_COUNT is 5 but CellProfiler makes 6 image sets from the input folder: "
        "resubmit so the count is taken again")
    record = json.loads(s3.get_object(Bucket=BUCKET, Key="res/miscount/part-00000/_cpb/run.json")["Body"].read())
    assert record["status"] == "failed" and record["files"] == []


def test_cellprofilers_count_agrees_with_the_file_rule_counter(plate, cellprofiler_env, tmp_path):
    """The Lambda counts with cpb_worker.filerules (no CellProfiler there): on this pipeline it must
    give CellProfiler's own number, also with a site missing a channel and a stray file."""
    import shutil
    images = tmp_path / "images"
    shutil.copytree(plate.images_dir, images)
    (images / "r03c05f02p01-ch2sk1fk1fl1.tiff").unlink()  # C05 site 2 lacks Cells: no image set
    (images / "notes.txt").write_text("not an image")
    python, why = cellprofiler_python(cellprofiler_env)
    assert python, why
    from cpb_worker.cpsets import script_path
    report = tmp_path / "count.json"
    proc = subprocess.run([python, script_path(), "--report", str(report), "--count-only", "--"]
                          + cellprofiler_argv(cellprofiler_env)[1:]
                          + ["-c", "-r", "-p", str(METADATA_PIPELINE), "-i", str(images), "-o", str(tmp_path / "o")],
                          env=cellprofiler_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    counted = json.loads(report.read_text())
    assert counted == {"status": "counted", "count": 5, "grouped": False}
    assert count_image_sets(load_pipeline(METADATA_PIPELINE), images) == 5
    assert not (tmp_path / "o" / "Image.csv").exists()  # counting analysed nothing


@pytest.mark.fault
def test_a_cellprofiler_without_the_hooks_runs_one_process_with_the_same_results(plate, single, cellprofiler_env,
                                                                                 tmp_path):
    """A CellProfiler whose cellprofiler_core lacks what cpsets.py hooks (a future release): every part
    says 'unsupported' without running; the worker runs one plain process and says why."""
    import stat
    from cpb_worker.local import run_local
    fake = tmp_path / "python-without-hooks"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nargs = sys.argv[1:]\n"
                    "json.dump({'status': 'unsupported', 'reason': 'Pipeline.group changed'}, "
                    "open(args[args.index('--report') + 1], 'w'))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    record = run_local(METADATA_PIPELINE, plate.images_dir, tmp_path / "out", workers=2,
                       env=dict(cellprofiler_env, CPB_CELLPROFILER_PYTHON=str(fake)))
    assert (record.processes, record.split, record.exit_codes) == (1, False, [0])
    assert record.warnings[0] == ("this CellProfiler cannot split by its own count (Pipeline.group changed); one "
                                  "process ran every image set")
    assert compare_outputs(single, tmp_path / "out") > 1000
