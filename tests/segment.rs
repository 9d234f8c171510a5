//! `segment` and `connected-components` end to end on precomputed volumes: the GPU pipeline
//! equals the CPU reference, a chunked run equals a whole-volume run voxel for voxel (including
//! plateaus that cross chunk faces), and bad input gives errors naming the field.

mod common;

use common::{gpu_arc, read_labels, Rng};
use cuboids::formats::precomputed::{Precomputed, WriteOptions};
use cuboids::geometry::{Box3, Vec3};
use cuboids::ops::agglomerate::{agglomerate, region_graph_cpu};
use cuboids::ops::connected_components::{connected_components_cpu, remove_dust, Connectivity};
use cuboids::ops::watershed::{watershed_cpu, Affinities, WatershedParams};
use cuboids::runtime::segmentation::write_float_volume;
use cuboids::runtime::synthetic::affinities_like;
use cuboids::store::LocalStore;
use cuboids::task::downsample::Bounds;
use cuboids::task::segment::{
    connected_components, segment, ChunkOptions, ComponentsOptions, SegmentOptions,
};
use std::sync::Arc;

const WRITE: WriteOptions = WriteOptions { gzip_level: 0 };

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn chunks(chunk_size: Option<Vec3>) -> ChunkOptions {
    ChunkOptions {
        chunk_size,
        output_chunk_size: Some([8, 8, 4]),
        write: WRITE,
        ..Default::default()
    }
}

/// Affinities with only 4 levels: ties everywhere, so plateaus cross chunk faces.
fn tied_affinities(shape: Vec3, seed: u64) -> Affinities {
    let mut rng = Rng::new(seed);
    let n = shape[0] * shape[1] * shape[2];
    Affinities {
        shape,
        channels: [0, 1, 2].map(|_| (0..n).map(|_| rng.below(4) as f32 / 3.0).collect()),
    }
}

/// Values in [0, 1) in steps of 0.01.
fn random_probabilities(shape: Vec3, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..shape[0] * shape[1] * shape[2])
        .map(|_| rng.below(100) as f32 / 100.0)
        .collect()
}

fn segment_reference(aff: &Affinities, threshold: f64) -> Vec<u64> {
    let fragments = watershed_cpu(aff, WatershedParams::default());
    let count = fragments.iter().copied().max().unwrap_or(0);
    let graph = region_graph_cpu(aff, &fragments);
    let (segment_of, _) = agglomerate(count, &graph, threshold);
    fragments
        .iter()
        .map(|&f| segment_of[f as usize] as u64)
        .collect()
}

