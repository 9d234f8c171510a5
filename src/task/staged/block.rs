//! The block stage: labels one block's GPU chunks and writes its labels, its summary and (segment)
//! its graph.

use super::format::*;
use super::{Passes, StagedError, StagedWork, Work};
use crate::formats::precomputed::Precomputed;
use crate::geometry::{voxels, Box3, Vec3};
use crate::gpu::labeling::DeferredVoxel;
use crate::gpu::GpuContext;
use crate::hash::IdBuildHasher;
use crate::ops::agglomerate::EdgeStats;
use crate::ops::watershed::{Grid, DIRECTIONS};
use crate::task::segment::{
    components_labeler, label_chunks, resolve_plateaus, watershed_labeler, ChunkPass, Layout,
    PartialGraph, SegmentReport, WatershedLeftovers,
};
use crate::task::spec::StagedPlan;
use crate::task::stitch::{ChunkGrid, FinalLabels};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// What a block tells the later stages: its labels' first voxels and sizes (the `summary`
/// object), its face voxels and the halo voxels (in other blocks) its labels reach (the
/// `border` object, which the link stage reads for each neighbour).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Summary {
    pub(super) first: Vec<u64>,
    pub(super) sizes: Vec<u64>,
    pub(super) halo: Vec<(u64, u32)>,
    pub(super) face: Vec<(u64, u32)>,
}

impl Summary {
    /// The `summary` object: count K, the K first voxels as increases (they are sorted), K
    /// sizes, all varints.
    pub(super) fn encode_counts(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, self.first.len() as u64);
        put_increases(&mut out, self.first.iter().copied());
        for &size in &self.sizes {
            put_varint(&mut out, size);
        }
        out
    }

    /// A `summary` object's first voxels and sizes (halo and face empty).
    pub(super) fn decode_counts(key: &str, bytes: &[u8]) -> Result<Summary, StagedError> {
        let mut r = Reader { bytes, at: 0, key };
        // Per label a first voxel and a size.
        let count = r.count_of_pairs()?;
        let mut s = Summary {
            first: r.increases(count)?,
            ..Default::default()
        };
        for _ in 0..count {
            s.sizes.push(r.varint()?);
        }
        r.finish("summary")?;
        Ok(s)
    }

    /// This block's border: its halo and face, with the first voxel of every label they name.
    pub(super) fn border(&self) -> Border {
        let mut named: Vec<u32> = self.halo.iter().chain(&self.face).map(|e| e.1).collect();
        named.sort_unstable();
        named.dedup();
        Border {
            ids: named
                .into_iter()
                .map(|l| (l, self.first[l as usize - 1]))
                .collect(),
            halo: self.halo.clone(),
            face: self.face.clone(),
        }
    }
}

/// A block's border: the labelled voxels on its faces that other blocks share and the halo
/// voxels (in other blocks) its labels reach, each with its block label, and the first voxel of
/// every label they name (a label's name in the whole volume).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Border {
    /// (voxel, label), sorted by voxel, then label.
    pub(super) halo: Vec<(u64, u32)>,
    /// (voxel, label), sorted by voxel.
    pub(super) face: Vec<(u64, u32)>,
    /// (label, first voxel), sorted by label.
    pub(super) ids: Vec<(u32, u64)>,
}

