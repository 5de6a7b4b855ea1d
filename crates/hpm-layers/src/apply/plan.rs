//! Deciding what a non-whiteout entry creates, before the tree is touched for it: the
//! entry type, a symlink's target, a device's numbers, and a hard link's target, which
//! must already exist beneath the root and be reached without symlinks.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{statat, AtFlags, FileType};
use rustix::io::Errno;
use tar::EntryType;

use crate::beneath::Root;
use crate::entry_name::RelPath;
use crate::error::{Error, ErrorKind, Result};

/// What a non-whiteout entry creates, decided before anything is removed.
pub enum Plan {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symlink with this target.
    Symlink(Vec<u8>),
    /// A hard link to `name` in `dir`.
    HardLink { dir: OwnedFd, name: Vec<u8> },
    /// A device node or fifo.
    Node {
        kind: FileType,
        major: u32,
        minor: u32,
    },
}

/// Decides what the entry creates and checks a hard link's target, before anything of
/// the tree is changed for this entry.
pub fn plan<R: Read>(
    root: &Root,
    entry: &tar::Entry<'_, R>,
    etype: EntryType,
    rel: &RelPath,
    shown: &str,
) -> Result<Plan> {
    let invalid = |what: String| Error::new(ErrorKind::Invalid, what);
    let device = |kind: FileType| -> Result<Plan> {
        let header = entry.header();
        let field = |v: std::io::Result<Option<u32>>| {
            v.ok().flatten().ok_or_else(|| {
                invalid(format!("layer entry {shown} has no readable device number"))
            })
        };
        Ok(Plan::Node {
            kind,
            major: field(header.device_major())?,
            minor: field(header.device_minor())?,
        })
    };
    Ok(match etype {
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => Plan::File,
        EntryType::Directory => Plan::Dir,
        EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| invalid(format!("symlink {shown} has no target")))?;
            Plan::Symlink(target.into_owned())
        }
        EntryType::Link => {
            let raw = entry
                .link_name_bytes()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| invalid(format!("hard link {shown} has no target")))?;
            link_target(root, &raw, rel, shown)?
        }
        EntryType::Char => device(FileType::CharacterDevice)?,
        EntryType::Block => device(FileType::BlockDevice)?,
        EntryType::Fifo => Plan::Node {
            kind: FileType::Fifo,
            major: 0,
            minor: 0,
        },
        other => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "layer entry {shown} has tar type {other:?} ({}), which a layer \
                     cannot hold; refusing the layer",
                    other.as_byte() as char
                ),
            ));
        }
    })
}

/// Resolves a hard link's target: beneath the root, without symlinks, existing and not
/// a directory.
fn link_target(root: &Root, raw: &[u8], rel: &RelPath, shown: &str) -> Result<Plan> {
    let target_shown = format!("{:?}", String::from_utf8_lossy(raw));
    let target = RelPath::clean(raw).map_err(|_| {
        Error::new(
            ErrorKind::Escape,
            format!(
                "hard link {shown} points to {target_shown}, outside the layer root {}; \
                 refusing the layer",
                root.path().display()
            ),
        )
    })?;
    let missing = || {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "hard link {shown} points to {target_shown}, which does not exist in the \
                 layer root {} (a hard link's target must come earlier in the layer or \
                 from a lower layer)",
                root.path().display()
            ),
        )
    };
    if &target == rel {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("hard link {shown} points to itself"),
        ));
    }
    let Some((dir, name)) = target.split() else {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("hard link {shown} points to the layer root, a directory"),
        ));
    };
    let what = format!("{shown} (hard link target {target_shown})");
    let dir_fd = root.open_dir(&dir, false, &what)?.ok_or_else(missing)?;
    match statat(&dir_fd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Err(Error::new(
            ErrorKind::Invalid,
            format!("hard link {shown} points to the directory {target_shown}"),
        )),
        Ok(_) => Ok(Plan::HardLink {
            dir: dir_fd,
            name: name.as_bytes().to_vec(),
        }),
        Err(Errno::NOENT) => Err(missing()),
        Err(e) => Err(root.io_error(format!("looking up the target of hard link {shown}"), e)),
    }
}
