//! `downsample` end to end on local precomputed volumes: tiled and slabbed GPU runs must equal the
//! CPU reference applied to the whole volume at once.

mod common;

use common::{files_under, gpu, random_volume, Rng};
use cuboids::dtype::DataType;
use cuboids::formats::precomputed::info::{Encoding, LayerType};
use cuboids::formats::precomputed::{Precomputed, WriteOptions};
use cuboids::geometry::{voxels, Box3, Vec3};
use cuboids::gpu::GpuContext;
use cuboids::ops::downsample::{downsample_cpu, Factor, Method};
use cuboids::runtime::local::{new_info, write_new_volume};
use cuboids::store::LocalStore;
use cuboids::task::downsample::{downsample, Bounds, Compute, DownsampleOptions};
use cuboids::volume::Volume;
use std::path::Path;
use std::sync::Arc;

fn gpu_compute() -> Compute {
    // The tests share one device; Compute holds an Arc, so give it its own context handle.
    static CTX: std::sync::OnceLock<Arc<GpuContext>> = std::sync::OnceLock::new();
    let _ = gpu();
    Compute::Gpu(
        CTX.get_or_init(|| Arc::new(GpuContext::new().unwrap()))
            .clone(),
    )
}

async fn make(
    dir: &Path,
    layer: LayerType,
    vol: &Volume,
    chunk: Vec3,
    offset: [i64; 3],
    gzip: u32,
) -> Precomputed {
    let mut info = new_info(layer, vol.dtype, vol.shape, chunk, [4.0, 4.0, 40.0]);
    info.num_channels = vol.channels;
    info.scales[0].voxel_offset = offset;
    if layer == LayerType::Image {
        info.scales[0].encoding = Encoding::Raw;
    }
    write_new_volume(dir, info, vol, WriteOptions { gzip_level: gzip })
        .await
        .unwrap()
}

async fn read_all(dir: &Path, mip: usize) -> Volume {
    let vol = Precomputed::open(Arc::new(LocalStore::new(dir)))
        .await
        .unwrap();
    vol.read_region(mip, Box3::from_shape(vol.scale(mip).size), false)
        .await
        .unwrap()
        .0
}

