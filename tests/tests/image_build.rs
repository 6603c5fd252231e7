//! The golden image: `ImageBuild` through a real `bangerd`, which runs
//! mmdebstrap against Debian's archive (deb.debian.org; the one test that
//! leaves loopback) and turns the tree into a kernel, an ext4 rootfs and
//! a work seed. Takes one to a few minutes.

use std::path::Path;
use std::time::{Duration, Instant};

use banger_protocol::{ImageBuildRequest, Request, Response};
use banger_tests::artifacts::{
    ask, image_staging, images_dir, kernel_show, managed_public_key, run,
};
use banger_tests::ext4::Ext4Image;
use banger_tests::TestDaemon;

const BUILD_TIMEOUT: Duration = Duration::from_secs(15 * 60);

#[tokio::test]
async fn build_debian_bookworm_with_an_extra_package() {
    assert!(
        Path::new("/usr/bin/mmdebstrap").exists(),
        "mmdebstrap is missing: apt-get install mmdebstrap"
    );
    let d = TestDaemon::start();
    let mut client = d.client().await;
    let started = Instant::now();
    let req = ImageBuildRequest {
        name: "debian-bookworm".into(),
        suite: None,
        packages: vec!["less".into()],
        size: None,
        mirror: None,
    };
    let outcome = run(&mut client, Request::ImageBuild(req), BUILD_TIMEOUT).await;
    let took = started.elapsed();

    // Progress streamed all along, not only at the end.
    let stages = outcome.stages();
    assert_eq!(
        stages.first().map(String::as_str),
        Some("build"),
        "{stages:?}"
    );
    assert_eq!(
        stages.last().map(String::as_str),
        Some("publish"),
        "{stages:?}"
    );
    assert!(stages.iter().any(|s| s == "inject"), "{stages:?}");
    let build_lines = outcome.of_stage("build").len();
    assert!(build_lines > 10, "only {build_lines} build progress lines");
    let first_ms = outcome
        .progress
        .first()
        .map(|p| p.elapsed_ms)
        .unwrap_or(u64::MAX);
    assert!(
        u128::from(first_ms) * 4 < took.as_millis(),
        "the first progress frame came late ({first_ms} ms of {took:?})"
    );
    let image = match outcome.result {
        Ok(Response::Image(image)) => image,
        other => panic!(
            "the build failed: {other:?}\nlast progress: {:?}",
            outcome.progress.iter().rev().take(20).collect::<Vec<_>>()
        ),
    };

    assert_eq!(image.name, "debian-bookworm");
    assert!(image.managed);
    assert!(image.has_init && image.has_sshd, "{image:?}");
    assert!(image.layers.is_empty());
    assert!(image.source.contains("less"), "{}", image.source);

    // The kernel that came with the tree.
    let kernel_name = image.kernel.clone().expect("the image has a kernel");
    let version = kernel_name
        .strip_prefix("debian-bookworm-")
        .unwrap_or_else(|| panic!("kernel name {kernel_name}"));
    let k = kernel_show(&mut client, &kernel_name)
        .await
        .expect("the kernel is registered");
    assert_eq!(k.version.as_deref(), Some(version));
    assert_eq!(k.format, "bzimage");
    assert!(k.backends.iter().any(|b| b == "qemu"), "{:?}", k.backends);
    let initrd = k.initrd_path.as_deref().expect("an initrd");
    assert!(std::fs::metadata(initrd).expect("initrd").len() > 1 << 20);
    let modules = Path::new(k.modules_path.as_deref().expect("modules"));
    assert!(
        modules.join("modules.dep").is_file(),
        "{}",
        modules.display()
    );
    assert!(modules.join("kernel").is_dir(), "{}", modules.display());

    // The rootfs.
    let rootfs = Path::new(&image.rootfs_path);
    assert!(rootfs.starts_with(images_dir(&d).join(&image.id)));
    let fs = Ext4Image::new(rootfs);
    assert!(fs.is_ext4());
    assert_eq!(
        fs.stat("/usr/bin/less").expect("/usr/bin/less").kind,
        "regular"
    );
    let generator = fs
        .stat("/etc/systemd/system/sysinit.target.wants/systemd-network-generator.service")
        .expect("systemd-network-generator is enabled");
    assert_eq!(generator.kind, "symlink");
    assert!(fs.exists("/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"));
    assert!(fs.exists("/usr/sbin/sshd"));
    assert_eq!(fs.read_string("/etc/hostname"), "debian-bookworm\n");
    let keys = fs
        .stat("/root/.ssh/authorized_keys")
        .expect("authorized_keys");
    assert_eq!((keys.mode, keys.uid), (0o600, 0));
    assert!(fs
        .read_string("/root/.ssh/authorized_keys")
        .contains(&managed_public_key(&d)));
    assert!(
        fs.exists(&format!("/lib/modules/{version}/modules.dep"))
            || fs.exists(&format!("/usr/lib/modules/{version}/modules.dep"))
    );

    let seed = Ext4Image::new(image.work_seed_path.as_deref().expect("a work seed"));
    assert!(seed
        .read_string("/.ssh/authorized_keys")
        .contains(&managed_public_key(&d)));

    match ask(&mut client, Request::ImageCatalog).await {
        Ok(Response::ImageCatalog(entries)) => {
            let e = entries
                .iter()
                .find(|e| e.name == "debian-bookworm")
                .expect("entry");
            assert!(e.present && e.default, "{e:?}");
        }
        other => panic!("ImageCatalog: {other:?}"),
    }
    assert!(image_staging(&d).is_empty());
}
