"""AWS mode end to end: `python -m cpb_worker` as a subprocess with the job
environment the Lambda sets, S3 served by moto on 127.0.0.1, real CellProfiler."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import boto3
import pytest
from moto.server import ThreadedMotoServer

from test_worker_support import NUCLEI, PY38, REPO, read_rows

BUCKET = "cpb-worker-test"


@pytest.fixture(scope="module")
def moto_url():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3(moto_url):
    client = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def plate(tmp_path_factory, s3):
    """A 3-set synthetic plate uploaded as a user would: images + CSV under the input prefix."""
    from cpb.demo.synthetic import make_plate
    plate = make_plate(tmp_path_factory.mktemp("plate"), wells=("C01",), sites=3, seed=3, size=160, nuclei=(4, 8))
    for image in plate.images:
        s3.upload_file(str(image), BUCKET, f"plates/p1/images/{image.name}")
    s3.upload_file(str(plate.data_file), BUCKET, "plates/p1/load_data.csv")
    s3.upload_file(str(NUCLEI), BUCKET, "pipelines/nuclei.cppipe")
    return plate


def job_env(cellprofiler_env, moto_url, **overrides):
    env = dict(cellprofiler_env, AWS_ENDPOINT_URL=moto_url, AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               CPB_BUCKET=BUCKET, CPB_PIPELINE="pipelines/nuclei.cppipe", CPB_INPUT="plates/p1/images",
               CPB_OUTPUT="results/run1", CPB_DATA_FILE="plates/p1/load_data.csv", CPB_VCPUS="2",
               CPB_MESSAGE_ID="msg-1", AWS_BATCH_JOB_ID="job-1", AWS_BATCH_JOB_ATTEMPT="1")
    for name in ("AWS_BATCH_JOB_ARRAY_INDEX", "CPB_ARRAY_INDEX", "CPB_IMAGE_SETS_PER_JOB", "CPB_FSX_ROOT",
                 "CPB_IMAGE_SET_COUNT", "AWS_PROFILE"):
        env.pop(name, None)
    env.update({k: str(v) for k, v in overrides.items() if v is not None})
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
    return env


def run_worker(env, python=sys.executable):
    return subprocess.run([python, "-m", "cpb_worker"], env=env, capture_output=True, text=True, timeout=300)


def python_for(version: str) -> str:
    """This interpreter, or the container's Python 3.8 (with only boto3 1.37 + the worker on its path)."""
    if version == "3.8":
        if not PY38.exists():
            if os.environ.get("CI"):
                pytest.fail(f"{PY38} is missing in CI (make py38 builds it)")
            pytest.skip(f"Python 3.8 virtualenv not found at {PY38} (build it with `make py38`)")
        return str(PY38)
    return sys.executable


def keys(s3, prefix):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def get(s3, key) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def assert_record_matches_bucket(s3, prefix):
    """The record lists exactly the objects under the prefix, with their sizes and checksums."""
    record = json.loads(get(s3, f"{prefix}/_cpb/run.json"))
    assert record["status"] == "succeeded"
    listed = {f"{prefix}/{f['key']}" for f in record["files"]}
    present = {k for k in keys(s3, prefix + "/") if not k.startswith(f"{prefix}/part-")}
    assert present == listed | {f"{prefix}/_cpb/run.json"}
    for entry in record["files"]:
        body = get(s3, f"{prefix}/{entry['key']}")
        assert (len(body), hashlib.sha256(body).hexdigest()) == (entry["size"], entry["sha256"]), entry["key"]
    return record


@pytest.mark.cellprofiler
def test_job_downloads_runs_split_and_uploads_with_the_record_last(plate, s3, cellprofiler_env, moto_url, tmp_path):
    proc = run_worker(job_env(cellprofiler_env, moto_url))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = assert_record_matches_bucket(s3, "results/run1")
    assert (record["first"], record["last"], record["processes"], record["array_index"]) == (1, 3, 2, None)
    assert record["message_id"] == "msg-1" and record["timings"]["upload"] >= 0
    (tmp_path / "Image.csv").write_bytes(get(s3, "results/run1/Image.csv"))
    rows = read_rows(tmp_path / "Image.csv")
    assert [int(r["ImageNumber"]) for r in rows] == [1, 2, 3]
    counts = {int(r["Metadata_Site"]): float(r["Count_Nuclei"]) for r in rows}
    assert all(abs(counts[site] - plate.truth[("C01", site)]) <= 1 for site in (1, 2, 3))
    assert proc.stderr.strip().splitlines()[-1].startswith("cpb_worker: succeeded: image sets 1-3")


