//! Attachments and export servers: FUSE device files, loop devices over them, and the NBD
//! server. (Wired to hpm-fuse and hpm-nbd.)

use super::Daemon;
use anyhow::{bail, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;

/// One device attached as a kernel block device.
pub struct Attachment {
    dev_path: PathBuf,
    read_only: bool,
}

impl Attachment {
    /// /dev/loopN.
    pub fn dev_path(&self) -> PathBuf {
        self.dev_path.clone()
    }
    /// Attached read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

/// Starts the export servers.
pub async fn start_servers(
    _d: &Arc<Daemon>,
    _tasks: &mut tokio::task::JoinSet<Result<()>>,
    _nbd_unix: Option<PathBuf>,
    _nbd_tcp: Option<SocketAddr>,
    _stop: watch::Receiver<bool>,
) -> Result<()> {
    Ok(())
}

/// Counters of the export servers, as (metric name, value).
pub fn server_counters(_d: &Daemon) -> Vec<(String, u64)> {
    Vec::new()
}

/// The export servers' counters, for `status --json`.
pub fn server_counters_json(d: &Daemon) -> serde_json::Map<String, serde_json::Value> {
    server_counters(d)
        .into_iter()
        .map(|(k, v)| (k, v.into()))
        .collect()
}

/// Detaches every attachment at shutdown.
pub fn detach_all(_d: &Daemon) {}

impl Daemon {
    /// Attaches `name` as a loop device; returns /dev/loopN.
    pub fn attach(&self, name: &str, _read_only: bool) -> Result<PathBuf> {
        bail!("attaching {name:?}: not supported yet")
    }
    /// Detaches `name`'s loop device.
    pub fn detach(&self, name: &str) -> Result<()> {
        bail!("detaching {name:?}: not supported yet")
    }
    /// Makes ext4 on `name`.
    pub fn mkfs(&self, name: &str) -> Result<()> {
        bail!("mkfs on {name:?}: not supported yet")
    }
}
