//! `config.toml`: every key documented and defaulted. A missing file means
//! all defaults; an unknown key or a bad value is an error that names the
//! file and the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid config file {}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// The daemon's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Log filter for the log file and stderr (`error`, `warn`, `info`,
    /// `debug`, `trace`, or a tracing directive such as `banger=debug`).
    /// `RUST_LOG` overrides it.
    pub log_level: String,
    /// Group that may use the socket. Empty: the socket is owner-only
    /// (0600). Set: the socket is 0660 and owned by this group, as Docker
    /// does with the `docker` group.
    pub socket_group: String,
    /// How long a request waits for the actor that owns it before it is
    /// answered with a timeout error.
    pub request_timeout_secs: u64,
    /// bangerd's CPU priority, as a nice value (-20 to 19). The daemon is
    /// idle most of the time, and when it works someone is waiting for it
    /// (a create, a list); so by default it goes before busy guests and
    /// other work on the host. Its VMMs and image builds run at 0 whatever
    /// this says. Lowering it below 0 needs root (CAP_SYS_NICE); without,
    /// the daemon logs a warning and runs at its inherited priority.
    pub nice: i32,
    pub supervisor: SupervisorConfig,
    pub shutdown: ShutdownConfig,
    pub images: ImagesConfig,
    pub network: NetworkConfig,
    pub dns: DnsConfig,
    pub vm: VmConfig,
}

/// VMs: backends and defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// `auto` (Firecracker when its binary exists, KVM works and the
    /// kernel suits it; QEMU otherwise), `qemu` or `firecracker`.
    pub vmm: String,
    /// QEMU acceleration: `auto` (KVM when a probe shows it runs guests,
    /// TCG otherwise), `kvm` or `tcg`.
    pub accel: String,
    pub qemu_binary: String,
    pub firecracker_binary: String,
    /// Image `vm create` uses without `--image` (empty: the catalog default).
    pub default_image: String,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Size of each VM's work disk (`/root`).
    pub disk_bytes: u64,
    /// How long a start waits for the guest agent and sshd.
    pub boot_timeout_secs: u64,
    /// How long a clean stop waits for the guest to power off before the
    /// VMM is killed.
    pub stop_timeout_secs: u64,
    /// A VM that crashes more than this many times within the window is
    /// left `failed`.
    pub restart_max: u32,
    pub restart_window_secs: u64,
    pub restart_backoff_initial_ms: u64,
    pub restart_backoff_max_ms: u64,
    /// The guest agent binary injected into images. Empty: next to
    /// bangerd (`banger-agent`), else in the static build's target dir.
    pub agent_path: String,
    /// Resolver guests use. Empty: the host's first non-loopback
    /// nameserver from /etc/resolv.conf, if any.
    pub guest_dns: String,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            vmm: "auto".into(),
            accel: "auto".into(),
            qemu_binary: "qemu-system-x86_64".into(),
            firecracker_binary: "firecracker".into(),
            default_image: String::new(),
            cpus: 2,
            memory_mib: 1024,
            disk_bytes: 4 << 30,
            boot_timeout_secs: 300,
            stop_timeout_secs: 30,
            restart_max: 5,
            restart_window_secs: 300,
            restart_backoff_initial_ms: 1000,
            restart_backoff_max_ms: 30_000,
            agent_path: String::new(),
            guest_dns: String::new(),
        }
    }
}

/// Host networking: the bridge, the TAP pool, NAT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Create and manage the bridge, TAPs and NAT. When false, nothing is
    /// touched on the host and VMs cannot get a network.
    pub enabled: bool,
    /// The bridge every VM's TAP joins.
    pub bridge: String,
    /// Guest subnet; the host takes the first address on the bridge.
    pub subnet: String,
    /// Prefix of TAP device names (`bgtap0`, `bgtap1`, ...).
    pub tap_prefix: String,
    /// banger's own nftables table (family `ip`).
    pub nft_table: String,
    /// TAP devices kept created and ready, so a VM start does not wait for one.
    pub pool_size: u32,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        let net = banger_net::NetConfig::default();
        Self {
            enabled: true,
            bridge: net.bridge,
            subnet: net.subnet.to_string(),
            tap_prefix: net.tap_prefix,
            nft_table: net.nft_table,
            pool_size: 4,
        }
    }
}

/// An error and its causes on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

impl NetworkConfig {
    pub fn to_net(&self) -> Result<banger_net::NetConfig, String> {
        let net = banger_net::NetConfig {
            bridge: self.bridge.clone(),
            subnet: self
                .subnet
                .parse()
                .map_err(|e| format!("network.subnet: {e}"))?,
            tap_prefix: self.tap_prefix.clone(),
            nft_table: self.nft_table.clone(),
        };
        net.validate()
            .map_err(|e| format!("[network]: {}", chain(&e)))?;
        Ok(net)
    }
}

/// The `vm.` DNS server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Serve `<name>.vm` records.
    pub enabled: bool,
    /// Address (UDP and TCP) to answer on; keep it on loopback.
    pub listen: String,
    /// TTL of the answers, in seconds (short: VMs come and go).
    pub ttl: u32,
    /// Queries per second one source address may send (bursts of twice
    /// that); beyond it UDP queries are dropped. 0 means no limit.
    pub client_qps: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:42069".into(),
            ttl: 5,
            client_qps: 10_000,
        }
    }
}

