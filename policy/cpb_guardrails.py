"""CrossGuard policies for the Cell Painting Batch stack (and any stack like it).

Run with ``pulumi preview --policy-pack policy``. Resource policies look at one
resource's inputs; stack policies look at how resources relate (which bucket
a public-access block covers, which groups an FSx file system uses), through
the engine's property dependencies first and known values second.

During a first preview some values (IDs, ARNs) are unknown; reading one
raises the framework's ``UnknownValueError`` and that policy is skipped for
that resource until ``pulumi up``, where the values are known and it runs.
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Iterable, Optional

from pulumi_policy import (
    EnforcementLevel,
    PolicyResource,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

BUCKET = "aws:s3/bucket:Bucket"
BUCKET_V2 = "aws:s3/bucketV2:BucketV2"
PUBLIC_ACCESS_BLOCK = "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
BUCKET_SSE = ("aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
              "aws:s3/bucketServerSideEncryptionConfigurationV2:BucketServerSideEncryptionConfigurationV2")
BUCKET_POLICY = "aws:s3/bucketPolicy:BucketPolicy"
QUEUE = "aws:sqs/queue:Queue"
TOPIC = "aws:sns/topic:Topic"
EVENT_TARGET = "aws:cloudwatch/eventTarget:EventTarget"
LAMBDA_INVOKE_CONFIG = "aws:lambda/functionEventInvokeConfig:FunctionEventInvokeConfig"
IAM_DOCUMENT_TYPES = {"aws:iam/rolePolicy:RolePolicy": "policy", "aws:iam/policy:Policy": "policy",
                      "aws:iam/userPolicy:UserPolicy": "policy", "aws:iam/groupPolicy:GroupPolicy": "policy"}
COMPUTE_ENVIRONMENT = "aws:batch/computeEnvironment:ComputeEnvironment"
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
INSTANCE = "aws:ec2/instance:Instance"
SUBNET = "aws:ec2/subnet:Subnet"
AWSX_VPC = "awsx:ec2:Vpc"
JOB_DEFINITION = "aws:batch/jobDefinition:JobDefinition"
LOG_GROUP = "aws:cloudwatch/logGroup:LogGroup"
LUSTRE = "aws:fsx/lustreFileSystem:LustreFileSystem"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
SG_INGRESS_RULE = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
SG_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"
LUSTRE_PORTS = ((988, 988), (1018, 1023))
#: Keys under an output's `_cpb/` that only the Lambdas (and `cpb requeue`) may write (docs/CONTRACTS.md).
CONTROL_RECORDS = ("*/_cpb/submission-*", "*/_cpb/lease.json", "*/_cpb/events/*", "*/_cpb/refusal-*")
#: The job tag whose value names the stack; stopping jobs is allowed only on jobs carrying it.
JOB_STACK_TAG = "cpb:stack"
JOB_STOPPING_ACTIONS = ("batch:TerminateJob", "batch:CancelJob")
#: Worker exit codes a Batch retry cannot fix or must not repeat: bad input, pipeline error, superseded
#: by another run, out of memory (the job-events Lambda resubmits it with more memory).
NEVER_RETRY_EXIT_CODES = ("2", "3", "5", "137")
MAX_RETRY_RULES = 5
REQUIRED_TAGS = ("Project", "Stack", "CostCenter")
SSE_ALGORITHMS = ("AES256", "aws:kms", "aws:kms:dsse")


# ------------------------------------------------------------------ helpers

def as_list(value: Any) -> list:
    """A list from a list, one value (IAM allows a string wherever a list goes), or None.

    The engine hands policies read-only proxies (Sequence/Mapping, not list/dict),
    so the checks are on the abstract types.
    """
    if value is None:
        return []
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return list(value)
    return [value]


def as_json(value: Any) -> Any:
    """Policy documents and provider settings arrive as JSON text or as objects."""
    return json.loads(value) if isinstance(value, str) else value


def related(resource: PolicyResource, prop: str, candidates: Iterable[PolicyResource],
            value_key: Optional[str] = None) -> bool:
    """Does ``resource.props[prop]`` point at one of ``candidates``?

    Property dependencies (what the engine records) decide when present; else
    the value is compared with each candidate's ``value_key`` output.
    """
    candidates = list(candidates)
    deps = {dep.urn for dep in (resource.property_dependencies or {}).get(prop, [])}
    if deps:
        return any(c.urn in deps for c in candidates)
    value = resource.props.get(prop)
    return value_key is not None and value is not None and any(c.props.get(value_key) == value for c in candidates)


def of_type(resources: Iterable[PolicyResource], *types: str) -> list[PolicyResource]:
    return [r for r in resources if r.resource_type in types]


def statements(document: Any) -> list[dict]:
    return as_list(as_json(document).get("Statement"))


# ------------------------------------------------------------------ S3

def _buckets(args: StackValidationArgs) -> list[PolicyResource]:
    return of_type(args.resources, BUCKET, BUCKET_V2)


def validate_public_access_blocked(args: StackValidationArgs, report: ReportViolation) -> None:
    blocks = of_type(args.resources, PUBLIC_ACCESS_BLOCK)
    flags = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
    for block in blocks:
        off = [f for f in flags if block.props.get(f) is not True]
        if off:
            report(f"public access block {block.name} leaves {', '.join(off)} off; set all four to true", block.urn)
    for bucket in _buckets(args):
        covering = [b for b in blocks if related(b, "bucket", [bucket], "bucket")]
        if not covering:
            report(f"bucket {bucket.name} has no BucketPublicAccessBlock; add one with all four flags true",
                   bucket.urn)


def validate_bucket_encrypted(args: StackValidationArgs, report: ReportViolation) -> None:
    configs = of_type(args.resources, *BUCKET_SSE)
    for bucket in _buckets(args):
        mine = [c for c in configs if related(c, "bucket", [bucket], "bucket")]
        algorithms = [rule.get("applyServerSideEncryptionByDefault", {}).get("sseAlgorithm")
                      for c in mine for rule in as_list(c.props.get("rules"))]
        if not algorithms or not all(a in SSE_ALGORITHMS for a in algorithms):
            report(f"bucket {bucket.name} has no default server-side encryption; add a "
                   "BucketServerSideEncryptionConfiguration with sseAlgorithm AES256 or aws:kms", bucket.urn)


def _denies_plain_http(statement: dict) -> bool:
    condition = statement.get("Condition", {})
    secure = condition.get("Bool", {}).get("aws:SecureTransport")
    actions = as_list(statement.get("Action"))
    return (statement.get("Effect") == "Deny" and str(secure).lower() == "false"
            and any(a in ("*", "s3:*") for a in actions))


def validate_bucket_tls_only(args: StackValidationArgs, report: ReportViolation) -> None:
    policies = of_type(args.resources, BUCKET_POLICY)
    for bucket in _buckets(args):
        mine = [p for p in policies if related(p, "bucket", [bucket], "bucket")]
        covered: set[str] = set()
        for policy in mine:
            for statement in statements(policy.props.get("policy")):
                if _denies_plain_http(statement):
                    covered |= {"bucket" if not r.endswith("/*") else "objects"
                                for r in as_list(statement.get("Resource"))}
        if covered != {"bucket", "objects"}:
            report(f"bucket {bucket.name} accepts plain HTTP; add a bucket policy denying s3:* on the bucket "
                   "and bucket/* when aws:SecureTransport is false", bucket.urn)


# ------------------------------------------------------------------ SQS

def validate_queue_encrypted(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type != QUEUE:
        return
    if args.props.get("sqsManagedSseEnabled") is not True and not args.props.get("kmsMasterKeyId"):
        report(f"queue {args.name} is not encrypted; set sqs_managed_sse_enabled=True or kms_master_key_id")


def validate_topic_key_usable_by_alarms(args: ResourceValidationArgs, report: ReportViolation) -> None:
    """Topics are encrypted, and not with alias/aws/sns: CloudWatch alarms cannot publish to a topic
    under that AWS-managed key (its policy cannot grant CloudWatch kms:GenerateDataKey)."""
    if args.resource_type != TOPIC:
        return
    key = args.props.get("kmsMasterKeyId")
    if not key:
        report(f"topic {args.name} is not encrypted; set kms_master_key_id to a customer-managed key")
    elif str(key).endswith("alias/aws/sns"):
        report(f"topic {args.name} uses alias/aws/sns, which CloudWatch alarms cannot publish to; "
               "use a customer-managed key whose policy allows cloudwatch.amazonaws.com")


def _dead_letter_arns(resource: PolicyResource) -> list[Any]:
    """Queue ARNs an EventBridge target or a Lambda's asynchronous invocations park failures in."""
    if resource.resource_type == EVENT_TARGET:
        return [(resource.props.get("deadLetterConfig") or {}).get("arn")]
    if resource.resource_type == LAMBDA_INVOKE_CONFIG:
        return [((resource.props.get("destinationConfig") or {}).get("onFailure") or {}).get("destination")]
    return []


