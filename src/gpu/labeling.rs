//! GPU labelling of one box of a volume: connected components, the watershed and the region
//! graph. Each function labels a box whose *core* is the part it owns; the voxels around the core
//! (the halo) are read for context, and the host stitches boxes together (src/task/stitch.rs).
//!
//! Labels come back as union-find roots: `NONE` for voxels that are not nodes, else the index
//! (in the box) of the smallest voxel of the component.

use crate::geometry::{voxels, Box3, Vec3};
use crate::gpu::context::{GpuContext, GpuError};
use crate::gpu::work::{size_class, Work};
use crate::ops::agglomerate::EdgeStats;
use crate::ops::connected_components::Connectivity;
use crate::ops::watershed::{Affinities, AffinityView, WatershedParams};
use bytemuck::{Pod, Zeroable};
use tracing::debug_span;

/// Not a node (background).
pub const NONE: u32 = u32::MAX;

/// The params block shared by the labelling shaders: box size, core, and scalars each shader
/// names for itself (three beside the vectors, four after them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct BoxParams {
    size: [u32; 3],
    word_a: u32,
    core_start: [u32; 3],
    word_b: u32,
    core_stop: [u32; 3],
    word_c: u32,
    tail: [u32; 4],
}

fn box_params(shape: Vec3, core: Box3, words: [u32; 3]) -> BoxParams {
    BoxParams {
        size: shape.map(|v| v as u32),
        word_a: words[0],
        core_start: core.start.map(|v| v as u32),
        word_b: words[1],
        core_stop: core.stop.map(|v| v as u32),
        word_c: words[2],
        tail: [0; 4],
    }
}

/// A box thresholded into one foreground mask per 2x2x2 block (bit x + 2y + 4z; voxels past an
/// odd edge are background): what connected components uploads, 1 byte per 8 voxels.
#[derive(Clone, Debug)]
pub struct BlockMasks {
    pub shape: Vec3,
    pub blocks: Vec3,
    /// Blocks per row of `masks`: `blocks[0]` rounded up to a multiple of 4, so that every row
    /// starts a new word of four masks (the padding is empty).
    pub pitch: usize,
    pub masks: Vec<u8>,
}

impl BlockMasks {
    /// Masks of the voxels (Fortran index) for which `foreground` holds.
    pub fn from_fn(shape: Vec3, foreground: impl Fn(usize) -> bool) -> BlockMasks {
        let blocks = shape.map(|v| v.div_ceil(2));
        let pitch = blocks[0].next_multiple_of(4);
        let mut masks = vec![0u8; pitch * blocks[1] * blocks[2]];
        let mut i = 0;
        let pairs = shape[0] / 2;
        for z in 0..shape[2] {
            for y in 0..shape[1] {
                let row = pitch * ((y >> 1) + blocks[1] * (z >> 1));
                let shift = (y & 1) << 1 | (z & 1) << 2;
                // Two voxels along x share a block: one update per block.
                for m in &mut masks[row..row + pairs] {
                    let bits = foreground(i) as u8 | (foreground(i + 1) as u8) << 1;
                    *m |= bits << shift;
                    i += 2;
                }
                if shape[0] % 2 == 1 {
                    masks[row + pairs] |= (foreground(i) as u8) << shift;
                    i += 1;
                }
            }
        }
        BlockMasks {
            shape,
            blocks,
            pitch,
            masks,
        }
    }

    /// Masks of `values > threshold`.
    pub fn threshold(values: &[f32], shape: Vec3, threshold: f32) -> BlockMasks {
        assert_eq!(values.len(), voxels(shape));
        Self::from_fn(shape, |i| values[i] > threshold)
    }

    /// The index of the block that holds voxel `p`, and the voxel's bit in its mask.
    #[inline]
    fn block_of(&self, p: Vec3) -> (usize, usize) {
        let b = (p[0] >> 1) + self.pitch * ((p[1] >> 1) + self.blocks[1] * (p[2] >> 1));
        (b, (p[0] & 1) | (p[1] & 1) << 1 | (p[2] & 1) << 2)
    }
}

