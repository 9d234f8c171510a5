//! Helpers shared by the integration tests.
#![allow(dead_code)]

use cuboids::dtype::DataType;
use cuboids::geometry::{voxels, Vec3};
use cuboids::gpu::GpuContext;
use cuboids::volume::Volume;
use std::sync::OnceLock;

/// One GPU context per test binary, like the program itself. Tests need a Vulkan driver
/// (lavapipe in CI) and fail, naming how to install one, when there is none.
pub fn gpu() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| GpuContext::new().unwrap_or_else(|e| panic!("{e}")))
}

/// Deterministic xorshift64* generator: reproducible volumes without a rand dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random voxels of any type. Labels come from a small set so that modes and ties happen;
/// floats have fractional parts so the summation order matters.
pub fn random_volume(rng: &mut Rng, dtype: DataType, shape: Vec3, channels: usize) -> Volume {
    let n = voxels(shape) * channels;
    let mut data = Vec::with_capacity(n * dtype.size());
    for _ in 0..n {
        match dtype {
            DataType::Uint8 | DataType::Int8 => data.push(rng.next() as u8),
            DataType::Uint16 | DataType::Int16 => data.extend((rng.next() as u16).to_le_bytes()),
            DataType::Uint32 => {
                // Mix small labels (ties for mode pooling) with full-range values (carries).
                let v = if rng.below(2) == 0 {
                    rng.below(4) as u32
                } else {
                    rng.next() as u32
                };
                data.extend(v.to_le_bytes())
            }
            DataType::Int32 => data.extend((rng.next() as i32).to_le_bytes()),
            DataType::Uint64 => {
                let v = if rng.below(2) == 0 {
                    rng.below(4)
                } else {
                    rng.next()
                };
                data.extend(v.to_le_bytes())
            }
            DataType::Float32 => {
                let v = (rng.next() >> 40) as f32 / 1024.0 - 4096.0;
                data.extend(v.to_le_bytes())
            }
        }
    }
    Volume::from_bytes(dtype, shape, channels, data).unwrap()
}

/// Every file below `dir` (none if it does not exist), sorted.
pub fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out.sort();
    out
}
