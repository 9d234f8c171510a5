//! Connected components past one machine: a plan cuts the region into blocks, and four stages
//! of tasks (Batch array children or activity tasks, each in any order within its stage) give
//! exactly the labels of a single-process run.
//!
//! 1. **block** (GPU, one per block): labels the block's GPU chunks, glued inside the block, then
//!    numbered by first voxel within the block. Writes the block's labels and a summary: per
//!    label its first voxel (region order) and size, the block's face voxels with their labels,
//!    and the halo voxels outside the block that its labels reach.
//! 2. **merge** (one task, no GPU): joins the blocks through their halos and faces, numbers the
//!    components 1..N by first voxel, drops dust, and writes each block's relabel table.
//! 3. **relabel** (one per block, no GPU): writes the block's output chunks through its table.
//! 4. **finalize** (one task): checks that every block was relabelled, then writes the output's
//!    info: until then the output is not a volume, so no partial output passes for a finished
//!    one.
//!
//! Intermediate objects live next to the output, under `.cuboids-staging/<plan id>/`:
//! `block-<i>.labels`, `block-<i>.summary`, `block-<i>.remap` and `block-<i>.done`. Each is a
//! 64-byte header and a gzip payload (little-endian throughout):
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | magic `CUBOIDS\0` |
//! | 8..12 | format version (1) |
//! | 12..16 | kind: 1 labels, 2 summary, 3 remap, 4 done |
//! | 16..32 | plan id (the md5 in the tasks' `plan.id`) |
//! | 32..40 | block index |
//! | 40..48 | payload length after gunzip |
//! | 48..64 | md5 of the gzip payload |
//!
//! Payloads: labels, (u32 label, u32 run length) pairs that cover the block's voxels in Fortran
//! order (0 background); summary, u32 count
//! K, K u64 first voxels, K u64 sizes, u64 H and H (u64 voxel, u32 label) halo entries, u64 F and
//! F (u64 voxel, u32 label) face entries (voxels as region indices); remap, one u32 output label
//! per block label; done, empty. Every stage rewrites identical bytes when run again.

use crate::formats::precomputed::{gunzip, gzip, Precomputed};
use crate::geometry::{voxels, Box3};
use crate::gpu::GpuContext;
use crate::ops::union_find::UnionFind;
use crate::ops::watershed::Grid;
use crate::store::{ContentEncoding, Store, StoreError};
use crate::task::downsample::source_region;
use crate::task::plan::lcm;
use crate::task::segment::{
    components_labeler, label_chunks, layout, write_output, Layout, SegmentError, SegmentReport,
    COMPONENTS_MARGIN, DEFAULT_CHUNK,
};
use crate::task::spec::{ComponentsPlan, ComponentsStageTask, ComponentsTask, Stage, Task};
use crate::task::stitch::{for_each_shell_row, ChunkGrid, FinalLabels};
use md5::{Digest, Md5};
use std::sync::Arc;
use std::time::Instant;
use thiserror::Error;

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
}

impl From<SegmentError> for StagedError {
    fn from(e: SegmentError) -> Self {
        StagedError::Segment(Box::new(e))
    }
}

/// The kinds of intermediate object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Labels = 1,
    Summary = 2,
    Remap = 3,
    Done = 4,
}

impl Kind {
    fn suffix(self) -> &'static str {
        match self {
            Kind::Labels => "labels",
            Kind::Summary => "summary",
            Kind::Remap => "remap",
            Kind::Done => "done",
        }
    }
}

const MAGIC: &[u8; 8] = b"CUBOIDS\0";
const VERSION: u32 = 1;
const HEADER: usize = 64;
/// The largest payload a header may claim (a block of 2^31 voxels' labels is 8 GiB).
const MAX_PAYLOAD: u64 = 1 << 36;