#[test]
fn segment_chunked_equals_whole_equals_cpu_reference() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [40, 36, 20];
    let mut encoding_gpu = cuboids::gpu::GpuContext::new().unwrap();
    encoding_gpu.gpu_encoding = true;
    let encoding_gpu = Arc::new(encoding_gpu);
    // The em-like volume is smaller than one synthetic cell: a low threshold keeps it in pieces.
    for (name, aff, threshold) in [
        ("em-like", affinities_like(shape), 0.05),
        ("tied", tied_affinities(shape, 3), 0.7),
    ] {
        rt().block_on(async {
            let channels: Vec<&[f32]> = aff.channels.iter().map(|c| c.as_slice()).collect();
            let input = write_float_volume(&dir.path().join(name), &channels, shape, WRITE)
                .await
                .unwrap();
            let expected = segment_reference(&aff, threshold);
            let segments = expected.iter().max().copied().unwrap();
            assert!(segments > 3, "{name}: only {segments} segments");
            let mut deferred = Vec::new();
            for (run, chunk) in [
                ("whole", None),
                ("chunked", Some([16, 8, 8])),
                ("slabs", Some([8, 40, 4])),
            ] {
                let out = dir.path().join(format!("{name}-{run}"));
                let opts = SegmentOptions {
                    chunks: chunks(chunk.or(Some(shape))),
                    watershed: WatershedParams::default(),
                    threshold,
                };
                let report = segment(gpu_arc(), &input, Arc::new(LocalStore::new(&out)), &opts)
                    .await
                    .unwrap();
                deferred.push(report.deferred);
                let got = read_labels(&out).await;
                assert_eq!(got.len(), expected.len());
                if let Some(i) = (0..got.len()).find(|&i| got[i] != expected[i]) {
                    panic!(
                        "{name} {run}: voxel {i} is {} , the reference says {}",
                        got[i], expected[i]
                    );
                }
                assert_eq!(report.segments as u64, segments, "{name} {run}");
            }
            // Output chunks encoded on the GPU are the CPU encoder's bytes.
            let out = dir.path().join(format!("{name}-gpu-encoded"));
            let opts = SegmentOptions {
                chunks: chunks(Some([16, 8, 8])),
                watershed: WatershedParams::default(),
                threshold,
            };
            segment(
                encoding_gpu.clone(),
                &input,
                Arc::new(LocalStore::new(&out)),
                &opts,
            )
            .await
            .unwrap();
            let cpu_encoded = dir.path().join(format!("{name}-chunked"));
            assert_same_files(&cpu_encoded, &out);
            assert_eq!(deferred[0], 0, "{name}: one chunk defers nothing");
            if name == "tied" {
                assert!(
                    deferred[1] > 0,
                    "tied data must exercise plateaus across chunk faces"
                );
            }
        });
    }
}

#[test]
fn connected_components_chunked_equal_whole_and_cpu_with_dust() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [33, 30, 17];
    let values = random_probabilities(shape, 9);
    rt().block_on(async {
        let input = write_float_volume(&dir.path().join("prob"), &[&values], shape, WRITE)
            .await
            .unwrap();
        for connectivity in [
            Connectivity::Six,
            Connectivity::Eighteen,
            Connectivity::TwentySix,
        ] {
            for dust in [0, 3] {
                let cpu = remove_dust(
                    &connected_components_cpu(&values, shape, 0.55, connectivity),
                    dust,
                );
                let expected: Vec<u64> = cpu.iter().map(|&l| l as u64).collect();
                for chunk in [Some(shape), Some([8, 8, 4]), None] {
                    let out = dir
                        .path()
                        .join(format!("cc-{connectivity:?}-{dust}-{chunk:?}"));
                    let opts = ComponentsOptions {
                        chunks: chunks(chunk),
                        threshold: 0.55,
                        connectivity,
                        dust,
                    };
                    let report = connected_components(
                        gpu_arc(),
                        &input,
                        Arc::new(LocalStore::new(&out)),
                        &opts,
                    )
                    .await
                    .unwrap();
                    assert_eq!(
                        read_labels(&out).await,
                        expected,
                        "{connectivity:?} dust {dust} chunk {chunk:?}"
                    );
                    assert_eq!(report.segments as u64, *expected.iter().max().unwrap());
                }
            }
        }
    });
}

#[test]
fn bad_inputs_name_the_field_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [16, 16, 8];
    let values = vec![0.5f32; 16 * 16 * 8];
    rt().block_on(async {
        let one = write_float_volume(&dir.path().join("one"), &[&values], shape, WRITE)
            .await
            .unwrap();
        let out = dir.path().join("out");
        let opts = SegmentOptions {
            chunks: chunks(None),
            watershed: WatershedParams::default(),
            threshold: 0.7,
        };
        let err = segment(gpu_arc(), &one, Arc::new(LocalStore::new(&out)), &opts)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("num_channels"), "{err}");
        assert!(
            !out.exists() || std::fs::read_dir(&out).unwrap().next().is_none(),
            "output left behind"
        );

        let three = write_float_volume(
            &dir.path().join("three"),
            &[&values, &values, &values],
            shape,
            WRITE,
        )
        .await
        .unwrap();
        let err = connected_components(
            gpu_arc(),
            &three,
            Arc::new(LocalStore::new(&out)),
            &ComponentsOptions {
                chunks: chunks(None),
                threshold: 0.5,
                connectivity: Connectivity::Six,
                dust: 0,
            },
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("num_channels"), "{err}");

        let mut misaligned = chunks(None);
        misaligned.bounds = Some(Bounds {
            start: [3, 0, 0],
            stop: [16, 16, 8],
        });
        let err = segment(
            gpu_arc(),
            &three,
            Arc::new(LocalStore::new(&out)),
            &SegmentOptions {
                chunks: misaligned,
                watershed: WatershedParams::default(),
                threshold: 0.7,
            },
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("bounds"), "{err}");
    });
}

