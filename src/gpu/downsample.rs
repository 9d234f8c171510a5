//! GPU downsampling of one channel of one slab: all requested mips in a single submission, with
//! intermediate levels kept on the GPU.

use crate::dtype::DataType;
use crate::geometry::{voxels, Vec3};
use crate::gpu::context::{GpuContext, GpuError};
use crate::gpu::kernels::KernelId;
use crate::ops::downsample::{Factor, Method, SumSchedule};
use bytemuck::{Pod, Zeroable};
use std::sync::Arc;
use tracing::debug_span;
use wgpu::util::DeviceExt;

const WORKGROUP: usize = 64;

/// Mirrors `Params` in shaders/common.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct Params {
    in_size: [u32; 3],
    fz: u32,
    out_size: [u32; 3],
    in_pitch: u32,
    out_pitch: u32,
    carry_shift: u32,
    render_shift: u32,
    scale_bits: u32,
    write_sums: u32,
    exact_sum: u32,
    opaque_zero: u32,
    pad: u32,
}

/// What one level's dispatch reads: the slab itself, the previous level's sums or its output.
#[derive(Clone, Copy)]
enum Source {
    Input,
    PreviousSums,
    PreviousOutput,
}

struct LevelPlan {
    kernel: KernelId,
    source: Source,
    uses_sums: bool,
    /// Output voxels each invocation writes (several narrow voxels share one u32 word).
    voxels_per_thread: usize,
}

fn level_plan(dtype: DataType, method: Method, factor: Factor, level: u32) -> LevelPlan {
    let first = level == 1;
    let previous = if first {
        Source::Input
    } else {
        Source::PreviousOutput
    };
    match (method, dtype) {
        (Method::Average, DataType::Uint8 | DataType::Uint16) => {
            let bytes = dtype.size() as u32;
            LevelPlan {
                kernel: if first {
                    KernelId::AverageIntFromPacked { bytes }
                } else {
                    KernelId::AverageIntFromSums { bytes }
                },
                source: if first {
                    Source::Input
                } else {
                    Source::PreviousSums
                },
                uses_sums: true,
                voxels_per_thread: 4 / bytes as usize,
            }
        }
        (Method::Average, DataType::Float32) => LevelPlan {
            kernel: KernelId::AverageF32,
            source: if first {
                Source::Input
            } else {
                Source::PreviousSums
            },
            uses_sums: true,
            voxels_per_thread: 1,
        },
        (Method::Average, _) => LevelPlan {
            kernel: KernelId::AverageU32,
            source: previous,
            uses_sums: false,
            voxels_per_thread: 1,
        },
        (Method::Mode, _) => LevelPlan {
            kernel: KernelId::Mode {
                words: dtype.size() as u32 / 4,
                fz: factor.z() as u32,
            },
            source: previous,
            uses_sums: false,
            voxels_per_thread: 1,
        },
    }
}

/// Bytes of a buffer holding `n` voxels of `elem` bytes, padded to whole u32 words.
fn word_bytes(n: usize, elem: usize) -> u64 {
    ((n * elem).div_ceil(4) * 4).max(4) as u64
}

/// Row pitch in voxels: packed narrow voxels start every row on a whole word.
fn pitch(x: usize, elem: usize) -> usize {
    if elem < 4 {
        x.next_multiple_of(4 / elem)
    } else {
        x
    }
}

/// Packs Fortran-ordered rows of `pitch` voxels into rows of `x` voxels (what a level read back
/// from the GPU holds when the pitch exceeds the width; [`write_pitched`] goes the other way).
fn unpitch(data: &[u8], x: usize, rows: usize, pitch: usize, elem: usize) -> Vec<u8> {
    let n = x * elem;
    let mut out = vec![0u8; n * rows];
    for r in 0..rows {
        out[r * n..(r + 1) * n].copy_from_slice(&data[r * pitch * elem..r * pitch * elem + n]);
    }
    out
}

