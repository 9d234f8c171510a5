//! Merge rounds: segment's agglomeration as a hierarchy of tasks (ABISS's rounds), for region
//! graphs too large for one merge task, with exactly the single process's result.
//!
//! In a plan with rounds the merge stage stops after numbering the fragments. It writes each
//! block's fragment table (`block-<i>.fragments`: one u32 fragment per block label) and the
//! region-graph edges the block recorded, in fragment ids (`block-<i>.edges`). With each edge's
//! endpoints goes the *block box* of the fragment: the blocks whose graphs hold any of its edges.
//!
//! Round `l` has one task per group of 2^l blocks on each axis (the last round: the whole grid).
//! A task sums what its part of the graph holds (level 0: its block's edges; above: the edges
//! its eight child groups left) and agglomerates it best first, as one whole run would
//! ([`agglomerate_rounds`]). A region whose block box leaves the group is frozen: some of its
//! edges are elsewhere, so merges that touch it wait for a round that holds them, and so does
//! every region whose best edge leads to a frozen one. A region that ends unfrozen is final: all
//! its edges are at or past the threshold, and so is any edge a later round forms from them (a
//! weighted average), so it never merges again and its edges are dropped. What is left, the
//! edges between frozen regions, goes to the parent group (`round-<l>-<g>.left`); the merges
//! made go to `round-<l>-<g>.merged` as (region, region it joined) pairs.
//!
//! The resolve stage composes every round's merges into each fragment's region, numbers the
//! regions by smallest fragment (first voxel, as a single process numbers segments) and writes
//! each block's relabel table.
//!
//! Payloads (little-endian):
//! - edges and left: u64 E, E edges (u32 a, u32 b, u64 voxel-edge count, u64 fixed-point sum,
//!   u32 tie a, u32 tie b) sorted by (a, b) with a < b; u64 R, R regions (u32 fragment, 3 u32
//!   lowest block coordinates, 3 u32 highest) sorted by fragment, one per edge end;
//! - merged: u64 M, M pairs (u32 region, u32 smaller region it joined) sorted by region;
//! - fragments: one u32 per block label.

use super::block::BlockGraph;
use super::format::{bytes_to_u32s, u32s_to_bytes, Kind, Reader, Staging};
use super::merge::BlockNodes;
use super::{Passes, StagedError};
use crate::geometry::{Box3, Vec3};
use crate::ops::agglomerate::{agglomerate_rounds, number_by_smallest, EdgeStats, GraphEdge};
use crate::task::segment::{Layout, SegmentError, SegmentReport};
use crate::task::spec::StagedPlan;
use crate::task::stitch::ChunkGrid;

/// Lowest and highest block coordinates (inclusive) of the blocks holding a region's edges.
pub(super) type BlockBox = [u32; 6];

/// The merge rounds a block grid of `counts` blocks needs: levels 0, 1, ... up to the first whose
/// single group (2^level blocks on each axis) covers the grid.
pub(super) fn levels(counts: Vec3) -> u32 {
    let widest = counts.into_iter().max().unwrap_or(1).max(1);
    widest.next_power_of_two().trailing_zeros() + 1
}

/// The groups of round `level` over a grid of `counts` blocks, in Fortran order.
pub(super) fn groups(counts: Vec3, level: u32) -> ChunkGrid {
    ChunkGrid {
        region: counts,
        chunk: [1usize << level; 3],
    }
}

/// The intermediate-object index of a round's group (its level in the high bits).
pub(super) fn round_index(level: u32, group: usize) -> usize {
    ((level as usize) << 40) | group
}

/// The level and group of a [`round_index`].
pub(super) fn level_and_group(index: usize) -> (usize, usize) {
    (index >> 40, index & ((1 << 40) - 1))
}

fn block_box(coords: Vec3) -> BlockBox {
    let c = coords.map(|v| v as u32);
    [c[0], c[1], c[2], c[0], c[1], c[2]]
}

fn widen(into: &mut BlockBox, other: &BlockBox) {
    for a in 0..3 {
        into[a] = into[a].min(other[a]);
        into[a + 3] = into[a + 3].max(other[a + 3]);
    }
}

fn inside(b: &BlockBox, group: Box3) -> bool {
    (0..3).all(|a| b[a] as usize >= group.start[a] && (b[a + 3] as usize) < group.stop[a])
}

/// A part of the region graph in fragment ids, with the block box of every region it names.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct RoundGraph {
    pub edges: Vec<GraphEdge>,
    pub boxes: Vec<(u32, BlockBox)>,
}

