//! Local entry points of `segment` and `connected-components`, and their benchmark.

use crate::dtype::DataType;
use crate::formats::precomputed::info::LayerType;
use crate::formats::precomputed::{Precomputed, WriteOptions};
use crate::geometry::{voxels, Box3, Vec3};
use crate::ops::connected_components::Connectivity;
use crate::ops::watershed::WatershedParams;
use crate::runtime::executor::Executor;
use crate::runtime::local::{gpu, new_info, run_demo_task, write_new_volume};
use crate::runtime::synthetic::{
    affinities_like, noisy_cell_affinities, probability_like, smooth_probability_like,
};
use crate::store::open_store;
use crate::task::segment::{
    connected_components, segment, ChunkOptions, ComponentsOptions, SegmentOptions, SegmentReport,
};
use crate::task::spec::{ChunkFields, ComponentsTask, SegmentTask, Task};
use crate::task::staged::{self, StagedWork};
use crate::volume::Volume;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// The precomputed volume at a directory or `s3://` location, with the location in errors.
pub(crate) async fn open_input(location: &str) -> Result<Precomputed> {
    let store = open_store(location)
        .await
        .with_context(|| format!("opening {location}"))?;
    Precomputed::open(store)
        .await
        .with_context(|| format!("opening {location}"))
}

pub fn print_report(what: &str, r: &SegmentReport) {
    for line in r.describe(what) {
        println!("{line}");
    }
}

/// Writes a float32 volume of `channels` channels (each Fortran-ordered) as a new precomputed
/// layer with 64^3 chunks.
pub async fn write_float_volume(
    dir: &Path,
    channels: &[&[f32]],
    shape: Vec3,
    write: WriteOptions,
) -> Result<Precomputed> {
    let mut info = new_info(
        LayerType::Image,
        DataType::Float32,
        shape,
        [64, 64, 64],
        [8.0, 8.0, 40.0],
    );
    info.num_channels = channels.len();
    let data: Vec<u8> = channels
        .iter()
        .flat_map(|c| bytemuck::cast_slice::<f32, u8>(c).iter().copied())
        .collect();
    let vol = Volume::from_bytes(DataType::Float32, shape, channels.len(), data)
        .context("channel sizes")?;
    write_new_volume(dir, info, &vol, write).await
}

/// The demo's affinity net (trained by models/train_demo_net.py on synthetic EM-like images far
/// from the demo's): embedded, so that the demo needs no file beside the binary.
const DEMO_MODEL: &[u8] = include_bytes!("../../models/em_affinities.onnx");

/// The demo's second half: the EM image's affinities inferred by the demo's trained net, then
/// segmented and scored against the ground truth; and the image's bright cells as connected
/// components.
pub async fn demo_segmentation(
    executor: &Executor,
    stop: &CancellationToken,
    dir: &Path,
    size: Vec3,
) -> Result<()> {
    let write = WriteOptions::default();
    let prob = smooth_probability_like(size);
    write_float_volume(&dir.join("probability"), &[&prob], size, write).await?;
    // A rerun replaces the demo's outputs (a task refuses an output made with other options).
    let fresh = |name: &str| -> Result<String> {
        let path = dir.join(name);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("clearing {}", path.display()))?;
        }
        Ok(path.display().to_string())
    };
    let location = |name: &str| dir.join(name).display().to_string();
    let model = dir.join("em_affinities.onnx");
    std::fs::write(&model, DEMO_MODEL).with_context(|| format!("writing {}", model.display()))?;
    let mut infer = crate::task::spec::InferTask::new(
        location("image"),
        model.display().to_string(),
        fresh("affinities")?,
    );
    // The net's patch is 64,64,16: an eighth of it each side overlaps (about 1.5x the patches).
    infer.overlap = [8, 8, 2];
    run_demo_task(executor, Task::Infer(infer), stop).await?;
    // Merging while the mean affinity is above 0.7 keeps the cells apart; 0.7 as `1 - mean`
    // (the benchmark's waterz setting) merges nearly every cell into one.
    let segment = SegmentTask::new(location("affinities"), fresh("affinity-segmentation")?, 0.3);
    run_demo_task(executor, Task::Segment(segment), stop).await?;
    let scores = evaluate(
        &location("affinity-segmentation"),
        &location("segmentation"),
        0,
    )
    .await?;
    println!(
        "affinity-segmentation against the ground truth: {}",
        scores.describe()
    );
    // Membranes are thin across z (40 nm sections): 6-connectivity and a threshold just under
    // the smoothed cells' level (~0.67) keep neighbouring cells apart.
    let cells = ComponentsTask {
        input: location("probability"),
        output: fresh("cells")?,
        threshold: 0.65,
        connectivity: Connectivity::Six,
        dust: 100,
        chunks: ChunkFields::default(),
    };
    run_demo_task(executor, Task::ConnectedComponents(cells), stop).await
}

