//! `cuboids lambda` (the real binary, through the `lambda_runtime` crate) against an emulator
//! of the Lambda Runtime API started here (the HTTP API Lambda serves a function's runtime:
//! the next invocation, its response or its error), with a real S3-compatible server (moto,
//! DynamoDB included for the Boss index). Each good task's result is the document `run-task`
//! prints for the same task, and it writes the same bytes; bad payloads and a missing volume are
//! function errors typed with the failure's name, with nothing written; a task near its
//! deadline stops in time and removes what it wrote.

mod common;

use common::{random_volume, Rng, S3Server};
use cuboids::dtype::DataType;
use cuboids::formats::precomputed::info::LayerType;
use cuboids::formats::precomputed::{Precomputed, WriteOptions};
use cuboids::runtime::local::new_info;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// How an invocation ended, as the runtime reported it.
#[derive(Clone, Debug)]
enum Outcome {
    Response(Value),
    Error { error_type: String, message: String },
}

struct Invocation {
    id: String,
    deadline_ms: u64,
    body: Vec<u8>,
}

#[derive(Default)]
struct ApiState {
    queue: VecDeque<Invocation>,
    outcomes: HashMap<String, Outcome>,
    init_error: Option<String>,
    next_id: usize,
}

/// The Runtime API (2018-06-01) as Lambda serves it to a function's runtime process: a long
/// poll for the next invocation (its payload, request id, deadline and ARN in headers), and
/// the invocation's response or error posted back. Keeps connections alive, as Lambda does.
struct RuntimeApi {
    address: String,
    state: Arc<Mutex<ApiState>>,
}

/// One HTTP/1.1 request: method, path and body (Content-Length or chunked).
struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

async fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = HashMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.insert(k.trim().to_lowercase(), v.trim().to_string());
    }
    let mut body = Vec::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            line.clear();
            reader.read_line(&mut line).await.ok()?;
            let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).await.ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(n) = headers.get("content-length") {
        body = vec![0; n.parse().ok()?];
        reader.read_exact(&mut body).await.ok()?;
    }
    Some(Request { method, path, body })
}

async fn respond(socket: &mut BufReader<TcpStream>, status: &str, headers: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n",
        body.len()
    );
    let socket = socket.get_mut();
    let _ = socket.write_all(head.as_bytes()).await;
    let _ = socket.write_all(body).await;
}

