//! The metadata store: the superblock's two slots and the two metadata files, each holding
//! a checkpoint followed by its journal.
//!
//! This module owns every metadata write and its ordering; docs/design.md, "Commit
//! protocol", is the argument that each step leaves a recoverable pool. It must never
//! interpret records: that is `state`'s job.

use hpm_format::{
    decode_batches, encode_batch, BatchScan, CheckpointState, FormatError, MetaHeader, Record,
    Superblock, FLAG_NEEDS_CHECK, SLOT_SIZE,
};
use hpm_io::{Backend, Checked};
use std::io;

/// The backends a pool lives on. A real pool uses files in its directory; tests use crash
/// and fault backends.
pub struct PoolStorage {
    /// Two superblock slots.
    pub superblock: Box<dyn Backend>,
    /// The two metadata files.
    pub meta: [Box<dyn Backend>; 2],
    /// Pool data.
    pub data: Box<dyn Backend>,
}

pub(crate) type Dev = Checked<Box<dyn Backend>>;

pub(crate) struct Store {
    sb_dev: Dev,
    meta: [Dev; 2],
    pub sb: Superblock,
    journal_pos: u64,
    next_seq: u64,
}

/// What loading found, before any replay.
pub(crate) struct Loaded {
    pub checkpoint: CheckpointState,
    pub scan: BatchScan,
    /// Damage that recovery tolerates (an older torn superblock slot), for `check` to show.
    pub notes: Vec<String>,
}

fn read(dev: &dyn Backend, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    dev.read_at(&mut buf, off)?;
    Ok(buf)
}

fn io_err(what: &str, e: io::Error) -> crate::Error {
    crate::Error::io(what.to_string(), e)
}

impl Store {
    /// Writes a new, empty pool's metadata: an empty checkpoint in meta.0, then slot 0.
    pub(crate) fn create(
        sb_dev: Box<dyn Backend>,
        meta: [Box<dyn Backend>; 2],
        mut sb: Superblock,
    ) -> crate::Result<Self> {
        let [m0, m1] = meta;
        let mut st = Store {
            sb_dev: Checked::new(sb_dev),
            meta: [Checked::new(m0), Checked::new(m1)],
            sb: sb.clone(),
            journal_pos: 0,
            next_seq: 1,
        };
        let ck = CheckpointState {
            next_device_id: 1,
            devices: vec![],
        };
        let body = ck.encode(sb.chunk_blocks);
        sb.active_meta = 1; // so that `write_checkpoint` picks meta.0
        sb.sequence = 0;
        sb.slot = 1;
        st.sb = sb;
        st.meta[1]
            .set_len(0)
            .map_err(|e| io_err("creating meta.1", e))?;
        st.meta[1]
            .sync()
            .map_err(|e| io_err("creating meta.1", e))?;
        st.write_checkpoint(&body, 0)?;
        Ok(st)
    }

