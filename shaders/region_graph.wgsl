// Region graph of one box of fragments: for every voxel edge from a core voxel to its -x, -y or
// -z neighbour (core or halo) between two different fragments (0 is background), count the edge
// and add its fixed-point affinity (2^-24 units, src/ops/agglomerate.rs) into an open-addressing
// hash table keyed by the fragment pair.
//
// The host sizes the table from `count` (the number of such voxel edges bounds the number of
// pairs). When one table of that size would not fit a binding, the pairs are split into `parts`
// partitions by a second hash, and `accumulate` runs once per partition into a fresh table.
//
// Keys are claimed write-once with compare-exchange: first the low word (low id + 1, so that 0
// means empty), then, by whichever thread sees that id first, the high id; so every pair owns
// exactly one slot and nothing ever spins. Sums are 64-bit as (low, high) words with an explicit
// carry. Both entry points run one invocation per core voxel (a 3-D dispatch over the core).

struct Params {
    size: vec3<u32>,
    voxels: u32,
    core_start: vec3<u32>,
    // Slots in the table: a power of two.
    capacity: u32,
    core_stop: vec3<u32>,
    // Key-space partitions, and the one this dispatch accumulates.
    parts: u32,
    part: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

// Words per slot, 16 bytes, so that no slot straddles two cache lines: low id + 1, high id,
// count, sum low word. The sums' high words (carries, rare) sit after the slots, one per slot.
const SLOT: u32 = 4u;
// Words per pair `compact` writes: a slot's words, then its sum's high word.
const PACKED_SLOT: u32 = 5u;

// The word after the slots that holds slot `slot`'s carries.
fn carry_word(slot: u32) -> u32 {
    return P.capacity * SLOT + slot;
}

// Slots `compact` has packed so far.
const PACKED: u32 = 2u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> fragments: array<u32>;
@group(0) @binding(2) var<storage, read> aff_x: array<f32>;
@group(0) @binding(3) var<storage, read> aff_y: array<f32>;
@group(0) @binding(4) var<storage, read> aff_z: array<f32>;
@group(0) @binding(5) var<storage, read_write> table: array<atomic<u32>>;
// [0]: 1 when the table overflowed, i.e. a pair found no slot within MAX_PROBES (the host
// retries with more room; it also counts a table more than 3/4 full as overflowed); [1]: voxel
// edges between different fragments (from `count`); [PACKED]: slots `compact` packed.
@group(0) @binding(6) var<storage, read_write> flags: array<atomic<u32>>;
// The filled slots, packed by `compact`: what the host reads back instead of the whole table
// (a few times smaller: the table is sized for the bound on pairs and kept at most 3/4 full).
@group(0) @binding(7) var<storage, read_write> compacted: array<u32>;
// The table's slots as plain words (the same buffer as `table`), for the one load that tells
// whether a slot is the pair's: its key words are written once, so a plain load sees either 0
// (then the compare-exchange decides) or their final value.
@group(0) @binding(8) var<storage, read_write> slots: array<vec4<u32>>;

fn hash(a: u32, b: u32) -> u32 {
    var h = a * 0x9e3779b1u ^ (b + 0x7f4a7c15u + (a << 6u) + (a >> 2u));
    h ^= h >> 16u;
    h *= 0x85ebca6bu;
    h ^= h >> 13u;
    return h;
}

// Independent of `hash` (which picks the slot), so that each partition fills its table evenly.
fn partition_of(a: u32, b: u32) -> u32 {
    var h = (a ^ 0x5bd1e995u) * 0xcc9e2d51u + b * 0x1b873593u;
    h ^= h >> 15u;
    h *= 0x2c1b3c6du;
    h ^= h >> 12u;
    return h % P.parts;
}

// Probes one pair may make before its dispatch counts as overflowed: far more than a table at
// most 3/4 full needs (the host checks that bound after `compact`; linear probing's longest run
// there grows with the log of the table, to some hundreds of slots in the largest tables a
// binding holds), so only a table that filled up stops here, and its dispatch is run again with
// more room. What a full table costs before the flag stops it is bounded by this times the
// invocations in flight.
const MAX_PROBES: u32 = 4096u;

// The value word k holds after trying to claim it for `value` (0 after a spurious failure of the
// weak exchange, which the caller retries).
fn claim(k: u32, value: u32) -> u32 {
    let r = atomicCompareExchangeWeak(&table[k], 0u, value);
    return select(r.old_value, value, r.exchanged);
}

fn quantize(a: f32) -> u32 {
    return u32(round(clamp(a, 0.0, 1.0) * 16777216.0));
}

// The slot of pair (lo, hi), claimed if new; 0xffffffff when the probes ran out (overflow: past
// MAX_PROBES, or once around a small table). One plain load per probe: most edges find their
// pair's slot already claimed, and atomics cost far more than a load.
fn slot_of(lo: u32, hi: u32) -> u32 {
    let mask = P.capacity - 1u;
    var slot = hash(lo, hi) & mask;
    let probes = min(MAX_PROBES, P.capacity);
    for (var probe = 0u; probe < probes; probe++) {
        let seen = slots[slot];
        var low = seen.x;
        if low == 0u {
            low = claim(slot * SLOT, lo + 1u);
        }
        if low == lo + 1u {
            var high = seen.y;
            if high == 0u {
                high = claim(slot * SLOT + 1u, hi);
            }
            if high == hi {
                return slot;
            }
            if high == 0u {
                continue; // a spurious failure: this slot again
            }
        } else if low == 0u {
            continue;
        }
        slot = (slot + 1u) & mask;
    }
    return 0xffffffffu;
}

// Adds one voxel edge of pair (a, b) with quantized affinity q.
fn add_edge(a: u32, b: u32, q: u32) {
    let slot = slot_of(min(a, b), max(a, b));
    if slot == 0xffffffffu {
        atomicStore(&flags[0], 1u);
        return;
    }
    let k = slot * SLOT;
    atomicAdd(&table[k + 2u], 1u);
    let old = atomicAdd(&table[k + 3u], q);
    if old > 0xffffffffu - q {
        atomicAdd(&table[carry_word(slot)], 1u);
    }
}

// The core voxel of this invocation and its index, or false past the core.
fn core_voxel(gid: vec3<u32>) -> vec4<u32> {
    let p = P.core_start + gid;
    if any(p >= P.core_stop) {
        return vec4<u32>(0u, 0u, 0u, 0xffffffffu);
    }
    return vec4<u32>(p, p.x + P.size.x * (p.y + P.size.y * p.z));
}

// The -x, -y, -z neighbours of core voxel p (index i) as indices; 0xffffffff outside the box.
fn backward(p: vec3<u32>, i: u32) -> vec3<u32> {
    let none = 0xffffffffu;
    return vec3<u32>(
        select(none, i - 1u, p.x > 0u),
        select(none, i - P.size.x, p.y > 0u),
        select(none, i - P.size.x * P.size.y, p.z > 0u),
    );
}

fn differs(a: u32, j: u32) -> bool {
    if j == 0xffffffffu {
        return false;
    }
    let b = fragments[j];
    return b != 0u && b != a;
}

var<workgroup> group_edges: atomic<u32>;

@compute @workgroup_size(16, 16, 1)
fn count(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_index) local: u32) {
    // No early return: every invocation reaches the barrier.
    let v = core_voxel(gid);
    if v.w != 0xffffffffu {
        let a = fragments[v.w];
        if a != 0u {
            let n = backward(v.xyz, v.w);
            let k = u32(differs(a, n.x)) + u32(differs(a, n.y)) + u32(differs(a, n.z));
            if k > 0u {
                atomicAdd(&group_edges, k);
            }
        }
    }
    // One global atomic per workgroup: thousands of threads adding to one counter serialize.
    workgroupBarrier();
    if local == 0u {
        let k = atomicLoad(&group_edges);
        if k > 0u {
            atomicAdd(&flags[1], k);
        }
    }
}

