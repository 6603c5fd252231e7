//! The tree cache: an entry built from unpacked layers, farmed into pull
//! trees that match a direct unpack, verified on every use, pruned by
//! layer references, and never trusted when partial.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use banger_image::treecache::{FarmError, Lookup, TreeCache, TreeKey};
use banger_image::unpack::{Compression, Fixup, Limits, UnpackedTree, Unpacker};
use common::{snapshot, LayerBuilder, Node};

const L1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const L2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

fn layers() -> Vec<(&'static str, Compression, Vec<u8>)> {
    let l1 = LayerBuilder::new()
        .dir("etc")
        .file("etc/passwd", "root:x:0:0::/root:/bin/sh\n")
        .file("etc/old", "gone in layer 2\n")
        .dir_mode("secret", 0o700)
        .file("secret/key", "k\n")
        .dir("usr")
        .dir("usr/bin")
        .file_mode("usr/bin/su", "#!/bin/sh\n", 0o4755)
        .file_mode("usr/bin/tool", "tool\n", 0o755)
        .hardlink("usr/bin/tool2", "usr/bin/tool")
        .symlink("bin", "usr/bin")
        .dir("dev")
        .char_dev("dev/null", 1, 3, 0o666)
        .dir("opt")
        .file("opt/a", "a\n")
        .tar();
    let l2 = LayerBuilder::new()
        .whiteout("etc/old")
        .file("etc/motd", "hello\n")
        .opaque("opt")
        .file("opt/b", "b\n")
        .tar();
    vec![
        (L1, Compression::None, l1),
        (L2, Compression::Gzip, common::gzip(&l2)),
    ]
}

fn key() -> TreeKey {
    TreeKey::new(layers().into_iter().map(|(d, c, _)| (d.to_string(), c)))
}

async fn unpack_into(dir: &Path) -> UnpackedTree {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut u = Unpacker::new(dir, Limits::default()).expect("unpacker");
    for (digest, c, blob) in layers() {
        u.apply_layer(digest, c, std::io::Cursor::new(blob))
            .await
            .expect("apply");
    }
    u.finish()
}

/// What `mkfs.ext4 -d` copies: everything but inode numbers and link counts.
fn comparable(tree: BTreeMap<String, Node>) -> BTreeMap<String, Node> {
    tree.into_iter()
        .map(|(p, mut n)| {
            n.ino = 0;
            n.nlink = 0;
            (p, n)
        })
        .collect()
}

fn fixups(tree: &UnpackedTree) -> Vec<Fixup> {
    let mut f = tree.fixups().expect("fixups");
    f.sort_by(|a, b| a.path.cmp(&b.path));
    f
}

fn leftovers(cache: &TreeCache) -> Vec<String> {
    std::fs::read_dir(cache.dir())
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp") || n.ends_with(".trash"))
        .collect()
}

