//! Decoders against damaged and hostile bytes: gzip chunks, compressed_segmentation, Blosc
//! frames (Boss cuboids), `info` documents and task documents.
//!
//! Each decoder gets valid inputs (which must round-trip) and a bounded number of mutants of
//! them (bits flipped, bytes overwritten, truncated, extended, spliced) and random bytes. A
//! decoder may accept a mutant (gzip and Blosc carry checksums, raw chunks do not) but must then
//! return data of the size asked for; otherwise it must return an error that names what it
//! read. It must never panic, and a header that claims a huge size must be an error, not an
//! allocation of that size. Deterministic: the same cases every run.

use cuboids::dtype::DataType;
use cuboids::formats::precomputed::info::{Info, Scale};
use cuboids::formats::precomputed::{decode_chunk, encode_chunk, Precomputed, WriteOptions};
use cuboids::formats::{blosc, boss};
use cuboids::store::{ContentEncoding, LocalStore};
use cuboids::task::spec::Task;
use cuboids::volume::Volume;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Mutants per valid input.
const MUTANTS: usize = 400;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A damaged copy of `valid`, by one of the ways bytes get damaged in storage and transit, or
/// random bytes.
fn mutate(valid: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut m = valid.to_vec();
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        let len = m.len();
        match rng.below(8) {
            0 if len > 0 => {
                let at = rng.below(len);
                m[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                m[at] = rng.next() as u8;
            }
            2 => m.truncate(rng.below(len + 1)),
            3 => {
                let extra = rng.below(64);
                m.extend((0..extra).map(|_| rng.next() as u8));
            }
            4 if len > 8 => {
                // A word set to an extreme: lengths, offsets and counts in headers.
                let at = rng.below(len - 4);
                let word: u32 = [0, 1, u32::MAX, 0x8000_0000, 0xff_ffff][rng.below(5)];
                m[at..at + 4].copy_from_slice(&word.to_le_bytes());
            }
            5 if len > 2 => {
                // A slice copied over another part (a misplaced block).
                let (from, to) = (rng.below(len), rng.below(len));
                let n = rng.below(len - from.max(to)).min(256);
                m.copy_within(from..from + n, to);
            }
            6 => {
                let at = rng.below(len + 1);
                m.insert(at, rng.next() as u8);
            }
            _ => {
                m = (0..rng.below(256)).map(|_| rng.next() as u8).collect();
            }
        }
    }
    m
}

/// Runs `decode` on `input`; a panic fails the test with the input's first bytes to reproduce.
fn must_not_panic<T>(what: &str, input: &[u8], decode: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(decode)) {
        Ok(v) => v,
        Err(_) => panic!(
            "{what} panicked on {} bytes starting {:02x?}",
            input.len(),
            &input[..input.len().min(64)]
        ),
    }
}

fn scale_of(encoding: &str, shape: [usize; 3]) -> Scale {
    serde_json::from_value(serde_json::json!({
        "key": "8_8_8",
        "size": shape,
        "resolution": [8, 8, 8],
        "voxel_offset": [0, 0, 0],
        "chunk_sizes": [shape],
        "encoding": encoding,
        "compressed_segmentation_block_size": [8, 8, 8],
    }))
    .unwrap()
}

/// Labels with runs and many distinct values per 8^3 block (large tables, wide indices).
fn labels(dtype: DataType, shape: [usize; 3], rng: &mut Rng) -> Volume {
    let n = shape[0] * shape[1] * shape[2];
    let size = dtype.size();
    let mut data = Vec::with_capacity(n * size);
    let mut value = 0u64;
    for i in 0..n {
        if i % 7 == 0 || rng.below(3) == 0 {
            value = rng.next() >> rng.below(64);
        }
        data.extend_from_slice(&value.to_le_bytes()[..size]);
    }
    Volume::from_bytes(dtype, shape, 1, data).unwrap()
}

#[test]
fn stored_chunks_round_trip_and_damaged_ones_fail_naming_the_chunk() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let shape = [20, 16, 9]; // partial compressed_segmentation blocks on every axis
    let cases = [
        ("raw", DataType::Uint8, 6),
        ("raw", DataType::Float32, 1),
        ("compressed_segmentation", DataType::Uint64, 0),
        ("compressed_segmentation", DataType::Uint32, 6),
        ("compressed_segmentation", DataType::Uint64, 9),
    ];
    let mut errors = 0;
    for (encoding, dtype, gzip_level) in cases {
        let scale = scale_of(encoding, shape);
        let vol = labels(dtype, shape, &mut rng);
        let (stored, content) = encode_chunk(&vol, &scale, WriteOptions { gzip_level }).unwrap();
        let key = "8_8_8/0-20_0-16_0-9";
        let back = decode_chunk(key, stored.clone(), content, &scale, dtype, 1, shape).unwrap();
        assert!(back == vol, "{encoding} {dtype:?}: round trip");
        for _ in 0..MUTANTS {
            let bad = mutate(&stored, &mut rng);
            let result = must_not_panic(encoding, &bad, || {
                decode_chunk(key, bad.clone(), content, &scale, dtype, 1, shape)
            });
            match result {
                Ok(v) => assert_eq!(v.data.len(), vol.data.len(), "{encoding}: wrong size"),
                Err(e) => {
                    errors += 1;
                    assert!(e.to_string().contains(key), "{encoding}: {e}");
                }
            }
        }
    }
    assert!(
        errors > MUTANTS,
        "most damaged chunks are errors ({errors})"
    );
}

