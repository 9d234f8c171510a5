// Accumulated box averaging for uint8 / uint16 images (tinybrain's multi-mip semantics).
// Invocation (w, y, z) produces output word w of row (y, z): 4 (uint8) or 2 (uint16) voxels.
// Odd edges clamp the block, counting the last voxel twice, so each sum weighs 4^k or 8^k voxels.

override BYTES: u32 = 1u;

@group(0) @binding(2) var<storage, read_write> sums: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst: array<u32>;

fn load(x: u32, y: u32, z: u32, packed: bool) -> u32 {
    let i = in_index(x, y, z);
    if (!packed) {
        return src[i] >> p.carry_shift;
    }
    if (BYTES == 1u) {
        return (src[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu;
    }
    return (src[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
}

// The sum of output voxel x's block, one voxel at a time (any level, any position).
fn block_sum(x: u32, oy: u32, oz: u32, packed: bool) -> u32 {
    let x0 = min(x * 2u, p.in_x - 1u);
    let x1 = min(x * 2u + 1u, p.in_x - 1u);
    var s = 0u;
    for (var r = 0u; r < 2u * p.fz; r++) {
        let row = block_row(oy, oz, r);
        s += load(x0, row.x, row.y, packed) + load(x1, row.x, row.y, packed);
    }
    return s;
}

// Fast path for a whole output word from packed input: SWAR pair sums of two input words per
// row (lanes stay below 2^16: at most 8 x 65535 for uint16 needs the 32-bit lane below).
fn word_sums_packed(w: u32, oy: u32, oz: u32) -> vec4<u32> {
    var a = 0u;
    var b = 0u;
    for (var r = 0u; r < 2u * p.fz; r++) {
        let row = block_row(oy, oz, r);
        let i = in_index(w * 8u / BYTES, row.x, row.y) * BYTES / 4u;
        let v0 = src[i];
        let v1 = src[i + 1u];
        if (BYTES == 1u) {
            a += (v0 & 0x00ff00ffu) + ((v0 >> 8u) & 0x00ff00ffu);
            b += (v1 & 0x00ff00ffu) + ((v1 >> 8u) & 0x00ff00ffu);
        } else {
            a += (v0 & 0xffffu) + (v0 >> 16u);
            b += (v1 & 0xffffu) + (v1 >> 16u);
        }
    }
    if (BYTES == 1u) {
        return vec4<u32>(a & 0xffffu, a >> 16u, b & 0xffffu, b >> 16u);
    }
    return vec4<u32>(a, b, 0u, 0u);
}

fn level(gid: vec3<u32>, packed: bool) {
    let per_word = 4u / BYTES;
    let w = gid.x;
    let x0 = w * per_word;
    if (x0 >= p.out_x || gid.y >= p.out_y || gid.z >= p.out_z) {
        return;
    }
    var s: vec4<u32>;
    let whole_word = packed && (x0 + per_word) * 2u <= p.in_x;
    if (whole_word) {
        s = word_sums_packed(w, gid.y, gid.z);
    }
    // Voxel by voxel where the fast path does not apply: a loop that only invocations at an odd
    // edge run, not an unrolled branch, since lavapipe runs every branch (masked) for every
    // group of eight invocations; a loop runs as often as its busiest invocation needs.
    let slow = select(per_word, 0u, whole_word);
    for (var k = 0u; k < slow; k++) {
        if (x0 + k < p.out_x) {
            s[k] = block_sum(x0 + k, gid.y, gid.z, packed);
        }
    }
    let mask = select(0xffffu, 0xffu, BYTES == 1u);
    var word = 0u;
    let first = out_index(x0, gid.y, gid.z);
    for (var k = 0u; k < per_word; k++) {
        if (x0 + k < p.out_x) {
            if (p.write_sums == 1u) {
                sums[first + k] = s[k];
            }
            word |= ((s[k] >> p.render_shift) & mask) << (k * 8u * BYTES);
        }
    }
    dst[first / per_word] = word;
}

@compute @workgroup_size(64)
fn level_from_packed(@builtin(global_invocation_id) gid: vec3<u32>) {
    level(gid, true);
}

@compute @workgroup_size(64)
fn level_from_sums(@builtin(global_invocation_id) gid: vec3<u32>) {
    level(gid, false);
}
