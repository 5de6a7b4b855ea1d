//! The superblock (two 4 KiB slots, newest valid wins) and the metadata-file header.

use crate::{
    checksum, FormatError, Reader, Writer, FORMAT_VERSION, KNOWN_INCOMPAT, KNOWN_RO_COMPAT,
};

/// Bytes in one superblock slot and in a metadata-file header.
pub const SLOT_SIZE: usize = 4096;
/// Superblock flag: the pool is (or was, at a crash) open for writing.
pub const FLAG_NEEDS_CHECK: u32 = 1;
const SB_MAGIC: &[u8; 8] = b"HPMAPSB\0";
const MH_MAGIC: &[u8; 8] = b"HPMAPMT\0";
/// Longest data path stored in the superblock.
const MAX_DATA_PATH: usize = 2048;

/// One superblock slot. See docs/design.md, "Superblock".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Which slot (0 or 1) this copy was written to.
    pub slot: u32,
    /// Incompatible feature bits.
    pub incompat: u64,
    /// Read-only-compatible feature bits.
    pub ro_compat: u64,
    /// Compatible feature bits.
    pub compat: u64,
    /// Increments on every superblock write; the valid slot with the larger one wins.
    pub sequence: u64,
    /// Random identity of the pool; every metadata structure carries it.
    pub uuid: [u8; 16],
    /// FLAG_* bits.
    pub flags: u32,
    /// Blocks per chunk.
    pub chunk_blocks: u32,
    /// 0: copy-on-write per 4 KiB block; 1: per chunk (devicemapper-like baseline).
    pub cow_granularity: u8,
    /// Data capacity in blocks.
    pub capacity_blocks: u64,
    /// Which metadata file (0 or 1) holds the live checkpoint and journal.
    pub active_meta: u32,
    /// Generation of the live checkpoint; journal batches carry it.
    pub meta_gen: u64,
    /// Length of the live checkpoint body.
    pub checkpoint_len: u64,
    /// CRC-32C of the live checkpoint body.
    pub checkpoint_crc: u32,
    /// Data store path; empty means the file `data` in the pool directory.
    pub data_path: String,
}

