"""`cpb local up` as a user runs it: a foreground process other terminals talk to (no CellProfiler here).

It prints the stack outputs and the `export` lines; with those pasted, the real AWS CLI and
`cpb --stack local` see a stack with the same resources and limits as one deployed with the
`Pulumi.yaml` defaults (or a stack file and `--set` overrides); a bad message goes to the DLQ after
its receives and `cpb status` says why; `--state-dir` keeps the bucket across restarts; Ctrl-C
stops everything, and even SIGKILL of the stack takes its workers and their children along.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from local_stack import AWS, REPO, LocalUp, processes_with


def listening(endpoint: str) -> bool:
    host, port = endpoint.split("//")[1].split(":")
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, int(port))) == 0


@pytest.fixture
def home(tmp_path):
    return tmp_path / "cpb-home"


def test_up_mirrors_the_default_stack_for_the_aws_cli_and_cpb_then_ctrl_c_stops_it(home):
    up = LocalUp(home)
    try:
        outputs = up.outputs
        for key in ("bucketName", "queueUrl", "deadLetterQueueUrl", "jobQueueArn", "jobDefinitionArn", "imageUri",
                    "logGroupName", "region"):
            assert f"{key:<18}  {outputs[key]}" in up.output  # printed as `pulumi stack output` would
        assert outputs["jobLimits"] == {"maxVcpu": 16, "maxMemoryMib": 61440, "defaultVcpu": 4,
                                        "defaultMemoryMib": 15000, "allowedArns": []}
        assert outputs["jobQueueArn"].endswith(":job-queue/cpb-local-jobs")
        assert f"export AWS_ENDPOINT_URL={up.endpoint} " in up.output

        assert up.run(AWS, "s3", "ls").stdout.split()[-1] == outputs["bucketName"]
        queue = json.loads(up.run(AWS, "--endpoint-url", up.endpoint, "sqs", "get-queue-attributes", "--queue-url",
                                  outputs["queueUrl"], "--attribute-names", "All").stdout)["Attributes"]
        assert queue["VisibilityTimeout"] == "360" and queue["MessageRetentionPeriod"] == str(4 * 24 * 3600)
        assert json.loads(queue["RedrivePolicy"])["maxReceiveCount"] == 5
        definition = json.loads(up.run(AWS, "batch", "describe-job-definitions", "--job-definitions",
                                       outputs["jobDefinitionArn"]).stdout)["jobDefinitions"][0]
        assert definition["retryStrategy"]["attempts"] == 3 and definition["timeout"]["attemptDurationSeconds"] == 14400
        assert {r["type"]: r["value"] for r in definition["containerProperties"]["resourceRequirements"]} == \
            {"VCPU": "4", "MEMORY": "15000"}
        groups = json.loads(up.run(AWS, "logs", "describe-log-groups").stdout)["logGroups"]
        assert {"/aws/batch/cpb-local", "/aws/lambda/cpb-local-ingress"} <= {g["logGroupName"] for g in groups}

        status = up.cpb("status", "--stack", "local", "--no-dlq", "results/nothing-yet", check=False)
        assert f"stack settings from the local stack ({home / 'local-stack.json'})" in status.stdout + status.stderr
        assert "Traceback" not in status.stderr
        assert processes_with("AWS_ENDPOINT_URL", up.endpoint) == []  # only the stack; no worker yet
    finally:
        code = up.interrupt()
    assert code == 0, up.output
    assert up.lines[-1].endswith("stopped; nothing left running")
    assert not (home / "local-stack.json").exists() and not listening(up.endpoint)


def test_a_stack_file_and_set_overrides_shape_it_and_bad_settings_are_one_line(home, tmp_path):
    up = LocalUp(home, "--config", str(REPO / "Pulumi.dev.yaml"), "--set", "jobMaxVcpus=8",
                 "--set", "cellpainting-batch:maxReceiveCount=2")
    try:
        assert up.outputs["region"] == "eu-west-1" and up.outputs["jobLimits"]["maxVcpu"] == 8
        assert "mirroring a stack deployed with the Pulumi.yaml defaults with" in up.output
        queue = json.loads(up.run(AWS, "--endpoint-url", up.endpoint, "sqs", "get-queue-attributes", "--queue-url",
                                  up.outputs["queueUrl"], "--attribute-names", "RedrivePolicy").stdout)
        assert json.loads(queue["Attributes"]["RedrivePolicy"])["maxReceiveCount"] == 2
        groups = json.loads(up.run(AWS, "logs", "describe-log-groups").stdout)["logGroups"]
        assert {g["logGroupName"]: g.get("retentionInDays") for g in groups}["/aws/batch/cpb-local"] == 14
    finally:
        up.interrupt()
    bad = subprocess.run([sys.executable, "-m", "cpb", "local", "up", "--set", "jobMaxVcpus=lots"],
                         env={**os.environ, "CPB_HOME": str(tmp_path / "other")}, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2
    message = [line for line in bad.stderr.splitlines() if line.startswith("Error:")]
    assert message == ["Error: invalid stack config: cellpainting-batch:jobMaxVcpus must be a whole number "
                       "(got 'lots'); fix with `--set jobMaxVcpus=...`"]


def test_one_stack_per_cpb_home_and_a_taken_port_is_named(home, tmp_path):
    up = LocalUp(home)
    try:
        again = subprocess.run([sys.executable, "-m", "cpb", "local", "up", "--port", "0"],
                               env={**os.environ, "CPB_HOME": str(home)}, capture_output=True, text=True, timeout=60)
        assert again.returncode == 1
        assert f"Error: a local stack is already running at {up.endpoint}" in again.stderr
        port = up.endpoint.rsplit(":", 1)[1]
        taken = subprocess.run([sys.executable, "-m", "cpb", "local", "up", "--port", port],
                               env={**os.environ, "CPB_HOME": str(tmp_path / "second")}, capture_output=True,
                               text=True, timeout=60)
        assert taken.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr
        assert "--port 0" in taken.stderr and "Traceback" not in taken.stderr
    finally:
        up.interrupt()
    gone = subprocess.run([sys.executable, "-m", "cpb", "status", "--stack", "local"],
                          env={**os.environ, "CPB_HOME": str(home)}, capture_output=True, text=True, timeout=60)
    assert gone.returncode != 0 and "no local stack is running" in gone.stderr and "cpb local up" in gone.stderr


@pytest.mark.hostile
def test_a_bad_message_reaches_the_dlq_and_cpb_status_says_why(home):
    up = LocalUp(home, "--set", "maxReceiveCount=2", "--redeliver-after", "0.5")
    try:
        body = ('{"pipeline": "examples/ExampleHuman/ExampleHuman.cppipe", "input": "examples/ExampleHuman/images/", '
                '"output": "examples/ExampleHuman/too-big", "job_vcpu": "64"}')
        up.run(AWS, "sqs", "send-message", "--endpoint-url", up.endpoint, "--queue-url", up.outputs["queueUrl"],
               "--message-body", body)
        up.wait_for("moves to the dead-letter queue on its next receive", timeout=60)
        deadline = time.monotonic() + 30
        while True:
            status = up.cpb("status", "--stack", "local", "examples/ExampleHuman/too-big", check=False)
            if "dead-letter queue: 1 message(s)" in status.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert "dead-letter queue: 1 message(s)" in status.stdout, status.stdout + status.stderr
        assert "64 vCPUs" in status.stdout and "1..16" in status.stdout  # the reason, with this stack's limits
        lambda_log = (home / "local-logs").rglob("cpb-local-ingress.log")
        text = next(lambda_log).read_text()
        assert text.count("START RequestId") == 2 and '"kind":"invalid"' in text
        # the reason was under the output from the first delivery on (handlers.refusals), not only in the DLQ
        listed = up.run(AWS, "s3", "ls", "--endpoint-url", up.endpoint, "--recursive",
                        f"s3://{up.outputs['bucketName']}/examples/ExampleHuman/too-big/_cpb/")
        assert "_cpb/refusal-" in listed.stdout, listed.stdout
    finally:
        up.interrupt()


def test_state_dir_keeps_the_bucket_across_a_restart(home, tmp_path):
    state = tmp_path / "state"
    data = tmp_path / "plate.txt"
    data.write_text("well A01\n")
    up = LocalUp(home, "--state-dir", str(state))
    try:
        up.run(AWS, "s3", "cp", str(data), f"s3://{up.outputs['bucketName']}/plates/p1/plate.txt")
    finally:
        assert up.interrupt() == 0
    assert "saved 1 changed object(s)" in up.output
    again = LocalUp(home, "--state-dir", str(state))
    try:
        assert "restored 1 object(s)" in again.output
        copy = again.run(AWS, "s3", "cp", f"s3://{again.outputs['bucketName']}/plates/p1/plate.txt", "-").stdout
        assert copy == "well A01\n"
    finally:
        again.interrupt()


KILLED_STACK = """
import json, os, sys, time
from pathlib import Path
import boto3
from cpb.local.up import LocalCloud
out = Path(sys.argv[1])
worker = out / "worker.py"
worker.write_text("import subprocess, sys, time\\n"
                  "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\\n"
                  "time.sleep(120)\\n")
