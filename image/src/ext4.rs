//! ext4 root filesystem images from a directory tree.
//!
//! This module owns turning a staged tree into an ext4 image file with
//! `mkfs.ext4 -d` (e2fsprogs; no root, no loop devices, no mounts) and then
//! applying the unpacker's deferred fixups inside the image with
//! `debugfs -w -f <script>`: device nodes and FIFOs (`mknod`), setuid /
//! setgid and other modes (`sif mode`), owners (`sif uid`/`gid`), and xattrs
//! the host refused (`ea_set`). The `ImageRegistry` actor calls
//! [`build_rootfs`] after [`crate::unpack`]; the work-seed path calls
//! [`build_from_dir`]. A warm pull calls [`build_rootfs_from`] on the tree
//! cache's tree (only read) with banger's injection as [`Edit`]s, which the
//! same debugfs run makes after the fixups, and [`build_from_dir_with`]
//! for its work seed.
//!
//! # API
//!
//! - [`default_size`]`(tree_bytes)`: `max(1.25 × tree, 1 GiB)` in whole MiB.
//! - [`build_rootfs`]`(tree, out, size)`: `mkfs.ext4 -F -q -T default
//!   [-N inodes] -d <root> -L rootfs <out>` on a sparse file of `size`
//!   bytes (default: [`default_size`] of the measured tree, or more when
//!   the metadata estimate needs it), then the debugfs fixups.
//! - [`build_from_dir`]`(dir, out, size, label)`: the same without fixups.
//! - [`measure_tree`] / [`required_size`]: the size estimate behind
//!   [`Ext4Error::TooSmall`], which is reported before running mkfs when
//!   the estimate says the tree cannot fit, and also when mkfs itself runs
//!   out of blocks or inodes.
//!
//! Failing tools' stderr is carried in the error. A failed build removes
//! the partial output file.

mod measure;
mod script;

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::process::Command;
use tracing::instrument;

pub use measure::{measure_tree, required_size, TreeUsage};

use crate::unpack::{Fixup, UnpackError, UnpackedTree};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The image size used when none is given: 1.25 × the tree, at least 1 GiB,
/// rounded up to a whole MiB.
pub fn default_size(tree_bytes: u64) -> u64 {
    let scaled = tree_bytes.saturating_add(tree_bytes.div_ceil(4));
    scaled.max(GIB).div_ceil(MIB).saturating_mul(MIB)
}

/// A change made inside a built image with `debugfs`, after `mkfs.ext4
/// -d` and the fixups: how banger's own files get into an image built
/// straight from a cached tree, which must not be changed (see
/// [`build_rootfs_from`]). Paths are absolute paths inside the image; every
/// directory on the way must be a real directory (not a symlink: debugfs
/// does not follow the last component of a parent path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// A new directory (its parent exists, nothing is at `path`).
    Mkdir {
        path: PathBuf,
        /// Permission bits.
        mode: u32,
        owner: (u32, u32),
    },
    /// A new regular file (nothing is at `path`: [`Edit::Remove`] first).
    Write {
        path: PathBuf,
        contents: Vec<u8>,
        /// Permission bits.
        mode: u32,
        owner: (u32, u32),
    },
    /// A new regular file with the contents of the host file `source`,
    /// which debugfs reads itself (no copy: the guest agent is tens of
    /// MB). Otherwise as [`Edit::Write`].
    WriteFrom {
        path: PathBuf,
        source: PathBuf,
        /// Permission bits.
        mode: u32,
        owner: (u32, u32),
    },
    /// A new symlink.
    Symlink {
        path: PathBuf,
        target: PathBuf,
        owner: (u32, u32),
    },
    /// Removes a non-directory (one link of it).
    Remove { path: PathBuf },
    /// Sets the full `st_mode` (type bits included).
    SetMode { path: PathBuf, mode: u32 },
    /// Sets the owner.
    SetOwner { path: PathBuf, owner: (u32, u32) },
}

