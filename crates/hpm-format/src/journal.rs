//! Journal batches: framed, checksummed groups of metadata records appended after the
//! checkpoint in the active metadata file.
//!
//! A batch is all or nothing: recovery applies whole batches in sequence and truncates the
//! file at the first batch that is torn, damaged, from another generation or out of order.

use crate::{checksum, FormatError, Reader, Writer};

const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"HPJB");
const BATCH_TRAILER: u32 = u32::from_le_bytes(*b"HPJE");
const HEADER: usize = 32;
/// Bytes a batch adds around its payload (header, checksum, trailer).
pub const BATCH_OVERHEAD: usize = HEADER + 8;
/// Largest payload a batch may carry (guards allocations when decoding).
const MAX_PAYLOAD: u32 = 256 << 20;

/// One metadata change. See docs/design.md, "Journal records".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A new empty device.
    CreateDevice {
        /// Device id (never reused).
        id: u32,
        /// Unique name.
        name: String,
        /// Size in bytes (a multiple of the block size).
        size: u64,
        /// Refuses writes.
        read_only: bool,
    },
    /// A new device sharing every mapping of `origin` as of this record.
    Snapshot {
        /// New device id.
        id: u32,
        /// Origin device id.
        origin: u32,
        /// Unique name.
        name: String,
        /// Refuses writes.
        read_only: bool,
    },
    /// The device and all its mappings are gone.
    Remove {
        /// Device id.
        id: u32,
    },
    /// New size in bytes (grow only).
    Resize {
        /// Device id.
        id: u32,
        /// New size in bytes.
        size: u64,
    },
    /// Virtual blocks `vblock..vblock+count` map to `pblock..pblock+count`, replacing any
    /// earlier mapping.
    Map {
        /// Device id.
        dev: u32,
        /// First virtual block.
        vblock: u64,
        /// First physical block.
        pblock: u64,
        /// Number of blocks.
        count: u32,
    },
    /// Virtual blocks `vblock..vblock+count` become unmapped (read as zeros).
    Unmap {
        /// Device id.
        dev: u32,
        /// First virtual block.
        vblock: u64,
        /// Number of blocks.
        count: u32,
    },
}

