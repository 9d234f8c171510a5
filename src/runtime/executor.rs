//! Runs task documents: the one place `run-task`, the Batch entrypoint and the activity worker
//! share. The GPU context is opened once, on first use, and reused by every task; the AWS
//! configuration is loaded once.

use crate::formats::precomputed::Precomputed;
use crate::gpu::GpuContext;
use crate::store::boss_index::S3Index;
use crate::store::{aws_env, open_store_with, Store};
use crate::task::boss::channel_of;
use crate::task::boss_downsample::{run_all_levels, run_step, BossError, BossTarget};
use crate::task::downsample::{downsample, Compute};
use crate::task::failure::{Classify, FailureKind};
use crate::task::segment::{connected_components, segment};
use crate::task::spec::{
    segmentation_output, BossDownsampleTask, DownsampleTask, PlanTask, Stage, StageTask, Task,
};
use crate::task::staged::{run_stage, StagedWork};
use serde_json::Value;
use std::sync::Arc;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, Instrument};

/// A failed task: its kind (error name, retryability) and the whole error chain as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskFailure {
    pub kind: FailureKind,
    pub cause: String,
}

impl std::fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.error_name(), self.cause)
    }
}

impl TaskFailure {
    pub fn new(kind: FailureKind, cause: impl Into<String>) -> TaskFailure {
        TaskFailure {
            kind,
            cause: cause.into(),
        }
    }

    /// From an error that classifies itself, keeping its chain of causes.
    pub fn from_error<E: Classify + std::error::Error>(context: &str, e: &E) -> TaskFailure {
        TaskFailure::new(e.failure_kind(), format!("{context}: {}", error_chain(e)))
    }
}

/// Reads and loads an ONNX model (a path or `s3://` object), failures named with `context`.
pub async fn load_model(
    location: &str,
    sdk: &aws_config::SdkConfig,
    context: &str,
) -> Result<crate::infer::Model, TaskFailure> {
    let (store, key) = crate::store::open_object(location, sdk)
        .map_err(|e| TaskFailure::from_error(context, &e))?;
    let object = store
        .get(&key)
        .await
        .map_err(|e| TaskFailure::from_error(context, &e))?
        .ok_or_else(|| {
            TaskFailure::new(
                FailureKind::InvalidTask,
                format!("{context}: the model {location} does not exist"),
            )
        })?;
    crate::infer::Model::from_bytes(&object.data, location)
        .map_err(|e| TaskFailure::from_error(context, &e))
}

/// `cuboids plan infer`: the task's output in tasks within `budget` (over a hypothetical
/// image of `shape` voxels where given), and the stages that run them: `infer` (one task
/// per column or piece of one, any order), then `finalize` (the info).
pub async fn plan_infer(
    task: &crate::task::spec::InferTask,
    budget: &crate::task::infer::InferBudget,
    shape: Option<crate::geometry::Vec3>,
    sdk: &aws_config::SdkConfig,
) -> Result<(crate::task::infer::InferPlan, Vec<Vec<Task>>), TaskFailure> {
    use crate::task::infer::{layout, plan, sizing};
    let context = format!("planning infer {} with {}", task.image, task.model);
    let model = load_model(&task.model, sdk, &context).await?;
    let store =
        open_store_with(&task.image, sdk).map_err(|e| TaskFailure::from_error(&context, &e))?;
    let mut image = Precomputed::open(store)
        .await
        .map_err(|e| TaskFailure::from_error(&context, &e))?;
    if let (Some(shape), Some(scale)) = (shape, image.info.scales.get_mut(task.mip)) {
        scale.size = shape;
    }
    let opts = task.options();
    let fail = |e: crate::task::infer::InferTaskError| TaskFailure::from_error(&context, &e);
    let layout = layout(&model, &image, &opts).map_err(fail)?;
    let sizing = sizing(&model, &layout, &image.info, task.mip).map_err(fail)?;
    let plan = plan(sizing, &layout, budget, task.column).map_err(fail)?;
    let offset = image.info.scales[task.mip].voxel_offset;
    let absolute = |v: crate::geometry::Vec3| [0, 1, 2].map(|i| v[i] as i64 + offset[i]);
    let base = crate::task::spec::InferTask {
        task_mib: budget.task_bytes >> 20,
        column: Some(plan.column),
        bounds: None,
        finalize: false,
        ..task.clone()
    };
    let tiles = plan
        .tasks
        .iter()
        .map(|b| {
            Task::Infer(crate::task::spec::InferTask {
                bounds: Some(crate::task::downsample::Bounds {
                    start: absolute(b.start),
                    stop: absolute(b.stop),
                }),
                ..base.clone()
            })
        })
        .collect();
    let finalize = Task::Infer(crate::task::spec::InferTask {
        finalize: true,
        ..base
    });
    Ok((plan, vec![tiles, vec![finalize]]))
}

