"""AWS on 127.0.0.1: moto's server plus the resources the Pulumi stack creates.

`create_stack` creates what a stack deployed with the same settings has, where it makes sense
locally: the data bucket (private, encrypted), the job queue with the same attributes (visibility =
6 x the Lambda timeout, retention, redrive to the dead-letter queue after `maxReceiveCount`
receives) and its DLQ (14 days, redrive allowed from the queue only), the job-events DLQ, the
CloudWatch log groups (with retention), the Batch job queue and the job definition with the stack's
own body (`components.jobdef`: resources, retries, timeout, log configuration), and the limits the
Lambdas enforce. Physical names follow the stack's (`cpb-<stack>-jobs`, `cpb-<stack>-worker`,
`/aws/batch/cpb-<stack>`, `/aws/lambda/cpb-<stack>-ingress`); resources Pulumi auto-names
(`cpb-storage-data-1a2b3c4`) get the stack name in place of the random suffix.

Not created, because nothing local would use them: network, FSx (jobs read S3; the job definition
has no /fsx mount and there is no `fileSystemId` output), ECR (the worker runs from this checkout,
`imageUri` names the base image), IAM beyond Batch's service role, the TLS-only queue policies
(the endpoint is plain http on 127.0.0.1), alarms, and the Lambda functions and event source
mapping themselves (`cpb.local.lambdas` / `cpb.local.mapping` play them: a mapping registered in
moto would make moto invoke the function itself, in Docker).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import boto3

from cpb.local.settings import LocalSettings, stack_config  # (puts the repository on sys.path if needed)
from cpb.local.state import TEST_CREDENTIALS
from components import jobdef  # the stack's own job-definition body

REGION = "us-east-1"
ACCOUNT = "123456789012"
# Credentials moto accepts; never real ones (the emulator must not reach AWS).
FAKE_CREDENTIALS = dict(TEST_CREDENTIALS)
WORKER_IMAGE = "cellprofiler/cellprofiler:4.2.8"
# A user's AWS profile settings must neither break nor redirect calls meant for the emulator.
NO_PROFILE: dict = {"AWS_PROFILE": None, "AWS_DEFAULT_PROFILE": None, "AWS_CONFIG_FILE": os.devnull,
                    "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
# As components/ingress.py sets them (tests/test_local_parity.py compares with the Pulumi program).
QUEUE_RETENTION_SECONDS = 4 * 24 * 3600
DLQ_RETENTION_SECONDS = 14 * 24 * 3600
BATCHING_WINDOW_SECONDS = 1


def name_prefix(stack: str) -> str:
    """Physical-name prefix, as components/stack.py names a stack's resources (`cpb-<stack>`)."""
    import re
    cleaned = re.sub(r"[^a-z0-9-]+", "-", stack.lower()).strip("-")[:40] or "default"
    return f"cpb-{cleaned}"


