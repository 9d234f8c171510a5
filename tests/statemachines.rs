//! The state machines of batch/statemachines/ executed for real: LocalStack's Step Functions
//! interpreter (started here) runs the ASL with `cuboids worker`, the real binary, as its
//! activity, on a Boss channel in moto's S3 and DynamoDB (the s3index table).

mod common;

use aws_sdk_sfn::types::{ExecutionStatus, HistoryEventType};
use common::{LocalStack, S3Server};
use cuboids::store::boss_index::S3Index;
use cuboids::task::boss_downsample::{run_all_levels, BossTarget};
use cuboids::volume::Volume;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Two by two by two cuboids at resolution 0: resolutions 1-3 follow.
const SHAPE: [usize; 3] = [1024, 1024, 32];
/// The documents' `resolution_max` (`common::boss_job`).
const RESOLUTION_MAX: u32 = 4;

fn asl(name: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("batch/statemachines")
            .join(name),
    )
    .unwrap()
}

/// The first step's document (resolution 0, up to `RESOLUTION_MAX`).
fn job(bucket: &str, table: &str) -> Value {
    common::boss_job(SHAPE, 0, bucket, table)
}

/// True (saying so) where no LocalStack can be started: `scripts/test` sets
/// `CUBOIDS_LOCALSTACK_PYTHON` wherever a Python >= 3.12 exists, and says so where none does.
fn localstack_missing() -> bool {
    let missing = std::env::var_os("CUBOIDS_LOCALSTACK_PYTHON").is_none();
    if missing {
        eprintln!("NOT RUN: CUBOIDS_LOCALSTACK_PYTHON is not set (no LocalStack to execute ASL)");
    }
    missing
}

/// Moto (S3, DynamoDB) and LocalStack (Step Functions), and clients on them.
struct Services {
    moto: S3Server,
    sfn_stack: LocalStack,
    sdk: aws_config::SdkConfig,
    sfn: aws_sdk_sfn::Client,
}

/// The task function's ARN in LocalStack's account and region.
const TASK_FUNCTION: &str = "arn:aws:lambda:us-east-1:000000000000:function:cuboids";

impl Services {
    async fn start() -> Services {
        Services::start_on(LocalStack::start()).await
    }

    /// With LocalStack's Lambda service, and the task function made there: `cuboids lambda`
    /// run on the host (batch/localstack_host) with the S3 server's endpoint.
    async fn start_with_lambda() -> Services {
        let services = Services::start_on(LocalStack::start_with_lambda(&format!(
            "{} lambda",
            env!("CARGO_BIN_EXE_cuboids")
        )))
        .await;
        // LocalStack's Lambda API through boto3 (in LocalStack's own venv): the function, a
        // placeholder package (the host executor runs the command instead), and the wait until
        // it is active.
        let script = r##"
import io, sys, zipfile, boto3
lam = boto3.client("lambda", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="testing", aws_secret_access_key="testing")
package = io.BytesIO()
with zipfile.ZipFile(package, "w") as z:
    z.writestr("bootstrap", "#!/bin/sh")
lam.create_function(FunctionName="cuboids", Runtime="provided.al2023", Handler="bootstrap",
    Role="arn:aws:iam::000000000000:role/cuboids-task", Code={"ZipFile": package.getvalue()},
    Timeout=300, MemorySize=10240,
    Environment={"Variables": {"AWS_ENDPOINT_URL_S3": sys.argv[2],
                               "AWS_ENDPOINT_URL_DYNAMODB": sys.argv[2]}})
lam.get_waiter("function_active_v2").wait(FunctionName="cuboids")
"##;
        let python = std::env::var("CUBOIDS_LOCALSTACK_PYTHON").unwrap();
        let out = Command::new(python)
            .args([
                "-c",
                script,
                &services.sfn_stack.endpoint,
                &services.moto.endpoint,
            ])
            .output()
            .unwrap();
        common::assert_success(&out);
        services
    }

    async fn start_on(sfn_stack: LocalStack) -> Services {
        let moto = S3Server::start();
        let sdk = moto.sdk_config().await;
        let sfn = aws_sdk_sfn::Client::from_conf(
            aws_sdk_sfn::config::Builder::from(&sdk)
                .endpoint_url(&sfn_stack.endpoint)
                .build(),
        );
        Services {
            moto,
            sfn_stack,
            sdk,
            sfn,
        }
    }

