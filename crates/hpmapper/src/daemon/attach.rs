//! Attachments and export servers: the FUSE mount with one file per exported device, loop
//! devices over those files, and the NBD server.
//!
//! Locking: the attachment table is held only to look up or update it; loop ioctls and mkfs
//! run outside it, and never on a FUSE worker (control requests run on their own blocking
//! threads), so I/O the daemon causes on its own devices cannot deadlock.

use super::Daemon;
use anyhow::{bail, Context, Result};
use hpm_io::loopdev::{self, LoopDevice};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// One device attached as a kernel block device: a loop device over its FUSE file.
pub struct Attachment {
    dev: LoopDevice,
    read_only: bool,
}

impl Attachment {
    /// /dev/loopN.
    pub fn dev_path(&self) -> PathBuf {
        self.dev.path().to_path_buf()
    }
    /// Attached read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

/// Mounts the FUSE export and starts the NBD server.
pub async fn start_servers(
    d: &Arc<Daemon>,
    tasks: &mut tokio::task::JoinSet<Result<()>>,
    nbd_unix: Option<PathBuf>,
    nbd_tcp: Option<SocketAddr>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mnt = d.run_dir.join("dev");
    // No create_dir_all here: after a daemon was killed, `mnt` is a dead FUSE mount
    // (ENOTCONN) and create_dir_all fails with EEXIST. `FuseExport::mount` first detaches
    // such a stale mount, then creates the directory.
    let opts = hpm_fuse::FuseOptions {
        threads: d.fuse_threads,
        io_uring: d.fuse_io_uring,
        ..hpm_fuse::FuseOptions::default()
    };
    let fuse = hpm_fuse::FuseExport::mount(&mnt, &opts)
        .with_context(|| format!("mounting the FUSE device files at {}", mnt.display()))?;
    d.endpoints
        .lock()
        .push(("devices".into(), mnt.display().to_string()));
    *d.fuse.lock() = Some(fuse);
    let server = Arc::new(hpm_nbd::NbdServer::new(d.pool.clone()));
    *d.nbd.lock() = Some(server.clone());
    // The NBD server has its own shutdown signal; relay ours to it.
    let nbd_stop = hpm_nbd::Shutdown::new();
    {
        let nbd_stop = nbd_stop.clone();
        tasks.spawn(async move {
            let _ = stop.changed().await;
            nbd_stop.trigger();
            Ok(())
        });
    }
    let unix = nbd_unix.unwrap_or_else(|| d.run_dir.join("nbd.sock"));
    let l = hpm_nbd::bind_unix(&unix)
        .with_context(|| format!("binding the NBD socket {}", unix.display()))?;
    d.endpoints.lock().push((
        "nbd".into(),
        format!("nbd+unix:///<device>?socket={}", unix.display()),
    ));
    {
        let (server, stop) = (server.clone(), nbd_stop.clone());
        tasks.spawn(async move {
            server.serve_unix(l, stop).await;
            Ok(())
        });
    }
    if let Some(addr) = nbd_tcp {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding NBD on {addr}"))?;
        d.endpoints.lock().push((
            "nbd-tcp".into(),
            format!("nbd://{}/<device>", l.local_addr()?),
        ));
        tasks.spawn(async move {
            server.serve_tcp(l, nbd_stop).await;
            Ok(())
        });
    }
    Ok(())
}

/// Counters of the export servers, as (metric name, value).
pub fn server_counters(d: &Daemon) -> Vec<(String, u64)> {
    let mut v = Vec::new();
    if let Some(f) = d.fuse.lock().as_ref() {
        let s = f.stats();
        v.extend([
            ("fuse_requests_total".to_string(), s.requests),
            ("fuse_io_uring_requests_total".to_string(), s.ring_requests),
            ("fuse_read_bytes_total".to_string(), s.read_bytes),
            (
                "fuse_read_cache_bytes_total".to_string(),
                s.read_cache_bytes,
            ),
            ("fuse_write_bytes_total".to_string(), s.write_bytes),
            ("fuse_errors_total".to_string(), s.errors),
        ]);
    }
    if let Some(n) = d.nbd.lock().as_ref() {
        let s = n.stats();
        v.extend([
            ("nbd_connections_open".to_string(), s.connections_open),
            ("nbd_connections_total".to_string(), s.connections_total),
            ("nbd_requests_total".to_string(), s.requests),
            ("nbd_read_bytes_total".to_string(), s.bytes_read),
            ("nbd_write_bytes_total".to_string(), s.bytes_written),
            ("nbd_errors_total".to_string(), s.errors),
        ]);
    }
    v
}

/// The export servers' counters, for `status --json`.
pub fn server_counters_json(d: &Daemon) -> serde_json::Map<String, serde_json::Value> {
    server_counters(d)
        .into_iter()
        .map(|(k, v)| (k, v.into()))
        .collect()
}

/// Detaches every attachment and unmounts the FUSE export, at shutdown.
pub fn detach_all(d: &Daemon) {
    let names: Vec<String> = d.attachments.lock().keys().cloned().collect();
    for n in names {
        if let Err(e) = d.detach(&n) {
            tracing::warn!("at shutdown, device {n:?} stays attached: {e:#}; I/O on it will fail once the daemon exits");
            if let Some(a) = d.attachments.lock().remove(&n) {
                let _ = a.dev.detach();
            }
        }
    }
    if let Some(f) = d.fuse.lock().take() {
        if let Err(e) = f.unmount() {
            tracing::warn!("unmounting the FUSE device files: {e}");
        }
    }
    d.nbd.lock().take();
}

/// Claims block device `dev` exclusively (O_EXCL), as a mount does: `None` while it is in
/// use (mounted, or open exclusively). While the claim is held nobody can mount it.
fn claim(dev: &Path) -> std::io::Result<Option<std::fs::File>> {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_excl())
        .open(dev)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(16) => Ok(None),
        Err(e) => Err(e),
    }
}

