//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF
//! distribution registry) on `127.0.0.1:<free port>` with filesystem
//! storage in a private temporary directory, optionally behind htpasswd
//! basic auth or bearer-token auth, plus helpers to push images and
//! multi-platform indexes to it with oci-client. Used by this crate's
//! tests and the daemon's end-to-end tests; not meant for production code.
//!
//! With token auth, a small token server (HTTP/1.1 on its own thread and
//! tokio runtime, also on loopback) checks basic credentials and issues
//! ES256 JWTs signed by a freshly generated self-signed certificate, which
//! the registry trusts through `rootcertbundle`. It records every request
//! it answers, so tests can check that the bearer flow really happened.
//!
//! The registry process is killed (SIGKILL) and reaped, the token server
//! stopped, and the directory removed, when the [`TestRegistry`] is
//! dropped, including while a failing test unwinds.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

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

/// The `service` of a token-auth registry: its challenges name it, and
/// the tokens' audience must be it.
pub const TOKEN_SERVICE: &str = "banger-test";
/// The issuer the token-auth registry trusts.
pub const TOKEN_ISSUER: &str = "banger-test-issuer";
/// How long issued tokens last, in seconds.
pub const TOKEN_LIFETIME_SECS: u64 = 300;

const START_ATTEMPTS: usize = 5;
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `docker-registry` on loopback. See the module docs.
#[derive(Debug)]
pub struct TestRegistry {
    // Dropped before `dir`: the process dies before its storage goes.
    process: Option<Process>,
    token_server: Option<TokenServer>,
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
        Self::start_inner(AuthMode::Anonymous)
    }

    /// Starts a registry that requires these basic-auth credentials for
    /// everything.
    pub fn start_with_basic_auth(username: &str, password: &str) -> TestRegistry {
        Self::start_inner(AuthMode::Basic(username.to_string(), password.to_string()))
    }

    /// Starts a registry with bearer-token auth: it answers 401 with
    /// `WWW-Authenticate: Bearer realm=...,service=...,scope=...` and
    /// accepts only JWTs from its token server, which grants the requested
    /// repository scopes for these basic-auth credentials, answers 401 to
    /// wrong ones and gives anonymous clients a token without access (as
    /// Docker Hub's does). See [`TestRegistry::token_requests`].
    pub fn start_with_token_auth(username: &str, password: &str) -> TestRegistry {
        Self::start_inner(AuthMode::Token(username.to_string(), password.to_string()))
    }

    fn start_inner(mode: AuthMode) -> TestRegistry {
        assert!(
            Path::new(REGISTRY_BINARY).exists(),
            "{REGISTRY_BINARY} is missing: apt-get install docker-registry"
        );
        let dir = TempDir::new("banger-test-registry");
        let mut token_server = None;
        let (auth, credentials) = match mode {
            AuthMode::Anonymous => (String::new(), None),
            AuthMode::Basic(user, password) => {
                let path = write_htpasswd(dir.path(), &user, &password);
                let auth = format!(
                    "auth:\n  htpasswd:\n    realm: banger-test\n    path: {}\n",
                    path.display()
                );
                (auth, Some((user, password)))
            }
            AuthMode::Token(user, password) => {
                let signer = TokenSigner::generate();
                let bundle = dir.path().join("token-signer.pem");
                std::fs::write(&bundle, &signer.cert_pem).expect("write token certificate");
                let server = TokenServer::start(signer, user.clone(), password.clone());
                let auth = format!(
                    "auth:\n  token:\n    realm: http://{}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                    server.addr,
                    bundle.display()
                );
                token_server = Some(server);
                (auth, Some((user, password)))
            }
        };
        // Token auth logs why it refuses a token at info level only.
        let log_level = if token_server.is_some() {
            "info"
        } else {
            "warn"
        };

        let config = dir.path().join("config.yml");
        let log_path = dir.path().join("registry.log");
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            // The port is free now; another process may take it before the
            // registry binds it, hence the retries.
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            std::fs::write(&config, registry_config(dir.path(), addr, log_level, &auth))
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
                    token_server,
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

    /// Every request the token server answered so far, oldest first;
    /// empty unless the registry was started with
    /// [`TestRegistry::start_with_token_auth`].
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.token_server
            .as_ref()
            .map(|server| {
                server
                    .state
                    .requests
                    .lock()
                    .expect("token requests")
                    .clone()
            })
            .unwrap_or_default()
    }

    /// A token for `repository` granting `actions` (`pull`, `push`), signed
    /// like the token server's, for tests that send a bearer token
    /// directly. Panics unless the registry uses token auth.
    pub fn issue_token(&self, repository: &str, actions: &[&str]) -> String {
        let server = self
            .token_server
            .as_ref()
            .expect("issue_token needs a registry started with start_with_token_auth");
        let access = vec![Access {
            kind: "repository".to_string(),
            name: repository.to_string(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }];
        server.state.signer.sign("test", TOKEN_SERVICE, access)
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

/// `auth` is the config's `auth:` section, empty for none.
fn registry_config(dir: &Path, addr: SocketAddr, log_level: &str, auth: &str) -> String {
    // No blob descriptor cache: sizes are read from storage, so tests that
    // truncate a stored blob see the registry serve the short file.
    format!(
        "version: 0.1\nlog:\n  level: {log_level}\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  redirect:\n    disable: true\nhttp:\n  addr: {addr}\n  secret: banger-test-secret\n{auth}",
        dir.join("storage").display()
    )
}

/// How the registry authenticates clients; `(user, password)`.
#[derive(Debug, Clone)]
enum AuthMode {
    Anonymous,
    Basic(String, String),
    Token(String, String),
}

/// Writes a bcrypt htpasswd file for one user into `dir`.
fn write_htpasswd(dir: &Path, user: &str, password: &str) -> PathBuf {
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
    let path = dir.join("htpasswd");
    std::fs::write(&path, &out.stdout).expect("write htpasswd");
    path
}

/// A request the token server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// `(user, password)` from `Authorization: Basic`, if one was sent.
    pub credentials: Option<(String, String)>,
    /// The `service` query parameter.
    pub service: Option<String>,
    /// Every `scope` query parameter, e.g. `repository:app:pull,push`.
    pub scopes: Vec<String>,
    /// 200 when a token was issued, 401 for wrong credentials, 404 for
    /// another path.
    pub status: u16,
}

/// One entry of a token's `access` claim.
#[derive(Debug, Clone, serde::Serialize)]
struct Access {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    actions: Vec<String>,
}

/// The claims distribution's token auth checks.
#[derive(Debug, serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    // distribution 2.8 reads `aud` as a single string.
    aud: &'a str,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    access: Vec<Access>,
}

