//! `cuboids downsample`: several mips of a precomputed scale from one read, on the GPU.
//!
//! The volume is cut into tiles aligned to whole output chunks of every new mip, so each output
//! chunk is written by exactly one tile. Tiles are read, downsampled and written in a pipeline
//! (the next tile is read while the GPU works, writes run behind). New scales are added to the
//! info only after every chunk was written; on failure the chunks already written to new scales
//! are removed, so nothing half-written is left claimed.

use crate::formats::precomputed::info::{Info, LayerType, Scale};
use crate::formats::precomputed::sharding::{
    chunk_id, encode_shard, igneous_image_spec, image_shard_shape, ShardAssembler, ShardChunks,
    ShardingSpec,
};
use crate::formats::precomputed::{
    check_scale_readable, check_scale_supported, chunk_grid, chunk_key, codec_cpu_time,
    count_as_encoding, encode_chunk_data, process_cpu_time, ChunkData, Precomputed,
    PrecomputedError, WriteOptions,
};
use crate::geometry::{pow3, voxels, Box3, Vec3};
use crate::gpu::compressed_segmentation::{encode_chunks_gpu, encodes_scale};
use crate::gpu::downsample::{submit_channel_gpu, PendingSlab};
use crate::gpu::{GpuContext, GpuError};
use crate::ops::downsample::{check_supported, downsample_cpu, DownsampleError, Factor, Method};
use crate::progress::Progress;
use crate::task::plan::{align_region, lcm, plan_slabs, plan_tiles};
use crate::volume::{BufferPool, Volume};
use futures::{StreamExt, TryStreamExt};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, Instrument};

#[derive(Debug, Error)]
pub enum TaskError {
    #[error(transparent)]
    Precomputed(#[from] PrecomputedError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Downsample(#[from] DownsampleError),
    #[error("mip {mip} does not exist: the volume has {count} scales (0..{count})")]
    NoSuchMip { mip: usize, count: usize },
    #[error("existing scale {key} (mip {mip}) does not match the downsampled scale: {field} is {existing}, expected {expected}")]
    ScaleMismatch {
        mip: usize,
        key: String,
        field: &'static str,
        existing: String,
        expected: String,
    },
    #[error("bounds {start:?}..{stop:?} do not overlap scale {key} ({offset:?} + {size:?})")]
    Bounds {
        key: String,
        start: [i64; 3],
        stop: [i64; 3],
        offset: [i64; 3],
        size: Vec3,
    },
    #[error("a {align:?} block of {elem}-byte voxels does not fit the GPU binding limit of {limit} bytes; use fewer mips")]
    SlabTooLarge {
        align: Vec3,
        elem: usize,
        limit: u64,
    },
    #[error("sharded output: {why}")]
    Sharding { why: String },
    #[error("stopped before it finished: the runner is shutting down")]
    Cancelled,
    #[error("background task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// Where kernels run: the GPU, or the CPU reference (for checks and comparisons).
#[derive(Clone)]
pub enum Compute {
    Gpu(Arc<GpuContext>),
    Cpu,
}

/// Absolute voxel bounds `[start, stop)` at the source mip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bounds {
    pub start: [i64; 3],
    pub stop: [i64; 3],
}

#[derive(Clone, Debug)]
pub struct DownsampleOptions {
    pub mip: usize,
    pub num_mips: u32,
    pub factor: Factor,
    pub bounds: Option<Bounds>,
    pub fill_missing: bool,
    /// Average for images and Mode for segmentation unless given.
    pub method: Option<Method>,
    pub write: WriteOptions,
    /// Host memory aimed at per tile (source voxels).
    pub tile_bytes: usize,
    /// Largest GPU slab; `None` = the context's default (see `GpuContext::default_slab_bytes`).
    pub slab_bytes: Option<u64>,
    /// Only tiles with an output chunk missing are computed (a re-run after a partial one).
    pub skip_existing: bool,
    /// Checked before each tile: once cancelled, the run stops and cleans up as on failure.
    pub cancel: Option<CancellationToken>,
    /// New scales are sharded as igneous shards them (`sharding::igneous_image_spec`); the run
    /// must then cover whole shards of every new mip (a whole volume always does).
    pub sharded: bool,
    /// Uncompressed source bytes each shard of a new mip covers at most (igneous's
    /// `memory_target`); `None`: igneous's 3.5 GB at every mip. A plan sets it to its task size,
    /// so that one task holds whole shards of every mip within its memory.
    pub shard_source_bytes: Option<u64>,
}

/// igneous's default uncompressed bytes per shard (`MEMORY_TARGET`, 3.5 GB).
pub const IGNEOUS_SHARD_BYTES: u64 = 3_500_000_000;

impl Default for DownsampleOptions {
    fn default() -> Self {
        DownsampleOptions {
            mip: 0,
            num_mips: 1,
            factor: Factor::ANISOTROPIC,
            bounds: None,
            fill_missing: false,
            method: None,
            write: WriteOptions::default(),
            tile_bytes: 64 << 20,
            slab_bytes: None,
            skip_existing: false,
            cancel: None,
            sharded: false,
            shard_source_bytes: None,
        }
    }
}

/// What a run did and how long its stages were busy (stages overlap, so they can add up to
/// more than the wall time).
#[derive(Clone, Debug, Default)]
pub struct DownsampleReport {
    pub input_voxels: u64,
    pub output_voxels: u64,
    pub tiles: usize,
    pub tiles_skipped_empty: usize,
    /// Tiles whose output chunks all existed (with `skip_existing`).
    pub tiles_skipped_existing: usize,
    pub chunks_written: usize,
    pub new_scales: Vec<String>,
    pub wall: Duration,
    pub read: Duration,
    pub compute: Duration,
    pub write: Duration,
    /// CPU time spent decoding source chunks and encoding output chunks (summed over threads).
    pub decode_cpu: Duration,
    pub encode_cpu: Duration,
    /// CPU time of the whole process over the run (every thread: codecs, copies, file I/O, and
    /// on lavapipe the pooling kernels themselves).
    pub process_cpu: Duration,
    /// The cores this process may use.
    pub cores: usize,
    /// Output chunks encoded on the GPU (compressed_segmentation): `encode_cpu` is only the
    /// host's part of their encoding (laying out headers and tables) and their gzip.
    pub chunks_encoded_on_gpu: usize,
}

impl DownsampleReport {
    /// Source voxels per second, in millions: the throughput figure igneous users compare.
    pub fn mvx_per_s(&self) -> f64 {
        self.input_voxels as f64 / 1e6 / self.wall.as_secs_f64().max(1e-9)
    }

