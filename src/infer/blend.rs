//! chunkflow's patch grid and blending, over the whole volume (one global grid, so that any
//! split of the volume into tasks gives the same bytes).
//!
//! Axes are x, y, z here (chunkflow writes z, y, x); a patch's voxels are in Fortran order
//! (x fastest), which is the memory order of an ONNX N,C,D,H,W tensor.
//!
//! - The grid, per axis: input patch starts `0, stride, 2·stride, ...` below `n − overlap`
//!   (input overlap = output overlap + 2·crop, stride = input patch − input overlap), a start
//!   that would run past the end clamped to `n − patch`; output patch `i` starts at its input
//!   start + crop, crop = (input patch − output patch) / 2.
//! - The weights: a bump over the output patch ('wu': per axis t = (i+1)/(n+1)·2 − 1,
//!   exp(−Σ 1/(1 − t²)); DeepEM's 'zung': x = (i+1)/(n+1), exp(−Σ (x(1 − x))^−1.5)), mapped
//!   linearly onto [1, 1e6], then divided by the sum of 27 copies on a 3×3×3 grid of the
//!   output stride (computed in float64, stored as float32, as chunkflow's `make_patch_mask`).
//! - Each output voxel is Σ w·p / Σ w over the patches that cover it (chunkflow's
//!   `mask_output_chunk`): patches are summed in grid order (z outer, x inner) into float32
//!   buffers and the sum multiplied by 1 / Σ w, as chunkflow does.

use crate::geometry::{Box3, Vec3};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BlendError {
    #[error("the output patch {output:?} is larger than the input patch {input:?} (x,y,z)")]
    OutputPatch { input: Vec3, output: Vec3 },
    #[error("the overlap {overlap:?} must be smaller than the output patch {output:?} (x,y,z)")]
    Overlap { overlap: Vec3, output: Vec3 },
    #[error("the volume is {volume:?} voxels (x,y,z), smaller than the input patch {patch:?}")]
    Volume { volume: Vec3, patch: Vec3 },
}

/// The bump that weighs a patch's voxels: high in the middle, near zero at the faces.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Bump {
    /// chunkflow's default (Jingpeng Wu).
    #[default]
    Wu,
    /// DeepEM's (Jonathan Zung).
    Zung,
}

/// Where the patches of a volume lie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchGrid {
    pub volume: Vec3,
    pub input_patch: Vec3,
    pub output_patch: Vec3,
    pub output_overlap: Vec3,
    /// Where the output patch starts inside the input patch.
    pub crop: Vec3,
    /// Input patch starts per axis.
    pub starts: [Vec<usize>; 3],
}

impl PatchGrid {
    pub fn new(
        volume: Vec3,
        input_patch: Vec3,
        output_patch: Vec3,
        output_overlap: Vec3,
    ) -> Result<PatchGrid, BlendError> {
        if (0..3).any(|a| output_patch[a] > input_patch[a] || output_patch[a] == 0) {
            return Err(BlendError::OutputPatch {
                input: input_patch,
                output: output_patch,
            });
        }
        if (0..3).any(|a| output_overlap[a] >= output_patch[a]) {
            return Err(BlendError::Overlap {
                overlap: output_overlap,
                output: output_patch,
            });
        }
        if (0..3).any(|a| volume[a] < input_patch[a]) {
            return Err(BlendError::Volume {
                volume,
                patch: input_patch,
            });
        }
        let crop = [0, 1, 2].map(|a| (input_patch[a] - output_patch[a]) / 2);
        let starts = [0, 1, 2].map(|a| {
            let overlap = output_overlap[a] + 2 * crop[a];
            let stride = input_patch[a] - overlap;
            (0..volume[a] - overlap)
                .step_by(stride)
                .map(|s| s.min(volume[a] - input_patch[a]))
                .collect()
        });
        Ok(PatchGrid {
            volume,
            input_patch,
            output_patch,
            output_overlap,
            crop,
            starts,
        })
    }

    pub fn len(&self) -> usize {
        self.starts.iter().map(Vec::len).product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every patch's input start, in chunkflow's order (z outermost, x innermost).
    pub fn patches(&self) -> impl Iterator<Item = Vec3> + '_ {
        self.starts[2].iter().flat_map(move |&z| {
            self.starts[1]
                .iter()
                .flat_map(move |&y| self.starts[0].iter().map(move |&x| [x, y, z]))
        })
    }

