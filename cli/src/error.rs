//! How a command ends: its exit status, and the error report printed to
//! stderr when it fails (`error:` / `caused by:` / `hint:`).

use std::fmt;
use std::io;
use std::process::ExitCode;

use banger_protocol::client::ClientError;
use banger_protocol::{ErrorData, ErrorKind};

/// The exit statuses banger uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: the operation succeeded.
    Ok,
    /// 1: the operation failed (including errors reported by the daemon).
    Failed,
    /// 2: the command line was wrong (every argument is checked by clap,
    /// including banger's own value checks).
    Usage,
    /// 130: the user interrupted the operation with Ctrl-C.
    Interrupted,
    /// The exit code of a command run in a VM (`vm run -- CMD`, `vm exec`).
    Code(u8),
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::Interrupted => 130,
            Exit::Code(c) => c,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

/// A failed command: what failed, why (outermost cause first), what to do.
#[derive(Debug)]
pub struct CliError {
    message: String,
    causes: Vec<String>,
    hint: Option<String>,
    exit: Exit,
    /// Set when stdout went away (`banger ... | head`): end without a report.
    quiet: bool,
    /// The class of the failure, when known (the daemon's, or `Timeout`).
    kind: Option<ErrorKind>,
}

impl CliError {
    /// An operation failed (exit 1).
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            causes: Vec::new(),
            hint: None,
            exit: Exit::Failed,
            quiet: false,
            kind: None,
        }
    }

    /// `message`, caused by `err` and its whole source chain.
    pub fn with_source(
        message: impl Into<String>,
        err: &(dyn std::error::Error + 'static),
    ) -> Self {
        let mut this = Self::failed(message);
        this.push_chain(err);
        this
    }

    /// An error whose own text is the message, its sources the causes.
    pub fn from_error(err: &(dyn std::error::Error + 'static)) -> Self {
        let mut this = Self::failed(err.to_string());
        if let Some(source) = err.source() {
            this.push_chain(source);
        }
        this
    }

    /// Writing to stdout failed. A closed pipe ends the command quietly.
    pub fn stdout(err: io::Error) -> Self {
        let quiet = err.kind() == io::ErrorKind::BrokenPipe;
        let mut this = Self::with_source("cannot write to stdout", &err);
        this.quiet = quiet;
        if quiet {
            this.exit = Exit::Ok;
        }
        this
    }

    pub fn with_cause(mut self, cause: impl Into<String>) -> Self {
        self.causes.push(cause.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Marks the class of the failure.
    pub fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = Some(kind);
        self
    }

    /// The class of the failure, if known.
    pub fn kind(&self) -> Option<ErrorKind> {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn exit(&self) -> Exit {
        self.exit
    }

    fn push_chain(&mut self, err: &(dyn std::error::Error + 'static)) {
        let mut next = Some(err);
        while let Some(e) = next {
            self.causes.push(e.to_string());
            next = e.source();
        }
    }

    /// Prints the report to stderr (nothing if stdout was closed under us).
    pub fn report(&self) {
        if !self.quiet {
            eprint!("{self}");
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.message)?;
        for cause in &self.causes {
            writeln!(f, "  caused by: {cause}")?;
        }
        if let Some(hint) = &self.hint {
            writeln!(f, "  hint: {hint}")?;
        }
        Ok(())
    }
}

impl From<ErrorData> for CliError {
    fn from(data: ErrorData) -> Self {
        let hint = match data.kind {
            ErrorKind::VersionMismatch => Some(
                "restart the daemon with `banger daemon stop` so the matching bangerd starts"
                    .to_string(),
            ),
            _ => data.hint,
        };
        Self {
            message: data.message,
            causes: data.causes,
            hint,
            exit: Exit::Failed,
            quiet: false,
            kind: Some(data.kind),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(err: ClientError) -> Self {
        match err {
            ClientError::Daemon(data) => data.into(),
            other => Self::from_error(&other),
        }
    }
}

/// `writeln!` to stdout, turning a write failure into a [`CliError`].
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        writeln!(::std::io::stdout(), $($arg)*).map_err($crate::error::CliError::stdout)
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lists_causes_then_hint() {
        let err = CliError::failed("cannot start bangerd")
            .with_cause("no such file")
            .with_hint("set BANGERD");
        assert_eq!(
            err.to_string(),
            "error: cannot start bangerd\n  caused by: no such file\n  hint: set BANGERD\n"
        );
        assert_eq!(err.exit().code(), 1);
    }

    #[test]
    fn version_mismatch_gets_the_restart_hint() {
        let data = ErrorData::new(ErrorKind::VersionMismatch, "protocol 2 is not protocol 1");
        let err = CliError::from(ClientError::Daemon(data));
        assert!(err
            .to_string()
            .contains("hint: restart the daemon with `banger daemon stop`"));
    }

    #[test]
    fn daemon_errors_keep_their_chain() {
        let data = ErrorData::new(ErrorKind::NotFound, "no actor named x")
            .with_cause("registry lookup failed")
            .with_hint("see `banger debug actors`");
        let text = CliError::from(data).to_string();
        assert_eq!(
            text,
            "error: no actor named x\n  caused by: registry lookup failed\n  hint: see `banger debug actors`\n"
        );
    }

    #[test]
    fn io_chain_is_walked() {
        let io = io::Error::new(io::ErrorKind::NotFound, "gone");
        let err = CliError::from(ClientError::Connect {
            path: "/r/s.sock".into(),
            source: io,
        });
        assert_eq!(
            err.to_string(),
            "error: cannot connect to bangerd at /r/s.sock\n  caused by: gone\n"
        );
    }

    #[test]
    fn broken_pipe_is_quiet_success() {
        let err = CliError::stdout(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(err.exit(), Exit::Ok);
        assert!(err.quiet);
        let err = CliError::stdout(io::Error::from(io::ErrorKind::Other));
        assert_eq!(err.exit(), Exit::Failed);
    }
}
