//! The layer cache on its own: verified inserts, failure cleanup,
//! concurrent inserts of one digest, re-verification, listing, pruning.

mod registry_support;

use std::collections::HashSet;
use std::io;
use std::time::{Duration, SystemTime};

use banger_image::cache::{sha256_digest, CacheError, LayerCache, Verify};
use banger_image::testing::random_bytes;
use bytes::Bytes;
use futures::StreamExt;
use registry_support::blob_dir_names;
use tokio::io::AsyncReadExt;

fn cache() -> (tempfile::TempDir, LayerCache) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::open(dir.path().join("cache")).expect("open cache");
    (dir, cache)
}

/// `data` as a stream of `chunk`-sized pieces that yield between chunks.
fn chunked(data: Vec<u8>, chunk: usize) -> impl futures::Stream<Item = io::Result<Bytes>> + Unpin {
    let pieces: Vec<Bytes> = data.chunks(chunk).map(Bytes::copy_from_slice).collect();
    Box::pin(futures::stream::iter(pieces).then(|piece| async move {
        tokio::task::yield_now().await;
        Ok(piece)
    }))
}

#[tokio::test]
async fn insert_stores_under_the_digest_and_reports_progress() {
    let (_dir, cache) = cache();
    let data = random_bytes(300_000, 1);
    let digest = sha256_digest(&data);
    assert!(!cache.contains(&digest).expect("contains"));

    let mut seen = Vec::new();
    let inserted = cache
        .insert_stream(
            &digest,
            data.len() as u64,
            chunked(data.clone(), 65_536),
            |n| seen.push(n),
        )
        .await
        .expect("insert");
    assert!(inserted.stored_by_us);
    assert_eq!(seen.last(), Some(&(data.len() as u64)));
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");

    let hex = digest.strip_prefix("sha256:").expect("prefix");
    let expected_path = cache.root().join("blobs").join("sha256").join(hex);
    assert_eq!(inserted.blob.path, expected_path);
    assert_eq!(cache.path(&digest).expect("path"), expected_path);
    assert!(cache.contains(&digest).expect("contains"));
    assert_eq!(std::fs::read(&expected_path).expect("read blob"), data);
    assert_eq!(blob_dir_names(&cache), vec![hex.to_string()]);

    let listed = cache.list().expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].digest, digest);
    assert_eq!(listed[0].size, data.len() as u64);
}

