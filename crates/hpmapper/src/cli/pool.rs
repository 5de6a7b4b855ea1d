//! `hpmapper pool create` and `hpmapper pool info`.

use super::parse_size;
use crate::size::human;
use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use hpm_engine::{CowGranularity, Pool, PoolInfo, PoolOptions};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Create a pool in --pool DIR (created if missing; must not hold a pool).
    Create(CreateArgs),
    /// Show the pool's size, use and memory figures.
    Info(InfoArgs),
    /// Grow the pool's data capacity (a data file is extended, sparse; a data block device
    /// must already be big enough). Shrinking is not supported.
    Grow(GrowArgs),
}

#[derive(Debug, Args)]
pub struct GrowArgs {
    /// The new capacity (rounded down to whole chunks); not below the current one.
    #[arg(long, value_name = "SIZE")]
    capacity: String,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Chunk size: a power of two from 64K to 4M.
    #[arg(long, value_name = "SIZE", default_value = "512K")]
    chunk_size: String,

    /// Data capacity [default: the size of an existing non-empty --data device or file, else
    /// 90% of the free space of the filesystem holding the pool directory]
    #[arg(long, value_name = "SIZE")]
    capacity: Option<String>,

    /// Data store: a block device or a file [default: DIR/data]
    #[arg(long, value_name = "PATH")]
    data: Option<PathBuf>,

    /// Copy-on-write granularity: `block` copies only the 4 KiB blocks written; `chunk`
    /// exists only as the devicemapper-like baseline for benchmarks.
    #[arg(long, value_enum, value_name = "GRANULARITY", default_value_t = Cow::Block)]
    cow_granularity: Cow,
}

/// `--cow-granularity` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Cow {
    /// Copy exactly the 4 KiB blocks written (hpmapper's design; use this).
    Block,
    /// Copy the whole chunk on the first write to a shared chunk, as dm-thin does. Exists
    /// only as the devicemapper-like baseline for benchmarks.
    Chunk,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print JSON instead of aligned text.
    #[arg(long)]
    json: bool,
}

/// Creates the pool and closes it.
pub fn create(dir: &Path, args: &CreateArgs) -> Result<()> {
    let opts = PoolOptions {
        chunk_size: parse_size("--chunk-size", &args.chunk_size)?,
        capacity: args
            .capacity
            .as_deref()
            .map(|c| parse_size("--capacity", c))
            .transpose()?,
        data: args.data.clone(),
        cow: match args.cow_granularity {
            Cow::Block => CowGranularity::Block,
            Cow::Chunk => CowGranularity::Chunk,
        },
        ..PoolOptions::default()
    };
    let what = || format!("creating pool {}", dir.display());
    Pool::create(dir, &opts)
        .with_context(what)?
        .close()
        .with_context(what)
}

/// `pool info --json`; field names are an interface scripts rely on.
#[derive(Debug, Serialize)]
struct InfoJson {
    chunk_size: u64,
    capacity_bytes: u64,
    used_bytes: u64,
    metadata_bytes: u64,
    devices: usize,
    cow_granularity: &'static str,
    data_allocated_bytes: Option<u64>,
    map_memory_bytes: u64,
    space_memory_bytes: u64,
    compact_entries: u64,
    split_entries: u64,
    data_io: String,
}

impl From<&PoolInfo> for InfoJson {
    fn from(i: &PoolInfo) -> Self {
        Self {
            chunk_size: i.chunk_size,
            capacity_bytes: i.capacity_bytes,
            used_bytes: i.used_bytes,
            metadata_bytes: i.metadata_bytes,
            devices: i.devices,
            cow_granularity: match i.cow {
                CowGranularity::Block => "block",
                CowGranularity::Chunk => "chunk",
            },
            data_allocated_bytes: i.data_allocated_bytes,
            map_memory_bytes: i.map_memory_bytes,
            space_memory_bytes: i.space_memory_bytes,
            compact_entries: i.entries.0,
            split_entries: i.entries.1,
            data_io: i.data_io.to_string(),
        }
    }
}

/// Grows the pool to `--capacity`; prints the new capacity.
pub fn grow(pool: &Pool, args: &GrowArgs, out: &mut dyn Write) -> Result<()> {
    let capacity = parse_size("--capacity", &args.capacity)?;
    let now = pool.grow(capacity).context("growing the pool")?;
    writeln!(out, "capacity: {}", human(now)).context("writing output")
}

/// Prints the pool's figures.
pub fn info(pool: &Pool, args: &InfoArgs, out: &mut dyn Write) -> Result<()> {
    let info = pool.info().context("reading pool figures")?;
    let j = InfoJson::from(&info);
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &j).context("writing output")?;
        return writeln!(out).context("writing output");
    }
    let percent = |part: u64| match j.capacity_bytes {
        0 => 0.0,
        c => part as f64 * 100.0 / c as f64,
    };
    let lines = [
        ("chunk size", human(j.chunk_size)),
        ("capacity", human(j.capacity_bytes)),
        (
            "used",
            format!("{} ({:.1}%)", human(j.used_bytes), percent(j.used_bytes)),
        ),
        ("metadata", human(j.metadata_bytes)),
        ("devices", j.devices.to_string()),
        ("cow granularity", j.cow_granularity.to_string()),
        ("data I/O", j.data_io.clone()),
        (
            "data allocated",
            j.data_allocated_bytes.map_or("unknown".into(), human),
        ),
        ("map memory", human(j.map_memory_bytes)),
        ("space memory", human(j.space_memory_bytes)),
        (
            "map entries",
            format!("{} compact, {} split", j.compact_entries, j.split_entries),
        ),
    ];
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (key, value) in lines {
        writeln!(out, "{:<width$} {value}", format!("{key}:")).context("writing output")?;
    }
    Ok(())
}
