//! Kernels end to end: a real `bangerd` imports the host's Debian kernel,
//! refuses to delete a kernel an image uses, and pulls kernel bundles
//! from a catalog served by a loopback HTTP server (resuming an
//! interrupted download with a `Range` request, refusing a wrong sha256),
//! also on demand when an image pull names a kernel it does not have.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_image::cache::sha256_digest;
use banger_image::testing::TestRegistry;
use banger_protocol::{
    ErrorKind, ImageRegisterRequest, KernelCatalogEntry, KernelImportRequest, KernelSelector,
    Request, Response,
};
use banger_tests::artifacts::{
    ask, boot_kernel, busybox_layers, downloads_dir, entries_with_suffix, full_text, image_list,
    image_show, kernel_list, kernel_show, kernels_dir, pull, pull_request, run, OP_TIMEOUT,
};
use banger_tests::http::{FileServer, Reply};
use banger_tests::oci::{config_json, push_list, zstd, Layer};
use banger_tests::{error_chain, wait, TestDaemon};

const BUNDLE_PATH: &str = "/kernels/test-kernel.tar.zst";
const INITRD: &[u8] = b"a tiny stand-in initramfs\n";

fn import_request(
    name: &str,
    kernel: &Path,
    initrd: Option<&Path>,
    modules: Option<&Path>,
) -> KernelImportRequest {
    KernelImportRequest {
        name: name.into(),
        kernel: kernel.display().to_string(),
        initrd: initrd.map(|p| p.display().to_string()),
        modules: modules.map(|p| p.display().to_string()),
    }
}

/// A small modules tree: `<dir>/<version>/kernel/drivers/banger-test.ko` and `modules.dep`.
fn modules_dir(dir: &Path, version: &str) -> PathBuf {
    let root = dir.join("modules");
    let drivers = root.join(version).join("kernel/drivers");
    std::fs::create_dir_all(&drivers).expect("mkdir modules");
    std::fs::write(drivers.join("banger-test.ko"), b"not really a module").expect("write .ko");
    std::fs::write(
        root.join(version).join("modules.dep"),
        b"kernel/drivers/banger-test.ko:\n",
    )
    .expect("write modules.dep");
    root
}

#[tokio::test]
async fn import_registers_the_host_kernel_with_initrd_and_modules() {
    let d = TestDaemon::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (vmlinuz, initrd, version) = boot_kernel();
    let modules = modules_dir(tmp.path(), &version);
    let mut client = d.client().await;

    let req = import_request("host", &vmlinuz, Some(&initrd), Some(&modules));
    let k = run(&mut client, Request::KernelImport(req), OP_TIMEOUT)
        .await
        .kernel();
    assert_eq!(k.name, "host");
    assert_eq!(k.format, "bzimage");
    assert_eq!(k.version.as_deref(), Some(version.as_str()));
    assert!(k.backends.iter().any(|b| b == "qemu"), "{:?}", k.backends);
    assert!(
        !k.backends.iter().any(|b| b == "firecracker"),
        "{:?}",
        k.backends
    );
    assert_eq!(k.source, "imported");

    let kernel_path = Path::new(&k.kernel_path);
    assert!(
        kernel_path.starts_with(kernels_dir(&d)),
        "{}",
        kernel_path.display()
    );
    assert_eq!(
        std::fs::read(kernel_path).expect("kernel copy"),
        std::fs::read(&vmlinuz).expect("host kernel")
    );
    let vmlinux = std::fs::read(k.vmlinux_path.as_deref().expect("an extracted vmlinux"))
        .expect("read vmlinux");
    assert_eq!(&vmlinux[..4], b"\x7fELF");
    assert!(vmlinux.len() > std::fs::metadata(&vmlinuz).expect("vmlinuz").len() as usize);
    let initrd_copy = k.initrd_path.as_deref().expect("initrd");
    assert_eq!(
        std::fs::metadata(initrd_copy).expect("initrd copy").len(),
        std::fs::metadata(&initrd).expect("initrd").len()
    );
    let modules_copy = PathBuf::from(k.modules_path.as_deref().expect("modules"));
    assert_eq!(
        std::fs::read(
            modules_copy
                .join(&version)
                .join("kernel/drivers/banger-test.ko")
        )
        .expect("module copy"),
        b"not really a module"
    );
    assert_eq!(kernel_show(&mut client, "host").await.as_ref(), Some(&k));
    assert_eq!(kernel_list(&mut client).await, vec![k.clone()]);

    // The same name again.
    let req = import_request("host", &vmlinuz, None, None);
    let err = run(&mut client, Request::KernelImport(req), OP_TIMEOUT)
        .await
        .error(ErrorKind::AlreadyExists);
    assert!(err.message.contains("taken"), "{err:?}");
    // Relative, missing and non-kernel paths.
    let req = import_request("rel", Path::new("boot/vmlinuz"), None, None);
    let err = run(&mut client, Request::KernelImport(req), OP_TIMEOUT)
        .await
        .error(ErrorKind::InvalidRequest);
    assert!(err.message.contains("not absolute"), "{err:?}");
    let req = import_request("rel-initrd", &vmlinuz, Some(Path::new("initrd.img")), None);
    run(&mut client, Request::KernelImport(req), OP_TIMEOUT)
        .await
        .error(ErrorKind::InvalidRequest);
    let missing = tmp.path().join("no-such-vmlinuz");
    let req = import_request("missing", &missing, None, None);
    let err = run(&mut client, Request::KernelImport(req), OP_TIMEOUT)
        .await
        .error(ErrorKind::InvalidRequest);
    assert!(full_text(&err).contains("no-such-vmlinuz"), "{err:?}");
    let junk = tmp.path().join("junk");
    std::fs::write(&junk, vec![7u8; 8192]).expect("write junk");
    let req = import_request("junk", &junk, None, None);
    run(&mut client, Request::KernelImport(req), OP_TIMEOUT)
        .await
        .error(ErrorKind::InvalidRequest);
    let req = import_request("Bad Name", &vmlinuz, None, None);
    run(&mut client, Request::KernelImport(req), OP_TIMEOUT)
        .await
        .error(ErrorKind::InvalidRequest);

    assert_eq!(kernel_list(&mut client).await, vec![k]);
    wait::until(
        Duration::from_secs(10),
        "kernel staging dirs to go",
        || async {
            entries_with_suffix(&kernels_dir(&d), ".staging")
                .is_empty()
                .then_some(())
        },
    )
    .await;
    assert_eq!(entries_with_suffix(&kernels_dir(&d), "").len(), 1);
}

