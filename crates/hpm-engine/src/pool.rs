//! The pool: creation, open with recovery, device management, commit and checkpoint.
//!
//! This module owns the locks and their order, and the commit protocol's sequencing:
//!
//! - `store` (Mutex): serializes commits and checkpoints. Taken first.
//! - `gate` (a sharded RwLock, `shard::Gate`): every read holds its thread's shard shared
//!   across its data I/O; making freed blocks reusable takes every shard exclusively, so no
//!   read can still be reading a block that another device is about to be given.
//! - `stripes` (Mutex per (device, virtual chunk) hash): held by writes, discards and
//!   write-zeroes across plan, data I/O and install, so one chunk of one device changes in
//!   one place at a time.
//! - `live` (RwLock): the metadata state and the records not yet committed. Held only to plan
//!   or to install, never across data I/O.
//!
//! Order: store -> gate -> stripe -> live. It must never hold `live` across backend I/O,
//! except at checkpoints, which must see a state with no install in progress.
//!
//! Panics: `live` for writing and `store` for a change are taken through `Inner::live_write`
//! and `Inner::store_lock`, whose guards stop the pool (`Inner::panicked`) when a thread
//! panics while holding them: the state in memory may then be half changed, so no read,
//! write or commit may use it again; reopening recovers the last commit (docs/design.md
//! section 7, "Panics").

use crate::cache::{BlockCache, CacheConfig, CacheStats};
use crate::shard::Gate;
use crate::state::{check_name, check_size, DeviceState, Geometry, State};
use crate::stats::{EngineStats, Stats};
use crate::store::{Dev, PoolStorage, Store};
use crate::{Error, ErrorKind, Result};
use hpm_format::{
    Record, Superblock, BLOCK_SIZE, FLAG_NEEDS_CHECK, MAX_CHUNK_BLOCKS, MIN_CHUNK_BLOCKS,
};
use hpm_io::{Backend, Checked, FileBackend, IoMode};
use parking_lot::{Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::collections::HashMap;
use std::fs::File;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

/// Copy-on-write granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CowGranularity {
    /// Copy exactly the 4 KiB blocks written (hpmapper).
    #[default]
    Block,
    /// Copy the whole chunk on the first write to a shared chunk, as dm-thin does. Exists
    /// only as the devicemapper-like baseline for benchmarks.
    Chunk,
}

/// Options of `Pool::create`.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Chunk size in bytes: a power of two from 64 KiB to 4 MiB. Default 512 KiB.
    pub chunk_size: u64,
    /// Data capacity in bytes. Default: the block device's size, or 90% of the free space
    /// of the filesystem holding the data file.
    pub capacity: Option<u64>,
    /// Data store: a block device or a file; default `<pool>/data`.
    pub data: Option<PathBuf>,
    /// Copy-on-write granularity.
    pub cow: CowGranularity,
    /// The block cache of the pool opened by `create` (not stored in the pool).
    pub cache: CacheConfig,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            cache: CacheConfig::default(),
            chunk_size: 512 << 10,
            capacity: None,
            data: None,
            cow: CowGranularity::Block,
        }
    }
}

/// Journal size that triggers a checkpoint after a commit.
const CHECKPOINT_AFTER: u64 = 64 << 20;
const STRIPES: usize = 1024;

pub(crate) struct Live {
    pub st: State,
    pub records: Vec<Record>,
    pub open: HashMap<u32, u32>,
}

pub(crate) struct Inner {
    /// The geometry at open: `capacity_blocks` is not updated by `Pool::grow` (the current
    /// capacity is `live.st.space`'s), `chunk_blocks` never changes.
    pub geo: Geometry,
    pub cow: CowGranularity,
    pub data: Dev,
    pub live: RwLock<Live>,
    pub store: Mutex<Store>,
    /// Numbers every completed change (see `commit`): a record installed (incremented
    /// under `live`'s write lock, with the push) or data written in place (after the write).
    pub mutations: AtomicU64,
    /// The highest `mutations` value a successful commit has made durable.
    pub synced: AtomicU64,
    pub stripes: Box<[Mutex<()>]>,
    pub gate: Gate,
    /// Set once a metadata write or sync failed (see `check_writable`).
    pub meta_failed: std::sync::atomic::AtomicBool,
    /// Set for good when a thread panicked while changing the state or committing (see
    /// `Watched`): from then on every read, write and commit is refused.
    pub panicked: AtomicBool,
    pub stats: Stats,
    pub cache: BlockCache,
    /// The pool directory, when opened from one (for `Pool::check`).
    pub dir: std::sync::OnceLock<PathBuf>,
    /// The data store's I/O mode, when opened from a directory with one other than buffered.
    pub data_io: std::sync::OnceLock<IoMode>,
    pub closed: std::sync::atomic::AtomicBool,
    _lock: Option<File>,
}

