//! Pulls from a real registry (Debian's docker-registry on loopback):
//! single-platform images with gzip, zstd and plain layers, the offline
//! second fetch, multi-platform indexes, refused media types, missing
//! images, concurrent pulls into one cache and pruning.

mod registry_support;

use std::collections::{HashMap, HashSet};

use banger_image::cache::{sha256_digest, LayerCache};
use banger_image::registry::{
    default_image_name, fetch_layers, parse_reference, resolve, Compression, PullError, PullEvent,
    PullOptions, DOCKER_LAYER_GZIP, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD,
};
use banger_image::testing::{random_bytes, TestRegistry};
use registry_support::{
    blob_dir_names, chain, config_json, drain, gzip, partial_files, tar_with, zstd,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn three_layers() -> Vec<(String, Vec<u8>)> {
    vec![
        (
            OCI_LAYER_GZIP.to_string(),
            gzip(&tar_with(&[("etc/os-release", b"ID=test\n")])),
        ),
        (
            OCI_LAYER_ZSTD.to_string(),
            zstd(&tar_with(&[("usr/bin/tool", &random_bytes(200_000, 7))])),
        ),
        (
            OCI_LAYER_TAR.to_string(),
            tar_with(&[("srv/index.html", b"<h1>hi</h1>\n")]),
        ),
    ]
}

/// Per-digest progress events.
fn by_digest(events: &[PullEvent]) -> HashMap<String, Vec<(u64, u64, bool)>> {
    let mut map: HashMap<String, Vec<(u64, u64, bool)>> = HashMap::new();
    for event in events {
        let PullEvent::Layer {
            digest,
            bytes_done,
            bytes_total,
            cached,
        } = event;
        map.entry(digest.clone())
            .or_default()
            .push((*bytes_done, *bytes_total, *cached));
    }
    map
}

#[tokio::test]
async fn pulls_a_single_platform_image_and_refetches_it_offline() {
    let mut registry = TestRegistry::start();
    let layers = three_layers();
    let manifest_digest = registry
        .push_image("team/app", "v1", layers.clone(), &config_json("amd64"))
        .await;

    let reference = parse_reference(&registry.reference("team/app", "v1")).expect("reference");
    assert_eq!(default_image_name(&reference), "app-v1");
    let opts = PullOptions::default();
    let resolved = resolve(&reference, &opts).await.expect("resolve");

    assert_eq!(resolved.manifest_digest, manifest_digest);
    assert_eq!(resolved.index_digest, None);
    assert_eq!(resolved.platform.as_deref(), Some("linux/amd64"));
    let config = &resolved.config;
    assert_eq!(
        config.env,
        vec!["PATH=/usr/local/bin:/usr/bin", "GREETING=hello world"]
    );
    assert_eq!(config.entrypoint, Some(vec!["/bin/entry".to_string()]));
    assert_eq!(
        config.cmd,
        Some(vec!["--serve".to_string(), "8080".to_string()])
    );
    assert_eq!(config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(config.user.as_deref(), Some("1000:1000"));
    assert_eq!(resolved.config_digest, sha256_digest(&config_json("amd64")));

    assert_eq!(resolved.layers.len(), 3);
    for (descriptor, (media_type, data)) in resolved.layers.iter().zip(&layers) {
        assert_eq!(descriptor.digest, sha256_digest(data));
        assert_eq!(&descriptor.media_type, media_type);
        assert_eq!(descriptor.size, data.len() as u64);
    }
    let compressions: Vec<Compression> = resolved.layers.iter().map(|l| l.compression()).collect();
    assert_eq!(
        compressions,
        vec![Compression::Gzip, Compression::Zstd, Compression::None]
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::open(dir.path()).expect("cache");
    let (tx, mut rx) = mpsc::channel(256);
    let fetched = fetch_layers(&resolved, &cache, &opts, tx, CancellationToken::new())
        .await
        .expect("fetch");
    assert_eq!(fetched.len(), 3);
    for (layer, (_, data)) in fetched.iter().zip(&layers) {
        assert!(!layer.cached, "first fetch downloads");
        assert_eq!(layer.descriptor.digest, sha256_digest(data));
        assert_eq!(
            layer.path,
            cache.path(&layer.descriptor.digest).expect("path")
        );
        assert_eq!(
            &std::fs::read(&layer.path).expect("read cached layer"),
            data
        );
    }
    let events = by_digest(&drain(&mut rx));
    for layer in &resolved.layers {
        let seen = &events[&layer.digest];
        assert_eq!(seen.first(), Some(&(0, layer.size, false)), "{seen:?}");
        assert_eq!(
            seen.last(),
            Some(&(layer.size, layer.size, false)),
            "{seen:?}"
        );
    }
    assert!(partial_files(dir.path()).is_empty());

    // The registry is gone: resolving fails to connect, but fetching the
    // already resolved image is served entirely from the cache.
    registry.stop();
    let err = resolve(&reference, &opts).await.expect_err("registry down");
    assert!(matches!(err, PullError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&registry.host()), "{err}");

    let (tx, mut rx) = mpsc::channel(256);
    let again = fetch_layers(&resolved, &cache, &opts, tx, CancellationToken::new())
        .await
        .expect("offline fetch");
    assert!(again.iter().all(|l| l.cached));
    assert_eq!(
        again.iter().map(|l| &l.path).collect::<Vec<_>>(),
        fetched.iter().map(|l| &l.path).collect::<Vec<_>>()
    );
    let events = drain(&mut rx);
    assert_eq!(events.len(), 3, "{events:?}");
    for (event, layer) in events.iter().zip(&resolved.layers) {
        assert_eq!(
            event,
            &PullEvent::Layer {
                digest: layer.digest.clone(),
                bytes_done: layer.size,
                bytes_total: layer.size,
                cached: true,
            }
        );
    }
}

#[tokio::test]
async fn image_index_resolves_to_the_requested_platform() {
    let registry = TestRegistry::start();
    let amd64_layer = gzip(&tar_with(&[("arch", b"amd64\n")]));
    let arm64_layer = gzip(&tar_with(&[("arch", b"arm64\n")]));
    let amd64 = registry
        .push_image(
            "multi",
            "amd64-only",
            vec![(OCI_LAYER_GZIP.into(), amd64_layer.clone())],
            &config_json("amd64"),
        )
        .await;
    let arm64 = registry
        .push_image(
            "multi",
            "arm64-only",
            vec![(DOCKER_LAYER_GZIP.into(), arm64_layer.clone())],
            &config_json("arm64"),
        )
        .await;
    let index = registry
        .push_index(
            "multi",
            "latest",
            vec![
                ("linux/arm64/v8".parse().expect("platform"), arm64.clone()),
                ("linux/amd64".parse().expect("platform"), amd64.clone()),
            ],
        )
        .await;
    let reference = parse_reference(&registry.reference("multi", "latest")).expect("reference");

    let resolved = resolve(&reference, &PullOptions::default())
        .await
        .expect("default platform");
    assert_eq!(resolved.manifest_digest, amd64);
    assert_eq!(resolved.index_digest.as_deref(), Some(index.as_str()));
    assert_eq!(resolved.platform.as_deref(), Some("linux/amd64"));
    assert_eq!(resolved.config.architecture.as_deref(), Some("amd64"));
    assert_eq!(resolved.layers[0].digest, sha256_digest(&amd64_layer));

    for wanted in ["linux/arm64/v8", "linux/arm64", "arm64"] {
        let opts = PullOptions {
            platform: wanted.parse().expect("platform"),
            ..PullOptions::default()
        };
        let resolved = resolve(&reference, &opts).await.expect(wanted);
        assert_eq!(resolved.manifest_digest, arm64, "{wanted}");
        assert_eq!(resolved.platform.as_deref(), Some("linux/arm64/v8"));
        assert_eq!(resolved.config.architecture.as_deref(), Some("arm64"));
        assert_eq!(resolved.layers[0].digest, sha256_digest(&arm64_layer));
        assert_eq!(resolved.layers[0].media_type, DOCKER_LAYER_GZIP);
    }

    // Pinning the index by digest works the same way.
    let pinned = parse_reference(&format!("{}/multi@{index}", registry.host())).expect("pinned");
    let resolved = resolve(&pinned, &PullOptions::default())
        .await
        .expect("pinned index");
    assert_eq!(resolved.manifest_digest, amd64);

    let opts = PullOptions {
        platform: "linux/s390x".parse().expect("platform"),
        ..PullOptions::default()
    };
    let err = resolve(&reference, &opts).await.expect_err("no s390x");
    match &err {
        PullError::PlatformUnavailable {
            available, wanted, ..
        } => {
            assert_eq!(available, &vec!["linux/amd64", "linux/arm64/v8"]);
            assert_eq!(wanted.to_string(), "linux/s390x");
        }
        other => panic!("expected PlatformUnavailable, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("linux/s390x")
            && message.contains("linux/amd64, linux/arm64/v8")
            && message.contains("--platform"),
        "{message}"
    );
}

#[tokio::test]
async fn refuses_unusable_images_with_clear_errors() {
    let registry = TestRegistry::start();
    let good = gzip(&tar_with(&[("a", b"a")]));

    // A layer media type banger cannot unpack.
    let odd = b"not a tarball".to_vec();
    registry
        .push_image(
            "odd",
            "v1",
            vec![
                (OCI_LAYER_GZIP.into(), good.clone()),
                ("application/vnd.example.thing.v1+bzip2".into(), odd.clone()),
            ],
            &config_json("amd64"),
        )
        .await;
    let reference = parse_reference(&registry.reference("odd", "v1")).expect("reference");
    let err = resolve(&reference, &PullOptions::default())
        .await
        .expect_err("unsupported layer");
    assert!(matches!(err, PullError::UnsupportedLayer { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("application/vnd.example.thing.v1+bzip2")
            && message.contains(&sha256_digest(&odd)),
        "{message}"
    );

    // An artifact whose config is not an image config.
    let config = registry.push_blob("artifact", b"{}".to_vec()).await;
    let layer = registry.push_blob("artifact", good.clone()).await;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.example.config.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer, "size": good.len()}],
    });
    registry
        .push_manifest_json(
            "artifact",
            "v1",
            "application/vnd.oci.image.manifest.v1+json",
            serde_json::to_vec(&manifest).expect("json"),
        )
        .await;
    let reference = parse_reference(&registry.reference("artifact", "v1")).expect("reference");
    let err = resolve(&reference, &PullOptions::default())
        .await
        .expect_err("not an image");
    assert!(matches!(err, PullError::NotAnImage { .. }), "{err:?}");
    assert!(err
        .to_string()
        .contains("application/vnd.example.config.v1+json"));

    // A single-platform image for another architecture.
    registry
        .push_image(
            "armonly",
            "v1",
            vec![(OCI_LAYER_GZIP.into(), good.clone())],
            &config_json("arm64"),
        )
        .await;
    let reference = parse_reference(&registry.reference("armonly", "v1")).expect("reference");
    let err = resolve(&reference, &PullOptions::default())
        .await
        .expect_err("wrong platform");
    assert!(
        matches!(&err, PullError::PlatformMismatch { found, .. } if found == "linux/arm64"),
        "{err:?}"
    );
    let opts = PullOptions {
        platform: "linux/arm64".parse().expect("platform"),
        ..PullOptions::default()
    };
    resolve(&reference, &opts)
        .await
        .expect("arm64 asked for explicitly");

    // Missing tag and missing repository.
    for missing in ["armonly:v2", "nothere:v1"] {
        let reference =
            parse_reference(&format!("{}/{missing}", registry.host())).expect("reference");
        let err = resolve(&reference, &PullOptions::default())
            .await
            .expect_err("missing");
        assert!(
            matches!(err, PullError::NotFound { .. }),
            "{missing}: {err:?}"
        );
        assert!(chain(&err).contains(missing), "{}", chain(&err));
    }
}

#[tokio::test]
async fn concurrent_pulls_share_the_cache_and_prune_keeps_referenced_layers() {
    let registry = TestRegistry::start();
    let shared = gzip(&tar_with(&[("base", &random_bytes(500_000, 11))]));
    let only_a = gzip(&tar_with(&[("a", &random_bytes(300_000, 12))]));
    let only_b = zstd(&tar_with(&[("b", &random_bytes(300_000, 13))]));
    let extra: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            (
                OCI_LAYER_TAR.to_string(),
                tar_with(&[("x", &random_bytes(100_000, 20 + i))]),
            )
        })
        .collect();
    let mut layers_a = vec![
        (OCI_LAYER_GZIP.to_string(), shared.clone()),
        (OCI_LAYER_GZIP.to_string(), only_a.clone()),
    ];
    layers_a.extend(extra.clone());
    registry
        .push_image("a", "v1", layers_a.clone(), &config_json("amd64"))
        .await;
    registry
        .push_image(
            "b",
            "v1",
            vec![
                (OCI_LAYER_GZIP.to_string(), shared.clone()),
                (OCI_LAYER_ZSTD.to_string(), only_b.clone()),
            ],
            &config_json("amd64"),
        )
        .await;

    let opts = PullOptions {
        max_concurrent_downloads: 2,
        ..PullOptions::default()
    };
    let a = resolve(
        &parse_reference(&registry.reference("a", "v1")).expect("a"),
        &opts,
    )
    .await
    .expect("resolve a");
    let b = resolve(
        &parse_reference(&registry.reference("b", "v1")).expect("b"),
        &opts,
    )
    .await
    .expect("resolve b");

    let dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::open(dir.path()).expect("cache");
    // The same image twice and another one sharing a layer, all at once.
    let (tx, _rx) = mpsc::channel(1024);
    let (r1, r2, r3) = tokio::join!(
        fetch_layers(&a, &cache, &opts, tx.clone(), CancellationToken::new()),
        fetch_layers(&a, &cache, &opts, tx.clone(), CancellationToken::new()),
        fetch_layers(&b, &cache, &opts, tx, CancellationToken::new()),
    );
    for (fetched, image) in [(r1, &a), (r2, &a), (r3, &b)] {
        let fetched = fetched.expect("concurrent fetch");
        let digests: Vec<&str> = fetched
            .iter()
            .map(|l| l.descriptor.digest.as_str())
            .collect();
        assert_eq!(digests, image.layer_digests().collect::<Vec<_>>());
    }
    for (_, data) in layers_a
        .iter()
        .chain([(String::new(), only_b.clone())].iter())
    {
        let digest = sha256_digest(data);
        assert_eq!(
            std::fs::read(cache.path(&digest).expect("path")).expect("cached"),
            *data
        );
    }
    assert_eq!(cache.list().expect("list").len(), layers_a.len() + 1);
    assert!(partial_files(dir.path()).is_empty());

    // Only image b is still wanted.
    let referenced: HashSet<String> = b.layer_digests().map(str::to_string).collect();
    let stats = cache.prune(&referenced).expect("prune");
    assert_eq!(stats.removed, layers_a.len() - 1);
    let freed: u64 = layers_a[1..].iter().map(|(_, d)| d.len() as u64).sum();
    assert_eq!(stats.bytes_freed, freed);
    let mut left: Vec<String> = cache
        .list()
        .expect("list")
        .into_iter()
        .map(|blob| blob.digest)
        .collect();
    left.sort();
    let mut want: Vec<String> = referenced.into_iter().collect();
    want.sort();
    assert_eq!(left, want);
    assert_eq!(blob_dir_names(&cache).len(), 2);
}
