"""Build, validate and send job messages exactly as the Lambda will read them.

Validation is `handlers.schema` itself, the module the Lambda runs, so a message `cpb submit`
accepts is one the Lambda accepts and the error a scientist sees here is the line the Lambda
would log. The run fields of docs/CONTRACTS.md (`after`, `client_token`, `resume`) are checked
here with the contract's rules when the schema in this checkout does not know them yet, and are
sent as given.

Each message carries a `client_token` (once the Lambda's schema takes one, as docs/CONTRACTS.md
says it does), generated once per message BEFORE it is sent: botocore
retries a SendMessageBatch that failed with a 5xx, and when the failed call had in fact taken
effect SQS holds the message twice. Both copies then carry the same token, which the Lambda keys
the submission and the output lease by, so the repeat adopts the first submission instead of
starting a second run. Each `cpb submit` job goes out as its own SQS message (so one bad job never
takes others to the dead-letter queue with it), in SendMessageBatch calls of at most 10; `cpb plate`
sends its chain as one list message.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from handlers import schema
from handlers.s3checks import CheckedRequest, check_request
from handlers.schema import JobRequest, Limits, MessageError, parse_body

from cpb import upload as upload_mod
from cpb.lease import entry_identity, read_lease, run_id_for
from cpb.progress import byte_bar, say

SQS_BATCH = 10
EXTENSIONS = ("after", "client_token", "resume")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


class SubmitError(Exception):
    """A submission that must not be sent; the message names what to fix."""


@dataclass
class Outgoing:
    """One validated message entry: the schema's request plus the run fields it does not know (yet)."""

    request: JobRequest
    extras: dict = field(default_factory=dict)

    @property
    def output(self) -> str:
        return self.request.output

    @property
    def after(self) -> list[str]:
        value = self.extras.get("after", getattr(self.request, "after", None))
        if value is None:
            return []
        return [value] if isinstance(value, str) else list(value)

    def to_message(self) -> dict:
        return {**self.request.to_message(), **self.extras}


@dataclass
class Message:
    """One SQS message: a single entry (a JSON object) or a list message (`as_list`)."""

    entries: list[Outgoing]
    as_list: bool = False
    token: Optional[str] = field(default_factory=lambda: new_token())

    def body(self) -> str:
        """The JSON body, fixed once: the token in it is the one every retry of the send carries."""
        items = [entry.to_message() for entry in self.entries]
        given = next((i["client_token"] for i in items if i.get("client_token")), None)
        if given:
            self.token = given  # a token given in the message file wins
        elif not accepts_token():
            self.token = None  # a Lambda whose schema predates client_token would refuse it
        if self.token:
            for item in items:
                item["client_token"] = self.token
        return json.dumps(items if self.as_list else items[0], sort_keys=True)

    def identities(self, message_id: str) -> list[tuple[str, str]]:
        """(output, message identity) of each entry, as the Lambda keys the output's lease: the client
        token, else the SQS message id; `#n` for list entry n."""
        base = self.token or message_id
        return [(e.output, entry_identity(base, i if self.as_list else None)) for i, e in enumerate(self.entries)]


@dataclass
class Sent:
    """One message that SQS accepted."""

    message_id: str
    message: Message

    @property
    def outputs(self) -> list[str]:
        return [e.output for e in self.message.entries]

    def runs(self) -> list[tuple[str, str, str]]:
        """(output, identity, run id) per entry: the run the Lambda will start for it (generation 0)."""
        return [(o, i, run_id_for(i)) for o, i in self.message.identities(self.message_id)]


@dataclass
class SubmitReport:
    """What `send` did: accepted messages and per-message SQS failures."""

    sent: list[Sent] = field(default_factory=list)
    failed: list[tuple[Message, str]] = field(default_factory=list)


def accepts_token() -> bool:
    """Whether the Lambda's schema (the one in this checkout, which the deployed Lambda runs) takes
    `client_token`: an automatic token must never turn a valid message into a refused one."""
    return "client_token" in schema.FIELDS


def new_token() -> str:
    """A fresh client token (32 hex digits, within the contract's `[A-Za-z0-9_-]{8,64}`)."""
    return secrets.token_hex(16)


def limits_for(bucket: str, job_queue: Optional[str], job_definition: Optional[str],
               environ: Mapping[str, str]) -> Limits:
    """The Lambda's Limits as far as the client can know them.

    Ceilings come from the same `CPB_MAX_*` variables the Lambda reads (when the user sets them)
    so local validation matches the deployed stack.
    """
    merged = dict(environ)
    merged["CPB_BUCKET"] = bucket
    if job_queue:
        merged["CPB_JOB_QUEUE"] = job_queue
    if job_definition:
        merged["CPB_JOB_DEFINITION"] = job_definition
    try:
        return Limits.from_env(merged)
    except ValueError as exc:
        raise SubmitError(str(exc)) from None


