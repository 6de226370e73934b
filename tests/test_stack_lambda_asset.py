"""The Lambdas' code archive: handlers/, cpb_worker/ and handlers/requirements.txt vendored for the
Lambda's Python 3.12 on x86_64, built deterministically and importable on its own."""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pulumi
import pytest

from components import lambda_asset
from components.lambda_asset import LambdaSources, VendoringError, lambda_code, vendored_dependencies
from stack_harness import REPO, program

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SOURCES = LambdaSources.of_repo(REPO)


def python312() -> str:
    """The Lambda runtime's Python (3.12): $CPB_PYTHON312, pyenv's, or python3.12 on PATH. Fails, never
    skips, when none exists: the archive's import test is the only proof it runs there."""
    candidates = [os.environ.get("CPB_PYTHON312"), *sorted(glob.glob(os.path.expanduser(
        "~/.pyenv/versions/3.12.*/bin/python3.12"))), shutil.which("python3.12")]
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                        capture_output=True).returncode == 0:
            return candidate
    pytest.fail("Python 3.12 (the Lambda runtime's) is not installed: `pyenv install 3.12`, or set CPB_PYTHON312")


def materialize(archive: pulumi.Archive, into: Path) -> None:
    """Lay an archive out as the Pulumi engine zips it (sdk/go/common/resource/archive): an asset under
    its key, a nested archive's files under its key as a folder, a folder archive walked in full."""
    if isinstance(archive, pulumi.AssetArchive):
        for key, member in archive.assets.items():
            if isinstance(member, pulumi.FileAsset):
                (into / key).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(member.path, into / key)
            else:
                materialize(member, into / key)
    elif isinstance(archive, pulumi.FileArchive):
        shutil.copytree(archive.path, into, dirs_exist_ok=True)
    else:
        raise AssertionError(f"unexpected member {archive!r}")


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The archive the deployed functions get, unpacked as Lambda unpacks it into /var/task."""
    function = program(fsxEnabled="false").one("aws:lambda/function:Function", "ingress")
    task = tmp_path_factory.mktemp("var-task")
    materialize(function.inputs["code"], task)
    return task


def test_both_functions_run_the_same_archive() -> None:
    functions = program(fsxEnabled="false").of_type("aws:lambda/function:Function")
    assert {f.inputs["handler"] for f in functions} == {"handlers.ingress.handler", "handlers.events.handler"}
    first, second = (f.inputs["code"] for f in functions)
    assert first.assets.keys() == second.assets.keys()


def test_the_handlers_import_from_the_archive_alone_on_python_312(unpacked: Path) -> None:
    """No site-packages, no project checkout: only what Lambda would have in /var/task (and the stdlib).
    boto3/botocore must be the pinned ones and know S3 conditional writes."""
    probe = "\n".join([
        "import sys, importlib",
        "mods = ['handlers.ingress', 'handlers.events', 'handlers.schema', 'handlers.submission',",
        "        'cpb_worker.pipeline', 'aws_lambda_powertools', 'boto3', 'botocore']",
        "for name in mods: importlib.import_module(name)",
        "import boto3, botocore",
        "ours = [m.__file__ for n, m in list(sys.modules.items()) if getattr(m, '__file__', None)",
        "        and n.split('.')[0] in ('handlers', 'cpb_worker', 'boto3', 'botocore', 'aws_lambda_powertools')]",
        f"outside = [f for f in ours if not f.startswith({str(unpacked)!r})]",
        "assert not outside, outside",
        "members = boto3.client('s3', region_name='eu-west-1').meta.service_model.operation_model(",
        "    'PutObject').input_shape.members",
        "assert 'IfMatch' in members and 'IfNoneMatch' in members, sorted(members)",
        "assert sys.version_info[:2] == (3, 12)",
        "print(boto3.__version__, botocore.__version__)",
    ])
    env = {"PYTHONPATH": str(unpacked), "PATH": "/usr/bin:/bin", "AWS_DEFAULT_REGION": "eu-west-1",
           "CPB_BUCKET": "b", "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(unpacked)}
    done = subprocess.run([python312(), "-S", "-s", "-c", probe], cwd=unpacked, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    pins = dict(line.split("==") for line in lambda_asset.pinned_requirements(SOURCES.requirements))
    assert done.stdout.split() == [pins["boto3"], pins["botocore"]]


def test_the_archive_ships_no_machine_specific_or_byte_code_files(unpacked: Path) -> None:
    files = [p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*") if p.is_file()]
    assert len(files) > 1000  # boto3 and botocore's models are there
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert not [f for f in files if f.startswith("bin/") or f.rsplit("/", 1)[-1] in ("RECORD", "INSTALLER")]
    assert lambda_asset.COMPLETE_MARKER not in files
    assert "handlers/requirements.txt" not in files and "handlers/ingress.py" in files


def test_the_dependencies_are_the_same_wherever_they_are_built(tmp_path: Path) -> None:
    """Two builds into different folders (two machines, two checkouts) give byte-identical trees, so the
    archive's hash (what Pulumi diffs on) depends only on the pins."""
    first = vendored_dependencies(SOURCES.requirements, SOURCES.constraints, tmp_path / "one")
    second = vendored_dependencies(SOURCES.requirements, SOURCES.constraints, tmp_path / "two")
    assert first.name == second.name == lambda_asset.cache_key(SOURCES.requirements, SOURCES.constraints)
    assert tree_digest(first) == tree_digest(second)
    assert vendored_dependencies(SOURCES.requirements, SOURCES.constraints, tmp_path / "one") == first  # reused