impl Edit {
    /// The path the edit is about.
    pub fn path(&self) -> &Path {
        match self {
            Edit::Mkdir { path, .. }
            | Edit::Write { path, .. }
            | Edit::WriteFrom { path, .. }
            | Edit::Symlink { path, .. }
            | Edit::Remove { path }
            | Edit::SetMode { path, .. }
            | Edit::SetOwner { path, .. } => path,
        }
    }

    /// The same edit with `prefix` taken off its path (`None` when the
    /// path is not below `prefix`): for the work seed, an image of `/root`.
    pub fn rebased(&self, prefix: &Path) -> Option<Edit> {
        let rest = self.path().strip_prefix(prefix).ok()?;
        if rest.as_os_str().is_empty() {
            return None;
        }
        let path = Path::new("/").join(rest);
        let mut edit = self.clone();
        match &mut edit {
            Edit::Mkdir { path: p, .. }
            | Edit::Write { path: p, .. }
            | Edit::WriteFrom { path: p, .. }
            | Edit::Symlink { path: p, .. }
            | Edit::Remove { path: p }
            | Edit::SetMode { path: p, .. }
            | Edit::SetOwner { path: p, .. } => *p = path,
        }
        Some(edit)
    }

    /// What the edit adds to a tree's [`TreeUsage`] (removals are not
    /// subtracted: an estimate that errs on the large side).
    pub fn usage(&self) -> TreeUsage {
        let mut u = TreeUsage::default();
        match self {
            Edit::Mkdir { .. } => {
                u.dirs = 1;
                u.data_blocks = 1;
            }
            Edit::Write { contents, .. } => {
                u.files = 1;
                u.apparent_bytes = contents.len() as u64;
                u.data_blocks = (contents.len() as u64).div_ceil(4096);
            }
            Edit::WriteFrom { source, .. } => {
                let len = std::fs::metadata(source).map(|m| m.len()).unwrap_or(0);
                u.files = 1;
                u.apparent_bytes = len;
                u.data_blocks = len.div_ceil(4096);
            }
            Edit::Symlink { target, .. } => {
                u.symlinks = 1;
                u.data_blocks = u64::from(target.as_os_str().len() >= 60);
            }
            _ => {}
        }
        u
    }
}

/// What [`build_rootfs`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Stats {
    /// Image file size in bytes.
    pub size: u64,
    /// Measured tree size (see [`TreeUsage::tree_bytes`]).
    pub tree_bytes: u64,
    /// What the tree holds.
    pub usage: TreeUsage,
    /// Inodes requested from mkfs (`-N`), when the default was too few.
    pub inodes: Option<u64>,
    /// Fixups applied with debugfs.
    pub fixups: usize,
    /// Where the time went.
    pub timings: BuildTimings,
}

