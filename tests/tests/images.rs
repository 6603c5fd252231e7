//! Images end to end: a real `bangerd` pulls hand-made images from a real
//! registry (`docker-registry` on 127.0.0.1), registers and promotes ext4
//! files, deletes and prunes. The built rootfs is read back with debugfs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_image::cache::LayerCache;
use banger_image::registry::{default_image_name, parse_reference, Platform};
use banger_image::testing::{random_bytes, TestRegistry};
use banger_protocol::{
    ErrorKind, ImageRegisterRequest, KernelSelector, Progress, Request, Response, ServerMessage,
};
use banger_tests::artifacts::{
    boot_kernel, busybox_layers, entries_with_suffix, full_text, image_list, image_show,
    image_staging, images_dir, kernel_show, layers_dir, managed_public_key, partial_files, pull,
    pull_request, run, Outcome, OP_TIMEOUT,
};
use banger_tests::ext4::Ext4Image;
use banger_tests::oci::{config_json, push_list, Blob, Layer};
use banger_tests::{error_chain, wait, TestDaemon};

/// Pushes `blobs` as `<repo>:<tag>` (linux/amd64) and returns the reference.
async fn push(reg: &TestRegistry, repo: &str, tag: &str, blobs: &[Blob]) -> String {
    reg.push_image(repo, tag, push_list(blobs), &config_json("amd64"))
        .await;
    reg.reference(repo, tag)
}

fn digests(blobs: &[Blob]) -> Vec<String> {
    blobs.iter().map(Blob::digest).collect()
}

fn short(digest: &str) -> &str {
    &digest.trim_start_matches("sha256:")[..12]
}

/// Waits until no `*.staging` dir is left under `<state>/banger/images`.
async fn assert_no_staging(d: &TestDaemon) {
    wait::until(
        Duration::from_secs(10),
        "image staging dirs to go",
        || async { image_staging(d).is_empty().then_some(()) },
    )
    .await;
}

/// Layers the daemon's cache holds, among `digests`.
fn cached(d: &TestDaemon, digests: &[String]) -> Vec<bool> {
    let cache = LayerCache::open(layers_dir(d)).expect("open the layer cache");
    digests
        .iter()
        .map(|dg| cache.contains(dg).expect("valid digest"))
        .collect()
}

