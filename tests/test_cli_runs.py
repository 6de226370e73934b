"""Reruns and races, client side (issue 11): `cpb results` and `cpb status` take only the current run.

The Lambda and the worker are being rebuilt in parallel, so their outputs are crafted here exactly
as docs/CONTRACTS.md ("Runs, leases, chaining, resume and out-of-memory retries") defines them:
the output lease `<output>/_cpb/lease.json`, the submission records, and run records carrying
`run_id`, `array_index`, `first`/`last`, `files` with sizes and checksums. Everything else is real:
the `cpb` commands through click, against moto.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Optional

import pytest
from click.testing import CliRunner

from cpb.cli import cli
from cpb.local.batch import MotoJobStates
from test_cli import BUCKET, REGION, aws, put  # noqa: F401 - `aws` is the moto fixture



def run_id_for(identity: str, generation: int = 0) -> str:
    """docs/CONTRACTS.md: the first 20 hex digits of sha256("<message identity>:<generation>")."""
    return hashlib.sha256(f"{identity}:{generation}".encode()).hexdigest()[:20]


RUN_A, RUN_B, RUN_C = run_id_for("message-a"), run_id_for("message-b"), run_id_for("message-c")


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def table(rows: list[tuple[int, int]]) -> str:
    return "ImageNumber,Count_Nuclei\n" + "".join(f"{n},{c}\n" for n, c in rows)


def entry(key: str, text: str) -> dict:
    return {"key": key, "size": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def write_record(aws, output: str, run_id: str, index: Optional[int], first: int, last: int, count: int,
                 files: Optional[dict[str, str]] = None, status: str = "succeeded", **extra) -> None:
    """A worker's run record and the files it lists (default: Image.csv numbered globally, Count = 10*n).
    `count` is the run's image sets; the record's own `image_set_count` is its range's, as the worker writes it."""
    prefix = output if index is None else f"{output}/part-{index:05d}"
    files = files if files is not None else {"Image.csv": table([(n, 10 * n) for n in range(first, last + 1)])}
    for key, text in files.items():
        put(aws, f"{prefix}/{key}", text)
    record = {"status": status, "first": first, "last": last, "image_set_count": last - first + 1, "array_index": index,
              "run_id": run_id, "files": [entry(k, t) for k, t in files.items()], "pipeline_sha256": "p" * 64,
              "cellprofiler_version": "4.2.8", "message_id": f"message-of-{run_id}", **extra}
    if status != "succeeded":
        record["reason"] = "CellProfiler exited 1"
    put(aws, f"{prefix}/_cpb/run.json", json.dumps(record))


