//! `cuboids worker`: a Step Functions activity worker. It long-polls GetActivityTask only while it
//! has a free slot, runs each task document (the Boss DownsampleChannel document included) with
//! heartbeats on a timer, and reports SendTaskSuccess with the output document or
//! SendTaskFailure with a stable error name (`cuboids.*`, see `FailureKind`) and the cause.
//!
//! On SIGTERM or SIGINT it stops polling (an in-flight poll is abandoned) and gives running tasks
//! a grace period; tasks still running then are stopped and reported as `cuboids.Interrupted`, a
//! retryable error, so the state machine's Retry runs them again. If Step Functions answers a
//! heartbeat with TaskTimedOut (or no longer knows the token), the task is stopped and nothing
//! more is reported for it: the state machine has already moved on.

use crate::runtime::executor::{error_chain, Executor, TaskFailure, TaskOutput};
use crate::store::aws_env;
use crate::task::failure::FailureKind;
use crate::task::spec::Task;
use aws_sdk_sfn::config::timeout::TimeoutConfig;
use aws_sdk_sfn::error::{DisplayErrorContext, ProvideErrorMetadata};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

/// GetActivityTask holds a request up to 60 s; the client must wait longer than that.
pub const POLL_CLIENT_TIMEOUT: Duration = Duration::from_secs(70);
/// SendTaskSuccess's output limit.
pub const MAX_OUTPUT_BYTES: usize = 256 * 1024;
/// SendTaskFailure's limits on `error` and `cause`.
pub const MAX_ERROR_CHARS: usize = 256;
pub const MAX_CAUSE_CHARS: usize = 32768;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("polling activity {arn} failed: {message}")]
    Poll { arn: String, message: String },
}

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    pub activity_arn: String,
    pub worker_name: String,
    /// Tasks run at once; a poll is made only while a slot is free.
    pub concurrency: usize,
    pub heartbeat: Duration,
    /// How long running tasks may take to finish after a shutdown signal.
    pub grace: Duration,
    /// Stop once no task has run for this long (a fleet's scale-in); `None`: poll until stopped.
    pub idle_exit: Option<Duration>,
}

/// What a worker did before it stopped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    pub succeeded: usize,
    pub failed: usize,
    /// Tasks Step Functions gave up on (a heartbeat answered TaskTimedOut).
    pub abandoned: usize,
}

/// How one task ended, from the worker's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
    Abandoned,
}

/// A Step Functions client from the AWS environment (`AWS_ENDPOINT_URL_SFN` for another
/// server), with a read timeout longer than GetActivityTask's 60 s long poll.
pub fn sfn_client(sdk: &aws_config::SdkConfig) -> aws_sdk_sfn::Client {
    let mut config = aws_sdk_sfn::config::Builder::from(sdk).timeout_config(
        TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(POLL_CLIENT_TIMEOUT)
            .operation_attempt_timeout(POLL_CLIENT_TIMEOUT)
            .build(),
    );
    if let Some(endpoint) = aws_env::endpoint("AWS_ENDPOINT_URL_SFN") {
        config = config.endpoint_url(endpoint);
    }
    aws_sdk_sfn::Client::from_conf(config.build())
}

/// Cancelled on the first SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = CancellationToken::new();
    let fire = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
        fire.cancel();
    });
    Ok(token)
}

