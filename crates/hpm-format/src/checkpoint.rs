//! The checkpoint body: every device and every map entry, as of one generation.

use crate::{bitmap_words, FormatError, Reader, Writer};

const MAGIC: u32 = u32::from_le_bytes(*b"HPCK");

/// A map entry as stored: one per mapped virtual chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryRecord {
    /// Block i of the chunk, when its bit is set, is block i of physical chunk `pchunk`.
    Compact {
        /// Physical chunk index.
        pchunk: u32,
        /// Presence bitmap, `bitmap_words(chunk_blocks)` words, bit i = block i.
        present: Vec<u64>,
    },
    /// One physical block (or `NO_BLOCK`) per block of the chunk.
    Split {
        /// `chunk_blocks` physical block numbers.
        blocks: Vec<u64>,
    },
}

/// One device as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Device id.
    pub id: u32,
    /// Unique name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Refuses writes.
    pub read_only: bool,
    /// Name of the device it was snapshotted from ("" if none).
    pub origin: String,
    /// Mapped virtual chunks in ascending order.
    pub entries: Vec<(u64, EntryRecord)>,
}

/// The whole metadata state at a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckpointState {
    /// The id the next new device gets.
    pub next_device_id: u32,
    /// Every device.
    pub devices: Vec<DeviceRecord>,
}

impl CheckpointState {
    /// Encodes the body; `chunk_blocks` fixes entry sizes.
    pub fn encode(&self, chunk_blocks: u32) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(MAGIC);
        w.u32(self.next_device_id);
        w.u64(self.devices.len() as u64);
        for d in &self.devices {
            w.u32(d.id);
            w.str16(&d.name);
            w.u64(d.size);
            w.u8(d.read_only as u8);
            w.str16(&d.origin);
            w.u64(d.entries.len() as u64);
            for (vchunk, e) in &d.entries {
                w.u64(*vchunk);
                match e {
                    EntryRecord::Compact { pchunk, present } => {
                        w.u8(1);
                        w.u32(*pchunk);
                        debug_assert_eq!(present.len(), bitmap_words(chunk_blocks));
                        present.iter().for_each(|&x| w.u64(x));
                    }
                    EntryRecord::Split { blocks } => {
                        w.u8(2);
                        debug_assert_eq!(blocks.len(), chunk_blocks as usize);
                        blocks.iter().for_each(|&x| w.u64(x));
                    }
                }
            }
        }
        w.buf
    }

    /// Decodes a body whose checksum the caller has verified.
    pub fn decode(bytes: &[u8], chunk_blocks: u32) -> Result<Self, FormatError> {
        const W: &str = "checkpoint";
        let mut r = Reader::new(bytes, W);
        if r.u32()? != MAGIC {
            return Err(FormatError::corrupt(W, "bad magic"));
        }
        let next_device_id = r.u32()?;
        let n = r.count(16)?;
        let mut devices = Vec::with_capacity(n);
        for _ in 0..n {
            let id = r.u32()?;
            let name = r.str16()?;
            let size = r.u64()?;
            let read_only = r.u8()? != 0;
            let origin = r.str16()?;
            let m = r.count(13)?;
            let mut entries = Vec::with_capacity(m);
            for _ in 0..m {
                let vchunk = r.u64()?;
                let at = r.pos();
                let e = match r.u8()? {
                    1 => {
                        let pchunk = r.u32()?;
                        let present = (0..bitmap_words(chunk_blocks))
                            .map(|_| r.u64())
                            .collect::<Result<_, _>>()?;
                        EntryRecord::Compact { pchunk, present }
                    }
                    2 => {
                        let blocks = (0..chunk_blocks)
                            .map(|_| r.u64())
                            .collect::<Result<_, _>>()?;
                        EntryRecord::Split { blocks }
                    }
                    k => {
                        return Err(FormatError::corrupt(
                            W,
                            format!("device {name:?}: unknown entry kind {k} at offset {at}"),
                        ))
                    }
                };
                entries.push((vchunk, e));
            }
            devices.push(DeviceRecord {
                id,
                name,
                size,
                read_only,
                origin,
                entries,
            });
        }
        if r.remaining() != 0 {
            return Err(FormatError::corrupt(
                W,
                format!("{} stray bytes at the end", r.remaining()),
            ));
        }
        Ok(Self {
            next_device_id,
            devices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trips_and_rejects_truncation() {
        let st = CheckpointState {
            next_device_id: 3,
            devices: vec![
                DeviceRecord {
                    id: 1,
                    name: "base".into(),
                    size: 1 << 20,
                    read_only: true,
                    origin: String::new(),
                    entries: vec![
                        (
                            0,
                            EntryRecord::Compact {
                                pchunk: 4,
                                present: vec![u64::MAX],
                            },
                        ),
                        (
                            2,
                            EntryRecord::Split {
                                blocks: (0..16).collect(),
                            },
                        ),
                    ],
                },
                DeviceRecord {
                    id: 2,
                    name: "c".into(),
                    size: 1 << 20,
                    read_only: false,
                    origin: "base".into(),
                    entries: vec![],
                },
            ],
        };
        let b = st.encode(16);
        assert_eq!(CheckpointState::decode(&b, 16).unwrap(), st);
        for cut in 0..b.len() {
            assert!(CheckpointState::decode(&b[..cut], 16).is_err(), "cut {cut}");
        }
    }
}
