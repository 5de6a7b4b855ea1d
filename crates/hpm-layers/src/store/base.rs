//! The volumes layers are cloned from, and growing a layer.
//!
//! Owns the base volume of each size: an empty ext4 filesystem holding only `lost+found`
//! and an empty `rootfs` directory (the container root, so `lost+found` stays outside it),
//! made once and then only snapshotted. It is made under a `.partial` name and published
//! as a read-only snapshot of that, so a crash half way leaves no base that looks finished;
//! `LayerStore::open` removes the leftover. Must never touch a layer's data other than
//! growing its filesystem.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use super::ext4;
use super::mounts::{self, Unmounted};
use super::names::BASE_PREFIX;
use super::{engine_error, LayerStore, Layout};
use crate::error::{Error, ErrorKind, Result};

/// The container root inside every layer's filesystem.
pub(super) const ROOTFS: &str = "rootfs";

impl LayerStore {
    /// The name of the base volume of `size` bytes, made first if missing.
    pub(super) fn base_volume(&self, size: u64) -> Result<String> {
        let name = self.names.base(size);
        // A key no layer id can be (ids never start with '.'); see `locks` for the order.
        let _base = self.locks.lock(&format!("{BASE_PREFIX}{size}"));
        if self.pool.device_info(&name).is_ok() {
            return Ok(name);
        }
        let partial = self.names.partial_base(size);
        if self.pool.device_info(&partial).is_ok() {
            // Left attached by an attempt whose detach failed (a no-op otherwise).
            self.detach_patiently(&partial)?;
            self.pool
                .remove_device(&partial)
                .map_err(|e| engine_error(format!("removing the unfinished {partial:?}"), e))?;
        }
        tracing::info!(device = %name, size, "making the base volume of new layers");
        self.pool
            .create_device(&partial, size)
            .map_err(|e| engine_error(format!("creating the base volume {partial:?}"), e))?;
        let made = self
            .format_base(&partial, size)
            .and_then(|()| {
                self.pool
                    .snapshot(&partial, &name, true)
                    .map_err(|e| engine_error(format!("publishing the base volume {name:?}"), e))
            })
            .map(|_| ());
        if let Err(e) = self.pool.remove_device(&partial) {
            tracing::warn!(
                "removing {partial:?} after making the base volume: {e}; the next start removes it"
            );
        }
        made.map(|()| name)
    }

    /// Removes every finished base volume of this store (they are made again on demand);
    /// returns how many. For clients that clean up once no layer is left.
    pub fn remove_base_volumes(&self) -> Result<usize> {
        let mut removed = 0;
        for d in self.pool.list_devices() {
            if !self.names.is_base(&d.name) || self.names.is_partial_base(&d.name) {
                continue;
            }
            let key = d.name[self.names.namespace().len()..].to_string();
            let _base = self.locks.lock(&key);
            match self.pool.remove_device(&d.name) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == hpm_engine::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(engine_error(
                        format!("removing the base volume {:?}", d.name),
                        e,
                    ))
                }
            }
        }
        Ok(removed)
    }

    /// Removes base volumes a crash left unfinished.
    pub(super) fn remove_partial_bases(&self) {
        for d in self.pool.list_devices() {
            if self.names.is_partial_base(&d.name) {
                if let Err(e) = self.pool.remove_device(&d.name) {
                    tracing::warn!("removing the unfinished base volume {:?}: {e}", d.name);
                }
            }
        }
    }

    /// mkfs + tune2fs on `device`, then mount it once to make `rootfs`.
    fn format_base(&self, device: &str, size: u64) -> Result<()> {
        let block = self.attach_block(device)?;
        let made = (|| {
            ext4::mkfs(&block)?;
            let mp = self.mnt.join(format!("{BASE_PREFIX}{size}"));
            fs::create_dir_all(&mp)
                .map_err(|e| Error::io(format!("creating mountpoint {}", mp.display()), e))?;
            mounts::mount_ext4(&block, &mp, "")?;
            let made = match self.layout {
                Layout::RootfsDir => make_rootfs(&mp.join(ROOTFS)),
                Layout::FsRoot => clear_root(&mp),
            }
            .and_then(|()| mounts::syncfs(&mp));
            let unmounted = mounts::unmount(&mp);
            made?;
            if unmounted? == Unmounted::Lazily {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("the new base volume at {} was busy while unmounting; someone is using the store's mnt directory", mp.display()),
                ));
            }
            let _ = fs::remove_dir(&mp);
            Ok(())
        })();
        let detached = self.detach_patiently(device);
        made.and(detached)
    }

    /// Grows layer device `device` to `size` bytes and its filesystem with it, before the
    /// layer is first mounted.
    pub(super) fn grow(&self, device: &str, size: u64) -> Result<()> {
        self.pool
            .resize_device(device, size)
            .map_err(|e| engine_error(format!("growing device {device:?} to {size} bytes"), e))?;
        let block = self.attach_block(device)?;
        let grown = ext4::grow(&block);
        let detached = self.detach_patiently(device);
        grown.and(detached)
    }
}

/// `rootfs` with mode 0755 whatever the umask, owned by us (root).
fn make_rootfs(path: &Path) -> Result<()> {
    let what = || format!("creating {}", path.display());
    fs::DirBuilder::new()
        .mode(0o755)
        .create(path)
        .map_err(|e| Error::io(what(), e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(|e| Error::io(what(), e))
}

/// Leaves the root of a new filesystem empty (no `lost+found`) with mode 0755.
fn clear_root(root: &Path) -> Result<()> {
    let lost = root.join("lost+found");
    match fs::remove_dir(&lost) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io(format!("removing {}", lost.display()), e))
        }
        _ => {}
    }
    fs::set_permissions(root, fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io(format!("setting the mode of {}", root.display()), e))
}

/// Creates `rootfs` in a mounted layer that lacks it (made outside this store).
pub(super) fn ensure_rootfs(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => Ok(()),
        Ok(_) => Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "{} is not a directory; the layer's filesystem was not made by this store",
                path.display()
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => make_rootfs(path),
        Err(e) => Err(Error::io(format!("looking at {}", path.display()), e)),
    }
}
