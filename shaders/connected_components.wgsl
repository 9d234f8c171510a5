// Thresholded connected components of one box by block-based union-find, after Allegretti et
// al.'s BUF: each invocation owns a 2x2x2 block of voxels.
//
// The host thresholds the voxels into one 8-bit mask per block (bit x + 2y + 4z), four to a word.
// Under 26-connectivity a block's voxels always touch each other, so a block is one node and
// `parent` has one entry per block. Under 6 and 18 a block holds up to 4 separate pieces (the
// host's table gives each voxel's piece as its smallest touching voxel) and a node is (block,
// piece), 8 entries per block.
//
// `merge` (and `merge_rest`) unite each block with its 13 earlier neighbour blocks where a voxel
// of one touches a voxel of the other; `flatten` points every node at its root. Every edge inside
// the box is a true edge of the volume, so the box needs no core rule: chunks are stitched on the
// host through the voxels around the core.
//
// `parent` starts zeroed: 0 marks a root, any other value is the parent node + 1, so a zeroed
// buffer is the initial forest and no pass sets it. Parents always point to smaller nodes, so no
// link can close a cycle.

struct Params {
    unused: vec3<u32>,
    // Nodes per block: 1 (26-connected) or 8.
    nodes_per_block: u32,
    blocks: vec3<u32>,
    pad: u32,
}

const GROUP: u32 = 64u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> parent: array<atomic<u32>>;
@group(0) @binding(2) var<storage, read> masks: array<u32>;
// [0, 256): each voxel's piece per mask (3 bits per voxel);
// [256, 269): per backward offset, bits 0..8 the block's voxels that touch the neighbour block
//             and bits 8..16 the neighbour's voxels that touch the block;
// [269, 373): per offset and voxel u of the block, the neighbour's voxels that touch u.
@group(0) @binding(3) var<storage, read> tables: array<u32>;
// Per block (26-connectivity): the backward neighbours it still has to unite with after `merge`
// (bit k for offset k); zeroed before `merge`.
@group(0) @binding(4) var<storage, read_write> rest: array<u32>;

const FACES: u32 = 256u;
const ADJACENT: u32 = 269u;

fn unite(a0: u32, b0: u32) {
    var a = find_halving(a0);
    var b = find_halving(b0);
    loop {
        if a == b {
            return;
        }
        let hi = max(a, b);
        let lo = min(a, b);
        let r = atomicCompareExchangeWeak(&parent[hi], 0u, lo + 1u);
        if r.exchanged {
            return;
        }
        // hi stopped being a root meanwhile (or the weak exchange failed): find again.
        a = find_halving(hi);
        b = find_halving(lo);
    }
}

fn block_index(b: vec3<u32>) -> u32 {
    return b.x + P.blocks.x * (b.y + P.blocks.y * b.z);
}

fn mask_of(block: u32) -> u32 {
    return (masks[block >> 2u] >> ((block & 3u) * 8u)) & 0xffu;
}

// The voxels of a block on its side toward offset d along one axis (bits x + 2y + 4z): all 8
// for d = 0, else the half at 0 (d < 0) or at 1 (d > 0).
fn side(d: i32, low: u32) -> u32 {
    return select(select(low ^ 0xffu, low, d < 0), 0xffu, d == 0);
}

// A block's voxels that touch the block at offset d, under 26-connectivity.
fn facing(d: vec3<i32>) -> u32 {
    return side(d.x, 0x55u) & side(d.y, 0x33u) & side(d.z, 0x0fu);
}

// Under 26-connectivity, whether foreground voxels of blocks with masks a and b touch, b at
// offset d from a (adjacent blocks: every voxel on one's facing side touches every voxel on the
// other's).
fn touching(a: u32, b: u32, d: vec3<i32>) -> bool {
    return ((a & facing(d)) != 0u) & ((b & facing(-d)) != 0u);
}

// The k-th backward offset in block units: (x, y) over -1..1 at z = -1 (k < 9), then
// (-1,-1), (0,-1), (1,-1), (-1,0) at z = 0.
fn backward_offset(k: u32) -> vec3<i32> {
    if k < 9u {
        return vec3<i32>(i32(k % 3u) - 1, i32(k / 3u) - 1, -1);
    }
    if k < 12u {
        return vec3<i32>(i32(k - 9u) - 1, -1, 0);
    }
    return vec3<i32>(-1, 0, 0);
}

// The block at q, or 0xffffffff outside the box.
fn block_at(q: vec3<i32>) -> u32 {
    if any(q < vec3<i32>(0)) || any(vec3<u32>(q) >= P.blocks) {
        return 0xffffffffu;
    }
    return block_index(vec3<u32>(q));
}

fn mask_at(block: u32) -> u32 {
    if block == 0xffffffffu {
        return 0u;
    }
    return mask_of(block);
}

