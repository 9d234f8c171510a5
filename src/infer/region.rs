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

/// Runs a model on patches (N, C, z, y, x; N = 1 unless [`Executor::batch`] says more). The CPU
/// reference runs it here; a GPU executor takes the same input.
pub trait Executor: Send + Sync {
    fn run(&self, patch: Tensor) -> Result<Tensor, InferError>;
    /// How many patches of `shape` (N = 1) to run at once: 1 unless running several fills the
    /// device better (a GPU), each patch's output the same as alone.
    fn batch(&self, _shape: &[usize]) -> usize {
        1
    }
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

/// The patches whose output meets `region`, in z rows (grid order: rows by their input z
/// start, each row y then x): what a column is streamed by.
pub fn rows_meeting(grid: &PatchGrid, region: Box3) -> Vec<(usize, Vec<Vec3>)> {
    let mut rows: Vec<(usize, Vec<Vec3>)> = Vec::new();
    for p in grid.patches_meeting(region) {
        match rows.last_mut() {
            Some((z, row)) if *z == p[2] => row.push(p),
            _ => rows.push((p[2], vec![p])),
        }
    }
    rows
}

/// The normalised image over a column's input box (x, y) for a window of z planes, plane
/// major (then channel, x fastest), so that planes are appended above and dropped below as
/// the rows of patches move up the column.
pub struct ImageWindow {
    /// The x, y extent held (its z is ignored).
    pub extent: Box3,
    pub channels: usize,
    /// The first plane held.
    pub z0: usize,
    data: Vec<f32>,
}

impl ImageWindow {
    pub fn new(extent: Box3, channels: usize) -> ImageWindow {
        ImageWindow {
            extent,
            channels,
            z0: 0,
            data: Vec::new(),
        }
    }

    fn plane(&self) -> usize {
        self.extent.shape()[0] * self.extent.shape()[1]
    }

    /// The plane past the last held.
    pub fn z1(&self) -> usize {
        self.z0 + self.data.len() / (self.plane() * self.channels).max(1)
    }

    /// Appends `planes` planes of normalised image (channel major, x fastest over the
    /// window's x, y extent), which must start at [`ImageWindow::z1`] (or anywhere when the
    /// window is empty).
    pub fn append(&mut self, z: usize, planes: usize, image: &[f32]) {
        let plane = self.plane();
        if planes == 0 {
            return;
        }
        if self.data.is_empty() {
            self.z0 = z;
        }
        assert_eq!(z, self.z1(), "image planes appended out of order");
        assert_eq!(image.len(), planes * plane * self.channels);
        self.data.reserve(image.len());
        for zi in 0..planes {
            for c in 0..self.channels {
                self.data
                    .extend_from_slice(&image[(c * planes + zi) * plane..][..plane]);
            }
        }
    }

    /// Drops the planes below `z`.
    pub fn drop_below(&mut self, z: usize) {
        let n = z.clamp(self.z0, self.z1()) - self.z0;
        self.data.drain(..n * self.plane() * self.channels);
        self.z0 += n;
    }

    /// One input patch (channels × patch, x fastest) starting at `start`, which the window
    /// must hold.
    pub fn patch(&self, start: Vec3, patch: Vec3) -> Vec<f32> {
        let (e, plane) = (self.extent, self.plane());
        let width = e.shape()[0];
        let mut data = Vec::with_capacity(patch.iter().product::<usize>() * self.channels);
        for c in 0..self.channels {
            for z in start[2]..start[2] + patch[2] {
                let base = ((z - self.z0) * self.channels + c) * plane;
                for y in start[1]..start[1] + patch[1] {
                    let at = base + (y - e.start[1]) * width + (start[0] - e.start[0]);
                    data.extend_from_slice(&self.data[at..][..patch[0]]);
                }
            }
        }
        data
    }

