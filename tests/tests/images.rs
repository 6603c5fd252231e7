//! Images end to end: a real `bangerd` pulls hand-made images from a real
//! registry (`docker-registry` on 127.0.0.1), registers and promotes ext4
//! files, deletes and prunes. The built rootfs is read back with debugfs.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_image::cache::{sha256_digest, LayerCache};
use banger_image::registry::{default_image_name, parse_reference, Platform};
use banger_image::testing::{random_bytes, TestRegistry};
use banger_image::treecache::TreeCache;
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

/// `<layers>/trees`, the tree cache.
fn trees_dir(d: &TestDaemon) -> PathBuf {
    layers_dir(d).join("trees")
}

/// Keys of the committed tree cache entries.
fn tree_keys(d: &TestDaemon) -> Vec<String> {
    if !trees_dir(d).is_dir() {
        return Vec::new();
    }
    TreeCache::open(trees_dir(d))
        .expect("open the tree cache")
        .keys()
}

/// Unfinished (`.tmp`) and discarded (`.trash`) trees in the tree cache.
fn tree_leftovers(d: &TestDaemon) -> Vec<String> {
    let mut out = entries_with_suffix(&trees_dir(d), ".tmp");
    out.extend(entries_with_suffix(&trees_dir(d), ".trash"));
    out
}

/// Waits until the tree cache holds no `.tmp` or `.trash` dir (a pull
/// removes its tree in the background).
async fn assert_no_tree_leftovers(d: &TestDaemon) {
    wait::until(
        Duration::from_secs(20),
        "tree cache leftovers to go",
        || async { tree_leftovers(d).is_empty().then_some(()) },
    )
    .await;
}

/// The `extract` stage's last detail.
fn extract_summary(outcome: &Outcome) -> String {
    outcome
        .of_stage("extract")
        .last()
        .map(|p| p.detail.clone())
        .unwrap_or_default()
}

/// Whether the pull unpacked layers (rather than linking a cached tree).
fn unpacked_layers(outcome: &Outcome) -> bool {
    outcome
        .of_stage("extract")
        .iter()
        .any(|p| p.detail.starts_with("layer "))
}

/// Every entry under `root` on the host: type and mode, owner, and for
/// non-directories size, mtime and a hash of the content (files) or the
/// target (symlinks).
fn host_tree(root: &Path) -> BTreeMap<String, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            let m = std::fs::symlink_metadata(&path).expect("lstat");
            let what = if m.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if m.file_type().is_symlink() {
                std::fs::read_link(&path)
                    .expect("readlink")
                    .display()
                    .to_string()
            } else {
                sha256_digest(&std::fs::read(&path).expect("read"))
            };
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            // Not a directory's size or times: they depend on how it was made.
            let (size, time) = if m.is_dir() {
                (0, String::new())
            } else {
                (m.len(), format!("{}.{}", m.mtime(), m.mtime_nsec()))
            };
            out.insert(
                rel,
                format!(
                    "{:o} {}:{} {size} {time} {what}",
                    m.mode(),
                    m.uid(),
                    m.gid()
                ),
            );
        }
    }
    out
}

