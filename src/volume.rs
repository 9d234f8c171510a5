//! A dense block of voxels in memory: the unit that stores, kernels and codecs exchange.

use crate::dtype::DataType;
use crate::geometry::{copy_box, voxels, At, Vec3};

/// Byte buffers of volumes that are done with, kept for the next ones. A run that reads and
/// pools tile after tile of one shape would otherwise ask the kernel for fresh pages each time:
/// a large buffer is its own mmap, and each of its 4 KiB pages faults and is zeroed on first
/// touch (a 134 MB uint64 tile is 33,000 faults; they were half of a downsample's page faults).
/// Zeroing a kept buffer costs a memset instead.
pub struct BufferPool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl BufferPool {
    /// A pool that keeps at most `keep` buffers.
    pub fn new(keep: usize) -> BufferPool {
        BufferPool {
            free: std::sync::Mutex::new(Vec::new()),
            keep,
        }
    }

    /// `len` zero bytes, in the smallest kept buffer that holds them and is at most twice as
    /// large (else a new one): a small level does not take the buffer the next tile needs.
    pub fn zeroed(&self, len: usize) -> Vec<u8> {
        let kept = {
            let mut free = self.free.lock().unwrap();
            free.iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len && b.capacity() / 2 <= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
                .map(|i| free.swap_remove(i))
        };
        match kept {
            Some(mut b) => {
                b.clear();
                b.resize(len, 0);
                b
            }
            None => vec![0; len],
        }
    }

    /// Keeps a buffer for a later [`Self::zeroed`], unless the pool is full (then the smallest
    /// kept one goes, so that large buffers stay).
    pub fn give(&self, buffer: Vec<u8>) {
        if buffer.capacity() == 0 {
            return;
        }
        let mut free = self.free.lock().unwrap();
        free.push(buffer);
        if free.len() > self.keep {
            let smallest = (0..free.len())
                .min_by_key(|&i| free[i].capacity())
                .expect("not empty");
            free.swap_remove(smallest);
        }
    }
}

