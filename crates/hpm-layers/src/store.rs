//! The layer store: image layers and container layers as thin devices of one pool, each
//! holding an ext4 filesystem, mounted on demand. Shared by the Docker graphdriver plugin
//! and the containerd snapshotter.
//!
//! Owns the mapping from layer ids to pool devices, the base volumes, the mountpoints under
//! `home/mnt` and the mount reference counts. Must never cache anything the pool knows:
//! every layer, its size and its parent are read from the pool, so the store survives
//! restarts of the daemon and of dockerd. The only state in memory is which layers are
//! mounted and how many `get`s each has.
//!
//! Layout: layer `ID` is device `<namespace>ID`; a parent-less layer is a snapshot of the
//! base volume `<namespace>.base-<base_size>` (see `base.rs`), a layer with a parent a
//! snapshot of the parent's device. A layer's filesystem is mounted at `home/mnt/ID` and
//! the container sees `home/mnt/ID/rootfs` (devicemapper's pattern: `lost+found` stays
//! outside).
//!
//! Locking: calls on the same id are serialized by a per-id mutex (`locks.rs`); calls on
//! different ids run in parallel. The mount table's mutex is held only to read or update
//! it, never across mkfs, mount, unmount, attach or applying a layer. `create` with a
//! parent holds both ids (in byte order). `diff`, `changes` and `diff_size` do not hold the
//! id mutexes while they walk the trees: they hold mount references (a `get` each, put
//! afterwards), which keep the filesystems mounted and make `remove` refuse with `Busy`.
//!
//! IMPORTANT: this runs in the process that serves the FUSE files under the loop devices.
//! Every call does I/O on those devices (mkfs, mount, untar, unmount), so it must never be
//! made from a FUSE worker thread, and it flushes with `syncfs` on the one filesystem,
//! never the global `sync()`.
//!
//! Behaviour choices, matching devicemapper where Docker relies on it:
//! - `remove` of an unknown id succeeds. Removing a layer that has children is allowed:
//!   snapshots are independent devices, so the children keep their data (Docker's layer
//!   store and containerd only remove a parent after its children anyway).
//! - `put` of a layer that is not mounted succeeds (a release after a restart lost the
//!   count); `get` after `get` only counts and ignores the second mount label.
//! - `apply_diff` ignores `parent`: the layer's device already holds the parent's tree.
//! - A busy unmount (a process still inside) falls back to a lazy one, as devicemapper's
//!   always is; the block device is then detached later, when the layer is next used or
//!   removed, or at `cleanup`.
//! - `open` unmounts (lazily) whatever is mounted under `home/mnt`: it assumes no other
//!   store of the same home is alive. A plugin must keep one store across dockerd
//!   restarts rather than open a second one.

mod base;
mod export;
mod ext4;
pub use ext4::mkfs as mkfs_ext4;
mod info;
mod locks;
mod mounts;
mod names;
mod refcount;

use std::fs;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use hpm_engine::{DeviceInfo, Pool};
use parking_lot::Mutex;

use crate::error::{Error, ErrorKind, Result};
use crate::{apply_layer, Change};
use locks::IdLocks;
use names::{check_id, Names};
use refcount::MountTable;

/// Attaches pool devices as kernel block devices (implemented by the daemon; by hpm-fuse +
/// loopdev in tests). The store attaches a layer's device before mounting it and detaches it
/// after unmounting; it never attaches a device twice.
pub trait BlockDevices: Send + Sync {
    /// Attaches pool device `device`; returns the block device's path (`/dev/loopN`).
    fn attach(&self, device: &str, read_only: bool) -> std::io::Result<PathBuf>;
    /// Detaches pool device `device`, so the pool can remove it; `Ok` if it is not
    /// attached. Fails with `EBUSY` (or [`std::io::ErrorKind::ResourceBusy`]) while the block
    /// device is still in use (a filesystem on it lives on somewhere), and must then leave
    /// it attached.
    fn detach(&self, device: &str) -> std::io::Result<()>;
}

/// The default size of a parent-less layer: 10 GiB, as devicemapper's `dm.basesize`.
pub const DEFAULT_BASE_SIZE: u64 = 10 << 30;

/// The smallest base size accepted: room for ext4's journal and metadata.
pub const MIN_BASE_SIZE: u64 = 16 << 20;

/// The default minimum free space, in percent of the pool's capacity: 10, as
/// devicemapper's `dm.min_free_space`.
pub const DEFAULT_MIN_FREE_SPACE: u8 = 10;

