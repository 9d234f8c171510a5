//! Command-line interface: parses arguments and hands off to the runtimes. The only place that
//! uses `anyhow`, so errors print with their whole chain.

use crate::ops::downsample::{Factor, Method};
use crate::runtime::activity::WorkerOptions;
use crate::runtime::batch::{SubmitOptions, TaskSource};
use crate::runtime::{local, segmentation};
use crate::task::downsample::Bounds;
use crate::task::spec::{
    ChunkFields, ComponentsTask, DownsampleTask, SegmentTask, Task, DEFAULT_TASK_MIB,
};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "cuboids",
    version,
    about = "GPU resolution pyramids of neuroscience volumes (WGSL/wgpu)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the GPU adapter cuboids would use and its limits.
    Info,
    /// Add downsampled mips to a precomputed volume (local directory or s3://bucket/prefix).
    Downsample {
        /// The precomputed volume: a directory holding `info`, or s3://bucket/prefix.
        location: String,
        #[command(flatten)]
        args: DownsampleArgs,
        /// Run the CPU reference implementation instead of the GPU.
        #[arg(long)]
        cpu: bool,
    },
    /// Split work into task documents (JSON lines) for `batch`, `worker` or `run-task`.
    Plan {
        #[command(subcommand)]
        what: PlanCommand,
    },
    /// Run one task document (a file, an s3:// object, or - for stdin); prints its output document.
    RunTask { task: String },
    /// The AWS Lambda entrypoint: each invocation's payload is a task document (as for
    /// run-task), its result the output document, a failure a function error typed with the
    /// failure's name (cuboids.InvalidTask, ...). Reads AWS_LAMBDA_RUNTIME_API as Lambda sets it.
    Lambda,
    /// A Step Functions activity worker: polls the activity and runs the task documents it gets.
    Worker {
        #[arg(long)]
        activity_arn: String,
        /// Tasks run at once (a poll is made only while one is free).
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Seconds between heartbeats of a running task (below the state's HeartbeatSeconds).
        #[arg(long, default_value_t = 20.0)]
        heartbeat_seconds: f64,
        /// Seconds running tasks get to finish after SIGTERM/SIGINT before they are stopped and
        /// failed as cuboids.Interrupted (retryable).
        #[arg(long, default_value_t = 25.0)]
        grace_seconds: f64,
        /// Name reported to GetActivityTask (default: host name and process id).
        #[arg(long)]
        worker_name: Option<String>,
        /// Exit (status 0) once no task has run for this many seconds: how a fleet scales in
        /// without stopping a running task (the instance then leaves its Auto Scaling group).
        /// Default: poll until stopped.
        #[arg(long)]
        idle_exit_seconds: Option<f64>,
    },
    /// The AWS Batch entrypoint: runs task AWS_BATCH_JOB_ARRAY_INDEX + offset of a manifest, or
    /// the task given. Exit codes: 0 done, 75 retryable failure, 65 permanent failure.
    Batch {
        /// Manifest of task documents (JSON lines), local or s3://.
        #[arg(long, conflicts_with = "task", required_unless_present = "task")]
        manifest: Option<String>,
        /// Added to AWS_BATCH_JOB_ARRAY_INDEX (manifests over 10,000 tasks span several jobs).
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// A task document: inline JSON, a file or an s3:// object.
        #[arg(long)]
        task: Option<String>,
    },
    /// Submit a manifest to AWS Batch as array jobs (one per 10,000 tasks).
    Submit {
        #[arg(long)]
        manifest: String,
        #[arg(long)]
        job_queue: String,
        #[arg(long)]
        job_definition: String,
        #[arg(long, default_value = "cuboids")]
        job_name: String,
    },
    /// One step of the Boss resolution hierarchy (the DownsampleChannel activity) on the GPU:
    /// reads the job document, writes cuboids and index entries, prints the next document.
    BossDownsample {
        /// The DownsampleChannel input document (JSON).
        #[arg(long)]
        job: PathBuf,
        /// Run every remaining resolution in this process, reading each level from memory:
        /// output cuboids stay on the GPU for the next level where they fit.
        #[arg(long)]
        all_levels: bool,
        /// Memory for cuboids kept between levels with --all-levels, in MiB (GPU memory first,
        /// then as much again in host memory).
        #[arg(long, default_value_t = 4096)]
        cache_mib: usize,
    },
    /// Segment an affinity map (3 channels x, y, z; float32 or uint8) chunkflow-style on the GPU:
    /// watershed, region graph, mean-affinity agglomeration, into a uint64
    /// compressed_segmentation layer. Chunked runs leave no seams.
    Segment {
        #[command(flatten)]
        args: SegmentArgs,
    },
    /// ConvNet inference (chunkflow's Inferencer): an image layer through an ONNX model,
    /// patch by patch on one global grid with 'wu' or 'zung' blending, into a new float32
    /// layer of the model's output channels (affinities x, y, z for `segment`), on the GPU
    /// (WGSL kernels; lavapipe where there is no GPU).
    Infer {
        #[command(flatten)]
        args: InferArgs,
    },
    /// Thresholded connected components (cc3d semantics: value > threshold) into a uint64
    /// compressed_segmentation layer, labels 1..N by first voxel.
    ConnectedComponents {
        #[command(flatten)]
        args: ComponentsArgs,
    },
    /// How far a segmentation is from a ground truth: variation of information (split and
    /// merge, in bits) and adapted Rand error, as scikit-image computes them (voxels whose truth
    /// is 0 not counted), read a slab of chunks at a time.
    Evaluate {
        /// The segmentation to score: a directory holding `info`, or s3://bucket/prefix.
        segmentation: String,
        /// The ground truth, of the same size at --mip.
        #[arg(long)]
        truth: String,
        #[arg(long, default_value_t = 0)]
        mip: usize,
    },
    /// Measure segment and connected-components throughput (MVx/s) on a synthetic EM-like
    /// volume; with --python, waterz and cc3d on the same data.
    BenchSegment {
        #[arg(long, default_value = "512,512,128", value_parser = parse_vec3)]
        size: [usize; 3],
        /// The synthetic affinity map to segment.
        #[arg(long, value_enum, default_value = "em-like")]
        affinities: segmentation::BenchAffinities,
        /// Run only this pipeline (and its peer with --python).
        #[arg(long, value_enum)]
        only: Option<segmentation::BenchPipeline>,
        #[arg(long)]
        dir: Option<PathBuf>,
        /// A Python with waterz and connected-components-3d installed.
        #[arg(long)]
        python: Option<PathBuf>,
        /// Core of each GPU chunk x,y,z (the commands' default when not given).
        #[arg(long, value_parser = parse_vec3)]
        chunk_size: Option<[usize; 3]>,
        /// Also run each pipeline as a staged plan (blocks of this much host memory, MiB), all
        /// its tasks in this process, checked equal to the single run, and print the time ratio.
        #[arg(long)]
        staged_task_mib: Option<usize>,
        /// Keep the generated volumes and outputs (the folder is printed).
        #[arg(long)]
        keep: bool,
    },
    /// Make a small synthetic EM image and segmentation under DIR and downsample both.
    Demo {
        #[arg(long, default_value = "demo-data")]
        dir: PathBuf,
        /// Volume size x,y,z.
        #[arg(long, default_value = "512,512,64", value_parser = parse_vec3)]
        size: [usize; 3],
    },
    /// Serve volumes over HTTP (with CORS) on this machine and print a neuroglancer link that
    /// shows them; Ctrl-C stops.
    View {
        /// Precomputed volumes: directories holding `info`, or s3://bucket/prefix.
        #[arg(required = true)]
        volumes: Vec<String>,
        /// 0: any free port.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
    },
    /// Write a PNG of one z-section: grey for an image, stable pseudo-colours for a
    /// segmentation, optionally over an image.
    Preview {
        /// The precomputed volume: a directory holding `info`, or s3://bucket/prefix.
        volume: String,
        /// The section's z, in the voxel coordinates of --mip (voxel_offset included).
        #[arg(long)]
        z: i64,
        #[arg(long, default_value_t = 0)]
        mip: usize,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
        /// An image volume to draw under the segmentation (same size at --mip).
        #[arg(long)]
        image: Option<String>,
        /// The segmentation's opacity over --image.
        #[arg(long, default_value_t = 0.5)]
        alpha: f64,
    },
    /// Measure end-to-end and kernel throughput (MVx/s) on a synthetic uint8 volume.
    Bench {
        #[arg(long, default_value = "1024,1024,128", value_parser = parse_vec3)]
        size: [usize; 3],
        #[arg(long, default_value_t = 4)]
        num_mips: u32,
        /// gzip level of input and output chunks (0 = uncompressed).
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(0..=9))]
        gzip_level: u32,
        /// Also time the CPU reference implementation.
        #[arg(long)]
        cpu: bool,
        /// Where to put the temporary volume (default: the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the input volume (mip 0 only) at DIR/image for comparisons with other tools.
        #[arg(long, requires = "dir")]
        keep: bool,
        /// Largest GPU slab in MiB (default: 16 on lavapipe, else the binding limit up to 256).
        #[arg(long)]
        slab_mib: Option<u64>,
    },
}