def message_from_flags(pipeline: str, input_prefix: str, output: str, data_file: Optional[str] = None,
                       image_sets_per_job: Optional[int] = None, memory: Optional[int] = None,
                       vcpus: Optional[int] = None, job_name: Optional[str] = None,
                       unsplittable: bool = False, after: Optional[list[str]] = None,
                       resume: Optional[bool] = None) -> dict[str, Any]:
    """The message object the flags describe (unset options left out)."""
    message: dict[str, Any] = {"pipeline": pipeline, "input": input_prefix, "output": output}
    optional = {"data_file": data_file, "image_sets_per_job": image_sets_per_job, "job_memory": memory,
                "job_vcpu": vcpus, "job_name": job_name, "resume": resume}
    message.update({k: v for k, v in optional.items() if v is not None})
    if after:
        message["after"] = after[0] if len(after) == 1 else list(after)
    if unsplittable:
        message["unsplittable"] = True
    return message


def read_message_file(path: Path) -> str:
    """The raw text of a message file (object or list, the seed's format)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SubmitError(f"{path}: not UTF-8 text; save the message file as UTF-8 JSON") from None
    except OSError as exc:
        raise SubmitError(f"{path}: cannot read it ({exc.strerror})") from None


def _unknown_extensions() -> tuple[str, ...]:
    return tuple(name for name in EXTENSIONS if name not in schema.FIELDS)


def _check_extras(extras: dict, output: str, earlier: list[str], limits: Limits, index: Optional[int]) -> dict:
    """The contract's rules for the run fields the schema does not check (yet); normalised values."""
    where = f"entry {index}: " if index is not None else ""
    out = {}
    if "client_token" in extras and extras["client_token"] is not None:
        token = extras["client_token"]
        if not isinstance(token, str) or not _TOKEN.match(token):
            raise SubmitError(f"message rejected: {where}client_token: must be 8 to 64 letters, digits, '_' or '-'; "
                              "leave it out and cpb sets one")
        out["client_token"] = token
    if "resume" in extras and extras["resume"] is not None:
        if not isinstance(extras["resume"], bool):
            raise SubmitError(f"message rejected: {where}resume: must be true or false")
        out["resume"] = extras["resume"]
    if "after" in extras and extras["after"] is not None:
        value = extras["after"]
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise SubmitError(f"message rejected: {where}after: must be an output prefix or a list of them")
        cleaned = []
        for name in names:
            try:
                key = schema._key(name, "after", limits)  # the schema's own key rules (s3://, '..', '//')
            except MessageError as exc:
                raise SubmitError(f"message rejected: {where}{exc}") from None
            if key == output:
                raise SubmitError(f"message rejected: {where}after: {key} is this entry's own output; an entry "
                                  "cannot wait for itself")
            cleaned.append(key)
        out["after"] = cleaned[0] if isinstance(value, str) else cleaned
    return out


def prepare(body: str, limits: Limits) -> list[Outgoing]:
    """Parse with the Lambda's schema (the error is the Lambda's one line), keeping the run fields."""
    unknown = _unknown_extensions()
    decoded: Any = None
    if unknown:
        try:
            decoded = json.loads(body)
        except (ValueError, RecursionError):
            decoded = None  # the schema says what is wrong with it
    items = decoded if isinstance(decoded, list) else [decoded]
    if not unknown or not any(isinstance(i, dict) and set(i) & set(unknown) for i in items):
        return [Outgoing(r) for r in _parse(body, limits)]
    stripped = [{k: v for k, v in i.items() if k not in unknown} if isinstance(i, dict) else i for i in items]
    requests = _parse(json.dumps(stripped if isinstance(decoded, list) else stripped[0]), limits)
    out: list[Outgoing] = []
    for position, (item, request) in enumerate(zip(items, requests)):
        index = position if isinstance(decoded, list) else None
        extras = {k: v for k, v in item.items() if k in unknown}
        out.append(Outgoing(request, _check_extras(extras, request.output, [o.output for o in out], limits, index)))
    check_after_order(out)
    return out


def check_after_order(entries: list[Outgoing]) -> None:
    """`after` may name an earlier entry of the same list message, never this one or a later one (no cycles)."""
    outputs = [e.output for e in entries]
    for index, entry in enumerate(entries):
        for name in entry.after:
            if name in outputs[index + 1:]:
                where = f"entry {index}: " if len(entries) > 1 else ""
                raise SubmitError(f"message rejected: {where}after: {name} is the output of a later entry "
                                  f"({outputs.index(name)}); list the step it waits for first")


def _parse(body: str, limits: Limits) -> list[JobRequest]:
    try:
        return parse_body(body, limits)
    except MessageError as exc:
        raise SubmitError(f"message rejected: {exc}") from None


