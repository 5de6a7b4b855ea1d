//! The FUSE request handlers: one directory, one regular file per exported device.
//!
//! This module owns turning FUSE requests into device calls and engine errors into errno (in
//! exactly one function, [`errno`]). It must never hold a lock of ours across device I/O and
//! never wait for the control plane (see `table`'s locking argument); it never caches data
//! (every file is opened with `FOPEN_DIRECT_IO`, and the writeback cache is never asked for).
//!
//! File semantics, chosen to be those of a block device:
//! - size = the device's size; mode 0600 (0400 if read-only), owner root;
//! - reads past the end return what is left (0 bytes at or after the end); writes are cut at
//!   the end (a short write), and a write starting at or after it fails with `ENOSPC`;
//! - the size never changes: `truncate` to another size fails with `EPERM`, a setattr that
//!   changes nothing (or only the times, which are ignored) succeeds;
//! - `fsync`/`fdatasync` flush the device (durability); `close` (FUSE flush) does not;
//! - fallocate `PUNCH_HOLE|KEEP_SIZE` discards (unaligned edges are zeroed), `ZERO_RANGE`
//!   writes zeros (unmapping whole blocks); every other mode, including plain allocation, is
//!   `EOPNOTSUPP`.

use crate::stats::Counters;
use crate::table::{Entry, OpenError, Shared, ROOT_INO};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use std::cell::RefCell;
use std::ffi::OsStr;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Attributes and entries are not cached by the kernel: sizes can change (engine resize) and
/// names can be removed and added again; lookups are rare next to data requests.
const TTL: Duration = Duration::ZERO;
/// The block size the files report (statfs, st_blksize of the directory).
pub(crate) const BLOCK: u64 = 4096;
/// Most background requests (loop's asynchronous direct I/O) the kernel keeps in flight.
const MAX_BACKGROUND: u16 = 64;
/// Every device file is opened for direct I/O (never cached by the kernel), with parallel
/// direct writes.
pub(crate) const OPEN_FLAGS: FopenFlags =
    FopenFlags::FOPEN_DIRECT_IO.union(FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES);

const FALLOC_FL_KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
const FALLOC_FL_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
const FALLOC_FL_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;

/// The one place an engine error becomes an errno for FUSE.
pub(crate) fn errno(e: &hpm_engine::Error) -> Errno {
    Errno::from_i32(e.errno())
}

thread_local! {
    /// A worker's read buffer, grown to the largest read it served. `Device::read_at` fills
    /// every byte it is given, so it is never cleared. Reads use it from its first 4096-byte
    /// boundary ([`hpm_io::aligned_prefix`]): a data store opened with direct I/O reads into
    /// it directly, not through a bounce buffer and a copy.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Logs failed requests at most once per interval; the ones in between are counted and
/// reported with the next warning (a full pool fails every write of a busy container, and
/// the log should say so, not repeat it thousands of times a second). Every failure is
/// still counted in the `errors` counter.
struct WarnLimit {
    start: Instant,
    every_ms: u64,
    /// Milliseconds since `start` before which nothing more is logged.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl WarnLimit {
    fn new(every: Duration) -> Self {
        Self {
            start: Instant::now(),
            every_ms: every.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether to log this failure: if so, with how many were left unlogged since the last
    /// warning.
    fn admit(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + self.every_ms, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Relaxed));
        }
        self.suppressed.fetch_add(1, Relaxed);
        None
    }
}

/// The request handlers; clones share everything (the fuser session owns one, each io_uring
/// worker another).
#[derive(Clone)]
pub(crate) struct DeviceFs {
    shared: Arc<Shared>,
    max_write: u32,
    /// Ask for FUSE over io_uring at INIT.
    io_uring: bool,
    warn: Arc<WarnLimit>,
}

impl DeviceFs {
    pub fn new(shared: Arc<Shared>, max_write: u32, io_uring: bool) -> Self {
        Self {
            shared,
            max_write,
            io_uring,
            warn: Arc::new(WarnLimit::new(Duration::from_secs(1))),
        }
    }

    fn count(&self, c: &AtomicU64, n: u64) {
        Counters::add(c, n);
    }

    fn request(&self) {
        self.count(&self.shared.counters.requests, 1);
    }

    /// Counts a request that came over io_uring (besides its count as a request).
    pub(crate) fn ring_request(&self) {
        self.count(&self.shared.counters.ring_requests, 1);
    }

    /// Counts and logs a failed device call; returns its errno.
    fn failed(&self, op: &str, e: &Entry, off: u64, err: &hpm_engine::Error) -> Errno {
        self.count(&self.shared.counters.errors, 1);
        if let Some(suppressed) = self.warn.admit() {
            tracing::warn!(
                device = e.device.name(),
                op,
                offset = off,
                "FUSE request failed: {err}{}",
                match suppressed {
                    0 => String::new(),
                    n => format!(" ({n} more failed requests not logged since the last warning)"),
                }
            );
        }
        errno(err)
    }