with LocalCloud(worker_command=[sys.executable, str(worker)], log_dir=out / "logs", write_state=False) as cloud:
    boto3.client("batch").submit_job(jobName="sleeper", jobQueue=cloud.stack.job_queue_arn,
                                     jobDefinition=cloud.stack.job_definition_arn)
    print(json.dumps({"endpoint": cloud.stack.endpoint}), flush=True)
    time.sleep(300)
"""


@pytest.mark.fault
def test_sigkill_of_the_stack_takes_its_workers_and_their_children_along(tmp_path):
    script = tmp_path / "stack.py"
    script.write_text(textwrap.dedent(KILLED_STACK))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "CPB_HOME": str(tmp_path / "home")}, start_new_session=True)
    try:
        endpoint = json.loads(proc.stdout.readline())["endpoint"]
        deadline = time.monotonic() + 30
        while len(processes_with("AWS_ENDPOINT_URL", endpoint)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)  # launcher, worker, the worker's child
        assert len(processes_with("AWS_ENDPOINT_URL", endpoint)) >= 3
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while processes_with("AWS_ENDPOINT_URL", endpoint) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with("AWS_ENDPOINT_URL", endpoint) == []


def test_stack_local_refuses_a_state_file_that_is_not_a_local_endpoint(home, monkeypatch):
    from cpb.local.state import write_local_stack
    from cpb.stack import StackError, discover
    monkeypatch.setenv("CPB_HOME", str(home))
    write_local_stack({"endpoint": "https://s3.amazonaws.com", "pid": 1, "region": "us-east-1",
                       "outputs": {"bucketName": "someone-elses"}})
    with pytest.raises(StackError, match="does not answer at https://s3.amazonaws.com"):
        discover("local")
    assert os.environ.get("AWS_ENDPOINT_URL") != "https://s3.amazonaws.com"


@pytest.mark.parametrize("args, env, expected", [
    ([], {"CPB_CELLPROFILER": "/nowhere/cellprofiler"},
     "Error: CellProfiler not found at /nowhere/cellprofiler: run `make local` or `make demo` (they install .venv-cp), "
     "or set CPB_CELLPROFILER to a cellprofiler executable"),
    (["--config", "Pulumi.nosuch.yaml"], {},
     "Error: --config Pulumi.nosuch.yaml does not exist; give a Pulumi stack file such as Pulumi.dev.yaml"),
    (["--set", "jobMaxVcpus"], {}, "Error: --set 'jobMaxVcpus' is not key=value; use e.g. --set jobMaxVcpus=8"),
])
def test_what_stops_it_from_starting_is_one_line(tmp_path, args, env, expected):
    done = subprocess.run([sys.executable, "-m", "cpb", "local", "up", "--port", "0", *args], cwd=str(REPO),
                          env={**os.environ, **env, "CPB_HOME": str(tmp_path)}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode in (1, 2)
    assert [line for line in done.stderr.splitlines() if line.startswith("Error:")] == [expected]
    assert "Traceback" not in done.stderr and not (tmp_path / "local-stack.json").exists()


TWO_STACKS = """
import logging, sys, time
from pathlib import Path
import boto3
from cpb.local.up import LocalCloud
logging.getLogger("elsewhere").addHandler(logging.lastResort)  # a handler reading sys.stderr each time, no setter
out = Path(sys.argv[1])
worker = out / "worker.py"
worker.write_text("import sys; sys.exit(0)\\n")
for round_ in (1, 2):
    with LocalCloud(worker_command=[sys.executable, str(worker)], log_dir=out / f"logs{round_}", write_state=False,
                    batching_window=0) as cloud:
        boto3.client("sqs").send_message(QueueUrl=cloud.stack.queue_url, MessageBody='{"pipeline": "p.cppipe"}')
        deadline = time.monotonic() + 60
        while not cloud.mapping.reports and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cloud.wait_idle(60)
    print(f"round {round_} done", flush=True)
"""


def test_a_second_local_stack_in_one_process_keeps_the_lambdas_logs_in_its_log_folder(tmp_path):
    """bench/bench_demo.py runs the demo several times in one process: the Lambda modules are imported
    (and Powertools' log handler made) during the first stack, and the second stack's Lambdas printed
    their JSON log lines to the terminal. Every round's lines belong in its own log folder."""
    script = tmp_path / "stacks.py"
    script.write_text(textwrap.dedent(TWO_STACKS))
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=180,
                          cwd=str(REPO), env={**os.environ, "CPB_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["round 1 done", "round 2 done"], done.stdout[-3000:]
    assert '"level"' not in done.stderr
    for round_ in (1, 2):
        log = (tmp_path / f"logs{round_}" / "lambda" / "cpb-local-ingress.log").read_text()
        assert '"message":"job message failed"' in log and '"field":"input"' in log, log[-2000:]
