//! Mounting layers on demand: reference-counted `get`/`put` (the first `get` attaches and
//! mounts, the last `put` unmounts and detaches), and `cleanup` at shutdown.
//!
//! Owns the mount table, the only state of the store not in the pool. An entry is added
//! only after the mount succeeded and removed only after the unmount did, always under the
//! layer's id mutex; the table mutex itself is held just to read or change an entry.
//! A layer unmounted lazily (busy) whose block device could not be detached is remembered
//! as lingering: its next `get` mounts that same block device again instead of attaching a
//! second one, and `remove` refuses until the device can be detached.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::base::{ensure_rootfs, ROOTFS};
use super::mounts::{self, Unmounted};
use super::names::check_id;
use super::{LayerStore, Layout};
use crate::error::{Error, ErrorKind, Result};

/// Pauses between the tries of a busy detach: about 3.5 s in all.
const DETACH_PAUSES_MS: &[u64] = &[10, 50, 100, 200, 400, 800, 1000, 1000];

/// Which layers are mounted.
#[derive(Default)]
pub(super) struct MountTable {
    /// Mounted layers by id.
    pub(super) mounted: HashMap<String, Mounted>,
    /// Layers unmounted lazily whose block device is still attached, by id.
    lingering: HashMap<String, PathBuf>,
    /// Layers whose block device is handed out (`export`), by id: (device, read-only).
    pub(super) exported: HashMap<String, (PathBuf, bool)>,
}

/// One mounted layer.
pub(super) struct Mounted {
    /// `get`s not yet matched by a `put`; at least 1.
    pub(super) count: u32,
    /// The block device mounted.
    pub(super) block: PathBuf,
}

impl LayerStore {
    /// Mounts layer `id` at `home/mnt/<id>` unless it is already, counts one reference, and
    /// returns its `rootfs` directory. `mount_label` (SELinux context, may be empty) applies
    /// to the first `get` only.
    pub fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf> {
        check_id(id)?;
        let _lock = self.locks.lock(id);
        self.get_locked(id, mount_label)
    }

    /// Drops one reference of layer `id`; the last unmounts it and detaches its block
    /// device. A layer that is not mounted is left alone.
    pub fn put(&self, id: &str) -> Result<()> {
        check_id(id)?;
        let _lock = self.locks.lock(id);
        self.put_locked(id)
    }

    /// How many `get`s of layer `id` are not yet matched by a `put` (0: not mounted).
    pub fn mount_count(&self, id: &str) -> u32 {
        self.table.lock().mounted.get(id).map_or(0, |m| m.count)
    }

