//! [`PullError`]: everything that can go wrong resolving or fetching an
//! image, each variant saying what failed and what the user can do, and
//! the mapping from oci-client's errors onto it.

use oci_client::errors::{OciDistributionError, OciErrorCode};

use super::auth::{CredentialOrigin, CredentialsError};
use super::platform::Platform;
use crate::cache::CacheError;

/// Errors of [`super::resolve`] and [`super::fetch_layers`].
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The reference does not parse.
    #[error("invalid image reference {input:?}: expected [registry/]name[:tag][@sha256:digest]")]
    InvalidReference {
        /// What the user typed.
        input: String,
        /// The parser's complaint.
        #[source]
        source: oci_client::ParseError,
    },
    /// The Docker config (or a credential helper) could not be read.
    #[error("cannot load registry credentials")]
    Credentials(#[from] CredentialsError),
    /// The HTTP client could not be configured.
    #[error("cannot set up the registry client")]
    ClientSetup(#[source] Box<OciDistributionError>),
    /// No connection to the registry.
    #[error("cannot reach registry {registry} over {scheme}{hint}")]
    Unreachable {
        /// `host[:port]`.
        registry: String,
        /// `http` or `https`.
        scheme: &'static str,
        /// What to try.
        hint: &'static str,
        /// The transport error.
        #[source]
        source: Box<OciDistributionError>,
    },
    /// The registry wants (other) credentials.
    #[error("registry {registry} {detail}")]
    Unauthorized {
        /// `host[:port]`.
        registry: String,
        /// Where the credentials came from.
        origin: CredentialOrigin,
        /// `refused the credentials for <repo> (<origin>): <what to do>`.
        detail: String,
        /// The registry's answer.
        #[source]
        source: Box<OciDistributionError>,
    },
    /// The repository, tag or digest does not exist.
    #[error("image {reference} not found on {registry}: check the repository name and tag")]
    NotFound {
        /// The full reference.
        reference: String,
        /// `host[:port]`.
        registry: String,
        /// The registry's answer.
        #[source]
        source: Box<OciDistributionError>,
    },
    /// Any other registry failure.
    #[error("registry {registry} failed to serve the {what} of {reference}")]
    Registry {
        /// `host[:port]`.
        registry: String,
        /// The full reference.
        reference: String,
        /// manifest, config, layer…
        what: &'static str,
        /// The cause.
        #[source]
        source: Box<OciDistributionError>,
    },
    /// The image index has no manifest for the wanted platform.
    #[error(
        "{reference} has no image for {wanted}; it offers: {}; choose one with --platform",
        list_or_none(available)
    )]
    PlatformUnavailable {
        /// The full reference.
        reference: String,
        /// What was asked for.
        wanted: Platform,
        /// `os/arch[/variant]` of every image in the index.
        available: Vec<String>,
    },
    /// A single-platform image built for another platform.
    #[error("{reference} is a {found} image, but {wanted} was asked for; pass --platform {found} to use it anyway")]
    PlatformMismatch {
        /// The full reference.
        reference: String,
        /// What was asked for.
        wanted: Platform,
        /// `os/arch[/variant]` from the image config.
        found: String,
    },
    /// The manifest points at something that is not a container image.
    #[error("{reference} is not a container image (its config has media type {media_type})")]
    NotAnImage {
        /// The full reference.
        reference: String,
        /// The config's media type.
        media_type: String,
    },
    /// An image without filesystem layers.
    #[error("{reference} has no layers")]
    NoLayers {
        /// The full reference.
        reference: String,
    },
    /// A layer banger cannot unpack.
    #[error("layer {digest} of {reference} has unsupported media type {media_type} ({reason}); banger pulls only tar, tar+gzip and tar+zstd layers")]
    UnsupportedLayer {
        /// The full reference.
        reference: String,
        /// The layer.
        digest: String,
        /// Its media type.
        media_type: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A manifest we cannot use.
    #[error("the manifest of {reference} is unusable: {detail}")]
    InvalidManifest {
        /// The full reference.
        reference: String,
        /// What is wrong.
        detail: String,
    },
    /// The image config is not JSON of the right shape.
    #[error("the image config of {reference} is not valid")]
    InvalidConfig {
        /// The full reference.
        reference: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// Downloaded bytes hash to another digest.
    #[error("blob {digest} from {registry} does not match its digest (got {actual}): the registry served corrupt or tampered data; nothing was cached, retry the pull")]
    DigestMismatch {
        /// `host[:port]`.
        registry: String,
        /// The expected digest.
        digest: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// The blob ended early.
    #[error("blob {digest} from {registry} is truncated: expected {expected} bytes, got {actual}; nothing was cached, retry the pull")]
    Truncated {
        /// `host[:port]`.
        registry: String,
        /// The blob.
        digest: String,
        /// Size from the manifest.
        expected: u64,
        /// Bytes received.
        actual: u64,
    },
    /// The blob is larger than the manifest says.
    #[error("blob {digest} from {registry} is larger than the {expected} bytes its manifest declares; refusing it")]
    Oversized {
        /// `host[:port]`.
        registry: String,
        /// The blob.
        digest: String,
        /// Size from the manifest.
        expected: u64,
    },
    /// The transfer broke off.
    #[error("downloading blob {digest} from {registry} failed; retry the pull")]
    Download {
        /// `host[:port]`.
        registry: String,
        /// The blob.
        digest: String,
        /// The transport error.
        #[source]
        source: std::io::Error,
    },
    /// The local layer cache failed.
    #[error("cannot store layer {digest} in the layer cache")]
    Cache {
        /// The layer.
        digest: String,
        /// The cache's error.
        #[source]
        source: CacheError,
    },
    /// The caller cancelled the pull.
    #[error("pull cancelled")]
    Cancelled,
    /// A download task panicked.
    #[error("the download task for layer {digest} died")]
    Task {
        /// The layer.
        digest: String,
        /// The panic.
        #[source]
        source: tokio::task::JoinError,
    },
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "no platform-specific images".to_string()
    } else {
        items.join(", ")
    }
}

/// The context an oci-client error happened in.
pub(crate) struct Context<'a> {
    pub registry: &'a str,
    pub repository: &'a str,
    pub reference: &'a str,
    pub plain_http: bool,
    pub origin: &'a CredentialOrigin,
    pub anonymous: bool,
}

