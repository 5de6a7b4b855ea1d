//! Engine counters: what the device I/O did, cheaply counted with relaxed atomics.
//!
//! Every request bumps several counters, so each thread adds to its own shard (its own cache
//! lines, see `shard`) and a snapshot sums the shards: two threads doing I/O never write the
//! same line.

use crate::shard::{slot, SHARDS};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// A snapshot of the engine's counters since the pool was opened.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct EngineStats { $(#[doc = $doc] pub $name: u64,)* }

        /// One shard of the counters.
        #[derive(Default)]
        #[repr(align(128))]
        pub(crate) struct Counters { $($name: AtomicU64,)* }

        /// The counters, one shard per thread slot.
        pub(crate) struct Stats { shards: Box<[Counters]> }

        impl Default for Stats {
            fn default() -> Self {
                Self { shards: (0..SHARDS).map(|_| Counters::default()).collect() }
            }
        }

        impl Stats {
            pub(crate) fn snapshot(&self) -> EngineStats {
                let mut s = EngineStats::default();
                for c in self.shards.iter() {
                    $(s.$name += c.$name.load(Relaxed);)*
                }
                s
            }
        }
    };
}

counters! {
    reads: "Read requests.",
    read_bytes: "Bytes read by devices.",
    writes: "Write requests.",
    write_bytes: "Bytes written by devices.",
    zero_blocks_read: "Blocks read as zeros without backend I/O (unmapped).",
    backend_reads: "Backend read calls for device data.",
    backend_read_bytes: "Bytes read from the data store.",
    backend_writes: "Backend write calls for device data.",
    backend_write_bytes: "Bytes written to the data store.",
    cow_blocks: "Blocks that broke sharing (copy-on-write) on a write.",
    cow_copied_bytes: "Bytes copied from shared blocks by copy-on-write (partial blocks, whole chunks).",
    new_blocks: "Blocks newly allocated for unmapped virtual blocks.",
    in_place_blocks: "Blocks overwritten in place (already owned).",
    discarded_blocks: "Blocks unmapped by discard or write-zeroes.",
    commits: "Journal commits (flushes).",
    checkpoints: "Checkpoints written.",
}

impl Stats {
    pub(crate) fn add(&self, c: &AtomicU64Ref, n: u64) {
        self.local().add(c, n);
    }
    /// The calling thread's shard, for a request that bumps several counters.
    pub(crate) fn local(&self) -> &Counters {
        &self.shards[slot()]
    }
    pub(crate) fn bump_commit(&self) {
        self.shards[slot()].commits.fetch_add(1, Relaxed);
    }
    pub(crate) fn bump_checkpoint(&self) {
        self.shards[slot()].checkpoints.fetch_add(1, Relaxed);
    }
}

impl Counters {
    pub(crate) fn add(&self, c: &AtomicU64Ref, n: u64) {
        c.0(self).fetch_add(n, Relaxed);
    }
}

/// Selects one counter (a tiny accessor so call sites read `stats.add(&READS, 1)`).
pub(crate) struct AtomicU64Ref(pub fn(&Counters) -> &AtomicU64);

macro_rules! refs {
    ($($c:ident => $f:ident),* $(,)?) => { $(pub(crate) const $c: AtomicU64Ref = AtomicU64Ref(|s| &s.$f);)* };
}

refs! {
    READS => reads, READ_BYTES => read_bytes, WRITES => writes, WRITE_BYTES => write_bytes,
    ZERO_BLOCKS_READ => zero_blocks_read, BACKEND_READS => backend_reads,
    BACKEND_READ_BYTES => backend_read_bytes, BACKEND_WRITES => backend_writes,
    BACKEND_WRITE_BYTES => backend_write_bytes, COW_BLOCKS => cow_blocks,
    COW_COPIED_BYTES => cow_copied_bytes, NEW_BLOCKS => new_blocks,
    IN_PLACE_BLOCKS => in_place_blocks, DISCARDED_BLOCKS => discarded_blocks,
}