/// A thin pool. Cheap to clone; all clones share one pool.
#[derive(Clone)]
pub struct Pool {
    pub(crate) inner: Arc<Inner>,
}

/// One device as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Name of the device it was snapshotted from, if any.
    pub origin: Option<String>,
    /// Refuses writes.
    pub read_only: bool,
    /// Bytes of mapped blocks.
    pub mapped_bytes: u64,
    /// Bytes of mapped blocks no other device shares.
    pub exclusive_bytes: u64,
}

/// Pool figures.
#[derive(Debug, Clone)]
pub struct PoolInfo {
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Data capacity in bytes.
    pub capacity_bytes: u64,
    /// Bytes of data blocks in use.
    pub used_bytes: u64,
    /// Bytes of metadata on disk.
    pub metadata_bytes: u64,
    /// Number of devices.
    pub devices: usize,
    /// Copy-on-write granularity.
    pub cow: CowGranularity,
    /// Bytes the data store occupies on its filesystem (sparse files), if known.
    pub data_allocated_bytes: Option<u64>,
    /// Bytes of memory held by device maps.
    pub map_memory_bytes: u64,
    /// Bytes of memory held by space accounting.
    pub space_memory_bytes: u64,
    /// Number of compact and split map entries.
    pub entries: (u64, u64),
    /// How the data store is read and written (chosen when the pool is opened).
    pub data_io: IoMode,
}

/// Locks the pool in `dir`, which must hold one (no lock file is left in other directories).
pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    if !dir.join("superblock").exists() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "{} is not an hpmapper pool (no superblock); create one with `hpmapper pool create`",
                dir.display()
            ),
        ));
    }
    lock_file(dir)
}

/// Makes the pool directory `dir` reachable by its owner only (mode 0700): its files hold
/// every device's data and the names of every layer. Says so when an existing pool's
/// directory was open to others (pools made before this rule, or a directory made by hand).
fn make_private(dir: &Path, existing: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let what = || format!("making {} private", dir.display());
    let mode = std::fs::metadata(dir)
        .map_err(|e| Error::io(what(), e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        let set = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        if let Err(e) = set {
            if !existing {
                return Err(Error::io(what(), e));
            }
            // A pool that opened before stays usable (a directory we do not own, a
            // filesystem without modes): say what is open instead.
            tracing::warn!(
                dir = %dir.display(),
                "the pool directory is open to other users (mode {:o}) and could not be made 0700: {e}",
                mode & 0o7777
            );
            return Ok(());
        }
        if existing {
            tracing::warn!(
                dir = %dir.display(),
                "the pool directory was open to other users (mode {:o}); made it 0700",
                mode & 0o7777
            );
        }
    }
    Ok(())
}

fn lock_file(dir: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::new(
            ErrorKind::Busy,
            format!(
                "pool {} is in use by another process (the hpmapper daemon?)",
                dir.display()
            ),
        )),
        Err(e) => Err(Error::io(format!("locking {}", path.display()), e.into())),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

fn data_path(dir: &Path, sb: &Superblock) -> PathBuf {
    if sb.data_path.is_empty() {
        dir.join("data")
    } else {
        PathBuf::from(&sb.data_path)
    }
}

/// The capacity in blocks for `capacity` bytes: whole chunks of `chunk_blocks` blocks, at
/// most [`hpm_format::MAX_CHUNKS`] of them (chunk numbers are 32-bit).
fn capacity_blocks_of(capacity: u64, chunk_blocks: u64) -> Result<u64> {
    let blocks = capacity / (chunk_blocks * BLOCK_SIZE) * chunk_blocks;
    if blocks / chunk_blocks > hpm_format::MAX_CHUNKS {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("capacity {capacity} needs more than 2^32 - 1 chunks"),
        ));
    }
    Ok(blocks)
}

/// Opens the files of an existing pool directory; the data store with `data_io` unless
/// read-only (inspections read through the page cache).
pub(crate) fn open_files(dir: &Path, read_only: bool, data_io: IoMode) -> Result<PoolStorage> {
    let open = |name: &str| -> Result<Box<dyn Backend>> {
        let p = dir.join(name);
        let f = if read_only {
            FileBackend::open_read_only(&p)
        } else {
            FileBackend::open(&p)
        };
        f.map(|b| Box::new(b) as Box<dyn Backend>).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::new(ErrorKind::NotFound, format!("{} is not an hpmapper pool (no {name}); create one with `hpmapper pool create`", dir.display()))
            } else {
                Error::io(format!("opening {}", p.display()), e)
            }
        })
    };
    let superblock = open("superblock")?;
    let meta = [open("meta.0")?, open("meta.1")?];
    // The data path is in the superblock; peek at it.
    let (store, _) = Store::load(open("superblock")?, [open("meta.0")?, open("meta.1")?])?;
    let dp = data_path(dir, &store.sb);
    let data = if read_only {
        FileBackend::open_read_only(&dp)
    } else {
        FileBackend::open_with(&dp, data_io)
    }
    .map_err(|e| Error::io(format!("opening the pool's data store {}", dp.display()), e))?;
    Ok(PoolStorage {
        superblock,
        meta,
        data: Box::new(data),
    })
}

