//! Applying a layer tar to a directory, like moby's `archive.UnpackLayer`.
//!
//! Owns the whiteout rules and the creation of every entry type; must never write outside
//! the layer root or through a symlink, whatever the tar says (all paths go through
//! `beneath`).
//!
//! Rules, in moby's order (`pkg/archive/diff.go`):
//! - Names are cleaned (`entry_name`); `..` that climbs out of the root refuses the
//!   layer, a leading `/` means the root. Missing parents are created with mode 0755 (moby
//!   uses `MkdirAll`).
//! - Entries whose first component starts with `.wh..wh.` (AUFS metadata such as
//!   `.wh..wh.plnk/`) and entries whose name is `.wh..wh.*` other than the opaque marker are
//!   skipped. Hard links into `.wh..wh.plnk` (very old AUFS layers) are therefore not
//!   supported: their target does not exist and the layer is refused.
//! - `D/.wh.NAME` removes `D/NAME` recursively; the marker is never created.
//! - `D/.wh..wh..opq` removes everything under `D` that this layer has not written, even
//!   when the marker comes after `D`'s entries. "Written" covers every entry of this layer
//!   and its parents, so a dir-on-dir merge below `D` keeps what this layer put there and
//!   loses what the lower layers had (moby walks `D` the same way).
//! - Any other entry first removes an existing path of that name unless both are
//!   directories (dir-on-dir only applies the metadata), then creates the entry: regular
//!   file, directory, symlink (any target: it is data, never followed), hard link (the
//!   target must already exist beneath the root, reached without symlinks), character or
//!   block device, fifo. PAX global headers are ignored; other types refuse the layer.
//! - Metadata in moby's order: owner (numeric uid/gid, never following a symlink), extended
//!   attributes (after the owner, which clears `security.capability`), permission bits
//!   including setuid/setgid/sticky (after the owner, which clears setuid), times.
//!   Symlinks get no mode. Hard links get no metadata of their own: they share the target's
//!   inode, whose entry already set it (moby's `lchown` on the link would clear a setuid bit
//!   of the target).
//! - Directory times are set after the last entry, since creating entries inside changes
//!   them. The access time is the PAX `atime` when present and not before the modification
//!   time, else the modification time.
//! - The return value is the sum of every entry's size, skipped entries included.
//! - An extension header (GNU long name or link, PAX) over 1 MiB refuses the layer, as Go's
//!   archive/tar does: the tar crate would hold it in memory whole (`limit`).
//!
//! Deviation from moby on purpose: moby unpacks inside a chroot, so a symlink in the tree
//! is followed as if the root were `/` (a layer writing `lib/x` over a lower `lib ->
//! usr/lib` lands in `usr/lib/x`). Here an entry, whiteout or hard link target whose parent
//! path holds a symlink refuses the layer ([`crate::ErrorKind::Escape`]). Layers made by
//! diffing trees never do this; if a hand-made image needs it, `RESOLVE_IN_ROOT` gives
//! moby's behaviour with the same safety.

mod header;
mod limit;
mod metadata;
mod plan;

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{
    linkat, makedev, mkdirat, mknodat, openat, openat2, statat, symlinkat, utimensat, AtFlags,
    FileType, Mode, OFlags, Timestamps,
};
use rustix::io::Errno;
use tar::EntryType;

use crate::beneath::{list_names, remove_all_at, Root, RESOLVE};
use crate::entry_name::{classify, RelPath, Whiteout, WHITEOUT_META_PREFIX, WHITEOUT_OPAQUE};
use crate::error::{Error, ErrorKind, Result};
use header::EntryMeta;
use metadata::{set_metadata, Target};
use plan::{plan, Plan};

/// Applies the uncompressed layer tar `tar` to the directory `root` (see the module doc for
/// the rules) and returns the sum of the entries' sizes, which is what Docker's
/// `ApplyDiff` reports.
///
/// On error the tree may hold part of the layer; nothing outside `root` has been touched.
pub fn apply_layer(root: &Path, tar: impl Read) -> Result<u64> {
    let root = Root::open(root)?;
    let mut applier = Applier {
        root: &root,
        written: HashSet::new(),
        dirs: HashMap::new(),
        buf: vec![0; 128 * 1024],
    };
    let mut archive = tar::Archive::new(limit::Limited::new(tar));
    let entries = archive
        .entries()
        .map_err(|e| tar_error(&root, "reading the layer tar", e))?;
    let mut size = 0u64;
    for (index, entry) in entries.enumerate() {
        let mut entry =
            entry.map_err(|e| tar_error(&root, &format!("reading entry #{index}"), e))?;
        size = size.saturating_add(entry.size());
        applier.entry(&mut entry)?;
    }
    applier.finish()?;
    Ok(size)
}

