//! Sharded precomputed scales (neuroglancer_uint64_sharded_v1) written by CloudVolume
//! (tests/fixtures/make_sharded_fixtures.py): read locally and from a real S3 server with ranged
//! reads, hashed as CloudVolume hashes, and damaged shards named in their errors.

mod common;

use async_trait::async_trait;
use common::S3Server;
use cuboids::formats::precomputed::sharding::murmurhash3_x86_128_low64;
use cuboids::formats::precomputed::{Precomputed, PrecomputedError, WriteOptions};
use cuboids::geometry::Box3;
use cuboids::store::{ContentEncoding, LocalStore, Object, Store, StoreError};
use cuboids::task::downsample::Compute;
use cuboids::volume::Volume;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn sharded(layer: &str) -> PathBuf {
    fixtures().join("cloudvolume_sharded").join(layer)
}

/// The array CloudVolume wrote (the same for the sharded and the unsharded copy).
fn expected(layer: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("cloudvolume").join(format!("{layer}.raw"))).unwrap()
}

/// The volume in a local directory.
async fn open_dir(dir: &Path) -> Precomputed {
    Precomputed::open(Arc::new(LocalStore::new(dir)))
        .await
        .unwrap()
}

/// A writable copy of a fixture volume (`cloudvolume/image`, ...), in a temporary directory.
fn fixture_copy(volume: &str) -> (tempfile::TempDir, PathBuf) {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("vol");
    cuboids::runtime::local::copy_tree(&fixtures().join(volume), &dir).unwrap();
    (temp, dir)
}

async fn read_whole(vol: &Precomputed) -> Result<Volume, PrecomputedError> {
    let whole = Box3::from_shape(vol.scale(0).size);
    Ok(vol.read_region(0, whole, false).await?.0)
}

/// A real store that counts what is read through it: whole objects and ranged bytes.
struct Counting {
    inner: Arc<dyn Store>,
    whole_shard_gets: AtomicU64,
    ranged_bytes: AtomicU64,
}

