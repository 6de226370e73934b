"""BatchCompute: where and how worker jobs run.

Roles (instance, execution, job — the job role reaches only the data bucket),
a launch template (IMDSv2 only, encrypted root volume, /fsx mounted at boot
when FSx is on), spot compute first with on-demand fallback (both scale to 0),
one job queue ordering them, the log group, and the job definition.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import pulumi
import pulumi_aws as aws

from components import iam, jobdef
from components.partition import Partition
from components.userdata import lustre_user_data_base64

ROOT_VOLUME_GIB = 100  # CellProfiler image (~3 GB) + inputs staged from S3 when FSx is off
ROOT_DEVICE = "/dev/xvda"  # ECS-optimized Amazon Linux 2023
# A job no instance type can ever place would sit RUNNABLE forever: cancel it after this long.
UNPLACEABLE_JOB_TIMEOUT_SECONDS = 1800


@dataclass
class FsxMount:
    """Where the hosts mount FSx for Lustre."""

    dns_name: pulumi.Input[str]
    mount_name: pulumi.Input[str]
    mount_path: str = "/fsx"


@dataclass
class BatchComputeArgs:
    """Everything BatchCompute consumes from config, network, storage and image."""

    name_prefix: str  # physical-name prefix, unique per stack (Batch names are per account+region)
    region: str
    partition: Partition
    bucket_arn: pulumi.Input[str]
    subnet_ids: pulumi.Input[Sequence[str]]
    security_group_id: pulumi.Input[str]
    image_uri: pulumi.Input[str]
    repository_arn: pulumi.Input[str]
    instance_types: Sequence[str]
    spot: bool
    min_vcpus: int
    max_vcpus: int
    job_vcpus: int
    job_memory_mib: int
    job_timeout_seconds: int
    job_retry_attempts: int
    log_retention_days: int
    fsx: Optional[FsxMount] = None
    instance_tags: dict[str, str] = field(default_factory=dict)  # Batch copies these onto its instances


def _role(name: str, service: str, description: str, parent: pulumi.Resource) -> aws.iam.Role:
    """A role one service principal (``service``, e.g. ``ecs-tasks.amazonaws.com``) may assume."""
    return aws.iam.Role(
        name, description=description,
        assume_role_policy=json.dumps(iam.assume_role_policy(service)),
        opts=pulumi.ResourceOptions(parent=parent))


class BatchCompute(pulumi.ComponentResource):
    """Compute environments, job queue and job definition for the CellProfiler worker."""

    job_queue_arn: pulumi.Output[str]
    job_definition_arn: pulumi.Output[str]
    log_group_name: pulumi.Output[str]

    def __init__(self, name: str, args: BatchComputeArgs, opts: Optional[pulumi.ResourceOptions] = None) -> None:
        super().__init__("cpb:index:BatchCompute", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        principal = args.partition.service_principal
        instance_role = _role(f"{name}-instance-role", principal("ec2"),
                              "Batch hosts: ECS agent registration (AWS-managed Batch instance policy)", self)
        aws.iam.RolePolicyAttachment(f"{name}-instance-role-ecs", role=instance_role.name,
                                     policy_arn=args.partition.managed_policy_arn(iam.ECS_INSTANCE_ROLE_POLICY),
                                     opts=child)
        instance_profile = aws.iam.InstanceProfile(f"{name}-instance-profile", role=instance_role.name, opts=child)

        log_group = aws.cloudwatch.LogGroup(
            f"{name}-jobs-logs", name=f"/aws/batch/{args.name_prefix}",
            retention_in_days=args.log_retention_days, opts=child)

        execution_role = _role(f"{name}-execution-role", principal("ecs-tasks"),
                               "ECS agent for worker jobs: pull the worker image, write job logs", self)
        aws.iam.RolePolicy(
            f"{name}-execution-role-policy", role=execution_role.id,
            policy=pulumi.Output.all(args.repository_arn, log_group.arn).apply(
                lambda a: json.dumps(iam.execution_role_policy(a[0], a[1]))),
            opts=child)
        job_role = _role(f"{name}-job-role", principal("ecs-tasks"),
                         "Worker container: read the data bucket, write results only (never the control records)",
                         self)
        aws.iam.RolePolicy(
            f"{name}-job-role-policy", role=job_role.id,
            policy=pulumi.Output.from_input(args.bucket_arn).apply(
                lambda arn: json.dumps(iam.job_role_policy(arn))),
            opts=child)

        user_data = None
        if args.fsx is not None:
            mount = args.fsx
            user_data = pulumi.Output.all(mount.dns_name, mount.mount_name).apply(
                lambda v: lustre_user_data_base64(v[0], v[1], mount.mount_path))
        launch_template = aws.ec2.LaunchTemplate(
            f"{name}-host-template",
            description="Batch hosts: IMDSv2 only, encrypted root volume, FSx for Lustre at boot",
            metadata_options={"http_endpoint": "enabled", "http_tokens": "required",
                              "http_put_response_hop_limit": 1},  # containers cannot reach IMDS
            block_device_mappings=[{"device_name": ROOT_DEVICE, "ebs": {
                "encrypted": "true", "volume_size": ROOT_VOLUME_GIB, "volume_type": "gp3",
                "delete_on_termination": "true"}}],
            user_data=user_data,
            # A host whose user data cannot mount /fsx shuts itself down (components/userdata.py);
            # terminate, not stop, so Batch replaces it instead of keeping a stopped instance.
            instance_initiated_shutdown_behavior="terminate",
            update_default_version=True,
            opts=child)

        def environment(kind: str, order_name: str, allocation: str, min_vcpus: int) -> aws.batch.ComputeEnvironment:
            return aws.batch.ComputeEnvironment(
                f"{name}-{order_name}",
                # A prefix, not a fixed name: a change Batch cannot make in place replaces the
                # environment, and the new one must exist (under a new name) before the old goes.
                name_prefix=f"{args.name_prefix}-{order_name}-",
                type="MANAGED",
                # Infrastructure updates wait for running jobs instead of killing them.
                update_policy={"terminate_jobs_on_update": False, "job_execution_timeout_minutes": 240},
                compute_resources={
                    "type": kind,
                    "allocation_strategy": allocation,
                    "min_vcpus": min_vcpus,
                    "max_vcpus": args.max_vcpus,
                    "instance_types": list(args.instance_types),
                    "subnets": args.subnet_ids,
                    "security_group_ids": [args.security_group_id],
                    "instance_role": instance_profile.arn,
                    "launch_template": {"launch_template_id": launch_template.id,
                                        "version": launch_template.latest_version.apply(str)},
                    "ec2_configurations": [{"image_type": "ECS_AL2023"}],
                    "tags": dict(args.instance_tags),
                },
                opts=child)

        environments = []
        if args.spot:
            environments.append(environment("SPOT", "spot", "SPOT_PRICE_CAPACITY_OPTIMIZED", args.min_vcpus))
        environments.append(environment("EC2", "on-demand", "BEST_FIT_PROGRESSIVE",
                                        0 if args.spot else args.min_vcpus))
        job_queue = aws.batch.JobQueue(
            f"{name}-queue",
            name=f"{args.name_prefix}-jobs",
            state="ENABLED",
            priority=1,
            compute_environment_orders=[{"order": i + 1, "compute_environment": env.arn}
                                        for i, env in enumerate(environments)],
            job_state_time_limit_actions=[{
                "action": "CANCEL", "state": "RUNNABLE", "max_time_seconds": UNPLACEABLE_JOB_TIMEOUT_SECONDS,
                "reason": "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT"}],
            opts=child)

        mount_path = args.fsx.mount_path if args.fsx is not None else None
        properties = pulumi.Output.all(
            image_uri=args.image_uri, job_role_arn=job_role.arn, execution_role_arn=execution_role.arn,
            log_group_name=log_group.name,
        ).apply(lambda v: json.dumps(jobdef.container_properties(
            vcpus=args.job_vcpus, memory_mib=args.job_memory_mib, region=args.region,
            fsx_mount_path=mount_path, **v)))
        job_definition = aws.batch.JobDefinition(
            f"{name}-worker",
            name=f"{args.name_prefix}-worker",
            type="container",
            platform_capabilities=["EC2"],
            container_properties=properties,
            retry_strategy=jobdef.to_pulumi_retry_strategy(jobdef.retry_strategy(args.job_retry_attempts)),
            timeout={"attempt_duration_seconds": args.job_timeout_seconds},
            propagate_tags=True,
            opts=child)

        self.job_queue_arn = job_queue.arn
        self.job_definition_arn = job_definition.arn
        self.log_group_name = log_group.name
        self.compute_environment_arns = pulumi.Output.all(*[env.arn for env in environments])
        self.register_outputs({
            "jobQueueArn": self.job_queue_arn,
            "jobDefinitionArn": self.job_definition_arn,
            "logGroupName": self.log_group_name,
            "computeEnvironmentArns": self.compute_environment_arns,
        })
