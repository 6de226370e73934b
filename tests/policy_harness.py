"""Feed what the Pulumi mocks recorded to the policy pack, the way the engine would.

Resource policies see each resource's inputs; stack policies see every
resource's outputs (the mocks' state) with its provider, parent and property
dependencies. ``violations`` runs one policy and returns what it reported.
"""
from __future__ import annotations

import copy
import sys
from typing import Any, Callable, Optional

from pulumi_policy import (
    PolicyCustomTimeouts,
    PolicyProviderResource,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
)

from stack_harness import REPO, Recorded, Registered

sys.path.insert(0, str(REPO / "policy"))  # the pack imports its module as the engine runs it: top-level

import cpb_guardrails  # noqa: E402


def _options(resource: Registered) -> PolicyResourceOptions:
    return PolicyResourceOptions(protect=False, ignore_changes=[], delete_before_replace=None, aliases=[],
                                 custom_timeouts=PolicyCustomTimeouts(0, 0, 0), additional_secret_outputs=[],
                                 parent=resource.parent or None)


def _provider(recorded: Recorded, resource: Registered) -> Optional[PolicyProviderResource]:
    reference = resource.provider or resource.providers.get("aws", "")
    urn = reference.rsplit("::", 1)[0] if reference else ""
    for candidate in recorded.resources:
        if candidate.urn == urn:
            return PolicyProviderResource(candidate.type, copy.deepcopy(candidate.inputs), candidate.urn,
                                          candidate.name)
    return None


def stack_resources(recorded: Recorded) -> list[PolicyResource]:
    """Every recorded resource as a PolicyResource, links resolved."""
    made = {r.urn: PolicyResource(r.type, copy.deepcopy(r.state), r.urn, r.name, _options(r),
                                  _provider(recorded, r), None, [], {}) for r in recorded.resources}
    for r in recorded.resources:
        resource = made[r.urn]
        resource.parent = made.get(r.parent)
        resource.dependencies = [made[u] for u in r.dependencies if u in made]
        resource.property_dependencies = {k: [made[u] for u in v if u in made]
                                          for k, v in r.property_dependencies.items()}
    return list(made.values())


def resource_args(recorded: Recorded, resource: Registered,
                  props: Optional[dict[str, Any]] = None) -> ResourceValidationArgs:
    return ResourceValidationArgs(resource.type, copy.deepcopy(resource.inputs) if props is None else props,
                                  resource.urn, resource.name, _options(resource), _provider(recorded, resource))


def policy(name: str):
    return next(p for p in cpb_guardrails.POLICIES if p.name == name)


def violations(name: str, recorded: Recorded,
               stack: Optional[Callable[[list[PolicyResource]], None]] = None,
               resource_props: Optional[Callable[[Registered, dict], Optional[dict]]] = None) -> list[str]:
    """Run policy ``name`` over the recorded stack.

    ``stack`` may break the stack-policy view in place; ``resource_props``
    may return broken inputs for a resource (or None to keep them).
    """
    found: list[str] = []

    def report(message: str, urn: Optional[str] = None) -> None:
        found.append(message)

    chosen = policy(name)
    if isinstance(chosen, ResourceValidationPolicy):
        for resource in recorded.resources:
            props = copy.deepcopy(resource.inputs)
            if resource_props is not None:
                props = resource_props(resource, props) or props
            chosen.validate(resource_args(recorded, resource, props), report)
    else:
        resources = stack_resources(recorded)
        if stack is not None:
            stack(resources)
        chosen.validate(StackValidationArgs(resources), report)
    return found
