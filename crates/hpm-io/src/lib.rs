//! Storage backends: the only place hpmapper touches a file descriptor for pool data or
//! metadata.
//!
//! This crate owns the [`Backend`] trait and its implementations for regular files, block
//! devices and memory, and [`Checked`], the wrapper that makes a failed write or sync sticky.
//! It must never interpret what it stores: layouts belong to `hpm-format`, policy to
//! `hpm-engine`.

mod checked;
mod file;
mod fuse_dev;
mod fuse_ring;
mod io_flusher;
pub mod loopdev;
mod memory;
pub mod socket;

pub use checked::Checked;
pub use file::{aligned_prefix, FileBackend, IoMode, DIRECT_ALIGN};
pub use fuse_dev::fuse_dev_clone;
pub use fuse_ring::{FuseRing, FUSE_RING_ENT_OFFSET, FUSE_RING_HEADER_LEN, FUSE_RING_OP_OFFSET};
pub use io_flusher::{is_io_flusher, set_io_flusher};
pub use memory::MemBackend;

use std::io;

/// A byte-addressed store with the durability contract of a disk.
///
/// A completed `write_at` is visible to every later `read_at`; it is durable only after a
/// later `sync` returns `Ok`. Implementations must be safe to call from many threads at once.
pub trait Backend: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`. Bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the store if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Frees the byte range; it reads as zeros afterwards. Never changes the length.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Sets the length (truncates or extends with zeros). Durable after `sync`.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Whether `set_len` can change the length at all (a block device cannot): asked before
    /// a resize that would otherwise fail, and poison a checked store, for nothing.
    fn resizable(&self) -> bool {
        true
    }
    /// Whether the store is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Bytes the store really occupies (allocated blocks of a sparse file), if known.
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }
    /// A hint that the byte range will not be read again soon: a cache below the store (the
    /// host page cache of a file) may drop it. Changes no data; the default does nothing.
    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
}

impl<T: Backend + ?Sized> Backend for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn resizable(&self) -> bool {
        (**self).resizable()
    }
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        (**self).allocated_bytes()
    }
    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).drop_cached(offset, len)
    }
}

impl<T: Backend + ?Sized> Backend for Box<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn resizable(&self) -> bool {
        (**self).resizable()
    }
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        (**self).allocated_bytes()
    }
    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).drop_cached(offset, len)
    }
}
