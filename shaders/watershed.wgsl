// Seeded watershed of one box of an affinity graph (prepended: union_find.wgsl). The rules are
// those of src/ops/watershed.rs, which documents them; this file follows its steps:
//   edges:   candidate directions (or background) of every voxel;
//   exits:   bidirectional bits and the exit flag; seeds the plateau distances and taint;
//   relax:   (repeated until nothing changes) steps to the nearest exit over plateau voxels of
//            the core, and taint: whether the plateau reaches a plateau voxel outside the core,
//            whose distance this box cannot know;
//   unite:   pointer edges into the union-find; tainted voxels are left to the host, which
//            resolves such plateaus across chunks.
// Directions in waterz's order: 0 -z, 1 -y, 2 -x, 3 +z, 4 +y, 5 +x.

struct Params {
    size: vec3<u32>,
    voxels: u32,
    core_start: vec3<u32>,
    low: f32,
    core_stop: vec3<u32>,
    high: f32,
}

const BIDIR_SHIFT: u32 = 6u;
const EXIT: u32 = 0x1000u;
const BACKGROUND: u32 = 0x2000u;
// m >= high: every candidate edge is >= high, hence bidirectional, and so is every edge of the
// neighbours it reaches: such a plateau never has an exit. It needs no distances and no taint,
// and it joins along all its edges whether or not it crosses the core (an optimisation only: the
// CPU reference reaches the same result through its distances, which stay FAR there).
const SATURATED: u32 = 0x4000u;
const FAR: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(2) var<storage, read> aff_x: array<f32>;
@group(0) @binding(3) var<storage, read> aff_y: array<f32>;
@group(0) @binding(4) var<storage, read> aff_z: array<f32>;
// Candidate bits (edges) and then the full info word (exits).
@group(0) @binding(5) var<storage, read_write> candidates: array<u32>;
@group(0) @binding(6) var<storage, read_write> info: array<u32>;
// [0, voxels): distance to the nearest exit; [voxels, 2 voxels): taint (0 or 1).
@group(0) @binding(7) var<storage, read_write> relax_state: array<atomic<u32>>;
// [0]: something changed in this relaxation round; [1]: voxels left to the host;
// [2]: length of plateau_list.
@group(0) @binding(8) var<storage, read_write> flags: array<atomic<u32>>;
// The core plateau voxels (not saturated): the only ones relaxation visits, so its rounds cost
// what the plateaus hold, not the whole box.
@group(0) @binding(9) var<storage, read_write> plateau_list: array<u32>;

fn in_core(p: vec3<u32>) -> bool {
    return all(p >= P.core_start) && all(p < P.core_stop);
}

// The neighbour in direction d, or NONE outside the box.
fn neighbour(i: u32, d: u32) -> u32 {
    let p = position(i, P.size);
    switch d {
        case 0u: { if p.z == 0u { return NONE; } return i - P.size.x * P.size.y; }
        case 1u: { if p.y == 0u { return NONE; } return i - P.size.x; }
        case 2u: { if p.x == 0u { return NONE; } return i - 1u; }
        case 3u: { if p.z + 1u >= P.size.z { return NONE; } return i + P.size.x * P.size.y; }
        case 4u: { if p.y + 1u >= P.size.y { return NONE; } return i + P.size.x; }
        default: { if p.x + 1u >= P.size.x { return NONE; } return i + 1u; }
    }
}

fn edge_affinity(i: u32, j: u32, d: u32) -> f32 {
    // -z, -y, -x edges live at the voxel itself; +z, +y, +x at the neighbour.
    let at = select(j, i, d < 3u);
    switch d % 3u {
        case 0u: { return aff_z[at]; }
        case 1u: { return aff_y[at]; }
        default: { return aff_x[at]; }
    }
}

