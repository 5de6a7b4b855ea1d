//! The daemon's attachments as the layer store's [`BlockDevices`]: shared by the Docker
//! graphdriver and the containerd snapshotter, which attach and detach their layers through
//! the daemon like `hpmapper device attach` does.

use super::Daemon;
use hpm_layers::BlockDevices;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Weak};

/// Attaches devices through the daemon (a weak reference: the daemon owns the front ends
/// that own the store).
pub struct DaemonDevices(Weak<Daemon>);

impl DaemonDevices {
    /// Devices of daemon `d`.
    pub fn new(d: &Arc<Daemon>) -> Self {
        Self(Arc::downgrade(d))
    }

    fn daemon(&self) -> io::Result<Arc<Daemon>> {
        self.0
            .upgrade()
            .ok_or_else(|| io::Error::other("the hpmapper daemon is shutting down"))
    }
}

fn to_io(e: anyhow::Error) -> io::Error {
    let msg = format!("{e:#}");
    let kind = if msg.contains("in use") {
        io::ErrorKind::ResourceBusy
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, msg)
}

impl BlockDevices for DaemonDevices {
    fn attach(&self, device: &str, read_only: bool) -> io::Result<PathBuf> {
        self.daemon()?.attach(device, read_only).map_err(to_io)
    }
    fn detach(&self, device: &str) -> io::Result<()> {
        let d = self.daemon()?;
        if !d.attachments.lock().contains_key(device) {
            return Ok(());
        }
        d.detach(device).map_err(|e| {
            // The store treats EBUSY as "still in use, retry later".
            let e = to_io(e);
            if e.kind() == io::ErrorKind::ResourceBusy {
                io::Error::from_raw_os_error(16)
            } else {
                e
            }
        })
    }
}