/// A P-256 key and the self-signed certificate for it that the registry
/// trusts (`rootcertbundle`).
struct TokenSigner {
    key: jsonwebtoken::EncodingKey,
    /// The certificate as one base64 DER `x5c` entry.
    cert_x5c: String,
    cert_pem: String,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner").finish_non_exhaustive()
    }
}

impl TokenSigner {
    fn generate() -> TokenSigner {
        let key_pair = rcgen::KeyPair::generate().expect("generate token signing key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .expect("token certificate parameters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "banger test token signer");
        let cert = params
            .self_signed(&key_pair)
            .expect("self-sign token certificate");
        TokenSigner {
            key: jsonwebtoken::EncodingKey::from_ec_der(&key_pair.serialize_der()),
            cert_x5c: base64::engine::general_purpose::STANDARD.encode(cert.der()),
            cert_pem: cert.pem(),
        }
    }

    /// An ES256 JWT for `subject` granting `access`. The signing
    /// certificate travels in the `x5c` header; distribution checks that
    /// it chains to `rootcertbundle` (here it is the bundle itself).
    fn sign(&self, subject: &str, audience: &str, access: Vec<Access>) -> String {
        static JTI: AtomicU64 = AtomicU64::new(0);
        let now = unix_now();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.x5c = Some(vec![self.cert_x5c.clone()]);
        let claims = Claims {
            iss: TOKEN_ISSUER,
            sub: subject,
            aud: audience,
            exp: now + TOKEN_LIFETIME_SECS,
            nbf: now.saturating_sub(10),
            iat: now,
            jti: format!(
                "banger-test-{}-{}",
                std::process::id(),
                JTI.fetch_add(1, Ordering::Relaxed)
            ),
            access,
        };
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign token")
    }
}

/// What the token server's handlers share.
#[derive(Debug)]
struct TokenState {
    signer: TokenSigner,
    username: String,
    password: String,
    requests: Mutex<Vec<TokenRequest>>,
}

/// The token server: a thread running a current-thread tokio runtime, so
/// it answers whatever the test's own runtime (or lack of one) is doing.
/// Stopped and joined on drop.
#[derive(Debug)]
struct TokenServer {
    addr: SocketAddr,
    state: Arc<TokenState>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TokenServer {
    fn start(signer: TokenSigner, username: String, password: String) -> TokenServer {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind token server");
        listener
            .set_nonblocking(true)
            .expect("non-blocking token listener");
        let addr = listener.local_addr().expect("token server address");
        let state = Arc::new(TokenState {
            signer,
            username,
            password,
            requests: Mutex::new(Vec::new()),
        });
        let shutdown = CancellationToken::new();
        let thread = {
            let state = state.clone();
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name("test-token-server".to_string())
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("token server runtime");
                    runtime.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener)
                            .expect("token server listener");
                        serve_tokens(listener, state, shutdown).await;
                    });
                })
                .expect("spawn token server thread")
        };
        TokenServer {
            addr,
            state,
            shutdown,
            thread: Some(thread),
        }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts connections until `shutdown`; each is served by its own task
