//! A VM create as the client saw it, split into its stages.
//!
//! The daemon streams a progress event at the end of each step of a
//! create (`resolve`, `reserve`, `disks`, `network`, `launch`, `boot`,
//! `ssh`, `dns`; see `actors/src/router/vms.rs` and
//! `actors/src/vms/boot.rs`). A finished step's detail ends in
//! `(N ms)`, its own duration, and every event carries `elapsed_ms`, the
//! time since the daemon received the request. A stage may end in several
//! events (`disks`: root, work and modules disk; `ssh`: listening, host
//! keys); its time is the sum of their `(N ms)`. Events without a
//! duration (`boot: waiting for the guest agent`) only mark a start.
//!
//! The control plane is the daemon's own work up to a running VMM: the
//! `elapsed_ms` of the `launch` event (request received, VMM launched).
//! Seen from the client it is the time from sending the request to
//! reading that event.

use std::time::Duration;

/// The stages of a create, in the order the daemon runs them. Stages not
/// listed here are shown after these, in the order they first appeared.
pub const ORDER: [&str; 8] = [
    "resolve", "reserve", "disks", "network", "launch", "boot", "ssh", "dns",
];

/// The stage whose end is the end of the control plane.
pub const LAUNCH: &str = "launch";

/// One progress event and when the client read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub stage: String,
    pub detail: String,
    /// Daemon side: since the daemon received the request.
    pub elapsed_ms: u64,
    /// Client side: since just before the request was sent.
    pub received: Duration,
}

/// One finished create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Create {
    pub events: Vec<Event>,
    /// From just before the request was sent to reading the final reply.
    pub total: Duration,
}

/// The control plane of one create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlPlane {
    /// Request received → VMM launched, by the daemon's clock.
    pub daemon: Duration,
    /// Request sent → `launch` event read, by the client's clock.
    pub client: Duration,
    /// The part of `daemon` that no stage accounts for (queues, actor
    /// hops, the time between one stage's end and the next one's start).
    pub outside_stages: Duration,
    /// The VMM's own start-up inside the launch stage (spawn → QMP or
    /// API answering), from the launch event's `VMM start-up N ms`.
    pub vmm_start_up: Option<Duration>,
}

impl ControlPlane {
    /// Banger's part: `daemon` without the VMM's own start-up.
    pub fn banger(&self) -> Duration {
        self.daemon
            .saturating_sub(self.vmm_start_up.unwrap_or_default())
    }
}

/// `VMM start-up N ms` in a launch event's detail.
pub fn vmm_start_up_ms(detail: &str) -> Option<u64> {
    let rest = &detail[detail.find("VMM start-up ")? + "VMM start-up ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() || !rest[digits.len()..].starts_with(" ms") {
        return None;
    }
    digits.parse().ok()
}

/// The duration at the end of a finished step's detail: `... (12 ms)`.
pub fn stage_ms(detail: &str) -> Option<u64> {
    let rest = detail.trim_end().strip_suffix(" ms)")?;
    let open = rest.rfind('(')?;
    let number = &rest[open + 1..];
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.parse().ok()
}

impl Create {
    /// Each stage's own time (the sum of its events' `(N ms)`), stages in
    /// [`ORDER`], then any others in the order they appeared.
    pub fn stages(&self) -> Vec<(String, Duration)> {
        let mut out: Vec<(String, Duration)> = Vec::new();
        for event in &self.events {
            let Some(ms) = stage_ms(&event.detail) else {
                continue;
            };
            match out.iter_mut().find(|(name, _)| *name == event.stage) {
                Some((_, total)) => *total += Duration::from_millis(ms),
                None => out.push((event.stage.clone(), Duration::from_millis(ms))),
            }
        }
        out.sort_by_key(|(name, _)| rank(name));
        out
    }

    /// The control plane, if the VMM was launched.
    pub fn control_plane(&self) -> Option<ControlPlane> {
        let at = self
            .events
            .iter()
            .position(|e| e.stage == LAUNCH && stage_ms(&e.detail).is_some())?;
        let launch = &self.events[at];
        let in_stages: u64 = self.events[..=at]
            .iter()
            .filter_map(|e| stage_ms(&e.detail))
            .sum();
        Some(ControlPlane {
            daemon: Duration::from_millis(launch.elapsed_ms),
            client: launch.received,
            outside_stages: Duration::from_millis(launch.elapsed_ms.saturating_sub(in_stages)),
            vmm_start_up: vmm_start_up_ms(&launch.detail).map(Duration::from_millis),
        })
    }

