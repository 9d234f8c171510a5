"""The Workers stack: the cuboids activity (DownsampleChannel steps, a segmentation plan's Plan
step and, with the activity runner, its stage tasks) and the fleet of `cuboids worker` that
serves it: an Auto Scaling group of GPU instances, one worker container each, that is 0 when
there is no work.

Scaling out: an alarm on the activity's tasks that were scheduled and not started within the
minute (AWS/States ActivitiesScheduled - ActivitiesStarted) adds instances in steps.
Scaling in: a worker with no task for `worker_idle_exit_seconds` exits, and its instance then
leaves the group, decrementing the desired capacity. So a running task is never stopped by a
scale-in; a spot or manual termination stops the container with SIGTERM, and the worker fails
its task as cuboids.Interrupted, which the state machines retry."""

import aws_cdk as cdk
from aws_cdk import (
    aws_autoscaling as autoscaling,
    aws_cloudwatch as cloudwatch,
    aws_ec2 as ec2,
    aws_iam as iam,
    aws_logs as logs,
    aws_stepfunctions as sfn,
)
from constructs import Construct

from .compute import CONTAINER_ENVIRONMENT, Network, data_access
from .config import Config

# The ECS-optimized Amazon Linux 2 GPU AMI: Docker with the NVIDIA container runtime and driver.
GPU_AMI_PARAMETER = "/aws/service/ecs/optimized-ami/amazon-linux-2/gpu/recommended/image_id"
FLEET_TAG = "cuboids:fleet"


def user_data(config: Config, activity_arn: str, log_group: str, region: str) -> str:
    """The boot script of a fleet instance: run the worker until it leaves idle, then leave the
    group. A worker that crashes (non-zero exit) is started again."""
    env = " ".join(f"-e {k}={v}" for k, v in CONTAINER_ENVIRONMENT.items())
    return f"""#!/bin/bash
# cuboids worker fleet instance (batch/cuboids_cdk/workers.py)
set -u
systemctl stop ecs || true   # the ECS agent is not used: one worker container per instance
command -v aws >/dev/null || yum install -y -q awscli   # for ECR login and leaving the group
region={region}
image={config.image_uri}
token=$(curl -sX PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')
instance=$(curl -s -H "X-aws-ec2-metadata-token: $token" http://169.254.169.254/latest/meta-data/instance-id)
case "$image" in
    *.dkr.ecr.*) aws ecr get-login-password --region "$region" \\
        | docker login --username AWS --password-stdin "${{image%%/*}}" ;;
esac
until docker pull "$image"; do sleep 15; done
while true; do
    docker run --rm --gpus all --stop-timeout 40 \\
        --log-driver awslogs --log-opt awslogs-region="$region" \\
        --log-opt awslogs-group={log_group} --log-opt awslogs-stream="$instance" \\
        -e AWS_REGION="$region" {env} \\
        "$image" worker --activity-arn {activity_arn} \\
        --concurrency {config.worker_concurrency} \\
        --idle-exit-seconds {config.worker_idle_exit_seconds} --worker-name "$instance"
    [ $? -eq 0 ] && break   # idle (or stopped by a signal): leave the fleet
    sleep 15                # a crash: start it again
done
aws autoscaling terminate-instance-in-auto-scaling-group --region "$region" \\
    --instance-id "$instance" --should-decrement-desired-capacity
"""


