//! Loading kernel modules without `modprobe`: `modules.dep` of
//! `/lib/modules/$(uname -r)` gives each module's file and dependencies,
//! which are loaded first, each with `finit_module(2)`.
//!
//! Debian bookworm ships plain `.ko` files; newer distributions compress
//! them (`.ko.xz` on Debian trixie, `.ko.zst` elsewhere). A compressed module
//! is first offered to the kernel as is (`MODULE_INIT_COMPRESSED_FILE`,
//! Linux 6.6+ built with module decompression); otherwise it is
//! decompressed in memory and loaded with `init_module(2)`.
//!
//! Init mode uses this for `virtio_net`/`virtio_console`/vsock; service
//! mode only when the virtio-serial port is missing and `modprobe` is not
//! there.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `finit_module` flag: the file is compressed, let the kernel decompress it.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot read {path}")]
    ReadDep {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("module {0} is not in modules.dep")]
    Unknown(String),
    #[error("cannot load {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot decompress {path}")]
    Decompress {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: unsupported module compression")]
    Compression { path: PathBuf },
}

/// `modules.dep`, keyed by normalised module name (`-` → `_`).
#[derive(Debug, Clone, Default)]
pub struct ModuleDeps {
    /// Module name → (file relative to the modules directory, direct and
    /// indirect dependencies as listed).
    entries: HashMap<String, (String, Vec<String>)>,
}

/// A module's name from its file path: `kernel/net/virtio-net.ko.xz` →
/// `virtio_net`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

impl ModuleDeps {
    /// Parses the text of `modules.dep` (`path: dep dep ...` per line).
    pub fn parse(text: &str) -> Self {
        let mut entries = HashMap::new();
        for line in text.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim();
            if path.is_empty() {
                continue;
            }
            let deps = deps.split_whitespace().map(module_name).collect();
            entries.insert(module_name(path), (path.to_string(), deps));
        }
        ModuleDeps { entries }
    }

    /// Reads `<dir>/modules.dep`.
    pub fn read(dir: &Path) -> Result<Self, ModuleError> {
        let path = dir.join("modules.dep");
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ModuleError::ReadDep { path, source })?;
        Ok(Self::parse(&text))
    }

    /// The file of `name`, relative to the modules directory.
    pub fn path_of(&self, name: &str) -> Option<&str> {
        self.entries
            .get(&name.replace('-', "_"))
            .map(|(p, _)| p.as_str())
    }

    /// Names to load, dependencies before dependants, each once. Fails on
    /// the first name that is not in `modules.dep` (a built-in module is
    /// not listed there: callers check [`is_loaded`] first).
    pub fn load_order<S: AsRef<str>>(&self, wanted: &[S]) -> Result<Vec<String>, ModuleError> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in wanted {
            let name = name.as_ref().replace('-', "_");
            if !self.entries.contains_key(&name) {
                return Err(ModuleError::Unknown(name));
            }
            self.visit(&name, &mut seen, &mut order);
        }
        Ok(order)
    }

    fn visit(&self, name: &str, seen: &mut HashSet<String>, order: &mut Vec<String>) {
        if !seen.insert(name.to_string()) {
            return;
        }
        if let Some((_, deps)) = self.entries.get(name) {
            // modules.dep lists a module's dependencies nearest first;
            // modprobe loads them from the end of the list.
            for dep in deps.iter().rev() {
                self.visit(dep, seen, order);
            }
        }
        order.push(name.to_string());
    }
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `/lib/modules/<release>`.
pub fn modules_dir() -> PathBuf {
    Path::new("/lib/modules").join(kernel_release())
}

/// Whether the kernel has `name` already (loaded, or built in with
/// parameters or state in sysfs).
pub fn is_loaded(name: &str) -> bool {
    Path::new("/sys/module")
        .join(name.replace('-', "_"))
        .exists()
}

/// Whether `modules.builtin` in `dir` lists `name`.
pub fn is_builtin(dir: &Path, name: &str) -> bool {
    let name = name.replace('-', "_");
    std::fs::read_to_string(dir.join("modules.builtin"))
        .map(|t| t.lines().any(|l| module_name(l.trim()) == name))
        .unwrap_or(false)
}

/// What [`load`] did for one module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    Inserted(String),
    AlreadyThere(String),
}

/// Loads `wanted` and their dependencies from `dir`. Modules that are built
/// in or already loaded are skipped. Stops at the first failure.
pub fn load(dir: &Path, wanted: &[&str]) -> Result<Vec<Loaded>, ModuleError> {
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|m| !is_loaded(m) && !is_builtin(dir, m))
        .collect();
    if missing.is_empty() {
        return Ok(wanted
            .iter()
            .map(|m| Loaded::AlreadyThere(m.to_string()))
            .collect());
    }
    let deps = ModuleDeps::read(dir)?;
    let mut done = Vec::new();
    for name in deps.load_order(&missing)? {
        if is_loaded(&name) {
            done.push(Loaded::AlreadyThere(name));
            continue;
        }
        let Some(rel) = deps.path_of(&name) else {
            return Err(ModuleError::Unknown(name));
        };
        if insert_file(&dir.join(rel))? {
            done.push(Loaded::Inserted(name));
        } else {
            done.push(Loaded::AlreadyThere(name));
        }
    }
    Ok(done)
}

