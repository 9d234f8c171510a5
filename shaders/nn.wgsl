// ConvNet operators for ONNX inference (src/gpu/nn.rs runs them; src/ops/nn.rs is their CPU
// reference). Tensors are float32 in row-major N,C,z,y,x order; one invocation per output
// element unless said otherwise, in 1-D dispatches of 64-thread workgroups that spill into y
// past the adapter's per-dimension limit. Parameters are 32 words of a uniform, named per
// kernel below.

@group(0) @binding(0) var<uniform> p: array<vec4<u32>, 8>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
// conv_tiled's weights, 8 output channels of one tap in two vectors (see src/infer/gpu.rs).
@group(0) @binding(2) var<storage, read> w8: array<vec4<f32>>;

fn u(i: u32) -> u32 {
    return p[i >> 2u][i & 3u];
}

fn s(i: u32) -> i32 {
    return bitcast<i32>(u(i));
}

fn f(i: u32) -> f32 {
    return bitcast<f32>(u(i));
}

fn linear(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.x + gid.y * groups.x * 64u;
}

// Element i of a row-major [rest, d, h, w] tensor: its x, y, z and the index of its (batch,
// channel) or other leading axes.
fn unravel(i: u32, w: u32, h: u32, d: u32) -> vec4<u32> {
    let x = i % w;
    let r = i / w;
    let y = r % h;
    let s = r / h;
    return vec4<u32>(x, y, s % d, s / d);
}

// The window tap k of output o lands at input o*stride + k*dilation - pad: its position, or -1
// outside [0, n).
fn tap(o: u32, k: u32, stride: u32, dilation: u32, pad: u32, n: u32) -> i32 {
    let at = i32(o * stride + k * dilation) - i32(pad);
    if (at < 0 || at >= i32(n)) {
        return -1;
    }
    return at;
}

// Conv: 0 outputs, 1 C, 2 M, 3 group, 4-6 D H W, 7-9 OD OH OW, 10-12 kernel, 13-15 strides,
// 16-18 dilations, 19-21 begin pads, 22 has bias. Weights [M, C/group, kD, kH, kW].
@compute @workgroup_size(64)
fn conv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = linear(gid, groups);
    if (i >= u(0u)) {
        return;
    }
    let c_in = u(1u);
    let m_out = u(2u);
    let d = u(4u);
    let h = u(5u);
    let wd = u(6u);
    let o = unravel(i, u(9u), u(8u), u(7u));
    let ox = o.x;
    let oy = o.y;
    let oz = o.z;
    let m = o.w % m_out;
    let n = o.w / m_out;
    let in_per_group = c_in / u(3u);
    let g = m / (m_out / u(3u));
    let kd = u(10u);
    let kh = u(11u);
    let kw = u(12u);
    let taps = kd * kh * kw;
    var sum = 0.0;
    for (var ic = 0u; ic < in_per_group; ic++) {
        let channel = n * c_in + g * in_per_group + ic;
        let weights = (m * in_per_group + ic) * taps;
        for (var kz = 0u; kz < kd; kz++) {
            let iz = tap(oz, kz, u(13u), u(16u), u(19u), d);
            if (iz < 0) {
                continue;
            }
            for (var ky = 0u; ky < kh; ky++) {
                let iy = tap(oy, ky, u(14u), u(17u), u(20u), h);
                if (iy < 0) {
                    continue;
                }
                let row = ((channel * d + u32(iz)) * h + u32(iy)) * wd;
                let wrow = weights + (kz * kh + ky) * kw;
                for (var kx = 0u; kx < kw; kx++) {
                    let ix = tap(ox, kx, u(15u), u(18u), u(21u), wd);
                    if (ix < 0) {
                        continue;
                    }
                    sum += x[row + u32(ix)] * w[wrow + kx];
                }
            }
        }
    }
    if (u(22u) != 0u) {
        sum += b[m];
    }
    y[i] = sum;
}