def write_lease(aws, output: str, run_id: str, array_size: Optional[int], count: int, jobs: list[dict] = (),
                message_id: str = "message-b", state: str = "submitted", **extra) -> dict:
    lease = {"run_id": run_id, "message_id": message_id, "sqs_message_id": "sqs-1", "client_token": None,
             "state": state, "jobs": list(jobs), "array_size": array_size, "image_set_count": count,
             "image_sets_per_job": None if array_size is None else -(-count // array_size), "after": [],
             "depends_on": [], "retries": [], "previous_run_id": None, "lease_until": 0, "owner": "lambda",
             "created_at": "2020-01-01T10:00:00+00:00", "updated_at": "2020-01-01T10:00:00+00:00", **extra}
    put(aws, f"{output}/_cpb/lease.json", json.dumps(lease))
    return lease


def submission(aws, output: str, message_id: str, job_id: Optional[str], array_size: Optional[int], count: int) -> None:
    """The Lambda's submission record (what outputs from before leases are followed by)."""
    put(aws, f"{output}/_cpb/submission-{message_id}.json", json.dumps(
        {"status": "submitted", "message_id": message_id, "job_id": job_id, "array_size": array_size,
         "image_set_count": count}))


def batch_job(aws, output: str, size: Optional[int] = None, states: Optional[dict] = None, name: str = "plate",
              env: Optional[dict] = None) -> str:
    """A job in moto's Batch (moto marks it SUCCEEDED; `states` sets children's states; `env` adds variables)."""
    kwargs = {"arrayProperties": {"size": size}} if size else {}
    variables = [{"name": "CPB_OUTPUT", "value": output}] + [{"name": k, "value": v} for k, v in (env or {}).items()]
    job = aws["batch"].submit_job(jobName=name, jobQueue=aws["job_queue"], jobDefinition=aws["definition"],
                                  containerOverrides={"environment": variables},
                                  tags={"cpb:stack": "test"}, **kwargs)["jobId"]
    for suffix, (status, reason, code) in (states or {}).items():
        MotoJobStates(REGION).set(f"{job}{suffix}", status, reason, code)
    return job


def image_numbers(folder: Path, name: str = "Image.csv", column: str = "ImageNumber") -> list[int]:
    return [int(r[column]) for r in csv.DictReader(open(folder / name, newline=""))]


# ------------------------------------------------------------------------- reruns never mix runs

@pytest.mark.race
def test_split_2_then_split_4_never_duplicates_image_numbers(aws, tmp_path):
    """Run A split 8 image sets in 2 parts; run B (the current one) splits them in 4. While B has only
    written parts 2 and 3, parts 0 and 1 still hold A's records (1-4, 5-8): merging them put image
    sets 5-8 in twice. Now they are refused by name, and B's four parts merge to 1..8 once."""
    write_record(aws, "results/p", RUN_A, 0, 1, 4, 8)
    write_record(aws, "results/p", RUN_A, 1, 5, 8, 8)
    submission(aws, "results/p", "message-a", "job-a", 2, 8)
    write_lease(aws, "results/p", RUN_B, 4, 8, previous_run_id=RUN_A)
    submission(aws, "results/p", "message-b", "job-b", 4, 8)
    write_record(aws, "results/p", RUN_B, 2, 5, 6, 8)
    write_record(aws, "results/p", RUN_B, 3, 7, 8, 8)
    refused = run("results", "results/p", "--to", str(tmp_path / "mixed"))
    assert refused.exit_code == 1, refused.output
    assert f"part-00000: stale: record of run {RUN_A[:8]}, not of the current run {RUN_B[:8]}" in refused.output
    assert "part-00001: stale" in refused.output
    assert not (tmp_path / "mixed" / "Image.csv").exists()
    write_record(aws, "results/p", RUN_B, 0, 1, 2, 8)
    write_record(aws, "results/p", RUN_B, 1, 3, 4, 8)
    done = run("results", "results/p", "--to", str(tmp_path / "b"))
    assert done.exit_code == 0, done.output
    assert image_numbers(tmp_path / "b") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert f"run {RUN_B[:8]}" in done.output


@pytest.mark.race
def test_a_new_submission_not_yet_run_is_not_the_previous_run_called_complete(aws, tmp_path):
    """Run A finished; the Lambda took message B (lease: run B, its array job not started). Every record
    is still A's: results and status must not call A's results B's."""
    for index in range(2):
        write_record(aws, "results/n", RUN_A, index, 4 * index + 1, 4 * index + 4, 8)
    submission(aws, "results/n", "message-a", "job-a", 2, 8)
    job = batch_job(aws, "results/n", 2, {":0": ("RUNNABLE", None, None), ":1": ("RUNNABLE", None, None)})
    write_lease(aws, "results/n", RUN_B, 2, 8, jobs=[{"job_id": job, "job_name": "plate", "array_size": 2,
                                                       "array_offset": 0, "memory_mib": 4096}])
    submission(aws, "results/n", "message-b", job, 2, 8)
    refused = run("results", "results/n", "--to", str(tmp_path / "r"))
    assert refused.exit_code == 1
    assert f"not complete (run {RUN_B[:8]})" in refused.output and f"record of run {RUN_A[:8]}" in refused.output
    status = run("status", "results/n", "--no-dlq")
    assert status.exit_code == 3, status.output
    assert "results/n/: RUNNING" in status.output and f"run {RUN_B[:8]} of message message-b" in status.output


@pytest.mark.race
def test_a_message_sent_from_here_but_not_taken_is_waited_for(aws, tmp_path):
    """Between `cpb submit` and the Lambda taking the message the lease still names the old run:
    cpb (which keeps a receipt of what it sent) says WAITING and refuses the old results unless asked
    for that run by id."""
    for index in range(2):
        write_record(aws, "results/q", RUN_A, index, 4 * index + 1, 4 * index + 4, 8)
    write_lease(aws, "results/q", RUN_A, 2, 8, message_id="message-a")
    put(aws, "pipelines/nuclei.cppipe", (Path(__file__).parent.parent / "cpb/pipelines/nuclei.cppipe").read_text())
    put(aws, "plates/q/a.tif", b"II*\x00")
    sent = run("submit", "--pipeline", "pipelines/nuclei.cppipe", "--input", "plates/q", "--output", "results/q")
    assert sent.exit_code == 0, sent.output
    assert "already holds results" in sent.output  # the warning stays
    status = run("status", "results/q", "--no-dlq")
    assert status.exit_code == 3 and "results/q/: WAITING" in status.output
    assert "has not been taken by the Lambda yet" in status.output
    refused = run("results", "results/q", "--to", str(tmp_path / "q"))
    assert refused.exit_code == 1 and "has not been taken by the Lambda yet" in refused.output
    assert f"--run {RUN_A[:8]}" in refused.output
    taken = run("results", "results/q", "--to", str(tmp_path / "q"), "--run", RUN_A[:8])
    assert taken.exit_code == 0, taken.output and image_numbers(tmp_path / "q") == list(range(1, 9))


@pytest.mark.race
def test_a_half_done_new_run_is_refused_never_mixed(aws, tmp_path):
    """Run B has written parts 0 and 1 (image sets 1-4); parts 2 and 3 still hold run A's records of
    the same split: the rows would be 1-4 new and 5-8 old."""
    for index in range(4):
        write_record(aws, "results/h", RUN_A, index, 2 * index + 1, 2 * index + 2, 8)
    submission(aws, "results/h", "message-a", "job-a", 4, 8)
    job = batch_job(aws, "results/h", 4, {":2": ("RUNNING", None, None), ":3": ("RUNNING", None, None)})
    write_lease(aws, "results/h", RUN_B, 4, 8, jobs=[{"job_id": job, "job_name": "plate", "array_size": 4,
                                                       "array_offset": 0, "memory_mib": 4096}])
    submission(aws, "results/h", "message-b", job, 4, 8)
    for index in range(2):
        write_record(aws, "results/h", RUN_B, index, 2 * index + 1, 2 * index + 2, 8,
                     files={"Image.csv": table([(2 * index + 1, 99), (2 * index + 2, 99)])})
    refused = run("results", "results/h", "--to", str(tmp_path / "h"))
    assert refused.exit_code == 1
    assert "part-00002: stale" in refused.output and "part-00003: stale" in refused.output
    assert not (tmp_path / "h" / "Image.csv").exists()
    status = run("status", "results/h", "--no-dlq")
    assert status.exit_code == 3 and "results/h/: RUNNING" in status.output
    assert "run records: 2/4 succeeded" in status.output  # run A's records of parts 2 and 3 do not count


@pytest.mark.race
def test_an_array_run_then_a_plain_run_uses_the_plain_runs_record(aws, tmp_path):
    """Run A was an array of 2; run B (current) is one plain job: its `_cpb/run.json` is the result,
    A's part folders are named as not counted and never merged."""
    for index in range(2):
        write_record(aws, "results/ap", RUN_A, index, 4 * index + 1, 4 * index + 4, 8,
                     files={"Image.csv": table([(n, 1) for n in range(4 * index + 1, 4 * index + 5)])})
    submission(aws, "results/ap", "message-a", "job-a", 2, 8)
    write_lease(aws, "results/ap", RUN_B, None, 8)
    submission(aws, "results/ap", "message-b", "job-b", None, 8)
    write_record(aws, "results/ap", RUN_B, None, 1, 8, 8,
                 files={"Image.csv": table([(n, 2) for n in range(1, 9)])})
    got = run("results", "results/ap", "--to", str(tmp_path / "ap"))
    assert got.exit_code == 0, got.output
    rows = list(csv.DictReader(open(tmp_path / "ap" / "Image.csv")))
    assert [(int(r["ImageNumber"]), r["Count_Nuclei"]) for r in rows] == [(n, "2") for n in range(1, 9)]
    assert "merged from" not in got.output
    assert f"not counted, never merged: part-00000 (run {RUN_A[:8]}, succeeded)" in got.output


@pytest.mark.race
def test_another_messages_output_inside_a_part_folder_is_never_merged(aws, tmp_path):
    """Message C's output was `results/o/part-00002` (a plain job over all 8 sets). Inside run A's array
    of 4 it is refused by name; beyond run A's array of 2 it is named as not counted."""
    for index in range(4):
        write_record(aws, "results/o", RUN_A, index, 2 * index + 1, 2 * index + 2, 8)
    write_lease(aws, "results/o", RUN_A, 4, 8, message_id="message-a")
    write_record(aws, "results/o/part-00002", RUN_C, None, 1, 8, 8)
    refused = run("results", "results/o", "--to", str(tmp_path / "o"))
    assert refused.exit_code == 1
    assert f"part-00002: stale: record of run {RUN_C[:8]}, not of the current run {RUN_A[:8]}" in refused.output

    for index in range(2):
        write_record(aws, "results/o2", RUN_A, index, 4 * index + 1, 4 * index + 4, 8)
    write_lease(aws, "results/o2", RUN_A, 2, 8, message_id="message-a")
    write_record(aws, "results/o2/part-00002", RUN_C, None, 1, 8, 8)
    got = run("results", "results/o2", "--to", str(tmp_path / "o2"))
    assert got.exit_code == 0, got.output
    assert image_numbers(tmp_path / "o2") == list(range(1, 9))
    assert "part-00002" in got.output and "beyond the current run's 2 parts" in got.output


@pytest.mark.race
def test_parts_whose_ranges_do_not_tile_are_refused_even_of_one_run(aws, tmp_path):
    """A record with the right run and index but an overlapping range (a worker bug, a hand copy) never
    doubles rows: the ranges must tile 1..N exactly once."""
    write_lease(aws, "results/t", RUN_A, 2, 8, message_id="message-a")
    write_record(aws, "results/t", RUN_A, 0, 1, 5, 8)
    write_record(aws, "results/t", RUN_A, 1, 5, 8, 8)
    refused = run("results", "results/t", "--to", str(tmp_path / "t"))
    assert refused.exit_code == 1 and "ranges do not tile the image sets" in refused.output
    assert "part-00001: image sets 5-8 overlap" in refused.output


@pytest.mark.race
def test_records_of_two_runs_without_a_lease_are_refused_naming_the_mix(aws, tmp_path):
    write_record(aws, "results/m", RUN_A, 0, 1, 4, 8)
    write_record(aws, "results/m", RUN_B, 1, 5, 8, 8)
    submission(aws, "results/m", "message-b", "job-b", 2, 8)
    refused = run("results", "results/m", "--to", str(tmp_path / "m"))
    assert refused.exit_code == 1
    assert "records of 2 runs and no lease to say which is current" in refused.output
    assert f"run {RUN_A[:8]}: part-00000" in refused.output and f"run {RUN_B[:8]}: part-00001" in refused.output


@pytest.mark.race
def test_a_cancelled_run_is_not_complete(aws, tmp_path):
    write_record(aws, "results/c", RUN_A, None, 1, 8, 8)
    write_lease(aws, "results/c", RUN_A, None, 8, message_id="message-a", state="cancelled")
    refused = run("results", "results/c", "--to", str(tmp_path / "c"))
    assert refused.exit_code == 1 and "was cancelled" in refused.output


# ------------------------------------------------------------------------- merging parts

RELATIONSHIPS = ("Module,Module Number,Relationship,First Object Name,First Image Number,First Object Number,"
                 "Second Object Name,Second Image Number,Second Object Number\n")


@pytest.mark.race
def test_relationship_tables_are_renumbered_and_concatenated(aws, tmp_path):
    """CellProfiler numbers images in `Object relationships.csv` as First/Second Image Number. Part 1
    numbered its image sets from 1 (as 4.2 does for a range): both its tables move by 4 together.
    The old merge kept part 0's copy only (2 of 4 relationship rows)."""
    write_lease(aws, "results/rel", RUN_A, 2, 8, message_id="message-a")
    part0 = {"Image.csv": table([(n, 5) for n in range(1, 5)]),
             "Object relationships.csv": RELATIONSHIPS + "IdentifySecondaryObjects,3,Parent,Nuclei,1,1,Cells,1,1\n"
                                                        "IdentifySecondaryObjects,3,Parent,Nuclei,4,2,Cells,4,2\n"}
    part1 = {"Image.csv": table([(n, 5) for n in range(1, 5)]),  # numbered from 1: image sets 5-8
             "Object relationships.csv": RELATIONSHIPS + "IdentifySecondaryObjects,3,Parent,Nuclei,1,1,Cells,1,1\n"
                                                        "IdentifySecondaryObjects,3,Parent,Nuclei,3,7,Cells,3,7\n"}
    write_record(aws, "results/rel", RUN_A, 0, 1, 4, 8, files=part0)
    write_record(aws, "results/rel", RUN_A, 1, 5, 8, 8, files=part1)
    got = run("results", "results/rel", "--to", str(tmp_path / "rel"))
    assert got.exit_code == 0, got.output
    assert image_numbers(tmp_path / "rel") == list(range(1, 9))
    rows = list(csv.DictReader(open(tmp_path / "rel" / "Object relationships.csv", newline="")))
    assert [(r["First Image Number"], r["Second Image Number"], r["First Object Number"]) for r in rows] == \
        [("1", "1", "1"), ("4", "4", "2"), ("5", "5", "1"), ("7", "7", "7")]
    assert "Object relationships.csv: 4 rows" in got.output


GCT_HEADER = "NAME\tDescription\tCount_Nuclei\r\n"


def gct(rows: list[str], header: str = GCT_HEADER) -> str:
    return f"#1.2\r\n{len(rows)}\t1\r\n{header}" + "".join(f"{r}\r\n" for r in rows)


@pytest.mark.race
def test_gct_files_are_merged_and_mismatched_ones_refused_by_name(aws, tmp_path):
    """ExportToSpreadsheet's GenePattern file holds one row per image set after a `#1.2` / count header:
    the parts' rows are concatenated and the count summed (the old merge kept one part's file per
    folder, the worker's the last range's)."""
    write_lease(aws, "results/g", RUN_A, 2, 4, message_id="message-a")
    write_record(aws, "results/g", RUN_A, 0, 1, 2, 4, files={"Image.csv": table([(1, 1), (2, 2)]),
                                                              "Image.gct": gct(["a1.tif\t/x\t1", "a2.tif\t/x\t2"])})
    write_record(aws, "results/g", RUN_A, 1, 3, 4, 4, files={"Image.csv": table([(3, 3), (4, 4)]),
                                                              "Image.gct": gct(["a3.tif\t/x\t3", "a4.tif\t/x\t4"])})
    got = run("results", "results/g", "--to", str(tmp_path / "g"))
    assert got.exit_code == 0, got.output
    lines = (tmp_path / "g" / "Image.gct").read_text().splitlines()
    assert lines[:3] == ["#1.2", "4\t1", "NAME\tDescription\tCount_Nuclei"]
    assert [line.split("\t")[0] for line in lines[3:]] == ["a1.tif", "a2.tif", "a3.tif", "a4.tif"]

    write_lease(aws, "results/g2", RUN_A, 2, 4, message_id="message-a")
    write_record(aws, "results/g2", RUN_A, 0, 1, 2, 4, files={"Image.csv": table([(1, 1), (2, 2)]),
                                                               "Image.gct": gct(["a1.tif\t/x\t1", "a2.tif\t/x\t2"])})
    write_record(aws, "results/g2", RUN_A, 1, 3, 4, 4, files={
        "Image.csv": table([(3, 3), (4, 4)]),
        "Image.gct": gct(["a3.tif\t/x\t3"], header="NAME\tDescription\tCount_Cells\r\n").replace("1\t1", "2\t1")})
    refused = run("results", "results/g2", "--to", str(tmp_path / "g2"))
    assert refused.exit_code == 1 and "Image.gct in part-00001 says 2 rows but holds 1" in refused.output


@pytest.mark.race
def test_a_per_run_file_that_differs_between_parts_is_refused_by_name(aws, tmp_path):
    """Two parts wrote `summary.txt` with different contents: neither may stand for both. Identical
    copies (and Experiment.csv differing only in its run timestamp and in ImageSet_Zip_Dictionary, which
    names the images by the absolute path each part staged them at) merge to one file."""
    experiment = ("Key,Value\nCellProfiler_Version,4.2.8\nRun_Timestamp,{0}\n"
                  "ImageSet_Zip_Dictionary,file:/scratch/cpb-job-{0}/x.tiff\n")
    write_lease(aws, "results/d", RUN_A, 2, 4, message_id="message-a")
    for index, stamp in ((0, "2026-11-30T10:00:00"), (1, "2026-11-30T10:05:00")):
        write_record(aws, "results/d", RUN_A, index, 2 * index + 1, 2 * index + 2, 4, files={
            "Image.csv": table([(2 * index + 1, 1), (2 * index + 2, 1)]), "Experiment.csv": experiment.format(stamp),
            "settings.txt": "same in every part\n", "summary.txt": f"part {index}\n"})
    refused = run("results", "results/d", "--to", str(tmp_path / "d"))
    assert refused.exit_code == 1
    assert "summary.txt differs between the parts (part-00000 vs part-00001) and cannot be merged" in refused.output
    put(aws, "results/d/part-00001/summary.txt", "part 0\n")
    record = json.loads(aws["s3"].get_object(Bucket=BUCKET, Key="results/d/part-00001/_cpb/run.json")["Body"].read())
    record["files"] = [entry("summary.txt", "part 0\n") if f["key"] == "summary.txt" else f for f in record["files"]]
    put(aws, "results/d/part-00001/_cpb/run.json", json.dumps(record))
    got = run("results", "results/d", "--to", str(tmp_path / "d"))
    assert got.exit_code == 0, got.output
    assert (tmp_path / "d" / "summary.txt").read_text() == "part 0\n"
    assert "Run_Timestamp,2026-11-30T10:00:00" in (tmp_path / "d" / "Experiment.csv").read_text()

    write_lease(aws, "results/v", RUN_A, 2, 4, message_id="message-a")
    for index, version in ((0, "4.2.8"), (1, "4.2.6")):
        write_record(aws, "results/v", RUN_A, index, 2 * index + 1, 2 * index + 2, 4, files={
            "Image.csv": table([(2 * index + 1, 1), (2 * index + 2, 1)]),
            "Experiment.csv": f"Key,Value\nCellProfiler_Version,{version}\n"})
    refused = run("results", "results/v", "--to", str(tmp_path / "v"))
    assert refused.exit_code == 1
    assert "Experiment.csv: CellProfiler_Version is '4.2.8' in part-00000 but '4.2.6' in part-00001" in refused.output


# ------------------------------------------------------------------------- URLs

@pytest.mark.race
def test_every_command_takes_the_url_cpb_submit_prints(aws, tmp_path):
    """`cpb status s3://b/results/p1/` read the URL as a prefix and said WAITING forever."""
    write_lease(aws, "results/u", RUN_A, None, 2, message_id="message-a")
    write_record(aws, "results/u", RUN_A, None, 1, 2, 2)
    url = f"s3://{BUCKET}/results/u/"
    status = run("status", url, "--no-dlq")
    assert status.exit_code == 0, status.output
    assert f"s3://{BUCKET}/results/u/: SUCCEEDED" in status.output
    console = f"https://s3.console.aws.amazon.com/s3/buckets/{BUCKET}?region=us-east-1&prefix=results/u/"
    got = run("results", console, "--to", str(tmp_path / "u"))
    assert got.exit_code == 0, got.output and image_numbers(tmp_path / "u") == [1, 2]
    assert "nothing failed" in run("requeue", url).output
    put(aws, "pipelines/nuclei.cppipe", (Path(__file__).parent.parent / "cpb/pipelines/nuclei.cppipe").read_text())
    put(aws, "plates/u/a.tif", b"II*\x00")
    sent = run("submit", "--pipeline", "pipelines/nuclei.cppipe", "--input", "plates/u", "--output",
               f"s3://{BUCKET}/results/u2/", "--dry-run")
    assert sent.exit_code == 0, sent.output
    assert next(json.loads(line) for line in sent.output.splitlines() if line.startswith("{"))["output"] == "results/u2"
    for command in (["status", "s3://someone-elses-bucket/results/u/", "--no-dlq"],
                    ["submit", "--pipeline", "pipelines/nuclei.cppipe", "--input", "plates/u", "--output",
                     "s3://someone-elses-bucket/results/u", "--dry-run"],
                    ["results", "s3://someone-elses-bucket/results/u", "--to", str(tmp_path / "x")],
                    ["requeue", "s3://someone-elses-bucket/results/u"]):
        wrong = run(*command)
        assert wrong.exit_code == 1, wrong.output
        errors = [line for line in wrong.output.splitlines() if line.startswith("cpb: ")]
        assert errors == [f"cpb: {next(a for a in command if a.startswith('s3://'))} is in "
                          f"bucket 'someone-elses-bucket', but this stack's bucket is '{BUCKET}' (from $CPB_BUCKET): "
                          f"give a prefix of s3://{BUCKET}/, or point cpb at the other stack (--stack / --bucket)"]


@pytest.mark.race
def test_parts_that_read_different_upstream_results_are_never_merged(aws, tmp_path):
    """Adversary: an analysis array `after` an illumination step whose run was replaced while the
    analysis ran: parts 0 read illumination run 1, part 1 (requeued later) run 2. Every part is of
    the current run and succeeded, so `cpb results` merged one table computed from two different
    illumination functions. The records' fingerprints say which upstream each part read."""
    write_lease(aws, "results/an", RUN_B, 2, 4, after=["results/ill"])
    write_record(aws, "results/an", RUN_B, 0, 1, 2, 4, fingerprint={"upstream": "1" * 64, "image": "i"})
    write_record(aws, "results/an", RUN_B, 1, 3, 4, 4, fingerprint={"upstream": "2" * 64, "image": "i"})
    refused = run("results", "results/an", "--to", str(tmp_path / "mixed"))
    assert refused.exit_code == 1, refused.output
    line = ("results/an: the parts ran on different results of the step they run after (part-00000: 111111111111, "
            "part-00001: 222222222222); they cannot be merged: send the output again")
    assert line in refused.output
    assert not (tmp_path / "mixed" / "Image.csv").exists()
    status = run("status", "results/an", "--no-dlq")
    assert status.exit_code == 1 and line in status.output, status.output  # never "succeeded"
    write_record(aws, "results/an", RUN_B, 1, 3, 4, 4, fingerprint={"upstream": "1" * 64, "image": "i"})
    merged = run("results", "results/an", "--to", str(tmp_path / "ok"))
    assert merged.exit_code == 0, merged.output
    assert image_numbers(tmp_path / "ok") == [1, 2, 3, 4]


@pytest.mark.race
def test_submit_with_upload_never_replaces_the_inputs_of_a_run_still_using_the_output(aws, tmp_path):
    """Adversary: a scientist fixes a typo in load_data.csv and sends `cpb submit --upload` again to
    the same output while the first run's array children are still running. The Lambda refuses
    the new message (output in use) - but the upload had already replaced the data file and images
    under the running run, whose later children read the new rows: one 'succeeded' run made of
    two versions of the data file. `cpb plate` checks first; `cpb submit` now does too."""
    job = batch_job(aws, "results/busy", size=2, states={":0": ("RUNNING", None, None)})
    write_lease(aws, "results/busy", RUN_A, 2, 4, jobs=[{"job_id": job, "job_name": "plate", "array_size": 2,
                                                         "array_offset": 0}], message_id="message-a")
    put(aws, "plates/busy/load_data.csv", "Image_FileName_DNA\nold1.tif\nold2.tif\nold3.tif\nold4.tif\n")
    folder = tmp_path / "plate"
    folder.mkdir()
    (folder / "load_data.csv").write_text("Image_FileName_DNA\nnew1.tif\nnew2.tif\nnew3.tif\nnew4.tif\n")
    for n in range(1, 5):
        (folder / f"new{n}.tif").write_bytes(b"image")
    pipeline = tmp_path / "nuclei.cppipe"
    pipeline.write_text((Path(__file__).parent.parent / "cpb" / "pipelines" / "nuclei.cppipe").read_text())
    refused = run("submit", "--upload", str(folder), "--pipeline", str(pipeline), "--input", "plates/busy",
                  "--data-file", str(folder / "load_data.csv"), "--output", "results/busy",
                  "--image-sets-per-job", "2")
    assert refused.exit_code == 1, refused.output
    assert (f"results/busy is in use by run {RUN_A[:8]} of message message-a (job {job} RUNNING); wait for it to "
            "finish (cpb status results/busy) or choose another output") in refused.output
    body = aws["s3"].get_object(Bucket=BUCKET, Key="plates/busy/load_data.csv")["Body"].read().decode()
    assert body.startswith("Image_FileName_DNA\nold1.tif")  # the running run's data file, untouched
    assert aws["sqs"].receive_message(QueueUrl=aws["queue"]).get("Messages") is None
    # the message file that started the run, resent with its client_token: a repeat the Lambda adopts
    write_lease(aws, "results/busy", RUN_A, 2, 4, jobs=[{"job_id": job, "job_name": "plate", "array_size": 2,
                                                         "array_offset": 0}], message_id="tok-repeat-1",
                client_token="tok-repeat-1")
    put(aws, "pipelines/nuclei.cppipe", pipeline.read_text())
    repeat = tmp_path / "message.json"
    repeat.write_text(json.dumps({"pipeline": "pipelines/nuclei.cppipe", "input": "plates/busy",
                                  "data_file": "plates/busy/load_data.csv", "output": "results/busy",
                                  "image_sets_per_job": 2, "client_token": "tok-repeat-1"}))
    again = run("submit", "--message-file", str(repeat))
    assert again.exit_code == 0, again.output


@pytest.mark.race
def test_a_refused_merge_leaves_the_folder_as_it_was(aws, tmp_path):
    """Adversary: `cpb results` into a folder holding an earlier run's download; the new run's
    parts then disagree on `summary.txt`. The refusal came after Image.csv had been rewritten with
    the new run's rows, beside the earlier run's other tables and its `_cpb/runs.json` - a folder
    that `cpb report`/`--parquet` read as the earlier run, half of it the new one's."""
    dest = tmp_path / "d"
    (dest / "_cpb").mkdir(parents=True)
    (dest / "Image.csv").write_text(table([(1, 7), (2, 7)]))
    (dest / "_cpb" / "runs.json").write_text(json.dumps([{"part": "", "run_id": RUN_A}]))
    before = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    write_lease(aws, "results/half", RUN_B, 2, 4)
    for index in (0, 1):
        write_record(aws, "results/half", RUN_B, index, 2 * index + 1, 2 * index + 2, 4, files={
            "Image.csv": table([(2 * index + 1, 1), (2 * index + 2, 1)]), "summary.txt": f"part {index}\n"})
    refused = run("results", "results/half", "--to", str(dest))
    assert refused.exit_code == 1 and "summary.txt differs between the parts" in refused.output
    after = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.race
def test_a_newer_run_of_the_same_output_leaves_nothing_of_the_earlier_one_looking_current(aws, tmp_path):
    """Adversary: run A's results were downloaded, converted and profiled; run B of the same output
    (its pipeline no longer exporting Cells) is downloaded over them. A's Cells.csv, its
    single_cell.parquet, report and profiles stayed, and `cpb profile` read the stale Parquet as
    the current results. Now they are removed (and said so); what the user added is kept."""
    dest = tmp_path / "CP1"
    write_lease(aws, "results/cp1", RUN_A, None, 2)
    write_record(aws, "results/cp1", RUN_A, None, 1, 2, 2, files={"Image.csv": table([(1, 5), (2, 6)]),
                                                                  "Cells.csv": table([(1, 1), (2, 1)])})
    first = run("results", "results/cp1", "--to", str(dest))
    assert first.exit_code == 0, first.output
    made = ["single_cell.parquet", "report/plate-qc.png", "report/plate-qc.html", "profiles/CP1_aggregated.parquet"]
    for name in made + ["notes.txt"]:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(b"made from run A")
    same = run("results", "results/cp1", "--to", str(dest))  # the same run again: what was made from it stays
    assert same.exit_code == 0 and "removed" not in same.output, same.output
    assert all((dest / name).is_file() for name in made)
    write_lease(aws, "results/cp1", RUN_B, None, 2, previous_run_id=RUN_A)
    write_record(aws, "results/cp1", RUN_B, None, 1, 2, 2, files={"Image.csv": table([(1, 7), (2, 8)])})
    newer = run("results", "results/cp1", "--to", str(dest))
    assert newer.exit_code == 0, newer.output
    assert not [name for name in made + ["Cells.csv"] if (dest / name).exists()]
    assert f"removed 5 file(s) of the earlier run in {dest} that this run did not replace (e.g. Cells.csv)" \
        in newer.output
    assert (dest / "notes.txt").is_file() and "1 file(s) in" in newer.output and "(e.g. notes.txt)" in newer.output
    assert image_numbers(dest) == [1, 2] and "1,7" in (dest / "Image.csv").read_text()
    assert {r["run_id"] for r in json.loads((dest / "_cpb" / "runs.json").read_text())} == {RUN_B}


@pytest.mark.race
def test_a_message_not_taken_is_waited_for_whatever_this_machines_clock_says(aws, tmp_path):
    """Adversary: the receipt's `sent_at` (this laptop's clock) was compared with the lease's
    `created_at` (the Lambda's). A laptop clock 10 minutes slow (WSL after sleep, a VM) made a message
    just sent look older than the previous run's lease, so `cpb results` handed over the previous
    run as the one just asked for, and `cpb status` said SUCCEEDED."""
    import datetime as dt
    for index in range(2):
        write_record(aws, "results/skew", RUN_A, index, 4 * index + 1, 4 * index + 4, 8)
    minutes_ahead = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=10)).isoformat(timespec="seconds")
    write_lease(aws, "results/skew", RUN_A, 2, 8, message_id="message-a", created_at=minutes_ahead)
    put(aws, "pipelines/nuclei.cppipe", (Path(__file__).parent.parent / "cpb/pipelines/nuclei.cppipe").read_text())
    put(aws, "plates/skew/a.tif", b"II*\x00")
    sent = run("submit", "--pipeline", "pipelines/nuclei.cppipe", "--input", "plates/skew", "--output", "results/skew")
    assert sent.exit_code == 0, sent.output
    status = run("status", "results/skew", "--no-dlq")
    assert status.exit_code == 3 and "results/skew/: WAITING" in status.output, status.output
    refused = run("results", "results/skew", "--to", str(tmp_path / "skew"))
    assert refused.exit_code == 1 and "has not been taken by the Lambda yet" in refused.output