fn plan_bytes(id: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = id
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The intermediates of one plan in the output store.
struct Staging {
    store: Arc<dyn Store>,
    plan: String,
}

impl Staging {
    fn key(&self, kind: Kind, block: usize) -> String {
        format!("{STAGING}/{}/block-{block}.{}", self.plan, kind.suffix())
    }

    async fn put(&self, kind: Kind, block: usize, payload: &[u8]) -> Result<(), StagedError> {
        let key = self.key(kind, block);
        // Level 1: labels compress well at any level, and the stages should not wait on it.
        let body = gzip(payload, 1);
        let mut data = Vec::with_capacity(HEADER + body.len());
        data.extend_from_slice(MAGIC);
        data.extend_from_slice(&VERSION.to_le_bytes());
        data.extend_from_slice(&(kind as u32).to_le_bytes());
        data.extend_from_slice(&plan_bytes(&self.plan));
        data.extend_from_slice(&(block as u64).to_le_bytes());
        data.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        data.extend_from_slice(&Md5::digest(&body));
        data.extend_from_slice(&body);
        self.store
            .put(&key, data, ContentEncoding::Identity)
            .await
            .map_err(|source| StagedError::Store {
                key,
                source: Box::new(source),
            })
    }

    async fn get(&self, kind: Kind, block: usize) -> Result<Vec<u8>, StagedError> {
        let key = self.key(kind, block);
        let object = self
            .store
            .get(&key)
            .await
            .map_err(|source| StagedError::Store {
                key: key.clone(),
                source: Box::new(source),
            })?
            .ok_or_else(|| StagedError::Missing { key: key.clone() })?;
        decode(&key, &object.data, kind, block, &self.plan)
    }
}

/// Checks an intermediate's header and returns its payload.
fn decode(
    key: &str,
    data: &[u8],
    kind: Kind,
    block: usize,
    plan: &str,
) -> Result<Vec<u8>, StagedError> {
    let corrupt = |why: String| StagedError::Corrupt {
        key: key.to_string(),
        why,
    };
    if data.len() < HEADER || &data[..8] != MAGIC {
        return Err(corrupt(format!(
            "{} bytes without a cuboids header",
            data.len()
        )));
    }
    let word = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"));
    let long = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"));
    if word(8) != VERSION {
        return Err(corrupt(format!(
            "format version {} (expected {VERSION})",
            word(8)
        )));
    }
    if word(12) != kind as u32 {
        return Err(corrupt(format!(
            "kind {} (expected {})",
            word(12),
            kind as u32
        )));
    }
    if data[16..32] != plan_bytes(plan) {
        return Err(StagedError::OtherPlan {
            key: key.to_string(),
            found: hex(&data[16..32]),
            expected: plan.to_string(),
        });
    }
    if long(32) != block as u64 {
        return Err(corrupt(format!("block {} (expected {block})", long(32))));
    }
    let length = long(40);
    if length > MAX_PAYLOAD {
        return Err(corrupt(format!("claims a payload of {length} bytes")));
    }
    let body = &data[HEADER..];
    if Md5::digest(body)[..] != data[48..64] {
        return Err(corrupt("checksum mismatch (truncated or altered)".into()));
    }
    let payload = gunzip(body).map_err(|e| corrupt(format!("gzip: {e}")))?;
    if payload.len() as u64 != length {
        return Err(corrupt(format!(
            "payload of {} bytes, header says {length}",
            payload.len()
        )));
    }
    Ok(payload)
}

/// What a block tells the merge: its labels' first voxels and sizes, its face voxels and the
/// halo voxels (in other blocks) its labels reach.
#[derive(Clone, Debug, Default, PartialEq)]
struct Summary {
    first: Vec<u64>,
    sizes: Vec<u64>,
    halo: Vec<(u64, u32)>,
    face: Vec<(u64, u32)>,
}

impl Summary {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.first.len() as u32).to_le_bytes());
        for v in self.first.iter().chain(&self.sizes) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for list in [&self.halo, &self.face] {
            out.extend_from_slice(&(list.len() as u64).to_le_bytes());
            for &(voxel, label) in list {
                out.extend_from_slice(&voxel.to_le_bytes());
                out.extend_from_slice(&label.to_le_bytes());
            }
        }
        out
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<Summary, StagedError> {
        let mut r = Reader { bytes, at: 0, key };
        let count = r.u32()? as usize;
        let mut s = Summary {
            first: r.u64s(count)?,
            sizes: r.u64s(count)?,
            ..Default::default()
        };
        for list in [&mut s.halo, &mut s.face] {
            let n = r.u64()? as usize;
            r.check(n.saturating_mul(12))?;
            for _ in 0..n {
                let voxel = r.u64()?;
                let label = r.u32()?;
                if label == 0 || label as usize > count {
                    return Err(r.corrupt(format!("label {label} of {count}")));
                }
                list.push((voxel, label));
            }
        }
        if r.at != bytes.len() {
            return Err(r.corrupt(format!("{} bytes after the summary", bytes.len() - r.at)));
        }
        if !s.face.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err(r.corrupt("face voxels out of order".into()));
        }
        Ok(s)
    }
}

