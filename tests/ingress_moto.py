"""Test support for the ingress Lambda: a moto stack (S3 + Batch), SQS-shaped events, fault injection.

Import the `moto_stack` fixture into a test module (`from ingress_moto import moto_stack`).
Everything runs in-process (`mock_aws` with Batch `use_docker: False`), so
the handler makes its real boto3 calls against moto.

Fault injection goes through botocore's event system on the handler's own
clients (`handlers.ingress.services()`): `FaultInjector` answers the first N
matching requests itself with a real-looking AWS error response (429
throttling, 5xx) *before* moto sees them, so botocore's retry logic is what is
exercised, and the call that finally goes through is the real one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from typing import Any, Callable, Optional

import boto3
import pytest
from moto import mock_aws
from moto.core.botocore_stubber import MockRawResponse
from botocore.awsrequest import AWSResponse

from handlers import ingress


class SimulatedTimeout(BaseException):
    """The Lambda runtime killing the invocation: nothing after this point runs (not an Exception)."""


def crash_when(client, operation: str, predicate):
    """Kill the 'invocation' when a request of `operation` matching `predicate(body)` is about to be
    sent; returns the function that removes the hook."""
    def hook(request, **_):
        body = request.body.read() if hasattr(request.body, "read") else request.body
        if hasattr(request.body, "seek"):
            request.body.seek(0)
        if predicate(body or b""):
            raise SimulatedTimeout(operation)
    event = f"before-send.{client.meta.service_model.endpoint_prefix}.{operation}"
    client.meta.events.register_first(event, hook)
    return lambda: client.meta.events.unregister(event, hook)


REGION = "us-east-1"
ACCOUNT = "123456789012"
BUCKET = "cpb-test-data"
QUEUE_NAME = "cpb-queue"
OTHER_QUEUE_NAME = "cpb-queue-allowed"
JOBDEF_NAME = "cpb-jobdef"
MOTO_CONFIG = {"batch": {"use_docker": False}}
PIPELINE = "examples/ExampleHuman/ExampleHuman.cppipe"
DATA_FILE = "examples/ExampleHuman/load_data.csv"
#: Batch's job name rule (first character alphanumeric; moto's simple backend does not check it).
JOB_NAME_RULE = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"


@dataclasses.dataclass
class Stack:
    """The moto resources standing in for one deployed stack."""

    s3: Any
    batch: Any
    queue_arn: str
    other_queue_arn: str
    jobdef_arn: str
    env: dict

    def put(self, key: str, body: bytes) -> None:
        self.s3.put_object(Bucket=BUCKET, Key=key, Body=body)

    def jobs(self, queue_arn: Optional[str] = None) -> list:
        """Described top-level jobs (array parents, not children) of a queue, oldest first."""
        queue = queue_arn or self.queue_arn
        summaries = self.batch.list_jobs(jobQueue=queue, filters=[{"name": "JOB_NAME", "values": ["*"]}])
        ids = [j["jobId"] for j in summaries["jobSummaryList"] if ":" not in j["jobId"]]
        if not ids:
            return []
        described = self.batch.describe_jobs(jobs=ids)["jobs"]
        return sorted(described, key=lambda j: j["createdAt"])

    def record(self, output: str, message_id: str) -> dict:
        from handlers.schema import submission_id
        body = self.s3.get_object(Bucket=BUCKET, Key=f"{output}/_cpb/submission-{submission_id(message_id)}.json")
        return json.loads(body["Body"].read())


def build_stack() -> Stack:
    """Bucket with a pipeline + data file, an unmanaged CE, two queues (own + allow-listed), a job definition."""
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=PIPELINE, Body=b"CellProfiler Pipeline: http://www.cellprofiler.org\n")
    s3.put_object(Bucket=BUCKET, Key="examples/ExampleHuman/images/d0.tif", Body=b"II*\x00")
    s3.put_object(Bucket=BUCKET, Key=DATA_FILE,
                  Body=b"Image_FileName_DNA,Image_FileName_PH3\n" + b"".join(
                      f"d{i}.tif,p{i}.tif\n".encode() for i in range(10)))
    iam = boto3.client("iam", region_name=REGION)
    role = iam.create_role(RoleName="cpb-batch-service", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                "Principal": {"Service": "batch.amazonaws.com"}}]}))["Role"]["Arn"]
    batch = boto3.client("batch", region_name=REGION)
    ce = batch.create_compute_environment(computeEnvironmentName="cpb-ce", type="UNMANAGED", state="ENABLED",
                                          serviceRole=role)["computeEnvironmentArn"]
    queues = [batch.create_job_queue(jobQueueName=name, state="ENABLED", priority=1,
                                     computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce}])["jobQueueArn"]
              for name in (QUEUE_NAME, OTHER_QUEUE_NAME)]
    jobdef = batch.register_job_definition(jobDefinitionName=JOBDEF_NAME, type="container", containerProperties={
        "image": "cellprofiler/cellprofiler:4.2.8", "command": ["python", "-m", "cpb_worker"],
        "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "2048"}]})
    env = {"CPB_BUCKET": BUCKET, "CPB_JOB_QUEUE": queues[0], "CPB_JOB_DEFINITION": jobdef["jobDefinitionArn"],
           "CPB_ALLOWED_ARNS": queues[1], "CPB_MAX_VCPU": "16", "CPB_MAX_MEMORY_MIB": "61440",
           "CPB_DEFAULT_VCPU": "2", "CPB_DEFAULT_MEMORY_MIB": "4096"}
    return Stack(s3=s3, batch=batch, queue_arn=queues[0], other_queue_arn=queues[1],
                 jobdef_arn=jobdef["jobDefinitionArn"], env=env)


@pytest.fixture
def moto_stack(monkeypatch: pytest.MonkeyPatch):
    """A fresh moto account with the stack's resources and the Lambda environment set."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    with mock_aws(config=MOTO_CONFIG):
        stack = build_stack()
        for key, value in stack.env.items():
            monkeypatch.setenv(key, value)
        ingress.reset_services()
        yield stack
        ingress.reset_services()