/// Options of [`LayerStore::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Prefix of every device name of this store, e.g. `"docker/"`.
    pub namespace: String,
    /// The store's directory; mountpoints live in `home/mnt/<id>`.
    pub home: PathBuf,
    /// Size of a parent-less layer in bytes (a multiple of 4096, at least
    /// [`MIN_BASE_SIZE`]); default [`DEFAULT_BASE_SIZE`].
    pub base_size: u64,
    /// Where the container root is inside a layer's filesystem; default
    /// [`Layout::RootfsDir`].
    pub layout: Layout,
    /// New layers are refused while less than this percentage of the pool's capacity is
    /// free (0 to 99; 0 never refuses), so that the containers already running keep room
    /// to write, as devicemapper's `dm.min_free_space`; default
    /// [`DEFAULT_MIN_FREE_SPACE`].
    pub min_free_space: u8,
}

/// Where the container root is inside a layer's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// In the directory `rootfs`, with `lost+found` beside it (devicemapper's layout, for
    /// Docker, which mounts layers through the store).
    #[default]
    RootfsDir,
    /// At the filesystem's root, with no `lost+found` (containerd's devmapper layout, for
    /// clients that mount the block device themselves).
    FsRoot,
}

impl StoreOptions {
    /// Options with the default base size.
    pub fn new(namespace: impl Into<String>, home: impl Into<PathBuf>) -> Self {
        Self {
            namespace: namespace.into(),
            home: home.into(),
            base_size: DEFAULT_BASE_SIZE,
            layout: Layout::default(),
            min_free_space: DEFAULT_MIN_FREE_SPACE,
        }
    }
}

/// Layers as thin devices with ext4 filesystems; see the module doc.
pub struct LayerStore {
    pool: Pool,
    devices: Arc<dyn BlockDevices>,
    names: Names,
    base_size: u64,
    layout: Layout,
    min_free_space: u8,
    mnt: PathBuf,
    locks: IdLocks,
    table: Mutex<MountTable>,
}

