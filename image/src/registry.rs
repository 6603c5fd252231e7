//! Pulling images from OCI registries: [`resolve`] turns a reference into
//! a platform-specific manifest, its config and its layer list;
//! [`fetch_layers`] downloads the layers that are not cached yet into the
//! [`LayerCache`], in parallel, verified, cancellable, with progress
//! events. oci-client does the HTTP, the bearer-token dance and manifest
//! parsing; this module chooses the platform, decides HTTP vs HTTPS,
//! supplies credentials from the Docker config, checks media types and
//! turns failures into [`PullError`]s that say what to do.
//!
//! The `ImageRegistry` actor calls both; the CLI only sees their events
//! and errors. See `docs/image-pull.md`.

mod auth;
mod error;
mod manifest;
mod platform;
mod reference;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::instrument;

use crate::cache::{validate_digest, CacheError, LayerCache};

pub use auth::{
    docker_config_path, CredentialOrigin, CredentialSource, Credentials, CredentialsError,
    DockerConfig, Lookup, DOCKER_HUB_AUTH_KEY,
};
pub use error::PullError;
pub use manifest::{
    layer_compression, Compression, ImageConfig, LayerDescriptor, Unsupported, DOCKER_CONFIG,
    DOCKER_LAYER_GZIP, DOCKER_LAYER_TAR, DOCKER_LAYER_ZSTD, OCI_CONFIG, OCI_LAYER_GZIP,
    OCI_LAYER_TAR, OCI_LAYER_ZSTD,
};
pub use platform::{ParsePlatformError, Platform};
pub use reference::{
    default_image_name, is_loopback_registry, parse_reference, Reference, MAX_NAME_LEN,
};

use error::Context;

/// Default number of layers downloaded at once.
pub const DEFAULT_CONCURRENT_DOWNLOADS: usize = 4;

/// Minimum time between two progress events of one layer.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Image configs larger than this are refused (real ones are a few KiB).
const MAX_CONFIG_SIZE: i64 = 4 << 20;

/// How to talk to the registry.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Platform to pick from multi-platform images.
    pub platform: Platform,
    /// Use plain HTTP for this registry even if it is not on loopback.
    /// Loopback registries (127.0.0.0/8, `localhost`, `[::1]`) always get
    /// plain HTTP; everything else HTTPS unless this is set.
    pub insecure: bool,
    /// Where credentials come from.
    pub credentials: CredentialSource,
    /// Layers downloaded at once (at least 1).
    pub max_concurrent_downloads: usize,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for any single read from the registry.
    pub read_timeout: Duration,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: Platform::default(),
            insecure: false,
            credentials: CredentialSource::default(),
            max_concurrent_downloads: DEFAULT_CONCURRENT_DOWNLOADS,
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// An image pinned to one platform-specific manifest.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The reference as given (tag or digest).
    pub reference: Reference,
    /// Digest of the platform-specific image manifest.
    pub manifest_digest: String,
    /// Digest of the image index the manifest was picked from, if any.
    pub index_digest: Option<String>,
    /// `os/arch[/variant]` of the image, from the index or the config.
    pub platform: Option<String>,
    /// Digest of the image config blob.
    pub config_digest: String,
    /// The parsed image config.
    pub config: ImageConfig,
    /// Layers, bottom first.
    pub layers: Vec<LayerDescriptor>,
}

impl ResolvedImage {
    /// Every blob digest this image needs from the cache (for
    /// [`LayerCache::prune`]).
    pub fn layer_digests(&self) -> impl Iterator<Item = &str> {
        self.layers.iter().map(|l| l.digest.as_str())
    }
}

/// A layer available in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedLayer {
    /// The layer.
    pub descriptor: LayerDescriptor,
    /// Its blob in the cache.
    pub path: PathBuf,
    /// `true` if it was already cached before this fetch.
    pub cached: bool,
}

/// Progress of a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// Per-layer progress: sent when a download starts, at most every
    /// [`PROGRESS_INTERVAL`] while it runs (dropped if the channel is full)
    /// and always on completion (`bytes_done == bytes_total`). A layer that
    /// was already cached gets a single event with `cached: true`.
    Layer {
        /// The layer.
        digest: String,
        /// Bytes received so far.
        bytes_done: u64,
        /// The layer's size.
        bytes_total: u64,
        /// Served from the cache, not downloaded.
        cached: bool,
    },
}

/// Credentials and a configured client for one registry.
struct Session {
    client: Client,
    auth: RegistryAuth,
    anonymous: bool,
    origin: CredentialOrigin,
    registry: String,
    repository: String,
    reference: String,
    plain_http: bool,
}

