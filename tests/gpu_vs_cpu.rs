//! Every GPU kernel against its CPU reference, on random and edge-case volumes.

mod common;

use common::{gpu, random_volume, Rng};
use cuboids::dtype::DataType;
use cuboids::geometry::Vec3;
use cuboids::gpu::downsample::downsample_channel_gpu;
use cuboids::ops::downsample::{downsample_cpu, Factor, Method};

fn check(dtype: DataType, method: Method, factor: Factor, shape: Vec3, mips: u32, seed: u64) {
    let vol = random_volume(&mut Rng::new(seed), dtype, shape, 1);
    let cpu = downsample_cpu(&vol, method, factor, mips).unwrap();
    let gpu_levels =
        downsample_channel_gpu(gpu(), &vol.data, dtype, shape, method, factor, mips).unwrap();
    assert_eq!(gpu_levels.len(), mips as usize);
    for (k, (g, c)) in gpu_levels.iter().zip(&cpu).enumerate() {
        if g != &c.data {
            let first = g.iter().zip(&c.data).position(|(a, b)| a != b);
            panic!(
                "{dtype} {method:?} {factor:?} shape {shape:?}: mip {} differs from the CPU reference (first byte {first:?})",
                k + 1
            );
        }
    }
}

const SHAPES: [Vec3; 6] = [
    [64, 64, 8],
    [33, 17, 5],
    [7, 9, 3],
    [1, 1, 1],
    [130, 3, 9],
    [16, 16, 16],
];

#[test]
fn averaging_matches_cpu_for_all_image_types() {
    let mut seed = 1;
    for dtype in [
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Float32,
    ] {
        for factor in [Factor::ANISOTROPIC, Factor::ISOTROPIC] {
            for shape in SHAPES {
                for mips in 1..=5 {
                    seed += 1;
                    check(dtype, Method::Average, factor, shape, mips, seed);
                }
            }
        }
    }
}

#[test]
fn mode_pooling_matches_cpu_for_labels() {
    let mut seed = 1000;
    for dtype in [DataType::Uint32, DataType::Uint64] {
        for factor in [Factor::ANISOTROPIC, Factor::ISOTROPIC] {
            for shape in SHAPES {
                for mips in 1..=5 {
                    seed += 1;
                    check(dtype, Method::Mode, factor, shape, mips, seed);
                }
            }
        }
    }
}

#[test]
fn long_pyramids_renormalise_like_tinybrain() {
    // 9 mips cross the uint8/uint16 renormalisation points of both factors.
    check(
        DataType::Uint8,
        Method::Average,
        Factor::ANISOTROPIC,
        [600, 520, 2],
        9,
        7,
    );
    check(
        DataType::Uint16,
        Method::Average,
        Factor::ISOTROPIC,
        [70, 66, 68],
        6,
        8,
    );
    check(
        DataType::Uint8,
        Method::Average,
        Factor::ISOTROPIC,
        [300, 260, 260],
        9,
        9,
    );
}
