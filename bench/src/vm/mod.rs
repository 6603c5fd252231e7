//! The `vm` benchmark: VM creates through a real daemon, stage by stage,
//! and `vm run` to SSH-ready against a bare QEMU. The successor of the
//! original Go tool's create benchmark (`make bench-create`).
//!
//! - Creates (see [`creates`]): a busybox image in a daemon with a warm TAP
//!   pool, `--runs` rounds of 1 create and `--parallel` creates at once.
//!   Each stage's time comes from the daemon's progress events (see
//!   [`stages`]); the control plane is request received → VMM launched.
//!   Targets: control plane median <= 20 ms for 1 create, and the
//!   parallel creates' control plane median <= 2x that of 1 create.
//! - SSH-ready (see [`ssh`], unless `--skip-ssh`): the golden
//!   `debian-bookworm` image, `VmCreate` → sshd banner against a QEMU
//!   command written by hand ([`bare`]) booting the same kernel and
//!   rootfs → sshd banner ([`probe`]). Target: overhead <= 5 %.
//!
//! Daemons run in network namespaces of their own (root is needed);
//! nothing is created in the host's namespace. Daemons, VMs, namespaces
//! and temporary directories are removed at the end, on error and on
//! Ctrl-C (their `Drop`s).

mod bare;
mod creates;
mod probe;
mod ssh;
mod stages;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail};

use crate::args::{Accel, VmArgs};
use crate::stats::Summary;
use crate::table::{self, fmt_duration, Columns, Row, Target, Value};
use crate::{load_average, note};

use self::ssh::SshRuns;
use self::stages::{stage_samples, Create};

/// Control plane target for one create with a warm pool.
const CONTROL_PLANE_TARGET: Duration = Duration::from_millis(20);
/// Parallel creates: control plane median at most this times that of one.
const PARALLEL_RATIO_TARGET: f64 = 2.0;
/// `vm run` to SSH-ready: at most this many percent slower than bare QEMU.
const SSH_OVERHEAD_TARGET: f64 = 5.0;
/// The warm TAP pool is at least this large.
const MIN_POOL: u32 = 8;
/// How long a daemon gets to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(5);

/// Everything that was measured.
#[derive(Debug)]
pub struct Report {
    bin_dir: PathBuf,
    args: VmArgs,
    pool: u32,
    /// VMM and accelerator of the creates, with the daemon's reason.
    vmm: String,
    create_rows: Vec<Row>,
    pool_misses: usize,
    creates: usize,
    ssh: Option<SshRuns>,
    ssh_rows: Vec<Row>,
    /// `/proc/loadavg` before and after.
    load: [String; 2],
    /// Every verdict, for `--fail-on-miss`.
    pub rows: Vec<Row>,
}

/// What [`measure`] hands back.
#[derive(Debug)]
struct Measured {
    pool: u32,
    rounds: creates::Rounds,
    ssh: Option<anyhow::Result<SshRuns>>,
    load: [String; 2],
}

pub fn run(args: &VmArgs) -> anyhow::Result<Report> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the vm benchmark runs its daemons in network namespaces: run it as root");
    }
    let (bin_dir, m) = crate::run_bench(args.common.bin_dir.as_deref(), |_| measure(args.clone()))?;
    let create_rows = create_rows(&m.rounds, args.parallel)?;
    let (ssh, ssh_error) = match m.ssh {
        None => (None, None),
        Some(Ok(s)) => (Some(s), None),
        Some(Err(e)) => (None, Some(e)),
    };
    let ssh_rows = match &ssh {
        Some(s) => ssh_rows(s)?,
        None => Vec::new(),
    };
    let vmm = m
        .rounds
        .warmup
        .as_ref()
        .map(|i| {
            format!(
                "{} with {} ({})",
                i.vmm,
                i.accel.as_deref().unwrap_or("-"),
                i.accel_reason.as_deref().unwrap_or("-")
            )
        })
        .unwrap_or_default();
    let creates = m.rounds.single.len() + m.rounds.parallel.iter().map(Vec::len).sum::<usize>();
    let report = Report {
        bin_dir,
        args: args.clone(),
        pool: m.pool,
        vmm,
        rows: create_rows.iter().chain(&ssh_rows).cloned().collect(),
        create_rows,
        pool_misses: m.rounds.pool_misses,
        creates,
        ssh,
        ssh_rows,
        load: m.load,
    };
    if let Some(e) = ssh_error {
        // The create half ran: show it, then fail.
        print!("{}", render(&report));
        return Err(e.context("the SSH-ready comparison failed"));
    }
    Ok(report)
}

