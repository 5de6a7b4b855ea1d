//! A device's two-level map: virtual chunk -> entry, entry -> physical blocks.
//!
//! This module owns the in-memory representation of one device's mapping and the rules that
//! move an entry between its forms. It must never allocate physical space or count
//! references: callers (`state`) do that around every change it reports.
//!
//! - `Compact`: every present block i of the virtual chunk is block i of one physical chunk.
//!   24 bytes; a full chunk needs no bitmap at all, a partial one a heap bitmap of C/8 bytes.
//! - `Split`: used only once a chunk's blocks live in more than one physical chunk or off
//!   their own offset. A home chunk and a bitmap of the slots at their own offset there
//!   (after a copy-on-write, nearly all of them), then one physical block number (8 bytes)
//!   per slot that is not: a lookup of a slot at home reads one cache line, and an entry
//!   costs 8 bytes per moved block, not per block.
//! - `Scattered`: a split entry with too few blocks at home for that form to be smaller:
//!   one physical block number per slot (8 bytes per block).
//!
//! A split entry collapses back to `Compact` as soon as its blocks line up again.
//!
//! Entries live in pages of `PAGE` slots indexed directly by virtual chunk, so a lookup is
//! two array indexes whatever the snapshot depth; a snapshot clones only the pages that hold
//! entries.

use hpm_format::{bitmap_words, EntryRecord, NO_BLOCK};

const PAGE: usize = 64;

/// One virtual chunk's mapping.
#[derive(Clone, Debug)]
pub(crate) enum Entry {
    /// Blocks at their own offset in `pchunk`; `present` None means all blocks.
    Compact {
        pchunk: u32,
        present: Option<Box<[u64]>>,
    },
    /// Split, in the home form (see `Split`): the usual split entry, smaller than a
    /// per-block array whenever a few of its blocks are still at home.
    Split(Split),
    /// Split with too few blocks at home for the home form to be smaller: per-block
    /// physical numbers, `NO_BLOCK` where unmapped (8 bytes per block).
    Scattered(Box<[u64]>),
}

/// The split entry for per-slot `blocks` in the smaller of its two forms (the home form
/// when they tie), with `home` as its home chunk if given, else the likeliest one.
fn split_entry(blocks: &[u64], chunk_blocks: u32, home: Option<u32>) -> Entry {
    let c = u64::from(chunk_blocks);
    let home = home
        .or_else(|| likeliest_home(blocks, chunk_blocks))
        .unwrap_or(NO_HOME);
    let mut words = vec![0u64; 1 + bitmap_words(chunk_blocks)];
    if home != NO_HOME {
        for (i, &b) in blocks.iter().enumerate() {
            if b == u64::from(home) * c + i as u64 {
                words[1 + i / 64] |= 1 << (i % 64);
            }
        }
    }
    finish_split(words, home, chunk_blocks, |i| blocks[i])
}

/// Completes a split entry from its home bits (`words` = one header word, not yet written,
/// then the bitmap): the home form with `block(i)` of every slot off home appended, or the
/// per-block array if that is smaller.
fn finish_split(
    mut words: Vec<u64>,
    home: u32,
    chunk_blocks: u32,
    block: impl Fn(usize) -> u64,
) -> Entry {
    let (n, w) = (chunk_blocks as usize, bitmap_words(chunk_blocks));
    let homed: usize = words[1..].iter().map(|x| x.count_ones() as usize).sum();
    if 1 + w + (n - homed) > n {
        return Entry::Scattered((0..n).map(block).collect());
    }
    words[0] = u64::from(home) << 32 | u64::from(chunk_blocks);
    words.reserve_exact(n - homed);
    for i in 0..n {
        if words[1 + i / 64] >> (i % 64) & 1 == 0 {
            words.push(block(i));
        }
    }
    Entry::Split(Split {
        words: words.into_boxed_slice(),
    })
}

