//! Device handles and the data path: read, write with copy-on-write, discard, write-zeroes.
//!
//! This module owns turning a byte-range request into a plan (zero / read physical X /
//! overwrite X in place / write new block Y, copying from X) under the metadata lock, doing
//! the data I/O with no metadata lock held, and installing the new mappings after the data
//! is written. It must never make a mapping visible before its data is in the backend, and
//! never hand a read a block that could be reused before the read ends (see `pool`'s gate).

use crate::pool::{not_found, Inner, Pool};
use crate::state::{DeviceState, State};
use crate::stats::*;
use crate::{Error, ErrorKind, Result};
use hpm_format::{Record, BLOCK_SIZE};
use hpm_io::Backend;
use smallvec::SmallVec;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const B: u64 = BLOCK_SIZE;

thread_local! {
    /// The run-sized buffer of a read (with pieces) that covers a cached run's first or last
    /// block only in part: kept, so that it is zeroed only when it grows, not per read.
    static RUN_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An open device. Reads and writes at any byte offset and length within its size. While a
/// handle is open the device cannot be removed.
pub struct Device {
    inner: Arc<Inner>,
    id: u32,
    /// The device's size, kept in step by the state (see `DeviceState::size_seen`).
    size: Arc<AtomicU64>,
    name: String,
    read_only: bool,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// The device owns the block: write over it.
    InPlace,
    /// A new block; `old` is the shared (or absent) block it replaces.
    New { old: Option<u64> },
    /// Chunk-granularity copy-on-write: copy `old` whole into the new block.
    Copy { old: u64 },
}

/// A run of a read plan: `n` blocks from virtual block `b0`, at consecutive physical blocks
/// from `p0` (or unmapped, reading as zeros), through the cache or not.
#[derive(Debug, Clone, Copy)]
struct ReadRun {
    b0: u64,
    n: u64,
    p0: Option<u64>,
    cached: bool,
}

impl ReadRun {
    /// Whether virtual block `b`, mapped to `p`, continues this run.
    fn extends(&self, b: u64, p: Option<u64>, cached: bool) -> bool {
        self.b0 + self.n == b
            && match (self.p0, p) {
                (Some(p0), Some(p)) => p == p0 + self.n && cached == self.cached,
                (None, None) => true,
                _ => false,
            }
    }
}

/// Where one part of a read's result is: see [`Device::read_pieces`].
#[derive(Debug, Clone)]
pub enum ReadPiece {
    /// `len` bytes at `start` of the caller's buffer.
    Buf {
        /// Offset in the buffer.
        start: usize,
        /// Length in bytes.
        len: usize,
    },
    /// `len` bytes at `start` of a 4 KiB block held by the pool's block cache. The bytes
    /// never change: a write to the block gives the cache a new buffer while this one is
    /// held.
    Cached {
        /// The cached block.
        data: Arc<[u8]>,
        /// Offset in the block.
        start: usize,
        /// Length in bytes.
        len: usize,
    },
}

impl ReadPiece {
    /// The piece's bytes, given the buffer the read filled.
    pub fn bytes<'a>(&'a self, buf: &'a [u8]) -> &'a [u8] {
        match self {
            ReadPiece::Buf { start, len } => &buf[*start..*start + *len],
            ReadPiece::Cached { data, start, len } => &data[*start..*start + *len],
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        match self {
            ReadPiece::Buf { len, .. } | ReadPiece::Cached { len, .. } => *len,
        }
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Appends `len` bytes of the caller's buffer at `start`, merged into the last piece when
/// that one ends there.
fn push_buf(pieces: &mut Vec<ReadPiece>, start: usize, len: usize) {
    if let Some(ReadPiece::Buf { start: s, len: l }) = pieces.last_mut() {
        if *s + *l == start {
            *l += len;
            return;
        }
    }
    pieces.push(ReadPiece::Buf { start, len });
}

#[derive(Debug, Clone, Copy)]
struct Op {
    vblock: u64,
    pblock: u64,
    kind: Kind,
}

/// Chunks and blocks one `Device::allocation` call looks at before it answers for a prefix
/// (about a millisecond of work under the state's read lock).
const ALLOCATION_WORK: usize = 1 << 16;

/// A write plan; on the stack for writes of up to 16 blocks.
type Ops = SmallVec<[Op; 16]>;

impl Pool {
    /// Opens device `name` for I/O.
    pub fn open_device(&self, name: &str) -> Result<Device> {
        let mut live = self.inner.live_write()?;
        let d = live.st.by_name(name).ok_or_else(|| not_found(name))?;
        let (id, read_only, size) = (d.id, d.read_only, d.size_seen.clone());
        *live.open.entry(id).or_default() += 1;
        Ok(Device {
            inner: self.inner.clone(),
            id,
            size,
            name: name.to_string(),
            read_only,
        })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // A stopped pool keeps its open counts: nothing is removed from it any more.
        let Ok(mut live) = self.inner.live_write() else {
            return;
        };
        if let Some(n) = live.open.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                live.open.remove(&self.id);
            }
        }
    }
}

fn push_map(records: &mut Vec<Record>, dev: u32, vblock: u64, pblock: u64) {
    if let Some(Record::Map {
        dev: d,
        vblock: v,
        pblock: p,
        count: c,
    }) = records.last_mut()
    {
        if *d == dev
            && *v + u64::from(*c) == vblock
            && *p + u64::from(*c) == pblock
            && *c < u32::MAX
        {
            *c += 1;
            return;
        }
    }
    records.push(Record::Map {
        dev,
        vblock,
        pblock,
        count: 1,
    });
}

fn push_unmap(records: &mut Vec<Record>, dev: u32, vblock: u64) {
    if let Some(Record::Unmap {
        dev: d,
        vblock: v,
        count: c,
    }) = records.last_mut()
    {
        if *d == dev && *v + u64::from(*c) == vblock && *c < u32::MAX {
            *c += 1;
            return;
        }
    }
    records.push(Record::Unmap {
        dev,
        vblock,
        count: 1,
    });
}

impl Device {
    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Which parts of `off..off + len` are mapped: consecutive extents `(bytes, mapped)`
    /// in order, at most `max` of them (at least one), together covering the range or a
    /// prefix of it. An unmapped extent reads as zeros; a mapped one holds whatever was
    /// written (zeros included). A block counts whole: a range that starts or ends inside
    /// one takes that block's state for the part it covers. The walk stops after some
    /// `ALLOCATION_WORK` chunks and blocks looked at (a prefix then), so one call holds the
    /// state's read lock briefly whatever the range.
    pub fn allocation(&self, off: u64, len: u64, max: usize) -> Result<Vec<(u64, bool)>> {
        let inner = &*self.inner;
        inner.check_intact()?;
        let mut out: Vec<(u64, bool)> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let max = max.max(1);
        let cb = inner.geo.chunk_blocks;
        let c = u64::from(cb);
        let live = inner.live.read();
        // Within the device: `off + len` cannot overflow.
        let d = self.in_range(&live.st, off, len)?;
        let end = off + len;
        let mut at = off;
        let mut work = 0usize;
        while at < end && work < ALLOCATION_WORK {
            // The next run of one state, found a chunk at a time where the chunk is
            // unmapped or wholly mapped, block by block elsewhere.
            let b = at / B;
            let (v, i) = (b / c, (b % c) as u32);
            let (mapped, run_end) = match d.map.get(v) {
                None => (false, (v + 1) * c * B),
                Some(crate::map::Entry::Compact { present: None, .. }) => (true, (v + 1) * c * B),
                Some(e) => {
                    let mapped = e.block(i, cb).is_some();
                    let mut j = i + 1;
                    while j < cb && e.block(j, cb).is_some() == mapped {
                        j += 1;
                    }
                    work += (j - i) as usize;
                    (mapped, (v * c + u64::from(j)) * B)
                }
            };
            work += 1;
            let next = run_end.min(end);
            let full = out.len() == max;
            match out.last_mut() {
                Some((n, m)) if *m == mapped => *n += next - at,
                _ if full => break,
                _ => out.push((next - at, mapped)),
            }
            at = next;
        }
        Ok(out)
    }

    fn range_error(&self, off: u64, len: u64, size: u64) -> Error {
        Error::new(
            ErrorKind::Invalid,
            format!(
                "I/O at byte {off}+{len} is past the end of device {:?} ({size} bytes)",
                self.name
            ),
        )
    }

    fn stripe(&self, vchunk: u64) -> &parking_lot::Mutex<()> {
        let h = (u64::from(self.id).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ vchunk)
            .wrapping_mul(0xff51_afd7_ed55_8ccd);
        &self.inner.stripes[(h >> 32) as usize % self.inner.stripes.len()]
    }

    fn chunk_bytes(&self) -> u64 {
        u64::from(self.inner.geo.chunk_blocks) * B
    }

    /// Reads `buf.len()` bytes at `off`. Unmapped blocks read as zeros without backend I/O;
    /// mapped ones go through the pool's block cache (when on).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.read_impl(buf, off, None)
    }

    /// Reads as [`Device::read_at`] does, except that the blocks the pool's block cache holds
    /// may stay there: `pieces` (cleared first) lists, in order, where each part of the
    /// result is, in `buf` or in a cached block, and together they are the bytes `read_at`
    /// would have put in `buf` (the parts of `buf` not listed are left as they were). A reply
    /// written out with one `writev` over the pieces then copies a block shared by many
    /// devices once, from the cache, instead of twice.
    pub fn read_pieces(&self, buf: &mut [u8], off: u64, pieces: &mut Vec<ReadPiece>) -> Result<()> {
        pieces.clear();
        self.read_impl(buf, off, Some(pieces))
    }

    fn read_impl(
        &self,
        buf: &mut [u8],
        off: u64,
        mut pieces: Option<&mut Vec<ReadPiece>>,
    ) -> Result<()> {
        let inner = &*self.inner;
        inner.check_intact()?;
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len() as u64;
        let cb = inner.geo.chunk_blocks;
        if off.checked_add(len).is_none() {
            return Err(self.range_error(off, len, self.size()));
        }
        let (first, last) = (off / B, (off + len - 1) / B);
        // Held across the data I/O: the blocks planned cannot be reused until it is dropped.
        let _gate = inner.gate.read();
        let st = inner.stats.local();
        // A read within one block needs no plan. Unmapped, it is zeros; in a chunk where no
        // block is shared (a container's own data), it goes straight to the data store, as
        // the plan would send it; otherwise the cache is asked before the block's reference
        // count (the sharing hint) is looked at, and a hit is served at once. That count is
        // a load that depends on the map's answer: on a deep snapshot chain, whose chunks
        // are split, the second dependent cache miss of the read. A miss takes the general
        // path below.
        if first == last {
            let (p, chunk_shared) = {
                let live = inner.live.read();
                let p = self.in_range(&live.st, off, len)?.map.lookup(first, cb);
                (p, p.is_some_and(|p| live.st.space.chunk_shared(p)))
            };
            let from = (off - first * B) as usize;
            match p {
                None => {
                    buf.fill(0);
                    st.add(&ZERO_BLOCKS_READ, 1);
                }
                Some(p) if !inner.cache.may_hold(chunk_shared) => {
                    inner
                        .data
                        .read_at(buf, p * B + from as u64)
                        .map_err(|e| self.read_error(off, e))?;
                    st.add(&BACKEND_READS, 1);
                    st.add(&BACKEND_READ_BYTES, len);
                }
                Some(p) => match pieces.as_deref_mut() {
                    Some(pieces) => match inner.cache.get(self.id, p) {
                        Some(data) => {
                            pieces.push(ReadPiece::Cached {
                                data,
                                start: from,
                                len: buf.len(),
                            });
                            st.add(&READS, 1);
                            st.add(&READ_BYTES, len);
                            return Ok(());
                        }
                        None => return self.read_planned(buf, off, first, last, st, Some(pieces)),
                    },
                    None if inner.cache.read_cached(self.id, p, from, buf) => {}
                    None => return self.read_planned(buf, off, first, last, st, None),
                },
            }
            if let Some(pieces) = pieces {
                push_buf(pieces, 0, buf.len());
            }
            st.add(&READS, 1);
            st.add(&READ_BYTES, len);
            return Ok(());
        }
        self.read_planned(buf, off, first, last, st, pieces)
    }

    /// This device's state in `st`, once `off..off + len` is checked to lie within it.
    fn in_range<'a>(&self, st: &'a State, off: u64, len: u64) -> Result<&'a DeviceState> {
        let d = st
            .devices
            .get(&self.id)
            .ok_or_else(|| not_found(&self.name))?;
        if off.checked_add(len).is_none_or(|e| e > d.size) {
            return Err(self.range_error(off, len, d.size));
        }
        Ok(d)
    }

    fn read_error(&self, off: u64, e: std::io::Error) -> Error {
        Error::io(format!("reading device {:?} at byte {off}", self.name), e)
    }

    /// The general read path: plans runs of blocks through the cache or around it.
    fn read_planned(
        &self,
        buf: &mut [u8],
        off: u64,
        first: u64,
        last: u64,
        st: &Counters,
        mut pieces: Option<&mut Vec<ReadPiece>>,
    ) -> Result<()> {
        let inner = &*self.inner;
        let len = buf.len() as u64;
        let cb = inner.geo.chunk_blocks;
        // The plan: runs of blocks, and how many devices share each block (an eviction hint).
        // The shared cache holds blocks several devices map; a block only one device maps is
        // read straight from the data store (the host page cache holds it once either way),
        // so large private reads and writes pay nothing for the cache. Both live on the stack
        // for small requests: a 4 KiB read allocates nothing.
        let mut runs: SmallVec<[ReadRun; 4]> = SmallVec::new();
        let mut sharers: SmallVec<[u32; 16]> = SmallVec::new();
        {
            let live = inner.live.read();
            let d = self.in_range(&live.st, off, len)?;
            for b in first..=last {
                let p = d.map.lookup(b, cb);
                let refs = p.map_or(0, |p| live.st.space.sharers(p));
                sharers.push(refs);
                let cached = p.is_some() && inner.cache.caches(refs);
                match runs.last_mut() {
                    Some(r) if r.extends(b, p, cached) => r.n += 1,
                    _ => runs.push(ReadRun {
                        b0: b,
                        n: 1,
                        p0: p,
                        cached,
                    }),
                }
            }
        }
        st.add(&READS, 1);
        st.add(&READ_BYTES, len);
        let err = |e| self.read_error(off, e);
        for ReadRun { b0, n, p0, cached } in runs {
            let (s, e) = (off.max(b0 * B), (off + len).min((b0 + n) * B));
            let at = (s - off) as usize;
            let dst = &mut buf[at..(e - off) as usize];
            let aligned = s == b0 * B && e == (b0 + n) * B;
            if let (Some(p0), true, Some(pieces)) = (p0, cached, pieces.as_deref_mut()) {
                // Blocks the cache holds stay there; the ones read now land in `dst` (through
                // a run-sized buffer if the read covers the run's first or last block only in
                // part).
                let hint = &sharers[(b0 - first) as usize..(b0 - first + n) as usize];
                let mut held: SmallVec<[Option<Arc<[u8]>>; 16]> = SmallVec::new();
                held.resize(n as usize, None);
                RUN_BUF.with_borrow_mut(|run| -> Result<()> {
                    let tmp: &mut [u8] = if aligned {
                        &mut []
                    } else {
                        if run.len() < (n * B) as usize {
                            run.resize((n * B) as usize, 0);
                        }
                        &mut run[..(n * B) as usize]
                    };
                    let target: &mut [u8] = if aligned { &mut *dst } else { &mut *tmp };
                    let bytes = inner
                        .cache
                        .read_held(self.id, p0, target, hint, &inner.data, &mut held)
                        .map_err(err)?;
                    if bytes > 0 {
                        st.add(&BACKEND_READS, 1);
                        st.add(&BACKEND_READ_BYTES, bytes);
                    }
                    // Offsets within the run: the read covers [from, from + dst.len()).
                    let (from, blk) = ((s - b0 * B) as usize, B as usize);
                    for (i, h) in held.drain(..).enumerate() {
                        let lo = (i * blk).max(from);
                        let hi = ((i + 1) * blk).min(from + dst.len());
                        if lo >= hi {
                            continue;
                        }
                        match h {
                            Some(data) => pieces.push(ReadPiece::Cached {
                                data,
                                start: lo - i * blk,
                                len: hi - lo,
                            }),
                            None => {
                                if !aligned {
                                    dst[lo - from..hi - from].copy_from_slice(&tmp[lo..hi]);
                                }
                                push_buf(pieces, at + lo - from, hi - lo);
                            }
                        }
                    }
                    Ok(())
                })?;
                continue;
            }
            if let Some(pieces) = pieces.as_deref_mut() {
                push_buf(pieces, at, dst.len());
            }
            match (p0, cached.then_some(&inner.cache)) {
                (None, _) => {
                    dst.fill(0);
                    st.add(&ZERO_BLOCKS_READ, n);
                }
                (Some(p0), None) => {
                    inner
                        .data
                        .read_at(dst, p0 * B + (s - b0 * B))
                        .map_err(err)?;
                    st.add(&BACKEND_READS, 1);
                    st.add(&BACKEND_READ_BYTES, dst.len() as u64);
                }
                (Some(p0), Some(cache)) => {
                    let hint = &sharers[(b0 - first) as usize..(b0 - first + n) as usize];
                    let read = if aligned {
                        cache.read(self.id, p0, dst, hint, &inner.data)
                    } else {
                        let mut tmp = vec![0u8; (n * B) as usize];
                        let r = cache.read(self.id, p0, &mut tmp, hint, &inner.data);
                        let from = (s - b0 * B) as usize;
                        dst.copy_from_slice(&tmp[from..from + dst.len()]);
                        r
                    };
                    let bytes = read.map_err(err)?;
                    if bytes > 0 {
                        st.add(&BACKEND_READS, 1);
                        st.add(&BACKEND_READ_BYTES, bytes);
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads one whole physical block (for copy-on-write and read-modify-write).
    fn read_block(&self, p: u64, blk: &mut [u8], shared: bool) -> Result<()> {
        let inner = &*self.inner;
        let r = if inner.cache.caches(if shared { 2 } else { 1 }) {
            inner.cache.read(self.id, p, blk, &[2], &inner.data)
        } else {
            inner.data.read_at(blk, p * B).map(|()| B)
        };
        let bytes = r.map_err(|e| Error::io("reading a block to copy", e))?;
        if bytes > 0 {
            inner.stats.add(&BACKEND_READS, 1);
            inner.stats.add(&BACKEND_READ_BYTES, bytes);
        }
        Ok(())
    }

    /// Writes whole blocks at physical block `p` and keeps the cache in step.
    fn put_blocks(&self, p: u64, data: &[u8], off: u64) -> Result<()> {
        let inner = &*self.inner;
        inner
            .data
            .write_at(data, p * B)
            .map_err(|e| Error::io(format!("writing device {:?} near byte {off}", self.name), e))?;
        if inner.cache.enabled() {
            inner.cache.written(self.id, p, data);
        }
        let st = &inner.stats;
        st.add(&BACKEND_WRITES, 1);
        st.add(&BACKEND_WRITE_BYTES, data.len() as u64);
        Ok(())
    }

    fn check_write(&self, off: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("device {:?} is read-only", self.name),
            ));
        }
        self.inner.check_writable()?;
        let size = self.size();
        if off.checked_add(len).is_none_or(|e| e > size) {
            return Err(self.range_error(off, len, size));
        }
        Ok(())
    }

    /// Calls `f(chunk_start, chunk_end)` for each chunk-aligned piece of `[off, off+len)`.
    fn per_chunk(
        &self,
        off: u64,
        len: u64,
        mut f: impl FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        let cbytes = self.chunk_bytes();
        let mut pos = off;
        while pos < off + len {
            let end = (off + len).min((pos / cbytes + 1) * cbytes);
            f(pos, end)?;
            pos = end;
        }
        Ok(())
    }

    /// Writes `buf` at `off`. Visible to reads when it returns; durable after `flush`.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.check_write(off, buf.len() as u64)?;
        self.inner.stats.add(&WRITES, 1);
        self.inner.stats.add(&WRITE_BYTES, buf.len() as u64);
        self.per_chunk(off, buf.len() as u64, |s, e| {
            self.write_chunk(&buf[(s - off) as usize..(e - off) as usize], s)
        })
    }

    /// One chunk's part of a write: plan, data I/O, install.
    fn write_chunk(&self, data: &[u8], off: u64) -> Result<()> {
        let inner = &*self.inner;
        let cb = inner.geo.chunk_blocks;
        let c = u64::from(cb);
        let (first, last) = (off / B, (off + data.len() as u64 - 1) / B);
        let vchunk = first / c;
        let _stripe = self.stripe(vchunk).lock();
        // Fast path: every block already owned, nothing to allocate or install.
        let owned: Option<Ops> = {
            let live = inner.live.read();
            let d = live
                .st
                .devices
                .get(&self.id)
                .ok_or_else(|| not_found(&self.name))?;
            (first..=last)
                .map(|b| {
                    d.map
                        .lookup(b, cb)
                        .filter(|&p| live.st.space.owned(p))
                        .map(|p| Op {
                            vblock: b,
                            pblock: p,
                            kind: Kind::InPlace,
                        })
                })
                .collect()
        };
        let ops = match owned {
            Some(ops) => ops,
            None => self.plan_alloc(first, last)?,
        };
        if let Err(e) = self.write_ops(&ops, data, off) {
            if let Ok(mut live) = inner.live_write() {
                for op in &ops {
                    if !matches!(op.kind, Kind::InPlace) {
                        live.st.space.unreserve(op.pblock);
                    }
                }
            }
            return Err(e);
        }
        if ops.iter().all(|o| matches!(o.kind, Kind::InPlace)) {
            // Data only: numbered once written, for the next flush to sync (see `commit`).
            inner.mutations.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
        let mut live = inner.live_write()?;
        let live = &mut *live;
        for op in ops.iter().filter(|o| !matches!(o.kind, Kind::InPlace)) {
            live.st.space.unreserve(op.pblock);
            let r = Record::Map {
                dev: self.id,
                vblock: op.vblock,
                pblock: op.pblock,
                count: 1,
            };
            live.st
                .apply(&r)
                .map_err(|e| Error::new(ErrorKind::Corrupt, format!("installing a write: {e}")))?;
            push_map(&mut live.records, self.id, op.vblock, op.pblock);
        }
        inner.mutations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Plans a write that needs new blocks, reserving them.
    fn plan_alloc(&self, first: u64, last: u64) -> Result<Ops> {
        let inner = &*self.inner;
        let cb = inner.geo.chunk_blocks;
        let c = u64::from(cb);
        let vchunk = first / c;
        let mut live = inner.live_write()?;
        let st = &mut live.st;
        let d = st
            .devices
            .get(&self.id)
            .ok_or_else(|| not_found(&self.name))?;
        let entry = d.map.get(vchunk);
        let mut ops = Ops::new();
        let chunk_copy = inner.cow == crate::CowGranularity::Chunk
            && entry.is_some_and(|e| {
                let mut shared = false;
                e.for_each(cb, |_, p| shared |= !st.space.owned(p));
                shared
            });
        let stats = &inner.stats;
        let fail = |st: &mut crate::state::State, ops: &[Op]| {
            for op in ops {
                if !matches!(op.kind, Kind::InPlace) {
                    st.space.unreserve(op.pblock);
                }
            }
            Error::new(
                ErrorKind::NoSpace,
                format!("the pool is full: no free block for device {:?}; remove devices or discard to free space", self.name),
            )
        };
        if chunk_copy {
            // dm-thin style: every mapped block of the chunk moves to one new chunk.
            let e = entry.expect("checked").clone();
            let mut slots: Vec<(u64, Option<u64>)> = Vec::new();
            for i in 0..cb {
                let b = vchunk * c + u64::from(i);
                let old = e.block(i, cb);
                if old.is_some() || (first..=last).contains(&b) {
                    slots.push((b, old));
                }
            }
            for (k, (b, old)) in slots.into_iter().enumerate() {
                let Some((q, _)) = st.space.allocate(self.id, vchunk, (b % c) as u32, k == 0)
                else {
                    return Err(fail(st, &ops));
                };
                let kind = match old {
                    Some(o) if !(first..=last).contains(&b) => Kind::Copy { old: o },
                    old => Kind::New { old },
                };
                ops.push(Op {
                    vblock: b,
                    pblock: q,
                    kind,
                });
            }
            stats.add(
                &COW_BLOCKS,
                ops.iter()
                    .filter(|o| !matches!(o.kind, Kind::New { old: None }))
                    .count() as u64,
            );
            return Ok(ops);
        }
        for b in first..=last {
            let cur = st.devices.get(&self.id).expect("checked").map.lookup(b, cb);
            match cur {
                Some(p) if st.space.owned(p) => ops.push(Op {
                    vblock: b,
                    pblock: p,
                    kind: Kind::InPlace,
                }),
                old => {
                    let Some((q, _)) = st.space.allocate(self.id, vchunk, (b % c) as u32, false)
                    else {
                        return Err(fail(st, &ops));
                    };
                    ops.push(Op {
                        vblock: b,
                        pblock: q,
                        kind: Kind::New { old },
                    });
                }
            }
        }
        Ok(ops)
    }

    /// The data I/O of a planned write; `data` starts at byte `off` of the device.
    fn write_ops(&self, ops: &[Op], data: &[u8], off: u64) -> Result<()> {
        let st = &self.inner.stats;
        let end = off + data.len() as u64;
        let mut k = 0;
        while k < ops.len() {
            let op = ops[k];
            let (bs, be) = (op.vblock * B, (op.vblock + 1) * B);
            let full = bs >= off && be <= end;
            match op.kind {
                Kind::Copy { old } => {
                    let mut blk = vec![0u8; B as usize];
                    self.read_block(old, &mut blk, true)?;
                    self.put_blocks(op.pblock, &blk, off)?;
                    st.add(&COW_COPIED_BYTES, B);
                    k += 1;
                }
                _ if full => {
                    // A run of whole blocks at consecutive physical blocks: one write.
                    let mut j = k + 1;
                    while j < ops.len()
                        && ops[j].pblock == ops[j - 1].pblock + 1
                        && ops[j].vblock == ops[j - 1].vblock + 1
                        && (ops[j].vblock + 1) * B <= end
                        && !matches!(ops[j].kind, Kind::Copy { .. })
                    {
                        j += 1;
                    }
                    let src =
                        &data[(bs - off) as usize..((ops[j - 1].vblock + 1) * B - off) as usize];
                    self.put_blocks(op.pblock, src, off)?;
                    for o in &ops[k..j] {
                        self.count(o.kind);
                    }
                    k = j;
                }
                Kind::InPlace | Kind::New { .. } => {
                    // Part of a block: always written whole (read-modify-write), so that a
                    // torn or reordered write-back leaves some complete version of the block.
                    // The rest comes from the block itself, the block it replaces, or zeros.
                    let mut blk = vec![0u8; B as usize];
                    let from = match op.kind {
                        Kind::InPlace => Some(op.pblock),
                        Kind::New { old } => old,
                        Kind::Copy { .. } => unreachable!("handled above"),
                    };
                    if let Some(o) = from {
                        self.read_block(o, &mut blk, !matches!(op.kind, Kind::InPlace))?;
                        if !matches!(op.kind, Kind::InPlace) {
                            st.add(&COW_COPIED_BYTES, B);
                        }
                    }
                    let (s, e) = (off.max(bs), end.min(be));
                    blk[(s - bs) as usize..(e - bs) as usize]
                        .copy_from_slice(&data[(s - off) as usize..(e - off) as usize]);
                    self.put_blocks(op.pblock, &blk, off)?;
                    self.count(op.kind);
                    k += 1;
                }
            }
        }
        Ok(())
    }

    fn count(&self, kind: Kind) {
        let st = &self.inner.stats;
        match kind {
            Kind::InPlace => st.add(&IN_PLACE_BLOCKS, 1),
            Kind::New { old: None } => st.add(&NEW_BLOCKS, 1),
            Kind::New { old: Some(_) } => {
                if self.inner.cow == crate::CowGranularity::Block {
                    st.add(&COW_BLOCKS, 1)
                }
            }
            Kind::Copy { .. } => {}
        }
    }

    /// Makes every completed write of the whole pool durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.check_writable()?;
        self.inner.commit()
    }

    /// Unmaps the 4 KiB blocks wholly inside `[off, off+len)`: they read as zeros and their
    /// space is freed once the unmap is durable. Partly covered blocks are left unchanged.
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_write(off, len)?;
        let (first, end) = (off.div_ceil(B), (off + len) / B);
        if first >= end {
            return Ok(());
        }
        let cb = self.inner.geo.chunk_blocks;
        self.per_chunk(first * B, (end - first) * B, |s, e| {
            let _stripe = self.stripe(s / B / u64::from(cb)).lock();
            let mut live = self.inner.live_write()?;
            let live = &mut *live;
            for b in s / B..e / B {
                let d = live
                    .st
                    .devices
                    .get(&self.id)
                    .ok_or_else(|| not_found(&self.name))?;
                if d.map.lookup(b, cb).is_some() {
                    let r = Record::Unmap {
                        dev: self.id,
                        vblock: b,
                        count: 1,
                    };
                    live.st
                        .apply(&r)
                        .map_err(|e| Error::new(ErrorKind::Corrupt, e))?;
                    push_unmap(&mut live.records, self.id, b);
                    self.inner.mutations.fetch_add(1, Ordering::SeqCst);
                    self.inner.stats.add(&DISCARDED_BLOCKS, 1);
                }
            }
            Ok(())
        })
    }

    /// Makes `[off, off+len)` read as zeros: whole blocks are unmapped, partial ones written.
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.check_write(off, len)?;
        if len == 0 {
            return Ok(());
        }
        self.discard(off, len)?;
        let end = off + len;
        let head_end = end.min(off.next_multiple_of(B));
        let tail_start = (end / B * B).max(off);
        let mut pieces = vec![(off, head_end)];
        if tail_start >= head_end {
            pieces.push((tail_start, end));
        }
        for (s, e) in pieces {
            if e > s && (s % B != 0 || e % B != 0) {
                let mapped = {
                    let live = self.inner.live.read();
                    live.st
                        .devices
                        .get(&self.id)
                        .and_then(|d| d.map.lookup(s / B, self.inner.geo.chunk_blocks))
                        .is_some()
                };
                if mapped {
                    self.write_at(&vec![0u8; (e - s) as usize], s)?;
                }
            }
        }
        Ok(())
    }
}
