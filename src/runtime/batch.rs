//! AWS Batch: the job entrypoint (`cuboids batch`), manifests of task documents (one JSON
//! document per line, in S3 or on disk) and `cuboids submit`, which submits a manifest as array
//! jobs.
//!
//! Exit codes, for the job definition's retryStrategy (`evaluateOnExit`):
//! 0: the task succeeded; 75: it failed in a way a retry can fix (storage faults, GPU faults, a
//! SIGTERM at a timeout or spot reclaim: the `cuboids.*` errors that `FailureKind::is_retryable`
//! names); 65: a retry cannot help (an invalid task or invalid data). Batch's own
//! `Host EC2*` status reasons are retried by the job definition too.

use crate::runtime::executor::{Executor, TaskFailure, TaskOutput};
use crate::store::{aws_env, open_object, StoreError};
use crate::task::failure::{Classify, FailureKind};
use crate::task::spec::{SpecError, Task};
use aws_sdk_batch::error::DisplayErrorContext;
use aws_sdk_batch::types::ArrayProperties;
use std::collections::HashMap;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Batch's largest array job.
pub const MAX_ARRAY_SIZE: usize = 10_000;

#[derive(Debug, Error)]
pub enum BatchError {
    #[error("manifest {location}")]
    Store {
        location: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("manifest {location} does not exist")]
    MissingManifest { location: String },
    #[error("manifest {location} line {line}")]
    Task {
        location: String,
        line: usize,
        #[source]
        source: SpecError,
    },
    #[error("manifest {location} has {count} tasks; task {index} ({from}) does not exist")]
    NoSuchTask {
        location: String,
        count: usize,
        index: usize,
        /// Where the index came from, for the reader.
        from: &'static str,
    },
    #[error("manifest {location} has {count} tasks but AWS_BATCH_JOB_ARRAY_INDEX is not set: submit it as an array job")]
    NotAnArrayJob { location: String, count: usize },
    #[error("AWS_BATCH_JOB_ARRAY_INDEX={0:?} is not a number")]
    BadIndex(String),
    #[error("manifest {location} has no tasks")]
    EmptyManifest { location: String },
    #[error(transparent)]
    Route(#[from] crate::task::route::RouteError),
    #[error("Batch SubmitJob failed: {message}")]
    Submit { message: String },
}

impl Classify for BatchError {
    fn failure_kind(&self) -> FailureKind {
        match self {
            BatchError::Store { source, .. } => source.failure_kind(),
            BatchError::Submit { .. } => FailureKind::Storage,
            _ => FailureKind::InvalidTask,
        }
    }
}

/// Reads a manifest's tasks, checking every line (a bad line names its number).
pub async fn read_manifest(
    location: &str,
    sdk: &aws_config::SdkConfig,
) -> Result<Vec<Task>, BatchError> {
    let store_error = |source| BatchError::Store {
        location: location.to_string(),
        source: Box::new(source),
    };
    let (store, key) = open_object(location, sdk).map_err(store_error)?;
    let object =
        store
            .get(&key)
            .await
            .map_err(store_error)?
            .ok_or_else(|| BatchError::MissingManifest {
                location: location.to_string(),
            })?;
    let text = String::from_utf8_lossy(&object.data);
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            Task::from_json(line).map_err(|source| BatchError::Task {
                location: location.to_string(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// Writes tasks as a manifest, one JSON document per line.
pub async fn write_manifest(
    location: &str,
    tasks: &[Task],
    sdk: &aws_config::SdkConfig,
) -> Result<(), BatchError> {
    write_manifest_of(location, tasks.len(), &|i| tasks[i].clone(), sdk).await
}

/// Lines of a manifest gathered before each write to the store.
const LINES_PER_WRITE: usize = 4096;

/// Writes `count` tasks, `task(i)` each, as a manifest, one JSON document per line, every line
/// padded with spaces to the longest (JSON allows trailing spaces): task i is then bytes
/// i * width .. (i + 1) * width, which a Batch child reads alone, however long the manifest.
/// Streamed through the store's writer, so that a manifest of millions of tasks never is in
/// memory at once; the tasks are made twice (once to measure the lines).
pub async fn write_manifest_of(
    location: &str,
    count: usize,
    task: &(dyn Fn(usize) -> Task + Sync),
    sdk: &aws_config::SdkConfig,
) -> Result<(), BatchError> {
    let store_error = |source| BatchError::Store {
        location: location.to_string(),
        source: Box::new(source),
    };
    let line = |i: usize| serde_json::to_string(&task(i)).expect("tasks serialise");
    let width = (0..count).map(|i| line(i).len()).max().unwrap_or(0);
    let (store, key) = open_object(location, sdk).map_err(store_error)?;
    let mut writer = store.writer(&key).await.map_err(store_error)?;
    let mut text = String::with_capacity(LINES_PER_WRITE * (width + 1));
    for i in 0..count {
        let l = line(i);
        text.push_str(&l);
        text.extend(std::iter::repeat_n(' ', width - l.len()));
        text.push('\n');
        if (i + 1) % LINES_PER_WRITE == 0 {
            writer.write(text.as_bytes()).await.map_err(store_error)?;
            text.clear();
        }
    }
    writer.write(text.as_bytes()).await.map_err(store_error)?;
    writer.finish().await.map_err(store_error)
}

/// A stage of a plan as its manifest is written: its name, its tasks made one at a time, and
/// what its largest task costs (where the plan estimates it), which picks its runner.
pub struct StageTasks<'a> {
    pub name: String,
    pub count: usize,
    pub task: Box<dyn Fn(usize) -> Task + Send + Sync + 'a>,
    pub cost: Option<crate::task::route::TaskCost>,
}

/// The stages of a staged segment or connected-components plan (of `task` over `input` within
/// `budget`), their tasks made on demand, each with the cost of its largest task as the plan's
/// estimate gives it (by stage name), which routes the stage.
pub fn staged_stage_tasks<'a, W: crate::task::staged::StagedWork>(
    input: &crate::formats::precomputed::Precomputed,
    task: &W,
    budget: &crate::task::staged::Budget,
    plan: &'a crate::task::spec::StagedPlan<W>,
    stages: &[crate::task::staged::StageSpec],
) -> Result<Vec<StageTasks<'a>>, crate::task::staged::StagedError> {
    let (_, estimates) = crate::task::staged::estimate(input, task, budget, None)?;
    Ok(stages
        .iter()
        .map(|&spec| {
            let name = spec.name();
            let cost =
                estimates
                    .iter()
                    .find(|e| e.stage == name)
                    .map(|e| crate::task::route::TaskCost {
                        mib: e.mib,
                        seconds: e.seconds,
                        bounded: e.grows_with != "data",
                    });
            StageTasks {
                name,
                count: spec.tasks,
                task: Box::new(move |i| spec.task(plan, i)),
                cost,
            }
        })
        .collect())
}

/// Writes a plan's stages as manifests, `PREFIX<stage>.jsonl`, and returns the stages document
/// that `batch/statemachines/segment.asl.json` runs: the plan's id, its blocks and each stage's
/// manifest, task count, array jobs (of at most [`MAX_ARRAY_SIZE`] tasks), runner (`forced`,
/// or Lambda where its largest task fits, see [`crate::task::route`]) and that task's
/// estimated MiB and seconds. A stage forced onto Lambda that cannot fit fails the plan before
/// any manifest is written.
pub async fn write_stage_manifests(
    plan_id: &str,
    blocks: usize,
    stages: &[StageTasks<'_>],
    prefix: &str,
    forced: Option<crate::task::route::Runner>,
    sdk: &aws_config::SdkConfig,
) -> Result<serde_json::Value, BatchError> {
    let runners = stages
        .iter()
        .map(|s| crate::task::route::route(&s.name, s.count, s.cost, forced))
        .collect::<Result<Vec<_>, _>>()?;
    let mut summary = Vec::new();
    for (stage, runner) in stages.iter().zip(runners) {
        let location = format!("{prefix}{}.jsonl", stage.name);
        write_manifest_of(&location, stage.count, &*stage.task, sdk).await?;
        let jobs: Vec<serde_json::Value> = (0..stage.count)
            .step_by(MAX_ARRAY_SIZE)
            .map(|offset| {
                let size = (stage.count - offset).min(MAX_ARRAY_SIZE);
                serde_json::json!({"offset": offset, "size": size})
            })
            .collect();
        summary.push(serde_json::json!({
            "stage": stage.name, "manifest": location, "tasks": stage.count, "jobs": jobs,
            "runner": runner,
            "task_mib": stage.cost.map(|c| c.mib),
            "task_seconds": stage.cost.map(|c| c.seconds),
        }));
    }
    Ok(serde_json::json!({"plan": plan_id, "blocks": blocks, "stages": summary}))
}

/// Where a Batch job's task comes from.
pub enum TaskSource {
    /// Task `AWS_BATCH_JOB_ARRAY_INDEX + offset` of a manifest (or its only task).
    Manifest { location: String, offset: usize },
    /// A task document given inline (JSON) or as a file or `s3://` object.
    Task(String),
}

/// The most bytes read to find a manifest's line width.
const FIRST_LINE_BYTES: u64 = 1 << 20;

/// Task `index` of a long manifest whose lines all have one width (as [`write_manifest`] writes
/// them), read alone: the first megabyte gives the width, then one ranged read takes the line
/// with the newlines around it. `None` when the manifest is short or not like that (or the
/// index is past its end), for the caller to read it whole.
async fn fixed_width_task(
    location: &str,
    index: usize,
    sdk: &aws_config::SdkConfig,
) -> Result<Option<Task>, BatchError> {
    let store_error = |source| BatchError::Store {
        location: location.to_string(),
        source: Box::new(source),
    };
    let (store, key) = open_object(location, sdk).map_err(store_error)?;
    let Some(head) = store
        .get_range(&key, 0, FIRST_LINE_BYTES)
        .await
        .map_err(store_error)?
    else {
        return Err(BatchError::MissingManifest {
            location: location.to_string(),
        });
    };
    // A manifest that fits the first read is read whole; a longer one must show one width
    // all through that read (what this writer makes, and no hand-made one of varying lines).
    if (head.len() as u64) < FIRST_LINE_BYTES {
        return Ok(None);
    }
    let Some(newline) = head.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let width = newline as u64 + 1;
    let uniform = head
        .chunks(width as usize)
        .filter(|line| line.len() as u64 == width)
        .all(|line| line.last() == Some(&b'\n') && !line[..line.len() - 1].contains(&b'\n'));
    if !uniform {
        return Ok(None);
    }
    // The line and the newline before it (none before the first).
    let start = (index as u64 * width).saturating_sub(1);
    let len = if index == 0 { width } else { width + 1 };
    let Some(bytes) = store
        .get_range(&key, start, len)
        .await
        .map_err(store_error)?
    else {
        return Ok(None);
    };
    let framed = bytes.len() as u64 == len
        && bytes.last() == Some(&b'\n')
        && (index == 0 || bytes[0] == b'\n')
        && !bytes[1..bytes.len() - 1].contains(&b'\n');
    if !framed {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&bytes[(index > 0) as usize..]);
    Task::from_json(line.trim())
        .map(Some)
        .map_err(|source| BatchError::Task {
            location: location.to_string(),
            line: index + 1,
            source,
        })
}

/// Task `index` (from 0) of a manifest; `from` says where the index came from, for the error.
/// Reads only that task's line where the manifest's lines have one width.
pub async fn manifest_task(
    location: &str,
    index: usize,
    from: &'static str,
    sdk: &aws_config::SdkConfig,
) -> Result<Task, BatchError> {
    if let Some(task) = fixed_width_task(location, index, sdk).await? {
        return Ok(task);
    }
    let mut tasks = read_manifest(location, sdk).await?;
    if index >= tasks.len() {
        return Err(BatchError::NoSuchTask {
            location: location.to_string(),
            count: tasks.len(),
            index,
            from,
        });
    }
    Ok(tasks.swap_remove(index))
}

/// Picks this job's task: array index + offset in a manifest, or the one given.
pub async fn job_task(
    source: &TaskSource,
    array_index: Option<String>,
    sdk: &aws_config::SdkConfig,
) -> Result<Task, BatchError> {
    match source {
        TaskSource::Manifest { location, offset } => match array_index {
            Some(i) => {
                let index = i
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| BatchError::BadIndex(i))?
                    + offset;
                manifest_task(location, index, "AWS_BATCH_JOB_ARRAY_INDEX + offset", sdk).await
            }
            None => {
                let mut tasks = read_manifest(location, sdk).await?;
                match tasks.len() {
                    1 => Ok(tasks.remove(0)),
                    0 => Err(BatchError::EmptyManifest {
                        location: location.clone(),
                    }),
                    count => Err(BatchError::NotAnArrayJob {
                        location: location.clone(),
                        count,
                    }),
                }
            }
        },
        TaskSource::Task(text) if text.trim_start().starts_with('{') => Task::from_json(text)
            .map_err(|source| BatchError::Task {
                location: "--task".into(),
                line: 1,
                source,
            }),
        TaskSource::Task(location) => {
            let mut tasks = read_manifest(location, sdk).await?;
            match tasks.len() {
                1 => Ok(tasks.remove(0)),
                count => Err(BatchError::NotAnArrayJob {
                    location: location.clone(),
                    count,
                }),
            }
        }
    }
}

/// The Batch entrypoint: finds this job's task and runs it. A SIGTERM (job timeout, spot
/// reclaim) stops the task cooperatively and fails it as retryable.
pub async fn run_batch_job(
    executor: &Executor,
    source: &TaskSource,
    shutdown: &CancellationToken,
) -> Result<TaskOutput, TaskFailure> {
    let array_index = std::env::var("AWS_BATCH_JOB_ARRAY_INDEX").ok();
    info!(
        job = std::env::var("AWS_BATCH_JOB_ID").unwrap_or_default(),
        attempt = std::env::var("AWS_BATCH_JOB_ATTEMPT").unwrap_or_default(),
        array_index = array_index.clone().unwrap_or_default(),
        "Batch job started"
    );
    let task = job_task(source, array_index, executor.sdk())
        .await
        .map_err(|e| TaskFailure::from_error("finding this job's task", &e))?;
    executor.run(&task, shutdown).await
}

/// A Batch client from the AWS environment (`AWS_ENDPOINT_URL_BATCH` for another server).
pub fn batch_client(sdk: &aws_config::SdkConfig) -> aws_sdk_batch::Client {
    let mut config = aws_sdk_batch::config::Builder::from(sdk);
    if let Some(endpoint) = aws_env::endpoint("AWS_ENDPOINT_URL_BATCH") {
        config = config.endpoint_url(endpoint);
    }
    aws_sdk_batch::Client::from_conf(config.build())
}

pub struct SubmitOptions {
    pub manifest: String,
    pub job_queue: String,
    pub job_definition: String,
    pub job_name: String,
}

/// A submitted Batch job and the manifest tasks it runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SubmittedJob {
    pub job_id: String,
    pub job_name: String,
    pub offset: usize,
    pub size: usize,
}

/// Submits a manifest: one array job per 10,000 tasks (a single task goes as a plain job), each
/// with the parameters `manifest` and `offset` that the job definition's command refers to
/// (`batch --manifest Ref::manifest --offset Ref::offset`).
pub async fn submit_manifest(
    client: &aws_sdk_batch::Client,
    sdk: &aws_config::SdkConfig,
    opts: &SubmitOptions,
) -> Result<Vec<SubmittedJob>, BatchError> {
    let count = read_manifest(&opts.manifest, sdk).await?.len();
    if count == 0 {
        return Err(BatchError::EmptyManifest {
            location: opts.manifest.clone(),
        });
    }
    let mut jobs = Vec::new();
    for offset in (0..count).step_by(MAX_ARRAY_SIZE) {
        let size = (count - offset).min(MAX_ARRAY_SIZE);
        let job_name = if count > MAX_ARRAY_SIZE {
            format!("{}-{}", opts.job_name, offset / MAX_ARRAY_SIZE)
        } else {
            opts.job_name.clone()
        };
        let parameters = HashMap::from([
            ("manifest".to_string(), opts.manifest.clone()),
            ("offset".to_string(), offset.to_string()),
        ]);
        let mut request = client
            .submit_job()
            .job_name(&job_name)
            .job_queue(&opts.job_queue)
            .job_definition(&opts.job_definition)
            .set_parameters(Some(parameters));
        if size > 1 {
            request =
                request.array_properties(ArrayProperties::builder().size(size as i32).build());
        }
        let out = request.send().await.map_err(|e| BatchError::Submit {
            message: DisplayErrorContext(&e).to_string(),
        })?;
        let job_id = out.job_id().unwrap_or_default().to_string();
        info!(%job_id, offset, size, "submitted");
        jobs.push(SubmittedJob {
            job_id,
            job_name,
            offset,
            size,
        });
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::spec::DownsampleTask;

    /// Tasks whose documents differ in length.
    fn tasks(n: usize) -> Vec<Task> {
        (0..n)
            .map(|i| {
                let name = format!("vol-{i}-{}", "x".repeat(i % 7));
                Task::Downsample(DownsampleTask::new(name, 1 + i as u32 % 3))
            })
            .collect()
    }

    #[test]
    fn a_task_of_a_long_manifest_is_read_alone_and_odd_manifests_whole() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let sdk = aws_config::SdkConfig::builder().build();
        let dir = tempfile::tempdir().unwrap();
        // Long enough (> 1 MiB) for the ranged reads; short; and hand-made lines of varying
        // widths, which must not be read by offset.
        for (name, n, padded) in [
            ("long", 12_000, true),
            ("short", 30, true),
            ("odd", 12_000, false),
        ] {
            let location = dir.path().join(format!("{name}.jsonl"));
            let location = location.to_str().unwrap();
            let all = tasks(n);
            rt.block_on(async {
                if padded {
                    write_manifest(location, &all, &sdk).await.unwrap();
                } else {
                    let text: String = all
                        .iter()
                        .map(|t| serde_json::to_string(t).unwrap() + "\n")
                        .collect();
                    std::fs::write(location, text).unwrap();
                }
                let direct = fixed_width_task(location, 7, &sdk).await.unwrap();
                assert_eq!(direct.is_some(), name == "long", "{name}");
                for i in [0, 1, 7, n / 2, n - 1] {
                    let got = manifest_task(location, i, "test", &sdk).await.unwrap();
                    assert_eq!(got, all[i], "{name} task {i}");
                }
                let past = manifest_task(location, n, "test", &sdk).await.unwrap_err();
                assert!(matches!(past, BatchError::NoSuchTask { count, .. } if count == n));
                // Padded lines are still one task each for whole readers.
                assert_eq!(read_manifest(location, &sdk).await.unwrap(), all);
            });
        }
    }
}