/// Options of a downsample run, shared by `downsample` and `plan downsample`.
#[derive(clap::Args)]
struct DownsampleArgs {
    /// Source mip to read.
    #[arg(long, default_value_t = 0)]
    mip: usize,
    /// Number of mips to compute from one read.
    #[arg(long, default_value_t = 1)]
    num_mips: u32,
    /// Downsampling factor: 2,2,1 (anisotropic) or 2,2,2 (isotropic).
    #[arg(long, default_value = "2,2,1", value_parser = parse_factor)]
    factor: Factor,
    /// Absolute voxel bounds at the source mip: x0,y0,z0,x1,y1,z1 (rounded out to whole chunks).
    #[arg(long, value_parser = parse_bounds)]
    bounds: Option<Bounds>,
    /// Read missing chunks as zeros instead of failing.
    #[arg(long)]
    fill_missing: bool,
    /// Pooling method; default: average for images, mode for segmentation.
    #[arg(long, value_enum)]
    method: Option<MethodArg>,
    /// gzip level of written chunks (0 = uncompressed).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(0..=9))]
    gzip_level: u32,
    /// Skip tiles whose output chunks all exist (finishing a partial run).
    #[arg(long)]
    skip_existing: bool,
    /// Write the new mips as sharded scales (neuroglancer_uint64_sharded_v1), sharded as
    /// igneous shards them; runs on the whole volume (or bounds that hold whole shards).
    #[arg(long)]
    sharded: bool,
}

