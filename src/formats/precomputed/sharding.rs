//! Reading sharded scales: neuroglancer's `neuroglancer_uint64_sharded_v1` (the spec is
//! `src/datasource/precomputed/sharded.md` in google/neuroglancer; CloudVolume and igneous write
//! it). A chunk's id is the compressed Morton code of its grid position; the id, shifted right
//! by `preshift_bits` and hashed, picks a shard file (`<scale>/<shard hex>.shard`) and a
//! minishard in it. A shard file starts with its index, `2^minishard_bits` pairs of u64 byte
//! offsets (start, end) of each minishard index, counted from the end of the shard index; a
//! minishard index is `3n` u64s: chunk ids, data offsets and data sizes, the ids and offsets
//! delta-coded (each offset counts from the end of the previous chunk's data). Everything is
//! little-endian. Readers fetch only the 16 bytes of an index entry, the minishard index
//! (cached per minishard) and the chunk itself, with ranged reads.

use super::{gunzip, PrecomputedError};
use crate::geometry::{div_ceil3, Box3, Vec3};
use crate::store::Store;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A scale's `sharding` object, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardingSpec {
    pub preshift_bits: u32,
    pub hash: ShardHash,
    pub minishard_bits: u32,
    pub shard_bits: u32,
    /// Whether minishard indices are gzipped.
    pub gzip_minishard_index: bool,
    /// Whether each chunk's data is gzipped (on top of the scale's encoding).
    pub gzip_data: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardHash {
    Identity,
    Murmurhash3X86_128,
}

#[derive(Deserialize)]
struct RawSpec {
    #[serde(rename = "@type")]
    kind: String,
    preshift_bits: u64,
    hash: String,
    minishard_bits: u64,
    shard_bits: u64,
    #[serde(default = "raw")]
    minishard_index_encoding: String,
    #[serde(default = "raw")]
    data_encoding: String,
}

fn raw() -> String {
    "raw".into()
}

impl ShardingSpec {
    /// Parses and checks a `sharding` object; the error names the field that is wrong.
    pub fn parse(value: &Value) -> Result<ShardingSpec, (String, String)> {
        let bad = |field: &str, why: String| (format!("sharding.{field}"), why);
        let raw: RawSpec =
            serde_json::from_value(value.clone()).map_err(|e| bad("", e.to_string()))?;
        if raw.kind != "neuroglancer_uint64_sharded_v1" {
            return Err(bad(
                "@type",
                format!(
                    "{:?}: cuboids reads neuroglancer_uint64_sharded_v1",
                    raw.kind
                ),
            ));
        }
        let hash = match raw.hash.as_str() {
            "identity" => ShardHash::Identity,
            "murmurhash3_x86_128" => ShardHash::Murmurhash3X86_128,
            other => {
                return Err(bad(
                    "hash",
                    format!("unsupported hash {other:?} (identity or murmurhash3_x86_128)"),
                ))
            }
        };
        if raw.preshift_bits >= 64 {
            return Err(bad(
                "preshift_bits",
                format!("{} (under 64)", raw.preshift_bits),
            ));
        }
        if raw.minishard_bits + raw.shard_bits > 64 {
            return Err(bad(
                "shard_bits",
                format!(
                    "minishard_bits {} + shard_bits {} is over 64",
                    raw.minishard_bits, raw.shard_bits
                ),
            ));
        }
        // An index of 2^minishard_bits entries is read in 16-byte pieces, but its size still
        // says where the data starts; 2^40 entries (16 TiB of index) is no real volume.
        if raw.minishard_bits > 40 {
            return Err(bad(
                "minishard_bits",
                format!("{} (at most 40)", raw.minishard_bits),
            ));
        }
        let gzip_of = |field: &str, v: &str| match v {
            "raw" => Ok(false),
            "gzip" => Ok(true),
            other => Err(bad(field, format!("{other:?} (raw or gzip)"))),
        };
        Ok(ShardingSpec {
            preshift_bits: raw.preshift_bits as u32,
            hash,
            minishard_bits: raw.minishard_bits as u32,
            shard_bits: raw.shard_bits as u32,
            gzip_minishard_index: gzip_of(
                "minishard_index_encoding",
                &raw.minishard_index_encoding,
            )?,
            gzip_data: gzip_of("data_encoding", &raw.data_encoding)?,
        })
    }

