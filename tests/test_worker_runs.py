"""Issue 11 (runs, leases) and issue 13 (resume), the worker's side (docs/CONTRACTS.md, "Worker
duties (additions)"): CPB_RUN_ID in every record; a job whose output lease names another run
exits 5 and writes nothing; a part's record of another run is reused when its fingerprint,
range and files match (CellProfiler does not start) and otherwise deleted before anything else.

S3 is a moto server; CellProfiler is real where a run must succeed, and a path that does not
exist where the test proves CellProfiler is NOT started."""
from __future__ import annotations

import csv
import json
import os

import boto3
import pytest
from moto.server import ThreadedMotoServer

from cpb_worker import aws as worker_aws
from cpb_worker.aws import JobEnv
from cpb_worker.errors import PipelineFailed
from cpb_worker.local import run_local
from cpb_worker.record import read_local

from test_worker_support import NUCLEI, check_record_files, read_rows

pytestmark = pytest.mark.race
BUCKET = "cpb-runs-test"
NO_CELLPROFILER = "/nonexistent/cellprofiler"


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    from cpb.demo.synthetic import make_plate
    return make_plate(tmp_path_factory.mktemp("plate"), wells=("F06",), sites=4, seed=6, size=96, nuclei=(1, 3))


@pytest.fixture(scope="module")
def server(plate):
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    url = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    for image in plate.images:
        s3.upload_file(str(image), BUCKET, f"in/{image.name}")
    s3.upload_file(str(plate.data_file), BUCKET, "in/load_data.csv")
    s3.upload_file(str(NUCLEI), BUCKET, "p/nuclei.cppipe")
    yield url, s3
    moto.stop()


@pytest.fixture
def s3(server, monkeypatch):
    url, client = server
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}.items():
        monkeypatch.setenv(name, value)
    return client


def job(cellprofiler_env, tmp_path, output, run_id, **extra):
    """The job environment of run `run_id` on `output` (the moto endpoint set by the s3 fixture)."""
    env = dict(cellprofiler_env, AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"], CPB_BUCKET=BUCKET,
               CPB_PIPELINE="p/nuclei.cppipe", CPB_INPUT="in", CPB_OUTPUT=output, CPB_DATA_FILE="in/load_data.csv",
               CPB_VCPUS="1", CPB_WORK_DIR=str(tmp_path), CPB_RUN_ID=run_id, CPB_IMAGE="repo@sha256:aaaa")
    for name in ("AWS_BATCH_JOB_ARRAY_INDEX", "CPB_IMAGE_SETS_PER_JOB", "CPB_IMAGE_SET_COUNT", "CPB_RESUME",
                 "CPB_AFTER", "CPB_ARRAY_OFFSET"):
        env.pop(name, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def child(cellprofiler_env, tmp_path, output, run_id, index, **extra):
    """Array child `index` of the 4-set plate in chunks of 2."""
    return job(cellprofiler_env, tmp_path, output, run_id, CPB_IMAGE_SETS_PER_JOB=2, CPB_IMAGE_SET_COUNT=4,
               AWS_BATCH_JOB_ARRAY_INDEX=index, **extra)


def put_lease(s3, output, run_id, state="submitted", **extra):
    body = dict({"run_id": run_id, "message_id": f"msg-{run_id}", "state": state, "jobs": [], "array_size": None},
                **extra)
    s3.put_object(Bucket=BUCKET, Key=f"{output}/_cpb/lease.json", Body=json.dumps(body).encode())


def objects(s3, prefix):
    found = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in found}


def record_at(s3, prefix):
    return json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}/_cpb/run.json")["Body"].read())


def test_array_offset_is_added_to_the_batch_index_but_not_to_a_requeued_index():
    base = {"CPB_BUCKET": "b", "CPB_PIPELINE": "p", "CPB_INPUT": "in", "CPB_OUTPUT": "out",
            "CPB_IMAGE_SETS_PER_JOB": "5", "CPB_RUN_ID": "r1", "CPB_AFTER": "res/illum/, res/other"}
    job_env = JobEnv.from_env(dict(base, AWS_BATCH_JOB_ARRAY_INDEX="3", CPB_ARRAY_OFFSET="10000"))
    assert (job_env.array_index, job_env.prefix, job_env.run_id) == (10003, "out/part-10003", "r1")
    assert job_env.after == ("res/illum", "res/other") and job_env.resume
    requeued = JobEnv.from_env(dict(base, CPB_ARRAY_INDEX="10003", CPB_ARRAY_OFFSET="10000", CPB_RESUME="0"))
    assert requeued.array_index == 10003 and not requeued.resume  # cpb requeue / OOM retry: already global


