//! `hpmapper bench shared-read`: N clones of one image read it at once; how many bytes the
//! pool's data store served and how much the cache held, against what per-device caching
//! would need. The in-process counterpart of the paper's redundant-I/O experiment.

use super::parse_size;
use crate::size::human;
use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use hpm_engine::{CacheConfig, CacheMode, Pool};
use rand::{RngCore, SeedableRng};
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Import SIZE of random data as an image, make N writable snapshots, read each fully
    /// and concurrently, and report backend bytes and cache use.
    SharedRead(SharedReadArgs),
}

#[derive(Debug, Args)]
pub struct SharedReadArgs {
    /// Number of snapshots (clones) that read the image.
    #[arg(long, value_name = "N")]
    clones: usize,
    /// Bytes of image data.
    #[arg(long, value_name = "SIZE")]
    size: String,
    /// Cache mode: `shared` (hpmapper), `per-device` (the devicemapper-like baseline) or
    /// `off`.
    #[arg(long, value_enum, default_value_t = Mode::Shared)]
    cache_mode: Mode,
    /// Cache size [default: 512M].
    #[arg(long, value_name = "SIZE")]
    cache_size: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `--cache-mode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// One cache keyed by physical block for the whole pool.
    Shared,
    /// A cache per device and no interception (benchmark baseline only).
    PerDevice,
    /// No cache.
    Off,
}

impl From<Mode> for CacheMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Shared => CacheMode::Shared,
            Mode::PerDevice => CacheMode::PerDevice,
            Mode::Off => CacheMode::Off,
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    clones: usize,
    size: u64,
    cache_mode: String,
    cache_size: u64,
    logical_bytes_read: u64,
    backend_bytes_read: u64,
    cache_bytes_peak: u64,
    per_device_bytes_peak: u64,
    hits: u64,
    misses: u64,
    coalesced: u64,
    elapsed_seconds: f64,
}

pub fn run(dir: &Path, cmd: BenchCommand, out: &mut impl Write) -> Result<()> {
    let BenchCommand::SharedRead(args) = cmd;
    let size = parse_size("--size", &args.size)?.next_multiple_of(4096);
    anyhow::ensure!(
        size > 0 && args.clones > 0,
        "--size and --clones must be positive"
    );
    let mut cache = CacheConfig {
        mode: args.cache_mode.into(),
        ..CacheConfig::default()
    };
    if let Some(s) = &args.cache_size {
        cache.size = parse_size("--cache-size", s)?;
    }
    super::require_dir(dir)?;
    let pool =
        Pool::open_with(dir, cache).with_context(|| format!("opening pool {}", dir.display()))?;
    let image = format!("bench-image-{}", std::process::id());
    let names: Vec<String> = (0..args.clones)
        .map(|k| format!("{image}-clone-{k}"))
        .collect();
    let result = measure(&pool, &image, &names, size, &args);
    for n in names.iter().chain(std::iter::once(&image)) {
        let _ = pool.remove_device(n);
    }
    pool.close().context("closing the pool")?;
    let r = result?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &r)?;
        writeln!(out)?;
    } else {
        writeln!(out, "clones:               {}", r.clones)?;
        writeln!(out, "image size:           {}", human(r.size))?;
        writeln!(
            out,
            "cache:                {} ({})",
            r.cache_mode,
            human(r.cache_size)
        )?;
        writeln!(out, "logical bytes read:   {}", human(r.logical_bytes_read))?;
        writeln!(
            out,
            "backend bytes read:   {} ({:.2}x the image)",
            human(r.backend_bytes_read),
            r.backend_bytes_read as f64 / r.size as f64
        )?;
        writeln!(out, "cache bytes (peak):   {}", human(r.cache_bytes_peak))?;
        writeln!(
            out,
            "per-device would hold {}",
            human(r.per_device_bytes_peak)
        )?;
        writeln!(
            out,
            "hits / misses / intercepted: {} / {} / {}",
            r.hits, r.misses, r.coalesced
        )?;
        writeln!(out, "elapsed:              {:.3} s", r.elapsed_seconds)?;
    }
    Ok(())
}

fn measure(
    pool: &Pool,
    image: &str,
    names: &[String],
    size: u64,
    args: &SharedReadArgs,
) -> Result<Report> {
    pool.create_device(image, size)?;
    {
        let dev = pool.open_device(image)?;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(size);
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            rng.fill_bytes(&mut buf[..n]);
            dev.write_at(&buf[..n], off)?;
            off += n as u64;
        }
        dev.flush()?;
    }
    for n in names {
        pool.snapshot(image, n, false)?;
    }
    let before = pool.cache_stats();
    let engine_before = pool.stats();
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = names
            .iter()
            .map(|n| {
                s.spawn(move || -> Result<()> {
                    let dev = pool.open_device(n)?;
                    let mut buf = vec![0u8; 1 << 20];
                    let mut off = 0;
                    while off < size {
                        let k = (size - off).min(buf.len() as u64) as usize;
                        dev.read_at(&mut buf[..k], off)?;
                        off += k as u64;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("a reader thread panicked"))??;
        }
        Ok(())
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    let after = pool.cache_stats();
    let engine_after = pool.stats();
    Ok(Report {
        clones: names.len(),
        size,
        cache_mode: args
            .cache_mode
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string()),
        cache_size: pool.cache_config().size,
        logical_bytes_read: engine_after.read_bytes - engine_before.read_bytes,
        backend_bytes_read: engine_after.backend_read_bytes - engine_before.backend_read_bytes,
        cache_bytes_peak: after.cached_bytes_peak,
        per_device_bytes_peak: after.per_device_bytes_peak,
        hits: after.hits - before.hits,
        misses: after.misses - before.misses,
        coalesced: after.coalesced - before.coalesced,
        elapsed_seconds: elapsed,
    })
}
