//! Segmentation against golden outputs of the real tools
//! (tests/fixtures/make_segmentation_fixtures.py): connected components must equal cc3d 4.1.1
//! up to relabelling; the watershed must equal waterz 0.10.1's fragments up to relabelling, and
//! agglomeration is compared with waterz by the variation of information (printed; waterz breaks
//! ties between equal scores in heap order and sums in float, cuboids exactly).

mod common;

use common::{gpu_arc, read_labels};
use cuboids::formats::precomputed::WriteOptions;
use cuboids::geometry::Vec3;
use cuboids::ops::connected_components::{connected_components_cpu, remove_dust, Connectivity};
use cuboids::ops::watershed::{watershed_cpu, Affinities, WatershedParams};
use cuboids::runtime::segmentation::write_float_volume;
use cuboids::store::LocalStore;
use cuboids::task::segment::{
    connected_components, segment, ChunkOptions, ComponentsOptions, SegmentOptions,
};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/segmentation")
}

fn manifest() -> Value {
    serde_json::from_slice(&std::fs::read(dir().join("manifest.json")).unwrap()).unwrap()
}

fn words<T: bytemuck::Pod>(name: &str) -> Vec<T> {
    bytemuck::pod_collect_to_vec(&std::fs::read(dir().join(name)).unwrap())
}

fn shape_of(v: &Value) -> Vec3 {
    let s: Vec<usize> = serde_json::from_value(v["shape"].clone()).unwrap();
    [s[0], s[1], s[2]]
}

/// Panics unless `a` and `b` are the same partition with background (0) in the same places.
fn assert_same_up_to_relabelling(a: &[u64], b: &[u64], what: &str) {
    assert_eq!(a.len(), b.len());
    let (mut ab, mut ba) = (HashMap::new(), HashMap::new());
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert_eq!(
            x == 0,
            y == 0,
            "{what}: voxel {i} background differs ({x} vs {y})"
        );
        let fx = *ab.entry(x).or_insert(y);
        let fy = *ba.entry(y).or_insert(x);
        assert!(
            fx == y && fy == x,
            "{what}: voxel {i}: {x} vs {y} breaks the bijection"
        );
    }
    assert!(ab.len() > 2, "{what}: a trivial labelling");
}

/// Variation of information in bits: H(A|B) + H(B|A), over all voxels.
fn variation_of_information(a: &[u64], b: &[u64]) -> f64 {
    let n = a.len() as f64;
    let mut joint: HashMap<(u64, u64), f64> = HashMap::new();
    let (mut pa, mut pb) = (HashMap::new(), HashMap::new());
    for (&x, &y) in a.iter().zip(b) {
        *joint.entry((x, y)).or_default() += 1.0;
        *pa.entry(x).or_insert(0.0) += 1.0;
        *pb.entry(y).or_insert(0.0) += 1.0;
    }
    let h = |counts: &mut dyn Iterator<Item = f64>| -> f64 {
        counts.map(|c| -(c / n) * (c / n).log2()).sum()
    };
    let hj = h(&mut joint.values().copied());
    (2.0 * hj - h(&mut pa.values().copied()) - h(&mut pb.values().copied())).max(0.0)
}

fn chunk_options() -> ChunkOptions {
    ChunkOptions {
        chunk_size: Some([8, 8, 8]),
        output_chunk_size: Some([8, 8, 4]),
        write: WriteOptions { gzip_level: 0 },
        ..Default::default()
    }
}

#[test]
fn connected_components_equal_cc3d() {
    let m = manifest();
    let p = &m["probability"];
    let shape = shape_of(p);
    let values: Vec<f32> = words(p["file"].as_str().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let input = rt
        .block_on(write_float_volume(
            &tmp.path().join("prob"),
            &[&values],
            shape,
            WriteOptions { gzip_level: 0 },
        ))
        .unwrap();
    let outputs = p["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 7);
    for o in outputs {
        let threshold = o["threshold"].as_f64().unwrap();
        let connectivity =
            Connectivity::try_from(o["connectivity"].as_u64().unwrap() as u32).unwrap();
        let dust = o["dust"].as_u64().unwrap();
        let file = o["file"].as_str().unwrap();
        let cc3d: Vec<u64> = words::<u32>(file).into_iter().map(u64::from).collect();
        let cpu = remove_dust(
            &connected_components_cpu(&values, shape, threshold as f32, connectivity),
            dust,
        );
        let cpu: Vec<u64> = cpu.into_iter().map(u64::from).collect();
        assert_same_up_to_relabelling(&cpu, &cc3d, &format!("CPU vs {file}"));
        let out = tmp.path().join(file);
        let opts = ComponentsOptions {
            chunks: chunk_options(),
            threshold,
            connectivity,
            dust,
        };
        rt.block_on(connected_components(
            gpu_arc(),
            &input,
            Arc::new(LocalStore::new(&out)),
            &opts,
        ))
        .unwrap();
        let gpu = rt.block_on(read_labels(&out));
        assert_same_up_to_relabelling(&gpu, &cc3d, &format!("GPU (8^3 chunks) vs {file}"));
    }
}

#[test]
fn watershed_equals_waterz_and_agglomeration_is_close() {
    let m = manifest();
    let a = &m["affinities"];
    let shape = shape_of(a);
    let n = shape[0] * shape[1] * shape[2];
    let interleaved: Vec<f32> = words(a["file"].as_str().unwrap());
    let aff = Affinities {
        shape,
        channels: [0, 1, 2].map(|c| interleaved[c * n..(c + 1) * n].to_vec()),
    };
    let params = WatershedParams {
        low: a["low"].as_f64().unwrap() as f32,
        high: a["high"].as_f64().unwrap() as f32,
    };
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let channels: Vec<&[f32]> = aff.channels.iter().map(|c| c.as_slice()).collect();
    let input = rt
        .block_on(write_float_volume(
            &tmp.path().join("aff"),
            &channels,
            shape,
            WriteOptions { gzip_level: 0 },
        ))
        .unwrap();
    for o in a["outputs"].as_array().unwrap() {
        let threshold = o["threshold"].as_f64().unwrap();
        let file = o["file"].as_str().unwrap();
        let waterz: Vec<u64> = words::<u32>(file).into_iter().map(u64::from).collect();
        let out = tmp.path().join(file);
        let opts = SegmentOptions {
            chunks: chunk_options(),
            watershed: params,
            threshold,
        };
        let report = rt
            .block_on(segment(
                gpu_arc(),
                &input,
                Arc::new(LocalStore::new(&out)),
                &opts,
            ))
            .unwrap();
        let ours = rt.block_on(read_labels(&out));
        let voi = variation_of_information(&ours, &waterz);
        let theirs = waterz
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len();
        println!(
            "{file}: cuboids {} segments, waterz {theirs}; variation of information {voi:.5} bits",
            report.segments
        );
        if threshold == 0.0 {
            let cpu: Vec<u64> = watershed_cpu(&aff, params)
                .into_iter()
                .map(u64::from)
                .collect();
            assert_same_up_to_relabelling(&cpu, &waterz, "CPU watershed vs waterz fragments");
            assert_same_up_to_relabelling(&ours, &waterz, "GPU watershed vs waterz fragments");
        } else {
            assert!(voi < 0.01, "{file}: variation of information {voi} bits");
        }
    }
}