    /// The output box of the patch whose input starts at `start`.
    pub fn output_box(&self, start: Vec3) -> Box3 {
        let s = [0, 1, 2].map(|a| start[a] + self.crop[a]);
        Box3::new(s, [0, 1, 2].map(|a| s[a] + self.output_patch[a]))
    }

    /// The patch starts along `axis` whose output meets `[lo, hi)`, in order.
    pub fn starts_meeting(&self, axis: usize, lo: usize, hi: usize) -> Vec<usize> {
        let (crop, out) = (self.crop[axis], self.output_patch[axis]);
        self.starts[axis]
            .iter()
            .copied()
            .filter(|&s| s + crop < hi && lo < s + crop + out)
            .collect()
    }

    /// The patches whose output boxes meet `region`, in grid order.
    pub fn patches_meeting(&self, region: Box3) -> Vec<Vec3> {
        let [xs, ys, zs] =
            [0, 1, 2].map(|a| self.starts_meeting(a, region.start[a], region.stop[a]));
        zs.iter()
            .flat_map(|&z| {
                ys.iter()
                    .flat_map(|&y| xs.iter().map(move |&x| [x, y, z]))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// How many patches [`PatchGrid::patches_meeting`] gives, without listing them.
    pub fn count_meeting(&self, region: Box3) -> usize {
        (0..3)
            .map(|a| {
                self.starts_meeting(a, region.start[a], region.stop[a])
                    .len()
            })
            .product()
    }
}

/// One axis of a bump before normalisation: its logit per voxel.
fn bump_logits(kind: Bump, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| match kind {
            Bump::Wu => {
                let t = (i as f64 + 1.0) / (n as f64 + 1.0) * 2.0 - 1.0;
                -1.0 / (1.0 - t * t)
            }
            Bump::Zung => {
                let x = (i as f64 + 1.0) / (n as f64 + 1.0);
                -(x * (1.0 - x)).powf(-1.5)
            }
        })
        .collect()
}

/// The weights of an output patch (x fastest), normalised as chunkflow's `make_patch_mask`.
pub fn patch_mask(kind: Bump, patch: Vec3, overlap: Vec3) -> Vec<f32> {
    let [lx, ly, lz] = [0, 1, 2].map(|a| bump_logits(kind, patch[a]));
    let mut bump = Vec::with_capacity(patch.iter().product());
    for z in &lz {
        for y in &ly {
            for x in &lx {
                bump.push((x + y + z).exp());
            }
        }
    }
    let (low, high) = bump
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
            (l.min(v), h.max(v))
        });
    let slope = if high > low {
        (1e6 - 1.0) / (high - low)
    } else {
        0.0
    };
    for v in &mut bump {
        *v = slope * (*v - low) + 1.0;
    }
    // The sum of the 27 copies on a 3x3x3 grid of the stride, over the middle copy.
    let stride = [0, 1, 2].map(|a| patch[a] - overlap[a]);
    let mut base = vec![0.0f64; bump.len()];
    for z in 0..patch[2] {
        for y in 0..patch[1] {
            for x in 0..patch[0] {
                let mut sum = 0.0;
                for dz in [-1isize, 0, 1] {
                    let Some(bz) = shifted(z, dz, stride[2], patch[2]) else {
                        continue;
                    };
                    for dy in [-1isize, 0, 1] {
                        let Some(by) = shifted(y, dy, stride[1], patch[1]) else {
                            continue;
                        };
                        for dx in [-1isize, 0, 1] {
                            let Some(bx) = shifted(x, dx, stride[0], patch[0]) else {
                                continue;
                            };
                            sum += bump[(bz * patch[1] + by) * patch[0] + bx];
                        }
                    }
                }
                base[(z * patch[1] + y) * patch[0] + x] = sum;
            }
        }
    }
    bump.iter()
        .zip(&base)
        .map(|(b, s)| (b / s) as f32)
        .collect()
}

/// The voxel of a copy shifted by `d` strides that lands on `i`, if the copy covers it.
fn shifted(i: usize, d: isize, stride: usize, n: usize) -> Option<usize> {
    let at = i as isize - d * stride as isize;
    (at >= 0 && (at as usize) < n).then_some(at as usize)
}

