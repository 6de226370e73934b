"""The output lease `<output>/_cpb/lease.json`: which run is an output's CURRENT run.

Written by the Lambdas and by `cpb requeue` only, always with S3 conditional writes; consumers
(`cpb results`, `cpb status`, `cpb plate`) accept only the records of the run it names. Schema and
rules in docs/CONTRACTS.md ("Runs, leases, chaining, resume and out-of-memory retries").

Also here: the run id and message identity rules the client needs to predict what the Lambda will
do with a message it sends (`cpb submit` prints the run id of each message).
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable, Optional

from botocore.exceptions import ClientError

LEASE_KEY = "_cpb/lease.json"
ORIGINAL_ID_ATTRIBUTE = "cpb-original-message-id"


class LeaseConflict(Exception):
    """The lease kept changing under a conditional write (another writer is active)."""


def lease_key(output: str) -> str:
    return f"{output.strip('/')}/{LEASE_KEY}"


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def read_lease(s3: Any, bucket: str, output: str) -> tuple[Optional[dict], Optional[str]]:
    """(lease, etag), or (None, None) when the output has no lease (before leases, or a local run)."""
    try:
        answer = s3.get_object(Bucket=bucket, Key=lease_key(output))
    except ClientError as exc:
        if _code(exc) in ("NoSuchKey", "404", "NotFound"):
            return None, None
        raise
    try:
        value = json.loads(answer["Body"].read())
    except ValueError:
        value = None
    if not isinstance(value, dict):
        value = {"state": "unreadable", "run_id": None}
    return value, answer.get("ETag")


def update_lease(s3: Any, bucket: str, output: str, change: Callable[[dict], Optional[dict]],
                 attempts: int = 6, clock: Callable[[], float] = time.time) -> Optional[dict]:
    """Apply `change` to the current lease with a conditional write (`IfMatch`), re-reading after a lost race.

    `change(lease)` returns the new lease, or None to leave it as it is (then None is returned).
    Raises LookupError when the output has no lease, LeaseConflict when every attempt lost a race."""
    for _ in range(attempts):
        lease, etag = read_lease(s3, bucket, output)
        if lease is None:
            raise LookupError(f"{output} has no lease")
        new = change(json.loads(json.dumps(lease)))
        if new is None:
            return None
        new["updated_at"] = iso(clock())
        try:
            s3.put_object(Bucket=bucket, Key=lease_key(output), IfMatch=etag, ContentType="application/json",
                          Body=json.dumps(new, indent=1, sort_keys=True).encode())
        except ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                continue
            raise
        return new
    raise LeaseConflict(f"s3://{bucket}/{lease_key(output)} kept changing while cpb tried to update it; "
                        "run the command again")


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def run_id_for(identity: str, generation: int = 0) -> str:
    """`run_id`: the first 20 hex digits of sha256("<message identity>:<generation>")."""
    return hashlib.sha256(f"{identity}:{generation}".encode("utf-8")).hexdigest()[:20]


def entry_identity(base: str, index: Optional[int]) -> str:
    """The identity of list entry `index` (`<base>#<n>`), or `base` for a single-object message."""
    return base if index is None else f"{base}#{index}"


def message_identity(body: Any, sqs_message_id: str, attributes: Optional[dict] = None) -> str:
    """A message's identity (before `#n`): its `client_token`, else the original id a `cpb requeue --dlq`
    carried over in the `cpb-original-message-id` attribute, else the SQS message id."""
    items = body if isinstance(body, list) else [body]
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("client_token"), str):
            return item["client_token"]
    original = ((attributes or {}).get(ORIGINAL_ID_ATTRIBUTE) or {}).get("StringValue")
    return original or sqs_message_id


def lease_jobs(lease: dict) -> list[dict]:
    """The run's Batch jobs: the original ones, then every retry (requeue or out-of-memory)."""
    jobs = [dict(j, retry=None) for j in lease.get("jobs") or [] if isinstance(j, dict) and j.get("job_id")]
    jobs += [dict(job_id=r["job_id"], retry=r) for r in lease.get("retries") or []
             if isinstance(r, dict) and r.get("job_id")]
    return jobs
