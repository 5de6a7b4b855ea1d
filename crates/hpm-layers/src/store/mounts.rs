//! Mounting a layer's ext4 filesystem, unmounting it, flushing it, and finding mounts left
//! under the store's `mnt` directory by a crashed run.
//!
//! Owns the system calls and `/proc/self/mountinfo`; must never decide when to mount, and
//! never call the global `sync()`: that would wait for every filesystem of the machine,
//! including ones on our own FUSE devices whose writeback may need this very process.

use std::ffi::CString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};

use crate::error::{Error, ErrorKind, Result};

/// Mounts the ext4 filesystem on `block` at `target` with default options, plus the SELinux
/// context `label` when not empty (what devicemapper passes).
pub(super) fn mount_ext4(block: &Path, target: &Path, label: &str) -> Result<()> {
    let data = if label.is_empty() {
        None
    } else {
        // Quoted (an MLS range has commas); a quote in it would end the option early and
        // let the rest pass as further mount options.
        let refused = || {
            Error::new(
                ErrorKind::Invalid,
                format!("mount label {label:?} contains a quote or NUL"),
            )
        };
        if label.contains('"') {
            return Err(refused());
        }
        Some(CString::new(format!("context=\"{label}\"")).map_err(|_| refused())?)
    };
    rustix::mount::mount(block, target, "ext4", MountFlags::empty(), data.as_deref()).map_err(|e| {
        Error::io(
            format!(
                "mounting the ext4 filesystem of {} at {}",
                block.display(),
                target.display()
            ),
            e,
        )
    })
}

/// How [`unmount`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unmounted {
    /// Unmounted: the block device is free.
    Done,
    /// Something had files open or its working directory inside: the mount was detached
    /// lazily and the block device stays in use until they let go.
    Lazily,
    /// Nothing was mounted there.
    NotMounted,
}

/// Pauses between unmount attempts while the filesystem is busy, in milliseconds.
/// About 2 s in all: a container's processes (runc, the shim) may still hold the filesystem
/// for a moment after dockerd's `Put`; going lazy then leaves a device that cannot be
/// detached, and so a layer that cannot be removed, until they let go.
const BUSY_RETRY_MS: [u64; 10] = [1, 4, 10, 25, 50, 100, 200, 400, 600, 600];

/// Unmounts `target`; lazily (`MNT_DETACH`, as devicemapper always does) when it stays busy.
///
/// A busy filesystem is retried for a short while first: when any thread of this process
/// starts a program (mkfs, e2fsck ...), the child holds a copy of every descriptor, ours
/// inside the filesystem included, until it executes, which makes `umount` fail with
/// `EBUSY` for a moment even though nobody uses the filesystem.
pub(super) fn unmount(target: &Path) -> Result<Unmounted> {
    let mut pauses = BUSY_RETRY_MS.iter();
    loop {
        match rustix::mount::unmount(target, UnmountFlags::empty()) {
            Ok(()) => return Ok(Unmounted::Done),
            Err(Errno::INVAL) | Err(Errno::NOENT) => return Ok(Unmounted::NotMounted),
            Err(Errno::BUSY) => match pauses.next() {
                Some(&ms) => std::thread::sleep(Duration::from_millis(ms)),
                None => break,
            },
            Err(e) => return Err(Error::io(format!("unmounting {}", target.display()), e)),
        }
    }
    lazy_unmount(target)?;
    Ok(Unmounted::Lazily)
}

/// Detaches the mount at `target` now; the filesystem goes when its last user lets go.
pub(super) fn lazy_unmount(target: &Path) -> Result<()> {
    rustix::mount::unmount(target, UnmountFlags::DETACH)
        .map_err(|e| Error::io(format!("lazily unmounting {}", target.display()), e))
}

/// Writes out the filesystem holding `path` (`syncfs`, not `sync`).
pub(super) fn syncfs(path: &Path) -> Result<()> {
    let what = || format!("flushing the filesystem of {}", path.display());
    let dir = File::open(path).map_err(|e| Error::io(what(), e))?;
    rustix::fs::syncfs(&dir).map_err(|e| Error::io(what(), e))
}

/// Mount points at or below `dir` (an absolute, canonical path), deepest first.
pub(super) fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape(field)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// Whether `path` (absolute, canonical) is a mount point.
pub(super) fn is_mount_point(path: &Path) -> Result<bool> {
    Ok(mounts_under(path)?.iter().any(|p| p == path))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b\011c\012d\134e"), "/a b\tc\nd\\e");
        assert_eq!(unescape(r"/plain/path"), "/plain/path");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn the_root_is_a_mount_point() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        assert!(!mounts_under(Path::new("/")).unwrap().is_empty());
    }
}
