//! The task document: one unit of work as JSON, the same wherever it runs. `cuboids plan` writes
//! them (one per line: a manifest), and `run-task`, the AWS Batch entrypoint and the Step
//! Functions activity worker run them. The Boss's DownsampleChannel document is a task as it is.

use crate::geometry::Vec3;
use crate::ops::connected_components::Connectivity;
use crate::ops::downsample::{Factor, Method};
use crate::ops::watershed::WatershedParams;
use crate::task::downsample::{Bounds, DownsampleOptions, DownsampleReport};
use crate::task::segment::{ChunkOptions, ComponentsOptions, SegmentOptions, SegmentReport};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SpecError {
    #[error("invalid task document")]
    Invalid(#[source] serde_json::Error),
    #[error("not a task document: a task has a \"kind\" (downsample, boss-downsample, segment, connected-components, plan), a Boss DownsampleChannel document a \"msg\" object")]
    Unrecognised,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Task {
    /// Mips of a precomputed volume (local path or `s3://`), all or within bounds.
    Downsample(DownsampleTask),
    /// One step of the Boss resolution hierarchy (or every remaining one).
    BossDownsample(BossDownsampleTask),
    /// Watershed + agglomeration of an affinity map into a new segmentation layer.
    Segment(SegmentTask),
    /// Thresholded connected components into a new segmentation layer.
    ConnectedComponents(ComponentsTask),
    /// ConvNet inference of an image layer with an ONNX model into a float32 layer.
    Infer(InferTask),
    /// One task of a staged connected-components plan (`cuboids plan connected-components`).
    ConnectedComponentsStage(ComponentsStageTask),
    /// One task of a staged segment plan (`cuboids plan segment`).
    SegmentStage(SegmentStageTask),
    /// Task `index` (from 0) of a manifest: how a state machine hands a plan's stage tasks to
    /// activity workers one by one, as Batch hands them to array children by index.
    ManifestTask(ManifestTask),
    /// Plans a segment or connected-components task in stages: writes one manifest per stage
    /// and returns the stages (what `cuboids plan ... --manifests` prints). The segmentation
    /// machine runs it first when it is handed a task rather than a plan (POST /segment).
    Plan(PlanTask),
}

/// The default host memory per block task of a staged plan (MiB).
pub const DEFAULT_TASK_MIB: usize = 4096;

/// A staged plan to make: `cuboids plan segment|connected-components --manifests` as a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanTask {
    /// The work to plan: a `segment`, `connected-components` or `infer` task document.
    pub work: Box<Task>,
    /// Manifests go to PREFIX<stage>.jsonl (a path or `s3://` prefix; end it with / for a
    /// folder).
    pub manifests: String,
    /// Host memory per task, in MiB (see `cuboids plan segment --help`).
    #[serde(default = "default_task_mib")]
    pub task_mib: usize,
    /// Blocks of these voxels instead of the largest within `task_mib`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<Vec3>,
    /// Fan-in of the numbering's prefix sums (default: what `task_mib` allows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_fan_in: Option<usize>,
    /// Infer: the longest a task should run, in seconds at `gflops`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_seconds: Option<f64>,
    /// Infer: the engine's effective GFLOP/s that `task_seconds` is reckoned at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    /// Where every stage runs (default: Lambda where a stage's largest task fits it, Batch
    /// otherwise; see `crate::task::route`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<crate::task::route::Runner>,
}

fn default_task_mib() -> usize {
    DEFAULT_TASK_MIB
}

/// A reference to one line of a manifest (`cuboids plan ... --manifests` writes them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestTask {
    /// The manifest: a JSON-lines file or `s3://` object.
    pub manifest: String,
    /// The task's line among the manifest's tasks, from 0.
    pub index: usize,
}

/// The stages of a staged plan, run in this order; tasks within a stage in any order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Label one block (GPU), write its labels and face summary (and for segment its open
    /// plateaus and partial region graph).
    Block,
    /// One level of segment's agglomeration: the part of the region graph a group of 2^level
    /// blocks on each axis (`block` numbers the group) decides.
    Round,
    /// One level of the way down from the rounds: each region's segment (level 0: each block
    /// label's, and what the block owns per row).
    Resolve,
    /// Which labels of one block continue in its neighbours.
    Link,
    /// One level of the union hierarchy: joins the components that cross the inner faces of a
    /// group of 2^level blocks on each axis (`block` numbers the group).
    Union,
    /// One level of the way down: hands a group's children the components of their open labels
    /// (level 0: a block's labels, and what it owns per row).
    Down,
    /// Prefix sums of owned components along x (`level` of the hierarchy, `block` the task).
    ScanX,
    /// Prefix sums along y.
    ScanY,
    /// Prefix sums along z.
    ScanZ,
    /// The numbers of the components one block owns.
    Rank,
    /// Write one block's output chunks.
    Relabel,
    /// Check that every block was relabelled, then write the output's info.
    Finalize,
}

