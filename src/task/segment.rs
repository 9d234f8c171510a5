//! `segment` and `connected-components` over precomputed volumes, chunk by chunk on the GPU and
//! without seams: a chunked run writes exactly what one whole-region run writes.
//!
//! Segment, in one pass over the chunks of the region and three on the host:
//! 1. watershed of each chunk's core (affinities read with a 3-voxel margin, enough for every
//!    rule of src/ops/watershed.rs to see what it needs) on the GPU, and in the same submission
//!    the core's region graph (fixed-point sums, so exact), keyed by the roots still on the GPU:
//!    affinities are uploaded once and no labels go back up;
//! 2. plateaus that cross chunk faces (rare: they need exact ties) are resolved over their whole
//!    extent, chunks are glued along their faces ([`crate::task::stitch`]) and fragments
//!    numbered by first voxel;
//! 3. the chunks' region graphs are translated to fragment ids and summed;
//! 4. agglomeration of the whole graph on the CPU, then the output chunks are written.
//!
//! Connected components needs passes 1, 2 and the write. Chunk labels are kept in host memory
//! (4 bytes per voxel) between passes.

use crate::dtype::DataType;
use crate::formats::precomputed::info::{Encoding, Info, LayerType, Scale};
use crate::formats::precomputed::{
    chunk_grid, chunk_key, count_as_encoding, ChunkCache, ChunkData, Precomputed, PrecomputedError,
    WriteOptions,
};
use crate::geometry::{voxels, Box3, Vec3};
use crate::gpu::compressed_segmentation::{encode_chunks_gpu, encodes_scale};
use crate::gpu::labeling::{
    connected_components_box, watershed_box, BlockMasks, DeferredVoxel, RegionEdge,
};
use crate::gpu::{GpuContext, GpuError};
use crate::hash::IdBuildHasher;
use crate::ops::agglomerate::{
    agglomerate_sorted, pair_key, sum_sorted_runs, EdgeStats, GraphEdge,
};
use crate::ops::connected_components::Connectivity;
use crate::ops::watershed::{Affinities, AffinityView, Grid, WatershedParams, DIRECTIONS, FAR};
use crate::progress::Progress;
use crate::store::Store;
use crate::task::downsample::{source_region, Bounds, TaskError};
use crate::task::stitch::{ChunkGrid, ChunkLabels, FinalLabels, LabelBoxes, Numbering, Stitcher};
use crate::volume::{BufferPool, Volume};
use futures::{StreamExt, TryStreamExt};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Error)]
pub enum SegmentError {
    #[error(transparent)]
    Precomputed(#[from] PrecomputedError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error("{location}: {field} {message}")]
    Input {
        location: String,
        field: &'static str,
        message: String,
    },
    #[error(
        "output {location} exists and does not match: {field} is {existing}, expected {expected}"
    )]
    OutputMismatch {
        location: String,
        field: &'static str,
        existing: String,
        expected: String,
    },
    #[error("background task failed")]
    Join(#[from] tokio::task::JoinError),
    #[error(
        "stopped before it finished (cancelled); no chunk of this run was left in a new output"
    )]
    Cancelled,
}

/// Options both commands share.
#[derive(Clone, Debug)]
pub struct ChunkOptions {
    /// Absolute voxel bounds at mip 0; the whole volume when `None`. Voxels outside do not exist
    /// for the run, and bounds must follow the output's chunk grid.
    pub bounds: Option<Bounds>,
    /// Core of each GPU chunk; rounded up to whole output chunks. `None`: the largest default
    /// (256x256x64) that fits the adapter.
    pub chunk_size: Option<Vec3>,
    /// Output chunk size; the input's when `None`.
    pub output_chunk_size: Option<Vec3>,
    pub fill_missing: bool,
    pub write: WriteOptions,
    /// Decoded input chunks kept in memory, so that the margins that neighbouring GPU chunks
    /// share do not fetch chunks again (0: none kept).
    pub cache_bytes: usize,
    /// Checked before each GPU chunk, between passes and before each output chunk: once
    /// cancelled, the run stops, lets the chunk writes under way finish, and removes what it
    /// wrote to an output it was creating.
    pub cancel: Option<CancellationToken>,
}

/// Default input chunk cache: 1 GiB.
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;

