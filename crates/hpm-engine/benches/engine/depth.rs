//! Experiment 2: read cost against snapshot depth. A chain of 64 snapshots over a fully
//! written 64 MiB device, each level writing a few scattered blocks before the next snapshot;
//! the same random 4 KiB reads on the devices at depth 1, 16 and 64, in turns each round.

use crate::progress;
use crate::report::{ratios, Section, Summary, Target};
use crate::setup::{create_pool, fill_device, pattern, random_offsets, rng, Config, BLOCK, MIB, R};
use hpm_engine::{CowGranularity, Device};
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

pub fn run(cfg: &Config, dir: &Path, sec: &mut Section, targets: &mut Vec<Target>) -> R<()> {
    let chunk = 512 * 1024;
    let pool = create_pool(&dir.join("depth"), chunk, CowGranularity::Block, 512 * MIB)?;
    progress!(
        "depth: 64 MiB base, then {DEPTH} levels of {WRITES_PER_LEVEL} scattered writes + snapshot"
    );
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
    let devs: Vec<Device> = MEASURED
        .iter()
        .map(|k| pool.open_device(&format!("d{k}")))
        .collect::<Result<_, _>>()?;
    let n = cfg.scale(100_000, 10_000);
    let offs = random_offsets(7, SIZE, n);
    let mut buf = vec![0u8; BLOCK as usize];
    // Warm-up: every device read once through, and one timed-size pass each.
    let mut big = vec![0u8; MIB as usize];
    for d in &devs {
        for off in (0..SIZE).step_by(MIB as usize) {
            d.read_at(&mut big, off)?;
        }
        read_all(d, &offs, &mut buf)?;
    }
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); devs.len()];
    // Cheap and noisy (a few percent is the signal): twice the usual rounds.
    let rounds = 2 * cfg.rounds;
    for rno in 0..rounds {
        for k in 0..devs.len() {
            let i = (k + rno) % devs.len();
            let t = Instant::now();
            read_all(&devs[i], &offs, &mut buf)?;
            ns[i].push(t.elapsed().as_nanos() as f64 / n as f64);
        }
    }
    let info = pool.info()?;
    for (i, depth) in MEASURED.iter().enumerate() {
        let what = format!("random 4 KiB read, depth {depth}");
        if i == 0 {
            sec.row(what, &ns[0], "ns/op");
        } else {
            let q = ratios(&ns[i], &ns[0]);
            let med = Summary::of(&q).median;
            sec.row_vs(what, &ns[i], "ns/op", &q, "depth 1");
            if *depth == 64 {
                targets.push(Target {
                    what: "read at depth 64 / depth 1".into(),
                    measured: format!("{med:.3}"),
                    target: "≤ 1.10".into(),
                    met: med <= 1.10,
                });
            }
        }
    }
    sec.note(format!(
        "The device at depth k carries k x {WRITES_PER_LEVEL} scattered 4 KiB copy-on-write blocks from its chain, so at depth 64 nearly all of its 128 chunks are split entries, at depth 1 about {WRITES_PER_LEVEL}."
    ));
    sec.note(format!(
        "Pool: block granularity, 512 KiB chunks, {} devices; map entries compact {} / split {}. {n} reads per device per round, {rounds} rounds, the same offsets for every device; reads are page-cache hot (nothing dropped, every device read once through before timing).",
        info.devices, info.entries.0, info.entries.1
    ));
    Ok(())
}