async fn measure(args: VmArgs) -> anyhow::Result<Measured> {
    let load_before = load_average();
    let pool = args.parallel.max(MIN_POOL);
    note(format!(
        "create benchmark: bangerd in a network namespace, warm TAP pool of {pool}, \
         busybox image from a local registry"
    ));
    let mut setup = creates::setup(args.accel.as_str(), pool).await?;
    let rounds = creates::measure(&setup, args.runs, args.parallel, args.timeline).await;
    creates::stop(&mut setup.daemon);
    // Removes the namespace, the daemon's directories and the registry.
    drop(setup);
    let rounds = rounds?;
    let ssh = if args.skip_ssh {
        None
    } else {
        // `auto` was settled by the first daemon's probe; the second one
        // gets the answer rather than probing again during a timed run.
        let accel = match args.accel {
            Accel::Auto => rounds
                .warmup
                .as_ref()
                .and_then(|i| i.accel.clone())
                .unwrap_or_else(|| "tcg".into()),
            other => other.as_str().to_string(),
        };
        note(format!(
            "SSH-ready comparison: {} pairs of vm run and bare QEMU, accel {accel}",
            args.image_runs
        ));
        Some(ssh::measure(args.image_runs, &accel).await)
    };
    Ok(Measured {
        pool,
        rounds,
        ssh,
        load: [load_before, load_average()],
    })
}

fn summary(samples: &[Duration]) -> anyhow::Result<Summary> {
    Summary::of(samples).ok_or_else(|| anyhow!("no samples were taken"))
}

fn timing(what: String, samples: &[Duration], target: Option<Target>) -> anyhow::Result<Row> {
    Ok(Row {
        what,
        value: Value::Timing(summary(samples)?),
        target,
    })
}

/// The control plane rows and the stage rows of one set of creates.
fn create_group(
    label: &str,
    creates: &[Create],
    target: Option<Target>,
) -> anyhow::Result<(Vec<Row>, Vec<Row>)> {
    let cps: Vec<_> = creates
        .iter()
        .map(|c| {
            c.control_plane()
                .ok_or_else(|| anyhow!("a create had no launch event: {}", c.last()))
        })
        .collect::<anyhow::Result<_>>()?;
    let banger: Vec<Duration> = cps.iter().map(|c| c.banger()).collect();
    let daemon: Vec<Duration> = cps.iter().map(|c| c.daemon).collect();
    let start_up: Vec<Duration> = cps.iter().filter_map(|c| c.vmm_start_up).collect();
    let client: Vec<Duration> = cps.iter().map(|c| c.client).collect();
    let outside: Vec<Duration> = cps.iter().map(|c| c.outside_stages).collect();
    let total: Vec<Duration> = creates.iter().map(|c| c.total).collect();
    let mut rows = vec![
        timing(
            format!("{label}: control plane, banger (request -> VMM launched, minus VMM start-up)"),
            &banger,
            target,
        )?,
        timing(
            format!("{label}: control plane, daemon (request -> VMM launched)"),
            &daemon,
            None,
        )?,
        timing(
            format!("{label}: control plane, client (send -> launch event)"),
            &client,
            None,
        )?,
        timing(
            format!("{label}: control plane outside the stages"),
            &outside,
            None,
        )?,
        timing(
            format!("{label}: create, client (send -> reply)"),
            &total,
            None,
        )?,
    ];
    if !start_up.is_empty() {
        rows.insert(
            2,
            timing(
                format!("{label}: VMM start-up (spawn -> QMP answering)"),
                &start_up,
                None,
            )?,
        );
    }
    let mut stages = Vec::new();
    for (stage, samples) in stage_samples(creates) {
        stages.push(timing(format!("  {label}: {stage}"), &samples, None)?);
    }
    Ok((rows, stages))
}

