//! One command encoder's worth of GPU work: what the labelling and encoding kernels share.

use crate::geometry::Vec3;
use crate::gpu::context::{GpuContext, GpuError};
use crate::gpu::kernels::KernelId;
use bytemuck::Pod;
use wgpu::util::DeviceExt;

/// Threads per workgroup of the 1-D dispatches ([`Work::dispatch`]).
pub(crate) const GROUP: u32 = 64;

/// The workgroup of the 3-D labelling kernels: 16x16 voxels of one z plane.
pub(crate) const GROUP_3D: [u32; 3] = [16, 16, 1];

/// One command encoder's worth of GPU work and the helpers its functions share: pooled
/// buffers, staged uploads, dispatches (timed one by one with `CUBOIDS_PROFILE_KERNELS`) and
/// read-back.
pub(crate) struct Work<'a> {
    pub(crate) ctx: &'a GpuContext,
    pub(crate) encoder: wgpu::CommandEncoder,
    op: &'static str,
    /// Storage buffers taken from the context's pool, returned to it when the work is dropped:
    /// chunks of one run have the same few sizes, and fresh buffers cost page faults on every
    /// chunk (on lavapipe their memory is the host's).
    pooled: Vec<wgpu::Buffer>,
    /// Upload staging buffers recorded since the last submission.
    uploads: Vec<wgpu::Buffer>,
}

impl Drop for Work<'_> {
    fn drop(&mut self) {
        self.ctx.recycle(self.pooled.drain(..));
    }
}

