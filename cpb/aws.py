"""boto3 clients for the client commands, built in one place.

boto3 already honours `AWS_ENDPOINT_URL` (the demo and tests point it at
moto), so nothing here special-cases the emulator. Retries use botocore's
adaptive mode so throttling in a big submission slows us down instead of
failing the command. `batch_once` makes ONE attempt per call: SubmitJob has
no idempotency token, and a 5xx may hide a job Batch did create, so `cpb
requeue` retries submissions itself, looking the job's name up before each
attempt (cpb.requeue), instead of letting botocore start a second copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import boto3
from botocore.config import Config

_RETRIES = Config(retries={"max_attempts": 8, "mode": "adaptive"})
_ONCE = Config(retries={"total_max_attempts": 1, "mode": "standard"})


@dataclass(frozen=True)
class Clients:
    """The AWS clients one command uses, sharing a session and region."""

    s3: Any
    sqs: Any
    batch: Any
    logs: Any
    batch_once: Any = None  # Batch without botocore retries, for SubmitJob (None: use `batch`)

    @property
    def batch_submit(self) -> Any:
        return self.batch_once if self.batch_once is not None else self.batch


def make_clients(region: Optional[str] = None) -> Clients:
    """Clients for S3, SQS, Batch and CloudWatch Logs in `region`."""
    session = boto3.session.Session(region_name=region)
    return Clients(
        s3=session.client("s3", config=_RETRIES),
        sqs=session.client("sqs", config=_RETRIES),
        batch=session.client("batch", config=_RETRIES),
        logs=session.client("logs", config=_RETRIES),
        batch_once=session.client("batch", config=_ONCE),
    )