    /// Unmounts every layer whatever its count and detaches its block device, exported ones
    /// too (daemon shutdown); the layers keep their data. Fails, after trying them all, naming the
    /// layers that stay mounted or attached.
    pub fn cleanup(&self) -> Result<()> {
        let ids: Vec<String> = {
            let t = self.table.lock();
            t.mounted
                .keys()
                .chain(t.lingering.keys())
                .chain(t.exported.keys())
                .cloned()
                .collect()
        };
        let (mut failed, mut busy) = (Vec::new(), Vec::new());
        for id in ids {
            let _lock = self.locks.lock(&id);
            let device = self.names.device(&id);
            let mounted = self.table.lock().mounted.get(&id).map(|m| m.block.clone());
            if let Some(block) = mounted {
                sync_before_unmount(&id, &self.mountpoint(&id));
                match mounts::unmount(&self.mountpoint(&id)) {
                    Ok(how) => {
                        self.table.lock().mounted.remove(&id);
                        self.release_block(&id, &device, block, how);
                    }
                    Err(e) => {
                        tracing::warn!("at cleanup, layer {id:?} stays mounted: {e}");
                        failed.push(id);
                        continue;
                    }
                }
            }
            match self.release_once(&id) {
                Ok(true) => {}
                Ok(false) => busy.push(id),
                Err(e) => {
                    tracing::warn!("at cleanup, layer {id:?}: {e}");
                    failed.push(id);
                }
            }
        }
        // What is still busy gets the patience of one detach in all, not each (a shutdown
        // with many running containers must not take minutes).
        for &ms in DETACH_PAUSES_MS {
            if busy.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(ms));
            busy.retain(|id| {
                let _lock = self.locks.lock(id);
                match self.release_once(id) {
                    Ok(done) => !done,
                    Err(e) => {
                        tracing::warn!("at cleanup, layer {id:?}: {e}");
                        failed.push(id.clone());
                        false
                    }
                }
            });
        }
        failed.extend(busy);
        if failed.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Busy,
            format!("layers {failed:?} stay mounted or attached: processes still use them; stop them and clean up again"),
        ))
    }

    /// Undoes what a crashed run left under `mnt`: lazily unmounts every mount (nothing of
    /// this run is mounted yet) and removes the empty mountpoints.
    pub(super) fn tidy_mounts(&self) -> Result<()> {
        for mp in mounts::mounts_under(&self.mnt)? {
            if mp == self.mnt {
                continue;
            }
            tracing::warn!(
                "lazily unmounting {}, left mounted by an earlier run",
                mp.display()
            );
            if let Err(e) = mounts::lazy_unmount(&mp) {
                tracing::warn!("{e}");
            }
        }
        let entries = std::fs::read_dir(&self.mnt)
            .map_err(|e| Error::io(format!("listing {}", self.mnt.display()), e))?;
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                // Never remove_dir_all: a directory with files is not ours to delete.
                if let Err(e) = std::fs::remove_dir(entry.path()) {
                    tracing::warn!("leaving {}: {e}", entry.path().display());
                }
            }
        }
        Ok(())
    }

    /// [`LayerStore::get`] with the id mutex held.
    pub(super) fn get_locked(&self, id: &str, label: &str) -> Result<PathBuf> {
        let mp = self.mountpoint(id);
        let rootfs = match self.layout {
            Layout::RootfsDir => mp.join(ROOTFS),
            Layout::FsRoot => mp.clone(),
        };
        {
            let mut t = self.table.lock();
            if let Some(m) = t.mounted.get_mut(id) {
                m.count += 1;
                return Ok(rootfs);
            }
            if let Some((block, _)) = t.exported.get(id) {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "layer {id:?} is handed out as block device {}; it cannot be mounted by the store too",
                        block.display()
                    ),
                ));
            }
        }
        let device = self.layer_info(id)?.name;
        std::fs::create_dir_all(&mp)
            .map_err(|e| Error::io(format!("creating mountpoint {}", mp.display()), e))?;
        if mounts::is_mount_point(&mp)? {
            tracing::warn!(
                "{} was mounted by someone else; unmounting it",
                mp.display()
            );
            mounts::unmount(&mp)?;
        }
        let lingering = self.table.lock().lingering.remove(id);
        let block = match lingering.map(|b| (b, self.detach_block(&device))) {
            // Still held: mount that same device, whose filesystem lives on (the kernel
            // hands out the live superblock), never a second device under it.
            Some((block, Err(e))) if e.kind() == ErrorKind::Busy => block,
            Some((block, Err(e))) => {
                self.table.lock().lingering.insert(id.to_string(), block);
                return Err(e);
            }
            Some((_, Ok(()))) | None => self.attach_block(&device)?,
        };
        let mounted = mounts::mount_ext4(&block, &mp, label).and_then(|()| {
            if self.layout == Layout::FsRoot {
                return Ok(());
            }
            ensure_rootfs(&rootfs).inspect_err(|_| {
                let _ = mounts::unmount(&mp);
            })
        });
        if let Err(e) = mounted {
            self.release_block(id, &device, block, Unmounted::Done);
            return Err(e);
        }
        let m = Mounted { count: 1, block };
        tracing::debug!(layer = id, block_device = %m.block.display(), "mounted");
        self.table.lock().mounted.insert(id.to_string(), m);
        Ok(rootfs)
    }

    /// [`LayerStore::put`] with the id mutex held.
    pub(super) fn put_locked(&self, id: &str) -> Result<()> {
        let block = {
            let mut t = self.table.lock();
            match t.mounted.get_mut(id) {
                Some(m) if m.count > 1 => {
                    m.count -= 1;
                    return Ok(());
                }
                Some(m) => m.block.clone(),
                None => {
                    drop(t);
                    // Fails for an unknown layer; a known one is simply not mounted.
                    self.layer_info(id)?;
                    tracing::debug!(layer = id, "put of a layer that is not mounted");
                    return Ok(());
                }
            }
        };
        // On failure the layer stays mounted with its last reference.
        let mp = self.mountpoint(id);
        // Each step timed for the debug log: the last put of a container's init layer is on
        // the path of every container start.
        let ms = |from: std::time::Instant, to: std::time::Instant| (to - from).as_secs_f64() * 1e3;
        let start = std::time::Instant::now();
        sync_before_unmount(id, &mp);
        let synced = std::time::Instant::now();
        let how = mounts::unmount(&mp)?;
        let unmounted = std::time::Instant::now();
        self.table.lock().mounted.remove(id);
        self.release_block(id, &self.names.device(id), block, how);
        tracing::debug!(
            layer = id,
            sync_ms = ms(start, synced),
            umount_ms = ms(synced, unmounted),
            detach_ms = ms(unmounted, std::time::Instant::now()),
            "unmounted"
        );
        Ok(())
    }

    /// Takes a reference on layer `id` and on `parent` if any, for reading both trees.
    pub(super) fn trees(
        &self,
        id: &str,
        parent: Option<&str>,
    ) -> Result<(MountRef<'_>, Option<MountRef<'_>>)> {
        let layer = MountRef::new(self, id)?;
        let parent = parent.map(|p| MountRef::new(self, p)).transpose()?;
        Ok((layer, parent))
    }

    /// Attaches pool device `device` read-write through [`super::BlockDevices`].
    pub(super) fn attach_block(&self, device: &str) -> Result<PathBuf> {
        self.devices
            .attach(device, false)
            .map_err(|e| Error::io(format!("attaching device {device:?} as a block device"), e))
    }

    /// Detaches pool device `device`; [`ErrorKind::Busy`] while it is in use.
    pub(super) fn detach_block(&self, device: &str) -> Result<()> {
        self.devices
            .detach(device)
            .map_err(|e| Error::io(format!("detaching the block device of {device:?}"), e))
    }

    /// [`Self::detach_block`], retried for about 3.5 s while the device is busy: a lazy
    /// unmount completes when its last user lets go, usually within moments of a container's
    /// exit, and a mount namespace that copied the mount (a container being set up at the
    /// moment of the unmount) drops it within moments too.
    pub(super) fn detach_patiently(&self, device: &str) -> Result<()> {
        let mut pauses = DETACH_PAUSES_MS.iter();
        loop {
            match self.detach_block(device) {
                Err(e) if e.kind() == ErrorKind::Busy => match pauses.next() {
                    Some(&ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
                    None => return Err(e),
                },
                done => return done,
            }
        }
    }

    /// One try at detaching layer `id`'s lingering or exported block device (the id mutex
    /// held): whether it is gone now (or there was none), `false` while it is busy.
    fn release_once(&self, id: &str) -> Result<bool> {
        let held = {
            let t = self.table.lock();
            t.lingering.contains_key(id) || t.exported.contains_key(id)
        };
        if !held {
            return Ok(true);
        }
        match self.detach_block(&self.names.device(id)) {
            Ok(()) => {
                let mut t = self.table.lock();
                t.lingering.remove(id);
                t.exported.remove(id);
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::Busy => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Detaches the block device of layer `id` after it was unmounted; if that fails (a lazy
    /// unmount still holds it), remembers it as lingering.
    fn release_block(&self, id: &str, device: &str, block: PathBuf, how: Unmounted) {
        if how == Unmounted::Lazily {
            tracing::warn!("layer {id:?} was busy and is unmounted lazily: processes still use it");
        }
        if let Err(e) = self.detach_block(device) {
            tracing::warn!("{e}; retried when the layer is next used");
            self.table.lock().lingering.insert(id.to_string(), block);
        }
    }

    /// Detaches the lingering block device of layer `id`, if any; `Busy` if it still cannot
    /// after [`Self::detach_patiently`].
    pub(super) fn release_lingering(&self, id: &str, device: &str) -> Result<()> {
        let Some(block) = self.table.lock().lingering.remove(id) else {
            return Ok(());
        };
        self.detach_patiently(device).map_err(|e| {
            self.table.lock().lingering.insert(id.to_string(), block);
            e.when_busy(|| format!("layer {id:?} is unmounted but its filesystem is still in use (a process inside it, or another mount namespace holding it)"))
        })
    }
}

/// Writes layer `id`'s filesystem at `mp` to its device before it is unmounted: if a mount
/// namespace copied the mount (a container being set up at that moment), the unmount leaves
/// the filesystem alive there, and it would write back only when that lets go. Best effort:
/// the unmount writes back too, and reports what it cannot.
fn sync_before_unmount(id: &str, mp: &Path) {
    if let Err(e) = mounts::syncfs(mp) {
        tracing::warn!("layer {id:?}: {e}; unmounting anyway");
    }
}

/// One `get` of a layer, `put` when dropped (errors are logged).
pub(super) struct MountRef<'a> {
    store: &'a LayerStore,
    id: String,
    rootfs: PathBuf,
}

impl<'a> MountRef<'a> {
    fn new(store: &'a LayerStore, id: &str) -> Result<Self> {
        let rootfs = store.get(id, "")?;
        Ok(Self {
            store,
            id: id.to_string(),
            rootfs,
        })
    }

    pub(super) fn rootfs(&self) -> &Path {
        &self.rootfs
    }
}

impl Drop for MountRef<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.store.put(&self.id) {
            tracing::warn!("releasing layer {:?} after reading it: {e}", self.id);
        }
    }
}
