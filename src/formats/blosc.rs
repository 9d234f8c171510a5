//! Blosc-1 frames as python-blosc writes them (`blosc.compress(data, typesize, clevel=9,
//! shuffle=SHUFFLE, cname='blosclz')`), through c-blosc itself (built from source by
//! `blosc-src`), so frames are read and written exactly as the Boss does.

use std::os::raw::{c_char, c_int, c_void};
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum BloscError {
    #[error("not a valid Blosc-1 frame ({len} bytes)")]
    Invalid { len: usize },
    #[error("Blosc-1 frame decompresses to {got} bytes, expected {expected}")]
    Size { got: usize, expected: usize },
    #[error("Blosc-1 frame is corrupt (decompression failed with code {code})")]
    Corrupt { code: i32 },
    #[error("cannot compress {len} bytes with Blosc-1 (code {code})")]
    Compress { len: usize, code: i32 },
}

const BLOSCLZ: &[u8] = b"blosclz\0";
const CLEVEL: c_int = 9;
const BYTE_SHUFFLE: c_int = blosc_src::BLOSC_SHUFFLE as c_int;

/// Compresses `data` of `typesize`-byte items into one frame.
pub fn compress(data: &[u8], typesize: usize) -> Result<Vec<u8>, BloscError> {
    let capacity = data.len() + blosc_src::BLOSC_MAX_OVERHEAD as usize;
    let mut out = vec![0u8; capacity];
    // SAFETY: src and dest are valid for the lengths given; the _ctx call uses no global state.
    let n = unsafe {
        blosc_src::blosc_compress_ctx(
            CLEVEL,
            BYTE_SHUFFLE,
            typesize,
            data.len(),
            data.as_ptr() as *const c_void,
            out.as_mut_ptr() as *mut c_void,
            capacity,
            BLOSCLZ.as_ptr() as *const c_char,
            0,
            1,
        )
    };
    if n <= 0 {
        return Err(BloscError::Compress {
            len: data.len(),
            code: n,
        });
    }
    out.truncate(n as usize);
    Ok(out)
}

/// Decompresses one frame, checking it first and that it holds `expected` bytes.
pub fn decompress(frame: &[u8], expected: usize) -> Result<Vec<u8>, BloscError> {
    let mut nbytes = 0usize;
    // SAFETY: validate reads at most `frame.len()` bytes of the frame.
    let valid = unsafe {
        blosc_src::blosc_cbuffer_validate(frame.as_ptr() as *const c_void, frame.len(), &mut nbytes)
    };
    if frame.len() < blosc_src::BLOSC_MIN_HEADER_LENGTH as usize || valid != 0 {
        return Err(BloscError::Invalid { len: frame.len() });
    }
    if nbytes != expected {
        return Err(BloscError::Size {
            got: nbytes,
            expected,
        });
    }
    let mut out = vec![0u8; nbytes];
    // SAFETY: the frame was validated; decompression never writes past `destsize`.
    let n = unsafe {
        blosc_src::blosc_decompress_ctx(
            frame.as_ptr() as *const c_void,
            out.as_mut_ptr() as *mut c_void,
            nbytes,
            1,
        )
    };
    if n < 0 || n as usize != nbytes {
        return Err(BloscError::Corrupt { code: n });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_damage() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| ((i / 7) as u16).to_le_bytes())
            .collect();
        let frame = compress(&data, 2).unwrap();
        assert!(frame.len() < data.len() / 4, "shuffled ramps compress well");
        assert_eq!(decompress(&frame, data.len()).unwrap(), data);
        assert_eq!(
            decompress(&frame, 10).unwrap_err(),
            BloscError::Size {
                got: data.len(),
                expected: 10
            }
        );
        assert!(decompress(&frame[..frame.len() / 2], data.len()).is_err());
        assert!(decompress(b"not blosc at all", 16).is_err());
    }
}
