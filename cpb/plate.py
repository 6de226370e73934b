"""`cpb plate`: one plate, illumination then analysis, chained on Batch, resuming what is up to date.

From a local plate folder, an illumination pipeline and an analysis pipeline:

1. builds the two LoadData CSVs (cpb.loaddata): the illumination step reads every image set of
   the plate; the analysis reads the same image sets plus the illumination functions
   (`Image_*_Illum<Name>` = `Illum<Name>.npy` in `s3://<bucket>/<root>/<plate>/illum`);
2. decides, per step, what must run (cpb.resume): a step whose current succeeded records match
   what would run now (pipeline sha256, data rows by content, image, upstream) is not sent, and
   says so; images that changed in the folder since they were uploaded rerun the steps that read
   them (`resume: false`); a rerun illumination reruns the analysis (its upstream changes);
3. prints the plan (and stops there with `--dry-run`), uploads what is missing (unchanged files are
   skipped), and sends the chain as ONE list message: [illumination (one job), analysis (array
   job, `after` the illumination output)], or only the steps that must run.

Default layout in the bucket (docs/CLI.md), per plate, under `--root` (default `plates`):

    <root>/<plate>/images/...                 the plate's images, as in the folder
    <root>/<plate>/loaddata/<step>-<sha>.csv  the LoadData CSVs (content-addressed: a running job's
                                              CSV is never replaced under it)
    <root>/<plate>/illum/                     Illum<Name>.npy per channel + the step's tables
    <root>/<plate>/analysis/                  per-site tables (part-NNNNN/ per array child)
    pipelines/<sha256[:12]>/<name>.cppipe     the pipelines (content-addressed, as cpb submit does)
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cpb import loaddata as loaddata_mod
from cpb import receipts
from cpb import submit as submit_mod
from cpb import upload as upload_mod
from cpb.lease import read_lease
from cpb.progress import count_bar, say
from cpb.resume import StepCheck, check_step, part_ranges, sha256_file, upstream_of
from cpb.runrecords import short
from cpb.status import ACTIVE, output_status
from cpb.urls import s3_url


class PlateError(Exception):
    """The plate cannot be run as asked; the message says what to fix."""


@dataclass
class PlateSettings:
    images: Path
    illum_pipeline: Path
    analysis_pipeline: Path
    preset: str
    channels: tuple[str, ...]
    plate: Optional[str] = None
    root: str = "plates"
    image_sets_per_job: int = 4
    memory: Optional[int] = None
    vcpus: Optional[int] = None
    resume: bool = True


@dataclass
class Layout:
    """Where one plate's inputs and outputs go in the bucket."""

    root: str
    plate: str

    @property
    def base(self) -> str:
        return f"{self.root}/{self.plate}" if self.root else self.plate

    @property
    def images(self) -> str:
        return f"{self.base}/images"

    @property
    def illum(self) -> str:
        return f"{self.base}/illum"

    @property
    def analysis(self) -> str:
        return f"{self.base}/analysis"

    def data_file(self, step: str, text: str) -> str:
        import hashlib
        return f"{self.base}/loaddata/{step}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.csv"


@dataclass
class Step:
    """One step of the chain: its message entry, its LoadData table, and what resume found."""

    name: str
    entry: dict
    check: StepCheck
    pipeline: Path
    table: loaddata_mod.LoadDataTable
    parts: int

    @property
    def output(self) -> str:
        return self.entry["output"]

    @property
    def data_text(self) -> str:
        return self.table.text()

    def describe(self, bucket: str, number: int) -> str:
        shape = "1 job" if self.parts == 1 else \
            f"array of {self.parts} jobs x {self.entry.get('image_sets_per_job')} image sets"
        after = f", after {self.entry['after']}" if self.entry.get("after") else ""
        return (f"  {number}. {self.name:<9} {s3_url(bucket, self.output)}  {self.pipeline.name}, {shape}{after}: "
                f"{self.check.summary()}")


