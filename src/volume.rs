//! A dense block of voxels in memory: the unit that stores, kernels and codecs exchange.

use crate::dtype::DataType;
use crate::geometry::{copy_box, voxels, At, Vec3};

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
        let elem = self.dtype.size();
        assert_eq!(
            data.len(),
            voxels(extent) * elem,
            "voxels for a {extent:?} box"
        );
        let shape = self.shape;
        let from = At {
            shape: extent,
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