#[test]
fn segmentation_tasks_run_through_run_task() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [24, 16, 8];
    let values = random_probabilities(shape, 21);
    let aff = affinities_like([24, 16, 8]);
    rt().block_on(async {
        write_float_volume(&dir.path().join("prob"), &[&values], shape, WRITE)
            .await
            .unwrap();
        let channels: Vec<&[f32]> = aff.channels.iter().map(|c| c.as_slice()).collect();
        write_float_volume(&dir.path().join("aff"), &channels, shape, WRITE)
            .await
            .unwrap();
    });
    let run = |doc: serde_json::Value| {
        let path = dir.path().join("task.json");
        std::fs::write(&path, doc.to_string()).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_cuboids"))
            .arg("run-task")
            .arg(&path)
            .env("CUBOIDS_LOG_FORMAT", "text")
            .output()
            .unwrap()
    };
    let out = run(serde_json::json!({
        "kind": "connected-components",
        "input": dir.path().join("prob"),
        "output": dir.path().join("cc"),
        "threshold": 0.55,
        "connectivity": 6,
        "chunk_size": [8, 8, 4],
        "output_chunk_size": [8, 8, 4],
        "gzip_level": 0
    }));
    common::assert_success(&out);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["kind"], "connected-components");
    let cpu = connected_components_cpu(&values, shape, 0.55, Connectivity::Six);
    assert_eq!(doc["segments"], *cpu.iter().max().unwrap());
    let got = rt().block_on(read_labels(&dir.path().join("cc")));
    assert_eq!(got, cpu.iter().map(|&l| l as u64).collect::<Vec<_>>());

    let out = run(serde_json::json!({
        "kind": "segment",
        "affinity": dir.path().join("aff"),
        "output": dir.path().join("seg"),
        "output_chunk_size": [8, 8, 4],
    }));
    common::assert_success(&out);
    let got = rt().block_on(read_labels(&dir.path().join("seg")));
    assert_eq!(got, segment_reference(&aff, 0.7));

    let out = run(serde_json::json!({
        "kind": "segment", "affinity": "x", "output": "y", "treshold": 0.5
    }));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("treshold"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Input and output in S3 (moto's server), through the CLI: the same labels as the reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_reads_and_writes_s3_through_the_cli() {
    let s3 = common::S3Server::start();
    let shape = [24, 20, 12];
    let aff = tied_affinities(shape, 17);
    let store = Arc::new(s3.store("vols", "aff").await);
    let (info, vol) = affinity_layer(&aff, cuboids::dtype::DataType::Float32, [8, 8, 4]);
    Precomputed::create(store, info)
        .await
        .unwrap()
        .write_region(0, [0; 3], &vol, WriteOptions::default())
        .await
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .args([
            "segment",
            "--affinity",
            "s3://vols/aff",
            "--output",
            "s3://vols/seg",
            "--chunk-size",
            "8,8,8",
        ])
        .envs(s3.aws_env("AWS_ENDPOINT_URL_S3"))
        .env("CUBOIDS_LOG_FORMAT", "text")
        .output()
        .unwrap();
    common::assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("MVx/s"));
    let seg_store = Arc::new(
        cuboids::store::S3Store::with_config(
            "s3://vols/seg",
            &s3.sdk_config().await,
            Some(s3.endpoint.clone()),
        )
        .unwrap(),
    );
    let seg = Precomputed::open(seg_store).await.unwrap();
    assert_eq!(seg.scale(0).chunk_sizes, vec![[8, 8, 4]]);
    let (labels, _) = seg
        .read_region(0, Box3::from_shape(shape), false)
        .await
        .unwrap();
    let labels: Vec<u64> = bytemuck::pod_collect_to_vec(&labels.data);
    assert_eq!(labels, segment_reference(&aff, 0.7));
}

