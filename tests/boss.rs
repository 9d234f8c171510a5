//! Boss cuboids against python-blosc frames and the Boss key scheme (tests/fixtures/boss, made by
//! make_fixtures.py with python-blosc 1.11.3).

use cuboids::dtype::DataType;
use cuboids::formats::boss::{decode_cuboid, encode_cuboid, morton, CuboidId, CUBOID};
use cuboids::volume::Volume;
use serde_json::Value;
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/boss")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The cuboid make_fixtures.py's `boss_pattern` computes, x fastest.
fn pattern(dtype: DataType) -> Volume {
    let mut data = Vec::new();
    for z in 0..16u64 {
        for y in 0..512u64 {
            for x in 0..512u64 {
                let mut v = (x * 3 + y * 5 + z * 7) % 251;
                if (x * 7 + y * 13 + z * 17) % 1009 == 0 {
                    v = v * 977 + 12345;
                }
                match dtype {
                    DataType::Uint8 => data.push((v % 256) as u8),
                    DataType::Uint16 => data.extend(((v % 65536) as u16).to_le_bytes()),
                    _ => data.extend((v + (z << 40)).to_le_bytes()),
                }
            }
        }
    }
    Volume::from_bytes(dtype, CUBOID, 1, data).unwrap()
}

#[test]
fn python_blosc_frames_decode_and_ours_are_identical() {
    let manifest: Value = serde_json::from_slice(&fixture("manifest.json")).unwrap();
    for frame in manifest["frames"].as_array().unwrap() {
        let dtype = DataType::parse(frame["dtype"].as_str().unwrap()).unwrap();
        let golden = fixture(frame["file"].as_str().unwrap());
        let expected = pattern(dtype);
        assert!(
            decode_cuboid(&golden, dtype).unwrap() == expected,
            "{dtype}: python-blosc frame decodes wrong"
        );
        let ours = encode_cuboid(&expected).unwrap();
        assert!(
            ours == golden,
            "{dtype}: our frame differs from python-blosc's ({} vs {} bytes)",
            ours.len(),
            golden.len()
        );
    }
}

#[test]
fn keys_match_the_boss() {
    let manifest: Value = serde_json::from_slice(&fixture("manifest.json")).unwrap();
    let keys = manifest["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 4);
    for k in keys {
        let index: Vec<usize> = k["index"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let id = CuboidId {
            collection: k["collection"].as_u64().unwrap(),
            experiment: k["experiment"].as_u64().unwrap(),
            channel: k["channel"].as_u64().unwrap(),
            resolution: k["resolution"].as_u64().unwrap() as u32,
            time: k["time"].as_u64().unwrap(),
            index: [index[0], index[1], index[2]],
            iso: k["iso"].as_bool().unwrap(),
        };
        assert_eq!(morton(id.index), k["morton"].as_u64().unwrap());
        assert_eq!(id.s3_key(), k["key"].as_str().unwrap());
    }
}

#[test]
fn wrong_cuboids_are_refused() {
    let golden = fixture("uint16.blosc");
    let err = decode_cuboid(&golden, DataType::Uint8)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("decompresses to 8388608 bytes, expected 4194304"),
        "{err}"
    );
    let err = decode_cuboid(&golden[..golden.len() - 100], DataType::Uint16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Blosc-1"), "{err}");
    let err = decode_cuboid(&golden, DataType::Float32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("uint8, uint16 or uint64"), "{err}");
    let small = Volume::zeros(DataType::Uint8, [64, 64, 16], 1);
    assert!(encode_cuboid(&small)
        .unwrap_err()
        .to_string()
        .contains("[512, 512, 16]"));
}
