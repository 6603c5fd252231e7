//! Reading ext4 images the daemon built, without mounting them: e2fsprogs'
//! `debugfs` (read-only) and `dumpe2fs`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// An ext4 image file, inspected with `debugfs -R`.
#[derive(Debug, Clone)]
pub struct Ext4Image {
    pub path: PathBuf,
}

/// What `debugfs stat` says about one inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// `regular`, `directory`, `symlink`, ...
    pub kind: String,
    /// Permission bits (`Mode:  0600`).
    pub mode: u32,
    pub uid: u32,
    pub size: u64,
    /// A symlink's target (`Fast link dest: "..."`).
    pub link: Option<String>,
}

impl Ext4Image {
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
        }
    }

    fn debugfs(&self, request: &str) -> (String, String) {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(request)
            .arg(&self.path)
            .output()
            .expect("run debugfs (apt-get install e2fsprogs)");
        assert!(
            out.status.success(),
            "debugfs -R {request:?} {} failed: {}",
            self.path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Whether `dumpe2fs -h` reads it as an ext4 filesystem (extents on).
    pub fn is_ext4(&self) -> bool {
        let out = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&self.path)
            .output()
            .expect("run dumpe2fs (apt-get install e2fsprogs)");
        let text = String::from_utf8_lossy(&out.stdout);
        out.status.success()
            && text.contains("Filesystem magic number:  0xEF53")
            && text
                .lines()
                .any(|l| l.starts_with("Filesystem features:") && l.contains("extent"))
    }

    /// `stat` of `path` (not following a final symlink); `None` if absent.
    pub fn stat(&self, path: &str) -> Option<Stat> {
        let (out, err) = self.debugfs(&format!("stat {path}"));
        if out.trim().is_empty() {
            assert!(
                err.contains("not found") || err.contains("File not found"),
                "debugfs stat {path}: unexpected output: {err}"
            );
            return None;
        }
        let field = |name: &str| -> Option<&str> {
            let at = out.find(name)? + name.len();
            out[at..].split_whitespace().next()
        };
        Some(Stat {
            kind: field("Type:").unwrap_or_default().to_string(),
            mode: u32::from_str_radix(field("Mode:").unwrap_or("0"), 8).unwrap_or(0),
            uid: field("User:")
                .and_then(|v| v.parse().ok())
                .unwrap_or(u32::MAX),
            size: field("Size:").and_then(|v| v.parse().ok()).unwrap_or(0),
            link: out
                .lines()
                .find_map(|l| l.trim().strip_prefix("Fast link dest: "))
                .map(|v| v.trim_matches('"').to_string()),
        })
    }

    pub fn exists(&self, path: &str) -> bool {
        self.stat(path).is_some()
    }

    /// The contents of a regular file (`debugfs cat`); panics if absent.
    pub fn read(&self, path: &str) -> Vec<u8> {
        assert!(
            self.exists(path),
            "{path} is missing from {}",
            self.path.display()
        );
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat {path}"))
            .arg(&self.path)
            .output()
            .expect("run debugfs");
        assert!(out.status.success(), "debugfs cat {path} failed");
        out.stdout
    }

    pub fn read_string(&self, path: &str) -> String {
        String::from_utf8(self.read(path)).expect("utf-8 file")
    }

    /// Names in directory `path` (without `.` and `..`), from `ls -p`.
    pub fn list(&self, path: &str) -> Vec<String> {
        let (out, err) = self.debugfs(&format!("ls -p {path}"));
        assert!(
            !out.trim().is_empty(),
            "{path} is not a directory in {}: {err}",
            self.path.display()
        );
        // Lines look like `/inode/mode/uid/gid/name/size/`.
        let mut names: Vec<String> = out
            .lines()
            .filter_map(|l| l.split('/').nth(5).map(str::to_string))
            .filter(|n| !n.is_empty() && n != "." && n != "..")
            .collect();
        names.sort();
        names
    }
}
