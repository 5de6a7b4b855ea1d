//! The FUSE wire format of the requests both transports serve: what each request means and
//! how its reply is laid out, shared by the `/dev/fuse` workers (`dev`) and the io_uring
//! workers (`ring`), so that the two can never answer a request differently.
//!
//! This module owns decoding a request's operation header and encoding replies; what each
//! request does is `fs::DeviceFs`'s. It must never answer a request differently from how
//! fuser (which answers INIT, and with io_uring FORGET and INTERRUPT) would.

use crate::fs::{DeviceFs, BLOCK, OPEN_FLAGS};
use fuser::{Errno, FileAttr, FileType};
use std::time::SystemTime;

/// FUSE opcodes (include/uapi/linux/fuse.h).
pub(crate) mod op {
    pub const LOOKUP: u32 = 1;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RENAME: u32 = 12;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const DESTROY: u32 = 38;
    pub const FALLOCATE: u32 = 43;
    pub const RENAME2: u32 = 45;
}

/// `fuse_setattr_in.valid` bits.
const FATTR_MODE: u32 = 1;
const FATTR_UID: u32 = 2;
const FATTR_GID: u32 = 4;
const FATTR_SIZE: u32 = 8;
/// `fuse_out_header` bytes.
pub(crate) const OUT_HEADER: usize = 16;

/// Who may make requests beyond the ones the kernel makes for any process: as fuser's
/// `SessionACL::Owner` (everyone with `allow_other`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Access {
    /// Anyone (`allow_other`).
    All,
    /// This uid only.
    Owner(u32),
}

impl Access {
    /// fuser's rule: a request from another uid is refused (`EACCES`) unless it is one the
    /// kernel may issue without a caller's uid (I/O, release, sync).
    pub(crate) fn refuses(self, opcode: u32, uid: u32) -> bool {
        match self {
            Access::All => false,
            Access::Owner(owner) => {
                uid != owner
                    && !matches!(
                        opcode,
                        op::DESTROY
                            | op::READ
                            | op::READDIR
                            | op::WRITE
                            | op::FSYNC
                            | op::FSYNCDIR
                            | op::RELEASE
                            | op::RELEASEDIR
                    )
            }
        }
    }
}

/// `fuse_in_header` bytes: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding.
pub(crate) const IN_HEADER: usize = 40;

