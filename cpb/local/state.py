"""Where a running `cpb local up` says it is: `$CPB_HOME/local-stack.json` (default `~/.cpb/`).

`cpb local up` writes it when its stack is ready and removes it on exit; `cpb ... --stack local`
reads it (cpb.stack.discover) and points the AWS clients at the endpoint it names, with the test
credentials the emulator accepts. Schema in docs/CONTRACTS.md ("Local stack").
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

STATE_FILE = "local-stack.json"
# Credentials the emulator accepts; never real ones (the local stack must not reach AWS).
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_SESSION_TOKEN": "testing"}


class LocalStackError(Exception):
    """No local stack is running (or it stopped); the message says how to start one."""


def state_path(environ: Mapping[str, str] = os.environ) -> Path:
    home = environ.get("CPB_HOME") or str(Path.home() / ".cpb")
    return Path(home) / STATE_FILE


def write_local_stack(state: dict, environ: Mapping[str, str] = os.environ) -> Path:
    """Write the state file atomically (a reader never sees half of it)."""
    path = state_path(environ)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def remove_local_stack(environ: Mapping[str, str] = os.environ) -> None:
    try:
        state_path(environ).unlink()
    except FileNotFoundError:
        pass


def read_local_stack(environ: Mapping[str, str] = os.environ, check: bool = True) -> dict:
    """The running local stack's state; LocalStackError when there is none or it does not answer."""
    path = state_path(environ)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise LocalStackError(f"no local stack is running ({path} does not exist): start one with "
                              "`cpb local up` (or `make local`) in another terminal") from None
    except ValueError:
        raise LocalStackError(f"{path} is not valid JSON: stop `cpb local up` and start it again") from None
    if check and not endpoint_answers(str(state.get("endpoint", ""))):
        raise LocalStackError(f"the local stack in {path} does not answer at {state.get('endpoint')} (it was "
                              "stopped without cleaning up?): start it again with `cpb local up`")
    return state


def endpoint_answers(endpoint: str, timeout: float = 2.0) -> bool:
    """True when moto's server answers at `endpoint`."""
    if not endpoint.startswith("http://127.0.0.1:") and not endpoint.startswith("http://localhost:"):
        return False
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=timeout) as answer:  # noqa: S310 - loopback
            return answer.status < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False