#[async_trait]
impl Store for Counting {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn get(&self, key: &str) -> Result<Option<Object>, StoreError> {
        if key.ends_with(".shard") {
            self.whole_shard_gets.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.get(key).await
    }
    async fn get_range(
        &self,
        key: &str,
        start: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let got = self.inner.get_range(key, start, len).await?;
        let n = got.as_ref().map_or(0, |d| d.len() as u64);
        self.ranged_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(got)
    }
    async fn put(&self, key: &str, data: Vec<u8>, enc: ContentEncoding) -> Result<(), StoreError> {
        self.inner.put(key, data, enc).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    common::files_under(dir)
        .into_iter()
        .map(|path| {
            let rel = Path::new(&path).strip_prefix(dir).unwrap();
            (rel.display().to_string(), std::fs::read(&path).unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_cloudvolume_sharded_volumes_locally() {
    for layer in ["image", "segmentation"] {
        let vol = Precomputed::open(Arc::new(LocalStore::new(sharded(layer))))
            .await
            .unwrap();
        let data = read_whole(&vol).await.unwrap();
        assert!(data.data == expected(layer), "{layer}: sharded read");
    }
}

/// Over S3, shards are read by ranges: one chunk costs its index entry, its minishard index and
/// its bytes, not the shard file; the whole volume reads back exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_sharded_volumes_from_s3_with_ranged_reads() {
    let s3 = S3Server::start();
    for (i, layer) in ["image", "segmentation"].into_iter().enumerate() {
        let store: Arc<dyn Store> = Arc::new(s3.store(&format!("shards{i}"), layer).await);
        let mut shard_bytes = 0;
        for (key, data) in files(&sharded(layer)) {
            if key.ends_with(".shard") {
                shard_bytes = shard_bytes.max(data.len() as u64);
            }
            store
                .put(&key, data, ContentEncoding::Identity)
                .await
                .unwrap();
        }
        let counting = Arc::new(Counting {
            inner: store,
            whole_shard_gets: AtomicU64::new(0),
            ranged_bytes: AtomicU64::new(0),
        });
        let vol = Precomputed::open(counting.clone()).await.unwrap();
        let one_chunk = Box3::new([16, 16, 4], [32, 32, 8]);
        let (part, any) = vol.read_region(0, one_chunk, false).await.unwrap();
        assert!(any);
        let fetched = counting.ranged_bytes.load(Ordering::Relaxed);
        assert!(
            fetched < shard_bytes / 2,
            "{layer}: one chunk fetched {fetched} bytes of shards up to {shard_bytes} bytes"
        );
        let whole = read_whole(&vol).await.unwrap();
        assert!(
            whole.data == expected(layer),
            "{layer}: sharded read over S3"
        );
        let region = whole.crop([16, 16, 4], [16, 16, 4]);
        assert!(part.data == region.data, "{layer}: one chunk over S3");
        assert_eq!(counting.whole_shard_gets.load(Ordering::Relaxed), 0);
    }
}

#[test]
fn shard_hashes_equal_cloudvolumes() {
    let path = fixtures().join("cloudvolume_sharded/murmurhash.json");
    let pairs: Vec<(u64, u64)> = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert!(pairs.len() > 20);
    for (id, hash) in pairs {
        assert_eq!(murmurhash3_x86_128_low64(id), hash, "chunk id {id}");
    }
}

/// A copy of the sharded segmentation to damage.
fn damaged_copy() -> (tempfile::TempDir, PathBuf) {
    fixture_copy("cloudvolume_sharded/segmentation")
}

/// Reads the sharded segmentation with its shard 0 replaced by `damaged`; the error must name
/// the shard file and say `why`.
async fn assert_damage_named(damaged: &[u8], why: &str) {
    let (_t, dir) = damaged_copy();
    std::fs::write(dir.join("8_8_40/0.shard"), damaged).unwrap();
    let vol = open_dir(&dir).await;
    let e = match read_whole(&vol).await {
        Ok(_) => panic!("a damaged shard read without error ({why})"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("8_8_40/0.shard") && e.contains(why), "{e}");
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(data[at..at + 8].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_shards_fail_with_the_shard_named() {
    let data = std::fs::read(sharded("segmentation").join("8_8_40/0.shard")).unwrap();
    // Truncated inside its index.
    assert_damage_named(&data[..40], "truncated").await;
    // Truncated in its data: a minishard index (at the end) that is cut off.
    assert_damage_named(&data[..data.len() - 30], "outside the shard file").await;

    // An index entry that ends before it starts.
    let first_minishard = (0..4).find(|&m| u64_at(&data, 16 * m) != u64_at(&data, 16 * m + 8));
    let m = first_minishard.expect("a minishard with chunks");
    let mut bad = data.clone();
    bad[16 * m + 8..16 * m + 16].copy_from_slice(&0u64.to_le_bytes());
    bad[16 * m..16 * m + 8].copy_from_slice(&5u64.to_le_bytes());
    assert_damage_named(&bad, "before it starts").await;

    // A minishard index whose chunk points past the end of the shard: its first size (the
    // third row of n entries, after the 64-byte shard index).
    let (start, end) = (
        u64_at(&data, 16 * m) as usize,
        u64_at(&data, 16 * m + 8) as usize,
    );
    let n = (end - start) / 24;
    let first_size = 64 + start + 16 * n;
    let mut bad = data.clone();
    bad[first_size..first_size + 8].copy_from_slice(&1_000_000u64.to_le_bytes());
    assert_damage_named(&bad, "outside the shard file").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sharding_specs_are_named_and_sharded_scales_are_not_written() {
    let cases = [
        (
            "hash",
            serde_json::json!("murmurhash3_x64_128"),
            "sharding.hash",
        ),
        ("shard_bits", serde_json::json!(63), "sharding.shard_bits"),
        ("@type", serde_json::json!("zarr_sharded"), "sharding.@type"),
        (
            "data_encoding",
            serde_json::json!("zstd"),
            "sharding.data_encoding",
        ),
    ];
    for (field, value, named) in cases {
        let (_t, dir) = damaged_copy();
        let mut info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("info")).unwrap()).unwrap();
        info["scales"][0]["sharding"][field] = value;
        std::fs::write(dir.join("info"), serde_json::to_vec(&info).unwrap()).unwrap();
        let e = match Precomputed::open(Arc::new(LocalStore::new(&dir))).await {
            Ok(_) => panic!("{field}: a bad sharding spec opened"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(named), "{field}: {e}");
    }

    // Writing a chunk file into a sharded scale would hide it from every reader: refused.
    let (_t, dir) = damaged_copy();
    let before = common::files_under(&dir);
    let vol = open_dir(&dir).await;
    let chunk = Box3::new([0, 0, 0], [16, 16, 4]);
    let data = read_whole(&vol).await.unwrap().crop([0, 0, 0], [16, 16, 4]);
    let e = vol
        .write_chunk(0, chunk, data, WriteOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, PrecomputedError::Sharded { .. }), "{e}");
    assert_eq!(common::files_under(&dir), before, "nothing written");
}

fn connected_components(input: &Path, output: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .arg("connected-components")
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(["--threshold", "120"])
        .output()
        .unwrap()
}

/// A command reads a sharded input as it reads the unsharded copy (byte-identical output), and
/// refuses a sharded output layer before it labels anything.
#[test]
fn connected_components_read_sharded_inputs_and_refuse_sharded_outputs() {
    let temp = tempfile::tempdir().unwrap();
    let (from_sharded, from_plain) = (temp.path().join("a"), temp.path().join("b"));
    let run = connected_components(&sharded("image"), &from_sharded);
    common::assert_success(&run);
    let plain = fixtures().join("cloudvolume/image");
    let run = connected_components(&plain, &from_plain);
    common::assert_success(&run);
    assert!(files(&from_sharded) == files(&from_plain));
    assert!(files(&from_plain).len() > 30, "a real output");

    let (_t, out) = damaged_copy();
    let before = files(&out);
    let run = connected_components(&sharded("image"), &out);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("scales[0].sharding"), "{stderr}");
    assert!(files(&out) == before, "the sharded layer is untouched");
}

/// cuboids' shard encoder against CloudVolume's shard writer: with raw indices and data the
/// shard files are byte-identical; with gzip (whose bytes depend on the compressor) the
/// re-encoded shards read back as the same volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_shards_equal_cloudvolumes() {
    use cuboids::formats::precomputed::sharding::{
        compressed_morton_code, encode_shard, ShardBounds, ShardReader, ShardingSpec,
    };
    use std::collections::BTreeMap;
    for layer in ["segmentation", "image"] {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join(layer);
        cuboids::runtime::local::copy_tree(&sharded(layer), &dir).unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(&dir));
        let vol = Precomputed::open(store.clone()).await.unwrap();
        let scale = vol.scale(0).clone();
        let spec = ShardingSpec::parse(scale.sharding.as_ref().unwrap()).unwrap();
        let grid = cuboids::geometry::div_ceil3(scale.size, scale.chunk_size());
        let mut shards: BTreeMap<u64, BTreeMap<u64, Vec<u8>>> = BTreeMap::new();
        let reader = ShardReader::default();
        let bounds = ShardBounds {
            chunk_bytes: 1 << 20,
            chunks: 1 << 10,
        };
        for z in 0..grid[2] {
            for y in 0..grid[1] {
                for x in 0..grid[0] {
                    let id = compressed_morton_code([x, y, z], grid);
                    let mut data = reader
                        .read_chunk(&*store, &spec, &scale.key, id, bounds)
                        .await
                        .unwrap()
                        .expect("every chunk is in its shard");
                    if spec.gzip_data {
                        // Shards hold chunks as stored: gzipped again.
                        data = cuboids::formats::precomputed::gzip(&data, 6);
                    }
                    shards
                        .entry(spec.location(id).0)
                        .or_default()
                        .insert(id, data);
                }
            }
        }
        assert!(shards.len() > 1);
        for (shard, chunks) in &shards {
            let key = spec.shard_key(&scale.key, *shard);
            let encoded = encode_shard(&spec, chunks);
            let theirs = std::fs::read(dir.join(&key)).unwrap();
            if !spec.gzip_data && !spec.gzip_minishard_index {
                assert!(encoded == theirs, "{layer} {key}: not CloudVolume's bytes");
            }
            std::fs::write(dir.join(&key), encoded).unwrap();
        }
        let vol = Precomputed::open(store.clone()).await.unwrap();
        let data = read_whole(&vol).await.unwrap();
        assert!(data.data == expected(layer), "{layer}: re-encoded shards");
    }
}

/// The sharding of new image scales is igneous's (`create_sharded_image_info`), and the shard
/// extent CloudVolume derives from it, on sizes from a few chunks to petascale.
#[test]
fn new_scale_sharding_follows_igneous() {
    use cuboids::formats::precomputed::sharding::{
        igneous_image_spec, image_shard_shape, ShardingSpec,
    };
    let path = fixtures().join("cloudvolume_sharded/igneous_specs.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert!(cases.len() >= 10);
    let vec3 = |v: &serde_json::Value| -> [usize; 3] { serde_json::from_value(v.clone()).unwrap() };
    for case in &cases {
        let (size, chunk) = (vec3(&case["size"]), vec3(&case["chunk"]));
        let bytes = case["bytes_per_voxel"].as_u64().unwrap() as usize;
        let target = case["shard_bytes"].as_u64().unwrap();
        let ours = igneous_image_spec(size, chunk, bytes, target).unwrap();
        let theirs = ShardingSpec::parse(&case["spec"]).unwrap();
        assert_eq!(
            ours, theirs,
            "{size:?} chunks {chunk:?}, {bytes} B/voxel, {target} B"
        );
        assert_eq!(
            image_shard_shape(&ours, size, chunk),
            vec3(&case["shard_shape"]),
            "shard shape of {size:?} chunks {chunk:?}"
        );
    }
    // Chunk ids that need more than 64 bits: no sharding, a clear error.
    let e = igneous_image_spec([1 << 40, 1 << 40, 1 << 40], [1, 1, 1], 1, 1 << 30).unwrap_err();
    assert!(e.contains("over 64"), "{e}");
}

/// `downsample --sharded` writes each new mip as shard files (igneous's spec), which read back
/// as tinybrain's pyramid; runs that would split a shard, or rewrite an existing mip, are
/// refused before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downsample_writes_sharded_mips_equal_to_tinybrains() {
    use cuboids::formats::precomputed::sharding::{igneous_image_spec, ShardingSpec};
    use cuboids::task::downsample::{downsample, Bounds, Compute, DownsampleOptions};
    let gpu = Compute::Gpu(common::gpu_arc());
    for (source, layer) in [
        ("cloudvolume", "image"),
        ("cloudvolume", "segmentation"),
        ("cloudvolume_sharded", "image"),
    ] {
        let (_temp, dir) = fixture_copy(&format!("{source}/{layer}"));
        let vol = open_dir(&dir).await;
        let opts = DownsampleOptions {
            num_mips: 2,
            sharded: true,
            ..Default::default()
        };
        downsample(gpu.clone(), &vol, &opts).await.unwrap();
        let vol = open_dir(&dir).await;
        for mip in 1..=2 {
            let scale = vol.scale(mip);
            let spec = ShardingSpec::parse(scale.sharding.as_ref().unwrap()).unwrap();
            let bytes = vol.info.data_type.size();
            let igneous = igneous_image_spec(scale.size, scale.chunk_size(), bytes, 3_500_000_000);
            assert_eq!(
                spec,
                igneous.unwrap(),
                "{layer} mip {mip}: igneous's sharding"
            );
            let files = common::files_under(&dir.join(&scale.key));
            assert!(!files.is_empty() && files.iter().all(|f| f.ends_with(".shard")));
            let whole = Box3::from_shape(scale.size);
            let (data, _) = vol.read_region(mip, whole, false).await.unwrap();
            let golden = fixtures()
                .join("cloudvolume")
                .join(format!("{layer}.mip{mip}.raw"));
            assert!(
                data.data == std::fs::read(golden).unwrap(),
                "{source} {layer} mip {mip}: sharded mip differs from tinybrain's"
            );
        }
    }

    // --gzip-level 0: raw shard data, the same mips.
    let (_temp, dir) = fixture_copy("cloudvolume/image");
    let vol = open_dir(&dir).await;
    let raw = DownsampleOptions {
        num_mips: 1,
        sharded: true,
        write: WriteOptions { gzip_level: 0 },
        ..Default::default()
    };
    downsample(gpu.clone(), &vol, &raw).await.unwrap();
    let vol = open_dir(&dir).await;
    let spec = ShardingSpec::parse(vol.scale(1).sharding.as_ref().unwrap()).unwrap();
    assert!(!spec.gzip_data);
    let (data, _) = vol
        .read_region(1, Box3::from_shape(vol.scale(1).size), false)
        .await
        .unwrap();
    let golden = fixtures().join("cloudvolume/image.mip1.raw");
    assert!(
        data.data == std::fs::read(golden).unwrap(),
        "raw shard data"
    );

    // Bounds that cut a shard, and a mip that exists: named errors, nothing written.
    let (_temp, dir) = fixture_copy("cloudvolume/image");
    let before = common::files_under(&dir);
    let vol = open_dir(&dir).await;
    let cut = DownsampleOptions {
        num_mips: 1,
        sharded: true,
        bounds: Some(Bounds {
            start: [3, 100, 7],
            stop: [35, 132, 18],
        }),
        ..Default::default()
    };
    let e = downsample(gpu.clone(), &vol, &cut).await.unwrap_err();
    assert!(e.to_string().contains("whole shards"), "{e}");
    assert_eq!(common::files_under(&dir), before);
    let plain = DownsampleOptions {
        num_mips: 1,
        ..Default::default()
    };
    downsample(gpu.clone(), &vol, &plain).await.unwrap();
    let vol = open_dir(&dir).await;
    let again = DownsampleOptions {
        num_mips: 2,
        sharded: true,
        ..Default::default()
    };
    let e = downsample(gpu, &vol, &again).await.unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");
}

/// A plan of a sharded pyramid: tasks hold whole shards of every mip (each shard covering at
/// most a task's source), and run one by one in shuffled order, as Batch children would, they
/// write mips equal to an unsharded single run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_sharded_pyramids_equal_one_unsharded_run() {
    use cuboids::dtype::DataType;
    use cuboids::formats::precomputed::info::{Encoding, LayerType};
    use cuboids::runtime::local::{new_info, write_new_volume};
    use cuboids::task::downsample::{downsample, split_bounds, Compute, DownsampleOptions};
    let gpu = Compute::Gpu(common::gpu_arc());
    let temp = tempfile::tempdir().unwrap();
    let input = common::random_volume(&mut common::Rng::new(7), DataType::Uint8, [500, 300, 20], 1);
    let mut info = new_info(
        LayerType::Image,
        DataType::Uint8,
        input.shape,
        [32, 32, 8],
        [4.0, 4.0, 40.0],
    );
    info.scales[0].encoding = Encoding::Raw;
    info.scales[0].voxel_offset = [7, -5, 3];
    let open = |dir: PathBuf| async move { open_dir(&dir).await };
    let (plain, sharded) = (temp.path().join("plain"), temp.path().join("sharded"));
    for dir in [&plain, &sharded] {
        write_new_volume(dir, info.clone(), &input, WriteOptions::default())
            .await
            .unwrap();
    }
    let base = DownsampleOptions {
        num_mips: 3,
        ..Default::default()
    };
    downsample(gpu.clone(), &open(plain.clone()).await, &base)
        .await
        .unwrap();

    let part_bytes = 256 << 10;
    let opts = DownsampleOptions {
        sharded: true,
        shard_source_bytes: Some(part_bytes as u64),
        ..base.clone()
    };
    let vol = open(sharded.clone()).await;
    let mut parts = split_bounds(&vol.info, &opts, part_bytes).unwrap();
    assert!(parts.len() >= 4, "{} parts", parts.len());
    let mut rng = common::Rng::new(11);
    for i in (1..parts.len()).rev() {
        parts.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for bounds in parts {
        let task = DownsampleOptions {
            bounds: Some(bounds),
            ..opts.clone()
        };
        downsample(gpu.clone(), &open(sharded.clone()).await, &task)
            .await
            .unwrap();
    }
    let (a, b) = (open(plain).await, open(sharded.clone()).await);
    for mip in 1..=3 {
        assert!(b.scale(mip).sharding.is_some());
        let shards = common::files_under(&sharded.join(&b.scale(mip).key));
        assert!(shards.iter().all(|f| f.ends_with(".shard")));
        let whole = Box3::from_shape(a.scale(mip).size);
        let (x, _) = a.read_region(mip, whole, false).await.unwrap();
        let (y, _) = b.read_region(mip, whole, false).await.unwrap();
        assert!(x.data == y.data, "mip {mip} ({} shards)", shards.len());
    }
}

/// A sharded run that fails partway (a damaged source chunk in its last tile) removes the shard
/// files it had written, and leaves the info as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sharded_run_leaves_no_shards() {
    use cuboids::dtype::DataType;
    use cuboids::formats::precomputed::info::LayerType;
    use cuboids::runtime::local::{new_info, write_new_volume};
    use cuboids::task::downsample::{downsample, DownsampleOptions};
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("vol");
    let input = common::random_volume(&mut common::Rng::new(5), DataType::Uint8, [256, 64, 8], 1);
    let info = new_info(
        LayerType::Image,
        DataType::Uint8,
        input.shape,
        [32, 32, 8],
        [4.0, 4.0, 40.0],
    );
    write_new_volume(&dir, info, &input, WriteOptions::default())
        .await
        .unwrap();
    let opts = DownsampleOptions {
        num_mips: 1,
        tile_bytes: 1,
        sharded: true,
        // One mip-1 chunk per shard: shards are written as tiles finish.
        shard_source_bytes: Some(4 * 32 * 32 * 8),
        ..Default::default()
    };
    let good = files(&dir);

    // Undamaged, the run writes four shards.
    let (_t, copy) = (tempfile::tempdir().unwrap(), temp.path().join("copy"));
    cuboids::runtime::local::copy_tree(&dir, &copy).unwrap();
    downsample(Compute::Cpu, &open_dir(&copy).await, &opts)
        .await
        .unwrap();
    assert_eq!(common::files_under(&copy.join("8_8_40")).len(), 4);

    let last = dir.join("4_4_40/224-256_32-64_0-8.gz");
    std::fs::write(&last, cuboids::formats::precomputed::gzip(&[1u8; 10], 6)).unwrap();
    let before = files(&dir);
    let e = downsample(Compute::Cpu, &open_dir(&dir).await, &opts)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("224-256_32-64_0-8"), "{e}");
    assert!(
        files(&dir) == before,
        "shards of the failed run were left behind"
    );
    assert!(before.len() == good.len());
}

/// CloudVolume itself (12.15.2, from the test venv that scripts/test makes: CUBOIDS_TEST_PYTHON)
/// reads the sharded mips cuboids writes, voxel for voxel equal to tinybrain's pyramid
/// (tests/fixtures/check_cloudvolume_reads_sharded.py).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudvolume_reads_the_sharded_mips_cuboids_writes() {
    use cuboids::task::downsample::{downsample, DownsampleOptions};
    let python = std::env::var("CUBOIDS_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = fixtures().join("check_cloudvolume_reads_sharded.py");
    for layer in ["image", "segmentation"] {
        let (_temp, dir) = fixture_copy(&format!("cloudvolume/{layer}"));
        let opts = DownsampleOptions {
            num_mips: 2,
            sharded: true,
            ..Default::default()
        };
        downsample(
            Compute::Gpu(common::gpu_arc()),
            &open_dir(&dir).await,
            &opts,
        )
        .await
        .unwrap();
        let run = std::process::Command::new(&python)
            .arg(&script)
            .arg(&dir)
            .arg(layer)
            .output()
            .unwrap_or_else(|e| panic!("{python} (scripts/test makes the venv): {e}"));
        assert!(
            run.status.success(),
            "{layer}: CloudVolume did not read cuboids' shards as tinybrain's mips:\n{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        let out = String::from_utf8_lossy(&run.stdout);
        assert_eq!(out.matches("equal to tinybrain's").count(), 2, "{out}");
    }
}

/// Issue 13's memory bound: a 4-mip sharded pyramid in one run holds its tiles in flight and the
/// shards still open, not the volume. Run as the Batch job definition runs it
/// (`MALLOC_MMAP_THRESHOLD_` set: without it glibc's rising mmap threshold makes peak RSS creep
/// with the number of tiles, see the README). The control, the whole volume as one tile and one
/// shard per mip, shows that the measure sees a volume-sized buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_pyramid_memory_is_bounded_by_its_tiles_not_the_volume() {
    use cuboids::dtype::DataType;
    use cuboids::formats::precomputed::info::LayerType;
    use cuboids::runtime::local::{new_info, write_new_volume};
    let temp = tempfile::tempdir().unwrap();
    let raw = WriteOptions { gzip_level: 0 };
    // 16 MiB and 64 MiB of uint8 in 16^3 chunks: a 4-mip tile can be 256x256x16 (1 MiB).
    let mut volumes = Vec::new();
    for depth in [64, 256] {
        let shape = [512, 512, depth];
        let data = common::random_volume(
            &mut common::Rng::new(depth as u64),
            DataType::Uint8,
            shape,
            1,
        );
        let info = new_info(
            LayerType::Image,
            DataType::Uint8,
            shape,
            [16, 16, 16],
            [4.0, 4.0, 40.0],
        );
        let dir = temp.path().join(format!("z{depth}"));
        write_new_volume(&dir, info, &data, raw).await.unwrap();
        volumes.push(dir);
    }
    let peak = |dir: &Path, tile_mib: u64, shard_source_mib: u64| {
        let task = serde_json::json!({
            "kind": "downsample",
            "location": dir.to_str().unwrap(),
            "num_mips": 4,
            "sharded": true,
            "gzip_level": 0,
            "tile_mib": tile_mib,
            "shard_source_mib": shard_source_mib,
        });
        let task_file = temp.path().join("task.json");
        std::fs::write(&task_file, task.to_string()).unwrap();
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_cuboids"))
            .args(["run-task", task_file.to_str().unwrap()])
            .env("CUBOIDS_LOG_FORMAT", "text")
            .env("MALLOC_MMAP_THRESHOLD_", "1048576")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "{text}");
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        doc["peak_rss_bytes"]
            .as_u64()
            .expect("peak_rss_bytes on Linux")
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let bounded: Vec<u64> = volumes.iter().map(|d| peak(d, 1, 2)).collect();
    for dir in &volumes {
        // Mips 1-4 again, from scratch.
        let info_path = dir.join("info");
        let mut info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&info_path).unwrap()).unwrap();
        for scale in info["scales"].as_array().unwrap().iter().skip(1) {
            std::fs::remove_dir_all(dir.join(scale["key"].as_str().unwrap())).unwrap();
        }
        info["scales"].as_array_mut().unwrap().truncate(1);
        std::fs::write(&info_path, info.to_string()).unwrap();
    }
    let whole: Vec<u64> = volumes.iter().map(|d| peak(d, 1024, 4096)).collect();
    let grew = |p: &[u64]| mib(p[1]) - mib(p[0]);
    // 48 MiB more source: the whole-volume run must show most of it, the tiled run little.
    assert!(
        grew(&whole) > 32.0,
        "control: one tile of the whole volume peaked at {:.0} then {:.0} MiB",
        mib(whole[0]),
        mib(whole[1])
    );
    assert!(
        grew(&bounded) < 12.0,
        "tiled sharded pyramid peaked at {:.0} MiB for 16 MiB of source and {:.0} MiB for 64 MiB",
        mib(bounded[0]),
        mib(bounded[1])
    );
}
