//! Ordinary layer semantics: order, whiteouts, opaque directories,
//! compression, metadata.

mod common;

use std::os::unix::fs::MetadataExt;

use banger_image::unpack::{Compression, Limits, NodeKind, UnpackError, Unpacker};
use common::*;

fn read(sb: &Sandbox, p: &str) -> Vec<u8> {
    std::fs::read(sb.root.join(p)).unwrap_or_default()
}

#[tokio::test]
async fn later_layers_override_and_whiteouts_delete() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new()
        .dir("etc")
        .file("etc/hostname", "one")
        .file("etc/motd", "hello")
        .dir("var/cache")
        .file("var/cache/a", "a")
        .file("var/cache/b", "b")
        .tar();
    let l2 = LayerBuilder::new()
        .file("etc/hostname", "two")
        .whiteout("etc/motd")
        .whiteout("var/cache")
        .whiteout("does/not/exist")
        .tar();
    let tree = sb
        .unpack(vec![
            (L1, Compression::None, l1),
            (L2, Compression::None, l2),
        ])
        .await
        .expect("unpacks");
    assert_eq!(read(&sb, "etc/hostname"), b"two");
    assert!(!sb.root.join("etc/motd").exists());
    assert!(!sb.root.join("var/cache").exists());
    assert!(sb.root.join("var").is_dir());
    assert!(!sb.root.join("does").exists(), "whiteouts create nothing");
    assert!(
        !paths(&sb.tree()).iter().any(|p| p.contains(".wh.")),
        "whiteout markers are never materialised"
    );
    assert_eq!(tree.layers.len(), 2);
    assert_eq!(tree.layers[1].whiteouts, 3);
    assert!(tree.complete);
}

#[tokio::test]
async fn whiteout_in_the_same_layer_does_not_hide_its_own_entry() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new().file("f", "lower").tar();
    // Entry first, whiteout after: the entry stays (whiteouts hide lower
    // layers only). Whiteout first, entry after: the lower file is replaced.
    let l2 = LayerBuilder::new()
        .file("f", "upper")
        .whiteout("f")
        .whiteout("g")
        .file("g", "new g")
        .tar();
    sb.unpack(vec![
        (L1, Compression::None, l1),
        (L2, Compression::None, l2),
    ])
    .await
    .expect("unpacks");
    assert_eq!(read(&sb, "f"), b"upper");
    assert_eq!(read(&sb, "g"), b"new g");
}

#[tokio::test]
async fn opaque_marker_before_siblings() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new()
        .dir("a")
        .file("a/old", "old")
        .dir("a/sub")
        .file("a/sub/deep", "deep")
        .file("keep", "k")
        .tar();
    let l2 = LayerBuilder::new()
        .dir("a")
        .opaque("a")
        .file("a/new", "new")
        .tar();
    sb.unpack(vec![
        (L1, Compression::None, l1),
        (L2, Compression::None, l2),
    ])
    .await
    .expect("unpacks");
    let t = sb.tree();
    assert_eq!(paths(&t), vec!["a", "a/new", "keep"]);
}

#[tokio::test]
async fn opaque_marker_after_its_siblings_keeps_them() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new()
        .dir("a")
        .file("a/old", "old")
        .dir("a/sub")
        .file("a/sub/lower", "lower")
        .file("a/sub/both", "lower both")
        .tar();
    // The marker comes last: a/new, a/sub and a/sub/both are this layer's
    // and stay; everything a had from below goes, also inside a/sub.
    let l2 = LayerBuilder::new()
        .dir("a")
        .file("a/new", "new")
        .dir("a/sub")
        .file("a/sub/both", "upper both")
        .file("a/implicit/x", "implied parent")
        .opaque("a")
        .tar();
    sb.unpack(vec![
        (L1, Compression::None, l1),
        (L2, Compression::None, l2),
    ])
    .await
    .expect("unpacks");
    let t = sb.tree();
    assert_eq!(
        paths(&t),
        vec![
            "a",
            "a/implicit",
            "a/implicit/x",
            "a/new",
            "a/sub",
            "a/sub/both"
        ]
    );
    assert_eq!(read(&sb, "a/sub/both"), b"upper both");
}