impl Border {
    /// Varints throughout: H and H halo entries (voxel as a zigzag difference from the entry
    /// before, label), F and F face entries (the same), N and N (label increase, first voxel)
    /// pairs. A block's face is mostly consecutive voxels, so its entries take two or three
    /// bytes instead of twelve.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for list in [&self.halo, &self.face] {
            put_varint(&mut out, list.len() as u64);
            let mut last = 0u64;
            for &(voxel, label) in list {
                put_zigzag(&mut out, voxel.wrapping_sub(last) as i64);
                put_varint(&mut out, label as u64);
                last = voxel;
            }
        }
        put_varint(&mut out, self.ids.len() as u64);
        let mut last = 0;
        for &(label, id) in &self.ids {
            put_varint(&mut out, (label - last) as u64);
            put_varint(&mut out, id);
            last = label;
        }
        out
    }

    pub(super) fn decode(key: &str, bytes: &[u8]) -> Result<Border, StagedError> {
        let mut r = Reader { bytes, at: 0, key };
        let mut b = Border::default();
        for list in [&mut b.halo, &mut b.face] {
            let n = r.count_of_pairs()?;
            let mut last = 0u64;
            for _ in 0..n {
                last = last.wrapping_add(r.zigzag()? as u64);
                let label = r.varint()?;
                if label == 0 || label > u32::MAX as u64 {
                    return Err(r.corrupt(format!("label {label}")));
                }
                list.push((last, label as u32));
            }
        }
        let n = r.count_of_pairs()?;
        let mut last = 0u64;
        for _ in 0..n {
            let label = last + r.varint()?;
            if (label == last && last != 0) || label == 0 || label > u32::MAX as u64 {
                return Err(r.corrupt(format!("label {label} after {last}")));
            }
            b.ids.push((label as u32, r.varint()?));
            last = label;
        }
        r.finish("border")?;
        if !b.face.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err(r.corrupt("face voxels out of order".into()));
        }
        if !b.halo.is_sorted() {
            return Err(r.corrupt("halo voxels out of order".into()));
        }
        if let Some(&(_, l)) = b.halo.iter().chain(&b.face).find(|e| b.id(e.1).is_none()) {
            return Err(r.corrupt(format!("label {l} has no first voxel")));
        }
        Ok(b)
    }

    /// The first voxel of a label the border names.
    pub(super) fn id(&self, label: u32) -> Option<u64> {
        self.ids
            .binary_search_by_key(&label, |e| e.0)
            .ok()
            .map(|at| self.ids[at].1)
    }

    /// The label of the face voxel `voxel`, if the face has it.
    pub(super) fn face_label(&self, voxel: u64) -> Option<u32> {
        self.face
            .binary_search_by_key(&voxel, |e| e.0)
            .ok()
            .map(|at| self.face[at].1)
    }
}

/// Block stage: labels the block's chunks (segment: watershed and region graph), glues them,
/// and writes the block's labels, its graph (segment) and last its summary.
pub(super) async fn run_block<W: StagedWork>(
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
    // The summary last: a summary means that the block's other objects are there.
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
            staging.put(Kind::Plateaus, b, graph.encode_open()).await?;
            staging.put(Kind::Edges, b, graph.encode_edges()).await?;
        }
        Ok(())
    };
    let border = staging.put(Kind::Border, b, summary.border().encode());
    // Sealed alongside the others, stored after them.
    let counts = staging.seal(Kind::Summary, b, summary.encode_counts());
    let ((), (), (), counts) = futures::try_join!(labels, graph, border, counts)?;
    staging.store(Kind::Summary, b, counts).await?;
    passes.done("write");
    report.passes = passes.into_vec();
    Ok(report)
}

/// The block's labels as (label, run length) pairs in Fortran order, and the labelled voxels on
/// its faces that other blocks share (by region index, sorted), row by row: the block's labels
/// are never all in memory at once.
pub(super) fn runs_and_face(
    labels: &FinalLabels,
    block: Box3,
    region: Grid,
) -> (Vec<u32>, Vec<(u64, u32)>) {
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

pub(super) fn inside(b: Box3, p: Vec3) -> bool {
    (0..3).all(|a| p[a] >= b.start[a] && p[a] < b.stop[a])
}

/// The neighbour of `p` in direction `d`, if it is a voxel (coordinates not below 0).
pub(super) fn step(p: Vec3, d: usize) -> Option<Vec3> {
    let q = [0, 1, 2].map(|a| p[a] as i64 + DIRECTIONS[d][a]);
    q.iter().all(|&v| v >= 0).then(|| q.map(|v| v as usize))
}

/// Splits a block's deferred plateau voxels by plateau: those of plateaus entirely inside the
/// block (closed: the block resolves them, with exactly the result of resolving them with all
/// the others, since a plateau's pointers depend on its own voxels only), and those of plateaus
/// that reach past the block (open, sorted by position: the merge resolves them).
pub(super) fn split_plateaus(
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
pub(super) fn open_voxels(
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
pub(super) const VOXEL_KEY: u64 = 1 << 63;

/// The block's region graph: each chunk's pairs of box voxels translated to block labels (or
/// outside voxels), pairs inside one block label dropped, the rest summed and sorted.
pub(super) fn block_edges(
    partial: Vec<PartialGraph>,
    block: Box3,
    region: Grid,
    label_at: &impl Fn(Vec3) -> u32,
) -> Vec<(u64, u64, EdgeStats)> {
    // Key pairs gathered, then sorted and summed (faster than a map of them).
    let mut pairs: Vec<(u64, u64, EdgeStats)> = Vec::new();
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
                pairs.push((ka.min(kb), ka.max(kb), stats));
            }
        }
    }
    pairs.sort_unstable_by_key(|&(a, b, _)| (a, b));
    let mut edges: Vec<(u64, u64, EdgeStats)> = Vec::with_capacity(pairs.len());
    for (a, b, stats) in pairs {
        match edges.last_mut() {
            Some(last) if (last.0, last.1) == (a, b) => last.2.add(stats),
            _ => edges.push((a, b, stats)),
        }
    }
    edges
}

