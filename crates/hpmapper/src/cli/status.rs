//! `hpmapper status`: what the daemon serves and its live counters.

use super::Ctx;
use crate::size::human;
use anyhow::{Context, Result};
use clap::Args;
use hpm_engine::Pool;
use serde_json::json;
use std::io::Write;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Prints the status (runs inside the daemon).
pub fn run(pool: &Pool, args: &StatusArgs, ctx: &mut Ctx<'_>, out: &mut dyn Write) -> Result<()> {
    let d = ctx.daemon.context("`hpmapper status` needs the daemon")?;
    let info = pool.info()?;
    let e = pool.stats();
    let c = pool.cache_stats();
    let saving = if c.per_device_bytes_peak > 0 {
        1.0 - c.cached_bytes_peak as f64 / c.per_device_bytes_peak as f64
    } else {
        0.0
    };
    let devices: Vec<_> = pool
        .list_devices()
        .into_iter()
        .map(|dv| json!({"name": dv.name, "size": dv.size, "origin": dv.origin, "read_only": dv.read_only, "mapped_bytes": dv.mapped_bytes, "exclusive_bytes": dv.exclusive_bytes}))
        .collect();
    let attachments: Vec<_> = d
        .attachments()
        .into_iter()
        .map(|(n, p, ro)| json!({"device": n, "block_device": p, "read_only": ro}))
        .collect();
    let endpoints: Vec<_> = d
        .endpoints()
        .into_iter()
        .map(|(w, a)| json!({"what": w, "address": a}))
        .collect();
    let servers: serde_json::Map<String, serde_json::Value> =
        super::super::daemon::server_counters_json(d);
    let v = json!({
        "pool": d.pool_dir(),
        "run_dir": d.run_dir(),
        "uptime_seconds": d.uptime(),
        "capacity_bytes": info.capacity_bytes,
        "used_bytes": info.used_bytes,
        "devices": devices,
        "attachments": attachments,
        "endpoints": endpoints,
        "servers": servers,
        "engine": {
            "reads": e.reads, "read_bytes": e.read_bytes, "writes": e.writes, "write_bytes": e.write_bytes,
            "backend_read_bytes": e.backend_read_bytes, "backend_write_bytes": e.backend_write_bytes,
            "cow_blocks": e.cow_blocks, "cow_copied_bytes": e.cow_copied_bytes, "new_blocks": e.new_blocks,
            "discarded_blocks": e.discarded_blocks, "commits": e.commits, "checkpoints": e.checkpoints,
        },
        "cache": {
            "size": pool.cache_config().size, "hits": c.hits, "misses": c.misses, "intercepted": c.coalesced,
            "backend_read_bytes": c.backend_read_bytes, "cached_bytes": c.cached_bytes,
            "cached_bytes_peak": c.cached_bytes_peak, "per_device_bytes_peak": c.per_device_bytes_peak,
            "saving_vs_per_device": saving, "evictions": c.evictions,
        },
    });
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &v)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "pool:        {} ({} of {} used)",
        d.pool_dir().display(),
        human(info.used_bytes),
        human(info.capacity_bytes)
    )?;
    writeln!(out, "uptime:      {:.0} s", d.uptime())?;
    for (w, a) in d.endpoints() {
        writeln!(out, "{w:<12} {a}")?;
    }
    writeln!(out, "devices:     {}", info.devices)?;
    for (n, p, ro) in d.attachments() {
        writeln!(
            out,
            "  attached   {n} -> {}{}",
            p.display(),
            if ro { " (read-only)" } else { "" }
        )?;
    }
    writeln!(
        out,
        "engine:      {} reads, {} writes, {} copied on write ({} blocks)",
        e.reads,
        e.writes,
        human(e.cow_copied_bytes),
        e.cow_blocks
    )?;
    writeln!(
        out,
        "cache:       {} of {}, {} hits, {} misses, {} intercepted, saving {:.1}% vs per-device",
        human(c.cached_bytes),
        human(pool.cache_config().size),
        c.hits,
        c.misses,
        c.coalesced,
        saving * 100.0
    )?;
    for (k, val) in servers {
        writeln!(out, "{k:<12} {val}")?;
    }
    Ok(())
}
