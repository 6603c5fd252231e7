//! Per-VM disks, made on the host before the VMM starts:
//!
//! - the **root disk**: a qcow2 overlay over the image's shared ext4 under
//!   QEMU (instant, the image stays untouched), or a clone of it for
//!   backends that need a raw file;
//! - the **work disk** (`/root` in the guest): a clone of the image's work
//!   seed, grown to the requested size;
//! - the **modules disk**: the kernel's `/lib/modules/<release>` as a
//!   read-only ext4, built once per kernel and shared, so images without
//!   the kernel's modules (most OCI images) still get virtio drivers.
//!
//! Clones use a reflink (`FICLONE`) where the filesystem supports it and a
//! sparse copy (holes preserved through `SEEK_DATA`/`SEEK_HOLE`) otherwise.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use banger_protocol::{ErrorData, ErrorKind};
use tokio::process::Command;

/// Label of the modules disk's filesystem (the agent looks for it).
pub const MODULES_LABEL: &str = "banger-modules";

/// How a file was cloned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    Reflink,
    SparseCopy,
}

impl CloneMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CloneMethod::Reflink => "reflink",
            CloneMethod::SparseCopy => "sparse copy",
        }
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> ErrorData {
    move |e| {
        let kind = if e.raw_os_error() == Some(libc::ENOSPC) {
            ErrorKind::InvalidState
        } else {
            ErrorKind::Internal
        };
        let mut err = ErrorData::from_error(kind, &e).with_cause(what);
        if e.raw_os_error() == Some(libc::ENOSPC) {
            err = err.with_hint(
                "the disk holding banger's state is full: free space or delete VMs/images",
            );
        }
        err
    }
}

/// Clones `src` to `dst` (which must not exist): reflink, else sparse copy.
pub fn clone_file(src: &Path, dst: &Path) -> Result<CloneMethod, ErrorData> {
    let input = File::open(src).map_err(io_err(format!("opening {}", src.display())))?;
    let output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io_err(format!("creating {}", dst.display())))?;
    // SAFETY: FICLONE takes the source fd as its argument.
    let r = unsafe { libc::ioctl(output.as_raw_fd(), libc::FICLONE, input.as_raw_fd()) };
    if r == 0 {
        return Ok(CloneMethod::Reflink);
    }
    let result = sparse_copy(input, output);
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
        .map(|()| CloneMethod::SparseCopy)
        .map_err(io_err(format!(
            "copying {} to {}",
            src.display(),
            dst.display()
        )))
}

/// [`clone_file`] on a blocking thread.
pub async fn clone(src: &Path, dst: &Path) -> Result<CloneMethod, ErrorData> {
    let (src, dst) = (src.to_path_buf(), dst.to_path_buf());
    tokio::task::spawn_blocking(move || clone_file(&src, &dst))
        .await
        .map_err(|e| ErrorData::new(ErrorKind::Internal, e.to_string()))?
}

/// Size of the copy buffer of [`sparse_copy`].
const COPY_CHUNK: usize = 1 << 20;

thread_local! {
    /// The copy buffer of this (blocking-pool) thread, kept between
    /// copies: a fresh 1 MiB buffer per copy cost an mmap, 256 page
    /// faults and an munmap (or a 1 MiB memset), twice per create, which
    /// showed in profiles of parallel creates.
    static COPY_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn sparse_copy(input: File, output: File) -> std::io::Result<()> {
    COPY_BUF.with_borrow_mut(|buf| {
        buf.resize(COPY_CHUNK, 0);
        sparse_copy_with(input, output, buf)
    })
}

fn sparse_copy_with(mut input: File, mut output: File, buf: &mut [u8]) -> std::io::Result<()> {
    let len = input.metadata()?.len();
    output.set_len(len)?;
    let fd = input.as_raw_fd();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on our own fd.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(err);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        input.seek(SeekFrom::Start(data as u64))?;
        output.seek(SeekFrom::Start(data as u64))?;
        let mut remaining = (hole - data) as u64;
        while remaining > 0 {
            let n = remaining.min(buf.len() as u64) as usize;
            input.read_exact(&mut buf[..n])?;
            if buf[..n].iter().all(|b| *b == 0) {
                output.seek(SeekFrom::Current(n as i64))?;
            } else {
                output.write_all(&buf[..n])?;
            }
            remaining -= n as u64;
        }
        pos = hole;
    }
    // No fsync: a create interrupted by a host crash is undone at the next
    // start, and the first flush the guest's filesystem sends makes QEMU
    // (or Firecracker) fdatasync the whole file, copied blocks included.
    Ok(())
}

/// Grows the ext4 image at `path` to `size` bytes (never shrinks it).
pub async fn grow_ext4(path: &Path, size: u64) -> Result<(), ErrorData> {
    banger_image::ext4::grow(path, size).await.map_err(|e| {
        ErrorData::from_error(ErrorKind::Internal, &e)
            .with_cause(format!("growing {}", path.display()))
    })
}

async fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), ErrorData> {
    let out = Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|e| {
            ErrorData::from_error(ErrorKind::Internal, &e)
                .with_cause(format!("running {program}"))
                .with_hint(format!(
                    "install {program} (Debian: e2fsprogs / qemu-utils)"
                ))
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ErrorData::new(
            ErrorKind::Internal,
            format!(
                "{program} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    }
}

/// Whether `qemu-img` is available for copy-on-write root overlays.
pub fn have_qemu_img() -> bool {
    banger_vmm::process::find_binary("qemu-img").is_ok()
}

/// Creates a qcow2 overlay at `dst` whose backing file is the raw `base`.
pub async fn qcow2_overlay(base: &Path, dst: &Path) -> Result<(), ErrorData> {
    run(
        "qemu-img",
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
            dst.as_os_str(),
        ],
    )
    .await
}

/// The modules disk for a kernel whose modules tree is `modules`: built
/// next to it on first use (under a temporary name, renamed into place, so
/// concurrent first uses are safe).
pub async fn modules_disk(modules: &Path) -> Result<PathBuf, ErrorData> {
    let disk = modules.with_extension("ext4");
    if disk.exists() {
        return Ok(disk);
    }
    let tmp = modules.with_extension(format!("ext4.{}.tmp", crate::layout::new_id()));
    let bytes = crate::fsutil::tree_bytes(modules);
    let size = (bytes + bytes / 4 + (32 << 20)).div_ceil(1 << 20) << 20;
    let result = banger_image::ext4::build_from_dir(modules, &tmp, size, MODULES_LABEL).await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(ErrorData::new(
            ErrorKind::Internal,
            format!(
                "building the modules disk from {} failed: {e}",
                modules.display()
            ),
        ));
    }
    std::fs::rename(&tmp, &disk).map_err(io_err(format!("publishing {}", disk.display())))?;
    Ok(disk)
}

/// Where the per-image disk templates of a managed image live: a
/// `templates` directory in the image's own directory (removed with it).
/// `None` for an image outside managed storage, whose directory is the
/// user's: its disks are made from scratch for every VM.
pub fn templates_dir(rootfs: &Path, work_seed: Option<&Path>) -> Option<PathBuf> {
    let dir = rootfs.parent()?;
    (work_seed?.parent()? == dir).then(|| dir.join("templates"))
}

/// The template at `path`, made by `make` (given a temporary path in the
/// same directory) when missing and renamed into place, so concurrent
/// first uses are safe and a failed or interrupted one leaves nothing
/// that looks finished. Every VM's disk is then a clone of it: the same
/// work for every VM of an image is done once.
pub async fn template<F, Fut>(path: &Path, make: F) -> Result<PathBuf, ErrorData>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<(), ErrorData>>,
{
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", crate::layout::new_id()));
    let made = make(tmp.clone()).await;
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(format!("publishing {}", path.display()))(e)
    })?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_only_for_managed_images() {
        let managed = templates_dir(
            Path::new("/s/images/abc/rootfs.ext4"),
            Some(Path::new("/s/images/abc/work-seed.ext4")),
        );
        assert_eq!(managed, Some(PathBuf::from("/s/images/abc/templates")));
        // A registered image: no seed, or a rootfs elsewhere.
        assert_eq!(templates_dir(Path::new("/home/u/root.ext4"), None), None);
        assert_eq!(
            templates_dir(
                Path::new("/home/u/root.ext4"),
                Some(Path::new("/s/images/abc/work-seed.ext4"))
            ),
            None
        );
    }

    #[tokio::test]
    async fn a_template_is_made_once_and_a_failed_one_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("templates/t.img");
        let calls = std::sync::atomic::AtomicU32::new(0);
        let make = |tmp: PathBuf| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                std::fs::write(&tmp, b"made")
                    .map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))
            }
        };
        assert_eq!(template(&path, make).await.expect("template"), path);
        assert_eq!(template(&path, make).await.expect("template"), path);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(std::fs::read(&path).expect("read"), b"made");

        let failed = dir.path().join("templates/f.img");
        let err = template(&failed, |tmp: PathBuf| async move {
            std::fs::write(&tmp, b"half").expect("write");
            Err(ErrorData::new(ErrorKind::Internal, "disk full"))
        })
        .await
        .expect_err("a failed make is an error");
        assert!(err.message.contains("disk full"), "{err:?}");
        assert!(!failed.exists());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("templates"))
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("t.img")]);
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(10 << 20)).unwrap();
        f.write_all(b"hello").unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        let method = clone_file(&src, &dst).unwrap();
        let a = std::fs::read(&src).unwrap();
        let b = std::fs::read(&dst).unwrap();
        assert_eq!(a, b);
        if method == CloneMethod::SparseCopy {
            use std::os::unix::fs::MetadataExt;
            // 64 MiB apparent, only the written block allocated.
            assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 4 << 20);
        }
        // The destination must be new.
        assert!(clone_file(&src, &dst).is_err());
    }

    #[test]
    fn copies_on_one_thread_share_the_buffer_but_not_its_contents() {
        // The copy buffer is kept per thread: what the first copy left in
        // it must not leak into the second (a zero region in the middle
        // of data, the first file's bytes at the same offsets).
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first");
        std::fs::write(&first, vec![0xaa; (COPY_CHUNK * 2) + 4096]).unwrap();
        let mut second = vec![0x55; COPY_CHUNK * 2 + 4096];
        second[COPY_CHUNK..COPY_CHUNK + 4096].fill(0);
        second.truncate(COPY_CHUNK + 8192);
        let src = dir.path().join("second");
        std::fs::write(&src, &second).unwrap();
        for (from, to) in [(&first, "a"), (&src, "b")] {
            let dst = dir.path().join(to);
            clone_file(from, &dst).unwrap();
            assert!(
                std::fs::read(from).unwrap() == std::fs::read(&dst).unwrap(),
                "{to}"
            );
        }
    }

    #[tokio::test]
    async fn grow_resizes_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("work.ext4");
        let st = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "banger-work"])
            .arg(&img)
            .arg("16M")
            .status()
            .unwrap();
        assert!(st.success());
        grow_ext4(&img, 64 << 20).await.unwrap();
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 << 20);
        let out = std::process::Command::new("dumpe2fs")
            .arg("-h")
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let blocks: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("Block count:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let block_size: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("Block size:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(blocks * block_size, 64 << 20);
    }
}
