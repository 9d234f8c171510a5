//! Pyramids of any depth in stages, as igneous plans them: each stage reads the last mip
//! written and adds as many mips as a task within the budget can reach, so that no task has to
//! hold the block that the deepest mip's chunks need at mip 0 (8 mips of (2,2,1) over 128³
//! chunks: 32768x32768x64 voxels).
//!
//! A task holds one tile at a time (plus its mips, the codec buffers and the tile in flight):
//! measured on lavapipe, peak RSS is about [`FIXED_MIB`] plus [`BYTES_PER_TILE_BYTE`] times the
//! tile's source, so `--task-mib` sets the tile; a tile is never smaller than one alignment unit
//! (whole output chunks of every new mip), which is what limits the mips of a stage. A task's
//! extent (how many tiles) is bounded by `--task-mib` of source as before and, with
//! `--task-seconds`, by [`SOURCE_RATE`] (a stage can then run on Lambda's 15 minutes).
//!
//! The output equals one run's that adds every mip from one read, byte for byte, because a
//! stage starts only where that run restarts from the values it writes: mode pooling and uint32
//! averaging compute each mip from the one before; uint8 and uint16 averaging accumulate sums
//! that are floored every [`SumSchedule`] period (4 mips for (2,2,1)), so stages are whole
//! periods; float32 accumulates in float32, where scaling by powers of two is exact, but a
//! stage of one mip sums exactly instead (tinybrain's single-mip path), so no stage has one mip
//! unless the whole run does.

use crate::dtype::DataType;
use crate::formats::precomputed::info::Info;
use crate::ops::downsample::{Method, SumSchedule};
use crate::task::downsample::{
    default_method, least_part_bytes, plan_scales, split_bounds, Bounds, DownsampleOptions,
    TaskError,
};
use serde::Serialize;
use thiserror::Error;

/// Host memory of a downsample task that no plan parameter changes (the process, the GPU
/// driver and its pipelines, the slab buffers): measured 190-225 MiB on lavapipe.
pub const FIXED_MIB: usize = 230;

/// Peak host bytes per source byte of a tile (the tile, its mips, the codec buffers, the next
/// tile read while this one is pooled): measured 2.9-3.4.
pub const BYTES_PER_TILE_BYTE: f64 = 3.5;

/// Source bytes per second a task processes at the least, for time bounds: 2 lavapipe cores
/// downsample uint8 with gzip at about 130 MB/s end to end.
pub const SOURCE_RATE: f64 = 50e6;

#[derive(Debug, Error)]
pub enum PyramidError {
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error(
        "--task-mib {task_mib} is too small for mips {first}..={last}: a tile of them holds at least {least} MiB of source; it needs --task-mib {needed_mib} at least"
    )]
    Budget {
        task_mib: usize,
        first: usize,
        last: usize,
        least: usize,
        needed_mib: usize,
    },
}

/// What a pyramid plan is bounded by.
#[derive(Clone, Copy, Debug)]
pub struct PyramidBudget {
    /// Host memory per task beyond [`FIXED_MIB`]; also the most source a task covers.
    pub task_bytes: usize,
    /// The longest a task should take, at [`SOURCE_RATE`].
    pub seconds: Option<f64>,
}

impl PyramidBudget {
    /// The source of the largest tile.
    pub fn tile_bytes(&self) -> usize {
        (self.task_bytes as f64 / BYTES_PER_TILE_BYTE) as usize
    }

    /// The most source a task covers.
    pub fn task_source_bytes(&self) -> usize {
        match self.seconds {
            Some(s) => self.task_bytes.min((s * SOURCE_RATE) as usize),
            None => self.task_bytes,
        }
    }
}

/// One stage of a pyramid: mips `mip + 1 ..= mip + num_mips` from mip `mip`, in tasks.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stage {
    pub mip: usize,
    pub num_mips: u32,
    /// The source of the stage's tiles.
    pub tile_bytes: usize,
    pub tasks: Vec<Bounds>,
}

impl Stage {
    /// The stage's name, as its manifest is named: `mips-<first>-<last>`.
    pub fn name(&self) -> String {
        format!(
            "mips-{}-{}",
            self.mip + 1,
            self.mip + self.num_mips as usize
        )
    }
}

/// Whether a stage of `k` mips may end where the whole run (`total` mips) would restart from
/// what it wrote, with `left` mips still to go before the stage.
fn restarts_there(
    dtype: DataType,
    method: Method,
    period: u32,
    (k, left, total): (u32, u32, u32),
) -> bool {
    if k == left {
        return !(dtype == DataType::Float32 && method == Method::Average && k == 1 && total > 1);
    }
    match (method, dtype) {
        (Method::Mode, _) | (_, DataType::Uint32) => true,
        (_, DataType::Float32) => k > 1 && left - k > 1,
        _ => k.is_multiple_of(period),
    }
}

