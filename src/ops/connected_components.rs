//! Thresholded connected components (cc3d semantics): foreground is `value > threshold`
//! (strict), neighbours by 6-, 18- or 26-connectivity, labels 1..N numbered by first voxel in
//! Fortran (x-fastest) order, optional dust removal by size.

use crate::geometry::Vec3;
use crate::ops::union_find::{number_by_first_voxel, UnionFind};
use serde::{Deserialize, Serialize};

/// Which neighbours touch: faces (6), faces and edges (18), faces, edges and corners (26).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub enum Connectivity {
    Six,
    Eighteen,
    TwentySix,
}

impl TryFrom<u32> for Connectivity {
    type Error = String;
    fn try_from(v: u32) -> Result<Self, String> {
        match v {
            6 => Ok(Connectivity::Six),
            18 => Ok(Connectivity::Eighteen),
            26 => Ok(Connectivity::TwentySix),
            _ => Err(format!("connectivity must be 6, 18 or 26, not {v}")),
        }
    }
}

impl From<Connectivity> for u32 {
    fn from(c: Connectivity) -> u32 {
        match c {
            Connectivity::Six => 6,
            Connectivity::Eighteen => 18,
            Connectivity::TwentySix => 26,
        }
    }
}

impl std::str::FromStr for Connectivity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse::<u32>()
            .map_err(|_| format!("connectivity must be 6, 18 or 26, not {s:?}"))?
            .try_into()
    }
}

impl Connectivity {
    /// Most non-zero components an offset may have.
    pub fn max_axes(self) -> usize {
        match self {
            Connectivity::Six => 1,
            Connectivity::Eighteen => 2,
            Connectivity::TwentySix => 3,
        }
    }

    /// The neighbour offsets that come earlier in Fortran order (half of the neighbourhood):
    /// uniting each voxel with these covers every adjacent pair once. The GPU kernel enumerates
    /// the same set.
    pub fn backward_offsets(self) -> Vec<[i64; 3]> {
        let mut out = Vec::new();
        for dz in -1i64..=0 {
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let backward = dz < 0 || (dz == 0 && (dy < 0 || (dy == 0 && dx < 0)));
                    let axes = [dx, dy, dz].iter().filter(|&&d| d != 0).count();
                    if backward && axes <= self.max_axes() {
                        out.push([dx, dy, dz]);
                    }
                }
            }
        }
        out
    }
}

/// Labels the components of `values > threshold` in a Fortran-ordered volume of `shape`.
pub fn connected_components_cpu(
    values: &[f32],
    shape: Vec3,
    threshold: f32,
    connectivity: Connectivity,
) -> Vec<u32> {
    let n = values.len();
    assert_eq!(n, shape[0] * shape[1] * shape[2]);
    let foreground = |i: usize| values[i] > threshold;
    let mut sets = UnionFind::new(n);
    let offsets = connectivity.backward_offsets();
    for z in 0..shape[2] {
        for y in 0..shape[1] {
            for x in 0..shape[0] {
                let i = x + shape[0] * (y + shape[1] * z);
                if !foreground(i) {
                    continue;
                }
                for o in &offsets {
                    let (nx, ny, nz) = (x as i64 + o[0], y as i64 + o[1], z as i64 + o[2]);
                    if nx < 0 || ny < 0 || nz < 0 || nx >= shape[0] as i64 || ny >= shape[1] as i64
                    {
                        continue;
                    }
                    let j = nx as usize + shape[0] * (ny as usize + shape[1] * nz as usize);
                    if foreground(j) {
                        sets.union(i as u32, j as u32);
                    }
                }
            }
        }
    }
    number_by_first_voxel(
        (0..n).map(|i| foreground(i).then(|| sets.find(i as u32))),
        n,
    )
}

/// Removes components smaller than `min_size` voxels and renumbers the rest 1..N by first voxel
/// (cc3d.dust followed by a consecutive relabelling).
pub fn remove_dust(labels: &[u32], min_size: u64) -> Vec<u32> {
    let max = labels.iter().copied().max().unwrap_or(0) as usize;
    let mut sizes = vec![0u64; max + 1];
    for &l in labels {
        sizes[l as usize] += 1;
    }
    number_by_first_voxel(
        labels
            .iter()
            .map(|&l| (l != 0 && sizes[l as usize] >= min_size).then_some(l)),
        max + 1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_half_the_neighbourhood() {
        assert_eq!(Connectivity::Six.backward_offsets().len(), 3);
        assert_eq!(Connectivity::Eighteen.backward_offsets().len(), 9);
        assert_eq!(Connectivity::TwentySix.backward_offsets().len(), 13);
    }

    #[test]
    fn diagonal_voxels_join_only_with_enough_connectivity() {
        // Two voxels touching at a corner, one touching the first at an edge.
        let shape = [3, 3, 2];
        let mut v = vec![0f32; 18];
        v[0] = 1.0; // (0,0,0)
        v[4 + 9] = 1.0; // (1,1,1): corner neighbour of (0,0,0)
        v[2 + 3 + 9] = 0.6; // (2,1,1): face neighbour of (1,1,1)
        let six = connected_components_cpu(&v, shape, 0.5, Connectivity::Six);
        assert_eq!((six[0], six[13], six[14]), (1, 2, 2));
        let twenty_six = connected_components_cpu(&v, shape, 0.5, Connectivity::TwentySix);
        assert_eq!((twenty_six[0], twenty_six[13], twenty_six[14]), (1, 1, 1));
        // The threshold is strict.
        let strict = connected_components_cpu(&v, shape, 0.6, Connectivity::Six);
        assert_eq!(strict[14], 0);
    }

    #[test]
    fn dust_goes_and_labels_stay_consecutive() {
        assert_eq!(remove_dust(&[1, 1, 0, 2, 3, 3], 2), vec![1, 1, 0, 0, 2, 2]);
    }
}
