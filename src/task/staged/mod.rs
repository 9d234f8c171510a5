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

use crate::formats::precomputed::{gunzip, gzip, Precomputed};
use crate::geometry::{voxels, Box3, Vec3};
use crate::gpu::labeling::DeferredVoxel;
use crate::gpu::GpuContext;
use crate::hash::IdBuildHasher;
use crate::ops::agglomerate::{agglomerate_sorted, pair_key, sum_sorted_edges, EdgeStats};
use crate::ops::union_find::UnionFind;
use crate::ops::watershed::{Grid, DIRECTIONS};
use crate::store::{ContentEncoding, Store, StoreError};
use crate::task::downsample::source_region;
use crate::task::plan::lcm;
use crate::task::segment::{
    components_labeler, label_chunks, layout, resolve_plateaus, watershed_labeler, write_output,
    ChunkPass, Layout, PartialGraph, SegmentError, SegmentReport, WatershedLeftovers,
    COMPONENTS_MARGIN, DEFAULT_CHUNK, WATERSHED_MARGIN,
};
use crate::task::spec::{
    ChunkFields, ComponentsTask, SegmentTask, Stage, StageTask, StagedPlan, Task,
};
use crate::task::stitch::{ChunkGrid, FinalLabels, LabelBoxes};

mod rounds;
use md5::{Digest, Md5};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
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
    Graph = 5,
    Fragments = 6,
    Edges = 7,
    Merged = 8,
    Left = 9,
}

impl Kind {
    fn suffix(self) -> &'static str {
        match self {
            Kind::Labels => "labels",
            Kind::Summary => "summary",
            Kind::Remap => "remap",
            Kind::Done => "done",
            Kind::Graph => "graph",
            Kind::Fragments => "fragments",
            Kind::Edges => "edges",
            Kind::Merged => "merged",
            Kind::Left => "left",
        }
    }

    /// Whether objects of this kind belong to a merge round's group (indexed by
    /// [`rounds::round_index`]) rather than to a block.
    fn of_round(self) -> bool {
        matches!(self, Kind::Merged | Kind::Left)
    }
}

const MAGIC: &[u8; 8] = b"CUBOIDS\0";
const VERSION: u32 = 2;
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

/// Intermediates a merge fetches at once: enough to hide S3 round trips, few enough that the
/// objects held while waiting for the slowest stay small.
const READ_CONCURRENCY: usize = 4;

/// The intermediates of one plan in the output store.
struct Staging {
    store: Arc<dyn Store>,
    plan: String,
}

impl Staging {
    fn key(&self, kind: Kind, block: usize) -> String {
        if kind.of_round() {
            let (level, group) = rounds::level_and_group(block);
            return format!(
                "{STAGING}/{}/round-{level}-{group}.{}",
                self.plan,
                kind.suffix()
            );
        }
        format!("{STAGING}/{}/block-{block}.{}", self.plan, kind.suffix())
    }

    /// Stores an intermediate: the header, then the payload gzipped on a blocking thread (a
    /// block's labels take tens of milliseconds, which would stall the async workers).
    async fn put(&self, kind: Kind, block: usize, payload: Vec<u8>) -> Result<(), StagedError> {
        let sealed = self.seal(kind, block, payload).await?;
        self.store(kind, block, sealed).await
    }

    /// An intermediate's bytes, compressed and checksummed on a blocking thread.
    async fn seal(
        &self,
        kind: Kind,
        block: usize,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, StagedError> {
        let plan = plan_bytes(&self.plan);
        Ok(
            tokio::task::spawn_blocking(move || seal(kind, block, plan, &payload))
                .await
                .map_err(SegmentError::from)?,
        )
    }

    /// Writes a sealed intermediate.
    async fn store(&self, kind: Kind, block: usize, data: Vec<u8>) -> Result<(), StagedError> {
        let key = self.key(kind, block);
        self.store
            .put(&key, data, ContentEncoding::Identity)
            .await
            .map_err(|source| StagedError::Store {
                key,
                source: Box::new(source),
            })
    }

    /// Reads an intermediate and checks it (on a blocking thread: checksum and gunzip).
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
        let plan = self.plan.clone();
        tokio::task::spawn_blocking(move || decode(&key, &object.data, kind, block, &plan))
            .await
            .map_err(SegmentError::from)?
    }
}

impl Staging {
    /// Gets the `kind` objects of blocks 0..n, a few at a time (on S3 each get is a round
    /// trip), and decodes each as `decode(block, key, payload)`.
    async fn get_each<T>(
        &self,
        kind: Kind,
        n: usize,
        decode: impl Fn(usize, &str, Vec<u8>) -> Result<T, StagedError>,
    ) -> Result<Vec<T>, StagedError> {
        let mut out = Vec::with_capacity(n);
        let blocks: Vec<usize> = (0..n).collect();
        for some in blocks.chunks(READ_CONCURRENCY) {
            let payloads =
                futures::future::try_join_all(some.iter().map(|&b| self.get(kind, b))).await?;
            for (&b, payload) in some.iter().zip(payloads) {
                out.push(decode(b, &self.key(kind, b), payload)?);
            }
        }
        Ok(out)
    }
}

/// An intermediate's bytes: header (magic, version, kind, plan, block, payload length, MD5 of
/// the body), then the body, the payload gzipped.
fn seal(kind: Kind, block: usize, plan: [u8; 16], payload: &[u8]) -> Vec<u8> {
    // Level 1: labels compress well at any level, and the stages should not wait on it.
    let body = gzip(payload, 1);
    let mut data = Vec::with_capacity(HEADER + body.len());
    data.extend_from_slice(MAGIC);
    data.extend_from_slice(&VERSION.to_le_bytes());
    data.extend_from_slice(&(kind as u32).to_le_bytes());
    data.extend_from_slice(&plan);
    data.extend_from_slice(&(block as u64).to_le_bytes());
    data.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    data.extend_from_slice(&Md5::digest(&body));
    data.extend_from_slice(&body);
    data
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
    let payload = gunzip(body, length as usize).map_err(|e| corrupt(format!("gzip: {e}")))?;
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
    /// Varints throughout: first voxels as increases (they are sorted), face voxels as
    /// increases, halo voxels as zigzag differences; a block's face is mostly consecutive voxels,
    /// so its entries take two or three bytes instead of twelve.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, self.first.len() as u64);
        let mut last = 0;
        for &f in &self.first {
            put_varint(&mut out, f - last);
            last = f;
        }
        for &size in &self.sizes {
            put_varint(&mut out, size);
        }
        for list in [&self.halo, &self.face] {
            put_varint(&mut out, list.len() as u64);
            let mut last = 0u64;
            for &(voxel, label) in list {
                let step = voxel.wrapping_sub(last) as i64;
                put_varint(&mut out, ((step << 1) ^ (step >> 63)) as u64);
                put_varint(&mut out, label as u64);
                last = voxel;
            }
        }
        out
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<Summary, StagedError> {
        let mut r = Reader { bytes, at: 0, key };
        // Per label a first voxel and a size.
        let count = r.count_of_pairs()?;
        let mut s = Summary::default();
        let mut last = 0u64;
        for _ in 0..count {
            last = last
                .checked_add(r.varint()?)
                .ok_or_else(|| r.corrupt("first voxels past 2^64".into()))?;
            s.first.push(last);
        }
        for _ in 0..count {
            s.sizes.push(r.varint()?);
        }
        for list in [&mut s.halo, &mut s.face] {
            let n = r.count_of_pairs()?;
            let mut last = 0u64;
            for _ in 0..n {
                let zigzag = r.varint()?;
                let step = ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64);
                last = last.wrapping_add(step as u64);
                let label = r.varint()?;
                if label == 0 || label > count {
                    return Err(r.corrupt(format!("label {label} of {count}")));
                }
                list.push((last, label as u32));
            }
        }
        if r.at != bytes.len() {
            return Err(r.corrupt(format!("{} bytes after the summary", bytes.len() - r.at)));
        }
        if !s.face.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err(r.corrupt("face voxels out of order".into()));
        }
        if !s.halo.is_sorted() {
            return Err(r.corrupt("halo voxels out of order".into()));
        }
        Ok(s)
    }
}