    /// The `sharding` object of an info.
    pub fn to_json(&self) -> Value {
        let encoding = |gzip: bool| if gzip { "gzip" } else { "raw" };
        serde_json::json!({
            "@type": "neuroglancer_uint64_sharded_v1",
            "preshift_bits": self.preshift_bits,
            "hash": match self.hash {
                ShardHash::Identity => "identity",
                ShardHash::Murmurhash3X86_128 => "murmurhash3_x86_128",
            },
            "minishard_bits": self.minishard_bits,
            "shard_bits": self.shard_bits,
            "minishard_index_encoding": encoding(self.gzip_minishard_index),
            "data_encoding": encoding(self.gzip_data),
        })
    }

    /// Bytes of the shard index at the start of every shard file.
    pub fn index_bytes(&self) -> u64 {
        16 << self.minishard_bits
    }

    /// The shard (by number) and minishard of a chunk id.
    pub fn location(&self, chunk_id: u64) -> (u64, u64) {
        let shifted = chunk_id >> self.preshift_bits;
        let hashed = match self.hash {
            ShardHash::Identity => shifted,
            ShardHash::Murmurhash3X86_128 => murmurhash3_x86_128_low64(shifted),
        };
        let minishard = hashed & low_bits(self.minishard_bits);
        let shard = (hashed >> self.minishard_bits) & low_bits(self.shard_bits);
        (shard, minishard)
    }

    /// The shard file's key in a scale: the shard number in lowercase hex, zero-padded to
    /// ceil(shard_bits / 4) digits (`0.shard` with no shard bits).
    pub fn shard_key(&self, scale_key: &str, shard: u64) -> String {
        let digits = self.shard_bits.div_ceil(4) as usize;
        format!("{scale_key}/{shard:0digits$x}.shard")
    }
}