@pytest.mark.race
def test_a_second_message_for_an_output_in_use_waits_and_is_not_the_first_runs_success(aws, tmp_path):
    """New-user review: `cpb submit` twice in a row to one output. Both were sent before the Lambda took
    either (no lease yet: nothing to compare), the Lambda took the first (its lease was created after
    both were sent) and left the second on the queue: the output was in use. `cpb status <second
    message id>` said SUCCEEDED with the first message's run, and `cpb results` handed that run over
    as the final result. The second has no submission record: the Lambda has not taken it."""
    import datetime as dt
    put(aws, "pipelines/nuclei.cppipe", (Path(__file__).parent.parent / "cpb/pipelines/nuclei.cppipe").read_text())
    put(aws, "plates/tw/a.tif", b"II*\x00")
    flags = ("--pipeline", "pipelines/nuclei.cppipe", "--input", "plates/tw", "--output", "results/tw")
    assert run("submit", *flags).exit_code == 0 and run("submit", *flags).exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "cpb-home" / "submissions.jsonl").read_text().splitlines()]
    first, second = rows[0]["identity"], rows[1]["identity"]
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)).isoformat(timespec="seconds")
    run_1 = run_id_for(first)
    job = batch_job(aws, "results/tw", name="one")
    write_lease(aws, "results/tw", run_1, None, 1, jobs=[{"job_id": job, "job_name": "one"}], message_id=first,
                created_at=later)
    submission(aws, "results/tw", first, job, None, 1)
    write_record(aws, "results/tw", run_1, None, 1, 1, 1)
    for name in (rows[1]["message_id"], "results/tw"):
        status = run("status", name, "--no-dlq")
        assert status.exit_code == 3 and "results/tw/: WAITING" in status.output, status.output
        assert "results/tw/: SUCCEEDED" not in status.output
        assert f"message {rows[1]['message_id']} sent from here" in status.output
        assert f"in use by run {run_1[:8]} of message {first}" in status.output
        assert "visibility timeout" in status.output and "purge" in status.output
    refused = run("results", "results/tw", "--to", str(tmp_path / "tw"))
    assert refused.exit_code == 1 and "has not been taken by the Lambda yet" in refused.output, refused.output
    assert f"--run {run_1[:8]}" in refused.output
    # Redelivered after the visibility timeout, the second message replaces the first's run: the first,
    # which the Lambda took (its submission record), is not waited for.
    run_2 = run_id_for(second)
    job_2 = batch_job(aws, "results/tw", name="two")
    write_lease(aws, "results/tw", run_2, None, 1, jobs=[{"job_id": job_2, "job_name": "two"}], message_id=second,
                created_at=later, previous_run_id=run_1)
    submission(aws, "results/tw", second, job_2, None, 1)
    write_record(aws, "results/tw", run_2, None, 1, 1, 1)
    status = run("status", "results/tw", "--no-dlq")
    assert status.exit_code == 0 and "results/tw/: SUCCEEDED" in status.output, status.output
    assert "has not been taken" not in status.output
    assert run("results", "results/tw", "--to", str(tmp_path / "tw2")).exit_code == 0


