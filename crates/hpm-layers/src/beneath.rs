//! File operations beneath a layer root, all relative to directory file descriptors.
//!
//! This module owns the rule that makes applying an untrusted layer safe: every path is
//! resolved from an `O_PATH` descriptor of the root with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, one directory at a time when it has to
//! create or explain, and the last component is only ever used with `*at` calls that do
//! not follow it. It must never resolve a path from a string joined onto the root path: a
//! symlink planted by an earlier entry would then redirect the write outside.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    fchmod, mkdirat, openat, openat2, statat, unlinkat, AtFlags, Dir, FileType, Mode, OFlags,
    ResolveFlags,
};
use rustix::io::Errno;

use crate::entry_name::RelPath;
use crate::error::{Error, ErrorKind, Result};

/// How every path beneath the root is resolved: no `..` escape, no symlink of any kind.
pub const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Flags of a directory handle used only as the `dirfd` of `*at` calls.
const DIR_HANDLE: OFlags = OFlags::PATH.union(OFlags::DIRECTORY).union(OFlags::CLOEXEC);

/// Mode of parent directories a layer needs but does not list.
const IMPLICIT_DIR_MODE: u32 = 0o755;

/// An open layer root.
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

impl Root {
    /// Opens the root directory (the root path itself may be reached through symlinks: it
    /// comes from the caller, not from the layer).
    pub fn open(path: &Path) -> Result<Self> {
        let fd = rustix::fs::open(path, DIR_HANDLE, Mode::empty()).map_err(|e| {
            Error::io(
                format!("opening the layer root directory {}", path.display()),
                e,
            )
        })?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The root's `O_PATH` descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The root path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An `O_PATH` handle of directory `dir` beneath the root. With `create`, missing
    /// directories are made (mode 0755) and `None` is never returned; without it a missing
    /// directory gives `None`. `entry` names what is being applied, for messages.
    ///
    /// A component that is a symlink is an [`ErrorKind::Escape`], one that is another
    /// non-directory an [`ErrorKind::Invalid`].
    pub fn open_dir(&self, dir: &RelPath, create: bool, entry: &str) -> Result<Option<OwnedFd>> {
        // Fast path: the whole directory exists and is clean. Any failure is re-walked one
        // component at a time, which creates what is missing and names what is wrong.
        if let Ok(fd) = openat2(
            &self.fd,
            dir.as_at_arg(),
            DIR_HANDLE,
            Mode::empty(),
            RESOLVE,
        ) {
            return Ok(Some(fd));
        }
        let mut cur = openat2(&self.fd, ".", DIR_HANDLE, Mode::empty(), RESOLVE)
            .map_err(|e| self.io_error(format!("opening the layer root for entry {entry}"), e))?;
        let mut prefix = PathBuf::new();
        for component in dir.as_path().components() {
            let name = component.as_os_str();
            prefix.push(name);
            let mut created = false;
            if create {
                match mkdirat(&cur, name, Mode::from_raw_mode(IMPLICIT_DIR_MODE)) {
                    Ok(()) => created = true,
                    Err(Errno::EXIST) => {}
                    Err(e) => {
                        return Err(self.io_error(
                            format!(
                                "creating directory {} for layer entry {entry}",
                                prefix.display()
                            ),
                            e,
                        ));
                    }
                }
            }
            let next = match openat2(&cur, name, DIR_HANDLE, Mode::empty(), RESOLVE) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if !create => return Ok(None),
                Err(e @ (Errno::LOOP | Errno::NOTDIR)) => {
                    return Err(self.not_a_dir(&cur, name, &prefix, entry, e));
                }
                Err(e) => {
                    return Err(self.io_error(
                        format!("opening {} for layer entry {entry}", prefix.display()),
                        e,
                    ));
                }
            };
            if created {
                // mkdirat is subject to the umask; the mode must not depend on the caller's.
                let readable = openat(&next, ".", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
                    .and_then(|fd| fchmod(fd, Mode::from_raw_mode(IMPLICIT_DIR_MODE)));
                readable.map_err(|e| {
                    self.io_error(format!("setting the mode of {}", prefix.display()), e)
                })?;
            }
            cur = next;
        }
        Ok(Some(cur))
    }

    /// Explains why `prefix` (= `name` in `parent`) cannot be used as a directory.
    fn not_a_dir(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        prefix: &Path,
        entry: &str,
        errno: Errno,
    ) -> Error {
        let is_symlink = errno == Errno::LOOP
            || statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
                .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
                .unwrap_or(false);
        if is_symlink {
            Error::new(
                ErrorKind::Escape,
                format!(
                    "layer entry {entry} goes through the symlink {} in {}; a layer may not \
                     write through symlinks, refusing the layer",
                    prefix.display(),
                    self.path.display()
                ),
            )
        } else {
            Error::new(
                ErrorKind::Invalid,
                format!(
                    "layer entry {entry} needs {} in {} to be a directory, but it is not",
                    prefix.display(),
                    self.path.display()
                ),
            )
        }
    }

    /// An OS error with the root named.
    pub fn io_error(&self, what: String, e: impl Into<std::io::Error>) -> Error {
        Error::io(format!("{what} (in {})", self.path.display()), e)
    }
}

/// Removes `name` in `dir` and, for a directory, everything under it, without following
/// any symlink. A missing `name` is fine.
pub fn remove_all_at(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<()> {
    match unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) => {}
        Err(e) => return Err(e),
    }
    let sub = openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for child in list_names(sub.as_fd())? {
        remove_all_at(sub.as_fd(), &child)?;
    }
    unlinkat(dir, name, AtFlags::REMOVEDIR)
}

