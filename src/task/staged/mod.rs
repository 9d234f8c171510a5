//! Segment and connected components past one machine: a plan cuts the region into blocks, and
//! stages of tasks (Batch array children or activity tasks, each in any order within its stage)
//! give exactly the labels of a single-process run, no task holding the whole volume: each holds
//! a block, a scan's fan-in of a block's rows, or the label-level records of the components that
//! cross a group's faces (see [`budget`] for what each needs and what grows).
//!
//! | stage | tasks | what it does | where |
//! | --- | --- | --- | --- |
//! | block | one per block (GPU) | labels the block (connected components, or segment's watershed fragments and region graph), numbered by first voxel within it; writes its labels, summary, border, and (segment) open plateau voxels and edges | [`block`] |
//! | link | one per block | the pairs of labels across its faces, from its border and its neighbours' | [`union`] |
//! | union-l | one per group of 2^l blocks a side | joins the components that cross its children's faces; what still leaves it goes up | [`union`] |
//! | down-l | one per group, top-down | hands its children their open labels' components; down-0 writes each label's component (connected components) or fragment (segment) | [`union`], [`number`], [`rounds`] |
//! | round-l | one per group (segment) | agglomerates what the group decides (ABISS's rounds); frozen regions go up | [`rounds`] |
//! | resolve-l | one per group, top-down (segment) | each region's segment; resolve-0 writes each label's segment | [`rounds`] |
//! | scan-x/y/z-k | lines of blocks, fan-in F | prefix sums of the components each block owns, per row, plane and slab | [`number`] |
//! | rank | one per block | the numbers of the components it owns | [`number`] |
//! | relabel | one per block | its output chunks, each label numbered from its component's owner's ranks | [`relabel`] |
//! | finalize | one | checks every block was relabelled, then writes the output's info | here |
//!
//! Why the result equals a single process's: labels, fragments, components and segments are
//! named by their first voxel and numbered 1..N in that order, so no name depends on the
//! blocking; the union levels join exactly the pairs one process's stitching joins; a plateau's
//! pointers depend on that plateau's voxels only, so resolving it in the lowest group that
//! holds it whole gives what resolving all plateaus together gives; region-graph sums are exact
//! integers; and a round merges only what its part of the graph decides (see [`rounds`]).
//!
//! Intermediate objects live next to the output, under `.cuboids-staging/<plan id>/`:
//! `block-<i>.<kind>`, `union-<level>-<group>.<kind>`, `round-<level>-<group>.<kind>` and
//! `scan-<axis>-<level>-<line>-<part>.<kind>`, each documented by the module that writes it.
//! Each is a 64-byte header and a gzip payload (little-endian throughout):
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | magic `CUBOIDS\0` |
//! | 8..12 | format version (4) |
//! | 12..16 | kind ([`format::Kind`]'s number) |
//! | 16..32 | plan id (the md5 in the tasks' `plan.id`) |
//! | 32..40 | the object's index (a block; a group: level << 40 \| group; a scan part) |
//! | 40..48 | payload length after gunzip |
//! | 48..64 | md5 of the gzip payload |
//!
//! The block stage's payloads (voxels as region indices, Fortran order; most fields varints:
//! LEB128, 7 bits a byte, low bits first; a zigzag difference d stored as (d << 1) ^ (d >> 63)):
//! - labels: (label, run length) pairs as varints that cover the block's voxels in Fortran order
//!   (0 background);
//! - summary: count K, the K first voxels as increases from the one before (from 0), K sizes;
//! - border: H and H halo entries (voxel as a zigzag difference from the entry before, label;
//!   sorted by voxel, then label), F and F face entries (the same; sorted by voxel), N and N
//!   (label increase, first voxel) for the labels they name;
//! - plateaus (segment): u64 D and D open plateau voxels (u64 voxel, u8 bidirectional
//!   directions, u8 those toward an exit, u32 label, 6 u32 labels of its neighbours inside the
//!   block in waterz's direction order, 0 outside it);
//! - edges (segment), varints: E and E edges sorted by keys, a < b (a as an increase from the
//!   edge before, b - a, the voxel-edge count, the fixed-point affinity sum); a key is a block
//!   label, or 2^63 + the voxel of another block's face;
//! - done (relabel): empty.
//!
//! Every stage rewrites identical bytes when run again.

