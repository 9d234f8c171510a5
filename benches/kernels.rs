//! Criterion benchmarks: GPU kernels against their CPU references, and an end-to-end downsample
//! of a precomputed volume on local disk. Throughput is reported in source voxels (elements/s).
//!
//!     cargo bench --bench kernels
//!
//! On lavapipe the "GPU" runs on the CPU cores, so compare GPU and CPU rows of one machine only.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cuboids::dtype::DataType;
use cuboids::formats::precomputed::info::LayerType;
use cuboids::formats::precomputed::WriteOptions;
use cuboids::geometry::{voxels, Vec3};
use cuboids::gpu::downsample::downsample_channel_gpu;
use cuboids::gpu::GpuContext;
use cuboids::ops::downsample::{downsample_cpu, Factor, Method};
use cuboids::runtime::local::{new_info, write_new_volume};
use cuboids::runtime::synthetic::em_like;
use cuboids::task::downsample::{downsample, Compute, DownsampleOptions};
use std::sync::Arc;

const SHAPE: Vec3 = [512, 512, 32];

fn kernels(c: &mut Criterion) {
    let ctx = GpuContext::new().expect("a Vulkan adapter (lavapipe or a GPU)");
    let (image, labels) = em_like(SHAPE);
    let mut group = c.benchmark_group("kernels");
    group.sample_size(10);
    group.throughput(Throughput::Elements(voxels(SHAPE) as u64));
    for (name, vol, method) in [
        ("uint8_average", &image, Method::Average),
        ("uint64_mode", &labels, Method::Mode),
    ] {
        for factor in [Factor::ANISOTROPIC, Factor::ISOTROPIC] {
            let id = format!(
                "{name}_{}_x4",
                if factor == Factor::ANISOTROPIC {
                    "221"
                } else {
                    "222"
                }
            );
            group.bench_function(format!("gpu/{id}"), |b| {
                b.iter(|| {
                    downsample_channel_gpu(&ctx, &vol.data, vol.dtype, SHAPE, method, factor, 4)
                        .unwrap()
                })
            });
            group.bench_function(format!("cpu/{id}"), |b| {
                b.iter(|| downsample_cpu(vol, method, factor, 4).unwrap())
            });
        }
    }
    group.finish();
}

/// compressed_segmentation encoding of the EM-like labels in 64^3 chunks (8^3 blocks): the CPU
/// encoder, one chunk after another on one core, against the GPU encoder doing every chunk.
fn compressed_segmentation(c: &mut Criterion) {
    use cuboids::formats::precomputed::compressed_segmentation::encode;
    use cuboids::geometry::Box3;
    use cuboids::gpu::compressed_segmentation::encode_chunks_gpu;
    let ctx = GpuContext::new().expect("a Vulkan adapter (lavapipe or a GPU)");
    let shape = [256, 256, 64];
    let (_, labels) = em_like(shape);
    let chunk = [64, 64, 64];
    let chunks: Vec<Box3> = (0..16)
        .map(|k| {
            let start = [64 * (k % 4), 64 * (k / 4), 0];
            Box3::new(start, [0, 1, 2].map(|i| start[i] + chunk[i]))
        })
        .collect();
    let mut group = c.benchmark_group("compressed_segmentation");
    group.sample_size(10);
    group.throughput(Throughput::Elements(voxels(shape) as u64));
    group.bench_function("gpu/uint64_8x8x8", |b| {
        b.iter(|| encode_chunks_gpu(&ctx, &labels, &chunks, [8, 8, 8]).unwrap())
    });
    group.bench_function("cpu/uint64_8x8x8", |b| {
        b.iter(|| {
            chunks
                .iter()
                .map(|c| {
                    let crop = labels.crop(c.start, c.shape());
                    encode(&crop.data, crop.shape, 1, 2, [8, 8, 8]).unwrap()
                })
                .collect::<Vec<_>>()
        })
    });
    group.finish();
}

fn end_to_end(c: &mut Criterion) {
    let ctx = Arc::new(GpuContext::new().expect("a Vulkan adapter"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (image, _) = em_like(SHAPE);
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("image");
    let info = new_info(
        LayerType::Image,
        DataType::Uint8,
        SHAPE,
        [64, 64, 32],
        [8.0, 8.0, 40.0],
    );
    let vol = runtime
        .block_on(write_new_volume(
            &dir,
            info,
            &image,
            WriteOptions::default(),
        ))
        .unwrap();
    let opts = DownsampleOptions {
        num_mips: 4,
        ..Default::default()
    };
    let mut group = c.benchmark_group("end_to_end");
    group.sample_size(10);
    group.throughput(Throughput::Elements(voxels(SHAPE) as u64));
    group.bench_function("downsample_uint8_gzip6_221_x4", |b| {
        b.iter(|| {
            runtime
                .block_on(downsample(Compute::Gpu(ctx.clone()), &vol, &opts))
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, kernels, compressed_segmentation, end_to_end);
criterion_main!(benches);
