//! Turns a [`MachineSpec`] into a `qemu-system-x86_64` command line.
//!
//! [`validate`] checks a spec against what QEMU and the kernel accept (and
//! reads the file system for the kernel and initrd); [`args`] is pure and
//! builds the argument vector. The run dir layout ([`RunPaths`]) lives here
//! too, so the arguments and the code that later opens the sockets agree.
//!
//! QEMU parses most option values as `key=value,key=value` lists, where a
//! literal comma is written `,,`: every free-form value that lands in such a
//! list (paths, names) goes through [`opt_escape`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use banger_protocol::agent::AGENT_SERIAL_NAME;

use crate::{Accel, DiskFormat, MachineSpec, VmmError, VmmKind};

/// QMP control socket, in the run dir.
pub const QMP_SOCKET: &str = "qmp.sock";
/// A second QMP monitor, only for the handle's event watcher (QEMU serves
/// one client per monitor), in the run dir.
pub const EVENTS_SOCKET: &str = "qmpev.sock";
/// Guest agent virtio-serial port backend, in the run dir.
pub const AGENT_SOCKET: &str = "agent.sock";
/// QEMU's pid file (locked by QEMU while it runs), in the run dir.
pub const PID_FILE: &str = "qemu.pid";
/// QEMU's own stdout and stderr, in the run dir.
pub const LOG_FILE: &str = "qemu.log";

/// Longest Unix socket path (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// Longest kernel command line on x86 (`COMMAND_LINE_SIZE` minus the NUL).
pub const MAX_CMDLINE: usize = 2047;
/// Most vCPUs a spec may ask for.
pub const MAX_VCPUS: u32 = 255;
/// Longest network interface name (`IFNAMSIZ` minus the NUL).
const MAX_IFNAME: usize = 15;

/// The serial console the backend adds unless the command line has one.
const CONSOLE_ARG: &str = "console=ttyS0";

/// Where a VM's files live inside its run dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    pub qmp: PathBuf,
    pub events: PathBuf,
    pub agent: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
}

impl RunPaths {
    pub fn of(run_dir: &Path) -> Self {
        Self {
            qmp: run_dir.join(QMP_SOCKET),
            events: run_dir.join(EVENTS_SOCKET),
            agent: run_dir.join(AGENT_SOCKET),
            pid: run_dir.join(PID_FILE),
            log: run_dir.join(LOG_FILE),
        }
    }
}

fn invalid(reason: impl Into<String>) -> VmmError {
    VmmError::InvalidSpec {
        backend: VmmKind::Qemu,
        reason: reason.into(),
    }
}

/// A path as UTF-8 (the argument vector is `String`s), absolute.
fn utf8_absolute<'a>(what: &str, path: &'a Path) -> Result<&'a str, VmmError> {
    let s = path
        .to_str()
        .ok_or_else(|| invalid(format!("{what} path {} is not UTF-8", path.display())))?;
    if !path.is_absolute() {
        return Err(invalid(format!("{what} path {s} is not absolute")));
    }
    Ok(s)
}

/// A QEMU object id: a letter, then letters, digits, `-`, `.` or `_`.
fn is_qemu_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// A unicast MAC, `xx:xx:xx:xx:xx:xx`.
fn is_unicast_mac(mac: &str) -> bool {
    let octets: Vec<&str> = mac.split(':').collect();
    octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(octets[0], 16).is_ok_and(|first| first & 1 == 0)
}

