//! ONNX inference against onnxruntime: every supported operator and two whole nets
//! (RSUNet-like with BatchNorm and residual adds; a valid-padding U-Net with a cropped,
//! concatenated skip), run by the CPU reference executor on the inputs and models that
//! tests/fixtures/onnx/make_onnx_fixtures.py gave onnxruntime. Tolerance: every output
//! within 1e-4 · max(1, |reference|) (float32 sums in another order; BatchNorm folded into
//! the Conv before it). Models inference cannot run fail at load, naming the node.

mod common;

use cuboids::infer::region::Executor;
use cuboids::infer::{cpu, gpu::GpuExecutor, InferError, Model};
use cuboids::ops::nn::Tensor;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx")
}

fn read_f32(path: &Path, shape: &[usize]) -> Tensor {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let data: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Tensor::new(shape.to_vec(), data)
}

fn shape(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    doc["cases"].as_array().unwrap().clone()
}

/// The largest error in units of the tolerance (≤ 1 passes), and where.
fn worst_error(got: &Tensor, want: &Tensor) -> (f32, usize) {
    got.data
        .iter()
        .zip(&want.data)
        .enumerate()
        .map(|(i, (&g, &w))| ((g - w).abs() / (1e-4 * w.abs().max(1.0)), i))
        .fold(
            (0.0, 0),
            |a, b| if b.0 > a.0 || b.0.is_nan() { b } else { a },
        )
}

/// The operator and net cases: name, model, input and onnxruntime's output.
fn golden_cases() -> Vec<(String, Model, Tensor, Tensor)> {
    let goldens = cases().into_iter().filter(|c| c.get("error").is_none());
    goldens
        .map(|case| {
            let name = case["name"].as_str().unwrap().to_string();
            let model = Model::open(&fixtures().join(format!("{name}.onnx")))
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let file = |ext: &str| fixtures().join(format!("{name}.{ext}.f32"));
            let input = read_f32(&file("in"), &shape(&case["input"]));
            let want = read_f32(&file("out"), &shape(&case["output"]));
            (name, model, input, want)
        })
        .collect()
}

/// Fails, naming the case, the element and `what` it was compared with, unless `got` has
/// `want`'s shape and every element is within the tolerance.
fn assert_close(name: &str, what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "{name}");
    let (error, at) = worst_error(got, want);
    assert!(
        error <= 1.0,
        "{name}: output {at} is {} where {what} has {} ({error:.1}x the tolerance)",
        got.data[at],
        want.data[at]
    );
}

#[test]
fn every_operator_and_both_nets_equal_onnxruntime() {
    let cases = golden_cases();
    for (name, model, input, want) in &cases {
        let got = cpu::run(model, input.clone()).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_close(name, "onnxruntime", &got, want);
    }
    assert!(cases.len() >= 30, "only {} cases", cases.len());
}

#[test]
fn the_native_cpu_engine_equals_onnxruntime_and_the_cpu_reference() {
    use cuboids::infer::native::NativeExecutor;
    for (name, model, input, want) in golden_cases() {
        let reference = cpu::run(&model, input.clone()).unwrap();
        let got = NativeExecutor::new(model)
            .run(input)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_close(&name, "onnxruntime (native)", &got, &want);
        assert_close(&name, "the CPU reference (native)", &got, &reference);
    }
}

#[test]
fn batch_norm_after_a_conv_is_folded_and_elsewhere_kept() {
    let ops = |name: &str| -> Vec<String> {
        let model = Model::open(&fixtures().join(format!("{name}.onnx"))).unwrap();
        model.nodes.iter().map(|n| n.op_type.clone()).collect()
    };
    assert_eq!(ops("conv_batchnorm"), vec!["Conv"]);
    assert_eq!(ops("batchnorm"), vec!["Add", "BatchNormalization"]);
    // RSUNet's BatchNorms follow adds and max-pools (pre-activation): all kept.
    assert!(ops("net_rsunet").contains(&"BatchNormalization".to_string()));
}

#[test]
fn models_inference_cannot_run_are_refused_at_load_naming_the_node() {
    let mut refused = 0;
    for case in cases().iter().filter(|c| c.get("error").is_some()) {
        let name = case["name"].as_str().unwrap();
        let path = fixtures().join(format!("{name}.onnx"));
        let err = Model::open(&path).expect_err(name).to_string();
        let expected = case["error"].as_str().unwrap();
        assert!(err.contains(expected), "{name}: {err}");
        assert!(err.contains(&path.display().to_string()), "{name}: {err}");
        refused += 1;
    }
    assert_eq!(refused, 3);
    let missing = fixtures().join("no-such-model.onnx");
    let err = Model::open(&missing).unwrap_err();
    assert!(matches!(err, InferError::Read { .. }));
    assert!(err.to_string().contains("no-such-model.onnx"), "{err}");
    // Not a protobuf at all (a JSON file), and a model cut short.
    let err = Model::open(&fixtures().join("cases.json")).unwrap_err();
    assert!(matches!(err, InferError::Decode { .. }), "{err}");
    let bytes = std::fs::read(fixtures().join("net_valid_unet.onnx")).unwrap();
    assert!(Model::from_bytes(&bytes[..bytes.len() / 2], "cut.onnx").is_err());
}

