//! Where the daemon keeps managed artifacts under its state dir.
//!
//! ```text
//! <state>/images/<id>/          rootfs.ext4, work-seed.ext4
//! <state>/images/<id>.staging/  an image being built (removed on failure and at start-up)
//! <state>/kernels/<id>/         vmlinuz|vmlinux, vmlinux (extracted), initrd.img, modules/
//! <state>/kernels/<id>.staging/
//! <state>/layers/               the OCI layer cache, by digest
//! <state>/layers/trees/<key>/   unpacked trees per layer chain (the tree cache)
//! <state>/downloads/            resumable kernel downloads
//! ```

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Layout {
    pub state_dir: PathBuf,
}

/// Suffix of directories that hold unfinished work.
pub const STAGING_SUFFIX: &str = ".staging";

impl Layout {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
        }
    }

    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    pub fn kernels_dir(&self) -> PathBuf {
        self.state_dir.join("kernels")
    }

    pub fn layers_dir(&self) -> PathBuf {
        self.state_dir.join("layers")
    }

    pub fn downloads_dir(&self) -> PathBuf {
        self.state_dir.join("downloads")
    }

    /// A fresh staging dir path under `parent` for object `id`.
    pub fn staging(parent: &Path, id: &str) -> PathBuf {
        parent.join(format!("{id}{STAGING_SUFFIX}"))
    }

    /// Removes every `*.staging` dir under `parent` (unfinished work of a
    /// daemon that died); returns how many.
    pub fn remove_staging(parent: &Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(parent) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .ends_with(STAGING_SUFFIX)
                && std::fs::remove_dir_all(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }
}

impl Layout {
    /// At daemon start-up, before any request: removes unfinished work of
    /// a daemon that died (staging dirs); returns how many were removed.
    pub fn reconcile(&self) -> u64 {
        let staging: u64 = [self.images_dir(), self.kernels_dir(), self.downloads_dir()]
            .iter()
            .map(|d| Self::remove_staging(d))
            .sum();
        // Unfinished tree cache entries and trees being removed.
        let trees = self.trees_dir();
        let unfinished = if trees.is_dir() {
            banger_image::treecache::TreeCache::open(&trees)
                .map(|t| t.remove_unfinished() as u64)
                .unwrap_or(0)
        } else {
            0
        };
        staging + unfinished
    }

    /// `<layers>/trees`: the tree cache (see `banger_image::treecache`).
    pub fn trees_dir(&self) -> PathBuf {
        self.layers_dir().join(banger_image::treecache::TREES_DIR)
    }
}

/// A random id for a new object (16 hex chars).
pub fn new_id() -> String {
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = (nanos as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes a staging dir when dropped unless [`StagingDir::keep`] was
/// called: failures and cancellations (a dropped future) leave nothing.
#[derive(Debug)]
pub struct StagingDir {
    path: PathBuf,
    armed: bool,
}

impl StagingDir {
    pub fn create(path: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&path)?;
        Ok(Self { path, armed: true })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The dir was published (renamed away): nothing to clean.
    pub fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.armed || std::fs::remove_dir_all(&self.path).is_ok() || !self.path.exists() {
            return;
        }
        // Work cancelled a moment ago may still be finishing a write in
        // there (ENOTEMPTY): retry off-thread for a little while.
        let path = self.path.clone();
        std::thread::spawn(move || {
            for _ in 0..50 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                if std::fs::remove_dir_all(&path).is_ok() || !path.exists() {
                    return;
                }
            }
            tracing::warn!(path = %path.display(), "could not remove a staging dir; it is removed at the next start");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_dir_is_removed_unless_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = StagingDir::create(dir.path().join("a.staging")).expect("a");
        std::fs::write(a.path().join("f"), b"x").expect("write");
        drop(a);
        assert!(!dir.path().join("a.staging").exists());
        let b = StagingDir::create(dir.path().join("b.staging")).expect("b");
        b.keep();
        assert!(dir.path().join("b.staging").exists());
        assert_eq!(Layout::remove_staging(dir.path()), 1);
        assert!(!dir.path().join("b.staging").exists());
    }

    #[test]
    fn ids_are_hex_and_distinct() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