def validate_queue_has_dlq(args: StackValidationArgs, report: ReportViolation) -> None:
    queues = of_type(args.resources, QUEUE)
    parkers = of_type(args.resources, EVENT_TARGET, LAMBDA_INVOKE_CONFIG)
    for queue in queues:
        redrive = queue.props.get("redrivePolicy")
        if redrive and as_json(redrive).get("deadLetterTargetArn"):
            continue
        is_dead_letter = any(other is not queue and related(other, "redrivePolicy", [queue])
                             for other in queues)
        is_dead_letter = is_dead_letter or any(
            queue.props.get("arn") is not None and queue.props.get("arn") in _dead_letter_arns(parker)
            for parker in parkers)
        if not is_dead_letter:
            report(f"queue {queue.name} has no dead-letter queue; set a redrive_policy with deadLetterTargetArn "
                   "and maxReceiveCount so failing messages are kept, not retried forever", queue.urn)


# ------------------------------------------------------------------ IAM

def _iam_documents(args: ResourceValidationArgs) -> list[dict]:
    key = IAM_DOCUMENT_TYPES.get(args.resource_type)
    if key is None or args.props.get(key) is None:
        return []
    return statements(args.props[key])


def validate_no_wildcard_actions(args: ResourceValidationArgs, report: ReportViolation) -> None:
    for statement in _iam_documents(args):
        if statement.get("Effect") != "Allow":
            continue
        if "NotAction" in statement:
            report(f"{args.name}: an Allow with NotAction grants every other action; list the actions instead")
        wild = [a for a in as_list(statement.get("Action")) if "*" in a or "?" in a]
        if wild:
            report(f"{args.name}: statement {statement.get('Sid', '')!r} allows wildcard actions {wild}; "
                   "name each action")


