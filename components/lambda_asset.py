"""The Lambda functions' code: ``handlers/``, the worker modules they import, and their pinned
dependencies (``handlers/requirements.txt``) vendored for the Lambda's Python 3.12 on x86_64.

Why vendored: the runtime's bundled boto3 differs by region and date, and the handlers need S3
conditional writes (``IfMatch``/``IfNoneMatch``) and Powertools, which an older bundled SDK or a
region-specific public layer cannot promise. The dependencies are installed once per distinct
requirements file with ``pip install --target`` into ``build/lambda-deps/<key>/`` (``key`` hashes the
requirements' text and the target platform), built in a scratch folder and renamed into place, so a
second ``pulumi preview``/``up`` reuses them offline, two concurrent runs never see half a folder, and
every machine with the same requirements ships the same files. Files that differ by machine (scripts
with the local interpreter in their ``#!`` line, pip's ``RECORD``/``INSTALLER``) are left out.

``preview`` and ``up`` both run this (Pulumi hashes the archive in preview, so they must agree); it
writes only under the build folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pulumi

#: The Lambda runtime the code is built for (components.ingress.LAMBDA_RUNTIME names it for AWS).
LAMBDA_PYTHON = "3.12"
#: pip platform tags of the python3.12 runtime on x86_64 (Amazon Linux 2023, glibc 2.34).
LAMBDA_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64")
#: Bump when what goes into the cache changes, so old caches are not reused.
CACHE_FORMAT = "1"
PIP_TIMEOUT_SECONDS = 600
COMPLETE_MARKER = ".cpb-complete.json"
#: pip's per-install bookkeeping: differs by machine and is never read at run time.
_MACHINE_SPECIFIC = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
_PINNED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+$")


class VendoringError(RuntimeError):
    """The dependencies could not be vendored; the message says what to do."""


def build_root(repo: Path) -> Path:
    """Where build products go: ``$CPB_BUILD_DIR`` or ``<repo>/build`` (ignored by git)."""
    return Path(os.environ.get("CPB_BUILD_DIR") or repo / "build")


def pinned_requirements(requirements: Path, allow_empty: bool = False) -> list[str]:
    """The requirement lines (``name==version``), refusing anything unpinned: the Lambda's code must be
    the same on every `pulumi up` from the same commit."""
    if not requirements.is_file():
        raise FileNotFoundError(f"{requirements} is missing: it pins the Lambda's dependencies")
    text = requirements.read_text().replace("\\\n", " ")
    pins = []
    for number, line in enumerate(text.splitlines(), 1):
        requirement = line.split("#", 1)[0].split(" --hash", 1)[0].strip()
        if not requirement:
            continue
        if not _PINNED.match(requirement):
            raise VendoringError(f"{requirements}:{number}: {requirement!r} is not pinned as name==version; "
                                 "pin it so every `pulumi up` ships the same dependencies")
        pins.append(requirement)
    if not pins and not allow_empty:
        raise VendoringError(f"{requirements} pins nothing; list name==version lines")
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def cache_key(requirements: Path, constraints: Path) -> str:
    """Names one vendored set: the pins' text and everything pip is told about the target."""
    material = json.dumps({"requirements": requirements.read_text(), "constraints": constraints.read_text(),
                           "python": LAMBDA_PYTHON, "platforms": LAMBDA_PLATFORMS, "format": CACHE_FORMAT},
                          sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:20]


def pip_command(requirements: Path, constraints: Path, target: Path, python: str = sys.executable) -> list[str]:
    """pip, told to fetch wheels for the Lambda's interpreter and platform, never to build or compile."""
    platforms = [arg for platform in LAMBDA_PLATFORMS for arg in ("--platform", platform)]
    return [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
            "--no-compile", "--only-binary=:all:", "--implementation", "cp", "--python-version", LAMBDA_PYTHON,
            *platforms, "--target", str(target), "-r", str(requirements), "-c", str(constraints)]


def installed_distributions(folder: Path) -> dict[str, str]:
    """``{canonical name: version}`` of what pip installed into ``folder`` (from each METADATA)."""
    found = {}
    for metadata in folder.glob("*.dist-info/METADATA"):
        fields = dict(line.split(": ", 1) for line in metadata.read_text(errors="replace").splitlines()[:20]
                      if ": " in line)
        found[_canonical(fields.get("Name", metadata.parent.name))] = fields.get("Version", "?")
    return found


