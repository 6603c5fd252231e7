//! The flattened tree must equal what umoci makes of the same OCI image:
//! same paths, types, modes, owners, symlink targets, contents and
//! hardlink groups. Device nodes, FIFOs and setuid bits, which banger keeps
//! out of the host tree, are compared through the deferred fixups.
//!
//! umoci 0.4.7 (Debian bookworm) does not know `tar+zstd` layers, so the
//! image handed to umoci uses gzip and plain layers; the same image with
//! its gzip layers recompressed as zstd must unpack to the same tree.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use banger_image::unpack::{Compression, Fixup, Limits, NodeKind, Unpacker};
use common::*;
use sha2::{Digest, Sha256};

const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const PLAIN: &str = "application/vnd.oci.image.layer.v1.tar";
const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The image's layers as uncompressed tars, oldest first.
fn layers() -> Vec<Vec<u8>> {
    let l1 = LayerBuilder::new()
        .dir("etc")
        .file("etc/hostname", "base\n")
        .entry(
            Entry::new(b'0', "etc/shadow")
                .data("root:*:1::::::\n")
                .mode(0o640)
                .owner(0, 42),
        )
        .dir("usr")
        .dir("usr/bin")
        .file_mode("usr/bin/tool", "tool v1\n", 0o755)
        .hardlink("usr/bin/tool-hard", "usr/bin/tool")
        .symlink("usr/bin/tool-link", "tool")
        .file_mode("usr/bin/su", "su\n", 0o4755)
        .file_mode("usr/bin/wall", "wall\n", 0o2755)
        .dir("usr/lib")
        .file("usr/lib/libx.so", "ELF?")
        .symlink("lib", "usr/lib")
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .dir_mode("tmp", 0o1777)
        .entry(Entry::new(b'5', "var/lib/app").mode(0o750).owner(100, 101))
        .entry(
            Entry::new(b'0', "var/lib/app/data")
                .data("secret")
                .mode(0o600)
                .owner(100, 101),
        )
        .entry(Entry::new(b'5', "home/user").mode(0o700).owner(1000, 1000))
        .entry(
            Entry::new(b'0', "home/user/.profile")
                .data("PS1=$\n")
                .owner(1000, 1000),
        )
        .dir("opt/old")
        .file("opt/old/a", "a")
        .file("opt/old/b", "b")
        .dir("opt/old/sub")
        .file("opt/old/sub/c", "c")
        .dir("opt/keep")
        .file("opt/keep/k", "k")
        .dir("dev")
        .char_dev("dev/null", 1, 3, 0o666)
        .block_dev("dev/loop0", 7, 0, 0o660)
        .dir("run")
        .fifo("run/fifo", 0o600)
        .tar();
    let l2 = LayerBuilder::new()
        .file("etc/hostname", "layer2\n")
        .whiteout("etc/shadow")
        .whiteout("usr/bin/tool-link")
        .dir("opt/old")
        .file("opt/old/new", "new")
        .dir("opt/old/sub")
        .file("opt/old/sub/d", "d")
        // The opaque marker after its siblings: they survive, the lower
        // layer's a, b and sub/c do not.
        .opaque("opt/old")
        .hardlink("usr/bin/tool-hard2", "usr/bin/tool")
        .file("srv/www/index.html", "<h1>hi</h1>")
        .entry(Entry::new(b'5', "var/lib/app").mode(0o755).owner(100, 101))
        .file_mode("usr/bin/tool-link", "now a script\n", 0o700)
        .tar();
    let l3 = LayerBuilder::new()
        .whiteout("home")
        .entry(Entry::new(b'5', "home").mode(0o755))
        .entry(
            Entry::new(b'0', "home/other")
                .data("o")
                .owner(1001, 1001)
                .mode(0o444),
        )
        .file("opt/keep", "keep is a file now")
        .symlink("etc/hostname", "hostname.real")
        .file("etc/hostname.real", "real\n")
        .whiteout("dev/loop0")
        .file("opt/old/sub2/x", "implicit parent")
        .tar();
    vec![l1, l2, l3]
}