#[tokio::test]
async fn opaque_directory_that_did_not_exist_is_created() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new().opaque("fresh").tar();
    sb.unpack(vec![(L1, Compression::None, l1)])
        .await
        .expect("unpacks");
    assert!(sb.root.join("fresh").is_dir());
}

#[tokio::test]
async fn gzip_zstd_plain_and_detected_layers() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new().file("gz", "g").tar();
    let l2 = LayerBuilder::new().file("zs", "z").tar();
    let l3 = LayerBuilder::new().file("plain", "p").tar();
    let detect_gz = LayerBuilder::new().file("dgz", "dg").tar();
    let detect_zst = LayerBuilder::new().file("dzs", "dz").tar();
    let detect_plain = LayerBuilder::new().file("dplain", "dp").tar();
    let mut u = sb.unpacker(Limits::default());
    let blobs = [
        (L1, Compression::Gzip, gzip(&l1), Compression::Gzip),
        (L2, Compression::Zstd, zstd(&l2), Compression::Zstd),
        (L3, Compression::None, l3, Compression::None),
        (
            "sha256:d1",
            Compression::Detect,
            gzip(&detect_gz),
            Compression::Gzip,
        ),
        (
            "sha256:d2",
            Compression::Detect,
            zstd(&detect_zst),
            Compression::Zstd,
        ),
        (
            "sha256:d3",
            Compression::Detect,
            detect_plain,
            Compression::None,
        ),
    ];
    for (digest, c, blob, resolved) in blobs {
        let stats = u
            .apply_layer(digest, c, std::io::Cursor::new(blob))
            .await
            .expect("layer applies");
        assert_eq!(stats.compression, resolved, "{digest}");
        assert_eq!(stats.entries, 1);
    }
    for (p, c) in [
        ("gz", "g"),
        ("zs", "z"),
        ("plain", "p"),
        ("dgz", "dg"),
        ("dzs", "dz"),
        ("dplain", "dp"),
    ] {
        assert_eq!(read(&sb, p), c.as_bytes(), "{p}");
    }
}

#[tokio::test]
async fn concatenated_gzip_members_are_one_layer() {
    let sb = Sandbox::new();
    let tar = LayerBuilder::new()
        .file("a", "first half")
        .file("b", "second half")
        .tar();
    let (x, y) = tar.split_at(1024);
    let mut blob = gzip(x);
    blob.extend(gzip(y));
    sb.unpack(vec![(L1, Compression::Gzip, blob)])
        .await
        .expect("unpacks");
    assert_eq!(read(&sb, "b"), b"second half");
}

