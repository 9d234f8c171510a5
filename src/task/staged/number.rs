//! Numbering the components 1..N by first voxel without a task that sees them all.
//!
//! A component's number is one more than the count of components whose first voxel comes
//! before its own in region order (z, then y, then x). The block holding a component's first
//! voxel *owns* it. Region order visits the rows (y, z) of the region one after another, and
//! each row crosses one line of blocks along x, so a component's rank is the sum of:
//!
//! 1. the components owned in earlier slabs of blocks (z),
//! 2. in its slab, those in earlier planes (z),
//! 3. in its plane, those in the lines of blocks before its line (y),
//! 4. in its line, those in earlier rows of the plane,
//! 5. in its row, those of blocks before its block (x),
//! 6. in its block and row, those with a smaller x.
//!
//! Stages, each task bounded by a block's rows or a fan-in of them:
//! - **down-0** (one per block): the component of each block label (its own, or what the down
//!   stage above handed the block for its open labels), whether it stays (dust: connected
//!   components of at least `dust` voxels), and per row of the block how many staying
//!   components it owns (`block-<i>.components`, `block-<i>.rows`).
//! - **scan-x-k, scan-y-k, scan-z-k**: exclusive prefix sums along each axis, in a hierarchy of
//!   fan-in F (so that a task holds at most F vectors): along x of the blocks' row counts
//!   (vectors of a block's rows), along y of each line's per-plane totals (vectors of a
//!   block's planes), along z of each slab's total. Level k's task over F units of level k - 1
//!   writes each unit's prefix within it (`scan-<axis>-<k>-<line>-<unit>.prefix`) and its total
//!   (`...-<segment>.total`); the top level's single segment totals the whole line.
//! - **rank** (one per block): the sums above for its rows, then its owned components in order
//!   (`block-<i>.ranks`: each owned staying component's name and number).
//!
//! The relabel stage then numbers a block's labels from the ranks of the blocks that own their
//! components (usually itself and a few neighbours; one read per owner).
//!
//! Payloads (varints): components: K entries (label name minus component name, times 2, plus 1
//! when it stays); rows and prefix and total: N, N counts; ranks: N, N (component name as an
//! increase, number).

use super::block::Summary;
use super::format::*;
use super::rounds::{check_finals, round_index};
use super::union::{block_coords, FinalRecord, UpRecord};
use super::{Passes, StagedError};
use crate::geometry::{voxels, Vec3};
use crate::ops::watershed::Grid;
use crate::task::segment::SegmentReport;
use crate::task::stitch::ChunkGrid;

/// The hierarchy of prefix sums over a grid of `counts` blocks with fan-in `fan_in` per axis.
#[derive(Clone, Copy, Debug)]
pub(super) struct Scans {
    pub(super) counts: Vec3,
    pub(super) fan_in: Vec3,
}

impl Scans {
    /// Lines along `axis`: x lines are (y, z) lines of blocks, y lines are slabs, z one line.
    pub(super) fn lines(&self, axis: usize) -> usize {
        match axis {
            0 => self.counts[1] * self.counts[2],
            1 => self.counts[2],
            _ => 1,
        }
    }

    /// Units at `level` of a line along `axis`: segments of fan-in units of the level below;
    /// level -1 is the items (blocks along the line).
    pub(super) fn units(&self, axis: usize, level: i64) -> usize {
        let mut n = self.counts[axis];
        for _ in 0..=level {
            n = n.div_ceil(self.fan_in[axis]);
        }
        n
    }

    /// Levels along `axis`: up to the first whose lines are a single segment.
    pub(super) fn levels(&self, axis: usize) -> u32 {
        let mut level = 0;
        while self.units(axis, level as i64) > 1 {
            level += 1;
        }
        level + 1
    }

    /// Tasks of level `level` along `axis`: one per line and segment.
    pub(super) fn tasks(&self, axis: usize, level: u32) -> usize {
        self.lines(axis) * self.units(axis, level as i64)
    }

