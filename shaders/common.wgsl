// Shared by every downsampling kernel (prepended to each shader at load time).
// All buffers are arrays of u32 words: narrow voxels are packed little-endian, 64-bit voxels are
// (low, high) word pairs, float32 voxels are their bit patterns. Rows of voxels start at
// multiples of `in_pitch` / `out_pitch` voxels, so packed rows always start on a word.
// Dispatches are 3D: invocation (x, y, z) handles output row (y, z), so no kernel divides.

struct Params {
    in_x: u32,
    in_y: u32,
    in_z: u32,
    // 1 for (2,2,1), 2 for (2,2,2).
    fz: u32,
    out_x: u32,
    out_y: u32,
    out_z: u32,
    // Row pitch, in voxels, of the source and of the outputs (and sums) of this level.
    in_pitch: u32,
    out_pitch: u32,
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
    pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;

fn in_index(x: u32, y: u32, z: u32) -> u32 {
    return x + p.in_pitch * (y + p.in_y * z);
}

fn out_index(x: u32, y: u32, z: u32) -> u32 {
    return x + p.out_pitch * (y + p.out_y * z);
}

// Input rows (y, z) under output row (oy, oz), clamped at odd edges: row r of 2 (or 4).
fn block_row(oy: u32, oz: u32, r: u32) -> vec2<u32> {
    return vec2<u32>(min(oy * 2u + (r & 1u), p.in_y - 1u), min(oz * p.fz + (r >> 1u), p.in_z - 1u));
}
