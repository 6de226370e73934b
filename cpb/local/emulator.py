"""AWS on 127.0.0.1: moto's server plus the resources the Pulumi stack creates.

The demo and the end-to-end tests need the same bucket, queues and Batch
objects a deployed stack has, with the same names and the stack's own job
definition body (`components.jobdef`), so the Lambda handler, the worker and
`cpb` run unchanged against it. Batch runs in moto's no-Docker mode: it only
records jobs; `cpb.local.batch` executes them.
"""
from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from dataclasses import dataclass
from typing import Iterator, Optional

import sys
from pathlib import Path

import boto3

try:  # the stack's own job-definition body; `components` is the Pulumi program, not an installed package
    from components import jobdef
except ImportError:  # `cpb demo` started from outside the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from components import jobdef

REGION = "us-east-1"
# Credentials moto accepts; never real ones (the emulator must not reach AWS).
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_SESSION_TOKEN": "testing"}
WORKER_IMAGE = "cellprofiler/cellprofiler:4.2.8"
# A user's AWS profile settings must neither break nor redirect calls meant for the emulator.
NO_PROFILE: dict = {"AWS_PROFILE": None, "AWS_DEFAULT_PROFILE": None, "AWS_CONFIG_FILE": os.devnull,
                    "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@dataclass(frozen=True)
class EmulatedStack:
    """The emulated stack's outputs (same meaning as the Pulumi outputs)."""

    endpoint: str
    region: str
    bucket: str
    queue_url: str
    dlq_url: str
    job_queue_arn: str
    job_definition_arn: str
    log_group: str

    def aws_env(self) -> dict[str, str]:
        """Environment pointing boto3 (ours, the worker's) at the emulator only."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": self.region,
                "AWS_REGION": self.region, **FAKE_CREDENTIALS}

    def isolation_env(self) -> dict[str, Optional[str]]:
        """aws_env plus the removal of a user's profile settings, which could
        otherwise fail (unknown profile) or redirect calls away from the emulator."""
        return {**self.aws_env(), **NO_PROFILE}

    def client_env(self) -> dict[str, str]:
        """`CPB_*` variables `cpb` reads when there is no Pulumi CLI."""
        return {"CPB_BUCKET": self.bucket, "CPB_QUEUE_URL": self.queue_url, "CPB_DLQ_URL": self.dlq_url,
                "CPB_JOB_QUEUE": self.job_queue_arn, "CPB_REGION": self.region, "CPB_LOG_GROUP": self.log_group}

    def lambda_env(self) -> dict[str, str]:
        """The Lambda environment JobIngress sets (docs/CONTRACTS.md)."""
        return {"CPB_BUCKET": self.bucket, "CPB_JOB_QUEUE": self.job_queue_arn,
                "CPB_JOB_DEFINITION": self.job_definition_arn, "CPB_MAX_VCPU": "4",
                "CPB_MAX_MEMORY_MIB": "8192", "CPB_DEFAULT_VCPU": "1", "CPB_DEFAULT_MEMORY_MIB": "2048"}


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Run moto's server on a free 127.0.0.1 port; yield its URL; always stop it.

    The server is reset on start (moto's state is per process) and Batch is
    switched to its no-Docker mode through moto's own config API.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
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


def create_stack(endpoint: str, name: str = "cpb-demo", region: str = REGION) -> EmulatedStack:
    """Create bucket, queue + DLQ, log group and Batch queue/definition like the stack."""
    with environment(NO_PROFILE):
        return _create_stack(endpoint, name, region)


def _create_stack(endpoint: str, name: str, region: str) -> EmulatedStack:
    session = boto3.session.Session(region_name=region, aws_access_key_id="testing",
                                    aws_secret_access_key="testing", aws_session_token="testing")

    def client(service: str):
        return session.client(service, endpoint_url=endpoint)

    s3, sqs, batch, iam, logs = (client(s) for s in ("s3", "sqs", "batch", "iam", "logs"))
    bucket = f"{name}-data"
    s3.create_bucket(Bucket=bucket)
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True})
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    dlq_url = sqs.create_queue(QueueName=f"{name}-jobs-dlq", Attributes={"SqsManagedSseEnabled": "true"})["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(QueueName=f"{name}-jobs", Attributes={
        "SqsManagedSseEnabled": "true", "VisibilityTimeout": "60",
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "3"})})["QueueUrl"]
    log_group = f"/cpb/{name}/jobs"
    logs.create_log_group(logGroupName=log_group)
    role = iam.create_role(RoleName=f"{name}-batch-service", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                "Principal": {"Service": "batch.amazonaws.com"}}]}))["Role"]["Arn"]
    environment = batch.create_compute_environment(
        computeEnvironmentName=f"{name}-local", type="UNMANAGED", state="ENABLED", serviceRole=role)
    job_queue = batch.create_job_queue(jobQueueName=f"{name}-jobs", state="ENABLED", priority=1,
                                       computeEnvironmentOrder=[{"order": 1, "computeEnvironment":
                                                                 environment["computeEnvironmentArn"]}])
    props = jobdef.container_properties(image_uri=WORKER_IMAGE, vcpus=1, memory_mib=2048, job_role_arn=role,
                                        execution_role_arn=role, log_group_name=log_group, region=region,
                                        fsx_mount_path=None)
    definition = batch.register_job_definition(jobDefinitionName=f"{name}-worker", type="container",
                                               containerProperties=props,
                                               retryStrategy=jobdef.retry_strategy(2),
                                               timeout=jobdef.timeout(3600))
    return EmulatedStack(endpoint=endpoint, region=region, bucket=bucket, queue_url=queue_url, dlq_url=dlq_url,
                         job_queue_arn=job_queue["jobQueueArn"], job_definition_arn=definition["jobDefinitionArn"],
                         log_group=log_group)


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
