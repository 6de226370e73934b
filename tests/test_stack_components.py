"""Per component: the properties issue 2 promises, asserted on the registered inputs."""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from stack_harness import ACCOUNT, REGION, REPO, Recorded, policy_document, program

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BUCKET = "aws:s3/bucket:Bucket"
SG = "aws:ec2/securityGroup:SecurityGroup"
CE = "aws:batch/computeEnvironment:ComputeEnvironment"
QUEUE = "aws:sqs/queue:Queue"
FUNCTION = "aws:lambda/function:Function"
ALARM = "aws:cloudwatch/metricAlarm:MetricAlarm"


@pytest.fixture(params=["true", "false"], ids=["fsx-on", "fsx-off"])
def stack(request: pytest.FixtureRequest) -> Recorded:
    return program(fsxEnabled=request.param)


def vpc_state(recorded: Recorded) -> dict:
    return recorded.one("awsx:ec2:Vpc").state


# ---------------------------------------------------------------- Network

def test_vpc_spans_two_azs_with_private_subnets_and_one_nat(stack: Recorded) -> None:
    vpc = stack.one("awsx:ec2:Vpc").inputs
    assert vpc["numberOfAvailabilityZones"] == 2
    assert vpc["cidrBlock"] == "10.0.0.0/16"
    assert {"type": "Private"} in vpc["subnetSpecs"]
    assert vpc["natGateways"] == {"strategy": "Single"}


def test_nat_strategy_and_cidr_come_from_config() -> None:
    vpc = program(fsxEnabled="false", natGateways="OnePerAz", vpcCidr="10.20.0.0/20",
                  availabilityZones="3").one("awsx:ec2:Vpc").inputs
    assert vpc["natGateways"] == {"strategy": "OnePerAz"}
    assert (vpc["cidrBlock"], vpc["numberOfAvailabilityZones"]) == ("10.20.0.0/20", 3)


def test_s3_gateway_endpoint_is_on_every_route_table(stack: Recorded) -> None:
    endpoint = stack.one("aws:ec2/vpcEndpoint:VpcEndpoint").inputs
    assert endpoint["vpcEndpointType"] == "Gateway"
    assert endpoint["serviceName"] == f"com.amazonaws.{REGION}.s3"
    assert endpoint["vpcId"] == vpc_state(stack)["vpcId"]
    tables = [ref["id"] for ref in vpc_state(stack)["routeTables"]]
    assert sorted(endpoint["routeTableIds"]) == sorted(tables) and len(tables) == 4


def test_compute_group_admits_only_lustre_from_the_file_servers(stack: Recorded) -> None:
    compute = stack.one(SG, "compute")
    assert not compute.inputs.get("ingress")  # no inline rules: they would fight the rule resources
    assert compute.inputs["egress"] and compute.inputs["vpcId"] == vpc_state(stack)["vpcId"]
    rules = [r.inputs for r in stack.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")]
    assert sorted((r["fromPort"], r["toPort"]) for r in rules) == [(988, 988), (1018, 1023)]
    for rule in rules:
        assert rule["securityGroupId"] == compute.id and rule["ipProtocol"] == "tcp"
        assert rule["referencedSecurityGroupId"] == stack.one(SG, "fsx").id
        assert not rule.get("cidrIpv4") and not rule.get("cidrIpv6") and not rule.get("prefixListId")


def test_fsx_group_admits_only_lustre_ports_from_compute_and_itself(stack: Recorded) -> None:
    compute_id = stack.one(SG, "compute").id
    rules = stack.one(SG, "fsx").inputs["ingress"]
    assert sorted((r["fromPort"], r["toPort"]) for r in rules) == [(988, 988), (1018, 1023)]
    for rule in rules:
        assert rule["protocol"] == "tcp"
        assert rule["securityGroups"] == [compute_id]
        assert rule["self"] is True
        assert not rule.get("cidrBlocks") and not rule.get("ipv6CidrBlocks") and not rule.get("prefixListIds")


def test_compute_runs_in_private_subnets_with_the_compute_group(stack: Recorded) -> None:
    private = vpc_state(stack)["privateSubnetIds"]
    for env in stack.of_type(CE):
        resources = env.inputs["computeResources"]
        assert resources["subnets"] == private
        assert resources["securityGroupIds"] == [stack.one(SG, "compute").id]


# ---------------------------------------------------------------- LustreStorage

def test_bucket_blocks_public_access_and_acls(stack: Recorded) -> None:
    bucket = stack.one(BUCKET)
    block = stack.one("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock").inputs
    assert block["bucket"] == bucket.id
    assert all(block[k] is True for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls",
                                           "restrictPublicBuckets"))
    ownership = stack.one("aws:s3/bucketOwnershipControls:BucketOwnershipControls").inputs
    assert ownership["rule"]["objectOwnership"] == "BucketOwnerEnforced"