def validate(body: str, limits: Limits) -> list[JobRequest]:
    """Parse with the Lambda's schema; the error is the Lambda's one line."""
    return [o.request for o in prepare(body, limits)]


def check_in_bucket(s3, entries: list[Outgoing], limits: Limits) -> list[CheckedRequest]:
    """Refuse to send jobs whose pipeline, data file, input or `after` output is not in the bucket.

    The pipeline and data-file checks are the Lambda's own (`handlers.s3checks`), so the error
    text matches; sending such jobs would only cost a trip through the Lambda to the dead-letter queue.
    """
    checked = []
    outputs = [e.output for e in entries]
    for index, entry in enumerate(entries):
        request = entry.request
        where = f"entry {index}: " if len(entries) > 1 else ""
        try:
            checked.append(check_request(s3, request, limits))
        except MessageError as exc:
            raise SubmitError(f"{where}{exc}") from None
        if request.data_file is None and not has_prefix(s3, limits.bucket, request.input):
            raise SubmitError(f"{where}input: nothing under s3://{limits.bucket}/{request.input}/; "
                              "upload the images (--upload DIR) or fix the prefix")
        for name in entry.after:
            if name in outputs[:index]:
                continue
            problem = after_problem(s3, limits.bucket, name)
            if problem:
                raise SubmitError(f"{where}after: {problem}")
    return checked


def after_problem(s3, bucket: str, output: str) -> Optional[str]:
    """Why an `after` output that is not in this message cannot be waited for (None: it can)."""
    from cpb.runrecords import run_state
    lease, _ = read_lease(s3, bucket, output)
    if lease is None:
        return (f"{output} has no run in s3://{bucket}/ (no lease); send that step first, or in the same "
                "list message before this entry")
    if lease.get("state") == "cancelled":
        return f"{output}'s run was cancelled; send that step again first"
    state = run_state(s3, bucket, output)
    if any(p.status == "failed" for p in state.parts):
        return f"{output}'s current run failed (cpb status {output}); fix and rerun it first"
    return None


def existing_outputs(s3, bucket: str, requests: list[JobRequest]) -> list[str]:
    """Outputs that already hold objects. A job replaces what its output holds (the worker deletes
    the previous run's files once its own are up), so sending plate2 to plate1's output would
    silently destroy plate1's results; the client says so before sending."""
    return sorted({r.output for r in requests if _holds_results(s3, bucket, r.output)})


def _holds_results(s3, bucket: str, output: str) -> bool:
    """True when `output/` holds anything but the Lambda's refusal records (a message refused there ran
    nothing, so correcting and resending it replaces nothing)."""
    base = output.rstrip("/") + "/"
    got = s3.list_objects_v2(Bucket=bucket, Prefix=base, MaxKeys=50)
    keys = [item["Key"][len(base):] for item in got.get("Contents", [])]
    return bool(got.get("IsTruncated")) or any(not key.startswith("_cpb/refusal-") for key in keys)


def busy_outputs(s3, batch, bucket: str, entries: list[Outgoing]) -> list[str]:
    """One line per entry's output whose current run still has jobs in Batch: the Lambda would refuse
    a new message for it (docs/CONTRACTS.md, lease rule 3), and anything uploaded now would change the
    inputs under that run. Checked before uploading, as `cpb plate` does. A message file resent with
    the client_token its run was started by is a repeat the Lambda adopts, not refused here."""
    from cpb.runrecords import short
    from cpb.status import ACTIVE, output_status
    lines = []
    for output, token in {e.output: e.to_message().get("client_token") for e in entries}.items():
        state = output_status(s3, batch, bucket, output, follow_after=False)
        active = [j for j in state.jobs if j.status in ACTIVE]
        if active and not (token and (state.lease or {}).get("client_token") == token):
            message = (state.lease or {}).get("message_id") or ", ".join(state.message_ids) or "?"
            lines.append(f"{output} is in use by run {short(state.run.run_id)} of message {message} (job "
                         f"{active[0].job_id} {active[0].status}); wait for it to finish (cpb status {output}) or "
                         "choose another output")
    return lines


def has_prefix(s3, bucket: str, prefix: str) -> bool:
    """True when at least one object lies under `prefix/`."""
    got = s3.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/", MaxKeys=1)
    return bool(got.get("KeyCount") or got.get("Contents"))


def send(sqs, queue_url: str, messages: list[Message]) -> SubmitReport:
    """Send the messages, at most 10 per SendMessageBatch. Each message's body (and client token) is
    fixed before the call, so a retry by botocore resends the same token."""
    report = SubmitReport()
    for start in range(0, len(messages), SQS_BATCH):
        chunk = messages[start:start + SQS_BATCH]
        entries = [{"Id": str(i), "MessageBody": m.body()} for i, m in enumerate(chunk)]
        answer = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
        for ok in answer.get("Successful", []):
            report.sent.append(Sent(ok["MessageId"], chunk[int(ok["Id"])]))
        for bad in answer.get("Failed", []):
            report.failed.append((chunk[int(bad["Id"])], f"{bad.get('Code')}: {bad.get('Message', '')}"))
    return report


