//! `banger kernel import`: copy a kernel (and optionally its initrd and
//! modules) into managed storage, recording its format and the backends
//! that can boot it. Runs in the request task; only the final publication
//! goes through the KernelRegistry actor.

use std::path::{Path, PathBuf};

use banger_image::kernel::{self, KernelFormat};
use banger_protocol::{ErrorData, ErrorKind, KernelImportRequest, KernelInfo};

use super::{KernelsMsg, StagedKernel};
use crate::ask::{ask, ask_patiently};
use crate::fsutil;
use crate::layout::{new_id, Layout, StagingDir};
use crate::names;
use crate::records::validate_name;
use crate::router::dispatch::RequestCtx;

pub const VMLINUZ: &str = "vmlinuz";
pub const VMLINUX: &str = "vmlinux";
pub const INITRD: &str = "initrd.img";
pub const MODULES: &str = "modules";

/// Where a kernel's artifacts come from.
#[derive(Debug, Clone)]
pub struct KernelSource {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub modules: Option<PathBuf>,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> ErrorData {
    move |e| ErrorData::from_error(ErrorKind::InvalidRequest, &e).with_cause(what)
}

fn require_abs(label: &str, path: &str) -> Result<PathBuf, ErrorData> {
    let p = PathBuf::from(path);
    if !p.is_absolute() {
        return Err(ErrorData::new(
            ErrorKind::InvalidRequest,
            format!("{label} path `{path}` is not absolute"),
        )
        .with_hint("the daemon resolves paths itself: pass absolute paths"));
    }
    Ok(p)
}

impl KernelSource {
    pub fn from_request(req: &KernelImportRequest) -> Result<Self, ErrorData> {
        Ok(Self {
            kernel: require_abs("kernel", &req.kernel)?,
            initrd: req
                .initrd
                .as_deref()
                .map(|p| require_abs("initrd", p))
                .transpose()?,
            modules: req
                .modules
                .as_deref()
                .map(|p| require_abs("modules", p))
                .transpose()?,
        })
    }
}

/// Whether an ELF kernel carries a PVH entry note (`Xen`, type 18), which
/// QEMU needs to boot an ELF `vmlinux` directly.
fn has_pvh_note(elf: &[u8]) -> bool {
    let needle: [u8; 4] = 18u32.to_le_bytes();
    elf.windows(16)
        .any(|w| w[0..4] == 4u32.to_le_bytes() && w[8..12] == needle && &w[12..16] == b"Xen\0")
}

/// Copies and inspects the artifacts into `staging` (blocking).
pub fn stage(staging: &Path, src: &KernelSource) -> Result<StagedParts, ErrorData> {
    let data = std::fs::read(&src.kernel)
        .map_err(io_err(format!("reading kernel {}", src.kernel.display())))?;
    let probe = kernel::probe(&data).map_err(|e| {
        ErrorData::from_error(ErrorKind::InvalidRequest, &e)
            .with_cause(format!("inspecting {}", src.kernel.display()))
    })?;
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(staging.join(name), bytes).map_err(io_err(format!("writing {name}")))
    };
    let mut backends = Vec::new();
    let (kernel_file, has_vmlinux) = match probe.format {
        KernelFormat::BzImage => {
            write(VMLINUZ, &data)?;
            backends.push("qemu".to_string());
            // The ELF inside, for backends that need one; a payload we cannot
            // decompress only costs the Firecracker option.
            match kernel::extract_elf(&data) {
                Ok(elf) => {
                    if kernel::firecracker_compatible(&elf) {
                        backends.push("firecracker".to_string());
                    }
                    write(VMLINUX, &elf)?;
                    (VMLINUZ, true)
                }
                Err(_) => (VMLINUZ, false),
            }
        }
        KernelFormat::Elf => {
            write(VMLINUX, &data)?;
            if has_pvh_note(&data) {
                backends.push("qemu".to_string());
            }
            if kernel::firecracker_compatible(&data) {
                backends.push("firecracker".to_string());
            }
            (VMLINUX, true)
        }
    };
    let mut bytes = data.len() as u64;
    if let Some(initrd) = &src.initrd {
        bytes += std::fs::copy(initrd, staging.join(INITRD))
            .map_err(io_err(format!("copying initrd {}", initrd.display())))?;
    }
    if let Some(modules) = &src.modules {
        bytes += fsutil::copy_tree(modules, &staging.join(MODULES))
            .map_err(io_err(format!("copying modules {}", modules.display())))?;
    }
    Ok(StagedParts {
        version: probe.version,
        format: probe.format.as_str().to_string(),
        kernel_file: kernel_file.to_string(),
        has_vmlinux,
        has_initrd: src.initrd.is_some(),
        has_modules: src.modules.is_some(),
        backends,
        bytes,
    })
}

