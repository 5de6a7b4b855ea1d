//! A sparse byte image: the contents of one simulated file at one moment.
//!
//! This module owns the page map behind a simulated file's live and durable images. Pages are
//! shared copy-on-write (`Arc`), so copying a whole image — what every sync and every crash
//! does — costs one pointer per page instead of the file's size, and a file extended with
//! `set_len` to gigabytes costs nothing until it is written.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Bytes per page of an image.
const PAGE: u64 = 4096;

type Page = Arc<[u8; PAGE as usize]>;

/// The contents and length of a file.
///
/// Invariants: no page lies at or beyond `len.div_ceil(PAGE)`, and the bytes of the last page
/// at or past `len` are zero. Together they make every read past the end return zeros and let
/// `set_len` grow the file without touching a page.
#[derive(Clone, Debug, Default)]
pub(crate) struct Image {
    len: u64,
    pages: BTreeMap<u64, Page>,
}

/// The pages `[offset, offset + len)` touches, each as (page index, start in page, end in page).
fn spans(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let end = offset + len;
    let first = offset / PAGE;
    let last = if len == 0 { first } else { end.div_ceil(PAGE) };
    (first..last).map(move |p| {
        let start = offset.max(p * PAGE) - p * PAGE;
        let stop = end.min((p + 1) * PAGE) - p * PAGE;
        (p, start as usize, stop as usize)
    })
}

impl Image {
    /// Length in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Bytes held in pages: what a sparse file would have allocated.
    pub(crate) fn allocated(&self) -> u64 {
        self.pages.len() as u64 * PAGE
    }

    /// Fills `buf` from `offset`; bytes past the end read as zeros. The caller has checked
    /// that `offset + buf.len()` does not overflow.
    pub(crate) fn read(&self, buf: &mut [u8], offset: u64) {
        buf.fill(0);
        let mut pos = 0;
        for (p, start, stop) in spans(offset, buf.len() as u64) {
            if let Some(page) = self.pages.get(&p) {
                buf[pos..pos + stop - start].copy_from_slice(&page[start..stop]);
            }
            pos += stop - start;
        }
    }

    /// Writes `data` at `offset`, growing the image if it ends past the end. The caller has
    /// checked that `offset + data.len()` does not overflow.
    pub(crate) fn write(&mut self, data: &[u8], offset: u64) {
        let mut pos = 0;
        for (p, start, stop) in spans(offset, data.len() as u64) {
            let page = self
                .pages
                .entry(p)
                .or_insert_with(|| Arc::new([0; PAGE as usize]));
            Arc::make_mut(page)[start..stop].copy_from_slice(&data[pos..pos + stop - start]);
            pos += stop - start;
        }
        if !data.is_empty() {
            self.len = self.len.max(offset + data.len() as u64);
        }
    }

    /// Zeroes `[offset, offset + len)` without changing the length; whole pages are freed.
    pub(crate) fn punch(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.len);
        if offset >= end {
            return;
        }
        for (p, start, stop) in spans(offset, end - offset) {
            if start == 0 && stop == PAGE as usize {
                self.pages.remove(&p);
            } else if let Some(page) = self.pages.get_mut(&p) {
                Arc::make_mut(page)[start..stop].fill(0);
            }
        }
    }

    /// Truncates or extends with zeros.
    pub(crate) fn set_len(&mut self, len: u64) {
        if len < self.len {
            // Drop whole pages past the new end, then zero the tail of the new last page so
            // that a later extension reads zeros there (the invariant).
            self.pages.split_off(&len.div_ceil(PAGE));
            let tail = (len % PAGE) as usize;
            if tail != 0 {
                if let Some(page) = self.pages.get_mut(&(len / PAGE)) {
                    Arc::make_mut(page)[tail..].fill(0);
                }
            }
        }
        self.len = len;
    }

    /// The whole contents as one vector of `len` bytes.
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        let len = usize::try_from(self.len).expect("image too large to copy into memory");
        let mut out = vec![0; len];
        self.read(&mut out, 0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn spans_cover_the_range_exactly() {
        let s: Vec<_> = spans(4000, 5000).collect();
        assert_eq!(s, vec![(0, 4000, 4096), (1, 0, 4096), (2, 0, 808)]);
        assert_eq!(spans(8192, 0).count(), 0);
        assert_eq!(spans(8192, 4096).collect::<Vec<_>>(), vec![(2, 0, 4096)]);
    }

    #[test]
    fn truncate_then_extend_reads_zeros() {
        let mut img = Image::default();
        img.write(&[7; 10_000], 0);
        img.set_len(5000);
        img.set_len(9000);
        let v = img.to_vec();
        assert!(v[..5000].iter().all(|&b| b == 7));
        assert!(v[5000..].iter().all(|&b| b == 0));
        assert_eq!(img.allocated(), 2 * PAGE);
    }

    #[test]
    fn punch_frees_whole_pages_and_keeps_length() {
        let mut img = Image::default();
        img.write(&[1; 3 * 4096], 0);
        img.punch(100, 2 * 4096);
        assert_eq!(img.len(), 3 * 4096);
        // Page 1 is fully inside the hole; pages 0 and 2 are only partly.
        assert_eq!(img.allocated(), 2 * PAGE);
        let v = img.to_vec();
        assert!(v[..100].iter().all(|&b| b == 1));
        assert!(v[100..100 + 8192].iter().all(|&b| b == 0));
        assert!(v[100 + 8192..].iter().all(|&b| b == 1));
        // A punch past the end changes nothing, not even the length.
        img.punch(1 << 20, 4096);
        assert_eq!(img.len(), 3 * 4096);
    }

    #[test]
    fn copies_do_not_share_writes() {
        let mut a = Image::default();
        a.write(b"hello", 0);
        let b = a.clone();
        a.write(b"J", 0);
        assert_eq!(a.to_vec(), b"Jello");
        assert_eq!(b.to_vec(), b"hello");
    }

    /// Random operations against a flat vector with the same rules.
    #[test]
    fn matches_a_flat_vector() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut img = Image::default();
        let mut flat: Vec<u8> = Vec::new();
        for step in 0..2000 {
            let offset = rng.random_range(0..40_000u64);
            let len = rng.random_range(0..9000u64);
            match rng.random_range(0..3) {
                0 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.random_range(1..=255)).collect();
                    img.write(&data, offset);
                    if len > 0 {
                        let end = (offset + len) as usize;
                        if flat.len() < end {
                            flat.resize(end, 0);
                        }
                        flat[offset as usize..end].copy_from_slice(&data);
                    }
                }
                1 => {
                    img.punch(offset, len);
                    let end = ((offset + len) as usize).min(flat.len());
                    let start = (offset as usize).min(end);
                    flat[start..end].fill(0);
                }
                _ => {
                    img.set_len(offset);
                    flat.resize(offset as usize, 0);
                }
            }
            assert_eq!(img.len(), flat.len() as u64, "step {step}");
            let mut buf = vec![0xEE; len as usize];
            img.read(&mut buf, offset);
            let mut want = vec![0; len as usize];
            for (i, w) in want.iter_mut().enumerate() {
                *w = flat.get(offset as usize + i).copied().unwrap_or(0);
            }
            assert_eq!(buf, want, "step {step}");
        }
        assert_eq!(img.to_vec(), flat);
    }
}