struct Blob {
    media_type: &'static str,
    data: Vec<u8>,
}

/// Writes an OCI image layout with tag `test` and returns its blobs.
fn write_layout(dir: &Path, blobs: &[Blob], tars: &[Vec<u8>]) {
    let blob_dir = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blob_dir).expect("mkdir blobs");
    let put = |data: &[u8]| -> String {
        let h = sha(data);
        std::fs::write(blob_dir.join(&h), data).expect("write blob");
        format!("sha256:{h}")
    };
    let mut layer_descs = Vec::new();
    for b in blobs {
        let digest = put(&b.data);
        layer_descs.push(serde_json::json!({
            "mediaType": b.media_type,
            "digest": digest,
            "size": b.data.len(),
        }));
    }
    let diff_ids: Vec<String> = tars.iter().map(|t| format!("sha256:{}", sha(t))).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .expect("json");
    let config_digest = put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layer_descs,
    }))
    .expect("json");
    let manifest_digest = put(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": "test" },
        }],
    });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("write index");
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("write oci-layout");
}

/// What is compared for each path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    kind: char,
    mode: u32,
    uid: u32,
    gid: u32,
    content: Vec<u8>,
    /// (major, minor) for device nodes.
    dev: (u32, u32),
}

type View = (BTreeMap<String, Item>, BTreeSet<Vec<String>>);

/// A tree as comparable items plus its hardlink groups.
fn view(root: &Path) -> View {
    let mut items = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (path, n) in snapshot(root) {
        let meta = std::fs::symlink_metadata(root.join(&path)).expect("stat");
        let rdev = meta.rdev();
        let dev = if matches!(n.kind, 'c' | 'b') {
            (libc::major(rdev), libc::minor(rdev))
        } else {
            (0, 0)
        };
        if n.kind == 'f' && n.nlink > 1 {
            by_ino.entry(n.ino).or_default().push(path.clone());
        }
        items.insert(
            path,
            Item {
                kind: n.kind,
                mode: n.mode,
                uid: n.uid,
                gid: n.gid,
                content: n.content,
                dev,
            },
        );
    }
    let groups = by_ino
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    (items, groups)
}

/// Our tree with the deferred fixups applied, as the ext4 image will be.
fn view_with_fixups(root: &Path, fixups: &[Fixup]) -> View {
    let (mut items, mut groups) = view(root);
    for f in fixups {
        let rel = f
            .path
            .strip_prefix("/")
            .expect("absolute")
            .to_string_lossy()
            .into_owned();
        if rel.is_empty() {
            continue;
        }
        let item = items.get_mut(&rel).expect("fixup for a path in the tree");
        if let Some(node) = f.node {
            item.kind = match node.kind {
                NodeKind::Char => 'c',
                NodeKind::Block => 'b',
                NodeKind::Fifo => 'p',
            };
            item.content.clear();
            item.dev = match node.kind {
                NodeKind::Fifo => (0, 0),
                _ => (node.major, node.minor),
            };
            // Placeholders are files; nodes are not hardlink-grouped here.
            for g in groups.clone() {
                if g.contains(&rel) {
                    groups.remove(&g);
                }
            }
        }
        if let Some(mode) = f.mode {
            item.mode = mode & 0o7777;
        }
        if let Some((uid, gid)) = f.owner {
            item.uid = uid;
            item.gid = gid;
        }
    }
    (items, groups)
}

fn diff(ours: &View, theirs: &View) -> Vec<String> {
    let mut out = Vec::new();
    for k in ours
        .0
        .keys()
        .chain(theirs.0.keys())
        .collect::<BTreeSet<_>>()
    {
        match (ours.0.get(k), theirs.0.get(k)) {
            (Some(a), Some(b)) if a == b => {}
            (a, b) => out.push(format!("{k}: banger {a:?} / umoci {b:?}")),
        }
    }
    if ours.1 != theirs.1 {
        out.push(format!(
            "hardlinks: banger {:?} / umoci {:?}",
            ours.1, theirs.1
        ));
    }
    out
}

