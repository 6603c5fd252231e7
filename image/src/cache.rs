//! The digest-addressed layer cache shared by every image.
//!
//! Blobs live at `<dir>/blobs/sha256/<hex>` and are immutable once there:
//! a blob only gets its final name after its full content was hashed and
//! sized while streaming into a uniquely named `*.partial` file in the same
//! directory, and matched the digest and size it was asked for. Two
//! downloads of the same digest never share a file, and the second one to
//! finish throws its copy away, so concurrent pulls cannot corrupt each
//! other. A download that fails, is truncated or is dropped mid-way
//! (cancellation) removes its partial file.
//!
//! [`crate::registry`] streams layers into it; the unpacker reads them
//! back with [`LayerCache::open_blob`]; the `ImageRegistry` actor calls
//! [`LayerCache::prune`] with the digests its images still reference.
//! Pruning is not synchronised with downloads in other tasks: the caller
//! serialises the two (the actor does). The cache of unpacked trees
//! ([`crate::treecache`]) lives in `<dir>/trees` and is pruned with it.

use std::collections::HashSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt, BufWriter};

use crate::treecache::TreeCache;

/// The only digest algorithm the cache stores.
pub const SHA256_PREFIX: &str = "sha256:";

/// Suffix of in-progress downloads.
const PARTIAL_SUFFIX: &str = ".partial";

/// A `.partial` file untouched for this long is stale even if the process
/// named in it still runs (a live download writes far more often).
const PARTIAL_STALE_AFTER: Duration = Duration::from_secs(60 * 60);

/// Buffer between the network stream and the partial file.
const WRITE_BUFFER: usize = 1 << 20;

/// Errors of the layer cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The digest is not `sha256:` followed by 64 lowercase hex digits.
    #[error("invalid digest {digest:?}: expected \"sha256:\" followed by 64 lowercase hex digits")]
    InvalidDigest {
        /// The rejected digest string.
        digest: String,
    },
    /// The streamed content hashed to another digest.
    #[error("blob content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the blob was requested under.
        expected: String,
        /// The digest of the bytes actually received.
        actual: String,
    },
    /// The stream ended before the declared size was reached.
    #[error("blob {digest} is truncated: expected {expected} bytes, got {actual}")]
    Truncated {
        /// The blob's digest.
        digest: String,
        /// Size from the descriptor.
        expected: u64,
        /// Bytes received before the stream ended.
        actual: u64,
    },
    /// The stream carried more bytes than the declared size.
    #[error("blob {digest} is larger than the {expected} bytes its descriptor declares")]
    Oversized {
        /// The blob's digest.
        digest: String,
        /// Size from the descriptor.
        expected: u64,
    },
    /// Reading the source stream failed.
    #[error("reading blob {digest} failed")]
    Stream {
        /// The blob's digest.
        digest: String,
        /// The stream's error.
        #[source]
        source: io::Error,
    },
    /// The blob is not in the cache.
    #[error("blob {digest} is not in the cache")]
    NotFound {
        /// The blob's digest.
        digest: String,
    },
    /// A cached blob failed re-verification and was removed.
    #[error("cached blob {digest} is corrupt ({detail}) and was removed; pull the image again")]
    Corrupt {
        /// The blob's digest.
        digest: String,
        /// What did not match.
        detail: String,
    },
    /// A filesystem operation on the cache failed.
    #[error("layer cache: cannot {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl CacheError {
    fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CacheError {
        let path = path.to_path_buf();
        move |source| CacheError::Io { op, path, source }
    }
}

/// How much [`LayerCache::open_blob`] checks before handing out a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Compare the file size with the expected size (cheap).
    #[default]
    Size,
    /// Also re-hash the whole file.
    Full,
}

/// One blob in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedBlob {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Where the blob lives.
    pub path: PathBuf,
}

/// What [`LayerCache::prune`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PruneStats {
    /// Blobs and stale partial files removed.
    pub removed: usize,
    /// Their total size, plus `tree_bytes_freed`.
    pub bytes_freed: u64,
    /// Unpacked trees removed from the tree cache (and leftovers of
    /// unfinished ones), see [`crate::treecache`].
    pub trees_removed: usize,
    /// File data those trees held.
    pub tree_bytes_freed: u64,
}

/// Result of [`LayerCache::insert_stream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inserted {
    /// The blob now in the cache.
    pub blob: CachedBlob,
    /// `false` when another download finished the same digest first and
    /// this copy was discarded.
    pub stored_by_us: bool,
}