/// A plan's id: the digest of its tasks (the same plan, the same id).
pub fn plan_id(stages: &[Vec<Task>]) -> String {
    use md5::{Digest, Md5};
    let body = serde_json::to_vec(stages).expect("tasks serialise");
    Md5::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes the stages of an inference plan as manifests under `prefix` and returns the stages
/// document (as `cuboids plan ... --manifests` prints it).
pub async fn write_infer_manifests(
    stages: &[Vec<Task>],
    plan: &crate::task::infer::InferPlan,
    budget: &crate::task::infer::InferBudget,
    prefix: &str,
    runner: Option<crate::task::route::Runner>,
    sdk: &aws_config::SdkConfig,
) -> Result<serde_json::Value, crate::runtime::batch::BatchError> {
    use crate::task::route::TaskCost;
    let fixed_mib = plan.sizing.fixed_bytes().div_ceil(1 << 20) as u64;
    let costs = [
        TaskCost {
            mib: plan.task_bytes.div_ceil(1 << 20) as u64,
            seconds: plan.largest_task_seconds(budget),
            bounded: true,
        },
        // The info alone (the model is read to check the output's channels).
        TaskCost {
            mib: fixed_mib,
            seconds: 1.0,
            bounded: true,
        },
    ];
    let stage_tasks: Vec<crate::runtime::batch::StageTasks> = ["infer", "finalize"]
        .iter()
        .zip(stages)
        .zip(costs)
        .map(|((name, tasks), cost)| crate::runtime::batch::StageTasks {
            name: name.to_string(),
            count: tasks.len(),
            task: Box::new(move |i| tasks[i].clone()),
            cost: Some(cost),
        })
        .collect();
    crate::runtime::batch::write_stage_manifests(
        &plan_id(stages),
        stages[0].len(),
        &stage_tasks,
        prefix,
        runner,
        sdk,
    )
    .await
}

/// The process's peak resident memory (Linux's VmHWM), or `None` where it cannot be read.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// An error and its sources, joined with ": " (what `anyhow`'s `{:#}` prints).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What a finished task returns: the output document, a one-line summary for logs, and the
/// report a person at a terminal reads (the summary and the time each pass took).
#[derive(Clone, Debug)]
pub struct TaskOutput {
    pub document: Value,
    pub summary: String,
    pub report: Vec<String>,
}

pub struct Executor {
    sdk: aws_config::SdkConfig,
    /// Opened once, by the first task that needs it; concurrent first tasks wait for it.
    gpu: OnceCell<Arc<GpuContext>>,
}

impl Executor {
    /// With the standard AWS environment.
    pub async fn from_env() -> Executor {
        Executor::new(aws_env::sdk_config().await)
    }

    pub fn new(sdk: aws_config::SdkConfig) -> Executor {
        Executor {
            sdk,
            gpu: OnceCell::new(),
        }
    }

    pub fn sdk(&self) -> &aws_config::SdkConfig {
        &self.sdk
    }

    /// Runs line `index` of a manifest (which must not itself be a manifest reference).
    async fn manifest_task(
        &self,
        t: &crate::task::spec::ManifestTask,
        cancel: &CancellationToken,
    ) -> Result<TaskOutput, TaskFailure> {
        let task = crate::runtime::batch::manifest_task(
            &t.manifest,
            t.index,
            "the manifest-task's index",
            &self.sdk,
        )
        .await
        .map_err(|e| TaskFailure::from_error("manifest-task", &e))?;
        if let Task::ManifestTask(_) = task {
            return Err(TaskFailure::new(
                FailureKind::InvalidTask,
                format!(
                    "manifest-task: task {} of manifest {} is another manifest task, not a task",
                    t.index, t.manifest
                ),
            ));
        }
        Box::pin(self.run(&task, cancel)).await
    }

    /// The GPU context, opened by the first task that needs it.
    pub async fn gpu(&self) -> Result<Arc<GpuContext>, TaskFailure> {
        self.gpu
            .get_or_try_init(|| async {
                let ctx = tokio::task::spawn_blocking(GpuContext::new)
                    .await
                    .map_err(|e| {
                        TaskFailure::new(FailureKind::Internal, format!("opening the GPU: {e}"))
                    })?
                    .map_err(|e| TaskFailure::from_error("opening the GPU", &e))?;
                info!(adapter = %ctx.adapter_info.name, "GPU opened");
                Ok(Arc::new(ctx))
            })
            .await
            .cloned()
    }

    /// Runs a task to its end, or until `cancel` fires: a downsample then stops before its next
    /// tile and removes what it wrote to scales it was adding; segment and connected components
    /// (and their block and relabel stage tasks) stop before their next GPU chunk, pass or
    /// output chunk and remove what they wrote to an output they were creating; a Boss step is
    /// dropped (every cuboid is written whole, and without the returned document no level counts
    /// as done).
    pub async fn run(
        &self,
        task: &Task,
        cancel: &CancellationToken,
    ) -> Result<TaskOutput, TaskFailure> {
        let span = info_span!("task", task = %task.describe());
        async {
            let started = std::time::Instant::now();
            let result = match task {
                Task::Downsample(t) => self.downsample(t, cancel).await,
                Task::Segment(_) | Task::ConnectedComponents(_) => {
                    self.segmentation(task, cancel).await
                }
                Task::Infer(t) => self.infer(t, cancel).await,
                Task::ConnectedComponentsStage(t) => {
                    self.stage_task("connected-components", t, cancel).await
                }
                Task::SegmentStage(t) => self.stage_task("segment", t, cancel).await,
                Task::ManifestTask(t) => self.manifest_task(t, cancel).await,
                Task::Plan(t) => self.plan(t).await,
                Task::BossDownsample(t) => tokio::select! {
                    r = self.boss_downsample(t) => r,
                    _ = cancel.cancelled() => Err(TaskFailure::new(
                        FailureKind::Interrupted,
                        "stopped before it finished: the runner is shutting down",
                    )),
                },
            };
            match &result {
                Ok(out) => info!(seconds = started.elapsed().as_secs_f64(), "{}", out.summary),
                Err(f) => {
                    tracing::warn!(error = f.kind.error_name(), cause = %f.cause, "task failed")
                }
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn downsample(
        &self,
        t: &DownsampleTask,
        cancel: &CancellationToken,
    ) -> Result<TaskOutput, TaskFailure> {
        let context = format!("downsampling {}", t.location);
        let store = open_store_with(&t.location, &self.sdk)
            .map_err(|e| TaskFailure::from_error(&context, &e))?;
        let vol = Precomputed::open(store)
            .await
            .map_err(|e| TaskFailure::from_error(&context, &e))?;
        let compute = if t.cpu {
            Compute::Cpu
        } else {
            Compute::Gpu(self.gpu().await?)
        };
        let mut opts = t.options();
        opts.cancel = Some(cancel.clone());
        let report = downsample(compute, &vol, &opts)
            .await
            .map_err(|e| TaskFailure::from_error(&context, &e))?;
        let mut document = t.output(&report);
        // What a Batch job definition's memory must cover.
        document["peak_rss_bytes"] = serde_json::json!(peak_rss_bytes());
        Ok(TaskOutput {
            document,
            report: report.describe(&format!("downsampled {}", t.location)),
            summary: format!(
                "{}: {:.1} MVx in {:.2} s = {:.1} MVx/s, {} chunks written, {} tiles skipped (existing), {} (empty)",
                t.location,
                report.input_voxels as f64 / 1e6,
                report.wall.as_secs_f64(),
                report.mvx_per_s(),
                report.chunks_written,
                report.tiles_skipped_existing,
                report.tiles_skipped_empty
            ),
        })
    }

    /// ConvNet inference: the model is read and checked before the image is opened, so a
    /// model inference cannot run fails before anything is read or written.
    async fn infer(
        &self,
        t: &crate::task::spec::InferTask,
        cancel: &CancellationToken,
    ) -> Result<TaskOutput, TaskFailure> {
        let part = match (t.bounds, t.finalize) {
            (_, true) => " (finalize: the info)".to_string(),
            (Some(b), _) => format!(" (bounds {:?}..{:?})", b.start, b.stop),
            _ => String::new(),
        };
        let context = format!("infer {} with {} -> {}{part}", t.image, t.model, t.output);
        let model = load_model(&t.model, &self.sdk, &context).await?;
        let (image, out) = self
            .open_input_output(&t.image, &t.output, &context)
            .await?;
        let executor = self.infer_executor(t, &model, &context).await?;
        let mut opts = t.options();
        opts.cancel = Some(cancel.clone());
        let offset = image
            .info
            .scales
            .get(t.mip)
            .map_or([0; 3], |s| s.voxel_offset);
        opts.bounds = t.relative_bounds(offset).map_err(|message| {
            TaskFailure::new(FailureKind::InvalidTask, format!("{context}: {message}"))
        })?;
        let mut report = crate::task::infer::infer(executor, &model, &image, out, &opts)
            .await
            .map_err(|e| TaskFailure::from_error(&context, &e))?;
        report.precision = t.dtype;
        let document = serde_json::json!({
            "kind": "infer",
            "output": t.output,
            "voxels": report.voxels,
            "channels": report.channels,
            "patches": report.patches,
            "skipped_patches": report.skipped,
            "chunks_written": report.chunks_written,
            "columns": report.columns,
            "peak_column_bytes": report.peak_column_bytes,
            "column": report.column,
            "gflops": report.gflops(),
            "engine": report.engine,
            "dtype": report.precision.name(),
            "seconds": report.wall.as_secs_f64(),
            "peak_rss_bytes": peak_rss_bytes(),
        });
        Ok(TaskOutput {
            document,
            report: report.describe(&context),
            summary: format!(
                "{context}: {:.1} MVx in {:.2} s = {:.2} MVx/s, {} patches ({} engine, {})",
                report.voxels as f64 / 1e6,
                report.wall.as_secs_f64(),
                report.mvx_per_s(),
                report.patches,
                report.engine,
                report.precision.name()
            ),
        })
    }

    /// The executor a task asks for: `auto` is the GPU unless the adapter is lavapipe, where
    /// the native CPU engine is the faster.
    async fn infer_executor(
        &self,
        t: &crate::task::spec::InferTask,
        model: &crate::infer::Model,
        context: &str,
    ) -> Result<Arc<dyn crate::infer::region::Executor>, TaskFailure> {
        use crate::infer::{native::NativeExecutor, region::CpuExecutor, Engine};
        let engine = if t.cpu { Engine::Reference } else { t.engine };
        let model = model.clone().with_precision(t.dtype);
        Ok(match engine {
            Engine::Reference => Arc::new(CpuExecutor { model }),
            Engine::Native => Arc::new(NativeExecutor::new(model)),
            Engine::Gpu | Engine::Auto => {
                let ctx = self.gpu().await?;
                if engine == Engine::Auto && ctx.is_software() {
                    Arc::new(NativeExecutor::new(model))
                } else {
                    Arc::new(
                        crate::infer::gpu::GpuExecutor::new(ctx, model)
                            .map_err(|e| TaskFailure::from_error(context, &e))?,
                    )
                }
            }
        })
    }

    /// A segmentation task's input volume and output store, failures named with `context`.
    async fn open_input_output(
        &self,
        input: &str,
        output: &str,
        context: &str,
    ) -> Result<(Precomputed, Arc<dyn Store>), TaskFailure> {
        let store =
            open_store_with(input, &self.sdk).map_err(|e| TaskFailure::from_error(context, &e))?;
        let vol = Precomputed::open(store)
            .await
            .map_err(|e| TaskFailure::from_error(context, &e))?;
        let out =
            open_store_with(output, &self.sdk).map_err(|e| TaskFailure::from_error(context, &e))?;
        Ok((vol, out))
    }

    /// Segment and connected-components tasks. Their output layer's `info` is written last, so
    /// an interrupted run leaves no layer that claims to be complete; once `cancel` fires, the
    /// run stops at its next check and removes the chunks it wrote to a layer it was creating.
    async fn segmentation(
        &self,
        task: &Task,
        cancel: &CancellationToken,
    ) -> Result<TaskOutput, TaskFailure> {
        let (kind, input, output) = match task {
            Task::Segment(t) => ("segment", &t.affinity, &t.output),
            Task::ConnectedComponents(t) => ("connected-components", &t.input, &t.output),
            _ => unreachable!("only segmentation tasks come here"),
        };
        let context = format!("{kind} {input} -> {output}");
        let (vol, out) = self.open_input_output(input, output, &context).await?;
        let ctx = self.gpu().await?;
        let report = match task {
            Task::Segment(t) => {
                let mut opts = t.options();
                opts.chunks.cancel = Some(cancel.clone());
                segment(ctx, &vol, out, &opts).await
            }
            Task::ConnectedComponents(t) => {
                let mut opts = t.options();
                opts.chunks.cancel = Some(cancel.clone());
                connected_components(ctx, &vol, out, &opts).await
            }
            _ => unreachable!("only segmentation tasks come here"),
        }
        .map_err(|e| TaskFailure::from_error(&context, &e))?;
        let mut document = segmentation_output(kind, output, &report);
        document["peak_rss_bytes"] = serde_json::json!(peak_rss_bytes());
        Ok(TaskOutput {
            document,
            report: report.describe(&context),
            summary: format!(
                "{context}: {:.1} MVx in {:.2} s = {:.1} MVx/s, {} segments",
                report.voxels as f64 / 1e6,
                report.wall.as_secs_f64(),
                report.mvx_per_s(),
                report.segments
            ),
        })
    }

    /// Plans a segment or connected-components task in stages and writes a manifest per stage;
    /// the output document is the stages, which the segmentation machine then runs.
    async fn plan(&self, t: &PlanTask) -> Result<TaskOutput, TaskFailure> {
        let context = format!("planning {} into {}", t.work.describe(), t.manifests);
        let budget = crate::task::staged::Budget {
            task_bytes: t.task_mib.saturating_mul(1 << 20),
            block: t.block_size,
            fan_in: t.scan_fan_in,
            ..Default::default()
        };
        let mut document = match t.work.as_ref() {
            Task::Segment(w) => self.plan_stages(w, budget, t, &context).await?,
            Task::ConnectedComponents(w) => self.plan_stages(w, budget, t, &context).await?,
            Task::Infer(w) => {
                let budget = crate::task::infer::InferBudget {
                    task_bytes: t.task_mib.saturating_mul(1 << 20),
                    seconds: t.task_seconds,
                    gflops: t.gflops.unwrap_or(crate::task::infer::DEFAULT_GFLOPS),
                };
                let (plan, stages) = plan_infer(w, &budget, None, &self.sdk).await?;
                write_infer_manifests(&stages, &plan, &budget, &t.manifests, t.runner, &self.sdk)
                    .await
                    .map_err(|e| TaskFailure::from_error(&context, &e))?
            }
            other => {
                return Err(TaskFailure::new(
                    FailureKind::InvalidTask,
                    format!(
                        "plan: field work is a {} task; only segment, connected-components and infer tasks are planned in stages",
                        other.describe().split(' ').next().unwrap_or("other")
                    ),
                ))
            }
        };
        document["kind"] = serde_json::json!("plan");
        let stages = document["stages"].as_array().map_or(0, Vec::len);
        let tasks: u64 = document["stages"]
            .as_array()
            .map_or(0, |s| s.iter().filter_map(|s| s["tasks"].as_u64()).sum());
        let summary = format!(
            "{context}: plan {}, {} blocks, {stages} stages, {tasks} tasks",
            document["plan"].as_str().unwrap_or_default(),
            document["blocks"]
        );
        Ok(TaskOutput {
            document,
            report: vec![summary.clone()],
            summary,
        })
    }

    /// Plans `work` in stages and writes their manifests; returns the stages document.
    async fn plan_stages<W: StagedWork>(
        &self,
        work: &W,
        budget: crate::task::staged::Budget,
        t: &PlanTask,
        context: &str,
    ) -> Result<serde_json::Value, TaskFailure> {
        let store = open_store_with(work.input(), &self.sdk)
            .map_err(|e| TaskFailure::from_error(context, &e))?;
        let vol = Precomputed::open(store)
            .await
            .map_err(|e| TaskFailure::from_error(context, &e))?;
        let (plan, stages) = crate::task::staged::plan(&vol, work, &budget)
            .map_err(|e| TaskFailure::from_error(context, &e))?;
        let stage_tasks =
            crate::runtime::batch::staged_stage_tasks(&vol, work, &budget, &plan, &stages)
                .map_err(|e| TaskFailure::from_error(context, &e))?;
        let document = crate::runtime::batch::write_stage_manifests(
            &plan.id,
            plan.blocks,
            &stage_tasks,
            &t.manifests,
            t.runner,
            &self.sdk,
        )
        .await
        .map_err(|e| TaskFailure::from_error(context, &e))?;
        Ok(document)
    }

    /// One task of a staged plan (`kind` of work); only the block stage opens the GPU.
    async fn stage_task<W: StagedWork>(
        &self,
        kind: &str,
        t: &StageTask<W>,
        cancel: &CancellationToken,
    ) -> Result<TaskOutput, TaskFailure> {
        let (input, output) = (t.plan.work.input(), t.plan.work.output());
        let context = format!(
            "{kind} {} stage{} {input} -> {output}",
            t.stage_name(),
            t.block.map(|b| format!(" block {b}")).unwrap_or_default()
        );
        let (vol, out) = self.open_input_output(input, output, &context).await?;
        let ctx = match t.stage {
            Stage::Block => Some(self.gpu().await?),
            _ => None,
        };
        let report = run_stage(t, &vol, out, ctx, Some(cancel.clone()))
            .await
            .map_err(|e| TaskFailure::from_error(&context, &e))?;
        let mut document = segmentation_output(&format!("{kind}-stage"), output, &report);
        document["stage"] = serde_json::to_value(t.stage).expect("a stage serialises");
        document["block"] = serde_json::json!(t.block);
        if let Some(level) = t.level {
            document["level"] = serde_json::json!(level);
        }
        document["plan"] = serde_json::json!(t.plan.id);
        // What a Batch job definition's memory must cover (bounded by the block, not the volume).
        document["peak_rss_bytes"] = serde_json::json!(peak_rss_bytes());
        let summary = format!(
            "{context}: {:.2} s, {} components, {} segments, {} chunks written",
            report.wall.as_secs_f64(),
            report.fragments,
            report.segments,
            report.chunks_written
        );
        Ok(TaskOutput {
            document,
            report: vec![summary.clone()],
            summary,
        })
    }

    async fn boss_downsample(&self, t: &BossDownsampleTask) -> Result<TaskOutput, TaskFailure> {
        let fail = |e: BossError| TaskFailure::from_error("Boss downsample", &e);
        let channel = channel_of(&t.job).map_err(|e| fail(e.into()))?;
        let store = open_store_with(&format!("s3://{}", channel.bucket), &self.sdk)
            .map_err(|e| fail(e.into()))?;
        let target = BossTarget {
            store,
            index: S3Index::new(
                &self.sdk,
                aws_env::endpoint("AWS_ENDPOINT_URL_DYNAMODB"),
                &channel.index_table,
            ),
        };
        let ctx = self.gpu().await?;
        let (next, report) = if t.all_levels {
            run_all_levels(ctx, &target, &t.job, t.cache_mib << 20).await
        } else {
            run_step(ctx, &target, &t.job).await
        }
        .map_err(fail)?;
        let summary = format!(
            "wrote {} cuboids ({} skipped: all inputs missing; {} read from S3)",
            report.written, report.skipped_empty, report.store_reads
        );
        Ok(TaskOutput {
            document: next,
            report: vec![summary.clone()],
            summary,
        })
    }
}
