//! The tree cache: the flattened tree of a layer chain, kept after a pull
//! so that the next pull of the same layers skips decompressing and
//! re-applying them.
//!
//! An entry is the result of [`crate::unpack`] for one ordered list of
//! layer digests (plus what else changes the result: each layer's
//! compression, whether owners are set on the host or deferred, and
//! [`FORMAT`]), keyed by a SHA-256 over all of it ([`TreeKey`]). It lives at
//! `<dir>/<key>/`, usually `<state>/layers/trees/<key>/`:
//!
//! ```text
//! <key>/tree/        the tree, exactly as the unpacker left it; never changed
//! <key>/meta.json    layers, sizes, deferred fixups by path, fingerprint, boot id,
//!                    the tree's measurement for ext4
//! <key>/durable      present once everything above reached the disk (syncfs)
//! <key>.<pid>-<n>-<nanos>.tmp/    an entry being built
//! <key>.<pid>-<n>-<nanos>.trash/  an entry being removed
//! ```
//!
//! Nothing ever writes into an entry's tree. A warm pull builds straight
//! from it: `mkfs.ext4 -d` reads [`CachedTree::tree_dir`], banger's
//! injection is made inside the built image with `debugfs`
//! ([`crate::ext4::build_rootfs_from`]), the tree's measurement comes from
//! `meta.json` ([`CachedTree::usage`]), and [`TreeCache::verify`] checks
//! the tree meanwhile. A cold pull, which has just unpacked the entry,
//! builds from a **hardlink farm** of it in its own staging directory
//! ([`TreeBuild::commit`], [`TreeCache::farm`]): a fresh directory for
//! every directory (mode, owner, xattrs and times copied) and a hard link
//! for everything else; injection replaces files in the farm (unlink and
//! create, never writing into an existing file), `mkfs.ext4 -d` reads it,
//! and the farm is removed.
//!
//! Guarantees:
//!
//! - **Complete or absent.** An entry is built under a unique `.tmp` name
//!   and renamed into place (`RENAME_NOREPLACE`) only after the unpack
//!   finished, the fixups were resolved and `meta.json` was written. A
//!   failed, cancelled or crashed build leaves at most a `.tmp` directory,
//!   which nothing reads; it is removed by its guard, by
//!   [`TreeCache::prune`] once its process is gone, and at daemon start-up
//!   ([`TreeCache::remove_unfinished`]).
//! - **Verified on every use.** `meta.json` holds a fingerprint of the tree:
//!   a SHA-256 over every path, type, mode, owner, size and mtime, in
//!   order. Each farm recomputes it from what it linked, and
//!   [`TreeCache::verify`] from what it reads, and compares; a mismatch (an
//!   entry changed, truncated or partly removed) discards the entry (and
//!   whatever was built from it) and the pull unpacks the layers again. An entry written in an
//!   earlier boot is only trusted if its `durable` marker exists (written
//!   after `syncfs`), so a power loss cannot leave a tree whose metadata
//!   survived but whose data did not. A farm also checks at the end that
//!   the entry was not removed meanwhile (prune renames an entry away
//!   before deleting it), so a farm is never silently partial.
//! - **Limits hold.** An entry records its bytes, members and decompressed
//!   stream size; one that exceeds the caller's [`Limits`] is not used.
//! - **Concurrent pulls.** [`TreeCache::lock`] serialises builders of the
//!   same key within the process: one builds, the others wait and then
//!   farm its entry. Across processes, the second rename loses and its
//!   copy is dropped. The `ImageRegistry`'s pulls hold the lock while
//!   they farm too, so warm pulls of one key take turns (a farm is short
//!   next to an unpack) and a damaged entry is discarded by the one pull
//!   that found it, never under another's farm.
//! - **Pruning.** [`TreeCache::prune`] removes entries whose layers are not
//!   all in the set of referenced digests (the layer cache's prune passes
//!   the digests that images and pulls in progress use), entries that are
//!   unreadable or of another format, and leftovers of dead processes.
//!
//! Hostile layers: the tree was made by the unpacker inside the entry's
//! `.tmp` directory (see `crate::unpack` for what that guarantees); the farm
//! opens directories only with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` below the entry's and the farm's roots, and links
//! entries without following them, so nothing outside the cache and the
//! farm is touched. Farms are made by a few threads, a directory at a time.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::SystemTime;

use rustix::fs::{
    self as rfs, AtFlags, Dir, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Stat, Timespec,
    Timestamps, XattrFlags,
};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::ext4::TreeUsage;
use crate::unpack::{Compression, DeviceNode, Fixup, LayerStats, Limits, NodeKind, UnpackedTree};

/// Version of what an entry holds. Bump it whenever the unpacker would
/// produce a different tree (or different fixups) for the same layers, so
/// entries made by older code are never reused.
pub const FORMAT: u32 = 1;

/// The tree cache's directory inside the layer cache's.
pub const TREES_DIR: &str = "trees";

const META: &str = "meta.json";
const TREE: &str = "tree";
const DURABLE: &str = "durable";
const TMP_SUFFIX: &str = ".tmp";
const TRASH_SUFFIX: &str = ".trash";

/// Errors of the tree cache itself (farm outcomes are [`FarmError`]).
#[derive(Debug, thiserror::Error)]
pub enum TreeCacheError {
    /// A filesystem operation failed.
    #[error("tree cache: cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The tree handed to [`TreeBuild::commit`] cannot be cached.
    #[error("tree cache: {0}")]
    NotCacheable(String),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> TreeCacheError {
    let path = path.to_path_buf();
    move |source| TreeCacheError::Io { op, path, source }
}

/// Why a farm could not be made.
#[derive(Debug, thiserror::Error)]
pub enum FarmError {
    /// The entry is not what its `meta.json` says (changed, truncated,
    /// removed meanwhile): it must not be used again.
    #[error("the cached tree is damaged: {0}")]
    Damaged(String),
    /// The farm cannot be made here (another filesystem, too many links,
    /// no space): unpack instead, the entry itself is fine.
    #[error("cannot link the cached tree: {0}")]
    Unusable(String),
}

/// What identifies a tree: see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeKey {
    hex: String,
    layers: Vec<(String, Compression)>,
    privileged: bool,
}