/// Checks that `digest` is `sha256:` + 64 lowercase hex digits and returns
/// the hex part.
pub fn validate_digest(digest: &str) -> Result<&str, CacheError> {
    let invalid = || CacheError::InvalidDigest {
        digest: digest.to_string(),
    };
    let hex = digest.strip_prefix(SHA256_PREFIX).ok_or_else(invalid)?;
    if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(hex)
    } else {
        Err(invalid())
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("{SHA256_PREFIX}{}", hex::encode(Sha256::digest(data)))
}

/// The digest-addressed blob store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LayerCache {
    root: PathBuf,
    blobs: PathBuf,
}

impl LayerCache {
    /// Opens (creating if needed) the cache rooted at `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, CacheError> {
        let root = dir.into();
        let blobs = root.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(CacheError::io("create", &blobs))?;
        Ok(LayerCache { root, blobs })
    }

    /// The directory the cache was opened at.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cache of unpacked trees, `<dir>/trees` (see [`crate::treecache`]).
    pub fn trees(&self) -> Result<TreeCache, CacheError> {
        let dir = self.root.join(crate::treecache::TREES_DIR);
        TreeCache::open(&dir).map_err(|e| CacheError::Io {
            op: "open",
            path: dir,
            source: io::Error::other(e),
        })
    }

    /// `<dir>/blobs/sha256`, where blobs and partial downloads live.
    pub fn blob_dir(&self) -> &Path {
        &self.blobs
    }

    /// Where the blob with `digest` is (or would be) stored.
    pub fn path(&self, digest: &str) -> Result<PathBuf, CacheError> {
        Ok(self.blobs.join(validate_digest(digest)?))
    }

    /// Whether a blob with `digest` is in the cache.
    pub fn contains(&self, digest: &str) -> Result<bool, CacheError> {
        let path = self.path(digest)?;
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => Ok(meta.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(CacheError::io("inspect", &path)(e)),
        }
    }

    /// The blob with `digest`, if cached.
    pub fn get(&self, digest: &str) -> Result<Option<CachedBlob>, CacheError> {
        let path = self.path(digest)?;
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(CachedBlob {
                digest: digest.to_string(),
                size: meta.len(),
                path,
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::io("inspect", &path)(e)),
        }
    }

    /// Removes the blob with `digest`; `Ok(false)` if it was not cached.
    pub fn remove(&self, digest: &str) -> Result<bool, CacheError> {
        let path = self.path(digest)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(CacheError::io("remove", &path)(e)),
        }
    }

    /// Opens a cached blob for reading after checking that its size is
    /// `expected_size` and, with [`Verify::Full`], that its content hashes
    /// to `digest`. A blob failing either check is removed, so the next
    /// pull fetches it again.
    pub async fn open_blob(
        &self,
        digest: &str,
        expected_size: u64,
        verify: Verify,
    ) -> Result<tokio::fs::File, CacheError> {
        let path = self.path(digest)?;
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CacheError::NotFound {
                    digest: digest.to_string(),
                })
            }
            Err(e) => return Err(CacheError::io("open", &path)(e)),
        };
        let size = file
            .metadata()
            .map_err(CacheError::io("inspect", &path))?
            .len();
        if size != expected_size {
            self.discard_corrupt(&path);
            return Err(CacheError::Corrupt {
                digest: digest.to_string(),
                detail: format!("{size} bytes, expected {expected_size}"),
            });
        }
        let file = if verify == Verify::Full {
            let (file, actual) = tokio::task::spawn_blocking({
                let path = path.clone();
                move || hash_file(file, &path)
            })
            .await
            .map_err(|e| CacheError::Io {
                op: "hash",
                path: path.clone(),
                source: io::Error::other(e),
            })??;
            if actual != digest {
                self.discard_corrupt(&path);
                return Err(CacheError::Corrupt {
                    digest: digest.to_string(),
                    detail: format!("content hashes to {actual}"),
                });
            }
            file
        } else {
            file
        };
        let mut file = tokio::fs::File::from_std(file);
        file.rewind().await.map_err(CacheError::io("seek", &path))?;
        Ok(file)
    }

    fn discard_corrupt(&self, path: &Path) {
        if let Err(error) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), %error, "cannot remove corrupt cached blob");
        } else {
            tracing::warn!(path = %path.display(), "removed corrupt cached blob");
        }
    }

    /// Streams a blob into the cache. The content is hashed and counted on
    /// the way; it gets its final name only if it is exactly `size` bytes
    /// and hashes to `digest`. `on_progress` sees the running byte count
    /// after every chunk. If the future is dropped (cancelled) or fails,
    /// its partial file is removed.
    ///
    /// If the blob is already cached when the download completes, the new
    /// copy is discarded and the existing blob is returned.
    pub async fn insert_stream<S>(
        &self,
        digest: &str,
        size: u64,
        mut stream: S,
        mut on_progress: impl FnMut(u64),
    ) -> Result<Inserted, CacheError>
    where
        S: Stream<Item = io::Result<Bytes>> + Unpin,
    {
        let final_path = self.path(digest)?;
        let (file, partial) = self.create_partial(digest)?;
        let mut guard = PartialGuard {
            path: Some(partial.clone()),
        };
        let mut writer = BufWriter::with_capacity(WRITE_BUFFER, tokio::fs::File::from_std(file));
        let mut hasher = Sha256::new();
        let mut received: u64 = 0;

        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| CacheError::Stream {
                digest: digest.to_string(),
                source,
            })?;
            received += chunk.len() as u64;
            if received > size {
                return Err(CacheError::Oversized {
                    digest: digest.to_string(),
                    expected: size,
                });
            }
            hasher.update(&chunk);
            writer
                .write_all(&chunk)
                .await
                .map_err(CacheError::io("write", &partial))?;
            on_progress(received);
            // A fast registry keeps the stream ready and the loop CPU-bound
            // (hashing): yield when the task's budget is spent, so an abort
            // (cancellation) takes effect at the next chunk, not at the end.
            tokio::task::consume_budget().await;
        }
        if received < size {
            return Err(CacheError::Truncated {
                digest: digest.to_string(),
                expected: size,
                actual: received,
            });
        }
        let actual = format!("{SHA256_PREFIX}{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(CacheError::DigestMismatch {
                expected: digest.to_string(),
                actual,
            });
        }
        writer
            .flush()
            .await
            .map_err(CacheError::io("write", &partial))?;
        let file = writer.into_inner();
        file.sync_all()
            .await
            .map_err(CacheError::io("sync", &partial))?;
        drop(file);

        let stored_by_us = self.commit(&partial, &final_path)?;
        if stored_by_us {
            guard.path = None;
        }
        drop(guard);
        Ok(Inserted {
            blob: CachedBlob {
                digest: digest.to_string(),
                size,
                path: final_path,
            },
            stored_by_us,
        })
    }

    /// Stores an in-memory blob (same checks as [`Self::insert_stream`]).
    pub async fn insert_bytes(&self, digest: &str, data: Bytes) -> Result<Inserted, CacheError> {
        let size = data.len() as u64;
        let stream = futures::stream::iter([Ok::<_, io::Error>(data)]);
        self.insert_stream(digest, size, stream, |_| {}).await
    }

    /// Moves a verified partial file to its final name. Returns `false`
    /// when the blob already existed (the partial is then left for the
    /// caller's guard to remove).
    fn commit(&self, partial: &Path, final_path: &Path) -> Result<bool, CacheError> {
        if final_path.exists() {
            return Ok(false);
        }
        std::fs::rename(partial, final_path).map_err(CacheError::io("rename", partial))?;
        // Make the new name durable; the data already is.
        if let Ok(dir) = std::fs::File::open(&self.blobs) {
            let _ = dir.sync_all();
        }
        Ok(true)
    }

    fn create_partial(&self, digest: &str) -> Result<(std::fs::File, PathBuf), CacheError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let hex = validate_digest(digest)?;
        loop {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!(
                "{hex}.{pid}-{n}-{nanos:08x}{PARTIAL_SUFFIX}",
                pid = std::process::id()
            );
            let path = self.blobs.join(name);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => return Ok((file, path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(CacheError::io("create", &path)(e)),
            }
        }
    }

    /// Every blob in the cache (partial downloads excluded), sorted by
    /// digest.
    pub fn list(&self) -> Result<Vec<CachedBlob>, CacheError> {
        let mut blobs = Vec::new();
        for entry in self.entries()? {
            if let Entry::Blob(blob) = entry {
                blobs.push(blob);
            }
        }
        blobs.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(blobs)
    }

    /// Removes every blob whose digest is not in `referenced`, and partial
    /// downloads that are stale: their process is gone, or they were not
    /// written to for an hour. Partial files of live downloads are kept.
    /// Files the cache did not create are left alone. Then prunes the tree
    /// cache with the same digests ([`TreeCache::prune`]: a tree goes
    /// unless all its layers are referenced).
    pub fn prune(&self, referenced: &HashSet<String>) -> Result<PruneStats, CacheError> {
        let trees = self
            .trees()?
            .prune(referenced)
            .map_err(|e| CacheError::Io {
                op: "prune",
                path: self.root.join(crate::treecache::TREES_DIR),
                source: io::Error::other(e),
            })?;
        let mut stats = PruneStats {
            trees_removed: trees.removed,
            tree_bytes_freed: trees.bytes_freed,
            bytes_freed: trees.bytes_freed,
            ..PruneStats::default()
        };
        for entry in self.entries()? {
            let (path, size) = match entry {
                Entry::Blob(blob) if !referenced.contains(&blob.digest) => (blob.path, blob.size),
                Entry::Partial { path, size, stale } if stale => (path, size),
                _ => continue,
            };
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    stats.removed += 1;
                    stats.bytes_freed += size;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(CacheError::io("remove", &path)(e)),
            }
        }
        tracing::info!(
            removed = stats.removed,
            trees_removed = stats.trees_removed,
            bytes_freed = stats.bytes_freed,
            "pruned layer cache"
        );
        Ok(stats)
    }

    fn entries(&self) -> Result<Vec<Entry>, CacheError> {
        let dir = std::fs::read_dir(&self.blobs).map_err(CacheError::io("list", &self.blobs))?;
        let mut out = Vec::new();
        for entry in dir {
            let entry = entry.map_err(CacheError::io("list", &self.blobs))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let meta = match entry.metadata() {
                Ok(meta) if meta.is_file() => meta,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(CacheError::io("inspect", &entry.path())(e)),
            };
            if let Some(stem) = name.strip_suffix(PARTIAL_SUFFIX) {
                out.push(Entry::Partial {
                    path: entry.path(),
                    size: meta.len(),
                    stale: partial_is_stale(stem, &meta),
                });
            } else {
                let digest = format!("{SHA256_PREFIX}{name}");
                if validate_digest(&digest).is_ok() {
                    out.push(Entry::Blob(CachedBlob {
                        digest,
                        size: meta.len(),
                        path: entry.path(),
                    }));
                }
            }
        }
        Ok(out)
    }
}

