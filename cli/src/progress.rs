//! Showing a long operation while the daemon works on it (image pull,
//! build, register, promote, prune; kernel import and pull), in one of
//! three forms:
//!
//! - a terminal on stderr: `indicatif` bars, one per layer while
//!   downloading, a spinner with the latest detail for every other stage,
//!   and a `✓ stage  detail  (elapsed)` line as each stage ends;
//! - no terminal: plain `[stage] detail (done/total) +elapsed` lines on
//!   stderr, byte counts limited to about one line a second per layer;
//! - `--json`: one JSON object per progress event on stdout, then the
//!   command prints a final `{"type":"result",...}` object.
//!
//! The request itself runs through [`connect::stream`], which owns Ctrl-C.

use std::collections::HashMap;
use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use banger_protocol::{Progress, Request, Response};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::json;

use crate::connect::{self, StreamEnd, StreamItem};
use crate::error::CliError;
use crate::outln;
use crate::output::{human_bytes, human_elapsed_ms, print_json_line};

/// The stage whose byte counts are bytes (in the others they count steps).
const DOWNLOAD: &str = "download";
/// At most one plain byte-count line per layer this often.
const PLAIN_BYTES_INTERVAL_MS: u64 = 1000;
/// How often a spinner turns.
const SPINNER_TICK: Duration = Duration::from_millis(100);
/// Columns of a spinner line besides its message, plus a margin: details
/// are cut to the terminal's width so that every bar stays one line.
const SPINNER_FIXED: usize = 2 + 8 + 2 + 2 + 8 + 2;
/// Columns of a download bar besides its message, plus the margin.
const BAR_FIXED: usize = 2 + 12 + 2 + 20 + 2 + 10 + 3 + 10 + 1 + 11 + 2 + 2;

/// Runs `request` on a connection to the daemon (started if need be),
/// showing its progress. `Some(reply)` when it finished; `None` when
/// Ctrl-C cancelled it (the JSON `cancelled` result is printed then, the
/// caller ends with [`connect::cancelled`]).
pub async fn run(request: Request, json: bool) -> Result<Option<Response>, CliError> {
    let paths = connect::paths()?;
    let mut client = connect::connect_or_start(&paths).await?;
    let mut view = ProgressView::new(json);
    let end = connect::stream(&mut client, request, |item| match item {
        StreamItem::Progress(p) => view.show(&p),
        StreamItem::Cancelling => {
            view.cancelling();
            Ok(())
        }
        StreamItem::Event(_) | StreamItem::Output(..) => Ok(()),
    })
    .await;
    view.finish(matches!(
        end,
        Ok(StreamEnd::Reply(_) | StreamEnd::ReplyAfterCancel(_))
    ));
    match end? {
        StreamEnd::Reply(response) => Ok(Some(response)),
        StreamEnd::ReplyAfterCancel(response) => {
            eprintln!("the operation had finished before bangerd received the cancel");
            Ok(Some(response))
        }
        StreamEnd::Cancelled => {
            if json {
                print_json_line(&json!({"type": "result", "status": "cancelled"}))?;
            }
            Ok(None)
        }
    }
}

/// Prints the final `{"type":"result","status":"done",<key>:<value>}` line.
pub fn print_result_line(key: &str, value: impl Serialize) -> Result<(), CliError> {
    let encode = |e: serde_json::Error| CliError::with_source("cannot encode JSON output", &e);
    let key = serde_json::to_string(key).map_err(encode)?;
    let value = serde_json::to_string(&value).map_err(encode)?;
    outln!("{}", result_line(&key, &value))
}

/// The result line from an encoded key and value, fields in this order.
fn result_line(key_json: &str, value_json: &str) -> String {
    format!(r#"{{"type":"result","status":"done",{key_json}:{value_json}}}"#)
}

/// One progress line of `--json`.
#[derive(Serialize, Debug, PartialEq)]
struct ProgressJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    stage: &'a str,
    detail: &'a str,
    bytes_done: Option<u64>,
    bytes_total: Option<u64>,
    elapsed_ms: u64,
}

