//! Experiment 5: `Pool::open` time of a pool with 100 devices and 10 GiB mapped (scaled down
//! to the free space), after a clean close (load the checkpoint) and after a crash (load an
//! empty checkpoint and replay the whole journal), 5+ times each, in turns.
//!
//! Each open runs in a child process (this binary again, `--child-open`): a crash must leave
//! the pool without a close, and only process exit releases the pool's lock. The pool is
//! built once, by a child that flushes and exits without closing (the crashed pool). The
//! clean pool is a copy of its metadata files beside a hard link to the same data file, opened
//! and closed once; opening never writes the data file, so sharing it is safe.

use crate::progress;
use crate::report::{ratios, Section};
use crate::setup::{
    create_pool, fill_device, free_bytes, pattern, size_text, Config, GIB, KIB, MIB, R,
};
use hpm_engine::{CowGranularity, Pool};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

const DEVICES: u64 = 100;
const CHUNK: u64 = 512 * KIB;
/// Free space left to everything else.
const MARGIN: u64 = 2 * GIB;

/// Runs this binary with `args`; returns its `key value` stdout lines.
fn child(args: &[&str]) -> R<HashMap<String, String>> {
    let out = Command::new(std::env::current_exe()?)
        .args(args)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(format!("child {args:?} failed: {}", out.status).into());
    }
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn get(m: &HashMap<String, String>, k: &str) -> R<f64> {
    Ok(m.get(k)
        .ok_or_else(|| format!("child did not report {k}"))?
        .parse()?)
}

/// Child: builds the pool in `dir`, flushes, and exits without closing (a crash).
pub fn child_build(dir: &Path, per_dev: u64) -> R<()> {
    let pool = create_pool(
        dir,
        CHUNK,
        CowGranularity::Block,
        DEVICES * per_dev + 64 * MIB,
    )?;
    for i in 0..DEVICES {
        pool.create_device(&format!("dev{i:03}"), per_dev)?;
    }
    let buf = pattern(MIB as usize, 1);
    let t = Instant::now();
    for i in 0..DEVICES {
        let d = pool.open_device(&format!("dev{i:03}"))?;
        fill_device(&d, per_dev, &buf)?;
    }
    let write_s = t.elapsed().as_secs_f64();
    pool.flush()?;
    let flush_s = t.elapsed().as_secs_f64() - write_s;
    let info = pool.info()?;
    println!("write_secs {write_s}");
    println!("flush_secs {flush_s}");
    println!("compact {}", info.entries.0);
    println!("split {}", info.entries.1);
    // IMPORTANT: no close, no drop: the checkpoint stays the empty one written at create and
    // the journal holds every change; exiting releases the lock as a crash would.
    std::mem::forget(pool);
    Ok(())
}

/// Child: times `Pool::open(dir)`, then closes cleanly (`close`) or not at all (`crash`).
pub fn child_open(dir: &Path, mode: &str) -> R<()> {
    let t = Instant::now();
    let pool = Pool::open(dir)?;
    let ns = t.elapsed().as_nanos();
    let devs = pool.list_devices();
    println!("open_ns {ns}");
    println!("devices {}", devs.len());
    println!(
        "mapped {}",
        devs.iter().map(|d| d.mapped_bytes).sum::<u64>()
    );
    match mode {
        "close" => pool.close()?,
        "crash" => std::mem::forget(pool),
        m => return Err(format!("unknown child open mode {m:?}").into()),
    }
    Ok(())
}

fn meta_sizes(dir: &Path) -> R<(u64, u64)> {
    Ok((
        std::fs::metadata(dir.join("meta.0"))?.len(),
        std::fs::metadata(dir.join("meta.1"))?.len(),
    ))
}

