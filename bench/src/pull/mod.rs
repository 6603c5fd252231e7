//! The `pull` benchmark: `ImagePull` of a generated multi-layer image (see
//! [`image`]) from a local registry, through a real `bangerd`, against the
//! peer pipeline `skopeo copy` + `umoci raw unpack` + `mkfs.ext4 -d` (see
//! [`peer`]).
//!
//! - cold: each banger pull runs on a fresh daemon (empty state, so an
//!   empty layer cache), the peer pipeline into fresh directories. Target:
//!   banger at least 1.5x faster (peer median / banger median >= 1.5);
//! - warm: pulls of the same image under new names on the last daemon,
//!   whose layer cache holds every layer and whose tree cache holds the
//!   unpacked tree, against `mkfs.ext4 -d` alone on the peer's unpacked
//!   tree. Target: banger median <= 1.2x mkfs median. For comparison, the
//!   same pull with the tree cache emptied first (layers cached only).
//!
//! Runs alternate (banger, peer, banger, ...) so a change in the machine's
//! load affects both sides, and `sync` runs before each timed run so no run
//! pays for the previous one's dirty pages. On ext4 without a journal the
//! timings are erratic (see [`hostfs`]): the report says so. Everything (daemons, registry,
//! temporary directories, tool processes) is removed at the end, on error
//! and on Ctrl-C, by its owner's `Drop`.

mod banger;
mod hostfs;
mod image;
mod peer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use banger_image::testing::{TestRegistry, REGISTRY_BINARY};

use crate::args::PullArgs;
use crate::cpu;
use crate::daemon::{BenchDaemon, Stopped};
use crate::measure;
use crate::stats::Summary;
use crate::table::{self, fmt_duration, Columns, Row, Target, Value, MIB};
use crate::{load_average, note};

use self::banger::Pulled;
use self::image::{Image, Spec, Stats};
use self::peer::{RunDirs, Steps};

/// Cold target: the peer pipeline takes at least this many times as long.
const COLD_SPEEDUP_TARGET: f64 = 1.5;
/// Warm target: at most this many times `mkfs.ext4 -d` alone.
const WARM_OVER_MKFS_TARGET: f64 = 1.2;

const REPO: &str = "bench/pull";
const TAG: &str = "v1";

/// Everything that was measured.
#[derive(Debug)]
pub struct Report {
    bin_dir: PathBuf,
    runs: u32,
    seed: u64,
    reference: String,
    stats: Stats,
    generated_in: Duration,
    rootfs_bytes: u64,
    daemon_version: String,
    tools: Vec<String>,
    /// `/proc/loadavg` before and after the timed runs.
    load: [String; 2],
    /// Why the timings may not be trusted.
    warning: Option<&'static str>,
    pub rows: Vec<Row>,
    stopped: Stopped,
}

/// What [`measure`] hands back to [`run`].
#[derive(Debug)]
struct Measured {
    reference: String,
    stats: Stats,
    generated_in: Duration,
    rootfs_bytes: u64,
    daemon_version: String,
    tools: Vec<String>,
    load: [String; 2],
    warning: Option<&'static str>,
    rows: Vec<Row>,
    stopped: Stopped,
}

pub fn run(args: &PullArgs) -> anyhow::Result<Report> {
    peer::check_tools()?;
    if !Path::new(REGISTRY_BINARY).is_file() {
        bail!("{REGISTRY_BINARY} not found: apt-get install -y docker-registry");
    }
    let (bin_dir, m) = crate::run_bench(args.common.bin_dir.as_deref(), |_| measure(args.clone()))?;
    Ok(Report {
        bin_dir,
        runs: args.runs,
        seed: args.seed,
        reference: m.reference,
        stats: m.stats,
        generated_in: m.generated_in,
        rootfs_bytes: m.rootfs_bytes,
        daemon_version: m.daemon_version,
        tools: m.tools,
        load: m.load,
        warning: m.warning,
        rows: m.rows,
        stopped: m.stopped,
    })
}

