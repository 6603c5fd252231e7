//! Registry credentials: the Docker CLI's `config.json` (`auths` entries
//! and credential helpers), turned into what oci-client sends. oci-client
//! does the HTTP side: it reads the registry's `WWW-Authenticate`
//! challenge and either sends basic credentials or fetches a bearer token
//! from the token realm (with our credentials, or anonymously).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

/// The key `docker login` uses for Docker Hub.
pub const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

/// How long a credential helper may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// No credentials; oci-client still fetches anonymous bearer tokens
    /// when the registry asks for them.
    Anonymous,
    /// User name and password (or personal access token).
    Basic {
        /// User name.
        username: String,
        /// Password or access token.
        password: String,
    },
    /// Docker's `identitytoken` (an OAuth2 refresh token from `docker
    /// login`). oci-client has no refresh-token grant, so it is sent as the
    /// password of basic auth on the token request, which registries that
    /// issue such tokens (ACR, Harbor robot tokens…) accept.
    IdentityToken {
        /// The user name stored next to it, if any.
        username: Option<String>,
        /// The token.
        token: String,
    },
    /// Docker's `registrytoken`: a bearer token sent as is.
    Bearer(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::IdentityToken { username, .. } => f
                .debug_struct("IdentityToken")
                .field("username", username)
                .field("token", &"<redacted>")
                .finish(),
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

impl Credentials {
    /// What oci-client sends.
    pub fn to_registry_auth(&self) -> RegistryAuth {
        match self {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Credentials::IdentityToken { username, token } => RegistryAuth::Basic(
                username.clone().unwrap_or_else(|| "<token>".to_string()),
                token.clone(),
            ),
            Credentials::Bearer(token) => RegistryAuth::Bearer(token.clone()),
        }
    }

    /// Whether any secret is sent.
    pub fn is_anonymous(&self) -> bool {
        matches!(self, Credentials::Anonymous)
    }
}

/// Where a pull gets its credentials.
#[derive(Debug, Clone, Default)]
pub enum CredentialSource {
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`;
    /// anonymous when the file or the registry's entry is missing.
    #[default]
    DockerConfig,
    /// A specific Docker `config.json`.
    DockerConfigFile(PathBuf),
    /// These credentials, whatever the registry.
    Explicit(Credentials),
}

/// Where the credentials used for a request came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialOrigin {
    /// Nothing found: anonymous.
    None {
        /// The config file that was consulted, if any existed.
        config: Option<PathBuf>,
    },
    /// An `auths` entry of this config file.
    DockerConfig(PathBuf),
    /// A credential helper named in this config file.
    Helper {
        /// `docker-credential-<name>`.
        helper: String,
        /// The config file naming it.
        config: PathBuf,
    },
    /// Passed in by the caller.
    Explicit,
}

impl fmt::Display for CredentialOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialOrigin::None { config: Some(path) } => {
                write!(f, "no credentials for it in {}", path.display())
            }
            CredentialOrigin::None { config: None } => f.write_str("no credentials configured"),
            CredentialOrigin::DockerConfig(path) => {
                write!(f, "credentials from {}", path.display())
            }
            CredentialOrigin::Helper { helper, config } => {
                write!(
                    f,
                    "credentials from {helper} (named in {})",
                    config.display()
                )
            }
            CredentialOrigin::Explicit => f.write_str("explicitly given credentials"),
        }
    }
}

/// Errors reading credentials.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The config file exists but cannot be read.
    #[error("cannot read Docker config {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid JSON of the expected shape.
    #[error("Docker config {} is not valid: fix or remove it", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// An `auth` field is not base64 of `user:password`.
    #[error("the \"auth\" field for {key:?} in {} is not base64 of \"user:password\": run `docker login` again", path.display())]
    InvalidAuthField {
        /// The file.
        path: PathBuf,
        /// The `auths` key.
        key: String,
    },
    /// A credential helper failed.
    #[error("credential helper {helper} failed for {server}: {detail}")]
    Helper {
        /// `docker-credential-<name>`.
        helper: String,
        /// The server URL asked for.
        server: String,
        /// What went wrong.
        detail: String,
    },
}

/// The parts of Docker's `config.json` that carry credentials.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(skip)]
    path: PathBuf,
}

#[derive(Clone, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

impl fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthEntry")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// What the config says about one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Inline credentials from `auths`.
    Found(Credentials),
    /// Ask `docker-credential-<helper> get` for `server`.
    Helper {
        /// `docker-credential-<name>`.
        helper: String,
        /// The server URL to ask for.
        server: String,
    },
    /// Nothing for this registry.
    NotFound,
}

impl DockerConfig {
    /// Parses a `config.json`; `path` is used in messages.
    pub fn parse(json: &[u8], path: &Path) -> Result<Self, CredentialsError> {
        let mut config: DockerConfig =
            serde_json::from_slice(json).map_err(|source| CredentialsError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        config.path = path.to_path_buf();
        Ok(config)
    }

    /// Reads `path`; `Ok(None)` if it does not exist.
    pub fn load(path: &Path) -> Result<Option<Self>, CredentialsError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::parse(&bytes, path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CredentialsError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// The file this config was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What this config holds for `registry` (a reference's registry, e.g.
    /// `docker.io` or `127.0.0.1:5000`). Like the Docker CLI, a credential
    /// helper for the registry (`credHelpers`, then `credsStore`) wins over
    /// `auths`; `auths` keys match exactly first, then with any
    /// `http(s)://` scheme and path stripped; all Docker Hub spellings
    /// (`docker.io`, `index.docker.io`, `https://index.docker.io/v1/`…) are
    /// one registry.
    pub fn lookup(&self, registry: &str) -> Result<Lookup, CredentialsError> {
        let wanted = canonical_host(registry);
        let server = if wanted == "docker.io" {
            DOCKER_HUB_AUTH_KEY.to_string()
        } else {
            registry.to_string()
        };
        let helper = self
            .cred_helpers
            .iter()
            .find(|(key, _)| key.as_str() == registry)
            .or_else(|| {
                self.cred_helpers
                    .iter()
                    .find(|(key, _)| normalize_key(key) == wanted)
            })
            .map(|(_, helper)| helper)
            .or(self.creds_store.as_ref())
            .filter(|helper| !helper.is_empty());
        if let Some(helper) = helper {
            return Ok(Lookup::Helper {
                helper: format!("docker-credential-{helper}"),
                server,
            });
        }
        let entry = self.auths.get_key_value(registry).or_else(|| {
            self.auths
                .iter()
                .find(|(key, _)| normalize_key(key) == wanted)
        });
        let Some((key, entry)) = entry else {
            return Ok(Lookup::NotFound);
        };
        Ok(match self.entry_credentials(key, entry)? {
            Some(credentials) => Lookup::Found(credentials),
            None => Lookup::NotFound,
        })
    }

    fn entry_credentials(
        &self,
        key: &str,
        entry: &AuthEntry,
    ) -> Result<Option<Credentials>, CredentialsError> {
        let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        if let Some(token) = non_empty(&entry.registrytoken) {
            return Ok(Some(Credentials::Bearer(token)));
        }
        let decoded = match non_empty(&entry.auth) {
            Some(auth) => Some(self.decode_auth(key, &auth)?),
            None => None,
        };
        let username = decoded
            .as_ref()
            .map(|(user, _)| user.clone())
            .or_else(|| non_empty(&entry.username))
            .filter(|u| !u.is_empty());
        if let Some(token) = non_empty(&entry.identitytoken) {
            return Ok(Some(Credentials::IdentityToken { username, token }));
        }
        let password = decoded
            .map(|(_, password)| password)
            .or_else(|| non_empty(&entry.password));
        Ok(match (username, password) {
            (Some(username), Some(password)) => Some(Credentials::Basic { username, password }),
            _ => None,
        })
    }

    fn decode_auth(&self, key: &str, auth: &str) -> Result<(String, String), CredentialsError> {
        let invalid = || CredentialsError::InvalidAuthField {
            path: self.path.clone(),
            key: key.to_string(),
        };
        let auth = auth.trim();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(auth)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(auth))
            .map_err(|_| invalid())?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        let (user, password) = text.split_once(':').ok_or_else(invalid)?;
        Ok((user.to_string(), password.to_string()))
    }
}

