//! S3 faults a real server cannot be asked for: throttling (retried with backoff) and access
//! denied (an error naming the object). A minimal HTTP endpoint answers with S3's error
//! documents; corrupt and wrong-size cuboids are tested against moto in tests/boss.rs.

use cuboids::store::{S3Store, Store};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves canned responses: the first `failures` requests get `status`/`code`, later ones 200
/// with `body`. Returns the endpoint and the request counter.
async fn faulty_s3(
    failures: usize,
    status: &'static str,
    code: &'static str,
    body: &'static [u8],
) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let n = seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => request.extend_from_slice(&buf[..k]),
                    }
                }
                let response = if n < failures {
                    let xml = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected</Message></Error>");
                    format!("HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}", xml.len()).into_bytes()
                } else {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(body);
                    r
                };
                let _ = socket.write_all(&response).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (endpoint, count)
}

async fn store(endpoint: &str) -> S3Store {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "testing", "testing", None, None, "tests",
        ))
        .retry_config(
            aws_config::retry::RetryConfig::standard()
                .with_max_attempts(4)
                .with_initial_backoff(Duration::from_millis(20)),
        )
        .load()
        .await;
    S3Store::with_config("s3://bucket/vol", &sdk, Some(endpoint.to_string())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_retried_with_backoff() {
    let (endpoint, count) = faulty_s3(2, "503 Slow Down", "SlowDown", b"chunk-bytes").await;
    let got = store(&endpoint)
        .await
        .get("8_8_40/0-64_0-64_0-64")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.data, b"chunk-bytes");
    assert_eq!(
        count.load(Ordering::SeqCst),
        3,
        "two throttled attempts, then success"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_throttling_and_access_denied_name_the_object() {
    let (endpoint, count) = faulty_s3(usize::MAX, "503 Slow Down", "SlowDown", b"").await;
    let err = store(&endpoint).await.get("info").await.unwrap_err();
    assert!(err.is_transient(), "throttling may pass: {err}");
    let err = err.to_string();
    assert!(
        err.contains("s3://bucket/vol/info") && err.contains("SlowDown"),
        "{err}"
    );
    assert_eq!(
        count.load(Ordering::SeqCst),
        4,
        "gives up after the configured attempts"
    );

    let (endpoint, count) = faulty_s3(usize::MAX, "403 Forbidden", "AccessDenied", b"").await;
    let s = store(&endpoint).await;
    let err = s
        .put(
            "8_8_40/0-1_0-1_0-1",
            vec![1],
            cuboids::store::ContentEncoding::Gzip,
        )
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "access denied is permanent: {err}");
    let err = err.to_string();
    assert!(
        err.contains("PutObject of s3://bucket/vol/8_8_40/0-1_0-1_0-1")
            && err.contains("AccessDenied"),
        "{err}"
    );
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "access denied is not retried"
    );
}
