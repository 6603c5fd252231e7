//! Small filesystem helpers shared by the registries.

use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

/// Copies a directory tree: regular files (contents and permission
/// bits), directories and symlinks (as symlinks, targets untouched).
/// Other file types are skipped. Returns the bytes copied.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<u64> {
    let meta = std::fs::symlink_metadata(src)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", src.display()),
        ));
    }
    std::fs::create_dir_all(dst)?;
    std::fs::set_permissions(
        dst,
        std::fs::Permissions::from_mode(meta.permissions().mode() & 0o7777),
    )?;
    let mut bytes = 0;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let ft = entry.file_type()?;
        if ft.is_symlink() {
            symlink(std::fs::read_link(&from)?, &to)?;
        } else if ft.is_dir() {
            bytes += copy_tree(&from, &to)?;
        } else if ft.is_file() {
            bytes += std::fs::copy(&from, &to)?;
        }
    }
    Ok(bytes)
}

/// Total apparent size of the regular files under `path` (or of the file).
pub fn tree_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    if !meta.is_dir() {
        return 0;
    }
    std::fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| tree_bytes(&e.path())).sum())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_files_dirs_and_symlinks() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("a/b")).expect("mkdir");
        std::fs::write(src.join("a/b/f"), b"hello").expect("write");
        std::fs::set_permissions(src.join("a/b/f"), std::fs::Permissions::from_mode(0o751))
            .expect("chmod");
        symlink("b/f", src.join("a/link")).expect("symlink");
        let dst = tmp.path().join("dst");
        assert_eq!(copy_tree(&src, &dst).expect("copy"), 5);
        assert_eq!(std::fs::read(dst.join("a/b/f")).expect("read"), b"hello");
        assert_eq!(
            std::fs::metadata(dst.join("a/b/f"))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777,
            0o751
        );
        assert_eq!(
            std::fs::read_link(dst.join("a/link")).expect("readlink"),
            Path::new("b/f")
        );
        assert_eq!(tree_bytes(&dst), 5);
    }
}
