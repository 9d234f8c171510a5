//! Seeded watershed of an affinity graph with waterz's (zwatershed's) rules, and the plateau rule
//! cuboids defines so that the GPU, the CPU and a chunked run all agree voxel for voxel.
//!
//! Affinities: channel c (x, y, z) at voxel v is the edge between v and v - e_c. Per voxel:
//! 1. `m` = the largest of its (up to) 6 edges; `m <= low` makes it background (0).
//! 2. Candidate edges: those equal to `m`, or `>= high`.
//! 3. An edge v→w is *bidirectional* when w also has w→v as a candidate. A voxel with a candidate
//!    edge that is not bidirectional is an *exit*: it points along its last such edge, in
//!    waterz's direction order (-z, -y, -x, +z, +y, +x), exactly as waterz does.
//! 4. Every other non-background voxel lies on a *plateau* (all its candidate edges are
//!    bidirectional). Plateau voxels point to the bidirectional neighbour nearest (in steps over
//!    the plateau) to an exit, the last such direction on ties. waterz divides plateaus by a BFS
//!    whose tie-breaks depend on scan order; this rule depends on the graph only, which is what
//!    lets chunks agree. A plateau with no exit at all is a basin on its own: its voxels join
//!    along all their bidirectional edges.
//! 5. Fragments are the trees of these pointers: labels 1..N, numbered by first voxel.
//!
//! With real-valued affinities plateaus need exact ties, so this equals waterz's watershed;
//! `tests/golden.rs` checks it against waterz.

use crate::geometry::Vec3;
use crate::ops::union_find::{number_by_first_voxel, UnionFind};

/// An affinity graph in memory: three Fortran-ordered channels of one shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Affinities {
    pub shape: Vec3,
    /// x, y, z: channel c at voxel v is the edge between v and v - e_c.
    pub channels: [Vec<f32>; 3],
}

impl Affinities {
    pub fn voxels(&self) -> usize {
        self.shape[0] * self.shape[1] * self.shape[2]
    }

    pub fn view(&self) -> AffinityView<'_> {
        AffinityView {
            shape: self.shape,
            channels: [0, 1, 2].map(|c| self.channels[c].as_slice()),
        }
    }
}

/// Borrowed [`Affinities`]: what the GPU watershed uploads, so that a float32 box read from a
/// volume goes up from the volume's own bytes, without a copy.
#[derive(Clone, Copy, Debug)]
pub struct AffinityView<'a> {
    pub shape: Vec3,
    pub channels: [&'a [f32]; 3],
}

/// The watershed thresholds (chunkflow's defaults: low 0.001, high 0.9999).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WatershedParams {
    pub low: f32,
    pub high: f32,
}

impl Default for WatershedParams {
    fn default() -> Self {
        WatershedParams {
            low: 0.001,
            high: 0.9999,
        }
    }
}

/// Direction d in waterz's order: -z, -y, -x, +z, +y, +x. The opposite of d is (d + 3) % 6.
pub const DIRECTIONS: [[i64; 3]; 6] = [
    [0, 0, -1],
    [0, -1, 0],
    [-1, 0, 0],
    [0, 0, 1],
    [0, 1, 0],
    [1, 0, 0],
];

/// Per-voxel facts the watershed steps share; also the layout of the GPU's `info` words.
pub mod bits {
    /// Bits 0..6: candidate directions.
    pub const CANDIDATES: u32 = 0x3f;
    /// Bits 6..12: bidirectional candidate directions.
    pub const BIDIR_SHIFT: u32 = 6;
    pub const EXIT: u32 = 1 << 12;
    pub const BACKGROUND: u32 = 1 << 13;
}

/// Fortran index helpers for one shape.
#[derive(Clone, Copy, Debug)]
pub struct Grid {
    pub shape: Vec3,
}

impl Grid {
    pub fn index(&self, p: [usize; 3]) -> usize {
        p[0] + self.shape[0] * (p[1] + self.shape[1] * p[2])
    }