impl Superblock {
    /// Encodes into exactly one slot.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.bytes(SB_MAGIC);
        w.u32(FORMAT_VERSION);
        w.u32(self.slot);
        w.u64(self.incompat);
        w.u64(self.ro_compat);
        w.u64(self.compat);
        w.u64(self.sequence);
        w.bytes(&self.uuid);
        w.u32(self.flags);
        w.u32(crate::BLOCK_SIZE as u32);
        w.u32(self.chunk_blocks);
        w.u8(self.cow_granularity);
        w.bytes(&[0; 3]);
        w.u64(self.capacity_blocks);
        w.u32(self.active_meta);
        w.u32(0);
        w.u64(self.meta_gen);
        w.u64(self.checkpoint_len);
        w.u32(self.checkpoint_crc);
        assert!(
            self.data_path.len() <= MAX_DATA_PATH,
            "data path validated at create"
        );
        w.str16(&self.data_path);
        let mut buf = w.buf;
        buf.resize(SLOT_SIZE - 4, 0);
        let crc = checksum(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decodes slot `slot` from its bytes, checking magic, checksum, slot, version, features.
    pub fn decode(bytes: &[u8], slot: u32) -> Result<Self, FormatError> {
        const W: &str = "superblock";
        if bytes.len() != SLOT_SIZE {
            return Err(FormatError::corrupt(
                W,
                format!("slot {slot} is {} bytes, not {SLOT_SIZE}", bytes.len()),
            ));
        }
        if &bytes[..8] != SB_MAGIC {
            return Err(FormatError::corrupt(
                W,
                format!("slot {slot} has no superblock magic"),
            ));
        }
        let stored = u32::from_le_bytes(bytes[SLOT_SIZE - 4..].try_into().expect("4 bytes"));
        if checksum(&bytes[..SLOT_SIZE - 4]) != stored {
            return Err(FormatError::corrupt(
                W,
                format!("slot {slot} checksum mismatch"),
            ));
        }
        let mut r = Reader::new(&bytes[8..], W);
        let version = r.u32()?;
        if version != FORMAT_VERSION {
            return Err(FormatError::Unsupported {
                what: W,
                detail: format!("format version {version}"),
            });
        }
        let stored_slot = r.u32()?;
        if stored_slot != slot {
            return Err(FormatError::corrupt(
                W,
                format!("slot {slot} holds a copy written for slot {stored_slot}"),
            ));
        }
        let incompat = r.u64()?;
        let ro_compat = r.u64()?;
        let compat = r.u64()?;
        if incompat & !KNOWN_INCOMPAT != 0 {
            return Err(FormatError::Unsupported {
                what: W,
                detail: format!("incompatible features {:#x}", incompat & !KNOWN_INCOMPAT),
            });
        }
        let sequence = r.u64()?;
        let uuid: [u8; 16] = r.take(16)?.try_into().expect("16 bytes");
        let flags = r.u32()?;
        let block_size = r.u32()?;
        if u64::from(block_size) != crate::BLOCK_SIZE {
            return Err(FormatError::Unsupported {
                what: W,
                detail: format!("block size {block_size}"),
            });
        }
        let chunk_blocks = r.u32()?;
        if !(crate::MIN_CHUNK_BLOCKS..=crate::MAX_CHUNK_BLOCKS).contains(&chunk_blocks)
            || !chunk_blocks.is_power_of_two()
        {
            return Err(FormatError::corrupt(
                W,
                format!("chunk of {chunk_blocks} blocks is out of range"),
            ));
        }
        let cow_granularity = r.u8()?;
        if cow_granularity > 1 {
            return Err(FormatError::corrupt(
                W,
                format!("unknown copy-on-write granularity {cow_granularity}"),
            ));
        }
        r.take(3)?;
        let capacity_blocks = r.u64()?;
        let c = u64::from(chunk_blocks);
        if capacity_blocks % c != 0 || capacity_blocks / c > crate::MAX_CHUNKS {
            return Err(FormatError::corrupt(
                W,
                format!(
                    "capacity of {capacity_blocks} blocks is not a whole number of at most 2^32 - 1 chunks of {chunk_blocks} blocks"
                ),
            ));
        }
        let active_meta = r.u32()?;
        if active_meta > 1 {
            return Err(FormatError::corrupt(
                W,
                format!("active metadata file {active_meta} is not 0 or 1"),
            ));
        }
        r.u32()?;
        let meta_gen = r.u64()?;
        let checkpoint_len = r.u64()?;
        let checkpoint_crc = r.u32()?;
        let data_path = r.str16()?;
        Ok(Self {
            slot,
            incompat,
            ro_compat,
            compat,
            sequence,
            uuid,
            flags,
            chunk_blocks,
            cow_granularity,
            capacity_blocks,
            active_meta,
            meta_gen,
            checkpoint_len,
            checkpoint_crc,
            data_path,
        })
    }

    /// Whether writing is allowed by this build (no unknown read-only-compatible features).
    pub fn writable_by_this_build(&self) -> bool {
        self.ro_compat & !KNOWN_RO_COMPAT == 0
    }
}

/// The first 4 KiB of a metadata file: names the checkpoint that follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaHeader {
    /// Which metadata file (0 or 1) this is.
    pub file: u32,
    /// The pool's uuid.
    pub uuid: [u8; 16],
    /// Checkpoint generation.
    pub gen: u64,
    /// Checkpoint body length in bytes.
    pub checkpoint_len: u64,
    /// CRC-32C of the checkpoint body.
    pub checkpoint_crc: u32,
}

impl MetaHeader {
    /// Offset of the first journal batch after a checkpoint of `checkpoint_len` bytes.
    pub fn journal_start(checkpoint_len: u64) -> u64 {
        SLOT_SIZE as u64 + checkpoint_len.next_multiple_of(SLOT_SIZE as u64)
    }

