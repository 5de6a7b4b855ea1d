//! A device's two-level map: virtual chunk -> entry, entry -> physical blocks.
//!
//! This module owns the in-memory representation of one device's mapping and the rules that
//! move an entry between its two forms. It must never allocate physical space or count
//! references: callers (`state`) do that around every change it reports.
//!
//! - `Compact`: every present block i of the virtual chunk is block i of one physical chunk.
//!   24 bytes; a full chunk needs no bitmap at all, a partial one a heap bitmap of C/8 bytes.
//! - `Split`: one physical block number per block (8 bytes per block), used only once a
//!   chunk's blocks live in more than one physical chunk or off their own offset. A split
//!   entry collapses back to `Compact` as soon as its blocks line up again. Its first cache
//!   line summarises it: a home chunk and a bitmap of the slots at their own offset there
//!   (after a copy-on-write, nearly all of them), so most lookups never load the per-block
//!   array.
//!
//! Entries live in pages of `PAGE` slots indexed directly by virtual chunk, so a lookup is
//! two array indexes whatever the snapshot depth; a snapshot clones only the pages that hold
//! entries.

use hpm_format::{bitmap_words, EntryRecord, NO_BLOCK};

const PAGE: usize = 64;

/// One virtual chunk's mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    /// Blocks at their own offset in `pchunk`; `present` None means all blocks.
    Compact {
        pchunk: u32,
        present: Option<Box<[u64]>>,
    },
    /// Per-block physical numbers, `NO_BLOCK` where unmapped.
    Split(Split),
}

/// A split entry's slots. One allocation: `[home, home bits (W words), blocks (C words)]`,
/// where `home` is the first block of the home chunk (`NO_BLOCK` if none) and bit i says
/// that slot i is block `home + i`. The bits are kept exact on every change, so a lookup of
/// a slot at home reads only the first `1 + W` words (one cache line up to 448-block
/// chunks): a split entry's hot part stays small whatever the chunk size.
#[derive(Clone, Debug)]
pub(crate) struct Split {
    words: Box<[u64]>,
}

impl PartialEq for Split {
    /// Equal when they map the same blocks, whichever home each chose.
    fn eq(&self, other: &Self) -> bool {
        self.blocks() == other.blocks()
    }
}
impl Eq for Split {}

impl Split {
    /// Bitmap words; the blocks start after them. `words` holds 1 + w + C words.
    fn w(&self) -> usize {
        // n = w + C with w = ceil(C / 64), so 65(w - 1) < n <= 65w and w = ceil(n / 65).
        (self.words.len() - 1).div_ceil(65)
    }

    /// From per-slot blocks; `home` (a chunk's first block) if the caller knows the chunk
    /// most of them sit in, else the chunk of the first block at its own offset.
    fn new(blocks: &[u64], chunk_blocks: u32, home: Option<u64>) -> Split {
        let w = bitmap_words(chunk_blocks);
        let mut words = vec![NO_BLOCK; 1 + w + blocks.len()].into_boxed_slice();
        words[1 + w..].copy_from_slice(blocks);
        let mut s = Split { words };
        s.rehome(home, chunk_blocks);
        s
    }

    /// Sets the home chunk (or picks one) and recomputes the home bits.
    fn rehome(&mut self, home: Option<u64>, chunk_blocks: u32) {
        let (c, w) = (u64::from(chunk_blocks), bitmap_words(chunk_blocks));
        let home = home.or_else(|| {
            self.blocks()
                .iter()
                .enumerate()
                .find(|&(i, &b)| b != NO_BLOCK && b % c == i as u64)
                .map(|(i, &b)| b - i as u64)
        });
        self.words[0] = home.unwrap_or(NO_BLOCK);
        self.words[1..1 + w].fill(0);
        if let Some(h) = home {
            for i in 0..chunk_blocks as usize {
                if self.words[1 + w + i] == h + i as u64 {
                    self.words[1 + i / 64] |= 1 << (i % 64);
                }
            }
        }
    }

