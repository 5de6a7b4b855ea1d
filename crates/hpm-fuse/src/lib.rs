//! FUSE export: one regular file per attached device in a directory we mount, so that a loop
//! device (see `hpm_io::loopdev`) can turn each device into a kernel block device on any Linux
//! with FUSE and loop.
//!
//! This crate owns the mount, the directory of device files and the request handlers. It must
//! never reach into the engine (it uses `hpm_engine::Device` only), never cache data (direct
//! I/O, no writeback cache), and never make a FUSE worker wait for the control plane: the
//! daemon's own threads may do I/O on a filesystem that sits on one of its devices (mkfs,
//! untar, fsync) while the workers serve it, in the same process.
//!
//! How a daemon uses it:
//!
//! ```no_run
//! # fn demo(pool: &hpm_engine::Pool) -> std::io::Result<()> {
//! use hpm_fuse::{FuseExport, FuseOptions};
//! let export = FuseExport::mount("/run/hpmapper/dev".as_ref(), &FuseOptions::default())?;
//! let dev = pool.open_device("default/1/sha256:ab").map_err(std::io::Error::other)?;
//! let file = export.add(dev)?; // /run/hpmapper/dev/default%2F1%2Fsha256%3Aab
//! let lo = hpm_io::loopdev::attach(&file, false)?; // direct I/O, 4096-byte blocks, autoclear
//! // mkfs / mount lo.path() ..., then drop `lo`: the mount keeps the loop device alive and
//! // the device detaches by itself after umount.
//! drop(lo);
//! // ... umount ...
//! let dev = export.remove_timeout("default/1/sha256:ab", std::time::Duration::from_secs(5))?;
//! drop(dev); // now the engine can delete the device
//! export.unmount()?;
//! # Ok(()) }
//! ```
//!
//! Shutdown: [`FuseExport::unmount`] (or drop) unmounts and joins the workers when no device
//! file is open; the unmount is forced then, which ends the connection also for copies of
//! the mount that other mount namespaces made meanwhile (their users see it gone). Should
//! the connection still live on after an unmount (a file open through such a copy), the
//! workers are waited for 10 s and then left running, with a warning. If a
//! file is open (a loop device still attached), the mount is detached lazily
//! instead: it leaves the namespace at once, the workers keep serving the open files until
//! the last one is closed and then end by themselves. If the process exits meanwhile, every
//! loop device and mount on top gets I/O errors, so detach loop devices first.

mod dev;
mod fs;
mod name;
mod ring;
mod stats;
mod table;
mod wire;

pub use name::{device_name, file_name};
pub use stats::FuseStats;

use hpm_engine::Device;
use rustix::mount::{unmount, UnmountFlags};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use table::Shared;

/// The default number of FUSE worker threads (see [`FuseOptions::threads`]).
pub const DEFAULT_THREADS: u16 = 16;

/// Options of [`FuseExport::mount`].
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// FUSE worker threads, each reading requests from its own `/dev/fuse` descriptor
    /// (`FUSE_DEV_IOC_CLONE`). Requests are handled synchronously, so this is also the number
    /// of device requests in flight. Default 16: with 8, fio's 4 KiB random reads at queue
    /// depth 16 on ext4 over loop ran at 0.8x (24.6k-29.4k IOPS against 32.1k-36.3k with 16,
    /// four interleaved runs; 32 or 64 threads: no more).
    pub threads: usize,
    /// Largest read or write request in bytes (`max_write`; `max_pages` follows). Default
    /// 1 MiB, the loop driver's practical request size.
    pub max_write: u32,
    /// Let users other than the mounting one use the files (`allow_other`). Default off: the
    /// daemon and the kernel's loop driver act as root.
    pub allow_other: bool,
    /// Source name shown in /proc/mounts. Default "hpmapper".
    pub fs_name: String,
    /// Serve requests over io_uring (FUSE_OVER_IO_URING) when the kernel allows it (Linux
    /// 6.14+ with `fuse.enable_uring=1`): per CPU up to `threads` workers (see
    /// `ring_workers_per_queue`), and one `/dev/fuse` thread for what still comes that way.
    /// Otherwise, or if off, `threads` workers read `/dev/fuse`. Default off (the kernel
    /// side is new, and off by default itself); on a 2-vCPU VM it made 4 KiB reads through
    /// loop faster at queue depth 1 and changed nothing measurable at depth 16
    /// (docs/benchmarks.md, "FUSE over io_uring").
    pub io_uring: bool,
}

/// The fewest io_uring workers per CPU queue (see [`FuseOptions::io_uring`]): two kept on
/// the queue's CPU and one free to move.
pub const MIN_RING_WORKERS: usize = ring::MIN_WORKERS_PER_QUEUE;

