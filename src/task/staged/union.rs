//! Joining block labels into components without a task that sees the whole volume: the link
//! stage, then a hierarchy of union tasks up an octree of block groups and down tasks back.
//!
//! A block label is named by its first voxel (its index in the region), which no other label
//! has; a component is named by the smallest name among its labels, its first voxel.
//!
//! - **link** (one task per block): the block's border and those of its (up to 26) neighbours
//!   give every pair of labels, one in the block and one in a neighbour, that are one component:
//!   the block's halo voxels looked up on the neighbours' faces, and the neighbours' halo voxels
//!   on the block's face. Both blocks of a pair record it. What the block writes
//!   (`block-<i>.links`) is its **up record**: the labels that have pairs (its *open* roots,
//!   with their sizes and block boxes) and the pairs, each with its near label's root.
//! - **union-l** (one task per group of 2^l blocks on each axis, l = 1 up to the level whose
//!   single group is the grid): reads its eight child groups' up records, joins the roots of
//!   every pair whose two ends lie in the group (each such pair arrives twice, once from each
//!   side), and sums the sizes and widens the boxes of the joined roots. A root with no pair
//!   leaving the group is *closed*: its component is whole, its name and size final. The task
//!   writes its own up record (the open roots and the pairs that leave the group, renamed to
//!   their roots: `union-<l>-<g>.up`) and the map from its children's roots to its roots, with
//!   the closed roots (`union-<l>-<g>.map`). The top level closes everything and writes, for
//!   each child, the component of each of the child's open roots (`union-<l-1>-<c>.final`).
//! - **down-l** (one task per group, l from the top down to 1): the component of each of the
//!   group's open roots (from its parent) and the group's map give the component of each of its
//!   children's open roots, written per child (`union-<l-1>-<c>.final`). Level 0 (a block) is
//!   the numbering's first stage ([`super::number`]).
//!
//! What a task holds: a link task, five borders' worth of face and halo voxels of its block's
//! surface, at most 27 blocks' border objects; a union or down task at level l, the records of
//! the components that touch its children's faces with a pair: label-level entries (about 40
//! bytes per open root and 24 per pair), never voxels, so it grows with the area of its
//! children's faces (4^l block faces), not with the volume under them.
//!
//! Payloads (varints; a zigzag difference d stored as (d << 1) ^ (d >> 63)):
//! - links and up: R, R open roots (name as an increase, size, block box: 3 lowest and 3 highest
//!   block coordinates), P, P pairs (near as an increase, far as a zigzag difference from near,
//!   near minus its root), sorted by (near, far), every pair's root among the roots;
//! - map: M, M (child root as an increase, child root minus root), C, C closed roots (as roots
//!   above);
//! - final: N, N (open root as an increase, open root minus component, component size,
//!   component block box).

use super::block::{step, BlockGraph, Border, Summary};
use super::format::*;
use super::rounds::{groups, round_index, widen, BlockBox};
use super::{Passes, StagedError};
use crate::geometry::{Box3, Vec3};
use crate::gpu::labeling::DeferredVoxel;
use crate::hash::IdBuildHasher;
use crate::ops::union_find::UnionFind;
use crate::ops::watershed::{Grid, DIRECTIONS};
use crate::task::segment::{resolve_plateaus, Layout, SegmentError, SegmentReport};
use crate::task::stitch::ChunkGrid;
use std::collections::HashMap;

/// A component as far as a task knows it: its name (smallest label name so far), voxels so
/// far, and the box of blocks its labels and their faces touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Root {
    pub(super) id: u64,
    pub(super) size: u64,
    pub(super) bbox: BlockBox,
}

/// A pair of labels in one component whose far end lies outside the writer's group, with the
/// near end's root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Pending {
    pub(super) near: u64,
    pub(super) far: u64,
    pub(super) root: u64,
}

/// A voxel of a plateau that crosses block faces (segment), waiting for the group that holds
/// all of it: the plateau's pointers depend on its whole extent (see src/ops/watershed.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PlateauVoxel {
    pub(super) voxel: u64,
    /// Bidirectional candidate directions (waterz order).
    pub(super) bidirectional: u8,
    /// Which of those lead to an exit.
    pub(super) to_exit: u8,
    /// The voxel's label.
    pub(super) label: u64,
    /// Per bidirectional direction, the label of the neighbour there (0 elsewhere).
    pub(super) targets: [u64; 6],
}

/// A label that an unresolved plateau voxel may join (its own, or a bidirectional neighbour's):
/// its root stays open, and findable by label, until the plateau is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Hold {
    pub(super) label: u64,
    pub(super) voxel: u64,
    pub(super) root: u64,
}

/// What a block (link stage) or a group (union stage) hands up: its open roots, the pairs
/// that leave it, and (segment) the voxels of plateaus that leave it, with the holds on the
/// labels they may join.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct UpRecord {
    pub(super) roots: Vec<Root>,
    pub(super) pairs: Vec<Pending>,
    pub(super) plateau: Vec<PlateauVoxel>,
    pub(super) holds: Vec<Hold>,
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

fn put_root(out: &mut Vec<u8>, last: &mut u64, r: &Root) {
    put_varint(out, r.id - *last);
    put_varint(out, r.size);
    for v in r.bbox {
        put_varint(out, v as u64);
    }
    *last = r.id;
}

fn put_roots(out: &mut Vec<u8>, roots: &[Root]) {
    put_varint(out, roots.len() as u64);
    let mut last = 0;
    for r in roots {
        put_root(out, &mut last, r);
    }
}