impl TreeKey {
    /// The key of `layers` (digest and compression, in order) unpacked
    /// the way [`crate::unpack::Unpacker::new`] does in this process
    /// (owners set on the host when running as root, deferred otherwise).
    pub fn new(layers: impl IntoIterator<Item = (String, Compression)>) -> Self {
        Self::with_privilege(layers, rustix::process::geteuid().is_root())
    }

    fn with_privilege(
        layers: impl IntoIterator<Item = (String, Compression)>,
        privileged: bool,
    ) -> Self {
        let layers: Vec<(String, Compression)> = layers.into_iter().collect();
        let mut h = Sha256::new();
        h.update(format!(
            "banger tree cache\nformat {FORMAT}\nprivileged {privileged}\n"
        ));
        for (digest, compression) in &layers {
            h.update(format!("{digest} {}\n", compression_name(*compression)));
        }
        TreeKey {
            hex: hex::encode(h.finalize()),
            layers,
            privileged,
        }
    }

    /// 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The first 12 hex digits, for messages.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }

    /// The layer digests, in order.
    pub fn layers(&self) -> impl Iterator<Item = &str> {
        self.layers.iter().map(|(d, _)| d.as_str())
    }
}

fn compression_name(c: Compression) -> &'static str {
    match c {
        Compression::None => "none",
        Compression::Gzip => "gzip",
        Compression::Zstd => "zstd",
        Compression::Detect => "detect",
    }
}

fn compression_from(name: &str) -> Compression {
    match name {
        "gzip" => Compression::Gzip,
        "zstd" => Compression::Zstd,
        "detect" => Compression::Detect,
        _ => Compression::None,
    }
}

/// `meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    format: u32,
    key: String,
    privileged: bool,
    ownership_deferred: bool,
    layers: Vec<MetaLayer>,
    /// `UnpackedTree::bytes_written` and `entries`.
    bytes_written: u64,
    entries: u64,
    /// Decompressed bytes of all layers.
    stream_bytes: u64,
    /// Paths in the fingerprint (the root included).
    paths: u64,
    fingerprint: String,
    /// `/proc/sys/kernel/random/boot_id` when the entry was made.
    boot_id: String,
    fixups: Vec<MetaFixup>,
    /// The tree measured for ext4 ([`crate::ext4::measure_tree`]), so
    /// that a pull building from the entry does not walk it first.
    /// Absent in entries made before it was recorded.
    #[serde(default)]
    usage: Option<MetaUsage>,
}

/// [`TreeUsage`] in `meta.json`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct MetaUsage {
    files: u64,
    dirs: u64,
    symlinks: u64,
    others: u64,
    apparent_bytes: u64,
    data_blocks: u64,
}

impl MetaUsage {
    fn of(u: &TreeUsage) -> Self {
        MetaUsage {
            files: u.files,
            dirs: u.dirs,
            symlinks: u.symlinks,
            others: u.others,
            apparent_bytes: u.apparent_bytes,
            data_blocks: u.data_blocks,
        }
    }

    fn usage(&self) -> TreeUsage {
        TreeUsage {
            files: self.files,
            dirs: self.dirs,
            symlinks: self.symlinks,
            others: self.others,
            apparent_bytes: self.apparent_bytes,
            data_blocks: self.data_blocks,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MetaLayer {
    digest: String,
    compression: String,
    entries: u64,
    whiteouts: u64,
    bytes_written: u64,
    stream_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MetaFixup {
    /// Image path bytes, hex (paths need not be UTF-8).
    path: String,
    node: Option<(String, u32, u32)>,
    mode: Option<u32>,
    owner: Option<(u32, u32)>,
    mtime: Option<i64>,
    /// Name and hex value.
    xattrs: Vec<(String, String)>,
}

impl MetaFixup {
    fn of(f: &Fixup) -> Self {
        MetaFixup {
            path: hex::encode(f.path.as_os_str().as_bytes()),
            node: f.node.map(|n| {
                let kind = match n.kind {
                    NodeKind::Char => "char",
                    NodeKind::Block => "block",
                    NodeKind::Fifo => "fifo",
                };
                (kind.to_string(), n.major, n.minor)
            }),
            mode: f.mode,
            owner: f.owner,
            mtime: f.mtime,
            xattrs: f
                .xattrs
                .iter()
                .map(|(n, v)| (n.clone(), hex::encode(v)))
                .collect(),
        }
    }

    fn to_fixup(&self) -> Option<Fixup> {
        let path = PathBuf::from(OsStr::from_bytes(&hex::decode(&self.path).ok()?));
        let node = match &self.node {
            None => None,
            Some((kind, major, minor)) => Some(DeviceNode {
                kind: match kind.as_str() {
                    "char" => NodeKind::Char,
                    "block" => NodeKind::Block,
                    "fifo" => NodeKind::Fifo,
                    _ => return None,
                },
                major: *major,
                minor: *minor,
            }),
        };
        let mut xattrs = Vec::with_capacity(self.xattrs.len());
        for (n, v) in &self.xattrs {
            xattrs.push((n.clone(), hex::decode(v).ok()?));
        }
        Some(Fixup {
            path,
            node,
            mode: self.mode,
            owner: self.owner,
            mtime: self.mtime,
            xattrs,
        })
    }
}

/// A committed entry found by [`TreeCache::lookup`].
#[derive(Debug, Clone)]
pub struct CachedTree {
    key: TreeKey,
    dir: PathBuf,
    meta: Meta,
    fixups: Vec<Fixup>,
}

impl CachedTree {
    /// The entry's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Bytes written when the tree was unpacked.
    pub fn bytes_written(&self) -> u64 {
        self.meta.bytes_written
    }

    /// Members applied when the tree was unpacked.
    pub fn entries(&self) -> u64 {
        self.meta.entries
    }

    /// The entry's key.
    pub fn key(&self) -> &TreeKey {
        &self.key
    }

    /// The cached tree itself. Read it, never change it: `mkfs.ext4 -d`
    /// may read it directly ([`TreeCache::verify`] checks it meanwhile).
    pub fn tree_dir(&self) -> PathBuf {
        self.dir.join(TREE)
    }

    /// The tree's deferred fixups, by image path, sorted.
    pub fn fixups(&self) -> &[Fixup] {
        &self.fixups
    }

    /// The tree's measurement, when the entry recorded one.
    pub fn usage(&self) -> Option<TreeUsage> {
        self.meta.usage.map(|u| u.usage())
    }

    /// Whether the tree's owners are recorded as fixups.
    pub fn ownership_deferred(&self) -> bool {
        self.meta.ownership_deferred
    }
}

/// What [`TreeCache::lookup`] found.
#[derive(Debug)]
pub enum Lookup {
    /// A complete, trusted entry within the limits.
    Hit(Box<CachedTree>),
    /// No entry.
    Miss,
    /// An entry that must not be used and should be discarded (why).
    Damaged(String),
    /// A sound entry that exceeds the caller's limits (why); left alone.
    OverLimits(String),
}

/// What [`TreeCache::prune`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreePruneStats {
    /// Entries (and leftovers of dead builds) removed.
    pub removed: usize,
    /// Bytes of file data they held (each inode counted once).
    pub bytes_freed: u64,
}

/// Holds the in-process build lock of one key (see [`TreeCache::lock`]).
#[derive(Debug)]
pub struct TreeLock {
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

/// The tree cache at one directory. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TreeCache {
    dir: PathBuf,
}

impl TreeCache {
    /// Opens (creating if needed) the tree cache at `dir`.
    /// The directory is made private (0700): the trees hold images' files
    /// with the images' own modes (world-writable `/tmp`s among them), and
    /// no other user may read or change them.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, TreeCacheError> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let meta = std::fs::symlink_metadata(&dir).map_err(io_err("stat", &dir))?;
        if !meta.is_dir() {
            return Err(io_err("use", &dir)(io::Error::other("not a directory")));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err("chmod", &dir))?;
        }
        Ok(TreeCache { dir })
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the entry of `key` is (or would be).
    pub fn entry_path(&self, key: &TreeKey) -> PathBuf {
        self.dir.join(key.hex())
    }

    /// Whether farms can be made in `dir` (hard links need one filesystem).
    pub fn can_farm_into(&self, dir: &Path) -> bool {
        match (rfs::stat(&self.dir), rfs::stat(dir)) {
            (Ok(a), Ok(b)) => a.st_dev == b.st_dev,
            _ => false,
        }
    }

    /// Waits until no other task of this process builds `key`, and keeps
    /// others out until the returned lock is dropped. Cancel-safe.
    pub async fn lock(&self, key: &TreeKey) -> TreeLock {
        static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Weak<tokio::sync::Mutex<()>>>>> =
            OnceLock::new();
        let mutex = {
            let mut map = LOCKS
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            map.retain(|_, w| w.strong_count() > 0);
            let path = self.entry_path(key);
            match map.get(&path).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(path, Arc::downgrade(&m));
                    m
                }
            }
        };
        TreeLock {
            _guard: mutex.lock_owned().await,
        }
    }

