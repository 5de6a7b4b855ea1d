//! The crate's one error type, [`DriverError`]: what a [`crate::GraphDriver`] (or the server
//! itself, for a request it cannot accept) reports. On the wire only the message travels, as
//! `{"Err": message}`; the kind is for the implementation and the logs. The one function that
//! turns an error into a reply is `reply::failure`.

use std::io;

/// What went wrong, in the words every hpmapper surface uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DriverErrorKind {
    /// The filesystem, a device or the request stream failed.
    Io,
    /// Stored data or metadata is damaged.
    Corrupt,
    /// The pool or the layer's filesystem is full.
    NoSpace,
    /// No layer (or path) by that name.
    NotFound,
    /// A layer by that name already exists.
    Exists,
    /// The layer is in use (mounted, or the parent of another layer).
    Busy,
    /// The request is malformed or its values make no sense (bad JSON, a missing id, an
    /// unknown option).
    Invalid,
    /// The layer or the pool is read-only.
    ReadOnly,
    /// hpmapper does not do this (user namespace remapping, an unknown endpoint).
    Unsupported,
}

impl DriverErrorKind {
    /// A short phrase for the kind, used when an error comes without a message.
    pub fn describe(self) -> &'static str {
        match self {
            DriverErrorKind::Io => "I/O error",
            DriverErrorKind::Corrupt => "stored data is corrupt",
            DriverErrorKind::NoSpace => "no space left",
            DriverErrorKind::NotFound => "not found",
            DriverErrorKind::Exists => "already exists",
            DriverErrorKind::Busy => "in use",
            DriverErrorKind::Invalid => "invalid request",
            DriverErrorKind::ReadOnly => "read-only",
            DriverErrorKind::Unsupported => "not supported",
        }
    }
}

/// A failed graphdriver operation: a kind plus a message that says what failed and, where
/// it can, what to do. The message is what `docker` prints, so it should name the layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DriverError {
    /// What went wrong.
    pub kind: DriverErrorKind,
    /// What failed, in plain words; sent to dockerd as `{"Err": message}`.
    pub message: String,
}

impl DriverError {
    /// An error of `kind` with `message`.
    pub fn new(kind: DriverErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// A malformed or nonsensical request.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(DriverErrorKind::Invalid, message)
    }

    /// No such layer.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(DriverErrorKind::NotFound, message)
    }

    /// Something hpmapper does not do.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(DriverErrorKind::Unsupported, message)
    }

    /// An OS error while doing `what` (e.g. "mounting layer abc"); the kind follows the
    /// error's kind.
    pub fn io(what: impl std::fmt::Display, err: &io::Error) -> Self {
        Self::new(kind_of(err), format!("{what}: {err}"))
    }
}

impl From<io::Error> for DriverError {
    fn from(err: io::Error) -> Self {
        Self::new(kind_of(&err), err.to_string())
    }
}

fn kind_of(err: &io::Error) -> DriverErrorKind {
    match err.kind() {
        io::ErrorKind::NotFound => DriverErrorKind::NotFound,
        io::ErrorKind::AlreadyExists => DriverErrorKind::Exists,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => DriverErrorKind::NoSpace,
        io::ErrorKind::ReadOnlyFilesystem => DriverErrorKind::ReadOnly,
        io::ErrorKind::ResourceBusy => DriverErrorKind::Busy,
        io::ErrorKind::InvalidInput => DriverErrorKind::Invalid,
        io::ErrorKind::InvalidData => DriverErrorKind::Corrupt,
        io::ErrorKind::Unsupported => DriverErrorKind::Unsupported,
        _ => DriverErrorKind::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_keep_their_meaning() {
        let cases = [
            (io::ErrorKind::NotFound, DriverErrorKind::NotFound),
            (io::ErrorKind::AlreadyExists, DriverErrorKind::Exists),
            (io::ErrorKind::StorageFull, DriverErrorKind::NoSpace),
            (io::ErrorKind::ReadOnlyFilesystem, DriverErrorKind::ReadOnly),
            (io::ErrorKind::ResourceBusy, DriverErrorKind::Busy),
            (io::ErrorKind::InvalidInput, DriverErrorKind::Invalid),
            (io::ErrorKind::InvalidData, DriverErrorKind::Corrupt),
            (io::ErrorKind::Unsupported, DriverErrorKind::Unsupported),
            (io::ErrorKind::BrokenPipe, DriverErrorKind::Io),
        ];
        for (io_kind, kind) in cases {
            let e = DriverError::io("mounting layer abc", &io::Error::new(io_kind, "boom"));
            assert_eq!(e.kind, kind, "{io_kind:?}");
            assert_eq!(e.message, "mounting layer abc: boom");
            assert_eq!(DriverError::from(io::Error::new(io_kind, "x")).kind, kind);
        }
    }
}
