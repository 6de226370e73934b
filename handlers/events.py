"""PLACEHOLDER written by the infra branch: the Pulumi program refuses to deploy a Lambda whose handler
module is missing, and the job-events handler (`handlers.events.handler`, docs/CONTRACTS.md "Job
events") is written by the handlers engineer. Their module replaces this file at merge."""


def handler(event, context):  # pragma: no cover - replaced at merge
    raise NotImplementedError("handlers.events is the infra branch's placeholder; merge the job-events handler")