impl DownsampleArgs {
    fn task(&self, location: String) -> DownsampleTask {
        DownsampleTask {
            location,
            mip: self.mip,
            num_mips: self.num_mips,
            factor: self.factor,
            bounds: self.bounds,
            fill_missing: self.fill_missing,
            method: self.method.map(|m| match m {
                MethodArg::Average => Method::Average,
                MethodArg::Mode => Method::Mode,
            }),
            gzip_level: self.gzip_level,
            skip_existing: self.skip_existing,
            tile_mib: None,
            cpu: false,
            sharded: self.sharded,
            shard_source_mib: None,
        }
    }
}

/// `segment`'s options, also those of its plan.
#[derive(clap::Args)]
struct SegmentArgs {
    /// The affinity map (precomputed, local or s3://).
    #[arg(long)]
    affinity: String,
    /// The output segmentation layer (created; an existing one must match).
    #[arg(long)]
    output: String,
    /// Merge while 1 - mean affinity < threshold.
    #[arg(long, default_value_t = 0.7)]
    threshold: f64,
    /// Voxels whose strongest edge is at most this are background.
    #[arg(long, default_value_t = 0.001)]
    aff_low: f32,
    /// Edges at least this strong always join.
    #[arg(long, default_value_t = 0.9999)]
    aff_high: f32,
    #[command(flatten)]
    chunks: ChunkArgs,
}

impl SegmentArgs {
    fn task(self) -> SegmentTask {
        SegmentTask {
            affinity: self.affinity,
            output: self.output,
            threshold: self.threshold,
            aff_low: self.aff_low,
            aff_high: self.aff_high,
            chunks: self.chunks.fields(),
        }
    }
}

