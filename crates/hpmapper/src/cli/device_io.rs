//! `hpmapper device write` and `hpmapper device read`: bytes at any offset, for scripts and
//! tests. Ranges are checked against the device size before any byte moves, where the
//! input's length is known.

use super::parse_size;
use crate::pieces::{read_full, PIECE};
use anyhow::{bail, Context, Result};
use clap::Args;
use hpm_engine::Pool;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct WriteArgs {
    /// Device name.
    name: String,
    /// Where to start writing, in bytes (any offset; suffixes K, M, G, T allowed).
    #[arg(long, value_name = "BYTES")]
    offset: String,
    /// The bytes to write; `-` reads stdin.
    file: PathBuf,
}

#[derive(Debug, Args)]
pub struct ReadArgs {
    /// Device name.
    name: String,
    /// Where to start reading, in bytes (suffixes K, M, G, T allowed).
    #[arg(long, value_name = "BYTES")]
    offset: String,
    /// How many bytes to read (suffixes K, M, G, T allowed).
    #[arg(long, value_name = "BYTES")]
    length: String,
    /// Where to put the bytes (created or truncated); stdout if absent or `-`.
    file: Option<PathBuf>,
}

impl WriteArgs {
    /// Makes FILE absolute against `cwd` (stdin stays stdin).
    pub fn resolve(&mut self, cwd: &Path) {
        if !is_stdio(&self.file) {
            self.file = cwd.join(&self.file);
        }
    }

    /// Whether the bytes come from stdin.
    pub fn reads_stdin(&self) -> bool {
        is_stdio(&self.file)
    }
}

impl ReadArgs {
    /// Makes FILE absolute against `cwd` (stdout stays stdout).
    pub fn resolve(&mut self, cwd: &Path) {
        if let Some(f) = &mut self.file {
            if !is_stdio(f) {
                *f = cwd.join(&*f);
            }
        }
    }
}

fn is_stdio(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// Writes the input at the offset and flushes.
pub fn write(pool: &Pool, args: &WriteArgs, stdin: &mut dyn Read) -> Result<()> {
    let offset = parse_size("--offset", &args.offset)?;
    let source = if is_stdio(&args.file) {
        "stdin".to_string()
    } else {
        args.file.display().to_string()
    };
    let what = || format!("writing {source} to device {:?}", args.name);
    let dev = pool.open_device(&args.name).with_context(what)?;
    let size = dev.size();
    let past_end = |len: u64| {
        format!(
            "{}: {len} bytes at offset {offset} go past the end of the device ({size} bytes)",
            what()
        )
    };
    let mut file;
    let input: &mut dyn Read = if is_stdio(&args.file) {
        stdin
    } else {
        let f = File::open(&args.file)
            .with_context(|| format!("opening {source}"))
            .with_context(what)?;
        let meta = f
            .metadata()
            .with_context(|| format!("reading {source}"))
            .with_context(what)?;
        if meta.is_dir() {
            bail!("{}: {source} is a directory", what());
        }
        if meta.is_file() && offset.saturating_add(meta.len()) > size {
            bail!(past_end(meta.len()));
        }
        file = f;
        &mut file
    };
    let mut buf = vec![0u8; PIECE];
    let mut pos = 0u64;
    loop {
        let n = read_full(input, &mut buf)
            .with_context(|| format!("reading {source} at byte {pos}"))
            .with_context(what)?;
        if n == 0 {
            break;
        }
        if offset.saturating_add(pos + n as u64) > size {
            let done = match pos {
                0 => String::new(),
                _ => format!(" (the first {pos} bytes were written)"),
            };
            bail!("{}{done}", past_end(pos + n as u64));
        }
        dev.write_at(&buf[..n], offset + pos).with_context(what)?;
        pos += n as u64;
    }
    dev.flush().with_context(what)
}

/// Copies `--length` bytes at `--offset` of the device to the file or `out`.
pub fn read(pool: &Pool, args: &ReadArgs, out: &mut dyn Write) -> Result<()> {
    let offset = parse_size("--offset", &args.offset)?;
    let length = parse_size("--length", &args.length)?;
    let what = || format!("reading device {:?}", args.name);
    let dev = pool.open_device(&args.name).with_context(what)?;
    let size = dev.size();
    if offset.checked_add(length).is_none_or(|end| end > size) {
        bail!(
            "{}: {length} bytes at offset {offset} go past the end of the device ({size} bytes)",
            what()
        );
    }
    let mut file;
    let (sink, target): (&mut dyn Write, String) = match &args.file {
        Some(p) if !is_stdio(p) => {
            file = File::create(p)
                .with_context(|| format!("creating {}", p.display()))
                .with_context(what)?;
            (&mut file, p.display().to_string())
        }
        _ => (out, "stdout".to_string()),
    };
    let mut buf = vec![0u8; PIECE];
    let mut pos = 0u64;
    while pos < length {
        let n = (length - pos).min(PIECE as u64) as usize;
        dev.read_at(&mut buf[..n], offset + pos)
            .with_context(what)?;
        sink.write_all(&buf[..n])
            .with_context(|| format!("writing {target}"))
            .with_context(what)?;
        pos += n as u64;
    }
    sink.flush().with_context(|| format!("writing {target}"))
}
