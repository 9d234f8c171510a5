//! The Step Functions activity worker (`cuboids worker`, the real binary) against a fake Step
//! Functions service started here (moto's server does not implement GetActivityTask) and a real
//! S3-compatible server (moto): tasks succeed, fail with the right error name, are abandoned when
//! a heartbeat answers TaskTimedOut, and a SIGTERM mid-task loses nothing.

mod common;

use common::{random_volume, Rng, S3Server};
use cuboids::dtype::DataType;
use cuboids::formats::precomputed::info::LayerType;
use cuboids::formats::precomputed::{Precomputed, WriteOptions};
use cuboids::runtime::local::new_info;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ARN: &str = "arn:aws:states:us-east-1:123456789012:activity:cuboids";

/// What the fake service saw and holds.
#[derive(Default)]
struct SfnState {
    queue: VecDeque<(String, String)>,
    /// Tokens whose heartbeats (and results) are answered TaskTimedOut.
    timed_out: HashSet<String>,
    heartbeats: HashMap<String, usize>,
    succeeded: HashMap<String, Value>,
    failed: HashMap<String, (String, String)>,
    /// Tasks handed out and not yet reported, now and at most.
    outstanding: usize,
    max_outstanding: usize,
    polls: usize,
}

/// Speaks Step Functions' JSON 1.0 protocol for the activity API: GetActivityTask (a long poll,
/// shortened to `poll_wait`), SendTaskHeartbeat, SendTaskSuccess and SendTaskFailure.
#[derive(Clone)]
struct FakeSfn {
    endpoint: String,
    state: Arc<Mutex<SfnState>>,
}