impl Session {
    async fn new(reference: &Reference, opts: &PullOptions) -> Result<Self, PullError> {
        let (credentials, origin) =
            auth::resolve_credentials(&opts.credentials, reference.registry()).await?;
        let registry = reference.resolve_registry().to_string();
        let protocol = client_protocol(&registry, opts.insecure);
        let plain_http = protocol != ClientProtocol::Https;
        let config = ClientConfig {
            protocol,
            platform_resolver: None,
            max_concurrent_download: opts.max_concurrent_downloads.max(1),
            connect_timeout: Some(opts.connect_timeout),
            read_timeout: Some(opts.read_timeout),
            ..ClientConfig::default()
        };
        let client = Client::try_from(config).map_err(|e| PullError::ClientSetup(Box::new(e)))?;
        tracing::debug!(%registry, plain_http, credentials = ?credentials, "registry session");
        Ok(Session {
            client,
            auth: credentials.to_registry_auth(),
            anonymous: credentials.is_anonymous(),
            origin,
            registry,
            repository: reference.repository().to_string(),
            reference: reference.whole(),
            plain_http,
        })
    }

    fn context(&self) -> Context<'_> {
        Context {
            registry: &self.registry,
            repository: &self.repository,
            reference: &self.reference,
            plain_http: self.plain_http,
            origin: &self.origin,
            anonymous: self.anonymous,
        }
    }

    /// Stores the credentials in the client and runs the token dance once,
    /// so parallel requests share the token.
    async fn authenticate(&self, reference: &Reference) -> Result<(), PullError> {
        self.client
            .auth(reference, &self.auth, RegistryOperation::Pull)
            .await
            .map(|_| ())
            .map_err(|e| self.context().classify("authentication", e))
    }

    fn digest_error(&self, what: &'static str, source: OciDistributionError) -> PullError {
        if let OciDistributionError::DigestError(DigestError::VerificationError {
            expected,
            actual,
        }) = &source
        {
            return PullError::DigestMismatch {
                registry: self.registry.clone(),
                digest: expected.clone(),
                actual: actual.clone(),
            };
        }
        self.context().classify(what, source)
    }
}

/// Plain HTTP for loopback registries and when asked for (`insecure`),
/// HTTPS for everything else.
fn client_protocol(registry: &str, insecure: bool) -> ClientProtocol {
    if insecure || is_loopback_registry(registry) {
        ClientProtocol::HttpsExcept(vec![registry.to_string()])
    } else {
        ClientProtocol::Https
    }
}

/// Resolves `reference` to one platform-specific image: pulls the manifest
/// (picking `opts.platform` out of an image index), checks that every
/// layer has a media type banger can unpack, and pulls and parses the
/// image config. Nothing is written to disk.
#[instrument(skip_all, fields(reference = %reference))]
pub async fn resolve(
    reference: &Reference,
    opts: &PullOptions,
) -> Result<ResolvedImage, PullError> {
    let session = Session::new(reference, opts).await?;
    session.authenticate(reference).await?;
    let whole = reference.whole();

    let (manifest, digest) = session
        .client
        .pull_manifest(reference, &session.auth)
        .await
        .map_err(|e| manifest_error(&session, e))?;
    let (manifest, manifest_digest, index_digest, platform) = match manifest {
        OciManifest::Image(manifest) => (manifest, digest, None, None),
        OciManifest::ImageIndex(index) => {
            let entry = platform::select_manifest(&index.manifests, &opts.platform).map_err(
                |available| PullError::PlatformUnavailable {
                    reference: whole.clone(),
                    wanted: opts.platform.clone(),
                    available,
                },
            )?;
            tracing::debug!(digest = %entry.digest, platform = ?platform::entry_platform(entry), "picked manifest from index");
            let pinned = reference.clone_with_digest(entry.digest.clone());
            let (manifest, manifest_digest) = session
                .client
                .pull_manifest(&pinned, &session.auth)
                .await
                .map_err(|e| manifest_error(&session, e))?;
            match manifest {
                OciManifest::Image(manifest) => (
                    manifest,
                    manifest_digest,
                    Some(digest),
                    platform::entry_platform(entry),
                ),
                OciManifest::ImageIndex(_) => {
                    return Err(PullError::InvalidManifest {
                        reference: whole,
                        detail: format!(
                            "index entry {} is another index, not an image manifest",
                            entry.digest
                        ),
                    })
                }
            }
        }
    };

    let layers = check_manifest(&whole, &manifest)?;
    let config_digest = manifest.config.digest.clone();
    let mut config_bytes = Vec::new();
    session
        .client
        .pull_blob(reference, &manifest.config, &mut config_bytes)
        .await
        .map_err(|e| session.digest_error("config", e))?;
    let config = ImageConfig::parse(&config_bytes).map_err(|source| PullError::InvalidConfig {
        reference: whole.clone(),
        source,
    })?;

    let platform = match platform {
        Some(platform) => Some(platform),
        None => check_single_platform(&whole, &config, &opts.platform)?,
    };
    tracing::info!(%manifest_digest, layers = layers.len(), platform = platform.as_deref().unwrap_or("unknown"), "resolved image");
    Ok(ResolvedImage {
        reference: reference.clone(),
        manifest_digest,
        index_digest,
        platform,
        config_digest,
        config,
        layers,
    })
}

