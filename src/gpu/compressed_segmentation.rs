//! neuroglancer's `compressed_segmentation` encoding on the GPU, byte-identical to the CPU encoder
//! in `formats::precomputed::compressed_segmentation` (which the `compressed-segmentation`
//! package's goldens pin).
//!
//! The per-voxel work runs in shaders/compressed_segmentation.wgsl, one workgroup per block:
//! sorting the block's labels into its lookup table and packing each voxel's index. The host
//! then lays each chunk out: block headers, then per block its packed indices and its table,
//! unless an identical table was already written (a hash lookup per block, no per-voxel work).
//! Chunks are encoded many at a time, in groups whose buffers fit the adapter's binding limit.

use crate::dtype::DataType;
use crate::formats::precomputed::compressed_segmentation::{bits_for, block_header, CsegError};
use crate::formats::precomputed::info::{Encoding, Scale};
use crate::geometry::{div_ceil3, voxels, Box3, Vec3};
use crate::gpu::context::{GpuContext, GpuError};
use crate::gpu::work::{Work, GROUP};
use crate::hash::IdBuildHasher;
use crate::volume::Volume;
use bytemuck::{Pod, Zeroable};
use std::collections::HashMap;
use tracing::debug_span;

const SHADER: &str = "compressed_segmentation";

/// The largest block (in voxels) one workgroup encodes; larger blocks are left to the CPU.
pub const MAX_GPU_BLOCK: usize = 512;

/// Mirrors `Params` in shaders/compressed_segmentation.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct Params {
    size: [u32; 3],
    blocks: u32,
    block: [u32; 3],
    block_len: u32,
    sort_len: u32,
    chunks: u32,
    words: u32,
    packed_stride: u32,
}

/// Whether [`encode_chunks_gpu`] takes labels of this type in blocks of this size.
pub fn gpu_encodes(dtype: DataType, block: Vec3) -> bool {
    matches!(dtype, DataType::Uint32 | DataType::Uint64)
        && (1..=MAX_GPU_BLOCK).contains(&voxels(block))
}

/// Whether `ctx` encodes the chunks of `scale`, of labels of `dtype`: a compressed_segmentation
/// scale whose labels and block size [`encode_chunks_gpu`] takes, on a context that encodes
/// ([`GpuContext::gpu_encoding`]).
pub fn encodes_scale(ctx: &GpuContext, scale: &Scale, dtype: DataType) -> bool {
    ctx.gpu_encoding
        && scale.encoding == Encoding::CompressedSegmentation
        && gpu_encodes(dtype, scale.block_size())
}

/// Encodes each of `chunks` (boxes inside `volume`, every channel) as `compressed_segmentation`
/// with blocks of `block`. Entry k is what `compressed_segmentation::encode` gives for
/// `volume.crop(chunks[k])`: the same bytes, or the same error.
pub fn encode_chunks_gpu(
    ctx: &GpuContext,
    volume: &Volume,
    chunks: &[Box3],
    block: Vec3,
) -> Result<Vec<Result<Vec<u8>, CsegError>>, GpuError> {
    assert!(
        gpu_encodes(volume.dtype, block),
        "callers check gpu_encodes"
    );
    let _span = debug_span!("gpu_cseg", chunks = chunks.len()).entered();
    let words = volume.dtype.size() / 4;
    let layout = BlockLayout::new(block, words);
    let mut encoded: Vec<Result<Vec<u32>, CsegError>> = chunks
        .iter()
        .map(|_| Ok(vec![0; volume.channels]))
        .collect();
    for c in 0..volume.channels {
        for group in groups(chunks, &layout, ctx.max_binding_bytes()) {
            let boxes = &chunks[group.clone()];
            let blocks = encode_group(ctx, volume, c, boxes, &layout)?;
            for (k, chunk) in boxes.iter().enumerate() {
                let out = &mut encoded[group.start + k];
                if let Ok(words) = out {
                    words[c] = words.len() as u32;
                    if let Err(e) = blocks.lay_out_chunk(k, chunk.shape(), &layout, words) {
                        *out = Err(e);
                    }
                }
            }
        }
    }
    Ok(encoded
        .into_iter()
        .map(|r| r.map(|words| bytemuck::cast_slice(&words).to_vec()))
        .collect())
}