#[test]
fn an_input_of_the_wrong_shape_is_named_before_running() {
    let model = Model::open(&fixtures().join("net_rsunet.onnx")).unwrap();
    assert_eq!(model.input_channels(), Some(1));
    let err = cpu::run(&model, Tensor::zeros(vec![1, 2, 4, 16, 16])).unwrap_err();
    assert!(
        err.to_string().contains("cannot take [1, 2, 4, 16, 16]"),
        "{err}"
    );
}

fn largest_difference(got: &[f32], want: &[f32]) -> f32 {
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max)
}

/// The chunkflow fixture: its parameters, image and chunkflow's output.
fn chunkflow_case() -> (Value, Vec<u8>, Vec<f32>) {
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("chunkflow.json")).unwrap())
            .unwrap();
    let image = std::fs::read(fixtures().join("chunkflow_image.u8")).unwrap();
    let shape = shape(&doc["volume"]);
    let n: usize = shape.iter().product::<usize>() * doc["channels"].as_u64().unwrap() as usize;
    let want = read_f32(&fixtures().join("chunkflow_rsunet.f32"), &[n]).data;
    (doc, image, want)
}

fn vec3(v: &Value) -> [usize; 3] {
    let s = shape(v);
    [s[0], s[1], s[2]]
}

#[test]
fn blended_volume_equals_chunkflow_and_any_split_gives_the_same_bytes() {
    use cuboids::dtype::DataType;
    use cuboids::geometry::Box3;
    use cuboids::infer::blend::{patch_mask, Bump, PatchGrid};
    use cuboids::infer::region::{infer_region, input_box, normalised, CpuExecutor};
    use cuboids::volume::Volume;

    let (doc, bytes, want) = chunkflow_case();
    let volume = vec3(&doc["volume"]);
    let (patch, overlap) = (vec3(&doc["patch"]), vec3(&doc["overlap"]));
    let channels = doc["channels"].as_u64().unwrap() as usize;
    let model = Model::open(&fixtures().join(doc["model"].as_str().unwrap())).unwrap();
    let executor = CpuExecutor { model };
    let image = Volume {
        dtype: DataType::Uint8,
        shape: volume,
        channels: 1,
        data: bytes,
    };
    let image = normalised(&image);
    let grid = PatchGrid::new(volume, patch, patch, overlap).unwrap();
    let mask = patch_mask(Bump::Wu, patch, overlap);
    let whole = Box3::from_shape(volume);
    let (got, report) =
        infer_region(&executor, &grid, &mask, &image, whole, 1, whole, channels).unwrap();
    assert_eq!((report.patches, report.skipped), (grid.len(), 0));
    let worst = largest_difference(&got, &want);
    assert!(worst <= 1e-4, "largest difference from chunkflow: {worst}");

    // Regions that cut patches anywhere: each reads only its patches' inputs, and the bytes
    // equal the whole run's.
    let cuts: [&[usize]; 3] = [&[0, 11, 30], &[0, 7, 19, 37], &[0, 4, 5, 9]];
    let n: usize = volume.iter().product();
    for z in cuts[2].windows(2) {
        for y in cuts[1].windows(2) {
            for x in cuts[0].windows(2) {
                let region = Box3::new([x[0], y[0], z[0]], [x[1], y[1], z[1]]);
                let inputs = input_box(&grid, region).unwrap();
                let part: Vec<f32> = (0..inputs.shape().iter().product::<usize>())
                    .map(|i| {
                        let s = inputs.shape();
                        let p = [i % s[0], (i / s[0]) % s[1], i / (s[0] * s[1])];
                        let g = [0, 1, 2].map(|a| p[a] + inputs.start[a]);
                        image[(g[2] * volume[1] + g[1]) * volume[0] + g[0]]
                    })
                    .collect();
                let (out, _) =
                    infer_region(&executor, &grid, &mask, &part, inputs, 1, region, channels)
                        .unwrap();
                let rs = region.shape();
                let region_voxels: usize = rs.iter().product();
                for c in 0..channels {
                    for (i, v) in out[c * region_voxels..][..region_voxels].iter().enumerate() {
                        let p = [i % rs[0], (i / rs[0]) % rs[1], i / (rs[0] * rs[1])];
                        let g = [0, 1, 2].map(|a| p[a] + region.start[a]);
                        let whole_at = c * n + (g[2] * volume[1] + g[1]) * volume[0] + g[0];
                        assert_eq!(v.to_bits(), got[whole_at].to_bits(), "{region:?} {g:?}");
                    }
                }
            }
        }
    }
}

