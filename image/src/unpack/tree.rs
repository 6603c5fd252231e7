//! The staging tree: every filesystem operation the unpacker performs, run on
//! a blocking thread, one layer at a time.
//!
//! All operations are relative to an `O_PATH` descriptor of the staging
//! root. Parent directories are resolved one component at a time with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`; when a component is a
//! symlink the whole prefix is resolved again from the root with
//! `RESOLVE_IN_ROOT`, so symlinks behave as if the root were `/` (what
//! `umoci` and containerd do) and the kernel clamps every `..` and absolute
//! target at the root. The final component is always handled with
//! `*at(..., AT_SYMLINK_NOFOLLOW)`/`O_NOFOLLOW|O_EXCL` calls, so nothing is
//! ever written through a symlink: an existing entry is unlinked first.
//! Hardlink targets are resolved with `RESOLVE_NO_SYMLINKS` only.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::hash::BuildHasher;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{
    self as rfs, AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps,
    XattrFlags,
};
use rustix::io::Errno;
use tokio::sync::mpsc;

use super::fixup::{Deferred, DeferredMap, DeviceNode};
use super::path::{self, NameViolation};
use super::{LayerStats, Limits, UnpackError};

/// Deepest directory nesting the unpacker recurses into (removal, opaque
/// whiteouts). Deeper trees are refused instead of risking the stack.
pub(crate) const MAX_TREE_DEPTH: usize = 1024;

const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;

/// One message from the tar reader to the staging thread.
#[derive(Debug)]
pub(crate) enum Msg {
    /// A member; a `File` is followed by `Data`* and `EndOfEntry`.
    Entry(EntryMeta),
    Data(Vec<u8>),
    EndOfEntry,
    /// The layer ended cleanly.
    EndOfLayer,
}

/// A member as read from the tar, not yet interpreted.
#[derive(Debug)]
pub(crate) struct EntryMeta {
    pub raw_path: Vec<u8>,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: Timespec,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

#[derive(Debug)]
pub(crate) enum EntryKind {
    File,
    Dir,
    Symlink(Vec<u8>),
    Hardlink(Vec<u8>),
    Node(DeviceNode),
}

/// The staging tree and everything recorded about it across layers.
#[derive(Debug)]
pub(crate) struct Staging {
    root: OwnedFd,
    root_ino: u64,
    limits: Limits,
    /// Running as root: owners are set with `fchown`.
    privileged: bool,
    /// Owners go into deferred fixups instead of `fchown`.
    pub(crate) defer_ownership: bool,
    euid: u32,
    egid: u32,
    pub(crate) deferred: DeferredMap,
    dir_times: HashMap<u64, DirTime>,
    pub(crate) bytes_written: u64,
    pub(crate) entries: u64,
}

#[derive(Debug)]
struct DirTime {
    comps: Vec<u8>,
    mtime: Timespec,
}

/// Per-layer bookkeeping.
struct Layer<'a> {
    digest: &'a str,
    /// `(directory inode, hash of name)` of every entry this layer created
    /// or declared, including parents it passed through: whiteouts never
    /// remove these, opaque directories keep them.
    touched: HashSet<(u64, u64)>,
    hasher: RandomState,
    stats: LayerStats,
}

impl Layer<'_> {
    fn key(&self, dir_ino: u64, name: &[u8]) -> (u64, u64) {
        (dir_ino, self.hasher.hash_one(name))
    }
    fn touch(&mut self, dir_ino: u64, name: &[u8]) {
        let k = self.key(dir_ino, name);
        self.touched.insert(k);
    }
    fn touched(&self, dir_ino: u64, name: &[u8]) -> bool {
        self.touched.contains(&self.key(dir_ino, name))
    }
}

/// A resolved parent directory.
struct Parent {
    fd: OwnedFd,
    ino: u64,
}

/// Error context: the layer and the member being applied.
struct Ctx<'a> {
    layer: &'a str,
    path: String,
}

impl Ctx<'_> {
    fn io(&self, op: &'static str, e: impl Into<io::Error>) -> UnpackError {
        UnpackError::Io {
            layer: self.layer.to_owned(),
            path: self.path.clone(),
            op,
            source: e.into(),
        }
    }
    fn layer(&self) -> String {
        self.layer.to_owned()
    }
    fn path(&self) -> String {
        self.path.clone()
    }
}

