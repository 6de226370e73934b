"""Pulumi program: typed config -> components -> stack outputs.

Run with `pulumi up` (see README.md). Bad config stops here, before any
resource is declared, with one line per bad key naming the fix.
"""
import pulumi

from components.config import load_from_pulumi
from components.stack import build_stack, resolve_region

config = load_from_pulumi(pulumi.Config().get)
aws_settings = pulumi.Config("aws")
region = resolve_region(aws_settings.get("region"))
outputs = build_stack(config, pulumi.get_stack(), region, profile=aws_settings.get("profile"))
for key, value in outputs.items():
    pulumi.export(key, value)