mod block;
pub mod budget;
mod format;
mod number;
mod relabel;
mod rounds;
mod union;

use crate::formats::precomputed::Precomputed;
use crate::geometry::{voxels, Vec3};
use crate::gpu::GpuContext;
use crate::store::{Store, StoreError};
use crate::task::downsample::source_region;
use crate::task::segment::{
    layout, Layout, SegmentError, SegmentReport, COMPONENTS_MARGIN, DEFAULT_CHUNK, WATERSHED_MARGIN,
};
use crate::task::spec::{
    ChunkFields, ComponentsTask, SegmentTask, Stage, StageTask, StagedPlan, Task,
};
use crate::task::stitch::ChunkGrid;
pub use budget::{Budget, Sizing, StageEstimate};
use format::{Kind, Staging};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Done markers the finalize task reads at once.
const DONE_CHECKS_IN_FLIGHT: usize = 64;

/// Where a plan's intermediate objects live in the output store.
pub const STAGING: &str = ".cuboids-staging";

#[derive(Debug, Error)]
pub enum StagedError {
    #[error(transparent)]
    Segment(Box<SegmentError>),
    #[error("reading intermediate {key}")]
    Store {
        key: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("intermediate {key} does not exist: its stage has not run (or failed) for this plan")]
    Missing { key: String },
    #[error("intermediate {key} is corrupt: {why}")]
    Corrupt { key: String, why: String },
    #[error(
        "intermediate {key} was written by another plan ({found}, this task's plan is {expected})"
    )]
    OtherPlan {
        key: String,
        found: String,
        expected: String,
    },
    #[error("task of plan {id}: {why}")]
    BadPlan { id: String, why: String },
    #[error(
        "--task-mib {task_mib} is too small for {what}: it needs --task-mib {needed_mib} at least"
    )]
    Budget {
        task_mib: usize,
        needed_mib: usize,
        what: String,
    },
}

impl From<SegmentError> for StagedError {
    fn from(e: SegmentError) -> Self {
        StagedError::Segment(Box::new(e))
    }
}

/// The work a staged plan cuts into blocks, as its stages see it.
pub trait StagedWork: Serialize + Clone + Send + Sync + 'static {
    /// The input volume (precomputed, local or `s3://`).
    fn input(&self) -> &str;
    fn output(&self) -> &str;
    fn chunk_fields(&self) -> &ChunkFields;
    fn chunk_fields_mut(&mut self) -> &mut ChunkFields;
    /// Input voxels read around each GPU chunk core.
    fn margin(&self) -> usize;
    /// What its tasks cost per voxel (what sizes the chunks and blocks).
    fn costs(&self) -> budget::Costs;
    fn work(&self) -> Work<'_>;
    /// One of its stage tasks as a task document.
    fn stage_task(task: StageTask<Self>) -> Task;
}

/// What a block and the merge compute: connected components or segment.
pub enum Work<'a> {
    Components(&'a ComponentsTask),
    Segment(&'a SegmentTask),
}

impl StagedWork for ComponentsTask {
    fn input(&self) -> &str {
        &self.input
    }
    fn output(&self) -> &str {
        &self.output
    }
    fn chunk_fields(&self) -> &ChunkFields {
        &self.chunks
    }
    fn chunk_fields_mut(&mut self) -> &mut ChunkFields {
        &mut self.chunks
    }
    fn margin(&self) -> usize {
        COMPONENTS_MARGIN
    }
    fn costs(&self) -> budget::Costs {
        budget::COMPONENTS_COSTS
    }
    fn work(&self) -> Work<'_> {
        Work::Components(self)
    }
    fn stage_task(task: StageTask<Self>) -> Task {
        Task::ConnectedComponentsStage(task)
    }
}

