//! The `/dev/fuse` workers: each reads requests from its own clone of the connection's
//! descriptor (`FUSE_DEV_IOC_CLONE`), answers them with `wire::dispatch`, and writes the
//! reply with one `writev`.
//!
//! They exist for one reason: a READ reply is written straight from the blocks the pool's
//! block cache holds (`Device::read_pieces`), as the iovecs of that `writev`, so a block
//! many containers share is copied once per read (by the kernel, into the reader's pages)
//! instead of twice (into a reply buffer first). fuser's reply API takes one contiguous
//! slice, so fuser only mounts and answers INIT; it then never reads the connection.
//!
//! This module owns the transport: reading, the requests that get no reply (FORGET,
//! BATCH_FORGET, NOTIFY_REPLY) or a fixed one (INTERRUPT, INIT), fuser's access rule, and
//! writing replies. What each request means is `wire`'s, shared with the io_uring workers.
//! It must never hold a request's cached blocks past its reply.

use crate::fs::DeviceFs;
use crate::wire::{
    dispatch, op, op_header_len, out_header, read_args, u32_at, u64_at, unless_panicked, Access,
    IN_HEADER,
};
use fuser::Errno;
use hpm_engine::ReadPiece;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::thread::JoinHandle;

/// Opcodes only this transport sees (the rest are in `wire::op`).
const FORGET: u32 = 2;
const INIT: u32 = 26;
const INTERRUPT: u32 = 36;
const NOTIFY_REPLY: u32 = 41;
const BATCH_FORGET: u32 = 42;

/// Bytes of a request buffer beyond `max_write`: the largest header (in header, write
/// header) with room to spare. The kernel refuses a read into less than that plus
/// `max_write`.
const HEADROOM: usize = 64 * 1024;

/// Most iovecs of one reply: the header, and at most two per 4 KiB block of a 1 MiB read
/// (a cached block and a run of the read buffer); the kernel takes up to 1024.
const MAX_IOVECS: usize = 1024;

/// Starts `threads` workers on clones of `session` (the mounted connection, INIT answered).
/// They end when the connection does (unmount or abort). Threads inherit the caller's
/// `IO_FLUSHER` state.
pub(crate) fn start(
    fs: &DeviceFs,
    session: BorrowedFd<'_>,
    threads: usize,
    max_write: u32,
    access: Access,
) -> io::Result<Vec<JoinHandle<()>>> {
    let mut workers = Vec::with_capacity(threads);
    for n in 0..threads.max(1) {
        let dev = hpm_io::fuse_dev_clone(session).map_err(|e| {
            io::Error::new(e.kind(), format!("cloning the /dev/fuse descriptor: {e}"))
        })?;
        let fs = fs.clone();
        let buf_len = max_write as usize + HEADROOM;
        workers.push(
            std::thread::Builder::new()
                .name(format!("hpm-fuse-w{n}"))
                .spawn(move || Worker::new(fs, dev, buf_len, access).run())?,
        );
    }
    Ok(workers)
}

struct Worker {
    fs: DeviceFs,
    dev: OwnedFd,
    access: Access,
    /// The request read, and (from the payload on) the reply of every request but READ.
    req: Vec<u8>,
    /// READ's own buffer, for the bytes not served from the cache.
    read_buf: Vec<u8>,
    pieces: Vec<ReadPiece>,
}

impl Worker {
    fn new(fs: DeviceFs, dev: OwnedFd, buf_len: usize, access: Access) -> Self {
        Self {
            fs,
            dev,
            access,
            req: vec![0; buf_len],
            read_buf: Vec::new(),
            pieces: Vec::new(),
        }
    }

    fn run(mut self) {
        loop {
            let n = match rustix::io::read(&self.dev, &mut self.req[..]) {
                Ok(n) => n,
                // The request went away before it was read (interrupted), or a signal.
                Err(
                    rustix::io::Errno::NOENT | rustix::io::Errno::INTR | rustix::io::Errno::AGAIN,
                ) => continue,
                // Unmounted, or the connection aborted.
                Err(rustix::io::Errno::NODEV) => return,
                Err(e) => {
                    tracing::warn!("reading /dev/fuse failed ({e}); this FUSE worker stops");
                    return;
                }
            };
            // A panic in the handling of one request (a bug) must not cost a worker: its
            // descriptor would close, the kernel would end the request with ECONNABORTED,
            // and once no worker is left requests wait until the connection ends. It is
            // answered EIO and the worker goes on. (A panic while the engine was changing
            // its state has stopped the pool: every later request fails too, with the
            // reason in the log.)
            let (unique, opcode) = match n >= IN_HEADER {
                true => (u64_at(&self.req, 8), u32_at(&self.req, 4)),
                false => (0, 0),
            };
            if unless_panicked(unique, opcode, || self.serve(n)).is_none() {
                self.pieces.clear();
                if n >= IN_HEADER {
                    self.reply_error(unique, Errno::EIO);
                }
            }
        }
    }

