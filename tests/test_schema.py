"""The message schema (pure) and the bucket checks (moto S3), as `cpb submit` and the Lambda use them."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import boto3
import pytest
from moto import mock_aws

import hostile_messages as corpus
from handlers import s3checks
from handlers.schema import (Limits, JobRequest, MessageError, entry_message_id, parse_body, parse_entry,
                             submission_id)

LIMITS = corpus.corpus_limits()


def test_schema_imports_without_boto3_or_powertools():
    code = ("import sys, handlers.schema, handlers.s3checks; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'aws_lambda_powertools')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- seed messages

def test_seed_single_object_with_numeric_strings():
    body = json.dumps({"pipeline": corpus.PIPELINE, "input": corpus.INPUT + "/", "output": "results/plate1/",
                       "job_memory": "8192", "job_vcpu": "12"})
    [request] = parse_body(body, LIMITS)
    assert request == JobRequest(pipeline=corpus.PIPELINE, input=corpus.INPUT, output="results/plate1",
                                 job_memory=8192, job_vcpu=12)
    assert request.vcpus(LIMITS) == 12 and request.memory_mib(LIMITS) == 8192
    assert request.queue(LIMITS) == corpus.QUEUE_ARN and request.definition(LIMITS) == corpus.JOBDEF_ARN


def test_seed_list_with_arns_and_defaults():
    body = json.dumps([corpus.good_message(output="r/a", job_queue=corpus.ALLOWED_QUEUE_ARN),
                       corpus.good_message(output="r/b", job_definition=corpus.JOBDEF_ARN, job_memory=2048)])
    first, second = parse_body(body, LIMITS)
    assert first.queue(LIMITS) == corpus.ALLOWED_QUEUE_ARN and first.vcpus(LIMITS) == LIMITS.default_vcpu
    assert second.definition(LIMITS) == corpus.JOBDEF_ARN and second.memory_mib(LIMITS) == 2048


def test_memory_follows_vcpus_when_only_vcpus_are_asked_for():
    per_vcpu = LIMITS.default_memory_mib / LIMITS.default_vcpu
    [small] = parse_body(json.dumps({"pipeline": corpus.PIPELINE, "input": corpus.INPUT, "output": "r/a",
                                     "job_vcpu": 2}), LIMITS)
    assert small.memory_mib(LIMITS) == max(1024, math.ceil(per_vcpu * 2))
    [wide] = parse_body(json.dumps({"pipeline": corpus.PIPELINE, "input": corpus.INPUT, "output": "r/b",
                                    "job_vcpu": LIMITS.max_vcpu}), LIMITS)
    assert wide.memory_mib(LIMITS) == min(LIMITS.max_memory_mib, math.ceil(per_vcpu * LIMITS.max_vcpu))
    assert wide.memory_mib(LIMITS) > LIMITS.default_memory_mib  # more processes, more memory
    [neither] = parse_body(json.dumps({"pipeline": corpus.PIPELINE, "input": corpus.INPUT, "output": "r/c"}), LIMITS)
    assert neither.memory_mib(LIMITS) == LIMITS.default_memory_mib


def test_body_of_exactly_256_kib_is_accepted():
    body = corpus.GOOD_BODY + " " * (256 * 1024 - len(corpus.GOOD_BODY))
    assert len(body.encode()) == LIMITS.max_body_bytes
    assert len(parse_body(body, LIMITS)) == 1


def test_own_bucket_uri_is_accepted_as_a_key():
    [request] = parse_body(json.dumps(corpus.good_message(pipeline=f"s3://{corpus.BUCKET}/{corpus.PIPELINE}")),
                           LIMITS)
    assert request.pipeline == corpus.PIPELINE


def test_unversioned_allowed_job_definition_admits_every_revision():
    limits = Limits(**{**corpus.LIMITS, "allowed_arns": ("arn:aws:batch:us-east-1:123456789012:job-definition/big",)})
    [request] = parse_body(json.dumps(corpus.good_message(
        job_definition="arn:aws:batch:us-east-1:123456789012:job-definition/big:7")), limits)
    assert request.job_definition.endswith("/big:7")


def test_to_message_round_trips_and_omits_unset_fields():
    request = JobRequest(pipeline="p/x.cppipe", input="in", output="out", data_file="in/d.csv",
                         image_sets_per_job=4, job_name="plate 1", job_vcpu=2)
    message = request.to_message()
    assert message == {"pipeline": "p/x.cppipe", "input": "in", "output": "out", "data_file": "in/d.csv",
                       "image_sets_per_job": 4, "job_name": "plate 1", "job_vcpu": 2}
    assert parse_body(json.dumps(message), LIMITS) == [request]
    assert parse_entry(message, LIMITS) == request


def test_ids_for_records_and_jobs():
    assert entry_message_id("abc", None) == "abc" and entry_message_id("abc", 3) == "abc#3"
    assert submission_id("abc#3") == "abc_3" and submission_id("a/b:c d") == "a_b_c_d"


# ----------------------------------------------------------------------------- limits

def test_limits_from_lambda_environment():
    limits = Limits.from_env({"CPB_BUCKET": "b", "CPB_JOB_QUEUE": "arn:q", "CPB_JOB_DEFINITION": "arn:d",
                              "CPB_ALLOWED_ARNS": " arn:x , ,arn:y", "CPB_MAX_VCPU": "8", "CPB_MAX_MEMORY_MIB": "30000",
                              "CPB_DEFAULT_VCPU": "1", "CPB_DEFAULT_MEMORY_MIB": "2048"})
    assert limits == Limits(bucket="b", job_queue_arn="arn:q", job_definition_arn="arn:d", allowed_arns=("arn:x", "arn:y"),
                            max_vcpu=8, max_memory_mib=30000, default_vcpu=1, default_memory_mib=2048)


@pytest.mark.parametrize("environ,text", [
    ({}, "CPB_BUCKET"),
    ({"CPB_BUCKET": "b", "CPB_MAX_VCPU": "lots"}, "CPB_MAX_VCPU"),
    ({"CPB_BUCKET": "b", "CPB_MAX_VCPU": "4", "CPB_DEFAULT_VCPU": "8"}, "default vCPU"),
])
def test_bad_lambda_environment_is_named(environ, text):
    with pytest.raises(ValueError, match=text):
        Limits.from_env(environ)


# ----------------------------------------------------------------------------- errors

def test_error_names_field_entry_and_fix():
    body = json.dumps([corpus.good_message(output="r/a"), corpus.good_message(output="r/b", job_memory=999_999)])
    with pytest.raises(MessageError) as caught:
        parse_body(body, LIMITS)
    error = caught.value
    assert (error.field, error.index) == ("job_memory", 1)
    assert str(error) == ("entry 1: job_memory: 999999 MiB is outside what this stack can place (256..61440 MiB); "
                          "ask for at most 61440, or raise the stack's max memory")


def test_a_pipeline_key_is_refused_as_the_worker_and_cpb_submit_refuse_it():
    """Review nit: the Lambda said `give the key of a .cppipe (or .cpproj) file` and accepted a
    .cpproj, which the worker (image/cpb_worker/pipeline.py) and cpb submit refuse."""
    for key, text in (("pipelines/plate1.cpproj", "'pipelines/plate1.cpproj' is a CellProfiler project (.cpproj), "
                                                  "not a pipeline; in CellProfiler use File > Export > Pipeline"),
                      ("pipelines/plate1.txt", "give the key of a .cppipe file")):
        with pytest.raises(MessageError) as caught:
            parse_body(json.dumps(corpus.good_message(pipeline=key)), LIMITS)
        assert caught.value.field == "pipeline" and text in str(caught.value) and ".cpproj) file" not in str(caught.value)


@pytest.mark.parametrize("case", [c for c in corpus.CORPUS if not c.needs_bucket], ids=lambda c: c.name)
def test_corpus_cases_rejected_by_the_schema_alone(case):
    with pytest.raises(MessageError) as caught:
        parse_body(case.body, LIMITS)
    assert caught.value.field == case.field and caught.value.index == case.entry
    assert str(caught.value).startswith(case.expected_prefix)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400  # one readable log line


@pytest.mark.parametrize("case", [c for c in corpus.CORPUS if c.needs_bucket], ids=lambda c: c.name)
def test_bucket_cases_pass_the_schema(case):
    """These need the bucket: `parse_body` alone must accept them (the client must run s3checks too)."""
    assert parse_body(case.body, LIMITS)


# ----------------------------------------------------------------------------- bucket checks

@pytest.fixture
def s3(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=corpus.BUCKET)
        for key, body in corpus.base_objects().items():
            client.put_object(Bucket=corpus.BUCKET, Key=key, Body=body)
        yield client


@pytest.mark.parametrize("content,rows", [
    (corpus.GOOD_CSV, 10),
    (b"\xef\xbb\xbfImage_FileName_DNA,Metadata_Well\r\nd1.tif,A01\r\n\r\nd2.tif,\"A,02\"\r\n", 2),  # BOM, CRLF, blank
    (b"Image_URL_DNA\nhttps://example.org/x.tif", 1),  # no final newline
])
def test_count_image_sets(s3, content, rows):
    s3.put_object(Bucket=corpus.BUCKET, Key="d.csv", Body=content)
    assert s3checks.count_image_sets(s3, corpus.BUCKET, "d.csv") == rows


@pytest.mark.parametrize("case", [c for c in corpus.CORPUS if c.needs_bucket], ids=lambda c: c.name)
def test_bucket_cases_rejected_by_s3checks(s3, case):
    for key, body in case.objects.items():
        s3.put_object(Bucket=corpus.BUCKET, Key=key, Body=body)
    requests = parse_body(case.body, LIMITS)
    with pytest.raises(MessageError) as caught:
        for request in requests:
            s3checks.check_request(s3, request, LIMITS)
    assert caught.value.field == case.field and str(caught.value).startswith(case.field + ": ")


def test_broken_row_error_says_which_line(s3):
    s3.put_object(Bucket=corpus.BUCKET, Key="b.csv", Body=b"Image_FileName_DNA,X\na,1\nb,2\nc\n")
    with pytest.raises(MessageError, match=r"line 4 has 1 fields but the header has 2"):
        s3checks.count_image_sets(s3, corpus.BUCKET, "b.csv")


def test_check_request_counts_sets_for_the_array(s3):
    [request] = parse_body(json.dumps(corpus.good_message(data_file=corpus.DATA_FILE, image_sets_per_job=3)), LIMITS)
    checked = s3checks.check_request(s3, request, LIMITS)
    assert checked.image_set_count == 10 and checked.request is request


def test_s3_outage_is_not_blamed_on_the_message(s3):
    """A 5xx is re-raised as is (callers retry it), never turned into a MessageError."""
    from botocore.exceptions import ClientError

    def fail(**_):
        raise ClientError({"Error": {"Code": "InternalError", "Message": "boom"},
                           "ResponseMetadata": {"HTTPStatusCode": 500}}, "HeadObject")
    s3.meta.events.register_first("before-call.s3.HeadObject", lambda **kw: fail())
    with pytest.raises(ClientError):
        s3checks.check_pipeline(s3, corpus.BUCKET, corpus.PIPELINE)


# ----------------------------------------------------------------------------- streaming data files

def test_streamed_data_digest_is_the_workers_fingerprint_of_the_same_rows(s3, tmp_path):
    """The lease's data_sha256 is `data_rows_sha256` over the rows exactly as the worker parses them."""
    from cpb_worker.datafile import read_data_file
    from cpb_worker.fingerprint import data_rows_sha256
    content = (b"\xef\xbb\xbfImage_FileName_DNA , Metadata_Well\r\nd1.tif,A01\r\n\r\nd2.tif,\"A,02\"\r\n"
               b"d3.tif,\"multi\nline\"\r\n" + b"".join(b"d%d.tif,B%02d\r\n" % (i, i) for i in range(4, 40)))
    s3.put_object(Bucket=corpus.BUCKET, Key="d.csv", Body=content)
    scan = s3checks.scan_data_file(s3, corpus.BUCKET, "d.csv")
    (tmp_path / "d.csv").write_bytes(content)
    local = read_data_file(tmp_path / "d.csv")
    assert scan.rows == scan.image_sets == local.count == 39 and scan.skipped == 0
    assert scan.data_sha256 == data_rows_sha256(local.header, local.rows)
    ranged = s3checks.scan_data_file(s3, corpus.BUCKET, "d.csv", {"Process just a range of rows?": "Yes",
                                                                   "Rows to process": "5,9"})
    assert (ranged.rows, ranged.skipped, ranged.image_sets) == (39, 4, 5)
    assert ranged.data_sha256 == data_rows_sha256(local.header, local.rows[4:9])


