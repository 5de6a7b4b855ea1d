//! hpmapper's on-disk types: the superblock, the metadata-file header, the checkpoint body
//! and the journal batches, with their encodings and checksums.
//!
//! This crate owns byte layouts only. It must never do I/O or hold policy: the engine decides
//! what to write and when. `docs/design.md` is the normative description of every layout
//! here; the two change together. All integers are little-endian.

mod checkpoint;
mod codec;
mod journal;
mod superblock;

pub use checkpoint::{CheckpointState, DeviceRecord, EntryRecord};
pub use codec::{Reader, Writer};
pub use journal::{decode_batches, encode_batch, BatchScan, Record, BATCH_OVERHEAD};
pub use superblock::{MetaHeader, Superblock, FLAG_NEEDS_CHECK, SLOT_SIZE};

/// Bytes in a data block: the unit of mapping, copy-on-write and allocation.
pub const BLOCK_SIZE: u64 = 4096;
/// The on-disk format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Incompatible features this build understands (none yet). A pool with other bits set is
/// refused.
pub const KNOWN_INCOMPAT: u64 = 0;
/// Read-only-compatible features this build understands (none yet).
pub const KNOWN_RO_COMPAT: u64 = 0;
/// Smallest chunk: 64 KiB.
pub const MIN_CHUNK_BLOCKS: u32 = 16;
/// Largest chunk: 4 MiB.
pub const MAX_CHUNK_BLOCKS: u32 = 1024;
/// Sentinel for "no physical block" in split entries.
pub const NO_BLOCK: u64 = u64::MAX;
/// Largest device: 64 TiB. A device's map keeps a pointer per 64 chunks up to the highest
/// one written, so a write at the end of a device of this size costs at most 128 MiB of
/// them (64 KiB chunks); a larger size in the metadata is corruption.
pub const MAX_DEVICE_SIZE: u64 = 1 << 46;
/// Most chunks a pool holds (physical chunk numbers are 32-bit).
pub const MAX_CHUNKS: u64 = u32::MAX as u64;

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// Bytes are damaged or belong elsewhere: wrong magic, checksum, owner or range.
    #[error("{what} is corrupt: {detail}")]
    Corrupt {
        /// The structure that failed to decode.
        what: &'static str,
        /// What exactly is wrong.
        detail: String,
    },
    /// Written by a newer or unknown format version or with unknown incompatible features.
    #[error("{what} uses {detail}, which this hpmapper does not support")]
    Unsupported {
        /// The structure.
        what: &'static str,
        /// The version or features found.
        detail: String,
    },
}

impl FormatError {
    pub(crate) fn corrupt(what: &'static str, detail: impl Into<String>) -> Self {
        FormatError::Corrupt {
            what,
            detail: detail.into(),
        }
    }
}

/// CRC-32C (Castagnoli) of `bytes`: the checksum of every metadata structure.
pub fn checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Number of u64 words in a presence bitmap for `chunk_blocks` blocks.
pub fn bitmap_words(chunk_blocks: u32) -> usize {
    (chunk_blocks as usize).div_ceil(64)
}
