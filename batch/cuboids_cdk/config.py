"""What a lab sets when it deploys cuboids: CDK context values (`cdk deploy -c key=value`, or
the "context" of batch/cdk.json). Every value is checked here, so that a wrong one is named
before anything is synthesised."""

from dataclasses import dataclass, field
import re

INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
SUBNET_ID = re.compile(r"^subnet-([0-9a-f]{8}|[0-9a-f]{17})$")
SECURITY_GROUP_ID = re.compile(r"^sg-([0-9a-f]{8}|[0-9a-f]{17})$")
S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class ConfigError(ValueError):
    """A context value that cannot be deployed; the message names the key."""


@dataclass(frozen=True)
class Config:
    # The cuboids GPU image (docker/Dockerfile), e.g. an ECR URI.
    image_uri: str
    # The bucket holding volumes, manifests and Boss cuboids.
    data_bucket: str
    # The CPU image (docker/Dockerfile.lavapipe) in ECR, which the Lambda function that runs
    # small stages' tasks is made of (Lambda has no GPU; its command is `lambda`).
    lambda_image_uri: str = "-"
    # The Boss S3 index DynamoDB table (s3index.<domain>), if Boss channels are downsampled.
    boss_index_table: str = ""
    # Stacks are named <prefix>Compute, <prefix>Workers, <prefix>StateMachines, <prefix>Api.
    prefix: str = "Cuboids"
    # Existing subnets (with a route to S3 and the AWS APIs) and security groups; when none are
    # given, the app makes a VPC with public subnets and an S3 gateway endpoint.
    subnet_ids: list = field(default_factory=list)
    security_group_ids: list = field(default_factory=list)
    # The Batch compute environment.
    instance_types: list = field(
        default_factory=lambda: ["g5.xlarge", "g5.2xlarge", "g6.xlarge", "g6.2xlarge"]
    )
    max_vcpus: int = 256
    # SPOT is cheaper per voxel; reclaimed jobs are retried ("Host EC2*").
    provisioning: str = "SPOT"
    task_timeout_seconds: int = 3600
    # The activity's worker fleet: an Auto Scaling group of GPU instances, 0 when idle.
    worker_instance_type: str = "g5.xlarge"
    worker_max_instances: int = 8
    worker_concurrency: int = 1
    # A worker with no task for this long leaves, and its instance with it.
    worker_idle_exit_seconds: int = 900

    @staticmethod
    def from_context(get):
        """From a context getter (`app.node.try_get_context`)."""
        def text(key, default=None):
            value = get(key)
            if value is None or value == "":
                if default is None:
                    raise ConfigError(
                        f"context {key!r} is required (cdk deploy -c {key}=..., or batch/cdk.json)"
                    )
                return default
            if not isinstance(value, str):
                raise ConfigError(f"context {key!r} is {value!r}; expected a string")
            return value

        def number(key, default, low, high):
            value = get(key)
            if value is None or value == "":
                return default
            try:
                n = int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"context {key!r} is {value!r}; expected a whole number") from None
            if not low <= n <= high:
                raise ConfigError(f"context {key!r} is {n}; expected {low} to {high}")
            return n

        def items(key, default):
            value = get(key)
            if value is None or value == "":
                return list(default)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"context {key!r} is {value!r}; expected a comma-separated list")
            return value

        defaults = Config(image_uri="-", data_bucket="-")
        config = Config(
            image_uri=text("image_uri"),
            data_bucket=text("data_bucket"),
            lambda_image_uri=text("lambda_image_uri"),
            boss_index_table=text("boss_index_table", ""),
            prefix=text("prefix", defaults.prefix),
            subnet_ids=items("subnet_ids", []),
            security_group_ids=items("security_group_ids", []),
            instance_types=items("instance_types", defaults.instance_types),
            max_vcpus=number("max_vcpus", defaults.max_vcpus, 4, 100_000),
            provisioning=text("provisioning", defaults.provisioning),
            task_timeout_seconds=number(
                "task_timeout_seconds", defaults.task_timeout_seconds, 60, 14 * 86400
            ),
            worker_instance_type=text("worker_instance_type", defaults.worker_instance_type),
            worker_max_instances=number(
                "worker_max_instances", defaults.worker_max_instances, 1, 1000
            ),
            worker_concurrency=number("worker_concurrency", defaults.worker_concurrency, 1, 64),
            worker_idle_exit_seconds=number(
                "worker_idle_exit_seconds", defaults.worker_idle_exit_seconds, 60, 86400
            ),
        )
        config.check()
        return config

    def check(self):
        if self.provisioning not in ("SPOT", "EC2"):
            raise ConfigError(f"context 'provisioning' is {self.provisioning!r}; expected SPOT or EC2")
        if not S3_BUCKET.match(self.data_bucket):
            raise ConfigError(f"context 'data_bucket' is {self.data_bucket!r}; expected a bucket name")
        for t in self.instance_types + [self.worker_instance_type]:
            if not INSTANCE_TYPE.match(t):
                raise ConfigError(f"instance type {t!r} is not an EC2 instance type")
        if bool(self.subnet_ids) != bool(self.security_group_ids):
            raise ConfigError(
                "context 'subnet_ids' and 'security_group_ids' go together: give both, or neither "
                "(then a VPC is made)"
            )
        for key, ids, pattern, what in (
            ("subnet_ids", self.subnet_ids, SUBNET_ID, "a subnet id"),
            ("security_group_ids", self.security_group_ids, SECURITY_GROUP_ID, "a security group id"),
        ):
            for i in ids:
                if not pattern.match(i):
                    raise ConfigError(f"context {key!r} has {i!r}, which is not {what}")
        if not re.match(r"^[A-Za-z][A-Za-z0-9]*$", self.prefix):
            raise ConfigError(f"context 'prefix' is {self.prefix!r}; expected letters and digits")