/// Images and kernels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Largest number of bytes an image pull may write while unpacking its
    /// layers (a decompression bomb stops here).
    pub max_image_bytes: u64,
    /// Kernel paired with pulled images when `--kernel` is not given;
    /// empty for none. Pulled from the kernel catalog when missing.
    pub default_kernel: String,
    /// A kernel catalog file replacing the embedded one (e.g. a local
    /// mirror); empty for the embedded catalog.
    pub kernel_catalog: String,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            max_image_bytes: 64 << 30,
            default_kernel: String::new(),
            kernel_catalog: String::new(),
        }
    }
}

/// Restart policy of the root supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// Restart intensity: more than this many restarts of one actor ...
    pub max_restarts: u32,
    /// ... within this many seconds makes the supervisor give up and stop
    /// the daemon (exit code 3).
    pub restart_window_secs: u64,
    /// First restart delay; it doubles with each restart in the window.
    pub backoff_initial_ms: u64,
    /// Upper bound of the restart delay.
    pub backoff_max_ms: u64,
}

/// Graceful shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long in-flight requests may run on after SIGTERM/SIGINT or
    /// `banger daemon stop` before they are cancelled.
    pub grace_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            socket_group: String::new(),
            request_timeout_secs: 30,
            nice: -10,
            supervisor: SupervisorConfig::default(),
            shutdown: ShutdownConfig::default(),
            images: ImagesConfig::default(),
            network: NetworkConfig::default(),
            dns: DnsConfig::default(),
            vm: VmConfig::default(),
        }
    }
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            restart_window_secs: 30,
            backoff_initial_ms: 100,
            backoff_max_ms: 5000,
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_secs: 10 }
    }
}

impl Config {
    /// Loads `path`; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<(Self, bool), ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Self::default(), false))
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok((config, true))
    }

    fn validate(&self) -> Result<(), String> {
        if self.request_timeout_secs == 0 {
            return Err("request_timeout_secs must be at least 1".into());
        }
        if !(-20..=19).contains(&self.nice) {
            return Err(format!(
                "nice must be between -20 and 19, not {}",
                self.nice
            ));
        }
        if self.supervisor.restart_window_secs == 0 {
            return Err("supervisor.restart_window_secs must be at least 1".into());
        }
        if self.supervisor.backoff_initial_ms > self.supervisor.backoff_max_ms {
            return Err(
                "supervisor.backoff_initial_ms must not exceed supervisor.backoff_max_ms".into(),
            );
        }
        self.network.to_net()?;
        if self.network.pool_size > 64 {
            return Err("network.pool_size must be at most 64".into());
        }
        self.dns
            .listen
            .parse::<std::net::SocketAddr>()
            .map_err(|e| format!("dns.listen `{}`: {e}", self.dns.listen))?;
        if self.images.max_image_bytes < 1 << 20 {
            return Err("images.max_image_bytes must be at least 1 MiB".into());
        }
        Ok(())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    /// The effective configuration as TOML, for `banger config show`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_gives_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (config, exists) = Config::load(&dir.path().join("none.toml")).expect("load");
        assert!(!exists);
        assert_eq!(config, Config::default());
        assert_eq!(config.supervisor.max_restarts, 5);
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "socket_group = \"kvm\"\n[supervisor]\nmax_restarts = 9\n",
        )
        .expect("write");
        let (config, exists) = Config::load(&path).expect("load");
        assert!(exists);
        assert_eq!(config.socket_group, "kvm");
        assert_eq!(config.supervisor.max_restarts, 9);
        assert_eq!(config.supervisor.restart_window_secs, 30);
        assert_eq!(config.shutdown.grace_secs, 10);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "sokcet_group = \"kvm\"\n").expect("write");
        let err = Config::load(&path).expect_err("must fail");
        let chain = format!(
            "{err}: {}",
            std::error::Error::source(&err)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
        assert!(chain.contains("sokcet_group"), "{chain}");
        assert!(chain.contains("config.toml"), "{chain}");
    }

    #[test]
    fn invalid_values_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "request_timeout_secs = 0\n").expect("write");
        assert!(matches!(
            Config::load(&path),
            Err(ConfigError::Invalid { .. })
        ));
    }

    #[test]
    fn rendered_toml_parses_back() {
        let config = Config::default();
        let back: Config = toml::from_str(&config.to_toml()).expect("parse");
        assert_eq!(back, config);
    }
}

#[cfg(test)]
mod docs_tests {
    use super::*;

    /// docs/configuration.md shows every key with its default: keep it true.
    #[test]
    fn documented_config_is_the_default() {
        let doc = include_str!("../../docs/configuration.md");
        let start = doc.find("```toml\n").expect("toml block") + "```toml\n".len();
        let end = start + doc[start..].find("```").expect("end of block");
        let documented: Config =
            toml::from_str(&doc[start..end]).expect("documented config parses");
        assert_eq!(documented, Config::default());
    }
}
