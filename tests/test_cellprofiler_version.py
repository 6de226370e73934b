"""One CellProfiler everywhere: the version named in image/cellprofiler.mk is the one the
container is built FROM, the Pulumi config default, the local .venv-cp, and the docs' word.

A laptop run predicts the cloud only while these agree; each assertion names the file to fix.
"""
from __future__ import annotations

import re
import subprocess

import pytest

from conftest import REPO, project_cellprofiler_versions

VERSIONS = project_cellprofiler_versions()
TAG, PYPI = VERSIONS["CELLPROFILER_TAG"], VERSIONS["CELLPROFILER_PYPI"]


def test_the_version_file_names_a_tag_and_its_pypi_release():
    assert re.fullmatch(r"\d+\.\d+\.\d+", TAG) and PYPI.startswith(TAG), "image/cellprofiler.mk"


def test_dockerfile_builds_from_that_tag():
    dockerfile = (REPO / "image" / "Dockerfile").read_text()
    assert re.search(rf"^ARG CELLPROFILER_TAG={re.escape(TAG)}$", dockerfile, re.M), \
        f"image/Dockerfile's default CELLPROFILER_TAG must be {TAG}"


def test_pulumi_config_defaults_to_that_tag():
    from components.config import FIELDS
    default = next(f.default for f in FIELDS if f.name == "cellprofilerImageTag")
    assert default == TAG, "components/config.py FIELDS cellprofilerImageTag (and Pulumi.yaml)"
    assert re.search(rf"cellprofilerImageTag:\n(?:    .*\n)*?    default: {re.escape(TAG)}\n",
                     (REPO / "Pulumi.yaml").read_text()), "Pulumi.yaml cellprofilerImageTag default"


def test_local_virtualenv_pins_that_release():
    pins = (REPO / "requirements-cellprofiler.txt").read_text()
    assert f"cellprofiler-core=={PYPI}\n" in pins, "requirements-cellprofiler.txt"
    assert "include image/cellprofiler.mk" in (REPO / "Makefile").read_text()


def test_emulated_stack_names_the_same_image():
    from cpb.local.emulator import WORKER_IMAGE
    assert WORKER_IMAGE == f"cellprofiler/cellprofiler:{TAG}"


@pytest.mark.parametrize("doc", ["README.md", "docs/CONTRACTS.md", "image/README.md", "docs/DEPLOY.md"])
def test_docs_name_that_version_and_no_other_as_the_default(doc):
    text = (REPO / doc).read_text()
    assert TAG in text, f"{doc} should say which CellProfiler runs ({TAG})"
    assert "headless CellProfiler 5 from PyPI" not in text and "(headless CellProfiler 5 nightly" not in text, doc


@pytest.mark.cellprofiler
def test_the_cellprofiler_the_tests_run_is_that_release(cellprofiler_version):
    """`make test` runs the container's release; `make CELLPROFILER=5 test` is the opt-in exception."""
    if "cp5" in str(__import__("os").environ.get("CPB_CELLPROFILER", "")):
        pytest.skip("CELLPROFILER=5: the opt-in 5.0 nightly run")
    assert cellprofiler_version == PYPI