/// Chunk margins overlap neighbouring input chunks: the cache fetches each one once, and the
/// labels do not depend on it.
#[test]
fn the_chunk_cache_fetches_each_input_chunk_once() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [32, 32, 16];
    let aff = tied_affinities(shape, 8);
    rt().block_on(async {
        let input = write_affinities(
            &dir.path().join("aff"),
            &aff,
            cuboids::dtype::DataType::Float32,
            [8, 8, 4],
        )
        .await;
        let input_chunks = (32 / 8) * (32 / 8) * (16 / 4);
        let mut outputs = Vec::new();
        for cache_bytes in [64 << 20, 0] {
            let out = dir.path().join(format!("seg-{cache_bytes}"));
            let mut chunk_opts = chunks(Some([16, 16, 8]));
            chunk_opts.cache_bytes = cache_bytes;
            let opts = SegmentOptions {
                chunks: chunk_opts,
                watershed: WatershedParams::default(),
                threshold: 0.7,
            };
            let report = segment(gpu_arc(), &input, Arc::new(LocalStore::new(&out)), &opts)
                .await
                .unwrap();
            if cache_bytes > 0 {
                assert_eq!(report.chunks_fetched, input_chunks, "{report:?}");
                assert!(report.chunks_from_cache > input_chunks, "{report:?}");
            } else {
                assert!(report.chunks_fetched > 3 * input_chunks, "{report:?}");
            }
            outputs.push(read_labels(&out).await);
        }
        assert_eq!(outputs[0], outputs[1]);
        assert_eq!(outputs[0], segment_reference(&aff, 0.7));
    });
}

/// An affinity map as a precomputed info and volume (3 channels, `chunk`-sized chunks);
/// uint8 stores round(255 a).
fn affinity_layer(
    aff: &Affinities,
    dtype: cuboids::dtype::DataType,
    chunk: Vec3,
) -> (
    cuboids::formats::precomputed::info::Info,
    cuboids::volume::Volume,
) {
    let mut info = cuboids::runtime::local::new_info(
        cuboids::formats::precomputed::info::LayerType::Image,
        dtype,
        aff.shape,
        chunk,
        [8.0, 8.0, 40.0],
    );
    info.num_channels = 3;
    let data: Vec<u8> = match dtype {
        cuboids::dtype::DataType::Uint8 => aff
            .channels
            .iter()
            .flat_map(|c| c.iter().map(|&a| (a * 255.0).round() as u8))
            .collect(),
        _ => aff
            .channels
            .iter()
            .flat_map(|c| bytemuck::cast_slice::<f32, u8>(c).to_vec())
            .collect(),
    };
    let vol = cuboids::volume::Volume::from_bytes(dtype, aff.shape, 3, data).unwrap();
    (info, vol)
}

async fn write_affinities(
    dir: &std::path::Path,
    aff: &Affinities,
    dtype: cuboids::dtype::DataType,
    chunk: Vec3,
) -> Precomputed {
    let (info, vol) = affinity_layer(aff, dtype, chunk);
    cuboids::runtime::local::write_new_volume(dir, info, &vol, WRITE)
        .await
        .unwrap()
}

fn default_segment(chunk_opts: ChunkOptions) -> SegmentOptions {
    SegmentOptions {
        chunks: chunk_opts,
        watershed: WatershedParams::default(),
        threshold: 0.7,
    }
}