impl Pool {
    /// Creates a pool in `dir` (created if missing; must hold no pool) and opens it.
    pub fn create(dir: &Path, opts: &PoolOptions) -> Result<Pool> {
        chunk_blocks_of(opts.chunk_size)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        make_private(dir, false)?;
        let lock = lock_file(dir)?;
        for name in ["superblock", "meta.0", "meta.1"] {
            if dir.join(name).exists() {
                return Err(Error::new(
                    ErrorKind::Exists,
                    format!("{} already holds a pool", dir.display()),
                ));
            }
        }
        // Everything this creates is removed again if creation fails, so it can be retried.
        let mut created: Vec<PathBuf> = Vec::new();
        let result = Self::create_files(dir, opts, lock, &mut created);
        if result.is_err() {
            for p in created.iter().rev() {
                let _ = std::fs::remove_file(p);
            }
        }
        result
    }

    fn create_files(
        dir: &Path,
        opts: &PoolOptions,
        lock: File,
        created: &mut Vec<PathBuf>,
    ) -> Result<Pool> {
        let mut new = |p: PathBuf| -> Result<Box<dyn Backend>> {
            let b = FileBackend::create_new(&p)
                .map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
            created.push(p);
            Ok(Box::new(b))
        };
        let (data, data_path): (Box<dyn Backend>, String) = match &opts.data {
            Some(p) if p.exists() => {
                let b = FileBackend::open(p)
                    .map_err(|e| Error::io(format!("opening data store {}", p.display()), e))?;
                (Box::new(b), p.to_string_lossy().into_owned())
            }
            Some(p) => (new(p.clone())?, p.to_string_lossy().into_owned()),
            None => (new(dir.join("data"))?, String::new()),
        };
        let capacity = match opts.capacity {
            Some(c) => c,
            None => {
                let len = data
                    .len()
                    .map_err(|e| Error::io("reading the data store's size", e))?;
                if len > 0 {
                    len
                } else {
                    let st = rustix::fs::statvfs(dir)
                        .map_err(|e| Error::io("reading free space", e.into()))?;
                    st.f_bavail * st.f_frsize / 10 * 9
                }
            }
        };
        let storage = PoolStorage {
            superblock: new(dir.join("superblock"))?,
            meta: [new(dir.join("meta.0"))?, new(dir.join("meta.1"))?],
            data,
        };
        let pool = Self::create_on(storage, opts, capacity, data_path, Some(lock))?;
        sync_dir(dir)?;
        let _ = pool.inner.dir.set(dir.to_path_buf());
        Ok(pool)
    }

