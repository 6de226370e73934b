"""The one job-message schema: parse and validate an SQS body into job requests.

Used by the ingress Lambda (`handlers.ingress`), by the command-line client
(`cpb submit` validates locally before sending, so a scientist sees the same
error text the Lambda would log) and by the tests. Pure Python standard
library: importing it has no boto3/Powertools side effects.

The message contract is in `../shared/DESIGN.md` ("Message"); the Lambda
environment that fills `Limits` is in `docs/CONTRACTS.md`.

API
---
`Limits`            what this stack accepts (bucket, resource ceilings, defaults,
                    own + allowed job queue/definition ARNs, size caps).
                    `Limits.from_env(os.environ)` reads the Lambda environment.
`parse_body(body, limits) -> list[JobRequest]`
                    the whole SQS body: one JSON object or a non-empty JSON list
                    of objects. Raises `MessageError` on the first problem.
`parse_entry(obj, limits, index=None) -> JobRequest`
                    one already-decoded object (the client builds these).
`check_batch(requests)`  cross-entry rules of a list (duplicates, overlapping
                    outputs); `parse_body` calls it.
`JobRequest`        frozen dataclass of the contract fields, normalised (keys
                    without `s3://bucket/` or trailing slashes, memory/vCPU as
                    ints). Unset optional fields are None. `to_message()` gives
                    the JSON-able dict to send; `vcpus(limits)`,
                    `memory_mib(limits)`, `queue(limits)`, `definition(limits)`
                    resolve defaults.
`MessageError`      `.field` names the field (`"job_memory"`, `"body"`, ...),
                    `.index` is the list entry (None for a single object),
                    `.reason` says what is wrong and how to fix it;
                    `str(err)` is the one line shown to users and logged.
`submission_id(message_id)`  the `<id>` of `<output>/_cpb/submission-<id>.json`.
`entry_message_id(message_id, index)`  CPB_MESSAGE_ID of one job: the message
                    identity, plus `#n` (0-based) for entry n of a list.
`message_identity(requests, sqs_message_id, attributes)`  the message identity of
                    docs/CONTRACTS.md: the entries' `client_token`, else the SQS
                    message attribute `cpb-original-message-id` (a DLQ redrive),
                    else the SQS message id.
`run_id_for(message_id, generation)`  CPB_RUN_ID: 20 hex digits of
                    sha256("<CPB_MESSAGE_ID>:<generation>").
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import unicodedata
from typing import Any, Mapping, Optional

__all__ = [
    "FIELDS", "Limits", "JobRequest", "MessageError", "parse_body", "parse_entry", "check_batch",
    "submission_id", "entry_message_id", "message_identity", "run_id_for", "MAX_ARRAY_SIZE", "MAX_CHILDREN_PER_RUN",
    "MAX_AFTER", "ORIGINAL_MESSAGE_ID_ATTRIBUTE", "is_part_folder",
]

#: Batch array jobs have between 2 and 10 000 children.
MAX_ARRAY_SIZE = 10_000
#: A run of more children is several array jobs (CPB_ARRAY_OFFSET); beyond this many children a
#: message is refused (ten array jobs: a screen of 100,000 image sets at one set per child).
MAX_CHILDREN_PER_RUN = 100_000
#: Outputs one entry may wait for (Batch lets a job depend on at most 20 jobs).
MAX_AFTER = 10
#: SQS message attribute `cpb requeue --dlq` sets to the redriven message's identity.
ORIGINAL_MESSAGE_ID_ATTRIBUTE = "cpb-original-message-id"
#: S3 keys are at most 1024 bytes; leave room for `<output>/part-00000/_cpb/...`.
MAX_KEY_BYTES = 900
REQUIRED_FIELDS = ("pipeline", "input", "output")
OPTIONAL_FIELDS = ("data_file", "image_sets_per_job", "job_name", "job_memory", "job_vcpu",
                   "job_definition", "job_queue", "unsplittable", "after", "client_token", "resume")
FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
PIPELINE_SUFFIXES = (".cppipe",)  # a .cpproj (CellProfiler project, HDF5) is refused by the worker and cpb submit too
_ARN = re.compile(r"^arn:aws[a-z-]*:batch:[a-z0-9-]+:\d{12}:(job-queue|job-definition)/[A-Za-z0-9_-]{1,128}(:\d+)?$")
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
_CLIENT_TOKEN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_PART_FOLDER = re.compile(r"^part-[0-9]{5}$")


class MessageError(ValueError):
    """A message the system will not run, with the field at fault and the fix.

    `str()` is the single line users see (from `cpb submit`) and the Lambda
    logs, e.g. ``entry 2: job_memory: 999999 MiB is more than ...``.
    """

    def __init__(self, field: str, reason: str, index: Optional[int] = None) -> None:
        self.field = field
        self.reason = reason
        self.index = index
        super().__init__(self._text())

    def _text(self) -> str:
        where = f"entry {self.index}: " if self.index is not None else ""
        return f"{where}{self.field}: {self.reason}"

    def at(self, index: Optional[int]) -> "MessageError":
        """The same error located at list entry `index` (for list messages)."""
        return MessageError(self.field, self.reason, index)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What this stack accepts; filled from the Lambda environment or stack outputs.

    `job_queue_arn`/`job_definition_arn` are the stack's own; `allowed_arns`
    are extra ones messages may name (an unversioned job definition ARN in
    the allow-list admits every revision).
    """

    bucket: str
    max_vcpu: int = 16
    max_memory_mib: int = 65536
    default_vcpu: int = 1
    default_memory_mib: int = 4096
    job_queue_arn: str = ""
    job_definition_arn: str = ""
    allowed_arns: tuple = ()
    min_memory_mib: int = 256
    max_body_bytes: int = 256 * 1024
    max_jobs_per_message: int = 100
    max_image_sets_per_job: int = 100_000
    stack: str = ""  # CPB_STACK: the Pulumi stack, tagged on every job as `cpb:stack` (TerminateJob needs it)

    def __post_init__(self) -> None:
        if not self.bucket:
            raise ValueError("Limits.bucket is empty: set CPB_BUCKET (the stack's bucketName output)")
        if not (1 <= self.default_vcpu <= self.max_vcpu):
            raise ValueError(f"default vCPU {self.default_vcpu} is outside 1..{self.max_vcpu}")
        if not (self.min_memory_mib <= self.default_memory_mib <= self.max_memory_mib):
            raise ValueError(f"default memory {self.default_memory_mib} MiB is outside "
                             f"{self.min_memory_mib}..{self.max_memory_mib}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Limits":
        """Read the "Lambda environment" of docs/CONTRACTS.md (missing numbers take defaults)."""
        def number(name: str, default: int) -> int:
            raw = (environ.get(name) or "").strip()
            if not raw:
                return default
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a whole number") from None

        allowed = tuple(a.strip() for a in (environ.get("CPB_ALLOWED_ARNS") or "").split(",") if a.strip())
        return cls(
            bucket=(environ.get("CPB_BUCKET") or "").strip(),
            max_vcpu=number("CPB_MAX_VCPU", cls.max_vcpu),
            max_memory_mib=number("CPB_MAX_MEMORY_MIB", cls.max_memory_mib),
            default_vcpu=number("CPB_DEFAULT_VCPU", cls.default_vcpu),
            default_memory_mib=number("CPB_DEFAULT_MEMORY_MIB", cls.default_memory_mib),
            job_queue_arn=(environ.get("CPB_JOB_QUEUE") or "").strip(),
            job_definition_arn=(environ.get("CPB_JOB_DEFINITION") or "").strip(),
            allowed_arns=allowed,
            stack=(environ.get("CPB_STACK") or "").strip(),
        )

    def arn_allowed(self, arn: str, kind: str) -> bool:
        """True when `arn` (a `job-queue` or `job-definition` ARN) is the stack's own or allow-listed."""
        own = self.job_queue_arn if kind == "job-queue" else self.job_definition_arn
        candidates = {a for a in (own, *self.allowed_arns) if a}
        if arn in candidates:
            return True
        if kind == "job-definition":
            unversioned = re.sub(r":\d+$", "", arn)
            return unversioned in candidates
        return False


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """One validated job of a message. Optional fields left unset are None."""

    pipeline: str
    input: str
    output: str
    data_file: Optional[str] = None
    image_sets_per_job: Optional[int] = None
    job_name: Optional[str] = None
    job_memory: Optional[int] = None
    job_vcpu: Optional[int] = None
    job_definition: Optional[str] = None
    job_queue: Optional[str] = None
    unsplittable: bool = False
    after: tuple = ()  # outputs this entry waits for (normalised keys, in the order given)
    client_token: Optional[str] = None
    resume: bool = True

    def to_message(self) -> dict:
        """The JSON-able message dict (unset fields omitted) that parses back to this request."""
        out: dict = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "unsplittable" and not value) or (f.name == "resume" and value):
                continue
            if f.name == "after":
                if not value:
                    continue
                value = value[0] if len(value) == 1 else list(value)
            out[f.name] = value
        return out

    def vcpus(self, limits: Limits) -> int:
        return self.job_vcpu if self.job_vcpu is not None else limits.default_vcpu

    def memory_mib(self, limits: Limits) -> int:
        """The message's memory, else the stack's default per vCPU times this job's vCPUs (the worker
        runs one CellProfiler process per vCPU, each needing its own memory), within the stack's limit."""
        if self.job_memory is not None:
            return self.job_memory
        if self.job_vcpu is None:
            return limits.default_memory_mib
        per_vcpu = limits.default_memory_mib / max(limits.default_vcpu, 1)
        return min(limits.max_memory_mib, max(1024, math.ceil(per_vcpu * self.job_vcpu)))

    def queue(self, limits: Limits) -> str:
        return self.job_queue or limits.job_queue_arn

    def definition(self, limits: Limits) -> str:
        return self.job_definition or limits.job_definition_arn


