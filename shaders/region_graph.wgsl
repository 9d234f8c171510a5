// Region graph of one box of fragments: for every voxel edge of the core between two different
// fragments (0 is background), count the edge and add its fixed-point affinity (2^-24 units,
// src/ops/agglomerate.rs) into an open-addressing hash table keyed by the fragment pair.
// Keys are claimed write-once with compare-exchange: first the low id, then, by whichever thread
// sees that id first, the high id; so every pair owns exactly one slot and nothing ever spins.
// Sums are 64-bit as (low, high) words with an explicit carry.

struct Params {
    size: vec3<u32>,
    voxels: u32,
    core_start: vec3<u32>,
    // Slots in the table: a power of two.
    capacity: u32,
    core_stop: vec3<u32>,
    pad: u32,
}

const SLOT: u32 = 5u; // low id, high id, count, sum low word, sum high word
const GROUP: u32 = 64u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> fragments: array<u32>;
@group(0) @binding(2) var<storage, read> aff_x: array<f32>;
@group(0) @binding(3) var<storage, read> aff_y: array<f32>;
@group(0) @binding(4) var<storage, read> aff_z: array<f32>;
@group(0) @binding(5) var<storage, read_write> table: array<atomic<u32>>;
// [0]: 1 when the table overflowed (the host retries with a bigger one).
@group(0) @binding(6) var<storage, read_write> flags: array<atomic<u32>>;

fn invocation(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.x + gid.y * groups.x * GROUP;
}

fn hash(a: u32, b: u32) -> u32 {
    var h = a * 0x9e3779b1u ^ (b + 0x7f4a7c15u + (a << 6u) + (a >> 2u));
    h ^= h >> 16u;
    h *= 0x85ebca6bu;
    h ^= h >> 13u;
    return h;
}

// Claims word k for `value` if it is empty; returns the value it holds afterwards.
fn claim(k: u32, value: u32) -> u32 {
    loop {
        let r = atomicCompareExchangeWeak(&table[k], 0u, value);
        if r.exchanged {
            return value;
        }
        if r.old_value != 0u {
            return r.old_value;
        }
        // A spurious failure of the weak exchange: try again.
    }
    return 0u;
}

fn quantize(a: f32) -> u32 {
    return u32(round(clamp(a, 0.0, 1.0) * 16777216.0));
}

fn add_edge(a: u32, b: u32, affinity: f32) {
    let lo = min(a, b);
    let hi = max(a, b);
    let mask = P.capacity - 1u;
    var slot = hash(lo, hi) & mask;
    for (var probe = 0u; probe < P.capacity; probe++) {
        let k = slot * SLOT;
        if claim(k, lo) == lo && claim(k + 1u, hi) == hi {
            atomicAdd(&table[k + 2u], 1u);
            let q = quantize(affinity);
            let old = atomicAdd(&table[k + 3u], q);
            if old > 0xffffffffu - q {
                atomicAdd(&table[k + 4u], 1u);
            }
            return;
        }
        slot = (slot + 1u) & mask;
    }
    atomicStore(&flags[0], 1u);
}

@compute @workgroup_size(64)
fn accumulate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = invocation(gid, groups);
    if i >= P.voxels {
        return;
    }
    let a = fragments[i];
    let p = vec3<u32>(i % P.size.x, (i / P.size.x) % P.size.y, i / (P.size.x * P.size.y));
    if a == 0u || any(p < P.core_start) || any(p >= P.core_stop) {
        return;
    }
    if p.x > 0u {
        let b = fragments[i - 1u];
        if b != 0u && b != a { add_edge(a, b, aff_x[i]); }
    }
    if p.y > 0u {
        let b = fragments[i - P.size.x];
        if b != 0u && b != a { add_edge(a, b, aff_y[i]); }
    }
    if p.z > 0u {
        let b = fragments[i - P.size.x * P.size.y];
        if b != 0u && b != a { add_edge(a, b, aff_z[i]); }
    }
}
