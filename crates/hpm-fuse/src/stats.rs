//! Request counters of one export, bumped by the FUSE workers without locks.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters since the export was mounted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FuseStats {
    /// FUSE requests of every kind handled.
    pub requests: u64,
    /// Of those, the ones that came over io_uring (see `FuseOptions::io_uring`).
    pub ring_requests: u64,
    /// Read requests.
    pub reads: u64,
    /// Bytes returned by reads.
    pub read_bytes: u64,
    /// Of those, the bytes written into replies straight from the pool's block cache, not
    /// copied into a reply buffer first (`/dev/fuse` workers only).
    pub read_cache_bytes: u64,
    /// Write requests.
    pub writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// fsync requests (each one a device flush).
    pub flushes: u64,
    /// Punch-hole requests (discards).
    pub discards: u64,
    /// Bytes discarded.
    pub discard_bytes: u64,
    /// Zero-range requests.
    pub zero_ranges: u64,
    /// Bytes zeroed.
    pub zero_bytes: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Largest read or write request seen, in bytes (shows the negotiated `max_write`).
    pub largest_request: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub ring_requests: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub read_cache_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub discard_bytes: AtomicU64,
    pub zero_ranges: AtomicU64,
    pub zero_bytes: AtomicU64,
    pub errors: AtomicU64,
    pub largest_request: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub fn request_size(&self, n: u64) {
        self.largest_request.fetch_max(n, Relaxed);
    }

    pub fn snapshot(&self) -> FuseStats {
        FuseStats {
            requests: self.requests.load(Relaxed),
            ring_requests: self.ring_requests.load(Relaxed),
            reads: self.reads.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            read_cache_bytes: self.read_cache_bytes.load(Relaxed),
            writes: self.writes.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            discards: self.discards.load(Relaxed),
            discard_bytes: self.discard_bytes.load(Relaxed),
            zero_ranges: self.zero_ranges.load(Relaxed),
            zero_bytes: self.zero_bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            largest_request: self.largest_request.load(Relaxed),
        }
    }
}
