//! AWS Batch: `cuboids plan` writes a manifest to S3, `cuboids batch` runs task
//! AWS_BATCH_JOB_ARRAY_INDEX of it (the binary, against a real S3-compatible server), exit codes
//! tell retryable from permanent failures, and `cuboids submit` submits the manifest as an array
//! job to moto's Batch.

mod common;

use aws_sdk_batch::types::{ResourceRequirement, ResourceType};
use common::{random_volume, Rng, S3Server};
use cuboids::dtype::DataType;
use cuboids::formats::precomputed::info::LayerType;
use cuboids::formats::precomputed::{Precomputed, WriteOptions};
use cuboids::runtime::local::{new_info, write_new_volume};
use cuboids::store::{LocalStore, Store};
use serde_json::Value;
use std::process::{Command, Output};
use std::sync::Arc;

fn cuboids(s3: &S3Server, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .args(args)
        .envs(s3.aws_env("AWS_ENDPOINT_URL"))
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn array_tasks_of_a_planned_manifest_equal_one_whole_run() {
    let s3 = S3Server::start();
    let size = [512, 512, 64];
    let data = random_volume(&mut Rng::new(3), DataType::Uint8, size, 1);
    let info = new_info(
        LayerType::Image,
        DataType::Uint8,
        size,
        [64, 64, 64],
        [4.0, 4.0, 40.0],
    );
    let remote = Arc::new(s3.store("vols", "a").await);
    Precomputed::create(remote.clone(), info.clone())
        .await
        .unwrap()
        .write_region(0, [0; 3], &data, WriteOptions::default())
        .await
        .unwrap();
    let temp = tempfile::tempdir().unwrap();
    let whole = temp.path().join("whole");
    write_new_volume(&whole, info, &data, WriteOptions::default())
        .await
        .unwrap();

    let manifest = "s3://vols/plans/a.jsonl";
    let plan = [
        "plan",
        "downsample",
        "s3://vols/a",
        "--num-mips",
        "2",
        "--task-mib",
        "16",
        // 4.2 MB of source a task at 50 MB/s: tasks of one 4 MiB tile each.
        "--task-seconds",
        "0.084",
        "--output",
        manifest,
    ];
    ok(&cuboids(&s3, &plan, &[]));
    let tasks: Vec<Value> = String::from_utf8(remote_object(&s3, "vols", "plans/a.jsonl").await)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(tasks.len(), 4, "4 MiB tasks of a 16 MiB volume");
    assert!(tasks.iter().all(|t| t["tile_mib"] == 4), "{tasks:?}");
    assert!(tasks.iter().all(|t| t["kind"] == "downsample"));

    for (i, task) in tasks.iter().enumerate() {
        let index = i.to_string();
        let out = ok(&cuboids(
            &s3,
            &["batch", "--manifest", manifest],
            &[("AWS_BATCH_JOB_ARRAY_INDEX", &index)],
        ));
        let doc: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(doc["bounds"], task["bounds"], "task {i} ran");
        assert_eq!(
            doc["chunks_written"],
            4 + 1,
            "task {i}: 4 chunks of mip 1, 1 of mip 2"
        );
    }
    ok(&Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .args(["downsample", whole.to_str().unwrap(), "--num-mips", "2"])
        .output()
        .unwrap());

    // Every chunk the whole run wrote, the array tasks wrote with the same bytes; same info.
    let local = LocalStore::new(&whole);
    let keys = chunk_keys(&whole, &["8_8_40", "16_16_40"]);
    assert_eq!(keys.len(), 16 + 4);
    for key in &keys {
        assert_eq!(
            remote.get(key).await.unwrap(),
            local.get(key).await.unwrap(),
            "{key}"
        );
    }
    let remote_info = Precomputed::open(remote.clone()).await.unwrap().info;
    let local_info = Precomputed::open(Arc::new(local)).await.unwrap().info;
    assert_eq!(remote_info, local_info);

    // A task with skip_existing finds its outputs and computes nothing; a plain re-run rewrites
    // identical bytes.
    let mut again = tasks[0].clone();
    again["skip_existing"] = Value::Bool(true);
    let out = ok(&cuboids(&s3, &["batch", "--task", &again.to_string()], &[]));
    let doc: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (
            doc["tiles_skipped_existing"].clone(),
            doc["chunks_written"].clone()
        ),
        (1.into(), 0.into()),
        "{doc}"
    );
    let before = remote.get(&keys[0]).await.unwrap();
    ok(&cuboids(
        &s3,
        &["batch", "--manifest", manifest],
        &[("AWS_BATCH_JOB_ARRAY_INDEX", "0")],
    ));
    assert_eq!(remote.get(&keys[0]).await.unwrap(), before);
}