/// A gzip stream that inflates to `inflated` zero bytes, written without holding them.
fn gzip_bomb(inflated: usize) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..inflated >> 20 {
        gz.write_all(&zeros).unwrap();
    }
    gz.finish().unwrap()
}

#[test]
fn a_chunk_that_inflates_past_its_size_is_an_error_not_an_allocation() {
    let shape = [64, 64, 64];
    let scale = scale_of("raw", shape);
    // 512 MiB of zeros in ~0.5 MB of gzip, where the chunk holds 256 KiB.
    let bomb = gzip_bomb(512 << 20);
    assert!(bomb.len() < 2 << 20, "{} bytes", bomb.len());
    let peak_rss_bytes = || cuboids::runtime::executor::peak_rss_bytes().unwrap_or(0);
    let before = peak_rss_bytes();
    let err = decode_chunk(
        "bomb",
        bomb,
        ContentEncoding::Gzip,
        &scale,
        DataType::Uint8,
        1,
        shape,
    )
    .unwrap_err();
    let grew = peak_rss_bytes().saturating_sub(before);
    assert!(err.to_string().contains("bomb"), "{err}");
    assert!(
        format!("{err:?}").contains("more than"),
        "the error says why: {err:?}"
    );
    assert!(
        grew < 64 << 20,
        "decoding grew the peak RSS by {} MiB",
        grew >> 20
    );
}

#[test]
fn blosc_cuboids_round_trip_and_damaged_frames_are_errors() {
    let mut rng = Rng(0x51ed_2701_aa55_0f0f);
    for dtype in [DataType::Uint8, DataType::Uint16, DataType::Uint64] {
        let vol = labels(dtype, boss::CUBOID, &mut rng);
        let frame = boss::encode_cuboid(&vol).unwrap();
        assert!(boss::decode_cuboid(&frame, dtype).unwrap() == vol);
        for _ in 0..MUTANTS {
            let bad = mutate(&frame, &mut rng);
            let result = must_not_panic("blosc", &bad, || boss::decode_cuboid(&bad, dtype));
            if let Ok(v) = result {
                assert_eq!(v.data.len(), vol.data.len());
            }
        }
    }
    // A header that claims far more bytes than the frame holds, or than expected.
    let frame = blosc::compress(&[7u8; 4096], 1).unwrap();
    let mut huge = frame.clone();
    huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes()); // nbytes
    assert!(blosc::decompress(&huge, 4096).is_err());
    assert!(blosc::decompress(&frame, 4095).is_err());
}

fn info_json() -> String {
    serde_json::json!({
        "type": "segmentation",
        "data_type": "uint64",
        "num_channels": 1,
        "scales": [
            {
                "key": "8_8_8",
                "size": [100, 80, 40],
                "resolution": [8, 8, 8],
                "voxel_offset": [0, 0, 0],
                "chunk_sizes": [[64, 64, 32]],
                "encoding": "compressed_segmentation",
                "compressed_segmentation_block_size": [8, 8, 8]
            },
            {
                "key": "16_16_8",
                "size": [50, 40, 40],
                "resolution": [16, 16, 8],
                "voxel_offset": [0, 0, 0],
                "chunk_sizes": [[64, 64, 32]],
                "encoding": "raw"
            }
        ]
    })
    .to_string()
}

/// Opens a volume whose info is `bytes`; then plans its chunks as every command does.
fn open_info(
    dir: &std::path::Path,
    bytes: &[u8],
    rt: &tokio::runtime::Runtime,
) -> Result<(), String> {
    std::fs::write(dir.join("info"), bytes).unwrap();
    let vol = rt
        .block_on(Precomputed::open(Arc::new(LocalStore::new(dir))))
        .map_err(|e| e.to_string())?;
    for (mip, scale) in vol.info.scales.iter().enumerate() {
        let whole = cuboids::geometry::Box3::from_shape(scale.size);
        let chunks = scale.size[0].div_ceil(scale.chunk_size()[0])
            * scale.size[1].div_ceil(scale.chunk_size()[1])
            * scale.size[2].div_ceil(scale.chunk_size()[2]);
        if chunks <= 1 << 16 {
            assert_eq!(vol.chunks_in(mip, whole).len(), chunks);
        }
    }
    Ok(())
}