    /// The unit at `level` that holds item `item` of its line.
    fn unit_of(&self, axis: usize, level: u32, item: usize) -> usize {
        (0..=level).fold(item, |u, _| u / self.fan_in[axis])
    }
}

/// Per block label: its component's name and whether the component stays.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Components {
    pub(super) component: Vec<u64>,
    pub(super) stays: Vec<bool>,
}

impl Components {
    pub(super) fn encode(&self, first: &[u64]) -> Vec<u8> {
        let mut out = Vec::with_capacity(first.len());
        for ((&own, &c), &stays) in first.iter().zip(&self.component).zip(&self.stays) {
            put_varint(&mut out, ((own - c) << 1) | stays as u64);
        }
        out
    }

    /// Decodes the components of a block whose labels have first voxels `first`.
    pub(super) fn decode(
        key: &str,
        bytes: &[u8],
        first: &[u64],
    ) -> Result<Components, StagedError> {
        let mut r = Reader { bytes, at: 0, key };
        let mut out = Components::default();
        for &own in first {
            let v = r.varint()?;
            let c = own
                .checked_sub(v >> 1)
                .ok_or_else(|| r.corrupt(format!("label {own}'s component below 0")))?;
            out.component.push(c);
            out.stays.push(v & 1 == 1);
        }
        r.finish("components")?;
        Ok(out)
    }
}

fn encode_counts(counts: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(counts.len() + 8);
    put_varint(&mut out, counts.len() as u64);
    for &c in counts {
        put_varint(&mut out, c);
    }
    out
}

/// A vector of counts, which must have `expected` entries.
fn decode_counts(key: &str, bytes: &[u8], expected: usize) -> Result<Vec<u64>, StagedError> {
    let mut r = Reader { bytes, at: 0, key };
    let n = r.varint()?;
    if n != expected as u64 {
        return Err(r.corrupt(format!("{n} counts, expected {expected}")));
    }
    let out = (0..n).map(|_| r.varint()).collect::<Result<Vec<_>, _>>()?;
    r.finish("counts")?;
    Ok(out)
}

async fn get_counts(
    staging: &Staging,
    kind: Kind,
    index: usize,
    expected: usize,
) -> Result<Vec<u64>, StagedError> {
    let bytes = staging.get(kind, index).await?;
    decode_counts(&staging.key(kind, index), &bytes, expected)
}

/// The first voxels and sizes of block `b`'s labels.
pub(super) async fn summary(staging: &Staging, b: usize) -> Result<Summary, StagedError> {
    let bytes = staging.get(Kind::Summary, b).await?;
    Summary::decode_counts(&staging.key(Kind::Summary, b), &bytes)
}

/// Block `b`'s first voxels and sizes, and the components the union stages handed it for its
/// open labels (none when `top`, the union hierarchy's top level, is 0: the grid is one block).
pub(super) async fn summary_and_finals(
    blocks: &ChunkGrid,
    top: u32,
    b: usize,
    staging: &Staging,
) -> Result<(Summary, FinalRecord), StagedError> {
    let counts = blocks.counts();
    let summary = summary(staging, b).await?;
    let links_key = staging.key(Kind::Links, b);
    let links = UpRecord::decode(&links_key, &staging.get(Kind::Links, b).await?, counts)?;
    let index = round_index(0, b);
    let key = staging.key(Kind::Final, index);
    let finals = match top {
        0 => FinalRecord::default(),
        _ => FinalRecord::decode(&key, &staging.get(Kind::Final, index).await?, counts)?,
    };
    check_finals(&links_key, &links, &key, &finals)?;
    Ok((summary, finals))
}

/// Block `b`'s summary and components (what down-0 or resolve-0 wrote).
pub(super) async fn read_components(
    staging: &Staging,
    b: usize,
) -> Result<(Summary, Components), StagedError> {
    let summary = summary(staging, b).await?;
    let key = staging.key(Kind::Components, b);
    let bytes = staging.get(Kind::Components, b).await?;
    let table = Components::decode(&key, &bytes, &summary.first)?;
    Ok((summary, table))
}