impl LayerStore {
    /// Opens the store of namespace `opts.namespace` in `pool`. Creates `home/mnt`,
    /// unmounts (lazily) what an earlier run left mounted there, removes its empty
    /// mountpoints, and removes base volumes left unfinished by a crash.
    pub fn open(pool: Pool, devices: Arc<dyn BlockDevices>, opts: StoreOptions) -> Result<Self> {
        if opts.base_size < MIN_BASE_SIZE || !opts.base_size.is_multiple_of(4096) {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "base size {} must be a multiple of 4096 and at least {MIN_BASE_SIZE} bytes",
                    opts.base_size
                ),
            ));
        }
        if opts.min_free_space > 99 {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "minimum free space {}% must be between 0% and 99%",
                    opts.min_free_space
                ),
            ));
        }
        let mnt = opts.home.join("mnt");
        fs::create_dir_all(&mnt)
            .map_err(|e| Error::io(format!("creating {}", mnt.display()), e))?;
        let mnt = mnt
            .canonicalize()
            .map_err(|e| Error::io(format!("resolving {}", mnt.display()), e))?;
        let store = Self {
            pool,
            devices,
            names: Names::new(&opts.namespace),
            base_size: opts.base_size,
            layout: opts.layout,
            min_free_space: opts.min_free_space,
            mnt,
            locks: IdLocks::default(),
            table: Mutex::new(MountTable::default()),
        };
        store.tidy_mounts()?;
        store.remove_partial_bases();
        Ok(store)
    }

    /// Creates layer `id`: a snapshot of `parent`'s device, or with no parent an empty
    /// filesystem (a clone of the base volume, made on first use). With `size` (rounded up
    /// to 4096) the layer is that big: smaller than the parent's (or base) size is refused,
    /// bigger grows the device and its filesystem now.
    pub fn create(&self, id: &str, parent: Option<&str>, size: Option<u64>) -> Result<()> {
        check_id(id)?;
        if let Some(p) = parent {
            check_id(p)?;
            if p == id {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!("layer {id:?} cannot be its own parent"),
                ));
            }
        }
        let _locks = self.locks.lock_pair(id, parent.unwrap_or(id));
        let device = self.names.device(id);
        if self.pool.device_info(&device).is_ok() {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("layer {id:?} already exists"),
            ));
        }
        self.check_free_space(id)?;
        let (current, of_what) = match parent {
            Some(p) => (self.layer_info(p)?.size, format!("parent layer {p:?}")),
            None => (self.base_size, "the store's base size".to_string()),
        };
        let size = match size {
            None => None,
            Some(s) => {
                let s = s
                    .checked_next_multiple_of(4096)
                    .filter(|&s| s >= current)
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::Invalid,
                            format!("layer {id:?}: size {s} bytes cannot be smaller than the base size of {current} bytes (of {of_what})"),
                        )
                    })?;
                (s > current).then_some(s)
            }
        };
        let origin = match parent {
            Some(p) => {
                // A parent put while busy lives on as a filesystem someone still holds (a
                // process inside it, or a mount namespace that copied the mount: a container
                // starting at that moment), and its last writes reach the device only when
                // that filesystem goes. Wait for that; refuse rather than snapshot it early.
                self.release_lingering(p, &self.names.device(p))
                    .map_err(|e| {
                        e.when_busy(|| format!("cannot make layer {id:?} from layer {p:?} yet"))
                    })?;
                // A mounted parent is snapshotted as its disk holds it: flush it first.
                if self.table.lock().mounted.contains_key(p) {
                    mounts::syncfs(&self.mountpoint(p))?;
                }
                self.names.device(p)
            }
            None => self.base_volume(self.base_size)?,
        };
        self.pool
            .snapshot(&origin, &device, false)
            .map_err(|e| engine_error(format!("creating layer {id:?} from {origin:?}"), e))?;
        if let Some(size) = size {
            if let Err(e) = self.grow(&device, size) {
                if let Err(r) = self.pool.remove_device(&device) {
                    tracing::warn!("removing layer {id:?} after failing to grow it: {r}");
                }
                return Err(e);
            }
        }
        tracing::info!(layer = id, parent, size, "created");
        Ok(())
    }

    /// Refuses a new layer `id` with `NoSpace` while less than the minimum free space of the
    /// pool is free: a layer costs little to make, but the containers already running need
    /// the room to write (a full pool fails their writes).
    fn check_free_space(&self, id: &str) -> Result<()> {
        let (capacity, used) = self.pool.space();
        let free = capacity.saturating_sub(used);
        let min = capacity / 100 * u64::from(self.min_free_space);
        if free >= min {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::NoSpace,
            format!(
                "creating layer {id:?}: the pool has {} free of {}, less than its minimum free space of {}% ({}) kept for the containers already running; remove unused containers and images, grow the pool (`hpmapper pool grow`), or lower the minimum free space setting",
                info::human_size(free),
                info::human_size(capacity),
                self.min_free_space,
                info::human_size(min),
            ),
        ))
    }

    /// Removes layer `id` (unknown ids succeed). Refused with `Busy` while it is mounted.
    pub fn remove(&self, id: &str) -> Result<()> {
        check_id(id)?;
        let _lock = self.locks.lock(id);
        if let Some(count) = self.table.lock().mounted.get(id).map(|m| m.count) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("layer {id:?} is mounted ({count} get without put); put it first"),
            ));
        }
        let device = self.names.device(id);
        self.release_lingering(id, &device)?;
        self.unexport_locked(id)?;
        let mp = self.mountpoint(id);
        if mounts::is_mount_point(&mp)? {
            tracing::warn!(
                "unmounting {} before removing layer {id:?}: mounted by someone else",
                mp.display()
            );
            mounts::unmount(&mp)?;
        }
        match self.pool.remove_device(&device) {
            Ok(()) => tracing::info!(layer = id, "removed"),
            Err(e) if e.kind() == hpm_engine::ErrorKind::NotFound => {}
            Err(e) => return Err(engine_error(format!("removing layer {id:?}"), e)),
        }
        match fs::remove_dir(&mp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!("removing mountpoint {}: {e}", mp.display());
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether layer `id` exists.
    pub fn exists(&self, id: &str) -> bool {
        check_id(id).is_ok() && self.pool.device_info(&self.names.device(id)).is_ok()
    }

    /// Every layer's id, sorted.
    pub fn layers(&self) -> Vec<String> {
        self.pool
            .list_devices()
            .iter()
            .filter_map(|d| self.names.layer_of(&d.name))
            .collect()
    }

    /// Layer `id`'s parent, read from its device's origin; `None` for a parent-less layer
    /// or when the parent has been removed since.
    pub fn parent(&self, id: &str) -> Result<Option<String>> {
        Ok(self.parent_of(&self.layer_info(id)?))
    }

    /// Applies the uncompressed layer tar `tar` to layer `id` (mounting it meanwhile) and
    /// returns the sum of the entries' sizes. A tar that reaches outside the layer's root
    /// is refused ([`ErrorKind::Escape`]) and writes nothing outside it.
    pub fn apply_diff(&self, id: &str, parent: Option<&str>, tar: impl Read) -> Result<u64> {
        let _ = parent;
        check_id(id)?;
        let _lock = self.locks.lock(id);
        let rootfs = self.get_locked(id, "")?;
        let applied = apply_layer(&rootfs, tar).and_then(|n| mounts::syncfs(&rootfs).map(|()| n));
        let put = self.put_locked(id);
        let size = applied?;
        put?;
        Ok(size)
    }

    /// Writes the changes of layer `id` against `parent` (none: everything) as a layer tar.
    pub fn diff(&self, id: &str, parent: Option<&str>, out: impl Write) -> Result<()> {
        let (layer, parent) = self.trees(id, parent)?;
        let changes = crate::changes(layer.rootfs(), parent.as_ref().map(|p| p.rootfs()))?;
        crate::export_changes(layer.rootfs(), &changes, out)?;
        Ok(())
    }

    /// The changes of layer `id` against `parent` (none: everything), sorted by path.
    pub fn changes(&self, id: &str, parent: Option<&str>) -> Result<Vec<Change>> {
        let (layer, parent) = self.trees(id, parent)?;
        crate::changes(layer.rootfs(), parent.as_ref().map(|p| p.rootfs()))
    }

    /// Bytes of the files added or modified in layer `id` against `parent`.
    pub fn diff_size(&self, id: &str, parent: Option<&str>) -> Result<u64> {
        let (layer, parent) = self.trees(id, parent)?;
        crate::diff_size(layer.rootfs(), parent.as_ref().map(|p| p.rootfs()))
    }

    /// Where layer `id`'s filesystem is mounted while it is: `home/mnt/<id>`.
    pub fn mountpoint(&self, id: &str) -> PathBuf {
        self.mnt.join(id)
    }

    /// Layer `id`'s pool device: its name, size, and the bytes it maps and owns alone.
    pub fn info(&self, id: &str) -> Result<DeviceInfo> {
        self.layer_info(id)
    }

    fn layer_info(&self, id: &str) -> Result<DeviceInfo> {
        check_id(id)?;
        self.pool
            .device_info(&self.names.device(id))
            .map_err(|e| match e.kind() {
                hpm_engine::ErrorKind::NotFound => {
                    Error::new(ErrorKind::NotFound, format!("layer {id:?} does not exist"))
                }
                _ => engine_error(format!("reading the device of layer {id:?}"), e),
            })
    }

    fn parent_of(&self, info: &DeviceInfo) -> Option<String> {
        let parent = self.names.layer_of(info.origin.as_deref()?)?;
        self.exists(&parent).then_some(parent)
    }
}