/// uint8 affinities are read as value / 255; bounds make a sub-volume (voxels outside do not
/// exist); a missing chunk is an error naming it, or zeros with fill_missing.
#[test]
fn uint8_affinities_bounds_and_missing_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [32, 24, 16];
    // Levels k/255 so that uint8 storage is exact.
    let mut rng = Rng::new(4);
    let n = shape[0] * shape[1] * shape[2];
    let aff = Affinities {
        shape,
        channels: [0, 1, 2].map(|_| (0..n).map(|_| (rng.below(6) * 51) as f32 / 255.0).collect()),
    };
    rt().block_on(async {
        let input = write_affinities(
            &dir.path().join("u8"),
            &aff,
            cuboids::dtype::DataType::Uint8,
            [8, 8, 4],
        )
        .await;
        let out = dir.path().join("seg-u8");
        segment(
            gpu_arc(),
            &input,
            Arc::new(LocalStore::new(&out)),
            &default_segment(chunks(Some([16, 8, 8]))),
        )
        .await
        .unwrap();
        assert_eq!(
            read_labels(&out).await,
            segment_reference(&aff, 0.7),
            "uint8 input"
        );

        // Bounds: the reference is the cropped affinity graph (edges leaving the bounds vanish
        // with the voxels outside).
        let (start, stop) = ([8usize, 8, 4], [24usize, 24, 16]);
        let sub = [0, 1, 2].map(|a| stop[a] - start[a]);
        let crop = |c: &Vec<f32>| {
            let mut out = Vec::new();
            for z in start[2]..stop[2] {
                for y in start[1]..stop[1] {
                    for x in start[0]..stop[0] {
                        out.push(c[x + shape[0] * (y + shape[1] * z)]);
                    }
                }
            }
            out
        };
        let cropped = Affinities {
            shape: sub,
            channels: [
                crop(&aff.channels[0]),
                crop(&aff.channels[1]),
                crop(&aff.channels[2]),
            ],
        };
        let mut opts = chunks(Some([8, 8, 4]));
        opts.bounds = Some(Bounds {
            start: [8, 8, 4],
            stop: [24, 24, 16],
        });
        let out = dir.path().join("seg-bounds");
        segment(
            gpu_arc(),
            &input,
            Arc::new(LocalStore::new(&out)),
            &default_segment(opts),
        )
        .await
        .unwrap();
        let labels = common::read_labels_with(&out, true).await;
        let expected = segment_reference(&cropped, 0.7);
        let mut inside = Vec::new();
        for z in 0..shape[2] {
            for y in 0..shape[1] {
                for x in 0..shape[0] {
                    let l = labels[x + shape[0] * (y + shape[1] * z)];
                    let within = (0..3).all(|a| [x, y, z][a] >= start[a] && [x, y, z][a] < stop[a]);
                    if within {
                        inside.push(l);
                    } else {
                        assert_eq!(l, 0, "({x},{y},{z}) outside the bounds was written");
                    }
                }
            }
        }
        assert_eq!(inside, expected, "bounded run");

        // A missing chunk.
        std::fs::remove_file(dir.path().join("u8/8_8_40/8-16_0-8_0-4")).unwrap();
        let out = dir.path().join("seg-missing");
        let err = segment(
            gpu_arc(),
            &input,
            Arc::new(LocalStore::new(&out)),
            &default_segment(chunks(None)),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("8-16_0-8_0-4"), "{err}");
        assert!(!out.join("info").exists(), "a failed run left an info");
        let mut opts = chunks(None);
        opts.fill_missing = true;
        segment(
            gpu_arc(),
            &input,
            Arc::new(LocalStore::new(&out)),
            &default_segment(opts),
        )
        .await
        .unwrap();
        let mut zeroed = aff.clone();
        for c in zeroed.channels.iter_mut() {
            for z in 0..4 {
                for y in 0..8 {
                    for x in 8..16 {
                        c[x + shape[0] * (y + shape[1] * z)] = 0.0;
                    }
                }
            }
        }
        assert_eq!(
            read_labels(&out).await,
            segment_reference(&zeroed, 0.7),
            "fill_missing"
        );
    });
}