/// The sharding igneous recommends for a new image scale (`create_sharded_image_info` in
/// igneous-pipeline, with its defaults): identity hash; as many chunks per shard as fit
/// `shard_bytes` uncompressed (a power of two; all of them when the scale is smaller); then
/// minishards until each holds at most 4,000 chunks, as long as the shard index stays within
/// 8 KiB and a minishard index within 40,000 bytes; gzip minishard indices and data. Errors when
/// chunk positions need more than 64 bits. The same choices as igneous, so that a pyramid
/// cuboids writes is laid out as igneous would lay it out.
pub fn igneous_image_spec(
    size: Vec3,
    chunk: Vec3,
    bytes_per_voxel: usize,
    shard_bytes: u64,
) -> Result<ShardingSpec, String> {
    const MAX_LABELS_PER_MINISHARD: f64 = 4000.0;
    const MAX_MINISHARD_INDEX_BYTES: f64 = 40000.0;
    const MAX_SHARD_INDEX_BYTES: f64 = 8192.0;
    let grid = div_ceil3(size, chunk);
    let max_bits: i64 = axis_bits(grid).iter().map(|&b| b as i64).sum();
    if max_bits > 64 {
        return Err(format!(
            "a grid of {grid:?} chunks needs {max_bits}-bit chunk ids (over 64)"
        ));
    }
    let num_chunks = grid.iter().map(|&g| g as f64).product::<f64>();
    let chunk_bytes = (chunk.iter().product::<usize>() * bytes_per_voxel) as f64;
    let mut chunks_per_shard = (shard_bytes as f64 / chunk_bytes).ceil();
    chunks_per_shard = 2f64.powi(chunks_per_shard.log2().floor() as i32);
    if num_chunks < chunks_per_shard {
        chunks_per_shard = 2f64.powi(num_chunks.log2().ceil() as i32);
    }
    let mut num_shards = num_chunks / chunks_per_shard;
    // Bits that index the chunks of a shard, as many as the shards leave.
    let preshift_for = |num_shards: f64| {
        let shard_bits = num_shards.log2().ceil() as i64;
        (chunks_per_shard.log2().ceil() as i64).min(max_bits - shard_bits)
    };
    let mut preshift_bits = preshift_for(num_shards);
    let mut labels_per_minishard = chunks_per_shard;
    let mut minishard_bits = 0i64;
    while labels_per_minishard > MAX_LABELS_PER_MINISHARD {
        labels_per_minishard /= 2.0;
        minishard_bits += 1;
        let minishard_index = 24.0 * labels_per_minishard;
        let shard_index = 16.0 * 2f64.powi(minishard_bits as i32);
        let minishard_too_big =
            minishard_index > MAX_MINISHARD_INDEX_BYTES && minishard_bits > preshift_bits;
        if minishard_too_big || shard_index > MAX_SHARD_INDEX_BYTES {
            minishard_bits -= 1;
            num_shards *= 2.0;
            preshift_bits = preshift_for(num_shards);
        }
    }
    // Preshift and minishard bits together index the chunks of a shard; the rest of the id's
    // bits name the shard.
    preshift_bits -= minishard_bits;
    let shard_bits = max_bits - preshift_bits - minishard_bits;
    if preshift_bits < 0 || shard_bits < 0 {
        return Err(format!(
            "no sharding fits: preshift {preshift_bits}, minishard {minishard_bits}, shard {shard_bits} bits of {max_bits}"
        ));
    }
    Ok(ShardingSpec {
        preshift_bits: preshift_bits as u32,
        hash: ShardHash::Identity,
        minishard_bits: minishard_bits as u32,
        shard_bits: shard_bits as u32,
        gzip_minishard_index: true,
        gzip_data: true,
    })
}

/// The voxel extent of one shard of an image scale with an identity hash (CloudVolume's
/// `image_shard_shape`): the preshift and minishard bits, dealt out over x, y, z in Morton
/// order while an axis still has grid to cover.
pub fn image_shard_shape(spec: &ShardingSpec, size: Vec3, chunk: Vec3) -> Vec3 {
    let grid = div_ceil3(size, chunk);
    let bits = spec.preshift_bits + spec.minishard_bits;
    let mut shape = [0u32; 3];
    let mut over = [false; 3];
    let mut dealt = 0;
    'deal: while dealt < bits {
        let mut changed = false;
        for a in 0..3 {
            if (1u128 << (shape[a] + 1)) < 2 * grid[a] as u128 && !over[a] {
                if (1u128 << (shape[a] + 1)) >= grid[a] as u128 {
                    over[a] = true;
                }
                shape[a] += 1;
                dealt += 1;
                changed = true;
            }
            if dealt >= bits {
                break 'deal;
            }
        }
        if !changed {
            break;
        }
    }
    [0, 1, 2].map(|a| chunk[a] << shape[a])
}

