//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF
//! distribution registry) on `127.0.0.1:<free port>` with filesystem
//! storage in a private temporary directory, optionally behind htpasswd
//! basic auth, plus helpers to push images and multi-platform indexes to
//! it with oci-client. Used by this crate's tests and the daemon's
//! end-to-end tests; not meant for production code.
//!
//! The registry process is killed (SIGKILL) and reaped, and its directory
//! removed, when the [`TestRegistry`] is dropped, including while a failing
//! test unwinds.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::cache::sha256_digest;
use crate::registry::{Platform, OCI_CONFIG};

/// Where Debian installs the registry.
pub const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";
/// From apache2-utils; makes the bcrypt htpasswd file.
pub const HTPASSWD_BINARY: &str = "/usr/bin/htpasswd";

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

const START_ATTEMPTS: usize = 5;
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `docker-registry` on loopback. See the module docs.
#[derive(Debug)]
pub struct TestRegistry {
    // Dropped before `dir`: the process dies before its storage goes.
    process: Option<Process>,
    dir: TempDir,
    addr: SocketAddr,
    credentials: Option<(String, String)>,
    manifest_sizes: Mutex<HashMap<String, (String, u64)>>,
}

/// The registry process; killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl TestRegistry {
    /// Starts an anonymous registry. Panics (with what to install) if the
    /// registry binary is missing or it does not come up. Blocks until
    /// `GET /v2/` answers.
    pub fn start() -> TestRegistry {
        Self::start_inner(None)
    }

    /// Starts a registry that requires these basic-auth credentials for
    /// everything.
    pub fn start_with_basic_auth(username: &str, password: &str) -> TestRegistry {
        Self::start_inner(Some((username.to_string(), password.to_string())))
    }

    fn start_inner(credentials: Option<(String, String)>) -> TestRegistry {
        assert!(
            Path::new(REGISTRY_BINARY).exists(),
            "{REGISTRY_BINARY} is missing: apt-get install docker-registry"
        );
        let dir = TempDir::new("banger-test-registry");
        let htpasswd = credentials.as_ref().map(|(user, password)| {
            assert!(
                Path::new(HTPASSWD_BINARY).exists(),
                "{HTPASSWD_BINARY} is missing: apt-get install apache2-utils"
            );
            let out = Command::new(HTPASSWD_BINARY)
                .args(["-Bbn", user, password])
                .output()
                .expect("run htpasswd");
            assert!(
                out.status.success(),
                "htpasswd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, &out.stdout).expect("write htpasswd");
            path
        });

        let config = dir.path().join("config.yml");
        let log_path = dir.path().join("registry.log");
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            // The port is free now; another process may take it before the
            // registry binds it, hence the retries.
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            std::fs::write(
                &config,
                registry_config(dir.path(), addr, htpasswd.as_deref()),
            )
            .expect("write registry config");
            let log = std::fs::File::create(&log_path).expect("create registry log");
            let child = Command::new(REGISTRY_BINARY)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {REGISTRY_BINARY}: {e}"));
            let mut process = Process(child);
            if wait_ready(&mut process, addr) {
                return TestRegistry {
                    process: Some(process),
                    dir,
                    addr,
                    credentials,
                    manifest_sizes: Mutex::new(HashMap::new()),
                };
            }
            drop(process);
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if !last_log.contains("address already in use") {
                break;
            }
        }
        panic!("docker-registry did not come up; its log:\n{last_log}")
    }

    /// `127.0.0.1:<port>`: the registry part of references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:<port>/<repo>:<tag>`.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.host())
    }

    /// The registry's storage root.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The file holding a blob's bytes in the registry's storage, for
    /// tests that tamper with or truncate what the registry serves.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The registry's log so far (useful in assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Kills the registry now (it stays dead). Later requests to it fail
    /// to connect.
    pub fn stop(&mut self) {
        self.process = None;
    }

    fn client(&self) -> (Client, RegistryAuth) {
        let config = ClientConfig {
            protocol: ClientProtocol::Http,
            use_monolithic_push: true,
            platform_resolver: None,
            ..ClientConfig::default()
        };
        let client = Client::try_from(config).expect("oci client");
        let auth = match &self.credentials {
            Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
            None => RegistryAuth::Anonymous,
        };
        (client, auth)
    }

    fn parse(&self, repo: &str, tag_or_digest: &str) -> Reference {
        let sep = if tag_or_digest.starts_with("sha256:") {
            "@"
        } else {
            ":"
        };
        format!("{}/{repo}{sep}{tag_or_digest}", self.host())
            .parse()
            .expect("valid test reference")
    }

    /// Uploads a blob to `repo`; returns its digest.
    pub async fn push_blob(&self, repo: &str, data: Vec<u8>) -> String {
        let (client, auth) = self.client();
        let reference = self.parse(repo, "latest");
        client
            .store_auth_if_needed(reference.resolve_registry(), &auth)
            .await;
        let digest = sha256_digest(&data);
        client
            .push_blob(&reference, data, &digest)
            .await
            .unwrap_or_else(|e| panic!("push blob {digest} to {repo}: {e}\n{}", self.log()));
        digest
    }

    /// Uploads a manifest (any JSON) under `tag_or_digest`; returns its
    /// digest.
    pub async fn push_manifest_json(
        &self,
        repo: &str,
        tag_or_digest: &str,
        media_type: &str,
        body: Vec<u8>,
    ) -> String {
        let (client, auth) = self.client();
        let reference = self.parse(repo, tag_or_digest);
        client
            .store_auth_if_needed(reference.resolve_registry(), &auth)
            .await;
        let digest = sha256_digest(&body);
        let size = body.len() as u64;
        client
            .push_manifest_raw(
                &reference,
                body,
                media_type.parse().expect("media type is a header value"),
            )
            .await
            .unwrap_or_else(|e| panic!("push manifest to {repo}: {e}\n{}", self.log()));
        self.manifest_sizes
            .lock()
            .expect("manifest sizes")
            .insert(digest.clone(), (media_type.to_string(), size));
        digest
    }

    /// Pushes an OCI image: every `(media_type, bytes)` layer, the config
    /// blob and a manifest tagged `tag`. Returns the manifest digest.
    pub async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        layers: Vec<(String, Vec<u8>)>,
        config_json: &[u8],
    ) -> String {
        let mut descriptors = Vec::new();
        for (media_type, data) in layers {
            let size = data.len();
            let digest = self.push_blob(repo, data).await;
            descriptors.push(serde_json::json!({
                "mediaType": media_type,
                "digest": digest,
                "size": size,
            }));
        }
        let config_digest = self.push_blob(repo, config_json.to_vec()).await;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": config_digest,
                "size": config_json.len(),
            },
            "layers": descriptors,
        });
        let body = serde_json::to_vec(&manifest).expect("serialize manifest");
        self.push_manifest_json(repo, tag, OCI_MANIFEST, body).await
    }

    /// Pushes an OCI image index tagged `tag` over manifests pushed
    /// earlier through this helper, one per platform. Returns its digest.
    pub async fn push_index(
        &self,
        repo: &str,
        tag: &str,
        manifests: Vec<(Platform, String)>,
    ) -> String {
        let entries: Vec<serde_json::Value> = manifests
            .into_iter()
            .map(|(platform, digest)| {
                let (media_type, size) = self
                    .manifest_sizes
                    .lock()
                    .expect("manifest sizes")
                    .get(&digest)
                    .cloned()
                    .unwrap_or_else(|| panic!("manifest {digest} was not pushed by this helper"));
                let mut p = serde_json::json!({
                    "os": platform.os,
                    "architecture": platform.architecture,
                });
                if let Some(variant) = platform.variant {
                    p["variant"] = variant.into();
                }
                serde_json::json!({
                    "mediaType": media_type,
                    "digest": digest,
                    "size": size,
                    "platform": p,
                })
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": entries,
        });
        let body = serde_json::to_vec(&index).expect("serialize index");
        self.push_manifest_json(repo, tag, OCI_INDEX, body).await
    }
}

