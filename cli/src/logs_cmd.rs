//! `banger daemon logs`: reads bangerd's JSON-lines log file directly (no
//! daemon needed), prints its tail pretty or raw, and optionally follows it
//! through growth, truncation and re-creation.

use std::fs::{File, Metadata};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use banger_protocol::paths::Paths;
use serde_json::{Map, Value};

use crate::args::LogsArgs;
use crate::error::{CliError, Exit};

/// How often a followed log is checked for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// How much is read at a time when looking backwards for the last lines.
const TAIL_CHUNK: u64 = 64 * 1024;

pub async fn run(paths: &Paths, args: &LogsArgs) -> Result<Exit, CliError> {
    let path = paths.log_file();
    let raw = args.json;
    let mut follower = match File::open(&path) {
        Ok(mut file) => {
            let (lines, offset) = read_tail(&mut file, args.lines).map_err(|e| {
                CliError::with_source(format!("cannot read {}", path.display()), &e)
            })?;
            let mut partial = Vec::new();
            let complete = split_complete(&lines, &mut partial);
            if !args.follow && !partial.is_empty() {
                // Not following: a line still being written is shown as is.
                let mut all = complete;
                all.push(String::from_utf8_lossy(&partial).into_owned());
                print_lines(&all, raw)?;
                return Ok(Exit::Ok);
            }
            print_lines(&complete, raw)?;
            if !args.follow {
                return Ok(Exit::Ok);
            }
            Follower::from_open(path, file, offset, partial)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if !args.follow {
                return Err(
                    CliError::failed(format!("no bangerd log at {}", path.display()))
                        .with_hint("bangerd writes it once it has started (`banger daemon start`)"),
                );
            }
            eprintln!("waiting for {} to appear", path.display());
            Follower::waiting(path)
        }
        Err(e) => {
            return Err(CliError::with_source(
                format!("cannot open {}", path.display()),
                &e,
            ));
        }
    };

    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let lines = follower.poll().map_err(|e| {
            CliError::with_source(format!("cannot read {}", follower.path.display()), &e)
        })?;
        print_lines(&lines, raw)?;
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
            _ = &mut ctrl_c => return Ok(Exit::Ok),
        }
    }
}

fn print_lines(lines: &[String], raw: bool) -> Result<(), CliError> {
    if lines.is_empty() {
        return Ok(());
    }
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for line in lines {
        if raw {
            writeln!(out, "{line}")
        } else {
            writeln!(out, "{}", format_line(line))
        }
        .map_err(CliError::stdout)?;
    }
    out.flush().map_err(CliError::stdout)
}

/// Reads backwards from the end of `file` until it has the last `n` lines
/// (plus any unterminated last line). Returns those bytes and the end offset.
fn read_tail(file: &mut File, n: usize) -> io::Result<(Vec<u8>, u64)> {
    let end = file.seek(SeekFrom::End(0))?;
    if n == 0 {
        return Ok((Vec::new(), end));
    }
    let mut start = end;
    let mut buf: Vec<u8> = Vec::new();
    while start > 0 && complete_newlines(&buf) < n {
        let from = start.saturating_sub(TAIL_CHUNK);
        let mut chunk = vec![0; (start - from) as usize];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
        start = from;
    }
    let keep = last_lines_start(&buf, n, start == 0);
    Ok((buf.split_off(keep), end))
}

/// Newlines in `buf`, the one ending it excluded: once there are `n`, the
/// last `n` lines are all in `buf`, whole.
fn complete_newlines(buf: &[u8]) -> usize {
    let body = buf.strip_suffix(b"\n").unwrap_or(buf);
    body.iter().filter(|&&b| b == b'\n').count()
}

/// Where the last `n` lines of `buf` begin (`n` > 0). The first line of
/// `buf` counts only if `buf` starts at the beginning of the file.
fn last_lines_start(buf: &[u8], n: usize, at_file_start: bool) -> usize {
    let body = buf.strip_suffix(b"\n").unwrap_or(buf);
    let mut seen = 0;
    for (i, &b) in body.iter().enumerate().rev() {
        if b == b'\n' {
            seen += 1;
            if seen == n {
                return i + 1;
            }
        }
    }
    if at_file_start {
        0
    } else {
        // Fewer than n newlines seen and not at the file start: cannot happen
        // after read_tail's loop; keep only whole lines to be safe.
        body.iter()
            .position(|&b| b == b'\n')
            .map_or(buf.len(), |i| i + 1)
    }
}

