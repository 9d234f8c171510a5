//! Neuroglancer's `compressed_segmentation` encoding of uint32/uint64 labels.
//!
//! Per channel: block headers (2 words each: 24-bit table offset | 8-bit bit width, then the
//! encoded-values offset, both in words from the channel start), then per block its packed
//! indices followed by its sorted lookup table, unless an identical table was already written
//! (then the header points to that one). The encoder follows the reference implementation's
//! order exactly, so its output is byte-identical to the `compressed_segmentation` package.

use crate::geometry::Vec3;
use crate::hash::IdBuildHasher;
use std::collections::HashMap;
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum CsegError {
    #[error("compressed_segmentation data is truncated: needs word {needed}, has {len} words")]
    Truncated { needed: usize, len: usize },
    #[error("compressed_segmentation block {block} has invalid bit width {bits}")]
    BadBits { block: usize, bits: u32 },
    #[error(
        "compressed_segmentation table offset overflows 24 bits: chunk too large for block size"
    )]
    TableOffsetOverflow,
    #[error("compressed_segmentation data length {0} is not a multiple of 4 bytes")]
    Length(usize),
}

/// Encodes `channels` channels of labels (`words` = 1 for uint32, 2 for uint64) laid out
/// Fortran-order `[x, y, z, c]` as little-endian bytes.
pub fn encode(
    labels: &[u8],
    shape: Vec3,
    channels: usize,
    words: usize,
    block: Vec3,
) -> Result<Vec<u8>, CsegError> {
    let values = to_values(labels, words);
    let n = shape[0] * shape[1] * shape[2];
    let mut out: Vec<u32> = vec![0; channels];
    for c in 0..channels {
        out[c] = out.len() as u32;
        encode_channel(&values[c * n..(c + 1) * n], shape, words, block, &mut out)?;
    }
    Ok(out.iter().flat_map(|w| w.to_le_bytes()).collect())
}