/// Which synthetic affinity map `bench-segment` segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchAffinities {
    /// Smooth EM-like affinities (~30 voxels per fragment).
    EmLike,
    /// Voronoi cells, 0.85 inside and 0.15 across, Gaussian noise of sigma 0.06: millions of
    /// tiny fragments and region-graph edges (the hard case for the agglomeration).
    NoisyCells,
}

impl BenchAffinities {
    pub fn make(self, size: Vec3) -> crate::ops::watershed::Affinities {
        match self {
            BenchAffinities::EmLike => affinities_like(size),
            BenchAffinities::NoisyCells => noisy_cell_affinities(size, 0.85, 0.15, 0.06),
        }
    }
}

/// Which pipelines `bench-segment` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchPipeline {
    Segment,
    ConnectedComponents,
}

pub struct SegmentBenchOptions {
    pub size: Vec3,
    pub affinities: BenchAffinities,
    /// Only this pipeline (both when `None`).
    pub only: Option<BenchPipeline>,
    pub dir: Option<PathBuf>,
    /// A Python with waterz and cc3d: runs benches/segment_compare.py on the same data.
    pub python: Option<PathBuf>,
    /// GPU chunk core (the commands' default when `None`).
    pub chunk_size: Option<Vec3>,
    /// Also run each pipeline as a staged plan with blocks of this much host memory (MiB),
    /// every stage's tasks one after another in this process, and compare with the single run.
    pub staged_task_mib: Option<usize>,
    /// Keep the generated volumes and outputs (their folder is printed) instead of removing
    /// them: to run other tools, or staged plans task by task, on the same data.
    pub keep: bool,
}

/// benches/segment_compare.py: under the working directory when it is a checkout (the binary may
/// have been built elsewhere, e.g. carried to a GPU machine), else where the crate was built.
fn compare_script() -> PathBuf {
    let relative = Path::new("benches/segment_compare.py");
    if relative.is_file() {
        relative.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
    }
}

