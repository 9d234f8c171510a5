// Seeded watershed of one box of an affinity graph. The rules are those of src/ops/watershed.rs,
// which documents them; this file follows its steps:
//   edges:    candidate directions (or background) of every voxel;
//   exits:    bidirectional bits and the exit flag; every core exit points at the neighbour it
//             descends to, every other voxel at itself; lists the core plateau voxels;
//   relax:    (repeated until nothing changes) steps to the nearest exit over plateau voxels of
//             the core, and taint: whether the plateau reaches a plateau voxel outside the core,
//             whose distance this box cannot know;
//   point:    plateau voxels point one step nearer their exit; tainted voxels are listed for
//             the host, which resolves such plateaus across chunks; plateaus without an exit join
//             along all their edges (union-find);
//   unite_saturated: saturated plateaus join along all their edges too;
//   descend:  every voxel follows its pointers to their end (path halving) and writes its root
//             + 1 (0: background) as its key, which the region-graph kernels read directly.
//
// Pointers form a forest: along descents affinities strictly increase, and plateau steps
// strictly decrease the distance to an exit. Its roots are halo voxels, tainted voxels and the
// voxels of exitless plateaus; only those are ever linked by union-find, always to a smaller
// index (atomicMin), so the result does not depend on the order threads run in. Descending is
// therefore plain loads and stores, with no atomics on the common path.
// Directions in waterz's order: 0 -z, 1 -y, 2 -x, 3 +z, 4 +y, 5 +x.

struct Params {
    size: vec3<u32>,
    voxels: u32,
    core_start: vec3<u32>,
    low: f32,
    core_stop: vec3<u32>,
    high: f32,
    // x: length of plateau_list (the host reads it back after `exits`), for the list kernels:
    // a uniform, not the atomic counter, which shares a cache line with the flags they write.
    tail: vec4<u32>,
}

const NONE: u32 = 0xffffffffu;
const GROUP: u32 = 64u;
const BIDIR_SHIFT: u32 = 6u;
const EXIT: u32 = 0x1000u;
const BACKGROUND: u32 = 0x2000u;
// m >= high: every candidate edge is >= high, hence bidirectional, and so is every edge of the
// neighbours it reaches: such a plateau never has an exit. It needs no distances and no taint,
// and it joins along all its edges whether or not it crosses the core (an optimisation only: the
// CPU reference reaches the same result through its distances, which stay FAR there).
const SATURATED: u32 = 0x4000u;
const CORE: u32 = 0x8000u;
const FAR: u32 = 0xffffffffu;
// The plateau-list counter: a cache line away from the flags other threads read.
const PLATEAUS: u32 = 16u;

@group(0) @binding(0) var<uniform> P: Params;
// Union-find view of the pointers (only roots are ever linked).
@group(0) @binding(1) var<storage, read_write> parent: array<atomic<u32>>;
@group(0) @binding(2) var<storage, read> aff_x: array<f32>;
@group(0) @binding(3) var<storage, read> aff_y: array<f32>;
@group(0) @binding(4) var<storage, read> aff_z: array<f32>;
// Candidate bits (edges); then, reused by `descend`, each voxel's key (root + 1, 0: background).
@group(0) @binding(5) var<storage, read_write> candidates: array<u32>;
@group(0) @binding(6) var<storage, read_write> info: array<u32>;
// Core plateau voxels only: [0, voxels): distance to the nearest exit; [voxels, 2 voxels):
// taint (0 or 1). Only a voxel's own invocation writes its words, and distances only fall and
// taints only rise, so plain loads of a neighbour's words (old or new) converge all the same.
@group(0) @binding(7) var<storage, read_write> relax_state: array<u32>;
// [0]: something changed in this relaxation round; [1]: voxels left to the host;
// [3]: 1 if the core has saturated voxels; [PLATEAUS]: length of plateau_list.
@group(0) @binding(8) var<storage, read_write> flags: array<atomic<u32>>;
// The core plateau voxels (not saturated): the only ones relaxation visits, so its rounds cost
// what the plateaus hold, not the whole box.
@group(0) @binding(9) var<storage, read_write> plateau_list: array<u32>;
// The pointers as plain words, for `descend` (the same buffer as `parent`).
@group(0) @binding(10) var<storage, read_write> pointer: array<u32>;
// The tainted voxels `point` leaves to the host, flags[1] of them, two words each: the voxel's
// index, then its bidirectional directions | those that lead to an exit << 8. The host reads
// these instead of the whole box's info and taint.
@group(0) @binding(11) var<storage, read_write> deferred: array<u32>;


