//! Segment's agglomeration as a hierarchy of tasks (ABISS's rounds), with exactly the single
//! process's result and no task that holds the whole region graph.
//!
//! Fragments are named by their first voxel (the union stages join a block's labels into
//! them, see [`super::union`]); a region is named by its smallest fragment.
//!
//! - **round-0** (one per block): the block's region-graph edges, recorded by the block stage
//!   between its labels or voxels of its neighbours' faces, translated to fragments (its own
//!   labels through its fragment table, a neighbour's face voxels through the neighbour's border
//!   and face fragments) and summed; every fragment with a voxel in the block is a node, with
//!   its block box (the blocks its pieces lie in or touch across a face: where its edges can
//!   be). Then agglomeration as far as the block decides it ([`agglomerate_group`]).
//! - **round-l** (one per group of 2^l blocks on each axis, up to the level whose single group
//!   is the grid): sums what its eight child groups left and agglomerates it.
//!
//! A round agglomerates best first exactly as one whole run would, but only where its group
//! decides: a region whose block box leaves the group is frozen (some of its edges are
//! elsewhere), and so is every region whose best edge leads to a frozen one. A region left
//! unfrozen is final: all its edges are at or past the threshold, and so is any edge a later
//! round forms from them (a weighted average), so it never merges again. The frozen regions,
//! with the edges between them, go up to the parent (`round-<l>-<g>.left`); each input region's
//! region and which regions froze go to `round-<l>-<g>.map`. The top round freezes nothing and
//! writes each input region's segment (`round-<top>-0.finals`).
//!
//! - **resolve-l** (one per group, from the level below the top down to 1): a group's inputs'
//!   segments from its map and its parent's finals (`round-<l>-<g>.finals`).
//! - **resolve-0** (one per block): the same for the block, then each label's segment (through
//!   its fragment), written as the block's components for the numbering ([`super::number`]).
//!
//! What a round task holds: at level 0 its block's region graph (a few edges per fragment);
//! above, the edges its children could not decide, which grow with the segments that cross its
//! children's faces, not with the volume under them; a resolve task, the same groups' maps.
//!
//! Payloads (varints):
//! - left: E, E edges (a as an increase, b - a, voxel-edge count, fixed-point sum, tie's first
//!   fragment - a, tie's second - its first) sorted by (a, b), a < b; R, R regions (name as an
//!   increase, block box: 3 lowest and 3 highest block coordinates), every edge end among them;
//! - map: M, M (input region as an increase, input minus its region); F, F frozen regions as
//!   increases;
//! - finals: N, N (input region as an increase, input minus its segment);
//! - fragments: per block label, label name minus fragment name and the fragment's block box;
//!   face-fragments: N, N (label increase, label name minus fragment name, block box) for the
//!   labels the block's border names.

use super::block::{BlockGraph, Border, VOXEL_KEY};
use super::format::*;
use super::number::{self, Components};
use super::union::{block_coords, block_of, children, touch_box, FinalRecord, UpRecord};
use super::{Passes, StagedError};
use crate::geometry::{Box3, Vec3};
use crate::hash::IdBuildHasher;
use crate::ops::agglomerate::{agglomerate_rounds, EdgeStats, GraphEdge};
use crate::task::segment::{Layout, SegmentError, SegmentReport};
use crate::task::stitch::ChunkGrid;
use std::collections::HashMap;

/// Lowest and highest block coordinates (inclusive) of the blocks holding a region's edges.
pub(super) type BlockBox = [u32; 6];

/// The levels of a block grid of `counts` blocks: 0, 1, ... up to the first whose single group
/// (2^level blocks on each axis) covers the grid.
pub(super) fn levels(counts: Vec3) -> u32 {
    let widest = counts.into_iter().max().unwrap_or(1).max(1);
    widest.next_power_of_two().trailing_zeros() + 1
}

/// The groups of level `level` over a grid of `counts` blocks, in Fortran order.
pub(super) fn groups(counts: Vec3, level: u32) -> ChunkGrid {
    ChunkGrid {
        region: counts,
        chunk: [1usize << level; 3],
    }
}

/// The intermediate-object index of a level's group (its level in the high bits).
pub(super) fn round_index(level: u32, group: usize) -> usize {
    ((level as usize) << 40) | group
}

/// The level and group of a [`round_index`].
pub(super) fn level_and_group(index: usize) -> (usize, usize) {
    (index >> 40, index & ((1 << 40) - 1))
}

