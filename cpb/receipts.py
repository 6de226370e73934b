"""Local receipts of what `cpb submit` / `cpb plate` sent (or found up to date), so `cpb status` needs
no arguments and can tell a message still on its way from a finished older run.

A scientist who just submitted a plate should be able to type `cpb status` (or paste a message
id) without remembering output prefixes. Each submit appends one JSON line per output to
`$CPB_HOME/submissions.jsonl` (default `~/.cpb/`): `{"batch", "sent_at", "bucket", "message_id",
"output", "identity", "kind"}`, where `identity` is the message identity the Lambda keys the output's
lease by (`<client_token>` or `<client_token>#<n>`) and `kind` is `sent`, or `skipped` for a step
`cpb plate` found up to date (then `note` says why). Nothing else reads or sends it.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence


def receipts_file(environ: Mapping[str, str] = os.environ) -> Path:
    """Where receipts live: $CPB_HOME/submissions.jsonl, else ~/.cpb/submissions.jsonl."""
    home = environ.get("CPB_HOME") or str(Path.home() / ".cpb")
    return Path(home) / "submissions.jsonl"


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def record(bucket: str, sent: Iterable[Sequence[str]], environ: Mapping[str, str] = os.environ,
           skipped: Iterable[tuple[str, str]] = (), order: Sequence[str] = (),
           leases: Optional[Mapping[str, Optional[str]]] = None) -> Optional[Path]:
    """Append one submit: `sent` holds (message id, output[, identity]); `skipped` holds (output, why)
    for steps found up to date; `order` lists outputs in the order `cpb status` should show them;
    `leases` maps an output to the run its lease named just before sending (None: no lease), kept as
    `lease_before`. None when nothing was written.

    A receipt that cannot be written (read-only home) never fails a submission that SQS already accepted.
    """
    batch = uuid.uuid4().hex[:12]
    stamp = _stamp()
    rows = [{"batch": batch, "sent_at": stamp, "bucket": bucket, "message_id": row[0], "output": row[1],
             "identity": row[2] if len(row) > 2 else None, "kind": "sent",
             **({"lease_before": leases[row[1]]} if leases is not None and row[1] in leases else {})} for row in sent]
    rows += [{"batch": batch, "sent_at": stamp, "bucket": bucket, "message_id": None, "output": output,
              "identity": None, "kind": "skipped", "note": note} for output, note in skipped]
    if not rows:
        return None
    if order:  # e.g. a plate's steps in chain order, whichever were sent or skipped
        rows.sort(key=lambda r: order.index(r["output"]) if r["output"] in order else len(order))
    path = receipts_file(environ)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    except OSError:
        return None
    return path


def _read(environ: Mapping[str, str]) -> list[dict]:
    path = receipts_file(environ)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("output"):
            rows.append(row)
    return rows


def last_outputs(bucket: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Outputs of the most recent submit to `bucket` (empty when there is none)."""
    rows = [r for r in _read(environ) if r.get("bucket") == bucket]
    if not rows:
        return []
    batch = rows[-1]["batch"]
    return list(dict.fromkeys(r["output"] for r in rows if r["batch"] == batch))


def resolve(names: Iterable[str], bucket: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Turn message ids (or client tokens) from earlier submits into their outputs; other names are outputs already."""
    by_id: dict[str, str] = {}
    for row in _read(environ):
        if row.get("bucket") != bucket:
            continue
        for key in (row.get("message_id"), row.get("identity"), (row.get("identity") or "").split("#")[0]):
            if key:
                by_id.setdefault(key, row["output"])
    return list(dict.fromkeys(by_id.get(name, name) for name in names))


def sent_outputs(bucket: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Every output `cpb submit` on this machine sent to `bucket`, most recent last (for spotting typos)."""
    return list(dict.fromkeys(r["output"] for r in _read(environ) if r.get("bucket") == bucket))


def latest(bucket: str, output: str, environ: Mapping[str, str] = os.environ) -> Optional[dict]:
    """The most recent receipt for `output` in `bucket` (sent or skipped), or None."""
    rows = [r for r in _read(environ) if r.get("bucket") == bucket and r.get("output") == output]
    return rows[-1] if rows else None


#: SQS keeps a message at most 14 days: a receipt older than that is no message on its way.
MAX_RETENTION_S = 14 * 24 * 3600


def not_taken(bucket: str, output: str, lease: Optional[dict], environ: Mapping[str, str] = os.environ,
              taken: Optional[Callable[[str], bool]] = None, now: Optional[float] = None) -> list[dict]:
    """Messages sent from here for `output` that the Lambda has not taken: with an identity the lease
    does not name and (`taken`, when given) no submission record of the Lambda's, sent less than SQS's
    14-day retention ago, and either

    - sent with `lease_before` recorded and `taken` given: the lease only moves forward, so a message
      sent while it named `lease_before` (or nothing) is taken when the lease names it, or its
      submission record says the Lambda submitted it (a later run replaced it); else it is still on
      the queue (e.g. refused for now because another message's run was using the output) or in
      the dead-letter queue. No clock involved: two messages sent in a row before the Lambda took
      either are told apart;
    - else (receipts from before `lease_before`, callers without records): sent while the lease named
      the run it names now, or sent after the lease's run began.

    Only outputs with a lease are judged (an output without one may be served by a Lambda from before
    leases). The time test compares this machine's clock with the Lambda's; a slow laptop clock made a
    message just sent look older than the lease, so the previous run passed for the one asked for."""
    if not lease or not lease.get("created_at"):
        return []
    since = str(lease["created_at"])[:19]  # UTC either way: "...Z" (here) or "...+00:00" (the Lambda)
    oldest = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((time.time() if now is None else now) - MAX_RETENTION_S))

    def waiting(r: dict) -> bool:
        if taken is not None and taken(str(r["identity"])):
            return False
        if str(r.get("sent_at"))[:19] < oldest:
            return False
        if taken is not None and "lease_before" in r:
            return True
        if "lease_before" in r and r["lease_before"] is not None and r["lease_before"] == lease.get("run_id"):
            return True  # the lease has not moved since it was sent
        return str(r.get("sent_at"))[:19] >= since

    return [r for r in _read(environ)
            if r.get("bucket") == bucket and r.get("output") == output and r.get("kind", "sent") == "sent"
            and r.get("identity") and r["identity"] != lease.get("message_id") and waiting(r)]