/// Checks `spec` before anything is started. Reads the file system for the
/// kernel and initrd only; disks are left to QEMU, whose error names the
/// file and the reason (missing, unreadable, locked by another VMM).
pub fn validate(spec: &MachineSpec) -> Result<(), VmmError> {
    if spec.name.is_empty() || spec.name.chars().any(char::is_control) {
        return Err(invalid(format!(
            "VM name {:?} is empty or has control characters",
            spec.name
        )));
    }
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(invalid(format!(
            "{} vCPUs requested; between 1 and {MAX_VCPUS} are supported",
            spec.vcpus
        )));
    }
    if spec.memory_mib == 0 {
        return Err(invalid("memory must be at least 1 MiB"));
    }

    let kernel = utf8_absolute("kernel", &spec.kernel)?;
    if !spec.kernel.is_file() {
        return Err(invalid(format!("kernel {kernel} is not a readable file")));
    }
    if let Some(initrd) = &spec.initrd {
        let s = utf8_absolute("initrd", initrd)?;
        if !initrd.is_file() {
            return Err(invalid(format!("initrd {s} is not a readable file")));
        }
    }

    if spec.cmdline.chars().any(|c| c == '\0' || c == '\n') {
        return Err(invalid("kernel command line has a NUL or newline"));
    }
    let cmdline = kernel_cmdline(&spec.cmdline);
    if cmdline.len() > MAX_CMDLINE {
        return Err(invalid(format!(
            "kernel command line is {} bytes; the limit is {MAX_CMDLINE}",
            cmdline.len()
        )));
    }

    let mut ids = HashSet::new();
    for disk in &spec.disks {
        if !is_qemu_id(&disk.id) {
            return Err(invalid(format!(
                "disk id {:?} must start with a letter and hold only letters, digits, '-', '.', '_'",
                disk.id
            )));
        }
        if !ids.insert(disk.id.as_str()) {
            return Err(invalid(format!("disk id {:?} is used twice", disk.id)));
        }
        utf8_absolute(&format!("disk {}", disk.id), &disk.path)?;
    }

    if let Some(net) = &spec.net {
        let tap_ok = !net.tap.is_empty()
            && net.tap.len() <= MAX_IFNAME
            && net
                .tap
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !tap_ok {
            return Err(invalid(format!(
                "TAP name {:?} is not a valid interface name (1-{MAX_IFNAME} of [A-Za-z0-9._-])",
                net.tap
            )));
        }
        if !is_unicast_mac(&net.mac) {
            return Err(invalid(format!(
                "MAC {:?} is not a unicast xx:xx:xx:xx:xx:xx address",
                net.mac
            )));
        }
    }

    utf8_absolute("run dir", &spec.run_dir)?;
    utf8_absolute("console log", &spec.console_log)?;
    let paths = RunPaths::of(&spec.run_dir);
    for socket in [&paths.qmp, &paths.events, &paths.agent] {
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(invalid(format!(
                "socket path {} is {len} bytes; Unix sockets allow {MAX_SOCKET_PATH} (use a shorter run dir)",
                socket.display()
            )));
        }
    }
    Ok(())
}

/// Escapes a value for QEMU's `key=value,...` option syntax.
pub fn opt_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// The command line with the serial console added, unless it already
/// names a console. Arguments after a `--` belong to init, so the console
/// goes before it.
pub fn kernel_cmdline(cmdline: &str) -> String {
    let cmdline = cmdline.trim();
    // Byte offset of the `--` token, if any.
    let init_args = cmdline
        .split_whitespace()
        .find(|arg| *arg == "--")
        .map(|arg| arg.as_ptr() as usize - cmdline.as_ptr() as usize);
    let kernel_part = &cmdline[..init_args.unwrap_or(cmdline.len())];
    if kernel_part
        .split_whitespace()
        .any(|arg| arg.starts_with("console="))
    {
        return cmdline.to_string();
    }
    let kernel_part = kernel_part.trim_end();
    let mut out = String::with_capacity(cmdline.len() + CONSOLE_ARG.len() + 1);
    out.push_str(kernel_part);
    if !kernel_part.is_empty() {
        out.push(' ');
    }
    out.push_str(CONSOLE_ARG);
    if let Some(offset) = init_args {
        out.push(' ');
        out.push_str(&cmdline[offset..]);
    }
    out
}