    /// A bucket holding the channel's resolution-0 cuboids, and its s3index table.
    async fn channel(&self, bucket: &str, table: &str, vol: &Volume) -> BossTarget {
        let store = self.moto.store(bucket, "").await;
        let ddb = aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::config::Builder::from(&self.sdk)
                .endpoint_url(&self.moto.endpoint)
                .build(),
        );
        common::create_s3_index(&ddb, table).await;
        common::put_boss_cuboids(&store, vol, |_| false).await;
        BossTarget {
            store: Arc::new(store),
            index: S3Index::new(&self.sdk, Some(self.moto.endpoint.clone()), table),
        }
    }

    /// The cuboids one in-process run of all levels writes for `vol` (in a bucket of its own).
    async fn in_process_hierarchy(&self, vol: &Volume) -> BTreeMap<String, Vec<u8>> {
        let target = self
            .channel("reference.bucket", "reference.index", vol)
            .await;
        let ctx = Arc::new(cuboids::gpu::GpuContext::new().unwrap());
        run_all_levels(
            ctx,
            &target,
            &job("reference.bucket", "reference.index"),
            1 << 30,
        )
        .await
        .unwrap();
        self.moto.objects("reference.bucket").await
    }

    /// Creates an activity called `name` and a state machine of `definition(activity ARN)`;
    /// returns both ARNs.
    async fn machine(
        &self,
        name: &str,
        definition: impl FnOnce(&str) -> String,
    ) -> (String, String) {
        let activity = self
            .sfn
            .create_activity()
            .name(name)
            .send()
            .await
            .unwrap()
            .activity_arn()
            .to_string();
        let machine = self
            .sfn
            .create_state_machine()
            .name(name)
            .definition(definition(&activity))
            .role_arn("arn:aws:iam::000000000000:role/cuboids-test")
            .send()
            .await
            .unwrap()
            .state_machine_arn()
            .to_string();
        (activity, machine)
    }

    /// Creates the activity and the resolution-hierarchy machine on it; returns their ARNs.
    async fn hierarchy_machine(&self, name: &str) -> (String, String) {
        self.hierarchy_machine_with(name, &[]).await
    }

    /// [`Self::hierarchy_machine`] with text replacements in its ASL (shorter timings).
    async fn hierarchy_machine_with(
        &self,
        name: &str,
        replace: &[(&str, &str)],
    ) -> (String, String) {
        self.machine(name, |activity| {
            let mut definition = asl("resolution-hierarchy.asl.json")
                .replace("${DownsampleActivityArn}", activity)
                .replace("${TaskFunctionArn}", TASK_FUNCTION);
            for (from, to) in replace {
                assert!(definition.contains(from), "{from} is not in the machine");
                definition = definition.replace(from, to);
            }
            definition
        })
        .await
    }

    /// Creates the activity and the segmentation machine on it; returns their ARNs. Shorter
    /// waits than shipped (heartbeat 4 s, retry interval 1 s): LocalStack now and then hands a
    /// task to a poll whose answer never reaches a worker (the history shows ActivityStarted, and
    /// no worker runs it). The heartbeat timeout and Retry recover it, as they recover a lost
    /// connection on AWS; at 300 s that outlasts a test. Its Batch states are never entered.
    async fn segmentation_machine(&self, name: &str) -> (String, String) {
        self.machine(name, |activity| {
            asl("segment.asl.json")
                .replace("\"HeartbeatSeconds\": 300", "\"HeartbeatSeconds\": 4")
                .replace("\"IntervalSeconds\": 30", "\"IntervalSeconds\": 1")
                .replace("${DownsampleActivityArn}", activity)
                .replace(
                    "${JobQueueArn}",
                    "arn:aws:batch:us-east-1:000000000000:job-queue/unused",
                )
                .replace(
                    "${JobDefinitionArn}",
                    "arn:aws:batch:us-east-1:000000000000:job-definition/unused",
                )
                .replace("${TaskFunctionArn}", TASK_FUNCTION)
        })
        .await
    }

    /// `cuboids worker` on the activity, against both services.
    fn worker(&self, activity: &str) -> Worker {
        self.worker_named(activity, "worker", &self.moto.endpoint)
    }

    /// A worker called `name` whose S3 and DynamoDB requests go to `storage` (a broken endpoint
    /// makes a failing or a stuck worker).
    fn worker_named(&self, activity: &str, name: &str, storage: &str) -> Worker {
        Command::new(env!("CARGO_BIN_EXE_cuboids"))
            .args([
                "worker",
                "--activity-arn",
                activity,
                "--heartbeat-seconds",
                "1",
            ])
            .args(["--worker-name", name])
            .envs(self.moto.aws_env("AWS_ENDPOINT_URL"))
            .env("AWS_ENDPOINT_URL", storage)
            .env("AWS_MAX_ATTEMPTS", "1")
            .env("AWS_ENDPOINT_URL_SFN", &self.sfn_stack.endpoint)
            .env("CUBOIDS_LOG_FORMAT", "text")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Worker)
            .unwrap()
    }

    /// Starts an execution and waits for it to end; returns its status, error and output.
    async fn execute(&self, machine: &str, input: &Value) -> (ExecutionStatus, Value) {
        let arn = self.start_execution(machine, input).await;
        self.finish(&arn).await
    }

    async fn start_execution(&self, machine: &str, input: &Value) -> String {
        self.sfn
            .start_execution()
            .state_machine_arn(machine)
            .input(input.to_string())
            .send()
            .await
            .unwrap()
            .execution_arn()
            .to_string()
    }

    /// The execution's history events (type, and for activity events the worker or error).
    async fn history(&self, arn: &str) -> Vec<(HistoryEventType, String)> {
        let events = self
            .sfn
            .get_execution_history()
            .execution_arn(arn)
            .max_results(1000)
            .send()
            .await
            .unwrap();
        events
            .events()
            .iter()
            .map(|e| {
                let detail = if let Some(d) = e.activity_started_event_details() {
                    d.worker_name().unwrap_or_default().to_string()
                } else if let Some(d) = e.activity_failed_event_details() {
                    d.error().unwrap_or_default().to_string()
                } else {
                    String::new()
                };
                (e.r#type().clone(), detail)
            })
            .collect()
    }

    /// Waits until the execution's history has an event that `wanted` accepts.
    async fn wait_for_event(
        &self,
        arn: &str,
        what: &str,
        wanted: impl Fn(&(HistoryEventType, String)) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.history(arn).await.iter().any(&wanted) {
            assert!(
                Instant::now() < deadline,
                "no {what} in {:?}",
                self.history(arn).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for an execution to end; returns its status, error and output.
    async fn finish(&self, arn: &str) -> (ExecutionStatus, Value) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let d = self
                .sfn
                .describe_execution()
                .execution_arn(arn)
                .send()
                .await
                .unwrap();
            if *d.status() != ExecutionStatus::Running {
                let detail = json!({
                    "output": d.output().map(|o| serde_json::from_str::<Value>(o).unwrap()),
                    "error": d.error(),
                    "cause": d.cause(),
                });
                return (d.status().clone(), detail);
            }
            assert!(Instant::now() < deadline, "execution {arn} still running");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A worker process, killed if a failing test drops it before [`stop`].
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stops a worker as ECS or a shutdown would (SIGTERM); it must exit 0.
fn stop(mut worker: Worker) {
    let _ = Command::new("kill")
        .args(["-TERM", &worker.0.id().to_string()])
        .status();
    let status = worker.0.wait().unwrap();
    assert!(status.success(), "the worker exited {status} on SIGTERM");
}

fn channel_volume() -> Volume {
    common::boss_channel_volume(SHAPE)
}

/// The hierarchy machine loops its activity step (cuboids worker) while the returned document
/// says `res_lt_max`: the execution succeeds with every resolution written exactly as one
/// in-process run of all levels writes it. A document the worker refuses ends the execution
/// FAILED with the cuboids.* error name, not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resolution_hierarchy_machine_runs_the_worker_to_the_last_level() {
    if localstack_missing() {
        return;
    }
    let services = Services::start().await;
    let vol = channel_volume();
    services
        .channel("machine.bucket", "machine.index", &vol)
        .await;
    let (activity, machine) = services.hierarchy_machine("hierarchy").await;
    let worker = services.worker(&activity);

    let t = Instant::now();
    let (status, detail) = services
        .execute(&machine, &job("machine.bucket", "machine.index"))
        .await;
    assert_eq!(status, ExecutionStatus::Succeeded, "{detail}");
    let seconds = t.elapsed().as_secs_f64();
    let output = &detail["output"];
    assert_eq!(output["msg"]["res_lt_max"], false, "{output}");
    assert_eq!(output["msg"]["resolution"], RESOLUTION_MAX - 1, "{output}");

    let (got, want) = (
        services.moto.objects("machine.bucket").await,
        services.in_process_hierarchy(&vol).await,
    );
    for resolution in 1..RESOLUTION_MAX {
        let part = format!("&1024&{resolution}&");
        assert!(
            got.keys().any(|k| k.contains(&part)),
            "no cuboid of resolution {resolution}"
        );
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    assert!(
        got == want,
        "the machine's cuboids differ from one in-process run"
    );
    eprintln!(
        "hierarchy: {} cuboids over resolutions 0-{} in {seconds:.1} s",
        got.len(),
        RESOLUTION_MAX - 1
    );

    // A permanent failure: the execution fails with the worker's error name, at once.
    let mut bad = job("machine.bucket", "machine.index");
    bad["msg"]["data_type"] = json!("complex128");
    let (status, detail) = services.execute(&machine, &bad).await;
    assert_eq!(status, ExecutionStatus::Failed, "{detail}");
    assert_eq!(detail["error"], "cuboids.InvalidTask", "{detail}");
    assert!(
        detail["cause"]
            .as_str()
            .unwrap_or("")
            .contains("msg.data_type is \"complex128\""),
        "{detail}"
    );
    stop(worker);
}

/// The hierarchy's Retry, exercised with the real worker: an attempt that fails with a retryable
/// error (cuboids.StorageError: a worker whose storage refuses connections) and an attempt whose
/// worker is killed mid-task (its heartbeats stop: States.Timeout) are both retried, and another
/// worker finishes the hierarchy, with the same cuboids as one in-process run. The machine is
/// the shipped ASL with shorter waits (heartbeat 4 s, retry interval 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_lost_attempts_are_retried_until_a_worker_finishes() {
    if localstack_missing() {
        return;
    }
    let services = Services::start().await;
    let vol = channel_volume();
    services.channel("retry.bucket", "retry.index", &vol).await;
    let (activity, machine) = services
        .hierarchy_machine_with(
            "retried",
            &[
                ("\"HeartbeatSeconds\": 300", "\"HeartbeatSeconds\": 4"),
                ("\"IntervalSeconds\": 30", "\"IntervalSeconds\": 1"),
            ],
        )
        .await;
    // Storage that refuses connections: a port that was just free.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    // Storage that accepts and never answers: the worker hangs inside its task.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stuck = format!("http://{}", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });

    let arn = services
        .start_execution(&machine, &job("retry.bucket", "retry.index"))
        .await;
    let failing = services.worker_named(&activity, "failing", &refused);
    services
        .wait_for_event(&arn, "a cuboids.StorageError attempt", |(t, d)| {
            *t == HistoryEventType::ActivityFailed && d == "cuboids.StorageError"
        })
        .await;
    stop(failing);
    let mut hanging = services.worker_named(&activity, "hanging", &stuck);
    services
        .wait_for_event(&arn, "the hanging worker's attempt", |(t, d)| {
            *t == HistoryEventType::ActivityStarted && d == "hanging"
        })
        .await;
    hanging.0.kill().unwrap();
    hanging.0.wait().unwrap();
    let good = services.worker_named(&activity, "good", &services.moto.endpoint);
    let (status, detail) = services.finish(&arn).await;
    assert_eq!(status, ExecutionStatus::Succeeded, "{detail}");
    let history = services.history(&arn).await;
    assert!(
        history
            .iter()
            .any(|(t, _)| *t == HistoryEventType::ActivityTimedOut),
        "no heartbeat timeout in {history:?}"
    );
    stop(good);

    assert!(
        services.moto.objects("retry.bucket").await == services.in_process_hierarchy(&vol).await,
        "the retried hierarchy's cuboids differ from one in-process run"
    );
}

/// A float32 volume of `shape` under `dir` (`prob`, uncompressed) of seeded random values in
/// [0, 1): many small components at a threshold of 0.5.
async fn random_probabilities(dir: &Path, shape: [usize; 3], seed: u64) -> std::path::PathBuf {
    let mut rng = common::Rng::new(seed);
    let values: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| rng.below(1000) as f32 / 1000.0)
        .collect();
    let input = dir.join("prob");
    cuboids::runtime::segmentation::write_float_volume(
        &input,
        &[&values],
        shape,
        cuboids::formats::precomputed::WriteOptions { gzip_level: 0 },
    )
    .await
    .unwrap();
    input
}

/// The segmentation machine as POST /segment starts it: a request, planned by its Plan step on
/// `cuboids worker` (the same plan as the CLI's), then, with `"runner": "activity"`, every task of
/// each stage handed to the workers as a manifest reference, stage after stage; the output equals
/// the single-process run's. The Batch runner stays the default (its states are checked in
/// tests/infra.rs; LocalStack does not emulate Batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_segmentation_machine_runs_a_plan_on_activity_workers() {
    if localstack_missing() {
        return;
    }
    let services = Services::start().await;
    let dir = tempfile::tempdir().unwrap();
    let input = random_probabilities(dir.path(), [64, 48, 24], 17).await;
    let cli = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_cuboids"))
            .args(args)
            .env("CUBOIDS_LOG_FORMAT", "text")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };
    let (single, staged) = (dir.path().join("single"), dir.path().join("staged"));
    let common_args = |output: &Path| {
        vec![
            "--input".to_string(),
            input.to_str().unwrap().to_string(),
            "--output".to_string(),
            output.to_str().unwrap().to_string(),
            "--threshold".to_string(),
            "0.5".to_string(),
            "--dust".to_string(),
            "3".to_string(),
            "--chunk-size".to_string(),
            "16,16,8".to_string(),
            "--output-chunk-size".to_string(),
            "8,8,4".to_string(),
        ]
    };
    let mut args = vec!["connected-components".to_string()];
    args.extend(common_args(&single));
    cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // The plan the CLI makes, to compare with the one the machine's Plan step makes.
    let cli_manifests = format!("{}/", dir.path().join("cli-plan").display());
    let mut args = vec!["plan".to_string(), "connected-components".to_string()];
    args.extend(common_args(&staged));
    args.extend(
        [
            "--task-mib",
            "64",
            "--block-size",
            "16,16,8",
            "--manifests",
            &cli_manifests,
        ]
        .map(String::from),
    );
    let plan: Value =
        serde_json::from_slice(&cli(&args.iter().map(String::as_str).collect::<Vec<_>>())).unwrap();
    let blocks = plan["stages"][0]["tasks"].as_u64().unwrap();
    assert!(blocks >= 8, "{plan}");

    let (activity, machine) = services.segmentation_machine("segmentation").await;
    // Two workers, as a fleet would poll.
    let workers = [
        services.worker_named(&activity, "one", &services.moto.endpoint),
        services.worker_named(&activity, "two", &services.moto.endpoint),
    ];
    // What POST /segment starts: a request, which the machine's Plan step plans on a worker.
    let manifests = format!("{}/", dir.path().join("plan").display());
    let work = json!({
        "kind": "connected-components",
        "input": input.to_str().unwrap(),
        "output": staged.to_str().unwrap(),
        "threshold": 0.5,
        "dust": 3,
        "chunk_size": [16, 16, 8],
        "output_chunk_size": [8, 8, 4],
    });
    let request = json!({
        "job_name": "cc",
        "runner": "activity",
        "request": {
            "kind": "plan", "work": work, "manifests": manifests, "task_mib": 64,
            "block_size": [16, 16, 8],
        },
    });
    let t = Instant::now();
    let (status, detail) = services.execute(&machine, &request).await;
    assert_eq!(status, ExecutionStatus::Succeeded, "{detail}");
    let planned = &detail["output"]["planned"];
    assert_eq!(planned["plan"], plan["plan"], "{detail}");
    assert_eq!(planned["blocks"], plan["blocks"], "{detail}");
    let stages = |p: &Value| -> Vec<(Value, Value)> {
        p["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["stage"].clone(), s["tasks"].clone()))
            .collect()
    };
    assert_eq!(stages(planned), stages(&plan));
    assert_eq!(
        std::fs::read(dir.path().join("plan/block.jsonl")).unwrap(),
        std::fs::read(dir.path().join("cli-plan/block.jsonl")).unwrap(),
        "the Plan step's block manifest differs from the CLI's"
    );
    eprintln!(
        "segmentation machine: {} stages, {blocks} blocks, {:.1} s",
        plan["stages"].as_array().unwrap().len(),
        t.elapsed().as_secs_f64()
    );
    assert!(staged.join("info").exists(), "finalize wrote no info");
    assert_eq!(
        common::read_labels(&staged).await,
        common::read_labels(&single).await,
        "the plan run by the machine differs from the single process"
    );

    // The pipeline behind POST /segment: inference planned and run (its columns as tasks on
    // the workers, then finalize), then, as its "then", the segmentation of what it wrote,
    // planned only once the affinities exist; each equals its single-process run.
    let image = dir.path().join("image");
    common::random_uint8_layer(&image, [40, 36, 12], [16, 16, 4], 5).await;
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/net_rsunet.onnx");
    let (one, inferred) = (dir.path().join("aff-one"), dir.path().join("aff-staged"));
    let (seg_one, seg_staged) = (dir.path().join("seg-one"), dir.path().join("seg-staged"));
    cli(&[
        "infer",
        "--image",
        image.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--output",
        one.to_str().unwrap(),
        "--overlap",
        "4,4,1",
    ]);
    cli(&[
        "segment",
        "--affinity",
        one.to_str().unwrap(),
        "--output",
        seg_one.to_str().unwrap(),
        "--threshold",
        "0.5",
        "--chunk-size",
        "16,16,4",
        "--output-chunk-size",
        "8,8,4",
    ]);
    let request = json!({
        "job_name": "pipeline",
        "runner": "activity",
        "request": {
            "kind": "plan",
            "work": {
                "kind": "infer",
                "image": image.to_str().unwrap(),
                "model": model.to_str().unwrap(),
                "output": inferred.to_str().unwrap(),
                "overlap": [4, 4, 1],
                "column": [16, 16],
            },
            "manifests": format!("{}/", dir.path().join("infer-plan").display()),
            "task_mib": 1024,
        },
        "then": {
            "request": {
                "kind": "plan",
                "work": {
                    "kind": "segment",
                    "affinity": inferred.to_str().unwrap(),
                    "output": seg_staged.to_str().unwrap(),
                    "threshold": 0.5,
                    "chunk_size": [16, 16, 4],
                    "output_chunk_size": [8, 8, 4],
                },
                "manifests": format!("{}/", dir.path().join("segment-plan").display()),
                "task_mib": 64,
                "block_size": [16, 16, 4],
            },
        },
    });
    let (status, detail) = services.execute(&machine, &request).await;
    assert_eq!(status, ExecutionStatus::Succeeded, "{detail}");
    for w in workers {
        stop(w);
    }
    let infer_plan: Vec<Value> = std::fs::read_to_string(dir.path().join("infer-plan/infer.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(infer_plan.len(), 9, "3 x 3 columns of 16x16");
    // The last plan the machine made is the segmentation's.
    let planned = &detail["output"]["planned"];
    assert_eq!(planned["stages"][0]["stage"], "block", "{detail}");
    assert_eq!(
        bits(common::read_f32_layer(&inferred).await.1),
        bits(common::read_f32_layer(&one).await.1),
        "the inference plan run by the machine differs from the single process"
    );
    let labels = common::read_labels(&seg_staged).await;
    assert!(labels.iter().any(|&l| l != 0));
    assert_eq!(
        labels,
        common::read_labels(&seg_one).await,
        "the pipeline's segmentation differs from the single process on the same affinities"
    );
}

/// Float values as their bits, to compare byte for byte.
fn bits(values: Vec<f32>) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Runs `curl` against the API: the HTTP status and the parsed body.
fn call(url: &str, body: Option<&Value>) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-w", "\n%{http_code}", url]);
    if let Some(body) = body {
        cmd.args([
            "-H",
            "content-type: application/json",
            "-d",
            &body.to_string(),
        ]);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap();
    let parsed = serde_json::from_str(body).unwrap_or_else(|_| json!({"raw": body}));
    (code.trim().parse().unwrap(), parsed)
}

/// The REST API as the CDK app synthesises it (its methods, models, validators and mapping
/// templates, created on LocalStack's API Gateway by tests/common/rest_api.py): POST /segment
/// starts the segmentation machine with the request body as its input, GET /executions/{id}
/// reports it running and then SUCCEEDED with its output; a body the model refuses, an unknown
/// execution and POST /downsample's start of the hierarchy are answered as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_starts_and_reports_executions() {
    if localstack_missing() {
        return;
    }
    let assembly = common::cdk_assembly();
    let services = Services::start().await;
    let (activity, segment) = services.segmentation_machine("segmentation").await;
    let (_, hierarchy) = services.hierarchy_machine("hierarchy").await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/rest_api.py");
    let out = Command::new(std::env::var("CUBOIDS_LOCALSTACK_PYTHON").unwrap())
        .arg(script)
        .arg(&services.sfn_stack.endpoint)
        .arg(assembly.join("CuboidsApi.template.json"))
        .arg(format!("Segment={segment}"))
        .arg(format!("ResolutionHierarchy={hierarchy}"))
        .output()
        .unwrap();
    common::assert_success(&out);
    let api_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let base = format!(
        "{}/restapis/{api_id}/v1/_user_request_",
        services.sfn_stack.endpoint
    );

    let dir = tempfile::tempdir().unwrap();
    let input = random_probabilities(dir.path(), [32, 32, 16], 5).await;
    let output = dir.path().join("cc");
    let request = json!({
        "job_name": "cc-api",
        "runner": "activity",
        "request": {
            "kind": "plan",
            "work": {
                "kind": "connected-components",
                "input": input.to_str().unwrap(),
                "output": output.to_str().unwrap(),
                "threshold": 0.5,
                "chunk_size": [16, 16, 8],
                "output_chunk_size": [8, 8, 4],
            },
            "manifests": format!("{}/", dir.path().join("plan").display()),
            "task_mib": 64,
            "block_size": [16, 16, 8],
        },
    });
    // Refused by the model before any execution starts.
    let (status, body) = call(&format!("{base}/segment"), Some(&json!({"request": {}})));
    assert_eq!(status, 400, "{body}");

    let worker = services.worker(&activity);
    let (status, started) = call(&format!("{base}/segment"), Some(&request));
    assert_eq!(status, 200, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    assert!(
        id.starts_with(&segment.replace(":stateMachine:", ":execution:")),
        "{id}"
    );
    assert!(started["started"].is_number(), "{started}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let described = loop {
        let (status, described) = call(&format!("{base}/executions/{id}"), None);
        assert_eq!(status, 200, "{described}");
        assert_eq!(described["id"], id.as_str());
        if described["status"] != "RUNNING" {
            break described;
        }
        assert!(Instant::now() < deadline, "{described}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    stop(worker);
    assert_eq!(described["status"], "SUCCEEDED", "{described}");
    assert!(described["stopped"].is_number(), "{described}");
    // The output is the execution's document, as JSON: the request it ran and the plan made.
    assert_eq!(described["output"]["job_name"], "cc-api", "{described}");
    assert_eq!(
        described["output"]["planned"]["kind"], "plan",
        "{described}"
    );
    assert!(
        output.join("info").exists(),
        "the segmentation ran to its end"
    );

    let unknown = segment.replace(":stateMachine:", ":execution:") + ":no-such-execution";
    let (status, body) = call(&format!("{base}/executions/{unknown}"), None);
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("ExecutionDoesNotExist"),
        "{body}"
    );

    // POST /downsample starts the hierarchy with the document as its input.
    let document = job("no.bucket", "no.index");
    let (status, started) = call(&format!("{base}/downsample"), Some(&document));
    assert_eq!(status, 200, "{started}");
    let id = started["id"].as_str().unwrap();
    assert!(
        id.starts_with(&hierarchy.replace(":stateMachine:", ":execution:")),
        "{id}"
    );
    let input: Value = serde_json::from_str(
        services
            .sfn
            .describe_execution()
            .execution_arn(id)
            .send()
            .await
            .unwrap()
            .input()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        input, document,
        "the body is the execution's input, as it is"
    );
}

/// Stages the plan routes to Lambda run as Lambda invocations: the machine's Plan step plans
/// on a worker, then every stage (small here, so each on Lambda by the plan's estimates) hands
/// its tasks to `lambda:invoke` of the task function. LocalStack's own Lambda service runs the
/// function; its functions run as host processes (batch/localstack_host), since LocalStack's
/// Docker executor needs an init binary downloaded from GitHub, which no machine here reaches.
/// The output equals the single-process run's, and the workers ran only the Plan step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_segmentation_machine_runs_small_stages_on_lambda() {
    if localstack_missing() {
        return;
    }
    let services = Services::start_with_lambda().await;
    let dir = tempfile::tempdir().unwrap();
    let input = random_probabilities(dir.path(), [64, 48, 24], 23).await;
    let (single, staged) = (dir.path().join("single"), dir.path().join("staged"));
    let work = |output: &Path| {
        json!({
            "kind": "connected-components",
            "input": input.to_str().unwrap(),
            "output": output.to_str().unwrap(),
            "threshold": 0.5,
            "dust": 3,
            "chunk_size": [16, 16, 8],
            "output_chunk_size": [8, 8, 4],
        })
    };
    common::assert_success(&common::run_task_on_stdin(&work(&single), Vec::new()));

    let (activity, machine) = services.segmentation_machine("segmentation-lambda").await;
    let _worker = services.worker(&activity);
    let manifests = format!("{}/", dir.path().join("plan").display());
    let request = json!({
        "job_name": "cc-lambda",
        "request": {
            "kind": "plan", "work": work(&staged), "manifests": manifests, "task_mib": 64,
            "block_size": [16, 16, 8],
        },
    });
    let arn = services.start_execution(&machine, &request).await;
    let (status, detail) = services.finish(&arn).await;
    assert_eq!(status, ExecutionStatus::Succeeded, "{detail}");
    let stages = detail["output"]["planned"]["stages"]
        .as_array()
        .unwrap()
        .clone();
    assert!(stages.iter().all(|s| s["runner"] == "lambda"), "{stages:?}");
    let tasks: u64 = stages.iter().map(|s| s["tasks"].as_u64().unwrap()).sum();
    assert!(tasks >= 8, "{tasks} tasks");
    let history = services.history(&arn).await;
    let count = |kind: HistoryEventType| history.iter().filter(|(t, _)| *t == kind).count();
    assert_eq!(
        count(HistoryEventType::ActivitySucceeded),
        1,
        "only the Plan step on a worker"
    );
    assert_eq!(
        count(HistoryEventType::TaskSucceeded) as u64,
        tasks,
        "one invocation a task"
    );
    assert_eq!(
        common::read_labels(&staged).await,
        common::read_labels(&single).await,
        "the plan run on Lambda differs from the single process"
    );
}

/// A small channel entirely on Lambda (`"runner": "lambda"`): every resolution's step is an
/// invocation of the task function (LocalStack's Lambda service, the real binary on the host;
/// see the test above), looping on the returned document; the cuboids equal one in-process
/// run's, and no activity task ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resolution_hierarchy_machine_runs_a_small_channel_on_lambda() {
    if localstack_missing() {
        return;
    }
    let services = Services::start_with_lambda().await;
    let vol = channel_volume();
    services
        .channel("lambda.bucket", "lambda.index", &vol)
        .await;
    let (_activity, machine) = services.hierarchy_machine("hierarchy-lambda").await;
    let mut input = job("lambda.bucket", "lambda.index");
    input["runner"] = json!("lambda");
    let arn = services.start_execution(&machine, &input).await;
    let (status, detail) = services.finish(&arn).await;
    assert_eq!(status, ExecutionStatus::Succeeded, "{detail}");
    assert_eq!(detail["output"]["msg"]["res_lt_max"], false, "{detail}");
    let history = services.history(&arn).await;
    let count = |kind: HistoryEventType| history.iter().filter(|(t, _)| *t == kind).count();
    assert_eq!(
        count(HistoryEventType::ActivityScheduled),
        0,
        "no step on the activity"
    );
    assert_eq!(
        count(HistoryEventType::TaskSucceeded),
        (RESOLUTION_MAX - 1) as usize,
        "one invocation per step, resolution 0 to the last"
    );
    let (got, want) = (
        services.moto.objects("lambda.bucket").await,
        services.in_process_hierarchy(&vol).await,
    );
    assert!(
        got == want,
        "the cuboids made on Lambda differ from one in-process run"
    );
}
