//! Where banger keeps things, following the XDG base directory spec, so
//! that the CLI and the daemon agree and several isolated daemons can run
//! side by side (each with its own `XDG_*` variables).
//!
//! - config:  `$XDG_CONFIG_HOME/banger/` (fallback `~/.config/banger/`)
//! - state:   `$XDG_STATE_HOME/banger/`  (fallback `~/.local/state/banger/`)
//! - runtime: `$XDG_RUNTIME_DIR/banger/` (fallback `/run/banger` for root,
//!   `/tmp/banger-<uid>` for others)

use std::ffi::OsString;
use std::path::PathBuf;

/// All of banger's locations on this host, for one set of XDG variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot tell where banger keeps its files: neither {var} nor HOME is set")]
pub struct PathsError {
    var: &'static str,
}

impl Paths {
    /// Paths from this process's environment.
    pub fn from_env() -> Result<Self, PathsError> {
        Self::from_lookup(|k| std::env::var_os(k))
    }

    /// Paths from an arbitrary environment lookup (for tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Result<Self, PathsError> {
        let abs = |k: &str| lookup(k).map(PathBuf::from).filter(|p| p.is_absolute());
        let home = abs("HOME");
        let config_base = abs("XDG_CONFIG_HOME")
            .or_else(|| home.as_ref().map(|h| h.join(".config")))
            .ok_or(PathsError {
                var: "XDG_CONFIG_HOME",
            })?;
        let state_base = abs("XDG_STATE_HOME")
            .or_else(|| home.as_ref().map(|h| h.join(".local/state")))
            .ok_or(PathsError {
                var: "XDG_STATE_HOME",
            })?;
        let runtime_dir = match abs("XDG_RUNTIME_DIR") {
            Some(dir) => dir.join("banger"),
            None => {
                // SAFETY: getuid has no preconditions and cannot fail.
                let uid = unsafe { libc::getuid() };
                if uid == 0 {
                    PathBuf::from("/run/banger")
                } else {
                    PathBuf::from(format!("/tmp/banger-{uid}"))
                }
            }
        };
        Ok(Self {
            config_dir: config_base.join("banger"),
            state_dir: state_base.join("banger"),
            runtime_dir,
        })
    }

    /// `config.toml`.
    pub fn config_file(&self) -> PathBuf {
        self.config_dir.join("config.toml")
    }

    /// The daemon's Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.sock")
    }

    /// The single-instance lock file (also records the daemon's pid).
    pub fn lock_file(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.lock")
    }

    /// The daemon's JSON-lines log.
    pub fn log_file(&self) -> PathBuf {
        self.state_dir.join("logs").join("bangerd.jsonl")
    }

    /// Where an auto-started daemon's stderr goes.
    pub fn stderr_log_file(&self) -> PathBuf {
        self.state_dir.join("logs").join("bangerd.stderr.log")
    }

    /// The database directory.
    pub fn db_dir(&self) -> PathBuf {
        self.state_dir.join("db")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn xdg_variables_win() {
        let p = Paths::from_lookup(env(&[
            ("HOME", "/home/u"),
            ("XDG_CONFIG_HOME", "/c"),
            ("XDG_STATE_HOME", "/s"),
            ("XDG_RUNTIME_DIR", "/r"),
        ]))
        .expect("paths");
        assert_eq!(p.config_file(), PathBuf::from("/c/banger/config.toml"));
        assert_eq!(p.db_dir(), PathBuf::from("/s/banger/db"));
        assert_eq!(p.socket(), PathBuf::from("/r/banger/bangerd.sock"));
    }

    #[test]
    fn home_fallbacks_and_relative_values_ignored() {
        let p = Paths::from_lookup(env(&[("HOME", "/home/u"), ("XDG_STATE_HOME", "relative")]))
            .expect("paths");
        assert_eq!(p.config_dir, PathBuf::from("/home/u/.config/banger"));
        assert_eq!(p.state_dir, PathBuf::from("/home/u/.local/state/banger"));
    }

    #[test]
    fn no_home_no_xdg_is_an_error() {
        let err = Paths::from_lookup(env(&[])).expect_err("must fail");
        assert!(err.to_string().contains("XDG_CONFIG_HOME"));
    }
}
