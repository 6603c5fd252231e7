//! A check of the filesystem the benchmark works on.
//!
//! On ext4 without a journal, the kernel will not reuse an inode freed less
//! than 60 s ago, or 360 s while its inode table block is dirty, which it
//! is as soon as files are being created next to it (`recently_deleted()`
//! in `fs/ext4/ialloc.c`), and every new inode scans past all such inodes
//! of its block group again. After a tree of thousands of files was deleted
//! (by the benchmark, by banger at the end of each pull, by anything else on
//! the machine), creating the next tree nearby becomes quadratic: unpacking
//! slows down several times, by an amount that depends on where the
//! allocator lands and grows from one run to the next. The benchmark warns
//! when its temporary directory is on such a filesystem.

use std::path::Path;

/// What to tell the user when [`ext4_without_journal`] holds.
pub const NO_JOURNAL_WARNING: &str = "the temporary directory is on ext4 without a journal, \
where creating files soon after others were deleted is several times slower \
(see docs/benchmarks.md); timings will vary widely: run with TMPDIR on tmpfs \
(e.g. TMPDIR=/dev/shm) or on a journaled filesystem";

/// Whether `dir` is on an ext4 filesystem mounted without a journal.
pub fn ext4_without_journal(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let Some(("ext4", source)) = mount_of(&mountinfo, &dir) else {
        return false;
    };
    // The journal's statistics live in /proc/fs/jbd2/<device>-8, under the
    // kernel's name of the device (`dm-0` for `/dev/mapper/...`).
    let device = Path::new(source).canonicalize();
    match device.as_deref().ok().and_then(Path::file_name) {
        Some(name) => {
            let mut journal = name.to_os_string();
            journal.push("-8");
            !Path::new("/proc/fs/jbd2").join(journal).exists()
        }
        None => false,
    }
}

/// The filesystem type and source of the mount holding `path` (absolute,
/// canonical): the mount with the longest mount point above it, the last
/// one listed when several are mounted on the same point.
fn mount_of<'a>(mountinfo: &'a str, path: &Path) -> Option<(&'a str, &'a str)> {
    let mut best: Option<(usize, &str, &str)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(point) = fields.get(4).map(|p| unescape(p)) else {
            continue;
        };
        // After the optional fields, a `-`, then the type and the source.
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(fstype), Some(source)) = (fields.get(dash + 1), fields.get(dash + 2)) else {
            continue;
        };
        let depth = Path::new(&point).components().count();
        if path.starts_with(&point) && best.is_none_or(|(d, _, _)| depth >= d) {
            best = Some((depth, fstype, source));
        }
    }
    best.map(|(_, fstype, source)| (fstype, source))
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes.get(i + 1..i + 4).and_then(|oct| {
            std::str::from_utf8(oct)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 8).ok())
        });
        match (bytes[i], code) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
23 22 0:21 / /proc rw,nosuid - proc proc rw
24 22 0:22 / /tmp rw master:2 - tmpfs tmpfs rw
25 22 254:16 / /mnt/my\\040disk rw - xfs /dev/vdb rw
26 24 0:23 / /tmp/inner rw - ext4 /dev/vdc rw
27 22 0:24 / /tmp rw - ext4 /dev/vdd rw
";

    #[test]
    fn the_deepest_and_latest_mount_wins() {
        let at = |p: &str| mount_of(MOUNTINFO, Path::new(p));
        assert_eq!(at("/"), Some(("ext4", "/dev/vda")));
        assert_eq!(at("/home/user/x"), Some(("ext4", "/dev/vda")));
        assert_eq!(at("/proc/self"), Some(("proc", "proc")));
        // Mounted twice on /tmp: the later mount hides the earlier one.
        assert_eq!(at("/tmp/x"), Some(("ext4", "/dev/vdd")));
        assert_eq!(at("/tmp/inner/y"), Some(("ext4", "/dev/vdc")));
        // Whole components only, and escaped spaces.
        assert_eq!(at("/tmpfoo"), Some(("ext4", "/dev/vda")));
        assert_eq!(at("/mnt/my disk/z"), Some(("xfs", "/dev/vdb")));
        assert_eq!(mount_of("garbage\n", Path::new("/")), None);
    }

    #[test]
    fn octal_escapes_are_undone() {
        assert_eq!(unescape("/a\\040b\\011c"), "/a b\tc");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/trailing\\"), "/trailing\\");
        assert_eq!(unescape("/bad\\9zz"), "/bad\\9zz");
    }

    #[test]
    fn the_check_does_not_fail_on_this_machine() {
        // Either answer is fine; it must not panic on a real system.
        let _ = ext4_without_journal(&std::env::temp_dir());
        assert!(!ext4_without_journal(Path::new("/no/such/dir")));
    }
}
