"""Run the Pulumi program under mocks and record what it would send to AWS.

The mocks play the provider's part only: they hand back IDs and ARNs shaped
like AWS's (so IAM linting and ARN parsing see realistic values) and never
echo a decision the program makes. Each registration is recorded with its
parent, provider and property dependencies, as the engine would pass them to
a policy pack.
"""
from __future__ import annotations

import hashlib
import json
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pulumi
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime.sync_await import _sync_await

REPO = Path(__file__).resolve().parent.parent
ACCOUNT = "123456789012"
REGION = "eu-west-1"
STACK = "test"
PROJECT = "cellpainting-batch"
#: Standard availability zones per region, as EC2 answers (eu-west-1 has 3; us-east-1 has 6).
ZONES = {"eu-west-1": 3, "us-east-1": 6, "us-gov-west-1": 3}


def _partition(region: str) -> str:
    import botocore.session

    return botocore.session.get_session().get_partition_for_region(region)


@dataclass
class Registered:
    """One resource as the engine saw it."""

    type: str
    name: str
    urn: str
    id: Optional[str]
    inputs: dict[str, Any]
    state: dict[str, Any]
    parent: str = ""
    provider: str = ""
    providers: dict[str, str] = field(default_factory=dict)  # what remote (awsx) components are handed
    dependencies: list[str] = field(default_factory=list)
    property_dependencies: dict[str, list[str]] = field(default_factory=dict)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class AwsLikeMocks(pulumi.runtime.Mocks):
    """Provider stand-in: physical names, IDs and ARNs the way AWS forms them."""

    def __init__(self, region: str = REGION, zones: Optional[int] = None) -> None:
        self.monitor: Optional["RecordingMonitor"] = None
        self.region = region
        self.partition = _partition(region)
        self.zones = ZONES.get(region, 3) if zones is None else zones
        self.calls: list[tuple[str, dict]] = []

    def call(self, args: pulumi.runtime.MockCallArgs):  # noqa: D401 - Pulumi API
        self.calls.append((args.token, dict(args.args)))
        if args.token == "aws:index/getRegion:getRegion":
            return {"name": self.region, "region": self.region, "id": self.region}
        if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"accountId": ACCOUNT, "arn": f"arn:{self.partition}:iam::{ACCOUNT}:root", "userId": ACCOUNT}
        if args.token == "aws:index/getAvailabilityZones:getAvailabilityZones":
            # What EC2's DescribeAvailabilityZones answers for the standard zones of the region.
            names = [f"{self.region}{letter}" for letter in "abcdef"[:self.zones]]
            return {"id": self.region, "names": names, "zoneIds": [f"euw1-az{i + 1}" for i in range(self.zones)],
                    "groupNames": [self.region] * self.zones, "state": "available"}
        raise NotImplementedError(f"the program invoked {args.token}, which these mocks do not answer")

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        typ, name, inputs = args.typ, args.name, dict(args.inputs)
        physical = inputs.get("name") or f"{inputs.get('namePrefix', name + '-')}{_digest(typ, name)[:7]}"
        region, partition = self.region, self.partition
        arn_prefix = f"arn:{partition}:{{}}:{region}:{ACCOUNT}:"
        if typ == "awsx:ec2:Vpc":
            return self._vpc(name)
        if typ == "awsx:ecr:Repository":
            return f"{name}-id", {"url": f"{ACCOUNT}.dkr.ecr.{region}.amazonaws.com/{physical}"}
        if typ == "awsx:ecr:Image":
            # A digest that changes whenever what is built changes, as a registry's would.
            return f"{name}-id", {"imageUri": f"{inputs['repositoryUrl']}@sha256:{_digest(inputs)}"}
        state: dict[str, Any] = dict(inputs)
        if typ.startswith("pulumi:providers:"):
            return f"{name}-provider-id", state
        resource_id = f"{name}-id"
        if typ == "aws:s3/bucket:Bucket":
            bucket = inputs.get("bucket") or f"{inputs.get('bucketPrefix', name)}{_digest(name)[:12]}"
            resource_id = bucket
            state.update(bucket=bucket, arn=f"arn:{partition}:s3:::{bucket}")
        elif typ == "aws:sqs/queue:Queue":
            resource_id = f"https://sqs.{region}.amazonaws.com/{ACCOUNT}/{physical}"
            state.update(url=resource_id, arn=arn_prefix.format("sqs") + physical, name=physical)
        elif typ == "aws:iam/role:Role":
            state.update(arn=f"arn:{partition}:iam::{ACCOUNT}:role/{physical}", name=physical)
            resource_id = physical
        elif typ == "aws:iam/instanceProfile:InstanceProfile":
            state.update(arn=f"arn:{partition}:iam::{ACCOUNT}:instance-profile/{physical}", name=physical)
        elif typ.startswith("aws:batch/"):
            kind = {"jobQueue": "job-queue", "jobDefinition": "job-definition",
                    "computeEnvironment": "compute-environment"}[typ.split("/")[1].split(":")[0]]
            suffix = ":1" if kind == "job-definition" else ""
            state.update(arn=arn_prefix.format("batch") + f"{kind}/{physical}{suffix}", name=physical)
            resource_id = state["arn"]
        elif typ == "aws:cloudwatch/logGroup:LogGroup":
            state.update(arn=arn_prefix.format("logs") + f"log-group:{physical}", name=physical)
            resource_id = physical
        elif typ == "aws:lambda/function:Function":
            state.update(arn=arn_prefix.format("lambda") + f"function:{physical}", name=physical)
        elif typ == "aws:cloudwatch/eventRule:EventRule":
            state.update(arn=arn_prefix.format("events") + f"rule/{physical}", name=physical)
            resource_id = physical
        elif typ == "aws:cloudwatch/dashboard:Dashboard":
            state.update(dashboardArn=f"arn:{partition}:cloudwatch::{ACCOUNT}:dashboard/{inputs['dashboardName']}")
            resource_id = inputs["dashboardName"]
        elif typ == "aws:sns/topic:Topic":
            state.update(arn=arn_prefix.format("sns") + physical, name=physical)
            resource_id = state["arn"]
        elif typ == "aws:fsx/lustreFileSystem:LustreFileSystem":
            resource_id = "fs-" + _digest(name)[:17]
            state.update(arn=arn_prefix.format("fsx") + f"file-system/{resource_id}",
                         dnsName=f"{resource_id}.fsx.{region}.amazonaws.com", mountName=_digest(name, "mount")[:8])
        elif typ == "aws:ec2/securityGroup:SecurityGroup":
            resource_id = "sg-" + _digest(name)[:17]
        elif typ == "aws:ec2/launchTemplate:LaunchTemplate":
            resource_id = "lt-" + _digest(name)[:17]
            state.update(latestVersion=1)
        elif typ == "aws:ecr/repository:Repository":
            state.update(arn=arn_prefix.format("ecr") + f"repository/{physical}")
        elif "arn" not in state:
            state["arn"] = arn_prefix.format(typ.split(":")[1].split("/")[0]) + physical
        return resource_id, state

    def _vpc(self, name: str):
        """awsx's Vpc is opaque under mocks: hand back its documented outputs only."""
        zones = ("a", "b")
        private = [f"subnet-private-{z}-{_digest(name, z)[:8]}" for z in zones]
        public = [f"subnet-public-{z}-{_digest(name, z)[:8]}" for z in zones]
        tables = []
        assert self.monitor is not None
        for label in [f"private-{z}" for z in zones] + [f"public-{z}" for z in zones]:
            table_id = f"rtb-{label}-{_digest(name, label)[:8]}"
            urn = self.monitor.make_urn("", "aws:ec2/routeTable:RouteTable", f"{name}-{label}")
            self.monitor.resources[urn] = pulumi_mocks.MockMonitor.ResourceRegistration(
                urn, table_id, {"vpcId": f"vpc-{_digest(name)[:12]}"})
            tables.append({"4dabf18193072939515e22adb298388d": "5cf8f73096256a8f31e491e813e4eb8e",
                           "urn": urn, "id": table_id, "packageVersion": ""})
        return f"{name}-id", {"vpcId": f"vpc-{_digest(name)[:12]}", "privateSubnetIds": private,
                              "publicSubnetIds": public, "isolatedSubnetIds": [], "routeTables": tables}


