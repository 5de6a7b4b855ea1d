//! Handing a layer's block device to a client that mounts it itself (containerd and its
//! shims mount what the snapshotter's `Mounts` name): attach on `export`, detach on
//! `unexport`.
//!
//! Owns the `exported` part of the mount table. A layer is either mounted by the store
//! (`get`/`put`) or exported, never both, so the store never mounts a filesystem a client
//! may have mounted too. Exports are not counted: the client tells when it is done by
//! unexporting (or by removing the layer). Detaching fails while the client still has the
//! block device mounted; that is reported as `Busy` and the export stays.

use std::path::PathBuf;

use super::names::check_id;
use super::LayerStore;
use crate::error::{Error, ErrorKind, Result};

impl LayerStore {
    /// Attaches layer `id`'s device as a block device for a client to mount, or returns the
    /// one already attached. Asking again with the other `read_only` detaches and attaches
    /// anew (refused with `Busy` while the first is in use). Refused with `Busy` while the
    /// store itself has the layer mounted.
    pub fn export(&self, id: &str, read_only: bool) -> Result<PathBuf> {
        self.export_impl(id, read_only, true)
    }

    /// [`LayerStore::export`], except that a layer exported the other way (read-only or
    /// writable) is refused with `Busy` instead of detached and attached anew: for a client
    /// whose request may be stale (asked about a snapshot that another call has since
    /// committed and handed out read-only), which must never turn that export writable.
    pub fn export_same_mode(&self, id: &str, read_only: bool) -> Result<PathBuf> {
        self.export_impl(id, read_only, false)
    }

    fn export_impl(&self, id: &str, read_only: bool, swap: bool) -> Result<PathBuf> {
        check_id(id)?;
        let _lock = self.locks.lock(id);
        let device = self.layer_info(id)?.name;
        {
            let t = self.table.lock();
            if let Some(m) = t.mounted.get(id) {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "layer {id:?} is mounted by the store ({} get without put); it cannot be handed out too",
                        m.count
                    ),
                ));
            }
            if let Some((block, ro)) = t.exported.get(id) {
                if *ro == read_only {
                    return Ok(block.clone());
                }
                if !swap {
                    let how = |ro: bool| if ro { "read-only" } else { "writable" };
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "layer {id:?} is handed out {} as {}; it is not handed out {} too",
                            how(*ro),
                            block.display(),
                            how(read_only)
                        ),
                    ));
                }
            }
        }
        self.unexport_locked(id)?;
        self.release_lingering(id, &device)?;
        let block = self
            .devices
            .attach(&device, read_only)
            .map_err(|e| Error::io(format!("attaching layer {id:?} as a block device"), e))?;
        tracing::debug!(layer = id, block_device = %block.display(), read_only, "exported");
        self.table
            .lock()
            .exported
            .insert(id.to_string(), (block.clone(), read_only));
        Ok(block)
    }

    /// Detaches layer `id`'s exported block device, if any. `Busy` while it is still in use
    /// (mounted by a client); the export then stays.
    pub fn unexport(&self, id: &str) -> Result<()> {
        check_id(id)?;
        let _lock = self.locks.lock(id);
        self.unexport_locked(id)
    }

    /// The block device layer `id` is exported as, and whether read-only.
    pub fn exported(&self, id: &str) -> Option<(PathBuf, bool)> {
        self.table.lock().exported.get(id).cloned()
    }

    /// [`LayerStore::unexport`] with the id mutex held.
    pub(super) fn unexport_locked(&self, id: &str) -> Result<()> {
        let Some((block, _)) = self.table.lock().exported.get(id).cloned() else {
            return Ok(());
        };
        let device = self.names.device(id);
        // A client's unmount (the shim's, at container exit) may still be completing.
        self.detach_patiently(&device).map_err(|e| {
            e.when_busy(|| {
                format!(
                    "layer {id:?} is still in use as block device {} (mounted?)",
                    block.display()
                )
            })
        })?;
        self.table.lock().exported.remove(id);
        tracing::debug!(layer = id, "unexported");
        Ok(())
    }
}