/// Voxels of one dtype in Fortran order `[x, y, z, channel]` (x fastest), little-endian bytes,
/// exactly as a `raw` precomputed chunk stores them.
#[derive(Clone, Debug, PartialEq)]
pub struct Volume {
    pub dtype: DataType,
    pub shape: Vec3,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Volume {
    pub fn zeros(dtype: DataType, shape: Vec3, channels: usize) -> Volume {
        Volume {
            dtype,
            shape,
            channels,
            data: vec![0; voxels(shape) * channels * dtype.size()],
        }
    }

    /// As [`Self::zeros`], in a buffer from `pool`.
    pub fn zeros_in(pool: &BufferPool, dtype: DataType, shape: Vec3, channels: usize) -> Volume {
        Volume {
            dtype,
            shape,
            channels,
            data: pool.zeroed(voxels(shape) * channels * dtype.size()),
        }
    }

    /// Wraps bytes, or returns `None` when their length does not match the shape.
    pub fn from_bytes(
        dtype: DataType,
        shape: Vec3,
        channels: usize,
        data: Vec<u8>,
    ) -> Option<Volume> {
        (data.len() == voxels(shape) * channels * dtype.size()).then_some(Volume {
            dtype,
            shape,
            channels,
            data,
        })
    }

    pub fn voxels(&self) -> usize {
        voxels(self.shape)
    }

    pub fn channel_bytes(&self) -> usize {
        self.voxels() * self.dtype.size()
    }

    pub fn channel(&self, c: usize) -> &[u8] {
        let n = self.channel_bytes();
        &self.data[c * n..(c + 1) * n]
    }

    pub fn channel_mut(&mut self, c: usize) -> &mut [u8] {
        let n = self.channel_bytes();
        &mut self.data[c * n..(c + 1) * n]
    }

    /// Copies `extent` voxels of every channel from `src` at `src_origin` into `self` at `dst_origin`.
    pub fn paste(&mut self, dst_origin: Vec3, src: &Volume, src_origin: Vec3, extent: Vec3) {
        debug_assert_eq!(self.dtype, src.dtype);
        debug_assert_eq!(self.channels, src.channels);
        let elem = self.dtype.size();
        let dst_shape = self.shape;
        for c in 0..self.channels {
            let from = At {
                shape: src.shape,
                origin: src_origin,
            };
            let to = At {
                shape: dst_shape,
                origin: dst_origin,
            };
            copy_box(src.channel(c), from, self.channel_mut(c), to, extent, elem);
        }
    }

    /// The voxels of channel `c` in the box `[origin, origin + extent)`, x fastest.
    pub fn crop_channel(&self, c: usize, origin: Vec3, extent: Vec3) -> Vec<u8> {
        let elem = self.dtype.size();
        let mut out = vec![0u8; voxels(extent) * elem];
        let from = At {
            shape: self.shape,
            origin,
        };
        let to = At {
            shape: extent,
            origin: [0; 3],
        };
        copy_box(self.channel(c), from, &mut out, to, extent, elem);
        out
    }

    /// Copies one channel's worth of voxels (`extent`, x fastest) into channel `c` at `origin`.
    pub fn paste_channel(&mut self, c: usize, origin: Vec3, data: &[u8], extent: Vec3) {
        assert_eq!(
            data.len(),
            voxels(extent) * self.dtype.size(),
            "voxels for a {extent:?} box"
        );
        self.paste_channel_pitched(c, origin, data, extent, extent[0]);
    }

    /// As [`Self::paste_channel`], from rows of `pitch` voxels (at least `extent[0]`; the rest
    /// of each row is padding) that may be followed by more bytes: a GPU read-back buffer.
    pub fn paste_channel_pitched(
        &mut self,
        c: usize,
        origin: Vec3,
        data: &[u8],
        extent: Vec3,
        pitch: usize,
    ) {
        let elem = self.dtype.size();
        assert!(pitch >= extent[0], "rows of {pitch} voxels hold {extent:?}");
        assert!(
            data.len() >= pitch * extent[1] * extent[2] * elem,
            "voxels for a {extent:?} box in rows of {pitch}"
        );
        let shape = self.shape;
        let from = At {
            shape: [pitch, extent[1], extent[2]],
            origin: [0; 3],
        };
        copy_box(
            data,
            from,
            self.channel_mut(c),
            At { shape, origin },
            extent,
            elem,
        );
    }

    /// A new volume holding the box `[origin, origin + extent)` of this one.
    pub fn crop(&self, origin: Vec3, extent: Vec3) -> Volume {
        let mut out = Volume::zeros(self.dtype, extent, self.channels);
        out.paste([0; 3], self, origin, extent);
        out
    }

    /// True when every byte is zero: such outputs of all-missing inputs need not be written.
    pub fn is_all_zero(&self) -> bool {
        self.data.iter().all(|&b| b == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_buffer_comes_back_zeroed_and_the_best_fit_is_taken() {
        let pool = BufferPool::new(2);
        let mut dirty = pool.zeroed(1000);
        dirty.fill(7);
        let dirty_at = dirty.as_ptr();
        pool.give(dirty);
        pool.give(vec![9u8; 5000]);
        // The smallest buffer that holds 800 bytes: the first one, zeroed, its memory reused.
        let again = pool.zeroed(800);
        assert_eq!(again.len(), 800);
        assert!(again.iter().all(|&b| b == 0));
        assert_eq!(again.as_ptr(), dirty_at);
        // Larger than any kept buffer: a new one; so is one less than half a kept buffer.
        assert_eq!(pool.zeroed(6000).len(), 6000);
        let small = pool.zeroed(2000);
        assert!(
            small.capacity() < 5000,
            "the large buffer stays for a large request"
        );
        // Full: the smallest kept buffer goes.
        pool.give(vec![1u8; 100]);
        pool.give(vec![1u8; 10_000]);
        let kept = pool.zeroed(4000);
        assert!(kept.capacity() >= 5000 && kept.iter().all(|&b| b == 0));
        let volume = Volume::zeros_in(&pool, DataType::Uint64, [4, 4, 2], 1);
        assert_eq!(volume.data, vec![0u8; 256]);
    }
}