// One key-space partition (the usual case) and several: two entry points, so that the
// partition test is compiled only into the second (lavapipe would run it, masked, on every
// voxel).
@compute @workgroup_size(16, 16, 1)
fn accumulate(@builtin(global_invocation_id) gid: vec3<u32>) {
    accumulate_voxel(gid, false);
}

@compute @workgroup_size(16, 16, 1)
fn accumulate_partition(@builtin(global_invocation_id) gid: vec3<u32>) {
    accumulate_voxel(gid, true);
}

// The three edges of a voxel are added by one loop over the ones that join two fragments, not
// by three copies of `add_edge`: lavapipe runs every branch of a shader for every group of eight
// invocations (masked), so code size is time there, and a loop runs only as often as its busiest
// invocation needs. (Summing runs of voxel edges along a boundary first, to insert once per run,
// was measured slower on lavapipe: the divergent run loops cost more than the atomics they save.)
fn accumulate_voxel(gid: vec3<u32>, partitioned: bool) {
    let v = core_voxel(gid);
    if v.w == 0xffffffffu {
        return;
    }
    let i = v.w;
    let a = fragments[i];
    if a == 0u {
        return;
    }
    // Every load first, unconditionally (loads under divergent branches cost lavapipe more than
    // loads all invocations make).
    let n = backward(v.xyz, i);
    let none = 0xffffffffu;
    let b = vec3<u32>(
        select(0u, fragments[select(i, n.x, n.x != none)], n.x != none),
        select(0u, fragments[select(i, n.y, n.y != none)], n.y != none),
        select(0u, fragments[select(i, n.z, n.z != none)], n.z != none),
    );
    let affinity = vec3<f32>(aff_x[i], aff_y[i], aff_z[i]);
    let edge = b != vec3<u32>(0u) & b != vec3<u32>(a);
    var pending = select(0u, 1u, edge.x) | select(0u, 2u, edge.y) | select(0u, 4u, edge.z);
    if partitioned {
        for (var d = 0u; d < 3u; d++) {
            if partition_of(min(a, b[d]), max(a, b[d])) != P.part {
                pending &= ~(1u << d);
            }
        }
    }
    if pending == 0u || atomicLoad(&flags[0]) != 0u {
        return; // nothing to add, or overflowed: the host runs this again with more room
    }
    loop {
        let d = firstTrailingBit(pending);
        pending &= pending - 1u;
        add_edge(a, select(select(b.z, b.y, d == 1u), b.x, d == 0u),
            quantize(select(select(affinity.z, affinity.y, d == 1u), affinity.x, d == 0u)));
        if pending == 0u {
            break;
        }
    }
}

