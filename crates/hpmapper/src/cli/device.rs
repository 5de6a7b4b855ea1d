//! `hpmapper device ...`: the grammar of device commands, and the management ones (create,
//! snapshot, remove, resize, list). Data transfer lives in `image` (whole raw images) and
//! `device_io` (byte ranges).

use super::{device_io, image, parse_size};
use crate::size::human;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use hpm_engine::{DeviceInfo, Pool};
use serde::Serialize;
use std::io::Write;

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Create an empty (all-zero, unallocated) device.
    Create(CreateArgs),
    /// Create NAME as a snapshot of ORIGIN, sharing all its blocks (nothing is copied).
    Snapshot(SnapshotArgs),
    /// Remove a device; blocks no other device shares are freed.
    Remove(NameArgs),
    /// Grow a device (shrinking is not supported).
    Resize(ResizeArgs),
    /// List devices with their size, origin and space use.
    List(ListArgs),
    /// Create device NAME from a raw image FILE (size rounded up to 4 KiB); all-zero
    /// 4 KiB blocks are not written and take no space. On failure the device is removed.
    Import(image::ImportArgs),
    /// Write device NAME to a sparse raw image FILE (zero blocks become holes).
    Export(image::ExportArgs),
    /// Write the bytes of FILE (or stdin for `-`) at --offset, then flush.
    Write(device_io::WriteArgs),
    /// Read --length bytes at --offset to FILE, or to stdout.
    Read(device_io::ReadArgs),
    /// Attach the device as a kernel block device (a loop device over the daemon's FUSE
    /// file, with direct I/O and 4096-byte blocks); prints /dev/loopN. Needs the daemon.
    Attach(AttachArgs),
    /// Detach the device's loop device (refused while it is mounted). Needs the daemon.
    Detach(NameArgs),
    /// Make an ext4 filesystem (4096-byte blocks) on the device. Needs the daemon.
    Mkfs(NameArgs),
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Device name.
    name: String,
    /// Attach read-only.
    #[arg(long)]
    read_only: bool,
}

/// The daemon, or a clear error saying the command needs it.
fn daemon_of<'a>(ctx: &super::Ctx<'a>, what: &str) -> Result<&'a crate::daemon::Daemon> {
    ctx.daemon.ok_or_else(|| {
        anyhow::anyhow!("`hpmapper {what}` needs the daemon, which serves the device files: start `hpmapper daemon`")
    })
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// Device name.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Device name: 1 to 1024 bytes; slashes and spaces are allowed.
    name: String,
    /// Device size: a multiple of 4K.
    #[arg(long, value_name = "SIZE")]
    size: String,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The device to snapshot.
    origin: String,
    /// The new device's name.
    name: String,
    /// Make the snapshot refuse writes.
    #[arg(long)]
    read_only: bool,
}

#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// Device name.
    name: String,
    /// New size: a multiple of 4K, not smaller than the current size.
    #[arg(long, value_name = "SIZE")]
    size: String,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs one device command on an open pool.
pub fn run(
    pool: &Pool,
    cmd: DeviceCommand,
    ctx: &mut super::Ctx<'_>,
    out: &mut dyn Write,
) -> Result<()> {
    match cmd {
        DeviceCommand::Create(a) => {
            let size = parse_size("--size", &a.size)?;
            pool.create_device(&a.name, size)
                .with_context(|| format!("creating device {:?}", a.name))?;
        }
        DeviceCommand::Snapshot(a) => {
            pool.snapshot(&a.origin, &a.name, a.read_only)
                .with_context(|| format!("snapshotting {:?} as {:?}", a.origin, a.name))?;
        }
        DeviceCommand::Remove(a) => pool
            .remove_device(&a.name)
            .with_context(|| format!("removing device {:?}", a.name))?,
        DeviceCommand::Resize(a) => {
            let size = parse_size("--size", &a.size)?;
            pool.resize_device(&a.name, size)
                .with_context(|| format!("resizing device {:?}", a.name))?;
        }
        DeviceCommand::List(a) => list(pool, &a, out)?,
        DeviceCommand::Import(mut a) => {
            a.resolve(&ctx.cwd);
            image::import(pool, &a)?
        }
        DeviceCommand::Export(mut a) => {
            a.resolve(&ctx.cwd);
            image::export(pool, &a)?
        }
        DeviceCommand::Write(mut a) => {
            a.resolve(&ctx.cwd);
            device_io::write(pool, &a, ctx.stdin)?
        }
        DeviceCommand::Read(mut a) => {
            a.resolve(&ctx.cwd);
            device_io::read(pool, &a, out)?
        }
        DeviceCommand::Attach(a) => {
            let path = daemon_of(ctx, "device attach")?.attach(&a.name, a.read_only)?;
            writeln!(out, "{}", path.display())?;
        }
        DeviceCommand::Detach(a) => daemon_of(ctx, "device detach")?.detach(&a.name)?,
        DeviceCommand::Mkfs(a) => daemon_of(ctx, "device mkfs")?.mkfs(&a.name)?,
    }
    Ok(())
}

/// One element of `device list --json`; field names are an interface scripts rely on.
#[derive(Debug, Serialize)]
struct DeviceJson<'a> {
    name: &'a str,
    size: u64,
    origin: Option<&'a str>,
    read_only: bool,
    mapped_bytes: u64,
    exclusive_bytes: u64,
}

impl<'a> From<&'a DeviceInfo> for DeviceJson<'a> {
    fn from(d: &'a DeviceInfo) -> Self {
        Self {
            name: &d.name,
            size: d.size,
            origin: d.origin.as_deref(),
            read_only: d.read_only,
            mapped_bytes: d.mapped_bytes,
            exclusive_bytes: d.exclusive_bytes,
        }
    }
}

fn list(pool: &Pool, args: &ListArgs, out: &mut dyn Write) -> Result<()> {
    let devices = pool.list_devices();
    if args.json {
        let rows: Vec<DeviceJson> = devices.iter().map(DeviceJson::from).collect();
        serde_json::to_writer_pretty(&mut *out, &rows).context("writing output")?;
        return writeln!(out).context("writing output");
    }
    let mut rows = vec![[
        "NAME".to_string(),
        "SIZE".into(),
        "ORIGIN".into(),
        "RO".into(),
        "MAPPED".into(),
        "EXCLUSIVE".into(),
    ]];
    rows.extend(devices.iter().map(|d| {
        [
            d.name.escape_debug().to_string(),
            human(d.size),
            d.origin
                .as_deref()
                .map_or("-".into(), |o| o.escape_debug().to_string()),
            if d.read_only { "yes" } else { "no" }.into(),
            human(d.mapped_bytes),
            human(d.exclusive_bytes),
        ]
    }));
    write_table(&rows, out).context("writing output")
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn write_table<const N: usize>(rows: &[[String; N]], out: &mut dyn Write) -> std::io::Result<()> {
    let mut widths = [0; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < N {
                let pad = widths[i] - cell.chars().count();
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad + 2));
            } else {
                line.push_str(cell);
            }
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let rows = [
            ["NAME".to_string(), "SIZE".into(), "RO".into()],
            ["a-long-name".into(), "1 GiB".into(), "no".into()],
            ["b".into(), "64 MiB".into(), "yes".into()],
        ];
        let mut out = Vec::new();
        write_table(&rows, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NAME         SIZE    RO\n\
             a-long-name  1 GiB   no\n\
             b            64 MiB  yes\n"
        );
    }
}
