//! `posix_spawn` of a detached child: a session of its own, nice 0,
//! stdin from /dev/null, stdout and stderr on a given file, the default
//! disposition for the signals bangerd may ignore, and an empty signal
//! mask. See [`crate::process::spawn_detached`] for why.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::process::Command;

/// Signals reset to their default action in the child. Only an ignored
/// signal survives `exec` (handlers do not), and Rust ignores `SIGPIPE`;
/// the others are there in case a library of bangerd ignores one.
pub(crate) const DEFAULT_SIGNALS: [libc::c_int; 8] = [
    libc::SIGPIPE,
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGCHLD,
];

/// Spawns `cmd` (its program looked up on `PATH` unless it has a `/`, its
/// arguments, the daemon's environment with `cmd`'s changes) as the
/// leader of a new session, with stdout and stderr on `out`. Returns the
/// pid once the program has been executed; an `exec` failure (say, no
/// such file) is the error.
pub(crate) fn in_new_session(cmd: &Command, out: &File) -> io::Result<u32> {
    if cmd.get_current_dir().is_some() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a working directory is not supported for a detached process",
        ));
    }
    let program = cstring(cmd.get_program())?;
    let mut args = vec![program.clone()];
    for arg in cmd.get_args() {
        args.push(cstring(arg)?);
    }
    let env = environment(cmd)?;
    let out = out.as_raw_fd();
    // The child inherits the nice value of the thread that spawns it
    // (Linux's nice value is per thread), and bangerd's threads run at its
    // configured `nice` (-10 by default).
    match thread_nice() {
        0 => spawn(&program, &args, &env, out),
        // A negative value: the kernel's reset-on-fork flag, set on this
        // thread for the moment of the spawn, starts the child at 0.
        nice if nice < 0 => match ResetOnFork::set() {
            Some(_reset) => spawn(&program, &args, &env, out),
            None => spawn_from_nice_0_thread(&program, &args, &env, out),
        },
        // A positive one (reset-on-fork only resets negative values).
        _ => spawn_from_nice_0_thread(&program, &args, &env, out),
    }
}

/// The calling thread's nice value.
pub(crate) fn thread_nice() -> i32 {
    // SAFETY: getpriority on the calling thread. -1 is also a valid
    // value; errno tells them apart, and an error (impossible for the
    // calling thread) reads as 0.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        if nice == -1 && *libc::__errno_location() != 0 {
            0
        } else {
            nice
        }
    }
}

/// `SCHED_RESET_ON_FORK` (linux/sched.h), or-ed into a policy.
const SCHED_RESET_ON_FORK: libc::c_int = 0x4000_0000;

/// The reset-on-fork flag on the calling thread (`SCHED_OTHER`, its nice
/// value kept), cleared again on drop. A child forked meanwhile starts at
/// nice 0 and without the flag. This spawns from the calling thread
/// itself: before, a thread of its own was made at nice 0 for each spawn,
/// and under load that thread and the child waited several milliseconds
/// for a CPU behind bangerd's own threads at nice -10.
struct ResetOnFork;

impl ResetOnFork {
    /// `None` when the thread has another policy or the flag cannot be set.
    fn set() -> Option<ResetOnFork> {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: scheduling calls on the calling thread (pid 0).
        unsafe {
            if libc::sched_getscheduler(0) != libc::SCHED_OTHER {
                return None;
            }
            (libc::sched_setscheduler(0, libc::SCHED_OTHER | SCHED_RESET_ON_FORK, &param) == 0)
                .then_some(ResetOnFork)
        }
    }
}

impl Drop for ResetOnFork {
    fn drop(&mut self) {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: as in `set`. Clearing the flag needs CAP_SYS_NICE, which
        // a daemon that could lower its nice value has; without it, threads
        // this one starts later begin at nice 0.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) } != 0 {
            tracing::warn!(
                error = %io::Error::last_os_error(),
                "cannot clear reset-on-fork after spawning a VMM"
            );
        }
    }
}

/// The fallback: the spawn from a short-lived thread of our own set to
/// nice 0. Raising a nice value is always allowed; lowering it (from a
/// positive configured `nice`) may not be, and then the child keeps it.
fn spawn_from_nice_0_thread(
    program: &CString,
    args: &[CString],
    env: &[CString],
    out: i32,
) -> io::Result<u32> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setpriority on the calling thread touches no Rust state.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 0) };
                spawn(program, args, env, out)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the spawning thread panicked")))
    })
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{s:?} contains a NUL byte"),
        )
    })
}