@dataclass
class Plan:
    """What `cpb plate` will do: the steps, and the files the bucket lacks (or holds in another version)."""

    layout: Layout
    steps: list[Step]
    uploads: list[tuple[Path, str]]
    notes: list[str] = field(default_factory=list)

    @property
    def to_send(self) -> list[Step]:
        return [s for s in self.steps if not s.check.up_to_date]

    def lines(self, bucket: str) -> list[str]:
        table = self.steps[0].table
        wells = len({(r[0], r[1]) for r in table.rows})
        out = [f"plate {self.layout.plate}: {len(table.rows)} image sets in {wells} well(s), channels "
               f"{', '.join(table.channels)}; images {s3_url(bucket, self.layout.images)}"]
        out += [step.describe(bucket, number) for number, step in enumerate(self.steps, start=1)]
        if self.to_send:
            csvs = len(self.to_send)
            out.append(f"  upload: {len(self.uploads)} image/pipeline file(s) missing or changed in the bucket, "
                       f"{csvs} LoadData CSV(s)" if self.uploads else
                       f"  upload: {csvs} LoadData CSV(s); every image and pipeline is in the bucket unchanged")
        out += [f"note: {note}" for note in self.notes]
        return out


@dataclass
class PlateOutcome:
    lines: list[str] = field(default_factory=list)
    plan: Optional[Plan] = None
    sent: list[submit_mod.Sent] = field(default_factory=list)
    uploaded: int = 0


def _worker_rows(csv_text: str, pipeline: Path) -> tuple[list[str], list[list[str]]]:
    """The header and image-set rows exactly as the worker reads them (its parser, LoadData's row range)."""
    from cpb_worker.datafile import loaddata_row_range, read_data_file
    from cpb_worker.errors import WorkerError
    from cpb_worker.pipeline import load_pipeline
    with tempfile.TemporaryDirectory(prefix="cpb-plate-") as tmp:
        path = Path(tmp) / "load_data.csv"
        path.write_text(csv_text, encoding="utf-8")
        try:
            data = read_data_file(path)
            parsed = load_pipeline(pipeline)
        except WorkerError as error:
            raise PlateError(error.reason) from None
    modules = parsed.enabled("LoadData")
    if not modules:
        raise PlateError(f"pipeline {pipeline.name} has no LoadData module, so it would not read the plate's "
                         "LoadData CSV: load the images with LoadData (replacing Images/Metadata/NamesAndTypes)")
    skipped, count = loaddata_row_range(data.count, dict(modules[0].settings))
    return data.header, data.rows[skipped:skipped + count]


def check_illum_saves(pipeline: Path, names: list[str]) -> None:
    """The illumination pipeline must save one `Illum<Name>.npy` per channel into its output folder
    (what the analysis CSV's columns name): a SaveImages of each, single file name, npy format."""
    saved = _saved_npy(pipeline)
    missing = [f"Illum{n}" for n in names if f"Illum{n}" not in saved]
    if missing:
        raise PlateError(f"illumination pipeline {pipeline.name} does not save {missing[0]}.npy (a SaveImages of "
                         f"{missing[0]} with a single file name {missing[0]}, format npy, into the Default Output "
                         "Folder): the analysis would find no illumination function for it")


def _saved_npy(pipeline: Path) -> set[str]:
    """The images a pipeline saves as `<name>.npy` with a single file name (how illumination functions are saved)."""
    from cpb_worker.pipeline import load_pipeline
    saved = set()
    for module in load_pipeline(pipeline).enabled("SaveImages"):
        name = (module.get("Enter single file name") or "").strip()
        if (module.get("Select method for constructing file names") or "") == "Single name" and name and \
                (module.get("Saved file format") or "").lower() == "npy":
            saved.add(name)
    return saved


