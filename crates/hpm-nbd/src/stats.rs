//! Server counters: connections, requests, bytes and errors since the server was created.
//!
//! This module owns the atomic counters and their snapshot type. Counters are only ever
//! incremented (except the open-connection gauge, which a guard decrements on every exit
//! path, panics included); it must never take a lock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// A snapshot of the server's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NbdStats {
    /// Connections open now (handshake or transmission).
    pub connections_open: u64,
    /// Connections accepted since the server was created.
    pub connections_total: u64,
    /// Transmission requests received (all commands, failed ones included).
    pub requests: u64,
    /// Bytes returned by successful READs.
    pub bytes_read: u64,
    /// Bytes written by successful WRITEs.
    pub bytes_written: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Connections closed because the client broke the protocol (bad magic, oversized
    /// option or write payload, unknown client flags).
    pub protocol_errors: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    connections_open: AtomicU64,
    connections_total: AtomicU64,
    pub requests: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    pub protocol_errors: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Counts a new connection, also in `listener`'s count if given; the guard counts it
    /// closed when dropped.
    pub fn connection(self: &Arc<Self>, listener: Option<&Arc<AtomicU64>>) -> ConnectionGuard {
        self.connections_total.fetch_add(1, Relaxed);
        self.connections_open.fetch_add(1, Relaxed);
        if let Some(l) = listener {
            l.fetch_add(1, Relaxed);
        }
        ConnectionGuard(self.clone(), listener.cloned())
    }

    pub fn snapshot(&self) -> NbdStats {
        NbdStats {
            connections_open: self.connections_open.load(Relaxed),
            connections_total: self.connections_total.load(Relaxed),
            requests: self.requests.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            errors: self.errors.load(Relaxed),
            protocol_errors: self.protocol_errors.load(Relaxed),
        }
    }
}

/// Keeps a connection counted as open while alive (in its listener's count too).
pub(crate) struct ConnectionGuard(Arc<Counters>, Option<Arc<AtomicU64>>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Relaxed);
        if let Some(l) = &self.1 {
            l.fetch_sub(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_connections_go_down_when_the_guard_drops() {
        let c = Arc::new(Counters::default());
        let listener = Arc::new(AtomicU64::new(0));
        let g1 = c.connection(None);
        let g2 = c.connection(Some(&listener));
        assert_eq!(c.snapshot().connections_open, 2);
        assert_eq!(listener.load(Relaxed), 1);
        drop(g1);
        drop(g2);
        let s = c.snapshot();
        assert_eq!((s.connections_open, s.connections_total), (0, 2));
        assert_eq!(listener.load(Relaxed), 0);
    }
}