/// Splits `partial + bytes` into complete lines; what follows the last
/// newline stays in `partial`.
fn split_complete(bytes: &[u8], partial: &mut Vec<u8>) -> Vec<String> {
    partial.extend_from_slice(bytes);
    let Some(last_nl) = partial.iter().rposition(|&b| b == b'\n') else {
        return Vec::new();
    };
    let rest = partial.split_off(last_nl + 1);
    let done = std::mem::replace(partial, rest);
    done[..done.len() - 1]
        .split(|&b| b == b'\n')
        .map(|l| String::from_utf8_lossy(l.strip_suffix(b"\r").unwrap_or(l)).into_owned())
        .collect()
}

/// Follows a log file by path across growth, truncation and re-creation.
#[derive(Debug)]
struct Follower {
    path: PathBuf,
    /// The open file and its (device, inode), if the path has existed.
    file: Option<(File, (u64, u64))>,
    offset: u64,
    partial: Vec<u8>,
}

fn identity(meta: &Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

impl Follower {
    fn from_open(path: PathBuf, file: File, offset: u64, partial: Vec<u8>) -> Self {
        let id = file.metadata().map(|m| identity(&m)).unwrap_or_default();
        Self {
            path,
            file: Some((file, id)),
            offset,
            partial,
        }
    }

    fn waiting(path: PathBuf) -> Self {
        Self {
            path,
            file: None,
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// The complete lines written since the last poll.
    fn poll(&mut self) -> io::Result<Vec<String>> {
        let mut lines = self.drain_current()?;
        // A new file at the path (re-created or rotated): switch to it once
        // the old one is drained.
        match std::fs::metadata(&self.path) {
            Ok(meta) => {
                let id = identity(&meta);
                if self.file.as_ref().map(|(_, cur)| *cur) != Some(id) {
                    if !self.partial.is_empty() {
                        lines.push(String::from_utf8_lossy(&self.partial).into_owned());
                        self.partial.clear();
                    }
                    match File::open(&self.path) {
                        Ok(file) => {
                            self.file = Some((file, id));
                            self.offset = 0;
                            lines.extend(self.drain_current()?);
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(lines)
    }

    fn drain_current(&mut self) -> io::Result<Vec<String>> {
        let Some((file, _)) = self.file.as_mut() else {
            return Ok(Vec::new());
        };
        let len = file.metadata()?.len();
        if len < self.offset {
            // Truncated in place: start over from its beginning.
            self.offset = 0;
            self.partial.clear();
        }
        if len == self.offset {
            return Ok(Vec::new());
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        let read = Read::by_ref(file)
            .take(len - self.offset)
            .read_to_end(&mut bytes)?;
        self.offset += read as u64;
        Ok(split_complete(&bytes, &mut self.partial))
    }
}

/// One log line for people: `TIMESTAMP LEVEL target: message k=v ... in
/// span{k=v}:span{k=v}`. Lines that are not tracing JSON come back as is.
pub fn format_line(line: &str) -> String {
    let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(line) else {
        return line.to_string();
    };
    if !obj.contains_key("fields") && !obj.contains_key("level") {
        return line.to_string();
    }
    let mut out = String::new();
    if let Some(ts) = obj.get("timestamp").and_then(Value::as_str) {
        out.push_str(ts);
        out.push(' ');
    }
    let level = obj.get("level").and_then(Value::as_str).unwrap_or("-");
    out.push_str(&format!("{level:<5}"));
    if let Some(target) = obj.get("target").and_then(Value::as_str) {
        out.push(' ');
        out.push_str(target);
        out.push(':');
    }
    if let Some(Value::Object(fields)) = obj.get("fields") {
        if let Some(message) = fields.get("message") {
            out.push(' ');
            match message {
                Value::String(s) => out.push_str(s),
                other => out.push_str(&other.to_string()),
            }
        }
        for (key, value) in fields {
            if key == "message" || key.starts_with("log.") {
                continue;
            }
            out.push_str(&format!(" {key}={}", field_value(value)));
        }
    }
    let spans: Vec<&Map<String, Value>> = match (obj.get("spans"), obj.get("span")) {
        (Some(Value::Array(spans)), _) if !spans.is_empty() => {
            spans.iter().filter_map(Value::as_object).collect()
        }
        (_, Some(Value::Object(span))) => vec![span],
        _ => Vec::new(),
    };
    if !spans.is_empty() {
        let rendered: Vec<String> = spans.iter().map(|s| render_span(s)).collect();
        out.push_str(" in ");
        out.push_str(&rendered.join(":"));
    }
    out
}

fn render_span(span: &Map<String, Value>) -> String {
    let name = span.get("name").and_then(Value::as_str).unwrap_or("?");
    let fields: Vec<String> = span
        .iter()
        .filter(|(k, _)| k.as_str() != "name")
        .map(|(k, v)| format!("{k}={}", field_value(v)))
        .collect();
    if fields.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{}}}", fields.join(","))
    }
}

/// A field value: bare when unambiguous, JSON-quoted otherwise.
fn field_value(value: &Value) -> String {
    match value {
        Value::String(s) => {
            let bare = !s.is_empty()
                && !s.chars().any(|c| {
                    c.is_whitespace() || c.is_control() || matches!(c, '"' | '=' | '{' | '}' | ',')
                });
            if bare {
                s.clone()
            } else {
                Value::String(s.clone()).to_string()
            }
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::path::Path;

    #[test]
    fn formats_a_tracing_json_line() {
        let line = r#"{"timestamp":"2024-05-01T12:00:00.123456Z","level":"INFO","fields":{"message":"listening","socket":"/r/bangerd.sock","backlog":128},"target":"bangerd::server"}"#;
        assert_eq!(
            format_line(line),
            "2024-05-01T12:00:00.123456Z INFO  bangerd::server: listening backlog=128 socket=/r/bangerd.sock"
        );
    }

    #[test]
    fn quotes_values_that_need_it_and_renders_spans() {
        let line = r#"{"timestamp":"t","level":"WARN","fields":{"message":"request failed","error":"no such actor: x y","empty":""},"target":"bangerd::conn","span":{"name":"request","id":3},"spans":[{"name":"conn","peer":1},{"name":"request","id":3,"op":"debug kill"}]}"#;
        assert_eq!(
            format_line(line),
            r#"t WARN  bangerd::conn: request failed empty="" error="no such actor: x y" in conn{peer=1}:request{id=3,op="debug kill"}"#
        );
    }

    #[test]
    fn single_span_without_spans_list() {
        let line =
            r#"{"level":"DEBUG","fields":{"message":"tick"},"target":"a","span":{"name":"loop"}}"#;
        assert_eq!(format_line(line), "DEBUG a: tick in loop");
    }

    #[test]
    fn non_json_lines_pass_through() {
        assert_eq!(
            format_line("thread 'main' panicked at x"),
            "thread 'main' panicked at x"
        );
        assert_eq!(format_line(r#"{"other":1}"#), r#"{"other":1}"#);
        assert_eq!(format_line("[1,2]"), "[1,2]");
        assert_eq!(format_line(""), "");
    }

    #[test]
    fn split_keeps_the_unterminated_rest() {
        let mut partial = b"hel".to_vec();
        assert_eq!(split_complete(b"lo\nwor", &mut partial), vec!["hello"]);
        assert_eq!(partial, b"wor");
        assert!(split_complete(b"ld", &mut partial).is_empty());
        assert_eq!(split_complete(b"\r\n\n", &mut partial), vec!["world", ""]);
        assert!(partial.is_empty());
    }

    #[test]
    fn last_lines_start_counts_from_the_end() {
        assert_eq!(last_lines_start(b"a\nb\nc\n", 2, true), 2);
        assert_eq!(last_lines_start(b"a\nb\nc", 2, true), 2);
        assert_eq!(last_lines_start(b"a\nb\n", 5, true), 0);
        assert_eq!(last_lines_start(b"cut\nb\n", 5, false), 4);
    }

    fn write(path: &Path, text: &str) {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open");
        f.write_all(text.as_bytes()).expect("write");
    }

    #[test]
    fn tail_of_a_large_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let text: String = (0..20_000).map(|i| format!("line number {i}\n")).collect();
        write(&path, &text);
        write(&path, "partial");
        let mut file = File::open(&path).expect("open");
        let (bytes, end) = read_tail(&mut file, 3).expect("tail");
        assert_eq!(end, text.len() as u64 + 7);
        assert_eq!(
            String::from_utf8(bytes).expect("utf8"),
            "line number 19998\nline number 19999\npartial"
        );
        let (bytes, _) = read_tail(&mut file, 0).expect("tail");
        assert!(bytes.is_empty());
        let (bytes, _) = read_tail(&mut file, 1_000_000).expect("tail");
        assert_eq!(bytes.len() as u64, end);
    }

    #[test]
    fn follower_sees_growth_truncation_and_recreation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let mut f = Follower::waiting(path.clone());
        assert!(f.poll().expect("poll").is_empty());

        write(&path, "one\ntw");
        assert_eq!(f.poll().expect("poll"), vec!["one"]);
        write(&path, "o\n");
        assert_eq!(f.poll().expect("poll"), vec!["two"]);

        // Truncated in place.
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .expect("truncate");
        write(&path, "x\n");
        assert_eq!(f.poll().expect("poll"), vec!["x"]);

        // Replaced by a new file (rename over it).
        let next = dir.path().join("log.new");
        write(&next, "fresh\n");
        std::fs::rename(&next, &path).expect("rename");
        assert_eq!(f.poll().expect("poll"), vec!["fresh"]);

        // Removed, then created again.
        std::fs::remove_file(&path).expect("remove");
        assert!(f.poll().expect("poll").is_empty());
        write(&path, "again\n");
        assert_eq!(f.poll().expect("poll"), vec!["again"]);
    }
}
