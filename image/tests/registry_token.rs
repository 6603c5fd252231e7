//! Bearer-token auth against a real registry: the registry answers 401
//! with a `Bearer realm=...` challenge, the client fetches a JWT from the
//! token server with basic credentials and sends it as
//! `Authorization: Bearer`. Credentials come from a Docker `config.json`
//! found through `DOCKER_CONFIG` in one test function (so no other thread
//! reads the environment while it changes) and from an explicit config
//! file in the other.

mod registry_support;

use std::path::Path;

use banger_image::cache::LayerCache;
use banger_image::registry::{
    fetch_layers, parse_reference, resolve, CredentialOrigin, CredentialSource, PullError,
    PullOptions, OCI_LAYER_GZIP,
};
use banger_image::testing::{TestRegistry, TokenRequest, TOKEN_SERVICE};
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

fn creds(user: &str, password: &str) -> Option<(String, String)> {
    Some((user.to_string(), password.to_string()))
}

/// The token requests made since the first `since` ones.
fn token_requests_since(registry: &TestRegistry, since: usize) -> Vec<TokenRequest> {
    registry.token_requests().split_off(since)
}

/// Pushes `private/app:v1` (one gzip layer); returns the layer.
async fn push_private_app(registry: &TestRegistry) -> Vec<u8> {
    let layer = gzip(&tar_with(&[("private", b"token data")]));
    registry
        .push_image(
            "private/app",
            "v1",
            vec![(OCI_LAYER_GZIP.into(), layer.clone())],
            &config_json("amd64"),
        )
        .await;
    layer
}

#[tokio::test]
async fn bearer_token_auth_with_credentials_from_docker_config() {
    let registry = TestRegistry::start_with_token_auth("alice", "s3cret-pw");
    let host = registry.host();
    let layer = push_private_app(&registry).await;
    // The push went through the token server too, asking for push access.
    let pushes = registry.token_requests();
    assert!(
        pushes
            .iter()
            .any(|r| r.credentials == creds("alice", "s3cret-pw")
                && r.scopes == ["repository:private/app:pull,push"]
                && r.status == 200),
        "{pushes:#?}"
    );
    let reference = parse_reference(&registry.reference("private/app", "v1")).expect("reference");

    let root = tempfile::tempdir().expect("tempdir");
    let good = root.path().join("good");
    let wrong = root.path().join("wrong");
    let empty = root.path().join("empty");
    write_config(
        &good,
        serde_json::json!({"auths": {host.clone(): {"auth": b64("alice:s3cret-pw")}}}),
    );
    write_config(
        &wrong,
        serde_json::json!({"auths": {host.clone(): {"auth": b64("alice:guess")}}}),
    );
    write_config(
        &empty,
        serde_json::json!({"auths": {"other.example": {"auth": b64("x:y")}}}),
    );
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::open(cache_dir.path()).expect("cache");
    let opts = PullOptions::default();
    assert!(matches!(opts.credentials, CredentialSource::DockerConfig));

    // Right credentials: a pull token from the token server, then the
    // manifest, config and layer with it.
    std::env::set_var("DOCKER_CONFIG", &good);
    let before = registry.token_requests().len();
    let resolved = resolve(&reference, &opts)
        .await
        .unwrap_or_else(|e| panic!("resolve with good creds: {}\n{}", chain(&e), registry.log()));
    let (tx, _rx) = mpsc::channel(64);
    let fetched = fetch_layers(&resolved, &cache, &opts, tx, CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("fetch with good creds: {}\n{}", chain(&e), registry.log()));
    assert_eq!(std::fs::read(&fetched[0].path).expect("cached"), layer);
    let pulls = token_requests_since(&registry, before);
    assert!(
        pulls
            .iter()
            .any(|r| r.credentials == creds("alice", "s3cret-pw")
                && r.service.as_deref() == Some(TOKEN_SERVICE)
                && r.scopes == ["repository:private/app:pull"]
                && r.status == 200),
        "{pulls:#?}"
    );

    // Wrong password: the token server refuses it.
    std::env::set_var("DOCKER_CONFIG", &wrong);
    let before = registry.token_requests().len();
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
        )),
        "{message}"
    );
    let refused = token_requests_since(&registry, before);
    assert!(
        refused
            .iter()
            .any(|r| r.credentials == creds("alice", "guess") && r.status == 401),
        "{refused:#?}"
    );
    // Fetching fails the same way, before any layer is touched.
    let other_cache_dir = tempfile::tempdir().expect("tempdir");
    let other_cache = LayerCache::open(other_cache_dir.path()).expect("cache");
    let (tx, _rx) = mpsc::channel(64);
    let err = fetch_layers(&resolved, &other_cache, &opts, tx, CancellationToken::new())
        .await
        .expect_err("fetch with wrong password");
    assert!(matches!(err, PullError::Unauthorized { .. }), "{err:?}");
    assert!(other_cache.list().expect("list").is_empty());

    // No entry for this registry: an anonymous token, without access, which
    // the registry refuses.
    std::env::set_var("DOCKER_CONFIG", &empty);
    let before = registry.token_requests().len();
    let err = resolve(&reference, &opts).await.expect_err("anonymous");
    assert!(
        matches!(&err, PullError::Unauthorized { registry: r, .. } if r == &host),
        "{err:?}"
    );
    let message = chain(&err);
    assert!(
        message.contains("requires credentials")
            && message.contains(&format!("docker login {host}")),
        "{message}"
    );
    let anonymous = token_requests_since(&registry, before);
    assert!(
        anonymous
            .iter()
            .any(|r| r.credentials.is_none() && r.status == 200),
        "{anonymous:#?}"
    );
    std::env::remove_var("DOCKER_CONFIG");
}

