//! Boss cuboids against python-blosc frames and the Boss key scheme (tests/fixtures/boss, made by
//! make_fixtures.py with python-blosc 1.11.3).

mod common;

use aws_sdk_dynamodb::types::AttributeValue;
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

/// The S3 index entry of a cuboid, if any.
async fn index_entry(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    id: &CuboidId,
) -> Option<std::collections::HashMap<String, AttributeValue>> {
    client
        .get_item()
        .table_name(table)
        .key("object-key", AttributeValue::S(id.object_key()))
        .key("version-node", AttributeValue::N("0".into()))
        .send()
        .await
        .unwrap()
        .item
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
    common::create_s3_index(&client, table).await;
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
    let item = index_entry(&client, table, &id)
        .await
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
    let kept = index_entry(&client, table, &other).await.unwrap();
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

mod step {
    use super::*;
    use cuboids::geometry::mul3;
    use cuboids::ops::downsample::{downsample_cpu, Factor, Method};
    use cuboids::store::{ContentEncoding, Store};
    use cuboids::task::boss_downsample::{run_step, BossTarget};
    use serde_json::json;
    use std::sync::Arc;

    const SHAPE: [usize; 3] = [1536, 1024, 32];

    /// A moto server with the test bucket, the Boss's s3index table and the target on them.
    struct Env {
        server: common::S3Server,
        store: Arc<dyn Store>,
        ddb: aws_sdk_dynamodb::Client,
        target: BossTarget,
    }

    async fn env() -> Env {
        let server = common::S3Server::start();
        let sdk = server.sdk_config().await;
        let store: Arc<dyn Store> = Arc::new(server.store("cuboids.test.boss", "").await);
        let ddb = aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::config::Builder::from(&sdk)
                .endpoint_url(&server.endpoint)
                .build(),
        );
        common::create_s3_index(&ddb, "s3index.test.boss").await;
        let target = BossTarget {
            store: store.clone(),
            index: S3Index::new(&sdk, Some(server.endpoint.clone()), "s3index.test.boss"),
        };
        Env {
            server,
            store,
            ddb,
            target,
        }
    }

    fn channel_volume() -> Volume {
        common::boss_channel_volume(SHAPE)
    }

    fn id(resolution: u32, index: [usize; 3], iso: bool) -> CuboidId {
        common::boss_cuboid_id(resolution, index, iso)
    }

    fn job(resolution: u32) -> serde_json::Value {
        common::boss_job(SHAPE, resolution, "cuboids.test.boss", "s3index.test.boss")
    }

    /// The test channel's cuboids (x=2, z=1) are missing.
    fn missing([x, _, z]: [usize; 3]) -> bool {
        x == 2 && z == 1
    }

    /// The Boss reads missing cuboids as zeros: the reference pads the volume to whole blocks.
    fn expected(vol: &Volume, factor: Factor, out_index: [usize; 3]) -> Volume {
        let padded_shape = [2048, 1024, 32];
        let mut padded = Volume::zeros(DataType::Uint8, padded_shape, 1);
        padded.paste([0; 3], vol, [0; 3], vol.shape);
        let level = &downsample_cpu(&padded, Method::Average, factor, 1).unwrap()[0];
        level.crop(mul3(out_index, CUBOID), CUBOID)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_step_writes_cuboids_index_and_the_next_document() {
        let env = env().await;
        let store = env.store.clone();
        let mut vol = channel_volume();
        // Cuboids (2, y, 1) are missing: they read as zeros, and the (2,2,1) output over them
        // has no input at all, so it is not written.
        for y in 0..2 {
            vol.paste(
                mul3([2, y, 1], CUBOID),
                &Volume::zeros(DataType::Uint8, CUBOID, 1),
                [0; 3],
                CUBOID,
            );
        }
        common::put_boss_cuboids(&*store, &vol, missing).await;
        let ctx = Arc::new(cuboids::gpu::GpuContext::new().unwrap());
        let (next, report) = run_step(ctx, &env.target, &job(0)).await.unwrap();
        assert_eq!((report.written, report.skipped_empty), (5, 1));
        assert_eq!(next["msg"]["resolution"], 1);
        assert_eq!(
            (next["msg"]["x_stop"].clone(), next["msg"]["z_stop"].clone()),
            (json!(768), json!(32))
        );
        assert_eq!(next["msg"]["iso_z_stop"], 16);

        let read = |key: String| {
            let store = store.clone();
            async move {
                store
                    .get(&key)
                    .await
                    .unwrap()
                    .map(|o| decode_cuboid(&o.data, DataType::Uint8).unwrap())
            }
        };
        for (index, iso, factor) in [
            ([0, 0, 0], false, Factor::ANISOTROPIC),
            ([1, 0, 0], false, Factor::ANISOTROPIC),
            ([0, 0, 1], false, Factor::ANISOTROPIC),
            ([0, 0, 0], true, Factor::ISOTROPIC),
            ([1, 0, 0], true, Factor::ISOTROPIC),
        ] {
            let got = read(id(1, index, iso).s3_key()).await.expect("written");
            assert!(
                got == expected(&vol, factor, index),
                "output cuboid {index:?} iso={iso} differs"
            );
            let entry = index_entry(&env.ddb, "s3index.test.boss", &id(1, index, iso)).await;
            assert!(entry.is_some(), "index entry for {index:?} iso={iso}");
        }
        assert!(
            read(id(1, [1, 0, 1], false).s3_key()).await.is_none(),
            "all-missing output not written"
        );

        // The CLI runs the next step from the returned document, configured by the environment.
        let dir = tempfile::tempdir().unwrap();
        let job_path = dir.path().join("job.json");
        std::fs::write(&job_path, serde_json::to_vec(&next).unwrap()).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cuboids"))
            .args(["boss-downsample", "--job", job_path.to_str().unwrap()])
            .envs(env.server.aws_env("AWS_ENDPOINT_URL"))
            .output()
            .unwrap();
        common::assert_success(&out);
        let after: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(after["msg"]["resolution"], 2);
        assert_eq!(after["msg"]["res_lt_max"], true, "2 < resolution_max 4 - 1");
        // The plain DownsampleChannel document is a task as it is (what the activity worker
        // receives): run-task re-runs the step and returns the same next document.
        let again = common::run_task_on_stdin(&next, env.server.aws_env("AWS_ENDPOINT_URL"));
        common::assert_success(&again);
        let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
        assert_eq!(
            again, after,
            "the same step as a task gives the same document"
        );
        let r2 = read(id(2, [0, 0, 0], false).s3_key())
            .await
            .expect("resolution 2 written");
        let level1 = {
            let mut v = Volume::zeros(DataType::Uint8, [1024, 1024, 32], 1);
            for index in [[0, 0, 0], [1, 0, 0], [0, 0, 1]] {
                let c = read(id(1, index, false).s3_key()).await.unwrap();
                v.paste(mul3(index, CUBOID), &c, [0; 3], CUBOID);
            }
            v
        };
        let expected_r2 = downsample_cpu(&level1, Method::Average, Factor::ANISOTROPIC, 1).unwrap()
            [0]
        .crop([0; 3], CUBOID);
        assert!(r2 == expected_r2, "resolution 2 cuboid differs");
        // Above the iso level the ISO pass reads the previous ISO cuboids.
        assert!(
            read(id(2, [0, 0, 0], true).s3_key()).await.is_some(),
            "ISO resolution 2 written"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_and_wrong_size_cuboids_fail_the_step_naming_the_key() {
        let env = env().await;
        let store = env.store.clone();
        let ctx = Arc::new(cuboids::gpu::GpuContext::new().unwrap());
        let mut doc = job(0);
        doc["msg"]["x_stop"] = json!(512);
        doc["msg"]["y_stop"] = json!(512);
        doc["msg"]["z_stop"] = json!(16);
        doc["msg"]["iso_resolution"] = json!(3);
        let key = id(0, [0, 0, 0], false).s3_key();

        let good = encode_cuboid(&Volume::zeros(DataType::Uint8, CUBOID, 1)).unwrap();
        store
            .put(
                &key,
                good[..good.len() / 2].to_vec(),
                ContentEncoding::Identity,
            )
            .await
            .unwrap();
        let err = format!(
            "{:#}",
            anyhow::Error::from(run_step(ctx.clone(), &env.target, &doc).await.unwrap_err())
        );
        assert!(err.contains(&key) && err.contains("Blosc-1"), "{err}");

        let sixteen = encode_cuboid(&Volume::zeros(DataType::Uint16, CUBOID, 1)).unwrap();
        store
            .put(&key, sixteen, ContentEncoding::Identity)
            .await
            .unwrap();
        let err = format!(
            "{:#}",
            anyhow::Error::from(run_step(ctx, &env.target, &doc).await.unwrap_err())
        );
        assert!(
            err.contains(&key) && err.contains("decompresses to 8388608 bytes, expected 4194304"),
            "{err}"
        );
        let output = id(1, [0, 0, 0], false).s3_key();
        assert!(
            store.get(&output).await.unwrap().is_none(),
            "a failed step writes no output"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn annotation_channels_use_mode_pooling() {
        let env = env().await;
        let store = env.store.clone();
        // Blocky labels with ties: 2x2 blocks that disagree exercise every countless branch.
        let mut data = Vec::new();
        for z in 0..16u64 {
            for y in 0..512u64 {
                for x in 0..512u64 {
                    let label = ((x / 3) * 31 + (y / 2) * 17 + z) % 5 + (1 << 40);
                    data.extend(label.to_le_bytes());
                }
            }
        }
        let labels = Volume::from_bytes(DataType::Uint64, CUBOID, 1, data).unwrap();
        store
            .put(
                &id(0, [0, 0, 0], false).s3_key(),
                encode_cuboid(&labels).unwrap(),
                ContentEncoding::Identity,
            )
            .await
            .unwrap();
        let mut doc = job(0);
        // iso_resolution 0: the ISO pass's uint64 2x2x2 block is 256 MiB, over lavapipe's binding.
        for (k, v) in [
            ("x_stop", 512),
            ("y_stop", 512),
            ("z_stop", 16),
            ("iso_resolution", 0),
        ] {
            doc["msg"][k] = json!(v);
        }
        doc["msg"]["annotation_channel"] = json!(true);
        doc["msg"]["data_type"] = json!("uint64");
        let ctx = Arc::new(cuboids::gpu::GpuContext::new().unwrap());
        let (_, report) = run_step(ctx, &env.target, &doc).await.unwrap();
        assert_eq!(report.written, 2, "the (2,2,1) cuboid and the ISO cuboid");
        for (iso, factor, depth) in [
            (false, Factor::ANISOTROPIC, 16),
            (true, Factor::ISOTROPIC, 32),
        ] {
            let object = store
                .get(&id(1, [0, 0, 0], iso).s3_key())
                .await
                .unwrap()
                .unwrap();
            let got = decode_cuboid(&object.data, DataType::Uint64).unwrap();
            let mut block = Volume::zeros(DataType::Uint64, [1024, 1024, depth], 1);
            block.paste([0; 3], &labels, [0; 3], CUBOID);
            let expected =
                downsample_cpu(&block, Method::Mode, factor, 1).unwrap()[0].crop([0; 3], CUBOID);
            assert!(
                got == expected,
                "annotation cuboid (iso={iso}) differs from mode pooling"
            );
        }
    }

    /// Writes the test channel's resolution-0 cuboids (x=2, z=1 missing) into a new bucket.
    async fn channel_in(server: &common::S3Server, bucket: &str) -> BossTarget {
        let sdk = server.sdk_config().await;
        let store: Arc<dyn Store> = Arc::new(server.store(bucket, "").await);
        common::put_boss_cuboids(&*store, &channel_volume(), missing).await;
        BossTarget {
            store,
            index: S3Index::new(&sdk, Some(server.endpoint.clone()), "s3index.test.boss"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn all_levels_equals_the_steps_one_by_one_and_reads_less() {
        let server = common::S3Server::start();
        let sdk = server.sdk_config().await;
        let ddb = aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::config::Builder::from(&sdk)
                .endpoint_url(&server.endpoint)
                .build(),
        );
        common::create_s3_index(&ddb, "s3index.test.boss").await;
        let ctx = Arc::new(cuboids::gpu::GpuContext::new().unwrap());

        let stepwise = channel_in(&server, "stepwise").await;
        let mut doc = job(0);
        let mut step_reads = 0;
        // As the state machine: run, then loop while the returned document says so.
        loop {
            let (next, report) = run_step(ctx.clone(), &stepwise, &doc).await.unwrap();
            step_reads += report.store_reads;
            doc = next;
            if !doc["msg"]["res_lt_max"].as_bool().unwrap() {
                break;
            }
        }
        assert_eq!(doc["msg"]["resolution"], 3);

        let together = channel_in(&server, "together").await;
        let (last, report) =
            cuboids::task::boss_downsample::run_all_levels(ctx, &together, &job(0), 1 << 30)
                .await
                .unwrap();
        assert_eq!(last, doc, "the same final document");
        let (a, b) = (
            server.objects("stepwise").await,
            server.objects("together").await,
        );
        assert!(
            a.len() > 12 && a == b,
            "--all-levels wrote {} objects, step by step {}; contents must be equal",
            b.len(),
            a.len()
        );
        assert!(
            report.store_reads < step_reads,
            "{} reads vs {step_reads} step by step",
            report.store_reads
        );
        // Every level after the first is read from GPU memory, where the previous level's
        // cuboids were left.
        assert!(
            report.gpu_resident_reads > 0
                && report.gpu_resident_reads + report.store_reads >= step_reads,
            "{report:?} vs {step_reads} reads step by step"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn isotropic_uint16_channels_step_by_2_2_2() {
        let env = env().await;
        let store = env.store.clone();
        let mut data = Vec::new();
        for z in 0..32usize {
            for y in 0..512usize {
                for x in 0..512usize {
                    data.extend((((x * 37 + y * 11 + z * 1000) % 65521) as u16).to_le_bytes());
                }
            }
        }
        let vol = Volume::from_bytes(DataType::Uint16, [512, 512, 32], 1, data).unwrap();
        for z in 0..2 {
            let frame = encode_cuboid(&vol.crop([0, 0, 16 * z], CUBOID)).unwrap();
            store
                .put(
                    &id(0, [0, 0, z], false).s3_key(),
                    frame,
                    ContentEncoding::Identity,
                )
                .await
                .unwrap();
        }
        let mut doc = job(0);
        for (k, v) in [("x_stop", 512), ("y_stop", 512), ("z_stop", 32)] {
            doc["msg"][k] = json!(v);
        }
        doc["msg"]["type"] = json!("isotropic");
        doc["msg"]["data_type"] = json!("uint16");
        let ctx = Arc::new(cuboids::gpu::GpuContext::new().unwrap());
        let (next, report) = run_step(ctx, &env.target, &doc).await.unwrap();
        assert_eq!(
            (report.written, next["msg"]["z_stop"].clone()),
            (1, json!(16))
        );
        assert!(next["msg"].get("iso_x_start").is_none());
        let object = store
            .get(&id(1, [0, 0, 0], false).s3_key())
            .await
            .unwrap()
            .expect("written");
        let got = decode_cuboid(&object.data, DataType::Uint16).unwrap();
        let mut block = Volume::zeros(DataType::Uint16, [1024, 1024, 32], 1);
        block.paste([0; 3], &vol, [0; 3], vol.shape);
        let expected = downsample_cpu(&block, Method::Average, Factor::ISOTROPIC, 1).unwrap()[0]
            .crop([0; 3], CUBOID);
        assert!(got == expected, "isotropic uint16 cuboid differs");
    }
}