    /// Per-slot physical blocks, `NO_BLOCK` where unmapped.
    pub(crate) fn blocks(&self) -> &[u64] {
        &self.words[1 + self.w()..]
    }

    fn block(&self, i: u32, chunk_blocks: u32) -> Option<u64> {
        let w = bitmap_words(chunk_blocks);
        let i = i as usize;
        if self.words[1 + i / 64] >> (i % 64) & 1 == 1 {
            return Some(self.words[0] + i as u64);
        }
        Some(self.words[1 + w + i]).filter(|&b| b != NO_BLOCK)
    }

    /// Maps slot `i` to `b` (`NO_BLOCK`: unmapped), keeping the home bits exact; a split
    /// entry with nothing at home adopts `b`'s chunk as home if `b` is at its own offset.
    fn set(&mut self, i: u32, b: u64, chunk_blocks: u32) {
        let (c, w, i) = (
            u64::from(chunk_blocks),
            bitmap_words(chunk_blocks),
            i as usize,
        );
        self.words[1 + w + i] = b;
        let home = self.words[0];
        if home != NO_BLOCK && b == home + i as u64 {
            self.words[1 + i / 64] |= 1 << (i % 64);
            return;
        }
        self.words[1 + i / 64] &= !(1 << (i % 64));
        let homeless = home == NO_BLOCK || self.words[1..1 + w].iter().all(|&x| x == 0);
        if homeless && b != NO_BLOCK && b % c == i as u64 {
            self.rehome(Some(b - i as u64), chunk_blocks);
        }
    }
}

impl Entry {
    /// Physical block of slot `i`, if mapped.
    pub(crate) fn block(&self, i: u32, chunk_blocks: u32) -> Option<u64> {
        match self {
            Entry::Compact { pchunk, present } => {
                let on = present
                    .as_ref()
                    .is_none_or(|b| b[i as usize / 64] >> (i % 64) & 1 == 1);
                on.then(|| u64::from(*pchunk) * u64::from(chunk_blocks) + u64::from(i))
            }
            Entry::Split(s) => s.block(i, chunk_blocks),
        }
    }

    /// Calls `f(slot, pblock)` for every mapped slot.
    pub(crate) fn for_each(&self, chunk_blocks: u32, mut f: impl FnMut(u32, u64)) {
        for i in 0..chunk_blocks {
            if let Some(p) = self.block(i, chunk_blocks) {
                f(i, p);
            }
        }
    }

    /// Number of mapped slots.
    pub(crate) fn count(&self, chunk_blocks: u32) -> u32 {
        match self {
            Entry::Compact { present: None, .. } => chunk_blocks,
            Entry::Compact {
                present: Some(b), ..
            } => b.iter().map(|w| w.count_ones()).sum(),
            Entry::Split(s) => s.blocks().iter().filter(|&&b| b != NO_BLOCK).count() as u32,
        }
    }

    /// The compact form of `blocks`, if they line up in one physical chunk.
    fn compact_of(blocks: &[u64], chunk_blocks: u32) -> Option<Entry> {
        let c = u64::from(chunk_blocks);
        let mut pchunk = None;
        // Stops at the first block out of line (a split entry that stays split usually has
        // one among its first blocks) before allocating anything.
        for (i, &b) in blocks.iter().enumerate() {
            if b != NO_BLOCK && (b % c != i as u64 || *pchunk.get_or_insert(b / c) != b / c) {
                return None;
            }
        }
        let mut bits = vec![0u64; bitmap_words(chunk_blocks)];
        for (i, _) in blocks.iter().enumerate().filter(|(_, &b)| b != NO_BLOCK) {
            bits[i / 64] |= 1 << (i % 64);
        }
        let pchunk = u32::try_from(pchunk?).ok()?;
        Some(Entry::Compact {
            pchunk,
            present: compress_bits(bits, chunk_blocks),
        })
    }