_QUIRK_HEADER = b"Image_FileName_DNA,Metadata_Site\n"


@pytest.mark.parametrize("name, body", [
    ("nbsp-row", _QUIRK_HEADER + "a.tif,1\n\u00a0,\u00a0\nb.tif,2\n".encode()),
    ("ideographic-space-row", _QUIRK_HEADER + "a.tif,1\n\u3000,\nb.tif,2\n".encode()),
    ("vertical-tab-row", _QUIRK_HEADER + b"a.tif,1\n\x0b,\nb.tif,2\n"),
    ("quoted-space-row", _QUIRK_HEADER + b'a.tif,1\n" "," "\nb.tif,2\n'),
    ("tab-row", _QUIRK_HEADER + b"a.tif,1\n\t,\t\nb.tif,2\n"),
])
def test_the_lambda_counts_a_row_of_odd_whitespace_as_the_worker_does(s3, tmp_path, name, body):
    """Adversary: the Lambda's blank-row rule (str.strip: any Unicode space) and the worker's (spaces,
    tabs, commas) differed, so a row holding only a no-break space was no image set for the Lambda
    and one for the worker (and LoadData): every job failed with 'CPB_IMAGE_SET_COUNT is 2 but the
    data file gives 3 image sets: resubmit', which no resubmission can fix."""
    from cpb_worker.datafile import read_data_file
    from cpb_worker.fingerprint import data_rows_sha256
    s3.put_object(Bucket=corpus.BUCKET, Key=f"{name}.csv", Body=body)
    (tmp_path / "d.csv").write_bytes(body)
    scan, local = s3checks.scan_data_file(s3, corpus.BUCKET, f"{name}.csv"), read_data_file(tmp_path / "d.csv")
    assert scan.rows == local.count
    assert scan.data_sha256 == data_rows_sha256(local.header, local.rows)


