"""The Api stack: the segmentation and downsampling service as REST methods on API Gateway,
each starting a state machine through a direct Step Functions integration (no Lambda), with
IAM (SigV4) authorization on every method:

- POST /downsample: a Boss DownsampleChannel document ({"msg": {...}}) starts the resolution
  hierarchy;
- POST /segment: {"job_name", "request": {"kind": "plan", "work", "manifests"}} (or an already
  made plan: {"job_name", "stages"}) starts the segmentation machine; "then": {"request": {...},
  "then": {...}} chains the next plans (image + model -> infer -> segment), each planned once the
  one before has written its output;
- GET /executions/{id}: an execution's status, and its output or error, where {id} is the
  execution ARN that a POST returned.
"""

import aws_cdk as cdk
from aws_cdk import aws_apigateway as apigw, aws_iam as iam, aws_stepfunctions as sfn
from constructs import Construct

# The execution input is the request body, as a JSON string. escapeJavaScript escapes ' as \',
# which JSON does not allow, hence the replaceAll.
START_TEMPLATE = """{
  "stateMachineArn": "%s",
  "input": "$util.escapeJavaScript($input.json('$')).replaceAll("\\\\'", "'")"
}"""

STARTED_TEMPLATE = """#set($r = $input.path('$'))
{"id": "$r.executionArn", "started": $r.startDate}"""

DESCRIBE_TEMPLATE = """{"executionArn": "$util.escapeJavaScript($input.params('id'))"}"""

# The output is the execution's JSON output document, inserted as it is.
DESCRIBED_TEMPLATE = """#set($r = $input.path('$'))
{
  "id": "$r.executionArn",
  "status": "$r.status",
  "started": $r.startDate#if("$!r.stopDate" != ""),
  "stopped": $r.stopDate#end#if("$!r.output" != ""),
  "output": $r.output#end#if("$!r.error" != ""),
  "error": "$util.escapeJavaScript($r.error)"#end#if("$!r.cause" != ""),
  "cause": "$util.escapeJavaScript($r.cause)"#end
}"""

# Step Functions' own errors (a bad ARN, no such execution, input too large) as a 400.
ERROR_TEMPLATE = """#set($e = $input.path('$'))
{"error": "$util.escapeJavaScript($e.get('__type'))", "message": "$util.escapeJavaScript($e.message)"}"""

DOWNSAMPLE_SCHEMA = apigw.JsonSchema(
    schema=apigw.JsonSchemaVersion.DRAFT4,
    title="DownsampleChannel",
    type=apigw.JsonSchemaType.OBJECT,
    required=["msg"],
    properties={"msg": apigw.JsonSchema(type=apigw.JsonSchemaType.OBJECT)},
)

# A plan task to run on the cuboids activity before its stages (`cuboids plan ... --manifests`).
PLAN_REQUEST = apigw.JsonSchema(
    type=apigw.JsonSchemaType.OBJECT,
    required=["kind", "work", "manifests"],
    properties={
        "kind": apigw.JsonSchema(type=apigw.JsonSchemaType.STRING, enum=["plan"]),
        "work": apigw.JsonSchema(type=apigw.JsonSchemaType.OBJECT, required=["kind"]),
        "manifests": apigw.JsonSchema(type=apigw.JsonSchemaType.STRING),
    },
)

SEGMENT_SCHEMA = apigw.JsonSchema(
    schema=apigw.JsonSchemaVersion.DRAFT4,
    title="Segment",
    type=apigw.JsonSchemaType.OBJECT,
    required=["job_name"],
    properties={
        "job_name": apigw.JsonSchema(type=apigw.JsonSchemaType.STRING, pattern="^[A-Za-z0-9_-]{1,100}$"),
        "runner": apigw.JsonSchema(type=apigw.JsonSchemaType.STRING, enum=["batch", "activity"]),
        "request": PLAN_REQUEST,
        "stages": apigw.JsonSchema(type=apigw.JsonSchemaType.ARRAY),
        # The pipeline's next step once these stages are done (its own "then" may follow).
        "then": apigw.JsonSchema(
            type=apigw.JsonSchemaType.OBJECT,
            required=["request"],
            properties={
                "request": PLAN_REQUEST,
                "then": apigw.JsonSchema(type=apigw.JsonSchemaType.OBJECT),
            },
        ),
    },
    one_of=[
        apigw.JsonSchema(required=["request"]),
        apigw.JsonSchema(required=["stages"]),
    ],
)


class ApiStack(cdk.Stack):
    def __init__(self, scope: Construct, id: str, *, hierarchy: sfn.IStateMachine,
                 segment: sfn.IStateMachine, **kwargs):
        super().__init__(scope, id, description="cuboids: REST API (POST /downsample, POST /segment, GET /executions/{id})", **kwargs)
        api = apigw.RestApi(
            self,
            "Api",
            rest_api_name=f"{self.stack_name}-cuboids",
            description="cuboids: downsampling and segmentation on GPU instances",
            endpoint_types=[apigw.EndpointType.REGIONAL],
            cloud_watch_role=False,
            deploy_options=apigw.StageOptions(
                stage_name="v1", throttling_rate_limit=20, throttling_burst_limit=40
            ),
            default_method_options=apigw.MethodOptions(authorization_type=apigw.AuthorizationType.IAM),
        )
        role = iam.Role(self, "ApiRole", assumed_by=iam.ServicePrincipal("apigateway.amazonaws.com"))
        for machine in (hierarchy, segment):
            machine.grant_start_execution(role)
            machine.grant_execution(role, "states:DescribeExecution")
        validator = api.add_request_validator("Body", validate_request_body=True)

        def responses(success_template):
            return [
                apigw.IntegrationResponse(
                    status_code="200",
                    response_templates={"application/json": success_template},
                ),
                apigw.IntegrationResponse(
                    status_code="400",
                    selection_pattern="4\\d{2}",
                    response_templates={"application/json": ERROR_TEMPLATE},
                ),
                apigw.IntegrationResponse(
                    status_code="502",
                    selection_pattern="5\\d{2}",
                    response_templates={"application/json": ERROR_TEMPLATE},
                ),
            ]

        method_responses = [apigw.MethodResponse(status_code=c) for c in ("200", "400", "502")]

        def states(action, request_template, success_template):
            return apigw.AwsIntegration(
                service="states",
                action=action,
                options=apigw.IntegrationOptions(
                    credentials_role=role,
                    passthrough_behavior=apigw.PassthroughBehavior.NEVER,
                    request_templates={"application/json": request_template},
                    integration_responses=responses(success_template),
                ),
            )

        for path, machine, schema in (
            ("downsample", hierarchy, DOWNSAMPLE_SCHEMA),
            ("segment", segment, SEGMENT_SCHEMA),
        ):
            model = api.add_model(f"{path.capitalize()}Request", content_type="application/json", schema=schema)
            api.root.add_resource(path).add_method(
                "POST",
                states("StartExecution", START_TEMPLATE % machine.state_machine_arn, STARTED_TEMPLATE),
                request_models={"application/json": model},
                request_validator=validator,
                method_responses=method_responses,
            )
        api.root.add_resource("executions").add_resource("{id}").add_method(
            "GET",
            states("DescribeExecution", DESCRIBE_TEMPLATE, DESCRIBED_TEMPLATE),
            request_parameters={"method.request.path.id": True},
            method_responses=method_responses,
        )
        self.url = api.url
        cdk.CfnOutput(self, "ApiUrl", value=api.url)