#[tokio::test]
async fn pull_builds_an_ext4_rootfs_from_three_layers() {
    let reg = TestRegistry::start();
    let blobs = busybox_layers("busy");
    let reference = push(&reg, "tools/busy", "1.0", &blobs).await;
    let d = TestDaemon::start();

    let outcome = pull(&d, pull_request(&reference, None)).await;
    let stages = outcome.stages();
    assert_eq!(
        stages,
        ["resolve", "download", "extract", "inject", "build", "publish"],
        "stages out of order: {:?}",
        outcome.progress
    );
    // Byte counts on download frames: every layer reaches its full size.
    for blob in &blobs {
        let frames: Vec<&Progress> = outcome
            .of_stage("download")
            .into_iter()
            .filter(|p| p.detail.contains(short(&blob.digest())))
            .collect();
        assert!(
            !frames.is_empty(),
            "no download frame for {}",
            blob.digest()
        );
        let last = frames.last().expect("a frame");
        assert_eq!(last.bytes_total, Some(blob.data.len() as u64), "{last:?}");
        assert_eq!(last.bytes_done, last.bytes_total, "{last:?}");
        assert!(!last.detail.contains("cached"), "first pull: {last:?}");
    }
    let elapsed: Vec<u64> = outcome.progress.iter().map(|p| p.elapsed_ms).collect();
    assert!(elapsed.windows(2).all(|w| w[0] <= w[1]), "{elapsed:?}");

    let info = outcome.image();
    let name = default_image_name(&parse_reference(&reference).expect("reference"));
    assert_eq!(name, "busy-1-0");
    assert_eq!(info.name, "busy-1-0");
    assert!(info.managed);
    assert_eq!(info.layers, digests(&blobs));
    assert_eq!(info.platform.as_deref(), Some("linux/amd64"));
    assert!(info.source.contains(&reference), "{}", info.source);
    assert_eq!(info.runtime.cmd, ["/bin/sh"]);
    assert!(!info.has_init && !info.has_sshd, "{info:?}");

    let mut client = d.client().await;
    assert_eq!(
        image_show(&mut client, "busy-1-0").await.as_ref(),
        Some(&info)
    );
    assert_eq!(image_list(&mut client).await, vec![info.clone()]);

    let rootfs = Path::new(&info.rootfs_path);
    assert!(
        rootfs.starts_with(images_dir(&d).join(&info.id)),
        "{}",
        rootfs.display()
    );
    assert_eq!(
        std::fs::metadata(rootfs).expect("rootfs").len(),
        info.rootfs_bytes
    );
    let fs = Ext4Image::new(rootfs);
    assert!(fs.is_ext4(), "{} is not ext4", rootfs.display());

    // Layer 1, with its symlinks.
    assert_eq!(fs.list("/bin"), ["busybox", "ls", "sh"]);
    let bb = fs.stat("/bin/busybox").expect("busybox");
    assert_eq!((bb.kind.as_str(), bb.mode), ("regular", 0o755));
    assert_eq!(
        bb.size,
        std::fs::metadata("/bin/busybox").expect("busybox").len()
    );
    let sh = fs.stat("/bin/sh").expect("sh");
    assert_eq!(
        (sh.kind.as_str(), sh.link.as_deref()),
        ("symlink", Some("busybox"))
    );
    // Layer 2: added files, and the whiteout removed old.conf.
    assert_eq!(fs.read_string("/etc/motd"), "welcome to busy\n");
    assert_eq!(fs.stat("/usr/bin/hello").expect("hello").mode, 0o755);
    assert!(
        !fs.exists("/etc/old.conf"),
        "the whiteout did not delete /etc/old.conf"
    );
    assert!(
        !fs.exists("/etc/.wh.old.conf"),
        "a whiteout marker leaked into the image"
    );
    assert!(fs.exists("/etc/passwd"));
    // Layer 3: the opaque dir hides a.txt and b.txt.
    assert_eq!(fs.list("/opt/data"), ["c.txt"]);

    // banger's injections.
    let key = managed_public_key(&d);
    assert!(key.starts_with("ssh-ed25519 "), "{key}");
    let ssh = fs.stat("/root/.ssh").expect("/root/.ssh");
    assert_eq!((ssh.kind.as_str(), ssh.mode), ("directory", 0o700));
    let ak = fs
        .stat("/root/.ssh/authorized_keys")
        .expect("authorized_keys");
    assert_eq!((ak.kind.as_str(), ak.mode, ak.uid), ("regular", 0o600, 0));
    let keys = fs.read_string("/root/.ssh/authorized_keys");
    assert!(
        keys.lines().any(|l| l.starts_with(&key)),
        "{keys:?} lacks {key}"
    );
    assert_eq!(fs.read_string("/etc/hostname"), "busy-1-0\n");
    let meta = fs.read_string("/etc/banger/image.json");
    assert!(meta.contains(&reference), "{meta}");

    // The work seed: an ext4 of /root, with the key.
    let seed = info.work_seed_path.as_deref().expect("a work seed");
    assert!(Path::new(seed).starts_with(images_dir(&d).join(&info.id)));
    let seed = Ext4Image::new(seed);
    assert!(seed.is_ext4());
    let seed_keys = seed.read_string("/.ssh/authorized_keys");
    assert!(seed_keys.contains(&key), "{seed_keys:?}");
    assert_eq!(
        seed.stat("/.ssh/authorized_keys").expect("keys").mode,
        0o600
    );

    assert!(image_staging(&d).is_empty());
}

