"""The Batch job definition's body, in the shape of Batch's own API.

Built as plain dicts named exactly as ``RegisterJobDefinition`` names them, so
tests can validate them against botocore's model of the API; ``to_pulumi_*``
converts where the Pulumi schema names a field differently.
"""
from __future__ import annotations

from typing import Any, Optional

# What Batch retries with the same job (docs/CONTRACTS.md, "Worker exit codes"):
# - "Host EC2*" in the job's status reason: a spot reclaim or a lost host (no exit code);
# - a container that could not start on its host (the container's reason: the image pull failed, or
#   the task's resources could not be set up); nothing ran, so a new attempt is safe;
# - exit 4: transient S3/network trouble after the worker's own retries.
# Never retried here: 2 (bad input) and 3 (pipeline error), which a retry cannot fix; 5 (superseded:
# another run owns the output); and 137 (out of memory), which the job-events Lambda resubmits with
# twice the memory (oomMaxRetries) instead of repeating the same attempt.
RETRY_ON_STATUS_REASONS = ("Host EC2*",)
RETRY_ON_REASONS = ("CannotPullContainerError*", "ResourceInitializationError*")
RETRY_ON_EXIT_CODES = ("4",)
NEVER_RETRIED_EXIT_CODES = ("2", "3", "5", "137")
#: Batch accepts at most this many evaluateOnExit rules.
MAX_RETRY_RULES = 5
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
    """RetryStrategy: retry host loss, spot reclaims, start failures and transient errors; exit on any
    other exit code. A failure with no exit code that no rule names (none is known) falls to Batch's
    default, which is to retry."""
    rules = [{"onStatusReason": reason, "action": "RETRY"} for reason in RETRY_ON_STATUS_REASONS]
    rules += [{"onReason": reason, "action": "RETRY"} for reason in RETRY_ON_REASONS]
    rules += [{"onExitCode": code, "action": "RETRY"} for code in RETRY_ON_EXIT_CODES]
    # Input and pipeline errors, superseded runs and out-of-memory kills: the same attempt cannot help.
    rules.append({"onExitCode": "*", "action": "EXIT"})
    if len(rules) > MAX_RETRY_RULES:
        raise ValueError(f"{len(rules)} retry rules; AWS Batch accepts at most {MAX_RETRY_RULES}")
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
