"""The local stack mirrors the stack `pulumi up` deploys with the same settings.

The real Pulumi program (`__main__.py`) runs under mocks (tests/stack_harness.py) with the
`Pulumi.yaml` defaults (FSx off: the local stack has none); the local stack is created in moto with
the same stack name and region. Whatever a message or a job meets must be the same on both: the
limits the Lambdas enforce (their whole CPB_* environment), the Lambda's timeout and memory, the
event source mapping's batch size and window, the queue's visibility timeout, retention and redrive,
the DLQ's retention, the job queue and job definition (names, resources, environment, retries,
timeout, log configuration), the log groups and the `jobLimits` output. A setting changed in
components/ or Pulumi.yaml without the local stack following fails here.
"""
from __future__ import annotations

import json

import boto3
import pytest

from cpb.local import emulator
from cpb.local.emulator import create_stack, environment, moto_server
from cpb.local.settings import load_settings
from stack_harness import REGION, STACK, program

# Values that name a resource: equal in kind, not in spelling (moto's ARNs, Pulumi's random suffixes).
RESOURCE_VARIABLES = {"CPB_BUCKET", "CPB_JOB_QUEUE", "CPB_JOB_DEFINITION"}


@pytest.fixture(scope="module")
def deployed():
    return program(fsxEnabled="false")


@pytest.fixture(scope="module")
def local():
    with moto_server() as url:
        stack = create_stack(url, load_settings(overrides=[f"aws:region={REGION}"], stack=STACK))
        with environment(stack.isolation_env()):
            batch, sqs, logs = (boto3.client(s) for s in ("batch", "sqs", "logs"))
            definition = batch.describe_job_definitions(jobDefinitions=[stack.job_definition_arn])["jobDefinitions"][0]
            queues = {url: sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
                      for url in (stack.queue_url, stack.dlq_url)}
            groups = {g["logGroupName"]: g.get("retentionInDays") for g in logs.describe_log_groups()["logGroups"]}
            yield stack, definition, queues, groups


def lambda_env(deployed, suffix: str) -> dict:
    function = next(f for f in deployed.of_type("aws:lambda/function:Function") if f.inputs["name"].endswith(suffix))
    return function, {k: v for k, v in function.inputs["environment"]["variables"].items() if k.startswith("CPB_")}


def test_the_lambdas_get_the_same_limits_and_settings(deployed, local):
    stack = local[0]
    functions = [f.inputs["name"] for f in deployed.of_type("aws:lambda/function:Function")]
    assert f"{emulator.name_prefix(STACK)}-ingress" == stack.ingress_function in functions
    for suffix in ("-ingress", "-job-events"):
        if not any(name.endswith(suffix) for name in functions):
            continue  # the job-events Lambda exists once components/ deploys it
        function, env = lambda_env(deployed, suffix)
        local_env = stack.lambda_env()
        missing = sorted(set(env) - set(local_env))
        assert not missing, f"the deployed {function.inputs['name']} sets {missing}: give the local stack the same " \
                            "(cpb/local/emulator.py EmulatedStack.lambda_env)"
        for key, value in env.items():
            if key not in RESOURCE_VARIABLES:
                assert local_env[key] == value, key
        assert local_env["CPB_JOB_QUEUE"].rsplit("/", 1)[1] == env["CPB_JOB_QUEUE"].rsplit("/", 1)[1]
        assert local_env["CPB_JOB_DEFINITION"].rsplit("/", 1)[1] == env["CPB_JOB_DEFINITION"].rsplit("/", 1)[1]
        if suffix == "-ingress":  # the job-events Lambda has its own, fixed size (components/events.py)
            assert stack.lambda_timeout_seconds == function.inputs["timeout"]
            assert stack.lambda_memory_mib == function.inputs["memorySize"]
    assert deployed.outputs["jobLimits"] == stack.outputs()["jobLimits"]


def test_the_queues_and_the_mapping_behave_the_same(deployed, local):
    stack, _definition, queues, _groups = local
    mapping = deployed.one("aws:lambda/eventSourceMapping:EventSourceMapping", "ingress")
    assert stack.batch_size == mapping.inputs["batchSize"]
    assert emulator.BATCHING_WINDOW_SECONDS == mapping.inputs["maximumBatchingWindowInSeconds"]
    assert mapping.inputs["functionResponseTypes"] == ["ReportBatchItemFailures"]  # what cpb.local.mapping plays
    queue = deployed.one("aws:sqs/queue:Queue", "ingress-queue").inputs
    dlq = deployed.one("aws:sqs/queue:Queue", "ingress-dlq").inputs
    mine = queues[stack.queue_url]
    assert int(mine["VisibilityTimeout"]) == queue["visibilityTimeoutSeconds"] == stack.visibility_timeout_seconds
    assert int(mine["MessageRetentionPeriod"]) == queue["messageRetentionSeconds"]
    assert json.loads(mine["RedrivePolicy"])["maxReceiveCount"] == json.loads(queue["redrivePolicy"])["maxReceiveCount"]
    assert json.loads(mine["RedrivePolicy"])["deadLetterTargetArn"] == queues[stack.dlq_url]["QueueArn"]
    assert int(queues[stack.dlq_url]["MessageRetentionPeriod"]) == dlq["messageRetentionSeconds"]
    assert mine["SqsManagedSseEnabled"] == "true"


def rules(evaluate_on_exit: list[dict]) -> list[tuple]:
    """evaluateOnExit as (action, condition, pattern), whichever spelling (API or Pulumi) it came in."""
    return [(str(rule["action"]).lower(),) + tuple(sorted((k.lower(), v) for k, v in rule.items() if k != "action"))
            for rule in evaluate_on_exit]


def test_the_job_queue_definition_and_logs_are_the_same(deployed, local):
    stack, definition, _queues, groups = local
    job_queue = deployed.one("aws:batch/jobQueue:JobQueue").inputs
    assert stack.job_queue_arn.rsplit("/", 1)[1] == job_queue["name"]
    deployed_definition = deployed.one("aws:batch/jobDefinition:JobDefinition").inputs
    assert definition["jobDefinitionName"] == deployed_definition["name"]
    assert rules(definition["retryStrategy"]["evaluateOnExit"]) == \
        rules(deployed_definition["retryStrategy"]["evaluateOnExits"])
    assert definition["retryStrategy"]["attempts"] == deployed_definition["retryStrategy"]["attempts"]
    assert definition["timeout"] == deployed_definition["timeout"]
    theirs, mine = json.loads(deployed_definition["containerProperties"]), definition["containerProperties"]
    for key in ("resourceRequirements", "privileged", "linuxParameters", "logConfiguration"):
        assert mine[key] == theirs[key], key
    assert {e["name"] for e in mine["environment"]} == {e["name"] for e in theirs["environment"]}
    assert {e["name"]: e["value"] for e in mine["environment"]}["AWS_DEFAULT_REGION"] == REGION
    deployed_groups = {g.inputs["name"]: g.inputs["retentionInDays"]
                       for g in deployed.of_type("aws:cloudwatch/logGroup:LogGroup")}
    for name, days in deployed_groups.items():
        assert groups.get(name) == days, f"log group {name}: the local stack should create it with {days} days"
    assert stack.outputs()["logGroupName"] == deployed.outputs["logGroupName"]
    contract = {"bucketName", "queueUrl", "deadLetterQueueUrl", "jobQueueArn", "jobDefinitionArn", "imageUri",
                "logGroupName", "region", "jobLimits"}  # docs/CONTRACTS.md, "Stack outputs"
    assert contract <= set(deployed.outputs) and set(stack.outputs()) == contract  # no FSx (fileSystemId) locally