fn index_of(p: vec3<u32>) -> u32 {
    return p.x + P.size.x * (p.y + P.size.y * p.z);
}

fn in_core(p: vec3<u32>) -> bool {
    return all(p >= P.core_start) && all(p < P.core_stop);
}

// The neighbour of voxel i in direction d; only called for edges that exist.
fn step(i: u32, d: u32) -> u32 {
    switch d {
        case 0u: { return i - P.size.x * P.size.y; }
        case 1u: { return i - P.size.x; }
        case 2u: { return i - 1u; }
        case 3u: { return i + P.size.x * P.size.y; }
        case 4u: { return i + P.size.x; }
        default: { return i + 1u; }
    }
}

// 1-D dispatches (over the plateau list) may be split across two grid dimensions.
fn invocation(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.x + gid.y * groups.x * GROUP;
}

@compute @workgroup_size(16, 16, 1)
fn edges(@builtin(global_invocation_id) p: vec3<u32>) {
    if any(p >= P.size) {
        return;
    }
    let i = index_of(p);
    let sxy = P.size.x * P.size.y;
    var a: array<f32, 6>;
    var present = array<bool, 6>(
        p.z > 0u, p.y > 0u, p.x > 0u,
        p.z + 1u < P.size.z, p.y + 1u < P.size.y, p.x + 1u < P.size.x,
    );
    // -z, -y, -x edges live at the voxel itself; +z, +y, +x at the neighbour. Loaded whether
    // or not the edge exists (from the voxel itself when it does not; the value is then
    // unused): lavapipe runs invocations in lockstep, where loads under divergent branches
    // cost far more than loads every lane makes.
    a[0] = aff_z[i];
    a[1] = aff_y[i];
    a[2] = aff_x[i];
    a[3] = aff_z[select(i, i + sxy, present[3])];
    a[4] = aff_y[select(i, i + P.size.x, present[4])];
    a[5] = aff_x[select(i, i + 1u, present[5])];
    var m = -1.0e38;
    var any_edge = false;
    for (var d = 0u; d < 6u; d++) {
        if present[d] {
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

@compute @workgroup_size(16, 16, 1)
fn exits(@builtin(global_invocation_id) p: vec3<u32>) {
    if any(p >= P.size) {
        return;
    }
    let i = index_of(p);
    let c = candidates[i];
    let core = in_core(p);
    let core_bit = select(0u, CORE, core);
    if (c & BACKGROUND) != 0u {
        info[i] = c | core_bit;
        pointer[i] = NONE;
        return;
    }
    // The neighbours' candidate bits, loaded by every lane (from the voxel itself where the
    // edge is not a candidate, which then counts for nothing).
    let sxy = P.size.x * P.size.y;
    let w = array<u32, 6>(
        candidates[select(i, i - sxy, (c & 1u) != 0u)],
        candidates[select(i, i - P.size.x, (c & 2u) != 0u)],
        candidates[select(i, i - 1u, (c & 4u) != 0u)],
        candidates[select(i, i + sxy, (c & 8u) != 0u)],
        candidates[select(i, i + P.size.x, (c & 16u) != 0u)],
        candidates[select(i, i + 1u, (c & 32u) != 0u)],
    );
    var bidir = 0u;
    for (var d = 0u; d < 6u; d++) {
        let back = (w[d] & BACKGROUND) == 0u && (w[d] & (1u << ((d + 3u) % 6u))) != 0u;
        bidir |= select(0u, 1u << d, (c & (1u << d)) != 0u && back);
    }
    let out = c & 0x3fu & ~bidir;
    let exit = out != 0u;
    info[i] = c | (bidir << BIDIR_SHIFT) | select(0u, EXIT, exit) | core_bit;
    // Halo voxels are roots: their own chunks decide where they lead.
    var to = i;
    if exit && core {
        to = step(i, 31u - countLeadingZeros(out));
    }
    pointer[i] = to;
    if !exit && core {
        if (c & SATURATED) != 0u {
            if atomicLoad(&flags[3]) == 0u {
                atomicStore(&flags[3], 1u);
            }
        } else {
            relax_state[i] = FAR;
            relax_state[P.voxels + i] = 0u;
            plateau_list[atomicAdd(&flags[PLATEAUS], 1u)] = i;
        }
    }
}

// A bidirectional neighbour's (distance, taint) as a plateau voxel of the core sees it: exits are
// at distance 0; a plateau voxel outside the core has a distance this box cannot know (taint).
fn state_of(j: u32) -> vec2<u32> {
    let w = info[j];
    if (w & EXIT) != 0u {
        return vec2<u32>(0u, 0u);
    }
    if (w & CORE) == 0u {
        return vec2<u32>(FAR, 1u);
    }
    return vec2<u32>(relax_state[j], relax_state[P.voxels + j]);
}

@compute @workgroup_size(64)
fn relax(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let k = invocation(gid, groups);
    if k >= P.tail.x {
        return;
    }
    let i = plateau_list[k];
    let bidir = (info[i] >> BIDIR_SHIFT) & 0x3fu;
    let here = relax_state[i];
    let tainted = relax_state[P.voxels + i];
    var best = here;
    var taint = tainted;
    for (var d = 0u; d < 6u; d++) {
        if (bidir & (1u << d)) != 0u {
            let s = state_of(step(i, d));
            if s.x != FAR && s.x + 1u < best {
                best = s.x + 1u;
            }
            taint = max(taint, s.y);
        }
    }
    let changed = best < here || taint > tainted;
    if changed {
        relax_state[i] = best;
        relax_state[P.voxels + i] = taint;
        // Read before writing: once one thread has set the flag, the others only read it.
        if atomicLoad(&flags[0]) == 0u {
            atomicStore(&flags[0], 1u);
        }
    }
}

// No path compression while uniting (unions are rare here: exitless plateaus only).
fn find(start: u32) -> u32 {
    var x = start;
    loop {
        let p = atomicLoad(&parent[x]);
        if p == x {
            return x;
        }
        x = p;
    }
    return x;
}

fn unite(a0: u32, b0: u32) {
    var a = find(a0);
    var b = find(b0);
    loop {
        if a == b {
            return;
        }
        let hi = max(a, b);
        let lo = min(a, b);
        let old = atomicMin(&parent[hi], lo);
        if old == hi {
            return;
        }
        // hi had been linked to `old` meanwhile; it now points to min(old, lo): join old and lo.
        a = find(old);
        b = find(lo);
    }
}

@compute @workgroup_size(64)
fn point(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let k = invocation(gid, groups);
    if k >= P.tail.x {
        return;
    }
    let i = plateau_list[k];
    let bidir = (info[i] >> BIDIR_SHIFT) & 0x3fu;
    if relax_state[P.voxels + i] != 0u {
        var to_exit = 0u;
        for (var d = 0u; d < 6u; d++) {
            if (bidir & (1u << d)) != 0u && (info[step(i, d)] & EXIT) != 0u {
                to_exit |= 1u << d;
            }
        }
        let at = 2u * atomicAdd(&flags[1], 1u);
        deferred[at] = i;
        deferred[at + 1u] = bidir | (to_exit << 8u);
        return;
    }
    let here = relax_state[i];
    if here != FAR {
        for (var k = 0u; k < 6u; k++) {
            let d = 5u - k;
            if (bidir & (1u << d)) != 0u {
                let j = step(i, d);
                if state_of(j).x == here - 1u {
                    atomicStore(&parent[i], j);
                    return;
                }
            }
        }
        return;
    }
    // An exitless plateau inside the core: its voxels are all roots until joined here. Edges
    // are symmetric and every voxel of the plateau is listed, so each joins along its -z, -y,
    // -x edges only.
    for (var d = 0u; d < 3u; d++) {
        if (bidir & (1u << d)) != 0u {
            unite(i, step(i, d));
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn unite_saturated(@builtin(global_invocation_id) gid: vec3<u32>) {
    let p = P.core_start + gid;
    if any(p >= P.core_stop) {
        return;
    }
    let i = index_of(p);
    let v = info[i];
    // The -x and the -y, -z neighbours' words, loaded by every lane (from the voxel itself
    // where the neighbour is not in the core, which then counts for nothing).
    let sxy = P.size.x * P.size.y;
    let inner = p > P.core_start;
    let left = info[select(i, i - 1u, inner.x)];
    let back_y = info[select(i, i - P.size.x, inner.y)];
    let back_z = info[select(i, i - sxy, inner.z)];
    if (v & SATURATED) == 0u || (v & BACKGROUND) != 0u {
        return;
    }
    // Edges are symmetric: each core voxel joins along its -z, -y, -x edges, and along +z, +y,
    // +x edges only where they leave the core (no halo voxel runs this).
    let bidir = (v >> BIDIR_SHIFT) & 0x3fu;
    let leaves = select(0u, 8u, p.z + 1u >= P.core_stop.z) | select(0u, 16u, p.y + 1u >= P.core_stop.y)
        | select(0u, 32u, p.x + 1u >= P.core_stop.x);
    var pending = bidir & (7u | leaves);
    // A -y (or -z) edge closes a square whose other three edges other core voxels join: this
    // voxel's -x edge, the -x neighbour's -y (-z) edge and the -y (-z) neighbour's -x edge. All
    // four voxels are saturated (every edge of a saturated voxel at or above `high` is
    // bidirectional), so the edge adds nothing; by induction along x, neither do the ones this
    // rule drops. Inside a saturated plateau that leaves one union per voxel instead of three.
    let left_bidir = (left >> BIDIR_SHIFT) & 0x3fu;
    if inner.x && (pending & 4u) != 0u {
        if inner.y && (left_bidir & 2u) != 0u && ((back_y >> BIDIR_SHIFT) & 4u) != 0u {
            pending &= ~2u;
        }
        if inner.z && (left_bidir & 1u) != 0u && ((back_z >> BIDIR_SHIFT) & 4u) != 0u {
            pending &= ~1u;
        }
    }
    // One loop over the edges left, not six copies of `unite`: lavapipe runs every branch for
    // every group of eight invocations, and a loop only as often as its busiest one needs.
    if pending == 0u {
        return;
    }
    loop {
        let d = firstTrailingBit(pending);
        pending &= pending - 1u;
        unite(i, step(i, d));
        if pending == 0u {
            break;
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn descend(@builtin(global_invocation_id) p: vec3<u32>) {
    if any(p >= P.size) {
        return;
    }
    let i = index_of(p);
    if pointer[i] == NONE {
        candidates[i] = 0u;
        return;
    }
    // Path halving: every store points a voxel at one of its ancestors, which is what other
    // threads may read at any time, so racing walks stay correct and shorten each other's paths.
    var x = i;
    loop {
        let y = pointer[x];
        if y == x {
            break;
        }
        let z = pointer[y];
        if z == y {
            x = y;
            break;
        }
        pointer[x] = z;
        x = z;
    }
    pointer[i] = x;
    candidates[i] = x + 1u;
}