@pytest.mark.cellprofiler
@pytest.mark.parametrize("python", ["current", "3.8"])
def test_array_child_runs_only_its_range_into_its_part_prefix(plate, s3, cellprofiler_env, moto_url, python):
    """Also on Python 3.8 + boto3 1.37, the container's, so the S3 path is proven there too."""
    out = f"results/array-{python}"
    env = job_env(cellprofiler_env, moto_url, CPB_OUTPUT=out, CPB_IMAGE_SETS_PER_JOB=2,
                  CPB_IMAGE_SET_COUNT=3, AWS_BATCH_JOB_ARRAY_INDEX=1, PYTHONPATH=REPO / "image")
    proc = run_worker(env, python_for(python))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = assert_record_matches_bucket(s3, f"{out}/part-00001")
    assert (record["first"], record["last"], record["array_index"], record["processes"]) == (3, 3, 1, 1)
    assert keys(s3, f"{out}/") == keys(s3, f"{out}/part-00001/")  # nothing outside its part


def test_out_of_range_array_index_fails_without_running(plate, s3, cellprofiler_env, moto_url):
    env = job_env(cellprofiler_env, moto_url, CPB_OUTPUT="results/bad-index", CPB_IMAGE_SETS_PER_JOB=2,
                  AWS_BATCH_JOB_ARRAY_INDEX=7, CPB_CELLPROFILER="/nonexistent/cellprofiler")
    proc = run_worker(env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "cpb_worker: failed: AWS_BATCH_JOB_ARRAY_INDEX 7 is out of range: 3 image sets in chunks of 2 "
        "make 2 children (indexes 0..1)")
    record = json.loads(get(s3, "results/bad-index/part-00007/_cpb/run.json"))
    assert record["status"] == "failed" and "out of range" in record["reason"] and record["files"] == []


@pytest.mark.parametrize("override,exit_code,reason", [
    ({"CPB_DATA_FILE": "plates/p1/absent.csv"}, 2, "download s3://cpb-worker-test/plates/p1/absent.csv: "
                                                   "s3://cpb-worker-test has no such key"),
    ({"CPB_PIPELINE": "pipelines/../../etc/passwd"}, 2, "is not a plain relative key"),
    ({"CPB_BUCKET": None}, 2, "job environment lacks CPB_BUCKET"),
    ({"CPB_IMAGE_SET_COUNT": 5}, 2, "CPB_IMAGE_SET_COUNT is 5 but the data file gives 3 image sets"),
])
def test_bad_job_environment_fails_with_one_line_reason(plate, s3, cellprofiler_env, moto_url, override,
                                                        exit_code, reason):
    env = job_env(cellprofiler_env, moto_url, CPB_OUTPUT="results/bad-env", CPB_CELLPROFILER="/nonexistent", **override)
    proc = run_worker(env)
    assert proc.returncode == exit_code
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cpb_worker: failed: ") and reason in last
    assert not any(k.endswith("run.json") and json.loads(get(s3, k))["status"] == "succeeded"
                   for k in keys(s3, "results/bad-env/"))


@pytest.mark.cellprofiler
def test_fsx_mode_reads_the_mounted_files_not_s3(plate, s3, cellprofiler_env, moto_url, tmp_path):
    """With CPB_FSX_ROOT mounted the inputs are read from <root>/<key>; here they exist ONLY there."""
    fsx = tmp_path / "fsx"
    shutil.copytree(plate.images_dir, fsx / "fsx-only" / "images")
    shutil.copy(plate.data_file, fsx / "fsx-only" / "load_data.csv")
    (fsx / "pipelines").mkdir()
    shutil.copy(NUCLEI, fsx / "pipelines" / "nuclei.cppipe")
    env = job_env(cellprofiler_env, moto_url, CPB_FSX_ROOT=fsx, CPB_INPUT="fsx-only/images",
                  CPB_DATA_FILE="fsx-only/load_data.csv", CPB_OUTPUT="results/fsx")
    assert keys(s3, "fsx-only/") == []
    proc = run_worker(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(FSx)" in proc.stderr
    record = assert_record_matches_bucket(s3, "results/fsx")
    assert record["image_set_count"] == 3


@pytest.mark.cellprofiler
@pytest.mark.fault
def test_files_fsx_has_not_imported_yet_are_read_from_s3(plate, s3, cellprofiler_env, moto_url, tmp_path):
    """FSx imports new objects shortly after they land in S3: a job started right after the upload reads
    the late ones from S3 instead of failing (exit 2 would not be retried) or skipping image sets."""
    fsx = tmp_path / "fsx"
    shutil.copytree(plate.images_dir, fsx / "plates" / "p1" / "images")
    late = sorted((fsx / "plates" / "p1" / "images").iterdir())[-1]
    late.unlink()
    (fsx / "pipelines").mkdir()
    shutil.copy(NUCLEI, fsx / "pipelines" / "nuclei.cppipe")  # the data file is late too
    env = job_env(cellprofiler_env, moto_url, CPB_FSX_ROOT=fsx, CPB_OUTPUT="results/fsx-late")
    proc = run_worker(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not yet on FSx" in proc.stderr and "reading them from S3" in proc.stderr
    record = assert_record_matches_bucket(s3, "results/fsx-late")
    assert record["image_set_count"] == 3
    (tmp_path / "Image.csv").write_bytes(get(s3, "results/fsx-late/Image.csv"))
    assert [r["ImageNumber"] for r in read_rows(tmp_path / "Image.csv")] == ["1", "2", "3"]


@pytest.mark.fault
def test_input_prefix_missing_files_on_fsx_is_staged_whole_from_s3(plate, s3, moto_url, tmp_path, monkeypatch):
    """Without a data file the folder is the image list: a lagging FSx folder must not shrink it."""
    from cpb_worker.aws import JobEnv, Stager
    from cpb_worker.s3io import S3IO, make_client
    env = job_env({}, moto_url, CPB_FSX_ROOT=tmp_path / "fsx", CPB_DATA_FILE=None)
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])
    on_fsx = tmp_path / "fsx" / "plates" / "p1" / "images"
    shutil.copytree(plate.images_dir, on_fsx)
    stager = Stager(JobEnv.from_env(env), S3IO(make_client(env), BUCKET), root=tmp_path / "scratch")
    assert stager.input_dir("plates/p1/images") == on_fsx  # complete: read in place
    (on_fsx / plate.images[0].name).unlink()
    staged = stager.input_dir("plates/p1/images")
    assert staged == tmp_path / "scratch" / "plates" / "p1" / "images"
    assert sorted(p.name for p in staged.iterdir()) == sorted(p.name for p in plate.images)


