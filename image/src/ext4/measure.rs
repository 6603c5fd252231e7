//! How much ext4 a directory tree needs, and how big an image must be to
//! hold it. Assumes what `mkfs.ext4 -T default` makes: 4 KiB blocks,
//! 256-byte inodes, one inode per 16 KiB, the journal sizes of
//! `ext2fs_default_journal_size`.

use std::collections::HashSet;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;
const BYTES_PER_INODE: u64 = 16384;
const MIB: u64 = 1 << 20;

/// What a tree holds, counted by walking it (symlinks are not followed,
/// hardlinked inodes are counted once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// Regular files (distinct inodes).
    pub files: u64,
    /// Directories, the root included.
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Anything else (placeholders are regular files; this is for trees
    /// not made by the unpacker).
    pub others: u64,
    /// Sum of apparent file sizes.
    pub apparent_bytes: u64,
    /// 4 KiB blocks for file data, directories and long symlinks.
    pub data_blocks: u64,
}

impl TreeUsage {
    /// Inodes the tree needs.
    pub fn inodes(&self) -> u64 {
        self.files + self.dirs + self.symlinks + self.others
    }

    /// Measured tree size: data blocks plus one inode per entry.
    pub fn tree_bytes(&self) -> u64 {
        self.data_blocks * BLOCK + self.inodes() * INODE_SIZE
    }
}

impl TreeUsage {
    fn add(&mut self, o: &TreeUsage) {
        self.files += o.files;
        self.dirs += o.dirs;
        self.symlinks += o.symlinks;
        self.others += o.others;
        self.apparent_bytes += o.apparent_bytes;
        self.data_blocks += o.data_blocks;
    }

    /// What one non-directory adds.
    fn of_entry(meta: &std::fs::Metadata) -> TreeUsage {
        let ft = meta.file_type();
        let mut u = TreeUsage::default();
        if ft.is_file() {
            u.files = 1;
            u.apparent_bytes = meta.len();
            let blocks = meta.len().div_ceil(BLOCK);
            // One extent block per 512 MiB beyond what fits in the inode.
            u.data_blocks = blocks + blocks / (128 * 1024);
        } else if ft.is_symlink() {
            u.symlinks = 1;
            // Targets of 60 bytes or more do not fit in the inode.
            if meta.len() >= 60 {
                u.data_blocks = 1;
            }
        } else {
            u.others = 1;
        }
        u
    }
}

/// What one walking thread counted.
#[derive(Default)]
struct Part {
    usage: TreeUsage,
    /// Inodes with more than one link, counted once when merged.
    linked: Vec<((u64, u64), TreeUsage)>,
}

/// Walks `root` and counts what it holds. Directories are counted by a
/// few threads (independent jobs), so a big tree is measured in a
/// fraction of the time one thread takes.
pub fn measure_tree(root: &Path) -> io::Result<TreeUsage> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    let parts = per_directory(root.to_path_buf(), workers, |dir, part: &mut Part| {
        let mut subdirs = Vec::new();
        part.usage.dirs += 1;
        // "." and ".." plus one record per entry, in blocks kept ~75% full.
        let mut dir_bytes: u64 = 24;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name_len = entry.file_name().as_bytes().len() as u64;
            dir_bytes += 8 + name_len.div_ceil(4) * 4;
            // The entry's own type (`d_type`) and metadata, relative to
            // the directory: no path lookups from the root per entry.
            if entry.file_type()?.is_dir() {
                subdirs.push(entry.path());
                continue;
            }
            let meta = entry.metadata()?;
            if meta.file_type().is_dir() {
                subdirs.push(entry.path());
                continue;
            }
            let u = TreeUsage::of_entry(&meta);
            if meta.nlink() > 1 {
                part.linked.push(((meta.dev(), meta.ino()), u));
            } else {
                part.usage.add(&u);
            }
        }
        part.usage.data_blocks += (dir_bytes * 4 / 3).div_ceil(BLOCK).max(1);
        Ok(subdirs)
    })?;
    let mut total = TreeUsage::default();
    let mut seen_links: HashSet<(u64, u64)> = HashSet::new();
    for part in parts {
        total.add(&part.usage);
        for (id, u) in part.linked {
            if seen_links.insert(id) {
                total.add(&u);
            }
        }
    }
    Ok(total)
}