#[tokio::test]
async fn owners_modes_mtimes_links_and_xattrs() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new()
        .entry(
            Entry::new(b'5', "home/alice")
                .mode(0o750)
                .owner(1000, 1000)
                .mtime(1_500_000_000),
        )
        .entry(
            Entry::new(b'0', "home/alice/notes")
                .data("hi")
                .mode(0o600)
                .owner(1000, 100)
                .mtime(1_400_000_000)
                .xattr("user.comment", "from a layer"),
        )
        .hardlink("home/alice/notes2", "home/alice/notes")
        .symlink("home/alice/link", "notes")
        .entry(
            Entry::new(b'0', "usr/bin/ping")
                .data("ping")
                .mode(0o755)
                .xattr(
                    "security.capability",
                    [
                        1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    ],
                ),
        )
        .entry(
            Entry::new(b'0', "pax-time")
                .data("t")
                .pax("mtime", "1234567890.25"),
        )
        .tar();
    let tree = sb
        .unpack(vec![(L1, Compression::Gzip, gzip(&l1))])
        .await
        .expect("unpacks");
    let t = sb.tree();
    let alice = &t["home/alice"];
    assert_eq!((alice.mode, alice.uid, alice.gid), (0o750, 1000, 1000));
    assert_eq!(
        alice.mtime, 1_500_000_000,
        "directory mtime restored after its children"
    );
    let notes = &t["home/alice/notes"];
    assert_eq!((notes.mode, notes.uid, notes.gid), (0o600, 1000, 100));
    assert_eq!(notes.mtime, 1_400_000_000);
    assert_eq!(notes.nlink, 2);
    assert_eq!(t["home/alice/notes2"].ino, notes.ino);
    assert_eq!(t["home/alice/link"].content, b"notes");
    assert_eq!(t["pax-time"].mtime, 1_234_567_890);
    let comment = xattr(&sb.root.join("home/alice/notes"), "user.comment");
    assert_eq!(comment.as_deref(), Some(&b"from a layer"[..]));
    // File capabilities never reach the host tree; they are a fixup.
    assert_eq!(
        xattr(&sb.root.join("usr/bin/ping"), "security.capability"),
        None
    );
    let fixups = tree.fixups().expect("fixups");
    let ping = fixups
        .iter()
        .find(|f| f.path == std::path::Path::new("/usr/bin/ping"))
        .expect("ping fixup");
    assert_eq!(ping.xattrs[0].0, "security.capability");
    assert_eq!(ping.xattrs[0].1.len(), 20);
}

fn xattr(p: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    match rustix::fs::lgetxattr(p, name, &mut buf[..]) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn special_files_become_placeholders_and_fixups() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new()
        .char_dev("dev/null", 1, 3, 0o666)
        .block_dev("dev/vda", 254, 0, 0o660)
        .fifo("run/initctl", 0o600)
        .file_mode("bin/su", "su", 0o4755)
        .dir_mode("var/mail", 0o2775)
        .tar();
    let tree = sb
        .unpack(vec![(L1, Compression::None, l1)])
        .await
        .expect("unpacks");
    let t = sb.tree();
    for p in ["dev/null", "dev/vda", "run/initctl"] {
        assert_eq!(t[p].kind, 'f', "{p} must be an inert file on the host");
        assert_eq!(t[p].content, b"", "{p}");
    }
    assert_eq!(t["bin/su"].mode, 0o755, "no setuid bit on the host");
    assert_eq!(t["var/mail"].mode, 0o775, "no setgid bit on the host");
    let fixups = tree.fixups().expect("fixups");
    let get = |p: &str| {
        fixups
            .iter()
            .find(|f| f.path == std::path::Path::new(p))
            .unwrap_or_else(|| panic!("no fixup for {p}: {fixups:?}"))
    };
    let null = get("/dev/null");
    let node = null.node.expect("node");
    assert_eq!((node.kind, node.major, node.minor), (NodeKind::Char, 1, 3));
    assert_eq!(null.mode, Some(0o020666));
    assert_eq!(get("/dev/vda").node.map(|n| n.kind), Some(NodeKind::Block));
    assert_eq!(
        get("/run/initctl").node.map(|n| n.kind),
        Some(NodeKind::Fifo)
    );
    assert_eq!(get("/bin/su").mode, Some(0o104755));
    assert_eq!(get("/var/mail").mode, Some(0o042775));
}

#[tokio::test]
async fn replaced_and_deleted_special_files_leave_no_fixups() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new()
        .char_dev("dev/a", 1, 3, 0o666)
        .char_dev("dev/b", 1, 5, 0o666)
        .file_mode("bin/su", "su", 0o4755)
        .tar();
    let l2 = LayerBuilder::new()
        .whiteout("dev/a")
        .file("dev/b", "now a file")
        .file_mode("bin/su", "replaced", 0o755)
        .tar();
    let tree = sb
        .unpack(vec![
            (L1, Compression::None, l1),
            (L2, Compression::None, l2),
        ])
        .await
        .expect("unpacks");
    let fixups = tree.fixups().expect("fixups");
    assert!(
        fixups.iter().all(|f| f.path.as_os_str() == "/"),
        "stale fixups: {fixups:?}"
    );
}