fn manifest_error(session: &Session, e: OciDistributionError) -> PullError {
    let reference = session.reference.clone();
    match e {
        OciDistributionError::UnsupportedSchemaVersionError(v) => PullError::InvalidManifest {
            reference,
            detail: format!(
                "schema version {v} is not supported (only schema 2 / OCI manifests are)"
            ),
        },
        OciDistributionError::UnsupportedMediaTypeError(m) => PullError::InvalidManifest {
            reference,
            detail: format!("manifest media type {m} is not an image manifest or index"),
        },
        OciDistributionError::ManifestParsingError(m)
        | OciDistributionError::VersionedParsingError(m) => PullError::InvalidManifest {
            reference,
            detail: m,
        },
        e => session.digest_error("manifest", e),
    }
}

/// The layers of `manifest`, if the manifest is an image banger can use.
fn check_manifest(
    reference: &str,
    manifest: &OciImageManifest,
) -> Result<Vec<LayerDescriptor>, PullError> {
    let invalid = |detail: String| PullError::InvalidManifest {
        reference: reference.to_string(),
        detail,
    };
    let config = &manifest.config;
    if config.media_type != OCI_CONFIG && config.media_type != DOCKER_CONFIG {
        return Err(PullError::NotAnImage {
            reference: reference.to_string(),
            media_type: config.media_type.clone(),
        });
    }
    if validate_digest(&config.digest).is_err() {
        return Err(invalid(format!(
            "config digest {:?} is not sha256",
            config.digest
        )));
    }
    if !(0..=MAX_CONFIG_SIZE).contains(&config.size) {
        return Err(invalid(format!(
            "config size {} is out of range",
            config.size
        )));
    }
    if manifest.layers.is_empty() {
        return Err(PullError::NoLayers {
            reference: reference.to_string(),
        });
    }
    manifest
        .layers
        .iter()
        .map(|layer| {
            if let Err(why) = layer_compression(&layer.media_type) {
                return Err(PullError::UnsupportedLayer {
                    reference: reference.to_string(),
                    digest: layer.digest.clone(),
                    media_type: layer.media_type.clone(),
                    reason: why.reason(),
                });
            }
            if validate_digest(&layer.digest).is_err() {
                return Err(invalid(format!(
                    "layer digest {:?} is not sha256",
                    layer.digest
                )));
            }
            let size = u64::try_from(layer.size)
                .map_err(|_| invalid(format!("layer {} has size {}", layer.digest, layer.size)))?;
            Ok(LayerDescriptor {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
                size,
            })
        })
        .collect()
}

/// For an image that is not an index: refuse it if its config names
/// another platform than the wanted one.
fn check_single_platform(
    reference: &str,
    config: &ImageConfig,
    wanted: &Platform,
) -> Result<Option<String>, PullError> {
    let (Some(os), Some(arch)) = (&config.os, &config.architecture) else {
        return Ok(None);
    };
    let found = match &config.variant {
        Some(v) => format!("{os}/{arch}/{v}"),
        None => format!("{os}/{arch}"),
    };
    if wanted.matches(os, arch, config.variant.as_deref()) {
        Ok(Some(found))
    } else {
        Err(PullError::PlatformMismatch {
            reference: reference.to_string(),
            wanted: wanted.clone(),
            found,
        })
    }
}

