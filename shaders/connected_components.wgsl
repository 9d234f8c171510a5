// Thresholded connected components of one box (prepended: union_find.wgsl).
// Voxels of the core unite with their earlier neighbours (the same backward offsets as the CPU
// reference); halo voxels around the core are nodes that only core voxels link to, which is how
// chunks are stitched on the host.

struct Params {
    size: vec3<u32>,
    // Most non-zero offset components: 1 (6-connected), 2 (18) or 3 (26).
    max_axes: u32,
    core_start: vec3<u32>,
    threshold: f32,
    core_stop: vec3<u32>,
    voxels: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(2) var<storage, read> values: array<f32>;

fn foreground(i: u32) -> bool {
    return values[i] > P.threshold;
}

@compute @workgroup_size(64)
fn init(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = invocation(gid, groups);
    if i >= P.voxels {
        return;
    }
    atomicStore(&parent[i], select(NONE, i, foreground(i)));
}

@compute @workgroup_size(64)
fn unite_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = invocation(gid, groups);
    if i >= P.voxels || !foreground(i) {
        return;
    }
    let p = vec3<i32>(position(i, P.size));
    if any(vec3<u32>(p) < P.core_start) || any(vec3<u32>(p) >= P.core_stop) {
        return;
    }
    let size = vec3<i32>(P.size);
    for (var dz = -1; dz <= 0; dz++) {
        for (var dy = -1; dy <= 1; dy++) {
            for (var dx = -1; dx <= 1; dx++) {
                let backward = dz < 0 || (dz == 0 && (dy < 0 || (dy == 0 && dx < 0)));
                let axes = u32(dx != 0) + u32(dy != 0) + u32(dz != 0);
                if !backward || axes > P.max_axes {
                    continue;
                }
                let q = p + vec3<i32>(dx, dy, dz);
                if any(q < vec3<i32>(0)) || any(q >= size) {
                    continue;
                }
                let j = u32(q.x) + P.size.x * (u32(q.y) + P.size.y * u32(q.z));
                if foreground(j) {
                    unite(i, j);
                }
            }
        }
    }
}
