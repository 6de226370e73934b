"""The cpb guardrails policy pack: `pulumi preview --policy-pack policy`.

The policies live in cpb_guardrails.py (importable by tests); this file only
serves them to the Pulumi engine.
"""
from pulumi_policy import EnforcementLevel, PolicyPack

from cpb_guardrails import POLICIES

PolicyPack(
    name="cpb-guardrails",
    description="Private encrypted storage, least-privilege IAM, private IMDSv2 hosts, "
                "unprivileged containers, bounded logs, closed FSx ports, cost tags.",
    enforcement_level=EnforcementLevel.MANDATORY,
    policies=POLICIES,
)
