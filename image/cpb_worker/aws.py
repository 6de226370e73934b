"""AWS mode: one Batch job (or array child) from its environment to a run record.

Order matters for trust (docs/CONTRACTS.md, "Worker duties"):
1. with CPB_RUN_ID, the output's lease (`_cpb/lease.json`) must name this run, else exit 5
   and write nothing (a cancelled run too);
2. the part's record of another run is retired first (its files listed in pending.json for
   deletion, the record deleted), unless resume may reuse it: same range, same fingerprint
   (pipeline, this job's data rows or the input listing, image, upstream records of
   CPB_AFTER) and every listed file in the bucket at its size - then a record of this run
   with `resumed_from` is written and CellProfiler never starts;
3. pipeline and data file are read, images staged (FSx or S3; an array child only its
   rows' images, and CellProfiler gets a CSV of just those rows), CellProfiler runs, outputs
   are merged and verified locally, then uploaded with a `_cpb/pending.json` manifest, so a
   retry after a kill mid-upload removes the previous attempt's leftovers;
4. the lease is checked again, and the record is written last.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Set, Tuple
from urllib.parse import urlparse

from . import datafile as df
from . import fingerprint
from .errors import BadInput, Superseded, Transient, WorkerError
from .job import JobSpec, Plan, fail, loaddata_base, plan_job, run_plan
from .pipeline import load_pipeline
from .record import RECORD_KEY, RunRecord, utc_now
from .resume import current_fingerprint, resumed_record, reuse_refusal, sizes_under
from .s3io import S3IO, make_client, safe_key_path

PENDING_KEY = "_cpb/pending.json"
LEASE_KEY = "_cpb/lease.json"
_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")


@dataclass
class JobEnv:
    """The job environment of docs/CONTRACTS.md, validated."""

    bucket: str
    pipeline: str
    input: str
    output: str
    data_file: Optional[str]
    sets_per_job: Optional[int]
    image_set_count: Optional[int]
    array_index: Optional[int]
    fsx_root: Optional[Path]
    unsplittable: bool
    image: Optional[str]
    message_id: Optional[str]
    job_id: Optional[str]
    attempt: Optional[int]
    run_id: Optional[str] = None
    array_offset: int = 0
    resume: bool = True
    after: Tuple[str, ...] = ()
    oom_retry: Optional[int] = None
    data_etag: Optional[str] = None  # CPB_DATA_FILE_ETAG: the data file version the Lambda counted

    @property
    def prefix(self) -> str:
        """Where this job's results go: the output, or an array child's part folder."""
        if self.array_index is None:
            return self.output
        return f"{self.output}/part-{self.array_index:05d}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "JobEnv":
        missing = [name for name in ("CPB_BUCKET", "CPB_PIPELINE", "CPB_INPUT", "CPB_OUTPUT") if not env.get(name)]
        if missing:
            raise BadInput(f"job environment lacks {', '.join(missing)} (set by the ingress Lambda; "
                           "for a laptop run use `python -m cpb_worker local`)")

        def integer(name: str) -> Optional[int]:
            value = env.get(name, "").strip()
            if not value:
                return None
            try:
                return int(value)
            except ValueError:
                raise BadInput(f"{name} must be a whole number, got {value!r}") from None

        offset = integer("CPB_ARRAY_OFFSET") or 0
        if offset < 0:
            raise BadInput(f"CPB_ARRAY_OFFSET must be 0 or more, got {offset}")
        index = integer("AWS_BATCH_JOB_ARRAY_INDEX")
        if index is not None:
            index += offset  # runs of more than 10,000 children are several array jobs
        else:
            index = integer("CPB_ARRAY_INDEX")  # cpb requeue / out-of-memory retry: already the part's index
        per_job = integer("CPB_IMAGE_SETS_PER_JOB")
        if index is not None and per_job is None:
            raise BadInput("array child without CPB_IMAGE_SETS_PER_JOB: cannot tell which image sets are mine")
        fsx = env.get("CPB_FSX_ROOT", "").strip()
        strip = lambda key: env[key].strip().strip("/")  # noqa: E731
        return cls(bucket=env["CPB_BUCKET"].strip(), pipeline=strip("CPB_PIPELINE"), input=strip("CPB_INPUT"),
                   output=strip("CPB_OUTPUT"), data_file=(env.get("CPB_DATA_FILE") or "").strip().strip("/") or None,
                   sets_per_job=per_job, image_set_count=integer("CPB_IMAGE_SET_COUNT"),
                   array_index=index if per_job is not None else None,
                   fsx_root=Path(fsx) if fsx and Path(fsx).is_dir() else None,
                   unsplittable=env.get("CPB_UNSPLITTABLE", "").strip() == "1", image=env.get("CPB_IMAGE"),
                   message_id=env.get("CPB_MESSAGE_ID"), job_id=env.get("AWS_BATCH_JOB_ID"),
                   attempt=integer("AWS_BATCH_JOB_ATTEMPT"), run_id=(env.get("CPB_RUN_ID") or "").strip() or None,
                   array_offset=offset, resume=(env.get("CPB_RESUME") or "1").strip() != "0",
                   after=tuple(a.strip().strip("/") for a in (env.get("CPB_AFTER") or "").split(",") if a.strip()),
                   oom_retry=integer("CPB_OOM_RETRY"),
                   data_etag=(env.get("CPB_DATA_FILE_ETAG") or "").strip() or None)


class Stager:
    """Makes bucket keys available as local files: from FSx when mounted, else S3.

    FSx imports objects a little after they land in S3, so a job sent right
    after an upload can find some of its files not yet on /fsx. Those (and
    only those) are read from S3 into the scratch folder instead: the Lambda
    has already checked they exist, and a lagging import is no reason to fail.
    """

    def __init__(self, job: JobEnv, s3: S3IO, root: Path) -> None:
        self.job, self.s3, self.root = job, s3, root
        self.from_s3: Dict[str, Path] = {}  # keys FSx did not have yet, staged from S3

    def local(self, key: str) -> Path:
        if key in self.from_s3:
            return self.from_s3[key]
        base = self.job.fsx_root if self.job.fsx_root is not None else self.root
        return safe_key_path(base, key)

    def fetch(self, keys: List[str]) -> List[Path]:
        if self.job.fsx_root is not None:
            late = [k for k in keys if not self.local(k).is_file()]
            if late:
                print(f"cpb_worker: {len(late)} file(s) not yet on FSx ({self.job.fsx_root}), e.g. {late[0]}; "
                      "reading them from S3", file=sys.stderr)
                pairs = [(k, safe_key_path(self.root, k)) for k in late]
                self.s3.download_many(pairs)
                self.from_s3.update(pairs)
            return [self.local(k) for k in keys]
        paths = [self.local(k) for k in keys]
        self.s3.download_many([(k, p) for k, p in zip(keys, paths) if not p.is_file()])
        return paths

    def fetch_pinned(self, key: str, etag: str) -> Path:
        """The data file exactly as the Lambda read and counted it (its ETag `etag`), else BadInput.

        Edited in place after the message was accepted (same key, same row count), it would give the
        children that start later other rows than the ones that started before. From S3 it is read
        with IfMatch; on FSx the S3 object's ETag is checked with a HEAD first, and the FSx copy is
        used only when it is there at the object's size (else the object is read from S3, IfMatch)."""
        if self.job.fsx_root is not None:
            head = self.s3.head(key)
            if _unquoted(head.get("ETag")) != _unquoted(etag):
                raise BadInput(data_file_changed(self.job.bucket, key))
            copy = self.local(key)
            if copy.is_file() and copy.stat().st_size == int(head.get("ContentLength", -1)):
                return copy
            print(f"cpb_worker: the data file is not on FSx ({self.job.fsx_root}) as it is in S3 yet; reading it "
                  "from S3", file=sys.stderr)
        path = safe_key_path(self.root, key)
        if self.s3.download_if_match(key, path, etag) is None:
            raise BadInput(data_file_changed(self.job.bucket, key))
        self.from_s3[key] = path
        return path

    def input_dir(self, prefix: str, keys: Optional[List[str]] = None) -> Path:
        """The folder holding every object under `prefix` (no data file: the folder IS the image list).

        On FSx a folder missing any of S3's objects would silently drop image sets, so then the whole
        prefix is staged from S3 instead. `keys`: the prefix's listing, when already made.
        """
        if keys is None:
            keys = [k for k in self.s3.list_keys(prefix + "/") if not k.endswith("/")]
        if not keys:
            raise BadInput(f"input prefix s3://{self.job.bucket}/{prefix}/ holds no files")
        if self.job.fsx_root is not None and all(self.local(k).is_file() for k in keys):
            return self.local(prefix)
        if self.job.fsx_root is not None:
            print(f"cpb_worker: FSx ({self.job.fsx_root}) does not hold every file of {prefix}/ yet; "
                  "reading the input prefix from S3", file=sys.stderr)
        pairs = [(k, safe_key_path(self.root, k)) for k in keys]
        self.s3.download_many([(k, p) for k, p in pairs if not p.is_file()])
        folder = safe_key_path(self.root, prefix)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def key_for(self, location: str, base_key: str) -> str:
        """The bucket key of an image location written in a LoadData CSV."""
        parsed = urlparse(location)
        if parsed.scheme == "s3":
            if parsed.netloc != self.job.bucket:
                raise BadInput(f"data file names s3://{parsed.netloc}/...; images must be in the job's bucket "
                               f"s3://{self.job.bucket}")
            return parsed.path.lstrip("/")
        local = df.url_to_path(location)
        if local is None:
            raise BadInput(f"data file location {location!r}: only relative paths and s3:// URLs are supported")
        for root in (str(self.job.fsx_root) if self.job.fsx_root else None, "/fsx"):
            if root and local.startswith(root.rstrip("/") + "/"):
                return local[len(root.rstrip("/")) + 1:]
        if os.path.isabs(local):
            raise BadInput(f"data file location {location!r} is an absolute path outside the bucket: use paths "
                           "relative to the input prefix or s3:// URLs")
        return f"{base_key}/{local}" if base_key else local


