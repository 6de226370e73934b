"""What the stack sends to AWS, checked against AWS's own models rather than our expectations:
botocore's Batch API model for the job definition, and a real IAM linter (parliament, with
IAM's action catalog) for every policy document."""
from __future__ import annotations

import json

import botocore.session
import pytest
from botocore.validate import ParamValidator
from parliament import analyze_policy_string, iam_definition

from components import jobdef
from stack_harness import Recorded, program

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# Findings accepted on purpose, each with its reason. Nothing else may appear.
ACCEPTED = {
    # The ECS agent must log in to ECR to pull the worker image; the token is the credential.
    ("cpb-compute-execution-role-policy", "CREDENTIALS_EXPOSURE"),
}


@pytest.fixture(params=["true", "false"], ids=["fsx-on", "fsx-off"])
def stack(request: pytest.FixtureRequest) -> Recorded:
    return program(fsxEnabled=request.param, alarmEmail="lab@example.org")


def register_job_definition_request(stack: Recorded) -> dict:
    """The RegisterJobDefinition call the provider makes, rebuilt from the registered inputs."""
    definition = stack.one("aws:batch/jobDefinition:JobDefinition").inputs
    strategy = definition["retryStrategy"]
    return {
        "jobDefinitionName": definition["name"],
        "type": definition["type"],
        "platformCapabilities": definition["platformCapabilities"],
        "propagateTags": definition["propagateTags"],
        "containerProperties": json.loads(definition["containerProperties"]),
        "retryStrategy": {"attempts": int(strategy["attempts"]), "evaluateOnExit": [
            {**{k: v for k, v in rule.items() if k != "action"}, "action": rule["action"].upper()}
            for rule in strategy["evaluateOnExits"]]},
        "timeout": {"attemptDurationSeconds": int(definition["timeout"]["attemptDurationSeconds"])},
    }


def test_job_definition_matches_batchs_register_job_definition_shape(stack: Recorded) -> None:
    model = botocore.session.get_session().get_service_model("batch")
    shape = model.operation_model("RegisterJobDefinition").input_shape
    report = ParamValidator().validate(register_job_definition_request(stack), shape)
    assert not report.has_errors(), report.generate_report()


def test_the_shape_check_catches_a_wrong_field() -> None:
    """The validator really looks: a misspelt or mistyped field fails it."""
    model = botocore.session.get_session().get_service_model("batch")
    shape = model.operation_model("RegisterJobDefinition").input_shape
    props = jobdef.container_properties(image_uri="x@sha256:0", vcpus=1, memory_mib=512, job_role_arn="r",
                                        execution_role_arn="e", log_group_name="g", region="eu-west-1",
                                        fsx_mount_path="/fsx")
    props["mountPoints"][0]["readonly"] = True  # API spells it readOnly
    props["privileged"] = "false"
    report = ParamValidator().validate({"jobDefinitionName": "n", "type": "container",
                                        "containerProperties": props}, shape)
    assert "readonly" in report.generate_report() and "privileged" in report.generate_report()


def identity_documents(stack: Recorded) -> list[tuple[str, str]]:
    """Every identity or resource policy the stack writes (trust policies are checked separately)."""
    docs = [(r.name, r.inputs["policy"]) for r in stack.of_type("aws:iam/rolePolicy:RolePolicy")]
    for typ in ("aws:s3/bucketPolicy:BucketPolicy", "aws:sqs/queuePolicy:QueuePolicy"):
        docs += [(r.name, r.inputs["policy"]) for r in stack.of_type(typ)]
    return docs


def test_every_policy_document_lints_clean_with_parliament(stack: Recorded) -> None:
    documents = identity_documents(stack)
    assert len(documents) >= 6
    for name, text in documents:
        findings = analyze_policy_string(text, include_community_auditors=True).findings
        unexpected = [(f.issue, f.detail) for f in findings if (name, f.issue) not in ACCEPTED]
        assert not unexpected, f"{name}: {unexpected}"


def test_parliament_does_flag_a_broken_statement() -> None:
    """The linter is not a check that cannot fail: a mismatched resource and an unknown action are caught."""
    broken = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["batch:SubmitJob"], "Resource": ["arn:aws:s3:::bucket/*"]},
        {"Effect": "Allow", "Action": ["s3:GetObjekt"], "Resource": ["arn:aws:s3:::bucket/*"]}]}
    issues = {f.issue for f in analyze_policy_string(json.dumps(broken)).findings}
    assert {"RESOURCE_MISMATCH", "UNKNOWN_ACTION"} <= issues


def _resource_types(action: str) -> list[str]:
    service, name = action.split(":")
    for entry in iam_definition:
        if entry["prefix"] == service:
            for privilege in entry["privileges"]:
                if privilege["privilege"] == name:
                    return [r["resource_type"] for r in privilege["resource_types"] if r["resource_type"]]
    raise AssertionError(f"{action} is not in IAM's action catalog")


