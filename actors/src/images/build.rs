//! `banger image build NAME`: the golden image without Docker. mmdebstrap
//! builds a Debian root from the Debian archive; the tree's `/boot` kernel,
//! initrd and `/lib/modules` become a kernel, the tree (with banger's
//! injections) an ext4 rootfs and a work seed, published as one image.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use banger_image::ext4;
use banger_protocol::{ErrorData, ErrorKind, ImageBuildRequest, ImageInfo, ImageRuntimeConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::catalog::ImageCatalog;
use super::pull::{ensure_name_free, ext4_error, human_bytes};
use super::{inject, ImageSettings, ROOTFS, WORK_SEED};
use crate::ask::ask;
use crate::kernels::import::{import_kernel, KernelSource};
use crate::kernels::KernelsMsg;
use crate::layout::{new_id, Layout, StagingDir};
use crate::names;
use crate::records::validate_name;
use crate::router::dispatch::RequestCtx;
use crate::unix_ms;

/// What every built image has (see ENVIRONMENT.md's verified recipe).
pub const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "iproute2",
    "ca-certificates",
    "linux-image-cloud-amd64",
    "initramfs-tools",
];

pub const DEFAULT_SUITE: &str = "bookworm";
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

fn invalid(msg: String) -> ErrorData {
    ErrorData::new(ErrorKind::InvalidRequest, msg)
}

/// Debian package names: lower case, digits, `+ - .`, starting alphanumeric.
fn valid_package(p: &str) -> bool {
    p.len() >= 2
        && p.as_bytes()[0].is_ascii_alphanumeric()
        && p.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
}

/// Kills the whole process group of a child when dropped (mmdebstrap
/// runs apt and dpkg below it), so a cancelled build leaves nothing running.
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Plans the build: suite, mirror and package list, validated.
pub fn plan(req: &ImageBuildRequest) -> Result<(String, String, Vec<String>), ErrorData> {
    validate_name("image", &req.name)?;
    let catalog = ImageCatalog::embedded();
    let entry = catalog.find(&req.name);
    if let Some(e) = entry.filter(|e| e.kind == "oci") {
        return Err(invalid(format!(
            "`{}` is a registry image in the catalog, not one to build",
            e.name
        ))
        .with_hint(format!(
            "pull it: banger image pull {} --name {}",
            e.source, e.name
        )));
    }
    let suite = req
        .suite
        .clone()
        .or_else(|| entry.map(|e| e.source.clone()))
        .unwrap_or_else(|| DEFAULT_SUITE.to_string());
    if suite.is_empty()
        || !suite
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(format!("invalid Debian suite `{suite}`")));
    }
    let mirror = req
        .mirror
        .clone()
        .unwrap_or_else(|| DEFAULT_MIRROR.to_string());
    if !(mirror.starts_with("http://")
        || mirror.starts_with("https://")
        || mirror.starts_with("file:/"))
        || mirror.contains(char::is_whitespace)
    {
        return Err(invalid(format!("invalid mirror `{mirror}`"))
            .with_hint("use an http(s):// or file:/ URL"));
    }
    let mut packages: Vec<String> = BASE_PACKAGES.iter().map(|p| p.to_string()).collect();
    for p in &req.packages {
        if !valid_package(p) {
            return Err(invalid(format!("invalid package name `{p}`")));
        }
        if !packages.contains(p) {
            packages.push(p.clone());
        }
    }
    Ok((suite, mirror, packages))
}

