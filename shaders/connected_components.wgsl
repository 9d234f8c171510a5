// Thresholded connected components of one box by block-based union-find, after Allegretti et
// al.'s BUF: a 2x2x2 block of voxels is the unit.
//
// The host thresholds the voxels into one 8-bit mask per block (bit x + 2y + 4z), four to a word,
// rows of blocks padded to whole words (`pitch` blocks, the padding empty). Under 26-connectivity
// a block's voxels always touch each other, so a block is one node and `parent` has one entry per
// block. Under 6 and 18 a block holds up to 4 separate pieces (the host's table gives each
// voxel's piece as its smallest touching voxel) and a node is (block, piece), 8 entries per block.
//
// `merge` unites each block with its 13 earlier neighbour blocks where a voxel of one touches a
// voxel of the other; one invocation takes the four blocks of one mask word, so that it reads
// each neighbouring row of masks once (3 words) instead of once per block. Every edge inside the
// box is a true edge of the volume, so the box needs no core rule: chunks are stitched on the
// host through the voxels around the core.
//
// `parent` starts zeroed: 0 marks a root, any other value is the parent node + 1, so a zeroed
// buffer is the initial forest and no pass sets it. Parents always point to smaller nodes, so no
// link can close a cycle, and the host finds every root in one forward pass over the read-back
// parents (a node's parent has its root already), which costs less than a flattening kernel.

struct Params {
    unused: vec3<u32>,
    // Nodes per block: 1 (26-connected) or 8.
    nodes_per_block: u32,
    blocks: vec3<u32>,
    // Blocks per row of `masks` and `parent`: blocks.x rounded up to a multiple of 4.
    pitch: u32,
}


@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> parent: array<atomic<u32>>;
@group(0) @binding(2) var<storage, read> masks: array<u32>;
// `parent` as plain words (the same buffer), for reads that may see a stale value: any value a
// node has held is one of its ancestors (or 0), so a stale read only makes a longer path.
@group(0) @binding(4) var<storage, read_write> parent_plain: array<u32>;
// [0, 256): each voxel's piece per mask (3 bits per voxel);
// [256, 269): per backward offset, bits 0..8 the block's voxels that touch the neighbour block
//             and bits 8..16 the neighbour's voxels that touch the block;
// [269, 373): per offset and voxel u of the block, the neighbour's voxels that touch u.
@group(0) @binding(3) var<storage, read> tables: array<u32>;

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
    return b.x + P.pitch * (b.y + P.blocks.y * b.z);
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

// A row of masks around one word: the masks at x offsets -1..4 from the word's first block
// (`before`, the four in `word`, `after`); all 0 for a row outside the box.
struct Row {
    before: u32,
    word: u32,
    after: u32,
}

fn row_at(wx: u32, y: i32, z: i32) -> Row {
    var r = Row(0u, 0u, 0u);
    if y < 0 || z < 0 || u32(y) >= P.blocks.y {
        return r;
    }
    let words = P.pitch / 4u;
    let w = wx + words * (u32(y) + P.blocks.y * u32(z));
    r.word = masks[w];
    if wx > 0u {
        r.before = masks[w - 1u] >> 24u;
    }
    if wx + 1u < words {
        r.after = masks[w + 1u] & 0xffu;
    }
    return r;
}

// The mask at x offset k (-1..4) of a row.
fn mask_in(r: Row, k: i32) -> u32 {
    if k < 0 {
        return r.before;
    }
    if k > 3 {
        return r.after;
    }
    return (r.word >> (u32(k) * 8u)) & 0xffu;
}

// The node index of the block at backward offset k from `block`.
fn neighbour(block: u32, k: u32) -> u32 {
    let d = backward_offset(k);
    return u32(i32(block) + d.x + i32(P.pitch) * (d.y + i32(P.blocks.y) * d.z));
}

// 26-connectivity: the four blocks of one mask word. A 1-D dispatch over the words: a row is
// a few dozen words, which 2-D workgroups would pad with idle invocations.
@compute @workgroup_size(64)
fn merge(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let w = gid.x + gid.y * groups.x * 64u;
    let words = P.pitch / 4u;
    if w >= words * P.blocks.y * P.blocks.z {
        return;
    }
    let row = w / words;
    let g = vec3<u32>(w - row * words, row % P.blocks.y, row / P.blocks.y);
    let y = i32(g.y);
    let z = i32(g.z);
    let own = row_at(g.x, y, z);
    if own.word == 0u {
        return;
    }
    // Backward neighbour rows, named by their (dy, dz).
    let below_back = row_at(g.x, y - 1, z - 1);
    let back = row_at(g.x, y, z - 1);
    let above_back = row_at(g.x, y + 1, z - 1);
    let below = row_at(g.x, y - 1, z);
    let first = g.x * 4u + P.pitch * (g.y + P.blocks.y * g.z);
    // Written out for j = 0..3 (not a loop), so that every mask position is a constant.
    merge_in_word(first, 0, own, below_back, back, above_back, below);
    merge_in_word(first, 1, own, below_back, back, above_back, below);
    merge_in_word(first, 2, own, below_back, back, above_back, below);
    merge_in_word(first, 3, own, below_back, back, above_back, below);
}

