//! Experiment 2: read cost against snapshot depth. A chain of 64 snapshots over a fully
//! written 64 MiB device, each level writing a few scattered blocks before the next snapshot;
//! the same random 4 KiB reads on the devices at depth 1, 16 and 64, in turns each round.
//! The same chain is built a second time on a discarding data store (reads return zeros at
//! once), which isolates the engine's own work (the map lookup and the read plan) from the
//! data file's page cache.

use crate::progress;
use crate::report::{ratios, Section, Summary, Target};
use crate::setup::{
    create_pool, discarding_pool, fill_device, pattern, random_offsets, rng, Config, BLOCK, MIB, R,
};
use hpm_engine::{CowGranularity, Device, Pool};
use rand::Rng;
use std::path::Path;
use std::time::Instant;

const SIZE: u64 = 64 * MIB;
const DEPTH: usize = 64;
const WRITES_PER_LEVEL: usize = 16;
const MEASURED: [usize; 3] = [1, 16, 64];

fn read_all(dev: &Device, offs: &[u64], buf: &mut [u8]) -> R<()> {
    for &o in offs {
        dev.read_at(buf, o)?;
    }
    Ok(())
}

/// Builds the chain in `pool` and opens the devices at the measured depths.
fn chain(pool: &Pool) -> R<Vec<Device>> {
    pool.create_device("d0", SIZE)?;
    {
        let d = pool.open_device("d0")?;
        fill_device(&d, SIZE, &pattern(MIB as usize, 1))?;
    }
    let mut r = rng(42);
    let blk = pattern(BLOCK as usize, 9);
    for k in 1..=DEPTH {
        pool.snapshot(&format!("d{}", k - 1), &format!("d{k}"), false)?;
        let d = pool.open_device(&format!("d{k}"))?;
        for _ in 0..WRITES_PER_LEVEL {
            d.write_at(&blk, r.random_range(0..SIZE / BLOCK) * BLOCK)?;
        }
    }
    pool.flush()?;
    Ok(MEASURED
        .iter()
        .map(|k| pool.open_device(&format!("d{k}")))
        .collect::<Result<_, _>>()?)
}

/// ns per read for each device, one value per round (devices in turns, rotating the order).
fn measure(devs: &[Device], offs: &[u64], rounds: usize) -> R<Vec<Vec<f64>>> {
    let mut buf = vec![0u8; BLOCK as usize];
    // Warm-up: every device read once through, and one timed-size pass each.
    let mut big = vec![0u8; MIB as usize];
    for d in devs {
        for off in (0..SIZE).step_by(MIB as usize) {
            d.read_at(&mut big, off)?;
        }
        read_all(d, offs, &mut buf)?;
    }
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); devs.len()];
    for rno in 0..rounds {
        for k in 0..devs.len() {
            let i = (k + rno) % devs.len();
            let t = Instant::now();
            read_all(&devs[i], offs, &mut buf)?;
            ns[i].push(t.elapsed().as_nanos() as f64 / offs.len() as f64);
        }
    }
    Ok(ns)
}

/// Rows for depths 1, 16 and 64 (`what` names the variant); the depth-64 ratio's median.
fn rows(sec: &mut Section, what: &str, ns: &[Vec<f64>]) -> f64 {
    let mut med64 = 0.0;
    for (i, depth) in MEASURED.iter().enumerate() {
        let label = format!("{what}random 4 KiB read, depth {depth}");
        if i == 0 {
            sec.row(label, &ns[0], "ns/op");
        } else {
            let q = ratios(&ns[i], &ns[0]);
            med64 = Summary::of(&q).median;
            sec.row_vs(label, &ns[i], "ns/op", &q, "depth 1");
        }
    }
    med64
}

pub fn run(cfg: &Config, dir: &Path, sec: &mut Section, targets: &mut Vec<Target>) -> R<()> {
    let chunk = 512 * 1024;
    progress!(
        "depth: 64 MiB base, then {DEPTH} levels of {WRITES_PER_LEVEL} scattered writes + snapshot"
    );
    let pool = create_pool(&dir.join("depth"), chunk, CowGranularity::Block, 512 * MIB)?;
    let devs = chain(&pool)?;
    progress!("depth: the same chain on a discarding data store");
    let engine_pool = discarding_pool(chunk, 512 * MIB)?;
    let engine_devs = chain(&engine_pool)?;
    let n = cfg.scale(100_000, 10_000);
    let offs = random_offsets(7, SIZE, n);
    // Cheap and noisy (a few percent is the signal): twice the usual rounds.
    let rounds = 2 * cfg.rounds;
    let ns = measure(&devs, &offs, rounds)?;
    let engine_ns = measure(&engine_devs, &offs, rounds)?;
    let med = rows(sec, "", &ns);
    targets.push(Target {
        what: "read at depth 64 / depth 1".into(),
        measured: format!("{med:.3}"),
        target: "≤ 1.10".into(),
        met: med <= 1.10,
    });
    rows(
        sec,
        "engine work only (discarding data store): ",
        &engine_ns,
    );
    let info = pool.info()?;
    sec.note(format!(
        "The device at depth k carries k x {WRITES_PER_LEVEL} scattered 4 KiB copy-on-write blocks from its chain, so at depth 64 nearly all of its 128 chunks are split entries, at depth 1 about {WRITES_PER_LEVEL}."
    ));
    sec.note(format!(
        "Pool: block granularity, 512 KiB chunks, {} devices; map entries compact {} / split {}. {n} reads per device per round, {rounds} rounds, the same offsets for every device; reads are page-cache hot (nothing dropped, every device read once through before timing).",
        info.devices, info.entries.0, info.entries.1
    ));
    sec.note("`engine work only (discarding data store)`: the same chain in a pool whose metadata is in memory and whose data store returns zeros at once. Reads of shared blocks still go through the block cache (a 4 KiB copy out of it), so these rows are the engine's own path: map lookup, read plan, cache lookup and copy, without the data file. Informational; the target is judged on the rows with the real data file.");
    sec.note("Where a deeper device's reads went (2026-11-30, `perf record` of this experiment, one device read at a time): with the chain built without any copy-on-write write (every device's map the same compact entries over the same blocks), the device at depth 64 still read 12-15% slower than the one at depth 1 and the one at depth 8 did not; 70 more devices created after the chain made it as fast. The cost was the pool's device table, a B-tree: finding the last id of 65 (a linear search to the end of the root and of the last leaf) cost some 50 ns a read. The table is a hash table since (one probe, whatever the id); with it, depth 64 / depth 1 went from 1.11-1.15 to 1.05-1.07 in trial runs.");
    sec.note("The engine-only rows move with memory layout more than with depth: in trial runs of one build its depth-64 ratio was 1.06-1.19 when the discarding pool was built after the real-data chain (as here) and 1.03-1.06 when built before it; the profile puts the difference in the block cache's hash table loads (the same keys at both depths), not in the map lookup (`Split::block` under 1% of samples).");
    Ok(())
}
