"""Shared pytest setup: repo paths, the CellProfiler executable, and the
reliability summary printed at the end of `make test`.

Markers (register figures for the README's reliability section):
  policy_trip  a test proving one policy of the pack rejects a broken resource
  hostile      a test feeding one hostile/bad message through the Lambda or `cpb`
  fault        a test injecting one fault (throttling, S3 errors, kills, OOM...)
  race         a test of reruns and races: two runs, retries or senders on one output never
               yield wrong or mixed results (issue 11's cases and the refusals they need)
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_EXAMPLES = REPO.parent / "shared" / "examples"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_FIGURES = {"policy_trip": "policies proven to trip", "hostile": "hostile messages rejected",
            "fault": "faults injected and survived", "race": "reruns and races survived"}
_counts: dict[str, list[int]] = {m: [0, 0] for m in _FIGURES}  # marker -> [passed, total]


def pytest_configure(config: pytest.Config) -> None:
    for marker, text in _FIGURES.items():
        config.addinivalue_line("markers", f"{marker}: counts towards '{text}' in the summary")
    config.addinivalue_line("markers", "cellprofiler: runs the real CellProfiler executable")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    for marker in _FIGURES:
        if marker in report.keywords:
            _counts[marker][1] += 1
            _counts[marker][0] += int(report.passed)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    if not any(total for _, total in _counts.values()):
        return
    terminalreporter.section("reliability figures")
    for marker, text in _FIGURES.items():
        passed, total = _counts[marker]
        terminalreporter.write_line(f"{text}: {passed} of {total}")


def cellprofiler_command() -> str:
    """The `cellprofiler` executable tests run: $CPB_CELLPROFILER, else the
    project's .venv-cp, else PATH. Fails (never skips) when none exists:
    the README's test command installs it."""
    candidates = [os.environ.get("CPB_CELLPROFILER"), str(REPO / ".venv-cp" / "bin" / "cellprofiler"),
                  shutil.which("cellprofiler")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail("CellProfiler is not installed: run `make test` (it builds .venv-cp), "
                "or set CPB_CELLPROFILER to a cellprofiler executable")


@pytest.fixture(scope="session")
def cellprofiler_env() -> dict[str, str]:
    """Environment for running the worker against the real CellProfiler here."""
    env = dict(os.environ)
    env["CPB_CELLPROFILER"] = cellprofiler_command()
    from cpb_worker.runner import venv_args
    env.setdefault("CPB_CELLPROFILER_ARGS", venv_args(env["CPB_CELLPROFILER"]))
    env["OMP_NUM_THREADS"] = "1"
    env["OPENBLAS_NUM_THREADS"] = "1"
    return env


def project_cellprofiler_versions() -> dict[str, str]:
    """CELLPROFILER_TAG / CELLPROFILER_PYPI from image/cellprofiler.mk, the one place naming them."""
    values = {}
    for line in (REPO / "image" / "cellprofiler.mk").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            values[key.strip()] = value.strip()
    return values


@pytest.fixture(scope="session")
def cellprofiler_version(cellprofiler_env) -> str:
    """What the CellProfiler the tests run says it is (`cellprofiler --version`)."""
    import subprocess
    from cpb_worker.runner import cellprofiler_argv
    out = subprocess.run(cellprofiler_argv(cellprofiler_env) + ["--version"], capture_output=True, text=True,
                         env=cellprofiler_env, timeout=120).stdout.strip().splitlines()
    return out[-1] if out else "unknown"


#: Nuclei IdentifyPrimaryObjects finds in ExampleHuman's one image set, by CellProfiler major version
#: (measured: 4.2.8.1 finds 289, the 5.0 nightly 290).
EXAMPLE_HUMAN_NUCLEI = {"4": 289, "5": 290}


@pytest.fixture(scope="session")
def example_human_nuclei(cellprofiler_version) -> int:
    return EXAMPLE_HUMAN_NUCLEI[cellprofiler_version.split(".")[0]]


@pytest.fixture(scope="session")
def shared_examples() -> Path:
    """The CellProfiler example data beside the project (CI always has it)."""
    if not SHARED_EXAMPLES.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_EXAMPLES} is missing in CI")
        pytest.skip(f"shared CellProfiler examples not found at {SHARED_EXAMPLES} "
                    "(they sit beside the project in CI; a plain clone has only generated data)")
    return SHARED_EXAMPLES
