//! `banger debug actors|kill-actor|events|progress|tap`: looking inside the
//! daemon and exercising its streams, cancellation, supervision and TAP
//! pool.

use banger_protocol::{ActorInfo, Event, EventKind, Progress, Request, Response};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::args::{
    DebugCommand, EventsArgs, JsonFlag, KillActorArgs, OwnerJsonArgs, ProgressArgs, TapArgs,
    TapCommand,
};
use crate::connect::{self, StreamEnd, StreamItem};
use crate::error::{CliError, Exit};
use crate::outln;
use crate::output::{
    human_bytes, human_duration_ms, human_elapsed_ms, print_json, print_json_line, rfc3339_utc_ms,
    Table,
};

pub async fn run(command: DebugCommand) -> Result<Exit, CliError> {
    match command {
        DebugCommand::Actors(flags) => actors(flags).await,
        DebugCommand::KillActor(args) => kill_actor(args).await,
        DebugCommand::Events(args) => events(args).await,
        DebugCommand::Progress(args) => progress(args).await,
        DebugCommand::Tap(TapCommand::Acquire(args)) => tap_acquire(args).await,
        DebugCommand::Tap(TapCommand::Release(args)) => tap_release(args).await,
    }
}

#[derive(Serialize, Debug, PartialEq)]
struct ActorJson<'a> {
    name: &'a str,
    /// Absent (null) while the actor is not running.
    id: Option<&'a str>,
    status: &'static str,
    parent: Option<&'a str>,
    restarts: u32,
    uptime_ms: u64,
}

impl<'a> From<&'a ActorInfo> for ActorJson<'a> {
    fn from(a: &'a ActorInfo) -> Self {
        Self {
            name: &a.name,
            id: Some(a.id.as_str()).filter(|id| !id.is_empty()),
            status: a.status.as_str(),
            parent: a.parent.as_deref(),
            restarts: a.restart_count,
            uptime_ms: a.uptime_ms,
        }
    }
}

async fn actors(flags: JsonFlag) -> Result<Exit, CliError> {
    let paths = connect::paths()?;
    let mut client = connect::connect_or_start(&paths).await?;
    let actors = match connect::request(&mut client, Request::DebugActors).await? {
        Response::Actors(actors) => actors,
        other => return Err(connect::unexpected(Request::DebugActors.name(), &other)),
    };
    if flags.json {
        print_json(&actors.iter().map(ActorJson::from).collect::<Vec<_>>())?;
    } else {
        actors_table(&actors).print()?;
    }
    Ok(Exit::Ok)
}

fn actors_table(actors: &[ActorInfo]) -> Table {
    let mut table = Table::new(&["NAME", "ID", "STATUS", "PARENT", "RESTARTS", "UPTIME"]);
    for a in actors {
        let running = a.status == banger_protocol::ActorStatus::Running;
        table.row(vec![
            a.name.clone(),
            if a.id.is_empty() {
                "-".into()
            } else {
                a.id.clone()
            },
            a.status.as_str().into(),
            a.parent.clone().unwrap_or_else(|| "-".into()),
            a.restart_count.to_string(),
            if running {
                human_duration_ms(a.uptime_ms)
            } else {
                "-".into()
            },
        ]);
    }
    table
}

async fn kill_actor(args: KillActorArgs) -> Result<Exit, CliError> {
    let paths = connect::paths()?;
    let mut client = connect::connect_or_start(&paths).await?;
    let request = Request::DebugKillActor { name: args.name };
    match connect::request(&mut client, request).await? {
        Response::ActorKilled { name, id } => {
            outln!("killed actor {name} (id {id}); its supervisor will restart it")?;
            Ok(Exit::Ok)
        }
        other => Err(connect::unexpected("debug_kill_actor", &other)),
    }
}

async fn events(args: EventsArgs) -> Result<Exit, CliError> {
    let paths = connect::paths()?;
    let mut client = connect::connect_or_start(&paths).await?;
    let json = args.json;
    let request = Request::SubscribeEvents { since: args.since };
    let end = connect::stream(&mut client, request, |item| match item {
        StreamItem::Event(event) if json => print_json_line(&event_json(&event)),
        StreamItem::Event(event) => outln!("{}", event_line(&event)),
        // Subscriptions do not report progress; nothing to show.
        StreamItem::Progress(_) | StreamItem::Output(..) | StreamItem::Cancelling => Ok(()),
    })
    .await?;
    match end {
        StreamEnd::Reply(Response::SubscriptionEnded) => Ok(Exit::Ok),
        StreamEnd::Reply(other) => Err(connect::unexpected("subscribe_events", &other)),
        StreamEnd::Cancelled | StreamEnd::ReplyAfterCancel(_) => connect::cancelled(),
    }
}