impl RuntimeApi {
    async fn start() -> RuntimeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = RuntimeApi {
            address: listener.local_addr().unwrap().to_string(),
            state: Arc::default(),
        };
        let state = api.state.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve(BufReader::new(socket), state.clone()));
            }
        });
        api
    }

    /// Queues an invocation of `payload` (raw bytes: Lambda's Invoke refuses non-JSON, the
    /// emulator does not) due by `deadline` from now, and waits for how it ended.
    async fn invoke(&self, payload: &[u8], deadline: Duration) -> Outcome {
        let id = {
            let mut s = self.state.lock().unwrap();
            s.next_id += 1;
            let id = format!("request-{}", s.next_id);
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            s.queue.push_back(Invocation {
                id: id.clone(),
                deadline_ms: (now + deadline).as_millis() as u64,
                body: payload.to_vec(),
            });
            id
        };
        let limit = Instant::now() + deadline + Duration::from_secs(30);
        loop {
            if let Some(outcome) = self.state.lock().unwrap().outcomes.get(&id) {
                return outcome.clone();
            }
            if let Some(e) = &self.state.lock().unwrap().init_error {
                panic!("the runtime failed to start: {e}");
            }
            assert!(Instant::now() < limit, "no outcome for {id}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn invoke_json(&self, payload: &Value) -> Outcome {
        self.invoke(payload.to_string().as_bytes(), Duration::from_secs(300))
            .await
    }
}

async fn serve(mut socket: BufReader<TcpStream>, state: Arc<Mutex<ApiState>>) {
    const BASE: &str = "/2018-06-01/runtime";
    while let Some(request) = read_request(&mut socket).await {
        let path = request.path.strip_prefix(BASE).unwrap_or(&request.path);
        match (request.method.as_str(), path) {
            ("GET", "/invocation/next") => {
                let next = loop {
                    if let Some(next) = state.lock().unwrap().queue.pop_front() {
                        break next;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                };
                let headers = format!(
                    "Lambda-Runtime-Aws-Request-Id: {}\r\nLambda-Runtime-Deadline-Ms: {}\r\n\
                     Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:123456789012:function:cuboids\r\n\
                     Lambda-Runtime-Trace-Id: Root=1-00000000-000000000000000000000000\r\n",
                    next.id, next.deadline_ms
                );
                respond(&mut socket, "200 OK", &headers, &next.body).await;
            }
            ("POST", "/init/error") => {
                state.lock().unwrap().init_error =
                    Some(String::from_utf8_lossy(&request.body).into_owned());
                respond(&mut socket, "202 Accepted", "", b"{}").await;
            }
            ("POST", p) => {
                let (id, what) = p
                    .strip_prefix("/invocation/")
                    .and_then(|r| r.rsplit_once('/'))
                    .unwrap_or_else(|| panic!("unexpected Runtime API call POST {p}"));
                let outcome = match what {
                    "response" => Outcome::Response(
                        serde_json::from_slice(&request.body).expect("a JSON response"),
                    ),
                    "error" => {
                        // The type Step Functions matches is the body's errorType (the
                        // Lambda-Runtime-Function-Error-Type header says only "unhandled").
                        let body: Value = serde_json::from_slice(&request.body).unwrap();
                        let error_type = body["errorType"].as_str().unwrap_or_default();
                        Outcome::Error {
                            error_type: error_type.to_string(),
                            message: body["errorMessage"].as_str().unwrap_or_default().into(),
                        }
                    }
                    other => panic!("unexpected Runtime API call POST .../{other}"),
                };
                state
                    .lock()
                    .unwrap()
                    .outcomes
                    .insert(id.to_string(), outcome);
                respond(&mut socket, "202 Accepted", "", br#"{"status":"OK"}"#).await;
            }
            (m, p) => panic!("unexpected Runtime API call {m} {p}"),
        }
    }
}

/// The function: `cuboids lambda` with the environment Lambda gives it, pointed at the S3
/// (and DynamoDB) server.
fn start_function(api: &RuntimeApi, s3: &S3Server) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .arg("lambda")
        .envs(s3.aws_env("AWS_ENDPOINT_URL"))
        .env("AWS_LAMBDA_RUNTIME_API", &api.address)
        .env("AWS_LAMBDA_FUNCTION_NAME", "cuboids")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "3008")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_MAX_ATTEMPTS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// `cuboids run-task -` on the same server: its output document (or its stderr on failure).
fn run_task(s3: &S3Server, task: &Value) -> Result<Value, String> {
    let out = common::run_task_on_stdin(task, s3.aws_env("AWS_ENDPOINT_URL"));
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A document without what differs between two runs of one task: timings, memory, and the
/// locations (`from` replaced by `to`).
fn comparable(doc: &Value, from: &str, to: &str) -> Value {
    match doc {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| {
                    !(k.ends_with("seconds") || k.contains("per_s") || k.contains("rss"))
                })
                .map(|(k, v)| (k.clone(), comparable(v, from, to)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|v| comparable(v, from, to)).collect()),
        Value::String(s) => Value::String(s.replace(from, to)),
        other => other.clone(),
    }
}

/// The objects under `prefix` of `bucket`, keyed without the prefix.
async fn objects_under(s3: &S3Server, bucket: &str, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    s3.objects(bucket)
        .await
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v)))
        .collect()
}

/// Fails naming the keys where two sets of objects differ (not their bytes).
fn assert_same_objects(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>, what: &str) {
    let differ: Vec<&String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .collect();
    assert!(differ.is_empty(), "{what}: objects differ at {differ:?}");
}