fn is_dir(mode: u32) -> bool {
    FileType::from_raw_mode(mode) == FileType::Directory
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

impl Staging {
    /// Opens the staging root, which must be an existing, empty directory.
    pub(crate) fn open(root: &Path, limits: Limits) -> Result<Staging, UnpackError> {
        let bad = |reason: &'static str, source: Option<io::Error>| UnpackError::StagingRoot {
            path: root.display().to_string(),
            reason,
            source,
        };
        let fd = rfs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| bad("cannot open it as a directory", Some(e.into())))?;
        let mut dir = Dir::read_from(&fd).map_err(|e| bad("cannot list it", Some(e.into())))?;
        for entry in dir.by_ref() {
            let entry = entry.map_err(|e| bad("cannot list it", Some(e.into())))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                return Err(bad("it is not empty", None));
            }
        }
        let st = rfs::fstat(&fd).map_err(|e| bad("cannot stat it", Some(e.into())))?;
        let euid = rustix::process::geteuid().as_raw();
        let egid = rustix::process::getegid().as_raw();
        let privileged = euid == 0;
        // The root is the image's "/": 0755 root:root unless a layer says
        // otherwise with a "./" entry.
        rfs::fchmod(&fd, Mode::from_raw_mode(0o755))
            .map_err(|e| bad("cannot chmod it", Some(e.into())))?;
        if privileged {
            rfs::fchown(&fd, Some(rfs::Uid::ROOT), Some(rfs::Gid::ROOT))
                .map_err(|e| bad("cannot chown it", Some(e.into())))?;
        }
        let path_fd = rfs::openat(
            &fd,
            ".",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| bad("cannot open it as a directory", Some(e.into())))?;
        let mut staging = Staging {
            root: path_fd,
            root_ino: st.st_ino,
            limits,
            privileged,
            defer_ownership: !privileged,
            euid,
            egid,
            deferred: DeferredMap::new(),
            dir_times: HashMap::new(),
            bytes_written: 0,
            entries: 0,
        };
        if !privileged {
            staging.deferred_mut(st.st_ino).owner = Some((0, 0));
        }
        Ok(staging)
    }

    /// Switches ownership handling; see `Unpacker::defer_ownership`.
    pub(crate) fn set_defer_ownership(&mut self, defer: bool) {
        self.defer_ownership = defer || !self.privileged;
    }

    fn deferred_mut(&mut self, ino: u64) -> &mut Deferred {
        self.deferred.entry(ino).or_default()
    }

    /// Forgets whatever was recorded for an inode number that now belongs to
    /// a freshly created entry (inode numbers are reused after deletion).
    fn fresh_inode(&mut self, ino: u64) {
        self.deferred.remove(&ino);
        self.dir_times.remove(&ino);
    }

    /// Applies one layer's messages until `EndOfLayer`. Returns an error when
    /// the sender goes away first (the reader failed and reports why).
    pub(crate) fn run_layer(
        &mut self,
        digest: &str,
        rx: &mut mpsc::Receiver<Msg>,
    ) -> Result<LayerStats, UnpackError> {
        let mut layer = Layer {
            digest,
            touched: HashSet::new(),
            hasher: RandomState::new(),
            stats: LayerStats {
                digest: digest.to_owned(),
                ..LayerStats::default()
            },
        };
        let written_before = self.bytes_written;
        loop {
            match rx.blocking_recv() {
                Some(Msg::Entry(meta)) => self.apply(&mut layer, meta, rx)?,
                Some(Msg::EndOfLayer) => break,
                Some(Msg::Data(_)) | Some(Msg::EndOfEntry) | None => {
                    return Err(UnpackError::Aborted {
                        layer: digest.to_owned(),
                    })
                }
            }
        }
        self.restore_dir_times(digest)?;
        layer.stats.bytes_written = self.bytes_written - written_before;
        Ok(layer.stats)
    }

    fn apply(
        &mut self,
        layer: &mut Layer<'_>,
        meta: EntryMeta,
        rx: &mut mpsc::Receiver<Msg>,
    ) -> Result<(), UnpackError> {
        let ctx = Ctx {
            layer: layer.digest,
            path: path::display(&meta.raw_path),
        };
        self.entries += 1;
        layer.stats.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                layer: ctx.layer(),
                path: ctx.path(),
                limit: self.limits.max_entries,
            });
        }
        let comps = path::components(&meta.raw_path).map_err(|v| match v {
            NameViolation::Absolute => UnpackError::AbsolutePath {
                layer: ctx.layer(),
                path: ctx.path(),
            },
            NameViolation::DotDot => UnpackError::PathTraversal {
                layer: ctx.layer(),
                path: ctx.path(),
            },
            NameViolation::Empty => UnpackError::UnsupportedEntry {
                layer: ctx.layer(),
                path: ctx.path(),
                what: "empty member name",
            },
        })?;
        let uid = owner_id(&ctx, meta.uid)?;
        let gid = owner_id(&ctx, meta.gid)?;
        let Some((name, parents)) = comps.split_last() else {
            // "./": the root directory itself.
            return match meta.kind {
                EntryKind::Dir => self.apply_root(&ctx, &meta, uid, gid),
                _ => Err(UnpackError::RootEntry {
                    layer: ctx.layer(),
                    path: ctx.path(),
                }),
            };
        };
        let name: &[u8] = name;

        if let Some(target) = name.strip_prefix(b".wh.") {
            layer.stats.whiteouts += 1;
            if matches!(meta.kind, EntryKind::File) {
                // A whiteout's body (normally empty) is not content.
                skip_body(&ctx, rx)?;
            }
            return self.whiteout(layer, &ctx, parents, target);
        }

        let parent = self
            .resolve_parent(&ctx, Some(&mut *layer), parents, true)?
            .ok_or_else(|| ctx.io("resolve parent", Errno::NOENT))?;
        layer.touch(parent.ino, name);
        match meta.kind {
            EntryKind::Dir => {
                let member = join(&comps);
                self.make_dir(&ctx, &parent, name, member, &meta, uid, gid)
            }
            EntryKind::File => self.make_file(&ctx, &parent, name, &meta, uid, gid, rx),
            EntryKind::Symlink(ref target) => {
                self.make_symlink(&ctx, &parent, name, target, &meta, uid, gid)
            }
            EntryKind::Hardlink(ref target) => self.make_hardlink(&ctx, &parent, name, target),
            EntryKind::Node(node) => self.make_node(&ctx, &parent, name, node, &meta, uid, gid),
        }
    }

    // ---- path resolution -------------------------------------------------

    /// Resolves (and with `create`, makes) the directory `comps` names.
    /// Returns `None` only when `create` is false and it does not exist.
    fn resolve_parent(
        &mut self,
        ctx: &Ctx<'_>,
        mut layer: Option<&mut Layer<'_>>,
        comps: &[&[u8]],
        create: bool,
    ) -> Result<Option<Parent>, UnpackError> {
        let not_dir = || UnpackError::NotADirectory {
            layer: ctx.layer(),
            path: ctx.path(),
        };
        let mut cur = rfs::openat(
            &self.root,
            ".",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ctx.io("open staging root", e))?;
        let mut cur_ino = self.root_ino;
        for (i, comp) in comps.iter().enumerate() {
            let comp: &[u8] = comp;
            let step = rfs::openat2(
                &cur,
                os(comp),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::BENEATH
                    | ResolveFlags::NO_SYMLINKS
                    | ResolveFlags::NO_MAGICLINKS
                    | ResolveFlags::NO_XDEV,
            );
            let next = match step {
                Ok(fd) => fd,
                Err(Errno::LOOP) => {
                    // A symlink: resolve the whole prefix as if the root were "/".
                    let prefix = join(&comps[..=i]);
                    match rfs::openat2(
                        &self.root,
                        os(&prefix),
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV,
                    ) {
                        Ok(fd) => fd,
                        Err(Errno::NOENT) if !create => return Ok(None),
                        // Dangling symlink or one pointing at a non-directory.
                        Err(Errno::NOENT) | Err(Errno::NOTDIR) => return Err(not_dir()),
                        Err(Errno::LOOP) => {
                            return Err(UnpackError::SymlinkLoop {
                                layer: ctx.layer(),
                                path: ctx.path(),
                            })
                        }
                        Err(e) => return Err(ctx.io("resolve symlinked parent", e)),
                    }
                }
                Err(Errno::NOENT) if !create => return Ok(None),
                Err(Errno::NOENT) => {
                    rfs::mkdirat(&cur, os(comp), Mode::from_raw_mode(0o755))
                        .map_err(|e| ctx.io("create parent directory", e))?;
                    let fd = rfs::openat2(
                        &cur,
                        os(comp),
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
                    )
                    .map_err(|e| ctx.io("open created parent", e))?;
                    let st = rfs::fstat(&fd).map_err(|e| ctx.io("stat created parent", e))?;
                    self.fresh_inode(st.st_ino);
                    self.implicit_dir_metadata(ctx, &cur, comp, st.st_ino)?;
                    fd
                }
                Err(Errno::NOTDIR) => return Err(not_dir()),
                Err(e) => return Err(ctx.io("resolve parent", e)),
            };
            if let Some(layer) = layer.as_deref_mut() {
                layer.touch(cur_ino, comp);
            }
            cur_ino = rfs::fstat(&next)
                .map_err(|e| ctx.io("stat parent", e))?
                .st_ino;
            cur = next;
        }
        Ok(Some(Parent {
            fd: cur,
            ino: cur_ino,
        }))
    }

    /// A directory the layer implies but does not declare: 0755 root:root.
    fn implicit_dir_metadata(
        &mut self,
        ctx: &Ctx<'_>,
        parent: &OwnedFd,
        name: &[u8],
        ino: u64,
    ) -> Result<(), UnpackError> {
        // mkdirat applied the umask; say exactly what we mean.
        let fd = open_dir_rw(parent, name).map_err(|e| ctx.io("open created parent", e))?;
        rfs::fchmod(&fd, Mode::from_raw_mode(0o755)).map_err(|e| ctx.io("chmod", e))?;
        if self.defer_ownership {
            if (self.euid, self.egid) != (0, 0) {
                self.deferred_mut(ino).owner = Some((0, 0));
            }
        } else {
            rfs::fchown(&fd, Some(rfs::Uid::ROOT), Some(rfs::Gid::ROOT))
                .map_err(|e| ctx.io("chown", e))?;
        }
        Ok(())
    }

    // ---- whiteouts ---------------------------------------------------------

    fn whiteout(
        &mut self,
        layer: &mut Layer<'_>,
        ctx: &Ctx<'_>,
        parents: &[&[u8]],
        target: &[u8],
    ) -> Result<(), UnpackError> {
        if target == b".wh..opq" {
            // Opaque directory: created if missing (it is part of this layer).
            let dir = self
                .resolve_parent(ctx, Some(&mut *layer), parents, true)?
                .ok_or_else(|| ctx.io("resolve opaque directory", Errno::NOENT))?;
            return self.clear_opaque(layer, ctx, &dir.fd, dir.ino, 0);
        }
        if target.starts_with(b".wh.") {
            // AUFS bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not image content.
            tracing::debug!(layer = %ctx.layer, path = %ctx.path, "ignoring AUFS metadata");
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(UnpackError::BadWhiteout {
                layer: ctx.layer(),
                path: ctx.path(),
            });
        }
        let Some(parent) = self.resolve_parent(ctx, None, parents, false)? else {
            return Ok(());
        };
        if layer.touched(parent.ino, target) {
            // Whiteouts only hide lower layers.
            return Ok(());
        }
        self.remove_any(ctx, &parent.fd, target, 0)
    }

    /// Removes every entry under `dir` that this layer did not create,
    /// recursing into directories it did.
    fn clear_opaque(
        &mut self,
        layer: &Layer<'_>,
        ctx: &Ctx<'_>,
        dir: &OwnedFd,
        dir_ino: u64,
        depth: usize,
    ) -> Result<(), UnpackError> {
        if depth > MAX_TREE_DEPTH {
            return Err(UnpackError::TreeTooDeep {
                layer: ctx.layer(),
                path: ctx.path(),
            });
        }
        let rd = rfs::openat(
            dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ctx.io("open opaque directory", e))?;
        for name in list_dir(&rd).map_err(|e| ctx.io("list opaque directory", e))? {
            let name = name.as_bytes();
            if !layer.touched(dir_ino, name) {
                self.remove_any(ctx, &rd, name, depth)?;
                continue;
            }
            let st = rfs::statat(&rd, os(name), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| ctx.io("stat", e))?;
            if is_dir(st.st_mode) {
                let sub = rfs::openat(
                    &rd,
                    os(name),
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| ctx.io("open directory", e))?;
                self.clear_opaque(layer, ctx, &sub, st.st_ino, depth + 1)?;
            }
        }
        Ok(())
    }

    /// Removes whatever `name` is in `dir` (a directory recursively), never
    /// following symlinks. A missing entry is not an error.
    fn remove_any(
        &mut self,
        ctx: &Ctx<'_>,
        dir: &impl AsFd,
        name: &[u8],
        depth: usize,
    ) -> Result<(), UnpackError> {
        let st = match rfs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(ctx.io("stat", e)),
        };
        if !is_dir(st.st_mode) {
            return rfs::unlinkat(dir, os(name), AtFlags::empty()).map_err(|e| ctx.io("unlink", e));
        }
        if depth > MAX_TREE_DEPTH {
            return Err(UnpackError::TreeTooDeep {
                layer: ctx.layer(),
                path: ctx.path(),
            });
        }
        let sub = open_dir_rw(dir, name).map_err(|e| ctx.io("open directory", e))?;
        for child in list_dir(&sub).map_err(|e| ctx.io("list directory", e))? {
            self.remove_any(ctx, &sub, child.as_bytes(), depth + 1)?;
        }
        drop(sub);
        rfs::unlinkat(dir, os(name), AtFlags::REMOVEDIR).map_err(|e| ctx.io("rmdir", e))
    }

    /// Makes room for a new entry at `name`: removes what is there, except a
    /// directory when `keep_dir`. Returns the inode of a kept directory.
    fn clear_slot(
        &mut self,
        ctx: &Ctx<'_>,
        parent: &Parent,
        name: &[u8],
        keep_dir: bool,
    ) -> Result<Option<u64>, UnpackError> {
        match rfs::statat(&parent.fd, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(ctx.io("stat", e)),
            Ok(st) if keep_dir && is_dir(st.st_mode) => Ok(Some(st.st_ino)),
            Ok(_) => {
                self.remove_any(ctx, &parent.fd, name, 0)?;
                Ok(None)
            }
        }
    }

    // ---- entry kinds ------------------------------------------------------

    fn apply_root(
        &mut self,
        ctx: &Ctx<'_>,
        meta: &EntryMeta,
        uid: u32,
        gid: u32,
    ) -> Result<(), UnpackError> {
        let fd = rfs::openat(
            &self.root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ctx.io("open staging root", e))?;
        let ino = self.root_ino;
        self.set_owner_fd(ctx, &fd, ino, uid, gid)?;
        self.set_mode_fd(ctx, &fd, ino, meta.mode, true)?;
        self.set_xattrs(ctx, XattrTarget::Fd(&fd), ino, &meta.xattrs, false)?;
        self.dir_times.insert(
            ino,
            DirTime {
                comps: Vec::new(),
                mtime: meta.mtime,
            },
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn make_dir(
        &mut self,
        ctx: &Ctx<'_>,
        parent: &Parent,
        name: &[u8],
        member: Vec<u8>,
        meta: &EntryMeta,
        uid: u32,
        gid: u32,
    ) -> Result<(), UnpackError> {
        let kept = self.clear_slot(ctx, parent, name, true)?;
        if kept.is_none() {
            rfs::mkdirat(&parent.fd, os(name), Mode::from_raw_mode(0o700))
                .map_err(|e| ctx.io("mkdir", e))?;
        }
        let fd = open_dir_rw(&parent.fd, name).map_err(|e| ctx.io("open directory", e))?;
        let ino = rfs::fstat(&fd).map_err(|e| ctx.io("stat", e))?.st_ino;
        if kept.is_none() {
            self.fresh_inode(ino);
        }
        self.set_owner_fd(ctx, &fd, ino, uid, gid)?;
        self.set_mode_fd(ctx, &fd, ino, meta.mode, true)?;
        self.set_xattrs(ctx, XattrTarget::Fd(&fd), ino, &meta.xattrs, false)?;
        self.dir_times.insert(
            ino,
            DirTime {
                comps: member,
                mtime: meta.mtime,
            },
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn make_file(
        &mut self,
        ctx: &Ctx<'_>,
        parent: &Parent,
        name: &[u8],
        meta: &EntryMeta,
        uid: u32,
        gid: u32,
        rx: &mut mpsc::Receiver<Msg>,
    ) -> Result<(), UnpackError> {
        self.clear_slot(ctx, parent, name, false)?;
        let fd = rfs::openat(
            &parent.fd,
            os(name),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| ctx.io("create file", e))?;
        let ino = rfs::fstat(&fd).map_err(|e| ctx.io("stat", e))?.st_ino;
        self.fresh_inode(ino);
        let mut file = std::fs::File::from(fd);
        loop {
            match rx.blocking_recv() {
                Some(Msg::Data(chunk)) => {
                    self.charge(ctx, chunk.len() as u64)?;
                    file.write_all(&chunk).map_err(|e| ctx.io("write", e))?;
                }
                Some(Msg::EndOfEntry) => break,
                Some(_) | None => return Err(UnpackError::Aborted { layer: ctx.layer() }),
            }
        }
        let fd = OwnedFd::from(file);
        self.set_owner_fd(ctx, &fd, ino, uid, gid)?;
        self.set_mode_fd(ctx, &fd, ino, meta.mode, false)?;
        self.set_xattrs(ctx, XattrTarget::Fd(&fd), ino, &meta.xattrs, false)?;
        rfs::futimens(&fd, &times(meta.mtime)).map_err(|e| ctx.io("set mtime", e))?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn make_symlink(
        &mut self,
        ctx: &Ctx<'_>,
        parent: &Parent,
        name: &[u8],
        target: &[u8],
        meta: &EntryMeta,
        uid: u32,
        gid: u32,
    ) -> Result<(), UnpackError> {
        if target.is_empty() {
            return Err(UnpackError::UnsupportedEntry {
                layer: ctx.layer(),
                path: ctx.path(),
                what: "symlink with an empty target",
            });
        }
        self.clear_slot(ctx, parent, name, false)?;
        self.charge(ctx, target.len() as u64)?;
        // The target is stored verbatim: it is data, and nothing here ever
        // resolves it outside RESOLVE_IN_ROOT.
        rfs::symlinkat(os(target), &parent.fd, os(name)).map_err(|e| ctx.io("symlink", e))?;
        let ino = rfs::statat(&parent.fd, os(name), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| ctx.io("stat", e))?
            .st_ino;
        self.fresh_inode(ino);
        if self.defer_ownership {
            self.defer_owner(ino, uid, gid);
        } else {
            rfs::chownat(
                &parent.fd,
                os(name),
                Some(rfs::Uid::from_raw(uid)),
                Some(rfs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| ctx.io("chown", e))?;
        }
        self.set_xattrs(
            ctx,
            XattrTarget::Link(parent.fd.as_fd(), name),
            ino,
            &meta.xattrs,
            false,
        )?;
        rfs::utimensat(
            &parent.fd,
            os(name),
            &times(meta.mtime),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| ctx.io("set mtime", e))?;
        Ok(())
    }

    fn make_hardlink(
        &mut self,
        ctx: &Ctx<'_>,
        parent: &Parent,
        name: &[u8],
        target: &[u8],
    ) -> Result<(), UnpackError> {
        let escapes = || UnpackError::LinkTargetEscapes {
            layer: ctx.layer(),
            path: ctx.path(),
            target: path::display(target),
        };
        let comps = path::components(target).map_err(|v| match v {
            NameViolation::Absolute | NameViolation::DotDot => escapes(),
            NameViolation::Empty => UnpackError::LinkTarget {
                layer: ctx.layer(),
                path: ctx.path(),
                target: String::new(),
                source: io::Error::from(io::ErrorKind::NotFound),
            },
        })?;
        let link_err = |source: io::Error| UnpackError::LinkTarget {
            layer: ctx.layer(),
            path: ctx.path(),
            target: path::display(target),
            source,
        };
        let Some((tname, tparents)) = comps.split_last() else {
            return Err(link_err(io::Error::from(io::ErrorKind::IsADirectory)));
        };
        // A hardlink names an earlier member: no symlinks anywhere on the way.
        let tparent = if tparents.is_empty() {
            rfs::openat(
                &self.root,
                ".",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
        } else {
            rfs::openat2(
                &self.root,
                os(&join(tparents)),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV,
            )
        };
        let tparent = match tparent {
            Ok(fd) => fd,
            Err(Errno::LOOP) => {
                return Err(UnpackError::LinkThroughSymlink {
                    layer: ctx.layer(),
                    path: ctx.path(),
                    target: path::display(target),
                })
            }
            Err(e) => return Err(link_err(e.into())),
        };
        let tst = rfs::statat(&tparent, os(tname), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| link_err(e.into()))?;
        if is_dir(tst.st_mode) {
            return Err(link_err(io::Error::from(io::ErrorKind::IsADirectory)));
        }
        if let Ok(existing) = rfs::statat(&parent.fd, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            if existing.st_ino == tst.st_ino && existing.st_dev == tst.st_dev {
                return Ok(()); // already this link
            }
        }
        self.clear_slot(ctx, parent, name, false)?;
        rfs::linkat(&tparent, os(tname), &parent.fd, os(name), AtFlags::empty())
            .map_err(|e| link_err(e.into()))
    }

    #[allow(clippy::too_many_arguments)]
    fn make_node(
        &mut self,
        ctx: &Ctx<'_>,
        parent: &Parent,
        name: &[u8],
        node: DeviceNode,
        meta: &EntryMeta,
        uid: u32,
        gid: u32,
    ) -> Result<(), UnpackError> {
        self.clear_slot(ctx, parent, name, false)?;
        // Never a device or FIFO on the host: an inert placeholder file that
        // debugfs replaces inside the image.
        let fd = rfs::openat(
            &parent.fd,
            os(name),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| ctx.io("create placeholder", e))?;
        let ino = rfs::fstat(&fd).map_err(|e| ctx.io("stat", e))?.st_ino;
        self.fresh_inode(ino);
        rfs::futimens(&fd, &times(meta.mtime)).map_err(|e| ctx.io("set mtime", e))?;
        let d = self.deferred_mut(ino);
        d.node = Some(node);
        d.perm = Some(meta.mode & 0o7777);
        d.owner = Some((uid, gid));
        d.mtime = Some(meta.mtime.tv_sec);
        self.set_xattrs(ctx, XattrTarget::Fd(&fd), ino, &meta.xattrs, true)?;
        Ok(())
    }

    // ---- metadata ------------------------------------------------------------

    fn charge(&mut self, ctx: &Ctx<'_>, bytes: u64) -> Result<(), UnpackError> {
        let next = self.bytes_written.saturating_add(bytes);
        if next > self.limits.max_image_bytes {
            return Err(UnpackError::ImageTooLarge {
                layer: ctx.layer(),
                path: ctx.path(),
                limit: self.limits.max_image_bytes,
            });
        }
        self.bytes_written = next;
        Ok(())
    }

    fn defer_owner(&mut self, ino: u64, uid: u32, gid: u32) {
        if (uid, gid) == (self.euid, self.egid) {
            if let Some(d) = self.deferred.get_mut(&ino) {
                d.owner = None;
            }
        } else {
            self.deferred_mut(ino).owner = Some((uid, gid));
        }
    }

    fn set_owner_fd(
        &mut self,
        ctx: &Ctx<'_>,
        fd: &OwnedFd,
        ino: u64,
        uid: u32,
        gid: u32,
    ) -> Result<(), UnpackError> {
        if self.defer_ownership {
            self.defer_owner(ino, uid, gid);
            return Ok(());
        }
        rfs::fchown(
            fd,
            Some(rfs::Uid::from_raw(uid)),
            Some(rfs::Gid::from_raw(gid)),
        )
        .map_err(|e| ctx.io("chown", e))
    }

    /// Sets the host mode: never setuid/setgid, and owner-writable when not
    /// root (so later layers and mkfs can still work with it). The mode the
    /// image should have is deferred when it differs.
    fn set_mode_fd(
        &mut self,
        ctx: &Ctx<'_>,
        fd: &OwnedFd,
        ino: u64,
        mode: u32,
        dir: bool,
    ) -> Result<(), UnpackError> {
        let perm = mode & 0o7777;
        let mut host = perm & !(S_ISUID | S_ISGID);
        if !self.privileged {
            host |= if dir { 0o700 } else { 0o600 };
        }
        rfs::fchmod(fd, Mode::from_raw_mode(host)).map_err(|e| ctx.io("chmod", e))?;
        if host != perm {
            self.deferred_mut(ino).perm = Some(perm);
        } else if let Some(d) = self.deferred.get_mut(&ino) {
            d.perm = None;
        }
        Ok(())
    }

    /// Applies xattrs on the host where allowed; everything else (and
    /// whatever the host refuses) is deferred to the image.
    fn set_xattrs(
        &mut self,
        ctx: &Ctx<'_>,
        target: XattrTarget<'_>,
        ino: u64,
        xattrs: &[(String, Vec<u8>)],
        defer_all: bool,
    ) -> Result<(), UnpackError> {
        for (name, value) in xattrs {
            if name.is_empty()
                || name.len() > 255
                || name.bytes().any(|b| b == 0 || b == b'\n' || b == b'\r')
            {
                return Err(UnpackError::InvalidXattr {
                    layer: ctx.layer(),
                    path: ctx.path(),
                    name: name.clone(),
                });
            }
            let host_allowed = !defer_all
                && name != "security.capability"
                && ["user.", "trusted.", "security."]
                    .iter()
                    .any(|ns| name.starts_with(ns));
            if host_allowed {
                let res = match target {
                    XattrTarget::Fd(fd) => {
                        rfs::fsetxattr(fd, name.as_str(), value, XattrFlags::empty())
                    }
                    XattrTarget::Link(dir, file) => {
                        let mut p = OsString::from(format!(
                            "/proc/self/fd/{}/",
                            std::os::fd::AsRawFd::as_raw_fd(&dir)
                        ))
                        .into_vec();
                        p.extend_from_slice(file);
                        rfs::lsetxattr(
                            PathBuf::from(OsString::from_vec(p)),
                            name.as_str(),
                            value,
                            XattrFlags::empty(),
                        )
                    }
                };
                match res {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::debug!(layer = %ctx.layer, path = %ctx.path, xattr = %name, error = %e, "host refused xattr; deferring it to the image");
                    }
                }
            }
            self.deferred_mut(ino).set_xattr(name, value);
        }
        Ok(())
    }

    /// Puts back directory mtimes that creating their children disturbed.
    fn restore_dir_times(&mut self, layer: &str) -> Result<(), UnpackError> {
        let mut stale = Vec::new();
        for (ino, dt) in &self.dir_times {
            let fd = if dt.comps.is_empty() {
                rfs::openat(
                    &self.root,
                    ".",
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
            } else {
                rfs::openat2(
                    &self.root,
                    os(&dt.comps),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV,
                )
            };
            let fd = match fd {
                Ok(fd) => fd,
                Err(_) => {
                    stale.push(*ino);
                    continue;
                }
            };
            match rfs::fstat(&fd) {
                Ok(st) if st.st_ino == *ino => {}
                _ => {
                    stale.push(*ino);
                    continue;
                }
            }
            rfs::futimens(&fd, &times(dt.mtime)).map_err(|e| UnpackError::Io {
                layer: layer.to_owned(),
                path: path::display(&dt.comps),
                op: "set directory mtime",
                source: e.into(),
            })?;
        }
        for ino in stale {
            self.dir_times.remove(&ino);
        }
        Ok(())
    }
}

/// Consumes a file body the tree does not store.
fn skip_body(ctx: &Ctx<'_>, rx: &mut mpsc::Receiver<Msg>) -> Result<(), UnpackError> {
    loop {
        match rx.blocking_recv() {
            Some(Msg::Data(_)) => {}
            Some(Msg::EndOfEntry) => return Ok(()),
            Some(_) | None => return Err(UnpackError::Aborted { layer: ctx.layer() }),
        }
    }
}

#[derive(Clone, Copy)]
enum XattrTarget<'a> {
    Fd(&'a OwnedFd),
    /// An entry (a symlink) named `.1` in directory `.0`.
    Link(BorrowedFd<'a>, &'a [u8]),
}

fn owner_id(ctx: &Ctx<'_>, id: u64) -> Result<u32, UnpackError> {
    // u32::MAX means "unchanged" to chown(2).
    match u32::try_from(id) {
        Ok(v) if v != u32::MAX => Ok(v),
        _ => Err(UnpackError::InvalidOwner {
            layer: ctx.layer(),
            path: ctx.path(),
            id,
        }),
    }
}

fn times(mtime: Timespec) -> Timestamps {
    Timestamps {
        last_access: mtime,
        last_modification: mtime,
    }
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    comps.join(&b'/')
}

fn open_dir_rw(dir: &impl AsFd, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    rfs::openat(
        dir,
        os(name),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn list_dir(fd: &OwnedFd) -> io::Result<Vec<OsString>> {
    let mut out = Vec::new();
    let dup = rfs::openat(
        fd,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for entry in Dir::new(dup)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(OsString::from_vec(name.to_vec()));
        }
    }
    Ok(out)
}