pub(super) fn widen(into: &mut BlockBox, other: &BlockBox) {
    for a in 0..3 {
        into[a] = into[a].min(other[a]);
        into[a + 3] = into[a + 3].max(other[a + 3]);
    }
}

fn inside(b: &BlockBox, group: Box3) -> bool {
    (0..3).all(|a| b[a] as usize >= group.start[a] && (b[a + 3] as usize) < group.stop[a])
}

/// An edge between two regions, named by their smallest fragments: `a < b`, the statistics,
/// and the smallest fragment pair among the fragments' edges it sums (the tie-break among equal
/// means, see [`GraphEdge::tie`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Edge {
    pub(super) a: u64,
    pub(super) b: u64,
    pub(super) stats: EdgeStats,
    pub(super) tie: (u64, u64),
}

/// A part of the region graph: its edges, and every region it names with its block box.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct RoundGraph {
    pub(super) edges: Vec<Edge>,
    pub(super) regions: Vec<(u64, BlockBox)>,
}

fn put_box(out: &mut Vec<u8>, b: &BlockBox) {
    for &v in b {
        put_varint(out, v as u64);
    }
}

fn read_box(r: &mut Reader, counts: Vec3) -> Result<BlockBox, StagedError> {
    let mut b = [0u32; 6];
    for v in &mut b {
        *v = u32::try_from(r.varint()?).map_err(|_| r.corrupt("a block box past 2^32".into()))?;
    }
    if (0..3).any(|a| b[a] > b[a + 3] || b[a + 3] as usize >= counts[a]) {
        return Err(r.corrupt(format!("block box {b:?} is not in the grid")));
    }
    Ok(b)
}

/// Reads a name stored as an increase from `last`.
fn read_increase(r: &mut Reader, last: u64) -> Result<u64, StagedError> {
    last.checked_add(r.varint()?)
        .ok_or_else(|| r.corrupt("a name past 2^64".into()))
}

/// Reads `base` minus a stored difference.
fn read_below(r: &mut Reader, base: u64) -> Result<u64, StagedError> {
    base.checked_sub(r.varint()?)
        .ok_or_else(|| r.corrupt(format!("a name below 0 under {base}")))
}

impl RoundGraph {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, self.edges.len() as u64);
        let mut last = 0;
        for e in &self.edges {
            // Wrapping, so that a graph out of order encodes (and fails to decode).
            put_varint(&mut out, e.a.wrapping_sub(last));
            put_varint(&mut out, e.b - e.a);
            put_varint(&mut out, e.stats.count);
            put_varint(&mut out, e.stats.sum);
            put_varint(&mut out, e.tie.0 - e.a);
            put_varint(&mut out, e.tie.1 - e.tie.0);
            last = e.a;
        }
        put_varint(&mut out, self.regions.len() as u64);
        let mut last = 0;
        for (id, b) in &self.regions {
            put_varint(&mut out, id - last);
            put_box(&mut out, b);
            last = *id;
        }
        out
    }

    /// Decodes a graph part of a grid of `counts` blocks, checking its order and that every
    /// edge end is among its regions.
    pub(super) fn decode(key: &str, bytes: &[u8], counts: Vec3) -> Result<RoundGraph, StagedError> {
        let mut r = Reader { bytes, at: 0, key };
        let n = r.count_of_pairs()?;
        let mut g = RoundGraph::default();
        let mut last = 0;
        for _ in 0..n {
            let a = read_increase(&mut r, last)?;
            let b = read_increase(&mut r, a)?;
            let stats = EdgeStats {
                count: r.varint()?,
                sum: r.varint()?,
            };
            let t0 = read_increase(&mut r, a)?;
            let tie = (t0, read_increase(&mut r, t0)?);
            if a == b || tie.0 == tie.1 {
                return Err(r.corrupt(format!("edge ({a}, {b}) with tie {tie:?}")));
            }
            if g.edges.last().is_some_and(|l| (l.a, l.b) >= (a, b)) {
                return Err(r.corrupt(format!("edge ({a}, {b}) out of order")));
            }
            g.edges.push(Edge { a, b, stats, tie });
            last = a;
        }
        let n = r.count_of_pairs()?;
        let mut last = 0;
        for _ in 0..n {
            let id = read_increase(&mut r, last)?;
            let b = read_box(&mut r, counts)?;
            if g.regions.last().is_some_and(|l| l.0 >= id) {
                return Err(r.corrupt(format!("region {id} out of order")));
            }
            g.regions.push((id, b));
            last = id;
        }
        r.finish("graph")?;
        for e in &g.edges {
            for end in [e.a, e.b] {
                if g.regions.binary_search_by_key(&end, |x| x.0).is_err() {
                    return Err(r.corrupt(format!("region {end} has an edge but no block box")));
                }
            }
        }
        Ok(g)
    }
}