/// The names in directory `dir` (any handle, `O_PATH` included), `.` and `..` excluded.
pub fn list_names(dir: BorrowedFd<'_>) -> rustix::io::Result<Vec<OsString>> {
    let readable = openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    let mut entries = Dir::new(readable)?;
    while let Some(entry) = entries.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

/// A path naming `name` in the directory `dir` without resolving anything but the
/// descriptor itself, for the calls that have no `*at` form (`lsetxattr`). The
/// `/proc/self/fd/N` magic link jumps straight to `dir`; the `l*` call does not follow
/// `name`.
pub fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    let mut path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    path.push(name);
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn remove_all_never_follows_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir_all(outside.join("keep")).unwrap();
        fs::write(outside.join("keep/file"), b"x").unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("tree/sub")).unwrap();
        fs::write(root.join("tree/sub/f"), b"y").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("tree/link")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("top-link")).unwrap();

        let root_fd = Root::open(&root).unwrap();
        remove_all_at(root_fd.fd(), OsStr::new("tree")).unwrap();
        remove_all_at(root_fd.fd(), OsStr::new("top-link")).unwrap();
        remove_all_at(root_fd.fd(), OsStr::new("missing")).unwrap();

        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
        assert_eq!(fs::read(outside.join("keep/file")).unwrap(), b"x");
    }

    #[test]
    fn open_dir_creates_and_refuses_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root_path = tmp.path().join("root");
        fs::create_dir(&root_path).unwrap();
        std::os::unix::fs::symlink(tmp.path(), root_path.join("up")).unwrap();
        fs::write(root_path.join("file"), b"").unwrap();
        let root = Root::open(&root_path).unwrap();
        let rel = |s: &str| RelPath::clean(s.as_bytes()).unwrap();

        assert!(root.open_dir(&rel("a/b"), false, "e").unwrap().is_none());
        assert!(root.open_dir(&rel("a/b"), true, "e").unwrap().is_some());
        assert!(root_path.join("a/b").is_dir());
        let err = root.open_dir(&rel("up/x"), true, "\"up/x/y\"").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Escape, "{err}");
        assert!(!tmp.path().join("x").exists());
        let err = root
            .open_dir(&rel("file/x"), true, "\"file/x/y\"")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    }
}