def submission_id(message_id: str) -> str:
    """`<id>` of the submission record: anything outside `[A-Za-z0-9_.-]` becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", message_id)


def entry_message_id(message_id: str, index: Optional[int]) -> str:
    """CPB_MESSAGE_ID of one job: `<message id>` or `<message id>#<n>` for list entry n (0-based)."""
    return message_id if index is None else f"{message_id}#{index}"


def message_identity(requests: list, sqs_message_id: str, attributes: Optional[Mapping[str, str]] = None) -> str:
    """The message identity (docs/CONTRACTS.md): the entries' `client_token` when given (every entry
    that carries one carries the same, `check_batch` makes sure), else the message attribute
    `cpb-original-message-id` (`cpb requeue --dlq` keeps the identity of the message it redrives),
    else the SQS message id."""
    tokens = [r.client_token for r in requests if r.client_token]
    if tokens:
        return tokens[0]
    original = ((attributes or {}).get(ORIGINAL_MESSAGE_ID_ATTRIBUTE) or "").strip()
    if original and len(original) <= 128 and all(unicodedata.category(c) not in _UNSAFE_CATEGORIES for c in original):
        return original
    return sqs_message_id


def run_id_for(message_id: str, generation: int) -> str:
    """CPB_RUN_ID of a job's run: the first 20 hex digits of sha256("<CPB_MESSAGE_ID>:<generation>")."""
    return hashlib.sha256(f"{message_id}:{int(generation)}".encode("utf-8")).hexdigest()[:20]