/// A round's map: each input region's region, and the regions that froze.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct RoundMap {
    pub(super) to: Vec<(u64, u64)>,
    pub(super) frozen: Vec<u64>,
}

impl RoundMap {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        encode_pairs(&mut out, &self.to);
        put_varint(&mut out, self.frozen.len() as u64);
        put_increases(&mut out, self.frozen.iter().copied());
        out
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<RoundMap, StagedError> {
        let mut r = Reader { bytes, at: 0, key };
        let to = decode_pairs(&mut r)?;
        let n = r.count_of(1)?;
        let frozen = r.increases(n)?;
        r.finish("map")?;
        Ok(RoundMap { to, frozen })
    }
}

/// (name, smaller or equal name) pairs sorted by name: N, N (name increase, name minus other).
fn encode_pairs(out: &mut Vec<u8>, pairs: &[(u64, u64)]) {
    put_varint(out, pairs.len() as u64);
    let mut last = 0;
    for &(from, to) in pairs {
        put_varint(out, from - last);
        put_varint(out, from - to);
        last = from;
    }
}

fn decode_pairs(r: &mut Reader) -> Result<Vec<(u64, u64)>, StagedError> {
    let n = r.count_of_pairs()?;
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(n as usize);
    let mut last = 0;
    for i in 0..n {
        let from = read_increase(r, last)?;
        if i > 0 && from == last {
            return Err(r.corrupt(format!("region {from} twice")));
        }
        out.push((from, read_below(r, from)?));
        last = from;
    }
    Ok(out)
}

fn lookup(pairs: &[(u64, u64)], from: u64) -> Option<u64> {
    pairs
        .binary_search_by_key(&from, |p| p.0)
        .ok()
        .map(|at| pairs[at].1)
}

/// Per block label, its fragment and the fragment's block box.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Fragments {
    pub(super) of_label: Vec<(u64, BlockBox)>,
}

impl Fragments {
    pub(super) fn encode(&self, first: &[u64]) -> Vec<u8> {
        let mut out = Vec::new();
        for (&own, (f, b)) in first.iter().zip(&self.of_label) {
            put_varint(&mut out, own - f);
            put_box(&mut out, b);
        }
        out
    }

    pub(super) fn decode(
        key: &str,
        bytes: &[u8],
        first: &[u64],
        counts: Vec3,
    ) -> Result<Fragments, StagedError> {
        let mut r = Reader { bytes, at: 0, key };
        let mut of_label = Vec::with_capacity(first.len());
        for &own in first {
            let f = read_below(&mut r, own)?;
            of_label.push((f, read_box(&mut r, counts)?));
        }
        r.finish("fragments")?;
        Ok(Fragments { of_label })
    }
}

/// Block `b`'s summary and fragment table.
async fn read_fragments(
    blocks: &ChunkGrid,
    b: usize,
    staging: &Staging,
) -> Result<(super::block::Summary, Fragments), StagedError> {
    let summary = number::summary(staging, b).await?;
    let key = staging.key(Kind::Fragments, b);
    let bytes = staging.get(Kind::Fragments, b).await?;
    let fragments = Fragments::decode(&key, &bytes, &summary.first, blocks.counts())?;
    Ok((summary, fragments))
}

/// The fragments of the labels a block's border names: (label, fragment, box), by label.
pub(super) fn encode_face_fragments(entries: &[(u32, u64, u64, BlockBox)]) -> Vec<u8> {
    let mut out = Vec::new();
    put_varint(&mut out, entries.len() as u64);
    let mut last = 0;
    for &(label, id, f, b) in entries {
        put_varint(&mut out, (label - last) as u64);
        put_varint(&mut out, id - f);
        put_box(&mut out, &b);
        last = label;
    }
    out
}

/// A block's face fragments: per label its border names, the fragment and its block box.
type FaceFragments = HashMap<u32, (u64, BlockBox)>;