#[tokio::test]
async fn deferred_ownership_records_owners_instead_of_chown() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new()
        .entry(Entry::new(b'0', "srv/data").data("d").owner(1234, 5678))
        .entry(Entry::new(b'0', "srv/rootfile").data("r"))
        .tar();
    let mut u = Unpacker::new(&sb.root, Limits::default())
        .expect("unpacker")
        .defer_ownership(true);
    u.apply_layer(L1, Compression::None, std::io::Cursor::new(l1))
        .await
        .expect("applies");
    let tree = u.finish();
    assert!(tree.ownership_deferred);
    let euid = rustix::process::geteuid().as_raw();
    let meta = std::fs::symlink_metadata(sb.root.join("srv/data")).expect("stat");
    assert_eq!(meta.uid(), euid, "not chowned on the host");
    let fixups = tree.fixups().expect("fixups");
    let data = fixups
        .iter()
        .find(|f| f.path == std::path::Path::new("/srv/data"))
        .expect("owner fixup");
    assert_eq!(data.owner, Some((1234, 5678)));
    if euid == 0 {
        assert!(
            !fixups
                .iter()
                .any(|f| f.path == std::path::Path::new("/srv/rootfile")),
            "root-owned files need no fixup when running as root"
        );
    }
}

#[tokio::test]
async fn staging_root_must_exist_and_be_empty() {
    let sb = Sandbox::new();
    std::fs::write(sb.root.join("leftover"), "x").expect("write");
    let err = Unpacker::new(&sb.root, Limits::default()).expect_err("non-empty root");
    assert!(matches!(err, UnpackError::StagingRoot { .. }), "{err:?}");
    let missing = sb.dir.path().join("missing");
    let err = Unpacker::new(&missing, Limits::default()).expect_err("missing root");
    assert!(matches!(err, UnpackError::StagingRoot { .. }), "{err:?}");
}

#[tokio::test]
async fn a_failed_layer_poisons_the_unpacker() {
    let sb = Sandbox::new();
    let mut u = sb.unpacker(Limits::default());
    let bad = LayerBuilder::new().file("/abs", "x").tar();
    u.apply_layer(L1, Compression::None, std::io::Cursor::new(bad))
        .await
        .expect_err("absolute name");
    let good = LayerBuilder::new().file("ok", "x").tar();
    let err = u
        .apply_layer(L2, Compression::None, std::io::Cursor::new(good))
        .await
        .expect_err("poisoned");
    match err {
        UnpackError::Poisoned {
            layer,
            failed_layer,
        } => {
            assert_eq!(layer, L2);
            assert_eq!(failed_layer, L1);
        }
        other => panic!("unexpected {other:?}"),
    }
    let tree = u.finish();
    assert!(!tree.complete);
}

#[tokio::test]
async fn root_entry_sets_root_metadata_and_long_names_work() {
    let sb = Sandbox::new();
    let long = format!("deep/{}/file", "n".repeat(150));
    let l1 = LayerBuilder::new()
        .dir_mode("./", 0o700)
        .file(&long, "long")
        .symlink("deep/ln", &format!("/{}", "t".repeat(200)))
        .tar();
    let tree = sb
        .unpack(vec![(L1, Compression::None, l1)])
        .await
        .expect("unpacks");
    let meta = std::fs::symlink_metadata(&sb.root).expect("stat root");
    assert_eq!(meta.mode() & 0o7777, 0o700);
    assert_eq!(read(&sb, &long), b"long");
    assert_eq!(
        std::fs::read_link(sb.root.join("deep/ln"))
            .expect("link")
            .as_os_str()
            .len(),
        201
    );
    // mkfs gives the image root 0755: the root's mode is a fixup.
    let fixups = tree.fixups().expect("fixups");
    assert_eq!(fixups[0].path, std::path::Path::new("/"));
    assert_eq!(fixups[0].mode, Some(0o040700));
}
