//! Diffing a layer's tree against its parent's, like moby's `archive.ChangesDirs`, and
//! turning the changes into a layer tar ([`export_changes`]).
//!
//! Owns the rules for what counts as a change; reads both trees and never writes to them.
//!
//! Rules (moby `pkg/archive/changes.go`, `changes_unix.go`):
//! - A path only in the layer is `Add`, and so is everything under it; a path only in the
//!   parent is `Delete` (only the top: the children of a deleted directory are not listed).
//! - A path in both is `Modify` when the type, permission bits, owner or device number
//!   differ, or, for non-directories, the size or the modification time (seconds and
//!   nanoseconds), or the symlink target, the hard link count, or the carried extended
//!   attributes (`user.`, `trusted.`, `security.` but `security.selinux`; see
//!   `xattr.rs`).
//! - A directory's size and times are not compared: they change whenever an entry is
//!   added or removed. Instead a directory that is otherwise equal is listed as `Modify`
//!   when anything under it changed, so that its metadata travels with the change
//!   (moby's "changedDirs" rule). The root itself is never listed.
//! - When a directory became a non-directory, only the path is listed (`Modify`); applying
//!   the new entry removes the whole old directory. When a non-directory became a
//!   directory, its children are all `Add`.
//!
//! Deviations from moby, all stricter: moby compares only `security.capability`, not the
//! symlink target (a same-length retarget within the same second is missed), and not the
//! link count. Moby also takes two modification times as equal when their seconds match
//! and either has no nanoseconds, because a tree copied through a tar keeps whole seconds;
//! but a layer here is always a block-level snapshot of its parent, in which an untouched
//! inode keeps its exact times, and every file of a layer applied from a tar has whole
//! seconds: a write that keeps the size, in the same second as the file's time in the
//! image, would be missed by that rule and lost from a commit. Comparing the link count
//! makes hard link groups survive a round trip: adding or removing a link to an unchanged
//! file re-exports every path of that inode, and [`export_changes`] writes them as one file
//! plus hard links.

mod export;

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

pub use export::export_changes;

use crate::error::{Error, ErrorKind, Result};
use crate::xattr;

/// What happened to a path. The discriminants are the `Kind` numbers of Docker's
/// `GraphDriver.Changes` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum ChangeKind {
    /// Exists in both trees but differs (or, for a directory, something under it changed).
    Modify = 0,
    /// Exists only in the layer.
    Add = 1,
    /// Exists only in the parent.
    Delete = 2,
}

/// One changed path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Change {
    /// Absolute within the layer: `/a/b`.
    pub path: PathBuf,
    /// What happened to it.
    pub kind: ChangeKind,
}

/// The changes of tree `layer` against tree `parent` (`None`: an empty tree), sorted by
/// path, so a directory comes before everything under it. Symlinks are never followed.
pub fn changes(layer: &Path, parent: Option<&Path>) -> Result<Vec<Change>> {
    let layer_md = root_metadata(layer)?;
    let parent = match parent {
        Some(p) => Some(Node {
            metadata: root_metadata(p)?,
            path: p.to_path_buf(),
        }),
        None => None,
    };
    let mut walk = Walk { out: Vec::new() };
    let layer = Node {
        path: layer.to_path_buf(),
        metadata: layer_md,
    };
    walk.compare(Path::new("/"), &layer, parent.as_ref())?;
    let mut out = walk.out;
    out.sort();
    Ok(out)
}

/// Bytes of the regular files added or modified in `layer` against `parent`, each inode
/// counted once (moby's `ChangesSize`, which also counts symlinks' lengths; this does not).
pub fn diff_size(layer: &Path, parent: Option<&Path>) -> Result<u64> {
    let changes = changes(layer, parent)?;
    let mut seen = HashSet::new();
    let mut size = 0u64;
    for change in changes.iter().filter(|c| c.kind != ChangeKind::Delete) {
        let path = on_disk(layer, &change.path)?;
        let md = fs::symlink_metadata(&path).map_err(|e| stat_error(&path, e))?;
        if md.is_file() && (md.nlink() == 1 || seen.insert((md.dev(), md.ino()))) {
            size += md.size();
        }
    }
    Ok(size)
}

