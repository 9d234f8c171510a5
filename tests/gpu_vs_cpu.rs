//! Every GPU kernel against its CPU reference, on random and edge-case volumes.

mod common;

use common::{gpu, random_volume, segmentation_like, Rng};
use cuboids::dtype::DataType;
use cuboids::geometry::{voxels, Box3, Vec3};
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

/// The chunks of a volume cut by `chunk`, edge chunks partial, x fastest.
fn chunk_boxes(shape: Vec3, chunk: Vec3) -> Vec<Box3> {
    let grid = cuboids::geometry::div_ceil3(shape, chunk);
    let mut boxes = Vec::new();
    for z in 0..grid[2] {
        for y in 0..grid[1] {
            for x in 0..grid[0] {
                let start = [x * chunk[0], y * chunk[1], z * chunk[2]];
                let stop = [0, 1, 2].map(|i| (start[i] + chunk[i]).min(shape[i]));
                boxes.push(Box3::new(start, stop));
            }
        }
    }
    boxes
}

/// compressed_segmentation encoded on the GPU equals the CPU encoder (which the package's goldens
/// pin) byte for byte: uint32 and uint64, several channels, blocks of several shapes, chunks
/// that are not multiples of the block, and bindings small enough to split the chunks into
/// groups.
#[test]
fn compressed_segmentation_on_the_gpu_matches_the_cpu_encoder() {
    use cuboids::formats::precomputed::compressed_segmentation::encode;
    use cuboids::gpu::compressed_segmentation::{encode_chunks_gpu, gpu_encodes};
    let mut small = cuboids::gpu::GpuContext::new().unwrap();
    small.limit_bindings(256 << 10);
    let cases: [(DataType, Vec3, Vec3, Vec3, usize); 6] = [
        (DataType::Uint64, [64, 48, 20], [32, 32, 16], [8, 8, 8], 1),
        (DataType::Uint32, [64, 48, 20], [32, 32, 16], [8, 8, 8], 1),
        (DataType::Uint64, [37, 29, 11], [20, 13, 11], [8, 8, 8], 2),
        (DataType::Uint32, [30, 30, 9], [30, 30, 9], [4, 4, 4], 1),
        (DataType::Uint64, [25, 19, 7], [12, 19, 5], [3, 5, 2], 1),
        (DataType::Uint64, [16, 16, 16], [16, 16, 16], [16, 32, 1], 1),
    ];
    let mut rng = Rng::new(12);
    let mut widths = std::collections::BTreeSet::new();
    for (dtype, shape, chunk, block, channels) in cases {
        assert!(gpu_encodes(dtype, block));
        let vol = segmentation_like(&mut rng, dtype, shape, channels);
        let chunks = chunk_boxes(shape, chunk);
        let words = dtype.size() / 4;
        let cpu: Vec<Vec<u8>> = chunks
            .iter()
            .map(|c| {
                let crop = vol.crop(c.start, c.shape());
                encode(&crop.data, crop.shape, channels, words, block).unwrap()
            })
            .collect();
        let distinct_bits: std::collections::BTreeSet<u32> = cpu
            .iter()
            .flat_map(|bytes| {
                let w: &[u32] = bytemuck::cast_slice(bytes);
                // The first channel's headers: the bit widths its blocks use.
                let blocks = voxels(cuboids::geometry::div_ceil3(chunk, block));
                (0..blocks.min((w.len() - channels) / 2))
                    .map(move |b| w[channels + 2 * b] >> 24)
                    .collect::<Vec<_>>()
            })
            .collect();
        for (name, ctx) in [("adapter limits", gpu()), ("256 KiB bindings", &small)] {
            let gpu_chunks = encode_chunks_gpu(ctx, &vol, &chunks, block).unwrap();
            for (k, (g, c)) in gpu_chunks.iter().zip(&cpu).enumerate() {
                let g = g.as_ref().unwrap();
                assert!(
                    g == c,
                    "{dtype} {shape:?} chunk {:?} blocks {block:?} ({name}): {} bytes against the CPU's {}, first difference at byte {:?}",
                    chunks[k],
                    g.len(),
                    c.len(),
                    g.iter().zip(c).position(|(a, b)| a != b)
                );
            }
        }
        assert!(
            distinct_bits.len() >= 2,
            "{shape:?}: bit widths {distinct_bits:?}"
        );
        widths.extend(distinct_bits);
    }
    // The volumes exercise one-label blocks and wide tables alike.
    assert!(widths.contains(&0) && widths.contains(&16), "{widths:?}");
}
