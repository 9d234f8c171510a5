//! The Boss (jhuapl-boss) cuboid store: 512x512x16 cuboids, one S3 object each, keyed by
//! `md5(base) & base & version` with `base = col&exp&chan&res&t&morton` (`ISO&` prefixed for the
//! isotropic levels of anisotropic channels), stored as Blosc-1 frames of a C-order
//! `[t=1, z=16, y=512, x=512]` array, which is the same byte order as cuboids' x-fastest volumes.

use crate::dtype::DataType;
use crate::formats::blosc::{self, BloscError};
use crate::geometry::Vec3;
use crate::volume::Volume;
use md5::{Digest, Md5};

/// Voxels per cuboid at every resolution.
pub const CUBOID: Vec3 = [512, 512, 16];

/// Morton (Z-order) id of a cuboid index: bit i of x → bit 3i, of y → 3i+1, of z → 3i+2.
pub fn morton(index: Vec3) -> u64 {
    let mut id = 0u64;
    for bit in 0..21 {
        for (axis, &v) in index.iter().enumerate() {
            id |= (((v as u64) >> bit) & 1) << (3 * bit + axis);
        }
    }
    id
}

/// The inverse of [`morton`].
pub fn unmorton(id: u64) -> Vec3 {
    let mut index = [0usize; 3];
    for bit in 0..21 {
        for (axis, v) in index.iter_mut().enumerate() {
            *v |= (((id >> (3 * bit + axis)) & 1) as usize) << bit;
        }
    }
    index
}

/// Which cuboid of which channel and resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CuboidId {
    pub collection: u64,
    pub experiment: u64,
    pub channel: u64,
    pub resolution: u32,
    pub time: u64,
    /// Cuboid index = voxel // (512, 512, 16).
    pub index: Vec3,
    /// Isotropic level of an anisotropic channel: the `ISO&` key space.
    pub iso: bool,
}

impl CuboidId {
    /// `{col}&{exp}&{chan}&{res}&{t}&{morton}`, with `ISO&` in front for isotropic levels.
    pub fn base(&self) -> String {
        let base = format!(
            "{}&{}&{}&{}&{}&{}",
            self.collection,
            self.experiment,
            self.channel,
            self.resolution,
            self.time,
            morton(self.index)
        );
        if self.iso {
            format!("ISO&{base}")
        } else {
            base
        }
    }

    /// The S3 index's `object-key`: `md5(base)&base`.
    pub fn object_key(&self) -> String {
        let base = self.base();
        format!("{:x}&{base}", Md5::digest(base.as_bytes()))
    }

    /// The S3 object key: the object key and the version (always 0).
    pub fn s3_key(&self) -> String {
        format!("{}&0", self.object_key())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CuboidError {
    #[error("Boss cuboids are uint8, uint16 or uint64, not {0}")]
    DataType(DataType),
    #[error("a Boss cuboid is {CUBOID:?} voxels, not {0:?}")]
    Shape(Vec3),
    #[error(transparent)]
    Blosc(#[from] BloscError),
}

fn check_dtype(dtype: DataType) -> Result<(), CuboidError> {
    match dtype {
        DataType::Uint8 | DataType::Uint16 | DataType::Uint64 => Ok(()),
        other => Err(CuboidError::DataType(other)),
    }
}

/// Object bytes of one cuboid, as the Boss writes them.
pub fn encode_cuboid(vol: &Volume) -> Result<Vec<u8>, CuboidError> {
    check_dtype(vol.dtype)?;
    if vol.shape != CUBOID || vol.channels != 1 {
        return Err(CuboidError::Shape(vol.shape));
    }
    Ok(blosc::compress(&vol.data, vol.dtype.size())?)
}

/// A cuboid from its object bytes; a frame of the wrong size is an error, not a guess.
pub fn decode_cuboid(frame: &[u8], dtype: DataType) -> Result<Volume, CuboidError> {
    check_dtype(dtype)?;
    let bytes = CUBOID[0] * CUBOID[1] * CUBOID[2] * dtype.size();
    let data = blosc::decompress(frame, bytes)?;
    Ok(Volume::from_bytes(dtype, CUBOID, 1, data).expect("size checked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn morton_interleaves_x_y_z() {
        assert_eq!(morton([1, 0, 0]), 1);
        assert_eq!(morton([0, 1, 0]), 2);
        assert_eq!(morton([0, 0, 1]), 4);
        assert_eq!(morton([3, 0, 0]), 0b1001);
        // x=101, y=011, z=001: bit 0 of each → 0b111, bit 1 (y) → 0b010_000, bit 2 (x) → 0b1_000_000.
        assert_eq!(morton([5, 3, 1]), 0b1_010_111);
        for index in [[0, 0, 0], [7, 1, 300], [1023, 512, 9999]] {
            assert_eq!(unmorton(morton(index)), index);
        }
    }

    #[test]
    fn keys_follow_the_boss_scheme() {
        let id = CuboidId {
            collection: 51,
            experiment: 134,
            channel: 1024,
            resolution: 0,
            time: 0,
            index: [1, 0, 0],
            iso: false,
        };
        assert_eq!(id.base(), "51&134&1024&0&0&1");
        let key = id.s3_key();
        let hash = format!("{:x}", Md5::digest(b"51&134&1024&0&0&1"));
        assert_eq!(key, format!("{hash}&51&134&1024&0&0&1&0"));
        let iso = CuboidId {
            iso: true,
            resolution: 4,
            ..id
        };
        assert!(iso.s3_key().ends_with("&ISO&51&134&1024&4&0&1&0"));
    }
}