class LambdaContext:
    """The parts of the Lambda context the handler reads."""

    def __init__(self, remaining_s: float = 300.0, clock: Callable[[], float] = None) -> None:
        import time
        self._clock = clock or time.time
        self._deadline = self._clock() + remaining_s
        self.aws_request_id = str(uuid.uuid4())
        self.function_name = "cpb-ingress"
        self.memory_limit_in_mb = 256
        self.invoked_function_arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:cpb-ingress"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - self._clock()) * 1000))


def sqs_record(body: str, message_id: Optional[str] = None, receive_count: int = 1) -> dict:
    """One SQS record as the event source mapping delivers it."""
    return {
        "messageId": message_id or str(uuid.uuid4()),
        "receiptHandle": "AQEB" + uuid.uuid4().hex,
        "body": body,
        "attributes": {"ApproximateReceiveCount": str(receive_count), "SentTimestamp": "1764038400000",
                       "SenderId": "AIDAEXAMPLE", "ApproximateFirstReceiveTimestamp": "1764038400001"},
        "messageAttributes": {},
        "md5OfBody": "0" * 32,
        "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:{REGION}:{ACCOUNT}:cpb-jobs",
        "awsRegion": REGION,
    }


def sqs_event(*records: dict) -> dict:
    return {"Records": list(records)}


def failed_ids(response: dict) -> list:
    return [item["itemIdentifier"] for item in response["batchItemFailures"]]


