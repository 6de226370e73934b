"""What the Lambda functions ship with: their pinned SDK and the worker modules they import.

The infra side builds the function asset from `handlers/` + `handlers.WORKER_MODULES_FOR_LAMBDA` +
`handlers/requirements.txt` (vendored); these tests keep those three honest.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import handlers

REPO = Path(__file__).resolve().parent.parent


def pins() -> dict:
    out = {}
    for line in (REPO / "handlers" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{line!r}: pin an exact version (the asset must be reproducible)"
            out[re.sub(r"[-_.]+", "-", name.lower())] = version
    return out


def test_requirements_pin_an_sdk_with_s3_conditional_writes_and_powertools():
    pinned = pins()
    assert {"boto3", "botocore", "aws-lambda-powertools"} <= set(pinned)
    major, minor, patch = (int(x) for x in pinned["botocore"].split(".")[:3])
    assert (major, minor, patch) >= (1, 35, 64), "S3 PutObject IfMatch needs botocore >= 1.35.64"


def test_the_tests_run_the_pinned_versions():
    """The handlers are tested against exactly what is vendored into the function."""
    for name, version in pins().items():
        assert metadata.version(name) == version, f"{name}: tests run {metadata.version(name)}, the Lambda ships {version}"


def test_the_handlers_import_only_the_worker_modules_they_declare(tmp_path):
    """Unpack handlers/ and WORKER_MODULES_FOR_LAMBDA alone and import both functions from there."""
    shutil.copytree(REPO / "handlers", tmp_path / "handlers", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "cpb_worker").mkdir()
    for name in handlers.WORKER_MODULES_FOR_LAMBDA:
        shutil.copy(REPO / "image" / "cpb_worker" / name, tmp_path / "cpb_worker" / name)
    probe = ("import sys, handlers.ingress, handlers.events; "
             "mods = [m.__file__ for n, m in sys.modules.items() if n.split('.')[0] in ('handlers', 'cpb_worker')]; "
             f"outside = [f for f in mods if not f.startswith({str(tmp_path)!r})]; "
             "assert not outside, outside; "
             "bad = [n for n, m in sys.modules.items() if n.startswith('cpb_worker') and m.__file__ and "
             "not m.__file__.endswith(tuple(" + repr(handlers.WORKER_MODULES_FOR_LAMBDA) + "))]; assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CPB_BUCKET": "b", "AWS_DEFAULT_REGION": "eu-west-1"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
