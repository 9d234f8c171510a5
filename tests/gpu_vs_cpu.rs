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

/// A block assembled on the GPU from resident and host parts (one part missing: zeros), and a
/// level left on the GPU then used as a part: equal to the CPU reference on the host block.
#[test]
fn resident_blocks_match_cpu() {
    use cuboids::gpu::downsample::{block_fits, downsample_block_resident, BlockPart};
    use cuboids::volume::Volume;
    let part = [16, 8, 4];
    for (dtype, method) in [
        (DataType::Uint8, Method::Average),
        (DataType::Uint16, Method::Average),
        (DataType::Float32, Method::Average),
        (DataType::Uint64, Method::Mode),
    ] {
        let mut rng = Rng::new(dtype.size() as u64 + 40);
        let factor = Factor::ANISOTROPIC;
        let block = [32, 16, 4];
        assert!(block_fits(gpu(), dtype, block));
        // Level 1 of a first block, kept on the GPU: it is a [16, 8, 4] part of the next block.
        let first_block = random_volume(&mut rng, dtype, block, 1);
        let whole = [([0, 0, 0], BlockPart::Host(&first_block.data, block))];
        let (first_level, resident) =
            downsample_block_resident(gpu(), dtype, block, &whole, method, factor).unwrap();
        let cpu_first = downsample_cpu(&first_block, method, factor, 1).unwrap();
        assert_eq!(first_level, cpu_first[0].data, "{dtype}: first level");
        assert_eq!(resident.shape, part);
        assert_eq!(resident.to_host(gpu()).unwrap(), cpu_first[0].data);

        let host_part = random_volume(&mut rng, dtype, part, 1);
        let other_part = random_volume(&mut rng, dtype, part, 1);
        let parts = [
            ([0, 0, 0], BlockPart::Gpu(&resident)),
            ([16, 0, 0], BlockPart::Host(&host_part.data, part)),
            ([16, 8, 0], BlockPart::Host(&other_part.data, part)),
        ];
        let (level, _) =
            downsample_block_resident(gpu(), dtype, block, &parts, method, factor).unwrap();
        let mut host_block = Volume::zeros(dtype, block, 1);
        let resident_host = Volume::from_bytes(dtype, part, 1, cpu_first[0].data.clone()).unwrap();
        host_block.paste([0, 0, 0], &resident_host, [0; 3], part);
        host_block.paste([16, 0, 0], &host_part, [0; 3], part);
        host_block.paste([16, 8, 0], &other_part, [0; 3], part);
        let cpu = downsample_cpu(&host_block, method, factor, 1).unwrap();
        assert_eq!(level, cpu[0].data, "{dtype}: assembled block");
    }
}