#[tokio::test]
async fn names_are_derived_overridden_and_validated() {
    let reg = TestRegistry::start();
    let reference = push(&reg, "org/my_tool", "v2.1-rc", &busybox_layers("n")).await;
    let d = TestDaemon::start();

    let derived = pull(&d, pull_request(&reference, None)).await.image();
    assert_eq!(derived.name, "my-tool-v2-1-rc");

    let named = pull(&d, pull_request(&reference, Some("custom.name_1")))
        .await
        .image();
    assert_eq!(named.name, "custom.name_1");
    assert_ne!(named.id, derived.id);
    assert_ne!(named.rootfs_path, derived.rootfs_path);

    for bad in ["Bad", "-lead", "a b", "../x", ""] {
        let err = pull(&d, pull_request(&reference, Some(bad)))
            .await
            .error(ErrorKind::InvalidRequest);
        assert!(
            err.message.contains("invalid image name"),
            "{bad:?}: {err:?}"
        );
    }
    let err = pull(&d, pull_request("127.0.0.1:1/UPPER/case:x", None))
        .await
        .error(ErrorKind::InvalidRequest);
    assert!(!err.message.is_empty());

    let mut client = d.client().await;
    let names: HashSet<String> = image_list(&mut client)
        .await
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(
        names,
        HashSet::from(["my-tool-v2-1-rc".into(), "custom.name_1".into()])
    );
    assert!(image_staging(&d).is_empty());
}

/// A pull that records when its first progress frame and its reply arrived.
async fn timed_pull(d: &TestDaemon, reference: &str, name: &str) -> (Outcome, Instant, Instant) {
    let mut client = d.client().await;
    let mut first: Option<Instant> = None;
    let mut progress = Vec::new();
    let result = tokio::time::timeout(
        OP_TIMEOUT,
        client.request_with_progress(
            Request::ImagePull(pull_request(reference, Some(name))),
            |p| {
                first.get_or_insert_with(Instant::now);
                progress.push(p);
            },
        ),
    )
    .await
    .expect("pull finished in time");
    let done = Instant::now();
    (
        Outcome { result, progress },
        first.expect("at least one progress frame"),
        done,
    )
}

#[tokio::test]
async fn same_name_race_has_one_winner_and_other_names_overlap() {
    let reg = TestRegistry::start();
    let reference = push(&reg, "race/img", "1", &busybox_layers("race")).await;
    let d = TestDaemon::start();

    let (a, b) = futures::join!(
        pull(&d, pull_request(&reference, Some("same"))),
        pull(&d, pull_request(&reference, Some("same")))
    );
    let (ok, lost): (Vec<Outcome>, Vec<Outcome>) =
        [a, b].into_iter().partition(|o| o.result.is_ok());
    assert_eq!(
        (ok.len(), lost.len()),
        (1, 1),
        "exactly one pull of `same` wins"
    );
    let winner = ok.into_iter().next().expect("winner").image();
    assert_eq!(winner.name, "same");
    let err = lost
        .into_iter()
        .next()
        .expect("loser")
        .error(ErrorKind::AlreadyExists);
    assert!(err.message.contains("taken"), "{err:?}");

    let ((a, a_first, a_done), (b, b_first, b_done)) = futures::join!(
        timed_pull(&d, &reference, "par-a"),
        timed_pull(&d, &reference, "par-b")
    );
    let (a, b) = (a.image(), b.image());
    assert_eq!((a.name.as_str(), b.name.as_str()), ("par-a", "par-b"));
    assert_ne!(a.id, b.id);
    assert!(
        a_first < b_done && b_first < a_done,
        "pulls of different names did not overlap"
    );

    let mut client = d.client().await;
    let mut names: Vec<String> = image_list(&mut client)
        .await
        .into_iter()
        .map(|i| i.name)
        .collect();
    names.sort();
    assert_eq!(names, ["par-a", "par-b", "same"]);
    assert_no_staging(&d).await;
    let dirs = entries_with_suffix(&images_dir(&d), "");
    assert_eq!(dirs.len(), 3, "one dir per image: {dirs:?}");
}