class WorkersStack(cdk.Stack):
    def __init__(self, scope: Construct, id: str, config: Config, network: Network, **kwargs):
        super().__init__(scope, id, description="cuboids: the activity and its GPU worker fleet, scaled to zero when idle", **kwargs)
        self.activity = sfn.Activity(self, "DownsampleChannelActivity", activity_name=f"{self.stack_name}-downsample-channel")
        log_group = logs.LogGroup(
            self, "WorkerLogs", retention=logs.RetentionDays.ONE_MONTH,
            removal_policy=cdk.RemovalPolicy.DESTROY,
        )
        fleet_name = f"{config.prefix}-workers"

        role = iam.Role(
            self,
            "WorkerInstanceRole",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            managed_policies=[
                iam.ManagedPolicy.from_aws_managed_policy_name("AmazonEC2ContainerRegistryReadOnly"),
                iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore"),
            ],
        )
        for statement in data_access(config, self):
            role.add_to_policy(statement)
        self.activity.grant(
            role,
            "states:GetActivityTask",
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["states:SendTaskHeartbeat", "states:SendTaskSuccess", "states:SendTaskFailure"],
                resources=["*"],  # task tokens are not resources
            )
        )
        log_group.grant_write(role)
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["autoscaling:TerminateInstanceInAutoScalingGroup"],
                resources=["*"],
                conditions={"StringEquals": {f"autoscaling:ResourceTag/{FLEET_TAG}": fleet_name}},
            )
        )
        profile = iam.CfnInstanceProfile(self, "WorkerInstanceProfile", roles=[role.role_name])

        ami = cdk.CfnParameter(
            self,
            "WorkerAmi",
            type="AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>",
            default=GPU_AMI_PARAMETER,
            description="The worker instances' AMI: the ECS-optimized GPU AMI (SSM parameter)",
        )
        script = user_data(config, self.activity.activity_arn, log_group.log_group_name, self.region)
        template = ec2.CfnLaunchTemplate(
            self,
            "WorkerLaunchTemplate",
            launch_template_data=ec2.CfnLaunchTemplate.LaunchTemplateDataProperty(
                image_id=ami.value_as_string,
                instance_type=config.worker_instance_type,
                iam_instance_profile=ec2.CfnLaunchTemplate.IamInstanceProfileProperty(arn=profile.attr_arn),
                security_group_ids=network.security_group_ids,
                metadata_options=ec2.CfnLaunchTemplate.MetadataOptionsProperty(http_tokens="required"),
                instance_initiated_shutdown_behavior="terminate",
                user_data=cdk.Fn.base64(script),
            ),
        )
        group = autoscaling.CfnAutoScalingGroup(
            self,
            "WorkerFleet",
            min_size="0",
            max_size=str(config.worker_max_instances),
            vpc_zone_identifier=network.subnet_ids,
            launch_template=autoscaling.CfnAutoScalingGroup.LaunchTemplateSpecificationProperty(
                launch_template_id=template.ref, version=template.attr_latest_version_number
            ),
            tags=[
                autoscaling.CfnAutoScalingGroup.TagPropertyProperty(
                    key=FLEET_TAG, value=fleet_name, propagate_at_launch=True
                )
            ],
        )
        self.fleet = group

        # Tasks scheduled and not started within the minute: a backlog no worker took.
        def activity_metric(name):
            return cloudwatch.Metric(
                namespace="AWS/States",
                metric_name=name,
                dimensions_map={"ActivityArn": self.activity.activity_arn},
                statistic="Sum",
                period=cdk.Duration.minutes(1),
            )

        waiting = cloudwatch.MathExpression(
            expression="FILL(scheduled, 0) - FILL(started, 0)",
            using_metrics={
                "scheduled": activity_metric("ActivitiesScheduled"),
                "started": activity_metric("ActivitiesStarted"),
            },
            label="activity tasks waiting for a worker",
            period=cdk.Duration.minutes(1),
        )
        scale_out = autoscaling.CfnScalingPolicy(
            self,
            "ScaleOutOnBacklog",
            auto_scaling_group_name=group.ref,
            policy_type="StepScaling",
            adjustment_type="ChangeInCapacity",
            estimated_instance_warmup=300,
            metric_aggregation_type="Maximum",
            step_adjustments=[
                autoscaling.CfnScalingPolicy.StepAdjustmentProperty(
                    metric_interval_lower_bound=0, metric_interval_upper_bound=3, scaling_adjustment=1
                ),
                autoscaling.CfnScalingPolicy.StepAdjustmentProperty(
                    metric_interval_lower_bound=3, metric_interval_upper_bound=15, scaling_adjustment=4
                ),
                autoscaling.CfnScalingPolicy.StepAdjustmentProperty(
                    metric_interval_lower_bound=15, scaling_adjustment=16
                ),
            ],
        )
        alarm = cloudwatch.Alarm(
            self,
            "Backlog",
            metric=waiting,
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            alarm_description="cuboids activity tasks waiting for a worker: add worker instances",
        )
        alarm.node.default_child.alarm_actions = [scale_out.attr_arn]

        cdk.CfnOutput(self, "ActivityArn", value=self.activity.activity_arn)
        cdk.CfnOutput(self, "WorkerFleetName", value=group.ref)
        cdk.CfnOutput(self, "WorkerLogGroup", value=log_group.log_group_name)