    /// The shortest wall time the codecs allow on this machine: their CPU time spread over every
    /// core, as if reading, pooling and writing cost nothing else.
    pub fn codec_limit(&self) -> Duration {
        (self.decode_cpu + self.encode_cpu) / self.cores.max(1) as u32
    }

    /// Core-seconds that were neither decoding nor encoding: pooling (on lavapipe), copies,
    /// file and network I/O, planning.
    pub fn other_cpu(&self) -> Duration {
        self.process_cpu
            .saturating_sub(self.decode_cpu + self.encode_cpu)
    }

    /// The report for people: throughput and counts, then each stage's busy time.
    pub fn describe(&self, what: &str) -> Vec<String> {
        vec![
            format!(
                "{what}: {:.1} MVx in {:.2} s = {:.1} MVx/s; {} tiles ({} empty, {} skipped: existing), {} chunks written, {:.1} MVx out",
                self.input_voxels as f64 / 1e6,
                self.wall.as_secs_f64(),
                self.mvx_per_s(),
                self.tiles,
                self.tiles_skipped_empty,
                self.tiles_skipped_existing,
                self.chunks_written,
                self.output_voxels as f64 / 1e6,
            ),
            format!(
                "  busy: read {:.2} s, compute {:.2} s, write {:.2} s (stages overlap){}",
                self.read.as_secs_f64(),
                self.compute.as_secs_f64(),
                self.write.as_secs_f64(),
                if self.new_scales.is_empty() {
                    String::new()
                } else {
                    format!("; new scales {}", self.new_scales.join(", "))
                }
            ),
            format!(
                "  codecs: decode {:.2} + encode {:.2} core-s on {} cores: codec limit {:.2} s, this run {:.2}x it{}",
                self.decode_cpu.as_secs_f64(),
                self.encode_cpu.as_secs_f64(),
                self.cores,
                self.codec_limit().as_secs_f64(),
                self.wall.as_secs_f64() / self.codec_limit().as_secs_f64().max(1e-9),
                if self.chunks_encoded_on_gpu > 0 {
                    format!(
                        "; {} chunks' compressed_segmentation encoded on the GPU",
                        self.chunks_encoded_on_gpu
                    )
                } else {
                    String::new()
                },
            ),
            format!(
                "  core-s: {:.2} in all ({:.0}% of {} cores for {:.2} s): decode {:.2}, encode {:.2}, the rest {:.2} (pooling on a CPU adapter, copies, I/O)",
                self.process_cpu.as_secs_f64(),
                100.0 * self.process_cpu.as_secs_f64()
                    / (self.wall.as_secs_f64() * self.cores.max(1) as f64).max(1e-9),
                self.cores,
                self.wall.as_secs_f64(),
                self.decode_cpu.as_secs_f64(),
                self.encode_cpu.as_secs_f64(),
                self.other_cpu().as_secs_f64(),
            ),
        ]
    }
}

/// The method a layer gets by default.
pub fn default_method(layer: LayerType) -> Method {
    match layer {
        LayerType::Image => Method::Average,
        LayerType::Segmentation => Method::Mode,
    }
}

/// Validates the request and returns the info with the new scales (existing ones must match).
pub fn plan_scales(
    info: &Info,
    opts: &DownsampleOptions,
) -> Result<(Info, Vec<String>), TaskError> {
    let count = info.scales.len();
    let src = info.scales.get(opts.mip).ok_or(TaskError::NoSuchMip {
        mip: opts.mip,
        count,
    })?;
    check_scale_readable(src)?;
    let method = opts.method.unwrap_or(default_method(info.layer_type));
    check_supported(method, info.data_type)?;
    if opts.num_mips == 0 {
        return Err(DownsampleError::NoMips.into());
    }
    let mut out = info.clone();
    let mut added = Vec::new();
    for k in 1..=opts.num_mips {
        let mut want = src.downsampled(opts.factor.get(), k);
        let mip = opts.mip + k as usize;
        let spec = opts
            .sharded
            .then(|| new_scale_sharding(info, opts, &want, k))
            .transpose()?;
        want.sharding = spec.as_ref().map(ShardingSpec::to_json);
        match out.scales.get(mip) {
            Some(existing) if opts.sharded => {
                // Another task of the same plan may have added it: the same sharding, or none.
                if existing.sharding_spec().ok().flatten() != spec {
                    return Err(TaskError::Sharding {
                        why: format!(
                            "mip {mip} ({}) exists already, not sharded as this run shards it ({})",
                            existing.key,
                            want.sharding.as_ref().expect("set above")
                        ),
                    });
                }
                check_matches(mip, existing, &want)?;
            }
            Some(existing) => {
                check_scale_supported(existing)?;
                check_matches(mip, existing, &want)?;
            }
            None => {
                added.push(want.key.clone());
                out.scales.push(want);
            }
        }
    }
    Ok((out, added))
}

/// The sharding of new mip `k` (scale `want`): igneous's recommendation for its size, each shard
/// covering at most `shard_source_bytes` of source; raw data when chunks are not gzipped.
fn new_scale_sharding(
    info: &Info,
    opts: &DownsampleOptions,
    want: &Scale,
    k: u32,
) -> Result<ShardingSpec, TaskError> {
    let voxel_bytes = info.data_type.size() * info.num_channels;
    // A shard of mip k covers factor^k as many source voxels as its own.
    let shard_bytes = opts.shard_source_bytes.map_or(IGNEOUS_SHARD_BYTES, |b| {
        (b / pow3(opts.factor.get(), k).iter().product::<usize>() as u64).max(1)
    });
    let spec = igneous_image_spec(want.size, want.chunk_size(), voxel_bytes, shard_bytes)
        .map_err(|why| TaskError::Sharding { why })?;
    Ok(ShardingSpec {
        gzip_data: opts.write.gzip_level > 0,
        ..spec
    })
}

fn check_matches(mip: usize, existing: &Scale, want: &Scale) -> Result<(), TaskError> {
    let mismatch = |field, e: String, w: String| {
        Err(TaskError::ScaleMismatch {
            mip,
            key: existing.key.clone(),
            field,
            existing: e,
            expected: w,
        })
    };
    if existing.size != want.size {
        return mismatch(
            "size",
            format!("{:?}", existing.size),
            format!("{:?}", want.size),
        );
    }
    if existing.voxel_offset != want.voxel_offset {
        return mismatch(
            "voxel_offset",
            format!("{:?}", existing.voxel_offset),
            format!("{:?}", want.voxel_offset),
        );
    }
    let (er, wr) = (
        existing.resolution.map(|r| r.0),
        want.resolution.map(|r| r.0),
    );
    if er
        .iter()
        .zip(wr)
        .any(|(a, b)| (a - b).abs() > 1e-6 * b.abs())
    {
        return mismatch("resolution", format!("{er:?}"), format!("{wr:?}"));
    }
    Ok(())
}

/// Relative region of the source scale to process, before alignment.
pub(crate) fn source_region(scale: &Scale, bounds: Option<Bounds>) -> Result<Box3, TaskError> {
    let full = Box3::from_shape(scale.size);
    let Some(b) = bounds else { return Ok(full) };
    let rel =
        |i: usize, v: i64| (v - scale.voxel_offset[i]).clamp(0, scale.size[i] as i64) as usize;
    let region = Box3::new(
        [0, 1, 2].map(|i| rel(i, b.start[i])),
        [0, 1, 2].map(|i| rel(i, b.stop[i])),
    );
    if region.is_empty() {
        return Err(TaskError::Bounds {
            key: scale.key.clone(),
            start: b.start,
            stop: b.stop,
            offset: scale.voxel_offset,
            size: scale.size,
        });
    }
    Ok(region)
}

/// Tile alignment: whole chunks of the source and of every output mip (chunk * factor^k).
fn tile_alignment(info: &Info, opts: &DownsampleOptions) -> Vec3 {
    let mut align = info.scales[opts.mip].chunk_size();
    for k in 1..=opts.num_mips {
        let chunk = info.scales[opts.mip + k as usize].chunk_size();
        let f = pow3(opts.factor.get(), k);
        align = [0, 1, 2].map(|i| lcm(align[i], chunk[i] * f[i]));
    }
    align
}

/// The source region a run covers, rounded out to its tile alignment, and that alignment.
/// `info` already has the new scales (see `plan_scales`).
fn aligned_source(info: &Info, opts: &DownsampleOptions) -> Result<(Box3, Vec3), TaskError> {
    let src = &info.scales[opts.mip];
    let align = tile_alignment(info, opts);
    let region = align_region(source_region(src, opts.bounds)?, align, src.size);
    Ok((region, align))
}

/// The source bytes of the least part a run can be split into: one tile alignment unit (whole
/// output chunks of every new mip, whole shards where they are sharded), within the region.
pub fn least_part_bytes(info: &Info, opts: &DownsampleOptions) -> Result<usize, TaskError> {
    let (new_info, _) = plan_scales(info, opts)?;
    let (region, align) = aligned_source(&new_info, opts)?;
    let align = match shard_block(&new_info, opts)? {
        Some(block) => [0, 1, 2].map(|i| lcm(align[i], block[i])),
        None => align,
    };
    let unit = [0, 1, 2].map(|i| align[i].min(region.shape()[i]));
    Ok(voxels(unit) * info.data_type.size() * info.num_channels)
}

/// Splits a run into independent parts of at most `part_bytes` of source each, as absolute
/// bounds aligned so that every output chunk belongs to exactly one part: the tasks of a
/// distributed run. Together they cover what the whole run would.
pub fn split_bounds(
    info: &Info,
    opts: &DownsampleOptions,
    part_bytes: usize,
) -> Result<Vec<Bounds>, TaskError> {
    let (new_info, _) = plan_scales(info, opts)?;
    let (region, align) = aligned_source(&new_info, opts)?;
    // Sharded mips: a part holds whole shards of each.
    let align = match shard_block(&new_info, opts)? {
        Some(block) => [0, 1, 2].map(|i| lcm(align[i], block[i])),
        None => align,
    };
    let region = align_region(region, align, new_info.scales[opts.mip].size);
    let offset = new_info.scales[opts.mip].voxel_offset;
    let absolute = |v: Vec3| [0, 1, 2].map(|i| v[i] as i64 + offset[i]);
    let elem = info.data_type.size() * info.num_channels;
    Ok(plan_tiles(region, align, elem, part_bytes)
        .into_iter()
        .map(|part| Bounds {
            start: absolute(part.start),
            stop: absolute(part.stop),
        })
        .collect())
}

/// Downsamples a volume in place: reads mip `opts.mip`, writes mips `mip+1..=mip+num_mips`.
pub async fn downsample(
    compute: Compute,
    vol: &Precomputed,
    opts: &DownsampleOptions,
) -> Result<DownsampleReport, TaskError> {
    let started = Instant::now();
    let (new_info, added) = plan_scales(&vol.info, opts)?;
    let method = opts.method.unwrap_or(default_method(vol.info.layer_type));
    let (region, align) = aligned_source(&new_info, opts)?;
    let elem = vol.info.data_type.size() * vol.info.num_channels;
    let tiles = run_tiles_in_order(&new_info, opts, region, align, elem)?;
    let slab_limit = match &compute {
        Compute::Gpu(ctx) => opts.slab_bytes.unwrap_or(ctx.default_slab_bytes()),
        Compute::Cpu => u64::MAX,
    };
    let deepest = pow3(opts.factor.get(), opts.num_mips);
    if plan_slabs(deepest, vol.info.data_type.size(), deepest, slab_limit).is_none() {
        return Err(TaskError::SlabTooLarge {
            align: deepest,
            elem: vol.info.data_type.size(),
            limit: slab_limit,
        });
    }
    info!(tiles = tiles.len(), ?align, ?region, method = ?method, "downsample planned");

    // Output chunks are written through a handle that already knows the new scales.
    let target = Arc::new(Precomputed::new(vol.store.clone(), new_info.clone()));
    let shards = shard_assemblers(&new_info, opts, region)?;
    let written = Arc::new(Mutex::new(Vec::<String>::new()));
    let job = Job {
        shards,
        compute,
        source: vol.clone(),
        target: target.clone(),
        opts: opts.clone(),
        method,
        slab_limit,
        written: written.clone(),
        buffers: BufferPool::new(KEPT_BUFFERS),
    };
    let (decode_before, encode_before) = codec_cpu_time();
    let process_before = process_cpu_time();
    let result = job.run(tiles).await;
    match result {
        Ok(mut report) => {
            if !added.is_empty() {
                target.write_info().await?;
            }
            report.new_scales = added;
            report.wall = started.elapsed();
            let (decode, encode) = codec_cpu_time();
            report.decode_cpu = decode.saturating_sub(decode_before);
            report.encode_cpu = encode.saturating_sub(encode_before);
            report.process_cpu = process_cpu_time().saturating_sub(process_before);
            report.cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            Ok(report)
        }
        Err(e) => {
            let written = written.lock().unwrap().clone();
            remove_new_chunks(&target, &added, &written).await;
            Err(e)
        }
    }
}

/// Best-effort removal of chunks written to scales this run was adding.
async fn remove_new_chunks(target: &Precomputed, added: &[String], written: &[String]) {
    let new: HashSet<&str> = added.iter().map(String::as_str).collect();
    for key in written {
        if key
            .split('/')
            .next()
            .is_some_and(|scale| new.contains(scale))
        {
            if let Err(e) = target.store.delete(key).await {
                tracing::warn!(key, error = %e, "could not remove a chunk of an unfinished scale");
            }
        }
    }
}

/// A sharded mip a run writes: its level below the source (k), mip, spec and shard extent.
struct ShardedMip {
    k: u32,
    mip: usize,
    spec: ShardingSpec,
    extent: Vec3,
}

/// The sharded ones among the mips a run writes (`info` with the new scales).
fn sharded_mips(info: &Info, opts: &DownsampleOptions) -> Result<Vec<ShardedMip>, TaskError> {
    let mut out = Vec::new();
    for k in 1..=opts.num_mips {
        let mip = opts.mip + k as usize;
        let scale = &info.scales[mip];
        let spec = scale
            .sharding_spec()
            .map_err(|(field, why)| TaskError::Sharding {
                why: format!("{field}: {why}"),
            })?;
        if let Some(spec) = spec {
            let extent = image_shard_shape(&spec, scale.size, scale.chunk_size());
            out.push(ShardedMip {
                k,
                mip,
                spec,
                extent,
            });
        }
    }
    Ok(out)
}

/// The source extent that holds whole shards of every sharded new mip (the common multiple of
/// their extents in source voxels), or `None` when no new mip is sharded.
fn shard_block(info: &Info, opts: &DownsampleOptions) -> Result<Option<Vec3>, TaskError> {
    let mut block: Option<Vec3> = None;
    for m in sharded_mips(info, opts)? {
        let f = pow3(opts.factor.get(), m.k);
        let here = [0, 1, 2].map(|i| m.extent[i] * f[i]);
        block = Some(block.map_or(here, |b| [0, 1, 2].map(|i| lcm(b[i], here[i]))));
    }
    Ok(block)
}

/// Tiles of a run, block of whole shards by block when the new mips are sharded: each block's
/// shards are complete, written and freed before the next block starts, so the open shards
/// never hold more than about one block's output.
fn run_tiles_in_order(
    info: &Info,
    opts: &DownsampleOptions,
    region: Box3,
    align: Vec3,
    elem: usize,
) -> Result<Vec<Box3>, TaskError> {
    let Some(block) = shard_block(info, opts)? else {
        return Ok(plan_tiles(region, align, elem, opts.tile_bytes));
    };
    let block = [0, 1, 2].map(|i| lcm(block[i], align[i]));
    let blocks = crate::task::plan::split(region, block);
    Ok(blocks
        .into_iter()
        .flat_map(|b| plan_tiles(b, align, elem, opts.tile_bytes))
        .collect())
}

/// For each sharded new mip, the assembler of the shards this run writes, after checking that
/// the run covers each of them whole (a shard has one writer).
fn shard_assemblers(
    info: &Info,
    opts: &DownsampleOptions,
    region: Box3,
) -> Result<std::collections::HashMap<usize, ShardAssembler>, TaskError> {
    let mut out = std::collections::HashMap::new();
    for ShardedMip {
        k,
        mip,
        spec,
        extent,
    } in sharded_mips(info, opts)?
    {
        let scale = &info.scales[mip];
        let level = region.downsampled(opts.factor.get(), k);
        for a in 0..3 {
            let whole_start = level.start[a].is_multiple_of(extent[a]);
            let whole_stop =
                level.stop[a].is_multiple_of(extent[a]) || level.stop[a] >= scale.size[a];
            if !(whole_start && whole_stop) {
                return Err(TaskError::Sharding {
                    why: format!(
                        "the run covers {:?}..{:?} of mip {mip} ({}), which does not hold whole shards of {extent:?} voxels; run on the whole volume or on shard-aligned bounds",
                        level.start, level.stop, scale.key
                    ),
                });
            }
        }
        let ids = chunk_grid(scale, level)
            .into_iter()
            .map(|c| chunk_id(c, scale.chunk_size(), scale.size));
        out.insert(mip, ShardAssembler::new(spec, &scale.key, ids));
    }
    Ok(out)
}

struct Job {
    /// Sharded new mips: their chunks go to shard files, written whole.
    shards: std::collections::HashMap<usize, ShardAssembler>,
    compute: Compute,
    source: Precomputed,
    target: Arc<Precomputed>,
    opts: DownsampleOptions,
    method: Method,
    slab_limit: u64,
    written: Arc<Mutex<Vec<String>>>,
    /// Tile and level buffers, reused from tile to tile.
    buffers: BufferPool,
}

/// Buffers a downsample keeps: the tiles read ahead and being pooled, and the levels of the tiles
/// being written.
const KEPT_BUFFERS: usize = 16;

/// What writing a tile did: chunks written, of which encoded on the GPU; voxels; busy time.
type TileWritten = (usize, usize, u64, Duration);

/// Tiles being written at once behind the GPU.
const WRITES_IN_FLIGHT: usize = 2;
/// Chunks encoded and stored at once per tile.
const WRITE_CONCURRENCY: usize = 16;

impl Job {
    async fn run(self, tiles: Vec<Box3>) -> Result<DownsampleReport, TaskError> {
        let mut writes: JoinSet<Result<TileWritten, TaskError>> = JoinSet::new();
        let result = Arc::new(self).run_tiles(tiles, &mut writes).await;
        if result.is_err() {
            // Let writes already under way finish before anyone cleans up after this run, so no
            // chunk lands after the cleanup; their own errors add nothing to the first one.
            while writes.join_next().await.is_some() {}
        }
        result
    }

