"""IAM policy documents, as pure functions of concrete ARNs.

Kept apart from the components so each document can be linted by a real IAM
linter in tests and reasoned about on its own: every statement names its
actions exactly and scopes them to this stack's ARNs; ``"Resource": "*"``
appears only for actions that have no resource-level permissions.
"""
from __future__ import annotations

from typing import Any, Sequence

Document = dict[str, Any]

# Batch's documented instance-role policy (ECS agent registration, image pulls); its ARN depends on
# the partition (components.partition.Partition.managed_policy_arn).
ECS_INSTANCE_ROLE_POLICY = "service-role/AmazonEC2ContainerServiceforEC2Role"

#: The tag every job of this stack carries (value: the Pulumi stack name), set by whoever submits it
#: (the ingress Lambda, the job-events Lambda, `cpb requeue`). TerminateJob is granted only on jobs
#: carrying it, so the ingress can roll back its own jobs and no one else's.
JOB_STACK_TAG = "cpb:stack"

#: Keys under an output's `_cpb/` that only the Lambdas (and `cpb requeue`) write: the submission
#: records exactly-once relies on, the output lease naming the current run, the job outcomes, and
#: why the ingress refused a message (`handlers.refusals`).
SUBMISSION_RECORDS = "*/_cpb/submission-*"
LEASE = "*/_cpb/lease.json"
JOB_EVENTS = "*/_cpb/events/*"
REFUSALS = "*/_cpb/refusal-*"
CONTROL_RECORDS = (SUBMISSION_RECORDS, LEASE, JOB_EVENTS, REFUSALS)
#: `cpb submit` stores local pipelines content-addressed (`pipelines/<sha256[:12]>/<name>`): jobs read
#: them, and a job rewriting one would change what every later run under that address computes.
PIPELINES = "pipelines/*"


def _doc(*statements: Document) -> Document:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def assume_role_policy(service: str) -> Document:
    """Trust policy letting one AWS service (e.g. ``ec2.amazonaws.com``) assume the role."""
    return _doc({"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"})


def log_stream_arn(log_group_arn: str) -> str:
    """ARN of every stream in a log group (Pulumi's LogGroup.arn has no ``:*`` suffix)."""
    return f"{log_group_arn.removesuffix(':*')}:log-stream:*"


