//! The exported devices and their open handles, shared by the control plane (add, remove,
//! list) and the FUSE workers.
//!
//! Locking argument (why the daemon's own process may do I/O on a filesystem that sits on one
//! of its devices): a FUSE worker must never wait for anything that waits for a FUSE request.
//! So every lock here is held only for a map lookup or update, never across device I/O and
//! never across anything that can issue a FUSE request:
//!
//! - `handles` (RwLock): open file handle -> entry. The I/O path (read, write, fsync,
//!   fallocate) takes it shared for one lookup, clones the `Arc<Entry>`, and does the device
//!   I/O with no lock of ours held.
//! - `table` (RwLock): the entries by inode, file name and device name. Workers take it shared
//!   for lookups (lookup, getattr, open, readdir); `add` and `remove` take it exclusively for
//!   a map update.
//! - `closed` (Mutex + Condvar): lets `remove` wait for a handle to be released. A worker takes
//!   it only to notify. `remove` holds it while it takes `table` (order: closed -> table),
//!   and releases it while it waits.
//!
//! Open counts: `open` increments an entry's count while holding `table` shared, and `remove`
//! reads it while holding `table` exclusively, so a removed entry is never open. The kernel
//! sends RELEASE asynchronously after the last close (and after a loop device lets go of its
//! backing file), so `remove` right after a `umount` may see the file still open for a moment:
//! hence the waiting variant.

use crate::stats::Counters;
use crate::{name, ExportedDevice};
use hpm_engine::Device;
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Inode of the directory holding the device files.
pub(crate) const ROOT_INO: u64 = 1;

/// One exported device.
pub(crate) struct Entry {
    pub ino: u64,
    pub file_name: String,
    pub device: Device,
    pub added: SystemTime,
    /// Open file handles.
    pub open: AtomicU32,
}

#[derive(Default)]
struct Table {
    /// Ordered by inode, which is also readdir's order.
    by_ino: BTreeMap<u64, Arc<Entry>>,
    by_file: HashMap<String, u64>,
    by_name: HashMap<String, u64>,
}

pub(crate) struct Shared {
    pub mountpoint: PathBuf,
    pub mounted_at: SystemTime,
    pub counters: Counters,
    /// Whether INIT negotiated FUSE over io_uring (see `ring`).
    pub io_uring: AtomicBool,
    table: RwLock<Table>,
    handles: RwLock<HashMap<u64, Arc<Entry>>>,
    /// Never reused, so a stale lookup cannot reach a newer device of the same name.
    next_ino: AtomicU64,
    next_fh: AtomicU64,
    closed: Mutex<()>,
    closed_cv: Condvar,
}

/// Why `open` refused.
pub(crate) enum OpenError {
    NotFound,
    ReadOnly,
}

impl Shared {
    pub fn new(mountpoint: PathBuf) -> Self {
        Self {
            mountpoint,
            mounted_at: SystemTime::now(),
            counters: Counters::default(),
            io_uring: AtomicBool::new(false),
            table: RwLock::default(),
            handles: RwLock::default(),
            next_ino: AtomicU64::new(ROOT_INO + 1),
            next_fh: AtomicU64::new(1),
            closed: Mutex::new(()),
            closed_cv: Condvar::new(),
        }
    }

    pub fn path_of(&self, file_name: &str) -> PathBuf {
        self.mountpoint.join(file_name)
    }