    fn refuse(&self, errno: Errno) -> Errno {
        self.count(&self.shared.counters.errors, 1);
        errno
    }

    fn dir_attr(&self) -> FileAttr {
        let t = self.shared.mounted_at;
        FileAttr {
            ino: INodeNo(ROOT_INO),
            size: 0,
            blocks: 0,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK as u32,
            flags: 0,
        }
    }

    fn file_attr(&self, e: &Entry) -> FileAttr {
        let size = e.device.size();
        FileAttr {
            ino: INodeNo(e.ino),
            size,
            // As if fully allocated: tools that guess sparseness from st_blocks must read
            // every byte.
            blocks: size.div_ceil(512),
            atime: e.added,
            mtime: e.added,
            ctime: e.added,
            crtime: e.added,
            kind: FileType::RegularFile,
            perm: if e.device.read_only() { 0o400 } else { 0o600 },
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: self.max_write,
            flags: 0,
        }
    }

    fn attr_of(&self, ino: INodeNo) -> Option<FileAttr> {
        if ino.0 == ROOT_INO {
            return Some(self.dir_attr());
        }
        self.shared.by_ino(ino.0).map(|e| self.file_attr(&e))
    }

    /// The entry of an open handle (the I/O path: one shared lookup, no other lock).
    fn handle(&self, fh: FileHandle) -> Result<Arc<Entry>, Errno> {
        self.shared.handle(fh.0).ok_or(Errno::EBADF)
    }

    fn fallocate_inner(&self, fh: FileHandle, off: u64, len: u64, mode: i32) -> Result<(), Errno> {
        let punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        let zero = mode & !FALLOC_FL_KEEP_SIZE == FALLOC_FL_ZERO_RANGE;
        if mode != punch && !zero {
            // Plain allocation (mode 0) too: a thin device cannot reserve space.
            return Err(self.refuse(Errno::EOPNOTSUPP));
        }
        let e = self.handle(fh)?;
        let size = e.device.size();
        let end = off.checked_add(len).ok_or(Errno::EINVAL)?;
        if end > size && mode & FALLOC_FL_KEEP_SIZE == 0 {
            // Would grow the file.
            return Err(self.refuse(Errno::EFBIG));
        }
        let (off, end) = (off.min(size), end.min(size));
        let len = end - off;
        let c = &self.shared.counters;
        if mode == punch {
            self.count(&c.discards, 1);
            self.count(&c.discard_bytes, len);
            // Discard unmaps whole blocks only; a hole must read as zeros, so unaligned edges
            // are zeroed too (write_zeroes does both).
            let r = if off % BLOCK == 0 && len % BLOCK == 0 {
                e.device.discard(off, len)
            } else {
                e.device.write_zeroes(off, len)
            };
            r.map_err(|err| self.failed("punch hole", &e, off, &err))
        } else {
            self.count(&c.zero_ranges, 1);
            self.count(&c.zero_bytes, len);
            e.device
                .write_zeroes(off, len)
                .map_err(|err| self.failed("zero range", &e, off, &err))
        }
    }

    // The operations below are the whole of each request's work, shared by the two
    // transports (`/dev/fuse` through fuser, below, and io_uring in `ring`). Each counts
    // the request.

    pub(crate) fn lookup_attr(&self, parent: u64, name: &[u8]) -> Result<FileAttr, Errno> {
        self.request();
        if parent != ROOT_INO {
            return Err(Errno::ENOENT);
        }
        let name = std::str::from_utf8(name).map_err(|_| Errno::ENOENT)?;
        let e = self.shared.by_file(name).ok_or(Errno::ENOENT)?;
        Ok(self.file_attr(&e))
    }

    pub(crate) fn getattr_of(&self, ino: u64) -> Result<FileAttr, Errno> {
        self.request();
        self.attr_of(INodeNo(ino)).ok_or(Errno::ENOENT)
    }

    /// Only changes are refused: a setattr that restates the attributes (or touches only
    /// the times, which are not kept) succeeds.
    pub(crate) fn setattr_of(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
    ) -> Result<FileAttr, Errno> {
        self.request();
        let attr = self.attr_of(INodeNo(ino)).ok_or(Errno::ENOENT)?;
        let changes = mode.is_some_and(|m| m & 0o7777 != u32::from(attr.perm))
            || uid.is_some_and(|u| u != attr.uid)
            || gid.is_some_and(|g| g != attr.gid)
            || size.is_some_and(|s| s != attr.size);
        if changes {
            return Err(self.refuse(Errno::EPERM));
        }
        Ok(attr)
    }