/// Reads a root; its box must lie in a grid of `counts` blocks.
fn read_root(r: &mut Reader, last: &mut u64, counts: Vec3) -> Result<Root, StagedError> {
    let id = last
        .checked_add(r.varint()?)
        .ok_or_else(|| r.corrupt("a root past 2^64".into()))?;
    let (size, bbox) = read_size_and_box(r, counts)?;
    *last = id;
    Ok(Root { id, size, bbox })
}

/// Reads a root's size and block box, which must lie in a grid of `counts` blocks.
fn read_size_and_box(r: &mut Reader, counts: Vec3) -> Result<(u64, BlockBox), StagedError> {
    let size = r.varint()?;
    let mut bbox = [0u32; 6];
    for v in &mut bbox {
        *v = u32::try_from(r.varint()?).map_err(|_| r.corrupt("a block box past 2^32".into()))?;
    }
    if (0..3).any(|a| bbox[a] > bbox[a + 3] || bbox[a + 3] as usize >= counts[a]) {
        return Err(r.corrupt(format!("block box {bbox:?} is not in the grid")));
    }
    Ok((size, bbox))
}

/// Reads R roots, which must be in strictly increasing order.
fn read_roots(r: &mut Reader, counts: Vec3) -> Result<Vec<Root>, StagedError> {
    let n = r.count_of_pairs()?;
    let mut roots: Vec<Root> = Vec::with_capacity(n as usize);
    let mut last = 0;
    for i in 0..n {
        let root = read_root(r, &mut last, counts)?;
        if i > 0 && roots.last().is_some_and(|l| l.id >= root.id) {
            return Err(r.corrupt(format!("root {} out of order", root.id)));
        }
        roots.push(root);
    }
    Ok(roots)
}

fn find_root(roots: &[Root], id: u64) -> Option<&Root> {
    roots
        .binary_search_by_key(&id, |r| r.id)
        .ok()
        .map(|at| &roots[at])
}

impl UpRecord {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_roots(&mut out, &self.roots);
        put_varint(&mut out, self.pairs.len() as u64);
        let mut last = 0;
        for p in &self.pairs {
            put_varint(&mut out, p.near - last);
            put_zigzag(&mut out, p.far.wrapping_sub(p.near) as i64);
            put_varint(&mut out, p.near - p.root);
            last = p.near;
        }
        put_varint(&mut out, self.plateau.len() as u64);
        let mut last = 0;
        for v in &self.plateau {
            put_varint(&mut out, v.voxel - last);
            put_varint(&mut out, v.bidirectional as u64);
            put_varint(&mut out, v.to_exit as u64);
            put_zigzag(&mut out, v.label.wrapping_sub(v.voxel) as i64);
            for t in v.targets {
                match t {
                    0 => put_varint(&mut out, 0),
                    t => put_varint(&mut out, zigzag(t.wrapping_sub(v.voxel) as i64) + 1),
                }
            }
            last = v.voxel;
        }
        put_varint(&mut out, self.holds.len() as u64);
        let mut last = 0;
        for h in &self.holds {
            put_varint(&mut out, h.label - last);
            put_zigzag(&mut out, h.voxel.wrapping_sub(h.label) as i64);
            put_varint(&mut out, h.label - h.root);
            last = h.label;
        }
        out
    }

    /// Decodes an up record of a grid of `counts` blocks: roots and pairs in order, every
    /// pair's root among the roots.
    pub(super) fn decode(key: &str, bytes: &[u8], counts: Vec3) -> Result<UpRecord, StagedError> {
        let mut r = Reader { bytes, at: 0, key };
        let roots = read_roots(&mut r, counts)?;
        let n = r.count_of_pairs()?;
        let mut pairs: Vec<Pending> = Vec::with_capacity(n as usize);
        let mut last = 0u64;
        for _ in 0..n {
            let near = last
                .checked_add(r.varint()?)
                .ok_or_else(|| r.corrupt("a pair past 2^64".into()))?;
            let far = near.wrapping_add(r.zigzag()? as u64);
            let root = near
                .checked_sub(r.varint()?)
                .ok_or_else(|| r.corrupt(format!("label {near}'s root below 0")))?;
            let pair = Pending { near, far, root };
            if pairs.last().is_some_and(|l| (l.near, l.far) >= (near, far)) {
                return Err(r.corrupt(format!("pair ({near}, {far}) out of order")));
            }
            if find_root(&roots, root).is_none() {
                return Err(r.corrupt(format!("pair ({near}, {far}) has root {root}, not a root")));
            }
            pairs.push(pair);
            last = near;
        }
        let n = r.count_of_pairs()?;
        let mut plateau: Vec<PlateauVoxel> = Vec::with_capacity(n as usize);
        let mut last = 0u64;
        for _ in 0..n {
            let voxel = last
                .checked_add(r.varint()?)
                .ok_or_else(|| r.corrupt("a voxel past 2^64".into()))?;
            let bits = [r.varint()?, r.varint()?];
            if bits.iter().any(|&b| b > 63) || bits[1] & !bits[0] != 0 {
                return Err(r.corrupt(format!("plateau voxel {voxel}'s directions {bits:?}")));
            }
            let label = voxel.wrapping_add(r.zigzag()? as u64);
            let mut targets = [0u64; 6];
            for t in &mut targets {
                *t = match r.varint()? {
                    0 => 0,
                    z => voxel.wrapping_add(unzigzag(z - 1) as u64),
                };
            }
            if plateau.last().is_some_and(|l| l.voxel >= voxel) {
                return Err(r.corrupt(format!("plateau voxel {voxel} out of order")));
            }
            plateau.push(PlateauVoxel {
                voxel,
                bidirectional: bits[0] as u8,
                to_exit: bits[1] as u8,
                label,
                targets,
            });
            last = voxel;
        }
        let n = r.count_of_pairs()?;
        let mut holds: Vec<Hold> = Vec::with_capacity(n as usize);
        let mut last = 0u64;
        for _ in 0..n {
            let label = last
                .checked_add(r.varint()?)
                .ok_or_else(|| r.corrupt("a label past 2^64".into()))?;
            let voxel = label.wrapping_add(r.zigzag()? as u64);
            let root = label
                .checked_sub(r.varint()?)
                .ok_or_else(|| r.corrupt(format!("label {label}'s root below 0")))?;
            let hold = Hold { label, voxel, root };
            if holds
                .last()
                .is_some_and(|l| (l.label, l.voxel) >= (label, voxel))
            {
                return Err(r.corrupt(format!("hold ({label}, {voxel}) out of order")));
            }
            if find_root(&roots, root).is_none() {
                return Err(r.corrupt(format!(
                    "hold ({label}, {voxel}) has root {root}, not a root"
                )));
            }
            holds.push(hold);
            last = label;
        }
        r.finish("up record")?;
        Ok(UpRecord {
            roots,
            pairs,
            plateau,
            holds,
        })
    }
}

