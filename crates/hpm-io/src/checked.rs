//! Sticky failure: after a write, sync or resize fails, every later mutation fails.
//!
//! After a failed fsync the kernel may have dropped the dirty pages it could not write, so a
//! retried fsync can succeed while data is lost. The only safe reaction is to stop accepting
//! writes until the pool is reopened and recovered from what is known to be durable.

use crate::Backend;
use parking_lot::Mutex;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

/// Wraps a backend; the first failed mutation poisons it for all later mutations.
pub struct Checked<B> {
    inner: B,
    /// Set (after `poison`) once poisoned: every write checks this, not the mutex, so
    /// concurrent writers share no written cache line on the healthy path.
    failed: AtomicBool,
    poison: Mutex<Option<String>>,
}

impl<B: Backend> Checked<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            failed: AtomicBool::new(false),
            poison: Mutex::new(None),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Why the backend is poisoned, if it is.
    pub fn poisoned(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.poison.lock().clone()
    }

    fn check(&self) -> io::Result<()> {
        if !self.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        match &*self.poison.lock() {
            Some(why) => Err(io::Error::other(format!(
                "writes refused after an earlier I/O failure ({why}); reopen the pool to recover"
            ))),
            None => Ok(()),
        }
    }

    fn guard<T>(&self, op: &str, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            let mut p = self.poison.lock();
            if p.is_none() {
                *p = Some(format!("{op} failed: {e}"));
            }
            self.failed.store(true, Ordering::Release);
        }
        r
    }
}

impl<B: Backend> Backend for Checked<B> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check()?;
        self.guard("write", self.inner.write_at(buf, offset))
    }
    fn sync(&self) -> io::Result<()> {
        self.check()?;
        self.guard("sync", self.inner.sync())
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        // A failed punch loses nothing (the bytes stay allocated, and freed blocks are
        // rewritten whole before reuse), so it does not poison.
        self.check()?;
        self.inner.punch(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check()?;
        self.guard("resize", self.inner.set_len(len))
    }
    fn resizable(&self) -> bool {
        self.inner.resizable()
    }
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        self.inner.allocated_bytes()
    }
    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.drop_cached(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemBackend;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct FailOnce {
        inner: MemBackend,
        failed: AtomicBool,
    }
    impl Backend for FailOnce {
        fn read_at(&self, b: &mut [u8], o: u64) -> io::Result<()> {
            self.inner.read_at(b, o)
        }
        fn write_at(&self, b: &[u8], o: u64) -> io::Result<()> {
            self.inner.write_at(b, o)
        }
        fn sync(&self) -> io::Result<()> {
            if !self.failed.swap(true, Ordering::SeqCst) {
                return Err(io::Error::other("disk on fire"));
            }
            Ok(())
        }
        fn punch(&self, o: u64, l: u64) -> io::Result<()> {
            self.inner.punch(o, l)
        }
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn set_len(&self, l: u64) -> io::Result<()> {
            self.inner.set_len(l)
        }
    }

    #[test]
    fn failed_sync_is_never_retried() {
        let c = Checked::new(FailOnce {
            inner: MemBackend::new(),
            failed: AtomicBool::new(false),
        });
        c.write_at(b"x", 0).unwrap();
        assert!(c.sync().is_err());
        // The inner sync would now succeed; the wrapper must not let it.
        let e = c.sync().unwrap_err().to_string();
        assert!(e.contains("disk on fire") && e.contains("reopen"), "{e}");
        assert!(c.write_at(b"y", 0).is_err());
        let mut b = [0u8; 1];
        c.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"x");
    }
}