#[tokio::test]
async fn mismatching_content_is_refused_and_leaves_nothing() {
    let (_dir, cache) = cache();
    let data = random_bytes(100_000, 2);
    let wrong = sha256_digest(b"something else");
    let err = cache
        .insert_stream(
            &wrong,
            data.len() as u64,
            chunked(data.clone(), 10_000),
            |_| {},
        )
        .await
        .expect_err("digest mismatch");
    let actual = sha256_digest(&data);
    match &err {
        CacheError::DigestMismatch {
            expected,
            actual: got,
        } => {
            assert_eq!(expected, &wrong);
            assert_eq!(got, &actual);
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(&wrong) && message.contains(&actual),
        "{message}"
    );
    assert!(
        blob_dir_names(&cache).is_empty(),
        "{:?}",
        blob_dir_names(&cache)
    );
    assert!(!cache.contains(&wrong).expect("contains"));
}

#[tokio::test]
async fn truncated_oversized_and_failing_streams_leave_nothing() {
    let (_dir, cache) = cache();
    let data = random_bytes(50_000, 3);
    let digest = sha256_digest(&data);

    let err = cache
        .insert_stream(&digest, 60_000, chunked(data.clone(), 8_192), |_| {})
        .await
        .expect_err("truncated");
    assert!(
        matches!(&err, CacheError::Truncated { digest: d, expected: 60_000, actual: 50_000 } if *d == digest),
        "{err:?}"
    );
    assert!(err.to_string().contains(&digest), "{err}");
    assert!(blob_dir_names(&cache).is_empty());

    let err = cache
        .insert_stream(&digest, 40_000, chunked(data.clone(), 8_192), |_| {})
        .await
        .expect_err("oversized");
    assert!(
        matches!(
            err,
            CacheError::Oversized {
                expected: 40_000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(blob_dir_names(&cache).is_empty());

    let failing = futures::stream::iter(vec![
        Ok(Bytes::from(data[..1000].to_vec())),
        Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "reset by peer",
        )),
    ]);
    let err = cache
        .insert_stream(&digest, data.len() as u64, failing, |_| {})
        .await
        .expect_err("stream error");
    assert!(matches!(err, CacheError::Stream { .. }), "{err:?}");
    assert!(blob_dir_names(&cache).is_empty());
}

#[tokio::test]
async fn dropping_an_insert_midway_removes_its_partial_file() {
    let (_dir, cache) = cache();
    let data = random_bytes(10_000, 4);
    let digest = sha256_digest(&data);
    // A few chunks, then a stream that never ends.
    let stream = Box::pin(
        futures::stream::iter(vec![Ok(Bytes::from(data[..4000].to_vec()))])
            .chain(futures::stream::pending()),
    );
    let mut started = false;
    let insert = cache.insert_stream(&digest, data.len() as u64, stream, |_| started = true);
    let timed_out = tokio::time::timeout(Duration::from_millis(200), insert).await;
    assert!(timed_out.is_err(), "the insert cannot finish");
    assert!(started, "the first chunk was written");
    assert!(
        blob_dir_names(&cache).is_empty(),
        "partial left behind: {:?}",
        blob_dir_names(&cache)
    );
}

#[tokio::test]
async fn invalid_digests_never_touch_the_filesystem() {
    let (dir, cache) = cache();
    for bad in [
        "sha256:../../../escape".to_string(),
        format!("sha256:{}", "A".repeat(64)),
        format!("sha512:{}", "a".repeat(64)),
        "latest".to_string(),
    ] {
        assert!(matches!(
            cache.contains(&bad),
            Err(CacheError::InvalidDigest { .. })
        ));
        assert!(matches!(
            cache.path(&bad),
            Err(CacheError::InvalidDigest { .. })
        ));
        let err = cache
            .insert_bytes(&bad, Bytes::from_static(b"x"))
            .await
            .expect_err("invalid digest");
        assert!(matches!(err, CacheError::InvalidDigest { .. }), "{err:?}");
        assert!(err.to_string().contains(&bad), "{err}");
        assert!(matches!(
            cache.open_blob(&bad, 1, Verify::Size).await,
            Err(CacheError::InvalidDigest { .. })
        ));
        assert!(matches!(
            cache.remove(&bad),
            Err(CacheError::InvalidDigest { .. })
        ));
    }
    assert!(blob_dir_names(&cache).is_empty());
    let top: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(top, vec![std::ffi::OsString::from("cache")]);
}

#[tokio::test]
async fn concurrent_inserts_of_one_digest_do_not_corrupt_each_other() {
    let (_dir, cache) = cache();
    let data = random_bytes(2_000_000, 5);
    let digest = sha256_digest(&data);
    let mut tampered = data.clone();
    tampered[1_000_000] ^= 0xff;

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let cache = cache.clone();
        let digest = digest.clone();
        let body = if i % 4 == 3 {
            tampered.clone()
        } else {
            data.clone()
        };
        let size = data.len() as u64;
        tasks.spawn(async move {
            let result = cache
                .insert_stream(&digest, size, chunked(body, 32_768 + i * 1000), |_| {})
                .await;
            (i % 4 == 3, result)
        });
    }
    let mut stored = 0;
    while let Some(joined) = tasks.join_next().await {
        let (is_tampered, result) = joined.expect("task");
        if is_tampered {
            assert!(
                matches!(result, Err(CacheError::DigestMismatch { .. })),
                "{result:?}"
            );
        } else {
            let inserted = result.expect("good copy inserts");
            stored += usize::from(inserted.stored_by_us);
        }
    }
    assert!(stored >= 1);
    let hex = digest.strip_prefix("sha256:").expect("prefix");
    assert_eq!(blob_dir_names(&cache), vec![hex.to_string()]);
    assert_eq!(
        std::fs::read(cache.path(&digest).expect("path")).expect("read"),
        data
    );

    // Once cached, another insert keeps the existing blob.
    let again = cache
        .insert_bytes(&digest, Bytes::from(data.clone()))
        .await
        .expect("insert again");
    assert!(!again.stored_by_us);
    assert_eq!(blob_dir_names(&cache), vec![hex.to_string()]);
}

#[tokio::test]
async fn open_blob_reverifies_and_removes_corrupt_blobs() {
    let (_dir, cache) = cache();
    let data = random_bytes(70_000, 6);
    let digest = sha256_digest(&data);
    cache
        .insert_bytes(&digest, Bytes::from(data.clone()))
        .await
        .expect("insert");

    let mut file = cache
        .open_blob(&digest, data.len() as u64, Verify::Full)
        .await
        .expect("open");
    let mut read = Vec::new();
    file.read_to_end(&mut read).await.expect("read");
    assert_eq!(read, data, "full verification rewinds the file");

    let err = cache
        .open_blob(&digest, data.len() as u64 + 1, Verify::Size)
        .await
        .expect_err("wrong size");
    assert!(matches!(err, CacheError::Corrupt { .. }), "{err:?}");
    assert!(
        !cache.contains(&digest).expect("contains"),
        "corrupt blob removed"
    );

    cache
        .insert_bytes(&digest, Bytes::from(data.clone()))
        .await
        .expect("insert again");
    // Same size, different bytes: only a full check notices.
    let path = cache.path(&digest).expect("path");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[10] ^= 1;
    std::fs::write(&path, &bytes).expect("tamper");
    cache
        .open_blob(&digest, data.len() as u64, Verify::Size)
        .await
        .expect("size still matches");
    let err = cache
        .open_blob(&digest, data.len() as u64, Verify::Full)
        .await
        .expect_err("content changed");
    assert!(
        matches!(&err, CacheError::Corrupt { detail, .. } if detail.contains("sha256:")),
        "{err:?}"
    );
    assert!(!cache.contains(&digest).expect("contains"));

    let err = cache
        .open_blob(&digest, 1, Verify::Size)
        .await
        .expect_err("missing");
    assert!(matches!(err, CacheError::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn prune_removes_unreferenced_blobs_and_stale_partials_only() {
    let (_dir, cache) = cache();
    let mut digests = Vec::new();
    for seed in 0..4u64 {
        let data = random_bytes(1000 + seed as usize, 100 + seed);
        let digest = sha256_digest(&data);
        cache
            .insert_bytes(&digest, Bytes::from(data))
            .await
            .expect("insert");
        digests.push(digest);
    }
    let hex = |d: &str| d.strip_prefix("sha256:").expect("prefix").to_string();
    let blob_dir = cache.blob_dir().to_path_buf();
    // A live download of ours, one of a dead process, one abandoned long
    // ago by a live process, and a file the cache did not make.
    let live = format!("{}.{}-0-0.partial", hex(&digests[0]), std::process::id());
    let dead = format!("{}.99999999-0-0.partial", hex(&digests[1]));
    let old = format!("{}.{}-1-0.partial", hex(&digests[2]), std::process::id());
    for (name, len) in [(&live, 10), (&dead, 20), (&old, 40)] {
        std::fs::write(blob_dir.join(name), vec![0u8; len]).expect("write partial");
    }
    std::fs::File::options()
        .write(true)
        .open(blob_dir.join(&old))
        .expect("open old partial")
        .set_modified(SystemTime::now() - Duration::from_secs(2 * 3600))
        .expect("age partial");
    std::fs::write(blob_dir.join("README"), b"not a blob").expect("foreign file");

    let listed: Vec<String> = cache
        .list()
        .expect("list")
        .into_iter()
        .map(|b| b.digest)
        .collect();
    let mut sorted = digests.clone();
    sorted.sort();
    assert_eq!(listed, sorted, "list shows blobs only");

    let referenced: HashSet<String> = [digests[0].clone(), digests[2].clone()].into();
    let stats = cache.prune(&referenced).expect("prune");
    let freed_blobs = 1001 + 1003;
    assert_eq!(stats.removed, 4, "{stats:?}");
    assert_eq!(stats.bytes_freed, freed_blobs + 20 + 40);

    let mut expected = vec![
        hex(&digests[0]),
        hex(&digests[2]),
        live.clone(),
        "README".to_string(),
    ];
    expected.sort();
    assert_eq!(blob_dir_names(&cache), expected);
    assert!(cache.contains(&digests[0]).expect("contains"));
    assert!(!cache.contains(&digests[1]).expect("contains"));
    assert!(!cache.contains(&digests[3]).expect("contains"));

    // Nothing referenced: every blob goes, the live partial stays.
    let stats = cache.prune(&HashSet::new()).expect("prune all");
    assert_eq!(stats.removed, 2);
    let mut expected = vec!["README".to_string(), live];
    expected.sort();
    assert_eq!(blob_dir_names(&cache), expected);
    assert!(cache.list().expect("list").is_empty());
}