class RecordingMonitor(pulumi_mocks.MockMonitor):
    """The mock monitor, also keeping what a policy pack would be shown."""

    def __init__(self, mocks: AwsLikeMocks) -> None:
        super().__init__(mocks)
        mocks.monitor = self
        self.registered: list[Registered] = []

    def RegisterResource(self, request):  # noqa: N802 - gRPC name
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            registration = self.resources[response.urn]
            inputs = pulumi.runtime.rpc.deserialize_properties(request.object)
            self.registered.append(Registered(
                type=request.type, name=request.name, urn=response.urn, id=registration.id,
                inputs=dict(inputs), state=dict(registration.state), parent=request.parent,
                provider=request.provider, providers=dict(request.providers), dependencies=list(request.dependencies),
                property_dependencies={k: list(v.urns) for k, v in request.propertyDependencies.items()}))
        return response


@dataclass
class Recorded:
    """Everything one program run registered, and its resolved outputs."""

    resources: list[Registered]
    outputs: dict[str, Any]
    calls: list[tuple[str, dict]] = field(default_factory=list)  # invokes the program made

    def of_type(self, typ: str) -> list[Registered]:
        return [r for r in self.resources if r.type == typ]

    def one(self, typ: str, name_contains: str = "") -> Registered:
        found = [r for r in self.of_type(typ) if name_contains in r.name]
        assert len(found) == 1, f"expected one {typ} named *{name_contains}*, got {[r.name for r in found]}"
        return found[0]

    def by_urn(self, urn: str) -> Registered:
        return next(r for r in self.resources if r.urn == urn)