/// A layer of `dtype` and `size` in S3 at `s3://bucket/name`, seeded values.
async fn s3_layer(
    s3: &S3Server,
    bucket: &str,
    name: &str,
    dtype: DataType,
    size: [usize; 3],
    chunk: [usize; 3],
) -> Precomputed {
    let store = Arc::new(s3.store(bucket, name).await);
    let info = new_info(LayerType::Image, dtype, size, chunk, [4.0, 4.0, 40.0]);
    let vol = Precomputed::create(store, info).await.unwrap();
    let data = random_volume(&mut Rng::new(7), dtype, size, 1);
    vol.write_region(0, [0; 3], &data, WriteOptions { gzip_level: 6 })
        .await
        .unwrap();
    vol
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_invocations_equal_run_task_and_fail_with_task_error_names() {
    let s3 = S3Server::start();
    let api = RuntimeApi::start().await;
    let mut function = start_function(&api, &s3);

    // A downsample task: the same document as run-task's on an identical copy, the same bytes.
    for bucket in ["by-lambda", "by-run-task"] {
        s3_layer(
            &s3,
            bucket,
            "img",
            DataType::Uint8,
            [200, 150, 40],
            [64, 64, 16],
        )
        .await;
    }
    let task = |bucket: &str| json!({"kind": "downsample", "location": format!("s3://{bucket}/img"), "num_mips": 2});
    let by_lambda = match api.invoke_json(&task("by-lambda")).await {
        Outcome::Response(doc) => doc,
        other => panic!("the downsample task failed: {other:?}"),
    };
    let by_run_task = run_task(&s3, &task("by-run-task")).unwrap();
    assert_eq!(by_lambda["kind"], "downsample");
    assert_eq!(
        comparable(&by_lambda, "by-lambda", "X"),
        comparable(&by_run_task, "by-run-task", "X")
    );
    let written = objects_under(&s3, "by-lambda", "img/").await;
    assert!(written.len() > 10, "{} objects", written.len());
    assert_same_objects(
        &written,
        &objects_under(&s3, "by-run-task", "img/").await,
        "downsample",
    );

    // Bad payloads: not JSON (the runtime's own error; Lambda's Invoke would refuse it), JSON
    // that is no task, a task on a volume that does not exist. The function serves on.
    match api.invoke(b"{not json", Duration::from_secs(60)).await {
        Outcome::Error { message, .. } => assert!(message.contains("deserialize"), "{message}"),
        other => panic!("non-JSON: {other:?}"),
    }
    for (payload, name, words) in [
        (json!([1, 2]), "cuboids.InvalidTask", "not a task document"),
        (
            json!({"kind": "resample"}),
            "cuboids.InvalidTask",
            "resample",
        ),
        (
            json!({"kind": "downsample", "location": "s3://by-lambda/missing", "num_mips": 1}),
            "cuboids.InvalidTask",
            "no info file at s3://by-lambda/missing/info",
        ),
    ] {
        match api.invoke_json(&payload).await {
            Outcome::Error {
                error_type,
                message,
            } => {
                assert_eq!(error_type, name, "{payload}: {message}");
                assert!(message.contains(words), "{payload}: {message}");
            }
            other => panic!("{payload}: {other:?}"),
        }
    }
    let failed = run_task(
        &s3,
        &json!({"kind": "downsample", "location": "s3://by-run-task/missing", "num_mips": 1}),
    );
    assert!(failed
        .unwrap_err()
        .contains("cuboids.InvalidTask: downsampling s3://by-run-task/missing"));
    assert!(objects_under(&s3, "by-lambda", "missing").await.is_empty());
    assert_same_objects(
        &written,
        &objects_under(&s3, "by-lambda", "img/").await,
        "after errors",
    );

    // Near its deadline a task stops (cuboids.Interrupted) and leaves no new scale behind: a
    // deadline DEADLINE_MARGIN + 0.5 s away stops a task of many small tiles after about 0.5 s.
    s3_layer(
        &s3,
        "slow",
        "img",
        DataType::Uint8,
        [1024, 512, 64],
        [64, 64, 16],
    )
    .await;
    let before = objects_under(&s3, "slow", "img/").await;
    let slow =
        json!({"kind": "downsample", "location": "s3://slow/img", "num_mips": 1, "tile_mib": 1});
    let deadline = cuboids::runtime::lambda::DEADLINE_MARGIN + Duration::from_millis(500);
    match api.invoke(slow.to_string().as_bytes(), deadline).await {
        Outcome::Error {
            error_type,
            message,
        } => {
            assert_eq!(error_type, "cuboids.Interrupted", "{message}");
            assert!(message.contains("deadline"), "{message}");
        }
        other => panic!("the task did not stop before its deadline: {other:?}"),
    }
    assert_same_objects(
        &objects_under(&s3, "slow", "img/").await,
        &before,
        "interrupted",
    );

    let _ = function.kill();
    let _ = function.wait();
}

/// `cuboids plan connected-components` on the S3 server: the stages document.
fn plan_components(
    s3: &S3Server,
    input: &str,
    output: &str,
    prefix: &str,
    extra: &[&str],
) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .args([
            "plan",
            "connected-components",
            "--input",
            input,
            "--output",
            output,
        ])
        .args([
            "--threshold",
            "0.5",
            "--connectivity",
            "6",
            "--output-chunk-size",
            "32,32,16",
        ])
        .args([
            "--chunk-size",
            "32,32,16",
            "--block-size",
            "32,32,16",
            "--task-mib",
            "64",
        ])
        .args(["--manifests", prefix])
        .args(extra)
        .envs(s3.aws_env("AWS_ENDPOINT_URL"))
        .output()
        .unwrap();
    common::assert_success(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Each stage's manifest and task count, in order.
fn manifests_of(stages: &Value) -> Vec<(String, u64)> {
    stages["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["manifest"].as_str().unwrap().to_string(),
                s["tasks"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_plan_and_a_boss_step_run_on_lambda_as_on_run_task() {
    let s3 = S3Server::start();
    let api = RuntimeApi::start().await;
    let mut function = start_function(&api, &s3);

    // Every task of a staged connected-components plan, each stage's in reverse order, invoked
    // as manifest-task documents: the output equals one run-task of the whole task, byte for
    // byte.
    s3_layer(
        &s3,
        "staged",
        "prob",
        DataType::Float32,
        [96, 80, 40],
        [32, 32, 16],
    )
    .await;
    // The plan routes each stage by its largest task's estimate: this small one's all fit
    // Lambda; --runner forces one for all.
    let (input, output) = ("s3://staged/prob", "s3://staged/cc");
    let document = plan_components(&s3, input, output, "s3://staged/plan/", &[]);
    for stage in document["stages"].as_array().unwrap() {
        assert_eq!(stage["runner"], "lambda", "{stage}");
        let mib = stage["task_mib"].as_u64().unwrap();
        let seconds = stage["task_seconds"].as_f64().unwrap();
        assert!(mib > 0 && mib < 1024 && seconds < 60.0, "{stage}");
    }
    let forced = ["--runner", "activity"];
    let other = plan_components(&s3, input, output, "s3://staged/plan-activity/", &forced);
    let runners: Vec<&Value> = other["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["runner"])
        .collect();
    assert!(runners.iter().all(|r| *r == "activity"), "{runners:?}");
    let stages = manifests_of(&document);
    assert!(stages.len() >= 5, "{stages:?}");
    for (manifest, tasks) in &stages {
        for index in (0..*tasks).rev() {
            let task = json!({"kind": "manifest-task", "manifest": manifest, "index": index});
            if let Outcome::Error {
                error_type,
                message,
            } = api.invoke_json(&task).await
            {
                panic!("{task}: {error_type}: {message}");
            }
        }
    }
    let single = json!({"kind": "connected-components", "input": "s3://staged/prob",
        "output": "s3://staged/cc-single", "threshold": 0.5, "connectivity": 6,
        "output_chunk_size": [32, 32, 16]});
    run_task(&s3, &single).unwrap();
    // The plan's intermediates stay under the output's .cuboids-staging/ (for reruns).
    let mut staged = objects_under(&s3, "staged", "cc/").await;
    staged.retain(|k, _| !k.starts_with(".cuboids-staging/"));
    assert!(staged.len() > 5, "{} objects", staged.len());
    assert_same_objects(
        &staged,
        &objects_under(&s3, "staged", "cc-single/").await,
        "staged",
    );

    // A Boss downsample step (the DownsampleChannel document): the next document and the
    // cuboids as run-task's, on two copies of the channel.
    let sdk = s3.sdk_config().await;
    let ddb = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&sdk)
            .endpoint_url(&s3.endpoint)
            .build(),
    );
    let shape = [1024, 512, 32];
    let channel = common::boss_channel_volume(shape);
    for copy in ["boss-lambda", "boss-run-task"] {
        let store = s3.store(copy, "").await;
        common::create_s3_index(&ddb, &format!("{copy}-index")).await;
        common::put_boss_cuboids(&store, &channel, |_| false).await;
    }
    let job = |copy: &str| common::boss_job(shape, 0, copy, &format!("{copy}-index"));
    let by_lambda = match api.invoke_json(&job("boss-lambda")).await {
        Outcome::Response(doc) => doc,
        other => panic!("the Boss step failed: {other:?}"),
    };
    let by_run_task = run_task(&s3, &job("boss-run-task")).unwrap();
    assert_eq!(by_lambda["msg"]["resolution"], 1, "{by_lambda}");
    assert_eq!(
        comparable(&by_lambda, "boss-lambda", "X"),
        comparable(&by_run_task, "boss-run-task", "X")
    );
    let cuboids = s3.objects("boss-lambda").await;
    // The 4 cuboids put there and those the step wrote.
    assert!(cuboids.len() > 4, "{} objects", cuboids.len());
    assert_same_objects(&cuboids, &s3.objects("boss-run-task").await, "Boss step");

    let _ = function.kill();
    let _ = function.wait();
}
