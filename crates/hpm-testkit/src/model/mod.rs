//! The reference model of the engine: the oracle its property tests compare against.
//!
//! This module owns [`Model`], which stores devices by name the simplest way that can be
//! trusted, and states what the engine promises:
//!
//! - Reads return the last completed write, discard or write-zeroes of each byte.
//! - `discard` zeroes only the 4096-byte blocks lying wholly inside its range; `write_zeroes`
//!   zeroes exactly its range.
//! - `create`, `snapshot`, `remove` and `resize` are durable when they return, and each is a
//!   pool-wide flush: every device's current contents become its flushed contents.
//! - After a crash each block of each device holds its value at the last flush or one of the
//!   values it took after that; a block never written reads zeros.
//!
//! A failing operation (a [`ModelError`]) changes nothing and flushes nothing. Checks run in
//! this order: the device exists (or the name is free), it is writable, the range fits.

mod device;
mod verify;

use device::Device;
use std::collections::BTreeMap;
use std::fmt;

/// The engine's block size: the unit of discards and of crash atomicity.
pub const BLOCK_SIZE: u64 = 4096;

/// Why the engine must refuse an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelError {
    /// No device has this name.
    UnknownDevice(String),
    /// A device already has this name.
    NameExists(String),
    /// The device is a read-only snapshot.
    ReadOnly(String),
    /// `offset + len` is past the device's end (or overflows).
    OutOfRange {
        /// The device.
        name: String,
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// The device's size.
        size: u64,
    },
    /// A resize to less than the current size.
    Shrink {
        /// The device.
        name: String,
        /// The device's size.
        size: u64,
        /// The requested size.
        new_size: u64,
    },
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownDevice(n) => write!(f, "no device named '{n}'"),
            Self::NameExists(n) => write!(f, "a device named '{n}' already exists"),
            Self::ReadOnly(n) => write!(f, "device '{n}' is read-only"),
            Self::OutOfRange {
                name,
                offset,
                len,
                size,
            } => {
                write!(
                    f,
                    "{len} bytes at {offset} are past the end of '{name}' ({size} bytes)"
                )
            }
            Self::Shrink {
                name,
                size,
                new_size,
            } => {
                write!(f, "cannot shrink '{name}' from {size} to {new_size} bytes")
            }
        }
    }
}

impl std::error::Error for ModelError {}

/// Devices by name, with what each block may hold after a crash.
#[derive(Clone, Debug, Default)]
pub struct Model {
    devices: BTreeMap<String, Device>,
}

impl Model {
    /// A pool with no devices.
    pub fn new() -> Self {
        Self::default()
    }

    fn dev(&self, name: &str) -> Result<&Device, ModelError> {
        self.devices
            .get(name)
            .ok_or_else(|| ModelError::UnknownDevice(name.to_owned()))
    }

    fn free(&self, name: &str) -> Result<(), ModelError> {
        if self.devices.contains_key(name) {
            return Err(ModelError::NameExists(name.to_owned()));
        }
        Ok(())
    }

    /// Checks that `[offset, offset + len)` lies inside `dev`.
    fn in_range(name: &str, dev: &Device, offset: u64, len: u64) -> Result<(), ModelError> {
        match offset.checked_add(len) {
            Some(end) if end <= dev.size => Ok(()),
            _ => Err(ModelError::OutOfRange {
                name: name.to_owned(),
                offset,
                len,
                size: dev.size,
            }),
        }
    }

    /// The device `name`, if it exists, is writable and holds the range.
    fn writable(&mut self, name: &str, offset: u64, len: u64) -> Result<&mut Device, ModelError> {
        let dev = self.dev(name)?;
        if dev.read_only {
            return Err(ModelError::ReadOnly(name.to_owned()));
        }
        Self::in_range(name, dev, offset, len)?;
        Ok(self.devices.get_mut(name).expect("checked above"))
    }

    /// Creates an all-zero, writable device of `size` bytes. Durable; a pool-wide flush.
    pub fn create(&mut self, name: &str, size: u64) -> Result<(), ModelError> {
        self.free(name)?;
        self.flush();
        self.devices
            .insert(name.to_owned(), Device::new(size, false));
        Ok(())
    }

    /// Creates `name` holding `origin`'s current contents. Durable; a pool-wide flush.
    pub fn snapshot(
        &mut self,
        origin: &str,
        name: &str,
        read_only: bool,
    ) -> Result<(), ModelError> {
        self.dev(origin)?;
        self.free(name)?;
        self.flush();
        let snap = self.devices[origin].snapshot(read_only);
        self.devices.insert(name.to_owned(), snap);
        Ok(())
    }

    /// Deletes a device (its snapshots are independent and stay). Durable; a pool-wide flush.
    pub fn remove(&mut self, name: &str) -> Result<(), ModelError> {
        self.dev(name)?;
        self.flush();
        self.devices.remove(name);
        Ok(())
    }

    /// Grows a device (an equal size is allowed); the new space reads zeros. Durable; a
    /// pool-wide flush.
    pub fn resize(&mut self, name: &str, new_size: u64) -> Result<(), ModelError> {
        let size = self.dev(name)?.size;
        if new_size < size {
            return Err(ModelError::Shrink {
                name: name.to_owned(),
                size,
                new_size,
            });
        }
        self.flush();
        self.devices
            .get_mut(name)
            .expect("checked above")
            .grow(new_size);
        Ok(())
    }

    /// Writes `data` at any byte offset.
    pub fn write(&mut self, name: &str, offset: u64, data: &[u8]) -> Result<(), ModelError> {
        let len = data.len() as u64;
        self.writable(name, offset, len)?
            .patch(offset, len, Some(data));
        Ok(())
    }

    /// Zeroes the blocks lying wholly inside the range; partly covered blocks are unchanged.
    pub fn discard(&mut self, name: &str, offset: u64, len: u64) -> Result<(), ModelError> {
        self.writable(name, offset, len)?.discard(offset, len);
        Ok(())
    }

    /// Zeroes exactly the byte range.
    pub fn write_zeroes(&mut self, name: &str, offset: u64, len: u64) -> Result<(), ModelError> {
        self.writable(name, offset, len)?.patch(offset, len, None);
        Ok(())
    }

    /// The current contents of `[offset, offset + len)`.
    pub fn read(&self, name: &str, offset: u64, len: usize) -> Result<Vec<u8>, ModelError> {
        let dev = self.dev(name)?;
        Self::in_range(name, dev, offset, len as u64)?;
        let mut buf = vec![0; len];
        dev.read(offset, &mut buf);
        Ok(buf)
    }

    /// Pool-wide flush: every device's current contents become its flushed contents.
    pub fn flush(&mut self) {
        self.devices.values_mut().for_each(Device::flush);
    }

    /// The device's size in bytes.
    pub fn size(&self, name: &str) -> Result<u64, ModelError> {
        Ok(self.dev(name)?.size)
    }

    /// The number of blocks of the device, counting a partial last block.
    pub fn blocks(&self, name: &str) -> Result<u64, ModelError> {
        Ok(self.dev(name)?.blocks())
    }

    /// All device names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.devices.keys().cloned().collect()
    }

    /// Whether a device has this name.
    pub fn exists(&self, name: &str) -> bool {
        self.devices.contains_key(name)
    }

    /// Whether the device is a read-only snapshot.
    pub fn read_only(&self, name: &str) -> Result<bool, ModelError> {
        Ok(self.dev(name)?.read_only)
    }
}

#[cfg(test)]
mod tests;
