//! Stitching boxes labelled one at a time into one labelling of a whole region, identical to
//! labelling the region at once.
//!
//! Each chunk's core is labelled with a margin (halo) around it; union edges start only at core
//! voxels, so every edge of the whole-region union graph is recorded by exactly one chunk. A core
//! voxel's component may reach halo voxels (which belong to neighbouring cores): those are
//! recorded, and gluing each one to its own chunk's component joins the pieces. The union of all
//! chunks' edges is the whole graph's, so the components are the same. Final labels are numbered
//! by first voxel (Fortran order over the region), so they do not depend on the chunking at all.

use crate::geometry::{voxels, Box3, Vec3};
use crate::gpu::labeling::{BlockComponents, NONE};
use crate::ops::union_find::UnionFind;
use crate::ops::watershed::Grid;

/// The cores of the chunks that tile a region.
#[derive(Clone, Copy, Debug)]
pub struct ChunkGrid {
    pub region: Vec3,
    pub chunk: Vec3,
}

impl ChunkGrid {
    pub fn counts(&self) -> Vec3 {
        [0, 1, 2].map(|a| self.region[a].div_ceil(self.chunk[a]))
    }

    pub fn len(&self) -> usize {
        voxels(self.counts())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn core(&self, c: usize) -> Box3 {
        let n = self.counts();
        let g = [c % n[0], (c / n[0]) % n[1], c / (n[0] * n[1])];
        let start = [0, 1, 2].map(|a| g[a] * self.chunk[a]);
        Box3::new(
            start,
            [0, 1, 2].map(|a| (start[a] + self.chunk[a]).min(self.region[a])),
        )
    }

    pub fn chunk_of(&self, p: Vec3) -> usize {
        let n = self.counts();
        let g = [0, 1, 2].map(|a| p[a] / self.chunk[a]);
        g[0] + n[0] * (g[1] + n[1] * g[2])
    }

    /// The core grown by `below` voxels toward 0 and `above` voxels away, within the region.
    pub fn grown(&self, core: Box3, below: usize, above: usize) -> Box3 {
        Box3::new(
            core.start.map(|v| v.saturating_sub(below)),
            [0, 1, 2].map(|a| (core.stop[a] + above).min(self.region[a])),
        )
    }
}

fn index_in(b: Box3, p: Vec3) -> usize {
    let s = b.shape();
    (p[0] - b.start[0]) + s[0] * ((p[1] - b.start[1]) + s[1] * (p[2] - b.start[2]))
}

/// The voxels of `outer` outside `inner` (a box inside it), in Fortran order, as runs along x
/// (`f(start, len)`): whole rows where y or z is outside `inner`, else the row's two ends.
pub fn for_each_shell_row(outer: Box3, inner: Box3, mut f: impl FnMut(Vec3, usize)) {
    for z in outer.start[2]..outer.stop[2] {
        for y in outer.start[1]..outer.stop[1] {
            let whole = (1..3).any(|a| {
                let v = [0, y, z][a];
                v < inner.start[a] || v >= inner.stop[a]
            });
            if whole {
                f([outer.start[0], y, z], outer.stop[0] - outer.start[0]);
                continue;
            }
            if inner.start[0] > outer.start[0] {
                f([outer.start[0], y, z], inner.start[0] - outer.start[0]);
            }
            if outer.stop[0] > inner.stop[0] {
                f([inner.stop[0], y, z], outer.stop[0] - inner.stop[0]);
            }
        }
    }
}

/// The union-find roots of the nodes of a box, in box coordinates: what [`ChunkLabels`] numbers.
pub trait BoxRoots {
    /// One past the largest root.
    fn root_bound(&self) -> usize;
    /// The root of the voxel at `p`, or [`NONE`] where no node is.
    fn root_at(&self, p: Vec3) -> u32;
    /// Appends the roots of the `len` voxels from `p` along x (rows are the hot path).
    fn row(&self, p: Vec3, len: usize, out: &mut Vec<u32>) {
        out.extend((p[0]..p[0] + len).map(|x| self.root_at([x, p[1], p[2]])));
    }
}

/// One root per voxel of the box, in Fortran order.
struct DenseRoots<'a> {
    roots: &'a [u32],
    grid: Grid,
}