    async fn run_tiles(
        self: Arc<Self>,
        tiles: Vec<Box3>,
        writes: &mut JoinSet<Result<TileWritten, TaskError>>,
    ) -> Result<DownsampleReport, TaskError> {
        let job = self;
        let mut report = DownsampleReport {
            tiles: tiles.len(),
            ..Default::default()
        };
        let read = |tile: Box3| {
            let job = job.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                if job.opts.skip_existing && job.outputs_exist(tile).await? {
                    return Ok(None);
                }
                let r = job
                    .source
                    .read_region_into(
                        job.opts.mip,
                        tile,
                        job.opts.fill_missing,
                        None,
                        Some(&job.buffers),
                    )
                    .await;
                r.map(|(v, any)| Some((v, any, t.elapsed())))
            })
        };
        let mut next = tiles.first().map(|&t| read(t));
        let total = tiles.iter().map(|t| voxels(t.shape()) as u64).sum();
        let progress = Progress::new("downsample", total);
        for (i, &tile) in tiles.iter().enumerate() {
            if job.opts.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                return Err(TaskError::Cancelled);
            }
            if i > 0 {
                progress.add(voxels(tiles[i - 1].shape()) as u64);
            }
            let read_result = next.take().expect("a read per tile").await??;
            next = tiles.get(i + 1).map(|&t| read(t));
            let Some((input, any, read_time)) = read_result else {
                report.tiles_skipped_existing += 1;
                continue;
            };
            report.read += read_time;
            report.input_voxels += voxels(tile.shape()) as u64;
            if !any {
                // Every input chunk is missing: there is nothing to write.
                report.tiles_skipped_empty += 1;
                continue;
            }
            let t = Instant::now();
            let levels = {
                let job = job.clone();
                tokio::task::spawn_blocking(move || {
                    let levels = job.downsample_tile(&input);
                    job.buffers.give(input.data);
                    levels
                })
                .instrument(info_span!("tile", i))
                .await??
            };
            report.compute += t.elapsed();
            while writes.len() >= WRITES_IN_FLIGHT {
                report.absorb(writes.join_next().await.expect("not empty")??);
            }
            writes.spawn(job.clone().write_tile(tile, levels));
        }
        while let Some(done) = writes.join_next().await {
            report.absorb(done??);
        }
        job.flush_shards().await?;
        if let Some(last) = tiles.last() {
            progress.add(voxels(last.shape()) as u64);
        }
        progress.finish();
        Ok(report)
    }

    /// Output chunks of every new mip under a tile, with their mips.
    fn output_chunks(&self, tile: Box3) -> Vec<(usize, Box3)> {
        (1..=self.opts.num_mips)
            .flat_map(|k| {
                let mip = self.opts.mip + k as usize;
                let level_box = tile.downsampled(self.opts.factor.get(), k);
                chunk_grid(self.target.scale(mip), level_box)
                    .into_iter()
                    .map(move |chunk| (mip, chunk))
            })
            .collect()
    }

    /// Whether every output chunk of a tile is already stored.
    async fn outputs_exist(&self, tile: Box3) -> Result<bool, PrecomputedError> {
        let keys: Vec<String> = self
            .output_chunks(tile)
            .into_iter()
            .map(|(mip, chunk)| chunk_key(self.target.scale(mip), chunk))
            .collect();
        let missing = futures::stream::iter(keys)
            .map(|key| async move { self.target.store.exists(&key).await })
            .buffer_unordered(WRITE_CONCURRENCY)
            .try_filter(|exists| futures::future::ready(!exists))
            .boxed()
            .next()
            .await;
        match missing {
            None => Ok(true),
            Some(Ok(_)) => Ok(false),
            Some(Err(e)) => Err(e.into()),
        }
    }

    /// All mips of one tile, every channel, via the GPU in slabs or the CPU reference.
    fn downsample_tile(&self, input: &Volume) -> Result<Vec<Volume>, TaskError> {
        let (factor, mips) = (self.opts.factor, self.opts.num_mips);
        let ctx = match &self.compute {
            Compute::Cpu => return Ok(downsample_cpu(input, self.method, factor, mips)?),
            Compute::Gpu(ctx) => ctx,
        };
        downsample_volume_gpu(
            ctx,
            input,
            self.method,
            factor,
            mips,
            self.slab_limit,
            Some(&self.buffers),
        )
    }

    /// Cuts a tile's levels into output chunks and writes them.
    async fn write_tile(
        self: Arc<Self>,
        tile: Box3,
        levels: Vec<Volume>,
    ) -> Result<TileWritten, TaskError> {
        let t = Instant::now();
        let level_boxes: Vec<Box3> = (1..=levels.len() as u32)
            .map(|k| tile.downsampled(self.opts.factor.get(), k))
            .collect();
        let voxels_out = level_boxes.iter().map(|b| voxels(b.shape()) as u64).sum();
        let levels: Vec<Arc<Volume>> = levels.into_iter().map(Arc::new).collect();
        let chunks = self.output_chunks(tile);
        let count = chunks.len();
        let mut encoded = self
            .clone()
            .encode_on_gpu(&chunks, &levels, &level_boxes)
            .await?;
        let on_gpu = encoded.iter().filter(|e| e.is_some()).count();
        let jobs: Vec<_> = chunks
            .into_iter()
            .enumerate()
            .map(|(i, (mip, chunk))| {
                let k = mip - self.opts.mip - 1;
                let data = encoded[i].take();
                (mip, chunk, levels[k].clone(), level_boxes[k].start, data)
            })
            .collect();
        futures::stream::iter(jobs)
            .map(|(mip, chunk, level, origin, encoded)| {
                let job = self.clone();
                async move {
                    let data = encoded.unwrap_or_else(|| {
                        let local = [0, 1, 2].map(|i| chunk.start[i] - origin[i]);
                        ChunkData::Voxels(level.crop(local, chunk.shape()))
                    });
                    if job.shards.contains_key(&mip) {
                        return job.add_to_shard(mip, chunk, data).await;
                    }
                    let key = job
                        .target
                        .write_chunk(mip, chunk, data, job.opts.write)
                        .await?;
                    job.written.lock().unwrap().push(key);
                    Ok::<_, TaskError>(())
                }
            })
            .buffer_unordered(WRITE_CONCURRENCY)
            .try_collect::<()>()
            .await?;
        for level in levels {
            if let Ok(level) = Arc::try_unwrap(level) {
                self.buffers.give(level.data);
            }
        }
        Ok((count, on_gpu, voxels_out, t.elapsed()))
    }

    /// The GPU that encodes `mip`'s chunks, when it does: a compressed_segmentation scale whose
    /// labels and block size the GPU encoder takes, on a context that encodes
    /// ([`GpuContext::gpu_encoding`]).
    fn gpu_encoder(&self, mip: usize) -> Option<Arc<GpuContext>> {
        let Compute::Gpu(ctx) = &self.compute else {
            return None;
        };
        let takes = encodes_scale(ctx, self.target.scale(mip), self.target.info.data_type);
        takes.then(|| ctx.clone())
    }

    /// `chunks` (mip, box) whose scale the GPU encodes, encoded there, a level at a time; `None`
    /// for the others, which are encoded on the CPU as they are written.
    async fn encode_on_gpu(
        self: Arc<Self>,
        chunks: &[(usize, Box3)],
        levels: &[Arc<Volume>],
        level_boxes: &[Box3],
    ) -> Result<Vec<Option<ChunkData>>, TaskError> {
        let mut encoded: Vec<Option<ChunkData>> = chunks.iter().map(|_| None).collect();
        for (k, (level, level_box)) in levels.iter().zip(level_boxes).enumerate() {
            let mip = self.opts.mip + k + 1;
            let Some(ctx) = self.gpu_encoder(mip) else {
                continue;
            };
            let (indices, boxes): (Vec<usize>, Vec<Box3>) = chunks
                .iter()
                .enumerate()
                .filter(|(_, (m, _))| *m == mip)
                .map(|(i, (_, chunk))| (i, chunk.relative_to(level_box.start)))
                .unzip();
            let scale = self.target.scale(mip).clone();
            let level = level.clone();
            let results = tokio::task::spawn_blocking(move || {
                count_as_encoding(|| encode_chunks_gpu(&ctx, &level, &boxes, scale.block_size()))
            })
            .await??;
            for (i, result) in indices.into_iter().zip(results) {
                let bytes = result.map_err(|source| PrecomputedError::CompressedSegmentation {
                    key: self.target.scale(mip).key.clone(),
                    source,
                })?;
                encoded[i] = Some(ChunkData::Encoded(bytes));
            }
        }
        Ok(encoded)
    }
}