/// A tar stream error: format problems (the tar crate reports them as `Other`) are
/// [`ErrorKind::Invalid`], the reader's own errors keep their errno.
fn tar_error(root: &Root, what: &str, e: std::io::Error) -> Error {
    let context = format!(
        "{what} of the layer tar applied to {}",
        root.path().display()
    );
    if e.kind() == std::io::ErrorKind::Other && e.raw_os_error().is_none() {
        Error::new(ErrorKind::Invalid, format!("{context}: malformed tar: {e}"))
    } else {
        Error::io(context, e)
    }
}

struct Applier<'r> {
    root: &'r Root,
    /// Entries of this layer and their parents; the opaque marker keeps exactly these.
    written: HashSet<RelPath>,
    /// Directories whose times are set at the end, by path: a directory repeated in the
    /// stream keeps its last times and one slot (memory follows the tree, not the stream).
    dirs: HashMap<RelPath, Timestamps>,
    buf: Vec<u8>,
}

impl Applier<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let raw = entry.path_bytes().into_owned();
        let shown = format!("{:?}", String::from_utf8_lossy(&raw));
        let etype = entry.header().entry_type();
        if etype == EntryType::XGlobalHeader {
            tracing::debug!(entry = %shown, "ignoring a PAX global header");
            return Ok(());
        }
        let rel = RelPath::clean(&raw).map_err(|_| {
            Error::new(
                ErrorKind::Escape,
                format!(
                    "layer entry {shown} climbs out of the layer root {} with `..`; refusing \
                     the layer",
                    self.root.path().display()
                ),
            )
        })?;
        let Some((parent, name)) = rel.split() else {
            return self.root_entry(entry, etype, &shown);
        };
        let first = rel.as_path().iter().next().unwrap_or_default();
        if first
            .as_bytes()
            .starts_with(WHITEOUT_META_PREFIX.as_bytes())
            && rel.as_path() != Path::new(WHITEOUT_OPAQUE)
        {
            tracing::debug!(entry = %shown, "skipping whiteout metadata");
            return Ok(());
        }
        let kind = classify(name).ok_or_else(|| {
            Error::new(
                ErrorKind::Invalid,
                format!("layer entry {shown} is a whiteout that names no file"),
            )
        })?;
        if kind == Whiteout::Meta {
            tracing::debug!(entry = %shown, "skipping whiteout metadata");
            return Ok(());
        }
        let parent_fd = self
            .root
            .open_dir(&parent, true, &shown)?
            .expect("open_dir with create returns a directory");
        match kind {
            Whiteout::Delete(target) => remove_all_at(parent_fd.as_fd(), target).map_err(|e| {
                self.root.io_error(
                    format!(
                        "removing {} for the whiteout {shown}",
                        parent.join(target).display()
                    ),
                    e,
                )
            }),
            Whiteout::Opaque => self.make_opaque(parent_fd, &parent, &shown),
            Whiteout::None => self.create(entry, etype, &rel, parent_fd.as_fd(), name, &shown),
            Whiteout::Meta => Ok(()),
        }
    }

    /// An entry naming the root itself (`./`): only a directory makes sense; its metadata
    /// is applied to the root.
    fn root_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        etype: EntryType,
        shown: &str,
    ) -> Result<()> {
        if etype != EntryType::Directory {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "layer entry {shown} names the layer root but is a {etype:?}, not a directory"
                ),
            ));
        }
        let meta = EntryMeta::read(entry, shown)?;
        let fd = openat(
            self.root.fd(),
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.root.io_error("opening the layer root".into(), e))?;
        set_metadata(self.root, Target::Fd(fd.as_fd()), &meta, true, shown)?;
        self.dirs.insert(RelPath::root(), meta.times);
        Ok(())
    }

    fn create<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        etype: EntryType,
        rel: &RelPath,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        shown: &str,
    ) -> Result<()> {
        let plan = plan(self.root, entry, etype, rel, shown)?;
        let meta = EntryMeta::read(entry, shown)?;
        let at =
            |what: &str, e: Errno| self.root.io_error(format!("{what} layer entry {shown}"), e);

        let existing = match statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Some(FileType::from_raw_mode(st.st_mode)),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(at("looking up the existing path of", e)),
        };
        let merge_dir = existing == Some(FileType::Directory) && matches!(plan, Plan::Dir);
        if existing.is_some() && !merge_dir {
            remove_all_at(parent, name).map_err(|e| at("removing the existing path of", e))?;
        }

        match plan {
            Plan::File => {
                let fd = openat(
                    parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| at("creating", e))?;
                let mut file = File::from(fd);
                self.copy_data(entry, &mut file, shown)?;
                set_metadata(self.root, Target::Fd(file.as_fd()), &meta, true, shown)?;
            }
            Plan::Dir => {
                if !merge_dir {
                    mkdirat(parent, name, Mode::from_raw_mode(0o700))
                        .map_err(|e| at("creating the directory of", e))?;
                }
                let fd = openat(
                    parent,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| at("opening the directory of", e))?;
                set_metadata(self.root, Target::Fd(fd.as_fd()), &meta, false, shown)?;
                self.dirs.insert(rel.clone(), meta.times);
            }
            Plan::Symlink(target) => {
                symlinkat(&target[..], parent, name).map_err(|e| at("creating the symlink", e))?;
                set_metadata(self.root, Target::Symlink(parent, name), &meta, true, shown)?;
            }
            Plan::HardLink { dir, name: target } => {
                linkat(&dir, &target[..], parent, name, AtFlags::empty())
                    .map_err(|e| at("creating the hard link", e))?;
            }
            Plan::Node { kind, major, minor } => {
                mknodat(
                    parent,
                    name,
                    kind,
                    Mode::from_raw_mode(meta.mode & 0o777),
                    makedev(major, minor),
                )
                .map_err(|e| at("creating the device node or fifo", e))?;
                set_metadata(self.root, Target::Node(parent, name), &meta, true, shown)?;
            }
        }
        for ancestor in rel.ancestors() {
            if !self.written.insert(ancestor) {
                break;
            }
        }
        self.written.insert(rel.clone());
        Ok(())
    }

    fn copy_data<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        file: &mut File,
        shown: &str,
    ) -> Result<()> {
        let expected = entry.size();
        let mut copied = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(tar_error(
                        self.root,
                        &format!("reading the data of layer entry {shown}"),
                        e,
                    ));
                }
            };
            file.write_all(&self.buf[..n]).map_err(|e| {
                self.root
                    .io_error(format!("writing layer entry {shown}"), e)
            })?;
            copied += n as u64;
        }
        if copied != expected {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "layer entry {shown} is truncated: {copied} of {expected} bytes in the tar"
                ),
            ));
        }
        Ok(())
    }

    /// Removes everything under `dir` that this layer has not written.
    fn make_opaque(&self, dir_fd: OwnedFd, dir: &RelPath, shown: &str) -> Result<()> {
        let names = list_names(dir_fd.as_fd()).map_err(|e| {
            self.root.io_error(
                format!("listing {} for the opaque marker {shown}", dir.display()),
                e,
            )
        })?;
        for name in names {
            let child = dir.join(&name);
            if !self.written.contains(&child) {
                remove_all_at(dir_fd.as_fd(), &name).map_err(|e| {
                    self.root.io_error(
                        format!("removing {} for the opaque marker {shown}", child.display()),
                        e,
                    )
                })?;
                continue;
            }
            match openat2(
                &dir_fd,
                &name,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                RESOLVE,
            ) {
                Ok(sub) => self.make_opaque(sub, &child, shown)?,
                // A non-directory (or symlink) this layer wrote: kept as is.
                Err(Errno::NOTDIR | Errno::LOOP) => {}
                Err(e) => {
                    return Err(self.root.io_error(
                        format!("opening {} for the opaque marker {shown}", child.display()),
                        e,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Sets the deferred directory times. A directory a later entry of the layer removed or
    /// replaced is skipped.
    fn finish(self) -> Result<()> {
        for (dir, times) in &self.dirs {
            match openat2(
                self.root.fd(),
                dir.as_at_arg(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                RESOLVE,
            ) {
                Ok(fd) => utimensat(&fd, ".", times, AtFlags::empty()).map_err(|e| {
                    self.root.io_error(
                        format!("setting the times of directory {}", dir.display()),
                        e,
                    )
                })?,
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => {}
                Err(e) => {
                    return Err(self
                        .root
                        .io_error(format!("opening directory {}", dir.display()), e));
                }
            }
        }
        Ok(())
    }
}