def is_part_folder(segment: str) -> bool:
    """True for an array child's results folder name (`part-00003`)."""
    return bool(_PART_FOLDER.match(segment))


# --------------------------------------------------------------------------- parsing

def parse_body(body: Any, limits: Limits) -> list:
    """Parse a whole SQS body into job requests, or raise the first `MessageError`.

    A list is all-or-nothing: one bad entry rejects the message.
    """
    if not isinstance(body, str):
        raise MessageError("body", f"expected the message body as text, got {type(body).__name__}")
    size = len(body.encode("utf-8", "surrogatepass"))
    if size > limits.max_body_bytes:
        raise MessageError("body", f"is {size} bytes, more than the {limits.max_body_bytes} allowed; "
                                   "split the work into several messages")
    if not body.strip():
        raise MessageError("body", 'is empty; send a JSON object like {"pipeline": ..., "input": ..., "output": ...}')
    decoded = _decode_json(body)
    if isinstance(decoded, dict):
        return [parse_entry(decoded, limits)]
    if isinstance(decoded, list):
        if not decoded:
            raise MessageError("body", "is an empty JSON list; send at least one job object")
        if len(decoded) > limits.max_jobs_per_message:
            raise MessageError("body", f"lists {len(decoded)} jobs, more than the {limits.max_jobs_per_message} "
                                       "one message may carry; split it into several messages, or use "
                                       "data_file + image_sets_per_job for one array job")
        requests = [parse_entry(item, limits, index) for index, item in enumerate(decoded)]
        check_batch(requests)
        return requests
    raise MessageError("body", f"must be a JSON object or a list of objects, not a JSON {_json_type(decoded)}")