def _unquoted(etag: Optional[str]) -> str:
    return str(etag or "").strip().strip('"')


def data_file_changed(bucket: str, key: str) -> str:
    """The one line a job whose data file was replaced after its message was accepted fails with."""
    return (f"the data file changed after the message was accepted: resubmit (s3://{bucket}/{key} is not the "
            "version the Lambda counted, so parts of this run would read different rows)")


def _base_key(plan: Plan, job: JobEnv) -> str:
    """Key prefix LoadData's relative image paths start from (the input prefix, or a sub-folder)."""
    base = loaddata_base(plan, Path("/@input"), Path("/@output"))
    text = str(base)
    if text.startswith("/@input"):
        return (job.input + text[len("/@input"):]).strip("/")
    raise BadInput("LoadData 'Base image location' must be the Default Input Folder (or a sub-folder) "
                   "when images come from S3")


def _loaddata_key(pipeline_path: Path, job: JobEnv) -> Optional[str]:
    """Without a data_file, the key of the CSV the pipeline's LoadData names under the input
    prefix (Default Input Folder, or a sub-folder of it); None without LoadData."""
    pipeline = load_pipeline(pipeline_path)
    modules = pipeline.enabled("LoadData")
    if not modules:
        return None
    kind, _, sub = (modules[0].get("Input data file location") or "Default Input Folder|").partition("|")
    name = modules[0].get("Name of the file") or ""
    if not kind.startswith("Default Input Folder") or not name:
        raise BadInput(f"pipeline {pipeline.path.name} has LoadData but the job has no data_file, and its CSV is "
                       f"not in the input folder ({kind}): send the CSV as the message's data_file")
    parts = [job.input] + ([sub.strip("/")] if kind.endswith("sub-folder") and sub.strip("/") else []) + [name]
    return "/".join(parts)