/// Polls and runs tasks until `shutdown`, then lets running tasks finish within the grace period.
pub async fn run_worker(
    executor: Arc<Executor>,
    client: aws_sdk_sfn::Client,
    opts: WorkerOptions,
    shutdown: CancellationToken,
) -> Result<WorkerReport, WorkerError> {
    let slots = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let stop_tasks = CancellationToken::new();
    let mut running: JoinSet<Outcome> = JoinSet::new();
    let mut report = WorkerReport::default();
    let mut backoff = Duration::from_millis(500);
    info!(activity = %opts.activity_arn, concurrency = opts.concurrency, "worker started");
    let mut idle_since = Instant::now();
    let result = loop {
        while let Some(done) = running.try_join_next() {
            report.count(done);
            idle_since = Instant::now();
        }
        if !running.is_empty() {
            idle_since = Instant::now();
        } else if opts
            .idle_exit
            .is_some_and(|limit| idle_since.elapsed() >= limit)
        {
            info!(idle = ?idle_since.elapsed(), "no task for the idle limit: stopping");
            break Ok(());
        }
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("never closed"),
            _ = shutdown.cancelled() => break Ok(()),
        };
        let polled = tokio::select! {
            r = poll(&client, &opts) => r,
            _ = shutdown.cancelled() => break Ok(()),
        };
        match polled {
            Ok(Some((token, input))) => {
                backoff = Duration::from_millis(500);
                let job = RunningTask {
                    executor: executor.clone(),
                    client: client.clone(),
                    token,
                    heartbeat: opts.heartbeat,
                    stop: stop_tasks.child_token(),
                };
                running.spawn(async move {
                    let outcome = job.run(&input).await;
                    drop(permit);
                    outcome
                });
            }
            Ok(None) => {}
            Err(PollError::Permanent(message)) => {
                break Err(WorkerError::Poll {
                    arn: opts.activity_arn.clone(),
                    message,
                })
            }
            Err(PollError::Transient(message)) => {
                warn!(%message, retry_in = ?backoff, "GetActivityTask failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => break Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    finish_running(&mut running, &mut report, &stop_tasks, opts.grace).await;
    info!(?report, "worker stopped");
    result.map(|()| report)
}

/// Waits for running tasks up to `grace`, then stops the rest (they report Interrupted).
async fn finish_running(
    running: &mut JoinSet<Outcome>,
    report: &mut WorkerReport,
    stop_tasks: &CancellationToken,
    grace: Duration,
) {
    if !running.is_empty() {
        info!(tasks = running.len(), ?grace, "waiting for running tasks");
    }
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            done = running.join_next() => match done {
                Some(done) => report.count(done),
                None => return,
            },
            _ = &mut deadline, if !stop_tasks.is_cancelled() => {
                warn!(tasks = running.len(), "grace period over: stopping running tasks");
                stop_tasks.cancel();
            }
        }
    }
}

impl WorkerReport {
    fn count(&mut self, done: Result<Outcome, tokio::task::JoinError>) {
        match done {
            Ok(Outcome::Succeeded) => self.succeeded += 1,
            Ok(Outcome::Abandoned) => self.abandoned += 1,
            Ok(Outcome::Failed) | Err(_) => self.failed += 1,
        }
    }
}

enum PollError {
    Transient(String),
    Permanent(String),
}

/// One long poll: `Some((token, input))`, or `None` when no task came (an empty token).
async fn poll(
    client: &aws_sdk_sfn::Client,
    opts: &WorkerOptions,
) -> Result<Option<(String, String)>, PollError> {
    let out = client
        .get_activity_task()
        .activity_arn(&opts.activity_arn)
        .worker_name(&opts.worker_name)
        .send()
        .await
        .map_err(|e| {
            let message = DisplayErrorContext(&e).to_string();
            match e.as_service_error() {
                Some(s) if s.is_activity_does_not_exist() || s.is_invalid_arn() => {
                    PollError::Permanent(message)
                }
                Some(s) if matches!(s.code(), Some("AccessDeniedException")) => {
                    PollError::Permanent(message)
                }
                _ => PollError::Transient(message),
            }
        })?;
    Ok(match out.task_token() {
        Some(token) if !token.is_empty() => {
            Some((token.to_string(), out.input().unwrap_or("{}").to_string()))
        }
        _ => None,
    })
}

/// A task taken from the activity, with what it needs to report back.
struct RunningTask {
    executor: Arc<Executor>,
    client: aws_sdk_sfn::Client,
    token: String,
    heartbeat: Duration,
    stop: CancellationToken,
}

impl RunningTask {
    async fn run(self, input: &str) -> Outcome {
        let task = match Task::from_json(input) {
            Ok(task) => task,
            Err(e) => {
                let failure = TaskFailure::new(FailureKind::InvalidTask, error_chain(&e));
                return self.report(Err(failure)).await;
            }
        };
        let span = info_span!("activity task", task = %task.describe());
        async {
            let abandoned = CancellationToken::new();
            let beats = tokio::spawn(heartbeats(
                self.client.clone(),
                self.token.clone(),
                self.heartbeat,
                abandoned.clone(),
            ));
            // A task stops when the worker's grace period ends or Step Functions gives up on
            // it; stopping is cooperative, so a downsample cleans up after itself.
            let cancel = CancellationToken::new();
            let run = self.executor.run(&task, &cancel);
            tokio::pin!(run);
            let result = loop {
                tokio::select! {
                    r = &mut run => break r,
                    _ = abandoned.cancelled(), if !cancel.is_cancelled() => cancel.cancel(),
                    _ = self.stop.cancelled(), if !cancel.is_cancelled() => cancel.cancel(),
                }
            };
            beats.abort();
            if abandoned.is_cancelled() {
                warn!("Step Functions no longer waits for this task (heartbeat: TaskTimedOut); its result is dropped");
                return Outcome::Abandoned;
            }
            self.report(result).await
        }
        .instrument(span)
        .await
    }

    /// SendTaskSuccess or SendTaskFailure.
    async fn report(&self, result: Result<TaskOutput, TaskFailure>) -> Outcome {
        let result = result.and_then(|out| {
            let text = out.document.to_string();
            if text.len() > MAX_OUTPUT_BYTES {
                Err(TaskFailure::new(
                    FailureKind::OutputTooLarge,
                    format!("the output document has {} bytes; Step Functions takes at most {MAX_OUTPUT_BYTES}", text.len()),
                ))
            } else {
                Ok(text)
            }
        });
        let (sent, outcome) = match result {
            Ok(output) => (
                self.client
                    .send_task_success()
                    .task_token(&self.token)
                    .output(output)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| DisplayErrorContext(&e).to_string()),
                Outcome::Succeeded,
            ),
            Err(f) => (
                self.client
                    .send_task_failure()
                    .task_token(&self.token)
                    .error(truncate(f.kind.error_name(), MAX_ERROR_CHARS))
                    .cause(truncate(&f.cause, MAX_CAUSE_CHARS))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| DisplayErrorContext(&e).to_string()),
                Outcome::Failed,
            ),
        };
        match sent {
            Ok(()) => outcome,
            Err(message) => {
                warn!(%message, "reporting the task's result to Step Functions failed");
                Outcome::Abandoned
            }
        }
    }
}

