//! Experiment 1: the cost of copy-on-write. A 4 KiB aligned write into a block of a snapshot
//! that still shares it with its origin (the first write: a copy-on-write) against a write
//! into a block the snapshot already owns (an overwrite), with hpmapper's block granularity
//! and the devicemapper-like chunk granularity, at 64 KiB and 512 KiB chunks.
//!
//! Each round snapshots the 64 MiB base afresh and picks distinct chunks at random, so every
//! first write lands in a chunk the snapshot has not touched: in chunk granularity each one
//! copies a whole chunk. First writes and overwrites alternate op by op; the overwrite hits
//! the block the previous iteration's first write made the snapshot own. The four pools take
//! turns inside every round with a fifth peer, the filesystem's own cost of the same pattern:
//! a 4 KiB pwrite into a hole of a sparse raw file (a first write there allocates, as a
//! copy-on-write's new block does) against a pwrite over the block just written.
//!
//! Two more pools of the block 512K geometry separate the engine's work from the host's: one
//! on a data file written with zeros first (preallocated), and one on a data store that
//! drops writes and reads zeros (`Discard`: the engine's own work only, no data I/O). Two
//! more open their data store with direct I/O (`IoMode::Direct`, as the daemon's
//! `--data-io direct`), on a sparse and on a preallocated data file, beside a raw-file peer
//! that writes with O_DIRECT too: without the host page cache, a first write and an
//! overwrite both cost a disk write.

use crate::progress;
use crate::report::{ratios, Section, Summary, Target};
use crate::setup::{
    create_pool, discarding_pool, fill_device, label, pattern, rng, Config, BLOCK, KIB, MIB, R,
};
use hpm_engine::{CacheConfig, CowGranularity, EngineStats, IoMode, Pool};
use rand::Rng;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

const BASE: u64 = 64 * MIB;

/// Spacing of the raw peer's first writes: each lands in its own untouched region.
const RAW_STRIDE: u64 = 512 * KIB;

/// Who is measured: a pool, or a raw-file peer with the next untouched region.
enum Subject {
    Pool(Pool),
    Raw(File, u64),
}

/// A 4096-aligned copy of `data` (for O_DIRECT writes), kept in `store`.
fn aligned_copy<'a>(store: &'a mut Vec<u8>, data: &[u8]) -> &'a [u8] {
    store.resize(data.len() + 4096, 0);
    let a = store.as_ptr().align_offset(4096);
    store[a..a + data.len()].copy_from_slice(data);
    &store[a..a + data.len()]
}

/// One pool's measurements for one variant, one value per round.
#[derive(Default)]
struct Series {
    first_us: Vec<f64>,
    over_us: Vec<f64>,
    first_copied: Vec<f64>,
    first_written: Vec<f64>,
    first_read: Vec<f64>,
    over_written: Vec<f64>,
}

struct RoundResult {
    first_us: f64,
    over_us: f64,
    first: EngineStats,
    over: EngineStats,
}

fn delta(a: &EngineStats, b: &EngineStats, acc: &mut EngineStats) {
    acc.cow_copied_bytes += b.cow_copied_bytes - a.cow_copied_bytes;
    acc.backend_write_bytes += b.backend_write_bytes - a.backend_write_bytes;
    acc.backend_read_bytes += b.backend_read_bytes - a.backend_read_bytes;
}

/// Creates the 64 MiB device `base` in `pool`, written through with `fill`, and flushes.
fn add_base(pool: &Pool, fill: &[u8]) -> R<()> {
    pool.create_device("base", BASE)?;
    fill_device(&pool.open_device("base")?, BASE, fill)?;
    pool.flush()?;
    Ok(())
}

/// A block-512K pool in `pdir` on the data file `pdir/data`, written with zeros first if
/// `prealloc`, opened (after creation, as the daemon opens it) with data I/O `io`, holding
/// the base device.
fn file_pool(pdir: &Path, prealloc: bool, io: IoMode, fill: &[u8]) -> R<Pool> {
    std::fs::create_dir_all(pdir)?;
    let data = pdir.join("data");
    let f = File::create(&data)?;
    if prealloc {
        let zeros = vec![0u8; MIB as usize];
        for i in 0..512 {
            f.write_all_at(&zeros, i * MIB)?;
        }
    }
    f.sync_all()?;
    let opts = hpm_engine::PoolOptions {
        chunk_size: 512 * KIB,
        capacity: Some(512 * MIB),
        data: Some(data),
        ..hpm_engine::PoolOptions::default()
    };
    Pool::create(&pdir.join("pool"), &opts)?.close()?;
    let p = Pool::open_with_io(&pdir.join("pool"), CacheConfig::default(), io)?;
    add_base(&p, fill)?;
    Ok(p)
}

