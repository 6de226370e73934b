"""The seed's operation section, unchanged but for the endpoint, against `cpb local up` with real CellProfiler.

A user starts `cpb local up`, pastes its `export` lines into another shell and follows the seed
README: `aws s3 cp examples s3://$AWS_BUCKET/examples/ --recursive`, then the four documented
messages with `aws sqs send-message` (a single job, a list, a list with `"job_memory": "8192"` and
`"job_vcpu": "12"` as strings, and the one-line command). Each output gets its CSVs and its run
record, found with `aws s3 ls`, with the right counts; the 12-vCPU job is accepted (as by a stack
deployed with the Pulumi.yaml defaults) and runs on the cores there are. Ctrl-C while a job runs
leaves no process behind. (A bad message going to the DLQ, with `cpb status` giving the reason, is
tests/test_local_stack.py's, which needs no CellProfiler.)

The data: CellProfiler's ExampleHuman (../shared/examples, skipped with the reason when absent), and
a generated plate laid out the same way (`examples/Synthetic/`), which every clone has.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import time

import pytest

from cpb.demo.synthetic import PIPELINE, make_plate
from local_stack import AWS, LocalUp, processes_with


def example_human(tmp_path, shared_examples, example_human_nuclei):
    folder = tmp_path / "examples"
    shutil.copytree(shared_examples / "ExampleHuman", folder / "ExampleHuman")
    return folder, "examples/ExampleHuman/ExampleHuman.cppipe", "examples/ExampleHuman/images/", \
        "examples/ExampleHuman", {"total": example_human_nuclei}


def synthetic(tmp_path):
    folder = tmp_path / "examples"
    plate = make_plate(tmp_path / "plate", wells=("A01",), sites=1, seed=11, plate="SYN")
    # The seed's layout: the pipeline beside an images/ folder (the LoadData CSV sits with the images).
    shutil.copytree(plate.images_dir, folder / "Synthetic" / "images")
    shutil.copy(PIPELINE, folder / "Synthetic" / "Synthetic.cppipe")
    return folder, "examples/Synthetic/Synthetic.cppipe", "examples/Synthetic/images/", "examples/Synthetic", \
        {"total": sum(plate.truth.values())}


@pytest.fixture(params=["generated", "ExampleHuman"])
def examples(request, tmp_path):
    if request.param == "generated":
        return synthetic(tmp_path)
    return example_human(tmp_path, request.getfixturevalue("shared_examples"),
                         request.getfixturevalue("example_human_nuclei"))


@pytest.mark.cellprofiler
def test_the_seeds_four_messages_through_the_aws_cli(examples, tmp_path, cellprofiler_env):
    folder, pipeline, images, base, truth = examples
    # --cores 8: the stack's default job asks 4 vCPUs and one image set keeps one CellProfiler busy, so
    # letting the local Batch overcommit this machine's cores runs the outputs side by side (the stack,
    # its limits and the messages stay the seed's and the defaults).
    up = LocalUp(tmp_path / "cpb-home", "--cores", "8",
                 env={"CPB_CELLPROFILER": cellprofiler_env["CPB_CELLPROFILER"],
                      "CPB_CELLPROFILER_ARGS": cellprofiler_env["CPB_CELLPROFILER_ARGS"]})
    try:
        env = up.aws_env()
        bucket, sqs_url, endpoint = env["BUCKET"], env["SQS_URL"], env["AWS_ENDPOINT_URL"]
        started = time.monotonic()
        up.run(AWS, "s3", "cp", str(folder), f"s3://{bucket}/examples/", "--recursive")

        def send(body: str) -> None:  # aws-cli v1 needs --endpoint-url for sqs (aws/aws-cli#8737)
            up.run(AWS, "sqs", "send-message", "--endpoint-url", endpoint, "--queue-url", sqs_url,
                   "--message-body", body)

        def entry(n: int, **extra: str) -> dict:
            return {"pipeline": pipeline, "input": images, "output": f"{base}/output{n}/", **extra}

        send(json.dumps(entry(0), indent=2))                                              # Submit Single Job
        send(json.dumps([entry(1), entry(2)], indent=2))                                  # Submit Multiple Jobs
        send(json.dumps([entry(3, job_memory="8192", job_vcpu="12"),                      # ... custom memory, CPU
                         entry(4, job_memory="8192", job_vcpu="8")], indent=2))
        send(f'{{"pipeline":"{pipeline}", "input":"{images}", "output":"{base}/output5"}}')  # the one-line CLI

        for n in range(6):
            record = wait_for_record(up, bucket, f"{base}/output{n}", timeout=900)
            assert record["status"] == "succeeded", record
            listing = up.run(AWS, "s3", "ls", f"s3://{bucket}/{base}/output{n}/", "--recursive").stdout
            names = {line.split()[-1].rsplit("/", 1)[-1] for line in listing.splitlines()}
            assert {"Image.csv", "Nuclei.csv", "run.json"} <= names, listing
            rows = list(csv.DictReader(io.StringIO(up.run(
                AWS, "s3", "cp", f"s3://{bucket}/{base}/output{n}/Image.csv", "-").stdout)))
            assert sum(int(float(r["Count_Nuclei"])) for r in rows) == truth["total"]
        elapsed = time.monotonic() - started
        assert "Lambda cpb-local-ingress: " in up.output and " 0 failed" in up.output
        assert not [line for line in up.lines if "failed" in line and " 0 failed" not in line], up.output
        job = json.loads(up.run(AWS, "batch", "list-jobs", "--job-queue", up.outputs["jobQueueArn"],
                                "--job-status", "SUCCEEDED").stdout)["jobSummaryList"]
        assert len(job) == 6
        twelve = up.wait_for("(it asked for 12; the local Batch has 8 core(s))")
        assert "RUNNING with" in twelve
        print(f"seed operation: upload + 4 messages + 6 outputs in {elapsed:.1f} s")

        # Ctrl-C while a job runs: nothing stays behind.
        send(json.dumps(entry(6)))
        up.wait_for("output6")
        deadline = time.monotonic() + 60
        while len(processes_with("AWS_ENDPOINT_URL", endpoint)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_with("AWS_ENDPOINT_URL", endpoint), "the job never started"
    finally:
        code = up.interrupt()
    assert code == 0, up.output
    time.sleep(0.5)
    assert processes_with("AWS_ENDPOINT_URL", endpoint) == []
    assert not (tmp_path / "cpb-home" / "local-stack.json").exists()


def wait_for_record(up: LocalUp, bucket: str, output: str, timeout: float) -> dict:
    """The output's run record once it is written (the worker writes it last)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = up.run(AWS, "s3", "cp", f"s3://{bucket}/{output}/_cpb/run.json", "-", check=False)
        if got.returncode == 0 and got.stdout.strip():
            return json.loads(got.stdout)
        if up.proc.poll() is not None:
            break
        time.sleep(1)
    raise AssertionError(f"no run record for {output} after {timeout:.0f} s:\n{up.output}")