    /// Reads the newest valid superblock, its checkpoint and its journal. Read-only.
    pub(crate) fn load(
        sb_dev: Box<dyn Backend>,
        meta: [Box<dyn Backend>; 2],
    ) -> crate::Result<(Self, Loaded)> {
        let mut notes = Vec::new();
        let mut best: Option<Superblock> = None;
        let mut errors = Vec::new();
        for slot in 0..2u32 {
            let bytes = read(&*sb_dev, u64::from(slot) * SLOT_SIZE as u64, SLOT_SIZE)
                .map_err(|e| io_err("reading the superblock", e))?;
            if bytes.iter().all(|&b| b == 0) {
                errors.push(format!("slot {slot} is empty"));
                continue;
            }
            match Superblock::decode(&bytes, slot) {
                Ok(sb) => {
                    if best.as_ref().is_none_or(|b| sb.sequence > b.sequence) {
                        best = Some(sb);
                    }
                }
                Err(e @ FormatError::Unsupported { .. }) => return Err(e.into()),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let Some(sb) = best else {
            return Err(crate::Error::new(
                crate::ErrorKind::Corrupt,
                format!("no valid superblock ({}); this is not an hpmapper pool or its metadata is destroyed", errors.join("; ")),
            ));
        };
        notes.extend(
            errors
                .into_iter()
                .filter(|e| !e.contains("is empty"))
                .map(|e| format!("{e} (the other slot is used)")),
        );
        let [m0, m1] = meta;
        let st = Store {
            sb_dev: Checked::new(sb_dev),
            meta: [Checked::new(m0), Checked::new(m1)],
            sb,
            journal_pos: 0,
            next_seq: 1,
        };
        let f = st.sb.active_meta;
        let dev = &st.meta[f as usize];
        let hdr =
            read(dev, 0, SLOT_SIZE).map_err(|e| io_err("reading the metadata file header", e))?;
        let h = MetaHeader::decode(&hdr, f)?;
        let corrupt = |d: String| {
            crate::Error::new(
                crate::ErrorKind::Corrupt,
                format!("meta.{f} is corrupt: {d}"),
            )
        };
        if h.uuid != st.sb.uuid
            || h.gen != st.sb.meta_gen
            || h.checkpoint_len != st.sb.checkpoint_len
        {
            return Err(corrupt(format!(
                "its header (generation {}) does not match the superblock (generation {})",
                h.gen, st.sb.meta_gen
            )));
        }
        let len =
            usize::try_from(h.checkpoint_len).map_err(|_| corrupt("checkpoint length".into()))?;
        let file_len = dev
            .len()
            .map_err(|e| io_err("reading meta file length", e))?;
        if h.checkpoint_len > file_len.saturating_sub(SLOT_SIZE as u64) {
            return Err(corrupt(format!(
                "checkpoint of {len} bytes is truncated (file is {file_len} bytes)"
            )));
        }
        let body =
            read(dev, SLOT_SIZE as u64, len).map_err(|e| io_err("reading the checkpoint", e))?;
        if hpm_format::checksum(&body) != h.checkpoint_crc
            || h.checkpoint_crc != st.sb.checkpoint_crc
        {
            return Err(corrupt(format!(
                "checkpoint generation {} checksum mismatch",
                h.gen
            )));
        }
        let checkpoint = CheckpointState::decode(&body, st.sb.chunk_blocks)
            .map_err(|e| corrupt(e.to_string()))?;
        let start = MetaHeader::journal_start(h.checkpoint_len);
        let jlen = usize::try_from(file_len.saturating_sub(start))
            .map_err(|_| corrupt("journal length".into()))?;
        let region = read(dev, start, jlen).map_err(|e| io_err("reading the journal", e))?;
        let scan = decode_batches(&region, h.gen);
        let mut st = st;
        st.journal_pos = start + scan.valid_len;
        st.next_seq = scan.batches.len() as u64 + 1;
        Ok((
            st,
            Loaded {
                checkpoint,
                scan,
                notes,
            },
        ))
    }

    /// Cuts the journal after its last whole batch (recovery of a torn tail) and makes the
    /// cut durable.
    pub(crate) fn truncate_journal(&mut self) -> crate::Result<()> {
        let dev = &self.meta[self.sb.active_meta as usize];
        dev.set_len(self.journal_pos)
            .map_err(|e| io_err("truncating the journal's torn tail", e))?;
        dev.sync()
            .map_err(|e| io_err("truncating the journal's torn tail", e))
    }

    /// Appends one batch and makes it durable. IMPORTANT: the caller has synced the data
    /// every record points to.
    pub(crate) fn append(&mut self, records: &[Record]) -> crate::Result<()> {
        let dev = &self.meta[self.sb.active_meta as usize];
        // Batches stay well below the 256 MiB limit: a very large transaction is split, and
        // each part is synced before the next is written, so a torn part is always the last.
        for part in records.chunks(1 << 20) {
            let b = encode_batch(self.sb.meta_gen, self.next_seq, part);
            dev.write_at(&b, self.journal_pos)
                .map_err(|e| io_err("appending to the journal", e))?;
            dev.sync().map_err(|e| io_err("syncing the journal", e))?;
            self.journal_pos += b.len() as u64;
            self.next_seq += 1;
        }
        Ok(())
    }

    /// Bytes in the live journal.
    pub(crate) fn journal_bytes(&self) -> u64 {
        self.journal_pos - MetaHeader::journal_start(self.sb.checkpoint_len)
    }

    /// Writes a checkpoint body into the inactive metadata file, then points the superblock
    /// at it. IMPORTANT: the caller has synced the data every entry points to.
    pub(crate) fn write_checkpoint(&mut self, body: &[u8], flags: u32) -> crate::Result<()> {
        let f = 1 - self.sb.active_meta;
        let gen = self.sb.meta_gen.checked_add(1).ok_or_else(|| {
            crate::Error::new(
                crate::ErrorKind::Corrupt,
                "the checkpoint generation is exhausted (2^64 - 1): the superblock is corrupt",
            )
        })?;
        let crc = hpm_format::checksum(body);
        let h = MetaHeader {
            file: f,
            uuid: self.sb.uuid,
            gen,
            checkpoint_len: body.len() as u64,
            checkpoint_crc: crc,
        };
        let dev = &self.meta[f as usize];
        let ctx = |e| io_err("writing a checkpoint", e);
        // The inactive file holds nothing the superblock points to, so it may be rewritten.
        dev.set_len(0).map_err(ctx)?;
        let mut buf = h.encode();
        buf.extend_from_slice(body);
        dev.write_at(&buf, 0).map_err(ctx)?;
        dev.sync().map_err(ctx)?;
        let mut sb = self.sb.clone();
        sb.active_meta = f;
        sb.meta_gen = gen;
        sb.checkpoint_len = body.len() as u64;
        sb.checkpoint_crc = crc;
        sb.flags = flags;
        self.write_superblock(sb)?;
        self.journal_pos = MetaHeader::journal_start(body.len() as u64);
        self.next_seq = 1;
        Ok(())
    }

    /// Writes `sb` into the slot not holding the current one and syncs: the commit point of
    /// checkpoints and of flag changes.
    pub(crate) fn write_superblock(&mut self, mut sb: Superblock) -> crate::Result<()> {
        sb.slot = 1 - self.sb.slot;
        sb.sequence = self.sb.sequence.checked_add(1).ok_or_else(|| {
            crate::Error::new(
                crate::ErrorKind::Corrupt,
                "the superblock sequence is exhausted (2^64 - 1): the superblock is corrupt",
            )
        })?;
        let ctx = |e| io_err("writing the superblock", e);
        self.sb_dev
            .write_at(&sb.encode(), u64::from(sb.slot) * SLOT_SIZE as u64)
            .map_err(ctx)?;
        self.sb_dev.sync().map_err(ctx)?;
        self.sb = sb;
        Ok(())
    }

    /// Sets or clears `needs_check`.
    pub(crate) fn set_needs_check(&mut self, on: bool) -> crate::Result<()> {
        let mut sb = self.sb.clone();
        sb.flags = if on {
            sb.flags | FLAG_NEEDS_CHECK
        } else {
            sb.flags & !FLAG_NEEDS_CHECK
        };
        self.write_superblock(sb)
    }

    /// Metadata bytes on disk.
    pub(crate) fn bytes(&self) -> u64 {
        (2 * SLOT_SIZE) as u64 + self.meta.iter().map(|m| m.len().unwrap_or(0)).sum::<u64>()
    }

    /// Why metadata writes are refused, if they are.
    pub(crate) fn poisoned(&self) -> Option<String> {
        self.sb_dev
            .poisoned()
            .or_else(|| self.meta[0].poisoned())
            .or_else(|| self.meta[1].poisoned())
    }
}
