//! What banger puts into every image it builds, before the ext4 is made:
//!
//! - the managed SSH key's public half in `/root/.ssh/authorized_keys`
//!   (dir 0700, file 0600, owned by root); the key pair (ed25519) is
//!   created on first use in `<config>/ssh/`;
//! - `/etc/hostname` (the image name; each VM gets its own later);
//! - network bootstrap: where the image has systemd-networkd,
//!   `systemd-network-generator` and `systemd-networkd` are enabled, so the
//!   `ip=` / `nameserver=` kernel parameters banger passes to each VM
//!   configure its NIC (matched by the name the kernel gives it);
//! - `/etc/banger/image.json` describing the image;
//! - no SSH host keys: the image's are deleted, and each VM makes its own
//!   on first boot (under systemd, `banger-ssh-host-keys.service` makes an
//!   ed25519 key before sshd; as init, the agent runs `ssh-keygen -A`);
//! - the guest agent (when bangerd has one): `init=` for images without
//!   systemd, else `banger-agent.service`, which also mounts the work disk
//!   on `/root` (without the agent, an `/etc/fstab` line does);
//!
//! and builds the **work seed**: a small ext4 image of the tree's `/root`
//! that each VM's work disk is cloned from.
//!
//! The tree was unpacked from untrusted layers, so every path here is
//! resolved inside it with `cap-std` (symlinks cannot lead outside); an
//! existing symlink where banger writes a file is replaced, and a symlink
//! where banger needs a directory is an error.
//!
//! Injection runs against a [`Target`]: either the tree itself ([`inject`],
//! which writes into it), or a read-only tree plus a list of
//! [`Edit`]s for `debugfs` to make in the image built from it ([`plan`]:
//! a warm pull builds straight from the tree cache, whose tree must not
//! change). Both make the same decisions from the same reads; the plan's
//! paths are resolved (symlinked directories followed, inside the tree,
//! as `cap-std` does) before they reach debugfs.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use banger_image::ext4::Edit;

use banger_protocol::{ErrorData, ErrorKind};
use cap_std::ambient_authority;
use cap_std::fs::{Dir, DirBuilder, OpenOptions, Permissions};
use cap_std::fs::{DirBuilderExt, PermissionsExt};

/// Label of the work disk's filesystem (the guest mounts it on /root).
pub const WORK_LABEL: &str = "banger-work";

/// The managed SSH key pair.
#[derive(Debug, Clone)]
pub struct ManagedKey {
    pub private_path: PathBuf,
    /// OpenSSH public key line.
    pub public: String,
}

fn internal(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ErrorData {
    let what = what.into();
    move |e| ErrorData::from_error(ErrorKind::Internal, &e).with_cause(what)
}

/// Returns the managed key, creating it on first use. Safe against
/// concurrent first uses: the key is written under a temporary name and
/// linked into place only if none exists yet.
pub fn ensure_ssh_key(config_dir: &Path) -> Result<ManagedKey, ErrorData> {
    use ssh_key::{rand_core::OsRng, Algorithm, LineEnding, PrivateKey};
    let dir = config_dir.join("ssh");
    let private_path = dir.join("id_ed25519");
    let public_path = dir.join("id_ed25519.pub");
    if !private_path.exists() {
        std::fs::create_dir_all(&dir).map_err(internal(format!("creating {}", dir.display())))?;
        let key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(|e| {
            ErrorData::new(
                ErrorKind::Internal,
                format!("generating the SSH key failed: {e}"),
            )
        })?;
        let private = key.to_openssh(LineEnding::LF).map_err(|e| {
            ErrorData::new(
                ErrorKind::Internal,
                format!("encoding the SSH key failed: {e}"),
            )
        })?;
        let public = key.public_key().to_openssh().map_err(|e| {
            ErrorData::new(
                ErrorKind::Internal,
                format!("encoding the SSH key failed: {e}"),
            )
        })?;
        let tmp = dir.join(format!(".id_ed25519.{}", crate::layout::new_id()));
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(private.as_bytes())?;
            f.sync_all()?;
            std::fs::write(&public_path, format!("{public} banger\n"))?;
            match std::fs::hard_link(&tmp, &private_path) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
                _ => Ok(()),
            }
        };
        let res = write();
        let _ = std::fs::remove_file(&tmp);
        res.map_err(internal(format!("writing {}", private_path.display())))?;
    }
    // Derive the public half from the private key, so the two always match.
    let private = std::fs::read_to_string(&private_path)
        .map_err(internal(format!("reading {}", private_path.display())))?;
    let key = ssh_key::PrivateKey::from_openssh(&private).map_err(|e| {
        ErrorData::new(
            ErrorKind::Internal,
            format!(
                "the managed SSH key {} is unreadable: {e}",
                private_path.display()
            ),
        )
        .with_hint("move it away; banger creates a new one")
    })?;
    let public = key.public_key().to_openssh().map_err(|e| {
        ErrorData::new(
            ErrorKind::Internal,
            format!("encoding the SSH key failed: {e}"),
        )
    })?;
    Ok(ManagedKey {
        private_path,
        public,
    })
}

/// Facts about an unpacked tree that decide how VMs boot it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeFacts {
    pub has_init: bool,
    pub has_sshd: bool,
    pub has_systemd: bool,
    pub has_networkd: bool,
}

fn exists(root: &Dir, path: &str) -> bool {
    root.symlink_metadata(path).is_ok()
}