/// What [`stage`] found and wrote.
#[derive(Debug, Clone)]
pub struct StagedParts {
    pub version: Option<String>,
    pub format: String,
    pub kernel_file: String,
    pub has_vmlinux: bool,
    pub has_initrd: bool,
    pub has_modules: bool,
    pub backends: Vec<String>,
    pub bytes: u64,
}

/// Stages `src` as kernel `name` and publishes it.
pub async fn import_kernel(
    name: &str,
    src: KernelSource,
    source_label: String,
    layout: &Layout,
    rctx: &RequestCtx,
) -> Result<KernelInfo, ErrorData> {
    validate_name("kernel", name)?;
    let timeout = rctx.ctx.request_timeout;
    let existing = ask(
        names::KERNELS,
        |reply| KernelsMsg::Get {
            name: name.to_string(),
            reply,
        },
        timeout,
    )
    .await?;
    if existing.is_some() {
        return Err(ErrorData::new(
            ErrorKind::AlreadyExists,
            format!("kernel name `{name}` is taken"),
        )
        .with_hint(format!(
            "pick another name or delete it first: banger kernel delete {name}"
        )));
    }
    let id = new_id();
    let staging = StagingDir::create(Layout::staging(&layout.kernels_dir(), &id)).map_err(|e| {
        ErrorData::from_error(ErrorKind::Internal, &e).with_cause("creating the staging dir")
    })?;
    rctx.progress(
        "copy",
        format!("copying kernel artifacts from {}", src.kernel.display()),
        None,
    )
    .await;
    let staging_path = staging.path().to_path_buf();
    let parts = tokio::task::spawn_blocking(move || stage(&staging_path, &src))
        .await
        .map_err(|e| {
            ErrorData::new(
                ErrorKind::Internal,
                format!("kernel staging task failed: {e}"),
            )
        })??;
    rctx.progress(
        "publish",
        format!(
            "{} kernel {} for {}",
            parts.format,
            parts.version.as_deref().unwrap_or("(unknown version)"),
            parts.backends.join(", ")
        ),
        None,
    )
    .await;
    let staged = StagedKernel {
        id,
        name: name.to_string(),
        staging: staging.path().to_path_buf(),
        version: parts.version,
        format: parts.format,
        kernel_file: parts.kernel_file,
        has_vmlinux: parts.has_vmlinux,
        has_initrd: parts.has_initrd,
        has_modules: parts.has_modules,
        backends: parts.backends,
        source: source_label,
        bytes: parts.bytes,
    };
    let info = ask_patiently(
        names::KERNELS,
        |reply| KernelsMsg::Publish {
            staged: staged.clone(),
            reply,
        },
        timeout,
        crate::images::PUBLISH_PATIENCE,
    )
    .await??;
    staging.keep();
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_note_is_found() {
        let mut elf = vec![0u8; 100];
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&8u32.to_le_bytes());
        note.extend_from_slice(&18u32.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        assert!(!has_pvh_note(&elf));
        elf.extend_from_slice(&note);
        assert!(has_pvh_note(&elf));
    }

    #[test]
    fn relative_paths_are_refused() {
        let req = KernelImportRequest {
            name: "k".into(),
            kernel: "vmlinuz".into(),
            initrd: None,
            modules: None,
        };
        let err = KernelSource::from_request(&req).expect_err("relative");
        assert!(err.message.contains("not absolute"));
    }

    #[test]
    fn stage_real_debian_kernel() {
        let boot =
            std::fs::read_dir("/boot").expect("/boot (apt-get install linux-image-cloud-amd64)");
        let kernel = boot
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .expect("a Debian kernel in /boot");
        let tmp = tempfile::tempdir().expect("tempdir");
        let parts = stage(
            tmp.path(),
            &KernelSource {
                kernel,
                initrd: None,
                modules: None,
            },
        )
        .expect("stage");
        assert_eq!(parts.format, "bzimage");
        assert!(parts.has_vmlinux);
        assert_eq!(parts.backends, vec!["qemu".to_string()]);
        assert!(tmp.path().join(VMLINUX).metadata().expect("vmlinux").len() > 1 << 20);
    }
}
