//! Finding banger's work disk: the block device whose ext4 label is
//! `banger-work`, read straight from the superblock (no blkid, no udev in
//! init mode).
//!
//! The superblock starts at byte 1024; its magic `0xEF53` is the
//! little-endian `u16` at offset 56 and the volume label the 16 bytes at
//! offset 120 (NUL-padded).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Label banger gives the work disk.
pub const WORK_LABEL: &str = "banger-work";

const SUPERBLOCK_OFFSET: u64 = 1024;
const MAGIC_OFFSET: usize = 56;
const LABEL_OFFSET: usize = 120;
const LABEL_LEN: usize = 16;
const EXT_MAGIC: u16 = 0xEF53;

/// The label of the ext2/3/4 file system in `dev`, `Ok(None)` when it is
/// not one (or is too short to hold a superblock).
pub fn read_label(dev: &Path) -> io::Result<Option<String>> {
    let mut f = File::open(dev)?;
    f.seek(SeekFrom::Start(SUPERBLOCK_OFFSET))?;
    let mut sb = [0u8; LABEL_OFFSET + LABEL_LEN];
    match f.read_exact(&mut sb) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    Ok(label_from_superblock(&sb))
}

/// Parses the label out of the first bytes of a superblock.
pub fn label_from_superblock(sb: &[u8]) -> Option<String> {
    let magic = sb.get(MAGIC_OFFSET..MAGIC_OFFSET + 2)?;
    if u16::from_le_bytes([magic[0], magic[1]]) != EXT_MAGIC {
        return None;
    }
    let raw = sb.get(LABEL_OFFSET..LABEL_OFFSET + LABEL_LEN)?;
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    Some(String::from_utf8_lossy(&raw[..end]).into_owned())
}

/// The first block device listed in `sys_block` (`/sys/class/block`) whose
/// node in `dev_dir` (`/dev`) carries `label`.
pub fn find_by_label(label: &str, sys_block: &Path, dev_dir: &Path) -> Option<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(sys_block)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        // Loop, RAM and optical devices are never banger's work disk.
        .filter(|n| !n.starts_with("loop") && !n.starts_with("ram") && !n.starts_with("sr"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| dev_dir.join(n))
        .find(|dev| matches!(read_label(dev), Ok(Some(l)) if l == label))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn mkfs(path: &Path, label: &str) {
        // CI's PATH may lack the sbin directories.
        let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("mkfs.ext4");
        let status = Command::new(mkfs)
            .args(["-q", "-L", label, "-F"])
            .arg(path)
            .arg("8M")
            .status()
            .expect("run mkfs.ext4 (e2fsprogs)");
        assert!(status.success(), "mkfs.ext4 failed: {status}");
    }

    #[test]
    fn reads_the_label_mkfs_wrote() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("work.ext4");
        mkfs(&img, WORK_LABEL);
        assert_eq!(
            read_label(&img).expect("read"),
            Some(WORK_LABEL.to_string())
        );

        let other = dir.path().join("other.ext4");
        mkfs(&other, "something-else");
        assert_eq!(
            read_label(&other).expect("read"),
            Some("something-else".into())
        );
    }

    #[test]
    fn non_ext4_and_short_files_have_no_label() {
        let dir = tempfile::tempdir().expect("tempdir");
        let zeros = dir.path().join("zeros");
        std::fs::write(&zeros, vec![0u8; 4096]).expect("write");
        assert_eq!(read_label(&zeros).expect("read"), None);
        let short = dir.path().join("short");
        std::fs::write(&short, b"tiny").expect("write");
        assert_eq!(read_label(&short).expect("read"), None);
    }

    #[test]
    fn label_of_full_sixteen_bytes_has_no_terminator() {
        let mut sb = vec![0u8; 200];
        sb[MAGIC_OFFSET..MAGIC_OFFSET + 2].copy_from_slice(&EXT_MAGIC.to_le_bytes());
        sb[LABEL_OFFSET..LABEL_OFFSET + 16].copy_from_slice(b"0123456789abcdef");
        assert_eq!(
            label_from_superblock(&sb).as_deref(),
            Some("0123456789abcdef")
        );
        sb[MAGIC_OFFSET] = 0;
        assert_eq!(label_from_superblock(&sb), None);
    }

    #[test]
    fn finds_the_device_by_label_in_a_fake_sysfs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sys = dir.path().join("sys");
        let dev = dir.path().join("dev");
        std::fs::create_dir_all(&sys).expect("mkdir");
        std::fs::create_dir_all(&dev).expect("mkdir");
        for name in ["vda", "vdb", "loop0"] {
            std::fs::create_dir(sys.join(name)).expect("mkdir");
        }
        mkfs(&dev.join("vda"), "root");
        mkfs(&dev.join("vdb"), WORK_LABEL);
        mkfs(&dev.join("loop0"), WORK_LABEL);
        assert_eq!(find_by_label(WORK_LABEL, &sys, &dev), Some(dev.join("vdb")));
        assert_eq!(find_by_label("nope", &sys, &dev), None);
    }
}
