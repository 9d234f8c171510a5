//! The AWS Lambda entrypoint (`cuboids lambda`): the task documents of `run-task`, Batch and the
//! activity worker, one per invocation, through the `lambda_runtime` crate (the ecosystem's
//! client of the Lambda Runtime API). The output document is the function's result; a failed
//! task is a function error whose type is the task's failure name (`cuboids.InvalidTask`,
//! `cuboids.InvalidData`, ...), so that Step Functions' `Retry` and `Catch` match it as they
//! match an activity's.
//!
//! Lambda has no GPU: the adapter there is lavapipe (the image carries Mesa), and the `auto`
//! engines take their CPU paths. A task is stopped (`cuboids.Interrupted`, which a state machine
//! may retry on Batch) a margin before the invocation's deadline, so that it cleans up as on
//! SIGTERM rather than being killed with its output half-written.

use crate::runtime::executor::{error_chain, Executor, TaskFailure};
use crate::task::failure::FailureKind;
use crate::task::spec::Task;
use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

/// How long before the invocation's deadline a task is told to stop: enough to remove what it
/// wrote (a downsample's chunks, a segment's output) before Lambda ends the process.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(10);

/// Serves invocations until the runtime ends the process.
pub async fn lambda() -> anyhow::Result<()> {
    let executor = Arc::new(Executor::from_env().await);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let executor = executor.clone();
        async move { invoke(&executor, event).await }
    }))
    .await
    .map_err(|e| anyhow::anyhow!("the Lambda runtime stopped: {e}"))
}

/// One invocation: its payload run as a task document.
async fn invoke(executor: &Executor, event: LambdaEvent<Value>) -> Result<Value, Diagnostic> {
    let task = Task::from_value(event.payload).map_err(|e| {
        diagnostic(TaskFailure::new(
            FailureKind::InvalidTask,
            format!(
                "the invocation's payload is not a task document: {}",
                error_chain(&e)
            ),
        ))
    })?;
    let span = tracing::info_span!("lambda invocation", request = %event.context.request_id, task = %task.describe());
    async {
        let cancel = CancellationToken::new();
        let left = time_left(event.context.deadline);
        let timer = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                tokio::time::sleep(left.saturating_sub(DEADLINE_MARGIN)).await;
                cancel.cancel();
            }
        });
        let result = executor.run(&task, &cancel).await;
        timer.abort();
        match result {
            Ok(out) => {
                info!("{}", out.summary);
                Ok(out.document)
            }
            Err(mut f) => {
                if cancel.is_cancelled() {
                    f.cause = format!(
                        "stopped {} s before the invocation's deadline ({} s after it began): {}",
                        DEADLINE_MARGIN.as_secs(),
                        left.saturating_sub(DEADLINE_MARGIN).as_secs(),
                        f.cause
                    );
                }
                warn!("{f}");
                Err(diagnostic(f))
            }
        }
    }
    .instrument(span)
    .await
}

/// A failure as a Lambda function error: its type the failure's name.
fn diagnostic(f: TaskFailure) -> Diagnostic {
    Diagnostic {
        error_type: f.kind.error_name().to_string(),
        error_message: f.cause,
    }
}

/// Time until `deadline` (milliseconds since the Unix epoch; zero when past).
fn time_left(deadline_ms: u64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_millis(deadline_ms).saturating_sub(now)
}
