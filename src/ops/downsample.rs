//! Downsampling semantics shared by the CPU reference and the GPU kernels.
//!
//! They follow igneous/tinybrain 1.7 exactly where tinybrain is correct:
//! * integer images (uint8, uint16) accumulate sums over several mips from one read; an odd edge
//!   counts its last voxel twice (so each level's sum always covers `4^k` or `8^k` weights) and the
//!   output is `sum >> bits`, i.e. floor of the mean. Like tinybrain's narrow accumulators the sums
//!   are renormalised (floored) every 4 mips for (2,2,1) and every 8 (uint8) or 5 (uint16) mips
//!   for (2,2,2).
//! * float32 images accumulate in float32 with tinybrain's x86 summation order, then divide by
//!   `4^k` or `8^k` (exact powers of two). For a single mip tinybrain sums in double instead, i.e.
//!   rounds each block sum once; cuboids gets the same with an error-free (TwoSum) float32 sum,
//!   since portable WGSL has no f64 (it can differ by one ulp only when the sum lies within
//!   2^-48 of a rounding midpoint).
//! * uint32 images (tinybrain's numpy path) take the floor of the mean of the voxels that exist,
//!   one mip from the previous, computed exactly in 64 bits.
//! * segmentation uses countless mode pooling for (2,2,1) (an incomplete odd-edge block takes its
//!   first voxel) and tinybrain's 2x2x2 mode rule for (2,2,2), each mip from the previous.
//!
//! The one deliberate difference: tinybrain's single-mip 2x2 path (`num_mips=1`) is wrong on odd
//! sizes (row 10,20,30,40,50 gives [15,50,0]); cuboids gives [15,35,50] whatever the mip count.

use crate::dtype::DataType;
use crate::geometry::{div_ceil3, Vec3};
use crate::volume::Volume;
use ndarray::{Array3, ArrayView3};
use thiserror::Error;

/// How voxels of a block are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Box averaging (floor of the mean for integers): images.
    Average,
    /// Countless mode pooling: segmentation labels.
    Mode,
}

#[derive(Debug, Error, PartialEq)]
pub enum DownsampleError {
    #[error("unsupported downsampling factor {0:?}: use 2,2,1 (anisotropic) or 2,2,2 (isotropic)")]
    Factor(Vec3),
    #[error("{method:?} downsampling does not support data_type {dtype} (supported: {supported})")]
    DataType {
        method: Method,
        dtype: DataType,
        supported: &'static str,
    },
    #[error("number of mips must be at least 1")]
    NoMips,
}

/// A validated downsampling factor: (2,2,1) or (2,2,2). In JSON, `[2, 2, 1]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "[usize; 3]", into = "[usize; 3]")]
pub struct Factor(Vec3);

impl TryFrom<Vec3> for Factor {
    type Error = DownsampleError;
    fn try_from(f: Vec3) -> Result<Factor, DownsampleError> {
        Factor::new(f)
    }
}

impl From<Factor> for Vec3 {
    fn from(f: Factor) -> Vec3 {
        f.0
    }
}

impl Factor {
    pub const ANISOTROPIC: Factor = Factor([2, 2, 1]);
    pub const ISOTROPIC: Factor = Factor([2, 2, 2]);

    pub fn new(f: Vec3) -> Result<Factor, DownsampleError> {
        match f {
            [2, 2, 1] => Ok(Factor::ANISOTROPIC),
            [2, 2, 2] => Ok(Factor::ISOTROPIC),
            other => Err(DownsampleError::Factor(other)),
        }
    }

    pub fn get(self) -> Vec3 {
        self.0
    }

    pub fn z(self) -> usize {
        self.0[2]
    }

    /// log2 of the number of voxels in one block: the shift that turns a block sum into a mean.
    pub fn bits(self) -> u32 {
        if self.0[2] == 2 {
            3
        } else {
            2
        }
    }

    /// Shape of the next level: odd sizes round up.
    pub fn level_shape(self, shape: Vec3) -> Vec3 {
        div_ceil3(shape, self.0)
    }
}

const AVERAGE_TYPES: &str = "uint8, uint16, uint32, float32";
const MODE_TYPES: &str = "uint32, uint64";

