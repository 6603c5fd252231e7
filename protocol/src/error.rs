//! Errors as data: what travels to a client when an operation fails.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The class of a failure, so clients can react without parsing text.
///
/// Append-only: new kinds go at the end.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A bug or an unexpected condition inside the daemon.
    Internal,
    /// The request itself is wrong (bad name, bad argument).
    InvalidRequest,
    NotFound,
    AlreadyExists,
    /// The object is in a state that does not allow the operation.
    InvalidState,
    /// The part of the daemon that owns the request is not available right now
    /// (for example being restarted by its supervisor); retrying may succeed.
    Unavailable,
    Timeout,
    Cancelled,
    PermissionDenied,
    /// Client and daemon speak different protocol versions.
    VersionMismatch,
    /// A frame exceeded [`crate::MAX_FRAME_LEN`].
    FrameTooLarge,
    /// A frame could not be decoded.
    MalformedFrame,
    /// The daemon is shutting down and does not take new work.
    ShuttingDown,
}

impl ErrorKind {
    /// A stable lower-case name for JSON output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Internal => "internal",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::InvalidState => "invalid_state",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::VersionMismatch => "version_mismatch",
            ErrorKind::FrameTooLarge => "frame_too_large",
            ErrorKind::MalformedFrame => "malformed_frame",
            ErrorKind::ShuttingDown => "shutting_down",
        }
    }
}

/// A failed operation as seen by a client: what failed (`message`), why
/// (`causes`, outermost first) and, when there is one, what to do (`hint`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorData {
    pub kind: ErrorKind,
    pub message: String,
    pub causes: Vec<String>,
    pub hint: Option<String>,
}

impl ErrorData {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            causes: Vec::new(),
            hint: None,
        }
    }

    /// Builds an error from any `std::error::Error`, keeping its source chain.
    pub fn from_error(kind: ErrorKind, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut causes = Vec::new();
        let mut source = err.source();
        while let Some(cause) = source {
            causes.push(cause.to_string());
            source = cause.source();
        }
        Self {
            kind,
            message: err.to_string(),
            causes,
            hint: None,
        }
    }

    pub fn with_cause(mut self, cause: impl Into<String>) -> Self {
        self.causes.push(cause.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for ErrorData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        for cause in &self.causes {
            write!(f, ": {cause}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ErrorData {}