/// Connected components of one box as the GPU leaves them: per 2x2x2 block its foreground mask,
/// and the root of every node (a block under 26-connectivity, a piece of a block under 6 and 18).
#[derive(Clone, Debug)]
pub struct BlockComponents {
    masks: BlockMasks,
    /// Each voxel's piece per mask under 6 and 18 (3 bits per voxel); `None` under 26.
    pieces: Option<Vec<u32>>,
    roots: Vec<u32>,
}

impl BlockComponents {
    pub fn shape(&self) -> Vec3 {
        self.masks.shape
    }

    /// The root of the voxel at `p` (box coordinates), or [`NONE`] for background. Roots are
    /// node ids: equal roots, one component.
    #[inline]
    pub fn root_at(&self, p: Vec3) -> u32 {
        let (b, k) = self.masks.block_of(p);
        let mask = self.masks.masks[b];
        if mask & (1 << k) == 0 {
            return NONE;
        }
        match &self.pieces {
            None => self.roots[b],
            Some(pieces) => self.roots[b * 8 + ((pieces[mask as usize] >> (3 * k)) & 7) as usize],
        }
    }

    /// One past the largest root.
    pub fn root_bound(&self) -> usize {
        self.roots.len()
    }

    /// Appends the roots of the `len` voxels from `p` along x: [`Self::root_at`] without the
    /// per-voxel block arithmetic.
    pub fn roots_row(&self, p: Vec3, len: usize, out: &mut Vec<u32>) {
        let (row_start, bit_yz) = self.masks.block_of([0, p[1], p[2]]);
        let masks = &self.masks.masks[row_start..];
        let end = p[0] + len;
        match &self.pieces {
            // One node per block: each block's mask and root are read once for its two voxels.
            None => {
                let roots = &self.roots[row_start..];
                let voxel = |b: usize, bit: usize| {
                    if masks[b] & (1 << (bit_yz | bit)) == 0 {
                        NONE
                    } else {
                        roots[b]
                    }
                };
                let mut x = p[0];
                if x & 1 == 1 && x < end {
                    out.push(voxel(x >> 1, 1));
                    x += 1;
                }
                while x + 1 < end {
                    let b = x >> 1;
                    out.push(voxel(b, 0));
                    out.push(voxel(b, 1));
                    x += 2;
                }
                if x < end {
                    out.push(voxel(x >> 1, 0));
                }
            }
            Some(pieces) => {
                for x in p[0]..end {
                    let b = x >> 1;
                    let k = bit_yz | (x & 1);
                    let mask = masks[b];
                    out.push(if mask & (1 << k) == 0 {
                        NONE
                    } else {
                        let piece = (pieces[mask as usize] >> (3 * k)) & 7;
                        self.roots[(row_start + b) * 8 + piece as usize]
                    });
                }
            }
        }
    }

    /// The root of every voxel in Fortran order.
    pub fn roots(&self) -> Vec<u32> {
        let s = self.shape();
        let mut out = Vec::with_capacity(voxels(s));
        for z in 0..s[2] {
            for y in 0..s[1] {
                for x in 0..s[0] {
                    out.push(self.root_at([x, y, z]));
                }
            }
        }
        out
    }
}

/// The position of voxel `k` (0..8) in a 2x2x2 block.
fn block_voxel(k: usize) -> [i64; 3] {
    [(k & 1) as i64, ((k >> 1) & 1) as i64, (k >> 2) as i64]
}

