//! Hostile-layer-safe unpacking of OCI image layers into a staging tree.
//!
//! This module owns turning an image's layer blobs, applied in order, into
//! one flattened directory on the host (the "staging tree") plus a list of
//! deferred [`Fixup`]s for what must exist in the image but never on the
//! host. The `ImageRegistry` actor drives it after [`crate::registry`] has
//! fetched and verified the blobs, then hands the result to
//! [`crate::ext4::build_rootfs`]. See `docs/image-unpack.md` for the threat
//! model.
//!
//! # API
//!
//! ```no_run
//! # async fn demo(layers: Vec<(String, String, tokio::fs::File)>) -> Result<(), Box<dyn std::error::Error>> {
//! use banger_image::unpack::{Compression, Limits, Unpacker};
//! let staging = std::path::Path::new("/var/lib/banger/staging/abc"); // exists, empty
//! let mut unpacker = Unpacker::new(staging, Limits::default())?;
//! for (digest, media_type, blob) in layers {
//!     let compression = Compression::from_media_type(&media_type).unwrap_or(Compression::Detect);
//!     let stats = unpacker.apply_layer(&digest, compression, blob).await?;
//!     tracing::info!(layer = %digest, bytes = stats.bytes_written, "layer applied");
//! }
//! let tree = unpacker.finish();
//! let rootfs = std::path::Path::new("/var/lib/banger/images/abc.ext4");
//! banger_image::ext4::build_rootfs(&tree, rootfs, None).await?;
//! # Ok(()) }
//! ```
//!
//! - [`Unpacker::new`]`(staging_root, limits)`: the root must exist and be
//!   empty; its mode becomes 0755 (it is the image's `/`).
//! - [`Unpacker::apply_layer`]`(digest, compression, blob)`: streams one
//!   layer (no whole-layer buffering). Tar parsing runs on the caller's task
//!   (`astral-tokio-tar`, decompression with `async-compression`); the
//!   filesystem work runs on one blocking thread per layer, fed through a
//!   bounded channel. After an error the unpacker refuses further layers
//!   ([`UnpackError::Poisoned`]) and the staging tree should be deleted.
//! - [`Unpacker::finish`] returns the [`UnpackedTree`]; its
//!   [`UnpackedTree::fixups`] lists the deferred fixups by path.
//!
//! # What is enforced
//!
//! - Nothing outside the staging root is created, changed or removed: every
//!   operation is `*at()` relative to a descriptor of the root, parents are
//!   resolved with `openat2` (`RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS`, and
//!   `RESOLVE_IN_ROOT` when a parent is a symlink, so symlinks resolve as if
//!   the root were `/`), and the final component is never followed.
//! - Member names that are absolute or contain `..` are refused; so are
//!   hardlink targets that are absolute, contain `..` or pass through a
//!   symlink, and non-directories named `.`.
//! - Device nodes and FIFOs are never created on the host (an inert
//!   placeholder file stands in); setuid/setgid bits and
//!   `security.capability` are never set on the host. All of them become
//!   fixups applied inside the ext4 image.
//! - [`Limits`] bound the bytes actually written and the number of members;
//!   the decompressed stream is bounded too (see [`Limits`]).
//! - A PAX `size` that disagrees with the ustar size, GNU sparse members,
//!   oversized extension headers and truncated blobs are errors.
//!
//! Every per-layer error names the layer digest and the member path.

mod fixup;
mod guard;
mod path;
mod tree;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use async_compression::tokio::bufread::{GzipDecoder, ZstdDecoder};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::mpsc;
use tracing::instrument;

pub(crate) use fixup::resolve as resolve_fixups;
pub use fixup::{DeviceNode, Fixup, NodeKind};
pub(crate) use guard::stream_allowance;

use guard::{Budget, TarGuard, Violation};
use tree::{EntryKind, EntryMeta, Msg, Staging};

/// Largest sizes an image may reach while it is unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes written into the staging tree over all layers (file contents
    /// and symlink targets, counted as written; a file rewritten by a later
    /// layer counts twice). The decompressed tar stream may exceed this by
    /// at most 8 KiB per member plus 16 MiB, so a bomb whose payload is
    /// never written (a 1 TB whiteout body, junk after the archive end) is
    /// stopped too.
    pub max_image_bytes: u64,
    /// Members over all layers, whiteouts and directories included.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_image_bytes: 64 << 30,
            max_entries: 5_000_000,
        }
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (`...tar+gzip`, Docker's `...tar.gzip`); concatenated members
    /// are accepted.
    Gzip,
    /// zstd (`...tar+zstd`); concatenated frames are accepted.
    Zstd,
    /// Unknown media type: decide from the first bytes (gzip `1f 8b`,
    /// zstd `28 b5 2f fd`, anything else is read as a plain tar).
    Detect,
}