/// Workers per CPU queue: `threads` each (a queue's workers bound the requests of that CPU
/// in flight, and the loop driver makes nearly all of a device's requests on one CPU at a
/// time), but no more than 4 x `threads` in all, and at least [`MIN_RING_WORKERS`].
fn ring_workers_per_queue(threads: usize, queues: u16) -> usize {
    let queues = usize::from(queues.max(1));
    threads.min(4 * threads / queues).max(MIN_RING_WORKERS)
}

impl Default for FuseOptions {
    fn default() -> Self {
        Self {
            threads: usize::from(DEFAULT_THREADS),
            max_write: 1 << 20,
            allow_other: false,
            fs_name: "hpmapper".to_string(),
            io_uring: false,
        }
    }
}

/// One exported device, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedDevice {
    /// Device name.
    pub name: String,
    /// Its file name in the export directory (see [`file_name`]).
    pub file_name: String,
    /// Full path of the file.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Whether the file refuses writes.
    pub read_only: bool,
    /// Open handles of the file (a loop device holds one).
    pub open_handles: u32,
}

/// A mounted FUSE export. Dropping it unmounts (lazily if files are open).
pub struct FuseExport {
    shared: Arc<Shared>,
    session: Option<JoinHandle<io::Result<()>>>,
    /// The io_uring workers, if INIT negotiated it; they end when the connection does.
    ring_workers: Vec<JoinHandle<()>>,
    io_flusher: bool,
}

