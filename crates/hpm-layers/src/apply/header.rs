//! What a tar entry says about the file it creates: owner, permission bits, times and
//! extended attributes, with the PAX records (`mtime`, `atime`, `SCHILY.xattr.*`) taken into
//! account. The tar crate already applies PAX `path`, `linkpath`, `size`, `uid` and `gid`.

use std::io::Read;

use rustix::fs::{Timespec, Timestamps};

use crate::error::{Error, ErrorKind, Result};
use crate::xattr::PAX_PREFIX;

/// The metadata of one entry.
pub struct EntryMeta {
    /// Permission bits with setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Access and modification times.
    pub times: Timestamps,
    /// Extended attributes, in archive order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl EntryMeta {
    /// Reads the metadata of `entry`; `shown` names it in errors.
    pub fn read<R: Read>(entry: &mut tar::Entry<'_, R>, shown: &str) -> Result<Self> {
        let bad = |what: &str, e: std::io::Error| {
            Error::new(
                ErrorKind::Invalid,
                format!("layer entry {shown} has an unreadable {what} field: {e}"),
            )
        };
        let header = entry.header();
        let old = header.as_old();
        let mode = numeric(header.mode().map(u64::from), &old.mode).map_err(|e| bad("mode", e))?;
        let mode = (mode & 0o7777) as u32;
        let uid = numeric(header.uid(), &old.uid).map_err(|e| bad("uid", e))?;
        let uid = id(uid, "uid", shown)?;
        let gid = numeric(header.gid(), &old.gid).map_err(|e| bad("gid", e))?;
        let gid = id(gid, "gid", shown)?;
        let header_mtime = numeric(header.mtime(), &old.mtime).map_err(|e| bad("mtime", e))?;
        let mut mtime = Timespec {
            tv_sec: i64::try_from(header_mtime).unwrap_or(i64::MAX),
            tv_nsec: 0,
        };
        let mut atime = None;
        let mut xattrs = Vec::new();
        if let Some(records) = entry.pax_extensions().map_err(|e| bad("PAX header", e))? {
            for record in records {
                let record = record.map_err(|e| bad("PAX record", e))?;
                let key = record.key_bytes();
                let value = record.value_bytes();
                if let Some(name) = key.strip_prefix(PAX_PREFIX.as_bytes()) {
                    xattrs.push((name.to_vec(), value.to_vec()));
                } else if key == b"mtime" {
                    mtime = pax_time(value).ok_or_else(|| {
                        Error::new(
                            ErrorKind::Invalid,
                            format!("layer entry {shown} has a malformed PAX mtime"),
                        )
                    })?;
                } else if key == b"atime" {
                    atime = pax_time(value);
                }
            }
        }
        // Like moby: the access time is never before the modification time.
        let atime = atime.filter(|a| *a >= mtime).unwrap_or(mtime);
        Ok(Self {
            mode,
            uid,
            gid,
            times: Timestamps {
                last_access: atime,
                last_modification: mtime,
            },
            xattrs,
        })
    }
}

/// A numeric header field; an empty one (all NUL or spaces) is 0, as Go's `archive/tar`
/// (and so moby) reads it.
fn numeric(parsed: std::io::Result<u64>, raw: &[u8]) -> std::io::Result<u64> {
    match parsed {
        Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
        other => other,
    }
}

fn id(raw: u64, what: &str, shown: &str) -> Result<u32> {
    u32::try_from(raw)
        .ok()
        .filter(|&v| v != u32::MAX)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Invalid,
                format!("layer entry {shown} has {what} {raw}, which is not a valid id"),
            )
        })
}

/// Parses a PAX time: `[-]SECONDS[.FRACTION]`.
fn pax_time(value: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(value).ok()?;
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, digit) in frac.bytes().take(9).enumerate() {
        nanos += i64::from(digit - b'0') * 10i64.pow(8 - i as u32);
    }
    Some(if !negative {
        Timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        }
    } else if nanos == 0 {
        Timespec {
            tv_sec: -secs,
            tv_nsec: 0,
        }
    } else {
        Timespec {
            tv_sec: -secs - 1,
            tv_nsec: 1_000_000_000 - nanos,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(sec: i64, nsec: i64) -> Option<Timespec> {
        Some(Timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        })
    }

    #[test]
    fn pax_times() {
        assert_eq!(pax_time(b"1700000000"), ts(1_700_000_000, 0));
        assert_eq!(pax_time(b"1700000000.5"), ts(1_700_000_000, 500_000_000));
        assert_eq!(pax_time(b"12.0000000019"), ts(12, 1));
        assert_eq!(pax_time(b"-1.25"), ts(-2, 750_000_000));
        assert_eq!(pax_time(b"-3"), ts(-3, 0));
        assert_eq!(pax_time(b""), None);
        assert_eq!(pax_time(b"1.x"), None);
        assert_eq!(pax_time(b".5"), None);
    }
}