def test_bucket_is_encrypted_versioned_and_tls_only(stack: Recorded) -> None:
    bucket = stack.one(BUCKET)
    sse = stack.one("aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration").inputs
    assert sse["bucket"] == bucket.id
    assert sse["rules"][0]["applyServerSideEncryptionByDefault"]["sseAlgorithm"] == "AES256"
    versioning = stack.one("aws:s3/bucketVersioning:BucketVersioning").inputs
    assert versioning["versioningConfiguration"]["status"] == "Enabled"
    policy = stack.one("aws:s3/bucketPolicy:BucketPolicy")
    [statement] = policy_document(policy)["Statement"]
    assert statement["Effect"] == "Deny" and statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    arn = bucket.state["arn"]
    assert sorted(statement["Resource"]) == sorted([arn, f"{arn}/*"])


def test_force_destroy_is_per_stack() -> None:
    assert program(fsxEnabled="true").one(BUCKET).inputs["forceDestroy"] is False
    assert program(fsxEnabled="false", forceDestroy="true").one(BUCKET).inputs["forceDestroy"] is True


def test_fsx_linked_to_the_bucket_with_auto_import_and_export() -> None:
    stack = program(fsxEnabled="true")
    fs = stack.one("aws:fsx/lustreFileSystem:LustreFileSystem")
    assert (fs.inputs["deploymentType"], fs.inputs["storageCapacity"]) == ("SCRATCH_2", 1200)
    assert "perUnitStorageThroughput" not in fs.inputs  # SCRATCH_2 takes none
    assert fs.inputs["subnetIds"] in vpc_state(stack)["privateSubnetIds"]
    assert fs.inputs["securityGroupIds"] == [stack.one(SG, "fsx").id]
    link = stack.one("aws:fsx/dataRepositoryAssociation:DataRepositoryAssociation").inputs
    assert link["fileSystemId"] == fs.id
    assert link["fileSystemPath"] == "/"
    assert link["dataRepositoryPath"] == f"s3://{stack.one(BUCKET).id}"
    for policy in ("autoImportPolicy", "autoExportPolicy"):
        assert sorted(link["s3"][policy]["events"]) == ["CHANGED", "DELETED", "NEW"]


def test_fsx_size_and_throughput_follow_config() -> None:
    fs = program(fsxEnabled="true", fsxDeploymentType="PERSISTENT_2", fsxStorageCapacityGib="4800",
                 fsxThroughputPerTib="500").one("aws:fsx/lustreFileSystem:LustreFileSystem").inputs
    assert (fs["deploymentType"], fs["storageCapacity"], fs["perUnitStorageThroughput"]) == ("PERSISTENT_2", 4800, 500)


# ---------------------------------------------------------------- BatchCompute

