//! What a resolved image is made of: its layers (with the media types we
//! accept) and the parts of its OCI image config a microVM needs.

use serde::{Deserialize, Serialize};

/// OCI tar layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI gzip tar layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd tar layer.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker tar layer.
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Docker gzip tar layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker zstd tar layer (written by some builders).
pub const DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";

/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// How a layer's tar stream is compressed (the unpacker's type).
pub use crate::unpack::Compression;

/// Why a layer media type is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsupported {
    /// Docker "foreign" or OCI "non-distributable" layers: their content
    /// lives outside the registry (Windows base layers).
    NonDistributable,
    /// A media type that is not a filesystem layer we know.
    Unknown,
}

impl Unsupported {
    /// Short explanation for messages.
    pub fn reason(self) -> &'static str {
        match self {
            Unsupported::NonDistributable => {
                "a foreign/non-distributable layer whose content lives outside the registry"
            }
            Unsupported::Unknown => "not a tar, tar+gzip or tar+zstd filesystem layer",
        }
    }
}

/// The compression of a layer media type we can unpack.
pub fn layer_compression(media_type: &str) -> Result<Compression, Unsupported> {
    match media_type {
        OCI_LAYER_TAR | DOCKER_LAYER_TAR => Ok(Compression::None),
        OCI_LAYER_GZIP | DOCKER_LAYER_GZIP => Ok(Compression::Gzip),
        OCI_LAYER_ZSTD | DOCKER_LAYER_ZSTD => Ok(Compression::Zstd),
        m if m.contains(".foreign.") || m.contains(".nondistributable.") => {
            Err(Unsupported::NonDistributable)
        }
        _ => Err(Unsupported::Unknown),
    }
}

/// One layer of a resolved image.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerDescriptor {
    /// `sha256:<hex>` of the blob as stored (compressed).
    pub digest: String,
    /// The layer's media type (one [`layer_compression`] accepts).
    pub media_type: String,
    /// Size of the blob in bytes.
    pub size: u64,
}

impl LayerDescriptor {
    /// How the blob is compressed.
    pub fn compression(&self) -> Compression {
        // `resolve` only lets supported media types through.
        layer_compression(&self.media_type).unwrap_or(Compression::None)
    }
}

/// The parts of an OCI/Docker image config banger uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `architecture`, if given.
    pub architecture: Option<String>,
    /// `os`, if given.
    pub os: Option<String>,
    /// `variant`, if given.
    pub variant: Option<String>,
    /// `config.Env`: `KEY=value` strings.
    pub env: Vec<String>,
    /// `config.Entrypoint`.
    pub entrypoint: Option<Vec<String>>,
    /// `config.Cmd`.
    pub cmd: Option<Vec<String>>,
    /// `config.WorkingDir` (`None` when empty).
    pub working_dir: Option<String>,
    /// `config.User` (`None` when empty).
    pub user: Option<String>,
    /// `rootfs.diff_ids`: digests of the uncompressed layers, in order.
    pub diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    config: Option<RawContainerConfig>,
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize)]
struct RawContainerConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

impl ImageConfig {
    /// Parses an image config blob. Unknown fields are ignored; JSON
    /// `null` counts as absent.
    pub fn parse(json: &[u8]) -> Result<Self, serde_json::Error> {
        let raw: RawConfig = serde_json::from_slice(json)?;
        let c = raw.config;
        let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
        Ok(ImageConfig {
            architecture: non_empty(raw.architecture),
            os: non_empty(raw.os),
            variant: non_empty(raw.variant),
            env: c.as_ref().and_then(|c| c.env.clone()).unwrap_or_default(),
            entrypoint: c.as_ref().and_then(|c| c.entrypoint.clone()),
            cmd: c.as_ref().and_then(|c| c.cmd.clone()),
            working_dir: non_empty(c.as_ref().and_then(|c| c.working_dir.clone())),
            user: non_empty(c.as_ref().and_then(|c| c.user.clone())),
            diff_ids: raw.rootfs.map(|r| r.diff_ids).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        assert_eq!(layer_compression(OCI_LAYER_GZIP), Ok(Compression::Gzip));
        assert_eq!(layer_compression(DOCKER_LAYER_GZIP), Ok(Compression::Gzip));
        assert_eq!(layer_compression(OCI_LAYER_ZSTD), Ok(Compression::Zstd));
        assert_eq!(layer_compression(OCI_LAYER_TAR), Ok(Compression::None));
        assert_eq!(
            layer_compression("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
            Err(Unsupported::NonDistributable)
        );
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"),
            Err(Unsupported::NonDistributable)
        );
        assert_eq!(
            layer_compression("application/vnd.wasm.content.layer.v1+wasm"),
            Err(Unsupported::Unknown)
        );
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+bzip2"),
            Err(Unsupported::Unknown)
        );
    }

    #[test]
    fn parses_a_docker_config() {
        let json = br#"{
            "architecture": "amd64", "os": "linux",
            "config": {
                "Env": ["PATH=/usr/bin", "A=b=c"],
                "Cmd": ["bash"], "Entrypoint": null,
                "WorkingDir": "", "User": "1000:1000",
                "ExposedPorts": {"80/tcp": {}}, "Labels": null
            },
            "rootfs": {"type": "layers", "diff_ids": ["sha256:aa", "sha256:bb"]},
            "history": [{"created_by": "x"}]
        }"#;
        let c = ImageConfig::parse(json).expect("parse");
        assert_eq!(c.architecture.as_deref(), Some("amd64"));
        assert_eq!(c.env, vec!["PATH=/usr/bin", "A=b=c"]);
        assert_eq!(c.cmd, Some(vec!["bash".to_string()]));
        assert_eq!(c.entrypoint, None);
        assert_eq!(c.working_dir, None);
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.diff_ids, vec!["sha256:aa", "sha256:bb"]);
    }

    #[test]
    fn minimal_and_invalid_configs() {
        assert_eq!(
            ImageConfig::parse(b"{}").expect("empty"),
            ImageConfig::default()
        );
        assert_eq!(
            ImageConfig::parse(br#"{"config": null, "rootfs": null}"#).expect("nulls"),
            ImageConfig::default()
        );
        assert!(ImageConfig::parse(b"not json").is_err());
        assert!(ImageConfig::parse(b"\"a string\"").is_err());
        assert!(ImageConfig::parse(br#"{"config": {"Env": "PATH=x"}}"#).is_err());
    }
}
