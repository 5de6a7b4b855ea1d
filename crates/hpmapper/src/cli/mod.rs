//! The command line: its grammar (clap) and the dispatch of each command to its function.
//!
//! Every command that works on an existing pool opens it here with `Pool::open` (so a
//! second process gets the engine's "in use" error) and closes it with `Pool::close`, so a
//! failure to make the work durable is reported rather than logged by a destructor. The
//! command functions take the open pool and their parsed arguments, so a daemon can call
//! them on a pool it holds.

mod bench;
mod check;
mod device;
mod device_io;
mod image;
mod pool;

use crate::logging::LogLevel;
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hpm_engine::Pool;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where the pool lives when neither `--pool` nor `$HPMAPPER_POOL` says.
const DEFAULT_POOL: &str = "/var/lib/hpmapper";

/// hpmapper: thin-provisioned block devices with cheap snapshots, for containers.
///
/// Sizes (SIZE) are plain bytes or a whole number with a binary suffix: K, M, G, T (also
/// KiB, MiB, ..., any case). A failure prints one line on stderr and exits 1; a usage
/// error exits 2.
#[derive(Debug, Parser)]
#[command(name = "hpmapper", version, about, long_about)]
pub struct Cli {
    /// Pool directory [default: $HPMAPPER_POOL, else /var/lib/hpmapper]
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        help_heading = "Global options"
    )]
    pub pool: Option<PathBuf>,

    /// Log level on stderr [default: $RUST_LOG, else warn]
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "LEVEL",
        help_heading = "Global options"
    )]
    pub log_level: Option<LogLevel>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a pool or show its figures.
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Create, snapshot, remove, resize, list, import, export, write and read devices.
    #[command(subcommand)]
    Device(device::DeviceCommand),
    /// Check the pool's metadata without changing it; exit 1 if it is inconsistent.
    Check,
    /// Measure the engine in place (the pool must not be in use).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let dir = pool_dir(cli.pool);
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Pool(pool::PoolCommand::Create(args)) => pool::create(&dir, &args),
        Command::Pool(pool::PoolCommand::Info(args)) => {
            with_pool(&dir, |p| pool::info(p, &args, &mut out))
        }
        Command::Device(cmd) => with_pool(&dir, |p| device::run(p, cmd, &mut out)),
        Command::Check => check::run(&dir, &mut out),
        Command::Bench(cmd) => bench::run(&dir, cmd, &mut out),
    }?;
    out.flush().context("writing output")
}

/// `--pool`, else a non-empty `$HPMAPPER_POOL`, else the default.
fn pool_dir(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| {
        std::env::var_os("HPMAPPER_POOL")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(|| PathBuf::from(DEFAULT_POOL))
}

/// Fails clearly when `dir` is not a directory, before the engine would create its lock
/// file there.
fn require_dir(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!("{} is not a directory", dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} does not exist; create a pool with `hpmapper pool create --pool {}`",
            dir.display(),
            dir.display()
        ),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

/// Opens the pool in `dir`, runs `f` on it and closes it. A failure of `f` wins over a
/// failure to close, which is then only logged (the next open recovers from the journal).
fn with_pool(dir: &Path, f: impl FnOnce(&Pool) -> Result<()>) -> Result<()> {
    let what = || format!("opening pool {}", dir.display());
    require_dir(dir).with_context(what)?;
    let pool = Pool::open(dir).with_context(what)?;
    let result = f(&pool);
    let closed = pool
        .close()
        .with_context(|| format!("closing pool {}", dir.display()));
    match (result, closed) {
        (Err(e), Err(close)) => {
            tracing::info!("after the failure, {close:#}");
            Err(e)
        }
        (result, closed) => result.and(closed),
    }
}

/// Parses a SIZE-like argument after clap, so a bad value is a failure (exit 1) that names
/// the flag.
fn parse_size(flag: &str, value: &str) -> Result<u64> {
    crate::size::parse(value).context(flag.to_string())
}