/// The chunk that holds the most of `blocks` at their own offsets, if any does.
fn likeliest_home(blocks: &[u64], chunk_blocks: u32) -> Option<u32> {
    let c = u64::from(chunk_blocks);
    let mut homes: Vec<u64> = (0..blocks.len())
        .filter(|&i| blocks[i] != NO_BLOCK && blocks[i] % c == i as u64)
        .map(|i| blocks[i] / c)
        .collect();
    homes.sort_unstable();
    let best = homes.chunk_by(|a, b| a == b).max_by_key(|run| run.len())?;
    u32::try_from(best[0]).ok().filter(|&h| h != NO_HOME)
}

/// A split entry's slots, in one allocation: `[header, home bits (W words), others]`. The
/// header packs the home chunk (`NO_HOME` if none) in its high half and the chunk's block
/// count C in its low half; bit i of the home bits says slot i is block `home * C + i`;
/// `others` holds, in slot order, the block (or `NO_BLOCK`) of every slot whose bit is
/// clear. A slot at home is answered from the first `1 + W` words (one cache line up to
/// 448-block chunks), and an entry costs 8 bytes only per slot that moved: after a few
/// copy-on-writes into a shared chunk, a few words instead of C.
#[derive(Clone, Debug)]
pub(crate) struct Split {
    words: Box<[u64]>,
}

/// No home chunk (the header's high half).
const NO_HOME: u32 = u32::MAX;

impl PartialEq for Entry {
    /// Equal when both are compact with the same chunk and blocks, or both split and map
    /// the same blocks, whichever split form and home each has.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                Entry::Compact { pchunk, present },
                Entry::Compact {
                    pchunk: p2,
                    present: q2,
                },
            ) => pchunk == p2 && present == q2,
            (Entry::Compact { .. }, _) | (_, Entry::Compact { .. }) => false,
            (a, b) => a.split_blocks() == b.split_blocks(),
        }
    }
}
impl Eq for Entry {}

impl Split {
    /// The entry after the copy-on-write of slot `i` of a compact entry in `pchunk` (with
    /// `present`) to block `p`: home `pchunk`, its bits less slot i; `others` is slot i and
    /// the unmapped slots. Built from the bits, without the per-block array: the hot path
    /// of a first write into a shared chunk.
    fn cow_of_compact(
        pchunk: u32,
        present: Option<&[u64]>,
        i: u32,
        p: u64,
        chunk_blocks: u32,
    ) -> Entry {
        let i = i as usize;
        let mut words = vec![0u64];
        match present {
            Some(bits) => words.extend_from_slice(bits),
            None => words.extend(full_bits(chunk_blocks)),
        }
        words[1 + i / 64] &= !(1 << (i % 64));
        if pchunk == NO_HOME {
            // No chunk number left to mean "home": every slot goes to `others`.
            words[1..].fill(0);
        }
        let base = u64::from(pchunk) * u64::from(chunk_blocks);
        finish_split(words, pchunk, chunk_blocks, |j| {
            if j == i {
                p
            } else if present.is_none_or(|bits| bits[j / 64] >> (j % 64) & 1 == 1) {
                base + j as u64
            } else {
                NO_BLOCK
            }
        })
    }

    fn chunk_blocks(&self) -> u32 {
        self.words[0] as u32
    }

    fn home(&self) -> u32 {
        (self.words[0] >> 32) as u32
    }

    /// Whether slot `i` is at home, and else its index in `others`.
    fn locate(&self, i: usize) -> Result<(), usize> {
        if self.words[1 + i / 64] >> (i % 64) & 1 == 1 {
            return Ok(());
        }
        Err(i - self.home_below(i))
    }

    /// Per-slot physical blocks, `NO_BLOCK` where unmapped.
    pub(crate) fn blocks(&self) -> Vec<u64> {
        let cb = self.chunk_blocks();
        (0..cb)
            .map(|i| self.block(i, cb).unwrap_or(NO_BLOCK))
            .collect()
    }

    fn block(&self, i: u32, chunk_blocks: u32) -> Option<u64> {
        match self.locate(i as usize) {
            Ok(()) => Some(u64::from(self.home()) * u64::from(chunk_blocks) + u64::from(i)),
            Err(k) => {
                let b = self.words[1 + bitmap_words(chunk_blocks) + k];
                (b != NO_BLOCK).then_some(b)
            }
        }
    }

