//! The peer of `vm run`: a QEMU command line written by hand, booting the
//! kernel, initrd and rootfs banger used, as in the ENVIRONMENT.md recipe.
//!
//! What banger's VM ran is read from its QEMU's `/proc/<pid>/cmdline`
//! ([`Reference::parse`]) and only the settings that change how fast the
//! guest runs are carried over: machine, accelerator, CPU model, memory,
//! vCPUs, kernel, initrd and the kernel command line (so the guest takes
//! the same address and hostname). The rest is the recipe
//! ([`Reference::bare_args`]): one virtio disk (a qcow2 overlay of the
//! image's rootfs, like banger's root disk), one virtio NIC on a TAP
//! handed out by the daemon (so it is on the daemon's bridge), the serial
//! console to a file. Not there: banger's work and modules disks, the
//! agent's virtio-serial port, QMP and the pid file.

use std::path::Path;

use anyhow::{anyhow, bail};

/// The settings of banger's QEMU that the bare command reuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `argv[0]`: the QEMU binary banger ran.
    pub qemu: String,
    pub machine: String,
    pub accel: String,
    pub cpu: Option<String>,
    pub memory: String,
    pub smp: String,
    pub kernel: String,
    pub initrd: Option<String>,
    /// The kernel command line, as given to `-append`.
    pub append: String,
    /// The NIC's MAC address (from `-device virtio-net-pci,...,mac=`).
    pub mac: Option<String>,
}