/// Checks that a method can run on a data type, before anything is read or written.
pub fn check_supported(method: Method, dtype: DataType) -> Result<(), DownsampleError> {
    let ok = match method {
        Method::Average => matches!(
            dtype,
            DataType::Uint8 | DataType::Uint16 | DataType::Uint32 | DataType::Float32
        ),
        Method::Mode => matches!(dtype, DataType::Uint32 | DataType::Uint64),
    };
    if ok {
        Ok(())
    } else {
        Err(DownsampleError::DataType {
            method,
            dtype,
            supported: if method == Method::Average {
                AVERAGE_TYPES
            } else {
                MODE_TYPES
            },
        })
    }
}

/// The bookkeeping of accumulated integer averages: when sums are floored and by how much.
#[derive(Clone, Copy, Debug)]
pub struct SumSchedule {
    bits: u32,
    period: u32,
}

impl SumSchedule {
    /// tinybrain's accumulator widths: uint16 sums for uint8, uint32 for uint16 (2,2,1);
    /// uint32 sums for both with (2,2,2), which overflow after 8 (uint8) or 5 (uint16) mips.
    pub fn new(dtype: DataType, factor: Factor) -> SumSchedule {
        let period = match (dtype, factor.z()) {
            (DataType::Uint8, 2) => 8,
            (DataType::Uint16, 2) => 5,
            _ => 4,
        };
        SumSchedule {
            bits: factor.bits(),
            period,
        }
    }

    /// Mips between the floorings of the sums: a run that restarts from a stored mip at a
    /// multiple of it writes what one run does.
    pub fn period(&self) -> u32 {
        self.period
    }

    /// Right shift that renders the sums of `level` (1-based) as output voxels.
    pub fn render_shift(&self, level: u32) -> u32 {
        self.bits * (((level - 1) % self.period) + 1)
    }

    /// Right shift applied to the sums of `level` before they are summed into the next level.
    pub fn carry_shift(&self, level: u32) -> u32 {
        if level > 0 && level.is_multiple_of(self.period) {
            self.bits * self.period
        } else {
            0
        }
    }
}

/// Downsamples every channel of `vol` by `factor`, `mips` times; returns levels 1..=mips.
pub fn downsample_cpu(
    vol: &Volume,
    method: Method,
    factor: Factor,
    mips: u32,
) -> Result<Vec<Volume>, DownsampleError> {
    check_supported(method, vol.dtype)?;
    if mips == 0 {
        return Err(DownsampleError::NoMips);
    }
    let mut levels: Vec<Volume> = (1..=mips)
        .map(|k| {
            let mut shape = vol.shape;
            for _ in 0..k {
                shape = factor.level_shape(shape);
            }
            Volume::zeros(vol.dtype, shape, vol.channels)
        })
        .collect();
    for c in 0..vol.channels {
        let outs = downsample_channel(vol.channel(c), vol.dtype, vol.shape, method, factor, mips);
        for (level, bytes) in levels.iter_mut().zip(outs) {
            level.channel_mut(c).copy_from_slice(&bytes);
        }
    }
    Ok(levels)
}

