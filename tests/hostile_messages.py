"""A corpus of bad and adversarial job messages, each with the field its rejection must name.

Shared by the Lambda's tests (`tests/test_ingress_hostile.py`) and the
`cpb submit` tests: every case must be rejected, naming `case.field`, and
must submit no job. Pure data + stdlib (no boto3, no moto), importable as
`hostile_messages` from the tests directory.

How to use it
-------------
- `CORPUS`: tuple of `Hostile` cases. `case.body` is the SQS body exactly as
  sent (text; may be invalid JSON or 300 KB). `case.field` is the field the
  error must name (`MessageError.field`); `case.entry` the list entry it is
  reported for (None for a single object or a whole-body problem), so the
  error text starts with `case.expected_prefix`.
- The corpus assumes the stack described by the constants below: bucket
  `BUCKET` holding `base_objects()` (a pipeline at `PIPELINE`, a good data
  file at `DATA_FILE`) plus the case's own `case.objects` (broken CSVs...),
  own job queue/definition ARNs `QUEUE_ARN`/`JOBDEF_ARN` (what moto gives
  queue `cpb-queue` and definition `cpb-jobdef` in us-east-1, account
  123456789012) and the limits `corpus_limits()` returns (build it with
  `handlers.schema.Limits(**LIMITS)` or call `corpus_limits()`).
- `case.needs_bucket` is True when only the bucket checks
  (`handlers.s3checks.check_request`) can reject it: `parse_body` alone
  accepts those.
- `GOOD_BODY` is a valid message for mixing good and bad in one batch.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Mapping, Optional

__all__ = ["Hostile", "CORPUS", "BUCKET", "PIPELINE", "DATA_FILE", "QUEUE_ARN", "JOBDEF_ARN", "ALLOWED_QUEUE_ARN",
           "LIMITS", "corpus_limits", "base_objects", "GOOD_BODY", "good_message"]

REGION = "us-east-1"
ACCOUNT = "123456789012"
BUCKET = "cpb-test-data"
PIPELINE = "examples/ExampleHuman/ExampleHuman.cppipe"
INPUT = "examples/ExampleHuman/images"
DATA_FILE = "examples/ExampleHuman/load_data.csv"
QUEUE_ARN = f"arn:aws:batch:{REGION}:{ACCOUNT}:job-queue/cpb-queue"
ALLOWED_QUEUE_ARN = f"arn:aws:batch:{REGION}:{ACCOUNT}:job-queue/cpb-queue-allowed"
JOBDEF_ARN = f"arn:aws:batch:{REGION}:{ACCOUNT}:job-definition/cpb-jobdef:1"
LIMITS = dict(bucket=BUCKET, max_vcpu=16, max_memory_mib=61440, default_vcpu=2, default_memory_mib=4096,
              job_queue_arn=QUEUE_ARN, job_definition_arn=JOBDEF_ARN, allowed_arns=(ALLOWED_QUEUE_ARN,))
GOOD_CSV = b"Image_FileName_DNA,Image_FileName_PH3\n" + b"".join(f"d{i}.tif,p{i}.tif\n".encode() for i in range(10))


def corpus_limits():
    """`handlers.schema.Limits` of the stack the corpus assumes (imported lazily: this module is pure data)."""
    from handlers.schema import Limits
    return Limits(**LIMITS)


def base_objects() -> dict:
    """Objects every case assumes are in the bucket (so only the hostile part is wrong)."""
    return {PIPELINE: b"CellProfiler Pipeline: http://www.cellprofiler.org\nVersion:5\n", DATA_FILE: GOOD_CSV,
            f"{INPUT}/d0.tif": b"II*\x00"}


def good_message(**fields) -> dict:
    """A valid message; `fields` override (None removes a field)."""
    base = {"pipeline": PIPELINE, "input": INPUT, "output": "results/hostile-good"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


GOOD_BODY = json.dumps(good_message())


@dataclasses.dataclass(frozen=True)
class Hostile:
    """One hostile message: what is sent, and what its rejection must name."""

    name: str
    body: str
    field: str
    entry: Optional[int] = None
    objects: Mapping[str, bytes] = dataclasses.field(default_factory=dict)
    needs_bucket: bool = False

    @property
    def expected_prefix(self) -> str:
        """How the error text must begin (`str(MessageError)`)."""
        return (f"entry {self.entry}: " if self.entry is not None else "") + f"{self.field}: "


def _msg(**fields) -> str:
    """A body: the good message with `fields` changed (None removes a field)."""
    return json.dumps(good_message(**fields))


def _list(*entries: dict) -> str:
    return json.dumps(list(entries))


def _csv_case(name: str, content: bytes) -> Hostile:
    key = f"hostile/{name}.csv"
    return Hostile(name, _msg(data_file=key, image_sets_per_job=2, output=f"results/{name}"), "data_file",
                   objects={key: content}, needs_bucket=True)


_WIDE_ROWS = 100_001  # one more image set than a run may have children at one set per child
_BIG_CSV = b"Image_FileName_DNA\n" + b"".join(b"d%d.tif\n" % i for i in range(_WIDE_ROWS))
#: A pipeline whose LoadData processes only rows 20..30 of its CSV ("Process just a range of rows").
_RANGE_PIPELINE = b"""CellProfiler Pipeline: http://www.cellprofiler.org
Version:5
DateRevision:428
GitHash:
ModuleCount:1
HasImagePlaneDetails:False