impl Reference {
    /// Parses a NUL-separated `/proc/<pid>/cmdline` of a QEMU banger started.
    pub fn parse(cmdline: &[u8]) -> anyhow::Result<Reference> {
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let qemu = argv
            .first()
            .filter(|a| a.contains("qemu-system"))
            .ok_or_else(|| anyhow!("not a QEMU command line: {argv:?}"))?
            .clone();
        let values = |flag: &str| -> Vec<&str> {
            argv.windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].as_str())
                .collect()
        };
        let one = |flag: &str| -> anyhow::Result<Option<String>> {
            match values(flag).as_slice() {
                [] => Ok(None),
                [v] => Ok(Some(v.to_string())),
                many => bail!("{flag} given {} times in {argv:?}", many.len()),
            }
        };
        let need = |flag: &str| -> anyhow::Result<String> {
            one(flag)?.ok_or_else(|| anyhow!("no {flag} in {argv:?}"))
        };
        let mac = values("-device")
            .into_iter()
            .filter(|d| d.starts_with("virtio-net-pci"))
            .flat_map(|d| d.split(','))
            .find_map(|opt| opt.strip_prefix("mac="))
            .map(str::to_string);
        Ok(Reference {
            machine: one("-machine")?
                .or(one("-M")?)
                .unwrap_or_else(|| "q35".into()),
            accel: need("-accel")?,
            cpu: one("-cpu")?,
            memory: need("-m")?,
            smp: one("-smp")?.unwrap_or_else(|| "1".into()),
            kernel: need("-kernel")?,
            initrd: one("-initrd")?,
            append: need("-append")?,
            mac,
            qemu,
        })
    }

    /// The hand-written command (without the binary): the same kernel,
    /// initrd, command line, machine and CPU settings, `root` as a virtio
    /// disk, a virtio NIC on `tap`, the serial console into `console`.
    pub fn bare_args(&self, root: &Path, tap: &str, console: &Path) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&["-machine", &self.machine, "-accel", &self.accel]);
        if let Some(cpu) = &self.cpu {
            push(&["-cpu", cpu]);
        }
        push(&["-m", &self.memory, "-smp", &self.smp]);
        push(&["-nodefaults", "-display", "none", "-no-reboot"]);
        push(&["-serial", &format!("file:{}", console.display())]);
        push(&["-kernel", &self.kernel]);
        if let Some(initrd) = &self.initrd {
            push(&["-initrd", initrd]);
        }
        push(&["-append", &self.append]);
        push(&[
            "-drive",
            &format!(
                "file={},format=qcow2,if=none,id=root",
                root.display().to_string().replace(',', ",,")
            ),
            "-device",
            "virtio-blk-pci,drive=root",
        ]);
        push(&[
            "-netdev",
            &format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
        ]);
        match &self.mac {
            Some(mac) => push(&["-device", &format!("virtio-net-pci,netdev=net0,mac={mac}")]),
            None => push(&["-device", "virtio-net-pci,netdev=net0"]),
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command line as banger's QEMU backend writes one (abridged paths).
    fn banger_cmdline() -> Vec<u8> {
        let argv = [
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "banger-bench-ssh-1",
            "-machine",
            "q35",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-m",
            "1024M",
            "-smp",
            "2",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-vga",
            "none",
            "-no-reboot",
            "-kernel",
            "/s/kernels/k1/vmlinuz",
            "-initrd",
            "/s/kernels/k1/initrd.img",
            "-append",
            "root=/dev/vda rw net.ifnames=0 panic=5 ip=172.30.0.254::172.30.0.1:255.255.255.0:x:eth0:off console=ttyS0",
            "-drive",
            "file=/s/vms/1/root.qcow2,format=qcow2,if=none,id=root",
            "-device",
            "virtio-blk-pci,drive=root",
            "-drive",
            "file=/s/vms/1/work.ext4,format=raw,if=none,id=work",
            "-device",
            "virtio-blk-pci,drive=work",
            "-netdev",
            "tap,id=net0,ifname=bgtap2,script=no,downscript=no",
            "-device",
            "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56",
            "-chardev",
            "socket,id=agent,path=/r/agent.sock,server=on,wait=off",
            "-device",
            "virtio-serial-pci",
            "-qmp",
            "unix:/r/qmp.sock,server=on,wait=off",
            "-pidfile",
            "/r/qemu.pid",
        ];
        let mut out = Vec::new();
        for a in argv {
            out.extend_from_slice(a.as_bytes());
            out.push(0);
        }
        out
    }

    #[test]
    fn the_reference_is_read_from_proc_cmdline() {
        let r = Reference::parse(&banger_cmdline()).expect("parses");
        assert_eq!(r.qemu, "/usr/bin/qemu-system-x86_64");
        assert_eq!(
            (r.machine.as_str(), r.accel.as_str(), r.cpu.as_deref()),
            ("q35", "tcg,thread=multi", Some("max"))
        );
        assert_eq!((r.memory.as_str(), r.smp.as_str()), ("1024M", "2"));
        assert_eq!(r.kernel, "/s/kernels/k1/vmlinuz");
        assert_eq!(r.initrd.as_deref(), Some("/s/kernels/k1/initrd.img"));
        assert!(r.append.starts_with("root=/dev/vda rw"), "{}", r.append);
        assert!(r.append.ends_with("console=ttyS0"), "{}", r.append);
        assert_eq!(r.mac.as_deref(), Some("52:54:00:12:34:56"));
    }

    /// `args` as `/proc/<pid>/cmdline` has them: each ends in a NUL.
    fn nul_joined(args: &[&str]) -> Vec<u8> {
        args.iter()
            .flat_map(|a| a.bytes().chain(std::iter::once(0)))
            .collect()
    }

    #[test]
    fn a_bad_reference_is_refused() {
        assert!(Reference::parse(&nul_joined(&["/bin/sleep", "10"])).is_err());
        assert!(Reference::parse(b"").is_err());
        let minimum = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "512",
            "-kernel",
            "k",
            "-append",
            "x",
        ];
        // No kernel.
        let mut no_kernel = minimum.to_vec();
        no_kernel.drain(5..7);
        assert!(Reference::parse(&nul_joined(&no_kernel)).is_err());
        // Twice the same flag.
        let mut twice = minimum.to_vec();
        twice.extend(["-m", "1G"]);
        assert!(Reference::parse(&nul_joined(&twice)).is_err());
        // The minimum, with defaults for the rest.
        let r = Reference::parse(&nul_joined(&minimum)).expect("parses");
        assert_eq!((r.machine.as_str(), r.smp.as_str()), ("q35", "1"));
        assert_eq!((r.cpu, r.initrd, r.mac), (None, None, None));
    }

    #[test]
    fn the_bare_command_keeps_the_guest_settings_and_nothing_of_banger() {
        let r = Reference::parse(&banger_cmdline()).expect("parses");
        let a = r.bare_args(
            Path::new("/tmp/b,1/root.qcow2"),
            "bgtap5",
            Path::new("/tmp/b/console.log"),
        );
        let value = |flag: &str| {
            a.windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(value("-accel"), ["tcg,thread=multi"]);
        assert_eq!(value("-cpu"), ["max"]);
        assert_eq!(value("-m"), ["1024M"]);
        assert_eq!(value("-smp"), ["2"]);
        assert_eq!(value("-kernel"), ["/s/kernels/k1/vmlinuz"]);
        assert_eq!(value("-initrd"), ["/s/kernels/k1/initrd.img"]);
        assert_eq!(value("-append"), std::slice::from_ref(&r.append));
        assert_eq!(
            value("-drive"),
            ["file=/tmp/b,,1/root.qcow2,format=qcow2,if=none,id=root"]
        );
        assert_eq!(
            value("-netdev"),
            ["tap,id=net0,ifname=bgtap5,script=no,downscript=no"]
        );
        assert_eq!(
            value("-device"),
            [
                "virtio-blk-pci,drive=root",
                "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56"
            ]
        );
        assert_eq!(value("-serial"), ["file:/tmp/b/console.log"]);
        let text = a.join(" ");
        for absent in [
            "qmp",
            "pidfile",
            "chardev",
            "virtio-serial",
            "work",
            "banger-",
        ] {
            assert!(!text.contains(absent), "{absent} in {text}");
        }
    }
}
