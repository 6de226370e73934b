"""The AWS partition a region belongs to, and every name that depends on it.

ARNs (``arn:<partition>:...``), the S3 gateway endpoint's service name and the
console's host differ between partitions (``aws``, ``aws-us-gov``, ``aws-cn``,
the ISO partitions). The program names none of them literally: each comes from
the ``Partition`` of the stack's region, which botocore's own partition table
decides (the same table boto3 and the AWS CLI use), offline and before any
resource is declared.

Supported: ``aws`` (commercial regions) and ``aws-us-gov`` (GovCloud: the same
DNS suffix and service principals, its own ARN partition and console). Every
other partition is refused with the reason: ``aws-cn`` has its own service
principal suffixes, console and ICP rules this program has never been run
against, and the ISO partitions lack services the stack needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from components.config import ConfigError


@dataclass(frozen=True)
class Partition:
    """Names that depend on the partition (one per supported partition, in ``SUPPORTED``)."""

    name: str  # the ARN partition: aws, aws-us-gov
    dns_suffix: str  # amazonaws.com
    reverse_dns_prefix: str  # com.amazonaws: VPC endpoint service names start with it
    console_host: str  # where the AWS console lives for this partition

    def arn(self, service: str, region: str, account: str, resource: str) -> str:
        """``arn:<partition>:<service>:<region>:<account>:<resource>``."""
        return f"arn:{self.name}:{service}:{region}:{account}:{resource}"

    def managed_policy_arn(self, path_and_name: str) -> str:
        """An AWS-managed IAM policy, e.g. ``service-role/AmazonEC2ContainerServiceforEC2Role``."""
        return f"arn:{self.name}:iam::aws:policy/{path_and_name}"

    def service_principal(self, service: str) -> str:
        """The service principal a trust policy names, e.g. ``lambda.amazonaws.com``."""
        return f"{service}.{self.dns_suffix}"

    def s3_gateway_endpoint_service(self, region: str) -> str:
        """The VPC endpoint service name of S3 in ``region`` (``com.amazonaws.<region>.s3``)."""
        return f"{self.reverse_dns_prefix}.{region}.s3"

    def dashboard_url(self, region: str, dashboard_name: str) -> str:
        """The console link to a CloudWatch dashboard."""
        return (f"https://{self.console_host}/cloudwatch/home?region={region}"
                f"#dashboards/dashboard/{dashboard_name}")


SUPPORTED: dict[str, Partition] = {
    "aws": Partition("aws", "amazonaws.com", "com.amazonaws", "console.aws.amazon.com"),
    "aws-us-gov": Partition("aws-us-gov", "amazonaws.com", "com.amazonaws", "console.amazonaws-us-gov.com"),
}

WHY_NOT = {
    "aws-cn": "the China regions use their own service principals, console and account rules, which this "
              "program has never been deployed to",
}


def partition_name(region: str) -> str:
    """The partition botocore's table puts ``region`` in (``UnknownRegionError`` passes through as ConfigError)."""
    import botocore.exceptions
    import botocore.session

    try:
        return botocore.session.get_session().get_partition_for_region(region)
    except botocore.exceptions.UnknownRegionError:
        raise ConfigError(f"aws:region = {region!r} is in no AWS partition botocore knows; "
                          "use a region name such as eu-west-1") from None


def partition_for_region(region: str) -> Partition:
    """The ``Partition`` of ``region``, or a ConfigError naming the partition and why it is refused."""
    name = partition_name(region)
    if name in SUPPORTED:
        return SUPPORTED[name]
    why = WHY_NOT.get(name, "it lacks services this stack needs (AWS Batch, FSx for Lustre, EventBridge)")
    raise ConfigError(f"aws:region = {region} is in the {name} partition, which this stack does not support: "
                      f"{why}. Supported partitions: {', '.join(SUPPORTED)} (e.g. eu-west-1, us-gov-west-1)")


def foreign_arns(arns: Iterable[str], partition: Partition) -> list[str]:
    """The ARNs among ``arns`` that belong to another partition (they can never be used from this stack)."""
    return [arn for arn in arns if arn.split(":")[1:2] != [partition.name]]
