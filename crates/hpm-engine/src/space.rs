//! Physical space: reference counts per block, chunk reservations for placement, the free
//! chunk set and frees that wait for their transaction to become durable.
//!
//! This module owns which physical blocks are in use and where the next block of a device's
//! chunk goes. Reference counts are never stored: they are derived from the device maps at
//! open, so they cannot disagree with them. It must never touch the backend.
//!
//! Slot states (per physical block): 0 free; `PENDING` freed by a transaction that is not
//! durable yet (not reusable, not yet punched); otherwise the number of map references, where
//! a block handed out by `allocate` holds 1 for the in-flight write until it is installed or
//! released.

use std::collections::{BTreeSet, HashMap};

const PENDING: u32 = u32::MAX;

#[derive(Default)]
struct PChunk {
    refs: Option<Box<[u32]>>,
    used: u32,
    /// Blocks of this chunk with two or more references: while 0, every mapped block of the
    /// chunk has exactly one, and `sharers` answers without touching `refs`.
    shared: u32,
    owner: Option<(u32, u64)>,
}

/// Where a new block went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// At its own offset in the chunk reserved for (device, virtual chunk).
    Reserved,
    /// In a fresh chunk now reserved for (device, virtual chunk).
    NewChunk,
    /// Anywhere free: the pool is nearly full.
    Scattered,
}

pub(crate) struct Space {
    chunk_blocks: u32,
    chunks: Vec<PChunk>,
    free_chunks: BTreeSet<u32>,
    targets: HashMap<(u32, u64), u32>,
    used_blocks: u64,
    pending: Vec<u64>,
    /// Blocks that lost a sharer in the transaction not yet durable, with that transaction.
    /// The durable state may still share them, so they must not be overwritten in place.
    unsettled: HashMap<u64, u64>,
    txn: u64,
    scan_cursor: usize,
}

impl Space {
    pub(crate) fn new(chunk_blocks: u32, capacity_blocks: u64) -> Self {
        let n = (capacity_blocks / u64::from(chunk_blocks)) as usize;
        Self {
            chunk_blocks,
            chunks: (0..n).map(|_| PChunk::default()).collect(),
            free_chunks: (0..n as u32).collect(),
            targets: HashMap::new(),
            used_blocks: 0,
            pending: Vec::new(),
            unsettled: HashMap::new(),
            txn: 0,
            scan_cursor: 0,
        }
    }

    pub(crate) fn capacity_blocks(&self) -> u64 {
        self.chunks.len() as u64 * u64::from(self.chunk_blocks)
    }

    /// Adds free chunks up to `capacity_blocks` (a whole number of chunks, not below the
    /// current capacity).
    pub(crate) fn grow(&mut self, capacity_blocks: u64) {
        let (old, n) = (
            self.chunks.len(),
            (capacity_blocks / u64::from(self.chunk_blocks)) as usize,
        );
        assert!(n >= old, "a pool's space never shrinks");
        self.chunks.resize_with(n, PChunk::default);
        self.free_chunks.extend(old as u32..n as u32);
    }

    /// Blocks referenced by at least one map (or by an in-flight write).
    pub(crate) fn used_blocks(&self) -> u64 {
        self.used_blocks
    }

    fn split(&self, p: u64) -> (usize, usize) {
        (
            (p / u64::from(self.chunk_blocks)) as usize,
            (p % u64::from(self.chunk_blocks)) as usize,
        )
    }

    /// References to physical block `p` (0 for free or pending).
    pub(crate) fn refs(&self, p: u64) -> u32 {
        let (c, i) = self.split(p);
        match self.chunks.get(c).and_then(|ch| ch.refs.as_ref()) {
            Some(r) if r[i] != PENDING => r[i],
            _ => 0,
        }
    }

    /// References to physical block `p`, which a map points at (so at least 1): the read
    /// path's sharing hint, cheaper than `refs` for chunks nobody shares.
    pub(crate) fn sharers(&self, p: u64) -> u32 {
        let (c, i) = self.split(p);
        match self.chunks.get(c) {
            Some(ch) if ch.shared == 0 => 1,
            Some(PChunk { refs: Some(r), .. }) if r[i] != PENDING => r[i],
            _ => 0,
        }
    }

    /// Whether any block of `p`'s chunk has two or more references (one load: the chunk's
    /// count of shared blocks). False means `p`, mapped, has exactly one.
    pub(crate) fn chunk_shared(&self, p: u64) -> bool {
        self.chunks
            .get(self.split(p).0)
            .is_some_and(|ch| ch.shared > 0)
    }

    /// Whether the device holding `p` may overwrite it in place: its only reference, also in
    /// the durable state (no sharer dropped it in a transaction not yet durable).
    pub(crate) fn owned(&self, p: u64) -> bool {
        self.refs(p) == 1 && (self.unsettled.is_empty() || !self.unsettled.contains_key(&p))
    }

