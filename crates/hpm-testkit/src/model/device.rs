//! One device of the model: its blocks now, at the last flush, and in between.
//!
//! This module owns the per-block bookkeeping behind [`super::Model`]. Blocks are shared
//! (`Arc`) and all-zero blocks are stored as absent, so a snapshot or a flush copies one
//! pointer per written block, and a device of any size that was never written costs nothing.

use super::BLOCK_SIZE;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The contents of one block: exactly `BLOCK_SIZE` bytes, never all zeros (zeros are `None`
/// wherever a block value is optional, and absent in the maps).
pub(super) type Block = Arc<[u8]>;

const BS: usize = BLOCK_SIZE as usize;

/// A block value from its bytes; `None` if they are all zero.
fn normalize(bytes: Vec<u8>) -> Option<Block> {
    debug_assert_eq!(bytes.len(), BS);
    bytes.iter().any(|&b| b != 0).then(|| Block::from(bytes))
}

/// Block `idx`'s bytes, zeros if absent.
fn bytes_of(map: &BTreeMap<u64, Block>, idx: u64) -> Vec<u8> {
    map.get(&idx).map_or_else(|| vec![0; BS], |b| b.to_vec())
}

/// One device.
///
/// Invariants: `current` is the last value of each block's `later` list, or its `flushed`
/// value if the block has no list; bytes past `size` in the last block are zero.
#[derive(Clone, Debug)]
pub(super) struct Device {
    pub(super) size: u64,
    pub(super) read_only: bool,
    /// What reads see now.
    current: BTreeMap<u64, Block>,
    /// What each block held at the last flush.
    flushed: BTreeMap<u64, Block>,
    /// Every value each block took since the last flush, in order (`None` = zeros). A block
    /// without an entry has not changed since the flush.
    later: BTreeMap<u64, Vec<Option<Block>>>,
}

impl Device {
    /// An empty (all zeros) device.
    pub(super) fn new(size: u64, read_only: bool) -> Self {
        Self {
            size,
            read_only,
            current: BTreeMap::new(),
            flushed: BTreeMap::new(),
            later: BTreeMap::new(),
        }
    }

    /// A device holding this one's current contents, already flushed.
    pub(super) fn snapshot(&self, read_only: bool) -> Self {
        Self {
            size: self.size,
            read_only,
            current: self.current.clone(),
            flushed: self.current.clone(),
            later: BTreeMap::new(),
        }
    }

    /// Number of blocks, counting a partial last block.
    pub(super) fn blocks(&self) -> u64 {
        self.size.div_ceil(BLOCK_SIZE)
    }

    /// Bytes of block `idx` that lie inside the device.
    pub(super) fn block_len(&self, idx: u64) -> usize {
        (self.size - idx * BLOCK_SIZE).min(BLOCK_SIZE) as usize
    }

    /// Grows the device; the new space reads zeros because nothing past the old size was ever
    /// stored.
    pub(super) fn grow(&mut self, new_size: u64) {
        debug_assert!(new_size >= self.size);
        self.size = new_size;
    }

    /// Every block's current value becomes its flushed value.
    pub(super) fn flush(&mut self) {
        self.flushed = self.current.clone();
        self.later.clear();
    }

    /// Fills `buf` from `offset`; the caller has checked the range.
    pub(super) fn read(&self, offset: u64, buf: &mut [u8]) {
        let mut pos = 0;
        for (idx, start, stop) in spans(offset, buf.len() as u64) {
            let out = &mut buf[pos..pos + stop - start];
            match self.current.get(&idx) {
                Some(b) => out.copy_from_slice(&b[start..stop]),
                None => out.fill(0),
            }
            pos += stop - start;
        }
    }

    /// Overwrites `[offset, offset + len)` with `data`, or zeros if `None`; the caller has
    /// checked the range.
    pub(super) fn patch(&mut self, offset: u64, len: u64, data: Option<&[u8]>) {
        let mut pos = 0;
        for (idx, start, stop) in spans(offset, len) {
            let mut bytes = bytes_of(&self.current, idx);
            match data {
                Some(d) => bytes[start..stop].copy_from_slice(&d[pos..pos + stop - start]),
                None => bytes[start..stop].fill(0),
            }
            pos += stop - start;
            self.set(idx, normalize(bytes));
        }
    }

    /// Zeroes the blocks lying wholly inside `[offset, offset + len)`; the caller has checked
    /// the range.
    pub(super) fn discard(&mut self, offset: u64, len: u64) {
        for idx in offset.div_ceil(BLOCK_SIZE)..(offset + len) / BLOCK_SIZE {
            self.set(idx, None);
        }
    }

    /// Records a completed change of block `idx`.
    fn set(&mut self, idx: u64, value: Option<Block>) {
        if self.current.get(&idx) == value.as_ref() {
            // Unchanged: the value is already allowed after a crash.
            return;
        }
        self.later.entry(idx).or_default().push(value.clone());
        match value {
            Some(b) => self.current.insert(idx, b),
            None => self.current.remove(&idx),
        };
    }

    /// The values block `idx` may hold after a crash: its flushed value first, then the values
    /// it took since, in order. `None` is zeros.
    pub(super) fn allowed(&self, idx: u64) -> Vec<Option<&Block>> {
        let mut v = vec![self.flushed.get(&idx)];
        if let Some(later) = self.later.get(&idx) {
            v.extend(later.iter().map(Option::as_ref));
        }
        v
    }

    /// Adopts `bytes` (at least the block's in-device length; the rest is ignored) as block
    /// `idx`'s current and flushed value, forgetting its history.
    pub(super) fn settle(&mut self, idx: u64, bytes: &[u8]) {
        let n = self.block_len(idx);
        let mut b = vec![0; BS];
        b[..n].copy_from_slice(&bytes[..n]);
        self.later.remove(&idx);
        match normalize(b) {
            Some(b) => {
                self.current.insert(idx, b.clone());
                self.flushed.insert(idx, b);
            }
            None => {
                self.current.remove(&idx);
                self.flushed.remove(&idx);
            }
        }
    }
}

/// The blocks `[offset, offset + len)` touches, each as (block index, start in block, end in
/// block). The caller has checked that the end does not overflow.
fn spans(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let end = offset + len;
    let first = offset / BLOCK_SIZE;
    let last = if len == 0 {
        first
    } else {
        end.div_ceil(BLOCK_SIZE)
    };
    (first..last).map(move |i| {
        let base = i * BLOCK_SIZE;
        (
            i,
            (offset.max(base) - base) as usize,
            (end.min(base + BLOCK_SIZE) - base) as usize,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_records_each_change_and_flush_forgets_it() {
        let mut d = Device::new(3 * BLOCK_SIZE, false);
        d.patch(0, 4, Some(b"aaaa"));
        d.patch(0, 4, Some(b"aaaa")); // no change: not recorded twice
        d.patch(2, 4, Some(b"bbbb")); // stays in block 0
        assert_eq!(d.allowed(0).len(), 3);
        assert_eq!(d.allowed(0)[0], None, "flushed value is zeros");
        assert_eq!(d.allowed(1), vec![None]);
        d.flush();
        let a = d.allowed(0);
        assert_eq!(a.len(), 1);
        assert_eq!(&a[0].unwrap()[..6], b"aabbbb");
    }

    #[test]
    fn zero_blocks_are_absent() {
        let mut d = Device::new(2 * BLOCK_SIZE, false);
        d.patch(10, 1, Some(&[1]));
        assert_eq!(d.current.len(), 1);
        d.patch(10, 1, None);
        assert!(d.current.is_empty());
        assert_eq!(d.allowed(0).last().unwrap(), &None);
    }

    #[test]
    fn discard_touches_only_whole_blocks() {
        let mut d = Device::new(4 * BLOCK_SIZE, false);
        d.patch(0, 4 * BLOCK_SIZE, Some(&vec![7; 4 * BS]));
        d.discard(100, 2 * BLOCK_SIZE);
        // Only block 1 lies wholly inside [100, 8292).
        let mut buf = vec![0; 4 * BS];
        d.read(0, &mut buf);
        assert!(buf[..BS].iter().all(|&b| b == 7));
        assert!(buf[BS..2 * BS].iter().all(|&b| b == 0));
        assert!(buf[2 * BS..].iter().all(|&b| b == 7));
    }

    #[test]
    fn settle_replaces_current_and_flushed() {
        let mut d = Device::new(BLOCK_SIZE + 100, false);
        d.patch(0, 3, Some(b"abc"));
        d.settle(0, &[9; BS]);
        d.settle(1, &[5; BS]); // bytes past the device end are ignored
        assert_eq!(d.allowed(0).len(), 1);
        let mut buf = vec![0; BS + 100];
        d.read(0, &mut buf);
        assert!(buf[..BS].iter().all(|&b| b == 9));
        assert!(buf[BS..].iter().all(|&b| b == 5));
        assert_eq!(&d.allowed(1)[0].unwrap()[99..101], &[5, 0]);
    }
}