def test_a_data_file_ending_lines_with_carriage_returns_alone_is_refused_by_lambda_and_worker(s3, tmp_path):
    """Adversary: old Mac Excel's CSV ends lines with CR alone. The Lambda (universal newlines) counted
    its rows and accepted it; the worker, which splits records at LF, crashed with a Python traceback
    (`_csv.Error: new-line character seen in unquoted field`), leaving no run record to say why."""
    from cpb_worker.datafile import read_data_file
    from cpb_worker.errors import BadInput
    body = b"Image_FileName_DNA,Metadata_Site\ra.tif,1\rb.tif,2\r"
    s3.put_object(Bucket=corpus.BUCKET, Key="mac.csv", Body=body)
    fix = "save it as CSV UTF-8"
    with pytest.raises(MessageError, match=r"mac.csv ends its lines with a carriage return alone \(line 1;.*" + fix):
        s3checks.scan_data_file(s3, corpus.BUCKET, "mac.csv")
    (tmp_path / "mac.csv").write_bytes(body)
    with pytest.raises(BadInput, match=r"data file mac.csv ends its lines with a carriage return alone .*" + fix):
        read_data_file(tmp_path / "mac.csv")
    (tmp_path / "late.csv").write_bytes(b"Image_FileName_DNA,Metadata_Site\na.tif,1\rb.tif,2\n")
    with pytest.raises(BadInput, match=r"data file late.csv ends its lines with a carriage return alone \(line 2;"):
        read_data_file(tmp_path / "late.csv")