/// `infer`'s options.
#[derive(clap::Args)]
struct InferArgs {
    /// The image layer (precomputed, local or s3://); integers are divided by their type's
    /// largest value (uint8 / 255), floats used as they are.
    #[arg(long)]
    image: String,
    /// The ONNX model (a file or s3:// object); its input is N, C, z, y, x.
    #[arg(long)]
    model: String,
    /// The new float32 layer (must not exist).
    #[arg(long)]
    output: String,
    #[arg(long, default_value_t = 0)]
    mip: usize,
    /// Input patch x,y,z (default: the model's static input shape).
    #[arg(long, value_parser = parse_vec3)]
    patch: Option<[usize; 3]>,
    /// Overlap of neighbouring output patches, x,y,z.
    #[arg(long, default_value = "64,64,4", value_parser = parse_vec3)]
    overlap: [usize; 3],
    /// Output patch x,y,z: default the model's output for the input patch (smaller for
    /// valid-padding nets); smaller still crops it around its centre.
    #[arg(long, value_parser = parse_vec3)]
    output_patch: Option<[usize; 3]>,
    /// The bump that weighs each patch's voxels: wu (chunkflow) or zung (DeepEM).
    #[arg(long, value_enum, default_value_t = crate::infer::blend::Bump::Wu)]
    blend: crate::infer::blend::Bump,
    /// Keep the model's first N output channels (default all).
    #[arg(long)]
    channels: Option<usize>,
    /// Missing image chunks are zeros instead of an error.
    #[arg(long)]
    fill_missing: bool,
    /// Run the CPU reference operators (slow; for checking): --engine reference.
    #[arg(long)]
    cpu: bool,
    /// The executor: auto (the GPU, or native where the adapter is lavapipe), gpu (WGSL),
    /// native (convolutions as matrix products on the CPU's cores), reference.
    #[arg(long, value_enum, default_value_t = crate::infer::Engine::Auto)]
    engine: crate::infer::Engine,
    /// What the net computes in: float16 rounds the weights, the input and every tensor the
    /// net makes to half precision (sums in float32), as a GPU with fp16 storage does; the
    /// blending and the layer stay float32.
    #[arg(long, value_enum, default_value_t = crate::infer::Precision::Float32)]
    dtype: crate::infer::Precision,
    /// Host memory in MiB, fixed part included (about 230 MiB on lavapipe, plus the model's
    /// weights and a patch's activations): the output is made in columns of whole chunks, as
    /// large as fit, each streamed up z, so memory does not grow with the volume.
    #[arg(long, default_value_t = DEFAULT_TASK_MIB)]
    task_mib: usize,
    /// Columns of x,y output voxels (whole chunks) instead of the largest within --task-mib.
    #[arg(long, value_parser = parse_vec2)]
    column: Option<[usize; 2]>,
    /// Write uint8, round(255 · clamp(v, 0, 1)), instead of float32 (a quarter of the bytes;
    /// `segment` reads it as v / 255).
    #[arg(long)]
    quantize: bool,
}

impl InferArgs {
    fn task(self) -> crate::task::spec::InferTask {
        crate::task::spec::InferTask {
            image: self.image,
            model: self.model,
            output: self.output,
            mip: self.mip,
            patch: self.patch,
            overlap: self.overlap,
            output_patch: self.output_patch,
            blend: self.blend,
            channels: self.channels,
            fill_missing: self.fill_missing,
            gzip_level: 6,
            cpu: self.cpu,
            engine: self.engine,
            dtype: self.dtype,
            task_mib: self.task_mib,
            column: self.column,
            bounds: None,
            finalize: false,
            quantize: self.quantize,
        }
    }
}

/// `connected-components`' options, also those of its plan.
#[derive(clap::Args)]
struct ComponentsArgs {
    /// The probability map (precomputed, one channel, local or s3://).
    #[arg(long)]
    input: String,
    #[arg(long)]
    output: String,
    #[arg(long)]
    threshold: f64,
    /// 6, 18 or 26.
    #[arg(long, default_value = "26")]
    connectivity: crate::ops::connected_components::Connectivity,
    /// Remove components smaller than this many voxels.
    #[arg(long, default_value_t = 0)]
    dust: u64,
    #[command(flatten)]
    chunks: ChunkArgs,
}

impl ComponentsArgs {
    fn task(self) -> ComponentsTask {
        ComponentsTask {
            input: self.input,
            output: self.output,
            threshold: self.threshold,
            connectivity: self.connectivity,
            dust: self.dust,
            chunks: self.chunks.fields(),
        }
    }
}

