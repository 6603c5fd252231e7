//! Helpers for the image and kernel end-to-end tests: run a streaming
//! request and keep its progress, check replies, find the daemon's
//! artifact directories and the host's kernel, and build a small
//! busybox image to push to a test registry.

use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_protocol::client::{Client, ClientError};
use banger_protocol::{
    ErrorData, ErrorKind, ImageInfo, ImagePullRequest, KernelInfo, Progress, Request, Response,
};

use crate::oci::{Blob, Layer};
use crate::{error_chain, TestDaemon};

/// Upper bound for one pull, import or register in these tests.
pub const OP_TIMEOUT: Duration = Duration::from_secs(180);

/// What a streaming request produced: its final reply and every progress frame.
#[derive(Debug)]
pub struct Outcome {
    pub result: Result<Response, ClientError>,
    pub progress: Vec<Progress>,
}

impl Outcome {
    /// The image of an `Image` reply; panics with the error otherwise.
    pub fn image(self) -> ImageInfo {
        match self.result {
            Ok(Response::Image(info)) => info,
            Ok(other) => panic!("expected an image, got {other:?}"),
            Err(e) => panic!("request failed: {}", error_chain(&e)),
        }
    }

    /// The kernel of a `Kernel` reply; panics with the error otherwise.
    pub fn kernel(self) -> KernelInfo {
        match self.result {
            Ok(Response::Kernel(info)) => info,
            Ok(other) => panic!("expected a kernel, got {other:?}"),
            Err(e) => panic!("request failed: {}", error_chain(&e)),
        }
    }

    /// The daemon's error, which must be of `kind`.
    #[track_caller]
    pub fn error(self, kind: ErrorKind) -> ErrorData {
        match self.result {
            Err(ClientError::Daemon(err)) => {
                assert_eq!(err.kind, kind, "wrong error kind: {err:?}");
                err
            }
            Err(e) => panic!(
                "expected a {kind:?} error from the daemon, got {}",
                error_chain(&e)
            ),
            Ok(r) => panic!("expected a {kind:?} error, got {r:?}"),
        }
    }

    /// Distinct stages in order, consecutive repeats collapsed.
    pub fn stages(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in &self.progress {
            if out.last() != Some(&p.stage) {
                out.push(p.stage.clone());
            }
        }
        out
    }

    /// Progress frames of `stage`.
    pub fn of_stage(&self, stage: &str) -> Vec<&Progress> {
        self.progress.iter().filter(|p| p.stage == stage).collect()
    }
}

/// The whole error text: message, causes and hint.
pub fn full_text(err: &ErrorData) -> String {
    format!("{err} (hint: {})", err.hint.as_deref().unwrap_or("-"))
}

/// Sends `request` and collects its progress until the final reply;
/// panics if that takes longer than `timeout`.
pub async fn run(client: &mut Client, request: Request, timeout: Duration) -> Outcome {
    let name = request.name();
    let mut progress = Vec::new();
    let result = tokio::time::timeout(
        timeout,
        client.request_with_progress(request, |p| progress.push(p)),
    )
    .await
    .unwrap_or_else(|_| {
        panic!("{name} did not finish within {timeout:?}; progress so far: {progress:?}")
    });
    Outcome { result, progress }
}

/// A pull request with defaults (the default platform, no kernel).
pub fn pull_request(reference: &str, name: Option<&str>) -> ImagePullRequest {
    ImagePullRequest {
        reference: reference.to_string(),
        name: name.map(str::to_string),
        size: None,
        platform: None,
        insecure: false,
        kernel: None,
    }
}

/// `ImagePull` through a fresh connection.
pub async fn pull(daemon: &TestDaemon, req: ImagePullRequest) -> Outcome {
    let mut client = daemon.client().await;
    run(&mut client, Request::ImagePull(req), OP_TIMEOUT).await
}

/// A request without progress, answered within 30 s.
pub async fn ask(client: &mut Client, request: Request) -> Result<Response, ClientError> {
    let name = request.name();
    tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .unwrap_or_else(|_| panic!("{name} did not answer within 30 s"))
}

pub async fn image_show(client: &mut Client, name: &str) -> Option<ImageInfo> {
    match ask(client, Request::ImageShow { name: name.into() }).await {
        Ok(Response::Image(info)) => Some(info),
        Err(ClientError::Daemon(e)) if e.kind == ErrorKind::NotFound => None,
        other => panic!("ImageShow {name}: {other:?}"),
    }
}

pub async fn image_list(client: &mut Client) -> Vec<ImageInfo> {
    match ask(client, Request::ImageList).await {
        Ok(Response::Images(list)) => list,
        other => panic!("ImageList: {other:?}"),
    }
}

