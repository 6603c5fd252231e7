//! A registry serving bad data, and cancellation: a tampered blob is a
//! digest error, a truncated blob a size error, a cancelled pull stops
//! promptly, and none of them leave anything in the cache.

mod registry_support;

use std::time::{Duration, Instant};

use banger_image::cache::{sha256_digest, LayerCache};
use banger_image::registry::{
    fetch_layers, parse_reference, resolve, PullError, PullEvent, PullOptions, OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
};
use banger_image::testing::{random_bytes, TestRegistry};
use registry_support::{blob_dir_names, config_json, gzip, partial_files, tar_with};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn tampered_blob_is_a_digest_error_and_caches_nothing() {
    let registry = TestRegistry::start();
    let good = gzip(&tar_with(&[("ok", &random_bytes(100_000, 30))]));
    let bad = gzip(&tar_with(&[("bad", &random_bytes(200_000, 31))]));
    registry
        .push_image(
            "tamper",
            "v1",
            vec![
                (OCI_LAYER_GZIP.into(), good.clone()),
                (OCI_LAYER_GZIP.into(), bad.clone()),
            ],
            &config_json("amd64"),
        )
        .await;
    let reference = parse_reference(&registry.reference("tamper", "v1")).expect("reference");
    let resolved = resolve(&reference, &PullOptions::default())
        .await
        .expect("manifest and config are intact");

    // Same length, different bytes.
    let bad_digest = sha256_digest(&bad);
    let stored = registry.blob_data_path(&bad_digest);
    let mut bytes = std::fs::read(&stored).expect("stored blob");
    assert_eq!(bytes, bad);
    bytes[bad.len() / 2] ^= 0x55;
    std::fs::write(&stored, &bytes).expect("tamper");

    let dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::open(dir.path()).expect("cache");
    let (tx, _rx) = mpsc::channel(64);
    let err = fetch_layers(
        &resolved,
        &cache,
        &PullOptions::default(),
        tx,
        CancellationToken::new(),
    )
    .await
    .expect_err("tampered layer");
    match &err {
        PullError::DigestMismatch { digest, actual, .. } => {
            assert_eq!(digest, &bad_digest);
            assert_eq!(actual, &sha256_digest(&bytes));
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(&bad_digest) && message.contains(&sha256_digest(&bytes)),
        "{message}"
    );
    assert!(!cache.contains(&bad_digest).expect("contains"));
    assert!(partial_files(dir.path()).is_empty());
    // Only the intact layer may have made it.
    let names = blob_dir_names(&cache);
    let good_hex = sha256_digest(&good)["sha256:".len()..].to_string();
    assert!(names.iter().all(|n| *n == good_hex), "{names:?}");
}

#[tokio::test]
async fn truncated_blob_is_an_error_and_leaves_no_partial() {
    let registry = TestRegistry::start();
    let layer = tar_with(&[("big", &random_bytes(400_000, 40))]);
    registry
        .push_image(
            "trunc",
            "v1",
            vec![(OCI_LAYER_TAR.into(), layer.clone())],
            &config_json("amd64"),
        )
        .await;
    let reference = parse_reference(&registry.reference("trunc", "v1")).expect("reference");
    let resolved = resolve(&reference, &PullOptions::default())
        .await
        .expect("resolve");

    let digest = sha256_digest(&layer);
    let stored = registry.blob_data_path(&digest);
    let half = layer.len() as u64 / 2;
    std::fs::File::options()
        .write(true)
        .open(&stored)
        .expect("open stored blob")
        .set_len(half)
        .expect("truncate");

    let dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::open(dir.path()).expect("cache");
    let (tx, _rx) = mpsc::channel(64);
    let err = fetch_layers(
        &resolved,
        &cache,
        &PullOptions::default(),
        tx,
        CancellationToken::new(),
    )
    .await
    .expect_err("truncated layer");
    match &err {
        PullError::Truncated {
            digest: d,
            expected,
            actual,
            ..
        } => {
            assert_eq!(d, &digest);
            assert_eq!(*expected, layer.len() as u64);
            assert_eq!(*actual, half);
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    assert!(err.to_string().contains(&digest), "{err}");
    assert!(
        blob_dir_names(&cache).is_empty(),
        "{:?}",
        blob_dir_names(&cache)
    );
}

#[tokio::test]
async fn cancelling_mid_download_stops_promptly_and_cleans_up() {
    let registry = TestRegistry::start();
    // 64 MiB of incompressible data, stored uncompressed.
    let big = random_bytes(64 << 20, 50);
    let big_digest = sha256_digest(&big);
    let small = gzip(&tar_with(&[("small", b"small")]));
    registry
        .push_image(
            "huge",
            "v1",
            vec![
                (OCI_LAYER_GZIP.into(), small.clone()),
                (OCI_LAYER_TAR.into(), big),
            ],
            &config_json("amd64"),
        )
        .await;
    let reference = parse_reference(&registry.reference("huge", "v1")).expect("reference");
    let resolved = resolve(&reference, &PullOptions::default())
        .await
        .expect("resolve");

    let dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::open(dir.path()).expect("cache");
    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel(1024);
    let fetch = tokio::spawn({
        let cache = cache.clone();
        let cancel = cancel.clone();
        async move { fetch_layers(&resolved, &cache, &PullOptions::default(), tx, cancel).await }
    });

    // Wait for the big layer's first event, then for its partial file to
    // hold data: the download is under way.
    loop {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(PullEvent::Layer { digest, .. })) if digest == big_digest => break,
            Ok(Some(_)) => continue,
            other => panic!("no progress event for the big layer: {other:?}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let partial = partial_files(dir.path());
        let written = partial
            .iter()
            .any(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false));
        if written {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the big layer never started writing"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    let cancelled_at = Instant::now();
    cancel.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .expect("fetch returns after cancellation")
        .expect("fetch task");
    let took = cancelled_at.elapsed();
    assert!(matches!(result, Err(PullError::Cancelled)), "{result:?}");
    assert!(took < Duration::from_secs(2), "cancellation took {took:?}");
    assert!(
        partial_files(dir.path()).is_empty(),
        "{:?}",
        partial_files(dir.path())
    );
    assert!(!cache.contains(&big_digest).expect("contains"));

    // A pull that is cancelled before it starts does nothing at all.
    let (tx, _rx) = mpsc::channel(8);
    let cancel = CancellationToken::new();
    cancel.cancel();
    let resolved = resolve(&reference, &PullOptions::default())
        .await
        .expect("resolve");
    let err = fetch_layers(&resolved, &cache, &PullOptions::default(), tx, cancel)
        .await
        .expect_err("cancelled up front");
    assert!(matches!(err, PullError::Cancelled), "{err:?}");
}
