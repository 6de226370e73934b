"""`cpb` against moto (S3, SQS, Batch in-process): submit, status, results, requeue, help.

Every AWS call goes through moto's `mock_aws`; Batch runs in its no-Docker
mode. The schema and S3 checks are the Lambda's own modules, so "local
validation rejects what the Lambda would reject, with the same message" is
checked by comparing against `handlers.schema.parse_body` directly.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner
from moto import mock_aws

from cpb.cli import cli
from cpb.local.batch import MotoJobStates
from cpb.stack import StackError, discover
from handlers.schema import Limits, MessageError, parse_body

REGION = "us-east-1"
BUCKET = "cpb-test-data"
# A pipeline the worker accepts: `cpb submit --upload` checks a local pipeline with the worker's rules.
PIPELINE_TEXT = (Path(__file__).resolve().parent.parent / "cpb" / "pipelines" / "nuclei.cppipe").read_text()


@pytest.fixture
def aws(monkeypatch, tmp_path):
    """moto with a bucket, a job queue + DLQ and a Batch queue/definition; CPB_* set."""
    for key in list(os.environ):
        if key.startswith("CPB_") or key in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("PATH", str(tmp_path / "no-pulumi"))  # no Pulumi CLI: flags/env only
    monkeypatch.setenv("CPB_HOME", str(tmp_path / "cpb-home"))  # submit receipts
    with mock_aws(config={"batch": {"use_docker": False}}):
        s3 = boto3.client("s3", region_name=REGION)
        sqs = boto3.client("sqs", region_name=REGION)
        batch = boto3.client("batch", region_name=REGION)
        iam = boto3.client("iam", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET)
        dlq = sqs.create_queue(QueueName="cpb-test-dlq")["QueueUrl"]
        queue = sqs.create_queue(QueueName="cpb-test-jobs")["QueueUrl"]
        role = iam.create_role(RoleName="svc", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        env = batch.create_compute_environment(computeEnvironmentName="cpb-ce", type="UNMANAGED",
                                               state="ENABLED", serviceRole=role)
        job_queue = batch.create_job_queue(jobQueueName="cpb-q", state="ENABLED", priority=1,
                                           computeEnvironmentOrder=[{"order": 1, "computeEnvironment":
                                                                     env["computeEnvironmentArn"]}])["jobQueueArn"]
        definition = batch.register_job_definition(
            jobDefinitionName="cpb-worker", type="container",
            containerProperties={"image": "cp", "resourceRequirements": [
                {"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "2048"}]})["jobDefinitionArn"]
        monkeypatch.setenv("CPB_BUCKET", BUCKET)
        monkeypatch.setenv("CPB_QUEUE_URL", queue)
        monkeypatch.setenv("CPB_DLQ_URL", dlq)
        monkeypatch.setenv("CPB_JOB_QUEUE", job_queue)
        monkeypatch.setenv("CPB_REGION", REGION)
        yield {"s3": s3, "sqs": sqs, "batch": batch, "queue": queue, "dlq": dlq, "job_queue": job_queue,
               "definition": definition}


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def queued(aws) -> list[str]:
    """Bodies of every message in the job queue (removed)."""
    bodies = []
    while True:
        got = aws["sqs"].receive_message(QueueUrl=aws["queue"], MaxNumberOfMessages=10, VisibilityTimeout=60)
        if not got.get("Messages"):
            return bodies
        bodies.extend(m["Body"] for m in got["Messages"])


def lambda_parse(body: str):
    """The Lambda's parse of a sent body. The run fields (docs/CONTRACTS.md: client_token, after, resume)
    are left out only while this checkout's schema does not know them yet."""
    from handlers import schema
    unknown = [f for f in ("client_token", "after", "resume") if f not in schema.FIELDS]
    value = json.loads(body)
    items = [{k: v for k, v in item.items() if k not in unknown} for item in (value if isinstance(value, list) else [value])]
    return parse_body(json.dumps(items if isinstance(value, list) else items[0]), Limits(bucket=BUCKET))


def put(aws, key: str, body: bytes | str) -> None:
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=body.encode() if isinstance(body, str) else body)


def seed_inputs(aws, prefix: str = "plates/p1") -> None:
    put(aws, "pipelines/nuclei.cppipe", PIPELINE_TEXT)
    put(aws, f"{prefix}/images/a.tif", b"II*\x00fake")
    put(aws, f"{prefix}/load_data.csv", "Image_FileName_DNA\na.tif\nb.tif\nc.tif\n")


# ------------------------------------------------------------------------- help

DOCUMENTED = {
    "submit": ["--pipeline", "--input", "--output", "--data-file", "--image-sets-per-job", "--memory", "--vcpus",
               "--job-name", "--after", "--no-resume", "--message-file", "--upload", "--dry-run", "--stack", "--bucket",
               "--queue-url"],
    "status": ["--watch", "--interval", "--timeout", "--parts", "--logs", "--no-dlq", "--stack", "--dlq-url"],
    "results": ["--to", "--parts", "--run", "--stack", "--bucket"],
    "loaddata": ["--pattern", "--channel", "--plate", "--illum", "--pipeline", "--out"],
    "plate": ["--illum-pipeline", "--analysis-pipeline", "--pattern", "--channel", "--plate", "--root",
              "--image-sets-per-job", "--memory", "--vcpus", "--no-resume", "--dry-run", "--stack"],
    "requeue": ["--dlq", "--force", "--dry-run", "--stack"],
    "run": ["--local", "--pipeline", "--input", "--output", "--workers", "--data-file"],
    "demo": ["--out", "--wells", "--sites", "--sets-per-job", "--parallel", "--job-vcpus", "--tolerance"],
}