/// A union task's map, for the task below it on the way down: each of its children's open
/// roots with the root it joined, and the roots that closed here.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct MapRecord {
    /// (child root, root), sorted by child root.
    pub(super) to: Vec<(u64, u64)>,
    pub(super) closed: Vec<Root>,
}

impl MapRecord {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, self.to.len() as u64);
        let mut last = 0;
        for &(child, root) in &self.to {
            put_varint(&mut out, child - last);
            put_varint(&mut out, child - root);
            last = child;
        }
        put_roots(&mut out, &self.closed);
        out
    }

    pub(super) fn decode(key: &str, bytes: &[u8], counts: Vec3) -> Result<MapRecord, StagedError> {
        let mut r = Reader { bytes, at: 0, key };
        let n = r.count_of_pairs()?;
        let mut to: Vec<(u64, u64)> = Vec::with_capacity(n as usize);
        let mut last = 0u64;
        for _ in 0..n {
            let child = last
                .checked_add(r.varint()?)
                .ok_or_else(|| r.corrupt("a root past 2^64".into()))?;
            let root = child
                .checked_sub(r.varint()?)
                .ok_or_else(|| r.corrupt(format!("root {child}'s root below 0")))?;
            if to.last().is_some_and(|l| l.0 >= child) {
                return Err(r.corrupt(format!("root {child} out of order")));
            }
            to.push((child, root));
            last = child;
        }
        let closed = read_roots(&mut r, counts)?;
        r.finish("map")?;
        Ok(MapRecord { to, closed })
    }
}

/// The components of a group's (or a block's) open roots: (open root, its component), sorted
/// by open root.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct FinalRecord {
    pub(super) finals: Vec<(u64, Root)>,
}

impl FinalRecord {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, self.finals.len() as u64);
        let mut last = 0;
        for (open, c) in &self.finals {
            put_varint(&mut out, open - last);
            put_varint(&mut out, open - c.id);
            put_varint(&mut out, c.size);
            for v in c.bbox {
                put_varint(&mut out, v as u64);
            }
            last = *open;
        }
        out
    }

    pub(super) fn decode(
        key: &str,
        bytes: &[u8],
        counts: Vec3,
    ) -> Result<FinalRecord, StagedError> {
        let mut r = Reader { bytes, at: 0, key };
        let n = r.count_of_pairs()?;
        let mut finals: Vec<(u64, Root)> = Vec::with_capacity(n as usize);
        let mut last = 0u64;
        for _ in 0..n {
            let open = last
                .checked_add(r.varint()?)
                .ok_or_else(|| r.corrupt("a root past 2^64".into()))?;
            let id = open
                .checked_sub(r.varint()?)
                .ok_or_else(|| r.corrupt(format!("root {open}'s component below 0")))?;
            let (size, bbox) = read_size_and_box(&mut r, counts)?;
            let c = Root { id, size, bbox };
            if finals.last().is_some_and(|l| l.0 >= open) {
                return Err(r.corrupt(format!("root {open} out of order")));
            }
            finals.push((open, c));
            last = open;
        }
        r.finish("final record")?;
        Ok(FinalRecord { finals })
    }

    pub(super) fn get(&self, open: u64) -> Option<&Root> {
        self.finals
            .binary_search_by_key(&open, |e| e.0)
            .ok()
            .map(|at| &self.finals[at].1)
    }
}

/// Block coordinates of block `b` of a grid of `counts` blocks.
pub(super) fn block_coords(counts: Vec3, b: usize) -> Vec3 {
    [
        b % counts[0],
        (b / counts[0]) % counts[1],
        b / (counts[0] * counts[1]),
    ]
}

/// The block holding the voxel named `id` (its region index).
pub(super) fn block_of(blocks: &ChunkGrid, id: u64) -> usize {
    let region = Grid {
        shape: blocks.region,
    };
    blocks.chunk_of(region.position(id as usize))
}