/// Output channels of a region, summed patch by patch in grid order, then normalised, kept as
/// a window of z planes: patches come in z rows, and the planes below the next row's output
/// are final and can be taken (written) while later rows are still to run, so a column of
/// the volume is blended in memory that does not grow with its height.
pub struct Blender {
    pub region: Box3,
    pub channels: usize,
    /// The first plane not yet taken.
    z0: usize,
    /// Σ w·p per plane from `z0`, then channel (x fastest).
    sums: Vec<f32>,
    /// Σ w per plane from `z0`.
    weights: Vec<f32>,
}

impl Blender {
    pub fn new(region: Box3, channels: usize) -> Blender {
        Blender {
            region,
            channels,
            z0: region.start[2],
            sums: Vec::new(),
            weights: Vec::new(),
        }
    }

    fn plane(&self) -> usize {
        self.region.shape()[0] * self.region.shape()[1]
    }

    /// Planes held (from `z0`).
    fn planes(&self) -> usize {
        self.weights.len() / self.plane().max(1)
    }

    /// Holds planes up to `z` (exclusive), new ones zero.
    fn reach(&mut self, z: usize) {
        let want = z.min(self.region.stop[2]).saturating_sub(self.z0);
        if want > self.planes() {
            let plane = self.plane();
            self.weights.resize(want * plane, 0.0);
            self.sums.resize(want * plane * self.channels, 0.0);
        }
    }

    /// Adds a patch's weighted output (`weighted`: channels × output patch, already
    /// multiplied by the mask, or None for a patch that contributes zeros) whose output box
    /// is `patch`; only the part inside the region is kept. Its planes must not have been
    /// taken.
    pub fn add(&mut self, patch: Box3, mask: &[f32], weighted: Option<&[f32]>) {
        let shape = patch.shape();
        let region_shape = self.region.shape();
        let lo = [0, 1, 2].map(|a| patch.start[a].max(self.region.start[a]));
        let hi = [0, 1, 2].map(|a| patch.stop[a].min(self.region.stop[a]));
        if (0..3).any(|a| lo[a] >= hi[a]) {
            return;
        }
        assert!(lo[2] >= self.z0, "a patch added to planes already taken");
        self.reach(hi[2]);
        let patch_voxels: usize = shape.iter().product();
        let plane = self.plane();
        let width = hi[0] - lo[0];
        for z in lo[2]..hi[2] {
            for y in lo[1]..hi[1] {
                let p = ((z - patch.start[2]) * shape[1] + (y - patch.start[1])) * shape[0]
                    + (lo[0] - patch.start[0]);
                let r =
                    (y - self.region.start[1]) * region_shape[0] + (lo[0] - self.region.start[0]);
                let zi = z - self.z0;
                for (w, m) in self.weights[zi * plane + r..][..width]
                    .iter_mut()
                    .zip(&mask[p..p + width])
                {
                    *w += m;
                }
                if let Some(values) = weighted {
                    for c in 0..self.channels {
                        let src = &values[c * patch_voxels + p..][..width];
                        let dst = &mut self.sums[(zi * self.channels + c) * plane + r..][..width];
                        for (d, s) in dst.iter_mut().zip(src) {
                            *d += s;
                        }
                    }
                }
            }
        }
    }

    /// Σ w·p · (1 / Σ w) per channel of the planes from the last taken up to `z` (channel
    /// major, x fastest); zero where no patch covers a voxel (the border a valid-padding net
    /// cannot reach). The planes are dropped: no later patch may reach them.
    pub fn take(&mut self, z: usize) -> Vec<f32> {
        let z = z.min(self.region.stop[2]).max(self.z0);
        self.reach(z);
        let (plane, n) = (self.plane(), z - self.z0);
        let mut out = Vec::with_capacity(self.channels * n * plane);
        for c in 0..self.channels {
            for zi in 0..n {
                let w = &self.weights[zi * plane..][..plane];
                let s = &self.sums[(zi * self.channels + c) * plane..][..plane];
                out.extend(
                    s.iter()
                        .zip(w)
                        .map(|(&v, &w)| if w > 0.0 { v * (1.0 / w) } else { 0.0 }),
                );
            }
        }
        self.weights.drain(..n * plane);
        self.sums.drain(..n * plane * self.channels);
        self.z0 = z;
        out
    }

    /// The rest of the region, as [`Blender::take`].
    pub fn finish(mut self) -> Vec<f32> {
        let stop = self.region.stop[2];
        self.take(stop)
    }