/// Reads little-endian fields, failing with the object's key where they run out.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    key: &'a str,
}

impl Reader<'_> {
    fn corrupt(&self, why: String) -> StagedError {
        StagedError::Corrupt {
            key: self.key.to_string(),
            why,
        }
    }

    fn check(&self, n: usize) -> Result<(), StagedError> {
        if self.bytes.len() - self.at < n {
            return Err(self.corrupt(format!("ends at byte {} of a summary", self.bytes.len())));
        }
        Ok(())
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], StagedError> {
        self.check(N)?;
        let out = self.bytes[self.at..self.at + N]
            .try_into()
            .expect("N bytes");
        self.at += N;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, StagedError> {
        Ok(u32::from_le_bytes(self.take()?))
    }

    fn u64(&mut self) -> Result<u64, StagedError> {
        Ok(u64::from_le_bytes(self.take()?))
    }

    fn u64s(&mut self, n: usize) -> Result<Vec<u64>, StagedError> {
        self.check(n.saturating_mul(8))?;
        (0..n).map(|_| self.u64()).collect()
    }
}

/// Words as little-endian bytes: borrowed as they are on little-endian machines.
fn u32s_to_bytes(words: &[u32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice(words).into()
    } else {
        words
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect::<Vec<u8>>()
            .into()
    }
}

fn bytes_to_u32s(key: &str, bytes: &[u8], expected: usize) -> Result<Vec<u32>, StagedError> {
    if bytes.len() != expected * 4 {
        return Err(StagedError::Corrupt {
            key: key.to_string(),
            why: format!("{} bytes, expected {}", bytes.len(), expected * 4),
        });
    }
    if cfg!(target_endian = "little") {
        return Ok(bytemuck::pod_collect_to_vec(bytes));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect())
}

/// Labels as (label, run length) pairs: block labels come in long runs, which makes the payload
/// small before gzip (and gzip fast).
fn runs_of(labels: &[u32]) -> Vec<u32> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < labels.len() {
        let l = labels[i];
        let n = labels[i..]
            .iter()
            .take(u32::MAX as usize)
            .take_while(|&&v| v == l)
            .count();
        runs.extend([l, n as u32]);
        i += n;
    }
    runs
}

/// The labels of (label, run length) pairs, which must cover exactly `voxels` voxels.
fn expand_runs(key: &str, runs: &[u32], voxels: usize) -> Result<Vec<u32>, StagedError> {
    let corrupt = |why: String| StagedError::Corrupt {
        key: key.to_string(),
        why,
    };
    if !runs.len().is_multiple_of(2) {
        return Err(corrupt("an odd number of run words".into()));
    }
    let mut labels = Vec::with_capacity(voxels);
    for pair in runs.chunks_exact(2) {
        let n = pair[1] as usize;
        if n == 0 || labels.len() + n > voxels {
            return Err(corrupt(format!(
                "runs cover more than the block's {voxels} voxels (or an empty run)"
            )));
        }
        labels.extend(std::iter::repeat_n(pair[0], n));
    }
    if labels.len() != voxels {
        return Err(corrupt(format!(
            "runs cover {} of the block's {voxels} voxels",
            labels.len()
        )));
    }
    Ok(labels)
}

/// Host bytes a block task holds per block voxel: the decoded float input (with its margins and
/// the chunk cache's share), the chunk labels and the block labels.
pub const BLOCK_BYTES_PER_VOXEL: usize = 16;