impl<'a> From<&'a Progress> for ProgressJson<'a> {
    fn from(p: &'a Progress) -> Self {
        Self {
            kind: "progress",
            stage: &p.stage,
            detail: &p.detail,
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            elapsed_ms: p.elapsed_ms,
        }
    }
}

/// Where progress goes, chosen once per command.
#[derive(Debug)]
enum ProgressView {
    Json,
    Plain(PlainLines),
    Terminal(Box<TerminalView>),
}

impl ProgressView {
    fn new(json: bool) -> Self {
        if json {
            ProgressView::Json
        } else if std::io::stderr().is_terminal() {
            ProgressView::Terminal(Box::new(TerminalView::new()))
        } else {
            ProgressView::Plain(PlainLines::default())
        }
    }

    fn show(&mut self, p: &Progress) -> Result<(), CliError> {
        match self {
            ProgressView::Json => print_json_line(&ProgressJson::from(p)),
            ProgressView::Plain(lines) => {
                if let Some(line) = lines.line(p) {
                    // Progress is best effort: a closed stderr must not
                    // fail the operation.
                    let _ = writeln!(std::io::stderr(), "{line}");
                }
                Ok(())
            }
            ProgressView::Terminal(view) => {
                view.show(p);
                Ok(())
            }
        }
    }

    fn cancelling(&mut self) {
        if let ProgressView::Terminal(view) = self {
            view.cancelling();
        }
    }

    /// Ends the display; `ok` when the operation succeeded (the last
    /// stage then gets its `✓` line).
    fn finish(&mut self, ok: bool) {
        if let ProgressView::Terminal(view) = self {
            view.finish(ok);
        }
    }
}

/// A stage that has ended: its name, latest detail and duration.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FinishedStage {
    name: String,
    detail: String,
    elapsed_ms: u64,
}

/// Follows the stages of an operation through its progress events. Times
/// are the daemon's (`elapsed_ms` since the operation started).
#[derive(Debug, Default)]
struct Stages {
    current: Option<(String, u64, String)>,
}

impl Stages {
    /// Records `p`; returns the stage it ends when it starts a new one.
    fn feed(&mut self, p: &Progress) -> Option<FinishedStage> {
        match &mut self.current {
            Some((name, _, detail)) if *name == p.stage => {
                detail.clone_from(&p.detail);
                None
            }
            _ => {
                let ended = self.finish(p.elapsed_ms);
                self.current = Some((p.stage.clone(), p.elapsed_ms, p.detail.clone()));
                ended
            }
        }
    }

    /// Ends the current stage at `now_ms`.
    fn finish(&mut self, now_ms: u64) -> Option<FinishedStage> {
        self.current
            .take()
            .map(|(name, started_ms, detail)| FinishedStage {
                name,
                detail,
                elapsed_ms: now_ms.saturating_sub(started_ms),
            })
    }
}

/// `✓ download  2 downloaded, 1 cached, in 3.1s  (3.1s)`.
fn finished_line(stage: &FinishedStage) -> String {
    format!(
        "✓ {:<8}  {}  ({})",
        stage.name,
        stage.detail,
        human_elapsed_ms(stage.elapsed_ms)
    )
}