def test_a_data_file_line_longer_than_any_loaddata_row_is_refused(s3, monkeypatch):
    monkeypatch.setattr(s3checks, "MAX_LINE_CHARS", 1000)
    s3.put_object(Bucket=corpus.BUCKET, Key="long.csv", Body=b"Image_FileName_DNA\na.tif\n" + b"x" * 5000 + b"\n")
    with pytest.raises(MessageError, match=r"line 3 is longer than 1000 characters"):
        s3checks.scan_data_file(s3, corpus.BUCKET, "long.csv")


def test_a_bad_row_range_setting_names_the_pipeline(s3):
    s3.put_object(Bucket=corpus.BUCKET, Key="r.csv", Body=corpus.GOOD_CSV)
    with pytest.raises(MessageError) as caught:
        s3checks.scan_data_file(s3, corpus.BUCKET, "r.csv", {"Process just a range of rows?": "Yes",
                                                              "Rows to process": "first,last"})
    assert caught.value.field == "pipeline" and "Rows to process" in str(caught.value)


def test_the_time_budget_is_checked_while_a_data_file_streams(s3):
    """`before_call` runs before the GET and for every 256 KiB read: the Lambda stops before its deadline."""
    s3.put_object(Bucket=corpus.BUCKET, Key="big.csv",
                  Body=b"Image_FileName_DNA\n" + b"".join(b"d%07d.tif\n" % i for i in range(100_000)))  # ~1.5 MB
    calls = []
    assert s3checks.scan_data_file(s3, corpus.BUCKET, "big.csv", before_call=calls.append).rows == 100_000
    assert calls[0] == "read the data file" and len(calls) >= 1 + 1_500_000 // (256 * 1024)

    class OutOfTime(Exception):
        pass

    def budget(what):
        if len(calls) > 3:
            raise OutOfTime(what)
        calls.append(what)
    calls.clear()
    with pytest.raises(OutOfTime):
        s3checks.scan_data_file(s3, corpus.BUCKET, "big.csv", before_call=budget)


