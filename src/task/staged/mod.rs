//! Segment and connected components past one machine: a plan cuts the region into blocks, and
//! four stages of tasks (Batch array children or activity tasks, each in any order within its
//! stage) give exactly the labels of a single-process run.
//!
//! 1. **block** (GPU, one per block): labels the block's GPU chunks (connected components, or
//!    segment's watershed fragments with each chunk's region graph), glued inside the block,
//!    then numbered by first voxel within the block. Writes the block's labels and a summary:
//!    per label its first voxel (region order) and size, the voxels on the block's faces that
//!    other blocks share with their labels, and the halo voxels outside the block that its
//!    labels reach. A segment block resolves the plateaus (see src/ops/watershed.rs) that stay
//!    inside it and also writes its graph: the plateau voxels whose plateau leaves the block,
//!    and its region graph keyed by block labels or by voxels of other blocks' faces.
//! 2. **merge** (one task, no GPU): joins the blocks through their halos and faces (segment: and
//!    the open plateaus, resolved over their whole extent), numbers the components 1..N by first
//!    voxel, then drops dust (connected components) or sums the blocks' graphs into the
//!    fragments' region graph and agglomerates it (segment); writes each block's relabel table.
//!    A segment plan whose graph would not fit the merge task has **merge rounds** instead: the
//!    merge writes fragments and their edges, round tasks over groups of blocks agglomerate what
//!    each group decides, and a **resolve** task writes the relabel tables (see [`rounds`]).
//! 3. **relabel** (one per block, no GPU): writes the block's output chunks through its table.
//! 4. **finalize** (one task): checks that every block was relabelled, then writes the output's
//!    info: until then the output is not a volume, so no partial output passes for a finished
//!    one.
//!
//! Why the result equals a single process's: fragments and components are numbered by first
//! voxel, so the numbering does not depend on the blocking; a plateau's pointers depend on that
//! plateau's voxels only, so resolving a closed plateau in its block gives what resolving all of
//! them together gives; region-graph sums are exact integers, so summing per block and then
//! across blocks gives the same graph; agglomeration then runs on the same graph.
//!
//! Intermediate objects live next to the output, under `.cuboids-staging/<plan id>/`:
//! `block-<i>.labels`, `block-<i>.summary`, `block-<i>.graph` (segment), `block-<i>.remap` and
//! `block-<i>.done` (with merge rounds also `block-<i>.fragments`, `block-<i>.edges`,
//! `round-<level>-<group>.merged` and `.left`, whose payloads [`rounds`] documents). Each is a
//! 64-byte header and a gzip payload (little-endian throughout):
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | magic `CUBOIDS\0` |
//! | 8..12 | format version (2) |
//! | 12..16 | kind: 1 labels, 2 summary, 3 remap, 4 done, 5 graph, 6 fragments, 7 edges, 8 merged, 9 left |
//! | 16..32 | plan id (the md5 in the tasks' `plan.id`) |
//! | 32..40 | block index (a round's group: level << 40 \| group) |
//! | 40..48 | payload length after gunzip |
//! | 48..64 | md5 of the gzip payload |
//!
//! Payloads (voxels as region indices, Fortran order):
//! - labels: (label, run length) pairs as varints that cover the block's voxels in Fortran order
//!   (0 background);
//! - summary, all varints: count K, the K first voxels as increases from the one before (from
//!   0), K sizes, H and H halo entries (voxel as a zigzag difference from the entry before,
//!   label; sorted by voxel, then label), F and F face entries (the same; sorted by voxel).
//!
//! A varint is LEB128: 7 bits a byte, low bits first, the high bit set on all bytes but the
//! last; a zigzag difference d is stored as (d << 1) ^ (d >> 63).
//! - graph: u64 D and D open plateau voxels (u64 voxel, u8 bidirectional directions, u8 those
//!   toward an exit, u32 label, 6 u32 labels of its neighbours inside the block in waterz's
//!   direction order, 0 outside it), then u64 E and E edges (u64 key, u64 key, u64 voxel-edge
//!   count, u64 fixed-point affinity sum) sorted by keys; a key is a block label, or 2^63 + the
//!   voxel of another block's face;
//! - remap: one u32 output label per block label;
//! - done: empty.
//!
//! Every stage rewrites identical bytes when run again.
//!
//! Where each stage lives: [`block`] (block stage), [`merge`] (merge stage), [`rounds`] (merge
//! rounds and resolve), [`relabel`] (relabel stage and the block labels it reads), [`format`] (the
//! header, the store wrapper and the encodings every stage shares); planning and dispatch here.

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
/// the blocks (a union or down level) would not. Returns the tasks of each stage, in stage
/// order.
pub fn plan<W: StagedWork>(
    input: &Precomputed,
    task: &W,
    budget: &Budget,
) -> Result<(StagedPlan<W>, Vec<Vec<Task>>), StagedError> {
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

/// The stages of a plan over a grid of `counts` blocks, each a list of its tasks.
fn stages<W: StagedWork>(plan: &StagedPlan<W>, counts: Vec3, work: Work) -> Vec<Vec<Task>> {
    let each = |stage: Stage, n: usize, level: Option<u32>| -> Vec<Task> {
        (0..n)
            .map(|i| {
                W::stage_task(StageTask {
                    stage,
                    block: Some(i),
                    level,
                    plan: plan.clone(),
                })
            })
            .collect()
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
    stages.push(vec![W::stage_task(StageTask {
        stage: Stage::Finalize,
        block: None,
        level: None,
        plan: plan.clone(),
    })]);
    stages
}

/// The name of a stage task's stage (what its manifest is named after).
pub fn stage_name(task: &Task) -> String {
    match task {
        Task::SegmentStage(t) => t.stage_name(),
        Task::ConnectedComponentsStage(t) => t.stage_name(),
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
            for b in 0..plan.blocks {
                staging.get(Kind::Done, b).await?;
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