impl Compression {
    /// The compression a layer media type declares, or `None` for a media
    /// type that is not a tar layer this module knows.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        let mt = media_type.trim().to_ascii_lowercase();
        if mt.ends_with("tar+gzip") || mt.ends_with("tar.gzip") || mt.ends_with("tar+gz") {
            Some(Compression::Gzip)
        } else if mt.ends_with("tar+zstd") {
            Some(Compression::Zstd)
        } else if mt.ends_with(".tar") || mt.ends_with("/tar") {
            Some(Compression::None)
        } else {
            None
        }
    }

    /// Compression from the first bytes of a blob.
    pub fn sniff(prefix: &[u8]) -> Self {
        if prefix.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// What one layer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerStats {
    /// The layer's digest as given to `apply_layer`.
    pub digest: String,
    /// The compression actually used (resolved when `Detect` was given).
    pub compression: Compression,
    /// Members applied (whiteouts and directories included).
    pub entries: u64,
    /// Whiteout and opaque-whiteout members.
    pub whiteouts: u64,
    /// Bytes written into the staging tree.
    pub bytes_written: u64,
    /// Decompressed tar bytes read.
    pub stream_bytes: u64,
}

impl Default for LayerStats {
    fn default() -> Self {
        LayerStats {
            digest: String::new(),
            compression: Compression::None,
            entries: 0,
            whiteouts: 0,
            bytes_written: 0,
            stream_bytes: 0,
        }
    }
}