fn create_rows(rounds: &creates::Rounds, parallel: u32) -> anyhow::Result<Vec<Row>> {
    let (mut rows, single_stages) = create_group(
        "1 create",
        &rounds.single,
        Some(Target::MedianAtMost(CONTROL_PLANE_TARGET)),
    )?;
    let all: Vec<Create> = rounds.parallel.iter().flatten().cloned().collect();
    let label = format!("{parallel} parallel");
    let (mut group, parallel_stages) = create_group(&label, &all, None)?;
    // Wall time until the round's last VMM ran.
    let last: Vec<Duration> = rounds
        .parallel
        .iter()
        .map(|round| {
            round
                .iter()
                .filter_map(|c| c.control_plane().map(|cp| cp.client))
                .max()
                .unwrap_or_default()
        })
        .collect();
    group.insert(
        2,
        timing(
            format!("{label}: last VMM of a round launched, client"),
            &last,
            None,
        )?,
    );
    let one = median_control_plane(&rounds.single)?;
    let many = median_control_plane(&all)?;
    let ratio = Row {
        what: format!("{label} / 1 create, control plane medians (banger)"),
        value: Value::Ratio(many.as_secs_f64() / one.as_secs_f64().max(1e-6)),
        target: Some(Target::RatioAtMost(PARALLEL_RATIO_TARGET)),
    };
    // The verdicts first, then the details of each group.
    let mut out = vec![rows.remove(0), group.remove(0), ratio];
    out.extend(rows);
    out.extend(group);
    out.extend(single_stages);
    out.extend(parallel_stages);
    Ok(out)
}

fn median_control_plane(creates: &[Create]) -> anyhow::Result<Duration> {
    let daemon: Vec<Duration> = creates
        .iter()
        .filter_map(|c| c.control_plane().map(|cp| cp.banger()))
        .collect();
    Ok(summary(&daemon)?.median)
}

fn ssh_rows(s: &SshRuns) -> anyhow::Result<Vec<Row>> {
    let banger = summary(&s.banger_banner)?;
    let bare = summary(&s.bare_banner)?;
    let overhead =
        (banger.median.as_secs_f64() / bare.median.as_secs_f64().max(1e-6) - 1.0) * 100.0;
    let reply: Vec<Duration> = s.banger_creates.iter().map(|c| c.total).collect();
    let mut rows = vec![
        timing(
            format!("vm run ({}): request -> sshd banner", ssh::IMAGE),
            &s.banger_banner,
            None,
        )?,
        timing(
            "bare QEMU: spawn -> sshd banner".into(),
            &s.bare_banner,
            None,
        )?,
        Row {
            what: "vm run overhead over bare QEMU (medians)".into(),
            value: Value::Percent(overhead),
            target: Some(Target::PercentAtMost(SSH_OVERHEAD_TARGET)),
        },
        timing("vm run: request -> create reply".into(), &reply, None)?,
        timing(
            "  vm run: QEMU CPU time at the banner".into(),
            &s.banger_qemu_cpu,
            None,
        )?,
        timing(
            "  bare QEMU: QEMU CPU time at the banner".into(),
            &s.bare_qemu_cpu,
            None,
        )?,
        timing(
            "  vm run: bangerd CPU time, request -> banner".into(),
            &s.daemon_cpu,
            None,
        )?,
    ];
    for (stage, samples) in stage_samples(&s.banger_creates) {
        rows.push(timing(format!("  vm run: {stage}"), &samples, None)?);
    }
    Ok(rows)
}

