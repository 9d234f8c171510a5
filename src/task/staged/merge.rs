//! The merge stage (one task): joins the blocks through their faces, numbers the components,
//! and drops dust (connected components) or agglomerates the region graph (segment).

use super::block::{step, BlockGraph, Border, OpenVoxel, Summary, VOXEL_KEY};
use super::format::*;
use super::{rounds, Passes, StagedError, StagedWork, Work};
use crate::geometry::Vec3;
use crate::gpu::labeling::DeferredVoxel;
use crate::ops::agglomerate::{agglomerate_sorted, pair_key, sum_sorted_edges, EdgeStats};
use crate::ops::union_find::UnionFind;
use crate::ops::watershed::Grid;
use crate::task::segment::{resolve_plateaus, Layout, SegmentError, SegmentReport};
use crate::task::spec::StagedPlan;
use crate::task::stitch::ChunkGrid;
use std::collections::HashMap;
use std::time::Instant;

/// The index of the first entry of `face` (sorted by voxel) at or past `voxel`: galloping from
/// the start, so a cursor that moves a little costs a little.
pub(super) fn seek(face: &[(u64, u32)], voxel: u64) -> usize {
    let mut step = 1;
    let mut low = 0;
    while low + step <= face.len() && face[low + step - 1].0 < voxel {
        low += step;
        step *= 2;
    }
    let high = (low + step).min(face.len());
    low + face[low..high].partition_point(|&(v, _)| v < voxel)
}

/// Merge stage: joins the blocks through their faces (segment: and their open plateaus),
/// numbers the components by first voxel, then drops dust (connected components) or
/// agglomerates the region graph (segment), and writes each block's relabel table.
pub(super) async fn merge<W: StagedWork>(
    plan: &StagedPlan<W>,
    blocks: ChunkGrid,
    staging: &Staging,
    layout: &Layout,
) -> Result<SegmentReport, StagedError> {
    let mut passes = Passes::new();
    let counts = staging
        .get_each(Kind::Summary, plan.blocks, |_, key, bytes| {
            Summary::decode_counts(key, &bytes)
        })
        .await?;
    let borders = staging
        .get_each(Kind::Border, plan.blocks, |_, key, bytes| {
            Border::decode(key, &bytes)
        })
        .await?;
    let summaries = counts
        .into_iter()
        .zip(borders)
        .enumerate()
        .map(|(b, (c, border))| c.with_border(&staging.key(Kind::Border, b), border))
        .collect::<Result<Vec<_>, _>>()?;
    let mut graphs = Vec::new();
    if let Work::Segment(_) = plan.work.work() {
        graphs = staging
            .get_each(Kind::Graph, plan.blocks, |b, key, bytes| {
                BlockGraph::decode(key, &bytes, summaries[b].first.len())
            })
            .await?;
    }
    let keys: Vec<[String; 2]> = (0..plan.blocks)
        .map(|b| [Kind::Border, Kind::Graph].map(|k| staging.key(k, b)))
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
pub(super) enum Joined {
    Remaps(Remaps),
    ForRounds(rounds::FragmentGraphs),
}

pub(super) struct Remaps {
    pub(super) tables: Vec<Vec<u32>>,
    pub(super) report: SegmentReport,
}

/// Every block label of a plan as one union-find node, and the voxels on block faces.
pub(super) struct BlockNodes<'a> {
    pub(super) summaries: &'a [Summary],
    /// Per block: its summary's and its graph's keys (for errors).
    pub(super) keys: &'a [[String; 2]],
    pub(super) offsets: Vec<usize>,
    pub(super) total: usize,
    pub(super) blocks: ChunkGrid,
    pub(super) voxels: Grid,
}

impl<'a> BlockNodes<'a> {
    pub(super) fn new(
        summaries: &'a [Summary],
        blocks: ChunkGrid,
        keys: &'a [[String; 2]],
    ) -> Self {
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

    pub(super) fn node(&self, b: usize, label: u32) -> u32 {
        (self.offsets[b] + label as usize - 1) as u32
    }

    pub(super) fn owner(&self, p: Vec3) -> usize {
        self.blocks.chunk_of(p)
    }

    /// The node of a voxel on its own block's face, which an object of block `asker` (its
    /// summary or its graph: `object` 0 or 1) names.
    pub(super) fn face_node(
        &self,
        voxel: u64,
        asker: usize,
        object: usize,
    ) -> Result<u32, StagedError> {
        let p = self.voxels.position(voxel as usize);
        let owner = self.owner(p);
        let face = self.summaries.get(owner).map_or(&[][..], |o| &o.face[..]);
        face.binary_search_by_key(&voxel, |&(v, _)| v)
            .map(|at| self.node(owner, face[at].1))
            .map_err(|_| self.not_on_face(voxel, owner, asker, object))
    }

    /// The error for an object of block `asker` that names `voxel` as a face voxel of `owner`
    /// when that block's face lacks it.
    pub(super) fn not_on_face(
        &self,
        voxel: u64,
        owner: usize,
        asker: usize,
        object: usize,
    ) -> StagedError {
        StagedError::Corrupt {
            key: self.keys[asker][object].clone(),
            why: format!("voxel {voxel} is not a face voxel of block {owner}"),
        }
    }

    /// Joins each block's halo voxels to the labels their own blocks give them. A halo is sorted
    /// by voxel, so the voxels it names on each neighbour's face come in that face's order: one
    /// cursor per neighbour moves forward through its face.
    pub(super) fn glue_halos(&self, sets: &mut UnionFind) -> Result<(), StagedError> {
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
    pub(super) fn number(&self, sets: &mut UnionFind) -> (Vec<u32>, Vec<u64>) {
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
    pub(super) fn tables(&self, f: impl Fn(u32) -> u32) -> Vec<Vec<u32>> {
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
pub(super) fn join_components(nodes: &BlockNodes, dust: u64) -> Result<Remaps, StagedError> {
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
pub(super) fn join_segments(
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
pub(super) fn join_fragments(
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
pub(super) fn fragment_pairs(
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