@pytest.mark.race
def test_a_message_from_here_the_lambda_took_before_an_older_one_is_not_waited_for(aws, tmp_path):
    """SQS standard queues do not keep order: the second message can be taken first, and the first
    replace its run once it ended. The lease then names the first; the second, which the Lambda took
    (its submission record says so), is not waited for."""
    import datetime as dt
    put(aws, "pipelines/nuclei.cppipe", (Path(__file__).parent.parent / "cpb/pipelines/nuclei.cppipe").read_text())
    put(aws, "plates/oo/a.tif", b"II*\x00")
    flags = ("--pipeline", "pipelines/nuclei.cppipe", "--input", "plates/oo", "--output", "results/oo")
    assert run("submit", *flags).exit_code == 0 and run("submit", *flags).exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "cpb-home" / "submissions.jsonl").read_text().splitlines()]
    first, second = rows[0]["identity"], rows[1]["identity"]
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)).isoformat(timespec="seconds")
    submission(aws, "results/oo", second, "job-gone", None, 1)
    job = batch_job(aws, "results/oo", name="one")
    write_lease(aws, "results/oo", run_id_for(first), None, 1, jobs=[{"job_id": job, "job_name": "one"}],
                message_id=first, created_at=later, previous_run_id=run_id_for(second))
    submission(aws, "results/oo", first, job, None, 1)
    write_record(aws, "results/oo", run_id_for(first), None, 1, 1, 1)
    status = run("status", "results/oo", "--no-dlq")
    assert status.exit_code == 0 and "results/oo/: SUCCEEDED" in status.output, status.output
    assert "has not been taken" not in status.output


