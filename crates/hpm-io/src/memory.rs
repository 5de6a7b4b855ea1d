//! An in-memory backend for unit tests and benchmarks of in-process logic.

use crate::Backend;
use parking_lot::RwLock;
use std::io;

/// A growable byte vector behind a lock. `sync` does nothing: memory is never durable.
#[derive(Default)]
pub struct MemBackend {
    bytes: RwLock<Vec<u8>>,
}

impl MemBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            bytes: RwLock::new(bytes),
        }
    }

    /// A copy of the whole contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.read().clone()
    }
}

fn end(offset: u64, len: usize) -> io::Result<usize> {
    offset
        .checked_add(len as u64)
        .and_then(|e| usize::try_from(e).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))
}

impl Backend for MemBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read();
        let end = end(offset, buf.len())?;
        buf.fill(0);
        let start = offset as usize;
        if start < bytes.len() {
            let stop = end.min(bytes.len());
            buf[..stop - start].copy_from_slice(&bytes[start..stop]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write();
        let end = end(offset, buf.len())?;
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write();
        let start = (offset as usize).min(bytes.len());
        let stop = end(offset, len as usize)?.min(bytes.len());
        bytes[start..stop].fill(0);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.bytes.write().resize(end(len, 0)?, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_end_are_zero_and_punch_zeroes() {
        let m = MemBackend::new();
        m.write_at(b"abcd", 2).unwrap();
        let mut buf = [9u8; 8];
        m.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"\0\0abcd\0\0");
        m.punch(3, 2).unwrap();
        m.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"\0\0a\0\0d\0\0");
        assert_eq!(m.len().unwrap(), 6);
    }
}