fn low_bits(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Bits of the compressed Morton code per axis of a grid: ceil(log2(size)).
fn axis_bits(grid: Vec3) -> [u32; 3] {
    grid.map(|g| (g.max(1) as u64).next_power_of_two().trailing_zeros())
}

/// Whether a grid's positions fit a 64-bit compressed Morton code.
pub fn morton_fits(grid: Vec3) -> bool {
    axis_bits(grid).iter().sum::<u32>() <= 64
}

/// The compressed Morton code of grid position `p` in a grid of `grid` chunks: bit i of each
/// coordinate, x then y then z, for the axes that still have a bit i, interleaved from bit 0.
pub fn compressed_morton_code(p: Vec3, grid: Vec3) -> u64 {
    let bits = axis_bits(grid);
    let mut code = 0u64;
    let mut j = 0;
    for i in 0..*bits.iter().max().expect("three axes") {
        for a in 0..3 {
            if i < bits[a] {
                code |= ((p[a] as u64 >> i) & 1) << j;
                j += 1;
            }
        }
    }
    code
}

/// The chunk id of a (relative) chunk box of a scale with chunk size `chunk` and size `size`.
pub fn chunk_id(chunk_box: Box3, chunk: Vec3, size: Vec3) -> u64 {
    let grid = div_ceil3(size, chunk);
    let p = [0, 1, 2].map(|a| chunk_box.start[a] / chunk[a]);
    compressed_morton_code(p, grid)
}

/// The low 64 bits of MurmurHash3 x86_128 (seed 0) of a u64's 8 little-endian bytes: what
/// neuroglancer, tensorstore and CloudVolume (`mmh3.hash64(..., x64arch=False)[0]`) use.
pub fn murmurhash3_x86_128_low64(value: u64) -> u64 {
    const C1: u32 = 0x239b961b;
    const C2: u32 = 0xab0e9789;
    const C3: u32 = 0x38b34ae5;
    let bytes = value.to_le_bytes();
    let (mut h1, mut h2, mut h3, mut h4) = (0u32, 0u32, 0u32, 0u32);
    // An 8-byte input has no full 16-byte block: only the tail, words k1 and k2.
    let k1 = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let k2 = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    h2 ^= k2.wrapping_mul(C2).rotate_left(16).wrapping_mul(C3);
    h1 ^= k1.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    let len = 8u32;
    h1 ^= len;
    h2 ^= len;
    h3 ^= len;
    h4 ^= len;
    h1 = h1.wrapping_add(h2).wrapping_add(h3).wrapping_add(h4);
    h2 = h2.wrapping_add(h1);
    h3 = h3.wrapping_add(h1);
    h4 = h4.wrapping_add(h1);
    h1 = fmix32(h1);
    h2 = fmix32(h2);
    h3 = fmix32(h3);
    h4 = fmix32(h4);
    h1 = h1.wrapping_add(h2).wrapping_add(h3).wrapping_add(h4);
    h2 = h2.wrapping_add(h1);
    h1 as u64 | (h2 as u64) << 32
}

fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85ebca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2ae35);
    h ^= h >> 16;
    h
}

/// A shard file holding `chunks` (chunk id -> stored bytes: the scale's encoding, already
/// gzipped where the spec gzips data; all of them in this shard): the shard index, then the
/// chunks' data, minishard by minishard in increasing number and by increasing id within each,
/// then the minishard indices in the same order (gzipped where the spec says so). This is the
/// layout CloudVolume's shard writer produces for chunks given in id order, byte for byte with
/// raw indices; minishards without chunks get an empty (0, 0) entry, as there.
pub fn encode_shard(
    spec: &ShardingSpec,
    chunks: &std::collections::BTreeMap<u64, Vec<u8>>,
) -> Vec<u8> {
    let mut minishards: std::collections::BTreeMap<u64, Vec<(u64, &[u8])>> = Default::default();
    for (&id, data) in chunks {
        minishards
            .entry(spec.location(id).1)
            .or_default()
            .push((id, data.as_slice()));
    }
    let mut data_part = Vec::new();
    let mut indices = Vec::new();
    for chunks in minishards.values() {
        let mut ids = Vec::with_capacity(chunks.len());
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut sizes = Vec::with_capacity(chunks.len());
        let mut last_id = 0;
        for (i, &(id, stored)) in chunks.iter().enumerate() {
            ids.push(id - last_id);
            last_id = id;
            // The first chunk's offset counts from the start of the data part; the others
            // follow the chunk before them directly.
            offsets.push(if i == 0 { data_part.len() as u64 } else { 0 });
            sizes.push(stored.len() as u64);
            data_part.extend_from_slice(stored);
        }
        let index: Vec<u8> = [ids, offsets, sizes]
            .concat()
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        indices.push(if spec.gzip_minishard_index {
            super::gzip(&index, 6)
        } else {
            index
        });
    }
    let mut fixed = vec![0u8; spec.index_bytes() as usize];
    let mut end = data_part.len() as u64;
    for (&minishard, index) in minishards.keys().zip(&indices) {
        let start = end;
        end += index.len() as u64;
        let at = 16 * minishard as usize;
        fixed[at..at + 8].copy_from_slice(&start.to_le_bytes());
        fixed[at + 8..at + 16].copy_from_slice(&end.to_le_bytes());
    }
    let mut shard = fixed;
    shard.extend_from_slice(&data_part);
    for index in indices {
        shard.extend_from_slice(&index);
    }
    shard
}