/// Writes rows of `row` bytes from `data` into `out` every `pitch` bytes, zeros between them.
fn write_pitched(out: &mut wgpu::WriteOnly<'_, [u8]>, data: &[u8], row: usize, pitch: usize) {
    let pad = [0u8; 4];
    for (r, src) in data.chunks_exact(row).enumerate() {
        out.slice(r * pitch..r * pitch + row).copy_from_slice(src);
        out.slice(r * pitch + row..(r + 1) * pitch)
            .copy_from_slice(&pad[..pitch - row]);
    }
}

/// Downsamples one channel of a slab (`input`: Fortran-order voxels of `shape`) and returns the
/// bytes of levels 1..=mips. The slab must fit the adapter's binding limit (the planner sizes it).
pub fn downsample_channel_gpu(
    ctx: &GpuContext,
    input: &[u8],
    dtype: DataType,
    shape: Vec3,
    method: Method,
    factor: Factor,
    mips: u32,
) -> Result<Vec<Vec<u8>>, GpuError> {
    submit_channel_gpu(ctx, input, dtype, shape, method, factor, mips)?.wait(ctx)
}

/// A slab submitted to the GPU whose levels have not been read back yet. Keeping one slab in
/// flight while the next is uploaded overlaps host copies with kernels.
pub struct PendingSlab {
    submission: wgpu::SubmissionIndex,
    readbacks: Vec<(wgpu::Buffer, Vec3, usize)>,
    retired: Vec<wgpu::Buffer>,
    /// The last level's buffer, when the caller keeps it on the GPU.
    kept: Option<wgpu::Buffer>,
    elem: usize,
}

impl PendingSlab {
    /// Waits for this slab's submission and returns the bytes of its levels 1..=mips.
    pub fn wait(self, ctx: &GpuContext) -> Result<Vec<Vec<u8>>, GpuError> {
        let out = read_back(ctx, self.submission, self.readbacks, self.elem);
        ctx.recycle(self.retired);
        ctx.recycle(self.kept);
        out
    }

    /// As [`Self::wait`], handing each level `k` (from 0) to `take(k, bytes, shape, row pitch in
    /// voxels)` straight from its mapped read-back buffer instead of returning copies.
    pub fn wait_with(
        self,
        ctx: &GpuContext,
        take: impl FnMut(usize, &[u8], Vec3, usize),
    ) -> Result<(), GpuError> {
        let out = read_back_with(ctx, self.submission, self.readbacks, take);
        ctx.recycle(self.retired);
        ctx.recycle(self.kept);
        out
    }

    /// As [`Self::wait`], and also returns the last level's GPU buffer.
    fn wait_keeping(mut self, ctx: &GpuContext) -> Result<(Vec<Vec<u8>>, wgpu::Buffer), GpuError> {
        let kept = self.kept.take().expect("submitted with keep_last");
        Ok((self.wait(ctx)?, kept))
    }
}

/// A single-channel volume left on the GPU by an earlier computation, packed in Fortran order
/// (its rows must be whole u32 words). `--all-levels` keeps Boss cuboids this way, so the next
/// level reads them without a host round trip.
pub struct GpuVolume {
    buffer: wgpu::Buffer,
    pub shape: Vec3,
    pub dtype: DataType,
}

impl GpuVolume {
    pub fn bytes(&self) -> u64 {
        self.buffer.size()
    }

    /// Copies the voxels back to host memory (for a block too large to assemble on the GPU).
    pub fn to_host(&self, ctx: &GpuContext) -> Result<Vec<u8>, GpuError> {
        let size = self.buffer.size();
        let staging = ctx.buffer(
            "readback",
            size,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&self.buffer, 0, &staging, 0, size);
        let submission = ctx.scoped("reading a cuboid back", || {
            ctx.queue.submit([encoder.finish()])
        })?;
        let mut levels = read_back(
            ctx,
            submission,
            vec![(staging, self.shape, self.shape[0])],
            self.dtype.size(),
        )?;
        Ok(levels.pop().expect("one buffer"))
    }
}