pub fn detect(root: &Dir) -> TreeFacts {
    let has_systemd = ["lib/systemd/systemd", "usr/lib/systemd/systemd"]
        .iter()
        .any(|p| exists(root, p));
    TreeFacts {
        has_init: has_systemd
            || ["sbin/init", "usr/sbin/init", "bin/init"]
                .iter()
                .any(|p| exists(root, p)),
        has_sshd: ["usr/sbin/sshd", "sbin/sshd"]
            .iter()
            .any(|p| exists(root, p)),
        has_systemd,
        has_networkd: [
            "lib/systemd/system/systemd-networkd.service",
            "usr/lib/systemd/system/systemd-networkd.service",
        ]
        .iter()
        .any(|p| exists(root, p)),
    }
}

/// What is at a path (the last component not followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

impl Kind {
    fn of(meta: &cap_std::fs::Metadata) -> Kind {
        let ft = meta.file_type();
        if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_symlink() {
            Kind::Symlink
        } else {
            Kind::Other
        }
    }
}

/// Where injection reads and writes. Paths are relative to the image root
/// (`etc/hostname`).
trait Target {
    /// The tree as it was before injection (detection reads it).
    fn base(&self) -> &Dir;
    /// What is at `path` now, if anything.
    fn kind(&self, path: &str) -> Option<Kind>;
    /// A file's contents (a final symlink followed, inside the tree).
    fn read_to_string(&self, path: &str) -> std::io::Result<String>;
    /// Names of the entries of directory `path` that are not directories.
    fn non_dirs_in(&self, path: &str) -> std::io::Result<Vec<String>>;
    /// `mkdir -p` with `mode` (less the umask) for what it creates.
    fn create_dir_all(&mut self, path: &str, mode: u32) -> std::io::Result<()>;
    /// Removes a non-directory.
    fn remove_file(&mut self, path: &str) -> std::io::Result<()>;
    /// Creates a new file (nothing may be at `path`) with exactly `mode`.
    fn create_file(&mut self, path: &str, contents: &[u8], mode: u32) -> std::io::Result<()>;
    /// [`Self::create_file`] with the contents of the host file `source`.
    fn copy_file(&mut self, path: &str, source: &Path, mode: u32) -> std::io::Result<()>;
    /// Sets the permission bits (a final symlink followed).
    fn set_mode(&mut self, path: &str, mode: u32) -> std::io::Result<()>;
    /// Gives `path` to root:root when bangerd runs as root.
    fn chown_root(&mut self, path: &str) -> Result<(), ErrorData>;
    /// Creates the symlink `link` -> `target`.
    fn symlink(&mut self, target: &str, link: &str) -> std::io::Result<()>;

    fn exists(&self, path: &str) -> bool {
        self.kind(path).is_some()
    }
}

/// The tree itself: injection writes into it.
struct HostTree(Dir);

impl Target for HostTree {
    fn base(&self) -> &Dir {
        &self.0
    }

    fn kind(&self, path: &str) -> Option<Kind> {
        self.0.symlink_metadata(path).ok().map(|m| Kind::of(&m))
    }

    fn read_to_string(&self, path: &str) -> std::io::Result<String> {
        self.0.read_to_string(path)
    }

    fn non_dirs_in(&self, path: &str) -> std::io::Result<Vec<String>> {
        let dir = self.0.open_dir(path)?;
        Ok(dir
            .entries()?
            .flatten()
            .filter(|e| !e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    }

    fn create_dir_all(&mut self, path: &str, mode: u32) -> std::io::Result<()> {
        let mut builder = DirBuilder::new();
        builder.recursive(true).mode(mode);
        self.0.create_dir_with(path, &builder)
    }

    fn remove_file(&mut self, path: &str) -> std::io::Result<()> {
        self.0.remove_file(path)
    }

    fn create_file(&mut self, path: &str, contents: &[u8], mode: u32) -> std::io::Result<()> {
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        let mut file = self.0.open_with(path, &opts)?;
        file.write_all(contents)?;
        self.0.set_permissions(path, Permissions::from_mode(mode))
    }

    fn copy_file(&mut self, path: &str, source: &Path, mode: u32) -> std::io::Result<()> {
        let bytes = std::fs::read(source)?;
        self.create_file(path, &bytes, mode)
    }

    fn set_mode(&mut self, path: &str, mode: u32) -> std::io::Result<()> {
        self.0.set_permissions(path, Permissions::from_mode(mode))
    }

    fn chown_root(&mut self, path: &str) -> Result<(), ErrorData> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(());
        }
        nix::unistd::fchownat(
            Some(self.0.as_raw_fd()),
            path,
            Some(nix::unistd::Uid::from_raw(0)),
            Some(nix::unistd::Gid::from_raw(0)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| {
            ErrorData::new(
                ErrorKind::Internal,
                format!("chown /{path} in the image: {e}"),
            )
        })
    }

    fn symlink(&mut self, target: &str, link: &str) -> std::io::Result<()> {
        self.0.symlink(target, link)
    }
}

/// What [`PlanTree`] has changed at a (resolved) path.
#[derive(Debug, Clone)]
enum Planned {
    Dir,
    File(Vec<u8>),
    /// A file with the contents of this host file.
    Copy(PathBuf),
    Symlink,
    Gone,
}

/// A tree that is only read, and the [`Edit`]s that make the image built
/// from it what [`HostTree`] would have made of the tree.
struct PlanTree {
    base: Dir,
    /// Changes so far, by resolved path.
    planned: HashMap<String, Planned>,
    edits: Vec<Edit>,
    /// Who owns what bangerd creates (the host would give it bangerd's).
    owner: (u32, u32),
    umask: u32,
}

fn not_found(path: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("/{path} does not exist"),
    )
}

fn image_path(resolved: &str) -> PathBuf {
    Path::new("/").join(resolved)
}

/// The process's umask (`/proc/self/status`), 022 when unknown.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

