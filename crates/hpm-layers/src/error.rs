//! The crate's one error type: a small kind plus a message that names the layer entry or
//! path that failed, and the OS error underneath when there is one.

use std::io;

/// What went wrong, for callers that map errors to a Docker `{"Err": ...}` reply, an errno
/// or a gRPC status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The filesystem or the tar stream's reader failed.
    Io,
    /// A path the operation needs does not exist (the layer directory, a hard link's target).
    NotFound,
    /// The filesystem is full.
    NoSpace,
    /// The filesystem is read-only.
    ReadOnly,
    /// The input is malformed: a broken tar stream, an entry name that cannot mean a file,
    /// a parent path that is not a directory.
    Invalid,
    /// A layer entry would reach outside the layer root: a `..` breakout, a path or a hard
    /// link through a symlink, a hard link to a file outside. The layer is refused.
    Escape,
    /// Something this crate or the filesystem does not support: an unknown tar entry type,
    /// extended attributes on a filesystem without them, a missing e2fsprogs tool.
    Unsupported,
    /// In use (`EBUSY`); in the layer store: a layer is mounted, or its device is open
    /// elsewhere.
    Busy,
    /// The layer store: a layer with that id already exists.
    Exists,
}

/// An error of this crate.
#[derive(Debug, thiserror::Error)]
#[error("{context}{}", source_suffix(.source))]
pub struct Error {
    kind: ErrorKind,
    context: String,
    #[source]
    source: Option<io::Error>,
}

fn source_suffix(source: &Option<io::Error>) -> String {
    match source {
        Some(e) => format!(": {e}"),
        None => String::new(),
    }
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message that says what failed and where.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Self {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An OS error while doing `context`; the kind follows the errno (ENOENT is
    /// [`ErrorKind::NotFound`], ENOSPC [`ErrorKind::NoSpace`], ...).
    pub fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        let source = source.into();
        let kind = match source.raw_os_error() {
            Some(libc_errno::ENOENT) => ErrorKind::NotFound,
            Some(libc_errno::ENOSPC) | Some(libc_errno::EDQUOT) => ErrorKind::NoSpace,
            Some(libc_errno::EROFS) => ErrorKind::ReadOnly,
            Some(libc_errno::EOPNOTSUPP) => ErrorKind::Unsupported,
            Some(libc_errno::EBUSY) => ErrorKind::Busy,
            None if source.kind() == io::ErrorKind::ResourceBusy => ErrorKind::Busy,
            _ => ErrorKind::Io,
        };
        Self {
            kind,
            context: context.into(),
            source: Some(source),
        }
    }

    /// An error of `kind` caused by `source` (an OS error, or another crate's error wrapped
    /// with `io::Error::other`), for when the errno alone would give the wrong kind.
    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<String>,
        source: impl Into<io::Error>,
    ) -> Self {
        Self {
            kind,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// A [`ErrorKind::Busy`] error says `what` before its own message; any other passes
    /// through unchanged.
    pub fn when_busy(self, what: impl FnOnce() -> String) -> Self {
        if self.kind != ErrorKind::Busy {
            return self;
        }
        Error::new(ErrorKind::Busy, format!("{}: {self}", what()))
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without the OS error.
    pub fn context(&self) -> &str {
        &self.context
    }
}

/// The errno values the kind mapping needs, from rustix so no libc dependency is added.
mod libc_errno {
    use rustix::io::Errno;

    pub const ENOENT: i32 = Errno::NOENT.raw_os_error();
    pub const ENOSPC: i32 = Errno::NOSPC.raw_os_error();
    pub const EDQUOT: i32 = Errno::DQUOT.raw_os_error();
    pub const EROFS: i32 = Errno::ROFS.raw_os_error();
    pub const EOPNOTSUPP: i32 = Errno::OPNOTSUPP.raw_os_error();
    pub const EBUSY: i32 = Errno::BUSY.raw_os_error();
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::io::Errno;

    #[test]
    fn kind_follows_errno_and_message_keeps_source() {
        let table = [
            (Errno::NOENT, ErrorKind::NotFound),
            (Errno::NOSPC, ErrorKind::NoSpace),
            (Errno::DQUOT, ErrorKind::NoSpace),
            (Errno::ROFS, ErrorKind::ReadOnly),
            (Errno::OPNOTSUPP, ErrorKind::Unsupported),
            (Errno::BUSY, ErrorKind::Busy),
            (Errno::IO, ErrorKind::Io),
            (Errno::PERM, ErrorKind::Io),
        ];
        for (errno, kind) in table {
            let e = Error::io("creating \"a/b\"", errno);
            assert_eq!(e.kind(), kind, "{errno:?}");
            assert!(e.to_string().starts_with("creating \"a/b\": "), "{e}");
            assert!(std::error::Error::source(&e).is_some());
        }
        let e = Error::new(ErrorKind::Escape, "entry \"../x\" leaves the root");
        assert_eq!(e.to_string(), "entry \"../x\" leaves the root");
    }
}