    pub fn position(&self, i: usize) -> [usize; 3] {
        let x = i % self.shape[0];
        let y = (i / self.shape[0]) % self.shape[1];
        [x, y, i / (self.shape[0] * self.shape[1])]
    }

    /// The neighbour of voxel `i` in direction `d`, if inside the grid.
    pub fn neighbour(&self, i: usize, d: usize) -> Option<usize> {
        let p = self.position(i);
        let o = DIRECTIONS[d];
        let q = [0, 1, 2].map(|a| p[a] as i64 + o[a]);
        (0..3)
            .all(|a| q[a] >= 0 && q[a] < self.shape[a] as i64)
            .then(|| self.index(q.map(|v| v as usize)))
    }
}

/// The affinity of the edge from voxel `i` in direction `d` (None outside the volume).
fn edge(aff: &Affinities, grid: Grid, i: usize, d: usize) -> Option<f32> {
    let j = grid.neighbour(i, d)?;
    // -z, -y, -x edges live at the voxel itself; +z, +y, +x at the neighbour.
    let channel = 2 - (d % 3);
    Some(aff.channels[channel][if d < 3 { i } else { j }])
}

/// Steps 1-3: candidate bits, bidirectional bits, exit and background flags of every voxel.
pub fn voxel_info(aff: &Affinities, p: WatershedParams) -> Vec<u32> {
    let grid = Grid { shape: aff.shape };
    let n = aff.voxels();
    let candidates: Vec<u32> = (0..n)
        .map(|i| {
            let edges: Vec<Option<f32>> = (0..6).map(|d| edge(aff, grid, i, d)).collect();
            let m = edges
                .iter()
                .flatten()
                .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            if m <= p.low || m.is_nan() {
                return bits::BACKGROUND;
            }
            (0..6)
                .filter(|&d| edges[d].is_some_and(|e| e == m || e >= p.high))
                .fold(0, |acc, d| acc | 1 << d)
        })
        .collect();
    (0..n)
        .map(|i| {
            let c = candidates[i];
            if c & bits::BACKGROUND != 0 {
                return c;
            }
            let bidir = (0..6)
                .filter(|&d| c & (1 << d) != 0)
                .filter(|&d| {
                    let j = grid.neighbour(i, d).expect("candidate edges exist");
                    candidates[j] & bits::BACKGROUND == 0
                        && candidates[j] & (1 << ((d + 3) % 6)) != 0
                })
                .fold(0, |acc, d| acc | 1 << d);
            let exit = if c & !bidir != 0 { bits::EXIT } else { 0 };
            c | bidir << bits::BIDIR_SHIFT | exit
        })
        .collect()
}

/// The direction an exit points along: its last non-bidirectional candidate.
pub fn exit_direction(info: u32) -> usize {
    let out = (info & bits::CANDIDATES) & !((info >> bits::BIDIR_SHIFT) & bits::CANDIDATES);
    31 - out.leading_zeros() as usize
}

pub fn bidirectional(info: u32) -> u32 {
    (info >> bits::BIDIR_SHIFT) & bits::CANDIDATES
}

pub fn is_plateau(info: u32) -> bool {
    info & (bits::BACKGROUND | bits::EXIT) == 0
}

/// Distance unknown / no exit reachable.
pub const FAR: u32 = u32::MAX;

/// The plateau rule's choice for a plateau voxel at `distance` (not FAR), given the distances of
/// its neighbours: the last bidirectional direction whose neighbour is one step nearer an exit.
pub fn plateau_direction(
    info: u32,
    distance: u32,
    neighbour_distance: impl Fn(usize) -> u32,
) -> usize {
    let bidir = bidirectional(info);
    (0..6)
        .rev()
        .find(|&d| bidir & (1 << d) != 0 && neighbour_distance(d) == distance - 1)
        .expect("a plateau voxel at a finite distance has a nearer neighbour")
}

