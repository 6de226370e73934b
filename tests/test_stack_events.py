"""JobEvents (EventBridge rule -> job-events Lambda, its DLQ) and the stack's dashboard."""
from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

from components.events import (ASYNC_MAX_RETRY_ATTEMPTS, METRICS, METRICS_DIMENSION, METRICS_NAMESPACE,
                               job_state_change_pattern)
from stack_harness import REGION, Recorded, policy_document, program

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FUNCTION = "aws:lambda/function:Function"
QUEUE = "aws:sqs/queue:Queue"
RULE = "aws:cloudwatch/eventRule:EventRule"
TARGET = "aws:cloudwatch/eventTarget:EventTarget"


@pytest.fixture(params=["true", "false"], ids=["fsx-on", "fsx-off"])
def stack(request: pytest.FixtureRequest) -> Recorded:
    return program(fsxEnabled=request.param)


def batch_event(status: str, queue: str, **detail) -> dict:
    """A "Batch Job State Change" event as EventBridge delivers it (AWS Batch user guide)."""
    return {"version": "0", "id": "c8f9c4b5-76e5-d76a-f980-7011e206042b", "detail-type": "Batch Job State Change",
            "source": "aws.batch", "account": "123456789012", "time": "2026-11-30T12:00:00Z", "region": REGION,
            "resources": [f"arn:aws:batch:{REGION}:123456789012:job/4c7599ae"],
            "detail": {"jobArn": f"arn:aws:batch:{REGION}:123456789012:job/4c7599ae", "jobName": "n",
                       "jobId": "4c7599ae", "jobQueue": queue, "status": status, "attempts": [], **detail}}


def test_rule_takes_final_states_of_this_stacks_queue_only(stack: Recorded) -> None:
    pattern = json.loads(stack.one(RULE).inputs["eventPattern"])
    assert pattern == job_state_change_pattern(stack.outputs["jobQueueArn"])
    assert pattern["detail"]["status"] == ["SUCCEEDED", "FAILED"]


def test_the_pattern_matches_as_eventbridge_matches_it(stack: Recorded) -> None:
    """An event-bus matcher decides (moto's: a rule with the stack's pattern delivering to a queue), not
    our reading of the pattern."""
    pattern = stack.one(RULE).inputs["eventPattern"]
    ours, other = stack.outputs["jobQueueArn"], stack.outputs["jobQueueArn"].replace("cpb-test-jobs", "someone-else")
    with mock_aws():
        events, sqs = boto3.client("events", region_name=REGION), boto3.client("sqs", region_name=REGION)
        url = sqs.create_queue(QueueName="delivered")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        events.put_rule(Name="jobs", EventPattern=pattern)
        events.put_targets(Rule="jobs", Targets=[{"Id": "q", "Arn": arn}])

        def matches(event: dict) -> bool:
            answer = events.put_events(Entries=[{"Source": event["source"], "DetailType": event["detail-type"],
                                                 "Resources": event["resources"],
                                                 "Detail": json.dumps(event["detail"])}])
            assert answer["FailedEntryCount"] == 0
            got = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages", [])
            for message in got:
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            return bool(got)

        assert matches(batch_event("SUCCEEDED", ours))
        assert matches(batch_event("FAILED", ours, statusReason="Essential container in task exited",
                                   container={"exitCode": 137, "reason": "OutOfMemoryError: Container killed"}))
        assert not matches(batch_event("RUNNING", ours))
        assert not matches(batch_event("FAILED", other))
        assert not matches({**batch_event("FAILED", ours), "source": "aws.ecs"})


def test_the_rule_targets_the_events_lambda_with_retries_and_a_dead_letter_queue(stack: Recorded) -> None:
    target = stack.one(TARGET).inputs
    function = stack.one(FUNCTION, "events")
    dlq = stack.one(QUEUE, "events-dlq")
    assert target["rule"] == stack.one(RULE).state["name"]
    assert target["arn"] == function.state["arn"]
    assert target["deadLetterConfig"] == {"arn": dlq.state["arn"]}
    assert target["retryPolicy"]["maximumEventAgeInSeconds"] == 24 * 3600
    assert target["retryPolicy"]["maximumRetryAttempts"] > 0
    permission = stack.one("aws:lambda/permission:Permission").inputs
    assert (permission["principal"], permission["sourceArn"]) == ("events.amazonaws.com",
                                                                   stack.one(RULE).state["arn"])
    assert permission["function"] == function.state["name"] and permission["action"] == "lambda:InvokeFunction"
    # An event whose handler raised is retried by Lambda, then parked in the same queue.
    invoke = stack.one("aws:lambda/functionEventInvokeConfig:FunctionEventInvokeConfig").inputs
    assert invoke["destinationConfig"] == {"onFailure": {"destination": dlq.state["arn"]}}
    assert invoke["maximumRetryAttempts"] == ASYNC_MAX_RETRY_ATTEMPTS == 2