pub fn run(cfg: &Config, dir: &Path, sec: &mut Section) -> R<()> {
    let free = free_bytes(dir)?;
    let fits = free.saturating_sub(MARGIN);
    let want = cfg.recovery_bytes.min(fits);
    let per_dev = want / DEVICES / MIB * MIB;
    if per_dev == 0 {
        return Err(format!(
            "only {} free in {}: too little for the recovery experiment",
            size_text(free),
            dir.display()
        )
        .into());
    }
    let total = per_dev * DEVICES;
    let crash = dir.join("recovery-crash");
    let clean = dir.join("recovery-clean");
    progress!(
        "recovery: building {DEVICES} devices x {} = {} (free: {})",
        size_text(per_dev),
        size_text(total),
        size_text(free)
    );
    let crash_s = crash.to_str().ok_or("bench dir is not UTF-8")?;
    let clean_s = clean.to_str().ok_or("bench dir is not UTF-8")?;
    let built = child(&["--child-build", crash_s, &per_dev.to_string()])?;
    std::fs::create_dir(&clean)?;
    for f in ["superblock", "meta.0", "meta.1"] {
        std::fs::copy(crash.join(f), clean.join(f))?;
    }
    std::fs::hard_link(crash.join("data"), clean.join("data"))?;
    // Recover the copy once and close it: from now on it opens from its checkpoint alone.
    child(&["--child-open", clean_s, "close"])?;
    // Untimed warm-up of the crashed pool's metadata in the page cache.
    child(&["--child-open", crash_s, "crash"])?;

    let rounds = cfg.rounds.max(5);
    progress!("recovery: {rounds} rounds of open (clean, crashed)");
    let (mut clean_ms, mut crash_ms) = (Vec::new(), Vec::new());
    for rno in 0..rounds {
        let open = |d: &str, mode: &str| -> R<f64> {
            let m = child(&["--child-open", d, mode])?;
            if get(&m, "devices")? as u64 != DEVICES || get(&m, "mapped")? as u64 != total {
                return Err(format!(
                    "{d} opened with {m:?}, expected {DEVICES} devices and {total} bytes mapped"
                )
                .into());
            }
            Ok(get(&m, "open_ns")? / 1e6)
        };
        if rno % 2 == 0 {
            clean_ms.push(open(clean_s, "close")?);
            crash_ms.push(open(crash_s, "crash")?);
        } else {
            crash_ms.push(open(crash_s, "crash")?);
            clean_ms.push(open(clean_s, "close")?);
        }
    }
    sec.row(
        "Pool::open after a clean close (checkpoint only)",
        &clean_ms,
        "ms",
    );
    sec.row_vs(
        "Pool::open after a crash (journal replay)",
        &crash_ms,
        "ms",
        &ratios(&crash_ms, &clean_ms),
        "clean open",
    );
    let write_s = get(&built, "write_secs")?;
    let flush_s = get(&built, "flush_secs")?;
    sec.row(
        "build: sequential 1 MiB writes through the engine (one run)",
        &[total as f64 / MIB as f64 / write_s],
        "MiB/s",
    );
    sec.row("build: the flush after it (one run)", &[flush_s], "s");
    let (c0, c1) = meta_sizes(&clean)?;
    let (j0, j1) = meta_sizes(&crash)?;
    let scaled = if want < cfg.recovery_bytes {
        format!(
            " (scaled down from {}: {} free)",
            size_text(cfg.recovery_bytes),
            size_text(free)
        )
    } else {
        String::new()
    };
    sec.note(format!(
        "{DEVICES} devices x {} = {} mapped{scaled}, 512 KiB chunks: {} compact / {} split entries, written with 1 MiB sequential writes of a zero-free pattern into a sparse data file.",
        size_text(per_dev),
        size_text(total),
        get(&built, "compact")?,
        get(&built, "split")?
    ));
    sec.note(format!(
        "Metadata files: clean pool meta.0/meta.1 = {c0}/{c1} B (after repeated clean closes each holds the same checkpoint); crashed pool {j0}/{j1} B (an empty checkpoint followed by the whole journal)."
    ));
    sec.note("Each open runs in a fresh child process (timed: the Pool::open call only); metadata files are page-cache hot. A clean open is followed by close (a checkpoint, untimed); a crashed open exits without closing, so every round replays the same journal.");
    Ok(())
}