pub async fn kernel_show(client: &mut Client, name: &str) -> Option<KernelInfo> {
    match ask(client, Request::KernelShow { name: name.into() }).await {
        Ok(Response::Kernel(info)) => Some(info),
        Err(ClientError::Daemon(e)) if e.kind == ErrorKind::NotFound => None,
        other => panic!("KernelShow {name}: {other:?}"),
    }
}

pub async fn kernel_list(client: &mut Client) -> Vec<KernelInfo> {
    match ask(client, Request::KernelList).await {
        Ok(Response::Kernels(list)) => list,
        other => panic!("KernelList: {other:?}"),
    }
}

/// `<state>/banger/images`.
pub fn images_dir(daemon: &TestDaemon) -> PathBuf {
    daemon.paths().state_dir.join("images")
}

/// `<state>/banger/kernels`.
pub fn kernels_dir(daemon: &TestDaemon) -> PathBuf {
    daemon.paths().state_dir.join("kernels")
}

/// `<state>/banger/layers` (the layer cache).
pub fn layers_dir(daemon: &TestDaemon) -> PathBuf {
    daemon.paths().state_dir.join("layers")
}

/// `<state>/banger/downloads`.
pub fn downloads_dir(daemon: &TestDaemon) -> PathBuf {
    daemon.paths().state_dir.join("downloads")
}

/// Entries of `dir` whose names end in `suffix` (none if `dir` is missing).
pub fn entries_with_suffix(dir: &Path, suffix: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(suffix))
        .collect();
    out.sort();
    out
}

/// `*.staging` dirs left under `<state>/banger/images`.
pub fn image_staging(daemon: &TestDaemon) -> Vec<String> {
    entries_with_suffix(&images_dir(daemon), ".staging")
}

/// `.partial` files anywhere under `dir`.
pub fn partial_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().ends_with(".partial") {
                out.push(path);
            }
        }
    }
    out
}

/// The host's Debian kernel: `(/boot/vmlinuz-<ver>, /boot/initrd.img-<ver>, <ver>)`.
pub fn boot_kernel() -> (PathBuf, PathBuf, String) {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .expect("read /boot")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    let kernel = kernels
        .pop()
        .expect("no /boot/vmlinuz-*: apt-get install -y linux-image-cloud-amd64");
    let version = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .expect("vmlinuz-<version>")
        .to_string();
    let initrd = PathBuf::from(format!("/boot/initrd.img-{version}"));
    assert!(
        initrd.is_file(),
        "{} is missing (initramfs-tools builds it)",
        initrd.display()
    );
    (kernel, initrd, version)
}

/// The managed SSH public key the daemon created (`<config>/banger/ssh/id_ed25519.pub`),
/// as `type base64` (without the comment).
pub fn managed_public_key(daemon: &TestDaemon) -> String {
    let path = daemon.paths().config_dir.join("ssh/id_ed25519.pub");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("the managed key {} is missing: {e}", path.display()));
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The statically linked busybox from Debian's busybox-static.
pub fn busybox() -> Vec<u8> {
    let data =
        std::fs::read("/bin/busybox").expect("/bin/busybox: apt-get install -y busybox-static");
    assert_eq!(&data[..4], b"\x7fELF", "/bin/busybox is not an ELF binary");
    data
}

/// A three-layer busybox image:
///
/// 1. (plain tar) `/bin/busybox`, `bin/sh -> busybox`, `bin/ls -> busybox`,
///    `/etc/passwd`, `/etc/old.conf`, `/opt/data/{a,b}.txt`, `/root`;
/// 2. (gzip) adds `/etc/motd` and `/usr/bin/hello`, whiteouts `/etc/old.conf`;
/// 3. (zstd) makes `/opt/data` opaque and adds `/opt/data/c.txt`.
///
/// `tag` goes into `/etc/motd`, so different tags give different layer 2s.
pub fn busybox_layers(tag: &str) -> Vec<Blob> {
    let l1 = Layer::new()
        .dir("bin")
        .file_mode("bin/busybox", busybox(), 0o755)
        .symlink("bin/sh", "busybox")
        .symlink("bin/ls", "busybox")
        .dir("etc")
        .file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
        .file("etc/old.conf", "deleted by layer 2\n")
        .dir("opt")
        .dir("opt/data")
        .file("opt/data/a.txt", "a\n")
        .file("opt/data/b.txt", "b\n")
        .member(b'5', "root", "", b"", 0o700)
        .tar();
    let l2 = Layer::new()
        .file("etc/motd", format!("welcome to {tag}\n"))
        .whiteout("etc/old.conf")
        .dir("usr")
        .dir("usr/bin")
        .file_mode("usr/bin/hello", "#!/bin/sh\necho hello\n", 0o755)
        .tar();
    let l3 = Layer::new()
        .dir("opt/data")
        .opaque("opt/data")
        .file("opt/data/c.txt", "c\n")
        .tar();
    vec![Blob::tar(l1), Blob::gzip(&l2), Blob::zstd(&l3)]
}
