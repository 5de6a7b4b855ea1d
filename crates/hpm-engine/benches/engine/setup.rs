//! What every experiment needs: the run's configuration, pools in the bench directory, a
//! zero-free data pattern, device fills and random offsets.
//!
//! It must never time anything: timing belongs to the experiments, so each one shows what is
//! inside its timed region.

use hpm_engine::{CacheConfig, CowGranularity, Device, Pool, PoolOptions, PoolStorage};
use hpm_io::{Backend, MemBackend};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub type R<T> = Result<T, Box<dyn std::error::Error>>;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const BLOCK: u64 = 4 * KIB;

/// The run's configuration, from the command line.
#[derive(Debug, Clone)]
pub struct Config {
    /// A fresh directory for this run, removed at the end.
    pub dir: PathBuf,
    /// Rounds of every interleaved measurement (at least 5).
    pub rounds: usize,
    /// Smaller sizes and op counts, for a smoke test of the bench itself.
    pub quick: bool,
    /// Bytes mapped in total for the open/recovery experiment (before the free-space check).
    pub recovery_bytes: u64,
    /// Experiments to run (1-5); all when empty.
    pub only: Vec<u32>,
}

impl Config {
    /// `full` normally, `quick` with `--quick`.
    pub fn scale(&self, full: usize, quick: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }

    pub fn runs(&self, id: u32) -> bool {
        self.only.is_empty() || self.only.contains(&id)
    }
}

/// Creates a pool in `dir` with the given geometry and the default block cache.
pub fn create_pool(dir: &Path, chunk: u64, cow: CowGranularity, capacity: u64) -> R<Pool> {
    create_pool_with(dir, chunk, cow, capacity, CacheConfig::default())
}

/// Creates a pool in `dir` with the given geometry and block cache.
pub fn create_pool_with(
    dir: &Path,
    chunk: u64,
    cow: CowGranularity,
    capacity: u64,
    cache: CacheConfig,
) -> R<Pool> {
    let opts = PoolOptions {
        chunk_size: chunk,
        capacity: Some(capacity),
        cow,
        cache,
        ..PoolOptions::default()
    };
    Ok(Pool::create(dir, &opts)?)
}

/// A data store that keeps nothing: writes succeed at once, reads return zeros. With it an
/// operation costs only the engine's own work (plan, allocation, map lookup and update,
/// journal records), with no data I/O.
pub struct Discard(AtomicU64);

impl Backend for Discard {
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn punch(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.load(Ordering::Relaxed))
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.store(len, Ordering::Relaxed);
        Ok(())
    }
}

/// A block-granularity pool with metadata in memory and a [`Discard`] data store.
pub fn discarding_pool(chunk: u64, capacity: u64) -> R<Pool> {
    let storage = PoolStorage {
        superblock: Box::new(MemBackend::new()),
        meta: [Box::new(MemBackend::new()), Box::new(MemBackend::new())],
        data: Box::new(Discard(AtomicU64::new(0))),
    };
    let opts = PoolOptions {
        chunk_size: chunk,
        ..PoolOptions::default()
    };
    Ok(Pool::create_on(
        storage,
        &opts,
        capacity,
        String::new(),
        None,
    )?)
}

/// The default cache, described for the report.
pub fn cache_text(c: &CacheConfig) -> String {
    format!("{:?}, {}, {:?}", c.mode, size_text(c.size), c.policy)
}

/// `len` bytes with no zero byte, varying with `seed`, so every write really allocates and
/// nothing can be mistaken for a hole.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(131).wrapping_add(u64::from(seed)) % 255) as u8 + 1)
        .collect()
}

/// Writes the whole of `dev` (of `size` bytes) sequentially with `buf`.
pub fn fill_device(dev: &Device, size: u64, buf: &[u8]) -> R<()> {
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        dev.write_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// `n` random 4 KiB-aligned byte offsets within `size` bytes (with repetition).
pub fn random_offsets(seed: u64, size: u64, n: usize) -> Vec<u64> {
    let mut r = rng(seed);
    let blocks = size / BLOCK;
    (0..n).map(|_| r.random_range(0..blocks) * BLOCK).collect()
}

/// Free bytes for an unprivileged user on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> R<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail * st.f_frsize)
}

/// A short label of a pool geometry: "block 64K", "chunk 512K".
pub fn label(cow: CowGranularity, chunk: u64) -> String {
    let g = match cow {
        CowGranularity::Block => "block",
        CowGranularity::Chunk => "chunk",
    };
    format!("{g} {}K", chunk / KIB)
}

/// Human size: "64 MiB", "1 GiB", "9.96 GiB".
pub fn size_text(b: u64) -> String {
    if b >= GIB {
        let g = b as f64 / GIB as f64;
        if b.is_multiple_of(GIB) {
            format!("{} GiB", b / GIB)
        } else {
            format!("{g:.2} GiB")
        }
    } else if b >= MIB {
        format!("{} MiB", b / MIB)
    } else {
        format!("{} KiB", b / KIB)
    }
}

/// Progress on stderr, so stdout holds only the report.
#[macro_export]
macro_rules! progress {
    ($($t:tt)*) => { eprintln!("[engine bench] {}", format!($($t)*)) };
}