    /// Bytes it holds now.
    pub fn bytes(&self) -> usize {
        self.data.capacity() * 4
    }
}

/// Runs one row of patches (their input in `image`) and adds their output to `blender`, in
/// the row's order; patches run [`Executor::batch`] at a time.
pub fn infer_row(
    executor: &dyn Executor,
    grid: &PatchGrid,
    mask: &[f32],
    image: &ImageWindow,
    row: &[Vec3],
    blender: &mut Blender,
) -> Result<RegionReport, InferError> {
    let mut report = RegionReport::default();
    let patch = grid.input_patch;
    let shape = [1, image.channels, patch[2], patch[1], patch[0]];
    let batch = executor.batch(&shape).max(1);
    // Patches in row order (an all-zero one's input is None), blended once the batch of those
    // with input has run: the blend's order, and so its sums, stay the row's.
    let mut queue: Vec<(Vec3, Option<Vec<f32>>)> = Vec::new();
    for (i, &start) in row.iter().enumerate() {
        let data = image.patch(start, patch);
        let zero = data.iter().all(|&v| v == 0.0);
        queue.push((start, (!zero).then_some(data)));
        let full = queue.iter().filter(|(_, d)| d.is_some()).count() == batch;
        if full || i + 1 == row.len() {
            run_queue(
                executor,
                grid,
                mask,
                &shape,
                &mut queue,
                blender,
                &mut report,
            )?;
        }
    }
    Ok(report)
}

/// Runs the queued patches that have input as one batch and blends every queued patch in
/// order; empties the queue.
fn run_queue(
    executor: &dyn Executor,
    grid: &PatchGrid,
    mask: &[f32],
    shape: &[usize; 5],
    queue: &mut Vec<(Vec3, Option<Vec<f32>>)>,
    blender: &mut Blender,
    report: &mut RegionReport,
) -> Result<(), InferError> {
    let channels = blender.channels;
    let output_voxels: usize = grid.output_patch.iter().product();
    let inputs: Vec<&Vec<f32>> = queue.iter().filter_map(|(_, d)| d.as_ref()).collect();
    let n = inputs.len();
    let out = if n > 0 {
        let mut data = Vec::with_capacity(n * inputs[0].len());
        for d in &inputs {
            data.extend_from_slice(d);
        }
        let mut batch_shape = shape.to_vec();
        batch_shape[0] = n;
        let out = executor.run(Tensor::new(batch_shape, data))?;
        check_output(executor, grid, &out.shape, n, channels)?;
        Some(out)
    } else {
        None
    };
    let mut k = 0;
    for (start, data) in queue.drain(..) {
        let output = grid.output_box(start);
        if data.is_none() {
            report.skipped += 1;
            blender.add(output, mask, None);
            continue;
        }
        let out = out.as_ref().expect("a batch ran");
        let per_patch = out.data.len() / n;
        let weighted: Vec<f32> = out.data[k * per_patch..][..channels * output_voxels]
            .chunks_exact(output_voxels)
            .flat_map(|c| c.iter().zip(mask).map(|(v, m)| v * m))
            .collect();
        blender.add(output, mask, Some(&weighted));
        report.patches += 1;
        k += 1;
    }
    Ok(())
}

/// Fails unless the net answered `n` patches with at least `channels` channels of the output
/// patch each.
fn check_output(
    executor: &dyn Executor,
    grid: &PatchGrid,
    got: &[usize],
    n: usize,
    channels: usize,
) -> Result<(), InferError> {
    let want = [
        grid.output_patch[2],
        grid.output_patch[1],
        grid.output_patch[0],
    ];
    let full = got.len() == 5 && got[0] == n && got[1] >= channels;
    if !full || got[2..] != want {
        return Err(InferError::Model {
            path: executor.engine().to_string(),
            message: format!(
                "the net answered {n} patches with shape {got:?}, where [{n}, {channels}+, {}, {}, {}] was expected",
                want[0], want[1], want[2]
            ),
        });
    }
    Ok(())
}

/// Where the output of `region` is final once the rows up to `row` have run: below the next
/// row's output (rows start in increasing z), or the region's end after the last row.
pub fn final_below(grid: &PatchGrid, region: Box3, next_row: Option<usize>) -> usize {
    match next_row {
        Some(z) => (z + grid.crop[2]).clamp(region.start[2], region.stop[2]),
        None => region.stop[2],
    }
}

/// Blends the output of `region` (channels × region, x fastest) from `image` (normalised,
/// `image_channels` channels over `image_box`, which must hold [`input_box`]), row by row as
/// a task streams a column.
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
    let mut window = ImageWindow::new(image_box, image_channels);
    window.append(image_box.start[2], image_box.shape()[2], image);
    let mut blender = Blender::new(region, channels);
    let mut report = RegionReport::default();
    for (_, row) in rows_meeting(grid, region) {
        let part = infer_row(executor, grid, mask, &window, &row, &mut blender)?;
        report.patches += part.patches;
        report.skipped += part.skipped;
    }
    Ok((blender.finish(), report))
}