/// How `segment` and `connected-components` cut the volume into GPU chunks.
#[derive(clap::Args)]
struct ChunkArgs {
    /// Absolute voxel bounds x0,y0,z0,x1,y1,z1 on the output chunk grid (default: everything).
    #[arg(long, value_parser = parse_bounds)]
    bounds: Option<Bounds>,
    /// Voxels per GPU chunk x,y,z, rounded up to whole output chunks (default: up to
    /// 256,256,64, as the adapter allows). Results do not depend on it.
    #[arg(long, value_parser = parse_vec3)]
    chunk_size: Option<[usize; 3]>,
    /// Chunk size of the output layer (default: the input's).
    #[arg(long, value_parser = parse_vec3)]
    output_chunk_size: Option<[usize; 3]>,
    /// Read missing input chunks as zeros instead of failing.
    #[arg(long)]
    fill_missing: bool,
    /// gzip level of written chunks (0 = uncompressed).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(0..=9))]
    gzip_level: u32,
    /// Memory for decoded input chunks, in MiB: chunk margins and the second pass over the
    /// affinities read from it instead of fetching chunks again [default: 1024]. Left out of the
    /// task when not given, so that the CLI and a task document plan the same work alike.
    #[arg(long)]
    cache_mib: Option<usize>,
}

impl ChunkArgs {
    /// The same fields as a task document has them, so both convert to options in one place.
    fn fields(self) -> ChunkFields {
        ChunkFields {
            bounds: self.bounds,
            chunk_size: self.chunk_size,
            output_chunk_size: self.output_chunk_size,
            fill_missing: self.fill_missing,
            gzip_level: self.gzip_level,
            cache_mib: self.cache_mib,
        }
    }
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Downsample tasks that together cover the volume (or --bounds), each writing whole output
    /// chunks no other task writes; a pyramid deeper than a task within --task-mib reaches is
    /// planned in stages (mips 1-4, then 5-8 from mip 4, ...), each from the last mip written.
    Downsample {
        location: String,
        #[command(flatten)]
        args: DownsampleArgs,
        /// Host memory per task, in MiB, on top of the fixed part (about 230 MiB on lavapipe):
        /// it sets the tiles (a third of it, at most) and so how many mips a stage can add;
        /// also the most source a task covers.
        #[arg(long, default_value_t = DEFAULT_TASK_MIB)]
        task_mib: usize,
        /// The longest a task should take, in seconds (at 50 MB of source a second): bounds
        /// the source a task covers, e.g. 600 for Lambda's 15 minutes.
        #[arg(long)]
        task_seconds: Option<f64>,
        /// Where to write the manifest of a plan of one stage (a file or s3:// object); default:
        /// stdout.
        #[arg(long, conflicts_with = "manifests")]
        output: Option<String>,
        /// With --manifests: where every stage runs (lambda, batch or activity); default each
        /// stage on Lambda where its largest task fits Lambda's limits with a margin (75% of 10 GB
        /// and of 15 minutes), on Batch otherwise. Forcing lambda on a stage that cannot fit fails
        /// the plan, naming the stage.
        #[arg(long, value_enum)]
        runner: Option<crate::task::route::Runner>,
        /// Write a manifest per stage to PREFIX<stage>.jsonl (`mips-1-4`, ...) and print the
        /// stages as JSON (what batch/statemachines/segment.asl.json runs in order).
        #[arg(long)]
        manifests: Option<String>,
        /// Print each stage's tasks and the memory and time of its largest task; write nothing.
        #[arg(long)]
        estimate: bool,
        /// With --estimate: a hypothetical size x,y,z of the source mip.
        #[arg(long, value_parser = parse_vec3, requires = "estimate")]
        shape: Option<[usize; 3]>,
    },
    /// Segment in stages past one machine, no task holding more than its block or its part of
    /// the block grid: block tasks (GPU: watershed and region graph), link, union and down
    /// levels (fragments across blocks), round and resolve levels (agglomeration over groups of
    /// 2^l blocks per axis), numbering scans, rank, relabel, finalize. Run each stage's tasks
    /// (in any order) before the next stage's; the output equals a single-process run's, voxel
    /// for voxel.
    Segment {
        #[command(flatten)]
        args: SegmentArgs,
        #[command(flatten)]
        staged: StagedArgs,
        /// Manifests are written to PREFIX<stage>.jsonl for each stage (block, link,
        /// union-<level>..., down-<level>..., round-<level>..., resolve-<level>...,
        /// scan-<axis>-<level>..., rank, relabel, finalize; a path or s3:// prefix; end it with
        /// / for a folder), and the stages printed as JSON; default: every task on stdout, stage
        /// after stage.
        #[arg(long)]
        manifests: Option<String>,
    },
    /// Inference in tasks of bounded memory on one global patch grid: columns of whole output
    /// chunks as large as --task-mib holds (each task reads the halo its patches need, so the
    /// output equals one process's byte for byte), cut along z where --task-seconds bounds
    /// them; then one finalize task writes the info. Run the infer stage's tasks (any order)
    /// before finalize.
    Infer {
        #[command(flatten)]
        args: InferArgs,
        /// The longest a task should run, in seconds at --gflops.
        #[arg(long)]
        task_seconds: Option<f64>,
        /// The engine's effective GFLOP/s (what `cuboids infer` prints) that task times are
        /// reckoned at.
        #[arg(long, default_value_t = crate::task::infer::DEFAULT_GFLOPS)]
        gflops: f64,
        /// With --manifests: where every stage runs (lambda, batch or activity); default each
        /// stage on Lambda where its largest task fits Lambda's limits with a margin (75% of 10 GB
        /// and of 15 minutes), on Batch otherwise. Forcing lambda on a stage that cannot fit fails
        /// the plan, naming the stage.
        #[arg(long, value_enum)]
        runner: Option<crate::task::route::Runner>,
        /// Manifests go to PREFIX<stage>.jsonl (infer, finalize; a path or s3:// prefix) and
        /// the stages are printed as JSON; default: every task on stdout, stage after stage.
        #[arg(long)]
        manifests: Option<String>,
        /// Print the tasks, their memory, patches and time, and write nothing.
        #[arg(long)]
        estimate: bool,
        /// With --estimate: a hypothetical size x,y,z of the image (same chunks and type).
        #[arg(long, value_parser = parse_vec3, requires = "estimate")]
        shape: Option<[usize; 3]>,
    },
    /// Connected components in stages past one machine, no task holding more than its block or
    /// its part of the block grid: block tasks (GPU), link, union and down levels, numbering
    /// scans, rank, relabel, finalize. Run each stage's tasks (in any order) before the next
    /// stage's; the output equals a single-process run's, voxel for voxel.
    ConnectedComponents {
        #[command(flatten)]
        args: ComponentsArgs,
        #[command(flatten)]
        staged: StagedArgs,
        /// Manifests are written to PREFIX<stage>.jsonl for each stage (block, link,
        /// union-<level>..., down-<level>..., scan-<axis>-<level>..., rank, relabel, finalize; a
        /// path or s3:// prefix; end it with / for a folder), and the stages printed as JSON;
        /// default: every task on stdout, stage after stage.
        #[arg(long)]
        manifests: Option<String>,
    },
}