/// An engine error as ours, with `context` saying what the store was doing.
fn engine_error(context: impl Into<String>, e: hpm_engine::Error) -> Error {
    use hpm_engine::ErrorKind as E;
    let kind = match e.kind() {
        E::NotFound => ErrorKind::NotFound,
        E::Exists => ErrorKind::Exists,
        E::Busy => ErrorKind::Busy,
        E::NoSpace => ErrorKind::NoSpace,
        E::Invalid => ErrorKind::Invalid,
        E::ReadOnly => ErrorKind::ReadOnly,
        E::Unsupported => ErrorKind::Unsupported,
        _ => ErrorKind::Io,
    };
    Error::with_source(kind, context, std::io::Error::other(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<LayerStore>();
    }

    #[test]
    fn engine_kinds_map_to_ours() {
        use hpm_engine::ErrorKind as E;
        let table = [
            (E::NotFound, ErrorKind::NotFound),
            (E::Exists, ErrorKind::Exists),
            (E::Busy, ErrorKind::Busy),
            (E::NoSpace, ErrorKind::NoSpace),
            (E::Invalid, ErrorKind::Invalid),
            (E::ReadOnly, ErrorKind::ReadOnly),
            (E::Unsupported, ErrorKind::Unsupported),
            (E::Io, ErrorKind::Io),
            (E::Corrupt, ErrorKind::Io),
        ];
        for (engine, ours) in table {
            let e = engine_error("doing x", hpm_engine::Error::new(engine, "because y"));
            assert_eq!(e.kind(), ours, "{engine:?}");
            assert_eq!(e.to_string(), "doing x: because y");
        }
    }
}