/// One piece of a block to downsample: resident on the GPU or in host memory, placed at `at`.
pub enum BlockPart<'a> {
    Gpu(&'a GpuVolume),
    Host(&'a [u8], Vec3),
}

/// Whether [`downsample_block_resident`] can take a block of this shape and type: one binding
/// of the adapter, rows of whole words.
pub fn block_fits(ctx: &GpuContext, dtype: DataType, shape: Vec3) -> bool {
    (shape[0] * dtype.size()).is_multiple_of(4)
        && (voxels(shape) * dtype.size()) as u64 <= ctx.max_binding_bytes()
}

/// Assembles a block on the GPU from `parts` (missing parts stay zero) and downsamples it one
/// level. Returns the level read back and left on the GPU.
pub fn downsample_block_resident(
    ctx: &GpuContext,
    dtype: DataType,
    shape: Vec3,
    parts: &[(Vec3, BlockPart)],
    method: Method,
    factor: Factor,
) -> Result<(Vec<u8>, GpuVolume), GpuError> {
    let elem = dtype.size();
    assert!(block_fits(ctx, dtype, shape), "callers check block_fits");
    let bytes = (voxels(shape) * elem) as u64;
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
    let block = ctx.scoped("assembling a block", || {
        let block = ctx.buffer("block", bytes, usage);
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        encoder.clear_buffer(&block, 0, None);
        let mut uploads = Vec::new();
        for (at, part) in parts {
            let (source, part_shape) = match part {
                BlockPart::Gpu(v) => (&v.buffer, v.shape),
                BlockPart::Host(data, part_shape) => {
                    let staging = ctx.filled_staging(data.len(), |view| {
                        view.copy_from_slice(data);
                    });
                    uploads.push(staging);
                    (uploads.last().expect("pushed"), *part_shape)
                }
            };
            copy_rows(&mut encoder, source, part_shape, &block, shape, *at, elem);
        }
        ctx.queue.submit([encoder.finish()]);
        ctx.reuse_uploads(uploads);
        block
    })?;
    let pending = submit_levels(ctx, block, shape[0], dtype, shape, method, factor, 1, true)?;
    let (mut levels, kept) = pending.wait_keeping(ctx)?;
    Ok((
        levels.pop().expect("one level"),
        GpuVolume {
            buffer: kept,
            shape: factor.level_shape(shape),
            dtype,
        },
    ))
}

/// Copies a packed Fortran volume of `part` into a packed block of `block` at `at`, row by row.
fn copy_rows(
    encoder: &mut wgpu::CommandEncoder,
    source: &wgpu::Buffer,
    part: Vec3,
    target: &wgpu::Buffer,
    block: Vec3,
    at: Vec3,
    elem: usize,
) {
    let row = (part[0] * elem) as u64;
    debug_assert!(
        row.is_multiple_of(4)
            && (at[0] * elem).is_multiple_of(4)
            && (block[0] * elem).is_multiple_of(4)
    );
    for z in 0..part[2] {
        for y in 0..part[1] {
            let from = ((part[1] * z + y) * part[0] * elem) as u64;
            let to = (((at[2] + z) * block[1] + at[1] + y) * block[0] + at[0]) * elem;
            encoder.copy_buffer_to_buffer(source, from, target, to as u64, row);
        }
    }
}

/// Uploads a slab and submits all its levels; see [`downsample_channel_gpu`].
pub fn submit_channel_gpu(
    ctx: &GpuContext,
    input: &[u8],
    dtype: DataType,
    shape: Vec3,
    method: Method,
    factor: Factor,
    mips: u32,
) -> Result<PendingSlab, GpuError> {
    let _span = debug_span!("gpu_submit", ?shape, mips).entered();
    let elem = dtype.size();
    let limit = ctx.max_binding_bytes();
    let in_pitch = pitch(shape[0], elem);
    let rows = shape[1] * shape[2];
    let input_bytes = word_bytes(in_pitch * rows, elem);
    if input_bytes > limit {
        return Err(GpuError::TooLarge {
            what: format!("a {shape:?} {dtype} slab"),
            needed: input_bytes,
            limit,
        });
    }
    let input_buffer = ctx.scoped("uploading the slab", || {
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let len = in_pitch * rows * elem;
        let (buffer, staging) = ctx.upload_storage(&mut encoder, "slab", len, |view| {
            if in_pitch == shape[0] {
                view.copy_from_slice(input)
            } else {
                write_pitched(view, input, shape[0] * elem, in_pitch * elem)
            }
        });
        if let Some(staging) = staging {
            ctx.queue.submit([encoder.finish()]);
            ctx.reuse_uploads([staging]);
        }
        buffer
    })?;
    submit_levels(
        ctx,
        input_buffer,
        in_pitch,
        dtype,
        shape,
        method,
        factor,
        mips,
        false,
    )
}

/// Records and submits levels 1..=mips of a slab already on the GPU (`input_buffer`, rows of
/// `in_pitch` voxels). With `keep_last`, the last level's buffer is kept for the caller
/// ([`PendingSlab::wait_keeping`]) instead of going back to the pool.
#[allow(clippy::too_many_arguments)]
fn submit_levels(
    ctx: &GpuContext,
    input_buffer: wgpu::Buffer,
    in_pitch: usize,
    dtype: DataType,
    shape: Vec3,
    method: Method,
    factor: Factor,
    mips: u32,
    keep_last: bool,
) -> Result<PendingSlab, GpuError> {
    let elem = dtype.size();
    let device = &ctx.device;
    let schedule = SumSchedule::new(dtype, factor);
    let mut encoder = device.create_command_encoder(&Default::default());
    let mut readbacks = Vec::new();
    let mut previous_sums: Option<wgpu::Buffer> = None;
    let mut previous_out: Option<wgpu::Buffer> = None;
    // Buffers no later level reads: returned to the pool once the submission is done.
    let mut retired = Vec::new();
    let mut in_shape = shape;
    let mut in_pitch = in_pitch;
    let max_groups = ctx.limits.max_compute_workgroups_per_dimension as usize;
    for level in 1..=mips {
        let plan = level_plan(dtype, method, factor, level);
        let out_shape = factor.level_shape(in_shape);
        let out_pitch = pitch(out_shape[0], elem);
        let out_n = out_pitch * out_shape[1] * out_shape[2];
        let out_bytes = word_bytes(out_n, elem);
        let groups = [
            out_shape[0]
                .div_ceil(plan.voxels_per_thread)
                .div_ceil(WORKGROUP),
            out_shape[1],
            out_shape[2],
        ];
        if groups.iter().any(|&g| g > max_groups) {
            return Err(GpuError::TooLarge {
                what: format!("a dispatch of {groups:?} workgroups for a {out_shape:?} level"),
                needed: *groups.iter().max().unwrap() as u64,
                limit: max_groups as u64,
            });
        }
        let params = Params {
            in_size: in_shape.map(|v| v as u32),
            fz: factor.z() as u32,
            out_size: out_shape.map(|v| v as u32),
            in_pitch: in_pitch as u32,
            out_pitch: out_pitch as u32,
            carry_shift: schedule.carry_shift(level - 1),
            render_shift: schedule.render_shift(level),
            scale_bits: (1.0f32 / (1u64 << (factor.bits() * level)) as f32).to_bits(),
            write_sums: (level < mips) as u32,
            exact_sum: (mips == 1) as u32,
            opaque_zero: 0,
            pad: 0,
        };
        let pipeline: Arc<wgpu::ComputePipeline> = ctx.pipeline(plan.kernel)?;
        let (sums, out, staging) = ctx.scoped("encoding a downsampling level", || {
            let storage =
                |label, size, extra| ctx.buffer(label, size, wgpu::BufferUsages::STORAGE | extra);
            let sums = plan
                .uses_sums
                .then(|| storage("sums", word_bytes(out_n, 4), wgpu::BufferUsages::empty()));
            let out = storage("level", out_bytes, wgpu::BufferUsages::COPY_SRC);
            let staging = ctx.buffer(
                "readback",
                out_bytes,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            );
            let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::bytes_of(&params),
                usage: wgpu::BufferUsages::UNIFORM,
            });
            let source = match plan.source {
                Source::Input => &input_buffer,
                Source::PreviousSums => previous_sums.as_ref().expect("level > 1"),
                Source::PreviousOutput => previous_out.as_ref().expect("level > 1"),
            };
            let mut entries = vec![
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: uniform.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: source.as_entire_binding(),
                },
            ];
            if let Some(s) = &sums {
                entries.push(wgpu::BindGroupEntry {
                    binding: 2,
                    resource: s.as_entire_binding(),
                });
            }
            entries.push(wgpu::BindGroupEntry {
                binding: 3,
                resource: out.as_entire_binding(),
            });
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                pass.dispatch_workgroups(groups[0] as u32, groups[1] as u32, groups[2] as u32);
            }
            encoder.copy_buffer_to_buffer(&out, 0, &staging, 0, out_bytes);
            (sums, out, staging)
        })?;
        readbacks.push((staging, out_shape, out_pitch));
        retired.extend(previous_sums.take());
        retired.extend(previous_out.take());
        previous_sums = sums;
        previous_out = Some(out);
        in_shape = out_shape;
        in_pitch = out_pitch;
    }
    let submission = ctx.scoped("submitting", || ctx.queue.submit([encoder.finish()]))?;
    retired.push(input_buffer);
    retired.extend(previous_sums);
    let kept = if keep_last {
        previous_out
    } else {
        retired.extend(previous_out);
        None
    };
    Ok(PendingSlab {
        submission,
        readbacks,
        retired,
        kept,
        elem,
    })
}