impl Stage {
    /// The name of the stage at `level`, as its manifest is named: `block`, `link`,
    /// `union-<level>`, `down-<level>`, `round-<level>`, `resolve-<level>`,
    /// `scan-<axis>-<level>`, `rank`, `relabel` or `finalize`.
    pub fn name(self, level: Option<u32>) -> String {
        let level = level.unwrap_or(0);
        match self {
            Stage::Block => "block".into(),
            Stage::Link => "link".into(),
            Stage::Union => format!("union-{level}"),
            Stage::Down => format!("down-{level}"),
            Stage::Round => format!("round-{level}"),
            Stage::Resolve => format!("resolve-{level}"),
            Stage::ScanX => format!("scan-x-{level}"),
            Stage::ScanY => format!("scan-y-{level}"),
            Stage::ScanZ => format!("scan-z-{level}"),
            Stage::Rank => "rank".into(),
            Stage::Relabel => "relabel".into(),
            Stage::Finalize => "finalize".into(),
        }
    }
}

/// A staged plan (`cuboids plan segment|connected-components`): what every task of it shares.
/// `W` is the work it cuts into blocks: a [`SegmentTask`] or a [`ComponentsTask`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagedPlan<W> {
    /// md5 (hex) of the rest of the plan; intermediates carry it, so that objects of another plan
    /// are never mixed in.
    pub id: String,
    /// Block extent in voxels: whole GPU chunks (`work.chunk_size`) and output chunks.
    pub block_size: Vec3,
    pub blocks: usize,
    /// Fan-in of the numbering's prefix sums along x, y and z.
    pub fan_in: Vec3,
    pub work: W,
}

impl<W: Serialize> StagedPlan<W> {
    pub fn new(block_size: Vec3, blocks: usize, fan_in: Vec3, work: W) -> StagedPlan<W> {
        let mut plan = StagedPlan {
            id: String::new(),
            block_size,
            blocks,
            fan_in,
            work,
        };
        plan.id = plan.expected_id();
        plan
    }

    /// The id this plan's contents give (a task whose `id` differs was edited or mixed up).
    pub fn expected_id(&self) -> String {
        use md5::{Digest, Md5};
        let body = serde_json::to_vec(&(&self.block_size, self.blocks, self.fan_in, &self.work))
            .expect("a plan serialises");
        Md5::digest(&body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// One task of a staged plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageTask<W> {
    pub stage: Stage,
    /// The block, for the block and relabel stages; the group of blocks, for a round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<usize>,
    /// The round's level (round stage only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<u32>,
    pub plan: StagedPlan<W>,
}

pub type ComponentsPlan = StagedPlan<ComponentsTask>;
pub type ComponentsStageTask = StageTask<ComponentsTask>;
pub type SegmentPlan = StagedPlan<SegmentTask>;
pub type SegmentStageTask = StageTask<SegmentTask>;

fn threshold_default() -> f64 {
    0.7
}

fn low_default() -> f32 {
    0.001
}

fn high_default() -> f32 {
    0.9999
}

fn connectivity_default() -> Connectivity {
    Connectivity::TwentySix
}

/// How `segment` and `connected-components` tasks chunk their volume (the CLI's options).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounds: Option<Bounds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<Vec3>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_chunk_size: Option<Vec3>,
    #[serde(default)]
    pub fill_missing: bool,
    #[serde(default = "gzip_default")]
    pub gzip_level: u32,
    /// Memory for decoded input chunks, in MiB (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_mib: Option<usize>,
}

/// What a task document that leaves every chunk field out gets.
impl Default for ChunkFields {
    fn default() -> ChunkFields {
        ChunkFields {
            bounds: None,
            chunk_size: None,
            output_chunk_size: None,
            fill_missing: false,
            gzip_level: gzip_default(),
            cache_mib: None,
        }
    }
}

impl ChunkFields {
    pub fn options(&self) -> ChunkOptions {
        ChunkOptions {
            bounds: self.bounds,
            chunk_size: self.chunk_size,
            output_chunk_size: self.output_chunk_size,
            fill_missing: self.fill_missing,
            write: crate::formats::precomputed::WriteOptions {
                gzip_level: self.gzip_level,
            },
            cache_bytes: self
                .cache_mib
                .map_or(crate::task::segment::DEFAULT_CACHE_BYTES, |m| m << 20),
            cancel: None,
        }
    }
}

/// `cuboids segment` as a document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentTask {
    pub affinity: String,
    pub output: String,
    #[serde(default = "threshold_default")]
    pub threshold: f64,
    #[serde(default = "low_default")]
    pub aff_low: f32,
    #[serde(default = "high_default")]
    pub aff_high: f32,
    #[serde(flatten)]
    pub chunks: ChunkFields,
}