def test_spot_first_then_on_demand_both_scaling_to_zero(stack: Recorded) -> None:
    spot, on_demand = stack.one(CE, "spot"), stack.one(CE, "on-demand")
    assert spot.inputs["computeResources"]["type"] == "SPOT"
    assert spot.inputs["computeResources"]["allocationStrategy"] == "SPOT_PRICE_CAPACITY_OPTIMIZED"
    assert on_demand.inputs["computeResources"]["type"] == "EC2"
    for env in (spot, on_demand):
        resources = env.inputs["computeResources"]
        assert resources["minVcpus"] == 0 and resources["maxVcpus"] == 256
        assert resources["instanceTypes"] == ["c6i", "m6i", "r6i", "c5", "m5"]
        assert resources["launchTemplate"]["launchTemplateId"] == stack.one(
            "aws:ec2/launchTemplate:LaunchTemplate").id
    orders = sorted(stack.one("aws:batch/jobQueue:JobQueue").inputs["computeEnvironmentOrders"],
                    key=lambda o: o["order"])
    assert [o["computeEnvironment"] for o in orders] == [spot.state["arn"], on_demand.state["arn"]]


def test_spot_off_leaves_only_on_demand() -> None:
    stack = program(fsxEnabled="false", spotEnabled="false", maxVcpus="32")
    [env] = stack.of_type(CE)
    assert env.inputs["computeResources"]["type"] == "EC2" and env.inputs["computeResources"]["maxVcpus"] == 32


def test_hosts_require_imdsv2_and_encrypt_their_root_volume(stack: Recorded) -> None:
    template = stack.one("aws:ec2/launchTemplate:LaunchTemplate").inputs
    assert template["metadataOptions"]["httpTokens"] == "required"
    assert template["metadataOptions"]["httpPutResponseHopLimit"] == 1
    [device] = template["blockDeviceMappings"]
    assert device["ebs"]["encrypted"] == "true"


def test_user_data_mounts_fsx_only_when_fsx_is_on() -> None:
    stack = program(fsxEnabled="true")
    fs = stack.one("aws:fsx/lustreFileSystem:LustreFileSystem").state
    text = base64.b64decode(stack.one("aws:ec2/launchTemplate:LaunchTemplate").inputs["userData"]).decode()
    assert text.startswith("Content-Type: multipart/mixed")
    assert "Content-Type: text/x-shellscript" in text
    assert f"{fs['dnsName']}@tcp:/{fs['mountName']} /fsx lustre" in text
    assert "mount /fsx" in text and "lustre-client" in text
    assert program(fsxEnabled="false").one("aws:ec2/launchTemplate:LaunchTemplate").inputs.get("userData") is None
    # The script shuts a host down when it cannot mount; that must terminate it so Batch replaces it.
    template = stack.one("aws:ec2/launchTemplate:LaunchTemplate").inputs
    assert template["instanceInitiatedShutdownBehavior"] == "terminate"