/// Sizes that follow from the block shape.
struct BlockLayout {
    block: Vec3,
    len: usize,
    words: usize,
    /// Words of a block's packed-index slot: 16 bits per voxel, the most MAX_GPU_BLOCK voxels
    /// (at most 512 distinct labels) need.
    packed_stride: usize,
}

impl BlockLayout {
    fn new(block: Vec3, words: usize) -> BlockLayout {
        let len = voxels(block);
        BlockLayout {
            block,
            len,
            words,
            packed_stride: (16 * len).div_ceil(32),
        }
    }

    fn blocks_in(&self, chunk: Vec3) -> usize {
        voxels(div_ceil3(chunk, self.block))
    }

    /// The most bytes any buffer of a group of `blocks` blocks over a box of `voxels` needs.
    fn largest_buffer(&self, blocks: usize, voxels: usize) -> u64 {
        let upload = voxels * self.words;
        let tables = blocks * self.len * self.words;
        let out = blocks * (self.packed_stride + self.len * self.words);
        (upload.max(tables).max(out) * 4) as u64
    }
}

/// Runs of consecutive chunks whose buffers fit `limit` bytes each (a chunk too large on its own
/// is a run of one, and fails with `TooLarge` when encoded).
fn groups(chunks: &[Box3], layout: &BlockLayout, limit: u64) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let (mut blocks, mut bounds) = (0, None::<Box3>);
    for (k, chunk) in chunks.iter().enumerate() {
        let joined = bounds.map_or(*chunk, |b| hull(b, *chunk));
        let more = blocks + layout.blocks_in(chunk.shape());
        if k > start && layout.largest_buffer(more, voxels(joined.shape())) > limit {
            out.push(start..k);
            start = k;
            blocks = layout.blocks_in(chunk.shape());
            bounds = Some(*chunk);
        } else {
            blocks = more;
            bounds = Some(joined);
        }
    }
    if start < chunks.len() {
        out.push(start..chunks.len());
    }
    out
}

fn hull(a: Box3, b: Box3) -> Box3 {
    Box3::new(
        [0, 1, 2].map(|i| a.start[i].min(b.start[i])),
        [0, 1, 2].map(|i| a.stop[i].max(b.stop[i])),
    )
}

/// What the GPU returns for a group of chunks: per block its distinct-label count and where its
/// packed indices and table start in `words`.
struct EncodedBlocks {
    counts: Vec<u32>,
    offsets: Vec<u32>,
    words: Vec<u32>,
    /// Each chunk's first block.
    first_block: Vec<usize>,
}