/// The tables `connected_components.wgsl` reads for a connectivity: each mask's pieces, and
/// which voxels of two neighbouring blocks touch (see the shader for the layout).
fn block_tables(connectivity: Connectivity) -> Vec<u32> {
    let touch = |a: [i64; 3], b: [i64; 3]| {
        let d = [0, 1, 2].map(|i| (a[i] - b[i]).abs());
        let axes = d.iter().filter(|&&v| v != 0).count();
        d.iter().all(|&v| v <= 1) && axes >= 1 && axes <= connectivity.max_axes()
    };
    let mut tables = Vec::with_capacity(256 + 13 * 9);
    for mask in 0..256u32 {
        let mut piece: [usize; 8] = std::array::from_fn(|k| k);
        // Relax to the smallest touching member until nothing changes (8 voxels: a few rounds).
        let mut changed = true;
        while changed {
            changed = false;
            for a in 0..8 {
                for b in 0..8 {
                    let both = mask & (1 << a) != 0 && mask & (1 << b) != 0;
                    if both && touch(block_voxel(a), block_voxel(b)) && piece[b] < piece[a] {
                        piece[a] = piece[b];
                        changed = true;
                    }
                }
            }
        }
        tables.push((0..8).fold(0, |acc, k| acc | (piece[k] as u32) << (3 * k)));
    }
    let mut adjacent = Vec::with_capacity(13 * 8);
    for o in Connectivity::TwentySix.backward_offsets() {
        let (mut near, mut far) = (0u32, 0u32);
        for u in 0..8 {
            let mut touching = 0u32;
            for v in 0..8 {
                let vb = block_voxel(v);
                if touch(block_voxel(u), [0, 1, 2].map(|i| 2 * o[i] + vb[i])) {
                    touching |= 1 << v;
                }
            }
            if touching != 0 {
                near |= 1 << u;
            }
            far |= touching;
            adjacent.push(touching);
        }
        tables.push(near | far << 8);
    }
    tables.extend(adjacent);
    tables
}

/// Every node's root from the parents the GPU leaves (0: a root, else the parent + 1). Parents
/// are smaller nodes, so one forward pass finds each root from its parent's, already found.
fn roots_of_parents(parents: &[u32]) -> Vec<u32> {
    let mut roots = Vec::with_capacity(parents.len());
    for (x, &p) in parents.iter().enumerate() {
        let root = if p == 0 {
            x as u32
        } else {
            roots[p as usize - 1]
        };
        roots.push(root);
    }
    roots
}

/// Connected components of a thresholded box, by block-based union-find (see
/// shaders/connected_components.wgsl). Every edge inside the box is used.
pub fn connected_components_box(
    ctx: &GpuContext,
    masks: BlockMasks,
    connectivity: Connectivity,
) -> Result<BlockComponents, GpuError> {
    let _span = debug_span!("gpu_connected_components", shape = ?masks.shape).entered();
    let block_count = masks.masks.len();
    let nodes_per_block = if connectivity == Connectivity::TwentySix {
        1
    } else {
        8
    };
    let tables = block_tables(connectivity);
    let mut work = Work::new(ctx, "connected components");
    // The shader's layout: nodes per block, then the block counts.
    let params = work.uniform(&BoxParams {
        word_a: nodes_per_block as u32,
        core_start: masks.blocks.map(|v| v as u32),
        word_b: masks.pitch as u32,
        ..Zeroable::zeroed()
    });
    let mut packed = masks.masks.clone();
    packed.resize(block_count.max(4), 0);
    let mask_buffer = work.upload("block masks", &packed)?;
    let parent = work.storage("labels", block_count * nodes_per_block)?;
    const S: &str = "connected_components";
    work.encoder.clear_buffer(&parent, 0, None);
    if nodes_per_block == 1 {
        let bindings = [(0, &params), (1, &parent), (2, &mask_buffer), (4, &parent)];
        work.dispatch(S, "merge", &bindings, block_count / 4)?;
    } else {
        let table_buffer = work.upload("tables", bytemuck::cast_slice(&tables))?;
        let bindings = [
            (0, &params),
            (1, &parent),
            (2, &mask_buffer),
            (3, &table_buffer),
        ];
        work.dispatch_box(S, "merge_pieces", &bindings, masks.blocks)?;
    }
    let parents = work.finish(&[&parent])?.remove(0);
    let roots = roots_of_parents(&parents);
    Ok(BlockComponents {
        masks,
        pieces: (nodes_per_block > 1).then(|| tables[..256].to_vec()),
        roots,
    })
}