/// `cuboids bench-segment`: segment and connected components of a synthetic EM-like volume,
/// end to end (read, compute, write), in MVx/s; with `--python`, waterz and cc3d on the same
/// arrays and machine.
pub async fn bench_segment(o: SegmentBenchOptions) -> Result<()> {
    let ctx = gpu()?;
    println!(
        "adapter: {} ({:?})",
        ctx.adapter_info.name, ctx.adapter_info.device_type
    );
    let size = o.size;
    let temp = tempfile::Builder::new()
        .prefix("cuboids-bench-segment")
        .tempdir_in(o.dir.clone().unwrap_or_else(std::env::temp_dir))?;
    let t = Instant::now();
    let aff = o.affinities.make(size);
    let prob = probability_like(size);
    let write = WriteOptions { gzip_level: 0 };
    let channels: Vec<&[f32]> = aff.channels.iter().map(|c| c.as_slice()).collect();
    let aff_vol =
        write_float_volume(&temp.path().join("affinities"), &channels, size, write).await?;
    let prob_vol =
        write_float_volume(&temp.path().join("probability"), &[&prob], size, write).await?;
    println!(
        "synthetic {:?} affinities and EM-like probability map {size:?} written in {:.1} s",
        o.affinities,
        t.elapsed().as_secs_f64()
    );
    let mvx = voxels(size) as f64 / 1e6;
    let chunks = ChunkOptions {
        write,
        chunk_size: o.chunk_size,
        ..Default::default()
    };
    // The warm single-process times, which the staged runs are compared with.
    let (mut single_segment, mut single_components) = (None, None);
    for round in 0..2 {
        let note = if round == 0 {
            " (includes shader compilation)"
        } else {
            ""
        };
        if o.only != Some(BenchPipeline::ConnectedComponents) {
            let out = crate::store::LocalStore::new(temp.path().join(format!("seg{round}")));
            let opts = SegmentOptions {
                chunks: chunks.clone(),
                watershed: WatershedParams::default(),
                threshold: 0.7,
            };
            let r = segment(ctx.clone(), &aff_vol, std::sync::Arc::new(out), &opts).await?;
            print_report(&format!("cuboids segment{note}"), &r);
            single_segment = Some(r.wall);
        }
        if o.only != Some(BenchPipeline::Segment) {
            let out = crate::store::LocalStore::new(temp.path().join(format!("cc{round}")));
            let opts = ComponentsOptions {
                chunks: chunks.clone(),
                threshold: 0.5,
                connectivity: Connectivity::TwentySix,
                dust: 0,
            };
            let r = connected_components(ctx.clone(), &prob_vol, std::sync::Arc::new(out), &opts)
                .await?;
            print_report(&format!("cuboids connected-components (26){note}"), &r);
            single_components = Some(r.wall);
        }
    }
    if let Some(task_mib) = o.staged_task_mib {
        let fields = ChunkFields {
            bounds: None,
            chunk_size: o.chunk_size,
            output_chunk_size: None,
            fill_missing: false,
            gzip_level: 0,
            cache_mib: None,
        };
        if let Some(single) = single_segment {
            let task = SegmentTask {
                affinity: location_of(temp.path(), "affinities"),
                output: location_of(temp.path(), "seg-staged"),
                threshold: 0.7,
                aff_low: 0.001,
                aff_high: 0.9999,
                chunks: fields.clone(),
            };
            let ctx = Some(ctx.clone());
            let r = run_plan_in_process(&aff_vol, &task, task_mib, ctx, single).await?;
            compare_outputs(temp.path(), "seg1", "seg-staged").await?;
            println!("cuboids segment staged, in one process: {r}");
        }
        if let Some(single) = single_components {
            let task = ComponentsTask {
                input: location_of(temp.path(), "probability"),
                output: location_of(temp.path(), "cc-staged"),
                threshold: 0.5,
                connectivity: Connectivity::TwentySix,
                dust: 0,
                chunks: fields,
            };
            let ctx = Some(ctx.clone());
            let r = run_plan_in_process(&prob_vol, &task, task_mib, ctx, single).await?;
            compare_outputs(temp.path(), "cc1", "cc-staged").await?;
            println!("cuboids connected-components staged, in one process: {r}");
        }
    }
    if let Some(python) = o.python {
        let aff_path = temp.path().join("affinities.f32");
        let prob_path = temp.path().join("probability.f32");
        std::fs::write(
            &aff_path,
            channels
                .iter()
                .flat_map(|c| bytemuck::cast_slice::<f32, u8>(c).to_vec())
                .collect::<Vec<u8>>(),
        )?;
        std::fs::write(&prob_path, bytemuck::cast_slice::<f32, u8>(&prob))?;
        let script = compare_script();
        let out = Command::new(&python)
            .arg(&script)
            .arg(&aff_path)
            .arg(&prob_path)
            .arg(format!("{},{},{}", size[0], size[1], size[2]))
            .arg(match o.only {
                None => "both",
                Some(BenchPipeline::Segment) => "segment",
                Some(BenchPipeline::ConnectedComponents) => "connected-components",
            })
            .output()
            .with_context(|| format!("running {}", python.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // waterz also prints its progress on stdout: only the JSON lines are results.
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with('{'))
        {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let seconds = v["seconds"].as_f64().unwrap_or(f64::NAN);
            println!(
                "{} (same data, this machine): {:.2} s = {:.1} MVx/s",
                v["tool"].as_str().unwrap_or("?"),
                seconds,
                mvx / seconds
            );
        }
    }
    if o.keep {
        let kept = temp.keep();
        println!("data kept in {}", kept.display());
    }
    Ok(())
}

fn location_of(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

/// Runs every task of a staged plan of `task`, stage after stage, in this process; returns a
/// line with the total time, its ratio to the `single` run's and each stage's share.
async fn run_plan_in_process<W: StagedWork>(
    input: &Precomputed,
    task: &W,
    task_mib: usize,
    ctx: Option<std::sync::Arc<crate::gpu::GpuContext>>,
    single: std::time::Duration,
) -> Result<String> {
    let budget = staged::Budget {
        task_bytes: task_mib << 20,
        ..Default::default()
    };
    let (plan, stages) = staged::plan(input, task, &budget)?;
    let output = open_store(task.output()).await?;
    let start = Instant::now();
    let mut shares = Vec::new();
    for spec in &stages {
        let t = Instant::now();
        let mut name = String::new();
        // Each pass's time summed over the stage's tasks.
        let mut passes: Vec<(&str, f64)> = Vec::new();
        let mut merges = 0;
        for i in 0..spec.tasks {
            let report = match spec.task(&plan, i) {
                Task::SegmentStage(t) => {
                    name = t.stage_name();
                    staged::run_stage(&t, input, output.clone(), ctx.clone(), None).await?
                }
                Task::ConnectedComponentsStage(t) => {
                    name = t.stage_name();
                    staged::run_stage(&t, input, output.clone(), ctx.clone(), None).await?
                }
                other => bail!("not a stage task: {}", other.describe()),
            };
            merges += report.merges;
            for (pass, d) in report.passes {
                match passes.iter_mut().find(|p| p.0 == pass) {
                    Some(p) => p.1 += d.as_secs_f64(),
                    None => passes.push((pass, d.as_secs_f64())),
                }
            }
        }
        let passes: Vec<String> = passes
            .iter()
            .map(|(pass, s)| format!("{pass} {s:.2}"))
            .collect();
        let merges = if merges > 0 {
            format!(", {merges} merges")
        } else {
            String::new()
        };
        shares.push(format!(
            "{name} {:.2} s [{}]{merges}",
            t.elapsed().as_secs_f64(),
            passes.join(", ")
        ));
    }
    let wall = start.elapsed();
    Ok(format!(
        "{} blocks of {:?}: {:.2} s = {:.2}x the single process ({})",
        plan.blocks,
        plan.block_size,
        wall.as_secs_f64(),
        wall.as_secs_f64() / single.as_secs_f64(),
        shares.join(", ")
    ))
}

/// Fails unless two outputs under `dir` hold the same labels.
async fn compare_outputs(dir: &Path, a: &str, b: &str) -> Result<()> {
    let read = |name: &str| {
        let location = location_of(dir, name);
        async move {
            let vol = open_input(&location).await?;
            let whole = crate::geometry::Box3::from_shape(vol.scale(0).size);
            let (labels, _) = vol.read_region_cached(0, whole, false, None).await?;
            anyhow::Ok(labels)
        }
    };
    if read(a).await?.data != read(b).await?.data {
        bail!("{b} differs from {a}: the staged run is not the single run's labels");
    }
    Ok(())
}

/// `cuboids evaluate`: the VOI and adapted Rand error of `segmentation` against `truth` at `mip`,
/// read one slab of chunks at a time (memory grows with the label pairs, not the volume).
pub async fn evaluate(
    segmentation: &str,
    truth: &str,
    mip: usize,
) -> Result<crate::ops::evaluate::Evaluation> {
    let (test, gt) = (open_input(segmentation).await?, open_input(truth).await?);
    for (vol, location) in [(&test, segmentation), (&gt, truth)] {
        if mip >= vol.info.scales.len() {
            bail!("{location} has no mip {mip}");
        }
        let unsigned = matches!(
            vol.info.data_type,
            DataType::Uint8 | DataType::Uint16 | DataType::Uint32 | DataType::Uint64
        );
        if !unsigned || vol.info.num_channels != 1 {
            bail!(
                "{location} holds {} x {} channels: evaluate compares one channel of labels \
                 (uint8 to uint64)",
                vol.info.data_type,
                vol.info.num_channels
            );
        }
    }
    let size = test.scale(mip).size;
    if gt.scale(mip).size != size {
        bail!(
            "{segmentation} is {size:?} voxels at mip {mip}, {truth} {:?}",
            gt.scale(mip).size
        );
    }
    let slab = gt.scale(mip).chunk_size()[2];
    let mut table = crate::ops::evaluate::Contingency::default();
    for z in (0..size[2]).step_by(slab) {
        let region = Box3::new([0, 0, z], [size[0], size[1], (z + slab).min(size[2])]);
        let read = |vol: &Precomputed, location: &str| {
            let vol = vol.clone();
            let location = location.to_string();
            async move {
                let (v, _) = vol
                    .read_region(mip, region, false)
                    .await
                    .with_context(|| format!("reading {location}"))?;
                Ok::<_, anyhow::Error>(labels_as_u64(&v))
            }
        };
        let (a, b) = tokio::try_join!(read(&test, segmentation), read(&gt, truth))?;
        table.add(&b, &a);
    }
    table
        .evaluate()
        .with_context(|| format!("{truth} has no labelled voxel (all 0) at mip {mip}"))
}

/// A one-channel unsigned integer volume's values, widened.
fn labels_as_u64(vol: &Volume) -> Vec<u64> {
    let width = vol.dtype.size();
    vol.data
        .chunks_exact(width)
        .map(|b| {
            let mut word = [0u8; 8];
            word[..width].copy_from_slice(b);
            u64::from_le_bytes(word)
        })
        .collect()
}