@compute @workgroup_size(64)
fn edges(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = invocation(gid, groups);
    if i >= P.voxels {
        return;
    }
    var a: array<f32, 6>;
    var present: array<bool, 6>;
    var m = -1.0e38;
    var any_edge = false;
    for (var d = 0u; d < 6u; d++) {
        let j = neighbour(i, d);
        present[d] = j != NONE;
        if present[d] {
            a[d] = edge_affinity(i, j, d);
            m = max(m, a[d]);
            any_edge = true;
        }
    }
    if !any_edge || !(m > P.low) {
        candidates[i] = BACKGROUND;
        return;
    }
    var bits = select(0u, SATURATED, m >= P.high);
    for (var d = 0u; d < 6u; d++) {
        if present[d] && (a[d] == m || a[d] >= P.high) {
            bits |= 1u << d;
        }
    }
    candidates[i] = bits;
}

@compute @workgroup_size(64)
fn exits(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = invocation(gid, groups);
    if i >= P.voxels {
        return;
    }
    let c = candidates[i];
    if (c & BACKGROUND) != 0u {
        info[i] = c;
        atomicStore(&parent[i], NONE);
        atomicStore(&relax_state[i], FAR);
        atomicStore(&relax_state[P.voxels + i], 0u);
        return;
    }
    var bidir = 0u;
    for (var d = 0u; d < 6u; d++) {
        if (c & (1u << d)) != 0u {
            let w = candidates[neighbour(i, d)];
            if (w & BACKGROUND) == 0u && (w & (1u << ((d + 3u) % 6u))) != 0u {
                bidir |= 1u << d;
            }
        }
    }
    let exit = (c & 0x3fu & ~bidir) != 0u;
    info[i] = c | (bidir << BIDIR_SHIFT) | select(0u, EXIT, exit);
    atomicStore(&parent[i], i);
    atomicStore(&relax_state[i], select(FAR, 0u, exit));
    let plateau = !exit && (c & SATURATED) == 0u;
    let core = in_core(position(i, P.size));
    atomicStore(&relax_state[P.voxels + i], select(0u, 1u, plateau && !core));
    if plateau && core {
        plateau_list[atomicAdd(&flags[2], 1u)] = i;
    }
}

@compute @workgroup_size(64)
fn relax(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let k = invocation(gid, groups);
    if k >= atomicLoad(&flags[2]) {
        return;
    }
    let i = plateau_list[k];
    let bidir = (info[i] >> BIDIR_SHIFT) & 0x3fu;
    let here = atomicLoad(&relax_state[i]);
    let tainted = atomicLoad(&relax_state[P.voxels + i]);
    var best = here;
    var taint = tainted;
    for (var d = 0u; d < 6u; d++) {
        if (bidir & (1u << d)) != 0u {
            let j = neighbour(i, d);
            let dj = atomicLoad(&relax_state[j]);
            if dj != FAR && dj + 1u < best {
                best = dj + 1u;
            }
            taint = max(taint, atomicLoad(&relax_state[P.voxels + j]));
        }
    }
    if best < here {
        atomicMin(&relax_state[i], best);
        atomicStore(&flags[0], 1u);
    }
    if taint > tainted {
        atomicMax(&relax_state[P.voxels + i], taint);
        atomicStore(&flags[0], 1u);
    }
}

@compute @workgroup_size(64)
fn unite_pointers(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = invocation(gid, groups);
    if i >= P.voxels {
        return;
    }
    let v = info[i];
    if (v & BACKGROUND) != 0u || !in_core(position(i, P.size)) {
        return;
    }
    let candidate = v & 0x3fu;
    let bidir = (v >> BIDIR_SHIFT) & 0x3fu;
    if (v & EXIT) != 0u {
        let out = candidate & ~bidir;
        unite(i, neighbour(i, 31u - countLeadingZeros(out)));
        return;
    }
    if atomicLoad(&relax_state[P.voxels + i]) != 0u {
        atomicAdd(&flags[1], 1u);
        return;
    }
    let here = atomicLoad(&relax_state[i]);
    if here != FAR {
        for (var k = 0u; k < 6u; k++) {
            let d = 5u - k;
            if (bidir & (1u << d)) != 0u {
                let j = neighbour(i, d);
                if atomicLoad(&relax_state[j]) == here - 1u {
                    unite(i, j);
                    return;
                }
            }
        }
        return;
    }
    for (var d = 0u; d < 6u; d++) {
        if (bidir & (1u << d)) != 0u {
            unite(i, neighbour(i, d));
        }
    }
}
