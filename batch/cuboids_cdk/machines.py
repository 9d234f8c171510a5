"""The StateMachines stack: the three state machines, their ASL kept in batch/statemachines/
(one source of truth, also executed by tests/statemachines.rs), with the ARNs they name
substituted at deploy time."""

import pathlib
import re

import aws_cdk as cdk
from aws_cdk import aws_iam as iam, aws_stepfunctions as sfn
from constructs import Construct

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
                 job_definition_arn: str, **kwargs):
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
        batch_arns = {"JobQueueArn": job_queue_arn, "JobDefinitionArn": job_definition_arn}
        self.hierarchy = machine(
            self, "ResolutionHierarchy", "resolution-hierarchy.asl.json", role,
            {"DownsampleActivityArn": activity_arn},
        )
        self.run_plan = machine(self, "RunPlan", "run-plan.asl.json", role, batch_arns)
        self.segment = machine(
            self, "Segment", "segment.asl.json", role,
            {**batch_arns, "DownsampleActivityArn": activity_arn},
        )
        cdk.CfnOutput(self, "ResolutionHierarchyStateMachineArn", value=self.hierarchy.state_machine_arn)
        cdk.CfnOutput(self, "RunPlanStateMachineArn", value=self.run_plan.state_machine_arn)
        cdk.CfnOutput(self, "SegmentStateMachineArn", value=self.segment.state_machine_arn)
