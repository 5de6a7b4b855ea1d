//! Making and growing a layer's ext4 filesystem with e2fsprogs (`mkfs.ext4`, `tune2fs`,
//! `resize2fs`, `e2fsck`), as devicemapper and containerd's devmapper snapshotter do.
//!
//! Owns the tools' arguments and how their failures read; must only be given an attached
//! block device that nothing has mounted. The tools are separate processes: the I/O they
//! cause is served by our FUSE workers while the calling thread just waits.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use crate::error::{Error, ErrorKind, Result};

/// `mkfs.ext4` extended options: the device is an empty thin volume (no discard), and every
/// inode table and the journal are written now, so no `ext4lazyinit` thread writes them
/// later through every layer cloned from the base.
const EXTENDED: &str = "nodiscard,lazy_itable_init=0,lazy_journal_init=0";
/// Fallback for an `mkfs.ext4` without `lazy_journal_init` (devicemapper does the same).
const EXTENDED_OLD: &str = "nodiscard,lazy_itable_init=0";

/// Makes an ext4 filesystem with 4096-byte blocks (what our loop devices need) on `block`
/// (a block device or a regular file), with no periodic check by mount count or time.
pub fn mkfs(block: &Path) -> Result<()> {
    let args = |extended: &'static str| -> Vec<&OsStr> {
        vec![
            "-q".as_ref(),
            // No question when `block` is a regular file or holds a filesystem already.
            "-F".as_ref(),
            "-b".as_ref(),
            "4096".as_ref(),
            "-E".as_ref(),
            extended.as_ref(),
            block.as_os_str(),
        ]
    };
    let out = run("mkfs.ext4", &args(EXTENDED))?;
    if !out.status.success() {
        if text(&out).contains("lazy_journal_init") {
            check("mkfs.ext4", &run("mkfs.ext4", &args(EXTENDED_OLD))?)?;
        } else {
            check("mkfs.ext4", &out)?;
        }
    }
    let tune = [
        "-c".as_ref(),
        "-1".as_ref(),
        "-i".as_ref(),
        "0".as_ref(),
        block.as_os_str(),
    ];
    check("tune2fs", &run("tune2fs", &tune)?)
}

/// Grows the unmounted ext4 filesystem on `block` to the device's size. `resize2fs` refuses
/// a filesystem mounted since its last full check (every layer: the base was mounted to
/// make `rootfs`), so then `e2fsck -f -y` runs first.
pub(super) fn grow(block: &Path) -> Result<()> {
    let out = run("resize2fs", &[block.as_os_str()])?;
    if out.status.success() {
        return Ok(());
    }
    if !text(&out).contains("e2fsck -f") {
        return check("resize2fs", &out);
    }
    let fsck = run("e2fsck", &["-f".as_ref(), "-y".as_ref(), block.as_os_str()])?;
    // 1: errors corrected, 2: corrected, reboot advised (only matters for a root fs).
    if !matches!(fsck.status.code(), Some(0..=2)) {
        return check("e2fsck", &fsck);
    }
    check("resize2fs", &run("resize2fs", &[block.as_os_str()])?)
}

fn run(tool: &str, args: &[&OsStr]) -> Result<Output> {
    tracing::debug!(tool, ?args, "running");
    Command::new(tool).args(args).output().map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::Unsupported
        } else {
            ErrorKind::Io
        };
        Error::with_source(
            kind,
            format!("running {tool} (is e2fsprogs installed and in PATH?)"),
            e,
        )
    })
}

fn check(tool: &str, out: &Output) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Io,
        format!("{tool} failed ({}): {}", out.status, text(out).trim()),
    ))
}

/// Standard error, then standard output (resize2fs prints some advice on the latter).
fn text(out: &Output) -> String {
    format!(
        "{} {}",
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    )
}
