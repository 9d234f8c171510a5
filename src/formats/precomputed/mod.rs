//! Neuroglancer precomputed volumes (igneous, CloudVolume, chunkflow): `info` plus chunk files
//! named by absolute voxel ranges, `raw` or `compressed_segmentation`, optionally gzipped.

pub mod compressed_segmentation;
pub mod info;
pub mod sharding;

use crate::dtype::DataType;
use crate::geometry::{div_ceil3, voxels, Box3, Vec3};
use crate::store::{ContentEncoding, Store, StoreError};
use crate::volume::{BufferPool, Volume};
use compressed_segmentation::CsegError;
use futures::{StreamExt, TryStreamExt};
use info::{Encoding, Info, Scale};
use sharding::ShardReader;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

pub use info::LayerType;

#[derive(Debug, Error)]
pub enum PrecomputedError {
    #[error("no info file at {location}/info: not a precomputed volume")]
    MissingInfo { location: String },
    #[error("invalid info at {location}/info")]
    InvalidInfoJson {
        location: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid info at {location}/info: {field}: {message}")]
    InvalidInfo {
        location: String,
        field: String,
        message: String,
    },
    #[error("scale {scale} uses encoding {encoding:?}; cuboids reads and writes raw and compressed_segmentation")]
    UnsupportedEncoding { scale: String, encoding: Encoding },
    #[error("scale {scale} is sharded; cuboids reads sharded scales but does not write them yet")]
    Sharded { scale: String },
    #[error("shard file {key} is corrupt: {why}")]
    ShardCorrupt { key: String, why: String },
    #[error("chunk {key} is missing (use --fill-missing to read missing chunks as zeros)")]
    MissingChunk { key: String },
    #[error("chunk {key} has {got} bytes, expected {expected} for a {shape:?} x {channels} {dtype} chunk")]
    ChunkSize {
        key: String,
        got: usize,
        expected: usize,
        shape: Vec3,
        channels: usize,
        dtype: DataType,
    },
    #[error("chunk {key} is not valid gzip")]
    Gzip {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("chunk {key} is not valid compressed_segmentation")]
    CompressedSegmentation {
        key: String,
        #[source]
        source: CsegError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("background task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// How chunks are written: gzip level (0 = no gzip; CloudVolume gzips by default).
#[derive(Clone, Copy, Debug)]
pub struct WriteOptions {
    pub gzip_level: u32,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { gzip_level: 6 }
    }
}

/// Decoded chunks kept for reads that overlap (boxes read with margins), within a byte budget;
/// the oldest go first. `None` entries remember chunks that do not exist.
pub struct ChunkCache {
    budget: usize,
    inner: std::sync::Mutex<CacheInner>,
    hits: std::sync::atomic::AtomicUsize,
    misses: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct CacheInner {
    chunks: std::collections::HashMap<String, Option<Arc<Volume>>>,
    order: std::collections::VecDeque<String>,
    used: usize,
}

impl ChunkCache {
    pub fn new(budget_bytes: usize) -> ChunkCache {
        ChunkCache {
            budget: budget_bytes,
            inner: Default::default(),
            hits: Default::default(),
            misses: Default::default(),
        }
    }

    /// `Some(None)`: known missing; `None`: not cached.
    fn get(&self, key: &str) -> Option<Option<Arc<Volume>>> {
        use std::sync::atomic::Ordering::Relaxed;
        let found = self.inner.lock().unwrap().chunks.get(key).cloned();
        match found {
            Some(_) => self.hits.fetch_add(1, Relaxed),
            None => self.misses.fetch_add(1, Relaxed),
        };
        found
    }

    fn insert(&self, key: String, chunk: Option<Arc<Volume>>) {
        let size = chunk.as_ref().map_or(0, |c| c.data.len());
        let mut inner = self.inner.lock().unwrap();
        if inner.chunks.insert(key.clone(), chunk).is_none() {
            inner.order.push_back(key);
            inner.used += size;
        }
        while inner.used > self.budget {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if let Some(Some(c)) = inner.chunks.remove(&old) {
                inner.used -= c.data.len();
            }
        }
    }

    /// Chunks served from the cache and chunks fetched.
    pub fn counts(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.hits.load(Relaxed), self.misses.load(Relaxed))
    }
}

/// An open precomputed volume: its store and its parsed, validated info.
#[derive(Clone)]
pub struct Precomputed {
    pub store: Arc<dyn Store>,
    pub info: Info,
    /// Minishard indices read so far, for sharded scales.
    pub shards: Arc<ShardReader>,
}

/// Chunks fetched at once per read: enough to keep disks and S3 busy.
const FETCH_CONCURRENCY: usize = 32;

impl Precomputed {
    /// A handle on a volume whose info is already checked.
    pub fn new(store: Arc<dyn Store>, info: Info) -> Precomputed {
        Precomputed {
            store,
            info,
            shards: Arc::default(),
        }
    }

    pub async fn open(store: Arc<dyn Store>) -> Result<Precomputed, PrecomputedError> {
        let location = store.location();
        let object = store
            .get("info")
            .await?
            .ok_or_else(|| PrecomputedError::MissingInfo {
                location: location.clone(),
            })?;
        let data = match object.encoding {
            ContentEncoding::Identity => object.data,
            ContentEncoding::Gzip => {
                gunzip(&object.data, MAX_INFO_BYTES).map_err(|source| PrecomputedError::Gzip {
                    key: "info".into(),
                    source,
                })?
            }
        };
        let info: Info =
            serde_json::from_slice(&data).map_err(|source| PrecomputedError::InvalidInfoJson {
                location: location.clone(),
                source,
            })?;
        validate_info(&info, &location)?;
        Ok(Precomputed::new(store, info))
    }

    /// Creates a new volume by writing its info.
    pub async fn create(
        store: Arc<dyn Store>,
        info: Info,
    ) -> Result<Precomputed, PrecomputedError> {
        validate_info(&info, &store.location())?;
        let vol = Precomputed::new(store, info);
        vol.write_info().await?;
        Ok(vol)
    }

    pub async fn write_info(&self) -> Result<(), PrecomputedError> {
        self.store
            .put("info", self.info.to_json(), ContentEncoding::Identity)
            .await?;
        Ok(())
    }

    pub fn scale(&self, mip: usize) -> &Scale {
        &self.info.scales[mip]
    }

    /// Relative boxes of the chunks of `mip` that overlap `region` (relative to voxel_offset).
    pub fn chunks_in(&self, mip: usize, region: Box3) -> Vec<Box3> {
        chunk_grid(self.scale(mip), region)
    }

    /// Reads a relative region of a scale. Missing chunks are zeros when `fill_missing`, an error
    /// naming the chunk otherwise. Returns the region and whether any chunk existed.
    pub async fn read_region(
        &self,
        mip: usize,
        region: Box3,
        fill_missing: bool,
    ) -> Result<(Volume, bool), PrecomputedError> {
        self.read_region_cached(mip, region, fill_missing, None)
            .await
    }

    /// [`Self::read_region`], taking chunks from `cache` when it holds them and keeping those it
    /// fetches there: overlapping reads (boxes with margins) fetch each chunk once.
    pub async fn read_region_cached(
        &self,
        mip: usize,
        region: Box3,
        fill_missing: bool,
        cache: Option<&ChunkCache>,
    ) -> Result<(Volume, bool), PrecomputedError> {
        self.read_region_into(mip, region, fill_missing, cache, None)
            .await
    }

    /// [`Self::read_region_cached`], the volume in a buffer from `pool` when one is given.
    pub async fn read_region_into(
        &self,
        mip: usize,
        region: Box3,
        fill_missing: bool,
        cache: Option<&ChunkCache>,
        pool: Option<&BufferPool>,
    ) -> Result<(Volume, bool), PrecomputedError> {
        let scale = Arc::new(self.scale(mip).clone());
        let (dtype, channels) = (self.info.data_type, self.info.num_channels);
        let mut out = match pool {
            Some(pool) => Volume::zeros_in(pool, dtype, region.shape(), channels),
            None => Volume::zeros(dtype, region.shape(), channels),
        };
        let mut any = false;
        let sharding = scale
            .sharding_spec()
            .map_err(|(field, message)| PrecomputedError::InvalidInfo {
                location: self.store.location(),
                field: format!("scales[{mip}] ({}).{field}", scale.key),
                message,
            })?
            .map(Arc::new);
        let mut chunks = futures::stream::iter(self.chunks_in(mip, region))
            .map(|chunk| {
                let (store, scale) = (self.store.clone(), scale.clone());
                let (sharding, shards) = (sharding.clone(), self.shards.clone());
                async move {
                    let key = chunk_key(&scale, chunk);
                    if let Some(cached) = cache.and_then(|c| c.get(&key)) {
                        return Ok((chunk, cached));
                    }
                    let stored = match &sharding {
                        None => store.get(&key).await?,
                        Some(spec) => {
                            let id = sharding::chunk_id(chunk, scale.chunk_size(), scale.size);
                            let bounds = sharding::ShardBounds {
                                chunk_bytes: voxels(chunk.shape()) * dtype.size() * channels,
                                chunks: voxels(div_ceil3(scale.size, scale.chunk_size())),
                            };
                            shards
                                .read_chunk(&*store, spec, &scale.key, id, bounds)
                                .await?
                                .map(|data| crate::store::Object {
                                    data,
                                    encoding: ContentEncoding::Identity,
                                })
                        }
                    };
                    let decoded = match stored {
                        Some(object) => {
                            let key = key.clone();
                            Some(Arc::new(
                                tokio::task::spawn_blocking(move || {
                                    decode_chunk(
                                        &key,
                                        object.data,
                                        object.encoding,
                                        &scale,
                                        dtype,
                                        channels,
                                        chunk.shape(),
                                    )
                                })
                                .await??,
                            ))
                        }
                        None if fill_missing => None,
                        None => return Err(PrecomputedError::MissingChunk { key }),
                    };
                    if let Some(c) = cache {
                        c.insert(key, decoded.clone());
                    }
                    Ok::<_, PrecomputedError>((chunk, decoded))
                }
            })
            .buffer_unordered(FETCH_CONCURRENCY);
        while let Some((chunk, decoded)) = chunks.try_next().await? {
            if let Some(vol) = decoded {
                any = true;
                let part = chunk.intersect(&region);
                let src = [0, 1, 2].map(|i| part.start[i] - chunk.start[i]);
                let dst = [0, 1, 2].map(|i| part.start[i] - region.start[i]);
                out.paste(dst, &vol, src, part.shape());
            }
        }
        Ok((out, any))
    }

    /// Writes a whole chunk-aligned relative region of a scale from `vol` (e.g. a new volume).
    pub async fn write_region(
        &self,
        mip: usize,
        origin: crate::geometry::Vec3,
        vol: &Volume,
        opts: WriteOptions,
    ) -> Result<usize, PrecomputedError> {
        let region = Box3::new(origin, [0, 1, 2].map(|i| origin[i] + vol.shape[i]));
        let chunks = self.chunks_in(mip, region);
        let count = chunks.len();
        futures::stream::iter(chunks)
            .map(|chunk| {
                let local = [0, 1, 2].map(|i| chunk.start[i] - origin[i]);
                let part = vol.crop(local, chunk.shape());
                async move { self.write_chunk(mip, chunk, part, opts).await.map(|_| ()) }
            })
            .buffer_unordered(FETCH_CONCURRENCY)
            .try_collect::<()>()
            .await?;
        Ok(count)
    }

    /// Encodes and writes one chunk (a relative, grid-aligned box) of a scale; returns its key.
    pub async fn write_chunk(
        &self,
        mip: usize,
        chunk: Box3,
        data: impl Into<ChunkData>,
        opts: WriteOptions,
    ) -> Result<String, PrecomputedError> {
        let data = data.into();
        let scale = self.scale(mip).clone();
        // Chunk files next to shard files would be invisible to every reader of the scale.
        check_scale_supported(&scale)?;
        let key = chunk_key(&scale, chunk);
        let (data, encoding) =
            tokio::task::spawn_blocking(move || encode_chunk_data(data, &scale, opts)).await??;
        self.store.put(&key, data, encoding).await?;
        Ok(key)
    }
}

/// The largest scale read or written (a petavoxel): past it, voxel indices and sizes no longer
/// fit the arithmetic comfortably, and no such volume exists.
const MAX_SCALE_VOXELS: u64 = 1 << 50;
/// The largest chunk read or written (real ones are at most a few hundred MiB).
const MAX_CHUNK_BYTES: u64 = 1 << 32;

fn checked_voxels(shape: Vec3) -> Option<u64> {
    (shape[0] as u64)
        .checked_mul(shape[1] as u64)?
        .checked_mul(shape[2] as u64)
}

fn validate_info(info: &Info, location: &str) -> Result<(), PrecomputedError> {
    let bad = |field: String, message: String| PrecomputedError::InvalidInfo {
        location: location.to_string(),
        field,
        message,
    };
    if info.num_channels == 0 {
        return Err(bad("num_channels".into(), "must be at least 1".into()));
    }
    if info.scales.is_empty() {
        return Err(bad("scales".into(), "no scales".into()));
    }
    for (i, s) in info.scales.iter().enumerate() {
        let field = |name: &str| format!("scales[{i}] ({}).{name}", s.key);
        if s.key.is_empty() {
            return Err(bad(format!("scales[{i}].key"), "empty".into()));
        }
        if s.size.contains(&0) {
            return Err(bad(
                field("size"),
                format!("{:?} has a zero extent", s.size),
            ));
        }
        if checked_voxels(s.size).is_none_or(|n| n > MAX_SCALE_VOXELS) {
            return Err(bad(
                field("size"),
                format!("{:?} is more than 2^50 voxels", s.size),
            ));
        }
        match s.chunk_sizes.first() {
            None => return Err(bad(field("chunk_sizes"), "empty".into())),
            Some(c) if c.contains(&0) => {
                return Err(bad(
                    field("chunk_sizes"),
                    format!("{c:?} has a zero extent"),
                ))
            }
            Some(c)
                if checked_voxels(*c)
                    .and_then(|n| n.checked_mul(info.num_channels as u64))
                    .and_then(|n| n.checked_mul(info.data_type.size() as u64))
                    .is_none_or(|bytes| bytes > MAX_CHUNK_BYTES) =>
            {
                return Err(bad(
                    field("chunk_sizes"),
                    format!("{c:?} makes chunks of more than 4 GiB"),
                ))
            }
            _ => {}
        }
        if s.sharding_spec()
            .map_err(|(name, why)| bad(field(&name), why))?
            .is_some()
        {
            let grid = div_ceil3(s.size, s.chunk_size());
            if !sharding::morton_fits(grid) {
                return Err(bad(
                    field("sharding"),
                    format!("a grid of {grid:?} chunks needs chunk ids over 64 bits"),
                ));
            }
        }
        if s.resolution.iter().any(|r| r.0.is_nan() || r.0 <= 0.0) {
            return Err(bad(field("resolution"), "must be positive".into()));
        }
        if s.encoding == Encoding::CompressedSegmentation
            && !matches!(info.data_type, DataType::Uint32 | DataType::Uint64)
        {
            return Err(bad(
                field("encoding"),
                format!(
                    "compressed_segmentation needs uint32 or uint64, not {}",
                    info.data_type
                ),
            ));
        }
        if let Some(b) = s.compressed_segmentation_block_size {
            if b.contains(&0) {
                return Err(bad(
                    field("compressed_segmentation_block_size"),
                    format!("{b:?}"),
                ));
            }
        }
    }
    Ok(())
}

/// Checks that cuboids can write a scale's chunks (and read them).
pub fn check_scale_supported(scale: &Scale) -> Result<(), PrecomputedError> {
    if scale.is_sharded() {
        return Err(PrecomputedError::Sharded {
            scale: scale.key.clone(),
        });
    }
    check_scale_readable(scale)
}

/// Checks that cuboids can read a scale's chunks, sharded or not.
pub fn check_scale_readable(scale: &Scale) -> Result<(), PrecomputedError> {
    match scale.encoding {
        Encoding::Raw | Encoding::CompressedSegmentation => Ok(()),
        encoding => Err(PrecomputedError::UnsupportedEncoding {
            scale: scale.key.clone(),
            encoding,
        }),
    }
}

/// Relative chunk boxes of a scale overlapping `region`; edge chunks are truncated to the size.
pub fn chunk_grid(scale: &Scale, region: Box3) -> Vec<Box3> {
    let c = scale.chunk_size();
    let region = region.intersect(&Box3::from_shape(scale.size));
    if region.is_empty() {
        return vec![];
    }
    let first = [0, 1, 2].map(|i| region.start[i] / c[i]);
    let last = div_ceil3(region.stop, c);
    let mut out = Vec::new();
    for gz in first[2]..last[2] {
        for gy in first[1]..last[1] {
            for gx in first[0]..last[0] {
                let g = [gx, gy, gz];
                let start = [0, 1, 2].map(|i| g[i] * c[i]);
                let stop = [0, 1, 2].map(|i| ((g[i] + 1) * c[i]).min(scale.size[i]));
                out.push(Box3::new(start, stop));
            }
        }
    }
    out
}

/// `<scale key>/<x0>-<x1>_<y0>-<y1>_<z0>-<z1>` in absolute voxel coordinates.
pub fn chunk_key(scale: &Scale, chunk: Box3) -> String {
    let o = scale.voxel_offset;
    let a = |i: usize, v: usize| v as i64 + o[i];
    format!(
        "{}/{}-{}_{}-{}_{}-{}",
        scale.key,
        a(0, chunk.start[0]),
        a(0, chunk.stop[0]),
        a(1, chunk.start[1]),
        a(1, chunk.stop[1]),
        a(2, chunk.start[2]),
        a(2, chunk.stop[2])
    )
}

/// The largest `info` document read (a real one is a few KiB).
pub const MAX_INFO_BYTES: usize = 64 << 20;

/// Decompresses a gzip object of at most `limit` bytes: a stream that inflates to more (a
/// damaged or hostile one: gzip inflates up to ~1000x) is an error once it passes the limit,
/// not an allocation of whatever it claims. libdeflate does single-member streams (what every
/// writer of chunks produces) several times faster than a streaming inflater; anything it
/// refuses is retried with flate2, which also reads multi-member streams and reports what is
/// wrong.
pub fn gunzip(data: &[u8], limit: usize) -> std::io::Result<Vec<u8>> {
    if let Some(out) = gunzip_single_member(data, limit) {
        return Ok(out);
    }
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(limit));
    flate2::read::MultiGzDecoder::new(data)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)?;
    if out.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("inflates to more than the {limit} bytes expected"),
        ));
    }
    Ok(out)
}