impl<'a> Work<'a> {
    pub(crate) fn new(ctx: &'a GpuContext, op: &'static str) -> Work<'a> {
        Work {
            ctx,
            encoder: ctx.device.create_command_encoder(&Default::default()),
            op,
            pooled: Vec::new(),
            uploads: Vec::new(),
        }
    }

    /// Fails with `TooLarge` when `bytes` would not fit one binding of this adapter.
    pub(crate) fn check_size(&self, what: &str, bytes: u64) -> Result<(), GpuError> {
        let limit = self.ctx.max_binding_bytes();
        if bytes > limit {
            return Err(GpuError::TooLarge {
                what: format!("{what} for {}", self.op),
                needed: bytes,
                limit,
            });
        }
        Ok(())
    }

    /// A storage buffer (from the pool) holding `data` for this work's kernels
    /// ([`GpuContext::upload_storage`]: written in place on a CPU adapter, else through a pooled
    /// staging buffer in this work's next submission).
    pub(crate) fn upload(&mut self, what: &str, data: &[u8]) -> Result<wgpu::Buffer, GpuError> {
        self.upload_with(what, data.len(), |view| view.copy_from_slice(data))
    }

    /// [`Self::upload`] of `len` bytes that `write` puts there: for data rearranged on the way,
    /// written once.
    pub(crate) fn upload_with(
        &mut self,
        what: &str,
        len: usize,
        write: impl FnOnce(&mut wgpu::WriteOnly<'_, [u8]>),
    ) -> Result<wgpu::Buffer, GpuError> {
        self.check_size(what, (len.div_ceil(4).max(1) * 4) as u64)?;
        let ctx = self.ctx;
        let (buffer, staging) = ctx.scoped(self.op, || {
            ctx.upload_storage(&mut self.encoder, what, len, write)
        })?;
        self.pooled.push(buffer.clone());
        self.uploads.extend(staging);
        Ok(buffer)
    }

    /// Submits what was recorded; upload staging buffers go back to their pool after it.
    pub(crate) fn submit(&mut self) -> Result<wgpu::SubmissionIndex, GpuError> {
        let ctx = self.ctx;
        let encoder = std::mem::replace(
            &mut self.encoder,
            ctx.device.create_command_encoder(&Default::default()),
        );
        let submission = ctx.scoped(self.op, || ctx.queue.submit([encoder.finish()]))?;
        ctx.reuse_uploads(self.uploads.drain(..));
        Ok(submission)
    }

    pub(crate) fn uniform<T: Pod>(&self, params: &T) -> wgpu::Buffer {
        self.ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::bytes_of(params),
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }

    /// A zeroed storage buffer of `words` u32s (from the pool, cleared by the GPU in order).
    pub(crate) fn storage(&mut self, what: &str, words: usize) -> Result<wgpu::Buffer, GpuError> {
        let buffer = self.scratch(what, words)?;
        self.encoder.clear_buffer(&buffer, 0, None);
        Ok(buffer)
    }

    /// A storage buffer whose contents start undefined: for output a kernel writes before
    /// anything reads it (clearing a large one costs a pass over its memory).
    pub(crate) fn scratch(&mut self, what: &str, words: usize) -> Result<wgpu::Buffer, GpuError> {
        let bytes = (words.max(1) * 4) as u64;
        self.check_size(what, bytes)?;
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        let buffer = self
            .ctx
            .scoped(self.op, || self.ctx.buffer(what, bytes, usage))?;
        self.pooled.push(buffer.clone());
        Ok(buffer)
    }

    /// Records a dispatch of `invocations` threads of `shader::entry` with `bindings`.
    pub(crate) fn dispatch(
        &mut self,
        shader: &'static str,
        entry: &'static str,
        bindings: &[(u32, &wgpu::Buffer)],
        invocations: usize,
    ) -> Result<(), GpuError> {
        let max = self.ctx.limits.max_compute_workgroups_per_dimension;
        let groups = (invocations.max(1) as u64).div_ceil(GROUP as u64);
        let (gx, gy) = if groups <= max as u64 {
            (groups as u32, 1)
        } else {
            (max, groups.div_ceil(max as u64) as u32)
        };
        if gy > max {
            return Err(GpuError::TooLarge {
                what: format!("a dispatch of {invocations} threads for {}", self.op),
                needed: groups,
                limit: max as u64 * max as u64,
            });
        }
        self.record(shader, entry, bindings, [gx, gy, 1])
    }

    /// Records a dispatch of one invocation per voxel of a box of `extent` voxels, in
    /// [`GROUP_3D`] workgroups: kernels get their voxel's position without dividing.
    pub(crate) fn dispatch_box(
        &mut self,
        shader: &'static str,
        entry: &'static str,
        bindings: &[(u32, &wgpu::Buffer)],
        extent: Vec3,
    ) -> Result<(), GpuError> {
        let max = self.ctx.limits.max_compute_workgroups_per_dimension as u64;
        let groups = [0, 1, 2].map(|a| (extent[a].max(1) as u64).div_ceil(GROUP_3D[a] as u64));
        if let Some(&over) = groups.iter().find(|&&g| g > max) {
            return Err(GpuError::TooLarge {
                what: format!("a dispatch over a {extent:?} box for {}", self.op),
                needed: over,
                limit: max,
            });
        }
        self.record(shader, entry, bindings, groups.map(|g| g as u32))
    }

    pub(crate) fn record(
        &mut self,
        shader: &'static str,
        entry: &'static str,
        bindings: &[(u32, &wgpu::Buffer)],
        groups: [u32; 3],
    ) -> Result<(), GpuError> {
        let pipeline = self.ctx.pipeline(KernelId::Entry { shader, entry })?;
        let ctx = self.ctx;
        let encoder = &mut self.encoder;
        ctx.scoped(self.op, || {
            let entries: Vec<_> = bindings
                .iter()
                .map(|(binding, buffer)| wgpu::BindGroupEntry {
                    binding: *binding,
                    resource: buffer.as_entire_binding(),
                })
                .collect();
            let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(entry),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        })?;
        if ctx.profile_kernels {
            self.time_kernel(&format!("{shader}::{entry}"), groups)?;
        }
        Ok(())
    }

    /// Runs what was recorded so far and logs how long it took: with
    /// [`GpuContext::profile_kernels`], each kernel is timed on its own (at the cost of a wait
    /// after each).
    pub(crate) fn time_kernel(&mut self, kernel: &str, groups: [u32; 3]) -> Result<(), GpuError> {
        let ctx = self.ctx;
        let start = std::time::Instant::now();
        self.submit()?;
        ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
        tracing::info!(
            kernel,
            ?groups,
            ms = start.elapsed().as_secs_f64() * 1e3,
            "kernel time"
        );
        Ok(())
    }

    /// Submits what was recorded, then copies `buffers` back and returns their words.
    pub(crate) fn finish(&mut self, buffers: &[&wgpu::Buffer]) -> Result<Vec<Vec<u32>>, GpuError> {
        let whole: Vec<(&wgpu::Buffer, u64)> = buffers.iter().map(|&b| (b, b.size())).collect();
        self.finish_prefixes(&whole)
    }

    /// [`Self::finish`] for the first `bytes` of each buffer (a multiple of 4, at least 4).
    pub(crate) fn finish_prefixes(
        &mut self,
        buffers: &[(&wgpu::Buffer, u64)],
    ) -> Result<Vec<Vec<u32>>, GpuError> {
        let ctx = self.ctx;
        let staging: Vec<wgpu::Buffer> = buffers
            .iter()
            .map(|&(b, bytes)| {
                let usage = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
                let s = ctx.buffer("readback", size_class(bytes), usage);
                self.encoder.copy_buffer_to_buffer(b, 0, &s, 0, bytes);
                s
            })
            .collect();
        let submission = self.submit()?;
        ctx.map_for_reading(submission, &staging.iter().collect::<Vec<_>>(), self.op)?;
        let words = staging
            .iter()
            .zip(buffers)
            .map(|(s, &(_, bytes))| {
                let mapped = s.get_mapped_range(..bytes).expect("mapped");
                let words = bytemuck::cast_slice::<u8, u32>(&mapped).to_vec();
                drop(mapped);
                s.unmap();
                words
            })
            .collect();
        ctx.recycle(staging);
        Ok(words)
    }
}

/// `bytes` rounded up to one of a few sizes per power of two (at most 1/8 more; up to 64 KiB, to
/// a power of two): the size of a
/// pooled buffer whose length changes from chunk to chunk (read-backs of packed region graphs,
/// lists of deferred voxels), so that the pool serves it instead of a fresh allocation each
/// time, whose pages a CPU adapter pays for in page faults.
pub(crate) fn size_class(bytes: u64) -> u64 {
    if bytes <= 1 << 16 {
        return bytes.next_power_of_two().max(4);
    }
    let step = 1u64 << (63 - bytes.leading_zeros() - 3);
    bytes.next_multiple_of(step)
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_round_up_by_at_most_an_eighth() {
        for bytes in [
            4u64,
            12,
            4096,
            65_536,
            65_540,
            1 << 20,
            (1 << 20) + 4,
            10_000_004,
            1 << 33,
        ] {
            let class = size_class(bytes);
            assert!(
                class >= bytes && class.is_multiple_of(4),
                "{bytes} -> {class}"
            );
            assert!(
                bytes <= 1 << 16 || class - bytes <= bytes / 8,
                "{bytes} -> {class}"
            );
        }
        // Lengths a little apart share a size.
        assert_eq!(size_class(9_000_000), size_class(9_400_000));
    }
}