def _decode_json(body: str) -> Any:
    """json.loads that refuses NaN/Infinity and repeated keys (ambiguous in other parsers)."""
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    def unique_keys(pairs: list) -> dict:
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                raise MessageError(key if key in FIELDS else "body",
                                   f"appears twice in one object; keep one {key!r}")
            seen[key] = value
        return seen

    try:
        return json.loads(body, parse_constant=no_constants, object_pairs_hook=unique_keys)
    except MessageError:
        raise
    except RecursionError:
        raise MessageError("body", "is nested too deeply to be a job message") from None
    except ValueError as exc:  # JSONDecodeError, huge ints, NaN
        raise MessageError("body", f"is not valid JSON ({_short(str(exc))}); send a JSON object like "
                                   '{"pipeline": "...", "input": "...", "output": "..."}') from None


def parse_entry(obj: Any, limits: Limits, index: Optional[int] = None) -> JobRequest:
    """Validate one decoded job object; errors carry `index` for list entries."""
    try:
        return _parse_entry(obj, limits)
    except MessageError as exc:
        raise exc.at(index) from None


def _parse_entry(obj: Any, limits: Limits) -> JobRequest:
    if not isinstance(obj, dict):
        raise MessageError("body", f"each job must be a JSON object, not a JSON {_json_type(obj)}")
    for key in obj:
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(FIELDS)}"
            raise MessageError(_short(str(key), 40), f"is not a message field{hint}")
    for name in REQUIRED_FIELDS:
        if name not in obj or obj[name] is None:
            raise MessageError(name, f"is missing; give the {_FIELD_HELP[name]}")

    pipeline = _key(obj["pipeline"], "pipeline", limits)
    if pipeline.lower().endswith(".cpproj"):
        raise MessageError("pipeline", f"{pipeline!r} is a CellProfiler project (.cpproj), not a pipeline; in "
                                       "CellProfiler use File > Export > Pipeline and give the key of the .cppipe")
    if not pipeline.lower().endswith(PIPELINE_SUFFIXES):
        raise MessageError("pipeline", f"{pipeline!r} is not a CellProfiler pipeline; give the key of a .cppipe file")
    input_prefix = _key(obj["input"], "input", limits)
    output = _key(obj["output"], "output", limits)
    if _under(output, input_prefix):
        raise MessageError("output", f"{output!r} is inside the input prefix {input_prefix!r}; results would "
                                     "mix with the images; choose an output prefix outside the input")
    if output.split("/")[-1] == "_cpb" or "/_cpb/" in f"/{output}/":
        raise MessageError("output", "must not contain a '_cpb' folder (reserved for run and submission records)")
    part = next((segment for segment in output.split("/") if is_part_folder(segment)), None)
    if part is not None:
        parent = output[: output.index(part)].rstrip("/") or "(the bucket root)"
        raise MessageError("output", f"{output!r} is or lies inside an array child's results folder {part!r} of "
                                     f"{parent!r}; its results would be merged into that run's; choose an output "
                                     "without a 'part-NNNNN' folder")
    if _under(input_prefix, output):
        raise MessageError("input", f"{input_prefix!r} is inside the output {output!r}; a run replaces what its "
                                    "output holds, so the images could be deleted or read back as results; keep "
                                    "the images outside the output")

    data_file = None
    if obj.get("data_file") is not None:
        data_file = _key(obj["data_file"], "data_file", limits)
        if not data_file.lower().endswith(".csv"):
            raise MessageError("data_file", f"{data_file!r} is not a .csv; give the key of a LoadData CSV")

    unsplittable = obj.get("unsplittable", False)
    if unsplittable is None:
        unsplittable = False
    if not isinstance(unsplittable, bool):
        raise MessageError("unsplittable", f"must be true or false, not {_show(unsplittable)}")

    per_job = None
    if obj.get("image_sets_per_job") is not None:
        per_job = _whole_number(obj["image_sets_per_job"], "image_sets_per_job")
        if not 1 <= per_job <= limits.max_image_sets_per_job:
            raise MessageError("image_sets_per_job", f"{per_job} is outside 1..{limits.max_image_sets_per_job}; "
                                                     "give how many image sets each array child runs")
        # Without a data file the Lambda counts the image sets from the pipeline's file rules over
        # the input listing, where that count is exact (handlers.s3checks), else it refuses then.
        if unsplittable:
            raise MessageError("image_sets_per_job", "cannot split an unsplittable pipeline across array jobs; "
                                                     "drop image_sets_per_job or unsplittable")

    job_name = None
    if obj.get("job_name") is not None:
        job_name = _text(obj["job_name"], "job_name", max_chars=128)

    memory = None
    if obj.get("job_memory") is not None:
        memory = _whole_number(obj["job_memory"], "job_memory")
        if not limits.min_memory_mib <= memory <= limits.max_memory_mib:
            raise MessageError("job_memory", f"{memory} MiB is outside what this stack can place "
                                             f"({limits.min_memory_mib}..{limits.max_memory_mib} MiB); ask for "
                                             f"at most {limits.max_memory_mib}, or raise the stack's max memory")
    vcpu = None
    if obj.get("job_vcpu") is not None:
        vcpu = _whole_number(obj["job_vcpu"], "job_vcpu")
        if not 1 <= vcpu <= limits.max_vcpu:
            raise MessageError("job_vcpu", f"{vcpu} vCPUs is outside what this stack can place (1..{limits.max_vcpu}); "
                                           f"ask for at most {limits.max_vcpu}, or raise the stack's max vCPU")

    job_definition = _arn(obj.get("job_definition"), "job_definition", "job-definition", limits)
    job_queue = _arn(obj.get("job_queue"), "job_queue", "job-queue", limits)
    after = _after(obj.get("after"), output, limits)

    client_token = None
    if obj.get("client_token") is not None:
        client_token = obj["client_token"]
        if not isinstance(client_token, str) or not _CLIENT_TOKEN.match(client_token):
            raise MessageError("client_token", f"{_show(client_token)} is not 8 to 64 letters, digits, '_' or '-'; "
                                               "leave it out, or send one token generated once per message")

    resume = obj.get("resume", True)
    if resume is None:
        resume = True
    if not isinstance(resume, bool):
        raise MessageError("resume", f"must be true or false, not {_show(resume)}")

    return JobRequest(pipeline=pipeline, input=input_prefix, output=output, data_file=data_file,
                      image_sets_per_job=per_job, job_name=job_name, job_memory=memory, job_vcpu=vcpu,
                      job_definition=job_definition, job_queue=job_queue, unsplittable=unsplittable,
                      after=after, client_token=client_token, resume=resume)