/// The down-0 task of a connected-components plan's block `b`: each label's component,
/// whether it stays (`dust`: components under it do not), and the staying components the block
/// owns per row.
pub(super) async fn components(
    blocks: ChunkGrid,
    top: u32,
    b: usize,
    dust: u64,
    staging: &Staging,
) -> Result<SegmentReport, StagedError> {
    let mut passes = Passes::new();
    let (summary, finals) = summary_and_finals(&blocks, top, b, staging).await?;
    passes.done("read");
    let mut table = Components::default();
    for (&own, &size) in summary.first.iter().zip(&summary.sizes) {
        let (c, size) = finals.get(own).map_or((own, size), |r| (r.id, r.size));
        table.component.push(c);
        table.stays.push(size >= dust);
    }
    let owned = write_components(&blocks, b, &summary.first, &table, staging).await?;
    passes.done("write");
    Ok(SegmentReport {
        fragments: summary.first.len(),
        segments: owned,
        passes: passes.into_vec(),
        ..Default::default()
    })
}

/// Writes block `b`'s components (labels with first voxels `first`) and, per row of the block,
/// how many staying components it owns (their first voxel, a label's own, is in the row).
/// Returns how many it owns.
pub(super) async fn write_components(
    blocks: &ChunkGrid,
    b: usize,
    first: &[u64],
    table: &Components,
    staging: &Staging,
) -> Result<usize, StagedError> {
    let core = blocks.core(b);
    let shape = core.shape();
    let region = Grid {
        shape: blocks.region,
    };
    let mut rows = vec![0u64; shape[1] * shape[2]];
    let mut owned = 0;
    for ((&own, &c), &stays) in first.iter().zip(&table.component).zip(&table.stays) {
        if stays && c == own {
            let p = region.position(own as usize);
            rows[(p[1] - core.start[1]) + shape[1] * (p[2] - core.start[2])] += 1;
            owned += 1;
        }
    }
    staging
        .put(Kind::Components, b, table.encode(first))
        .await?;
    staging.put(Kind::Rows, b, encode_counts(&rows)).await?;
    Ok(owned)
}

/// The shape of block row vectors along x line `line` (blocks (.., y, z)): the rows of its
/// blocks, y fastest.
fn line_rows(blocks: &ChunkGrid, line: usize) -> (usize, usize) {
    let n = blocks.counts();
    let shape = blocks.core(n[0] * line).shape();
    (shape[1], shape[2])
}

/// The planes of slab `slab` (blocks (.., .., z)).
fn slab_planes(blocks: &ChunkGrid, slab: usize) -> usize {
    let n = blocks.counts();
    blocks.core(n[0] * n[1] * slab).shape()[2]
}

/// The length of the vectors a scan along `axis` sums on `line`.
fn vector_len(blocks: &ChunkGrid, axis: usize, line: usize) -> usize {
    match axis {
        0 => {
            let (y, z) = line_rows(blocks, line);
            y * z
        }
        1 => slab_planes(blocks, line),
        _ => 1,
    }
}

/// The vector of unit `unit` of `line` that a scan task at `level` along `axis` sums.
async fn scan_input(
    staging: &Staging,
    blocks: &ChunkGrid,
    scans: &Scans,
    (axis, level, line, unit): (usize, u32, usize, usize),
) -> Result<Vec<u64>, StagedError> {
    let n = blocks.counts();
    let len = vector_len(blocks, axis, line);
    if level > 0 {
        let index = scan_index(axis, level - 1, line, unit);
        return get_counts(staging, Kind::Total, index, len).await;
    }
    match axis {
        0 => get_counts(staging, Kind::Rows, unit + n[0] * line, len).await,
        1 => {
            // A line's per-plane totals: its top x total summed over each plane's rows.
            let x_line = unit + n[1] * line;
            let (rows, planes) = line_rows(blocks, x_line);
            let index = scan_index(0, scans.levels(0) - 1, x_line, 0);
            let total = get_counts(staging, Kind::Total, index, rows * planes).await?;
            Ok(total.chunks(rows).map(|plane| plane.iter().sum()).collect())
        }
        _ => {
            let planes = slab_planes(blocks, unit);
            let index = scan_index(1, scans.levels(1) - 1, unit, 0);
            let total = get_counts(staging, Kind::Total, index, planes).await?;
            Ok(vec![total.iter().sum()])
        }
    }
}