    /// Creates a pool on the given backends.
    pub fn create_on(
        storage: PoolStorage,
        opts: &PoolOptions,
        capacity: u64,
        data_path: String,
        lock: Option<File>,
    ) -> Result<Pool> {
        let cs = opts.chunk_size;
        let chunk_blocks = chunk_blocks_of(cs)?;
        let capacity_blocks = capacity_blocks_of(capacity, chunk_blocks)?;
        if capacity_blocks == 0 {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("capacity {capacity} is smaller than one chunk ({cs})"),
            ));
        }
        if data_path.len() > 2048 {
            return Err(Error::new(
                ErrorKind::Invalid,
                "data path is longer than 2048 bytes",
            ));
        }
        let data = Checked::new(storage.data);
        let have = data
            .len()
            .map_err(|e| Error::io("reading the data store's size", e))?;
        let need = capacity_blocks * BLOCK_SIZE;
        if have < need {
            data.set_len(need).map_err(|e| {
                Error::io(
                    format!("the data store holds {have} bytes, fewer than the capacity {need}"),
                    e,
                )
            })?;
        }
        data.sync()
            .map_err(|e| Error::io("syncing the data store", e))?;
        let mut uuid = [0u8; 16];
        rand::fill(&mut uuid);
        let sb = Superblock {
            slot: 0,
            incompat: 0,
            ro_compat: 0,
            compat: 0,
            sequence: 0,
            uuid,
            flags: 0,
            chunk_blocks: chunk_blocks as u32,
            cow_granularity: (opts.cow == CowGranularity::Chunk) as u8,
            capacity_blocks,
            active_meta: 0,
            meta_gen: 0,
            checkpoint_len: 0,
            checkpoint_crc: 0,
            data_path,
        };
        let store = Store::create(storage.superblock, storage.meta, sb)?;
        let geo = Geometry {
            chunk_blocks: chunk_blocks as u32,
            capacity_blocks,
        };
        Self::start(store, data, State::new(geo), opts.cow, lock, opts.cache)
    }

    /// Opens the pool in `dir` for reading and writing, recovering from a crash if needed.
    /// Fails with `Busy` ("pool is in use") while another process has it open.
    pub fn open(dir: &Path) -> Result<Pool> {
        Self::open_with(dir, CacheConfig::default())
    }

    /// `open` with the given block cache.
    pub fn open_with(dir: &Path, cache: CacheConfig) -> Result<Pool> {
        Self::open_with_io(dir, cache, IoMode::Buffered)
    }

    /// `open_with`, the data store read and written with `data_io` ([`IoMode::Direct`]:
    /// `O_DIRECT`, as dm-thin's bios reach its data device; nothing cached twice).
    pub fn open_with_io(dir: &Path, cache: CacheConfig, data_io: IoMode) -> Result<Pool> {
        let lock = lock_dir(dir)?;
        make_private(dir, true)?;
        let storage = open_files(dir, false, data_io)?;
        let pool = Self::open_on_with(storage, Some(lock), cache)?;
        let _ = pool.inner.dir.set(dir.to_path_buf());
        let _ = pool.inner.data_io.set(data_io);
        Ok(pool)
    }

    /// Checks this open pool's metadata with the same rules as [`crate::check`]: flushes,
    /// then reads the metadata files while commits and checkpoints are held off. For the
    /// process that holds the pool (the daemon); others use `check`.
    pub fn check(&self) -> Result<crate::CheckReport> {
        let dir = self.inner.dir.get().ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "this pool was not opened from a directory",
            )
        })?;
        if self.inner.check_writable().is_ok() {
            self.inner.commit()?;
        }
        let _store = self.inner.store.lock();
        crate::check_storage(open_files(dir, true, IoMode::Buffered)?)
    }

    /// The directory the pool was opened from, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.get().map(PathBuf::as_path)
    }

    /// Opens a pool on the given backends.
    pub fn open_on(storage: PoolStorage, lock: Option<File>) -> Result<Pool> {
        Self::open_on_with(storage, lock, CacheConfig::default())
    }

    /// `open_on` with the given block cache.
    pub fn open_on_with(
        storage: PoolStorage,
        lock: Option<File>,
        cache: CacheConfig,
    ) -> Result<Pool> {
        let (mut store, loaded) = Store::load(storage.superblock, storage.meta)?;
        if !store.sb.writable_by_this_build() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "pool uses read-only-compatible features {:#x} this hpmapper cannot write",
                    store.sb.ro_compat
                ),
            ));
        }
        let geo = Geometry {
            chunk_blocks: store.sb.chunk_blocks,
            capacity_blocks: store.sb.capacity_blocks,
        };
        if let (Some(why), Some(at)) = (&loaded.scan.stopped, loaded.scan.later_batch_at) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "meta.{} journal is damaged in the middle ({why}; a later batch is intact at journal offset {at}); run `hpmapper check`",
                    store.sb.active_meta
                ),
            ));
        }
        // Before anything is sized by the capacity: a corrupt one must not allocate first.
        let data = Checked::new(storage.data);
        let have = data
            .len()
            .map_err(|e| Error::io("reading the data store's size", e))?;
        let need = geo.capacity_blocks * BLOCK_SIZE; // at most 2^32 chunks of 4 MiB
        if have < need {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("the data store is {have} bytes, smaller than the pool's capacity {need}"),
            ));
        }
        let mut problems = Vec::new();
        let mut st = State::from_checkpoint(geo, &loaded.checkpoint, &mut problems);
        if let Some(p) = problems.first() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("pool metadata is inconsistent ({} problems, first: {p}); run `hpmapper check` for all", problems.len()),
            ));
        }
        let mut freed = Vec::new();
        for (seq, batch) in &loaded.scan.batches {
            for (k, r) in batch.iter().enumerate() {
                st.apply(r).map_err(|e| {
                    Error::new(
                        ErrorKind::Corrupt,
                        format!("journal batch {seq}, record {k}: {e}; run `hpmapper check`"),
                    )
                })?;
            }
            // Each batch was durable before the next began, so its frees were reusable then.
            let (pending, txn) = st.space.take_pending();
            st.space.release(&pending);
            st.space.settle(txn);
            freed.extend(pending);
        }
        if store.sb.flags & FLAG_NEEDS_CHECK != 0 {
            tracing::info!(
                batches = loaded.scan.batches.len(),
                "pool was not closed cleanly; recovered from the journal"
            );
        }
        if let Some(why) = &loaded.scan.stopped {
            tracing::info!("journal ends in a torn or damaged batch, cut off: {why}");
            store.truncate_journal()?;
        }
        // Blocks freed by replayed batches may not have been punched before the crash; punch
        // those still free (nothing else runs yet, so none can be reused meanwhile).
        freed.retain(|&p| st.space.refs(p) == 0 && !st.space.is_pending(p));
        punch_runs(&data, &freed);
        st.finish_load();
        let cow = if store.sb.cow_granularity == 1 {
            CowGranularity::Chunk
        } else {
            CowGranularity::Block
        };
        Self::start(store, data, st, cow, lock, cache)
    }

    fn start(
        mut store: Store,
        data: Dev,
        st: State,
        cow: CowGranularity,
        lock: Option<File>,
        cache: CacheConfig,
    ) -> Result<Pool> {
        store.set_needs_check(true)?;
        Ok(Pool {
            inner: Arc::new(Inner {
                geo: st.geo,
                cow,
                data,
                live: RwLock::new(Live {
                    st,
                    records: Vec::new(),
                    open: HashMap::new(),
                }),
                store: Mutex::new(store),
                mutations: AtomicU64::new(0),
                synced: AtomicU64::new(0),
                stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
                gate: Gate::new(),
                meta_failed: false.into(),
                panicked: false.into(),
                stats: Stats::default(),
                cache: BlockCache::new(cache),
                dir: std::sync::OnceLock::new(),
                data_io: std::sync::OnceLock::new(),
                closed: false.into(),
                _lock: lock,
            }),
        })
    }

    /// Makes every completed write and metadata change durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.commit()
    }

    /// Flushes, writes a checkpoint, clears `needs_check` and releases the pool. Dropping the
    /// last handle does the same but can only log failures.
    pub fn close(self) -> Result<()> {
        self.inner.close()
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        u64::from(self.inner.geo.chunk_blocks) * BLOCK_SIZE
    }

    /// Copy-on-write granularity.
    pub fn cow_granularity(&self) -> CowGranularity {
        self.inner.cow
    }

    /// Grows the pool's data capacity to `capacity` bytes (rounded down to whole chunks);
    /// returns the new capacity. Shrinking is not supported; asking for the current
    /// capacity changes nothing. A data file is extended (sparse) first; a data block device
    /// must already be that big. Durable on return: the data store's new length is synced
    /// before a checkpoint whose superblock names the new capacity, and no block of the new
    /// space is handed out before that checkpoint is durable (docs/design.md section 7).
    pub fn grow(&self, capacity: u64) -> Result<u64> {
        let inner = &*self.inner;
        inner.check_writable()?;
        let blocks = capacity_blocks_of(capacity, u64::from(inner.geo.chunk_blocks))?;
        let mut store = inner.store_lock();
        let current = inner.live.read().st.space.capacity_blocks();
        if blocks < current {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "shrinking a pool is not supported: {capacity} bytes is below its capacity of {} bytes",
                    current * BLOCK_SIZE
                ),
            ));
        }
        if blocks == current {
            return Ok(current * BLOCK_SIZE);
        }
        let need = blocks * BLOCK_SIZE;
        let have = inner
            .data
            .len()
            .map_err(|e| Error::io("reading the data store's size", e))?;
        if have < need {
            if !inner.data.resizable() {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!("the data block device holds {have} bytes, fewer than {need}: grow the device first (a pool on a block device can use at most all of it)"),
                ));
            }
            inner.data.set_len(need).map_err(|e| {
                Error::io(
                    format!("extending the data store from {have} to {need} bytes"),
                    e,
                )
            })?;
        }
        // IMPORTANT: the new length is durable before a superblock names the new capacity
        // (open refuses a data store shorter than the capacity).
        inner
            .data
            .sync()
            .map_err(|e| Error::io("syncing the data store", e))?;
        store.sb.capacity_blocks = blocks;
        if let Err(e) = inner.checkpoint(&mut store, true) {
            // Not known to be durable: the new space stays unused in this process.
            store.sb.capacity_blocks = current;
            return Err(e);
        }
        // Only now may blocks of the new space be handed out.
        let mut live = inner.live_write()?;
        live.st.space.grow(blocks);
        live.st.geo.capacity_blocks = blocks;
        tracing::info!(from = current * BLOCK_SIZE, to = need, "pool grown");
        Ok(need)
    }

    /// Data capacity and data in use, in bytes: the first two figures of
    /// [`Pool::info`], without its walk over every device's map.
    pub fn space(&self) -> (u64, u64) {
        let live = self.inner.live.read();
        let space = &live.st.space;
        (
            space.capacity_blocks() * BLOCK_SIZE,
            space.used_blocks() * BLOCK_SIZE,
        )
    }

    /// Counters since open.
    pub fn stats(&self) -> EngineStats {
        self.inner.stats.snapshot()
    }

    /// Empties the block cache (as after a restart) and returns the bytes it held; for
    /// cold-cache measurements. Data and metadata are untouched.
    pub fn drop_cache(&self) -> u64 {
        self.inner.cache.clear()
    }

    /// Block cache counters since open.
    pub fn cache_stats(&self) -> CacheStats {
        self.inner.cache.stats()
    }

    /// The block cache's settings.
    pub fn cache_config(&self) -> CacheConfig {
        self.inner.cache.config()
    }

    fn info_of(&self, st: &State, d: &DeviceState) -> DeviceInfo {
        let (mapped, exclusive) = st.usage(d);
        DeviceInfo {
            id: d.id,
            name: d.name.clone(),
            size: d.size,
            origin: (!d.origin.is_empty()).then(|| d.origin.clone()),
            read_only: d.read_only,
            mapped_bytes: mapped * BLOCK_SIZE,
            exclusive_bytes: exclusive * BLOCK_SIZE,
        }
    }

    /// Every device, by name.
    pub fn list_devices(&self) -> Vec<DeviceInfo> {
        let live = self.inner.live.read();
        let mut v: Vec<_> = live
            .st
            .devices
            .values()
            .map(|d| self.info_of(&live.st, d))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// One device.
    pub fn device_info(&self, name: &str) -> Result<DeviceInfo> {
        let live = self.inner.live.read();
        let d = live.st.by_name(name).ok_or_else(|| not_found(name))?;
        Ok(self.info_of(&live.st, d))
    }

    /// Pool figures.
    pub fn info(&self) -> Result<PoolInfo> {
        let metadata_bytes = self.inner.store.lock().bytes();
        let live = self.inner.live.read();
        let mut map_memory = 0;
        let (mut compact, mut split) = (0, 0);
        for d in live.st.devices.values() {
            map_memory += d.map.memory_bytes() as u64;
            for (_, e) in d.map.entries() {
                match e {
                    crate::map::Entry::Compact { .. } => compact += 1,
                    crate::map::Entry::Split(_) | crate::map::Entry::Scattered(_) => split += 1,
                }
            }
        }
        Ok(PoolInfo {
            chunk_size: self.chunk_size(),
            capacity_bytes: live.st.space.capacity_blocks() * BLOCK_SIZE,
            used_bytes: live.st.space.used_blocks() * BLOCK_SIZE,
            metadata_bytes,
            devices: live.st.devices.len(),
            cow: self.inner.cow,
            data_allocated_bytes: self.inner.data.allocated_bytes().ok().flatten(),
            map_memory_bytes: map_memory,
            space_memory_bytes: live.st.space.memory_bytes() as u64,
            entries: (compact, split),
            data_io: self.inner.data_io.get().copied().unwrap_or_default(),
        })
    }

    /// Creates an empty device of `size` bytes (a multiple of 4096, at most
    /// [`hpm_format::MAX_DEVICE_SIZE`]). Durable on return.
    pub fn create_device(&self, name: &str, size: u64) -> Result<DeviceInfo> {
        check_name(name).map_err(|e| Error::new(ErrorKind::Invalid, e))?;
        if size == 0 || check_size(size).is_err() {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "device size {size} must be a positive multiple of 4096 of at most {} bytes (64 TiB)",
                    hpm_format::MAX_DEVICE_SIZE
                ),
            ));
        }
        self.manage(|st| {
            if st.names.contains_key(name) {
                return Err(exists(name));
            }
            Ok(Record::CreateDevice {
                id: st.next_id,
                name: name.to_string(),
                size,
                read_only: false,
            })
        })?;
        self.device_info(name)
    }

    /// Creates `name` sharing every block of `origin` (a snapshot; no data is copied).
    /// Durable on return. Writes in flight on `origin` may or may not be captured.
    pub fn snapshot(&self, origin: &str, name: &str, read_only: bool) -> Result<DeviceInfo> {
        check_name(name).map_err(|e| Error::new(ErrorKind::Invalid, e))?;
        self.manage(|st| {
            let o = st.by_name(origin).ok_or_else(|| not_found(origin))?;
            if st.names.contains_key(name) {
                return Err(exists(name));
            }
            Ok(Record::Snapshot {
                id: st.next_id,
                origin: o.id,
                name: name.to_string(),
                read_only,
            })
        })?;
        self.device_info(name)
    }

    /// Removes a device; its blocks that no other device shares are freed. Durable on return.
    /// Fails with `Busy` while the device is open.
    pub fn remove_device(&self, name: &str) -> Result<()> {
        self.manage(|st| {
            let d = st.by_name(name).ok_or_else(|| not_found(name))?;
            Ok(Record::Remove { id: d.id })
        })
    }

    /// Grows a device to `size` bytes. Shrinking is not supported. Durable on return.
    pub fn resize_device(&self, name: &str, size: u64) -> Result<DeviceInfo> {
        self.manage(|st| {
            let d = st.by_name(name).ok_or_else(|| not_found(name))?;
            check_size(size).map_err(|e| Error::new(ErrorKind::Invalid, e))?;
            if size < d.size {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "shrinking device {name:?} from {} to {size} bytes is not supported",
                        d.size
                    ),
                ));
            }
            Ok(Record::Resize { id: d.id, size })
        })?;
        self.device_info(name)
    }

    /// Applies one management record and commits it (with everything pending) at once.
    fn manage(&self, make: impl FnOnce(&State) -> Result<Record>) -> Result<()> {
        self.inner.check_writable()?;
        {
            let mut live = self.inner.live_write()?;
            let r = make(&live.st)?;
            if let Record::Remove { id } = &r {
                if live.open.get(id).copied().unwrap_or(0) > 0 {
                    let name = &live.st.devices[id].name;
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!("device {name:?} is open (attached or in use); detach it first"),
                    ));
                }
            }
            live.st
                .apply(&r)
                .map_err(|e| Error::new(ErrorKind::Invalid, e))?;
            live.records.push(r);
            self.inner.mutations.fetch_add(1, SeqCst);
        }
        self.inner.commit()
    }
}