// The mask of the block at offset d (0 outside the box); `interior`: no backward neighbour is
// outside, so no bounds check is needed.
fn neighbour_mask(block: u32, here: vec3<i32>, d: vec3<i32>, interior: bool) -> u32 {
    if interior {
        let delta = d.x + i32(P.blocks.x) * (d.y + i32(P.blocks.y) * d.z);
        return mask_of(u32(i32(block) + delta));
    }
    return mask_at(block_at(here + d));
}

@compute @workgroup_size(16, 16, 1)
fn merge(@builtin(global_invocation_id) b: vec3<u32>) {
    if any(b >= P.blocks) {
        return;
    }
    let block = block_index(b);
    let mask = mask_of(block);
    if mask == 0u {
        return;
    }
    let here = vec3<i32>(b);
    if P.nodes_per_block != 1u {
        for (var k = 0u; k < 13u; k++) {
            merge_pieces(block, mask, here, k);
        }
        return;
    }
    // 26-connectivity. Two neighbour blocks that touch are joined by the later one's own
    // invocation, so this block needs no link to a neighbour k that touches a neighbour j it is
    // joined with already. Every neighbour this block touches ends up joined to it, so k is
    // covered when one of the three face neighbours (offsets 4, 10, 12: z, y, x), earlier in the
    // order 4, 10, 12, then the rest, touches both this block and k. Inside an object that
    // leaves one link per block; on EM-like data 1.09 per foreground block. The tests are
    // written out (m_k: neighbour masks, t_k: touches this block; offsets literal, so face masks
    // are constants) and need no branch. The first link is made here with a plain store: in this
    // pass only a block's own invocation writes its parent. The others are left to
    // `merge_rest`'s unions.
    let interior = all(b > vec3<u32>(0u)) && all(b.xy + 1u < P.blocks.xy);
    let m0 = neighbour_mask(block, here, vec3<i32>(-1, -1, -1), interior);
    let m1 = neighbour_mask(block, here, vec3<i32>(0, -1, -1), interior);
    let m2 = neighbour_mask(block, here, vec3<i32>(1, -1, -1), interior);
    let m3 = neighbour_mask(block, here, vec3<i32>(-1, 0, -1), interior);
    let m4 = neighbour_mask(block, here, vec3<i32>(0, 0, -1), interior);
    let m5 = neighbour_mask(block, here, vec3<i32>(1, 0, -1), interior);
    let m6 = neighbour_mask(block, here, vec3<i32>(-1, 1, -1), interior);
    let m7 = neighbour_mask(block, here, vec3<i32>(0, 1, -1), interior);
    let m8 = neighbour_mask(block, here, vec3<i32>(1, 1, -1), interior);
    let m9 = neighbour_mask(block, here, vec3<i32>(-1, -1, 0), interior);
    let m10 = neighbour_mask(block, here, vec3<i32>(0, -1, 0), interior);
    let m11 = neighbour_mask(block, here, vec3<i32>(1, -1, 0), interior);
    let m12 = neighbour_mask(block, here, vec3<i32>(-1, 0, 0), interior);
    let t0 = touching(mask, m0, vec3<i32>(-1, -1, -1));
    let t1 = touching(mask, m1, vec3<i32>(0, -1, -1));
    let t2 = touching(mask, m2, vec3<i32>(1, -1, -1));
    let t3 = touching(mask, m3, vec3<i32>(-1, 0, -1));
    let t4 = touching(mask, m4, vec3<i32>(0, 0, -1));
    let t5 = touching(mask, m5, vec3<i32>(1, 0, -1));
    let t6 = touching(mask, m6, vec3<i32>(-1, 1, -1));
    let t7 = touching(mask, m7, vec3<i32>(0, 1, -1));
    let t8 = touching(mask, m8, vec3<i32>(1, 1, -1));
    let t9 = touching(mask, m9, vec3<i32>(-1, -1, 0));
    let t10 = touching(mask, m10, vec3<i32>(0, -1, 0));
    let t11 = touching(mask, m11, vec3<i32>(1, -1, 0));
    let t12 = touching(mask, m12, vec3<i32>(-1, 0, 0));
    var needed = 0u;
    needed |= select(0u, 16u, t4);
    needed |= select(0u, 1024u, t10 & !((t4 & touching(m4, m10, vec3<i32>(0, -1, 1)))));
    needed |= select(0u, 4096u, t12 & !((t4 & touching(m4, m12, vec3<i32>(-1, 0, 1))) | (t10 & touching(m10, m12, vec3<i32>(-1, 1, 0)))));
    needed |= select(0u, 2u, t1 & !((t4 & touching(m4, m1, vec3<i32>(0, -1, 0))) | (t10 & touching(m10, m1, vec3<i32>(0, 0, -1))) | (t12 & touching(m12, m1, vec3<i32>(1, -1, -1)))));
    needed |= select(0u, 8u, t3 & !((t4 & touching(m4, m3, vec3<i32>(-1, 0, 0))) | (t10 & touching(m10, m3, vec3<i32>(-1, 1, -1))) | (t12 & touching(m12, m3, vec3<i32>(0, 0, -1)))));
    needed |= select(0u, 32u, t5 & !((t4 & touching(m4, m5, vec3<i32>(1, 0, 0))) | (t10 & touching(m10, m5, vec3<i32>(1, 1, -1)))));
    needed |= select(0u, 128u, t7 & !((t4 & touching(m4, m7, vec3<i32>(0, 1, 0))) | (t12 & touching(m12, m7, vec3<i32>(1, 1, -1)))));
    needed |= select(0u, 512u, t9 & !((t4 & touching(m4, m9, vec3<i32>(-1, -1, 1))) | (t10 & touching(m10, m9, vec3<i32>(-1, 0, 0))) | (t12 & touching(m12, m9, vec3<i32>(0, -1, 0)))));
    needed |= select(0u, 2048u, t11 & !((t4 & touching(m4, m11, vec3<i32>(1, -1, 1))) | (t10 & touching(m10, m11, vec3<i32>(1, 0, 0)))));
    needed |= select(0u, 1u, t0 & !((t4 & touching(m4, m0, vec3<i32>(-1, -1, 0))) | (t10 & touching(m10, m0, vec3<i32>(-1, 0, -1))) | (t12 & touching(m12, m0, vec3<i32>(0, -1, -1)))));
    needed |= select(0u, 4u, t2 & !((t4 & touching(m4, m2, vec3<i32>(1, -1, 0))) | (t10 & touching(m10, m2, vec3<i32>(1, 0, -1)))));
    needed |= select(0u, 64u, t6 & !((t4 & touching(m4, m6, vec3<i32>(-1, 1, 0))) | (t12 & touching(m12, m6, vec3<i32>(0, 1, -1)))));
    needed |= select(0u, 256u, t8 & !((t4 & touching(m4, m8, vec3<i32>(1, 1, 0)))));
    if needed == 0u {
        return;
    }
    // Linked under the neighbour's parent or grandparent where they are set already (earlier
    // blocks mostly are): the same union, and chains stay short for the finds after.
    var link_to = block_at(here + backward_offset(firstTrailingBit(needed)));
    for (var hop = 0u; hop < 2u; hop++) {
        let p = atomicLoad(&parent[link_to]);
        link_to = select(link_to, p - 1u, p != 0u);
    }
    atomicStore(&parent[block], link_to + 1u);
    let others = needed & (needed - 1u);
    if others != 0u {
        rest[block] = others;
    }
}