/// Downsamples a random volume through many small tiles and GPU slabs and checks every mip.
async fn tiled_equals_whole(
    dtype: DataType,
    layer: LayerType,
    factor: Factor,
    shape: Vec3,
    channels: usize,
    mips: u32,
    seed: u64,
) {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("vol");
    let input = random_volume(&mut Rng::new(seed), dtype, shape, channels);
    let vol = make(&dir, layer, &input, [16, 16, 8], [5, -3, 11], 1).await;
    let opts = DownsampleOptions {
        num_mips: mips,
        factor,
        tile_bytes: 1,                     // smallest aligned tiles: many of them
        slab_bytes: Some(16 * 16 * 8 * 8), // several GPU slabs per tile
        ..Default::default()
    };
    let report = downsample(gpu_compute(), &vol, &opts).await.unwrap();
    assert!(report.tiles > 1, "the test must cross tile boundaries");
    let method = if layer == LayerType::Image {
        Method::Average
    } else {
        Method::Mode
    };
    let expected = downsample_cpu(&input, method, factor, mips).unwrap();
    for (k, e) in expected.iter().enumerate() {
        let got = read_all(&dir, k + 1).await;
        assert!(got == *e, "{dtype} {factor:?} {shape:?} x{channels}: mip {} differs from the whole-volume CPU result", k + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiled_gpu_runs_equal_the_whole_volume_reference() {
    tiled_equals_whole(
        DataType::Uint8,
        LayerType::Image,
        Factor::ANISOTROPIC,
        [75, 50, 19],
        1,
        2,
        1,
    )
    .await;
    tiled_equals_whole(
        DataType::Uint16,
        LayerType::Image,
        Factor::ISOTROPIC,
        [40, 37, 35],
        1,
        2,
        2,
    )
    .await;
    tiled_equals_whole(
        DataType::Float32,
        LayerType::Image,
        Factor::ANISOTROPIC,
        [70, 33, 9],
        2,
        2,
        3,
    )
    .await;
    tiled_equals_whole(
        DataType::Uint32,
        LayerType::Image,
        Factor::ANISOTROPIC,
        [33, 70, 9],
        1,
        1,
        4,
    )
    .await;
    tiled_equals_whole(
        DataType::Uint64,
        LayerType::Segmentation,
        Factor::ANISOTROPIC,
        [70, 45, 17],
        1,
        2,
        5,
    )
    .await;
    tiled_equals_whole(
        DataType::Uint32,
        LayerType::Segmentation,
        Factor::ISOTROPIC,
        [36, 36, 36],
        1,
        2,
        6,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerunning_rewrites_identical_bytes_and_keeps_the_info() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("vol");
    let input = random_volume(&mut Rng::new(9), DataType::Uint8, [64, 64, 16], 1);
    let vol = make(&dir, LayerType::Image, &input, [32, 32, 8], [0; 3], 6).await;
    let opts = DownsampleOptions {
        num_mips: 2,
        ..Default::default()
    };
    downsample(gpu_compute(), &vol, &opts).await.unwrap();
    let snapshot = common::tree_contents;
    let first = snapshot(&dir);
    let vol = Precomputed::open(Arc::new(LocalStore::new(&dir)))
        .await
        .unwrap();
    let report = downsample(gpu_compute(), &vol, &opts).await.unwrap();
    assert!(report.new_scales.is_empty(), "the scales exist now");
    assert_eq!(first, snapshot(&dir));
    // The CPU reference writes exactly the same chunks.
    downsample(Compute::Cpu, &vol, &opts).await.unwrap();
    assert_eq!(first, snapshot(&dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_write_only_the_covering_chunks() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("vol");
    let input = random_volume(&mut Rng::new(10), DataType::Uint8, [128, 64, 8], 1);
    let vol = make(&dir, LayerType::Image, &input, [32, 32, 8], [100, 0, 0], 0).await;
    let opts = DownsampleOptions {
        num_mips: 1,
        bounds: Some(Bounds {
            start: [100, 0, 0],
            stop: [110, 10, 8],
        }),
        ..Default::default()
    };
    let report = downsample(gpu_compute(), &vol, &opts).await.unwrap();
    // One tile of 64x64 (aligned to 32-voxel mip-1 chunks) -> one 32x32 output chunk.
    assert_eq!(report.chunks_written, 1);
    let files = files_under(&dir.join("8_8_40"));
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].ends_with("8_8_40/50-82_0-32_0-8.gz"), "{files:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_chunks_are_zeros_with_fill_missing_and_all_missing_outputs_are_skipped() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("vol");
    let input = random_volume(&mut Rng::new(11), DataType::Uint8, [128, 64, 8], 1);
    make(&dir, LayerType::Image, &input, [32, 32, 8], [0; 3], 0).await;
    // Remove the whole right half (x >= 64): one aligned tile has no input at all.
    for f in files_under(&dir.join("4_4_40")) {
        if f.rsplit('/').next().unwrap().starts_with("64-")
            || f.rsplit('/').next().unwrap().starts_with("96-")
        {
            std::fs::remove_file(f).unwrap();
        }
    }
    let vol = Precomputed::open(Arc::new(LocalStore::new(&dir)))
        .await
        .unwrap();
    let opts = DownsampleOptions {
        num_mips: 1,
        tile_bytes: 1,
        ..Default::default()
    };
    let err = downsample(gpu_compute(), &vol, &opts)
        .await
        .unwrap_err()
        .to_string();
    let names_a_missing_chunk = ["64-96", "96-128"]
        .iter()
        .any(|x| err.contains(&format!("chunk 4_4_40/{x}_")));
    assert!(
        names_a_missing_chunk && err.contains("--fill-missing"),
        "{err}"
    );
    assert!(
        !dir.join("8_8_40").exists(),
        "a failed run leaves no chunks of its new scale"
    );

    let opts = DownsampleOptions {
        fill_missing: true,
        ..opts
    };
    let report = downsample(gpu_compute(), &vol, &opts).await.unwrap();
    assert_eq!(report.tiles, 2);
    assert_eq!(report.tiles_skipped_empty, 1);
    assert_eq!(
        files_under(&dir.join("8_8_40")).len(),
        1,
        "only the left tile's chunk is written"
    );
    let mut zeros_right = input.clone();
    zeros_right.paste(
        [64, 0, 0],
        &Volume::zeros(DataType::Uint8, [64, 64, 8], 1),
        [0; 3],
        [64, 64, 8],
    );
    let expected = downsample_cpu(&zeros_right, Method::Average, Factor::ANISOTROPIC, 1).unwrap();
    let got = Precomputed::open(Arc::new(LocalStore::new(&dir)))
        .await
        .unwrap();
    let (left, _) = got
        .read_region(1, Box3::new([0; 3], [32, 32, 8]), false)
        .await
        .unwrap();
    assert_eq!(left, expected[0].crop([0; 3], [32, 32, 8]));
}

/// The same job on a volume in S3 (a real S3-compatible server), through the library and
/// through the CLI configured only by the standard AWS environment variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_in_s3_downsample_like_local_ones() {
    let server = common::S3Server::start();
    let store: Arc<dyn cuboids::store::Store> = Arc::new(server.store("vols", "em/image").await);
    let input = random_volume(&mut Rng::new(21), DataType::Uint8, [96, 80, 12], 1);
    let mut info = new_info(
        LayerType::Image,
        DataType::Uint8,
        input.shape,
        [32, 32, 4],
        [4.0, 4.0, 40.0],
    );
    info.scales[0].voxel_offset = [32, 0, 8];
    let vol = Precomputed::create(store.clone(), info).await.unwrap();
    vol.write_region(0, [0; 3], &input, WriteOptions::default())
        .await
        .unwrap();
    let expected = downsample_cpu(&input, Method::Average, Factor::ANISOTROPIC, 2).unwrap();

    let opts = DownsampleOptions {
        num_mips: 1,
        ..Default::default()
    };
    downsample(gpu_compute(), &vol, &opts).await.unwrap();
    let vol = Precomputed::open(store.clone()).await.unwrap();
    let (mip1, _) = vol
        .read_region(1, Box3::from_shape(vol.scale(1).size), false)
        .await
        .unwrap();
    assert!(
        mip1 == expected[0],
        "mip 1 from S3 differs from the CPU reference"
    );
    let object = store
        .get("8_8_40/16-48_0-32_8-12")
        .await
        .unwrap()
        .expect("chunk named by absolute coordinates");
    assert_eq!(
        object.encoding,
        cuboids::store::ContentEncoding::Gzip,
        "Content-Encoding: gzip, as CloudVolume"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .args([
            "downsample",
            "s3://vols/em/image",
            "--mip",
            "1",
            "--num-mips",
            "1",
        ])
        .envs(server.aws_env("AWS_ENDPOINT_URL_S3"))
        .output()
        .unwrap();
    common::assert_success(&out);
    let vol = Precomputed::open(store).await.unwrap();
    let (mip2, _) = vol
        .read_region(2, Box3::from_shape(vol.scale(2).size), false)
        .await
        .unwrap();
    // From the stored (floored) mip 1, one mip on: the CPU reference applied to mip 1.
    let from_mip1 = downsample_cpu(&expected[0], Method::Average, Factor::ANISOTROPIC, 1).unwrap();
    assert!(mip2 == from_mip1[0], "mip 2 written by the CLI differs");
}

/// The report's codec accounting: gzipped source chunks cost decode time and gzipped outputs
/// encode time (CPU time of the threads that did it), and the codec limit is their sum over the
/// cores, which the printed report states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_give_the_codecs_core_seconds_and_the_codec_limit() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("vol");
    let input = random_volume(&mut Rng::new(4), DataType::Uint8, [256, 256, 32], 1);
    let vol = make(&dir, LayerType::Image, &input, [64, 64, 16], [0; 3], 6).await;
    let opts = DownsampleOptions {
        num_mips: 2,
        write: WriteOptions { gzip_level: 6 },
        ..Default::default()
    };
    let report = downsample(gpu_compute(), &vol, &opts).await.unwrap();
    assert!(report.decode_cpu > std::time::Duration::ZERO, "{report:?}");
    assert!(report.encode_cpu > std::time::Duration::ZERO, "{report:?}");
    assert!(report.cores >= 1);
    assert_eq!(
        report.codec_limit(),
        (report.decode_cpu + report.encode_cpu) / report.cores as u32
    );
    // The whole process's CPU time holds the codecs' and more (the pooling, the copies).
    assert!(
        report.process_cpu > report.decode_cpu + report.encode_cpu,
        "{report:?}"
    );
    assert_eq!(
        report.other_cpu(),
        report.process_cpu - report.decode_cpu - report.encode_cpu
    );
    let text = report.describe("vol").join("\n");
    assert!(text.contains("codec limit"), "{text}");
    assert!(text.contains("core-s: "), "{text}");
}

/// With `gpu_encoding`, compressed_segmentation chunks are encoded on the GPU: chunk files and
/// shard files byte-identical to the CPU encoder's, for blocks the GPU takes (8x8x8, 4x4x2) and
/// one it leaves to the CPU (16x16x4, over its 512 voxels).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_encoded_on_the_gpu_are_the_cpu_encoders_bytes() {
    let mut encoding_gpu = GpuContext::new().unwrap();
    encoding_gpu.gpu_encoding = true;
    let encoding_gpu = Compute::Gpu(Arc::new(encoding_gpu));
    let mut rng = Rng::new(31);
    let cases = [
        (DataType::Uint64, [70, 45, 17], [8, 8, 8], false),
        (DataType::Uint32, [64, 64, 20], [4, 4, 2], true),
        (DataType::Uint64, [40, 40, 9], [16, 16, 4], false),
    ];
    for (dtype, shape, block, sharded) in cases {
        let input = common::segmentation_like(&mut rng, dtype, shape, 1);
        let snapshots =
            [("CPU", gpu_compute()), ("GPU", encoding_gpu.clone())].map(|(name, compute)| {
                let input = &input;
                async move {
                    let temp = tempfile::tempdir().unwrap();
                    let dir = temp.path().join("vol");
                    let mut info =
                        new_info(LayerType::Segmentation, dtype, shape, [16, 16, 8], [4.0; 3]);
                    info.scales[0].compressed_segmentation_block_size = Some(block);
                    let vol = write_new_volume(&dir, info, input, WriteOptions { gzip_level: 1 })
                        .await
                        .unwrap();
                    let opts = DownsampleOptions {
                        num_mips: 2,
                        sharded,
                        tile_bytes: 1,
                        ..Default::default()
                    };
                    let report = downsample(compute, &vol, &opts).await.unwrap();
                    assert!(report.tiles > 1, "{name}: one tile");
                    let gpu_takes = voxels(block) <= 512;
                    let expected = if name == "GPU" && gpu_takes {
                        report.chunks_written
                    } else {
                        0
                    };
                    assert_eq!(report.chunks_encoded_on_gpu, expected, "{name} {block:?}");
                    let mut files = common::tree_contents(&dir);
                    files.retain(|(name, _)| !name.ends_with("info"));
                    files
                }
            });
        let [cpu, gpu_encoded] = futures::future::join_all(snapshots)
            .await
            .try_into()
            .unwrap();
        assert!(cpu.len() > 10, "{shape:?}: {} files", cpu.len());
        let what = format!("{dtype} {shape:?} blocks {block:?}");
        common::assert_same_contents(&cpu, &gpu_encoded, &what);
    }
}

/// A pyramid planned in stages (each from the last mip the one before wrote, its tasks in
/// shuffled order) writes exactly what one run adding every mip from one read writes, for every
/// averaging dtype and mode pooling, on odd sizes, with stages that end only where that run
/// restarts (every 4 mips for uint8/uint16 (2,2,1), never a stage of one float32 mip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pyramid_planned_in_stages_equals_one_run() {
    use cuboids::task::pyramid::{plan, PyramidBudget};
    let shape = [250, 190, 9];
    let mips = 8;
    for (dtype, layer, seed, stages) in [
        (DataType::Uint8, LayerType::Image, 11, vec![4, 4]),
        (DataType::Uint16, LayerType::Image, 12, vec![4, 4]),
        (DataType::Float32, LayerType::Image, 13, vec![3, 5]),
        (DataType::Uint64, LayerType::Segmentation, 14, vec![3, 5]),
    ] {
        let temp = tempfile::tempdir().unwrap();
        let mut rng = Rng::new(seed);
        let input = match layer {
            LayerType::Image => random_volume(&mut rng, dtype, shape, 1),
            LayerType::Segmentation => common::segmentation_like(&mut rng, dtype, shape, 1),
        };
        let (one, staged) = (temp.path().join("one"), temp.path().join("staged"));
        let vol = make(&one, layer, &input, [8, 8, 8], [0, 0, 0], 1).await;
        make(&staged, layer, &input, [8, 8, 8], [0, 0, 0], 1).await;
        let opts = DownsampleOptions {
            num_mips: mips,
            ..Default::default()
        };
        downsample(gpu_compute(), &vol, &opts).await.unwrap();

        // A megabyte per task: tiles of 0.3 MB, too small for all 8 mips at once.
        let budget = PyramidBudget {
            task_bytes: 1 << 20,
            seconds: None,
        };
        let source = Precomputed::open(Arc::new(LocalStore::new(&staged)))
            .await
            .unwrap();
        let planned = plan(&source.info, &opts, &budget).unwrap();
        let sizes: Vec<u32> = planned.iter().map(|s| s.num_mips).collect();
        assert_eq!(sizes, stages, "{dtype}");
        for stage in &planned {
            let mut tasks = stage.tasks.clone();
            // Shuffled, as Batch children run.
            for i in (1..tasks.len()).rev() {
                tasks.swap(i, rng.below(i as u64 + 1) as usize);
            }
            for bounds in tasks {
                let vol = Precomputed::open(Arc::new(LocalStore::new(&staged)))
                    .await
                    .unwrap();
                let o = DownsampleOptions {
                    mip: stage.mip,
                    num_mips: stage.num_mips,
                    bounds: Some(bounds),
                    tile_bytes: stage.tile_bytes,
                    ..Default::default()
                };
                downsample(gpu_compute(), &vol, &o).await.unwrap();
            }
        }
        common::assert_same_contents(
            &common::tree_contents(&one),
            &common::tree_contents(&staged),
            &format!("{dtype}: staged pyramid"),
        );
    }
    // A budget whose least stage cannot fit is refused with the budget that would do.
    let temp = tempfile::tempdir().unwrap();
    let input = random_volume(&mut Rng::new(3), DataType::Uint8, shape, 1);
    let vol = make(
        &temp.path().join("v"),
        LayerType::Image,
        &input,
        [8, 8, 8],
        [0, 0, 0],
        1,
    )
    .await;
    let tiny = PyramidBudget {
        task_bytes: 64 << 10,
        seconds: None,
    };
    let opts = DownsampleOptions {
        num_mips: mips,
        ..Default::default()
    };
    let err = plan(&vol.info, &opts, &tiny).unwrap_err().to_string();
    assert!(
        err.contains("mips 1..=4") && err.contains("needs --task-mib 1"),
        "{err}"
    );
}