def _catalog_resource_types(action: str) -> Optional[list[str]]:
    """Resource types IAM's action catalog lists for an action (None: unknown action)."""
    from parliament import iam_definition  # IAM's own catalog, as parliament ships it

    service, _, name = action.partition(":")
    for entry in iam_definition:
        if entry["prefix"] == service.lower():
            for privilege in entry["privileges"]:
                if privilege["privilege"].lower() == name.lower():
                    return [r["resource_type"] for r in privilege["resource_types"] if r["resource_type"]]
    return None


def validate_no_star_resource_with_arn(args: ResourceValidationArgs, report: ReportViolation) -> None:
    for statement in _iam_documents(args):
        if statement.get("Effect") != "Allow" or "*" not in as_list(statement.get("Resource")):
            continue
        scoped = [a for a in as_list(statement.get("Action")) if _catalog_resource_types(a) != []]
        if scoped:
            report(f"{args.name}: statement {statement.get('Sid', '')!r} grants {scoped} on '*' although "
                   "they take resource ARNs; name this stack's ARNs")


# ------------------------------------------------------------------ Batch hosts

def validate_imdsv2(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type not in (LAUNCH_TEMPLATE, INSTANCE):
        return
    options = args.props.get("metadataOptions") or {}
    if options.get("httpTokens") != "required" and options.get("httpEndpoint") != "disabled":
        report(f"{args.name} allows IMDSv1; set metadata_options http_tokens='required'")


def validate_compute_uses_launch_template(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type != COMPUTE_ENVIRONMENT:
        return
    resources = args.props.get("computeResources") or {}
    if resources.get("type") in ("EC2", "SPOT") and not resources.get("launchTemplate"):
        report(f"compute environment {args.name} has no launch template, so its hosts get the default "
               "(IMDSv1-enabled) metadata options; give it one that requires IMDSv2")


def _subnet_id(subnet: PolicyResource) -> Optional[str]:
    arn = subnet.props.get("arn")
    return arn.rsplit("/", 1)[-1] if isinstance(arn, str) and "/" in arn else subnet.props.get("id")


def validate_batch_hosts_private(args: StackValidationArgs, report: ReportViolation) -> None:
    public = {_subnet_id(s) for s in of_type(args.resources, SUBNET) if s.props.get("mapPublicIpOnLaunch")}
    for vpc in of_type(args.resources, AWSX_VPC):  # awsx reports which of its subnets are public
        public |= set(as_list(vpc.props.get("publicSubnetIds")))
    templates = of_type(args.resources, LAUNCH_TEMPLATE)
    for template in templates:
        for interface in as_list(template.props.get("networkInterfaces")):
            if str(interface.get("associatePublicIpAddress")).lower() == "true":
                report(f"launch template {template.name} gives hosts public IPs; drop "
                       "associate_public_ip_address", template.urn)
    for env in of_type(args.resources, COMPUTE_ENVIRONMENT):
        subnets = as_list((env.props.get("computeResources") or {}).get("subnets"))
        exposed = sorted(s for s in subnets if s in public)
        if exposed:
            report(f"compute environment {env.name} launches hosts in public subnets {exposed}; "
                   "use the VPC's private subnets", env.urn)


def validate_no_privileged_containers(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type != JOB_DEFINITION:
        return
    containers = []
    if args.props.get("containerProperties"):
        containers.append(as_json(args.props["containerProperties"]))
    for node_range in as_list((as_json(args.props.get("nodeProperties") or "{}") or {}).get("nodeRangeProperties")):
        containers.append(node_range.get("container") or {})
    for task in as_list((as_json(args.props.get("ecsProperties") or "{}") or {}).get("taskProperties")):
        containers += as_list(task.get("containers"))
    for container in containers:
        if container.get("privileged") is True:
            report(f"job definition {args.name} runs a privileged container; remove privileged=true")


# ------------------------------------------------------------------ logs

def validate_log_retention(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type != LOG_GROUP:
        return
    days = args.props.get("retentionInDays")
    if not days or days <= 0:
        report(f"log group {args.name} keeps logs forever (and bills for them); set retention_in_days")


# ------------------------------------------------------------------ FSx network

def _rule_problems(rule: Mapping[str, Any], compute_ids: set[str]) -> list[str]:
    """Why one ingress rule is more open than 'Lustre ports from the compute group and itself'."""
    problems = []
    low, high = int(rule.get("fromPort", -1)), int(rule.get("toPort", -1))
    if str(rule.get("protocol")).lower() not in ("tcp", "6") or not any(
            lo <= low and high <= hi for lo, hi in LUSTRE_PORTS):
        problems.append(f"{rule.get('protocol')} {low}-{high} is not a Lustre port (TCP 988, 1018-1023)")
    for key in ("cidrBlocks", "ipv6CidrBlocks", "prefixListIds", "cidrIpv4", "cidrIpv6", "prefixListId"):
        if rule.get(key):
            problems.append(f"it admits {key} {rule[key]}; admit only the compute security group")
    groups = [g for key in ("securityGroups", "referencedSecurityGroupId", "sourceSecurityGroupId")
              for g in as_list(rule.get(key)) if g]
    foreign = [g for g in groups if compute_ids and g not in compute_ids]
    if foreign:
        problems.append(f"it admits groups {foreign} that no compute environment uses")
    return problems


def validate_fsx_security_groups(args: StackValidationArgs, report: ReportViolation) -> None:
    groups = of_type(args.resources, SECURITY_GROUP)
    environments = of_type(args.resources, COMPUTE_ENVIRONMENT)
    compute_groups = [g for g in groups if any(related(e, "computeResources", [g]) for e in environments)]
    compute_ids = {i for e in environments
                   for i in as_list((e.props.get("computeResources") or {}).get("securityGroupIds"))}
    for fs in of_type(args.resources, LUSTRE):
        fsx_groups = [g for g in groups if related(fs, "securityGroupIds", [g])]
        if not fsx_groups:
            fsx_groups = [g for g in groups if g.props.get("id") in as_list(fs.props.get("securityGroupIds"))]
        for group in fsx_groups:
            deps = {d.urn for d in (group.property_dependencies or {}).get("ingress", [])}
            strangers = sorted(urn for urn in deps - {g.urn for g in compute_groups} - {group.urn}
                               if any(g.urn == urn for g in groups))
            if strangers:
                report(f"FSx security group {group.name} admits groups other than the compute group: "
                       f"{strangers}", group.urn)
            rules = list(as_list(group.props.get("ingress")))
            rules += [r.props for r in of_type(args.resources, SG_INGRESS_RULE, SG_RULE)
                      if related(r, "securityGroupId", [group]) and r.props.get("type", "ingress") == "ingress"]
            for rule in rules:
                for problem in _rule_problems(rule, compute_ids):
                    report(f"FSx security group {group.name}: {problem}", group.urn)


# ------------------------------------------------------------------ tags

def _provider_tags(provider: Any) -> dict[str, str]:
    if provider is None:
        return {}
    default_tags = as_json(provider.props.get("defaultTags") or "{}") or {}
    return dict(default_tags.get("tags") or {})


def validate_cost_tags(args: StackValidationArgs, report: ReportViolation) -> None:
    for resource in args.resources:
        if not resource.resource_type.startswith("aws:"):
            continue
        tags = _provider_tags(resource.provider)
        own = resource.props.get("tags") or {}
        if isinstance(own, Mapping):
            tags.update({k: v for k, v in own.items() if v is not None})
        missing = [t for t in REQUIRED_TAGS if not str(tags.get(t, "")).strip()]
        if missing:
            report(f"{resource.resource_type} {resource.name} lacks cost-allocation tags {missing}; give its "
                   "AWS provider default_tags with Project, Stack and CostCenter", resource.urn)


# ------------------------------------------------------------------ control records, job stopping

def _allows(statement: dict, action: str) -> bool:
    return statement.get("Effect") == "Allow" and any(
        a == action or a in ("*", f"{action.split(':')[0]}:*") for a in as_list(statement.get("Action")))


def _object_wildcards(statement: dict) -> list[str]:
    """Bucket-wide object resources a statement names (``arn:...:s3:::<bucket>/*`` or ``*``)."""
    return [r for r in as_list(statement.get("Resource"))
            if r == "*" or (str(r).startswith("arn:") and ":s3:::" in str(r) and str(r).endswith("/*")
                            and str(r).count("/") == 1)]


def validate_control_records_denied_to_bucket_writers(args: ResourceValidationArgs, report: ReportViolation) -> None:
    """A principal that may write or delete any object of a bucket (the worker's job role) must be
    explicitly denied the records exactly-once, the lease and job events rely on."""
    document = _iam_documents(args)
    denied: dict[str, set[str]] = {}
    for statement in document:
        if statement.get("Effect") == "Deny":
            for action in ("s3:PutObject", "s3:DeleteObject"):
                if any(a in (action, "s3:*", "*") for a in as_list(statement.get("Action"))):
                    denied.setdefault(action, set()).update(map(str, as_list(statement.get("Resource"))))
    for statement in document:
        for action in ("s3:PutObject", "s3:DeleteObject"):
            if not _allows(statement, action):
                continue
            for wildcard in _object_wildcards(statement):
                bucket = wildcard[:-2]  # "" for Resource "*": then a deny in any bucket must name the keys
                covered = denied.get(action, set())
                missing = [pattern for pattern in CONTROL_RECORDS
                           if not ({f"{bucket}/{pattern}", f"{bucket}/*"} & covered
                                   or (wildcard == "*" and any(r.endswith(f"/{pattern}") for r in covered)))]
                if missing:
                    report(f"{args.name}: statement {statement.get('Sid', '')!r} allows {action} on {wildcard} "
                           f"without denying {missing}; add a Deny of s3:PutObject and s3:DeleteObject on "
                           "those keys so only the Lambdas write submission records, leases, job events and refusals")


def validate_job_stopping_limited_to_own_jobs(args: ResourceValidationArgs, report: ReportViolation) -> None:
    """TerminateJob/CancelJob only on jobs tagged with a named stack (``aws:ResourceTag/cpb:stack``)."""
    for statement in _iam_documents(args):
        stopping = [a for a in JOB_STOPPING_ACTIONS if _allows(statement, a)]
        if not stopping:
            continue
        conditions = statement.get("Condition") or {}
        value = (conditions.get("StringEquals") or {}).get(f"aws:ResourceTag/{JOB_STACK_TAG}")
        if not isinstance(value, str) or not value or any(c in value for c in "*?$"):
            report(f"{args.name}: statement {statement.get('Sid', '')!r} allows {stopping} on any job; add "
                   f"Condition StringEquals aws:ResourceTag/{JOB_STACK_TAG} = <the stack> so it can stop only "
                   "this stack's jobs")


# ------------------------------------------------------------------ Batch retries

def _exit_pattern_matches(pattern: str, code: str) -> bool:
    return code.startswith(pattern[:-1]) if pattern.endswith("*") else code == pattern


def validate_retry_strategy(args: ResourceValidationArgs, report: ReportViolation) -> None:
    """At most 5 rules (Batch refuses more at `pulumi up`), a final catch-all EXIT (unmatched failures
    are otherwise retried), and no RETRY of an exit code a new attempt cannot fix or must not repeat."""
    if args.resource_type != JOB_DEFINITION:
        return
    strategy = args.props.get("retryStrategy") or {}
    rules = as_list(strategy.get("evaluateOnExits"))
    if not rules:
        if int(strategy.get("attempts") or 1) > 1:
            report(f"job definition {args.name} retries every failure; give evaluate_on_exits rules ending in a "
                   "catch-all EXIT")
        return
    if len(rules) > MAX_RETRY_RULES:
        report(f"job definition {args.name} has {len(rules)} retry rules; AWS Batch accepts at most "
               f"{MAX_RETRY_RULES}")
    last = rules[-1]
    if str(last.get("action", "")).lower() != "exit" or not any(last.get(k) == "*" for k in (
            "onExitCode", "onReason", "onStatusReason")) or len([k for k in ("onExitCode", "onReason",
                                                                             "onStatusReason") if k in last]) != 1:
        report(f"job definition {args.name}: the last retry rule is not a catch-all EXIT, so failures no rule "
               "names are retried; end with {on_exit_code: '*', action: 'exit'}")
    for rule in rules:
        if str(rule.get("action", "")).lower() != "retry" or "onExitCode" not in rule:
            continue
        retried = [code for code in NEVER_RETRY_EXIT_CODES if _exit_pattern_matches(str(rule["onExitCode"]), code)]
        if retried:
            report(f"job definition {args.name} retries exit code(s) {retried} with the same job: 2/3 are input and "
                   "pipeline errors, 5 a superseded run, 137 out of memory (the job-events Lambda resubmits it "
                   "with more memory)")


# ------------------------------------------------------------------ EventBridge

def validate_event_targets_keep_failures(args: ResourceValidationArgs, report: ReportViolation) -> None:
    """An event EventBridge cannot deliver is parked in a dead-letter queue, not dropped."""
    if args.resource_type != EVENT_TARGET:
        return
    if not (args.props.get("deadLetterConfig") or {}).get("arn"):
        report(f"event target {args.name} drops events it cannot deliver; set dead_letter_config to an SQS queue")


# ------------------------------------------------------------------ partitions

_ARN_PARTITION = re.compile(r"\barn:([a-z0-9-]+):")


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


@functools.lru_cache(maxsize=None)
def _region_partition(region: Optional[str]) -> Optional[str]:
    """The partition botocore's table puts a region in (None when unknown)."""
    if not region:
        return None
    import botocore.session

    try:
        return botocore.session.get_session().get_partition_for_region(region)
    except Exception:  # noqa: BLE001 - an unknown region is the provider's error to report
        return None


def validate_arn_partition(args: ResourceValidationArgs, report: ReportViolation) -> None:
    """Every ARN a resource names belongs to the partition of its provider's region: an ``arn:aws:``
    literal in a GovCloud stack (or the reverse) fails only at `pulumi up`, half-way through."""
    if not args.resource_type.startswith("aws:") or args.provider is None:
        return
    expected = _region_partition(args.provider.props.get("region"))
    if expected is None:
        return
    wrong = sorted({m.group(0) + "..." for text in _strings(args.props) for m in _ARN_PARTITION.finditer(text)
                    if m.group(1) != expected})
    if wrong:
        report(f"{args.resource_type} {args.name} names ARNs of another partition ({', '.join(wrong)}) although its "
               f"region is in {expected}; derive ARNs from the region's partition")


# ------------------------------------------------------------------ the pack

def _resource(name: str, description: str, validate: Callable) -> ResourceValidationPolicy:
    return ResourceValidationPolicy(name=name, description=description, validate=validate,
                                    enforcement_level=EnforcementLevel.MANDATORY)


def _stack(name: str, description: str, validate: Callable) -> StackValidationPolicy:
    return StackValidationPolicy(name=name, description=description, validate=validate,
                                 enforcement_level=EnforcementLevel.MANDATORY)


POLICIES = [
    _stack("s3-public-access-blocked", "Every bucket has a public access block with all four flags on.",
           validate_public_access_blocked),
    _stack("s3-encrypted", "Every bucket encrypts objects by default.", validate_bucket_encrypted),
    _stack("s3-tls-only", "Every bucket's policy denies requests not made over TLS.", validate_bucket_tls_only),
    _resource("sqs-encrypted", "Queues are encrypted at rest.", validate_queue_encrypted),
    _resource("sns-alarm-topic-key", "Topics are encrypted with a key CloudWatch alarms can use "
              "(not alias/aws/sns).", validate_topic_key_usable_by_alarms),
    _stack("sqs-dead-letter-queue", "Every queue has a dead-letter queue or is one.", validate_queue_has_dlq),
    _resource("iam-no-wildcard-actions", "IAM statements name their actions.", validate_no_wildcard_actions),
    _resource("iam-no-star-resource-with-arn",
              "'*' resources only for actions IAM cannot scope to an ARN.", validate_no_star_resource_with_arn),
    _resource("ec2-imdsv2-required", "Launch templates and instances require IMDSv2.", validate_imdsv2),
    _resource("batch-launch-template", "EC2/spot compute environments use a launch template.",
              validate_compute_uses_launch_template),
    _stack("batch-private-hosts", "Batch hosts get no public IPs and run in private subnets.",
           validate_batch_hosts_private),
    _resource("batch-no-privileged", "Job definitions never run privileged containers.",
              validate_no_privileged_containers),
    _resource("logs-retention", "Log groups have a retention period.", validate_log_retention),
    _stack("fsx-lustre-ingress", "FSx security groups admit only Lustre ports from the compute group and "
           "themselves.", validate_fsx_security_groups),
    _stack("cost-allocation-tags", "Every AWS resource carries Project, Stack and CostCenter tags.",
           validate_cost_tags),
    _resource("iam-control-records-protected", "A principal that may write any object of a bucket is denied "
              "the submission records, leases and job events.", validate_control_records_denied_to_bucket_writers),
    _resource("batch-stop-own-jobs-only", "TerminateJob/CancelJob only on jobs tagged with this stack.",
              validate_job_stopping_limited_to_own_jobs),
    _resource("batch-retry-strategy", "Job definitions: at most 5 retry rules, a final catch-all EXIT, and no "
              "retry of exit codes 2, 3, 5 or 137.", validate_retry_strategy),
    _resource("events-target-dead-letter", "EventBridge targets park undeliverable events in a dead-letter "
              "queue.", validate_event_targets_keep_failures),
    _resource("arn-partition", "Every ARN a resource names is in its region's partition.", validate_arn_partition),
]
