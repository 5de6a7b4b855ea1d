//! Why a request failed, and the one mapping from that to the errno an NBD reply carries.
//!
//! This module owns `nbd_errno`, the only place where engine errors and protocol-level
//! refusals become NBD error values. NBD allows only a few values (EPERM, EIO, ENOMEM,
//! EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN); it must never let another errno (EROFS,
//! ENOENT, EBUSY, ...) reach the wire.

use std::fmt;

/// `EPERM`: write, trim or write-zeroes on a read-only export.
pub const EPERM: u32 = 1;
/// `EIO`: the backend failed.
pub const EIO: u32 = 5;
/// `EINVAL`: a bad request (range, flags, unknown command).
pub const EINVAL: u32 = 22;
/// `ENOSPC`: the pool is full, or a write past the end of the export.
pub const ENOSPC: u32 = 28;
/// `ENOTSUP`: the operation is not supported.
pub const ENOTSUP: u32 = 95;

/// What kind of command failed: the spec's errno for a range error depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// READ (and anything that does not change data).
    Read,
    /// WRITE or WRITE_ZEROES: data is written.
    Write,
    /// TRIM.
    Trim,
    /// FLUSH.
    Flush,
    /// A command this server does not know or does not offer.
    Other,
}

/// Why a request failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The engine refused or failed.
    Engine(hpm_engine::Error),
    /// The request reaches past the end of the export.
    PastEnd {
        /// First byte.
        offset: u64,
        /// Length in bytes.
        length: u64,
        /// The export's size.
        size: u64,
    },
    /// A write-type command on a read-only export.
    ReadOnly,
    /// A READ longer than the maximum payload.
    TooLarge(u32),
    /// A command type this server does not offer.
    UnknownCommand(u16),
    /// Command flags that are unknown or not valid for the command.
    BadFlags(u16),
    /// `BLOCK_STATUS` without `base:allocation` selected in the handshake.
    NoMetaContext,
    /// A zero-length `BLOCK_STATUS`.
    Empty,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Engine(e) => write!(f, "{e}"),
            Failure::PastEnd {
                offset,
                length,
                size,
            } => write!(
                f,
                "request at byte {offset}+{length} is past the end of the export ({size} bytes)"
            ),
            Failure::ReadOnly => f.write_str("the export is read-only"),
            Failure::TooLarge(len) => write!(
                f,
                "request of {len} bytes is above the maximum of {} bytes",
                crate::proto::MAX_PAYLOAD
            ),
            Failure::UnknownCommand(c) => write!(f, "command type {c} is not supported"),
            Failure::BadFlags(fl) => write!(f, "command flags {fl:#x} are not valid here"),
            Failure::NoMetaContext => f.write_str(
                "BLOCK_STATUS needs the base:allocation metadata context, selected with \
                 SET_META_CONTEXT before entering transmission",
            ),
            Failure::Empty => f.write_str("a BLOCK_STATUS request must cover at least one byte"),
        }
    }
}

/// The errno to send for a failed `op`. The only place errors are mapped.
pub(crate) fn nbd_errno(op: Op, failure: &Failure) -> u32 {
    match failure {
        Failure::Engine(e) => match e.errno() {
            1 | 30 => EPERM,         // EPERM, EROFS: read-only device
            28 | 27 | 122 => ENOSPC, // ENOSPC, EFBIG, EDQUOT (the spec folds them together)
            22 => EINVAL,
            95 => ENOTSUP,
            12 => 12, // ENOMEM
            _ => EIO, // EIO and everything NBD has no word for (ENOENT, EBUSY, ...)
        },
        // The spec: a write past the end is ENOSPC, a read or trim past the end EINVAL.
        Failure::PastEnd { .. } if op == Op::Write => ENOSPC,
        Failure::PastEnd { .. } => EINVAL,
        Failure::ReadOnly => EPERM,
        Failure::TooLarge(_)
        | Failure::UnknownCommand(_)
        | Failure::BadFlags(_)
        | Failure::NoMetaContext
        | Failure::Empty => EINVAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hpm_engine::{Error, ErrorKind};

    #[test]
    fn every_failure_maps_to_an_nbd_errno() {
        let past = || Failure::PastEnd {
            offset: 10,
            length: 10,
            size: 12,
        };
        let engine = |k| Failure::Engine(Error::new(k, "x"));
        let table: Vec<(Op, Failure, u32)> = vec![
            (Op::Write, engine(ErrorKind::Io), EIO),
            (Op::Read, engine(ErrorKind::Io), EIO),
            (Op::Read, engine(ErrorKind::Corrupt), EIO),
            (Op::Write, engine(ErrorKind::NoSpace), ENOSPC),
            (Op::Flush, engine(ErrorKind::NotFound), EIO),
            (Op::Flush, engine(ErrorKind::Exists), EIO),
            (Op::Write, engine(ErrorKind::Busy), EIO),
            (Op::Write, engine(ErrorKind::Invalid), EINVAL),
            (Op::Write, engine(ErrorKind::ReadOnly), EPERM),
            (Op::Trim, engine(ErrorKind::ReadOnly), EPERM),
            (Op::Write, engine(ErrorKind::Unsupported), ENOTSUP),
            (Op::Write, past(), ENOSPC),
            (Op::Read, past(), EINVAL),
            (Op::Trim, past(), EINVAL),
            (Op::Write, Failure::ReadOnly, EPERM),
            (Op::Other, Failure::NoMetaContext, EINVAL),
            (Op::Other, Failure::Empty, EINVAL),
            (Op::Trim, Failure::ReadOnly, EPERM),
            (Op::Read, Failure::TooLarge(64 << 20), EINVAL),
            (Op::Other, Failure::UnknownCommand(99), EINVAL),
            (Op::Write, Failure::BadFlags(0x8000), EINVAL),
        ];
        for (op, f, errno) in table {
            assert_eq!(nbd_errno(op, &f), errno, "{op:?} {f:?}");
        }
    }

    #[test]
    fn messages_say_what_failed() {
        let f = Failure::PastEnd {
            offset: 4096,
            length: 512,
            size: 4096,
        };
        assert_eq!(
            f.to_string(),
            "request at byte 4096+512 is past the end of the export (4096 bytes)"
        );
        assert!(Failure::UnknownCommand(42).to_string().contains("42"));
    }
}