    /// The entry of `key`, if there is a trustworthy one within `limits`.
    /// Reads `meta.json` (blocking).
    pub fn lookup(&self, key: &TreeKey, limits: &Limits) -> Lookup {
        let dir = self.entry_path(key);
        let text = match std::fs::read(dir.join(META)) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !dir.exists() => return Lookup::Miss,
            Err(e) => return Lookup::Damaged(format!("cannot read {META}: {e}")),
        };
        let meta: Meta = match serde_json::from_slice(&text) {
            Ok(meta) => meta,
            Err(e) => return Lookup::Damaged(format!("{META} is malformed: {e}")),
        };
        let want: Vec<(&str, &str)> = key
            .layers
            .iter()
            .map(|(d, c)| (d.as_str(), compression_name(*c)))
            .collect();
        let have: Vec<(&str, &str)> = meta
            .layers
            .iter()
            .map(|l| (l.digest.as_str(), l.compression.as_str()))
            .collect();
        if meta.format != FORMAT
            || meta.key != key.hex
            || meta.privileged != key.privileged
            || want != have
        {
            return Lookup::Damaged(format!("{META} does not describe this key"));
        }
        let boot = boot_id();
        if (boot.is_empty() || meta.boot_id != boot) && !dir.join(DURABLE).exists() {
            return Lookup::Damaged(
                "made before the last reboot and never confirmed on disk".to_string(),
            );
        }
        let allowance = crate::unpack::stream_allowance(limits.max_image_bytes, meta.entries);
        if meta.bytes_written > limits.max_image_bytes
            || meta.entries > limits.max_entries
            || meta.stream_bytes > allowance
        {
            return Lookup::OverLimits(format!(
                "{} bytes in {} members exceed the limits ({} bytes, {} members)",
                meta.bytes_written, meta.entries, limits.max_image_bytes, limits.max_entries
            ));
        }
        let mut fixups = Vec::with_capacity(meta.fixups.len());
        for f in &meta.fixups {
            match f.to_fixup() {
                Some(f) => fixups.push(f),
                None => return Lookup::Damaged(format!("{META} has a malformed fixup")),
            }
        }
        Lookup::Hit(Box::new(CachedTree {
            key: key.clone(),
            dir,
            meta,
            fixups,
        }))
    }

    /// Starts building the entry of `key`: a fresh `.tmp` directory whose
    /// [`TreeBuild::tree_dir`] (empty) is where the layers go. Dropping
    /// the build without committing removes it.
    pub fn begin(&self, key: &TreeKey) -> Result<TreeBuild, TreeCacheError> {
        let path = self.unique(key.hex(), TMP_SUFFIX);
        std::fs::create_dir(&path).map_err(io_err("create", &path))?;
        let guard = RemoveOnDrop(Some(path.clone()));
        let tree = path.join(TREE);
        std::fs::create_dir(&tree).map_err(io_err("create", &tree))?;
        Ok(TreeBuild {
            cache: self.clone(),
            key: key.clone(),
            path,
            guard,
        })
    }

    fn unique(&self, stem: &str, suffix: &str) -> PathBuf {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!(
            "{stem}.{pid}-{n}-{nanos:08x}{suffix}",
            pid = std::process::id()
        ))
    }

    /// Makes a hardlink farm of `entry`'s tree at `dest` (which must not
    /// exist; its parent must) and returns it as an [`UnpackedTree`] with
    /// the entry's fixups. Blocking. On an error nothing is left at `dest`.
    pub fn farm(&self, entry: &CachedTree, dest: &Path) -> Result<UnpackedTree, FarmError> {
        let result = self.farm_inner(entry, dest);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(dest);
        }
        result
    }

    fn farm_inner(&self, entry: &CachedTree, dest: &Path) -> Result<UnpackedTree, FarmError> {
        let damaged = |what: &str, e: Errno| FarmError::Damaged(format!("{what}: {e}"));
        let entry_fd = open_dir_at(rfs::CWD, &entry.dir).map_err(|e| damaged("opening it", e))?;
        let entry_st = rfs::fstat(&entry_fd).map_err(|e| damaged("opening it", e))?;
        let src = open_dir_at(&entry_fd, Path::new(TREE)).map_err(|e| damaged("opening it", e))?;
        let farmed = make_farm(&src, dest, &entry.fixups, entry.key.privileged)?;
        if farmed.paths != entry.meta.paths || farmed.fingerprint != entry.meta.fingerprint {
            return Err(FarmError::Damaged(format!(
                "its {} paths do not match the {} recorded when it was made",
                farmed.paths, entry.meta.paths
            )));
        }
        // Removed (renamed away by prune or a discard) while we linked?
        match rfs::statat(rfs::CWD, &entry.dir, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_ino == entry_st.st_ino && st.st_dev == entry_st.st_dev => {}
            _ => return Err(FarmError::Damaged("it was removed meanwhile".to_string())),
        }
        Ok(UnpackedTree::with_path_fixups(
            dest.to_path_buf(),
            entry.meta.bytes_written,
            entry.meta.entries,
            layer_stats(&entry.meta.layers),
            entry.meta.ownership_deferred,
            farmed.fixups,
        ))
    }

    /// Checks that `entry`'s tree is still what its `meta.json` says: walks
    /// it (read only, a few threads) and compares the fingerprint and the
    /// number of paths, checks that every fixup path exists and that the
    /// entry was not removed meanwhile. For a pull that builds straight
    /// from the entry: run it alongside `mkfs.ext4 -d` and throw the image
    /// away unless it passes. Blocking. Every error is
    /// [`FarmError::Damaged`].
    pub fn verify(&self, entry: &CachedTree) -> Result<(), FarmError> {
        let damaged = |what: &str, e: Errno| FarmError::Damaged(format!("{what}: {e}"));
        let entry_fd = open_dir_at(rfs::CWD, &entry.dir).map_err(|e| damaged("opening it", e))?;
        let entry_st = rfs::fstat(&entry_fd).map_err(|e| damaged("opening it", e))?;
        let src = open_dir_at(&entry_fd, Path::new(TREE)).map_err(|e| damaged("opening it", e))?;
        let walked =
            walk(&src, None, &entry.fixups, entry.key.privileged).map_err(|e| match e {
                FarmError::Unusable(why) => FarmError::Damaged(why),
                damaged => damaged,
            })?;
        if walked.paths != entry.meta.paths || walked.fingerprint != entry.meta.fingerprint {
            return Err(FarmError::Damaged(format!(
                "its {} paths do not match the {} recorded when it was made",
                walked.paths, entry.meta.paths
            )));
        }
        match rfs::statat(rfs::CWD, &entry.dir, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_ino == entry_st.st_ino && st.st_dev == entry_st.st_dev => Ok(()),
            _ => Err(FarmError::Damaged("it was removed meanwhile".to_string())),
        }
    }

    /// Renames the entry of `key` away and removes it (in the background);
    /// for an entry that [`Self::lookup`] or [`Self::farm`] found damaged.
    pub fn discard(&self, key: &TreeKey) {
        let from = self.entry_path(key);
        let trash = self.unique(key.hex(), TRASH_SUFFIX);
        if std::fs::rename(&from, &trash).is_ok() {
            tracing::warn!(entry = %from.display(), "discarded a damaged tree cache entry");
            remove_in_background(trash);
        }
    }

    /// Removes entries not fully covered by `referenced` (layer digests in
    /// use), entries that are unreadable or of another [`FORMAT`], and
    /// `.tmp`/`.trash` directories of processes that are gone. Names the
    /// cache did not make are left alone.
    pub fn prune(&self, referenced: &HashSet<String>) -> Result<TreePruneStats, TreeCacheError> {
        let mut stats = TreePruneStats::default();
        let dir = std::fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))?;
        for entry in dir {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            let remove = match parse_name(name) {
                Some(Name::Entry) => {
                    let keep = std::fs::read(path.join(META))
                        .ok()
                        .and_then(|t| serde_json::from_slice::<Meta>(&t).ok())
                        .is_some_and(|m| {
                            m.format == FORMAT
                                && m.key == name
                                && m.layers.iter().all(|l| referenced.contains(&l.digest))
                        });
                    if keep {
                        None
                    } else {
                        // Renamed first, so a farm in progress notices.
                        let trash = self.unique(name, TRASH_SUFFIX);
                        match std::fs::rename(&path, &trash) {
                            Ok(()) => Some(trash),
                            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                            Err(e) => return Err(io_err("rename", &path)(e)),
                        }
                    }
                }
                Some(Name::Leftover { pid }) if !process_alive(pid) => Some(path),
                _ => None,
            };
            if let Some(path) = remove {
                let bytes = data_bytes(&path);
                // Retried once: a `durable` marker may land meanwhile.
                let removed =
                    std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_dir_all(&path));
                match removed {
                    Ok(()) => {
                        stats.removed += 1;
                        stats.bytes_freed += bytes;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    // Renamed away already: nothing uses it, the next
                    // prune or start-up finishes the job.
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "could not remove a cached tree");
                    }
                }
            }
        }
        if stats.removed > 0 {
            tracing::info!(
                removed = stats.removed,
                bytes_freed = stats.bytes_freed,
                "pruned tree cache"
            );
        }
        Ok(stats)
    }

    /// Gets rid of a pull's tree (a farm, or a tree moved out of a build)
    /// without making the pull wait: renames it into the cache's directory
    /// as a `.trash` of `key` and removes it on a thread of its own (when
    /// the rename fails, e.g. across filesystems, it is removed here).
    pub fn dispose(&self, key: &TreeKey, dir: &Path) {
        let trash = self.unique(key.hex(), TRASH_SUFFIX);
        match std::fs::rename(dir, &trash) {
            Ok(()) => remove_in_background(trash),
            Err(_) => {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// Removes every `.tmp` and `.trash` directory, whoever made it: for
    /// start-up, before any pull runs. Returns how many.
    pub fn remove_unfinished(&self) -> usize {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut removed = 0;
        for entry in dir.flatten() {
            let name = entry.file_name();
            if matches!(
                name.to_str().and_then(parse_name),
                Some(Name::Leftover { .. })
            ) && std::fs::remove_dir_all(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }

    /// The keys (hex) of the committed entries, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| matches!(parse_name(n), Some(Name::Entry)))
            .collect();
        keys.sort();
        keys
    }
}

enum Name {
    Entry,
    Leftover { pid: i32 },
}

/// `<64 hex>` or `<64 hex>.<pid>-<n>-<nanos>.tmp|.trash`.
fn parse_name(name: &str) -> Option<Name> {
    let is_key = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if is_key(name) {
        return Some(Name::Entry);
    }
    let rest = name
        .strip_suffix(TMP_SUFFIX)
        .or_else(|| name.strip_suffix(TRASH_SUFFIX))?;
    let (key, tag) = rest.split_once('.')?;
    if !is_key(key) {
        return None;
    }
    let pid = tag.split('-').next()?.parse().ok()?;
    Some(Name::Leftover { pid })
}

fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(_) => true,
    }
}

/// Bytes of regular-file data under `dir`, each inode once.
fn data_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() && seen.insert(meta.ino()) {
                total += meta.len();
            }
        }
    }
    total
}