/// An event's kind as a stable snake_case name and its details as fields.
fn event_parts(kind: &EventKind) -> (&'static str, Vec<(&'static str, Value)>) {
    match kind {
        EventKind::DaemonStarted { pid, version } => (
            "daemon_started",
            vec![("pid", json!(pid)), ("version", json!(version))],
        ),
        EventKind::DaemonStopping => ("daemon_stopping", vec![]),
        EventKind::ActorStarted { name } => ("actor_started", vec![("name", json!(name))]),
        EventKind::ActorRestarted {
            name,
            restart_count,
        } => (
            "actor_restarted",
            vec![
                ("name", json!(name)),
                ("restart_count", json!(restart_count)),
            ],
        ),
        EventKind::ActorFailed { name, reason } => (
            "actor_failed",
            vec![("name", json!(name)), ("reason", json!(reason))],
        ),
        EventKind::RestartIntensityExceeded {
            name,
            restarts,
            window_ms,
        } => (
            "restart_intensity_exceeded",
            vec![
                ("name", json!(name)),
                ("restarts", json!(restarts)),
                ("window_ms", json!(window_ms)),
            ],
        ),
    }
}

/// `seq time kind details`, e.g. `7 2024-05-01T12:04:05.007Z actor_restarted name=vm restart_count=2`.
fn event_line(event: &Event) -> String {
    let (kind, details) = event_parts(&event.kind);
    let mut line = format!("{} {} {kind}", event.seq, rfc3339_utc_ms(event.at_unix_ms));
    for (key, value) in details {
        let value = match value {
            Value::String(s) if !s.is_empty() && !s.contains(char::is_whitespace) => s,
            other => other.to_string(),
        };
        line.push_str(&format!(" {key}={value}"));
    }
    line
}

/// One line of `debug events --json`.
#[derive(Serialize, Debug)]
struct EventJson {
    seq: u64,
    at_unix_ms: u64,
    /// `at_unix_ms` as RFC 3339 UTC.
    time: String,
    kind: &'static str,
    details: Map<String, Value>,
}

fn event_json(event: &Event) -> EventJson {
    let (kind, details) = event_parts(&event.kind);
    EventJson {
        seq: event.seq,
        at_unix_ms: event.at_unix_ms,
        time: rfc3339_utc_ms(event.at_unix_ms),
        kind,
        details: details
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    }
}

/// One line of `debug progress --json`.
#[derive(Serialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ProgressLine<'a> {
    Progress {
        stage: &'a str,
        detail: &'a str,
        bytes_done: Option<u64>,
        bytes_total: Option<u64>,
        elapsed_ms: u64,
    },
    /// The final result: `done` or `cancelled`.
    Result { status: &'static str },
}

async fn progress(args: ProgressArgs) -> Result<Exit, CliError> {
    let paths = connect::paths()?;
    let mut client = connect::connect_or_start(&paths).await?;
    let json = args.json;
    let request = Request::DebugProgress {
        steps: args.steps,
        interval_ms: args.interval_ms,
    };
    let end = connect::stream(&mut client, request, |item| match item {
        StreamItem::Progress(p) if json => print_json_line(&ProgressLine::Progress {
            stage: &p.stage,
            detail: &p.detail,
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            elapsed_ms: p.elapsed_ms,
        }),
        StreamItem::Progress(p) => outln!("{}", progress_line(&p)),
        StreamItem::Event(_) | StreamItem::Output(..) | StreamItem::Cancelling => Ok(()),
    })
    .await?;
    match end {
        StreamEnd::Reply(Response::Done) | StreamEnd::ReplyAfterCancel(Response::Done) => {
            if json {
                print_json_line(&ProgressLine::Result { status: "done" })?;
            } else {
                outln!("done")?;
            }
            Ok(Exit::Ok)
        }
        StreamEnd::Reply(other) => Err(connect::unexpected("debug_progress", &other)),
        StreamEnd::Cancelled | StreamEnd::ReplyAfterCancel(_) => {
            if json {
                print_json_line(&ProgressLine::Result {
                    status: "cancelled",
                })?;
            }
            connect::cancelled()
        }
    }
}

/// `[stage] detail (elapsed)`, with byte counts when the step has them.
fn progress_line(p: &Progress) -> String {
    let bytes = match (p.bytes_done, p.bytes_total) {
        (Some(done), Some(total)) => format!(" {}/{}", human_bytes(done), human_bytes(total)),
        (Some(done), None) => format!(" {}", human_bytes(done)),
        _ => String::new(),
    };
    format!(
        "[{}] {}{bytes} ({})",
        p.stage,
        p.detail,
        human_elapsed_ms(p.elapsed_ms)
    )
}

/// The JSON shape of `debug tap acquire`.
#[derive(Serialize, Debug, PartialEq)]
struct TapJson<'a> {
    tap: &'a str,
    owner: &'a str,
    /// False when the pool was empty and the TAP was created on demand.
    from_pool: bool,
}