impl PlanTree {
    fn new(base: Dir) -> Self {
        PlanTree {
            base,
            planned: HashMap::new(),
            edits: Vec::new(),
            owner: (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
            umask: umask(),
        }
    }

    /// `path` with every directory before its last component resolved:
    /// symlinks followed inside the tree (`cap-std`: an absolute or
    /// escaping one is an error), so that debugfs, which does not follow
    /// them there, meets only real directories.
    fn resolve(&self, path: &str) -> std::io::Result<String> {
        let parts: Vec<&str> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        let mut cur = String::new();
        for (i, part) in parts.iter().enumerate() {
            if *part == ".." {
                return Err(std::io::Error::other(format!("/{path}: `..` in a path")));
            }
            let next = if cur.is_empty() {
                part.to_string()
            } else {
                format!("{cur}/{part}")
            };
            let last = i + 1 == parts.len();
            if last || self.planned.contains_key(&next) {
                cur = next;
                continue;
            }
            cur = match self.base.symlink_metadata(&next) {
                Ok(m) if m.file_type().is_symlink() => {
                    let real = self.base.canonicalize(&next)?;
                    real.to_str()
                        .ok_or_else(|| std::io::Error::other(format!("/{next}: not UTF-8")))?
                        .trim_start_matches('/')
                        .to_string()
                }
                _ => next,
            };
        }
        Ok(cur)
    }

    fn kind_resolved(&self, resolved: &str) -> Option<Kind> {
        if resolved.is_empty() {
            return Some(Kind::Dir);
        }
        match self.planned.get(resolved) {
            Some(Planned::Gone) => None,
            Some(Planned::Dir) => Some(Kind::Dir),
            Some(Planned::File(_)) | Some(Planned::Copy(_)) => Some(Kind::File),
            Some(Planned::Symlink) => Some(Kind::Symlink),
            None => self
                .base
                .symlink_metadata(resolved)
                .ok()
                .map(|m| Kind::of(&m)),
        }
    }

    /// `path` resolved, for a new entry: nothing there yet, and its
    /// parent a directory.
    fn free_slot(&self, path: &str) -> std::io::Result<String> {
        let resolved = self.resolve(path)?;
        if self.kind_resolved(&resolved).is_some() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("/{path} exists"),
            ));
        }
        if !self.parent_is_dir(&resolved) {
            return Err(not_found(path));
        }
        Ok(resolved)
    }

    fn parent_is_dir(&self, resolved: &str) -> bool {
        match resolved.rsplit_once('/') {
            None => true,
            Some((parent, _)) => self.kind_resolved(parent) == Some(Kind::Dir),
        }
    }

    fn into_edits(self) -> Vec<Edit> {
        self.edits
    }
}

impl Target for PlanTree {
    fn base(&self) -> &Dir {
        &self.base
    }

    fn kind(&self, path: &str) -> Option<Kind> {
        let resolved = self.resolve(path).ok()?;
        self.kind_resolved(&resolved)
    }

    fn read_to_string(&self, path: &str) -> std::io::Result<String> {
        let resolved = self.resolve(path)?;
        match self.planned.get(&resolved) {
            Some(Planned::File(bytes)) => Ok(String::from_utf8_lossy(bytes).into_owned()),
            Some(Planned::Copy(source)) => std::fs::read_to_string(source),
            Some(Planned::Gone) | Some(Planned::Dir) => Err(not_found(path)),
            Some(Planned::Symlink) => Err(std::io::Error::other(format!(
                "/{path} is a symlink banger made"
            ))),
            None => self.base.read_to_string(&resolved),
        }
    }

    fn non_dirs_in(&self, path: &str) -> std::io::Result<Vec<String>> {
        let resolved = self.resolve(path)?;
        let mut names = Vec::new();
        if !matches!(self.planned.get(&resolved), Some(Planned::Dir)) {
            for entry in self.base.open_dir(&resolved)?.entries()?.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                if !matches!(
                    self.planned.get(&format!("{resolved}/{name}")),
                    Some(Planned::Gone)
                ) {
                    names.push(name);
                }
            }
        }
        let prefix = format!("{resolved}/");
        for (p, what) in &self.planned {
            if let Some(name) = p.strip_prefix(&prefix) {
                if !name.contains('/')
                    && matches!(what, Planned::File(_) | Planned::Copy(_) | Planned::Symlink)
                    && !names.iter().any(|n| n == name)
                {
                    names.push(name.to_string());
                }
            }
        }
        Ok(names)
    }

    fn create_dir_all(&mut self, path: &str, mode: u32) -> std::io::Result<()> {
        let resolved = self.resolve(path)?;
        let mut cur = String::new();
        for part in resolved.split('/') {
            cur = if cur.is_empty() {
                part.to_string()
            } else {
                format!("{cur}/{part}")
            };
            match self.kind_resolved(&cur) {
                Some(Kind::Dir) => {}
                Some(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        format!("/{cur} is not a directory"),
                    ))
                }
                None => {
                    self.edits.push(Edit::Mkdir {
                        path: image_path(&cur),
                        mode: mode & !self.umask & 0o7777,
                        owner: self.owner,
                    });
                    self.planned.insert(cur.clone(), Planned::Dir);
                }
            }
        }
        Ok(())
    }

    fn remove_file(&mut self, path: &str) -> std::io::Result<()> {
        let resolved = self.resolve(path)?;
        match self.kind_resolved(&resolved) {
            None => Err(not_found(path)),
            Some(Kind::Dir) => Err(std::io::Error::other(format!("/{path} is a directory"))),
            Some(_) => {
                self.edits.push(Edit::Remove {
                    path: image_path(&resolved),
                });
                self.planned.insert(resolved, Planned::Gone);
                Ok(())
            }
        }
    }

    fn create_file(&mut self, path: &str, contents: &[u8], mode: u32) -> std::io::Result<()> {
        let resolved = self.free_slot(path)?;
        self.edits.push(Edit::Write {
            path: image_path(&resolved),
            contents: contents.to_vec(),
            mode: mode & 0o7777,
            owner: self.owner,
        });
        self.planned
            .insert(resolved, Planned::File(contents.to_vec()));
        Ok(())
    }

    fn copy_file(&mut self, path: &str, source: &Path, mode: u32) -> std::io::Result<()> {
        let resolved = self.free_slot(path)?;
        if !std::fs::metadata(source)?.is_file() {
            return Err(std::io::Error::other(format!(
                "{} is not a file",
                source.display()
            )));
        }
        self.edits.push(Edit::WriteFrom {
            path: image_path(&resolved),
            source: source.to_path_buf(),
            mode: mode & 0o7777,
            owner: self.owner,
        });
        self.planned
            .insert(resolved, Planned::Copy(source.to_path_buf()));
        Ok(())
    }

    fn set_mode(&mut self, path: &str, mode: u32) -> std::io::Result<()> {
        let resolved = self.resolve(path)?;
        let type_bits = match self.kind_resolved(&resolved) {
            Some(Kind::Dir) => 0o040000,
            Some(Kind::File) => 0o100000,
            // Only directories banger made sure of are chmodded.
            _ => {
                return Err(std::io::Error::other(format!(
                    "/{path} is not a directory or file"
                )))
            }
        };
        self.edits.push(Edit::SetMode {
            path: image_path(&resolved),
            mode: type_bits | (mode & 0o7777),
        });
        Ok(())
    }

    fn chown_root(&mut self, path: &str) -> Result<(), ErrorData> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(());
        }
        let resolved = self
            .resolve(path)
            .map_err(internal(format!("chown /{path}")))?;
        if self.kind_resolved(&resolved).is_none() {
            return Err(ErrorData::new(
                ErrorKind::Internal,
                format!("chown /{path} in the image: it does not exist"),
            ));
        }
        self.edits.push(Edit::SetOwner {
            path: image_path(&resolved),
            owner: (0, 0),
        });
        Ok(())
    }

    fn symlink(&mut self, target: &str, link: &str) -> std::io::Result<()> {
        let resolved = self.free_slot(link)?;
        self.edits.push(Edit::Symlink {
            path: image_path(&resolved),
            target: PathBuf::from(target),
            owner: self.owner,
        });
        self.planned.insert(resolved, Planned::Symlink);
        Ok(())
    }
}

