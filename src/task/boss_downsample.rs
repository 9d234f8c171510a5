//! `cuboids boss-downsample`: one step of the Boss resolution hierarchy on the GPU, a drop-in for
//! the DownsampleChannel activity. For every output cuboid it reads the factor-many input cuboids
//! (a missing one is zeros; if all are missing nothing is written), downsamples them, writes the
//! Blosc-1 cuboid under its Boss key and ensures its S3 index entry. Image channels use box
//! averaging and annotation channels mode pooling: deliberate, correct replacements for the
//! Boss's bilinear resize and its annotation rule.

use crate::dtype::DataType;
use crate::formats::boss::{decode_cuboid, encode_cuboid, CuboidError, CuboidId, CUBOID};
use crate::geometry::{mul3, Vec3};
use crate::gpu::downsample::{block_fits, downsample_block_resident, BlockPart, GpuVolume};
use crate::gpu::{GpuContext, GpuError};
use crate::ops::downsample::{Factor, Method};
use crate::store::boss_index::{IndexError, S3Index};
use crate::store::{ContentEncoding, Store, StoreError};
use crate::task::boss::{channel_of, next_document, passes, step_input, Channel, JobError, Pass};
use crate::task::downsample::downsample_volume_gpu;
use crate::volume::Volume;
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use thiserror::Error;
use tracing::info;

