//! Images and kernels as they travel (and as the daemon stores them).
//!
//! Append-only, like every wire type.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ImagePullRequest {
    /// OCI reference, e.g. `docker.io/library/debian:bookworm`.
    pub reference: String,
    /// Image name; derived from the reference when absent.
    pub name: Option<String>,
    /// Rootfs size in bytes; default max(1.25 × tree, 1 GiB).
    pub size: Option<u64>,
    /// `os/arch[/variant]`; default `linux/amd64`.
    pub platform: Option<String>,
    /// Allow plain HTTP to a non-loopback registry.
    pub insecure: bool,
    /// Kernel to pair with the image; default the configured default kernel.
    pub kernel: Option<String>,
}

/// How an image names its kernel.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum KernelSelector {
    /// A kernel registered under this name (pulled from the catalog if missing).
    Ref(String),
    /// Explicit artifacts, imported as a kernel named after the image.
    Paths {
        kernel: String,
        initrd: Option<String>,
        modules: Option<String>,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ImageRegisterRequest {
    pub name: String,
    /// Absolute path of an existing ext4 rootfs.
    pub rootfs: String,
    pub kernel: KernelSelector,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ImageBuildRequest {
    /// Image name; a catalog entry of kind `build` supplies the defaults.
    pub name: String,
    /// Debian suite; default from the catalog entry, else `bookworm`.
    pub suite: Option<String>,
    /// Extra packages on top of the base set.
    pub packages: Vec<String>,
    pub size: Option<u64>,
    /// Debian mirror; default `http://deb.debian.org/debian`.
    pub mirror: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct KernelImportRequest {
    pub name: String,
    pub kernel: String,
    pub initrd: Option<String>,
    pub modules: Option<String>,
}

/// Guest-visible defaults from the OCI image config.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageRuntimeConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub id: String,
    pub name: String,
    /// Managed images live in banger's state dir and are deleted with the image.
    pub managed: bool,
    /// Where it came from, for humans: `oci <ref>@<digest>`, `build …`, `registered`.
    pub source: String,
    pub rootfs_path: String,
    pub rootfs_bytes: u64,
    /// ext4 image of the image's `/root`, cloned into each VM's work disk.
    pub work_seed_path: Option<String>,
    pub kernel: Option<String>,
    pub created_unix_ms: u64,
    /// Layer digests (for the layer cache's prune).
    pub layers: Vec<String>,
    pub platform: Option<String>,
    /// Whether the image has an init of its own (else the agent is PID 1).
    pub has_init: bool,
    pub has_sshd: bool,
    pub runtime: ImageRuntimeConfig,
    /// The image runs systemd (else banger's agent is its init).
    pub has_systemd: bool,
    /// banger's guest agent is installed in it.
    pub has_agent: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    pub name: String,
    pub version: Option<String>,
    /// `elf` or `bzimage`.
    pub format: String,
    pub kernel_path: String,
    /// The ELF extracted from a bzImage, when one could be.
    pub vmlinux_path: Option<String>,
    pub initrd_path: Option<String>,
    pub modules_path: Option<String>,
    /// Backends that can boot it: `qemu`, `firecracker`.
    pub backends: Vec<String>,
    /// `imported`, `catalog <url>`, `built from image <name>`.
    pub source: String,
    pub created_unix_ms: u64,
    pub bytes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PruneReport {
    pub layers_removed: u64,
    pub bytes_freed: u64,
    /// Finished kernel downloads removed (they are only kept to skip re-downloads).
    pub downloads_removed: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ImageCatalogEntry {
    pub name: String,
    /// `oci` (pulled from a registry) or `build` (built with mmdebstrap).
    pub kind: String,
    /// OCI reference or Debian suite.
    pub source: String,
    pub description: String,
    pub kernel: Option<String>,
    /// The image `vm create` uses when none is given.
    pub default: bool,
    /// Whether an image of this name exists locally.
    pub present: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct KernelCatalogEntry {
    pub name: String,
    pub version: String,
    pub url: String,
    pub sha256: String,
    pub size: u64,
    pub description: String,
    pub present: bool,
}