#[tokio::test]
async fn hostile_layers_fail_without_leaving_anything() {
    let reg = TestRegistry::start();
    let d = TestDaemon::start();
    let outside = tempfile::tempdir().expect("sentinel dir");
    std::fs::write(outside.path().join("sentinel"), b"untouched").expect("sentinel");
    let outside_str = outside.path().display().to_string();
    let good = Blob::tar(
        Layer::new()
            .dir("etc")
            .file("etc/passwd", "root:x:0:0::/root:/bin/sh\n")
            .tar(),
    );

    let cases: Vec<(&str, Blob, String)> = vec![
        (
            "dotdot",
            Blob::gzip(&Layer::new().file("../../../../escape", "pwned").tar()),
            "../../../../escape".to_string(),
        ),
        (
            "absolute",
            Blob::gzip(
                &Layer::new()
                    .file(&format!("{outside_str}/evil"), "pwned")
                    .tar(),
            ),
            format!("{outside_str}/evil"),
        ),
        (
            "symlink",
            Blob::zstd(
                &Layer::new()
                    .symlink("x", &outside_str)
                    .file("x/evil", "pwned")
                    .tar(),
            ),
            "x/evil".to_string(),
        ),
    ];
    for (tag, hostile, path) in cases {
        let reference = push(&reg, "hostile/img", tag, &[good.clone(), hostile.clone()]).await;
        let err = pull(&d, pull_request(&reference, None))
            .await
            .error(ErrorKind::InvalidRequest);
        let text = full_text(&err);
        assert!(
            text.contains(&hostile.digest()),
            "{tag}: no layer digest in {text}"
        );
        assert!(text.contains(&path), "{tag}: no path {path} in {text}");
        assert!(
            !text.contains(&good.digest()),
            "{tag}: blames the good layer: {text}"
        );
        assert_no_staging(&d).await;
    }

    // Nothing was created outside the tree.
    let mut names: Vec<String> = std::fs::read_dir(outside.path())
        .expect("read sentinel dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["sentinel"]);
    assert_eq!(
        std::fs::read(outside.path().join("sentinel")).expect("sentinel"),
        b"untouched"
    );
    let state = d.paths().state_dir;
    for escaped in [
        state.join("escape"),
        state.parent().expect("state parent").join("escape"),
        images_dir(&d).join("escape"),
        d.root().join("escape"),
    ] {
        assert!(!escaped.exists(), "{} was created", escaped.display());
    }
    let mut client = d.client().await;
    assert!(image_list(&mut client).await.is_empty());
    // Only the layer cache and the key may exist; no image dir at all.
    assert!(entries_with_suffix(&images_dir(&d), "").is_empty());
}

#[tokio::test]
async fn max_image_bytes_stops_a_decompression_bomb() {
    let reg = TestRegistry::start();
    let d = TestDaemon::builder()
        .config("[images]\nmax_image_bytes = 2000000\n")
        .start();
    let small = Blob::tar(
        Layer::new()
            .dir("etc")
            .file("etc/passwd", "root:x:0:0::/root:/bin/sh\n")
            .tar(),
    );
    let bomb = Blob::gzip(&Layer::new().file("zeros", vec![0u8; 20 << 20]).tar());
    assert!(
        bomb.data.len() < 200 << 10,
        "the bomb compresses well: {}",
        bomb.data.len()
    );
    let reference = push(&reg, "bomb/img", "1", &[small, bomb.clone()]).await;

    let err = pull(&d, pull_request(&reference, None))
        .await
        .error(ErrorKind::InvalidRequest);
    let text = full_text(&err);
    assert!(text.contains("exceeds 2000000 bytes"), "{text}");
    assert!(text.contains(&bomb.digest()), "{text}");
    assert_no_staging(&d).await;
    let mut client = d.client().await;
    assert!(image_list(&mut client).await.is_empty());
}

#[tokio::test]
async fn cancelled_pull_leaves_nothing_and_a_retry_reuses_finished_layers() {
    let reg = TestRegistry::start();
    let small = Blob::tar(
        Layer::new()
            .dir("etc")
            .file("etc/passwd", "root:x:0:0::/root:/bin/sh\n")
            .tar(),
    );
    let big = Blob::tar(
        Layer::new()
            .file("big.bin", random_bytes(64 << 20, 7))
            .tar(),
    );
    let blobs = vec![small, big];
    let reference = push(&reg, "big/img", "1", &blobs).await;
    let d = TestDaemon::start();

    let mut client = d.client().await;
    let id = client
        .send(Request::ImagePull(pull_request(&reference, None)))
        .await
        .expect("send pull");
    let mut cancelled_at = None;
    let reply = tokio::time::timeout(OP_TIMEOUT, async {
        loop {
            match client.next_message().await.expect("read frame") {
                ServerMessage::Progress { id: pid, progress } if pid == id => {
                    // Cancel while the big layer is streaming.
                    let streaming = progress.stage == "download"
                        && progress.detail.contains(short(&blobs[1].digest()))
                        && progress.bytes_done.is_some_and(|n| n > 0);
                    if streaming && cancelled_at.is_none() {
                        client.cancel(id).await.expect("send cancel");
                        cancelled_at = Some(progress);
                    }
                }
                ServerMessage::Reply { id: rid, result } if rid == id => break result,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    })
    .await
    .expect("the cancelled pull ended");
    assert!(
        cancelled_at.is_some(),
        "the big layer never reported progress before the reply"
    );
    let err = reply.expect_err("a cancelled pull must not succeed");
    assert_eq!(err.kind, ErrorKind::Cancelled, "{err:?}");

    assert_no_staging(&d).await;
    // "Cancelling a pull stops its downloads at their next chunk and
    // removes their partial files" (docs/image-pull.md).
    wait::until(
        Duration::from_secs(5),
        "the cancelled download's .partial file to go",
        || async { partial_files(&layers_dir(&d)).is_empty().then_some(()) },
    )
    .await;
    assert!(image_list(&mut client).await.is_empty());

    // A retry works; whatever finished before the cancel is not downloaded again.
    let before = cached(&d, &digests(&blobs));
    assert!(
        !before[1],
        "the big layer was still downloading when cancelled"
    );
    let retry = pull(&d, pull_request(&reference, None)).await;
    for (blob, was_cached) in blobs.iter().zip(&before) {
        let frames: Vec<&Progress> = retry
            .of_stage("download")
            .into_iter()
            .filter(|p| p.detail.contains(short(&blob.digest())))
            .collect();
        assert!(!frames.is_empty(), "no frame for {}", blob.digest());
        let says_cached = frames.iter().any(|p| p.detail.contains("cached"));
        assert_eq!(says_cached, *was_cached, "{}: {frames:?}", blob.digest());
    }
    let info = retry.image();
    assert_eq!(info.layers, digests(&blobs));
    assert_eq!(cached(&d, &info.layers), [true, true]);
    assert!(image_staging(&d).is_empty());
}

#[tokio::test]
async fn second_pull_under_another_name_uses_the_layer_cache() {
    let reg = TestRegistry::start();
    let blobs = busybox_layers("cache");
    let reference = push(&reg, "cache/img", "1", &blobs).await;
    let d = TestDaemon::start();

    let first = pull(&d, pull_request(&reference, Some("first"))).await;
    assert!(first
        .of_stage("download")
        .iter()
        .all(|p| !p.detail.contains("(cached)")));
    let first = first.image();

    let second = pull(&d, pull_request(&reference, Some("second"))).await;
    let downloads = second.of_stage("download");
    for blob in &blobs {
        let frame = downloads
            .iter()
            .find(|p| p.detail.contains(short(&blob.digest())))
            .unwrap_or_else(|| panic!("no frame for {}", blob.digest()));
        assert!(frame.detail.contains("cached"), "{frame:?}");
    }
    assert!(
        downloads
            .iter()
            .any(|p| p.detail.contains("0 downloaded, 3 cached")),
        "{downloads:?}"
    );
    let second = second.image();
    assert_eq!(second.layers, first.layers);
    assert_ne!(second.id, first.id);
    // Both images have complete rootfs files of their own.
    let fs = Ext4Image::new(&second.rootfs_path);
    assert_eq!(fs.list("/opt/data"), ["c.txt"]);
    assert_eq!(fs.read_string("/etc/hostname"), "second\n");
}

#[tokio::test]
async fn prune_removes_only_unreferenced_layers_and_delete_removes_the_image() {
    let reg = TestRegistry::start();
    let a = busybox_layers("a");
    let b = vec![
        a[0].clone(),
        Blob::gzip(&Layer::new().file("etc/b-only", "b\n").tar()),
    ];
    let ref_a = push(&reg, "prune/a", "1", &a).await;
    let ref_b = push(&reg, "prune/b", "1", &b).await;
    let d = TestDaemon::start();
    let img_a = pull(&d, pull_request(&ref_a, Some("a"))).await.image();
    let img_b = pull(&d, pull_request(&ref_b, Some("b"))).await.image();
    let all: Vec<String> = [digests(&a), digests(&b)[1..].to_vec()].concat();
    assert_eq!(cached(&d, &all), [true, true, true, true]);

    let mut client = d.client().await;
    // Nothing is unreferenced yet.
    match banger_tests::artifacts::ask(&mut client, Request::ImagePrune).await {
        Ok(Response::Pruned(report)) => assert_eq!(report.layers_removed, 0, "{report:?}"),
        other => panic!("ImagePrune: {other:?}"),
    }

    match banger_tests::artifacts::ask(&mut client, Request::ImageDelete { name: "a".into() }).await
    {
        Ok(Response::Deleted { name }) => assert_eq!(name, "a"),
        other => panic!("ImageDelete: {other:?}"),
    }
    let dir_a = images_dir(&d).join(&img_a.id);
    wait::until(Duration::from_secs(10), "image a's dir to go", || async {
        (!dir_a.exists()).then_some(())
    })
    .await;
    assert!(Path::new(&img_b.rootfs_path).is_file());
    assert_eq!(image_show(&mut client, "a").await, None);
    let err = banger_tests::artifacts::ask(&mut client, Request::ImageDelete { name: "a".into() })
        .await
        .expect_err("deleting twice");
    assert_eq!(
        err.daemon_error().map(|e| e.kind),
        Some(ErrorKind::NotFound),
        "{}",
        error_chain(&err)
    );

    let report = match banger_tests::artifacts::ask(&mut client, Request::ImagePrune).await {
        Ok(Response::Pruned(report)) => report,
        other => panic!("ImagePrune: {other:?}"),
    };
    assert_eq!(report.layers_removed, 2, "a's own two layers: {report:?}");
    let own_a: u64 = a[1..].iter().map(|b| b.data.len() as u64).sum();
    assert!(report.bytes_freed >= own_a, "{report:?} < {own_a}");
    // a[0] is shared with b and stays; a[1], a[2] go; b's own layer stays.
    assert_eq!(cached(&d, &all), [true, false, false, true]);
    assert_eq!(image_list(&mut client).await, vec![img_b.clone()]);

    match banger_tests::artifacts::ask(&mut client, Request::ImageDelete { name: "b".into() }).await
    {
        Ok(Response::Deleted { .. }) => {}
        other => panic!("ImageDelete b: {other:?}"),
    }
    match banger_tests::artifacts::ask(&mut client, Request::ImagePrune).await {
        Ok(Response::Pruned(report)) => assert_eq!(report.layers_removed, 2, "{report:?}"),
        other => panic!("ImagePrune: {other:?}"),
    }
    assert_eq!(cached(&d, &all), [false, false, false, false]);
}

#[tokio::test]
async fn multi_platform_index_picks_amd64_by_default_and_arm64_on_request() {
    let reg = TestRegistry::start();
    let amd = vec![Blob::gzip(
        &Layer::new().dir("etc").file("etc/arch", "amd64\n").tar(),
    )];
    let arm = vec![Blob::gzip(
        &Layer::new().dir("etc").file("etc/arch", "arm64\n").tar(),
    )];
    let amd_digest = reg
        .push_image("multi/img", "amd64", push_list(&amd), &config_json("amd64"))
        .await;
    let arm_digest = reg
        .push_image("multi/img", "arm64", push_list(&arm), &config_json("arm64"))
        .await;
    let arm64 = Platform {
        os: "linux".into(),
        architecture: "arm64".into(),
        variant: None,
    };
    reg.push_index(
        "multi/img",
        "latest",
        vec![(arm64, arm_digest), (Platform::linux_amd64(), amd_digest)],
    )
    .await;
    let reference = reg.reference("multi/img", "latest");
    let d = TestDaemon::start();

    let default = pull(&d, pull_request(&reference, None)).await.image();
    assert_eq!(default.platform.as_deref(), Some("linux/amd64"));
    assert_eq!(default.layers, digests(&amd));
    assert_eq!(
        Ext4Image::new(&default.rootfs_path).read_string("/etc/arch"),
        "amd64\n"
    );

    let mut req = pull_request(&reference, Some("img-arm"));
    req.platform = Some("linux/arm64".into());
    let arm_img = pull(&d, req).await.image();
    let platform = arm_img.platform.clone().unwrap_or_default();
    assert!(platform.starts_with("linux/arm64"), "{platform}");
    assert_eq!(arm_img.layers, digests(&arm));
    assert_eq!(
        Ext4Image::new(&arm_img.rootfs_path).read_string("/etc/arch"),
        "arm64\n"
    );

    let mut req = pull_request(&reference, Some("img-s390x"));
    req.platform = Some("linux/s390x".into());
    let err = pull(&d, req).await.error(ErrorKind::InvalidRequest);
    assert!(full_text(&err).contains("linux/s390x"), "{err:?}");
}

/// An ext4 file made with `mkfs.ext4 -d` from a tree holding `/root/hello.txt`.
fn make_ext4(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("root")).expect("mkdir");
    std::fs::create_dir_all(tree.join("etc")).expect("mkdir");
    std::fs::write(tree.join("root/hello.txt"), b"hello from register\n").expect("write");
    let out = dir.join("x.ext4");
    let made = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&out)
        .arg("64M")
        .output()
        .expect("run mkfs.ext4 (apt-get install e2fsprogs)");
    assert!(
        made.status.success(),
        "mkfs.ext4 failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    out
}

fn fingerprint(path: &Path) -> (Vec<u8>, std::time::SystemTime) {
    let meta = std::fs::metadata(path).expect("stat");
    (
        std::fs::read(path).expect("read"),
        meta.modified().expect("mtime"),
    )
}

#[tokio::test]
async fn register_adopts_an_ext4_and_promote_copies_it() {
    let d = TestDaemon::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = make_ext4(tmp.path());
    let before = fingerprint(&file);
    let (kernel, initrd, version) = boot_kernel();
    let mut client = d.client().await;

    let req = ImageRegisterRequest {
        name: "reg".into(),
        rootfs: file.display().to_string(),
        kernel: KernelSelector::Paths {
            kernel: kernel.display().to_string(),
            initrd: Some(initrd.display().to_string()),
            modules: None,
        },
    };
    let info = run(&mut client, Request::ImageRegister(req), OP_TIMEOUT)
        .await
        .image();
    assert!(!info.managed);
    assert_eq!(info.rootfs_path, file.display().to_string());
    assert_eq!(info.kernel.as_deref(), Some("reg"));
    let k = kernel_show(&mut client, "reg")
        .await
        .expect("the kernel was imported");
    assert_eq!(k.version.as_deref(), Some(version.as_str()));
    assert_eq!(k.format, "bzimage");
    let k_initrd = k.initrd_path.as_deref().expect("initrd imported");
    assert_eq!(
        std::fs::metadata(k_initrd).expect("initrd").len(),
        std::fs::metadata(&initrd).expect("initrd").len()
    );
    // The work seed holds the image's /root plus the managed key.
    let seed = Ext4Image::new(info.work_seed_path.as_deref().expect("work seed"));
    assert_eq!(seed.read_string("/hello.txt"), "hello from register\n");
    assert!(seed
        .read_string("/.ssh/authorized_keys")
        .contains(&managed_public_key(&d)));
    assert_eq!(
        fingerprint(&file),
        before,
        "register must not modify the file"
    );

    // A kernel reference that exists nowhere.
    let req = ImageRegisterRequest {
        name: "reg-nope".into(),
        rootfs: file.display().to_string(),
        kernel: KernelSelector::Ref("nope".into()),
    };
    let err = run(&mut client, Request::ImageRegister(req), OP_TIMEOUT)
        .await
        .error(ErrorKind::NotFound);
    assert!(err.message.contains("kernel catalog"), "{err:?}");
    assert_eq!(image_show(&mut client, "reg-nope").await, None);
    // A rootfs that is not ext4.
    let junk = tmp.path().join("junk.img");
    std::fs::write(&junk, vec![0u8; 4096]).expect("write");
    let req = ImageRegisterRequest {
        name: "reg-junk".into(),
        rootfs: junk.display().to_string(),
        kernel: KernelSelector::Ref("reg".into()),
    };
    let err = run(&mut client, Request::ImageRegister(req), OP_TIMEOUT)
        .await
        .error(ErrorKind::InvalidRequest);
    assert!(err.message.contains("not an ext4"), "{err:?}");

    // Promotion copies the file into managed storage.
    let promoted = run(
        &mut client,
        Request::ImagePromote { name: "reg".into() },
        OP_TIMEOUT,
    )
    .await
    .image();
    assert!(promoted.managed);
    assert_eq!(promoted.name, "reg");
    assert_eq!(promoted.kernel.as_deref(), Some("reg"));
    let copy = Path::new(&promoted.rootfs_path);
    assert!(copy.starts_with(images_dir(&d)), "{}", copy.display());
    assert_eq!(std::fs::read(copy).expect("read copy"), before.0);
    assert_eq!(
        fingerprint(&file),
        before,
        "promote must not modify the original"
    );
    assert_eq!(
        image_show(&mut client, "reg").await.as_ref(),
        Some(&promoted)
    );
    let again = run(
        &mut client,
        Request::ImagePromote { name: "reg".into() },
        OP_TIMEOUT,
    )
    .await
    .error(ErrorKind::InvalidState);
    assert!(again.message.contains("already managed"), "{again:?}");
    assert!(image_staging(&d).is_empty());

    // Deleting the managed image removes its copy but never the original.
    match banger_tests::artifacts::ask(&mut client, Request::ImageDelete { name: "reg".into() })
        .await
    {
        Ok(Response::Deleted { .. }) => {}
        other => panic!("ImageDelete: {other:?}"),
    }
    let copy = copy.to_path_buf();
    wait::until(
        Duration::from_secs(10),
        "the promoted copy to go",
        || async { (!copy.exists()).then_some(()) },
    )
    .await;
    assert_eq!(fingerprint(&file), before);
}

#[tokio::test]
async fn cli_refuses_kernel_ref_together_with_kernel_paths() {
    let d = TestDaemon::start();
    let out = d.banger([
        "image",
        "register",
        "x",
        "--rootfs",
        "/tmp/f.ext4",
        "--kernel-ref",
        "k",
        "--kernel",
        "/boot/vmlinuz",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    let mut client = d.client().await;
    assert!(image_list(&mut client).await.is_empty());
}

#[tokio::test]
async fn cli_pulls_and_lists_an_image() {
    let reg = TestRegistry::start();
    let reference = push(&reg, "cli/img", "1", &busybox_layers("cli")).await;
    let d = TestDaemon::start();
    let out = d.banger(["image", "pull", &reference, "--name", "from-cli"]);
    assert!(
        out.status.success(),
        "banger image pull failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.banger(["image", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("from-cli"));
    let mut client = d.client().await;
    let info = image_show(&mut client, "from-cli")
        .await
        .expect("pulled through the CLI");
    assert_eq!(info.layers.len(), 3);
}

#[tokio::test]
async fn catalog_lists_debian_bookworm_as_the_default() {
    let d = TestDaemon::start();
    let mut client = d.client().await;
    let entries = match banger_tests::artifacts::ask(&mut client, Request::ImageCatalog).await {
        Ok(Response::ImageCatalog(entries)) => entries,
        other => panic!("ImageCatalog: {other:?}"),
    };
    let defaults: Vec<&str> = entries
        .iter()
        .filter(|e| e.default)
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(defaults, ["debian-bookworm"]);
    let deb = entries
        .iter()
        .find(|e| e.name == "debian-bookworm")
        .expect("entry");
    assert_eq!(
        (deb.kind.as_str(), deb.source.as_str()),
        ("build", "bookworm")
    );
    assert!(!deb.present);
}
