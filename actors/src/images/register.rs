//! `banger image register` (adopt an existing ext4 rootfs, unmanaged) and
//! `banger image promote` (copy an unmanaged image into managed storage).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use banger_protocol::{
    ErrorData, ErrorKind, ImageInfo, ImageRegisterRequest, ImageRuntimeConfig, KernelSelector,
};
use tokio::process::Command;

use super::pull::ensure_name_free;
use super::{inject, ImageSettings, ImagesMsg, ROOTFS, WORK_SEED};
use crate::ask::ask;
use crate::kernels::catalog::ensure_kernel;
use crate::kernels::import::{import_kernel, KernelSource};
use crate::layout::{new_id, Layout, StagingDir};
use crate::names;
use crate::records::validate_name;
use crate::router::dispatch::RequestCtx;
use crate::unix_ms;

fn invalid(msg: String) -> ErrorData {
    ErrorData::new(ErrorKind::InvalidRequest, msg)
}

/// Checks that `path` is an ext4 (or ext2/3) filesystem image: the
/// superblock magic 0xEF53 at byte 1080.
pub fn check_ext4(path: &Path) -> Result<u64, ErrorData> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| {
        ErrorData::from_error(ErrorKind::InvalidRequest, &e)
            .with_cause(format!("opening {}", path.display()))
    })?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut magic = [0u8; 2];
    let ok = f.seek(SeekFrom::Start(1080)).is_ok()
        && f.read_exact(&mut magic).is_ok()
        && magic == [0x53, 0xef];
    if !ok {
        return Err(invalid(format!(
            "{} is not an ext4 filesystem image",
            path.display()
        ))
        .with_hint("register takes a raw ext4 image, e.g. made with mkfs.ext4 -d"));
    }
    Ok(len)
}