/// One round on one pool: snapshot, `m` first writes alternating with `m` overwrites,
/// remove the snapshot.
fn round(pool: &Pool, name: &str, m: usize, flush: bool, seed: u64) -> R<RoundResult> {
    pool.snapshot("base", name, false)?;
    let dev = pool.open_device(name)?;
    let chunk_blocks = pool.chunk_size() / BLOCK;
    let chunks = (BASE / pool.chunk_size()) as usize;
    let mut r = rng(seed);
    let offs: Vec<u64> = rand::seq::index::sample(&mut r, chunks, m + 1)
        .into_iter()
        .map(|c| (c as u64 * chunk_blocks + r.random_range(0..chunk_blocks)) * BLOCK)
        .collect();
    let buf = pattern(BLOCK as usize, 7);
    let write = |off: u64| -> R<()> {
        dev.write_at(&buf, off)?;
        if flush {
            dev.flush()?;
        }
        Ok(())
    };
    // Untimed: gives the first overwrite a block the snapshot owns.
    write(offs[0])?;
    let (mut first_ns, mut over_ns) = (0u128, 0u128);
    let (mut first, mut over) = (EngineStats::default(), EngineStats::default());
    for i in 1..=m {
        let s0 = pool.stats();
        let t = Instant::now();
        write(offs[i])?;
        first_ns += t.elapsed().as_nanos();
        let s1 = pool.stats();
        let t = Instant::now();
        write(offs[i - 1])?;
        over_ns += t.elapsed().as_nanos();
        let s2 = pool.stats();
        delta(&s0, &s1, &mut first);
        delta(&s1, &s2, &mut over);
    }
    drop(dev);
    pool.remove_device(name)?;
    let per_op_us = |ns: u128| ns as f64 / m as f64 / 1e3;
    Ok(RoundResult {
        first_us: per_op_us(first_ns),
        over_us: per_op_us(over_ns),
        first,
        over,
    })
}

/// One round on the raw file: `m` pwrites into holes alternating with `m` overwrites.
fn raw_round(file: &File, next: &mut u64, m: usize, flush: bool, seed: u64) -> R<RoundResult> {
    let mut r = rng(seed);
    let offs: Vec<u64> = (0..=m as u64)
        .map(|i| (*next + i) * RAW_STRIDE + r.random_range(0..RAW_STRIDE / BLOCK) * BLOCK)
        .collect();
    *next += m as u64 + 1;
    let mut store = Vec::new();
    let buf = aligned_copy(&mut store, &pattern(BLOCK as usize, 7));
    let write = |off: u64| -> R<()> {
        file.write_all_at(buf, off)?;
        if flush {
            file.sync_data()?;
        }
        Ok(())
    };
    write(offs[0])?;
    let (mut first_ns, mut over_ns) = (0u128, 0u128);
    for i in 1..=m {
        let t = Instant::now();
        write(offs[i])?;
        first_ns += t.elapsed().as_nanos();
        let t = Instant::now();
        write(offs[i - 1])?;
        over_ns += t.elapsed().as_nanos();
    }
    let per_op_us = |ns: u128| ns as f64 / m as f64 / 1e3;
    Ok(RoundResult {
        first_us: per_op_us(first_ns),
        over_us: per_op_us(over_ns),
        first: EngineStats::default(),
        over: EngineStats::default(),
    })
}