    /// Number of mapped slots.
    fn count(&self, chunk_blocks: u32) -> u32 {
        let w = bitmap_words(chunk_blocks);
        let home: u32 = self.words[1..1 + w].iter().map(|x| x.count_ones()).sum();
        home + self.words[1 + w..]
            .iter()
            .filter(|&&b| b != NO_BLOCK)
            .count() as u32
    }

    /// Maps slot `i` to block `b`, off home, when the entry provably stays in the home
    /// form: some other slot stays at home (so it cannot become compact, nor want another
    /// home) and the entry stays no larger than C words. In place if slot i was off home
    /// already, else one allocation with `b` inserted into `others`. False (nothing
    /// changed) otherwise: an unmap, a move back home, the last slot leaving home; the
    /// caller then rebuilds the entry. The hot case is a copy-on-write into a chunk split
    /// before (a container's writes landing block by block in its own chunk).
    fn set_moved(&mut self, i: u32, b: u64, chunk_blocks: u32) -> bool {
        let (c, w, i) = (
            u64::from(chunk_blocks),
            bitmap_words(chunk_blocks),
            i as usize,
        );
        let home = self.home();
        if b == NO_BLOCK || home == NO_HOME || b == u64::from(home) * c + i as u64 {
            return false;
        }
        let bits = &self.words[1..1 + w];
        let others_home = bits.iter().enumerate().any(|(k, &x)| {
            if k == i / 64 {
                x & !(1 << (i % 64)) != 0
            } else {
                x != 0
            }
        });
        if !others_home {
            return false;
        }
        match self.locate(i) {
            Err(k) => self.words[1 + w + k] = b,
            Ok(()) => {
                if self.words.len() + 1 > chunk_blocks as usize {
                    return false;
                }
                // Slot i joins `others` at its place in slot order: after the off-home
                // slots below it.
                let at = 1 + w + (i - self.home_below(i));
                let mut words = Vec::with_capacity(self.words.len() + 1);
                words.extend_from_slice(&self.words[..at]);
                words.push(b);
                words.extend_from_slice(&self.words[at..]);
                words[1 + i / 64] &= !(1 << (i % 64));
                self.words = words.into_boxed_slice();
            }
        }
        true
    }

    /// Slots below `i` that are at home.
    fn home_below(&self, i: usize) -> usize {
        let bits = &self.words[1..];
        let whole: u32 = bits[..i / 64].iter().map(|w| w.count_ones()).sum();
        (whole + (bits[i / 64] & ((1u64 << (i % 64)) - 1)).count_ones()) as usize
    }

    /// Whether any slot is at home.
    fn has_home(&self, chunk_blocks: u32) -> bool {
        self.words[1..1 + bitmap_words(chunk_blocks)]
            .iter()
            .any(|&x| x != 0)
    }
}