/// A neighbour's face fragments, given its border (the labels and their names).
fn decode_face_fragments(
    key: &str,
    bytes: &[u8],
    border: &Border,
    counts: Vec3,
) -> Result<FaceFragments, StagedError> {
    let mut r = Reader { bytes, at: 0, key };
    let n = r.count_of_pairs()?;
    let mut out = HashMap::with_capacity(n as usize);
    let mut last = 0u64;
    for _ in 0..n {
        let label = read_increase(&mut r, last)?;
        let id = u32::try_from(label)
            .ok()
            .and_then(|l| border.id(l))
            .ok_or_else(|| r.corrupt(format!("label {label} is not on the block's border")))?;
        let f = read_below(&mut r, id)?;
        out.insert(label as u32, (f, read_box(&mut r, counts)?));
        last = label;
    }
    r.finish("face fragments")?;
    Ok(out)
}

/// The down-0 task of a segment plan's block `b`: each label's fragment (its own, or what the
/// union stages handed the block for its open labels) and the fragment's block box, and the
/// fragments of the labels on its border (what its neighbours' round-0 tasks read).
pub(super) async fn fragments(
    blocks: ChunkGrid,
    top: u32,
    b: usize,
    staging: &Staging,
) -> Result<SegmentReport, StagedError> {
    let mut passes = Passes::new();
    let counts = blocks.counts();
    let (summary, finals) = number::summary_and_finals(&blocks, top, b, staging).await?;
    let border_key = staging.key(Kind::Border, b);
    let border = Border::decode(&border_key, &staging.get(Kind::Border, b).await?)?;
    passes.done("read");
    let sides = super::union::face_sides(&border, blocks, b);
    let here = block_coords(counts, b);
    let table = Fragments {
        of_label: summary
            .first
            .iter()
            .enumerate()
            .map(|(l, &own)| match finals.get(own) {
                Some(r) => (r.id, r.bbox),
                None => (
                    own,
                    touch_box(counts, here, sides.get(&(l as u32 + 1)).copied()),
                ),
            })
            .collect(),
    };
    let face: Vec<(u32, u64, u64, BlockBox)> = border
        .ids
        .iter()
        .map(|&(label, id)| {
            let (f, b) = table.of_label[label as usize - 1];
            (label, id, f, b)
        })
        .collect();
    // The fragments the block owns: those whose first voxel, a label's own, is in it.
    let owned = summary
        .first
        .iter()
        .zip(&table.of_label)
        .filter(|(own, (f, _))| *own == f)
        .count();
    let report = SegmentReport {
        fragments: owned,
        ..Default::default()
    };
    staging
        .put(Kind::Fragments, b, table.encode(&summary.first))
        .await?;
    staging
        .put(Kind::FaceFragments, b, encode_face_fragments(&face))
        .await?;
    passes.done("write");
    Ok(SegmentReport {
        passes: passes.into_vec(),
        ..report
    })
}