impl StagedWork for SegmentTask {
    fn input(&self) -> &str {
        &self.affinity
    }
    fn output(&self) -> &str {
        &self.output
    }
    fn chunk_fields(&self) -> &ChunkFields {
        &self.chunks
    }
    fn chunk_fields_mut(&mut self) -> &mut ChunkFields {
        &mut self.chunks
    }
    fn margin(&self) -> usize {
        WATERSHED_MARGIN
    }
    fn costs(&self) -> budget::Costs {
        budget::SEGMENT_COSTS
    }
    fn work(&self) -> Work<'_> {
        Work::Segment(self)
    }
    fn stage_task(task: StageTask<Self>) -> Task {
        Task::SegmentStage(task)
    }
}

/// Cuts a segment or connected-components task into a staged plan within `budget` (see
/// [`budget`]): the GPU chunk, the input cache and near-cubic blocks of whole GPU chunks and
/// output chunks such that every per-block task stays within `budget.task_bytes`. Fails, naming
/// the smallest budget that would do, when even the least block does not fit or a stage above
/// the blocks (a union or down level) would not. Returns the plan and its stages, in order.
pub fn plan<W: StagedWork>(
    input: &Precomputed,
    task: &W,
    budget: &Budget,
) -> Result<(StagedPlan<W>, Vec<StageSpec>), StagedError> {
    let (sizing, extent) = sizing(input, task, budget, None)?;
    let grid = ChunkGrid {
        region: extent,
        chunk: sizing.block,
    };
    let mut work = task.clone();
    let fields = work.chunk_fields_mut();
    fields.chunk_size = Some(sizing.chunk);
    fields.cache_mib = Some(sizing.cache_bytes >> 20);
    let fan_in = budget::scan_fan_in(sizing.block, budget);
    check_levels(task, &sizing, extent, fan_in, budget)?;
    let plan = StagedPlan::new(sizing.block, grid.len(), fan_in, work);
    let stages = stages(&plan, grid.counts(), task.work());
    Ok((plan, stages))
}

/// What a plan of `task` within `budget` would be, stage by stage, over the input's region or a
/// hypothetical one of `shape` voxels (same chunks and resolution), without making its tasks.
pub fn estimate<W: StagedWork>(
    input: &Precomputed,
    task: &W,
    budget: &Budget,
    shape: Option<Vec3>,
) -> Result<(Sizing, Vec<StageEstimate>), StagedError> {
    let (sizing, extent) = sizing(input, task, budget, shape)?;
    let fan_in = budget::scan_fan_in(sizing.block, budget);
    let rounds = matches!(task.work(), Work::Segment(_));
    let stages = budget::estimate(
        &task.costs(),
        &sizing,
        extent,
        (task.margin(), fan_in, rounds),
    );
    Ok((sizing, stages))
}

/// The chunk, cache and block of a plan, and the extent of its region (`shape` in place of the
/// input's region, for estimates).
fn sizing<W: StagedWork>(
    input: &Precomputed,
    task: &W,
    budget: &Budget,
    shape: Option<Vec3>,
) -> Result<(Sizing, Vec3), StagedError> {
    let scale = input.scale(0);
    let fields = task.chunk_fields();
    let region = source_region(scale, fields.bounds).map_err(SegmentError::from)?;
    let extent = shape.unwrap_or(region.shape());
    let out_chunk = fields.output_chunk_size.unwrap_or(scale.chunk_size());
    let resolution = scale.resolution.map(|r| r.0);
    let fixed = Budget {
        chunk: budget.chunk.or(fields.chunk_size),
        cache_bytes: budget.cache_bytes.or(fields.cache_mib.map(|m| m << 20)),
        ..*budget
    };
    let sizing = budget::size(
        &task.costs(),
        &fixed,
        (extent, out_chunk, resolution),
        (DEFAULT_CHUNK, task.margin()),
    )
    .map_err(|e| StagedError::Budget {
        task_mib: budget.task_bytes >> 20,
        needed_mib: e.needed_mib,
        what: format!("a block of {:?} voxels", e.block),
    })?;
    Ok((sizing, extent))
}