fn remove_in_background(path: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("tree-cache-rm".into())
        .spawn({
            let path = path.clone();
            move || remove_patiently(&path)
        });
    if spawned.is_err() {
        let _ = std::fs::remove_dir_all(&path);
    }
}

/// `remove_dir_all`, retried for a while: a `durable` marker or a
/// cancelled unpack may still be writing in there.
fn remove_patiently(path: &Path) {
    for _ in 0..50 {
        if std::fs::remove_dir_all(path).is_ok() || !path.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    tracing::warn!(path = %path.display(), "could not remove a tree; it goes at the next start or prune");
}

/// The boot id, or "" when unknown.
fn boot_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

fn layer_stats(layers: &[MetaLayer]) -> Vec<LayerStats> {
    layers
        .iter()
        .map(|l| LayerStats {
            digest: l.digest.clone(),
            compression: compression_from(&l.compression),
            entries: l.entries,
            whiteouts: l.whiteouts,
            bytes_written: l.bytes_written,
            stream_bytes: l.stream_bytes,
        })
        .collect()
}

/// Removes a directory when dropped unless disarmed.
#[derive(Debug)]
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        // On a thread of its own: this runs when a pull's future is
        // dropped (cancelled), on an async worker, and an unpack cancelled
        // a moment ago may still be writing in there. The name is a
        // `.tmp` one: nothing reads it, and prune or the next start-up
        // removes it if this does not.
        if let Some(path) = self.0.take() {
            remove_in_background(path);
        }
    }
}