/// Round 0's graph for block `b`: its edges in fragments, and every fragment of its labels and
/// of the neighbours' face voxels its edges name.
async fn block_graph(
    blocks: &ChunkGrid,
    b: usize,
    staging: &Staging,
) -> Result<RoundGraph, StagedError> {
    let counts = blocks.counts();
    let (summary, own) = read_fragments(blocks, b, staging).await?;
    let edges_key = staging.key(Kind::Edges, b);
    let edges = BlockGraph::decode_edges(
        &edges_key,
        &staging.get(Kind::Edges, b).await?,
        summary.first.len(),
    )?;
    drop(summary);
    // The neighbours whose face voxels the edges name, each read once.
    let mut named: Vec<usize> = edges
        .iter()
        .flat_map(|&(a, b, _)| [a, b])
        .filter(|k| k & VOXEL_KEY != 0)
        .map(|k| block_of(blocks, k & !VOXEL_KEY))
        .collect();
    named.sort_unstable();
    named.dedup();
    let mut faces: HashMap<usize, (Border, FaceFragments)> = HashMap::new();
    for n in named {
        if n == b {
            return Err(StagedError::Corrupt {
                key: edges_key,
                why: "an edge names a voxel of its own block as another's".into(),
            });
        }
        let border_key = staging.key(Kind::Border, n);
        let border = Border::decode(&border_key, &staging.get(Kind::Border, n).await?)?;
        let key = staging.key(Kind::FaceFragments, n);
        let bytes = staging.get(Kind::FaceFragments, n).await?;
        let face = decode_face_fragments(&key, &bytes, &border, counts)?;
        faces.insert(n, (border, face));
    }
    let mut foreign: HashMap<u64, BlockBox, IdBuildHasher> = HashMap::default();
    let mut fragment_of = |k: u64| -> Result<u64, StagedError> {
        if k & VOXEL_KEY == 0 {
            return Ok(own.of_label[k as usize - 1].0);
        }
        let voxel = k & !VOXEL_KEY;
        let n = block_of(blocks, voxel);
        let (border, face) = &faces[&n];
        let (f, bx) = border
            .face_label(voxel)
            .and_then(|l| face.get(&l).copied())
            .ok_or_else(|| StagedError::Corrupt {
                key: edges_key.clone(),
                why: format!("voxel {voxel} is not a face voxel of block {n} with a fragment"),
            })?;
        foreign.insert(f, bx);
        Ok(f)
    };
    // Fragment pairs sorted and summed (a sort of the block's edges beats a map of them).
    let mut pairs: Vec<(u64, u64, EdgeStats)> = Vec::with_capacity(edges.len());
    for &(ka, kb, stats) in &edges {
        let (fa, fb) = (fragment_of(ka)?, fragment_of(kb)?);
        if fa != fb {
            pairs.push((fa.min(fb), fa.max(fb), stats));
        }
    }
    drop(edges);
    pairs.sort_unstable_by_key(|p| (p.0, p.1));
    let mut edges: Vec<Edge> = Vec::with_capacity(pairs.len());
    for (a, b, stats) in pairs {
        match edges.last_mut() {
            Some(last) if (last.a, last.b) == (a, b) => last.stats.add(stats),
            _ => edges.push(Edge {
                a,
                b,
                stats,
                tie: (a, b),
            }),
        }
    }
    let mut regions: Vec<(u64, BlockBox)> = own.of_label;
    regions.extend(foreign);
    Ok(RoundGraph {
        edges,
        regions: merge_regions(regions),
    })
}

/// Regions sorted by name, each once, boxes of repeated names widened into one.
fn merge_regions(mut regions: Vec<(u64, BlockBox)>) -> Vec<(u64, BlockBox)> {
    regions.sort_unstable_by_key(|r| r.0);
    let mut out: Vec<(u64, BlockBox)> = Vec::with_capacity(regions.len());
    for (id, b) in regions {
        match out.last_mut() {
            Some(last) if last.0 == id => widen(&mut last.1, &b),
            _ => out.push((id, b)),
        }
    }
    out
}

/// The parts summed into one graph: parallel edges added, keeping the smaller tie; a region's
/// boxes from several parts widened into one (a single part, round 0's, is already).
fn sum_parts(mut parts: Vec<RoundGraph>) -> RoundGraph {
    if parts.len() == 1 {
        return parts.pop().expect("one part");
    }
    let mut edges: Vec<Edge> = Vec::with_capacity(parts.iter().map(|p| p.edges.len()).sum());
    let mut regions: Vec<(u64, BlockBox)> = Vec::new();
    for p in parts {
        edges.extend(p.edges);
        regions.extend(p.regions);
    }
    edges.sort_unstable_by_key(|e| (e.a, e.b));
    let mut summed: Vec<Edge> = Vec::with_capacity(edges.len());
    for e in edges {
        match summed.last_mut() {
            Some(last) if (last.a, last.b) == (e.a, e.b) => {
                last.stats.add(e.stats);
                last.tie = last.tie.min(e.tie);
            }
            _ => summed.push(e),
        }
    }
    RoundGraph {
        edges: summed,
        regions: merge_regions(regions),
    }
}

/// What one round task decided.
struct RoundOutcome {
    map: RoundMap,
    left: RoundGraph,
    report: SegmentReport,
}

