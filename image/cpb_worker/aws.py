"""AWS mode: one Batch job (or array child) from its environment to a run record.

Order matters for trust: inputs are staged (FSx or S3), CellProfiler runs,
outputs are merged and verified locally, then uploaded; a stale record is
removed before the upload and the new record is written only after every
file is in place. A `_cpb/pending.json` manifest lists what an attempt is
about to upload, so a retry after a kill mid-upload removes the previous
attempt's leftovers instead of mixing them with its own results.
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
from .errors import BadInput, Transient, WorkerError
from .job import JobSpec, Plan, fail, loaddata_base, plan_job, run_plan
from .record import RECORD_KEY, RunRecord, utc_now
from .s3io import S3IO, make_client, safe_key_path

PENDING_KEY = "_cpb/pending.json"
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

        index = integer("AWS_BATCH_JOB_ARRAY_INDEX")
        if index is None:
            index = integer("CPB_ARRAY_INDEX")
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
                   attempt=integer("AWS_BATCH_JOB_ATTEMPT"))


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

    def input_dir(self, prefix: str) -> Path:
        """The folder holding every object under `prefix` (no data file: the folder IS the image list).

        On FSx a folder missing any of S3's objects would silently drop image sets, so then the whole
        prefix is staged from S3 instead.
        """
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


def _base_key(plan: Plan, job: JobEnv) -> str:
    """Key prefix LoadData's relative image paths start from (the input prefix, or a sub-folder)."""
    base = loaddata_base(plan, Path("/@input"), Path("/@output"))
    text = str(base)
    if text.startswith("/@input"):
        return (job.input + text[len("/@input"):]).strip("/")
    raise BadInput("LoadData 'Base image location' must be the Default Input Folder (or a sub-folder) "
                   "when images come from S3")


def stage_inputs(job: JobEnv, stager: Stager, env: Mapping[str, str], work: Path) -> Tuple[Plan, Path, Optional[Path]]:
    """Get pipeline, data file and the images this job needs; return (plan, input dir, data file)."""
    paths = stager.fetch([job.pipeline] + ([job.data_file] if job.data_file else []))
    pipeline_path = paths[0]
    data_path = paths[1] if job.data_file else None
    # No data file: the image sets are whatever the input prefix holds, so all of it is needed.
    input_dir = stager.input_dir(job.input) if data_path is None else stager.local(job.input)
    spec = JobSpec(pipeline=pipeline_path, input_dir=input_dir, data_file=data_path,
                   array_index=job.array_index, sets_per_job=job.sets_per_job,
                   expected_count=job.image_set_count, force_unsplittable=job.unsplittable, env=env)
    plan = plan_job(spec)
    if plan.data is None:
        return plan, input_dir, None
    base_key = _base_key(plan, job)
    data = plan.data
    wanted = [stager.key_for(loc, base_key) for _, _, loc in df.image_locations(data, plan.first, plan.last,
                                                                                    plan.rows_skipped)]
    stager.fetch(list(dict.fromkeys(wanted)))
    # Every location becomes an absolute local path, whatever the CSV said (relative, s3://, /fsx/...).
    (work / "data").mkdir(parents=True, exist_ok=True)
    rewritten = df.rewrite(data, lambda loc: str(stager.local(stager.key_for(loc, base_key))),
                           work / "data" / "load_data.rewritten.csv")
    return plan, input_dir, rewritten


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


def main_aws(env: Dict[str, str]) -> int:
    """Run the job described by `env`; return the process exit code."""
    started = time.monotonic()
    try:
        job = JobEnv.from_env(env)
    except WorkerError as error:
        print(f"cpb_worker: failed: {error.reason}", file=sys.stderr)
        return error.exit_code
    record = RunRecord(started_at=utc_now(), array_index=job.array_index, image=job.image,
                       message_id=job.message_id, job_id=job.job_id, attempt=job.attempt)
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
          + (" (FSx)" if job.fsx_root else " (S3)"), file=sys.stderr)
    try:
        t0 = time.monotonic()
        plan, input_dir, data_file = stage_inputs(job, Stager(job, s3, work / "s3"), env, work)
        record.timings["stage"] = round(time.monotonic() - t0, 3)
        run_plan(plan, input_dir, out_dir, record, env, data_file=data_file)
        t0 = time.monotonic()
        upload_outputs(s3, job.prefix, out_dir, record)
        record.timings["upload"] = round(time.monotonic() - t0, 3)
        record.status = "succeeded"
        record.finished_at = utc_now()
        record.timings["total"] = round(time.monotonic() - started, 3)
        s3.put_json(f"{job.prefix}/{RECORD_KEY}", record.to_dict())  # LAST: vouches for every file above
        s3.delete_keys([f"{job.prefix}/{PENDING_KEY}"])
        print(f"cpb_worker: succeeded: image sets {record.first}-{record.last}, {len(record.files)} files, "
              f"{record.processes} process(es), {record.timings['total']} s", file=sys.stderr)
        return 0
    except WorkerError as error:
        fail(record, error)
        record.finished_at = utc_now()
        record.timings["total"] = round(time.monotonic() - started, 3)
        _print_failure_log(out_dir)
        try:
            s3.put_json(f"{job.prefix}/{RECORD_KEY}", record.to_dict())  # says failed: consumers see why
        except WorkerError:
            pass  # S3 is what failed; the log line below is all we can leave
        print(f"cpb_worker: failed: {error.reason}", file=sys.stderr)
        return error.exit_code
    finally:
        shutil.rmtree(work, ignore_errors=True)