/// A local store that cancels a run after its `after`-th write, as SIGTERM or a lost heartbeat
/// would mid-write.
struct CancelAfterWrites {
    inner: LocalStore,
    after: usize,
    puts: std::sync::atomic::AtomicUsize,
    cancel: tokio_util::sync::CancellationToken,
}

#[async_trait::async_trait]
impl cuboids::store::Store for CancelAfterWrites {
    fn location(&self) -> String {
        self.inner.location()
    }

    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<cuboids::store::Object>, cuboids::store::StoreError> {
        self.inner.get(key).await
    }

    async fn put(
        &self,
        key: &str,
        data: Vec<u8>,
        encoding: cuboids::store::ContentEncoding,
    ) -> Result<(), cuboids::store::StoreError> {
        let r = self.inner.put(key, data, encoding).await;
        if self.puts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == self.after {
            self.cancel.cancel();
        }
        r
    }

    async fn delete(&self, key: &str) -> Result<(), cuboids::store::StoreError> {
        self.inner.delete(key).await
    }
}

/// A float32 volume of `channels` written to `path`, opened.
fn float_volume(
    rt: &tokio::runtime::Runtime,
    path: &std::path::Path,
    channels: &[&[f32]],
    shape: Vec3,
) -> Precomputed {
    rt.block_on(write_float_volume(path, channels, shape, WRITE))
        .unwrap()
}

