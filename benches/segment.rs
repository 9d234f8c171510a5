//! Criterion benchmarks of segmentation on a synthetic EM-like affinity map / probability map:
//! GPU kernels against their CPU references, and the whole `segment` / `connected-components`
//! pipelines on local disk. Throughput in voxels (elements/s).
//!
//!     cargo bench --bench segment                    # 256x256x64 (CUBOIDS_BENCH_SIZE=x,y,z)
//!
//! `cuboids bench-segment --python PY` prints the same pipelines on 512x512x128 next to waterz
//! and cc3d on the same machine.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cuboids::formats::precomputed::WriteOptions;
use cuboids::geometry::{voxels, Box3, Vec3};
use cuboids::gpu::labeling::{connected_components_box, watershed_box, BlockMasks};
use cuboids::gpu::GpuContext;
use cuboids::ops::connected_components::{connected_components_cpu, Connectivity};
use cuboids::ops::watershed::{watershed_cpu, WatershedParams};
use cuboids::runtime::segmentation::write_float_volume;
use cuboids::runtime::synthetic::{affinities_like, probability_like};
use cuboids::store::LocalStore;
use cuboids::task::segment::{
    connected_components, segment, ChunkOptions, ComponentsOptions, SegmentOptions,
};
use std::sync::Arc;

fn size() -> Vec3 {
    std::env::var("CUBOIDS_BENCH_SIZE")
        .ok()
        .map(|s| {
            let v: Vec<usize> = s.split(',').map(|p| p.trim().parse().unwrap()).collect();
            [v[0], v[1], v[2]]
        })
        .unwrap_or([256, 256, 64])
}

fn segmentation(c: &mut Criterion) {
    let ctx = Arc::new(GpuContext::new().expect("a Vulkan adapter (lavapipe or a GPU)"));
    let shape = size();
    let aff = affinities_like(shape);
    let prob = probability_like(shape);
    let params = WatershedParams::default();
    let mut group = c.benchmark_group("segmentation");
    group.sample_size(10);
    group.throughput(Throughput::Elements(voxels(shape) as u64));
    let whole = Box3::from_shape(shape);
    group.bench_function("watershed_gpu", |b| {
        b.iter(|| watershed_box(&ctx, aff.view(), whole, params, false).unwrap())
    });
    group.bench_function("watershed_cpu", |b| b.iter(|| watershed_cpu(&aff, params)));
    group.bench_function("cc26_gpu", |b| {
        b.iter(|| {
            let masks = BlockMasks::threshold(&prob, shape, 0.5);
            connected_components_box(&ctx, masks, Connectivity::TwentySix).unwrap()
        })
    });
    group.bench_function("cc26_cpu", |b| {
        b.iter(|| connected_components_cpu(&prob, shape, 0.5, Connectivity::TwentySix))
    });

    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let write = WriteOptions { gzip_level: 0 };
    let channels: Vec<&[f32]> = aff.channels.iter().map(|c| c.as_slice()).collect();
    let aff_vol = rt
        .block_on(write_float_volume(
            &tmp.path().join("aff"),
            &channels,
            shape,
            write,
        ))
        .unwrap();
    let prob_vol = rt
        .block_on(write_float_volume(
            &tmp.path().join("prob"),
            &[&prob],
            shape,
            write,
        ))
        .unwrap();
    let chunks = ChunkOptions {
        write,
        ..Default::default()
    };
    group.bench_function("segment_end_to_end", |b| {
        b.iter(|| {
            let out = Arc::new(LocalStore::new(tmp.path().join("seg")));
            let opts = SegmentOptions {
                chunks: chunks.clone(),
                watershed: params,
                threshold: 0.7,
            };
            rt.block_on(segment(ctx.clone(), &aff_vol, out, &opts))
                .unwrap()
        })
    });
    group.bench_function("connected_components_end_to_end", |b| {
        b.iter(|| {
            let out = Arc::new(LocalStore::new(tmp.path().join("cc")));
            let opts = ComponentsOptions {
                chunks: chunks.clone(),
                threshold: 0.5,
                connectivity: Connectivity::TwentySix,
                dust: 0,
            };
            rt.block_on(connected_components(ctx.clone(), &prob_vol, out, &opts))
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, segmentation);
criterion_main!(benches);
