//! The shared block cache: keyed by physical block for the whole pool, so a block that N
//! devices share is held once; single-flight, so concurrent misses on one block are one
//! backend read; adjacent misses of one request are one backend read (the caller passes runs
//! of contiguous physical blocks).
//!
//! This module owns cached block contents, eviction and the cache counters. It must never
//! decide what a virtual block maps to (the caller's plan does), and it must never let a read
//! that starts after a write completed see the data from before that write: `written`
//! updates ready entries and detaches reads in flight, whose results are then not cached.
//!
//! Eviction is S3-FIFO (a small probationary FIFO, a main FIFO with frequency-based
//! reinsertion, and a ghost list of keys evicted from the small FIFO), made sharing-aware: a
//! block read by a device that had not read it yet counts as a hit worth two, and a block that
//! three or more devices map skips probation. In shared mode
//! the cache holds only blocks several devices map (the device read path sends private blocks
//! straight to the data store). Plain LRU is kept as a policy for the comparison in
//! docs/benchmarks.md.
//!
//! Locking: one mutex per shard (by physical block), never held across backend I/O. A
//! thread resolves every block it claimed before it waits for blocks claimed by others, so
//! waits cannot form a cycle.

use crate::fast_hash::{FastMap, FastSet};
use hpm_io::Backend;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

const B: usize = 4096;
const SHARDS: usize = 32;

/// How devices share the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// One cache for the pool, keyed by physical block (hpmapper).
    #[default]
    Shared,
    /// Every device caches its own copy and reads are not intercepted across devices, with
    /// the same total size. Exists only as the devicemapper-like baseline for benchmarks.
    PerDevice,
    /// No cache: every read goes to the backend.
    Off,
}

/// Eviction policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CachePolicy {
    /// Sharing-aware S3-FIFO (the default).
    #[default]
    S3Fifo,
    /// Plain least-recently-used, for comparison.
    Lru,
}

/// Cache settings, chosen when a pool is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Sharing mode.
    pub mode: CacheMode,
    /// Bytes of block contents the cache may hold.
    pub size: u64,
    /// Eviction policy.
    pub policy: CachePolicy,
}

/// Default cache size: 512 MiB.
pub const DEFAULT_CACHE_SIZE: u64 = 512 << 20;

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            mode: CacheMode::Shared,
            size: DEFAULT_CACHE_SIZE,
            policy: CachePolicy::S3Fifo,
        }
    }
}

/// Cache counters since the pool was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Block reads served from the cache.
    pub hits: u64,
    /// Block reads that went to the backend.
    pub misses: u64,
    /// Block reads that waited for another read of the same block already in flight
    /// (intercepted: no backend I/O of their own).
    pub coalesced: u64,
    /// Backend read calls (adjacent misses of one request are one call).
    pub backend_reads: u64,
    /// Bytes read from the backend.
    pub backend_read_bytes: u64,
    /// Bytes cached now.
    pub cached_bytes: u64,
    /// Most bytes cached at once.
    pub cached_bytes_peak: u64,
    /// Bytes a cache per device would hold for the same accesses (each block once per
    /// device that read it): the dedup saving is 1 - cached / this.
    pub per_device_bytes: u64,
    /// Most `per_device_bytes` at once.
    pub per_device_bytes_peak: u64,
    /// Blocks evicted.
    pub evictions: u64,
    /// Blocks dropped because they were freed or rewritten while being read.
    pub invalidations: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    backend_reads: AtomicU64,
    backend_read_bytes: AtomicU64,
    cached: AtomicU64,
    cached_peak: AtomicU64,
    per_device: AtomicU64,
    per_device_peak: AtomicU64,
    evictions: AtomicU64,
    invalidations: AtomicU64,
}

impl Counters {
    fn gauge(v: &AtomicU64, peak: &AtomicU64, delta: i64) {
        let now = if delta >= 0 {
            v.fetch_add(delta as u64, Relaxed) + delta as u64
        } else {
            v.fetch_sub((-delta) as u64, Relaxed) - (-delta) as u64
        };
        peak.fetch_max(now, Relaxed);
    }
}

type Key = (u32, u64);

