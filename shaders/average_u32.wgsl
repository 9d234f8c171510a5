// uint32 box averaging: floor of the mean of the voxels that exist, one mip from the previous.
// Sums of up to 8 uint32 need 35 bits: they are kept as (low, high) pairs, no u64 in WGSL.

@group(0) @binding(3) var<storage, read_write> dst: array<u32>;

fn add64(a: vec2<u32>, b: u32) -> vec2<u32> {
    let lo = a.x + b;
    return vec2<u32>(lo, a.y + select(0u, 1u, lo < b));
}

@compute @workgroup_size(64)
fn level(@builtin(global_invocation_id) o: vec3<u32>) {
    if (o.x >= p.out_x || o.y >= p.out_y || o.z >= p.out_z) {
        return;
    }
    let i = out_index(o.x, o.y, o.z);
    let x1 = min(o.x * 2u + 2u, p.in_x);
    let y1 = min(o.y * 2u + 2u, p.in_y);
    let z1 = min((o.z + 1u) * p.fz, p.in_z);
    var s = vec2<u32>(0u, 0u);
    for (var z = o.z * p.fz; z < z1; z++) {
        for (var y = o.y * 2u; y < y1; y++) {
            for (var x = o.x * 2u; x < x1; x++) {
                s = add64(s, src[in_index(x, y, z)]);
            }
        }
    }
    // The count of existing voxels is a power of two (1, 2, 4 or 8): divide by shifting.
    let count = (x1 - o.x * 2u) * (y1 - o.y * 2u) * (z1 - o.z * p.fz);
    let k = countTrailingZeros(count);
    if (k == 0u) {
        dst[i] = s.x;
    } else {
        dst[i] = (s.x >> k) | (s.y << (32u - k));
    }
}