/// Blocks per chunk for a chunk size in bytes, or why the size is not allowed.
fn chunk_blocks_of(cs: u64) -> Result<u64> {
    let chunk_blocks = cs / BLOCK_SIZE;
    if !cs.is_multiple_of(BLOCK_SIZE)
        || !chunk_blocks.is_power_of_two()
        || !(u64::from(MIN_CHUNK_BLOCKS)..=u64::from(MAX_CHUNK_BLOCKS)).contains(&chunk_blocks)
    {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("chunk size {cs} must be a power of two from 64K to 4M"),
        ));
    }
    Ok(chunk_blocks)
}

pub(crate) fn not_found(name: &str) -> Error {
    Error::new(ErrorKind::NotFound, format!("no device named {name:?}"))
}

fn exists(name: &str) -> Error {
    Error::new(
        ErrorKind::Exists,
        format!("a device named {name:?} already exists"),
    )
}

/// Punches coalesced runs of `blocks`; failures are logged, not fatal (see `Checked::punch`).
pub(crate) fn punch_runs(data: &Dev, blocks: &[u64]) {
    let mut sorted = blocks.to_vec();
    sorted.sort_unstable();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i + 1;
        while j < sorted.len() && sorted[j] == sorted[j - 1] + 1 {
            j += 1;
        }
        let (off, len) = (sorted[i] * BLOCK_SIZE, (j - i) as u64 * BLOCK_SIZE);
        if let Err(e) = data.punch(off, len) {
            tracing::warn!("could not punch freed blocks at byte {off}+{len}: {e}");
        }
        i = j;
    }
}

