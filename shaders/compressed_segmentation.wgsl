// neuroglancer's compressed_segmentation encoding, block by block: one workgroup per block of at
// most 512 voxels. The host lays out the channel (headers, and each lookup table written once):
// see src/gpu/compressed_segmentation.rs.
//
// 1. `block_tables`: the block's sorted distinct labels (its lookup table) and its packed
//    indices, in fixed slots per block.
// 2. `block_offsets`: where each block's packed words and table go in the compact output.
// 3. `compact`: copies them there, so that only the encoded words are read back.
//
// Labels are uint32 (p.words = 1) or uint64 as (low, high) word pairs (p.words = 2).

struct Params {
    // The uploaded volume, in voxels (Fortran order).
    size_x: u32,
    size_y: u32,
    size_z: u32,
    // Blocks in all the chunks.
    blocks: u32,
    block_x: u32,
    block_y: u32,
    block_z: u32,
    // block_x * block_y * block_z, at most MAX_BLOCK.
    block_len: u32,
    // block_len rounded up to a power of two (the bitonic sort's length).
    sort_len: u32,
    chunks: u32,
    words: u32,
    // Words of a block's slot in `packed`: its packed indices at 16 bits each, the most a
    // block of MAX_BLOCK voxels needs.
    packed_stride: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
// Per chunk, 8 words: origin (3), shape (3), its first block, 0. First blocks ascend.
@group(0) @binding(2) var<storage, read> chunk_boxes: array<u32>;
// Per block, its number of distinct labels.
@group(0) @binding(3) var<storage, read_write> counts: array<u32>;
// Per block, a slot of block_len * words words: its sorted distinct labels.
@group(0) @binding(4) var<storage, read_write> tables: array<u32>;
// Per block, a slot of packed_stride words: its packed indices.
@group(0) @binding(5) var<storage, read_write> packed: array<u32>;
// Per block, where its words start in `out`; then the total.
@group(0) @binding(6) var<storage, read_write> offsets: array<u32>;
// Per block, its packed indices then its table.
@group(0) @binding(7) var<storage, read_write> out: array<u32>;

const MAX_BLOCK: u32 = 512u;
const THREADS: u32 = 64u;
const NOWHERE: u32 = 0xffffffffu;

// The block's labels (x = low word, y = high word), sorted in place.
var<workgroup> keys: array<vec2<u32>, MAX_BLOCK>;
// Each key's position in the block, or NOWHERE for the padding past the block's voxels (and
// past a partial block's edge), which sorts last.
var<workgroup> origin_of: array<u32, MAX_BLOCK>;
// The table index of the label at each position of the block.
var<workgroup> index_at: array<u32, MAX_BLOCK>;
var<workgroup> partial: array<u32, THREADS>;
var<workgroup> differs: atomic<u32>;
var<workgroup> mixed: u32;
// The total of the last `exclusive_scan`.
var<workgroup> scan_total: u32;

struct Block {
    origin: vec3<u32>,
    size: vec3<u32>,
}

fn block_id(wg: vec3<u32>, groups: vec3<u32>) -> u32 {
    return wg.x + wg.y * groups.x;
}

// The chunk that holds block `id` (the last whose first block is at most `id`).
fn chunk_of(id: u32) -> u32 {
    var lo = 0u;
    var hi = p.chunks;
    while (hi - lo > 1u) {
        let mid = (lo + hi) / 2u;
        if (chunk_boxes[mid * 8u + 6u] <= id) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// Block `id`'s voxels in the volume: blocks of a chunk go x fastest, as their headers do; those
// at a chunk's far edges are cut to it.
fn locate(id: u32) -> Block {
    let c = chunk_of(id) * 8u;
    let origin = vec3<u32>(chunk_boxes[c], chunk_boxes[c + 1u], chunk_boxes[c + 2u]);
    let shape = vec3<u32>(chunk_boxes[c + 3u], chunk_boxes[c + 4u], chunk_boxes[c + 5u]);
    let bs = vec3<u32>(p.block_x, p.block_y, p.block_z);
    let grid = (shape + bs - 1u) / bs;
    let k = id - chunk_boxes[c + 6u];
    let b = vec3<u32>(k % grid.x, (k / grid.x) % grid.y, k / (grid.x * grid.y));
    let start = b * bs;
    return Block(origin + start, min(bs, shape - start));
}

// Position q of the block (x fastest over the full block size), if it is one of its voxels.
fn voxel_at(blk: Block, q: u32) -> vec3<u32> {
    return vec3<u32>(q % p.block_x, (q / p.block_x) % p.block_y, q / (p.block_x * p.block_y));
}

fn inside(blk: Block, v: vec3<u32>) -> bool {
    return all(v < blk.size);
}

fn label(blk: Block, v: vec3<u32>) -> vec2<u32> {
    let at = blk.origin + v;
    let i = at.x + p.size_x * (at.y + p.size_y * at.z);
    if (p.words == 1u) {
        return vec2<u32>(src[i], 0u);
    }
    return vec2<u32>(src[2u * i], src[2u * i + 1u]);
}

// Whether key a (at position wa) sorts before key b: voxels before padding, then by label.
fn before(a: vec2<u32>, wa: u32, b: vec2<u32>, wb: u32) -> bool {
    let a_pad = wa == NOWHERE;
    let b_pad = wb == NOWHERE;
    if (a_pad != b_pad) {
        return b_pad;
    }
    return a.y < b.y || (a.y == b.y && a.x < b.x);
}

// The reference encoder's bit width: 0 for one label, else the smallest power of two of bits
// that indexes them all.
fn bits_for(count: u32) -> u32 {
    if (count <= 1u) {
        return 0u;
    }
    var bits = 1u;
    while ((1u << bits) < count) {
        bits *= 2u;
    }
    return bits;
}

fn encoded_words(count: u32) -> u32 {
    return (bits_for(count) * p.block_len + 31u) / 32u;
}

// Words a block of `count` labels takes in the output: its packed indices, then its table.
fn block_words(count: u32) -> u32 {
    return encoded_words(count) + count * p.words;
}

fn write_table_entry(id: u32, rank: u32, value: vec2<u32>) {
    let at = id * p.block_len * p.words + rank * p.words;
    tables[at] = value.x;
    if (p.words == 2u) {
        tables[at + 1u] = value.y;
    }
}

// Loads the block into `keys` (padding included); returns whether it holds more than one label.
fn load_block(blk: Block, t: u32) -> bool {
    if (t == 0u) {
        atomicStore(&differs, 0u);
    }
    workgroupBarrier();
    let first = label(blk, vec3<u32>(0u));
    for (var q = t; q < p.sort_len; q += THREADS) {
        var key = vec2<u32>(NOWHERE);
        var at = NOWHERE;
        if (q < p.block_len) {
            index_at[q] = 0u;
            let v = voxel_at(blk, q);
            if (inside(blk, v)) {
                key = label(blk, v);
                at = q;
                if (any(key != first)) {
                    atomicStore(&differs, 1u);
                }
            }
        }
        keys[q] = key;
        origin_of[q] = at;
    }
    workgroupBarrier();
    if (t == 0u) {
        mixed = atomicLoad(&differs);
    }
    return workgroupUniformLoad(&mixed) != 0u;
}

fn bitonic_sort(t: u32) {
    for (var k = 2u; k <= p.sort_len; k <<= 1u) {
        for (var j = k >> 1u; j > 0u; j >>= 1u) {
            for (var q = t; q < p.sort_len / 2u; q += THREADS) {
                let i = 2u * q - (q & (j - 1u));
                let l = i + j;
                let ascending = (i & k) == 0u;
                let ki = keys[i];
                let kl = keys[l];
                let wi = origin_of[i];
                let wl = origin_of[l];
                let swap = select(before(ki, wi, kl, wl), before(kl, wl, ki, wi), ascending);
                if (swap) {
                    keys[i] = kl;
                    keys[l] = ki;
                    origin_of[i] = wl;
                    origin_of[l] = wi;
                }
            }
            workgroupBarrier();
        }
    }
}

// Whether sorted key i is a voxel whose label differs from the one before it.
fn starts_label(i: u32) -> bool {
    if (origin_of[i] == NOWHERE) {
        return false;
    }
    return i == 0u || any(keys[i] != keys[i - 1u]);
}

// Thread t's share of `n` items: a run of consecutive ones, as [start, stop).
fn run_of(t: u32, n: u32) -> vec2<u32> {
    let run = (n + THREADS - 1u) / THREADS;
    let start = min(t * run, n);
    return vec2<u32>(start, min(start + run, n));
}

// Every thread's `mine` summed over the threads before it (an exclusive scan); the sum over all
// threads goes to `scan_total`. Every thread of the workgroup calls it.
fn exclusive_scan(t: u32, mine: u32) -> u32 {
    partial[t] = mine;
    workgroupBarrier();
    if (t == 0u) {
        var sum = 0u;
        for (var r = 0u; r < THREADS; r++) {
            let n = partial[r];
            partial[r] = sum;
            sum += n;
        }
        scan_total = sum;
    }
    workgroupBarrier();
    return partial[t];
}

// Numbers the distinct labels of the sorted block: writes the table and each position's index;
// returns how many there are.
fn number_labels(id: u32, t: u32) -> u32 {
    let run = run_of(t, p.sort_len);
    var starts = 0u;
    for (var i = run.x; i < run.y; i++) {
        starts += select(0u, 1u, starts_label(i));
    }
    var rank = exclusive_scan(t, starts);
    for (var i = run.x; i < run.y; i++) {
        if (starts_label(i)) {
            write_table_entry(id, rank, keys[i]);
            rank += 1u;
        }
        if (origin_of[i] != NOWHERE) {
            index_at[origin_of[i]] = rank - 1u;
        }
    }
    return workgroupUniformLoad(&scan_total);
}

fn pack_indices(id: u32, t: u32, count: u32) {
    let bits = bits_for(count);
    let per_word = 32u / bits;
    for (var w = t; w < encoded_words(count); w += THREADS) {
        var word = 0u;
        for (var j = 0u; j < per_word; j++) {
            let q = w * per_word + j;
            if (q < p.block_len) {
                word |= index_at[q] << (j * bits);
            }
        }
        packed[id * p.packed_stride + w] = word;
    }
}

@compute @workgroup_size(64)
fn block_tables(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let id = block_id(wg, groups);
    if (id >= p.blocks) {
        return;
    }
    let blk = locate(id);
    if (!load_block(blk, t)) {
        // Most blocks of a segmentation hold one label: no sort, no indices.
        if (t == 0u) {
            write_table_entry(id, 0u, keys[0]);
            counts[id] = 1u;
        }
        return;
    }
    bitonic_sort(t);
    let count = number_labels(id, t);
    workgroupBarrier();
    pack_indices(id, t, count);
    if (t == 0u) {
        counts[id] = count;
    }
}

// One workgroup: an exclusive scan of the blocks' output sizes, then the total.
@compute @workgroup_size(64)
fn block_offsets(@builtin(local_invocation_index) t: u32) {
    let run = run_of(t, p.blocks);
    var sum = 0u;
    for (var b = run.x; b < run.y; b++) {
        sum += block_words(counts[b]);
    }
    var at = exclusive_scan(t, sum);
    if (t == 0u) {
        offsets[p.blocks] = scan_total;
    }
    for (var b = run.x; b < run.y; b++) {
        offsets[b] = at;
        at += block_words(counts[b]);
    }
}

@compute @workgroup_size(64)
fn compact(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let id = block_id(wg, groups);
    if (id >= p.blocks) {
        return;
    }
    let count = counts[id];
    let encoded = encoded_words(count);
    let at = offsets[id];
    for (var w = t; w < encoded; w += THREADS) {
        out[at + w] = packed[id * p.packed_stride + w];
    }
    let table = id * p.block_len * p.words;
    for (var w = t; w < count * p.words; w += THREADS) {
        out[at + encoded + w] = tables[table + w];
    }
}