/// The chunkflow fixture's image as a precomputed uint8 layer (chunks that do not divide it).
async fn write_image_layer(dir: &Path, channels: usize) {
    use cuboids::dtype::DataType;
    use cuboids::formats::precomputed::info::Info;
    use cuboids::formats::precomputed::{Precomputed, WriteOptions};
    use cuboids::store::local::LocalStore;
    use cuboids::volume::Volume;
    let (doc, bytes, _) = chunkflow_case();
    let volume = vec3(&doc["volume"]);
    let info: Info = serde_json::from_value(serde_json::json!({
        "type": "image", "data_type": "uint8", "num_channels": channels,
        "scales": [{"key": "8_8_40", "size": volume, "resolution": [8, 8, 40],
                    "voxel_offset": [100, 200, 3], "chunk_sizes": [[16, 16, 4]],
                    "encoding": "raw"}]
    }))
    .unwrap();
    let store = std::sync::Arc::new(LocalStore::new(dir.to_path_buf()));
    let layer = Precomputed::create(store, info).await.unwrap();
    let data = bytes.repeat(channels);
    let image = Volume::from_bytes(DataType::Uint8, volume, channels, data).unwrap();
    layer
        .write_region(0, [0; 3], &image, WriteOptions::default())
        .await
        .unwrap();
}