/// The stages of `opts` (from `opts.mip`, `opts.num_mips` mips) within `budget`: each as many
/// mips as a tile within the budget reaches and the whole run restarts after.
pub fn plan(
    info: &Info,
    opts: &DownsampleOptions,
    budget: &PyramidBudget,
) -> Result<Vec<Stage>, PyramidError> {
    let method = opts.method.unwrap_or(default_method(info.layer_type));
    let period = SumSchedule::new(info.data_type, opts.factor).period();
    let total = opts.num_mips;
    let tile = budget.tile_bytes();
    let mut stages = Vec::new();
    let mut info = info.clone();
    let (mut mip, mut left) = (opts.mip, total);
    while left > 0 {
        let stage_opts = |k: u32| DownsampleOptions {
            mip,
            num_mips: k,
            ..opts.clone()
        };
        let mut chosen = None;
        let mut least_fitting = None;
        for k in (1..=left).rev() {
            if !restarts_there(info.data_type, method, period, (k, left, total)) {
                continue;
            }
            let least = least_part_bytes(&info, &stage_opts(k))?;
            least_fitting = Some((k, least));
            if least <= tile.max(1) {
                chosen = Some(k);
                break;
            }
        }
        let Some(k) = chosen else {
            let (k, least) = least_fitting.expect("a whole run always restarts");
            return Err(PyramidError::Budget {
                task_mib: budget.task_bytes >> 20,
                first: mip + 1,
                last: mip + k as usize,
                least: least.div_ceil(1 << 20),
                needed_mib: ((least as f64 * BYTES_PER_TILE_BYTE) as usize).div_ceil(1 << 20),
            });
        };
        let o = DownsampleOptions {
            tile_bytes: tile,
            ..stage_opts(k)
        };
        let tasks = split_bounds(&info, &o, budget.task_source_bytes().max(tile))?;
        stages.push(Stage {
            mip,
            num_mips: k,
            tile_bytes: tile,
            tasks,
        });
        info = plan_scales(&info, &o)?.0;
        mip += k as usize;
        left -= k;
    }
    Ok(stages)
}

/// A stage's estimate, as `plan downsample --estimate` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageEstimate {
    pub stage: String,
    pub tasks: usize,
    /// Peak host memory of a task, fixed part included (MiB).
    pub mib: usize,
    /// Seconds of its largest task at [`SOURCE_RATE`].
    pub seconds: f64,
}

/// Every stage's tasks, memory and time, from its plan.
pub fn estimate(stages: &[Stage], budget: &PyramidBudget, elem: usize) -> Vec<StageEstimate> {
    stages
        .iter()
        .map(|s| {
            let largest = s
                .tasks
                .iter()
                .map(|b| {
                    (0..3)
                        .map(|i| (b.stop[i] - b.start[i]) as usize)
                        .product::<usize>()
                })
                .max()
                .unwrap_or(0)
                * elem;
            StageEstimate {
                stage: s.name(),
                tasks: s.tasks.len(),
                mib: FIXED_MIB
                    + ((s.tile_bytes.min(largest) as f64 * BYTES_PER_TILE_BYTE) as usize)
                        .div_ceil(1 << 20),
                seconds: largest.min(budget.task_source_bytes().max(s.tile_bytes)) as f64
                    / SOURCE_RATE,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_end_only_where_one_run_restarts() {
        use DataType::*;
        // uint8 (2,2,1) floors its sums every 4 mips: stages of 4, or what is left.
        let r =
            |dtype, method, (k, left, total)| restarts_there(dtype, method, 4, (k, left, total));
        assert!(r(Uint8, Method::Average, (4, 8, 8)));
        assert!(!r(Uint8, Method::Average, (3, 8, 8)));
        assert!(r(Uint8, Method::Average, (3, 3, 7)));
        // Mode pooling and uint32: anywhere.
        assert!(r(Uint64, Method::Mode, (1, 8, 8)));
        assert!(r(Uint32, Method::Average, (3, 8, 8)));
        // float32: never a stage of one mip, nor one left.
        assert!(!r(Float32, Method::Average, (1, 8, 8)));
        assert!(!r(Float32, Method::Average, (7, 8, 8)));
        assert!(r(Float32, Method::Average, (6, 8, 8)));
        assert!(!r(Float32, Method::Average, (1, 1, 8)));
        assert!(r(Float32, Method::Average, (1, 1, 1)));
    }
}
