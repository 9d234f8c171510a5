// Shared by every downsampling kernel (prepended to each shader at load time).
// All buffers are arrays of u32 words: narrow voxels are packed little-endian, 64-bit voxels are
// (low, high) word pairs, float32 voxels are their bit patterns.

struct Params {
    in_x: u32,
    in_y: u32,
    in_z: u32,
    // 1 for (2,2,1), 2 for (2,2,2).
    fz: u32,
    out_x: u32,
    out_y: u32,
    out_z: u32,
    // Number of output voxels.
    out_n: u32,
    // Right shift of the input sums before they are added (renormalisation).
    carry_shift: u32,
    // Right shift that turns this level's sums into output voxels.
    render_shift: u32,
    // float32: reciprocal of this level's divisor, as bits. Unused elsewhere.
    scale_bits: u32,
    // 1 when the sums of this level are needed by the next one.
    write_sums: u32,
    // float32, single mip: 1 to round the block sum once (tinybrain sums in double there).
    exact_sum: u32,
    // Always 0. XORed into float bits to hide algebraic identities from shader compilers.
    opaque_zero: u32,
    pad1: u32,
    pad2: u32,
}

const WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;

// Flat index of this invocation; 2D dispatches cover more than 65535 workgroups.
fn flat_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

fn out_coord(i: u32) -> vec3<u32> {
    let x = i % p.out_x;
    let t = i / p.out_x;
    return vec3<u32>(x, t % p.out_y, t / p.out_y);
}

fn in_index(x: u32, y: u32, z: u32) -> u32 {
    return x + p.in_x * (y + p.in_y * z);
}
