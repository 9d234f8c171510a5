//! GPU labelling of one box of a volume: connected components, the watershed and the region
//! graph. Each function labels a box whose *core* is the part it owns; the voxels around the core
//! (the halo) are read for context, and the host stitches boxes together (src/task/stitch.rs).
//!
//! Labels come back as union-find roots: `NONE` for voxels that are not nodes, else the index
//! (in the box) of the smallest voxel of the component.

use crate::geometry::{voxels, Box3, Vec3};
use crate::gpu::context::{GpuContext, GpuError};
use crate::gpu::kernels::KernelId;
use crate::ops::agglomerate::EdgeStats;
use crate::ops::connected_components::Connectivity;
use crate::ops::watershed::{Affinities, WatershedParams};
use bytemuck::{Pod, Zeroable};
use tracing::debug_span;
use wgpu::util::DeviceExt;

/// Not a node (background).
pub const NONE: u32 = u32::MAX;

const GROUP: u32 = 64;

/// The params block shared by the labelling shaders: box size, core, two scalars.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct BoxParams {
    size: [u32; 3],
    word_a: u32,
    core_start: [u32; 3],
    word_b: u32,
    core_stop: [u32; 3],
    word_c: u32,
}

fn box_params(shape: Vec3, core: Box3, words: [u32; 3]) -> BoxParams {
    BoxParams {
        size: shape.map(|v| v as u32),
        word_a: words[0],
        core_start: core.start.map(|v| v as u32),
        word_b: words[1],
        core_stop: core.stop.map(|v| v as u32),
        word_c: words[2],
    }
}

/// One command encoder's worth of labelling work and the helpers its functions share.
struct Work<'a> {
    ctx: &'a GpuContext,
    encoder: wgpu::CommandEncoder,
    op: &'static str,
}

impl<'a> Work<'a> {
    fn new(ctx: &'a GpuContext, op: &'static str) -> Work<'a> {
        Work {
            ctx,
            encoder: ctx.device.create_command_encoder(&Default::default()),
            op,
        }
    }

    /// Fails with `TooLarge` when `bytes` would not fit one binding of this adapter.
    fn check_size(&self, what: &str, bytes: u64) -> Result<(), GpuError> {
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

    fn upload(&self, what: &str, data: &[u8]) -> Result<wgpu::Buffer, GpuError> {
        self.check_size(what, data.len() as u64)?;
        self.ctx.scoped(self.op, || {
            self.ctx
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(what),
                    contents: data,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                })
        })
    }

    fn uniform(&self, params: &BoxParams) -> wgpu::Buffer {
        self.ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::bytes_of(params),
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }

    /// A zeroed storage buffer of `words` u32s.
    fn storage(&self, what: &str, words: usize) -> Result<wgpu::Buffer, GpuError> {
        let bytes = (words.max(1) * 4) as u64;
        self.check_size(what, bytes)?;
        self.ctx.scoped(self.op, || {
            self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })
    }

    /// Records a dispatch of `invocations` threads of `shader::entry` with `bindings`.
    fn dispatch(
        &mut self,
        shader: &'static str,
        entry: &'static str,
        bindings: &[(u32, &wgpu::Buffer)],
        invocations: usize,
    ) -> Result<(), GpuError> {
        let pipeline = self.ctx.pipeline(KernelId::Entry { shader, entry })?;
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
            pass.dispatch_workgroups(gx, gy, 1);
        })
    }

    /// Submits what was recorded, then copies `buffers` back and returns their words.
    fn finish(&mut self, buffers: &[&wgpu::Buffer]) -> Result<Vec<Vec<u32>>, GpuError> {
        let ctx = self.ctx;
        let staging: Vec<wgpu::Buffer> = buffers
            .iter()
            .map(|b| {
                let s = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("readback"),
                    size: b.size(),
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                self.encoder.copy_buffer_to_buffer(b, 0, &s, 0, b.size());
                s
            })
            .collect();
        let encoder = std::mem::replace(
            &mut self.encoder,
            ctx.device.create_command_encoder(&Default::default()),
        );
        let submission = ctx.scoped(self.op, || ctx.queue.submit([encoder.finish()]))?;
        ctx.map_for_reading(submission, &staging.iter().collect::<Vec<_>>(), self.op)?;
        Ok(staging
            .iter()
            .map(|s| {
                let words =
                    bytemuck::cast_slice::<u8, u32>(&s.get_mapped_range(..).expect("mapped"))
                        .to_vec();
                s.unmap();
                words
            })
            .collect())
    }
}