/// Makes every layer of `resolved` available in `cache`, downloading the
/// missing ones (up to `opts.max_concurrent_downloads` at once), and
/// returns them in manifest order. Layers already cached are reported
/// with `cached: true` and never touch the network. Each download is
/// streamed into the cache and verified against its digest and size.
///
/// When `cancel` fires, running downloads stop at their next chunk, their
/// partial files are removed before this returns, and the result is
/// [`PullError::Cancelled`]. When one layer fails, the others are stopped
/// too and the first failure is returned; layers that completed stay
/// cached.
#[instrument(skip_all, fields(reference = %resolved.reference, layers = resolved.layers.len()))]
pub async fn fetch_layers(
    resolved: &ResolvedImage,
    cache: &LayerCache,
    opts: &PullOptions,
    progress: mpsc::Sender<PullEvent>,
    cancel: CancellationToken,
) -> Result<Vec<CachedLayer>, PullError> {
    if cancel.is_cancelled() {
        return Err(PullError::Cancelled);
    }
    let mut done: Vec<Option<CachedLayer>> = vec![None; resolved.layers.len()];
    let mut missing = Vec::new();
    for (i, layer) in resolved.layers.iter().enumerate() {
        let cache_err = |source: CacheError| PullError::Cache {
            digest: layer.digest.clone(),
            source,
        };
        match cache.get(&layer.digest).map_err(cache_err)? {
            Some(blob) if blob.size == layer.size => {
                let event = PullEvent::Layer {
                    digest: layer.digest.clone(),
                    bytes_done: layer.size,
                    bytes_total: layer.size,
                    cached: true,
                };
                send_or_cancel(&progress, event, &cancel).await?;
                done[i] = Some(CachedLayer {
                    descriptor: layer.clone(),
                    path: blob.path,
                    cached: true,
                });
            }
            Some(blob) => {
                tracing::warn!(digest = %layer.digest, size = blob.size, expected = layer.size, "cached blob has the wrong size; fetching it again");
                cache.remove(&layer.digest).map_err(cache_err)?;
                missing.push(i);
            }
            None => missing.push(i),
        }
    }
    if missing.is_empty() {
        return Ok(done.into_iter().flatten().collect());
    }

    let session = Arc::new(Session::new(&resolved.reference, opts).await?);
    session.authenticate(&resolved.reference).await?;
    let stop = cancel.child_token();
    let permits = Arc::new(Semaphore::new(opts.max_concurrent_downloads.max(1)));
    let mut tasks = JoinSet::new();
    let mut task_digests = std::collections::HashMap::new();
    for i in missing {
        let layer = resolved.layers[i].clone();
        let digest = layer.digest.clone();
        let job = Download {
            session: Arc::clone(&session),
            reference: resolved.reference.clone(),
            cache: cache.clone(),
            progress: progress.clone(),
            layer,
        };
        let stop = stop.clone();
        let permits = Arc::clone(&permits);
        let handle = tasks.spawn(async move {
            let result = tokio::select! {
                biased;
                _ = stop.cancelled() => Err(PullError::Cancelled),
                result = async {
                    let _permit = permits.acquire_owned().await;
                    job.run().await
                } => result,
            };
            (i, result)
        });
        task_digests.insert(handle.id(), digest);
    }

    let mut failure: Option<PullError> = None;
    while let Some(joined) = tasks.join_next().await {
        let error = match joined {
            Ok((i, Ok(layer))) => {
                done[i] = Some(layer);
                continue;
            }
            Ok((_, Err(error))) => error,
            Err(join_error) => PullError::Task {
                digest: task_digests
                    .get(&join_error.id())
                    .cloned()
                    .unwrap_or_default(),
                source: join_error,
            },
        };
        stop.cancel();
        let replace = match (&failure, &error) {
            (None, _) => true,
            (Some(PullError::Cancelled), e) => !matches!(e, PullError::Cancelled),
            _ => false,
        };
        if replace {
            failure = Some(error);
        }
    }
    if cancel.is_cancelled() {
        return Err(PullError::Cancelled);
    }
    if let Some(error) = failure {
        tracing::error!(%error, "pull failed");
        return Err(error);
    }
    Ok(done.into_iter().flatten().collect())
}

async fn send_or_cancel(
    progress: &mpsc::Sender<PullEvent>,
    event: PullEvent,
    cancel: &CancellationToken,
) -> Result<(), PullError> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(PullError::Cancelled),
        // A closed channel only means nobody watches the progress.
        _ = progress.send(event) => Ok(()),
    }
}

/// One layer download.
struct Download {
    session: Arc<Session>,
    reference: Reference,
    cache: LayerCache,
    progress: mpsc::Sender<PullEvent>,
    layer: LayerDescriptor,
}

