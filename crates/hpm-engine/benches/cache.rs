//! Cache benchmarks (run with `scripts/bench/cache`): the eviction policy against plain LRU
//! on a mixed trace, and the cached read path (4 KiB and 1 MiB reads) against memcpy of the
//! same bytes.
//!
//! Everything runs on memory backends through the public API, so the numbers are about the
//! cache and the read path, not a disk. Peers run interleaved, 5 rounds, medians reported.

use hpm_engine::{CacheConfig, CachePolicy, Pool, PoolOptions, PoolStorage};
use hpm_io::MemBackend;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use std::time::Instant;

const B: u64 = 4096;
const ROUNDS: usize = 5;

fn pool(cache: CacheConfig, capacity: u64) -> Pool {
    let s = PoolStorage {
        superblock: Box::new(MemBackend::new()),
        meta: [Box::new(MemBackend::new()), Box::new(MemBackend::new())],
        data: Box::new(MemBackend::new()),
    };
    let opts = PoolOptions {
        cache,
        ..PoolOptions::default()
    };
    Pool::create_on(s, &opts, capacity, String::new(), None).expect("pool")
}

fn fill(p: &Pool, name: &str, size: u64) {
    p.create_device(name, size).unwrap();
    let d = p.open_device(name).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut rng = SmallRng::seed_from_u64(size);
    for off in (0..size).step_by(buf.len()) {
        rng.fill(&mut buf[..]);
        d.write_at(&buf, off).unwrap();
    }
}

struct Mixed {
    hot_hit: f64,
    all_hit: f64,
    ops_per_s: f64,
}