// The unions `merge` left: at most a few per block, at the borders of objects.
@compute @workgroup_size(16, 16, 1)
fn merge_rest(@builtin(global_invocation_id) b: vec3<u32>) {
    if any(b >= P.blocks) {
        return;
    }
    let block = block_index(b);
    var needed = rest[block];
    let here = vec3<i32>(b);
    while needed != 0u {
        let k = firstTrailingBit(needed);
        needed &= needed - 1u;
        unite(block, block_at(here + backward_offset(k)));
    }
}

// The node of voxel k of a block with `mask`: the block itself, or (block, the voxel's piece).
fn node(block: u32, mask: u32, k: u32) -> u32 {
    return block * 8u + ((tables[mask] >> (3u * k)) & 7u);
}

// 6- and 18-connectivity: unites the pieces of this block with the pieces of the k-th backward
// neighbour block that touch them (per-voxel adjacency masks from the host's tables).
fn merge_pieces(block: u32, mask: u32, here: vec3<i32>, k: u32) {
    let face = tables[FACES + k];
    if (mask & face & 0xffu) == 0u {
        return;
    }
    let other = block_at(here + backward_offset(k));
    let other_mask = mask_at(other);
    if (other_mask & (face >> 8u) & 0xffu) == 0u {
        return;
    }
    var near = mask & face & 0xffu;
    while near != 0u {
        let u = firstTrailingBit(near);
        near &= near - 1u;
        var touching_voxels = tables[ADJACENT + k * 8u + u] & other_mask;
        while touching_voxels != 0u {
            let v = firstTrailingBit(touching_voxels);
            touching_voxels &= touching_voxels - 1u;
            unite(node(block, mask, u), node(other, other_mask, v));
        }
    }
}

// Points every node that is not a root straight at its root.
@compute @workgroup_size(64)
fn flatten(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let x = gid.x + gid.y * groups.x * GROUP;
    if x >= arrayLength(&parent) {
        return;
    }
    let p = atomicLoad(&parent[x]);
    if p != 0u {
        atomicStore(&parent[x], find_halving(p - 1u) + 1u);
    }
}

// find() that halves the path it walks (each node it passes then points to its grandparent).
// Only non-roots are written, and only with one of their ancestors: safe beside any other
// writer. `merge` leaves chains of links; nodes are mostly flattened in index order, so a chain
// usually ends at an earlier node already pointing at its root.
fn find_halving(start: u32) -> u32 {
    var x = start;
    loop {
        let p = atomicLoad(&parent[x]);
        if p == 0u {
            return x;
        }
        let grand = atomicLoad(&parent[p - 1u]);
        if grand == 0u {
            return p - 1u;
        }
        atomicStore(&parent[x], grand);
        x = grand - 1u;
    }
    return x;
}