/// Gathers the chunks a run writes to a sharded scale, shard by shard: a shard is handed back
/// whole once the last of its chunks the run expects has arrived, so each shard file is written
/// once, by one writer. Memory: the encoded chunks of the shards still open.
pub struct ShardAssembler {
    spec: ShardingSpec,
    scale_key: String,
    expected: HashMap<u64, usize>,
    open: Mutex<HashMap<u64, std::collections::BTreeMap<u64, Vec<u8>>>>,
}

/// A shard's key and its chunks (chunk id -> stored bytes), ready for [`encode_shard`].
pub type ShardChunks = (String, std::collections::BTreeMap<u64, Vec<u8>>);

impl ShardAssembler {
    /// Expects the chunks `ids` (every chunk the run may write to the scale).
    pub fn new(spec: ShardingSpec, scale_key: &str, ids: impl IntoIterator<Item = u64>) -> Self {
        let mut expected = HashMap::new();
        for id in ids {
            *expected.entry(spec.location(id).0).or_insert(0) += 1;
        }
        ShardAssembler {
            spec,
            scale_key: scale_key.to_string(),
            expected,
            open: Mutex::default(),
        }
    }

    pub fn spec(&self) -> &ShardingSpec {
        &self.spec
    }

    /// Adds a chunk's stored bytes; returns its shard once complete.
    pub fn add(&self, id: u64, data: Vec<u8>) -> Option<ShardChunks> {
        let shard = self.spec.location(id).0;
        let mut open = self.open.lock().expect("no panics while held");
        let chunks = open.entry(shard).or_default();
        chunks.insert(id, data);
        if chunks.len() < self.expected.get(&shard).copied().unwrap_or(0) {
            return None;
        }
        let chunks = open.remove(&shard).expect("just filled");
        Some((self.spec.shard_key(&self.scale_key, shard), chunks))
    }

    /// The shards still open: those with chunks the run did not write (all-missing input).
    pub fn rest(&self) -> Vec<ShardChunks> {
        let mut open = self.open.lock().expect("no panics while held");
        open.drain()
            .map(|(shard, chunks)| (self.spec.shard_key(&self.scale_key, shard), chunks))
            .collect()
    }
}

/// What a scale's shards can hold at most: a chunk's decoded bytes and the number of chunks
/// (which bounds a minishard index). Damaged sizes past these are errors, not allocations.
#[derive(Clone, Copy, Debug)]
pub struct ShardBounds {
    pub chunk_bytes: usize,
    pub chunks: usize,
}

/// One minishard's chunks: (chunk id, byte offset in the shard file, size), sorted by id.
type MinishardIndex = Vec<(u64, u64, u64)>;

/// Reads chunks of sharded scales, keeping the minishard indices it has decoded: the chunks of
/// one minishard are usually read together, and each index is fetched once.
#[derive(Default)]
pub struct ShardReader {
    minishards: Mutex<HashMap<(String, u64), Arc<MinishardIndex>>>,
}

/// Minishard indices kept at most (each a few KiB): beyond that the cache starts over.
const MAX_CACHED_MINISHARDS: usize = 4096;