def _after(value: Any, output: str, limits: Limits) -> tuple:
    """`after`: one output prefix or a list of them, normalised like `output`; never the entry's own output."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise MessageError("after", "is an empty list; name the output(s) this job waits for, or leave it out")
    if len(items) > MAX_AFTER:
        raise MessageError("after", f"names {len(items)} outputs, more than the {MAX_AFTER} one job may wait for; "
                                    "chain the steps instead")
    outputs: list = []
    for item in items:
        if isinstance(item, list):
            raise MessageError("after", f"must be an output prefix or a list of them, not {_show(value)}")
        key = _key(item, "after", limits)
        if _under(output, key) or _under(key, output):
            raise MessageError("after", f"{key!r} is this job's own output {output!r} (or overlaps it); a job "
                                        "cannot wait for itself: name the output of an earlier step")
        if key not in outputs:
            outputs.append(key)
    return tuple(outputs)


def check_batch(requests: list) -> None:
    """Cross-entry rules: no repeated entries, no two jobs writing into the same (or a nested) output,
    `after` only on EARLIER entries (so no cycle can be written), one `client_token` per message.
    (An entry may read its input from an earlier entry's output: that is what `after` is for.)"""
    tokens = {}
    for j, later in enumerate(requests):
        if later.client_token:
            tokens.setdefault(later.client_token, j)
            if len(tokens) > 1:
                first_token, first_entry = next(iter(tokens.items()))
                raise MessageError("client_token", f"differs from entry {first_entry}'s {first_token!r}; a list "
                                                   "message carries one token (give every entry the same one)", j)
        for i in range(j):
            earlier = requests[i]
            if earlier == later:
                raise MessageError("body", f"entry {j} repeats entry {i}; remove the duplicate", j)
            if _under(later.output, earlier.output) or _under(earlier.output, later.output):
                raise MessageError("output", f"{later.output!r} overlaps the output {earlier.output!r} of entry {i}; "
                                             "give each job its own output prefix", j)
        for key in later.after:
            for i in range(j + 1, len(requests)):
                if _under(key, requests[i].output):
                    raise MessageError("after", f"{key!r} is the output of entry {i}, which comes later; list the "
                                                "step it waits for before it (no job can wait for a later one)", j)
        for i, other in enumerate(requests):
            if i == j:
                continue
            for what, key in _reads(later):
                if not (_under(key, other.output) or (what == "input" and _under(other.output, key))):
                    continue
                if i > j:
                    raise MessageError("after", f"its {what} {key!r} is written by entry {i}, which comes later; "
                                                "list the step that writes it first, and wait for it with after", j)
                if other.output not in later.after:
                    raise MessageError("after", f"its {what} {key!r} is written by entry {i} (output "
                                                f"{other.output!r}), which runs at the same time; add \"after\": "
                                                f"\"{other.output}\" so it waits for it", j)


def _reads(request: "JobRequest") -> list:
    """(field, key) of what a job reads from the bucket besides its pipeline."""
    return [("input", request.input)] + ([("data_file", request.data_file)] if request.data_file else [])


_FIELD_HELP = {
    "pipeline": "key of the .cppipe in the bucket, e.g. \"examples/ExampleHuman/ExampleHuman.cppipe\"",
    "input": "key prefix of the input images, e.g. \"examples/ExampleHuman/images\"",
    "output": "key prefix for the results, e.g. \"results/ExampleHuman\"",
}


def _key(value: Any, field: str, limits: Limits) -> str:
    """A key or prefix inside the stack's bucket, normalised (no s3://bucket/, no leading/trailing '/')."""
    text = _text(value, field, max_chars=MAX_KEY_BYTES)
    if text.startswith(("s3://", "S3://", "s3a://", "https://", "http://")):
        match = re.match(r"^[A-Za-z0-9]+://([^/]*)/?(.*)$", text)
        bucket, rest = (match.group(1), match.group(2)) if match else ("", "")
        if not text.lower().startswith("s3://") or bucket != limits.bucket:
            raise MessageError(field, f"points at {text.split('/')[2] or 'no bucket'!r}, not this stack's bucket "
                                      f"{limits.bucket!r}; copy the data into s3://{limits.bucket}/ and give the key")
        text = rest
    if text.startswith("/"):
        raise MessageError(field, f"{text!r} is an absolute path; give a key relative to the bucket "
                                  f"(no leading '/')")
    if "\\" in text:
        raise MessageError(field, "contains a backslash; S3 keys use '/' between folders")
    text = text.rstrip("/")
    parts = text.split("/")
    if any(part in ("..", ".") for part in parts):
        raise MessageError(field, f"{text!r} contains '.' or '..' path segments; give the plain key")
    if any(part == "" for part in parts):
        raise MessageError(field, f"{text!r} is empty or has an empty folder ('//'); give the plain key")
    if len(text.encode("utf-8")) > MAX_KEY_BYTES:
        raise MessageError(field, f"is longer than {MAX_KEY_BYTES} bytes; use a shorter key")
    return text


def _text(value: Any, field: str, max_chars: int) -> str:
    """A non-empty string without control/format/unassigned characters."""
    if not isinstance(value, str):
        raise MessageError(field, f"must be a string, not {_show(value)}")
    if not value.strip():
        raise MessageError(field, "is empty; give a value")
    if value != value.strip():
        raise MessageError(field, "starts or ends with spaces; remove them")
    if len(value) > max_chars:
        raise MessageError(field, f"is {len(value)} characters long, more than {max_chars}; shorten it")
    for position, char in enumerate(value):
        if unicodedata.category(char) in _UNSAFE_CATEGORIES:
            raise MessageError(field, f"contains the invisible or control character U+{ord(char):04X} at "
                                      f"position {position}; remove it")
    return value


def _whole_number(value: Any, field: str) -> int:
    """An integer, an integral float, or a numeric string ("8192") as the seed sends."""
    if isinstance(value, bool):
        raise MessageError(field, f"must be a whole number, not {_show(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return int(value)
        raise MessageError(field, f"must be a whole number, not {_show(value)}")
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[0-9]{1,18}", text):
            return int(text)
        if re.fullmatch(r"[0-9]+", text):
            raise MessageError(field, f"{_short(text, 24)} is far too large; give a realistic whole number")
        raise MessageError(field, f"must be a whole number like \"8192\" or 8192, not {_show(value)}")
    raise MessageError(field, f"must be a whole number, not {_show(value)}")


def _arn(value: Any, field: str, kind: str, limits: Limits) -> Optional[str]:
    if value is None:
        return None
    text = _text(value, field, max_chars=512)
    if not _ARN.match(text) or f":{kind}/" not in text:
        raise MessageError(field, f"{_short(text)!r} is not a Batch {kind} ARN "
                                  f"(arn:aws:batch:<region>:<account>:{kind}/<name>); leave it out to use the "
                                  "stack's own")
    if not limits.arn_allowed(text, kind):
        raise MessageError(field, f"{text} is not this stack's {kind} nor in its allow-list; leave it out to use "
                                  "the stack's own, or add it to the stack's allowed ARNs")
    return text


def _under(path: str, prefix: str) -> bool:
    """True when key prefix `path` equals `prefix` or lies inside it (folder-wise)."""
    return path == prefix or path.startswith(prefix + "/")


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    """A short, printable description of a bad value for an error message."""
    return f"the {_json_type(value)} {_short(json.dumps(value, ensure_ascii=True, default=str))}"


def _short(text: str, limit: int = 80) -> str:
    text = _printable(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _printable(text: str) -> str:
    return "".join(c if unicodedata.category(c) not in _UNSAFE_CATEGORIES else f"\\u{ord(c):04x}" for c in text)