/// Tokens sent as is (`registrytoken`): the registry checks their
/// signature and scope itself.
#[tokio::test]
async fn registry_verifies_bearer_tokens() {
    let registry = TestRegistry::start_with_token_auth("alice", "s3cret-pw");
    let layer = push_private_app(&registry).await;
    let reference = parse_reference(&registry.reference("private/app", "v1")).expect("reference");
    let root = tempfile::tempdir().expect("tempdir");
    let config = root.path().join("config.json");
    let opts = PullOptions {
        credentials: CredentialSource::DockerConfigFile(config.clone()),
        ..PullOptions::default()
    };
    let with_token = |token: &str| {
        std::fs::write(
            &config,
            serde_json::to_vec(
                &serde_json::json!({"auths": {registry.host(): {"registrytoken": token}}}),
            )
            .expect("json"),
        )
        .expect("write config.json");
    };

    // A valid pull token: no token-server round trip.
    let token = registry.issue_token("private/app", &["pull"]);
    with_token(&token);
    let before = registry.token_requests().len();
    let resolved = resolve(&reference, &opts)
        .await
        .unwrap_or_else(|e| panic!("resolve with token: {}\n{}", chain(&e), registry.log()));
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::open(cache_dir.path()).expect("cache");
    let (tx, _rx) = mpsc::channel(64);
    let fetched = fetch_layers(&resolved, &cache, &opts, tx, CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("fetch with token: {}\n{}", chain(&e), registry.log()));
    assert_eq!(std::fs::read(&fetched[0].path).expect("cached"), layer);
    assert_eq!(registry.token_requests().len(), before);

    // Refused: a token for another repository, one whose claims were
    // changed after signing, and one that is no JWT at all.
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&b64url.decode(&parts[1]).expect("claims base64"))
            .expect("claims json");
    claims["sub"] = "mallory".into();
    parts[1] = b64url.encode(serde_json::to_vec(&claims).expect("json"));
    let tampered = parts.join(".");
    for (what, token) in [
        (
            "other repository",
            registry.issue_token("private/other", &["pull"]),
        ),
        ("tampered", tampered),
        ("garbage", "not-a-jwt".to_string()),
    ] {
        with_token(&token);
        let err = resolve(&reference, &opts)
            .await
            .expect_err(&format!("{what} token"));
        assert!(
            matches!(
                &err,
                PullError::Unauthorized {
                    origin: CredentialOrigin::DockerConfig(path),
                    ..
                } if path == &config
            ),
            "{what}: {err:?}"
        );
        assert!(
            err.to_string().contains("refused the credentials"),
            "{what}: {err}"
        );
    }
}
