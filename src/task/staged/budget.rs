//! How big each task of a staged plan is, decided before anything runs: the plan derives the
//! GPU chunk, the input cache and the block from `--task-mib`, so that every per-block task
//! stays within it, and says what every stage's tasks need ([`estimate`]).
//!
//! The model is the per-voxel costs below, measured on the 2-core lavapipe machine with
//! `benches/staged_memory.py` (every task its own process, peak RSS), worst case of the
//! EM-like and noisy-cells data (noisy cells for segment: a fragment per few voxels). A task's
//! peak is its stage's variable part plus the fixed part of the process: [`FIXED_MIB`] for the
//! stages without a GPU, [`FIXED_GPU_MIB`] for block tasks (the GPU driver and its compiled
//! shaders; on lavapipe also its compiler).
//!
//! What grows and what does not:
//! - per-block stages (block, link, down-0, round-0, resolve-0, rank, relabel): the block's
//!   voxels, so `--task-mib` bounds them;
//! - scans: their fan-in of a block's rows, planes or counts, chosen within `--task-mib`;
//! - union and down levels above 0: the label-level records of the components that cross the
//!   faces of the group's children, which grow with the area of those faces (4^l block faces at
//!   level l), never with the volume under them;
//! - round and resolve levels above 0 (segment): what the children could not decide (regions
//!   that touch their faces, and every region whose best edge leads to one, with their edges).
//!   Exact agglomeration forbids a bound tighter than the group's whole region graph: how much
//!   freezes depends on the data (a segment that crosses a face freezes with all its fragments,
//!   so the frozen shell is as thick as the segments are large). The estimate scales what was
//!   measured per face voxel on noisy cells; the plan does not fail on it.

use crate::geometry::{voxels, Vec3};
use crate::task::plan::lcm;
use serde::Serialize;

/// Host memory of a task without a GPU that no plan parameter changes (the process, its
/// runtime, the intermediates' I/O): measured 15-17 MiB.
pub const FIXED_MIB: usize = 20;

/// The same for a block task, with the GPU driver and the compiled shaders: measured 100 MiB
/// (connected components) and 125 MiB (segment) on lavapipe.
pub const FIXED_GPU_MIB: usize = 130;

/// What a kind of work costs per voxel, worst case measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Costs {
    /// Bytes per voxel of a GPU chunk's box (core and margins): the input in flight, the
    /// kernels' buffers (host memory on lavapipe), the labels in flight.
    pub chunk_box: usize,
    /// Bytes per block voxel of the block stage, besides its chunk and cache (labels, the
    /// chunks' partial region graphs, the block's summary and border).
    pub block_stage: usize,
    /// Bytes per block voxel of round 0 (segment: the block's region graph and its
    /// agglomeration, 420-540 measured on noisy cells; 0 without rounds).
    pub round_zero: usize,
    /// Bytes per block voxel of down-0 and resolve-0 (a label's component or fragment each).
    pub down_zero: usize,
    /// Bytes per block voxel of relabel (the block's runs, tables, output chunks in flight).
    pub relabel: usize,
    /// Bytes per voxel of a union or down task's faces (the planes between its children and its
    /// own faces): label-level records of the components that cross them, 5 measured on noisy
    /// cells.
    pub face_voxel: usize,
    /// Bytes per voxel of a round task's faces above level 0 (segment; 0 for work without
    /// rounds): the region graph its children left frozen, measured 330-1800 per face voxel on
    /// noisy cells (9.4 MVx, the most at level 1), a third of that on EM-like data. Not a bound:
    /// how much freezes depends on the data (see the module doc).
    pub round_face_voxel: usize,
    /// Block voxels per second of the slowest per-block stage on the 2-core machine (lavapipe),
    /// for time estimates.
    pub block_rate: f64,
}

/// Segment's costs (noisy cells).
pub const SEGMENT_COSTS: Costs = Costs {
    chunk_box: 150,
    block_stage: 330,
    round_zero: 560,
    down_zero: 28,
    relabel: 48,
    face_voxel: 16,
    round_face_voxel: 1800,
    block_rate: 0.5e6,
};

