//! The relabel stage: writes a block's output chunks through its relabel table.

use super::format::*;
use super::number::{self, decode_ranks};
use super::union::block_of;
use super::{Passes, StagedError, StagedWork};
use crate::geometry::{voxels, Box3};
use crate::gpu::GpuContext;
use crate::task::segment::{write_output, Layout, SegmentReport};
use crate::task::spec::StagedPlan;
use crate::task::stitch::{ChunkGrid, LabelBoxes};
use std::collections::HashMap;
use std::sync::Arc;

/// A block's labels kept as the (label, run length) pairs its block task stored, read row by row
/// through the block's relabel table: the relabel stage never expands the block to a word per
/// voxel (34 MB for 512x256x64) only to cut it into output chunks.
pub(super) struct RunLabels {
    pub(super) block: Box3,
    pub(super) runs: Vec<u32>,
    /// Per row of the block (y, then z): the pair holding the row's first voxel, and how many of
    /// that run's voxels lie before the row.
    pub(super) rows: Vec<(u32, u32)>,
    pub(super) label_of: Vec<u32>,
}

impl RunLabels {
    /// Fails unless the runs are nonempty, cover exactly the block's voxels, and every label
    /// has an entry in `label_of` (label l is written as `label_of[l - 1]`, 0 stays 0).
    pub(super) fn new(
        key: &str,
        block: Box3,
        runs: Vec<u32>,
        label_of: Vec<u32>,
    ) -> Result<RunLabels, StagedError> {
        let corrupt = |why: String| StagedError::Corrupt {
            key: key.to_string(),
            why,
        };
        if !runs.len().is_multiple_of(2) {
            return Err(corrupt("an odd number of run words".into()));
        }
        let shape = block.shape();
        let width = shape[0];
        let total = voxels(shape);
        let mut rows = Vec::with_capacity(shape[1] * shape[2]);
        let mut at = 0usize;
        for (i, pair) in runs.chunks_exact(2).enumerate() {
            let (label, n) = (pair[0], pair[1] as usize);
            if n == 0 || at + n > total {
                return Err(corrupt(format!(
                    "runs cover more than the block's {total} voxels (or an empty run)"
                )));
            }
            if label as usize > label_of.len() {
                return Err(corrupt(format!(
                    "label {label}, the block's table has {}",
                    label_of.len()
                )));
            }
            // The rows that begin inside this run.
            let mut row_start = rows.len() * width;
            while row_start < at + n {
                rows.push((i as u32, (row_start - at) as u32));
                row_start += width;
            }
            at += n;
        }
        if at != total {
            return Err(corrupt(format!(
                "runs cover {at} of the block's {total} voxels"
            )));
        }
        Ok(RunLabels {
            block,
            runs,
            rows,
            label_of,
        })
    }

    /// Writes `out.len()` labels of row (y, z) from x = `x` (block coordinates) into `out`.
    pub(super) fn row_into(&self, row: usize, x: usize, out: &mut [u32]) {
        let (pair, before) = self.rows[row];
        let mut pair = pair as usize;
        // Voxels of the current run to pass over before `x`.
        let mut skip = before as usize + x;
        while skip >= self.runs[2 * pair + 1] as usize {
            skip -= self.runs[2 * pair + 1] as usize;
            pair += 1;
        }
        let mut filled = 0;
        while filled < out.len() {
            let (label, n) = (self.runs[2 * pair], self.runs[2 * pair + 1] as usize);
            let take = (n - skip).min(out.len() - filled);
            let value = if label == 0 {
                0
            } else {
                self.label_of[label as usize - 1]
            };
            out[filled..filled + take].fill(value);
            filled += take;
            skip = 0;
            pair += 1;
        }
    }
}

impl LabelBoxes for RunLabels {
    fn labels_in(&self, b: Box3) -> Vec<u32> {
        let mut out = vec![0u32; voxels(b.shape())];
        let part = self.block.intersect(&b);
        if part.is_empty() {
            return out;
        }
        let (shape, inner) = (self.block.shape(), b.shape());
        let width = part.shape()[0];
        let x = part.start[0] - self.block.start[0];
        for z in part.start[2]..part.stop[2] {
            for y in part.start[1]..part.stop[1] {
                let row = (y - self.block.start[1]) + shape[1] * (z - self.block.start[2]);
                let to = (part.start[0] - b.start[0])
                    + inner[0] * ((y - b.start[1]) + inner[1] * (z - b.start[2]));
                self.row_into(row, x, &mut out[to..to + width]);
            }
        }
        out
    }
}

/// Writes block `b`'s output chunks from its labels (the labels object's payload) through
/// `table` (label l -> `table[l - 1]`), then its done marker.
async fn write_block<W: StagedWork>(
    plan: &StagedPlan<W>,
    layout: &Layout,
    b: usize,
    (labels, table): (Vec<u8>, Vec<u32>),
    staging: &Staging,
    gpu: Option<Arc<GpuContext>>,
    mut passes: Passes,
) -> Result<SegmentReport, StagedError> {
    let block = ChunkGrid {
        region: layout.grid.region,
        chunk: plan.block_size,
    }
    .core(b);
    let labels_key = staging.key(Kind::Labels, b);
    let runs = decode_runs(&labels_key, &labels)?;
    let labels = RunLabels::new(&labels_key, block, runs, table)?;
    passes.done("labels");
    let written = write_output(
        layout,
        Arc::new(labels),
        plan.work.chunk_fields().options().write,
        block,
        false,
        gpu,
    )
    .await?;
    staging.put(Kind::Done, b, Vec::new()).await?;
    passes.done("write");
    Ok(SegmentReport {
        voxels: voxels(block.shape()) as u64,
        chunks_written: written,
        passes: passes.into_vec(),
        ..Default::default()
    })
}

