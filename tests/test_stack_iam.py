"""Issue 11.9: who may write which keys of the bucket, and which jobs the ingress may terminate.

The stack's own policy documents are put on IAM users in moto with IAM enforcement on, and real S3
calls are made with their keys: moto evaluates Allow, explicit Deny and resource wildcards as IAM does
for S3. Batch's tag condition, which moto does not evaluate, is checked against IAM's action catalog."""
from __future__ import annotations

import json

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.core import set_initial_no_auth_action_count
from parliament import iam_definition

from components.iam import JOB_STACK_TAG
from stack_harness import REGION, Recorded, policy_document, program

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

OUT = "results/plate1"
#: key -> who writes it (docs/CONTRACTS.md "Output layout", "The output lease", "Job events")
KEYS = {
    f"{OUT}/Image.csv": "worker",
    f"{OUT}/Nuclei.csv": "worker",
    f"{OUT}/_cpb/run.json": "worker",
    f"{OUT}/_cpb/pending.json": "worker",
    f"{OUT}/_cpb/logs/cellprofiler-1-4.log": "worker",
    f"{OUT}/part-00003/Image.csv": "worker",
    f"{OUT}/part-00003/_cpb/run.json": "worker",
    f"{OUT}/_cpb/lease.json": "lambdas",
    f"{OUT}/_cpb/submission-0f1e2d.json": "ingress",
    f"{OUT}/_cpb/submission-requeue-20261130T120000-job1.json": "ingress",
    f"{OUT}/_cpb/refusal-0f1e2d.json": "ingress",
    f"{OUT}/_cpb/events/4c7599ae-0a82.json": "events",
    f"{OUT}/part-00003/_cpb/events/4c7599ae:3.json": "events",
    "pipelines/0123456789ab/nuclei.cppipe": "client",
    "images/plate1/A01_s1_w1.tif": "client",
}


@pytest.fixture(scope="module")
def stack() -> Recorded:
    return program(fsxEnabled="false")


def attempts(stack: Recorded, role: str) -> dict[str, dict[str, bool]]:
    """{key: {"put", "delete", "get": allowed?}} for a principal holding ``role``'s policy document."""
    document = policy_document(stack.one("aws:iam/rolePolicy:RolePolicy", role))
    bucket = stack.one("aws:s3/bucket:Bucket").state["bucket"]
    results: dict[str, dict[str, bool]] = {}
    setup_calls = 1 + len(KEYS) + 3  # bucket, seeded objects, user, policy, access key

    @mock_aws
    @set_initial_no_auth_action_count(setup_calls)
    def scenario() -> None:
        admin = boto3.client("s3", region_name=REGION)
        admin.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
        for key in KEYS:
            admin.put_object(Bucket=bucket, Key=key, Body=b"seed")
        iam = boto3.client("iam", region_name=REGION)
        iam.create_user(UserName=role)
        iam.put_user_policy(UserName=role, PolicyName="p", PolicyDocument=json.dumps(document))
        key = iam.create_access_key(UserName=role)["AccessKey"]
        s3 = boto3.client("s3", region_name=REGION, aws_access_key_id=key["AccessKeyId"],
                          aws_secret_access_key=key["SecretAccessKey"])

        def allowed(call, **kwargs) -> bool:
            try:
                call(Bucket=bucket, **kwargs)
                return True
            except ClientError as error:
                assert error.response["Error"]["Code"] == "AccessDenied", error
                return False

        for name in KEYS:
            results[name] = {"get": allowed(s3.get_object, Key=name),
                             "put": allowed(s3.put_object, Key=name, Body=b"x"),
                             "delete": allowed(s3.delete_object, Key=name)}

    scenario()
    return results


def test_the_job_role_writes_results_and_never_control_records_or_pipelines(stack: Recorded) -> None:
    seen = attempts(stack, "job-role")
    for key, writer in KEYS.items():
        may_write = writer == "worker" or key.startswith("images/")  # inputs cannot be told apart by IAM
        assert seen[key]["get"], key  # the worker reads everything: inputs, pipelines, the lease
        assert seen[key]["put"] == may_write and seen[key]["delete"] == may_write, (key, seen[key])


def test_the_ingress_writes_only_submission_records_and_leases(stack: Recorded) -> None:
    seen = attempts(stack, "ingress-role")
    for key, writer in KEYS.items():
        assert seen[key]["get"], key  # pipelines, data files, leases of `after` outputs
        assert seen[key]["put"] == (writer in ("ingress", "lambdas")), (key, seen[key])
        assert not seen[key]["delete"], key  # records are superseded by conditional writes, never deleted


def test_the_events_lambda_reads_and_writes_only_leases_and_job_events(stack: Recorded) -> None:
    seen = attempts(stack, "events-role")
    for key, writer in KEYS.items():
        mine = writer in ("events", "lambdas")
        assert seen[key]["get"] == mine and seen[key]["put"] == mine, (key, seen[key])
        assert not seen[key]["delete"], key


def _condition_keys(action: str, resource_type: str) -> list[str]:
    service, name = action.split(":")
    entry = next(e for e in iam_definition if e["prefix"] == service)
    resources = {r["resource"]: r for r in entry["resources"]}
    privilege = next(p for p in entry["privileges"] if p["privilege"] == name)
    assert resource_type in [r["resource_type"].rstrip("*") for r in privilege["resource_types"]]
    return resources[resource_type]["condition_keys"]


def test_the_ingress_may_terminate_only_jobs_tagged_with_this_stack(stack: Recorded) -> None:
    statements = policy_document(stack.one("aws:iam/rolePolicy:RolePolicy", "ingress-role"))["Statement"]
    [terminate] = [s for s in statements if "batch:TerminateJob" in s["Action"]]
    assert terminate["Action"] == ["batch:TerminateJob"]
    assert terminate["Resource"] == [f"arn:aws:batch:{REGION}:123456789012:job/*"]
    assert terminate["Condition"] == {"StringEquals": {f"aws:ResourceTag/{JOB_STACK_TAG}": "test"}}
    # IAM evaluates aws:ResourceTag/<key> for TerminateJob on the job resource (IAM's action catalog).
    assert "aws:ResourceTag/${TagKey}" in _condition_keys("batch:TerminateJob", "job")
    assert not any("batch:CancelJob" in s["Action"] for s in statements)
    env = stack.one("aws:lambda/function:Function", "ingress").inputs["environment"]["variables"]
    assert env["CPB_STACK"] == "test"  # the value the ingress tags its jobs with


def test_no_other_principal_of_the_stack_may_stop_jobs(stack: Recorded) -> None:
    for policy in stack.of_type("aws:iam/rolePolicy:RolePolicy"):
        if "ingress" in policy.name:
            continue
        actions = {a for s in policy_document(policy)["Statement"] for a in s["Action"]}
        assert not actions & {"batch:TerminateJob", "batch:CancelJob"}, policy.name