/// What the watershed of one box leaves for the host.
#[derive(Clone, Debug)]
pub struct WatershedBox {
    /// The root of every voxel of the box (an index in the box; [`NONE`] for background). Halo
    /// voxels are roots of their own unless a saturated plateau joined them.
    pub roots: Vec<u32>,
    /// Core plateau voxels whose plateau leaves the core: their pointers are chosen on the host,
    /// over the whole plateau. Empty in a box that is the whole volume.
    pub deferred: Vec<DeferredVoxel>,
    /// Relaxation rounds run (the last batch of them changed nothing).
    pub rounds: u32,
    /// With [`WatershedOptions::region_graph`]: the core's region graph keyed by roots, computed
    /// in the same submission from the roots still on the GPU. A pair is (smaller, larger) of
    /// two box indices: a core voxel's root, or a halo voxel itself (its fragment is decided by
    /// its own chunk). Pairs whose ends turn out to be one fragment after stitching, and pairs
    /// that name one fragment twice, are the caller's to merge.
    pub region_graph: Vec<RegionEdge>,
}

/// A plateau voxel of the core whose pointer the host chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeferredVoxel {
    /// Index in the box.
    pub index: u32,
    /// Bidirectional candidate directions (waterz order).
    pub bidirectional: u8,
    /// Which of those lead to an exit.
    pub to_exit: u8,
}

/// Relaxation dispatches recorded between two checks for convergence, at most: the first check
/// comes after one round, and the gap doubles up to this (most plateaus are a few voxels and
/// settle at once; a long one takes as many rounds as its length).
const RELAX_PER_CHECK: usize = 8;

/// The watershed of one box (see src/ops/watershed.rs for the rules and shaders/watershed.wgsl
/// for the passes). `aff` covers the box; its core must keep 3 voxels of margin to the box
/// wherever the box does not end at the volume. With `region_graph`, the core's region graph is
/// accumulated from the GPU-resident roots before anything is read back.
pub fn watershed_box(
    ctx: &GpuContext,
    aff: AffinityView,
    core: Box3,
    params: WatershedParams,
    region_graph: bool,
) -> Result<WatershedBox, GpuError> {
    let shape = aff.shape;
    let _span = debug_span!("gpu_watershed", ?shape).entered();
    let n = voxels(shape);
    let mut work = Work::new(ctx, "the watershed");
    let mut block = box_params(
        shape,
        core,
        [n as u32, params.low.to_bits(), params.high.to_bits()],
    );
    let uniform = work.uniform(&block);
    let ax = work.upload("affinities", bytemuck::cast_slice(aff.channels[0]))?;
    let ay = work.upload("affinities", bytemuck::cast_slice(aff.channels[1]))?;
    let az = work.upload("affinities", bytemuck::cast_slice(aff.channels[2]))?;
    // Candidate bits first, each voxel's key (root + 1) at the end.
    let keys = work.storage("candidates", n)?;
    let info = work.storage("voxel info", n)?;
    let relax = work.storage("plateau distances", 2 * n)?;
    // Words 0, 1 and 3 (one cache line), the plateau counter at word 16 (its own).
    let flags = work.storage("flags", 17)?;
    let plateau_list = work.storage("plateau voxels", n)?;
    let pointers = work.storage("pointers", n)?;
    const S: &str = "watershed";
    let affinities = [(0, &uniform), (2, &ax), (3, &ay), (4, &az), (5, &keys)];
    work.dispatch_box(S, "edges", &affinities, shape)?;
    work.dispatch_box(
        S,
        "exits",
        &[
            (0, &uniform),
            (5, &keys),
            (6, &info),
            (7, &relax),
            (8, &flags),
            (9, &plateau_list),
            (10, &pointers),
        ],
        shape,
    )?;
    let counts = work.finish(&[&flags])?.remove(0);
    let (plateau_voxels, saturated) = (counts[16] as usize, counts[3]);
    block.tail[0] = plateau_voxels as u32;
    let uniform = work.uniform(&block);
    let plateau = [
        (0, &uniform),
        (6, &info),
        (7, &relax),
        (8, &flags),
        (9, &plateau_list),
    ];
    let (mut rounds, mut batch) = (0, 1);
    let mut converged = plateau_voxels == 0;
    while !converged {
        work.encoder.clear_buffer(&flags, 0, Some(4));
        for _ in 0..batch {
            work.dispatch(S, "relax", &plateau, plateau_voxels)?;
        }
        rounds += batch as u32;
        batch = (2 * batch).min(RELAX_PER_CHECK);
        converged = work.finish(&[&flags])?[0][0] == 0;
    }
    // Two words per tainted plateau voxel, at most every plateau voxel.
    let list_words = size_class(8 * plateau_voxels as u64) / 4;
    let deferred_list = work.scratch("deferred plateau voxels", list_words as usize)?;
    if plateau_voxels > 0 {
        let bindings: Vec<_> = plateau
            .iter()
            .copied()
            .chain([(1, &pointers), (11, &deferred_list)])
            .collect();
        work.dispatch(S, "point", &bindings, plateau_voxels)?;
    }
    if saturated > 0 {
        let bindings = [(0, &uniform), (1, &pointers), (6, &info)];
        work.dispatch_box(S, "unite_saturated", &bindings, core.shape())?;
    }
    work.dispatch_box(
        S,
        "descend",
        &[(0, &uniform), (5, &keys), (10, &pointers)],
        shape,
    )?;
    let edges = if region_graph {
        let inputs = RegionGraphInputs {
            labels: &keys,
            affinities: [&ax, &ay, &az],
            shape,
            core,
        };
        accumulate_region_graph(&mut work, &inputs)?
            .into_iter()
            .map(|((a, b), stats)| ((a - 1, b - 1), stats))
            .collect()
    } else {
        Vec::new()
    };
    let mut out = work.finish(&[&keys, &flags])?;
    let deferred_count = out[1][1];
    let mut roots = out.swap_remove(0);
    for r in &mut roots {
        *r = r.wrapping_sub(1);
    }
    let deferred = if deferred_count == 0 {
        Vec::new()
    } else {
        let bytes = deferred_count as u64 * 8;
        deferred_voxels(&work.finish_prefixes(&[(&deferred_list, bytes)])?[0])
    };
    Ok(WatershedBox {
        roots,
        deferred,
        rounds,
        region_graph: edges,
    })
}