impl Entry {
    /// A split entry's per-slot blocks (empty for a compact entry).
    fn split_blocks(&self) -> Vec<u64> {
        match self {
            Entry::Compact { .. } => Vec::new(),
            Entry::Split(s) => s.blocks(),
            Entry::Scattered(blocks) => blocks.to_vec(),
        }
    }

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
            Entry::Scattered(blocks) => Some(blocks[i as usize]).filter(|&b| b != NO_BLOCK),
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
            Entry::Split(s) => s.count(chunk_blocks),
            Entry::Scattered(blocks) => blocks.iter().filter(|&&b| b != NO_BLOCK).count() as u32,
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
            Entry::Split(s) => EntryRecord::Split { blocks: s.blocks() },
            Entry::Scattered(blocks) => EntryRecord::Split {
                blocks: blocks.to_vec(),
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
                .unwrap_or_else(|| split_entry(blocks, chunk_blocks, None)),
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

/// The smallest entry for per-slot `blocks`: none if empty, compact if they line up, else
/// the smaller split form (with `home` as its home chunk if given).
fn settle_split(blocks: &[u64], chunk_blocks: u32, home: Option<u32>) -> Option<Entry> {
    if blocks.iter().all(|&b| b == NO_BLOCK) {
        return None;
    }
    Some(
        Entry::compact_of(blocks, chunk_blocks)
            .unwrap_or_else(|| split_entry(blocks, chunk_blocks, home)),
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
        // Unmapping in an empty chunk: nothing to do, and no page to make for it.
        if new.is_none() && self.get(v).is_none() {
            return None;
        }
        let slot = self.slot_mut(v);
        let old = slot.as_ref().and_then(|e| e.block(i, chunk_blocks));
        if old == new {
            return old;
        }
        let own_offset = new.is_some_and(|p| p % c == u64::from(i));
        match (slot.as_mut(), new) {
            (Some(e @ (Entry::Split(_) | Entry::Scattered(_))), n) => {
                let b = n.unwrap_or(NO_BLOCK);
                // A block off its own offset keeps a scattered entry scattered; otherwise it
                // may line up again (or, after an unmap, be empty), or be worth the home form.
                // `Split::set_moved` knows when a home-form entry cannot change form.
                let may_change_form = n.is_none() || own_offset;
                let in_place = match e {
                    Entry::Split(s) => s.set_moved(i, b, chunk_blocks),
                    Entry::Scattered(blocks) if !may_change_form => {
                        blocks[i as usize] = b;
                        true
                    }
                    Entry::Scattered(_) => false,
                    Entry::Compact { .. } => unreachable!("matched above"),
                };
                if !in_place {
                    let (mut blocks, home) = match e {
                        Entry::Split(s) => (s.blocks(), s.has_home(chunk_blocks).then(|| s.home())),
                        Entry::Scattered(blocks) => (blocks.to_vec(), None),
                        Entry::Compact { .. } => unreachable!("matched above"),
                    };
                    blocks[i as usize] = b;
                    *slot = settle_split(&blocks, chunk_blocks, home);
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
                    Some(Split::cow_of_compact(
                        *pchunk,
                        present.as_deref(),
                        i,
                        p,
                        chunk_blocks,
                    ))
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
                    split_entry(&blocks, chunk_blocks, None)
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
                    Entry::Scattered(blocks) => blocks.len() * 8,
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
            let mut forms = [0u32; 2];
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
                let want = settle_split(&model, cb, None);
                assert_eq!(m.get(5), want.as_ref(), "cb {cb} step {step}");
                match m.get(5) {
                    Some(Entry::Split(s)) => {
                        home_bits_exact(s, cb);
                        forms[0] += 1;
                    }
                    Some(Entry::Scattered(_)) => forms[1] += 1,
                    _ => {}
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
            // Both split forms were taken (and checked) along the way.
            assert!(forms.iter().all(|&n| n > 0), "cb {cb}: forms {forms:?}");
        }
    }

    /// Bit i of a split entry's summary is set exactly when slot i is at its home offset,
    /// and `others` holds exactly the slots whose bit is clear.
    fn home_bits_exact(s: &Split, cb: u32) {
        let (w, c) = (bitmap_words(cb), u64::from(cb));
        assert_eq!(s.chunk_blocks(), cb);
        let blocks = s.blocks();
        assert_eq!(blocks.len(), cb as usize);
        let mut at_home = 0;
        for (i, &b) in blocks.iter().enumerate() {
            let bit = s.words[1 + i / 64] >> (i % 64) & 1 == 1;
            let home = s.home() != NO_HOME && b == u64::from(s.home()) * c + i as u64;
            assert_eq!(bit, home, "slot {i}");
            at_home += usize::from(bit);
        }
        assert_eq!(s.words.len(), 1 + w + cb as usize - at_home);
        // Never larger than the per-block array it replaces.
        assert!(s.words.len() <= cb as usize);
    }

    #[test]
    fn split_summary_answers_home_slots() {
        for cb in [16u32, 63, 64, 65, 128, 256, 448] {
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
            assert_eq!(s.home(), 3);
            // Header, bitmap and the one block that moved.
            assert_eq!(s.words.len(), 1 + bitmap_words(cb) + 1);
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
