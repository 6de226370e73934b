"""`cpb`: submit CellProfiler work to the stack, watch it, collect results.

Command definitions only: each command parses its options, finds the stack (cpb.stack) and
delegates to the module that does the work, so what is tested is what scientists run. Every
command prints one clear line on failure (a traceback only with `cpb --debug`).
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
from cpb.aws import Clients, make_clients
from cpb.lease import read_lease
from cpb.progress import LazyBar, say
from cpb.render import explainer, not_taken_line, render_dlq, render_logs, render_status
from cpb.runrecords import list_keys, no_longer_coming, run_state, short
from cpb.stack import StackConfig, StackError, discover
from cpb.urls import UrlError, s3_url, split_url, to_prefix

# Exit codes of `cpb status` (documented in docs/CLI.md).
EXIT_OK, EXIT_FAILED, EXIT_RUNNING = 0, 1, 3


class UserError(click.ClickException):
    """An error meant for a person: printed as one line, exit code 1."""

    def show(self, file: Any = None) -> None:  # noqa: D102 - one line, no "Error:" noise
        click.echo(f"cpb: {self.format_message()}", err=True)


def _expected_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError
    from cpb.lease import LeaseConflict
    from cpb.loaddata import LoadDataError
    from cpb.plate import PlateError
    from cpb.requeue import RequeueError
    return (StackError, submit_mod.SubmitError, results_mod.IncompleteRun, results_mod.ResultsError, UrlError,
            RequeueError, LoadDataError, PlateError, LeaseConflict, ClientError, BotoCoreError, FileNotFoundError,
            PermissionError, ValueError)


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


def prefix_of(stack: StackConfig, text: str, what: str = "output") -> str:
    """An output argument (prefix, s3:// URL or S3 web address) as a prefix of the stack's bucket."""
    return to_prefix(text, stack.bucket, what, stack.sources.get("bucket", ""))


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
@click.option("--output", help="Bucket key prefix (or s3:// URL) for the results.")
@click.option("--data-file", help="Bucket key of a LoadData CSV (or a local file with --upload).")
@click.option("--image-sets-per-job", type=int, help="Split into an array job, this many image sets per child.")
@click.option("--memory", type=int, help="MiB of memory per job (job_memory).")
@click.option("--vcpus", type=int, help="vCPUs per job (job_vcpu).")
@click.option("--job-name", help="Readable name for the Batch job(s).")
@click.option("--unsplittable", is_flag=True, help="Run as one CellProfiler process (stateful pipelines).")
@click.option("--after", "after", multiple=True, help="Output whose current run this job waits for (repeatable).")
@click.option("--no-resume", is_flag=True, help="Rerun every part, even those whose earlier results match.")
@click.option("--message-file", "message_file", type=click.Path(path_type=Path, dir_okay=False),
              help="JSON message file (one object or a list) instead of the flags above.")
@click.option("--upload", "upload_dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Upload this local folder of images to --input first (skips unchanged files).")
@click.option("--dry-run", is_flag=True, help="Validate and print the messages without sending.")
@click.option("--no-check", is_flag=True, help="Skip checking that pipeline and inputs exist in the bucket.")
@stack_options
def submit(stack: StackConfig, pipeline: Optional[str], input_prefix: Optional[str], output: Optional[str],
           data_file: Optional[str], image_sets_per_job: Optional[int], memory: Optional[int],
           vcpus: Optional[int], job_name: Optional[str], unsplittable: bool, after: tuple[str, ...],
           no_resume: bool, message_file: Optional[Path], upload_dir: Optional[Path], dry_run: bool,
           no_check: bool) -> None:
    """Validate job messages like the Lambda does, then send them to the queue."""
    stack.require("bucket", *(() if dry_run else ("queue_url",)))
    limits = limits_of(stack)
    resume = False if no_resume else None
    if message_file is not None:
        if any(v is not None for v in (pipeline, input_prefix, output, data_file, image_sets_per_job)) or after:
            raise UserError("give either --message-file or --pipeline/--input/--output, not both")
        entries = submit_mod.prepare(submit_mod.read_message_file(message_file), limits)
        clients = _clients(stack)
        if not no_check:
            _refuse_busy(stack, clients, entries)
    else:
        missing = [f"--{n}" for n, v in (("pipeline", pipeline), ("input", input_prefix), ("output", output)) if not v]
        if missing:
            raise UserError(f"missing {', '.join(missing)} (or pass --message-file FILE)")
        if split_url(output) is not None:  # the URL cpb submit prints; a plain prefix is the schema's to judge
            output = prefix_of(stack, output)
        submit_mod.check_local_inputs(pipeline, data_file, upload_dir)
        # A bad message costs no upload and needs no credentials: validate the flags first, with the
        # local files --upload will turn into keys standing in for those keys.
        def as_key(value: Optional[str]) -> Optional[str]:
            return f"uploads/{Path(value).name}" if upload_dir and value and Path(value).is_file() else value
        valid = submit_mod.prepare(json.dumps(submit_mod.message_from_flags(
            as_key(pipeline), input_prefix, output, as_key(data_file), image_sets_per_job, memory, vcpus, job_name,
            unsplittable, list(after), resume)), limits)
        clients = _clients(stack)
        if not no_check:  # before the upload: it would change the inputs under the run still going there
            _refuse_busy(stack, clients, valid)
        if upload_dir is not None:
            pipeline, data_file = submit_mod.upload_inputs(clients.s3, stack.bucket, upload_dir, input_prefix,
                                                           pipeline, data_file)
        entries = submit_mod.prepare(json.dumps(submit_mod.message_from_flags(
            pipeline, input_prefix, output, data_file, image_sets_per_job, memory, vcpus, job_name, unsplittable,
            list(after), resume)), limits)
    if not no_check:
        checked = submit_mod.check_in_bucket(clients.s3, entries, limits)
        for item in checked:
            if item.image_set_count is not None:
                say(f"{item.request.output}: {item.image_set_count} image sets in {item.request.data_file}")
        for used in submit_mod.existing_outputs(clients.s3, stack.bucket, [e.request for e in entries]):
            say(f"warning: s3://{stack.bucket}/{used}/ already holds results; this job replaces them "
                "(its run deletes the earlier files): to keep them, use a new --output")
    messages = submit_mod.one_message_each(entries)
    if dry_run:
        for message in messages:
            click.echo(message.body())
        say(f"dry run: {len(entries)} job(s) in {len(messages)} message(s) valid, nothing sent")
        return
    before = {e.output: (read_lease(clients.s3, stack.bucket, e.output)[0] or {}).get("run_id") for e in entries}
    report = submit_mod.send(clients.sqs, stack.queue_url, messages)
    for sent in report.sent:
        for output_, _identity, run_id in sent.runs():
            click.echo(f"sent {sent.message_id}  results: {s3_url(stack.bucket, output_)}  (run {short(run_id)})")
    for message, reason in report.failed:
        click.echo(f"NOT sent ({', '.join(e.output for e in message.entries)}): {reason}", err=True)
    if report.sent:
        receipts.record(stack.bucket, [(s.message_id, o, i) for s in report.sent for o, i, _ in s.runs()],
                        leases=before)
        outputs = sorted({o for s in report.sent for o in s.outputs})
        say(f"follow with: {stack.command('status')}   (or: {stack.command('status', *outputs)})")
    if report.failed:
        raise UserError(f"{len(report.failed)} of {len(messages)} message(s) were not accepted by SQS")


def _refuse_busy(stack: StackConfig, clients: Clients, entries: list) -> None:
    busy = submit_mod.busy_outputs(clients.s3, clients.batch, stack.bucket, entries)
    if busy:
        raise UserError("output: " + "; ".join(busy))


# --------------------------------------------------------------------------- status

@cli.command()
@click.argument("outputs", nargs=-1)
@click.option("--watch", is_flag=True, help="Refresh until every job has finished.")
@click.option("--interval", type=float, default=15.0, show_default=True, help="Seconds between refreshes.")
@click.option("--timeout", type=float, help="Give up watching after this many seconds.")
@click.option("--parts", type=int, help="Expected array children (when there is no lease or submission record).")
@click.option("--no-dlq", is_flag=True, help="Do not look into the dead-letter queue.")
@click.option("--logs", "log_lines", type=click.IntRange(0, 1000), default=0,
              help="Also print the last N log lines of each failed job (needs logGroupName / $CPB_LOG_GROUP).")
@stack_options
def status(stack: StackConfig, outputs: tuple[str, ...], watch: bool, interval: float,
           timeout: Optional[float], parts: Optional[int], no_dlq: bool, log_lines: int) -> None:
    """Show the current run of OUTPUT prefix(es) (or s3:// URLs, or message ids; default: your last submit).

    Exit code 0 when all succeeded, 1 when something failed, 3 while running or waiting.
    """
    stack.require("bucket")
    names = receipts.resolve(outputs, stack.bucket) if outputs else receipts.last_outputs(stack.bucket)
    outputs = tuple(dict.fromkeys(prefix_of(stack, name) for name in names))
    if not outputs:
        raise UserError("which output? give OUTPUT prefix(es) or message ids; no earlier `cpb submit` to this "
                        f"bucket is recorded in {receipts.receipts_file()}")
    clients = _clients(stack)
    dlq: dict[str, Any] = {"total": 0, "letters": []}
    limits = limits_of(stack) if stack.dlq_url and not no_dlq else None
    explain = explainer(limits, clients.s3, clients.batch) if limits is not None else None

    def fetch() -> list[status_mod.OutputStatus]:  # a message may have been dead-lettered instead: look there too
        states, dlq["total"], dlq["letters"] = status_mod.gather(
            clients.s3, clients.batch, clients.sqs, stack.bucket, outputs, parts,
            stack.dlq_url if limits is not None else None, explain)
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


# --------------------------------------------------------------------------- results

@cli.command()
@click.argument("output")
@click.option("--to", "dest", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Local folder to write the (merged) results into.")
@click.option("--parts", type=int, help="Expected array children (when there is no lease or submission record).")
@click.option("--run", "run_id", help="Accept only this run (its id or first digits, as cpb status shows it).")
@click.option("--parquet", is_flag=True,
              help="Also convert the merged CSVs into DIR/single_cell.parquet with CytoTable (one row per cell).")
@stack_options
def results(stack: StackConfig, output: str, dest: Path, parts: Optional[int], run_id: Optional[str],
            parquet: bool) -> None:
    """Download OUTPUT's current run (prefix or s3:// URL), merging array parts; refuses incomplete runs."""
    stack.require("bucket")
    output = prefix_of(stack, output)
    clients = _clients(stack)
    keys = list_keys(clients.s3, stack.bucket, output)
    state = run_state(clients.s3, stack.bucket, output, parts, keys=keys)
    waiting = receipts.not_taken(stack.bucket, output, state.lease,
                                 taken=no_longer_coming(clients.s3, stack.bucket, output, keys, state.lease))
    if waiting and run_id is None:
        line = not_taken_line(waiting[-1], state.lease, output, stack.command("status", "--watch", output))
        raise results_mod.IncompleteRun(f"{s3_url(stack.bucket, output)}: {line}")
    bar = LazyBar("download")
    before = results_mod.files_under(dest)
    try:
        report = results_mod.collect(clients.s3, stack.bucket, output, dest, parts, bar.advance, bar.start,
                                     run=run_id, state=state)
    finally:
        bar.close()
    merged = f" (merged from {report.parts} array parts)" if report.parts else ""
    run_text = f", run {short(report.run_id)}" if report.run_id else ""
    click.echo(f"{len(report.files)} file(s) in {dest}{merged}{run_text}")
    if report.resumed:
        say(f"note: {report.resumed} part(s) were reused from an earlier run with the same pipeline, data rows and image")
    if report.ignored:
        say(f"note: not counted, never merged: {'; '.join(report.ignored[:5])}")
    if report.removed:
        say(f"removed {len(report.removed)} file(s) of the earlier run in {dest} that this run did not replace "
            f"(e.g. {report.removed[0]}): they would pass for this run's; make the Parquet, report and profiles "
            "again (cpb results --parquet, cpb report, cpb profile)")
    foreign = sorted(before - set(report.files) - set(report.removed) - set(report.derived)
                     - {results_mod.PROVENANCE})
    if foreign:  # another plate's results: they would pass for this output's
        say(f"warning: {len(foreign)} file(s) in {dest} are not from {output} (e.g. {foreign[0]}); "
            "keep each output's results in its own --to folder")
    for name, rows in sorted(report.rows.items()):
        click.echo(f"  {name}: {rows} rows")
    if parquet:
        from cpb.analysis.parquet import describe, to_parquet
        click.echo(f"single-cell Parquet: {describe(to_parquet(dest, run_id=report.run_id, only=report.files))}")


# --------------------------------------------------------------------------- requeue

@cli.command()
@click.argument("outputs", nargs=-1)
@click.option("--dlq", "from_dlq", is_flag=True, help="Move dead-letter messages back to the job queue.")
@click.option("--force", is_flag=True, help="With --dlq: also move messages that still fail validation.")
@click.option("--dry-run", is_flag=True, help="Say what would be resubmitted, change nothing.")
@stack_options
def requeue(stack: StackConfig, outputs: tuple[str, ...], from_dlq: bool, force: bool, dry_run: bool) -> None:
    """Resubmit the failed jobs / array children of OUTPUT(s)' current run, or redrive the DLQ."""
    from cpb import requeue as requeue_mod
    if not outputs and not from_dlq:
        raise UserError("give OUTPUT prefix(es) whose failed jobs to resubmit, or --dlq")
    stack.require("bucket")
    outputs = tuple(prefix_of(stack, o) for o in outputs)
    clients = _clients(stack)
    for output in outputs:
        done = requeue_mod.requeue_failed(clients.s3, clients.batch, stack.bucket, output, dry_run=dry_run,
                                          batch_submit=clients.batch_submit)
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
    from cpb.runlocal import LocalRunError, run_local_command
    try:
        outcome = run_local_command(pipeline, input_dir, output_dir, data_file, workers, unsplittable)
    except LocalRunError as error:
        raise UserError(str(error)) from None
    click.echo(outcome.summary)
    if not outcome.ok:
        sys.exit(outcome.exit_code or 1)


# --------------------------------------------------------------------------- loaddata, plate

@cli.command()
@click.argument("images")
@click.option("--pattern", "preset", help="File-name preset: phenix (Opera/Operetta), imagexpress, or a regex "
              "with named groups plate, well (or row+column), site (or field), channel [, plane].")
@click.option("--channel", "channels", multiple=True, metavar="ID=NAME",
              help="Channel id in the file names = CellProfiler image name, e.g. 1=DNA (repeat per channel).")
@click.option("--plate", "plate_name", help="Plate name when the file names carry none (default: the folder's name).")
@click.option("--illum", "illum", help="Illumination output (local folder, or bucket prefix / s3:// URL) whose "
              "Illum<Name>.npy files the analysis loads: adds Image_FileName_/Image_PathName_Illum<Name> columns.")
@click.option("--pipeline", "pipeline", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Check the channels against the image names this pipeline expects.")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The LoadData CSV to write.")
@click.option("--bucket", help="Data bucket, for IMAGES given as a bucket prefix (else $CPB_BUCKET / the stack's).")
@click.option("--stack", "stack_name", help="Pulumi stack, for IMAGES in the bucket.")
@click.option("--region", help="AWS region, for IMAGES in the bucket.")
def loaddata(images: str, preset: Optional[str], channels: tuple[str, ...], plate_name: Optional[str],
             illum: Optional[str], pipeline: Optional[Path], out: Path, bucket: Optional[str],
             stack_name: Optional[str], region: Optional[str]) -> None:
    """Write a LoadData CSV from a folder of images (IMAGES: local folder, bucket prefix or s3:// URL)."""
    from cpb import loaddata as loaddata_mod
    source = loaddata_mod.image_source(images, lambda: discover(stack_name, {"bucket": bucket, "region": region}),
                                       make_clients)
    table = loaddata_mod.build(source, loaddata_mod.pattern_for(preset), loaddata_mod.parse_channels(channels),
                               plate=plate_name, illum=loaddata_mod.illum_location(illum, source) if illum else None,
                               pipeline=pipeline)
    table.write(out)
    click.echo(table.summary(out))
    for note in table.notes:
        say(f"note: {note}")


@cli.command()
@click.argument("images", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--illum-pipeline", required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Illumination pipeline (.cppipe): runs once over all the plate's images.")
@click.option("--analysis-pipeline", required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Analysis pipeline (.cppipe): runs per site, loading the illumination functions.")
@click.option("--pattern", "preset", required=True, help="File-name preset (phenix, imagexpress) or regex, as for "
              "cpb loaddata.")
@click.option("--channel", "channels", multiple=True, required=True, metavar="ID=NAME",
              help="Channel id = CellProfiler image name (repeat per channel).")
@click.option("--plate", "plate_name", help="Plate name (default: from the file names, else the folder's name).")
@click.option("--root", default="plates", show_default=True,
              help="Bucket prefix (or s3:// URL) under which <plate>/images, <plate>/illum, <plate>/analysis go.")
@click.option("--image-sets-per-job", type=click.IntRange(1, 100_000), default=4, show_default=True,
              help="Sites per analysis array child.")
@click.option("--memory", type=int, help="MiB of memory per job.")
@click.option("--vcpus", type=int, help="vCPUs per job.")
@click.option("--no-resume", is_flag=True, help="Run every step and part again, even those up to date.")
@click.option("--dry-run", is_flag=True, help="Print the plan, upload and send nothing.")
@stack_options
def plate(stack: StackConfig, images: Path, illum_pipeline: Path, analysis_pipeline: Path, preset: str,
          channels: tuple[str, ...], plate_name: Optional[str], root: str, image_sets_per_job: int,
          memory: Optional[int], vcpus: Optional[int], no_resume: bool, dry_run: bool) -> None:
    """Run a plate: illumination, then analysis per site, chained on Batch; resumes what is up to date."""
    from cpb import plate as plate_mod
    stack.require("bucket", *(() if dry_run else ("queue_url",)))
    settings = plate_mod.PlateSettings(
        images=images, illum_pipeline=illum_pipeline, analysis_pipeline=analysis_pipeline, preset=preset,
        channels=channels, plate=plate_name, root=prefix_of(stack, root, "root"),
        image_sets_per_job=image_sets_per_job, memory=memory, vcpus=vcpus, resume=not no_resume)
    outcome = plate_mod.run_plate(settings, stack, limits_of(stack), _clients(stack), dry_run=dry_run)
    for line in outcome.lines:
        click.echo(line)


# --------------------------------------------------------------------------- demo

@cli.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=Path("demo-output"),
              show_default=True, help="Where the demo writes the plate, results, report, profiles and the picture.")
@click.option("--wells", type=click.IntRange(2, 96), default=4, show_default=True,
              help="Wells on the plate (every other one a negative control; profiles compare at least 2 wells).")
@click.option("--sites", type=click.IntRange(1, 16), default=2, show_default=True, help="Sites per well.")
@click.option("--sets-per-job", type=click.IntRange(1, 1000), default=4, show_default=True,
              help="Sites per analysis array child.")
@click.option("--parallel", type=click.IntRange(1, 8), default=2, show_default=True,
              help="Jobs the local Batch runs at once (it gets parallel x job-vcpus cores).")
@click.option("--job-vcpus", type=click.IntRange(1, 8), default=1, show_default=True,
              help="vCPUs (CellProfiler processes) each job asks for.")
@click.option("--tolerance", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Largest relative error of a well's nuclei count.")
def demo(out_dir: Path, wells: int, sites: int, sets_per_job: int, parallel: int, job_vcpus: int,
         tolerance: float) -> None:
    """Run a plate end to end (illumination, then analysis, results, report, profiles) on AWS emulated on
    127.0.0.1 (no account)."""
    from cpb.demo.run import DemoSettings, run_demo
    outcome = run_demo(DemoSettings(out_dir=out_dir, wells=wells, sites=sites, sets_per_job=sets_per_job,
                                    parallel=parallel, job_vcpus=job_vcpus, tolerance=tolerance))
    if not outcome.ok:
        sys.exit(1)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point (`cpb`)."""
    cli.main(args=argv, prog_name="cpb")


# Commands defined beside the code they run (registered here so `cpb --help` lists them all).
from cpb.analysis.commands import profile as _profile_command  # noqa: E402  (cpb profile; cpb/analysis/)
from cpb.analysis.commands import report as _report_command  # noqa: E402  (cpb report; cpb/analysis/)
from cpb.estimate import estimate_command  # noqa: E402  (cpb estimate, issue 15: cost before submitting)

cli.add_command(_report_command)
cli.add_command(_profile_command)
cli.add_command(estimate_command)

if __name__ == "__main__":  # pragma: no cover
    main()

from cpb.local.commands import local as _local_commands  # noqa: E402 - `cpb local ...` (the local stack)
cli.add_command(_local_commands)