/// Sets its flag when dropped: stops the image build when the benchmark
/// is interrupted while it runs.
#[derive(Debug)]
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn measure(args: PullArgs) -> anyhow::Result<Measured> {
    let runs = args.runs as usize;

    // The image.
    let spec = Spec {
        file_bytes: args.image_mb * MIB,
        seed: args.seed,
    };
    note(format!(
        "generating a {} MiB image (seed {})",
        args.image_mb, args.seed
    ));
    let started = Instant::now();
    let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
    let flag = Arc::clone(&cancel.0);
    let image = tokio::task::spawn_blocking(move || Image::generate(spec, &flag))
        .await
        .map_err(|e| anyhow!("the image build panicked: {e}"))??;
    drop(cancel);
    let generated_in = started.elapsed();
    let Image {
        layers,
        config,
        stats,
    } = image;

    // The registry, with the image pushed.
    let registry = Arc::new(
        std::panic::catch_unwind(TestRegistry::start)
            .map_err(|_| anyhow!("docker-registry did not start (see the message above)"))?,
    );
    let reference = registry.reference(REPO, TAG);
    note(format!("pushing it to {reference}"));
    let push = {
        let registry = Arc::clone(&registry);
        let layers = layers
            .into_iter()
            .map(|l| (image::LAYER_GZIP.to_string(), l.gzip))
            .collect();
        tokio::spawn(async move { registry.push_image(REPO, TAG, layers, &config).await })
    };
    push.await
        .map_err(|_| anyhow!("pushing the image failed (see the message above)"))?;

    let work = tempfile::Builder::new()
        .prefix("banger-bench-pull-")
        .tempdir()
        .context("cannot create a temporary directory")?;

    let warning =
        hostfs::ext4_without_journal(&std::env::temp_dir()).then_some(hostfs::NO_JOURNAL_WARNING);
    if let Some(warning) = warning {
        note(format!("warning: {warning}"));
    }
    let load_before = load_average();
    // Cold: a fresh daemon for each banger pull, fresh directories for each
    // peer run.
    let mut samples = Samples::default();
    let mut daemon: Option<BenchDaemon> = None;
    let mut tree: Option<PathBuf> = None;
    for i in 0..runs {
        if let Some(mut old) = daemon.take() {
            old.stop();
        }
        let fresh = BenchDaemon::start()?;
        let (socket, pid) = (fresh.harness()?.socket(), fresh.pid());
        let state = fresh.harness()?.paths().state_dir;
        daemon = Some(fresh);
        sync().await;
        let pulled = banger::pull(&socket, pid, &reference, "bench-cold").await?;
        let size = samples.cold.first().unwrap_or(&pulled).image.rootfs_bytes;
        // The peer's timed run must not share the machine with the
        // removal of banger's staging tree.
        settle(&state, 1).await;

        let dir = work.path().join(format!("peer-{i}"));
        tokio::fs::create_dir(&dir).await?;
        let dirs = RunDirs::under(&dir);
        sync().await;
        let cpu_before = cpu::of_self()?;
        let steps = peer::pipeline(&reference, &dirs, size).await?;
        let peer_cpu = cpu::of_self()?.since(&cpu_before).children;
        note(format!(
            "cold {}/{runs}: banger {} ({}); skopeo {} + umoci {} + mkfs {} = {}",
            i + 1,
            fmt_duration(pulled.total),
            pulled.brief(),
            fmt_duration(steps.skopeo),
            fmt_duration(steps.umoci),
            fmt_duration(steps.mkfs),
            fmt_duration(steps.total()),
        ));
        // Keep only the newest unpacked tree, for `mkfs.ext4 -d` alone.
        remove(&dirs.oci).await?;
        remove(&dirs.ext4).await?;
        if let Some(old) = tree.replace(dirs.rootfs.clone()) {
            remove(&old).await?;
        }
        note(format!("  cold {}: {}", i + 1, pulled.details));
        samples.cold.push(pulled);
        samples.peer.push(steps);
        samples.peer_cpu.push(peer_cpu);
    }
    let mut daemon = daemon.ok_or_else(|| anyhow!("no runs"))?;
    let tree = tree.ok_or_else(|| anyhow!("no runs"))?;
    let size = samples.cold[0].image.rootfs_bytes;
    let (socket, pid) = (daemon.harness()?.socket(), daemon.pid());

    // Warm: the last daemon's cache holds every layer, and its tree cache
    // the unpacked tree (made by its cold pull).
    let out = work.path().join("alone.ext4");
    let state = daemon.harness()?.paths().state_dir;
    let trees = state.join("layers/trees");
    for i in 0..runs {
        let name = format!("bench-warm-{i}");
        // Only the cold pull's image is left.
        settle(&state, 1).await;
        sync().await;
        let pulled = banger::pull(&socket, pid, &reference, &name).await?;
        banger::delete(&socket, &name).await?;
        remove(&out).await?;
        settle(&state, 1).await;
        sync().await;
        let cpu_before = cpu::of_self()?;
        let took = peer::mkfs(&tree, &out, size).await?;
        let mkfs_cpu = cpu::of_self()?.since(&cpu_before).children;
        // The same pull without the cached tree (it is made again).
        remove(&trees).await?;
        let name = format!("bench-warm-untreed-{i}");
        settle(&state, 1).await;
        sync().await;
        let untreed = banger::pull(&socket, pid, &reference, &name).await?;
        banger::delete(&socket, &name).await?;
        note(format!(
            "warm {}/{runs}: banger {} ({}); mkfs.ext4 -d alone {}; banger without the cached tree {} ({})",
            i + 1,
            fmt_duration(pulled.total),
            pulled.brief(),
            fmt_duration(took),
            fmt_duration(untreed.total),
            untreed.brief(),
        ));
        note(format!("  warm {}: {}", i + 1, pulled.details));
        note(format!(
            "  without the cached tree {}: {}",
            i + 1,
            untreed.details
        ));
        samples.warm.push(pulled);
        samples.mkfs_alone.push(took);
        samples.mkfs_cpu.push(mkfs_cpu);
        samples.untreed.push(untreed);
    }

    let load_after = load_average();
    let (_, daemon_version) = measure::in_process_version(&socket, 0, 1).await?;
    let stopped = daemon.stop();
    let mut tools = Vec::new();
    for tool in [peer::SKOPEO, peer::UMOCI, peer::MKFS] {
        tools.push(peer::version(tool).await);
    }
    Ok(Measured {
        rows: rows(&samples)?,
        reference,
        stats,
        generated_in,
        rootfs_bytes: size,
        daemon_version,
        tools,
        load: [load_before, load_after],
        warning,
        stopped,
    })
}