fn wait_for_no_leftovers(cache: &TreeCache) {
    for _ in 0..500 {
        if leftovers(cache).is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("leftovers stayed: {:?}", leftovers(cache));
}

/// Waits for the entry's `durable` marker (written after `syncfs`, on a
/// thread of the cache's own), so nothing writes in the test's dirs after
/// it ends.
fn wait_for_durable(cache: &TreeCache, key: &TreeKey) {
    let marker = cache.entry_path(key).join("durable");
    for _ in 0..3000 {
        if marker.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{} never appeared", marker.display());
}

#[tokio::test]
async fn farms_match_a_direct_unpack_and_the_entry_never_changes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reference = unpack_into(&tmp.path().join("reference")).await;
    let want_tree = comparable(snapshot(&reference.root));
    let want_fixups = fixups(&reference);
    assert!(
        want_fixups
            .iter()
            .any(|f| f.path == Path::new("/usr/bin/su")),
        "{want_fixups:?}"
    );
    assert!(want_fixups.iter().any(|f| f.path == Path::new("/dev/null")));

    let cache = TreeCache::open(tmp.path().join("trees")).expect("open");
    assert!(cache.can_farm_into(tmp.path()));
    let key = key();
    assert!(matches!(
        cache.lookup(&key, &Limits::default()),
        Lookup::Miss
    ));

    // Cold: build, commit, and get a farm.
    let build = cache.begin(&key).expect("begin");
    let tree = unpack_into(&build.tree_dir()).await;
    let first = tmp.path().join("pull-1");
    let committed = build.commit(tree, &first).expect("commit");
    assert!(committed.cached, "{:?}", committed.note);
    wait_for_durable(&cache, &key);
    assert_eq!(committed.tree.root, first);
    assert_eq!(comparable(snapshot(&first)), want_tree);
    assert_eq!(fixups(&committed.tree), want_fixups);
    assert_eq!(cache.keys(), [key.hex().to_string()]);
    let entry_tree = cache.entry_path(&key).join("tree");
    let pristine = snapshot(&entry_tree);
    // A farm shares the files' inodes but not the directories'.
    let (farmed, cached) = (snapshot(&first), &pristine);
    assert_eq!(farmed["etc/passwd"].ino, cached["etc/passwd"].ino);
    assert_ne!(farmed["etc"].ino, cached["etc"].ino);

    // Warm: a farm of the entry, the same again.
    let Lookup::Hit(entry) = cache.lookup(&key, &Limits::default()) else {
        panic!("no hit after commit")
    };
    let second = tmp.path().join("pull-2");
    let tree = cache.farm(&entry, &second).expect("farm");
    assert_eq!(comparable(snapshot(&second)), want_tree);
    assert_eq!(fixups(&tree), want_fixups);
    assert_eq!(tree.bytes_written, reference.bytes_written);
    assert_eq!(tree.entries, reference.entries);

    // An injection replaces files in the farm: a replaced path loses its
    // fixup (a new file), the entry does not change.
    std::fs::remove_file(second.join("usr/bin/su")).expect("rm");
    std::fs::write(second.join("usr/bin/su"), "replaced\n").expect("write");
    std::fs::write(second.join("etc/hostname"), "x\n").expect("write");
    std::fs::create_dir(second.join("etc/banger")).expect("mkdir");
    let after = fixups(&tree);
    assert!(!after.iter().any(|f| f.path == Path::new("/usr/bin/su")));
    assert!(after.iter().any(|f| f.path == Path::new("/dev/null")));
    assert_eq!(snapshot(&entry_tree).len(), pristine.len());
    assert_eq!(
        comparable(snapshot(&entry_tree)),
        comparable(pristine.clone())
    );

    // Over the limits: not used.
    let small = Limits {
        max_image_bytes: 10,
        ..Limits::default()
    };
    assert!(matches!(cache.lookup(&key, &small), Lookup::OverLimits(_)));

    // A file changed in place: the farm refuses the entry, leaves nothing.
    std::fs::write(entry_tree.join("etc/motd"), "HELLO\n").expect("rewrite");
    let third = tmp.path().join("pull-3");
    match cache.farm(&entry, &third) {
        Err(FarmError::Damaged(why)) => assert!(why.contains("paths"), "{why}"),
        other => panic!("a changed entry was farmed: {other:?}"),
    }
    assert!(!third.exists());
    cache.discard(&key);
    assert!(matches!(
        cache.lookup(&key, &Limits::default()),
        Lookup::Miss
    ));
    wait_for_no_leftovers(&cache);
    // The farms made earlier do not depend on the entry.
    assert_eq!(
        std::fs::read(first.join("etc/passwd")).expect("read"),
        b"root:x:0:0::/root:/bin/sh\n"
    );
}

#[tokio::test]
async fn partial_entries_are_not_trusted_and_prune_follows_references() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = TreeCache::open(tmp.path().join("trees")).expect("open");
    let key = key();

    // An interrupted build: dropping it removes its tmp dir.
    let build = cache.begin(&key).expect("begin");
    std::fs::write(build.tree_dir().join("half"), "x").expect("write");
    assert_eq!(leftovers(&cache).len(), 1);
    drop(build);
    wait_for_no_leftovers(&cache);
    assert!(matches!(
        cache.lookup(&key, &Limits::default()),
        Lookup::Miss
    ));

    // A dir at the entry's name without meta.json is not trusted.
    std::fs::create_dir_all(cache.entry_path(&key).join("tree/etc")).expect("mkdir");
    assert!(matches!(
        cache.lookup(&key, &Limits::default()),
        Lookup::Damaged(_)
    ));
    cache.discard(&key);
    wait_for_no_leftovers(&cache);

    // A real entry.
    let build = cache.begin(&key).expect("begin");
    let tree = unpack_into(&build.tree_dir()).await;
    let farm = tmp.path().join("farm");
    assert!(build.commit(tree, &farm).expect("commit").cached);
    wait_for_durable(&cache, &key);
    // A second build of the same key loses the rename; its farm is fine.
    let build = cache.begin(&key).expect("begin");
    let tree = unpack_into(&build.tree_dir()).await;
    let farm2 = tmp.path().join("farm2");
    let lost = build.commit(tree, &farm2).expect("commit");
    assert!(!lost.cached);
    assert!(lost.note.is_some());
    assert_eq!(comparable(snapshot(&farm2)), comparable(snapshot(&farm)));
    wait_for_no_leftovers(&cache);
    assert_eq!(cache.keys().len(), 1);

    // Leftovers: a dead process's are pruned, a live one's kept; foreign
    // names are left alone.
    let dead = cache.dir().join(format!("{}.99999999-0-0.tmp", key.hex()));
    let live = cache
        .dir()
        .join(format!("{}.{}-5-0.tmp", key.hex(), std::process::id()));
    for d in [&dead, &live] {
        std::fs::create_dir_all(d.join("tree")).expect("mkdir");
    }
    std::fs::write(cache.dir().join("README"), "mine").expect("write");
    let all: HashSet<String> = [L1, L2].iter().map(|s| s.to_string()).collect();
    let stats = cache.prune(&all).expect("prune");
    assert_eq!(stats.removed, 1, "{stats:?}");
    assert!(!dead.exists() && live.exists());
    assert_eq!(cache.keys().len(), 1, "a referenced entry was pruned");

    // One layer unreferenced: the entry goes, with its bytes counted.
    let only_l1: HashSet<String> = [L1.to_string()].into();
    let stats = cache.prune(&only_l1).expect("prune");
    assert_eq!(stats.removed, 1, "{stats:?}");
    assert!(stats.bytes_freed > 0, "{stats:?}");
    assert!(cache.keys().is_empty());
    assert!(matches!(
        cache.lookup(&key, &Limits::default()),
        Lookup::Miss
    ));
    // Start-up removes every unfinished tree.
    assert_eq!(cache.remove_unfinished(), 1);
    assert!(!live.exists());
    assert!(cache.dir().join("README").exists());
}