impl ShardReader {
    /// The stored bytes of a chunk (its scale's encoding, gzip removed where the spec gzips
    /// data), or `None` when its shard, minishard or entry does not exist (a missing chunk).
    /// `bounds` limit what a gzipped chunk or minishard index may inflate to (a chunk: about
    /// twice its voxels' bytes).
    pub async fn read_chunk(
        &self,
        store: &dyn Store,
        spec: &ShardingSpec,
        scale_key: &str,
        chunk_id: u64,
        bounds: ShardBounds,
    ) -> Result<Option<Vec<u8>>, PrecomputedError> {
        let max_chunk_bytes = bounds.chunk_bytes;
        let (shard, minishard) = spec.location(chunk_id);
        let key = spec.shard_key(scale_key, shard);
        let index_bytes = bounds.chunks.saturating_mul(24).max(24);
        let Some(index) = self
            .minishard(store, spec, &key, minishard, index_bytes)
            .await?
        else {
            return Ok(None);
        };
        let Ok(at) = index.binary_search_by_key(&chunk_id, |e| e.0) else {
            return Ok(None);
        };
        let (_, offset, size) = index[at];
        let corrupt = |why: String| PrecomputedError::ShardCorrupt {
            key: format!("{}/{key}", store.location()),
            why,
        };
        if size as usize > max_chunk_bytes.max(1 << 20) * 2 {
            return Err(corrupt(format!(
                "chunk {chunk_id} claims {size} bytes, more than a chunk of this scale can hold"
            )));
        }
        let data = store
            .get_range(&key, offset, size)
            .await?
            .ok_or_else(|| corrupt("the shard file disappeared while being read".into()))?;
        if (data.len() as u64) < size {
            return Err(corrupt(format!(
                "chunk {chunk_id} points at bytes {offset}..{} outside the shard file (truncated?)",
                offset + size
            )));
        }
        if !spec.gzip_data {
            return Ok(Some(data));
        }
        // compressed_segmentation can take more than the raw voxels (block headers and tables
        // of small or truncated chunks): twice the voxels and a margin bound it.
        gunzip(&data, max_chunk_bytes * 2 + (64 << 10))
            .map(Some)
            .map_err(|e| corrupt(format!("chunk {chunk_id}: gzip: {e}")))
    }

    async fn minishard(
        &self,
        store: &dyn Store,
        spec: &ShardingSpec,
        key: &str,
        minishard: u64,
        max_index_bytes: usize,
    ) -> Result<Option<Arc<MinishardIndex>>, PrecomputedError> {
        let cache_key = (key.to_string(), minishard);
        if let Some(index) = self.minishards.lock().expect("no panics").get(&cache_key) {
            return Ok(Some(index.clone()));
        }
        let corrupt = |why: String| PrecomputedError::ShardCorrupt {
            key: format!("{}/{key}", store.location()),
            why,
        };
        let Some(entry) = store.get_range(key, 16 * minishard, 16).await? else {
            return Ok(None); // no shard file: none of its chunks exist
        };
        if entry.len() < 16 {
            return Err(corrupt(format!(
                "{} bytes, shorter than its {}-byte shard index (truncated)",
                16 * minishard + entry.len() as u64,
                spec.index_bytes()
            )));
        }
        let start = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
        let end = u64::from_le_bytes(entry[8..].try_into().expect("8 bytes"));
        if end < start {
            return Err(corrupt(format!(
                "minishard {minishard}'s index ends ({end}) before it starts ({start})"
            )));
        }
        let index = if start == end {
            Vec::new()
        } else {
            let len = end - start;
            // A minishard holds at most every chunk of the scale, 24 bytes each.
            if len > max_index_bytes as u64 {
                return Err(corrupt(format!(
                    "minishard {minishard}'s index claims {len} bytes"
                )));
            }
            let at = spec.index_bytes() + start;
            let bytes = store.get_range(key, at, len).await?.unwrap_or_default();
            if (bytes.len() as u64) < len {
                return Err(corrupt(format!(
                    "minishard {minishard}'s index at bytes {at}..{} lies outside the shard file (truncated?)",
                    at + len
                )));
            }
            let bytes = if spec.gzip_minishard_index {
                gunzip(&bytes, max_index_bytes)
                    .map_err(|e| corrupt(format!("minishard {minishard}'s index: gzip: {e}")))?
            } else {
                bytes
            };
            decode_minishard_index(&bytes, spec.index_bytes())
                .map_err(|why| corrupt(format!("minishard {minishard}'s index: {why}")))?
        };
        let index = Arc::new(index);
        let mut cache = self.minishards.lock().expect("no panics");
        if cache.len() >= MAX_CACHED_MINISHARDS {
            cache.clear();
        }
        cache.insert(cache_key, index.clone());
        Ok(Some(index))
    }
}