// Conv with register tiles, for output channels per group a multiple of 8: each invocation
// computes 8 output channels of 8 neighbouring x voxels, so each input value loaded feeds 8
// multiply-adds and each weight 8 (the direct kernel does one per load). The weights come
// re-laid as [M/8, C/group, taps, 8]: a tap's 8 channels are two vector loads (a CPU adapter
// makes every storage load a loop over its lanes, so fewer, wider loads count). The sums run
// in the direct kernel's order (input channel, then kz, ky, kx). Parameters as conv, and 23
// the invocations, 24 the blocks of 8 along x.
@compute @workgroup_size(64)
fn conv_tiled(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = linear(gid, groups);
    if (i >= u(23u)) {
        return;
    }
    let c_in = u(1u);
    let m_out = u(2u);
    let d = u(4u);
    let h = u(5u);
    let wd = u(6u);
    let ow = u(9u);
    let blocks = u(24u);
    let o = unravel(i, blocks, u(8u), u(7u));
    let bx = o.x;
    let oy = o.y;
    let oz = o.z;
    let m_blocks = m_out / 8u;
    let m0 = (o.w % m_blocks) * 8u;
    let n = o.w / m_blocks;
    let in_per_group = c_in / u(3u);
    let g = m0 / (m_out / u(3u));
    let kd = u(10u);
    let kh = u(11u);
    let kw = u(12u);
    let taps = kd * kh * kw;
    let ox0 = bx * 8u;
    var low: array<vec4<f32>, 8>;
    var high: array<vec4<f32>, 8>;
    for (var ic = 0u; ic < in_per_group; ic++) {
        let channel = n * c_in + g * in_per_group + ic;
        let weights = ((m0 / 8u) * in_per_group + ic) * taps;
        for (var kz = 0u; kz < kd; kz++) {
            let iz = tap(oz, kz, u(13u), u(16u), u(19u), d);
            if (iz < 0) {
                continue;
            }
            for (var ky = 0u; ky < kh; ky++) {
                let iy = tap(oy, ky, u(14u), u(17u), u(20u), h);
                if (iy < 0) {
                    continue;
                }
                let row = ((channel * d + u32(iz)) * h + u32(iy)) * wd;
                let wrow = weights + (kz * kh + ky) * kw;
                for (var kx = 0u; kx < kw; kx++) {
                    var v = vec4<f32>(0.0);
                    var v2 = vec4<f32>(0.0);
                    for (var t = 0u; t < 4u; t++) {
                        let ix = tap(ox0 + t, kx, u(15u), u(18u), u(21u), wd);
                        if (ix >= 0 && ox0 + t < ow) {
                            v[t] = x[row + u32(ix)];
                        }
                        let ix2 = tap(ox0 + 4u + t, kx, u(15u), u(18u), u(21u), wd);
                        if (ix2 >= 0 && ox0 + 4u + t < ow) {
                            v2[t] = x[row + u32(ix2)];
                        }
                    }
                    let k = (wrow + kx) * 2u;
                    let wa = w8[k];
                    let wb = w8[k + 1u];
                    low[0] += wa.x * v;
                    high[0] += wa.x * v2;
                    low[1] += wa.y * v;
                    high[1] += wa.y * v2;
                    low[2] += wa.z * v;
                    high[2] += wa.z * v2;
                    low[3] += wa.w * v;
                    high[3] += wa.w * v2;
                    low[4] += wb.x * v;
                    high[4] += wb.x * v2;
                    low[5] += wb.y * v;
                    high[5] += wb.y * v2;
                    low[6] += wb.z * v;
                    high[6] += wb.z * v2;
                    low[7] += wb.w * v;
                    high[7] += wb.w * v2;
                }
            }
        }
    }
    for (var j = 0u; j < 8u; j++) {
        let m = m0 + j;
        var bias = 0.0;
        if (u(22u) != 0u) {
            bias = b[m];
        }
        let base = ((n * m_out + m) * u(7u) + oz) * u(8u) * ow + oy * ow;
        for (var t = 0u; t < 4u; t++) {
            if (ox0 + t < ow) {
                y[base + ox0 + t] = low[j][t] + bias;
            }
            if (ox0 + 4u + t < ow) {
                y[base + ox0 + 4u + t] = high[j][t] + bias;
            }
        }
    }
}

// Conv as an implicit GEMM in workgroup memory, for GPUs: per (batch, group), output[m, v] =
// sum over k of weights[m, k] * patch[k, v], k running over (input channel, kz, ky, kx) and v
// over output voxels. A 16x16 workgroup makes a 64-channel by 64-voxel tile, each invocation 4
// channels (m = 16i + its y) by 4 voxels (v = 16j + its x); k goes 16 at a time through two
// workgroup tiles that the 256 invocations fill together (each a fixed column, four rows), so
// every weight and input value read from memory feeds 64 multiply-adds. Padding taps read 0;
// each sum runs over k in order, as the direct kernel's. The weights come re-laid as
// [group, k, channel of the group] (a row of the tile is contiguous). Parameters as conv, and
// 23 the voxel tiles (workgroup x + y * num_workgroups.x), 24 the channel tiles (z is
// channel tile + tiles * (batch * groups + group)).
var<workgroup> tile_w: array<array<f32, 64>, 16>;
var<workgroup> tile_x: array<array<f32, 64>, 16>;

