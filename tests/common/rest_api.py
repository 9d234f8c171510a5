#!/usr/bin/env python3
"""Creates the REST API of a synthesised CuboidsApi template (batch/app.py) on an API Gateway
endpoint (LocalStack in tests/statemachines.rs), method by method as CloudFormation would, with
the template's imports of state machine ARNs resolved to the machines given. Prints the API id.

Usage: rest_api.py ENDPOINT TEMPLATE NAME=ARN...
  NAME=ARN: an import whose export name contains NAME resolves to ARN
  (e.g. Segment=arn:aws:states:...:stateMachine:segmentation)."""

import json
import sys

import boto3

REGION = "us-east-1"


def main():
    endpoint, template_path, *pairs = sys.argv[1:]
    machines = dict(p.split("=", 1) for p in pairs)
    template = json.load(open(template_path))
    resources = template["Resources"]
    client = boto3.client(
        "apigateway", endpoint_url=endpoint, region_name=REGION,
        aws_access_key_id="test", aws_secret_access_key="test",
    )
    ids = {}

    def resolve(value):
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "Ref" in value:
            name = value["Ref"]
            return {"AWS::Region": REGION, "AWS::Partition": "aws", "AWS::URLSuffix": "amazonaws.com",
                    "AWS::AccountId": "000000000000"}.get(name) or ids[name]
        if "Fn::Join" in value:
            separator, parts = value["Fn::Join"]
            return separator.join(resolve(p) for p in parts)
        if "Fn::ImportValue" in value:
            export = value["Fn::ImportValue"]
            found = [arn for name, arn in machines.items() if name in export]
            if len(found) != 1:
                raise SystemExit(f"import {export}: {len(found)} machines match")
            return found[0]
        if "Fn::GetAtt" in value:
            name, attribute = value["Fn::GetAtt"]
            if attribute == "RootResourceId":
                return ids[f"{name}.root"]
            return f"arn:aws:iam::000000000000:role/{name}"
        return {k: resolve(v) for k, v in value.items()}

    def of_type(kind):
        return [(k, r["Properties"]) for k, r in resources.items() if r["Type"] == kind]

    [(api_id, api)] = of_type("AWS::ApiGateway::RestApi")
    rest = client.create_rest_api(name=api["Name"])["id"]
    ids[api_id] = rest
    ids[f"{api_id}.root"] = next(r["id"] for r in client.get_resources(restApiId=rest)["items"] if r["path"] == "/")
    pending = of_type("AWS::ApiGateway::Resource")
    while pending:  # parents first
        ready = [(k, p) for k, p in pending if not isinstance(p["ParentId"], dict)
                 or "Fn::GetAtt" in p["ParentId"] or p["ParentId"]["Ref"] in ids]
        for k, p in ready:
            ids[k] = client.create_resource(restApiId=rest, parentId=resolve(p["ParentId"]),
                                            pathPart=p["PathPart"])["id"]
        pending = [(k, p) for k, p in pending if k not in ids]
    for k, p in of_type("AWS::ApiGateway::Model"):
        ids[k] = client.create_model(restApiId=rest, name=p.get("Name", k), contentType=p["ContentType"],
                                     schema=json.dumps(p["Schema"]))["name"]
    for k, p in of_type("AWS::ApiGateway::RequestValidator"):
        ids[k] = client.create_request_validator(
            restApiId=rest, name=p.get("Name", k), validateRequestBody=p.get("ValidateRequestBody", False),
            validateRequestParameters=p.get("ValidateRequestParameters", False))["id"]
    for _, p in of_type("AWS::ApiGateway::Method"):
        resource, verb = resolve(p["ResourceId"]), p["HttpMethod"]
        method = {"restApiId": rest, "resourceId": resource, "httpMethod": verb,
                  "authorizationType": p["AuthorizationType"]}
        if "RequestModels" in p:
            method["requestModels"] = resolve(p["RequestModels"])
        if "RequestValidatorId" in p:
            method["requestValidatorId"] = resolve(p["RequestValidatorId"])
        if "RequestParameters" in p:
            method["requestParameters"] = p["RequestParameters"]
        client.put_method(**method)
        integration = resolve(p["Integration"])
        client.put_integration(
            restApiId=rest, resourceId=resource, httpMethod=verb, type=integration["Type"],
            integrationHttpMethod=integration["IntegrationHttpMethod"], uri=integration["Uri"],
            credentials=integration["Credentials"], requestTemplates=integration["RequestTemplates"],
            passthroughBehavior=integration["PassthroughBehavior"],
        )
        for response in p.get("MethodResponses", []):
            client.put_method_response(restApiId=rest, resourceId=resource, httpMethod=verb,
                                       statusCode=response["StatusCode"])
        for response in integration["IntegrationResponses"]:
            extra = {"selectionPattern": response["SelectionPattern"]} if "SelectionPattern" in response else {}
            client.put_integration_response(
                restApiId=rest, resourceId=resource, httpMethod=verb, statusCode=response["StatusCode"],
                responseTemplates=response["ResponseTemplates"], **extra)
    [(_, stage)] = of_type("AWS::ApiGateway::Stage")
    client.create_deployment(restApiId=rest, stageName=stage["StageName"])
    print(rest)


if __name__ == "__main__":
    main()
