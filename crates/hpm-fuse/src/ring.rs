//! FUSE over io_uring: the request loop of the ring workers.
//!
//! When the kernel allows it (Linux 6.14+, `fuse.enable_uring=1`) and the export asks for it,
//! the connection negotiates `FUSE_OVER_IO_URING` at INIT and, once every CPU's queue has a
//! registered entry, the kernel sends requests through the rings instead of `/dev/fuse`: a
//! request made on CPU n goes to queue n, served by workers kept on that CPU, so neither the
//! request nor its reply has to wake the other core; each reply and the fetch of the next
//! request are one submission. Only FORGET and INTERRUPT still come through `/dev/fuse`,
//! where fuser answers them.
//!
//! This module owns the FUSE wire format of the requests that arrive here (the same
//! structures as on `/dev/fuse`, split into a header buffer and a payload buffer, see
//! `hpm_io::FuseRing`); what each request does is `fs::DeviceFs`'s, shared with the fuser
//! transport. It must never answer a request the `/dev/fuse` path would answer differently.

use crate::fs::{DeviceFs, BLOCK, OPEN_FLAGS};
use fuser::{Errno, FileAttr, FileType};
use hpm_io::{FuseRing, FUSE_RING_ENT_OFFSET, FUSE_RING_OP_OFFSET};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::SystemTime;