@compute @workgroup_size(16, 16)
fn conv_gemm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let voxel_tile = wid.x + wid.y * groups.x;
    if (voxel_tile >= u(23u)) {
        return;
    }
    let m_tiles = u(24u);
    let channel_tile = wid.z % m_tiles;
    let group_count = u(3u);
    let g = (wid.z / m_tiles) % group_count;
    let n = wid.z / m_tiles / group_count;
    let c_in = u(1u);
    let m_out = u(2u);
    let per_group_in = c_in / group_count;
    let per_group_out = m_out / group_count;
    let d = u(4u);
    let h = u(5u);
    let wd = u(6u);
    let oh = u(8u);
    let ow = u(9u);
    let voxels = u(7u) * oh * ow;
    let kh = u(11u);
    let kw = u(12u);
    let taps = u(10u) * kh * kw;
    let depth = per_group_in * taps;
    // What this invocation loads: column `col` of both tiles, rows row0 + 4r.
    let col = t % 64u;
    let row0 = t / 64u;
    let load_m = channel_tile * 64u + col;
    let load_v = voxel_tile * 64u + col;
    let lx = load_v % ow;
    let ly = (load_v / ow) % oh;
    let lz = load_v / (ow * oh);
    let channel0 = n * c_in + g * per_group_in;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < depth; k0 += 16u) {
        for (var r = 0u; r < 4u; r++) {
            let row = row0 + 4u * r;
            let k = k0 + row;
            var wv = 0.0;
            var xv = 0.0;
            if (k < depth) {
                if (load_m < per_group_out) {
                    wv = w[(g * depth + k) * per_group_out + load_m];
                }
                if (load_v < voxels) {
                    let ic = k / taps;
                    let tp = k % taps;
                    let iz = tap(lz, tp / (kh * kw), u(13u), u(16u), u(19u), d);
                    let iy = tap(ly, (tp / kw) % kh, u(14u), u(17u), u(20u), h);
                    let ix = tap(lx, tp % kw, u(15u), u(18u), u(21u), wd);
                    if (iz >= 0 && iy >= 0 && ix >= 0) {
                        xv = x[(((channel0 + ic) * d + u32(iz)) * h + u32(iy)) * wd + u32(ix)];
                    }
                }
            }
            tile_w[row][col] = wv;
            tile_x[row][col] = xv;
        }
        workgroupBarrier();
        for (var row = 0u; row < 16u; row++) {
            let xs = vec4<f32>(
                tile_x[row][lid.x],
                tile_x[row][lid.x + 16u],
                tile_x[row][lid.x + 32u],
                tile_x[row][lid.x + 48u],
            );
            for (var i = 0u; i < 4u; i++) {
                acc[i] += tile_w[row][lid.y + 16u * i] * xs;
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let m = channel_tile * 64u + lid.y + 16u * i;
        if (m >= per_group_out) {
            continue;
        }
        let channel = g * per_group_out + m;
        var bias = 0.0;
        if (u(22u) != 0u) {
            bias = b[channel];
        }
        let base = (n * m_out + channel) * voxels + voxel_tile * 64u + lid.x;
        for (var j = 0u; j < 4u; j++) {
            if (voxel_tile * 64u + lid.x + 16u * j < voxels) {
                y[base + 16u * j] = acc[i][j] + bias;
            }
        }
    }
}

// The input position whose tap k reaches output o in a transposed convolution
// (o = i*stride + k*dilation - pad), or -1.
fn source(o: u32, k: u32, stride: u32, dilation: u32, pad: u32, n: u32) -> i32 {
    let t = i32(o + pad) - i32(k * dilation);
    if (t < 0 || t % i32(stride) != 0) {
        return -1;
    }
    let at = t / i32(stride);
    if (at >= i32(n)) {
        return -1;
    }
    return at;
}

// With dilation 1, only taps k = (o + pad) mod stride, then every stride-th, reach output o:
// the first such tap and the step (else every tap, each checked by `source`).
fn first_tap(o: u32, stride: u32, dilation: u32, pad: u32) -> u32 {
    return select(0u, (o + pad) % stride, dilation == 1u);
}

fn tap_step(stride: u32, dilation: u32) -> u32 {
    return select(1u, stride, dilation == 1u);
}

// ConvTranspose, gathered per output: parameters as conv (D H W the input's); weights
// [C, M/group, kD, kH, kW].
@compute @workgroup_size(64)
fn conv_transpose(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = linear(gid, groups);
    if (i >= u(0u)) {
        return;
    }
    let c_in = u(1u);
    let m_out = u(2u);
    let d = u(4u);
    let h = u(5u);
    let wd = u(6u);
    let o = unravel(i, u(9u), u(8u), u(7u));
    let ox = o.x;
    let oy = o.y;
    let oz = o.z;
    let m = o.w % m_out;
    let n = o.w / m_out;
    let in_per_group = c_in / u(3u);
    let out_per_group = m_out / u(3u);
    let g = m / out_per_group;
    let j = m % out_per_group;
    let kd = u(10u);
    let kh = u(11u);
    let kw = u(12u);
    let taps = kd * kh * kw;
    var sum = 0.0;
    for (var ic = 0u; ic < in_per_group; ic++) {
        let c = g * in_per_group + ic;
        let weights = (c * out_per_group + j) * taps;
        for (var kz = first_tap(oz, u(13u), u(16u), u(19u)); kz < kd; kz += tap_step(u(13u), u(16u))) {
            let iz = source(oz, kz, u(13u), u(16u), u(19u), d);
            if (iz < 0) {
                continue;
            }
            for (var ky = first_tap(oy, u(14u), u(17u), u(20u)); ky < kh; ky += tap_step(u(14u), u(17u))) {
                let iy = source(oy, ky, u(14u), u(17u), u(20u), h);
                if (iy < 0) {
                    continue;
                }
                let row = (((n * c_in + c) * d + u32(iz)) * h + u32(iy)) * wd;
                for (var kx = first_tap(ox, u(15u), u(18u), u(21u)); kx < kw; kx += tap_step(u(15u), u(18u))) {
                    let ix = source(ox, kx, u(15u), u(18u), u(21u), wd);
                    if (ix < 0) {
                        continue;
                    }
                    sum += x[row + u32(ix)] * w[weights + (kz * kh + ky) * kw + kx];
                }
            }
        }
    }
    if (u(22u) != 0u) {
        sum += b[m];
    }
    y[i] = sum;
}

// The taps of a window on one axis inside the input and its pads (ceil mode can reach past).
fn padded_taps(o: u32, k: u32, stride: u32, dilation: u32, limit: u32) -> u32 {
    var count = 0u;
    for (var t = 0u; t < k; t++) {
        if (o * stride + t * dilation < limit) {
            count += 1u;
        }
    }
    return count;
}

// MaxPool / AveragePool: 0 outputs, 1-3 D H W, 4-6 OD OH OW, 7-9 kernel, 10-12 strides,
// 13-15 dilations, 16-18 begin pads, 19 kind (0 max, 1 average, 2 average counting pads),
// 20-22 end pads.
@compute @workgroup_size(64)
fn pool(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = linear(gid, groups);
    if (i >= u(0u)) {
        return;
    }
    let d = u(1u);
    let h = u(2u);
    let wd = u(3u);
    let o = unravel(i, u(6u), u(5u), u(4u));
    let ox = o.x;
    let oy = o.y;
    let oz = o.z;
    let channel = o.w;
    var best = -3.4028235e38;
    var any = false;
    var sum = 0.0;
    var inside = 0u;
    for (var kz = 0u; kz < u(7u); kz++) {
        let iz = tap(oz, kz, u(10u), u(13u), u(16u), d);
        if (iz < 0) {
            continue;
        }
        for (var ky = 0u; ky < u(8u); ky++) {
            let iy = tap(oy, ky, u(11u), u(14u), u(17u), h);
            if (iy < 0) {
                continue;
            }
            let row = ((channel * d + u32(iz)) * h + u32(iy)) * wd;
            for (var kx = 0u; kx < u(9u); kx++) {
                let ix = tap(ox, kx, u(12u), u(15u), u(18u), wd);
                if (ix < 0) {
                    continue;
                }
                let v = x[row + u32(ix)];
                best = max(best, v);
                any = true;
                sum += v;
                inside += 1u;
            }
        }
    }
    let kind = u(19u);
    if (kind == 0u) {
        y[i] = select(-3.4028235e38, best, any);
    } else if (kind == 1u) {
        y[i] = sum / f32(max(inside, 1u));
    } else {
        let count = padded_taps(oz, u(7u), u(10u), u(13u), d + u(16u) + u(20u))
            * padded_taps(oy, u(8u), u(11u), u(14u), h + u(17u) + u(21u))
            * padded_taps(ox, u(9u), u(12u), u(15u), wd + u(18u) + u(22u));
        y[i] = sum / f32(count);
    }
}

// y = x * a[c] + b[c] (BatchNormalization, folded to a scale and a shift):
// 0 elements, 1 voxels per channel, 2 channels; a in w, b in b.
@compute @workgroup_size(64)
fn affine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = linear(gid, groups);
    if (i >= u(0u)) {
        return;
    }
    let c = (i / u(1u)) % u(2u);
    y[i] = x[i] * w[c] + b[c];
}