def _resolve(value: Any) -> Any:
    return _sync_await(pulumi.Output.from_input(value).future())


#: The registrations of the latest run, kept even when the program raised (tests of "stops before any
#: resource" read it).
LAST_RUN: dict[str, list[Registered]] = {"registered": []}


def run(build: Callable[[], dict[str, Any]], config: Optional[dict[str, str]] = None,
        preview: bool = False, zones: Optional[int] = None) -> Recorded:
    """Run ``build`` (which declares resources and returns stack outputs) under mocks; ``zones`` is how
    many availability zones the region answers with (default: what the real region has)."""
    region = (config or {}).get("aws:region", REGION)
    mocks = AwsLikeMocks(region, zones)
    monitor = RecordingMonitor(mocks)
    settings_config = {"aws:region": REGION}
    settings_config.update({(k if ":" in k else f"{PROJECT}:{k}"): v for k, v in (config or {}).items()})
    pulumi.runtime.set_all_config(settings_config)
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=STACK, preview=preview, monitor=monitor)
    outputs: dict[str, Any] = {}

    def program() -> Any:
        declared = build()
        return pulumi.Output.all(**declared).apply(outputs.update) if declared else None

    LAST_RUN["registered"] = monitor.registered  # what was declared, also when the program raised
    pulumi.runtime.test(program)()
    return Recorded(resources=monitor.registered, outputs=outputs, calls=mocks.calls)


def run_main(config: Optional[dict[str, str]] = None, zones: Optional[int] = None) -> Recorded:
    """Run the real __main__.py (exports included) and return what it registered."""
    exported: dict[str, Any] = {}
    real_export = pulumi.export

    def build() -> dict[str, Any]:
        pulumi.export = lambda key, value: exported.__setitem__(key, value)  # capture, don't lose
        try:
            runpy.run_path(str(REPO / "__main__.py"), run_name="__main__")
        finally:
            pulumi.export = real_export
        return exported

    return run(build, config, zones=zones)


_CACHE: dict[tuple, Recorded] = {}


def program(**config: str) -> Recorded:
    """The real program run once per distinct config (runs are deterministic; tests only read them)."""
    key = tuple(sorted(config.items()))
    if key not in _CACHE:
        _CACHE[key] = run_main(config)
    return _CACHE[key]


def policy_document(resource: Registered, key: str = "policy") -> dict[str, Any]:
    """A JSON policy input, parsed."""
    value = resource.inputs[key]
    return json.loads(value) if isinstance(value, str) else value