/// Polls `GET /v2/` until it answers 200 (or 401 with auth on); `false`
/// if the process exits or the deadline passes first.
fn wait_ready(process: &mut Process, addr: SocketAddr) -> bool {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = process.0.try_wait() {
            return false;
        }
        if let Some(200 | 401) = http_status(addr, "/v2/") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn registry_config(dir: &Path, addr: SocketAddr, htpasswd: Option<&Path>) -> String {
    let auth = match htpasswd {
        Some(path) => format!(
            "auth:\n  htpasswd:\n    realm: banger-test\n    path: {}\n",
            path.display()
        ),
        None => String::new(),
    };
    // No blob descriptor cache: sizes are read from storage, so tests that
    // truncate a stored blob see the registry serve the short file.
    format!(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  redirect:\n    disable: true\nhttp:\n  addr: {addr}\n  secret: banger-test-secret\n{auth}",
        dir.join("storage").display()
    )
}

fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind a free loopback port");
    listener.local_addr().expect("local addr").port()
}

/// The status code of `GET <path>` on `addr`, if it answers.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
struct TempDir {
    path: Option<PathBuf>,
}

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path: Some(path) }
    }

    fn path(&self) -> &Path {
        self.path.as_deref().expect("temp dir in use")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// `n` bytes of incompressible pseudo-random data (SplitMix64 from
/// `seed`), for layers whose size must survive compression.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(n);
    out
}
