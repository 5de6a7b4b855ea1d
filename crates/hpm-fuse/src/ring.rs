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
//! This module owns the ring's side of the transport (the same structures as on `/dev/fuse`,
//! split into a header buffer and a payload buffer, see `hpm_io::FuseRing`); what each
//! request means and how its reply looks is `wire`'s, shared with the `/dev/fuse` workers.

use crate::fs::DeviceFs;
use crate::wire::{dispatch, out_header, u32_at, u64_at, unless_panicked, Access, OUT_HEADER};
use hpm_io::{FuseRing, FUSE_RING_ENT_OFFSET, FUSE_RING_OP_OFFSET};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

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
    access: Access,
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
                .spawn(move || worker(&fs, &dev, qid, payload_len, pinned, access, tx))?;
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
    access: Access,
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
        serve(fs, &mut ring, access);
        next = ring.commit_and_fetch(dev.as_fd(), qid);
    }
}

/// Answers the request in the ring's buffers (the reply goes out with the next fetch).
fn serve(fs: &DeviceFs, ring: &mut FuseRing, access: Access) {
    fs.ring_request();
    let (h, payload) = ring.split_mut();
    let opcode = u32_at(h, 4);
    let unique = u64_at(h, 8);
    let nodeid = u64_at(h, 16);
    let uid = u32_at(h, 24);
    let mut arg = [0u8; 128];
    arg.copy_from_slice(&h[FUSE_RING_OP_OFFSET..FUSE_RING_OP_OFFSET + 128]);
    let in_len = (u32_at(h, FUSE_RING_ENT_OFFSET + 16) as usize).min(payload.len());
    let result = if access.refuses(opcode, uid) {
        Err(fuser::Errno::EACCES)
    } else {
        // A panic (a bug) answers EIO (see `dev`).
        unless_panicked(unique, opcode, || {
            dispatch(fs, opcode, nodeid, &arg, in_len, payload)
        })
        .unwrap_or(Err(fuser::Errno::EIO))
    };
    let (error, out_len) = match result {
        Ok(n) => (0, n),
        Err(errno) => (-errno.code(), 0),
    };
    h[..OUT_HEADER].copy_from_slice(&out_header(unique, error, out_len));
    let sz = FUSE_RING_ENT_OFFSET + 16;
    h[sz..sz + 4].copy_from_slice(&(out_len as u32).to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn possible_cpus_are_counted_from_the_kernel_list() {
        let n = queue_count().unwrap();
        assert!(n >= 1);
        assert!(usize::from(n) >= std::thread::available_parallelism().unwrap().get());
    }
}