/// An entry being built (see [`TreeCache::begin`]).
#[derive(Debug)]
pub struct TreeBuild {
    cache: TreeCache,
    key: TreeKey,
    path: PathBuf,
    guard: RemoveOnDrop,
}

/// What [`TreeBuild::commit`] did.
#[derive(Debug)]
pub struct Committed {
    /// The tree for the pull, at the `dest` given.
    pub tree: UnpackedTree,
    /// The entry is in the cache for later pulls (false: another build of
    /// the same key got there first, or the farm could not be made and
    /// the unpacked tree itself was moved to `dest`).
    pub cached: bool,
    /// Why the tree was not cached, if it was not.
    pub note: Option<String>,
}

impl TreeBuild {
    /// Where the layers are to be unpacked (exists, empty).
    pub fn tree_dir(&self) -> PathBuf {
        self.path.join(TREE)
    }

    /// Turns the unpacked `tree` (which must be at [`Self::tree_dir`])
    /// into a cache entry and makes the pull's tree at `dest`: a farm of
    /// the entry, or, when no farm can be made there, the unpacked tree
    /// itself moved to `dest` (then nothing is cached). Blocking.
    pub fn commit(self, tree: UnpackedTree, dest: &Path) -> Result<Committed, TreeCacheError> {
        if !tree.complete || tree.root != self.tree_dir() {
            return Err(TreeCacheError::NotCacheable(
                "the tree is incomplete or elsewhere".to_string(),
            ));
        }
        if tree.ownership_deferred == self.key.privileged {
            return self.move_out(tree, dest, "it was unpacked with another ownership mode");
        }
        let Some(deferred) = tree.deferred_map() else {
            return Err(TreeCacheError::NotCacheable(
                "the tree came from the cache".to_string(),
            ));
        };
        let fixups = crate::unpack::resolve_fixups(&tree.root, deferred).map_err(|e| {
            TreeCacheError::Io {
                op: "resolve the fixups of",
                path: tree.root.clone(),
                source: io::Error::other(e.to_string()),
            }
        })?;
        let src = match open_dir_at(rfs::CWD, &tree.root) {
            Ok(fd) => fd,
            Err(e) => return Err(io_err("open", &tree.root)(e.into())),
        };
        // Measured alongside the farm, for pulls that build from the entry.
        let (farmed, usage) = std::thread::scope(|scope| {
            let measuring = scope.spawn(|| crate::ext4::measure_tree(&tree.root).ok());
            let farmed = make_farm(&src, dest, &fixups, self.key.privileged);
            (farmed, measuring.join().ok().flatten())
        });
        let farmed = match farmed {
            Ok(farmed) => farmed,
            Err(e) => {
                let _ = std::fs::remove_dir_all(dest);
                return self.move_out(tree, dest, &e.to_string());
            }
        };
        drop(src);
        let farm_tree = UnpackedTree::with_path_fixups(
            dest.to_path_buf(),
            tree.bytes_written,
            tree.entries,
            tree.layers.clone(),
            tree.ownership_deferred,
            farmed.fixups,
        );
        // From here on the pull has its tree; failing to cache it only
        // costs later pulls an unpack.
        let final_path = self.cache.entry_path(&self.key);
        let note = match self.write_meta(&tree, &fixups, &farmed.fingerprint, farmed.paths, usage) {
            Err(e) => Some(format!("not cached: {e}")),
            Ok(()) => match rfs::renameat_with(
                rfs::CWD,
                &self.path,
                rfs::CWD,
                &final_path,
                RenameFlags::NOREPLACE,
            ) {
                Ok(()) => None,
                Err(Errno::EXIST) | Err(Errno::NOTEMPTY) => {
                    Some("another pull cached the same tree first".to_string())
                }
                Err(e) => Some(format!("not cached: renaming {}: {e}", self.path.display())),
            },
        };
        let mut guard = self.guard;
        let cached = note.is_none();
        if cached {
            guard.0 = None;
            make_durable(final_path);
        } else if let Some(p) = guard.0.take() {
            // The farm holds links of its own: the copy can go.
            remove_in_background(p);
        }
        Ok(Committed {
            tree: farm_tree,
            cached,
            note,
        })
    }