    /// Whether `p` was freed by a transaction that is not durable yet.
    pub(crate) fn is_pending(&self, p: u64) -> bool {
        let (c, i) = self.split(p);
        self.chunks
            .get(c)
            .and_then(|ch| ch.refs.as_ref())
            .is_some_and(|r| r[i] == PENDING)
    }

    fn slot_free(&self, c: usize, i: usize) -> bool {
        self.chunks[c].refs.as_ref().is_none_or(|r| r[i] == 0)
    }

    fn take_slot(&mut self, c: usize, i: usize) {
        let ch = &mut self.chunks[c];
        let refs = ch
            .refs
            .get_or_insert_with(|| vec![0; self.chunk_blocks as usize].into());
        debug_assert_eq!(refs[i], 0);
        refs[i] = 1;
        ch.used += 1;
        self.used_blocks += 1;
        // Only a chunk with no block in use is ever in the free set.
        if ch.used == 1 {
            self.free_chunks.remove(&(c as u32));
        }
    }

    /// Adds a map reference to `p`.
    pub(crate) fn inc(&mut self, p: u64) {
        let (c, i) = self.split(p);
        let cur = self.chunks[c].refs.as_ref().map_or(0, |r| r[i]);
        assert_ne!(
            cur, PENDING,
            "block {p} referenced while its free is pending"
        );
        if cur == 0 {
            self.take_slot(c, i);
        } else {
            let ch = &mut self.chunks[c];
            ch.refs.as_mut().expect("counted")[i] += 1;
            if cur == 1 {
                ch.shared += 1;
            }
        }
    }

    /// Drops a map reference to `p`; the last one puts it on the pending-free list.
    pub(crate) fn dec(&mut self, p: u64) {
        let (c, i) = self.split(p);
        let ch = &mut self.chunks[c];
        let refs = ch.refs.as_mut().expect("dec of an unreferenced block");
        assert!(refs[i] != 0 && refs[i] != PENDING, "dec of free block {p}");
        refs[i] -= 1;
        if refs[i] == 1 {
            ch.shared -= 1;
        }
        if refs[i] > 0 {
            self.unsettled.insert(p, self.txn);
        }
        if refs[i] == 0 {
            refs[i] = PENDING;
            self.used_blocks -= 1;
            self.pending.push(p);
        }
    }

    /// Hands out a block for virtual block slot `i` of (device, virtual chunk), reserving it
    /// (count 1) for the in-flight write. Prefers the chunk reserved for that pair, at the
    /// block's own offset, so sequential data stays sequential and entries stay compact.
    pub(crate) fn allocate(
        &mut self,
        dev: u32,
        vchunk: u64,
        i: u32,
        fresh_chunk: bool,
    ) -> Option<(u64, Placement)> {
        let c = u64::from(self.chunk_blocks);
        let i = i as usize;
        if !fresh_chunk {
            if let Some(&t) = self.targets.get(&(dev, vchunk)) {
                if self.slot_free(t as usize, i) {
                    self.take_slot(t as usize, i);
                    return Some((u64::from(t) * c + i as u64, Placement::Reserved));
                }
            }
        }
        if let Some(t) = self.free_chunks.pop_first() {
            self.reserve_chunk(dev, vchunk, t);
            self.take_slot(t as usize, i);
            return Some((u64::from(t) * c + i as u64, Placement::NewChunk));
        }
        // Nearly full: any free slot, starting where the last scan stopped.
        let n = self.chunks.len();
        for k in 0..n {
            let ch = (self.scan_cursor + k) % n;
            if self.chunks[ch].used < self.chunk_blocks {
                if let Some(j) = (0..self.chunk_blocks as usize).find(|&j| self.slot_free(ch, j)) {
                    self.scan_cursor = ch;
                    self.take_slot(ch, j);
                    return Some((ch as u64 * c + j as u64, Placement::Scattered));
                }
            }
        }
        None
    }

    fn reserve_chunk(&mut self, dev: u32, vchunk: u64, t: u32) {
        if let Some(old) = self.targets.insert((dev, vchunk), t) {
            self.chunks[old as usize].owner = None;
            self.maybe_free_chunk(old as usize);
        }
        self.chunks[t as usize].owner = Some((dev, vchunk));
    }

    /// Makes `pchunk` the target of (device, virtual chunk) if nobody owns it (used at open,
    /// where reservations are derived rather than stored).
    pub(crate) fn adopt(&mut self, dev: u32, vchunk: u64, pchunk: u32) {
        if self.chunks[pchunk as usize].owner.is_none()
            && !self.targets.contains_key(&(dev, vchunk))
        {
            self.reserve_chunk(dev, vchunk, pchunk);
        }
    }