    /// Opens a device file: its handle, to be answered with [`OPEN_FLAGS`].
    pub(crate) fn open_file(&self, ino: u64, write: bool) -> Result<u64, Errno> {
        self.request();
        if ino == ROOT_INO {
            return Err(Errno::EISDIR);
        }
        match self.shared.open(ino, write) {
            Ok(fh) => Ok(fh),
            Err(OpenError::NotFound) => Err(Errno::ENOENT),
            Err(OpenError::ReadOnly) => Err(self.refuse(Errno::EROFS)),
        }
    }

    /// Starts a read of `size` bytes at `offset`: the device and how many bytes there are
    /// to return (reads past the end return what is left). [`Self::read_fill`] reads them.
    pub(crate) fn read_start(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<(Arc<Entry>, usize), Errno> {
        self.request();
        let e = self.handle(FileHandle(fh))?;
        let len = u64::from(size).min(e.device.size().saturating_sub(offset)) as usize;
        let c = &self.shared.counters;
        self.count(&c.reads, 1);
        c.request_size(u64::from(size));
        Ok((e, len))
    }

    /// Fills `buf` (the length [`Self::read_start`] gave) from the device.
    pub(crate) fn read_fill(&self, e: &Entry, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        if buf.is_empty() {
            return Ok(());
        }
        match e.device.read_at(buf, offset) {
            Ok(()) => {
                self.count(&self.shared.counters.read_bytes, buf.len() as u64);
                Ok(())
            }
            Err(err) => Err(self.failed("read", e, offset, &err)),
        }
    }

    /// [`Self::read_fill`] through `Device::read_pieces`: `pieces` say where the bytes are,
    /// in `buf` or in the pool's block cache.
    pub(crate) fn read_pieces(
        &self,
        e: &Entry,
        buf: &mut [u8],
        offset: u64,
        pieces: &mut Vec<hpm_engine::ReadPiece>,
    ) -> Result<(), Errno> {
        pieces.clear();
        if buf.is_empty() {
            return Ok(());
        }
        match e.device.read_pieces(buf, offset, pieces) {
            Ok(()) => {
                let c = &self.shared.counters;
                self.count(&c.read_bytes, buf.len() as u64);
                let cached: usize = pieces
                    .iter()
                    .filter(|p| matches!(p, hpm_engine::ReadPiece::Cached { .. }))
                    .map(hpm_engine::ReadPiece::len)
                    .sum();
                if cached > 0 {
                    self.count(&c.read_cache_bytes, cached as u64);
                }
                Ok(())
            }
            Err(err) => Err(self.failed("read", e, offset, &err)),
        }
    }

    /// Writes `data` at `offset`, cut at the device's end: the bytes written.
    pub(crate) fn write_data(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        self.request();
        let e = self.handle(FileHandle(fh))?;
        let c = &self.shared.counters;
        self.count(&c.writes, 1);
        c.request_size(data.len() as u64);
        let dev_size = e.device.size();
        if offset >= dev_size && !data.is_empty() {
            return Err(self.refuse(Errno::ENOSPC));
        }
        let len = (data.len() as u64).min(dev_size - offset.min(dev_size)) as usize;
        match e.device.write_at(&data[..len], offset) {
            Ok(()) => {
                self.count(&c.write_bytes, len as u64);
                Ok(len as u32)
            }
            Err(err) => Err(self.failed("write", &e, offset, &err)),
        }
    }

    /// close(2) (FUSE flush) and fsyncdir: nothing to do (no durability promise; the
    /// directory has no state of its own).
    pub(crate) fn nothing(&self) {
        self.request();
    }

    pub(crate) fn release_file(&self, fh: u64) {
        self.request();
        self.shared.release(fh);
    }

    /// fsync/fdatasync: flushes the device.
    pub(crate) fn fsync_file(&self, fh: u64) -> Result<(), Errno> {
        self.request();
        let e = self.handle(FileHandle(fh))?;
        self.count(&self.shared.counters.flushes, 1);
        e.device
            .flush()
            .map_err(|err| self.failed("fsync", &e, 0, &err))
    }

    /// Lists the directory after `offset` (a cookie): `add(ino, cookie, kind, name)` for
    /// each entry until it returns true (the reply is full).
    pub(crate) fn read_dir(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, FileType, &str) -> bool,
    ) -> Result<(), Errno> {
        self.request();
        if ino != ROOT_INO {
            return Err(Errno::ENOTDIR);
        }
        let dots = [(1, ROOT_INO, "."), (2, ROOT_INO, "..")];
        for (cookie, ino, name) in dots {
            if cookie > offset && add(ino, cookie, FileType::Directory, name) {
                return Ok(());
            }
        }
        for (cookie, ino, name) in self.shared.entries_after(offset) {
            if add(ino, cookie, FileType::RegularFile, &name) {
                break;
            }
        }
        Ok(())
    }