/// FUSE opcodes served here (include/uapi/linux/fuse.h).
mod op {
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
const OUT_HEADER: usize = 16;

/// The CPUs the kernel keeps a queue for (`num_possible_cpus()`): every one needs an entry
/// before the kernel uses the rings.
pub(crate) fn queue_count() -> io::Result<u16> {
    let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut count = 0u32;
    for range in possible.trim().split(',').filter(|r| !r.is_empty()) {
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let parse = |s: &str| s.parse::<u32>().map_err(io::Error::other);
        count += parse(hi)? - parse(lo)? + 1;
    }
    u16::try_from(count)
        .ok()
        .filter(|&c| c > 0)
        .ok_or_else(|| io::Error::other(format!("cannot use {count} possible CPUs")))
}

/// The kernel's switch for FUSE over io_uring (off by default).
pub(crate) const KERNEL_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether the running kernel lets FUSE servers use io_uring (`fuse.enable_uring`).
pub(crate) fn kernel_enabled() -> bool {
    std::fs::read_to_string(KERNEL_PARAM).is_ok_and(|v| v.trim() == "Y" || v.trim() == "1")
}

/// Workers per queue kept on the queue's CPU, registered last so that they serve a lone
/// request (the kernel hands a request to the entry that became free last). The others may
/// run on any CPU: the loop driver submits from one worker thread at a time, so at a high
/// queue depth nearly every request lands in one CPU's queue, and workers tied to that CPU
/// would leave the other cores idle (4 KiB random reads at queue depth 16 ran at 0.55x with
/// every worker tied).
const PINNED_PER_QUEUE: usize = 2;

/// The fewest workers a queue gets: its tied ones and one free to move.
pub(crate) const MIN_WORKERS_PER_QUEUE: usize = PINNED_PER_QUEUE + 1;

/// Starts `per_queue` workers (at least [`MIN_WORKERS_PER_QUEUE`]) for each of `queues` CPU
/// queues on the connection behind `dev`; returns once every entry is registered, or the
/// first error. A worker ends when the connection does (unmount or abort).
pub(crate) fn start(
    fs: &DeviceFs,
    dev: OwnedFd,
    queues: u16,
    per_queue: usize,
    payload_len: usize,
) -> io::Result<Vec<JoinHandle<()>>> {
    let dev = Arc::new(dev);
    debug_assert!(per_queue >= MIN_WORKERS_PER_QUEUE);
    let mut workers = Vec::with_capacity(usize::from(queues) * per_queue);
    for qid in 0..queues {
        for n in 0..per_queue {
            let pinned = n >= per_queue - PINNED_PER_QUEUE;
            let (fs, dev) = (fs.clone(), dev.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            let worker = std::thread::Builder::new()
                .name(format!("hpm-fuse-q{qid}.{n}"))
                .spawn(move || worker(&fs, &dev, qid, payload_len, pinned, tx))?;
            workers.push(worker);
            // One at a time: the registration order is the serving order (see above).
            rx.recv()
                .unwrap_or_else(|_| Err(io::Error::other("a FUSE io_uring worker panicked")))
                .map_err(|e| io::Error::new(e.kind(), format!("FUSE io_uring queue {qid}: {e}")))?;
        }
    }
    Ok(workers)
}

fn worker(
    fs: &DeviceFs,
    dev: &OwnedFd,
    qid: u16,
    payload_len: usize,
    pinned: bool,
    registered: std::sync::mpsc::Sender<io::Result<()>>,
) {
    // As the /dev/fuse workers (see `FuseExport::mount`), which report the state.
    let _ = hpm_io::set_io_flusher();
    if pinned {
        // Best effort: a CPU outside our cpuset just leaves the thread free to move.
        let mut cpu = rustix::thread::CpuSet::new();
        cpu.set(usize::from(qid));
        let _ = rustix::thread::sched_setaffinity(None, &cpu);
    }
    let mut ring = match FuseRing::new(payload_len).and_then(|mut ring| {
        ring.register(dev.as_fd(), qid)?;
        Ok(ring)
    }) {
        Ok(ring) => {
            let _ = registered.send(Ok(()));
            ring
        }
        Err(e) => {
            let _ = registered.send(Err(e));
            return;
        }
    };
    let mut next = ring.next_request();
    let mut failures = 0;
    loop {
        match next {
            Ok(()) => failures = 0,
            // The connection ended: unmounted or aborted.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)) => {
                return
            }
            Err(e) if failures < 3 => {
                // The entry is gone from the queue (a failed commit takes it out): put it
                // back, or the queue's CPU could be left with no entry to take requests.
                failures += 1;
                tracing::warn!(
                    qid,
                    "FUSE io_uring entry failed ({e}); registering it again"
                );
                next = ring
                    .register(dev.as_fd(), qid)
                    .and_then(|()| ring.next_request());
                continue;
            }
            Err(e) => {
                tracing::warn!(qid, "FUSE io_uring worker stopped: {e}");
                return;
            }
        }
        serve(fs, &mut ring);
        next = ring.commit_and_fetch(dev.as_fd(), qid);
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
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

/// Answers the request in the ring's buffers (the reply goes out with the next fetch).
fn serve(fs: &DeviceFs, ring: &mut FuseRing) {
    fs.ring_request();
    let (h, payload) = ring.split_mut();
    let opcode = u32_at(h, 4);
    let unique = u64_at(h, 8);
    let nodeid = u64_at(h, 16);
    let mut arg = [0u8; 128];
    arg.copy_from_slice(&h[FUSE_RING_OP_OFFSET..FUSE_RING_OP_OFFSET + 128]);
    let in_len = (u32_at(h, FUSE_RING_ENT_OFFSET + 16) as usize).min(payload.len());
    let result = dispatch(fs, opcode, nodeid, &arg, in_len, payload);
    let (error, out_len) = match result {
        Ok(n) => (0, n),
        Err(errno) => (-errno.code(), 0),
    };
    h[0..4].copy_from_slice(&((OUT_HEADER + out_len) as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&error.to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    let sz = FUSE_RING_ENT_OFFSET + 16;
    h[sz..sz + 4].copy_from_slice(&(out_len as u32).to_ne_bytes());
}

/// One request: the reply's payload length (written into `payload`) or its errno. `arg`
/// is the operation's header, `payload[..in_len]` the rest of the request.
fn dispatch(
    fs: &DeviceFs,
    opcode: u32,
    nodeid: u64,
    arg: &[u8; 128],
    in_len: usize,
    payload: &mut [u8],
) -> Result<usize, Errno> {
    match opcode {
        op::READ => {
            let (fh, offset, size) = (u64_at(arg, 0), u64_at(arg, 8), u32_at(arg, 16));
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
    fn possible_cpus_are_counted_from_the_kernel_list() {
        let n = queue_count().unwrap();
        assert!(n >= 1);
        assert!(usize::from(n) >= std::thread::available_parallelism().unwrap().get());
    }
}