def refusal_record(aws, output: str, identity: str, kind: str, reason: str, at: str, field: str = "output",
                   receive_count: int = 1) -> None:
    """The ingress Lambda's refusal record (docs/CONTRACTS.md, `handlers.refusals`)."""
    put(aws, f"{output}/_cpb/refusal-{identity}.json", json.dumps(
        {"message_id": identity, "sqs_message_id": identity, "entry": None, "kind": kind, "field": field,
         "reason": reason, "receive_count": receive_count, "first_at": at, "at": at}))


def test_an_invalid_message_sent_another_way_is_failed_at_once_with_the_lambdas_reason(aws):
    """New-user review: a message sent with `aws sqs send-message` with a mistyped field is retried for
    ~30 minutes before the DLQ; meanwhile status said only `WAITING ... no submission record yet`."""
    refusal_record(aws, "results/o7", "5a3522cb-0000", "invalid",
                   "job_vcpus: is not a message field; did you mean 'job_vcpu'?", "2026-11-30T10:00:00+00:00",
                   field="job_vcpus", receive_count=2)
    status = run("status", "results/o7", "--no-dlq")
    assert status.exit_code == 1 and "results/o7/: FAILED" in status.output, status.output
    assert ("message 5a3522cb-0000 was refused by the Lambda (delivery 2, 2026-11-30T10:00:00+00:00): job_vcpus: "
            "is not a message field; did you mean 'job_vcpu'?") in status.output
    assert "never pass as it is" in status.output and "no submission record yet" not in status.output


