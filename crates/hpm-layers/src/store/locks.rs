//! One mutex per layer id, created on first use and dropped when nobody holds or waits for
//! it, so the table only holds ids with a call in progress.
//!
//! The table lock is held only to find or drop an entry, never while waiting for an id's
//! mutex: a slow call on one id (mkfs, mount, applying a layer) never delays another id.
//!
//! Lock order: a call that needs two ids takes them with [`IdLocks::lock_pair`], which
//! takes them in byte order, so two such calls cannot deadlock. The only other nesting is
//! a layer id, then a base volume key (`.base-…`, never a layer id), and no call holds a
//! base key while it asks for a layer id.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{ArcMutexGuard, Mutex, RawMutex};

/// The per-id mutexes.
#[derive(Default)]
pub(super) struct IdLocks {
    table: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// Holds the mutex of one id until dropped.
pub(super) struct IdGuard<'a> {
    locks: &'a IdLocks,
    key: String,
    guard: Option<ArcMutexGuard<RawMutex, ()>>,
}

impl IdLocks {
    /// Waits for and takes the mutex of `key`.
    pub(super) fn lock(&self, key: &str) -> IdGuard<'_> {
        // Every clone of an entry's Arc is made under the table lock; see `IdGuard::drop`.
        let mutex = self
            .table
            .lock()
            .entry(key.to_string())
            .or_default()
            .clone();
        IdGuard {
            locks: self,
            key: key.to_string(),
            guard: Some(mutex.lock_arc()),
        }
    }

    /// Takes the mutexes of `a` and `b` (in byte order, see the module doc); one mutex if
    /// they are the same id.
    pub(super) fn lock_pair(&self, a: &str, b: &str) -> (IdGuard<'_>, Option<IdGuard<'_>>) {
        if a == b {
            return (self.lock(a), None);
        }
        let (first, second) = if a < b { (a, b) } else { (b, a) };
        let first = self.lock(first);
        (first, Some(self.lock(second)))
    }

    #[cfg(test)]
    fn entries(&self) -> usize {
        self.table.lock().len()
    }
}

impl Drop for IdGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut table = self.locks.table.lock();
        // Only the table's own reference left: nobody holds or waits for this id, and nobody
        // can start to without the table lock we hold.
        if table
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            table.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn same_id_excludes_and_idle_entries_go_away() {
        let locks = IdLocks::default();
        let inside = [AtomicU32::new(0), AtomicU32::new(0)];
        std::thread::scope(|s| {
            for t in 0..8 {
                let (locks, inside) = (&locks, &inside);
                s.spawn(move || {
                    for i in 0..2000 {
                        let k = (t + i) % 2;
                        let _g = locks.lock(["a", "b"][k]);
                        assert_eq!(inside[k].fetch_add(1, Ordering::SeqCst), 0);
                        std::thread::yield_now();
                        inside[k].fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert_eq!(locks.entries(), 0);
    }

    #[test]
    fn pairs_in_opposite_orders_do_not_deadlock() {
        let locks = IdLocks::default();
        std::thread::scope(|s| {
            for t in 0..4 {
                let locks = &locks;
                s.spawn(move || {
                    for _ in 0..2000 {
                        let (a, b) = if t % 2 == 0 { ("x", "y") } else { ("y", "x") };
                        let _g = locks.lock_pair(a, b);
                    }
                });
            }
        });
        let (_g, none) = locks.lock_pair("z", "z");
        assert!(none.is_none());
        drop(_g);
        assert_eq!(locks.entries(), 0);
    }
}
