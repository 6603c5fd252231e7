//! The embedded kernel catalog (`catalog.toml`), optionally replaced by a
//! file named in the config (`kernel_catalog`), e.g. for a local mirror.

use std::path::Path;

use banger_protocol::{ErrorData, ErrorKind, KernelCatalogEntry};
use serde::Deserialize;

const EMBEDDED: &str = include_str!("catalog.toml");

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogKernel {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    pub url: String,
    pub sha256: String,
    pub size: u64,
    pub format: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    kernel: Vec<CatalogKernel>,
}

#[derive(Debug, Clone)]
pub struct KernelCatalog {
    pub kernels: Vec<CatalogKernel>,
}

impl KernelCatalog {
    /// The catalog built into banger (parsed once).
    pub fn embedded() -> Self {
        static PARSED: std::sync::OnceLock<KernelCatalog> = std::sync::OnceLock::new();
        PARSED
            .get_or_init(|| {
                Self::parse(EMBEDDED, "embedded kernel catalog").unwrap_or(Self {
                    kernels: Vec::new(),
                })
            })
            .clone()
    }

    /// The catalog to use: `path` when given, else the embedded one.
    pub fn load(path: Option<&Path>) -> Result<Self, ErrorData> {
        match path {
            None => Ok(Self::embedded()),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ErrorData::from_error(ErrorKind::InvalidRequest, &e)
                        .with_cause(format!("reading kernel catalog {}", path.display()))
                })?;
                Self::parse(&text, &path.display().to_string())
            }
        }
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, ErrorData> {
        let file: CatalogFile = toml::from_str(text).map_err(|e| {
            ErrorData::new(
                ErrorKind::InvalidRequest,
                format!("invalid kernel catalog {origin}"),
            )
            .with_cause(e.to_string())
        })?;
        for k in &file.kernel {
            let hex_ok = k.sha256.len() == 64 && k.sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex_ok || !["deb", "tar"].contains(&k.format.as_str()) {
                return Err(ErrorData::new(
                    ErrorKind::InvalidRequest,
                    format!("kernel catalog {origin}: entry `{}` needs a 64-hex sha256 and format deb|tar", k.name),
                ));
            }
        }
        Ok(Self {
            kernels: file.kernel,
        })
    }

    pub fn find(&self, name: &str) -> Option<&CatalogKernel> {
        self.kernels.iter().find(|k| k.name == name)
    }

    pub fn entries(&self, present: impl Fn(&str) -> bool) -> Vec<KernelCatalogEntry> {
        self.kernels
            .iter()
            .map(|k| KernelCatalogEntry {
                name: k.name.clone(),
                version: k.version.clone(),
                url: k.url.clone(),
                sha256: k.sha256.clone(),
                size: k.size,
                description: k.description.clone(),
                present: present(&k.name),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_catalog_parses_and_has_entries() {
        let c = KernelCatalog::parse(EMBEDDED, "embedded").expect("embedded catalog is valid");
        assert!(!c.kernels.is_empty());
        assert!(c.find("debian-cloud-6.1").is_some());
        assert!(c.find("nope").is_none());
    }

    #[test]
    fn bad_entries_are_refused() {
        let text = "[[kernel]]\nname='x'\nversion='1'\nurl='http://h/x'\nsha256='zz'\nsize=1\nformat='deb'\n";
        assert!(KernelCatalog::parse(text, "t").is_err());
    }
}

use banger_image::unpack::{Compression, Limits, Unpacker};
use banger_protocol::KernelInfo;

use super::import::{import_kernel, KernelSource};
use super::KernelsMsg;
use crate::ask::{ask, offload};
use crate::images::ImageSettings;
use crate::layout::{new_id, Layout, StagingDir};
use crate::names;
use crate::router::dispatch::RequestCtx;

/// Returns kernel `name`, pulling it from the catalog when it is not
/// registered. Only a real "no such kernel" leads to the catalog; any
/// other failure is reported as itself.
pub async fn ensure_kernel(
    name: &str,
    rctx: &RequestCtx,
    settings: &ImageSettings,
    layout: &Layout,
) -> Result<KernelInfo, ErrorData> {
    let timeout = rctx.ctx.request_timeout;
    if let Some(kernel) = ask(
        names::KERNELS,
        |reply| KernelsMsg::Get {
            name: name.to_string(),
            reply,
        },
        timeout,
    )
    .await?
    {
        return Ok(kernel);
    }
    let catalog = KernelCatalog::load(settings.kernel_catalog.as_deref())?;
    if catalog.find(name).is_none() {
        return Err(ErrorData::new(
            ErrorKind::NotFound,
            format!("kernel `{name}` is neither registered nor in the kernel catalog"),
        )
        .with_hint("see `banger kernel list` and `banger kernel catalog`, or import one with `banger kernel import`"));
    }
    rctx.progress(
        "kernel",
        format!("kernel {name} is not here yet; pulling it from the catalog"),
        None,
    )
    .await;
    pull_kernel(name, rctx, settings, layout).await
}

/// `banger kernel pull NAME`: download, verify, unpack, register.
pub async fn pull_kernel(
    name: &str,
    rctx: &RequestCtx,
    settings: &ImageSettings,
    layout: &Layout,
) -> Result<KernelInfo, ErrorData> {
    let catalog = KernelCatalog::load(settings.kernel_catalog.as_deref())?;
    let entry = catalog.find(name).cloned().ok_or_else(|| {
        ErrorData::new(
            ErrorKind::NotFound,
            format!("kernel `{name}` is not in the kernel catalog"),
        )
        .with_hint("see `banger kernel catalog`")
    })?;
    let file = super::download::download(
        &entry.url,
        &entry.sha256,
        entry.size,
        &layout.downloads_dir(),
        rctx,
    )
    .await?;
    rctx.progress(
        "extract",
        format!("unpacking {} ({})", entry.version, entry.format),
        None,
    )
    .await;
    let work = StagingDir::create(Layout::staging(&layout.downloads_dir(), &new_id()))
        .map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?;
    let tree = work.path().join("tree");
    std::fs::create_dir_all(&tree).map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?;
    let mut unpacker = Unpacker::new(&tree, Limits::default())
        .map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?
        .defer_ownership(true);
    let label = format!("catalog {}", entry.url);
    let (format, sha, url, file2) = (
        entry.format.clone(),
        entry.sha256.clone(),
        entry.url.clone(),
        file.clone(),
    );
    // The tree is read from disk below; the unpacked summary is not needed.
    let _tree = offload(rctx.cancel.clone(), move || async move {
        let bad = |e: &(dyn std::error::Error + 'static)| {
            ErrorData::from_error(ErrorKind::InvalidRequest, e)
                .with_cause(format!("unpacking {url}"))
        };
        if format == "deb" {
            let data = tokio::fs::read(&file2).await.map_err(|e| bad(&e))?;
            let (member, payload) = deb_data_member(&data).map_err(|e| bad(&e))?;
            let reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = match member.as_str() {
                "data.tar.xz" => {
                    Box::new(async_compression::tokio::bufread::XzDecoder::new(payload))
                }
                "data.tar.zst" => {
                    Box::new(async_compression::tokio::bufread::ZstdDecoder::new(payload))
                }
                "data.tar.gz" => {
                    Box::new(async_compression::tokio::bufread::GzipDecoder::new(payload))
                }
                _ => Box::new(payload),
            };
            unpacker
                .apply_layer(&sha, Compression::None, reader)
                .await
                .map_err(|e| bad(&e))?;
        } else {
            let f = tokio::fs::File::open(&file2).await.map_err(|e| bad(&e))?;
            unpacker
                .apply_layer(&sha, Compression::Detect, f)
                .await
                .map_err(|e| bad(&e))?;
        }
        Ok(unpacker.finish())
    })
    .await?;
    let src = find_artifacts(&tree, &entry.format).ok_or_else(|| {
        ErrorData::new(
            ErrorKind::InvalidRequest,
            format!("{} holds no kernel image", entry.url),
        )
        .with_hint("a tar entry needs vmlinuz or vmlinux at its top; a deb needs boot/vmlinuz-*")
    })?;
    import_kernel(name, src, label, layout, rctx).await
}

/// The `data.tar*` member of a Debian package (an `ar` archive).
fn deb_data_member(data: &[u8]) -> Result<(String, std::io::Cursor<Vec<u8>>), std::io::Error> {
    let bad = |m: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a Debian package: {m}"),
        )
    };
    let mut pos = data
        .strip_prefix(b"!<arch>\n")
        .map(|_| 8)
        .ok_or_else(|| bad("no ar magic"))?;
    while pos + 60 <= data.len() {
        let header = &data[pos..pos + 60];
        let name = String::from_utf8_lossy(&header[..16])
            .trim()
            .trim_end_matches('/')
            .to_string();
        let size: usize = String::from_utf8_lossy(&header[48..58])
            .trim()
            .parse()
            .map_err(|_| bad("bad member size"))?;
        let start = pos + 60;
        let body = data
            .get(start..start + size)
            .ok_or_else(|| bad("truncated member"))?;
        if name.starts_with("data.tar") {
            return Ok((name, std::io::Cursor::new(body.to_vec())));
        }
        pos = start + size + (size & 1);
    }
    Err(bad("no data.tar member"))
}

/// Locates kernel, initrd and modules in an unpacked catalog artifact.
fn find_artifacts(tree: &std::path::Path, format: &str) -> Option<KernelSource> {
    if format == "deb" {
        let kernel = std::fs::read_dir(tree.join("boot"))
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })?;
        let version = kernel
            .file_name()?
            .to_string_lossy()
            .strip_prefix("vmlinuz-")?
            .to_string();
        let modules = [
            tree.join("lib/modules").join(&version),
            tree.join("usr/lib/modules").join(&version),
        ]
        .into_iter()
        .find(|p| p.is_dir());
        return Some(KernelSource {
            kernel,
            initrd: None,
            modules,
        });
    }
    let kernel = ["vmlinuz", "vmlinux"]
        .iter()
        .map(|n| tree.join(n))
        .find(|p| p.is_file())?;
    let initrd = Some(tree.join("initrd.img")).filter(|p| p.is_file());
    let modules = Some(tree.join("modules")).filter(|p| p.is_dir());
    Some(KernelSource {
        kernel,
        initrd,
        modules,
    })
}