    fn write_meta(
        &self,
        tree: &UnpackedTree,
        fixups: &[Fixup],
        fingerprint: &str,
        paths: u64,
        usage: Option<TreeUsage>,
    ) -> Result<(), TreeCacheError> {
        if tree.layers.len() != self.key.layers.len() {
            return Err(TreeCacheError::NotCacheable(
                "the layer statistics do not match the key".to_string(),
            ));
        }
        let meta = Meta {
            format: FORMAT,
            key: self.key.hex.clone(),
            privileged: self.key.privileged,
            ownership_deferred: tree.ownership_deferred,
            layers: self
                .key
                .layers
                .iter()
                .zip(tree.layers.iter())
                .map(|((digest, c), s)| MetaLayer {
                    digest: digest.clone(),
                    compression: compression_name(*c).to_string(),
                    entries: s.entries,
                    whiteouts: s.whiteouts,
                    bytes_written: s.bytes_written,
                    stream_bytes: s.stream_bytes,
                })
                .collect(),
            bytes_written: tree.bytes_written,
            entries: tree.entries,
            stream_bytes: tree.layers.iter().map(|l| l.stream_bytes).sum(),
            paths,
            fingerprint: fingerprint.to_string(),
            boot_id: boot_id().to_string(),
            fixups: fixups.iter().map(MetaFixup::of).collect(),
            usage: usage.as_ref().map(MetaUsage::of),
        };
        let path = self.path.join(META);
        let text = serde_json::to_vec(&meta).map_err(|e| TreeCacheError::Io {
            op: "encode",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        std::fs::write(&path, text).map_err(io_err("write", &path))
    }

    /// No farm: the pull gets the unpacked tree itself.
    fn move_out(
        self,
        mut tree: UnpackedTree,
        dest: &Path,
        why: &str,
    ) -> Result<Committed, TreeCacheError> {
        std::fs::rename(self.tree_dir(), dest).map_err(io_err("move", &self.tree_dir()))?;
        tree.root = dest.to_path_buf();
        Ok(Committed {
            tree,
            cached: false,
            note: Some(why.to_string()),
        })
    }
}

/// Syncs the entry's filesystem and then marks the entry durable, on a
/// thread of its own (a cold pull does not wait for the disk).
fn make_durable(entry: PathBuf) {
    let job = move || -> io::Result<()> {
        let fd = rfs::open(
            &entry,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        rfs::syncfs(&fd)?;
        // Not into an entry that was discarded or pruned meanwhile.
        let here = rfs::fstat(&fd)?;
        let now = rfs::statat(rfs::CWD, &entry, AtFlags::SYMLINK_NOFOLLOW)?;
        if (here.st_dev, here.st_ino) != (now.st_dev, now.st_ino) {
            return Ok(());
        }
        let marker = rfs::openat(
            &fd,
            DURABLE,
            OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )?;
        rfs::fsync(&marker)?;
        rfs::fsync(&fd)?;
        Ok(())
    };
    let _ = std::thread::Builder::new()
        .name("tree-cache-sync".into())
        .spawn(move || {
            if let Err(error) = job() {
                tracing::debug!(%error, "tree cache entry not marked durable");
            }
        });
}

fn open_dir_at<Fd: rustix::fd::AsFd>(dirfd: Fd, path: &Path) -> Result<OwnedFd, Errno> {
    rfs::openat(
        dirfd,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The outcome of [`make_farm`].
struct Farmed {
    paths: u64,
    fingerprint: String,
    /// The fixups, each with the `(dev, ino)` its path has in the farm.
    fixups: Vec<(Fixup, (u64, u64))>,
}

/// Threads that link a farm: directories are independent jobs.
fn farm_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

/// Walks the tree at `src`, computing its fingerprint, and links it into
/// a new directory `dest`: every directory is a job (list it, stat and
/// link or `mkdir` its entries, then give it its metadata), run by
/// [`farm_workers`] threads. Directories are reopened from the roots with
/// `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so no job holds
/// descriptors for long and nesting depth costs nothing.
///
/// The fingerprint is a SHA-256 over one record per path (type and mode,
/// owner, size for non-directories, mtime), sorted by path.
fn make_farm(
    src: &OwnedFd,
    dest: &Path,
    fixups: &[Fixup],
    privileged: bool,
) -> Result<Farmed, FarmError> {
    let unusable = |what: &str, e: Errno| FarmError::Unusable(format!("{what}: {e}"));
    rfs::mkdir(dest, Mode::from_raw_mode(0o700)).map_err(|e| unusable("creating the farm", e))?;
    let dst = open_dir_at(rfs::CWD, dest).map_err(|e| unusable("opening the farm", e))?;
    walk(src, Some(&dst), fixups, privileged)
}

/// The walk of [`make_farm`], linking into `dst` when there is one; without
/// one it only reads (fingerprint, and where the fixup paths are).
fn walk(
    src: &OwnedFd,
    dst: Option<&OwnedFd>,
    fixups: &[Fixup],
    privileged: bool,
) -> Result<Farmed, FarmError> {
    let wanted: HashMap<Vec<u8>, usize> = fixups
        .iter()
        .enumerate()
        .map(|(i, f)| (f.path.as_os_str().as_bytes().to_vec(), i))
        .collect();
    let shared = Farm {
        src,
        dst,
        privileged,
        wanted: &wanted,
        queue: Mutex::new(Queue {
            jobs: vec![Vec::new()],
            pending: 1,
            error: None,
        }),
        wake: Condvar::new(),
    };
    let outs: Vec<WorkerOut> = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..farm_workers())
            .map(|_| scope.spawn(|| shared.work()))
            .collect();
        let mut outs = vec![shared.work()];
        for helper in helpers {
            // A panicking helper leaves its jobs undone: the farm fails.
            outs.push(helper.join().unwrap_or_else(|_| WorkerOut {
                panicked: true,
                ..WorkerOut::default()
            }));
        }
        outs
    });
    let queue = shared.queue.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = queue.error {
        return Err(e);
    }
    if outs.iter().any(|o| o.panicked) || queue.pending != 0 {
        return Err(FarmError::Unusable("a farm thread failed".to_string()));
    }
    let mut records: Vec<(Vec<u8>, String)> = Vec::new();
    let mut found: Vec<Option<(u64, u64)>> = vec![None; fixups.len()];
    for out in outs {
        records.extend(out.records);
        for (i, id) in out.found {
            found[i] = Some(id);
        }
    }
    records.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = Sha256::new();
    for (path, line) in &records {
        hasher.update(path);
        hasher.update(line.as_bytes());
    }
    let mut out = Vec::with_capacity(fixups.len());
    for (fixup, found) in fixups.iter().zip(found) {
        match found {
            Some(id) => out.push((fixup.clone(), id)),
            None => {
                return Err(FarmError::Damaged(format!(
                    "fixup path {} is missing",
                    fixup.path.display()
                )))
            }
        }
    }
    Ok(Farmed {
        paths: records.len() as u64,
        fingerprint: hex::encode(hasher.finalize()),
        fixups: out,
    })
}

struct Farm<'a> {
    src: &'a OwnedFd,
    /// `None`: only walk (see [`TreeCache::verify`]).
    dst: Option<&'a OwnedFd>,
    privileged: bool,
    /// Image paths with a fixup, to their index.
    wanted: &'a HashMap<Vec<u8>, usize>,
    queue: Mutex<Queue>,
    wake: Condvar,
}

struct Queue {
    /// Directories to do, relative to the roots ("" is the root).
    jobs: Vec<Vec<u8>>,
    /// Jobs queued or running.
    pending: usize,
    /// The first error; the others stop.
    error: Option<FarmError>,
}

#[derive(Default)]
struct WorkerOut {
    /// Image path and fingerprint record of every entry this worker saw.
    records: Vec<(Vec<u8>, String)>,
    /// `(fixup index, (dev, ino))` of fixup paths in the farm.
    found: Vec<(usize, (u64, u64))>,
    panicked: bool,
}

impl Farm<'_> {
    fn work(&self) -> WorkerOut {
        let mut out = WorkerOut::default();
        loop {
            let job = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if q.error.is_some() || q.pending == 0 {
                        return out;
                    }
                    if let Some(job) = q.jobs.pop() {
                        break job;
                    }
                    q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            let result = self.dir(&job, &mut out);
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.pending -= 1;
            match result {
                Ok(children) => {
                    q.pending += children.len();
                    q.jobs.extend(children);
                }
                Err(e) => {
                    if q.error.is_none() {
                        q.error = Some(e);
                    }
                }
            }
            drop(q);
            self.wake.notify_all();
        }
    }