impl Job {
    /// Encodes a chunk of a sharded mip (the scale's encoding, gzipped where the spec says, on
    /// the blocking pool like any chunk) and writes its shard once the shard is complete.
    async fn add_to_shard(
        &self,
        mip: usize,
        chunk: Box3,
        data: ChunkData,
    ) -> Result<(), TaskError> {
        let scale = self.target.scale(mip).clone();
        let id = chunk_id(chunk, scale.chunk_size(), scale.size);
        let gzip_level = if self.shards[&mip].spec().gzip_data {
            self.opts.write.gzip_level.max(1)
        } else {
            0
        };
        let (data, _) = tokio::task::spawn_blocking(move || {
            encode_chunk_data(data, &scale, WriteOptions { gzip_level })
        })
        .await??;
        if let Some(shard) = self.shards[&mip].add(id, data) {
            self.write_shard(mip, shard).await?;
        }
        Ok(())
    }

    /// Writes one shard file whole.
    async fn write_shard(&self, mip: usize, (key, chunks): ShardChunks) -> Result<(), TaskError> {
        let spec = self.shards[&mip].spec().clone();
        let file = tokio::task::spawn_blocking(move || encode_shard(&spec, &chunks)).await?;
        self.target
            .store
            .put(&key, file, crate::store::ContentEncoding::Identity)
            .await
            .map_err(PrecomputedError::from)?;
        self.written.lock().unwrap().push(key);
        Ok(())
    }