    /// The events up to the VMM launch, for `--timeline`:
    /// `stage@elapsed_ms(own ms)`, the launch with its VMM start-up.
    pub fn timeline(&self) -> String {
        let mut out = Vec::new();
        for e in &self.events {
            let vmm = vmm_start_up_ms(&e.detail)
                .map(|ms| format!(", VMM start-up {ms}"))
                .unwrap_or_default();
            let own = stage_ms(&e.detail)
                .map(|ms| format!("({ms}{vmm})"))
                .unwrap_or_default();
            out.push(format!("{}@{}{own}", e.stage, e.elapsed_ms));
            if e.stage == LAUNCH && !own.is_empty() {
                break;
            }
        }
        out.join(" ")
    }

    /// Events of `stage` whose detail contains `text`.
    pub fn count(&self, stage: &str, text: &str) -> usize {
        self.events
            .iter()
            .filter(|e| e.stage == stage && e.detail.contains(text))
            .count()
    }

    /// The last event, for error messages.
    pub fn last(&self) -> String {
        self.events
            .last()
            .map(|e| format!("{}: {}", e.stage, e.detail))
            .unwrap_or_else(|| "none".into())
    }
}

/// Where `stage` sorts: its place in [`ORDER`], unknown stages after.
fn rank(stage: &str) -> usize {
    ORDER
        .iter()
        .position(|s| *s == stage)
        .unwrap_or(ORDER.len())
}