def plan_inputs(job: JobEnv, stager: Stager, s3: S3IO, env: Mapping[str, str]) -> Tuple[Plan, Optional[Dict[str, int]]]:
    """Get the pipeline and data file (not the images) and plan the job; for a pipeline without
    a data file also list the input prefix ({key: size}), which the plan's fingerprint hashes."""
    data_key = job.data_file
    pipeline_path = stager.fetch([job.pipeline])[0]
    if data_key is None:
        data_key = _loaddata_key(pipeline_path, job)
    if data_key is not None and data_key == job.data_file and job.data_etag:
        data_path: Optional[Path] = stager.fetch_pinned(data_key, job.data_etag)
    else:
        data_path = stager.fetch([data_key])[0] if data_key else None
    listing: Optional[Dict[str, int]] = None
    input_files = None
    if data_path is None:
        listing = {k: v for k, v in s3.sizes(job.input + "/").items() if not k.endswith("/")}
        if not listing:
            raise BadInput(f"input prefix s3://{job.bucket}/{job.input}/ holds no files")
        input_files = [(k[len(job.input) + 1:], v) for k, v in listing.items()]
    spec = JobSpec(pipeline=pipeline_path, input_dir=stager.local(job.input), data_file=data_path,
                   array_index=job.array_index, sets_per_job=job.sets_per_job,
                   expected_count=job.image_set_count, force_unsplittable=job.unsplittable, env=env,
                   input_files=input_files)
    return plan_job(spec), listing