    /// Links the entries of directory `rel` and returns its subdirectories.
    fn dir(&self, rel: &[u8], out: &mut WorkerOut) -> Result<Vec<Vec<u8>>, FarmError> {
        let shown = |rel: &[u8]| format!("/{}", String::from_utf8_lossy(rel));
        let damaged = |rel: &[u8], e: Errno| FarmError::Damaged(format!("{}: {e}", shown(rel)));
        let unusable = |what: &str, rel: &[u8], e: Errno| {
            FarmError::Unusable(format!("{what} {}: {e}", shown(rel)))
        };
        let here: &[u8] = if rel.is_empty() { b"." } else { rel };
        let src = open_beneath(self.src, here).map_err(|e| damaged(rel, e))?;
        let dst = match self.dst {
            Some(root) => Some(open_beneath(root, here).map_err(|e| unusable("open", rel, e))?),
            None => None,
        };
        let st = rfs::fstat(&src).map_err(|e| damaged(rel, e))?;
        let mut image_path = Vec::with_capacity(rel.len() + 64);
        image_path.push(b'/');
        image_path.extend_from_slice(rel);
        if rel.is_empty() {
            out.records.push((image_path.clone(), record(&st)));
            if let Some(&i) = self.wanted.get(&image_path) {
                let d = match &dst {
                    Some(dst) => rfs::fstat(dst).map_err(|e| unusable("stat", rel, e))?,
                    None => st,
                };
                out.found.push((i, (d.st_dev, d.st_ino)));
            }
        }
        let names = list_sorted(&src).map_err(|e| damaged(rel, e))?;
        let mut children = Vec::new();
        for name in names {
            let name_os = OsStr::from_bytes(&name);
            let mut child = image_path.clone();
            if !rel.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(&name);
            let cst = rfs::statat(&src, name_os, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| damaged(&child[1..], e))?;
            out.records.push((child.clone(), record(&cst)));
            let Some(dst) = &dst else {
                if FileType::from_raw_mode(cst.st_mode) == FileType::Directory {
                    children.push(child[1..].to_vec());
                }
                if let Some(&i) = self.wanted.get(&child) {
                    out.found.push((i, (cst.st_dev, cst.st_ino)));
                }
                continue;
            };
            let id = if FileType::from_raw_mode(cst.st_mode) == FileType::Directory {
                rfs::mkdirat(dst, name_os, Mode::from_raw_mode(0o700))
                    .map_err(|e| unusable("mkdir", &child[1..], e))?;
                children.push(child[1..].to_vec());
                None
            } else {
                match rfs::linkat(&src, name_os, dst, name_os, AtFlags::empty()) {
                    Ok(()) => {}
                    Err(Errno::NOENT) => {
                        return Err(FarmError::Damaged(format!(
                            "{} vanished",
                            shown(&child[1..])
                        )))
                    }
                    Err(e) => return Err(unusable("link", &child[1..], e)),
                }
                Some((cst.st_dev, cst.st_ino))
            };
            if let Some(&i) = self.wanted.get(&child) {
                let id = match id {
                    Some(id) => id,
                    None => {
                        let d = rfs::statat(dst, name_os, AtFlags::SYMLINK_NOFOLLOW)
                            .map_err(|e| unusable("stat", &child[1..], e))?;
                        (d.st_dev, d.st_ino)
                    }
                };
                out.found.push((i, id));
            }
        }
        // Last: creating the entries changed the directory's times.
        if let Some(dst) = &dst {
            copy_dir_meta(&src, dst, &st, self.privileged)?;
        }
        Ok(children)
    }
}