/// Connected components' costs.
pub const COMPONENTS_COSTS: Costs = Costs {
    chunk_box: 12,
    block_stage: 40,
    round_zero: 0,
    down_zero: 12,
    relabel: 24,
    face_voxel: 16,
    round_face_voxel: 0,
    block_rate: 5e6,
};

/// Bytes per count that a scan task holds (its inputs and their prefixes, 8 bytes each).
const SCAN_BYTES_PER_COUNT: usize = 16;

/// What the plan chose for a budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizing {
    pub chunk: Vec3,
    pub block: Vec3,
    pub cache_bytes: usize,
}

/// What the caller fixed, if anything, and the budget.
#[derive(Clone, Copy, Debug, Default)]
pub struct Budget {
    pub task_bytes: usize,
    /// The GPU chunk core (`--chunk-size`); else the largest default chunk within the budget.
    pub chunk: Option<Vec3>,
    /// The input cache (`--cache-mib`); else an eighth of the budget, at most 1 GiB.
    pub cache_bytes: Option<usize>,
    /// The block (`--block-size`); else the largest near-cubic block within the budget.
    pub block: Option<Vec3>,
    /// The scans' fan-in (`--scan-fan-in`); else what the budget allows.
    pub fan_in: Option<usize>,
}

/// A budget too small for the least task the plan can make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooSmall {
    /// The smallest `--task-mib` that would do.
    pub needed_mib: usize,
    pub block: Vec3,
}

/// The default chunk halved along its longest axis until `fits` (or 16 voxels a side).
fn default_chunk(default: Vec3, fits: impl Fn(Vec3) -> bool) -> Vec3 {
    let mut c = default;
    while !fits(c) && c.iter().any(|&v| v > 16) {
        let a = (0..3).max_by_key(|&a| c[a]).expect("3 axes");
        c[a] /= 2;
    }
    c
}

impl Costs {
    /// Bytes per block voxel of the per-block stage without a GPU that holds the most.
    fn per_block_voxel(&self) -> usize {
        self.round_zero.max(self.down_zero).max(self.relabel)
    }
}

/// The variable bytes of the block stage: its GPU chunk, its cache and its block.
fn block_stage_bytes(costs: &Costs, s: &Sizing, margin: usize) -> usize {
    let chunk_box = voxels(s.chunk.map(|v| v + 2 * margin));
    chunk_box * costs.chunk_box + s.cache_bytes + voxels(s.block) * costs.block_stage
}

/// The variable bytes of the per-block task that needs the most: the block stage, or one
/// without a GPU.
fn block_task_bytes(costs: &Costs, s: &Sizing, margin: usize) -> usize {
    block_stage_bytes(costs, s, margin).max(voxels(s.block) * costs.per_block_voxel())
}