def check_not_swapped(illum_pipeline: Path, analysis_pipeline: Path, names: list[str]) -> None:
    """An --illum-pipeline that reads illumination functions (as an analysis does), or an
    --analysis-pipeline that reads none and saves them (as an illumination pipeline does), is
    refused as the two pipelines swapped, before cpb loaddata's check would ask for --illum (an
    option cpb plate does not have: it adds the functions to the analysis CSV itself)."""
    illum_reads = loaddata_mod.illum_not_loaded(loaddata_mod.pipeline_image_names(illum_pipeline), names)
    analysis_expects = loaddata_mod.pipeline_image_names(analysis_pipeline)
    analysis_reads = loaddata_mod.illum_not_loaded(analysis_expects, names)
    analysis_saves = sorted(n for n in _saved_npy(analysis_pipeline) if n.startswith("Illum") and n[5:] in names)
    if not illum_reads and (analysis_reads or not analysis_saves):
        return
    why = []
    if illum_reads:
        why.append(f"--illum-pipeline {illum_pipeline.name} reads the illumination function"
                   f"{'s' * (len(illum_reads) > 1)} {', '.join(illum_reads)} as an analysis pipeline does")
    if analysis_saves and not analysis_reads:
        why.append(f"--analysis-pipeline {analysis_pipeline.name} reads none and saves "
                   f"{', '.join(n + '.npy' for n in analysis_saves)} as an illumination pipeline does")
    raise PlateError("the pipelines look swapped: " + "; ".join(why) + f": pass --illum-pipeline "
                     f"{analysis_pipeline.name} --analysis-pipeline {illum_pipeline.name} (the illumination "
                     "pipeline makes the functions, the analysis applies them)")


def plan_plate(settings: PlateSettings, stack: Any, clients: Any) -> Plan:
    """Everything but the upload and the send: the tables, the steps, what resume skips, what to upload."""
    for path, flag in ((settings.illum_pipeline, "--illum-pipeline"), (settings.analysis_pipeline, "--analysis-pipeline")):
        submit_mod.check_pipeline_file(path, flag)
    source = loaddata_mod.local_source(settings.images)
    pattern = loaddata_mod.pattern_for(settings.preset)
    channels = loaddata_mod.parse_channels(settings.channels)
    check_not_swapped(settings.illum_pipeline, settings.analysis_pipeline, [n for n in channels.values() if n])
    illum_table = loaddata_mod.build(source, pattern, channels, plate=settings.plate, pipeline=settings.illum_pipeline)
    if len(illum_table.plates) != 1:
        raise PlateError(f"{settings.images} holds {len(illum_table.plates)} plates ({', '.join(illum_table.plates)}): "
                         "run cpb plate once per plate folder")
    layout = Layout(settings.root.strip("/"), illum_table.plates[0])
    analysis_table = loaddata_mod.build(source, pattern, channels, plate=settings.plate,
                                        illum=f"s3://{stack.bucket}/{layout.illum}", pipeline=settings.analysis_pipeline)
    check_illum_saves(settings.illum_pipeline, illum_table.channels)

    pipeline_keys = {settings.illum_pipeline: submit_mod.pipeline_key(settings.illum_pipeline),
                     settings.analysis_pipeline: submit_mod.pipeline_key(settings.analysis_pipeline)}
    pairs = [(settings.images / rel, f"{layout.images}/{rel}") for rel in source.files]
    pairs += list(pipeline_keys.items())
    with count_bar(len(pairs), f"compare {len(pairs)} files with s3://{stack.bucket}/{layout.base}/") as advance:
        answers = upload_mod.compare_files(clients.s3, stack.bucket, pairs, progress=advance)
    uploads = [pair for pair, answer in zip(pairs, answers) if answer != "same"]
    changed = [key for (_, key), answer in zip(pairs, answers)
               if answer == "changed" and key.startswith(layout.images + "/")]

    notes = list(dict.fromkeys(illum_table.notes + analysis_table.notes))
    image = stack.image_uri
    if image is None:
        notes.append("the stack's image (stack output imageUri / $CPB_IMAGE) is unknown here, so no step can be "
                     "found up to date by its image; the workers still reuse the parts that match")
    common = {k: v for k, v in (("job_memory", settings.memory), ("job_vcpu", settings.vcpus)) if v is not None}
    steps: list[Step] = []
    for name, table, pipeline in (("illum", illum_table, settings.illum_pipeline),
                                  ("analysis", analysis_table, settings.analysis_pipeline)):
        text = table.text()
        header, rows = _worker_rows(text, pipeline)
        output = layout.illum if name == "illum" else layout.analysis
        entry: dict = {"pipeline": pipeline_keys[pipeline], "input": layout.images, "output": output,
                       "data_file": layout.data_file(name, text), "job_name": f"{layout.plate}-{name}", **common}
        per_job = None
        upstream = None
        if name == "illum":
            entry["unsplittable"] = True  # one process over the whole plate (CorrectIlluminationCalculate: All)
        else:
            per_job = settings.image_sets_per_job
            entry["image_sets_per_job"] = per_job
            entry["after"] = layout.illum
            if steps[0].check.up_to_date:
                upstream = upstream_of(clients.s3, stack.bucket, [layout.illum])
        check = check_step(clients.s3, stack.bucket, output, sha256_file(pipeline), header, rows, per_job, image, upstream)
        if not settings.resume:
            check.forced, check.resume = "--no-resume: every part runs again", False
        elif changed:
            check.forced, check.resume = (f"{len(changed)} image(s) changed since they were uploaded (e.g. "
                                          f"{changed[0].rsplit('/', 1)[-1]}): every part runs again"), False
        elif name == "analysis" and not steps[0].check.up_to_date:
            check.forced = ("the illumination step runs first and may change the functions this step reads (the "
                            "worker reuses the parts whose inputs come out identical)")
        if not check.resume:
            entry["resume"] = False
        size, _ = part_ranges(len(rows), per_job)
        steps.append(Step(name, entry, check, pipeline, table, size or 1))
    return Plan(layout, steps, uploads, notes)