    /// Encodes into one 4 KiB header.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.bytes(MH_MAGIC);
        w.u32(FORMAT_VERSION);
        w.u32(self.file);
        w.bytes(&self.uuid);
        w.u64(self.gen);
        w.u64(self.checkpoint_len);
        w.u32(self.checkpoint_crc);
        let mut buf = w.buf;
        buf.resize(SLOT_SIZE - 4, 0);
        let crc = checksum(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decodes and checks the header of metadata file `file`.
    pub fn decode(bytes: &[u8], file: u32) -> Result<Self, FormatError> {
        const W: &str = "metadata file header";
        if bytes.len() != SLOT_SIZE || &bytes[..8] != MH_MAGIC {
            return Err(FormatError::corrupt(
                W,
                format!("meta.{file} has no header magic"),
            ));
        }
        let stored = u32::from_le_bytes(bytes[SLOT_SIZE - 4..].try_into().expect("4 bytes"));
        if checksum(&bytes[..SLOT_SIZE - 4]) != stored {
            return Err(FormatError::corrupt(
                W,
                format!("meta.{file} header checksum mismatch"),
            ));
        }
        let mut r = Reader::new(&bytes[8..], W);
        let version = r.u32()?;
        if version != FORMAT_VERSION {
            return Err(FormatError::Unsupported {
                what: W,
                detail: format!("format version {version}"),
            });
        }
        let stored_file = r.u32()?;
        if stored_file != file {
            return Err(FormatError::corrupt(
                W,
                format!("meta.{file} holds the header of meta.{stored_file}"),
            ));
        }
        let uuid = r.take(16)?.try_into().expect("16 bytes");
        Ok(Self {
            file,
            uuid,
            gen: r.u64()?,
            checkpoint_len: r.u64()?,
            checkpoint_crc: r.u32()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            slot: 1,
            incompat: 0,
            ro_compat: 0,
            compat: 0,
            sequence: 7,
            uuid: [3; 16],
            flags: FLAG_NEEDS_CHECK,
            chunk_blocks: 128,
            cow_granularity: 0,
            capacity_blocks: 1 << 20,
            active_meta: 1,
            meta_gen: 9,
            checkpoint_len: 1234,
            checkpoint_crc: 0xdead_beef,
            data_path: "/dev/sdz".into(),
        }
    }

    #[test]
    fn superblock_round_trips() {
        let sb = sample();
        let bytes = sb.encode();
        assert_eq!(bytes.len(), SLOT_SIZE);
        assert_eq!(Superblock::decode(&bytes, 1).unwrap(), sb);
    }

    #[test]
    fn superblock_rejects_damage_wrong_slot_and_unknown_features() {
        let sb = sample();
        let mut bytes = sb.encode();
        bytes[100] ^= 1;
        assert!(matches!(
            Superblock::decode(&bytes, 1),
            Err(FormatError::Corrupt { .. })
        ));
        let bytes = sb.encode();
        let e = Superblock::decode(&bytes, 0).unwrap_err().to_string();
        assert!(e.contains("written for slot 1"), "{e}");
        let mut odd = sb.clone();
        odd.incompat = 1 << 40;
        let e = Superblock::decode(&odd.encode(), 1).unwrap_err();
        assert!(matches!(e, FormatError::Unsupported { .. }), "{e}");
    }

    #[test]
    fn meta_header_round_trips_and_knows_its_file() {
        let h = MetaHeader {
            file: 0,
            uuid: [1; 16],
            gen: 4,
            checkpoint_len: 5000,
            checkpoint_crc: 1,
        };
        let b = h.encode();
        assert_eq!(MetaHeader::decode(&b, 0).unwrap(), h);
        assert!(MetaHeader::decode(&b, 1).is_err());
        assert_eq!(MetaHeader::journal_start(5000), 4096 + 8192);
        assert_eq!(MetaHeader::journal_start(0), 4096);
    }
}
