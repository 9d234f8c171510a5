#!/usr/bin/env python3
"""cuboids on AWS: the CDK app that batch/deploy deploys (`cdk deploy --all`).

Stacks: <prefix>Compute (network, GPU Batch compute environment, job queue, task job
definition), <prefix>Workers (the activity and its GPU worker fleet), <prefix>StateMachines (the
ASL of batch/statemachines/) and <prefix>Api (the REST API). Settings are CDK context values:
see batch/cuboids_cdk/config.py and the README."""

import sys

import aws_cdk as cdk

from cuboids_cdk import Config, ConfigError, build


def main():
    app = cdk.App()
    try:
        config = Config.from_context(app.node.try_get_context)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    build(app, config)
    app.synth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