/// A directory inside the tree, created if missing; a symlink or a file
/// in its place is an error.
fn ensure_dir(root: &mut impl Target, path: &str, mode: u32) -> Result<(), ErrorData> {
    match root.kind(path) {
        Some(Kind::Dir) => Ok(()),
        Some(_) => Err(ErrorData::new(
            ErrorKind::InvalidRequest,
            format!("the image's /{path} is not a directory (a symlink or file), so banger cannot set it up"),
        )
        .with_hint("use an image whose /root and /etc are real directories")),
        None => root
            .create_dir_all(path, mode)
            .map_err(internal(format!("creating /{path} in the image"))),
    }
}

/// Writes a regular file inside the tree, replacing a symlink or file there.
fn write_file(
    root: &mut impl Target,
    path: &str,
    contents: &[u8],
    mode: u32,
) -> Result<(), ErrorData> {
    make_room(root, path)?;
    root.create_file(path, contents, mode)
        .map_err(internal(format!("writing /{path} in the image")))
}

/// [`write_file`] with the contents of the host file `source`.
fn copy_file(
    root: &mut impl Target,
    path: &str,
    source: &Path,
    mode: u32,
) -> Result<(), ErrorData> {
    make_room(root, path)?;
    root.copy_file(path, source, mode)
        .map_err(internal(format!("writing /{path} in the image")))
}

/// Removes the file or symlink at `path`; a directory there is an error.
fn make_room(root: &mut impl Target, path: &str) -> Result<(), ErrorData> {
    if let Some(kind) = root.kind(path) {
        if kind == Kind::Dir {
            return Err(ErrorData::new(
                ErrorKind::InvalidRequest,
                format!("the image's /{path} is a directory"),
            ));
        }
        root.remove_file(path)
            .map_err(internal(format!("replacing /{path} in the image")))?;
    }
    Ok(())
}

/// Makes `unit` wanted by `target` (what `systemctl enable` does).
fn enable_unit(root: &mut impl Target, unit: &str, target: &str) -> Result<(), ErrorData> {
    let unit_path = ["lib/systemd/system", "usr/lib/systemd/system"]
        .iter()
        .map(|d| format!("{d}/{unit}"))
        .find(|p| root.exists(p));
    let Some(unit_path) = unit_path else {
        return Ok(());
    };
    let wants = format!("etc/systemd/system/{target}.wants");
    ensure_dir(root, &wants, 0o755)?;
    let link = format!("{wants}/{unit}");
    if !root.exists(&link) {
        // Relative, so it resolves inside the tree here and at `/` in the guest.
        let up = "../".repeat(wants.matches('/').count() + 1);
        root.symlink(&format!("{up}{unit_path}"), &link)
            .map_err(internal(format!("enabling {unit}")))?;
    }
    Ok(())
}

/// What [`inject`] did.
#[derive(Debug, Clone)]
pub struct Injected {
    pub facts: TreeFacts,
    /// The guest agent was installed.
    pub agent: bool,
}

/// Path of the agent inside images (also its `init=` when the image has
/// no systemd).
pub const AGENT_PATH: &str = "usr/local/bin/banger-agent";

/// The systemd unit that runs the agent. It starts early (no default
/// dependencies) so that health answers while the rest of the system
/// boots. Before it starts, and so before `sysinit.target` and every
/// service, it mounts the work disk on `/root` (found in sysfs: udev may
/// take longer than any sane device timeout under TCG).
pub const AGENT_UNIT: &str = "[Unit]
Description=banger guest agent
DefaultDependencies=no
After=systemd-remount-fs.service
Before=sysinit.target shutdown.target
Conflicts=shutdown.target