    /// The stored form.
    pub(crate) fn to_record(&self, chunk_blocks: u32) -> EntryRecord {
        match self {
            Entry::Compact { pchunk, present } => EntryRecord::Compact {
                pchunk: *pchunk,
                present: match present {
                    Some(b) => b.to_vec(),
                    None => full_bits(chunk_blocks),
                },
            },
            Entry::Split(s) => EntryRecord::Split {
                blocks: s.blocks().to_vec(),
            },
        }
    }

    /// From the stored form; `None` if it maps nothing. Bounds are checked by the caller.
    pub(crate) fn from_record(r: &EntryRecord, chunk_blocks: u32) -> Option<Entry> {
        let e = match r {
            EntryRecord::Compact { pchunk, present } => {
                let mut bits = present.clone();
                mask_tail(&mut bits, chunk_blocks);
                Entry::Compact {
                    pchunk: *pchunk,
                    present: compress_bits(bits, chunk_blocks),
                }
            }
            EntryRecord::Split { blocks } => Entry::compact_of(blocks, chunk_blocks)
                .unwrap_or_else(|| Entry::Split(Split::new(blocks, chunk_blocks, None))),
        };
        (e.count(chunk_blocks) > 0).then_some(e)
    }
}

fn full_bits(chunk_blocks: u32) -> Vec<u64> {
    let mut bits = vec![u64::MAX; bitmap_words(chunk_blocks)];
    mask_tail(&mut bits, chunk_blocks);
    bits
}

fn mask_tail(bits: &mut [u64], chunk_blocks: u32) {
    if !chunk_blocks.is_multiple_of(64) {
        if let Some(last) = bits.last_mut() {
            *last &= (1u64 << (chunk_blocks % 64)) - 1;
        }
    }
}

fn is_full(bits: &[u64], chunk_blocks: u32) -> bool {
    let n = bits.len();
    bits.iter().enumerate().all(|(k, &w)| {
        w == if k + 1 == n && !chunk_blocks.is_multiple_of(64) {
            (1u64 << (chunk_blocks % 64)) - 1
        } else {
            u64::MAX
        }
    })
}

/// A presence bitmap holding slot `i` only.
fn one_bit(i: u32, chunk_blocks: u32) -> Box<[u64]> {
    let mut bits = vec![0u64; bitmap_words(chunk_blocks)];
    bits[i as usize / 64] |= 1 << (i % 64);
    bits.into()
}

/// The smallest entry for per-slot `blocks`: none if empty, compact if they line up.
#[cfg(test)]
fn settle(blocks: &[u64], chunk_blocks: u32) -> Option<Entry> {
    if blocks.iter().all(|&b| b == NO_BLOCK) {
        return None;
    }
    Some(
        Entry::compact_of(blocks, chunk_blocks)
            .unwrap_or_else(|| Entry::Split(Split::new(blocks, chunk_blocks, None))),
    )
}

fn compress_bits(bits: Vec<u64>, chunk_blocks: u32) -> Option<Box<[u64]>> {
    (bits != full_bits(chunk_blocks)).then(|| bits.into_boxed_slice())
}

/// One device's map.
#[derive(Clone, Default)]
pub(crate) struct DeviceMap {
    pages: Vec<Option<Box<[Option<Entry>; PAGE]>>>,
}

impl DeviceMap {
    /// The entry of virtual chunk `v`.
    pub(crate) fn get(&self, v: u64) -> Option<&Entry> {
        let page = self.pages.get((v / PAGE as u64) as usize)?.as_ref()?;
        page[(v % PAGE as u64) as usize].as_ref()
    }

    /// Physical block of virtual block `vblock`, if mapped.
    pub(crate) fn lookup(&self, vblock: u64, chunk_blocks: u32) -> Option<u64> {
        let c = u64::from(chunk_blocks);
        self.get(vblock / c)?
            .block((vblock % c) as u32, chunk_blocks)
    }

    fn slot_mut(&mut self, v: u64) -> &mut Option<Entry> {
        let p = (v / PAGE as u64) as usize;
        if self.pages.len() <= p {
            self.pages.resize_with(p + 1, || None);
        }
        let page = self.pages[p].get_or_insert_with(|| Box::new(std::array::from_fn(|_| None)));
        &mut page[(v % PAGE as u64) as usize]
    }

