//! cuboids against golden files written by the real Python tools (tests/fixtures/make_fixtures.py):
//! tinybrain 1.7.0, compressed-segmentation 2.3.3 and cloud-volume 12.15.2.

mod common;

use common::gpu;
use cuboids::dtype::DataType;
use cuboids::formats::precomputed::compressed_segmentation as cseg;
use cuboids::formats::precomputed::Precomputed;
use cuboids::geometry::{Box3, Vec3};
use cuboids::gpu::downsample::downsample_channel_gpu;
use cuboids::ops::downsample::{downsample_cpu, Factor, Method};
use cuboids::store::LocalStore;
use cuboids::task::downsample::{downsample, Compute, DownsampleOptions};
use cuboids::volume::Volume;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn manifest(dir: &str) -> Value {
    serde_json::from_slice(&read(fixtures().join(dir).join("manifest.json"))).unwrap()
}

fn vec3(v: &Value) -> Vec3 {
    let a: Vec<usize> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    [a[0], a[1], a.get(2).copied().unwrap_or(1)]
}

#[test]
fn downsampling_matches_tinybrain_byte_for_byte() {
    let m = manifest("tinybrain");
    let cases = m["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "the fixture set is complete");
    let mut compared = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let dtype = DataType::parse(case["dtype"].as_str().unwrap()).unwrap();
        let shape = vec3(&case["shape"]);
        let factor = Factor::new(vec3(&case["factor"])).unwrap();
        let method = if case["method"] == "mode" {
            Method::Mode
        } else {
            Method::Average
        };
        let mips = case["num_mips"].as_u64().unwrap() as u32;
        let input = read(
            fixtures()
                .join("tinybrain")
                .join(case["input"].as_str().unwrap()),
        );
        let vol = Volume::from_bytes(dtype, shape, 1, input).unwrap();
        let cpu = downsample_cpu(&vol, method, factor, mips).unwrap();
        let gpu_out =
            downsample_channel_gpu(gpu(), &vol.data, dtype, shape, method, factor, mips).unwrap();
        for (k, out) in case["outputs"].as_array().unwrap().iter().enumerate() {
            let expected = read(
                fixtures()
                    .join("tinybrain")
                    .join(out["file"].as_str().unwrap()),
            );
            assert_eq!(
                cpu[k].shape,
                vec3(&out["shape"]),
                "{name} mip {}: shape",
                k + 1
            );
            assert_eq!(
                gpu_out[k],
                cpu[k].data,
                "{name} mip {}: GPU differs from CPU",
                k + 1
            );
            if case.get("tinybrain_known_wrong").is_some() {
                // tinybrain's single-mip odd-size bug: cuboids must be right where it is not.
                assert_ne!(
                    cpu[k].data, expected,
                    "{name}: the fixture should show tinybrain's bug"
                );
                assert_eq!(
                    cpu[k].data,
                    vec![15, 35, 50],
                    "{name}: the mean of the voxels that exist"
                );
            } else {
                assert!(
                    cpu[k].data == expected,
                    "{name} mip {}: differs from tinybrain",
                    k + 1
                );
                compared += 1;
            }
        }
    }
    assert!(compared >= 40);
}

#[test]
fn compressed_segmentation_matches_the_reference_codec() {
    use cuboids::gpu::compressed_segmentation::{encode_chunks_gpu, gpu_encodes};
    let m = manifest("cseg");
    let mut gpu_checked = 0;
    for case in m["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let words = if case["dtype"] == "uint64" { 2 } else { 1 };
        let (shape, block) = (vec3(&case["shape"]), vec3(&case["block"]));
        let raw = read(fixtures().join("cseg").join(format!("{name}.raw")));
        let golden = read(fixtures().join("cseg").join(format!("{name}.cseg")));
        assert_eq!(
            cseg::decode(&golden, shape, 1, words, block).unwrap(),
            raw,
            "{name}: decode"
        );
        assert!(
            cseg::encode(&raw, shape, 1, words, block).unwrap() == golden,
            "{name}: encode is not byte-identical"
        );
        let dtype = if words == 2 {
            DataType::Uint64
        } else {
            DataType::Uint32
        };
        if gpu_encodes(dtype, block) {
            let vol = Volume::from_bytes(dtype, shape, 1, raw).unwrap();
            let whole = [Box3::from_shape(shape)];
            let on_gpu = encode_chunks_gpu(gpu(), &vol, &whole, block).unwrap();
            assert!(
                on_gpu[0].as_ref().unwrap() == &golden,
                "{name}: the GPU encoding is not byte-identical"
            );
            gpu_checked += 1;
        }
    }
    assert!(gpu_checked == 10, "{gpu_checked} cases checked on the GPU");
}

async fn open(path: &Path) -> Precomputed {
    Precomputed::open(Arc::new(LocalStore::new(path)))
        .await
        .unwrap()
}

/// CloudVolume's gzipped raw image and compressed_segmentation labels (odd size, offset
/// (3,100,7), truncated edge chunks) read back exactly, and downsample to what igneous computes;
/// so do their sharded copies (tests/fixtures/make_sharded_fixtures.py), whose new mips are
/// written unsharded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_downsamples_cloudvolume_volumes() {
    let sources = ["cloudvolume", "cloudvolume_sharded"];
    for (source, layer) in sources
        .into_iter()
        .flat_map(|s| [(s, "image"), (s, "segmentation")])
    {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join(layer);
        cuboids::runtime::local::copy_tree(&fixtures().join(source).join(layer), &dir).unwrap();
        let vol = open(&dir).await;
        let whole = Box3::from_shape(vol.scale(0).size);
        let (data, any) = vol.read_region(0, whole, false).await.unwrap();
        assert!(any);
        assert!(
            data.data == read(fixtures().join("cloudvolume").join(format!("{layer}.raw"))),
            "{source} {layer}: read"
        );

        let opts = DownsampleOptions {
            num_mips: 2,
            ..Default::default()
        };
        let report = downsample(
            Compute::Gpu(Arc::new(cuboids::gpu::GpuContext::new().unwrap())),
            &vol,
            &opts,
        )
        .await
        .unwrap();
        assert_eq!(
            report.new_scales,
            vec!["16_16_40".to_string(), "32_32_40".to_string()]
        );
        let vol = open(&dir).await;
        assert_eq!(vol.info.scales.len(), 3);
        assert_eq!(vol.scale(1).voxel_offset, [1, 50, 7]);
        assert_eq!(vol.scale(1).size, [25, 19, 11]);
        for mip in 1..=2 {
            let (out, _) = vol
                .read_region(mip, Box3::from_shape(vol.scale(mip).size), false)
                .await
                .unwrap();
            let expected = read(
                fixtures()
                    .join("cloudvolume")
                    .join(format!("{layer}.mip{mip}.raw")),
            );
            assert!(
                out.data == expected,
                "{source} {layer} mip {mip}: differs from tinybrain on the CloudVolume data"
            );
        }
    }
}