[Service]
ExecStartPre=-/usr/local/bin/banger-agent --mount-work-disk
ExecStart=/usr/local/bin/banger-agent
Restart=always
RestartSec=1
KillMode=process

[Install]
WantedBy=sysinit.target
";

/// Generates the VM's SSH host key before its sshd starts (systemd
/// images; the agent does this itself when it is init). Images carry no
/// host keys (see [`remove_host_keys`]), so every VM gets its own on its
/// first boot; it lives on the VM's root disk from then on. Only ed25519:
/// an RSA key takes over 30 s to make on an emulated (TCG) CPU, and sshd
/// skips the default key files that do not exist.
pub const HOST_KEYS_UNIT: &str = "[Unit]
Description=banger: SSH host key of this VM
Before=ssh.service sshd.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N \"\" -f /etc/ssh/ssh_host_ed25519_key

[Install]
WantedBy=ssh.service sshd.service
";

const HOST_KEYS_UNIT_NAME: &str = "banger-ssh-host-keys.service";

/// The work disk on `/root` for systemd images without the agent (the
/// agent mounts it, as init and as a service). `nofail`: a VM whose disk
/// does not show up still boots.
pub const WORK_FSTAB: &str =
    "LABEL=banger-work /root ext4 defaults,nofail,x-systemd.device-timeout=3min 0 2\n";

fn install_agent(root: &mut impl Target, agent: &Path, facts: &TreeFacts) -> Result<(), ErrorData> {
    // Checked first, as it was read first: a missing agent fails the same.
    std::fs::File::open(agent).map_err(internal(format!(
        "reading the guest agent {}",
        agent.display()
    )))?;
    ensure_dir(root, "usr/local/bin", 0o755)?;
    copy_file(root, AGENT_PATH, agent, 0o755)?;
    root.chown_root(AGENT_PATH)?;
    if facts.has_systemd {
        ensure_dir(root, "etc/systemd/system/sysinit.target.wants", 0o755)?;
        write_file(
            root,
            "etc/systemd/system/banger-agent.service",
            AGENT_UNIT.as_bytes(),
            0o644,
        )?;
        let link = "etc/systemd/system/sysinit.target.wants/banger-agent.service";
        if !root.exists(link) {
            root.symlink("../banger-agent.service", link)
                .map_err(internal("enabling banger-agent.service"))?;
        }
    }
    Ok(())
}

