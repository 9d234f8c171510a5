// Accumulated box averaging for uint8 / uint16 images (tinybrain's multi-mip semantics).
// One invocation produces one packed output word: 4 (uint8) or 2 (uint16) consecutive voxels.
// Odd edges clamp the block, counting the last voxel twice, so each sum weighs 4^k or 8^k voxels.

override BYTES: u32 = 1u;

@group(0) @binding(2) var<storage, read_write> sums: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst: array<u32>;

fn load(i: u32, packed: bool) -> u32 {
    if (!packed) {
        return src[i] >> p.carry_shift;
    }
    if (BYTES == 1u) {
        return (src[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu;
    }
    return (src[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
}

fn block_sum(o: vec3<u32>, packed: bool) -> u32 {
    let x0 = min(o.x * 2u, p.in_x - 1u);
    let x1 = min(o.x * 2u + 1u, p.in_x - 1u);
    var s = 0u;
    for (var dz = 0u; dz < p.fz; dz++) {
        let z = min(o.z * p.fz + dz, p.in_z - 1u);
        for (var dy = 0u; dy < 2u; dy++) {
            let y = min(o.y * 2u + dy, p.in_y - 1u);
            let row = p.in_x * (y + p.in_y * z);
            s += load(row + x0, packed) + load(row + x1, packed);
        }
    }
    return s;
}

fn level(w: u32, packed: bool) {
    let per_word = 4u / BYTES;
    let first = w * per_word;
    if (first >= p.out_n) {
        return;
    }
    let mask = select(0xffffu, 0xffu, BYTES == 1u);
    var word = 0u;
    for (var k = 0u; k < per_word; k++) {
        let i = first + k;
        if (i < p.out_n) {
            let s = block_sum(out_coord(i), packed);
            if (p.write_sums == 1u) {
                sums[i] = s;
            }
            word |= ((s >> p.render_shift) & mask) << (k * 8u * BYTES);
        }
    }
    dst[w] = word;
}

@compute @workgroup_size(64)
fn level_from_packed(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    level(flat_index(gid, nwg), true);
}

@compute @workgroup_size(64)
fn level_from_sums(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    level(flat_index(gid, nwg), false);
}