async fn run(cmd: &mut Command, what: &str) -> Result<(), ErrorData> {
    let out = cmd
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            ErrorData::from_error(ErrorKind::Internal, &e).with_cause(format!("running {what}"))
        })?;
    if !out.status.success() {
        return Err(ErrorData::new(
            ErrorKind::Internal,
            format!("{what} failed ({})", out.status),
        )
        .with_cause(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

/// Builds a work seed from the `/root` of an ext4 image (read with
/// debugfs, without mounting), plus the managed SSH key.
async fn work_seed_from_ext4(
    rootfs: &Path,
    staging: &Path,
    settings: &ImageSettings,
) -> Result<PathBuf, ErrorData> {
    let dump = staging.join("root-dump");
    std::fs::create_dir_all(&dump).map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?;
    // rdump of a missing /root fails: then the seed starts empty.
    let _ = run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump /root {}", dump.display()))
            .arg(rootfs),
        "debugfs rdump /root",
    )
    .await;
    let tree = staging.join("seed-tree");
    let dumped = dump.join("root");
    if dumped.is_dir() {
        std::fs::rename(&dumped, tree.join("root"))
            .or_else(|_| {
                std::fs::create_dir_all(&tree)?;
                std::fs::rename(&dumped, tree.join("root"))
            })
            .map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?;
    } else {
        std::fs::create_dir_all(tree.join("root"))
            .map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?;
    }
    let key = inject::ensure_ssh_key(&settings.config_dir)?;
    let tree2 = tree.clone();
    tokio::task::spawn_blocking(move || inject::inject_keys_only(&tree2, &key))
        .await
        .map_err(|e| ErrorData::new(ErrorKind::Internal, e.to_string()))??;
    let seed = super::build_work_seed(&tree, staging).await?;
    let _ = std::fs::remove_dir_all(&tree);
    let _ = std::fs::remove_dir_all(&dump);
    Ok(seed)
}

pub async fn register(
    req: ImageRegisterRequest,
    rctx: &RequestCtx,
    settings: &ImageSettings,
    layout: &Layout,
) -> Result<ImageInfo, ErrorData> {
    validate_name("image", &req.name)?;
    let rootfs = PathBuf::from(&req.rootfs);
    if !rootfs.is_absolute() {
        return Err(invalid(format!(
            "rootfs path `{}` is not absolute",
            req.rootfs
        )));
    }
    let rootfs_bytes = check_ext4(&rootfs)?;
    ensure_name_free(&req.name, rctx).await?;
    let kernel = match &req.kernel {
        KernelSelector::Ref(name) if name.is_empty() => {
            return Err(invalid("--kernel-ref needs a kernel name".into()))
        }
        KernelSelector::Ref(name) => ensure_kernel(name, rctx, settings, layout).await?,
        KernelSelector::Paths {
            kernel,
            initrd,
            modules,
        } => {
            let abs = |p: &String| {
                let p = PathBuf::from(p);
                if p.is_absolute() {
                    Ok(p)
                } else {
                    Err(invalid(format!("path `{}` is not absolute", p.display())))
                }
            };
            let src = KernelSource {
                kernel: abs(kernel)?,
                initrd: initrd.as_ref().map(abs).transpose()?,
                modules: modules.as_ref().map(abs).transpose()?,
            };
            import_kernel(
                &req.name,
                src,
                format!("registered with image {}", req.name),
                layout,
                rctx,
            )
            .await?
        }
    };
    let id = new_id();
    let staging = StagingDir::create(Layout::staging(&layout.images_dir(), &id))
        .map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?;
    rctx.progress("build", "work seed from the image's /root".into(), None)
        .await;
    work_seed_from_ext4(&rootfs, staging.path(), settings).await?;
    let info = ImageInfo {
        id,
        name: req.name.clone(),
        managed: false,
        source: format!("registered {}", rootfs.display()),
        rootfs_path: rootfs.display().to_string(),
        rootfs_bytes,
        work_seed_path: Some(WORK_SEED.to_string()),
        kernel: Some(kernel.name),
        created_unix_ms: unix_ms(),
        layers: Vec::new(),
        platform: Some("linux/amd64".into()),
        has_init: true,
        has_sshd: true,
        runtime: ImageRuntimeConfig::default(),
        has_systemd: true,
        has_agent: false,
    };
    let info = super::publish_staged(staging, info, false, rctx.ctx.request_timeout).await?;
    Ok(info)
}

pub async fn promote(
    name: &str,
    rctx: &RequestCtx,
    layout: &Layout,
) -> Result<ImageInfo, ErrorData> {
    let timeout = rctx.ctx.request_timeout;
    let image = ask(
        names::IMAGES,
        |reply| ImagesMsg::Get {
            name: name.to_string(),
            reply,
        },
        timeout,
    )
    .await?
    .ok_or_else(|| crate::records::not_found::<ImageInfo>(name))?;
    if image.managed {
        return Err(ErrorData::new(
            ErrorKind::InvalidState,
            format!("image `{name}` is already managed"),
        ));
    }
    let id = new_id();
    let staging = StagingDir::create(Layout::staging(&layout.images_dir(), &id))
        .map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?;
    rctx.progress(
        "copy",
        format!("copying {} into managed storage", image.rootfs_path),
        None,
    )
    .await;
    // Sparse-aware copy, with a reflink where the filesystem supports one.
    run(
        Command::new("cp")
            .arg("--sparse=always")
            .arg("--reflink=auto")
            .arg(&image.rootfs_path)
            .arg(staging.path().join(ROOTFS)),
        "cp",
    )
    .await?;
    if let Some(seed) = &image.work_seed_path {
        run(
            Command::new("cp")
                .arg("--sparse=always")
                .arg("--reflink=auto")
                .arg(seed)
                .arg(staging.path().join(WORK_SEED)),
            "cp",
        )
        .await?;
    }
    let mut info = image.clone();
    info.id = id;
    info.managed = true;
    info.source = format!("{} (promoted)", image.source);
    info.rootfs_path = ROOTFS.to_string();
    info.work_seed_path = image.work_seed_path.as_ref().map(|_| WORK_SEED.to_string());
    let info = super::publish_staged(staging, info, true, timeout).await?;
    // The old record's managed side files (its work seed) are no longer referenced.
    let _ = std::fs::remove_dir_all(layout.images_dir().join(&image.id));
    Ok(info)
}