/// The index of the first entry of `face` (sorted by voxel) at or past `voxel`: galloping from
/// the start, so a cursor that moves a little costs a little.
fn seek(face: &[(u64, u32)], voxel: u64) -> usize {
    let mut step = 1;
    let mut low = 0;
    while low + step <= face.len() && face[low + step - 1].0 < voxel {
        low += step;
        step *= 2;
    }
    let high = (low + step).min(face.len());
    low + face[low..high].partition_point(|&(v, _)| v < voxel)
}

/// Appends `v` as an LEB128 varint (7 bits a byte, low first).
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A block's labels payload: its (label, run length) pairs as varints (most labels and runs
/// fit a byte or two, and gzip then has a third of the bytes to compress).
fn encode_runs(runs: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(runs.len() * 2);
    for &w in runs {
        put_varint(&mut out, w as u64);
    }
    out
}

/// The (label, run length) words of a labels payload. A tight loop rather than the checked
/// [`Reader`]: a segment block has millions of runs.
fn decode_runs(key: &str, bytes: &[u8]) -> Result<Vec<u32>, StagedError> {
    let corrupt = |why: String| StagedError::Corrupt {
        key: key.to_string(),
        why,
    };
    let mut words = Vec::with_capacity(bytes.len() / 2);
    let mut word = 0u64;
    let mut shift = 0;
    for &byte in bytes {
        word |= ((byte & 0x7f) as u64) << shift;
        if byte < 0x80 {
            words.push(
                u32::try_from(word)
                    .map_err(|_| corrupt(format!("run word {word} past 32 bits")))?,
            );
            word = 0;
            shift = 0;
        } else {
            shift += 7;
            if shift > 28 {
                return Err(corrupt("a run word past 32 bits".into()));
            }
        }
    }
    if shift != 0 {
        return Err(corrupt("the last run word is cut off".into()));
    }
    Ok(words)
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

    /// A count of entries of two varints each. Every varint takes a byte at least, so a count
    /// past what the bytes left can hold is corrupt, not a reason to allocate.
    fn count_of_pairs(&mut self) -> Result<u64, StagedError> {
        let n = self.varint()?;
        self.check(usize::try_from(n).unwrap_or(usize::MAX).saturating_mul(2))?;
        Ok(n)
    }

    /// An LEB128 varint of at most 64 bits.
    fn varint(&mut self) -> Result<u64, StagedError> {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let Some(&byte) = self.bytes.get(self.at) else {
                return Err(self.corrupt(format!("ends at byte {} of a summary", self.bytes.len())));
            };
            self.at += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 && (shift < 63 || byte <= 1) {
                return Ok(v);
            }
            shift += 7;
            if shift > 63 {
                return Err(self.corrupt(format!("a varint past 64 bits at byte {}", self.at)));
            }
        }
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

/// A block's labels kept as the (label, run length) pairs its block task stored, read row by row
/// through the block's relabel table: the relabel stage never expands the block to a word per
/// voxel (34 MB for 512x256x64) only to cut it into output chunks.
struct RunLabels {
    block: Box3,
    runs: Vec<u32>,
    /// Per row of the block (y, then z): the pair holding the row's first voxel, and how many of
    /// that run's voxels lie before the row.
    rows: Vec<(u32, u32)>,
    label_of: Vec<u32>,
}

impl RunLabels {
    /// Fails unless the runs are nonempty, cover exactly the block's voxels, and every label
    /// has an entry in `label_of` (label l is written as `label_of[l - 1]`, 0 stays 0).
    fn new(
        key: &str,
        block: Box3,
        runs: Vec<u32>,
        label_of: Vec<u32>,
    ) -> Result<RunLabels, StagedError> {
        let corrupt = |why: String| StagedError::Corrupt {
            key: key.to_string(),
            why,
        };
        if !runs.len().is_multiple_of(2) {
            return Err(corrupt("an odd number of run words".into()));
        }
        let shape = block.shape();
        let width = shape[0];
        let total = voxels(shape);
        let mut rows = Vec::with_capacity(shape[1] * shape[2]);
        let mut at = 0usize;
        for (i, pair) in runs.chunks_exact(2).enumerate() {
            let (label, n) = (pair[0], pair[1] as usize);
            if n == 0 || at + n > total {
                return Err(corrupt(format!(
                    "runs cover more than the block's {total} voxels (or an empty run)"
                )));
            }
            if label as usize > label_of.len() {
                return Err(corrupt(format!(
                    "label {label}, the block's table has {}",
                    label_of.len()
                )));
            }
            // The rows that begin inside this run.
            let mut row_start = rows.len() * width;
            while row_start < at + n {
                rows.push((i as u32, (row_start - at) as u32));
                row_start += width;
            }
            at += n;
        }
        if at != total {
            return Err(corrupt(format!(
                "runs cover {at} of the block's {total} voxels"
            )));
        }
        Ok(RunLabels {
            block,
            runs,
            rows,
            label_of,
        })
    }

    /// Writes `out.len()` labels of row (y, z) from x = `x` (block coordinates) into `out`.
    fn row_into(&self, row: usize, x: usize, out: &mut [u32]) {
        let (pair, before) = self.rows[row];
        let mut pair = pair as usize;
        // Voxels of the current run to pass over before `x`.
        let mut skip = before as usize + x;
        while skip >= self.runs[2 * pair + 1] as usize {
            skip -= self.runs[2 * pair + 1] as usize;
            pair += 1;
        }
        let mut filled = 0;
        while filled < out.len() {
            let (label, n) = (self.runs[2 * pair], self.runs[2 * pair + 1] as usize);
            let take = (n - skip).min(out.len() - filled);
            let value = if label == 0 {
                0
            } else {
                self.label_of[label as usize - 1]
            };
            out[filled..filled + take].fill(value);
            filled += take;
            skip = 0;
            pair += 1;
        }
    }
}

impl LabelBoxes for RunLabels {
    fn labels_in(&self, b: Box3) -> Vec<u32> {
        let mut out = vec![0u32; voxels(b.shape())];
        let part = self.block.intersect(&b);
        if part.is_empty() {
            return out;
        }
        let (shape, inner) = (self.block.shape(), b.shape());
        let width = part.shape()[0];
        let x = part.start[0] - self.block.start[0];
        for z in part.start[2]..part.stop[2] {
            for y in part.start[1]..part.stop[1] {
                let row = (y - self.block.start[1]) + shape[1] * (z - self.block.start[2]);
                let to = (part.start[0] - b.start[0])
                    + inner[0] * ((y - b.start[1]) + inner[1] * (z - b.start[2]));
                self.row_into(row, x, &mut out[to..to + width]);
            }
        }
        out
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
    /// Host bytes a block task holds per block voxel: what sizes the blocks.
    fn block_bytes_per_voxel(&self) -> usize;
    fn work(&self) -> Work<'_>;
    /// One of its stage tasks as a task document.
    fn stage_task(task: StageTask<Self>) -> Task;
}

/// What a block and the merge compute: connected components or segment.
pub enum Work<'a> {
    Components(&'a ComponentsTask),
    Segment(&'a SegmentTask),
}

/// Host bytes a connected-components block task holds per block voxel: the chunk labels, the
/// block labels, and the float input of the chunk in flight (with its share of the cache).
pub const COMPONENTS_BYTES_PER_VOXEL: usize = 16;

/// Host bytes a segment block task holds per block voxel: as connected components, plus the
/// chunks' partial region graphs (a few edges per fragment) and three affinity channels in
/// flight.
pub const SEGMENT_BYTES_PER_VOXEL: usize = 24;

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
    fn block_bytes_per_voxel(&self) -> usize {
        COMPONENTS_BYTES_PER_VOXEL
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
    fn block_bytes_per_voxel(&self) -> usize {
        SEGMENT_BYTES_PER_VOXEL
    }
    fn work(&self) -> Work<'_> {
        Work::Segment(self)
    }
    fn stage_task(task: StageTask<Self>) -> Task {
        Task::SegmentStage(task)
    }
}

/// Host bytes the merge stage of a segment plan without rounds holds per voxel of the volume,
/// to size its region graph and agglomeration before any block has run. Measured
/// (benches/staged_memory.py): 358 on the noisy-cells benchmark (a fragment per 4 voxels, the
/// worst case seen), 32 on EM-like affinities; the plan assumes the worst.
pub const MERGE_BYTES_PER_VOXEL: usize = 384;

/// Cuts a segment or connected-components task into a staged plan: blocks of whole GPU chunks
/// and output chunks, grown along x, then y, then z while a block's host memory stays within
/// `task_bytes`. A segment plan whose merge would hold more than `merge_bytes`
/// ([`MERGE_BYTES_PER_VOXEL`]) agglomerates in merge rounds instead (see [`rounds`]). Returns
/// the tasks of each stage, in stage order.
pub fn plan<W: StagedWork>(
    input: &Precomputed,
    task: &W,
    task_bytes: usize,
    merge_bytes: usize,
) -> Result<(StagedPlan<W>, Vec<Vec<Task>>), StagedError> {
    let scale = input.scale(0);
    let fields = task.chunk_fields();
    let region = source_region(scale, fields.bounds).map_err(SegmentError::from)?;
    let out_chunk = fields.output_chunk_size.unwrap_or(scale.chunk_size());
    let chunk = fields.chunk_size.unwrap_or(DEFAULT_CHUNK).map(|v| v.max(1));
    let chunk = [0, 1, 2].map(|a| chunk[a].next_multiple_of(out_chunk[a]));
    let extent = region.shape();
    let mut block = [0, 1, 2].map(|a| chunk[a].min(extent[a].next_multiple_of(chunk[a])));
    for a in 0..3 {
        while block[a] < extent[a] {
            let mut bigger = block;
            bigger[a] = (block[a] * 2).min(extent[a].next_multiple_of(chunk[a]));
            if voxels(bigger) * task.block_bytes_per_voxel() > task_bytes {
                break;
            }
            block = bigger;
        }
    }
    let block = [0, 1, 2].map(|a| block[a].next_multiple_of(lcm(chunk[a], out_chunk[a])));
    let grid = ChunkGrid {
        region: extent,
        chunk: block,
    };
    let blocks = grid.len();
    let rounds = match task.work() {
        Work::Segment(_) if voxels(extent).saturating_mul(MERGE_BYTES_PER_VOXEL) > merge_bytes => {
            rounds::levels(grid.counts())
        }
        _ => 0,
    };
    let mut work = task.clone();
    work.chunk_fields_mut().chunk_size = Some(chunk);
    let plan = StagedPlan::new(block, blocks, rounds, work);
    let stage = |stage: Stage, block: Option<usize>, level: Option<u32>| {
        W::stage_task(StageTask {
            stage,
            block,
            level,
            plan: plan.clone(),
        })
    };
    let mut stages = vec![
        (0..blocks)
            .map(|b| stage(Stage::Block, Some(b), None))
            .collect(),
        vec![stage(Stage::Merge, None, None)],
    ];
    for level in 0..rounds {
        let groups = rounds::groups(grid.counts(), level).len();
        stages.push(
            (0..groups)
                .map(|g| stage(Stage::Round, Some(g), Some(level)))
                .collect(),
        );
    }
    if rounds > 0 {
        stages.push(vec![stage(Stage::Resolve, None, None)]);
    }
    stages.push(
        (0..blocks)
            .map(|b| stage(Stage::Relabel, Some(b), None))
            .collect(),
    );
    stages.push(vec![stage(Stage::Finalize, None, None)]);
    Ok((plan, stages))
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
            let mut opts = plan.work.chunk_fields().options();
            opts.cancel = cancel;
            let binding = ctx.max_binding_bytes();
            let layout = layout(binding, input, output, &opts, plan.work.margin()).await?;
            let blocks = check_blocks(plan, &layout)?;
            run_block(&ctx, plan, input, &layout, blocks, b, &staging).await?
        }
        Stage::Merge => {
            let layout = gpu_free_layout(input, &output, plan, cancel).await?;
            let blocks = check_blocks(plan, &layout)?;
            merge(plan, blocks, &staging, &layout).await?
        }
        Stage::Round => {
            let group = task.block.ok_or_else(|| StagedError::BadPlan {
                id: plan.id.clone(),
                why: "a round task needs a group (`block`)".into(),
            })?;
            let level = task.level.ok_or_else(|| StagedError::BadPlan {
                id: plan.id.clone(),
                why: "a round task needs a `level`".into(),
            })?;
            let layout = gpu_free_layout(input, &output, plan, cancel).await?;
            let blocks = check_blocks(plan, &layout)?;
            rounds::round(plan, blocks, level, group, &staging, &layout).await?
        }
        Stage::Resolve => {
            if plan.rounds == 0 {
                return Err(StagedError::BadPlan {
                    id: plan.id.clone(),
                    why: "a resolve task in a plan without merge rounds".into(),
                });
            }
            let layout = gpu_free_layout(input, &output, plan, cancel).await?;
            let blocks = check_blocks(plan, &layout)?;
            rounds::resolve(plan, blocks, &staging, &layout).await?
        }
        Stage::Relabel => {
            let b = block("relabel")?;
            let layout = gpu_free_layout(input, &output, plan, cancel).await?;
            let blocks = check_blocks(plan, &layout)?;
            relabel(plan, &layout, blocks, b, &staging, ctx).await?
        }
        Stage::Finalize => {
            let layout = gpu_free_layout(input, &output, plan, cancel).await?;
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

/// Block stage: labels the block's chunks (segment: watershed and region graph), glues them,
/// and writes the block's labels, its graph (segment) and last its summary.
async fn run_block<W: StagedWork>(
    ctx: &Arc<GpuContext>,
    plan: &StagedPlan<W>,
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
    let fill_missing = plan.work.chunk_fields().fill_missing;
    let location = input.store.location();
    let margin = plan.work.margin();
    let mut passes = Passes::new();
    let (mut stitcher, leftovers) = match plan.work.work() {
        Work::Components(c) => {
            let label = components_labeler(ctx.clone(), c.threshold, c.connectivity, location);
            let pass = ChunkPass::new("label", margin, fill_missing, ctx);
            let stitcher = label_chunks(pass, input, layout, &chunks, label);
            (stitcher.await?, None)
        }
        Work::Segment(s) => {
            let left: Arc<std::sync::Mutex<WatershedLeftovers>> = Default::default();
            let params = s.options().watershed;
            let label = watershed_labeler(ctx.clone(), params, location, left.clone());
            let pass = ChunkPass::new("watershed", margin, fill_missing, ctx);
            let stitcher = label_chunks(pass, input, layout, &chunks, label);
            let stitcher = stitcher.await?;
            let left = std::mem::take(&mut *left.lock().expect("no panics while held"));
            (stitcher, Some(left))
        }
    };
    passes.done("label");
    let outside = stitcher.glue();
    // Plateaus that stay inside the block are resolved here; those that leave it go to the merge.
    let leftovers = leftovers.map(|left| {
        let (closed, open) = split_plateaus(left.deferred, block);
        for (p, q) in resolve_plateaus(&closed) {
            stitcher.join(p, q);
        }
        (open, left.partial)
    });
    let numbering = stitcher.number();
    // Voxels are named by their index in the region.
    let region = Grid { shape: grid.region };
    let label_at = |p: Vec3| {
        stitcher
            .node(p)
            .map_or(0, |n| numbering.label_of_node[n as usize])
    };
    passes.done("stitch");
    let graph = leftovers.map(|(open, partial)| BlockGraph {
        open: open_voxels(&open, block, region, &label_at),
        edges: block_edges(partial, block, region, &label_at),
    });
    if graph.is_some() {
        passes.done("region graph");
    }
    let mut halo: Vec<(u64, u32)> = outside
        .iter()
        .map(|&(p, node)| {
            (
                region.index(p) as u64,
                numbering.label_of_node[node as usize],
            )
        })
        .collect();
    // Sorted here, where blocks run in parallel, so that the one merge task walks each face once
    // instead of searching it per halo voxel.
    halo.sort_unstable();
    let (runs, face) = runs_and_face(&stitcher.into_final(&numbering, |l| l), block, region);
    let summary = Summary {
        first: numbering.first[1..].to_vec(),
        sizes: numbering.sizes[1..].to_vec(),
        halo,
        face,
    };
    passes.done("block labels");
    // The summary last: the merge reads only summaries and graphs, and a summary means that the
    // block's other objects are there.
    let mut report = SegmentReport {
        voxels: voxels(block.shape()) as u64,
        chunks: chunks.len(),
        fragments: summary.first.len(),
        ..Default::default()
    };
    let labels = staging.put(Kind::Labels, b, encode_runs(&runs));
    let graph = async {
        if let Some(graph) = &graph {
            report.deferred = graph.open.len();
            report.region_edges = graph.edges.len();
            staging.put(Kind::Graph, b, graph.encode()).await?;
        }
        Ok(())
    };
    // Sealed alongside the others, stored after them.
    let summary = staging.seal(Kind::Summary, b, summary.encode());
    let ((), (), summary) = futures::try_join!(labels, graph, summary)?;
    staging.store(Kind::Summary, b, summary).await?;
    passes.done("write");
    report.passes = passes.into_vec();
    Ok(report)
}

/// Times consecutive passes of a stage task, for its report.
struct Passes {
    since: Instant,
    passes: Vec<(&'static str, std::time::Duration)>,
}

impl Passes {
    fn new() -> Passes {
        Passes {
            since: Instant::now(),
            passes: Vec::new(),
        }
    }

    /// Ends the pass `name` (begun when the last one ended).
    fn done(&mut self, name: &'static str) {
        let now = Instant::now();
        self.passes.push((name, now - self.since));
        self.since = now;
    }

    fn into_vec(self) -> Vec<(&'static str, std::time::Duration)> {
        self.passes
    }
}

/// The block's labels as (label, run length) pairs in Fortran order, and the labelled voxels on
/// its faces that other blocks share (by region index, sorted), row by row: the block's labels
/// are never all in memory at once.
fn runs_and_face(labels: &FinalLabels, block: Box3, region: Grid) -> (Vec<u32>, Vec<(u64, u32)>) {
    // Only faces shared with another block: the merge never asks about the volume's own faces.
    let low = |a: usize| block.start[a] > 0;
    let high = |a: usize| block.stop[a] < region.shape[a];
    let mut runs: Vec<u32> = Vec::new();
    let mut face = Vec::new();
    labels.for_each_row(block, |y, z, row| {
        // A run of equal labels at a time (rows are mostly long runs), continuing the last run
        // across rows; a run never counts past u32::MAX.
        for run in row.chunk_by(|a, b| a == b) {
            let (l, mut n) = (run[0], run.len() as u64);
            if let [.., last, count] = runs.as_mut_slice() {
                if *last == l {
                    let add = n.min((u32::MAX - *count) as u64);
                    *count += add as u32;
                    n -= add;
                }
            }
            while n > 0 {
                let take = n.min(u32::MAX as u64);
                runs.extend([l, take as u32]);
                n -= take;
            }
        }
        let shell_row = (y == block.start[1] && low(1))
            || (y + 1 == block.stop[1] && high(1))
            || (z == block.start[2] && low(2))
            || (z + 1 == block.stop[2] && high(2));
        let mut keep = |x: usize| {
            let l = row[x - block.start[0]];
            if l != 0 {
                face.push((region.index([x, y, z]) as u64, l));
            }
        };
        if shell_row {
            (block.start[0]..block.stop[0]).for_each(&mut keep);
        } else {
            let (first, last) = (block.start[0], block.stop[0] - 1);
            if low(0) {
                keep(first);
            }
            if high(0) && !(low(0) && last == first) {
                keep(last);
            }
        }
    });
    (runs, face)
}

fn inside(b: Box3, p: Vec3) -> bool {
    (0..3).all(|a| p[a] >= b.start[a] && p[a] < b.stop[a])
}

/// The neighbour of `p` in direction `d`, if it is a voxel (coordinates not below 0).
fn step(p: Vec3, d: usize) -> Option<Vec3> {
    let q = [0, 1, 2].map(|a| p[a] as i64 + DIRECTIONS[d][a]);
    q.iter().all(|&v| v >= 0).then(|| q.map(|v| v as usize))
}

/// Splits a block's deferred plateau voxels by plateau: those of plateaus entirely inside the
/// block (closed: the block resolves them, with exactly the result of resolving them with all
/// the others, since a plateau's pointers depend on its own voxels only), and those of plateaus
/// that reach past the block (open, sorted by position: the merge resolves them).
fn split_plateaus(
    deferred: HashMap<Vec3, DeferredVoxel>,
    block: Box3,
) -> (HashMap<Vec3, DeferredVoxel>, Vec<(Vec3, DeferredVoxel)>) {
    let leaves = |p: Vec3, v: &DeferredVoxel| {
        (0..6).any(|d| {
            v.bidirectional & (1 << d) != 0 && step(p, d).is_none_or(|q| !inside(block, q))
        })
    };
    let mut open_seen: std::collections::HashSet<Vec3> = Default::default();
    let mut starts: Vec<Vec3> = deferred
        .iter()
        .filter(|(p, v)| leaves(**p, v))
        .map(|(p, _)| *p)
        .collect();
    starts.sort_unstable();
    let mut queue: VecDeque<Vec3> = VecDeque::new();
    for p in starts {
        if open_seen.insert(p) {
            queue.push_back(p);
        }
        while let Some(p) = queue.pop_front() {
            let v = deferred[&p];
            for d in (0..6).filter(|d| v.bidirectional & (1 << d) != 0) {
                if let Some(q) = step(p, d) {
                    if deferred.contains_key(&q) && open_seen.insert(q) {
                        queue.push_back(q);
                    }
                }
            }
        }
    }
    let mut closed = deferred;
    let mut open: Vec<(Vec3, DeferredVoxel)> = open_seen
        .into_iter()
        .map(|p| (p, closed.remove(&p).expect("an open voxel is deferred")))
        .collect();
    open.sort_unstable_by_key(|(p, _)| (p[2], p[1], p[0]));
    (closed, open)
}

/// Open plateau voxels as the merge needs them: with their block label and the block labels of
/// their neighbours inside the block (a pointer may end at any of them).
fn open_voxels(
    open: &[(Vec3, DeferredVoxel)],
    block: Box3,
    region: Grid,
    label_at: &impl Fn(Vec3) -> u32,
) -> Vec<OpenVoxel> {
    open.iter()
        .map(|&(p, v)| OpenVoxel {
            voxel: region.index(p) as u64,
            bidirectional: v.bidirectional,
            to_exit: v.to_exit,
            label: label_at(p),
            neighbours: std::array::from_fn(|d| {
                step(p, d).filter(|&q| inside(block, q)).map_or(0, label_at)
            }),
        })
        .collect()
}

/// A key of a block's partial region graph: a block label, or (with this bit) the region index
/// of a voxel outside the block, whose label its own block knows.
const VOXEL_KEY: u64 = 1 << 63;

/// The block's region graph: each chunk's pairs of box voxels translated to block labels (or
/// outside voxels), pairs inside one block label dropped, the rest summed and sorted.
fn block_edges(
    partial: Vec<PartialGraph>,
    block: Box3,
    region: Grid,
    label_at: &impl Fn(Vec3) -> u32,
) -> Vec<(u64, u64, EdgeStats)> {
    let mut sums: HashMap<(u64, u64), EdgeStats, IdBuildHasher> = HashMap::default();
    for PartialGraph { boxed, edges } in partial {
        let grid = Grid {
            shape: boxed.shape(),
        };
        let key = |i: u32| {
            let local = grid.position(i as usize);
            let p = [0, 1, 2].map(|a| boxed.start[a] + local[a]);
            if inside(block, p) {
                let l = label_at(p);
                assert_ne!(l, 0, "a region-graph key is a fragment voxel");
                l as u64
            } else {
                VOXEL_KEY | region.index(p) as u64
            }
        };
        let mut key_of: HashMap<u32, u64, IdBuildHasher> = HashMap::default();
        for ((a, b), stats) in edges {
            let ka = *key_of.entry(a).or_insert_with(|| key(a));
            let kb = *key_of.entry(b).or_insert_with(|| key(b));
            if ka != kb {
                sums.entry((ka.min(kb), ka.max(kb))).or_default().add(stats);
            }
        }
    }
    let mut edges: Vec<(u64, u64, EdgeStats)> =
        sums.into_iter().map(|((a, b), s)| (a, b, s)).collect();
    edges.sort_unstable_by_key(|&(a, b, _)| (a, b));
    edges
}

/// A plateau voxel whose plateau leaves its block.
#[derive(Clone, Copy, Debug, PartialEq)]
struct OpenVoxel {
    voxel: u64,
    bidirectional: u8,
    to_exit: u8,
    label: u32,
    /// Block labels of the neighbours in waterz's direction order (0: outside the block or not
    /// a fragment voxel).
    neighbours: [u32; 6],
}

/// What a segment block adds for the merge: its open plateau voxels and its partial region
/// graph.
#[derive(Clone, Debug, Default, PartialEq)]
struct BlockGraph {
    open: Vec<OpenVoxel>,
    edges: Vec<(u64, u64, EdgeStats)>,
}

impl BlockGraph {
    const OPEN_BYTES: usize = 8 + 2 + 4 + 24;
    const EDGE_BYTES: usize = 32;

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            16 + self.open.len() * Self::OPEN_BYTES + self.edges.len() * Self::EDGE_BYTES,
        );
        out.extend_from_slice(&(self.open.len() as u64).to_le_bytes());
        for v in &self.open {
            out.extend_from_slice(&v.voxel.to_le_bytes());
            out.extend_from_slice(&[v.bidirectional, v.to_exit]);
            for l in std::iter::once(v.label).chain(v.neighbours) {
                out.extend_from_slice(&l.to_le_bytes());
            }
        }
        out.extend_from_slice(&(self.edges.len() as u64).to_le_bytes());
        for (a, b, s) in &self.edges {
            for w in [*a, *b, s.count, s.sum] {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        out
    }

    /// Decodes a block's graph whose labels must be below `count` + 1.
    fn decode(key: &str, bytes: &[u8], count: usize) -> Result<BlockGraph, StagedError> {
        let mut r = Reader { bytes, at: 0, key };
        let label_ok = |l: u32, zero_ok: bool| (zero_ok || l != 0) && l as usize <= count;
        let n = r.u64()? as usize;
        r.check(n.saturating_mul(Self::OPEN_BYTES))?;
        let mut g = BlockGraph::default();
        for _ in 0..n {
            let voxel = r.u64()?;
            let [bidirectional, to_exit] = r.take()?;
            let label = r.u32()?;
            let mut neighbours = [0u32; 6];
            for l in &mut neighbours {
                *l = r.u32()?;
            }
            if !label_ok(label, false) || !neighbours.iter().all(|&l| label_ok(l, true)) {
                return Err(r.corrupt(format!("an open voxel's label outside 1..={count}")));
            }
            g.open.push(OpenVoxel {
                voxel,
                bidirectional,
                to_exit,
                label,
                neighbours,
            });
        }
        let n = r.u64()? as usize;
        r.check(n.saturating_mul(Self::EDGE_BYTES))?;
        for _ in 0..n {
            let (a, b) = (r.u64()?, r.u64()?);
            let stats = EdgeStats {
                count: r.u64()?,
                sum: r.u64()?,
            };
            for k in [a, b] {
                if k & VOXEL_KEY == 0 && !label_ok(k.try_into().unwrap_or(u32::MAX), false) {
                    return Err(r.corrupt(format!("an edge's label {k} outside 1..={count}")));
                }
            }
            g.edges.push((a, b, stats));
        }
        if r.at != bytes.len() {
            return Err(r.corrupt(format!("{} bytes after the graph", bytes.len() - r.at)));
        }
        Ok(g)
    }
}

/// Merge stage: joins the blocks through their faces (segment: and their open plateaus),
/// numbers the components by first voxel, then drops dust (connected components) or
/// agglomerates the region graph (segment), and writes each block's relabel table.
async fn merge<W: StagedWork>(
    plan: &StagedPlan<W>,
    blocks: ChunkGrid,
    staging: &Staging,
    layout: &Layout,
) -> Result<SegmentReport, StagedError> {
    let mut passes = Passes::new();
    let summaries = staging
        .get_each(Kind::Summary, plan.blocks, |_, key, bytes| {
            Summary::decode(key, &bytes)
        })
        .await?;
    let mut graphs = Vec::new();
    if let Work::Segment(_) = plan.work.work() {
        graphs = staging
            .get_each(Kind::Graph, plan.blocks, |b, key, bytes| {
                BlockGraph::decode(key, &bytes, summaries[b].first.len())
            })
            .await?;
    }
    let keys: Vec<[String; 2]> = (0..plan.blocks)
        .map(|b| [Kind::Summary, Kind::Graph].map(|k| staging.key(k, b)))
        .collect();
    passes.done("read");
    let work = plan.work.clone();
    let stop = layout.stop_check();
    let with_rounds = plan.rounds > 0;
    let joined = tokio::task::spawn_blocking(move || {
        let nodes = BlockNodes::new(&summaries, blocks, &keys);
        match work.work() {
            Work::Components(c) => join_components(&nodes, c.dust).map(Joined::Remaps),
            Work::Segment(_) if with_rounds => {
                rounds::fragment_graphs(&nodes, &graphs).map(Joined::ForRounds)
            }
            Work::Segment(s) => {
                join_segments(&nodes, &graphs, s.threshold, &stop).map(Joined::Remaps)
            }
        }
    })
    .await
    .map_err(SegmentError::from)??;
    layout.check_cancel()?;
    let mut report = match joined {
        Joined::Remaps(mut remaps) => {
            passes.passes.append(&mut remaps.report.passes);
            passes.since = Instant::now();
            for (b, remap) in remaps.tables.iter().enumerate() {
                staging
                    .put(Kind::Remap, b, u32s_to_bytes(remap).into_owned())
                    .await?;
            }
            remaps.report
        }
        Joined::ForRounds(mut graphs) => {
            passes.passes.append(&mut graphs.report.passes);
            passes.since = Instant::now();
            rounds::write_fragment_graphs(staging, &graphs).await?;
            graphs.report
        }
    };
    passes.done("write");
    report.passes = passes.into_vec();
    Ok(report)
}

/// What the merge stage computed: relabel tables, or (a plan with merge rounds) fragments and
/// their graph for the rounds.
enum Joined {
    Remaps(Remaps),
    ForRounds(rounds::FragmentGraphs),
}

struct Remaps {
    tables: Vec<Vec<u32>>,
    report: SegmentReport,
}

/// Every block label of a plan as one union-find node, and the voxels on block faces.
struct BlockNodes<'a> {
    summaries: &'a [Summary],
    /// Per block: its summary's and its graph's keys (for errors).
    keys: &'a [[String; 2]],
    offsets: Vec<usize>,
    total: usize,
    blocks: ChunkGrid,
    voxels: Grid,
}

impl<'a> BlockNodes<'a> {
    fn new(summaries: &'a [Summary], blocks: ChunkGrid, keys: &'a [[String; 2]]) -> Self {
        let mut offsets = Vec::with_capacity(summaries.len());
        let mut total = 0usize;
        for s in summaries {
            offsets.push(total);
            total += s.first.len();
        }
        BlockNodes {
            summaries,
            keys,
            offsets,
            total,
            blocks,
            voxels: Grid {
                shape: blocks.region,
            },
        }
    }

    fn node(&self, b: usize, label: u32) -> u32 {
        (self.offsets[b] + label as usize - 1) as u32
    }

    fn owner(&self, p: Vec3) -> usize {
        self.blocks.chunk_of(p)
    }

    /// The node of a voxel on its own block's face, which an object of block `asker` (its
    /// summary or its graph: `object` 0 or 1) names.
    fn face_node(&self, voxel: u64, asker: usize, object: usize) -> Result<u32, StagedError> {
        let p = self.voxels.position(voxel as usize);
        let owner = self.owner(p);
        let face = self.summaries.get(owner).map_or(&[][..], |o| &o.face[..]);
        face.binary_search_by_key(&voxel, |&(v, _)| v)
            .map(|at| self.node(owner, face[at].1))
            .map_err(|_| self.not_on_face(voxel, owner, asker, object))
    }

    /// The error for an object of block `asker` that names `voxel` as a face voxel of `owner`
    /// when that block's face lacks it.
    fn not_on_face(&self, voxel: u64, owner: usize, asker: usize, object: usize) -> StagedError {
        StagedError::Corrupt {
            key: self.keys[asker][object].clone(),
            why: format!("voxel {voxel} is not a face voxel of block {owner}"),
        }
    }

    /// Joins each block's halo voxels to the labels their own blocks give them. A halo is sorted
    /// by voxel, so the voxels it names on each neighbour's face come in that face's order: one
    /// cursor per neighbour moves forward through its face.
    fn glue_halos(&self, sets: &mut UnionFind) -> Result<(), StagedError> {
        let mut cursor = vec![0usize; self.summaries.len()];
        for (b, s) in self.summaries.iter().enumerate() {
            cursor.fill(0);
            // Runs of halo voxels mostly join the same two labels: one union per run.
            let mut last = (u32::MAX, u32::MAX);
            for &(voxel, label) in &s.halo {
                let owner = self.owner(self.voxels.position(voxel as usize));
                // A voxel past the grid has no owner, so no face and no cursor.
                let found = cursor.get_mut(owner).and_then(|at| {
                    let face = &self.summaries[owner].face;
                    *at += seek(&face[*at..], voxel);
                    face.get(*at).filter(|&&(v, _)| v == voxel)
                });
                let Some(&(_, l)) = found else {
                    return Err(self.not_on_face(voxel, owner, b, 0));
                };
                let pair = (self.node(b, label), self.node(owner, l));
                if pair != last {
                    sets.union(pair.0, pair.1);
                    last = pair;
                }
            }
        }
        Ok(())
    }

    /// Numbers the components 1..N by first voxel in region order: each node's component, and
    /// each component's size (index 0 unused).
    fn number(&self, sets: &mut UnionFind) -> (Vec<u32>, Vec<u64>) {
        let total = self.total;
        let mut first = vec![u64::MAX; total];
        let mut size = vec![0u64; total];
        for (b, s) in self.summaries.iter().enumerate() {
            for (l, (&f, &n)) in s.first.iter().zip(&s.sizes).enumerate() {
                let root = sets.find((self.offsets[b] + l) as u32) as usize;
                first[root] = first[root].min(f);
                size[root] += n;
            }
        }
        let mut roots: Vec<usize> = (0..total).filter(|&r| size[r] > 0).collect();
        roots.sort_unstable_by_key(|&r| first[r]);
        let mut component_of_root = vec![0u32; total];
        let mut sizes = vec![0u64];
        for (i, &r) in roots.iter().enumerate() {
            component_of_root[r] = i as u32 + 1;
            sizes.push(size[r]);
        }
        let component = (0..total as u32)
            .map(|n| component_of_root[sets.find(n) as usize])
            .collect();
        (component, sizes)
    }

    /// Per block, per label: `f(node)`.
    fn tables(&self, f: impl Fn(u32) -> u32) -> Vec<Vec<u32>> {
        self.summaries
            .iter()
            .enumerate()
            .map(|(b, s)| {
                (0..s.first.len())
                    .map(|l| f((self.offsets[b] + l) as u32))
                    .collect()
            })
            .collect()
    }
}

/// Connected components' merge: components through the halos, numbered by first voxel, dust
/// dropped and the rest renumbered in the same order.
fn join_components(nodes: &BlockNodes, dust: u64) -> Result<Remaps, StagedError> {
    let mut sets = UnionFind::new(nodes.total);
    nodes.glue_halos(&mut sets)?;
    let (component, sizes) = nodes.number(&mut sets);
    let mut keep = vec![0u32; sizes.len()];
    let mut next = 0u32;
    for (c, &size) in sizes.iter().enumerate().skip(1) {
        if size >= dust {
            next += 1;
            keep[c] = next;
        }
    }
    Ok(Remaps {
        tables: nodes.tables(|n| keep[component[n as usize] as usize]),
        report: SegmentReport {
            chunks: nodes.summaries.len(),
            fragments: sizes.len() - 1,
            segments: next as usize,
            ..Default::default()
        },
    })
}

/// Segment's merge: fragments through the halos and the open plateaus (resolved over their whole
/// extent, as a single process resolves them), numbered by first voxel; the blocks' partial
/// graphs translated to fragments and summed (exact integer sums, so equal to a single
/// process's graph); then agglomeration of the whole graph.
fn join_segments(
    nodes: &BlockNodes,
    graphs: &[BlockGraph],
    threshold: f64,
    stop: &dyn Fn() -> bool,
) -> Result<Remaps, StagedError> {
    let mut passes = Passes::new();
    let (fragment, fragments, deferred) = join_fragments(nodes, graphs)?;
    passes.done("stitch");
    let mut pairs = Vec::with_capacity(graphs.iter().map(|g| g.edges.len()).sum());
    for (b, g) in graphs.iter().enumerate() {
        fragment_pairs(nodes, b, g, &fragment, &mut pairs)?;
    }
    let graph = sum_sorted_edges(pairs);
    let region_edges = graph.len();
    passes.done("region graph");
    let (segment_of, merges) = agglomerate_sorted(fragments as u32, &graph, threshold, stop)
        .ok_or(SegmentError::Cancelled)?;
    passes.done("agglomerate");
    Ok(Remaps {
        tables: nodes.tables(|n| segment_of[fragment[n as usize] as usize]),
        report: SegmentReport {
            chunks: nodes.summaries.len(),
            fragments,
            segments: merges.segments,
            merges: merges.merges,
            region_edges,
            deferred,
            passes: passes.into_vec(),
            ..Default::default()
        },
    })
}

/// Block labels joined into fragments through the halos and the open plateaus (resolved over
/// their whole extent, as a single process resolves them) and numbered by first voxel: per
/// node its fragment, the number of fragments, and how many plateau voxels were resolved here.
fn join_fragments(
    nodes: &BlockNodes,
    graphs: &[BlockGraph],
) -> Result<(Vec<u32>, usize, usize), StagedError> {
    let mut sets = UnionFind::new(nodes.total);
    nodes.glue_halos(&mut sets)?;
    let mut deferred = HashMap::new();
    let mut open_at: HashMap<Vec3, (usize, &OpenVoxel)> = HashMap::new();
    for (b, g) in graphs.iter().enumerate() {
        for v in &g.open {
            let p = nodes.voxels.position(v.voxel as usize);
            if nodes.owner(p) != b {
                return Err(StagedError::Corrupt {
                    key: nodes.keys[b][1].clone(),
                    why: format!("open voxel {} lies outside the block", v.voxel),
                });
            }
            deferred.insert(
                p,
                DeferredVoxel {
                    index: 0,
                    bidirectional: v.bidirectional,
                    to_exit: v.to_exit,
                },
            );
            open_at.insert(p, (b, v));
        }
    }
    for (p, q) in resolve_plateaus(&deferred) {
        let (b, v) = open_at[&p];
        let there = if let Some(&(bq, w)) = open_at.get(&q) {
            nodes.node(bq, w.label)
        } else if nodes.owner(q) == b {
            let d = (0..6)
                .find(|&d| step(p, d) == Some(q))
                .expect("a plateau pointer is one step");
            match v.neighbours[d] {
                0 => {
                    return Err(StagedError::Corrupt {
                        key: nodes.keys[b][1].clone(),
                        why: format!("open voxel {} has no label toward {d}", v.voxel),
                    })
                }
                l => nodes.node(b, l),
            }
        } else {
            nodes.face_node(nodes.voxels.index(q) as u64, b, 1)?
        };
        sets.union(nodes.node(b, v.label), there);
    }
    let (fragment, sizes) = nodes.number(&mut sets);
    Ok((fragment, sizes.len() - 1, deferred.len()))
}

/// Block `b`'s partial region graph in fragment pairs ([`pair_key`]s), appended to `pairs`.
fn fragment_pairs(
    nodes: &BlockNodes,
    b: usize,
    g: &BlockGraph,
    fragment: &[u32],
    pairs: &mut Vec<(u64, EdgeStats)>,
) -> Result<(), StagedError> {
    let fragment_of = |k: u64| -> Result<u32, StagedError> {
        let node = if k & VOXEL_KEY != 0 {
            nodes.face_node(k & !VOXEL_KEY, b, 1)?
        } else {
            nodes.node(b, k as u32)
        };
        Ok(fragment[node as usize])
    };
    for &(ka, kb, stats) in &g.edges {
        let (fa, fb) = (fragment_of(ka)?, fragment_of(kb)?);
        if fa != fb {
            pairs.push((pair_key(fa, fb), stats));
        }
    }
    Ok(())
}

/// Relabel stage: writes the block's output chunks through its table, then its done marker.
async fn relabel<W: StagedWork>(
    plan: &StagedPlan<W>,
    layout: &Layout,
    blocks: ChunkGrid,
    b: usize,
    staging: &Staging,
    gpu: Option<Arc<GpuContext>>,
) -> Result<SegmentReport, StagedError> {
    let block = blocks.core(b);
    let mut passes = Passes::new();
    // Both read at once; when both are missing, the remap (the stage before's output) is the
    // one named, whichever read fails first.
    let (remap, labels) = futures::join!(staging.get(Kind::Remap, b), staging.get(Kind::Labels, b));
    let (remap, labels) = (remap?, labels?);
    let remap_key = staging.key(Kind::Remap, b);
    let remap = bytes_to_u32s(&remap_key, &remap, remap.len() / 4)?;
    let labels_key = staging.key(Kind::Labels, b);
    let runs = decode_runs(&labels_key, &labels)?;
    let labels = RunLabels::new(&labels_key, block, runs, remap)?;
    passes.done("read");
    let written = write_output(
        layout,
        Arc::new(labels),
        plan.work.chunk_fields().options().write,
        block,
        false,
        gpu,
    )
    .await?;
    staging.put(Kind::Done, b, Vec::new()).await?;
    passes.done("write");
    Ok(SegmentReport {
        voxels: voxels(block.shape()) as u64,
        chunks_written: written,
        passes: passes.into_vec(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs of a dense label array (Fortran order), as a block task stores them.
    fn runs_of(labels: &[u32]) -> Vec<u32> {
        labels
            .chunk_by(|a, b| a == b)
            .flat_map(|run| [run[0], run.len() as u32])
            .collect()
    }

    #[test]
    fn run_labels_read_any_box_as_the_dense_labels_do() {
        let block = Box3::new([4, 8, 2], [17, 13, 9]);
        let shape = block.shape();
        // Runs that cross rows and planes, runs of one voxel, and background.
        let mut seed = 7u32;
        let mut labels = Vec::new();
        while labels.len() < voxels(shape) {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let len = 1 + (seed >> 8) as usize % 23;
            let label = (seed >> 20) % 6;
            labels.extend(std::iter::repeat_n(label, len));
        }
        labels.truncate(voxels(shape));
        let label_of = vec![50, 40, 30, 20, 10];
        let runs = RunLabels::new("k", block, runs_of(&labels), label_of.clone()).unwrap();
        let boxes = [
            block,
            Box3::new([4, 8, 2], [5, 9, 3]),
            Box3::new([16, 12, 8], [17, 13, 9]),
            Box3::new([7, 9, 3], [15, 12, 8]),
            Box3::new([0, 0, 0], [10, 10, 4]),
        ];
        for b in boxes {
            let got = runs.labels_in(b);
            let mut i = 0;
            for z in b.start[2]..b.stop[2] {
                for y in b.start[1]..b.stop[1] {
                    for x in b.start[0]..b.stop[0] {
                        let p = [x, y, z];
                        let want =
                            if (0..3).all(|a| (block.start[a]..block.stop[a]).contains(&p[a])) {
                                let l = labels[(x - 4) + shape[0] * ((y - 8) + shape[1] * (z - 2))];
                                if l == 0 {
                                    0
                                } else {
                                    label_of[l as usize - 1]
                                }
                            } else {
                                0
                            };
                        assert_eq!(got[i], want, "{p:?} in {b:?}");
                        i += 1;
                    }
                }
            }
        }
    }

    #[test]
    fn run_labels_name_runs_that_do_not_fit_the_block() {
        let block = Box3::new([0, 0, 0], [4, 2, 1]);
        let why = |runs: Vec<u32>, table: usize| match RunLabels::new(
            "b.labels",
            block,
            runs,
            vec![1; table],
        ) {
            Err(StagedError::Corrupt { key, why }) => {
                assert_eq!(key, "b.labels");
                why
            }
            _ => panic!("accepted"),
        };
        assert!(why(vec![1, 4, 2, 3], 2).contains("cover 7 of the block's 8"));
        assert!(why(vec![1, 4, 2, 5], 2).contains("more than the block's 8"));
        assert!(why(vec![1, 4, 2, 0, 1, 4], 2).contains("empty run"));
        assert!(why(vec![1, 4, 3, 4], 2).contains("label 3, the block's table has 2"));
        assert!(why(vec![1, 4, 2], 2).contains("odd number"));
    }

    #[test]
    fn summaries_and_runs_round_trip_through_varints() {
        let summary = Summary {
            first: vec![0, 5, 127, 128, 1 << 40, u64::MAX - 1],
            sizes: vec![1, 0x80, 0x3fff, 0x4000, u64::MAX, 9],
            // Halo voxels in any order, far apart and back.
            halo: vec![(0, 6), (3, 1), (3, 2), (1 << 50, 6), (u64::MAX, 2)],
            face: vec![(7, 1), (8, 1), (9, 2), (1 << 33, 3)],
        };
        let bytes = summary.encode();
        assert_eq!(Summary::decode("s", &bytes).unwrap(), summary);
        // Truncated anywhere: named, never a panic.
        for cut in 0..bytes.len() {
            match Summary::decode("b-1.summary", &bytes[..cut]) {
                Err(StagedError::Corrupt { key, .. }) => assert_eq!(key, "b-1.summary"),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        let runs = vec![0, 1, 3, 127, u32::MAX, 128, 1, 0x4000];
        assert_eq!(decode_runs("l", &encode_runs(&runs)).unwrap(), runs);
        let mut past = Vec::new();
        put_varint(&mut past, 1 << 32);
        assert!(format!("{:?}", decode_runs("l", &past).unwrap_err()).contains("past 32 bits"));
        let cut = &encode_runs(&[300])[..1];
        assert!(format!("{:?}", decode_runs("l", cut).unwrap_err()).contains("cut off"));
        let too_long = [0xff; 11];
        let mut r = Reader {
            bytes: &too_long,
            at: 0,
            key: "k",
        };
        assert!(format!("{:?}", r.varint().unwrap_err()).contains("past 64 bits"));
        let mut max = Vec::new();
        put_varint(&mut max, u64::MAX);
        let mut r = Reader {
            bytes: &max,
            at: 0,
            key: "k",
        };
        assert_eq!(r.varint().unwrap(), u64::MAX);
    }
}