/// Agglomerates a group's graph as far as the group decides it (see the module doc).
fn agglomerate_group(
    graph: RoundGraph,
    group: Box3,
    threshold: f64,
    stop: &dyn Fn() -> bool,
) -> Result<RoundOutcome, StagedError> {
    // Local node ids in name order (so that "smallest node" is "smallest fragment"), and tie
    // fragments by their rank among the ties (an order-keeping map into 32 bits).
    let ids: Vec<u64> = graph.regions.iter().map(|r| r.0).collect();
    let local = |f: u64| ids.binary_search(&f).expect("every edge end is a region") as u32;
    let mut ties: Vec<u64> = graph
        .edges
        .iter()
        .flat_map(|e| [e.tie.0, e.tie.1])
        .collect();
    ties.sort_unstable();
    ties.dedup();
    let rank = |f: u64| ties.binary_search(&f).expect("a tie fragment") as u32;
    let frozen: Vec<bool> = graph
        .regions
        .iter()
        .map(|(_, b)| !inside(b, group))
        .collect();
    let edges: Vec<GraphEdge> = graph
        .edges
        .iter()
        .map(|e| GraphEdge {
            a: local(e.a),
            b: local(e.b),
            stats: e.stats,
            tie: (rank(e.tie.0), rank(e.tie.1)),
        })
        .collect();
    let region_edges = edges.len();
    let done = agglomerate_rounds(ids.len(), &edges, &frozen, threshold, stop)
        .ok_or(SegmentError::Cancelled)?;
    drop(edges);
    let mut region_box: Vec<Option<BlockBox>> = vec![None; ids.len()];
    for (n, (_, b)) in graph.regions.iter().enumerate() {
        match &mut region_box[done.region_of[n] as usize] {
            Some(rb) => widen(rb, b),
            none => *none = Some(*b),
        }
    }
    let to: Vec<(u64, u64)> = (0..ids.len())
        .map(|n| (ids[n], ids[done.region_of[n] as usize]))
        .collect();
    let is_region = |n: usize| done.region_of[n] as usize == n;
    let frozen_regions: Vec<usize> = (0..ids.len())
        .filter(|&n| is_region(n) && done.frozen[n])
        .collect();
    let left_edges: Vec<Edge> = done
        .left
        .iter()
        .filter(|e| done.frozen[e.a as usize] && done.frozen[e.b as usize])
        .map(|e| Edge {
            a: ids[e.a as usize],
            b: ids[e.b as usize],
            stats: e.stats,
            tie: (ties[e.tie.0 as usize], ties[e.tie.1 as usize]),
        })
        .collect();
    let final_regions = (0..ids.len())
        .filter(|&n| is_region(n) && !done.frozen[n])
        .count();
    Ok(RoundOutcome {
        report: SegmentReport {
            fragments: ids.len(),
            region_edges,
            merges: done.merges,
            segments: final_regions,
            ..Default::default()
        },
        map: RoundMap {
            to,
            frozen: frozen_regions.iter().map(|&n| ids[n]).collect(),
        },
        left: RoundGraph {
            edges: left_edges,
            regions: frozen_regions
                .iter()
                .map(|&n| {
                    (
                        ids[n],
                        region_box[n].expect("a region has its members' boxes"),
                    )
                })
                .collect(),
        },
    })
}

/// The parts a round task sums: level 0, its block's graph; above, what its children left.
async fn round_inputs(
    blocks: &ChunkGrid,
    level: u32,
    group: usize,
    staging: &Staging,
) -> Result<Vec<RoundGraph>, StagedError> {
    let counts = blocks.counts();
    if level == 0 {
        return Ok(vec![block_graph(blocks, group, staging).await?]);
    }
    let mut parts = Vec::new();
    for child in children(counts, level, group) {
        let index = round_index(level - 1, child);
        let bytes = staging.get(Kind::Left, index).await?;
        let key = staging.key(Kind::Left, index);
        parts.push(RoundGraph::decode(&key, &bytes, counts)?);
    }
    Ok(parts)
}

/// One round task: sums its group's parts, agglomerates what the group decides, writes what it
/// leaves and its map (the top round: every input's segment).
pub(super) async fn round(
    blocks: ChunkGrid,
    (level, top): (u32, u32),
    group: usize,
    threshold: f64,
    staging: &Staging,
    layout: &Layout,
) -> Result<SegmentReport, StagedError> {
    let here = groups(blocks.counts(), level).core(group);
    let mut passes = Passes::new();
    let parts = round_inputs(&blocks, level, group, staging).await?;
    passes.done("read");
    let stop = layout.stop_check();
    let outcome = tokio::task::spawn_blocking(move || {
        agglomerate_group(sum_parts(parts), here, threshold, &stop)
    })
    .await
    .map_err(SegmentError::from)??;
    passes.done("agglomerate");
    layout.check_cancel()?;
    let index = round_index(level, group);
    if level == top {
        let mut out = Vec::new();
        encode_pairs(&mut out, &outcome.map.to);
        staging.put(Kind::Finals, index, out).await?;
    } else {
        staging
            .put(Kind::RoundMap, index, outcome.map.encode())
            .await?;
        staging
            .put(Kind::Left, index, outcome.left.encode())
            .await?;
    }
    passes.done("write");
    Ok(SegmentReport {
        passes: passes.into_vec(),
        ..outcome.report
    })
}