/// Decodes a minishard index (3n u64: id deltas, offset deltas, sizes) into absolute entries
/// sorted by chunk id; offsets become byte positions in the shard file.
fn decode_minishard_index(bytes: &[u8], index_bytes: u64) -> Result<MinishardIndex, String> {
    if !bytes.len().is_multiple_of(24) {
        return Err(format!(
            "{} bytes, not a whole number of entries",
            bytes.len()
        ));
    }
    let words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect();
    let n = words.len() / 3;
    let (ids, rest) = words.split_at(n);
    let (offsets, sizes) = rest.split_at(n);
    let overflow = || "offsets overflow 64 bits".to_string();
    let mut out = Vec::with_capacity(n);
    let (mut id, mut end) = (0u64, index_bytes);
    for i in 0..n {
        id = id.checked_add(ids[i]).ok_or("chunk ids overflow 64 bits")?;
        let start = end.checked_add(offsets[i]).ok_or_else(overflow)?;
        end = start.checked_add(sizes[i]).ok_or_else(overflow)?;
        if i > 0 && ids[i] == 0 {
            return Err(format!("chunk id {id} listed twice"));
        }
        out.push((id, start, sizes[i]));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn morton_codes_interleave_the_axes_that_have_bits() {
        // A 4x2x1 grid: x has two bits, y one, z none: x0 y0 x1.
        assert_eq!(compressed_morton_code([0, 0, 0], [4, 2, 1]), 0);
        assert_eq!(compressed_morton_code([1, 0, 0], [4, 2, 1]), 0b001);
        assert_eq!(compressed_morton_code([0, 1, 0], [4, 2, 1]), 0b010);
        assert_eq!(compressed_morton_code([2, 0, 0], [4, 2, 1]), 0b100);
        assert_eq!(compressed_morton_code([3, 1, 0], [4, 2, 1]), 0b111);
        assert!(morton_fits([1 << 21, 1 << 21, 1 << 22]));
        assert!(!morton_fits([1 << 21, 1 << 21, (1 << 22) + 1]));
    }

    #[test]
    fn shard_keys_are_padded_hex() {
        let spec = ShardingSpec {
            preshift_bits: 0,
            hash: ShardHash::Identity,
            minishard_bits: 2,
            shard_bits: 5,
            gzip_minishard_index: false,
            gzip_data: false,
        };
        assert_eq!(spec.location(0b101_1011), (0b10110, 0b11));
        assert_eq!(spec.shard_key("8_8_8", 0x16), "8_8_8/16.shard");
        assert_eq!(spec.shard_key("8_8_8", 3), "8_8_8/03.shard");
    }

    #[test]
    fn minishard_indices_decode_deltas_and_refuse_garbage() {
        // Two chunks, ids 5 and 9, 10 and 20 bytes, the second 4 bytes after the first ends.
        let words = [5u64, 4, 0, 4, 10, 20];
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let index = decode_minishard_index(&bytes, 32).unwrap();
        assert_eq!(index, vec![(5, 32, 10), (9, 46, 20)]);
        assert!(decode_minishard_index(&bytes[..20], 32).is_err());
        let overflowing = [1u64, u64::MAX, 1];
        let bytes: Vec<u8> = overflowing.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert!(decode_minishard_index(&bytes, 32).is_err());
    }
}