/// Inserts one module file; `Ok(false)` when the kernel already had it.
pub fn insert_file(path: &Path) -> Result<bool, ModuleError> {
    let load_err = |source| ModuleError::Load {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(load_err)?;
    let name = path.to_string_lossy();
    let compressed = name.ends_with(".xz") || name.ends_with(".zst");
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    match finit_module(&file, flags) {
        Ok(()) => return Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(false),
        // The kernel cannot decompress this itself: do it here.
        Err(e)
            if compressed
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOEXEC)
                ) => {}
        Err(e) => return Err(load_err(e)),
    }
    let image = decompress(path, file)?;
    match init_module(&image) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(load_err(e)),
    }
}

/// The uncompressed bytes of a `.ko.xz` / `.ko.zst` file.
pub fn decompress(path: &Path, file: File) -> Result<Vec<u8>, ModuleError> {
    let name = path.to_string_lossy();
    let mut out = Vec::new();
    let result = if name.ends_with(".zst") {
        zstd::stream::read::Decoder::new(file).and_then(|mut d| d.read_to_end(&mut out))
    } else if name.ends_with(".xz") {
        liblzma::read::XzDecoder::new(file).read_to_end(&mut out)
    } else {
        return Err(ModuleError::Compression {
            path: path.to_path_buf(),
        });
    };
    result.map_err(|source| ModuleError::Decompress {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(out)
}

fn finit_module(file: &File, flags: libc::c_uint) -> io::Result<()> {
    let params = c"";
    // SAFETY: a valid open fd and a NUL-terminated parameter string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn init_module(image: &[u8]) -> io::Result<()> {
    let params = c"";
    // SAFETY: the pointer and length describe `image`, which outlives the
    // call; the parameter string is NUL-terminated.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_init_module,
            image.as_ptr(),
            image.len() as libc::c_ulong,
            params.as_ptr(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    // The lines of Debian bookworm's 6.1 cloud kernel for these modules.
    const DEP: &str = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/crypto/crc32c-generic.ko.xz:
kernel/fs/thing.ko.zst: kernel/crypto/crc32c-generic.ko.xz
";

    fn pos(order: &[String], name: &str) -> usize {
        order
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name} missing from {order:?}"))
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(
            module_name("kernel/drivers/net/virtio_net.ko"),
            "virtio_net"
        );
        assert_eq!(
            module_name("kernel/crypto/crc32c-generic.ko.xz"),
            "crc32c_generic"
        );
        assert_eq!(module_name("thing.ko.zst"), "thing");
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let deps = ModuleDeps::parse(DEP);
        let order = deps
            .load_order(&["virtio_net", "virtio_console"])
            .expect("order");
        assert_eq!(order.len(), 6, "{order:?}");
        assert!(pos(&order, "virtio_ring") < pos(&order, "virtio"));
        assert!(pos(&order, "virtio") < pos(&order, "virtio_net"));
        assert!(pos(&order, "failover") < pos(&order, "net_failover"));
        assert!(pos(&order, "net_failover") < pos(&order, "virtio_net"));
        assert!(pos(&order, "virtio") < pos(&order, "virtio_console"));
        assert_eq!(
            deps.load_order(&["thing"]).expect("order"),
            vec!["crc32c_generic".to_string(), "thing".to_string()]
        );
        assert_eq!(
            deps.path_of("crc32c-generic"),
            Some("kernel/crypto/crc32c-generic.ko.xz")
        );
    }

    #[test]
    fn unknown_module_is_an_error() {
        let deps = ModuleDeps::parse(DEP);
        let err = deps.load_order(&["nope"]).expect_err("unknown");
        assert!(
            matches!(err, ModuleError::Unknown(ref n) if n == "nope"),
            "{err}"
        );
    }

    #[test]
    fn cycles_do_not_loop() {
        let deps = ModuleDeps::parse("a.ko: b.ko\nb.ko: a.ko\n");
        let order = deps.load_order(&["a"]).expect("order");
        assert_eq!(order, vec!["b".to_string(), "a".to_string()]);
    }

    #[test]
    fn real_modules_dep_when_installed() {
        // The host's Debian kernel modules, when there (the CI machine has
        // bookworm's cloud kernel). Nothing is loaded.
        let Ok(dirs) = std::fs::read_dir("/lib/modules") else {
            return;
        };
        for dir in dirs.flatten() {
            let Ok(deps) = ModuleDeps::read(&dir.path()) else {
                continue;
            };
            if deps.path_of("virtio_net").is_none() {
                continue;
            }
            let order = deps.load_order(&["virtio_net"]).expect("order");
            assert_eq!(order.last().map(String::as_str), Some("virtio_net"));
            assert!(
                order.iter().any(|m| m == "virtio_ring") || is_builtin(&dir.path(), "virtio_ring")
            );
        }
    }

    #[test]
    fn decompresses_xz_and_zstd() {
        let dir = tempfile::tempdir().expect("tempdir");
        let payload = b"\x7fELF not really a module".repeat(100);

        let zst = dir.path().join("m.ko.zst");
        std::fs::write(&zst, zstd::encode_all(&payload[..], 3).expect("zstd")).expect("write");
        let got = decompress(&zst, File::open(&zst).expect("open")).expect("zstd decode");
        assert_eq!(got, payload);

        let xz = dir.path().join("m.ko.xz");
        let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 6);
        enc.write_all(&payload).expect("xz");
        std::fs::write(&xz, enc.finish().expect("xz")).expect("write");
        let got = decompress(&xz, File::open(&xz).expect("open")).expect("xz decode");
        assert_eq!(got, payload);

        let gz = dir.path().join("m.ko.gz");
        std::fs::write(&gz, b"x").expect("write");
        assert!(matches!(
            decompress(&gz, File::open(&gz).expect("open")),
            Err(ModuleError::Compression { .. })
        ));
    }
}