    /// Sets (or clears) the entry of virtual chunk `v` wholesale.
    pub(crate) fn put(&mut self, v: u64, e: Option<Entry>) {
        if e.is_none() && self.get(v).is_none() {
            return;
        }
        *self.slot_mut(v) = e;
        if self.get(v).is_none() {
            self.drop_page_if_empty(v);
        }
    }

    fn drop_page_if_empty(&mut self, v: u64) {
        let p = (v / PAGE as u64) as usize;
        if let Some(Some(page)) = self.pages.get(p) {
            if page.iter().all(Option::is_none) {
                self.pages[p] = None;
            }
        }
    }

    /// Maps (or with `None` unmaps) one virtual block; returns the physical block it had.
    /// Keeps each entry in its smallest form: compact when the blocks line up, split when not.
    /// Changes an entry in place where it can (a split entry's slot, a compact entry's bit)
    /// and scans a split entry for a collapse only when the change can make it line up.
    pub(crate) fn set_block(
        &mut self,
        vblock: u64,
        new: Option<u64>,
        chunk_blocks: u32,
    ) -> Option<u64> {
        let c = u64::from(chunk_blocks);
        let (v, i) = (vblock / c, (vblock % c) as u32);
        let slot = self.slot_mut(v);
        let old = slot.as_ref().and_then(|e| e.block(i, chunk_blocks));
        if old == new {
            if slot.is_none() {
                self.drop_page_if_empty(v);
            }
            return old;
        }
        let own_offset = new.is_some_and(|p| p % c == u64::from(i));
        match (slot.as_mut(), new) {
            (Some(Entry::Split(s)), n) => {
                s.set(i, n.unwrap_or(NO_BLOCK), chunk_blocks);
                // A block off its own offset keeps the entry split; otherwise it may line up
                // again (or, after an unmap, be empty).
                if n.is_none() || own_offset {
                    if s.blocks().iter().all(|&b| b == NO_BLOCK) {
                        *slot = None;
                    } else if let Some(e) = Entry::compact_of(s.blocks(), chunk_blocks) {
                        *slot = Some(e);
                    }
                }
            }
            (Some(Entry::Compact { pchunk, present }), n)
                if n.is_none() || n == Some(u64::from(*pchunk) * c + u64::from(i)) =>
            {
                let bits = present.get_or_insert_with(|| full_bits(chunk_blocks).into());
                let (w, b) = (i as usize / 64, i % 64);
                if n.is_some() {
                    bits[w] |= 1 << b;
                } else {
                    bits[w] &= !(1 << b);
                }
                if bits.iter().all(|&x| x == 0) {
                    *slot = None;
                } else if is_full(bits, chunk_blocks) {
                    *present = None;
                }
            }
            (Some(Entry::Compact { pchunk, present }), Some(p)) => {
                // The block moves off the entry's chunk (a copy-on-write): the entry becomes
                // split, unless slot i is its only block and lands at its own offset.
                let others = match present {
                    None => chunk_blocks,
                    Some(bits) => bits.iter().map(|w| w.count_ones()).sum(),
                } - u32::from(old.is_some());
                *slot = if others == 0 && own_offset {
                    Some(Entry::Compact {
                        pchunk: u32::try_from(p / c).expect("physical chunk fits in u32"),
                        present: Some(one_bit(i, chunk_blocks)),
                    })
                } else {
                    let base = u64::from(*pchunk) * c;
                    let mut blocks = vec![NO_BLOCK; chunk_blocks as usize].into_boxed_slice();
                    match present {
                        None => {
                            for (j, b) in blocks.iter_mut().enumerate() {
                                *b = base + j as u64;
                            }
                        }
                        Some(bits) => {
                            for (j, b) in blocks.iter_mut().enumerate() {
                                if bits[j / 64] >> (j % 64) & 1 == 1 {
                                    *b = base + j as u64;
                                }
                            }
                        }
                    }
                    blocks[i as usize] = p;
                    Some(Entry::Split(Split::new(&blocks, chunk_blocks, Some(base))))
                };
            }
            (None, Some(p)) => {
                *slot = Some(if own_offset {
                    Entry::Compact {
                        pchunk: u32::try_from(p / c).expect("physical chunk fits in u32"),
                        present: Some(one_bit(i, chunk_blocks)),
                    }
                } else {
                    let mut blocks = vec![NO_BLOCK; chunk_blocks as usize];
                    blocks[i as usize] = p;
                    Entry::Split(Split::new(&blocks, chunk_blocks, None))
                });
            }
            (None, None) | (Some(Entry::Compact { .. }), None) => {
                unreachable!(
                    "unmapping an unmapped slot is handled above, a mapped one by the in-place arm"
                )
            }
        }
        if slot.is_none() {
            self.drop_page_if_empty(v);
        }
        old
    }