/// The link stage: block `b`'s up record from its border and its neighbours'.
pub(super) async fn link(
    blocks: ChunkGrid,
    b: usize,
    segment: bool,
    staging: &Staging,
) -> Result<SegmentReport, StagedError> {
    let mut passes = Passes::new();
    let counts = blocks.counts();
    let here = block_coords(counts, b);
    let neighbours: Vec<usize> = neighbours_of(counts, here);
    let summary = Summary::decode_counts(
        &staging.key(Kind::Summary, b),
        &staging.get(Kind::Summary, b).await?,
    )?;
    let mine_key = staging.key(Kind::Border, b);
    let mine = Border::decode(&mine_key, &staging.get(Kind::Border, b).await?)?;
    let mut theirs = Vec::with_capacity(neighbours.len());
    for some in neighbours.chunks(READ_CONCURRENCY) {
        let got = futures::future::try_join_all(some.iter().map(|&n| staging.get(Kind::Border, n)))
            .await?;
        for (&n, bytes) in some.iter().zip(got) {
            theirs.push((n, Border::decode(&staging.key(Kind::Border, n), &bytes)?));
        }
    }
    passes.done("read");
    let border_of = |n: usize| theirs.iter().find(|t| t.0 == n).map(|t| &t.1);
    let mut pairs: Vec<(u64, u64)> = Vec::new();
    for &(voxel, label) in &mine.halo {
        let owner = block_of(&blocks, voxel);
        let far = border_of(owner)
            .and_then(|there| there.face_label(voxel).and_then(|l| there.id(l)))
            .ok_or_else(|| StagedError::Corrupt {
                key: mine_key.clone(),
                why: format!("halo voxel {voxel} is not a face voxel of block {owner}"),
            })?;
        pairs.push((mine.id(label).expect("a border names its labels"), far));
    }
    for (n, there) in &theirs {
        for &(voxel, label) in &there.halo {
            if block_of(&blocks, voxel) != b {
                continue;
            }
            let near = mine
                .face_label(voxel)
                .and_then(|l| mine.id(l))
                .ok_or_else(|| StagedError::Corrupt {
                    key: staging.key(Kind::Border, *n),
                    why: format!("halo voxel {voxel} is not a face voxel of block {b}"),
                })?;
            pairs.push((near, there.id(label).expect("a border names its labels")));
        }
    }
    pairs.sort_unstable();
    pairs.dedup();
    let (plateau, holds) = match segment {
        true => {
            let borders = Borders {
                blocks: &blocks,
                b,
                mine: &mine,
                theirs: &theirs,
            };
            plateaus(staging, &borders, &summary, &neighbours).await?
        }
        false => (Vec::new(), Vec::new()),
    };
    // The open labels: those with pairs or holds.
    let mut open: Vec<u64> = pairs
        .iter()
        .map(|p| p.0)
        .chain(holds.iter().map(|h| h.label))
        .collect();
    open.sort_unstable();
    open.dedup();
    let sides = face_sides(&mine, blocks, b);
    let mut roots: Vec<Root> = Vec::with_capacity(open.len());
    for near in open {
        let label = summary
            .first
            .binary_search(&near)
            .map_err(|_| StagedError::Corrupt {
                key: mine_key.clone(),
                why: format!("voxel {near} is no label's first voxel in the summary"),
            })?;
        roots.push(Root {
            id: near,
            size: summary.sizes[label],
            bbox: touch_box(counts, here, sides.get(&(label as u32 + 1)).copied()),
        });
    }
    let record = UpRecord {
        roots,
        pairs: pairs
            .into_iter()
            .map(|(near, far)| Pending {
                near,
                far,
                root: near,
            })
            .collect(),
        plateau,
        holds,
    };
    passes.done("link");
    let report = SegmentReport {
        fragments: record.roots.len(),
        region_edges: record.pairs.len(),
        deferred: record.plateau.len(),
        ..Default::default()
    };
    staging.put(Kind::Links, b, record.encode()).await?;
    passes.done("write");
    Ok(SegmentReport {
        passes: passes.into_vec(),
        ..report
    })
}

/// A block's border and its neighbours', as the link stage reads them.
struct Borders<'a> {
    blocks: &'a ChunkGrid,
    b: usize,
    mine: &'a Border,
    theirs: &'a [(usize, Border)],
}

impl Borders<'_> {
    /// The name of the label at a face voxel of a neighbour, if it is one.
    fn neighbour_label(&self, voxel: u64) -> Option<u64> {
        let owner = block_of(self.blocks, voxel);
        let (_, there) = self.theirs.iter().find(|t| t.0 == owner)?;
        there.face_label(voxel).and_then(|l| there.id(l))
    }
}