/// `cuboids infer` as a document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferTask {
    /// The image layer (a path or `s3://`).
    pub image: String,
    /// The ONNX model file (a path or `s3://` object).
    pub model: String,
    /// The new float32 layer.
    pub output: String,
    #[serde(default)]
    pub mip: usize,
    /// Input patch x, y, z (default: the model's static input shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<Vec3>,
    /// Output patch overlap x, y, z (default chunkflow's 64, 64, 4).
    #[serde(default = "overlap_default")]
    pub overlap: Vec3,
    /// Output patch x, y, z (default: the model's output for the input patch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_patch: Option<Vec3>,
    #[serde(default)]
    pub blend: crate::infer::blend::Bump,
    /// The model's first N output channels (default all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    #[serde(default)]
    pub fill_missing: bool,
    #[serde(default = "gzip_default")]
    pub gzip_level: u32,
    /// Runs the CPU reference operators (slow, for checking): `engine: reference`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cpu: bool,
    /// Which executor runs the net (default: the GPU, or the native CPU engine where the
    /// adapter is lavapipe).
    #[serde(default, skip_serializing_if = "is_auto")]
    pub engine: crate::infer::Engine,
    /// What the net computes in (float16: half-precision storage, float32 sums).
    #[serde(default, skip_serializing_if = "is_float32")]
    pub dtype: crate::infer::Precision,
    /// Host memory of the task in MiB, fixed part included: sizes its columns.
    #[serde(default = "default_task_mib")]
    pub task_mib: usize,
    /// Columns of x, y output voxels (whole chunks), as a plan chose them; default the
    /// largest within `task_mib`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<[usize; 2]>,
    /// Only these output bounds (absolute voxels, whole chunks) and no info: a task of
    /// `cuboids plan infer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounds: Option<crate::task::downsample::Bounds>,
    /// Only the layer's info, once every bounds task is done: the last task of a plan.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub finalize: bool,
    /// A uint8 layer of round(255 · clamp(v, 0, 1)) instead of float32.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quantize: bool,
}

fn is_float32(precision: &crate::infer::Precision) -> bool {
    *precision == crate::infer::Precision::Float32
}

fn is_auto(engine: &crate::infer::Engine) -> bool {
    *engine == crate::infer::Engine::Auto
}

fn overlap_default() -> Vec3 {
    crate::task::infer::DEFAULT_OVERLAP
}

impl InferTask {
    /// Inference of `image` by `model` into `output`, every option at its default (as a
    /// document naming only these three).
    pub fn new(
        image: impl Into<String>,
        model: impl Into<String>,
        output: impl Into<String>,
    ) -> InferTask {
        serde_json::from_value(serde_json::json!({
            "image": image.into(),
            "model": model.into(),
            "output": output.into(),
        }))
        .expect("every other field has a default")
    }

    pub fn options(&self) -> crate::task::infer::InferOptions {
        crate::task::infer::InferOptions {
            mip: self.mip,
            patch: self.patch,
            overlap: self.overlap,
            output_patch: self.output_patch,
            bump: self.blend,
            channels: self.channels,
            fill_missing: self.fill_missing,
            write: crate::formats::precomputed::WriteOptions {
                gzip_level: self.gzip_level,
            },
            memory_bytes: self.task_mib.saturating_mul(1 << 20),
            column: self.column,
            finalize: self.finalize,
            quantize: self.quantize,
            ..Default::default()
        }
    }