/// How a staged plan is sized, and whether only to estimate it.
#[derive(clap::Args)]
struct StagedArgs {
    /// With --manifests: where every stage runs (lambda, batch or activity); default each
    /// stage on Lambda where its largest task fits Lambda's limits with a margin (75% of 10 GB
    /// and of 15 minutes), on Batch otherwise. Forcing lambda on a stage that cannot fit fails
    /// the plan, naming the stage.
    #[arg(long, value_enum)]
    runner: Option<crate::task::route::Runner>,
    /// Host memory per task, in MiB, on top of the fixed part of the process (about 20 MiB, and
    /// 130 MiB for block tasks on lavapipe): the GPU chunk, the input cache and the blocks are
    /// chosen so that every per-block task stays within it, and the plan fails, naming the
    /// budget that would do, where a task could not.
    #[arg(long, default_value_t = DEFAULT_TASK_MIB)]
    task_mib: usize,
    /// Blocks of x,y,z voxels (whole GPU chunks and output chunks) instead of the largest
    /// near-cubic ones within --task-mib (which still must hold them).
    #[arg(long, value_parser = parse_vec3)]
    block_size: Option<[usize; 3]>,
    /// Fan-in of the numbering's prefix sums (default: what --task-mib allows).
    #[arg(long)]
    scan_fan_in: Option<usize>,
    /// Print, per stage, the task count and the memory and time of the largest task, and
    /// write nothing.
    #[arg(long)]
    estimate: bool,
    /// With --estimate: a hypothetical region of x,y,z voxels in place of the input's (same
    /// chunks, data type and resolution).
    #[arg(long, value_parser = parse_vec3, requires = "estimate")]
    shape: Option<[usize; 3]>,
}