/// The block's plateau voxels whose plateaus leave it, named in the whole volume (their labels
/// and their bidirectional neighbours' labels), and the holds on the block's labels that they
/// or the neighbours' open plateau voxels may join.
async fn plateaus(
    staging: &Staging,
    borders: &Borders<'_>,
    summary: &Summary,
    neighbours: &[usize],
) -> Result<(Vec<PlateauVoxel>, Vec<Hold>), StagedError> {
    let (blocks, b) = (borders.blocks, borders.b);
    let region = Grid {
        shape: blocks.region,
    };
    let count = summary.first.len();
    let name = |l: u32| match l {
        0 => 0,
        l => summary.first[l as usize - 1],
    };
    let key = staging.key(Kind::Plateaus, b);
    let own = BlockGraph::decode_open(&key, &staging.get(Kind::Plateaus, b).await?, count)?;
    let mut plateau = Vec::with_capacity(own.len());
    let mut holds: Vec<(u64, u64)> = Vec::new();
    for v in &own {
        let p = region.position(v.voxel as usize);
        let mut targets = [0u64; 6];
        for d in (0..6).filter(|d| v.bidirectional & (1 << d) != 0) {
            let Some(q) = step(p, d).filter(|q| (0..3).all(|a| q[a] < region.shape[a])) else {
                continue;
            };
            targets[d] = if blocks.chunk_of(q) == b {
                let t = name(v.neighbours[d]);
                if t != 0 {
                    holds.push((t, v.voxel));
                }
                t
            } else {
                borders.neighbour_label(region.index(q) as u64).unwrap_or(0)
            };
        }
        holds.push((name(v.label), v.voxel));
        plateau.push(PlateauVoxel {
            voxel: v.voxel,
            bidirectional: v.bidirectional,
            to_exit: v.to_exit,
            label: name(v.label),
            targets,
        });
    }
    // The neighbours' open voxels next to this block hold the labels there.
    for &n in neighbours {
        let key = staging.key(Kind::Plateaus, n);
        let bytes = staging.get(Kind::Plateaus, n).await?;
        for v in BlockGraph::decode_open(&key, &bytes, u32::MAX as usize)? {
            let p = region.position(v.voxel as usize);
            for d in (0..6).filter(|d| v.bidirectional & (1 << d) != 0) {
                let Some(q) = step(p, d).filter(|q| (0..3).all(|a| q[a] < region.shape[a])) else {
                    continue;
                };
                if blocks.chunk_of(q) != b {
                    continue;
                }
                if let Some(t) = borders
                    .mine
                    .face_label(region.index(q) as u64)
                    .and_then(|l| borders.mine.id(l))
                {
                    holds.push((t, v.voxel));
                }
            }
        }
    }
    plateau.sort_unstable_by_key(|v| v.voxel);
    holds.sort_unstable();
    holds.dedup();
    Ok((
        plateau,
        holds
            .into_iter()
            .map(|(label, voxel)| Hold {
                label,
                voxel,
                root: label,
            })
            .collect(),
    ))
}

/// The blocks around block coordinates `here` (up to 26), in Fortran order.
fn neighbours_of(counts: Vec3, here: Vec3) -> Vec<usize> {
    let mut out = Vec::new();
    for dz in -1i64..=1 {
        for dy in -1i64..=1 {
            for dx in -1i64..=1 {
                let c = [dx, dy, dz];
                let q: Vec<i64> = (0..3).map(|a| here[a] as i64 + c[a]).collect();
                if c == [0, 0, 0] || (0..3).any(|a| q[a] < 0 || q[a] >= counts[a] as i64) {
                    continue;
                }
                out.push(q[0] as usize + counts[0] * (q[1] as usize + counts[1] * q[2] as usize));
            }
        }
    }
    out
}

/// Per label on block `b`'s shared faces, the faces it touches: bit 2a for the low face on
/// axis a, 2a + 1 for the high one.
pub(super) fn face_sides(border: &Border, blocks: ChunkGrid, b: usize) -> HashMap<u32, u8> {
    let core = blocks.core(b);
    let region = Grid {
        shape: blocks.region,
    };
    let mut sides: HashMap<u32, u8> = HashMap::new();
    for &(voxel, label) in &border.face {
        let p = region.position(voxel as usize);
        let mut bits = 0u8;
        for (a, &v) in p.iter().enumerate() {
            bits |= ((v == core.start[a]) as u8) << (2 * a);
            bits |= ((v + 1 == core.stop[a]) as u8) << (2 * a + 1);
        }
        *sides.entry(label).or_default() |= bits;
    }
    sides
}

/// The blocks a label of the block at `here` can have region-graph edges in: its own, and the
/// neighbours across the faces it touches (`sides` as [`face_sides`]), within the grid.
pub(super) fn touch_box(counts: Vec3, here: Vec3, sides: Option<u8>) -> BlockBox {
    let sides = sides.unwrap_or(0);
    let mut bbox = [0u32; 6];
    for a in 0..3 {
        let low = sides & (1 << (2 * a)) != 0 && here[a] > 0;
        let high = sides & (1 << (2 * a + 1)) != 0 && here[a] + 1 < counts[a];
        bbox[a] = (here[a] - low as usize) as u32;
        bbox[a + 3] = (here[a] + high as usize) as u32;
    }
    bbox
}

/// The child groups (level `level` - 1) of group `group` of level `level`, as indices of that
/// level's groups.
pub(super) fn children(counts: Vec3, level: u32, group: usize) -> Vec<usize> {
    let here = groups(counts, level).core(group);
    let below = groups(counts, level - 1);
    let step = below.chunk[0];
    let mut out = Vec::new();
    for z in (here.start[2]..here.stop[2]).step_by(step) {
        for y in (here.start[1]..here.stop[1]).step_by(step) {
            for x in (here.start[0]..here.stop[0]).step_by(step) {
                out.push(below.chunk_of([x, y, z]));
            }
        }
    }
    out
}

/// The up record of child `child` of a union task at `level` (a block's links at level 1).
async fn child_record(
    staging: &Staging,
    counts: Vec3,
    level: u32,
    child: usize,
) -> Result<(String, UpRecord), StagedError> {
    let (kind, index) = match level {
        1 => (Kind::Links, child),
        _ => (Kind::Up, round_index(level - 1, child)),
    };
    let key = staging.key(kind, index);
    let bytes = staging.get(kind, index).await?;
    let record = UpRecord::decode(&key, &bytes, counts)?;
    Ok((key, record))
}

/// What a union task decided.
struct Joined {
    up: UpRecord,
    map: MapRecord,
    /// Per child (in [`children`] order), its open roots' components.
    finals: Vec<FinalRecord>,
}