    /// Answers the request in `req[..n]`.
    fn serve(&mut self, n: usize) {
        if n < IN_HEADER {
            tracing::warn!(bytes = n, "a FUSE request shorter than its header; ignored");
            return;
        }
        let h = &self.req[..IN_HEADER];
        let len = (u32_at(h, 0) as usize).clamp(IN_HEADER, n);
        let (opcode, unique, nodeid, uid) =
            (u32_at(h, 4), u64_at(h, 8), u64_at(h, 16), u32_at(h, 24));
        match opcode {
            // No reply is expected.
            FORGET | BATCH_FORGET | NOTIFY_REPLY => return,
            // As fuser: interrupts are not supported (the kernel stops sending them), and a
            // second INIT is an error.
            INTERRUPT => return self.reply_error(unique, Errno::ENOSYS),
            INIT => return self.reply_error(unique, Errno::EIO),
            _ => {}
        }
        if self.access.refuses(opcode, uid) {
            return self.reply_error(unique, Errno::EACCES);
        }
        if opcode == op::READ {
            return self.read(unique, len);
        }
        let arg_end = (IN_HEADER + op_header_len(opcode).unwrap_or(0)).min(len);
        let mut arg = [0u8; 128];
        arg[..arg_end - IN_HEADER].copy_from_slice(&self.req[IN_HEADER..arg_end]);
        let in_len = len - arg_end;
        let payload = &mut self.req[arg_end..];
        match dispatch(&self.fs, opcode, nodeid, &arg, in_len, payload) {
            Ok(out_len) => {
                let header = out_header(unique, 0, out_len);
                let body = &self.req[arg_end..arg_end + out_len];
                send(
                    &self.dev,
                    unique,
                    &[IoSlice::new(&header), IoSlice::new(body)],
                );
            }
            Err(errno) => self.reply_error(unique, errno),
        }
    }

    /// READ: the reply's data goes out from the cache's blocks and the read buffer as they
    /// are, without being gathered into one buffer first.
    fn read(&mut self, unique: u64, len: usize) {
        if len < IN_HEADER + 40 {
            return self.reply_error(unique, Errno::EINVAL);
        }
        let (fh, offset, size) = read_args(&self.req[IN_HEADER..IN_HEADER + 40]);
        let (e, len) = match self.fs.read_start(fh, offset, size) {
            Ok(started) => started,
            Err(errno) => return self.reply_error(unique, errno),
        };
        let buf = hpm_io::aligned_prefix(&mut self.read_buf, len);
        if let Err(errno) = self.fs.read_pieces(&e, buf, offset, &mut self.pieces) {
            // What a failed read had gathered is let go at once, as after a reply.
            self.pieces.clear();
            return self.reply_error(unique, errno);
        }
        debug_assert_eq!(self.pieces.iter().map(ReadPiece::len).sum::<usize>(), len);
        let header = out_header(unique, 0, len);
        let mut iov: smallvec::SmallVec<[IoSlice<'_>; 64]> = smallvec::SmallVec::new();
        iov.push(IoSlice::new(&header));
        let buf: &[u8] = buf;
        iov.extend(self.pieces.iter().map(|p| IoSlice::new(p.bytes(buf))));
        let gather = iov.len() > MAX_IOVECS;
        if gather {
            drop(iov);
            // Cannot happen with a 1 MiB max_write (at most 513 pieces); gather rather than
            // fail if a larger one ever makes it so.
            let mut all = Vec::with_capacity(len);
            for p in &self.pieces {
                all.extend_from_slice(p.bytes(buf));
            }
            send(
                &self.dev,
                unique,
                &[IoSlice::new(&header), IoSlice::new(&all)],
            );
        } else {
            send(&self.dev, unique, &iov);
            drop(iov);
        }
        // The cached blocks are held no longer than the reply.
        self.pieces.clear();
    }

    fn reply_error(&self, unique: u64, errno: Errno) {
        let header = out_header(unique, -errno.code(), 0);
        send(&self.dev, unique, &[IoSlice::new(&header)]);
    }
}

/// Writes one reply (all of it or nothing: the kernel takes a reply whole). `ENOENT`: the
/// request is gone (interrupted or aborted), nothing to do. If the kernel refuses the reply
/// itself, an `EIO` reply goes instead: an unanswered request would leave its caller (a
/// loop device's I/O) waiting until the connection ends.
fn send(dev: &OwnedFd, unique: u64, iov: &[IoSlice<'_>]) {
    let header_only = iov.len() == 1;
    match write_reply(dev, iov) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => {
            tracing::warn!(unique, "writing a FUSE reply failed: {e}");
            if !header_only {
                let header = out_header(unique, -libc::EIO, 0);
                if let Err(e) = write_reply(dev, &[IoSlice::new(&header)]) {
                    tracing::warn!(unique, "writing the EIO reply instead failed too: {e}");
                }
            }
        }
    }
}

fn write_reply(dev: &OwnedFd, iov: &[IoSlice<'_>]) -> Result<(), rustix::io::Errno> {
    loop {
        match rustix::io::writev(dev.as_fd(), iov) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
}