/// Cuts a connected-components task into a staged plan: blocks of whole GPU chunks and output
/// chunks, grown along x, then y, then z while a block's host memory stays within `task_bytes`.
/// Returns the tasks of each stage, in stage order.
pub fn plan_components(
    input: &Precomputed,
    task: &ComponentsTask,
    task_bytes: usize,
) -> Result<(ComponentsPlan, Vec<Vec<Task>>), StagedError> {
    let scale = input.scale(0);
    let region = source_region(scale, task.chunks.bounds).map_err(SegmentError::from)?;
    let out_chunk = task.chunks.output_chunk_size.unwrap_or(scale.chunk_size());
    let chunk = task
        .chunks
        .chunk_size
        .unwrap_or(DEFAULT_CHUNK)
        .map(|v| v.max(1));
    let chunk = [0, 1, 2].map(|a| chunk[a].next_multiple_of(out_chunk[a]));
    let extent = region.shape();
    let mut block = [0, 1, 2].map(|a| chunk[a].min(extent[a].next_multiple_of(chunk[a])));
    for a in 0..3 {
        while block[a] < extent[a] {
            let mut bigger = block;
            bigger[a] = (block[a] * 2).min(extent[a].next_multiple_of(chunk[a]));
            if voxels(bigger) * BLOCK_BYTES_PER_VOXEL > task_bytes {
                break;
            }
            block = bigger;
        }
    }
    let block = [0, 1, 2].map(|a| block[a].next_multiple_of(lcm(chunk[a], out_chunk[a])));
    let blocks = ChunkGrid {
        region: extent,
        chunk: block,
    }
    .len();
    let mut components = task.clone();
    components.chunks.chunk_size = Some(chunk);
    let plan = ComponentsPlan::new(block, blocks, components);
    let stage = |stage: Stage, block: Option<usize>| {
        Task::ConnectedComponentsStage(ComponentsStageTask {
            stage,
            block,
            plan: plan.clone(),
        })
    };
    let stages = vec![
        (0..blocks).map(|b| stage(Stage::Block, Some(b))).collect(),
        vec![stage(Stage::Merge, None)],
        (0..blocks)
            .map(|b| stage(Stage::Relabel, Some(b)))
            .collect(),
        vec![stage(Stage::Finalize, None)],
    ];
    Ok((plan, stages))
}

/// Runs one task of a staged plan. Only the block stage uses the GPU (`ctx`; the other stages
/// run where there is none).
pub async fn run_stage(
    task: &ComponentsStageTask,
    input: &Precomputed,
    output: Arc<dyn Store>,
    ctx: Option<Arc<GpuContext>>,
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
    let block = |what: &str| {
        task.block
            .filter(|&b| b < plan.blocks)
            .ok_or_else(|| StagedError::BadPlan {
                id: plan.id.clone(),
                why: format!(
                    "a {what} task needs a block below {} (got {:?})",
                    plan.blocks, task.block
                ),
            })
    };
    let opts = plan.components.options();
    let staging = Staging {
        store: output.clone(),
        plan: plan.id.clone(),
    };
    let mut report = match task.stage {
        Stage::Block => {
            let b = block("block")?;
            let ctx = ctx.ok_or_else(|| StagedError::BadPlan {
                id: plan.id.clone(),
                why: "the block stage needs a GPU".into(),
            })?;
            let binding = ctx.max_binding_bytes();
            let layout = layout(binding, input, output, &opts.chunks, COMPONENTS_MARGIN).await?;
            let blocks = check_blocks(plan, &layout)?;
            run_block(&ctx, plan, input, &layout, blocks, b, &staging).await?
        }
        Stage::Merge => {
            let layout = gpu_free_layout_context(input, &output, plan).await?;
            let blocks = check_blocks(plan, &layout)?;
            merge(plan, blocks, &staging).await?
        }
        Stage::Relabel => {
            let b = block("relabel")?;
            let ctx = gpu_free_layout_context(input, &output, plan).await?;
            let blocks = check_blocks(plan, &ctx)?;
            relabel(plan, &ctx, blocks, b, &staging).await?
        }
        Stage::Finalize => {
            let layout = gpu_free_layout_context(input, &output, plan).await?;
            check_blocks(plan, &layout)?;
            for b in 0..plan.blocks {
                staging.get(Kind::Done, b).await?;
            }
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
                ..Default::default()
            }
        }
    };
    report.wall = start.elapsed();
    Ok(report)
}

