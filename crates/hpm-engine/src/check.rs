//! The checker: reads a pool's metadata without changing it and lists every inconsistency
//! with where it is (superblock slot, metadata file, device, chunk, block, journal batch).
//!
//! It shares the loading code with open (`Store::load`, `State::from_checkpoint`,
//! `State::apply`) so that what it accepts is exactly what open accepts.

use crate::pool::open_files;
use crate::state::{Geometry, State};
use crate::store::{PoolStorage, Store};
use crate::Result;
use hpm_format::{BLOCK_SIZE, FLAG_NEEDS_CHECK};
use std::path::Path;

/// What `check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Inconsistencies; the pool is consistent when this is empty.
    pub problems: Vec<String>,
    /// Things recovery handles by itself (a torn journal tail, an unclean shutdown).
    pub notes: Vec<String>,
    /// Devices found.
    pub devices: usize,
    /// Data blocks in use.
    pub used_blocks: u64,
}

impl CheckReport {
    /// Whether no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the pool in `dir`. Takes the pool's lock, so it fails with "pool is in use" while
/// a daemon has the pool open. Errors only when the pool cannot be read at all (no such
/// directory, I/O errors, lock held); damage is reported in the report.
pub fn check(dir: &Path) -> Result<CheckReport> {
    let _lock = crate::pool::lock_dir(dir)?;
    match open_files(dir, true, hpm_io::IoMode::Buffered) {
        Ok(storage) => check_storage(storage),
        Err(e)
            if e.kind() == crate::ErrorKind::Corrupt
                || e.kind() == crate::ErrorKind::Unsupported =>
        {
            Ok(CheckReport {
                problems: vec![e.to_string()],
                ..Default::default()
            })
        }
        Err(e) => Err(e),
    }
}

/// Checks a pool on the given backends.
pub fn check_storage(storage: PoolStorage) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let (store, loaded) = match Store::load(storage.superblock, storage.meta) {
        Ok(x) => x,
        Err(e)
            if matches!(
                e.kind(),
                crate::ErrorKind::Corrupt | crate::ErrorKind::Unsupported
            ) =>
        {
            report.problems.push(e.to_string());
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    report.notes.extend(loaded.notes);
    if store.sb.flags & FLAG_NEEDS_CHECK != 0 {
        report
            .notes
            .push("the pool is open or was not closed cleanly; open replays the journal".into());
    }
    let geo = Geometry {
        chunk_blocks: store.sb.chunk_blocks,
        capacity_blocks: store.sb.capacity_blocks,
    };
    // The capacity sizes the state built below: checked against the data store first, so
    // that a corrupt capacity is reported rather than allocated.
    let need = geo.capacity_blocks * BLOCK_SIZE; // at most 2^32 chunks of 4 MiB
    match storage.data.len() {
        Ok(len) if len < need => {
            report.problems.push(format!(
                "data store is {len} bytes, smaller than the capacity {need}; the maps are not checked"
            ));
            return Ok(report);
        }
        Ok(_) => {}
        Err(e) => {
            report.problems.push(format!(
                "cannot read the data store's size: {e}; the maps are not checked"
            ));
            return Ok(report);
        }
    }
    let mut st = State::from_checkpoint(geo, &loaded.checkpoint, &mut report.problems);
    for (seq, batch) in &loaded.scan.batches {
        for (k, r) in batch.iter().enumerate() {
            if let Err(e) = st.apply(r) {
                report
                    .problems
                    .push(format!("journal batch {seq}, record {k} ({r:?}): {e}"));
            }
        }
        let (pending, txn) = st.space.take_pending();
        st.space.release(&pending);
        st.space.settle(txn);
    }
    match (&loaded.scan.stopped, loaded.scan.later_batch_at) {
        (Some(why), Some(at)) => report.problems.push(format!(
            "meta.{} journal: {why}, yet a later batch is intact at journal offset {at}: damage, not a torn tail",
            store.sb.active_meta
        )),
        (Some(why), None) => report.notes.push(format!("journal tail cut off at open: {why}")),
        _ => {}
    }
    report.devices = st.devices.len();
    report.used_blocks = st.space.used_blocks();
    Ok(report)
}