    /// statfs: (blocks of 4096 bytes, files).
    pub(crate) fn statfs_totals(&self) -> (u64, u64) {
        self.request();
        let (bytes, files) = self.shared.totals();
        (bytes / BLOCK, files)
    }

    pub(crate) fn access_of(&self, ino: u64) -> Result<(), Errno> {
        self.request();
        self.attr_of(INodeNo(ino)).map(|_| ()).ok_or(Errno::ENOENT)
    }

    /// The directory is fixed: creating, linking, renaming or removing names is refused.
    pub(crate) fn refuse_name_change(&self) -> Errno {
        self.request();
        Errno::EPERM
    }

    pub(crate) fn fallocate_file(
        &self,
        fh: u64,
        off: u64,
        len: u64,
        mode: i32,
    ) -> Result<(), Errno> {
        self.request();
        self.fallocate_inner(FileHandle(fh), off, len, mode)
    }
}

impl Filesystem for DeviceFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_write(self.max_write) {
            tracing::warn!(
                wanted = self.max_write,
                nearest,
                "FUSE max_write out of range; using the nearest"
            );
            let _ = config.set_max_write(nearest);
        }
        // Several direct I/O requests of one file in flight at once (loop submits async I/O).
        if config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_err() {
            tracing::info!("the kernel has no FUSE_ASYNC_DIO: direct I/O is serialized");
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        if self.io_uring {
            match config.add_capabilities(InitFlags::FUSE_OVER_IO_URING) {
                Ok(()) => self.shared.io_uring.store(true, Relaxed),
                Err(_) => tracing::info!("the kernel offers no FUSE over io_uring"),
            }
        }
        // FUSE_WRITEBACK_CACHE is never requested: no double caching, fsync is a barrier.
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_attr(parent.0, name.as_encoded_bytes()) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.getattr_of(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.setattr_of(ino.0, mode, uid, gid, size) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match self.open_file(ino.0, write) {
            Ok(fh) => reply.opened(FileHandle(fh), OPEN_FLAGS),
            Err(errno) => reply.error(errno),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let (e, len) = match self.read_start(fh.0, offset, size) {
            Ok(started) => started,
            Err(errno) => return reply.error(errno),
        };
        READ_BUF.with_borrow_mut(|buf| {
            let buf = hpm_io::aligned_prefix(buf, len);
            match self.read_fill(&e, buf, offset) {
                Ok(()) => reply.data(buf),
                Err(errno) => reply.error(errno),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.write_data(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(errno) => reply.error(errno),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        self.nothing();
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_file(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fsync_file(fh.0) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.read_dir(ino.0, offset, |ino, cookie, kind, name| {
            reply.add(INodeNo(ino), cookie, kind, name)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.nothing();
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, files) = self.statfs_totals();
        // bsize 4096: the loop driver takes its discard granularity from it.
        let b = BLOCK as u32;
        reply.statfs(blocks, 0, 0, files, 0, b, 255, b);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.access_of(ino.0) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse_name_change());
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse_name_change());
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        // Devices leave the directory through the export's `remove`, never through unlink.
        reply.error(self.refuse_name_change());
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse_name_change());
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(self.refuse_name_change());
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.fallocate_file(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hpm_engine::{Error, ErrorKind};

    #[test]
    fn failure_warnings_are_limited_and_count_what_they_skip() {
        let w = WarnLimit::new(Duration::from_secs(3600));
        assert_eq!(w.admit(), Some(0));
        for _ in 0..5 {
            assert_eq!(w.admit(), None);
        }
        // The interval passes.
        w.next_ms.store(0, Relaxed);
        assert_eq!(w.admit(), Some(5));
        assert_eq!(w.admit(), None);
    }

    #[test]
    fn every_engine_error_kind_has_its_errno() {
        let table = [
            (ErrorKind::Io, libc::EIO),
            (ErrorKind::Corrupt, libc::EIO),
            (ErrorKind::NoSpace, libc::ENOSPC),
            (ErrorKind::NotFound, libc::ENOENT),
            (ErrorKind::Exists, libc::EEXIST),
            (ErrorKind::Busy, libc::EBUSY),
            (ErrorKind::Invalid, libc::EINVAL),
            (ErrorKind::ReadOnly, libc::EROFS),
            (ErrorKind::Unsupported, libc::EOPNOTSUPP),
        ];
        for (kind, want) in table {
            assert_eq!(
                errno(&Error::new(kind, "x")),
                Errno::from_i32(want),
                "{kind:?}"
            );
        }
    }
}
