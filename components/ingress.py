"""JobIngress: SQS queue (+ dead-letter queue) -> Lambda -> AWS Batch.

The Lambda (``handlers.ingress.handler``) gets only what it needs: consume its
own queue, submit/tag jobs on this stack's job queue and definition, terminate
only jobs tagged with this stack, read the bucket and write its submission
records and output leases. Messages the Lambda reports as failed are retried
and then parked in the DLQ; an alarm fires on any message there. Its code is
the stack's one Lambda archive (components.lambda_asset), dependencies included.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import pulumi
import pulumi_aws as aws

from components import iam
from components.lambda_asset import LAMBDA_PYTHON
from components.partition import Partition

LAMBDA_RUNTIME = f"python{LAMBDA_PYTHON}"
LAMBDA_HANDLER = "handlers.ingress.handler"
DLQ_RETENTION_SECONDS = 14 * 24 * 3600  # the SQS maximum: time to look at what failed


@dataclass
class JobIngressArgs:
    """Where jobs go, and the limits the Lambda enforces (docs/CONTRACTS.md, Lambda environment)."""

    name_prefix: str
    stack: str  # the Pulumi stack: CPB_STACK, and the value of the job tag TerminateJob requires
    partition: Partition
    code: pulumi.Archive  # components.lambda_asset.lambda_code
    memory_mib: int
    bucket_name: pulumi.Input[str]
    bucket_arn: pulumi.Input[str]
    job_queue_arn: pulumi.Input[str]
    job_definition_arn: pulumi.Input[str]
    allowed_job_arns: Sequence[str]
    max_vcpus: int
    max_memory_mib: int
    default_vcpus: int
    default_memory_mib: int
    lambda_timeout_seconds: int
    visibility_timeout_seconds: int
    batch_size: int
    max_receive_count: int
    log_retention_days: int
    alarm_email: str = ""


def lambda_log_group_and_role(name: str, function_name: str, role_description: str, partition: Partition,
                              retention_days: int, opts: pulumi.ResourceOptions) -> tuple[Any, Any]:
    """A Lambda's own log group (`/aws/lambda/<function_name>`, with retention) and its execution role
    (assumable by Lambda only); the caller attaches the role's policy. Shared by JobIngress and JobEvents."""
    log_group = aws.cloudwatch.LogGroup(f"{name}-logs", name=f"/aws/lambda/{function_name}",
                                        retention_in_days=retention_days, opts=opts)
    role = aws.iam.Role(
        f"{name}-role", description=role_description,
        assume_role_policy=json.dumps(iam.assume_role_policy(partition.service_principal("lambda"))),
        opts=opts)
    return log_group, role


def tls_only_queue_policy(queue_arn: str) -> dict[str, Any]:
    """Queue policy refusing any request not made over TLS."""
    return {"Version": "2012-10-17", "Statement": [{
        "Sid": "DenyInsecureTransport", "Effect": "Deny", "Principal": "*", "Action": "sqs:*",
        "Resource": queue_arn, "Condition": {"Bool": {"aws:SecureTransport": "false"}}}]}


def alarm_topic_key_policy(any_arn_in_account: str) -> dict[str, Any]:
    """KMS key policy for the alarm topic: the account administers the key through IAM, and CloudWatch
    alarms may encrypt what they publish (kms:GenerateDataKey*/Decrypt), which alias/aws/sns never allows."""
    partition, account = any_arn_in_account.split(":")[1], any_arn_in_account.split(":")[4]
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "AccountAdministersKeyThroughIam", "Effect": "Allow",
         "Principal": {"AWS": f"arn:{partition}:iam::{account}:root"}, "Action": "kms:*", "Resource": "*"},
        {"Sid": "CloudWatchAlarmsPublishToTopic", "Effect": "Allow",
         "Principal": {"Service": "cloudwatch.amazonaws.com"},
         "Action": ["kms:Decrypt", "kms:GenerateDataKey*"], "Resource": "*"},
    ]}