impl Context<'_> {
    /// Maps an oci-client error met while fetching `what`.
    pub(crate) fn classify(&self, what: &'static str, source: OciDistributionError) -> PullError {
        let kind = kind(&source);
        let source = Box::new(source);
        match kind {
            Kind::Unauthorized => self.unauthorized(source),
            Kind::NotFound => PullError::NotFound {
                reference: self.reference.to_string(),
                registry: self.registry.to_string(),
                source,
            },
            Kind::Unreachable => PullError::Unreachable {
                registry: self.registry.to_string(),
                scheme: if self.plain_http { "http" } else { "https" },
                hint: if self.plain_http {
                    ": is it running?"
                } else {
                    ": if it serves plain HTTP, pass --insecure"
                },
                source,
            },
            Kind::Other => PullError::Registry {
                registry: self.registry.to_string(),
                reference: self.reference.to_string(),
                what,
                source,
            },
        }
    }

    fn unauthorized(&self, source: Box<OciDistributionError>) -> PullError {
        let login = format!("`docker login {}`", self.registry);
        let (refused, hint) = match self.origin {
            CredentialOrigin::None { config } => (
                "requires credentials",
                format!(
                    "log in with {login}; banger reads {}",
                    config
                        .as_ref()
                        .map_or("~/.docker/config.json".to_string(), |p| p
                            .display()
                            .to_string())
                ),
            ),
            CredentialOrigin::DockerConfig(path) => (
                "refused the credentials",
                format!(
                    "check the entry for {} in {} (or run {login} again); the account may also lack pull access",
                    self.registry,
                    path.display()
                ),
            ),
            CredentialOrigin::Helper { helper, .. } => (
                "refused the credentials",
                format!("check what {helper} stores for it (or run {login} again)"),
            ),
            CredentialOrigin::Explicit => (
                if self.anonymous {
                    "requires credentials"
                } else {
                    "refused the credentials"
                },
                "check the credentials passed in".to_string(),
            ),
        };
        PullError::Unauthorized {
            registry: self.registry.to_string(),
            origin: self.origin.clone(),
            detail: format!(
                "{refused} for {} ({}): {hint}",
                self.repository, self.origin
            ),
            source,
        }
    }
}

enum Kind {
    Unauthorized,
    NotFound,
    Unreachable,
    Other,
}

fn kind(error: &OciDistributionError) -> Kind {
    match error {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => Kind::Unauthorized,
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes = || envelope.errors.iter().map(|e| &e.code);
            if codes().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                Kind::Unauthorized
            } else if codes().any(|c| {
                matches!(
                    c,
                    OciErrorCode::NameUnknown
                        | OciErrorCode::ManifestUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                Kind::NotFound
            } else {
                Kind::Other
            }
        }
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => Kind::Unauthorized,
        OciDistributionError::ServerError { code: 404, .. } => Kind::NotFound,
        OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
            Kind::Unreachable
        }
        _ => Kind::Other,
    }
}
