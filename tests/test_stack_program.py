"""The whole Pulumi program (__main__.py) builds under mocks, in both variants."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from stack_harness import REGION, REPO, program, run_main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pulumi_aws's own imports

CONTRACT_OUTPUTS = {"bucketName", "queueUrl", "deadLetterQueueUrl", "jobQueueArn", "jobDefinitionArn", "imageUri"}
COMPONENTS = {"cpb:index:Network", "cpb:index:LustreStorage", "cpb:index:BatchCompute", "cpb:index:JobIngress",
              "cpb:index:CellProfilerImage", "cpb:index:JobEvents", "cpb:index:StackDashboard"}


@pytest.mark.parametrize("fsx", ["true", "false"])
def test_program_builds_and_outputs_resolve(fsx: str) -> None:
    recorded = program(fsxEnabled=fsx)
    outputs = recorded.outputs
    assert CONTRACT_OUTPUTS <= set(outputs)
    assert all(isinstance(outputs[k], str) and outputs[k] for k in CONTRACT_OUTPUTS)
    assert re.fullmatch(r"arn:aws:batch:[a-z0-9-]+:\d{12}:job-queue/cpb-test-jobs", outputs["jobQueueArn"])
    assert re.fullmatch(r"arn:aws:batch:.+:job-definition/cpb-test-worker:\d+", outputs["jobDefinitionArn"])
    assert re.search(r"\.dkr\.ecr\..+@sha256:[0-9a-f]{64}$", outputs["imageUri"])
    assert outputs["queueUrl"] != outputs["deadLetterQueueUrl"]
    assert outputs["logGroupName"] == "/aws/batch/cpb-test"
    assert outputs["region"] == REGION
    assert outputs["dashboardName"] == "cpb-test"
    assert outputs["dashboardUrl"] == ("https://console.aws.amazon.com/cloudwatch/home?region=eu-west-1"
                                       "#dashboards/dashboard/cpb-test")
    if fsx == "true":
        assert outputs["fileSystemId"].startswith("fs-")
    else:
        assert "fileSystemId" not in outputs
    assert {r.type for r in recorded.resources} >= COMPONENTS


def test_fsx_off_builds_no_file_system_and_no_mount() -> None:
    on, off = program(fsxEnabled="true"), program(fsxEnabled="false")
    fsx_types = {"aws:fsx/lustreFileSystem:LustreFileSystem", "aws:fsx/dataRepositoryAssociation:DataRepositoryAssociation"}
    assert fsx_types <= {r.type for r in on.resources}
    assert not fsx_types & {r.type for r in off.resources}
    assert off.one("aws:ec2/launchTemplate:LaunchTemplate").inputs.get("userData") is None


def test_every_resource_sits_in_a_component_and_components_hang_off_the_stack() -> None:
    recorded = program(fsxEnabled="true")
    by_urn = {r.urn: r for r in recorded.resources}
    for resource in recorded.resources:
        if resource.type in COMPONENTS:
            assert resource.parent.endswith("pulumi:pulumi:Stack::cellpainting-batch-test"), resource.name
            assert resource.type.startswith("cpb:index:")
        elif resource.type.startswith("pulumi:providers:"):
            continue
        else:
            parent = by_urn.get(resource.parent)
            while parent is not None and parent.type not in COMPONENTS:
                parent = by_urn.get(parent.parent)
            assert parent is not None, f"{resource.type} {resource.name} is not inside a cpb component"
            assert resource.name.startswith(parent.name), f"{resource.name} not prefixed with {parent.name}"


def test_every_aws_resource_uses_the_tagging_provider() -> None:
    recorded = program(fsxEnabled="true")
    providers = recorded.of_type("pulumi:providers:aws")
    assert len(providers) == 1
    provider = providers[0]
    tags = json.loads(provider.inputs["defaultTags"])["tags"]  # provider config travels as JSON text
    assert tags == {"Project": "cellpainting-batch", "Stack": "test", "CostCenter": "research-computing",
                    "Owner": "imaging-platform", "ManagedBy": "pulumi"}
    assert provider.inputs["region"] == REGION
    for resource in recorded.resources:
        if resource.type.startswith("aws:"):
            assert resource.provider.startswith(provider.urn), f"{resource.type} {resource.name} uses {resource.provider!r}"
        elif resource.type.startswith("awsx:"):  # remote components pass the provider on to their children
            assert resource.providers.get("aws", "").startswith(provider.urn), f"{resource.type} {resource.name}"


def test_cost_tags_follow_config() -> None:
    recorded = program(fsxEnabled="false", costCenter="lab-42", owner="jane@example.org")
    tags = json.loads(recorded.one("pulumi:providers:aws").inputs["defaultTags"])["tags"]
    assert (tags["CostCenter"], tags["Owner"]) == ("lab-42", "jane@example.org")
    compute_tags = recorded.one("aws:batch/computeEnvironment:ComputeEnvironment", "on-demand").inputs[
        "computeResources"]["tags"]
    assert compute_tags["CostCenter"] == "lab-42"  # Batch copies these onto the instances it launches


def test_aws_profile_reaches_the_explicit_provider() -> None:
    provider = program(fsxEnabled="false", **{"aws:profile": "lab-admin"}).one("pulumi:providers:aws")
    assert provider.inputs["profile"] == "lab-admin"
    assert "profile" not in program(fsxEnabled="false").one("pulumi:providers:aws").inputs


def test_dev_stack_file_builds() -> None:
    """Pulumi.dev.yaml, passed as the CLI would (strings), builds the small FSx-off variant."""
    settings = yaml.safe_load((REPO / "Pulumi.dev.yaml").read_text())["config"]
    config = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in settings.items()}
    recorded = run_main(config)
    assert "fileSystemId" not in recorded.outputs
    assert recorded.one("aws:s3/bucket:Bucket").inputs["forceDestroy"] is True
    spot = recorded.one("aws:batch/computeEnvironment:ComputeEnvironment", "spot")
    assert spot.inputs["computeResources"]["maxVcpus"] == 64


def test_bad_config_stops_the_program_before_any_resource() -> None:
    from components.config import ConfigError

    with pytest.raises(ConfigError, match="maxVcpus") as caught:
        run_main({"maxVcpus": "0", "minVcpus": "4"})
    assert "minVcpus" in str(caught.value)


def test_deploy_guide_lists_every_stack_output() -> None:
    guide = (REPO / "docs" / "DEPLOY.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)` \|", guide.split("## Stack outputs")[1].split("##")[0], re.M))
    assert listed == set(program(fsxEnabled="true").outputs)


def test_program_also_builds_in_preview() -> None:
    """`pulumi preview` runs the same program; nothing may depend on being an update."""
    from stack_harness import run

    def build() -> dict:
        from components.config import load_config
        from components.stack import build_stack

        return build_stack(load_config({"fsxEnabled": "true"}), "test", REGION)

    recorded = run(build, preview=True)
    assert {r.type for r in recorded.resources} >= COMPONENTS
    assert recorded.outputs["jobQueueArn"].endswith(":job-queue/cpb-test-jobs")


def test_the_whole_program_registers_every_aws_resource_under_mocks() -> None:
    """The whole program, once the Lambda's dependencies are vendored. Its speed under mocks is a
    benchmark (bench/bench_program.py), not a timed test: a shared machine makes timings flaky."""
    program(fsxEnabled="true")  # warm: imports, vendored dependencies
    recorded = run_main({"fsxEnabled": "true", "costCenter": "timing"})
    assert len([r for r in recorded.resources if r.type.startswith("aws:")]) >= 45


# ---------------------------------------------------------------- region, partition and zones

def _run_expecting(config: dict, zones=None):
    """Run the program expecting a ConfigError; return it with what had been registered by then."""
    from components.config import ConfigError
    from stack_harness import LAST_RUN

    with pytest.raises(ConfigError) as caught:
        run_main(config, zones=zones)
    return str(caught.value), LAST_RUN["registered"]


def test_more_availability_zones_than_the_region_has_stops_before_any_resource() -> None:
    message, registered = _run_expecting({"availabilityZones": "4"})  # eu-west-1 answers 3 zones
    assert "availabilityZones = 4 but eu-west-1 has 3 availability zones" in message
    assert "eu-west-1a, eu-west-1b, eu-west-1c" in message and "set it to 3 or fewer" in message
    assert [r.type for r in registered] == ["pulumi:providers:aws"]  # the provider the zones were asked with
    assert program(fsxEnabled="false", availabilityZones="3").one("awsx:ec2:Vpc").inputs[
        "numberOfAvailabilityZones"] == 3


def test_zones_are_asked_of_the_stacks_provider_for_standard_zones_only() -> None:
    recorded = program(fsxEnabled="false")
    [(token, args)] = [c for c in recorded.calls if "getAvailabilityZones" in c[0]]
    assert args == {"state": "available", "filters": [{"name": "zone-type", "values": ["availability-zone"]}]}
    message, _ = _run_expecting({"availabilityZones": "2"}, zones=1)
    assert "availabilityZones = 2 but eu-west-1 has 1 availability zones" in message


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            yield value
        else:
            yield from (_strings(parsed) if isinstance(parsed, (dict, list)) else [value])


def test_govcloud_names_every_arn_and_endpoint_from_its_partition() -> None:
    recorded = run_main({"aws:region": "us-gov-west-1", "fsxEnabled": "true", "alarmEmail": "lab@example.org"})
    arns = [s for r in recorded.resources for s in _strings(r.inputs) if "arn:" in s]
    assert len(arns) > 20
    assert not [a for a in arns if re.search(r"arn:aws:", a)], "a commercial-partition ARN in a GovCloud stack"
    attachment = recorded.one("aws:iam/rolePolicyAttachment:RolePolicyAttachment").inputs
    assert attachment["policyArn"] == \
        "arn:aws-us-gov:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role"
    assert recorded.one("aws:ec2/vpcEndpoint:VpcEndpoint").inputs["serviceName"] == "com.amazonaws.us-gov-west-1.s3"
    assert recorded.outputs["dashboardUrl"].startswith("https://console.amazonaws-us-gov.com/cloudwatch/")
    assert recorded.outputs["jobQueueArn"].startswith("arn:aws-us-gov:batch:us-gov-west-1:")


@pytest.mark.parametrize("region,partition", [("cn-north-1", "aws-cn"), ("us-iso-east-1", "aws-iso"),
                                              ("eusc-de-east-1", "aws-eusc")])
def test_unsupported_partitions_are_refused_with_the_reason(region: str, partition: str) -> None:
    message, registered = _run_expecting({"aws:region": region})
    assert f"aws:region = {region} is in the {partition} partition, which this stack does not support" in message
    assert "Supported partitions: aws, aws-us-gov" in message
    assert registered == []


def test_allowed_arns_of_another_partition_are_refused() -> None:
    message, _ = _run_expecting({"allowedJobArns": json.dumps(
        ["arn:aws-cn:batch:cn-north-1:123456789012:job-queue/other"])})
    assert "outside the aws partition of eu-west-1" in message


def test_no_component_spells_an_arn_with_a_literal_partition() -> None:
    """Every ARN comes from components.partition (or from an ARN AWS handed back)."""
    offenders = [f"{path.name}:{n}" for path in sorted((REPO / "components").glob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"arn:aws(-[a-z-]+)?:", line) and not line.lstrip().startswith("#")
                 and "e.g." not in line]
    assert not offenders