    /// Writes the shards still open at the end of a run: their missing chunks had no input.
    async fn flush_shards(&self) -> Result<(), TaskError> {
        for (&mip, assembler) in &self.shards {
            for shard in assembler.rest() {
                self.write_shard(mip, shard).await?;
            }
        }
        Ok(())
    }
}

impl DownsampleReport {
    fn absorb(&mut self, (chunks, on_gpu, voxels_out, busy): TileWritten) {
        self.chunks_written += chunks;
        self.chunks_encoded_on_gpu += on_gpu;
        self.output_voxels += voxels_out;
        self.write += busy;
    }
}

/// All mips of a volume (every channel) on the GPU, in slabs of at most `slab_limit` bytes
/// aligned to the deepest mip's block; one slab stays in flight while the next is uploaded.
pub fn downsample_volume_gpu(
    ctx: &GpuContext,
    input: &Volume,
    method: Method,
    factor: Factor,
    mips: u32,
    slab_limit: u64,
    pool: Option<&BufferPool>,
) -> Result<Vec<Volume>, TaskError> {
    let whole = Box3::from_shape(input.shape);
    let mut levels: Vec<Volume> = (1..=mips)
        .map(|k| {
            let shape = whole.downsampled(factor.get(), k).shape();
            match pool {
                Some(pool) => Volume::zeros_in(pool, input.dtype, shape, input.channels),
                None => Volume::zeros(input.dtype, shape, input.channels),
            }
        })
        .collect();
    let align = pow3(factor.get(), mips);
    let elem = input.dtype.size();
    let slabs =
        plan_slabs(input.shape, elem, align, slab_limit).ok_or(TaskError::SlabTooLarge {
            align,
            elem,
            limit: slab_limit,
        })?;
    let mut in_flight: Option<(usize, Box3, PendingSlab)> = None;
    for c in 0..input.channels {
        for slab in &slabs {
            let whole_planes =
                slab.shape()[0] == input.shape[0] && slab.shape()[1] == input.shape[1];
            let cropped;
            let bytes: &[u8] = if whole_planes {
                // z-slabs of full planes are contiguous: no copy.
                let plane = input.shape[0] * input.shape[1] * elem;
                &input.channel(c)[slab.start[2] * plane..slab.stop[2] * plane]
            } else {
                cropped = input.crop_channel(c, slab.start, slab.shape());
                &cropped
            };
            let pending =
                submit_channel_gpu(ctx, bytes, input.dtype, slab.shape(), method, factor, mips)?;
            if let Some(done) = in_flight.replace((c, *slab, pending)) {
                paste_slab(&mut levels, factor, ctx, done)?;
            }
        }
    }
    if let Some(done) = in_flight {
        paste_slab(&mut levels, factor, ctx, done)?;
    }
    Ok(levels)
}

/// Waits for a slab's levels and copies them into the tile's levels.
fn paste_slab(
    levels: &mut [Volume],
    factor: Factor,
    ctx: &GpuContext,
    (c, slab, pending): (usize, Box3, PendingSlab),
) -> Result<(), TaskError> {
    pending.wait_with(ctx, |k, bytes, shape, pitch| {
        let part = slab.downsampled(factor.get(), k as u32 + 1);
        debug_assert_eq!(shape, part.shape());
        levels[k].paste_channel_pitched(c, part.start, bytes, shape, pitch);
    })?;
    Ok(())
}
