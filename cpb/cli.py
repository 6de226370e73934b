"""`cpb`: submit CellProfiler work to the stack, watch it, collect results.

Every command finds the stack the same way (cpb.stack), prints one clear line
on failure (a traceback only with `cpb --debug`), and uses the same modules
the demo and the tests use, so what is tested is what scientists run.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click

from cpb import receipts
from cpb import results as results_mod
from cpb import status as status_mod
from cpb import submit as submit_mod
from cpb import upload as upload_mod
from cpb.aws import Clients, make_clients
from cpb.progress import byte_bar, say
from cpb.stack import StackConfig, StackError, discover

# Exit codes of `cpb status` (documented in docs/CLI.md).
EXIT_OK, EXIT_FAILED, EXIT_RUNNING = 0, 1, 3
# A 5,000-child array can fail 5,000 ways; the screen shows this many and counts the rest.
MAX_PROBLEM_LINES = 20


class UserError(click.ClickException):
    """An error meant for a person: printed as one line, exit code 1."""

    def show(self, file: Any = None) -> None:  # noqa: D102 - one line, no "Error:" noise
        click.echo(f"cpb: {self.format_message()}", err=True)


def _expected_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError
    from cpb.requeue import RequeueError
    return (StackError, submit_mod.SubmitError, results_mod.IncompleteRun, results_mod.ResultsError,
            RequeueError, ClientError, BotoCoreError, FileNotFoundError, PermissionError, ValueError)


class CpbGroup(click.Group):
    """Turns expected failures into one line; `--debug` shows the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _expected_errors() as exc:
            if ctx.meta.get("cpb.debug") or os.environ.get("CPB_DEBUG"):
                raise
            raise UserError(_one_line(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug or an unforeseen failure: still one line, with the way to see more
            if ctx.meta.get("cpb.debug") or os.environ.get("CPB_DEBUG"):
                raise
            raise UserError(f"unexpected error: {type(exc).__name__}: {_one_line(exc)} "
                            "(run `cpb --debug ...` for the traceback, and please report it)") from None


def _one_line(exc: BaseException) -> str:
    """The exception as one readable line (botocore errors are long), with the fix when we know it."""
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, NoRegionError
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, NoCredentialsError):
        return f"{text}: sign in to AWS first (`aws sso login` or `aws configure`), or set AWS_PROFILE"
    if isinstance(exc, NoRegionError):
        return f"{text}: pass --region, or set CPB_REGION / AWS_REGION (the stack's region)"
    if isinstance(exc, EndpointConnectionError):
        return f"{text}: check the network, the region, and AWS_ENDPOINT_URL if you set it"
    return text


def stack_options(command: Callable) -> Callable:
    """Options every AWS-facing command takes to find the stack."""
    options = [
        click.option("--stack", "stack_name", help="Pulumi stack to read outputs from (e.g. dev)."),
        click.option("--bucket", help="Data bucket (else stack output bucketName / $CPB_BUCKET)."),
        click.option("--queue-url", help="Job queue URL (else stack output queueUrl / $CPB_QUEUE_URL)."),
        click.option("--dlq-url", help="Dead-letter queue URL (else deadLetterQueueUrl / $CPB_DLQ_URL)."),
        click.option("--job-queue", help="Batch job queue ARN (else jobQueueArn / $CPB_JOB_QUEUE)."),
        click.option("--region", help="AWS region (else stack output region / $CPB_REGION / AWS_REGION)."),
    ]
    for option in reversed(options):
        command = option(command)

    @functools.wraps(command)
    def wrapper(*args: Any, stack_name: Optional[str], bucket: Optional[str], queue_url: Optional[str],
                dlq_url: Optional[str], job_queue: Optional[str], region: Optional[str], **kwargs: Any) -> Any:
        stack = discover(stack_name, {"bucket": bucket, "queue_url": queue_url, "dlq_url": dlq_url,
                                      "job_queue": job_queue, "region": region})
        if stack.sources:
            say(stack.describe_sources())
        return command(*args, stack=stack, **kwargs)

    return wrapper  # functools.wraps carries click's __click_params__ over


def limits_of(stack: StackConfig) -> Any:
    """The Lambda's Limits as this stack sets them: stack output `jobLimits`,
    overridden by the same CPB_* variables the Lambda reads."""
    environ = {**stack.limits_env, **{k: v for k, v in os.environ.items() if k.startswith("CPB_")}}
    return submit_mod.limits_for(stack.bucket, stack.job_queue, stack.job_definition, environ)


def _clients(stack: StackConfig) -> Clients:
    return make_clients(stack.region)


@click.group(cls=CpbGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Run CellProfiler pipelines on the stack's AWS Batch, or locally."""
    ctx.meta["cpb.debug"] = debug


# --------------------------------------------------------------------------- submit

@cli.command()
@click.option("--pipeline", help="Bucket key of the .cppipe (or a local file with --upload).")
@click.option("--input", "input_prefix", help="Bucket key prefix of the input images.")
@click.option("--output", help="Bucket key prefix for the results.")
@click.option("--data-file", help="Bucket key of a LoadData CSV (or a local file with --upload).")
@click.option("--image-sets-per-job", type=int, help="Split into an array job, this many image sets per child.")
@click.option("--memory", type=int, help="MiB of memory per job (job_memory).")
@click.option("--vcpus", type=int, help="vCPUs per job (job_vcpu).")
@click.option("--job-name", help="Readable name for the Batch job(s).")
@click.option("--unsplittable", is_flag=True, help="Run as one CellProfiler process (stateful pipelines).")
@click.option("--message-file", "message_file", type=click.Path(path_type=Path, dir_okay=False),
              help="JSON message file (one object or a list) instead of the flags above.")
@click.option("--upload", "upload_dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Upload this local folder of images to --input first (skips unchanged files).")
@click.option("--dry-run", is_flag=True, help="Validate and print the messages without sending.")
@click.option("--no-check", is_flag=True, help="Skip checking that pipeline and inputs exist in the bucket.")
@stack_options
def submit(stack: StackConfig, pipeline: Optional[str], input_prefix: Optional[str], output: Optional[str],
           data_file: Optional[str], image_sets_per_job: Optional[int], memory: Optional[int],
           vcpus: Optional[int], job_name: Optional[str], unsplittable: bool, message_file: Optional[Path],
           upload_dir: Optional[Path], dry_run: bool, no_check: bool) -> None:
    """Validate job messages like the Lambda does, then send them to the queue."""
    stack.require("bucket", *(() if dry_run else ("queue_url",)))
    limits = limits_of(stack)
    if message_file is not None:
        if any(v is not None for v in (pipeline, input_prefix, output, data_file, image_sets_per_job)):
            raise UserError("give either --message-file or --pipeline/--input/--output, not both")
        body = submit_mod.read_message_file(message_file)
        submit_mod.validate(body, limits)
        clients = _clients(stack)
    else:
        missing = [f"--{n}" for n, v in (("pipeline", pipeline), ("input", input_prefix), ("output", output)) if not v]
        if missing:
            raise UserError(f"missing {', '.join(missing)} (or pass --message-file FILE)")
        check_local_inputs(pipeline, data_file, upload_dir)
        # A bad message costs no upload and needs no credentials: validate the flags first, with the
        # local files --upload will turn into keys standing in for those keys.
        def as_key(value: Optional[str]) -> Optional[str]:
            return f"uploads/{Path(value).name}" if upload_dir and value and Path(value).is_file() else value
        submit_mod.validate(json.dumps(submit_mod.message_from_flags(
            as_key(pipeline), input_prefix, output, as_key(data_file), image_sets_per_job, memory, vcpus, job_name,
            unsplittable)), limits)
        clients = _clients(stack)
        if upload_dir is not None:
            pipeline, data_file = upload_inputs(clients.s3, stack.bucket, upload_dir, input_prefix,
                                                pipeline, data_file)
        body = json.dumps(submit_mod.message_from_flags(
            pipeline, input_prefix, output, data_file, image_sets_per_job, memory, vcpus, job_name, unsplittable))
    requests = submit_mod.validate(body, limits)
    if not no_check:
        checked = submit_mod.check_in_bucket(clients.s3, requests, limits)
        for item in checked:
            if item.image_set_count is not None:
                say(f"{item.request.output}: {item.image_set_count} image sets in {item.request.data_file}")
        for output in submit_mod.existing_outputs(clients.s3, stack.bucket, requests):
            say(f"warning: s3://{stack.bucket}/{output}/ already holds results; this job replaces them "
                "(its run deletes the earlier files): to keep them, use a new --output")
    if dry_run:
        for request in requests:
            click.echo(json.dumps(request.to_message(), sort_keys=True))
        say(f"dry run: {len(requests)} message(s) valid, nothing sent")
        return
    report = submit_mod.send(clients.sqs, stack.queue_url, requests)
    for sent in report.sent:
        click.echo(f"sent {sent.message_id}  results: s3://{stack.bucket}/{sent.request.output}/")
    for request, reason in report.failed:
        click.echo(f"NOT sent ({request.output}): {reason}", err=True)
    if report.sent:
        receipts.record(stack.bucket, [(s.message_id, s.request.output) for s in report.sent])
        say(f"follow with: cpb status   (or: cpb status {' '.join(sorted({s.request.output for s in report.sent}))})")
    if report.failed:
        raise UserError(f"{len(report.failed)} of {len(requests)} message(s) were not accepted by SQS")


def check_local_inputs(pipeline: str, data_file: Optional[str], upload_dir: Optional[Path]) -> None:
    """Catch a scientist's usual slips before any credentials or upload: a CellProfiler project
    (.cpproj, which the worker cannot run) instead of a pipeline and, with --upload, a local file
    path with a typo (the schema would otherwise call it a bad bucket key with '.' segments) or a
    local pipeline the worker would refuse (checked with the worker's own rules)."""
    if pipeline.lower().endswith(".cpproj"):
        raise UserError(f"--pipeline {pipeline} is a CellProfiler project (.cpproj), not a pipeline: in "
                        "CellProfiler use File > Export > Pipeline and pass the .cppipe")
    if upload_dir is None:
        return
    for flag, value in (("--pipeline", pipeline), ("--data-file", data_file)):
        if value and value.startswith(("./", "../", "/", "~")) and not Path(value).expanduser().is_file():
            raise UserError(f"{flag} {value}: no such local file (with --upload a local {flag} is uploaded; "
                            "check the path, or give the file's bucket key)")
    if Path(pipeline).is_file():  # the worker's own checks, here, instead of after an upload and a Batch start
        from cpb_worker.errors import WorkerError
        from cpb_worker.pipeline import check_saved_images, export_module, load_pipeline
        try:
            parsed = load_pipeline(Path(pipeline))
            export_module(parsed)
            check_saved_images(parsed)
        except WorkerError as error:
            raise UserError(f"--pipeline: {error.reason}") from None


def upload_inputs(s3: Any, bucket: str, folder: Path, input_prefix: str, pipeline: str,
                  data_file: Optional[str]) -> tuple[str, Optional[str]]:
    """Upload the image folder, plus the pipeline/data file when they are local files.

    A local pipeline goes to `pipelines/<sha256[:12]>/<name>`: content-addressed,
    so re-uploading an edited pipeline never changes the one running jobs read.
    A data file inside the folder is uploaded with it; one outside goes to
    `<input>/<name>`. Returns the (pipeline, data_file) bucket keys.
    """
    files, hidden = upload_mod.local_files(folder)
    pairs = [(p, upload_mod.join_key(input_prefix, p.relative_to(folder).as_posix())) for p in files]
    pipeline_path = Path(pipeline)
    if pipeline_path.is_file():
        digest = upload_mod.sha256_file(pipeline_path)
        pipeline = f"pipelines/{digest[:12]}/{pipeline_path.name}"
        pairs.append((pipeline_path, pipeline))
    if data_file and Path(data_file).is_file():
        local = Path(data_file).resolve()
        try:
            data_file = upload_mod.join_key(input_prefix, local.relative_to(folder.resolve()).as_posix())
        except ValueError:
            data_file = upload_mod.join_key(input_prefix, local.name)
            pairs.append((local, data_file))
    total = upload_mod.total_bytes(p for p, _ in pairs)
    with byte_bar(total, f"upload {len(pairs)} files") as advance:
        report = upload_mod.upload_files(s3, bucket, pairs, advance)
    say(f"uploaded {len(report.uploaded)} file(s), {report.bytes_sent} bytes; "
        f"{len(report.skipped)} unchanged file(s) skipped")
    if hidden:
        say(f"not uploaded (hidden files): {', '.join(p.relative_to(folder).as_posix() for p in hidden)}")
    return pipeline, data_file


# --------------------------------------------------------------------------- status

@cli.command()
@click.argument("outputs", nargs=-1)
@click.option("--watch", is_flag=True, help="Refresh until every job has finished.")
@click.option("--interval", type=float, default=15.0, show_default=True, help="Seconds between refreshes.")
@click.option("--timeout", type=float, help="Give up watching after this many seconds.")
@click.option("--parts", type=int, help="Expected array children (when there is no submission record).")
@click.option("--no-dlq", is_flag=True, help="Do not look into the dead-letter queue.")
@click.option("--logs", "log_lines", type=click.IntRange(0, 1000), default=0,
              help="Also print the last N log lines of each failed job (needs logGroupName / $CPB_LOG_GROUP).")
@stack_options
def status(stack: StackConfig, outputs: tuple[str, ...], watch: bool, interval: float,
           timeout: Optional[float], parts: Optional[int], no_dlq: bool, log_lines: int) -> None:
    """Show the jobs of OUTPUT prefix(es) or message ids (default: your last submit).

    Exit code 0 when all succeeded, 1 when something failed, 3 while running.
    """
    stack.require("bucket")
    outputs = tuple(receipts.resolve(outputs, stack.bucket)) if outputs else tuple(receipts.last_outputs(stack.bucket))
    if not outputs:
        raise UserError("which output? give OUTPUT prefix(es) or message ids; no earlier `cpb submit` to this "
                        f"bucket is recorded in {receipts.receipts_file()}")
    clients = _clients(stack)

    dlq: dict[str, Any] = {"total": 0, "letters": []}
    limits = limits_of(stack) if stack.dlq_url and not no_dlq else None

    def fetch() -> list[status_mod.OutputStatus]:
        states = [status_mod.output_status(clients.s3, clients.batch, stack.bucket, o, parts) for o in outputs]
        if limits is not None:  # a message for one of these outputs may have been dead-lettered instead
            dlq["total"], dlq["letters"] = status_mod.peek_dlq(clients.sqs, stack.dlq_url,
                                                               lambda body: explain(body, limits))
            for state in states:
                state.dead_letters = [d for d in dlq["letters"] if state.output in d.output.split(",")]
        return states

    sent = receipts.sent_outputs(stack.bucket)

    def show(states: list[status_mod.OutputStatus]) -> None:
        if sys.stdout.isatty():  # a live view on a terminal; a log gets one block per refresh
            click.clear()
        click.echo(render_status(states, stack.bucket, sent))

    if watch:
        states = status_mod.watch(fetch, show, interval, timeout)
    else:
        states = fetch()
        click.echo(render_status(states, stack.bucket, sent))
    if log_lines:
        click.echo(render_logs(clients.logs, stack.log_group, states, log_lines))
    if limits is not None:
        click.echo(render_dlq(dlq["total"], dlq["letters"]))
    verdicts = {s.verdict for s in states}
    if "failed" in verdicts:
        sys.exit(EXIT_FAILED)
    if verdicts - {"succeeded"}:
        sys.exit(EXIT_RUNNING)


def render_status(states: list[status_mod.OutputStatus], bucket: str, sent: Optional[list[str]] = None) -> str:
    """Human-readable status of several outputs. `sent`: the outputs `cpb submit` sent from here,
    so that a mistyped prefix (which would wait forever) is called out."""
    lines = []
    for state in states:
        lines.append(f"s3://{bucket}/{state.output}/: {state.verdict.upper()}")
        for letter in state.dead_letters:
            lines.append(f"  ! message {letter.message_id} for this output is in the dead-letter queue: {letter.reason}")
        if not state.jobs and not state.dead_letters:
            lines.append("  no submission record yet (message still in the queue, or rejected: see the DLQ)")
            if sent is not None and state.output not in sent and not state.run.parts:
                recent = ", ".join(sent[-3:][::-1]) or "none"
                lines.append(f"  ! no `cpb submit` from here sent to {state.output}: unless it was sent another "
                             f"way, check the prefix (recent outputs: {recent})")
        for job in state.jobs:
            progress = ""
            if job.array_size:
                active = sum(n for state, n in job.children.items() if state in status_mod.ACTIVE)
                done = job.array_size - active - len(job.failed_children)
                progress = f"  {max(done, 0)}/{job.array_size} children succeeded" + (
                    f", {len(job.failed_children)} failed" if job.failed_children else "")
            lines.append(f"  job {job.name} {job.job_id}: {job.status}{progress}"
                         + (f"  [log stream {job.log_stream}]" if job.log_stream and not job.array_size else ""))
        done_parts = sum(p.status == "succeeded" for p in state.run.parts)
        if state.run.parts:
            lines.append(f"  run records: {done_parts}/{len(state.run.parts)} succeeded")
        problems = state.problems()
        for problem in problems[:MAX_PROBLEM_LINES]:
            lines.append(f"  ! {problem}")
        if len(problems) > MAX_PROBLEM_LINES:
            lines.append(f"  ! ... and {len(problems) - MAX_PROBLEM_LINES} more; `cpb requeue --dry-run "
                         f"{state.output}` lists every failed job")
    return "\n".join(lines)


def render_logs(logs: Any, group: Optional[str], states: list[status_mod.OutputStatus], lines: int) -> str:
    """The last lines of each failed job's log stream."""
    if not group:
        return "logs: no log group known (stack output logGroupName / $CPB_LOG_GROUP)"
    out = []
    for state in states:
        for job in state.jobs:
            streams = [(f"{job.name} child {i}", log) for i, _reason, log in job.failed_children]
            if job.status == "FAILED" and not job.failed_children:
                streams.append((job.name, job.log_stream))
            for label, stream in streams:
                if not stream:
                    continue
                try:
                    events = logs.get_log_events(logGroupName=group, logStreamName=stream, limit=lines,
                                                 startFromHead=False).get("events", [])
                except logs.exceptions.ResourceNotFoundException:
                    events = []
                out.append(f"logs of {label} ({group} {stream}):")
                out.extend(f"  | {e['message']}" for e in events[-lines:])
                if not events:
                    out.append("  (no log events)")
    return "\n".join(out) if out else "logs: no failed job with a log stream"


def render_dlq(total: int, letters: list[status_mod.DeadLetter]) -> str:
    """The dead-letter queue's content, each message with the reason it is there."""
    if not total:
        return "dead-letter queue: empty"
    lines = [f"dead-letter queue: {total} message(s)"]
    for letter in letters:
        lines.append(f"  {letter.message_id} (received {letter.receive_count}x) output={letter.output or '?'}: "
                     f"{letter.reason}")
    lines.append("  fix the cause, then: cpb requeue --dlq")
    return "\n".join(lines)


def explain(body: str, limits: Any) -> str:
    """Why a dead-lettered message failed, as far as the client can tell."""
    try:
        submit_mod.validate(body, limits)
    except submit_mod.SubmitError as exc:
        return str(exc)
    return "valid message; the Lambda could not submit it (see its log group)"


# --------------------------------------------------------------------------- results

@cli.command()
@click.argument("output")
@click.option("--to", "dest", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Local folder to write the (merged) results into.")
@click.option("--parts", type=int, help="Expected array children (when there is no submission record).")
@stack_options
def results(stack: StackConfig, output: str, dest: Path, parts: Optional[int]) -> None:
    """Download OUTPUT's results, merging array parts; refuses incomplete runs."""
    stack.require("bucket")
    clients = _clients(stack)
    bar = _LazyBar("download")
    before = results_mod.files_under(dest)
    try:
        report = results_mod.collect(clients.s3, stack.bucket, output, dest, parts, bar.advance, bar.start)
    finally:
        bar.close()
    merged = f" (merged from {report.parts} array parts)" if report.parts else ""
    click.echo(f"{len(report.files)} file(s) in {dest}{merged}")
    foreign = sorted(before - set(report.files) - {"_cpb/runs.json"})
    if foreign:  # another plate's results: they would pass for this output's
        say(f"warning: {len(foreign)} file(s) in {dest} are not from {output} (e.g. {foreign[0]}); "
            "keep each output's results in its own --to folder")
    for name, rows in sorted(report.rows.items()):
        click.echo(f"  {name}: {rows} rows")


class _LazyBar:
    """A byte progress bar created once the total is known."""

    def __init__(self, label: str) -> None:
        self.label, self._cm, self._advance = label, None, None

    def start(self, total: int) -> None:
        self._cm = byte_bar(total, self.label)
        self._advance = self._cm.__enter__()

    def advance(self, n: int) -> None:
        if self._advance:
            self._advance(n)

    def close(self) -> None:
        if self._cm:
            self._cm.__exit__(None, None, None)


# --------------------------------------------------------------------------- requeue

@cli.command()
@click.argument("outputs", nargs=-1)
@click.option("--dlq", "from_dlq", is_flag=True, help="Move dead-letter messages back to the job queue.")
@click.option("--force", is_flag=True, help="With --dlq: also move messages that still fail validation.")
@click.option("--dry-run", is_flag=True, help="Say what would be resubmitted, change nothing.")
@stack_options
def requeue(stack: StackConfig, outputs: tuple[str, ...], from_dlq: bool, force: bool, dry_run: bool) -> None:
    """Resubmit the failed jobs / array children of OUTPUT(s), or redrive the DLQ."""
    from cpb import requeue as requeue_mod
    if not outputs and not from_dlq:
        raise UserError("give OUTPUT prefix(es) whose failed jobs to resubmit, or --dlq")
    stack.require("bucket")
    clients = _clients(stack)
    for output in outputs:
        done = requeue_mod.requeue_failed(clients.s3, clients.batch, stack.bucket, output, dry_run=dry_run)
        for line in done:
            click.echo(line)
        if not done:
            click.echo(f"{output}: nothing failed, nothing to resubmit")
    if from_dlq:
        stack.require("queue_url", "dlq_url")
        limits = limits_of(stack)
        moved, kept = requeue_mod.redrive_dlq(clients.sqs, stack.dlq_url, stack.queue_url,
                                              lambda body: submit_mod.validate(body, limits), force, dry_run)
        verb = "would move" if dry_run else "moved"
        click.echo(f"dead-letter queue: {verb} {len(moved)} message(s) back to the job queue")
        for message_id, reason in kept:
            click.echo(f"  kept {message_id}: {reason} (fix it and send again, or --force)")


# --------------------------------------------------------------------------- run --local

@cli.command()
@click.option("--local", "local", is_flag=True, required=True,
              help="Run on this machine (the only mode; AWS runs go through `cpb submit`).")
@click.option("--pipeline", required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Local .cppipe file.")
@click.option("--input", "input_dir", required=True, type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Local folder of input images.")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Local folder for the results.")
@click.option("--data-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="LoadData CSV listing the image sets.")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="CellProfiler processes to run side by side.  [default: one per CPU here]")
@click.option("--unsplittable", is_flag=True, help="Run as one CellProfiler process (stateful pipelines).")
def run(local: bool, pipeline: Path, input_dir: Path, output_dir: Path, data_file: Optional[Path],
        workers: Optional[int], unsplittable: bool) -> None:
    """Run the worker here with real CellProfiler, exactly as a Batch job would."""
    from cpb.runlocal import run_local
    from cpb_worker.ranges import available_cpus
    if output_dir.resolve() == input_dir.resolve() or input_dir.resolve() in output_dir.resolve().parents:
        # the rule the Lambda applies to S3 prefixes; here the next run would also read the outlines as images
        raise UserError(f"--output {output_dir} is inside --input {input_dir}: results would mix with the "
                        "images; choose an output folder outside the input folder")
    cpus = available_cpus({})  # this machine's CPUs (CPB_VCPUS describes a Batch job, not this machine)
    if workers is None:
        workers = cpus  # as a Batch job uses its vCPUs
    elif workers > cpus:
        click.echo(f"note: --workers {workers} is more than the {cpus} CPU(s) here: the extra CellProfiler "
                   f"processes share those CPUs (no faster) and each needs its own memory; try --workers {cpus}",
                   err=True)
    outcome = run_local(pipeline, input_dir, output_dir, data_file, workers, unsplittable)
    click.echo(outcome.summary)
    if not outcome.ok:
        sys.exit(outcome.exit_code or 1)


# --------------------------------------------------------------------------- demo

@cli.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=Path("demo-output"),
              show_default=True, help="Where the demo writes results and the plate picture.")
@click.option("--wells", type=click.IntRange(1, 96), default=2, show_default=True, help="Wells on the plate.")
@click.option("--sites", type=click.IntRange(1, 16), default=4, show_default=True, help="Sites per well.")
@click.option("--sets-per-job", type=click.IntRange(1, 1000), default=2, show_default=True,
              help="Image sets per array child.")
@click.option("--parallel", type=click.IntRange(1, 8), default=2, show_default=True,
              help="Jobs the local Batch runs at once (it gets parallel x job-vcpus cores).")
@click.option("--job-vcpus", type=click.IntRange(1, 8), default=1, show_default=True,
              help="vCPUs (CellProfiler processes) each job asks for.")
@click.option("--tolerance", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Largest relative error of a well's nuclei count.")
def demo(out_dir: Path, wells: int, sites: int, sets_per_job: int, parallel: int, job_vcpus: int,
         tolerance: float) -> None:
    """Run the whole system end to end on AWS emulated on 127.0.0.1 (no account)."""
    from cpb.demo.run import DemoSettings, run_demo
    outcome = run_demo(DemoSettings(out_dir=out_dir, wells=wells, sites=sites, sets_per_job=sets_per_job,
                                    parallel=parallel, job_vcpus=job_vcpus, tolerance=tolerance))
    if not outcome.ok:
        sys.exit(1)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point (`cpb`)."""
    cli.main(args=argv, prog_name="cpb")


if __name__ == "__main__":  # pragma: no cover
    main()

from cpb.local.commands import local as _local_commands  # noqa: E402 - `cpb local ...` (the local stack)
cli.add_command(_local_commands)
