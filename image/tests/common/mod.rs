//! Test helpers: a tar writer that will write anything (raw names, lying
//! size fields, PAX records), compression, a sandbox whose surroundings are
//! checked for changes, and a tree snapshot for comparisons.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use banger_image::unpack::{Compression, Limits, UnpackError, UnpackedTree, Unpacker};

/// One tar member, written exactly as described.
#[derive(Debug, Clone)]
pub struct Entry {
    pub typeflag: u8,
    pub name: Vec<u8>,
    pub link: Vec<u8>,
    pub data: Vec<u8>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub dev: (u32, u32),
    pub pax: Vec<(String, Vec<u8>)>,
    /// Value for the ustar size field when it should not be `data.len()`.
    pub ustar_size: Option<u64>,
}

impl Entry {
    pub fn new(typeflag: u8, name: impl AsRef<[u8]>) -> Self {
        Entry {
            typeflag,
            name: name.as_ref().to_vec(),
            link: Vec::new(),
            data: Vec::new(),
            mode: if typeflag == b'5' { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            dev: (0, 0),
            pax: Vec::new(),
            ustar_size: None,
        }
    }
    pub fn data(mut self, data: impl AsRef<[u8]>) -> Self {
        self.data = data.as_ref().to_vec();
        self
    }
    pub fn link(mut self, link: impl AsRef<[u8]>) -> Self {
        self.link = link.as_ref().to_vec();
        self
    }
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }
    pub fn dev(mut self, major: u32, minor: u32) -> Self {
        self.dev = (major, minor);
        self
    }
    pub fn pax(mut self, key: &str, value: impl AsRef<[u8]>) -> Self {
        self.pax.push((key.to_owned(), value.as_ref().to_vec()));
        self
    }
    pub fn xattr(self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.pax(&format!("SCHILY.xattr.{name}"), value)
    }
    pub fn ustar_size(mut self, size: u64) -> Self {
        self.ustar_size = Some(size);
        self
    }
}

/// Builds tar bytes member by member.
#[derive(Debug, Default, Clone)]
pub struct LayerBuilder {
    buf: Vec<u8>,
}

fn pax_records(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body = k.len() + v.len() + 3; // ' ', '=', '\n'
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        out.extend_from_slice(len.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

fn pad(buf: &mut Vec<u8>) {
    let rem = buf.len() % 512;
    if rem != 0 {
        buf.resize(buf.len() + 512 - rem, 0);
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a member exactly as described.
    pub fn entry(mut self, mut e: Entry) -> Self {
        if e.name.len() > 100 {
            e.pax.insert(0, ("path".to_owned(), e.name.clone()));
        }
        if e.link.len() > 100 {
            e.pax.insert(0, ("linkpath".to_owned(), e.link.clone()));
        }
        if !e.pax.is_empty() {
            let records = pax_records(&e.pax);
            let mut h = tar::Header::new_ustar();
            h.as_old_mut().name[..13].copy_from_slice(b"PaxHeaders/0x");
            h.set_mode(0o644);
            h.set_size(records.len() as u64);
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_cksum();
            self.buf.extend_from_slice(h.as_bytes());
            self.buf.extend_from_slice(&records);
            pad(&mut self.buf);
        }
        let mut h = tar::Header::new_ustar();
        let n = e.name.len().min(100);
        h.as_old_mut().name[..n].copy_from_slice(&e.name[..n]);
        let l = e.link.len().min(100);
        h.as_old_mut().linkname[..l].copy_from_slice(&e.link[..l]);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        h.set_size(e.ustar_size.unwrap_or(e.data.len() as u64));
        h.set_entry_type(tar::EntryType::new(e.typeflag));
        h.set_device_major(e.dev.0).expect("ustar header");
        h.set_device_minor(e.dev.1).expect("ustar header");
        h.set_cksum();
        self.buf.extend_from_slice(h.as_bytes());
        self.buf.extend_from_slice(&e.data);
        pad(&mut self.buf);
        self
    }

    pub fn file(self, name: &str, data: impl AsRef<[u8]>) -> Self {
        self.entry(Entry::new(b'0', name).data(data))
    }
    pub fn file_mode(self, name: &str, data: impl AsRef<[u8]>, mode: u32) -> Self {
        self.entry(Entry::new(b'0', name).data(data).mode(mode))
    }
    pub fn dir(self, name: &str) -> Self {
        self.entry(Entry::new(b'5', name))
    }
    pub fn dir_mode(self, name: &str, mode: u32) -> Self {
        self.entry(Entry::new(b'5', name).mode(mode))
    }
    pub fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(Entry::new(b'2', name).link(target).mode(0o777))
    }
    pub fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(Entry::new(b'1', name).link(target))
    }
    pub fn char_dev(self, name: &str, major: u32, minor: u32, mode: u32) -> Self {
        self.entry(Entry::new(b'3', name).dev(major, minor).mode(mode))
    }
    pub fn block_dev(self, name: &str, major: u32, minor: u32, mode: u32) -> Self {
        self.entry(Entry::new(b'4', name).dev(major, minor).mode(mode))
    }
    pub fn fifo(self, name: &str, mode: u32) -> Self {
        self.entry(Entry::new(b'6', name).mode(mode))
    }
    /// `.wh.<name>` next to `path`'s last component.
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        self.entry(Entry::new(b'0', format!("{dir}.wh.{name}")))
    }
    /// `<dir>/.wh..wh..opq`.
    pub fn opaque(self, dir: &str) -> Self {
        self.entry(Entry::new(b'0', format!("{dir}/.wh..wh..opq")))
    }
    /// Appends raw bytes (no padding).
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.buf.extend_from_slice(bytes);
        self
    }
    /// The archive with its end-of-archive marker.
    pub fn tar(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&[0u8; 1024]);
        self.buf
    }
    /// The members without an end-of-archive marker.
    pub fn unterminated(self) -> Vec<u8> {
        self.buf
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).expect("zstd")
}