@pytest.mark.cellprofiler
def test_names_and_types_pipeline_without_data_file_downloads_the_input_prefix(shared_examples, s3, cellprofiler_env,
                                                                               moto_url, tmp_path,
                                                                               example_human_nuclei):
    """ExampleHuman (Images/NamesAndTypes, no LoadData): image sets counted from file rules."""
    root = shared_examples / "ExampleHuman"
    s3.upload_file(str(root / "ExampleHuman.cppipe"), BUCKET, "human/ExampleHuman.cppipe")
    for image in (root / "images").iterdir():
        s3.upload_file(str(image), BUCKET, f"human/images/{image.name}")
    env = job_env(cellprofiler_env, moto_url, CPB_PIPELINE="human/ExampleHuman.cppipe", CPB_INPUT="human/images",
                  CPB_DATA_FILE=None, CPB_OUTPUT="results/human")
    proc = run_worker(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = assert_record_matches_bucket(s3, "results/human")
    assert (record["first"], record["last"], record["processes"]) == (1, 1, 1)
    (tmp_path / "Image.csv").write_bytes(get(s3, "results/human/Image.csv"))
    assert read_rows(tmp_path / "Image.csv")[0]["Count_Nuclei"] == f"{example_human_nuclei}.0"


def test_loaddata_csv_named_by_the_pipeline_is_fetched_alone_when_no_data_file_is_sent(plate, s3, moto_url, tmp_path,
                                                                                        monkeypatch):
    """A LoadData pipeline whose CSV sits in the input prefix: only that CSV is read to plan (and to
    decide about resume), not the whole prefix; a CSV named outside the input folder is refused."""
    from cpb_worker.aws import JobEnv, Stager, plan_inputs
    from cpb_worker.errors import BadInput
    from cpb_worker.s3io import S3IO, make_client
    env = job_env({}, moto_url, CPB_DATA_FILE=None)
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])
    s3.upload_file(str(plate.images_dir / "load_data.csv"), BUCKET, "plates/p1/images/load_data.csv")
    job = JobEnv.from_env(env)
    client = S3IO(make_client(env), BUCKET)
    plan, listing = plan_inputs(job, Stager(job, client, tmp_path / "scratch"), client, env)
    assert plan.data_file == tmp_path / "scratch" / "plates" / "p1" / "images" / "load_data.csv"
    assert (plan.first, plan.last, listing) == (1, 3, None)
    assert sorted(p.name for p in (tmp_path / "scratch" / "plates" / "p1" / "images").iterdir()) == ["load_data.csv"]
    elsewhere = tmp_path / "elsewhere.cppipe"
    elsewhere.write_text(NUCLEI.read_text().replace("Input data file location:Default Input Folder|",
                                                    "Input data file location:Elsewhere...|/Users/me"))
    s3.upload_file(str(elsewhere), BUCKET, "pipelines/elsewhere.cppipe")
    env2 = dict(env, CPB_PIPELINE="pipelines/elsewhere.cppipe")
    job2 = JobEnv.from_env(env2)
    with pytest.raises(BadInput, match="has LoadData but the job has no data_file, and its CSV is not in the input "
                                       r"folder \(Elsewhere...\): send the CSV as the message's data_file"):
        plan_inputs(job2, Stager(job2, client, tmp_path / "s2"), client, env2)
