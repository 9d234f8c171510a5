//! ONNX inference against onnxruntime: every supported operator and two whole nets
//! (RSUNet-like with BatchNorm and residual adds; a valid-padding U-Net with a cropped,
//! concatenated skip), run by the CPU reference executor on the inputs and models that
//! tests/fixtures/onnx/make_onnx_fixtures.py gave onnxruntime. Tolerance: every output
//! within 1e-4 · max(1, |reference|) (float32 sums in another order; BatchNorm folded into
//! the Conv before it). Models inference cannot run fail at load, naming the node.

use cuboids::infer::{cpu, InferError, Model};
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

#[test]
fn every_operator_and_both_nets_equal_onnxruntime() {
    let mut checked = 0;
    for case in cases().iter().filter(|c| c.get("error").is_none()) {
        let name = case["name"].as_str().unwrap();
        let model = Model::open(&fixtures().join(format!("{name}.onnx")))
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let input = read_f32(
            &fixtures().join(format!("{name}.in.f32")),
            &shape(&case["input"]),
        );
        let want = read_f32(
            &fixtures().join(format!("{name}.out.f32")),
            &shape(&case["output"]),
        );
        let got = cpu::run(&model, input).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(got.shape, want.shape, "{name}");
        let (error, at) = worst_error(&got, &want);
        assert!(
            error <= 1.0,
            "{name}: output {at} is {} where onnxruntime has {} ({error:.1}x the tolerance)",
            got.data[at],
            want.data[at]
        );
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} cases");
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

/// The chunkflow fixture: its parameters, image and chunkflow's output.
fn chunkflow_case() -> (Value, Vec<u8>, Vec<f32>) {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("chunkflow.json")).unwrap(),
    )
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
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max);
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
