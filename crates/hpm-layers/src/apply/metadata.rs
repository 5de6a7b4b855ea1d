//! Setting an entry's owner, extended attributes, mode and times, in the order that keeps
//! each: the owner first (it clears setuid and `security.capability`), then the attributes,
//! then the mode, then the times.

use std::ffi::OsStr;
use std::os::fd::BorrowedFd;

use rustix::fs::{
    chmodat, chownat, fchmod, fchown, fsetxattr, futimens, lsetxattr, utimensat, AtFlags, Gid,
    Mode, Uid, XattrFlags,
};
use rustix::io::Errno;

use super::header::EntryMeta;
use crate::beneath::{proc_path, Root};
use crate::error::Result;
use crate::xattr;

/// How metadata reaches the new file: its own descriptor, or its name in a directory
/// (symlinks and nodes, which are not opened: opening a device can have effects).
#[derive(Clone, Copy)]
pub enum Target<'a> {
    /// A regular file or directory, opened.
    Fd(BorrowedFd<'a>),
    /// A symlink: `name` in the directory.
    Symlink(BorrowedFd<'a>, &'a OsStr),
    /// A device node or fifo: `name` in the directory.
    Node(BorrowedFd<'a>, &'a OsStr),
}

/// Owner, then extended attributes, then mode, then (unless deferred) times.
pub fn set_metadata(
    root: &Root,
    target: Target<'_>,
    meta: &EntryMeta,
    times: bool,
    shown: &str,
) -> Result<()> {
    let err = |what: &str, e: Errno| root.io_error(format!("{what} layer entry {shown}"), e);
    let uid = Some(Uid::from_raw(meta.uid));
    let gid = Some(Gid::from_raw(meta.gid));
    match target {
        Target::Fd(fd) => fchown(fd, uid, gid),
        Target::Symlink(dir, name) | Target::Node(dir, name) => {
            chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
        }
    }
    .map_err(|e| err("setting the owner of", e))?;

    for (key, value) in &meta.xattrs {
        let key_shown = String::from_utf8_lossy(key);
        if !xattr::applied(key) {
            tracing::warn!(
                entry = %shown,
                xattr = %key_shown,
                "skipping an extended attribute outside user./trusted./security."
            );
            continue;
        }
        match target {
            Target::Fd(fd) => fsetxattr(fd, &key[..], value, XattrFlags::empty()),
            Target::Symlink(dir, name) | Target::Node(dir, name) => {
                lsetxattr(proc_path(dir, name), &key[..], value, XattrFlags::empty())
            }
        }
        .map_err(|e| {
            let how = match target {
                Target::Fd(_) => "",
                _ => " (through /proc/self/fd, which must be mounted)",
            };
            err(
                &format!("setting extended attribute {key_shown}{how} of"),
                e,
            )
        })?;
    }

    let mode = Mode::from_raw_mode(meta.mode);
    match target {
        Target::Fd(fd) => fchmod(fd, mode),
        // Symlinks have no mode of their own on Linux.
        Target::Symlink(..) => Ok(()),
        // The node was just created under this name by this thread; fchmodat cannot
        // refuse to follow a symlink, but there is none here to follow.
        Target::Node(dir, name) => chmodat(dir, name, mode, AtFlags::empty()),
    }
    .map_err(|e| err("setting the mode of", e))?;

    if times {
        match target {
            Target::Fd(fd) => futimens(fd, &meta.times),
            Target::Symlink(dir, name) | Target::Node(dir, name) => {
                utimensat(dir, name, &meta.times, AtFlags::SYMLINK_NOFOLLOW)
            }
        }
        .map_err(|e| err("setting the times of", e))?;
    }
    Ok(())
}
