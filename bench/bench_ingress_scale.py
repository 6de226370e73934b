"""Ingress Lambda at plate and screen scale: memory and time per message vs data-file rows, and a
100,000-row plate split into array jobs within Batch's 10,000-child limit.

Run: `python bench/bench_ingress_scale.py` (about a minute). moto runs as a server in this process;
each measurement runs the real handler (`handlers.ingress.handler`) in a FRESH child process
pointed at it (AWS_ENDPOINT_URL), so the child's peak RSS is the Lambda's alone (moto's copy of
the objects lives in this process). Figures printed:

- per data-file size (1k, 10k, 100k, 1M rows): the child's peak RSS above its warm baseline (Python,
  boto3, Powertools and one small message already loaded) for one message, and the handler's seconds;
  the ratios 1M vs 1k are the point (memory flat, time linear);
- the same for a batch of 10 messages of 1M rows each (the SQS batch size): what sizes the Lambda;
- the previous approach (read the whole object, decode, parse) on the 1M-row file, for contrast;
- the 100,000-row plate with image_sets_per_job 5: children, array jobs, sizes and offsets.

Absolute seconds depend on this (shared) machine; a Lambda gets one full vCPU at 1,769 MB of memory,
proportionally less below.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "ERROR")
os.environ.update(AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1", AWS_ACCESS_KEY_ID="testing",
                  AWS_SECRET_ACCESS_KEY="testing", AWS_SESSION_TOKEN="testing")
os.environ.pop("AWS_PROFILE", None)

BUCKET = "cpb-bench-scale"
PIPELINE = "pipelines/bench.cppipe"
SIZES = (1_000, 10_000, 100_000, 1_000_000)
PLATE_ROWS = 100_000


def data_key(rows: int) -> str:
    return f"plates/rows-{rows}/load_data.csv"


def csv_bytes(rows: int) -> bytes:
    """A LoadData CSV of short rows (~12 bytes each, as the issue's 10 M-row / 38 MiB measurement)."""
    return b"Image_FileName_DNA\n" + b"".join(b"d%07d.tif\n" % i for i in range(rows))


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: per address space, so a child does not inherit the parent's peak
    as `ru_maxrss` does across fork + exec); ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- child: one measurement

class Context:
    aws_request_id = "bench"
    function_name = "cpb-ingress"
    memory_limit_in_mb = 1024
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:cpb-ingress"

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


def record(body: dict) -> dict:
    return {"messageId": str(uuid.uuid4()), "receiptHandle": "r", "body": json.dumps(body),
            "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {}, "md5OfBody": "0" * 32,
            "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q", "awsRegion": "us-east-1"}


