"""Where the deployed stack lives: bucket, queues, Batch job queue.

Scientists should not have to copy ARNs around. The first choice is the
Pulumi stack's outputs (`pulumi stack output --json`, contract names in
docs/CONTRACTS.md); without the Pulumi CLI the same values come from flags or
`CPB_*` environment variables. Every value remembers where it came from so
the CLI can say which source it used.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional

# Stack output name -> (StackConfig attribute, environment variable).
OUTPUTS: dict[str, tuple[str, str]] = {
    "bucketName": ("bucket", "CPB_BUCKET"),
    "queueUrl": ("queue_url", "CPB_QUEUE_URL"),
    "deadLetterQueueUrl": ("dlq_url", "CPB_DLQ_URL"),
    "jobQueueArn": ("job_queue", "CPB_JOB_QUEUE"),
    "jobDefinitionArn": ("job_definition", "CPB_JOB_DEFINITION"),
    "region": ("region", "CPB_REGION"),
    "logGroupName": ("log_group", "CPB_LOG_GROUP"),
    # The worker image (`repository@sha256:...`): what a resumed part's fingerprint `image` must equal.
    "imageUri": ("image_uri", "CPB_IMAGE"),
}

# The stack options every AWS-facing command takes (cpb.cli.stack_options).
FLAG_OPTIONS = ("--bucket", "--queue-url", "--dlq-url", "--job-queue", "--region")

HOW_TO_FIX = ("pass --stack <name>: --stack local for the stack `cpb local up` runs, or a deployed Pulumi "
              "stack's name, e.g. --stack dev (needs the Pulumi CLI; or `pulumi stack select dev` once); "
              "else set CPB_BUCKET and CPB_QUEUE_URL (also CPB_DLQ_URL, CPB_JOB_QUEUE, CPB_REGION) "
              "or pass --bucket/--queue-url")


class StackError(Exception):
    """The stack's settings cannot be found; the message says what to do."""


@dataclass(frozen=True)
class StackConfig:
    """The deployed resources the client talks to, and where each came from."""

    bucket: Optional[str] = None
    queue_url: Optional[str] = None
    dlq_url: Optional[str] = None
    job_queue: Optional[str] = None
    job_definition: Optional[str] = None
    region: Optional[str] = None
    log_group: Optional[str] = None
    image_uri: Optional[str] = None
    sources: Mapping[str, str] = field(default_factory=dict)
    # The Lambda's CPB_MAX_*/CPB_DEFAULT_*/CPB_ALLOWED_ARNS, when the stack exports them
    # (optional output `jobLimits`), so local validation uses the deployed ceilings.
    limits_env: Mapping[str, str] = field(default_factory=dict)
    name: Optional[str] = None  # the --stack given, if any

    def flags(self) -> list[str]:
        """The stack options this command was given (--stack and any --bucket, --region, ... flags), so a
        command printed for the user to paste next reaches the same stack."""
        given = ["--stack", self.name] if self.name else []
        for output, (attr, _var) in OUTPUTS.items():
            option = f"--{attr.replace('_', '-')}"
            if self.sources.get(attr) == option and option in FLAG_OPTIONS:
                given += [option, str(getattr(self, attr))]
        return given

    def command(self, name: str, *args: str) -> str:
        """`cpb <name> <this stack's flags> <args>`, quoted to paste into a shell."""
        return " ".join(["cpb", name] + [shlex.quote(word) for word in [*self.flags(), *args]])

    def require(self, *names: str) -> "StackConfig":
        """Fail with one clear line when a command needs a value nobody gave."""
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            wanted = ", ".join(_describe(n) for n in missing)
            raise StackError(f"no {wanted} known: {HOW_TO_FIX}")
        return self

    def describe_sources(self) -> str:
        """One line naming where the settings came from, for the user."""
        used = sorted(set(self.sources.values()))
        return "stack settings from " + (", ".join(used) if used else "nowhere")


def _describe(attribute: str) -> str:
    for output, (attr, env) in OUTPUTS.items():
        if attr == attribute:
            return f"{attribute.replace('_', ' ')} (stack output {output} / {env})"
    return attribute


def pulumi_outputs(stack: Optional[str], cwd: Optional[str] = None,
                   runner=subprocess.run) -> Optional[dict]:
    """The stack's outputs from the Pulumi CLI, or None when it is not installed.

    A selected stack that fails (not logged in, no such stack) is an error the
    user must see, not something to silently paper over with env vars.
    """
    exe = shutil.which("pulumi")
    if exe is None:
        if stack:
            raise StackError(f"--stack {stack} needs the Pulumi CLI, which is not on PATH: "
                             "install it, or set the CPB_* variables instead")
        return None
    cmd = [exe, "stack", "output", "--json"] + (["--stack", stack] if stack else [])
    proc = runner(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)
    if proc.returncode != 0:
        if not stack:
            return None  # no stack selected here: fall back to flags/env
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise StackError(f"`pulumi stack output --stack {stack}` failed: "
                         f"{detail[-1] if detail else 'no output'}")
    try:
        outputs = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError as exc:
        raise StackError(f"`pulumi stack output --json` printed something that is not JSON: {exc}")
    return outputs if isinstance(outputs, dict) else None