    /// Bytes it holds now.
    pub fn bytes(&self) -> usize {
        (self.sums.capacity() + self.weights.capacity()) * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_steps_by_the_stride_and_clamps_the_last_patch() {
        // chunkflow: range(0, n - overlap, stride), clamped to n - patch.
        let grid = PatchGrid::new([37, 30, 9], [16, 16, 4], [16, 16, 4], [4, 4, 1]).unwrap();
        assert_eq!(grid.starts[0], vec![0, 12, 21]);
        assert_eq!(grid.starts[1], vec![0, 12, 14]);
        assert_eq!(grid.starts[2], vec![0, 3, 5]);
        assert_eq!(grid.len(), 27);
        // A valid-padding net: the output starts a crop inside the input patch, and the
        // input overlap adds twice the crop.
        let valid = PatchGrid::new([20, 20, 20], [12, 12, 10], [4, 4, 2], [0, 0, 0]).unwrap();
        assert_eq!(valid.crop, [4, 4, 4]);
        assert_eq!(valid.starts[0], vec![0, 4, 8]);
        assert_eq!(
            valid.output_box([4, 0, 0]),
            Box3::new([8, 4, 4], [12, 8, 6])
        );
        assert!(PatchGrid::new([10, 10, 3], [16, 16, 4], [16, 16, 4], [0, 0, 0]).is_err());
        assert!(PatchGrid::new([40, 40, 4], [16, 16, 4], [16, 16, 4], [16, 0, 0]).is_err());
    }

    #[test]
    fn the_mask_is_one_where_patches_do_not_overlap_and_sums_to_one_on_a_regular_grid() {
        for kind in [Bump::Wu, Bump::Zung] {
            let (patch, overlap) = ([12, 10, 6], [4, 2, 2]);
            let mask = patch_mask(kind, patch, overlap);
            let at = |x: usize, y: usize, z: usize| mask[(z * 10 + y) * 12 + x];
            assert!((at(6, 5, 3) - 1.0).abs() < 1e-6, "{kind:?}");
            // Two patches a stride apart along x sum to 1 in their overlap.
            let (a, b) = (at(9, 5, 3), at(9 - 8, 5, 3));
            assert!((a + b - 1.0).abs() < 1e-6, "{kind:?}: {a} + {b}");
        }
    }

    #[test]
    fn blending_divides_by_the_weights_and_leaves_uncovered_voxels_zero() {
        let region = Box3::new([0, 0, 0], [3, 1, 1]);
        let mut blender = Blender::new(region, 1);
        blender.add(
            Box3::new([0, 0, 0], [2, 1, 1]),
            &[1.0, 3.0],
            Some(&[2.0, 6.0]),
        );
        blender.add(Box3::new([1, 0, 0], [2, 1, 1]), &[1.0], Some(&[5.0]));
        assert_eq!(blender.finish(), vec![2.0, 11.0 * (1.0 / 4.0), 0.0]);
    }

    #[test]
    fn planes_taken_as_rows_finish_equal_the_whole_region_blended_at_once() {
        let region = Box3::new([1, 0, 2], [4, 2, 9]);
        let patch = [3, 2, 3];
        let mask: Vec<f32> = (0..18).map(|i| 1.0 + i as f32 / 7.0).collect();
        let weighted: Vec<f32> = (0..36).map(|i| (i as f32 * 0.37).sin()).collect();
        let starts = [[1, 0, 1], [1, 0, 3], [1, 0, 5], [1, 0, 7]];
        let mut whole = Blender::new(region, 2);
        let mut rows = Blender::new(region, 2);
        let mut taken = vec![Vec::new(); 2];
        for (i, s) in starts.iter().enumerate() {
            let b = Box3::new(*s, [0, 1, 2].map(|a| s[a] + patch[a]));
            whole.add(b, &mask, Some(&weighted));
            rows.add(b, &mask, Some(&weighted));
            // Planes below the next row's start are final.
            let below = starts.get(i + 1).map_or(9, |n| n[2]);
            let part = rows.take(below);
            let n = part.len() / 2;
            for (c, t) in taken.iter_mut().enumerate() {
                t.extend_from_slice(&part[c * n..(c + 1) * n]);
            }
        }
        let rest = rows.finish();
        assert!(rest.is_empty());
        let streamed: Vec<f32> = taken.concat();
        let at_once = whole.finish();
        assert_eq!(streamed.len(), 2 * 3 * 2 * 7);
        assert!(streamed
            .iter()
            .zip(&at_once)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