/// A lock guard that stops the pool if its thread panics while holding it (the state it
/// guards may be half changed).
pub(crate) struct Watched<'a, G> {
    guard: G,
    panicked: &'a AtomicBool,
    /// The thread was unwinding already when it took the lock (a destructor run by some
    /// other panic, `Device::drop` say): only a panic that starts under the lock counts.
    unwinding: bool,
}

impl<G: Deref> Deref for Watched<'_, G> {
    type Target = G::Target;
    fn deref(&self) -> &G::Target {
        &self.guard
    }
}

impl<G: DerefMut> DerefMut for Watched<'_, G> {
    fn deref_mut(&mut self) -> &mut G::Target {
        &mut self.guard
    }
}

impl<G> Drop for Watched<'_, G> {
    fn drop(&mut self) {
        if !self.unwinding && std::thread::panicking() && !self.panicked.swap(true, SeqCst) {
            tracing::error!(
                "a thread panicked while changing the pool's state; the pool refuses all \
                 I/O until it is reopened, which recovers its last commit"
            );
        }
    }
}

impl Inner {
    /// `live` for changing the state (see `Watched`), refused once the pool has stopped:
    /// checked after the lock is taken, so that nothing that was waiting for it while
    /// another thread panicked under it goes on from the half-changed state.
    pub(crate) fn live_write(&self) -> Result<Watched<'_, RwLockWriteGuard<'_, Live>>> {
        let guard = self.watched(self.live.write());
        self.check_intact()?;
        Ok(guard)
    }

