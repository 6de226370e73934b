"""Compose the whole system from a validated StackConfig.

``build_stack`` is what ``__main__.py`` runs; tests run it (and __main__.py)
under Pulumi mocks. It declares one AWS provider carrying the cost-allocation
tags as default tags, so every taggable resource is tagged without each
component remembering to.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import pulumi
import pulumi_aws as aws

from components.compute import BatchCompute, BatchComputeArgs, FsxMount
from components.config import PROJECT, ConfigError, StackConfig
from components.dashboard import StackDashboard, StackDashboardArgs
from components.events import EVENTS_HANDLER, JobEvents, JobEventsArgs
from components.image import CellProfilerImage, CellProfilerImageArgs
from components.ingress import LAMBDA_HANDLER, JobIngress, JobIngressArgs
from components.lambda_asset import LambdaSources, lambda_code
from components.network import Network, NetworkArgs
from components.partition import foreign_arns, partition_for_region
from components.storage import FSX_MOUNT_PATH, FsxArgs, LustreStorage, LustreStorageArgs

REPO = Path(__file__).resolve().parent.parent
REQUIRED_TAGS = ("Project", "Stack", "CostCenter", "Owner")


def cost_tags(cfg: StackConfig, stack: str) -> dict[str, str]:
    """Cost-allocation tags applied to every taggable resource (activate them in Billing)."""
    return {"Project": PROJECT, "Stack": stack, "CostCenter": cfg.cost_center, "Owner": cfg.owner,
            "ManagedBy": "pulumi"}


def name_prefix(stack: str) -> str:
    """Physical-name prefix: Batch and Lambda names are unique per account and region, so include the stack."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", stack.lower()).strip("-")[:40] or "default"
    return f"cpb-{cleaned}"


def resolve_region(configured: Optional[str]) -> str:
    """The region from ``aws:region`` (or the usual AWS variables); it decides the partition, ARNs and
    endpoint names. A region of a partition this stack does not support is refused here."""
    region = configured or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise ConfigError("aws:region is not set; run `pulumi config set aws:region eu-west-1` "
                          "(or your region)")
    if not re.fullmatch(r"[a-z]{2,4}(-[a-z]+)+-\d+", region):
        raise ConfigError(f"aws:region = {region!r} is not an AWS region name; use e.g. eu-west-1")
    partition_for_region(region)
    return region


def check_availability_zones(wanted: int, region: str, provider: aws.Provider) -> list[str]:
    """The region's availability zones (standard zones, not Local or Wavelength Zones), refusing a
    config that asks for more than it has: awsx would otherwise fail half-way through `pulumi up`."""
    zones = aws.get_availability_zones(
        state="available", filters=[{"name": "zone-type", "values": ["availability-zone"]}],
        opts=pulumi.InvokeOptions(provider=provider))
    names = sorted(zones.names or [])
    if wanted > len(names):
        raise ConfigError(f"{PROJECT}:availabilityZones = {wanted} but {region} has {len(names)} availability "
                          f"zones ({', '.join(names) or 'none answered'}); set it to {min(len(names), 4)} or fewer "
                          f"with `pulumi config set availabilityZones {max(2, min(len(names), 4))}`")
    return names