/// Every file under `dir` (chunks, info, temporary files).
/// The two directories hold the same files with the same bytes.
fn assert_same_files(a: &std::path::Path, b: &std::path::Path) {
    let files = common::tree_contents(a);
    assert!(files.len() > 2, "{}: {} files", a.display(), files.len());
    let what = format!("{} against {}", a.display(), b.display());
    common::assert_same_contents(&files, &common::tree_contents(b), &what);
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_cancelled_run_leaves_no_chunks_in_a_new_output_and_keeps_an_existing_one() {
    let shape = [48, 40, 16]; // 6 x 5 x 4 = 120 output chunks of 8x8x4
    let dir = tempfile::tempdir().unwrap();
    let aff = tied_affinities(shape, 5);
    let prob = random_probabilities(shape, 6);
    let refs: Vec<&[f32]> = aff.channels.iter().map(Vec::as_slice).collect();
    let rt = rt();
    let aff_vol = float_volume(&rt, &dir.path().join("aff"), &refs, shape);
    let prob_vol = float_volume(&rt, &dir.path().join("prob"), &[&prob], shape);
    let run = |output: &std::path::Path, after: usize, segmenting: bool| {
        let cancel = tokio_util::sync::CancellationToken::new();
        let store = Arc::new(CancelAfterWrites {
            inner: LocalStore::new(output),
            after,
            puts: Default::default(),
            cancel: cancel.clone(),
        });
        let mut chunks = chunks(Some([16, 16, 8]));
        chunks.cancel = Some(cancel);
        rt.block_on(async {
            if segmenting {
                let opts = SegmentOptions {
                    chunks,
                    watershed: WatershedParams::default(),
                    threshold: 0.5,
                };
                segment(gpu_arc(), &aff_vol, store, &opts).await
            } else {
                let opts = ComponentsOptions {
                    chunks,
                    threshold: 0.5,
                    connectivity: Connectivity::TwentySix,
                    dust: 0,
                };
                connected_components(gpu_arc(), &prob_vol, store, &opts).await
            }
        })
    };
    for (name, segmenting) in [("segment", true), ("connected-components", false)] {
        let output = dir.path().join(name);
        // Cancelled after 10 of 120 chunk writes: an error, and nothing left behind.
        let err = run(&output, 10, segmenting).unwrap_err();
        assert!(
            matches!(err, cuboids::task::segment::SegmentError::Cancelled),
            "{name}: {err}"
        );
        assert_eq!(
            files_under(&output),
            Vec::<std::path::PathBuf>::new(),
            "{name}"
        );
        // A finished run, then a cancelled run over it: the finished output stays whole.
        let done = run(&output, usize::MAX, segmenting).unwrap();
        assert_eq!(done.chunks_written, 120, "{name}");
        let before: Vec<_> = files_under(&output)
            .into_iter()
            .map(|p| (std::fs::read(&p).unwrap(), p))
            .collect();
        assert_eq!(before.len(), 121, "{name}: 120 chunks and the info");
        assert!(run(&output, 10, segmenting).is_err(), "{name}");
        let after: Vec<_> = files_under(&output)
            .into_iter()
            .map(|p| (std::fs::read(&p).unwrap(), p))
            .collect();
        assert!(after == before, "{name}: the existing output changed");
    }
}

#[test]
fn a_cancelled_relabel_stage_task_leaves_none_of_its_chunks() {
    use cuboids::task::spec::Task;
    use cuboids::task::staged::{plan, run_stage};
    let shape = [48, 40, 16];
    let dir = tempfile::tempdir().unwrap();
    let prob = random_probabilities(shape, 8);
    let rt = rt();
    let input = float_volume(&rt, &dir.path().join("prob"), &[&prob], shape);
    let output = dir.path().join("cc");
    let doc = serde_json::json!({
        "kind": "connected-components", "input": dir.path().join("prob"), "output": output,
        "threshold": 0.5, "chunk_size": [16, 16, 8], "output_chunk_size": [8, 8, 4],
        "gzip_level": 0
    });
    let Task::ConnectedComponents(task) = Task::from_json(&doc.to_string()).unwrap() else {
        panic!("a connected-components task")
    };
    // Blocks of 16x16x8 (one GPU chunk).
    let budget = cuboids::task::staged::Budget {
        task_bytes: 64 << 20,
        block: Some([16, 16, 8]),
        ..Default::default()
    };
    let (plan, stages) = plan(&input, &task, &budget).unwrap();
    let stage_task = |t: Task| match t {
        Task::ConnectedComponentsStage(s) => s,
        other => panic!("{}", other.describe()),
    };
    let store = || Arc::new(LocalStore::new(&output));
    // Every stage before the relabel stage (the second to last).
    let relabel_stage = stages.len() - 2;
    let earlier = stages[..relabel_stage]
        .iter()
        .flat_map(|spec| (0..spec.tasks).map(|i| spec.task(&plan, i)));
    for t in earlier {
        rt.block_on(run_stage(
            &stage_task(t),
            &input,
            store(),
            Some(gpu_arc()),
            None,
        ))
        .unwrap();
    }
    let chunks = || {
        files_under(&output)
            .into_iter()
            .filter(|p| !p.to_string_lossy().contains(".cuboids-staging"))
            .collect::<Vec<_>>()
    };
    assert!(chunks().is_empty(), "{:?}", chunks());
    // Block 0's relabel (16x16x8: 8 output chunks), cancelled after its 3rd chunk write.
    let relabel = stage_task(stages[relabel_stage].task(&plan, 0));
    assert_eq!(relabel.stage_name(), "relabel");
    let cancel = tokio_util::sync::CancellationToken::new();
    let cancelling = Arc::new(CancelAfterWrites {
        inner: LocalStore::new(&output),
        after: 3,
        puts: Default::default(),
        cancel: cancel.clone(),
    });
    let err = rt
        .block_on(run_stage(&relabel, &input, cancelling, None, Some(cancel)))
        .unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    assert_eq!(chunks(), Vec::<std::path::PathBuf>::new());
    // Run again, it writes the block's chunks.
    let report = rt
        .block_on(run_stage(&relabel, &input, store(), None, None))
        .unwrap();
    assert_eq!(report.chunks_written, 8);
    assert_eq!(chunks().len(), 8);
}