/// Fails when a stage above the blocks whose tasks the budget bounds (union and down levels,
/// scans) would need more than `budget`, naming the budget that would do. Round levels are
/// bounded by the data, not by the plan (see [`budget`]).
fn check_levels<W: StagedWork>(
    task: &W,
    sizing: &Sizing,
    extent: Vec3,
    fan_in: Vec3,
    budget: &Budget,
) -> Result<(), StagedError> {
    let rounds = matches!(task.work(), Work::Segment(_));
    let stages = budget::estimate(
        &task.costs(),
        sizing,
        extent,
        (task.margin(), fan_in, rounds),
    );
    let limit = (budget.task_bytes >> 20) as u64 + budget::FIXED_GPU_MIB as u64;
    match stages
        .iter()
        .filter(|s| s.grows_with == "faces")
        .max_by_key(|s| s.mib)
    {
        Some(worst) if worst.mib > limit => Err(StagedError::Budget {
            task_mib: budget.task_bytes >> 20,
            needed_mib: worst.mib as usize - budget::FIXED_MIB,
            what: format!("its {} task", worst.stage),
        }),
        _ => Ok(()),
    }
}

/// One stage of a plan: its kind, its level and how many tasks it has, without the tasks (a
/// teravoxel plan has millions: [`StageSpec::task`] makes any one of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageSpec {
    pub stage: Stage,
    pub level: Option<u32>,
    pub tasks: usize,
}

impl StageSpec {
    /// Task `i` of the stage.
    pub fn task<W: StagedWork>(&self, plan: &StagedPlan<W>, i: usize) -> Task {
        W::stage_task(StageTask {
            stage: self.stage,
            block: (self.stage != Stage::Finalize).then_some(i),
            level: self.level,
            plan: plan.clone(),
        })
    }

    /// The stage's name, as its manifest is named.
    pub fn name(&self) -> String {
        self.stage.name(self.level)
    }
}

/// The stages of a plan over a grid of `counts` blocks.
fn stages<W: StagedWork>(plan: &StagedPlan<W>, counts: Vec3, work: Work) -> Vec<StageSpec> {
    let each = |stage: Stage, tasks: usize, level: Option<u32>| StageSpec {
        stage,
        level,
        tasks,
    };
    let groups = |level: u32| rounds::groups(counts, level).len();
    let top = rounds::levels(counts) - 1;
    let mut stages = vec![
        each(Stage::Block, plan.blocks, None),
        each(Stage::Link, plan.blocks, None),
    ];
    for level in 1..=top {
        stages.push(each(Stage::Union, groups(level), Some(level)));
    }
    for level in (0..top).rev() {
        stages.push(each(Stage::Down, groups(level), Some(level)));
    }
    if top == 0 {
        stages.push(each(Stage::Down, plan.blocks, Some(0)));
    }
    if let Work::Segment(_) = work {
        for level in 0..=top {
            stages.push(each(Stage::Round, groups(level), Some(level)));
        }
        for level in (0..top.max(1)).rev() {
            stages.push(each(Stage::Resolve, groups(level), Some(level)));
        }
    }
    let scans = number::Scans {
        counts,
        fan_in: plan.fan_in,
    };
    for (axis, stage) in [Stage::ScanX, Stage::ScanY, Stage::ScanZ]
        .into_iter()
        .enumerate()
    {
        for level in 0..scans.levels(axis) {
            stages.push(each(stage, scans.tasks(axis, level), Some(level)));
        }
    }
    stages.push(each(Stage::Rank, plan.blocks, None));
    stages.push(each(Stage::Relabel, plan.blocks, None));
    stages.push(each(Stage::Finalize, 1, None));
    stages
}

/// The name of a stage task's stage (what its manifest is named after).
pub fn stage_name(task: &Task) -> String {
    match task {
        Task::SegmentStage(t) => t.stage_name(),
        Task::ConnectedComponentsStage(t) => t.stage_name(),
        Task::Downsample(t) => format!("mips-{}-{}", t.mip + 1, t.mip + t.num_mips as usize),
        other => other.describe(),
    }
}