/// The fingerprint record of one entry (after its path).
fn record(st: &Stat) -> String {
    let size = if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        0
    } else {
        st.st_size
    };
    format!(
        "\0{:o} {} {} {} {}.{}\n",
        st.st_mode, st.st_uid, st.st_gid, size, st.st_mtime, st.st_mtime_nsec
    )
}

/// A directory below `root`, never through a symlink or out of it.
fn open_beneath(root: &OwnedFd, rel: &[u8]) -> Result<OwnedFd, Errno> {
    rfs::openat2(
        root,
        OsStr::from_bytes(rel),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV,
    )
}

fn list_sorted(fd: &OwnedFd) -> Result<Vec<Vec<u8>>, Errno> {
    let mut names = Vec::new();
    for entry in Dir::read_from(fd)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// Gives the farm directory `dst` what `mkfs.ext4 -d` copies from the
/// cached one: owner (as root), mode, xattrs, times (last: creating the
/// children changed them).
fn copy_dir_meta(
    src: &OwnedFd,
    dst: &OwnedFd,
    st: &Stat,
    privileged: bool,
) -> Result<(), FarmError> {
    let unusable = |what: &str, e: Errno| FarmError::Unusable(format!("{what}: {e}"));
    if privileged {
        rfs::fchown(
            dst,
            Some(rfs::Uid::from_raw(st.st_uid)),
            Some(rfs::Gid::from_raw(st.st_gid)),
        )
        .map_err(|e| unusable("chown in the farm", e))?;
    }
    rfs::fchmod(dst, Mode::from_raw_mode(st.st_mode & 0o7777))
        .map_err(|e| unusable("chmod in the farm", e))?;
    copy_xattrs(src, dst)?;
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    };
    rfs::futimens(dst, &times).map_err(|e| unusable("setting times in the farm", e))
}

fn copy_xattrs(src: &OwnedFd, dst: &OwnedFd) -> Result<(), FarmError> {
    let damaged = |e: Errno| FarmError::Damaged(format!("reading xattrs: {e}"));
    let len = match rfs::flistxattr_query(src) {
        Ok(0) | Err(Errno::NOTSUP) => return Ok(()),
        Ok(n) => n,
        Err(e) => return Err(damaged(e)),
    };
    let mut list = vec![0u8; len];
    let len = rfs::flistxattr(src, &mut list[..]).map_err(damaged)?;
    for name in list[..len.min(list.len())]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let name = OsStr::from_bytes(name);
        let value = get_xattr(src, name).map_err(damaged)?;
        if let Err(e) = rfs::fsetxattr(dst, name, &value, XattrFlags::empty()) {
            // One the system sets by itself (a security label) may not be
            // settable, and is fine if the farm has it already.
            if get_xattr(dst, name).ok().as_deref() != Some(&value[..]) {
                return Err(FarmError::Unusable(format!(
                    "xattr {} in the farm: {e}",
                    name.to_string_lossy()
                )));
            }
        }
    }
    Ok(())
}

fn get_xattr(fd: &OwnedFd, name: &OsStr) -> Result<Vec<u8>, Errno> {
    let len = rfs::fgetxattr_query(fd, name)?;
    let mut value = vec![0u8; len];
    let len = rfs::fgetxattr(fd, name, &mut value[..])?;
    value.truncate(len);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_order_compression_and_privilege() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let k = |l: &[(&str, Compression)], p| {
            TreeKey::with_privilege(l.iter().map(|(d, c)| (d.to_string(), *c)), p)
        };
        let base = k(&[(&a, Compression::Gzip), (&b, Compression::Zstd)], true);
        assert_eq!(base.hex().len(), 64);
        assert_eq!(
            base,
            k(&[(&a, Compression::Gzip), (&b, Compression::Zstd)], true)
        );
        for other in [
            k(&[(&b, Compression::Zstd), (&a, Compression::Gzip)], true),
            k(&[(&a, Compression::None), (&b, Compression::Zstd)], true),
            k(&[(&a, Compression::Gzip), (&b, Compression::Zstd)], false),
            k(&[(&a, Compression::Gzip)], true),
        ] {
            assert_ne!(base.hex(), other.hex());
        }
    }

    #[test]
    fn names_are_parsed_strictly() {
        let key = "c".repeat(64);
        assert!(matches!(parse_name(&key), Some(Name::Entry)));
        assert!(matches!(
            parse_name(&format!("{key}.123-0-0000abcd.tmp")),
            Some(Name::Leftover { pid: 123 })
        ));
        assert!(matches!(
            parse_name(&format!("{key}.77-1-0.trash")),
            Some(Name::Leftover { pid: 77 })
        ));
        for foreign in [
            "notes.txt".to_string(),
            format!("{key}.tmp"),
            format!("{}.1-0-0.tmp", "c".repeat(63)),
            format!("{key}.x-0-0.tmp"),
            format!("{key}x"),
        ] {
            assert!(parse_name(&foreign).is_none(), "{foreign}");
        }
    }
}