/// An ext4 file holding `/root/hello.txt`, for image registration.
fn make_ext4(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("root")).expect("mkdir");
    std::fs::write(tree.join("root/hello.txt"), b"hi\n").expect("write");
    let out = dir.join("root.ext4");
    let made = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&out)
        .arg("32M")
        .output()
        .expect("run mkfs.ext4 (apt-get install e2fsprogs)");
    assert!(
        made.status.success(),
        "mkfs.ext4 failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    out
}

#[tokio::test]
async fn a_kernel_in_use_cannot_be_deleted() {
    let d = TestDaemon::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (vmlinuz, _, _) = boot_kernel();
    let mut client = d.client().await;
    let k = run(
        &mut client,
        Request::KernelImport(import_request("k1", &vmlinuz, None, None)),
        OP_TIMEOUT,
    )
    .await
    .kernel();
    let req = ImageRegisterRequest {
        name: "uses-k1".into(),
        rootfs: make_ext4(tmp.path()).display().to_string(),
        kernel: KernelSelector::Ref("k1".into()),
    };
    let image = run(&mut client, Request::ImageRegister(req), OP_TIMEOUT)
        .await
        .image();
    assert_eq!(image.kernel.as_deref(), Some("k1"));

    let err = ask(&mut client, Request::KernelDelete { name: "k1".into() })
        .await
        .expect_err("k1 is in use");
    let data = err
        .daemon_error()
        .unwrap_or_else(|| panic!("{}", error_chain(&err)));
    assert_eq!(data.kind, ErrorKind::InvalidState, "{data:?}");
    assert!(data.message.contains("uses-k1"), "{data:?}");
    assert!(kernel_show(&mut client, "k1").await.is_some());
    assert!(Path::new(&k.kernel_path).is_file());

    match ask(
        &mut client,
        Request::ImageDelete {
            name: "uses-k1".into(),
        },
    )
    .await
    {
        Ok(Response::Deleted { name }) => assert_eq!(name, "uses-k1"),
        other => panic!("ImageDelete: {other:?}"),
    }
    match ask(&mut client, Request::KernelDelete { name: "k1".into() }).await {
        Ok(Response::Deleted { name }) => assert_eq!(name, "k1"),
        other => panic!("KernelDelete: {other:?}"),
    }
    let dir = Path::new(&k.kernel_path)
        .parent()
        .expect("kernel dir")
        .to_path_buf();
    wait::until(
        Duration::from_secs(10),
        "the kernel's files to go",
        || async { (!dir.exists()).then_some(()) },
    )
    .await;
    assert_eq!(kernel_show(&mut client, "k1").await, None);
    let err = ask(&mut client, Request::KernelDelete { name: "k1".into() })
        .await
        .expect_err("already deleted");
    assert_eq!(
        err.daemon_error().map(|e| e.kind),
        Some(ErrorKind::NotFound)
    );
}