    pub fn add(&self, device: Device) -> io::Result<PathBuf> {
        let dev_name = device.name().to_string();
        let file_name = name::file_name(&dev_name);
        let mut t = self.table.write();
        if t.by_name.contains_key(&dev_name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("device {dev_name:?} is already exported; remove it first"),
            ));
        }
        if let Some(ino) = t.by_file.get(&file_name) {
            let other = t.by_ino[ino].device.name().to_string();
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "device {dev_name:?} maps to file name {file_name:?}, already used by \
                     device {other:?} (two long names with one hash); rename one of them"
                ),
            ));
        }
        let ino = self.next_ino.fetch_add(1, SeqCst);
        let entry = Arc::new(Entry {
            ino,
            file_name: file_name.clone(),
            device,
            added: SystemTime::now(),
            open: AtomicU32::new(0),
        });
        t.by_ino.insert(ino, entry);
        t.by_file.insert(file_name.clone(), ino);
        t.by_name.insert(dev_name, ino);
        Ok(self.path_of(&file_name))
    }

    /// Takes `name` out of the table once no handle is open, waiting up to `wait` for that;
    /// then waits for in-flight metadata requests to drop their reference, and hands the
    /// device back.
    pub fn remove(&self, dev_name: &str, wait: Duration) -> io::Result<Device> {
        let deadline = Instant::now() + wait;
        let mut guard = self.closed.lock();
        let mut entry = loop {
            let open = {
                let mut t = self.table.write();
                let Some(&ino) = t.by_name.get(dev_name) else {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("device {dev_name:?} is not exported"),
                    ));
                };
                let open = t.by_ino[&ino].open.load(SeqCst);
                if open == 0 {
                    let e = t.by_ino.remove(&ino).expect("indexed");
                    t.by_file.remove(&e.file_name);
                    t.by_name.remove(dev_name);
                    break e;
                }
                open
            };
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "device file {} of device {dev_name:?} is open ({open} handles): \
                         detach its loop device (or close it) first",
                        self.path_of(&name::file_name(dev_name)).display()
                    ),
                ));
            }
            self.closed_cv.wait_until(&mut guard, deadline);
        };
        drop(guard);
        // Only lookup/getattr/readdir can still hold a clone (I/O needs an open handle, and
        // there is none): they finish without waiting on anything of ours.
        loop {
            match Arc::try_unwrap(entry) {
                Ok(e) => return Ok(e.device),
                Err(e) => {
                    entry = e;
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
    }

    pub fn list(&self) -> Vec<ExportedDevice> {
        let t = self.table.read();
        let mut v: Vec<_> = t
            .by_ino
            .values()
            .map(|e| ExportedDevice {
                name: e.device.name().to_string(),
                path: self.path_of(&e.file_name),
                file_name: e.file_name.clone(),
                size: e.device.size(),
                read_only: e.device.read_only(),
                open_handles: e.open.load(SeqCst),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn path(&self, dev_name: &str) -> Option<PathBuf> {
        let t = self.table.read();
        let ino = t.by_name.get(dev_name)?;
        Some(self.path_of(&t.by_ino[ino].file_name))
    }

    // ---- worker side ----

    pub fn by_ino(&self, ino: u64) -> Option<Arc<Entry>> {
        self.table.read().by_ino.get(&ino).cloned()
    }

    pub fn by_file(&self, file_name: &str) -> Option<Arc<Entry>> {
        let t = self.table.read();
        t.by_file.get(file_name).map(|ino| t.by_ino[ino].clone())
    }

    /// `(cookie, inode, file name)` of the entries after `cookie` (readdir offsets). Cookies
    /// 1 and 2 are "." and "..", an entry's is its inode + 2: stable while entries come and go.
    pub fn entries_after(&self, cookie: u64) -> Vec<(u64, u64, String)> {
        let t = self.table.read();
        t.by_ino
            .range(cookie.saturating_sub(1)..)
            .map(|(&ino, e)| (ino + 2, ino, e.file_name.clone()))
            .filter(|&(c, _, _)| c > cookie)
            .collect()
    }

    pub fn totals(&self) -> (u64, u64) {
        let t = self.table.read();
        let bytes = t.by_ino.values().map(|e| e.device.size()).sum();
        (bytes, t.by_ino.len() as u64)
    }

    pub fn open(&self, ino: u64, write: bool) -> Result<u64, OpenError> {
        let entry = {
            let t = self.table.read();
            let e = t.by_ino.get(&ino).ok_or(OpenError::NotFound)?;
            if write && e.device.read_only() {
                return Err(OpenError::ReadOnly);
            }
            // Under `table` shared: see the module doc.
            e.open.fetch_add(1, SeqCst);
            e.clone()
        };
        let fh = self.next_fh.fetch_add(1, SeqCst);
        self.handles.write().insert(fh, entry);
        Ok(fh)
    }

    pub fn handle(&self, fh: u64) -> Option<Arc<Entry>> {
        self.handles.read().get(&fh).cloned()
    }

    pub fn release(&self, fh: u64) {
        let Some(e) = self.handles.write().remove(&fh) else {
            return;
        };
        e.open.fetch_sub(1, SeqCst);
        drop(e);
        let _g = self.closed.lock();
        self.closed_cv.notify_all();
    }
}