def _busy(clients: Any, bucket: str, output: str) -> Optional[str]:
    """A run of this output that still has jobs in Batch (a message now would be refused: output in use)."""
    state = output_status(clients.s3, clients.batch, bucket, output, follow_after=False)
    active = [j for j in state.jobs if j.status in ACTIVE]
    if active:
        return f"{output}: run {short(state.run.run_id)} is still {active[0].status} (job {active[0].job_id})"
    return None


def run_plate(settings: PlateSettings, stack: Any, limits: Any, clients: Any, dry_run: bool = False) -> PlateOutcome:
    """Plan, print, upload and send one plate (see the module docstring)."""
    plan = plan_plate(settings, stack, clients)
    outcome = PlateOutcome(plan=plan)
    lines = plan.lines(stack.bucket)
    to_send = plan.to_send
    if not to_send:
        outcome.lines = lines + ["nothing to run: every step is up to date; nothing uploaded, nothing sent"]
        if not dry_run:
            receipts.record(stack.bucket, [], skipped=[(s.output, s.check.summary()) for s in plan.steps])
        return outcome
    if dry_run:
        outcome.lines = lines + ["dry run: nothing uploaded, nothing sent"]
        return outcome
    for line in lines:  # the plan first: the upload can take a while
        say(line)
    for step in to_send:
        busy = _busy(clients, stack.bucket, step.output)
        if busy:
            raise PlateError(f"{busy}: wait for it to finish ({stack.command('status', step.output)}) before sending the plate again")
    entries = submit_mod.prepare(json.dumps([s.entry for s in to_send]), limits)
    with tempfile.TemporaryDirectory(prefix="cpb-plate-") as tmp:
        pairs = list(plan.uploads)
        for step in to_send:
            path = Path(tmp) / f"{step.name}.csv"
            path.write_text(step.data_text, encoding="utf-8")
            pairs.append((path, step.entry["data_file"]))
        report = submit_mod.upload_pairs(clients.s3, stack.bucket, pairs)
        outcome.uploaded = len(report.uploaded)
    submit_mod.check_in_bucket(clients.s3, entries, limits)
    before = {s.output: (read_lease(clients.s3, stack.bucket, s.output)[0] or {}).get("run_id") for s in to_send}
    sent = submit_mod.send(clients.sqs, stack.queue_url, [submit_mod.Message(entries, as_list=True)])
    if sent.failed:
        raise PlateError(f"SQS did not accept the plate's message ({sent.failed[0][1]}); nothing was sent: run "
                         "cpb plate again")
    outcome.sent = sent.sent
    for item in sent.sent:
        for output, _identity, run_id in item.runs():
            outcome.lines.append(f"sent {item.message_id}  results: {s3_url(stack.bucket, output)}  (run {short(run_id)})")
    skipped = [(s.output, s.check.summary()) for s in plan.steps if s.check.up_to_date]
    for output, why in skipped:
        outcome.lines.append(f"not sent: {output}: {why}")
    receipts.record(stack.bucket, [(s.message_id, o, i) for s in sent.sent for o, i, _ in s.runs()], skipped=skipped,
                    order=[s.output for s in plan.steps], leases=before)
    outcome.lines.append(f"follow with: {stack.command('status', *(s.output for s in plan.steps))}")
    return outcome
