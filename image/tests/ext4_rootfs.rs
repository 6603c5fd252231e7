//! ext4 images from unpacked trees, read back with debugfs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use banger_image::ext4::{self, Ext4Error};
use banger_image::unpack::{Compression, Limits, Unpacker};
use common::*;

const MIB: u64 = 1 << 20;

fn debugfs(img: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(img)
        .output()
        .expect("debugfs runs (apt-get install e2fsprogs)");
    assert!(out.status.success(), "debugfs {request}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stat(img: &Path, path: &str) -> String {
    let quoted = format!("\"{}\"", path.replace('"', "\"\""));
    let s = debugfs(img, &format!("stat {quoted}"));
    assert!(s.contains("Inode:"), "no inode for {path}: {s}");
    s
}

fn fsck_clean(img: &Path) {
    let out = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(img)
        .output()
        .expect("e2fsck runs");
    assert!(out.status.success(), "e2fsck: {out:?}");
}

/// Images live in their own temp dir, away from the sandbox.
struct Out(tempfile::TempDir);

impl Out {
    fn new() -> Self {
        Out(tempfile::tempdir().expect("tempdir"))
    }
    fn img(&self) -> PathBuf {
        self.0.path().join("rootfs.ext4")
    }
}

#[tokio::test]
async fn rootfs_carries_devices_setuid_and_capabilities() {
    let sb = Sandbox::new();
    let cap = [
        1u8, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let l1 = LayerBuilder::new()
        .dir("dev")
        .char_dev("dev/null", 1, 3, 0o666)
        .block_dev("dev/vda", 254, 16, 0o660)
        .fifo("run/initctl", 0o600)
        .char_dev("dev/we ird\"name", 4, 64, 0o620)
        .file_mode("usr/bin/su", "#!/bin/su", 0o4755)
        .dir_mode("var/mail", 0o2775)
        .entry(
            Entry::new(b'0', "usr/bin/ping")
                .data("ping")
                .mode(0o755)
                .xattr("security.capability", cap),
        )
        .entry(
            Entry::new(b'0', "etc/hostname")
                .data("banger\n")
                .owner(0, 0),
        )
        .entry(
            Entry::new(b'0', "home/u/f")
                .data("mine")
                .owner(1000, 1001)
                .mode(0o640),
        )
        .tar();
    let l2 = LayerBuilder::new()
        .char_dev("dev/hardlinked", 1, 5, 0o666)
        .hardlink("dev/zero2", "dev/hardlinked")
        .tar();
    let tree = sb
        .unpack(vec![
            (L1, Compression::Gzip, gzip(&l1)),
            (L2, Compression::None, l2),
        ])
        .await
        .expect("unpacks");
    let out = Out::new();
    let img = out.img();
    let stats = ext4::build_rootfs(&tree, &img, Some(64 * MIB))
        .await
        .expect("builds");
    assert_eq!(stats.size, 64 * MIB);
    assert!(stats.fixups >= 8, "{stats:?}");
    assert_eq!(std::fs::metadata(&img).expect("image").len(), 64 * MIB);

    let null = stat(&img, "/dev/null");
    assert!(null.contains("Type: character special"), "{null}");
    assert!(null.contains("Mode:  0666"), "{null}");
    assert!(null.contains("major/minor number: 01:03"), "{null}");
    let vda = stat(&img, "/dev/vda");
    assert!(vda.contains("Type: block special"), "{vda}");
    assert!(vda.contains("Mode:  0660"), "{vda}");
    assert!(vda.contains("major/minor number: 254:16"), "{vda}");
    let fifo = stat(&img, "/run/initctl");
    assert!(fifo.contains("Type: FIFO"), "{fifo}");
    let weird = stat(&img, "/dev/we ird\"name");
    assert!(weird.contains("Type: character special"), "{weird}");
    for p in ["/dev/hardlinked", "/dev/zero2"] {
        let s = stat(&img, p);
        assert!(s.contains("major/minor number: 01:05"), "{p}: {s}");
    }
    let su = stat(&img, "/usr/bin/su");
    assert!(su.contains("Type: regular"), "{su}");
    assert!(su.contains("Mode:  04755"), "{su}");
    let mail = stat(&img, "/var/mail");
    assert!(mail.contains("Mode:  02775"), "{mail}");
    let ping = debugfs(&img, "ea_list /usr/bin/ping");
    assert!(ping.contains("security.capability (20)"), "{ping}");
    let home = stat(&img, "/home/u/f");
    assert!(home.contains("User:  1000   Group:  1001"), "{home}");
    assert_eq!(debugfs(&img, "cat /etc/hostname"), "banger\n");
    // Nothing of that exists on the host.
    for n in sb.tree().values() {
        assert!(matches!(n.kind, 'f' | 'd'), "{n:?}");
        assert_eq!(n.mode & 0o6000, 0, "{n:?}");
    }
    fsck_clean(&img);
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn deferred_owners_and_modes_land_in_the_image() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new()
        .dir_mode("./", 0o750)
        .entry(Entry::new(b'5', "srv").mode(0o711).owner(33, 33))
        .entry(
            Entry::new(b'0', "srv/data")
                .data("d")
                .owner(123_456, 70_000)
                .mode(0o600),
        )
        .entry(Entry::new(b'2', "srv/link").link("data").owner(5, 6))
        .tar();
    let mut u = Unpacker::new(&sb.root, Limits::default())
        .expect("unpacker")
        .defer_ownership(true);
    u.apply_layer(L1, Compression::None, std::io::Cursor::new(l1))
        .await
        .expect("applies");
    let tree = u.finish();
    let out = Out::new();
    let img = out.img();
    ext4::build_rootfs(&tree, &img, None).await.expect("builds");
    assert_eq!(
        std::fs::metadata(&img).expect("image").len(),
        ext4::default_size(0),
        "small trees get the 1 GiB default"
    );
    let data = stat(&img, "/srv/data");
    assert!(data.contains("User: 123456   Group: 70000"), "{data}");
    assert!(data.contains("Mode:  0600"), "{data}");
    let srv = stat(&img, "/srv");
    assert!(srv.contains("User:    33   Group:    33"), "{srv}");
    assert!(srv.contains("Mode:  0711"), "{srv}");
    let link = stat(&img, "/srv/link");
    assert!(link.contains("Type: symlink"), "{link}");
    assert!(link.contains("User:     5   Group:     6"), "{link}");
    let root = stat(&img, "/");
    assert!(root.contains("Mode:  0750"), "{root}");
    fsck_clean(&img);
}

#[tokio::test]
async fn too_small_is_reported_before_mkfs_with_a_size_that_works() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new()
        .file("big", vec![0xabu8; 40 * MIB as usize])
        .tar();
    let tree = sb
        .unpack(vec![(L1, Compression::None, l1)])
        .await
        .expect("unpacks");
    let out = Out::new();
    let img = out.img();
    let err = ext4::build_rootfs(&tree, &img, Some(24 * MIB))
        .await
        .expect_err("too small");
    let needed = match &err {
        Ext4Error::TooSmall {
            size,
            tree_bytes,
            needed,
            hint,
        } => {
            assert_eq!(*size, 24 * MIB);
            assert!(*tree_bytes >= 40 * MIB, "{tree_bytes}");
            assert!(*needed > *tree_bytes);
            assert!(hint.contains(&needed.to_string()), "{hint}");
            *needed
        }
        other => panic!("unexpected {other:?}"),
    };
    assert!(err.to_string().contains("too small"), "{err}");
    assert!(!img.exists(), "no image file is left behind");
    let stats = ext4::build_rootfs(&tree, &img, Some(needed))
        .await
        .expect("the suggested size works");
    assert_eq!(stats.size, needed);
    let big = stat(&img, "/big");
    assert!(big.contains("Size: 41943040"), "{big}");
    fsck_clean(&img);
}

#[tokio::test]
async fn mkfs_running_out_of_space_is_too_small_too() {
    // Large xattrs need a block each, which the estimate does not count:
    // the pre-check passes and mkfs itself runs out of blocks.
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).expect("mkdir");
    for i in 0..3000 {
        let p = tree.join(format!("f{i:04}"));
        std::fs::write(&p, b"").expect("write");
        let value = format!("{i:04}").repeat(750);
        rustix::fs::setxattr(
            &p,
            "user.big",
            value.as_bytes(),
            rustix::fs::XattrFlags::empty(),
        )
        .expect("setxattr (host fs needs user xattrs)");
    }
    let usage = ext4::measure_tree(&tree).expect("measure");
    let size = ext4::required_size(&usage);
    let img = dir.path().join("img");
    let err = ext4::build_from_dir(&tree, &img, size, "t")
        .await
        .expect_err("mkfs runs out of blocks");
    match &err {
        Ext4Error::TooSmall {
            size: s,
            needed,
            hint,
            ..
        } => {
            assert_eq!(*s, size);
            assert!(*needed > size);
            assert!(
                hint.contains("Could not allocate"),
                "mkfs stderr is carried: {hint}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!img.exists());
}

#[tokio::test]
async fn build_from_dir_labels_the_image_and_checks_the_label() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = dir.path().join("seed");
    std::fs::create_dir_all(seed.join("home")).expect("mkdir");
    std::fs::write(seed.join("home/readme"), "work disk").expect("write");
    let img = dir.path().join("work.ext4");
    ext4::build_from_dir(&seed, &img, 64 * MIB, "banger-work")
        .await
        .expect("builds");
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&img)
        .output()
        .expect("dumpe2fs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Filesystem volume name:   banger-work"),
        "{text}"
    );
    assert_eq!(debugfs(&img, "cat /home/readme"), "work disk");
    let err = ext4::build_from_dir(&seed, &img, 64 * MIB, "a-label-that-is-too-long")
        .await
        .expect_err("label");
    assert!(matches!(err, Ext4Error::Label { .. }), "{err:?}");
}