/// A scan task: task `task` of level `level` along `axis`.
pub(super) async fn scan(
    blocks: ChunkGrid,
    scans: Scans,
    axis: usize,
    level: u32,
    task: usize,
    staging: &Staging,
) -> Result<SegmentReport, StagedError> {
    let mut passes = Passes::new();
    let units = scans.units(axis, level as i64);
    let (line, segment) = (task / units, task % units);
    let below = scans.units(axis, level as i64 - 1);
    let fan_in = scans.fan_in[axis];
    let first = segment * fan_in;
    let mut sum = vec![0u64; vector_len(&blocks, axis, line)];
    let mut prefixes = Vec::new();
    for unit in first..(first + fan_in).min(below) {
        let v = scan_input(staging, &blocks, &scans, (axis, level, line, unit)).await?;
        prefixes.push((unit, sum.clone()));
        for (s, x) in sum.iter_mut().zip(v) {
            *s += x;
        }
    }
    passes.done("scan");
    for (unit, prefix) in prefixes {
        let index = scan_index(axis, level, line, unit);
        staging
            .put(Kind::Prefix, index, encode_counts(&prefix))
            .await?;
    }
    let index = scan_index(axis, level, line, segment);
    staging.put(Kind::Total, index, encode_counts(&sum)).await?;
    passes.done("write");
    Ok(SegmentReport {
        passes: passes.into_vec(),
        ..Default::default()
    })
}

/// Sums item `item`'s prefixes at every level of the scan along `axis` on `line`.
async fn prefix_of(
    staging: &Staging,
    blocks: &ChunkGrid,
    scans: &Scans,
    (axis, line, item): (usize, usize, usize),
) -> Result<Vec<u64>, StagedError> {
    let len = vector_len(blocks, axis, line);
    let mut sum = vec![0u64; len];
    for level in 0..scans.levels(axis) {
        let unit = match level {
            0 => item,
            _ => scans.unit_of(axis, level - 1, item),
        };
        let index = scan_index(axis, level, line, unit);
        let prefix = get_counts(staging, Kind::Prefix, index, len).await?;
        for (s, p) in sum.iter_mut().zip(prefix) {
            *s += p;
        }
    }
    Ok(sum)
}

/// The whole line's total of the scan along `axis`.
async fn line_total(
    staging: &Staging,
    blocks: &ChunkGrid,
    scans: &Scans,
    axis: usize,
    line: usize,
) -> Result<Vec<u64>, StagedError> {
    let index = scan_index(axis, scans.levels(axis) - 1, line, 0);
    get_counts(staging, Kind::Total, index, vector_len(blocks, axis, line)).await
}

