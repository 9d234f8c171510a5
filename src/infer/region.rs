//! One region of the output from the global patch grid: every patch whose output meets the
//! region is run (in grid order) and blended, so a region's bytes do not depend on how the
//! volume was split.

use super::blend::{Blender, PatchGrid};
use super::cpu;
use super::model::{InferError, Model};
use crate::dtype::DataType;
use crate::geometry::{Box3, Vec3};
use crate::ops::nn::Tensor;
use crate::volume::Volume;

/// Runs a model on one patch (N = 1, C, z, y, x). The CPU reference runs it here; a GPU
/// executor takes the same input.
pub trait Executor: Send + Sync {
    fn run(&self, patch: Tensor) -> Result<Tensor, InferError>;
    /// Whether patches of `shape` can run here at all (a GPU's binding limit), checked before
    /// anything is read or written.
    fn check(&self, _shape: &[usize]) -> Result<(), InferError> {
        Ok(())
    }
    /// Which engine this is, for reports and logs.
    fn engine(&self) -> &'static str;
}

/// The CPU reference operators ([`crate::ops::nn`]), node by node.
pub struct CpuExecutor {
    pub model: Model,
}

impl Executor for CpuExecutor {
    fn run(&self, patch: Tensor) -> Result<Tensor, InferError> {
        cpu::run(&self.model, patch)
    }

    fn engine(&self) -> &'static str {
        "cpu-reference"
    }
}

/// What one region took.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionReport {
    /// Patches run through the net.
    pub patches: usize,
    /// Patches whose input was all zero (their output is zero, the net is not run).
    pub skipped: usize,
}

/// The image as the net sees it: channels of float32 (x fastest), integers divided by their
/// type's largest value (uint8 / 255), floats as they are (chunkflow's normalisation).
pub fn normalised(image: &Volume) -> Vec<f32> {
    let bytes = &image.data;
    match image.dtype {
        DataType::Uint8 => bytes.iter().map(|&v| v as f32 / u8::MAX as f32).collect(),
        DataType::Int8 => bytes
            .iter()
            .map(|&v| v as i8 as f32 / i8::MAX as f32)
            .collect(),
        DataType::Uint16 => words::<2>(bytes)
            .map(|b| u16::from_le_bytes(b) as f32 / u16::MAX as f32)
            .collect(),
        DataType::Int16 => words::<2>(bytes)
            .map(|b| i16::from_le_bytes(b) as f32 / i16::MAX as f32)
            .collect(),
        DataType::Uint32 => words::<4>(bytes)
            .map(|b| u32::from_le_bytes(b) as f32 / u32::MAX as f32)
            .collect(),
        DataType::Int32 => words::<4>(bytes)
            .map(|b| i32::from_le_bytes(b) as f32 / i32::MAX as f32)
            .collect(),
        DataType::Uint64 => words::<8>(bytes)
            .map(|b| u64::from_le_bytes(b) as f32 / u64::MAX as f32)
            .collect(),
        DataType::Float32 => bytemuck::pod_collect_to_vec(bytes),
    }
}

fn words<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes.chunks_exact(N).map(|b| b.try_into().unwrap())
}

/// The input box a region's patches read (the union of their input patches).
pub fn input_box(grid: &PatchGrid, region: Box3) -> Option<Box3> {
    let patches = grid.patches_meeting(region);
    let first = *patches.first()?;
    let mut b = Box3::new(first, first);
    for p in patches {
        b.start = [0, 1, 2].map(|a| b.start[a].min(p[a]));
        b.stop = [0, 1, 2].map(|a| b.stop[a].max(p[a] + grid.input_patch[a]));
    }
    Some(b)
}

/// Blends the output of `region` (channels × region, x fastest) from `image` (normalised,
/// `image_channels` channels over `image_box`, which must hold [`input_box`]).
#[allow(clippy::too_many_arguments)]
pub fn infer_region(
    executor: &dyn Executor,
    grid: &PatchGrid,
    mask: &[f32],
    image: &[f32],
    image_box: Box3,
    image_channels: usize,
    region: Box3,
    channels: usize,
) -> Result<(Vec<f32>, RegionReport), InferError> {
    let mut blender = Blender::new(region, channels);
    let mut report = RegionReport::default();
    let image_shape = image_box.shape();
    let image_voxels: usize = image_shape.iter().product();
    let patch = grid.input_patch;
    let patch_voxels: usize = patch.iter().product();
    let output_voxels: usize = grid.output_patch.iter().product();
    for start in grid.patches_meeting(region) {
        let mut data = Vec::with_capacity(patch_voxels * image_channels);
        for c in 0..image_channels {
            let channel = &image[c * image_voxels..][..image_voxels];
            for z in 0..patch[2] {
                for y in 0..patch[1] {
                    let at = at_in(image_box, [start[0], start[1] + y, start[2] + z]);
                    data.extend_from_slice(&channel[at..][..patch[0]]);
                }
            }
        }
        let output = grid.output_box(start);
        if data.iter().all(|&v| v == 0.0) {
            report.skipped += 1;
            blender.add(output, mask, None);
            continue;
        }
        let input = Tensor::new(vec![1, image_channels, patch[2], patch[1], patch[0]], data);
        let out = executor.run(input)?;
        let got = &out.shape;
        let want = [
            grid.output_patch[2],
            grid.output_patch[1],
            grid.output_patch[0],
        ];
        let full = got.len() == 5 && got[0] == 1 && got[1] >= channels;
        if !full || got[2..] != want {
            return Err(InferError::Model {
                path: executor.engine().to_string(),
                message: format!(
                    "the net answered a patch with shape {got:?}, where [1, {channels}+, {}, {}, {}] was expected",
                    want[0], want[1], want[2]
                ),
            });
        }
        let weighted: Vec<f32> = out.data[..channels * output_voxels]
            .chunks_exact(output_voxels)
            .flat_map(|c| c.iter().zip(mask).map(|(v, m)| v * m))
            .collect();
        blender.add(output, mask, Some(&weighted));
        report.patches += 1;
    }
    Ok((blender.finish(), report))
}

fn at_in(b: Box3, p: Vec3) -> usize {
    let s = b.shape();
    ((p[2] - b.start[2]) * s[1] + (p[1] - b.start[1])) * s[0] + (p[0] - b.start[0])
}
