// float32 box averaging: sums in float32 in tinybrain's x86 summation order, so results match it
// bit for bit; output = sum * 2^-(bits*level), an exact division by a power of two.

@group(0) @binding(2) var<storage, read_write> sums: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst: array<u32>;

fn ld(x: u32, y: u32, z: u32) -> f32 {
    return bitcast<f32>(src[in_index(x, y, z)]);
}

fn sum_2x2(x: u32, y: u32, z: u32) -> f32 {
    let x_pair = x + 1u < p.in_x;
    let y_pair = y + 1u < p.in_y;
    let a = ld(x, y, z);
    if (!y_pair) {
        var row = a * 2.0;
        if (x_pair) {
            row = a + ld(x + 1u, y, z);
        }
        return row * 2.0;
    }
    let c = ld(x, y + 1u, z);
    if (!x_pair) {
        return a * 2.0 + c * 2.0;
    }
    let b = ld(x + 1u, y, z);
    let d = ld(x + 1u, y + 1u, z);
    // tinybrain's SSE path covers x below the last multiple of 8.
    if (x < (p.in_x & ~7u)) {
        return (a + c) + (b + d);
    }
    return ((a + b) + c) + d;
}

fn sum_2x2x2(x: u32, y: u32, z: u32) -> f32 {
    let x_pair = x + 1u < p.in_x;
    let y_pair = y + 1u < p.in_y;
    let z_pair = z + 1u < p.in_z;
    var acc = 0.0;
    for (var zz = z; zz <= select(z, z + 1u, z_pair); zz++) {
        for (var yy = y; yy <= select(y, y + 1u, y_pair); yy++) {
            if (x_pair) {
                acc += ld(x, yy, zz);
                acc += ld(x + 1u, yy, zz);
            } else {
                acc += ld(x, yy, zz) * 2.0;
            }
        }
    }
    if (!y_pair) {
        acc *= 2.0;
    }
    if (!z_pair) {
        acc *= 2.0;
    }
    return acc;
}

// The same value, but opaque: compilers may not apply inexact rewrites through it.
fn opaque(v: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(v) ^ p.opaque_zero);
}

// Error-free transformation: a + b == s + e exactly. Shader compilers treat float maths as
// reassociable (Mesa's NIR turns (a + b) - a into b), so each step goes through opaque().
fn two_sum(a: f32, b: f32) -> vec2<f32> {
    let s = opaque(a + b);
    let bb = opaque(s - a);
    let e = (a - opaque(s - bb)) + (b - bb);
    return vec2<f32>(s, e);
}

// The block sum rounded once, as tinybrain's single-mip path gets by summing in double: the
// running sum's rounding errors are collected exactly and added back at the end.
fn rounded_block_sum(x: u32, y: u32, z: u32) -> f32 {
    var s = 0.0;
    var err = 0.0;
    for (var dz = 0u; dz < p.fz; dz++) {
        let zz = min(z + dz, p.in_z - 1u);
        for (var dy = 0u; dy < 2u; dy++) {
            let yy = min(y + dy, p.in_y - 1u);
            for (var dx = 0u; dx < 2u; dx++) {
                let t = two_sum(s, ld(min(x + dx, p.in_x - 1u), yy, zz));
                s = t.x;
                err += t.y;
            }
        }
    }
    return s + err;
}

@compute @workgroup_size(64)
fn level(@builtin(global_invocation_id) o: vec3<u32>) {
    if (o.x >= p.out_x || o.y >= p.out_y || o.z >= p.out_z) {
        return;
    }
    let i = out_index(o.x, o.y, o.z);
    var s: f32;
    if (p.exact_sum == 1u) {
        s = rounded_block_sum(o.x * 2u, o.y * 2u, o.z * p.fz);
    } else if (p.fz == 1u) {
        s = sum_2x2(o.x * 2u, o.y * 2u, o.z);
    } else {
        s = sum_2x2x2(o.x * 2u, o.y * 2u, o.z * 2u);
    }
    if (p.write_sums == 1u) {
        sums[i] = bitcast<u32>(s);
    }
    dst[i] = bitcast<u32>(s * bitcast<f32>(p.scale_bits));
}
