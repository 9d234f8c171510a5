// Mode pooling of segmentation labels, one mip from the previous: countless for (2,2,1),
// tinybrain's 2x2x2 rule for (2,2,2). Labels are uint32 (WORDS = 1) or uint64 as word pairs.

override WORDS: u32 = 1u;
// The factor in z: 1 for (2,2,1), 2 for (2,2,2). An override, so that each pipeline holds one
// rule: lavapipe runs both sides of a branch (masked) even when the condition is uniform.
override FZ: u32 = 1u;

@group(0) @binding(3) var<storage, read_write> dst: array<u32>;

fn ld(x: u32, y: u32, z: u32) -> vec2<u32> {
    let i = in_index(x, y, z);
    if (WORDS == 1u) {
        return vec2<u32>(src[i], 0u);
    }
    return vec2<u32>(src[2u * i], src[2u * i + 1u]);
}

fn same(a: vec2<u32>, b: vec2<u32>) -> bool {
    return all(a == b);
}

fn countless(x: u32, y: u32, z: u32) -> vec2<u32> {
    let a = ld(x, y, z);
    if (x + 1u >= p.in_x || y + 1u >= p.in_y) {
        return a;
    }
    let b = ld(x + 1u, y, z);
    let c = ld(x, y + 1u, z);
    if (same(a, b) || same(a, c)) {
        return a;
    }
    if (same(b, c)) {
        return b;
    }
    return ld(x + 1u, y + 1u, z);
}

fn mode_2x2x2(x: u32, y: u32, z: u32) -> vec2<u32> {
    let x1 = min(x + 1u, p.in_x - 1u);
    let y1 = min(y + 1u, p.in_y - 1u);
    let z1 = min(z + 1u, p.in_z - 1u);
    var v: array<vec2<u32>, 8>;
    v[0] = ld(x, y, z);
    v[1] = ld(x1, y, z);
    v[2] = ld(x, y1, z);
    v[3] = ld(x1, y1, z);
    v[4] = ld(x, y, z1);
    v[5] = ld(x1, y, z1);
    v[6] = ld(x, y1, z1);
    v[7] = ld(x1, y1, z1);
    if (same(v[0], v[1]) && same(v[0], v[2]) && same(v[0], v[3])) {
        return v[0];
    }
    if (same(v[4], v[5]) && same(v[4], v[6]) && same(v[4], v[7])) {
        return v[4];
    }
    var best = vec2<u32>(0u, 0u);
    var best_count = 0u;
    for (var t = 0u; t < 8u; t++) {
        var count = 0u;
        for (var q = 0u; q < 8u; q++) {
            count += select(0u, 1u, same(v[t], v[q]));
        }
        if (count >= 4u) {
            return v[t];
        }
        if (count > best_count) {
            best = v[t];
            best_count = count;
        }
    }
    return best;
}

@compute @workgroup_size(64)
fn level(@builtin(global_invocation_id) o: vec3<u32>) {
    if (o.x >= p.out_x || o.y >= p.out_y || o.z >= p.out_z) {
        return;
    }
    let i = out_index(o.x, o.y, o.z);
    var m: vec2<u32>;
    if (FZ == 1u) {
        m = countless(o.x * 2u, o.y * 2u, o.z);
    } else {
        m = mode_2x2x2(o.x * 2u, o.y * 2u, o.z * 2u);
    }
    if (WORDS == 1u) {
        dst[i] = m.x;
    } else {
        dst[2u * i] = m.x;
        dst[2u * i + 1u] = m.y;
    }
}