/// The rank task of block `b`: the numbers of the staying components it owns.
pub(super) async fn rank(
    blocks: ChunkGrid,
    scans: Scans,
    b: usize,
    staging: &Staging,
) -> Result<SegmentReport, StagedError> {
    let mut passes = Passes::new();
    let n = blocks.counts();
    let [bx, by, bz] = block_coords(n, b);
    let x_line = by + n[1] * bz;
    let before_x = prefix_of(staging, &blocks, &scans, (0, x_line, bx)).await?;
    let line = line_total(staging, &blocks, &scans, 0, x_line).await?;
    let before_y = prefix_of(staging, &blocks, &scans, (1, bz, by)).await?;
    let slab = line_total(staging, &blocks, &scans, 1, bz).await?;
    let before_z = prefix_of(staging, &blocks, &scans, (2, 0, bz)).await?[0];
    let (summary, table) = read_components(staging, b).await?;
    passes.done("read");
    let core = blocks.core(b);
    let rows = core.shape()[1];
    // The components before each row's first: slabs, planes, lines, rows and blocks before it.
    let mut base = Vec::with_capacity(line.len());
    let mut planes_before = before_z;
    for z in 0..slab.len() {
        let mut rows_before = 0;
        for y in 0..rows {
            let row = y + rows * z;
            base.push(planes_before + before_y[z] + rows_before + before_x[row]);
            rows_before += line[row];
        }
        planes_before += slab[z];
    }
    let region = Grid {
        shape: blocks.region,
    };
    let mut ranks: Vec<(u64, u64)> = Vec::new();
    for ((&own, &c), &stays) in summary.first.iter().zip(&table.component).zip(&table.stays) {
        if stays && c == own {
            let p = region.position(own as usize);
            let row = (p[1] - core.start[1]) + rows * (p[2] - core.start[2]);
            base[row] += 1;
            ranks.push((own, base[row]));
        }
    }
    passes.done("rank");
    let mut out = Vec::new();
    put_varint(&mut out, ranks.len() as u64);
    let mut last = 0;
    for &(id, number) in &ranks {
        put_varint(&mut out, id - last);
        put_varint(&mut out, number);
        last = id;
    }
    staging.put(Kind::Ranks, b, out).await?;
    passes.done("write");
    Ok(SegmentReport {
        segments: ranks.len(),
        voxels: voxels(core.shape()) as u64,
        passes: passes.into_vec(),
        ..Default::default()
    })
}

/// A block's ranks: (component name, number), sorted by name.
pub(super) fn decode_ranks(key: &str, bytes: &[u8]) -> Result<Vec<(u64, u64)>, StagedError> {
    let mut r = Reader { bytes, at: 0, key };
    let n = r.count_of_pairs()?;
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(n as usize);
    let mut last = 0u64;
    for _ in 0..n {
        let id = last
            .checked_add(r.varint()?)
            .ok_or_else(|| r.corrupt("a name past 2^64".into()))?;
        if out.last().is_some_and(|l| l.0 >= id) {
            return Err(r.corrupt(format!("component {id} out of order")));
        }
        out.push((id, r.varint()?));
        last = id;
    }
    r.finish("ranks")?;
    Ok(out)
}

/// The number of components that stay: the top z total.
pub(super) async fn total(
    staging: &Staging,
    blocks: &ChunkGrid,
    scans: &Scans,
) -> Result<u64, StagedError> {
    Ok(line_total(staging, blocks, scans, 2, 0).await?[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_levels_reach_one_segment() {
        let scans = Scans {
            counts: [5, 1, 9],
            fan_in: [2, 2, 3],
        };
        assert_eq!(
            (scans.units(0, -1), scans.units(0, 0), scans.units(0, 1)),
            (5, 3, 2)
        );
        assert_eq!(scans.levels(0), 3);
        assert_eq!(scans.levels(1), 1);
        assert_eq!(scans.levels(2), 2);
        assert_eq!(scans.tasks(0, 0), 9 * 3);
        assert_eq!(scans.unit_of(0, 0, 4), 2);
        assert_eq!(scans.unit_of(0, 1, 4), 1);
        let table = Components {
            component: vec![3, 3, 9],
            stays: vec![true, false, true],
        };
        let first = [3, 5, 1 << 40];
        assert_eq!(
            Components::decode("c", &table.encode(&first), &first).unwrap(),
            table
        );
        assert!(Components::decode("c", &table.encode(&first), &first[..2]).is_err());
        assert_eq!(
            decode_counts("c", &encode_counts(&[0, 7, 1 << 50]), 3).unwrap()[2],
            1 << 50
        );
        assert!(decode_counts("c", &encode_counts(&[0, 7]), 3).is_err());
    }
}