fn downsample_channel(
    bytes: &[u8],
    dtype: DataType,
    shape: Vec3,
    method: Method,
    factor: Factor,
    mips: u32,
) -> Vec<Vec<u8>> {
    match (method, dtype) {
        (Method::Average, DataType::Uint8) => {
            let v: Vec<u64> = bytes.iter().map(|&b| b as u64).collect();
            average_accumulated(&v, shape, factor, mips, SumSchedule::new(dtype, factor))
                .into_iter()
                .map(|l| l.iter().map(|&s| s as u8).collect())
                .collect()
        }
        (Method::Average, DataType::Uint16) => {
            let v: Vec<u64> = from_le::<2>(bytes)
                .map(|b| u16::from_le_bytes(b) as u64)
                .collect();
            average_accumulated(&v, shape, factor, mips, SumSchedule::new(dtype, factor))
                .into_iter()
                .map(|l| l.iter().flat_map(|&s| (s as u16).to_le_bytes()).collect())
                .collect()
        }
        (Method::Average, DataType::Uint32) => {
            let v: Vec<u64> = from_le::<4>(bytes)
                .map(|b| u32::from_le_bytes(b) as u64)
                .collect();
            iterate(v, shape, factor, mips, average_existing)
                .into_iter()
                .map(|l| l.iter().flat_map(|&s| (s as u32).to_le_bytes()).collect())
                .collect()
        }
        (Method::Average, DataType::Float32) => {
            let v: Vec<f32> = from_le::<4>(bytes).map(f32::from_le_bytes).collect();
            average_f32(&v, shape, factor, mips)
                .into_iter()
                .map(|l| l.iter().flat_map(|s| s.to_le_bytes()).collect())
                .collect()
        }
        (Method::Mode, DataType::Uint32) => {
            let v: Vec<u64> = from_le::<4>(bytes)
                .map(|b| u32::from_le_bytes(b) as u64)
                .collect();
            iterate(v, shape, factor, mips, mode_of_block)
                .into_iter()
                .map(|l| l.iter().flat_map(|&s| (s as u32).to_le_bytes()).collect())
                .collect()
        }
        (Method::Mode, DataType::Uint64) => {
            let v: Vec<u64> = from_le::<8>(bytes).map(u64::from_le_bytes).collect();
            iterate(v, shape, factor, mips, mode_of_block)
                .into_iter()
                .map(|l| l.iter().flat_map(|s| s.to_le_bytes()).collect())
                .collect()
        }
        _ => unreachable!("checked by check_supported"),
    }
}

fn from_le<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes.chunks_exact(N).map(|c| c.try_into().unwrap())
}

fn view<T>(values: &[T], shape: Vec3) -> ArrayView3<'_, T> {
    ArrayView3::from_shape((shape[2], shape[1], shape[0]), values).expect("shape matches")
}