fn gunzip_single_member(data: &[u8], limit: usize) -> Option<Vec<u8>> {
    // The trailer's ISIZE is the uncompressed size modulo 2^32: exact for chunks.
    let isize =
        u32::from_le_bytes(data.get(data.len().checked_sub(4)?..)?.try_into().ok()?) as usize;
    if isize > limit.min(1 << 30) {
        return None;
    }
    let mut out = vec![0u8; isize];
    let n = libdeflater::Decompressor::new()
        .gzip_decompress(data, &mut out)
        .ok()?;
    (n == isize).then_some(out)
}

/// The most bytes a stored chunk of `raw` decoded bytes can take before gzip:
/// compressed_segmentation can exceed the raw size (a table entry and up to 32 bits of index
/// per voxel, plus block headers), never by 4x.
fn stored_chunk_limit(raw: usize) -> usize {
    raw.saturating_mul(4).saturating_add(1 << 16)
}

pub fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let level = libdeflater::CompressionLvl::new(level.clamp(1, 12) as i32).expect("level 1..=12");
    let mut compressor = libdeflater::Compressor::new(level);
    let mut out = vec![0u8; compressor.gzip_compress_bound(data.len())];
    let n = compressor
        .gzip_compress(data, &mut out)
        .expect("the bound fits");
    out.truncate(n);
    out
}

