//! Running locally: volumes on local disk, the GPU of this machine (lavapipe when there is none).

use crate::dtype::DataType;
use crate::formats::precomputed::info::{Encoding, Info, LayerType, Number, Scale};
use crate::formats::precomputed::{Precomputed, WriteOptions};
use crate::geometry::{voxels, Vec3};
use crate::gpu::downsample::downsample_channel_gpu;
use crate::gpu::GpuContext;
use crate::ops::downsample::{downsample_cpu, Factor, Method};
use crate::runtime::activity::{run_worker, sfn_client, shutdown_on_signals, WorkerOptions};
use crate::runtime::batch::{
    batch_client, job_task, run_batch_job, submit_manifest, write_manifest, SubmitOptions,
    TaskSource,
};
use crate::runtime::executor::{Executor, TaskFailure, TaskOutput};
use crate::runtime::synthetic::em_like;
use crate::store::{aws_env, open_store_with, LocalStore};
use crate::task::downsample::{downsample, Compute, DownsampleOptions, DownsampleReport};
use crate::task::plan::plan_slabs;
use crate::task::spec::{BossDownsampleTask, DownsampleTask, Task};
use crate::task::staged::StagedWork;
use crate::volume::Volume;
use anyhow::{Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

pub fn gpu() -> Result<Arc<GpuContext>> {
    Ok(Arc::new(GpuContext::new().context("opening the GPU")?))
}

fn print_report(what: &str, r: &DownsampleReport) {
    for line in r.describe(what) {
        println!("{line}");
    }
}

/// Runs one Boss DownsampleChannel step from a job file (or, with a cache budget, every remaining
/// step); prints the next document on stdout.
pub async fn boss_downsample(job: &Path, all_levels_cache_mib: Option<usize>) -> Result<()> {
    let text = std::fs::read(job).with_context(|| format!("reading {}", job.display()))?;
    let doc: serde_json::Value = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a JSON document", job.display()))?;
    let task = Task::BossDownsample(BossDownsampleTask {
        job: doc,
        all_levels: all_levels_cache_mib.is_some(),
        cache_mib: all_levels_cache_mib.unwrap_or_default(),
    });
    run_and_print(&task)
        .await
        .with_context(|| format!("Boss downsample of {}", job.display()))
}

/// A CLI command's task, run through the same `Executor` as `run-task`, Batch and the worker
/// run it, so it behaves the same everywhere: Ctrl-C or SIGTERM stops it and removes what it
/// wrote to an output it was creating; a failure prints its `cuboids.*` name and cause and exits
/// with the Batch exit codes (75 retryable, 65 permanent). The report goes to stdout.
pub async fn run_command(task: Task) -> Result<ExitCode> {
    let executor = Executor::from_env().await;
    match executor.run(&task, &shutdown_on_signals()?).await {
        Ok(out) => {
            for line in &out.report {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(f) => {
            eprintln!("error: {f}");
            Ok(ExitCode::from(f.kind.exit_code()))
        }
    }
}

/// Runs a task document here, prints a summary on stderr and the output document on stdout.
pub async fn run_and_print(task: &Task) -> Result<()> {
    let started = Instant::now();
    let mut out = Executor::from_env()
        .await
        .run(task, &CancellationToken::new())
        .await
        .map_err(|f| anyhow::anyhow!(f))?;
    out.summary = format!(
        "{} in {:.2} s",
        out.summary,
        started.elapsed().as_secs_f64()
    );
    print_output(&out)
}

/// A task's summary on stderr and its output document on stdout.
fn print_output(out: &TaskOutput) -> Result<()> {
    eprintln!("{}", out.summary);
    println!("{}", serde_json::to_string(&out.document)?);
    Ok(())
}

/// The precomputed volume a plan cuts up.
async fn open_volume(location: &str, sdk: &aws_config::SdkConfig) -> Result<Precomputed> {
    let store = open_store_with(location, sdk)?;
    Precomputed::open(store)
        .await
        .with_context(|| format!("opening {location}"))
}

/// `cuboids plan downsample`: the pyramid in stages within `budget` (see
/// `task::pyramid`). With `output`, one manifest (a plan of one stage); with `manifests`, one
/// per stage under that prefix and the stages printed as JSON (the segmentation machine runs
/// them in order); with `estimate` (and a hypothetical `shape` of the source mip), each stage's
/// tasks, memory and time; else every task on stdout.
pub async fn plan_downsample(
    task: DownsampleTask,
    budget: crate::task::pyramid::PyramidBudget,
    output: Option<&str>,
    manifests: Option<&str>,
    runner: Option<crate::task::route::Runner>,
    estimate: Option<Option<Vec3>>,
) -> Result<()> {
    use crate::task::pyramid;
    let sdk = aws_env::sdk_config().await;
    let vol = open_volume(&task.location, &sdk).await?;
    // Sharded: each shard covers at most a task's source, and tasks hold whole shards.
    let task = DownsampleTask {
        shard_source_mib: task
            .sharded
            .then_some((budget.task_bytes >> 20).max(1) as u64),
        ..task
    };
    let mut info = vol.info.clone();
    if let Some(Some(shape)) = estimate {
        info.scales.truncate(task.mip + 1);
        if let Some(s) = info.scales.get_mut(task.mip) {
            s.size = shape;
        }
    }
    let stages = pyramid::plan(&info, &task.options(), &budget)
        .with_context(|| format!("planning {}", task.location))?;
    if estimate.is_some() {
        let elem = info.data_type.size() * info.num_channels;
        println!(
            "{:<12} {:>10} {:>10} {:>10}",
            "stage", "tasks", "MiB/task", "s/task"
        );
        for e in pyramid::estimate(&stages, &budget, elem) {
            println!(
                "{:<12} {:>10} {:>10} {:>10.1}",
                e.stage, e.tasks, e.mib, e.seconds
            );
        }
        return Ok(());
    }
    let tasks_of = |s: &pyramid::Stage| -> Vec<Task> {
        s.tasks
            .iter()
            .map(|&bounds| {
                Task::Downsample(DownsampleTask {
                    mip: s.mip,
                    num_mips: s.num_mips,
                    bounds: Some(bounds),
                    tile_mib: Some(s.tile_bytes >> 20),
                    ..task.clone()
                })
            })
            .collect()
    };
    if let Some(prefix) = manifests {
        let all: Vec<Vec<Task>> = stages.iter().map(tasks_of).collect();
        let id = crate::runtime::executor::plan_id(&all);
        let elem = info.data_type.size() * info.num_channels;
        let costs = pyramid::estimate(&stages, &budget, elem);
        let stage_tasks: Vec<crate::runtime::batch::StageTasks> = stages
            .iter()
            .zip(&all)
            .zip(&costs)
            .map(|((s, tasks), e)| crate::runtime::batch::StageTasks {
                name: s.name(),
                count: tasks.len(),
                task: Box::new(move |i| tasks[i].clone()),
                cost: Some(crate::task::route::TaskCost {
                    mib: e.mib as u64,
                    seconds: e.seconds,
                    bounded: true,
                }),
            })
            .collect();
        let document = crate::runtime::batch::write_stage_manifests(
            &id,
            all.first().map_or(0, Vec::len),
            &stage_tasks,
            prefix,
            runner,
            &sdk,
        )
        .await?;
        eprintln!(
            "pyramid in {} stages: {}",
            stages.len(),
            stages
                .iter()
                .map(|s| format!("{} ({} tasks)", s.name(), s.tasks.len()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("{document}");
        return Ok(());
    }
    if stages.len() > 1 {
        anyhow::bail!(
            "{} mips from mip {} need {} stages within --task-mib {} ({}): plan them with --manifests PREFIX and run the stages in order",
            task.num_mips,
            task.mip,
            stages.len(),
            budget.task_bytes >> 20,
            stages.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
        );
    }
    let tasks = tasks_of(&stages[0]);
    match output {
        Some(location) => {
            write_manifest(location, &tasks, &sdk).await?;
            eprintln!("wrote {} tasks to {location}", tasks.len());
        }
        None => {
            for t in &tasks {
                println!("{}", serde_json::to_string(t)?);
            }
        }
    }
    Ok(())
}

/// `cuboids plan infer`: the inference in bounded tasks on one patch grid, then a finalize
/// task; with `manifests`, one manifest per stage under that prefix and the stages printed as
/// JSON; with `estimate` (and a hypothetical `shape` of the image), the plan's tasks, memory,
/// patches and time; else every task on stdout.
pub async fn plan_infer(
    task: crate::task::spec::InferTask,
    budget: crate::task::infer::InferBudget,
    manifests: Option<&str>,
    runner: Option<crate::task::route::Runner>,
    estimate: Option<Option<Vec3>>,
) -> Result<()> {
    let sdk = aws_env::sdk_config().await;
    let (plan, stages) =
        crate::runtime::executor::plan_infer(&task, &budget, estimate.flatten(), &sdk)
            .await
            .map_err(|f| anyhow::anyhow!(f))?;
    if estimate.is_some() {
        print!("{}", plan.describe(&budget));
        return Ok(());
    }
    let Some(prefix) = manifests else {
        for t in stages.iter().flatten() {
            println!("{}", serde_json::to_string(t)?);
        }
        return Ok(());
    };
    let document = crate::runtime::executor::write_infer_manifests(
        &stages, &plan, &budget, prefix, runner, &sdk,
    )
    .await?;
    eprintln!(
        "inference in {} tasks of columns {}x{} (at most {} MiB each), then finalize",
        plan.tasks.len(),
        plan.column[0],
        plan.column[1],
        plan.task_bytes.div_ceil(1 << 20)
    );
    println!("{document}");
    Ok(())
}

/// `cuboids plan segment|connected-components`: cuts the task into a staged plan (see
/// `task::staged`) and writes one manifest per stage under the `manifests` prefix (printing the
/// stages as JSON), or every task to stdout.
pub async fn plan_staged<W: StagedWork>(
    task: W,
    budget: crate::task::staged::Budget,
    manifests: Option<&str>,
    runner: Option<crate::task::route::Runner>,
    estimate: Option<Option<Vec3>>,
) -> Result<()> {
    let sdk = aws_env::sdk_config().await;
    let vol = open_volume(task.input(), &sdk).await?;
    if let Some(shape) = estimate {
        let (sizing, stages) = crate::task::staged::estimate(&vol, &task, &budget, shape)
            .with_context(|| format!("estimating stages over {}", task.input()))?;
        print!(
            "{}",
            crate::task::staged::budget::describe(&sizing, &stages)
        );
        return Ok(());
    }
    let (plan, stages) = crate::task::staged::plan(&vol, &task, &budget)
        .with_context(|| format!("planning stages over {}", task.input()))?;
    let Some(prefix) = manifests else {
        for spec in &stages {
            for i in 0..spec.tasks {
                println!("{}", serde_json::to_string(&spec.task(&plan, i))?);
            }
        }
        return Ok(());
    };
    let stage_tasks =
        crate::runtime::batch::staged_stage_tasks(&vol, &task, &budget, &plan, &stages)
            .with_context(|| format!("estimating stages over {}", task.input()))?;
    let document = crate::runtime::batch::write_stage_manifests(
        &plan.id,
        plan.blocks,
        &stage_tasks,
        prefix,
        runner,
        &sdk,
    )
    .await?;
    eprintln!(
        "plan {}: {} blocks of {:?} voxels, {} stages",
        plan.id,
        plan.blocks,
        plan.block_size,
        stages.len()
    );
    println!("{document}");
    Ok(())
}

/// `cuboids run-task`: a task document from a file, an `s3://` object or stdin (`-`). Fails with
/// the Batch exit codes (75 retryable, 65 permanent).
pub async fn run_task(location: &str) -> Result<ExitCode> {
    let executor = Executor::from_env().await;
    let task = if location == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the task document from stdin")?;
        Task::from_json(&text).context("the task document on stdin")?
    } else {
        let source = TaskSource::Task(location.to_string());
        job_task(&source, None, executor.sdk()).await?
    };
    finish(executor.run(&task, &shutdown_on_signals()?).await)
}

/// `cuboids batch`: the AWS Batch entrypoint.
pub async fn batch(source: &TaskSource) -> Result<ExitCode> {
    let executor = Executor::from_env().await;
    let shutdown = shutdown_on_signals()?;
    finish(run_batch_job(&executor, source, &shutdown).await)
}

/// Prints a task's output document (stdout) or its failure (stderr); the exit code says which.
fn finish(result: Result<TaskOutput, TaskFailure>) -> Result<ExitCode> {
    match result {
        Ok(out) => print_output(&out).map(|()| ExitCode::SUCCESS),
        Err(f) => {
            eprintln!("error: {f}");
            Ok(ExitCode::from(f.kind.exit_code()))
        }
    }
}

/// `cuboids worker`: runs until SIGTERM/SIGINT.
pub async fn worker(opts: WorkerOptions) -> Result<()> {
    let executor = Arc::new(Executor::from_env().await);
    let client = sfn_client(executor.sdk());
    let shutdown = shutdown_on_signals()?;
    let report = run_worker(executor, client, opts, shutdown).await?;
    eprintln!(
        "worker stopped: {} tasks succeeded, {} failed, {} abandoned",
        report.succeeded, report.failed, report.abandoned
    );
    Ok(())
}

/// `cuboids submit`: prints the submitted jobs as JSON lines.
pub async fn submit(opts: SubmitOptions) -> Result<()> {
    let sdk = aws_env::sdk_config().await;
    let jobs = submit_manifest(&batch_client(&sdk), &sdk, &opts).await?;
    for job in jobs {
        println!("{}", serde_json::to_string(&job)?);
    }
    Ok(())
}

/// A one-scale info for a new volume.
pub fn new_info(
    layer_type: LayerType,
    dtype: DataType,
    size: Vec3,
    chunk: Vec3,
    resolution: [f64; 3],
) -> Info {
    let encoding = match layer_type {
        LayerType::Image => Encoding::Raw,
        LayerType::Segmentation => Encoding::CompressedSegmentation,
    };
    let resolution = resolution.map(Number);
    Info {
        layer_type,
        data_type: dtype,
        num_channels: 1,
        scales: vec![Scale {
            key: crate::formats::precomputed::info::scale_key(&resolution),
            size,
            resolution,
            voxel_offset: [0; 3],
            chunk_sizes: vec![chunk],
            encoding,
            compressed_segmentation_block_size: (encoding == Encoding::CompressedSegmentation)
                .then_some([8, 8, 8]),
            sharding: None,
            extra: Default::default(),
        }],
        extra: Default::default(),
    }
}

/// Writes `vol` as mip 0 of a new volume at `dir`.
pub async fn write_new_volume(
    dir: &Path,
    info: Info,
    vol: &Volume,
    opts: WriteOptions,
) -> Result<Precomputed> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let target = Precomputed::create(Arc::new(LocalStore::new(dir)), info).await?;
    target.write_region(0, [0; 3], vol, opts).await?;
    Ok(target)
}

pub async fn demo(dir: &Path, size: Vec3) -> Result<()> {
    // Every step runs as a task through one executor (one GPU context), as on Batch.
    let executor = Executor::from_env().await;
    let stop = shutdown_on_signals()?;
    let ctx = executor.gpu().await.map_err(anyhow::Error::msg)?;
    println!(
        "cuboids demo on {} ({:?})",
        ctx.adapter_info.name, ctx.adapter_info.device_type
    );
    let t = Instant::now();
    let (image, labels) = em_like(size);
    println!(
        "made a synthetic EM volume {size:?} in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let chunk = [64, 64, 64];
    let write = WriteOptions::default();
    let mut layers = Vec::new();
    for (name, layer, vol) in [
        ("image", LayerType::Image, &image),
        ("segmentation", LayerType::Segmentation, &labels),
    ] {
        let path = dir.join(name);
        let info = new_info(layer, vol.dtype, size, chunk, [8.0, 8.0, 40.0]);
        let t = Instant::now();
        write_new_volume(&path, info, vol, write).await?;
        println!(
            "wrote {} ({}) in {:.2} s",
            path.display(),
            vol.dtype,
            t.elapsed().as_secs_f64()
        );
        layers.push(path);
    }
    for path in layers {
        let task = DownsampleTask::new(path.display().to_string(), 4);
        run_demo_task(&executor, Task::Downsample(task), &stop).await?;
    }
    crate::runtime::segmentation::demo_segmentation(&executor, &stop, dir, size).await?;
    demo_previews(dir, size).await?;
    let layers: Vec<String> = ["image", "segmentation", "affinity-segmentation", "cells"]
        .iter()
        .map(|l| dir.join(l).display().to_string())
        .collect();
    println!(
        "to look at them in neuroglancer, run: cuboids view {}",
        layers.join(" ")
    );
    Ok(())
}

/// One of the demo's steps, its report printed.
pub(crate) async fn run_demo_task(
    executor: &Executor,
    task: Task,
    stop: &CancellationToken,
) -> Result<()> {
    let out = executor
        .run(&task, stop)
        .await
        .map_err(anyhow::Error::msg)?;
    for line in &out.report {
        println!("{line}");
    }
    Ok(())
}

/// PNGs of the demo's middle section: the image, its mip 3, and each segmentation over it.
async fn demo_previews(dir: &Path, size: Vec3) -> Result<()> {
    let previews = dir.join("previews");
    std::fs::create_dir_all(&previews)
        .with_context(|| format!("creating {}", previews.display()))?;
    let z = (size[2] / 2) as i64;
    let image = dir.join("image").display().to_string();
    for (name, layer, mip, under) in [
        ("image", "image", 0, false),
        ("image-mip3", "image", 3, false),
        ("segmentation", "segmentation", 0, true),
        ("affinity-segmentation", "affinity-segmentation", 0, true),
        ("cells", "cells", 0, true),
    ] {
        let out = previews.join(format!("{name}-z{z}.png"));
        let opts = PreviewOptions {
            z,
            mip,
            image: under.then(|| image.clone()),
            alpha: 0.5,
        };
        let layer = dir.join(layer).display().to_string();
        preview(&layer, &out, &opts).await?;
        println!("preview: {}", out.display());
    }
    Ok(())
}

pub struct BenchOptions {
    pub size: Vec3,
    pub num_mips: u32,
    pub gzip_level: u32,
    pub cpu: bool,
    pub dir: Option<PathBuf>,
    pub keep: bool,
    pub slab_bytes: Option<u64>,
}

pub async fn bench(o: BenchOptions) -> Result<()> {
    let BenchOptions {
        size,
        num_mips,
        gzip_level,
        cpu,
        ..
    } = o;
    let ctx = gpu()?;
    let slab_limit = o.slab_bytes.unwrap_or(ctx.default_slab_bytes());
    println!(
        "adapter: {} ({:?})",
        ctx.adapter_info.name, ctx.adapter_info.device_type
    );
    let image = bench_volume(size);
    let mvx = voxels(size) as f64 / 1e6;

    // Kernels alone: upload, all mips, read back.
    let align = crate::geometry::pow3([2, 2, 1], num_mips);
    let slabs = plan_slabs(size, 1, align, slab_limit).context("slab too large")?;
    for round in 0..2 {
        let t = Instant::now();
        for slab in &slabs {
            let part = image.crop(slab.start, slab.shape());
            downsample_channel_gpu(
                &ctx,
                &part.data,
                DataType::Uint8,
                part.shape,
                Method::Average,
                Factor::ANISOTROPIC,
                num_mips,
            )?;
        }
        let s = t.elapsed().as_secs_f64();
        let note = if round == 0 {
            " (includes shader compilation)"
        } else {
            ""
        };
        println!(
            "GPU kernels, uint8 {size:?}, {num_mips} mips (2,2,1): {:.2} s = {:.1} MVx/s{note}",
            s,
            mvx / s
        );
    }
    if cpu {
        let t = Instant::now();
        downsample_cpu(&image, Method::Average, Factor::ANISOTROPIC, num_mips)?;
        let s = t.elapsed().as_secs_f64();
        println!("CPU reference kernels: {:.2} s = {:.1} MVx/s", s, mvx / s);
    }

    // End to end: read chunks, downsample, write chunks.
    let temp = tempfile::Builder::new()
        .prefix("cuboids-bench")
        .tempdir_in(o.dir.clone().unwrap_or_else(std::env::temp_dir))?;
    let path = match (&o.dir, o.keep) {
        (Some(dir), true) => dir.join("image"),
        _ => temp.path().join("image"),
    };
    let write = WriteOptions { gzip_level };
    let info = new_info(
        LayerType::Image,
        DataType::Uint8,
        size,
        [64, 64, 64],
        [8.0, 8.0, 40.0],
    );
    let vol = write_new_volume(&path, info, &image, write).await?;
    if o.keep {
        let copy = path.with_file_name("image-mip0");
        if copy.exists() {
            std::fs::remove_dir_all(&copy)?;
        }
        copy_tree(&path, &copy)?;
        println!("kept the input volume at {}", copy.display());
    }
    let opts = DownsampleOptions {
        num_mips,
        write,
        slab_bytes: o.slab_bytes,
        ..Default::default()
    };
    let computes: Vec<(&str, Compute)> = if cpu {
        vec![("GPU", Compute::Gpu(ctx.clone())), ("CPU", Compute::Cpu)]
    } else {
        vec![("GPU", Compute::Gpu(ctx.clone()))]
    };
    for (name, compute) in computes {
        let report = downsample(compute, &vol, &opts).await?;
        print_report(
            &format!(
                "end-to-end {name}, uint8 {size:?} raw gzip {gzip_level}, {num_mips} mips (2,2,1)"
            ),
            &report,
        );
    }
    Ok(())
}

/// Copies a directory tree (a volume on local disk).
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// The EM-like image, made from one 32-plane block repeated along z (shifted so planes differ):
/// generating the full volume would take longer than the benchmark itself.
fn bench_volume(size: Vec3) -> Volume {
    let block = [size[0], size[1], size[2].min(32)];
    let (image, _) = em_like(block);
    let mut out = Volume::zeros(DataType::Uint8, size, 1);
    let mut z = 0;
    while z < size[2] {
        let n = block[2].min(size[2] - z);
        out.paste([0, 0, z], &image, [0; 3], [size[0], size[1], n]);
        z += n;
    }
    out
}

/// What `cuboids preview` draws.
pub struct PreviewOptions {
    /// The z of the section, in the voxel coordinates of `mip` (voxel_offset included).
    pub z: i64,
    pub mip: usize,
    /// An image volume drawn in grey under the segmentation (the same size at `mip`).
    pub image: Option<String>,
    /// The segmentation's weight over the image (0..1).
    pub alpha: f64,
}

/// One section of `mip` of a volume, as the volume's data (first channel) and its layer type.
async fn read_section(location: &str, mip: usize, z: i64) -> Result<(Volume, LayerType)> {
    let vol = crate::runtime::segmentation::open_input(location).await?;
    let scales = vol.info.scales.len();
    anyhow::ensure!(
        mip < scales,
        "{location}: --mip {mip}, but the volume has {scales} scale(s) (0..={})",
        scales - 1
    );
    let scale = vol.scale(mip);
    let (z0, depth) = (scale.voxel_offset[2], scale.size[2] as i64);
    anyhow::ensure!(
        (z0..z0 + depth).contains(&z),
        "{location}: --z {z} is outside scale {} ({}), whose z runs {z0}..{}",
        mip,
        scale.key,
        z0 + depth
    );
    let rel = (z - z0) as usize;
    let region = crate::geometry::Box3::new([0, 0, rel], [scale.size[0], scale.size[1], rel + 1]);
    let (section, _) = vol
        .read_region(mip, region, true)
        .await
        .with_context(|| format!("reading z {z} of {location} mip {mip}"))?;
    Ok((section, vol.info.layer_type))
}

/// `cuboids preview`: a PNG of one section, grey for an image, pseudo-colours for a
/// segmentation (over `image` when given).
pub async fn preview(location: &str, out: &Path, opts: &PreviewOptions) -> Result<()> {
    use crate::formats::preview::{encode_png, image_picture, segmentation_picture};
    let (section, layer) = read_section(location, opts.mip, opts.z).await?;
    let picture = match (&opts.image, layer) {
        (None, LayerType::Image) => image_picture(&section)?,
        (under, _) => {
            let image = match under {
                Some(image) => Some(read_section(image, opts.mip, opts.z).await?.0),
                None => None,
            };
            segmentation_picture(&section, image.as_ref(), opts.alpha)
                .with_context(|| format!("drawing {location} over {:?}", opts.image))?
        }
    };
    let png = encode_png(&picture)?;
    // Whole or not at all: a temporary file renamed into place.
    let temp = out.with_extension("png.tmp");
    std::fs::write(&temp, &png).with_context(|| format!("writing {}", temp.display()))?;
    std::fs::rename(&temp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
