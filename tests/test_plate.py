"""`cpb plate`: one command per plate, the chain as one list message, and resume that skips only
what matches (issue 13).

Everything on the client side is real: the command through click, moto's S3 and SQS. The Lambda
and the worker are being rebuilt in parallel, so what they would leave in the bucket after a run
is crafted exactly as docs/CONTRACTS.md defines it: the lease (run id of the message identity
`<client_token>#<entry>`), and run records whose `fingerprint` is computed with the worker's own
`cpb_worker.fingerprint` over the data file the Lambda was sent (read back from the bucket).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import pytest
from click.testing import CliRunner

from cpb.cli import cli
from cpb_worker.datafile import read_data_file
from cpb_worker.fingerprint import data_rows_sha256, make, upstream_sha256
from test_cli import BUCKET, aws, lambda_parse, put, queued  # noqa: F401 - `aws` is the moto fixture
from test_cli_runs import batch_job, run_id_for
from test_loaddata import phenix

DATA = Path(__file__).resolve().parent / "data"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/cpb-worker@sha256:" + "ab" * 32


@pytest.fixture
def plate(aws, tmp_path, monkeypatch):
    """A 6-site Phenix plate folder (3 wells x 2 fields, channels 1 and 2), the two pipelines, the
    stack's image known to the client."""
    monkeypatch.setenv("CPB_IMAGE", IMAGE)
    import cpb.submit  # the Lambda's schema takes client_token (docs/CONTRACTS.md); this checkout's may predate it
    monkeypatch.setattr(cpb.submit, "accepts_token", lambda: True)
    images = phenix(tmp_path / "P1")
    illum, analysis = tmp_path / "illum.cppipe", tmp_path / "analysis.cppipe"
    illum.write_text((DATA / "plate_illum.cppipe").read_text())
    analysis.write_text((DATA / "plate_analysis.cppipe").read_text())
    return {"images": images, "illum": illum, "analysis": analysis, "tmp": tmp_path}


def cpb_plate(plate, *extra: str):
    return CliRunner().invoke(cli, ["plate", str(plate["images"]), "--illum-pipeline", str(plate["illum"]),
                                    "--analysis-pipeline", str(plate["analysis"]), "--pattern", "phenix",
                                    "--channel", "1=DNA", "--channel", "2=ER", "--plate", "P1", *extra])