pub fn run(cfg: &Config, dir: &Path, sec: &mut Section, targets: &mut Vec<Target>) -> R<()> {
    let geos = [
        (CowGranularity::Block, 64 * KIB),
        (CowGranularity::Block, 512 * KIB),
        (CowGranularity::Chunk, 64 * KIB),
        (CowGranularity::Chunk, 512 * KIB),
    ];
    let fill = pattern(MIB as usize, 1);
    let mut subjects = Vec::new();
    let mut labels = Vec::new();
    for &(cow, chunk) in &geos {
        let l = label(cow, chunk);
        progress!("cow: building pool {l}: 64 MiB base, fully written");
        let p = create_pool(&dir.join(l.replace(' ', "-")), chunk, cow, 512 * MIB)?;
        add_base(&p, &fill)?;
        subjects.push(Subject::Pool(p));
        labels.push(l);
    }
    // The same pool geometry on a data store that is fully allocated, as a raw block device
    // (or a preallocated file) is: a first write then costs the engine's own work only.
    let l = "block 512K, preallocated data store".to_string();
    progress!("cow: building pool {l}: 512 MiB data file written with zeros first");
    subjects.push(Subject::Pool(file_pool(
        &dir.join("block-512K-prealloc"),
        true,
        IoMode::Buffered,
        &fill,
    )?));
    labels.push(l);
    let prealloc_i = subjects.len() - 1;
    // The block 512K geometry with its data store opened for direct I/O, on a sparse and on
    // a preallocated file.
    let mut direct_is = Vec::new();
    for prealloc in [false, true] {
        let l = format!(
            "block 512K, direct data I/O{}",
            if prealloc {
                ", preallocated data store"
            } else {
                ""
            }
        );
        progress!("cow: building pool {l}");
        let pdir = dir.join(format!("block-512K-direct-{prealloc}"));
        subjects.push(Subject::Pool(file_pool(
            &pdir,
            prealloc,
            IoMode::Direct,
            &fill,
        )?));
        labels.push(l);
        direct_is.push(subjects.len() - 1);
    }
    {
        let l = "block 512K, discarding data store (engine work only)".to_string();
        progress!("cow: building pool {l}: metadata in memory, data dropped");
        let p = discarding_pool(512 * KIB, 512 * MIB)?;
        add_base(&p, &fill)?;
        subjects.push(Subject::Pool(p));
        labels.push(l);
    }
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join("raw"))?;
    raw.set_len(8 << 30)?;
    raw.sync_all()?;
    subjects.push(Subject::Raw(raw, 0));
    labels.push("raw file (the filesystem alone)".into());
    let raw_i = subjects.len() - 1;
    let raw_direct = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(dir.join("raw-direct"))?
    };
    raw_direct.set_len(8 << 30)?;
    raw_direct.sync_all()?;
    subjects.push(Subject::Raw(raw_direct, 0));
    labels.push("raw file, O_DIRECT (the filesystem alone)".into());
    let raw_direct_i = subjects.len() - 1;
    let pos = |cow: CowGranularity, chunk: u64| {
        geos.iter()
            .position(|&g| g == (cow, chunk))
            .expect("geometry measured")
    };

    let variants = [
        ("no flush", false, cfg.scale(96, 16)),
        ("flush after each write", true, cfg.scale(24, 6)),
    ];
    let mut results: Vec<Vec<Series>> = Vec::new();
    for (vname, flush, m) in variants {
        progress!("cow: {vname}, {m} first writes + {m} overwrites per round and subject");
        let mut per: Vec<Series> = subjects.iter().map(|_| Series::default()).collect();
        for rno in 0..cfg.rounds {
            // Rotate who goes first, so none always runs right after the fills.
            for k in 0..subjects.len() {
                let i = (k + rno) % subjects.len();
                let seed = 1000 * rno as u64 + i as u64;
                let res = match &mut subjects[i] {
                    Subject::Pool(p) => {
                        let name = format!("snap-{}-{rno}", u8::from(flush));
                        round(p, &name, m, flush, seed)?
                    }
                    Subject::Raw(f, next) => raw_round(f, next, m, flush, seed)?,
                };
                let s = &mut per[i];
                s.first_us.push(res.first_us);
                s.over_us.push(res.over_us);
                let per_op = |x: u64| x as f64 / m as f64;
                s.first_copied.push(per_op(res.first.cow_copied_bytes));
                s.first_written.push(per_op(res.first.backend_write_bytes));
                s.first_read.push(per_op(res.first.backend_read_bytes));
                s.over_written.push(per_op(res.over.backend_write_bytes));
            }
        }
        for (i, (l, s)) in labels.iter().zip(&per).enumerate() {
            let r = ratios(&s.first_us, &s.over_us);
            let first = if i == raw_i || i == raw_direct_i {
                "first write (into a hole)"
            } else {
                "first write (CoW)"
            };
            sec.row_vs(
                format!("{l}, {vname}: {first}"),
                &s.first_us,
                "µs/op",
                &r,
                "overwrite",
            );
            sec.row(format!("{l}, {vname}: overwrite"), &s.over_us, "µs/op");
            if (i < geos.len() && geos[i].0 == CowGranularity::Block)
                || i == prealloc_i
                || direct_is.contains(&i)
            {
                let med = Summary::of(&r).median;
                targets.push(Target {
                    what: format!("CoW first write / overwrite, {l}, {vname}"),
                    measured: format!("{med:.2}"),
                    target: "≤ 1.5".into(),
                    met: med <= 1.5,
                });
            }
        }
        // hpmapper against the devicemapper-like baseline and against the filesystem's own
        // first-write cost, from the same rounds.
        for chunk in [64 * KIB, 512 * KIB] {
            let (b, c) = (
                &per[pos(CowGranularity::Block, chunk)],
                &per[pos(CowGranularity::Chunk, chunk)],
            );
            let k = chunk / KIB;
            sec.row_vs(
                format!("block {k}K vs chunk {k}K (devicemapper-like), {vname}: first write"),
                &b.first_us,
                "µs/op",
                &ratios(&b.first_us, &c.first_us),
                format!("chunk {k}K first write"),
            );
            sec.row_vs(
                format!("block {k}K vs raw file, {vname}: first write"),
                &b.first_us,
                "µs/op",
                &ratios(&b.first_us, &per[raw_i].first_us),
                "raw first write into a hole",
            );
        }
        sec.row_vs(
            format!("block 512K direct data I/O vs raw file O_DIRECT, {vname}: first write"),
            &per[direct_is[0]].first_us,
            "µs/op",
            &ratios(&per[direct_is[0]].first_us, &per[raw_direct_i].first_us),
            "raw O_DIRECT first write into a hole",
        );
        results.push(per);
    }
    // Bytes per op do not depend on flushing: report them once, from the no-flush variant.
    for (l, s) in labels.iter().zip(&results[0]).take(geos.len()) {
        sec.row(
            format!("{l}: bytes copied per first write (cow_copied_bytes)"),
            &s.first_copied,
            "B/op",
        );
        sec.row(
            format!("{l}: backend bytes written per first write (backend_write_bytes)"),
            &s.first_written,
            "B/op",
        );
        sec.row(
            format!("{l}: backend bytes read per first write (backend_read_bytes)"),
            &s.first_read,
            "B/op",
        );
        sec.row(
            format!("{l}: backend bytes written per overwrite"),
            &s.over_written,
            "B/op",
        );
    }
    sec.note(format!(
        "Base device 64 MiB fully written and flushed; a fresh snapshot per round; {} (no flush) or {} (flush) first writes per round, each in a distinct untouched chunk, alternating with as many overwrites; no-flush ops are page-cache writes.",
        cfg.scale(96, 16),
        cfg.scale(24, 6)
    ));
    sec.note("`flush after each write` calls Device::flush after every write: data fdatasync, then (only if records are pending, i.e. after a first write) a journal append + fsync of the metadata file; an overwrite of an owned block has no metadata to commit. The raw peer calls fdatasync after each pwrite.");
    sec.note("The raw-file peer is a sparse 8 GiB file in the same directory: a first write into a hole makes the filesystem allocate (a new page-cache page, a delayed-allocation reservation), as the new block of a copy-on-write does in the pool's sparse data file.");
    sec.note("`preallocated data store`: the data file is written with zeros in 1 MiB pwrites and synced before the pool is created, so a first write lands in a block that is allocated and cached, but clean, cold and inside a large page-cache folio made by those 1 MiB writes (a 4 KiB buffered write walks every buffer head of its folio). Freed blocks are still punched (each round removes its snapshot), so the store does not stay fully allocated either. It is not a measure of the engine's work alone; `discarding data store` is.");
    sec.note("`direct data I/O`: the pool's data store opened with O_DIRECT (`Pool::open_with_io`, the daemon's `--data-io direct`): every data write is a disk write, as dm-thin's bios to its data device are, and a first write differs from an overwrite only by the engine's work and the filesystem's block allocation for the new block (none on the preallocated store while its blocks stay allocated; each round's snapshot removal punches its blocks again). The `raw file, O_DIRECT` peer shows the filesystem's own cost of the same pattern with direct I/O.");
    sec.note("`discarding data store (engine work only)`: the same geometry with metadata in memory and a data store that drops writes (and reads zeros): the time is the engine's own work (plan, allocation, map update, records), with no data I/O and no fsync cost; informational, not a target.");
    let chunk_512 = &results[0][pos(CowGranularity::Chunk, 512 * KIB)];
    if Summary::of(&chunk_512.first_read).median == 0.0
        && Summary::of(&chunk_512.first_copied).median > 0.0
    {
        sec.note("Chunk-granularity copies read every copied block from the backend (or the block cache), yet backend_read_bytes stays 0 for them: the engine does not count those reads.");
    }
    Ok(())
}
