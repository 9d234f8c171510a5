//! Bad input gets a clear error naming the file, key or field, and leaves nothing half-written.

mod common;

use common::{files_under, random_volume, Rng};
use cuboids::dtype::DataType;
use cuboids::formats::precomputed::info::LayerType;
use cuboids::formats::precomputed::{Precomputed, WriteOptions};
use cuboids::runtime::local::{new_info, write_new_volume};
use cuboids::store::LocalStore;
use cuboids::task::downsample::{downsample, Compute, DownsampleOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn cuboids(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A small gzipped uint8 image (or uint64 segmentation) volume; returns its directory.
async fn volume(temp: &Path, layer: LayerType, dtype: DataType) -> PathBuf {
    let dir = temp.join("vol");
    let input = random_volume(&mut Rng::new(3), dtype, [64, 64, 8], 1);
    let info = new_info(layer, dtype, input.shape, [32, 32, 8], [4.0, 4.0, 40.0]);
    write_new_volume(&dir, info, &input, WriteOptions::default())
        .await
        .unwrap();
    dir
}

/// Runs a failing downsample and checks that the volume is exactly as it was before.
async fn fails_cleanly(dir: &Path, opts: DownsampleOptions) -> String {
    let before = files_under(dir);
    let info_before = std::fs::read(dir.join("info")).unwrap();
    let err = match Precomputed::open(Arc::new(LocalStore::new(dir))).await {
        Err(e) => format!("{:#}", anyhow::Error::from(e)),
        Ok(vol) => format!(
            "{:#}",
            anyhow::Error::from(downsample(Compute::Cpu, &vol, &opts).await.unwrap_err())
        ),
    };
    assert_eq!(
        files_under(dir),
        before,
        "a failed run must leave no files behind ({err})"
    );
    assert_eq!(
        std::fs::read(dir.join("info")).unwrap(),
        info_before,
        "the info must be unchanged"
    );
    err
}

#[test]
fn cli_names_a_directory_without_info() {
    let temp = tempfile::tempdir().unwrap();
    let (ok, err) = cuboids(&["downsample", temp.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("no info file at") && err.contains(temp.path().to_str().unwrap()),
        "{err}"
    );
    let (ok, err) = cuboids(&["downsample", "/definitely/not/here"]);
    assert!(!ok && err.contains("/definitely/not/here"), "{err}");
}

#[test]
fn cli_rejects_bad_factors_and_bounds() {
    let (ok, err) = cuboids(&["downsample", ".", "--factor", "3,3,1"]);
    assert!(
        !ok && err.contains("unsupported downsampling factor [3, 3, 1]"),
        "{err}"
    );
    let (ok, err) = cuboids(&["downsample", ".", "--bounds", "0,0,0,10,10"]);
    assert!(
        !ok && err.contains("expected 6 comma-separated integers"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_info_is_named() {
    let temp = tempfile::tempdir().unwrap();
    let dir = volume(temp.path(), LayerType::Image, DataType::Uint8).await;
    let original = std::fs::read(dir.join("info")).unwrap();
    std::fs::write(dir.join("info"), b"{\"type\": \"image\", ").unwrap();
    let err = fails_cleanly(&dir, DownsampleOptions::default()).await;
    assert!(
        err.contains("invalid info at") && err.contains("EOF"),
        "{err}"
    );

    let mut info: serde_json::Value = serde_json::from_slice(&original).unwrap();
    info["data_type"] = "uint8".into();
    info["scales"][0]["chunk_sizes"] = serde_json::json!([]);
    std::fs::write(dir.join("info"), serde_json::to_vec(&info).unwrap()).unwrap();
    let err = fails_cleanly(&dir, DownsampleOptions::default()).await;
    assert!(
        err.contains("scales[0] (4_4_40).chunk_sizes: empty"),
        "{err}"
    );

    info["scales"][0]["chunk_sizes"] = serde_json::json!([[32, 32, 8]]);
    info["data_type"] = "complex128".into();
    std::fs::write(dir.join("info"), serde_json::to_vec(&info).unwrap()).unwrap();
    let err = fails_cleanly(&dir, DownsampleOptions::default()).await;
    assert!(err.contains("complex128"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_type_for_the_method_fails_before_writing() {
    let temp = tempfile::tempdir().unwrap();
    let dir = volume(temp.path(), LayerType::Image, DataType::Uint64).await;
    let err = fails_cleanly(&dir, DownsampleOptions::default()).await;
    assert!(
        err.contains("does not support data_type uint64")
            && err.contains("uint8, uint16, uint32, float32"),
        "{err}"
    );
    let err = fails_cleanly(
        &dir,
        DownsampleOptions {
            mip: 3,
            ..Default::default()
        },
    )
    .await;
    assert!(err.contains("mip 3 does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_size_and_truncated_chunks_are_named_and_nothing_is_left() {
    let temp = tempfile::tempdir().unwrap();
    let dir = volume(temp.path(), LayerType::Image, DataType::Uint8).await;
    let chunk = dir.join("4_4_40/32-64_32-64_0-8.gz");
    let good = std::fs::read(&chunk).unwrap();
    let opts = DownsampleOptions {
        num_mips: 1,
        tile_bytes: 1,
        ..Default::default()
    };

    // A valid gzip of the wrong number of bytes.
    std::fs::write(&chunk, cuboids::formats::precomputed::gzip(&[7u8; 1000], 6)).unwrap();
    let err = fails_cleanly(&dir, opts.clone()).await;
    assert!(
        err.contains("chunk 4_4_40/32-64_32-64_0-8 has 1000 bytes, expected 8192"),
        "{err}"
    );

    // A gzip stream cut short.
    std::fs::write(&chunk, &good[..good.len() / 2]).unwrap();
    let err = fails_cleanly(&dir, opts.clone()).await;
    assert!(
        err.contains("chunk 4_4_40/32-64_32-64_0-8 is not valid gzip"),
        "{err}"
    );

    // The tiles before the broken one were written; they are removed again.
    std::fs::write(&chunk, &good).unwrap();
    let vol = Precomputed::open(Arc::new(LocalStore::new(&dir)))
        .await
        .unwrap();
    downsample(Compute::Cpu, &vol, &opts).await.unwrap();
    assert!(dir.join("8_8_40").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_compressed_segmentation_is_named() {
    let temp = tempfile::tempdir().unwrap();
    let dir = volume(temp.path(), LayerType::Segmentation, DataType::Uint64).await;
    let chunk = dir.join("4_4_40/0-32_0-32_0-8.gz");
    let data =
        cuboids::formats::precomputed::gunzip(&std::fs::read(&chunk).unwrap(), 1 << 30).unwrap();
    std::fs::write(&chunk, cuboids::formats::precomputed::gzip(&data[..40], 6)).unwrap();
    let err = fails_cleanly(&dir, DownsampleOptions::default()).await;
    assert!(
        err.contains("chunk 4_4_40/0-32_0-32_0-8 is not valid compressed_segmentation")
            && err.contains("truncated"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatching_existing_scale_is_refused() {
    let temp = tempfile::tempdir().unwrap();
    let dir = volume(temp.path(), LayerType::Image, DataType::Uint8).await;
    let mut info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("info")).unwrap()).unwrap();
    let mut s1 = info["scales"][0].clone();
    s1["key"] = "8_8_40".into();
    s1["resolution"] = serde_json::json!([8, 8, 40]);
    s1["size"] = serde_json::json!([33, 32, 8]);
    info["scales"].as_array_mut().unwrap().push(s1);
    std::fs::write(dir.join("info"), serde_json::to_vec(&info).unwrap()).unwrap();
    let err = fails_cleanly(&dir, DownsampleOptions::default()).await;
    assert!(
        err.contains("existing scale 8_8_40 (mip 1)")
            && err.contains("size is [33, 32, 8], expected [32, 32, 8]"),
        "{err}"
    );
}

#[test]
fn no_vulkan_driver_says_how_to_install_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .arg("info")
        .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
        .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no Vulkan GPU adapter was found")
            && err.contains("apt-get install mesa-vulkan-drivers"),
        "{err}"
    );
}

#[test]
fn cli_info_reports_the_adapter_limits() {
    let out = Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .arg("info")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    common::assert_success(&out);
    assert!(
        text.contains("adapter: ") && text.contains("max storage buffer binding: "),
        "{text}"
    );
}
