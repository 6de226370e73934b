"""Feed what the Pulumi mocks recorded to the policy pack, the way the engine would.

Resource policies see each resource's inputs; stack policies see every
resource's outputs (the mocks' state) with its provider, parent and property
dependencies. ``violations`` runs one policy and returns what it reported.
"""
from __future__ import annotations

import copy
import json
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


# ------------------------------------------------------------ through the engine's protocol

_RESOURCE_REFERENCE = "5cf8f73096256a8f31e491e813e4eb8e"


def _downgrade(value: Any) -> Any:
    """Resource references become their IDs, as the engine sends them to analyzers that
    (like pulumi-policy) do not accept references."""
    if isinstance(value, dict):
        if value.get("4dabf18193072939515e22adb298388d") == _RESOURCE_REFERENCE:
            return value.get("id") or value.get("urn")
        return {k: _downgrade(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_downgrade(v) for v in value]
    return value


def _struct(props: Any):
    from google.protobuf import struct_pb2

    struct = struct_pb2.Struct()
    struct.update(json.loads(json.dumps(_downgrade(props), default=str)))  # assets etc. become their text
    return struct


def _provider_message(provider: Optional[PolicyProviderResource]):
    from pulumi.runtime.proto import analyzer_pb2

    if provider is None:
        return None
    return analyzer_pb2.AnalyzerProviderResource(type=provider.resource_type, properties=_struct(provider.props),
                                                 urn=provider.urn, name=provider.name)


def _analyzer_resource(resource: PolicyResource):
    from pulumi.runtime.proto import analyzer_pb2

    return analyzer_pb2.AnalyzerResource(
        type=resource.resource_type, properties=_struct(resource.props), urn=resource.urn, name=resource.name,
        provider=_provider_message(resource.provider),
        parent=resource.parent.urn if resource.parent is not None else "",
        dependencies=[d.urn for d in resource.dependencies],
        propertyDependencies={k: analyzer_pb2.AnalyzerPropertyDependencies(urns=[d.urn for d in v])
                              for k, v in resource.property_dependencies.items()})


def engine_violations(stub: Any, name: str, recorded: Recorded,
                      stack: Optional[Callable[[list[PolicyResource]], None]] = None,
                      resource_props: Optional[Callable[[Registered, dict], Optional[dict]]] = None) -> list[str]:
    """Like ``violations``, but asking the served pack over gRPC (Analyze / AnalyzeStack)."""
    from pulumi.runtime.proto import analyzer_pb2

    chosen = policy(name)
    found: list[str] = []
    if isinstance(chosen, ResourceValidationPolicy):
        for resource in recorded.resources:
            props = copy.deepcopy(resource.inputs)
            if resource_props is not None:
                props = resource_props(resource, props) or props
            response = stub.Analyze(analyzer_pb2.AnalyzeRequest(
                type=resource.type, properties=_struct(props), urn=resource.urn, name=resource.name,
                provider=_provider_message(_provider(recorded, resource))))
            found += [d.message for d in response.diagnostics if d.policyName == name]
    else:
        resources = stack_resources(recorded)
        if stack is not None:
            stack(resources)
        response = stub.AnalyzeStack(analyzer_pb2.AnalyzeStackRequest(
            resources=[_analyzer_resource(r) for r in resources]))
        found += [d.message for d in response.diagnostics if d.policyName == name]
    return found