#[tokio::test]
async fn names_that_cannot_be_scripted_are_refused() {
    // A device whose name would inject a debugfs command.
    let sb = Sandbox::new();
    let loot = sb.dir.path().join("loot");
    let name = format!("dev/x\ndump /etc/passwd {}", loot.display());
    let l1 = LayerBuilder::new().char_dev(&name, 1, 3, 0o666).tar();
    let tree = sb
        .unpack(vec![(L1, Compression::None, l1)])
        .await
        .expect("the tree itself is fine");
    let out = Out::new();
    let img = out.img();
    let err = ext4::build_rootfs(&tree, &img, Some(32 * MIB))
        .await
        .expect_err("unscriptable");
    assert!(matches!(err, Ext4Error::Unscriptable { .. }), "{err:?}");
    assert!(!loot.exists(), "debugfs never ran the injected command");
    assert!(!img.exists());
}

#[tokio::test]
async fn incomplete_trees_are_refused() {
    let sb = Sandbox::new();
    let mut u = sb.unpacker(Limits::default());
    let bad = LayerBuilder::new().file("../x", "x").tar();
    u.apply_layer(L1, Compression::None, std::io::Cursor::new(bad))
        .await
        .expect_err("refused");
    let tree = u.finish();
    let err = ext4::build_rootfs(&tree, &Out::new().img(), None)
        .await
        .expect_err("incomplete");
    assert!(matches!(err, Ext4Error::IncompleteTree { .. }), "{err:?}");
}

#[test]
fn default_size_is_a_quarter_more_than_the_tree_and_at_least_a_gib() {
    assert_eq!(ext4::default_size(10 * MIB), 1024 * MIB);
    assert_eq!(ext4::default_size(4096 * MIB), 5120 * MIB);
    assert_eq!(ext4::default_size(4096 * MIB + 1) % MIB, 0);
}