/// CPU time (nanoseconds, summed over threads) this process has spent decoding and encoding
/// chunks: gunzip/gzip and compressed_segmentation. A run's share, divided by the cores, is its
/// codec limit: no faster pipeline can beat it.
static DECODE_NANOS: AtomicU64 = AtomicU64::new(0);
static ENCODE_NANOS: AtomicU64 = AtomicU64::new(0);

/// (decode, encode) CPU time so far in this process; a run reports the difference over its span
/// (tasks that run at once in one process share the counters).
pub fn codec_cpu_time() -> (Duration, Duration) {
    (
        Duration::from_nanos(DECODE_NANOS.load(Ordering::Relaxed)),
        Duration::from_nanos(ENCODE_NANOS.load(Ordering::Relaxed)),
    )
}

/// This thread's CPU time (Linux and other Unix), in nanoseconds; elsewhere 0.
fn thread_cpu_nanos() -> u64 {
    #[cfg(unix)]
    {
        cpu_clock_nanos(libc::CLOCK_THREAD_CPUTIME_ID)
    }
    #[cfg(not(unix))]
    0
}

/// The CPU time of every thread of this process so far (lavapipe's included, which does the
/// kernels' work on the host), or zero where the platform does not say: what a report sets
/// next to the codecs' share of it.
pub fn process_cpu_time() -> Duration {
    #[cfg(unix)]
    {
        Duration::from_nanos(cpu_clock_nanos(libc::CLOCK_PROCESS_CPUTIME_ID))
    }
    #[cfg(not(unix))]
    Duration::ZERO
}

