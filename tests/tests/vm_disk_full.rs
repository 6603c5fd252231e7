//! A full disk, end to end: the daemon's state directory is a small tmpfs
//! of the test's, filled up after a VM is running. A create then fails
//! with an error that says the disk is full and what to do, leaves nothing
//! behind (no VM, TAP, lease, DNS record, directory or QEMU), and the
//! running VM carries on; once space is freed, the same create works and
//! the daemon has lost nothing (its database still answers and agrees with
//! the host).

use std::os::unix::fs::FileExt;
use std::path::Path;

use banger_protocol::client::ClientError;
use banger_protocol::{ExitStatus, Request, Response, VmCreateRequest, VmState};
use banger_tests::artifacts::run;
use banger_tests::vm::{
    assert_holds_only, busybox_setup_with, exec_eventually, nft_ruleset, vm, vm_config, BOOT, SHORT,
};
use banger_tests::TestDaemon;

/// The state tmpfs: the image, the kernel's modules disk (about 150 MiB
/// for Debian's cloud kernel) and a VM's disks fit with room to spare.
const STATE_MIB: u64 = 640;

fn create(image: &str, name: &str) -> Request {
    Request::VmCreate(VmCreateRequest {
        name: Some(name.into()),
        image: Some(image.into()),
        ..VmCreateRequest::default()
    })
}

/// The Store's ballast (`db.ballast` beside the database) under `state`.
fn ballast(state: &Path) -> Option<std::path::PathBuf> {
    let dir = std::fs::read_dir(state).ok()?;
    dir.filter_map(Result::ok).map(|e| e.path()).find_map(|p| {
        let candidate = p.join("db.ballast");
        if p.file_name().is_some_and(|n| n == "db.ballast") {
            Some(p)
        } else {
            candidate.exists().then_some(candidate)
        }
    })
}

/// Fills the filesystem of `dir` with one file (returned), leaving no
/// block free.
fn fill(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("filler");
    let file = std::fs::File::create(&path).expect("create the filler");
    let stat = nix::sys::statvfs::statvfs(dir).expect("statvfs");
    let free = stat.blocks_available() * stat.fragment_size();
    // SAFETY: fallocate on a file this test owns.
    let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, free as i64) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    // Whatever rounding left: byte by byte at the end, until it refuses.
    let mut at = free;
    while file.write_at(&[1u8; 4096], at).is_ok_and(|n| n > 0) {
        at += 4096;
    }
    let left = nix::sys::statvfs::statvfs(dir).expect("statvfs");
    assert_eq!(left.blocks_available(), 0, "the filesystem is not full");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_a_create_cleanly_and_loses_nothing() {
    let builder = TestDaemon::builder()
        .config(vm_config())
        .state_on_tmpfs(STATE_MIB);
    let (mut d, _reg, image) = busybox_setup_with(builder).await;
    let mut c = d.client().await;

    // A VM runs before the disk fills up (its disks, the image's disk
    // templates and the modules disk exist by then).
    let keep = vm(&mut c, create(&image, "keep"), BOOT).await;
    assert_eq!(keep.state, VmState::Running);
    let nft = nft_ruleset(&d);

    let state = d.paths().state_dir;
    let filler = fill(&state);

    // The create fails, says why and what to do, and leaves nothing.
    let outcome = run(&mut c, create(&image, "full"), BOOT).await;
    let err = match outcome.result {
        Err(ClientError::Daemon(e)) => e,
        other => panic!(
            "a create on a full disk answered {other:?}; progress {:#?}",
            outcome.progress
        ),
    };
    eprintln!("create on a full disk: {err} (hint: {:?})", err.hint);
    assert!(
        err.to_string().contains("No space left on device"),
        "the error must say what failed: {err:?}"
    );
    let hint = err.hint.clone().unwrap_or_default();
    assert!(
        hint.contains("full")
            && hint.contains("free space")
            && hint.contains("half-created VM was removed"),
        "the hint must say the disk is full, what to do, and that nothing was kept: {err:?}"
    );
    assert_holds_only(&d, &mut c, &["keep"], &nft).await;

    // More creates on the full disk. The database may still have room in
    // its file for a reservation, whose undo must then remove the record
    // on a disk with no room at all: the Store frees its ballast for that.
    // After that, writes that add data are refused (no room for the
    // ballast) until space is freed. Each create fails cleanly and says
    // the disk is full.
    let mut store_failed = false;
    for i in 0..60 {
        let outcome = run(&mut c, create(&image, &format!("full{i}")), BOOT).await;
        match outcome.result {
            Err(ClientError::Daemon(e)) => {
                eprintln!("create full{i}: {e} (hint: {:?})", e.hint);
                let hint = e.hint.clone().unwrap_or_default();
                assert!(hint.contains("full"), "create full{i}: {e:?}");
                store_failed |= e.to_string().contains("database");
            }
            other => panic!("create full{i} on a full disk: {other:?}"),
        }
    }
    assert!(store_failed, "the database never ran out of room");
    assert!(
        ballast(&state).is_none(),
        "an undo on the full disk used the store's ballast"
    );
    assert_holds_only(&d, &mut c, &["keep"], &nft).await;
    let (status, out, _) = exec_eventually(&mut c, "keep", &["busybox", "hostname"], SHORT).await;
    assert_eq!((status, out.trim()), (ExitStatus::Code(0), "keep"));

    // Space again: the same create works, and the database lost nothing.
    std::fs::remove_file(&filler).expect("remove the filler");
    let again = vm(&mut c, create(&image, "full"), BOOT).await;
    assert_eq!(again.state, VmState::Running);
    assert!(
        ballast(&state).is_some(),
        "the ballast is made again once there is room"
    );
    assert_holds_only(&d, &mut c, &["keep", "full"], &nft).await;
    let (status, out, _) = exec_eventually(&mut c, "full", &["busybox", "hostname"], SHORT).await;
    assert_eq!((status, out.trim()), (ExitStatus::Code(0), "full"));

    // What is on disk agrees: a daemon started afresh on it finds both
    // VMs and re-adopts them.
    drop(c);
    assert!(d.sigkill().is_some(), "bangerd did not die");
    d.restart();
    let mut c = d.client().await;
    let held = assert_holds_only(&d, &mut c, &["keep", "full"], &nft).await;
    for vm in &held {
        let before = if vm.name == "keep" { &keep } else { &again };
        assert_eq!(
            (vm.id.as_str(), vm.pid),
            (before.id.as_str(), before.pid),
            "{vm:#?}"
        );
    }
    for name in ["keep", "full"] {
        match run(
            &mut c,
            Request::VmDelete {
                name: name.into(),
                force: true,
            },
            SHORT,
        )
        .await
        .result
        {
            Ok(Response::Deleted { .. }) => {}
            other => panic!("delete {name}: {other:?}"),
        }
    }
    assert_holds_only(&d, &mut c, &[], &nft).await;
}