// Table slots each `compact` invocation packs: one counter update per run of slots, not per
// slot (a 1-D dispatch of capacity / RUN invocations, split over two grid dimensions when long).
const RUN: u32 = 16u;

// Copies the filled slots of a run of table slots to the next free places of `compacted`. The
// order is the threads'; the host sorts the pairs anyway.
@compute @workgroup_size(64)
fn compact(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let first = (gid.x + gid.y * groups.x * 64u) * RUN;
    if first >= P.capacity {
        return;
    }
    let last = min(first + RUN, P.capacity);
    var filled = 0u;
    for (var s = first; s < last; s++) {
        filled += u32(atomicLoad(&table[s * SLOT]) != 0u);
    }
    if filled == 0u {
        return;
    }
    var at = atomicAdd(&flags[PACKED], filled) * PACKED_SLOT;
    for (var s = first; s < last; s++) {
        let k = s * SLOT;
        let lo = atomicLoad(&table[k]);
        if lo == 0u {
            continue;
        }
        if at + PACKED_SLOT > arrayLength(&compacted) {
            return; // an overflowed table, which the host discards
        }
        compacted[at] = lo;
        for (var w = 1u; w < SLOT; w++) {
            compacted[at + w] = atomicLoad(&table[k + w]);
        }
        compacted[at + SLOT] = atomicLoad(&table[carry_word(s)]);
        at += PACKED_SLOT;
    }
}
