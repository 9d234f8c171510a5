"""cuboids on AWS, as a CDK app (batch/app.py): four stacks, built in dependency order."""

import aws_cdk as cdk

from .api import ApiStack
from .compute import ComputeStack
from .config import Config, ConfigError
from .machines import StateMachinesStack
from .workers import WorkersStack

__all__ = ["build", "Config", "ConfigError"]


def build(app: cdk.App, config: Config) -> dict:
    """Adds the stacks to `app`; returns them by role."""
    compute = ComputeStack(app, f"{config.prefix}Compute", config)
    workers = WorkersStack(app, f"{config.prefix}Workers", config, compute.network)
    machines = StateMachinesStack(
        app,
        f"{config.prefix}StateMachines",
        activity_arn=workers.activity.activity_arn,
        job_queue_arn=compute.job_queue.ref,
        job_definition_arn=compute.task_job_definition.ref,
        config=config,
    )
    api = ApiStack(app, f"{config.prefix}Api", hierarchy=machines.hierarchy, segment=machines.segment)
    for stack in (compute, workers, machines, api):
        cdk.Tags.of(stack).add("project", "cuboids")
    return {"compute": compute, "workers": workers, "machines": machines, "api": api}