// Block j of the word whose first block is `first`, given the rows around it.
fn merge_in_word(first: u32, j: i32, own: Row, below_back: Row, back: Row, above_back: Row, below: Row) {
    let mask = mask_in(own, j);
    if mask == 0u {
        return;
    }
    merge_block(
        first + u32(j), mask,
        mask_in(below_back, j - 1), mask_in(below_back, j), mask_in(below_back, j + 1),
        mask_in(back, j - 1), mask_in(back, j), mask_in(back, j + 1),
        mask_in(above_back, j - 1), mask_in(above_back, j), mask_in(above_back, j + 1),
        mask_in(below, j - 1), mask_in(below, j), mask_in(below, j + 1),
        mask_in(own, j - 1),
    );
}

// Unites one block (26-connectivity) with the backward neighbours it needs, given their masks
// in offset order. Two neighbour blocks that touch are joined by the later one's own invocation,
// so this block needs no link to a neighbour k that touches a neighbour j it is joined with
// already. Every neighbour this block touches ends up joined to it, so k is covered when one of
// the three face neighbours (offsets 4, 10, 12: z, y, x), earlier in the order 4, 10, 12, then
// the rest, touches both this block and k. Inside an object that leaves one link per block; on
// EM-like data 1.09 per foreground block. The tests are written out (offsets literal, so face
// masks are constants) and need no branch.
fn merge_block(
    block: u32, mask: u32,
    m0: u32, m1: u32, m2: u32, m3: u32, m4: u32, m5: u32, m6: u32, m7: u32, m8: u32, m9: u32,
    m10: u32, m11: u32, m12: u32,
) {
    // Inside an object every block and neighbour is full: only the z face neighbour is needed
    // (the common case, without the general tests).
    let full = mask & m0 & m1 & m2 & m3 & m4 & m5 & m6 & m7 & m8 & m9 & m10 & m11 & m12;
    var needed = 16u;
    if full != 0xffu {
        needed = needed_links(mask, m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12);
    }
    if needed == 0u {
        return;
    }
    // The first link is one compare-and-swap from 0 (this block is still a root unless another
    // invocation's union has linked it), to the neighbour's parent or grandparent where they
    // are set already (earlier blocks mostly are): the same union, and chains stay short for
    // the finds after. The rest, at most a few per block at the borders of objects, are unions.
    var link_to = neighbour(block, firstTrailingBit(needed));
    for (var hop = 0u; hop < 2u; hop++) {
        let p = parent_plain[link_to];
        link_to = select(link_to, p - 1u, p != 0u);
    }
    var others = needed & (needed - 1u);
    if !atomicCompareExchangeWeak(&parent[block], 0u, link_to + 1u).exchanged {
        others = needed;
    }
    while others != 0u {
        let k = firstTrailingBit(others);
        others &= others - 1u;
        unite(block, neighbour(block, k));
    }
}

// The backward neighbours (bit k for offset k) that one block must be linked with, from the
// masks of the block and its 13 backward neighbours.
fn needed_links(
    mask: u32,
    m0: u32, m1: u32, m2: u32, m3: u32, m4: u32, m5: u32, m6: u32, m7: u32, m8: u32, m9: u32,
    m10: u32, m11: u32, m12: u32,
) -> u32 {
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
    return needed;
}

// 6- and 18-connectivity: one invocation per block.
@compute @workgroup_size(16, 16, 1)
fn merge_pieces(@builtin(global_invocation_id) b: vec3<u32>) {
    if any(b >= P.blocks) {
        return;
    }
    let block = block_index(b);
    let mask = mask_of(block);
    if mask == 0u {
        return;
    }
    for (var k = 0u; k < 13u; k++) {
        merge_pieces_with(block, mask, vec3<i32>(b), k);
    }
}

// The node of voxel k of a block with `mask`: the block itself, or (block, the voxel's piece).
fn node(block: u32, mask: u32, k: u32) -> u32 {
    return block * 8u + ((tables[mask] >> (3u * k)) & 7u);
}

// 6- and 18-connectivity: unites the pieces of this block with the pieces of the k-th backward
// neighbour block that touch them (per-voxel adjacency masks from the host's tables).
fn merge_pieces_with(block: u32, mask: u32, here: vec3<i32>, k: u32) {
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

// find() that halves the path it walks (each node it passes then points to its grandparent).
// Only non-roots are written, and only with one of their ancestors: safe beside any other
// writer.
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