/// Connected components of `values > threshold` in a box of `shape`: core voxels unite with
/// their backward neighbours (see [`Connectivity::backward_offsets`]). Returns each voxel's root.
pub fn connected_components_box(
    ctx: &GpuContext,
    values: &[f32],
    shape: Vec3,
    core: Box3,
    threshold: f32,
    connectivity: Connectivity,
) -> Result<Vec<u32>, GpuError> {
    let _span = debug_span!("gpu_connected_components", ?shape).entered();
    let n = voxels(shape);
    assert_eq!(values.len(), n);
    let max_axes = match connectivity {
        Connectivity::Six => 1,
        Connectivity::Eighteen => 2,
        Connectivity::TwentySix => 3,
    };
    let mut work = Work::new(ctx, "connected components");
    let params = work.uniform(&box_params(
        shape,
        core,
        [max_axes, threshold.to_bits(), n as u32],
    ));
    let values = work.upload("values", bytemuck::cast_slice(values))?;
    let parent = work.storage("labels", n)?;
    let all = [(0, &params), (1, &parent), (2, &values)];
    work.dispatch("connected_components", "init", &all, n)?;
    work.dispatch("connected_components", "unite_backward", &all, n)?;
    work.dispatch("connected_components", "flatten", &[(1, &parent)], n)?;
    Ok(work.finish(&[&parent])?.remove(0))
}

/// What the watershed of one box leaves for the host.
#[derive(Clone, Debug)]
pub struct WatershedBox {
    /// Union-find roots of every voxel of the box.
    pub roots: Vec<u32>,
    /// Core plateau voxels whose plateau leaves the core: their pointers are chosen on the host,
    /// over the whole plateau. Empty in a box that is the whole volume.
    pub deferred: Vec<DeferredVoxel>,
    /// Relaxation rounds the plateau distances took.
    pub rounds: u32,
}

/// A plateau voxel of the core whose pointer the host chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeferredVoxel {
    /// Index in the box.
    pub index: u32,
    /// Bidirectional candidate directions (waterz order).
    pub bidirectional: u8,
    /// Which of those lead to an exit.
    pub to_exit: u8,
}

/// Relaxation dispatches recorded between two checks for convergence.
const RELAX_PER_CHECK: usize = 8;

/// The watershed of one box (see src/ops/watershed.rs for the rules). `aff` covers the box; its
/// core must keep 3 voxels of margin to the box wherever the box does not end at the volume.
pub fn watershed_box(
    ctx: &GpuContext,
    aff: &Affinities,
    core: Box3,
    params: WatershedParams,
) -> Result<WatershedBox, GpuError> {
    let shape = aff.shape;
    let _span = debug_span!("gpu_watershed", ?shape).entered();
    let n = voxels(shape);
    let mut work = Work::new(ctx, "the watershed");
    let uniform = work.uniform(&box_params(
        shape,
        core,
        [n as u32, params.low.to_bits(), params.high.to_bits()],
    ));
    let [ax, ay, az] =
        [0, 1, 2].map(|c| work.upload("affinities", bytemuck::cast_slice(&aff.channels[c])));
    let (ax, ay, az) = (ax?, ay?, az?);
    let candidates = work.storage("candidates", n)?;
    let info = work.storage("voxel info", n)?;
    let relax = work.storage("plateau distances", 2 * n)?;
    let flags = work.storage("flags", 3)?;
    let plateau_list = work.storage("plateau voxels", n)?;
    let parent = work.storage("labels", n)?;
    const S: &str = "watershed";
    work.dispatch(
        S,
        "edges",
        &[
            (0, &uniform),
            (2, &ax),
            (3, &ay),
            (4, &az),
            (5, &candidates),
        ],
        n,
    )?;
    work.dispatch(
        S,
        "exits",
        &[
            (0, &uniform),
            (1, &parent),
            (5, &candidates),
            (6, &info),
            (7, &relax),
            (8, &flags),
            (9, &plateau_list),
        ],
        n,
    )?;
    let plateau_voxels = work.finish(&[&flags])?[0][2] as usize;
    let mut rounds = 0;
    let mut converged = plateau_voxels == 0;
    while !converged {
        work.encoder.clear_buffer(&flags, 0, Some(4));
        for _ in 0..RELAX_PER_CHECK {
            work.dispatch(
                S,
                "relax",
                &[
                    (0, &uniform),
                    (6, &info),
                    (7, &relax),
                    (8, &flags),
                    (9, &plateau_list),
                ],
                plateau_voxels,
            )?;
        }
        rounds += 1;
        converged = work.finish(&[&flags])?[0][0] == 0;
    }
    work.dispatch(
        S,
        "unite_pointers",
        &[
            (0, &uniform),
            (1, &parent),
            (6, &info),
            (7, &relax),
            (8, &flags),
        ],
        n,
    )?;
    work.dispatch(S, "flatten", &[(1, &parent)], n)?;
    let mut out = work.finish(&[&parent, &flags])?;
    let deferred_count = out[1][1];
    let roots = out.swap_remove(0);
    let deferred = if deferred_count == 0 {
        Vec::new()
    } else {
        let mut words = work.finish(&[&info, &relax])?;
        let relax = words.pop().expect("two buffers");
        let info = words.pop().expect("two buffers");
        deferred_voxels(&info, &relax[n..], shape, core)
    };
    Ok(WatershedBox {
        roots,
        deferred,
        rounds,
    })
}