def job_role_policy(bucket_arn: str) -> Document:
    """What the worker container may do: read the bucket, write and replace results in it, and
    never write the records other parts rely on (submission records, the lease, job events) nor the
    content-addressed pipelines. An explicit Deny wins over any Allow, so no later grant reopens them.

    Results cannot be narrowed further by IAM: a job's output prefix comes from its message, and
    S3's PutObject/DeleteObject have no condition key naming a key prefix (s3:prefix is ListBucket's).
    """
    return _doc(
        {"Sid": "ListDataBucket", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [bucket_arn]},
        {"Sid": "ReadWriteDataObjects", "Effect": "Allow",
         # DeleteObject: a retried job replaces its earlier, partial outputs (no mixed results).
         "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
         "Resource": [f"{bucket_arn}/*"]},
        {"Sid": "NeverWriteControlRecordsOrPipelines", "Effect": "Deny",
         "Action": ["s3:PutObject", "s3:DeleteObject"],
         "Resource": [f"{bucket_arn}/{pattern}" for pattern in CONTROL_RECORDS + (PIPELINES,)]},
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


def _batch_targets(job_queue_arns: Sequence[str], job_definition_arns: Sequence[str]) -> list[str]:
    return sorted(set(job_queue_arns) | {form for arn in job_definition_arns for form in job_definition_forms(arn)})


def ingress_policy(queue_arn: str, job_queue_arns: Sequence[str], job_definition_arns: Sequence[str],
                   bucket_arn: str, log_group_arn: str, stack: str) -> Document:
    """The ingress Lambda: consume its queue, submit/tag jobs on this stack's queue and
    definition only, terminate only this stack's jobs, read the bucket, write only its submission
    records, output leases and refusal records."""
    batch_targets = _batch_targets(job_queue_arns, job_definition_arns)
    return _doc(
        {"Sid": "ConsumeJobMessages", "Effect": "Allow",
         "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes",
                    "sqs:ChangeMessageVisibility"],
         "Resource": [queue_arn]},
        {"Sid": "SubmitJobs", "Effect": "Allow", "Action": ["batch:SubmitJob", "batch:TagResource"],
         "Resource": batch_targets + [batch_job_arn_pattern(job_queue_arns[0])]},
        # Redelivery checks find jobs already submitted by name, and a lease is replaced only once its
        # run's jobs have finished; ListJobs and DescribeJobs have no resource-level permissions.
        {"Sid": "FindSubmittedJobs", "Effect": "Allow", "Action": ["batch:ListJobs", "batch:DescribeJobs"],
         "Resource": ["*"]},
        # A list message is all-or-nothing: jobs of a half-submitted list are terminated again. Only
        # jobs tagged with this stack (every submitter tags them), never another stack's or anyone's.
        {"Sid": "RollBackPartialLists", "Effect": "Allow", "Action": ["batch:TerminateJob"],
         "Resource": [batch_job_arn_pattern(job_queue_arns[0])],
         "Condition": {"StringEquals": {f"aws:ResourceTag/{JOB_STACK_TAG}": stack}}},
        {"Sid": "ListDataBucket", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [bucket_arn]},
        {"Sid": "ReadPipelinesAndDataFiles", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": [f"{bucket_arn}/*"]},
        {"Sid": "WriteSubmissionRecordsAndLeases", "Effect": "Allow", "Action": ["s3:PutObject"],
         "Resource": [f"{bucket_arn}/{SUBMISSION_RECORDS}", f"{bucket_arn}/{LEASE}", f"{bucket_arn}/{REFUSALS}"]},
        {"Sid": "WriteOwnLogs", "Effect": "Allow", "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
         "Resource": [log_stream_arn(log_group_arn)]},
    )


def events_policy(job_queue_arn: str, job_definition_arn: str, bucket_arn: str, log_group_arn: str,
                  dead_letter_queue_arn: str) -> Document:
    """The job-events Lambda: read job details, resubmit out-of-memory jobs on this stack's queue and
    definition only, read and write only output leases and job-event records, park events it could
    not handle in its dead-letter queue."""
    return _doc(
        # DescribeJobs (a failed job's environment and memory) and ListJobs (a retry's deterministic
        # name, looked up before submitting) have no resource-level permissions.
        {"Sid": "ReadJobs", "Effect": "Allow", "Action": ["batch:DescribeJobs", "batch:ListJobs"],
         "Resource": ["*"]},
        # A retry reuses the failed job's definition, which may be an earlier revision of this stack's
        # (a `pulumi up` registers a new one while jobs of the old still run): every revision of it.
        {"Sid": "ResubmitOutOfMemoryJobs", "Effect": "Allow", "Action": ["batch:SubmitJob", "batch:TagResource"],
         "Resource": _batch_targets([job_queue_arn], [job_definition_arn])
         + [f"{job_definition_forms(job_definition_arn)[-1]}:*", batch_job_arn_pattern(job_queue_arn)]},
        # Without ListBucket, S3 answers a missing key with 403 instead of 404: a job of an output with
        # no lease (a run from before leases) must read as "no lease", not as "forbidden".
        {"Sid": "ListDataBucket", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [bucket_arn]},
        {"Sid": "ReadWriteLeasesAndJobEvents", "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"],
         "Resource": [f"{bucket_arn}/{LEASE}", f"{bucket_arn}/{JOB_EVENTS}"]},
        {"Sid": "ParkFailedEvents", "Effect": "Allow", "Action": ["sqs:SendMessage"],
         "Resource": [dead_letter_queue_arn]},
        {"Sid": "WriteOwnLogs", "Effect": "Allow", "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
         "Resource": [log_stream_arn(log_group_arn)]},
    )


def ecr_repository_arn(repository_url: str) -> str:
    """``<acct>.dkr.ecr.<region>.amazonaws.com/<name>`` -> the repository's ARN (partition from the region)."""
    from components.partition import partition_name

    host, _, name = repository_url.partition("/")
    account, _, rest = host.partition(".dkr.ecr.")
    region = rest.split(".amazonaws.com")[0]
    return f"arn:{partition_name(region)}:ecr:{region}:{account}:repository/{name}"
