//! The peer pipeline banger's pull is measured against, step by step:
//!
//! 1. `skopeo copy docker://<registry>/<repo>:<tag> oci:<dir>:<tag>`;
//! 2. `umoci raw unpack --image <dir>:<tag> <rootfs>` (`--rootless` when
//!    not root);
//! 3. `mkfs.ext4 -q -F -d <rootfs> <out> <size>` with the size banger chose.
//!
//! Each tool runs as a child process that is killed if the benchmark is
//! interrupted; a failing tool is an error carrying its stderr.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use tokio::process::Command;

/// How long one tool may run before the benchmark gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The tools, by the names they are run with (found on `PATH`; `mkfs.ext4`
/// also in `/sbin` and `/usr/sbin`).
pub const SKOPEO: &str = "skopeo";
pub const UMOCI: &str = "umoci";
pub const MKFS: &str = "mkfs.ext4";

/// Times of one run of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steps {
    pub skopeo: Duration,
    pub umoci: Duration,
    pub mkfs: Duration,
}

impl Steps {
    pub fn total(&self) -> Duration {
        self.skopeo + self.umoci + self.mkfs
    }
}

/// The paths one run of the pipeline writes, under one directory.
#[derive(Debug, Clone)]
pub struct RunDirs {
    pub oci: PathBuf,
    pub rootfs: PathBuf,
    pub ext4: PathBuf,
}

impl RunDirs {
    /// Paths under `dir`, which must exist; none of them may.
    pub fn under(dir: &Path) -> Self {
        RunDirs {
            oci: dir.join("oci"),
            rootfs: dir.join("rootfs"),
            ext4: dir.join("rootfs.ext4"),
        }
    }
}

/// Runs the three steps for `registry_ref` (`127.0.0.1:PORT/repo:tag`).
pub async fn pipeline(registry_ref: &str, dirs: &RunDirs, size: u64) -> anyhow::Result<Steps> {
    let tag = registry_ref
        .rsplit_once(':')
        .map(|(_, tag)| tag)
        .filter(|t| !t.contains('/'))
        .ok_or_else(|| anyhow!("{registry_ref} has no tag"))?;
    let layout = format!("{}:{tag}", dirs.oci.display());

    let mut skopeo = Command::new(SKOPEO);
    // The benchmark's own registry: no signature policy to consult.
    skopeo
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
        ])
        .arg(format!("docker://{registry_ref}"))
        .arg(format!("oci:{layout}"));
    let skopeo = timed(skopeo).await?;

    let mut umoci = Command::new(UMOCI);
    umoci.args(["raw", "unpack"]);
    if !nix::unistd::geteuid().is_root() {
        umoci.arg("--rootless");
    }
    umoci.arg("--image").arg(&layout).arg(&dirs.rootfs);
    let umoci = timed(umoci).await?;

    let mkfs = mkfs(&dirs.rootfs, &dirs.ext4, size).await?;
    Ok(Steps {
        skopeo,
        umoci,
        mkfs,
    })
}

/// Times `mkfs.ext4 -q -F -d <tree> <out> <size>`.
pub async fn mkfs(tree: &Path, out: &Path, size: u64) -> anyhow::Result<Duration> {
    let mut cmd = Command::new(mkfs_path());
    cmd.args(["-q", "-F", "-d"])
        .arg(tree)
        .arg(out)
        .arg(format!("{}k", size.div_ceil(1024)));
    timed(cmd).await
}

/// The first line a tool prints about its version, for the report.
pub async fn version(tool: &str) -> String {
    let (cmd, args): (PathBuf, &[&str]) = match tool {
        MKFS => (mkfs_path(), &["-V"]),
        _ => (PathBuf::from(tool), &["--version"]),
    };
    let out = Command::new(&cmd)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    match out {
        Ok(out) => {
            // mke2fs prints its version on stderr.
            let text = [out.stdout, out.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        }
        Err(_) => format!("{tool} (version unknown)"),
    }
}

/// Fails with what to install when a tool is missing.
pub fn check_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = [SKOPEO, UMOCI]
        .into_iter()
        .filter(|t| find_in_path(OsStr::new(t)).is_none())
        .chain((!mkfs_path().is_absolute()).then_some(MKFS))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} not found: apt-get install -y skopeo umoci e2fsprogs",
            missing.join(", ")
        );
    }
    Ok(())
}

fn mkfs_path() -> PathBuf {
    find_in_path(OsStr::new(MKFS))
        .or_else(|| {
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(MKFS))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from(MKFS))
}

fn find_in_path(name: &OsStr) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs `cmd` to completion and returns its wall time, from just before
/// the spawn to its exit. Output goes to pipes that are read concurrently,
/// so a chatty tool cannot block.
async fn timed(mut cmd: Command) -> anyhow::Result<Duration> {
    let shown = format!("{:?}", cmd.as_std());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let child = cmd.spawn().with_context(|| format!("cannot run {shown}"))?;
    let out = tokio::time::timeout(STEP_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("{shown} did not finish within {STEP_TIMEOUT:?}"))?
        .with_context(|| format!("waiting for {shown}"))?;
    let elapsed = started.elapsed();
    if !out.status.success() {
        bail!(
            "{shown} failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_add_up() {
        let s = Steps {
            skopeo: Duration::from_millis(1),
            umoci: Duration::from_millis(20),
            mkfs: Duration::from_millis(300),
        };
        assert_eq!(s.total(), Duration::from_millis(321));
    }

    #[tokio::test]
    async fn a_failing_tool_is_an_error_with_its_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo nope >&2; exit 3"]);
        let err = timed(cmd).await.expect_err("exit 3");
        let text = format!("{err:#}");
        assert!(
            text.contains("nope") && text.contains("exit status: 3"),
            "{text}"
        );
        let mut cmd = Command::new("true");
        cmd.arg("x");
        assert!(timed(cmd).await.is_ok());
    }
}