/// Builds a level by evaluating `f(input, output position)` for every output voxel.
fn build_level<T: Copy + Default, U: Copy + Default>(
    input: &[T],
    shape: Vec3,
    factor: Factor,
    f: impl Fn(&ArrayView3<'_, T>, [usize; 3]) -> U,
) -> (Vec<U>, Vec3) {
    let a = view(input, shape);
    let out_shape = factor.level_shape(shape);
    let out = Array3::from_shape_fn((out_shape[2], out_shape[1], out_shape[0]), |(z, y, x)| {
        f(&a, [x, y, z])
    });
    (out.into_raw_vec_and_offset().0, out_shape)
}

/// Input positions of the block under output voxel `o`, clamped so that a missing odd-edge
/// neighbour repeats the last voxel. Order: x fastest, then y, then z.
fn clamped_block(o: [usize; 3], shape: Vec3, factor: Factor) -> impl Iterator<Item = [usize; 3]> {
    let f = factor.get();
    (0..f[2]).flat_map(move |dz| {
        (0..2).flat_map(move |dy| {
            (0..2).map(move |dx| {
                [
                    (o[0] * 2 + dx).min(shape[0] - 1),
                    (o[1] * 2 + dy).min(shape[1] - 1),
                    (o[2] * f[2] + dz).min(shape[2] - 1),
                ]
            })
        })
    })
}

fn at<T: Copy>(a: &ArrayView3<'_, T>, p: [usize; 3]) -> T {
    a[[p[2], p[1], p[0]]]
}

fn average_accumulated(
    values: &[u64],
    shape: Vec3,
    factor: Factor,
    mips: u32,
    schedule: SumSchedule,
) -> Vec<Vec<u64>> {
    let mut sums = values.to_vec();
    let mut shape = shape;
    let mut outs = Vec::new();
    for level in 1..=mips {
        let carry = schedule.carry_shift(level - 1);
        let (next, next_shape) = build_level(&sums, shape, factor, |a, o| {
            clamped_block(o, shape, factor)
                .map(|p| at(a, p) >> carry)
                .sum::<u64>()
        });
        let shift = schedule.render_shift(level);
        outs.push(next.iter().map(|s| s >> shift).collect());
        sums = next;
        shape = next_shape;
    }
    outs
}

fn iterate(
    values: Vec<u64>,
    shape: Vec3,
    factor: Factor,
    mips: u32,
    reduce: fn(&ArrayView3<'_, u64>, [usize; 3], Vec3, Factor) -> u64,
) -> Vec<Vec<u64>> {
    let mut cur = values;
    let mut shape = shape;
    let mut outs = Vec::new();
    for _ in 0..mips {
        let (next, next_shape) =
            build_level(&cur, shape, factor, |a, o| reduce(a, o, shape, factor));
        outs.push(next.clone());
        cur = next;
        shape = next_shape;
    }
    outs
}

/// Floor of the mean of the voxels of the block that exist (no edge weighting).
fn average_existing(a: &ArrayView3<'_, u64>, o: [usize; 3], shape: Vec3, factor: Factor) -> u64 {
    let f = factor.get();
    let (mut sum, mut count) = (0u64, 0u64);
    for dz in 0..f[2] {
        for dy in 0..f[1] {
            for dx in 0..f[0] {
                let p = [o[0] * f[0] + dx, o[1] * f[1] + dy, o[2] * f[2] + dz];
                if p[0] < shape[0] && p[1] < shape[1] && p[2] < shape[2] {
                    sum += at(a, p);
                    count += 1;
                }
            }
        }
    }
    sum / count
}

/// countless (2,2,1): a==b→a, a==c→a, b==c→b, else d; an incomplete odd-edge block takes a.
/// 2x2x2: tinybrain's rule on the edge-clamped block (a label seen 4 times wins at once,
/// otherwise the first label with the highest count).
fn mode_of_block(a: &ArrayView3<'_, u64>, o: [usize; 3], shape: Vec3, factor: Factor) -> u64 {
    let p = [o[0] * 2, o[1] * 2, o[2] * factor.z()];
    if factor.z() == 1 {
        let first = at(a, p);
        if p[0] + 1 >= shape[0] || p[1] + 1 >= shape[1] {
            return first;
        }
        let (va, vb, vc, vd) = (
            first,
            at(a, [p[0] + 1, p[1], p[2]]),
            at(a, [p[0], p[1] + 1, p[2]]),
            at(a, [p[0] + 1, p[1] + 1, p[2]]),
        );
        return if va == vb || va == vc {
            va
        } else if vb == vc {
            vb
        } else {
            vd
        };
    }
    let vals: Vec<u64> = clamped_block(o, shape, factor).map(|q| at(a, q)).collect();
    mode_of_eight(&vals)
}

/// tinybrain's `_mode_pooling_2x2x2` decision for eight values (x fastest, then y, then z).
pub fn mode_of_eight(v: &[u64]) -> u64 {
    if v[0] == v[1] && v[0] == v[2] && v[0] == v[3] {
        return v[0];
    }
    if v[4] == v[5] && v[4] == v[6] && v[4] == v[7] {
        return v[4];
    }
    let (mut best, mut best_count) = (0u64, 0usize);
    for &cand in v {
        let count = v.iter().filter(|&&w| w == cand).count();
        if count >= 4 {
            return cand;
        }
        if count > best_count {
            best = cand;
            best_count = count;
        }
    }
    best
}

/// float32 sums in tinybrain's order: its SSE path adds `(a+c)+(b+d)` for x below the last
/// multiple of 8, its scalar path `((a+b)+c)+d`; odd edges double the missing half.
fn average_f32(values: &[f32], shape: Vec3, factor: Factor, mips: u32) -> Vec<Vec<f32>> {
    if mips == 1 {
        let (sums, _) = build_level(values, shape, factor, |a, o| {
            let (mut s, mut err) = (0.0f32, 0.0f32);
            for p in clamped_block(o, shape, factor) {
                let (t, e) = two_sum(s, at(a, p));
                s = t;
                err += e;
            }
            s + err
        });
        let divisor = (1u64 << factor.bits()) as f32;
        return vec![sums.iter().map(|s| s / divisor).collect()];
    }
    let mut sums = values.to_vec();
    let mut shape = shape;
    let mut outs = Vec::new();
    for level in 1..=mips {
        let (next, next_shape) = build_level(&sums, shape, factor, |a, o| {
            f32_block_sum(a, o, shape, factor)
        });
        let divisor = (1u64 << (factor.bits() * level)) as f32;
        outs.push(next.iter().map(|s| s / divisor).collect());
        sums = next;
        shape = next_shape;
    }
    outs
}

/// Error-free transformation: `a + b == s + e` exactly.
fn two_sum(a: f32, b: f32) -> (f32, f32) {
    let s = a + b;
    let bb = s - a;
    (s, (a - (s - bb)) + (b - bb))
}

fn f32_block_sum(a: &ArrayView3<'_, f32>, o: [usize; 3], shape: Vec3, factor: Factor) -> f32 {
    let (x, y, z) = (o[0] * 2, o[1] * 2, o[2] * factor.z());
    let x_pair = x + 1 < shape[0];
    let y_pair = y + 1 < shape[1];
    if factor.z() == 1 {
        let va = at(a, [x, y, z]);
        if !y_pair {
            let row = if x_pair {
                va + at(a, [x + 1, y, z])
            } else {
                va * 2.0
            };
            return row * 2.0;
        }
        let vc = at(a, [x, y + 1, z]);
        if !x_pair {
            return va * 2.0 + vc * 2.0;
        }
        let (vb, vd) = (at(a, [x + 1, y, z]), at(a, [x + 1, y + 1, z]));
        let simd_end = (shape[0] >> 3) << 3;
        return if x < simd_end {
            (va + vc) + (vb + vd)
        } else {
            ((va + vb) + vc) + vd
        };
    }
    let z_pair = z + 1 < shape[2];
    let mut acc = 0.0f32;
    for zz in z..z + 1 + z_pair as usize {
        for yy in y..y + 1 + y_pair as usize {
            if x_pair {
                acc += at(a, [x, yy, zz]);
                acc += at(a, [x + 1, yy, zz]);
            } else {
                acc += at(a, [x, yy, zz]) * 2.0;
            }
        }
    }
    if !y_pair {
        acc *= 2.0;
    }
    if !z_pair {
        acc *= 2.0;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u8_volume(shape: Vec3, data: Vec<u8>) -> Volume {
        Volume::from_bytes(DataType::Uint8, shape, 1, data).unwrap()
    }

    #[test]
    fn odd_row_averages_the_voxels_that_exist() {
        // The tinybrain single-mip bug case: cuboids must give [15, 35, 50].
        let vol = u8_volume([5, 1, 1], vec![10, 20, 30, 40, 50]);
        let out = downsample_cpu(&vol, Method::Average, Factor::ANISOTROPIC, 1).unwrap();
        assert_eq!(out[0].data, vec![15, 35, 50]);
    }

    #[test]
    fn averages_floor_like_igneous() {
        let vol = u8_volume([2, 2, 1], vec![1, 2, 2, 2]);
        let out = downsample_cpu(&vol, Method::Average, Factor::ANISOTROPIC, 1).unwrap();
        assert_eq!(out[0].data, vec![1]);
    }

    #[test]
    fn countless_picks_the_mode() {
        let vol = Volume::from_bytes(
            DataType::Uint32,
            [2, 2, 1],
            1,
            [7u32, 3, 3, 9]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        )
        .unwrap();
        let out = downsample_cpu(&vol, Method::Mode, Factor::ANISOTROPIC, 1).unwrap();
        assert_eq!(out[0].data, 3u32.to_le_bytes().to_vec());
    }

    #[test]
    fn mode_of_eight_prefers_four_of_a_kind_then_first_best() {
        assert_eq!(mode_of_eight(&[1, 2, 3, 4, 5, 5, 6, 7]), 5);
        assert_eq!(mode_of_eight(&[1, 2, 1, 2, 3, 3, 3, 3]), 3);
        assert_eq!(mode_of_eight(&[9, 2, 2, 9, 1, 2, 9, 4]), 9);
    }

    #[test]
    fn sixteen_bit_sums_renormalise_every_four_mips() {
        let s = SumSchedule::new(DataType::Uint8, Factor::ANISOTROPIC);
        assert_eq!(
            (1..=6).map(|l| s.render_shift(l)).collect::<Vec<_>>(),
            vec![2, 4, 6, 8, 2, 4]
        );
        assert_eq!(s.carry_shift(4), 8);
        assert_eq!(s.carry_shift(3), 0);
    }

    #[test]
    fn rejects_unsupported_types() {
        assert!(check_supported(Method::Mode, DataType::Uint8).is_err());
        assert!(check_supported(Method::Average, DataType::Uint64).is_err());
        assert!(Factor::new([2, 1, 1]).is_err());
    }
}