const fn libc_o_excl() -> i32 {
    0o200 // O_EXCL on Linux
}

impl Daemon {
    fn fuse_file(&self, name: &str) -> Result<(PathBuf, bool)> {
        let guard = self.fuse.lock();
        let fuse = guard.as_ref().context("the FUSE export is not mounted")?;
        if let Some(p) = fuse.path(name) {
            return Ok((p, false));
        }
        let dev = self.pool.open_device(name)?;
        Ok((
            fuse.add(dev)
                .with_context(|| format!("exporting device {name:?} as a file"))?,
            true,
        ))
    }

    fn unexport(&self, name: &str) {
        if let Some(f) = self.fuse.lock().as_ref() {
            if let Err(e) = f.remove_timeout(name, Duration::from_secs(5)) {
                tracing::warn!("removing the FUSE file of {name:?}: {e}");
            }
        }
    }

    /// Attaches `name` as a loop device (direct I/O, 4096-byte blocks, autoclear) over its
    /// FUSE file; returns /dev/loopN.
    pub fn attach(&self, name: &str, read_only: bool) -> Result<PathBuf> {
        if let Some(a) = self.attachments.lock().get(name) {
            bail!(
                "device {name:?} is already attached as {}",
                a.dev.path().display()
            );
        }
        let read_only = read_only || self.pool.device_info(name)?.read_only;
        let (file, added) = self.fuse_file(name)?;
        if !added {
            // A loop device we detached may still be held open by someone (it goes on their
            // last close): never put a second one over the same device.
            let still = loopdev::find_by_backing_file(&file)
                .with_context(|| format!("looking for loop devices over {}", file.display()))?;
            if let Some(n) = still.first() {
                bail!("device {name:?} is still attached as /dev/loop{n} (detached, but still open elsewhere); try again once it is closed");
            }
        }
        let dev = match loopdev::attach(&file, read_only) {
            Ok(d) => d,
            Err(e) => {
                if added {
                    self.unexport(name);
                }
                return Err(e)
                    .with_context(|| format!("attaching a loop device to {}", file.display()));
            }
        };
        let path = dev.path().to_path_buf();
        let mut table = self.attachments.lock();
        if table.contains_key(name) {
            drop(table);
            let _ = dev.detach();
            bail!("device {name:?} was attached concurrently");
        }
        table.insert(name.to_string(), Attachment { dev, read_only });
        tracing::info!(device = name, block_device = %path.display(), read_only, "attached");
        Ok(path)
    }

    /// Detaches `name`'s loop device and removes its FUSE file; refused while it is mounted.
    pub fn detach(&self, name: &str) -> Result<()> {
        let a = self
            .attachments
            .lock()
            .remove(name)
            .with_context(|| format!("device {name:?} is not attached"))?;
        // The claim is held across the detach, so no mount can start between the check and
        // the ioctl (the kernel would then only mark the device to clear on its last close
        // and leave it mounted); our last close of it tears the device down.
        let path = a.dev.path().display().to_string();
        let claimed = match claim(a.dev.path()) {
            Ok(Some(c)) => c,
            refused => {
                self.attachments.lock().insert(name.to_string(), a);
                return Err(match refused {
                    Err(e) => anyhow::Error::new(e).context(format!("opening {path} to detach it")),
                    Ok(_) => anyhow::anyhow!(
                        "device {name:?} ({path}) is in use (mounted?); unmount it first"
                    ),
                });
            }
        };
        let detached = a.dev.detach();
        // Our last close tears the device down (it was attached with autoclear), even if
        // the ioctl failed; the FUSE file goes once the kernel has let go of it.
        drop(claimed);
        self.unexport(name);
        detached.with_context(|| format!("detaching the loop device of {name:?}"))?;
        tracing::info!(device = name, "detached");
        Ok(())
    }

    /// Makes an ext4 filesystem with 4096-byte blocks on `name` (its loop device if
    /// attached, else its FUSE file), as the layer store makes its base: inode tables and
    /// journal written at once, so no background thread writes them after the first mount.
    pub fn mkfs(&self, name: &str) -> Result<()> {
        let attached = self
            .attachments
            .lock()
            .get(name)
            .map(|a| a.dev.path().to_path_buf());
        let (target, added) = match attached {
            Some(p) => (p, false),
            None => self.fuse_file(name)?,
        };
        if self.pool.device_info(name)?.read_only {
            bail!("device {name:?} is read-only");
        }
        let made = hpm_layers::store::mkfs_ext4(&target);
        if added {
            self.unexport(name);
        }
        made.with_context(|| format!("making ext4 on {}", target.display()))
    }
}