/// Runs one task of a staged plan. Only the block stage uses the GPU (`ctx`; the other stages
/// run where there is none).
pub async fn run_stage<W: StagedWork>(
    task: &StageTask<W>,
    input: &Precomputed,
    output: Arc<dyn Store>,
    ctx: Option<Arc<GpuContext>>,
    cancel: Option<CancellationToken>,
) -> Result<SegmentReport, StagedError> {
    let start = Instant::now();
    let plan = &task.plan;
    if plan.id != plan.expected_id() {
        return Err(StagedError::BadPlan {
            id: plan.id.clone(),
            why: format!(
                "its contents give id {}: the task document was edited",
                plan.expected_id()
            ),
        });
    }
    let staging = Staging {
        store: output.clone(),
        plan: plan.id.clone(),
    };
    if task.stage == Stage::Block {
        let b = task_index(task, plan.blocks)?;
        let ctx = ctx.ok_or_else(|| StagedError::BadPlan {
            id: plan.id.clone(),
            why: "the block stage needs a GPU".into(),
        })?;
        let mut opts = plan.work.chunk_fields().options();
        opts.cancel = cancel;
        let binding = ctx.max_binding_bytes();
        let layout = layout(binding, input, output, &opts, plan.work.margin()).await?;
        let blocks = check_blocks(plan, &layout)?;
        let mut report = block::run_block(&ctx, plan, input, &layout, blocks, b, &staging).await?;
        report.wall = start.elapsed();
        return Ok(report);
    }
    let layout = gpu_free_layout(input, &output, plan, cancel).await?;
    let blocks = check_blocks(plan, &layout)?;
    let counts = blocks.counts();
    let top = rounds::levels(counts) - 1;
    let scans = scans(plan, &blocks)?;
    let level = task.level.unwrap_or(0);
    let groups = rounds::groups(counts, level).len();
    let (segment, threshold, dust) = match plan.work.work() {
        Work::Segment(s) => (true, s.threshold, 0),
        Work::Components(c) => (false, 0.0, c.dust),
    };
    let no_such = || StagedError::BadPlan {
        id: plan.id.clone(),
        why: format!(
            "no {} stage in this plan of {} levels{}",
            task.stage_name(),
            top + 1,
            if segment {
                ""
            } else {
                " (connected components)"
            }
        ),
    };
    let mut report = match task.stage {
        Stage::Block => unreachable!("handled above"),
        Stage::Link => {
            union::link(blocks, task_index(task, plan.blocks)?, segment, &staging).await?
        }
        Stage::Union if level >= 1 && level <= top => {
            let g = task_index(task, groups)?;
            union::union(blocks, level, g, level == top, &staging, &layout).await?
        }
        Stage::Down if level == 0 => {
            let b = task_index(task, plan.blocks)?;
            match segment {
                true => rounds::fragments(blocks, top, b, &staging).await?,
                false => number::components(blocks, top, b, dust, &staging).await?,
            }
        }
        Stage::Down if level < top => {
            union::down(blocks, level, task_index(task, groups)?, &staging).await?
        }
        Stage::Round if segment && level <= top => {
            let g = task_index(task, groups)?;
            rounds::round(blocks, (level, top), g, threshold, &staging, &layout).await?
        }
        Stage::Resolve if segment && (level < top || level == 0) => {
            rounds::resolve(blocks, (level, top), task_index(task, groups)?, &staging).await?
        }
        Stage::ScanX | Stage::ScanY | Stage::ScanZ => {
            let axis = match task.stage {
                Stage::ScanX => 0,
                Stage::ScanY => 1,
                _ => 2,
            };
            if level >= scans.levels(axis) {
                return Err(no_such());
            }
            let t = task_index(task, scans.tasks(axis, level))?;
            number::scan(blocks, scans, axis, level, t, &staging).await?
        }
        Stage::Rank => {
            number::rank(blocks, scans, task_index(task, plan.blocks)?, &staging).await?
        }
        Stage::Relabel => {
            let b = task_index(task, plan.blocks)?;
            relabel::relabel(plan, &layout, blocks, b, &staging, ctx).await?
        }
        Stage::Finalize => {
            // Every block's done marker, many in flight (each a round trip on S3, and a
            // teravoxel plan has hundreds of thousands); the first missing one is named.
            use futures::StreamExt;
            let mut checks = futures::stream::iter(0..plan.blocks)
                .map(|b| staging.get(Kind::Done, b))
                .buffered(DONE_CHECKS_IN_FLIGHT);
            while let Some(done) = checks.next().await {
                done?;
            }
            let segments = number::total(&staging, &blocks, &scans).await? as usize;
            if layout.output_is_new {
                layout
                    .output
                    .write_info()
                    .await
                    .map_err(SegmentError::from)?;
            }
            SegmentReport {
                voxels: voxels(layout.region.shape()) as u64,
                chunks: plan.blocks,
                segments,
                ..Default::default()
            }
        }
        _ => return Err(no_such()),
    };
    report.wall = start.elapsed();
    Ok(report)
}

