//! `hpmapper cache drop`: empties the daemon's block cache, for cold-cache measurements
//! (the host page cache is dropped with `echo 3 > /proc/sys/vm/drop_caches`; this is the
//! other half).

use anyhow::{Context, Result};
use clap::Subcommand;
use hpm_engine::Pool;
use std::io::Write;

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Empty the block cache (as after a restart); data is untouched.
    Drop,
}

/// Runs a cache command on an open pool (in the daemon when one holds the pool).
pub fn run(pool: &Pool, cmd: CacheCommand, out: &mut dyn Write) -> Result<()> {
    match cmd {
        CacheCommand::Drop => {
            let bytes = pool.drop_cache();
            writeln!(out, "dropped {bytes} bytes from the block cache").context("writing output")
        }
    }
}
