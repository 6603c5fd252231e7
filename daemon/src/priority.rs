//! bangerd's CPU priority (`nice` in config.toml).
//!
//! Linux schedules by autogroup (one per session) when the daemon is not
//! in a CPU cgroup of its own, so a nice value on the threads alone would
//! only rank them against each other: the daemon sets both its
//! autogroup's nice (`/proc/self/autogroup`, when the session is its own)
//! and every thread's. VMMs are
//! started in sessions of their own (`POSIX_SPAWN_SETSID`), which gives
//! them fresh autogroups at 0, with the reset-on-fork flag set on the
//! spawning thread for that moment, so they start at nice 0
//! (`banger_vmm::process::spawn_detached`).

use std::io;

/// What `apply` managed to set.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub threads: usize,
    pub autogroup: bool,
}

/// Sets the nice value of every thread of this process and, where the
/// kernel has autogroups, of this process's autogroup.
pub fn apply(nice: i32) -> io::Result<Applied> {
    let mut applied = Applied::default();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let Some(tid) = entry?
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        // SAFETY: setpriority on one of our own thread ids.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
            let err = io::Error::last_os_error();
            // A thread that has just exited.
            if err.raw_os_error() == Some(libc::ESRCH) {
                continue;
            }
            return Err(err);
        }
        applied.threads += 1;
    }
    // The autogroup is the session's: only a daemon in a session of its
    // own (started by the CLI, which calls setsid, or by systemd) may set
    // it. A bangerd run from a shell shares the shell's, and must not
    // raise the whole terminal session.
    // SAFETY: getsid and getpid have no preconditions.
    let session_leader = unsafe { libc::getsid(0) == libc::getpid() };
    if session_leader {
        match std::fs::write("/proc/self/autogroup", nice.to_string()) {
            Ok(()) => applied.autogroup = true,
            // No autogroup support in this kernel.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(applied)
}

/// This thread's nice value and the autogroup's, as the kernel reports
/// them (for logs and tests).
pub fn current() -> (i32, Option<i32>) {
    // SAFETY: getpriority of the calling thread; errno is cleared first
    // since -1 is a valid result.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    let group = std::fs::read_to_string("/proc/self/autogroup")
        .ok()
        .and_then(|s| s.split_whitespace().last()?.parse().ok());
    (nice, group)
}