/// The tainted plateau voxels of the core, with what the host needs to finish their plateaus,
/// from the list `point` wrote (index, then bidirectional | to-exit << 8), in index order.
fn deferred_voxels(list: &[u32]) -> Vec<DeferredVoxel> {
    let mut out: Vec<DeferredVoxel> = list
        .chunks_exact(2)
        .map(|w| DeferredVoxel {
            index: w[0],
            bidirectional: w[1] as u8,
            to_exit: (w[1] >> 8) as u8,
        })
        .collect();
    out.sort_unstable_by_key(|v| v.index);
    out
}

/// A fragment pair (low id, high id) and its edge statistics.
pub type RegionEdge = ((u32, u32), EdgeStats);

/// u32 words per pair of a region-graph table: low id + 1, high id, count, 64-bit sum. A table
/// keeps the first four in a 16-byte slot and the sums' high words after all the slots;
/// `compact` packs the five together.
const SLOT_WORDS: u64 = 5;
/// The word of the region-graph flags that counts packed slots (`PACKED` in the shader).
const PACKED_WORD: usize = 2;
/// Table slots per invocation of `compact` (`RUN` in the shader).
const COMPACT_RUN: u64 = 16;

/// The region graph of the core of a box of fragments (0 = background): every edge between a
/// core voxel and its -x, -y, -z neighbour (core or halo) joining two different fragments.
pub fn region_graph_box(
    ctx: &GpuContext,
    fragments: &[u32],
    aff: &Affinities,
    core: Box3,
) -> Result<Vec<RegionEdge>, GpuError> {
    let shape = aff.shape;
    let _span = debug_span!("gpu_region_graph", ?shape).entered();
    let n = voxels(shape);
    assert_eq!(fragments.len(), n);
    let mut work = Work::new(ctx, "the region graph");
    let frags = work.upload("fragments", bytemuck::cast_slice(fragments))?;
    let ax = work.upload("affinities", bytemuck::cast_slice(&aff.channels[0]))?;
    let ay = work.upload("affinities", bytemuck::cast_slice(&aff.channels[1]))?;
    let az = work.upload("affinities", bytemuck::cast_slice(&aff.channels[2]))?;
    let inputs = RegionGraphInputs {
        labels: &frags,
        affinities: [&ax, &ay, &az],
        shape,
        core,
    };
    accumulate_region_graph(&mut work, &inputs)
}