impl FakeSfn {
    async fn start(poll_wait: Duration) -> FakeSfn {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeSfn {
            endpoint: format!("http://{}", listener.local_addr().unwrap()),
            state: Arc::default(),
        };
        let state = fake.state.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve(socket, state.clone(), poll_wait));
            }
        });
        fake
    }

    fn enqueue(&self, token: &str, input: &str) {
        let mut s = self.state.lock().unwrap();
        s.queue.push_back((token.into(), input.into()));
    }

    fn time_out(&self, token: &str) {
        self.state.lock().unwrap().timed_out.insert(token.into());
    }

    /// Waits until `done` holds of the state (or fails the test after `limit`).
    async fn wait_for(&self, what: &str, limit: Duration, done: impl Fn(&SfnState) -> bool) {
        let deadline = Instant::now() + limit;
        while !done(&self.state.lock().unwrap()) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn serve(mut socket: TcpStream, state: Arc<Mutex<SfnState>>, poll_wait: Duration) {
    // One request per connection: read the head, then Content-Length bytes of body.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body: Value =
        serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or(json!({}));
    let target = header("x-amz-target").unwrap_or_default();
    let (status, reply) = answer(&target, &body, &state, poll_wait).await;
    let text = reply.to_string();
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.shutdown().await;
}

async fn answer(
    target: &str,
    body: &Value,
    state: &Mutex<SfnState>,
    poll_wait: Duration,
) -> (&'static str, Value) {
    let token = body["taskToken"].as_str().unwrap_or_default().to_string();
    let timed_out = || {
        (
            "400 Bad Request",
            json!({"__type": "TaskTimedOut", "message": "Task Timed Out"}),
        )
    };
    match target.trim_start_matches("awsstepfunctions.") {
        "getactivitytask" => {
            assert_eq!(body["activityArn"], ARN);
            let next = {
                let mut s = state.lock().unwrap();
                s.polls += 1;
                s.queue.pop_front()
            };
            match next {
                Some((token, input)) => {
                    let mut s = state.lock().unwrap();
                    s.outstanding += 1;
                    s.max_outstanding = s.max_outstanding.max(s.outstanding);
                    ("200 OK", json!({"taskToken": token, "input": input}))
                }
                None => {
                    // The long poll: nothing came within the wait, so an empty answer.
                    tokio::time::sleep(poll_wait).await;
                    ("200 OK", json!({}))
                }
            }
        }
        "sendtaskheartbeat" => {
            let mut s = state.lock().unwrap();
            if s.timed_out.contains(&token) {
                return timed_out();
            }
            *s.heartbeats.entry(token).or_default() += 1;
            ("200 OK", json!({}))
        }
        "sendtasksuccess" | "sendtaskfailure" => {
            let mut s = state.lock().unwrap();
            if s.timed_out.contains(&token) {
                return timed_out();
            }
            s.outstanding -= 1;
            if target.ends_with("success") {
                let output = serde_json::from_str(body["output"].as_str().unwrap()).unwrap();
                s.succeeded.insert(token, output);
            } else {
                let error = body["error"].as_str().unwrap_or_default().to_string();
                let cause = body["cause"].as_str().unwrap_or_default().to_string();
                s.failed.insert(token, (error, cause));
            }
            ("200 OK", json!({}))
        }
        other => panic!("unexpected Step Functions call {other:?}"),
    }
}

/// The worker binary, pointed at the fake service and the S3 server.
fn start_worker(sfn: &FakeSfn, s3: &S3Server, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .args(["worker", "--activity-arn", ARN, "--worker-name", "test"])
        .args(extra)
        .envs(s3.aws_env("AWS_ENDPOINT_URL_S3"))
        .env("AWS_ENDPOINT_URL_SFN", &sfn.endpoint)
        .env("AWS_MAX_ATTEMPTS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// SIGTERM, then the exit status and what the worker logged.
async fn terminate(mut child: Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the worker did not exit within {limit:?} of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    (status, log)
}

/// A uint8 image of `size` in S3 at `s3://bucket/name` (64³ chunks, uncompressed).
async fn s3_volume(s3: &S3Server, bucket: &str, name: &str, size: [usize; 3]) -> Precomputed {
    let store = Arc::new(s3.store(bucket, name).await);
    let info = new_info(
        LayerType::Image,
        DataType::Uint8,
        size,
        [64, 64, 64],
        [4.0, 4.0, 40.0],
    );
    let vol = Precomputed::create(store, info).await.unwrap();
    let data = random_volume(&mut Rng::new(7), DataType::Uint8, size, 1);
    vol.write_region(0, [0; 3], &data, WriteOptions { gzip_level: 0 })
        .await
        .unwrap();
    vol
}

async fn scale_count(vol: &Precomputed) -> usize {
    Precomputed::open(vol.store.clone())
        .await
        .unwrap()
        .info
        .scales
        .len()
}

/// A downsample task over many small tiles, so that it runs long enough to be interrupted.
fn slow_task(location: &str) -> String {
    json!({"kind": "downsample", "location": location, "num_mips": 1, "gzip_level": 0, "tile_mib": 1})
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_succeed_or_fail_with_stable_error_names() {
    let s3 = S3Server::start();
    let vol = s3_volume(&s3, "vols", "img", [256, 256, 64]).await;
    let sfn = FakeSfn::start(Duration::from_millis(200)).await;
    sfn.enqueue(
        "good",
        &json!({"kind": "downsample", "location": "s3://vols/img", "num_mips": 2}).to_string(),
    );
    sfn.enqueue(
        "unknown-kind",
        r#"{"kind": "resize", "location": "s3://vols/img"}"#,
    );
    sfn.enqueue("not-json", "this is not a task");
    sfn.enqueue(
        "no-volume",
        &json!({"kind": "downsample", "location": "s3://vols/nothing"}).to_string(),
    );
    sfn.enqueue(
        "bad-mip",
        &json!({"kind": "downsample", "location": "s3://vols/img", "mip": 9}).to_string(),
    );
    let worker = start_worker(&sfn, &s3, &["--heartbeat-seconds", "0.05"]);
    // All five results, and the poll after the last (a loaded machine may answer the fifth
    // task before the worker is back polling: no reason to stop it before).
    sfn.wait_for("all five results", Duration::from_secs(60), |s| {
        s.succeeded.len() + s.failed.len() == 5 && s.polls >= 6
    })
    .await;
    let (status, log) = terminate(worker, Duration::from_secs(10)).await;
    assert!(status.success(), "exit 0 after SIGTERM: {status:?}\n{log}");

    {
        let s = sfn.state.lock().unwrap();
        let out = &s.succeeded["good"];
        assert_eq!(out["new_scales"], json!(["8_8_40", "16_16_40"]), "{out}");
        assert_eq!(out["chunks_written"], 4 + 1, "{out}");
        let failure = |token: &str| s.failed[token].clone();
        for (token, name, cause) in [
            (
                "unknown-kind",
                "cuboids.InvalidTask",
                "unknown variant `resize`",
            ),
            ("not-json", "cuboids.InvalidTask", "invalid task document"),
            (
                "no-volume",
                "cuboids.InvalidTask",
                "no info file at s3://vols/nothing/info",
            ),
            ("bad-mip", "cuboids.InvalidTask", "mip 9 does not exist"),
        ] {
            let (error, text) = failure(token);
            assert_eq!(error, name, "{token}: {text}");
            assert!(text.contains(cause), "{token}: {text}");
        }
        assert_eq!(s.max_outstanding, 1, "one slot: never two tasks at once");
        assert!(s.polls >= 6, "it polls again after every task");
    }
    assert_eq!(scale_count(&vol).await, 3);
    // Logs are JSON lines when stderr is not a terminal.
    let line = log
        .lines()
        .find(|l| l.contains("worker started"))
        .expect(&log);
    let parsed: Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!(parsed["level"], "INFO");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_answered_task_timed_out_stops_the_task() {
    let s3 = S3Server::start();
    let vol = s3_volume(&s3, "vols", "big", [1024, 1024, 64]).await;
    let sfn = FakeSfn::start(Duration::from_millis(200)).await;
    sfn.time_out("late");
    sfn.enqueue("late", &slow_task("s3://vols/big"));
    let worker = start_worker(&sfn, &s3, &["--heartbeat-seconds", "0.05"]);
    sfn.wait_for("the task to be taken", Duration::from_secs(30), |s| {
        s.outstanding == 1 && s.queue.is_empty()
    })
    .await;
    // The worker stops the task and takes the next one; nothing is reported for the first.
    sfn.enqueue(
        "next",
        &json!({"kind": "downsample", "location": "s3://vols/big", "num_mips": 1, "bounds": {"start": [0, 0, 0], "stop": [128, 128, 64]}}).to_string(),
    );
    sfn.wait_for("the next task", Duration::from_secs(60), |s| {
        s.succeeded.contains_key("next")
    })
    .await;
    let (status, log) = terminate(worker, Duration::from_secs(10)).await;
    assert!(status.success(), "{log}");
    {
        let s = sfn.state.lock().unwrap();
        assert!(
            !s.succeeded.contains_key("late") && !s.failed.contains_key("late"),
            "a timed-out task gets no result"
        );
        assert!(log.contains("TaskTimedOut"), "{log}");
    }
    // The stopped run claimed nothing: only the small task's chunks exist in the new scale.
    assert_eq!(scale_count(&vol).await, 2, "the next task added mip 1");
    let chunks = list_keys(&s3, "vols", "big/8_8_40/").await;
    assert_eq!(chunks, vec!["big/8_8_40/0-64_0-64_0-64"], "{chunks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_task_loses_nothing() {
    let s3 = S3Server::start();
    let vol = s3_volume(&s3, "vols", "big", [1024, 1024, 64]).await;
    let sfn = FakeSfn::start(Duration::from_millis(200)).await;

    // No grace: the running task is stopped, cleans up, and fails as retryable.
    sfn.enqueue("first-try", &slow_task("s3://vols/big"));
    let worker = start_worker(
        &sfn,
        &s3,
        &["--heartbeat-seconds", "0.05", "--grace-seconds", "0"],
    );
    sfn.wait_for("a heartbeat", Duration::from_secs(30), |s| {
        s.heartbeats.contains_key("first-try")
    })
    .await;
    let (status, log) = terminate(worker, Duration::from_secs(30)).await;
    assert!(status.success(), "{log}");
    let (error, cause) = sfn.state.lock().unwrap().failed["first-try"].clone();
    assert_eq!(error, "cuboids.Interrupted", "{cause}");
    assert_eq!(scale_count(&vol).await, 1, "no scale claimed");
    assert!(list_keys(&s3, "vols", "big/8_8_40/").await.is_empty());

    // The retry, with enough grace: SIGTERM mid-task lets it finish and report success.
    sfn.enqueue("retry", &slow_task("s3://vols/big"));
    let worker = start_worker(
        &sfn,
        &s3,
        &["--heartbeat-seconds", "0.05", "--grace-seconds", "120"],
    );
    sfn.wait_for("a heartbeat", Duration::from_secs(30), |s| {
        s.heartbeats.contains_key("retry")
    })
    .await;
    let (status, log) = terminate(worker, Duration::from_secs(120)).await;
    assert!(status.success(), "{log}");
    let out = sfn.state.lock().unwrap().succeeded["retry"].clone();
    assert_eq!(out["chunks_written"], 8 * 8, "{out}");
    assert_eq!(scale_count(&vol).await, 2);
    assert_eq!(list_keys(&s3, "vols", "big/8_8_40/").await.len(), 64);
}

async fn list_keys(s3: &S3Server, bucket: &str, prefix: &str) -> Vec<String> {
    let sdk = s3.sdk_config().await;
    let conf = aws_sdk_s3::config::Builder::from(&sdk)
        .endpoint_url(&s3.endpoint)
        .force_path_style(true)
        .build();
    let out = aws_sdk_s3::Client::from_conf(conf)
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    let mut keys: Vec<String> = out
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_string))
        .collect();
    keys.sort();
    keys
}

/// `--idle-exit-seconds`: the worker exits by itself (status 0) once no task has run for that
/// long, but never while a task runs, even one that takes far longer than the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_exits_but_not_mid_task() {
    let s3 = S3Server::start();
    s3_volume(&s3, "vols", "big", [1024, 1024, 64]).await;
    let sfn = FakeSfn::start(Duration::from_millis(100)).await;
    sfn.enqueue("slow", &slow_task("s3://vols/big"));
    // Two slots: the worker keeps polling while the task runs, so the idle check is made then.
    let mut worker = start_worker(
        &sfn,
        &s3,
        &["--idle-exit-seconds", "0.3", "--concurrency", "2"],
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the idle worker did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ran = started.elapsed();
    let mut log = String::new();
    std::io::Read::read_to_string(worker.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("no task for the idle limit"), "{log}");
    let s = sfn.state.lock().unwrap();
    assert!(
        s.succeeded.contains_key("slow"),
        "the task ran to its end: {log}"
    );
    assert!(
        !log.contains("waiting for running tasks"),
        "it left while the task ran: {log}"
    );
    assert!(
        s.polls >= 2,
        "it polled again after the task before leaving"
    );
    eprintln!("the worker ran the task and left after {ran:?}");
}
