//! Basic auth against a real registry, with credentials from a Docker
//! `config.json` found through `DOCKER_CONFIG`. One test function, so no
//! other thread reads the environment while it changes.

mod registry_support;

use std::path::Path;

use banger_image::cache::LayerCache;
use banger_image::registry::{
    fetch_layers, parse_reference, resolve, CredentialOrigin, CredentialSource, Credentials,
    PullError, PullOptions, OCI_LAYER_GZIP,
};
use banger_image::testing::TestRegistry;
use base64::Engine as _;
use registry_support::{chain, config_json, gzip, tar_with};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn write_config(dir: &Path, json: serde_json::Value) {
    std::fs::create_dir_all(dir).expect("config dir");
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&json).expect("json"),
    )
    .expect("write config.json");
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn basic_auth_with_credentials_from_docker_config() {
    let registry = TestRegistry::start_with_basic_auth("alice", "s3cret-pw");
    let host = registry.host();
    let layer = gzip(&tar_with(&[("private", b"data")]));
    registry
        .push_image(
            "private/app",
            "v1",
            vec![(OCI_LAYER_GZIP.into(), layer.clone())],
            &config_json("amd64"),
        )
        .await;
    let reference = parse_reference(&registry.reference("private/app", "v1")).expect("reference");

    let root = tempfile::tempdir().expect("tempdir");
    let good = root.path().join("good");
    let wrong = root.path().join("wrong");
    let empty = root.path().join("empty");
    write_config(
        &good,
        serde_json::json!({"auths": {host.clone(): {"auth": b64("alice:s3cret-pw")}}}),
    );
    // Keyed with a scheme, as some tools write it.
    write_config(
        &wrong,
        serde_json::json!({"auths": {format!("http://{host}"): {"auth": b64("alice:guess")}}}),
    );
    write_config(
        &empty,
        serde_json::json!({"auths": {"other.example": {"auth": b64("x:y")}}}),
    );
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::open(cache_dir.path()).expect("cache");
    let opts = PullOptions::default();
    assert!(matches!(opts.credentials, CredentialSource::DockerConfig));

    // Right credentials through $DOCKER_CONFIG.
    std::env::set_var("DOCKER_CONFIG", &good);
    let resolved = resolve(&reference, &opts)
        .await
        .expect("resolve with good creds");
    let (tx, _rx) = mpsc::channel(64);
    let fetched = fetch_layers(&resolved, &cache, &opts, tx, CancellationToken::new())
        .await
        .expect("fetch with good creds");
    assert_eq!(std::fs::read(&fetched[0].path).expect("cached"), layer);

    // Wrong password.
    std::env::set_var("DOCKER_CONFIG", &wrong);
    let err = resolve(&reference, &opts)
        .await
        .expect_err("wrong password");
    match &err {
        PullError::Unauthorized {
            registry: r,
            origin,
            ..
        } => {
            assert_eq!(r, &host);
            assert_eq!(
                origin,
                &CredentialOrigin::DockerConfig(wrong.join("config.json"))
            );
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "registry {host} refused the credentials for private/app"
        )) && message.contains(&wrong.join("config.json").display().to_string()),
        "{message}"
    );
    // Fetching with wrong credentials fails the same way, before any layer
    // is touched (the layer is cached, so use a fresh cache).
    let other_cache_dir = tempfile::tempdir().expect("tempdir");
    let other_cache = LayerCache::open(other_cache_dir.path()).expect("cache");
    let (tx, _rx) = mpsc::channel(64);
    let err = fetch_layers(&resolved, &other_cache, &opts, tx, CancellationToken::new())
        .await
        .expect_err("fetch with wrong password");
    assert!(matches!(err, PullError::Unauthorized { .. }), "{err:?}");
    assert!(other_cache.list().expect("list").is_empty());

    // No entry for this registry: anonymous, and told to log in.
    std::env::set_var("DOCKER_CONFIG", &empty);
    let err = resolve(&reference, &opts).await.expect_err("anonymous");
    let message = chain(&err);
    assert!(
        message.contains("requires credentials")
            && message.contains(&format!("docker login {host}")),
        "{message}"
    );

    // No config file at all.
    std::env::set_var("DOCKER_CONFIG", root.path().join("missing"));
    let err = resolve(&reference, &opts).await.expect_err("no config");
    assert!(matches!(err, PullError::Unauthorized { .. }), "{err:?}");

    // A broken config file is reported as such, not as an auth failure.
    std::fs::write(empty.join("config.json"), b"{\"auths\": ").expect("write");
    std::env::set_var("DOCKER_CONFIG", &empty);
    let err = resolve(&reference, &opts).await.expect_err("broken config");
    assert!(matches!(err, PullError::Credentials(_)), "{err:?}");
    assert!(chain(&err).contains("config.json"), "{}", chain(&err));
    std::env::remove_var("DOCKER_CONFIG");

    // An explicit config file, with username/password fields.
    let fields = root.path().join("fields");
    write_config(
        &fields,
        serde_json::json!({"auths": {host.clone(): {"username": "alice", "password": "s3cret-pw"}}}),
    );
    let opts = PullOptions {
        credentials: CredentialSource::DockerConfigFile(fields.join("config.json")),
        ..PullOptions::default()
    };
    resolve(&reference, &opts)
        .await
        .expect("resolve with config file");

    // Explicit credentials.
    let opts = PullOptions {
        credentials: CredentialSource::Explicit(Credentials::Basic {
            username: "alice".into(),
            password: "s3cret-pw".into(),
        }),
        ..PullOptions::default()
    };
    resolve(&reference, &opts)
        .await
        .expect("resolve with explicit creds");
    let opts = PullOptions {
        credentials: CredentialSource::Explicit(Credentials::Basic {
            username: "mallory".into(),
            password: "s3cret-pw".into(),
        }),
        ..PullOptions::default()
    };
    let err = resolve(&reference, &opts)
        .await
        .expect_err("explicit wrong user");
    assert!(
        matches!(
            &err,
            PullError::Unauthorized {
                origin: CredentialOrigin::Explicit,
                ..
            }
        ),
        "{err:?}"
    );
}