def keys(aws, prefix: str = "") -> dict[str, str]:
    found = {}
    for page in aws["s3"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        found.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return found


def text(aws, key: str) -> str:
    return aws["s3"].get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


def file_entry(key: str, body: bytes) -> dict:
    return {"key": key, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def worker_ran(aws, tmp_path: Path, entry: dict, identity: str, fail_parts: tuple = (), image: str = IMAGE,
               upstream: Optional[list] = None) -> list[dict]:
    """What the Lambda and a succeeded worker leave for one message entry (docs/CONTRACTS.md): the lease,
    and per part a run record whose fingerprint is the worker's, with one listed result file."""
    output, run_id = entry["output"], run_id_for(identity)
    local = tmp_path / f"data-{run_id}.csv"
    local.write_text(text(aws, entry["data_file"]))
    data = read_data_file(local)
    pipeline_sha = hashlib.sha256(text(aws, entry["pipeline"]).encode()).hexdigest()
    per_job = entry.get("image_sets_per_job")
    total = len(data.rows)
    size = -(-total // per_job) if per_job and -(-total // per_job) >= 2 else None
    ranges = [(i * per_job + 1, min((i + 1) * per_job, total)) for i in range(size)] if size else [(1, total)]
    put(aws, f"{output}/_cpb/lease.json", json.dumps({
        "run_id": run_id, "message_id": identity, "state": "submitted", "jobs": [], "array_size": size,
        "image_set_count": total, "image_sets_per_job": per_job, "after": [entry["after"]] if entry.get("after") else [],
        "retries": [], "created_at": "2020-01-01T00:00:00+00:00"}))
    records = []
    for index, (first, last) in enumerate(ranges):
        prefix = output if size is None else f"{output}/part-{index:05d}"
        index_value = None if size is None else index
        body = ("ImageNumber\n" + "".join(f"{n}\n" for n in range(first, last + 1))).encode()
        files = {"Image.csv": body}
        if entry["output"].endswith("/illum"):
            files.update({"IllumDNA.npy": b"npy-dna", "IllumER.npy": b"npy-er"})
        for key, content in files.items():
            put(aws, f"{prefix}/{key}", content)
        up = upstream_sha256(upstream) if upstream is not None else None
        record = {"status": "failed" if index in fail_parts else "succeeded", "first": first, "last": last,
                  "image_set_count": last - first + 1, "array_index": index_value, "run_id": run_id,
                  "files": [file_entry(k, v) for k, v in files.items()], "pipeline_sha256": pipeline_sha,
                  "fingerprint": make(pipeline_sha, data_rows_sha256(data.header, data.rows[first - 1:last]), image,
                                      "4.2.8.1", up)}
        if index in fail_parts:
            record["reason"] = "CellProfiler exited 1"
        put(aws, f"{prefix}/_cpb/run.json", json.dumps(record))
        records.append(record)
    return records


def sent_entries(aws) -> tuple[list[dict], list[str]]:
    bodies = queued(aws)
    assert len(bodies) == 1, f"{len(bodies)} messages sent, expected one list message"
    entries = json.loads(bodies[0])
    assert isinstance(entries, list)
    lambda_parse(bodies[0])  # the Lambda's schema accepts it
    return entries, bodies


def first_run(aws, plate) -> list[dict]:
    """cpb plate, then the Lambda and workers succeed on both steps."""
    result = cpb_plate(plate)
    assert result.exit_code == 0, result.output
    entries, _ = sent_entries(aws)
    token = entries[0]["client_token"]
    illum = worker_ran(aws, plate["tmp"], entries[0], f"{token}#0")
    worker_ran(aws, plate["tmp"], entries[1], f"{token}#1", upstream=illum)
    return entries


# ------------------------------------------------------------------------- the plan and the chain

def test_dry_run_prints_the_plan_and_changes_nothing(plate, aws):
    result = cpb_plate(plate, "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"plate P1: 6 image sets in 3 well(s), channels DNA, ER; images s3://{BUCKET}/plates/P1/images/" in lines
    assert (f"  1. illum     s3://{BUCKET}/plates/P1/illum/  illum.cppipe, 1 job: to run: never run") in lines
    assert (f"  2. analysis  s3://{BUCKET}/plates/P1/analysis/  analysis.cppipe, array of 2 jobs x 4 image sets, "
            "after plates/P1/illum: to run: the illumination step runs first and may change the functions this "
            "step reads (the worker reuses the parts whose inputs come out identical)") in lines
    assert "  upload: 15 image/pipeline file(s) missing or changed in the bucket, 2 LoadData CSV(s)" in lines
    assert "dry run: nothing uploaded, nothing sent" in lines
    assert keys(aws) == {} and queued(aws) == []


def test_one_list_message_chains_illumination_then_analysis(plate, aws):
    result = cpb_plate(plate)
    assert result.exit_code == 0, result.output
    entries, _ = sent_entries(aws)
    illum, analysis = entries
    assert illum["output"] == "plates/P1/illum" and illum["unsplittable"] is True and "after" not in illum
    assert "image_sets_per_job" not in illum
    assert analysis["output"] == "plates/P1/analysis" and analysis["after"] == "plates/P1/illum"
    assert analysis["image_sets_per_job"] == 4
    assert illum["client_token"] == analysis["client_token"]  # one message, one token
    assert illum["input"] == analysis["input"] == "plates/P1/images"
    stored = keys(aws)
    assert sum(k.startswith("plates/P1/images/") for k in stored) == 13  # 12 images + Index.idx.xml
    assert illum["pipeline"] in stored and analysis["pipeline"] in stored
    illum_rows = text(aws, illum["data_file"]).splitlines()
    analysis_rows = text(aws, analysis["data_file"]).splitlines()
    assert len(illum_rows) == len(analysis_rows) == 7
    assert "Image_FileName_IllumDNA" not in illum_rows[0]
    assert analysis_rows[1].endswith(f"IllumDNA.npy,s3://{BUCKET}/plates/P1/illum,IllumER.npy,s3://{BUCKET}/plates/P1/illum")
    token = illum["client_token"]
    assert f"results: s3://{BUCKET}/plates/P1/illum/  (run {run_id_for(token + '#0')[:8]})" in result.output
    assert f"results: s3://{BUCKET}/plates/P1/analysis/  (run {run_id_for(token + '#1')[:8]})" in result.output


def test_the_follow_up_carries_the_stack_flags_the_plate_was_sent_with(plate, aws):
    """New-user review: `cpb plate --stack local ...` printed `follow with: cpb status plates/CP1/illum
    plates/CP1/analysis`, which pasted as is found no bucket."""
    result = cpb_plate(plate, "--bucket", BUCKET)
    assert result.exit_code == 0, result.output
    assert f"follow with: cpb status --bucket {BUCKET} plates/P1/illum plates/P1/analysis" in result.output


# ------------------------------------------------------------------------- resume

def test_a_second_identical_plate_runs_nothing_and_says_so(plate, aws):
    first_run(aws, plate)
    before = keys(aws)
    again = cpb_plate(plate)
    assert again.exit_code == 0, again.output
    assert queued(aws) == [] and keys(aws) == before  # nothing sent, nothing uploaded
    illum_run = json.loads(text(aws, "plates/P1/illum/_cpb/lease.json"))["run_id"]
    assert f"1. illum     s3://{BUCKET}/plates/P1/illum/  illum.cppipe, 1 job: up to date: same pipeline, data " \
           f"rows and image as run {illum_run[:8]}" in again.output
    assert "nothing to run: every step is up to date; nothing uploaded, nothing sent" in again.output
    status = CliRunner().invoke(cli, ["status", "--no-dlq"])
    assert status.exit_code == 0, status.output
    assert f"cpb plate sent nothing here: up to date: same pipeline, data rows and image as run {illum_run[:8]}" \
        in status.output


def test_after_one_failed_part_only_the_analysis_is_sent_and_the_worker_reuses_the_rest(plate, aws):
    assert cpb_plate(plate).exit_code == 0
    entries, _ = sent_entries(aws)
    token = entries[0]["client_token"]
    illum = worker_ran(aws, plate["tmp"], entries[0], f"{token}#0")
    worker_ran(aws, plate["tmp"], entries[1], f"{token}#1", fail_parts=(1,), upstream=illum)
    again = cpb_plate(plate)
    assert again.exit_code == 0, again.output
    assert "1. illum" in again.output and "up to date" in again.output.split("1. illum")[1].splitlines()[0]
    assert ("to run: 1 of 2 part(s) (part-00001: failed); the other 1 are up to date and the worker reuses them"
            in again.output)
    (analysis,), _ = sent_entries(aws)
    assert analysis["output"] == "plates/P1/analysis" and analysis["after"] == "plates/P1/illum"
    assert "resume" not in analysis  # resume on: the worker reuses part-00000
    status = CliRunner().invoke(cli, ["status", "--no-dlq"])  # both steps, in chain order
    assert status.output.index("plates/P1/illum/:") < status.output.index("plates/P1/analysis/:")
    assert analysis["data_file"] == entries[1]["data_file"]  # the same rows, the same (content-addressed) CSV
    assert "not sent: plates/P1/illum: up to date" in again.output


def test_what_changed_decides_what_runs(plate, aws):
    first_run(aws, plate)
    plate["analysis"].write_text(plate["analysis"].read_text().replace("Typical diameter of objects, in pixel units "
                                                                       "(Min,Max):6,40", "Typical diameter of objects, "
                                                                       "in pixel units (Min,Max):8,40"))
    changed = cpb_plate(plate, "--dry-run")
    assert "2. analysis" in changed.output
    assert "part-00000, part-00001: pipeline changed" in changed.output
    assert "illum.cppipe, 1 job: up to date" in changed.output
    plate["analysis"].write_text((DATA / "plate_analysis.cppipe").read_text())
    plate["illum"].write_text(plate["illum"].read_text().replace("Smoothing method:Fit Polynomial",
                                                                 "Smoothing method:Median Filter"))
    both = cpb_plate(plate, "--dry-run")
    assert "illum.cppipe, 1 job: to run: pipeline changed" in both.output
    assert "to run: the illumination step runs first" in both.output
    plate["illum"].write_text((DATA / "plate_illum.cppipe").read_text())
    image = plate["images"] / "r01c02f01p01-ch2sk1fk1fl1.tiff"
    image.write_bytes(image.read_bytes() + b"re-exported")  # same name, other pixels: rows alone would not see it
    rerun = cpb_plate(plate)
    assert rerun.exit_code == 0, rerun.output
    assert "1 image(s) changed since they were uploaded (e.g. r01c02f01p01-ch2sk1fk1fl1.tiff)" in rerun.output
    entries, _ = sent_entries(aws)
    assert [e["output"] for e in entries] == ["plates/P1/illum", "plates/P1/analysis"]
    assert all(e["resume"] is False for e in entries)  # the workers must not reuse parts either


def test_another_image_than_the_records_means_not_up_to_date(plate, aws, monkeypatch):
    first_run(aws, plate)
    monkeypatch.setenv("CPB_IMAGE", IMAGE.replace("ab", "cd"))
    result = cpb_plate(plate, "--dry-run")
    assert "1 job: to run: container image changed" in result.output and "nothing to run" not in result.output


def test_a_plate_whose_previous_run_still_runs_is_not_sent(plate, aws):
    entries = first_run(aws, plate)
    job = batch_job(aws, "plates/P1/analysis", None, {"": ("RUNNING", None, None)})
    lease = json.loads(text(aws, "plates/P1/analysis/_cpb/lease.json"))
    lease["jobs"] = [{"job_id": job, "job_name": "P1-analysis"}]
    put(aws, "plates/P1/analysis/_cpb/lease.json", json.dumps(lease))
    plate["analysis"].write_text(plate["analysis"].read_text().replace("(Min,Max):6,40", "(Min,Max):7,40"))
    refused = cpb_plate(plate)
    assert refused.exit_code == 1
    assert f"plates/P1/analysis: run {lease['run_id'][:8]} is still RUNNING (job {job})" in refused.output
    assert queued(aws) == [] and entries


# ------------------------------------------------------------------------- refusals before anything is sent

def test_an_illumination_pipeline_that_saves_no_function_for_a_channel_is_refused(plate, aws):
    plate["illum"].write_text(plate["illum"].read_text().replace("Enter single file name:IllumER",
                                                                 "Enter single file name:IllumEndo"))
    refused = cpb_plate(plate, "--dry-run")
    assert refused.exit_code == 1
    assert ("illumination pipeline illum.cppipe does not save IllumER.npy (a SaveImages of IllumER with a single "
            "file name IllumER, format npy, into the Default Output Folder)") in refused.output


def test_swapped_pipelines_are_named_as_swapped_not_sent_to_an_option_cpb_plate_lacks(plate, aws):
    """New-user review: --illum-pipeline cellpainting.cppipe --analysis-pipeline illum.cppipe said
    `pass --illum <illumination output> so the CSV loads it`, an option cpb plate does not have."""
    swapped = CliRunner().invoke(cli, ["plate", str(plate["images"]), "--illum-pipeline", str(plate["analysis"]),
                                       "--analysis-pipeline", str(plate["illum"]), "--pattern", "phenix",
                                       "--channel", "1=DNA", "--channel", "2=ER", "--plate", "P1", "--dry-run"])
    assert swapped.exit_code == 1
    assert swapped.output.splitlines()[-1] == (
        "cpb: the pipelines look swapped: --illum-pipeline analysis.cppipe reads the illumination functions IllumDNA, "
        "IllumER as an analysis pipeline does; --analysis-pipeline illum.cppipe reads none and saves IllumDNA.npy, "
        "IllumER.npy as an illumination pipeline does: pass --illum-pipeline illum.cppipe --analysis-pipeline "
        "analysis.cppipe (the illumination pipeline makes the functions, the analysis applies them)")
    assert "--illum " not in swapped.output and queued(aws) == []


def test_a_folder_with_two_plates_is_refused(aws, tmp_path, monkeypatch):
    from test_loaddata import imagexpress
    folder = imagexpress(tmp_path / "two", plate="PA")
    imagexpress(tmp_path / "two" / "b", plate="PB")
    result = CliRunner().invoke(cli, ["plate", str(folder), "--illum-pipeline", str(DATA / "plate_illum.cppipe"),
                                      "--analysis-pipeline", str(DATA / "plate_analysis.cppipe"), "--pattern",
                                      "imagexpress", "--channel", "1=DNA", "--channel", "2=ER", "--dry-run"])
    assert result.exit_code == 1 and "holds 2 plates (PA, PB): run cpb plate once per plate folder" in result.output