impl FuseExport {
    /// Mounts an empty export directory at `mountpoint` (created if missing) and starts the
    /// worker threads. A stale FUSE mount left there by a crashed process (`ENOTCONN`) is
    /// detached first. Needs root (or `/dev/fuse` access and `fusermount3`).
    pub fn mount(mountpoint: &Path, opts: &FuseOptions) -> io::Result<FuseExport> {
        clear_stale_mount(mountpoint);
        std::fs::create_dir_all(mountpoint).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("creating FUSE mount point {}: {e}", mountpoint.display()),
            )
        })?;
        let mountpoint = mountpoint.canonicalize()?;
        let ring_queues = if !opts.io_uring {
            None
        } else if !ring::kernel_enabled() {
            tracing::warn!(
                "FUSE over io_uring asked for, but the kernel does not allow it ({} is not Y, \
                 or the kernel is older than 6.14): serving through /dev/fuse",
                ring::KERNEL_PARAM
            );
            None
        } else {
            ring::queue_count()
                .map_err(|e| tracing::warn!("FUSE over io_uring not used: {e}"))
                .ok()
        };
        match Self::mount_at(&mountpoint, opts, ring_queues)? {
            Ok(export) => Ok(export),
            Err(e) => {
                tracing::warn!("FUSE over io_uring failed ({e}); serving through /dev/fuse");
                Self::mount_at(&mountpoint, opts, None)?
            }
        }
    }

    /// Mounts with io_uring workers for `ring_queues` CPU queues (if INIT negotiates it).
    /// The inner error: the rings failed to start, and the export is unmounted again.
    fn mount_at(
        mountpoint: &Path,
        opts: &FuseOptions,
        ring_queues: Option<u16>,
    ) -> io::Result<io::Result<FuseExport>> {
        let shared = Arc::new(Shared::new(mountpoint.to_path_buf()));
        let fs = fs::DeviceFs::new(shared.clone(), opts.max_write, ring_queues.is_some());
        let ring_fs = fs.clone();
        let fs_dev = fs.clone();
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(opts.fs_name.clone()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoExec,
            fuser::MountOption::NoAtime,
        ];
        config.acl = if opts.allow_other {
            fuser::SessionACL::All
        } else {
            fuser::SessionACL::Owner
        };
        // With io_uring, only FORGET and INTERRUPT still come through /dev/fuse, read by
        // fuser's one thread; without, fuser only mounts and answers INIT, and our own
        // workers (`dev`) read /dev/fuse.
        config.n_threads = Some(1);
        // Mounts and answers the kernel's INIT before returning.
        let session = fuser::Session::new(fs, mountpoint, &config).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("mounting the FUSE export at {}: {e}", mountpoint.display()),
            )
        })?;
        let ring_workers = match ring_queues {
            Some(queues) if shared.io_uring.load(std::sync::atomic::Ordering::Relaxed) => {
                let per_queue = ring_workers_per_queue(opts.threads, queues);
                // The kernel refuses a payload buffer smaller than the largest request.
                let payload = (opts.max_write as usize).max(1 << 20);
                let started = std::os::fd::AsFd::as_fd(&session)
                    .try_clone_to_owned()
                    .and_then(|dev| {
                        let access = access(opts.allow_other);
                        ring::start(&ring_fs, dev, queues, per_queue, payload, access)
                    });
                match started {
                    Ok(workers) => {
                        tracing::info!(
                            queues,
                            per_queue,
                            "FUSE requests over io_uring: {per_queue} workers per CPU"
                        );
                        workers
                    }
                    // Dropping the session unmounts; workers already started end with it.
                    Err(e) => return Ok(Err(e)),
                }
            }
            // Not to be left with the one /dev/fuse thread.
            Some(_) => return Ok(Err(io::Error::other("the kernel did not offer it at INIT"))),
            None => Vec::new(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let dev_threads = if ring_workers.is_empty() {
            opts.threads.max(1)
        } else {
            0
        };
        let (max_write, access) = (opts.max_write, access(opts.allow_other));
        let session = std::thread::Builder::new()
            .name("hpm-fuse".to_string())
            .spawn(move || {
                // IMPORTANT: before the workers exist, so that they inherit the state (the
                // kernel copies PF_MEMALLOC_NOIO to threads created afterwards).
                let r = hpm_io::set_io_flusher();
                if let Err(e) = &r {
                    tracing::warn!(
                        "FUSE workers run without PR_SET_IO_FLUSHER ({e}): under memory \
                         pressure, writeback to loop devices on this export can deadlock; \
                         run as root with CAP_SYS_RESOURCE on Linux 5.6+"
                    );
                }
                let flusher = r.is_ok();
                if dev_threads == 0 {
                    let _ = tx.send((flusher, Ok(())));
                    return session.run();
                }
                let fd = std::os::fd::AsFd::as_fd(&session);
                match dev::start(&fs_dev, fd, dev_threads, max_write, access) {
                    Ok(workers) => {
                        let _ = tx.send((flusher, Ok(())));
                        let panicked = workers.into_iter().filter_map(|w| w.join().err()).count();
                        // Dropped once the connection has ended: its unmount finds nothing.
                        drop(session);
                        if panicked > 0 {
                            return Err(io::Error::other("a FUSE worker thread panicked"));
                        }
                        Ok(())
                    }
                    Err(e) => {
                        let _ = tx.send((flusher, Err(e)));
                        Ok(())
                    }
                }
            })?;
        let (io_flusher, started) = rx.recv().unwrap_or_else(|_| {
            (
                false,
                Err(io::Error::other("the FUSE session thread panicked")),
            )
        });
        if let Err(e) = started {
            // The session thread has dropped the session, which unmounted the export.
            let _ = session.join();
            return Err(e);
        }
        Ok(Ok(FuseExport {
            shared,
            session: Some(session),
            ring_workers,
            io_flusher,
        }))
    }

    /// How many io_uring workers serve the requests (0: all come through `/dev/fuse`).
    pub fn io_uring_workers(&self) -> usize {
        self.ring_workers.len()
    }

    /// Whether the worker threads are in the `IO_FLUSHER` state (see
    /// `hpm_io::set_io_flusher`). False when the process lacks `CAP_SYS_RESOURCE` (some
    /// containers drop it even for root) or the kernel is older than 5.6; the export works,
    /// but writeback under memory pressure could then deadlock.
    pub fn io_flusher(&self) -> bool {
        self.io_flusher
    }

    /// The export directory.
    pub fn mountpoint(&self) -> &Path {
        &self.shared.mountpoint
    }

    /// Exports `device` as a file; returns its path. Fails with `AlreadyExists` if a device
    /// of that name (or one mapping to the same file name) is exported; the handle is then
    /// dropped.
    pub fn add(&self, device: Device) -> io::Result<PathBuf> {
        self.shared.add(device)
    }

    /// Takes device `name` out of the export and hands its handle back. Fails with
    /// `ResourceBusy` (`EBUSY`) while its file is open. The kernel releases a file
    /// asynchronously after its last close (a loop device's after it detaches), so right
    /// after a `umount` prefer [`FuseExport::remove_timeout`].
    pub fn remove(&self, name: &str) -> io::Result<Device> {
        self.shared.remove(name, Duration::ZERO)
    }

    /// [`FuseExport::remove`], waiting up to `timeout` for the file to be closed.
    pub fn remove_timeout(&self, name: &str, timeout: Duration) -> io::Result<Device> {
        self.shared.remove(name, timeout)
    }

    /// Path of device `name`'s file, if exported.
    pub fn path(&self, name: &str) -> Option<PathBuf> {
        self.shared.path(name)
    }

    /// Every exported device, by name.
    pub fn list(&self) -> Vec<ExportedDevice> {
        self.shared.list()
    }

    /// Request counters since mount.
    pub fn stats(&self) -> FuseStats {
        self.shared.counters.snapshot()
    }

    /// Unmounts and waits for the workers to end. If a device file is still open, detaches
    /// the mount lazily (see the crate doc) and returns `ResourceBusy` saying which.
    pub fn unmount(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let mp = &self.shared.mountpoint;
        // With no device file open, a forced unmount: it also ends the connection (the
        // kernel aborts it), which a plain one does not while another mount namespace
        // holds a copy of the mount (one made while we were mounted, as a service with a
        // namespace of its own would), and the workers would then wait for requests
        // forever. With a file open, a plain one, which fails and detaches lazily below
        // (the open files stay served).
        let open = self.shared.list().iter().any(|d| d.open_handles > 0);
        let flags = if open {
            UnmountFlags::empty()
        } else {
            UnmountFlags::FORCE
        };
        match unmount(mp, flags) {
            // EINVAL: no longer a mount point (someone unmounted it); the workers have ended.
            Ok(()) | Err(rustix::io::Errno::INVAL) => {
                // The unmount ended the connection, and with it every ring entry; unless a
                // plain one (our count of open files still lagging the kernel's releases)
                // left it alive in another namespace's copy: then the workers are left to
                // end with it, not waited for forever.
                let ring = std::mem::take(&mut self.ring_workers);
                let deadline = Instant::now() + WORKERS_END_WAIT;
                while !(session.is_finished() && ring.iter().all(JoinHandle::is_finished)) {
                    if Instant::now() >= deadline {
                        tracing::warn!(
                            "the FUSE connection of {} lives on after its unmount (another \
                             mount namespace holds a copy of the mount); its workers are \
                             left running",
                            mp.display()
                        );
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let panicked = ring.into_iter().filter_map(|w| w.join().err()).count();
                match session.join() {
                    Ok(r) if panicked == 0 => r,
                    _ => Err(io::Error::other("a FUSE worker thread panicked")),
                }
            }
            Err(e) => {
                let lazy = unmount(mp, UnmountFlags::DETACH);
                // The session thread is left running: it ends when the last file closes.
                drop(session);
                let open: Vec<String> = self
                    .list()
                    .into_iter()
                    .filter(|d| d.open_handles > 0)
                    .map(|d| d.name)
                    .collect();
                let how = match lazy {
                    // A forced unmount aborts the connection before it finds the mount busy
                    // (a file opened since we looked): the open files are not served.
                    Ok(()) if flags.contains(UnmountFlags::FORCE) => {
                        "the connection was aborted (a file was opened as it unmounted): open \
                         files get I/O errors; detached it lazily"
                            .to_string()
                    }
                    Ok(()) => "detached it lazily: open files stay served until closed".to_string(),
                    Err(l) => format!("lazy unmount failed too: {l}"),
                };
                Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!(
                        "unmounting FUSE export {}: {e} (open device files: {open:?}); {how}",
                        mp.display()
                    ),
                ))
            }
        }
    }
}