/// The layout of the stages that need no GPU (relabel, finalize): the plan fixes the chunk size,
/// so no adapter limit is consulted.
async fn gpu_free_layout_context(
    input: &Precomputed,
    output: &Arc<dyn Store>,
    plan: &ComponentsPlan,
) -> Result<Layout, StagedError> {
    let opts = plan.components.options();
    Ok(layout(
        u64::MAX,
        input,
        output.clone(),
        &opts.chunks,
        COMPONENTS_MARGIN,
    )
    .await?)
}

/// The plan's block grid, checked against the run's layout: blocks must be whole GPU chunks and
/// their count the plan's.
fn check_blocks(plan: &ComponentsPlan, layout: &Layout) -> Result<ChunkGrid, StagedError> {
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

/// Block stage: labels the block's chunks and writes its labels and summary.
async fn run_block(
    ctx: &Arc<GpuContext>,
    plan: &ComponentsPlan,
    input: &Precomputed,
    layout: &Layout,
    blocks: ChunkGrid,
    b: usize,
    staging: &Staging,
) -> Result<SegmentReport, StagedError> {
    let block = blocks.core(b);
    let grid = layout.grid;
    let chunks: Vec<usize> = (0..grid.len())
        .filter(|&c| block.intersect(&grid.core(c)) == grid.core(c))
        .collect();
    let c = &plan.components;
    let mut stitcher = label_chunks(
        input,
        layout,
        COMPONENTS_MARGIN,
        c.chunks.fill_missing,
        &chunks,
        components_labeler(
            ctx.clone(),
            c.threshold,
            c.connectivity,
            input.store.location(),
        ),
    )
    .await?;
    let outside = stitcher.glue();
    let numbering = stitcher.number();
    // Voxels are named by their index in the region.
    let region = Grid { shape: grid.region };
    let halo = outside
        .iter()
        .map(|&(p, node)| {
            (
                region.index(p) as u64,
                numbering.label_of_node[node as usize],
            )
        })
        .collect();
    let labels = stitcher.into_final(&numbering, |l| l).labels_in(block);
    let inner = Box3::new(
        [0, 1, 2].map(|a| (block.start[a] + 1).min(block.stop[a])),
        [0, 1, 2].map(|a| block.stop[a].saturating_sub(1).max(block.start[a])),
    );
    let at = Grid {
        shape: block.shape(),
    };
    let mut face = Vec::new();
    for_each_shell_row(block, inner, |start, len| {
        for x in start[0]..start[0] + len {
            let p = [x, start[1], start[2]];
            let l = labels[at.index([0, 1, 2].map(|a| p[a] - block.start[a]))];
            if l != 0 {
                face.push((region.index(p) as u64, l));
            }
        }
    });
    let summary = Summary {
        first: numbering.first[1..].to_vec(),
        sizes: numbering.sizes[1..].to_vec(),
        halo,
        face,
    };
    // The summary last: the merge reads only summaries, and a summary means the labels are there.
    staging
        .put(Kind::Labels, b, &u32s_to_bytes(&runs_of(&labels)))
        .await?;
    staging.put(Kind::Summary, b, &summary.encode()).await?;
    Ok(SegmentReport {
        voxels: voxels(block.shape()) as u64,
        chunks: chunks.len(),
        fragments: summary.first.len(),
        ..Default::default()
    })
}

/// Merge stage: joins the blocks through their faces, numbers the components by first voxel
/// (dust dropped), and writes each block's relabel table.
async fn merge(
    plan: &ComponentsPlan,
    blocks: ChunkGrid,
    staging: &Staging,
) -> Result<SegmentReport, StagedError> {
    let mut summaries = Vec::with_capacity(plan.blocks);
    for b in 0..plan.blocks {
        let bytes = staging.get(Kind::Summary, b).await?;
        summaries.push(Summary::decode(&staging.key(Kind::Summary, b), &bytes)?);
    }
    let remaps = tokio::task::spawn_blocking({
        let dust = plan.components.dust;
        let keys: Vec<String> = (0..plan.blocks)
            .map(|b| staging.key(Kind::Summary, b))
            .collect();
        move || join_blocks(&summaries, blocks, dust, &keys)
    })
    .await
    .map_err(SegmentError::from)??;
    for (b, remap) in remaps.tables.iter().enumerate() {
        staging.put(Kind::Remap, b, &u32s_to_bytes(remap)).await?;
    }
    Ok(SegmentReport {
        chunks: plan.blocks,
        fragments: remaps.components,
        segments: remaps.segments,
        ..Default::default()
    })
}

struct Remaps {
    tables: Vec<Vec<u32>>,
    components: usize,
    segments: usize,
}

/// The merge's computation: union-find over every block's labels, joined where a halo voxel of
/// one block is a face voxel of another.
fn join_blocks(
    summaries: &[Summary],
    blocks: ChunkGrid,
    dust: u64,
    keys: &[String],
) -> Result<Remaps, StagedError> {
    let mut offsets = Vec::with_capacity(summaries.len());
    let mut total = 0usize;
    for s in summaries {
        offsets.push(total);
        total += s.first.len();
    }
    let voxel_grid = Grid {
        shape: blocks.region,
    };
    let mut sets = UnionFind::new(total);
    for (b, s) in summaries.iter().enumerate() {
        for &(voxel, label) in &s.halo {
            // The block that holds the voxel, and the voxel among its (sorted) face voxels.
            let owner = blocks.chunk_of(voxel_grid.position(voxel as usize));
            let face = &summaries.get(owner).map_or(&[][..], |o| &o.face[..]);
            let there = face
                .binary_search_by_key(&voxel, |&(v, _)| v)
                .map(|at| offsets[owner] + face[at].1 as usize - 1)
                .map_err(|_| StagedError::Corrupt {
                    key: keys[b].clone(),
                    why: format!("halo voxel {voxel} is not a face voxel of block {owner}"),
                })?;
            sets.union((offsets[b] + label as usize - 1) as u32, there as u32);
        }
    }
    let mut first = vec![u64::MAX; total];
    let mut size = vec![0u64; total];
    for (b, s) in summaries.iter().enumerate() {
        for (l, (&f, &n)) in s.first.iter().zip(&s.sizes).enumerate() {
            let root = sets.find((offsets[b] + l) as u32) as usize;
            first[root] = first[root].min(f);
            size[root] += n;
        }
    }
    let mut roots: Vec<usize> = (0..total).filter(|&r| size[r] > 0).collect();
    roots.sort_unstable_by_key(|&r| first[r]);
    let mut label_of_root = vec![0u32; total];
    let mut next = 0u32;
    for &r in &roots {
        if size[r] >= dust {
            next += 1;
            label_of_root[r] = next;
        }
    }
    let tables = summaries
        .iter()
        .enumerate()
        .map(|(b, s)| {
            (0..s.first.len())
                .map(|l| label_of_root[sets.find((offsets[b] + l) as u32) as usize])
                .collect()
        })
        .collect();
    Ok(Remaps {
        tables,
        components: roots.len(),
        segments: next as usize,
    })
}

/// Relabel stage: writes the block's output chunks through its table, then its done marker.
async fn relabel(
    plan: &ComponentsPlan,
    layout: &Layout,
    blocks: ChunkGrid,
    b: usize,
    staging: &Staging,
) -> Result<SegmentReport, StagedError> {
    let block = blocks.core(b);
    let remap = staging.get(Kind::Remap, b).await?;
    let remap_key = staging.key(Kind::Remap, b);
    let remap = bytes_to_u32s(&remap_key, &remap, remap.len() / 4)?;
    let labels = staging.get(Kind::Labels, b).await?;
    let labels_key = staging.key(Kind::Labels, b);
    let runs = bytes_to_u32s(&labels_key, &labels, labels.len() / 4)?;
    let labels = expand_runs(&labels_key, &runs, voxels(block.shape()))?;
    if let Some(&l) = labels.iter().find(|&&l| l as usize > remap.len()) {
        return Err(StagedError::Corrupt {
            key: labels_key,
            why: format!("label {l}, the block's table has {}", remap.len()),
        });
    }
    let labels = FinalLabels::from_box(block, labels, remap);
    let written = write_output(
        layout,
        Arc::new(labels),
        plan.components.options().chunks.write,
        block,
        false,
    )
    .await?;
    staging.put(Kind::Done, b, &[]).await?;
    Ok(SegmentReport {
        voxels: voxels(block.shape()) as u64,
        chunks_written: written,
        ..Default::default()
    })
}