    /// The task's bounds relative to the image scale's voxel offset, named in errors.
    pub fn relative_bounds(
        &self,
        offset: [i64; 3],
    ) -> Result<Option<crate::geometry::Box3>, String> {
        let Some(b) = self.bounds else {
            return Ok(None);
        };
        let rel = |v: [i64; 3]| -> Result<[usize; 3], String> {
            let r = [0, 1, 2].map(|i| v[i] - offset[i]);
            if r.iter().any(|&c| c < 0) {
                return Err(format!(
                    "bounds {:?}..{:?} start before the image's voxel offset {offset:?}",
                    b.start, b.stop
                ));
            }
            Ok(r.map(|c| c as usize))
        };
        Ok(Some(crate::geometry::Box3::new(
            rel(b.start)?,
            rel(b.stop)?,
        )))
    }
}

/// `cuboids connected-components` as a document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentsTask {
    pub input: String,
    pub output: String,
    pub threshold: f64,
    #[serde(default = "connectivity_default")]
    pub connectivity: Connectivity,
    #[serde(default)]
    pub dust: u64,
    #[serde(flatten)]
    pub chunks: ChunkFields,
}

impl SegmentTask {
    /// Segments `affinity` into `output`, merging while 1 - mean affinity < `threshold`; every
    /// other field as a task document that leaves it out has it.
    pub fn new(affinity: impl Into<String>, output: impl Into<String>, threshold: f64) -> Self {
        SegmentTask {
            affinity: affinity.into(),
            output: output.into(),
            threshold,
            aff_low: low_default(),
            aff_high: high_default(),
            chunks: ChunkFields::default(),
        }
    }

    pub fn options(&self) -> SegmentOptions {
        SegmentOptions {
            chunks: self.chunks.options(),
            watershed: WatershedParams {
                low: self.aff_low,
                high: self.aff_high,
            },
            threshold: self.threshold,
        }
    }
}

impl ComponentsTask {
    pub fn options(&self) -> ComponentsOptions {
        ComponentsOptions {
            chunks: self.chunks.options(),
            threshold: self.threshold,
            connectivity: self.connectivity,
            dust: self.dust,
        }
    }
}

/// The output document of a finished segment or connected-components task.
pub fn segmentation_output(kind: &str, output: &str, r: &SegmentReport) -> Value {
    serde_json::json!({
        "kind": kind,
        "output": output,
        "voxels": r.voxels,
        "chunks": r.chunks,
        "fragments": r.fragments,
        "segments": r.segments,
        "merges": r.merges,
        "region_edges": r.region_edges,
        "deferred": r.deferred,
        "chunks_written": r.chunks_written,
        "seconds": r.wall.as_secs_f64(),
        "mvx_per_s": r.mvx_per_s(),
    })
}

fn one() -> u32 {
    1
}

fn gzip_default() -> u32 {
    6
}

fn anisotropic() -> Factor {
    Factor::ANISOTROPIC
}

fn cache_default() -> usize {
    4096
}

/// `cuboids downsample` as a document; the fields and defaults of its options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownsampleTask {
    pub location: String,
    #[serde(default)]
    pub mip: usize,
    #[serde(default = "one")]
    pub num_mips: u32,
    #[serde(default = "anisotropic")]
    pub factor: Factor,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounds: Option<Bounds>,
    #[serde(default)]
    pub fill_missing: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    #[serde(default = "gzip_default")]
    pub gzip_level: u32,
    /// Tiles whose output chunks all exist are not recomputed (a retry after a partial run).
    #[serde(default)]
    pub skip_existing: bool,
    /// Host memory aimed at per tile, in MiB (default 64); tiles are never smaller than the
    /// output chunks they write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tile_mib: Option<usize>,
    /// Pools on the CPU reference instead of the GPU: for a machine without one (slow, exact).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cpu: bool,
    /// New scales are sharded as igneous shards them; the task must hold whole shards.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sharded: bool,
    /// With `sharded`: source MiB each shard covers at most (a plan's task size; the same in
    /// every task of a plan, which all write the same info). Default: igneous's 3.5 GB per mip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_source_mib: Option<u64>,
}

/// A Boss DownsampleChannel document (`job`), one step or, with `all_levels`, every remaining one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BossDownsampleTask {
    pub job: Value,
    #[serde(default)]
    pub all_levels: bool,
    /// Host memory for cuboids kept between levels with `all_levels`, in MiB.
    #[serde(default = "cache_default")]
    pub cache_mib: usize,
}