def discover(stack: Optional[str] = None, flags: Optional[Mapping[str, Optional[str]]] = None,
             env: Optional[Mapping[str, str]] = None, use_pulumi: bool = True,
             runner=subprocess.run) -> StackConfig:
    """Merge flags > environment > Pulumi outputs into one StackConfig.

    Flags win so a user can point one command elsewhere; the environment wins
    over Pulumi so CI and the demo can be explicit.
    """
    env = os.environ if env is None else env
    flags = flags or {}
    if stack == LOCAL_STACK:
        return replace(_local_stack(flags, env), name=stack)
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    # --- stack lookup (the `--stack local` branch is the local-cloud engineer's: cpb.local.state) ---
    outputs = pulumi_outputs(stack, runner=runner) if use_pulumi else None
    # --- end of stack lookup ---
    if outputs:
        label = f"pulumi stack {stack}" if stack else "the selected pulumi stack"
        for output, (attr, _env) in OUTPUTS.items():
            if outputs.get(output):
                values[attr], sources[attr] = str(outputs[output]), label
    for output, (attr, var) in OUTPUTS.items():
        if env.get(var):
            values[attr], sources[attr] = env[var], f"${var}"
    for attr, value in flags.items():
        if value:
            values[attr], sources[attr] = value, f"--{attr.replace('_', '-')}"
    limits_env = _limits_env(outputs.get("jobLimits") if outputs else None)
    if not values.get("region"):
        from_arns = _region_from(values)
        for region, source in ((from_arns, "the queue URL / ARNs"), (env.get("AWS_REGION"), "$AWS_REGION"),
                               (env.get("AWS_DEFAULT_REGION"), "$AWS_DEFAULT_REGION")):
            if region:
                values["region"], sources["region"] = region, source
                break
    return StackConfig(**values, sources=sources, limits_env=limits_env, name=stack)


LOCAL_STACK = "local"


def _local_stack(flags: Mapping[str, Optional[str]], env: Mapping[str, str]) -> StackConfig:
    """`--stack local`: the running `cpb local up` (cpb.local.state), no Pulumi CLI needed.

    Its outputs win over CPB_* variables (which may name a deployed stack); flags still win. This
    process's AWS clients are pointed at the local endpoint with the test credentials, and a
    profile's settings are set aside, so nothing reaches real AWS.
    """
    from cpb.local.state import TEST_CREDENTIALS, LocalStackError, read_local_stack, state_path

    try:
        state = read_local_stack(env)
    except LocalStackError as exc:
        raise StackError(str(exc)) from None
    label = f"the local stack ({state_path(env)})"
    outputs = state.get("outputs") or {}
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for output, (attr, _var) in OUTPUTS.items():
        if outputs.get(output):
            values[attr], sources[attr] = str(outputs[output]), label
    for attr, value in flags.items():
        if value:
            values[attr], sources[attr] = value, f"--{attr.replace('_', '-')}"
    values.setdefault("region", str(state.get("region") or "us-east-1"))
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        os.environ.pop(key, None)
    os.environ.update({"AWS_ENDPOINT_URL": str(state["endpoint"]), "AWS_CONFIG_FILE": os.devnull,
                       "AWS_SHARED_CREDENTIALS_FILE": os.devnull, **TEST_CREDENTIALS})
    return StackConfig(**values, sources=sources, limits_env=_limits_env(outputs.get("jobLimits")))


# Optional stack output `jobLimits` (camelCase keys) -> the Lambda's environment variable names.
_LIMIT_KEYS = {"maxVcpu": "CPB_MAX_VCPU", "maxMemoryMib": "CPB_MAX_MEMORY_MIB", "defaultVcpu": "CPB_DEFAULT_VCPU",
               "defaultMemoryMib": "CPB_DEFAULT_MEMORY_MIB", "allowedArns": "CPB_ALLOWED_ARNS"}


def _limits_env(limits: object) -> dict[str, str]:
    if not isinstance(limits, dict):
        return {}
    env = {}
    for key, var in _LIMIT_KEYS.items():
        value = limits.get(key)
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        if value not in (None, ""):
            env[var] = str(value)
    return env


def _region_from(values: Mapping[str, str]) -> Optional[str]:
    """Queue URLs and ARNs carry their region; use it before guessing."""
    url = values.get("queue_url", "")
    if url.startswith("https://sqs.") and ".amazonaws.com" in url:
        return url.split(".")[1]
    for key in ("job_queue", "job_definition"):
        parts = values.get(key, "").split(":")
        if len(parts) > 3 and parts[0] == "arn":
            return parts[3]
    return None