/// A catalog bundle: `vmlinuz` (the host's), `initrd.img`, `modules/<ver>/...`, tar.zst.
fn bundle(version: &str) -> Vec<u8> {
    let (vmlinuz, _, _) = boot_kernel();
    let tar = Layer::new()
        .file(
            "vmlinuz",
            std::fs::read(vmlinuz).expect("read the host kernel"),
        )
        .file("initrd.img", INITRD)
        .dir("modules")
        .dir(&format!("modules/{version}"))
        .dir(&format!("modules/{version}/kernel"))
        .file(
            &format!("modules/{version}/kernel/banger-test.ko"),
            "module",
        )
        .tar();
    zstd(&tar)
}

/// A running catalog: the bundle on a loopback HTTP server and a catalog
/// file naming it as `test-kernel`.
struct Catalog {
    server: FileServer,
    file: PathBuf,
    sha256: String,
    size: u64,
    version: String,
    _dir: tempfile::TempDir,
}

impl Catalog {
    /// Serves the bundle with `plan`; the catalog says `sha256` when given
    /// (else the bundle's real one).
    async fn start(plan: Vec<Reply>, sha256: Option<&str>) -> Catalog {
        let (_, _, version) = boot_kernel();
        let data = bundle(&version);
        let size = data.len() as u64;
        let real = sha256_digest(&data)
            .trim_start_matches("sha256:")
            .to_string();
        let sha256 = sha256.map(str::to_string).unwrap_or(real);
        let server =
            FileServer::start(HashMap::from([(BUNDLE_PATH.to_string(), data)]), plan).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("kernels.toml");
        std::fs::write(
            &file,
            format!(
                "[[kernel]]\nname = \"test-kernel\"\nversion = \"{version}\"\ndescription = \"served by the test\"\n\
                 url = \"{}\"\nsha256 = \"{sha256}\"\nsize = {size}\nformat = \"tar\"\n",
                server.url(BUNDLE_PATH)
            ),
        )
        .expect("write the catalog");
        Catalog {
            server,
            file,
            sha256,
            size,
            version,
            _dir: dir,
        }
    }

    fn daemon(&self) -> TestDaemon {
        TestDaemon::builder()
            .config(format!(
                "[images]\nkernel_catalog = \"{}\"\n",
                self.file.display()
            ))
            .start()
    }
}

async fn kernel_catalog(client: &mut banger_protocol::client::Client) -> Vec<KernelCatalogEntry> {
    match ask(client, Request::KernelCatalog).await {
        Ok(Response::KernelCatalog(entries)) => entries,
        other => panic!("KernelCatalog: {other:?}"),
    }
}