async fn tap_acquire(args: OwnerJsonArgs) -> Result<Exit, CliError> {
    let request = Request::TapAcquire {
        owner: args.owner.clone(),
    };
    let (tap, from_pool) = match crate::image_cmd::query(request).await? {
        Response::Tap { tap, from_pool } => (tap, from_pool),
        other => return Err(connect::unexpected("tap_acquire", &other)),
    };
    let acquired = TapJson {
        tap: &tap,
        owner: &args.owner,
        from_pool,
    };
    if args.json {
        print_json(&acquired)?;
    } else {
        outln!("{}", acquired_line(&acquired))?;
    }
    Ok(Exit::Ok)
}

fn acquired_line(t: &TapJson<'_>) -> String {
    let how = if t.from_pool {
        "from the warm pool"
    } else {
        "created on demand: the pool was empty"
    };
    format!("acquired {} for {} ({how})", t.tap, t.owner)
}

async fn tap_release(args: TapArgs) -> Result<Exit, CliError> {
    let request = Request::TapRelease {
        tap: args.tap.clone(),
    };
    match crate::image_cmd::query(request).await? {
        Response::Done => {
            outln!("released {}", args.tap)?;
            Ok(Exit::Ok)
        }
        other => Err(connect::unexpected("tap_release", &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_protocol::ActorStatus;

    fn actor(
        name: &str,
        id: &str,
        status: ActorStatus,
        parent: Option<&str>,
        uptime_ms: u64,
    ) -> ActorInfo {
        ActorInfo {
            name: name.into(),
            id: id.into(),
            status,
            parent: parent.map(Into::into),
            restart_count: if status == ActorStatus::Running { 0 } else { 2 },
            uptime_ms,
        }
    }

    #[test]
    fn actors_table_renders() {
        let actors = vec![
            actor("root", "0.0", ActorStatus::Running, None, 192_000),
            actor("store", "", ActorStatus::Restarting, Some("root"), 0),
        ];
        assert_eq!(
            actors_table(&actors).render(),
            "NAME   ID   STATUS      PARENT  RESTARTS  UPTIME\n\
             root   0.0  running     -       0         3m12s\n\
             store  -    restarting  root    2         -\n"
        );
    }

    #[test]
    fn actors_json() {
        let a = actor("store", "", ActorStatus::Restarting, Some("root"), 0);
        let v = serde_json::to_value(ActorJson::from(&a)).expect("json");
        assert_eq!(
            v,
            json!({"name":"store","id":null,"status":"restarting","parent":"root","restarts":2,"uptime_ms":0})
        );
    }

    #[test]
    fn events_as_text_and_json() {
        let event = Event {
            seq: 7,
            at_unix_ms: 1_714_565_045_007,
            kind: EventKind::ActorFailed {
                name: "vm".into(),
                reason: "panicked: boom".into(),
            },
        };
        assert_eq!(
            event_line(&event),
            r#"7 2024-05-01T12:04:05.007Z actor_failed name=vm reason="panicked: boom""#
        );
        assert_eq!(
            serde_json::to_value(event_json(&event)).expect("json"),
            json!({"seq":7,"at_unix_ms":1_714_565_045_007_u64,"time":"2024-05-01T12:04:05.007Z",
                   "kind":"actor_failed","details":{"name":"vm","reason":"panicked: boom"}})
        );
        let stopping = Event {
            seq: 8,
            at_unix_ms: 0,
            kind: EventKind::DaemonStopping,
        };
        assert_eq!(
            event_line(&stopping),
            "8 1970-01-01T00:00:00.000Z daemon_stopping"
        );
    }

    #[test]
    fn tap_lines_and_json() {
        let mut t = TapJson {
            tap: "bgtap0",
            owner: "bench-1",
            from_pool: true,
        };
        assert_eq!(
            acquired_line(&t),
            "acquired bgtap0 for bench-1 (from the warm pool)"
        );
        t.from_pool = false;
        assert_eq!(
            acquired_line(&t),
            "acquired bgtap0 for bench-1 (created on demand: the pool was empty)"
        );
        assert_eq!(
            serde_json::to_value(&t).expect("json"),
            json!({"tap": "bgtap0", "owner": "bench-1", "from_pool": false})
        );
    }

    #[test]
    fn progress_lines() {
        let mut p = Progress {
            stage: "step".into(),
            detail: "step 2 of 5".into(),
            bytes_done: None,
            bytes_total: None,
            elapsed_ms: 400,
        };
        assert_eq!(progress_line(&p), "[step] step 2 of 5 (400ms)");
        p.bytes_done = Some(1024);
        p.bytes_total = Some(4096);
        p.elapsed_ms = 1_250;
        assert_eq!(
            progress_line(&p),
            "[step] step 2 of 5 1.0 KiB/4.0 KiB (1.2s)"
        );
        let line = serde_json::to_value(ProgressLine::Result { status: "done" }).expect("json");
        assert_eq!(line, json!({"type":"result","status":"done"}));
    }
}