/// Chunk keys (without `.gz`) under the given scale directories of a local volume.
fn chunk_keys(dir: &std::path::Path, scales: &[&str]) -> Vec<String> {
    let mut keys = Vec::new();
    for scale in scales {
        for entry in std::fs::read_dir(dir.join(scale)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            keys.push(format!("{scale}/{}", name.trim_end_matches(".gz")));
        }
    }
    keys.sort();
    keys
}

async fn remote_object(s3: &S3Server, bucket: &str, key: &str) -> Vec<u8> {
    let sdk = s3.sdk_config().await;
    cuboids::store::S3Store::with_config(&format!("s3://{bucket}"), &sdk, Some(s3.endpoint.clone()))
        .unwrap()
        .get(key)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("s3://{bucket}/{key} is missing"))
        .data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_tell_retryable_from_permanent_failures() {
    let s3 = S3Server::start();
    let store = s3.store("plans", "").await;
    let task = r#"{"kind":"downsample","location":"s3://plans/none"}"#;
    store
        .put(
            "bad.jsonl",
            format!("{task}\n{{\"kind\":\"downsample\"}}\n").into_bytes(),
            cuboids::store::ContentEncoding::Identity,
        )
        .await
        .unwrap();
    store
        .put(
            "two.jsonl",
            format!("{task}\n{task}\n").into_bytes(),
            cuboids::store::ContentEncoding::Identity,
        )
        .await
        .unwrap();
    let expect = |out: Output, code: i32, text: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{err}");
        assert!(err.contains(text), "expected {text:?} in: {err}");
    };
    expect(
        cuboids(
            &s3,
            &["batch", "--manifest", "s3://plans/bad.jsonl"],
            &[("AWS_BATCH_JOB_ARRAY_INDEX", "0")],
        ),
        65,
        "manifest s3://plans/bad.jsonl line 2: invalid task document: missing field `location`",
    );
    expect(
        cuboids(&s3, &["batch", "--manifest", "s3://plans/two.jsonl"], &[]),
        65,
        "has 2 tasks but AWS_BATCH_JOB_ARRAY_INDEX is not set",
    );
    expect(
        cuboids(
            &s3,
            &["batch", "--manifest", "s3://plans/two.jsonl"],
            &[("AWS_BATCH_JOB_ARRAY_INDEX", "0")],
        ),
        65,
        "cuboids.InvalidTask: downsampling s3://plans/none: no info file at s3://plans/none/info",
    );
    expect(
        cuboids(
            &s3,
            &["batch", "--manifest", "s3://plans/missing.jsonl"],
            &[],
        ),
        65,
        "manifest s3://plans/missing.jsonl does not exist",
    );
    // Storage that cannot be reached: retryable.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    expect(
        cuboids(
            &s3,
            &["batch", "--task", task],
            &[("AWS_ENDPOINT_URL", &endpoint), ("AWS_MAX_ATTEMPTS", "1")],
        ),
        75,
        "cuboids.StorageError",
    );
}