impl Download {
    async fn run(self) -> Result<CachedLayer, PullError> {
        let Download {
            session,
            reference,
            cache,
            progress,
            layer,
        } = self;
        let digest = layer.digest.clone();
        let total = layer.size;
        let event = |bytes_done| PullEvent::Layer {
            digest: digest.clone(),
            bytes_done,
            bytes_total: total,
            cached: false,
        };
        let _ = progress.send(event(0)).await;

        let descriptor = OciDescriptor {
            media_type: layer.media_type.clone(),
            digest: digest.clone(),
            size: i64::try_from(total).unwrap_or(i64::MAX),
            ..OciDescriptor::default()
        };
        let blob = session
            .client
            .pull_blob_stream(&reference, &descriptor)
            .await
            .map_err(|e| session.context().classify("layer", e))?;
        // oci-client verifies the digest too and reports a mismatch as a
        // stream error after the last chunk; end the stream there instead
        // and let the cache report it with both digests.
        let stream = blob
            .stream
            .take_while(|item| futures::future::ready(!is_digest_error(item)));
        let mut last = Instant::now();
        let inserted = cache
            .insert_stream(&digest, total, stream, |bytes_done| {
                if last.elapsed() >= PROGRESS_INTERVAL {
                    last = Instant::now();
                    let _ = progress.try_send(event(bytes_done));
                }
            })
            .await
            .map_err(|e| cache_error(&session.registry, &digest, e))?;
        let _ = progress.send(event(total)).await;
        tracing::debug!(%digest, bytes = total, stored = inserted.stored_by_us, "layer downloaded");
        Ok(CachedLayer {
            descriptor: layer,
            path: inserted.blob.path,
            cached: false,
        })
    }
}

fn is_digest_error(item: &std::io::Result<bytes::Bytes>) -> bool {
    match item {
        Err(e) => e
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<DigestError>().is_some()),
        Ok(_) => false,
    }
}

fn cache_error(registry: &str, digest: &str, error: CacheError) -> PullError {
    let registry = registry.to_string();
    match error {
        CacheError::DigestMismatch { expected, actual } => PullError::DigestMismatch {
            registry,
            digest: expected,
            actual,
        },
        CacheError::Truncated {
            digest,
            expected,
            actual,
        } => PullError::Truncated {
            registry,
            digest,
            expected,
            actual,
        },
        CacheError::Oversized { digest, expected } => PullError::Oversized {
            registry,
            digest,
            expected,
        },
        CacheError::Stream { digest, source } => PullError::Download {
            registry,
            digest,
            source,
        },
        source => PullError::Cache {
            digest: digest.to_string(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_loopback_or_insecure() {
        let http = |r: &str| ClientProtocol::HttpsExcept(vec![r.to_string()]);
        for registry in [
            "127.0.0.1:5000",
            "localhost:5000",
            "[::1]:5000",
            "127.9.9.9",
        ] {
            assert_eq!(client_protocol(registry, false), http(registry));
        }
        for registry in [
            "index.docker.io",
            "ghcr.io",
            "10.0.0.5:5000",
            "registry.local",
        ] {
            assert_eq!(client_protocol(registry, false), ClientProtocol::Https);
            assert_eq!(client_protocol(registry, true), http(registry));
        }
    }

    #[test]
    fn error_messages_say_what_to_do() {
        let origin = CredentialOrigin::None {
            config: Some(PathBuf::from("/home/u/.docker/config.json")),
        };
        let ctx = Context {
            registry: "registry.example",
            repository: "team/app",
            reference: "registry.example/team/app:v1",
            plain_http: false,
            origin: &origin,
            anonymous: true,
        };
        let unauthorized = OciDistributionError::UnauthorizedError {
            url: "https://registry.example/v2/team/app/manifests/v1".into(),
        };
        let message = ctx.classify("manifest", unauthorized).to_string();
        assert_eq!(
            message,
            "registry registry.example requires credentials for team/app (no credentials for it \
             in /home/u/.docker/config.json): log in with `docker login registry.example`; \
             banger reads /home/u/.docker/config.json"
        );
        let denied = OciDistributionError::ServerError {
            code: 403,
            url: String::new(),
            message: String::new(),
        };
        assert!(matches!(
            ctx.classify("layer", denied),
            PullError::Unauthorized { .. }
        ));
        let missing = OciDistributionError::ServerError {
            code: 404,
            url: String::new(),
            message: String::new(),
        };
        assert!(matches!(
            ctx.classify("manifest", missing),
            PullError::NotFound { .. }
        ));
        let err = PullError::PlatformUnavailable {
            reference: "x".into(),
            wanted: "linux/riscv64".parse().expect("platform"),
            available: vec![],
        };
        assert_eq!(
            err.to_string(),
            "x has no image for linux/riscv64; it offers: no platform-specific images; \
             choose one with --platform"
        );
    }
}