impl BoxRoots for DenseRoots<'_> {
    fn root_bound(&self) -> usize {
        self.roots.len()
    }

    fn root_at(&self, p: Vec3) -> u32 {
        self.roots[self.grid.index(p)]
    }

    fn row(&self, p: Vec3, len: usize, out: &mut Vec<u32>) {
        let i = self.grid.index(p);
        out.extend_from_slice(&self.roots[i..i + len]);
    }
}

impl BoxRoots for BlockComponents {
    fn root_bound(&self) -> usize {
        BlockComponents::root_bound(self)
    }

    fn root_at(&self, p: Vec3) -> u32 {
        BlockComponents::root_at(self, p)
    }

    fn row(&self, p: Vec3, len: usize, out: &mut Vec<u32>) {
        self.roots_row(p, len, out)
    }
}

/// One chunk's labels: its core voxels numbered 1..=count by first voxel (0 = not a node), where
/// each label first occurs and how many voxels it has, and the halo voxels its components reach.
#[derive(Clone, Debug)]
pub struct ChunkLabels {
    pub core: Box3,
    pub labels: Vec<u32>,
    pub count: u32,
    /// Per label (index label - 1): the core index (Fortran order) of its first voxel. Core order
    /// and region order both sort by (z, y, x), so this is also the label's first voxel in the
    /// region.
    pub first: Vec<u32>,
    /// Per label (index label - 1): its voxels in the core.
    pub sizes: Vec<u64>,
    pub halo: Vec<(Vec3, u32)>,
}

impl ChunkLabels {
    /// From union-find roots of a box (region coordinates `boxed`) whose core is `core`.
    pub fn from_roots(roots: &[u32], boxed: Box3, core: Box3) -> ChunkLabels {
        let dense = DenseRoots {
            roots,
            grid: Grid {
                shape: boxed.shape(),
            },
        };
        Self::from_box_roots(&dense, boxed, core)
    }

    /// Row (y, z) of `part` (inside this chunk's core) through `nodes` (label l -> nodes[l - 1];
    /// 0 stays as `out` has it).
    fn row_into(&self, nodes: &[u32], part: Box3, y: usize, z: usize, out: &mut [u32]) {
        let from = index_in(self.core, [part.start[0], y, z]);
        let width = out.len();
        for (o, &l) in out.iter_mut().zip(&self.labels[from..from + width]) {
            if l != 0 {
                *o = nodes[l as usize - 1];
            }
        }
    }

    /// From a box's roots (region coordinates `boxed`): core voxels numbered by first voxel, and
    /// the halo voxels their components reach.
    pub fn from_box_roots(roots: &impl BoxRoots, boxed: Box3, core: Box3) -> ChunkLabels {
        // Root -> local label (0: not seen in the core yet).
        let mut local = vec![0u32; roots.root_bound()];
        let mut count = 0u32;
        let (mut first, mut sizes) = (Vec::new(), Vec::new());
        let mut labels = Vec::with_capacity(voxels(core.shape()));
        let in_box = |p: Vec3| [0, 1, 2].map(|a| p[a] - boxed.start[a]);
        let width = core.shape()[0];
        let mut row = Vec::with_capacity(width);
        for z in core.start[2]..core.stop[2] {
            for y in core.start[1]..core.stop[1] {
                row.clear();
                roots.row(in_box([core.start[0], y, z]), width, &mut row);
                // Neighbouring voxels nearly always share a root: one lookup per run.
                let mut i = 0;
                while i < row.len() {
                    let r = row[i];
                    let run = row[i..].iter().take_while(|&&v| v == r).count();
                    let label = if r == NONE {
                        0
                    } else {
                        let slot = &mut local[r as usize];
                        if *slot == 0 {
                            count += 1;
                            *slot = count;
                            first.push(labels.len() as u32);
                            sizes.push(0);
                        }
                        sizes[*slot as usize - 1] += run as u64;
                        *slot
                    };
                    labels.extend(std::iter::repeat_n(label, run));
                    i += run;
                }
            }
        }
        let ring = Box3::new(
            [0, 1, 2].map(|a| core.start[a].saturating_sub(1).max(boxed.start[a])),
            [0, 1, 2].map(|a| (core.stop[a] + 1).min(boxed.stop[a])),
        );
        let mut halo = Vec::new();
        for_each_shell_row(ring, core, |start, len| {
            row.clear();
            roots.row(in_box(start), len, &mut row);
            for (dx, &r) in row.iter().enumerate() {
                if r != NONE && local[r as usize] != 0 {
                    halo.push(([start[0] + dx, start[1], start[2]], local[r as usize]));
                }
            }
        });
        ChunkLabels {
            core,
            labels,
            count,
            first,
            sizes,
            halo,
        }
    }