def test_a_refusal_before_the_current_run_or_of_the_message_that_runs_is_not_shown(aws):
    write_lease(aws, "results/o8", RUN_B, None, 1, message_id="message-b", created_at="2026-11-30T11:00:00+00:00")
    write_record(aws, "results/o8", RUN_B, None, 1, 1, 1)
    refusal_record(aws, "results/o8", "message-a", "invalid", "pipeline: missing", "2026-11-30T10:00:00+00:00")
    refusal_record(aws, "results/o8", "message-b", "busy", "output: results/o8 is in use", "2026-11-30T10:30:00+00:00")
    status = run("status", "results/o8", "--no-dlq")
    assert status.exit_code == 0 and "results/o8/: SUCCEEDED" in status.output, status.output
    assert "refused" not in status.output


def _minutes_ago(minutes: float) -> str:
    import datetime as dt
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def test_a_message_sent_another_way_for_an_output_in_use_is_shown_waiting(aws):
    job = batch_job(aws, "results/o9", name="one")
    write_lease(aws, "results/o9", RUN_A, None, 1, jobs=[{"job_id": job, "job_name": "one"}], message_id="message-a",
                created_at=_minutes_ago(10))
    write_record(aws, "results/o9", RUN_A, None, 1, 1, 1)
    busy = (f"output: results/o9 is in use by run {RUN_A} of message message-a (job {job} RUNNING); wait for it to "
            "finish (cpb status results/o9) or choose another output")
    refused_at = _minutes_ago(9)
    refusal_record(aws, "results/o9", "sqs-second", "busy", busy, refused_at)
    status = run("status", "results/o9", "--no-dlq")
    assert status.exit_code == 3 and "results/o9/: WAITING" in status.output, status.output
    assert f"message sqs-second waits in the queue (refused for now, delivery 1, {refused_at})" in status.output
    assert "visibility timeout" in status.output