/// Joins the children's open roots through the pairs between them and the plateaus the group
/// holds whole (see the module doc). `group` is in block coordinates; `top` says that nothing
/// may leave it.
fn join(
    parts: Vec<(String, UpRecord)>,
    blocks: &ChunkGrid,
    group: Box3,
    top: bool,
) -> Result<Joined, StagedError> {
    let counts = blocks.counts();
    let corrupt = |c: usize, why: String| StagedError::Corrupt {
        key: parts[c].0.clone(),
        why,
    };
    // Every child's roots, in name order (local index order is name order, so the union-find's
    // smallest index is the smallest name).
    let mut nodes: Vec<(Root, usize)> = Vec::new();
    for (c, (_, part)) in parts.iter().enumerate() {
        nodes.extend(part.roots.iter().map(|r| (*r, c)));
    }
    nodes.sort_unstable_by_key(|n| n.0.id);
    if let Some(w) = nodes.windows(2).find(|w| w[0].0.id == w[1].0.id) {
        return Err(corrupt(
            w[1].1,
            format!("root {} is also a root of another child", w[1].0.id),
        ));
    }
    let local = |id: u64| {
        nodes
            .binary_search_by_key(&id, |n| n.0.id)
            .expect("a pair's or hold's root is a root") as u32
    };
    let mut sets = UnionFind::new(nodes.len());
    let region = Grid {
        shape: blocks.region,
    };
    let in_group = |p: Vec3| {
        let c = block_coords(counts, blocks.chunk_of(p));
        (0..3).all(|a| c[a] >= group.start[a] && c[a] < group.stop[a])
    };
    let inside = |id: u64| in_group(region.position(id as usize));
    let mut waiting: HashMap<(u64, u64), (u32, usize), IdBuildHasher> = HashMap::default();
    let mut leaving: Vec<(Pending, u32)> = Vec::new();
    for (c, (_, part)) in parts.iter().enumerate() {
        for p in &part.pairs {
            let node = local(p.root);
            if !inside(p.far) {
                leaving.push((*p, node));
                continue;
            }
            let key = (p.near.min(p.far), p.near.max(p.far));
            match waiting.remove(&key) {
                Some((other, _)) => {
                    sets.union(node, other);
                }
                None => {
                    waiting.insert(key, (node, c));
                }
            }
        }
    }
    if let Some((&(a, b), &(_, c))) = waiting.iter().min_by_key(|e| e.0) {
        return Err(corrupt(
            c,
            format!("pair ({a}, {b}) inside the group has no mirror from the other side"),
        ));
    }
    let resolved = resolve_closed_plateaus(&parts, region, &in_group, &local, &mut sets)?;
    if top {
        if let Some((p, _)) = leaving.first() {
            return Err(corrupt(
                0,
                format!("pair ({}, {}) leaves the grid", p.near, p.far),
            ));
        }
        if let Some(v) = resolved.plateau.first() {
            return Err(corrupt(
                0,
                format!("plateau voxel {} is unresolved at the top", v.voxel),
            ));
        }
    }
    let mut total: Vec<Option<Root>> = vec![None; nodes.len()];
    for (i, (r, _)) in nodes.iter().enumerate() {
        let root = sets.find(i as u32) as usize;
        match &mut total[root] {
            Some(t) => {
                t.size += r.size;
                widen(&mut t.bbox, &r.bbox);
            }
            none => {
                *none = Some(Root {
                    id: nodes[root].0.id,
                    ..*r
                })
            }
        }
    }
    let mut open = vec![false; nodes.len()];
    let mut rooted = |node: u32| {
        let root = sets.find(node) as usize;
        open[root] = true;
        nodes[root].0.id
    };
    let mut pairs: Vec<Pending> = leaving
        .into_iter()
        .map(|(p, node)| Pending {
            root: rooted(node),
            ..p
        })
        .collect();
    pairs.sort_unstable();
    let mut holds: Vec<Hold> = resolved
        .holds
        .into_iter()
        .map(|(h, node)| Hold {
            root: rooted(node),
            ..h
        })
        .collect();
    holds.sort_unstable();
    let roots: Vec<Root> = (0..nodes.len())
        .filter(|&i| open[i])
        .map(|i| total[i].expect("a root has a total"))
        .collect();
    let closed: Vec<Root> = (0..nodes.len())
        .filter(|&i| total[i].is_some() && !open[i])
        .map(|i| total[i].expect("checked"))
        .collect();
    let mut to = Vec::with_capacity(nodes.len());
    let mut finals = vec![FinalRecord::default(); parts.len()];
    for (i, (r, c)) in nodes.iter().enumerate() {
        let root = sets.find(i as u32) as usize;
        to.push((r.id, nodes[root].0.id));
        if top {
            finals[*c]
                .finals
                .push((r.id, total[root].expect("a root has a total")));
        }
    }
    Ok(Joined {
        up: UpRecord {
            roots,
            pairs,
            plateau: resolved.plateau,
            holds,
        },
        map: MapRecord { to, closed },
        finals,
    })
}

/// What is left of the children's plateaus once those the group holds whole are resolved: the
/// voxels of the others, and the holds still needed (with their nodes).
struct Unresolved {
    plateau: Vec<PlateauVoxel>,
    holds: Vec<(Hold, u32)>,
}

