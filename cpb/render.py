"""Text a person reads from `cpb status`: outputs, their runs, failed jobs' logs, the dead-letter queue.

Kept out of cli.py (which only defines commands) so the demo and tests render exactly what
scientists see.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from cpb import status as status_mod
from cpb import submit as submit_mod
from cpb.runrecords import short
from cpb.status import DeadLetter, OutputStatus

# A 5,000-child array can fail 5,000 ways; the screen shows this many and counts the rest.
MAX_PROBLEM_LINES = 20


def render_status(states: list[OutputStatus], bucket: str, sent: Optional[list[str]] = None) -> str:
    """Human-readable status of several outputs. `sent`: the outputs `cpb submit` sent from here,
    so that a mistyped prefix (which would wait forever) is called out."""
    lines = []
    for state in states:
        lines.append(f"s3://{bucket}/{state.output}/: {state.verdict.upper()}")
        lines.extend(f"  {line}" for line in _run_lines(state))
        for letter in state.dead_letters:
            lines.append(f"  ! message {letter.message_id} for this output is in the dead-letter queue: {letter.reason}")
        if not state.jobs and not state.dead_letters and state.lease is None and not state.refusals:
            if state.run.complete and state.run.run_id is None:
                pass  # results from before leases (or a local run): the records say it all
            elif not state.skipped_note:
                lines.append("  no submission record yet (message still in the queue, or rejected: see the DLQ)")
            if sent is not None and state.output not in sent and not state.run.parts:
                recent = ", ".join(sent[-3:][::-1]) or "none"
                lines.append(f"  ! no `cpb submit` from here sent to {state.output}: unless it was sent another "
                             f"way, check the prefix (recent outputs: {recent})")
        for job in state.jobs:
            progress = ""
            if job.array_size:
                active = sum(n for s, n in job.children.items() if s in status_mod.ACTIVE)
                done = job.array_size - active - len(job.failed_children)
                progress = f"  {max(done, 0)}/{job.array_size} children succeeded" + (
                    f", {len(job.failed_children)} failed" if job.failed_children else "")
            label = f"job {job.name} {job.job_id}" + (f" (part {job.array_index})" if job.array_index is not None else "")
            lines.append(f"  {label}: {job.status}{progress}"
                         + (f"  [log stream {job.log_stream}]" if job.log_stream and not job.array_size else ""))
        lines.extend(f"  {line}" for line in status_mod.retry_lines(state.lease))
        done_parts = sum(p.status == "succeeded" for p in state.run.parts)
        if state.run.parts:
            lines.append(f"  run records: {done_parts}/{len(state.run.parts)} succeeded")
        lines.extend(f"  {line}" for line in status_mod.resumed_lines(state.run))
        if state.run.ignored:
            lines.append("  not counted (not the current run's parts, never merged): " + "; ".join(state.run.ignored[:5])
                         + (f" (+{len(state.run.ignored) - 5} more)" if len(state.run.ignored) > 5 else ""))
        problems = state.problems()
        for problem in problems[:MAX_PROBLEM_LINES]:
            lines.append(f"  ! {problem}")
        if len(problems) > MAX_PROBLEM_LINES:
            lines.append(f"  ! ... and {len(problems) - MAX_PROBLEM_LINES} more; `cpb requeue --dry-run "
                         f"{state.output}` lists every failed job")
    return "\n".join(lines)


def _run_lines(state: OutputStatus) -> list[str]:
    """The current run in one or two lines: which run, which message, what it waits for."""
    lines = []
    lease = state.lease
    if lease is not None:
        phase = {"pending": "being submitted by the Lambda", "cancelled": "cancelled (its message was rolled back)"}
        text = f"run {short(lease.get('run_id'))} of message {lease.get('message_id')}"
        if lease.get("state") == "pending" and state.dead_lettered_run:
            text += ": not submitted (its message is in the dead-letter queue)"
        elif lease.get("state") in phase:
            text += f": {phase[lease['state']]}"
        if lease.get("previous_run_id"):
            text += f" (replaced run {short(lease['previous_run_id'])})"
        lines.append(text)
    for output, verdict in state.upstream:
        if verdict in ("succeeded", "failed"):
            lines.append(f"runs after {output}: {verdict.upper()}")
        else:
            lines.append(f"waiting for {output} ({verdict.upper()})")
    for receipt in state.not_taken:
        lines.append("! " + not_taken_line(receipt, lease, state.output))
    lines.extend(f"! {status_mod.refusal_line(r)}" for r in state.busy_refusals)
    if state.skipped_note:
        lines.append(f"cpb plate sent nothing here: {state.skipped_note}")
    return lines


def not_taken_line(receipt: dict, lease: Optional[dict], output: str, status_command: str = "") -> str:
    """Why a message sent from here has not run yet, and what to do (one line; `cpb status`, `cpb results`).
    `status_command`: the `cpb status` line to paste (with the stack's flags); default without them."""
    run = short((lease or {}).get("run_id"))
    return (f"message {receipt.get('message_id')} sent from here at {receipt.get('sent_at')} has not been taken by the "
            f"Lambda yet: it waits in the queue (the output is in use by run {run} of message "
            f"{(lease or {}).get('message_id')}, one run per output at a time: SQS redelivers the message after the "
            "queue's visibility timeout, up to maxReceiveCount times before the dead-letter queue, and it runs once "
            f"that run has ended, replacing it). Until then the results here are run {run}'s, not the ones you sent: "
            f"wait ({status_command or f'cpb status --watch {output}'}), or if you no longer want it, purge the queue "
            "(aws sqs purge-queue) "
            f"and take run {run}'s results with cpb results --run {run}")


def render_logs(logs: Any, group: Optional[str], states: list[OutputStatus], lines: int) -> str:
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


def render_dlq(total: int, letters: list[DeadLetter]) -> str:
    """The dead-letter queue's content, each message with the reason it is there."""
    if not total:
        return "dead-letter queue: empty"
    lines = [f"dead-letter queue: {total} message(s)"]
    for letter in letters:
        lines.append(f"  {letter.message_id} (received {letter.receive_count}x) output={letter.output or '?'}: "
                     f"{letter.reason}")
    lines.append("  fix the cause, then: cpb requeue --dlq")
    return "\n".join(lines)


def explainer(limits: Any, s3: Any = None, batch: Any = None) -> Callable[[DeadLetter], str]:
    """Why a dead-lettered message failed, as far as the client can tell: the schema's line, else
    the output lease that refused it, else a pointer to the Lambda's log."""
    def explain(letter: DeadLetter) -> str:
        try:
            submit_mod.validate(letter.body, limits)
        except submit_mod.SubmitError as exc:
            return str(exc)
        if s3 is not None:
            try:
                refusal = status_mod.lease_refusal(s3, batch, limits.bucket, letter)
            except Exception:  # the explanation is best effort; the letter itself is still listed
                refusal = None
            if refusal:
                return f"refused: {refusal}"
        return "valid message; the Lambda could not submit it (see its log group)"
    return explain