def build_stack(cfg: StackConfig, stack: str, region: str, repo: Path = REPO,
                profile: Optional[str] = None) -> dict[str, Any]:
    """Declare every resource; return the stack outputs (docs/CONTRACTS.md names).

    ``profile`` is the stack's ``aws:profile``: an explicit provider does not read
    the ``aws:`` stack settings itself, so the ones it needs are passed on.
    """
    partition = partition_for_region(region)
    foreign = foreign_arns(cfg.allowed_job_arns, partition)
    if foreign:
        raise ConfigError(f"{PROJECT}:allowedJobArns lists {', '.join(foreign)}, outside the {partition.name} "
                          f"partition of {region}; a job there can never be submitted from this stack")
    tags = cost_tags(cfg, stack)
    provider = aws.Provider("aws", region=region, profile=profile, default_tags={"tags": tags})
    opts = pulumi.ResourceOptions(providers={"aws": provider})
    prefix = name_prefix(stack)
    check_availability_zones(cfg.availability_zones, region, provider)
    # The Lambdas' one code archive: handlers/, cpb_worker/ and handlers/requirements.txt vendored.
    code = lambda_code(LambdaSources.of_repo(repo),
                       handler_modules=[h.rsplit(".", 1)[0] for h in (LAMBDA_HANDLER, EVENTS_HANDLER)])

    network = Network("cpb-network", NetworkArgs(
        cidr_block=cfg.vpc_cidr, availability_zones=cfg.availability_zones,
        nat_strategy=cfg.nat_gateways, s3_endpoint_service=partition.s3_gateway_endpoint_service(region)), opts)
    first_private_subnet = network.private_subnet_ids.apply(lambda ids: ids[0])
    storage = LustreStorage("cpb-storage", LustreStorageArgs(
        force_destroy=cfg.force_destroy, versioning=cfg.bucket_versioning,
        fsx=FsxArgs(
            deployment_type=cfg.fsx_deployment_type,
            storage_capacity_gib=cfg.fsx_storage_capacity_gib,
            throughput_per_tib=cfg.fsx_throughput_per_tib if cfg.fsx_deployment_type.startswith("PERSISTENT")
            else None,
            subnet_id=first_private_subnet,
            security_group_id=network.fsx_security_group_id,
        ) if cfg.fsx_enabled else None), opts)
    image = CellProfilerImage("cpb-image", CellProfilerImageArgs(
        context_dir=repo / "image", cellprofiler_tag=cfg.cellprofiler_image_tag,
        force_delete=cfg.force_destroy), opts)
    compute = BatchCompute("cpb-compute", BatchComputeArgs(
        name_prefix=prefix, region=region, partition=partition,
        bucket_arn=storage.bucket_arn,
        subnet_ids=network.private_subnet_ids,
        security_group_id=network.compute_security_group_id,
        image_uri=image.image_uri, repository_arn=image.repository_arn,
        instance_types=cfg.instance_families, spot=cfg.spot_enabled,
        min_vcpus=cfg.min_vcpus, max_vcpus=cfg.max_vcpus,
        job_vcpus=cfg.job_vcpus, job_memory_mib=cfg.job_memory_mib,
        job_timeout_seconds=cfg.job_timeout_seconds, job_retry_attempts=cfg.job_retry_attempts,
        log_retention_days=cfg.log_retention_days,
        fsx=FsxMount(storage.file_system_dns_name, storage.file_system_mount_name, FSX_MOUNT_PATH)
        if storage.file_system_id is not None else None,
        instance_tags=tags), opts)
    ingress = JobIngress("cpb-ingress", JobIngressArgs(
        name_prefix=prefix, stack=stack, partition=partition, code=code, memory_mib=cfg.lambda_memory_mib,
        bucket_name=storage.bucket_name, bucket_arn=storage.bucket_arn,
        job_queue_arn=compute.job_queue_arn, job_definition_arn=compute.job_definition_arn,
        allowed_job_arns=cfg.allowed_job_arns,
        max_vcpus=cfg.job_max_vcpus, max_memory_mib=cfg.job_max_memory_mib,
        default_vcpus=cfg.job_vcpus, default_memory_mib=cfg.job_memory_mib,
        lambda_timeout_seconds=cfg.lambda_timeout_seconds,
        visibility_timeout_seconds=cfg.queue_visibility_timeout_seconds,
        batch_size=cfg.queue_batch_size, max_receive_count=cfg.max_receive_count,
        log_retention_days=cfg.log_retention_days, alarm_email=cfg.alarm_email), opts)
    events = JobEvents("cpb-events", JobEventsArgs(
        name_prefix=prefix, stack=stack, partition=partition, code=code,
        bucket_name=storage.bucket_name, bucket_arn=storage.bucket_arn,
        job_queue_arn=compute.job_queue_arn, job_definition_arn=compute.job_definition_arn,
        max_memory_mib=cfg.job_max_memory_mib, oom_max_retries=cfg.oom_max_retries,
        log_retention_days=cfg.log_retention_days, alarm_actions=ingress.alarm_actions), opts)
    dashboard = StackDashboard("cpb-dashboard", StackDashboardArgs(
        dashboard_name=prefix, region=region, stack=stack, partition=partition,
        queue_name=ingress.queue_name, dead_letter_queue_name=ingress.dead_letter_queue_name,
        events_dead_letter_queue_name=events.dead_letter_queue_name,
        ingress_function_name=ingress.function_name, events_function_name=events.function_name), opts)

    outputs: dict[str, Any] = {
        "bucketName": storage.bucket_name,
        "queueUrl": ingress.queue_url,
        "deadLetterQueueUrl": ingress.dead_letter_queue_url,
        "jobQueueArn": compute.job_queue_arn,
        "jobDefinitionArn": compute.job_definition_arn,
        "imageUri": image.image_uri,
        "logGroupName": compute.log_group_name,
        "region": region,
        "dashboardName": dashboard.dashboard_name,
        "dashboardUrl": dashboard.url,
        # What the Lambda enforces (its CPB_MAX_*/CPB_DEFAULT_*/CPB_ALLOWED_ARNS), so `cpb submit`
        # can reject a message locally with the same words before sending it.
        "jobLimits": {"maxVcpu": cfg.job_max_vcpus, "maxMemoryMib": cfg.job_max_memory_mib,
                      "defaultVcpu": cfg.job_vcpus, "defaultMemoryMib": cfg.job_memory_mib,
                      "allowedArns": list(cfg.allowed_job_arns)},
        # What `cpb estimate` needs to give a plate's wall time and cost on this stack.
        "capacity": {"maxVcpus": cfg.max_vcpus, "spot": cfg.spot_enabled, "oomMaxRetries": cfg.oom_max_retries,
                     "fsx": {"deploymentType": cfg.fsx_deployment_type,
                             "storageCapacityGib": cfg.fsx_storage_capacity_gib,
                             "throughputPerTib": cfg.fsx_throughput_per_tib
                             if cfg.fsx_deployment_type.startswith("PERSISTENT") else None}
                     if cfg.fsx_enabled else None},
    }
    if storage.file_system_id is not None:
        outputs["fileSystemId"] = storage.file_system_id
    return outputs
