"""Worker failures, each carrying the exit code of docs/CONTRACTS.md.

Batch's retry strategy reads the exit code, so the class of an error decides
whether the job is retried: bad input and pipeline errors never get better on
a retry, transient S3/network trouble may.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_PIPELINE_FAILED = 3
EXIT_TRANSIENT = 4
EXIT_KILLED = 137


class WorkerError(Exception):
    """A failure with a one-line reason for the scientist and an exit code."""

    exit_code = EXIT_PIPELINE_FAILED

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = " ".join(str(reason).split())  # always one line in the log
        self.record = None  # the failed RunRecord, when one was written


class BadInput(WorkerError):
    """Pipeline, data file, images or range are missing or invalid (no retry)."""

    exit_code = EXIT_BAD_INPUT


class PipelineFailed(WorkerError):
    """CellProfiler ran but did not produce every expected result (no retry)."""

    exit_code = EXIT_PIPELINE_FAILED


class Transient(WorkerError):
    """S3 or network trouble that outlasted our retries (Batch may retry)."""

    exit_code = EXIT_TRANSIENT


class Killed(WorkerError):
    """A CellProfiler process was killed by SIGKILL, usually the OOM killer.

    Exits 137 like a kernel kill so the job definition retries it once."""

    exit_code = EXIT_KILLED


EXIT_SUPERSEDED = 5


class Superseded(WorkerError):
    """The output's lease names another run: this job's run was replaced. Nothing is
    written (no record either: the output belongs to the other run now); no retry."""

    exit_code = EXIT_SUPERSEDED
