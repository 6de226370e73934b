"""StackDashboard: one CloudWatch dashboard per stack, for whoever watches a plate run.

Shows what piles up (job messages waiting, both dead-letter queues), what finished (jobs succeeded
and failed, out-of-memory retries: the EMF metrics the job-events Lambda emits) and how the two
Lambdas fare (errors, throttles, duration). The body is a pure function of names, so tests read it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import pulumi
import pulumi_aws as aws

from components.events import METRICS_DIMENSION, METRICS_NAMESPACE
from components.partition import Partition

PERIOD_SECONDS = 300


@dataclass
class StackDashboardArgs:
    """Names of what the dashboard graphs."""

    dashboard_name: str
    region: str
    stack: str
    partition: Partition
    queue_name: pulumi.Input[str]
    dead_letter_queue_name: pulumi.Input[str]
    events_dead_letter_queue_name: pulumi.Input[str]
    ingress_function_name: pulumi.Input[str]
    events_function_name: pulumi.Input[str]


def _widget(title: str, metrics: list[list[Any]], region: str, x: int, y: int, stat: str = "Sum",
            width: int = 12, height: int = 6) -> dict[str, Any]:
    return {"type": "metric", "x": x, "y": y, "width": width, "height": height, "properties": {
        "title": title, "region": region, "stat": stat, "period": PERIOD_SECONDS, "view": "timeSeries",
        "stacked": False, "metrics": metrics}}


def dashboard_body(*, region: str, stack: str, queue_name: str, dead_letter_queue_name: str,
                   events_dead_letter_queue_name: str, ingress_function_name: str,
                   events_function_name: str) -> dict[str, Any]:
    """The dashboard's widgets (CloudWatch's dashboard body structure)."""
    def sqs(metric: str, queue: str, label: str) -> list[Any]:
        return ["AWS/SQS", metric, "QueueName", queue, {"label": label}]

    def jobs(metric: str, label: str) -> list[Any]:
        return [METRICS_NAMESPACE, metric, METRICS_DIMENSION, stack, {"label": label}]

    def function(metric: str, name: str, label: str, stat: Optional[str] = None) -> list[Any]:
        options: dict[str, Any] = {"label": label}
        if stat:
            options["stat"] = stat
        return ["AWS/Lambda", metric, "FunctionName", name, options]

    return {"widgets": [
        {"type": "text", "x": 0, "y": 0, "width": 24, "height": 2, "properties": {"markdown": (
            f"## Cell Painting Batch: stack `{stack}`\n"
            "Messages wait in the job queue until the ingress Lambda submits them; anything in a dead-letter "
            "queue needs a look (`cpb status`). Job counts come from the job-events Lambda.")}},
        _widget("Job messages waiting", [
            sqs("ApproximateNumberOfMessagesVisible", queue_name, "waiting"),
            sqs("ApproximateNumberOfMessagesNotVisible", queue_name, "being submitted"),
        ], region, 0, 2, stat="Maximum"),
        _widget("Dead-letter queues (should stay at 0)", [
            sqs("ApproximateNumberOfMessagesVisible", dead_letter_queue_name, "job messages"),
            sqs("ApproximateNumberOfMessagesVisible", events_dead_letter_queue_name, "job events"),
        ], region, 12, 2, stat="Maximum"),
        _widget("Batch jobs finished", [
            jobs("JobsSucceeded", "succeeded"),
            jobs("JobsFailed", "failed"),
        ], region, 0, 8),
        _widget("Out-of-memory retries", [jobs("OutOfMemoryRetries", "resubmitted with more memory")],
                region, 12, 8),
        _widget("Ingress Lambda", [
            function("Errors", ingress_function_name, "errors"),
            function("Throttles", ingress_function_name, "throttles"),
            function("Duration", ingress_function_name, "duration max (ms)", stat="Maximum"),
            function("Duration", ingress_function_name, "duration avg (ms)", stat="Average"),
        ], region, 0, 14),
        _widget("Job-events Lambda", [
            function("Errors", events_function_name, "errors"),
            function("Throttles", events_function_name, "throttles"),
            function("Invocations", events_function_name, "invocations"),
        ], region, 12, 14),
    ]}


class StackDashboard(pulumi.ComponentResource):
    """The CloudWatch dashboard and its console link."""

    dashboard_name: pulumi.Output[str]
    url: pulumi.Output[str]

    def __init__(self, name: str, args: StackDashboardArgs, opts: Optional[pulumi.ResourceOptions] = None) -> None:
        super().__init__("cpb:index:StackDashboard", name, None, opts)
        body = pulumi.Output.all(args.queue_name, args.dead_letter_queue_name, args.events_dead_letter_queue_name,
                                 args.ingress_function_name, args.events_function_name).apply(
            lambda v: json.dumps(dashboard_body(
                region=args.region, stack=args.stack, queue_name=v[0], dead_letter_queue_name=v[1],
                events_dead_letter_queue_name=v[2], ingress_function_name=v[3], events_function_name=v[4])))
        dashboard = aws.cloudwatch.Dashboard(f"{name}-board", dashboard_name=args.dashboard_name,
                                             dashboard_body=body, opts=pulumi.ResourceOptions(parent=self))
        self.dashboard_name = dashboard.dashboard_name
        self.url = dashboard.dashboard_name.apply(lambda n: args.partition.dashboard_url(args.region, n))
        self.register_outputs({"dashboardName": self.dashboard_name, "url": self.url})
