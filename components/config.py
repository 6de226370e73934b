"""Typed, validated stack configuration.

The schema lives here once (``FIELDS``): ``Pulumi.yaml``'s ``config:`` block and
``docs/CONFIG.md`` are checked against it by the tests, so the three cannot
drift. ``load_config`` turns the raw strings Pulumi hands the program into a
frozen ``StackConfig`` and rejects bad values with one message per problem
that names the key and the fix, before any resource is declared.
"""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Mapping, Optional, Sequence

PROJECT = "cellpainting-batch"


class ConfigError(ValueError):
    """Raised when stack config is invalid; the message lists every bad key."""


@dataclass(frozen=True)
class ConfigField:
    """One key of the stack config as declared in Pulumi.yaml."""

    name: str
    type: str  # "string" | "integer" | "boolean" | "array" (of strings)
    default: Any
    description: str


FIELDS: tuple[ConfigField, ...] = (
    # Network
    ConfigField("vpcCidr", "string", "10.0.0.0/16",
                "IPv4 CIDR of the VPC (a private range, /16 to /24)."),
    ConfigField("availabilityZones", "integer", 2,
                "Availability zones to spread subnets over (2 to 4)."),
    ConfigField("natGateways", "string", "Single",
                "NAT gateway strategy: Single (one, cheapest) or OnePerAz (survives an AZ outage)."),
    # Storage
    ConfigField("forceDestroy", "boolean", False,
                "Let `pulumi destroy` delete a bucket that still holds data (set true only on throw-away stacks)."),
    ConfigField("bucketVersioning", "boolean", True,
                "Keep earlier versions of overwritten or deleted objects for 30 days (recovers from mistakes; "
                "costs storage)."),
    ConfigField("fsxEnabled", "boolean", True,
                "Create FSx for Lustre linked to the bucket and mount it at /fsx; false makes jobs read S3 directly."),
    ConfigField("fsxDeploymentType", "string", "SCRATCH_2",
                "FSx for Lustre deployment type: SCRATCH_2, PERSISTENT_1 or PERSISTENT_2."),
    ConfigField("fsxStorageCapacityGib", "integer", 1200,
                "FSx capacity in GiB: 1200, 2400 or a multiple of 2400."),
    ConfigField("fsxThroughputPerTib", "integer", 125,
                "FSx throughput per TiB in MB/s for PERSISTENT types (PERSISTENT_1: 50/100/200; "
                "PERSISTENT_2: 125/250/500/1000); ignored for SCRATCH_2."),
    # Compute
    ConfigField("instanceFamilies", "array", ["c6i", "m6i", "r6i", "c5", "m5"],
                "x86_64 EC2 instance families (or exact types) Batch may launch."),
    ConfigField("spotEnabled", "boolean", True,
                "Run on spot first (price-capacity-optimized) with on-demand as fallback; false uses on-demand only."),
    ConfigField("minVcpus", "integer", 0,
                "vCPUs each compute environment keeps running when idle (0 costs nothing when idle)."),
    ConfigField("maxVcpus", "integer", 256,
                "Most vCPUs each compute environment may run at once (caps the bill)."),
    ConfigField("jobVcpus", "integer", 4,
                "Default vCPUs per job (the worker runs one CellProfiler process per vCPU, as memory allows, 2 GiB each)."),
    ConfigField("jobMemoryMib", "integer", 15000,
                "Default memory per job in MiB, for jobVcpus vCPUs; a message that sets only job_vcpu gets the same memory per vCPU."),
    ConfigField("jobMaxVcpus", "integer", 16,
                "Largest vCPU count one message may ask for."),
    ConfigField("jobMaxMemoryMib", "integer", 61440,
                "Largest memory (MiB) one message may ask for."),
    ConfigField("jobTimeoutSeconds", "integer", 14400,
                "A job attempt running longer than this is stopped (at least 60)."),
    ConfigField("jobRetryAttempts", "integer", 3,
                "Attempts per job for spot reclaims, host failures, image-pull/start failures and transient errors "
                "(1 to 10); running out of memory is retried with more memory instead (oomMaxRetries)."),
    ConfigField("oomMaxRetries", "integer", 2,
                "Times a job or array child that ran out of memory is resubmitted with twice the memory, at most "
                "jobMaxMemoryMib (0 to 10; 0 turns this off)."),
    ConfigField("logRetentionDays", "integer", 30,
                "CloudWatch Logs retention for job and Lambda logs (a value CloudWatch accepts, e.g. 7, 30, 90, 365)."),
    # Image
    ConfigField("cellprofilerImageTag", "string", "4.2.8",
                "Tag of the cellprofiler/cellprofiler base image the worker image is built FROM."),
    # Ingress
    ConfigField("lambdaTimeoutSeconds", "integer", 60,
                "Timeout of the ingress Lambda (10 to 900); the queue's visibility timeout is 6x this."),
    ConfigField("lambdaMemoryMib", "integer", 1024,
                "Memory (MiB) of the ingress Lambda (128 to 10240). It streams data files in flat memory (~57 MiB peak), so memory buys CPU: 1024 keeps a 64 MiB data file near 30 s (bench/bench_ingress_scale.py)."),
    ConfigField("queueBatchSize", "integer", 10,
                "SQS messages per Lambda invocation (2 to 10)."),
    ConfigField("maxReceiveCount", "integer", 5,
                "Deliveries of a failing message before it moves to the dead-letter queue (1 to 100)."),
    ConfigField("allowedJobArns", "array", [],
                "Extra job queue / job definition ARNs messages may name (this stack's own are always allowed)."),
    ConfigField("alarmEmail", "string", "",
                "E-mail subscribed to the dead-letter-queue alarm (empty: no subscription)."),
    # Tags
    ConfigField("costCenter", "string", "research-computing",
                "Value of the CostCenter cost-allocation tag on every resource."),
    ConfigField("owner", "string", "imaging-platform",
                "Value of the Owner tag on every resource (a team or person to ask about the bill)."),
)

