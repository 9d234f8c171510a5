//! The deployment files: the CloudFormation template and the state machines pass cfn-lint and
//! the Amazon States Language schema (batch/validate.py), and agree with the binary on the
//! things they share: which error names are retryable, the Batch exit code for a retry, the
//! heartbeat, and what a GPU container needs for Vulkan.

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

fn asl(name: &str) -> Value {
    let path = repo().join("batch/statemachines").join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

#[test]
fn template_and_state_machines_validate() {
    let out = Command::new(python())
        .arg(repo().join("batch/validate.py"))
        .output()
        .expect("running batch/validate.py (scripts/test makes the venv with cfn-lint)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 state machines checked, 0 problems"));
}

#[test]
fn the_hierarchy_retries_exactly_the_retryable_errors() {
    let machine = asl("resolution-hierarchy.asl.json");
    let step = &machine["States"]["DownsampleChannel"];
    let retried: BTreeSet<&str> = step["Retry"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["ErrorEquals"].as_array().unwrap())
        .filter_map(Value::as_str)
        .filter(|e| e.starts_with("cuboids."))
        .collect();
    let retryable: BTreeSet<&str> = FailureKind::ALL
        .iter()
        .filter(|k| k.is_retryable())
        .map(|k| k.error_name())
        .collect();
    assert_eq!(retried, retryable);
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
    let template = std::fs::read_to_string(repo().join("batch/cuboids.yaml")).unwrap();
    assert!(template.contains(&format!(
        "{{OnExitCode: \"{EXIT_RETRYABLE}\", Action: RETRY}}"
    )));
    assert!(template.contains("{OnStatusReason: \"Host EC2*\", Action: RETRY}"));
    assert!(template.contains("Command: [batch, --manifest, Ref::manifest, --offset, Ref::offset]"));
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
