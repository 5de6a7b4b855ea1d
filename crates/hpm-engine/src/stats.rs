//! Engine counters: what the device I/O did, cheaply counted with relaxed atomics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// A snapshot of the engine's counters since the pool was opened.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct EngineStats { $(#[doc = $doc] pub $name: u64,)* }

        #[derive(Default)]
        pub(crate) struct Stats { $($name: AtomicU64,)* }

        impl Stats {
            pub(crate) fn snapshot(&self) -> EngineStats {
                EngineStats { $($name: self.$name.load(Relaxed),)* }
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
        c.0(self).fetch_add(n, Relaxed);
    }
    pub(crate) fn bump_commit(&self) {
        self.commits.fetch_add(1, Relaxed);
    }
    pub(crate) fn bump_checkpoint(&self) {
        self.checkpoints.fetch_add(1, Relaxed);
    }
}

/// Selects one counter (a tiny accessor so call sites read `stats.add(&READS, 1)`).
pub(crate) struct AtomicU64Ref(pub fn(&Stats) -> &AtomicU64);

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
