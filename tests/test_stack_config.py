"""Stack config: one schema in code, Pulumi.yaml and docs/CONFIG.md kept equal to it,
and every bad value rejected with a message naming the key and the fix."""
from __future__ import annotations

import pytest
import yaml

from components.config import FIELDS, ConfigError, StackConfig, load_config, markdown_reference
from components.stack import resolve_region
from stack_harness import REPO

PROJECT_FILE = yaml.safe_load((REPO / "Pulumi.yaml").read_text())


def test_pulumi_yaml_schema_equals_the_code_schema() -> None:
    declared = PROJECT_FILE["config"]
    assert list(declared) == [f.name for f in FIELDS]
    for f in FIELDS:
        entry = declared[f.name]
        assert entry["type"] == f.type, f.name
        assert entry["default"] == (list(f.default) if f.type == "array" else f.default), f.name
        assert entry["description"] == f.description, f.name
        if f.type == "array":
            assert entry["items"] == {"type": "string"}


def test_pulumi_yaml_runs_python_in_the_project_virtualenv() -> None:
    assert PROJECT_FILE["name"] == "cellpainting-batch"
    assert PROJECT_FILE["runtime"] == {"name": "python", "options": {"toolchain": "pip", "virtualenv": ".venv"}}


def test_config_reference_doc_is_generated_from_the_schema() -> None:
    doc = (REPO / "docs" / "CONFIG.md").read_text()
    assert markdown_reference() in doc, "regenerate: .venv/bin/python -m components.config"


def test_defaults_are_valid_and_typed() -> None:
    cfg = load_config({})
    assert isinstance(cfg, StackConfig)
    assert cfg.fsx_enabled is True and cfg.min_vcpus == 0
    assert cfg.instance_families == ("c6i", "m6i", "r6i", "c5", "m5")
    assert cfg.queue_visibility_timeout_seconds == 6 * cfg.lambda_timeout_seconds


def test_values_arrive_as_strings_like_pulumi_passes_them() -> None:
    cfg = load_config({"fsxEnabled": "false", "maxVcpus": "512", "instanceFamilies": '["c7i", "m7i.2xlarge"]',
                       "fsxDeploymentType": "PERSISTENT_2", "fsxStorageCapacityGib": "4800",
                       "fsxThroughputPerTib": "250"})
    assert (cfg.fsx_enabled, cfg.max_vcpus, cfg.instance_families) == (False, 512, ("c7i", "m7i.2xlarge"))
    assert (cfg.fsx_storage_capacity_gib, cfg.fsx_throughput_per_tib) == (4800, 250)


def test_batch_instance_keywords_are_accepted() -> None:
    assert load_config({"instanceFamilies": '["optimal", "c6i"]'}).instance_families == ("optimal", "c6i")
    with pytest.raises(ConfigError, match="default_arm64"):
        load_config({"instanceFamilies": '["default_arm64"]'})


def test_dev_stack_settings_are_all_known_keys() -> None:
    settings = yaml.safe_load((REPO / "Pulumi.dev.yaml").read_text())["config"]
    ours = {k.split(":", 1)[1]: str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in settings.items() if k.startswith("cellpainting-batch:")}
    assert "aws:region" in settings
    assert load_config(ours).fsx_enabled is False