def stage_images(job: JobEnv, stager: Stager, plan: Plan, work: Path,
                 listing: Optional[Dict[str, int]]) -> Tuple[Path, Optional[Path]]:
    """Get the images this job needs; return (input dir, the LoadData CSV CellProfiler reads)."""
    if plan.data is None:
        # No data file: the image sets are whatever the input prefix holds, so all of it is needed.
        return stager.input_dir(job.input, sorted(listing or {})), None
    base_key = _base_key(plan, job)
    data = plan.data
    wanted = [stager.key_for(loc, base_key) for _, _, loc in df.image_locations(data, plan.first, plan.last,
                                                                                    plan.rows_skipped)]
    stager.fetch(list(dict.fromkeys(wanted)))
    # Every location becomes an absolute local path, whatever the CSV said (relative, s3://, /fsx/...);
    # CellProfiler gets only this job's rows unless LoadData picks its own row range.
    resolve = lambda loc: str(stager.local(stager.key_for(loc, base_key)))  # noqa: E731
    dest = work / "data" / "load_data.rewritten.csv"
    if plan.sliced:
        rewritten = df.rewrite(data, resolve, dest, plan.first, plan.last)
    else:
        rewritten = df.rewrite(data, resolve, dest)
    return stager.local(job.input), rewritten


def upload_outputs(s3: S3IO, prefix: str, out_dir: Path, record: RunRecord) -> None:
    """Upload the record's files; clear what earlier attempts left; no record yet."""
    new_keys = {f"{prefix}/{entry['key']}" for entry in record.files}
    old_keys: Set[str] = set()
    for key in (f"{prefix}/{RECORD_KEY}", f"{prefix}/{PENDING_KEY}"):
        previous = s3.get_json(key) or {}
        old_keys |= {f"{prefix}/{e['key']}" for e in previous.get("files", []) if isinstance(e, dict) and "key" in e}
        old_keys |= {k for k in previous.get("keys", []) if isinstance(k, str) and k.startswith(prefix + "/")}
    s3.delete_keys([f"{prefix}/{RECORD_KEY}"])  # the old record must not vouch for half-replaced files
    s3.put_json(f"{prefix}/{PENDING_KEY}", {"keys": sorted(new_keys | old_keys), "started_at": utc_now()})
    uploads = [(out_dir / entry["key"], f"{prefix}/{entry['key']}") for entry in record.files]
    s3.upload_many(uploads)
    _verify_uploaded(s3, prefix, uploads)
    stale = old_keys - new_keys
    if stale:
        s3.delete_keys(stale)


