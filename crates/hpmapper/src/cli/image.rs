//! `hpmapper device import` and `hpmapper device export`: whole raw images, kept sparse in
//! both directions.
//!
//! Import never leaves a half-imported device behind on purpose: if anything fails after
//! the device is created, it is removed. Export never overwrites a file without `--force`,
//! and removes the partial file it wrote if it fails.

use crate::pieces::{read_full, PIECE};
use crate::sparse::{data_runs, BLOCK};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use hpm_engine::{Device, Pool};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Name of the new device.
    name: String,
    /// Raw image: a regular file or a block device.
    file: PathBuf,
}

impl ImportArgs {
    /// Makes FILE absolute against `cwd` (commands run by the daemon see the client's cwd).
    pub fn resolve(&mut self, cwd: &Path) {
        self.file = cwd.join(&self.file);
    }
}

impl ExportArgs {
    /// Makes FILE absolute against `cwd`.
    pub fn resolve(&mut self, cwd: &Path) {
        self.file = cwd.join(&self.file);
    }
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Device to export.
    name: String,
    /// Raw image to write; holes where the device reads as zeros.
    file: PathBuf,
    /// Overwrite FILE if it exists.
    #[arg(long)]
    force: bool,
}

/// A progress bar on stderr when it is a terminal, otherwise one that draws nothing.
fn progress(len: u64, verb: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
        .with_style(style)
        .with_message(verb)
}

/// Creates device `args.name` from the image and flushes it.
pub fn import(pool: &Pool, args: &ImportArgs) -> Result<()> {
    let path = &args.file;
    let what = || format!("importing {} into device {:?}", path.display(), args.name);
    let mut file = open_image(path).with_context(what)?;
    let len = file
        .seek(SeekFrom::End(0))
        .and_then(|len| file.rewind().map(|()| len))
        .with_context(|| format!("reading the size of {}", path.display()))
        .with_context(what)?;
    if len == 0 {
        bail!(
            "{}: {} is empty; a device needs at least 4096 bytes",
            what(),
            path.display()
        );
    }
    let size = len
        .checked_next_multiple_of(BLOCK as u64)
        .ok_or_else(|| anyhow!("{}: the image is too large", what()))?;
    pool.create_device(&args.name, size).with_context(what)?;
    let bar = progress(len, "importing");
    let copied = copy_in(pool, &args.name, &mut file, len, path, &bar);
    bar.finish_and_clear();
    let Err(e) = copied else { return Ok(()) };
    let e = e.context(what());
    match pool.remove_device(&args.name) {
        Ok(()) => Err(anyhow!("{e:#}; the half-imported device was removed")),
        Err(re) => Err(anyhow!(
            "{e:#}; the half-imported device could not be removed either ({re}); remove it \
             with `hpmapper device remove`"
        )),
    }
}

fn open_image(path: &Path) -> Result<File> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    if meta.is_dir() {
        bail!("{} is a directory, not a raw image", path.display());
    }
    Ok(file)
}

/// Writes the runs of non-zero blocks of the first `len` bytes of `file` into the device.
fn copy_in(
    pool: &Pool,
    name: &str,
    file: &mut File,
    len: u64,
    path: &Path,
    bar: &ProgressBar,
) -> Result<()> {
    let dev = pool.open_device(name)?;
    let mut buf = vec![0u8; PIECE];
    let mut pos = 0u64;
    while pos < len {
        let want = (len - pos).min(PIECE as u64) as usize;
        let n = read_full(file, &mut buf[..want])
            .with_context(|| format!("reading {} at byte {pos}", path.display()))?;
        if n == 0 {
            // The file shrank while we read it; the rest of the device reads as zeros.
            break;
        }
        for (s, e) in data_runs(&buf[..n]) {
            dev.write_at(&buf[s..e], pos + s as u64)?;
        }
        pos += n as u64;
        bar.inc(n as u64);
    }
    dev.flush()?;
    Ok(())
}

/// Writes device `args.name` to a raw image.
pub fn export(pool: &Pool, args: &ExportArgs) -> Result<()> {
    let path = &args.file;
    let what = || format!("exporting device {:?} to {}", args.name, path.display());
    let dev = pool.open_device(&args.name).with_context(what)?;
    let mut opts = OpenOptions::new();
    // A new image is the owner's only, like the pool it comes from.
    opts.write(true).mode(0o600);
    if args.force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let file = match opts.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!(
                "{}: {} exists; pass --force to overwrite it",
                what(),
                path.display()
            )
        }
        Err(e) => {
            return Err(e)
                .context(format!("creating {}", path.display()))
                .context(what())
        }
    };
    let kind = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))
        .with_context(what)?
        .file_type();
    let size = dev.size();
    let bar = progress(size, "exporting");
    let copied = copy_out(&dev, &file, size, kind.is_file(), path, &bar);
    bar.finish_and_clear();
    let synced = copied.and_then(|()| {
        if kind.is_file() || kind.is_block_device() {
            file.sync_all()
                .with_context(|| format!("syncing {}", path.display()))?;
        }
        Ok(())
    });
    if let Err(e) = synced {
        if kind.is_file() {
            // Best effort: a partial image is worse than none; the error says what failed.
            let _ = std::fs::remove_file(path);
        }
        return Err(e.context(what()));
    }
    Ok(())
}

/// Copies the device into `file`: in a regular file, zero blocks are holes (skipped, then
/// the length is set); anything else (a pipe, a block device) gets every byte in order.
fn copy_out(
    dev: &Device,
    mut file: &File,
    size: u64,
    sparse: bool,
    path: &Path,
    bar: &ProgressBar,
) -> Result<()> {
    let mut buf = vec![0u8; PIECE];
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(PIECE as u64) as usize;
        dev.read_at(&mut buf[..n], pos)?;
        let written = if sparse {
            data_runs(&buf[..n])
                .into_iter()
                .try_for_each(|(s, e)| file.write_all_at(&buf[s..e], pos + s as u64))
        } else {
            file.write_all(&buf[..n])
        };
        written.with_context(|| format!("writing {} at byte {pos}", path.display()))?;
        pos += n as u64;
        bar.inc(n as u64);
    }
    if sparse {
        file.set_len(size)
            .with_context(|| format!("setting the length of {}", path.display()))?;
    }
    Ok(())
}