impl RoundGraph {
    const EDGE_BYTES: usize = 32;
    const BOX_BYTES: usize = 28;

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            16 + self.edges.len() * Self::EDGE_BYTES + self.boxes.len() * Self::BOX_BYTES,
        );
        out.extend_from_slice(&(self.edges.len() as u64).to_le_bytes());
        for e in &self.edges {
            out.extend_from_slice(&e.a.to_le_bytes());
            out.extend_from_slice(&e.b.to_le_bytes());
            out.extend_from_slice(&e.stats.count.to_le_bytes());
            out.extend_from_slice(&e.stats.sum.to_le_bytes());
            out.extend_from_slice(&e.tie.0.to_le_bytes());
            out.extend_from_slice(&e.tie.1.to_le_bytes());
        }
        out.extend_from_slice(&(self.boxes.len() as u64).to_le_bytes());
        for (f, b) in &self.boxes {
            out.extend_from_slice(&f.to_le_bytes());
            for v in b {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// Decodes a graph part of a grid of `counts` blocks, checking its order and that every
    /// edge end has a box inside the grid.
    fn decode(key: &str, bytes: &[u8], counts: Vec3) -> Result<RoundGraph, StagedError> {
        let mut r = Reader { bytes, at: 0, key };
        let n = r.u64()? as usize;
        r.check(n.saturating_mul(Self::EDGE_BYTES))?;
        let mut g = RoundGraph::default();
        g.edges.reserve(n);
        for _ in 0..n {
            let (a, b) = (r.u32()?, r.u32()?);
            let stats = EdgeStats {
                count: r.u64()?,
                sum: r.u64()?,
            };
            let tie = (r.u32()?, r.u32()?);
            if a == 0 || a >= b || tie.0 >= tie.1 || tie.0 == 0 {
                return Err(r.corrupt(format!("edge ({a}, {b}) with tie {tie:?}")));
            }
            if g.edges.last().is_some_and(|l| (l.a, l.b) >= (a, b)) {
                return Err(r.corrupt(format!("edge ({a}, {b}) out of order")));
            }
            g.edges.push(GraphEdge { a, b, stats, tie });
        }
        let n = r.u64()? as usize;
        r.check(n.saturating_mul(Self::BOX_BYTES))?;
        g.boxes.reserve(n);
        for _ in 0..n {
            let f = r.u32()?;
            let mut b = [0u32; 6];
            for v in &mut b {
                *v = r.u32()?;
            }
            if (0..3).any(|a| b[a] > b[a + 3] || b[a + 3] as usize >= counts[a]) {
                return Err(r.corrupt(format!("fragment {f}'s block box {b:?} is not in the grid")));
            }
            if g.boxes.last().is_some_and(|l| l.0 >= f) {
                return Err(r.corrupt(format!("region {f} out of order")));
            }
            g.boxes.push((f, b));
        }
        if r.at != bytes.len() {
            return Err(r.corrupt(format!("{} bytes after the graph", bytes.len() - r.at)));
        }
        for e in &g.edges {
            for end in [e.a, e.b] {
                if g.boxes.binary_search_by_key(&end, |x| x.0).is_err() {
                    return Err(r.corrupt(format!("region {end} has an edge but no block box")));
                }
            }
        }
        Ok(g)
    }
}

fn encode_merged(pairs: &[(u32, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + pairs.len() * 8);
    out.extend_from_slice(&(pairs.len() as u64).to_le_bytes());
    for (region, into) in pairs {
        out.extend_from_slice(&region.to_le_bytes());
        out.extend_from_slice(&into.to_le_bytes());
    }
    out
}

fn decode_merged(key: &str, bytes: &[u8]) -> Result<Vec<(u32, u32)>, StagedError> {
    let mut r = Reader { bytes, at: 0, key };
    let n = r.u64()? as usize;
    r.check(n.saturating_mul(8))?;
    let mut pairs: Vec<(u32, u32)> = Vec::with_capacity(n);
    for _ in 0..n {
        let (region, into) = (r.u32()?, r.u32()?);
        if into == 0 || into >= region || pairs.last().is_some_and(|l| l.0 >= region) {
            return Err(r.corrupt(format!("merge of region {region} into {into}")));
        }
        pairs.push((region, into));
    }
    if r.at != bytes.len() {
        return Err(r.corrupt(format!("{} bytes after the merges", bytes.len() - r.at)));
    }
    Ok(pairs)
}

/// What the merge stage of a plan with rounds writes: per block its fragment table and its
/// edges in fragment ids.
pub(super) struct FragmentGraphs {
    pub tables: Vec<Vec<u32>>,
    pub graphs: Vec<RoundGraph>,
    pub report: SegmentReport,
}

/// The merge stage of a plan with rounds: fragments joined and numbered as for one merge task,
/// then each block's edges translated to fragments and summed, with every fragment's block box.
pub(super) fn fragment_graphs(
    nodes: &BlockNodes,
    graphs: &[BlockGraph],
) -> Result<FragmentGraphs, StagedError> {
    let mut passes = Passes::new();
    let (fragment, fragments, deferred) = super::merge::join_fragments(nodes, graphs)?;
    passes.done("stitch");
    let counts = nodes.blocks.counts();
    let block_grid = groups(counts, 0);
    let mut per_block = Vec::with_capacity(graphs.len());
    let mut boxes: Vec<Option<BlockBox>> = vec![None; fragments + 1];
    let mut pairs = Vec::new();
    for (b, g) in graphs.iter().enumerate() {
        pairs.clear();
        super::merge::fragment_pairs(nodes, b, g, &fragment, &mut pairs)?;
        let edges = crate::ops::agglomerate::sum_sorted_edges(std::mem::take(&mut pairs));
        let here = block_box(block_grid.core(b).start);
        for e in &edges {
            for end in [e.a, e.b] {
                match &mut boxes[end as usize] {
                    Some(bx) => widen(bx, &here),
                    none => *none = Some(here),
                }
            }
        }
        per_block.push(edges);
    }
    let region_edges = per_block.iter().map(Vec::len).sum();
    let graphs = per_block
        .into_iter()
        .map(|edges| {
            let mut ends: Vec<u32> = edges.iter().flat_map(|e| [e.a, e.b]).collect();
            ends.sort_unstable();
            ends.dedup();
            let boxes = ends
                .into_iter()
                .map(|f| (f, boxes[f as usize].expect("every edge end has a box")))
                .collect();
            RoundGraph { edges, boxes }
        })
        .collect();
    passes.done("region graph");
    Ok(FragmentGraphs {
        tables: nodes.tables(|n| fragment[n as usize]),
        graphs,
        report: SegmentReport {
            chunks: nodes.summaries.len(),
            fragments,
            region_edges,
            deferred,
            passes: passes.into_vec(),
            ..Default::default()
        },
    })
}

/// The parts a round task sums: level 0, its block's edges; above, what its child groups left.
async fn round_inputs(
    staging: &Staging,
    counts: Vec3,
    level: u32,
    group: usize,
) -> Result<Vec<RoundGraph>, StagedError> {
    if level == 0 {
        let bytes = staging.get(Kind::Edges, group).await?;
        let key = staging.key(Kind::Edges, group);
        return Ok(vec![RoundGraph::decode(&key, &bytes, counts)?]);
    }
    let here = groups(counts, level).core(group);
    let children = groups(counts, level - 1);
    // The child groups' coordinates (a group starts at a multiple of twice a child's width).
    let step = children.chunk[0];
    let within = |a: usize| here.start[a] / step..here.stop[a].div_ceil(step);
    let mut parts = Vec::new();
    for z in within(2) {
        for y in within(1) {
            for x in within(0) {
                let child = children.chunk_of([x * step, y * step, z * step]);
                let index = round_index(level - 1, child);
                let bytes = staging.get(Kind::Left, index).await?;
                let key = staging.key(Kind::Left, index);
                parts.push(RoundGraph::decode(&key, &bytes, counts)?);
            }
        }
    }
    Ok(parts)
}

/// The parts summed into one graph: parallel edges added, keeping the smaller tie; a region's
/// boxes from several parts widened into one.
fn sum_parts(parts: Vec<RoundGraph>) -> RoundGraph {
    let mut edges: Vec<GraphEdge> = Vec::with_capacity(parts.iter().map(|p| p.edges.len()).sum());
    let mut boxes: Vec<(u32, BlockBox)> = Vec::new();
    for p in parts {
        edges.extend(p.edges);
        boxes.extend(p.boxes);
    }
    edges.sort_unstable_by_key(|e| (e.a, e.b));
    let mut summed: Vec<GraphEdge> = Vec::with_capacity(edges.len());
    for e in edges {
        match summed.last_mut() {
            Some(last) if (last.a, last.b) == (e.a, e.b) => {
                last.stats.add(e.stats);
                last.tie = last.tie.min(e.tie);
            }
            _ => summed.push(e),
        }
    }
    boxes.sort_unstable_by_key(|b| b.0);
    let mut merged: Vec<(u32, BlockBox)> = Vec::with_capacity(boxes.len());
    for (f, b) in boxes {
        match merged.last_mut() {
            Some(last) if last.0 == f => widen(&mut last.1, &b),
            _ => merged.push((f, b)),
        }
    }
    RoundGraph {
        edges: summed,
        boxes: merged,
    }
}

/// What one round task decided: its merges and the graph it leaves to its parent.
struct RoundOutcome {
    merged: Vec<(u32, u32)>,
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
    // Local node ids in fragment order (so that "smallest node" is "smallest fragment"); ties
    // stay fragment pairs, which agglomeration only compares.
    let fragment_of: Vec<u32> = graph.boxes.iter().map(|b| b.0).collect();
    let local = |f: u32| {
        fragment_of
            .binary_search(&f)
            .expect("every edge end has a box") as u32
    };
    let frozen: Vec<bool> = graph.boxes.iter().map(|(_, b)| !inside(b, group)).collect();
    let edges: Vec<GraphEdge> = graph
        .edges
        .iter()
        .map(|e| GraphEdge {
            a: local(e.a),
            b: local(e.b),
            ..*e
        })
        .collect();
    let region_edges = edges.len();
    let done = agglomerate_rounds(fragment_of.len(), &edges, &frozen, threshold, stop)
        .ok_or(SegmentError::Cancelled)?;
    drop(edges);
    let merged: Vec<(u32, u32)> = (0..fragment_of.len())
        .filter(|&n| done.region_of[n] as usize != n)
        .map(|n| (fragment_of[n], fragment_of[done.region_of[n] as usize]))
        .collect();
    let mut region_box: Vec<Option<BlockBox>> = vec![None; fragment_of.len()];
    for (n, (_, b)) in graph.boxes.iter().enumerate() {
        match &mut region_box[done.region_of[n] as usize] {
            Some(rb) => widen(rb, b),
            none => *none = Some(*b),
        }
    }
    let kept_local: Vec<&GraphEdge> = done
        .left
        .iter()
        .filter(|e| done.frozen[e.a as usize] && done.frozen[e.b as usize])
        .collect();
    let mut ends: Vec<u32> = kept_local.iter().flat_map(|e| [e.a, e.b]).collect();
    ends.sort_unstable();
    ends.dedup();
    let boxes = ends
        .into_iter()
        .map(|n| {
            let b = region_box[n as usize].expect("a region has its members' boxes");
            (fragment_of[n as usize], b)
        })
        .collect();
    let final_regions = (0..fragment_of.len())
        .filter(|&n| done.region_of[n] as usize == n && !done.frozen[n])
        .count();
    let kept = kept_local
        .into_iter()
        .map(|e| GraphEdge {
            a: fragment_of[e.a as usize],
            b: fragment_of[e.b as usize],
            ..*e
        })
        .collect();
    Ok(RoundOutcome {
        report: SegmentReport {
            fragments: fragment_of.len(),
            region_edges,
            merges: done.merges,
            segments: final_regions,
            ..Default::default()
        },
        merged,
        left: RoundGraph { edges: kept, boxes },
    })
}

/// One round task: sums its group's parts, agglomerates what the group decides, writes its
/// merges and what it leaves.
pub(super) async fn round<W: super::StagedWork>(
    plan: &StagedPlan<W>,
    blocks: ChunkGrid,
    level: u32,
    group: usize,
    staging: &Staging,
    layout: &Layout,
) -> Result<SegmentReport, StagedError> {
    let bad = |why: String| StagedError::BadPlan {
        id: plan.id.clone(),
        why,
    };
    let threshold = match plan.work.work() {
        super::Work::Segment(s) => s.threshold,
        super::Work::Components(_) => {
            return Err(bad("connected components have no merge rounds".into()))
        }
    };
    let counts = blocks.counts();
    if level >= plan.rounds {
        return Err(bad(format!(
            "round {level} of a plan with {} rounds",
            plan.rounds
        )));
    }
    let grid = groups(counts, level);
    if group >= grid.len() {
        return Err(bad(format!(
            "group {group} of round {level}, which has {}",
            grid.len()
        )));
    }
    let here = grid.core(group);
    let mut passes = Passes::new();
    let parts = round_inputs(staging, counts, level, group).await?;
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
    staging
        .put(Kind::Merged, index, encode_merged(&outcome.merged))
        .await?;
    staging
        .put(Kind::Left, index, outcome.left.encode())
        .await?;
    passes.done("write");
    Ok(SegmentReport {
        passes: passes.into_vec(),
        ..outcome.report
    })
}

/// The resolve stage: every fragment's segment from the rounds' merges, numbered by smallest
/// fragment, written as each block's relabel table.
pub(super) async fn resolve<W>(
    plan: &StagedPlan<W>,
    blocks: ChunkGrid,
    staging: &Staging,
    layout: &Layout,
) -> Result<SegmentReport, StagedError> {
    let mut passes = Passes::new();
    let mut tables = Vec::with_capacity(plan.blocks);
    for b in 0..plan.blocks {
        let bytes = staging.get(Kind::Fragments, b).await?;
        let key = staging.key(Kind::Fragments, b);
        tables.push(bytes_to_u32s(&key, &bytes, bytes.len() / 4)?);
    }
    let fragments = tables.iter().flatten().copied().max().unwrap_or(0) as usize;
    let mut region: Vec<u32> = (0..=fragments as u32).collect();
    let mut merges = 0;
    let counts = blocks.counts();
    for level in 0..plan.rounds {
        for group in 0..groups(counts, level).len() {
            let index = round_index(level, group);
            let bytes = staging.get(Kind::Merged, index).await?;
            let key = staging.key(Kind::Merged, index);
            for (from, into) in decode_merged(&key, &bytes)? {
                if from as usize > fragments || region[from as usize] != from {
                    return Err(StagedError::Corrupt {
                        key,
                        why: format!("region {from} merged twice or beyond the fragments"),
                    });
                }
                region[from as usize] = into;
                merges += 1;
            }
        }
    }
    // Each merge names a smaller region, so in increasing order a fragment's target is final.
    for f in 1..region.len() {
        region[f] = region[region[f] as usize];
    }
    let segment = number_by_smallest(&region);
    let segments = segment.iter().max().copied().unwrap_or(0) as usize;
    passes.done("resolve");
    layout.check_cancel()?;
    for (b, table) in tables.iter().enumerate() {
        let remap: Vec<u32> = table.iter().map(|&f| segment[f as usize]).collect();
        staging
            .put(Kind::Remap, b, u32s_to_bytes(&remap).into_owned())
            .await?;
    }
    passes.done("write");
    Ok(SegmentReport {
        chunks: plan.blocks,
        fragments,
        segments,
        merges,
        passes: passes.into_vec(),
        ..Default::default()
    })
}

/// Writes what the merge stage of a plan with rounds produced.
pub(super) async fn write_fragment_graphs(
    staging: &Staging,
    out: &FragmentGraphs,
) -> Result<(), StagedError> {
    for (b, (table, graph)) in out.tables.iter().zip(&out.graphs).enumerate() {
        staging
            .put(Kind::Fragments, b, u32s_to_bytes(table).into_owned())
            .await?;
        staging.put(Kind::Edges, b, graph.encode()).await?;
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
    fn round_graphs_round_trip_and_bad_ones_are_named() {
        let g = RoundGraph {
            edges: vec![
                GraphEdge {
                    a: 1,
                    b: 4,
                    stats: EdgeStats { count: 3, sum: 77 },
                    tie: (1, 4),
                },
                GraphEdge {
                    a: 2,
                    b: 4,
                    stats: EdgeStats { count: 1, sum: 5 },
                    tie: (2, 3),
                },
            ],
            boxes: vec![
                (1, [0, 0, 0, 1, 0, 0]),
                (2, [1, 0, 0, 1, 0, 0]),
                (4, [0; 6]),
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
        unboxed.boxes.remove(2);
        assert!(why(&unboxed.encode(), [2, 1, 1]).contains("no block box"));
        let mut unordered = g.clone();
        unordered.edges.swap(0, 1);
        assert!(why(&unordered.encode(), [2, 1, 1]).contains("out of order"));
        let merged = encode_merged(&[(3, 1), (7, 3)]);
        assert_eq!(decode_merged("m", &merged).unwrap(), vec![(3, 1), (7, 3)]);
        assert!(decode_merged("m", &encode_merged(&[(3, 4)])).is_err());
    }
}