var<workgroup> partial: array<f32, 256>;

fn reduce(t: u32, value: f32) -> f32 {
    partial[t] = value;
    workgroupBarrier();
    for (var half = 128u; half > 0u; half = half >> 1u) {
        if (t < half) {
            partial[t] += partial[t + half];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

// InstanceNormalization, one workgroup per (batch, channel): 0 (batch, channel) pairs,
// 1 voxels per channel, 2 channels, 3 epsilon (float bits); scale in w, bias in b.
@compute @workgroup_size(256)
fn instance_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let pair = wid.x + wid.y * groups.x;
    if (pair >= u(0u)) {
        return;
    }
    let n = u(1u);
    let base = pair * n;
    let t = lid.x;
    var sum = 0.0;
    for (var v = t; v < n; v += 256u) {
        sum += x[base + v];
    }
    let mean = reduce(t, sum) / f32(n);
    var squares = 0.0;
    for (var v = t; v < n; v += 256u) {
        let dv = x[base + v] - mean;
        squares += dv * dv;
    }
    let variance = reduce(t, squares) / f32(n);
    let c = pair % u(2u);
    let a = w[c] / sqrt(variance + f(3u));
    for (var v = t; v < n; v += 256u) {
        y[base + v] = (x[base + v] - mean) * a + b[c];
    }
}

// v rounded to the nearest float16 and widened back, bit for bit as Rust's half::f16 rounds:
// ties to even, subnormals kept (a grid of 2^-24), from 65520 on infinite; NaN and inf as they are.
// (quantizeToF16 may flush subnormals, so it is not used.)
fn round_f16(v: f32) -> f32 {
    let bits = bitcast<u32>(v);
    let sign = bits & 0x80000000u;
    let magnitude = bits & 0x7fffffffu;
    if (magnitude >= 0x7f800000u) {
        return v;
    }
    if (magnitude >= 0x477ff000u) {
        return bitcast<f32>(sign | 0x7f800000u);
    }
    if (magnitude < 0x38800000u) {
        // Below float16's smallest normal: scaling by 2^24 is exact, round() ties to even.
        let r = round(bitcast<f32>(magnitude) * 16777216.0) / 16777216.0;
        return bitcast<f32>(sign | bitcast<u32>(r));
    }
    // Keep 10 of the 23 mantissa bits, ties to even; a carry may step the exponent, as it should.
    let odd = (magnitude >> 13u) & 1u;
    return bitcast<f32>(sign | ((magnitude + 0xfffu + odd) & 0xffffe000u));
}

// Elementwise activations: 0 elements, 1 op (0 Relu, 1 LeakyRelu, 2 Elu, 3 Sigmoid, 4 Tanh,
// 5 rounding to float16), 2 alpha (float bits).
@compute @workgroup_size(64)
fn activation(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = linear(gid, groups);
    if (i >= u(0u)) {
        return;
    }
    let v = x[i];
    let alpha = f(2u);
    var out = v;
    switch (u(1u)) {
        case 0u: { out = max(v, 0.0); }
        case 1u: { out = select(v, alpha * v, v < 0.0); }
        case 2u: { out = select(v, alpha * (exp(v) - 1.0), v < 0.0); }
        case 3u: { out = 1.0 / (1.0 + exp(-v)); }
        case 4u: { out = tanh(v); }
        default: { out = round_f16(v); }
    }
    y[i] = out;
}

// Broadcast arithmetic over 6 axes: 0 elements, 1 op (0 add, 1 sub, 2 mul, 3 div), 2-7 output
// dims, 8-13 strides of a, 14-19 strides of b (0 along broadcast axes); a in x, b in w.
@compute @workgroup_size(64)
fn binary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = linear(gid, groups);
    if (i >= u(0u)) {
        return;
    }
    var r = i;
    var ia = 0u;
    var ib = 0u;
    for (var k = 0u; k < 6u; k++) {
        let axis = 5u - k;
        let dim = u(2u + axis);
        let at = r % dim;
        r = r / dim;
        ia += at * u(8u + axis);
        ib += at * u(14u + axis);
    }
    let a = x[ia];
    let c = w[ib];
    var out = a + c;
    switch (u(1u)) {
        case 1u: { out = a - c; }
        case 2u: { out = a * c; }
        case 3u: { out = a / c; }
        default: {}
    }
    y[i] = out;
}

// Softmax over a block of axes, one invocation per (outer, inner) column: 0 columns, 1 block,
// 2 inner.
@compute @workgroup_size(64)
fn softmax(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = linear(gid, groups);
    if (i >= u(0u)) {
        return;
    }
    let block = u(1u);
    let inner = u(2u);
    let base = (i / inner) * block * inner + i % inner;
    var top = -3.4028235e38;
    for (var k = 0u; k < block; k++) {
        top = max(top, x[base + k * inner]);
    }
    var sum = 0.0;
    for (var k = 0u; k < block; k++) {
        let e = exp(x[base + k * inner] - top);
        y[base + k * inner] = e;
        sum += e;
    }
    for (var k = 0u; k < block; k++) {
        y[base + k * inner] = y[base + k * inner] / sum;
    }
}

// One input of a Concat into its place: 0 elements, 1 run (the input's elements per outer
// index), 2 the output's run, 3 offset of this input in the output's run.
@compute @workgroup_size(64)
fn concat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = linear(gid, groups);
    if (i >= u(0u)) {
        return;
    }
    let run = u(1u);
    y[(i / run) * u(2u) + u(3u) + i % run] = x[i];
}

