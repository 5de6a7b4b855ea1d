//! The engine's one error type: a small kind plus a message that says what failed, where,
//! and what to do.

use std::fmt;
use std::io;

/// What went wrong, for callers that map errors to errno, gRPC codes or HTTP replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The backend failed (or failed earlier and the pool refuses writes until reopened).
    Io,
    /// Metadata is damaged.
    Corrupt,
    /// No free block in the pool.
    NoSpace,
    /// No such device or pool.
    NotFound,
    /// A device with that name exists.
    Exists,
    /// In use: the pool by another process, a device by an open handle.
    Busy,
    /// A bad argument: range, size, name.
    Invalid,
    /// A write to a read-only device.
    ReadOnly,
    /// Not implemented or not possible on this kind of store.
    Unsupported,
}

/// An engine error.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<io::Error>,
}

/// Engine result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self {
            kind: ErrorKind::Io,
            message: context.into(),
            source: Some(source),
        }
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The errno a block or file interface should report for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Io | ErrorKind::Corrupt => 5, // EIO
            ErrorKind::NoSpace => 28,                // ENOSPC
            ErrorKind::NotFound => 2,                // ENOENT
            ErrorKind::Exists => 17,                 // EEXIST
            ErrorKind::Busy => 16,                   // EBUSY
            ErrorKind::Invalid => 22,                // EINVAL
            ErrorKind::ReadOnly => 30,               // EROFS
            ErrorKind::Unsupported => 95,            // EOPNOTSUPP
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(s) => write!(f, "{}: {s}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

impl From<hpm_format::FormatError> for Error {
    fn from(e: hpm_format::FormatError) -> Self {
        match e {
            hpm_format::FormatError::Unsupported { .. } => {
                Error::new(ErrorKind::Unsupported, e.to_string())
            }
            _ => Error::new(ErrorKind::Corrupt, e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_errno() {
        let table = [
            (ErrorKind::Io, 5),
            (ErrorKind::Corrupt, 5),
            (ErrorKind::NoSpace, 28),
            (ErrorKind::NotFound, 2),
            (ErrorKind::Exists, 17),
            (ErrorKind::Busy, 16),
            (ErrorKind::Invalid, 22),
            (ErrorKind::ReadOnly, 30),
            (ErrorKind::Unsupported, 95),
        ];
        for (kind, errno) in table {
            assert_eq!(Error::new(kind, "x").errno(), errno, "{kind:?}");
        }
    }

    #[test]
    fn io_errors_carry_their_source_in_the_message() {
        let e = Error::io("writing block 7 of device a", io::Error::other("boom"));
        assert_eq!(e.to_string(), "writing block 7 of device a: boom");
        assert_eq!(e.kind(), ErrorKind::Io);
    }
}