impl Default for ChunkOptions {
    fn default() -> Self {
        ChunkOptions {
            bounds: None,
            chunk_size: None,
            output_chunk_size: None,
            fill_missing: false,
            write: WriteOptions::default(),
            cache_bytes: DEFAULT_CACHE_BYTES,
            cancel: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SegmentOptions {
    pub chunks: ChunkOptions,
    pub watershed: WatershedParams,
    /// Merge while `1 - mean affinity < threshold`.
    pub threshold: f64,
}

#[derive(Clone, Debug)]
pub struct ComponentsOptions {
    pub chunks: ChunkOptions,
    pub threshold: f64,
    pub connectivity: Connectivity,
    /// Components smaller than this many voxels are removed (0 keeps all).
    pub dust: u64,
}

/// What a run did, for the report line.
#[derive(Clone, Debug, Default)]
pub struct SegmentReport {
    pub voxels: u64,
    pub chunks: usize,
    pub fragments: usize,
    pub segments: usize,
    pub merges: usize,
    pub region_edges: usize,
    /// Plateau voxels resolved on the host because their plateau crossed a chunk face.
    pub deferred: usize,
    pub chunks_written: usize,
    /// Input chunks fetched from the store, and reads served from the chunk cache instead.
    pub chunks_fetched: usize,
    pub chunks_from_cache: usize,
    pub wall: Duration,
    /// Time per pass: label, stitch, region graph, agglomerate, write.
    pub passes: Vec<(&'static str, Duration)>,
}

impl SegmentReport {
    pub fn mvx_per_s(&self) -> f64 {
        self.voxels as f64 / 1e6 / self.wall.as_secs_f64().max(1e-9)
    }

    /// The report for people: throughput and counts, then each pass's share of the wall time,
    /// so that the next bottleneck is visible.
    pub fn describe(&self, what: &str) -> Vec<String> {
        let wall = self.wall.as_secs_f64().max(f64::MIN_POSITIVE);
        let passes: Vec<String> = self
            .passes
            .iter()
            .map(|(name, d)| {
                let s = d.as_secs_f64();
                format!("{name} {s:.2} s ({:.0}%)", 100.0 * s / wall)
            })
            .collect();
        vec![
            format!(
                "{what}: {:.1} MVx in {:.2} s = {:.1} MVx/s; {} chunks, {} fragments, {} segments ({} merges, {} region-graph edges, {} plateau voxels stitched on the host), {} chunks written; input chunks: {} fetched, {} reads from the cache",
                self.voxels as f64 / 1e6,
                self.wall.as_secs_f64(),
                self.mvx_per_s(),
                self.chunks,
                self.fragments,
                self.segments,
                self.merges,
                self.region_edges,
                self.deferred,
                self.chunks_written,
                self.chunks_fetched,
                self.chunks_from_cache,
            ),
            format!("  passes: {}", passes.join(", ")),
        ]
    }
}

/// The resolved layout of a run: region (scale-relative), chunk grid, output volume and the
/// input chunk cache.
#[derive(Clone)]
pub(crate) struct Layout {
    pub(crate) region: Box3,
    pub(crate) grid: ChunkGrid,
    pub(crate) output: Precomputed,
    pub(crate) output_is_new: bool,
    cache: Arc<ChunkCache>,
    /// Buffers of the boxes a pass reads (a 256x256x64 affinity box with its margin is 58 MB):
    /// reused from chunk to chunk, since fresh ones cost a page fault per 4 KiB.
    boxes: Arc<BufferPool>,
    cancel: Option<CancellationToken>,
}

impl Layout {
    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.is_cancelled())
    }

    /// Whether the run was cancelled, as a check that passes on blocking threads can own.
    pub(crate) fn stop_check(&self) -> impl Fn() -> bool + Send + 'static {
        let cancel = self.cancel.clone();
        move || cancel.as_ref().is_some_and(|c| c.is_cancelled())
    }

    /// Fails with [`SegmentError::Cancelled`] once the run was cancelled.
    pub(crate) fn check_cancel(&self) -> Result<(), SegmentError> {
        if self.cancelled() {
            Err(SegmentError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Reads a region-relative box of the input (every channel) through the chunk cache.
    async fn read_box(
        &self,
        input: &Precomputed,
        b: Box3,
        fill_missing: bool,
    ) -> Result<Volume, SegmentError> {
        let rel = b.offset_by(self.region.start);
        Ok(input
            .read_region_into(0, rel, fill_missing, Some(&self.cache), Some(&self.boxes))
            .await?
            .0)
    }

    fn count_reads(&self, report: &mut SegmentReport) {
        (report.chunks_from_cache, report.chunks_fetched) = self.cache.counts();
    }
}

pub(crate) const DEFAULT_CHUNK: Vec3 = [256, 256, 64];

/// Box buffers kept for reuse: the boxes being labelled and the one read ahead, and a spare.
const BOXES_KEPT: usize = LABELS_IN_FLIGHT + 2;

/// u32 words per box voxel in the largest buffer the watershed binds (the plateau distances and
/// taint): the default chunk shrinks until that buffer fits one binding of the adapter.
const WATERSHED_BINDING_WORDS: u64 = 2;

/// `max_binding_bytes`: the adapter's storage binding limit, which bounds the default chunk.
pub(crate) async fn layout(
    max_binding_bytes: u64,
    input: &Precomputed,
    output_store: Arc<dyn Store>,
    opts: &ChunkOptions,
    margin: usize,
) -> Result<Layout, SegmentError> {
    let scale = input.scale(0);
    let region = source_region(scale, opts.bounds)?;
    let out_chunk = opts.output_chunk_size.unwrap_or(scale.chunk_size());
    let location = output_store.location();
    for a in 0..3 {
        let aligned = |v: usize| v.is_multiple_of(out_chunk[a]) || v == scale.size[a];
        if !aligned(region.start[a]) || !aligned(region.stop[a]) {
            return Err(SegmentError::Input {
                location: input.store.location(),
                field: "bounds",
                message: format!(
                    "{:?}..{:?} (relative to voxel_offset) must follow the output chunk grid {out_chunk:?}",
                    region.start, region.stop
                ),
            });
        }
    }
    let chunk = match opts.chunk_size {
        Some(c) => c,
        None => {
            let mut c = DEFAULT_CHUNK;
            let fits = |c: Vec3| {
                voxels(c.map(|v| v + 2 * margin)) as u64 * 4 * WATERSHED_BINDING_WORDS
                    <= max_binding_bytes
            };
            while !fits(c) && c.iter().any(|&v| v > 16) {
                let a = (0..3).max_by_key(|&a| c[a]).expect("3 axes");
                c[a] /= 2;
            }
            c
        }
    };
    let chunk = [0, 1, 2].map(|a| chunk[a].max(1).next_multiple_of(out_chunk[a]));
    let grid = ChunkGrid {
        region: region.shape(),
        chunk,
    };
    let wanted = output_info(&input.info, out_chunk);
    let (output, output_is_new) = match Precomputed::open(output_store.clone()).await {
        Ok(existing) => {
            check_output(&existing, &wanted, &location)?;
            (existing, false)
        }
        Err(PrecomputedError::MissingInfo { .. }) => (Precomputed::new(output_store, wanted), true),
        Err(e) => return Err(e.into()),
    };
    Ok(Layout {
        region,
        grid,
        output,
        output_is_new,
        cache: Arc::new(ChunkCache::new(opts.cache_bytes)),
        boxes: Arc::new(BufferPool::new(BOXES_KEPT)),
        cancel: opts.cancel.clone(),
    })
}

/// A uint64 compressed_segmentation layer with the input's first scale.
fn output_info(input: &Info, chunk: Vec3) -> Info {
    let s = &input.scales[0];
    Info {
        layer_type: LayerType::Segmentation,
        data_type: DataType::Uint64,
        num_channels: 1,
        scales: vec![Scale {
            key: s.key.clone(),
            size: s.size,
            resolution: s.resolution,
            voxel_offset: s.voxel_offset,
            chunk_sizes: vec![chunk],
            encoding: Encoding::CompressedSegmentation,
            compressed_segmentation_block_size: Some([8, 8, 8]),
            sharding: None,
            extra: Default::default(),
        }],
        extra: Default::default(),
    }
}

fn check_output(existing: &Precomputed, wanted: &Info, location: &str) -> Result<(), SegmentError> {
    let mismatch = |field, existing: String, expected: String| SegmentError::OutputMismatch {
        location: location.to_string(),
        field,
        existing,
        expected,
    };
    let (e, w) = (&existing.info, &wanted.scales[0]);
    if e.data_type != DataType::Uint64 || e.num_channels != 1 {
        return Err(mismatch(
            "data_type",
            format!("{} x{}", e.data_type, e.num_channels),
            "uint64 x1".into(),
        ));
    }
    let s = &e.scales[0];
    if s.size != w.size || s.voxel_offset != w.voxel_offset {
        return Err(mismatch(
            "scales[0].size/voxel_offset",
            format!("{:?} at {:?}", s.size, s.voxel_offset),
            format!("{:?} at {:?}", w.size, w.voxel_offset),
        ));
    }
    if s.is_sharded() {
        return Err(mismatch(
            "scales[0].sharding",
            "sharded (cuboids does not write sharded scales yet)".into(),
            "unsharded".into(),
        ));
    }
    Ok(())
}

/// Float channels of a volume: float32 as is (borrowed from the volume's bytes where they are
/// aligned, which they are as allocated; else copied), uint8 scaled by 1/255 (affinities stored
/// as bytes, converted into `converted`).
fn affinities_of<'a>(
    vol: &'a Volume,
    location: &str,
    converted: &'a mut Option<Affinities>,
) -> Result<AffinityView<'a>, SegmentError> {
    if vol.channels != 3 {
        return Err(SegmentError::Input {
            location: location.into(),
            field: "num_channels",
            message: format!("is {}; an affinity map has 3 (x, y, z)", vol.channels),
        });
    }
    let borrowed = || -> Option<[&[f32]; 3]> {
        let [x, y, z] = [0, 1, 2].map(|c| bytemuck::try_cast_slice::<u8, f32>(vol.channel(c)));
        Some([x.ok()?, y.ok()?, z.ok()?])
    };
    let channel = |c: usize| -> Vec<f32> {
        let bytes = vol.channel(c);
        match vol.dtype {
            DataType::Uint8 => bytes.iter().map(|&b| b as f32 / 255.0).collect(),
            _ => bytemuck::pod_collect_to_vec(bytes),
        }
    };
    match vol.dtype {
        DataType::Float32 => {
            if let Some(channels) = borrowed() {
                return Ok(AffinityView {
                    shape: vol.shape,
                    channels,
                });
            }
        }
        DataType::Uint8 => {}
        other => {
            return Err(SegmentError::Input {
                location: location.into(),
                field: "data_type",
                message: format!("is {other}; affinities must be float32 or uint8"),
            })
        }
    }
    let owned = converted.insert(Affinities {
        shape: vol.shape,
        channels: [channel(0), channel(1), channel(2)],
    });
    Ok(owned.view())
}

/// The foreground (`value > threshold`) of a one-channel volume as block masks, compared in the
/// volume's own type: float32 as f32 (as cc3d compares a float32 array), integers exactly.
fn foreground_masks(
    vol: &Volume,
    threshold: f64,
    location: &str,
) -> Result<BlockMasks, SegmentError> {
    if vol.channels != 1 {
        return Err(SegmentError::Input {
            location: location.into(),
            field: "num_channels",
            message: format!("is {}; connected components needs 1", vol.channels),
        });
    }
    let bytes = vol.channel(0);
    let shape = vol.shape;
    Ok(match vol.dtype {
        DataType::Float32 => {
            let t = threshold as f32;
            // Decoded chunks are word-aligned in practice; a copy only where they are not.
            let values: std::borrow::Cow<[f32]> = match bytemuck::try_cast_slice(bytes) {
                Ok(aligned) => aligned.into(),
                Err(_) => bytemuck::pod_collect_to_vec(bytes).into(),
            };
            BlockMasks::from_fn(shape, |i| values[i] > t)
        }
        DataType::Uint8 => BlockMasks::from_fn(shape, |i| bytes[i] as f64 > threshold),
        DataType::Uint16 => BlockMasks::from_fn(shape, |i| {
            u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as f64 > threshold
        }),
        DataType::Uint32 => BlockMasks::from_fn(shape, |i| {
            u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()) as f64 > threshold
        }),
        other => {
            return Err(SegmentError::Input {
                location: location.into(),
                field: "data_type",
                message: format!(
                    "is {other}; connected components reads float32, uint8, uint16 or uint32"
                ),
            })
        }
    })
}

/// How [`label_chunks`] reads and labels the chunks of one pass.
pub(crate) struct ChunkPass {
    /// The pass's name in progress output.
    pub name: &'static str,
    /// Voxels read around each chunk's core.
    pub margin: usize,
    pub fill_missing: bool,
    /// Chunks labelled at once ([`labels_in_flight`]).
    pub in_flight: usize,
}

impl ChunkPass {
    pub fn new(name: &'static str, margin: usize, fill_missing: bool, ctx: &GpuContext) -> Self {
        ChunkPass {
            name,
            margin,
            fill_missing,
            in_flight: labels_in_flight(ctx),
        }
    }
}

/// Pass 1 for both commands: labels every chunk on the GPU, reading the next chunk while the
/// current ones compute. `label` gets (box, core within the box, the box's volume).
pub(crate) async fn label_chunks<F>(
    pass: ChunkPass,
    input: &Precomputed,
    layout: &Layout,
    chunks: &[usize],
    label: F,
) -> Result<Stitcher, SegmentError>
where
    F: Fn(Box3, Box3, &Volume) -> Result<ChunkLabels, SegmentError> + Send + Sync + 'static,
{
    let ChunkPass {
        name,
        margin,
        fill_missing,
        in_flight,
    } = pass;
    let label = Arc::new(label);
    let grid = layout.grid;
    let mut stitcher = Stitcher::new(grid);
    let boxed = move |c: usize| grid.grown(grid.core(c), margin, margin);
    let read = |c: usize| {
        let input = input.clone();
        let reader = layout.clone();
        tokio::spawn(async move { reader.read_box(&input, boxed(c), fill_missing).await })
    };
    let mut next = chunks.first().map(|&c| read(c));
    let total = chunks
        .iter()
        .map(|&c| voxels(grid.core(c).shape()) as u64)
        .sum();
    let progress = Progress::new(name, total);
    // Chunks being labelled, oldest first; their labels join the stitcher in chunk order.
    let mut labelling = VecDeque::with_capacity(in_flight);
    for (k, &c) in chunks.iter().enumerate() {
        layout.check_cancel()?;
        let vol = next.take().expect("read ahead").await??;
        if let Some(&after) = chunks.get(k + 1) {
            next = Some(read(after));
        }
        if labelling.len() >= in_flight.max(1) {
            let (done, labels) = finish_labelling(&mut labelling).await?;
            stitcher.insert(done, labels);
            progress.add(voxels(grid.core(done).shape()) as u64);
        }
        let (b, core) = (boxed(c), grid.core(c));
        let local_core = core.relative_to(b.start);
        let (label, boxes) = (label.clone(), layout.boxes.clone());
        labelling.push_back((
            c,
            tokio::task::spawn_blocking(move || {
                let labels = label(b, local_core, &vol);
                boxes.give(vol.data);
                labels
            }),
        ));
    }
    while !labelling.is_empty() {
        let (done, labels) = finish_labelling(&mut labelling).await?;
        stitcher.insert(done, labels);
        progress.add(voxels(grid.core(done).shape()) as u64);
    }
    progress.finish();
    Ok(stitcher)
}

/// Chunks labelled at once: while one chunk's labels are read back and numbered on the host, the
/// next one's kernels run (on lavapipe the host work would otherwise leave the cores idle between
/// submissions; on a GPU the device would wait for the host).
const LABELS_IN_FLIGHT: usize = 2;

/// How many chunks [`label_chunks`] labels at once on `ctx`: one while kernels are being timed
/// (each kernel's time must be its own).
pub(crate) fn labels_in_flight(ctx: &GpuContext) -> usize {
    if ctx.profile_kernels {
        1
    } else {
        LABELS_IN_FLIGHT
    }
}

type Labelling = tokio::task::JoinHandle<Result<ChunkLabels, SegmentError>>;

/// Waits for the oldest chunk being labelled.
async fn finish_labelling(
    labelling: &mut VecDeque<(usize, Labelling)>,
) -> Result<(usize, ChunkLabels), SegmentError> {
    let (chunk, handle) = labelling.pop_front().expect("a chunk in flight");
    Ok((chunk, handle.await??))
}

/// Output chunks written at once.
const WRITE_CONCURRENCY: usize = 32;

/// Writes the final labels, output chunk by output chunk; on failure removes the chunks this
/// run wrote into a new volume, and the info of a new volume is written last. `gpu`, where it
/// encodes ([`GpuContext::gpu_encoding`]), encodes compressed_segmentation chunks.
pub(crate) async fn write_output(
    layout: &Layout,
    labels: Arc<impl LabelBoxes>,
    write: WriteOptions,
    area: Box3,
    write_info: bool,
    gpu: Option<Arc<GpuContext>>,
) -> Result<usize, SegmentError> {
    let out = &layout.output;
    let scale = out.scale(0).clone();
    let encoder = gpu.filter(|ctx| encodes_scale(ctx, &scale, DataType::Uint64));
    let chunks = chunk_grid(&scale, area.offset_by(layout.region.start));
    let written: Vec<String> = chunks.iter().map(|&c| chunk_key(&scale, c)).collect();
    let progress = Progress::new("write", voxels(area.shape()) as u64);
    // Filled and encoded on blocking threads and written concurrently: on S3 each put is a
    // round trip.
    let result: Result<(), SegmentError> = async {
        // Once cancelled, no new chunk starts; the writes under way finish (a dropped write
        // could leave a temporary file behind), then the written ones are removed below.
        futures::stream::iter(chunks)
            .take_while(|_| std::future::ready(!layout.cancelled()))
            .map(|chunk| {
                let labels = labels.clone();
                let progress = &progress;
                let in_region = chunk.relative_to(layout.region.start);
                let (encoder, scale) = (encoder.clone(), &scale);
                async move {
                    let key = scale.key.clone();
                    let block = scale.block_size();
                    let data = tokio::task::spawn_blocking(move || {
                        let vol = uint64_volume(chunk.shape(), &labels.labels_in(in_region));
                        match encoder {
                            Some(ctx) => encode_on_gpu(&ctx, &vol, block, key),
                            None => Ok(ChunkData::Voxels(vol)),
                        }
                    })
                    .await??;
                    out.write_chunk(0, chunk, data, write).await?;
                    progress.add(voxels(chunk.shape()) as u64);
                    Ok::<_, SegmentError>(())
                }
            })
            .buffer_unordered(WRITE_CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await?;
        progress.finish();
        layout.check_cancel()?;
        if write_info && layout.output_is_new {
            out.write_info().await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        if layout.output_is_new {
            for key in &written {
                if let Err(err) = out.store.delete(key).await {
                    tracing::warn!(key, error = %err, "could not remove a chunk of an unfinished output");
                }
            }
        }
        return Err(e);
    }
    Ok(written.len())
}

/// One output chunk encoded as compressed_segmentation on the GPU (`key`: its scale's, for
/// errors).
fn encode_on_gpu(
    ctx: &GpuContext,
    vol: &Volume,
    block: Vec3,
    key: String,
) -> Result<ChunkData, SegmentError> {
    let whole = [Box3::from_shape(vol.shape)];
    let mut encoded = count_as_encoding(|| encode_chunks_gpu(ctx, vol, &whole, block))?;
    let bytes = encoded
        .pop()
        .expect("one chunk")
        .map_err(|source| PrecomputedError::CompressedSegmentation { key, source })?;
    Ok(ChunkData::Encoded(bytes))
}

/// Labels as a uint64 volume (little-endian, high words 0).
fn uint64_volume(shape: Vec3, labels: &[u32]) -> Volume {
    let mut vol = Volume::zeros(DataType::Uint64, shape, 1);
    for (b, &l) in vol.channel_mut(0).chunks_exact_mut(8).zip(labels) {
        b[..4].copy_from_slice(&l.to_le_bytes());
    }
    vol
}

/// Voxels read around a connected-components chunk core: its neighbours, for the halo.
pub(crate) const COMPONENTS_MARGIN: usize = 1;

/// Labels one chunk's connected components on the GPU (`label_chunks`' per-chunk step).
pub(crate) fn components_labeler(
    ctx: Arc<GpuContext>,
    threshold: f64,
    connectivity: Connectivity,
    location: String,
) -> impl Fn(Box3, Box3, &Volume) -> Result<ChunkLabels, SegmentError> + Send + Sync + 'static {
    move |b, core, vol| {
        let masks = foreground_masks(vol, threshold, &location)?;
        let components = connected_components_box(&ctx, masks, connectivity)?;
        let core_in_region = core.offset_by(b.start);
        Ok(ChunkLabels::from_box_roots(&components, b, core_in_region))
    }
}

/// Thresholded connected components of `input` (one channel) into a new uint64 segmentation.
pub async fn connected_components(
    ctx: Arc<GpuContext>,
    input: &Precomputed,
    output: Arc<dyn Store>,
    opts: &ComponentsOptions,
) -> Result<SegmentReport, SegmentError> {
    let start = Instant::now();
    let layout = layout(
        ctx.max_binding_bytes(),
        input,
        output,
        &opts.chunks,
        COMPONENTS_MARGIN,
    )
    .await?;
    let mut report = SegmentReport {
        voxels: voxels(layout.region.shape()) as u64,
        chunks: layout.grid.len(),
        ..Default::default()
    };
    let location = input.store.location();
    let (threshold, connectivity) = (opts.threshold, opts.connectivity);
    let t = Instant::now();
    let all: Vec<usize> = (0..layout.grid.len()).collect();
    let pass = ChunkPass::new("label", COMPONENTS_MARGIN, opts.chunks.fill_missing, &ctx);
    let mut stitcher = label_chunks(
        pass,
        input,
        &layout,
        &all,
        components_labeler(ctx.clone(), threshold, connectivity, location),
    )
    .await?;
    report.passes.push(("label", t.elapsed()));
    let t = Instant::now();
    stitcher.glue();
    let numbering = stitcher.number();
    // Dust: drop small components and renumber the rest, still by first voxel.
    let mut keep = vec![0u32; numbering.sizes.len()];
    let mut next = 0;
    for (l, &size) in numbering.sizes.iter().enumerate().skip(1) {
        if size >= opts.dust {
            next += 1;
            keep[l] = next;
        }
    }
    report.segments = next as usize;
    report.fragments = numbering.sizes.len() - 1;
    report.passes.push(("stitch", t.elapsed()));
    let labels = stitcher.into_final(&numbering, |l| keep[l as usize]);
    finish(&layout, labels, opts.chunks.write, report, start, ctx).await
}

/// Affinity margin around a watershed chunk core (see src/gpu/labeling.rs).
pub(crate) const WATERSHED_MARGIN: usize = 3;

/// What the watershed pass leaves besides the chunks' labels: the plateau voxels whose plateau
/// crosses a chunk face (by region position), to be resolved over the whole plateau, and each
/// chunk's region graph.
#[derive(Default)]
pub(crate) struct WatershedLeftovers {
    pub(crate) deferred: HashMap<Vec3, DeferredVoxel>,
    pub(crate) partial: Vec<PartialGraph>,
}

/// Watershed and region graph of one chunk on the GPU (`label_chunks`' per-chunk step); what
/// stitching needs besides the labels goes to `leftovers`.
pub(crate) fn watershed_labeler(
    ctx: Arc<GpuContext>,
    params: WatershedParams,
    location: String,
    leftovers: Arc<std::sync::Mutex<WatershedLeftovers>>,
) -> impl Fn(Box3, Box3, &Volume) -> Result<ChunkLabels, SegmentError> + Send + Sync + 'static {
    move |b, core, vol| {
        let mut converted = None;
        let aff = affinities_of(vol, &location, &mut converted)?;
        let out = watershed_box(&ctx, aff, core, params, true)?;
        let grid = Grid { shape: aff.shape };
        let mut left = leftovers.lock().expect("no panics while held");
        for v in out.deferred {
            let p = grid.position(v.index as usize);
            left.deferred
                .insert([0, 1, 2].map(|a| p[a] + b.start[a]), v);
        }
        left.partial.push(PartialGraph {
            boxed: b,
            edges: out.region_graph,
        });
        drop(left);
        let core_in_region = core.offset_by(b.start);
        Ok(ChunkLabels::from_roots(&out.roots, b, core_in_region))
    }
}

/// Watershed, region graph and mean-affinity agglomeration of an affinity map into a new uint64
/// segmentation.
pub async fn segment(
    ctx: Arc<GpuContext>,
    input: &Precomputed,
    output: Arc<dyn Store>,
    opts: &SegmentOptions,
) -> Result<SegmentReport, SegmentError> {
    let start = Instant::now();
    let layout = layout(
        ctx.max_binding_bytes(),
        input,
        output,
        &opts.chunks,
        WATERSHED_MARGIN,
    )
    .await?;
    let grid = layout.grid;
    let mut report = SegmentReport {
        voxels: voxels(layout.region.shape()) as u64,
        chunks: grid.len(),
        ..Default::default()
    };
    let leftovers: Arc<std::sync::Mutex<WatershedLeftovers>> = Default::default();
    let t = Instant::now();
    let all: Vec<usize> = (0..layout.grid.len()).collect();
    let pass = ChunkPass::new(
        "watershed",
        WATERSHED_MARGIN,
        opts.chunks.fill_missing,
        &ctx,
    );
    let mut stitcher = label_chunks(
        pass,
        input,
        &layout,
        &all,
        watershed_labeler(
            ctx.clone(),
            opts.watershed,
            input.store.location(),
            leftovers.clone(),
        ),
    )
    .await?;
    report.passes.push(("watershed", t.elapsed()));
    layout.check_cancel()?;
    let t = Instant::now();
    stitcher.glue();
    let WatershedLeftovers { deferred, partial } = std::mem::take(&mut *leftovers.lock().unwrap());
    report.deferred = deferred.len();
    for (a, b) in resolve_plateaus(&deferred) {
        stitcher.join(a, b);
    }
    let numbering = stitcher.number();
    report.fragments = numbering.sizes.len() - 1;
    report.passes.push(("stitch", t.elapsed()));

    let t = Instant::now();
    let graph = fragment_graph(&stitcher, &numbering, partial);
    report.region_edges = graph.len();
    report.passes.push(("region graph", t.elapsed()));

    layout.check_cancel()?;
    let t = Instant::now();
    let fragments = report.fragments as u32;
    let threshold = opts.threshold;
    let stop = layout.stop_check();
    let (segment_of, merges) = tokio::task::spawn_blocking(move || {
        agglomerate_sorted(fragments, &graph, threshold, &stop)
    })
    .await?
    .ok_or(SegmentError::Cancelled)?;
    report.merges = merges.merges;
    report.segments = merges.segments;
    report.passes.push(("agglomerate", t.elapsed()));

    let labels = stitcher.into_final(&numbering, |f| segment_of[f as usize]);
    finish(&layout, labels, opts.chunks.write, report, start, ctx).await
}

/// The last pass of both commands: writes the output and completes the report.
async fn finish(
    layout: &Layout,
    labels: FinalLabels,
    write: WriteOptions,
    mut report: SegmentReport,
    start: Instant,
    gpu: Arc<GpuContext>,
) -> Result<SegmentReport, SegmentError> {
    layout.check_cancel()?;
    let t = Instant::now();
    let whole = Box3::from_shape(layout.region.shape());
    let labels = Arc::new(labels);
    report.chunks_written = write_output(layout, labels, write, whole, true, Some(gpu)).await?;
    report.passes.push(("write", t.elapsed()));
    layout.count_reads(&mut report);
    report.wall = start.elapsed();
    Ok(report)
}

/// One chunk's region graph as the watershed pass left it: pairs of box voxels (`boxed` is the
/// box in region coordinates).
pub(crate) struct PartialGraph {
    pub(crate) boxed: Box3,
    pub(crate) edges: Vec<RegionEdge>,
}

/// The region graph of the fragments: each chunk's pairs of box voxels (roots, or halo voxels
/// standing for their own chunk's fragment) translated to final fragment ids, pairs inside one
/// fragment dropped, and pairs that meet in several chunks (or under several keys) summed. The
/// sums are exact integers, so the result does not depend on the chunking.
fn fragment_graph(
    stitcher: &Stitcher,
    numbering: &Numbering,
    partial: Vec<PartialGraph>,
) -> Vec<GraphEdge> {
    // Chunks are translated and sorted on every core, then their sorted runs merged.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, partial.len().max(1));
    let mut groups: Vec<Vec<PartialGraph>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, chunk) in partial.into_iter().enumerate() {
        groups[i % threads].push(chunk);
    }
    let runs: Vec<Vec<(u64, EdgeStats)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = groups
            .into_iter()
            .map(|group| {
                scope.spawn(move || {
                    let mut pairs = fragment_pairs(stitcher, numbering, group);
                    pairs.sort_unstable_by_key(|p| p.0);
                    pairs
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a region-graph thread panicked"))
            .collect()
    });
    sum_sorted_runs(runs.concat())
}

/// The pairs of some chunks' region graphs as fragment pairs (`pair_key`), in no order.
fn fragment_pairs(
    stitcher: &Stitcher,
    numbering: &Numbering,
    chunks: Vec<PartialGraph>,
) -> Vec<(u64, EdgeStats)> {
    let mut pairs = Vec::with_capacity(chunks.iter().map(|p| p.edges.len()).sum());
    for PartialGraph { boxed, edges } in chunks {
        let grid = Grid {
            shape: boxed.shape(),
        };
        let fragment = |i: u32| {
            let local = grid.position(i as usize);
            let p = [0, 1, 2].map(|a| boxed.start[a] + local[a]);
            let node = stitcher
                .node(p)
                .expect("a root or a halo voxel of the region graph is a fragment voxel");
            numbering.label_of_node[node as usize]
        };
        // Keys repeat across a chunk's pairs: translate each once.
        let mut fragment_of: HashMap<u32, u32, IdBuildHasher> = HashMap::default();
        for ((a, b), stats) in edges {
            let fa = *fragment_of.entry(a).or_insert_with(|| fragment(a));
            let fb = *fragment_of.entry(b).or_insert_with(|| fragment(b));
            if fa != fb {
                pairs.push((pair_key(fa, fb), stats));
            }
        }
    }
    pairs
}

/// Chooses pointers for plateau voxels whose plateau crosses chunk faces, by the rule of
/// src/ops/watershed.rs applied to the whole plateau: breadth-first distances from the exits,
/// then the last direction one step nearer; plateaus without an exit join along every edge.
/// Returns the union edges.
pub fn resolve_plateaus(deferred: &HashMap<Vec3, DeferredVoxel>) -> Vec<(Vec3, Vec3)> {
    let step = |p: Vec3, d: usize| -> Vec3 {
        [0, 1, 2].map(|a| (p[a] as i64 + DIRECTIONS[d][a]) as usize)
    };
    let mut distance: HashMap<Vec3, u32> = HashMap::new();
    let mut queue = VecDeque::new();
    let mut starts: Vec<Vec3> = deferred
        .iter()
        .filter(|(_, v)| v.to_exit != 0)
        .map(|(p, _)| *p)
        .collect();
    starts.sort_unstable();
    for p in starts {
        distance.insert(p, 1);
        queue.push_back(p);
    }
    while let Some(p) = queue.pop_front() {
        let (v, here) = (deferred[&p], distance[&p]);
        for d in 0..6 {
            if v.bidirectional & (1 << d) == 0 {
                continue;
            }
            let q = step(p, d);
            if deferred.contains_key(&q) && !distance.contains_key(&q) {
                distance.insert(q, here + 1);
                queue.push_back(q);
            }
        }
    }
    let mut edges = Vec::new();
    for (&p, v) in deferred {
        let bidir = v.bidirectional;
        match distance.get(&p) {
            Some(&here) => {
                let nearer = |d: usize| {
                    if v.to_exit & (1 << d) != 0 {
                        0
                    } else {
                        distance.get(&step(p, d)).copied().unwrap_or(FAR)
                    }
                };
                let d = (0..6)
                    .rev()
                    .find(|&d| bidir & (1 << d) != 0 && nearer(d) == here - 1)
                    .expect("a voxel at a finite distance has a nearer neighbour");
                edges.push((p, step(p, d)));
            }
            None => {
                for d in (0..6).filter(|d| bidir & (1 << d) != 0) {
                    edges.push((p, step(p, d)));
                }
            }
        }
    }
    edges
}