def unpinned(folder: Path, pins: Sequence[str]) -> list[str]:
    """Installed distributions whose exact version no pin names (they would float between machines)."""
    pinned = {_canonical(pin.split("==")[0].split("[")[0]): pin.split("==", 1)[1] for pin in pins}
    return sorted(f"{name}=={version}" for name, version in installed_distributions(folder).items()
                  if pinned.get(name) != version)


def _drop_machine_specific(folder: Path) -> None:
    """Remove what differs between machines or runs: scripts (their #! names this interpreter),
    pip's bookkeeping, and byte code."""
    shutil.rmtree(folder / "bin", ignore_errors=True)
    for path in list(folder.rglob("*")):
        if path.is_dir() and path.name == "__pycache__":
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and path.parent.name.endswith(".dist-info") and path.name in _MACHINE_SPECIFIC:
            path.unlink()


def vendored_dependencies(requirements: Path, constraints: Path, root: Path, python: str = sys.executable,
                          timeout: int = PIP_TIMEOUT_SECONDS) -> Path:
    """The folder holding the requirements installed for the Lambda, installing them on first use."""
    pins = pinned_requirements(requirements)
    every_pin = pins + pinned_requirements(constraints, allow_empty=True)  # empty when the requirements pin all
    key = cache_key(requirements, constraints)
    final = root / "lambda-deps" / key
    if (final / COMPLETE_MARKER).is_file():
        _drop_machine_specific(final)  # byte code someone's import left behind would change the archive
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = final.parent / f".{key}.{os.getpid()}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    command = pip_command(requirements, constraints, scratch, python)
    environment = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PIP_PROGRESS_BAR": "off"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
    except FileNotFoundError:
        raise VendoringError(f"cannot run {python} to vendor the Lambda's dependencies; "
                             "run `make venv` and deploy from the project's .venv") from None
    except subprocess.TimeoutExpired:
        shutil.rmtree(scratch, ignore_errors=True)
        raise VendoringError(f"pip did not finish vendoring {requirements} within {timeout} s; check the network "
                             "or your pip index (PIP_INDEX_URL) and run again") from None
    if done.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        said = "\n    ".join((done.stderr or done.stdout).strip().splitlines()[-6:]) or "(nothing)"
        if "No module named pip" in said:
            hint = "pip is not installed in this interpreter; run `make venv`"
        elif "ResolutionImpossible" in said or "conflict" in said.lower():
            hint = (f"the pins of {requirements.name} and {constraints.name} conflict; after changing the "
                    "requirements, re-lock with `.venv/bin/python -m components.lambda_asset --lock`")
        else:
            hint = ("the first `pulumi preview`/`up` needs PyPI (or your PIP_INDEX_URL) to fetch them; later runs "
                    f"reuse {final} offline")
        raise VendoringError(f"could not vendor the Lambda's dependencies ({', '.join(pins)}) for Python "
                             f"{LAMBDA_PYTHON} x86_64: {hint}.\n  pip said:\n    {said}")
    floating = unpinned(scratch, every_pin)
    if floating:
        shutil.rmtree(scratch, ignore_errors=True)
        raise VendoringError(f"{', '.join(floating)} would be vendored without a pin, so another machine or day "
                             f"could ship different code; pin {'it' if len(floating) == 1 else 'them'} in "
                             f"{constraints} (`python -m components.lambda_asset --lock` rewrites it)")
    _drop_machine_specific(scratch)
    (scratch / COMPLETE_MARKER).write_text(json.dumps({"requirements": pins, "python": LAMBDA_PYTHON,
                                                       "platforms": list(LAMBDA_PLATFORMS)}, indent=1) + "\n")
    try:
        scratch.rename(final)
    except OSError:  # another run finished the same set first: theirs is identical
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def lock_constraints(requirements: Path, constraints: Path, python: str = sys.executable) -> list[str]:
    """Resolve the requirements afresh for the Lambda's platform and write every transitive dependency's
    version to ``constraints`` (run after changing handlers/requirements.txt:
    ``.venv/bin/python -m components.lambda_asset --lock``). Returns the pins written."""
    direct = {_canonical(pin.split("==")[0].split("[")[0]) for pin in pinned_requirements(requirements)}
    with tempfile.TemporaryDirectory() as scratch:
        empty = Path(scratch) / "no-constraints.txt"
        empty.write_text("")
        command = pip_command(requirements, empty, Path(scratch) / "t", python)
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS,
                              env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        if done.returncode != 0:
            raise VendoringError(f"pip could not resolve {requirements}: {(done.stderr or done.stdout).strip()[-800:]}")
        pins = sorted(f"{name}=={version}" for name, version in installed_distributions(Path(scratch) / "t").items()
                      if name not in direct)
    header = [line for line in constraints.read_text().splitlines() if line.startswith("#")] if constraints.exists() else []
    constraints.write_text("\n".join(header + pins) + "\n")
    return pins