/// The `qemu-system-x86_64` arguments for `spec` (without the binary).
/// Pure; call [`validate`] first.
pub fn args(spec: &MachineSpec) -> Vec<String> {
    let paths = RunPaths::of(&spec.run_dir);
    let path = |p: &Path| opt_escape(&p.to_string_lossy());
    let mut a: Vec<String> = Vec::with_capacity(64);
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));

    push(&["-name", &format!("banger-{}", opt_escape(&spec.name))]);
    push(&["-machine", "q35"]);
    match spec.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&["-accel", "tcg,thread=multi", "-cpu", "max"]),
    }
    push(&["-m", &format!("{}M", spec.memory_mib)]);
    push(&["-smp", &spec.vcpus.to_string()]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-vga",
        "none",
    ]);
    // A guest reset (reboot, panic with panic=N) ends QEMU instead of
    // rebooting, so the supervisor sees every guest exit as a process exit.
    push(&["-no-reboot"]);
    // A guest with the pvpanic driver (pvpanic-mmio, autoloaded by udev)
    // reports a panic at once: QEMU then emits GUEST_PANICKED and exits
    // with code 1 instead of waiting for the kernel's panic=N reset.
    push(&["-device", "pvpanic", "-action", "panic=exit-failure"]);

    // -kernel, -initrd and -append are plain strings, not option lists.
    push(&["-kernel", &spec.kernel.to_string_lossy()]);
    if let Some(initrd) = &spec.initrd {
        push(&["-initrd", &initrd.to_string_lossy()]);
    }
    push(&["-append", &kernel_cmdline(&spec.cmdline)]);

    for disk in &spec.disks {
        let format = match disk.format {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        };
        let mut drive = format!(
            "file={},format={format},if=none,id={}",
            path(&disk.path),
            disk.id
        );
        if disk.read_only {
            drive.push_str(",readonly=on");
        }
        push(&["-drive", &drive]);
        push(&["-device", &format!("virtio-blk-pci,drive={}", disk.id)]);
    }

    if let Some(net) = &spec.net {
        push(&[
            "-netdev",
            &format!(
                "tap,id=net0,ifname={},script=no,downscript=no",
                opt_escape(&net.tap)
            ),
            "-device",
            &format!("virtio-net-pci,netdev=net0,mac={}", net.mac),
        ]);
    }

    push(&[
        "-chardev",
        &format!(
            "socket,id=agent,path={},server=on,wait=off",
            path(&paths.agent)
        ),
        "-device",
        "virtio-serial-pci",
        "-device",
        &format!("virtserialport,chardev=agent,name={AGENT_SERIAL_NAME}"),
    ]);
    push(&[
        "-chardev",
        &format!("file,id=console,path={},append=on", path(&spec.console_log)),
        "-serial",
        "chardev:console",
    ]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", path(&paths.qmp)),
        "-qmp",
        &format!("unix:{},server=on,wait=off", path(&paths.events)),
    ]);
    // The pid file is a plain path; QEMU keeps it locked while it runs, so
    // a second QEMU on the same run dir fails instead of sharing it.
    push(&["-pidfile", &paths.pid.to_string_lossy()]);
    a
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{DiskSpec, NetSpec};

    struct Fixture {
        _dir: tempfile::TempDir,
        spec: MachineSpec,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        let initrd = dir.path().join("initrd.img");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        let spec = MachineSpec {
            name: "web".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel,
            initrd: Some(initrd),
            cmdline: "root=/dev/vda rw".into(),
            disks: vec![
                DiskSpec {
                    id: "root".into(),
                    path: "/var/lib/banger/vms/web/root.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    read_only: false,
                },
                DiskSpec {
                    id: "seed".into(),
                    path: "/var/lib/banger/seed.ext4".into(),
                    format: DiskFormat::Raw,
                    read_only: true,
                },
            ],
            net: Some(NetSpec {
                tap: "bgtap0".into(),
                mac: "02:aa:bb:cc:dd:ee".into(),
            }),
            run_dir: "/run/banger/web".into(),
            console_log: "/var/log/banger/web.console".into(),
            accel: Accel::Tcg,
        };
        Fixture { _dir: dir, spec }
    }

    /// The value following `flag`, for each occurrence.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    fn one<'a>(args: &'a [String], flag: &str) -> &'a str {
        let v = values(args, flag);
        assert_eq!(v.len(), 1, "{flag} in {args:?}");
        v[0]
    }

    fn reason(err: VmmError) -> String {
        match err {
            VmmError::InvalidSpec { backend, reason } => {
                assert_eq!(backend, VmmKind::Qemu);
                reason
            }
            other => panic!("expected InvalidSpec, got {other:?}"),
        }
    }

    #[test]
    fn full_tcg_command_line() {
        let f = fixture();
        validate(&f.spec).unwrap();
        let a = args(&f.spec);
        assert_eq!(one(&a, "-name"), "banger-web");
        assert_eq!(one(&a, "-machine"), "q35");
        assert_eq!(one(&a, "-accel"), "tcg,thread=multi");
        assert_eq!(one(&a, "-cpu"), "max");
        assert_eq!(one(&a, "-m"), "512M");
        assert_eq!(one(&a, "-smp"), "2");
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            assert_eq!(a.iter().filter(|x| *x == flag).count(), 1, "{flag}");
        }
        assert_eq!(one(&a, "-display"), "none");
        assert_eq!(one(&a, "-vga"), "none");
        assert_eq!(one(&a, "-kernel"), f.spec.kernel.to_str().unwrap());
        assert_eq!(
            one(&a, "-initrd"),
            f.spec.initrd.as_ref().unwrap().to_str().unwrap()
        );
        assert_eq!(one(&a, "-append"), "root=/dev/vda rw console=ttyS0");
        assert_eq!(
            values(&a, "-qmp"),
            [
                "unix:/run/banger/web/qmp.sock,server=on,wait=off",
                "unix:/run/banger/web/qmpev.sock,server=on,wait=off"
            ]
        );
        assert_eq!(one(&a, "-action"), "panic=exit-failure");
        assert_eq!(one(&a, "-pidfile"), "/run/banger/web/qemu.pid");
        assert_eq!(one(&a, "-serial"), "chardev:console");
        assert_eq!(
            values(&a, "-chardev"),
            [
                "socket,id=agent,path=/run/banger/web/agent.sock,server=on,wait=off",
                "file,id=console,path=/var/log/banger/web.console,append=on",
            ]
        );
        assert_eq!(
            values(&a, "-netdev"),
            ["tap,id=net0,ifname=bgtap0,script=no,downscript=no"]
        );
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let mut f = fixture();
        f.spec.accel = Accel::Kvm;
        let a = args(&f.spec);
        assert_eq!(one(&a, "-accel"), "kvm");
        assert_eq!(one(&a, "-cpu"), "host");
    }

    #[test]
    fn disks_keep_their_order_format_and_read_only_flag() {
        let f = fixture();
        let a = args(&f.spec);
        assert_eq!(
            values(&a, "-drive"),
            [
                "file=/var/lib/banger/vms/web/root.qcow2,format=qcow2,if=none,id=root",
                "file=/var/lib/banger/seed.ext4,format=raw,if=none,id=seed,readonly=on",
            ]
        );
        // Each drive is followed by its device, so the first is /dev/vda.
        assert_eq!(
            values(&a, "-device"),
            [
                "pvpanic",
                "virtio-blk-pci,drive=root",
                "virtio-blk-pci,drive=seed",
                "virtio-net-pci,netdev=net0,mac=02:aa:bb:cc:dd:ee",
                "virtio-serial-pci",
                "virtserialport,chardev=agent,name=banger.agent",
            ]
        );
        let root = a.iter().position(|x| x.contains("id=root")).unwrap();
        assert_eq!(a[root + 1], "-device");
        assert_eq!(a[root + 2], "virtio-blk-pci,drive=root");
    }

    #[test]
    fn no_net_no_initrd_no_disks() {
        let mut f = fixture();
        f.spec.net = None;
        f.spec.initrd = None;
        f.spec.disks.clear();
        validate(&f.spec).unwrap();
        let a = args(&f.spec);
        for flag in ["-netdev", "-initrd", "-drive"] {
            assert!(values(&a, flag).is_empty(), "{flag} in {a:?}");
        }
        assert!(!a.iter().any(|x| x.contains("virtio-net")), "{a:?}");
        assert!(!a.iter().any(|x| x.contains("virtio-blk")), "{a:?}");
    }

    #[test]
    fn console_is_added_once() {
        assert_eq!(kernel_cmdline(""), "console=ttyS0");
        assert_eq!(kernel_cmdline("  quiet "), "quiet console=ttyS0");
        assert_eq!(kernel_cmdline("console=hvc0 quiet"), "console=hvc0 quiet");
        assert_eq!(
            kernel_cmdline("quiet console=ttyS0,115200"),
            "quiet console=ttyS0,115200"
        );
        // `netconsole=` is not a console= argument.
        assert_eq!(
            kernel_cmdline("netconsole=@/,@10.0.0.1/"),
            "netconsole=@/,@10.0.0.1/ console=ttyS0"
        );
        // Init's arguments stay last; a console= among them does not count.
        assert_eq!(
            kernel_cmdline("rdinit=/sbin/poweroff -- -f"),
            "rdinit=/sbin/poweroff console=ttyS0 -- -f"
        );
        assert_eq!(kernel_cmdline("-- console=x"), "console=ttyS0 -- console=x");
        assert_eq!(kernel_cmdline("console=hvc0 -- -f"), "console=hvc0 -- -f");
        let mut f = fixture();
        f.spec.cmdline = "console=ttyS0 panic=1".into();
        assert_eq!(one(&args(&f.spec), "-append"), "console=ttyS0 panic=1");
    }

    #[test]
    fn commas_in_paths_and_names_are_escaped() {
        let mut f = fixture();
        f.spec.name = "a,b".into();
        f.spec.disks[0].path = "/images/x,y.qcow2".into();
        f.spec.run_dir = "/run/b,x".into();
        f.spec.console_log = "/log/c,d".into();
        let a = args(&f.spec);
        assert_eq!(one(&a, "-name"), "banger-a,,b");
        assert!(values(&a, "-drive")[0].starts_with("file=/images/x,,y.qcow2,"));
        assert_eq!(
            values(&a, "-qmp")[0],
            "unix:/run/b,,x/qmp.sock,server=on,wait=off"
        );
        assert_eq!(
            values(&a, "-chardev")[1],
            "file,id=console,path=/log/c,,d,append=on"
        );
        // Not an option list: no escaping.
        assert_eq!(one(&a, "-pidfile"), "/run/b,x/qemu.pid");
    }

    #[test]
    fn invalid_specs_are_rejected_with_a_reason() {
        type Mutation = Box<dyn Fn(&mut MachineSpec)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("vCPUs", Box::new(|s| s.vcpus = 0)),
            ("vCPUs", Box::new(|s| s.vcpus = 1000)),
            ("memory", Box::new(|s| s.memory_mib = 0)),
            ("empty", Box::new(|s| s.name = String::new())),
            (
                "kernel /nonexistent/vmlinuz",
                Box::new(|s| s.kernel = "/nonexistent/vmlinuz".into()),
            ),
            (
                "initrd /nonexistent/initrd",
                Box::new(|s| s.initrd = Some("/nonexistent/initrd".into())),
            ),
            ("not absolute", Box::new(|s| s.run_dir = "run/x".into())),
            (
                "Unix sockets allow 107",
                Box::new(|s| s.run_dir = PathBuf::from(format!("/{}", "r".repeat(100)))),
            ),
            ("newline", Box::new(|s| s.cmdline = "a\nb".into())),
            ("limit is 2047", Box::new(|s| s.cmdline = "x".repeat(2040))),
            ("used twice", Box::new(|s| s.disks[1].id = "root".into())),
            ("disk id", Box::new(|s| s.disks[0].id = "0root".into())),
            ("disk id", Box::new(|s| s.disks[0].id = "ro,ot".into())),
            (
                "TAP name",
                Box::new(|s| s.net.as_mut().unwrap().tap = "a-much-too-long-tap".into()),
            ),
            (
                "TAP name",
                Box::new(|s| s.net.as_mut().unwrap().tap = "tap,x".into()),
            ),
            (
                "MAC",
                Box::new(|s| s.net.as_mut().unwrap().mac = "03:00:00:00:00:01".into()),
            ),
            (
                "MAC",
                Box::new(|s| s.net.as_mut().unwrap().mac = "02:00:00:00:01".into()),
            ),
        ];
        for (expected, mutate) in cases {
            let mut f = fixture();
            mutate(&mut f.spec);
            let reason = reason(validate(&f.spec).unwrap_err());
            assert!(reason.contains(expected), "{expected:?} not in {reason:?}");
        }
    }

    #[test]
    fn the_longest_socket_path_that_fits_is_accepted() {
        let mut f = fixture();
        // "/" + dir + "/agent.sock" = 107 bytes exactly.
        f.spec.run_dir = PathBuf::from(format!("/{}", "r".repeat(107 - 1 - 11)));
        assert_eq!(RunPaths::of(&f.spec.run_dir).agent.as_os_str().len(), 107);
        validate(&f.spec).unwrap();
        f.spec.run_dir = PathBuf::from(format!("/{}", "r".repeat(107 - 11)));
        reason(validate(&f.spec).unwrap_err());
    }
}
