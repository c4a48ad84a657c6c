//! The one error type of the library.

use std::fmt;
use std::path::PathBuf;

use petrel_runtime::SessionError;

/// What went wrong, in words a user can act on ([`fmt::Display`]) and as a [`ErrorKind`]
/// for programs (the C ABI's status codes, the server's HTTP statuses).
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The class of an [`Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A file could not be opened, read or written.
    Io,
    /// A name that is neither a file nor a model the registry knows.
    UnknownModel,
    /// Fetching a known model failed (pip, the download, its checksum).
    Download,
    /// The model file is malformed or of a kind Petrel does not run.
    InvalidModel,
    /// A caller's argument is out of range or malformed (parameters, messages, token ids,
    /// text that is not UTF-8).
    InvalidArgument,
    /// The prompt (with what the session already holds) does not fit the context.
    ContextFull,
    /// Memory for the KV cache could not be allocated.
    OutOfMemory,
    /// The chat template failed to render.
    Template,
    /// A saved session was refused: another model, another cache type, truncated or
    /// corrupt.
    InvalidState,
    /// Work was refused because the computation is busy (for callers that queue).
    Busy,
    /// A bug: a panic caught at an API boundary.
    Internal,
}

impl ErrorKind {
    /// A short, stable name (`"invalid_argument"`).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::UnknownModel => "unknown_model",
            ErrorKind::Download => "download",
            ErrorKind::InvalidModel => "invalid_model",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::ContextFull => "context_full",
            ErrorKind::OutOfMemory => "out_of_memory",
            ErrorKind::Template => "template",
            ErrorKind::InvalidState => "invalid_state",
            ErrorKind::Busy => "busy",
            ErrorKind::Internal => "internal",
        }
    }
}

impl Error {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), source: None }
    }

    /// An error of `kind` saying `message`, caused by `source`.
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error { kind, message: message.into(), source: Some(Box::new(source)) }
    }

    /// An I/O error on `path`, `doing` saying what was tried ("cannot open").
    pub fn io(doing: &str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        Error::with_source(ErrorKind::Io, format!("{doing} {}: {source}", path.display()), source)
    }

    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message alone (the same text as [`fmt::Display`]).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<SessionError> for Error {
    fn from(e: SessionError) -> Self {
        let kind = match e {
            SessionError::ContextFull { .. } => ErrorKind::ContextFull,
            SessionError::OutOfMemory { .. } => ErrorKind::OutOfMemory,
            SessionError::BadState(_) => ErrorKind::InvalidState,
            _ => ErrorKind::InvalidArgument,
        };
        Error::with_source(kind, e.to_string(), e)
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