#[tokio::test]
async fn builders_of_one_key_take_turns() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = TreeCache::open(tmp.path().join("trees")).expect("open");
    let key = key();
    let held = cache.lock(&key).await;
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let waiter = {
        let (cache, key) = (cache.clone(), key.clone());
        tokio::spawn(async move {
            let _lock = cache.lock(&key).await;
            let _ = tx.send(());
        })
    };
    // Another key is not held up.
    let other = TreeKey::new([(L1.to_string(), Compression::None)]);
    drop(cache.lock(&other).await);
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        rx.try_recv().is_err(),
        "a second builder got the lock while it was held"
    );
    drop(held);
    waiter.await.expect("waiter");
    assert!(rx.try_recv().is_ok());
}

#[tokio::test]
async fn deep_and_read_only_trees_are_farmed_faithfully() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut layer = LayerBuilder::new();
    let mut path = String::from("deep");
    layer = layer.dir(&path);
    for _ in 0..300 {
        path.push_str("/d");
        layer = layer.dir(&path);
    }
    layer = layer
        .file(&format!("{path}/leaf"), "bottom\n")
        .dir_mode("ro", 0o555)
        .file("ro/f", "f\n");
    let blob = layer.tar();
    let digest = "sha256:3333333333333333333333333333333333333333333333333333333333333333";
    let key = TreeKey::new([(digest.to_string(), Compression::None)]);
    let cache = TreeCache::open(tmp.path().join("trees")).expect("open");
    let build = cache.begin(&key).expect("begin");
    let mut u = Unpacker::new(&build.tree_dir(), Limits::default()).expect("unpacker");
    u.apply_layer(digest, Compression::None, std::io::Cursor::new(blob))
        .await
        .expect("apply");
    let want = comparable(snapshot(&build.tree_dir()));
    let farm = tmp.path().join("farm");
    let committed = build.commit(u.finish(), &farm).expect("commit");
    assert!(committed.cached, "{:?}", committed.note);
    wait_for_durable(&cache, &key);
    assert_eq!(comparable(snapshot(&farm)), want);
    assert_eq!(
        std::fs::read_to_string(farm.join(format!("{path}/leaf"))).expect("leaf"),
        "bottom\n"
    );
    let Lookup::Hit(entry) = cache.lookup(&key, &Limits::default()) else {
        panic!("no hit")
    };
    let again = tmp.path().join("again");
    cache.farm(&entry, &again).expect("farm");
    assert_eq!(comparable(snapshot(&again)), want);
}