#[test]
fn damaged_info_documents_are_named_errors() {
    let mut rng = Rng(0x0dd_ba11_cafe_f00d);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let valid = info_json();
    let info: Info = serde_json::from_str(&valid).unwrap();
    assert_eq!(info.scales.len(), 2);
    open_info(dir.path(), valid.as_bytes(), &rt).unwrap();
    let mut errors = 0;
    for _ in 0..MUTANTS {
        let bad = mutate(valid.as_bytes(), &mut rng);
        let result = must_not_panic("info", &bad, || open_info(dir.path(), &bad, &rt));
        if let Err(e) = result {
            errors += 1;
            assert!(
                e.contains("info") || e.contains(&*dir.path().to_string_lossy()),
                "{e}"
            );
        }
    }
    assert!(errors > MUTANTS / 2, "{errors}");
    // Values that parse but cannot be a volume: each named by its field.
    for (field, value, named) in [
        (
            "size",
            serde_json::json!([1u64 << 40, 1u64 << 40, 1]),
            "size",
        ),
        (
            "chunk_sizes",
            serde_json::json!([[1u64 << 30, 1u64 << 20, 1]]),
            "chunk_sizes",
        ),
        (
            "chunk_sizes",
            serde_json::json!([[0, 64, 64]]),
            "chunk_sizes",
        ),
        ("chunk_sizes", serde_json::json!([]), "chunk_sizes"),
        ("size", serde_json::json!([100, 0, 40]), "size"),
        ("resolution", serde_json::json!([8, -1, 8]), "resolution"),
    ] {
        let mut doc: serde_json::Value = serde_json::from_str(&valid).unwrap();
        doc["scales"][0][field] = value.clone();
        let e = open_info(dir.path(), doc.to_string().as_bytes(), &rt).unwrap_err();
        assert!(e.contains(named), "{field} = {value}: {e}");
    }
}

#[test]
fn damaged_task_documents_are_errors() {
    let mut rng = Rng(0xfeed_beef_1234_5678);
    let valid = [
        r#"{"kind":"downsample","location":"s3://bucket/volume","mip":0,"num_mips":3}"#,
        r#"{"kind":"segment","affinity":"/data/aff","output":"/data/seg","threshold":0.7,"chunk_size":[256,256,64]}"#,
        r#"{"kind":"connected-components","input":"/data/p","output":"/data/cc","threshold":0.5,"connectivity":26,"dust":100}"#,
    ];
    for text in valid {
        let task = Task::from_json(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert!(!task.describe().is_empty());
        for _ in 0..MUTANTS {
            let bad = mutate(text.as_bytes(), &mut rng);
            let bad_text = String::from_utf8_lossy(&bad).into_owned();
            must_not_panic("task", &bad, || {
                if let Ok(t) = Task::from_json(&bad_text) {
                    t.describe();
                }
            });
        }
    }
}

/// Damaged shard files (CloudVolume's, tests/fixtures/make_sharded_fixtures.py): reading the
/// whole volume never panics, gives the volume's size when it succeeds, and otherwise an error
/// that names the shard file or the chunk.
#[test]
fn damaged_shard_files_are_named_errors() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rng = Rng(0x5ba4_d0c5);
    for layer in ["image", "segmentation"] {
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/cloudvolume_sharded")
            .join(layer);
        let valid = std::fs::read(fixture.join("8_8_40/0.shard")).unwrap();
        let temp = tempfile::tempdir().unwrap();
        cuboids::runtime::local::copy_tree(&fixture, temp.path()).unwrap();
        let vol = rt
            .block_on(Precomputed::open(Arc::new(LocalStore::new(temp.path()))))
            .unwrap();
        let whole = cuboids::geometry::Box3::from_shape(vol.scale(0).size);
        for _ in 0..MUTANTS / 4 {
            let damaged = mutate(&valid, &mut rng);
            std::fs::write(temp.path().join("8_8_40/0.shard"), &damaged).unwrap();
            // A fresh handle: no minishard index cached from the last mutant.
            let vol = Precomputed::new(vol.store.clone(), vol.info.clone());
            let read = must_not_panic("a shard read", &damaged, || {
                rt.block_on(vol.read_region(0, whole, true))
            });
            match read {
                Ok((data, _)) => assert_eq!(data.shape, whole.shape()),
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.contains("8_8_40/"), "{layer}: an unnamed error: {e}");
                }
            }
        }
    }
}