def test_only_eventbridge_from_this_rule_may_park_events_and_only_over_tls(stack: Recorded) -> None:
    dlq = stack.one(QUEUE, "events-dlq")
    policy = stack.one("aws:sqs/queuePolicy:QueuePolicy", "events-dlq")
    assert policy.inputs["queueUrl"] == dlq.id
    deny, allow = policy_document(policy)["Statement"]
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert allow == {"Sid": "EventBridgeParksUndeliverableEvents", "Effect": "Allow",
                     "Principal": {"Service": "events.amazonaws.com"}, "Action": "sqs:SendMessage",
                     "Resource": dlq.state["arn"],
                     "Condition": {"ArnEquals": {"aws:SourceArn": stack.one(RULE).state["arn"]}}}
    assert dlq.inputs["sqsManagedSseEnabled"] is True


def test_events_lambda_gets_the_contract_environment(stack: Recorded) -> None:
    function = stack.one(FUNCTION, "events").inputs
    assert function["handler"] == "handlers.events.handler" and function["runtime"] == "python3.12"
    assert function["name"] == "cpb-test-job-events"
    env = function["environment"]["variables"]
    assert env == {"CPB_BUCKET": stack.outputs["bucketName"], "CPB_JOB_QUEUE": stack.outputs["jobQueueArn"],
                   "CPB_JOB_DEFINITION": stack.outputs["jobDefinitionArn"], "CPB_MAX_MEMORY_MIB": "61440",
                   "CPB_OOM_MAX_RETRIES": "2", "CPB_STACK": "test", "POWERTOOLS_SERVICE_NAME": "cpb-job-events",
                   "POWERTOOLS_METRICS_NAMESPACE": "CellPaintingBatch"}
    assert function["loggingConfig"]["logGroup"] == "/aws/lambda/cpb-test-job-events"


def test_oom_settings_follow_config() -> None:
    env = program(fsxEnabled="false", oomMaxRetries="0", jobMaxMemoryMib="30000").one(
        FUNCTION, "events").inputs["environment"]["variables"]
    assert (env["CPB_OOM_MAX_RETRIES"], env["CPB_MAX_MEMORY_MIB"]) == ("0", "30000")


def test_events_role_is_least_privilege(stack: Recorded) -> None:
    bucket = stack.one("aws:s3/bucket:Bucket").state["arn"]
    queue, definition = stack.outputs["jobQueueArn"], stack.outputs["jobDefinitionArn"]
    statements = {s["Sid"]: s for s in policy_document(stack.one("aws:iam/rolePolicy:RolePolicy", "events"))[
        "Statement"]}
    assert set(statements) == {"ReadJobs", "ResubmitOutOfMemoryJobs", "ListDataBucket", "ReadWriteLeasesAndJobEvents",
                               "ParkFailedEvents", "WriteOwnLogs"}
    assert all(s["Effect"] == "Allow" for s in statements.values())
    assert statements["ReadJobs"] == {"Sid": "ReadJobs", "Effect": "Allow",
                                      "Action": ["batch:DescribeJobs", "batch:ListJobs"], "Resource": ["*"]}
    resubmit = statements["ResubmitOutOfMemoryJobs"]
    assert set(resubmit["Action"]) == {"batch:SubmitJob", "batch:TagResource"}
    assert set(resubmit["Resource"]) == {queue, definition, definition.rsplit(":", 1)[0],
                                         definition.rsplit(":", 1)[0] + ":*",  # earlier revisions' jobs too
                                         f"arn:aws:batch:{REGION}:123456789012:job/*"}
    assert statements["ReadWriteLeasesAndJobEvents"]["Resource"] == [f"{bucket}/*/_cpb/lease.json",
                                                                      f"{bucket}/*/_cpb/events/*"]
    assert set(statements["ReadWriteLeasesAndJobEvents"]["Action"]) == {"s3:GetObject", "s3:PutObject"}
    assert statements["ParkFailedEvents"]["Resource"] == [stack.one(QUEUE, "events-dlq").state["arn"]]
    assert statements["WriteOwnLogs"]["Resource"] == [
        f"arn:aws:logs:{REGION}:123456789012:log-group:/aws/lambda/cpb-test-job-events:log-stream:*"]