/// Sends heartbeats every `every` until aborted; cancels `abandoned` when Step Functions says the
/// task is over (TaskTimedOut, TaskDoesNotExist, InvalidToken).
async fn heartbeats(
    client: aws_sdk_sfn::Client,
    token: String,
    every: Duration,
    abandoned: CancellationToken,
) {
    loop {
        tokio::time::sleep(every).await;
        match client.send_task_heartbeat().task_token(&token).send().await {
            Ok(_) => {}
            Err(e) => {
                let gone = e.as_service_error().is_some_and(|s| {
                    s.is_task_timed_out() || s.is_task_does_not_exist() || s.is_invalid_token()
                });
                if gone {
                    abandoned.cancel();
                    return;
                }
                warn!(message = %DisplayErrorContext(&e), "heartbeat failed; trying again at the next beat");
            }
        }
    }
}

/// At most `max` characters, cut at a character boundary.
fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("µµµ", 2), "µµ");
        let cause = "é".repeat(MAX_CAUSE_CHARS + 10);
        assert_eq!(
            truncate(&cause, MAX_CAUSE_CHARS).chars().count(),
            MAX_CAUSE_CHARS
        );
    }

    #[test]
    fn every_error_name_fits_step_functions() {
        for kind in FailureKind::ALL {
            assert!(kind.error_name().len() <= MAX_ERROR_CHARS);
            assert!(kind.error_name().starts_with("cuboids."));
        }
    }
}