/// The task's `block` (a block, group or scan task), which must be below `n`.
fn task_index<W>(task: &StageTask<W>, n: usize) -> Result<usize, StagedError> {
    task.block
        .filter(|&b| b < n)
        .ok_or_else(|| StagedError::BadPlan {
            id: task.plan.id.clone(),
            why: format!(
                "a {} task needs a `block` below {n} (got {:?})",
                task.stage_name(),
                task.block
            ),
        })
}

/// The numbering scans of a plan.
fn scans<W>(plan: &StagedPlan<W>, blocks: &ChunkGrid) -> Result<number::Scans, StagedError> {
    if plan.fan_in.iter().any(|&f| f < 2) {
        return Err(StagedError::BadPlan {
            id: plan.id.clone(),
            why: format!("numbering fan-in {:?} (at least 2)", plan.fan_in),
        });
    }
    Ok(number::Scans {
        counts: blocks.counts(),
        fan_in: plan.fan_in,
    })
}

/// The layout of the stages that need no GPU (merge, relabel, finalize): the plan fixes the
/// chunk size, so no adapter limit is consulted.
async fn gpu_free_layout<W: StagedWork>(
    input: &Precomputed,
    output: &Arc<dyn Store>,
    plan: &StagedPlan<W>,
    cancel: Option<CancellationToken>,
) -> Result<Layout, StagedError> {
    let mut opts = plan.work.chunk_fields().options();
    opts.cancel = cancel;
    Ok(layout(u64::MAX, input, output.clone(), &opts, plan.work.margin()).await?)
}

/// The plan's block grid, checked against the run's layout: blocks must be whole GPU chunks and
/// their count the plan's.
fn check_blocks<W>(plan: &StagedPlan<W>, layout: &Layout) -> Result<ChunkGrid, StagedError> {
    let blocks = ChunkGrid {
        region: layout.grid.region,
        chunk: plan.block_size,
    };
    let bad = |why: String| StagedError::BadPlan {
        id: plan.id.clone(),
        why,
    };
    if (0..3).any(|a| {
        plan.block_size[a] == 0 || !plan.block_size[a].is_multiple_of(layout.grid.chunk[a])
    }) {
        return Err(bad(format!(
            "blocks of {:?} do not tile the volume in GPU chunks of {:?}",
            plan.block_size, layout.grid.chunk
        )));
    }
    if blocks.len() != plan.blocks {
        return Err(bad(format!(
            "blocks of {:?} cut the region {:?} into {} blocks, the plan says {}",
            plan.block_size,
            layout.grid.region,
            blocks.len(),
            plan.blocks
        )));
    }
    Ok(blocks)
}

/// Times consecutive passes of a stage task, for its report.
pub(super) struct Passes {
    pub(super) since: Instant,
    pub(super) passes: Vec<(&'static str, std::time::Duration)>,
}

impl Passes {
    pub(super) fn new() -> Passes {
        Passes {
            since: Instant::now(),
            passes: Vec::new(),
        }
    }

    /// Ends the pass `name` (begun when the last one ended).
    pub(super) fn done(&mut self, name: &'static str) {
        let now = Instant::now();
        self.passes.push((name, now - self.since));
        self.since = now;
    }

    pub(super) fn into_vec(self) -> Vec<(&'static str, std::time::Duration)> {
        self.passes
    }
}
