"""Retries that must not duplicate work, and what `cpb status` says about a run's retries (issue 11).

Faults are injected at the HTTP layer of the real botocore clients `cpb` builds: the first answer
of a call is replaced by a 500 AFTER moto has carried the call out ("a 5xx where the call had taken
effect"), so botocore's own retry policy decides what happens next, as it would against AWS.
Leases and records are crafted as docs/CONTRACTS.md defines them (the Lambda and worker that
write them are being rebuilt in parallel).
"""
from __future__ import annotations

import json

import pytest
from botocore.awsrequest import AWSResponse
from click.testing import CliRunner
from moto.core.botocore_stubber import MockRawResponse

import cpb.cli as cli_module
from cpb.cli import cli
from cpb.local.batch import MotoJobStates
from test_cli import BUCKET, REGION, aws, queued, seed_inputs  # noqa: F401 - `aws` is the moto fixture
from test_cli_runs import RUN_A, RUN_B, batch_job, run, run_id_for, submission, write_lease, write_record


def lose_first_answer(client, service: str, operation: str) -> dict:
    """The first `operation` call is carried out by moto, but its answer is replaced by a 500."""
    calls = {"n": 0}

    def handler(request, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # moto's own before-send handler still runs the call: it takes effect
            return AWSResponse(request.url, 500, {"Content-Type": "application/x-amz-json-1.0"},
                               MockRawResponse(b'{"__type": "InternalError", "message": "injected 500"}'))
        return None

    client.meta.events.register_first(f"before-send.{service}.{operation}", handler)
    return calls


@pytest.fixture
def faulty(monkeypatch):
    """cpb's clients, with the first SendMessageBatch and SubmitJob answers lost."""
    real = cli_module.make_clients
    seen: dict[str, dict] = {}

    def make(region):
        clients = real(region)
        seen["sqs"] = lose_first_answer(clients.sqs, "sqs", "SendMessageBatch")
        for name in ("batch", "batch_once"):
            client = getattr(clients, name, None)
            if client is not None:
                seen[name] = lose_first_answer(client, "batch", "SubmitJob")
        return clients

    monkeypatch.setattr(cli_module, "make_clients", make)
    return seen


@pytest.mark.race
@pytest.mark.fault
def test_a_retried_send_carries_one_client_token_so_the_lambda_adopts_the_repeat(aws, faulty, monkeypatch):
    """botocore retried SendMessageBatch after a 500 that had taken effect: SQS holds the message
    twice. Both copies carry the same client_token (generated once, before sending), which the
    Lambda keys the submission and the lease by, so the second adopts the first run."""
    import cpb.submit
    # The Lambda's schema takes client_token (docs/CONTRACTS.md); this checkout's may predate it, and
    # cpb sends a token only to a schema that takes one.
    monkeypatch.setattr(cpb.submit, "accepts_token", lambda: True)
    seed_inputs(aws)
    sent = CliRunner().invoke(cli, ["submit", "--pipeline", "pipelines/nuclei.cppipe", "--input", "plates/p1/images",
                                    "--output", "results/dup"])
    assert sent.exit_code == 0, sent.output
    assert faulty["sqs"]["n"] == 2  # the fault fired and botocore retried
    bodies = queued(aws)
    assert len(bodies) == 2 and bodies[0] == bodies[1]
    token = json.loads(bodies[0])["client_token"]
    assert 8 <= len(token) <= 64
    assert sent.output.count("sent ") == 1 and f"(run {run_id_for(token)[:8]})" in sent.output


@pytest.mark.race
@pytest.mark.fault
def test_a_retried_requeue_starts_one_job_and_records_it_in_the_lease(aws, faulty):
    """SubmitJob answered 500 after creating the job: botocore's retry started a second copy. Now the
    requeue submits without botocore retries and looks its deterministic name up first: one job, with
    the run's CPB_RUN_ID, recorded in the lease's retries (`by: requeue`)."""
    job = batch_job(aws, "results/rq", 3, {":1": ("FAILED", "Essential container in task exited", 3)},
                    env={"CPB_DATA_FILE_ETAG": '"5d41402abc4b2a76b9719d911017c592"'})
    write_lease(aws, "results/rq", RUN_B, 3, 6, jobs=[{"job_id": job, "job_name": "plate", "array_size": 3,
                                                       "array_offset": 0, "memory_mib": 2048}])
    submission(aws, "results/rq", "message-b", job, 3, 6)
    write_record(aws, "results/rq", RUN_B, 0, 1, 2, 6)
    write_record(aws, "results/rq", RUN_B, 1, 3, 4, 6, status="failed")
    write_record(aws, "results/rq", RUN_B, 2, 5, 6, 6)
    before = {j["jobId"] for j in aws["batch"].list_jobs(jobQueue=aws["job_queue"], jobStatus="SUCCEEDED")["jobSummaryList"]}
    result = run("requeue", "results/rq")
    assert result.exit_code == 0, result.output
    new = [j for j in aws["batch"].list_jobs(jobQueue=aws["job_queue"], jobStatus="SUCCEEDED")["jobSummaryList"]
           if j["jobId"] not in before and ":" not in j["jobId"]]
    assert len(new) == 1, f"{len(new)} jobs started for one requeue"
    assert [j["jobName"] for j in new] == ["plate-rq1-1"]
    assert "resubmit child 1 of plate" in result.output and "found already submitted job" in result.output
    env = {e["name"]: e["value"] for e in aws["batch"].describe_jobs(jobs=[new[0]["jobId"]])["jobs"][0]["container"]["environment"]}
    assert env["CPB_RUN_ID"] == RUN_B and env["CPB_ARRAY_INDEX"] == "1" and env["CPB_OUTPUT"] == "results/rq"
    assert env["CPB_DATA_FILE_ETAG"] == '"5d41402abc4b2a76b9719d911017c592"'  # the same data file version as the run
    tags = aws["batch"].describe_jobs(jobs=[new[0]["jobId"]])["jobs"][0].get("tags", {})
    assert tags.get("cpb:stack") == "test"  # the stack's IAM lets its Lambdas terminate only jobs tagged so
    lease = json.loads(aws["s3"].get_object(Bucket=BUCKET, Key="results/rq/_cpb/lease.json")["Body"].read())
    assert [(r["job_id"], r["replaces"], r["array_index"], r["by"]) for r in lease["retries"]] == \
        [(new[0]["jobId"], f"{job}:1", 1, "requeue")]
    # The retry replaces the failed child: once its record (of run B) succeeds, the output is done.
    write_record(aws, "results/rq", RUN_B, 1, 3, 4, 6)
    status = run("status", "results/rq", "--no-dlq")
    assert status.exit_code == 0, status.output
    assert f"part 1: requeued by cpb requeue as job {new[0]['jobId']} (was: Essential container" in status.output
    assert "nothing failed, nothing to resubmit" in run("requeue", "results/rq").output


@pytest.mark.race
def test_requeue_refuses_while_jobs_run_and_names_the_next_attempt(aws):
    job = batch_job(aws, "results/rr", 2, {":0": ("RUNNING", None, None), ":1": ("FAILED", "boom", 3)})
    write_lease(aws, "results/rr", RUN_B, 2, 4, jobs=[{"job_id": job, "job_name": "plate", "array_size": 2,
                                                       "array_offset": 0, "memory_mib": 2048}])
    busy = run("requeue", "results/rr")
    assert busy.exit_code == 1 and "jobs are still running" in busy.output
    from cpb.requeue import job_name
    assert job_name("plate-rq1-1", 2, 1) == "plate-rq2-1" and len(job_name("x" * 200, 3, 12345)) == 128


@pytest.mark.race
def test_requeue_dlq_carries_the_original_message_id(aws):
    """A dead-lettered list message redriven with a new SQS id once had its entries submitted a second
    time. The copy carries `cpb-original-message-id`, the Lambda's message identity for it."""
    body = json.dumps({"pipeline": "p.cppipe", "input": "in", "output": "out"})
    first = aws["sqs"].send_message(QueueUrl=aws["dlq"], MessageBody=body)["MessageId"]
    assert "moved 1 message(s)" in run("requeue", "--dlq").output
    got = aws["sqs"].receive_message(QueueUrl=aws["queue"], MessageAttributeNames=["All"], MaxNumberOfMessages=1)
    message = got["Messages"][0]
    assert message["MessageAttributes"]["cpb-original-message-id"]["StringValue"] == first
    # dead-lettered again and redriven again: still the first id
    aws["sqs"].send_message(QueueUrl=aws["dlq"], MessageBody=message["Body"],
                            MessageAttributes={"cpb-original-message-id": {"DataType": "String", "StringValue": first}})
    aws["sqs"].delete_message(QueueUrl=aws["queue"], ReceiptHandle=message["ReceiptHandle"])
    assert "moved 1 message(s)" in run("requeue", "--dlq").output
    again = aws["sqs"].receive_message(QueueUrl=aws["queue"], MessageAttributeNames=["All"], MaxNumberOfMessages=1)
    assert again["Messages"][0]["MessageAttributes"]["cpb-original-message-id"]["StringValue"] == first


# ------------------------------------------------------------------------- what status says

@pytest.mark.race
def test_status_names_a_message_refused_because_the_output_was_in_use(aws):
    job = batch_job(aws, "results/busy", None, {"": ("RUNNING", None, None)})
    write_lease(aws, "results/busy", RUN_A, None, 1, jobs=[{"job_id": job, "job_name": "one"}], message_id="message-a")
    body = json.dumps({"pipeline": "p.cppipe", "input": "in", "output": "results/busy", "client_token": "tok-12345678"})
    aws["sqs"].send_message(QueueUrl=aws["dlq"], MessageBody=body)
    status = run("status", "results/busy")
    assert (f"is in the dead-letter queue: refused: output: results/busy was in use by run {RUN_A[:8]} of message "
            f"message-a (job {job} RUNNING); once that run has finished, move this message back with "
            "`cpb requeue --dlq`") in status.output


@pytest.mark.race
def test_status_says_what_a_chained_run_waits_for(aws):
    illum = batch_job(aws, "results/P1/illum", None, {"": ("RUNNING", None, None)}, name="illum")
    write_lease(aws, "results/P1/illum", RUN_A, None, 4, jobs=[{"job_id": illum, "job_name": "illum"}],
                message_id="tok#0")
    analysis = batch_job(aws, "results/P1/analysis", 2, {":0": ("PENDING", None, None), ":1": ("PENDING", None, None)},
                         name="analysis")
    write_lease(aws, "results/P1/analysis", RUN_B, 2, 4, message_id="tok#1", after=["results/P1/illum"],
                depends_on=[illum], jobs=[{"job_id": analysis, "job_name": "analysis", "array_size": 2,
                                           "array_offset": 0}])
    status = run("status", "results/P1/analysis", "--no-dlq")
    assert status.exit_code == 3, status.output
    assert "results/P1/analysis/: WAITING" in status.output
    assert "waiting for results/P1/illum (RUNNING)" in status.output
    MotoJobStates(REGION).set(illum, "SUCCEEDED")
    write_record(aws, "results/P1/illum", RUN_A, None, 1, 4, 4)
    MotoJobStates(REGION).set(f"{analysis}:0", "RUNNING")
    status = run("status", "results/P1/analysis", "--no-dlq")
    assert "results/P1/analysis/: RUNNING" in status.output and "runs after results/P1/illum: SUCCEEDED" in status.output


@pytest.mark.race
def test_status_shows_out_of_memory_retries_and_follows_the_retry(aws):
    job = batch_job(aws, "results/oom", 4, {":3": ("FAILED", "OutOfMemoryError: Container killed due to memory usage", 137)})
    retry = batch_job(aws, "results/oom", None, name="plate-oom1-3")
    write_lease(aws, "results/oom", RUN_B, 4, 8, jobs=[{"job_id": job, "job_name": "plate", "array_size": 4,
                                                        "array_offset": 0, "vcpus": 4, "memory_mib": 15000}],
                retries=[{"job_id": retry, "replaces": f"{job}:3", "array_index": 3, "reason": "OutOfMemoryError",
                          "memory_mib": 30000, "by": "events", "at": "2026-11-30T10:00:00Z"}])
    for index in range(4):
        write_record(aws, "results/oom", RUN_B, index, 2 * index + 1, 2 * index + 2, 8)
    status = run("status", "results/oom", "--no-dlq")
    assert status.exit_code == 0, status.output
    assert f"part 3: retried with 29.3 GiB after running out of memory at 14.6 GiB (job {retry})" in status.output
    assert "child 3 failed" not in status.output  # the retry replaced it


@pytest.mark.race
def test_status_says_what_to_do_when_out_of_memory_was_not_retried(aws):
    oom = "OutOfMemoryError: Container killed due to memory usage"
    job = batch_job(aws, "results/oom2", 2, {":1": ("FAILED", oom, 137)})
    write_lease(aws, "results/oom2", RUN_B, 2, 4, jobs=[{"job_id": job, "job_name": "plate", "array_size": 2,
                                                         "array_offset": 0, "vcpus": 4, "memory_mib": 61440}])
    write_record(aws, "results/oom2", RUN_B, 0, 1, 2, 4)
    # the job-events Lambda's outcome at the stack's maximum: recorded, no retry claimed
    aws["s3"].put_object(Bucket=BUCKET, Key=f"results/oom2/_cpb/events/{job}:1.json", Body=json.dumps(
        {"job_id": f"{job}:1", "status": "FAILED", "retried_by": None, "out_of_memory": True}).encode())
    status = run("status", "results/oom2", "--no-dlq")
    assert status.exit_code == 1, status.output
    assert "child 1 failed: OutOfMemoryError: Container killed due to memory usage; exit code 137 (out of memory at " \
           "60.0 GiB, and no retry with more memory followed" in status.output
    assert "raise jobMaxMemoryMib" in status.output


def _oom_child(aws, output: str) -> str:
    oom = "OutOfMemoryError: Container killed due to memory usage"
    job = batch_job(aws, output, 2, {":1": ("FAILED", oom, 137)})
    write_lease(aws, output, RUN_B, 2, 4, jobs=[{"job_id": job, "job_name": "plate", "array_size": 2,
                                                 "array_offset": 0, "vcpus": 4, "memory_mib": 4096}])
    write_record(aws, output, RUN_B, 0, 1, 2, 4)
    return job


@pytest.mark.race
def test_out_of_memory_before_the_events_lambda_has_retried_it_is_running_not_failed(aws):
    """Adversary: in the seconds between Batch failing a child for memory and the job-events Lambda
    resubmitting it, status said FAILED ("no retry with more memory followed") and --watch gave up
    on a run that then succeeded. No job event yet, or one holding a retry claim: it is RUNNING."""
    job = _oom_child(aws, "results/oomp")
    status = run("status", "results/oomp", "--no-dlq")
    assert "RUNNING" in status.output and status.exit_code != 1, status.output
    assert "child 1 ran out of memory; the job-events Lambda is resubmitting it with more memory" in status.output
    assert "no retry with more memory followed" not in status.output
    claim = {"job_id": f"{job}:1", "status": "FAILED", "retried_by": None,
             "retry_claim": {"job_name": "plate-oom1-1", "owner": "x", "until": 0}}
    aws["s3"].put_object(Bucket=BUCKET, Key=f"results/oomp/_cpb/events/{job}:1.json",
                         Body=json.dumps(claim).encode())
    status = run("status", "results/oomp", "--no-dlq")
    assert "RUNNING" in status.output and status.exit_code != 1, status.output


@pytest.mark.race
def test_out_of_memory_with_no_retry_in_sight_fails_after_the_grace(aws, monkeypatch):
    import cpb.status
    _oom_child(aws, "results/oomg")
    monkeypatch.setattr(cpb.status, "OOM_RETRY_GRACE_SECONDS", 0)  # the events Lambda never came
    status = run("status", "results/oomg", "--no-dlq")
    assert status.exit_code == 1 and "FAILED" in status.output, status.output
    assert "no retry with more memory followed" in status.output


@pytest.mark.race
def test_status_says_which_parts_were_reused_from_an_earlier_run(aws):
    write_lease(aws, "results/res", RUN_B, 3, 6, previous_run_id=RUN_A)
    write_record(aws, "results/res", RUN_B, 0, 1, 2, 6, resumed_from=RUN_A)
    write_record(aws, "results/res", RUN_B, 1, 3, 4, 6)
    write_record(aws, "results/res", RUN_B, 2, 5, 6, 6, resumed_from=RUN_A)
    status = run("status", "results/res", "--no-dlq")
    assert status.exit_code == 0, status.output
    assert (f"up to date, reused from run {RUN_A[:8]} (same pipeline, data rows, image and upstream results): "
            "part-00000, part-00002") in status.output
    assert f"(replaced run {RUN_A[:8]})" in status.output


@pytest.mark.race
def test_a_message_dead_lettered_after_claiming_the_output_is_failed_not_waiting(aws):
    """Adversary: the Lambda claims the output (lease `pending`), then SubmitJob is refused for good
    (a deregistered job definition, a 4xx): it releases the claim (lease_until 0) but the lease stays
    `pending`, the message is retried and dead-lettered. `cpb status` said WAITING, exit 3, and
    `--watch` waited for a job that can never come."""
    token = "tok-deadbeef"
    write_lease(aws, "results/stuck", run_id_for(token), None, 4, state="pending", message_id=token,
                jobs=[{"job_id": None, "job_name": "stuck-1234", "job_queue": aws["job_queue"]}], lease_until=0)
    body = json.dumps({"pipeline": "p.cppipe", "input": "in", "output": "results/stuck", "client_token": token})
    aws["sqs"].send_message(QueueUrl=aws["dlq"], MessageBody=body)
    status = run("status", "results/stuck")
    assert status.exit_code == 1, status.output
    assert "results/stuck/: FAILED" in status.output
    assert f"run {run_id_for(token)[:8]} of message {token}: not submitted (its message is in the dead-letter queue)" \
        in status.output