BAD = [
    ({"vpcCidr": "10.0.0.300/16"}, "vpcCidr", "use e.g. 10.0.0.0/16"),
    ({"vpcCidr": "10.0.0.1/16"}, "vpcCidr", "not a valid CIDR"),  # host bits set
    ({"vpcCidr": "8.8.0.0/16"}, "vpcCidr", "not a private IPv4 range"),
    ({"vpcCidr": "10.0.0.0/8"}, "vpcCidr", "use a /16 to /24 range"),
    ({"fsxStorageCapacityGib": "3000"}, "fsxStorageCapacityGib", "nearest: 2400 or 4800"),
    ({"fsxStorageCapacityGib": "600"}, "fsxStorageCapacityGib", "use 1200, 2400 or a multiple of 2400"),
    ({"fsxDeploymentType": "PERSISTENT_2", "fsxThroughputPerTib": "200"}, "fsxThroughputPerTib",
     "use one of 125, 250, 500, 1000"),
    ({"fsxDeploymentType": "SCRATCH_1"}, "fsxDeploymentType", "must be one of SCRATCH_2"),
    ({"minVcpus": "64", "maxVcpus": "32"}, "maxVcpus", "raise maxVcpus or lower minVcpus"),
    ({"instanceFamilies": '["c6i", "z9zz"]'}, "instanceFamilies", "'z9zz' is not an EC2 instance family"),
    ({"instanceFamilies": '["c6i.huge"]'}, "instanceFamilies", "'c6i.huge' is not an EC2 instance type"),
    ({"instanceFamilies": '["c6g"]'}, "instanceFamilies", "Graviton (arm64)"),
    ({"instanceFamilies": "c6i, m6i"}, "instanceFamilies", "must be a JSON list of strings"),
    ({"instanceFamilies": "[]"}, "instanceFamilies", "list at least one"),
    ({"natGateways": "None"}, "natGateways", "must be one of Single, OnePerAz"),
    ({"availabilityZones": "1"}, "availabilityZones", "must be 2 to 4"),
    ({"maxVcpus": "lots"}, "maxVcpus", "must be a whole number"),
    ({"fsxEnabled": "yes"}, "fsxEnabled", "must be true or false"),
    ({"logRetentionDays": "10"}, "logRetentionDays", "not a CloudWatch retention"),
    ({"jobVcpus": "32"}, "jobVcpus", "exceeds jobMaxVcpus"),
    ({"jobMaxVcpus": "64", "maxVcpus": "32"}, "jobMaxVcpus", "could never be placed"),
    ({"lambdaTimeoutSeconds": "1000"}, "lambdaTimeoutSeconds", "between 10 and 900"),
    ({"queueBatchSize": "1"}, "queueBatchSize", "between 2 and 10"),
    ({"allowedJobArns": '["arn:aws:s3:::other-bucket"]'}, "allowedJobArns", "not a Batch job queue"),
    ({"alarmEmail": "not-an-address"}, "alarmEmail", "not an e-mail address"),
    ({"costCenter": "bad{tag}"}, "costCenter", "cannot be a tag value"),
    ({"cellprofilerImageTag": "4.2.8 latest"}, "cellprofilerImageTag", "not a Docker tag"),
    ({"maxVcpu": "10"}, "maxVcpu", "is not a setting of this project"),
    ({"lambdaMemoryMib": "64"}, "lambdaMemoryMib", "between 128 and 10240"),
    ({"oomMaxRetries": "11"}, "oomMaxRetries", "between 0 and 10"),
    ({"oomMaxRetries": "-1"}, "oomMaxRetries", "between 0 and 10"),
    ({"powertoolsLayerVersion": "27"}, "powertoolsLayerVersion",
     "is no longer used: Powertools for AWS Lambda now ships inside the Lambda's code"),
]


@pytest.mark.parametrize("raw,key,fix", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_config_names_key_and_fix(raw: dict, key: str, fix: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(raw)
    message = str(caught.value)
    assert f"cellpainting-batch:{key} " in message
    assert fix in message


def test_fsx_settings_are_not_checked_when_fsx_is_off() -> None:
    assert load_config({"fsxEnabled": "false", "fsxStorageCapacityGib": "3000"}).fsx_enabled is False


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"vpcCidr": "nonsense", "maxVcpus": "0", "minVcpus": "8", "instanceFamilies": '["q1"]'})
    message = str(caught.value)
    assert message.count("\n  - ") == 4  # maxVcpus=0 also leaves jobMaxVcpus unplaceable
    for key in ("vpcCidr", "maxVcpus", "jobMaxVcpus", "instanceFamilies"):
        assert f"cellpainting-batch:{key}" in message


def test_region_must_be_set_and_well_formed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with pytest.raises(ConfigError, match=r"pulumi config set aws:region"):
        resolve_region(None)
    with pytest.raises(ConfigError, match="not an AWS region name"):
        resolve_region("Europe")
    assert resolve_region("us-east-1") == "us-east-1"
    monkeypatch.setenv("AWS_REGION", "ap-southeast-2")
    assert resolve_region(None) == "ap-southeast-2"


def test_a_retired_key_set_on_the_stack_is_named_with_its_replacement() -> None:
    """Pulumi hands the program only the keys it asks for: the retired ones are asked for too."""
    from components.config import load_from_pulumi

    settings = {"powertoolsLayerVersion": "27", "maxVcpus": "64"}
    with pytest.raises(ConfigError, match=r"pulumi config rm powertoolsLayerVersion"):
        load_from_pulumi(settings.get)
    assert load_from_pulumi({"maxVcpus": "64"}.get).max_vcpus == 64


def test_oom_retries_can_be_turned_off() -> None:
    assert load_config({"oomMaxRetries": "0"}).oom_max_retries == 0
    assert load_config({}).oom_max_retries == 2 and load_config({}).lambda_memory_mib == 1024


@pytest.mark.parametrize("region,words", [("cn-north-1", "aws-cn partition"), ("us-isob-east-1", "aws-iso-b partition"),
                                          ("xx-nowhere-1", "no AWS partition botocore knows")])
def test_regions_outside_the_supported_partitions_are_refused(region: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        resolve_region(region)
    assert resolve_region("us-gov-east-1") == "us-gov-east-1"
