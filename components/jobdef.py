"""The Batch job definition's body, in the shape of Batch's own API.

Built as plain dicts named exactly as ``RegisterJobDefinition`` names them, so
tests can validate them against botocore's model of the API; ``to_pulumi_*``
converts where the Pulumi schema names a field differently.
"""
from __future__ import annotations

from typing import Any, Optional

# Worker exit codes (docs/CONTRACTS.md): 4 transient, 137 killed (OOM). 2 and 3 are
# input/pipeline errors a retry cannot fix. "Host EC2*" covers spot reclaims and
# host failures, which have no exit code.
RETRY_ON_STATUS_REASONS = ("Host EC2*",)
RETRY_ON_EXIT_CODES = ("4", "137")
FSX_VOLUME = "fsx"


def container_properties(*, image_uri: str, vcpus: int, memory_mib: int, job_role_arn: str,
                         execution_role_arn: str, log_group_name: str, region: str,
                         fsx_mount_path: Optional[str]) -> dict[str, Any]:
    """ContainerProperties for the worker: never privileged, logs to our group, /fsx read-only when FSx is on."""
    environment = [{"name": "CPB_IMAGE", "value": image_uri},
                   {"name": "AWS_DEFAULT_REGION", "value": region}]  # hosts block IMDS from containers
    props: dict[str, Any] = {
        "image": image_uri,
        "resourceRequirements": [{"type": "VCPU", "value": str(vcpus)},
                                 {"type": "MEMORY", "value": str(memory_mib)}],
        "jobRoleArn": job_role_arn,
        "executionRoleArn": execution_role_arn,
        "privileged": False,
        "linuxParameters": {"initProcessEnabled": True},  # reaps CellProfiler children, forwards SIGTERM
        "logConfiguration": {"logDriver": "awslogs", "options": {
            "awslogs-group": log_group_name, "awslogs-region": region, "awslogs-stream-prefix": "cpb"}},
        "environment": environment,
    }
    if fsx_mount_path:
        environment.append({"name": "CPB_FSX_ROOT", "value": fsx_mount_path})
        props["volumes"] = [{"name": FSX_VOLUME, "host": {"sourcePath": fsx_mount_path}}]
        # Read-only: results go to S3 through the worker, never through the file system.
        props["mountPoints"] = [{"sourceVolume": FSX_VOLUME, "containerPath": fsx_mount_path, "readOnly": True}]
    return props


def retry_strategy(attempts: int) -> dict[str, Any]:
    """RetryStrategy: retry host loss, spot reclaim, transient errors and OOM; exit on anything else."""
    rules = [{"onStatusReason": reason, "action": "RETRY"} for reason in RETRY_ON_STATUS_REASONS]
    rules += [{"onExitCode": code, "action": "RETRY"} for code in RETRY_ON_EXIT_CODES]
    rules.append({"onExitCode": "*", "action": "EXIT"})  # pipeline and input errors: a retry cannot help
    return {"attempts": attempts, "evaluateOnExit": rules}


def timeout(seconds: int) -> dict[str, int]:
    """JobTimeout: stop an attempt that runs too long (a hung CellProfiler must not bill forever)."""
    return {"attemptDurationSeconds": seconds}


def to_pulumi_retry_strategy(strategy: dict[str, Any]) -> dict[str, Any]:
    """The Pulumi schema spells evaluateOnExit as evaluate_on_exits and wants lower-case actions."""
    rename = {"onStatusReason": "on_status_reason", "onExitCode": "on_exit_code", "onReason": "on_reason"}
    return {"attempts": strategy["attempts"], "evaluate_on_exits": [
        {**{rename[k]: v for k, v in rule.items() if k in rename}, "action": rule["action"].lower()}
        for rule in strategy["evaluateOnExit"]]}