impl Task {
    /// Reads a task: a document with a `kind`, or a Boss DownsampleChannel document (which the
    /// resolution hierarchy state machine sends to its activity as it is).
    pub fn from_value(doc: Value) -> Result<Task, SpecError> {
        if doc.get("kind").is_some() {
            serde_json::from_value(doc).map_err(SpecError::Invalid)
        } else if doc.get("msg").is_some_and(Value::is_object) {
            Ok(Task::BossDownsample(BossDownsampleTask {
                job: doc,
                all_levels: false,
                cache_mib: cache_default(),
            }))
        } else {
            Err(SpecError::Unrecognised)
        }
    }

    pub fn from_json(text: &str) -> Result<Task, SpecError> {
        Task::from_value(serde_json::from_str(text).map_err(SpecError::Invalid)?)
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        match self {
            Task::Downsample(t) => format!(
                "downsample {} mip {} +{}{}",
                t.location,
                t.mip,
                t.num_mips,
                t.bounds
                    .map(|b| format!(" bounds {:?}..{:?}", b.start, b.stop))
                    .unwrap_or_default()
            ),
            Task::BossDownsample(t) => format!(
                "boss-downsample {} resolution {}{}",
                t.job["msg"]["lookup_key"].as_str().unwrap_or("?"),
                t.job["msg"]["resolution"],
                if t.all_levels { " (all levels)" } else { "" }
            ),
            Task::Segment(t) => format!("segment {} -> {}", t.affinity, t.output),
            Task::ConnectedComponents(t) => {
                format!("connected-components {} -> {}", t.input, t.output)
            }
            Task::Infer(t) => format!("infer {} with {} -> {}", t.image, t.model, t.output),
            Task::ConnectedComponentsStage(t) => t.describe(
                "connected-components",
                &t.plan.work.input,
                &t.plan.work.output,
            ),
            Task::SegmentStage(t) => {
                t.describe("segment", &t.plan.work.affinity, &t.plan.work.output)
            }
            Task::ManifestTask(t) => format!("task {} of manifest {}", t.index, t.manifest),
            Task::Plan(t) => format!("plan of {} into {}", t.work.describe(), t.manifests),
        }
    }
}

impl<W> StageTask<W> {
    /// The stage's name, as its manifest is named (see [`Stage::name`]).
    pub fn stage_name(&self) -> String {
        self.stage.name(self.level)
    }

    fn describe(&self, kind: &str, input: &str, output: &str) -> String {
        let what = match self.stage {
            Stage::Block | Stage::Link | Stage::Rank | Stage::Relabel => " block",
            Stage::Round | Stage::Resolve | Stage::Union | Stage::Down => " group",
            Stage::ScanX | Stage::ScanY | Stage::ScanZ => " task",
            Stage::Finalize => "",
        };
        format!(
            "{kind} {} stage{} of plan {} ({input} -> {output})",
            self.stage_name(),
            self.block
                .map(|b| format!("{what} {b}"))
                .unwrap_or_default(),
            self.plan.id,
        )
    }
}

impl DownsampleTask {
    /// `num_mips` new mips of the volume at `location`, every other field as a task document
    /// that leaves it out has it.
    pub fn new(location: impl Into<String>, num_mips: u32) -> DownsampleTask {
        DownsampleTask {
            location: location.into(),
            mip: 0,
            num_mips,
            factor: anisotropic(),
            bounds: None,
            fill_missing: false,
            method: None,
            gzip_level: gzip_default(),
            skip_existing: false,
            tile_mib: None,
            cpu: false,
            sharded: false,
            shard_source_mib: None,
        }
    }

    pub fn options(&self) -> DownsampleOptions {
        DownsampleOptions {
            mip: self.mip,
            num_mips: self.num_mips,
            factor: self.factor,
            bounds: self.bounds,
            fill_missing: self.fill_missing,
            method: self.method,
            write: crate::formats::precomputed::WriteOptions {
                gzip_level: self.gzip_level,
            },
            skip_existing: self.skip_existing,
            sharded: self.sharded,
            shard_source_bytes: self.shard_source_mib.map(|m| m << 20),
            tile_bytes: self
                .tile_mib
                .map_or(DownsampleOptions::default().tile_bytes, |m| m << 20),
            ..Default::default()
        }
    }