/// Resolves the plateaus that lie wholly in the group (every bidirectional neighbour of every
/// voxel in it, or outside the region), exactly as one process resolves them, and joins the
/// labels their pointers connect; releases their holds.
fn resolve_closed_plateaus(
    parts: &[(String, UpRecord)],
    region: Grid,
    in_group: &dyn Fn(Vec3) -> bool,
    local: &dyn Fn(u64) -> u32,
    sets: &mut UnionFind,
) -> Result<Unresolved, StagedError> {
    let corrupt = |c: usize, why: String| StagedError::Corrupt {
        key: parts[c].0.clone(),
        why,
    };
    let mut held: HashMap<(u64, u64), (Hold, u32)> = HashMap::new();
    let mut voxels: HashMap<Vec3, (PlateauVoxel, usize)> = HashMap::new();
    for (c, (_, part)) in parts.iter().enumerate() {
        for h in &part.holds {
            if held
                .insert((h.label, h.voxel), (*h, local(h.root)))
                .is_some()
            {
                return Err(corrupt(c, format!("hold ({}, {}) twice", h.label, h.voxel)));
            }
        }
        for v in &part.plateau {
            voxels.insert(region.position(v.voxel as usize), (*v, c));
        }
    }
    if voxels.is_empty() {
        return Ok(Unresolved {
            plateau: Vec::new(),
            holds: held.into_values().collect(),
        });
    }
    // A neighbour blocks a plateau's resolution when it lies in the region but outside the
    // group.
    let neighbour = |p: Vec3, d: usize| -> Option<Vec3> {
        let q = [0, 1, 2].map(|a| p[a] as i64 + DIRECTIONS[d][a]);
        (0..3)
            .all(|a| q[a] >= 0 && (q[a] as usize) < region.shape[a])
            .then(|| q.map(|v| v as usize))
    };
    let mut starts: Vec<Vec3> = voxels.keys().copied().collect();
    starts.sort_unstable_by_key(|p| (p[2], p[1], p[0]));
    let mut seen: std::collections::HashSet<Vec3> = Default::default();
    let mut closed: HashMap<Vec3, DeferredVoxel> = HashMap::new();
    let mut open: Vec<PlateauVoxel> = Vec::new();
    for start in starts {
        if !seen.insert(start) {
            continue;
        }
        let mut plateau = vec![start];
        let mut whole = true;
        let mut at = 0;
        while at < plateau.len() {
            let p = plateau[at];
            at += 1;
            let v = voxels[&p].0;
            for d in (0..6).filter(|d| v.bidirectional & (1 << d) != 0) {
                let Some(q) = neighbour(p, d) else { continue };
                if !in_group(q) {
                    whole = false;
                } else if voxels.contains_key(&q) && seen.insert(q) {
                    plateau.push(q);
                }
            }
        }
        for p in plateau {
            let v = voxels[&p].0;
            if whole {
                closed.insert(
                    p,
                    DeferredVoxel {
                        index: 0,
                        bidirectional: v.bidirectional,
                        to_exit: v.to_exit,
                    },
                );
            } else {
                open.push(v);
            }
        }
    }
    for (p, q) in resolve_plateaus(&closed) {
        let (v, c) = voxels[&p];
        let d = (0..6)
            .find(|&d| neighbour(p, d) == Some(q))
            .expect("a plateau pointer is one step");
        let target = v.targets[d];
        let node = |label: u64| {
            held.get(&(label, v.voxel)).map(|h| h.1).ok_or_else(|| {
                corrupt(
                    c,
                    format!("no hold on label {label} for plateau voxel {}", v.voxel),
                )
            })
        };
        if target == 0 {
            return Err(corrupt(
                c,
                format!("plateau voxel {} has no label toward {d}", v.voxel),
            ));
        }
        sets.union(node(v.label)?, node(target)?);
    }
    let released: std::collections::HashSet<u64> =
        closed.keys().map(|&p| region.index(p) as u64).collect();
    open.sort_unstable_by_key(|v| v.voxel);
    Ok(Unresolved {
        plateau: open,
        holds: held
            .into_values()
            .filter(|(h, _)| !released.contains(&h.voxel))
            .collect(),
    })
}

/// A union task: group `group` of level `level` (>= 1; `top` the last level).
pub(super) async fn union(
    blocks: ChunkGrid,
    level: u32,
    group: usize,
    top: bool,
    staging: &Staging,
    layout: &Layout,
) -> Result<SegmentReport, StagedError> {
    let mut passes = Passes::new();
    let counts = blocks.counts();
    let kids = children(counts, level, group);
    let mut parts = Vec::with_capacity(kids.len());
    for &c in &kids {
        parts.push(child_record(staging, counts, level, c).await?);
    }
    passes.done("read");
    let here = groups(counts, level).core(group);
    let joined = tokio::task::spawn_blocking(move || join(parts, &blocks, here, top))
        .await
        .map_err(SegmentError::from)??;
    passes.done("join");
    layout.check_cancel()?;
    let report = SegmentReport {
        fragments: joined.map.to.len(),
        segments: joined.map.closed.len(),
        region_edges: joined.up.pairs.len(),
        ..Default::default()
    };
    if top {
        for (&c, finals) in kids.iter().zip(&joined.finals) {
            let index = round_index(level - 1, c);
            staging.put(Kind::Final, index, finals.encode()).await?;
        }
    } else {
        let index = round_index(level, group);
        staging.put(Kind::Map, index, joined.map.encode()).await?;
        staging.put(Kind::Up, index, joined.up.encode()).await?;
    }
    passes.done("write");
    Ok(SegmentReport {
        passes: passes.into_vec(),
        ..report
    })
}

