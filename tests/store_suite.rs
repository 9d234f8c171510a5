//! One test suite that every storage backend must pass.

mod common;

use common::files_under;
use cuboids::store::{ContentEncoding, LocalStore, Store};
use std::sync::Arc;

async fn suite(store: Arc<dyn Store>) {
    // A missing object is None, not an error.
    assert_eq!(store.get("nope/none").await.unwrap(), None);
    assert!(!store.exists("nope/none").await.unwrap());

    store
        .put("a/b/c", b"hello".to_vec(), ContentEncoding::Identity)
        .await
        .unwrap();
    let got = store.get("a/b/c").await.unwrap().unwrap();
    assert_eq!(
        (got.data.as_slice(), got.encoding),
        (&b"hello"[..], ContentEncoding::Identity)
    );
    assert!(store.exists("a/b/c").await.unwrap());
    assert!(
        !store.exists("a/b").await.unwrap(),
        "a prefix is not an object"
    );

    // Rewriting the same key in another encoding replaces it: one object per key.
    store
        .put("a/b/c", b"gz-bytes".to_vec(), ContentEncoding::Gzip)
        .await
        .unwrap();
    let got = store.get("a/b/c").await.unwrap().unwrap();
    assert_eq!(
        (got.data.as_slice(), got.encoding),
        (&b"gz-bytes"[..], ContentEncoding::Gzip)
    );
    assert!(
        store.exists("a/b/c").await.unwrap(),
        "a gzipped object exists"
    );
    store
        .put("a/b/c", b"plain".to_vec(), ContentEncoding::Identity)
        .await
        .unwrap();
    assert_eq!(store.get("a/b/c").await.unwrap().unwrap().data, b"plain");

    // Ranged reads (shard files): a middle, a range past the end (clipped), one starting past
    // the end (empty), an empty range, and a missing object (None).
    let bytes: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    store
        .put("shard", bytes.clone(), ContentEncoding::Identity)
        .await
        .unwrap();
    let range = |start: u64, len: u64| {
        let store = store.clone();
        async move { store.get_range("shard", start, len).await.unwrap() }
    };
    assert_eq!(range(1000, 300).await.unwrap(), &bytes[1000..1300]);
    assert_eq!(range(0, 1).await.unwrap(), &bytes[..1]);
    assert_eq!(range(9_990, 100).await.unwrap(), &bytes[9_990..]);
    assert_eq!(range(20_000, 16).await.unwrap(), Vec::<u8>::new());
    assert_eq!(range(5, 0).await.unwrap(), Vec::<u8>::new());
    assert_eq!(store.get_range("nope/none", 0, 16).await.unwrap(), None);
    store.delete("shard").await.unwrap();

    store.delete("a/b/c").await.unwrap();
    assert_eq!(store.get("a/b/c").await.unwrap(), None);
    assert!(!store.exists("a/b/c").await.unwrap());
    store.delete("a/b/c").await.unwrap();

    for bad in ["", "/abs", "a/../b", "a//b", "./a"] {
        assert!(
            store.get(bad).await.is_err(),
            "key {bad:?} must be rejected"
        );
        assert!(store
            .put(bad, vec![], ContentEncoding::Identity)
            .await
            .is_err());
    }

    // Many concurrent writers of distinct keys, and of one key (last writer wins, never a mix).
    let writes = (0..64).map(|i| {
        let store = store.clone();
        async move {
            store
                .put(
                    &format!("many/{i}"),
                    vec![i as u8; 1000],
                    ContentEncoding::Identity,
                )
                .await
                .unwrap();
            store
                .put("same", vec![i as u8; 100_000], ContentEncoding::Identity)
                .await
                .unwrap();
        }
    });
    futures::future::join_all(writes).await;
    for i in 0..64 {
        assert_eq!(
            store.get(&format!("many/{i}")).await.unwrap().unwrap().data,
            vec![i as u8; 1000]
        );
    }
    let same = store.get("same").await.unwrap().unwrap().data;
    assert_eq!(same.len(), 100_000);
    assert!(same.iter().all(|&b| b == same[0]));

    // A large object written part by part (past S3's multipart threshold): nothing at its key
    // until it finishes, then every byte; a small one; one dropped unfinished leaves nothing.
    let big: Vec<u8> = (0..20_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut writer = store.writer("big/object").await.unwrap();
    for part in big.chunks(3_000_001) {
        writer.write(part).await.unwrap();
        assert!(
            !store.exists("big/object").await.unwrap(),
            "visible before it finished"
        );
    }
    writer.finish().await.unwrap();
    assert!(store.get("big/object").await.unwrap().unwrap().data == big);
    let mut small = store.writer("small").await.unwrap();
    small.write(b"a few").await.unwrap();
    small.write(b" bytes").await.unwrap();
    small.finish().await.unwrap();
    assert_eq!(
        store.get("small").await.unwrap().unwrap().data,
        b"a few bytes"
    );
    let mut dropped = store.writer("dropped").await.unwrap();
    dropped.write(&big[..9_000_000]).await.unwrap();
    drop(dropped);
    assert!(!store.exists("dropped").await.unwrap());
    for key in ["big/object", "small"] {
        store.delete(key).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_store_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    suite(Arc::new(LocalStore::new(dir.path()))).await;
    assert!(
        !dir.path().join("a").exists(),
        "deleting a/b/c prunes the directories it emptied"
    );
    // No temporary files are left behind by atomic writes.
    let leftovers: Vec<_> = files_under(dir.path())
        .into_iter()
        .filter(|p| p.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_passes_the_suite() {
    let server = common::S3Server::start();
    suite(Arc::new(server.store("suite", "some/prefix").await)).await;
    // A store without a prefix addresses keys at the bucket's root.
    suite(Arc::new(server.store("rootless", "").await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_errors_name_the_object() {
    let server = common::S3Server::start();
    let sdk = server.sdk_config().await;
    let store = cuboids::store::S3Store::with_config(
        "s3://no-such-bucket/vol",
        &sdk,
        Some(server.endpoint.clone()),
    )
    .unwrap();
    let err = store.get("info").await.unwrap_err().to_string();
    assert!(
        err.contains("s3://no-such-bucket/vol/info") && err.contains("NoSuchBucket"),
        "{err}"
    );
    let err = cuboids::store::S3Store::with_config("s3:///x", &sdk, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no bucket"), "{err}");
}