/// Chooses the GPU chunk, the cache and the block of a plan over a region of `extent` voxels
/// with output chunks `out_chunk` and voxels of `resolution` (physical units: blocks grow
/// along their shortest physical side, so that they stay near-cubic and their faces small).
pub fn size(
    costs: &Costs,
    budget: &Budget,
    (extent, out_chunk, resolution): (Vec3, Vec3, [f64; 3]),
    (default, margin): (Vec3, usize),
) -> Result<Sizing, TooSmall> {
    let task = budget.task_bytes;
    let cache_bytes = budget.cache_bytes.unwrap_or((task / 8).min(1 << 30));
    let whole_chunks = |c: Vec3| [0, 1, 2].map(|a| c[a].max(1).next_multiple_of(out_chunk[a]));
    let unit = |c: Vec3| [0, 1, 2].map(|a| lcm(c[a], out_chunk[a]));
    let whole = |c: Vec3| [0, 1, 2].map(|a| extent[a].max(1).next_multiple_of(unit(c)[a]));
    // The least block for a chunk: one chunk (and output chunk), within the region.
    let least = |c: Vec3| {
        let c = whole_chunks(c);
        Sizing {
            chunk: c,
            block: [0, 1, 2].map(|a| unit(c)[a].min(whole(c)[a])),
            cache_bytes,
        }
    };
    // The default chunk shrinks until a block of one chunk fits.
    let chunk = whole_chunks(budget.chunk.unwrap_or_else(|| {
        default_chunk(default, |c| {
            block_task_bytes(costs, &least(c), margin) <= task
        })
    }));
    let whole = whole(chunk);
    let unit = unit(chunk);
    let mut s = Sizing {
        block: budget
            .block
            .map(|b| [0, 1, 2].map(|a| b[a].max(1).next_multiple_of(unit[a])))
            .unwrap_or(least(chunk).block),
        ..least(chunk)
    };
    let fits = |s: &Sizing| block_task_bytes(costs, s, margin) <= task;
    if !fits(&s) {
        // The least budget that holds this block, with its cache (an eighth of the budget
        // unless fixed).
        let rest = block_task_bytes(
            costs,
            &Sizing {
                cache_bytes: 0,
                ..s
            },
            margin,
        );
        let needed = match budget.cache_bytes {
            Some(c) => rest + c,
            None => (rest * 8).div_ceil(7),
        };
        return Err(TooSmall {
            needed_mib: needed.div_ceil(1 << 20),
            block: s.block,
        });
    }
    if budget.block.is_some() {
        return Ok(s);
    }
    loop {
        let mut axes: Vec<usize> = (0..3).filter(|&a| s.block[a] < whole[a]).collect();
        axes.sort_by(|&a, &b| {
            (s.block[a] as f64 * resolution[a]).total_cmp(&(s.block[b] as f64 * resolution[b]))
        });
        let grown = axes.into_iter().find_map(|a| {
            let mut bigger = s;
            bigger.block[a] = (s.block[a] * 2).min(whole[a]);
            fits(&bigger).then_some(bigger)
        });
        match grown {
            Some(bigger) => s = bigger,
            None => return Ok(s),
        }
    }
}

/// The scans' fan-in along x, y and z for blocks of `block` voxels: a scan task holds its
/// fan-in's vectors twice over (inputs and prefixes), of a block's rows (x), of its planes (y)
/// or of one count (z), within `task_bytes`.
pub fn scan_fan_in(block: Vec3, budget: &Budget) -> Vec3 {
    if let Some(f) = budget.fan_in {
        return [f.max(2); 3];
    }
    let fits = |len: usize| (budget.task_bytes / (SCAN_BYTES_PER_COUNT * len)).max(2);
    [fits(block[1] * block[2]), fits(block[2]), fits(1)]
}

/// A stage's tasks and what the largest of them needs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageEstimate {
    pub stage: String,
    pub tasks: u64,
    /// Peak host memory of its largest task, fixed part included (MiB).
    pub mib: u64,
    /// Seconds of its largest task on the 2-core lavapipe machine (0 where negligible).
    pub seconds: f64,
    /// How the stage's tasks grow: with the block (`block`), a scan's fan-in (`fan-in`), the
    /// faces of a group (`faces`), or with what the data leaves undecided (`data`: round and
    /// resolve levels above 0, estimated from measured data, not bounded by the plan).
    pub grows_with: &'static str,
}