def one_message_each(entries: list[Outgoing]) -> list[Message]:
    """`cpb submit`'s way: every job its own message (one bad job never dead-letters the others).
    Entries that wait for another entry (`after`) go together with it in one list message."""
    if any(e.after and set(e.after) & {o.output for o in entries} for e in entries):
        return [Message(entries, as_list=True)]
    return [Message([e]) for e in entries]


# --------------------------------------------------------------------------- local inputs, --upload

def check_local_inputs(pipeline: str, data_file: Optional[str], upload_dir: Optional[Path]) -> None:
    """Catch a scientist's usual slips before any credentials or upload: a CellProfiler project
    (.cpproj, which the worker cannot run) instead of a pipeline and, with --upload, a local file
    path with a typo (the schema would otherwise call it a bad bucket key with '.' segments) or a
    local pipeline the worker would refuse (checked with the worker's own rules)."""
    if pipeline.lower().endswith(".cpproj"):
        raise SubmitError(f"--pipeline {pipeline} is a CellProfiler project (.cpproj), not a pipeline: in "
                          "CellProfiler use File > Export > Pipeline and pass the .cppipe")
    if upload_dir is None:
        return
    for flag, value in (("--pipeline", pipeline), ("--data-file", data_file)):
        if value and value.startswith(("./", "../", "/", "~")) and not Path(value).expanduser().is_file():
            raise SubmitError(f"{flag} {value}: no such local file (with --upload a local {flag} is uploaded; "
                              "check the path, or give the file's bucket key)")
    if Path(pipeline).is_file():
        check_pipeline_file(Path(pipeline), "--pipeline")


def check_pipeline_file(path: Path, flag: str) -> None:
    """The worker's own checks of a local pipeline, here, instead of after an upload and a Batch start."""
    from cpb_worker.errors import WorkerError
    from cpb_worker.pipeline import check_saved_images, export_module, load_pipeline
    try:
        parsed = load_pipeline(path)
        export_module(parsed)
        check_saved_images(parsed)
    except WorkerError as error:
        raise SubmitError(f"{flag}: {error.reason}") from None


def pipeline_key(path: Path) -> str:
    """Where a local pipeline is uploaded: `pipelines/<sha256[:12]>/<name>`, content-addressed, so
    re-uploading an edited pipeline never changes the one running jobs read."""
    return f"pipelines/{upload_mod.sha256_file(path)[:12]}/{path.name}"


def upload_inputs(s3: Any, bucket: str, folder: Path, input_prefix: str, pipeline: str,
                  data_file: Optional[str]) -> tuple[str, Optional[str]]:
    """Upload the image folder, plus the pipeline/data file when they are local files.

    A local pipeline goes to `pipelines/<sha256[:12]>/<name>`. A data file inside the folder is
    uploaded with it; one outside goes to `<input>/<name>`. Returns the (pipeline, data_file) bucket keys.
    """
    files, hidden = upload_mod.local_files(folder)
    pairs = [(p, upload_mod.join_key(input_prefix, p.relative_to(folder).as_posix())) for p in files]
    pipeline_path = Path(pipeline)
    if pipeline_path.is_file():
        pipeline = pipeline_key(pipeline_path)
        pairs.append((pipeline_path, pipeline))
    if data_file and Path(data_file).is_file():
        local = Path(data_file).resolve()
        try:
            data_file = upload_mod.join_key(input_prefix, local.relative_to(folder.resolve()).as_posix())
        except ValueError:
            data_file = upload_mod.join_key(input_prefix, local.name)
            pairs.append((local, data_file))
    upload_pairs(s3, bucket, pairs)
    if hidden:
        say(f"not uploaded (hidden files): {', '.join(p.relative_to(folder).as_posix() for p in hidden)}")
    return pipeline, data_file


def upload_pairs(s3: Any, bucket: str, pairs: list[tuple[Path, str]]) -> upload_mod.UploadReport:
    """Upload (local file, key) pairs with a progress bar, skipping unchanged files, and say what happened."""
    total = upload_mod.total_bytes(p for p, _ in pairs)
    with byte_bar(total, f"upload {len(pairs)} files") as advance:
        report = upload_mod.upload_files(s3, bucket, pairs, advance)
    say(f"uploaded {len(report.uploaded)} file(s), {report.bytes_sent} bytes; "
        f"{len(report.skipped)} unchanged file(s) skipped")
    return report