impl StagedArgs {
    fn budget(&self) -> crate::task::staged::Budget {
        crate::task::staged::Budget {
            task_bytes: self.task_mib.saturating_mul(1 << 20),
            block: self.block_size,
            fan_in: self.scan_fan_in,
            ..Default::default()
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    Average,
    Mode,
}

fn parse_list(s: &str, n: usize) -> Result<Vec<i64>, String> {
    let v: Result<Vec<i64>, _> = s.split(',').map(|p| p.trim().parse::<i64>()).collect();
    match v {
        Ok(v) if v.len() == n => Ok(v),
        _ => Err(format!("expected {n} comma-separated integers, got {s:?}")),
    }
}

fn parse_vec3(s: &str) -> Result<[usize; 3], String> {
    let v = parse_list(s, 3)?;
    if v.iter().any(|&x| x <= 0) {
        return Err(format!("sizes must be positive, got {s:?}"));
    }
    Ok([v[0] as usize, v[1] as usize, v[2] as usize])
}

fn parse_vec2(s: &str) -> Result<[usize; 2], String> {
    let v = parse_list(s, 2)?;
    if v.iter().any(|&x| x <= 0) {
        return Err(format!("sizes must be positive, got {s:?}"));
    }
    Ok([v[0] as usize, v[1] as usize])
}

fn parse_factor(s: &str) -> Result<Factor, String> {
    Factor::new(parse_vec3(s)?).map_err(|e| e.to_string())
}

fn parse_bounds(s: &str) -> Result<Bounds, String> {
    let v = parse_list(s, 6)?;
    let b = Bounds {
        start: [v[0], v[1], v[2]],
        stop: [v[3], v[4], v[5]],
    };
    if (0..3).any(|i| b.stop[i] <= b.start[i]) {
        return Err(format!(
            "bounds {s:?}: each stop must be greater than its start"
        ));
    }
    Ok(b)
}

/// Logs on stderr: readable text on a terminal, JSON lines otherwise (CloudWatch, Batch, ECS);
/// `CUBOIDS_LOG_FORMAT=text|json` overrides.
fn init_logging() {
    use std::io::IsTerminal;
    let json = match std::env::var("CUBOIDS_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    // At a terminal the command prints the task's report and failure itself; the executor's
    // own lines (task done, task failed) would say the same twice.
    let default = if json {
        "warn,cuboids=info,aws_config=error"
    } else {
        "warn,cuboids=info,cuboids::runtime::executor=error,aws_config=error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().with_current_span(true).init();
    } else {
        builder.init();
    }
}

pub fn main() -> ExitCode {
    // Before any thread starts (it sets an environment variable).
    crate::gpu::context::give_vulkan_a_runtime_dir();
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let done = |r: Result<()>| r.map(|()| ExitCode::SUCCESS);
    match cli.command {
        Command::Info => {
            let ctx = local::gpu()?;
            println!("{}", ctx.describe());
            Ok(ExitCode::SUCCESS)
        }
        Command::Downsample {
            location,
            args,
            cpu,
        } => {
            let dir = std::path::Path::new(location.trim_start_matches("file://"));
            if !location.starts_with("s3://") && !dir.is_dir() {
                bail!(
                    "{location} is not a directory holding a precomputed volume (nor an s3:// URL)"
                );
            }
            let mut task = args.task(location);
            task.cpu = cpu;
            runtime.block_on(local::run_command(Task::Downsample(task)))
        }
        Command::Plan {
            what:
                PlanCommand::Downsample {
                    location,
                    args,
                    task_mib,
                    task_seconds,
                    output,
                    runner,
                    manifests,
                    estimate,
                    shape,
                },
        } => done(runtime.block_on(local::plan_downsample(
            args.task(location),
            crate::task::pyramid::PyramidBudget {
                task_bytes: task_mib.saturating_mul(1 << 20),
                seconds: task_seconds,
            },
            output.as_deref(),
            manifests.as_deref(),
            runner,
            estimate.then_some(shape),
        ))),
        Command::Plan {
            what:
                PlanCommand::Infer {
                    args,
                    task_seconds,
                    gflops,
                    runner,
                    manifests,
                    estimate,
                    shape,
                },
        } => {
            let budget = crate::task::infer::InferBudget {
                task_bytes: args.task_mib.saturating_mul(1 << 20),
                seconds: task_seconds,
                gflops,
            };
            done(runtime.block_on(local::plan_infer(
                args.task(),
                budget,
                manifests.as_deref(),
                runner,
                estimate.then_some(shape),
            )))
        }
        Command::Plan {
            what:
                PlanCommand::ConnectedComponents {
                    args,
                    staged,
                    manifests,
                },
        } => done(runtime.block_on(local::plan_staged(
            args.task(),
            staged.budget(),
            manifests.as_deref(),
            staged.runner,
            staged.estimate.then_some(staged.shape),
        ))),
        Command::Plan {
            what:
                PlanCommand::Segment {
                    args,
                    staged,
                    manifests,
                },
        } => done(runtime.block_on(local::plan_staged(
            args.task(),
            staged.budget(),
            manifests.as_deref(),
            staged.runner,
            staged.estimate.then_some(staged.shape),
        ))),
        Command::RunTask { task } => runtime.block_on(local::run_task(&task)),
        Command::Lambda => done(runtime.block_on(crate::runtime::lambda::lambda())),
        Command::Worker {
            activity_arn,
            concurrency,
            heartbeat_seconds,
            grace_seconds,
            worker_name,
            idle_exit_seconds,
        } => {
            let opts = WorkerOptions {
                activity_arn,
                worker_name: worker_name.unwrap_or_else(default_worker_name),
                concurrency,
                heartbeat: Duration::try_from_secs_f64(heartbeat_seconds)
                    .context("--heartbeat-seconds")?,
                grace: Duration::try_from_secs_f64(grace_seconds).context("--grace-seconds")?,
                idle_exit: idle_exit_seconds
                    .map(Duration::try_from_secs_f64)
                    .transpose()
                    .context("--idle-exit-seconds")?,
            };
            done(runtime.block_on(local::worker(opts)))
        }
        Command::Batch {
            manifest,
            offset,
            task,
        } => {
            let source = match (manifest, task) {
                (Some(location), _) => TaskSource::Manifest { location, offset },
                (None, Some(task)) => TaskSource::Task(task),
                (None, None) => bail!("give --manifest or --task"),
            };
            runtime.block_on(local::batch(&source))
        }
        Command::Submit {
            manifest,
            job_queue,
            job_definition,
            job_name,
        } => done(runtime.block_on(local::submit(SubmitOptions {
            manifest,
            job_queue,
            job_definition,
            job_name,
        }))),
        Command::Segment { args } => {
            runtime.block_on(local::run_command(Task::Segment(args.task())))
        }
        Command::ConnectedComponents { args } => {
            runtime.block_on(local::run_command(Task::ConnectedComponents(args.task())))
        }
        Command::Infer { args } => runtime.block_on(local::run_command(Task::Infer(args.task()))),
        Command::BenchSegment {
            size,
            affinities,
            only,
            dir,
            python,
            chunk_size,
            staged_task_mib,
            keep,
        } => done(runtime.block_on(segmentation::bench_segment(
            segmentation::SegmentBenchOptions {
                size,
                affinities,
                only,
                dir,
                python,
                chunk_size,
                staged_task_mib,
                keep,
            },
        ))),
        Command::Evaluate {
            segmentation,
            truth,
            mip,
        } => done(runtime.block_on(async {
            let e = segmentation::evaluate(&segmentation, &truth, mip).await?;
            println!("{segmentation} against {truth}: {}", e.describe());
            Ok(())
        })),
        Command::Demo { dir, size } => done(runtime.block_on(local::demo(&dir, size))),
        Command::View {
            volumes,
            port,
            host,
        } => done(runtime.block_on(crate::runtime::view::view(&volumes, &host, port))),
        Command::Preview {
            volume,
            z,
            mip,
            out,
            image,
            alpha,
        } => {
            let opts = local::PreviewOptions {
                z,
                mip,
                image,
                alpha,
            };
            runtime.block_on(local::preview(&volume, &out, &opts))?;
            println!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::BossDownsample {
            job,
            all_levels,
            cache_mib,
        } => done(runtime.block_on(local::boss_downsample(
            &job,
            all_levels.then_some(cache_mib),
        ))),
        Command::Bench {
            size,
            num_mips,
            gzip_level,
            cpu,
            dir,
            keep,
            slab_mib,
        } => done(runtime.block_on(local::bench(local::BenchOptions {
            size,
            num_mips,
            gzip_level,
            cpu,
            dir,
            keep,
            slab_bytes: slab_mib.map(|m| m << 20),
        }))),
    }
}

/// Host name and process id: tells workers apart in Step Functions' history.
fn default_worker_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "cuboids".into());
    format!("{host}-{}", std::process::id())
}