def child(args: list) -> None:
    mode, rows, messages, per_job = args[0], int(args[1]), int(args[2]), int(args[3])
    if mode == "whole":  # the previous code's way: the whole object in memory, decoded, parsed
        import csv
        import io
        import boto3
        s3 = boto3.client("s3")
        s3.head_object(Bucket=BUCKET, Key=PIPELINE)
        before = peak_rss_mib()
        start = time.perf_counter()
        raw = s3.get_object(Bucket=BUCKET, Key=data_key(rows))["Body"].read()
        count = sum(1 for row in csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")) if row) - 1
        print(json.dumps({"rows": count, "seconds": time.perf_counter() - start, "rss_before_mib": before,
                          "rss_peak_mib": peak_rss_mib()}))
        return
    from handlers import ingress
    warm = ingress.handler({"Records": [record({"pipeline": PIPELINE, "input": "plates/rows-1000",
                                                "output": f"bench/warm-{uuid.uuid4().hex[:8]}",
                                                "data_file": data_key(1_000), "image_sets_per_job": 100})]},
                           Context())
    assert warm == {"batchItemFailures": []}, warm
    before = peak_rss_mib()
    split = {"image_sets_per_job": per_job} if per_job else {}  # 0: a plain job (its rows are counted all the same)
    event = {"Records": [record({"pipeline": PIPELINE, "input": f"plates/rows-{rows}", "data_file": data_key(rows),
                                 "output": f"bench/{mode}-{rows}-{i}-{uuid.uuid4().hex[:6]}", **split})
                         for i in range(messages)]}
    start = time.perf_counter()
    answer = ingress.handler(event, Context())
    seconds = time.perf_counter() - start
    assert answer == {"batchItemFailures": []}, answer
    out = {"rows": rows, "messages": messages, "seconds": seconds, "rss_before_mib": before, "rss_peak_mib": peak_rss_mib()}
    if mode == "plate":
        import boto3
        lease = json.loads(boto3.client("s3").get_object(
            Bucket=BUCKET, Key=f"{event['Records'][0]['body'] and json.loads(event['Records'][0]['body'])['output']}"
                               "/_cpb/lease.json")["Body"].read())
        out.update(array_size=lease["array_size"], jobs=[(j["array_offset"], j["array_size"]) for j in lease["jobs"]],
                   run_ids=len({lease["run_id"]}))
    print(json.dumps(out))


# ----------------------------------------------------------------------------- parent: moto server + runs

def start_moto() -> tuple:
    import logging
    import urllib.request
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    for path, body in (("/moto-api/reset", b""), ("/moto-api/config", json.dumps({"batch": {"use_docker": False}}).encode())):
        request = urllib.request.Request(url + path, data=body, method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 - 127.0.0.1 only
            answer.read()
    return server, url


def build_stack(url: str) -> dict:
    import boto3
    s3 = boto3.client("s3", endpoint_url=url)
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=PIPELINE, Body=b"CellProfiler Pipeline: http://www.cellprofiler.org\n")
    for rows in sorted(set(SIZES) | {PLATE_ROWS}):
        s3.put_object(Bucket=BUCKET, Key=data_key(rows), Body=csv_bytes(rows))
    role = boto3.client("iam", endpoint_url=url).create_role(RoleName="bench", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    batch = boto3.client("batch", endpoint_url=url)
    ce = batch.create_compute_environment(computeEnvironmentName="bench", type="UNMANAGED", state="ENABLED",
                                          serviceRole=role)["computeEnvironmentArn"]
    queue = batch.create_job_queue(jobQueueName="bench", state="ENABLED", priority=1,
                                   computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce}])["jobQueueArn"]
    jobdef = batch.register_job_definition(jobDefinitionName="bench", type="container", containerProperties={
        "image": "cellprofiler/cellprofiler:4.2.8", "resourceRequirements": [
            {"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "2048"}]})["jobDefinitionArn"]
    return {"AWS_ENDPOINT_URL": url, "CPB_BUCKET": BUCKET, "CPB_JOB_QUEUE": queue, "CPB_JOB_DEFINITION": jobdef,
            "CPB_MAX_VCPU": "16", "CPB_MAX_MEMORY_MIB": "61440"}


def measure(env: dict, mode: str, rows: int, messages: int = 1, per_job: int = 0) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", mode, str(rows), str(messages), str(per_job)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=1800, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"child {mode} {rows} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def scan_seconds(rows: int) -> float:
    """`scan_data_file` over an in-memory stream: the Lambda's own CPU cost per row, without S3 or moto."""
    import io
    from handlers import s3checks
    data = csv_bytes(rows)

    class S3:
        def get_object(self, Bucket: str, Key: str) -> dict:
            return {"ContentLength": len(data), "Body": io.BytesIO(data)}

    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        assert s3checks.scan_data_file(S3(), BUCKET, "x.csv").rows == rows
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    server, url = start_moto()
    try:
        env = build_stack(url)
        print(f"data files: {', '.join(f'{r:,} rows = {len(csv_bytes(r)) / 2**20:.1f} MiB' for r in SIZES)}")
        print("\none message per invocation (a plain job with that data file), fresh process each:")
        print(f"{'rows':>10} {'handler s':>10} {'us/row':>8} {'warm RSS MiB':>13} {'peak RSS MiB':>13} {'growth MiB':>11}")
        results = {}
        for rows in SIZES:
            r = results[rows] = measure(env, "one", rows)
            print(f"{rows:>10,} {r['seconds']:>10.2f} {r['seconds'] / rows * 1e6:>8.2f} {r['rss_before_mib']:>13.1f} "
                  f"{r['rss_peak_mib']:>13.1f} {r['rss_peak_mib'] - r['rss_before_mib']:>11.1f}")
        small, big = results[SIZES[0]], results[SIZES[-1]]
        print(f"\nratio 1M rows vs 1k rows: peak RSS x{big['rss_peak_mib'] / small['rss_peak_mib']:.2f} "
              f"(flat is x1.00), handler time x{big['seconds'] / small['seconds']:.0f} for x1000 the rows")
        batch = measure(env, "batch", 1_000_000, messages=10)
        print(f"batch of 10 messages x 1M rows: peak RSS {batch['rss_peak_mib']:.1f} MiB "
              f"(+{batch['rss_peak_mib'] - batch['rss_before_mib']:.1f} over warm), {batch['seconds']:.1f} s")
        whole = measure(env, "whole", 1_000_000)
        print(f"previous approach (whole object in memory) on 1M rows: peak RSS {whole['rss_peak_mib']:.1f} MiB "
              f"(+{whole['rss_peak_mib'] - whole['rss_before_mib']:.1f}); streaming: "
              f"+{big['rss_peak_mib'] - big['rss_before_mib']:.1f}")
        scan = scan_seconds(1_000_000)
        mib = len(csv_bytes(1_000_000)) / 2**20
        print(f"scan alone (stream, validate, count, digest; no S3): {scan:.2f} s per 1M rows = {scan / mib:.2f} s per MiB "
              f"on one core here; the 64 MiB cap ~{scan / mib * 64:.0f} s")
        print("Lambda CPU is proportional to memory (1 vCPU at 1,769 MB): worst case (64 MiB file) and a batch of ten "
              "1M-row messages, handler seconds:")
        for memory in (256, 512, 1024, 1769):
            share = min(1.0, memory / 1769)
            print(f"  {memory:>5} MB: 64 MiB file ~{scan / mib * 64 / share:5.0f} s, 10 x 1M rows "
                  f"~{10 * scan / share:5.0f} s, a 3,456-row plate ~{scan * 3456 / 1e6 / share:5.2f} s")

        plate = measure(env, "plate", PLATE_ROWS, per_job=5)
        limit_ok = all(size <= 10_000 for _, size in plate["jobs"])
        print(f"\n{PLATE_ROWS:,}-row plate, image_sets_per_job 5: {plate['array_size']:,} children in "
              f"{len(plate['jobs'])} array jobs {plate['jobs']} (offset, size) of one run; each within Batch's "
              f"10,000: {limit_ok}; {plate['seconds']:.1f} s")
        return 0 if limit_ok and plate["array_size"] == PLATE_ROWS // 5 else 1
    finally:
        server.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