def test_byte_code_left_in_the_cache_never_reaches_the_archive(tmp_path: Path) -> None:
    built = vendored_dependencies(SOURCES.requirements, SOURCES.constraints, tmp_path)
    stray = built / "boto3" / "__pycache__" / "x.cpython-312.pyc"
    stray.parent.mkdir()
    stray.write_bytes(b"\0")
    vendored_dependencies(SOURCES.requirements, SOURCES.constraints, tmp_path)
    assert not stray.exists()


@pytest.mark.fault
def test_no_network_gives_a_clear_error_and_leaves_no_half_built_cache(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(VendoringError) as caught:
        vendored_dependencies(SOURCES.requirements, SOURCES.constraints, tmp_path)
    message = str(caught.value)
    assert "could not vendor the Lambda's dependencies (boto3==" in message
    assert "needs PyPI (or your PIP_INDEX_URL)" in message and "pip said:" in message
    assert not list((tmp_path / "lambda-deps").iterdir())


@pytest.mark.fault
def test_a_python_without_pip_is_named(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho '/usr/bin/python: No module named pip' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(VendoringError, match=r"pip is not installed in this interpreter; run `make venv`"):
        vendored_dependencies(SOURCES.requirements, SOURCES.constraints, tmp_path, python=str(fake))


def test_unpinned_requirements_are_refused(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("boto3==1.44.8\naws-lambda-powertools>=3\n")
    with pytest.raises(VendoringError, match=r"requirements.txt:2: 'aws-lambda-powertools>=3' is not pinned"):
        vendored_dependencies(requirements, SOURCES.constraints, tmp_path)


def test_a_transitive_dependency_without_a_pin_is_refused(tmp_path: Path) -> None:
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("".join(line + "\n" for line in lambda_asset.pinned_requirements(SOURCES.constraints)
                                   if not line.startswith("six==")))
    requirements = tmp_path / "requirements.txt"  # handlers/requirements.txt may pin it too: drop it there as well
    requirements.write_text("".join(line + "\n" for line in lambda_asset.pinned_requirements(SOURCES.requirements)
                                    if not line.startswith("six==")))
    with pytest.raises(VendoringError, match=r"six==\S+ would be vendored without a pin"):
        vendored_dependencies(requirements, constraints, tmp_path)
    assert not list((tmp_path / "lambda-deps").iterdir())


def test_pip_is_told_the_lambdas_interpreter_and_platform() -> None:
    command = lambda_asset.pip_command(Path("r.txt"), Path("c.txt"), Path("t"))
    joined = " ".join(command)
    for expected in ("--python-version 3.12", "--implementation cp", "--only-binary=:all:", "--no-compile",
                     "--platform manylinux2014_x86_64", "--target t", "-r r.txt", "-c c.txt"):
        assert expected in joined


def test_a_missing_handler_or_requirements_file_is_named(tmp_path: Path) -> None:
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    (handlers / "ingress.py").write_text("")
    sources = LambdaSources(handlers, REPO / "image" / "cpb_worker", handlers / "requirements.txt",
                            SOURCES.constraints, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"handlers/events\.py is missing: the Lambda's handler "
                                                r"handlers\.events\.handler would not exist"):
        lambda_code(sources, ["handlers.ingress", "handlers.events"], dependencies=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"requirements\.txt is missing: it pins the Lambda's dependencies"):
        lambda_code(sources, ["handlers.ingress"])
    sources = LambdaSources(handlers, tmp_path, handlers / "requirements.txt", SOURCES.constraints, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"__init__\.py is missing: the Lambda imports cpb_worker"):
        lambda_code(sources, ["handlers.ingress"], dependencies=tmp_path)


def test_a_dependency_may_not_shadow_the_projects_packages(tmp_path: Path) -> None:
    (tmp_path / "handlers").mkdir()
    with pytest.raises(VendoringError, match="top-level 'handlers'"):
        lambda_code(SOURCES, ["handlers.ingress"], dependencies=tmp_path)


def test_the_transitive_pins_are_exactly_what_the_requirements_pull_in(tmp_path: Path) -> None:
    """Every distribution the requirements pull in is pinned (here or in the requirements), and every pin
    here names one of them at the version resolved: no stale pin (`--lock` is how to update the list)."""
    relocked = tmp_path / "constraints.txt"
    lambda_asset.lock_constraints(SOURCES.requirements, relocked)
    resolved = {pin.split("==")[0]: pin for pin in lambda_asset.pinned_requirements(relocked, allow_empty=True)}
    direct = {lambda_asset._canonical(pin.split("==")[0]) for pin in lambda_asset.pinned_requirements(SOURCES.requirements)}
    for pin in lambda_asset.pinned_requirements(SOURCES.constraints, allow_empty=True):
        name = lambda_asset._canonical(pin.split("==")[0])
        assert resolved.get(name) == pin or name in direct, f"{pin} is not what the requirements pull in"
    assert set(resolved.values()) <= set(lambda_asset.pinned_requirements(SOURCES.constraints, allow_empty=True))


def test_requirements_that_conflict_with_the_transitive_pins_say_how_to_re_lock(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("boto3==1.44.8\nbotocore==1.44.8\n")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("s3transfer==0.1.13\njmespath==1.1.0\npython-dateutil==2.9.0.post0\nsix==1.17.0\n"
                           "urllib3==2.8.0\n")  # far older than boto3 1.44 accepts
    with pytest.raises(VendoringError, match=r"conflict; after changing the requirements, re-lock with"):
        vendored_dependencies(requirements, constraints, tmp_path / "build")
