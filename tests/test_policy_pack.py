"""The policy pack: the stack passes every policy, and a deliberately broken
variant of each resource trips its policy (no policy is a check that cannot fail)."""
from __future__ import annotations

import json
from typing import Any, Callable

import pytest
import yaml
from pulumi_policy import PolicyCustomTimeouts, PolicyResource, PolicyResourceOptions

from policy_harness import cpb_guardrails, engine_violations, violations
from stack_harness import REPO, Recorded, program

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
NAMES = [p.name for p in cpb_guardrails.POLICIES]


@pytest.fixture(params=["true", "false"], ids=["fsx-on", "fsx-off"])
def stack(request: pytest.FixtureRequest) -> Recorded:
    return program(fsxEnabled=request.param, alarmEmail="lab@example.org")


@pytest.fixture(scope="module")
def served_pack():
    """The pack started the way the engine starts it (its __main__.py as a script, which
    prints its gRPC port), talked to over the engine's Analyzer protocol."""
    import subprocess
    import sys

    import grpc
    from pulumi.runtime.proto import analyzer_pb2_grpc

    process = subprocess.Popen([sys.executable, "-u", str(REPO / "policy" / "__main__.py")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline().strip())
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=20)
        yield analyzer_pb2_grpc.AnalyzerStub(channel)
        channel.close()
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.mark.parametrize("name", NAMES)
def test_the_stack_passes(stack: Recorded, name: str, served_pack) -> None:
    assert violations(name, stack) == []
    assert engine_violations(served_pack, name, stack) == []  # and as the engine would ask


# ------------------------------------------------------------ broken variants

def first(resources: list[PolicyResource], typ: str, name_part: str = "") -> PolicyResource:
    return next(r for r in resources if r.resource_type == typ and name_part in r.name)


def drop(resources: list[PolicyResource], typ: str) -> None:
    resources[:] = [r for r in resources if r.resource_type != typ]


def set_prop(typ: str, key: str, value: Any, name_part: str = "") -> Callable:
    """Resource-policy breaker: override one input of one resource type."""
    def breaker(resource, props: dict) -> dict:
        if resource.type == typ and name_part in resource.name:
            props[key] = value
        return props
    return breaker


def open_public_access(resources: list[PolicyResource]) -> None:
    first(resources, cpb_guardrails.PUBLIC_ACCESS_BLOCK).props["restrictPublicBuckets"] = False


def unencrypted_bucket(resources: list[PolicyResource]) -> None:
    drop(resources, cpb_guardrails.BUCKET_SSE[0])


def bucket_policy_without_tls(resources: list[PolicyResource]) -> None:
    policy = first(resources, cpb_guardrails.BUCKET_POLICY)
    document = json.loads(policy.props["policy"])
    document["Statement"][0]["Resource"] = document["Statement"][0]["Resource"][:1]  # bucket, not objects
    policy.props["policy"] = json.dumps(document)


def queue_without_dlq(resources: list[PolicyResource]) -> None:
    del first(resources, cpb_guardrails.QUEUE, "ingress-queue").props["redrivePolicy"]


def public_subnet_for_batch(resources: list[PolicyResource]) -> None:
    env = first(resources, cpb_guardrails.COMPUTE_ENVIRONMENT, "spot")
    subnet_id = env.props["computeResources"]["subnets"][0]
    options = PolicyResourceOptions(False, [], None, [], PolicyCustomTimeouts(0, 0, 0), [])
    resources.append(PolicyResource(cpb_guardrails.SUBNET, {
        "mapPublicIpOnLaunch": True, "arn": f"arn:aws:ec2:eu-west-1:123456789012:subnet/{subnet_id}"},
        "urn:pulumi:test::cellpainting-batch::aws:ec2/subnet:Subnet::public", "public", options, None, None, [], {}))


def fsx_open_to_the_vpc(resources: list[PolicyResource]) -> None:
    group = first(resources, cpb_guardrails.SECURITY_GROUP, "fsx")
    group.props["ingress"] = group.props["ingress"] + [
        {"protocol": "tcp", "fromPort": 988, "toPort": 988, "cidrBlocks": ["10.0.0.0/16"]}]


