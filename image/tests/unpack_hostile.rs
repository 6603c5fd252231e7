//! Crafted layers that try to reach outside the staging root or to be read
//! differently by different parsers. Every test checks that nothing next to
//! the staging root (nor the host's /etc/passwd) changed.

mod common;

use banger_image::unpack::{Compression, UnpackError};
use common::*;

/// Applies one uncompressed layer.
async fn one(sb: &Sandbox, tar: Vec<u8>) -> Result<(), UnpackError> {
    sb.unpack(vec![(L1, Compression::None, tar)])
        .await
        .map(|_| ())
}

#[tokio::test]
async fn pax_size_disagreeing_with_ustar_size_is_refused() {
    // The CVE-2025-62518 shape: ustar says 0, PAX says 1024, and the 1024
    // bytes hide a member a parser ignoring PAX would extract.
    let inner = LayerBuilder::new()
        .file("smuggled", "I should not exist")
        .unterminated();
    assert_eq!(inner.len(), 1024);
    let tar = LayerBuilder::new()
        .entry(
            Entry::new(b'0', "innocent")
                .data(&inner)
                .pax("size", "1024")
                .ustar_size(0),
        )
        .tar();
    let sb = Sandbox::new();
    let err = one(&sb, tar).await.expect_err("size mismatch");
    assert!(
        matches!(
            err,
            UnpackError::SizeMismatch {
                ustar_size: 0,
                pax_size: 1024,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, L1, "innocent");
    assert!(!sb.root.join("smuggled").exists());
    sb.assert_outside_untouched();

    // And the other direction: ustar claims more than PAX.
    let tar = LayerBuilder::new()
        .entry(
            Entry::new(b'0', "other")
                .data(vec![7u8; 512])
                .pax("size", "512")
                .ustar_size(4096),
        )
        .tar();
    let sb = Sandbox::new();
    let err = one(&sb, tar).await.expect_err("size mismatch");
    assert!(matches!(err, UnpackError::SizeMismatch { .. }), "{err:?}");
    assert_names(&err, L1, "other");
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn symlink_then_file_of_the_same_name_replaces_the_symlink() {
    let sb = Sandbox::new();
    let target = format!("{}/x", sb.outside_str());
    let tar = LayerBuilder::new()
        .symlink("x", &target)
        .file("x", "inside")
        .symlink("rel", "../../../outside/sentinel")
        .file("rel", "inside too")
        .tar();
    one(&sb, tar).await.expect("replaces the symlinks");
    let t = sb.tree();
    assert_eq!(t["x"].kind, 'f');
    assert_eq!(t["x"].content, b"inside");
    assert_eq!(t["rel"].content, b"inside too");
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn symlink_then_directory_of_the_same_name_replaces_the_symlink() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new().symlink("d", &sb.outside_str()).tar();
    let l2 = LayerBuilder::new()
        .dir("d")
        .file("d/sentinel", "overwritten?")
        .file("d/new", "new")
        .tar();
    sb.unpack(vec![
        (L1, Compression::None, l1),
        (L2, Compression::None, l2),
    ])
    .await
    .expect("replaces the symlink");
    let t = sb.tree();
    assert_eq!(t["d"].kind, 'd');
    assert_eq!(t["d/sentinel"].content, b"overwritten?");
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn dotdot_symlink_then_nested_member_stays_inside() {
    let sb = Sandbox::new();
    let tar = LayerBuilder::new()
        .symlink("x", "..")
        .file("x/a/b", "b")
        .symlink("y", "../../..")
        .file("y/outside/sentinel", "clobbered?")
        .tar();
    one(&sb, tar).await.expect("resolves inside the root");
    // ".." of the root is the root: x/a/b lands at a/b.
    let t = sb.tree();
    assert_eq!(t["a/b"].content, b"b");
    assert_eq!(t["outside/sentinel"].content, b"clobbered?");
    assert!(!sb.dir.path().join("d1/d2/a").exists());
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn symlink_planted_by_an_earlier_layer_is_resolved_inside() {
    // etc -> ../../.. resolves to the root itself.
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new().symlink("etc", "../../..").tar();
    let l2 = LayerBuilder::new().file("etc/passwd", "evil").tar();
    sb.unpack(vec![
        (L1, Compression::None, l1),
        (L2, Compression::None, l2),
    ])
    .await
    .expect("resolves inside");
    assert_eq!(sb.tree()["passwd"].content, b"evil");
    sb.assert_outside_untouched();

    // etc -> /etc is a loop once "/" is the root. (The probe name does not
    // exist on the host, so even a broken unpacker would not clobber it.)
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new().symlink("etc", "/etc").tar();
    let l2 = LayerBuilder::new()
        .file("etc/banger-escape-probe", "evil")
        .tar();
    let err = sb
        .unpack(vec![
            (L1, Compression::None, l1),
            (L2, Compression::None, l2),
        ])
        .await
        .expect_err("loop");
    assert!(matches!(err, UnpackError::SymlinkLoop { .. }), "{err:?}");
    assert_names(&err, L2, "etc/banger-escape-probe");
    assert!(!std::path::Path::new("/etc/banger-escape-probe").exists());
    sb.assert_outside_untouched();

    // An absolute symlink to the real directory next to the root: inside
    // the root that path does not exist, so the member has no parent.
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new().symlink("etc", &sb.outside_str()).tar();
    let l2 = LayerBuilder::new().file("etc/passwd", "evil").tar();
    let err = sb
        .unpack(vec![
            (L1, Compression::None, l1),
            (L2, Compression::None, l2),
        ])
        .await
        .expect_err("dangling in the root");
    assert!(matches!(err, UnpackError::NotADirectory { .. }), "{err:?}");
    assert_names(&err, L2, "etc/passwd");
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn symlink_planted_earlier_in_the_same_layer() {
    let sb = Sandbox::new();
    let tar = LayerBuilder::new()
        .symlink("etc", &sb.outside_str())
        .dir(sb.outside_str().trim_start_matches('/'))
        .file("etc/passwd", "evil")
        .tar();
    // The target exists *inside* the root now, so etc/passwd lands there.
    one(&sb, tar).await.expect("resolves inside");
    let inner = format!("{}/passwd", sb.outside_str().trim_start_matches('/'));
    assert_eq!(sb.tree()[&inner].content, b"evil");
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn symlinks_named_dot_or_slash_are_refused() {
    for name in [".", "./", "a/.."] {
        let sb = Sandbox::new();
        let tar = LayerBuilder::new().symlink(name, "/").tar();
        let err = one(&sb, tar).await.expect_err("refused");
        assert!(
            matches!(
                err,
                UnpackError::RootEntry { .. } | UnpackError::PathTraversal { .. }
            ),
            "{name}: {err:?}"
        );
        assert_names(&err, L1, name);
        sb.assert_outside_untouched();
    }
    let sb = Sandbox::new();
    let tar = LayerBuilder::new().symlink("/", &sb.outside_str()).tar();
    let err = one(&sb, tar).await.expect_err("refused");
    assert!(matches!(err, UnpackError::AbsolutePath { .. }), "{err:?}");
    assert_names(&err, L1, "/");
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn hardlinks_to_absolute_or_parent_paths_are_refused() {
    let sb = Sandbox::new();
    let abs = format!("{}/passwd", sb.outside_str());
    for (target, kind) in [
        (abs.as_str(), "absolute"),
        ("/etc/passwd", "absolute"),
        ("../../../outside/passwd", "dotdot"),
        ("a/../../../../outside/passwd", "dotdot"),
    ] {
        let sb = Sandbox::new();
        let tar = LayerBuilder::new().hardlink("h", target).tar();
        let err = one(&sb, tar).await.expect_err(kind);
        assert!(
            matches!(err, UnpackError::LinkTargetEscapes { .. }),
            "{target}: {err:?}"
        );
        assert_names(&err, L1, "h");
        assert!(err.to_string().contains(target));
        sb.assert_outside_untouched();
    }
}

#[tokio::test]
async fn hardlinks_through_symlinks_are_refused() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new()
        .symlink("out", &sb.outside_str())
        .symlink("up", "../../..")
        .dir("real")
        .file("real/f", "f")
        .symlink("alias", "real")
        .tar();
    for target in ["out/passwd", "up/outside/passwd", "alias/f"] {
        let sb2 = Sandbox::new();
        let l2 = LayerBuilder::new().hardlink("h", target).tar();
        let l1 = l1.clone();
        let err = sb2
            .unpack(vec![
                (L1, Compression::None, l1),
                (L2, Compression::None, l2),
            ])
            .await
            .expect_err("through a symlink");
        assert!(
            matches!(err, UnpackError::LinkThroughSymlink { .. }),
            "{target}: {err:?}"
        );
        assert_names(&err, L2, "h");
        sb2.assert_outside_untouched();
        let passwd = std::fs::symlink_metadata(sb2.outside.join("passwd")).expect("stat");
        assert_eq!(std::os::unix::fs::MetadataExt::nlink(&passwd), 1);
    }
    // A hardlink to a symlink itself is fine (it names a member).
    let l2 = LayerBuilder::new().hardlink("h", "alias").tar();
    sb.unpack(vec![
        (L1, Compression::None, l1),
        (L2, Compression::None, l2),
    ])
    .await
    .expect("link to the symlink itself");
    assert_eq!(sb.tree()["h"].kind, 'l');
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn absolute_and_parent_member_names_are_refused() {
    let sb = Sandbox::new();
    let evil = format!("{}/sentinel", sb.outside_str());
    for (name, want_abs) in [
        (evil.as_str(), true),
        ("/etc/passwd", true),
        ("../../../outside/sentinel", false),
        ("./../../../outside/sentinel", false),
        ("a/b/../../../../../outside/sentinel", false),
    ] {
        let sb = Sandbox::new();
        let tar = LayerBuilder::new().file(name, "pwned").tar();
        let err = one(&sb, tar).await.expect_err("refused");
        if want_abs {
            assert!(
                matches!(err, UnpackError::AbsolutePath { .. }),
                "{name}: {err:?}"
            );
        } else {
            assert!(
                matches!(err, UnpackError::PathTraversal { .. }),
                "{name}: {err:?}"
            );
        }
        assert_names(&err, L1, name);
        sb.assert_outside_untouched();
    }
    // The same through a PAX path record and a GNU long name.
    let sb = Sandbox::new();
    let tar = LayerBuilder::new()
        .entry(
            Entry::new(b'0', "harmless")
                .data("x")
                .pax("path", "../../../outside/sentinel"),
        )
        .tar();
    let err = one(&sb, tar).await.expect_err("refused");
    assert!(matches!(err, UnpackError::PathTraversal { .. }), "{err:?}");
    assert_names(&err, L1, "../../../outside/sentinel");
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn devices_fifos_and_setuid_never_exist_on_the_host() {
    let sb = Sandbox::new();
    let tar = LayerBuilder::new()
        .char_dev("dev/mem", 1, 1, 0o666)
        .block_dev("dev/sda", 8, 0, 0o666)
        .fifo("tmp/fifo", 0o666)
        .file_mode("rootshell", "#!/bin/sh", 0o6777)
        .tar();
    let tree = sb
        .unpack(vec![(L1, Compression::Gzip, gzip(&tar))])
        .await
        .expect("unpacks");
    for n in sb.tree().values() {
        assert!(matches!(n.kind, 'f' | 'd'), "{n:?}");
        assert_eq!(n.mode & 0o6000, 0, "{n:?}");
    }
    let fixups = tree.fixups().expect("fixups");
    assert_eq!(fixups.iter().filter(|f| f.node.is_some()).count(), 3);
    let shell = fixups
        .iter()
        .find(|f| f.path == std::path::Path::new("/rootshell"))
        .expect("setuid fixup");
    assert_eq!(shell.mode, Some(0o106777));
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn whiteouts_under_a_symlinked_directory_stay_inside() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new()
        .symlink("d", &sb.outside_str())
        .symlink("up", "../../../outside")
        .file("sentinel", "inside copy")
        .file("outside/passwd", "inside passwd")
        .file("outside/other", "inside other")
        .tar();
    let l2 = LayerBuilder::new()
        .whiteout("d/sentinel")
        .whiteout("d/sub")
        .whiteout("up/passwd")
        .opaque("up")
        .tar();
    sb.unpack(vec![
        (L1, Compression::None, l1),
        (L2, Compression::None, l2),
    ])
    .await
    .expect("nothing outside to delete");
    // "d" points at a path that does not exist inside the root: its
    // whiteouts delete nothing. "up" -> "../../../outside" is <root>/outside,
    // which the whiteout and the opaque marker empty.
    let t = sb.tree();
    assert_eq!(t["sentinel"].content, b"inside copy");
    assert_eq!(paths(&t), vec!["d", "outside", "sentinel", "up"]);
    sb.assert_outside_untouched();

    // d -> ".." then d/.wh.sentinel deletes the root's own sentinel only.
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new()
        .symlink("d", "..")
        .file("sentinel", "inside copy")
        .tar();
    let l2 = LayerBuilder::new().whiteout("d/sentinel").tar();
    sb.unpack(vec![
        (L1, Compression::None, l1),
        (L2, Compression::None, l2),
    ])
    .await
    .expect("unpacks");
    assert!(!sb.root.join("sentinel").exists());
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn opaque_marker_after_siblings_under_hostile_names() {
    // Opaque marker last; siblings include a symlink pointing outside whose
    // contents must not be cleared through it.
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new()
        .dir("a")
        .file("a/lower", "lower")
        .symlink("a/out", &sb.outside_str())
        .tar();
    let l2 = LayerBuilder::new()
        .dir("a")
        .symlink("a/out2", "../../../../outside")
        .file("a/mine", "mine")
        .opaque("a")
        .tar();
    sb.unpack(vec![
        (L1, Compression::None, l1),
        (L2, Compression::None, l2),
    ])
    .await
    .expect("unpacks");
    assert_eq!(paths(&sb.tree()), vec!["a", "a/mine", "a/out2"]);
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn invalid_whiteouts_and_owners_are_refused() {
    let sb = Sandbox::new();
    let tar = LayerBuilder::new().file("dir/.wh.", "").tar();
    let err = one(&sb, tar).await.expect_err("empty whiteout");
    assert!(matches!(err, UnpackError::BadWhiteout { .. }), "{err:?}");
    assert_names(&err, L1, "dir/.wh.");

    let sb = Sandbox::new();
    let tar = LayerBuilder::new().file(".wh..", "").tar();
    let err = one(&sb, tar).await.expect_err("dotdot whiteout");
    assert!(matches!(err, UnpackError::BadWhiteout { .. }), "{err:?}");

    let sb = Sandbox::new();
    let tar = LayerBuilder::new()
        .entry(Entry::new(b'0', "f").data("x").pax("uid", "4294967295"))
        .tar();
    let err = one(&sb, tar).await.expect_err("uid -1");
    assert!(matches!(err, UnpackError::InvalidOwner { .. }), "{err:?}");
    assert_names(&err, L1, "f");
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn file_over_a_lower_directory_and_parent_that_is_a_file() {
    let sb = Sandbox::new();
    let l1 = LayerBuilder::new()
        .file("a/b/c", "c")
        .file("plain", "p")
        .tar();
    let l2 = LayerBuilder::new().file("a", "now a file").tar();
    let l3 = LayerBuilder::new().file("plain/child", "x").tar();
    let err = sb
        .unpack(vec![
            (L1, Compression::None, l1),
            (L2, Compression::None, l2),
            (L3, Compression::None, l3),
        ])
        .await
        .expect_err("parent is a file");
    assert!(matches!(err, UnpackError::NotADirectory { .. }), "{err:?}");
    assert_names(&err, L3, "plain/child");
    assert_eq!(sb.tree()["a"].content, b"now a file");
    sb.assert_outside_untouched();
}

#[test]
#[should_panic(expected = "outside the staging root changed")]
fn the_sandbox_notices_changes_next_to_the_root() {
    // The check every test above relies on can fail.
    let sb = Sandbox::new();
    std::fs::write(sb.outside.join("sentinel"), "changed").expect("write");
    sb.assert_outside_untouched();
}