def _verify_uploaded(s3: S3IO, prefix: str, uploads: List[Tuple[Path, str]]) -> None:
    """Check the bucket really holds every file at its size before a record vouches for it.

    A transfer can report success without the object being there (an exception
    swallowed in a transfer thread, an eventually consistent listing); one LIST
    catches that, and missing files get one more upload before we give up."""
    for attempt in range(2):
        present = s3.sizes(prefix + "/")
        missing = [(path, key) for path, key in uploads if present.get(key) != path.stat().st_size]
        if not missing:
            return
        if attempt == 0:
            s3.upload_many(missing)
    raise Transient(f"{len(missing)} uploaded file(s) are not in s3://{s3.bucket}/{prefix}/ at the right size "
                    f"(first: {missing[0][1]}); S3 is failing, retry the job")


def _print_failure_log(out_dir: Path) -> None:
    """Show the end of CellProfiler's log in the job log (CloudWatch) before the reason."""
    for log in sorted((out_dir / "_cpb" / "logs").glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        if any(_ERROR_LINE.match(line) and "MySQL" not in line for line in lines):  # MySQL: harmless 5.0 warning
            sys.stderr.write(f"--- last lines of {log.name} ---\n" + "\n".join(lines[-15:]) + "\n")
            return


def check_lease(s3: S3IO, job: JobEnv) -> None:
    """With a run id: the output's lease must name this run (docs/CONTRACTS.md, worker duty 1)."""
    if not job.run_id:
        return
    lease = s3.get_json(f"{job.output}/{LEASE_KEY}")
    if not isinstance(lease, dict):
        return  # no lease (a stack from before leases): nothing says this run was replaced
    other = lease.get("run_id")
    if other and other != job.run_id:
        raise Superseded(f"output s3://{job.bucket}/{job.output} now belongs to run {other} of message "
                         f"{lease.get('message_id')}; this job's run {job.run_id} was replaced, so it writes nothing")
    if lease.get("state") == "cancelled":
        raise Superseded(f"run {job.run_id} of output s3://{job.bucket}/{job.output} was cancelled (its lease "
                         "says so); this job writes nothing")


def retire_record(s3: S3IO, prefix: str, old: dict) -> None:
    """Delete a part's record of another run, first listing its files in pending.json so the
    upload of this run deletes whatever of them it does not overwrite."""
    pending = s3.get_json(f"{prefix}/{PENDING_KEY}") or {}
    keys = {k for k in pending.get("keys", []) if isinstance(k, str) and k.startswith(prefix + "/")}
    keys |= {f"{prefix}/{e['key']}" for e in old.get("files") or [] if isinstance(e, dict) and "key" in e}
    if keys:
        s3.put_json(f"{prefix}/{PENDING_KEY}", {"keys": sorted(keys), "started_at": utc_now()})
    s3.delete_keys([f"{prefix}/{RECORD_KEY}"])


def upstream_records(s3: S3IO, job: JobEnv, runs: Optional[Dict[str, Optional[str]]] = None
                     ) -> Tuple[List[dict], List[str]]:
    """The current succeeded run records of the outputs in CPB_AFTER (their lease's run: the
    plain record, or every part of an array run), and a warning per output without a lease that
    lacks them. An output whose lease names a run lacking any of them is BadInput: that run is
    being rerun (or did not finish), so its files are not what this job should read. `runs`, when
    given, gets each output's current run id."""
    records: List[dict] = []
    warnings: List[str] = []
    for output in job.after:
        lease = s3.get_json(f"{output}/{LEASE_KEY}")
        run = lease.get("run_id") if isinstance(lease, dict) else None
        if runs is not None:
            runs[output] = run
        size = lease.get("array_size") if isinstance(lease, dict) else None
        if isinstance(size, int) and size > 0:
            keys = [f"{output}/part-{i:05d}/{RECORD_KEY}" for i in range(size)]
        elif isinstance(lease, dict):
            keys = [f"{output}/{RECORD_KEY}"]
        else:  # no lease: the plain record, else every part record there is
            keys = [f"{output}/{RECORD_KEY}"] + sorted(k for k in s3.list_keys(f"{output}/part-")
                                                         if k.endswith("/" + RECORD_KEY))
        found = [r for r in s3.get_json_many(keys) if isinstance(r, dict) and r.get("status") == "succeeded"
                 and (run is None or r.get("run_id") == run)]
        wanted = len(keys) if isinstance(lease, dict) else 1
        if len(found) < wanted and isinstance(lease, dict):
            raise BadInput(f"the step this runs after, {output}, has {len(found)} of {wanted} succeeded "
                           f"record(s) of its current run {run} (it is being rerun or did not finish): run this "
                           "step again once that run has succeeded")
        if len(found) < wanted:
            warnings.append(f"the step this runs after, {output}, has {len(found)} of {wanted} succeeded "
                            f"record(s) of its run {run}")
        records.extend(found)
    return records, warnings


def check_upstream_unchanged(s3: S3IO, job: JobEnv, runs: Dict[str, Optional[str]], digest: Optional[str]) -> None:
    """Right before the record: the outputs in CPB_AFTER still hold the results this job read (the
    same runs, the same files), else what it computed belongs to no current upstream run."""
    now: Dict[str, Optional[str]] = {}
    try:
        records, _ = upstream_records(s3, job, now)
    except BadInput:
        records = None
    for output in job.after:
        if now.get(output) != runs.get(output):
            raise BadInput(f"the step this runs after, {output}, was rerun while this job ran (its current run is "
                           f"now {now.get(output)}, this job read run {runs.get(output)}): run this step again "
                           "once that run has succeeded")
    if records is None or fingerprint.upstream_sha256(records) != digest:
        raise BadInput(f"the results of the step(s) this runs after ({', '.join(job.after)}) changed while this "
                       "job ran: run this step again once they have succeeded")


def main_aws(env: Dict[str, str]) -> int:
    """Run the job described by `env`; return the process exit code."""
    started = time.monotonic()
    try:
        job = JobEnv.from_env(env)
    except WorkerError as error:
        print(f"cpb_worker: failed: {error.reason}", file=sys.stderr)
        return error.exit_code
    record = RunRecord(started_at=utc_now(), array_index=job.array_index, image=job.image,
                       message_id=job.message_id, job_id=job.job_id, attempt=job.attempt, run_id=job.run_id)
    s3 = S3IO(client=make_client(env), bucket=job.bucket)
    scratch = env.get("CPB_WORK_DIR") or None
    if scratch:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cpb-job-", dir=scratch))  # fresh per attempt: no leftovers mix in
    out_dir = work / "output"
    out_dir.mkdir()
    if env.get("CPB_FSX_ROOT") and job.fsx_root is None:
        print(f"cpb_worker: CPB_FSX_ROOT={env['CPB_FSX_ROOT']} is not mounted; reading inputs from S3",
              file=sys.stderr)
    print(f"cpb_worker: job s3://{job.bucket}/{job.pipeline} on {job.input} -> {job.prefix}"
          + (" (FSx)" if job.fsx_root else " (S3)") + (f", run {job.run_id}" if job.run_id else ""), file=sys.stderr)
    record_key = f"{job.prefix}/{RECORD_KEY}"
    earlier: Optional[dict] = None  # this part's record of another run, while it may still be reused
    try:
        check_lease(s3, job)
        old = s3.get_json(record_key) if job.run_id else None
        earlier = old if isinstance(old, dict) and old.get("run_id") != job.run_id else None
        if earlier is not None and not (job.resume and earlier.get("status") == "succeeded"):
            retire_record(s3, job.prefix, earlier)  # before anything else: never passes for this run's
            earlier = None
        t0 = time.monotonic()
        stager = Stager(job, s3, work / "s3")
        plan, listing = plan_inputs(job, stager, s3, env)
        record.timings["plan"] = round(time.monotonic() - t0, 3)
        upstream = None
        upstream_runs: Dict[str, Optional[str]] = {}
        if job.after:
            upstream, warnings = upstream_records(s3, job, upstream_runs)
            record.warnings.extend(warnings)
        record.fingerprint = current_fingerprint(plan.pipeline.sha256, plan.data_sha256, job.image, None, upstream)
        if earlier is not None:
            present = sizes_under(s3.sizes(job.prefix + "/"), job.prefix)
            why = reuse_refusal(earlier, plan.first, plan.last, job.array_index, record.fingerprint, present)
            if why is None:
                resumed_record(earlier, record)
                record.run_id = job.run_id
                record.finished_at = utc_now()
                record.timings["total"] = round(time.monotonic() - started, 3)
                check_lease(s3, job)
                s3.put_json(record_key, record.to_dict())
                print(f"cpb_worker: {record.warnings[0]}", file=sys.stderr)
                print(f"cpb_worker: succeeded: image sets {record.first}-{record.last} resumed from run "
                      f"{record.resumed_from}, {len(record.files)} files, {record.timings['total']} s", file=sys.stderr)
                return 0
            print(f"cpb_worker: not reusing the results of run {earlier.get('run_id')}: {why}", file=sys.stderr)
            retire_record(s3, job.prefix, earlier)
            earlier = None
        t0 = time.monotonic()
        input_dir, data_file = stage_images(job, stager, plan, work, listing)
        record.timings["stage"] = round(time.monotonic() - t0, 3)
        run_plan(plan, input_dir, out_dir, record, env, data_file=data_file)
        record.fingerprint["cellprofiler_version"] = record.cellprofiler_version
        t0 = time.monotonic()
        upload_outputs(s3, job.prefix, out_dir, record)
        record.timings["upload"] = round(time.monotonic() - t0, 3)
        record.status = "succeeded"
        record.finished_at = utc_now()
        record.timings["total"] = round(time.monotonic() - started, 3)
        if job.after:
            check_upstream_unchanged(s3, job, upstream_runs, record.fingerprint.get("upstream"))
        check_lease(s3, job)  # right before the record: a run replaced meanwhile must not claim the output
        s3.put_json(record_key, record.to_dict())  # LAST: vouches for every file above
        s3.delete_keys([f"{job.prefix}/{PENDING_KEY}"])
        for warning in record.warnings:
            print(f"cpb_worker: warning: {warning}", file=sys.stderr)
        print(f"cpb_worker: succeeded: image sets {record.first}-{record.last}, {len(record.files)} files, "
              f"{record.processes} process(es), {record.timings['total']} s", file=sys.stderr)
        return 0
    except Superseded as error:
        print(f"cpb_worker: superseded: {error.reason}", file=sys.stderr)
        return error.exit_code
    except WorkerError as error:
        fail(record, error)
        record.finished_at = utc_now()
        record.timings["total"] = round(time.monotonic() - started, 3)
        _print_failure_log(out_dir)
        try:
            if earlier is not None:  # failed before deciding about reuse: the old run's files must go too
                retire_record(s3, job.prefix, earlier)
            s3.put_json(record_key, record.to_dict())  # says failed: consumers see why
        except WorkerError:
            pass  # S3 is what failed; the log line below is all we can leave
        print(f"cpb_worker: failed: {error.reason}", file=sys.stderr)
        return error.exit_code
    finally:
        shutil.rmtree(work, ignore_errors=True)