fn debugfs(image: &str, request: &str) -> String {
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .expect("run debugfs (apt-get install e2fsprogs)");
    assert!(out.status.success(), "debugfs -R {request:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every path of an ext4 image: full mode, owner, size, content hash
/// (files), target (symlinks), device numbers (nodes) and which paths
/// share an inode. Not times: banger's injection writes new files.
fn image_tree(image: &str) -> BTreeMap<String, String> {
    let fs = Ext4Image::new(image);
    let mut inodes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    let mut stack = vec!["/".to_string()];
    while let Some(dir) = stack.pop() {
        // Lines look like `/inode/mode/uid/gid/name/size/`.
        for line in debugfs(image, &format!("ls -p \"{dir}\"")).lines() {
            let f: Vec<&str> = line.split('/').collect();
            if f.len() < 7 || f[5] == "." || f[5] == ".." || f[5].is_empty() {
                continue;
            }
            let (ino, mode, uid, gid, name, size) = (f[1], f[2], f[3], f[4], f[5], f[6]);
            let path = format!("{}/{name}", dir.trim_end_matches('/'));
            let mode = u32::from_str_radix(mode, 8).expect("octal mode");
            let what = match mode & 0o170000 {
                0o040000 => {
                    if path != "/lost+found" {
                        stack.push(path.clone());
                    }
                    String::new()
                }
                0o100000 => sha256_digest(&fs.read(&path)),
                0o120000 => fs.stat(&path).and_then(|s| s.link).unwrap_or_default(),
                _ => debugfs(image, &format!("stat \"{path}\""))
                    .lines()
                    .find(|l| l.contains("Device major/minor"))
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            };
            if mode & 0o170000 != 0o040000 {
                inodes
                    .entry(ino.to_string())
                    .or_default()
                    .push(path.clone());
            }
            out.insert(path, format!("{mode:o} {uid}:{gid} {size} {what}"));
        }
    }
    for paths in inodes.values().filter(|p| p.len() > 1) {
        for p in paths {
            let v = out.get_mut(p).expect("listed");
            v.push_str(&format!(" links {paths:?}"));
        }
    }
    out
}

/// What [`special_layer`] puts where banger's injection writes, so a warm
/// pull's injection replaces files that are linked from the tree cache.
const IMAGE_HOSTNAME: &str = "from-the-image\n";
const IMAGE_KEYS: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIImageOwnKey someone@image\n";
const IMAGE_AGENT: &str = "#!/bin/sh\necho not banger's agent\n";

/// A layer with what needs fixups inside the image (a setuid file, a
/// device node), a hardlink to a file of a lower layer, and files where
/// banger's injection writes (hostname, authorized_keys, the agent).
fn special_layer() -> Blob {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |kind: tar::EntryType, path: &str, link: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_path(path).expect("path");
        if !link.is_empty() {
            h.set_link_name(link).expect("link");
        }
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_device_major(if kind == tar::EntryType::Char { 1 } else { 0 })
            .expect("major");
        h.set_device_minor(if kind == tar::EntryType::Char { 3 } else { 0 })
            .expect("minor");
        h.set_cksum();
        tar.append(&h, data).expect("append");
    };
    add(tar::EntryType::Directory, "usr/sbin", "", b"", 0o755);
    add(
        tar::EntryType::Regular,
        "usr/sbin/su",
        "",
        b"#!/bin/sh\nexec sh\n",
        0o4755,
    );
    add(tar::EntryType::Directory, "dev", "", b"", 0o755);
    add(tar::EntryType::Char, "dev/null", "", b"", 0o666);
    add(
        tar::EntryType::Link,
        "usr/bin/hello2",
        "usr/bin/hello",
        b"",
        0o755,
    );
    add(
        tar::EntryType::Regular,
        "etc/hostname",
        "",
        IMAGE_HOSTNAME.as_bytes(),
        0o644,
    );
    add(tar::EntryType::Directory, "root/.ssh", "", b"", 0o755);
    add(
        tar::EntryType::Regular,
        "root/.ssh/authorized_keys",
        "",
        IMAGE_KEYS.as_bytes(),
        0o644,
    );
    for dir in ["usr/local", "usr/local/bin"] {
        add(tar::EntryType::Directory, dir, "", b"", 0o755);
    }
    add(
        tar::EntryType::Regular,
        "usr/local/bin/banger-agent",
        "",
        IMAGE_AGENT.as_bytes(),
        0o755,
    );
    Blob::gzip(&tar.into_inner().expect("tar"))
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
    // Only the layer cache and the key may exist; no image dir at all, no
    // tree in the tree cache.
    assert!(entries_with_suffix(&images_dir(&d), "").is_empty());
    assert_no_tree_leftovers(&d).await;
    assert!(tree_keys(&d).is_empty(), "{:?}", tree_keys(&d));
    for escaped in [layers_dir(&d).join("escape"), trees_dir(&d).join("escape")] {
        assert!(!escaped.exists(), "{} was created", escaped.display());
    }
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
async fn warm_pull_builds_from_the_cached_tree_and_makes_the_same_rootfs() {
    let reg = TestRegistry::start();
    let mut blobs = busybox_layers("warm");
    blobs.push(special_layer());
    let reference = push(&reg, "warm/img", "1", &blobs).await;
    let d = TestDaemon::start();

    // Cold: the layers are unpacked into a new tree cache entry.
    let cold = pull(&d, pull_request(&reference, Some("img"))).await;
    if let Err(e) = &cold.result {
        panic!("cold pull: {}", error_chain(e));
    }
    assert!(unpacked_layers(&cold), "{:?}", cold.of_stage("extract"));
    let summary = extract_summary(&cold);
    assert!(summary.contains("tree cached for later pulls"), "{summary}");
    let cold = cold.image();
    let keys = tree_keys(&d);
    assert_eq!(keys.len(), 1, "one entry for one layer chain: {keys:?}");
    let entry = trees_dir(&d).join(&keys[0]);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(entry.join("meta.json")).expect("meta.json"))
            .expect("meta.json is JSON");
    let layers: Vec<&str> = meta["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest"))
        .collect();
    assert_eq!(layers, digests(&blobs));
    let cached_tree = host_tree(&entry.join("tree"));
    assert!(
        cached_tree.contains_key("usr/sbin/su") && cached_tree.contains_key("etc/motd"),
        "{cached_tree:?}"
    );
    // banger's injections went into the pull's farm, not into the cache:
    // the files it replaced are the image's own there.
    for (path, content) in [
        ("etc/hostname", IMAGE_HOSTNAME),
        ("root/.ssh/authorized_keys", IMAGE_KEYS),
        ("usr/local/bin/banger-agent", IMAGE_AGENT),
    ] {
        let want = sha256_digest(content.as_bytes());
        assert!(
            cached_tree[path].ends_with(&format!(" {want}")),
            "{path}: {}",
            cached_tree[path]
        );
    }
    assert!(!cached_tree.contains_key("etc/banger/image.json"));
    let cold_tree = image_tree(&cold.rootfs_path);
    assert_eq!(cold_tree["/usr/sbin/su"].split(' ').next(), Some("104755"));
    assert!(
        cold_tree["/dev/null"].starts_with("20666 ") && cold_tree["/dev/null"].contains("01:03"),
        "{}",
        cold_tree["/dev/null"]
    );
    assert!(
        cold_tree["/usr/bin/hello2"].contains("links"),
        "{}",
        cold_tree["/usr/bin/hello2"]
    );
    // ... while the rootfs has banger's versions.
    let fs = Ext4Image::new(&cold.rootfs_path);
    assert_eq!(fs.read_string("/etc/hostname"), "img\n");
    let keys_file = fs.read_string("/root/.ssh/authorized_keys");
    assert!(keys_file.starts_with(IMAGE_KEYS), "{keys_file}");
    assert!(keys_file.contains(&managed_public_key(&d)), "{keys_file}");
    assert!(
        cold_tree["/root/.ssh/authorized_keys"].starts_with("100600 0:0 "),
        "{}",
        cold_tree["/root/.ssh/authorized_keys"]
    );
    assert_no_tree_leftovers(&d).await;

    // Warm, under the same name: nothing is unpacked or linked, the image
    // is built from the cached tree itself.
    let mut client = d.client().await;
    match banger_tests::artifacts::ask(&mut client, Request::ImageDelete { name: "img".into() })
        .await
    {
        Ok(Response::Deleted { .. }) => {}
        other => panic!("ImageDelete: {other:?}"),
    }
    let warm = pull(&d, pull_request(&reference, Some("img"))).await;
    assert_eq!(
        warm.stages(),
        ["resolve", "download", "extract", "inject", "build", "publish"]
    );
    assert!(!unpacked_layers(&warm), "{:?}", warm.of_stage("extract"));
    let summary = extract_summary(&warm);
    assert!(summary.contains("from the tree cache"), "{summary}");
    assert!(
        warm.of_stage("extract").iter().any(|p| p
            .detail
            .contains(&format!("building from the cached tree {}", &keys[0][..12]))),
        "{:?}",
        warm.of_stage("extract")
    );
    let warm = warm.image();
    assert_ne!(warm.id, cold.id);
    // The same rootfs, fixups included, as the cold pull made.
    assert_eq!(image_tree(&warm.rootfs_path), cold_tree);
    let seed = Ext4Image::new(warm.work_seed_path.as_deref().expect("a work seed"));
    assert!(seed
        .read_string("/.ssh/authorized_keys")
        .contains(&managed_public_key(&d)));
    // The entry is untouched, and still the only one.
    assert_eq!(tree_keys(&d), keys);
    assert_eq!(host_tree(&entry.join("tree")), cached_tree);
    assert_no_tree_leftovers(&d).await;
    assert!(image_staging(&d).is_empty());

    // Another name reuses it too, and gets its own hostname.
    let other = pull(&d, pull_request(&reference, Some("other"))).await;
    assert!(!unpacked_layers(&other));
    let other = other.image();
    let fs = Ext4Image::new(&other.rootfs_path);
    assert_eq!(fs.read_string("/etc/hostname"), "other\n");
    assert_eq!(fs.read_string("/etc/motd"), "welcome to warm\n");
    assert_eq!(host_tree(&entry.join("tree")), cached_tree);
}