fn debugfs(img: &Path, request: &str) -> String {
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(img)
        .output()
        .expect("debugfs runs (apt-get install e2fsprogs)");
    assert!(out.status.success(), "debugfs {request}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `Type: ... Mode: ...` and `User: ... Group:` of an image path.
fn image_stat(img: &Path, path: &str) -> (String, u32, u32, u32) {
    let s = debugfs(img, &format!("stat \"{path}\""));
    let field = |name: &str| -> String {
        let at = s
            .find(name)
            .unwrap_or_else(|| panic!("{path}: no {name} in {s}"));
        s[at + name.len()..]
            .split_whitespace()
            .next()
            .expect("value")
            .to_string()
    };
    let kind = field("Type:");
    let mode = u32::from_str_radix(&field("Mode:"), 8).expect("octal");
    let uid = field("User:").parse().expect("uid");
    let gid = field("Group:").parse().expect("gid");
    (kind, mode, uid, gid)
}

#[tokio::test]
async fn images_are_built_straight_from_an_entry_which_is_checked_and_never_changed() {
    use banger_image::ext4::{self, Edit};
    let tmp = tempfile::tempdir().expect("tempdir");
    let reference = unpack_into(&tmp.path().join("reference")).await;
    let cache = TreeCache::open(tmp.path().join("trees")).expect("open");
    let key = key();
    let build = cache.begin(&key).expect("begin");
    let tree = unpack_into(&build.tree_dir()).await;
    let committed = build
        .commit(tree, &tmp.path().join("pull-1"))
        .expect("commit");
    assert!(committed.cached, "{:?}", committed.note);
    wait_for_durable(&cache, &key);
    let Lookup::Hit(entry) = cache.lookup(&key, &Limits::default()) else {
        panic!("no hit after commit")
    };
    // The measurement was kept, and is what walking the tree gives.
    let measured = ext4::measure_tree(&reference.root).expect("measure");
    assert_eq!(entry.usage(), Some(measured));
    assert_eq!(entry.tree_dir(), cache.entry_path(&key).join("tree"));
    assert_eq!(entry.fixups(), &fixups(&reference)[..]);
    let pristine = snapshot(&entry.tree_dir());
    cache.verify(&entry).expect("a sound entry passes");

    // mkfs reads the entry itself; the fixups and then the edits are made
    // inside the image.
    let edits = vec![
        Edit::Remove {
            path: "/etc/passwd".into(),
        },
        Edit::Write {
            path: "/etc/passwd".into(),
            contents: b"banger\n".to_vec(),
            mode: 0o600,
            owner: (0, 0),
        },
        Edit::Mkdir {
            path: "/root".into(),
            mode: 0o700,
            owner: (0, 0),
        },
        Edit::Write {
            path: "/root/keys".into(),
            contents: b"k\n".to_vec(),
            mode: 0o600,
            owner: (7, 8),
        },
        Edit::Symlink {
            path: "/etc/l".into(),
            target: "passwd".into(),
            owner: (0, 0),
        },
        Edit::SetMode {
            path: "/opt".into(),
            mode: 0o041777,
        },
    ];
    let img = tmp.path().join("rootfs.ext4");
    let stats = ext4::build_rootfs_from(
        &entry.tree_dir(),
        measured,
        entry.fixups(),
        &edits,
        &img,
        None,
    )
    .await
    .expect("build");
    assert_eq!(stats.size, ext4::default_size(measured.tree_bytes()));
    assert_eq!(debugfs(&img, "cat /etc/passwd"), "banger\n");
    assert_eq!(image_stat(&img, "/etc/passwd").1, 0o600);
    assert_eq!(debugfs(&img, "cat /etc/motd"), "hello\n");
    assert_eq!(image_stat(&img, "/root"), ("directory".into(), 0o700, 0, 0));
    assert_eq!(
        image_stat(&img, "/root/keys"),
        ("regular".into(), 0o600, 7, 8)
    );
    assert_eq!(image_stat(&img, "/etc/l").0, "symlink");
    assert_eq!(image_stat(&img, "/opt").1, 0o1777);
    // The fixups: setuid and the device node.
    assert_eq!(image_stat(&img, "/usr/bin/su").1, 0o4755);
    assert_eq!(image_stat(&img, "/dev/null").0, "character");
    let fsck = std::process::Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&img)
        .output()
        .expect("e2fsck runs");
    assert!(fsck.status.success(), "e2fsck: {fsck:?}");
    // The entry is exactly as it was, inode numbers and times included.
    assert_eq!(snapshot(&entry.tree_dir()), pristine);
    cache.verify(&entry).expect("still sound");

    // Work seeds: an image of a directory plus edits below it.
    let seed = tmp.path().join("seed.ext4");
    let seed_edits: Vec<Edit> = edits
        .iter()
        .filter_map(|e| e.rebased(Path::new("/root")))
        .collect();
    assert_eq!(seed_edits.len(), 1);
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    ext4::build_from_dir_with(&empty, &seed, 64 << 20, "seed", &seed_edits)
        .await
        .expect("seed");
    assert_eq!(debugfs(&seed, "cat /keys"), "k\n");

    // A tampered entry fails the check: a file rewritten in place (same
    // size), then a file removed, then a fixup's path gone.
    let tree_dir = entry.tree_dir();
    std::fs::write(tree_dir.join("etc/motd"), "HELLO\n").expect("rewrite");
    match cache.verify(&entry) {
        Err(FarmError::Damaged(why)) => assert!(why.contains("paths"), "{why}"),
        other => panic!("a rewritten file passed: {other:?}"),
    }
    std::fs::remove_file(tree_dir.join("opt/b")).expect("rm");
    assert!(matches!(cache.verify(&entry), Err(FarmError::Damaged(_))));
    std::fs::remove_file(tree_dir.join("usr/bin/su")).expect("rm");
    match cache.verify(&entry) {
        Err(FarmError::Damaged(why)) => assert!(why.contains("su"), "{why}"),
        other => panic!("a missing fixup path passed: {other:?}"),
    }
    // An entry removed meanwhile fails it too.
    cache.discard(&key);
    assert!(matches!(cache.verify(&entry), Err(FarmError::Damaged(_))));
    wait_for_no_leftovers(&cache);
}