/// A read in flight: the first reader of a block fills it, later ones wait.
struct Flight {
    result: Mutex<Option<Result<Arc<[u8]>, String>>>,
    done: Condvar,
}

impl Flight {
    /// Finishes with `r` and wakes the waiters, unless finished already; says whether it
    /// did.
    fn finish(&self, r: Result<Arc<[u8]>, String>) -> bool {
        let mut g = self.result.lock();
        if g.is_some() {
            return false;
        }
        *g = Some(r);
        self.done.notify_all();
        true
    }
    fn wait(&self) -> Result<Arc<[u8]>, String> {
        let mut g = self.result.lock();
        while g.is_none() {
            self.done.wait(&mut g);
        }
        g.clone().expect("set")
    }
}

struct Entry {
    data: Arc<[u8]>,
    freq: u8,
    gen: u64,
    main: bool,
    readers: Vec<u32>,
}

enum Slot {
    Ready(Entry),
    Loading(Arc<Flight>),
}

#[derive(Default)]
struct Shard {
    map: FastMap<Key, Slot>,
    small: VecDeque<(Key, u64)>,
    main: VecDeque<(Key, u64)>,
    ghost: VecDeque<Key>,
    ghost_set: FastSet<Key>,
    small_len: usize,
    main_len: usize,
    next_gen: u64,
    /// Per-device mode: the devices holding a copy of each physical block.
    owners: FastMap<u64, Vec<u32>>,
}

/// The cache of one pool.
pub(crate) struct BlockCache {
    cfg: CacheConfig,
    cap_per_shard: usize,
    shards: Box<[Mutex<Shard>]>,
    c: Counters,
}

fn shard_of(p: u64) -> usize {
    // Neighbouring blocks go to neighbouring shards; the multiply spreads chunk-aligned runs.
    ((p.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize) % SHARDS
}

/// See `BlockCache::read_into`: on unwinding, ends every claim still open with an error and
/// takes it out of the map.
struct AbandonOnPanic<'a> {
    cache: &'a BlockCache,
    owner: u32,
    p0: u64,
    claimed: Vec<(usize, Arc<Flight>)>,
}

impl Drop for AbandonOnPanic<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (i, f) in &self.claimed {
            if f.finish(Err("the read filling this block panicked".into())) {
                self.cache.detach((self.owner, self.p0 + *i as u64), f);
            }
        }
    }
}

