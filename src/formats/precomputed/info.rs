//! The precomputed `info` JSON: parsed strictly enough to give clear errors, with unknown keys
//! kept so that rewriting an info never drops what other tools put there (mesh, skeletons...).

use crate::dtype::DataType;
use crate::geometry::Vec3;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Info {
    #[serde(rename = "type")]
    pub layer_type: LayerType,
    pub data_type: DataType,
    pub num_channels: usize,
    pub scales: Vec<Scale>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerType {
    Image,
    Segmentation,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Raw,
    CompressedSegmentation,
    Jpeg,
    Png,
    Jxl,
    CompressoJxl,
    Compresso,
    Fpzip,
    Kempressed,
    Zfpc,
    Crackle,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scale {
    pub key: String,
    pub size: Vec3,
    pub resolution: [Number; 3],
    #[serde(default)]
    pub voxel_offset: [i64; 3],
    pub chunk_sizes: Vec<Vec3>,
    pub encoding: Encoding,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed_segmentation_block_size: Option<Vec3>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharding: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A resolution component: written back as an integer when it is one, as CloudVolume does.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct Number(pub f64);

impl Serialize for Number {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.fract() == 0.0 && self.0.abs() < 9.0e15 {
            s.serialize_i64(self.0 as i64)
        } else {
            s.serialize_f64(self.0)
        }
    }
}

impl Scale {
    /// The chunk size in use: the first of `chunk_sizes`.
    pub fn chunk_size(&self) -> Vec3 {
        self.chunk_sizes[0]
    }

    /// Whether the scale is sharded (a `sharding` object that is not `null`).
    pub fn is_sharded(&self) -> bool {
        self.sharding.as_ref().is_some_and(|v| !v.is_null())
    }

    /// The scale's sharding, checked, or `None` when unsharded; an error names the field of the
    /// `sharding` object that is wrong and why.
    pub fn sharding_spec(&self) -> Result<Option<super::sharding::ShardingSpec>, (String, String)> {
        match &self.sharding {
            Some(v) if !v.is_null() => super::sharding::ShardingSpec::parse(v).map(Some),
            _ => Ok(None),
        }
    }

    pub fn block_size(&self) -> Vec3 {
        self.compressed_segmentation_block_size.unwrap_or([8, 8, 8])
    }

    /// The scale `factor^k` below this one, as igneous adds it: size rounded up, offset down,
    /// resolution multiplied; same chunk size and encoding.
    pub fn downsampled(&self, factor: Vec3, k: u32) -> Scale {
        let f = crate::geometry::pow3(factor, k);
        let resolution = [0, 1, 2].map(|i| Number(self.resolution[i].0 * f[i] as f64));
        Scale {
            key: scale_key(&resolution),
            size: [0, 1, 2].map(|i| self.size[i].div_ceil(f[i])),
            resolution,
            voxel_offset: [0, 1, 2].map(|i| self.voxel_offset[i].div_euclid(f[i] as i64)),
            chunk_sizes: vec![self.chunk_size()],
            encoding: self.encoding,
            compressed_segmentation_block_size: self.compressed_segmentation_block_size,
            sharding: None,
            extra: Map::new(),
        }
    }
}

/// igneous names a scale by its resolution: `16_16_40`.
pub fn scale_key(resolution: &[Number; 3]) -> String {
    resolution
        .iter()
        .map(|n| serde_json::to_string(n).expect("numbers serialize"))
        .collect::<Vec<_>>()
        .join("_")
}

impl Info {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("info serializes")
    }
}