    /// `store` for a commit, a checkpoint or a capacity change (see `Watched`). What they
    /// change in the state goes through `live_write`, which refuses a stopped pool.
    pub(crate) fn store_lock(&self) -> Watched<'_, MutexGuard<'_, Store>> {
        self.watched(self.store.lock())
    }

    fn watched<G>(&self, guard: G) -> Watched<'_, G> {
        Watched {
            guard,
            panicked: &self.panicked,
            unwinding: std::thread::panicking(),
        }
    }

    /// Refuses everything once a thread panicked while changing the state. One atomic
    /// load: every read calls it.
    pub(crate) fn check_intact(&self) -> Result<()> {
        if self.panicked.load(SeqCst) {
            return Err(Error::new(
                ErrorKind::Io,
                "the pool stopped after a panic while its state was being changed; reopen \
                 it (restart the daemon) to recover its last commit",
            ));
        }
        Ok(())
    }

    /// Refuses writes after an I/O failure. Cheap when healthy (two atomic loads): it must
    /// not take `store`, which a commit holds across its syncs.
    pub(crate) fn check_writable(&self) -> Result<()> {
        self.check_intact()?;
        let meta = || {
            self.meta_failed
                .load(std::sync::atomic::Ordering::Acquire)
                .then(|| self.store.lock().poisoned())
                .flatten()
        };
        if let Some(why) = self.data.poisoned().or_else(meta) {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "the pool refuses writes after an I/O failure ({why}); reopen it to recover"
                ),
            ));
        }
        Ok(())
    }

    /// Publishes a metadata store failure to `check_writable` (called with `store` held after
    /// every operation that writes metadata; poisoning is sticky, so the flag never clears).
    fn note_meta(&self, store: &Store) {
        if store.poisoned().is_some() {
            self.meta_failed
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Makes every write and metadata change completed before this call durable: the
    /// commit protocol (data sync, then the journal batch, then frees become reusable).
    ///
    /// Group commit, and nothing to do when nothing changed: every completed change has a
    /// number in `mutations`, and a commit reads that number when it takes the records (under
    /// `live`'s write lock, the lock every record is pushed under with its number), so it
    /// makes durable every change numbered up to what it read: the records it took, and
    /// (syncing after the read) every data write numbered before. A caller needs the number
    /// current at its call; once `synced` reaches it, by a commit that ran before or while
    /// it waited, it returns without another. Flushes that arrive together share one commit,
    /// and a flush with nothing changed since the last commit costs two loads.
    pub(crate) fn commit(&self) -> Result<()> {
        self.check_intact()?;
        let need = self.mutations.load(SeqCst);
        if self.synced.load(SeqCst) >= need {
            return Ok(());
        }
        let mut store = self.store_lock();
        if self.synced.load(SeqCst) >= need {
            return Ok(());
        }
        let r = self.commit_locked(&mut store);
        self.note_meta(&store);
        r
    }

    fn commit_locked(&self, store: &mut Store) -> Result<()> {
        let (records, (frees, txn), covered) = {
            let mut live = self.live_write()?;
            (
                std::mem::take(&mut live.records),
                live.st.space.take_pending(),
                self.mutations.load(SeqCst),
            )
        };
        // IMPORTANT: data first, so no durable record ever points at data that is not.
        self.data
            .sync()
            .map_err(|e| Error::io("flushing pool data", e))?;
        store.append(&records)?;
        self.synced.fetch_max(covered, SeqCst);
        self.stats.bump_commit();
        self.release(&frees, txn);
        if store.journal_bytes() > CHECKPOINT_AFTER {
            self.checkpoint(store, true)?;
        }
        Ok(())
    }

    /// Punches freed blocks and makes them reusable. IMPORTANT: only after the transaction
    /// that freed them is durable; punch before release so no new data gets punched.
    fn release(&self, frees: &[u64], txn: u64) {
        // A stopped pool releases nothing: the frees may come from a half-made change.
        if frees.is_empty() {
            if let Ok(mut live) = self.live_write() {
                live.st.space.settle(txn);
            }
            return;
        }
        if self.check_intact().is_err() {
            return;
        }
        punch_runs(&self.data, frees);
        let _g = self.gate.write();
        self.cache.invalidate(frees);
        let Ok(mut live) = self.live_write() else {
            return;
        };
        live.st.space.release(frees);
        live.st.space.settle(txn);
    }

    /// Writes the whole state as a new checkpoint. Holds `live` exclusively so the state it
    /// writes has no half-installed write.
    pub(crate) fn checkpoint(&self, store: &mut Store, needs_check: bool) -> Result<()> {
        let r = self.checkpoint_locked(store, needs_check);
        self.note_meta(store);
        r
    }

    fn checkpoint_locked(&self, store: &mut Store, needs_check: bool) -> Result<()> {
        let (frees, txn) = {
            let mut live = self.live_write()?;
            self.data
                .sync()
                .map_err(|e| Error::io("flushing pool data", e))?;
            let body = live.st.to_checkpoint().encode(self.geo.chunk_blocks);
            let flags = if needs_check {
                store.sb.flags | FLAG_NEEDS_CHECK
            } else {
                store.sb.flags & !FLAG_NEEDS_CHECK
            };
            store.write_checkpoint(&body, flags)?;
            live.records.clear();
            self.synced.fetch_max(self.mutations.load(SeqCst), SeqCst);
            live.st.space.take_pending()
        };
        self.stats.bump_checkpoint();
        self.release(&frees, txn);
        Ok(())
    }

    pub(crate) fn close(&self) -> Result<()> {
        if self.closed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        self.check_writable()?;
        self.commit()?;
        let mut store = self.store_lock();
        self.checkpoint(&mut store, false)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!("closing the pool: {e}; the next open recovers from the journal");
        }
    }
}