def test_a_busy_message_not_delivered_for_hours_no_longer_keeps_the_output_waiting(aws):
    """Adversary: a message refused while the output was in use, then purged (as the status line
    advises) or dead-lettered, kept the output WAITING for good (`cpb status --watch` never ended).
    With no delivery for two hours (redeliveries come every visibility timeout, at most 90 minutes),
    it is gone: the run there stands."""
    job = batch_job(aws, "results/o12", name="one")
    write_lease(aws, "results/o12", RUN_A, None, 1, jobs=[{"job_id": job, "job_name": "one"}], message_id="message-a",
                created_at=_minutes_ago(200))
    write_record(aws, "results/o12", RUN_A, None, 1, 1, 1)
    refusal_record(aws, "results/o12", "sqs-purged", "busy", "output: results/o12 is in use", _minutes_ago(180))
    status = run("status", "results/o12", "--no-dlq")
    assert status.exit_code == 0 and "results/o12/: SUCCEEDED" in status.output, status.output
    assert "sqs-purged" not in status.output


def test_resending_a_corrected_message_to_an_output_holding_only_its_refusal_warns_of_nothing(aws):
    refusal_record(aws, "results/o10", "sqs-typo", "invalid", "job_vcpus: is not a message field", "2026-11-30T10:00:00Z")
    put(aws, "pipelines/nuclei.cppipe", (Path(__file__).parent.parent / "cpb/pipelines/nuclei.cppipe").read_text())
    put(aws, "plates/o10/a.tif", b"II*\x00")
    sent = run("submit", "--pipeline", "pipelines/nuclei.cppipe", "--input", "plates/o10", "--output", "results/o10")
    assert sent.exit_code == 0 and "already holds results" not in sent.output, sent.output