/// Every stage of a plan over `extent` voxels cut as `sizing`, with its task count and its
/// largest task's memory and time, without making the tasks (a petavoxel plan has millions).
pub fn estimate(
    costs: &Costs,
    sizing: &Sizing,
    extent: Vec3,
    (margin, fan_in, rounds): (usize, Vec3, bool),
) -> Vec<StageEstimate> {
    let block = sizing.block;
    let counts = [0, 1, 2].map(|a| extent[a].div_ceil(block[a]) as u64);
    let blocks: u64 = counts.iter().product();
    let levels = super::rounds::levels(counts.map(|c| c as usize));
    let top = levels - 1;
    let mib = |bytes: usize, fixed: usize| (bytes.div_ceil(1 << 20) + fixed) as u64;
    let block_voxels = voxels(block);
    let block_seconds = block_voxels as f64 / costs.block_rate;
    let mut out = Vec::new();
    let mut push = |stage: String, tasks: u64, mib: u64, seconds: f64, grows: &'static str| {
        out.push(StageEstimate {
            stage,
            tasks,
            mib,
            seconds,
            grows_with: grows,
        })
    };
    push(
        "block".into(),
        blocks,
        mib(block_stage_bytes(costs, sizing, margin), FIXED_GPU_MIB),
        block_seconds,
        "block",
    );
    // Link reads its block's border and 26 neighbours': a few block faces.
    let face = |b: Vec3| 2 * (b[0] * b[1] + b[1] * b[2] + b[0] * b[2]);
    push(
        "link".into(),
        blocks,
        mib(27 * face(block) * 16, FIXED_MIB),
        0.0,
        "block",
    );
    let groups = |level: u32| -> u64 {
        counts
            .iter()
            .map(|&c| c.div_ceil(1 << level))
            .product::<u64>()
    };
    // A group's faces and the three planes between its children: what its records cross.
    let child_faces = |level: u32| -> usize {
        let group = [0, 1, 2].map(|a| (block[a] << level).min(extent[a]));
        face(group) * 3 / 2
    };
    for level in 1..=top {
        let bytes = child_faces(level) * costs.face_voxel;
        push(
            format!("union-{level}"),
            groups(level),
            mib(bytes, FIXED_MIB),
            0.0,
            "faces",
        );
    }
    for level in (1..top).rev() {
        let bytes = child_faces(level) * costs.face_voxel;
        push(
            format!("down-{level}"),
            groups(level),
            mib(bytes, FIXED_MIB),
            0.0,
            "faces",
        );
    }
    let down_zero = mib(block_voxels * costs.down_zero, FIXED_MIB);
    push("down-0".into(), blocks, down_zero, 0.0, "block");
    if rounds {
        push(
            "round-0".into(),
            blocks,
            mib(block_voxels * costs.round_zero, FIXED_MIB),
            block_seconds,
            "block",
        );
        // A round's graph is about as many voxels' worth as a block's per face voxel, and
        // takes as long.
        let graph = |level: u32| child_faces(level) * costs.round_face_voxel;
        for level in 1..=top {
            let seconds = graph(level) as f64 / costs.round_zero as f64 / costs.block_rate;
            push(
                format!("round-{level}"),
                groups(level),
                mib(graph(level), FIXED_MIB),
                seconds,
                "data",
            );
        }
        for level in (1..top).rev() {
            // A resolve task holds its map and its parent's finals, about a tenth of the graph.
            let bytes = graph(level + 1) / 10;
            push(
                format!("resolve-{level}"),
                groups(level),
                mib(bytes, FIXED_MIB),
                0.0,
                "data",
            );
        }
        push("resolve-0".into(), blocks, down_zero, 0.0, "block");
    }
    let scans = super::number::Scans {
        counts: counts.map(|c| c as usize),
        fan_in,
    };
    let vector = [block[1] * block[2], block[2], 1];
    for (axis, name) in ["x", "y", "z"].into_iter().enumerate() {
        for level in 0..scans.levels(axis) {
            let units = fan_in[axis].min(scans.units(axis, level as i64 - 1));
            let bytes = units * vector[axis] * SCAN_BYTES_PER_COUNT;
            push(
                format!("scan-{name}-{level}"),
                scans.tasks(axis, level) as u64,
                mib(bytes, FIXED_MIB),
                0.0,
                "fan-in",
            );
        }
    }
    push("rank".into(), blocks, down_zero, 0.0, "block");
    push(
        "relabel".into(),
        blocks,
        mib(block_voxels * costs.relabel, FIXED_MIB),
        block_seconds / 10.0,
        "block",
    );
    push("finalize".into(), 1, FIXED_MIB as u64, 0.0, "block");
    out
}

