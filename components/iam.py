"""IAM policy documents, as pure functions of concrete ARNs.

Kept apart from the components so each document can be linted by a real IAM
linter in tests and reasoned about on its own: every statement names its
actions exactly and scopes them to this stack's ARNs; ``"Resource": "*"``
appears only for actions that have no resource-level permissions.
"""
from __future__ import annotations

from typing import Any, Sequence

Document = dict[str, Any]

# Batch's documented instance-role policy (ECS agent registration, image pulls).
ECS_INSTANCE_ROLE_POLICY_ARN = "arn:aws:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role"


def _doc(*statements: Document) -> Document:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def assume_role_policy(service: str) -> Document:
    """Trust policy letting one AWS service (e.g. ``ec2.amazonaws.com``) assume the role."""
    return _doc({"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"})


def log_stream_arn(log_group_arn: str) -> str:
    """ARN of every stream in a log group (Pulumi's LogGroup.arn has no ``:*`` suffix)."""
    return f"{log_group_arn.removesuffix(':*')}:log-stream:*"


def job_role_policy(bucket_arn: str) -> Document:
    """What the worker container may do: read inputs and write results in this bucket only."""
    return _doc(
        {"Sid": "ListDataBucket", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [bucket_arn]},
        {"Sid": "ReadWriteDataObjects", "Effect": "Allow",
         # DeleteObject: a retried job replaces its earlier, partial outputs (no mixed results).
         "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
         "Resource": [f"{bucket_arn}/*"]},
    )


def execution_role_policy(repository_arn: str, log_group_arn: str) -> Document:
    """What the ECS agent needs for a job: pull our image, write our log group."""
    return _doc(
        # GetAuthorizationToken has no resource-level permissions: "*" is the only valid resource.
        {"Sid": "EcrLogin", "Effect": "Allow", "Action": ["ecr:GetAuthorizationToken"], "Resource": ["*"]},
        {"Sid": "PullWorkerImage", "Effect": "Allow",
         "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
         "Resource": [repository_arn]},
        {"Sid": "WriteJobLogs", "Effect": "Allow", "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
         "Resource": [log_stream_arn(log_group_arn)]},
    )


def batch_job_arn_pattern(job_queue_arn: str) -> str:
    """ARN pattern of jobs in the queue's account and region (``.../job/*``)."""
    prefix, _, _ = job_queue_arn.partition(":job-queue/")
    return f"{prefix}:job/*"


def job_definition_forms(arn: str) -> list[str]:
    """A job definition ARN with and without its revision.

    IAM's action catalog authorizes SubmitJob against ``job-definition/<name>``
    while requests name ``job-definition/<name>:<revision>``; listing both
    keeps the grant to exactly this definition whichever form is evaluated.
    """
    base, _, revision = arn.rpartition(":")
    return [arn, base] if revision.isdigit() and ":job-definition/" in base else [arn]


def ingress_policy(queue_arn: str, job_queue_arns: Sequence[str], job_definition_arns: Sequence[str],
                   bucket_arn: str, log_group_arn: str) -> Document:
    """The ingress Lambda: consume its queue, submit/tag jobs on this stack's queue and
    definition only, read the bucket, write only its own submission records."""
    batch_targets = sorted(set(job_queue_arns) | {form for arn in job_definition_arns
                                                  for form in job_definition_forms(arn)})
    return _doc(
        {"Sid": "ConsumeJobMessages", "Effect": "Allow",
         "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes",
                    "sqs:ChangeMessageVisibility"],
         "Resource": [queue_arn]},
        {"Sid": "SubmitJobs", "Effect": "Allow", "Action": ["batch:SubmitJob", "batch:TagResource"],
         "Resource": batch_targets + [batch_job_arn_pattern(job_queue_arns[0])]},
        # Redelivery checks find jobs already submitted by name; ListJobs has no resource-level permissions.
        {"Sid": "FindSubmittedJobs", "Effect": "Allow", "Action": ["batch:ListJobs"], "Resource": ["*"]},
        # A list message is all-or-nothing: jobs of a half-submitted list are terminated again.
        {"Sid": "RollBackPartialLists", "Effect": "Allow", "Action": ["batch:TerminateJob"],
         "Resource": [batch_job_arn_pattern(job_queue_arns[0])]},
        {"Sid": "ListDataBucket", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [bucket_arn]},
        {"Sid": "ReadPipelinesAndDataFiles", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": [f"{bucket_arn}/*"]},
        {"Sid": "WriteSubmissionRecords", "Effect": "Allow", "Action": ["s3:PutObject"],
         "Resource": [f"{bucket_arn}/*/_cpb/submission-*"]},
        {"Sid": "WriteOwnLogs", "Effect": "Allow", "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
         "Resource": [log_stream_arn(log_group_arn)]},
    )


def ecr_repository_arn(repository_url: str) -> str:
    """``<acct>.dkr.ecr.<region>.amazonaws.com/<name>`` -> the repository's ARN."""
    host, _, name = repository_url.partition("/")
    account, _, rest = host.partition(".dkr.ecr.")
    region = rest.split(".amazonaws.com")[0]
    partition = "aws-cn" if rest.endswith(".com.cn") else "aws"
    return f"arn:{partition}:ecr:{region}:{account}:repository/{name}"