// Slice as a gather over 6 axes: 0 elements, 1-6 output dims, 7-12 signed input steps per
// output step, 13 the first element's input index.
@compute @workgroup_size(64)
fn slice(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = linear(gid, groups);
    if (i >= u(0u)) {
        return;
    }
    var r = i;
    var at = s(13u);
    for (var k = 0u; k < 6u; k++) {
        let axis = 5u - k;
        let dim = u(1u + axis);
        at += i32(r % dim) * s(7u + axis);
        r = r / dim;
    }
    y[i] = x[u32(at)];
}

// Pad over 6 axes: 0 elements, 1-6 output dims, 7-12 input dims, 13-18 begin pads (signed),
// 19 mode (0 constant, 1 reflect, 2 edge), 20 value (float bits).
@compute @workgroup_size(64)
fn pad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = linear(gid, groups);
    if (i >= u(0u)) {
        return;
    }
    var r = i;
    var at = 0u;
    var stride = 1u;
    var outside = false;
    for (var k = 0u; k < 6u; k++) {
        let axis = 5u - k;
        let n = i32(u(7u + axis));
        var v = i32(r % u(1u + axis)) - s(13u + axis);
        r = r / u(1u + axis);
        if (v < 0 || v >= n) {
            let mode = u(19u);
            if (mode == 0u) {
                outside = true;
            } else if (mode == 2u) {
                v = clamp(v, 0, n - 1);
            } else {
                let period = 2 * (n - 1);
                v = ((v % period) + period) % period;
                if (v >= n) {
                    v = period - v;
                }
            }
        }
        at += u32(v) * stride;
        stride *= u32(n);
    }
    if (outside) {
        y[i] = f(20u);
    } else {
        y[i] = x[at];
    }
}

// Resize along one axis: 0 elements, 1 input length, 2 output length, 3 inner (elements after
// the axis); per output index, taps in w: first and second input index (bits) and weights.
@compute @workgroup_size(64)
fn resize_axis(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = linear(gid, groups);
    if (i >= u(0u)) {
        return;
    }
    let inner = u(3u);
    let n_out = u(2u);
    let within = i % inner;
    let o = (i / inner) % n_out;
    let outer = i / (inner * n_out);
    let base = outer * u(1u);
    let t0 = bitcast<u32>(w[o * 4u]);
    let t1 = bitcast<u32>(w[o * 4u + 1u]);
    let w0 = w[o * 4u + 2u];
    let w1 = w[o * 4u + 3u];
    var out = w0 * x[(base + t0) * inner + within];
    if (w1 != 0.0) {
        out += w1 * x[(base + t1) * inner + within];
    }
    y[i] = out;
}