#: Keys earlier releases had, with what replaced them: a stack that still sets one gets this advice.
RETIRED = {
    "powertoolsLayerVersion": "Powertools for AWS Lambda now ships inside the Lambda's code (pinned in "
                              "handlers/requirements.txt), so no region-specific layer is used",
}

NAT_STRATEGIES = ("Single", "OnePerAz")
# Words Batch accepts in instanceTypes besides EC2 families/types (x86_64 ones only).
BATCH_INSTANCE_KEYWORDS = ("optimal", "default_x86_64")
FSX_TYPES = ("SCRATCH_2", "PERSISTENT_1", "PERSISTENT_2")
FSX_THROUGHPUT = {"PERSISTENT_1": (50, 100, 200), "PERSISTENT_2": (125, 250, 500, 1000)}
# Values CloudWatch Logs accepts for retentionInDays (PutRetentionPolicy).
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827,
                      2192, 2557, 2922, 3288, 3653)
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_TAG_VALUE = re.compile(r"^[\w .:/=+@-]{1,256}$")
_ARN = re.compile(r"^arn:aws[a-z-]*:batch:[a-z0-9-]+:\d{12}:(job-queue|job-definition)/[A-Za-z0-9_:-]+$")
_IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class StackConfig:
    """Validated settings of one stack; field docs are in ``FIELDS``."""

    vpc_cidr: str
    availability_zones: int
    nat_gateways: str
    force_destroy: bool
    bucket_versioning: bool
    fsx_enabled: bool
    fsx_deployment_type: str
    fsx_storage_capacity_gib: int
    fsx_throughput_per_tib: int
    instance_families: tuple[str, ...]
    spot_enabled: bool
    min_vcpus: int
    max_vcpus: int
    job_vcpus: int
    job_memory_mib: int
    job_max_vcpus: int
    job_max_memory_mib: int
    job_timeout_seconds: int
    job_retry_attempts: int
    oom_max_retries: int
    log_retention_days: int
    cellprofiler_image_tag: str
    lambda_timeout_seconds: int
    lambda_memory_mib: int
    queue_batch_size: int
    max_receive_count: int
    allowed_job_arns: tuple[str, ...]
    alarm_email: str
    cost_center: str
    owner: str

    @property
    def queue_visibility_timeout_seconds(self) -> int:
        """SQS must hide a message longer than any Lambda run that handles it (AWS asks for 6x)."""
        return 6 * self.lambda_timeout_seconds


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def _parse(field: ConfigField, raw: Any) -> Any:
    """Convert one raw value (Pulumi hands strings; tests may hand Python values)."""
    if field.type == "string":
        if not isinstance(raw, str):
            raise ValueError("must be a string")
        return raw.strip()
    if field.type == "integer":
        if isinstance(raw, bool):
            raise ValueError("must be a whole number")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str) and re.fullmatch(r"\s*-?\d+\s*", raw):
            return int(raw)
        raise ValueError("must be a whole number")
    if field.type == "boolean":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        raise ValueError("must be true or false")
    if field.type == "array":
        value = raw
        if isinstance(raw, str):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                raise ValueError("must be a JSON list of strings, e.g. '[\"c6i\", \"m6i\"]'") from None
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError("must be a list of strings")
        return tuple(v.strip() for v in value)
    raise AssertionError(f"unknown config type {field.type}")


