//! Boss cuboids against python-blosc frames and the Boss key scheme (tests/fixtures/boss, made by
//! make_fixtures.py with python-blosc 1.11.3).

mod common;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, Projection, ProjectionType, ScalarAttributeType,
};
use cuboids::dtype::DataType;
use cuboids::formats::boss::{decode_cuboid, encode_cuboid, morton, CuboidId, CUBOID};
use cuboids::store::boss_index::S3Index;
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

fn key(name: &str, kind: KeyType) -> KeySchemaElement {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .unwrap()
}

fn attr(name: &str, kind: ScalarAttributeType) -> AttributeDefinition {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(kind)
        .build()
        .unwrap()
}

/// The Boss's s3index table: HASH object-key, RANGE version-node, GSI lookup-key-index.
async fn create_s3_index(client: &aws_sdk_dynamodb::Client, table: &str) {
    client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("object-key", ScalarAttributeType::S))
        .attribute_definitions(attr("version-node", ScalarAttributeType::N))
        .attribute_definitions(attr("lookup-key", ScalarAttributeType::S))
        .key_schema(key("object-key", KeyType::Hash))
        .key_schema(key("version-node", KeyType::Range))
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name("lookup-key-index")
                .key_schema(key("lookup-key", KeyType::Hash))
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::KeysOnly)
                        .build(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_entries_are_written_like_the_boss_and_never_overwritten() {
    let server = common::S3Server::start();
    let sdk = server.sdk_config().await;
    let client = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&sdk)
            .endpoint_url(&server.endpoint)
            .build(),
    );
    let table = "s3index.test.boss";
    create_s3_index(&client, table).await;
    let index = S3Index::new(&sdk, Some(server.endpoint.clone()), table);
    let id = CuboidId {
        collection: 51,
        experiment: 134,
        channel: 1024,
        resolution: 3,
        time: 0,
        index: [5, 3, 1],
        iso: false,
    };
    index.ensure_entry(&id).await.unwrap();
    index.ensure_entry(&id).await.unwrap();
    let item = client
        .get_item()
        .table_name(table)
        .key("object-key", AttributeValue::S(id.object_key()))
        .key("version-node", AttributeValue::N("0".into()))
        .send()
        .await
        .unwrap()
        .item
        .expect("the entry exists");
    let s = |k: &str| item[k].as_s().unwrap().clone();
    assert_eq!(
        s("object-key"),
        format!("{}&51&134&1024&3&0&87", md5_of("51&134&1024&3&0&87"))
    );
    assert_eq!(s("ingest-job-hash"), "51");
    assert_eq!(s("ingest-job-range"), "134&1024&3&0");
    let lookup = s("lookup-key");
    let (prefix, shard) = lookup.split_once('#').unwrap();
    assert_eq!(prefix, "51&134&1024&3");
    assert!(shard.parse::<u32>().unwrap() < 100);

    // An entry an ingest job wrote first is left as it is.
    let other = CuboidId {
        index: [0, 0, 0],
        ..id
    };
    let mut ingest = cuboids::store::boss_index::index_item(&other);
    ingest.insert(
        "ingest-job-range".into(),
        AttributeValue::S("134&1024&3&77".into()),
    );
    client
        .put_item()
        .table_name(table)
        .set_item(Some(ingest))
        .send()
        .await
        .unwrap();
    index.ensure_entry(&other).await.unwrap();
    let kept = client
        .get_item()
        .table_name(table)
        .key("object-key", AttributeValue::S(other.object_key()))
        .key("version-node", AttributeValue::N("0".into()))
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    assert_eq!(kept["ingest-job-range"].as_s().unwrap(), "134&1024&3&77");

    // A missing table is an error naming the table and the cuboid.
    let err = S3Index::new(&sdk, Some(server.endpoint.clone()), "no-such-table")
        .ensure_entry(&id)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("no-such-table") && text.contains(&id.object_key()),
        "{text}"
    );
}

fn md5_of(s: &str) -> String {
    use md5::{Digest, Md5};
    format!("{:x}", Md5::digest(s.as_bytes()))
}