#[cfg(unix)]
fn cpu_clock_nanos(clock: libc::clockid_t) -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `t` is.
    if unsafe { libc::clock_gettime(clock, &mut t) } == 0 {
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    } else {
        0
    }
}

/// Adds this thread's CPU time from its start to its drop to a counter, so that every return
/// of the function holding it (errors included) counts.
struct CpuTimer {
    counter: &'static AtomicU64,
    start: u64,
}

impl CpuTimer {
    fn start(counter: &'static AtomicU64) -> CpuTimer {
        CpuTimer {
            counter,
            start: thread_cpu_nanos(),
        }
    }
}

impl Drop for CpuTimer {
    fn drop(&mut self) {
        let spent = thread_cpu_nanos().saturating_sub(self.start);
        self.counter.fetch_add(spent, Ordering::Relaxed);
    }
}

/// Decodes one stored chunk into voxels of `shape`.
pub fn decode_chunk(
    key: &str,
    data: Vec<u8>,
    encoding: ContentEncoding,
    scale: &Scale,
    dtype: DataType,
    channels: usize,
    shape: Vec3,
) -> Result<Volume, PrecomputedError> {
    let _timer = CpuTimer::start(&DECODE_NANOS);
    let data = match encoding {
        ContentEncoding::Identity => data,
        ContentEncoding::Gzip => {
            let raw = voxels(shape) * channels * dtype.size();
            gunzip(&data, stored_chunk_limit(raw)).map_err(|source| PrecomputedError::Gzip {
                key: key.to_string(),
                source,
            })?
        }
    };
    let data = match scale.encoding {
        Encoding::CompressedSegmentation => compressed_segmentation::decode(
            &data,
            shape,
            channels,
            dtype.size() / 4,
            scale.block_size(),
        )
        .map_err(|source| PrecomputedError::CompressedSegmentation {
            key: key.to_string(),
            source,
        })?,
        _ => data,
    };
    let got = data.len();
    Volume::from_bytes(dtype, shape, channels, data).ok_or(PrecomputedError::ChunkSize {
        key: key.to_string(),
        got,
        expected: voxels(shape) * channels * dtype.size(),
        shape,
        channels,
        dtype,
    })
}