def test_a_job_whose_lease_names_another_run_exits_5_and_writes_nothing(s3, cellprofiler_env, tmp_path, capsys):
    put_lease(s3, "res/superseded", "run-B")
    before = objects(s3, "res/superseded/")
    env = job(cellprofiler_env, tmp_path, "res/superseded", "run-A", CPB_CELLPROFILER=NO_CELLPROFILER)
    assert worker_aws.main_aws(env) == 5
    assert objects(s3, "res/superseded/") == before  # not even a failed record
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "cpb_worker: superseded: output s3://cpb-runs-test/res/superseded now belongs to run run-B of message "
        "msg-run-B; this job's run run-A was replaced, so it writes nothing")
    put_lease(s3, "res/cancelled", "run-A", state="cancelled")
    assert worker_aws.main_aws(job(cellprofiler_env, tmp_path, "res/cancelled", "run-A",
                                   CPB_CELLPROFILER=NO_CELLPROFILER)) == 5
    assert list(objects(s3, "res/cancelled/")) == ["res/cancelled/_cpb/lease.json"]


@pytest.mark.cellprofiler
def test_a_run_replaced_while_it_ran_does_not_write_its_record(s3, cellprofiler_env, tmp_path, monkeypatch):
    """Two messages on one output: the lease passes to run B while run A uploads. A's record would
    claim the output for a run consumers no longer accept; A exits 5 leaving pending.json, which
    the next job of the output uses to delete A's files."""
    put_lease(s3, "res/race", "run-A")
    original = worker_aws.upload_outputs

    def upload_then_lose_the_lease(client, prefix, out_dir, record):
        original(client, prefix, out_dir, record)
        put_lease(s3, "res/race", "run-B")

    monkeypatch.setattr(worker_aws, "upload_outputs", upload_then_lose_the_lease)
    assert worker_aws.main_aws(job(cellprofiler_env, tmp_path / "a", "res/race", "run-A")) == 5
    left = objects(s3, "res/race/")
    assert "res/race/_cpb/run.json" not in left and "res/race/_cpb/pending.json" in left
    monkeypatch.setattr(worker_aws, "upload_outputs", original)
    assert worker_aws.main_aws(job(cellprofiler_env, tmp_path / "b", "res/race", "run-B", CPB_VCPUS=2)) == 0
    record = record_at(s3, "res/race")
    assert record["run_id"] == "run-B" and record["processes"] == 2
    listed = {f"res/race/{f['key']}" for f in record["files"]}
    assert set(objects(s3, "res/race/")) == listed | {"res/race/_cpb/run.json", "res/race/_cpb/lease.json"}


@pytest.fixture
def first_run(s3, cellprofiler_env, tmp_path):
    """Run A of output res/<test>: array children 0 and 1 (image sets 1-2 and 3-4), real CellProfiler."""
    def run(output):
        put_lease(s3, output, "run-A", array_size=2)
        for index in (0, 1):
            assert worker_aws.main_aws(child(cellprofiler_env, tmp_path / f"a{index}", output, "run-A", index)) == 0
        put_lease(s3, output, "run-B", array_size=2, previous_run_id="run-A")
        return {i: record_at(s3, f"{output}/part-{i:05d}") for i in (0, 1)}
    return run


@pytest.mark.cellprofiler
def test_an_unchanged_part_is_resumed_without_starting_cellprofiler(s3, first_run, cellprofiler_env, tmp_path,
                                                                    capsys):
    old = first_run("res/resume")
    before = objects(s3, "res/resume/part-00001/")
    env = child(cellprofiler_env, tmp_path / "b", "res/resume", "run-B", 1, CPB_CELLPROFILER=NO_CELLPROFILER)
    assert worker_aws.main_aws(env) == 0
    record = record_at(s3, "res/resume/part-00001")
    assert (record["run_id"], record["resumed_from"], record["status"]) == ("run-B", "run-A", "succeeded")
    assert (record["first"], record["last"], record["array_index"]) == (3, 4, 1)
    assert record["files"] == old[1]["files"] and record["fingerprint"] == old[1]["fingerprint"]
    after = objects(s3, "res/resume/part-00001/")
    assert {k: v for k, v in after.items() if not k.endswith("run.json")} == \
        {k: v for k, v in before.items() if not k.endswith("run.json")}  # the same files, untouched
    err = capsys.readouterr().err
    assert "resumed: the results of run run-A (image sets 3-4) have the same fingerprint" in err
    assert "cannot start CellProfiler" not in err