pub fn render(report: &Report) -> String {
    let a = &report.args;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "banger-bench vm: binaries from {}\n\
         load average (1, 5, 15 min): {} before, {} after\n\n\
         VM create: busybox image (the agent is init), the host's kernel, 1 vCPU, 384 MiB; {}\n\
         bangerd in its own network namespace, warm TAP pool of {}; {} round(s) of 1 create \
         and {} parallel creates (+1 untimed first create), VMs deleted between rounds\n\
         stage times from the daemon's progress events (\"(N ms)\"); control plane = request \
         received -> VMM launched (elapsed_ms of the launch event)\n",
        report.bin_dir.display(),
        report.load[0],
        report.load[1],
        report.vmm,
        report.pool,
        a.runs,
        a.parallel,
    );
    out.push_str(&table::render(&report.create_rows, Columns::WithP90));
    if report.pool_misses > 0 {
        let _ = writeln!(
            out,
            "note: {} of {} creates did not get a TAP from the warm pool",
            report.pool_misses, report.creates
        );
    }
    match &report.ssh {
        None if a.skip_ssh => out.push_str("\nSSH-ready comparison skipped (--skip-ssh)\n"),
        None => out.push_str("\nSSH-ready comparison: failed (see below)\n"),
        Some(s) => {
            let r = &s.reference;
            let _ = writeln!(
                out,
                "\nSSH-ready: golden image {} (built in {}), {} pair(s) alternating which goes \
                 first, guest address {}; SSH-ready = sshd's banner read on port 22 from the \
                 daemon's namespace\n\
                 banger: VmCreate (as `banger vm run`), {} vCPUs, {}, {}\n\
                 bare QEMU, by hand (same kernel, initrd, command line and CPU settings; a qcow2 \
                 overlay of the image's rootfs made before the clock starts; a TAP from the \
                 daemon):\n  {}\n",
                ssh::IMAGE,
                fmt_duration(s.build_time),
                a.image_runs,
                s.ip,
                r.smp,
                r.memory,
                r.accel,
                s.bare_command,
            );
            out.push_str(&table::render(&report.ssh_rows, Columns::WithoutP99));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::stages::Event;
    use super::*;

    fn create(cp_ms: u64, client_ms: u64, total_ms: u64) -> Create {
        let event = |stage: &str, detail: String, elapsed_ms: u64| Event {
            stage: stage.into(),
            detail,
            elapsed_ms,
            received: Duration::from_millis(if stage == "launch" {
                client_ms
            } else {
                elapsed_ms
            }),
        };
        Create {
            events: vec![
                event("resolve", "r (1 ms)".into(), 1),
                event("disks", "d (5 ms)".into(), 6),
                event(
                    "launch",
                    format!("l; VMM start-up 4 ms ({} ms)", cp_ms - 7),
                    cp_ms,
                ),
                event("boot", "b (1000 ms)".into(), cp_ms + 1000),
            ],
            total: Duration::from_millis(total_ms),
        }
    }

    #[test]
    fn create_rows_put_the_verdicts_first() {
        let rounds = creates::Rounds {
            single: vec![create(10, 12, 1100), create(14, 15, 1200)],
            parallel: vec![
                vec![create(20, 22, 3000), create(40, 41, 3100)],
                vec![create(30, 33, 3000), create(50, 55, 3100)],
            ],
            warmup: None,
            pool_misses: 0,
        };
        let rows = create_rows(&rounds, 2).expect("rows");
        let whats: Vec<&str> = rows.iter().map(|r| r.what.as_str()).collect();
        assert!(
            whats[0].starts_with("1 create: control plane, banger"),
            "{whats:?}"
        );
        assert!(
            whats[1].starts_with("2 parallel: control plane, banger"),
            "{whats:?}"
        );
        assert!(whats[2].starts_with("2 parallel / 1 create"), "{whats:?}");
        // 1 create: 10 and 14 ms less 4 ms of VMM start-up: median 8 ms.
        match &rows[0].value {
            Value::Timing(s) => assert_eq!(s.median, Duration::from_millis(8)),
            other => panic!("{other:?}"),
        }
        assert_eq!(rows[0].result(), "PASS");
        // Parallel: 16, 26, 36, 46: median 31 ms; 31 / 8 = 3.9x.
        match rows[2].value {
            Value::Ratio(r) => assert!((r - 31.0 / 8.0).abs() < 1e-9, "{r}"),
            ref other => panic!("{other:?}"),
        }
        assert_eq!(rows[2].result(), "MISS");
        let row = |what: &str| {
            rows.iter()
                .find(|r| r.what == what)
                .unwrap_or_else(|| panic!("no row {what}: {whats:?}"))
        };
        // The whole launch as the daemon saw it, and QEMU's part of it.
        match &row("1 create: control plane, daemon (request -> VMM launched)").value {
            Value::Timing(s) => assert_eq!(s.median, Duration::from_millis(12)),
            other => panic!("{other:?}"),
        }
        match &row("1 create: VMM start-up (spawn -> QMP answering)").value {
            Value::Timing(s) => assert_eq!(s.max, Duration::from_millis(4)),
            other => panic!("{other:?}"),
        }
        // The last VMM of each round: 41 and 55 ms.
        let last = rows
            .iter()
            .find(|r| r.what.contains("last VMM"))
            .expect("a last-VMM row");
        match &last.value {
            Value::Timing(s) => assert_eq!(s.max, Duration::from_millis(55)),
            other => panic!("{other:?}"),
        }
        // Stage rows come after the verdicts, indented.
        let boot = rows
            .iter()
            .find(|r| r.what == "  1 create: boot")
            .expect("a boot row");
        assert_eq!(boot.result(), "-");
        assert!(rows.iter().any(|r| r.what == "  2 parallel: disks"));
        // Control plane outside the stages: 10 - (1 + 5 + 3) = 1 ms.
        match &row("1 create: control plane outside the stages").value {
            Value::Timing(s) => assert_eq!(s.min, Duration::from_millis(1)),
            other => panic!("{other:?}"),
        }
    }
}
