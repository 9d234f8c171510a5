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
use crate::gpu::labeling::NONE;
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

fn positions(b: Box3) -> impl Iterator<Item = Vec3> {
    (b.start[2]..b.stop[2]).flat_map(move |z| {
        (b.start[1]..b.stop[1]).flat_map(move |y| (b.start[0]..b.stop[0]).map(move |x| [x, y, z]))
    })
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
        let grid = Grid {
            shape: boxed.shape(),
        };
        Self::from_root_fn(|p| roots[grid.index(p)], roots.len(), boxed, core)
    }

    /// From a box's roots given by `root_at` (box coordinates; [`NONE`] where no node; every
    /// other root below `root_bound`): core voxels numbered by first voxel, and the halo voxels
    /// their components reach.
    pub fn from_root_fn(
        root_at: impl Fn(Vec3) -> u32,
        root_bound: usize,
        boxed: Box3,
        core: Box3,
    ) -> ChunkLabels {
        // Root -> local label (0: not seen in the core yet).
        let mut local = vec![0u32; root_bound];
        let mut count = 0u32;
        let (mut first, mut sizes) = (Vec::new(), Vec::new());
        let mut labels = Vec::with_capacity(voxels(core.shape()));
        let at = |p: Vec3| root_at([0, 1, 2].map(|a| p[a] - boxed.start[a]));
        // Neighbouring voxels nearly always share a root: the last lookup is kept.
        let (mut last_root, mut last_label) = (NONE, 0u32);
        for z in core.start[2]..core.stop[2] {
            for y in core.start[1]..core.stop[1] {
                for x in core.start[0]..core.stop[0] {
                    let r = at([x, y, z]);
                    if r != last_root {
                        last_root = r;
                        last_label = if r == NONE {
                            0
                        } else {
                            let slot = &mut local[r as usize];
                            if *slot == 0 {
                                count += 1;
                                *slot = count;
                                first.push(labels.len() as u32);
                                sizes.push(0);
                            }
                            *slot
                        };
                    }
                    if last_label != 0 {
                        sizes[last_label as usize - 1] += 1;
                    }
                    labels.push(last_label);
                }
            }
        }
        let ring = Box3::new(
            [0, 1, 2].map(|a| core.start[a].saturating_sub(1).max(boxed.start[a])),
            [0, 1, 2].map(|a| (core.stop[a] + 1).min(boxed.stop[a])),
        );
        let halo = positions(ring)
            .filter(|p| (0..3).any(|a| p[a] < core.start[a] || p[a] >= core.stop[a]))
            .filter_map(|p| match at(p) {
                NONE => None,
                r => match local[r as usize] {
                    0 => None,
                    id => Some((p, id)),
                },
            })
            .collect();
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

/// The final numbering: per union-find node its label (1..=count), and each label's size.
pub struct Numbering {
    pub label_of_node: Vec<u32>,
    pub sizes: Vec<u64>,
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

    /// Joins each chunk's halo voxels to their own chunks' components.
    pub fn glue(&mut self) {
        let mut total = 0u32;
        self.offsets = (0..self.chunks.len())
            .map(|c| {
                let o = total;
                total += self.chunk(c).count;
                o
            })
            .collect();
        let mut sets = UnionFind::new(total as usize);
        for c in 0..self.chunks.len() {
            for &(p, id) in &self.chunk(c).halo {
                let there = self
                    .node(p)
                    .expect("a halo node is a node in its own chunk as well");
                sets.union(self.offsets[c] + id - 1, there);
            }
        }
        self.sets = Some(sets);
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
            let chunk = chunk.as_ref().expect("labelled");
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
        for (i, &r) in roots.iter().enumerate() {
            label_of_root[r] = i as u32 + 1;
            sizes.push(size[r]);
        }
        let label_of_node = (0..nodes as u32)
            .map(|n| label_of_root[sets.find(n) as usize])
            .collect();
        Numbering {
            label_of_node,
            sizes,
        }
    }

    /// The final labels of a box of the region (0 where no node), through `map` (node label ->
    /// output label).
    pub fn labels_in(&self, b: Box3, numbering: &Numbering, map: impl Fn(u32) -> u32) -> Vec<u32> {
        let mut out = vec![0u32; voxels(b.shape())];
        // Copy chunk by chunk: every voxel of `b` lies in the core of exactly one chunk.
        for c in 0..self.chunks.len() {
            let chunk = self.chunk(c);
            let part = chunk.core.intersect(&b);
            if part.is_empty() {
                continue;
            }
            for p in positions(part) {
                let l = chunk.labels[index_in(chunk.core, p)];
                if l != 0 {
                    out[index_in(b, p)] =
                        map(numbering.label_of_node[(self.offsets[c] + l - 1) as usize]);
                }
            }
        }
        out
    }
}