#[derive(Debug, Error)]
pub enum BossError {
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cuboid {key}")]
    Cuboid {
        key: String,
        #[source]
        source: CuboidError,
    },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Task(#[from] crate::task::downsample::TaskError),
    #[error("background task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// Where cuboids and their index live (the bucket's store and the index table).
pub struct BossTarget {
    pub store: Arc<dyn Store>,
    pub index: S3Index,
}

/// What a step did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepReport {
    pub written: usize,
    pub skipped_empty: usize,
    /// Cuboids fetched from S3 (the rest came from the cache of earlier steps).
    pub store_reads: usize,
    /// Input cuboids taken from GPU memory (left there by the previous level).
    pub gpu_resident_reads: usize,
}

impl std::ops::AddAssign for StepReport {
    fn add_assign(&mut self, other: StepReport) {
        self.written += other.written;
        self.skipped_empty += other.skipped_empty;
        self.store_reads += other.store_reads;
        self.gpu_resident_reads += other.gpu_resident_reads;
    }
}

/// A cuboid kept between levels: in GPU memory when it fits the budget there, else in host
/// memory.
#[derive(Clone)]
enum Cached {
    Gpu(Arc<GpuVolume>),
    Host(Arc<Volume>),
}

impl Cached {
    fn bytes(&self) -> usize {
        match self {
            Cached::Gpu(v) => v.bytes() as usize,
            Cached::Host(v) => v.data.len(),
        }
    }
}

/// Cuboids written by earlier steps of this process, so `--all-levels` reads each level from
/// memory instead of S3: first from GPU memory (no upload: the next level is assembled from
/// them on the GPU), then from host memory, each within the byte budget; beyond both, cuboids
/// are read back from S3.
pub struct CuboidCache {
    budget: usize,
    used_gpu: AtomicUsize,
    used_host: AtomicUsize,
    cuboids: Mutex<HashMap<CuboidId, Cached>>,
}

impl CuboidCache {
    pub fn new(budget_bytes: usize) -> CuboidCache {
        CuboidCache {
            budget: budget_bytes,
            used_gpu: AtomicUsize::new(0),
            used_host: AtomicUsize::new(0),
            cuboids: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, id: &CuboidId) -> Option<Cached> {
        self.cuboids.lock().unwrap().get(id).cloned()
    }

    fn reserve(&self, used: &AtomicUsize, size: usize) -> bool {
        if used.fetch_add(size, Ordering::SeqCst) + size <= self.budget {
            true
        } else {
            used.fetch_sub(size, Ordering::SeqCst);
            false
        }
    }

    /// Keeps an output cuboid for the next level: its GPU copy if there is room, else its host
    /// copy (`host` makes it on demand) if there is room there.
    fn offer(&self, id: CuboidId, gpu: Option<GpuVolume>, host: impl FnOnce() -> Volume) {
        if let Some(g) = gpu {
            if self.reserve(&self.used_gpu, g.bytes() as usize) {
                self.cuboids
                    .lock()
                    .unwrap()
                    .insert(id, Cached::Gpu(Arc::new(g)));
                return;
            }
        }
        let cuboid = host();
        if self.reserve(&self.used_host, cuboid.data.len()) {
            self.cuboids
                .lock()
                .unwrap()
                .insert(id, Cached::Host(Arc::new(cuboid)));
        }
    }

    /// Drops the cuboids below `resolution`: no later step reads them.
    fn forget_below(&self, resolution: u32) {
        let mut map = self.cuboids.lock().unwrap();
        map.retain(|id, c| {
            let keep = id.resolution >= resolution;
            if !keep {
                let used = match c {
                    Cached::Gpu(_) => &self.used_gpu,
                    Cached::Host(_) => &self.used_host,
                };
                used.fetch_sub(c.bytes(), Ordering::SeqCst);
            }
            keep
        });
    }
}

/// Output cuboids computed at once.
const CONCURRENT_CUBOIDS: usize = 4;

/// Runs one step and returns the document for the state machine, with what it did.
pub async fn run_step(
    ctx: Arc<GpuContext>,
    target: &BossTarget,
    doc: &Value,
) -> Result<(Value, StepReport), BossError> {
    run_step_cached(ctx, target, doc, &CuboidCache::new(0)).await
}

/// `--all-levels`: this step and every later one the state machine would run (until a returned
/// document has `res_lt_max` false), each level read from the cache of the previous step.
/// Returns the last document and the summed report. Results equal the steps run one by one.
pub async fn run_all_levels(
    ctx: Arc<GpuContext>,
    target: &BossTarget,
    doc: &Value,
    cache_bytes: usize,
) -> Result<(Value, StepReport), BossError> {
    let cache = CuboidCache::new(cache_bytes);
    let mut doc = doc.clone();
    let mut total = StepReport::default();
    loop {
        let (next, report) = run_step_cached(ctx.clone(), target, &doc, &cache).await?;
        total += report;
        doc = next;
        // The state machine loops while the returned document says so.
        if !doc["msg"]["res_lt_max"].as_bool().unwrap_or(false) {
            return Ok((doc, total));
        }
        cache.forget_below(step_input(&doc)?.resolution);
    }
}

async fn run_step_cached(
    ctx: Arc<GpuContext>,
    target: &BossTarget,
    doc: &Value,
    cache: &CuboidCache,
) -> Result<(Value, StepReport), BossError> {
    let input = step_input(doc)?;
    let channel = channel_of(doc)?;
    let next = next_document(doc)?;
    let mut report = StepReport::default();
    for pass in passes(&input) {
        info!(resolution = input.resolution, factor = ?pass.factor, iso = pass.writes_iso, cuboids = ?pass.cuboids, "Boss pass");
        let targets = pass_targets(&pass);
        let results: Vec<CuboidOutcome> = futures::stream::iter(targets)
            .map(|t| {
                downsample_cuboid(
                    ctx.clone(),
                    target,
                    cache,
                    &channel,
                    input.resolution,
                    &pass,
                    t,
                )
            })
            .buffer_unordered(CONCURRENT_CUBOIDS)
            .try_collect()
            .await?;
        report.written += results.iter().filter(|r| r.written).count();
        report.skipped_empty += results.iter().filter(|r| !r.written).count();
        report.store_reads += results.iter().map(|r| r.store_reads).sum::<usize>();
        report.gpu_resident_reads += results.iter().map(|r| r.gpu_resident_reads).sum::<usize>();
    }
    Ok((next, report))
}

/// Source-resolution cuboid indices at which output cuboids start (every `factor` cuboids).
fn pass_targets(pass: &Pass) -> Vec<Vec3> {
    let (start, stop) = pass.cuboids;
    let f = pass.factor;
    let mut out = Vec::new();
    for z in (start[2]..stop[2]).step_by(f[2]) {
        for y in (start[1]..stop[1]).step_by(f[1]) {
            for x in (start[0]..stop[0]).step_by(f[0]) {
                out.push([x, y, z]);
            }
        }
    }
    out
}

/// Reads the cuboids under one output cuboid, downsamples, writes it.
async fn downsample_cuboid(
    ctx: Arc<GpuContext>,
    target: &BossTarget,
    cache: &CuboidCache,
    channel: &Channel,
    resolution: u32,
    pass: &Pass,
    first: Vec3,
) -> Result<CuboidOutcome, BossError> {
    let f = pass.factor;
    let id = |resolution, index, iso| CuboidId {
        collection: channel.collection,
        experiment: channel.experiment,
        channel: channel.channel,
        resolution,
        time: 0,
        index,
        iso,
    };
    let block_shape = mul3(CUBOID, f);
    let mut inputs: Vec<(Vec3, Cached)> = Vec::new();
    let mut store_reads = 0;
    for dz in 0..f[2] {
        for dy in 0..f[1] {
            for dx in 0..f[0] {
                let input_id = id(
                    resolution,
                    [first[0] + dx, first[1] + dy, first[2] + dz],
                    pass.reads_iso,
                );
                let cuboid = match cache.get(&input_id) {
                    Some(cached) => cached,
                    None => {
                        store_reads += 1;
                        match read_cuboid(target, channel.dtype, &input_id).await? {
                            Some(cuboid) => Cached::Host(Arc::new(cuboid)),
                            None => continue,
                        }
                    }
                };
                let at = [dx * CUBOID[0], dy * CUBOID[1], dz * CUBOID[2]];
                inputs.push((at, cuboid));
            }
        }
    }
    if inputs.is_empty() {
        return Ok(CuboidOutcome {
            written: false,
            store_reads,
            gpu_resident_reads: 0,
        });
    }
    let gpu_resident_reads = inputs
        .iter()
        .filter(|(_, c)| matches!(c, Cached::Gpu(_)))
        .count();
    let method = if channel.annotation {
        Method::Mode
    } else {
        Method::Average
    };
    let factor = Factor::new(f).expect("passes use (2,2,1) or (2,2,2)");
    let out_id = id(
        resolution + 1,
        [first[0] / f[0], first[1] / f[1], first[2] / f[2]],
        pass.writes_iso,
    );
    let dtype = channel.dtype;
    let (cuboid, resident, frame) = tokio::task::spawn_blocking(
        move || -> Result<(Volume, Option<GpuVolume>, Vec<u8>), BossError> {
            let (cuboid, resident) = if block_fits(&ctx, dtype, block_shape) {
                // The block is assembled on the GPU and its level stays there for the next one.
                let parts: Vec<(Vec3, BlockPart)> = inputs
                    .iter()
                    .map(|(at, c)| {
                        let part = match c {
                            Cached::Gpu(v) => BlockPart::Gpu(v),
                            Cached::Host(v) => BlockPart::Host(&v.data, v.shape),
                        };
                        (*at, part)
                    })
                    .collect();
                let (bytes, resident) =
                    downsample_block_resident(&ctx, dtype, block_shape, &parts, method, factor)?;
                let cuboid = Volume::from_bytes(dtype, CUBOID, 1, bytes).expect("a cuboid");
                (cuboid, Some(resident))
            } else {
                // Too large for one binding (a uint64 ISO block on lavapipe): slabs from host
                // memory.
                let mut block = Volume::zeros(dtype, block_shape, 1);
                for (at, c) in &inputs {
                    let host = match c {
                        Cached::Host(v) => v.clone(),
                        // A level that fitted, read by a larger (ISO) block that does not.
                        Cached::Gpu(v) => Arc::new(
                            Volume::from_bytes(dtype, v.shape, 1, v.to_host(&ctx)?)
                                .expect("a cuboid"),
                        ),
                    };
                    block.paste(*at, &host, [0; 3], CUBOID);
                }
                let slab_limit = ctx.default_slab_bytes();
                let cuboid =
                    downsample_volume_gpu(&ctx, &block, method, factor, 1, slab_limit, None)?
                        .pop()
                        .expect("one level");
                (cuboid, None)
            };
            debug_assert_eq!(cuboid.shape, CUBOID);
            let frame = encode_cuboid(&cuboid).map_err(|source| BossError::Cuboid {
                key: out_id.s3_key(),
                source,
            })?;
            Ok((cuboid, resident, frame))
        },
    )
    .await??;
    target
        .store
        .put(&out_id.s3_key(), frame, ContentEncoding::Identity)
        .await?;
    target.index.ensure_entry(&out_id).await?;
    cache.offer(out_id, resident, || cuboid);
    Ok(CuboidOutcome {
        written: true,
        store_reads,
        gpu_resident_reads,
    })
}

/// What computing one output cuboid did.
struct CuboidOutcome {
    written: bool,
    store_reads: usize,
    gpu_resident_reads: usize,
}

/// One cuboid from S3, `None` when it does not exist (the Boss reads it as zeros).
async fn read_cuboid(
    target: &BossTarget,
    dtype: DataType,
    id: &CuboidId,
) -> Result<Option<Volume>, BossError> {
    let key = id.s3_key();
    let Some(object) = target.store.get(&key).await? else {
        return Ok(None);
    };
    let cuboid = tokio::task::spawn_blocking(move || decode_cuboid(&object.data, dtype))
        .await?
        .map_err(|source| BossError::Cuboid { key, source })?;
    Ok(Some(cuboid))
}