/// Relabel stage: each block label's component (what the down-0 or resolve-0 stage wrote)
/// numbered from the ranks of the block that owns it (one read per owner), the block's output
/// chunks written through that table, then its done marker.
pub(super) async fn relabel<W: StagedWork>(
    plan: &StagedPlan<W>,
    layout: &Layout,
    blocks: ChunkGrid,
    b: usize,
    staging: &Staging,
    gpu: Option<Arc<GpuContext>>,
) -> Result<SegmentReport, StagedError> {
    let mut passes = Passes::new();
    let (_, table) = number::read_components(staging, b).await?;
    // Owners in order, each read once; what each names for this block's components.
    let mut wanted: Vec<(usize, u64)> = table
        .component
        .iter()
        .zip(&table.stays)
        .filter(|e| *e.1)
        .map(|(&c, _)| (block_of(&blocks, c), c))
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut number_of: HashMap<u64, u32> = HashMap::with_capacity(wanted.len());
    let owners: Vec<usize> = wanted.chunk_by(|a, b| a.0 == b.0).map(|w| w[0].0).collect();
    for some in owners.chunks(READ_CONCURRENCY) {
        let got = futures::future::try_join_all(some.iter().map(|&o| staging.get(Kind::Ranks, o)))
            .await?;
        for (&owner, bytes) in some.iter().zip(got) {
            let key = staging.key(Kind::Ranks, owner);
            let ranks = decode_ranks(&key, &bytes)?;
            let from = wanted.partition_point(|w| w.0 < owner);
            for &(_, c) in wanted[from..].iter().take_while(|w| w.0 == owner) {
                let at =
                    ranks
                        .binary_search_by_key(&c, |r| r.0)
                        .map_err(|_| StagedError::Corrupt {
                            key: key.clone(),
                            why: format!("component {c} of block {b} has no number"),
                        })?;
                let number = u32::try_from(ranks[at].1).map_err(|_| StagedError::Corrupt {
                    key: key.clone(),
                    why: format!("component {c} numbered {} (past 2^32)", ranks[at].1),
                })?;
                number_of.insert(c, number);
            }
        }
    }
    let remap: Vec<u32> = table
        .component
        .iter()
        .zip(&table.stays)
        .map(|(c, &stays)| if stays { number_of[c] } else { 0 })
        .collect();
    let labels = staging.get(Kind::Labels, b).await?;
    passes.done("read");
    write_block(plan, layout, b, (labels, remap), staging, gpu, passes).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::voxels;

    /// Runs of a dense label array (Fortran order), as a block task stores them.
    fn runs_of(labels: &[u32]) -> Vec<u32> {
        labels
            .chunk_by(|a, b| a == b)
            .flat_map(|run| [run[0], run.len() as u32])
            .collect()
    }

    #[test]
    fn run_labels_read_any_box_as_the_dense_labels_do() {
        let block = Box3::new([4, 8, 2], [17, 13, 9]);
        let shape = block.shape();
        // Runs that cross rows and planes, runs of one voxel, and background.
        let mut seed = 7u32;
        let mut labels = Vec::new();
        while labels.len() < voxels(shape) {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let len = 1 + (seed >> 8) as usize % 23;
            let label = (seed >> 20) % 6;
            labels.extend(std::iter::repeat_n(label, len));
        }
        labels.truncate(voxels(shape));
        let label_of = vec![50, 40, 30, 20, 10];
        let runs = RunLabels::new("k", block, runs_of(&labels), label_of.clone()).unwrap();
        let boxes = [
            block,
            Box3::new([4, 8, 2], [5, 9, 3]),
            Box3::new([16, 12, 8], [17, 13, 9]),
            Box3::new([7, 9, 3], [15, 12, 8]),
            Box3::new([0, 0, 0], [10, 10, 4]),
        ];
        for b in boxes {
            let got = runs.labels_in(b);
            let mut i = 0;
            for z in b.start[2]..b.stop[2] {
                for y in b.start[1]..b.stop[1] {
                    for x in b.start[0]..b.stop[0] {
                        let p = [x, y, z];
                        let want =
                            if (0..3).all(|a| (block.start[a]..block.stop[a]).contains(&p[a])) {
                                let l = labels[(x - 4) + shape[0] * ((y - 8) + shape[1] * (z - 2))];
                                if l == 0 {
                                    0
                                } else {
                                    label_of[l as usize - 1]
                                }
                            } else {
                                0
                            };
                        assert_eq!(got[i], want, "{p:?} in {b:?}");
                        i += 1;
                    }
                }
            }
        }
    }

    #[test]
    fn run_labels_name_runs_that_do_not_fit_the_block() {
        let block = Box3::new([0, 0, 0], [4, 2, 1]);
        let why = |runs: Vec<u32>, table: usize| match RunLabels::new(
            "b.labels",
            block,
            runs,
            vec![1; table],
        ) {
            Err(StagedError::Corrupt { key, why }) => {
                assert_eq!(key, "b.labels");
                why
            }
            _ => panic!("accepted"),
        };
        assert!(why(vec![1, 4, 2, 3], 2).contains("cover 7 of the block's 8"));
        assert!(why(vec![1, 4, 2, 5], 2).contains("more than the block's 8"));
        assert!(why(vec![1, 4, 2, 0, 1, 4], 2).contains("empty run"));
        assert!(why(vec![1, 4, 3, 4], 2).contains("label 3, the block's table has 2"));
        assert!(why(vec![1, 4, 2], 2).contains("odd number"));
    }
}