    pub fn label_at(&self, p: Vec3) -> u32 {
        self.labels[index_in(self.core, p)]
    }
}

/// All chunks of a region and the union-find that joins their components.
pub struct Stitcher {
    pub grid: ChunkGrid,
    chunks: Vec<Option<ChunkLabels>>,
    offsets: Vec<u32>,
    sets: Option<UnionFind>,
}

/// The final numbering: per union-find node its label (1..=count), and per label (index 0 for
/// none) its size and its first voxel (index in region order).
pub struct Numbering {
    pub label_of_node: Vec<u32>,
    pub sizes: Vec<u64>,
    pub first: Vec<u64>,
}

impl Stitcher {
    pub fn new(grid: ChunkGrid) -> Stitcher {
        Stitcher {
            grid,
            chunks: vec![None; grid.len()],
            offsets: Vec::new(),
            sets: None,
        }
    }

    pub fn insert(&mut self, c: usize, labels: ChunkLabels) {
        self.chunks[c] = Some(labels);
    }

    fn chunk(&self, c: usize) -> &ChunkLabels {
        self.chunks[c]
            .as_ref()
            .expect("every chunk is labelled before stitching")
    }

    /// The union-find node of the voxel at `p`, if it is one.
    pub fn node(&self, p: Vec3) -> Option<u32> {
        let c = self.grid.chunk_of(p);
        match self.chunk(c).label_at(p) {
            0 => None,
            l => Some(self.offsets[c] + l - 1),
        }
    }

    /// Joins each chunk's halo voxels to their own chunks' components. Chunks may be missing (a
    /// block of a staged run holds only its own): halo voxels in a missing chunk are returned,
    /// with the node they join, for a later stage to glue.
    pub fn glue(&mut self) -> Vec<(Vec3, u32)> {
        let mut total = 0u32;
        self.offsets = self
            .chunks
            .iter()
            .map(|c| {
                let o = total;
                total += c.as_ref().map_or(0, |c| c.count);
                o
            })
            .collect();
        let mut sets = UnionFind::new(total as usize);
        let mut outside = Vec::new();
        for (c, chunk) in self.chunks.iter().enumerate() {
            let Some(chunk) = chunk else { continue };
            for &(p, id) in &chunk.halo {
                let node = self.offsets[c] + id - 1;
                if self.chunks[self.grid.chunk_of(p)].is_none() {
                    outside.push((p, node));
                    continue;
                }
                let there = self
                    .node(p)
                    .expect("a halo node is a node in its own chunk as well");
                sets.union(node, there);
            }
        }
        self.sets = Some(sets);
        outside
    }

    /// Joins the components of two voxels (edges decided outside the chunks).
    pub fn join(&mut self, a: Vec3, b: Vec3) {
        let (na, nb) = (self.node(a), self.node(b));
        if let (Some(na), Some(nb)) = (na, nb) {
            self.sets.as_mut().expect("glue first").union(na, nb);
        }
    }