#[tokio::test]
async fn kernel_pull_downloads_verifies_and_registers_a_catalog_bundle() {
    let cat = Catalog::start(vec![], None).await;
    let d = cat.daemon();
    let mut client = d.client().await;

    let entries = kernel_catalog(&mut client).await;
    assert_eq!(
        entries.len(),
        1,
        "the configured file replaces the embedded catalog: {entries:?}"
    );
    let e = &entries[0];
    assert_eq!(
        (
            e.name.as_str(),
            e.version.as_str(),
            e.sha256.as_str(),
            e.size,
            e.present
        ),
        (
            "test-kernel",
            cat.version.as_str(),
            cat.sha256.as_str(),
            cat.size,
            false
        )
    );
    assert_eq!(e.url, cat.server.url(BUNDLE_PATH));

    let outcome = run(
        &mut client,
        Request::KernelPull {
            name: "test-kernel".into(),
        },
        OP_TIMEOUT,
    )
    .await;
    let downloads = outcome.of_stage("download");
    assert!(
        downloads
            .iter()
            .any(|p| p.bytes_done == Some(cat.size) && p.bytes_total == Some(cat.size)),
        "{downloads:?}"
    );
    let k = outcome.kernel();
    assert_eq!(k.name, "test-kernel");
    assert_eq!(k.format, "bzimage");
    assert_eq!(k.version.as_deref(), Some(cat.version.as_str()));
    assert!(
        k.source.contains(&cat.server.url(BUNDLE_PATH)),
        "{}",
        k.source
    );
    assert_eq!(
        std::fs::read(k.initrd_path.as_deref().expect("initrd")).expect("initrd"),
        INITRD
    );
    let modules = PathBuf::from(k.modules_path.as_deref().expect("modules"));
    assert_eq!(
        std::fs::read(modules.join(&cat.version).join("kernel/banger-test.ko")).expect("module"),
        b"module"
    );
    assert!(k.backends.iter().any(|b| b == "qemu"));
    assert_eq!(cat.server.seen().len(), 1);

    let entries = kernel_catalog(&mut client).await;
    assert!(entries[0].present, "{entries:?}");
    // Pulling a registered kernel again is refused; nothing is fetched.
    let err = run(
        &mut client,
        Request::KernelPull {
            name: "test-kernel".into(),
        },
        OP_TIMEOUT,
    )
    .await
    .error(ErrorKind::AlreadyExists);
    assert!(err.message.contains("taken"), "{err:?}");
    assert_eq!(cat.server.seen().len(), 1, "the kernel was fetched again");
    let err = run(
        &mut client,
        Request::KernelPull {
            name: "not-in-catalog".into(),
        },
        OP_TIMEOUT,
    )
    .await
    .error(ErrorKind::NotFound);
    assert!(err.message.contains("catalog"), "{err:?}");

    // The verified download is kept (to skip re-downloads) until a prune.
    let dl = downloads_dir(&d);
    assert!(dl.join(&cat.sha256).is_file());
    assert!(entries_with_suffix(&dl, ".partial").is_empty());
    match ask(&mut client, Request::ImagePrune).await {
        Ok(Response::Pruned(report)) => assert_eq!(report.downloads_removed, 1, "{report:?}"),
        other => panic!("ImagePrune: {other:?}"),
    }
    assert!(!dl.join(&cat.sha256).exists());
}

#[tokio::test]
async fn an_interrupted_kernel_download_resumes_with_a_range_request() {
    let (_, _, version) = boot_kernel();
    let half = bundle(&version).len() as u64 / 2;
    let cat = Catalog::start(vec![Reply::CutAfter(half)], None).await;
    let d = cat.daemon();
    let mut client = d.client().await;

    let err = run(
        &mut client,
        Request::KernelPull {
            name: "test-kernel".into(),
        },
        OP_TIMEOUT,
    )
    .await
    .error(ErrorKind::Unavailable);
    assert!(full_text(&err).contains(BUNDLE_PATH), "{err:?}");
    assert!(kernel_list(&mut client).await.is_empty());
    let partial = downloads_dir(&d).join(format!("{}.partial", cat.sha256));
    wait::until(
        Duration::from_secs(10),
        "the partial download to hold half the bundle",
        || async {
            (std::fs::metadata(&partial).map(|m| m.len()).ok() == Some(half)).then_some(())
        },
    )
    .await;

    let outcome = run(
        &mut client,
        Request::KernelPull {
            name: "test-kernel".into(),
        },
        OP_TIMEOUT,
    )
    .await;
    assert!(
        outcome
            .progress
            .iter()
            .any(|p| p.detail.contains("resuming") && p.bytes_done == Some(half)),
        "{:?}",
        outcome.progress
    );
    let k = outcome.kernel();
    assert_eq!(k.name, "test-kernel");
    let seen = cat.server.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].range_start, None);
    assert_eq!(
        (seen[1].range_start, seen[1].status),
        (Some(half), 206),
        "{seen:?}"
    );
    assert!(!partial.exists());
    assert!(downloads_dir(&d).join(&cat.sha256).is_file());
    assert_eq!(
        std::fs::read(k.initrd_path.as_deref().expect("initrd")).expect("initrd"),
        INITRD
    );
}

#[tokio::test]
async fn a_wrong_sha256_registers_nothing_and_leaves_no_partial() {
    let wrong = "0".repeat(64);
    let cat = Catalog::start(vec![], Some(&wrong)).await;
    let d = cat.daemon();
    let mut client = d.client().await;

    let err = run(
        &mut client,
        Request::KernelPull {
            name: "test-kernel".into(),
        },
        OP_TIMEOUT,
    )
    .await
    .error(ErrorKind::InvalidRequest);
    let text = full_text(&err);
    assert!(text.contains("does not match"), "{text}");
    assert!(text.contains(&wrong), "{text}");
    assert!(kernel_list(&mut client).await.is_empty());
    assert_eq!(cat.server.seen().len(), 1);
    let dl = downloads_dir(&d);
    assert!(
        entries_with_suffix(&dl, ".partial").is_empty(),
        "{:?}",
        entries_with_suffix(&dl, "")
    );
    assert!(!dl.join(&wrong).exists());
    assert!(entries_with_suffix(&kernels_dir(&d), "").is_empty());
    assert!(!kernel_catalog(&mut client).await[0].present);
}