/// What the region-graph kernels read: per-voxel labels of a box (0 = background) and its
/// affinities, already on the GPU.
struct RegionGraphInputs<'a> {
    labels: &'a wgpu::Buffer,
    affinities: [&'a wgpu::Buffer; 3],
    shape: Vec3,
    core: Box3,
}

/// Counts the core's voxel edges between different labels, sizes the hash table from that count
/// (at most 3/4 full), and accumulates the pairs into it, split into as many key-space
/// partitions as it takes for one table to fit a binding of this adapter. So the pass holds any
/// number of pairs a box can have, on any adapter.
fn accumulate_region_graph(
    work: &mut Work,
    inputs: &RegionGraphInputs,
) -> Result<Vec<RegionEdge>, GpuError> {
    let core_voxels = voxels(inputs.core.shape()) as u64;
    // Overflow, voxel edges counted, slots packed.
    let flags = work.storage("flags", 3)?;
    // Power-of-two slots, at most one binding; a table counts as overflowed past 3/4 full.
    let max_slots = prev_power_of_two(work.ctx.max_binding_bytes() / (SLOT_WORDS * 4));
    let slots_for = |pairs: u64| {
        (pairs * 4)
            .div_ceil(3)
            .next_power_of_two()
            .max(1024)
            .min(max_slots)
    };
    // First a guess from the boxes before, in one partition: the boxes of a volume hold about
    // as many pairs per voxel as each other, which sizes a table a few times smaller than the
    // bound below and saves its counting pass. A box that holds more overflows its table and
    // takes the counted way; the result is the same either way.
    if let Some(expected) = work.ctx.pair_density.expected_pairs(core_voxels) {
        let capacity = slots_for(expected);
        if capacity < max_slots {
            if let Some(edges) = accumulate_in_parts(work, inputs, &flags, capacity, 1)? {
                work.ctx.pair_density.observe(edges.len(), core_voxels);
                return Ok(edges);
            }
        }
    }
    let uniform = work.uniform(&region_graph_params(inputs, 1, 1, 0));
    work.encoder.clear_buffer(&flags, 0, None);
    work.dispatch_box(
        "region_graph",
        "count",
        &[(0, &uniform), (1, inputs.labels), (6, &flags)],
        inputs.core.shape(),
    )?;
    let voxel_edges = work.finish(&[&flags])?[0][1] as u64;
    if voxel_edges == 0 {
        return Ok(Vec::new());
    }
    // Every voxel edge could be a pair of its own, but pairs usually share many voxel edges:
    // start with one partition as large as a binding allows and split only on overflow.
    let mut parts = 1u64;
    loop {
        let capacity = slots_for(voxel_edges.div_ceil(parts));
        if let Some(edges) = accumulate_in_parts(work, inputs, &flags, capacity, parts)? {
            work.ctx.pair_density.observe(edges.len(), core_voxels);
            return Ok(edges);
        }
        // A partition held more pairs than its table: split the key space further.
        if parts >= voxel_edges {
            return Err(GpuError::TooLarge {
                what: format!("the region graph of a {:?} box", inputs.shape),
                needed: voxel_edges * 2 * SLOT_WORDS * 4,
                limit: work.ctx.max_binding_bytes(),
            });
        }
        parts *= 2;
    }
}