    /// Every mapped virtual chunk in ascending order.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (u64, &Entry)> {
        self.pages.iter().enumerate().flat_map(|(p, page)| {
            page.iter().flat_map(move |pg| {
                pg.iter()
                    .enumerate()
                    .filter_map(move |(k, e)| e.as_ref().map(|e| ((p * PAGE + k) as u64, e)))
            })
        })
    }

    /// Heap and inline bytes this map uses (for the metadata-cost benchmark).
    pub(crate) fn memory_bytes(&self) -> usize {
        let mut n =
            self.pages.capacity() * std::mem::size_of::<Option<Box<[Option<Entry>; PAGE]>>>();
        for page in self.pages.iter().flatten() {
            n += std::mem::size_of::<[Option<Entry>; PAGE]>();
            for e in page.iter().flatten() {
                n += match e {
                    Entry::Compact {
                        present: Some(b), ..
                    } => b.len() * 8,
                    Entry::Compact { present: None, .. } => 0,
                    Entry::Split(s) => s.words.len() * 8,
                };
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const C: u32 = 16;

    #[test]
    fn entry_is_small() {
        assert!(std::mem::size_of::<Option<Entry>>() <= 24);
    }

    #[test]
    fn sequential_blocks_stay_compact_and_fill_up() {
        let mut m = DeviceMap::default();
        for i in 0..C as u64 {
            assert_eq!(m.set_block(16 + i, Some(5 * 16 + i), C), None);
            assert!(matches!(m.get(1), Some(Entry::Compact { pchunk: 5, .. })));
        }
        assert_eq!(
            m.get(1),
            Some(&Entry::Compact {
                pchunk: 5,
                present: None
            })
        );
        assert_eq!(m.lookup(16 + 3, C), Some(83));
        assert_eq!(m.lookup(3, C), None);
    }

    #[test]
    fn off_offset_write_splits_and_collapses_back() {
        let mut m = DeviceMap::default();
        for i in 0..C as u64 {
            m.set_block(i, Some(2 * 16 + i), C);
        }
        // Copy-on-write of block 3 into chunk 7: split.
        assert_eq!(m.set_block(3, Some(7 * 16 + 3), C), Some(35));
        assert!(matches!(m.get(0), Some(Entry::Split(_))));
        assert_eq!(m.lookup(3, C), Some(115));
        assert_eq!(m.lookup(4, C), Some(36));
        // Every other block moves to chunk 7 too: compact again.
        for i in (0..C as u64).filter(|&i| i != 3) {
            m.set_block(i, Some(7 * 16 + i), C);
        }
        assert_eq!(
            m.get(0),
            Some(&Entry::Compact {
                pchunk: 7,
                present: None
            })
        );
        // Unmapping everything removes the entry and its page.
        for i in 0..C as u64 {
            m.set_block(i, None, C);
        }
        assert!(m.get(0).is_none());
        assert_eq!(m.entries().count(), 0);
        assert!(m.pages.iter().all(Option::is_none));
    }

    /// Random maps and unmaps against a plain per-slot model: after every change the entry
    /// is exactly the canonical form of the model's slots (none when empty, compact when the
    /// blocks line up, split otherwise), whatever path `set_block` took.
    #[test]
    fn set_block_keeps_the_canonical_form() {
        use rand::{Rng, SeedableRng};
        for cb in [16u32, 32, 128] {
            let c = u64::from(cb);
            let mut r = rand::rngs::SmallRng::seed_from_u64(u64::from(cb));
            let mut m = DeviceMap::default();
            let mut model = vec![NO_BLOCK; cb as usize];
            for step in 0..20_000 {
                let i = r.random_range(0..cb) as usize;
                let new = match r.random_range(0..10) {
                    0..=1 => None,
                    // Own offset in one of a few chunks: lines up often.
                    2..=7 => Some(r.random_range(1..4u64) * c + i as u64),
                    _ => Some(r.random_range(0..8 * c)),
                };
                let old = m.set_block(5 * c + i as u64, new, cb);
                let want_old = Some(model[i]).filter(|&b| b != NO_BLOCK);
                assert_eq!(old, want_old, "cb {cb} step {step}");
                model[i] = new.unwrap_or(NO_BLOCK);
                let want = settle(&model, cb);
                assert_eq!(m.get(5), want.as_ref(), "cb {cb} step {step}");
                if let Some(Entry::Split(s)) = m.get(5) {
                    home_bits_exact(s, cb);
                }
                for (j, &b) in model.iter().enumerate() {
                    let got = m.lookup(5 * c + j as u64, cb);
                    assert_eq!(got, Some(b).filter(|&b| b != NO_BLOCK));
                }
                if r.random_range(0..500) == 0 {
                    // Fill the chunk at its own offsets: a full compact entry, no bitmap.
                    for (j, slot) in model.iter_mut().enumerate() {
                        m.set_block(5 * c + j as u64, Some(2 * c + j as u64), cb);
                        *slot = 2 * c + j as u64;
                    }
                    assert_eq!(
                        m.get(5),
                        Some(&Entry::Compact {
                            pchunk: 2,
                            present: None
                        })
                    );
                }
            }
        }
    }

    /// Bit i of a split entry's summary is set exactly when slot i is at its home offset.
    fn home_bits_exact(s: &Split, cb: u32) {
        let w = bitmap_words(cb);
        assert_eq!(s.w(), w);
        assert_eq!(s.blocks().len(), cb as usize);
        for (i, &b) in s.blocks().iter().enumerate() {
            let bit = s.words[1 + i / 64] >> (i % 64) & 1 == 1;
            assert_eq!(
                bit,
                s.words[0] != NO_BLOCK && b == s.words[0] + i as u64,
                "slot {i}"
            );
        }
    }

    #[test]
    fn split_summary_answers_home_slots() {
        for cb in [2u32, 16, 63, 64, 65, 128, 256, 448] {
            let c = u64::from(cb);
            let mut m = DeviceMap::default();
            for i in 0..c {
                m.set_block(i, Some(3 * c + i), cb);
            }
            // A copy-on-write of slot 0 into chunk 9 at another offset: split, home chunk 3.
            let moved = 9 * c + 1;
            m.set_block(0, Some(moved), cb);
            let Some(Entry::Split(s)) = m.get(0) else {
                panic!("cb {cb}: not split");
            };
            home_bits_exact(s, cb);
            assert_eq!(s.words[0], 3 * c);
            assert_eq!(m.lookup(0, cb), Some(moved));
            for i in 1..c {
                assert_eq!(m.lookup(i, cb), Some(3 * c + i));
            }
        }
    }

    #[test]
    fn records_round_trip() {
        let mut m = DeviceMap::default();
        m.set_block(1, Some(33), C);
        m.set_block(2, Some(99), C);
        m.set_block(100, Some(4 * 16 + 4), C);
        for (v, e) in m.entries() {
            assert_eq!(
                Entry::from_record(&e.to_record(C), C).as_ref(),
                Some(e),
                "chunk {v}"
            );
        }
    }
}
