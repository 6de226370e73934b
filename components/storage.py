"""LustreStorage: the data bucket and, when enabled, FSx for Lustre linked to it.

The bucket is private (public access blocked, ACLs off), encrypted at rest,
reachable only over TLS, versioned per stack, with lifecycle rules so old
versions and abandoned uploads do not grow the bill forever. FSx for Lustre
is linked to the whole bucket by a data repository association (auto import
and auto export) so a key ``k`` in the bucket is ``/fsx/k`` on every compute
host.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import pulumi
import pulumi_aws as aws

FSX_MOUNT_PATH = "/fsx"
FSX_EVENTS = ["NEW", "CHANGED", "DELETED"]


@dataclass
class FsxArgs:
    """FSx for Lustre settings (validated in components.config)."""

    deployment_type: str
    storage_capacity_gib: int
    throughput_per_tib: Optional[int]  # None for SCRATCH_2
    subnet_id: pulumi.Input[str]
    security_group_id: pulumi.Input[str]


@dataclass
class LustreStorageArgs:
    """Bucket behaviour per stack, and FSx (None: jobs read S3 directly)."""

    force_destroy: bool
    versioning: bool
    fsx: Optional[FsxArgs]
    noncurrent_version_days: int = 30


def tls_only_policy(bucket_arn: str) -> dict[str, Any]:
    """Bucket policy denying every request not made over TLS."""
    return {
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "DenyInsecureTransport",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:*",
            "Resource": [bucket_arn, f"{bucket_arn}/*"],
            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
        }],
    }


class LustreStorage(pulumi.ComponentResource):
    """The bucket every job reads from and writes to, plus optional FSx for Lustre."""

    bucket_name: pulumi.Output[str]
    bucket_arn: pulumi.Output[str]
    file_system_id: Optional[pulumi.Output[str]]
    file_system_dns_name: Optional[pulumi.Output[str]]
    file_system_mount_name: Optional[pulumi.Output[str]]

    def __init__(self, name: str, args: LustreStorageArgs, opts: Optional[pulumi.ResourceOptions] = None) -> None:
        super().__init__("cpb:index:LustreStorage", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        bucket = aws.s3.Bucket(f"{name}-data", force_destroy=args.force_destroy, opts=child)
        ownership = aws.s3.BucketOwnershipControls(
            f"{name}-data-ownership", bucket=bucket.id,
            rule={"object_ownership": "BucketOwnerEnforced"},  # ACLs off: IAM alone decides access
            opts=child)
        public_block = aws.s3.BucketPublicAccessBlock(
            f"{name}-data-public-access", bucket=bucket.id,
            block_public_acls=True, block_public_policy=True,
            ignore_public_acls=True, restrict_public_buckets=True, opts=child)
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{name}-data-encryption", bucket=bucket.id,
            rules=[{"apply_server_side_encryption_by_default": {"sse_algorithm": "AES256"}}],
            opts=child)
        versioning = aws.s3.BucketVersioning(
            f"{name}-data-versioning", bucket=bucket.id,
            versioning_configuration={"status": "Enabled" if args.versioning else "Suspended"},
            opts=child)
        rules: list[dict[str, Any]] = [{
            "id": "abort-incomplete-uploads", "status": "Enabled", "filter": {},
            "abort_incomplete_multipart_upload": {"days_after_initiation": 7},
        }]
        if args.versioning:
            rules.append({
                "id": "expire-old-versions", "status": "Enabled", "filter": {},
                "noncurrent_version_expiration": {"noncurrent_days": args.noncurrent_version_days},
            })
        aws.s3.BucketLifecycleConfiguration(
            f"{name}-data-lifecycle", bucket=bucket.id, rules=rules,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[versioning]))
        aws.s3.BucketPolicy(
            f"{name}-data-tls-only", bucket=bucket.id,
            policy=bucket.arn.apply(lambda arn: json.dumps(tls_only_policy(arn))),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[public_block, ownership]))

        self.bucket_name = bucket.bucket
        self.bucket_arn = bucket.arn
        self.file_system_id = self.file_system_dns_name = self.file_system_mount_name = None
        if args.fsx is not None:
            fsx = args.fsx
            file_system = aws.fsx.LustreFileSystem(
                f"{name}-fsx",
                deployment_type=fsx.deployment_type,
                storage_capacity=fsx.storage_capacity_gib,
                per_unit_storage_throughput=fsx.throughput_per_tib,
                file_system_type_version="2.15",
                data_compression_type="LZ4",  # images compress; less capacity and bandwidth billed
                subnet_ids=fsx.subnet_id,
                security_group_ids=[fsx.security_group_id],
                opts=child)
            aws.fsx.DataRepositoryAssociation(
                f"{name}-fsx-bucket-link",
                file_system_id=file_system.id,
                file_system_path="/",  # bucket key k appears at /fsx/k (docs/CONTRACTS.md, CPB_FSX_ROOT)
                data_repository_path=bucket.bucket.apply(lambda b: f"s3://{b}"),
                batch_import_meta_data_on_create=True,
                s3={"auto_import_policy": {"events": FSX_EVENTS},
                    "auto_export_policy": {"events": FSX_EVENTS}},
                opts=child)
            self.file_system_id = file_system.id
            self.file_system_dns_name = file_system.dns_name
            self.file_system_mount_name = file_system.mount_name

        outputs: dict[str, Any] = {"bucketName": self.bucket_name, "bucketArn": self.bucket_arn}
        if self.file_system_id is not None:
            outputs["fileSystemId"] = self.file_system_id
        self.register_outputs(outputs)