/// Why unpacking failed. Per-layer variants carry the layer digest and the
/// member path as the layer spelled it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnpackError {
    /// The staging root cannot be used.
    #[error("staging root {path}: {reason}")]
    StagingRoot {
        path: String,
        reason: &'static str,
        #[source]
        source: Option<io::Error>,
    },
    /// An earlier layer failed; the tree is incomplete.
    #[error("layer {layer}: unpacker unusable after layer {failed_layer} failed")]
    Poisoned { layer: String, failed_layer: String },
    /// The blob could not be read or decompressed (corrupt data, a failed
    /// checksum in the compressed stream, or an error from the reader).
    #[error("layer {layer}: {path}: reading the layer stream failed")]
    Decompress {
        layer: String,
        path: String,
        #[source]
        source: io::Error,
    },
    /// The blob ends before the end of the tar archive.
    #[error("layer {layer}: {path}: layer blob truncated")]
    Truncated {
        layer: String,
        path: String,
        #[source]
        source: Option<io::Error>,
    },
    /// The tar structure is invalid.
    #[error("layer {layer}: {path}: malformed tar")]
    MalformedTar {
        layer: String,
        path: String,
        #[source]
        source: io::Error,
    },
    /// A PAX `size` record disagrees with the ustar header size.
    #[error("layer {layer}: {path}: PAX size {pax_size} disagrees with header size {ustar_size}")]
    SizeMismatch {
        layer: String,
        path: String,
        ustar_size: u64,
        pax_size: u64,
    },
    /// A PAX or GNU extension header is larger than the parser may buffer.
    #[error("layer {layer}: {path}: extension header of {size} bytes is too large")]
    ExtensionTooLarge {
        layer: String,
        path: String,
        size: u64,
    },
    /// An absolute member name.
    #[error("layer {layer}: {path}: absolute member name")]
    AbsolutePath { layer: String, path: String },
    /// A member name with a `..` component.
    #[error("layer {layer}: {path}: member name contains '..'")]
    PathTraversal { layer: String, path: String },
    /// A non-directory member naming the root (`.`).
    #[error("layer {layer}: {path}: only a directory may name the root")]
    RootEntry { layer: String, path: String },
    /// A hardlink target that is absolute or contains `..`.
    #[error("layer {layer}: {path}: hardlink target {target} escapes the root")]
    LinkTargetEscapes {
        layer: String,
        path: String,
        target: String,
    },
    /// A hardlink target reached through a symlink.
    #[error("layer {layer}: {path}: hardlink target {target} passes through a symlink")]
    LinkThroughSymlink {
        layer: String,
        path: String,
        target: String,
    },
    /// A hardlink target that is missing or a directory.
    #[error("layer {layer}: {path}: bad hardlink target {target}")]
    LinkTarget {
        layer: String,
        path: String,
        target: String,
        #[source]
        source: io::Error,
    },
    /// A parent component is not a directory (a file, or a symlink to
    /// nothing or to a non-directory).
    #[error("layer {layer}: {path}: a parent is not a directory")]
    NotADirectory { layer: String, path: String },
    /// Symlinks in the parent path loop or nest too deeply.
    #[error("layer {layer}: {path}: too many levels of symlinks")]
    SymlinkLoop { layer: String, path: String },
    /// A whiteout naming nothing (`.wh.`, `.wh..`).
    #[error("layer {layer}: {path}: invalid whiteout")]
    BadWhiteout { layer: String, path: String },
    /// A member type or shape the unpacker does not accept.
    #[error("layer {layer}: {path}: unsupported member ({what})")]
    UnsupportedEntry {
        layer: String,
        path: String,
        what: &'static str,
    },
    /// A uid or gid that does not fit a Linux id.
    #[error("layer {layer}: {path}: invalid owner id {id}")]
    InvalidOwner {
        layer: String,
        path: String,
        id: u64,
    },
    /// An xattr name that cannot be stored.
    #[error("layer {layer}: {path}: invalid xattr name {name:?}")]
    InvalidXattr {
        layer: String,
        path: String,
        name: String,
    },
    /// `max_image_bytes` would be exceeded by the next write.
    #[error("layer {layer}: {path}: image exceeds {limit} bytes")]
    ImageTooLarge {
        layer: String,
        path: String,
        limit: u64,
    },
    /// `max_entries` exceeded.
    #[error("layer {layer}: {path}: image exceeds {limit} members")]
    TooManyEntries {
        layer: String,
        path: String,
        limit: u64,
    },
    /// The decompressed stream exceeds what the limits allow.
    #[error("layer {layer}: {path}: decompressed stream exceeds {limit} bytes")]
    StreamTooLarge {
        layer: String,
        path: String,
        limit: u64,
    },
    /// Directory nesting beyond what the unpacker recurses into.
    #[error("layer {layer}: {path}: directory tree too deep")]
    TreeTooDeep { layer: String, path: String },
    /// A filesystem operation failed.
    #[error("layer {layer}: {path}: {op} failed")]
    Io {
        layer: String,
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The staging thread stopped because the reader stopped (the reader's
    /// own error is what callers see) or the layer future was dropped.
    #[error("layer {layer}: unpacking aborted")]
    Aborted { layer: String },
    /// Walking the finished tree failed.
    #[error("walking staging tree at {path}")]
    Walk {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl UnpackError {
    /// The layer digest the error is about, if any.
    pub fn layer(&self) -> Option<&str> {
        use UnpackError::*;
        match self {
            StagingRoot { .. } | Walk { .. } => None,
            Poisoned { layer, .. } | Aborted { layer } => Some(layer),
            Decompress { layer, .. }
            | Truncated { layer, .. }
            | MalformedTar { layer, .. }
            | SizeMismatch { layer, .. }
            | ExtensionTooLarge { layer, .. }
            | AbsolutePath { layer, .. }
            | PathTraversal { layer, .. }
            | RootEntry { layer, .. }
            | LinkTargetEscapes { layer, .. }
            | LinkThroughSymlink { layer, .. }
            | LinkTarget { layer, .. }
            | NotADirectory { layer, .. }
            | SymlinkLoop { layer, .. }
            | BadWhiteout { layer, .. }
            | UnsupportedEntry { layer, .. }
            | InvalidOwner { layer, .. }
            | InvalidXattr { layer, .. }
            | ImageTooLarge { layer, .. }
            | TooManyEntries { layer, .. }
            | StreamTooLarge { layer, .. }
            | TreeTooDeep { layer, .. }
            | Io { layer, .. } => Some(layer),
        }
    }

    /// The member path (or staging path) the error is about, if any.
    pub fn path(&self) -> Option<&str> {
        use UnpackError::*;
        match self {
            Poisoned { .. } | Aborted { .. } => None,
            StagingRoot { path, .. }
            | Walk { path, .. }
            | Decompress { path, .. }
            | Truncated { path, .. }
            | MalformedTar { path, .. }
            | SizeMismatch { path, .. }
            | ExtensionTooLarge { path, .. }
            | AbsolutePath { path, .. }
            | PathTraversal { path, .. }
            | RootEntry { path, .. }
            | LinkTargetEscapes { path, .. }
            | LinkThroughSymlink { path, .. }
            | LinkTarget { path, .. }
            | NotADirectory { path, .. }
            | SymlinkLoop { path, .. }
            | BadWhiteout { path, .. }
            | UnsupportedEntry { path, .. }
            | InvalidOwner { path, .. }
            | InvalidXattr { path, .. }
            | ImageTooLarge { path, .. }
            | TooManyEntries { path, .. }
            | StreamTooLarge { path, .. }
            | TreeTooDeep { path, .. }
            | Io { path, .. } => Some(path),
        }
    }
}

/// Applies layers, in order, into a staging tree. See the module docs.
pub struct Unpacker {
    root: PathBuf,
    limits: Limits,
    /// `None` while a layer is being applied, and forever after a layer's
    /// future was dropped mid-way.
    staging: Option<Staging>,
    failed_layer: Option<String>,
    layers: Vec<LayerStats>,
    budget: Budget,
}

impl fmt::Debug for Unpacker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unpacker")
            .field("root", &self.root)
            .field("limits", &self.limits)
            .field("failed_layer", &self.failed_layer)
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

/// Channel depth between the tar reader and the staging thread; with
/// [`CHUNK`]-sized data messages this bounds buffered layer data to 2 MiB.
const CHANNEL_DEPTH: usize = 16;
const CHUNK: usize = 128 * 1024;

impl Unpacker {
    /// Opens `staging_root`, which must exist and be empty.
    pub fn new(staging_root: &Path, limits: Limits) -> Result<Self, UnpackError> {
        let staging = Staging::open(staging_root, limits)?;
        Ok(Unpacker {
            root: staging_root.to_path_buf(),
            limits,
            staging: Some(staging),
            failed_layer: None,
            layers: Vec::new(),
            budget: Budget {
                consumed: 0,
                entries: 0,
                max_image_bytes: limits.max_image_bytes,
            },
        })
    }

    /// Records owners as deferred fixups instead of `fchown`ing the staged
    /// files. Always on when not running as root; turning it on as root
    /// leaves every staged file owned by root on the host.
    pub fn defer_ownership(mut self, defer: bool) -> Self {
        if let Some(s) = self.staging.as_mut() {
            s.set_defer_ownership(defer);
        }
        self
    }

    /// Applies one layer blob on top of the tree.
    #[instrument(skip_all, fields(layer = %layer_digest, compression = ?compression))]
    pub async fn apply_layer<R: AsyncRead + Unpin + Send>(
        &mut self,
        layer_digest: &str,
        compression: Compression,
        blob: R,
    ) -> Result<LayerStats, UnpackError> {
        if let Some(failed) = &self.failed_layer {
            return Err(UnpackError::Poisoned {
                layer: layer_digest.to_owned(),
                failed_layer: failed.clone(),
            });
        }
        let Some(mut staging) = self.staging.take() else {
            return Err(UnpackError::Poisoned {
                layer: layer_digest.to_owned(),
                failed_layer: "an interrupted layer".to_owned(),
            });
        };
        // Until the layer completes the unpacker counts as failed: if this
        // future is dropped half-way, it stays that way.
        self.failed_layer = Some(layer_digest.to_owned());

        let (tx, mut rx) = mpsc::channel(CHANNEL_DEPTH);
        let digest = layer_digest.to_owned();
        let worker = tokio::task::spawn_blocking(move || {
            let result = staging.run_layer(&digest, &mut rx);
            (staging, result)
        });
        let read = read_layer(layer_digest, compression, blob, self.budget, &tx).await;
        drop(tx);
        let (staging, applied) = match worker.await {
            Ok(pair) => pair,
            Err(join) => {
                tracing::error!(error = %join, "staging thread panicked");
                return Err(UnpackError::Aborted {
                    layer: layer_digest.to_owned(),
                });
            }
        };
        self.staging = Some(staging);
        let (compression, budget) = match read {
            Ok(read) => read,
            // The reader's error explains why the staging thread stopped.
            Err(ReadError::Unpack(e)) => return Err(e),
            // The staging thread hung up first: its error is the cause.
            Err(ReadError::WorkerGone) => {
                return Err(applied.err().unwrap_or(UnpackError::Aborted {
                    layer: layer_digest.to_owned(),
                }))
            }
        };
        let mut stats = applied?;
        stats.compression = compression;
        stats.stream_bytes = budget.consumed - self.budget.consumed;
        self.budget = budget;
        self.failed_layer = None;
        self.layers.push(stats.clone());
        tracing::info!(
            entries = stats.entries,
            bytes = stats.bytes_written,
            whiteouts = stats.whiteouts,
            "layer applied"
        );
        Ok(stats)
    }

    /// Ends unpacking and returns the tree with its deferred fixups.
    pub fn finish(self) -> UnpackedTree {
        let complete = self.failed_layer.is_none() && self.staging.is_some();
        let (deferred, bytes_written, entries, ownership_deferred) = match self.staging {
            Some(s) => (s.deferred, s.bytes_written, s.entries, s.defer_ownership),
            None => (Default::default(), 0, 0, false),
        };
        UnpackedTree {
            root: self.root,
            bytes_written,
            entries,
            layers: self.layers,
            complete,
            ownership_deferred,
            deferred: TreeFixups::ByInode(deferred),
        }
    }
}

/// The flattened result of [`Unpacker`].
#[derive(Debug)]
pub struct UnpackedTree {
    /// The staging root.
    pub root: PathBuf,
    /// Bytes written into the tree over all layers.
    pub bytes_written: u64,
    /// Members applied over all layers.
    pub entries: u64,
    /// Per-layer statistics, in order.
    pub layers: Vec<LayerStats>,
    /// False when a layer failed or was interrupted: the tree is partial.
    pub complete: bool,
    /// Owners were recorded as fixups rather than set on the host.
    pub ownership_deferred: bool,
    deferred: TreeFixups,
}

/// Where an [`UnpackedTree`]'s fixups come from.
#[derive(Debug, Clone)]
pub(crate) enum TreeFixups {
    /// Records by host inode, as the unpacker keeps them.
    ByInode(fixup::DeferredMap),
    /// Fixups already resolved to paths (a tree made from the tree cache,
    /// see [`crate::treecache`]), each with the `(st_dev, st_ino)` its path
    /// had when the tree was made. A fixup applies only while its path is
    /// still that inode: an entry replaced afterwards (by banger's
    /// injection) is a new file and gets none, as with `ByInode`.
    ByPath(Vec<(Fixup, (u64, u64))>),
}

impl UnpackedTree {
    /// A tree whose fixups were resolved to paths earlier (the tree cache).
    pub(crate) fn with_path_fixups(
        root: PathBuf,
        bytes_written: u64,
        entries: u64,
        layers: Vec<LayerStats>,
        ownership_deferred: bool,
        fixups: Vec<(Fixup, (u64, u64))>,
    ) -> Self {
        UnpackedTree {
            root,
            bytes_written,
            entries,
            layers,
            complete: true,
            ownership_deferred,
            deferred: TreeFixups::ByPath(fixups),
        }
    }

    /// Deferred fixups by image path (sorted), found by walking the tree.
    /// Blocking; call it from a blocking context.
    pub fn fixups(&self) -> Result<Vec<Fixup>, UnpackError> {
        self.fixups_job()()
    }

    /// [`Self::fixups`] as an owned job, for `spawn_blocking`.
    pub(crate) fn fixups_job(
        &self,
    ) -> impl FnOnce() -> Result<Vec<Fixup>, UnpackError> + Send + 'static {
        let root = self.root.clone();
        let deferred = self.deferred.clone();
        move || match deferred {
            TreeFixups::ByInode(map) => fixup::resolve(&root, &map),
            TreeFixups::ByPath(list) => Ok(fixup::still_applying(&root, list)),
        }
    }

    /// The inode-keyed records (`None` for a tree from the tree cache).
    pub(crate) fn deferred_map(&self) -> Option<&fixup::DeferredMap> {
        match &self.deferred {
            TreeFixups::ByInode(map) => Some(map),
            TreeFixups::ByPath(_) => None,
        }
    }

    /// Number of staged inodes (or, for a tree from the tree cache,
    /// paths) with a deferred record.
    pub fn deferred_inodes(&self) -> usize {
        match &self.deferred {
            TreeFixups::ByInode(map) => map.values().filter(|d| !d.is_empty()).count(),
            TreeFixups::ByPath(list) => list.len(),
        }
    }
}

enum ReadError {
    Unpack(UnpackError),
    /// The staging thread hung up; its result says why.
    WorkerGone,
}

impl From<UnpackError> for ReadError {
    fn from(e: UnpackError) -> Self {
        ReadError::Unpack(e)
    }
}

type DynRead<'a> = Pin<Box<dyn AsyncRead + Send + 'a>>;

/// Picks the decoder; for `Detect`, peeks at the first bytes.
async fn decoder<'a, R: AsyncRead + Unpin + Send + 'a>(
    layer: &str,
    compression: Compression,
    mut blob: R,
) -> Result<(Compression, DynRead<'a>), UnpackError> {
    if compression != Compression::Detect {
        return Ok((compression, wrap(compression, blob)));
    }
    let mut prefix = Vec::with_capacity(4);
    while prefix.len() < 4 {
        let mut bytes = [0u8; 4];
        let want = 4 - prefix.len();
        let n = blob
            .read(&mut bytes[..want])
            .await
            .map_err(|e| UnpackError::Decompress {
                layer: layer.to_owned(),
                path: String::new(),
                source: e,
            })?;
        if n == 0 {
            break;
        }
        prefix.extend_from_slice(&bytes[..n]);
    }
    let detected = Compression::sniff(&prefix);
    let chained = std::io::Cursor::new(prefix).chain(blob);
    Ok((detected, wrap(detected, chained)))
}

fn wrap<'a, R: AsyncRead + Unpin + Send + 'a>(compression: Compression, blob: R) -> DynRead<'a> {
    match compression {
        Compression::None | Compression::Detect => Box::pin(blob),
        Compression::Gzip => {
            let mut d = GzipDecoder::new(BufReader::with_capacity(64 * 1024, blob));
            d.multiple_members(true);
            Box::pin(d)
        }
        Compression::Zstd => {
            let mut d = ZstdDecoder::new(BufReader::with_capacity(64 * 1024, blob));
            d.multiple_members(true);
            Box::pin(d)
        }
    }
}

/// The reading half of a layer: decompress, guard, parse, and send members
/// to the staging thread.
async fn read_layer<R: AsyncRead + Unpin + Send>(
    layer: &str,
    compression: Compression,
    blob: R,
    budget: Budget,
    tx: &mpsc::Sender<Msg>,
) -> Result<(Compression, Budget), ReadError> {
    let (compression, reader) = decoder(layer, compression, blob).await?;
    let mut archive = tokio_tar::ArchiveBuilder::new(TarGuard::new(reader, budget))
        .set_unpack_xattrs(false)
        .set_preserve_permissions(false)
        .set_preserve_mtime(false)
        .set_allow_external_symlinks(false)
        .build();
    let mut current = String::new();
    let mut entries = archive.entries().map_err(|e| classify(layer, "", e))?;
    while let Some(entry) = entries.next().await {
        let mut entry = entry.map_err(|e| classify(layer, &current, e))?;
        current = entry
            .path_bytes()
            .map(|p| path::display(&p))
            .unwrap_or_else(|_| path::display(&entry.header().path_bytes()));
        let Some(meta) = entry_meta(layer, &current, &mut entry).await? else {
            continue;
        };
        let is_file = matches!(meta.kind, EntryKind::File);
        send(tx, Msg::Entry(meta)).await?;
        if !is_file {
            continue;
        }
        let size = entry.effective_size();
        let mut got: u64 = 0;
        loop {
            let mut chunk = vec![0u8; CHUNK];
            let n = entry
                .read(&mut chunk)
                .await
                .map_err(|e| classify(layer, &current, e))?;
            if n == 0 {
                break;
            }
            chunk.truncate(n);
            got += n as u64;
            send(tx, Msg::Data(chunk)).await?;
        }
        if got != size {
            return Err(UnpackError::Truncated {
                layer: layer.to_owned(),
                path: current,
                source: None,
            }
            .into());
        }
        send(tx, Msg::EndOfEntry).await?;
    }
    drop(entries);
    let mut guard = match archive.into_inner() {
        Ok(g) => g,
        Err(_) => {
            return Err(UnpackError::Aborted {
                layer: layer.to_owned(),
            }
            .into())
        }
    };
    if !guard.end_seen() {
        return Err(UnpackError::Truncated {
            layer: layer.to_owned(),
            path: current,
            source: None,
        }
        .into());
    }
    // Read what follows the end marker: padding, and the compressed
    // stream's trailer, whose checksum is verified only when reached.
    tokio::io::copy(&mut guard, &mut tokio::io::sink())
        .await
        .map_err(|e| classify(layer, &current, e))?;
    send(tx, Msg::EndOfLayer).await?;
    Ok((compression, guard.budget()))
}

async fn send(tx: &mpsc::Sender<Msg>, msg: Msg) -> Result<(), ReadError> {
    tx.send(msg).await.map_err(|_| ReadError::WorkerGone)
}

/// Reads a member's header and PAX records into an [`EntryMeta`]; `None`
/// for members that carry no content (PAX global headers).
async fn entry_meta<R: AsyncRead + Unpin>(
    layer: &str,
    path: &str,
    entry: &mut tokio_tar::Entry<R>,
) -> Result<Option<EntryMeta>, UnpackError> {
    let malformed = |e: io::Error| classify(layer, path, e);
    let header = entry.header();
    let ustar_size = header.raw_entry_size().map_err(malformed)?;
    let pax_size = entry.effective_size();
    // astral-tokio-tar honours PAX size (the CVE-2025-62518 fix); a layer
    // whose two sizes differ is built to be read differently by different
    // parsers, so refuse it. The one legitimate difference is a size too
    // large for the 11-digit octal field, which writers leave as 0.
    if ustar_size != pax_size && !(ustar_size == 0 && pax_size > 0o777_7777_7777) {
        return Err(UnpackError::SizeMismatch {
            layer: layer.to_owned(),
            path: path.to_owned(),
            ustar_size,
            pax_size,
        });
    }
    let unsupported = |what| UnpackError::UnsupportedEntry {
        layer: layer.to_owned(),
        path: path.to_owned(),
        what,
    };
    let link = || -> Result<Vec<u8>, UnpackError> {
        match entry.link_name_bytes() {
            Ok(Some(l)) => Ok(l.into_owned()),
            Ok(None) => Ok(Vec::new()),
            Err(e) => Err(classify(layer, path, e)),
        }
    };
    let dev = || -> Result<(u32, u32), UnpackError> {
        let major = header.device_major().map_err(malformed)?.unwrap_or(0);
        let minor = header.device_minor().map_err(malformed)?.unwrap_or(0);
        Ok((major, minor))
    };
    use tokio_tar::EntryType as T;
    let kind = match header.entry_type() {
        T::Regular | T::Continuous => EntryKind::File,
        T::Directory => EntryKind::Dir,
        T::Symlink => EntryKind::Symlink(link()?),
        T::Link => EntryKind::Hardlink(link()?),
        T::Char => {
            let (major, minor) = dev()?;
            EntryKind::Node(DeviceNode {
                kind: NodeKind::Char,
                major,
                minor,
            })
        }
        T::Block => {
            let (major, minor) = dev()?;
            EntryKind::Node(DeviceNode {
                kind: NodeKind::Block,
                major,
                minor,
            })
        }
        T::Fifo => EntryKind::Node(DeviceNode {
            kind: NodeKind::Fifo,
            major: 0,
            minor: 0,
        }),
        T::XGlobalHeader => return Ok(None),
        T::GNUSparse => return Err(unsupported("GNU sparse file")),
        _ => return Err(unsupported("unknown member type")),
    };
    let mode = header.mode().map_err(malformed)?;
    let uid = header.uid().map_err(malformed)?;
    let gid = header.gid().map_err(malformed)?;
    let header_mtime = header.mtime().map_err(malformed)?;
    let raw_path = entry
        .path_bytes()
        .map_err(|e| classify(layer, path, e))?
        .into_owned();
    let mut mtime = rustix::fs::Timespec {
        tv_sec: i64::try_from(header_mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    let mut xattrs = Vec::new();
    if let Some(exts) = entry
        .pax_extensions()
        .await
        .map_err(|e| classify(layer, path, e))?
    {
        for ext in exts {
            let ext = ext.map_err(|e| classify(layer, path, e))?;
            let key = ext.key_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                let name =
                    String::from_utf8(name.to_vec()).map_err(|_| UnpackError::InvalidXattr {
                        layer: layer.to_owned(),
                        path: path.to_owned(),
                        name: String::from_utf8_lossy(name).into_owned(),
                    })?;
                xattrs.push((name, ext.value_bytes().to_vec()));
            } else if key == b"mtime" {
                if let Some(t) = parse_pax_time(ext.value_bytes()) {
                    mtime = t;
                }
            }
        }
    }
    Ok(Some(EntryMeta {
        raw_path,
        kind,
        mode,
        uid,
        gid,
        mtime,
        xattrs,
    }))
}

/// `1700000000.123456789` → seconds and nanoseconds (negative times allowed).
fn parse_pax_time(value: &[u8]) -> Option<rustix::fs::Timespec> {
    let text = std::str::from_utf8(value).ok()?;
    let (secs, frac) = match text.split_once('.') {
        Some((s, f)) => (s, f),
        None => (text, ""),
    };
    let tv_sec: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut tv_nsec: i64 = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    if tv_sec < 0 && tv_nsec > 0 {
        // -1.5 is 1.5 s before the epoch.
        return Some(rustix::fs::Timespec {
            tv_sec: tv_sec - 1,
            tv_nsec: 1_000_000_000 - tv_nsec,
        });
    }
    if tv_nsec >= 1_000_000_000 {
        tv_nsec = 999_999_999;
    }
    Some(rustix::fs::Timespec { tv_sec, tv_nsec })
}

/// Maps an I/O error from the decoder, guard or parser to an error that
/// names the layer and member.
fn classify(layer: &str, path: &str, e: io::Error) -> UnpackError {
    let layer = layer.to_owned();
    let name = |p: &Option<String>| p.clone().unwrap_or_else(|| path.to_owned());
    if let Some(v) = guard::find_violation(&e) {
        return match v {
            Violation::Truncated { path: p } => UnpackError::Truncated {
                layer,
                path: name(p),
                source: None,
            },
            Violation::StreamTooLarge { path: p, limit } => UnpackError::StreamTooLarge {
                layer,
                path: name(p),
                limit: *limit,
            },
            Violation::ExtensionTooLarge { path: p, size } => UnpackError::ExtensionTooLarge {
                layer,
                path: name(p),
                size: *size,
            },
            Violation::Unsupported { path: p, what } => UnpackError::UnsupportedEntry {
                layer,
                path: name(p),
                what,
            },
            Violation::Malformed { path: p, .. } => UnpackError::MalformedTar {
                layer,
                path: name(p),
                source: e,
            },
            Violation::Decompress(inner) if inner.kind() == io::ErrorKind::UnexpectedEof => {
                UnpackError::Truncated {
                    layer,
                    path: path.to_owned(),
                    source: Some(e),
                }
            }
            Violation::Decompress(_) => UnpackError::Decompress {
                layer,
                path: path.to_owned(),
                source: e,
            },
        };
    }
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return UnpackError::Truncated {
            layer,
            path: path.to_owned(),
            source: Some(e),
        };
    }
    UnpackError::MalformedTar {
        layer,
        path: path.to_owned(),
        source: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        use Compression::*;
        let cases = [
            ("application/vnd.oci.image.layer.v1.tar", Some(None)),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Some(Gzip)),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Some(Zstd)),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some(Gzip),
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Some(Gzip),
            ),
            ("application/vnd.docker.image.rootfs.diff.tar", Some(None)),
            ("application/vnd.oci.image.config.v1+json", Option::None),
            ("application/octet-stream", Option::None),
        ];
        for (mt, want) in cases {
            assert_eq!(Compression::from_media_type(mt), want, "{mt}");
        }
    }

    #[test]
    fn sniffing() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::sniff(b"etc/"), Compression::None);
        assert_eq!(Compression::sniff(b""), Compression::None);
    }

    #[test]
    fn pax_times() {
        let t = parse_pax_time(b"1700000000.5").expect("parses");
        assert_eq!((t.tv_sec, t.tv_nsec), (1_700_000_000, 500_000_000));
        let t = parse_pax_time(b"42").expect("parses");
        assert_eq!((t.tv_sec, t.tv_nsec), (42, 0));
        let t = parse_pax_time(b"-1.5").expect("parses");
        assert_eq!((t.tv_sec, t.tv_nsec), (-2, 500_000_000));
        assert!(parse_pax_time(b"soon").is_none());
    }
}