/// Deletes the SSH host keys the image came with (Debian's openssh-server
/// makes them when it is installed, i.e. at build time): every VM of the
/// image would share them, and any one of them could impersonate the
/// others. Returns how many files went.
fn remove_host_keys(root: &mut impl Target) -> Result<usize, ErrorData> {
    if root.kind("etc/ssh") != Some(Kind::Dir) {
        return Ok(0);
    }
    let mut names = root
        .non_dirs_in("etc/ssh")
        .map_err(internal("listing /etc/ssh in the image"))?;
    names.sort();
    let mut removed = 0;
    for name in names {
        let is_key =
            name.starts_with("ssh_host_") && (name.ends_with("_key") || name.ends_with("_key.pub"));
        if is_key {
            root.remove_file(&format!("etc/ssh/{name}"))
                .map_err(internal(format!("removing /etc/ssh/{name} from the image")))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Installs [`HOST_KEYS_UNIT`], wanted by the image's sshd unit.
fn install_host_keys_unit(root: &mut impl Target) -> Result<(), ErrorData> {
    let units: Vec<&str> = ["ssh.service", "sshd.service"]
        .into_iter()
        .filter(|u| {
            [
                "lib/systemd/system",
                "usr/lib/systemd/system",
                "etc/systemd/system",
            ]
            .iter()
            .any(|d| root.exists(&format!("{d}/{u}")))
        })
        .collect();
    if units.is_empty() {
        return Ok(());
    }
    write_file(
        root,
        &format!("etc/systemd/system/{HOST_KEYS_UNIT_NAME}"),
        HOST_KEYS_UNIT.as_bytes(),
        0o644,
    )?;
    for unit in units {
        let wants = format!("etc/systemd/system/{unit}.wants");
        ensure_dir(root, &wants, 0o755)?;
        let link = format!("{wants}/{HOST_KEYS_UNIT_NAME}");
        if !root.exists(&link) {
            root.symlink(&format!("../{HOST_KEYS_UNIT_NAME}"), &link)
                .map_err(internal(format!("enabling {HOST_KEYS_UNIT_NAME}")))?;
        }
    }
    Ok(())
}

fn add_work_mount(root: &mut impl Target) -> Result<(), ErrorData> {
    let existing = match root.kind("etc/fstab") {
        Some(Kind::File) => root.read_to_string("etc/fstab").unwrap_or_default(),
        _ => String::new(),
    };
    if existing.contains("LABEL=banger-work") {
        return Ok(());
    }
    let mut text = existing;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(WORK_FSTAB);
    write_file(root, "etc/fstab", text.as_bytes(), 0o644)
}

/// Injects banger's files into the unpacked tree at `tree`.
pub fn inject(
    tree: &Path,
    image_name: &str,
    key: &ManagedKey,
    metadata: &serde_json::Value,
    agent: Option<&Path>,
) -> Result<Injected, ErrorData> {
    let root = Dir::open_ambient_dir(tree, ambient_authority())
        .map_err(internal(format!("opening {}", tree.display())))?;
    inject_into(&mut HostTree(root), image_name, key, metadata, agent)
}

/// What [`inject`] would do to the tree at `tree`, as [`Edit`]s to make in
/// an image built from it (after its fixups); the tree is only read. The
/// same decisions, errors included (a symlinked `/root` is refused).
pub fn plan(
    tree: &Path,
    image_name: &str,
    key: &ManagedKey,
    metadata: &serde_json::Value,
    agent: Option<&Path>,
) -> Result<(Injected, Vec<Edit>), ErrorData> {
    let root = Dir::open_ambient_dir(tree, ambient_authority())
        .map_err(internal(format!("opening {}", tree.display())))?;
    let mut target = PlanTree::new(root);
    let injected = inject_into(&mut target, image_name, key, metadata, agent)?;
    Ok((injected, target.into_edits()))
}

fn inject_into(
    root: &mut impl Target,
    image_name: &str,
    key: &ManagedKey,
    metadata: &serde_json::Value,
    agent: Option<&Path>,
) -> Result<Injected, ErrorData> {
    let facts = detect(root.base());

    install_key(root, key)?;

    // Mount points every boot needs (the initramfs moves /dev, /proc, /sys
    // and /run onto them); minimal images such as busybox have none.
    for dir in ["dev", "proc", "sys", "run", "tmp"] {
        ensure_dir(root, dir, 0o755)?;
    }
    root.set_mode("tmp", 0o1777)
        .map_err(internal("chmod /tmp"))?;

    ensure_dir(root, "etc", 0o755)?;
    write_file(
        root,
        "etc/hostname",
        format!("{image_name}\n").as_bytes(),
        0o644,
    )?;
    ensure_dir(root, "etc/banger", 0o755)?;
    let meta = serde_json::to_vec_pretty(metadata)
        .map_err(|e| ErrorData::new(ErrorKind::Internal, e.to_string()))?;
    write_file(root, "etc/banger/image.json", &meta, 0o644)?;

    if facts.has_networkd {
        enable_unit(root, "systemd-networkd.service", "multi-user.target")?;
        enable_unit(root, "systemd-networkd.socket", "sockets.target")?;
        enable_unit(root, "systemd-network-generator.service", "sysinit.target")?;
    }
    if facts.has_sshd {
        // Each VM makes its own: under systemd the unit below, as init the agent.
        remove_host_keys(root)?;
    }
    if facts.has_sshd && facts.has_systemd {
        enable_unit(root, "ssh.service", "multi-user.target")?;
        install_host_keys_unit(root)?;
    }
    if facts.has_systemd && agent.is_none() {
        add_work_mount(root)?;
    }
    if let Some(agent) = agent {
        install_agent(root, agent, &facts)?;
    }
    Ok(Injected {
        facts,
        agent: agent.is_some(),
    })
}

/// Only the SSH key part of [`inject`], for a tree holding just `/root`.
pub fn inject_keys_only(tree: &Path, key: &ManagedKey) -> Result<(), ErrorData> {
    let root = Dir::open_ambient_dir(tree, ambient_authority())
        .map_err(internal(format!("opening {}", tree.display())))?;
    install_key(&mut HostTree(root), key)
}

fn install_key(root: &mut impl Target, key: &ManagedKey) -> Result<(), ErrorData> {
    ensure_dir(root, "root", 0o700)?;
    ensure_dir(root, "root/.ssh", 0o700)?;
    root.set_mode("root/.ssh", 0o700)
        .map_err(internal("chmod /root/.ssh"))?;
    let mut keys = match root.read_to_string("root/.ssh/authorized_keys") {
        Ok(existing) if root.kind("root/.ssh/authorized_keys") != Some(Kind::Symlink) => existing,
        _ => String::new(),
    };
    if !keys
        .lines()
        .any(|l| l.trim().starts_with(key.public.trim()))
    {
        if !keys.is_empty() && !keys.ends_with('\n') {
            keys.push('\n');
        }
        keys.push_str(key.public.trim());
        keys.push_str(" banger-managed\n");
    }
    write_file(root, "root/.ssh/authorized_keys", keys.as_bytes(), 0o600)?;
    root.chown_root("root/.ssh")?;
    root.chown_root("root/.ssh/authorized_keys")
}

/// Size of the work seed for a `/root` of `bytes`: room to grow, at least 64 MiB.
pub fn work_seed_size(bytes: u64) -> u64 {
    let want = bytes.saturating_mul(2).saturating_add(32 << 20);
    want.max(64 << 20).div_ceil(1 << 20) * (1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_stable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = ensure_ssh_key(tmp.path()).expect("create");
        let b = ensure_ssh_key(tmp.path()).expect("reuse");
        assert_eq!(a.public, b.public);
        assert!(a.public.starts_with("ssh-ed25519 "));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&a.private_path)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn inject_writes_keys_hostname_and_refuses_symlinked_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = ensure_ssh_key(&tmp.path().join("cfg")).expect("key");
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).expect("mkdir");
        // A hostile absolute symlink where banger writes a file is replaced, not followed.
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"keep").expect("write");
        std::os::unix::fs::symlink(&outside, tree.join("etc/hostname")).expect("symlink");
        let injected = inject(
            &tree,
            "img",
            &key,
            &serde_json::json!({"name": "img"}),
            None,
        )
        .expect("inject");
        assert!(!injected.facts.has_init);
        assert_eq!(std::fs::read(&outside).expect("outside"), b"keep");
        assert_eq!(
            std::fs::read_to_string(tree.join("etc/hostname")).expect("hostname"),
            "img\n"
        );
        let keys = std::fs::read_to_string(tree.join("root/.ssh/authorized_keys")).expect("keys");
        assert!(keys.contains(key.public.trim()));
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(tree.join("root/.ssh"))
                .expect("m")
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        // Injecting twice does not duplicate the key.
        inject(&tree, "img", &key, &serde_json::json!({}), None).expect("again");
        let keys = std::fs::read_to_string(tree.join("root/.ssh/authorized_keys")).expect("keys");
        assert_eq!(keys.matches(key.public.trim()).count(), 1);

        let evil = tmp.path().join("evil");
        std::fs::create_dir_all(&evil).expect("mkdir");
        std::os::unix::fs::symlink("/", evil.join("root")).expect("symlink");
        let err =
            inject(&evil, "x", &key, &serde_json::json!({}), None).expect_err("symlinked /root");
        assert!(err.message.contains("/root"), "{}", err.message);
    }

    #[test]
    fn networkd_is_enabled_when_present() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = ensure_ssh_key(&tmp.path().join("cfg")).expect("key");
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("lib/systemd/system")).expect("mkdir");
        for unit in [
            "systemd-networkd.service",
            "systemd-network-generator.service",
            "ssh.service",
        ] {
            std::fs::write(tree.join("lib/systemd/system").join(unit), b"[Unit]\n").expect("unit");
        }
        std::fs::write(tree.join("lib/systemd/systemd"), b"").expect("systemd");
        std::fs::create_dir_all(tree.join("usr/sbin")).expect("mkdir");
        std::fs::write(tree.join("usr/sbin/sshd"), b"").expect("sshd");
        let injected = inject(&tree, "img", &key, &serde_json::json!({}), None).expect("inject");
        assert!(injected.facts.has_init && injected.facts.has_sshd && injected.facts.has_networkd);
        let link = std::fs::read_link(
            tree.join("etc/systemd/system/sysinit.target.wants/systemd-network-generator.service"),
        )
        .expect("generator enabled");
        assert_eq!(
            link,
            PathBuf::from("../../../../lib/systemd/system/systemd-network-generator.service")
        );
        assert!(tree
            .join("etc/systemd/system/sysinit.target.wants/systemd-network-generator.service")
            .exists());
        assert!(tree
            .join("etc/systemd/system/multi-user.target.wants/ssh.service")
            .symlink_metadata()
            .is_ok());
    }

    #[test]
    fn host_keys_are_removed_and_made_per_vm() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = ensure_ssh_key(&tmp.path().join("cfg")).expect("key");
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("lib/systemd/system")).expect("mkdir");
        std::fs::write(tree.join("lib/systemd/system/ssh.service"), b"[Unit]\n").expect("unit");
        std::fs::write(tree.join("lib/systemd/systemd"), b"").expect("systemd");
        std::fs::create_dir_all(tree.join("usr/sbin")).expect("mkdir");
        std::fs::write(tree.join("usr/sbin/sshd"), b"").expect("sshd");
        std::fs::create_dir_all(tree.join("etc/ssh")).expect("mkdir");
        for f in [
            "ssh_host_ed25519_key",
            "ssh_host_ed25519_key.pub",
            "ssh_host_rsa_key",
            "ssh_host_rsa_key.pub",
            "sshd_config",
            "moduli",
        ] {
            std::fs::write(tree.join("etc/ssh").join(f), b"x").expect("write");
        }
        inject(&tree, "img", &key, &serde_json::json!({}), None).expect("inject");
        let mut left: Vec<String> = std::fs::read_dir(tree.join("etc/ssh"))
            .expect("read_dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["moduli", "sshd_config"]);
        let unit =
            std::fs::read_to_string(tree.join("etc/systemd/system/banger-ssh-host-keys.service"))
                .expect("unit");
        assert!(
            unit.contains("ExecStart=/usr/bin/ssh-keygen -q -t ed25519"),
            "{unit}"
        );
        let wanted = tree.join("etc/systemd/system/ssh.service.wants/banger-ssh-host-keys.service");
        assert_eq!(
            std::fs::read_link(&wanted).expect("enabled"),
            PathBuf::from("../banger-ssh-host-keys.service")
        );
        assert!(wanted.exists(), "the link resolves");
        assert!(!tree.join("etc/systemd/system/sshd.service.wants").exists());
    }

    #[test]
    fn work_seed_size_has_a_floor_and_grows() {
        assert_eq!(work_seed_size(0), 64 << 20);
        assert_eq!(work_seed_size(100 << 20), 232 << 20);
    }

    /// Every path of an ext4 image with its type, mode, owner and
    /// content (files) or target (symlinks), read with debugfs.
    fn image_listing(img: &Path) -> std::collections::BTreeMap<String, String> {
        let run = |req: &str| {
            let out = std::process::Command::new("debugfs")
                .arg("-R")
                .arg(req)
                .arg(img)
                .output()
                .expect("debugfs runs");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let mut out = std::collections::BTreeMap::new();
        let mut stack = vec!["/".to_string()];
        while let Some(dir) = stack.pop() {
            for line in run(&format!("ls -p \"{dir}\"")).lines() {
                let f: Vec<&str> = line.split('/').collect();
                if f.len() < 7 || matches!(f[5], "." | ".." | "" | "lost+found") {
                    continue;
                }
                let path = format!("{}/{}", dir.trim_end_matches('/'), f[5]);
                let mode = u32::from_str_radix(f[2], 8).expect("mode");
                let what = match mode & 0o170000 {
                    0o040000 => {
                        stack.push(path.clone());
                        String::new()
                    }
                    0o100000 => run(&format!("cat \"{path}\"")),
                    _ => run(&format!("stat \"{path}\""))
                        .lines()
                        .find(|l| l.contains("Fast link dest"))
                        .unwrap_or_default()
                        .to_string(),
                };
                out.insert(path, format!("{mode:o} {}:{} {what:?}", f[3], f[4]));
            }
        }
        out
    }

    /// Everything under `root` (not following symlinks), for "unchanged".
    fn host_listing(root: &Path) -> Vec<(PathBuf, String)> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).expect("read_dir").flatten() {
                let p = e.path();
                let m = std::fs::symlink_metadata(&p).expect("lstat");
                let what = if m.is_dir() {
                    stack.push(p.clone());
                    String::new()
                } else if m.is_symlink() {
                    std::fs::read_link(&p)
                        .expect("readlink")
                        .display()
                        .to_string()
                } else {
                    String::from_utf8_lossy(&std::fs::read(&p).expect("read")).into_owned()
                };
                let info = format!(
                    "{:o} {}:{} {} {} {what}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.ino(),
                    m.mtime()
                );
                out.push((p, info));
            }
        }
        out.sort();
        out
    }

    /// A systemd image with sshd, networkd, host keys, its own
    /// authorized_keys and fstab, a hostname that is a symlink out of the
    /// tree, and a symlinked directory on the agent's way.
    fn busy_tree(tree: &Path, outside: &Path) {
        std::fs::create_dir_all(tree.join("usr/lib/systemd/system")).expect("mkdir");
        std::os::unix::fs::symlink("usr/lib", tree.join("lib")).expect("symlink");
        for unit in [
            "systemd-networkd.service",
            "systemd-networkd.socket",
            "systemd-network-generator.service",
            "ssh.service",
        ] {
            std::fs::write(tree.join("usr/lib/systemd/system").join(unit), b"[Unit]\n")
                .expect("unit");
        }
        std::fs::write(tree.join("usr/lib/systemd/systemd"), b"").expect("systemd");
        std::fs::create_dir_all(tree.join("usr/sbin")).expect("mkdir");
        std::fs::write(tree.join("usr/sbin/sshd"), b"").expect("sshd");
        std::fs::create_dir_all(tree.join("opt/local")).expect("mkdir");
        std::os::unix::fs::symlink("../opt/local", tree.join("usr/local")).expect("symlink");
        std::fs::create_dir_all(tree.join("etc/ssh")).expect("mkdir");
        for f in [
            "ssh_host_ed25519_key",
            "ssh_host_ed25519_key.pub",
            "sshd_config",
        ] {
            std::fs::write(tree.join("etc/ssh").join(f), b"x").expect("write");
        }
        std::fs::write(tree.join("etc/fstab"), b"proc /proc proc defaults 0 0").expect("fstab");
        std::os::unix::fs::symlink(outside, tree.join("etc/hostname")).expect("symlink");
        std::fs::create_dir_all(tree.join("root/.ssh")).expect("mkdir");
        std::fs::write(
            tree.join("root/.ssh/authorized_keys"),
            b"ssh-ed25519 AAAA mine\n",
        )
        .expect("keys");
        std::fs::create_dir(tree.join("tmp")).expect("mkdir");
    }

    #[tokio::test]
    async fn a_plan_makes_the_image_that_writing_into_the_tree_makes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = ensure_ssh_key(&tmp.path().join("cfg")).expect("key");
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"keep").expect("write");
        let agent_bin = tmp.path().join("agent");
        std::fs::write(&agent_bin, b"#!/bin/sh\necho agent\n").expect("agent");
        let meta = serde_json::json!({"name": "img"});
        for (case, agent) in [("agent", Some(agent_bin.as_path())), ("plain", None)] {
            let host = tmp.path().join(format!("{case}-host"));
            let cached = tmp.path().join(format!("{case}-cached"));
            busy_tree(&host, &outside);
            busy_tree(&cached, &outside);
            let before = host_listing(&cached);

            let injected = inject(&host, "img", &key, &meta, agent).expect("inject");
            let host_img = tmp.path().join(format!("{case}-host.ext4"));
            let usage = banger_image::ext4::measure_tree(&host).expect("measure");
            banger_image::ext4::build_rootfs_from(&host, usage, &[], &[], &host_img, None)
                .await
                .expect("mkfs of the injected tree");

            let (planned, edits) = plan(&cached, "img", &key, &meta, agent).expect("plan");
            assert_eq!(planned.facts, injected.facts);
            assert_eq!(planned.agent, injected.agent);
            assert_eq!(
                host_listing(&cached),
                before,
                "{case}: the tree was changed"
            );
            let plan_img = tmp.path().join(format!("{case}-plan.ext4"));
            let usage = banger_image::ext4::measure_tree(&cached).expect("measure");
            banger_image::ext4::build_rootfs_from(&cached, usage, &[], &edits, &plan_img, None)
                .await
                .expect("mkfs and debugfs");
            let want = image_listing(&host_img);
            assert!(want.contains_key("/opt/local/bin/banger-agent") == agent.is_some());
            assert!(want.contains_key("/etc/banger/image.json"), "{want:?}");
            assert_eq!(image_listing(&plan_img), want, "{case}");
            assert_eq!(std::fs::read(&outside).expect("outside"), b"keep");
        }
    }

    #[test]
    fn a_plan_refuses_a_symlinked_root_and_writes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = ensure_ssh_key(&tmp.path().join("cfg")).expect("key");
        for evil in ["/", "../../.."] {
            let tree = tmp.path().join("evil");
            let _ = std::fs::remove_dir_all(&tree);
            std::fs::create_dir_all(&tree).expect("mkdir");
            std::os::unix::fs::symlink(evil, tree.join("root")).expect("symlink");
            let err =
                plan(&tree, "x", &key, &serde_json::json!({}), None).expect_err("symlinked /root");
            assert!(err.message.contains("/root"), "{}", err.message);
        }
        // A symlinked /root/.ssh too.
        let tree = tmp.path().join("evil2");
        std::fs::create_dir_all(tree.join("root")).expect("mkdir");
        std::os::unix::fs::symlink("/etc", tree.join("root/.ssh")).expect("symlink");
        let err = plan(&tree, "x", &key, &serde_json::json!({}), None).expect_err("symlinked .ssh");
        assert!(err.message.contains("/root/.ssh"), "{}", err.message);
    }
}