@dataclass(frozen=True)
class LambdaSources:
    """Where the Lambda's code comes from."""

    handlers_dir: Path
    worker_dir: Path
    requirements: Path  # the handlers' direct dependencies, pinned
    constraints: Path  # versions of everything those pull in
    build_root: Path

    @classmethod
    def of_repo(cls, repo: Path) -> "LambdaSources":
        return cls(handlers_dir=repo / "handlers", worker_dir=repo / "image" / "cpb_worker",
                   requirements=repo / "handlers" / "requirements.txt",
                   constraints=repo / "components" / "lambda-constraints.txt", build_root=build_root(repo))


def _python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def lambda_code(sources: LambdaSources, handler_modules: Sequence[str],
                dependencies: Optional[Path] = None) -> pulumi.AssetArchive:
    """The archive every Lambda of the stack runs from: the ``handlers`` package (its .py files, no
    caches), the ``cpb_worker`` package (stdlib-only modules plus boto3, which the archive brings: the
    handlers share the worker's pipeline and file-rule parsers so they refuse what it would), and the
    vendored dependencies at the archive's root, where Lambda's ``/var/task`` puts them first on
    ``sys.path``. ``handler_modules`` (e.g. ``handlers.ingress``) must each exist."""
    for module in handler_modules:
        path = sources.handlers_dir.parent / (module.replace(".", "/") + ".py")
        if module.split(".")[0] != sources.handlers_dir.name or not path.is_file():
            raise FileNotFoundError(f"{sources.handlers_dir / Path(*module.split('.')[1:])}.py is missing: the "
                                    f"Lambda's handler {module}.handler would not exist")
    if not (sources.worker_dir / "__init__.py").is_file():
        raise FileNotFoundError(f"{sources.worker_dir}/__init__.py is missing: the Lambda imports cpb_worker "
                                "to check pipelines")
    deps = dependencies if dependencies is not None else vendored_dependencies(
        sources.requirements, sources.constraints, sources.build_root)
    assets: dict[str, pulumi.Asset | pulumi.Archive] = {}
    for entry in sorted(deps.iterdir()):
        if entry.name == COMPLETE_MARKER or entry.name.startswith("."):
            continue
        assets[entry.name] = pulumi.FileArchive(str(entry)) if entry.is_dir() else pulumi.FileAsset(str(entry))
    for package, folder in (("handlers", sources.handlers_dir), ("cpb_worker", sources.worker_dir)):
        if package in assets:
            raise VendoringError(f"a dependency in {sources.requirements} installs a top-level {package!r}, "
                                 "which would shadow the project's own package")
        for path in _python_files(folder):
            assets[f"{package}/{path.relative_to(folder).as_posix()}"] = pulumi.FileAsset(str(path))
    return pulumi.AssetArchive(assets)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Vendor the Lambda's dependencies, or re-lock their transitive pins.")
    parser.add_argument("--lock", action="store_true", help="rewrite components/lambda-constraints.txt from "
                                                            "handlers/requirements.txt")
    repo = Path(__file__).resolve().parent.parent
    sources = LambdaSources.of_repo(repo)
    if parser.parse_args().lock:
        print("\n".join(lock_constraints(sources.requirements, sources.constraints)))
    else:
        print(vendored_dependencies(sources.requirements, sources.constraints, sources.build_root))