/// A plateau voxel whose plateau leaves its block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct OpenVoxel {
    pub(super) voxel: u64,
    pub(super) bidirectional: u8,
    pub(super) to_exit: u8,
    pub(super) label: u32,
    /// Block labels of the neighbours in waterz's direction order (0: outside the block or not
    /// a fragment voxel).
    pub(super) neighbours: [u32; 6],
}

/// What a segment block adds for the merge: its open plateau voxels and its partial region
/// graph.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct BlockGraph {
    pub(super) open: Vec<OpenVoxel>,
    pub(super) edges: Vec<(u64, u64, EdgeStats)>,
}

impl BlockGraph {
    const OPEN_BYTES: usize = 8 + 2 + 4 + 24;

    /// The `plateaus` object: u64 D and D open voxels (u64 voxel, u8 bidirectional directions,
    /// u8 those toward an exit, u32 label, 6 u32 labels of its neighbours inside the block).
    pub(super) fn encode_open(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.open.len() * Self::OPEN_BYTES);
        out.extend_from_slice(&(self.open.len() as u64).to_le_bytes());
        for v in &self.open {
            out.extend_from_slice(&v.voxel.to_le_bytes());
            out.extend_from_slice(&[v.bidirectional, v.to_exit]);
            for l in std::iter::once(v.label).chain(v.neighbours) {
                out.extend_from_slice(&l.to_le_bytes());
            }
        }
        out
    }

    /// The `edges` object, varints: E, and E edges sorted by keys (a < b): a as an increase from
    /// the edge before, b - a, the voxel-edge count, the fixed-point sum. A third of fixed
    /// 8-byte fields, and gzip has that much less to compress.
    pub(super) fn encode_edges(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.edges.len() * 10);
        put_varint(&mut out, self.edges.len() as u64);
        let mut last = 0;
        for &(a, b, s) in &self.edges {
            put_varint(&mut out, a - last);
            put_varint(&mut out, b - a);
            put_varint(&mut out, s.count);
            put_varint(&mut out, s.sum);
            last = a;
        }
        out
    }

    /// Decodes a block's open plateau voxels, whose labels must be below `count` + 1.
    pub(super) fn decode_open(
        key: &str,
        bytes: &[u8],
        count: usize,
    ) -> Result<Vec<OpenVoxel>, StagedError> {
        let mut r = Reader { bytes, at: 0, key };
        let label_ok = |l: u32, zero_ok: bool| (zero_ok || l != 0) && l as usize <= count;
        let n = r.u64()? as usize;
        r.check(n.saturating_mul(Self::OPEN_BYTES))?;
        let mut open = Vec::with_capacity(n);
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
            open.push(OpenVoxel {
                voxel,
                bidirectional,
                to_exit,
                label,
                neighbours,
            });
        }
        r.finish("plateaus")?;
        Ok(open)
    }

    /// Decodes a block's edges, whose labels must be below `count` + 1.
    pub(super) fn decode_edges(
        key: &str,
        bytes: &[u8],
        count: usize,
    ) -> Result<Vec<(u64, u64, EdgeStats)>, StagedError> {
        let mut r = Reader { bytes, at: 0, key };
        let n = r.count_of(4)?;
        let mut edges = Vec::with_capacity(n as usize);
        let mut last = 0u64;
        for _ in 0..n {
            let a = last
                .checked_add(r.varint()?)
                .ok_or_else(|| r.corrupt("a key past 2^64".into()))?;
            let b = a
                .checked_add(r.varint()?)
                .ok_or_else(|| r.corrupt("a key past 2^64".into()))?;
            let stats = EdgeStats {
                count: r.varint()?,
                sum: r.varint()?,
            };
            for k in [a, b] {
                if k & VOXEL_KEY == 0 && (k == 0 || k > count as u64) {
                    return Err(r.corrupt(format!("an edge's label {k} outside 1..={count}")));
                }
            }
            if edges
                .last()
                .is_some_and(|l: &(u64, u64, EdgeStats)| (l.0, l.1) >= (a, b))
                || a == b
            {
                return Err(r.corrupt(format!("edge ({a}, {b}) out of order")));
            }
            edges.push((a, b, stats));
            last = a;
        }
        r.finish("edges")?;
        Ok(edges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_and_runs_round_trip_through_varints() {
        let summary = Summary {
            first: vec![0, 5, 127, 128, 1 << 40, u64::MAX - 1],
            sizes: vec![1, 0x80, 0x3fff, 0x4000, u64::MAX, 9],
            // Halo voxels in any order, far apart and back.
            halo: vec![(0, 6), (3, 1), (3, 2), (1 << 50, 6), (u64::MAX, 2)],
            face: vec![(7, 1), (8, 1), (9, 2), (1 << 33, 3)],
        };
        let counts = summary.encode_counts();
        let border = summary.border();
        assert_eq!(
            border.ids,
            vec![(1, 0), (2, 5), (3, 127), (6, u64::MAX - 1)]
        );
        let counts_back = Summary::decode_counts("s", &counts).unwrap();
        assert_eq!(
            (counts_back.first, counts_back.sizes),
            (summary.first.clone(), summary.sizes.clone())
        );
        assert_eq!(Border::decode("b", &border.encode()).unwrap(), border);
        // Truncated anywhere: named, never a panic.
        for (bytes, key) in [(counts, "b-1.summary"), (border.encode(), "b-1.border")] {
            for cut in 0..bytes.len() {
                let got = match key.ends_with("summary") {
                    true => Summary::decode_counts(key, &bytes[..cut]).map(|_| ()),
                    false => Border::decode(key, &bytes[..cut]).map(|_| ()),
                };
                match got {
                    Err(StagedError::Corrupt { key: named, .. }) => assert_eq!(named, key),
                    other => panic!("{key} cut at {cut}: {other:?}"),
                }
            }
        }
        // A border whose halo or face names a label without a first voxel.
        let mut unnamed = summary.border();
        unnamed.ids.remove(0);
        assert!(Border::decode("b", &unnamed.encode()).is_err());
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

    #[test]
    fn edges_round_trip_and_bad_ones_are_named() {
        let stats = |count, sum| EdgeStats { count, sum };
        let graph = BlockGraph {
            open: Vec::new(),
            edges: vec![
                (1, 2, stats(1, 0)),
                (1, VOXEL_KEY | 7, stats(300, u64::MAX)),
                (3, 4, stats(2, 1 << 40)),
                (VOXEL_KEY | 5, VOXEL_KEY | 9, stats(1, 255)),
            ],
        };
        let bytes = graph.encode_edges();
        assert_eq!(
            BlockGraph::decode_edges("e", &bytes, 4).unwrap(),
            graph.edges
        );
        // A label past the block's count, and every truncation, are named.
        let err = BlockGraph::decode_edges("b-3.edges", &bytes, 3).unwrap_err();
        assert!(format!("{err}").contains("b-3.edges"), "{err}");
        for cut in 0..bytes.len() {
            match BlockGraph::decode_edges("b-3.edges", &bytes[..cut], 4) {
                Err(StagedError::Corrupt { key, .. }) => assert_eq!(key, "b-3.edges"),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        // Keys must increase: a repeated edge is refused.
        let repeated = BlockGraph {
            open: Vec::new(),
            edges: vec![(1, 2, stats(1, 0)), (1, 2, stats(1, 0))],
        };
        assert!(BlockGraph::decode_edges("e", &repeated.encode_edges(), 4).is_err());
    }
}