@pytest.mark.race
def test_a_list_entry_reading_an_earlier_entrys_output_must_wait_for_it(tmp_path):
    """Adversary: a two-step list message without `after`: step 1 reads (as its input or data file)
    the output step 0 is about to rewrite. Both were submitted at once, with no dependsOn, so step 1
    ran on step 0's PREVIOUS results (or on half of the new ones) and succeeded."""
    illum = corpus.good_message(output="results/p/illum")
    reads_folder = corpus.good_message(input="results/p/illum", output="results/p/analysis")
    with pytest.raises(MessageError) as caught:
        parse_body(json.dumps([illum, reads_folder]), LIMITS)
    assert (caught.value.field, caught.value.index) == ("after", 1)
    assert str(caught.value) == ("entry 1: after: its input 'results/p/illum' is written by entry 0 (output "
                                 "'results/p/illum'), which runs at the same time; add \"after\": "
                                 "\"results/p/illum\" so it waits for it")
    reads_csv = corpus.good_message(output="results/p/analysis", data_file="results/p/illum/load_data.csv")
    with pytest.raises(MessageError, match=r"entry 1: after: its data_file 'results/p/illum/load_data.csv' is "
                                           r"written by entry 0"):
        parse_body(json.dumps([illum, reads_csv]), LIMITS)
    reads_parent = corpus.good_message(input="results/p", output="results/q")  # a folder holding entry 0's output
    with pytest.raises(MessageError, match=r"entry 1: after: its input 'results/p' is written by entry 0"):
        parse_body(json.dumps([illum, reads_parent]), LIMITS)
    waits = dict(reads_folder, after="results/p/illum")
    assert [r.output for r in parse_body(json.dumps([illum, waits]), LIMITS)] == ["results/p/illum",
                                                                                  "results/p/analysis"]
    with pytest.raises(MessageError, match=r"entry 0: after: its input 'results/p/illum' is written by entry 1, "
                                           r"which comes later"):
        parse_body(json.dumps([dict(reads_folder), dict(illum)]), LIMITS)