#[tokio::test]
async fn interrupted_or_damaged_cached_trees_are_never_trusted() {
    let reg = TestRegistry::start();
    let mut d = TestDaemon::start();

    // A build that fails on a hostile layer leaves no entry and no tmp dir.
    let good = Blob::tar(
        Layer::new()
            .dir("etc")
            .file("etc/passwd", "root:x:0:0::/root:/bin/sh\n")
            .tar(),
    );
    let hostile = Blob::gzip(&Layer::new().file("../../escape", "pwned").tar());
    let reference = push(&reg, "trees/hostile", "1", &[good, hostile]).await;
    pull(&d, pull_request(&reference, None))
        .await
        .error(ErrorKind::InvalidRequest);
    assert_no_tree_leftovers(&d).await;
    assert!(tree_keys(&d).is_empty(), "{:?}", tree_keys(&d));
    for escaped in [trees_dir(&d).join("escape"), layers_dir(&d).join("escape")] {
        assert!(!escaped.exists(), "{} was created", escaped.display());
    }

    // A build cancelled while it unpacks leaves nothing either, and the
    // next pull unpacks again.
    let mut many = Layer::new().dir("many");
    for i in 0..6000 {
        many = many.file(&format!("many/f{i:05}"), format!("{i}\n"));
    }
    let blobs = vec![
        Blob::tar(Layer::new().dir("etc").file("etc/a", "a\n").tar()),
        Blob::tar(many.tar()),
    ];
    let reference = push(&reg, "trees/many", "1", &blobs).await;
    let mut client = d.client().await;
    let id = client
        .send(Request::ImagePull(pull_request(&reference, None)))
        .await
        .expect("send pull");
    let mut cancelled = false;
    let reply = tokio::time::timeout(OP_TIMEOUT, async {
        loop {
            match client.next_message().await.expect("read frame") {
                ServerMessage::Progress { id: pid, progress } if pid == id => {
                    if progress.stage == "extract"
                        && progress.detail.starts_with("layer 2/2")
                        && !cancelled
                    {
                        client.cancel(id).await.expect("send cancel");
                        cancelled = true;
                    }
                }
                ServerMessage::Reply { id: rid, result } if rid == id => break result,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    })
    .await
    .expect("the cancelled pull ended");
    assert!(cancelled, "the pull never reached its second layer");
    let err = reply.expect_err("the pull was cancelled while unpacking 6000 files");
    assert_eq!(err.kind, ErrorKind::Cancelled, "{err:?}");
    assert_no_staging(&d).await;
    assert_no_tree_leftovers(&d).await;
    assert!(tree_keys(&d).is_empty(), "{:?}", tree_keys(&d));
    let retry = pull(&d, pull_request(&reference, None)).await;
    assert!(unpacked_layers(&retry));
    assert!(extract_summary(&retry).contains("tree cached"));
    let img = retry.image();
    assert_eq!(Ext4Image::new(&img.rootfs_path).list("/many").len(), 6000);
    assert_eq!(tree_keys(&d).len(), 1);

    // Damaged entries: each is detected, not used, and rebuilt.
    let reference = push(&reg, "trees/dmg", "1", &busybox_layers("dmg")).await;
    pull(&d, pull_request(&reference, Some("dmg-0")))
        .await
        .image();
    let key = tree_keys(&d)
        .into_iter()
        .find(|k| {
            std::fs::read_to_string(trees_dir(&d).join(k).join("meta.json"))
                .is_ok_and(|m| m.contains(&busybox_layers("dmg")[1].digest()))
        })
        .expect("the busybox entry");
    let entry = trees_dir(&d).join(&key);
    let pristine = host_tree(&entry.join("tree"));
    let damages: Vec<(&str, Box<dyn Fn(&Path)>)> = vec![
        (
            "meta.json removed (a commit cut short)",
            Box::new(|e: &Path| std::fs::remove_file(e.join("meta.json")).expect("rm meta")),
        ),
        (
            "a file removed (a partial tree)",
            Box::new(|e: &Path| std::fs::remove_file(e.join("tree/etc/motd")).expect("rm motd")),
        ),
        (
            "a file rewritten in place",
            Box::new(|e: &Path| {
                let path = e.join("tree/etc/passwd");
                let len = std::fs::metadata(&path).expect("passwd").len() as usize;
                std::fs::write(&path, "x".repeat(len)).expect("rewrite passwd");
            }),
        ),
    ];
    for (i, (what, damage)) in damages.iter().enumerate() {
        damage(&entry);
        let name = format!("dmg-{}", i + 1);
        let outcome = pull(&d, pull_request(&reference, Some(&name))).await;
        let frames: Vec<String> = outcome
            .of_stage("extract")
            .iter()
            .map(|p| p.detail.clone())
            .collect();
        assert!(
            frames
                .iter()
                .any(|f| f.contains("is damaged") || f.contains("is not trusted")),
            "{what}: {frames:?}"
        );
        assert!(unpacked_layers(&outcome), "{what}: {frames:?}");
        let fs = Ext4Image::new(outcome.image().rootfs_path);
        assert_eq!(fs.read_string("/etc/motd"), "welcome to dmg\n", "{what}");
        assert_eq!(
            fs.read_string("/etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\n",
            "{what}"
        );
        assert_eq!(host_tree(&entry.join("tree")), pristine, "{what}: rebuilt");
        assert_no_tree_leftovers(&d).await;
    }

    // Leftovers of a build whose process died are pruned; those of a live
    // process are kept until the daemon starts again. Foreign files stay.
    let dead = trees_dir(&d).join(format!("{key}.99999999-0-0.tmp"));
    let live = trees_dir(&d).join(format!("{key}.{}-0-0.tmp", std::process::id()));
    for dir in [&dead, &live] {
        std::fs::create_dir_all(dir.join("tree/etc")).expect("mkdir");
        std::fs::write(dir.join("tree/etc/motd"), "half\n").expect("write");
    }
    std::fs::write(trees_dir(&d).join("notes"), "mine\n").expect("write");
    match banger_tests::artifacts::ask(&mut client, Request::ImagePrune).await {
        // The hostile image's two layers; every other layer is in use.
        Ok(Response::Pruned(report)) => assert_eq!(report.layers_removed, 2, "{report:?}"),
        other => panic!("ImagePrune: {other:?}"),
    }
    assert!(!dead.exists(), "a dead build's tree survived prune");
    assert!(live.exists(), "prune removed a live build's tree");
    let reused = pull(&d, pull_request(&reference, Some("dmg-next"))).await;
    assert!(
        !unpacked_layers(&reused),
        "{:?}",
        reused.of_stage("extract")
    );
    drop(client);
    d.sigkill();
    d.restart();
    assert!(!live.exists(), "start-up left an unfinished tree");
    assert!(trees_dir(&d).join("notes").exists());
    assert_eq!(host_tree(&entry.join("tree")), pristine);
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
    // One cached tree per layer chain.
    let tree_of = |d: &TestDaemon, blobs: &[Blob]| -> Option<String> {
        let want = digests(blobs);
        tree_keys(d).into_iter().find(|k| {
            let meta: serde_json::Value = serde_json::from_slice(
                &std::fs::read(trees_dir(d).join(k).join("meta.json")).expect("meta.json"),
            )
            .expect("JSON");
            let layers: Vec<String> = meta["layers"]
                .as_array()
                .expect("layers")
                .iter()
                .map(|l| l["digest"].as_str().expect("digest").to_string())
                .collect();
            layers == want
        })
    };
    assert_eq!(tree_keys(&d).len(), 2, "{:?}", tree_keys(&d));
    let (tree_a, tree_b) = (
        tree_of(&d, &a).expect("a's tree"),
        tree_of(&d, &b).expect("b's tree"),
    );

    let mut client = d.client().await;
    // Nothing is unreferenced yet.
    match banger_tests::artifacts::ask(&mut client, Request::ImagePrune).await {
        Ok(Response::Pruned(report)) => assert_eq!(report.layers_removed, 0, "{report:?}"),
        other => panic!("ImagePrune: {other:?}"),
    }
    assert_eq!(tree_keys(&d), {
        let mut both = vec![tree_a.clone(), tree_b.clone()];
        both.sort();
        both
    });

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
    // a's tree went with a's layers (its bytes are in the report); b's stays.
    assert_eq!(tree_keys(&d), [tree_b.clone()]);
    assert!(!trees_dir(&d).join(&tree_a).exists());
    assert!(tree_leftovers(&d).is_empty(), "{:?}", tree_leftovers(&d));
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
    assert!(tree_keys(&d).is_empty(), "{:?}", tree_keys(&d));
    assert!(tree_leftovers(&d).is_empty(), "{:?}", tree_leftovers(&d));
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