/// Which download an event of the `download` stage is about: the layer's
/// short digest for `layer <12hex>[ (cached)]`, else `""` (a kernel
/// download has one file).
fn download_key(detail: &str) -> &str {
    detail
        .strip_prefix("layer ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("")
}

/// The `(done/total)` of a plain line: sizes while downloading, plain
/// counts elsewhere.
fn counts(p: &Progress) -> Option<String> {
    let show = |n: u64| {
        if p.stage == DOWNLOAD {
            human_bytes(n)
        } else {
            n.to_string()
        }
    };
    match (p.bytes_done, p.bytes_total) {
        (Some(done), Some(total)) => Some(format!("{}/{}", show(done), show(total))),
        (Some(done), None) => Some(show(done)),
        (None, Some(total)) => Some(format!("?/{}", show(total))),
        (None, None) => None,
    }
}

/// `[stage] detail (done/total) +elapsed`.
fn plain_line(p: &Progress) -> String {
    let counts = counts(p).map(|c| format!(" ({c})")).unwrap_or_default();
    format!(
        "[{}] {}{counts} +{}",
        p.stage,
        p.detail,
        human_elapsed_ms(p.elapsed_ms)
    )
}

/// Plain progress lines, with byte counts of each download limited to
/// one line per [`PLAIN_BYTES_INTERVAL_MS`] (its first and last always
/// show).
#[derive(Debug, Default)]
struct PlainLines {
    /// When each download last printed, in the daemon's elapsed ms.
    last_printed: HashMap<String, u64>,
}

impl PlainLines {
    fn line(&mut self, p: &Progress) -> Option<String> {
        if let (true, Some(done)) = (p.stage == DOWNLOAD, p.bytes_done) {
            let complete = p.bytes_total.is_some_and(|total| done >= total);
            let key = download_key(&p.detail).to_string();
            let due = self
                .last_printed
                .get(&key)
                .is_none_or(|&last| p.elapsed_ms >= last + PLAIN_BYTES_INTERVAL_MS);
            if !(due || complete) {
                return None;
            }
            self.last_printed.insert(key, p.elapsed_ms);
        }
        Some(plain_line(p))
    }
}

/// `text` cut to `max` characters, ending in `…` when cut.
fn fit(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    if max > 0 {
        cut.push('…');
    }
    cut
}

/// The width of the terminal on stderr (80 when it cannot be had).
fn terminal_width() -> usize {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct it is given,
    // which lives for the duration of the call.
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if ok && size.ws_col > 0 {
        usize::from(size.ws_col)
    } else {
        80
    }
}

fn style(template: &str, fallback: ProgressStyle) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or(fallback)
}

/// Bars and spinners on a terminal (stderr).
#[derive(Debug)]
struct TerminalView {
    multi: MultiProgress,
    stages: Stages,
    /// The current stage's spinner (not during a download with bars).
    spinner: Option<ProgressBar>,
    /// One bar per download of the current `download` stage, by key.
    bars: Vec<(String, ProgressBar)>,
    /// The latest event's elapsed time and when it arrived, to time the
    /// last stage when the reply comes.
    clock: Option<(u64, Instant)>,
    /// Ctrl-C was pressed: the display is frozen.
    cancelled: bool,
}

impl TerminalView {
    fn new() -> Self {
        Self {
            multi: MultiProgress::new(),
            stages: Stages::default(),
            spinner: None,
            bars: Vec::new(),
            clock: None,
            cancelled: false,
        }
    }

    fn show(&mut self, p: &Progress) {
        self.clock = Some((p.elapsed_ms, Instant::now()));
        if let Some(ended) = self.stages.feed(p) {
            self.clear();
            let _ = self.multi.println(finished_line(&ended));
        }
        match (p.stage == DOWNLOAD, p.bytes_done, p.bytes_total) {
            (true, Some(done), Some(total)) => self.download(p, done, total),
            // A download's summary: it becomes the stage's `✓` detail.
            (true, _, _) if !self.bars.is_empty() => {}
            _ => self.spin(&p.stage, &p.detail),
        }
    }

    fn spin(&mut self, stage: &str, detail: &str) {
        let multi = &self.multi;
        let spinner = self.spinner.get_or_insert_with(|| {
            let bar = multi.add(ProgressBar::new_spinner().with_style(style(
                "{spinner:.cyan} {prefix:<8}  {msg}  {elapsed:.dim}",
                ProgressStyle::default_spinner(),
            )));
            bar.enable_steady_tick(SPINNER_TICK);
            bar
        });
        spinner.set_prefix(stage.to_string());
        spinner.set_message(fit(detail, terminal_width().saturating_sub(SPINNER_FIXED)));
    }

