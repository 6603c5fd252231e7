//! Building OCI layers and image configs by hand, for end-to-end pull
//! tests against a [`banger_image::testing::TestRegistry`].
//!
//! [`Layer`] writes tar members exactly as described (raw names such as
//! `../escape` or absolute paths included, which the `tar` crate's
//! builder refuses), so the same helper makes well-formed and hostile
//! layers.

use std::io::Write;

use banger_image::cache::sha256_digest;

/// OCI media type of an uncompressed layer.
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI media type of a gzip layer.
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI media type of a zstd layer.
pub const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// A tar archive built member by member (ustar headers, names up to 100 bytes).
#[derive(Debug, Default, Clone)]
pub struct Layer {
    buf: Vec<u8>,
}

impl Layer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one member with a raw name and link name.
    pub fn member(mut self, typeflag: u8, name: &str, link: &str, data: &[u8], mode: u32) -> Self {
        assert!(
            name.len() <= 100 && link.len() <= 100,
            "names over 100 bytes need PAX records: {name}"
        );
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::new(typeflag));
        h.set_cksum();
        self.buf.extend_from_slice(h.as_bytes());
        self.buf.extend_from_slice(data);
        let rem = self.buf.len() % 512;
        if rem != 0 {
            self.buf.resize(self.buf.len() + 512 - rem, 0);
        }
        self
    }

    pub fn file(self, name: &str, data: impl AsRef<[u8]>) -> Self {
        self.member(b'0', name, "", data.as_ref(), 0o644)
    }

    pub fn file_mode(self, name: &str, data: impl AsRef<[u8]>, mode: u32) -> Self {
        self.member(b'0', name, "", data.as_ref(), mode)
    }

    pub fn dir(self, name: &str) -> Self {
        self.member(b'5', name, "", b"", 0o755)
    }

    pub fn symlink(self, name: &str, target: &str) -> Self {
        self.member(b'2', name, target, b"", 0o777)
    }

    /// `.wh.<name>` next to `path`'s last component: deletes `path` from
    /// the layers below.
    pub fn whiteout(self, path: &str) -> Self {
        let name = match path.rsplit_once('/') {
            Some((dir, base)) => format!("{dir}/.wh.{base}"),
            None => format!(".wh.{path}"),
        };
        self.member(b'0', &name, "", b"", 0o644)
    }

    /// `<dir>/.wh..wh..opq`: hides everything the layers below put in `dir`.
    pub fn opaque(self, dir: &str) -> Self {
        self.member(b'0', &format!("{dir}/.wh..wh..opq"), "", b"", 0o644)
    }

    /// The archive, with its end-of-archive marker.
    pub fn tar(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&[0u8; 1024]);
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

/// A layer blob with its media type, ready for `TestRegistry::push_image`.
#[derive(Debug, Clone)]
pub struct Blob {
    pub media_type: &'static str,
    pub data: Vec<u8>,
    digest: String,
}

impl Blob {
    fn new(media_type: &'static str, data: Vec<u8>) -> Self {
        let digest = sha256_digest(&data);
        Blob {
            media_type,
            data,
            digest,
        }
    }

    pub fn tar(tar: Vec<u8>) -> Self {
        Self::new(LAYER_TAR, tar)
    }

    pub fn gzip(tar: &[u8]) -> Self {
        Self::new(LAYER_GZIP, gzip(tar))
    }

    pub fn zstd(tar: &[u8]) -> Self {
        Self::new(LAYER_ZSTD, zstd(tar))
    }

    /// `sha256:<hex>` of the blob as the registry stores it.
    pub fn digest(&self) -> String {
        self.digest.clone()
    }
}

/// `(media type, bytes)` pairs for `TestRegistry::push_image`.
pub fn push_list(blobs: &[Blob]) -> Vec<(String, Vec<u8>)> {
    blobs
        .iter()
        .map(|b| (b.media_type.to_string(), b.data.clone()))
        .collect()
}

/// An OCI image config for `linux/<arch>`.
pub fn config_json(arch: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/root"
        },
        "rootfs": {"type": "layers", "diff_ids": []}
    }))
    .expect("config json")
}
