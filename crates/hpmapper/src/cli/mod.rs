//! The command line: its grammar (clap) and the dispatch of each command to its function.
//!
//! Every command that works on an existing pool opens it here with `Pool::open` (so a
//! second process gets the engine's "in use" error) and closes it with `Pool::close`, so a
//! failure to make the work durable is reported rather than logged by a destructor. The
//! command functions take the open pool and their parsed arguments, so a daemon can call
//! them on a pool it holds.

mod bench;
pub use bench::Mode as CacheModeArg;
mod cache;
mod check;
mod device;
mod device_io;
mod image;
mod pool;
mod status;

use crate::logging::LogLevel;
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hpm_engine::Pool;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where the pool lives when neither `--pool` nor `$HPMAPPER_POOL` says.
const DEFAULT_POOL: &str = "/var/lib/hpmapper";
/// Where the daemon keeps its sockets and device files by default.
pub const DEFAULT_RUN_DIR: &str = "/run/hpmapper";

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

    /// The daemon's runtime directory (control socket, FUSE device files) [default:
    /// $HPMAPPER_RUN_DIR, else /run/hpmapper]
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        help_heading = "Global options"
    )]
    pub run_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a pool or show its figures.
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Create, snapshot, remove, resize, list, import, export, write, read, attach, detach
    /// and mkfs devices.
    #[command(subcommand)]
    Device(device::DeviceCommand),
    /// Check the pool's metadata without changing it; exit 1 if it is inconsistent.
    Check,
    /// Measure the engine in place (the pool must not be in use).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run the daemon: own the pool, serve devices (FUSE files for loop devices, NBD), and
    /// run CLI commands sent to its control socket.
    Daemon(crate::daemon::DaemonArgs),
    /// Show the daemon's devices, attachments, connections and live counters.
    Status(status::StatusArgs),
    /// Empty the daemon's block cache (for cold-cache measurements).
    #[command(subcommand)]
    Cache(cache::CacheCommand),
}

/// Where a command runs and what it may use besides the pool.
pub struct Ctx<'a> {
    /// The client's working directory (relative paths are relative to it).
    pub cwd: PathBuf,
    /// The client's standard input.
    pub stdin: &'a mut dyn std::io::Read,
    /// The daemon, when the command runs inside it.
    pub daemon: Option<&'a crate::daemon::Daemon>,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let dir = pool_dir(cli.pool.clone());
    let run_dir = run_dir(cli.run_dir.clone());
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Daemon(args) => return crate::daemon::run(&dir, &run_dir, args),
        Command::Pool(pool::PoolCommand::Create(args)) => return pool::create(&dir, &args),
        Command::Bench(cmd) => return bench::run(&dir, cmd, &mut out),
        _ => {}
    }
    // A daemon that holds this pool runs the command; otherwise it runs here on the pool
    // opened directly.
    let stdin_needed =
        matches!(&cli.command, Command::Device(device::DeviceCommand::Write(a)) if a.reads_stdin());
    if let Some(()) = crate::control::forward(&run_dir, &dir, stdin_needed, &mut out)? {
        return out.flush().context("writing output");
    }
    let mut stdin = std::io::stdin().lock();
    let mut ctx = Ctx {
        cwd: std::env::current_dir().context("reading the working directory")?,
        stdin: &mut stdin,
        daemon: None,
    };
    match cli.command {
        Command::Check => check::run(&dir, &mut out),
        Command::Status(_) => bail!(
            "no hpmapper daemon serves pool {} (control socket {} not answering); start one with `hpmapper daemon --pool {}`",
            dir.display(),
            run_dir.join(crate::control::SOCKET).display(),
            dir.display()
        ),
        command => with_pool(&dir, |p| execute(p, command, &mut ctx, &mut out)),
    }?;
    out.flush().context("writing output")
}

/// Runs a command on an open pool: here, or in the daemon for a client.
pub fn execute(
    pool: &Pool,
    command: Command,
    ctx: &mut Ctx<'_>,
    out: &mut dyn Write,
) -> Result<()> {
    match command {
        Command::Pool(pool::PoolCommand::Info(args)) => pool::info(pool, &args, out),
        Command::Pool(pool::PoolCommand::Grow(args)) => pool::grow(pool, &args, out),
        Command::Pool(pool::PoolCommand::Create(_)) => {
            bail!("the daemon already holds a pool here")
        }
        Command::Device(cmd) => device::run(pool, cmd, ctx, out),
        Command::Check => check::report(pool.dir().unwrap_or(Path::new("?")), pool.check()?, out),
        Command::Status(args) => status::run(pool, &args, ctx, out),
        Command::Cache(cmd) => cache::run(pool, cmd, out),
        Command::Bench(_) => {
            bail!("`hpmapper bench` needs the pool to itself: stop the daemon first")
        }
        Command::Daemon(_) => bail!("a daemon already holds this pool"),
    }
}

/// `--run-dir`, else a non-empty `$HPMAPPER_RUN_DIR`, else /run/hpmapper.
fn run_dir(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| {
        std::env::var_os("HPMAPPER_RUN_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
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
pub(crate) fn require_dir(dir: &Path) -> Result<()> {
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
pub(crate) fn parse_size(flag: &str, value: &str) -> Result<u64> {
    crate::size::parse(value).context(flag.to_string())
}