/// (dropped with the runtime when the server stops).
async fn serve_tokens(
    listener: tokio::net::TcpListener,
    state: Arc<TokenState>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        if let Err(error) = answer_token_request(stream, &state).await {
                            tracing::debug!(%error, "token server connection failed");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "token server accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

const TOKEN_REQUEST_LIMIT: usize = 16 * 1024;
const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads one request head and answers it, closing the connection.
async fn answer_token_request(
    mut stream: tokio::net::TcpStream,
    state: &TokenState,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() > TOKEN_REQUEST_LIMIT {
                return Err(std::io::Error::other("request head too large"));
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(TOKEN_REQUEST_TIMEOUT, read_head)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let (status, content_type, body) = token_response(&String::from_utf8_lossy(&head), state);
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let challenge = if status == 401 {
        "WWW-Authenticate: Basic realm=\"banger-test-token\"\r\n"
    } else {
        ""
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{challenge}Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Status, content type and body for a request head; records the request.
fn token_response(head: &str, state: &TokenState) -> (u16, &'static str, String) {
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default();
    let target = request_line.next().unwrap_or_default();
    if method != "GET" {
        return (405, "text/plain", "only GET is supported\n".to_string());
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let credentials = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("authorization"))
        .and_then(|(_, value)| basic_credentials(value.trim()));
    let mut service = None;
    let mut scopes = Vec::new();
    for (name, value) in query.split('&').filter_map(|pair| pair.split_once('=')) {
        match percent_decode(name).as_str() {
            "service" => service = Some(percent_decode(value)),
            "scope" => scopes.extend(percent_decode(value).split(' ').map(str::to_string)),
            _ => {}
        }
    }

    let (status, content_type, body) = if path != "/token" {
        (404, "text/plain", "no such endpoint\n".to_string())
    } else {
        match &credentials {
            Some((user, password)) if *user == state.username && *password == state.password => {
                let access = scopes.iter().filter_map(|s| parse_scope(s)).collect();
                (
                    200,
                    "application/json",
                    token_body(state, user, &service, access),
                )
            }
            // Anonymous: a token without access, as Docker Hub's token
            // server does; the registry then refuses the pull.
            None => (
                200,
                "application/json",
                token_body(state, "", &service, Vec::new()),
            ),
            Some(_) => (
                401,
                "text/plain",
                "invalid username or password\n".to_string(),
            ),
        }
    };
    state
        .requests
        .lock()
        .expect("token requests")
        .push(TokenRequest {
            credentials,
            service,
            scopes,
            status,
        });
    (status, content_type, body)
}

fn token_body(
    state: &TokenState,
    subject: &str,
    service: &Option<String>,
    access: Vec<Access>,
) -> String {
    let audience = service.as_deref().unwrap_or(TOKEN_SERVICE);
    let token = state.signer.sign(subject, audience, access);
    serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": TOKEN_LIFETIME_SECS,
        "issued_at": rfc3339(unix_now()),
    })
    .to_string()
}

/// `(user, password)` from a `Basic <base64>` header value.
fn basic_credentials(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// `repository:<name>:<action>[,<action>...]`; other resource types get
/// no access.
fn parse_scope(scope: &str) -> Option<Access> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    (kind == "repository").then(|| Access {
        kind: kind.to_string(),
        name: name.to_string(),
        actions: actions.split(',').map(str::to_string).collect(),
    })
}

/// Decodes `application/x-www-form-urlencoded` text (`+` is a space).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match hex_digit(bytes[i + 1]).zip(hex_digit(bytes[i + 2])) {
                    Some((high, low)) => {
                        out.push(high << 4 | low);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_digit(byte: u8) -> Option<u8> {
    char::from(byte).to_digit(16).map(|d| d as u8)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch.
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_request_parsing() {
        assert_eq!(
            percent_decode("repository%3Aprivate%2Fapp%3Apull%2Cpush+x%zz%4"),
            "repository:private/app:pull,push x%zz%4"
        );
        let access = parse_scope("repository:org/app:pull,push").expect("scope");
        assert_eq!(
            (access.name.as_str(), access.actions),
            ("org/app", vec!["pull".to_string(), "push".to_string()])
        );
        assert!(parse_scope("registry:catalog:*").is_none());
        assert_eq!(
            basic_credentials(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("alice:pa:ss")
            )),
            Some(("alice".to_string(), "pa:ss".to_string()))
        );
        assert_eq!(basic_credentials("Bearer abc"), None);
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