/// `host[:port]` of an `auths` key: scheme and path stripped, lowercased,
/// Docker Hub aliases folded into `docker.io`.
fn normalize_key(key: &str) -> String {
    let key = key.trim();
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    canonical_host(key.split('/').next().unwrap_or(key))
}

fn canonical_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    match host.as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

/// `$DOCKER_CONFIG/config.json` if `DOCKER_CONFIG` is set, else
/// `~/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.dir)
        });
    docker_config_path_from(std::env::var_os("DOCKER_CONFIG"), home)
}

fn docker_config_path_from(
    docker_config: Option<OsString>,
    home: Option<PathBuf>,
) -> Option<PathBuf> {
    match docker_config.filter(|d| !d.is_empty()) {
        Some(dir) => Some(PathBuf::from(dir).join("config.json")),
        None => home.map(|h| h.join(".docker").join("config.json")),
    }
}

/// Credentials for `registry` from `source`, and where they came from.
pub(crate) async fn resolve_credentials(
    source: &CredentialSource,
    registry: &str,
) -> Result<(Credentials, CredentialOrigin), CredentialsError> {
    let path = match source {
        CredentialSource::Explicit(credentials) => {
            return Ok((credentials.clone(), CredentialOrigin::Explicit))
        }
        CredentialSource::DockerConfigFile(path) => Some(path.clone()),
        CredentialSource::DockerConfig => docker_config_path(),
    };
    let Some(path) = path else {
        return Ok((
            Credentials::Anonymous,
            CredentialOrigin::None { config: None },
        ));
    };
    let Some(config) = DockerConfig::load(&path)? else {
        return Ok((
            Credentials::Anonymous,
            CredentialOrigin::None { config: None },
        ));
    };
    match config.lookup(registry)? {
        Lookup::Found(credentials) => Ok((credentials, CredentialOrigin::DockerConfig(path))),
        Lookup::NotFound => Ok((
            Credentials::Anonymous,
            CredentialOrigin::None { config: Some(path) },
        )),
        Lookup::Helper { helper, server } => {
            let credentials = run_helper(&helper, &server).await?;
            let origin = match credentials {
                Some(_) => CredentialOrigin::Helper {
                    helper,
                    config: path.clone(),
                },
                None => CredentialOrigin::None { config: Some(path) },
            };
            Ok((credentials.unwrap_or(Credentials::Anonymous), origin))
        }
    }
}

