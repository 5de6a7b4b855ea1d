//! The layer store's test environment: a pool in a temporary directory, its devices
//! attached as loop devices over the files of a FUSE export (what the daemon does), and
//! requirement checks that fail under CI=true and skip otherwise.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hpm_engine::{Pool, PoolOptions};
use hpm_fuse::{FuseExport, FuseOptions};
use hpm_io::loopdev::{self, LoopDevice};
use hpm_layers::{BlockDevices, LayerStore, Layout, StoreOptions};
use rustix::fs::{Mode, OFlags};

pub const MIB: u64 = 1 << 20;
/// Base size of the tests' stores: small, so mkfs and e2fsck are quick.
pub const BASE: u64 = 256 * MIB;
pub const NAMESPACE: &str = "docker/";

/// Whether this machine can run the store's tests (root, /dev/fuse, loop devices,
/// e2fsprogs). Missing something fails under CI=true and skips with a note otherwise.
pub fn requirements(test: &str) -> bool {
    hpm_testkit::host::require(
        test,
        true,
        &["/dev/fuse", "/dev/loop-control"],
        &["mkfs.ext4", "tune2fs", "resize2fs", "e2fsck", "df"],
    )
}

/// [`BlockDevices`] as the daemon implements it: export the device as a FUSE file, attach a
/// loop device over it; detaching is refused while the block device is in use.
pub struct LoopDevices {
    pool: Pool,
    export: FuseExport,
    loops: Mutex<HashMap<String, LoopDevice>>,
}

impl LoopDevices {
    /// Pool devices attached now.
    pub fn attached(&self) -> Vec<String> {
        let mut v: Vec<String> = self.loops.lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    }

    /// Loop devices backed by pool device `device`'s file, attached by anyone.
    pub fn loops_of(&self, device: &str) -> Vec<u32> {
        let file = self.export.mountpoint().join(hpm_fuse::file_name(device));
        loopdev::find_by_backing_file(&file).unwrap()
    }

    /// Pool devices with a file in the export.
    pub fn exported(&self) -> Vec<String> {
        self.export.list().into_iter().map(|d| d.name).collect()
    }
}

impl BlockDevices for LoopDevices {
    fn attach(&self, device: &str, read_only: bool) -> io::Result<PathBuf> {
        let mut loops = self.loops.lock().unwrap();
        if loops.contains_key(device) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{device:?} is already attached"),
            ));
        }
        let file = match self.export.path(device) {
            Some(f) => f,
            None => self
                .export
                .add(self.pool.open_device(device).map_err(io::Error::other)?)?,
        };
        let lo = loopdev::attach(&file, read_only).inspect_err(|_| {
            let _ = self.export.remove(device);
        })?;
        let path = lo.path().to_path_buf();
        loops.insert(device.to_string(), lo);
        Ok(path)
    }

    fn detach(&self, device: &str) -> io::Result<()> {
        let mut loops = self.loops.lock().unwrap();
        if let Some(lo) = loops.remove(device) {
            // O_EXCL fails with EBUSY while a filesystem holds the device (daemon's check).
            let excl = OFlags::RDONLY | OFlags::EXCL | OFlags::CLOEXEC;
            if let Err(rustix::io::Errno::BUSY) = rustix::fs::open(lo.path(), excl, Mode::empty()) {
                let path = lo.path().display().to_string();
                loops.insert(device.to_string(), lo);
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!("{device:?} ({path}) is in use"),
                ));
            }
            lo.detach()?;
        }
        self.export
            .remove_timeout(device, Duration::from_secs(5))
            .map(drop)
    }
}

/// A pool, its export, and a store on them. Dropping it cleans the store up first.
pub struct Env {
    store: Option<LayerStore>,
    layout: Layout,
    min_free_space: u8,
    pub devices: Arc<LoopDevices>,
    pub pool: Pool,
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env::with_layout(Layout::RootfsDir)
    }

    /// A store whose layers put the container root at `layout`.
    pub fn with_layout(layout: Layout) -> Env {
        Env::build(
            layout,
            2048 * MIB,
            hpm_layers::store::DEFAULT_MIN_FREE_SPACE,
        )
    }

    /// A store on a pool of `capacity` bytes that refuses new layers while less than
    /// `min_free_space` percent of it is free.
    pub fn build(layout: Layout, capacity: u64, min_free_space: u8) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("hpm-store-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let pool = Pool::create(
            &dir.path().join("pool"),
            &PoolOptions {
                capacity: Some(capacity),
                ..Default::default()
            },
        )
        .unwrap();
        let export = FuseExport::mount(&dir.path().join("dev"), &FuseOptions::default()).unwrap();
        let devices = Arc::new(LoopDevices {
            pool: pool.clone(),
            export,
            loops: Mutex::new(HashMap::new()),
        });
        let mut env = Env {
            store: None,
            layout,
            min_free_space,
            devices,
            pool,
            dir,
        };
        env.store = Some(env.open());
        env
    }

    fn open(&self) -> LayerStore {
        let mut opts = StoreOptions::new(NAMESPACE, self.home());
        opts.base_size = BASE;
        opts.layout = self.layout;
        opts.min_free_space = self.min_free_space;
        LayerStore::open(self.pool.clone(), self.devices.clone(), opts).unwrap()
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn store(&self) -> &LayerStore {
        self.store.as_ref().unwrap()
    }

    /// A daemon restart: the old store cleans up and goes, a new one opens on the pool.
    pub fn restart(&mut self) {
        self.store.take().unwrap().cleanup().unwrap();
        self.store = Some(self.open());
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            if let Err(e) = store.cleanup() {
                eprintln!("cleaning up the store: {e}");
            }
        }
        for (_, lo) in self.devices.loops.lock().unwrap().drain() {
            let _ = lo.detach();
        }
    }
}

/// Whether `path` is a mount point now.
pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

/// Size of the filesystem holding `path` in bytes, as `df` reports it.
pub fn df_size(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=size"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "df {}: {out:?}", path.display());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}
