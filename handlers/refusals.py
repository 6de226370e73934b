"""Refusal records `<output>/_cpb/refusal-<id>.json`: why the ingress Lambda did not take a message.

A refused message stays a batch item failure (docs/CONTRACTS.md, ../shared/DESIGN.md: SQS retries
it, then moves it to the DLQ), which for an invalid message takes `maxReceiveCount` visibility
timeouts (~30 minutes with the defaults) and meanwhile leaves nothing in the bucket. So on every
refused delivery the Lambda also writes the reason under the `_cpb/` of each output the message
names, when that output is itself a valid output (a key in the stack's bucket, no `_cpb` or
`part-NNNNN` folder): `cpb status <output>` then shows it at once, also for messages sent with
`aws sqs send-message`.

Record (JSON object): `message_id` (the identity: `client_token`, the `cpb-original-message-id`
attribute, else the SQS message id; `#n` for list entry n, as CPB_MESSAGE_ID), `sqs_message_id`,
`entry` (list index or null), `kind` (`invalid`: the message can never pass as it is; `busy`: the
output is in use by another message's unfinished run, so the message waits on the queue), `field`,
`reason` (the line the Lambda logs), `receive_count` (of this delivery), `first_at`, `at`. Written
with S3 conditional writes (`IfNoneMatch: *` to create, `IfMatch` to update), best effort: a
refusal record that cannot be written never changes what happens to the message.
"""
from __future__ import annotations

import datetime as dt
import json
from typing import Any, Callable, Mapping, Optional

from handlers.lease import conditional_failed, error_code
from handlers.schema import (_CLIENT_TOKEN, ORIGINAL_MESSAGE_ID_ATTRIBUTE, Limits, MessageError, _key,
                             entry_message_id, is_part_folder, message_identity, submission_id)

__all__ = ["REFUSAL_PREFIX", "refusal_key", "refused_outputs", "raw_identity", "record_refusal"]

REFUSAL_PREFIX = "_cpb/refusal-"


def refusal_key(output: str, message_id: str) -> str:
    """`<output>/_cpb/refusal-<id>.json`, `<id>` sanitised as for submission records."""
    return f"{output}/{REFUSAL_PREFIX}{submission_id(message_id)}.json"


def _valid_output(value: Any, limits: Limits) -> Optional[str]:
    """The normalised output when `value` alone is a valid output, else None."""
    try:
        output = _key(value, "output", limits)
    except MessageError:
        return None
    segments = output.split("/")
    if "_cpb" in segments or any(is_part_folder(s) for s in segments):
        return None
    return output


def _decoded(body: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def refused_outputs(body: str, limits: Limits) -> list:
    """(entry index or None, output) for each entry of the message whose `output` is valid by itself."""
    value = _decoded(body)
    items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
    if len(items) > limits.max_jobs_per_message:
        return []  # refused as a whole for its length: no entry's output stands for it
    found = []
    for index, item in items:
        if isinstance(item, dict) and "output" in item:
            output = _valid_output(item["output"], limits)
            if output is not None and output not in [o for _, o in found]:
                found.append((index, output))
    return found


def raw_identity(body: str, sqs_message_id: str, attributes: Optional[Mapping[str, str]] = None) -> str:
    """The message identity of a body that may not parse: its entries' `client_token` when every entry
    carrying one carries the same valid one, else as `handlers.schema.message_identity`."""
    value = _decoded(body)
    items = value if isinstance(value, list) else [value]
    tokens = {item.get("client_token") for item in items if isinstance(item, dict) and item.get("client_token")}
    if len(tokens) == 1:
        token = tokens.pop()
        if isinstance(token, str) and _CLIENT_TOKEN.match(token):
            return token
    return message_identity([], sqs_message_id, attributes)


def _now_iso(clock: Callable[[], float]) -> str:
    return dt.datetime.fromtimestamp(clock(), dt.timezone.utc).isoformat(timespec="seconds")


def record_refusal(s3: Any, limits: Limits, body: str, sqs_message_id: str, attributes: Optional[Mapping[str, str]],
                   exc: MessageError, kind: str, receive_count: Optional[int], clock: Callable[[], float],
                   identity: Optional[str] = None) -> list:
    """Write (or update) the refusal record under each valid output of the message; returns the keys
    written. Never raises for S3 reasons other than a conditional write lost (then skipped)."""
    identity = identity or raw_identity(body, sqs_message_id, attributes)
    value = _decoded(body)
    written = []
    for index, output in refused_outputs(body, limits):
        message_id = entry_message_id(identity, index if isinstance(value, list) else None)
        key = refusal_key(output, message_id)
        try:
            previous, etag = _read(s3, limits.bucket, key)
        except Exception:
            continue
        now = _now_iso(clock)
        record = {"message_id": message_id, "sqs_message_id": sqs_message_id, "entry": index, "kind": kind,
                  "field": exc.field, "reason": str(exc), "receive_count": receive_count,
                  "first_at": (previous or {}).get("first_at") or now, "at": now}
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            s3.put_object(Bucket=limits.bucket, Key=key, ContentType="application/json",
                          Body=json.dumps(record, indent=1, sort_keys=True).encode(), **condition)
        except Exception as put_exc:
            if conditional_failed(put_exc):
                continue  # another delivery of it wrote the same thing just now
            raise
        written.append(key)
    return written


def _read(s3: Any, bucket: str, key: str) -> tuple:
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if error_code(exc) in ("NoSuchKey", "404", "NotFound"):
            return None, None
        raise
    try:
        value = json.loads(obj["Body"].read())
    except ValueError:
        value = None
    return (value if isinstance(value, dict) else None), obj["ETag"]