#[derive(Deserialize)]
struct HelperReply {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// Runs `<helper> get` with `server` on stdin, as the Docker CLI does.
/// `Ok(None)` when the helper has nothing for the server.
pub(crate) async fn run_helper(
    helper: &str,
    server: &str,
) -> Result<Option<Credentials>, CredentialsError> {
    let fail = |detail: String| CredentialsError::Helper {
        helper: helper.to_string(),
        server: server.to_string(),
        detail,
    };
    let mut child = tokio::process::Command::new(helper)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot run it ({e}); install it or fix the config")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(server.as_bytes())
            .await
            .map_err(|e| fail(format!("cannot write to it: {e}")))?;
    }
    let output = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| fail(format!("no answer within {}s", HELPER_TIMEOUT.as_secs())))?
        .map_err(|e| fail(e.to_string()))?;
    if !output.status.success() {
        let message = String::from_utf8_lossy(&output.stdout).trim().to_string()
            + String::from_utf8_lossy(&output.stderr).trim();
        if message.contains("credentials not found") {
            return Ok(None);
        }
        return Err(fail(format!("{}: {message}", output.status)));
    }
    let reply: HelperReply = serde_json::from_slice(&output.stdout)
        .map_err(|e| fail(format!("unreadable answer: {e}")))?;
    if reply.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(if reply.username == "<token>" {
        Credentials::IdentityToken {
            username: None,
            token: reply.secret,
        }
    } else {
        Credentials::Basic {
            username: reply.username,
            password: reply.secret,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> DockerConfig {
        DockerConfig::parse(json.as_bytes(), Path::new("/test/config.json")).expect("parse")
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn basic(u: &str, p: &str) -> Lookup {
        Lookup::Found(Credentials::Basic {
            username: u.into(),
            password: p.into(),
        })
    }

    #[test]
    fn auth_field_is_base64_user_colon_password() {
        let c = config(&format!(
            r#"{{"auths": {{"registry.example:5000": {{"auth": "{}"}}}}}}"#,
            b64("alice:pa:ss")
        ));
        assert_eq!(
            c.lookup("registry.example:5000").expect("lookup"),
            basic("alice", "pa:ss")
        );
        assert_eq!(c.lookup("other.example").expect("lookup"), Lookup::NotFound);
    }

    #[test]
    fn username_and_password_fields() {
        let c = config(r#"{"auths": {"ghcr.io": {"username": "bob", "password": "tok"}}}"#);
        assert_eq!(c.lookup("ghcr.io").expect("lookup"), basic("bob", "tok"));
    }

    #[test]
    fn identity_and_registry_tokens() {
        let c = config(&format!(
            r#"{{"auths": {{
                "a.example": {{"auth": "{}", "identitytoken": "refresh"}},
                "b.example": {{"identitytoken": "refresh2"}},
                "c.example": {{"registrytoken": "bearer", "auth": "{}"}}
            }}}}"#,
            b64("00000000-0000-0000-0000-000000000000:"),
            b64("x:y")
        ));
        assert_eq!(
            c.lookup("a.example").expect("lookup"),
            Lookup::Found(Credentials::IdentityToken {
                username: Some("00000000-0000-0000-0000-000000000000".into()),
                token: "refresh".into()
            })
        );
        let Lookup::Found(b) = c.lookup("b.example").expect("lookup") else {
            panic!("b.example not found");
        };
        assert_eq!(
            b.to_registry_auth(),
            RegistryAuth::Basic("<token>".into(), "refresh2".into())
        );
        assert_eq!(
            c.lookup("c.example").expect("lookup"),
            Lookup::Found(Credentials::Bearer("bearer".into()))
        );
    }

    #[test]
    fn keys_match_with_and_without_scheme() {
        let c = config(&format!(
            r#"{{"auths": {{
                "https://Registry.Example:5000/v2/": {{"auth": "{}"}},
                "http://127.0.0.1:5000": {{"auth": "{}"}}
            }}}}"#,
            b64("u1:p1"),
            b64("u2:p2")
        ));
        assert_eq!(
            c.lookup("registry.example:5000").expect("lookup"),
            basic("u1", "p1")
        );
        assert_eq!(
            c.lookup("127.0.0.1:5000").expect("lookup"),
            basic("u2", "p2")
        );
        assert_eq!(
            c.lookup("127.0.0.1:5001").expect("lookup"),
            Lookup::NotFound
        );
        assert_eq!(
            c.lookup("registry.example").expect("lookup"),
            Lookup::NotFound
        );
    }

    #[test]
    fn exact_key_wins_over_normalized_match() {
        let c = config(&format!(
            r#"{{"auths": {{
                "https://r.example": {{"auth": "{}"}},
                "r.example": {{"auth": "{}"}}
            }}}}"#,
            b64("scheme:1"),
            b64("exact:2")
        ));
        assert_eq!(c.lookup("r.example").expect("lookup"), basic("exact", "2"));
    }

    #[test]
    fn docker_hub_aliases() {
        let c = config(&format!(
            r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{}"}}}}}}"#,
            b64("hub:secret")
        ));
        assert_eq!(
            c.lookup("docker.io").expect("lookup"),
            basic("hub", "secret")
        );
        assert_eq!(
            c.lookup("index.docker.io").expect("lookup"),
            basic("hub", "secret")
        );
        let c = config(&format!(
            r#"{{"auths": {{"docker.io": {{"auth": "{}"}}}}}}"#,
            b64("hub2:s")
        ));
        assert_eq!(c.lookup("docker.io").expect("lookup"), basic("hub2", "s"));
    }

    #[test]
    fn empty_entries_and_unknown_fields_are_fine() {
        let c = config(
            r#"{"auths": {"x.example": {}, "y.example": {"auth": ""}}, "psFormat": "table", "HttpHeaders": {}}"#,
        );
        assert_eq!(c.lookup("x.example").expect("lookup"), Lookup::NotFound);
        assert_eq!(c.lookup("y.example").expect("lookup"), Lookup::NotFound);
        assert_eq!(
            config("{}").lookup("x.example").expect("lookup"),
            Lookup::NotFound
        );
    }

    #[test]
    fn broken_auth_field_is_an_error_naming_the_key() {
        let c = config(r#"{"auths": {"x.example": {"auth": "!!!not base64"}}}"#);
        let err = c.lookup("x.example").expect_err("invalid base64");
        assert!(err.to_string().contains("x.example"), "{err}");
        assert!(err.to_string().contains("/test/config.json"), "{err}");
        let c = config(&format!(
            r#"{{"auths": {{"x.example": {{"auth": "{}"}}}}}}"#,
            b64("no-colon")
        ));
        assert!(c.lookup("x.example").is_err());
    }

    #[test]
    fn malformed_json_is_an_error_naming_the_file() {
        let err = DockerConfig::parse(b"{\"auths\": [", Path::new("/x/config.json"))
            .expect_err("bad json");
        assert!(err.to_string().contains("/x/config.json"), "{err}");
        let err = DockerConfig::parse(br#"{"auths": {"a": "string"}}"#, Path::new("/y.json"))
            .expect_err("wrong shape");
        assert!(matches!(err, CredentialsError::Parse { .. }));
    }

    #[test]
    fn credential_helpers_win_over_auths() {
        let c = config(&format!(
            r#"{{"auths": {{"ghcr.io": {{"auth": "{}"}}, "https://index.docker.io/v1/": {{}}}},
                "credsStore": "desktop", "credHelpers": {{"ghcr.io": "gh"}}}}"#,
            b64("a:b")
        ));
        assert_eq!(
            c.lookup("ghcr.io").expect("lookup"),
            Lookup::Helper {
                helper: "docker-credential-gh".into(),
                server: "ghcr.io".into()
            }
        );
        assert_eq!(
            c.lookup("docker.io").expect("lookup"),
            Lookup::Helper {
                helper: "docker-credential-desktop".into(),
                server: DOCKER_HUB_AUTH_KEY.into()
            }
        );
    }

    #[test]
    fn config_path_honours_docker_config() {
        assert_eq!(
            docker_config_path_from(Some("/etc/dc".into()), Some("/home/u".into())),
            Some(PathBuf::from("/etc/dc/config.json"))
        );
        assert_eq!(
            docker_config_path_from(Some("".into()), Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.docker/config.json"))
        );
        assert_eq!(docker_config_path_from(None, None), None);
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let c = Credentials::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        let c = Credentials::Bearer("tok123".into());
        assert!(!format!("{c:?}").contains("tok123"));
    }

    #[tokio::test]
    async fn helper_protocol() {
        let dir = std::env::temp_dir().join(format!("banger-helper-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let script = dir.join("docker-credential-fake");
        std::fs::write(
            &script,
            "#!/bin/sh\nread server\ncase \"$server\" in\n  good.example) echo '{\"ServerURL\":\"good.example\",\"Username\":\"carol\",\"Secret\":\"s3\"}';;\n  tok.example) echo '{\"Username\":\"<token>\",\"Secret\":\"rt\"}';;\n  *) echo 'credentials not found in native keychain'; exit 1;;\nesac\n",
        )
        .expect("write script");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let helper = script.to_str().expect("utf-8 path");
        assert_eq!(
            run_helper(helper, "good.example").await.expect("helper"),
            Some(Credentials::Basic {
                username: "carol".into(),
                password: "s3".into()
            })
        );
        assert_eq!(
            run_helper(helper, "tok.example").await.expect("helper"),
            Some(Credentials::IdentityToken {
                username: None,
                token: "rt".into()
            })
        );
        assert_eq!(run_helper(helper, "other").await.expect("helper"), None);
        let err = run_helper("/nonexistent/docker-credential-x", "a")
            .await
            .expect_err("missing helper");
        assert!(err.to_string().contains("docker-credential-x"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