/// A group's inputs' segments: through its map, and its parent's finals for the regions that
/// froze (the top round's finals directly).
async fn finals_of(
    blocks: &ChunkGrid,
    (level, top): (u32, u32),
    group: usize,
    staging: &Staging,
) -> Result<Vec<(u64, u64)>, StagedError> {
    let counts = blocks.counts();
    let index = round_index(level, group);
    if level == top {
        let key = staging.key(Kind::Finals, index);
        let bytes = staging.get(Kind::Finals, index).await?;
        let mut r = Reader {
            bytes: &bytes,
            at: 0,
            key: &key,
        };
        let out = decode_pairs(&mut r)?;
        r.finish("finals")?;
        return Ok(out);
    }
    let map_key = staging.key(Kind::RoundMap, index);
    let map = RoundMap::decode(&map_key, &staging.get(Kind::RoundMap, index).await?)?;
    let coords = groups(counts, level).core(group).start;
    let parent = groups(counts, level + 1).chunk_of(coords);
    let parent_index = round_index(level + 1, parent);
    let parent_key = staging.key(Kind::Finals, parent_index);
    let bytes = staging.get(Kind::Finals, parent_index).await?;
    let mut r = Reader {
        bytes: &bytes,
        at: 0,
        key: &parent_key,
    };
    let above = decode_pairs(&mut r)?;
    r.finish("finals")?;
    map.to
        .iter()
        .map(|&(from, region)| {
            let segment = match map.frozen.binary_search(&region) {
                Err(_) => region,
                Ok(_) => lookup(&above, region).ok_or_else(|| StagedError::Corrupt {
                    key: parent_key.clone(),
                    why: format!("no segment for region {region} that {map_key} left frozen"),
                })?,
            };
            Ok((from, segment))
        })
        .collect()
}

/// A resolve task: group `group` of level `level` (below the top). Above level 0 it writes its
/// inputs' segments; at level 0 (a block) each label's segment, for the numbering.
pub(super) async fn resolve(
    blocks: ChunkGrid,
    (level, top): (u32, u32),
    group: usize,
    staging: &Staging,
) -> Result<SegmentReport, StagedError> {
    let mut passes = Passes::new();
    let finals = finals_of(&blocks, (level, top), group, staging).await?;
    passes.done("read");
    if level > 0 {
        let mut out = Vec::new();
        encode_pairs(&mut out, &finals);
        staging
            .put(Kind::Finals, round_index(level, group), out)
            .await?;
        passes.done("write");
        return Ok(SegmentReport {
            fragments: finals.len(),
            passes: passes.into_vec(),
            ..Default::default()
        });
    }
    let b = group;
    let (summary, fragments) = read_fragments(&blocks, b, staging).await?;
    let key = staging.key(Kind::Fragments, b);
    let mut table = Components::default();
    for &(f, _) in &fragments.of_label {
        let segment = lookup(&finals, f).ok_or_else(|| StagedError::Corrupt {
            key: staging.key(Kind::RoundMap, round_index(0, b)),
            why: format!("fragment {f} of {key} is not among the block's regions"),
        })?;
        table.component.push(segment);
        table.stays.push(true);
    }
    let owned = number::write_components(&blocks, b, &summary.first, &table, staging).await?;
    passes.done("write");
    Ok(SegmentReport {
        fragments: summary.first.len(),
        segments: owned,
        passes: passes.into_vec(),
        ..Default::default()
    })
}