async fn mmdebstrap(
    suite: &str,
    mirror: &str,
    packages: &[String],
    tree: &Path,
    rctx: &RequestCtx,
) -> Result<(), ErrorData> {
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--include={}", packages.join(",")))
        .arg("--aptopt=Acquire::Retries \"3\"")
        .arg(suite)
        .arg(tree)
        .arg(mirror)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Its own session (and so process group, for `GroupGuard`, and
    // autogroup) at nice 0: a build is minutes of CPU that must not
    // inherit bangerd's raised priority.
    // SAFETY: own_session only makes async-signal-safe calls.
    unsafe {
        cmd.pre_exec(banger_vmm::process::own_session);
    }
    if !nix::unistd::geteuid().is_root() {
        cmd.arg("--mode=unshare");
    }
    let mut child = cmd.spawn().map_err(|e| {
        ErrorData::from_error(ErrorKind::Unavailable, &e)
            .with_cause("starting mmdebstrap")
            .with_hint("apt-get install mmdebstrap")
    })?;
    let mut guard = GroupGuard(child.id().map(|p| p as i32));
    let mut tail: Vec<String> = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tail.len() == 20 {
                tail.remove(0);
            }
            tail.push(line.clone());
            rctx.progress("build", line, None).await;
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?;
    guard.0 = None;
    if !status.success() {
        return Err(ErrorData::new(
            ErrorKind::Unavailable,
            format!("mmdebstrap failed ({status})"),
        )
        .with_cause(tail.join("\n"))
        .with_hint("check that the Debian mirror is reachable and the package names exist"));
    }
    Ok(())
}

/// The newest `/boot/vmlinuz-*` in the tree, with its initrd and modules.
fn boot_artifacts(tree: &Path) -> Option<(String, KernelSource)> {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir(tree.join("boot"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    let kernel = kernels.pop()?;
    let version = kernel
        .file_name()?
        .to_string_lossy()
        .strip_prefix("vmlinuz-")?
        .to_string();
    let initrd =
        Some(tree.join("boot").join(format!("initrd.img-{version}"))).filter(|p| p.is_file());
    let modules = [
        tree.join("usr/lib/modules").join(&version),
        tree.join("lib/modules").join(&version),
    ]
    .into_iter()
    .find(|p| p.is_dir());
    Some((
        version,
        KernelSource {
            kernel,
            initrd,
            modules,
        },
    ))
}

pub async fn build(
    req: ImageBuildRequest,
    rctx: &RequestCtx,
    settings: &ImageSettings,
    layout: &Layout,
) -> Result<ImageInfo, ErrorData> {
    let (suite, mirror, packages) = plan(&req)?;
    let name = req.name.clone();
    ensure_name_free(&name, rctx).await?;
    let id = new_id();
    let staging = StagingDir::create(Layout::staging(&layout.images_dir(), &id))
        .map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?;
    let tree = staging.path().join("tree");

    let started = Instant::now();
    rctx.progress(
        "build",
        format!(
            "mmdebstrap {suite} from {mirror} with {}",
            packages.join(",")
        ),
        None,
    )
    .await;
    mmdebstrap(&suite, &mirror, &packages, &tree, rctx).await?;
    rctx.progress(
        "build",
        format!(
            "Debian {suite} root built in {:.1}s",
            started.elapsed().as_secs_f64()
        ),
        None,
    )
    .await;

    // The kernel that came with it.
    let (version, src) = boot_artifacts(&tree).ok_or_else(|| {
        ErrorData::new(ErrorKind::Internal, "the built tree has no /boot/vmlinuz-*")
            .with_hint("keep linux-image-cloud-amd64 in the package list")
    })?;
    let kernel_name = format!("{name}-{version}");
    let timeout = rctx.ctx.request_timeout;
    let existing = ask(
        names::KERNELS,
        |reply| KernelsMsg::Get {
            name: kernel_name.clone(),
            reply,
        },
        timeout,
    )
    .await?;
    let kernel = match existing {
        Some(k) => k,
        None => {
            import_kernel(
                &kernel_name,
                src,
                crate::kernels::built_with_image(&name),
                layout,
                rctx,
            )
            .await?
        }
    };

    let started = Instant::now();
    super::announce_inject(rctx).await;
    let key = inject::ensure_ssh_key(&settings.config_dir)?;
    let metadata = serde_json::json!({"name": name, "source": "build", "suite": suite, "packages": packages, "kernel": kernel.name});
    let (t, n, agent) = (tree.clone(), name.clone(), settings.agent_path.clone());
    let injected = tokio::task::spawn_blocking(move || {
        inject::inject(&t, &n, &key, &metadata, agent.as_deref())
    })
    .await
    .map_err(|e| ErrorData::new(ErrorKind::Internal, e.to_string()))??;
    rctx.progress(
        "inject",
        format!(
            "SSH key, hostname, network bootstrap, in {:.1}s",
            started.elapsed().as_secs_f64()
        ),
        None,
    )
    .await;

    let started = Instant::now();
    rctx.progress("build", "ext4 rootfs and work seed".into(), None)
        .await;
    let t = tree.clone();
    let usage = tokio::task::spawn_blocking(move || ext4::measure_tree(&t))
        .await
        .map_err(|e| ErrorData::new(ErrorKind::Internal, e.to_string()))?
        .map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?;
    let size = req
        .size
        .unwrap_or_else(|| ext4::default_size(usage.tree_bytes()).max(ext4::required_size(&usage)));
    let rootfs = staging.path().join(ROOTFS);
    ext4::build_from_dir(&tree, &rootfs, size, "rootfs")
        .await
        .map_err(|e| ext4_error(&e))?;
    super::build_work_seed(&tree, staging.path()).await?;
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(tree)).await;
    rctx.progress(
        "build",
        format!(
            "rootfs {} (tree {}), work seed, in {:.1}s",
            human_bytes(size),
            human_bytes(usage.tree_bytes()),
            started.elapsed().as_secs_f64()
        ),
        None,
    )
    .await;

    let info = ImageInfo {
        id,
        name: name.clone(),
        managed: true,
        source: format!(
            "build debian {suite} +{}",
            packages[BASE_PACKAGES.len()..].join(",")
        )
        .trim_end_matches(" +")
        .to_string(),
        rootfs_path: ROOTFS.to_string(),
        rootfs_bytes: size,
        work_seed_path: Some(WORK_SEED.to_string()),
        kernel: Some(kernel.name),
        created_unix_ms: unix_ms(),
        layers: Vec::new(),
        platform: Some("linux/amd64".into()),
        has_init: injected.facts.has_init,
        has_sshd: injected.facts.has_sshd,
        has_systemd: injected.facts.has_systemd,
        has_agent: injected.agent,
        runtime: ImageRuntimeConfig::default(),
    };
    let info = super::publish_staged(staging, info, false, timeout).await?;
    rctx.progress("publish", format!("image {name} ready"), None)
        .await;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, packages: &[&str]) -> ImageBuildRequest {
        ImageBuildRequest {
            name: name.into(),
            suite: None,
            packages: packages.iter().map(|s| s.to_string()).collect(),
            size: None,
            mirror: None,
        }
    }

    #[test]
    fn plan_uses_catalog_suite_and_appends_packages() {
        let (suite, mirror, pkgs) =
            plan(&req("debian-bookworm", &["git", "tmux", "git"])).expect("plan");
        assert_eq!(suite, "bookworm");
        assert_eq!(mirror, DEFAULT_MIRROR);
        assert_eq!(
            &pkgs[BASE_PACKAGES.len()..],
            &["git".to_string(), "tmux".to_string()]
        );
    }

    #[test]
    fn plan_refuses_injection_and_oci_entries() {
        assert!(plan(&req("x", &["--root=/"])).is_err());
        assert!(plan(&req("x", &["git,evil"])).is_err());
        let err = plan(&req("debian-bookworm-oci", &[])).expect_err("oci entry");
        assert!(err
            .hint
            .as_deref()
            .is_some_and(|h| h.contains("image pull")));
        let mut r = req("x", &[]);
        r.suite = Some("bookworm; rm -rf /".into());
        assert!(plan(&r).is_err());
    }
}