/// Steps 4-5 on the CPU: the fragments of a whole volume, labels 1..N by first voxel.
pub fn watershed_cpu(aff: &Affinities, p: WatershedParams) -> Vec<u32> {
    let grid = Grid { shape: aff.shape };
    let info = voxel_info(aff, p);
    let n = info.len();
    let distance = plateau_distances(&info, grid);
    let mut sets = UnionFind::new(n);
    for i in 0..n {
        let v = info[i];
        if v & bits::BACKGROUND != 0 {
            continue;
        }
        let neighbour = |d| grid.neighbour(i, d).expect("candidate edges exist");
        if v & bits::EXIT != 0 {
            sets.union(i as u32, neighbour(exit_direction(v)) as u32);
        } else if distance[i] != FAR {
            let d = plateau_direction(v, distance[i], |d| distance[neighbour(d)]);
            sets.union(i as u32, neighbour(d) as u32);
        } else {
            for d in 0..6 {
                if bidirectional(v) & (1 << d) != 0 {
                    sets.union(i as u32, neighbour(d) as u32);
                }
            }
        }
    }
    number_by_first_voxel(
        (0..n).map(|i| (info[i] & bits::BACKGROUND == 0).then(|| sets.find(i as u32))),
        n,
    )
}

/// Steps over the plateau to the nearest exit (0 for exits, FAR where none is reachable): a
/// breadth-first search from all exits at once along bidirectional edges into plateau voxels.
pub fn plateau_distances(info: &[u32], grid: Grid) -> Vec<u32> {
    let mut distance = vec![FAR; info.len()];
    let mut queue = std::collections::VecDeque::new();
    for (i, &v) in info.iter().enumerate() {
        if v & bits::EXIT != 0 {
            distance[i] = 0;
            queue.push_back(i);
        }
    }
    while let Some(i) = queue.pop_front() {
        for d in 0..6 {
            let Some(j) = grid.neighbour(i, d) else {
                continue;
            };
            // j reaches i over a bidirectional edge of j's: direction (d + 3) % 6 from j.
            if is_plateau(info[j])
                && bidirectional(info[j]) & (1 << ((d + 3) % 6)) != 0
                && distance[j] == FAR
            {
                distance[j] = distance[i] + 1;
                queue.push_back(j);
            }
        }
    }
    distance
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(values: &[f32]) -> Affinities {
        // A 1-D volume along x: the x channel at voxel i is the edge (i-1, i).
        let n = values.len() + 1;
        let mut x = vec![0.0; n];
        x[1..].copy_from_slice(values);
        Affinities {
            shape: [n, 1, 1],
            channels: [x, vec![0.0; n], vec![0.0; n]],
        }
    }

    #[test]
    fn a_weak_edge_between_two_peaks_splits_the_line() {
        // Edges: 0.9 (0-1), 0.2 (1-2), 0.8 (2-3).
        let labels = watershed_cpu(&line(&[0.9, 0.2, 0.8]), WatershedParams::default());
        assert_eq!(labels, vec![1, 1, 2, 2]);
    }

    #[test]
    fn low_voxels_are_background() {
        let labels = watershed_cpu(&line(&[0.0005, 0.5]), WatershedParams::default());
        assert_eq!(labels, vec![0, 1, 1]);
    }

    #[test]
    fn plateau_voxels_go_to_the_nearest_exit() {
        // Edges 0.9 | 0.5 0.5 0.5 0.5 | 0.9: voxels 2..4 have m = 0.5; 2 and 4 are exits (their
        // 0.5 edges toward 1 and 5 ascend), 3 is a plateau voxel one step from both: the last
        // direction in waterz's order, +x, wins.
        let labels = watershed_cpu(
            &line(&[0.9, 0.5, 0.5, 0.5, 0.5, 0.9]),
            WatershedParams::default(),
        );
        assert_eq!(labels, vec![1, 1, 1, 2, 2, 2, 2]);
    }

    #[test]
    fn an_exitless_plateau_is_one_basin() {
        let labels = watershed_cpu(&line(&[0.7, 0.7, 0.7]), WatershedParams::default());
        assert_eq!(labels, vec![1, 1, 1, 1]);
    }
}