    fn download(&mut self, p: &Progress, done: u64, total: u64) {
        if self.spinner.is_some() && self.bars.is_empty() {
            self.clear();
        }
        let key = download_key(&p.detail);
        let bar = match self.bars.iter().find(|(k, _)| k == key) {
            Some((_, bar)) => bar.clone(),
            None => {
                let bar = self.multi.add(
                    ProgressBar::new(total)
                        .with_style(style(
                            "  {prefix:<12} [{bar:20.cyan/blue}] {bytes:>10} / {total_bytes:<10} \
                             {bytes_per_sec:>11}  {msg}",
                            ProgressStyle::default_bar(),
                        ))
                        .with_prefix(if key.is_empty() {
                            DOWNLOAD.to_string()
                        } else {
                            key.to_string()
                        }),
                );
                self.bars.push((key.to_string(), bar.clone()));
                bar
            }
        };
        bar.set_length(total);
        bar.set_position(done.min(total));
        // A complete bar stays as it is until the stage ends and clears them all.
        let room = terminal_width().saturating_sub(BAR_FIXED);
        if p.detail.ends_with("(cached)") {
            bar.set_message(fit("cached", room));
        } else if key.is_empty() {
            bar.set_message(fit(&p.detail, room));
        }
    }

    /// Ctrl-C: the terminal has most likely echoed `^C` past the last
    /// bar (indicatif leaves the cursor at the end of a full-width line,
    /// so the echo starts a new line), and the bars' idea of what is on
    /// screen is off by that line. So they stay as they were, frozen, and
    /// the rest is printed below them.
    fn cancelling(&mut self) {
        self.multi.set_draw_target(ProgressDrawTarget::hidden());
        for bar in self
            .spinner
            .take()
            .into_iter()
            .chain(self.bars.drain(..).map(|(_, bar)| bar))
        {
            bar.finish_and_clear();
        }
        self.cancelled = true;
        let _ = write!(
            std::io::stderr(),
            "\ncancelling: waiting for bangerd to stop and clean up\n"
        );
    }

    /// Takes every bar off the screen. Wiping the whole area first and
    /// removing the bars from it before they are dropped keeps indicatif
    /// from leaving a dropped bar's last line behind.
    fn clear(&mut self) {
        let bars: Vec<ProgressBar> = self
            .spinner
            .take()
            .into_iter()
            .chain(self.bars.drain(..).map(|(_, bar)| bar))
            .collect();
        if bars.is_empty() {
            return;
        }
        let _ = self.multi.clear();
        for bar in bars {
            self.multi.remove(&bar);
            bar.finish_and_clear();
        }
    }

