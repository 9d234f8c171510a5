"""The Compute stack: the network the GPU instances run in, the GPU Batch compute environment
(g5/g6, spot or on-demand), its job queue, and the job definition that runs one task of a
manifest per array child (`cuboids batch --manifest Ref::manifest --offset Ref::offset`)."""

import aws_cdk as cdk
from aws_cdk import aws_batch as batch, aws_ec2 as ec2, aws_iam as iam
from constructs import Construct

from .config import Config

# Exit code 75 is a retryable failure (storage, GPU, SIGTERM), 65 a permanent one
# (src/task/failure.rs); Batch's own "Host EC2*" reasons (spot reclaim, lost host) are retried.
EXIT_RETRYABLE = "75"

# glibc's malloc otherwise raises its mmap threshold as large buffers are freed and keeps later
# ones in its heaps: peak RSS then creeps up with the tiles a task runs (README, sharded
# downsample). Fixed at 1 MiB it stays flat.
CONTAINER_ENVIRONMENT = {
    "NVIDIA_DRIVER_CAPABILITIES": "compute,utility,graphics",
    "RUST_LOG": "warn,cuboids=info",
    "MALLOC_MMAP_THRESHOLD_": "1048576",
}


def data_access(config: Config, stack: cdk.Stack) -> list:
    """What a task needs of the data: the bucket's objects, and the Boss index table if any."""
    statements = [
        iam.PolicyStatement(
            actions=["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
            resources=[f"arn:{stack.partition}:s3:::{config.data_bucket}/*"],
        ),
        iam.PolicyStatement(
            actions=["s3:ListBucket"],
            resources=[f"arn:{stack.partition}:s3:::{config.data_bucket}"],
        ),
    ]
    if config.boss_index_table:
        statements.append(
            iam.PolicyStatement(
                actions=["dynamodb:PutItem"],
                resources=[
                    stack.format_arn(
                        service="dynamodb", resource="table", resource_name=config.boss_index_table
                    )
                ],
            )
        )
    return statements


class Network:
    """The subnets and security groups the GPU instances use: the ones given, or a VPC made
    here (public subnets in two zones, an S3 gateway endpoint, no NAT gateway to pay for)."""

    def __init__(self, scope: Construct, config: Config):
        if config.subnet_ids:
            self.subnet_ids = list(config.subnet_ids)
            self.security_group_ids = list(config.security_group_ids)
            return
        vpc = ec2.Vpc(
            scope,
            "Vpc",
            max_azs=2,
            nat_gateways=0,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="gpu", subnet_type=ec2.SubnetType.PUBLIC)
            ],
            gateway_endpoints={"S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)},
            restrict_default_security_group=False,
        )
        group = ec2.SecurityGroup(
            scope,
            "GpuInstances",
            vpc=vpc,
            description="cuboids GPU instances: outbound only (S3, Step Functions, ECR)",
            allow_all_outbound=True,
        )
        self.subnet_ids = [s.subnet_id for s in vpc.public_subnets]
        self.security_group_ids = [group.security_group_id]


class ComputeStack(cdk.Stack):
    def __init__(self, scope: Construct, id: str, config: Config, **kwargs):
        super().__init__(scope, id, description="cuboids: GPU Batch compute environment, job queue and task job definition", **kwargs)
        self.network = Network(self, config)

        instance_role = iam.Role(
            self,
            "InstanceRole",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            managed_policies=[
                iam.ManagedPolicy.from_aws_managed_policy_name(
                    "service-role/AmazonEC2ContainerServiceforEC2Role"
                )
            ],
        )
        profile = iam.CfnInstanceProfile(self, "InstanceProfile", roles=[instance_role.role_name])
        spot = config.provisioning == "SPOT"
        environment = batch.CfnComputeEnvironment(
            self,
            "GpuComputeEnvironment",
            type="MANAGED",
            state="ENABLED",
            compute_resources=batch.CfnComputeEnvironment.ComputeResourcesProperty(
                type=config.provisioning,
                allocation_strategy="SPOT_PRICE_CAPACITY_OPTIMIZED" if spot else "BEST_FIT_PROGRESSIVE",
                minv_cpus=0,
                maxv_cpus=config.max_vcpus,
                instance_types=config.instance_types,
                subnets=self.network.subnet_ids,
                security_group_ids=self.network.security_group_ids,
                instance_role=profile.attr_arn,
                ec2_configuration=[
                    batch.CfnComputeEnvironment.Ec2ConfigurationObjectProperty(
                        image_type="ECS_AL2_NVIDIA"
                    )
                ],
            ),
        )
        self.job_queue = batch.CfnJobQueue(
            self,
            "JobQueue",
            priority=1,
            state="ENABLED",
            compute_environment_order=[
                batch.CfnJobQueue.ComputeEnvironmentOrderProperty(
                    order=1, compute_environment=environment.ref
                )
            ],
        )

        job_role = iam.Role(self, "JobRole", assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"))
        for statement in data_access(config, self):
            job_role.add_to_policy(statement)
        self.task_job_definition = batch.CfnJobDefinition(
            self,
            "TaskJobDefinition",
            type="container",
            platform_capabilities=["EC2"],
            propagate_tags=True,
            parameters={"offset": "0"},
            container_properties=batch.CfnJobDefinition.ContainerPropertiesProperty(
                image=config.image_uri,
                command=["batch", "--manifest", "Ref::manifest", "--offset", "Ref::offset"],
                job_role_arn=job_role.role_arn,
                resource_requirements=[
                    batch.CfnJobDefinition.ResourceRequirementProperty(type="GPU", value="1"),
                    batch.CfnJobDefinition.ResourceRequirementProperty(type="VCPU", value="4"),
                    batch.CfnJobDefinition.ResourceRequirementProperty(type="MEMORY", value="15000"),
                ],
                environment=[
                    batch.CfnJobDefinition.EnvironmentProperty(name=k, value=v)
                    for k, v in CONTAINER_ENVIRONMENT.items()
                ],
            ),
            retry_strategy=batch.CfnJobDefinition.RetryStrategyProperty(
                attempts=3,
                evaluate_on_exit=[
                    batch.CfnJobDefinition.EvaluateOnExitProperty(on_status_reason="Host EC2*", action="RETRY"),
                    batch.CfnJobDefinition.EvaluateOnExitProperty(on_exit_code=EXIT_RETRYABLE, action="RETRY"),
                    batch.CfnJobDefinition.EvaluateOnExitProperty(on_reason="*", action="EXIT"),
                ],
            ),
            timeout=batch.CfnJobDefinition.TimeoutProperty(
                attempt_duration_seconds=config.task_timeout_seconds
            ),
        )
        cdk.CfnOutput(self, "JobQueueArn", value=self.job_queue.ref)
        cdk.CfnOutput(self, "TaskJobDefinitionArn", value=self.task_job_definition.ref)