def untagged_provider(resources: list[PolicyResource]) -> None:
    provider = next(r.provider for r in resources if r.resource_type == cpb_guardrails.BUCKET)
    tags = json.loads(provider.props["defaultTags"])
    del tags["tags"]["CostCenter"]
    provider.props["defaultTags"] = json.dumps(tags)


def _document(statement: dict) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


def edit_policy(name_part: str, edit: Callable[[list[dict]], list[dict]]) -> Callable:
    """Resource-policy breaker: rewrite the statements of one role policy."""
    def breaker(resource, props: dict) -> dict:
        if resource.type == "aws:iam/rolePolicy:RolePolicy" and name_part in resource.name:
            document = json.loads(props["policy"])
            document["Statement"] = edit(document["Statement"])
            props["policy"] = json.dumps(document)
        return props
    return breaker


def edit_retry_rules(edit: Callable[[list[dict]], list[dict]]) -> Callable:
    def breaker(resource, props: dict) -> dict:
        if resource.type == cpb_guardrails.JOB_DEFINITION:
            props["retryStrategy"] = {**props["retryStrategy"],
                                      "evaluateOnExits": edit(list(props["retryStrategy"]["evaluateOnExits"]))}
        return props
    return breaker


BROKEN: dict[str, tuple[dict, str]] = {
    "s3-public-access-blocked": ({"stack": open_public_access}, "restrictPublicBuckets"),
    "s3-encrypted": ({"stack": unencrypted_bucket}, "no default server-side encryption"),
    "s3-tls-only": ({"stack": bucket_policy_without_tls}, "accepts plain HTTP"),
    "sqs-encrypted": ({"resource_props": set_prop(cpb_guardrails.QUEUE, "sqsManagedSseEnabled", False, "dlq")},
                      "is not encrypted"),
    "sqs-dead-letter-queue": ({"stack": queue_without_dlq}, "has no dead-letter queue"),
    "sns-alarm-topic-key": ({"resource_props": set_prop("aws:sns/topic:Topic", "kmsMasterKeyId", "alias/aws/sns")},
                            "CloudWatch alarms cannot publish"),
    "iam-no-wildcard-actions": ({"resource_props": set_prop(
        "aws:iam/rolePolicy:RolePolicy", "policy",
        _document({"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::b/*"}), "job-role")},
        "wildcard actions"),
    "iam-no-star-resource-with-arn": ({"resource_props": set_prop(
        "aws:iam/rolePolicy:RolePolicy", "policy",
        _document({"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "*"}), "job-role")},
        "take resource ARNs"),
    "ec2-imdsv2-required": ({"resource_props": set_prop(
        cpb_guardrails.LAUNCH_TEMPLATE, "metadataOptions", {"httpEndpoint": "enabled", "httpTokens": "optional"})},
        "allows IMDSv1"),
    "batch-launch-template": ({"resource_props": lambda r, p: {**p, "computeResources": {
        k: v for k, v in p["computeResources"].items() if k != "launchTemplate"}}
        if r.type == cpb_guardrails.COMPUTE_ENVIRONMENT else p}, "has no launch template"),
    "batch-private-hosts": ({"stack": public_subnet_for_batch}, "public subnets"),
    "batch-no-privileged": ({"resource_props": lambda r, p: {**p, "containerProperties": json.dumps(
        {**json.loads(p["containerProperties"]), "privileged": True})}
        if r.type == cpb_guardrails.JOB_DEFINITION else p}, "privileged container"),
    "logs-retention": ({"resource_props": lambda r, p: {k: v for k, v in p.items() if k != "retentionInDays"}
                        if r.type == cpb_guardrails.LOG_GROUP else p}, "keeps logs forever"),
    "fsx-lustre-ingress": ({"stack": fsx_open_to_the_vpc}, "admits cidrBlocks"),
    "cost-allocation-tags": ({"stack": untagged_provider}, "lacks cost-allocation tags ['CostCenter']"),
    "iam-control-records-protected": ({"resource_props": edit_policy(
        "job-role", lambda statements: [s for s in statements if s["Effect"] != "Deny"])},
        "allows s3:PutObject on arn:aws:s3:::"),
    "batch-stop-own-jobs-only": ({"resource_props": edit_policy(
        "ingress-role", lambda statements: [{k: v for k, v in s.items() if k != "Condition"} for s in statements])},
        "allows ['batch:TerminateJob'] on any job"),
    "batch-retry-strategy": ({"resource_props": edit_retry_rules(
        lambda rules: [{"onExitCode": "137", "action": "retry"}] + rules[:3] + rules[-1:])},
        "retries exit code(s) ['137']"),
    "events-target-dead-letter": ({"resource_props": lambda r, p: {k: v for k, v in p.items()
                                                                   if k != "deadLetterConfig"}
                                   if r.type == "aws:cloudwatch/eventTarget:EventTarget" else p},
                                  "drops events it cannot deliver"),
    "arn-partition": ({"resource_props": set_prop(
        "aws:iam/rolePolicyAttachment:RolePolicyAttachment", "policyArn",
        "arn:aws-us-gov:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role")},
        "names ARNs of another partition (arn:aws-us-gov:...) although its region is in aws"),
}


def test_every_policy_has_a_broken_variant() -> None:
    assert sorted(BROKEN) == sorted(NAMES)


@pytest.mark.policy_trip
@pytest.mark.parametrize("name", NAMES)
def test_a_broken_resource_trips_its_policy(name: str, served_pack) -> None:
    recorded = program(fsxEnabled="true", alarmEmail="lab@example.org")
    breaker, expected = BROKEN[name]
    found = violations(name, recorded, **breaker)
    assert found, f"{name} did not trip"
    assert any(expected in message for message in found), found
    through_engine = engine_violations(served_pack, name, recorded, **breaker)
    assert any(expected in message for message in through_engine), through_engine


def test_fsx_group_admitting_a_stranger_group_trips() -> None:
    """Only the compute group (by ID, when known) may reach the Lustre ports."""
    def stranger(resources: list[PolicyResource]) -> None:
        group = first(resources, cpb_guardrails.SECURITY_GROUP, "fsx")
        group.props["ingress"] = [{**rule, "securityGroups": ["sg-0someoneelse"]} for rule in group.props["ingress"]]
    found = violations("fsx-lustre-ingress", program(fsxEnabled="true"), stack=stranger)
    assert any("no compute environment uses" in m for m in found)


def test_compute_in_the_vpcs_public_subnets_trips() -> None:
    """awsx's own list of public subnets is enough to catch hosts placed there."""
    def into_public(resources: list[PolicyResource]) -> None:
        vpc = first(resources, "awsx:ec2:Vpc")
        first(resources, cpb_guardrails.COMPUTE_ENVIRONMENT, "on-demand").props["computeResources"]["subnets"] = \
            vpc.props["publicSubnetIds"][:1]
    found = violations("batch-private-hosts", program(fsxEnabled="true"), stack=into_public)
    assert len(found) == 1 and "on-demand" in found[0] and "public subnets" in found[0]


def test_star_resource_stays_allowed_where_iam_has_no_arn() -> None:
    """ecr:GetAuthorizationToken cannot be scoped: '*' is correct there and must not trip."""
    breaker = set_prop("aws:iam/rolePolicy:RolePolicy", "policy", _document(
        {"Effect": "Allow", "Action": ["ecr:GetAuthorizationToken", "batch:ListJobs"], "Resource": "*"}), "job-role")
    assert violations("iam-no-star-resource-with-arn", program(fsxEnabled="true"), resource_props=breaker) == []


def test_policy_pack_runs_in_the_project_virtualenv() -> None:
    spec = yaml.safe_load((REPO / "policy" / "PulumiPolicy.yaml").read_text())
    assert spec["runtime"]["name"] == "python"
    assert spec["runtime"]["options"]["virtualenv"] == "../.venv"
    main = (REPO / "policy" / "__main__.py").read_text()
    assert "from cpb_guardrails import POLICIES" in main and "PolicyPack(" in main


def test_deploy_guide_lists_every_policy() -> None:
    guide = (REPO / "docs" / "DEPLOY.md").read_text().split("## Guardrails")[1].split("\n## ")[0]
    listed = [line.split("`")[1] for line in guide.splitlines() if line.startswith("| `")]
    assert listed == NAMES


def test_the_pack_serves_its_policies_to_the_engine(served_pack) -> None:
    from google.protobuf import empty_pb2, struct_pb2
    from pulumi.runtime.proto import analyzer_pb2

    info = served_pack.GetAnalyzerInfo(empty_pb2.Empty())
    assert info.name == "cpb-guardrails"
    assert [p.name for p in info.policies] == NAMES

    def analyze(props: dict) -> list[str]:
        properties = struct_pb2.Struct()
        properties.update(props)
        response = served_pack.Analyze(analyzer_pb2.AnalyzeRequest(
            type="aws:cloudwatch/logGroup:LogGroup", properties=properties,
            urn="urn:pulumi:dev::cellpainting-batch::aws:cloudwatch/logGroup:LogGroup::jobs", name="jobs"))
        return [d.policyName for d in response.diagnostics]

    assert analyze({"name": "/aws/batch/x"}) == ["logs-retention"]
    assert analyze({"name": "/aws/batch/x", "retentionInDays": 30}) == []


@pytest.mark.parametrize("edit,expected", [
    (lambda rules: rules[:-1] + [{"onExitCode": "6", "action": "retry"}] + rules[-1:], "6 retry rules"),
    (lambda rules: rules[:-1], "the last retry rule is not a catch-all EXIT"),
    (lambda rules: rules[:-1] + [{"onExitCode": "*", "onReason": "x*", "action": "exit"}],
     "the last retry rule is not a catch-all EXIT"),
    (lambda rules: [{"onExitCode": "5", "action": "retry"}] + rules[1:], "retries exit code(s) ['5']"),
    (lambda rules: [{"onExitCode": "1*", "action": "retry"}] + rules[1:], "retries exit code(s) ['137']"),
])
def test_retry_strategy_variants_trip(edit: Callable, expected: str) -> None:
    found = violations("batch-retry-strategy", program(fsxEnabled="true"), resource_props=edit_retry_rules(edit))
    assert any(expected in message for message in found), found


def test_stopping_jobs_with_a_wildcard_tag_value_trips() -> None:
    def wildcard(statements: list[dict]) -> list[dict]:
        return [{**s, "Condition": {"StringLike": {"aws:ResourceTag/cpb:stack": "*"}}} if "Condition" in s else s
                for s in statements]
    found = violations("batch-stop-own-jobs-only", program(fsxEnabled="true"),
                       resource_props=edit_policy("ingress-role", wildcard))
    assert found and "on any job" in found[0]


def test_a_bucket_writer_missing_one_deny_trips_naming_it() -> None:
    def drop_lease(statements: list[dict]) -> list[dict]:
        return [{**s, "Resource": [r for r in s["Resource"] if not r.endswith("lease.json")]}
                if s["Effect"] == "Deny" else s for s in statements]
    found = violations("iam-control-records-protected", program(fsxEnabled="true"),
                       resource_props=edit_policy("job-role", drop_lease))
    assert len(found) == 2 and all("['*/_cpb/lease.json']" in m for m in found)  # PutObject and DeleteObject


def test_a_govcloud_stack_passes_the_partition_policy_and_a_commercial_arn_in_it_trips() -> None:
    from stack_harness import run_main

    gov = run_main({"aws:region": "us-gov-west-1", "fsxEnabled": "true"})
    assert violations("arn-partition", gov) == []
    found = violations("arn-partition", gov, resource_props=set_prop(
        "aws:iam/rolePolicyAttachment:RolePolicyAttachment", "policyArn",
        "arn:aws:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role"))
    assert found == ["aws:iam/rolePolicyAttachment:RolePolicyAttachment cpb-compute-instance-role-ecs names ARNs "
                     "of another partition (arn:aws:...) although its region is in aws-us-gov; derive ARNs from "
                     "the region's partition"]