/// `cuboids WHAT... --image IMAGE --model MODEL --output OUTPUT --overlap 4,4,1 EXTRA...`.
fn infer_args(
    what: &[&str],
    image: &Path,
    model: &Path,
    output: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = what.iter().map(|s| s.to_string()).collect();
    a.extend(
        [
            "--image",
            image.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--overlap",
            "4,4,1",
        ]
        .map(String::from),
    );
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Runs the binary with owned arguments.
fn run(args: Vec<String>) -> std::process::Output {
    cuboids(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn cuboids(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn cuboids_infer_writes_chunkflows_output_as_a_float32_layer() {
    use cuboids::formats::precomputed::Precomputed;
    use cuboids::geometry::Box3;
    use cuboids::store::local::LocalStore;
    let tmp = tempfile::tempdir().unwrap();
    let (image, out) = (tmp.path().join("image"), tmp.path().join("aff"));
    write_image_layer(&image, 1).await;
    let model = fixtures().join("net_rsunet.onnx");
    let args = |output: &Path| infer_args(&["infer"], &image, &model, output, &[]);
    let done = run(args(&out));
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let layer = Precomputed::open(std::sync::Arc::new(LocalStore::new(out.clone())))
        .await
        .unwrap();
    let (doc, _, want) = chunkflow_case();
    let volume = vec3(&doc["volume"]);
    assert_eq!(layer.info.num_channels, 3);
    assert_eq!(format!("{}", layer.info.data_type), "float32");
    assert_eq!(layer.scale(0).voxel_offset, [100, 200, 3]);
    let (vol, _) = layer
        .read_region(0, Box3::from_shape(volume), false)
        .await
        .unwrap();
    let got: Vec<f32> = vol
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let worst = largest_difference(&got, &want);
    assert!(worst <= 1e-4, "largest difference from chunkflow: {worst}");

    // In half precision: named in the report, within 1% of chunkflow's float32, not equal to it.
    let half = tmp.path().join("aff16");
    let done = run(infer_args(
        &["infer"],
        &image,
        &model,
        &half,
        &["--dtype", "float16"],
    ));
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success() && stdout.contains("float16"),
        "{stdout}"
    );
    let (_, got16) = common::read_f32_layer(&half).await;
    let worst16 = largest_difference(&got16, &want);
    assert!(
        worst16 > 0.0 && worst16 <= 1e-2,
        "float16 vs chunkflow: {worst16}"
    );

    // The same output again: refused, the layer untouched.
    let again = run(args(&out));
    assert_eq!(again.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already has a layer"));

    // A model inference cannot run, a missing model, an image with the wrong channel count:
    // each named, and nothing written at the output.
    let bad = tmp.path().join("bad");
    let mut with_bad_model = args(&bad);
    with_bad_model[4] = fixtures().join("bad_operator.onnx").display().to_string();
    let failed = run(with_bad_model);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(65), "{stderr}");
    assert!(
        stderr.contains("node 'head' uses operator Gelu"),
        "{stderr}"
    );
    let mut missing_model = args(&bad);
    missing_model[4] = tmp.path().join("nets/none.onnx").display().to_string();
    let failed = run(missing_model);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("nets/none.onnx"), "{stderr}");
    let two = tmp.path().join("two-channels");
    write_image_layer(&two, 2).await;
    let mut two_channels = args(&bad);
    two_channels[2] = two.display().to_string();
    let failed = run(two_channels);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("num_channels: 2, but the model")
            && stderr.contains("takes 1 input channel"),
        "{stderr}"
    );
    assert!(!bad.exists() || std::fs::read_dir(&bad).unwrap().next().is_none());
}

async fn run_infer(
    image: &Path,
    model: &str,
    out: &Path,
    edit: impl FnOnce(&mut cuboids::task::infer::InferOptions),
) -> cuboids::task::infer::InferReport {
    run_infer_on(None, image, model, out, edit).await
}

/// [`run_infer`] on the CPU reference, or with `gpu` on the WGSL executor running at most
/// that many patches at once.
async fn run_infer_on(
    gpu: Option<usize>,
    image: &Path,
    model: &str,
    out: &Path,
    edit: impl FnOnce(&mut cuboids::task::infer::InferOptions),
) -> cuboids::task::infer::InferReport {
    use cuboids::formats::precomputed::Precomputed;
    use cuboids::infer::region::CpuExecutor;
    use cuboids::store::local::LocalStore;
    let model = Model::open(&fixtures().join(model)).unwrap();
    let layer = Precomputed::open(std::sync::Arc::new(LocalStore::new(image.to_path_buf())))
        .await
        .unwrap();
    let mut opts = cuboids::task::infer::InferOptions::default();
    edit(&mut opts);
    let executor: std::sync::Arc<dyn Executor> = if let Some(batch) = gpu {
        let gpu = GpuExecutor::new(common::gpu_arc(), model.clone()).unwrap();
        std::sync::Arc::new(gpu.with_max_batch(batch))
    } else {
        std::sync::Arc::new(CpuExecutor {
            model: model.clone(),
        })
    };
    let output = std::sync::Arc::new(LocalStore::new(out.to_path_buf()));
    cuboids::task::infer::infer(executor, &model, &layer, output, &opts)
        .await
        .unwrap()
}

#[tokio::test]
async fn cropped_and_valid_outputs_are_the_nets_own_and_tiles_do_not_change_a_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("image");
    let shape = [40, 40, 8];
    let bytes = common::random_uint8_layer(&image, shape, [8, 8, 4], 3).await;

    // RSUNet (16x16x4 in and out) cropped to 12x12x2 with no overlap: each output voxel away
    // from the volume's border is one patch's centre, the net's own output there.
    let crop = tmp.path().join("crop");
    let report = run_infer(&image, "net_rsunet.onnx", &crop, |o| {
        o.output_patch = Some([12, 12, 2]);
        o.overlap = [0, 0, 0];
    })
    .await;
    assert_eq!((report.patches, report.channels), (3 * 3 * 3, 3));
    let (dims, got) = common::read_f32_layer(&crop).await;
    let model = Model::open(&fixtures().join("net_rsunet.onnx")).unwrap();
    let start = [12usize, 24, 2]; // a patch's input start (x, y, z)
    let patch: Vec<f32> = (0..4)
        .flat_map(|z| (0..16).map(move |y| (y, z)))
        .flat_map(|(y, z)| {
            let row = ((start[2] + z) * shape[1] + start[1] + y) * shape[0] + start[0];
            bytes[row..row + 16]
                .iter()
                .map(|&v| v as f32 / 255.0)
                .collect::<Vec<_>>()
        })
        .collect();
    let net = cpu::run(&model, Tensor::new(vec![1, 1, 4, 16, 16], patch)).unwrap();
    for c in 0..3 {
        for (z, y, x) in [(0, 0, 0), (1, 5, 7), (1, 11, 11)] {
            let want = net.data[((c * 4 + z + 1) * 16 + y + 2) * 16 + x + 2];
            let g = [start[0] + 2 + x, start[1] + 2 + y, start[2] + 1 + z];
            let at = ((c * dims[1] + g[2]) * dims[2] + g[1]) * dims[3] + g[0];
            assert!(
                (got[at] - want).abs() <= 1e-6,
                "channel {c} at {g:?}: {} vs {want}",
                got[at]
            );
        }
    }
    // No patch reaches the volume's outer 2 x/y voxels and 1 z voxel: zeros there.
    assert_eq!(got[0], 0.0);

    // The valid-padding U-Net (12x12x10 -> 4x4x2), in tiles of one 8x8x4 chunk and in one
    // tile: the same bytes.
    let image = tmp.path().join("image2");
    common::random_uint8_layer(&image, [26, 21, 14], [8, 8, 4], 5).await;
    let (small, whole) = (tmp.path().join("small"), tmp.path().join("whole"));
    let tiny = run_infer(&image, "net_valid_unet.onnx", &small, |o| {
        o.overlap = [1, 1, 0];
        o.column = Some([8, 8]);
    })
    .await;
    let one = run_infer(&image, "net_valid_unet.onnx", &whole, |o| {
        o.overlap = [1, 1, 0]
    })
    .await;
    assert!(
        tiny.columns > 1 && one.columns == 1,
        "{} {}",
        tiny.columns,
        one.columns
    );
    let (a, b) = (
        common::read_f32_layer(&small).await,
        common::read_f32_layer(&whole).await,
    );
    assert_eq!(a.0, b.0);
    assert!(a
        .1
        .iter()
        .zip(&b.1)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
    assert!(a.1.iter().any(|&v| v != 0.0));

    // The same on the GPU: its tiles' bytes equal its whole run's (and the CPU's to 1e-5).
    let (small, whole) = (tmp.path().join("gpu-small"), tmp.path().join("gpu-whole"));
    let model = "net_valid_unet.onnx";
    run_infer_on(Some(1), &image, model, &small, |o| {
        o.overlap = [1, 1, 0];
        o.column = Some([8, 8]);
    })
    .await;
    run_infer_on(Some(1), &image, model, &whole, |o| o.overlap = [1, 1, 0]).await;
    // Patches run four at a time (through the crop): the same bytes again.
    let batched = tmp.path().join("gpu-batched");
    run_infer_on(Some(4), &image, model, &batched, |o| o.overlap = [1, 1, 0]).await;
    let (c, d, e) = (
        common::read_f32_layer(&small).await,
        common::read_f32_layer(&whole).await,
        common::read_f32_layer(&batched).await,
    );
    assert!(c
        .1
        .iter()
        .zip(&d.1)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
    assert!(
        e.1.iter()
            .zip(&d.1)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "patches run in batches differ from patches run alone"
    );
    let worst = largest_difference(&c.1, &b.1);
    assert!(worst <= 1e-5, "GPU vs CPU: {worst}");
}

/// Both convolution kernels (register tiles, for CPU adapters; workgroup-memory GEMM tiles, for
/// GPUs), whichever the adapter would pick.
#[test]
fn the_gpu_executor_equals_onnxruntime_and_the_cpu_reference() {
    use cuboids::gpu::nn::ConvKernel;
    let cases = golden_cases();
    for (name, model, input, want) in &cases {
        let reference = cpu::run(model, input.clone()).unwrap();
        for kernel in [ConvKernel::Registers, ConvKernel::Workgroup] {
            let executor =
                GpuExecutor::with_conv_kernel(common::gpu_arc(), model.clone(), kernel).unwrap();
            let got = executor
                .run(input.clone())
                .unwrap_or_else(|e| panic!("{name} ({kernel:?}): {:?}", e));
            let what = format!("{kernel:?} kernels");
            assert_close(name, &format!("onnxruntime ({what})"), &got, want);
            assert_close(
                name,
                &format!("the CPU reference ({what})"),
                &got,
                &reference,
            );
        }
    }
    assert!(cases.len() >= 30, "only {} cases", cases.len());
}

#[test]
fn a_patch_over_the_gpus_binding_limit_is_refused_naming_the_node() {
    let mut ctx = cuboids::gpu::GpuContext::new().unwrap();
    // The fixture RSUNet's largest weights are 27,648 bytes; its first up-sampling
    // (a depthwise ConvTranspose) writes 8 channels of 16x16x4 floats, 32,768 bytes.
    ctx.limit_bindings(30_000);
    let model = Model::open(&fixtures().join("net_rsunet.onnx")).unwrap();
    let executor = GpuExecutor::new(std::sync::Arc::new(ctx), model).unwrap();
    let err = executor.check(&[1, 1, 4, 16, 16]).unwrap_err().to_string();
    assert!(
        err.contains("over this GPU's 30000-byte storage binding limit"),
        "{err}"
    );
    assert!(
        err.contains("(ConvTranspose)") && err.contains("smaller --patch"),
        "{err}"
    );
}

/// Every line of a manifest, as task documents.
fn manifest_tasks(path: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs one task document with `cuboids run-task`; returns its output document.
fn run_task(dir: &Path, task: &Value) -> Value {
    let file = dir.join("task.json");
    std::fs::write(&file, task.to_string()).unwrap();
    let o = cuboids(&["run-task", file.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "{task}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[tokio::test]
async fn a_staged_plan_equals_one_process_byte_for_byte_in_tasks_of_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("image");
    write_image_layer(&image, 1).await;
    let model = fixtures().join("net_rsunet.onnx");
    let args = |what: &[&str], output: &Path, extra: &[&str]| {
        infer_args(what, &image, &model, output, extra)
    };
    let one = tmp.path().join("one");
    let done = run(args(&["infer"], &one, &[]));
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );

    // Columns of one chunk (16x16), cut into single chunks of z by a tiny time bound: every
    // task's patches meet its neighbours', which run them too.
    let staged = tmp.path().join("staged");
    let prefix = format!("{}/", tmp.path().join("plan").display());
    let bounded = [
        "--column",
        "16,16",
        "--task-seconds",
        "1e-9",
        "--task-mib",
        "1024",
    ];
    let estimate = run(args(
        &["plan", "infer"],
        &staged,
        &[&bounded[..], &["--estimate"]].concat(),
    ));
    let printed = String::from_utf8_lossy(&estimate.stdout).to_string();
    assert!(estimate.status.success(), "{printed}");
    // 30x37x9 in chunks of 16x16x4: 2 x 3 columns, 3 pieces of z each.
    assert!(
        printed.starts_with("18 tasks of columns 16x16"),
        "{printed}"
    );
    assert!(!staged.exists(), "an estimate writes nothing");
    let planned = run(args(
        &["plan", "infer"],
        &staged,
        &[&bounded[..], &["--manifests", &prefix]].concat(),
    ));
    assert!(
        planned.status.success(),
        "{}",
        String::from_utf8_lossy(&planned.stderr)
    );
    let stages: Value = serde_json::from_slice(&planned.stdout).unwrap();
    let names: Vec<&str> = stages["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["infer", "finalize"]);
    let tasks = manifest_tasks(stages["stages"][0]["manifest"].as_str().unwrap());
    assert_eq!(tasks.len(), 18);
    // Bounds are absolute (the image's voxel offset is 100, 200, 3).
    assert_eq!(
        tasks[0]["bounds"]["start"],
        serde_json::json!([100, 200, 3])
    );
    let mut patches = 0;
    for task in &tasks {
        let doc = run_task(tmp.path(), task);
        patches += doc["patches"].as_u64().unwrap();
        // Tasks write chunks, not the info: the layer is not there until finalize.
        assert!(!staged.join("info").exists());
    }
    // The grid is 3 x 3 x 3 patches; the 18 tasks run more, as their borders cross patches.
    assert!(patches > 27, "{patches}");
    let finalize = manifest_tasks(stages["stages"][1]["manifest"].as_str().unwrap());
    assert_eq!(finalize.len(), 1);
    run_task(tmp.path(), &finalize[0]);
    // Finalize is idempotent (a retried one succeeds).
    run_task(tmp.path(), &finalize[0]);

    let (a, b) = (
        common::read_f32_layer(&one).await,
        common::read_f32_layer(&staged).await,
    );
    assert_eq!(a.0, b.0);
    assert!(a
        .1
        .iter()
        .zip(&b.1)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
    let (_, _, want) = chunkflow_case();
    assert!(largest_difference(&b.1, &want) <= 1e-4);
    let files = |d: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(d.join("8_8_40"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(files(&one), files(&staged));

    // A budget below one column of one chunk is refused, naming the budget that would do.
    let small = run(args(
        &["plan", "infer"],
        &tmp.path().join("none"),
        &["--task-mib", "100"],
    ));
    let stderr = String::from_utf8_lossy(&small.stderr);
    assert!(!small.status.success());
    assert!(
        stderr.contains("--task-mib 100 is too small") && stderr.contains("it needs --task-mib"),
        "{stderr}"
    );
    // A task whose bounds do not start on whole chunks is refused, naming them.
    let mut odd = tasks[0].clone();
    odd["bounds"]["start"] = serde_json::json!([101, 200, 3]);
    let file = tmp.path().join("odd.json");
    std::fs::write(&file, odd.to_string()).unwrap();
    let failed = cuboids(&["run-task", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(65), "{stderr}");
    assert!(
        stderr.contains("bounds [1, 0, 0]..") && stderr.contains("whole output chunks"),
        "{stderr}"
    );
}

#[test]
fn a_patch_costs_its_convolutions_multiply_adds_and_its_largest_live_activations() {
    // conv3d: x [1,3,5,7,6], w [4,3,3,3,2], pads (1,0,1)-(0,1,1), strides (1,2,1), dilations
    // (1,1,2): y is [1,4,4,3,6], 288 values of 3*3*3*2 = 54 multiply-adds each.
    let conv = Model::open(&fixtures().join("conv3d.onnx")).unwrap();
    let cost = conv.cost(&[1, 3, 5, 7, 6]).unwrap();
    assert_eq!(cost.flops, 2 * 288 * 54);
    assert_eq!(cost.peak_activation_bytes, (630 + 288) * 4);
    assert_eq!(cost.weight_bytes, (4 * 3 * 3 * 3 * 2 + 4) * 4);
    // conv_transpose3d: x [1,4,3,4,4] spreads each of its 192 values over 2*1*4*4 weights.
    let up = Model::open(&fixtures().join("conv_transpose3d.onnx")).unwrap();
    assert_eq!(up.cost(&[1, 4, 3, 4, 4]).unwrap().flops, 2 * 192 * 32);
}

#[tokio::test]
async fn a_tasks_memory_is_within_its_plan_and_does_not_grow_with_the_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("net_rsunet.onnx");
    let mut peaks = Vec::new();
    for (i, shape) in [[32, 32, 16], [32, 32, 128]].into_iter().enumerate() {
        let image = tmp.path().join(format!("image{i}"));
        common::random_uint8_layer(&image, shape, [8, 8, 4], 7).await;
        let output = tmp.path().join(format!("aff{i}"));
        let prefix = format!("{}/", tmp.path().join(format!("plan{i}")).display());
        let extra = [
            "--column",
            "16,16",
            "--task-mib",
            "1024",
            "--manifests",
            &prefix,
        ];
        let o = run(infer_args(
            &["plan", "infer"],
            &image,
            &model,
            &output,
            &extra,
        ));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        let planned_mib: u64 = stderr
            .split("at most ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{stderr}"));
        let stages: Value = serde_json::from_slice(&o.stdout).unwrap();
        let tasks = manifest_tasks(stages["stages"][0]["manifest"].as_str().unwrap());
        // One column of the four, whole z: 8x taller on the second volume.
        let doc = run_task(tmp.path(), &tasks[0]);
        let peak = doc["peak_rss_bytes"].as_u64().unwrap();
        assert!(
            peak <= planned_mib << 20,
            "{peak} bytes > {planned_mib} MiB planned"
        );
        peaks.push((peak, doc["peak_column_bytes"].as_u64().unwrap()));
    }
    let growth = peaks[1].0 as f64 / peaks[0].0 as f64;
    assert!(
        growth < 1.15,
        "a column 8x taller took {growth:.2}x the memory: {peaks:?}"
    );
    // The column's windows (image and blended planes) are as tall as a patch and a chunk on
    // both volumes: the same bytes, where holding the column would take 8x.
    assert!(peaks[0].1 > 0 && peaks[1].1 == peaks[0].1, "{peaks:?}");
}

#[tokio::test]
async fn a_quantized_layer_is_the_float_layer_rounded_to_255ths() {
    use cuboids::formats::precomputed::Precomputed;
    use cuboids::geometry::Box3;
    use cuboids::store::local::LocalStore;
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("image");
    common::random_uint8_layer(&image, [40, 36, 12], [8, 8, 4], 11).await;
    let (float, bytes) = (tmp.path().join("float"), tmp.path().join("uint8"));
    run_infer(&image, "net_rsunet.onnx", &float, |o| o.overlap = [4, 4, 1]).await;
    run_infer(&image, "net_rsunet.onnx", &bytes, |o| {
        o.overlap = [4, 4, 1];
        o.quantize = true;
    })
    .await;
    let (_, values) = common::read_f32_layer(&float).await;
    let layer = Precomputed::open(std::sync::Arc::new(LocalStore::new(bytes)))
        .await
        .unwrap();
    assert_eq!(format!("{}", layer.info.data_type), "uint8");
    let (vol, _) = layer
        .read_region(0, Box3::from_shape(layer.scale(0).size), false)
        .await
        .unwrap();
    assert_eq!(vol.data.len(), values.len());
    let want: Vec<u8> = values
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    assert_eq!(vol.data, want);
    // A sigmoid's outputs spread over the range: not all one value.
    assert!(want.iter().any(|&v| v != want[0]));
}

/// The GPU's float16 rounding is the CPU's bit for bit: ties to even, float16's subnormal grid,
/// infinity from 65520 on, signed zeros, and a sweep of bit patterns over every exponent.
#[test]
fn float16_rounding_on_the_gpu_is_the_cpus_bit_for_bit() {
    use cuboids::ops::nn::round_to_f16;
    let ulp_at_one = 2f32.powi(-10);
    let mut values = vec![
        0.0,
        -0.0,
        1.0 + ulp_at_one / 2.0,       // a tie: down to the even 1.0
        1.0 + 3.0 * ulp_at_one / 2.0, // a tie: up to the even 1 + 2 ulp
        65504.0,
        65519.99,
        65520.0,
        -70000.0,
        f32::INFINITY,
        2f32.powi(-14),       // the smallest normal
        2f32.powi(-25),       // half the smallest subnormal: a tie, to 0
        3.0 * 2f32.powi(-25), // a tie between subnormals: to the even 2^-23
        1e-30,
        0.1,
        -1.0 / 3.0,
    ];
    let mut bits = 0x1234_5678u32;
    for _ in 0..200_000 {
        bits = bits.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let v = f32::from_bits(bits);
        if !v.is_nan() {
            values.push(v);
        }
    }
    let got = cuboids::gpu::nn::round_values_to_f16(common::gpu(), &values).unwrap();
    for (v, g) in values.iter().zip(&got) {
        let want = round_to_f16(*v);
        assert_eq!(g.to_bits(), want.to_bits(), "{v:e} ({:#010x})", v.to_bits());
    }
    // The cases above land where float16 puts them.
    assert_eq!(got[2..4], [1.0, 1.0 + 2.0 * ulp_at_one]);
    assert_eq!(got[4..7], [65504.0, 65504.0, f32::INFINITY]);
    assert_eq!(got[10..12], [0.0, 2f32.powi(-23)]);
}

/// `--dtype float16` on every engine: each output is a float16 value, the engines agree to a few
/// float16 steps (a half-step: 2^-11 relative), and every case stays within 1% of
/// onnxruntime's float32.
#[test]
fn at_float16_every_engine_rounds_to_half_and_stays_near_float32() {
    use cuboids::infer::native::NativeExecutor;
    use cuboids::infer::Precision;
    use cuboids::ops::nn::round_to_f16;
    let error = |got: &Tensor, want: &Tensor, scale: f32| -> f32 {
        got.data
            .iter()
            .zip(&want.data)
            .map(|(g, w)| (g - w).abs() / (scale * w.abs().max(1.0)))
            .fold(0.0, f32::max)
    };
    for (name, model, input, want) in golden_cases() {
        let half = model.with_precision(Precision::Float16);
        let reference = cpu::run(&half, input.clone()).unwrap();
        let native = NativeExecutor::new(half.clone())
            .run(input.clone())
            .unwrap();
        let gpu = GpuExecutor::new(common::gpu_arc(), half)
            .unwrap()
            .run(input.clone())
            .unwrap();
        for (engine, out) in [
            ("reference", &reference),
            ("native", &native),
            ("gpu", &gpu),
        ] {
            assert!(
                out.data.iter().all(|&v| round_to_f16(v) == v || v.is_nan()),
                "{name}: the {engine} engine's output is not float16"
            );
            // Measured: the GPU equals the reference in every case, the native engine (other
            // sums' order) is within 2 half-steps; at most 3.1e-3 from float32 (conv3d).
            let steps = error(out, &reference, 2f32.powi(-11));
            assert!(
                steps <= 4.0,
                "{name}: the {engine} engine is {steps} half-steps off"
            );
            let from_f32 = error(out, &want, 1.0);
            assert!(
                from_f32 <= 1e-2 && (from_f32 > 0.0 || !name.starts_with("net_")),
                "{name}: the {engine} engine at float16 is {from_f32} from float32"
            );
        }
    }
}

/// A batch of patches through the GPU executor: each patch's output is its output alone, bit
/// for bit, for both nets (residual adds, concatenation skips, a crop).
#[test]
fn patches_batched_on_the_gpu_equal_patches_alone() {
    for (name, model, input, _) in golden_cases() {
        if !name.starts_with("net_") {
            continue;
        }
        assert!(model.batchable(), "{name}");
        let executor = GpuExecutor::new(common::gpu_arc(), model)
            .unwrap()
            .with_max_batch(3);
        assert_eq!(executor.batch(&input.shape), 3, "{name}");
        // Three different patches: the golden input, reversed, and halved.
        let patches = [
            input.data.clone(),
            input.data.iter().rev().copied().collect::<Vec<f32>>(),
            input.data.iter().map(|v| v * 0.5).collect(),
        ];
        let alone: Vec<Tensor> = patches
            .iter()
            .map(|p| {
                executor
                    .run(Tensor::new(input.shape.clone(), p.clone()))
                    .unwrap()
            })
            .collect();
        let mut shape = input.shape.clone();
        shape[0] = 3;
        let together = executor.run(Tensor::new(shape, patches.concat())).unwrap();
        let joined: Vec<f32> = alone.iter().flat_map(|t| t.data.clone()).collect();
        assert_eq!(together.shape[0], 3, "{name}");
        assert!(
            together
                .data
                .iter()
                .zip(&joined)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}: a batch differs from its patches run alone"
        );
    }
}
