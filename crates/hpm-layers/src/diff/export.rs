//! Writing a list of changes as a layer tar, like moby's `archive.ExportChanges`.
//!
//! - Entries are written in path order, so a directory precedes its contents.
//! - `Delete` becomes an empty `.wh.NAME` entry (mode 0, owner 0, time 0: deterministic,
//!   where moby stamps the current time). A directory replaced by a directory is not made
//!   opaque: [`super::changes`] lists the old children that are gone as `Delete`, which
//!   gives the same tree when applied.
//! - `Add`/`Modify` write the path as it is in the layer: type, permission bits, numeric
//!   owner, modification time in whole seconds (moby truncates too, and
//!   [`super::changes`] treats a whole-second time as equal), device numbers, symlink
//!   target, carried extended attributes as PAX `SCHILY.xattr.*` records. Sockets are
//!   skipped (they cannot be in a tar).
//! - Two exported paths that share an inode: the first (in path order) carries the data,
//!   the next ones are hard link entries to it.
//!
//! Errors are returned, not logged and skipped as moby does for a running container: the
//! layer store diffs trees that nothing is writing to.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tar::{Builder, EntryType, Header};

use super::{on_disk, Change, ChangeKind};
use crate::entry_name::WHITEOUT_PREFIX;
use crate::error::{Error, ErrorKind, Result};
use crate::xattr;

/// Writes `changes` of tree `layer` to `out` as an uncompressed layer tar and returns `out`.
/// The changes need not be sorted.
pub fn export_changes<W: Write>(layer: &Path, changes: &[Change], out: W) -> Result<W> {
    let mut sorted: Vec<&Change> = changes.iter().collect();
    sorted.sort();
    let mut export = Export {
        builder: Builder::new(out),
        layer,
        first_link: HashMap::new(),
    };
    for change in sorted {
        let path = on_disk(layer, &change.path)?;
        let rel = path
            .strip_prefix(layer)
            .expect("on_disk joins onto the layer");
        match change.kind {
            ChangeKind::Delete => export.whiteout(rel)?,
            ChangeKind::Add | ChangeKind::Modify => export.entry(&path, rel)?,
        }
    }
    export
        .builder
        .into_inner()
        .map_err(|e| Error::io(format!("finishing the layer tar of {}", layer.display()), e))
}

struct Export<'a, W: Write> {
    builder: Builder<W>,
    layer: &'a Path,
    /// (dev, inode) of exported multiply-linked files -> the name that carries the data.
    first_link: HashMap<(u64, u64), PathBuf>,
}

impl<W: Write> Export<'_, W> {
    fn write_error(&self, rel: &Path, e: io::Error) -> Error {
        Error::io(
            format!(
                "writing the layer tar entry of {} (from {})",
                rel.display(),
                self.layer.display()
            ),
            e,
        )
    }

    fn whiteout(&mut self, rel: &Path) -> Result<()> {
        let name = rel.file_name().expect("change paths have a last component");
        let mut marker = OsString::from(WHITEOUT_PREFIX);
        marker.push(name);
        let path = rel.parent().unwrap_or(Path::new("")).join(marker);
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Regular);
        header.set_mode(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(0);
        self.builder
            .append_data(&mut header, &path, io::empty())
            .map_err(|e| self.write_error(&path, e))
    }

    fn entry(&mut self, path: &Path, rel: &Path) -> Result<()> {
        let md = fs::symlink_metadata(path)
            .map_err(|e| Error::io(format!("reading the metadata of {}", path.display()), e))?;
        let ft = md.file_type();
        if ft.is_socket() {
            tracing::debug!(path = %path.display(), "not exporting a socket");
            return Ok(());
        }
        let mut header = Header::new_gnu();
        header.set_mode(md.mode() & 0o7777);
        header.set_uid(u64::from(md.uid()));
        header.set_gid(u64::from(md.gid()));
        header.set_mtime(u64::try_from(md.mtime()).unwrap_or(0));
        header.set_size(0);

        if !ft.is_dir() && md.nlink() > 1 {
            let key = (md.dev(), md.ino());
            if let Some(first) = self.first_link.get(&key) {
                let first = first.clone();
                header.set_entry_type(EntryType::Link);
                return self
                    .builder
                    .append_link(&mut header, rel, &first)
                    .map_err(|e| self.write_error(rel, e));
            }
            self.first_link.insert(key, rel.to_path_buf());
        }

        let attrs = xattr::read_carried(path).map_err(|e| {
            Error::io(
                format!("reading the extended attributes of {}", path.display()),
                e,
            )
        })?;
        if !attrs.is_empty() {
            let mut records = Vec::with_capacity(attrs.len());
            for (name, value) in &attrs {
                let name = name.to_str().ok_or_else(|| {
                    Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "{} has an extended attribute whose name is not UTF-8 ({:?}); a \
                             layer tar cannot carry it",
                            path.display(),
                            name
                        ),
                    )
                })?;
                records.push((format!("{}{name}", xattr::PAX_PREFIX), value));
            }
            self.builder
                .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), &v[..])))
                .map_err(|e| self.write_error(rel, e))?;
        }

        let result = if ft.is_dir() {
            header.set_entry_type(EntryType::Directory);
            let mut name = rel.as_os_str().to_os_string();
            name.push("/");
            self.builder
                .append_data(&mut header, Path::new(&name), io::empty())
        } else if ft.is_file() {
            let file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(path)
                .map_err(|e| Error::io(format!("opening {} to export it", path.display()), e))?;
            header.set_entry_type(EntryType::Regular);
            header.set_size(md.size());
            let data = Exact {
                file,
                remaining: md.size(),
            };
            self.builder.append_data(&mut header, rel, data)
        } else if ft.is_symlink() {
            let target = fs::read_link(path)
                .map_err(|e| Error::io(format!("reading the symlink {}", path.display()), e))?;
            header.set_entry_type(EntryType::Symlink);
            self.builder.append_link(&mut header, rel, &target)
        } else if ft.is_char_device() || ft.is_block_device() {
            header.set_entry_type(if ft.is_char_device() {
                EntryType::Char
            } else {
                EntryType::Block
            });
            let rdev = md.rdev();
            header
                .set_device_major(rustix::fs::major(rdev))
                .and_then(|()| header.set_device_minor(rustix::fs::minor(rdev)))
                .and_then(|()| self.builder.append_data(&mut header, rel, io::empty()))
        } else if ft.is_fifo() {
            header.set_entry_type(EntryType::Fifo);
            self.builder.append_data(&mut header, rel, io::empty())
        } else {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{} is of an unknown file type (mode {:o})",
                    path.display(),
                    md.mode()
                ),
            ));
        };
        result.map_err(|e| self.write_error(rel, e))
    }
}

/// A file's data, exactly as long as the header says: a file that shrank while being
/// read would otherwise leave a tar whose every later entry is misaligned.
struct Exact {
    file: File,
    remaining: u64,
}

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let max = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.file.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being exported",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}
