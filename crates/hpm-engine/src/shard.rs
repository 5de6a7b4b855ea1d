//! Per-thread shards of hot, pool-wide state that every I/O touches: the read gate and the
//! engine counters.
//!
//! This module owns which shard a thread uses and the cache-line padding that keeps shards
//! apart. It must never be used for state that needs one consistent value under a single
//! lock: a shard is only ever a part of a sum (counters) or one of several locks that the
//! rare exclusive side takes all of (the gate).
//!
//! Why: a lock or counter that every read updates is one cache line that every core writes.
//! With two threads reading one device, the line moves between cores on every request; a
//! shard per thread keeps each line on its core.

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Number of shards: more than the cores we expect to serve I/O from, so that threads that
/// run at the same time rarely share one.
pub(crate) const SHARDS: usize = 16;

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard: handed out round-robin at first use, so threads started together
    /// get different shards.
    static SLOT: usize = NEXT_SLOT.fetch_add(1, Relaxed) % SHARDS;
}

/// The calling thread's shard index (below `SHARDS`).
pub(crate) fn slot() -> usize {
    SLOT.with(|s| *s)
}

/// `T` alone on its cache lines (128 bytes: adjacent-line prefetch pairs 64-byte lines).
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub T);

/// The read gate: reads hold their thread's shard shared across their data I/O; making freed
/// blocks reusable holds every shard exclusively, so it waits for every read in flight and
/// no read starts meanwhile.
pub(crate) struct Gate {
    shards: Box<[Padded<RwLock<()>>]>,
}

impl Gate {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Padded(RwLock::new(()))).collect(),
        }
    }

    /// Held by a read across its planning and data I/O. A thread holds at most one.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, ()> {
        self.shards[slot()].0.read()
    }

    /// Every shard, always in the same order (so two exclusive holders cannot deadlock).
    pub(crate) fn write(&self) -> Vec<RwLockWriteGuard<'_, ()>> {
        self.shards.iter().map(|s| s.0.write()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_fill_whole_cache_lines() {
        assert_eq!(std::mem::align_of::<Padded<RwLock<()>>>(), 128);
        assert!(slot() < SHARDS);
    }

    #[test]
    fn exclusive_gate_excludes_readers_on_every_shard() {
        let g = Gate::new();
        let w = g.write();
        for s in g.shards.iter() {
            assert!(s.0.try_read().is_none());
        }
        drop(w);
        let r = g.read();
        assert!(g.shards.iter().any(|s| s.0.try_write().is_none()));
        drop(r);
    }
}