/// A temp dir holding the staging root (at `d1/d2/root`) and, around it,
/// files that no layer may touch.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub outside: PathBuf,
    before: BTreeMap<String, Node>,
    passwd: Option<Node>,
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // Three levels down, so that "../../.." from the root is still the
        // sandbox: a broken unpacker damages the sandbox, not the host.
        let root = dir.path().join("d1/d2/root");
        std::fs::create_dir_all(&root).expect("mkdir root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(outside.join("sub")).expect("mkdir outside");
        std::fs::write(outside.join("sentinel"), b"do not touch").expect("write");
        std::fs::write(outside.join("passwd"), b"root:x:0:0::/root:/bin/sh\n").expect("write");
        std::fs::write(outside.join("x"), b"x outside").expect("write");
        std::fs::write(outside.join("sub/file"), b"nested").expect("write");
        std::os::unix::fs::symlink("sentinel", outside.join("link")).expect("symlink");
        let before = snapshot_except(dir.path(), &root);
        let passwd = node(Path::new("/etc/passwd"));
        Sandbox {
            dir,
            root,
            outside,
            before,
            passwd,
        }
    }

    /// Absolute path of the `outside` directory as text (for symlinks).
    pub fn outside_str(&self) -> String {
        self.outside.display().to_string()
    }

    /// Everything next to the staging root, and the host's /etc/passwd,
    /// is exactly as it was.
    pub fn assert_outside_untouched(&self) {
        let after = snapshot_except(self.dir.path(), &self.root);
        let changed: Vec<&String> = self
            .before
            .keys()
            .chain(after.keys())
            .filter(|k| self.before.get(*k) != after.get(*k))
            .collect();
        assert!(
            changed.is_empty(),
            "something outside the staging root changed: {changed:?}"
        );
        assert_eq!(
            self.passwd,
            node(Path::new("/etc/passwd")),
            "/etc/passwd changed"
        );
    }

    pub fn unpacker(&self, limits: Limits) -> Unpacker {
        Unpacker::new(&self.root, limits).expect("unpacker")
    }

    /// Applies `layers` in order with default limits.
    pub async fn unpack(
        &self,
        layers: Vec<(&str, Compression, Vec<u8>)>,
    ) -> Result<UnpackedTree, UnpackError> {
        self.unpack_with(layers, Limits::default()).await
    }

    pub async fn unpack_with(
        &self,
        layers: Vec<(&str, Compression, Vec<u8>)>,
        limits: Limits,
    ) -> Result<UnpackedTree, UnpackError> {
        let mut u = self.unpacker(limits);
        for (digest, c, blob) in layers {
            u.apply_layer(digest, c, std::io::Cursor::new(blob)).await?;
        }
        Ok(u.finish())
    }

    pub fn tree(&self) -> BTreeMap<String, Node> {
        snapshot(&self.root)
    }
}

/// What a test compares about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub mtime: i64,
    pub ino: u64,
    /// File contents or symlink target.
    pub content: Vec<u8>,
}

pub fn node(p: &Path) -> Option<Node> {
    let m = std::fs::symlink_metadata(p).ok()?;
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_file() {
        'f'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else {
        '?'
    };
    let content = match kind {
        'f' => std::fs::read(p).ok()?,
        'l' => std::fs::read_link(p).ok()?.as_os_str().as_bytes().to_vec(),
        _ => Vec::new(),
    };
    Some(Node {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        nlink: m.nlink(),
        mtime: m.mtime(),
        ino: m.ino(),
        content,
    })
}

/// Every path under `root` (relative, `/`-separated), not following symlinks.
pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    snapshot_except(root, Path::new("/nonexistent/none"))
}

fn snapshot_except(root: &Path, skip: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir") {
            let p = e.expect("entry").path();
            if p == skip {
                continue;
            }
            let rel = p
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            let n = node(&p).expect("stat");
            if n.kind == 'd' {
                stack.push(p.clone());
            }
            out.insert(rel, n);
        }
    }
    out
}

/// Paths (relative) in a snapshot.
pub fn paths(tree: &BTreeMap<String, Node>) -> Vec<&str> {
    tree.keys().map(String::as_str).collect()
}

/// Asserts an error names `layer` and a path containing `path`.
#[track_caller]
pub fn assert_names(err: &UnpackError, layer: &str, path: &str) {
    assert_eq!(err.layer(), Some(layer), "layer in {err:?}");
    let p = err.path().unwrap_or_default();
    assert!(p.contains(path), "path {path:?} not in {err:?}");
    let text = err.to_string();
    assert!(text.contains(layer), "message {text:?} lacks the layer");
    assert!(text.contains(path), "message {text:?} lacks the path");
}

pub const L1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
pub const L2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
pub const L3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";