LoadData:[module_num:1|svn_version:\'Unknown\'|variable_revision_number:6|show_window:False|notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]
    Input data file location:Default Input Folder|
    Name of the file:load_data.csv
    Load images based on this data?:Yes
    Base image location:Default Input Folder|
    Process just a range of rows?:Yes
    Rows to process:20,30
    Group images by metadata?:No
    Select metadata tags for grouping:
    Rescale intensities?:Yes
"""
#: An Images/NamesAndTypes pipeline whose channel rule the file-rule counter does not evaluate.
_UNCOUNTABLE_PIPELINE = b"""CellProfiler Pipeline: http://www.cellprofiler.org
Version:5
DateRevision:428
GitHash:
ModuleCount:2
HasImagePlaneDetails:False

Images:[module_num:1|svn_version:\'Unknown\'|variable_revision_number:2|show_window:False|notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]
    :
    Filter images?:Images only
    Select the rule criteria:and (extension does isimage) (directory doesnot containregexp "[\\\\/]\\.")

NamesAndTypes:[module_num:2|svn_version:\'Unknown\'|variable_revision_number:8|show_window:False|notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]
    Assign a name to:Images matching rules
    Select the image type:Grayscale image
    Name to assign these images:DNA
    Match metadata:[]
    Image set matching method:Order
    Set intensity range from:Image metadata
    Assignments count:1
    Single images count:0
    Maximum intensity:255.0
    Process as 3D?:No
    Relative pixel spacing in X:1.0
    Relative pixel spacing in Y:1.0
    Relative pixel spacing in Z:1.0
    Select the rule criteria:and (metadata does Plate "P1")
    Name to assign these images:DNA
"""

CORPUS: tuple = (
    # --- malformed JSON -------------------------------------------------------------------------
    Hostile("plain text", "please run my pipeline", "body"),
    Hostile("truncated JSON", '{"pipeline": "examples/p.cppipe", "input"', "body"),
    Hostile("empty body", "", "body"),
    Hostile("whitespace body", " \n\t ", "body"),
    Hostile("JSON null", "null", "body"),
    Hostile("JSON number", "42", "body"),
    Hostile("JSON string", '"examples/ExampleHuman/ExampleHuman.cppipe"', "body"),
    Hostile("NaN value", _msg().replace('"results/hostile-good"', "NaN"), "body"),
    Hostile("two objects back to back", GOOD_BODY + GOOD_BODY, "body"),
    Hostile("python dict syntax", str(good_message()), "body"),
    Hostile("byte order mark", "\ufeff" + GOOD_BODY, "body"),
    Hostile("nesting bomb", "[" * 100_000 + "]" * 100_000, "body"),
    Hostile("repeated key", GOOD_BODY[:-1] + ', "pipeline": "other/evil.cppipe"}', "pipeline"),
    # --- wrong types ----------------------------------------------------------------------------
    Hostile("pipeline is a number", _msg(pipeline=12), "pipeline"),
    Hostile("input is a list", _msg(input=["a", "b"]), "input"),
    Hostile("output is an object", _msg(output={"key": "results"}), "output"),
    Hostile("memory is a boolean", _msg(job_memory=True), "job_memory"),
    Hostile("vcpu is fractional", _msg(job_vcpu=1.5), "job_vcpu"),
    Hostile("memory with unit", _msg(job_memory="8 GB"), "job_memory"),
    Hostile("negative vcpu", _msg(job_vcpu=-4), "job_vcpu"),
    Hostile("zero vcpu", _msg(job_vcpu="0"), "job_vcpu"),
    Hostile("split is a word", _msg(data_file=DATA_FILE, image_sets_per_job="all"), "image_sets_per_job"),
    Hostile("unsplittable is a string", _msg(unsplittable="yes"), "unsplittable"),
    Hostile("misspelt field", _msg(job_mem=8192), "job_mem"),
    Hostile("list of numbers", "[1, 2, 3]", "body", entry=0),
    Hostile("empty list", "[]", "body"),
    Hostile("missing output", _msg(output=None), "output"),
    Hostile("null pipeline", _msg(pipeline=None).replace("{", '{"pipeline": null, ', 1), "pipeline"),
    # --- huge values ----------------------------------------------------------------------------
    Hostile("memory 10^30", _msg(job_memory=10 ** 30), "job_memory"),
    Hostile("vcpu 20 digits", _msg(job_vcpu="99999999999999999999"), "job_vcpu"),
    Hostile("5000-digit integer", _msg().replace('"results/hostile-good"', "9" * 5000), "body"),
    Hostile("memory 1e400", _msg().replace('"results/hostile-good"}', '"results/x", "job_memory": 1e400}'),
            "job_memory"),
    Hostile("300 KB body", _msg(job_name="n" * 300_000), "body"),
    Hostile("one byte over 256 KiB", GOOD_BODY + " " * (256 * 1024 + 1 - len(GOOD_BODY)), "body"),
    Hostile("2000-character key", _msg(pipeline="p/" * 1000 + "x.cppipe"), "pipeline"),
    Hostile("150 jobs in one list", json.dumps([good_message(output=f"results/many-{i}") for i in range(150)]),
            "body"),
    Hostile("job name longer than Batch allows", _msg(job_name="n" * 129), "job_name"),
    Hostile("5000 jobs in one list", json.dumps([good_message(output=f"results/many-{i}") for i in range(5000)]),
            "body"),
    Hostile("run wider than ten full arrays",
            _msg(data_file="hostile/100001-rows.csv", image_sets_per_job=1, output="results/wide"),
            "image_sets_per_job", objects={"hostile/100001-rows.csv": _BIG_CSV}, needs_bucket=True),
    Hostile("split larger than any plate", _msg(data_file=DATA_FILE, image_sets_per_job=10 ** 9), "image_sets_per_job"),
    # --- path traversal and reserved places -----------------------------------------------------
    Hostile("output climbs out", _msg(output="../../etc"), "output"),
    Hostile("absolute pipeline path", _msg(pipeline="/etc/passwd.cppipe"), "pipeline"),
    Hostile("dot segments in input", _msg(input="images/./../secret"), "input"),
    Hostile("empty folder in output", _msg(output="results//plate"), "output"),
    Hostile("windows traversal in data_file", _msg(data_file="..\\..\\secret.csv"), "data_file"),
    Hostile("output inside input", _msg(output=INPUT + "/results"), "output"),
    Hostile("output in the records folder", _msg(output="results/_cpb"), "output"),
    Hostile("output shaped like an array part", _msg(output="results/plate1/part-00002"), "output"),
    Hostile("output inside an array part", _msg(output="results/plate1/part-00002/more"), "output"),
    Hostile("output inside another run's records", _msg(output="results/plate1/_cpb/events"), "output"),
    Hostile("input inside the output", _msg(input="results/plate1/images", output="results/plate1"), "input"),
    Hostile("input equals the output", _msg(input="results/plate1", output="results/plate1"), "output"),
    Hostile("pipeline is an image", _msg(pipeline=INPUT + "/a.tif"), "pipeline"),
    # --- other buckets and foreign ARNs ---------------------------------------------------------
    Hostile("pipeline in another bucket", _msg(pipeline="s3://someone-elses-bucket/p.cppipe"), "pipeline"),
    Hostile("input over https", _msg(input="https://evil.example.com/images"), "input"),
    Hostile("output in another bucket", _msg(output="s3://cpb-test-data-evil/results"), "output"),
    Hostile("foreign account queue", _msg(job_queue="arn:aws:batch:us-east-1:999999999999:job-queue/cpb-queue"),
            "job_queue"),
    Hostile("job definition by bare name", _msg(job_definition="cpb-jobdef"), "job_definition"),
    Hostile("queue ARN that is a job definition", _msg(job_queue=JOBDEF_ARN), "job_queue"),
    Hostile("same job definition other region",
            _msg(job_definition=f"arn:aws:batch:eu-west-1:{ACCOUNT}:job-definition/cpb-jobdef:1"),
            "job_definition"),
    Hostile("ARN with injected suffix", _msg(job_queue=QUEUE_ARN + "\n,arn:aws:batch:x"), "job_queue"),
    # --- unicode and control characters ---------------------------------------------------------
    Hostile("NUL in job name", _msg(job_name="plate\u00001"), "job_name"),
    Hostile("right-to-left override in output", _msg(output="results/\u202egnp.exe"), "output"),
    Hostile("zero-width space in pipeline", _msg(pipeline=PIPELINE.replace("/", "/\u200b", 1)), "pipeline"),
    Hostile("log injection in job name", _msg(job_name='x\n{"level":"INFO","message":"jobs submitted"}'),
            "job_name"),
    Hostile("leading space in input", _msg(input=" " + INPUT), "input"),
    Hostile("lone surrogate in output", _msg(output="results/\ud800"), "output"),
    Hostile("escape sequence in job name", _msg(job_name="\u001b[31mred"), "job_name"),
    # --- duplicates and overlaps in lists -------------------------------------------------------
    Hostile("duplicate list entries", _list(good_message(output="results/d"), good_message(output="results/d")),
            "body", entry=1),
    Hostile("two entries, one output", _list(good_message(output="results/o"),
                                             good_message(output="results/o", job_vcpu=4)), "output", entry=1),
    Hostile("nested outputs", _list(good_message(output="results/n"), good_message(output="results/n/inner")),
            "output", entry=1),
    Hostile("last entry bad", _list(good_message(output="results/l0"), good_message(output="results/l1"),
                                    good_message(output="results/l2", job_vcpu="many")), "job_vcpu", entry=2),
    Hostile("list entry is a list", _list(good_message(output="results/e0"), [good_message()]), "body", entry=1),
    # --- bucket objects ---------------------------------------------------------------------------
    _csv_case("broken-row", b"Image_FileName_DNA,Image_FileName_PH3\nd1.tif,p1.tif\nd2.tif\n"),
    _csv_case("latin-1", "Image_FileName_DNA\nZellkern_\u00e4.tif\n".encode("latin-1")),
    _csv_case("header-only", b"Image_FileName_DNA,Image_FileName_PH3\n"),
    _csv_case("binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"),
    _csv_case("unclosed-quote", b'Image_FileName_DNA,Metadata_Well\n"d1.tif,A01\nd2.tif,A02\n'),
    _csv_case("no-image-column", b"Metadata_Plate,Metadata_Well\nP1,A01\n"),
    _csv_case("repeated-column", b"Image_FileName_DNA,Image_FileName_DNA\nd1.tif,d2.tif\n"),
    _csv_case("empty-file", b""),
    Hostile("data file not in bucket", _msg(data_file="hostile/nowhere.csv"), "data_file", needs_bucket=True),
    Hostile("pipeline not in bucket", _msg(pipeline="pipelines/nowhere.cppipe"), "pipeline", needs_bucket=True),
    Hostile("empty pipeline object", _msg(pipeline="hostile/empty.cppipe"), "pipeline",
            objects={"hostile/empty.cppipe": b""}, needs_bucket=True),
    Hostile("input prefix holds nothing", _msg(input="examples/ExampleHumn/images"), "input", needs_bucket=True),
    Hostile("input is a prefix of a file name", _msg(input=INPUT + "/d0"), "input", needs_bucket=True),
    Hostile("split without data file of an unreadable pipeline", _msg(image_sets_per_job=4), "image_sets_per_job",
            needs_bucket=True),
    Hostile("split by file rules the counter cannot evaluate",
            _msg(pipeline="hostile/uncountable.cppipe", image_sets_per_job=2, output="results/uncountable"),
            "image_sets_per_job", objects={"hostile/uncountable.cppipe": _UNCOUNTABLE_PIPELINE}, needs_bucket=True),
    Hostile("LoadData row range beyond the data file",
            _msg(pipeline="hostile/range.cppipe", data_file=DATA_FILE, output="results/range"), "data_file",
            objects={"hostile/range.cppipe": _RANGE_PIPELINE}, needs_bucket=True),
    # --- chaining, idempotency and resume fields ------------------------------------------------
    Hostile("client token too short", _msg(client_token="abc"), "client_token"),
    Hostile("client token with a slash", _msg(client_token="token/../../x"), "client_token"),
    Hostile("client token is a number", _msg(client_token=12345678), "client_token"),
    Hostile("two client tokens in one list", _list(good_message(output="results/t0", client_token="tokentoken0"),
                                                   good_message(output="results/t1", client_token="tokentoken1")),
            "client_token", entry=1),
    Hostile("resume is a string", _msg(resume="false"), "resume"),
    Hostile("after is a number", _msg(after=7), "after"),
    Hostile("after is an empty list", _msg(after=[]), "after"),
    Hostile("after names its own output", _msg(after="results/hostile-good"), "after"),
    Hostile("after names a folder inside its own output", _msg(after="results/hostile-good/illum"), "after"),
    Hostile("after climbs out", _msg(after="../results/illum"), "after"),
    Hostile("after in another bucket", _msg(after="s3://elsewhere/results/illum"), "after"),
    Hostile("after a later entry", _list(good_message(output="results/a0", after="results/a1"),
                                         good_message(output="results/a1")), "after", entry=0),
    Hostile("after itself in a list", _list(good_message(output="results/s0"),
                                            good_message(output="results/s1", after=["results/s0", "results/s1"])),
            "after", entry=1),
    Hostile("after eleven outputs", _msg(after=[f"results/up-{i}" for i in range(11)]), "after"),
)