enum Entry {
    Blob(CachedBlob),
    Partial {
        path: PathBuf,
        size: u64,
        stale: bool,
    },
}

/// `stem` is `<hex>.<pid>-<n>-<nanos>`.
fn partial_is_stale(stem: &str, meta: &std::fs::Metadata) -> bool {
    let old = meta
        .modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .is_some_and(|age| age > PARTIAL_STALE_AFTER);
    if old {
        return true;
    }
    let pid = stem
        .split_once('.')
        .and_then(|(_, rest)| rest.split('-').next())
        .and_then(|pid| pid.parse::<i32>().ok());
    match pid {
        Some(pid) if pid > 0 => !process_alive(pid),
        // Not a name we make: only age makes it stale.
        _ => false,
    }
}

fn process_alive(pid: i32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        // EPERM: it exists but belongs to someone else.
        Err(_) => true,
    }
}

fn hash_file(mut file: std::fs::File, path: &Path) -> Result<(std::fs::File, String), CacheError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; WRITE_BUFFER];
    loop {
        let n = file.read(&mut buf).map_err(CacheError::io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok((
        file,
        format!("{SHA256_PREFIX}{}", hex::encode(hasher.finalize())),
    ))
}

/// Removes a partial file unless disarmed; runs when a download fails or
/// its future is dropped.
struct PartialGuard {
    path: Option<PathBuf>,
}

impl Drop for PartialGuard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            if let Err(error) = std::fs::remove_file(&path) {
                if error.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), %error, "cannot remove partial download");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_validation() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(validate_digest(&good).ok(), Some("a".repeat(64).as_str()));
        for bad in [
            String::new(),
            "sha256:".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:{}", "a".repeat(65)),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:../{}", "a".repeat(61)),
            format!("sha256:{}/", "a".repeat(63)),
            format!("SHA256:{}", "a".repeat(64)),
        ] {
            assert!(
                matches!(validate_digest(&bad), Err(CacheError::InvalidDigest { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn partial_staleness_follows_the_owner_pid() {
        let dir = std::env::temp_dir().join(format!("banger-cache-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let f = dir.join("x");
        std::fs::write(&f, b"x").expect("write");
        let meta = std::fs::metadata(&f).expect("meta");
        let me = std::process::id();
        assert!(!partial_is_stale(
            &format!("{}.{me}-0-0", "a".repeat(64)),
            &meta
        ));
        // PIDs above pid_max (4194304 at most) cannot exist.
        assert!(partial_is_stale(
            &format!("{}.99999999-0-0", "a".repeat(64)),
            &meta
        ));
        assert!(!partial_is_stale("foreign", &meta));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