/// The estimate as the plan command prints it: the sizing, then a line per stage, then the
/// totals.
pub fn describe(sizing: &Sizing, stages: &[StageEstimate]) -> String {
    let mut out = format!(
        "blocks of {:?} voxels, GPU chunks of {:?}, input cache {} MiB\n",
        sizing.block,
        sizing.chunk,
        sizing.cache_bytes >> 20
    );
    out += &format!(
        "{:<12} {:>12} {:>12} {:>12}  {}\n",
        "stage", "tasks", "MiB/task", "s/task", "grows with"
    );
    for s in stages {
        out += &format!(
            "{:<12} {:>12} {:>12} {:>12.1}  {}\n",
            s.stage, s.tasks, s.mib, s.seconds, s.grows_with
        );
    }
    let tasks: u64 = stages.iter().map(|s| s.tasks).sum();
    let seconds: f64 = stages.iter().map(|s| s.tasks as f64 * s.seconds).sum();
    out += &format!(
        "{} stages, {tasks} tasks, about {:.0} task-hours on the 2-core lavapipe machine; the \
         largest task {} MiB\n",
        stages.len(),
        seconds / 3600.0,
        stages.iter().map(|s| s.mib).max().unwrap_or(0)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_grow_near_cubic_within_the_budget_and_too_small_budgets_say_what_would_do() {
        let budget = Budget {
            task_bytes: 4096 << 20,
            ..Default::default()
        };
        let geometry = ([100_000, 80_000, 20_000], [128, 128, 64], [8.0, 8.0, 40.0]);
        let s = size(&SEGMENT_COSTS, &budget, geometry, ([256, 256, 64], 3)).unwrap();
        assert!(block_task_bytes(&SEGMENT_COSTS, &s, 3) <= budget.task_bytes);
        // Physically near-cubic: 8 nm voxels in x and y, 40 in z.
        let physical = [0, 1, 2].map(|a| s.block[a] as f64 * geometry.2[a]);
        let (lo, hi) = (
            physical.iter().copied().fold(f64::MAX, f64::min),
            physical.iter().copied().fold(0.0, f64::max),
        );
        assert!(hi / lo <= 2.5, "{:?} voxels, {physical:?} nm", s.block);
        // Doubling any axis would not fit.
        for a in 0..3 {
            let mut bigger = s;
            bigger.block[a] *= 2;
            assert!(block_task_bytes(&SEGMENT_COSTS, &bigger, 3) > budget.task_bytes);
        }
        // The cache is an eighth of the budget, the chunk within half.
        assert_eq!(s.cache_bytes, 512 << 20);
        let tiny = Budget {
            task_bytes: 1 << 20,
            ..Default::default()
        };
        let e = size(&SEGMENT_COSTS, &tiny, geometry, ([256, 256, 64], 3)).unwrap_err();
        let enough = Budget {
            task_bytes: e.needed_mib << 20,
            ..Default::default()
        };
        assert!(size(&SEGMENT_COSTS, &enough, geometry, ([256, 256, 64], 3)).is_ok());
        assert!(e.needed_mib > 1);
    }

    #[test]
    fn estimates_count_every_stage_and_grow_with_faces_not_volume_for_union_levels() {
        let budget = Budget {
            task_bytes: 4096 << 20,
            ..Default::default()
        };
        let geometry = |extent| (extent, [128, 128, 64], [8.0, 8.0, 40.0]);
        let small = [4_000, 4_000, 4_000];
        let s = size(
            &COMPONENTS_COSTS,
            &budget,
            geometry(small),
            ([256, 256, 64], 1),
        )
        .unwrap();
        let fan_in = scan_fan_in(s.block, &budget);
        let e = estimate(&COMPONENTS_COSTS, &s, small, (1, fan_in, false));
        let blocks = e[0].tasks;
        assert_eq!(e[0].stage, "block");
        assert_eq!(
            blocks,
            (0..3)
                .map(|a| small[a].div_ceil(s.block[a]) as u64)
                .product::<u64>()
        );
        assert!(
            e.iter().all(|st| st.mib <= 4096 + FIXED_GPU_MIB as u64),
            "{e:?}"
        );
        assert!(e.iter().any(|st| st.stage.starts_with("union-")));
        assert_eq!(e.last().map(|st| st.stage.as_str()), Some("finalize"));
    }
}