/// Everything timed, run by run.
#[derive(Debug, Default)]
struct Samples {
    cold: Vec<Pulled>,
    peer: Vec<Steps>,
    /// CPU time of the three tools of each peer run.
    peer_cpu: Vec<Duration>,
    warm: Vec<Pulled>,
    mkfs_alone: Vec<Duration>,
    mkfs_cpu: Vec<Duration>,
    /// Warm pulls after the tree cache was emptied (layers cached only).
    untreed: Vec<Pulled>,
}

fn rows(s: &Samples) -> anyhow::Result<Vec<Row>> {
    let summary =
        |samples: &[Duration]| Summary::of(samples).ok_or_else(|| anyhow!("no samples were taken"));
    let totals = |pulls: &[Pulled]| pulls.iter().map(|p| p.total).collect::<Vec<_>>();
    let cpu = |pulls: &[Pulled]| pulls.iter().map(|p| p.cpu).collect::<Vec<_>>();
    let step = |f: fn(&Steps) -> Duration| s.peer.iter().map(f).collect::<Vec<_>>();
    let timing = |what: &str, samples: &[Duration]| -> anyhow::Result<Row> {
        Ok(Row {
            what: what.to_string(),
            value: Value::Timing(summary(samples)?),
            target: None,
        })
    };

    let banger_cold = summary(&totals(&s.cold))?;
    let peer_cold = summary(&step(Steps::total))?;
    let banger_warm = summary(&totals(&s.warm))?;
    let alone = summary(&s.mkfs_alone)?;
    // From whole nanoseconds, so a ratio exactly on target is not lost to rounding.
    let ratio = |a: Duration, b: Duration| a.as_nanos() as f64 / b.as_nanos().max(1) as f64;

    let mut rows = vec![
        timing("banger pull, cold (empty layer cache)", &totals(&s.cold))?,
        timing("  CPU time (bangerd and its children)", &cpu(&s.cold))?,
        timing("skopeo + umoci + mkfs.ext4, cold", &step(Steps::total))?,
        timing("  skopeo copy", &step(|s| s.skopeo))?,
        timing("  umoci raw unpack", &step(|s| s.umoci))?,
        timing("  mkfs.ext4 -d", &step(|s| s.mkfs))?,
        timing("  CPU time (the three tools)", &s.peer_cpu)?,
        Row {
            what: "cold speedup (peer / banger)".into(),
            value: Value::Ratio(ratio(peer_cold.median, banger_cold.median)),
            target: Some(Target::RatioAtLeast(COLD_SPEEDUP_TARGET)),
        },
        timing("banger pull, warm (layers cached)", &totals(&s.warm))?,
        timing("  CPU time (bangerd and its children)", &cpu(&s.warm))?,
        timing("mkfs.ext4 -d alone (same tree and size)", &s.mkfs_alone)?,
        timing("  CPU time", &s.mkfs_cpu)?,
        Row {
            what: "warm / mkfs alone".into(),
            value: Value::Ratio(ratio(banger_warm.median, alone.median)),
            target: Some(Target::RatioAtMost(WARM_OVER_MKFS_TARGET)),
        },
    ];
    if !s.untreed.is_empty() {
        let untreed = summary(&totals(&s.untreed))?;
        rows.push(timing(
            "banger pull, warm without the cached tree",
            &totals(&s.untreed),
        )?);
        rows.push(timing(
            "  CPU time (bangerd and its children)",
            &cpu(&s.untreed),
        )?);
        rows.push(Row {
            what: "warm without the cached tree / mkfs alone".into(),
            value: Value::Ratio(ratio(untreed.median, alone.median)),
            target: None,
        });
    }
    for (label, pulls) in [
        ("cold", &s.cold),
        ("warm", &s.warm),
        ("warm without tree", &s.untreed),
    ] {
        for (stage, samples) in stage_samples(pulls) {
            rows.push(timing(&format!("  banger {label}: {stage}"), &samples)?);
        }
    }
    Ok(rows)
}