/// Checks that the union stages handed a block a component for each open label (shared by the
/// connected-components and segment down-0 tasks).
pub(super) fn check_finals(
    links_key: &str,
    links: &UpRecord,
    finals_key: &str,
    finals: &FinalRecord,
) -> Result<(), StagedError> {
    let open: Vec<u64> = links.roots.iter().map(|r| r.id).collect();
    let handed: Vec<u64> = finals.finals.iter().map(|f| f.0).collect();
    if open != handed {
        return Err(StagedError::Corrupt {
            key: finals_key.to_string(),
            why: format!(
                "components for {} labels; {links_key} has {} open labels",
                handed.len(),
                open.len()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_reach_one_group_over_the_grid() {
        assert_eq!(levels([1, 1, 1]), 1);
        assert_eq!(levels([2, 1, 1]), 2);
        assert_eq!(levels([3, 2, 1]), 3);
        assert_eq!(levels([4, 4, 4]), 3);
        assert_eq!(levels([5, 1, 1]), 4);
        for counts in [[1, 1, 1], [3, 2, 1], [5, 7, 2], [8, 8, 8]] {
            let top = levels(counts) - 1;
            assert_eq!(groups(counts, top).len(), 1, "{counts:?}");
            if top > 0 {
                assert!(groups(counts, top - 1).len() > 1, "{counts:?}");
            }
        }
    }

    #[test]
    fn round_graphs_and_maps_round_trip_and_bad_ones_are_named() {
        let g = RoundGraph {
            edges: vec![
                Edge {
                    a: 1,
                    b: 4,
                    stats: EdgeStats { count: 3, sum: 77 },
                    tie: (1, 4),
                },
                Edge {
                    a: 2,
                    b: 1 << 40,
                    stats: EdgeStats { count: 1, sum: 5 },
                    tie: (3, 9),
                },
            ],
            regions: vec![
                (1, [0, 0, 0, 1, 0, 0]),
                (2, [1, 0, 0, 1, 0, 0]),
                (4, [0; 6]),
                (1 << 40, [0; 6]),
            ],
        };
        let bytes = g.encode();
        assert_eq!(RoundGraph::decode("k", &bytes, [2, 1, 1]).unwrap(), g);
        let why = |bytes: &[u8], counts: Vec3| match RoundGraph::decode("k", bytes, counts) {
            Err(StagedError::Corrupt { key, why }) => {
                assert_eq!(key, "k");
                why
            }
            other => panic!("{other:?}"),
        };
        assert!(why(&bytes, [1, 1, 1]).contains("block box"));
        assert!(why(&bytes[..bytes.len() - 3], [2, 1, 1]).contains("ends at"));
        let mut unboxed = g.clone();
        unboxed.regions.remove(2);
        assert!(why(&unboxed.encode(), [2, 1, 1]).contains("no block box"));
        let mut unordered = g.clone();
        unordered.edges.swap(0, 1);
        assert!(why(&unordered.encode(), [2, 1, 1]).contains("past 2^64"));
        // Edges of one region out of order.
        let mut same_a = g.clone();
        same_a.edges[1] = Edge {
            a: 1,
            b: 2,
            ..g.edges[0]
        };
        assert!(why(&same_a.encode(), [2, 1, 1]).contains("out of order"));
        let map = RoundMap {
            to: vec![(1, 1), (4, 1), (1 << 40, 2)],
            frozen: vec![1, 1 << 39],
        };
        assert_eq!(RoundMap::decode("m", &map.encode()).unwrap(), map);
        let fragments = Fragments {
            of_label: vec![(3, [0; 6]), (3, [0, 0, 0, 1, 1, 0])],
        };
        let first = [3, 8];
        let bytes = fragments.encode(&first);
        assert_eq!(
            Fragments::decode("f", &bytes, &first, [2, 2, 1]).unwrap(),
            fragments
        );
        assert!(Fragments::decode("f", &bytes, &first, [2, 1, 1]).is_err());
    }

    #[test]
    fn the_tie_rank_keeps_the_order_of_fragment_pairs() {
        // Two edges of equal means whose ties differ only past 32 bits: the one with the
        // smaller tie pops first (merges first), as one whole run would.
        let stats = EdgeStats { count: 1, sum: 0 };
        let graph = RoundGraph {
            edges: vec![
                Edge {
                    a: 1,
                    b: 1 << 35,
                    stats,
                    tie: (1, 1 << 35),
                },
                Edge {
                    a: 1 << 33,
                    b: 1 << 35,
                    stats,
                    tie: (1 << 33, 1 << 35),
                },
            ],
            regions: vec![(1, [0; 6]), (1 << 33, [0; 6]), (1 << 35, [0; 6])],
        };
        let out =
            agglomerate_group(graph, Box3::new([0, 0, 0], [1, 1, 1]), 2.0, &|| false).unwrap();
        assert_eq!(out.map.to, vec![(1, 1), (1 << 33, 1), (1 << 35, 1)]);
        assert!(out.map.frozen.is_empty() && out.left.edges.is_empty());
    }
}