    fn finish(&mut self, ok: bool) {
        if self.cancelled {
            return;
        }
        self.clear();
        if ok {
            let now_ms = self
                .clock
                .map(|(ms, at)| ms + at.elapsed().as_millis() as u64)
                .unwrap_or(0);
            if let Some(ended) = self.stages.finish(now_ms) {
                let _ = self.multi.println(finished_line(&ended));
            }
        }
        let _ = self.multi.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(stage: &str, detail: &str, bytes: Option<(u64, u64)>, ms: u64) -> Progress {
        Progress {
            stage: stage.into(),
            detail: detail.into(),
            bytes_done: bytes.map(|b| b.0),
            bytes_total: bytes.map(|b| b.1),
            elapsed_ms: ms,
        }
    }

    #[test]
    fn plain_lines_show_sizes_only_while_downloading() {
        let p = progress(
            "download",
            "layer 0123456789ab",
            Some((1 << 20, 4 << 20)),
            1250,
        );
        assert_eq!(
            plain_line(&p),
            "[download] layer 0123456789ab (1.0 MiB/4.0 MiB) +1.2s"
        );
        let p = progress("extract", "layer 2/3 0123456789ab", Some((1, 3)), 61_000);
        assert_eq!(
            plain_line(&p),
            "[extract] layer 2/3 0123456789ab (1/3) +1m1s"
        );
        let p = progress("publish", "image debian ready", None, 300);
        assert_eq!(plain_line(&p), "[publish] image debian ready +300ms");
    }

    #[test]
    fn plain_byte_lines_are_limited_per_layer() {
        let mut lines = PlainLines::default();
        let mut shown = |detail: &str, done: u64, ms: u64| {
            lines
                .line(&progress("download", detail, Some((done, 100)), ms))
                .is_some()
        };
        assert!(shown("layer aaaaaaaaaaaa", 0, 0), "first line of a layer");
        assert!(
            shown("layer bbbbbbbbbbbb", 0, 100),
            "another layer is separate"
        );
        assert!(!shown("layer aaaaaaaaaaaa", 10, 300));
        assert!(!shown("layer aaaaaaaaaaaa", 20, 999));
        assert!(shown("layer aaaaaaaaaaaa", 30, 1000), "a second later");
        assert!(!shown("layer aaaaaaaaaaaa", 40, 1500));
        assert!(
            shown("layer aaaaaaaaaaaa", 100, 1600),
            "completion always shows"
        );
        assert!(shown("layer cccccccccccc (cached)", 100, 1700));
        // A kernel download (one file, changing detail) is one key.
        assert!(shown("http://h/k.deb", 0, 0));
        assert!(!shown("http://h/k.deb", 50, 400));
        assert!(shown("http://h/k.deb verified", 100, 500));
        // Other stages and lines without bytes are never dropped.
        assert!(lines
            .line(&progress("download", "1 downloaded, 0 cached", None, 1601))
            .is_some());
        for i in 0..3 {
            assert!(lines
                .line(&progress("extract", "layer", Some((i, 3)), 1602))
                .is_some());
        }
    }

    #[test]
    fn long_details_are_cut() {
        assert_eq!(fit("short", 10), "short");
        assert_eq!(fit("exactly10!", 10), "exactly10!");
        assert_eq!(fit("a bit too long", 10), "a bit too…");
        assert_eq!(fit("ünïcödé wörds", 5), "ünïc…");
        assert_eq!(fit("x", 0), "");
        assert_eq!(fit("xy", 1), "…");
    }

    #[test]
    fn download_keys() {
        assert_eq!(download_key("layer 0123456789ab"), "0123456789ab");
        assert_eq!(download_key("layer 0123456789ab (cached)"), "0123456789ab");
        assert_eq!(download_key("http://h/k.deb"), "");
        assert_eq!(download_key("layer "), "");
    }

    #[test]
    fn stages_end_when_the_next_begins() {
        let mut stages = Stages::default();
        assert_eq!(
            stages.feed(&progress("resolve", "resolving x", None, 10)),
            None
        );
        assert_eq!(
            stages.feed(&progress("resolve", "sha256:ab, 2 layers", None, 800)),
            None
        );
        let ended = stages
            .feed(&progress("download", "layer a", Some((0, 9)), 810))
            .expect("resolve ended");
        assert_eq!(
            ended,
            FinishedStage {
                name: "resolve".into(),
                detail: "sha256:ab, 2 layers".into(),
                elapsed_ms: 800
            }
        );
        assert_eq!(
            finished_line(&ended),
            "✓ resolve   sha256:ab, 2 layers  (800ms)"
        );
        stages.feed(&progress(
            "download",
            "1 downloaded, 1 cached, in 2.0s",
            None,
            2810,
        ));
        let ended = stages.finish(3000).expect("download ended");
        assert_eq!(
            finished_line(&ended),
            "✓ download  1 downloaded, 1 cached, in 2.0s  (2.1s)"
        );
        assert_eq!(stages.finish(4000), None);
    }

    #[test]
    fn result_line_keeps_its_field_order() {
        let line = result_line(r#""pruned""#, r#"{"layers_removed":1}"#);
        assert_eq!(
            line,
            r#"{"type":"result","status":"done","pruned":{"layers_removed":1}}"#
        );
        let v: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(v["pruned"]["layers_removed"], 1);
    }

    #[test]
    fn json_progress_lines() {
        let p = progress("download", "layer a", Some((1, 2)), 5);
        assert_eq!(
            serde_json::to_value(ProgressJson::from(&p)).expect("json"),
            json!({"type":"progress","stage":"download","detail":"layer a",
                   "bytes_done":1,"bytes_total":2,"elapsed_ms":5})
        );
    }
}
