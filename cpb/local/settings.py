"""What the local stack mirrors: a stack deployed with the `Pulumi.yaml` defaults, or with settings.

The settings are the project's own stack config (`components.config`: the same schema, defaults and
validation `pulumi up` uses), read from a Pulumi stack settings file (`--config Pulumi.dev.yaml`)
and `--set key=value` overrides (as `pulumi config set key value`). So the local stack accepts any
message a deployed stack with the same settings accepts, and refuses the same ones.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

try:  # the Pulumi program's config schema; `components` is the Pulumi program, not an installed package
    from components import config as stack_config
except ImportError:  # started from outside the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from components import config as stack_config

DEFAULT_STACK = "local"
DEFAULT_REGION = "us-east-1"


class SettingsError(ValueError):
    """Bad local-stack settings; the message names the key and the fix."""


@dataclass(frozen=True)
class LocalSettings:
    """The stack name (names resources as `cpb-<stack>-...`), region and validated stack config."""

    stack: str = DEFAULT_STACK
    region: str = DEFAULT_REGION
    config: Any = field(default_factory=lambda: _load_config({}))
    source: str = "the Pulumi.yaml defaults"

    def value(self, attribute: str, default: Any) -> Any:
        """A config value that newer versions of the schema may add (e.g. oom_max_retries)."""
        return getattr(self.config, attribute, default)


def load_settings(config_file: Optional[Path] = None, overrides: Iterable[str] = (),
                  stack: str = DEFAULT_STACK) -> LocalSettings:
    """Settings from a Pulumi stack file and `key=value` overrides, validated like `pulumi up` does."""
    raw: dict[str, Any] = {}
    region = DEFAULT_REGION
    sources = []
    if config_file is not None:
        values = _read_stack_file(Path(config_file))
        region = str(values.pop("aws:region", region))
        raw.update(values)
        sources.append(str(config_file))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--set {item!r} is not key=value; use e.g. --set jobMaxVcpus=8")
        key = _strip_project(key.strip())
        if key == "aws:region":
            region = value.strip()
        elif not key.startswith("aws:"):
            raw[key] = value
        sources.append(f"--set {key}")
    try:
        config = _load_config(raw)
    except stack_config.ConfigError as exc:
        text = " ".join(str(exc).split("\n")).replace("  - ", "")
        raise SettingsError(re.sub(r"`pulumi config set (\w+) \.\.\.`", r"`--set \1=...`", text)) from None
    if not region or not all(part.isalnum() for part in region.split("-")):
        raise SettingsError(f"aws:region = {region!r} is not an AWS region name; use e.g. --set aws:region=eu-west-1")
    label = "the Pulumi.yaml defaults" + (" with " + ", ".join(sources) if sources else "")
    return LocalSettings(stack=stack, region=region, config=config, source=label)


def _load_config(raw: dict[str, Any]) -> Any:
    """components.config.load_config, which reads botocore's EC2 model: a user's AWS profile settings
    (an unknown AWS_PROFILE) must not break the local stack, which never uses them."""
    saved = {key: os.environ.pop(key) for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE") if key in os.environ}
    try:
        return stack_config.load_config(raw)
    finally:
        os.environ.update(saved)


def _strip_project(key: str) -> str:
    prefix = f"{stack_config.PROJECT}:"
    return key[len(prefix):] if key.startswith(prefix) else key


def _read_stack_file(path: Path) -> dict[str, Any]:
    """`config:` of a Pulumi stack settings file: project keys (prefix dropped) and aws:region."""
    import yaml

    try:
        document = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise SettingsError(f"--config {path} does not exist; give a Pulumi stack file such as Pulumi.dev.yaml") \
            from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"--config {path} is not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    values = document.get("config") if isinstance(document, dict) else None
    if not isinstance(values, dict):
        raise SettingsError(f"--config {path} has no `config:` mapping; give a Pulumi stack file such as "
                            "Pulumi.dev.yaml")
    found: dict[str, Any] = {}
    for key, value in values.items():
        key = _strip_project(str(key))
        if isinstance(value, dict) and "secure" in value:
            continue  # secrets mean nothing locally
        if key == "aws:region" or not key.startswith("aws:"):
            found[key] = value
    return found