/// A chunk to store: its voxels, or its bytes already in the scale's encoding (as the GPU
/// encodes compressed_segmentation chunks).
pub enum ChunkData {
    Voxels(Volume),
    Encoded(Vec<u8>),
}

impl From<Volume> for ChunkData {
    fn from(vol: Volume) -> ChunkData {
        ChunkData::Voxels(vol)
    }
}

/// [`encode_chunk`] of either kind of chunk: bytes already encoded are only compressed.
pub fn encode_chunk_data(
    data: ChunkData,
    scale: &Scale,
    opts: WriteOptions,
) -> Result<(Vec<u8>, ContentEncoding), PrecomputedError> {
    match data {
        ChunkData::Voxels(vol) => encode_chunk(&vol, scale, opts),
        ChunkData::Encoded(bytes) => {
            let _timer = CpuTimer::start(&ENCODE_NANOS);
            Ok(compress(bytes, opts))
        }
    }
}

/// Runs `encode` (chunk encoding done elsewhere, e.g. the host's part of the GPU encoder) and
/// counts this thread's CPU time in it as encoding time ([`codec_cpu_time`]).
pub fn count_as_encoding<T>(encode: impl FnOnce() -> T) -> T {
    let _timer = CpuTimer::start(&ENCODE_NANOS);
    encode()
}

/// Encodes voxels as a stored chunk: the scale's encoding, then gzip unless the level is 0.
pub fn encode_chunk(
    vol: &Volume,
    scale: &Scale,
    opts: WriteOptions,
) -> Result<(Vec<u8>, ContentEncoding), PrecomputedError> {
    let _timer = CpuTimer::start(&ENCODE_NANOS);
    let data = match scale.encoding {
        Encoding::CompressedSegmentation => compressed_segmentation::encode(
            &vol.data,
            vol.shape,
            vol.channels,
            vol.dtype.size() / 4,
            scale.block_size(),
        )
        .map_err(|source| PrecomputedError::CompressedSegmentation {
            key: scale.key.clone(),
            source,
        })?,
        _ => vol.data.clone(),
    };
    Ok(compress(data, opts))
}

/// gzip at the level asked for, or the bytes as they are at level 0.
fn compress(data: Vec<u8>, opts: WriteOptions) -> (Vec<u8>, ContentEncoding) {
    if opts.gzip_level == 0 {
        (data, ContentEncoding::Identity)
    } else {
        (gzip(&data, opts.gzip_level), ContentEncoding::Gzip)
    }
}