/// Uploads the hull of `chunks` from channel `c` and encodes their blocks.
fn encode_group(
    ctx: &GpuContext,
    volume: &Volume,
    c: usize,
    chunks: &[Box3],
    layout: &BlockLayout,
) -> Result<EncodedBlocks, GpuError> {
    let bounds = chunks[1..].iter().fold(chunks[0], |a, &b| hull(a, b));
    let size = bounds.shape();
    let mut first_block = Vec::with_capacity(chunks.len());
    let mut records = Vec::with_capacity(chunks.len() * 8);
    let mut blocks = 0;
    for chunk in chunks {
        let local = chunk.relative_to(bounds.start);
        first_block.push(blocks);
        records.extend(local.start.iter().chain(&local.shape()).map(|&v| v as u32));
        records.extend([blocks as u32, 0]);
        blocks += layout.blocks_in(chunk.shape());
    }
    let mut work = Work::new(ctx, "compressed_segmentation encoding");
    let elem = volume.dtype.size();
    let volume_bytes = voxels(size) * elem;
    let labels = work.upload_with("the chunks' labels", volume_bytes, |view| {
        write_box(view, volume, c, bounds)
    })?;
    let chunk_boxes = work.upload("chunk boxes", bytemuck::cast_slice(&records))?;
    let counts = work.scratch("block counts", blocks)?;
    let tables = work.scratch("block tables", blocks * layout.len * layout.words)?;
    let packed = work.scratch("packed indices", blocks * layout.packed_stride)?;
    let offsets = work.scratch("block offsets", blocks + 1)?;
    let out_words = blocks * (layout.packed_stride + layout.len * layout.words);
    let out = work.scratch("encoded blocks", out_words)?;
    let params = work.uniform(&Params {
        size: size.map(|v| v as u32),
        blocks: blocks as u32,
        block: layout.block.map(|v| v as u32),
        block_len: layout.len as u32,
        sort_len: layout.len.next_power_of_two() as u32,
        chunks: chunks.len() as u32,
        words: layout.words as u32,
        packed_stride: layout.packed_stride as u32,
    });
    let per_block = blocks * GROUP as usize;
    work.dispatch(
        SHADER,
        "block_tables",
        &[
            (0, &params),
            (1, &labels),
            (2, &chunk_boxes),
            (3, &counts),
            (4, &tables),
            (5, &packed),
        ],
        per_block,
    )?;
    work.dispatch(
        SHADER,
        "block_offsets",
        &[(0, &params), (3, &counts), (6, &offsets)],
        GROUP as usize,
    )?;
    work.dispatch(
        SHADER,
        "compact",
        &[
            (0, &params),
            (3, &counts),
            (4, &tables),
            (5, &packed),
            (6, &offsets),
            (7, &out),
        ],
        per_block,
    )?;
    let mut sizes = work.finish(&[&counts, &offsets])?;
    let offsets = sizes.pop().expect("two buffers");
    let counts = sizes.pop().expect("two buffers");
    let total = offsets[blocks] as u64;
    let words = work
        .finish_prefixes(&[(&out, total * 4)])?
        .pop()
        .expect("one buffer");
    Ok(EncodedBlocks {
        counts,
        offsets,
        words,
        first_block,
    })
}

/// Writes channel `c` of `volume` inside `bounds` into an upload, Fortran order, row by row.
fn write_box(view: &mut wgpu::WriteOnly<'_, [u8]>, volume: &Volume, c: usize, bounds: Box3) {
    let elem = volume.dtype.size();
    let channel = volume.channel(c);
    let [sx, sy, _] = volume.shape;
    let size = bounds.shape();
    let row = size[0] * elem;
    for z in 0..size[2] {
        for y in 0..size[1] {
            let from =
                (bounds.start[0] + sx * (bounds.start[1] + y + sy * (bounds.start[2] + z))) * elem;
            let to = (y + size[1] * z) * row;
            view.slice(to..to + row)
                .copy_from_slice(&channel[from..from + row]);
        }
    }
}

impl EncodedBlocks {
    /// Appends chunk `k`'s channel (of `shape`) to `out`, whose current end is the channel's
    /// start: headers, then per block its packed indices and its table unless an identical one
    /// was written already, exactly as the reference encoder orders them.
    fn lay_out_chunk(
        &self,
        k: usize,
        shape: Vec3,
        layout: &BlockLayout,
        out: &mut Vec<u32>,
    ) -> Result<(), CsegError> {
        let base = out.len();
        let blocks = layout.blocks_in(shape);
        out.resize(base + 2 * blocks, 0);
        let mut tables: HashMap<&[u32], u32, IdBuildHasher> = HashMap::default();
        for b in 0..blocks {
            let id = self.first_block[k] + b;
            let count = self.counts[id] as usize;
            let bits = bits_for(count) as usize;
            let encoded_words = (bits * layout.len).div_ceil(32);
            let at = self.offsets[id] as usize;
            let packed = &self.words[at..at + encoded_words];
            let table = &self.words[at + encoded_words..at + encoded_words + count * layout.words];
            let encoded_offset = out.len() - base;
            let cached = tables.get(table).copied();
            let table_offset = cached.map_or(encoded_offset + encoded_words, |o| o as usize);
            let header = block_header(table_offset, bits, encoded_offset)?;
            out.extend_from_slice(packed);
            if cached.is_none() {
                out.extend_from_slice(table);
                tables.insert(table, table_offset as u32);
            }
            out[base + 2 * b..base + 2 * b + 2].copy_from_slice(&header);
        }
        Ok(())
    }
}