/// The size of the operation header that follows `fuse_in_header` in a request read from
/// `/dev/fuse` (the `fuse_*_in` struct; what the io_uring transport puts in the entry's
/// op header area); the request's remaining bytes are its payload (a name, written data).
/// None for an opcode this export does not serve (answered `ENOSYS`, whatever follows).
pub(crate) fn op_header_len(opcode: u32) -> Option<usize> {
    Some(match opcode {
        op::LOOKUP | op::UNLINK | op::STATFS | op::DESTROY => 0,
        op::GETATTR | op::FSYNC | op::FSYNCDIR | op::MKNOD | op::CREATE | op::RENAME2 => 16,
        op::SETATTR => 88,
        op::MKDIR | op::RENAME | op::OPEN | op::OPENDIR | op::ACCESS => 8,
        op::READ | op::WRITE | op::READDIR => 40,
        op::RELEASE | op::RELEASEDIR | op::FLUSH => 24,
        op::FALLOCATE => 32,
        _ => return None,
    })
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Writes `fields` one after another at the start of `out`: the bytes written.
fn put(out: &mut [u8], fields: &[&[u8]]) -> usize {
    let mut at = 0;
    for f in fields {
        out[at..at + f.len()].copy_from_slice(f);
        at += f.len();
    }
    at
}

/// `fuse_read_in`'s file handle, offset and size.
pub(crate) fn read_args(arg: &[u8]) -> (u64, u64, u32) {
    (u64_at(arg, 0), u64_at(arg, 8), u32_at(arg, 16))
}

/// `struct fuse_out_header` for a reply of `body` bytes after it.
pub(crate) fn out_header(unique: u64, error: i32, body: usize) -> [u8; OUT_HEADER] {
    let mut h = [0u8; OUT_HEADER];
    h[0..4].copy_from_slice(&((OUT_HEADER + body) as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&error.to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    h
}

/// One request: the reply's payload length (written into `payload`) or its errno. `arg`
/// is the operation's header, `payload[..in_len]` the rest of the request.
pub(crate) fn dispatch(
    fs: &DeviceFs,
    opcode: u32,
    nodeid: u64,
    arg: &[u8; 128],
    in_len: usize,
    payload: &mut [u8],
) -> Result<usize, Errno> {
    match opcode {
        op::READ => {
            let (fh, offset, size) = read_args(arg);
            let (e, len) = fs.read_start(fh, offset, size)?;
            let buf = payload.get_mut(..len).ok_or(Errno::EINVAL)?;
            fs.read_fill(&e, buf, offset)?;
            Ok(len)
        }
        op::WRITE => {
            let (fh, offset, size) = (u64_at(arg, 0), u64_at(arg, 8), u32_at(arg, 16));
            let data = payload
                .get(..size as usize)
                .filter(|_| size as usize <= in_len)
                .ok_or(Errno::EINVAL)?;
            let n = fs.write_data(fh, offset, data)?;
            // fuse_write_out { size, padding }
            Ok(put(payload, &[&n.to_ne_bytes(), &[0; 4]]))
        }
        op::FSYNC => fs.fsync_file(u64_at(arg, 0)).map(|()| 0),
        op::FLUSH | op::FSYNCDIR => {
            fs.nothing();
            Ok(0)
        }
        op::GETATTR => Ok(attr_out(payload, &fs.getattr_of(nodeid)?)),
        op::LOOKUP => {
            // The name, NUL-terminated.
            let name = &payload[..in_len];
            let name = name.split(|&b| b == 0).next().unwrap_or(name);
            let attr = fs.lookup_attr(nodeid, name)?;
            Ok(entry_out(payload, &attr))
        }
        op::SETATTR => {
            let valid = u32_at(arg, 0);
            let pick = |bit: u32, v: u32| (valid & bit != 0).then_some(v);
            let attr = fs.setattr_of(
                nodeid,
                pick(FATTR_MODE, u32_at(arg, 68)),
                pick(FATTR_UID, u32_at(arg, 76)),
                pick(FATTR_GID, u32_at(arg, 80)),
                (valid & FATTR_SIZE != 0).then_some(u64_at(arg, 16)),
            )?;
            Ok(attr_out(payload, &attr))
        }
        op::OPEN => {
            let write = u32_at(arg, 0) & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32;
            let fh = fs.open_file(nodeid, write)?;
            Ok(open_out(payload, fh, OPEN_FLAGS.bits()))
        }
        op::RELEASE => {
            fs.release_file(u64_at(arg, 0));
            Ok(0)
        }
        op::FALLOCATE => {
            let (fh, offset, len) = (u64_at(arg, 0), u64_at(arg, 8), u64_at(arg, 16));
            let mode = u32_at(arg, 24) as i32;
            fs.fallocate_file(fh, offset, len, mode).map(|()| 0)
        }
        op::ACCESS => fs.access_of(nodeid).map(|()| 0),
        op::STATFS => {
            let (blocks, files) = fs.statfs_totals();
            let b = (BLOCK as u32).to_ne_bytes();
            // fuse_kstatfs: blocks, bfree, bavail, files, ffree; bsize, namelen, frsize,
            // padding, spare[6].
            Ok(put(
                payload,
                &[
                    &blocks.to_ne_bytes(),
                    &[0; 16],
                    &files.to_ne_bytes(),
                    &[0; 8],
                    &b,
                    &255u32.to_ne_bytes(),
                    &b,
                    &[0; 28],
                ],
            ))
        }
        // As fuser answers them: an empty handle, nothing kept.
        op::OPENDIR => {
            fs.nothing();
            Ok(open_out(payload, 0, 0))
        }
        op::RELEASEDIR | op::DESTROY => {
            fs.nothing();
            Ok(0)
        }
        op::READDIR => {
            let (offset, size) = (u64_at(arg, 8), u32_at(arg, 16) as usize);
            let out = payload.get_mut(..size).ok_or(Errno::EINVAL)?;
            let mut used = 0;
            fs.read_dir(nodeid, offset, |ino, cookie, kind, name| {
                match dirent(&mut out[used..], ino, cookie, kind, name) {
                    Some(n) => {
                        used += n;
                        false
                    }
                    None => true,
                }
            })?;
            Ok(used)
        }
        op::MKNOD | op::MKDIR | op::UNLINK | op::RENAME | op::RENAME2 | op::CREATE => {
            Err(fs.refuse_name_change())
        }
        _ => {
            fs.nothing();
            Err(Errno::ENOSYS)
        }
    }
}

fn file_mode(attr: &FileAttr) -> u32 {
    let kind = match attr.kind {
        FileType::Directory => libc::S_IFDIR,
        _ => libc::S_IFREG,
    };
    kind | u32::from(attr.perm)
}

fn since_epoch(t: SystemTime) -> (u64, u32) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

/// `struct fuse_attr` (88 bytes).
fn fuse_attr(attr: &FileAttr) -> [u8; 88] {
    let (a, an) = since_epoch(attr.atime);
    let (m, mn) = since_epoch(attr.mtime);
    let (c, cn) = since_epoch(attr.ctime);
    let mut out = [0u8; 88];
    put(
        &mut out,
        &[
            &attr.ino.0.to_ne_bytes(),
            &attr.size.to_ne_bytes(),
            &attr.blocks.to_ne_bytes(),
            &a.to_ne_bytes(),
            &m.to_ne_bytes(),
            &c.to_ne_bytes(),
            &an.to_ne_bytes(),
            &mn.to_ne_bytes(),
            &cn.to_ne_bytes(),
            &file_mode(attr).to_ne_bytes(),
            &attr.nlink.to_ne_bytes(),
            &attr.uid.to_ne_bytes(),
            &attr.gid.to_ne_bytes(),
            &attr.rdev.to_ne_bytes(),
            &attr.blksize.to_ne_bytes(),
            &attr.flags.to_ne_bytes(),
        ],
    );
    out
}

/// `struct fuse_attr_out`: valid for 0 s (attributes are never cached, see `fs::TTL`).
fn attr_out(out: &mut [u8], attr: &FileAttr) -> usize {
    put(out, &[&[0; 16], &fuse_attr(attr)])
}

/// `struct fuse_entry_out`: node id = inode, generation 0, valid for 0 s.
fn entry_out(out: &mut [u8], attr: &FileAttr) -> usize {
    put(
        out,
        &[&attr.ino.0.to_ne_bytes(), &[0; 32], &fuse_attr(attr)],
    )
}

/// `struct fuse_open_out { fh, open_flags, backing_id }`.
fn open_out(out: &mut [u8], fh: u64, flags: u32) -> usize {
    put(out, &[&fh.to_ne_bytes(), &flags.to_ne_bytes(), &[0; 4]])
}

/// One `struct fuse_dirent` (padded to 8 bytes), or None if it does not fit.
fn dirent(out: &mut [u8], ino: u64, cookie: u64, kind: FileType, name: &str) -> Option<usize> {
    let dtype: u32 = match kind {
        FileType::Directory => libc::DT_DIR.into(),
        _ => libc::DT_REG.into(),
    };
    let len = (24 + name.len()).next_multiple_of(8);
    let out = out.get_mut(..len)?;
    let n = put(
        out,
        &[
            &ino.to_ne_bytes(),
            &cookie.to_ne_bytes(),
            &(name.len() as u32).to_ne_bytes(),
            &dtype.to_ne_bytes(),
            name.as_bytes(),
        ],
    );
    out[n..].fill(0);
    Some(len)
}

/// Runs `f`, the handling of request `unique` (`opcode`); `None` if it panicked (a bug),
/// which is logged: the caller answers the request EIO rather than leave it unanswered or
/// lose its worker.
pub(crate) fn unless_panicked<T>(unique: u64, opcode: u32, f: impl FnOnce() -> T) -> Option<T> {
    let p = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => return Some(v),
        Err(p) => p,
    };
    let text = p
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message");
    tracing::error!(
        unique,
        opcode,
        "handling a FUSE request panicked ({text}); answered EIO"
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dirent_is_padded_to_eight_bytes_and_refused_when_it_does_not_fit() {
        let mut out = [0xffu8; 64];
        assert_eq!(
            dirent(&mut out, 7, 3, FileType::RegularFile, "abc.img"),
            Some(32)
        );
        assert_eq!(u64_at(&out, 0), 7);
        assert_eq!(u64_at(&out, 8), 3);
        assert_eq!(u32_at(&out, 16), 7);
        assert_eq!(u32_at(&out, 20), u32::from(libc::DT_REG));
        assert_eq!(&out[24..31], b"abc.img");
        assert_eq!(out[31], 0);
        assert_eq!(
            dirent(&mut out[..31], 7, 3, FileType::RegularFile, "abc.img"),
            None
        );
    }

    #[test]
    fn only_the_owner_may_ask_for_more_than_the_kernel_asks_for_any_process() {
        let owner = Access::Owner(0);
        assert!(!owner.refuses(op::LOOKUP, 0));
        assert!(owner.refuses(op::LOOKUP, 1000));
        assert!(owner.refuses(op::OPEN, 1000));
        assert!(!owner.refuses(op::READ, 1000));
        assert!(!owner.refuses(op::WRITE, 1000));
        assert!(!owner.refuses(op::RELEASE, 1000));
        assert!(!Access::All.refuses(op::OPEN, 1000));
    }

    #[test]
    fn a_reply_header_counts_itself() {
        let h = out_header(7, -5, 100);
        assert_eq!(u32_at(&h, 0), 116);
        assert_eq!(u32_at(&h, 4) as i32, -5);
        assert_eq!(u64_at(&h, 8), 7);
    }

    #[test]
    fn operation_headers_have_the_sizes_of_the_kernel_structs() {
        // fuse_read_in and fuse_write_in: fh, offset, size, flags, lock_owner, flags, pad.
        assert_eq!(op_header_len(op::READ), Some(40));
        assert_eq!(op_header_len(op::WRITE), Some(40));
        // fuse_setattr_in: valid, pad, fh, size, lock_owner, 3 x time, 3 x nsec, mode,
        // unused, uid, gid, unused.
        assert_eq!(op_header_len(op::SETATTR), Some(88));
        // LOOKUP's only argument is the name: the payload.
        assert_eq!(op_header_len(op::LOOKUP), Some(0));
        assert_eq!(op_header_len(op::FALLOCATE), Some(32));
        // Not served here: ENOSYS.
        assert_eq!(op_header_len(22), None); // GETXATTR
    }
}
