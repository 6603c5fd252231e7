//! Deferred fixups: what the image must contain but the host tree must not
//! (device nodes, FIFOs, setuid/setgid bits, `security.capability`), or
//! cannot (owners when not root, xattrs the host refused).
//!
//! While unpacking they are keyed by the host inode of the staged entry, so
//! hardlinks share them and a whiteout that removes the entry drops them;
//! a fresh inode always starts with a clean record. [`resolve`] walks the
//! finished tree and turns them into per-path [`Fixup`]s, which
//! [`crate::ext4`] applies inside the image with `debugfs`.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::UnpackError;

/// Kind of special file recorded instead of being created on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// Character device.
    Char,
    /// Block device.
    Block,
    /// Named pipe.
    Fifo,
}

impl NodeKind {
    /// The `S_IFMT` bits of this kind.
    pub fn type_bits(self) -> u32 {
        match self {
            NodeKind::Char => 0o020000,
            NodeKind::Block => 0o060000,
            NodeKind::Fifo => 0o010000,
        }
    }
}

/// A device node or FIFO that exists in the image only. On the host its
/// path holds an empty, mode-0600 regular placeholder file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceNode {
    /// Character, block or FIFO.
    pub kind: NodeKind,
    /// Major number (0 for FIFOs).
    pub major: u32,
    /// Minor number (0 for FIFOs).
    pub minor: u32,
}

/// Everything the image needs at one path beyond what the host tree holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fixup {
    /// Absolute path inside the image (`/usr/bin/su`).
    pub path: PathBuf,
    /// Replace the placeholder with this node.
    pub node: Option<DeviceNode>,
    /// Full `st_mode` (type bits included) to set.
    pub mode: Option<u32>,
    /// Owner `(uid, gid)` to set.
    pub owner: Option<(u32, u32)>,
    /// Modification time (seconds since the epoch) to set.
    pub mtime: Option<i64>,
    /// Extended attributes to set, `(name, value)`.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// What is recorded for one staged inode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Deferred {
    pub node: Option<DeviceNode>,
    /// Permission bits (`0o7777`) to set in the image.
    pub perm: Option<u32>,
    pub owner: Option<(u32, u32)>,
    pub mtime: Option<i64>,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Deferred {
    pub(crate) fn is_empty(&self) -> bool {
        self.node.is_none()
            && self.perm.is_none()
            && self.owner.is_none()
            && self.mtime.is_none()
            && self.xattrs.is_empty()
    }

    pub(crate) fn set_xattr(&mut self, name: &str, value: &[u8]) {
        match self.xattrs.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value.to_vec(),
            None => self.xattrs.push((name.to_owned(), value.to_vec())),
        }
    }
}

/// Deferred records by host inode number.
pub(crate) type DeferredMap = HashMap<u64, Deferred>;

/// Walks the tree under `root` (never following symlinks) and returns one
/// [`Fixup`] per path whose inode has a deferred record, sorted by path.
pub(crate) fn resolve(root: &Path, deferred: &DeferredMap) -> Result<Vec<Fixup>, UnpackError> {
    let mut out = Vec::new();
    let walk_err = |path: &Path, source| UnpackError::Walk {
        path: path.display().to_string(),
        source,
    };
    let root_meta = std::fs::symlink_metadata(root).map_err(|e| walk_err(root, e))?;
    // `mkfs.ext4 -d` gives the image root 0755 root:root whatever the
    // source directory says, so the root's metadata is always a fixup when
    // it differs from that.
    let mut root_rec = deferred.get(&root_meta.ino()).cloned().unwrap_or_default();
    let perm = root_rec.perm.unwrap_or(root_meta.mode() & 0o7777);
    let owner = root_rec.owner.unwrap_or((root_meta.uid(), root_meta.gid()));
    root_rec.perm = (perm != 0o755).then_some(perm);
    root_rec.owner = (owner != (0, 0)).then_some(owner);
    if !root_rec.is_empty() {
        out.push(to_fixup(PathBuf::from("/"), &root_meta, &root_rec));
    }
    if deferred.is_empty() {
        return Ok(out);
    }
    // Iterative: the tree may be deeper than the stack is comfortable with.
    let mut stack = vec![(root.to_path_buf(), PathBuf::from("/"))];
    while let Some((host_dir, image_dir)) = stack.pop() {
        let entries = std::fs::read_dir(&host_dir).map_err(|e| walk_err(&host_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| walk_err(&host_dir, e))?;
            let host = entry.path();
            let image = image_dir.join(entry.file_name());
            let meta = std::fs::symlink_metadata(&host).map_err(|e| walk_err(&host, e))?;
            if let Some(d) = deferred.get(&meta.ino()).filter(|d| !d.is_empty()) {
                out.push(to_fixup(image.clone(), &meta, d));
            }
            if meta.file_type().is_dir() {
                stack.push((host, image));
            }
        }
    }
    out.sort_by(|a, b| {
        a.path
            .as_os_str()
            .as_bytes()
            .cmp(b.path.as_os_str().as_bytes())
    });
    Ok(out)
}

/// The fixups of `list` whose path under `root` is still the inode
/// `(st_dev, st_ino)` recorded with it; see `TreeFixups::ByPath`.
pub(crate) fn still_applying(root: &Path, list: Vec<(Fixup, (u64, u64))>) -> Vec<Fixup> {
    list.into_iter()
        .filter(|(fixup, (dev, ino))| {
            let rel = fixup.path.strip_prefix("/").unwrap_or(&fixup.path);
            rustix::fs::lstat(root.join(rel)).is_ok_and(|st| st.st_dev == *dev && st.st_ino == *ino)
        })
        .map(|(fixup, _)| fixup)
        .collect()
}

fn to_fixup(path: PathBuf, meta: &std::fs::Metadata, d: &Deferred) -> Fixup {
    let ft = meta.file_type();
    let type_bits = match d.node {
        Some(node) => node.kind.type_bits(),
        None if ft.is_dir() => 0o040000,
        None if ft.is_symlink() => 0o120000,
        None if ft.is_char_device() => 0o020000,
        None if ft.is_block_device() => 0o060000,
        None if ft.is_fifo() => 0o010000,
        None => 0o100000,
    };
    Fixup {
        path,
        node: d.node,
        mode: d.perm.map(|p| type_bits | (p & 0o7777)),
        owner: d.owner,
        mtime: d.mtime,
        xattrs: d.xattrs.clone(),
    }
}
