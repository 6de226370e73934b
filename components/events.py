"""JobEvents: Batch job outcomes -> a small Lambda that records them and escalates out-of-memory.

An EventBridge rule on "Batch Job State Change" (SUCCEEDED and FAILED, this stack's job queue only)
invokes ``handlers.events.handler`` (the stack's one Lambda archive). Per docs/CONTRACTS.md ("Job
events") it writes ``<output>/_cpb/events/<job id>.json`` and resubmits a job or array child that ran
out of memory with twice the memory (at most ``CPB_MAX_MEMORY_MIB``, at most ``CPB_OOM_MAX_RETRIES``
times), recording the retry in the output's lease; it emits EMF metrics (namespace
``CellPaintingBatch``, dimension ``Stack``) the stack's dashboard shows.

No event is lost silently: EventBridge retries delivery and parks what it cannot deliver in the
component's dead-letter queue; the Lambda's own asynchronous retries end there too (an on-failure
destination); an alarm fires on anything in it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import pulumi
import pulumi_aws as aws

from components import iam
from components.ingress import (DLQ_RETENTION_SECONDS, LAMBDA_RUNTIME, lambda_log_group_and_role,
                                 tls_only_queue_policy)
from components.partition import Partition

EVENTS_HANDLER = "handlers.events.handler"
#: One event per call, a few Batch and S3 requests: boto3 and Powertools fit with room to spare.
EVENTS_LAMBDA_MEMORY_MIB = 256
EVENTS_LAMBDA_TIMEOUT_SECONDS = 60
#: The Batch states the handler acts on (every other transition is ignored by the rule, not the code).
FINAL_STATES = ("SUCCEEDED", "FAILED")
#: EventBridge -> Lambda delivery: keep trying for a day (Batch jobs are not replayed).
TARGET_MAX_EVENT_AGE_SECONDS = 24 * 3600
TARGET_MAX_RETRY_ATTEMPTS = 185  # the EventBridge maximum
#: Lambda's own retries when the handler raised: the most Lambda allows, then the dead-letter queue.
ASYNC_MAX_RETRY_ATTEMPTS = 2
ASYNC_MAX_EVENT_AGE_SECONDS = 6 * 3600
#: What the handler's EMF metrics are called (the dashboard reads them; handlers/events.py emits them).
METRICS_NAMESPACE = "CellPaintingBatch"
METRICS_DIMENSION = "Stack"
METRICS = ("JobsSucceeded", "JobsFailed", "OutOfMemoryRetries")


@dataclass
class JobEventsArgs:
    """What the job-events Lambda acts on, and its limits (docs/CONTRACTS.md, "Job events")."""

    name_prefix: str
    stack: str  # CPB_STACK: the metrics' Stack dimension and the job tag resubmitted jobs carry
    partition: Partition
    code: pulumi.Archive
    bucket_name: pulumi.Input[str]
    bucket_arn: pulumi.Input[str]
    job_queue_arn: pulumi.Input[str]
    job_definition_arn: pulumi.Input[str]
    max_memory_mib: int
    oom_max_retries: int
    log_retention_days: int
    alarm_actions: Sequence[pulumi.Input[str]] = field(default_factory=list)


def job_state_change_pattern(job_queue_arn: str) -> dict[str, Any]:
    """The rule's event pattern: final states of jobs in this stack's queue, nothing else."""
    return {"source": ["aws.batch"], "detail-type": ["Batch Job State Change"],
            "detail": {"status": list(FINAL_STATES), "jobQueue": [job_queue_arn]}}


def dead_letter_queue_policy(queue_arn: str, rule_arn: str, partition: Partition) -> dict[str, Any]:
    """TLS only, and EventBridge may park undeliverable events of this one rule."""
    document = tls_only_queue_policy(queue_arn)
    document["Statement"].append({
        "Sid": "EventBridgeParksUndeliverableEvents", "Effect": "Allow",
        "Principal": {"Service": partition.service_principal("events")},
        "Action": "sqs:SendMessage", "Resource": queue_arn,
        "Condition": {"ArnEquals": {"aws:SourceArn": rule_arn}}})
    return document


class JobEvents(pulumi.ComponentResource):
    """EventBridge rule, job-events Lambda, its dead-letter queue and alarm."""

    function_name: pulumi.Output[str]
    dead_letter_queue_name: pulumi.Output[str]
    rule_name: pulumi.Output[str]

    def __init__(self, name: str, args: JobEventsArgs, opts: Optional[pulumi.ResourceOptions] = None) -> None:
        super().__init__("cpb:index:JobEvents", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        dlq = aws.sqs.Queue(f"{name}-dlq", sqs_managed_sse_enabled=True,
                            message_retention_seconds=DLQ_RETENTION_SECONDS, opts=child)
        rule = aws.cloudwatch.EventRule(
            f"{name}-rule",
            description="Batch jobs of this stack that succeeded or failed -> the job-events Lambda",
            event_pattern=pulumi.Output.from_input(args.job_queue_arn).apply(
                lambda arn: json.dumps(job_state_change_pattern(arn))),
            opts=child)
        aws.sqs.QueuePolicy(
            f"{name}-dlq-policy", queue_url=dlq.id,
            policy=pulumi.Output.all(dlq.arn, rule.arn).apply(
                lambda a: json.dumps(dead_letter_queue_policy(a[0], a[1], args.partition))),
            opts=child)

        function_name = f"{args.name_prefix}-job-events"
        log_group, role = lambda_log_group_and_role(
            name, function_name, "Job-events Lambda: record job outcomes, resubmit out-of-memory jobs",
            args.partition, args.log_retention_days, child)
        policy = aws.iam.RolePolicy(
            f"{name}-role-policy", role=role.id,
            policy=pulumi.Output.all(args.job_queue_arn, args.job_definition_arn, args.bucket_arn, log_group.arn,
                                     dlq.arn).apply(
                lambda a: json.dumps(iam.events_policy(job_queue_arn=a[0], job_definition_arn=a[1], bucket_arn=a[2],
                                                       log_group_arn=a[3], dead_letter_queue_arn=a[4]))),
            opts=child)
        function = aws.lambda_.Function(
            f"{name}-function",
            name=function_name,
            description="Records Batch job outcomes under <output>/_cpb/events/ and resubmits out-of-memory jobs",
            role=role.arn,
            runtime=LAMBDA_RUNTIME,
            architectures=["x86_64"],
            handler=EVENTS_HANDLER,
            code=args.code,
            timeout=EVENTS_LAMBDA_TIMEOUT_SECONDS,
            memory_size=EVENTS_LAMBDA_MEMORY_MIB,
            logging_config={"log_format": "JSON", "log_group": log_group.name},
            environment={"variables": {
                "CPB_BUCKET": args.bucket_name,
                "CPB_JOB_QUEUE": args.job_queue_arn,
                "CPB_JOB_DEFINITION": args.job_definition_arn,
                "CPB_MAX_MEMORY_MIB": str(args.max_memory_mib),
                "CPB_OOM_MAX_RETRIES": str(args.oom_max_retries),
                "CPB_STACK": args.stack,
                "POWERTOOLS_SERVICE_NAME": "cpb-job-events",
                "POWERTOOLS_METRICS_NAMESPACE": METRICS_NAMESPACE,
            }},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[policy, log_group]))
        aws.lambda_.FunctionEventInvokeConfig(
            f"{name}-async",
            function_name=function.name,
            maximum_retry_attempts=ASYNC_MAX_RETRY_ATTEMPTS,
            maximum_event_age_in_seconds=ASYNC_MAX_EVENT_AGE_SECONDS,
            destination_config={"on_failure": {"destination": dlq.arn}},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[policy]))
        permission = aws.lambda_.Permission(
            f"{name}-invoke", action="lambda:InvokeFunction", function=function.name,
            principal=args.partition.service_principal("events"), source_arn=rule.arn, opts=child)
        aws.cloudwatch.EventTarget(
            f"{name}-target",
            rule=rule.name,
            arn=function.arn,
            retry_policy={"maximum_event_age_in_seconds": TARGET_MAX_EVENT_AGE_SECONDS,
                          "maximum_retry_attempts": TARGET_MAX_RETRY_ATTEMPTS},
            dead_letter_config={"arn": dlq.arn},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[permission]))
        aws.cloudwatch.MetricAlarm(
            f"{name}-dlq-alarm",
            alarm_description="Batch job events were not handled (out-of-memory retries may be missing): read them "
                              "in the job-events dead-letter queue",
            namespace="AWS/SQS", metric_name="ApproximateNumberOfMessagesVisible",
            dimensions={"QueueName": dlq.name},
            statistic="Maximum", period=300, evaluation_periods=1,
            threshold=0, comparison_operator="GreaterThanThreshold",
            treat_missing_data="notBreaching",
            alarm_actions=list(args.alarm_actions), ok_actions=list(args.alarm_actions),
            opts=child)

        self.function_name = function.name
        self.dead_letter_queue_name = dlq.name
        self.rule_name = rule.name
        self.register_outputs({"functionName": self.function_name, "deadLetterQueueName": self.dead_letter_queue_name,
                               "ruleName": self.rule_name})
