"""The StateMachines stack: the three state machines, their ASL kept in batch/statemachines/
(one source of truth, also executed by tests/statemachines.rs), with the ARNs they name
substituted at deploy time."""

import pathlib
import re

import aws_cdk as cdk
from aws_cdk import aws_iam as iam, aws_lambda as lambda_, aws_stepfunctions as sfn
from constructs import Construct

from .compute import data_access
from .config import Config

ASL = pathlib.Path(__file__).resolve().parent.parent / "statemachines"
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def machine(scope: Construct, id: str, file: str, role: iam.IRole, substitutions: dict) -> sfn.StateMachine:
    """A state machine from an ASL file; every ${Placeholder} in it must be substituted."""
    text = (ASL / file).read_text()
    missing = set(PLACEHOLDER.findall(text)) - set(substitutions)
    if missing:
        raise ValueError(f"{ASL / file}: no value for {sorted(missing)}")
    return sfn.StateMachine(
        scope,
        id,
        definition_body=sfn.DefinitionBody.from_string(text),
        definition_substitutions=substitutions,
        role=role,
    )


class StateMachinesStack(cdk.Stack):
    def __init__(self, scope: Construct, id: str, *, activity_arn: str, job_queue_arn: str,
                 job_definition_arn: str, config: Config, **kwargs):
        super().__init__(scope, id, description="cuboids: the resolution hierarchy, run-plan and segmentation state machines", **kwargs)
        role = iam.Role(self, "StateMachineRole", assumed_by=iam.ServicePrincipal("states.amazonaws.com"))
        # batch:submitJob.sync: submit, then follow the job through EventBridge.
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["batch:SubmitJob", "batch:DescribeJobs", "batch:TerminateJob"],
                resources=["*"],
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["events:PutTargets", "events:PutRule", "events:DescribeRule"],
                resources=[
                    self.format_arn(
                        service="events", resource="rule",
                        resource_name="StepFunctionsGetEventsForBatchJobsRule",
                    )
                ],
            )
        )
        # The function that runs the tasks of stages the plan routes to Lambda (the CPU image,
        # `cuboids lambda`): Lambda's largest memory (and so its most vCPUs) and timeout.
        function_role = iam.Role(
            self, "TaskFunctionRole", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name(
                "service-role/AWSLambdaBasicExecutionRole")],
        )
        for statement in data_access(config, self):
            function_role.add_to_policy(statement)
        self.task_function = lambda_.CfnFunction(
            self, "TaskFunction",
            package_type="Image",
            code=lambda_.CfnFunction.CodeProperty(image_uri=config.lambda_image_uri),
            image_config=lambda_.CfnFunction.ImageConfigProperty(command=["lambda"]),
            role=function_role.role_arn,
            memory_size=10240,
            timeout=900,
            ephemeral_storage=lambda_.CfnFunction.EphemeralStorageProperty(size=10240),
            environment=lambda_.CfnFunction.EnvironmentProperty(variables={
                "RUST_LOG": "warn,cuboids=info", "MALLOC_MMAP_THRESHOLD_": "1048576",
            }),
            description="cuboids: one task document per invocation (small stages of a plan)",
        )
        role.add_to_policy(
            iam.PolicyStatement(actions=["lambda:InvokeFunction"], resources=[self.task_function.attr_arn])
        )
        batch_arns = {"JobQueueArn": job_queue_arn, "JobDefinitionArn": job_definition_arn}
        self.hierarchy = machine(
            self, "ResolutionHierarchy", "resolution-hierarchy.asl.json", role,
            {"DownsampleActivityArn": activity_arn, "TaskFunctionArn": self.task_function.attr_arn},
        )
        self.run_plan = machine(self, "RunPlan", "run-plan.asl.json", role, batch_arns)
        self.segment = machine(
            self, "Segment", "segment.asl.json", role,
            {**batch_arns, "DownsampleActivityArn": activity_arn,
             "TaskFunctionArn": self.task_function.attr_arn},
        )
        cdk.CfnOutput(self, "ResolutionHierarchyStateMachineArn", value=self.hierarchy.state_machine_arn)
        cdk.CfnOutput(self, "RunPlanStateMachineArn", value=self.run_plan.state_machine_arn)
        cdk.CfnOutput(self, "SegmentStateMachineArn", value=self.segment.state_machine_arn)
        cdk.CfnOutput(self, "TaskFunctionArn", value=self.task_function.attr_arn)
