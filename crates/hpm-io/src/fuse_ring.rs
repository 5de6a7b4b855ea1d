//! FUSE over io_uring (Linux 6.14 and later): the transport of one FUSE worker thread.
//!
//! With `/dev/fuse` a worker reads a request with one system call and writes the reply with
//! another, and the kernel hands each request to whichever worker is waiting. Over io_uring
//! the kernel keeps one queue per CPU; a worker registers a ring entry (a header buffer and
//! a payload buffer) with one queue, and the kernel puts a request made on that CPU into it.
//! The worker answers in the same buffers and fetches the next request with one submission
//! (`COMMIT_AND_FETCH`). See the kernel's `Documentation/filesystems/fuse/fuse-io-uring.rst`.
//!
//! This module owns one io_uring instance with exactly one entry and its buffers; the FUSE
//! protocol inside the buffers belongs to `hpm-fuse`. The ring must be created, used and
//! dropped on one thread (it is set up single-issuer, and the kernel copies requests into
//! the buffers from that thread's context).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use rustix::io_uring::{
    io_uring_enter, io_uring_params, io_uring_setup, IoringEnterFlags, IoringFeatureFlags,
    IoringSetupFlags, IORING_OFF_SQES, IORING_OFF_SQ_RING,
};
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};

/// Bytes of `struct fuse_uring_req_header`: the request's `fuse_in_header` (and later the
/// reply's `fuse_out_header`) in the first 128, the operation's own header in the next 128,
/// then `struct fuse_uring_ent_in_out`.
pub const FUSE_RING_HEADER_LEN: usize = 288;
/// Offset of the operation header (`op_in`) in the header buffer.
pub const FUSE_RING_OP_OFFSET: usize = 128;
/// Offset of `fuse_uring_ent_in_out` (flags u64, commit_id u64, payload_sz u32, ...).
pub const FUSE_RING_ENT_OFFSET: usize = 256;

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `IORING_OP_URING_CMD`.
const OP_URING_CMD: u8 = 46;
const SQE_LEN: usize = 128;
const CQE_LEN: usize = 16;
const ALIGN: usize = 4096;

/// One io_uring instance with one FUSE ring entry: the header buffer and a payload buffer
/// of at least the connection's largest request.
pub struct FuseRing {
    ring: OwnedFd,
    /// The SQ and CQ rings (one mapping: `IORING_FEAT_SINGLE_MMAP`).
    _rings: Mapping,
    sqes: Mapping,
    sq_tail: NonNull<AtomicU32>,
    sq_mask: u32,
    sq_array: NonNull<u32>,
    cq_head: NonNull<AtomicU32>,
    cq_tail: NonNull<AtomicU32>,
    cq_mask: u32,
    cqes: NonNull<u8>,
    /// Header (first `ALIGN` bytes) and payload, 4096-aligned so that direct I/O can read
    /// into the payload.
    buf: NonNull<u8>,
    buf_layout: std::alloc::Layout,
    payload_len: usize,
    /// The two iovecs the kernel reads at registration (`sqe->addr`).
    iov: Box<[libc::iovec; 2]>,
    /// Whether the kernel may still write into `buf` (an entry is registered and its
    /// completion was not seen): `buf` is then leaked on drop rather than freed.
    in_kernel: bool,
    /// A request that arrived during [`FuseRing::register`] (its completion's result).
    early: Option<i32>,
}

struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<Mapping> {
        // SAFETY: a new shared mapping of the io_uring fd at a kernel-defined offset; nothing
        // else refers to the address range it returns.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::POPULATE,
                fd,
                offset,
            )
        }?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap"))?;
        Ok(Mapping { ptr, len })
    }

    /// A pointer `offset` bytes into the mapping, checked against its length.
    fn at<T>(&self, offset: u32) -> io::Result<NonNull<T>> {
        let offset = offset as usize;
        if offset + std::mem::size_of::<T>() > self.len
            || !offset.is_multiple_of(std::mem::align_of::<T>())
        {
            return Err(io::Error::other("io_uring ring offset out of range"));
        }
        // SAFETY: in bounds of the mapping (checked above).
        Ok(unsafe { self.ptr.add(offset) }.cast())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `Mapping::new` and nothing points into it any more
        // (the ring's pointers die with the ring that owns this mapping).
        let _ = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl FuseRing {
    /// A ring whose payload buffer holds `payload_len` bytes (the connection's `max_write`
    /// or `max_pages` x 4096, whichever is larger; the kernel refuses smaller ones).
    pub fn new(payload_len: usize) -> io::Result<FuseRing> {
        let mut params = io_uring_params::default();
        // SQE128: the FUSE command (`struct fuse_uring_cmd_req`) does not fit a 64-byte SQE.
        // Single issuer with deferred task work: requests are copied in only while this
        // thread waits in io_uring_enter, which it does whenever it has nothing else to do.
        params.flags = IoringSetupFlags::SQE128
            | IoringSetupFlags::SINGLE_ISSUER
            | IoringSetupFlags::DEFER_TASKRUN;
        // SAFETY: `params` is a valid, zero-initialised io_uring_params.
        let ring = unsafe { io_uring_setup(2, &mut params) }?;
        if !params.features.contains(IoringFeatureFlags::SINGLE_MMAP) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring without IORING_FEAT_SINGLE_MMAP",
            ));
        }
        let sq_len = params.sq_off.array as usize + params.sq_entries as usize * 4;
        let cq_len = params.cq_off.cqes as usize + params.cq_entries as usize * CQE_LEN;
        let rings = Mapping::new(ring.as_fd(), sq_len.max(cq_len), IORING_OFF_SQ_RING)?;
        let sqes = Mapping::new(
            ring.as_fd(),
            params.sq_entries as usize * SQE_LEN,
            IORING_OFF_SQES,
        )?;
        // SAFETY: reads of the ring sizes the kernel wrote into the mapping.
        let (sq_mask, cq_mask) = unsafe {
            (
                rings.at::<u32>(params.sq_off.ring_mask)?.read(),
                rings.at::<u32>(params.cq_off.ring_mask)?.read(),
            )
        };
        let (sq_tail, sq_array) = (
            rings.at(params.sq_off.tail)?,
            rings.at(params.sq_off.array)?,
        );
        let (cq_head, cq_tail) = (rings.at(params.cq_off.head)?, rings.at(params.cq_off.tail)?);
        let cqes = rings.at(params.cq_off.cqes)?;
        // Allocated last: nothing after it can fail and leak it.
        let payload_len = payload_len.next_multiple_of(ALIGN);
        let buf_layout = std::alloc::Layout::from_size_align(ALIGN + payload_len, ALIGN)
            .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size.
        let buf = NonNull::new(unsafe { std::alloc::alloc_zeroed(buf_layout) })
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let iov = Box::new([
            libc::iovec {
                iov_base: buf.as_ptr().cast(),
                iov_len: FUSE_RING_HEADER_LEN,
            },
            libc::iovec {
                // SAFETY: within the allocation of ALIGN + payload_len bytes.
                iov_base: unsafe { buf.as_ptr().add(ALIGN) }.cast(),
                iov_len: payload_len,
            },
        ]);
        Ok(FuseRing {
            sq_tail,
            sq_array,
            cq_head,
            cq_tail,
            cqes,
            sq_mask,
            cq_mask,
            ring,
            _rings: rings,
            sqes,
            buf,
            buf_layout,
            payload_len,
            iov,
            in_kernel: false,
            early: None,
        })
    }

    /// Registers the entry with queue `qid` of the FUSE connection behind `dev` (a
    /// `/dev/fuse` descriptor of a connection that negotiated `FUSE_OVER_IO_URING`). Returns
    /// once the kernel has it, or with the kernel's refusal: the kernel hands a queue's next
    /// request to the entry that became free last, so registration order decides which
    /// worker serves a lone request. [`FuseRing::next_request`] waits for the first request.
    pub fn register(&mut self, dev: BorrowedFd<'_>, qid: u16) -> io::Result<()> {
        self.submit(dev, CMD_REGISTER, qid, 0, false)?;
        // A refusal completes during the submission; so may a request already queued.
        match self.reap() {
            Some(res) if res < 0 => {
                self.in_kernel = false;
                Err(io::Error::from_raw_os_error(-res))
            }
            early => {
                self.early = early;
                Ok(())
            }
        }
    }

    /// Waits for the request after [`FuseRing::register`].
    pub fn next_request(&mut self) -> io::Result<()> {
        match self.early.take() {
            Some(_) => {
                self.in_kernel = false;
                Ok(())
            }
            None => self.wait(),
        }
    }

    /// Sends the reply in the buffers (the `fuse_out_header` at the start of the header,
    /// `payload_sz` and the payload) and waits for the next request.
    pub fn commit_and_fetch(&mut self, dev: BorrowedFd<'_>, qid: u16) -> io::Result<()> {
        let h = self.header();
        let at = FUSE_RING_ENT_OFFSET + 8;
        let commit_id = u64::from_ne_bytes(h[at..at + 8].try_into().expect("8 bytes"));
        self.submit(dev, CMD_COMMIT_AND_FETCH, qid, commit_id, true)?;
        self.wait()
    }

    /// The header buffer ([`FUSE_RING_HEADER_LEN`] bytes).
    fn header(&self) -> &[u8] {
        // SAFETY: the first ALIGN >= FUSE_RING_HEADER_LEN bytes of `buf`; the kernel writes
        // them only while a submission is in flight, and every submission takes `&mut self`.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr(), FUSE_RING_HEADER_LEN) }
    }

    /// The header and the payload buffer (4096-aligned), to read a request and write its
    /// reply.
    pub fn split_mut(&mut self) -> (&mut [u8], &mut [u8]) {
        // SAFETY: two disjoint ranges of `buf` (the header in the first ALIGN bytes, the
        // payload after them), as in `header`; `&mut self` makes them the only references.
        unsafe {
            (
                std::slice::from_raw_parts_mut(self.buf.as_ptr(), FUSE_RING_HEADER_LEN),
                std::slice::from_raw_parts_mut(self.buf.as_ptr().add(ALIGN), self.payload_len),
            )
        }
    }

    /// Queues the command and submits it; with `and_wait`, in the same system call that
    /// then waits for a completion (which [`FuseRing::wait`] collects).
    fn submit(
        &mut self,
        dev: BorrowedFd<'_>,
        cmd_op: u32,
        qid: u16,
        commit_id: u64,
        and_wait: bool,
    ) -> io::Result<()> {
        let mut sqe = [0u8; SQE_LEN];
        sqe[0] = OP_URING_CMD;
        sqe[4..8].copy_from_slice(&dev.as_raw_fd().to_ne_bytes());
        sqe[8..12].copy_from_slice(&cmd_op.to_ne_bytes());
        sqe[16..24].copy_from_slice(&(self.iov.as_ptr() as u64).to_ne_bytes());
        sqe[24..28].copy_from_slice(&2u32.to_ne_bytes());
        // The command area (offset 48): struct fuse_uring_cmd_req { flags, commit_id, qid }.
        sqe[56..64].copy_from_slice(&commit_id.to_ne_bytes());
        sqe[64..66].copy_from_slice(&qid.to_ne_bytes());
        // SAFETY: the SQ tail pointer comes from the kernel's offsets into our mapping.
        let tail = unsafe { self.sq_tail.as_ref().load(Ordering::Relaxed) };
        // SAFETY: as above; one SQE is ever in flight, so slot (tail & mask) is free; the
        // tail store publishes it.
        unsafe {
            let index = tail & self.sq_mask;
            std::ptr::copy_nonoverlapping(
                sqe.as_ptr(),
                self.sqes.ptr.as_ptr().add(index as usize * SQE_LEN),
                SQE_LEN,
            );
            self.sq_array
                .as_ptr()
                .add(index as usize)
                .write_volatile(index);
            self.sq_tail
                .as_ref()
                .store(tail.wrapping_add(1), Ordering::Release);
        }
        let was_in_kernel = std::mem::replace(&mut self.in_kernel, true);
        let (min_complete, flags) = match and_wait {
            true => (1, IoringEnterFlags::GETEVENTS),
            false => (0, IoringEnterFlags::empty()),
        };
        loop {
            // SAFETY: the ring fd is ours; the SQE points at `iov` and `buf`, which live as
            // long as the ring (and are leaked rather than freed while `in_kernel`).
            match unsafe { io_uring_enter(&self.ring, 1, min_complete, flags) } {
                // Submitted (a wait interrupted after the submission still returns 1).
                Ok(1) => return Ok(()),
                Err(rustix::io::Errno::INTR) => {}
                refused => {
                    // Nothing was consumed (an error means no submission): take the SQE
                    // back, or the next call would submit it ahead of its own.
                    // SAFETY: as above; the kernel has not read past the old tail.
                    unsafe { self.sq_tail.as_ref().store(tail, Ordering::Release) };
                    self.in_kernel = was_in_kernel;
                    return Err(match refused {
                        Err(e) => e.into(),
                        Ok(_) => io::Error::other("io_uring took no submission"),
                    });
                }
            }
        }
    }

    /// Waits for the completion of the command in flight: Ok once a request is in the
    /// buffers, else the kernel's error (`ENOTCONN` once the connection has ended).
    fn wait(&mut self) -> io::Result<()> {
        loop {
            if let Some(res) = self.reap() {
                self.in_kernel = false;
                return if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(())
                };
            }
            // SAFETY: as in `submit`; nothing to submit, only waits.
            match unsafe { io_uring_enter(&self.ring, 0, 1, IoringEnterFlags::GETEVENTS) } {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The result of the one completion, if it has arrived.
    fn reap(&mut self) -> Option<i32> {
        // SAFETY: CQ ring pointers from the kernel's offsets into our mapping; the acquire
        // load of the tail orders the read of the CQE after the kernel's write of it.
        unsafe {
            let head = self.cq_head.as_ref().load(Ordering::Relaxed);
            let tail = self.cq_tail.as_ref().load(Ordering::Acquire);
            if head == tail {
                return None;
            }
            let cqe = self
                .cqes
                .as_ptr()
                .add((head & self.cq_mask) as usize * CQE_LEN);
            let res = cqe.add(8).cast::<i32>().read_volatile();
            self.cq_head
                .as_ref()
                .store(head.wrapping_add(1), Ordering::Release);
            Some(res)
        }
    }
}

impl Drop for FuseRing {
    fn drop(&mut self) {
        if self.in_kernel {
            // The kernel may still copy a request into the buffers: never free them.
            return;
        }
        // SAFETY: allocated in `new` with this layout; no submission refers to it any more.
        unsafe { std::alloc::dealloc(self.buf.as_ptr(), self.buf_layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_on_a_file_that_is_not_fuse_fails_cleanly() {
        let mut ring = FuseRing::new(100_000).unwrap();
        let (header, payload) = ring.split_mut();
        assert_eq!(header.len(), FUSE_RING_HEADER_LEN);
        // Rounded up to whole pages, and aligned for direct I/O.
        assert_eq!(payload.len(), 102_400);
        assert_eq!(payload.as_ptr() as usize % ALIGN, 0);
        // A regular file (not /dev/null, which answers every command with 0).
        let not_fuse = tempfile::tempfile().unwrap();
        let e = ring.register(not_fuse.as_fd(), 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}");
        // The ring is usable again after a failed command.
        assert!(ring.register(not_fuse.as_fd(), 0).is_err());
    }
}