/// `NAME=value` for the daemon's environment with `cmd`'s changes applied.
fn environment(cmd: &Command) -> io::Result<Vec<CString>> {
    let mut vars: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    for (key, value) in cmd.get_envs() {
        vars.retain(|(k, _)| k != key);
        if let Some(value) = value {
            vars.push((key.to_os_string(), value.to_os_string()));
        }
    }
    vars.into_iter()
        .map(|(k, v)| {
            let mut entry = k.into_vec();
            entry.push(b'=');
            entry.extend(v.into_vec());
            CString::new(entry).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "an environment variable contains a NUL byte",
                )
            })
        })
        .collect()
}

/// Checks a `posix_spawn*` return value (they return the error number).
fn check(rc: libc::c_int) -> io::Result<()> {
    match rc {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Owns the attribute and file-action objects, destroyed on every path.
struct Spawn {
    attr: libc::posix_spawnattr_t,
    actions: libc::posix_spawn_file_actions_t,
}

impl Drop for Spawn {
    fn drop(&mut self) {
        // SAFETY: both were initialised by `Spawn::new` and are destroyed once.
        unsafe {
            libc::posix_spawnattr_destroy(&mut self.attr);
            libc::posix_spawn_file_actions_destroy(&mut self.actions);
        }
    }
}

fn spawn(program: &CString, args: &[CString], env: &[CString], out: i32) -> io::Result<u32> {
    // SAFETY: the objects are initialised before use and destroyed by
    // `Spawn`'s drop (a failed init leaks nothing: the struct is built
    // only after both succeed). Every pointer passed lives until
    // posix_spawnp returns; argv and envp are NULL-terminated.
    unsafe {
        let mut attr = std::mem::zeroed::<libc::posix_spawnattr_t>();
        check(libc::posix_spawnattr_init(&mut attr))?;
        let mut actions = std::mem::zeroed::<libc::posix_spawn_file_actions_t>();
        if let Err(e) = check(libc::posix_spawn_file_actions_init(&mut actions)) {
            libc::posix_spawnattr_destroy(&mut attr);
            return Err(e);
        }
        let mut s = Spawn { attr, actions };

        let mut defaults = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut defaults);
        for signal in DEFAULT_SIGNALS {
            libc::sigaddset(&mut defaults, signal);
        }
        let mut mask = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut mask);
        check(libc::posix_spawnattr_setsigdefault(&mut s.attr, &defaults))?;
        check(libc::posix_spawnattr_setsigmask(&mut s.attr, &mask))?;
        let flags = libc::POSIX_SPAWN_SETSID
            | libc::POSIX_SPAWN_SETSIGDEF as libc::c_short
            | libc::POSIX_SPAWN_SETSIGMASK as libc::c_short;
        check(libc::posix_spawnattr_setflags(&mut s.attr, flags))?;

        check(libc::posix_spawn_file_actions_addopen(
            &mut s.actions,
            0,
            c"/dev/null".as_ptr(),
            libc::O_RDONLY,
            0,
        ))?;
        // dup2 clears close-on-exec on the copies (the original is
        // close-on-exec, as every file Rust opens).
        check(libc::posix_spawn_file_actions_adddup2(
            &mut s.actions,
            out,
            1,
        ))?;
        check(libc::posix_spawn_file_actions_adddup2(
            &mut s.actions,
            out,
            2,
        ))?;

        let mut argv: Vec<*mut libc::c_char> = args.iter().map(|a| a.as_ptr().cast_mut()).collect();
        argv.push(std::ptr::null_mut());
        let mut envp: Vec<*mut libc::c_char> = env.iter().map(|e| e.as_ptr().cast_mut()).collect();
        envp.push(std::ptr::null_mut());

        let mut pid: libc::pid_t = 0;
        check(libc::posix_spawnp(
            &mut pid,
            program.as_ptr(),
            &s.actions,
            &s.attr,
            argv.as_ptr(),
            envp.as_ptr(),
        ))?;
        u32::try_from(pid).map_err(|_| io::Error::other(format!("posix_spawnp gave pid {pid}")))
    }
}