/// How long each step of [`build_rootfs`] took (wall time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildTimings {
    /// Walking the tree ([`measure_tree`]) and resolving its fixups.
    pub measure: std::time::Duration,
    /// `mkfs.ext4 -d`.
    pub mkfs: std::time::Duration,
    /// `debugfs` applying the fixups (zero when there are none).
    pub fixups: std::time::Duration,
}

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Ext4Error {
    /// `size` cannot hold the tree.
    #[error("image size {size} bytes is too small for a tree of {tree_bytes} bytes: {hint}")]
    TooSmall {
        size: u64,
        tree_bytes: u64,
        /// A size that should work, in bytes.
        needed: u64,
        /// Says what to do, and what mkfs said when it was mkfs that failed.
        hint: String,
    },
    /// An e2fsprogs tool is not installed.
    #[error("{tool} not found (apt-get install e2fsprogs)")]
    ToolMissing { tool: &'static str },
    /// mkfs.ext4 failed for another reason.
    #[error("mkfs.ext4 failed ({status}): {stderr}")]
    Mkfs { status: String, stderr: String },
    /// resize2fs failed.
    #[error("resize2fs failed ({status}): {stderr}")]
    Resize { status: String, stderr: String },
    /// debugfs failed or reported errors while applying fixups.
    #[error("debugfs failed applying fixups ({status}): {stderr}")]
    Debugfs { status: String, stderr: String },
    /// A fixup or edit path that cannot be written into a debugfs script.
    #[error("cannot script a fixup for {path:?} (newline in name or line too long)")]
    Unscriptable { path: PathBuf },
    /// ext4 labels are at most 16 bytes.
    #[error("ext4 label {label:?} is longer than 16 bytes")]
    Label { label: String },
    /// The tree comes from an unpack that failed or was interrupted.
    #[error("staging tree {root} is incomplete (a layer failed)")]
    IncompleteTree { root: PathBuf },
    /// Walking the tree or resolving fixups failed.
    #[error("reading the staging tree")]
    Tree(#[from] UnpackError),
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Ext4Error {
    let path = path.display().to_string();
    move |source| Ext4Error::Io { op, path, source }
}

/// Builds the root filesystem image `out` from an unpacked tree and applies
/// its deferred fixups. `size` defaults to [`default_size`] of the
/// measured tree (raised to [`required_size`] if that is larger).
#[instrument(skip_all, fields(root = %tree.root.display(), out = %out.display()))]
pub async fn build_rootfs(
    tree: &UnpackedTree,
    out: &Path,
    size: Option<u64>,
) -> Result<Ext4Stats, Ext4Error> {
    if !tree.complete {
        return Err(Ext4Error::IncompleteTree {
            root: tree.root.clone(),
        });
    }
    let root = tree.root.clone();
    let fixups_job = tree.fixups_job();
    let started = std::time::Instant::now();
    let (usage, fixups) = blocking(move || {
        let usage = measure_tree(&root).map_err(io_err("measuring", &root))?;
        let fixups = fixups_job()?;
        Ok((usage, fixups))
    })
    .await?;
    let measure = started.elapsed();
    let mut stats = build_rootfs_from(&tree.root, usage, &fixups, &[], out, size).await?;
    stats.timings.measure = measure;
    Ok(stats)
}

/// Builds an ext4 image of `size` bytes from `dir` (no fixups), e.g. the
/// work seed.
#[instrument(skip_all, fields(dir = %dir.display(), out = %out.display()))]
pub async fn build_from_dir(
    dir: &Path,
    out: &Path,
    size: u64,
    label: &str,
) -> Result<(), Ext4Error> {
    let root = dir.to_path_buf();
    let usage = blocking(move || measure_tree(&root).map_err(io_err("measuring", &root))).await?;
    make_fs(dir, out, size, label, &usage).await?;
    Ok(())
}

/// Builds the root filesystem image `out` straight from the tree at
/// `root`, which is only read (the tree cache's entry: no staging copy is
/// made), with `usage` measured beforehand (no walk here), then applies
/// `fixups` and after them `edits` in one `debugfs` run. `size` as for
/// [`build_rootfs`].
#[instrument(skip_all, fields(root = %root.display(), out = %out.display()))]
pub async fn build_rootfs_from(
    root: &Path,
    usage: TreeUsage,
    fixups: &[Fixup],
    edits: &[Edit],
    out: &Path,
    size: Option<u64>,
) -> Result<Ext4Stats, Ext4Error> {
    let started = std::time::Instant::now();
    let size = size.unwrap_or_else(|| default_size(usage.tree_bytes()).max(required_size(&usage)));
    let inodes = make_fs(root, out, size, "rootfs", &usage).await?;
    let made = std::time::Instant::now();
    if let Err(e) = apply_fixups(out, fixups, edits).await {
        let _ = tokio::fs::remove_file(out).await;
        return Err(e);
    }
    let timings = BuildTimings {
        measure: std::time::Duration::ZERO,
        mkfs: made - started,
        fixups: made.elapsed(),
    };
    tracing::info!(
        size,
        fixups = fixups.len(),
        edits = edits.len(),
        ?timings,
        "root filesystem built"
    );
    Ok(Ext4Stats {
        size,
        tree_bytes: usage.tree_bytes(),
        usage,
        inodes,
        fixups: fixups.len(),
        timings,
    })
}

/// [`build_from_dir`] followed by `edits` (no fixups): the work seed of an
/// image built from a cached tree. `dir` is only read.
#[instrument(skip_all, fields(dir = %dir.display(), out = %out.display()))]
pub async fn build_from_dir_with(
    dir: &Path,
    out: &Path,
    size: u64,
    label: &str,
    edits: &[Edit],
) -> Result<(), Ext4Error> {
    build_from_dir(dir, out, size, label).await?;
    if let Err(e) = apply_fixups(out, &[], edits).await {
        let _ = tokio::fs::remove_file(out).await;
        return Err(e);
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Ext4Error> + Send + 'static,
) -> Result<T, Ext4Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Ext4Error::Io {
            op: "joining blocking task for",
            path: String::new(),
            source: io::Error::other(e),
        })?
}

fn too_small(size: u64, usage: &TreeUsage, mkfs_stderr: Option<&str>) -> Ext4Error {
    let estimate = required_size(usage);
    // When mkfs ran out of room although the estimate said the tree fits,
    // the estimate was low: suggest a quarter more than what failed.
    let needed = match mkfs_stderr {
        Some(_) => estimate.max(size.saturating_add(size / 4).div_ceil(MIB) * MIB),
        None => estimate,
    };
    let mut hint = format!("use at least {needed} bytes ({} MiB)", needed / MIB);
    if let Some(stderr) = mkfs_stderr {
        hint.push_str("; mkfs.ext4 said: ");
        hint.push_str(stderr.trim());
    }
    Ext4Error::TooSmall {
        size,
        tree_bytes: usage.tree_bytes(),
        needed,
        hint,
    }
}

/// Checks the size, creates the sparse file and runs mkfs. Returns the
/// `-N` value when one was passed.
async fn make_fs(
    dir: &Path,
    out: &Path,
    size: u64,
    label: &str,
    usage: &TreeUsage,
) -> Result<Option<u64>, Ext4Error> {
    if label.len() > 16 {
        return Err(Ext4Error::Label {
            label: label.to_owned(),
        });
    }
    if size < required_size(usage) {
        return Err(too_small(size, usage, None));
    }
    let mkfs = tool("mkfs.ext4")?;
    {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(out)
            .await
            .map_err(io_err("creating", out))?;
        file.set_len(size).await.map_err(io_err("sizing", out))?;
    }
    let inodes = measure::inodes_for(size, usage);
    let default_inodes = size / 16384;
    let inodes = (inodes > default_inodes).then_some(inodes);
    let mut args: Vec<OsString> = ["-F", "-q", "-T", "default"]
        .iter()
        .map(OsString::from)
        .collect();
    if let Some(n) = inodes {
        args.push("-N".into());
        args.push(n.to_string().into());
    }
    args.push("-d".into());
    args.push(dir.into());
    args.push("-L".into());
    args.push(label.into());
    args.push(out.into());
    let output = run(&mkfs, &args).await?;
    if !output.status.success() {
        let _ = tokio::fs::remove_file(out).await;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if mkfs_out_of_space(&stderr) {
            return Err(too_small(size, usage, Some(&stderr)));
        }
        return Err(Ext4Error::Mkfs {
            status: output.status.to_string(),
            stderr,
        });
    }
    Ok(inodes)
}

/// Whether mkfs's stderr says the filesystem ran out of room.
fn mkfs_out_of_space(stderr: &str) -> bool {
    [
        "Could not allocate block",
        "Could not allocate inode",
        "No space left on device",
        "No free space in the directory",
        "too small",
    ]
    .iter()
    .any(|needle| stderr.contains(needle))
}

async fn apply_fixups(out: &Path, fixups: &[Fixup], edits: &[Edit]) -> Result<(), Ext4Error> {
    if fixups.is_empty() && edits.is_empty() {
        return Ok(());
    }
    let debugfs = tool("debugfs")?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".to_owned());
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let work = parent.join(format!(".{name}.fixups.{}.{seq}", std::process::id()));
    let _ = tokio::fs::remove_dir_all(&work).await;
    tokio::fs::create_dir(&work)
        .await
        .map_err(io_err("creating", &work))?;
    let result = run_debugfs(&debugfs, out, fixups, edits, &work).await;
    let _ = tokio::fs::remove_dir_all(&work).await;
    result
}

async fn run_debugfs(
    debugfs: &Path,
    out: &Path,
    fixups: &[Fixup],
    edits: &[Edit],
    work: &Path,
) -> Result<(), Ext4Error> {
    let values = work.join("values");
    tokio::fs::create_dir(&values)
        .await
        .map_err(io_err("creating", &values))?;
    let mut script =
        script::render(fixups, &values).map_err(|u| Ext4Error::Unscriptable { path: u.path })?;
    script::render_edits(&mut script, edits, &values)
        .map_err(|u| Ext4Error::Unscriptable { path: u.path })?;
    for (file, value) in &script.values {
        let p = values.join(file);
        tokio::fs::write(&p, value)
            .await
            .map_err(io_err("writing", &p))?;
    }
    let script_path = work.join("script");
    tokio::fs::write(&script_path, &script.text)
        .await
        .map_err(io_err("writing", &script_path))?;
    let args: Vec<OsString> = vec!["-w".into(), "-f".into(), script_path.into(), out.into()];
    let output = run(debugfs, &args).await?;
    // debugfs exits 0 even when commands fail; anything on stderr besides
    // its version banner is a failure.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !output.status.success() || !complaints.is_empty() {
        return Err(Ext4Error::Debugfs {
            status: output.status.to_string(),
            stderr: complaints.join("\n"),
        });
    }
    Ok(())
}

/// Grows the ext4 image at `path` to `size` bytes (file and filesystem);
/// never shrinks it.
pub async fn grow(path: &Path, size: u64) -> Result<(), Ext4Error> {
    let current = std::fs::metadata(path)
        .map_err(io_err("reading", path))?
        .len();
    if size <= current {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(size))
        .map_err(io_err("growing", path))?;
    let output = run(&tool("resize2fs")?, &[path.as_os_str().to_owned()]).await?;
    if !output.status.success() {
        return Err(Ext4Error::Resize {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

async fn run(program: &Path, args: &[OsString]) -> Result<Output, Ext4Error> {
    Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(io_err("running", program))
}

/// Finds an e2fsprogs tool in `PATH`, then in the sbin directories that
/// are often missing from a non-root `PATH`.
fn tool(name: &'static str) -> Result<PathBuf, Ext4Error> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(Ext4Error::ToolMissing { tool: name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_size_has_a_floor_and_rounds_to_mib() {
        assert_eq!(default_size(0), GIB);
        assert_eq!(default_size(100 * MIB), GIB);
        assert_eq!(default_size(2 * GIB), 2 * GIB + GIB / 2);
        let odd = default_size(3 * GIB + 1);
        assert_eq!(odd % MIB, 0);
        assert!(odd >= (3 * GIB + 1) + (3 * GIB + 1) / 4);
    }

    #[test]
    fn mkfs_space_messages_are_recognised() {
        assert!(mkfs_out_of_space(
            "mkfs.ext4: Could not allocate block in ext2 filesystem while populating file system"
        ));
        assert!(mkfs_out_of_space(
            "__populate_fs: Could not allocate inode in ext2 filesystem while writing file \"f1910\""
        ));
        assert!(!mkfs_out_of_space("mkfs.ext4: invalid block size - 3"));
    }
}
