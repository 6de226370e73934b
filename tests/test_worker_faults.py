"""Injected faults in the worker (issue 7): what happens, and that nothing is lost
or duplicated. S3 is moto in-process; CellProfiler is real, sometimes behind a
wrapper script that makes it misbehave the way production CellProfiler does."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import EndpointConnectionError
from moto import mock_aws

from cpb_worker import aws as worker_aws
from cpb_worker.errors import Killed, PipelineFailed
from cpb_worker.local import run_local
from cpb_worker.record import read_local

from test_worker_support import NUCLEI, check_record_files, read_rows

BUCKET = "cpb-fault-test"
pytestmark = pytest.mark.fault


class HostKilled(BaseException):
    """Stands in for SIGKILL: not an Exception, so no handler of the worker catches it."""


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    from cpb.demo.synthetic import make_plate
    return make_plate(tmp_path_factory.mktemp("plate"), wells=("D04",), sites=3, seed=8, size=128, nuclei=(3, 6))


@pytest.fixture
def bucket(plate, monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        for image in plate.images:
            s3.upload_file(str(image), BUCKET, f"in/{image.name}")
        s3.upload_file(str(plate.data_file), BUCKET, "in/load_data.csv")
        s3.upload_file(str(NUCLEI), BUCKET, "pipelines/nuclei.cppipe")
        yield s3


def job_env(cellprofiler_env, tmp_path, **extra):
    env = dict(cellprofiler_env, CPB_BUCKET=BUCKET, CPB_PIPELINE="pipelines/nuclei.cppipe", CPB_INPUT="in",
               CPB_OUTPUT="out", CPB_DATA_FILE="in/load_data.csv", CPB_VCPUS="2", CPB_WORK_DIR=str(tmp_path),
               CPB_S3_MAX_ATTEMPTS="2")
    env.pop("AWS_ENDPOINT_URL", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def inject(monkeypatch, on_put, operations=("PutObject",)):
    """Give every S3 client the worker makes a hook that sees each PutObject first.

    `on_put(count, url)` returns an HTTP status to answer with, None to let the
    request through, or raises (a connection error, or a kill). Registered first,
    so its answer wins; botocore still lets moto see a request that got an
    answer (as S3 may have stored an object whose response was lost), while a
    raised connection error stops the request before moto sees it."""
    lock = threading.Lock()
    calls = {"n": 0}
    original = worker_aws.make_client

    def hook(request, **kwargs):  # noqa: ANN001, ANN003
        with lock:
            calls["n"] += 1
            n = calls["n"]
        status = on_put(n, request.url)
        if status is None:
            return None
        code = "SlowDown" if status == 503 else "InternalError"
        body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                f"<Message>injected</Message></Error>").encode()
        return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _Raw(body))

    def patched(env):  # noqa: ANN001
        client = original(env)
        for operation in operations:
            client.meta.events.register_first(f"before-send.s3.{operation}", hook)
        return client

    monkeypatch.setattr(worker_aws, "make_client", patched)
    return calls


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **kwargs):  # noqa: ANN003
        yield self._body

    def read(self, *args):  # noqa: ANN002
        return self._body


def bucket_state(s3, prefix="out/"):
    objects = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in objects}


def assert_complete(s3, plate, prefix="out"):
    """Succeeded record, exactly its files present with its checksums, every image set once."""
    state = bucket_state(s3, prefix + "/")
    record = json.loads(state.pop(f"{prefix}/_cpb/run.json"))
    assert record["status"] == "succeeded"
    assert set(state) == {f"{prefix}/{f['key']}" for f in record["files"]}
    for entry in record["files"]:
        body = state[f"{prefix}/{entry['key']}"]
        assert (len(body), hashlib.sha256(body).hexdigest()) == (entry["size"], entry["sha256"])
    image = state[f"{prefix}/Image.csv"].decode().splitlines()
    numbers = [line.split(",")[image[0].split(",").index("ImageNumber")] for line in image[1:]]
    assert numbers == ["1", "2", "3"]
    return record


@pytest.mark.cellprofiler
def test_s3_slowdowns_and_5xx_during_upload_are_retried(bucket, plate, cellprofiler_env, tmp_path, monkeypatch):
    """The first 6 PutObjects get 503 SlowDown, 500 or a dropped connection: botocore
    retries once, the worker retries whole files; the job succeeds with every file intact."""
    def flaky(n, url):
        if n <= 6 and n % 3 == 0:
            raise EndpointConnectionError(endpoint_url=url)
        return (503 if n % 2 else 500) if n <= 6 else None

    calls = inject(monkeypatch, flaky)
    code = worker_aws.main_aws(job_env(cellprofiler_env, tmp_path))
    assert code == 0
    assert calls["n"] > 5
    record = assert_complete(bucket, plate)
    assert record["exit_codes"] == [0, 0]


@pytest.mark.cellprofiler
def test_s3_slowdowns_while_downloading_inputs_are_retried(bucket, plate, cellprofiler_env, tmp_path, monkeypatch):
    """Staging is retried like uploading: 503s and dropped connections on the first
    reads of the pipeline, data file and images do not fail the job."""
    def flaky(n, url):
        if n <= 8 and n % 2:
            raise EndpointConnectionError(endpoint_url=url)
        return 503 if n <= 8 else None

    calls = inject(monkeypatch, flaky, operations=("GetObject", "HeadObject"))
    assert worker_aws.main_aws(job_env(cellprofiler_env, tmp_path, CPB_VCPUS=1)) == 0
    assert calls["n"] > 8
    assert assert_complete(bucket, plate)["timings"]["stage"] > 0


@pytest.mark.cellprofiler
def test_s3_down_during_upload_exits_4_and_never_claims_success(bucket, plate, cellprofiler_env, tmp_path,
                                                                 monkeypatch, capsys):
    def down(n, url):
        raise EndpointConnectionError(endpoint_url=url)

    inject(monkeypatch, down)
    code = worker_aws.main_aws(job_env(cellprofiler_env, tmp_path, CPB_VCPUS=1))
    assert code == 4  # transient: the job definition retries exit code 4
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("cpb_worker: failed: ") and "S3 still failing after 4 attempts" in last
    assert bucket_state(bucket) == {}  # nothing half-written, no record at all


@pytest.mark.cellprofiler
def test_upload_reported_done_but_missing_is_caught_before_the_record(bucket, plate, cellprofiler_env, tmp_path,
                                                                     monkeypatch, capsys):
    """s3transfer swallows a BaseException raised in its threads and reports the upload
    done. The worker lists the prefix before writing the record, so the lost Image.csv
    is re-uploaded once and then reported as transient (exit 4), never as success."""
    def lose_image_csv(n, url):
        if url.endswith("/out/Image.csv"):
            raise HostKilled()
        return None

    inject(monkeypatch, lose_image_csv)
    assert worker_aws.main_aws(job_env(cellprofiler_env, tmp_path, CPB_VCPUS=1)) == 4
    assert "not in s3://cpb-fault-test/out/ at the right size (first: out/Image.csv)" in capsys.readouterr().err
    record = json.loads(bucket_state(bucket)["out/_cpb/run.json"])
    assert record["status"] == "failed"


@pytest.mark.cellprofiler
def test_worker_killed_mid_upload_then_retried_leaves_one_consistent_result(bucket, plate, cellprofiler_env,
                                                                            tmp_path, monkeypatch):
    """Attempt 1 (2 processes) dies while uploading; attempt 2 runs with 1 process, so
    attempt 1's per-range logs are files attempt 2 does not make: they must go, and
    Image.csv must hold each image set once."""
    original = worker_aws.S3IO.upload_many

    def die_before_image_csv(self, pairs):
        """The process dies with every file but Image.csv uploaded."""
        pairs = list(pairs)
        original(self, [p for p in pairs if not p[1].endswith("/Image.csv")])
        raise HostKilled()

    monkeypatch.setattr(worker_aws.S3IO, "upload_many", die_before_image_csv)
    with pytest.raises(HostKilled):
        worker_aws.main_aws(job_env(cellprofiler_env, tmp_path / "a1"))
    after_kill = bucket_state(bucket)
    assert "out/_cpb/run.json" not in after_kill and "out/_cpb/pending.json" in after_kill
    stale_logs = {k for k in after_kill if k.startswith("out/_cpb/logs/")}
    assert len(stale_logs) == 2 and "out/Image.csv" not in after_kill
    monkeypatch.setattr(worker_aws.S3IO, "upload_many", original)  # the retry runs on a healthy host
    code = worker_aws.main_aws(job_env(cellprofiler_env, tmp_path / "a2", CPB_VCPUS=1, AWS_BATCH_JOB_ATTEMPT=2))
    assert code == 0
    record = assert_complete(bucket, plate)
    assert record["processes"] == 1 and record["attempt"] == 2
    final = bucket_state(bucket)
    assert "out/_cpb/pending.json" not in final
    assert not stale_logs & set(final)
    assert "out/_cpb/logs/cellprofiler-000001-000003.log" in final


def _wrapper(tmp_path: Path, body: str) -> str:
    """A `cellprofiler` that runs the real one ($REAL_CELLPROFILER) and then misbehaves."""
    path = tmp_path / "cellprofiler-wrapper.sh"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.cellprofiler
def test_cellprofiler_exit_1_after_writing_every_output_is_verified_success(plate, cellprofiler_env, tmp_path):
    env = dict(cellprofiler_env, REAL_CELLPROFILER=cellprofiler_env["CPB_CELLPROFILER"],
               CPB_CELLPROFILER=_wrapper(tmp_path, '"$REAL_CELLPROFILER" "$@"; exit 1'))
    record = run_local(NUCLEI, plate.images_dir, tmp_path / "out", data_file=plate.data_file, workers=2, env=env)
    assert record.status == "succeeded" and record.exit_codes == [1, 1]
    assert "outputs verified" in record.warnings[0]
    assert [r["ImageNumber"] for r in read_rows(tmp_path / "out" / "Image.csv")] == ["1", "2", "3"]
    check_record_files(tmp_path / "out", read_local(tmp_path / "out"))


@pytest.mark.cellprofiler
def test_cellprofiler_exit_1_with_a_range_missing_is_a_failure(plate, cellprofiler_env, tmp_path):
    """Exit 1 and one range wrote nothing: the worker names the missing image sets."""
    body = ('case "$*" in *"-f 1 "*) "$REAL_CELLPROFILER" "$@";; '
            '*) echo "RuntimeError: injected crash" >&2; exit 1;; esac')
    env = dict(cellprofiler_env, REAL_CELLPROFILER=cellprofiler_env["CPB_CELLPROFILER"],
               CPB_CELLPROFILER=_wrapper(tmp_path, body))
    with pytest.raises(PipelineFailed) as info:
        run_local(NUCLEI, plate.images_dir, tmp_path / "out", data_file=plate.data_file, workers=2, env=env)
    assert info.value.exit_code == 3
    assert "image sets 3 of 1-3 are missing from Image.csv; CellProfiler exited 1: RuntimeError: injected crash" \
        in info.value.reason
    assert read_local(tmp_path / "out")["status"] == "failed"


def test_oom_kill_of_cellprofiler_exits_137_with_a_failed_record(bucket, plate, cellprofiler_env, tmp_path, capsys):
    """The OOM killer SIGKILLs the biggest process: CellProfiler. The worker exits 137
    (the job definition retries that once) and records why; nothing claims success."""
    env = job_env(cellprofiler_env, tmp_path, CPB_CELLPROFILER=_wrapper(tmp_path, "kill -9 $$"))
    assert worker_aws.main_aws(env) == 137
    assert "killed (SIGKILL, usually out of memory): raise job_memory" in capsys.readouterr().err
    state = bucket_state(bucket)
    record = json.loads(state["out/_cpb/run.json"])
    assert record["status"] == "failed" and record["exit_codes"] == [137, 137] and "job_memory" in record["reason"]
    assert set(state) == {"out/_cpb/run.json"}  # no partial results uploaded
    with pytest.raises(Killed):
        run_local(NUCLEI, plate.images_dir, tmp_path / "local", data_file=plate.data_file, workers=1,
                  env=dict(env, CPB_VCPUS="1"))


@pytest.mark.cellprofiler
def test_sigterm_mid_run_stops_cellprofiler_and_a_rerun_is_clean(plate, cellprofiler_env, tmp_path):
    """Batch stops jobs with SIGTERM: no CellProfiler may outlive the worker, and a
    rerun into the same folder holds each image set once."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "cpb_worker", "local", "--pipeline", str(NUCLEI), "--input",
            str(plate.images_dir), "--output", str(out), "--data-file", str(plate.data_file), "--workers", "2"]
    proc = subprocess.Popen(argv, env=cellprofiler_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_cellprofilers(out)) < 2:
        time.sleep(0.2)
    assert len(_cellprofilers(out)) == 2, "CellProfiler processes never started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.5)
    assert _cellprofilers(out) == []
    assert not (out / "_cpb" / "run.json").exists()
    record = run_local(NUCLEI, plate.images_dir, out, data_file=plate.data_file, workers=2, env=cellprofiler_env)
    assert record.status == "succeeded" and record.warnings == []  # nothing of the killed attempt left over
    assert [r["ImageNumber"] for r in read_rows(out / "Image.csv")] == ["1", "2", "3"]
    counts = [float(r["Count_Nuclei"]) for r in read_rows(out / "Image.csv")]
    assert len(read_rows(out / "Nuclei.csv")) == sum(counts)  # no object rows from the killed attempt
    check_record_files(out, read_local(out))


def _cellprofilers(out: Path):
    """PIDs of CellProfiler processes writing under `out`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "cellprofiler" in cmdline and str(out) in cmdline and "cpb_worker" not in cmdline:
            pids.append(int(entry.name))
    return pids