def test_an_old_invalid_message_still_redelivered_does_not_fail_the_corrected_run(aws):
    """Adversary: an invalid message is retried until maxReceiveCount (~30 minutes); each delivery
    moves the refusal record's `at` forward. The scientist fixed the message and sent it again; the
    corrected run began (and succeeded) while the old one was still being redelivered, and `cpb
    status` said FAILED with the old message's reason: the refusal was judged by its latest delivery,
    not by when the message was first refused (before the current run began, so replaced by it)."""
    write_lease(aws, "results/o11", RUN_B, None, 1, message_id="message-b", created_at="2026-11-30T10:10:00+00:00")
    write_record(aws, "results/o11", RUN_B, None, 1, 1, 1)
    put(aws, "results/o11/_cpb/refusal-message-a.json", json.dumps(
        {"message_id": "message-a", "sqs_message_id": "sqs-a", "entry": None, "kind": "invalid", "field": "pipeline",
         "reason": "pipeline: missing", "receive_count": 4, "first_at": "2026-11-30T10:00:00+00:00",
         "at": "2026-11-30T10:20:00+00:00"}))
    status = run("status", "results/o11", "--no-dlq")
    assert status.exit_code == 0 and "results/o11/: SUCCEEDED" in status.output, status.output
    assert "refused" not in status.output


@pytest.mark.race
def test_a_message_from_here_refused_as_invalid_never_keeps_the_corrected_run_waiting(aws, tmp_path):
    """Adversary: a message sent from here was refused as invalid (it never runs: then the DLQ, or a
    purge). Its receipt stayed 'not taken' for SQS's 14-day retention, so once the corrected message's
    run had begun (the refusal, older, no longer shown) `cpb status` said WAITING for a message that
    will never come, and `cpb results` refused the corrected run without --run, saying the refused
    message 'waits in the queue ... and runs once that run has ended'."""
    import datetime as dt
    put(aws, "pipelines/nuclei.cppipe", (Path(__file__).parent.parent / "cpb/pipelines/nuclei.cppipe").read_text())
    put(aws, "plates/rv/a.tif", b"II*\x00")
    flags = ("--pipeline", "pipelines/nuclei.cppipe", "--input", "plates/rv", "--output", "results/rv")
    assert run("submit", *flags).exit_code == 0 and run("submit", *flags).exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "cpb-home" / "submissions.jsonl").read_text().splitlines()]
    bad, good = rows[0]["identity"], rows[1]["identity"]
    now = dt.datetime.now(dt.timezone.utc)
    stamp = lambda s: (now + dt.timedelta(seconds=s)).isoformat(timespec="seconds")  # noqa: E731
    put(aws, f"results/rv/_cpb/refusal-{bad}.json", json.dumps(
        {"message_id": bad, "sqs_message_id": "sqs-bad", "entry": None, "kind": "invalid", "field": "pipeline",
         "reason": "pipeline: not found", "receive_count": 5, "first_at": stamp(5), "at": stamp(5)}))
    job = batch_job(aws, "results/rv", name="good")
    write_lease(aws, "results/rv", run_id_for(good), None, 1, jobs=[{"job_id": job, "job_name": "good"}],
                message_id=good, created_at=stamp(30))
    submission(aws, "results/rv", good, job, None, 1)
    write_record(aws, "results/rv", run_id_for(good), None, 1, 1, 1)
    status = run("status", "results/rv", "--no-dlq")
    assert status.exit_code == 0 and "results/rv/: SUCCEEDED" in status.output, status.output
    got = run("results", "results/rv", "--to", str(tmp_path / "rv"))
    assert got.exit_code == 0, got.output


@pytest.mark.race
def test_an_interrupted_download_over_an_earlier_run_never_passes_for_either_run(aws, tmp_path, monkeypatch):
    """Adversary: run A downloaded and converted; `cpb results` of run B over it is interrupted (Ctrl-C,
    a full disk) while the merged files move into the folder. B's Image.csv sat beside A's Cells.csv,
    A's single_cell.parquet and A's `_cpb/runs.json`: `cpb report`/`to_parquet` read the folder as run A,
    half of it run B's; a rerun of `cpb results` then kept A's leftovers. Now the folder says it is a
    download in progress (the analysis refuses it) and the rerun still removes A's leftovers."""
    import shutil as shutil_mod
    from cpb.analysis import AnalysisError
    from cpb.analysis.parquet import run_id_of
    dest = tmp_path / "CP2"
    write_lease(aws, "results/cp2", RUN_A, None, 2)
    write_record(aws, "results/cp2", RUN_A, None, 1, 2, 2, files={"Image.csv": table([(1, 5), (2, 6)]),
                                                                  "Cells.csv": table([(1, 1), (2, 1)])})
    assert run("results", "results/cp2", "--to", str(dest)).exit_code == 0
    (dest / "single_cell.parquet").write_bytes(b"made from run A")
    write_lease(aws, "results/cp2", RUN_B, None, 2, previous_run_id=RUN_A)
    write_record(aws, "results/cp2", RUN_B, None, 1, 2, 2, files={"Image.csv": table([(1, 7), (2, 8)]),
                                                                  "Nuclei.csv": table([(1, 2), (2, 2)])})
    real_move, moved = shutil_mod.move, []

    def interrupted(src, dst, *args, **kwargs):
        if str(dst).startswith(str(dest)) and moved:
            raise KeyboardInterrupt
        moved.append(dst)
        return real_move(src, dst, *args, **kwargs)
    monkeypatch.setattr(shutil_mod, "move", interrupted)
    run("results", "results/cp2", "--to", str(dest))
    monkeypatch.setattr(shutil_mod, "move", real_move)
    assert "1,7" in (dest / "Image.csv").read_text()  # one of B's files got there
    assert not (dest / "single_cell.parquet").exists() and not (dest / "Cells.csv").exists()
    with pytest.raises(AnalysisError, match="cpb results"):
        run_id_of(dest)
    again = run("results", "results/cp2", "--to", str(dest))
    assert again.exit_code == 0, again.output
    assert not (dest / "Cells.csv").exists() and (dest / "Nuclei.csv").is_file()
    assert run_id_of(dest) == RUN_B
