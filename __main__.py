"""Pulumi program: typed config -> components -> stack outputs.

Run with `pulumi up` (see README.md). Bad config stops here, before any
resource is declared, with one line per bad key naming the fix.
"""
import pulumi

from components.config import load_from_pulumi
from components.stack import build_stack, resolve_region

config = load_from_pulumi(pulumi.Config().get)
region = resolve_region(pulumi.Config("aws").get("region"))
for key, value in build_stack(config, pulumi.get_stack(), region).items():
    pulumi.export(key, value)