/// Creates an IAM role in moto with a plain query-protocol request (moto does not check
/// signatures; Batch needs the role to exist).
async fn create_role(endpoint: &str, name: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = format!(
        "Action=CreateRole&Version=2010-05-08&RoleName={name}&AssumeRolePolicyDocument=%7B%7D"
    );
    let host = endpoint.trim_start_matches("http://");
    let request = format!(
        "POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut socket = tokio::net::TcpStream::connect(host).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    format!("arn:aws:iam::123456789012:role/{name}")
}

fn requirement(kind: ResourceType, value: &str) -> ResourceRequirement {
    ResourceRequirement::builder()
        .r#type(kind)
        .value(value)
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_sends_a_manifest_as_an_array_job() {
    let s3 = S3Server::start();
    let store = s3.store("plans", "").await;
    let lines: String = (0..3)
        .map(|i| format!("{{\"kind\":\"downsample\",\"location\":\"s3://vols/v{i}\"}}\n"))
        .collect();
    store
        .put(
            "three.jsonl",
            lines.into_bytes(),
            cuboids::store::ContentEncoding::Identity,
        )
        .await
        .unwrap();

    let sdk = s3.sdk_config().await;
    let batch = aws_sdk_batch::Client::from_conf(
        aws_sdk_batch::config::Builder::from(&sdk)
            .endpoint_url(&s3.endpoint)
            .build(),
    );
    let role = create_role(&s3.endpoint, "cuboids-batch").await;
    let env = batch
        .create_compute_environment()
        .compute_environment_name("cuboids-ce")
        .r#type(aws_sdk_batch::types::CeType::Unmanaged)
        .state(aws_sdk_batch::types::CeState::Enabled)
        .service_role(role)
        .send()
        .await
        .unwrap();
    batch
        .create_job_queue()
        .job_queue_name("cuboids-queue")
        .state(aws_sdk_batch::types::JqState::Enabled)
        .priority(1)
        .compute_environment_order(
            aws_sdk_batch::types::ComputeEnvironmentOrder::builder()
                .order(1)
                .compute_environment(env.compute_environment_arn().unwrap())
                .build(),
        )
        .send()
        .await
        .unwrap();
    batch
        .register_job_definition()
        .job_definition_name("cuboids")
        .r#type(aws_sdk_batch::types::JobDefinitionType::Container)
        .container_properties(
            aws_sdk_batch::types::ContainerProperties::builder()
                .image("cuboids:gpu")
                .set_command(Some(
                    [
                        "batch",
                        "--manifest",
                        "Ref::manifest",
                        "--offset",
                        "Ref::offset",
                    ]
                    .map(String::from)
                    .to_vec(),
                ))
                .resource_requirements(requirement(ResourceType::Vcpu, "1"))
                .resource_requirements(requirement(ResourceType::Memory, "512"))
                .resource_requirements(requirement(ResourceType::Gpu, "1"))
                .build(),
        )
        .send()
        .await
        .unwrap();

    let out = ok(&cuboids(
        &s3,
        &[
            "submit",
            "--manifest",
            "s3://plans/three.jsonl",
            "--job-queue",
            "cuboids-queue",
            "--job-definition",
            "cuboids",
            "--job-name",
            "pyramid",
        ],
        &[("AWS_ENDPOINT_URL_BATCH", &s3.endpoint)],
    ));
    let submitted: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(submitted.len(), 1, "{out}");
    assert_eq!(
        (submitted[0]["offset"].clone(), submitted[0]["size"].clone()),
        (0.into(), 3.into())
    );
    let id = submitted[0]["job_id"].as_str().unwrap();
    let described = batch.describe_jobs().jobs(id).send().await.unwrap();
    let job = &described.jobs()[0];
    assert_eq!(job.job_name(), Some("pyramid"));
    assert_eq!(job.array_properties().and_then(|a| a.size()), Some(3));
    let params = job.parameters().unwrap();
    assert_eq!(params["manifest"], "s3://plans/three.jsonl");
    assert_eq!(params["offset"], "0");
}