impl Record {
    fn encode(&self, w: &mut Writer) {
        match self {
            Record::CreateDevice {
                id,
                name,
                size,
                read_only,
            } => {
                w.u8(1);
                w.u32(*id);
                w.str16(name);
                w.u64(*size);
                w.u8(*read_only as u8);
            }
            Record::Snapshot {
                id,
                origin,
                name,
                read_only,
            } => {
                w.u8(2);
                w.u32(*id);
                w.u32(*origin);
                w.str16(name);
                w.u8(*read_only as u8);
            }
            Record::Remove { id } => {
                w.u8(3);
                w.u32(*id);
            }
            Record::Resize { id, size } => {
                w.u8(4);
                w.u32(*id);
                w.u64(*size);
            }
            Record::Map {
                dev,
                vblock,
                pblock,
                count,
            } => {
                w.u8(5);
                w.u32(*dev);
                w.u64(*vblock);
                w.u64(*pblock);
                w.u32(*count);
            }
            Record::Unmap { dev, vblock, count } => {
                w.u8(6);
                w.u32(*dev);
                w.u64(*vblock);
                w.u32(*count);
            }
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, FormatError> {
        let at = r.pos();
        Ok(match r.u8()? {
            1 => Record::CreateDevice {
                id: r.u32()?,
                name: r.str16()?,
                size: r.u64()?,
                read_only: r.u8()? != 0,
            },
            2 => Record::Snapshot {
                id: r.u32()?,
                origin: r.u32()?,
                name: r.str16()?,
                read_only: r.u8()? != 0,
            },
            3 => Record::Remove { id: r.u32()? },
            4 => Record::Resize {
                id: r.u32()?,
                size: r.u64()?,
            },
            5 => Record::Map {
                dev: r.u32()?,
                vblock: r.u64()?,
                pblock: r.u64()?,
                count: r.u32()?,
            },
            6 => Record::Unmap {
                dev: r.u32()?,
                vblock: r.u64()?,
                count: r.u32()?,
            },
            t => {
                return Err(FormatError::corrupt(
                    "journal record",
                    format!("unknown record type {t} at offset {at}"),
                ))
            }
        })
    }
}

/// Encodes one batch of `records` for generation `gen`, sequence `seq` (first is 1).
pub fn encode_batch(gen: u64, seq: u64, records: &[Record]) -> Vec<u8> {
    let mut payload = Writer::new();
    for r in records {
        r.encode(&mut payload);
    }
    let mut w = Writer::new();
    w.u32(BATCH_MAGIC);
    w.u32(u32::try_from(payload.buf.len()).expect("batches are split below 4 GiB"));
    w.u64(gen);
    w.u64(seq);
    w.u32(records.len() as u32);
    w.u32(0);
    w.bytes(&payload.buf);
    let crc = checksum(&w.buf);
    w.u32(crc);
    w.u32(BATCH_TRAILER);
    w.buf
}

/// The result of scanning a journal region.
#[derive(Debug, Default)]
pub struct BatchScan {
    /// Records of every whole batch, in order, with their batch sequence number.
    pub batches: Vec<(u64, Vec<Record>)>,
    /// Bytes of the region taken by whole batches; recovery truncates the journal here.
    pub valid_len: u64,
    /// Why scanning stopped before the end of the region, if it did (a torn tail or damage).
    pub stopped: Option<String>,
    /// A whole batch of this generation with a later sequence number lies after the point
    /// where scanning stopped: the stop is damage in the middle, not a torn tail. Also set,
    /// to where the search gave up, when the bytes after the stop hold more would-be batch
    /// headers than the search checks (see `find_later`): refusing is the safe answer.
    pub later_batch_at: Option<u64>,
}

/// Scans `region` (the bytes after the checkpoint) for whole batches of generation `gen`
/// numbered 1, 2, 3, ...; stops at the first that is not one. Zero bytes where the next
/// batch would start mean the clean end.
pub fn decode_batches(region: &[u8], gen: u64) -> BatchScan {
    let mut scan = BatchScan::default();
    let mut pos = 0usize;
    let mut next_seq = 1u64;
    while pos < region.len() {
        let rest = &region[pos..];
        if rest.len() < 4 || rest[..4] == [0; 4] {
            if rest.iter().any(|&b| b != 0) {
                scan.stopped = Some(format!(
                    "non-zero bytes after the last batch at journal offset {pos}"
                ));
                // A zeroed header (a zeroed sector) in front of later batches is damage too.
                scan.later_batch_at = find_later(region, pos + 1, gen, next_seq);
            }
            break;
        }
        match decode_one(rest, gen, next_seq) {
            Ok((records, len)) => {
                scan.batches.push((next_seq, records));
                next_seq += 1;
                pos += len;
                scan.valid_len = pos as u64;
            }
            Err(why) => {
                scan.stopped = Some(format!("batch {next_seq} at journal offset {pos}: {why}"));
                scan.later_batch_at = find_later(region, pos + 1, gen, next_seq);
                break;
            }
        }
    }
    scan
}

/// The offset of a whole batch of `gen` numbered above `seq`, searching from `from`.
///
/// Only candidates whose header names `gen` and a later sequence are checksummed, and at most
/// [`FIND_LATER_BUDGET`] times the searched bytes in all: crafted bytes that repeat such a
/// header every few bytes would otherwise cost a checksum over the rest of the region each.
/// Past the budget the search answers where it stopped, as if it had found a batch.
fn find_later(region: &[u8], from: usize, gen: u64, seq: u64) -> Option<u64> {
    let magic = BATCH_MAGIC.to_le_bytes();
    let mut budget = region
        .len()
        .saturating_sub(from)
        .saturating_mul(FIND_LATER_BUDGET);
    let mut pos = from;
    while pos + BATCH_OVERHEAD <= region.len() {
        let at = pos + region[pos..].windows(4).position(|w| w == magic)?;
        let rest = &region[at..];
        if rest.len() >= BATCH_OVERHEAD {
            let (word, dword) = (|o| word(rest, o), |o| dword(rest, o));
            let total = BATCH_OVERHEAD + word(4) as usize;
            if dword(8) == gen && dword(16) > seq && word(4) <= MAX_PAYLOAD && total <= rest.len() {
                if total > budget {
                    return Some(at as u64);
                }
                budget -= total;
                if decode_one(rest, gen, dword(16)).is_ok() {
                    return Some(at as u64);
                }
            }
        }
        pos = at + 1;
    }
    None
}

/// The little-endian u32 at `o` of `buf`.
fn word(buf: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(buf[o..o + 4].try_into().expect("4 bytes"))
}

/// The little-endian u64 at `o` of `buf`.
fn dword(buf: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(buf[o..o + 8].try_into().expect("8 bytes"))
}

/// How many times the bytes it searches [`find_later`] may checksum.
const FIND_LATER_BUDGET: usize = 4;

fn decode_one(buf: &[u8], gen: u64, seq: u64) -> Result<(Vec<Record>, usize), String> {
    if buf.len() < BATCH_OVERHEAD {
        return Err("torn header".into());
    }
    let (word, dword) = (|o| word(buf, o), |o| dword(buf, o));
    if word(0) != BATCH_MAGIC {
        return Err("bad magic".into());
    }
    let len = word(4);
    if len > MAX_PAYLOAD {
        return Err(format!("payload length {len} is implausible"));
    }
    let total = BATCH_OVERHEAD + len as usize;
    if buf.len() < total {
        return Err("torn payload".into());
    }
    let body_end = HEADER + len as usize;
    if checksum(&buf[..body_end]) != word(body_end) || word(body_end + 4) != BATCH_TRAILER {
        return Err("checksum or trailer mismatch (torn or damaged write)".into());
    }
    if dword(8) != gen {
        return Err(format!(
            "belongs to generation {}, not {gen} (stale)",
            dword(8)
        ));
    }
    if dword(16) != seq {
        return Err(format!("has sequence {}, expected {seq}", dword(16)));
    }
    let count = word(24);
    let mut r = Reader::new(&buf[HEADER..body_end], "journal batch");
    let mut records = Vec::with_capacity(count.min(1 << 16) as usize);
    for _ in 0..count {
        records.push(Record::decode(&mut r).map_err(|e| e.to_string())?);
    }
    if r.remaining() != 0 {
        return Err(format!(
            "{} stray bytes after {count} records",
            r.remaining()
        ));
    }
    Ok((records, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> Vec<Record> {
        vec![
            Record::CreateDevice {
                id: 1,
                name: "a b/c".into(),
                size: 1 << 30,
                read_only: false,
            },
            Record::Snapshot {
                id: 2,
                origin: 1,
                name: "snap".into(),
                read_only: true,
            },
            Record::Map {
                dev: 1,
                vblock: 5,
                pblock: 900,
                count: 3,
            },
            Record::Unmap {
                dev: 1,
                vblock: 6,
                count: 1,
            },
            Record::Resize {
                id: 1,
                size: 2 << 30,
            },
            Record::Remove { id: 2 },
        ]
    }

    #[test]
    fn batches_round_trip_in_sequence() {
        let mut region = encode_batch(3, 1, &records());
        region.extend(encode_batch(3, 2, &records()[..2]));
        let end = region.len();
        region.resize(end + 4096, 0);
        let scan = decode_batches(&region, 3);
        assert_eq!(scan.batches.len(), 2);
        assert_eq!(scan.batches[0].1, records());
        assert_eq!(scan.valid_len, end as u64);
        assert!(scan.stopped.is_none());
    }

    #[test]
    fn torn_stale_and_reordered_batches_stop_the_scan() {
        let one = encode_batch(3, 1, &records());
        let two = encode_batch(3, 2, &records());
        // Torn at every length: only whole batches count.
        for cut in 0..two.len() {
            let mut region = one.clone();
            region.extend_from_slice(&two[..cut]);
            let scan = decode_batches(&region, 3);
            assert_eq!(scan.batches.len(), 1, "cut {cut}");
            assert_eq!(scan.valid_len, one.len() as u64);
        }
        // Every single bit flip in the first batch is caught, and told apart from a torn
        // tail because the second batch is intact.
        for i in 0..one.len() {
            let mut bad = one.clone();
            bad[i] ^= 0x10;
            bad.extend_from_slice(&two);
            let scan = decode_batches(&bad, 3);
            assert!(scan.batches.is_empty(), "flip at {i}");
            assert_eq!(scan.later_batch_at, Some(one.len() as u64), "flip at {i}");
        }
        let torn = decode_batches(&[&one[..], &two[..10]].concat(), 3);
        assert_eq!(torn.later_batch_at, None);
        assert!(decode_batches(&one, 4).batches.is_empty());
        assert!(decode_batches(&two, 3).batches.is_empty());
        // A zeroed header is damage too when an intact later batch follows it.
        let mut zeroed = one.clone();
        zeroed[..8].fill(0);
        zeroed.extend_from_slice(&two);
        let scan = decode_batches(&zeroed, 3);
        assert!(scan.batches.is_empty() && scan.stopped.is_some());
        assert_eq!(scan.later_batch_at, Some(one.len() as u64));
        // Zeros to the end are the clean end.
        let clean = decode_batches(&[&one[..], &[0; 4096][..]].concat(), 3);
        assert_eq!((clean.batches.len(), clean.stopped), (1, None));
    }

    /// Bytes that repeat a plausible later header every 40 bytes, each claiming half the
    /// region: checksumming each candidate would take about R^2/80 bytes of CRC (hours for
    /// this 16 MiB region); the search gives up after 4 R and says "damage".
    #[test]
    fn the_search_for_a_later_batch_is_bounded() {
        const R: usize = 16 << 20;
        let mut region = encode_batch(3, 1, &records());
        region[40] ^= 1; // batch 1 damaged
        let fake = {
            let mut h = Writer::new();
            h.u32(BATCH_MAGIC);
            h.u32((R / 2) as u32);
            h.u64(3);
            h.u64(99);
            h.u32(0);
            h.u32(0);
            h.u64(0);
            h.buf
        };
        assert_eq!(fake.len(), 40);
        while region.len() < R {
            region.extend_from_slice(&fake);
        }
        let scan = decode_batches(&region, 3);
        assert!(scan.batches.is_empty());
        assert!(scan.later_batch_at.is_some(), "{scan:?}");
    }
}