def message(**fields: Any) -> dict:
    """A valid job message for the moto stack, with `fields` overriding/adding (None deletes)."""
    base = {"pipeline": PIPELINE, "input": "examples/ExampleHuman/images", "output": f"results/{uuid.uuid4().hex[:8]}"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def environment(job: dict) -> dict:
    return {e["name"]: e["value"] for e in job["container"]["environment"]}


def recorded_overrides(job_id: str) -> dict:
    """The containerOverrides moto's Batch backend received (describe_jobs does not echo resourceRequirements)."""
    from moto.batch.models import batch_backends
    return batch_backends[ACCOUNT][REGION]._jobs[job_id].container_overrides


def resources(job_id: str) -> dict:
    return {r["type"]: r["value"] for r in recorded_overrides(job_id).get("resourceRequirements", [])}


class FaultInjector:
    """Answers the first `times` requests of `operation` with an AWS error, then lets them through to moto.

    `calls` counts every attempt botocore sent (injected + real), so tests see the retries.
    """

    def __init__(self, client: Any, operation: str, *, status: int, code: str, times: int,
                 executed: bool = False) -> None:
        """`executed=True`: moto still performs the call, only the answer is lost (a 5xx after the fact)."""
        self.status, self.code, self.remaining, self.calls, self.executed = status, code, times, 0, executed
        self.event = f"before-send.{client.meta.service_model.endpoint_prefix}.{operation}"
        self.protocol = client.meta.service_model.protocol
        self.client = client
        client.meta.events.register_first(self.event, self)

    def __call__(self, request: Any, **_: Any) -> Optional[AWSResponse]:
        self.calls += 1
        if self.remaining <= 0:
            return None  # moto answers
        self.remaining -= 1
        # botocore calls *every* before-send handler and uses the first response, so moto
        # would still execute this attempt; point it at a URL moto does not serve instead.
        original_url = request.url
        if not self.executed:
            request.url = "http://fault-injected.invalid/"
        if self.protocol in ("rest-xml", "query"):
            body = (f"<Error><Code>{self.code}</Code><Message>injected {self.code}</Message>"
                    f"<RequestId>injected</RequestId></Error>").encode()
            headers = {"Content-Type": "application/xml"}
        else:
            body = json.dumps({"__type": self.code, "message": f"injected {self.code}"}).encode()
            headers = {"Content-Type": "application/json", "x-amzn-ErrorType": self.code}
        return AWSResponse(original_url, self.status, headers, MockRawResponse(body))

    def remove(self) -> None:
        self.client.meta.events.unregister(self.event, self)


class CallCounter:
    """Counts AWS API calls per operation made by a client (botocore `before-call` events)."""

    def __init__(self, *clients: Any) -> None:
        self.counts: dict = {}
        for client in clients:
            client.meta.events.register("before-call.*.*", self)

    def __call__(self, model: Any, **_: Any) -> None:
        self.counts[model.name] = self.counts.get(model.name, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class LogLines(logging.Handler):
    """Collects the handler's log records rendered by Powertools' own JSON formatter."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(ingress.logger.registered_formatter.format(record)))

    def failures(self) -> list:
        return [line for line in self.lines if line["message"] == "job message failed"]


@pytest.fixture
def logs():
    """The structured lines the ingress logger writes during a test."""
    collector = LogLines()
    std_logger = logging.getLogger("cpb-ingress")
    std_logger.addHandler(collector)
    yield collector
    std_logger.removeHandler(collector)


# ----------------------------------------------------------------------------- runs, leases, Batch job states

def lease(output: str) -> Optional[dict]:
    """The output lease `<output>/_cpb/lease.json` in the moto bucket (None when there is none)."""
    s3 = boto3.client("s3", region_name=REGION)
    try:
        return json.loads(s3.get_object(Bucket=BUCKET, Key=f"{output}/_cpb/lease.json")["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def moto_job(job_id: str) -> Any:
    """moto's Batch job object (the emulated cloud's state, which tests move along like Batch would)."""
    from moto.batch.models import batch_backends
    return batch_backends[ACCOUNT][REGION]._jobs[job_id]


def set_job_state(job_id: str, status: str, *, exit_code: Optional[int] = None, reason: Optional[str] = None,
                  children: Optional[str] = None) -> None:
    """Move a job (and, with `children`, every child of an array job) to `status` as Batch would."""
    job = moto_job(job_id)
    job.status = status
    if exit_code is not None:
        job.exit_code = exit_code
        job.job_stopped = True
    if reason is not None:
        job.job_stopped_reason = reason
    for child in (job._child_jobs or []) if children else []:
        child.status = children


@pytest.fixture
def jobs_keep_running(monkeypatch: pytest.MonkeyPatch):
    """moto's Batch without Docker marks every job SUCCEEDED at once; here submitted jobs stay RUNNING
    (as a real plate's jobs do for hours) until a test moves them on with `set_job_state`."""
    import datetime as dt
    from moto.batch_simple.models import BatchSimpleBackend

    def leave_running(self: Any, include_start_attempt: bool, job: Any) -> None:
        self.backend._jobs[job.job_id] = job
        job.job_started_at = dt.datetime.now()
        job.status = "RUNNING"

    monkeypatch.setattr(BatchSimpleBackend, "_mark_job_as_finished", leave_running)


def redriven_record(body: str, original_id: str, receive_count: int = 1) -> dict:
    """An SQS record as `cpb requeue --dlq` sends it again: a new message id, the original identity
    in the `cpb-original-message-id` attribute."""
    record = sqs_record(body, receive_count=receive_count)
    record["messageAttributes"] = {"cpb-original-message-id": {"stringValue": original_id, "dataType": "String",
                                                               "stringListValues": [], "binaryListValues": []}}
    return record


#: An Images/Metadata/NamesAndTypes pipeline (two channels matched by Well and Site metadata) whose
#: image sets `cpb_worker.filerules` counts exactly from the file names.
METADATA_PIPELINE = """CellProfiler Pipeline: http://www.cellprofiler.org
Version:5
DateRevision:428
GitHash:
ModuleCount:4
HasImagePlaneDetails:False

Images:[module_num:1|svn_version:'Unknown'|variable_revision_number:2|show_window:False|notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]
    :
    Filter images?:Images only
    Select the rule criteria:and (extension does isimage)

Metadata:[module_num:2|svn_version:'Unknown'|variable_revision_number:6|show_window:False|notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]
    Extract metadata?:Yes
    Metadata data type:Text
    Metadata types:{}
    Extraction method count:1
    Metadata extraction method:Extract from file/folder names
    Metadata source:File name
    Regular expression to extract from file name:^(?P<Well>[A-P][0-9]{2})_s(?P<Site>[0-9])_w(?P<Channel>[12])
    Regular expression to extract from folder name:(?P<Date>.*)
    Extract metadata from:All images
    Select the filtering criteria:and (file does contain "")
    Metadata file location:Elsewhere...|
    Match file and image metadata:[]
    Use case insensitive matching?:No
    Metadata file name:
    Does cached metadata exist?:No

NamesAndTypes:[module_num:3|svn_version:'Unknown'|variable_revision_number:8|show_window:False|notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]
    Assign a name to:Images matching rules
    Select the image type:Grayscale image
    Name to assign these images:DNA
    Match metadata:[{'DNA': 'Well', 'GFP': 'Well'}, {'DNA': 'Site', 'GFP': 'Site'}]
    Image set matching method:Metadata
    Set intensity range from:Image metadata
    Assignments count:2
    Single images count:0
    Maximum intensity:255.0
    Process as 3D?:No
    Relative pixel spacing in X:1.0
    Relative pixel spacing in Y:1.0
    Relative pixel spacing in Z:1.0
    Select the rule criteria:and (file does contain "_w1")
    Name to assign these images:DNA
    Name to assign these objects:Cell
    Select the image type:Grayscale image
    Set intensity range from:Image metadata
    Maximum intensity:255.0
    Select the rule criteria:and (file does contain "_w2")
    Name to assign these images:GFP
    Name to assign these objects:Cell
    Select the image type:Grayscale image
    Set intensity range from:Image metadata
    Maximum intensity:255.0

ExportToSpreadsheet:[module_num:4|svn_version:'Unknown'|variable_revision_number:13|show_window:False|notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]
    Select the column delimiter:Comma (",")
    Add image metadata columns to your object data file?:No
    Add image file and folder names to your object data file?:No
    Select the measurements to export:No
    Calculate the per-image mean values for object measurements?:No
    Calculate the per-image median values for object measurements?:No
    Calculate the per-image standard deviation values for object measurements?:No
    Output file location:Default Output Folder|
    Create a GenePattern .gct file?:No
    Select source of sample row name:Metadata
    Select the image to use as the identifier:None
    Select the metadata to use as the identifier:None
    Export all measurement types?:Yes
    Press button to select measurements:
    Representation of Nan/Inf:NaN
    Add a prefix to file names?:No
    Filename prefix:MyExpt_
    Overwrite existing files without warning?:No
    Data to export:Do not use
    Combine these object measurements with those of the previous object?:No
    File name:DATA.csv
    Use the object name for the file name?:Yes
"""


def loaddata_pipeline(rows: str = "1,100000", ranged: bool = False) -> bytes:
    """A LoadData pipeline; `ranged=True` turns on "Process just a range of rows" with `rows` ("3,8")."""
    return f"""CellProfiler Pipeline: http://www.cellprofiler.org
Version:5
DateRevision:428
GitHash:
ModuleCount:1
HasImagePlaneDetails:False

LoadData:[module_num:1|svn_version:'Unknown'|variable_revision_number:6|show_window:False|notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]
    Input data file location:Default Input Folder|
    Name of the file:load_data.csv
    Load images based on this data?:Yes
    Base image location:Default Input Folder|
    Process just a range of rows?:{'Yes' if ranged else 'No'}
    Rows to process:{rows}
    Group images by metadata?:No
    Select metadata tags for grouping:
    Rescale intensities?:Yes
""".encode()