@pytest.mark.cellprofiler
def test_a_part_whose_rows_changed_is_rerun_and_the_old_record_goes_first(s3, first_run, plate, cellprofiler_env,
                                                                          tmp_path, capsys):
    """Row 4 changes (child 1's range): child 1 must not resume; child 0's rows are unchanged and
    it resumes. The fingerprint is this job's rows by content, never a count."""
    first_run("res/changed")
    rows = list(csv.reader(plate.data_file.open()))
    rows[4][-1] = "9"  # Metadata_Site of image set 4
    changed = tmp_path / "load_data.csv"
    with open(changed, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    s3.upload_file(str(changed), BUCKET, "in/changed.csv")
    env0 = child(cellprofiler_env, tmp_path / "b0", "res/changed", "run-B", 0, CPB_DATA_FILE="in/changed.csv",
                 CPB_CELLPROFILER=NO_CELLPROFILER)
    assert worker_aws.main_aws(env0) == 0
    assert record_at(s3, "res/changed/part-00000")["resumed_from"] == "run-A"
    env1 = dict(env0, AWS_BATCH_JOB_ARRAY_INDEX="1")
    assert worker_aws.main_aws(env1) == 3  # it tried to run CellProfiler: nothing reused
    err = capsys.readouterr().err
    assert "not reusing the results of run run-A: data-file rows / input files changed" in err
    record = record_at(s3, "res/changed/part-00001")
    assert (record["status"], record["run_id"]) == ("failed", "run-B")
    assert "cannot start CellProfiler" in record["reason"]


@pytest.mark.cellprofiler
def test_no_resume_when_asked_or_when_a_file_is_gone(s3, first_run, cellprofiler_env, tmp_path, capsys):
    first_run("res/noresume")
    env = child(cellprofiler_env, tmp_path / "b", "res/noresume", "run-B", 0, CPB_CELLPROFILER=NO_CELLPROFILER,
                CPB_RESUME=0)
    assert worker_aws.main_aws(env) == 3
    assert record_at(s3, "res/noresume/part-00000")["run_id"] == "run-B"  # run A's record replaced, failed
    s3.delete_object(Bucket=BUCKET, Key="res/noresume/part-00001/Nuclei.csv")
    env1 = child(cellprofiler_env, tmp_path / "c", "res/noresume", "run-B", 1, CPB_CELLPROFILER=NO_CELLPROFILER)
    assert worker_aws.main_aws(env1) == 3
    assert "Nuclei.csv is not there at its recorded size" in capsys.readouterr().err


def test_a_failed_run_leaves_no_succeeded_record_of_the_old_run(s3, cellprofiler_env, tmp_path):
    """Issue 11.1: a new run half done must never pass for complete with the old run's record. The
    old (succeeded) record of another run goes before anything else, even when the new job fails
    before CellProfiler starts; the old run's files are queued for deletion in pending.json."""
    s3.put_object(Bucket=BUCKET, Key="res/old/_cpb/run.json", Body=json.dumps(
        {"status": "succeeded", "run_id": "run-A", "first": 1, "last": 4, "array_index": None,
         "files": [{"key": "Image.csv", "size": 3, "sha256": "x"}], "fingerprint": None}).encode())
    s3.put_object(Bucket=BUCKET, Key="res/old/Image.csv", Body=b"old")
    put_lease(s3, "res/old", "run-B")
    env = job(cellprofiler_env, tmp_path, "res/old", "run-B", CPB_DATA_FILE="in/absent.csv",
              CPB_CELLPROFILER=NO_CELLPROFILER)
    assert worker_aws.main_aws(env) == 2
    record = record_at(s3, "res/old")
    assert (record["status"], record["run_id"]) == ("failed", "run-B")
    pending = json.loads(objects(s3, "res/old/")["res/old/_cpb/pending.json"])
    assert pending["keys"] == ["res/old/Image.csv"]


def test_upstream_results_enter_the_fingerprint(s3, cellprofiler_env, tmp_path):
    """An analysis that runs after an illumination step: rerun upstream with different files and
    the analysis part must not resume."""
    from cpb_worker.fingerprint import upstream_sha256
    illum = {"status": "succeeded", "run_id": "ill-1", "files": [{"key": "IllumDNA.npy", "size": 8, "sha256": "a1"}]}
    s3.put_object(Bucket=BUCKET, Key="res/illum/_cpb/run.json", Body=json.dumps(illum).encode())
    put_lease(s3, "res/illum", "ill-1")
    put_lease(s3, "res/after", "run-A")
    env = job(cellprofiler_env, tmp_path, "res/after", "run-A", CPB_AFTER="res/illum",
              CPB_CELLPROFILER=NO_CELLPROFILER)
    worker_aws.main_aws(env)  # fails (no CellProfiler) but records the fingerprint it would have had
    assert record_at(s3, "res/after")["fingerprint"]["upstream"] == upstream_sha256([illum])


@pytest.mark.cellprofiler
def test_local_rerun_into_the_same_folder_resumes_until_an_input_changes(plate, cellprofiler_env, tmp_path):
    out = tmp_path / "out"
    first = run_local(NUCLEI, plate.images_dir, out, data_file=plate.data_file, workers=1, env=cellprofiler_env)
    assert first.resumed_from is None and first.fingerprint["cellprofiler_version"] == first.cellprofiler_version
    again = run_local(NUCLEI, plate.images_dir, out, data_file=plate.data_file, workers=1,
                      env=dict(cellprofiler_env, CPB_CELLPROFILER=NO_CELLPROFILER))  # would fail if started
    assert again.resumed_from == f"local run of {first.started_at}" and again.files == first.files
    check_record_files(out, read_local(out))
    edited = tmp_path / "edited.cppipe"
    edited.write_text(NUCLEI.read_text().replace("Typical diameter of objects, in pixel units (Min,Max):6,40",
                                                 "Typical diameter of objects, in pixel units (Min,Max):6,41"))
    with pytest.raises(PipelineFailed, match="cannot start CellProfiler"):
        run_local(edited, plate.images_dir, out, data_file=plate.data_file, workers=1,
                  env=dict(cellprofiler_env, CPB_CELLPROFILER=NO_CELLPROFILER))
    assert read_local(out)["status"] == "failed"
    assert [r["ImageNumber"] for r in read_rows(out / "Image.csv")] == ["1", "2", "3", "4"]  # left, not vouched for


def put_record(s3, prefix, run_id, files, **extra):
    body = dict({"status": "succeeded", "run_id": run_id, "first": 1, "last": 1, "array_index": None,
                 "files": files}, **extra)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/_cpb/run.json", Body=json.dumps(body).encode())


@pytest.mark.cellprofiler
def test_a_job_whose_upstream_run_is_being_replaced_fails_instead_of_succeeding(s3, cellprofiler_env, tmp_path):
    """Adversary: an analysis `after` res/illum-r started (no dependsOn: illum had succeeded) just
    as a new illumination run took res/illum-r (a `cpb submit` of illum alone is accepted: its
    output's run had finished). The new run has no record yet, its files are being replaced under
    the analysis; the analysis ran anyway and was recorded `succeeded`, with only a warning
    nobody sees (`cpb status` shows none), on whatever illumination files it happened to read."""
    put_record(s3, "res/illum-r", "ill-1", [{"key": "IllumDNA.npy", "size": 8, "sha256": "a1"}])
    put_lease(s3, "res/illum-r", "ill-2")  # the new illumination run: submitted, nothing written yet
    put_lease(s3, "res/after-r", "run-A")
    env = job(cellprofiler_env, tmp_path, "res/after-r", "run-A", CPB_AFTER="res/illum-r")
    assert worker_aws.main_aws(env) == 2
    record = record_at(s3, "res/after-r")
    assert record["status"] == "failed"
    assert record["reason"] == ("the step this runs after, res/illum-r, has 0 of 1 succeeded record(s) of its "
                                "current run ill-2 (it is being rerun or did not finish): run this step again "
                                "once that run has succeeded")
    assert not [k for k in objects(s3, "res/after-r/") if k.endswith(".csv")]


@pytest.mark.cellprofiler
def test_a_job_whose_upstream_was_rerun_while_it_ran_fails(s3, cellprofiler_env, tmp_path, monkeypatch):
    """Adversary: the upstream run is replaced (and its new run finishes, with other files) while
    the analysis runs CellProfiler: what the analysis read is no longer the upstream's results,
    and its record must not vouch for them."""
    put_record(s3, "res/illum-m", "ill-1", [{"key": "IllumDNA.npy", "size": 8, "sha256": "a1"}])
    put_lease(s3, "res/illum-m", "ill-1")
    put_lease(s3, "res/after-m", "run-A")
    original = worker_aws.run_plan

    def rerun_upstream_meanwhile(*args, **kwargs):
        out = original(*args, **kwargs)
        put_lease(s3, "res/illum-m", "ill-2")
        put_record(s3, "res/illum-m", "ill-2", [{"key": "IllumDNA.npy", "size": 8, "sha256": "b2"}])
        return out

    monkeypatch.setattr(worker_aws, "run_plan", rerun_upstream_meanwhile)
    env = job(cellprofiler_env, tmp_path, "res/after-m", "run-A", CPB_AFTER="res/illum-m")
    assert worker_aws.main_aws(env) == 2
    record = record_at(s3, "res/after-m")
    assert record["status"] == "failed"
    assert record["reason"].startswith("the step this runs after, res/illum-m, was rerun while this job ran "
                                       "(its current run is now ill-2, this job read run ill-1)")


def test_an_array_child_refuses_a_data_file_edited_after_the_run_was_submitted(s3, plate, cellprofiler_env, tmp_path):
    """Adversary: child 0 ran on the data file the Lambda counted; the scientist then uploaded a
    corrected CSV (same number of rows, image sets 3-4 changed) under the same key. Child 1 reads
    the new rows and succeeds: one 'succeeded' run whose parts come from two versions of the data
    file (each part's fingerprint only covers its own rows, so nothing downstream can tell)."""
    rows = list(csv.reader(plate.data_file.open()))
    s3.upload_file(str(plate.data_file), BUCKET, "in/edited.csv")
    counted = s3.head_object(Bucket=BUCKET, Key="in/edited.csv")["ETag"]  # what the Lambda read (CPB_DATA_FILE_ETAG)
    put_lease(s3, "res/edited", "run-A", array_size=2, image_set_count=4)
    rows[3][-1], rows[4][-1] = "7", "8"  # Metadata_Site of image sets 3 and 4
    changed = tmp_path / "edited.csv"
    with open(changed, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    s3.upload_file(str(changed), BUCKET, "in/edited.csv")  # after the Lambda counted, before child 1 starts
    env = child(cellprofiler_env, tmp_path, "res/edited", "run-A", 1, CPB_DATA_FILE="in/edited.csv",
                CPB_DATA_FILE_ETAG=counted, CPB_CELLPROFILER=NO_CELLPROFILER)
    assert worker_aws.main_aws(env) == 2
    assert record_at(s3, "res/edited/part-00001")["reason"].startswith(
        "the data file changed after the message was accepted: resubmit")


@pytest.mark.cellprofiler
def test_on_fsx_the_data_file_is_checked_against_the_version_the_lambda_counted(s3, plate, cellprofiler_env,
                                                                                  tmp_path, capsys):
    """FSx mode: the FSx copy is used only while S3's object is still the version the Lambda counted
    (a HEAD); an edit in place fails the child with the same line, and the unedited file runs."""
    fsx = tmp_path / "fsx"
    for key in ("p/nuclei.cppipe", "in/load_data.csv", *(f"in/{image.name}" for image in plate.images)):
        (fsx / key).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(BUCKET, key, str(fsx / key))
    counted = s3.head_object(Bucket=BUCKET, Key="in/load_data.csv")["ETag"]
    put_lease(s3, "res/fsx-pin", "run-A", array_size=2, image_set_count=4)
    env = child(cellprofiler_env, tmp_path / "w1", "res/fsx-pin", "run-A", 0, CPB_FSX_ROOT=str(fsx),
                CPB_DATA_FILE_ETAG=counted)
    assert worker_aws.main_aws(env) == 0
    assert record_at(s3, "res/fsx-pin/part-00000")["status"] == "succeeded"
    stale = dict(env, CPB_DATA_FILE_ETAG='"0123456789abcdef0123456789abcdef"', CPB_CELLPROFILER=NO_CELLPROFILER,
                 AWS_BATCH_JOB_ARRAY_INDEX="1", CPB_WORK_DIR=str(tmp_path / "w2"))
    assert worker_aws.main_aws(stale) == 2
    assert record_at(s3, "res/fsx-pin/part-00001")["reason"].startswith(
        "the data file changed after the message was accepted: resubmit")
    # FSx has not caught up with S3 (its copy is not the object's size): the counted version is read from S3
    (fsx / "in/load_data.csv").write_text("Image_FileName_DNA\n")
    capsys.readouterr()
    lagging = dict(stale, CPB_DATA_FILE_ETAG=counted, CPB_WORK_DIR=str(tmp_path / "w3"))
    assert worker_aws.main_aws(lagging) != 0  # no CellProfiler here; what matters is which copy was read
    assert "the data file is not on FSx" in capsys.readouterr().err
    assert "data file changed" not in record_at(s3, "res/fsx-pin/part-00001")["reason"]
