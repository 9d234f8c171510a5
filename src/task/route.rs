//! Where a plan's stages run: AWS Lambda where a stage's largest task fits Lambda's limits
//! with a margin, AWS Batch (GPU instances) or activity workers otherwise. The plan knows each
//! stage's largest task (its memory and time estimates), so the choice is made when the plan is
//! written, and a stage forced onto Lambda that cannot fit is refused then, not killed later.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Lambda's largest function memory, 10,240 MB, in MiB.
pub const LAMBDA_MEMORY_MIB: u64 = 10_240 * 1_000_000 / (1 << 20);
/// Lambda's longest invocation.
pub const LAMBDA_TIMEOUT_SECONDS: f64 = 900.0;
/// What a plan leaves of Lambda's limits for estimates that are off: a task is routed to
/// Lambda only within this share of its memory and its timeout (the time estimates are for 2
/// cores; a Lambda of 10 GB has 6, but a slower one may run fewer).
pub const LAMBDA_MARGIN: f64 = 0.75;

/// The most tasks a stage run on Lambda may have: `segment.asl.json` hands them to a Map of
/// invocations built with `States.ArrayRange`, which makes at most 1,000 items.
pub const LAMBDA_MAX_STAGE_TASKS: usize = 1000;

/// Where a stage's tasks run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Runner {
    /// AWS Lambda (no GPU: the CPU engines), one invocation per task.
    Lambda,
    /// AWS Batch array jobs on GPU instances.
    Batch,
    /// Step Functions activity workers (`cuboids worker`).
    Activity,
}

/// What the largest task of a stage needs, as the plan estimates it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaskCost {
    /// Peak host memory, fixed part included.
    pub mib: u64,
    /// Seconds on a 2-core machine.
    pub seconds: f64,
    /// False where the plan cannot bound the task (it grows with what the data leaves
    /// undecided): such a stage never goes to Lambda by itself.
    pub bounded: bool,
}

impl TaskCost {
    /// Whether the task fits Lambda within [`LAMBDA_MARGIN`] of its limits.
    pub fn fits_lambda(&self) -> bool {
        self.bounded
            && (self.mib as f64) <= LAMBDA_MEMORY_MIB as f64 * LAMBDA_MARGIN
            && self.seconds <= LAMBDA_TIMEOUT_SECONDS * LAMBDA_MARGIN
    }
}

#[derive(Debug, Error)]
pub enum RouteError {
    #[error(
        "stage {stage} cannot run on Lambda: its largest task needs {} ({} s on 2 cores); a plan \
         routes to Lambda only tasks within {:.0}% of its {LAMBDA_MEMORY_MIB} MiB and \
         {LAMBDA_TIMEOUT_SECONDS} s{}",
        cost.map_or("an unknown amount of memory".to_string(), |c| format!("{} MiB", c.mib)),
        cost.map_or("?".to_string(), |c| format!("{:.0}", c.seconds)),
        LAMBDA_MARGIN * 100.0,
        if cost.is_some_and(|c| !c.bounded) {
            " (it grows with the data, which the plan cannot bound)"
        } else {
            ": a smaller --task-mib or --task-seconds, or --runner batch"
        }
    )]
    TooLargeForLambda {
        stage: String,
        cost: Option<TaskCost>,
    },
    #[error(
        "stage {stage} cannot run on Lambda: it has {tasks} tasks, and the state machine hands \
         at most {LAMBDA_MAX_STAGE_TASKS} of a stage to Lambda (--runner batch)"
    )]
    TooManyForLambda { stage: String, tasks: usize },
}

/// The runner of a stage of `tasks` tasks whose largest costs `cost` (unknown: `None`):
/// `forced` where given (Lambda only where the tasks fit), else Lambda where they fit, Batch
/// otherwise.
pub fn route(
    stage: &str,
    tasks: usize,
    cost: Option<TaskCost>,
    forced: Option<Runner>,
) -> Result<Runner, RouteError> {
    let few = tasks <= LAMBDA_MAX_STAGE_TASKS;
    let fits = few && cost.is_some_and(|c| c.fits_lambda());
    match forced {
        Some(Runner::Lambda) if !few => Err(RouteError::TooManyForLambda {
            stage: stage.to_string(),
            tasks,
        }),
        Some(Runner::Lambda) if !fits => Err(RouteError::TooLargeForLambda {
            stage: stage.to_string(),
            cost,
        }),
        Some(runner) => Ok(runner),
        None if fits => Ok(Runner::Lambda),
        None => Ok(Runner::Batch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(mib: u64, seconds: f64) -> Option<TaskCost> {
        Some(TaskCost {
            mib,
            seconds,
            bounded: true,
        })
    }

    #[test]
    fn small_tasks_go_to_lambda_and_the_rest_to_batch() {
        assert_eq!(
            route("block", 8, cost(4096, 120.0), None).unwrap(),
            Runner::Lambda
        );
        // Over 75% of 9,765 MiB, or of 900 s: Batch.
        assert_eq!(
            route("block", 8, cost(7400, 60.0), None).unwrap(),
            Runner::Batch
        );
        assert_eq!(
            route("block", 8, cost(1024, 700.0), None).unwrap(),
            Runner::Batch
        );
        let unbounded = Some(TaskCost {
            mib: 100,
            seconds: 1.0,
            bounded: false,
        });
        assert_eq!(route("round-2", 8, unbounded, None).unwrap(), Runner::Batch);
        assert_eq!(route("finalize", 1, None, None).unwrap(), Runner::Batch);
        // More tasks than the machine's Map of invocations takes.
        assert_eq!(
            route("block", 1001, cost(100, 1.0), None).unwrap(),
            Runner::Batch
        );
        let err = route("block", 1001, cost(100, 1.0), Some(Runner::Lambda)).unwrap_err();
        assert!(err.to_string().contains("1001 tasks"), "{err}");
    }

    #[test]
    fn a_forced_runner_is_kept_but_lambda_only_where_the_task_fits() {
        assert_eq!(
            route("block", 8, cost(100, 1.0), Some(Runner::Activity)).unwrap(),
            Runner::Activity
        );
        assert_eq!(
            route("block", 8, cost(8000, 1.0), Some(Runner::Batch)).unwrap(),
            Runner::Batch
        );
        let err = route("block", 8, cost(8000, 1.0), Some(Runner::Lambda))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("stage block")
                && err.contains("8000 MiB")
                && err.contains("--runner batch"),
            "{err}"
        );
    }
}