impl BlockCache {
    pub(crate) fn new(cfg: CacheConfig) -> Self {
        let blocks = (cfg.size / B as u64) as usize;
        Self {
            cfg,
            cap_per_shard: (blocks / SHARDS).max(1),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            c: Counters::default(),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.cfg.mode != CacheMode::Off && self.cfg.size >= B as u64
    }

    /// Whether reads of a block that `sharers` devices map go through the cache: in shared
    /// mode only blocks several devices share (the dedup is for them; a private block is
    /// cached once by the host page cache anyway), in per-device mode every block.
    pub(crate) fn caches(&self, sharers: u32) -> bool {
        self.enabled() && (sharers > 1 || self.cfg.mode == CacheMode::PerDevice)
    }

    /// Whether the cache may hold a block whose chunk has shared blocks (`chunk_shared`) or
    /// has none: the question before [`BlockCache::read_cached`], answered without the
    /// block's own reference count. A block of a chunk nobody shares is read around the
    /// cache in shared mode (see [`BlockCache::caches`]).
    pub(crate) fn may_hold(&self, chunk_shared: bool) -> bool {
        self.enabled() && (chunk_shared || self.cfg.mode == CacheMode::PerDevice)
    }

    pub(crate) fn config(&self) -> CacheConfig {
        self.cfg
    }

    fn owner(&self, dev: u32) -> u32 {
        if self.cfg.mode == CacheMode::PerDevice {
            dev
        } else {
            0
        }
    }

    /// The bookkeeping of a hit on entry `e` by device `dev`: its frequency and readers.
    /// The caller then calls [`BlockCache::hit_done`].
    fn hit(&self, e: &mut Entry, dev: u32) {
        let bonus = if e.readers.contains(&dev) {
            1
        } else {
            e.readers.push(dev);
            Counters::gauge(&self.c.per_device, &self.c.per_device_peak, B as i64);
            2
        };
        e.freq = (e.freq + bonus).min(3);
    }

    /// The rest of a hit's bookkeeping, once the entry is no longer borrowed.
    fn hit_done(&self, sh: &mut Shard, key: Key) {
        if self.cfg.policy == CachePolicy::Lru {
            sh.touch_lru(key);
        }
        self.c.hits.fetch_add(1, Relaxed);
    }

    /// If physical block `p` is cached for device `dev`, copies its bytes `from..` into
    /// `out` (which must end within the block), counts a hit and returns true; otherwise
    /// touches nothing (no miss is counted) and returns false. The hit path of a small read,
    /// which then needs no sharing hint.
    pub(crate) fn read_cached(&self, dev: u32, p: u64, from: usize, out: &mut [u8]) -> bool {
        debug_assert!(from + out.len() <= B);
        let key = (self.owner(dev), p);
        let mut sh = self.shards[shard_of(p)].lock();
        match sh.map.get_mut(&key) {
            Some(Slot::Ready(e)) => {
                out.copy_from_slice(&e.data[from..from + out.len()]);
                self.hit(e, dev);
                self.hit_done(&mut sh, key);
                true
            }
            _ => false,
        }
    }

    /// If physical block `p` is cached for device `dev`, counts a hit and hands out its
    /// contents (immutable: a later write replaces the entry's buffer while any reader holds
    /// it); otherwise touches nothing. The hit path of a small read that keeps the block in
    /// the cache (see [`crate::Device::read_pieces`]).
    pub(crate) fn get(&self, dev: u32, p: u64) -> Option<Arc<[u8]>> {
        let key = (self.owner(dev), p);
        let mut sh = self.shards[shard_of(p)].lock();
        match sh.map.get_mut(&key) {
            Some(Slot::Ready(e)) => {
                let data = e.data.clone();
                self.hit(e, dev);
                self.hit_done(&mut sh, key);
                Some(data)
            }
            _ => None,
        }
    }

    /// Reads physical blocks `p0..p0 + out.len()/4096` into `out` for device `dev`;
    /// `sharers[i]` is how many devices map block i (a hint for eviction). Returns the bytes
    /// read from the backend.
    pub(crate) fn read(
        &self,
        dev: u32,
        p0: u64,
        out: &mut [u8],
        sharers: &[u32],
        backend: &dyn Backend,
    ) -> io::Result<u64> {
        self.read_into(dev, p0, out, sharers, backend, None)
    }

    /// [`BlockCache::read`], except that a block found cached, or read by another thread
    /// meanwhile, is handed out in `held[i]` (one slot per block) instead of being copied
    /// into `out`, whose block i is then left as it was; the blocks this call reads from the
    /// backend are in `out`, and their `held` slots stay `None`.
    pub(crate) fn read_held(
        &self,
        dev: u32,
        p0: u64,
        out: &mut [u8],
        sharers: &[u32],
        backend: &dyn Backend,
        held: &mut [Option<Arc<[u8]>>],
    ) -> io::Result<u64> {
        debug_assert_eq!(held.len(), out.len() / B);
        self.read_into(dev, p0, out, sharers, backend, Some(held))
    }

    fn read_into(
        &self,
        dev: u32,
        p0: u64,
        out: &mut [u8],
        sharers: &[u32],
        backend: &dyn Backend,
        mut held: Option<&mut [Option<Arc<[u8]>>]>,
    ) -> io::Result<u64> {
        let n = out.len() / B;
        debug_assert_eq!(out.len() % B, 0);
        let owner = self.owner(dev);
        // If this thread panics before it has filled what it claimed, the claims must still
        // end (with an error) and leave the map: later readers of those blocks would wait
        // on them for ever.
        let mut abandon = AbandonOnPanic {
            cache: self,
            owner,
            p0,
            claimed: Vec::new(),
        };
        let mut waits: Vec<(usize, Arc<Flight>)> = Vec::new();
        for i in 0..n {
            let key = (owner, p0 + i as u64);
            let mut sh = self.shards[shard_of(key.1)].lock();
            match sh.map.get_mut(&key) {
                Some(Slot::Ready(e)) => {
                    match held.as_deref_mut() {
                        Some(h) => h[i] = Some(e.data.clone()),
                        None => out[i * B..(i + 1) * B].copy_from_slice(&e.data),
                    }
                    self.hit(e, dev);
                    self.hit_done(&mut sh, key);
                }
                Some(Slot::Loading(f)) => {
                    waits.push((i, f.clone()));
                    self.c.coalesced.fetch_add(1, Relaxed);
                }
                None => {
                    let f = Arc::new(Flight {
                        result: Mutex::new(None),
                        done: Condvar::new(),
                    });
                    sh.map.insert(key, Slot::Loading(f.clone()));
                    abandon.claimed.push((i, f));
                    self.c.misses.fetch_add(1, Relaxed);
                }
            }
        }
        let claimed = &abandon.claimed;
        let mut read_bytes = 0;
        let mut result = Ok(());
        let mut k = 0;
        while k < claimed.len() {
            let mut j = k + 1;
            while j < claimed.len() && claimed[j].0 == claimed[j - 1].0 + 1 {
                j += 1;
            }
            let (i0, i1) = (claimed[k].0, claimed[j - 1].0 + 1);
            let r = if result.is_ok() {
                backend.read_at(&mut out[i0 * B..i1 * B], (p0 + i0 as u64) * B as u64)
            } else {
                Err(io::Error::other("an earlier part of the same read failed"))
            };
            match r {
                Ok(()) => {
                    if self.cfg.mode == CacheMode::PerDevice {
                        // The devicemapper-like baseline: dm-thin reads its data device with
                        // bios that no shared cache keeps, so neither may the host page cache
                        // of our data file (it would dedup what the baseline must not).
                        let _ = backend
                            .drop_cached((p0 + i0 as u64) * B as u64, ((i1 - i0) * B) as u64);
                    }
                    self.c.backend_reads.fetch_add(1, Relaxed);
                    self.c
                        .backend_read_bytes
                        .fetch_add(((i1 - i0) * B) as u64, Relaxed);
                    read_bytes += ((i1 - i0) * B) as u64;
                    for (i, f) in &claimed[k..j] {
                        let data: Arc<[u8]> = Arc::from(&out[i * B..(i + 1) * B]);
                        let sh_hint = sharers.get(*i).copied().unwrap_or(1);
                        // Cached before the waiters wake, so they find the entry to count
                        // themselves among its readers.
                        self.publish((owner, p0 + *i as u64), f, data.clone(), dev, sh_hint);
                        f.finish(Ok(data));
                    }
                }
                Err(e) => {
                    for (i, f) in &claimed[k..j] {
                        f.finish(Err(e.to_string()));
                        self.detach((owner, p0 + *i as u64), f);
                    }
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
            k = j;
        }
        drop(abandon);
        result?;
        for (i, f) in waits {
            let data = f.wait().map_err(|e| {
                io::Error::other(format!("a concurrent read of the same block failed: {e}"))
            })?;
            self.note_reader((owner, p0 + i as u64), dev);
            match held.as_deref_mut() {
                Some(h) => h[i] = Some(data),
                None => out[i * B..(i + 1) * B].copy_from_slice(&data),
            }
        }
        Ok(read_bytes)
    }

    /// Counts `dev` among the devices that read a cached block (for `per_device_bytes`).
    fn note_reader(&self, key: Key, dev: u32) {
        let mut sh = self.shards[shard_of(key.1)].lock();
        if let Some(Slot::Ready(e)) = sh.map.get_mut(&key) {
            if !e.readers.contains(&dev) {
                e.readers.push(dev);
                Counters::gauge(&self.c.per_device, &self.c.per_device_peak, B as i64);
            }
        }
    }

    /// Turns a claimed slot into a cached entry, unless a write or free detached it.
    fn publish(&self, key: Key, f: &Arc<Flight>, data: Arc<[u8]>, dev: u32, sharers: u32) {
        let mut sh = self.shards[shard_of(key.1)].lock();
        match sh.map.get(&key) {
            Some(Slot::Loading(cur)) if Arc::ptr_eq(cur, f) => {}
            _ => return,
        }
        let gen = sh.next_gen;
        sh.next_gen += 1;
        // Sharing-aware admission: a block that three or more devices map (an image layer many
        // containers run from), or one evicted from probation recently (ghost), goes straight
        // to the main FIFO; others start in probation. (In shared mode every cached block is
        // mapped by at least two devices, a layer and its snapshot, so two says little.)
        let main = self.cfg.policy == CachePolicy::Lru || sharers > 2 || sh.ghost_set.remove(&key);
        if main {
            sh.main.push_back((key, gen));
            sh.main_len += 1;
        } else {
            sh.small.push_back((key, gen));
            sh.small_len += 1;
        }
        sh.map.insert(
            key,
            Slot::Ready(Entry {
                data,
                freq: 0,
                gen,
                main,
                readers: vec![dev],
            }),
        );
        if self.cfg.mode == CacheMode::PerDevice {
            sh.owners.entry(key.1).or_default().push(key.0);
        }
        Counters::gauge(&self.c.cached, &self.c.cached_peak, B as i64);
        Counters::gauge(&self.c.per_device, &self.c.per_device_peak, B as i64);
        while sh.small_len + sh.main_len > self.cap_per_shard {
            if !self.evict_one(&mut sh) {
                break;
            }
        }
    }

    fn detach(&self, key: Key, f: &Arc<Flight>) {
        let mut sh = self.shards[shard_of(key.1)].lock();
        if matches!(sh.map.get(&key), Some(Slot::Loading(cur)) if Arc::ptr_eq(cur, f)) {
            sh.map.remove(&key);
        }
    }

    fn drop_entry(&self, sh: &mut Shard, key: Key) -> Option<Entry> {
        match sh.map.remove(&key) {
            Some(Slot::Ready(e)) => {
                if e.main {
                    sh.main_len -= 1;
                } else {
                    sh.small_len -= 1;
                }
                if let Some(v) = sh.owners.get_mut(&key.1) {
                    v.retain(|&o| o != key.0);
                    if v.is_empty() {
                        sh.owners.remove(&key.1);
                    }
                }
                Counters::gauge(&self.c.cached, &self.c.cached_peak, -(B as i64));
                Counters::gauge(
                    &self.c.per_device,
                    &self.c.per_device_peak,
                    -((B * e.readers.len()) as i64),
                );
                Some(e)
            }
            Some(slot @ Slot::Loading(_)) => {
                // A read in flight: forget it, so that its result is not cached and later
                // readers go to the backend for the current contents.
                drop(slot);
                self.c.invalidations.fetch_add(1, Relaxed);
                None
            }
            None => None,
        }
    }

    /// Evicts one entry; false if nothing is evictable.
    fn evict_one(&self, sh: &mut Shard) -> bool {
        loop {
            let from_small = sh.small_len > 0
                && (sh.small_len * 10 > self.cap_per_shard || sh.main_len == 0)
                && self.cfg.policy == CachePolicy::S3Fifo;
            let item = if from_small {
                sh.small.pop_front()
            } else {
                sh.main.pop_front()
            };
            let Some((key, gen)) = item else {
                if sh.small.is_empty() && sh.main.is_empty() {
                    return false;
                }
                continue;
            };
            let Some(Slot::Ready(e)) = sh.map.get_mut(&key) else {
                continue;
            };
            if e.gen != gen {
                continue; // stale queue item (moved or touched since)
            }
            if from_small {
                if e.freq > 1 {
                    // Proven useful in probation: promote.
                    let g = sh.next_gen;
                    sh.next_gen += 1;
                    e.gen = g;
                    e.main = true;
                    e.freq = 0;
                    sh.small_len -= 1;
                    sh.main_len += 1;
                    sh.main.push_back((key, g));
                    continue;
                }
                self.drop_entry(sh, key);
                sh.ghost.push_back(key);
                sh.ghost_set.insert(key);
                while sh.ghost.len() > self.cap_per_shard {
                    if let Some(k) = sh.ghost.pop_front() {
                        sh.ghost_set.remove(&k);
                    }
                }
            } else if e.freq > 0 && self.cfg.policy == CachePolicy::S3Fifo {
                e.freq -= 1;
                let g = sh.next_gen;
                sh.next_gen += 1;
                e.gen = g;
                sh.main.push_back((key, g));
                continue;
            } else {
                self.drop_entry(sh, key);
            }
            self.c.evictions.fetch_add(1, Relaxed);
            return true;
        }
    }

    /// After data was written to physical blocks `p0..` by `dev` (whole blocks): cached
    /// copies are updated (the writer's) or dropped (anyone else's), reads in flight detached.
    pub(crate) fn written(&self, dev: u32, p0: u64, data: &[u8]) {
        let owner = self.owner(dev);
        for (i, blk) in data.chunks_exact(B).enumerate() {
            let p = p0 + i as u64;
            let mut sh = self.shards[shard_of(p)].lock();
            if self.cfg.mode == CacheMode::PerDevice {
                let others: Vec<u32> = sh
                    .owners
                    .get(&p)
                    .map(|v| v.iter().copied().filter(|&o| o != owner).collect())
                    .unwrap_or_default();
                for o in others {
                    self.drop_entry(&mut sh, (o, p));
                }
            }
            match sh.map.get_mut(&(owner, p)) {
                // Rewritten in place unless a reader still holds the old contents.
                Some(Slot::Ready(e)) => match Arc::get_mut(&mut e.data) {
                    Some(buf) => buf.copy_from_slice(blk),
                    None => e.data = Arc::from(blk),
                },
                Some(Slot::Loading(_)) => {
                    self.drop_entry(&mut sh, (owner, p));
                }
                None => {}
            }
        }
    }

    /// Drops freed blocks (every owner's copy).
    pub(crate) fn invalidate(&self, blocks: &[u64]) {
        for &p in blocks {
            let mut sh = self.shards[shard_of(p)].lock();
            let owners = match self.cfg.mode {
                CacheMode::PerDevice => sh.owners.get(&p).cloned().unwrap_or_default(),
                _ => vec![0],
            };
            for o in owners {
                if self.drop_entry(&mut sh, (o, p)).is_some() {
                    self.c.invalidations.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// Empties the cache (reads in flight finish and are not kept), forgetting the ghost
    /// history too: the next read of every block goes to the backend, as after a restart.
    /// Returns the bytes dropped. For cold-cache benchmarks.
    pub(crate) fn clear(&self) -> u64 {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut sh = shard.lock();
            let keys: Vec<Key> = sh
                .map
                .iter()
                .filter(|(_, s)| matches!(s, Slot::Ready(_)))
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                if self.drop_entry(&mut sh, k).is_some() {
                    dropped += B as u64;
                }
            }
            sh.small.clear();
            sh.main.clear();
            sh.ghost.clear();
            sh.ghost_set.clear();
        }
        dropped
    }

    pub(crate) fn stats(&self) -> CacheStats {
        let l = |a: &AtomicU64| a.load(Relaxed);
        CacheStats {
            hits: l(&self.c.hits),
            misses: l(&self.c.misses),
            coalesced: l(&self.c.coalesced),
            backend_reads: l(&self.c.backend_reads),
            backend_read_bytes: l(&self.c.backend_read_bytes),
            cached_bytes: l(&self.c.cached),
            cached_bytes_peak: l(&self.c.cached_peak),
            per_device_bytes: l(&self.c.per_device),
            per_device_bytes_peak: l(&self.c.per_device_peak),
            evictions: l(&self.c.evictions),
            invalidations: l(&self.c.invalidations),
        }
    }
}

impl Shard {
    /// LRU: a hit moves the entry to the back of the queue (the old item goes stale).
    fn touch_lru(&mut self, key: Key) {
        let g = self.next_gen;
        self.next_gen += 1;
        if let Some(Slot::Ready(e)) = self.map.get_mut(&key) {
            e.gen = g;
            self.main.push_back((key, g));
        }
        if self.main.len() > 4 * self.main_len.max(16) {
            let map = &self.map;
            self.main
                .retain(|(k, g)| matches!(map.get(k), Some(Slot::Ready(e)) if e.gen == *g));
        }
    }
}

#[cfg(test)]
mod tests;