def test_no_wildcard_actions_and_star_resources_only_where_iam_has_no_arn(stack: Recorded) -> None:
    for name, text in identity_documents(stack):
        for statement in json.loads(text)["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
            if statement["Effect"] == "Deny":
                continue  # deny-all-over-plain-HTTP statements are meant to be broad
            assert all("*" not in a for a in actions), f"{name}: wildcard action in {actions}"
            if "*" in resources:
                assert resources == ["*"]
                for action in actions:
                    assert not _resource_types(action), f"{name}: {action} has ARNs yet is granted on '*'"


def test_trust_policies_name_exactly_one_service() -> None:
    stack = program(fsxEnabled="true")
    expected = {"instance-role": "ec2.amazonaws.com", "execution-role": "ecs-tasks.amazonaws.com",
                "job-role": "ecs-tasks.amazonaws.com", "ingress-role": "lambda.amazonaws.com",
                "events-role": "lambda.amazonaws.com"}
    roles = stack.of_type("aws:iam/role:Role")
    assert len(roles) == len(expected)
    for role in roles:
        service = next(v for k, v in expected.items() if role.name.endswith(k))
        [statement] = json.loads(role.inputs["assumeRolePolicy"])["Statement"]
        assert statement == {"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}


def test_job_role_reaches_only_the_data_bucket() -> None:
    stack = program(fsxEnabled="true")
    arn = stack.one("aws:s3/bucket:Bucket").state["arn"]
    document = json.loads(stack.one("aws:iam/rolePolicy:RolePolicy", "job-role").inputs["policy"])
    allowed = {r for s in document["Statement"] if s["Effect"] == "Allow" for r in s["Resource"]}
    assert allowed == {arn, f"{arn}/*"}
    assert all(r.startswith(f"{arn}/") for s in document["Statement"] if s["Effect"] == "Deny"
               for r in s["Resource"])


# ------------------------------------------------- input names the provider knows

def _args_class(resource_type: str) -> type:
    """``aws:batch/computeEnvironment:ComputeEnvironment`` -> pulumi_aws.batch.ComputeEnvironmentArgs."""
    import importlib

    provider, rest = resource_type.split(":", 1)
    module, _, name = rest.partition(":")
    package = module.split("/")[0]
    package = {"lambda": "lambda_"}.get(package, package)
    resource_class = getattr(importlib.import_module(f"pulumi_{provider}.{package}"), name)
    # The resource's own module names its args class in __all__: `<Name>Args`, or `<Name>InitArgs` where
    # a nested input type already has that name (s3.BucketVersioningArgs is the legacy Bucket's block).
    module = importlib.import_module(resource_class.__module__)
    [args_name] = [n for n in module.__all__ if n in (f"{name}Args", f"{name}InitArgs")]
    return getattr(module, args_name)


def _fields(args_class: type) -> dict[str, str]:
    """Wire name (camelCase, what the engine receives) -> the annotation text of that input."""
    import inspect

    annotations = {k: str(p.annotation) for k, p in inspect.signature(args_class.__init__).parameters.items()}
    return {prop.fget._pulumi_name: annotations.get(attr, "")
            for attr, prop in vars(args_class).items()
            if isinstance(prop, property) and hasattr(prop.fget, "_pulumi_name")}


def unknown_input_names(resource_type: str, inputs: dict) -> list[str]:
    """Input keys, at any depth, that the installed pulumi_aws/pulumi_awsx do not declare for this resource.

    Mocks accept any name and the Python SDK passes nested dicts through unchecked, so a misspelt
    nested key (say ``ec2Configuration``) would only surface on a real `pulumi up`.
    """
    import importlib
    import re

    def walk(args_class: type, value: dict, path: str) -> list[str]:
        fields, found = _fields(args_class), []
        module = importlib.import_module(args_class.__module__)  # nested types as this module sees them
        for key, item in value.items():
            if key not in fields:
                found.append(f"{path}{key}")
                continue
            nested = re.search(r"ForwardRef\('(\w+Args)'\)", fields[key])
            if not nested or item is None:
                continue
            nested_class = getattr(module, nested.group(1))
            for index, element in enumerate(item if isinstance(item, list) else [item]):
                if isinstance(element, dict):
                    found += walk(nested_class, element, f"{path}{key}[{index}]." if isinstance(item, list)
                                  else f"{path}{key}.")
        return found

    return walk(_args_class(resource_type), inputs, "")


def test_every_input_name_is_one_the_aws_providers_declare(stack: Recorded) -> None:
    checked = [r for r in stack.resources if r.type.startswith(("aws:", "awsx:"))]
    assert len(checked) >= 30 and {"awsx:ec2:Vpc", "awsx:ecr:Image"} <= {r.type for r in checked}
    problems = {r.name: unknown_input_names(r.type, r.inputs) for r in checked}
    assert not {name: keys for name, keys in problems.items() if keys}


def test_a_misspelt_nested_input_name_is_caught(stack: Recorded) -> None:
    environment = dict(stack.one("aws:batch/computeEnvironment:ComputeEnvironment", "spot").inputs)
    resources = dict(environment["computeResources"])
    resources["ec2Configuration"] = resources.pop("ec2Configurations")  # the API's spelling, not Pulumi's
    resources["launchTemplate"] = {**resources["launchTemplate"], "templateVersion": "1"}
    environment["computeResources"] = resources
    assert unknown_input_names("aws:batch/computeEnvironment:ComputeEnvironment", environment) == [
        "computeResources.launchTemplate.templateVersion", "computeResources.ec2Configuration"]


# ------------------------------------------------- enum values AWS accepts

def _enum(service: str, shape: str) -> list[str]:
    return list(botocore.session.get_session().get_service_model(service).shape_for(shape).enum)


def enum_values_sent(stack: Recorded) -> list[tuple[str, str, str]]:
    """(value, service, botocore enum shape) for every enumerated field the stack sets."""
    sent: list[tuple[str, str, str]] = []
    for env in stack.of_type("aws:batch/computeEnvironment:ComputeEnvironment"):
        resources = env.inputs["computeResources"]
        sent += [(resources["type"], "batch", "CRType"),
                 (resources["allocationStrategy"], "batch", "CRAllocationStrategy"),
                 (env.inputs["type"], "batch", "CEType")]
    queue = stack.one("aws:batch/jobQueue:JobQueue").inputs
    sent += [(queue["state"], "batch", "JQState")]
    for action in queue["jobStateTimeLimitActions"]:
        sent += [(action["action"], "batch", "JobStateTimeLimitActionsAction"),
                 (action["state"], "batch", "JobStateTimeLimitActionsState")]
    definition = stack.one("aws:batch/jobDefinition:JobDefinition").inputs
    sent += [(c, "batch", "PlatformCapability") for c in definition["platformCapabilities"]]
    sent += [(definition["type"], "batch", "JobDefinitionType")]
    for fs in stack.of_type("aws:fsx/lustreFileSystem:LustreFileSystem"):
        sent += [(fs.inputs["deploymentType"], "fsx", "LustreDeploymentType"),
                 (fs.inputs["dataCompressionType"], "fsx", "DataCompressionType")]
    for link in stack.of_type("aws:fsx/dataRepositoryAssociation:DataRepositoryAssociation"):
        for policy in ("autoImportPolicy", "autoExportPolicy"):
            sent += [(event, "fsx", "EventType") for event in link.inputs["s3"][policy]["events"]]
    template = stack.one("aws:ec2/launchTemplate:LaunchTemplate").inputs
    sent += [(template["metadataOptions"]["httpTokens"], "ec2", "LaunchTemplateHttpTokensState"),
             (template["metadataOptions"]["httpEndpoint"], "ec2", "LaunchTemplateInstanceMetadataEndpointState"),
             (template["instanceInitiatedShutdownBehavior"], "ec2", "ShutdownBehavior")]
    sent += [(d["ebs"]["volumeType"], "ec2", "VolumeType") for d in template["blockDeviceMappings"]]
    for function in [f.inputs for f in stack.of_type("aws:lambda/function:Function")]:
        sent += [(function["runtime"], "lambda", "Runtime"),
                 (function["loggingConfig"]["logFormat"], "lambda", "LogFormat")]
        sent += [(a, "lambda", "Architecture") for a in function["architectures"]]
    for alarm in [a.inputs for a in stack.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")]:
        sent += [(alarm["comparisonOperator"], "cloudwatch", "ComparisonOperator"),
                 (alarm["statistic"], "cloudwatch", "Statistic")]
    for endpoint in [e.inputs for e in stack.of_type("aws:ec2/vpcEndpoint:VpcEndpoint")]:
        sent += [(endpoint["vpcEndpointType"], "ec2", "VpcEndpointType")]
    return sent


def test_every_enumerated_value_is_one_aws_accepts(stack: Recorded) -> None:
    sent = enum_values_sent(stack)
    assert len(sent) >= 25
    wrong = [(value, shape, _enum(service, shape)) for value, service, shape in sent
             if value not in _enum(service, shape)]
    assert not wrong


def test_enum_check_catches_a_value_aws_does_not_have() -> None:
    assert "SPOT_PRICE_CAPACITY_OPTIMISED" not in _enum("batch", "CRAllocationStrategy")
    assert "python3.12" in _enum("lambda", "Runtime") and "python3.21" not in _enum("lambda", "Runtime")