/// Each stage's time in every create (0 where a create did not have the
/// stage), stages in the order of [`Create::stages`].
pub fn stage_samples(creates: &[Create]) -> Vec<(String, Vec<Duration>)> {
    let per_create: Vec<Vec<(String, Duration)>> = creates.iter().map(Create::stages).collect();
    let mut names: Vec<String> = Vec::new();
    for stages in &per_create {
        for (name, _) in stages {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    // Stable: unknown stages keep the order they first appeared in.
    names.sort_by_key(|n| rank(n));
    names
        .into_iter()
        .map(|name| {
            let samples = per_create
                .iter()
                .map(|stages| {
                    stages
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map_or(Duration::ZERO, |(_, d)| *d)
                })
                .collect();
            (name, samples)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(stage: &str, detail: &str, elapsed_ms: u64, received_ms: u64) -> Event {
        Event {
            stage: stage.into(),
            detail: detail.into(),
            elapsed_ms,
            received: Duration::from_millis(received_ms),
        }
    }

    #[test]
    fn the_timeline_ends_at_the_launch() {
        assert_eq!(
            create().timeline(),
            "resolve@1(1) reserve@2(0) disks@24(21) disks@55(30) network@57(1) \
             launch@140(80, VMM start-up 70)"
        );
    }

    /// A create as the daemon reports one (details as in `boot.rs`).
    fn create() -> Create {
        Create {
            events: vec![
                event("resolve", "image busy, kernel host, qemu (1 ms)", 1, 2),
                event("reserve", "name bb and its address reserved (0 ms)", 2, 3),
                event(
                    "disks",
                    "root disk: copy-on-write overlay of the image (21 ms)",
                    24,
                    25,
                ),
                event(
                    "disks",
                    "work disk: sparse copy of the seed, grown to 4096 MiB (30 ms)",
                    55,
                    56,
                ),
                event("network", "TAP bgtap3 (from the warm pool) (1 ms)", 57, 58),
                event(
                    "launch",
                    "qemu started, pid 4242, tcg: [vm] accel = \"tcg\" in the config; VMM start-up 70 ms (80 ms)",
                    140,
                    143,
                ),
                event("boot", "waiting for the guest agent", 140, 143),
                event("boot", "guest agent is up (9000 ms)", 9140, 9141),
                event("dns", "bb.vm -> 172.30.0.2 (0 ms)", 9141, 9142),
            ],
            total: Duration::from_millis(9150),
        }
    }

    #[test]
    fn durations_are_read_from_the_end_of_the_detail() {
        assert_eq!(stage_ms("guest agent is up (9000 ms)"), Some(9000));
        assert_eq!(stage_ms("TAP bgtap3 (from the warm pool) (1 ms)"), Some(1));
        assert_eq!(stage_ms("done (0 ms)  "), Some(0));
        assert_eq!(stage_ms("(7 ms)"), Some(7));
        // No duration, or not a number.
        assert_eq!(stage_ms("waiting for the guest agent"), None);
        assert_eq!(stage_ms("TAP bgtap3 (from the warm pool)"), None);
        assert_eq!(stage_ms("odd ( ms)"), None);
        assert_eq!(stage_ms("odd (-3 ms)"), None);
        assert_eq!(stage_ms("odd (1.5 ms)"), None);
        assert_eq!(stage_ms("odd (12 s)"), None);
        assert_eq!(stage_ms("(12 ms) is not at the end"), None);
        assert_eq!(stage_ms(""), None);
    }

    #[test]
    fn stages_sum_their_events_in_daemon_order() {
        let stages = create().stages();
        let names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["resolve", "reserve", "disks", "network", "launch", "boot", "dns"]
        );
        let of = |name: &str| {
            stages
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, d)| d.as_millis())
        };
        assert_eq!(of("disks"), Some(51), "root + work disk");
        assert_eq!(of("boot"), Some(9000), "the waiting marker adds nothing");
        assert_eq!(of("launch"), Some(80));
    }

    #[test]
    fn control_plane_is_the_launch_event() {
        let cp = create().control_plane().expect("launched");
        assert_eq!(cp.daemon, Duration::from_millis(140));
        assert_eq!(cp.client, Duration::from_millis(143));
        // 140 ms in all, 1 + 0 + 21 + 30 + 1 + 80 = 133 ms in stages.
        assert_eq!(cp.outside_stages, Duration::from_millis(7));
        // 70 ms of the launch were QEMU starting up.
        assert_eq!(cp.vmm_start_up, Some(Duration::from_millis(70)));
        assert_eq!(cp.banger(), Duration::from_millis(70));

        let mut failed = create();
        failed.events.truncate(5);
        assert_eq!(failed.control_plane(), None);
    }

    #[test]
    fn vmm_start_up_is_read_from_the_launch_detail() {
        assert_eq!(
            vmm_start_up_ms("qemu started, pid 1, tcg: x; VMM start-up 123 ms (130 ms)"),
            Some(123)
        );
        assert_eq!(vmm_start_up_ms("qemu started, pid 1 (130 ms)"), None);
        assert_eq!(vmm_start_up_ms("VMM start-up ms (1 ms)"), None);
        assert_eq!(vmm_start_up_ms("VMM start-up 12 s"), None);
        let mut old = create();
        old.events[5].detail = "qemu started, pid 4242 (80 ms)".into();
        let cp = old.control_plane().expect("launched");
        assert_eq!(cp.vmm_start_up, None);
        assert_eq!(
            cp.banger(),
            cp.daemon,
            "without the figure, all of it counts"
        );
    }

    #[test]
    fn counts_and_last_event() {
        let c = create();
        assert_eq!(c.count("network", "from the warm pool"), 1);
        assert_eq!(c.count("network", "created on demand"), 0);
        assert_eq!(c.count("disks", "disk"), 2);
        assert_eq!(c.last(), "dns: bb.vm -> 172.30.0.2 (0 ms)");
        let empty = Create {
            events: vec![],
            total: Duration::ZERO,
        };
        assert_eq!(empty.last(), "none");
        assert!(empty.stages().is_empty());
    }

    #[test]
    fn samples_line_up_across_creates() {
        let a = create();
        let mut b = create();
        // b had no work disk and an extra stage the benchmark does not know.
        b.events.remove(3);
        b.events
            .push(event("cleanup", "something (5 ms)", 9200, 9201));
        b.events.insert(0, event("extra", "first (2 ms)", 2, 2));
        let samples = stage_samples(&[a, b]);
        let names: Vec<&str> = samples.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "resolve", "reserve", "disks", "network", "launch", "boot", "dns", "extra",
                "cleanup"
            ]
        );
        let ms = |v: &[Duration]| v.iter().map(|d| d.as_millis()).collect::<Vec<_>>();
        assert_eq!(ms(&samples[2].1), [51, 21]);
        assert_eq!(ms(&samples[7].1), [0, 2], "a missing stage counts as 0");
        assert_eq!(ms(&samples[8].1), [0, 5]);
    }
}