    /// Numbers the components 1..N by first voxel in region order, with their sizes: from each
    /// chunk's labels' first voxels and sizes, without visiting the voxels.
    pub fn number(&mut self) -> Numbering {
        let sets = self.sets.as_mut().expect("glue first");
        let nodes = sets.len();
        let region = self.grid.region;
        let mut first = vec![u64::MAX; nodes];
        let mut size = vec![0u64; nodes];
        for (c, chunk) in self.chunks.iter().enumerate() {
            let Some(chunk) = chunk else { continue };
            let core = Grid {
                shape: chunk.core.shape(),
            };
            for (l, (&at, &n)) in chunk.first.iter().zip(&chunk.sizes).enumerate() {
                let local = core.position(at as usize);
                let p = [0, 1, 2].map(|a| chunk.core.start[a] + local[a]);
                let g = (p[0] + region[0] * (p[1] + region[1] * p[2])) as u64;
                let root = sets.find(self.offsets[c] + l as u32) as usize;
                first[root] = first[root].min(g);
                size[root] += n;
            }
        }
        let mut roots: Vec<usize> = (0..nodes).filter(|&r| size[r] > 0).collect();
        roots.sort_unstable_by_key(|&r| first[r]);
        let mut label_of_root = vec![0u32; nodes];
        let mut sizes = vec![0u64];
        let mut firsts = vec![u64::MAX];
        for (i, &r) in roots.iter().enumerate() {
            label_of_root[r] = i as u32 + 1;
            sizes.push(size[r]);
            firsts.push(first[r]);
        }
        let label_of_node = (0..nodes as u32)
            .map(|n| label_of_root[sets.find(n) as usize])
            .collect();
        Numbering {
            label_of_node,
            sizes,
            first: firsts,
        }
    }

    /// The output labels: every node's label through `map` (node label -> output label), kept
    /// with the chunks so that output boxes can be filled from any thread.
    pub fn into_final(self, numbering: &Numbering, map: impl Fn(u32) -> u32) -> FinalLabels {
        let (chunks, offsets) = self
            .chunks
            .into_iter()
            .zip(self.offsets)
            .filter_map(|(c, o)| c.map(|c| (c, o)))
            .unzip();
        FinalLabels {
            chunks,
            offsets,
            label_of_node: numbering.label_of_node.iter().map(|&l| map(l)).collect(),
        }
    }
}

/// Output labels that the writer reads box by box (one output chunk at a time).
pub trait LabelBoxes: Send + Sync + 'static {
    /// The labels of a box of the region (0 where none), in Fortran order.
    fn labels_in(&self, b: Box3) -> Vec<u32>;
}

impl LabelBoxes for FinalLabels {
    fn labels_in(&self, b: Box3) -> Vec<u32> {
        FinalLabels::labels_in(self, b)
    }
}

/// The output labels of a run, box by box: each chunk's core labels and the output label of each
/// of their nodes.
pub struct FinalLabels {
    chunks: Vec<ChunkLabels>,
    offsets: Vec<u32>,
    label_of_node: Vec<u32>,
}

impl FinalLabels {
    /// The labels of a box of the region (0 where no node), row by row: every voxel of `b` lies
    /// in the core of exactly one chunk.
    pub fn labels_in(&self, b: Box3) -> Vec<u32> {
        let mut out = vec![0u32; voxels(b.shape())];
        for (chunk, &offset) in self.chunks.iter().zip(&self.offsets) {
            let part = chunk.core.intersect(&b);
            if part.is_empty() {
                continue;
            }
            let nodes = &self.label_of_node[offset as usize..];
            for z in part.start[2]..part.stop[2] {
                for y in part.start[1]..part.stop[1] {
                    let to = index_in(b, [part.start[0], y, z]);
                    let width = part.shape()[0];
                    chunk.row_into(nodes, part, y, z, &mut out[to..to + width]);
                }
            }
        }
        out
    }

    /// Calls `f(y, z, labels)` for every row of `b` (along x), in Fortran order, without
    /// holding the box's labels at once.
    pub fn for_each_row(&self, b: Box3, mut f: impl FnMut(usize, usize, &[u32])) {
        let mut row = vec![0u32; b.shape()[0]];
        let parts: Vec<(&ChunkLabels, &[u32], Box3)> = self
            .chunks
            .iter()
            .zip(&self.offsets)
            .map(|(c, &offset)| {
                (
                    c,
                    &self.label_of_node[offset as usize..],
                    c.core.intersect(&b),
                )
            })
            .filter(|(_, _, part)| !part.is_empty())
            .collect();
        for z in b.start[2]..b.stop[2] {
            for y in b.start[1]..b.stop[1] {
                row.fill(0);
                for (chunk, nodes, part) in &parts {
                    if !(part.start[1]..part.stop[1]).contains(&y)
                        || !(part.start[2]..part.stop[2]).contains(&z)
                    {
                        continue;
                    }
                    let to = part.start[0] - b.start[0];
                    chunk.row_into(nodes, *part, y, z, &mut row[to..to + part.shape()[0]]);
                }
                f(y, z, &row);
            }
        }
    }
}