    /// Gives back a block `allocate` handed out whose write failed or was superseded. It was
    /// never referenced by a map, so it is free at once.
    pub(crate) fn unreserve(&mut self, p: u64) {
        let (c, i) = self.split(p);
        let refs = self.chunks[c].refs.as_mut().expect("reserved");
        assert_eq!(refs[i], 1, "unreserve of block {p} that is mapped");
        refs[i] = 0;
        self.chunks[c].used -= 1;
        self.used_blocks -= 1;
        self.maybe_free_chunk(c);
    }

    /// Drops every reservation of device `dev`.
    pub(crate) fn forget_device(&mut self, dev: u32) {
        let gone: Vec<_> = self
            .targets
            .keys()
            .filter(|k| k.0 == dev)
            .copied()
            .collect();
        for k in gone {
            let t = self.targets.remove(&k).expect("listed") as usize;
            self.chunks[t].owner = None;
            self.maybe_free_chunk(t);
        }
    }

    fn maybe_free_chunk(&mut self, c: usize) {
        let ch = &mut self.chunks[c];
        if ch.used == 0 && ch.owner.is_none() {
            ch.refs = None;
            self.free_chunks.insert(c as u32);
        }
    }

    /// Ends the current transaction: takes the blocks it freed, which stay unusable until
    /// `release`, and returns its number for `settle`.
    pub(crate) fn take_pending(&mut self) -> (Vec<u64>, u64) {
        let t = self.txn;
        self.txn += 1;
        (std::mem::take(&mut self.pending), t)
    }

    /// Transactions up to `txn` are durable: blocks they unshared may be written in place.
    pub(crate) fn settle(&mut self, txn: u64) {
        if !self.unsettled.is_empty() {
            self.unsettled.retain(|_, t| *t > txn);
        }
    }

    /// Makes blocks from `take_pending` reusable. IMPORTANT: only after the transaction that
    /// freed them is durable, and after their holes are punched.
    pub(crate) fn release(&mut self, blocks: &[u64]) {
        for &p in blocks {
            let (c, i) = self.split(p);
            let refs = self.chunks[c]
                .refs
                .as_mut()
                .expect("pending block has counts");
            if refs[i] == PENDING {
                refs[i] = 0;
                self.chunks[c].used -= 1;
                self.maybe_free_chunk(c);
            }
        }
    }

    /// Bytes of memory used by space accounting.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.chunks.len() * std::mem::size_of::<PChunk>()
            + self.chunks.iter().filter(|c| c.refs.is_some()).count()
                * self.chunk_blocks as usize
                * 4
            + self.free_chunks.len() * 8
            + self.targets.len() * 24
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_prefers_the_reserved_chunk_at_the_same_offset() {
        let mut s = Space::new(16, 64);
        let (a, how) = s.allocate(1, 9, 3, false).unwrap();
        assert_eq!((a % 16, how), (3, Placement::NewChunk));
        let (b, how) = s.allocate(1, 9, 4, false).unwrap();
        assert_eq!((b, how), (a + 1, Placement::Reserved));
        // Another device's chunk gets its own physical chunk.
        let (c, _) = s.allocate(2, 9, 3, false).unwrap();
        assert_ne!(c / 16, a / 16);
        assert_eq!(s.used_blocks(), 3);
    }

    #[test]
    fn freed_blocks_wait_for_release() {
        let mut s = Space::new(16, 16);
        let mut got = vec![];
        for i in 0..16 {
            let (p, _) = s.allocate(1, 0, i, false).unwrap();
            s.unreserve(p);
            s.inc(p);
            got.push(p);
        }
        assert!(s.allocate(1, 0, 0, false).is_none(), "pool is full");
        s.dec(got[5]);
        assert_eq!(s.used_blocks(), 15);
        assert!(
            s.allocate(2, 0, 0, false).is_none(),
            "pending frees are not reusable"
        );
        let (pending, _) = s.take_pending();
        assert_eq!(pending, vec![got[5]]);
        s.release(&pending);
        let (p, how) = s.allocate(2, 0, 0, false).unwrap();
        assert_eq!((p, how), (got[5], Placement::Scattered));
    }

    #[test]
    fn shared_blocks_count_every_reference() {
        let mut s = Space::new(16, 32);
        let (p, _) = s.allocate(1, 0, 0, false).unwrap();
        s.unreserve(p);
        s.inc(p);
        assert_eq!(s.sharers(p), 1);
        s.inc(p);
        assert_eq!((s.refs(p), s.sharers(p)), (2, 2));
        assert_eq!(s.sharers(p + 1), 0, "a free block of a shared chunk");
        s.dec(p);
        assert_eq!((s.refs(p), s.sharers(p)), (1, 1));
        assert!(
            !s.owned(p),
            "unshared only in a transaction that is not durable"
        );
        let (freed, txn) = s.take_pending();
        assert!(freed.is_empty());
        s.settle(txn);
        assert!(s.owned(p));
        s.dec(p);
        assert_eq!(s.take_pending().0, vec![p]);
    }
}