    /// The output document of a finished run.
    pub fn output(&self, r: &DownsampleReport) -> Value {
        serde_json::json!({
            "kind": "downsample",
            "location": self.location,
            "mip": self.mip,
            "num_mips": self.num_mips,
            "bounds": self.bounds,
            "input_voxels": r.input_voxels,
            "output_voxels": r.output_voxels,
            "tiles": r.tiles,
            "tiles_skipped_empty": r.tiles_skipped_empty,
            "tiles_skipped_existing": r.tiles_skipped_existing,
            "chunks_written": r.chunks_written,
            "new_scales": r.new_scales,
            "seconds": r.wall.as_secs_f64(),
            "mvx_per_s": r.mvx_per_s(),
            "decode_core_seconds": r.decode_cpu.as_secs_f64(),
            "encode_core_seconds": r.encode_cpu.as_secs_f64(),
            "core_seconds": r.process_cpu.as_secs_f64(),
            "chunks_encoded_on_gpu": r.chunks_encoded_on_gpu,
            "codec_limit_seconds": r.codec_limit().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_a_minimal_downsample_task() {
        let t = Task::from_json(r#"{"kind":"downsample","location":"s3://b/v"}"#).unwrap();
        let Task::Downsample(d) = t else {
            panic!("not a downsample task")
        };
        assert_eq!(
            (d.mip, d.num_mips, d.factor, d.gzip_level, d.skip_existing),
            (0, 1, Factor::ANISOTROPIC, 6, false)
        );
        assert_eq!(d, DownsampleTask::new("s3://b/v", 1));
    }

    /// What the demo and the CLI build in code is what a document with the same fields means.
    #[test]
    fn constructors_give_a_documents_defaults() {
        let doc = r#"{"kind":"segment","affinity":"a","output":"o","threshold":0.3}"#;
        assert_eq!(
            Task::from_json(doc).unwrap(),
            Task::Segment(SegmentTask::new("a", "o", 0.3))
        );
        let doc = r#"{"kind":"connected-components","input":"p","output":"o","threshold":0.5}"#;
        let Task::ConnectedComponents(c) = Task::from_json(doc).unwrap() else {
            panic!("not a connected-components task")
        };
        assert_eq!(c.chunks, ChunkFields::default());
    }

    #[test]
    fn tasks_round_trip_through_json() {
        let t = Task::Downsample(DownsampleTask {
            location: "vol".into(),
            mip: 1,
            num_mips: 3,
            factor: Factor::ISOTROPIC,
            bounds: Some(Bounds {
                start: [0, 64, 0],
                stop: [128, 128, 64],
            }),
            fill_missing: true,
            method: Some(Method::Mode),
            gzip_level: 0,
            skip_existing: true,
            tile_mib: Some(16),
            cpu: true,
            sharded: true,
            shard_source_mib: Some(512),
        });
        let text = serde_json::to_string(&t).unwrap();
        assert!(text.contains(r#""cpu":true"#), "{text}");
        assert!(text.contains(r#""factor":[2,2,2]"#), "{text}");
        assert!(text.contains(r#""method":"mode""#), "{text}");
        assert_eq!(Task::from_json(&text).unwrap(), t);
    }

    #[test]
    fn a_boss_document_is_a_task_as_it_is() {
        let doc = serde_json::json!({"lookup_key": "1&2&3", "msg": {"resolution": 0}});
        let Task::BossDownsample(b) = Task::from_value(doc.clone()).unwrap() else {
            panic!("not a Boss task")
        };
        assert_eq!((b.job, b.all_levels), (doc, false));
    }

    #[test]
    fn bad_documents_say_what_is_wrong() {
        let err = |text: &str| {
            let e = Task::from_json(text).unwrap_err();
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg += &format!(": {s}");
                source = s.source();
            }
            msg
        };
        assert!(err(r#"{"kind":"resize"}"#).contains("unknown variant `resize`"));
        assert!(err(r#"{"kind":"downsample"}"#).contains("missing field `location`"));
        assert!(
            err(r#"{"kind":"downsample","location":"v","factor":[3,3,1]}"#)
                .contains("unsupported downsampling factor [3, 3, 1]")
        );
        assert!(err(r#"{"kind":"downsample","location":"v","mips":2}"#)
            .contains("unknown field `mips`"));
        assert!(err(r#"{"resolution":0}"#).contains("not a task document"));
        assert!(err("{").contains("invalid task document"));
    }
}
