//! Experiment 4: snapshot creation time of a device with 1 GiB mapped (against a device with
//! nothing mapped, in turns), and the metadata cost of a map entry: memory per compact entry
//! (a fully written device) and per split entry (a snapshot with one copy-on-write block in
//! every chunk), checkpoint bytes on disk per entry after a clean close, and the time of a
//! sequential 4 KiB copy-on-write through a fresh snapshot (each chunk splits at its first
//! block, takes the others one by one, and collapses back at its last).
//!
//! On-disk bytes come from the metadata files after two clean closes in a row: the first
//! checkpoint goes into one file, the second (same state, empty journal) into the other, so
//! both then hold exactly the checkpoint and differences between states count entries only.

use crate::progress;
use crate::report::{ratios, Section};
use crate::setup::{create_pool, fill_device, pattern, Config, BLOCK, GIB, KIB, MIB, R};
use hpm_engine::{CowGranularity, Pool};
use std::path::Path;
use std::time::Instant;

const BIG: u64 = GIB;
const CHUNK: u64 = 512 * KIB;
/// Region rewritten block by block in the sequential copy-on-write timing.
const SEQ: u64 = 64 * MIB;

/// Closes `pool` twice in a row (reopening in between) and returns it reopened with the size
/// of one metadata file, which then holds the checkpoint and nothing else.
fn checkpoint_size(pool: Pool, dir: &Path) -> R<(Pool, u64)> {
    pool.close()?;
    Pool::open(dir)?.close()?;
    let m0 = std::fs::metadata(dir.join("meta.0"))?.len();
    let m1 = std::fs::metadata(dir.join("meta.1"))?.len();
    if m0 != m1 {
        return Err(format!("after two clean closes meta.0 is {m0} bytes and meta.1 {m1}").into());
    }
    Ok((Pool::open(dir)?, m0))
}

pub fn run(cfg: &Config, dir: &Path, sec: &mut Section) -> R<()> {
    let pdir = dir.join("meta");
    let pool = create_pool(&pdir, CHUNK, CowGranularity::Block, 3 * GIB)?;
    pool.create_device("big", BIG)?;
    pool.create_device("empty", BIG)?;
    let (pool, ck0) = checkpoint_size(pool, &pdir)?;
    progress!("metadata: writing 1 GiB");
    {
        let d = pool.open_device("big")?;
        fill_device(&d, BIG, &pattern(MIB as usize, 1))?;
    }
    pool.flush()?;
    let info1 = pool.info()?;
    let (pool, ck1) = checkpoint_size(pool, &pdir)?;

    progress!("metadata: {} rounds of snapshot timings", cfg.rounds);
    let (mut big_us, mut empty_us) = (Vec::new(), Vec::new());
    for rno in 0..cfg.rounds {
        let time = |origin: &str| -> R<f64> {
            let name = format!("{origin}-snap-{rno}");
            let t = Instant::now();
            pool.snapshot(origin, &name, false)?;
            let us = t.elapsed().as_nanos() as f64 / 1e3;
            pool.remove_device(&name)?;
            Ok(us)
        };
        if rno % 2 == 0 {
            big_us.push(time("big")?);
            empty_us.push(time("empty")?);
        } else {
            empty_us.push(time("empty")?);
            big_us.push(time("big")?);
        }
    }
    sec.row_vs(
        "snapshot of a device with 1 GiB mapped",
        &big_us,
        "µs",
        &ratios(&big_us, &empty_us),
        "empty device",
    );
    sec.row("snapshot of a device with nothing mapped", &empty_us, "µs");

    progress!("metadata: one copy-on-write block in each chunk of a snapshot");
    pool.snapshot("big", "split", false)?;
    {
        let d = pool.open_device("split")?;
        let blk = pattern(BLOCK as usize, 5);
        for c in 0..BIG / CHUNK {
            // Block 1 of each chunk: the copy goes to a new chunk, so the entry must split.
            d.write_at(&blk, c * CHUNK + BLOCK)?;
        }
    }
    pool.flush()?;
    let info2 = pool.info()?;
    let (pool, ck2) = checkpoint_size(pool, &pdir)?;
    let info3 = pool.info()?;

    progress!(
        "metadata: {} rounds of sequential copy-on-write",
        cfg.rounds
    );
    let blk = pattern(BLOCK as usize, 6);
    let mut seq_us = Vec::new();
    for rno in 0..cfg.rounds {
        let name = format!("seq-{rno}");
        pool.snapshot("big", &name, false)?;
        let d = pool.open_device(&name)?;
        let t = Instant::now();
        for off in (0..SEQ).step_by(BLOCK as usize) {
            d.write_at(&blk, off)?;
        }
        seq_us.push(t.elapsed().as_nanos() as f64 / 1e3 / (SEQ / BLOCK) as f64);
        drop(d);
        pool.remove_device(&name)?;
    }
    pool.close()?;

    let (compact, split) = (info1.entries.0, info2.entries.1);
    if info1.entries.1 != 0 || info2.entries.0 != compact || split != BIG / CHUNK {
        return Err(format!(
            "unexpected entry counts: full device {:?}, with split snapshot {:?}",
            info1.entries, info2.entries
        )
        .into());
    }
    let per = |bytes: u64, n: u64| [bytes as f64 / n as f64];
    sec.row(
        "map memory per compact entry (full chunk)",
        &per(info1.map_memory_bytes, compact),
        "B",
    );
    sec.row(
        "map memory per split entry",
        &per(info2.map_memory_bytes - info1.map_memory_bytes, split),
        "B",
    );
    sec.row(
        "checkpoint bytes per compact entry",
        &per(ck1 - ck0, compact),
        "B",
    );
    sec.row(
        "checkpoint bytes per split entry",
        &per(ck2 - ck1, split),
        "B",
    );
    sec.row(
        "sequential 4 KiB copy-on-write through a snapshot, no flush",
        &seq_us,
        "µs/op",
    );
    sec.row(
        "space accounting memory per mapped GiB",
        &[info1.space_memory_bytes as f64 / (info1.used_bytes as f64 / GIB as f64)],
        "B",
    );
    sec.note(format!(
        "Pool: block granularity, 512 KiB chunks. 1 GiB device fully written = {compact} compact entries, {} B of map memory; a snapshot of it with one 4 KiB copy-on-write in each chunk = {split} split entries, +{} B.",
        info1.map_memory_bytes,
        info2.map_memory_bytes - info1.map_memory_bytes
    ));
    sec.note(format!(
        "Checkpoint file after clean close: {ck0} B with two empty devices, {ck1} B with 1 GiB mapped, {ck2} B with the split snapshot too; info().metadata_bytes (two superblock slots + both metadata files) at the end: {} B.",
        info3.metadata_bytes
    ));
    sec.note(format!(
        "Space accounting with 1 GiB used: {} B (space_memory_bytes). Snapshot time includes its commit (data fdatasync with nothing dirty, journal append + fsync); a snapshot is removed (untimed) after each timing. Memory and bytes are exact counts, one value.",
        info1.space_memory_bytes
    ));
    Ok(())
}
