//! The hpmapper engine: a pool of thin-provisioned block devices with snapshots to any
//! depth, a two-level map that copies exactly the 4 KiB blocks written, and crash-consistent
//! metadata (journal + checkpoint + two superblock slots).
//!
//! The public API is [`Pool`] (create, open, devices, snapshots, flush, close), [`Device`]
//! (byte-addressed I/O) and [`check`]. docs/design.md is the normative description of the
//! on-disk format and the crash argument.

mod cache;
mod check;
mod device;
mod error;
mod fast_hash;
mod map;
mod pool;
mod shard;
mod space;
mod state;
mod stats;
mod store;

pub use cache::{CacheConfig, CacheMode, CachePolicy, CacheStats, DEFAULT_CACHE_SIZE};
pub use check::{check, check_storage, CheckReport};
pub use device::{Device, ReadPiece};
pub use error::{Error, ErrorKind, Result};
/// How the data store is read and written; see [`Pool::open_with_io`].
pub use hpm_io::IoMode;
pub use pool::{CowGranularity, DeviceInfo, Pool, PoolInfo, PoolOptions};
pub use state::MAX_NAME;
pub use stats::EngineStats;
pub use store::PoolStorage;