/// The tainted plateau voxels of the core, with what the host needs to finish their plateaus.
fn deferred_voxels(info: &[u32], taint: &[u32], shape: Vec3, core: Box3) -> Vec<DeferredVoxel> {
    use crate::ops::watershed::{bidirectional, is_plateau, Grid};
    let grid = Grid { shape };
    let mut out = Vec::new();
    for z in core.start[2]..core.stop[2] {
        for y in core.start[1]..core.stop[1] {
            for x in core.start[0]..core.stop[0] {
                let i = grid.index([x, y, z]);
                if taint[i] == 0 || !is_plateau(info[i]) {
                    continue;
                }
                let bidir = bidirectional(info[i]);
                let to_exit = (0..6)
                    .filter(|&d| bidir & (1 << d) != 0)
                    .filter(|&d| {
                        let j = grid.neighbour(i, d).expect("bidirectional edges exist");
                        info[j] & crate::ops::watershed::bits::EXIT != 0
                    })
                    .fold(0u8, |acc, d| acc | 1 << d);
                out.push(DeferredVoxel {
                    index: i as u32,
                    bidirectional: bidir as u8,
                    to_exit,
                });
            }
        }
    }
    out
}

/// A fragment pair (low id, high id) and its edge statistics.
pub type RegionEdge = ((u32, u32), EdgeStats);

/// Slots of the region-graph table per fragment of the core at first: regions in 3-D touch a
/// dozen or so others.
const SLOTS_PER_FRAGMENT: usize = 16;

/// The region graph of the core of a box of fragments (0 = background): every edge between a
/// core voxel and its -x, -y, -z neighbour (core or halo) joining two different fragments.
pub fn region_graph_box(
    ctx: &GpuContext,
    fragments: &[u32],
    aff: &Affinities,
    core: Box3,
) -> Result<Vec<RegionEdge>, GpuError> {
    let shape = aff.shape;
    let _span = debug_span!("gpu_region_graph", ?shape).entered();
    let n = voxels(shape);
    assert_eq!(fragments.len(), n);
    let mut distinct = fragments.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let mut capacity = (distinct.len() * SLOTS_PER_FRAGMENT)
        .max(1024)
        .next_power_of_two();
    let max_capacity = (ctx.max_binding_bytes() / 20).max(1) as usize;
    loop {
        let mut work = Work::new(ctx, "the region graph");
        let cap = capacity.min(max_capacity.next_power_of_two() / 2).max(1);
        let uniform = work.uniform(&box_params(shape, core, [n as u32, cap as u32, 0]));
        let frags = work.upload("fragments", bytemuck::cast_slice(fragments))?;
        let [ax, ay, az] =
            [0, 1, 2].map(|c| work.upload("affinities", bytemuck::cast_slice(&aff.channels[c])));
        let (ax, ay, az) = (ax?, ay?, az?);
        let table = work.storage("region graph table", cap * 5)?;
        let flags = work.storage("flags", 1)?;
        work.dispatch(
            "region_graph",
            "accumulate",
            &[
                (0, &uniform),
                (1, &frags),
                (2, &ax),
                (3, &ay),
                (4, &az),
                (5, &table),
                (6, &flags),
            ],
            n,
        )?;
        let out = work.finish(&[&table, &flags])?;
        if out[1][0] == 0 {
            return Ok(out[0]
                .chunks_exact(5)
                .filter(|s| s[0] != 0)
                .map(|s| {
                    (
                        (s[0], s[1]),
                        EdgeStats {
                            count: s[2] as u64,
                            sum: s[3] as u64 | (s[4] as u64) << 32,
                        },
                    )
                })
                .collect());
        }
        if cap >= max_capacity.next_power_of_two() / 2 {
            return Err(GpuError::TooLarge {
                what: "the region graph of one chunk (use a smaller --chunk-size)".into(),
                needed: (capacity * 20) as u64,
                limit: ctx.max_binding_bytes(),
            });
        }
        capacity *= 2;
    }
}