#[tokio::test]
async fn image_pull_fetches_a_missing_kernel_from_the_catalog() {
    let cat = Catalog::start(vec![], None).await;
    let reg = TestRegistry::start();
    reg.push_image(
        "kern/img",
        "1",
        push_list(&busybox_layers("k")),
        &config_json("amd64"),
    )
    .await;
    let reference = reg.reference("kern/img", "1");
    let d = cat.daemon();

    let mut req = pull_request(&reference, Some("with-kernel"));
    req.kernel = Some("test-kernel".into());
    let outcome = pull(&d, req).await;
    let stages = outcome.stages();
    assert!(
        stages.iter().position(|s| s == "kernel") < stages.iter().position(|s| s == "resolve"),
        "the kernel comes first: {stages:?}"
    );
    let image = outcome.image();
    assert_eq!(image.kernel.as_deref(), Some("test-kernel"));
    let mut client = d.client().await;
    let k = kernel_show(&mut client, "test-kernel")
        .await
        .expect("pulled on demand");
    assert!(k.source.starts_with("catalog "), "{}", k.source);
    assert_eq!(cat.server.seen().len(), 1);

    // A second image with the same kernel does not fetch it again.
    let mut req = pull_request(&reference, Some("with-kernel-2"));
    req.kernel = Some("test-kernel".into());
    let outcome = pull(&d, req).await;
    assert!(!outcome.stages().iter().any(|s| s == "kernel"));
    assert_eq!(outcome.image().kernel.as_deref(), Some("test-kernel"));
    assert_eq!(cat.server.seen().len(), 1);

    let mut req = pull_request(&reference, Some("no-kernel"));
    req.kernel = Some("nowhere".into());
    let err = pull(&d, req).await.error(ErrorKind::NotFound);
    assert!(
        err.message
            .contains("neither registered nor in the kernel catalog"),
        "{err:?}"
    );
    assert_eq!(image_show(&mut client, "no-kernel").await, None);
    assert_eq!(image_list(&mut client).await.len(), 2);
}

#[tokio::test]
async fn kernel_show_and_delete_of_unknown_names_are_not_found() {
    let d = TestDaemon::start();
    let mut client = d.client().await;
    assert_eq!(kernel_show(&mut client, "ghost").await, None);
    let err = ask(
        &mut client,
        Request::KernelDelete {
            name: "ghost".into(),
        },
    )
    .await
    .expect_err("unknown");
    assert_eq!(
        err.daemon_error().map(|e| e.kind),
        Some(ErrorKind::NotFound)
    );
    // The embedded catalog is used without a configured file.
    let entries = kernel_catalog(&mut client).await;
    assert!(
        entries
            .iter()
            .any(|e| e.name == "debian-cloud-6.1" && !e.present),
        "{entries:?}"
    );
}

#[tokio::test]
async fn cli_imports_with_relative_paths_and_lists_the_kernel() {
    let d = TestDaemon::start();
    let (vmlinuz, initrd, version) = boot_kernel();
    let mut cmd = d.banger_command([
        "kernel",
        "import",
        "from-cli",
        "--kernel",
        vmlinuz
            .file_name()
            .and_then(|n| n.to_str())
            .expect("file name"),
        "--initrd",
        initrd
            .file_name()
            .and_then(|n| n.to_str())
            .expect("file name"),
    ]);
    cmd.current_dir("/boot");
    let out = d.run_command(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "banger kernel import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.banger(["kernel", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("from-cli") && listing.contains(&version),
        "{listing}"
    );

    let mut client = d.client().await;
    let k = kernel_show(&mut client, "from-cli")
        .await
        .expect("imported through the CLI");
    assert_eq!(k.version.as_deref(), Some(version.as_str()));
    assert!(k.initrd_path.is_some());
    // Deleting through the CLI.
    let out = d.banger(["kernel", "delete", "from-cli"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(kernel_show(&mut client, "from-cli").await, None);
}