/// Runs `job` on every directory from `root` down, on `workers` threads:
/// a job handles one directory and returns its subdirectories. Each
/// thread's results accumulate in a `T`; the first error stops the walk.
fn per_directory<T, F>(root: PathBuf, workers: usize, job: F) -> io::Result<Vec<T>>
where
    T: Default + Send,
    F: Fn(&Path, &mut T) -> io::Result<Vec<PathBuf>> + Sync,
{
    struct Queue {
        jobs: Vec<PathBuf>,
        pending: usize,
        error: Option<io::Error>,
    }
    let queue = Mutex::new(Queue {
        jobs: vec![root],
        pending: 1,
        error: None,
    });
    let wake = Condvar::new();
    let work = || {
        let mut acc = T::default();
        loop {
            let dir = {
                let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if q.error.is_some() || q.pending == 0 {
                        return acc;
                    }
                    if let Some(dir) = q.jobs.pop() {
                        break dir;
                    }
                    q = wake.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            let result = job(&dir, &mut acc);
            let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
            q.pending -= 1;
            match result {
                Ok(subdirs) => {
                    q.pending += subdirs.len();
                    q.jobs.extend(subdirs);
                }
                Err(e) => {
                    if q.error.is_none() {
                        q.error = Some(e);
                    }
                }
            }
            drop(q);
            wake.notify_all();
        }
    };
    let parts = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..workers.max(1)).map(|_| scope.spawn(work)).collect();
        let mut parts = vec![Some(work())];
        for helper in helpers {
            parts.push(helper.join().ok());
        }
        parts
    });
    let q = queue.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = q.error {
        return Err(e);
    }
    if q.pending != 0 || parts.iter().any(Option::is_none) {
        return Err(io::Error::other("a thread measuring the tree failed"));
    }
    Ok(parts.into_iter().flatten().collect())
}

/// Journal blocks `mkfs.ext4` creates for a filesystem of `blocks` blocks.
fn journal_blocks(blocks: u64) -> u64 {
    match blocks {
        b if b < 2048 => 0,
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131072,
        _ => 262144,
    }
}

/// Inodes to ask for in an image of `size` bytes holding `usage`: the
/// default ratio, or a quarter more than the tree has when that is more.
pub(crate) fn inodes_for(size: u64, usage: &TreeUsage) -> u64 {
    (size / BYTES_PER_INODE).max(usage.inodes() + usage.inodes() / 4 + 64)
}

/// Filesystem metadata in an image of `size` bytes with `inodes` inodes:
/// journal, inode tables, and 0.4% + 2 MiB for bitmaps, group
/// descriptors, their reserve and superblock backups (measured: under
/// 0.3% from 8 MiB to 64 GiB).
fn overhead(size: u64, inodes: u64) -> u64 {
    journal_blocks(size / BLOCK) * BLOCK + inodes * INODE_SIZE + size / 256 + 2 * MIB
}

fn round_up_mib(bytes: u64) -> u64 {
    bytes.div_ceil(MIB) * MIB
}

/// Smallest image size (whole MiB) this estimate expects `usage` to fit.
pub fn required_size(usage: &TreeUsage) -> u64 {
    let data = usage.data_blocks * BLOCK;
    let mut size = round_up_mib(data + 4 * MIB);
    // The overhead grows with the size; a few rounds reach the fixpoint.
    for _ in 0..16 {
        let need = round_up_mib(data + overhead(size, inodes_for(size, usage)));
        if need <= size {
            break;
        }
        size = need;
    }
    size.max(8 * MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_are_counted_once_per_inode_across_threads() {
        let tmp = std::env::temp_dir().join(format!("banger-measure-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        for d in ["a/b", "c"] {
            std::fs::create_dir_all(tmp.join(d)).expect("mkdir");
        }
        std::fs::write(tmp.join("a/f1"), vec![7u8; 5000]).expect("write");
        std::fs::write(tmp.join("a/b/f2"), b"").expect("write");
        std::fs::hard_link(tmp.join("a/f1"), tmp.join("c/h1")).expect("link");
        std::fs::hard_link(tmp.join("a/f1"), tmp.join("a/b/h2")).expect("link");
        std::os::unix::fs::symlink("f1", tmp.join("a/s")).expect("symlink");
        std::os::unix::fs::symlink("x".repeat(70), tmp.join("c/l")).expect("symlink");
        let got = measure_tree(&tmp);
        let _ = std::fs::remove_dir_all(&tmp);
        assert_eq!(
            got.expect("measure"),
            TreeUsage {
                files: 2,
                dirs: 4,
                symlinks: 2,
                others: 0,
                apparent_bytes: 5000,
                // f1's two blocks, the long symlink, one per directory.
                data_blocks: 2 + 1 + 4,
            }
        );
    }

    #[test]
    fn journal_table_matches_mkfs() {
        // Measured with e2fsprogs 1.47.0 (`dumpe2fs -h`).
        assert_eq!(journal_blocks(4096), 1024); // 16 MiB
        assert_eq!(journal_blocks(262_144), 8192); // 1 GiB
        assert_eq!(journal_blocks(2_097_152), 16384); // 8 GiB
        assert_eq!(journal_blocks(16_777_216), 131_072); // 64 GiB
    }

    #[test]
    fn required_size_covers_data_and_metadata() {
        let u = TreeUsage {
            files: 10,
            dirs: 2,
            data_blocks: 25_600, // 100 MiB
            ..TreeUsage::default()
        };
        let need = required_size(&u);
        assert!(need > 100 * MIB + 4 * MIB, "{need}");
        assert!(need < 140 * MIB, "{need}");
        assert_eq!(need % MIB, 0);
    }

    #[test]
    fn many_small_files_need_inodes() {
        let u = TreeUsage {
            files: 1_000_000,
            dirs: 1,
            data_blocks: 0,
            ..TreeUsage::default()
        };
        // A million empty files: the inode table alone is ~300 MiB.
        assert!(required_size(&u) > 300 * MIB);
        assert!(inodes_for(required_size(&u), &u) >= 1_000_000);
    }
}