fn region_graph_params(
    inputs: &RegionGraphInputs,
    capacity: u64,
    parts: u64,
    part: u64,
) -> BoxParams {
    let n = voxels(inputs.shape);
    let mut p = box_params(
        inputs.shape,
        inputs.core,
        [n as u32, capacity as u32, parts as u32],
    );
    p.tail[0] = part as u32;
    p
}

/// Accumulates the pairs into tables of `capacity` slots, one key-space partition of `parts` at
/// a time, and brings back the filled slots; `None` when a partition overflowed its table.
fn accumulate_in_parts(
    work: &mut Work,
    inputs: &RegionGraphInputs,
    flags: &wgpu::Buffer,
    capacity: u64,
    parts: u64,
) -> Result<Option<Vec<RegionEdge>>, GpuError> {
    const S: &str = "region_graph";
    let [ax, ay, az] = inputs.affinities;
    let table = work.storage("region graph table", (capacity * SLOT_WORDS) as usize)?;
    // A table holds at most 3/4 of its capacity before it counts as overflowed.
    let most = (capacity - capacity / 4 + 1) * SLOT_WORDS;
    let compacted = work.scratch("region graph pairs", most as usize)?;
    let mut edges = Vec::new();
    for part in 0..parts {
        let uniform = work.uniform(&region_graph_params(inputs, capacity, parts, part));
        // A new table comes cleared; later partitions reuse it.
        if part > 0 {
            work.encoder.clear_buffer(&table, 0, None);
        }
        work.encoder.clear_buffer(flags, 0, None);
        let bound = [
            (0, &uniform),
            (1, inputs.labels),
            (2, ax),
            (3, ay),
            (4, az),
            (5, &table),
            (6, flags),
            (8, &table),
        ];
        let entry = if parts > 1 {
            "accumulate_partition"
        } else {
            "accumulate"
        };
        work.dispatch_box(S, entry, &bound, inputs.core.shape())?;
        let packing = [(0, &uniform), (5, &table), (6, flags), (7, &compacted)];
        let runs = capacity.div_ceil(COMPACT_RUN) as usize;
        work.dispatch(S, "compact", &packing, runs)?;
        let flags_now = work.finish(&[flags])?.remove(0);
        // A pair that found no slot, or a table fuller than the probes were sized for.
        let filled = flags_now[PACKED_WORD] as u64;
        if flags_now[0] != 0 || filled > capacity - capacity / 4 {
            return Ok(None);
        }
        // Only the packed slots come back.
        let packed = filled * SLOT_WORDS * 4;
        let out = work.finish_prefixes(&[(&compacted, packed.max(4))])?;
        edges.extend(table_edges(&out[0][..(packed / 4) as usize]));
    }
    Ok(Some(edges))
}

/// Region-graph pairs per core voxel of the last box a context accumulated (in 2^-20 units;
/// 0: none yet): how large a table the next box is first given.
#[derive(Default)]
pub(crate) struct PairDensity(std::sync::atomic::AtomicU64);

impl PairDensity {
    /// The pairs a box of `voxels` core voxels is expected to hold, with a quarter to spare.
    fn expected_pairs(&self, voxels: u64) -> Option<u64> {
        let density = self.0.load(std::sync::atomic::Ordering::Relaxed);
        (density > 0).then(|| ((density * voxels) >> 20) * 5 / 4 + 1)
    }

    fn observe(&self, pairs: usize, voxels: u64) {
        if let Some(density) = ((pairs as u64) << 20).checked_div(voxels) {
            self.0.store(density, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The filled slots of a region-graph table.
fn table_edges(table: &[u32]) -> impl Iterator<Item = RegionEdge> + '_ {
    table
        .chunks_exact(SLOT_WORDS as usize)
        .filter(|s| s[0] != 0)
        .map(|s| {
            (
                (s[0] - 1, s[1]),
                EdgeStats {
                    count: s[2] as u64,
                    sum: s[3] as u64 | (s[4] as u64) << 32,
                },
            )
        })
}

fn prev_power_of_two(v: u64) -> u64 {
    if v == 0 {
        0
    } else {
        1 << (63 - v.leading_zeros())
    }
}
