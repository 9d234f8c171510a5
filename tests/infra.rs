//! The deployment: the CDK app (batch/app.py) synthesises offline, and its templates and state
//! machines pass cfn-lint and the Amazon States Language schema (batch/validate.py); the stacks
//! agree with the binary on the things they share (which error names are retryable, the Batch
//! exit code for a retry, the heartbeat, the commands the job definition and the worker fleet
//! run, what a GPU container needs for Vulkan); the REST API starts and describes executions of
//! the right machines with IAM; and bad settings are named.

mod common;

use cuboids::task::failure::{FailureKind, EXIT_RETRYABLE};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Python with cfn-lint: the test venv's (scripts/test installs moto[server], which brings
/// cfn-lint), or CUBOIDS_TEST_PYTHON.
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CUBOIDS_TEST_PYTHON") {
        return p.into();
    }
    let moto = std::env::var("CUBOIDS_MOTO_SERVER").unwrap_or_default();
    match Path::new(&moto).parent() {
        Some(bin) if bin.join("python").exists() => bin.join("python"),
        _ => repo().join("target/test-venv/bin/python"),
    }
}

fn assembly() -> &'static Path {
    common::cdk_assembly()
}

fn template(stack: &str) -> Value {
    let path = assembly().join(format!("Cuboids{stack}.template.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// The resources of a template of type `kind`, by logical id.
fn resources<'a>(template: &'a Value, kind: &str) -> Vec<(&'a String, &'a Value)> {
    template["Resources"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, r)| r["Type"] == kind)
        .collect()
}

fn only<'a>(template: &'a Value, kind: &str) -> &'a Value {
    let found = resources(template, kind);
    assert_eq!(found.len(), 1, "one {kind}");
    &found[0].1["Properties"]
}