def test_events_dlq_alarm_notifies_like_the_ingress_alarm() -> None:
    loud = program(fsxEnabled="false", alarmEmail="lab@example.org")
    alarm = loud.one("aws:cloudwatch/metricAlarm:MetricAlarm", "events").inputs
    assert alarm["dimensions"] == {"QueueName": loud.one(QUEUE, "events-dlq").state["name"]}
    assert alarm["alarmActions"] == [loud.one("aws:sns/topic:Topic").state["arn"]]
    quiet = program(fsxEnabled="false").one("aws:cloudwatch/metricAlarm:MetricAlarm", "events").inputs
    assert not quiet.get("alarmActions") and quiet["threshold"] == 0


# ---------------------------------------------------------------- dashboard

def _metrics(body: dict) -> list[list]:
    return [m for w in body["widgets"] if w["type"] == "metric" for m in w["properties"]["metrics"]]


def test_dashboard_shows_queues_dlqs_jobs_oom_retries_and_the_lambdas(stack: Recorded) -> None:
    board = stack.one("aws:cloudwatch/dashboard:Dashboard").inputs
    assert board["dashboardName"] == stack.outputs["dashboardName"] == "cpb-test"
    body = json.loads(board["dashboardBody"])
    metrics = _metrics(body)
    queues = {name: stack.one(QUEUE, name).state["name"] for name in ("ingress-queue", "ingress-dlq", "events-dlq")}
    sqs = {(m[1], m[3]) for m in metrics if m[0] == "AWS/SQS"}
    assert ("ApproximateNumberOfMessagesVisible", queues["ingress-queue"]) in sqs
    assert ("ApproximateNumberOfMessagesVisible", queues["ingress-dlq"]) in sqs
    assert ("ApproximateNumberOfMessagesVisible", queues["events-dlq"]) in sqs
    jobs = {m[1] for m in metrics if m[0] == METRICS_NAMESPACE}
    assert jobs == set(METRICS) == {"JobsSucceeded", "JobsFailed", "OutOfMemoryRetries"}
    assert all(m[2:4] == [METRICS_DIMENSION, "test"] for m in metrics if m[0] == METRICS_NAMESPACE)
    functions = {(m[1], m[3]) for m in metrics if m[0] == "AWS/Lambda"}
    ingress, events = (stack.one(FUNCTION, n).state["name"] for n in ("ingress", "events"))
    assert {("Errors", ingress), ("Duration", ingress), ("Errors", events)} <= functions
    assert all(w["properties"]["region"] == REGION for w in body["widgets"] if w["type"] == "metric")


def test_dashboard_body_is_what_cloudwatch_accepts(stack: Recorded) -> None:
    """PutDashboard's rules that a mock would not check: grid width 24, each metric array
    [namespace, name, (dimension name, value)*, {options}?], a known stat and period."""
    body = json.loads(stack.one("aws:cloudwatch/dashboard:Dashboard").inputs["dashboardBody"])
    stats = {"SampleCount", "Average", "Sum", "Minimum", "Maximum"}
    for widget in body["widgets"]:
        assert widget["x"] + widget["width"] <= 24 and widget["height"] > 0
        if widget["type"] != "metric":
            continue
        props = widget["properties"]
        assert props["stat"] in stats and props["period"] % 60 == 0
        for metric in props["metrics"]:
            names = metric[:-1] if isinstance(metric[-1], dict) else metric
            assert len(names) % 2 == 0 and all(isinstance(n, str) and n for n in names), metric
            if isinstance(metric[-1], dict) and "stat" in metric[-1]:
                assert metric[-1]["stat"] in stats
    with mock_aws():
        cloudwatch = boto3.client("cloudwatch", region_name=REGION)
        answer = cloudwatch.put_dashboard(DashboardName="cpb-test",
                                          DashboardBody=stack.one("aws:cloudwatch/dashboard:Dashboard").inputs[
                                              "dashboardBody"])
        assert not answer.get("DashboardValidationMessages")
