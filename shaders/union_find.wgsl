// Union-find over the voxels of a box, shared by connected components and the watershed.
// parent[i] == i marks a root, NONE a voxel that is not a node. Links always point to a smaller
// index (atomicMin), so there are no cycles, the root of a set is its smallest voxel and the result
// does not depend on the order threads run in.

const NONE: u32 = 0xffffffffu;
const GROUP: u32 = 64u;

@group(0) @binding(1) var<storage, read_write> parent: array<atomic<u32>>;

// Invocation index over a dispatch that may be split across two grid dimensions.
fn invocation(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.x + gid.y * groups.x * GROUP;
}

fn position(i: u32, size: vec3<u32>) -> vec3<u32> {
    return vec3<u32>(i % size.x, (i / size.x) % size.y, i / (size.x * size.y));
}

// No path compression while uniting: measured on lavapipe, halving paths with atomicMin made
// 26-connected components 35% slower and the watershed no faster. `flatten` points every node
// at its root at the end.
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

// Points every node straight at its root (the host reads roots from `parent`).
@compute @workgroup_size(64)
fn flatten(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = invocation(gid, groups);
    if i >= arrayLength(&parent) {
        return;
    }
    if atomicLoad(&parent[i]) != NONE {
        atomicStore(&parent[i], find(i));
    }
}