/// Each stage's time in every pull, stages in the order they first appear.
fn stage_samples(pulls: &[Pulled]) -> Vec<(String, Vec<Duration>)> {
    let mut names: Vec<&str> = Vec::new();
    for pull in pulls {
        for (name, _) in &pull.stages {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    names
        .into_iter()
        .map(|name| {
            let samples = pulls
                .iter()
                .map(|p| {
                    p.stages
                        .iter()
                        .filter(|(n, _)| n == name)
                        .map(|(_, d)| *d)
                        .sum()
                })
                .collect();
            (name.to_string(), samples)
        })
        .collect()
}

pub fn render(report: &Report) -> String {
    let s = &report.stats;
    let mib = |b: u64| b as f64 / MIB as f64;
    format!(
        "banger-bench pull: {} runs each; binaries from {}\n\
         image {} (seed {}): {} gzip layers, {:.1} MiB of tar ({:.1} MiB of file data), \
         {:.1} MiB compressed;\n  {} files, {} directories, {} symlinks, {} hardlinks, \
         {} whiteouts, {} files overwritten; generated in {}\n\
         rootfs size {:.0} MiB (banger's default, used for mkfs.ext4 too)\n\
         bangerd {}: a fresh daemon for each cold pull, warm pulls on the last one\n\
         peers: {}\n\
         load average (1, 5, 15 min): {} before the timed runs, {} after\n{}\n{}\nlast bangerd {}\n",
        report.runs,
        report.bin_dir.display(),
        report.reference,
        report.seed,
        image::LAYERS,
        mib(s.tar_bytes),
        mib(s.file_bytes),
        mib(s.gzip_bytes),
        s.files,
        s.dirs,
        s.symlinks,
        s.hardlinks,
        s.whiteouts,
        s.overwrites,
        fmt_duration(report.generated_in),
        mib(report.rootfs_bytes),
        report.daemon_version,
        report.tools.join("; "),
        report.load[0],
        report.load[1],
        report
            .warning
            .map(|w| format!("warning: {w}\n"))
            .unwrap_or_default(),
        table::render(&report.rows, Columns::WithoutP99),
        report.stopped,
    )
}

/// Waits (up to 60 s) until the daemon whose state is `state` has
/// finished the work a pull or delete leaves running after its reply: the
/// staging tree removed in the background (`.trash` in the tree cache),
/// a deleted image's directory. So no timed run shares the machine with
/// the previous one's cleanup (the `sync` that follows waits for the tree
/// cache's own `syncfs` of a new entry).
async fn settle(state: &Path, images: usize) {
    let busy = |state: &Path| {
        let count = |dir: PathBuf, pred: &dyn Fn(&str) -> bool| {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| pred(&e.file_name().to_string_lossy()))
                .count()
        };
        count(state.join("layers/trees"), &|n| {
            n.ends_with(".trash") || n.ends_with(".tmp")
        }) > 0
            || count(state.join("images"), &|_| true) > images
    };
    let started = Instant::now();
    while busy(state) && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Flushes dirty pages so the next timed run does not pay for them.
async fn sync() {
    let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
}

/// Removes a file or a directory tree, if it exists.
async fn remove(path: &Path) -> anyhow::Result<()> {
    let result = match tokio::fs::symlink_metadata(path).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => tokio::fs::remove_dir_all(path).await,
        Ok(_) => tokio::fs::remove_file(path).await,
    };
    result.with_context(|| format!("cannot remove {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_protocol::{ImageInfo, ImageRuntimeConfig};

    fn pulled(total_ms: u64, stages: &[(&str, u64)]) -> Pulled {
        Pulled {
            total: Duration::from_millis(total_ms),
            cpu: Duration::from_millis(total_ms / 2),
            stages: stages
                .iter()
                .map(|&(s, ms)| (s.to_string(), Duration::from_millis(ms)))
                .collect(),
            image: ImageInfo {
                id: "x".into(),
                name: "x".into(),
                managed: true,
                source: String::new(),
                rootfs_path: String::new(),
                rootfs_bytes: 1 << 30,
                work_seed_path: None,
                kernel: None,
                created_unix_ms: 0,
                layers: Vec::new(),
                platform: None,
                has_init: false,
                has_sshd: false,
                runtime: ImageRuntimeConfig::default(),
                has_systemd: false,
                has_agent: false,
            },
            details: String::new(),
        }
    }

    #[test]
    fn rows_compare_medians_against_the_targets() {
        let ms = Duration::from_millis;
        let cold = [
            pulled(1000, &[("download", 400)]),
            pulled(1200, &[("download", 500), ("build", 10)]),
        ];
        let warm = [
            pulled(500, &[("build", 400)]),
            pulled(700, &[("build", 600)]),
        ];
        let peer = |total: u64| Steps {
            skopeo: ms(total / 4),
            umoci: ms(total / 4),
            mkfs: ms(total / 2),
        };
        let ms2 = [ms(500), ms(500)];
        let samples = Samples {
            cold: cold.into(),
            peer: vec![peer(1600), peer(1700)],
            peer_cpu: ms2.into(),
            warm: warm.into(),
            mkfs_alone: ms2.into(),
            mkfs_cpu: ms2.into(),
            untreed: vec![pulled(900, &[("extract", 300)])],
        };
        let rows = rows(&samples).expect("rows");
        let find = |what: &str| {
            rows.iter()
                .find(|r| r.what.starts_with(what))
                .unwrap_or_else(|| panic!("no row {what}"))
        };
        // 1650 / 1100 = 1.5: exactly on target.
        assert_eq!(find("cold speedup").value, Value::Ratio(1.5));
        assert_eq!(find("cold speedup").result(), "PASS");
        // 600 / 500 = 1.2.
        assert_eq!(find("warm / mkfs").result(), "PASS");
        // A stage missing from one pull counts as zero there.
        match &find("  banger cold: build").value {
            Value::Timing(s) => assert_eq!((s.min, s.max), (ms(0), ms(10))),
            other => panic!("{other:?}"),
        }
        assert!(rows.iter().any(|r| r.what == "  banger warm: build"));
        assert!(rows
            .iter()
            .any(|r| r.what == "  banger warm without tree: extract"));
        // 900 / 500, for comparison only.
        let untreed = find("warm without the cached tree /");
        assert_eq!(untreed.value, Value::Ratio(1.8));
        assert!(untreed.target.is_none());
    }
}