async fn unpack_ours(root: &Path, blobs: &[Blob]) -> View {
    let mut u = Unpacker::new(root, Limits::default()).expect("unpacker");
    for (i, b) in blobs.iter().enumerate() {
        let c = Compression::from_media_type(b.media_type).expect("known media type");
        u.apply_layer(&format!("sha256:{}", sha(&b.data)), c, b.data.as_slice())
            .await
            .unwrap_or_else(|e| panic!("layer {i}: {e}"));
    }
    let tree = u.finish();
    let fixups = tree.fixups().expect("fixups");
    view_with_fixups(root, &fixups)
}

#[tokio::test]
async fn flattened_tree_matches_umoci() {
    let umoci = Command::new("umoci").arg("--version").output();
    let ok = matches!(&umoci, Ok(o) if o.status.success());
    assert!(
        ok,
        "umoci is required for this test and is not installed: apt-get install umoci ({umoci:?})"
    );
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "the umoci comparison runs as root (owners, device nodes); CI runs it as root"
    );

    let tars = layers();
    let blobs = vec![
        Blob {
            media_type: GZIP,
            data: gzip(&tars[0]),
        },
        Blob {
            media_type: PLAIN,
            data: tars[1].clone(),
        },
        Blob {
            media_type: GZIP,
            data: gzip(&tars[2]),
        },
    ];
    let work = tempfile::tempdir().expect("tempdir");
    let layout = work.path().join("layout");
    write_layout(&layout, &blobs, &tars);
    let bundle = work.path().join("bundle");
    let out = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:test", layout.display()))
        .arg(&bundle)
        .output()
        .expect("umoci runs");
    assert!(out.status.success(), "umoci unpack failed: {out:?}");
    let theirs = view(&bundle.join("rootfs"));

    let ours_root = work.path().join("ours");
    std::fs::create_dir(&ours_root).expect("mkdir");
    let ours = unpack_ours(&ours_root, &blobs).await;
    let differences = diff(&ours, &theirs);
    assert!(
        differences.is_empty(),
        "trees differ:\n{}",
        differences.join("\n")
    );
    // The comparison covered what it should.
    for p in [
        "dev/null",
        "run/fifo",
        "usr/bin/su",
        "opt/old/new",
        "home/other",
        "lib",
    ] {
        assert!(theirs.0.contains_key(p), "{p} missing from umoci's tree");
    }
    assert_eq!(theirs.0["dev/null"].kind, 'c');
    assert_eq!(theirs.0["usr/bin/su"].mode, 0o4755);
    assert!(!theirs.1.is_empty(), "hardlinks compared");
    assert!(!theirs.0.contains_key("opt/old/a"));
    assert!(!theirs.0.contains_key("opt/old/sub/c"));
    assert!(theirs.0.contains_key("opt/old/sub/d"));
    assert!(theirs.0.len() > 30, "{} paths compared", theirs.0.len());

    // The same image with zstd layers (which this umoci cannot read)
    // unpacks to the same tree.
    let zstd_blobs = vec![
        Blob {
            media_type: ZSTD,
            data: zstd(&tars[0]),
        },
        Blob {
            media_type: PLAIN,
            data: tars[1].clone(),
        },
        Blob {
            media_type: ZSTD,
            data: zstd(&tars[2]),
        },
    ];
    let zstd_root = work.path().join("ours-zstd");
    std::fs::create_dir(&zstd_root).expect("mkdir");
    let ours_zstd = unpack_ours(&zstd_root, &zstd_blobs).await;
    let differences = diff(&ours_zstd, &theirs);
    assert!(
        differences.is_empty(),
        "zstd tree differs:\n{}",
        differences.join("\n")
    );
}