/// A hot set (64 MiB image shared by 8 clones, read at random) mixed 1:4 with a 1 GiB scan
/// of another device, through a 128 MiB cache.
fn mixed(policy: CachePolicy) -> Mixed {
    let cache = CacheConfig {
        size: 128 << 20,
        policy,
        ..CacheConfig::default()
    };
    let p = pool(cache, 2 << 30);
    let hot = 64u64 << 20;
    fill(&p, "image", hot);
    for k in 0..8 {
        p.snapshot("image", &format!("c{k}"), false).unwrap();
    }
    fill(&p, "scan", 1 << 30);
    // The cache holds shared blocks: scan a snapshot, so the scan competes for the cache.
    p.snapshot("scan", "scan-clone", false).unwrap();
    let clones: Vec<_> = (0..8)
        .map(|k| p.open_device(&format!("c{k}")).unwrap())
        .collect();
    let scan = p.open_device("scan-clone").unwrap();
    let mut rng = SmallRng::seed_from_u64(1);
    let mut buf = vec![0u8; B as usize];
    // Warm the hot set once.
    for b in 0..hot / B {
        clones[0].read_at(&mut buf, b * B).unwrap();
    }
    let (mut hot_hits, mut hot_total) = (0u64, 0u64);
    let start_stats = p.cache_stats();
    let t = Instant::now();
    let mut ops = 0u64;
    let mut scan_pos = 0u64;
    for i in 0..400_000u64 {
        if i % 5 == 0 {
            let before = p.cache_stats().hits;
            let d = &clones[rng.random_range(0..8)];
            d.read_at(&mut buf, rng.random_range(0..hot / B) * B)
                .unwrap();
            hot_hits += p.cache_stats().hits - before;
            hot_total += 1;
        } else {
            scan.read_at(&mut buf, scan_pos * B).unwrap();
            scan_pos = (scan_pos + 1) % ((1 << 30) / B);
        }
        ops += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    let s = p.cache_stats();
    let hits = s.hits - start_stats.hits;
    let misses = s.misses - start_stats.misses;
    Mixed {
        hot_hit: hot_hits as f64 / hot_total as f64,
        all_hit: hits as f64 / (hits + misses) as f64,
        ops_per_s: ops as f64 / secs,
    }
}

/// Reads of `bs` bytes (4 KiB or 1 MiB, aligned to their size) of cached blocks at random
/// over 64 MiB, per second; and memcpy of `bs` bytes from a 64 MiB buffer at the same offsets.
/// `n` reads each.
fn cached_reads(bs: u64, n: u64) -> (f64, f64) {
    let p = pool(CacheConfig::default(), 1 << 30);
    let size = 64u64 << 20;
    fill(&p, "d", size);
    // A snapshot shares every block with its origin: its reads go through the cache.
    p.snapshot("d", "d-clone", false).unwrap();
    let d = p.open_device("d-clone").unwrap();
    let mut buf = vec![0u8; bs as usize];
    for off in (0..size).step_by(bs as usize) {
        d.read_at(&mut buf, off).unwrap();
    }
    let offs: Vec<u64> = {
        let mut rng = SmallRng::seed_from_u64(2);
        (0..n)
            .map(|_| rng.random_range(0..size / bs) * bs)
            .collect()
    };
    let t = Instant::now();
    for &o in &offs {
        d.read_at(&mut buf, o).unwrap();
        black_box(&buf);
    }
    let ours = n as f64 / t.elapsed().as_secs_f64();
    let src = vec![7u8; size as usize];
    let t = Instant::now();
    for &o in &offs {
        buf.copy_from_slice(&src[o as usize..(o + bs) as usize]);
        black_box(&buf);
    }
    let limit = n as f64 / t.elapsed().as_secs_f64();
    (ours, limit)
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` style probes: nothing to list.
    }
    let mut s3 = Vec::new();
    let mut lru = Vec::new();
    let mut ours = Vec::new();
    let mut limit = Vec::new();
    let mut ours_1m = Vec::new();
    let mut limit_1m = Vec::new();
    for _ in 0..ROUNDS {
        s3.push(mixed(CachePolicy::S3Fifo));
        lru.push(mixed(CachePolicy::Lru));
        let (o, l) = cached_reads(B, 1_000_000);
        ours.push(o);
        limit.push(l);
        let (o, l) = cached_reads(1 << 20, 4_000);
        ours_1m.push(o);
        limit_1m.push(l);
    }
    println!("## Eviction policy on a mixed trace\n");
    println!("64 MiB hot set shared by 8 clones (20% of reads, uniform) mixed with a sequential 1 GiB scan of a snapshot of another device (80%; its blocks are shared, so they go through the cache), 128 MiB cache, 400,000 4 KiB reads per round, {ROUNDS} interleaved rounds; medians (min-max).\n");
    println!("| policy | hot-set hit ratio | overall hit ratio | reads/s |");
    println!("|---|---|---|---|");
    for (name, v) in [("S3-FIFO, sharing-aware (ours)", &s3), ("LRU", &lru)] {
        let h = median(v.iter().map(|m| m.hot_hit).collect());
        let a = median(v.iter().map(|m| m.all_hit).collect());
        let o = median(v.iter().map(|m| m.ops_per_s).collect());
        println!(
            "| {name} | {:.1}% ({:.1}-{:.1}) | {:.1}% | {:.0} ({:.0}-{:.0}) |",
            h.0 * 100.0,
            h.1 * 100.0,
            h.2 * 100.0,
            a.0 * 100.0,
            o.0,
            o.1,
            o.2
        );
    }
    println!("\n## Cached read path\n");
    println!("Random reads of cached blocks over 64 MiB through `Device::read_at` (a snapshot's: every block is shared, so every read goes through the cache), against memcpy of as many bytes from a 64 MiB buffer at the same offsets (the limit); one thread. 4 KiB: 1,000,000 reads at 4 KiB-aligned offsets; 1 MiB: 4,000 reads at 1 MiB-aligned offsets (256 blocks each, the largest FUSE request).\n");
    println!("| path | reads/s (median, min-max) | GiB/s | vs memcpy |");
    println!("|---|---|---|---|");
    for (what, bs, ours, limit) in [
        ("4 KiB", B, ours, limit),
        ("1 MiB", 1 << 20, ours_1m, limit_1m),
    ] {
        let o = median(ours);
        let l = median(limit);
        let gib = |ops: f64| ops * bs as f64 / (1u64 << 30) as f64;
        println!(
            "| hpmapper cached read, {what} | {:.0} ({:.0}-{:.0}) | {:.2} | {:.1}% |",
            o.0,
            o.1,
            o.2,
            gib(o.0),
            o.0 / l.0 * 100.0
        );
        println!(
            "| memcpy, {what} | {:.0} ({:.0}-{:.0}) | {:.2} | 100% |",
            l.0,
            l.1,
            l.2,
            gib(l.0)
        );
    }
}
