"""CellProfilerImage: the worker image, built from image/ and pushed to ECR.

The job definition refers to the image by digest (awsx returns
``repository@sha256:...``), so a running job never picks up a half-pushed or
re-tagged image, and every run record names exactly what ran.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pulumi
import pulumi_awsx as awsx

from components.iam import ecr_repository_arn


@dataclass
class CellProfilerImageArgs:
    """Build context and the official base image's tag."""

    context_dir: Path
    cellprofiler_tag: str
    force_delete: bool


class CellProfilerImage(pulumi.ComponentResource):
    """ECR repository + the worker image built FROM cellprofiler/cellprofiler:<tag>."""

    image_uri: pulumi.Output[str]
    repository_url: pulumi.Output[str]
    repository_arn: pulumi.Output[str]

    def __init__(self, name: str, args: CellProfilerImageArgs, opts: Optional[pulumi.ResourceOptions] = None) -> None:
        super().__init__("cpb:index:CellProfilerImage", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        dockerfile = args.context_dir / "Dockerfile"
        if not dockerfile.is_file():
            raise FileNotFoundError(f"{dockerfile} is missing: the worker image cannot be built")
        repository = awsx.ecr.Repository(
            f"{name}-repo",
            force_delete=args.force_delete,
            image_scanning_configuration={"scan_on_push": True},
            # Jobs pin images by digest; never expire one a job definition may still name.
            lifecycle_policy=awsx.ecr.LifecyclePolicyArgs(skip=True),
            opts=child)
        # Relative paths (Pulumi runs in the project directory): the same checkout in another
        # folder or on another machine must not look like a different build.
        image = awsx.ecr.Image(
            f"{name}-image",
            repository_url=repository.url,
            context=os.path.relpath(args.context_dir),
            dockerfile=os.path.relpath(dockerfile),
            platform="linux/amd64",
            args={"CELLPROFILER_TAG": args.cellprofiler_tag},
            opts=child)
        self.image_uri = image.image_uri
        self.repository_url = repository.url
        self.repository_arn = repository.url.apply(ecr_repository_arn)
        self.register_outputs({"imageUri": self.image_uri, "repositoryUrl": self.repository_url})