def _run_mount_script(tmp_path: Path, *, dnf_ok: bool = True, mount_ok: bool = True):
    """Run the real user-data script with dnf/mount/mountpoint/shutdown/sleep replaced by recorders,
    against a scratch fstab and mount folder; return (exit code, calls, fstab text)."""
    import subprocess

    from components.userdata import lustre_mount_script

    bin_dir, state, log = tmp_path / "bin", tmp_path / "mounted", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    fakes = {
        "dnf": f'echo "dnf $*" >> {log}; exit {0 if dnf_ok else 1}',
        "mount": f'echo "mount $*" >> {log}; ' + (f"touch {state}; exit 0" if mount_ok else "exit 32"),
        "mountpoint": f"test -e {state}",
        "shutdown": f'echo "shutdown $*" >> {log}',
        "sleep": f'echo "sleep $*" >> {log}',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    fstab = tmp_path / "fstab"
    fstab.touch()
    script = tmp_path / "user-data.sh"
    script.write_text(lustre_mount_script("fs-0123.fsx.eu-west-1.amazonaws.com", "abcdefgh",
                                          str(tmp_path / "fsx"), fstab=str(fstab)))
    done = subprocess.run(["bash", str(script)], env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return done.returncode, calls, fstab.read_text()


def test_mount_script_installs_client_mounts_once_and_is_idempotent(tmp_path) -> None:
    code, calls, fstab = _run_mount_script(tmp_path)
    mount_path = tmp_path / "fsx"
    assert code == 0 and mount_path.is_dir()
    assert calls == ["dnf install -y lustre-client", f"mount {mount_path}"]
    assert fstab.splitlines() == [
        f"fs-0123.fsx.eu-west-1.amazonaws.com@tcp:/abcdefgh {mount_path} lustre defaults,relatime,flock,_netdev 0 0"]
    code, calls_again, fstab_again = _run_mount_script(tmp_path)  # a reboot re-runs nothing already done
    assert code == 0 and calls_again == calls + ["dnf install -y lustre-client"] and fstab_again == fstab


@pytest.mark.fault
def test_mount_script_retries_then_takes_the_host_out_when_fsx_cannot_be_mounted(tmp_path) -> None:
    """A host that cannot mount /fsx must not join the cluster: jobs there would see an empty /fsx."""
    from components.userdata import ATTEMPTS

    code, calls, _ = _run_mount_script(tmp_path, mount_ok=False)
    assert code != 0
    assert [c for c in calls if c.startswith("mount ")] == [f"mount {tmp_path / 'fsx'}"] * ATTEMPTS
    assert [c for c in calls if c.startswith("sleep ")] == [f"sleep {5 * i}" for i in range(1, ATTEMPTS + 1)]
    assert calls[-1] == "shutdown -h now"


@pytest.mark.fault
def test_mount_script_takes_the_host_out_when_the_client_cannot_be_installed(tmp_path) -> None:
    code, calls, fstab = _run_mount_script(tmp_path, dnf_ok=False)
    assert code != 0 and calls[-1] == "shutdown -h now"
    assert not [c for c in calls if c.startswith("mount ")] and fstab == ""


def container(stack: Recorded) -> dict:
    return json.loads(stack.one("aws:batch/jobDefinition:JobDefinition").inputs["containerProperties"])


def test_job_definition_runs_our_image_by_digest_unprivileged(stack: Recorded) -> None:
    props = container(stack)
    assert props["image"] == stack.outputs["imageUri"] and "@sha256:" in props["image"]
    assert props["privileged"] is False
    assert {"type": "VCPU", "value": "4"} in props["resourceRequirements"]
    assert {"type": "MEMORY", "value": "15000"} in props["resourceRequirements"]
    assert props["jobRoleArn"] == stack.one("aws:iam/role:Role", "job-role").state["arn"]
    assert props["logConfiguration"]["logDriver"] == "awslogs"
    assert props["logConfiguration"]["options"]["awslogs-group"] == stack.outputs["logGroupName"]


def test_fsx_volume_and_root_only_when_fsx_is_on() -> None:
    on, off = container(program(fsxEnabled="true")), container(program(fsxEnabled="false"))
    assert on["mountPoints"] == [{"sourceVolume": "fsx", "containerPath": "/fsx", "readOnly": True}]
    assert on["volumes"] == [{"name": "fsx", "host": {"sourcePath": "/fsx"}}]
    assert {"name": "CPB_FSX_ROOT", "value": "/fsx"} in on["environment"]
    assert "mountPoints" not in off and "volumes" not in off
    assert all(e["name"] != "CPB_FSX_ROOT" for e in off["environment"])


def test_retry_covers_spot_hosts_and_start_failures_but_not_pipeline_errors_oom_or_superseded(
        stack: Recorded) -> None:
    definition = stack.one("aws:batch/jobDefinition:JobDefinition").inputs
    strategy = definition["retryStrategy"]
    assert strategy["attempts"] == 3
    rules = strategy["evaluateOnExits"]
    assert len(rules) <= 5  # Batch's limit
    assert rules == [
        {"onStatusReason": "Host EC2*", "action": "retry"},  # spot reclaim, lost host
        {"onReason": "CannotPullContainerError*", "action": "retry"},  # the host could not pull the image
        {"onReason": "ResourceInitializationError*", "action": "retry"},  # ...or set up the task
        {"onExitCode": "4", "action": "retry"},  # transient S3/network trouble
        {"onExitCode": "*", "action": "exit"},  # 2, 3, 5 (superseded) and 137 (OOM: the events Lambda escalates)
    ]
    assert definition["timeout"]["attemptDurationSeconds"] == 14400


def _batch_decides(rules: list[dict], exit_code, reason: str = "", status_reason: str = "") -> str:
    """What Batch does with a failed attempt: the first rule whose every given pattern matches (a
    trailing * matches any rest), else RETRY (Batch's documented default)."""
    def matches(pattern: str, value) -> bool:
        if value is None:
            return False
        value = str(value)
        return value.startswith(pattern[:-1]) if pattern.endswith("*") else value == pattern

    for rule in rules:
        given = [(rule[k], v) for k, v in (("onExitCode", exit_code), ("onReason", reason),
                                           ("onStatusReason", status_reason)) if k in rule]
        if all(matches(pattern, value) for pattern, value in given):
            return rule["action"].upper()
    return "RETRY"


@pytest.mark.parametrize("exit_code,reason,status_reason,expected", [
    (4, "Essential container in task exited", "", "RETRY"),
    (137, "OutOfMemoryError: Container killed due to memory usage", "", "EXIT"),
    (5, "Essential container in task exited", "", "EXIT"),
    (2, "Essential container in task exited", "", "EXIT"),
    (3, "Essential container in task exited", "", "EXIT"),
    (None, "CannotPullContainerError: pull image manifest has been retried 5 time(s)", "Task failed to start",
     "RETRY"),
    (None, "ResourceInitializationError: unable to pull secrets or registry auth", "Task failed to start", "RETRY"),
    (137, "", "Host EC2 (instance i-0abc) terminated.", "RETRY"),  # spot reclaim, not an OOM
])
def test_batch_would_retry_only_what_a_new_attempt_can_fix(exit_code, reason, status_reason, expected) -> None:
    rules = [{**r, "action": r["action"].upper()} for r in
             program(fsxEnabled="false").one("aws:batch/jobDefinition:JobDefinition").inputs[
                 "retryStrategy"]["evaluateOnExits"]]
    assert _batch_decides(rules, exit_code, reason, status_reason) == expected


def test_retry_rules_beyond_batchs_limit_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from components import jobdef

    monkeypatch.setattr(jobdef, "RETRY_ON_EXIT_CODES", jobdef.RETRY_ON_EXIT_CODES + ("6",))
    with pytest.raises(ValueError, match="6 retry rules; AWS Batch accepts at most 5"):
        jobdef.retry_strategy(3)


def test_log_groups_keep_logs_for_the_configured_days() -> None:
    stack = program(fsxEnabled="false", logRetentionDays="90")
    groups = stack.of_type("aws:cloudwatch/logGroup:LogGroup")
    assert len(groups) == 3 and all(g.inputs["retentionInDays"] == 90 for g in groups)  # jobs + two Lambdas


# ---------------------------------------------------------------- JobIngress

def test_queues_are_encrypted_and_redrive_to_the_dlq(stack: Recorded) -> None:
    queue, dlq = stack.one(QUEUE, "ingress-queue"), stack.one(QUEUE, "ingress-dlq")
    assert queue.inputs["sqsManagedSseEnabled"] is True and dlq.inputs["sqsManagedSseEnabled"] is True
    redrive = json.loads(queue.inputs["redrivePolicy"])
    assert redrive == {"deadLetterTargetArn": dlq.state["arn"], "maxReceiveCount": 5}
    function = stack.one(FUNCTION, "ingress").inputs
    assert queue.inputs["visibilityTimeoutSeconds"] >= 6 * function["timeout"]


def test_visibility_timeout_follows_the_lambda_timeout() -> None:
    stack = program(fsxEnabled="false", lambdaTimeoutSeconds="120")
    assert stack.one(QUEUE, "ingress-queue").inputs["visibilityTimeoutSeconds"] == 720
    assert stack.one(FUNCTION, "ingress").inputs["timeout"] == 120


def test_event_source_mapping_reports_partial_batch_failures(stack: Recorded) -> None:
    mapping = stack.one("aws:lambda/eventSourceMapping:EventSourceMapping").inputs
    assert mapping["functionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["batchSize"] > 1
    assert mapping["eventSourceArn"] == stack.one(QUEUE, "ingress-queue").state["arn"]
    assert mapping["functionName"] == stack.one(FUNCTION, "ingress").state["arn"]


def test_lambda_is_packaged_from_handlers_with_the_contract_environment(stack: Recorded) -> None:
    function = stack.one(FUNCTION, "ingress").inputs
    assert function["runtime"] == "python3.12"
    assert function["handler"] == "handlers.ingress.handler"
    assert function["memorySize"] == 1024  # lambdaMemoryMib's default (measured: bench/bench_ingress_scale.py)
    shipped = set(function["code"].assets)
    expected = {f"handlers/{p.relative_to(REPO / 'handlers').as_posix()}" for p in (REPO / "handlers").rglob("*.py")
                if "__pycache__" not in p.parts}
    expected |= {f"cpb_worker/{p.name}" for p in (REPO / "image" / "cpb_worker").glob("*.py")}
    assert expected <= shipped and "handlers/ingress.py" in shipped
    # Everything else is the vendored dependencies, each a folder (archive) or module at the root.
    assert {"boto3", "botocore", "aws_lambda_powertools"} <= shipped - expected
    assert not function.get("layers")  # no region-specific public layer
    env = function["environment"]["variables"]
    assert env["CPB_BUCKET"] == stack.outputs["bucketName"]
    assert env["CPB_JOB_QUEUE"] == stack.outputs["jobQueueArn"]
    assert env["CPB_JOB_DEFINITION"] == stack.outputs["jobDefinitionArn"]
    assert (env["CPB_MAX_VCPU"], env["CPB_MAX_MEMORY_MIB"]) == ("16", "61440")
    assert (env["CPB_DEFAULT_VCPU"], env["CPB_DEFAULT_MEMORY_MIB"]) == ("4", "15000")
    assert env["CPB_STACK"] == "test"


def test_lambda_memory_follows_config() -> None:
    assert program(fsxEnabled="false", lambdaMemoryMib="1024").one(FUNCTION, "ingress").inputs["memorySize"] == 1024


def test_job_limits_output_matches_the_lambda_environment() -> None:
    other = "arn:aws:batch:eu-west-1:123456789012:job-definition/other:3"
    stack = program(fsxEnabled="false", allowedJobArns=json.dumps([other]), jobMaxVcpus="8", jobVcpus="2")
    env = stack.one(FUNCTION, "ingress").inputs["environment"]["variables"]
    limits = stack.outputs["jobLimits"]
    assert limits == {"maxVcpu": 8, "maxMemoryMib": 61440, "defaultVcpu": 2, "defaultMemoryMib": 15000,
                      "allowedArns": [other]}
    assert (str(limits["maxVcpu"]), str(limits["maxMemoryMib"]), str(limits["defaultVcpu"]),
            str(limits["defaultMemoryMib"]), ",".join(limits["allowedArns"])) == (
        env["CPB_MAX_VCPU"], env["CPB_MAX_MEMORY_MIB"], env["CPB_DEFAULT_VCPU"], env["CPB_DEFAULT_MEMORY_MIB"],
        env["CPB_ALLOWED_ARNS"])


def test_lambda_may_submit_only_to_this_stacks_queue_and_definition(stack: Recorded) -> None:
    document = policy_document(stack.one("aws:iam/rolePolicy:RolePolicy", "ingress"))
    submit = next(s for s in document["Statement"] if "batch:SubmitJob" in s["Action"])
    arns = set(submit["Resource"])
    assert stack.outputs["jobQueueArn"] in arns and stack.outputs["jobDefinitionArn"] in arns
    unrevisioned = stack.outputs["jobDefinitionArn"].rsplit(":", 1)[0]  # the form IAM's catalog names
    assert arns - {stack.outputs["jobQueueArn"], stack.outputs["jobDefinitionArn"]} == {
        unrevisioned, f"arn:aws:batch:{REGION}:123456789012:job/*"}
    assert set(submit["Action"]) == {"batch:SubmitJob", "batch:TagResource"}


def test_allowed_arns_reach_both_the_policy_and_the_lambda() -> None:
    other = "arn:aws:batch:eu-west-1:123456789012:job-queue/shared-gpu"
    stack = program(fsxEnabled="false", allowedJobArns=json.dumps([other]))
    document = policy_document(stack.one("aws:iam/rolePolicy:RolePolicy", "ingress"))
    submit = next(s for s in document["Statement"] if "batch:SubmitJob" in s["Action"])
    assert other in submit["Resource"]
    assert stack.one(FUNCTION, "ingress").inputs["environment"]["variables"]["CPB_ALLOWED_ARNS"] == other


def test_dlq_alarm_and_optional_email() -> None:
    quiet = program(fsxEnabled="false")
    alarm = quiet.one(ALARM, "ingress").inputs
    assert alarm["dimensions"] == {"QueueName": quiet.one(QUEUE, "ingress-dlq").state["name"]}
    assert alarm["metricName"] == "ApproximateNumberOfMessagesVisible" and alarm["threshold"] == 0
    assert not quiet.of_type("aws:sns/topic:Topic") and not alarm.get("alarmActions")
    loud = program(fsxEnabled="false", alarmEmail="lab@example.org")
    topic = loud.one("aws:sns/topic:Topic")
    # CloudWatch cannot use alias/aws/sns: the topic's key must be ours, and let CloudWatch encrypt.
    key = loud.one("aws:kms/key:Key")
    assert topic.inputs["kmsMasterKeyId"] == key.state["arn"] != "alias/aws/sns"
    assert key.inputs["enableKeyRotation"] is True
    statements = policy_document(key)["Statement"]
    cloudwatch = [s for s in statements if s["Principal"] == {"Service": "cloudwatch.amazonaws.com"}]
    assert cloudwatch and {"kms:Decrypt", "kms:GenerateDataKey*"} <= set(cloudwatch[0]["Action"])
    admin = [s for s in statements if s["Principal"] == {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}]
    assert admin and admin[0]["Action"] == "kms:*"  # without it the key could never be managed again
    assert not quiet.of_type("aws:kms/key:Key")
    assert loud.one("aws:sns/topicSubscription:TopicSubscription").inputs["endpoint"] == "lab@example.org"
    assert loud.one(ALARM, "ingress").inputs["alarmActions"] == [topic.state["arn"]]


# ---------------------------------------------------------------- image

def test_image_is_built_from_image_dir_with_the_configured_base_tag() -> None:
    stack = program(fsxEnabled="false", cellprofilerImageTag="4.2.6")
    image = stack.one("awsx:ecr:Image").inputs
    assert not os.path.isabs(image["context"]) and not os.path.isabs(image["dockerfile"])
    assert Path(image["context"]).resolve() == REPO / "image" and image["platform"] == "linux/amd64"
    assert Path(image["dockerfile"]).resolve() == REPO / "image" / "Dockerfile"
    assert image["args"] == {"CELLPROFILER_TAG": "4.2.6"}
    assert image["repositoryUrl"] == stack.one("awsx:ecr:Repository").state["url"]
    dockerfile = (REPO / "image" / "Dockerfile").read_text()
    assert "ARG CELLPROFILER_TAG" in dockerfile and "FROM cellprofiler/cellprofiler:${CELLPROFILER_TAG}" in dockerfile


def test_compute_environments_can_be_replaced_without_name_clashes(stack: Recorded) -> None:
    for env in stack.of_type(CE):
        assert "name" not in env.inputs and env.inputs["namePrefix"].startswith("cpb-test-")
        assert env.inputs["updatePolicy"]["terminateJobsOnUpdate"] is False


def test_missing_dockerfile_is_named(tmp_path) -> None:
    from components.image import CellProfilerImage, CellProfilerImageArgs

    with pytest.raises(FileNotFoundError, match=r"Dockerfile is missing"):
        CellProfilerImage("x", CellProfilerImageArgs(context_dir=tmp_path, cellprofiler_tag="4.2.8",
                                                     force_delete=False))


@pytest.mark.parametrize("url,arn", [
    ("123456789012.dkr.ecr.eu-west-1.amazonaws.com/cpb-image", "arn:aws:ecr:eu-west-1:123456789012:repository/cpb-image"),
    ("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/a/b", "arn:aws-cn:ecr:cn-north-1:123456789012:repository/a/b"),
    ("123456789012.dkr.ecr.us-gov-west-1.amazonaws.com/r", "arn:aws-us-gov:ecr:us-gov-west-1:123456789012:repository/r"),
])
def test_repository_arn_from_url(url: str, arn: str) -> None:
    from components.iam import ecr_repository_arn

    assert ecr_repository_arn(url) == arn


def test_job_definition_forms() -> None:
    from components.iam import job_definition_forms

    arn = "arn:aws:batch:eu-west-1:123456789012:job-definition/cpb-prod-worker:12"
    assert job_definition_forms(arn) == [arn, arn.rsplit(":", 1)[0]]
    assert job_definition_forms(arn.rsplit(":", 1)[0]) == [arn.rsplit(":", 1)[0]]


def test_versioning_is_per_stack() -> None:
    stack = program(fsxEnabled="false", bucketVersioning="false")
    assert stack.one("aws:s3/bucketVersioning:BucketVersioning").inputs["versioningConfiguration"]["status"] == \
        "Suspended"
    rules = stack.one("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration").inputs["rules"]
    assert [r["id"] for r in rules] == ["abort-incomplete-uploads"]


def _dockerfile_run_block(marker: str) -> str:
    """The shell text of the Dockerfile's RUN instruction containing ``marker`` (continuations joined)."""
    instructions, current = [], ""
    for line in (REPO / "image" / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + "\n" if line.rstrip().endswith("\\") else line + "\n"
        if not line.rstrip().endswith("\\"):
            instructions.append(current)
            current = ""
    runs = [text.split(None, 1)[1] for text in instructions if text.startswith("RUN ") and marker in text]
    assert len(runs) == 1, f"expected one RUN with {marker!r}, found {len(runs)}"
    return runs[0]


def test_dockerfile_cpb_python_runs_in_cellprofilers_virtualenv(tmp_path) -> None:
    """The official 4.2.x images install CellProfiler in a virtualenv (/opt/venv) whose bin is on PATH.
    The Dockerfile's cpb-python must start that venv's Python with the venv active (so boto3 goes in
    beside CellProfiler and `-m cpb_worker` sees it); a plain symlink to the venv's interpreter would
    start the bare base Python instead. Runs the Dockerfile's own RUN text against a throw-away venv
    laid out like the image's."""
    import subprocess
    import sys
    import venv

    venv_dir = tmp_path / "opt-venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(venv_dir)
    site = next((venv_dir / "lib").glob("python3*/site-packages"))
    (site / "cellprofiler").mkdir()
    (site / "cellprofiler" / "__init__.py").write_text("__version__ = 'fake-4.2.8'\n")
    script = venv_dir / "bin" / "cellprofiler"  # what pip writes: a shebang naming the venv's python
    script.write_text(f"#!{venv_dir / 'bin' / 'python'}\nimport cellprofiler\n")
    script.chmod(0o755)

    target = tmp_path / "cpb-python"
    block = _dockerfile_run_block("cp_script=").replace("/usr/local/bin/cpb-python", str(target))
    env = {**os.environ, "PATH": f"{venv_dir / 'bin'}:{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    build = subprocess.run(["sh", "-c", block], env=env, capture_output=True, text=True, timeout=60)
    assert build.returncode == 0, build.stderr

    probe = subprocess.run([str(target), "-c", "import sys, cellprofiler; print(sys.prefix)"],
                           env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()) == venv_dir
    assert Path(sys.prefix) != venv_dir  # the probe's answer is not simply the test's own interpreter