fn read_back(
    ctx: &GpuContext,
    submission: wgpu::SubmissionIndex,
    readbacks: Vec<(wgpu::Buffer, Vec3, usize)>,
    elem: usize,
) -> Result<Vec<Vec<u8>>, GpuError> {
    let mut levels = Vec::with_capacity(readbacks.len());
    read_back_with(ctx, submission, readbacks, |_, view, shape, pitch| {
        let rows = shape[1] * shape[2];
        levels.push(if pitch == shape[0] {
            view[..voxels(shape) * elem].to_vec()
        } else {
            unpitch(view, shape[0], rows, pitch, elem)
        });
    })?;
    Ok(levels)
}

/// Waits for `submission` and hands each read-back buffer's mapped bytes to `take(index, bytes,
/// shape, row pitch in voxels)`, then returns the buffer to the pool: the caller copies the
/// voxels where they go, with no copy of their own in between.
fn read_back_with(
    ctx: &GpuContext,
    submission: wgpu::SubmissionIndex,
    readbacks: Vec<(wgpu::Buffer, Vec3, usize)>,
    mut take: impl FnMut(usize, &[u8], Vec3, usize),
) -> Result<(), GpuError> {
    let buffers: Vec<&wgpu::Buffer> = readbacks.iter().map(|(b, _, _)| b).collect();
    ctx.map_for_reading(submission, &buffers, "downsampling")?;
    for (k, (buffer, shape, pitch)) in readbacks.into_iter().enumerate() {
        {
            let view = buffer.get_mapped_range(..).expect("mapped above");
            take(k, &view, shape, pitch);
        }
        buffer.unmap();
        ctx.recycle([buffer]);
    }
    Ok(())
}