fn asl(name: &str) -> Value {
    let path = repo().join("batch/statemachines").join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

#[test]
fn the_app_synthesises_and_its_templates_and_state_machines_validate() {
    let report = validate(assembly());
    assert!(
        report.contains("4 templates linted, 3 state machines checked, 0 problems"),
        "{report}"
    );
}

/// Runs batch/validate.py on a cloud assembly, asserts that it passes, and returns its report.
fn validate(assembly: &Path) -> String {
    let out = Command::new(python())
        .arg(repo().join("batch/validate.py"))
        .arg(assembly)
        .output()
        .expect("running batch/validate.py (scripts/test makes the venv with cfn-lint)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// With existing subnets and security groups, no VPC is made and both the Batch instances and
/// the worker fleet use the ones given; the templates still lint.
#[test]
fn existing_subnets_are_used_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let context = r#"{"image_uri": "i:gpu", "lambda_image_uri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/cuboids:cpu", "data_bucket": "my-volumes", "subnet_ids": "subnet-0123456789abcdef0,subnet-0123456789abcdef1", "security_group_ids": "sg-0123456789abcdef0", "provisioning": "EC2", "instance_types": "g6.xlarge"}"#;
    let o = common::run_cdk_app(context, dir.path());
    common::assert_success(&o);
    let read = |stack: &str| -> Value {
        serde_json::from_slice(
            &std::fs::read(dir.path().join(format!("Cuboids{stack}.template.json"))).unwrap(),
        )
        .unwrap()
    };
    let compute = read("Compute");
    assert!(resources(&compute, "AWS::EC2::VPC").is_empty());
    let resources_of = &only(&compute, "AWS::Batch::ComputeEnvironment")["ComputeResources"];
    assert_eq!(
        resources_of["Subnets"],
        serde_json::json!(["subnet-0123456789abcdef0", "subnet-0123456789abcdef1"])
    );
    assert_eq!(
        resources_of["SecurityGroupIds"],
        serde_json::json!(["sg-0123456789abcdef0"])
    );
    assert_eq!(resources_of["Type"], "EC2");
    assert_eq!(
        resources_of["InstanceTypes"],
        serde_json::json!(["g6.xlarge"])
    );
    let workers = read("Workers");
    let group = only(&workers, "AWS::AutoScaling::AutoScalingGroup");
    assert_eq!(
        group["VPCZoneIdentifier"],
        serde_json::json!(["subnet-0123456789abcdef0", "subnet-0123456789abcdef1"])
    );
    validate(dir.path());
}

/// A setting that cannot be deployed stops the app before anything is synthesised, naming it.
#[test]
fn bad_settings_are_named() {
    for (context, named) in [
        (r#"{"image_uri": "i"}"#, "context 'data_bucket' is required"),
        (
            r#"{"image_uri": "i", "data_bucket": "b-1"}"#,
            "context 'lambda_image_uri' is required",
        ),
        (
            r#"{"image_uri": "i", "data_bucket": "b-1", "lambda_image_uri": "l", "provisioning": "CHEAP"}"#,
            "context 'provisioning' is 'CHEAP'; expected SPOT or EC2",
        ),
        (
            r#"{"image_uri": "i", "data_bucket": "b-1", "lambda_image_uri": "l", "max_vcpus": "lots"}"#,
            "context 'max_vcpus' is 'lots'; expected a whole number",
        ),
        (
            r#"{"image_uri": "i", "data_bucket": "b-1", "lambda_image_uri": "l", "subnet_ids": "subnet-1"}"#,
            "context 'subnet_ids' and 'security_group_ids' go together",
        ),
        (
            r#"{"image_uri": "i", "data_bucket": "b-1", "lambda_image_uri": "l", "subnet_ids": "subnet-1", "security_group_ids": "sg-0123456789abcdef0"}"#,
            "context 'subnet_ids' has 'subnet-1', which is not a subnet id",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let o = common::run_cdk_app(context, dir.path());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{context}: {stderr}");
        assert!(stderr.contains(named), "{context}: {stderr}");
        assert!(
            !dir.path().join("manifest.json").exists(),
            "{context}: nothing is synthesised"
        );
    }
}

/// The cuboids errors a Task state retries.
fn retried_errors(step: &Value) -> BTreeSet<&str> {
    step["Retry"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["ErrorEquals"].as_array().unwrap())
        .filter_map(Value::as_str)
        .filter(|e| e.starts_with("cuboids."))
        .collect()
}

/// Every retryable failure name (src/task/failure.rs), and only those.
fn retryable_errors() -> BTreeSet<&'static str> {
    FailureKind::ALL
        .iter()
        .filter(|k| k.is_retryable())
        .map(|k| k.error_name())
        .collect()
}

#[test]
fn the_hierarchy_retries_exactly_the_retryable_errors() {
    let machine = asl("resolution-hierarchy.asl.json");
    let step = &machine["States"]["DownsampleChannel"];
    assert_eq!(retried_errors(step), retryable_errors());
    // The same on the Lambda side, and in the segmentation machine's invocations.
    let on_lambda = &machine["States"]["DownsampleChannelOnLambda"];
    assert_eq!(retried_errors(on_lambda), retryable_errors());
    let segment = asl("segment.asl.json");
    let invoke = &segment["States"]["Stages"]["ItemProcessor"]["States"]["LambdaTasks"]
        ["ItemProcessor"]["States"]["InvokeTask"];
    assert_eq!(retried_errors(invoke), retryable_errors());
    // A worker beats every 20 s by default: well inside the state's heartbeat.
    assert!(step["HeartbeatSeconds"].as_u64().unwrap() >= 3 * 20);
    assert!(
        step["Retry"][0]["ErrorEquals"]
            .as_array()
            .unwrap()
            .contains(&"States.Timeout".into()),
        "a worker that died (no heartbeats) is retried"
    );
    // The loop condition is the document's res_lt_max, as the Boss's state machine has it.
    assert_eq!(
        machine["States"]["MoreResolutions"]["Choices"][0]["Variable"],
        "$.msg.res_lt_max"
    );
}

#[test]
fn batch_retries_on_the_retryable_exit_code_and_lost_hosts() {
    let compute = template("Compute");
    let job = only(&compute, "AWS::Batch::JobDefinition");
    let on_exit = &job["RetryStrategy"]["EvaluateOnExit"];
    assert!(
        on_exit.as_array().unwrap().contains(
            &serde_json::json!({"OnExitCode": EXIT_RETRYABLE.to_string(), "Action": "RETRY"})
        ),
        "{on_exit}"
    );
    assert_eq!(
        on_exit[0],
        serde_json::json!({"OnStatusReason": "Host EC2*", "Action": "RETRY"})
    );
    assert_eq!(
        on_exit.as_array().unwrap().last().unwrap(),
        &serde_json::json!({"OnReason": "*", "Action": "EXIT"})
    );
    let container = &job["ContainerProperties"];
    let command: Vec<&str> = container["Command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        command,
        [
            "batch",
            "--manifest",
            "Ref::manifest",
            "--offset",
            "Ref::offset"
        ]
    );
    assert!(container["Environment"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!({"Name": "MALLOC_MMAP_THRESHOLD_", "Value": "1048576"})));
    let environment = only(&compute, "AWS::Batch::ComputeEnvironment");
    assert_eq!(environment["ComputeResources"]["MinvCpus"], 0);
    assert_eq!(
        environment["ComputeResources"]["Ec2Configuration"][0]["ImageType"],
        "ECS_AL2_NVIDIA"
    );
    // The command the job definition runs parses (with its parameters substituted).
    let out = Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .args([
            "batch",
            "--manifest",
            "s3://b/m.jsonl",
            "--offset",
            "0",
            "--help",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let plan = asl("run-plan.asl.json");
    let text = plan.to_string();
    assert!(text.contains("arn:aws:states:::batch:submitJob.sync"));
    assert!(text.contains("\"offset.$\":\"States.Format('{}', $.offset)\""));
}

/// The fleet's instances run `cuboids worker` on the stack's activity, leaving when idle; the
/// group starts empty and grows on the activity's backlog; an instance may remove only itself
/// from its own group.
#[test]
fn the_worker_fleet_serves_the_activity_and_scales_to_zero() {
    let workers = template("Workers");
    let group = only(&workers, "AWS::AutoScaling::AutoScalingGroup");
    assert_eq!(group["MinSize"], "0");
    assert!(
        group.get("DesiredCapacity").is_none(),
        "updates must not reset the fleet's size"
    );
    let tag = &group["Tags"][0];
    let launch = only(&workers, "AWS::EC2::LaunchTemplate");
    let script = launch["LaunchTemplateData"]["UserData"]["Fn::Base64"].to_string();
    for needed in [
        "worker --activity-arn",
        "--idle-exit-seconds 900",
        "--gpus all",
        "terminate-instance-in-auto-scaling-group",
        "--should-decrement-desired-capacity",
        "MALLOC_MMAP_THRESHOLD_=1048576",
    ] {
        assert!(
            script.contains(needed),
            "user data lacks {needed:?}: {script}"
        );
    }
    let activity = resources(&workers, "AWS::StepFunctions::Activity")[0].0;
    assert!(
        script.contains(&format!("{{\"Ref\":\"{activity}\"}}")),
        "the worker polls the stack's activity: {script}"
    );
    // The worker's command line, as the user data gives it, parses.
    let out = Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .args([
            "worker",
            "--activity-arn",
            "arn:aws:states:us-east-1:1:activity:a",
            "--concurrency",
            "1",
            "--idle-exit-seconds",
            "900",
            "--worker-name",
            "i-1",
            "--help",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    // Scale-out: the backlog alarm triggers the step policy on this group.
    let policy = resources(&workers, "AWS::AutoScaling::ScalingPolicy");
    let alarm = only(&workers, "AWS::CloudWatch::Alarm");
    assert_eq!(
        alarm["AlarmActions"][0],
        serde_json::json!({"Fn::GetAtt": [policy[0].0, "Arn"]})
    );
    let metrics = alarm["Metrics"].to_string();
    assert!(metrics.contains("ActivitiesScheduled") && metrics.contains("ActivitiesStarted"));
    // Scale-in: an instance may terminate only members of the group it is tagged with.
    let policies = resources(&workers, "AWS::IAM::Policy");
    let statements: Vec<&Value> = policies
        .iter()
        .flat_map(|(_, p)| {
            p["Properties"]["PolicyDocument"]["Statement"]
                .as_array()
                .unwrap()
        })
        .collect();
    let terminate = statements
        .iter()
        .find(|s| s["Action"] == "autoscaling:TerminateInstanceInAutoScalingGroup")
        .expect("the instances may leave the group");
    assert_eq!(
        terminate["Condition"]["StringEquals"]
            [format!("autoscaling:ResourceTag/{}", tag["Key"].as_str().unwrap())],
        tag["Value"]
    );
}

/// POST /downsample and POST /segment start the hierarchy and segmentation machines (a direct
/// Step Functions integration), GET /executions/{id} describes an execution; every method needs
/// IAM, and the API's role may start and describe executions of those two machines only.
#[test]
fn the_api_starts_and_describes_executions_with_iam() {
    let api = template("Api");
    let machines = template("StateMachines");
    let machine_id = |file: &str| -> String {
        let text = std::fs::read_to_string(repo().join("batch/statemachines").join(file)).unwrap();
        resources(&machines, "AWS::StepFunctions::StateMachine")
            .into_iter()
            .find(|(_, r)| r["Properties"]["DefinitionString"] == text.as_str())
            .unwrap()
            .0
            .clone()
    };
    let paths: std::collections::HashMap<String, String> =
        resources(&api, "AWS::ApiGateway::Resource")
            .into_iter()
            .map(|(id, r)| {
                (
                    id.clone(),
                    r["Properties"]["PathPart"].as_str().unwrap().to_string(),
                )
            })
            .collect();
    let mut routes = BTreeSet::new();
    for (_, method) in resources(&api, "AWS::ApiGateway::Method") {
        let m = &method["Properties"];
        let path = paths[m["ResourceId"]["Ref"].as_str().unwrap()].clone();
        let verb = m["HttpMethod"].as_str().unwrap();
        assert_eq!(m["AuthorizationType"], "AWS_IAM", "{verb} {path}");
        let integration = &m["Integration"];
        assert_eq!(integration["Type"], "AWS", "{verb} {path}");
        let uri = integration["Uri"].to_string();
        let template = integration["RequestTemplates"]["application/json"].to_string();
        match (verb, path.as_str()) {
            ("POST", "downsample") | ("POST", "segment") => {
                assert!(uri.contains("states:action/StartExecution"), "{uri}");
                let file = if path == "segment" {
                    "segment.asl.json"
                } else {
                    "resolution-hierarchy.asl.json"
                };
                // The machine's ARN, imported from the StateMachines stack.
                assert!(
                    template.contains(&machine_id(file)),
                    "{verb} {path}: {template}"
                );
                assert!(
                    m["RequestValidatorId"].is_object(),
                    "{verb} {path} checks its body"
                );
            }
            ("GET", "{id}") => {
                assert!(uri.contains("states:action/DescribeExecution"), "{uri}");
                assert!(template.contains("input.params('id')"), "{template}");
            }
            other => panic!("unexpected method {other:?}"),
        }
        routes.insert(format!("{verb} {path}"));
    }
    assert_eq!(routes.len(), 3, "{routes:?}");
    let policy = only(&api, "AWS::IAM::Policy");
    let statements = policy["PolicyDocument"]["Statement"].as_array().unwrap();
    let start = statements
        .iter()
        .filter(|s| s["Action"] == "states:StartExecution")
        .count();
    assert_eq!(start, 2, "{statements:?}");
    assert!(
        !policy.to_string().contains("\"Resource\":\"*\""),
        "no wildcard resources"
    );
}

#[test]
fn gpu_image_has_what_vulkan_needs() {
    let dockerfile = std::fs::read_to_string(repo().join("docker/Dockerfile")).unwrap();
    for needed in [
        "NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics",
        "libvulkan1",
        "libglvnd0",
        "COPY docker/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json",
        "ENTRYPOINT [\"/usr/local/bin/cuboids\"]",
    ] {
        assert!(
            dockerfile.contains(needed),
            "docker/Dockerfile lacks {needed:?}"
        );
    }
    let icd: Value =
        serde_json::from_slice(&std::fs::read(repo().join("docker/nvidia_icd.json")).unwrap())
            .unwrap();
    assert_eq!(icd["ICD"]["library_path"], "libGLX_nvidia.so.0");
    let lavapipe = std::fs::read_to_string(repo().join("docker/Dockerfile.lavapipe")).unwrap();
    assert!(lavapipe.contains("mesa-vulkan-drivers"));
}

#[test]
fn segment_machine_runs_the_plans_stages_in_order() {
    let machine = asl("segment.asl.json");
    let stages = &machine["States"]["Stages"];
    // One stage at a time, in the order the plan lists them: a stage reads what the one before
    // wrote.
    assert_eq!(stages["MaxConcurrency"], 1);
    assert_eq!(stages["ItemsPath"], "$.stages");
    // The fields `cuboids plan connected-components --manifests` prints for each stage.
    let selector = stages["ItemSelector"].to_string();
    for field in ["Value.manifest", "Value.jobs", "Value.stage"] {
        assert!(selector.contains(field), "{selector} lacks {field}");
    }
    let jobs = &stages["ItemProcessor"]["States"]["StageJobs"];
    assert_eq!(jobs["ItemsPath"], "$.jobs");
    let text = jobs.to_string();
    assert!(text.contains("arn:aws:states:::batch:submitJob.sync"));
    assert!(text.contains("\"offset.$\":\"States.Format('{}', $.offset)\""));
}