@lru_cache(maxsize=1)
def _ec2_instance_types() -> frozenset[str]:
    """Every instance type EC2's own API model knows (botocore ships it)."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("ec2")
    return frozenset(model.shape_for("InstanceType").enum)


def _family_problem(name: str) -> Optional[str]:
    """Why an instance family/type cannot be used, or None when it can."""
    if name in BATCH_INSTANCE_KEYWORDS:
        return None
    known = _ec2_instance_types()
    family = name.split(".", 1)[0]
    if "." in name:
        if name not in known:
            return f"'{name}' is not an EC2 instance type"
    elif not any(t.split(".", 1)[0] == family for t in known):
        return f"'{name}' is not an EC2 instance family"
    match = re.fullmatch(r"([a-z]+)(\d+)([a-z-]*)", family)
    if match and "g" in match.group(3):
        return f"'{name}' is a Graviton (arm64) family; the CellProfiler image is x86_64"
    return None


def _check(cfg: dict[str, Any]) -> list[str]:
    """Cross-field and range checks; each problem names its key and the fix."""
    problems: list[str] = []

    def bad(key: str, why: str) -> None:
        problems.append(f"{PROJECT}:{key} {why}")

    try:
        net = ipaddress.ip_network(cfg["vpcCidr"], strict=True)
        if net.version != 4 or not net.is_private:
            bad("vpcCidr", f"= {cfg['vpcCidr']!r} is not a private IPv4 range; use e.g. 10.0.0.0/16")
        elif not 16 <= net.prefixlen <= 24:
            bad("vpcCidr", f"= {cfg['vpcCidr']!r} has prefix /{net.prefixlen}; use a /16 to /24 range, e.g. 10.0.0.0/16")
    except ValueError as exc:
        bad("vpcCidr", f"= {cfg['vpcCidr']!r} is not a valid CIDR ({exc}); use e.g. 10.0.0.0/16")
    if not 2 <= cfg["availabilityZones"] <= 4:
        bad("availabilityZones", f"= {cfg['availabilityZones']} must be 2 to 4 (Batch and FSx need at least 2 AZs)")
    if cfg["natGateways"] not in NAT_STRATEGIES:
        bad("natGateways", f"= {cfg['natGateways']!r} must be one of {', '.join(NAT_STRATEGIES)}")

    fsx_type = cfg["fsxDeploymentType"]
    if cfg["fsxEnabled"]:
        if fsx_type not in FSX_TYPES:
            bad("fsxDeploymentType", f"= {fsx_type!r} must be one of {', '.join(FSX_TYPES)} "
                "(these link to S3 through a data repository association)")
        capacity = cfg["fsxStorageCapacityGib"]
        if capacity not in (1200, 2400) and (capacity <= 0 or capacity % 2400):
            below, above = max(1200, capacity // 2400 * 2400), (capacity // 2400 + 1) * 2400
            bad("fsxStorageCapacityGib", f"= {capacity} is not a valid {fsx_type} size: use 1200, 2400 or a "
                f"multiple of 2400 (nearest: {below} or {above})")
        allowed = FSX_THROUGHPUT.get(fsx_type)
        if allowed and cfg["fsxThroughputPerTib"] not in allowed:
            bad("fsxThroughputPerTib", f"= {cfg['fsxThroughputPerTib']} is not offered for {fsx_type}; "
                f"use one of {', '.join(map(str, allowed))}")

    families = cfg["instanceFamilies"]
    if not families:
        bad("instanceFamilies", "is empty; list at least one x86_64 family, e.g. [\"c6i\", \"m6i\"]")
    for family in families:
        why = _family_problem(family)
        if why:
            bad("instanceFamilies", f"entry {why}; use x86_64 families such as c6i, m6i, r6i, c5, m5")
    if len(set(families)) != len(families):
        bad("instanceFamilies", "lists a family twice; list each once")

    if cfg["minVcpus"] < 0:
        bad("minVcpus", f"= {cfg['minVcpus']} must be 0 or more")
    if cfg["maxVcpus"] < max(cfg["minVcpus"], 1):
        bad("maxVcpus", f"= {cfg['maxVcpus']} is below minVcpus = {cfg['minVcpus']}; "
            "raise maxVcpus or lower minVcpus")
    for key, low, high in (("jobVcpus", 1, 192), ("jobMaxVcpus", 1, 192), ("jobMemoryMib", 512, 1_572_864),
                           ("jobMaxMemoryMib", 512, 1_572_864), ("jobTimeoutSeconds", 60, 1_209_600),
                           ("jobRetryAttempts", 1, 10), ("lambdaTimeoutSeconds", 10, 900),
                           ("queueBatchSize", 2, 10), ("maxReceiveCount", 1, 100),
                           ("lambdaMemoryMib", 128, 10_240), ("oomMaxRetries", 0, 10)):
        if not low <= cfg[key] <= high:
            bad(key, f"= {cfg[key]} must be between {low} and {high}")
    if cfg["jobVcpus"] > cfg["jobMaxVcpus"]:
        bad("jobVcpus", f"= {cfg['jobVcpus']} exceeds jobMaxVcpus = {cfg['jobMaxVcpus']}; lower it or raise jobMaxVcpus")
    if cfg["jobMemoryMib"] > cfg["jobMaxMemoryMib"]:
        bad("jobMemoryMib", f"= {cfg['jobMemoryMib']} exceeds jobMaxMemoryMib = {cfg['jobMaxMemoryMib']}; "
            "lower it or raise jobMaxMemoryMib")
    if cfg["jobMaxVcpus"] > cfg["maxVcpus"]:
        bad("jobMaxVcpus", f"= {cfg['jobMaxVcpus']} exceeds maxVcpus = {cfg['maxVcpus']}, so such a job could "
            "never be placed; lower jobMaxVcpus or raise maxVcpus")
    if cfg["logRetentionDays"] not in LOG_RETENTION_DAYS:
        bad("logRetentionDays", f"= {cfg['logRetentionDays']} is not a CloudWatch retention; use one of "
            f"{', '.join(map(str, LOG_RETENTION_DAYS))}")
    if not _IMAGE_TAG.match(cfg["cellprofilerImageTag"]):
        bad("cellprofilerImageTag", f"= {cfg['cellprofilerImageTag']!r} is not a Docker tag; use e.g. 4.2.8")
    for arn in cfg["allowedJobArns"]:
        if not _ARN.match(arn):
            bad("allowedJobArns", f"entry {arn!r} is not a Batch job queue or job definition ARN "
                "(arn:<partition>:batch:<region>:<account>:job-queue/<name>)")
    if cfg["alarmEmail"] and not _EMAIL.match(cfg["alarmEmail"]):
        bad("alarmEmail", f"= {cfg['alarmEmail']!r} is not an e-mail address; set one or leave it empty")
    for key in ("costCenter", "owner"):
        if not _TAG_VALUE.match(cfg[key]):
            bad(key, f"= {cfg[key]!r} cannot be a tag value; use 1-256 letters, digits, spaces or _.:/=+-@")
    return problems


def load_config(raw: Mapping[str, Any]) -> StackConfig:
    """Build a StackConfig from raw values (missing keys take the schema default).

    Raises ConfigError listing every bad key at once, so a user fixes them in
    one round rather than one `pulumi up` per mistake.
    """
    by_name = {f.name: f for f in FIELDS}
    problems = [f"{PROJECT}:{key} is no longer used: {RETIRED[key]}; remove it with `pulumi config rm {key}`"
                if key in RETIRED else
                f"{PROJECT}:{key} is not a setting of this project; remove it "
                f"(known: {', '.join(sorted(by_name))})" for key in raw if key not in by_name]
    values: dict[str, Any] = {}
    for field in FIELDS:
        value = raw.get(field.name)
        if value is None:
            values[field.name] = tuple(field.default) if field.type == "array" else field.default
            continue
        try:
            values[field.name] = _parse(field, value)
        except ValueError as exc:
            problems.append(f"{PROJECT}:{field.name} {exc} (got {value!r}); "
                            f"fix with `pulumi config set {field.name} ...`")
            values[field.name] = tuple(field.default) if field.type == "array" else field.default
    problems += _check(values)
    if problems:
        raise ConfigError("invalid stack config:\n  - " + "\n  - ".join(problems))
    return StackConfig(**{_snake(name): value for name, value in values.items()})


def load_from_pulumi(getter: Callable[[str], Optional[str]]) -> StackConfig:
    """Read every schema key (and every retired one, to say what replaced it) through ``getter``
    (``pulumi.Config().get``)."""
    names = [f.name for f in FIELDS] + list(RETIRED)
    return load_config({name: v for name in names if (v := getter(name)) is not None})


def markdown_reference(fields: Sequence[ConfigField] = FIELDS) -> str:
    """The config reference table for docs/CONFIG.md (tests keep the file in sync)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in fields:
        default = json.dumps(list(f.default) if f.type == "array" else f.default)
        lines.append(f"| `{f.name}` | {f.type} | `{default}` | {f.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_reference(), end="")