fn to_values(bytes: &[u8], words: usize) -> Vec<u64> {
    if words == 1 {
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as u64)
            .collect()
    } else {
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

fn grid(shape: Vec3, block: Vec3) -> Vec3 {
    crate::geometry::div_ceil3(shape, block)
}

/// The bit width of a block's indices: 0 for one label, else the smallest power of two of bits
/// that indexes them all.
pub(crate) fn bits_for(distinct: usize) -> u32 {
    if distinct <= 1 {
        return 0;
    }
    let mut bits = 1;
    while (1usize << bits) < distinct {
        bits *= 2;
    }
    bits
}

fn encode_channel(
    values: &[u64],
    shape: Vec3,
    words: usize,
    block: Vec3,
    out: &mut Vec<u32>,
) -> Result<(), CsegError> {
    let base = out.len();
    let g = grid(shape, block);
    out.resize(base + 2 * g[0] * g[1] * g[2], 0);
    let mut tables: HashMap<Vec<u64>, u32, IdBuildHasher> = HashMap::default();
    let block_len = block[0] * block[1] * block[2];
    let mut table: Vec<u64> = Vec::with_capacity(block_len);
    for bz in 0..g[2] {
        for by in 0..g[1] {
            for bx in 0..g[0] {
                let origin = [bx * block[0], by * block[1], bz * block[2]];
                let actual = [0, 1, 2].map(|i| block[i].min(shape[i] - origin[i]));
                let at = |x: usize, y: usize, z: usize| {
                    values[(origin[0] + x)
                        + shape[0] * ((origin[1] + y) + shape[1] * (origin[2] + z))]
                };
                table.clear();
                for z in 0..actual[2] {
                    for y in 0..actual[1] {
                        for x in 0..actual[0] {
                            table.push(at(x, y, z));
                        }
                    }
                }
                // Most blocks of a segmentation hold one label: no sort needed.
                if table.iter().any(|&v| v != table[0]) {
                    table.sort_unstable();
                    table.dedup();
                } else {
                    table.truncate(1);
                }
                let bits = bits_for(table.len()) as usize;
                let encoded_offset = out.len() - base;
                let encoded_words = (bits * block_len).div_ceil(32);
                let cached = tables.get(&table).copied();
                let table_offset =
                    cached.map_or(encoded_offset + encoded_words, |off| off as usize);
                let header_words = block_header(table_offset, bits, encoded_offset)?;
                out.resize(out.len() + encoded_words, 0);
                if bits > 0 {
                    // The table is sorted: a value's index is its position.
                    let index = |v: u64| table.binary_search(&v).expect("in the table") as u32;
                    let start = base + encoded_offset;
                    for z in 0..actual[2] {
                        for y in 0..actual[1] {
                            for x in 0..actual[0] {
                                let pos = x + block[0] * (y + block[1] * z);
                                let bit = pos * bits;
                                out[start + bit / 32] |= index(at(x, y, z)) << (bit % 32);
                            }
                        }
                    }
                }
                if cached.is_none() {
                    for &v in &table {
                        out.push(v as u32);
                        if words == 2 {
                            out.push((v >> 32) as u32);
                        }
                    }
                    tables.insert(table.clone(), table_offset as u32);
                }
                let header = base + 2 * (bx + g[0] * (by + g[1] * bz));
                out[header..header + 2].copy_from_slice(&header_words);
            }
        }
    }
    Ok(())
}

/// A block's two header words: its table's offset (24 bits) with its bit width above it, then
/// its encoded values' offset, both in words from the channel start.
pub(crate) fn block_header(
    table_offset: usize,
    bits: usize,
    encoded_offset: usize,
) -> Result<[u32; 2], CsegError> {
    if table_offset >= 1 << 24 {
        return Err(CsegError::TableOffsetOverflow);
    }
    Ok([
        table_offset as u32 | ((bits as u32) << 24),
        encoded_offset as u32,
    ])
}

/// Decodes into Fortran-order little-endian label bytes of `shape` x `channels`.
pub fn decode(
    data: &[u8],
    shape: Vec3,
    channels: usize,
    words: usize,
    block: Vec3,
) -> Result<Vec<u8>, CsegError> {
    if !data.len().is_multiple_of(4) {
        return Err(CsegError::Length(data.len()));
    }
    let w: Vec<u32> = data
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let word = |i: usize| {
        w.get(i).copied().ok_or(CsegError::Truncated {
            needed: i,
            len: w.len(),
        })
    };
    let n = shape[0] * shape[1] * shape[2];
    let g = grid(shape, block);
    let label_bytes = words * 4;
    let mut out = vec![0u8; n * channels * label_bytes];
    for c in 0..channels {
        let base = word(c)? as usize;
        let values = &mut out[c * n * label_bytes..(c + 1) * n * label_bytes];
        for bz in 0..g[2] {
            for by in 0..g[1] {
                for bx in 0..g[0] {
                    let b = bx + g[0] * (by + g[1] * bz);
                    let h0 = word(base + 2 * b)?;
                    let encoded = base + word(base + 2 * b + 1)? as usize;
                    let table = base + (h0 & 0xff_ffff) as usize;
                    let bits = h0 >> 24;
                    if !matches!(bits, 0 | 1 | 2 | 4 | 8 | 16 | 32) {
                        return Err(CsegError::BadBits { block: b, bits });
                    }
                    let origin = [bx * block[0], by * block[1], bz * block[2]];
                    let actual = [0, 1, 2].map(|i| block[i].min(shape[i] - origin[i]));
                    for z in 0..actual[2] {
                        for y in 0..actual[1] {
                            for x in 0..actual[0] {
                                let pos = x + block[0] * (y + block[1] * z);
                                let index = if bits == 0 {
                                    0
                                } else {
                                    let bit = pos * bits as usize;
                                    let mask = if bits == 32 {
                                        u32::MAX
                                    } else {
                                        (1 << bits) - 1
                                    };
                                    (word(encoded + bit / 32)? >> (bit % 32)) & mask
                                } as usize;
                                let entry = table + index * words;
                                let mut v = word(entry)? as u64;
                                if words == 2 {
                                    v |= (word(entry + 1)? as u64) << 32;
                                }
                                let at = (origin[0] + x)
                                    + shape[0] * ((origin[1] + y) + shape[1] * (origin[2] + z));
                                values[at * label_bytes..(at + 1) * label_bytes]
                                    .copy_from_slice(&v.to_le_bytes()[..label_bytes]);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_partial_blocks_and_both_widths() {
        let shape = [11, 7, 5];
        for words in [1, 2] {
            let labels: Vec<u8> = (0..11 * 7 * 5)
                .flat_map(|i: u64| {
                    let v = (i / 13) * 0x1_0000_0001 % if words == 1 { 1 << 32 } else { u64::MAX };
                    v.to_le_bytes()[..4 * words].to_vec()
                })
                .collect();
            let enc = encode(&labels, shape, 1, words, [8, 8, 8]).unwrap();
            assert_eq!(decode(&enc, shape, 1, words, [8, 8, 8]).unwrap(), labels);
        }
    }

    #[test]
    fn truncated_data_is_an_error() {
        let labels: Vec<u8> = (0..64u32).flat_map(|v| v.to_le_bytes()).collect();
        let enc = encode(&labels, [4, 4, 4], 1, 1, [8, 8, 8]).unwrap();
        let err = decode(&enc[..enc.len() - 8], [4, 4, 4], 1, 1, [8, 8, 8]).unwrap_err();
        assert!(matches!(err, CsegError::Truncated { .. }));
    }
}