/// `layer` joined with a change path (`/a/b`), refusing anything but plain components.
fn on_disk(layer: &Path, change: &Path) -> Result<PathBuf> {
    let rel = change.strip_prefix("/").ok().filter(|rel| {
        !rel.as_os_str().is_empty()
            && rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
    });
    match rel {
        Some(rel) => Ok(layer.join(rel)),
        None => Err(Error::new(
            ErrorKind::Invalid,
            format!("change path {} is not of the form /a/b", change.display()),
        )),
    }
}

fn root_metadata(path: &Path) -> Result<Metadata> {
    let md = fs::metadata(path).map_err(|e| stat_error(path, e))?;
    if !md.is_dir() {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "{} is not a directory, so it is not a layer tree",
                path.display()
            ),
        ));
    }
    Ok(md)
}

fn stat_error(path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("reading the metadata of {}", path.display()), e)
}

struct Node {
    path: PathBuf,
    metadata: Metadata,
}

struct Walk {
    out: Vec<Change>,
}

impl Walk {
    /// Records the changes of `new` (at `rel`, `/` for the root) against `old`.
    fn compare(&mut self, rel: &Path, new: &Node, old: Option<&Node>) -> Result<()> {
        let at_entry = self.out.len();
        let is_root = rel == Path::new("/");
        let mut listed = false;
        if !is_root {
            let kind = match old {
                None => Some(ChangeKind::Add),
                Some(old) if differs(old, new)? => Some(ChangeKind::Modify),
                Some(_) => None,
            };
            if let Some(kind) = kind {
                self.out.push(Change {
                    path: rel.to_path_buf(),
                    kind,
                });
                listed = true;
            }
        }
        if !new.metadata.is_dir() {
            return Ok(());
        }
        // Only a directory's old children are compared; a non-directory that became a
        // directory has none.
        let mut old_children = match old {
            Some(old) if old.metadata.is_dir() => list(&old.path)?,
            _ => BTreeMap::new(),
        };
        for (name, child) in list(&new.path)? {
            let old_child = old_children.remove(&name);
            self.compare(&rel.join(&name), &child, old_child.as_ref())?;
        }
        for name in old_children.into_keys() {
            self.out.push(Change {
                path: rel.join(name),
                kind: ChangeKind::Delete,
            });
        }
        if self.out.len() > at_entry && !listed && !is_root {
            self.out.insert(
                at_entry,
                Change {
                    path: rel.to_path_buf(),
                    kind: ChangeKind::Modify,
                },
            );
        }
        Ok(())
    }
}

/// The entries of directory `dir` by name, with their `lstat`.
fn list(dir: &Path) -> Result<BTreeMap<OsString, Node>> {
    let read = fs::read_dir(dir)
        .map_err(|e| Error::io(format!("listing directory {}", dir.display()), e))?;
    let mut out = BTreeMap::new();
    for entry in read {
        let entry =
            entry.map_err(|e| Error::io(format!("listing directory {}", dir.display()), e))?;
        let path = entry.path();
        let metadata = fs::symlink_metadata(&path).map_err(|e| stat_error(&path, e))?;
        out.insert(entry.file_name(), Node { path, metadata });
    }
    Ok(out)
}

/// Moby's `statDifferent` plus the stricter checks in the module doc.
fn differs(old: &Node, new: &Node) -> Result<bool> {
    let (o, n) = (&old.metadata, &new.metadata);
    if o.mode() != n.mode() || o.uid() != n.uid() || o.gid() != n.gid() || o.rdev() != n.rdev() {
        return Ok(true);
    }
    if !n.is_dir() {
        let same_time = o.mtime() == n.mtime() && o.mtime_nsec() == n.mtime_nsec();
        if o.size() != n.size() || !same_time || o.nlink() != n.nlink() {
            return Ok(true);
        }
        if n.file_type().is_symlink() {
            let target = |p: &Path| {
                fs::read_link(p)
                    .map_err(|e| Error::io(format!("reading the symlink {}", p.display()), e))
            };
            if target(&old.path)? != target(&new.path)? {
                return Ok(true);
            }
        }
    }
    // Sockets cannot carry attributes in a layer (they are not exported).
    if n.file_type().is_socket() {
        return Ok(false);
    }
    let attrs = |p: &Path| {
        xattr::read_carried(p).map_err(|e| {
            Error::io(
                format!("reading the extended attributes of {}", p.display()),
                e,
            )
        })
    };
    Ok(attrs(&old.path)? != attrs(&new.path)?)
}