class JobIngress(pulumi.ComponentResource):
    """Queue, dead-letter queue, Lambda, event source mapping and DLQ alarm."""

    queue_url: pulumi.Output[str]
    queue_arn: pulumi.Output[str]
    queue_name: pulumi.Output[str]
    dead_letter_queue_url: pulumi.Output[str]
    dead_letter_queue_name: pulumi.Output[str]
    function_name: pulumi.Output[str]
    alarm_actions: list[pulumi.Output[str]]

    def __init__(self, name: str, args: JobIngressArgs, opts: Optional[pulumi.ResourceOptions] = None) -> None:
        super().__init__("cpb:index:JobIngress", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        dlq = aws.sqs.Queue(f"{name}-dlq", sqs_managed_sse_enabled=True,
                            message_retention_seconds=DLQ_RETENTION_SECONDS, opts=child)
        queue = aws.sqs.Queue(
            f"{name}-queue",
            sqs_managed_sse_enabled=True,
            visibility_timeout_seconds=args.visibility_timeout_seconds,
            message_retention_seconds=4 * 24 * 3600,
            redrive_policy=dlq.arn.apply(lambda arn: json.dumps(
                {"deadLetterTargetArn": arn, "maxReceiveCount": args.max_receive_count})),
            opts=child)
        aws.sqs.RedriveAllowPolicy(
            f"{name}-dlq-redrive-allow", queue_url=dlq.id,
            redrive_allow_policy=queue.arn.apply(lambda arn: json.dumps(
                {"redrivePermission": "byQueue", "sourceQueueArns": [arn]})),
            opts=child)
        for label, target in (("queue", queue), ("dlq", dlq)):
            aws.sqs.QueuePolicy(f"{name}-{label}-tls-only", queue_url=target.id,
                                policy=target.arn.apply(lambda arn: json.dumps(tls_only_queue_policy(arn))),
                                opts=child)

        function_name = f"{args.name_prefix}-ingress"
        log_group, role = lambda_log_group_and_role(
            name, function_name, "Ingress Lambda: submit this stack's Batch jobs from its queue", args.partition,
            args.log_retention_days, child)
        allowed = list(args.allowed_job_arns)
        policy = aws.iam.RolePolicy(
            f"{name}-role-policy", role=role.id,
            policy=pulumi.Output.all(queue.arn, args.job_queue_arn, args.job_definition_arn, args.bucket_arn,
                                     log_group.arn).apply(
                lambda a: json.dumps(iam.ingress_policy(
                    queue_arn=a[0],
                    job_queue_arns=[a[1]] + [x for x in allowed if ":job-queue/" in x],
                    job_definition_arns=[a[2]] + [x for x in allowed if ":job-definition/" in x],
                    bucket_arn=a[3], log_group_arn=a[4], stack=args.stack))),
            opts=child)

        function = aws.lambda_.Function(
            f"{name}-function",
            name=function_name,
            description="Validates job messages and submits AWS Batch jobs exactly once",
            role=role.arn,
            runtime=LAMBDA_RUNTIME,
            architectures=["x86_64"],
            handler=LAMBDA_HANDLER,
            code=args.code,
            timeout=args.lambda_timeout_seconds,
            memory_size=args.memory_mib,
            logging_config={"log_format": "JSON", "log_group": log_group.name},
            environment={"variables": {
                "CPB_BUCKET": args.bucket_name,
                "CPB_JOB_QUEUE": args.job_queue_arn,
                "CPB_JOB_DEFINITION": args.job_definition_arn,
                "CPB_ALLOWED_ARNS": ",".join(allowed),
                "CPB_MAX_VCPU": str(args.max_vcpus),
                "CPB_MAX_MEMORY_MIB": str(args.max_memory_mib),
                "CPB_DEFAULT_VCPU": str(args.default_vcpus),
                "CPB_DEFAULT_MEMORY_MIB": str(args.default_memory_mib),
                "CPB_STACK": args.stack,
                "POWERTOOLS_SERVICE_NAME": "cpb-ingress",
            }},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[policy, log_group]))
        aws.lambda_.EventSourceMapping(
            f"{name}-trigger",
            event_source_arn=queue.arn,
            function_name=function.arn,
            batch_size=args.batch_size,
            maximum_batching_window_in_seconds=1,
            function_response_types=["ReportBatchItemFailures"],  # only failed messages are retried
            opts=child)

        alarm_actions: list[pulumi.Input[str]] = []
        if args.alarm_email:
            # CloudWatch cannot use the AWS-managed alias/aws/sns key (its policy cannot be edited to let
            # CloudWatch encrypt), so alarms on a topic encrypted with it never notify anyone.
            key = aws.kms.Key(
                f"{name}-alarms-key", description="Encrypts the DLQ alarm topic; CloudWatch alarms may use it",
                enable_key_rotation=True, deletion_window_in_days=7,
                policy=dlq.arn.apply(lambda arn: json.dumps(alarm_topic_key_policy(arn))),
                opts=child)
            topic = aws.sns.Topic(f"{name}-alarms", kms_master_key_id=key.arn, opts=child)
            aws.sns.TopicSubscription(f"{name}-alarms-email", topic=topic.arn, protocol="email",
                                      endpoint=args.alarm_email, opts=child)
            alarm_actions.append(topic.arn)
        aws.cloudwatch.MetricAlarm(
            f"{name}-dlq-alarm",
            alarm_description="Job messages failed validation or submission: read them in the dead-letter queue",
            namespace="AWS/SQS", metric_name="ApproximateNumberOfMessagesVisible",
            dimensions={"QueueName": dlq.name},
            statistic="Maximum", period=300, evaluation_periods=1,
            threshold=0, comparison_operator="GreaterThanThreshold",
            treat_missing_data="notBreaching",
            alarm_actions=alarm_actions, ok_actions=alarm_actions,
            opts=child)

        self.queue_url = queue.url
        self.queue_arn = queue.arn
        self.queue_name = queue.name
        self.dead_letter_queue_url = dlq.url
        self.dead_letter_queue_name = dlq.name
        self.function_name = function.name
        self.alarm_actions = alarm_actions  # the DLQ alarm's topic (empty without alarmEmail), for other alarms
        self.register_outputs({"queueUrl": self.queue_url, "deadLetterQueueUrl": self.dead_letter_queue_url,
                               "functionName": self.function_name})