/// How long an unmount waits for the workers to end once the connection should have
/// ended with it.
const WORKERS_END_WAIT: Duration = Duration::from_secs(10);

impl Drop for FuseExport {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!("{e}");
        }
    }
}

/// fuser's access rule for the export, applied by both transports (see `wire::Access`).
fn access(allow_other: bool) -> wire::Access {
    if allow_other {
        wire::Access::All
    } else {
        wire::Access::Owner(rustix::process::geteuid().as_raw())
    }
}

/// Detaches a FUSE mount whose server is gone (stat fails with `ENOTCONN`).
fn clear_stale_mount(mountpoint: &Path) {
    if let Err(e) = std::fs::metadata(mountpoint) {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            tracing::warn!(
                "detaching the stale FUSE mount at {} (its server exited)",
                mountpoint.display()
            );
            let _ = unmount(mountpoint, UnmountFlags::DETACH);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_workers_cover_a_queue_depth_of_threads_on_small_machines_and_stay_bounded() {
        assert_eq!(ring_workers_per_queue(16, 1), 16);
        assert_eq!(ring_workers_per_queue(16, 2), 16);
        assert_eq!(ring_workers_per_queue(16, 4), 16);
        assert_eq!(ring_workers_per_queue(16, 8), 8);
        assert_eq!(ring_workers_per_queue(16, 64), MIN_RING_WORKERS);
        assert_eq!(ring_workers_per_queue(1, 2), MIN_RING_WORKERS);
    }
}