@pytest.mark.parametrize("command", sorted(DOCUMENTED))
def test_help_lists_documented_options(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    missing = [o for o in DOCUMENTED[command] if o not in result.output]
    assert not missing, f"`cpb {command} --help` lacks {missing}"


def test_help_documents_options_in_cli_guide():
    guide = (Path(__file__).resolve().parent.parent / "docs" / "CLI.md").read_text()
    for command, options in DOCUMENTED.items():
        assert f"cpb {command}" in guide
        for option in options:
            assert option in guide, f"docs/CLI.md does not mention {command} {option}"


@pytest.mark.parametrize("words", [("estimate",), ("local", "up")])
def test_the_guide_has_a_section_naming_every_option_of(words):
    """New-user review: the README sends readers to docs/CLI.md for `cpb estimate`, which had no
    section there, and neither had `cpb local up`."""
    guide = (Path(__file__).resolve().parent.parent / "docs" / "CLI.md").read_text()
    heading = f"## cpb {' '.join(words)}\n"
    assert heading in guide
    section = guide.split(heading, 1)[1].split("\n## ", 1)[0]
    command = cli
    for word in words:
        command = command.commands[word]
    options = [o for param in command.params for o in param.opts if o.startswith("--") and o != "--help"]
    missing = [o for o in options if o not in section]
    assert not missing, f"docs/CLI.md's cpb {' '.join(words)} section lacks {missing}"


# ------------------------------------------------------------------------- stack discovery

def test_stack_from_env_names_its_source(monkeypatch):
    stack = discover(None, {}, env={"CPB_BUCKET": "b-1", "CPB_QUEUE_URL": "https://sqs.eu-west-1.amazonaws.com/1/q"},
                     use_pulumi=False)
    assert (stack.bucket, stack.region) == ("b-1", "eu-west-1")
    assert "$CPB_BUCKET" in stack.describe_sources()


def test_flags_override_env_and_missing_values_say_what_to_do():
    stack = discover(None, {"bucket": "from-flag"}, env={"CPB_BUCKET": "from-env"}, use_pulumi=False)
    assert stack.bucket == "from-flag" and stack.sources["bucket"] == "--bucket"
    with pytest.raises(StackError, match="pulumi stack select dev.*CPB_BUCKET"):
        discover(None, {}, env={}, use_pulumi=False).require("bucket")


def test_stack_outputs_come_from_pulumi_cli(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "pulumi"
    fake.parent.mkdir()
    outputs = {"bucketName": "pulumi-bucket", "queueUrl": "https://sqs.us-west-2.amazonaws.com/1/q",
               "deadLetterQueueUrl": "https://sqs.us-west-2.amazonaws.com/1/dlq", "jobQueueArn": "arn:q"}
    fake.write_text("#!/bin/sh\n[ \"$4\" = \"--stack\" ] && [ \"$5\" = \"prod\" ] || exit 3\n"
                    f"echo '{json.dumps(outputs)}'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(fake.parent))
    stack = discover("prod", {}, env={})
    assert (stack.bucket, stack.dlq_url, stack.region) == ("pulumi-bucket", outputs["deadLetterQueueUrl"], "us-west-2")
    assert stack.describe_sources() .startswith("stack settings from pulumi stack prod")
    with pytest.raises(StackError, match="--stack dev.*failed"):
        discover("dev", {}, env={})


def test_missing_stack_is_one_line_without_traceback(aws, monkeypatch):
    monkeypatch.delenv("CPB_BUCKET")
    result = CliRunner().invoke(cli, ["status", "x"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("cpb: ")]
    assert len(errors) == 1 and "CPB_BUCKET" in errors[0]


# ------------------------------------------------------------------------- submit

def test_submit_from_flags_sends_what_the_lambda_parses(aws):
    seed_inputs(aws)
    result = invoke("submit", "--pipeline", "pipelines/nuclei.cppipe", "--input", "plates/p1/images",
                    "--output", "results/p1", "--data-file", "plates/p1/load_data.csv",
                    "--image-sets-per-job", "2", "--memory", "4096", "--vcpus", "2", "--job-name", "plate one")
    assert result.exit_code == 0, result.output
    assert "3 image sets" in result.output and f"s3://{BUCKET}/results/p1/" in result.output
    bodies = queued(aws)
    assert len(bodies) == 1
    request = lambda_parse(bodies[0])[0]
    assert (request.output, request.image_sets_per_job, request.job_memory, request.job_vcpu, request.job_name) == \
        ("results/p1", 2, 4096, 2, "plate one")
    sent_id = result.output.split("sent ", 1)[1].split()[0]
    assert len(sent_id) > 10


def test_submit_follow_up_carries_the_stack_flags_it_was_given(aws):
    """New-user review: `cpb submit --stack local ...` printed `follow with: cpb status ...` without
    --stack, which pasted as is found no bucket. The follow-up reaches the stack the submit did."""
    seed_inputs(aws)
    result = invoke("submit", "--bucket", BUCKET, "--region", REGION, "--pipeline", "pipelines/nuclei.cppipe",
                    "--input", "plates/p1/images", "--output", "results/p1")
    assert result.exit_code == 0, result.output
    assert (f"follow with: cpb status --bucket {BUCKET} --region {REGION}   (or: cpb status --bucket {BUCKET} "
            f"--region {REGION} results/p1)") in result.output


def test_a_local_stacks_commands_to_paste_name_it(tmp_path, monkeypatch):
    from cpb.local.state import TEST_CREDENTIALS, write_local_stack
    for key in ("AWS_ENDPOINT_URL", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", *TEST_CREDENTIALS):
        monkeypatch.setenv(key, "restored after the test")  # _local_stack points this process at the stack
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr("cpb.local.state.endpoint_answers", lambda endpoint, timeout=2.0: True)
    env = {"CPB_HOME": str(tmp_path)}
    write_local_stack({"endpoint": "http://127.0.0.1:1", "region": "us-east-1",
                       "outputs": {"bucketName": "cpb-local", "queueUrl": "http://127.0.0.1:1/q"}}, env)
    stack = discover("local", {"bucket": None, "region": None}, env=env)
    assert stack.command("status", "plates/CP1/illum", "plates/CP1/analysis") == \
        "cpb status --stack local plates/CP1/illum plates/CP1/analysis"
    assert discover("local", {"region": "us-west-2"}, env=env).command("status") == \
        "cpb status --stack local --region us-west-2"


def test_no_bucket_known_names_the_stack_option_first_and_where_the_region_came_from():
    """New-user review: a follow-up pasted without --stack said `stack settings from queue URL /
    AWS_REGION` (no queue URL was given) and then `select a deployed stack (install the Pulumi CLI...`."""
    stack = discover(None, {}, env={"AWS_REGION": "eu-west-1"}, use_pulumi=False)
    assert stack.describe_sources() == "stack settings from $AWS_REGION"
    with pytest.raises(StackError) as error:
        stack.require("bucket")
    assert "known: pass --stack <name>: --stack local for the stack `cpb local up` runs, or a deployed" \
        in str(error.value)


@pytest.mark.parametrize("schema_takes_token", [True, False])
def test_submit_sends_a_client_token_only_to_a_schema_that_takes_one(aws, monkeypatch, schema_takes_token):
    """An automatic token must never turn a valid message into a refused one: cpb adds it when the
    Lambda's schema (handlers.schema.FIELDS, what the deployed Lambda runs) takes client_token."""
    from handlers import schema
    fields = tuple(f for f in schema.FIELDS if f != "client_token") + (("client_token",) if schema_takes_token else ())
    monkeypatch.setattr(schema, "FIELDS", fields)
    seed_inputs(aws)
    result = invoke("submit", "--pipeline", "pipelines/nuclei.cppipe", "--input", "plates/p1/images", "--output",
                    "results/tok")
    assert result.exit_code == 0, result.output
    body = json.loads(queued(aws)[0])
    message_id = result.output.split("sent ", 1)[1].split()[0]
    if schema_takes_token:
        token = body["client_token"]
        assert len(token) == 32 and token != message_id
        identity = token
    else:
        assert "client_token" not in body
        identity = message_id  # the Lambda's identity for a message without a token
    run_id = hashlib.sha256(f"{identity}:0".encode()).hexdigest()[:20]
    assert f"(run {run_id[:8]})" in result.output


SEED_MESSAGES = {
    # The seed's own format: numeric strings for memory/vCPU, one object.
    "seed_object.json": {"pipeline": "pipelines/nuclei.cppipe", "input": "plates/p1/images",
                         "output": "results/seed", "job_memory": "8192", "job_vcpu": "12"},
    # A list of jobs, as the seed also accepted.
    "seed_list.json": [{"pipeline": "pipelines/nuclei.cppipe", "input": "plates/p1/images", "output": f"results/s{i}"}
                       for i in range(12)],
    # The extensions: array job over a LoadData CSV.
    "seed_array.json": {"pipeline": "pipelines/nuclei.cppipe", "input": "plates/p1/images", "output": "results/arr",
                        "data_file": "plates/p1/load_data.csv", "image_sets_per_job": 1, "job_name": "arr"},
}


@pytest.mark.parametrize("name", sorted(SEED_MESSAGES))
def test_submit_from_seed_message_files(aws, tmp_path, name):
    seed_inputs(aws)
    path = tmp_path / name
    path.write_text(json.dumps(SEED_MESSAGES[name]))
    result = invoke("submit", "--message-file", str(path))
    assert result.exit_code == 0, result.output
    expected = SEED_MESSAGES[name] if isinstance(SEED_MESSAGES[name], list) else [SEED_MESSAGES[name]]
    bodies = queued(aws)
    assert sorted(json.loads(b)["output"] for b in bodies) == sorted(m["output"] for m in expected)
    assert result.output.count("sent ") == len(expected)  # 12 jobs went out in two SQS batches


BAD_MESSAGES = [
    pytest.param('{"pipeline": "p.cppipe", "input": "in"}', id="missing-output"),
    pytest.param('{"pipeline": "p.cppipe", "input": "in", "output": "out", "job_memory": "lots"}', id="memory-text"),
    pytest.param('{"pipeline": "p.cppipe", "input": "in", "output": "out", "job_vcpu": 999}', id="vcpu-huge"),
    pytest.param('{"pipeline": "../etc/passwd.cppipe", "input": "in", "output": "out"}', id="traversal"),
    pytest.param('{"pipeline": "s3://other-bucket/p.cppipe", "input": "in", "output": "out"}', id="other-bucket"),
    pytest.param('{"pipeline": "p.cppipe", "input": "in", "output": "out", '
                 '"job_queue": "arn:aws:batch:us-east-1:999999999999:job-queue/theirs"}', id="foreign-arn"),
    pytest.param('{"pipeline": "p.cppipe", "input": "in", "output": "out\\u0000x"}', id="control-char"),
    pytest.param('{"pipeline": "p.cppipe", "input": "in", "output": "in/out"}', id="output-inside-input"),
    pytest.param('[{"pipeline": "p.cppipe", "input": "in", "output": "o"}, '
                 '{"pipeline": "p.cppipe", "input": "in", "output": "o"}]', id="duplicate-entries"),
    pytest.param('{"pipeline": "p.cppipe", "input": "in", "output": "out"', id="malformed-json"),
    pytest.param('{"pipline": "p.cppipe", "input": "in", "output": "out"}', id="typo-field"),
    pytest.param("[" + ",".join(['{"pipeline": "p.cppipe", "input": "in", "output": "o%d"}' % i
                                 for i in range(2000)]) + "]", id="thousands-of-jobs"),
    pytest.param('{"pipeline": "p.cppipe", "input": "in", "output": "' + "x" * 300_000 + '"}', id="over-256KB"),
]


@pytest.mark.parametrize("body", BAD_MESSAGES)  # parity check; the hostile figure counts tests/test_cli_hostile.py
def test_submit_rejects_what_the_lambda_rejects_with_its_message(aws, tmp_path, body):
    with pytest.raises(MessageError) as lambda_error:
        parse_body(body, Limits.from_env({"CPB_BUCKET": BUCKET, "CPB_JOB_QUEUE": aws["job_queue"]}))
    path = tmp_path / "bad.json"
    path.write_text(body)
    result = CliRunner().invoke(cli, ["submit", "--message-file", str(path)])
    assert result.exit_code == 1
    assert str(lambda_error.value) in result.output
    assert "Traceback" not in result.output
    assert queued(aws) == []


@pytest.mark.hostile
def test_submit_refuses_missing_pipeline_and_empty_input(aws):
    seed_inputs(aws)
    result = CliRunner().invoke(cli, ["submit", "--pipeline", "pipelines/absent.cppipe", "--input",
                                      "plates/p1/images", "--output", "results/x"])
    assert result.exit_code == 1 and "pipeline" in result.output and "does not exist" in result.output
    result = CliRunner().invoke(cli, ["submit", "--pipeline", "pipelines/nuclei.cppipe", "--input",
                                      "plates/none", "--output", "results/x"])
    assert result.exit_code == 1 and "input: nothing under" in result.output
    assert queued(aws) == []


def test_upload_skips_unchanged_files_and_sends_changed(aws, tmp_path):
    images = tmp_path / "plate"
    (images / "w1").mkdir(parents=True)
    for name in ("a.tif", "b.tif", "w1/c.tif"):
        (images / name).write_bytes(os.urandom(2048))
    (images / ".DS_Store").write_bytes(b"junk")
    pipeline = tmp_path / "nuclei.cppipe"
    pipeline.write_text(PIPELINE_TEXT)
    args = ["submit", "--upload", str(images), "--pipeline", str(pipeline), "--input", "plates/up",
            "--output", "results/up"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert "uploaded 4 file(s)" in first.output and "0 unchanged" in first.output
    assert ".DS_Store" in first.output  # ignored, but said so
    head = aws["s3"].head_object(Bucket=BUCKET, Key="plates/up/w1/c.tif", ChecksumMode="ENABLED")
    assert head["Metadata"]["sha256"] == hashlib.sha256((images / "w1/c.tif").read_bytes()).hexdigest()
    (images / "b.tif").write_bytes(os.urandom(2048))  # same size, new content
    second = invoke(*args)
    assert second.exit_code == 0, second.output
    assert "uploaded 1 file(s)" in second.output and "3 unchanged file(s) skipped" in second.output
    body = json.loads(queued(aws)[-1])
    assert body["pipeline"].startswith("pipelines/") and body["pipeline"].endswith("/nuclei.cppipe")


def test_bad_message_with_upload_is_refused_before_anything_is_uploaded(aws, tmp_path):
    images = tmp_path / "plate"
    images.mkdir()
    (images / "a.tif").write_bytes(os.urandom(1024))
    pipeline = tmp_path / "nuclei.cppipe"
    pipeline.write_text(PIPELINE_TEXT)
    result = invoke("submit", "--upload", str(images), "--pipeline", str(pipeline), "--input", "plates/up",
                    "--output", "../results", "--memory", "8192")
    assert result.exit_code == 1
    assert "output" in result.output and "'..'" in result.output
    assert aws["s3"].list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0
    assert queued(aws) == []


# ------------------------------------------------------------------------- status, results, requeue

def array_submission(aws, output: str, size: int) -> str:
    job = aws["batch"].submit_job(jobName="plate", jobQueue=aws["job_queue"], jobDefinition=aws["definition"],
                                  arrayProperties={"size": size}, containerOverrides={"environment": [
                                      {"name": "CPB_OUTPUT", "value": output},
                                      {"name": "CPB_IMAGE_SETS_PER_JOB", "value": "2"}]})
    put(aws, f"{output}/_cpb/submission-m1.json", json.dumps(
        {"status": "submitted", "message_id": "m1", "job_id": job["jobId"], "job_name": "plate", "array_size": size}))
    return job["jobId"]


def part_record(aws, output: str, index: int, status: str, rows: list[tuple[int, int]] | None = None) -> None:
    prefix = f"{output}/part-{index:05d}"
    files = []
    if rows is not None:
        text = "ImageNumber,Count_Nuclei\n" + "".join(f"{n},{c}\n" for n, c in rows)
        put(aws, f"{prefix}/Image.csv", text)
        files.append({"key": "Image.csv", "size": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()})
    first, last = index * 2 + 1, index * 2 + 2
    record = {"status": status, "first": first, "last": last, "image_set_count": 2, "array_index": index,
              "files": files}
    if status != "succeeded":
        record["reason"] = "CellProfiler exited 1: IdentifyPrimaryObjects failed"
    put(aws, f"{prefix}/_cpb/run.json", json.dumps(record))


def test_status_reports_states_children_and_dlq_reasons(aws):
    job_id = array_submission(aws, "results/s", 3)
    MotoJobStates(REGION).set(f"{job_id}:1", "FAILED", "Essential container in task exited (exit code 3)", 3)
    part_record(aws, "results/s", 0, "succeeded", [(1, 10), (2, 11)])
    part_record(aws, "results/s", 1, "failed")
    part_record(aws, "results/s", 2, "succeeded", [(5, 12), (6, 13)])
    aws["sqs"].send_message(QueueUrl=aws["dlq"], MessageBody='{"pipeline": "p.cppipe", "input": "in"}')
    result = CliRunner().invoke(cli, ["status", "results/s"])
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "2/3 children succeeded, 1 failed" in result.output
    assert "child 1 failed: Essential container in task exited (exit code 3)" in result.output
    assert f"log stream cpb-worker/default/{job_id}:1" in result.output
    assert "IdentifyPrimaryObjects failed" in result.output  # the run record's reason
    assert "dead-letter queue: 1 message(s)" in result.output
    assert "output: is missing" in result.output  # why the dead letter failed, from the schema


def test_status_succeeded_only_when_every_record_says_so(aws):
    job_id = array_submission(aws, "results/ok", 2)
    part_record(aws, "results/ok", 0, "succeeded", [(1, 10), (2, 11)])
    result = CliRunner().invoke(cli, ["status", "results/ok", "--no-dlq"])
    assert result.exit_code == 1 and "child 1 failed: no run record" in result.output  # Batch "SUCCEEDED" is not enough
    part_record(aws, "results/ok", 1, "succeeded", [(3, 12), (4, 13)])
    result = CliRunner().invoke(cli, ["status", "results/ok", "--no-dlq"])
    assert result.exit_code == 0, result.output
    assert "SUCCEEDED" in result.output and job_id in result.output


def test_status_running_exits_3_and_watch_stops_at_the_end(aws):
    job_id = array_submission(aws, "results/run", 2)
    states = MotoJobStates(REGION)
    states.set(f"{job_id}:0", "RUNNING")
    result = CliRunner().invoke(cli, ["status", "results/run", "--no-dlq"])
    assert result.exit_code == 3 and "RUNNING" in result.output
    result = CliRunner().invoke(cli, ["status", "results/run", "--no-dlq", "--watch", "--interval", "0.01",
                                      "--timeout", "2"])
    assert result.exit_code == 3 and result.output.count("results/run/: RUNNING") >= 2


def test_results_refuse_incomplete_runs_then_merge_parts(aws, tmp_path):
    array_submission(aws, "results/r", 3)
    part_record(aws, "results/r", 0, "succeeded", [(1, 10), (2, 11)])
    part_record(aws, "results/r", 2, "succeeded", [(5, 14), (6, 15)])
    dest = tmp_path / "out"
    result = CliRunner().invoke(cli, ["results", "results/r", "--to", str(dest)])
    assert result.exit_code == 1 and "not complete" in result.output and "part-00001: missing" in result.output
    assert not (dest / "Image.csv").exists()
    part_record(aws, "results/r", 1, "failed")
    result = CliRunner().invoke(cli, ["results", "results/r", "--to", str(dest)])
    assert result.exit_code == 1 and "part-00001: failed" in result.output
    part_record(aws, "results/r", 1, "succeeded", [(1, 12), (2, 13)])  # numbered from 1: shifted to 3, 4
    result = CliRunner().invoke(cli, ["results", "results/r", "--to", str(dest)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(dest / "Image.csv")))
    assert [(int(r["ImageNumber"]), int(r["Count_Nuclei"])) for r in rows] == \
        [(1, 10), (2, 11), (3, 12), (4, 13), (5, 14), (6, 15)]
    assert "merged from 3 array parts" in result.output and "warning" not in result.output
    # files the folder's records do not list (added by hand, or from before runs.json named its output): say so
    (dest / "A01_s1_outlines.png").write_bytes(b"png of results/r")
    result = CliRunner().invoke(cli, ["results", "results/r", "--to", str(dest)])
    assert result.exit_code == 0, result.output
    assert (f"warning: 1 file(s) in {dest} are not from results/r (e.g. A01_s1_outlines.png); "
            "keep each output's results in its own --to folder") in result.output


def test_results_refuse_a_folder_holding_another_outputs_results_before_writing(aws, tmp_path):
    """New-user review: `cpb results plates/CP1/illum --to ./CP1` into the folder holding
    plates/CP1/analysis replaced its Image.csv, Experiment.csv and _cpb/runs.json, and only warned
    afterwards; `cpb report`/`cpb profile` then read a mix of the two outputs."""
    part_record(aws, "plates/CP1/analysis", 0, "succeeded", [(1, 10), (2, 11)])
    part_record(aws, "plates/CP1/illum", 0, "succeeded", [(1, 99)])
    dest = tmp_path / "CP1"
    first = CliRunner().invoke(cli, ["results", "plates/CP1/analysis/part-00000", "--to", str(dest)])
    assert first.exit_code == 0, first.output
    (dest / "single_cell.parquet").write_bytes(b"cells of the analysis")
    before = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    refused = CliRunner().invoke(cli, ["results", "plates/CP1/illum/part-00000", "--to", str(dest)])
    assert refused.exit_code == 1
    assert (f"cpb: {dest} holds the results of plates/CP1/analysis/part-00000 (by its _cpb/runs.json), not "
            "plates/CP1/illum/part-00000") in refused.output
    assert f"--to {tmp_path / 'CP1-part-00000'}" in refused.output and f"remove {dest} first" in refused.output
    after = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert after == before
    # the same output into its own folder keeps working, and the other one into another folder
    again = CliRunner().invoke(cli, ["results", "plates/CP1/analysis/part-00000", "--to", str(dest)])
    assert again.exit_code == 0 and "warning" not in again.output, again.output
    other = CliRunner().invoke(cli, ["results", "plates/CP1/illum/part-00000", "--to", str(tmp_path / "CP1-illum")])
    assert other.exit_code == 0, other.output


def test_results_refuse_files_that_differ_from_their_record(aws, tmp_path):
    array_submission(aws, "results/t", 2)
    part_record(aws, "results/t", 0, "succeeded", [(1, 10), (2, 11)])
    part_record(aws, "results/t", 1, "succeeded", [(3, 12), (4, 13)])
    put(aws, "results/t/part-00001/Image.csv", "ImageNumber,Count_Nuclei\n3,99\n4,13\n")  # same size, other bytes
    result = CliRunner().invoke(cli, ["results", "results/t", "--to", str(tmp_path / "o")])
    assert result.exit_code == 1 and "checksum differs" in result.output


def test_requeue_resubmits_only_failed_children_and_status_follows(aws):
    job_id = array_submission(aws, "results/q", 3)
    MotoJobStates(REGION).set(f"{job_id}:1", "FAILED", "Essential container in task exited", 3)
    part_record(aws, "results/q", 0, "succeeded", [(1, 10), (2, 11)])
    part_record(aws, "results/q", 1, "failed")
    part_record(aws, "results/q", 2, "succeeded", [(5, 12), (6, 13)])
    before = {j["jobId"] for j in aws["batch"].list_jobs(jobQueue=aws["job_queue"], jobStatus="SUCCEEDED")["jobSummaryList"]}
    result = CliRunner().invoke(cli, ["requeue", "results/q"])
    assert result.exit_code == 0, result.output
    assert "resubmit child 1" in result.output and "child 0" not in result.output and "child 2" not in result.output
    new = [j for j in aws["batch"].list_jobs(jobQueue=aws["job_queue"], jobStatus="SUCCEEDED")["jobSummaryList"]
           if j["jobId"] not in before and ":" not in j["jobId"]]
    assert len(new) == 1
    env = {e["name"]: e["value"] for e in
           aws["batch"].describe_jobs(jobs=[new[0]["jobId"]])["jobs"][0]["container"]["environment"]}
    assert env["CPB_ARRAY_INDEX"] == "1" and env["CPB_OUTPUT"] == "results/q"
    # The new job replaces the failed child: once its part succeeds, the output is done.
    part_record(aws, "results/q", 1, "succeeded", [(3, 1), (4, 2)])
    result = CliRunner().invoke(cli, ["status", "results/q", "--no-dlq"])
    assert result.exit_code == 0, result.output
    # Nothing failed any more: a second requeue submits nothing.
    assert "nothing to resubmit" in CliRunner().invoke(cli, ["requeue", "results/q"]).output


def test_requeue_dlq_moves_fixed_messages_and_keeps_broken_ones(aws):
    good = json.dumps({"pipeline": "p.cppipe", "input": "in", "output": "out"})
    aws["sqs"].send_message(QueueUrl=aws["dlq"], MessageBody=good)
    aws["sqs"].send_message(QueueUrl=aws["dlq"], MessageBody='{"input": "in"}')
    result = CliRunner().invoke(cli, ["requeue", "--dlq"])
    assert result.exit_code == 0, result.output
    assert "moved 1 message(s)" in result.output and "pipeline: is missing" in result.output
    assert queued(aws) == [good]
    left = aws["sqs"].get_queue_attributes(QueueUrl=aws["dlq"], AttributeNames=["ApproximateNumberOfMessages"])
    assert left["Attributes"]["ApproximateNumberOfMessages"] == "1"


def test_results_of_a_single_job_and_parts_without_a_submission_record(aws, tmp_path):
    text = "ImageNumber,Count_Nuclei\n1,7\n"
    put(aws, "results/single/Image.csv", text)
    put(aws, "results/single/stale-from-older-attempt.csv", "not listed in the record\n")
    put(aws, "results/single/_cpb/run.json", json.dumps({"status": "succeeded", "first": 1, "last": 1, "files": [
        {"key": "Image.csv", "size": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}]}))
    result = CliRunner().invoke(cli, ["results", "results/single", "--to", str(tmp_path / "single")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "single" / "Image.csv").read_text() == text
    assert not (tmp_path / "single" / "stale-from-older-attempt.csv").exists()  # only what the record vouches for
    # Parts with no submission record: the number of parts must be given, else it cannot be called complete.
    part_record(aws, "results/loose", 0, "succeeded", [(1, 3), (2, 4)])
    result = CliRunner().invoke(cli, ["results", "results/loose", "--to", str(tmp_path / "loose")])
    assert result.exit_code == 1 and "--parts" in result.output
    result = CliRunner().invoke(cli, ["results", "results/loose", "--to", str(tmp_path / "loose"), "--parts", "2"])
    assert result.exit_code == 1 and "part-00001: missing" in result.output
    result = CliRunner().invoke(cli, ["results", "results/loose", "--to", str(tmp_path / "loose"), "--parts", "1"])
    assert result.exit_code == 0, result.output


class _RefusingSqs:
    """The real (moto) SQS client, except that SendMessageBatch refuses the entries named in `refuse`."""

    def __init__(self, real, refuse: set[str]) -> None:
        self._real, self._refuse = real, refuse

    def send_message_batch(self, QueueUrl, Entries):  # noqa: N803 - boto3's names
        kept = [e for e in Entries if e["Id"] not in self._refuse]
        answer = self._real.send_message_batch(QueueUrl=QueueUrl, Entries=kept) if kept else {"Successful": []}
        answer["Failed"] = [{"Id": e["Id"], "SenderFault": False, "Code": "InternalError",
                             "Message": "injected"} for e in Entries if e["Id"] in self._refuse]
        return answer


@pytest.mark.fault
def test_sqs_refusing_some_entries_is_reported_and_nothing_else_lost(aws, tmp_path, monkeypatch):
    import cpb.cli as cli_module
    seed_inputs(aws)
    real = cli_module.make_clients

    def clients_with_faulty_sqs(region):
        clients = real(region)
        return type(clients)(s3=clients.s3, sqs=_RefusingSqs(clients.sqs, {"2", "7"}), batch=clients.batch,
                             logs=clients.logs)

    monkeypatch.setattr(cli_module, "make_clients", clients_with_faulty_sqs)
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(SEED_MESSAGES["seed_list.json"]))
    result = CliRunner().invoke(cli, ["submit", "--message-file", str(path)])
    assert result.exit_code == 1
    assert "2 of 12 message(s) were not accepted" in result.output  # entries 2 and 7 of the first batch of 10
    not_sent = sorted(line.split("(")[1].split(")")[0] for line in result.output.splitlines() if "NOT sent" in line)
    assert not_sent == ["results/s2", "results/s7"]
    sent = sorted(json.loads(b)["output"] for b in queued(aws))
    assert len(sent) == 10 and not set(sent) & set(not_sent)  # each job either sent once or reported, never both


def test_status_without_arguments_follows_the_last_submit(aws):
    seed_inputs(aws)
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 1 and "no earlier `cpb submit`" in result.output
    sent = invoke("submit", "--pipeline", "pipelines/nuclei.cppipe", "--input", "plates/p1/images",
                  "--output", "results/last")
    message_id = sent.output.split("sent ", 1)[1].split()[0]
    for args in (["status", "--no-dlq"], ["status", message_id, "--no-dlq"]):
        result = CliRunner().invoke(cli, args)
        assert "results/last/: WAITING" in result.output and "no submission record yet" in result.output
        assert result.exit_code == 3 and "no `cpb submit` from here" not in result.output
    # a mistyped prefix would say WAITING forever: it is called out, with the outputs really sent
    typo = CliRunner().invoke(cli, ["status", "results/lsat", "--no-dlq"])
    assert ("! no `cpb submit` from here sent to results/lsat: unless it was sent another way, check the prefix "
            "(recent outputs: results/last)") in typo.output


def test_status_of_an_output_whose_message_was_dead_lettered_is_failed(aws):
    seed_inputs(aws)
    bad = json.dumps({"pipeline": "pipelines/nuclei.cppipe", "input": "plates/p1/images", "output": "results/dl",
                      "job_vcpu": 999})
    aws["sqs"].send_message(QueueUrl=aws["dlq"], MessageBody=bad)
    result = CliRunner().invoke(cli, ["status", "results/dl"])
    assert result.exit_code == 1, result.output
    assert "results/dl/: FAILED" in result.output
    assert "for this output is in the dead-letter queue: message rejected: job_vcpu: 999 vCPUs" in result.output


def test_debug_shows_the_traceback_that_the_one_line_error_hides(aws):
    quiet = CliRunner().invoke(cli, ["results", "results/none", "--to", "/dev/null/x", "--bucket", "no-such-bucket"])
    assert quiet.exit_code == 1 and "Traceback" not in quiet.output
    assert quiet.output.strip().splitlines()[-1].startswith("cpb: ") and "NoSuchBucket" in quiet.output
    loud = CliRunner().invoke(cli, ["--debug", "results", "results/none", "--to", "/dev/null/x",
                                    "--bucket", "no-such-bucket"])
    assert loud.exit_code == 1 and loud.exception is not None and "NoSuchBucket" in str(loud.exception)


def test_no_aws_credentials_is_one_line_with_the_fix(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith(("AWS_", "CPB_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("PATH", str(tmp_path))
    result = CliRunner().invoke(cli, ["status", "results/x", "--bucket", "b-1", "--region", "us-east-1", "--no-dlq"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cpb: Unable to locate credentials: sign in to AWS first" in result.output


def test_status_of_a_wide_failed_array_stays_readable(aws):
    job_id = array_submission(aws, "results/wide", 30)
    states = MotoJobStates(REGION)
    for index in range(30):
        states.set(f"{job_id}:{index}", "FAILED", f"Essential container in task exited (exit code 3) #{index}", 3)
    result = CliRunner().invoke(cli, ["status", "results/wide", "--no-dlq"])
    assert result.exit_code == 1
    assert "0/30 children succeeded, 30 failed" in result.output
    assert result.output.count("  ! ") == 21 and "and 10 more" in result.output


def test_demo_never_deletes_an_out_folder_it_did_not_make(tmp_path, monkeypatch):
    """`cpb demo --out ~/project` once deleted the project's results/: now only a demo's own folder is
    cleared, and a scientist's same-named folder is renamed aside, with a line saying so."""
    monkeypatch.setenv("CPB_CELLPROFILER", str(tmp_path / "no-cellprofiler"))  # stops the demo after the clean-up
    project = tmp_path / "project"
    (project / "results").mkdir(parents=True)
    (project / "results" / "thesis.csv").write_text("precious\n")
    result = CliRunner().invoke(cli, ["demo", "--out", str(project)])
    kept = [p for p in project.iterdir() if p.name.startswith("results.before-demo-")]
    assert len(kept) == 1 and (kept[0] / "thesis.csv").read_text() == "precious\n"
    assert f"{project / 'results'} was not written by a demo: kept, renamed to {kept[0].name}" in result.output
    # that folder is now the demo's: its next run clears it, as it clears any earlier demo's folder
    (project / "results").mkdir()
    CliRunner().invoke(cli, ["demo", "--out", str(project)])
    assert not (project / "results").exists() and kept[0].exists()


@pytest.mark.parametrize("args,expected", [
    (["--pipeline", "pipelines/plate1.cpproj"],
     "--pipeline pipelines/plate1.cpproj is a CellProfiler project (.cpproj), not a pipeline: in CellProfiler "
     "use File > Export > Pipeline and pass the .cppipe"),
    (["--upload", "{images}", "--pipeline", "./nuclei_v2.cppipe"],
     "--pipeline ./nuclei_v2.cppipe: no such local file (with --upload a local --pipeline is uploaded; "
     "check the path, or give the file's bucket key)"),
    (["--upload", "{images}", "--pipeline", "pipelines/nuclei.cppipe", "--data-file", "../plate1/load_data.csv"],
     "--data-file ../plate1/load_data.csv: no such local file"),
    (["--upload", "{missing}", "--pipeline", "pipelines/nuclei.cppipe"], "Directory '"),
    (["--upload", "{images}", "--pipeline", "{no_export}"],
     "--pipeline: pipeline no_export.cppipe has no enabled ExportToSpreadsheet module: add one"),
])
def test_submit_names_a_scientists_slip_before_uploading_anything(aws, tmp_path, monkeypatch, args, expected):
    """A .cpproj, a mistyped local path or a missing --upload folder once surfaced as a credentials
    error or as "'.' path segments"; now each is named first, and nothing is uploaded or sent."""
    images = tmp_path / "plate1"
    images.mkdir()
    (images / "a.tif").write_bytes(b"II*\x00fake")
    monkeypatch.chdir(tmp_path)
    from cpb.demo.synthetic import PIPELINE
    no_export = tmp_path / "no_export.cppipe"  # a pipeline the worker would refuse after the upload
    no_export.write_text(PIPELINE.read_text()
                         .replace("|enabled:True|wants_pause:False]\n    Select the column delimiter",
                                  "|enabled:False|wants_pause:False]\n    Select the column delimiter"))
    args = [a.format(images=images, missing=tmp_path / "plate2", no_export=no_export) for a in args]
    result = CliRunner().invoke(cli, ["submit", *args, "--input", "plates/p1", "--output", "results/p1"])
    assert result.exit_code in (1, 2) and "Traceback" not in result.output
    assert expected in result.output
    assert aws["s3"].list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0 and queued(aws) == []


def test_submit_warns_that_a_used_output_will_be_replaced(aws):
    """The worker deletes an output's earlier files once its own are up: sending plate2 to plate1's
    output must not destroy plate1's results without a word."""
    seed_inputs(aws)
    put(aws, "results/plate1/_cpb/run.json", json.dumps({"status": "succeeded", "files": []}))
    common = ["submit", "--pipeline", "pipelines/nuclei.cppipe", "--input", "plates/p1", "--dry-run"]
    used = invoke(*common, "--output", "results/plate1")
    assert used.exit_code == 0
    assert (f"warning: s3://{BUCKET}/results/plate1/ already holds results; this job replaces them "
            "(its run deletes the earlier files): to keep them, use a new --output") in used.output
    fresh = invoke(*common, "--output", "results/plate2")  # results/plate1 is not inside results/plate2
    assert fresh.exit_code == 0 and "warning" not in fresh.output