@dataclass(frozen=True)
class EmulatedStack:
    """The emulated stack: its outputs (same meaning as the Pulumi outputs) and what the local
    Lambdas and Batch need to play their parts."""

    endpoint: str
    region: str
    bucket: str
    queue_url: str
    dlq_url: str
    job_queue_arn: str
    job_definition_arn: str
    log_group: str
    stack: str = "local"
    image_uri: str = WORKER_IMAGE
    ingress_function: str = "cpb-local-ingress"
    events_function: str = "cpb-local-job-events"
    events_dlq_url: str = ""
    limits: dict = field(default_factory=dict)
    lambda_timeout_seconds: int = 60
    lambda_memory_mib: int = 256
    batch_size: int = 10
    max_receive_count: int = 5
    visibility_timeout_seconds: int = 360
    oom_max_retries: int = 2

    def outputs(self) -> dict[str, Any]:
        """What `pulumi stack output --json` prints for a deployed stack (docs/CONTRACTS.md)."""
        return {"bucketName": self.bucket, "queueUrl": self.queue_url, "deadLetterQueueUrl": self.dlq_url,
                "jobQueueArn": self.job_queue_arn, "jobDefinitionArn": self.job_definition_arn,
                "imageUri": self.image_uri, "logGroupName": self.log_group, "region": self.region,
                "jobLimits": dict(self.limits)}

    def aws_env(self) -> dict[str, str]:
        """Environment pointing boto3 (ours, the worker's, the AWS CLI) at the emulator only."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": self.region,
                "AWS_REGION": self.region, **FAKE_CREDENTIALS}

    def isolation_env(self) -> dict[str, Optional[str]]:
        """aws_env plus the removal of a user's profile settings, which could
        otherwise fail (unknown profile) or redirect calls away from the emulator."""
        return {**self.aws_env(), **NO_PROFILE}

    def client_env(self) -> dict[str, str]:
        """`CPB_*` variables `cpb` reads when there is no Pulumi CLI."""
        return {"CPB_BUCKET": self.bucket, "CPB_QUEUE_URL": self.queue_url, "CPB_DLQ_URL": self.dlq_url,
                "CPB_JOB_QUEUE": self.job_queue_arn, "CPB_JOB_DEFINITION": self.job_definition_arn,
                "CPB_REGION": self.region, "CPB_LOG_GROUP": self.log_group}

    def lambda_env(self) -> dict[str, str]:
        """The environment the stack gives its Lambdas (ingress and job events; the same process runs
        both, so one environment holds the two, whose shared keys have the same values)."""
        limits = self.limits
        return {"CPB_BUCKET": self.bucket, "CPB_JOB_QUEUE": self.job_queue_arn,
                "CPB_JOB_DEFINITION": self.job_definition_arn,
                "CPB_ALLOWED_ARNS": ",".join(limits.get("allowedArns", [])),
                "CPB_MAX_VCPU": str(limits["maxVcpu"]), "CPB_MAX_MEMORY_MIB": str(limits["maxMemoryMib"]),
                "CPB_DEFAULT_VCPU": str(limits["defaultVcpu"]),
                "CPB_DEFAULT_MEMORY_MIB": str(limits["defaultMemoryMib"]),
                "CPB_OOM_MAX_RETRIES": str(self.oom_max_retries), "CPB_STACK": self.stack}


@contextlib.contextmanager
def moto_server(port: int = 0) -> Iterator[str]:
    """Run moto's server on 127.0.0.1 (`port` 0: a free one); yield its URL; always stop it.

    The server is reset on start (moto's state is per process) and Batch is
    switched to its no-Docker mode through moto's own config API.
    """
    from moto.server import ThreadedMotoServer

    if port:  # moto's threaded server waits forever for a port it cannot bind: find out first
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))  # OSError (EADDRINUSE) when taken
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on the terminal
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        host, bound = server.get_host_and_port()
        url = f"http://{host}:{bound}"
        _post(f"{url}/moto-api/reset", b"")
        _post(f"{url}/moto-api/config", json.dumps({"batch": {"use_docker": False}}).encode())
        yield url
    finally:
        server.stop()


def _post(url: str, body: bytes) -> None:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 - 127.0.0.1 only
        answer.read()


def session_for(endpoint: str, region: str) -> Any:
    """A boto3 session that can only reach the emulator (test credentials, no profile)."""
    return boto3.session.Session(region_name=region, **{k.lower(): v for k, v in FAKE_CREDENTIALS.items()})


def create_stack(endpoint: str, settings: Optional[LocalSettings] = None) -> EmulatedStack:
    """Create the stack's resources in the emulator at `endpoint` (see the module docstring)."""
    settings = settings or LocalSettings()
    with environment(NO_PROFILE):
        return _create_stack(endpoint, settings)


def _create_stack(endpoint: str, settings: LocalSettings) -> EmulatedStack:
    cfg, region, stack = settings.config, settings.region, settings.stack
    prefix = name_prefix(stack)
    session = session_for(endpoint, region)

    def client(service: str) -> Any:
        return session.client(service, endpoint_url=endpoint)

    s3, sqs, batch, iam, logs = (client(s) for s in ("s3", "sqs", "batch", "iam", "logs"))
    bucket = f"cpb-storage-data-{stack}".lower()
    if region == "us-east-1":
        s3.create_bucket(Bucket=bucket)
    else:
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True})
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    if cfg.bucket_versioning:
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})

    def queue(name: str, attributes: dict[str, str]) -> tuple[str, str]:
        url = sqs.create_queue(QueueName=name, Attributes={"SqsManagedSseEnabled": "true", **attributes})["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        return url, arn

    dlq_url, dlq_arn = queue(f"cpb-ingress-dlq-{stack}", {"MessageRetentionPeriod": str(DLQ_RETENTION_SECONDS)})
    queue_url, queue_arn = queue(f"cpb-ingress-queue-{stack}", {
        "VisibilityTimeout": str(cfg.queue_visibility_timeout_seconds),
        "MessageRetentionPeriod": str(QUEUE_RETENTION_SECONDS),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": cfg.max_receive_count})})
    sqs.set_queue_attributes(QueueUrl=dlq_url, Attributes={"RedriveAllowPolicy": json.dumps(
        {"redrivePermission": "byQueue", "sourceQueueArns": [queue_arn]})})
    events_dlq_url, _ = queue(f"cpb-job-events-dlq-{stack}", {"MessageRetentionPeriod": str(DLQ_RETENTION_SECONDS)})

    log_group = f"/aws/batch/{prefix}"
    ingress_function, events_function = f"{prefix}-ingress", f"{prefix}-job-events"
    for group in (log_group, f"/aws/lambda/{ingress_function}", f"/aws/lambda/{events_function}"):
        logs.create_log_group(logGroupName=group)
        logs.put_retention_policy(logGroupName=group, retentionInDays=cfg.log_retention_days)

    role = iam.create_role(RoleName=f"{prefix}-batch-service", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                "Principal": {"Service": "batch.amazonaws.com"}}]}))["Role"]["Arn"]
    compute = batch.create_compute_environment(
        computeEnvironmentName=f"{prefix}-local", type="UNMANAGED", state="ENABLED", serviceRole=role)
    job_queue = batch.create_job_queue(jobQueueName=f"{prefix}-jobs", state="ENABLED", priority=1,
                                       computeEnvironmentOrder=[{"order": 1, "computeEnvironment":
                                                                 compute["computeEnvironmentArn"]}])
    image_uri = f"cellprofiler/cellprofiler:{cfg.cellprofiler_image_tag}"
    props = jobdef.container_properties(image_uri=image_uri, vcpus=cfg.job_vcpus, memory_mib=cfg.job_memory_mib,
                                        job_role_arn=role, execution_role_arn=role, log_group_name=log_group,
                                        region=region, fsx_mount_path=None)
    definition = batch.register_job_definition(jobDefinitionName=f"{prefix}-worker", type="container",
                                               containerProperties=props,
                                               retryStrategy=jobdef.retry_strategy(cfg.job_retry_attempts),
                                               timeout=jobdef.timeout(cfg.job_timeout_seconds))
    limits = {"maxVcpu": cfg.job_max_vcpus, "maxMemoryMib": cfg.job_max_memory_mib,
              "defaultVcpu": cfg.job_vcpus, "defaultMemoryMib": cfg.job_memory_mib,
              "allowedArns": list(cfg.allowed_job_arns)}
    return EmulatedStack(
        endpoint=endpoint, region=region, bucket=bucket, queue_url=queue_url, dlq_url=dlq_url,
        job_queue_arn=job_queue["jobQueueArn"], job_definition_arn=definition["jobDefinitionArn"],
        log_group=log_group, stack=stack, image_uri=image_uri, ingress_function=ingress_function,
        events_function=events_function, events_dlq_url=events_dlq_url, limits=limits,
        lambda_timeout_seconds=cfg.lambda_timeout_seconds,
        lambda_memory_mib=settings.value("lambda_memory_mib", 256), batch_size=cfg.queue_batch_size,
        max_receive_count=cfg.max_receive_count, visibility_timeout_seconds=cfg.queue_visibility_timeout_seconds,
        oom_max_retries=settings.value("oom_max_retries", 2))


@contextlib.contextmanager
def environment(values: dict[str, Optional[str]]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for a block; restore them after.

    The Lambda handler and boto3 read `os.environ`; the demo must leave the
    caller's environment as it found it.
    """
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


__all__ = ["ACCOUNT", "EmulatedStack", "FAKE_CREDENTIALS", "NO_PROFILE", "REGION", "WORKER_IMAGE", "create_stack",
           "environment", "moto_server", "name_prefix", "session_for", "stack_config"]