/// A down task: group `group` of level `level` (>= 1, below the top) hands each child the
/// components of its open roots.
pub(super) async fn down(
    blocks: ChunkGrid,
    level: u32,
    group: usize,
    staging: &Staging,
) -> Result<SegmentReport, StagedError> {
    let mut passes = Passes::new();
    let counts = blocks.counts();
    let index = round_index(level, group);
    let final_key = staging.key(Kind::Final, index);
    let finals = FinalRecord::decode(&final_key, &staging.get(Kind::Final, index).await?, counts)?;
    let map_key = staging.key(Kind::Map, index);
    let map = MapRecord::decode(&map_key, &staging.get(Kind::Map, index).await?, counts)?;
    passes.done("read");
    let kids = children(counts, level, group);
    let below = groups(counts, level - 1);
    let mut out = vec![FinalRecord::default(); kids.len()];
    for &(child_root, root) in &map.to {
        let component = match find_root(&map.closed, root) {
            Some(c) => *c,
            None => *finals.get(root).ok_or_else(|| StagedError::Corrupt {
                key: final_key.clone(),
                why: format!("open root {root} of {map_key} has no component"),
            })?,
        };
        let block = block_coords(counts, block_of(&blocks, child_root));
        let child = below.chunk_of(block);
        let at = kids
            .iter()
            .position(|&k| k == child)
            .ok_or_else(|| StagedError::Corrupt {
                key: map_key.clone(),
                why: format!("root {child_root} lies outside the group"),
            })?;
        out[at].finals.push((child_root, component));
    }
    passes.done("down");
    for (&c, record) in kids.iter().zip(&out) {
        staging
            .put(Kind::Final, round_index(level - 1, c), record.encode())
            .await?;
    }
    passes.done("write");
    Ok(SegmentReport {
        fragments: map.to.len(),
        passes: passes.into_vec(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_named() {
        let counts = [3, 2, 2];
        let up = UpRecord {
            roots: vec![
                Root {
                    id: 4,
                    size: 10,
                    bbox: [0, 0, 0, 1, 0, 0],
                },
                Root {
                    id: 1 << 40,
                    size: 1,
                    bbox: [2, 1, 1, 2, 1, 1],
                },
            ],
            pairs: vec![
                Pending {
                    near: 9,
                    far: 3,
                    root: 4,
                },
                Pending {
                    near: 9,
                    far: 1 << 41,
                    root: 4,
                },
                Pending {
                    near: (1 << 40) + 5,
                    far: 0,
                    root: 1 << 40,
                },
            ],
            plateau: vec![
                PlateauVoxel {
                    voxel: 7,
                    bidirectional: 0b100101,
                    to_exit: 0b100,
                    label: 4,
                    targets: [9, 0, 3, 0, 0, 8],
                },
                PlateauVoxel {
                    voxel: 1 << 41,
                    bidirectional: 1,
                    to_exit: 0,
                    label: 1 << 40,
                    targets: [(1 << 41) - 1, 0, 0, 0, 0, 0],
                },
            ],
            holds: vec![
                Hold {
                    label: 4,
                    voxel: 7,
                    root: 4,
                },
                Hold {
                    label: 9,
                    voxel: 7,
                    root: 4,
                },
            ],
        };
        let bytes = up.encode();
        assert_eq!(UpRecord::decode("k", &bytes, counts).unwrap(), up);
        for cut in 0..bytes.len() {
            assert!(
                UpRecord::decode("k", &bytes[..cut], counts).is_err(),
                "{cut}"
            );
        }
        // A box past the grid, a pair whose root is not a root, pairs out of order.
        assert!(UpRecord::decode("k", &bytes, [2, 2, 2]).is_err());
        let mut rootless = up.clone();
        rootless.pairs[0].root = 5;
        assert!(UpRecord::decode("k", &rootless.encode(), counts).is_err());
        let mut unordered = up.clone();
        unordered.pairs.swap(0, 1);
        assert!(UpRecord::decode("k", &unordered.encode(), counts).is_err());
        let mut unheld = up.clone();
        unheld.holds[1].root = 9;
        assert!(UpRecord::decode("k", &unheld.encode(), counts).is_err());
        let mut exits = up.clone();
        exits.plateau[0].to_exit = 0b10;
        assert!(UpRecord::decode("k", &exits.encode(), counts).is_err());

        let map = MapRecord {
            to: vec![(3, 3), (7, 3), (1 << 33, 7)],
            closed: up.roots.clone(),
        };
        assert_eq!(MapRecord::decode("m", &map.encode(), counts).unwrap(), map);
        let finals = FinalRecord {
            finals: vec![(3, up.roots[0]), (1 << 41, up.roots[1])],
        };
        let mut finals = finals;
        finals.finals[0].1.id = 2;
        let decoded = FinalRecord::decode("f", &finals.encode(), counts).unwrap();
        assert_eq!(decoded, finals);
        assert_eq!(decoded.get(1 << 41).map(|r| r.size), Some(1));
        assert!(decoded.get(4).is_none());
    }

    #[test]
    fn children_tile_their_group() {
        let counts = [5, 3, 2];
        for level in 1..4 {
            let grid = groups(counts, level);
            let below = groups(counts, level - 1);
            let mut seen = vec![0; below.len()];
            for g in 0..grid.len() {
                for c in children(counts, level, g) {
                    seen[c] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "level {level}: {seen:?}");
        }
        assert_eq!(neighbours_of([3, 3, 3], [1, 1, 1]).len(), 26);
        assert_eq!(neighbours_of([3, 3, 3], [0, 0, 0]).len(), 7);
        assert_eq!(neighbours_of([1, 1, 1], [0, 0, 0]).len(), 0);
        assert_eq!(
            touch_box([3, 3, 3], [1, 1, 1], Some(0b100001)),
            [0, 1, 1, 1, 1, 2]
        );
        assert_eq!(
            touch_box([3, 3, 3], [0, 0, 0], Some(0b111111)),
            [0, 0, 0, 1, 1, 1]
        );
    }
}
