//! Loop devices attached by our own code: direct I/O, 4096-byte logical blocks, autoclear.
//!
//! This module owns the loop ioctls (`/dev/loop-control` `LOOP_CTL_GET_FREE`, `LOOP_CONFIGURE`,
//! the pre-5.8 fallback `LOOP_SET_FD` + `LOOP_SET_STATUS64` + `LOOP_SET_BLOCK_SIZE` +
//! `LOOP_SET_DIRECT_IO`, `LOOP_CLR_FD`, `LOOP_GET_STATUS64`) and reading a loop device's state
//! from sysfs. It must never decide what to attach or when to detach: that is the caller's.
//!
//! Lifetime: devices are attached with `LO_FLAGS_AUTOCLEAR`, so the kernel detaches one by
//! itself when its last opener closes it. A [`LoopDevice`] holds one open descriptor of
//! `/dev/loopN`; keep it until the filesystem on the device is mounted (the mount holds its
//! own reference), then drop it: after `umount` the device disappears. Dropping it before
//! anything else opened the device detaches the device at once.
//!
//! The descriptor we hold is opened read-only on purpose: on kernels built without
//! `CONFIG_BLK_DEV_WRITE_MOUNTED`, mounting a filesystem fails with `EBUSY` while anyone holds
//! the block device open for writing. The loop ioctls need `CAP_SYS_ADMIN`, not a writable
//! descriptor.
//!
//! Races: `LOOP_CTL_GET_FREE` only names a device that is free now; another process can
//! configure it before we do. We then get `EBUSY` and ask for another one, a bounded number
//! of times (containerd's `setupLoop` does the same).

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Logical block size of every device we attach.
pub const BLOCK_SIZE: u32 = 4096;

/// `lo_flags`: the device refuses writes.
pub const LO_FLAGS_READ_ONLY: u32 = 1;
/// `lo_flags`: detach when the last opener closes the device.
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// `lo_flags`: scan the partition table.
pub const LO_FLAGS_PARTSCAN: u32 = 8;
/// `lo_flags`: I/O to the backing file bypasses the page cache.
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;
const LOOP_SET_BLOCK_SIZE: libc::c_ulong = 0x4C09;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

/// How often a free device is asked for when others keep taking it first.
const ATTACH_ATTEMPTS: usize = 32;

const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>` (Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

impl LoopInfo64 {
    const fn zeroed() -> Self {
        Self {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

/// `ioctl(fd, request, arg)` with an integer argument.
fn ioctl_int(fd: BorrowedFd<'_>, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: `fd` is a live descriptor for the duration of the borrow, and every request this
    // module passes here (LOOP_SET_FD, LOOP_CLR_FD, LOOP_SET_DIRECT_IO, LOOP_SET_BLOCK_SIZE,
    // LOOP_CTL_GET_FREE) takes its argument by value, not as a pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// The kernel's loop ioctls that take a pointer to one of our `repr(C)` structs.
trait LoopStruct {}
impl LoopStruct for LoopInfo64 {}
impl LoopStruct for LoopConfig {}

/// `ioctl(fd, request, &mut arg)` where `request` reads or writes exactly one `T`.
fn ioctl_ptr<T: LoopStruct>(
    fd: BorrowedFd<'_>,
    request: libc::c_ulong,
    arg: &mut T,
) -> io::Result<()> {
    // SAFETY: `fd` is live for the borrow; `arg` is a valid, exclusively borrowed `repr(C)`
    // value whose layout matches what `request` reads or writes (LOOP_CONFIGURE:
    // `struct loop_config`; LOOP_SET_STATUS64/LOOP_GET_STATUS64: `struct loop_info64`; sizes
    // asserted above), and the kernel does not keep the pointer after the call returns.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How to configure a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// `LOOP_CONFIGURE`, falling back to `Legacy` only on kernels without it.
    Configure,
    /// `LOOP_SET_FD` then status, block size and direct I/O one by one.
    Legacy,
}

/// An attached loop device and one open descriptor of it.
///
/// Dropping it closes the descriptor; with autoclear the kernel detaches the device when no
/// one else (a mount, another process) holds it open.
#[derive(Debug)]
pub struct LoopDevice {
    file: File,
    number: u32,
    path: PathBuf,
    legacy: bool,
}

/// A loop device's state as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopStatus {
    /// Device number: N of `/dev/loopN`.
    pub number: u32,
    /// Path of the backing file (sysfs `loop/backing_file`, which is not cut at 64 bytes as
    /// `lo_file_name` is).
    pub backing_file: PathBuf,
    /// Raw `lo_flags` (`LO_FLAGS_*`).
    pub flags: u32,
    /// Refuses writes.
    pub read_only: bool,
    /// Detaches when the last opener closes it.
    pub autoclear: bool,
    /// Direct I/O to the backing file is on (sysfs `loop/dio`).
    pub direct_io: bool,
    /// Logical block size in bytes (sysfs `queue/logical_block_size`).
    pub logical_block_size: u32,
    /// Offset into the backing file in bytes.
    pub offset: u64,
    /// Size limit in bytes, 0 for the whole file.
    pub size_limit: u64,
}

/// Attaches `backing` to a free loop device with direct I/O, 4096-byte logical blocks and
/// autoclear (and read-only if asked).
///
/// Uses `LOOP_CONFIGURE` (one atomic ioctl, Linux 5.8+); on older kernels falls back to
/// `LOOP_SET_FD` followed by the separate settings. The kernel turns direct I/O off silently
/// when the backing file cannot do it (a filesystem without `O_DIRECT`, misaligned blocks):
/// check [`LoopDevice::status`] if it matters.
pub fn attach(backing: &Path, read_only: bool) -> io::Result<LoopDevice> {
    attach_with(backing, read_only, Method::Configure)
}

fn attach_with(backing: &Path, read_only: bool, method: Method) -> io::Result<LoopDevice> {
    let file = open_backing(backing, read_only)?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .map_err(|e| context(e, "opening /dev/loop-control (is the loop module loaded?)"))?;
    let mut method = method;
    for _ in 0..ATTACH_ATTEMPTS {
        let n = ioctl_int(control.as_fd(), LOOP_CTL_GET_FREE, 0)
            .map_err(|e| context(e, "asking /dev/loop-control for a free loop device"))?;
        let number = n as u32;
        let path = PathBuf::from(format!("/dev/loop{number}"));
        let dev = match open_loop(&path, !read_only) {
            Ok(f) => f,
            // The node of a device just created (or just removed) by someone else.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENXIO) =>
            {
                continue
            }
            Err(e) => return Err(context(e, &format!("opening {}", path.display()))),
        };
        let r = match method {
            Method::Configure => configure(&dev, &file, read_only),
            Method::Legacy => configure_legacy(&dev, &file),
        };
        match r {
            Ok(()) => return LoopDevice::holding(dev, number, path, method == Method::Legacy),
            // Another process configured this device between GET_FREE and our ioctl.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
            Err(e) if method == Method::Configure && configure_unsupported(&e) => {
                method = Method::Legacy;
                // Retry this same device the old way.
                match configure_legacy(&dev, &file) {
                    Ok(()) => return LoopDevice::holding(dev, number, path, true),
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
                    Err(e) => {
                        return Err(context(
                            e,
                            &format!("attaching {} to {}", backing.display(), path.display()),
                        ))
                    }
                }
            }
            Err(e) => {
                return Err(context(
                    e,
                    &format!("attaching {} to {}", backing.display(), path.display()),
                ))
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::ResourceBusy,
        format!(
            "attaching {}: other processes took every free loop device we were offered \
             ({ATTACH_ATTEMPTS} attempts); retry later",
            backing.display()
        ),
    ))
}

/// Opens the backing file as `losetup --direct-io=on` does: with `O_DIRECT` where the
/// filesystem allows it, so the loop driver's direct I/O starts from a coherent page cache.
fn open_backing(backing: &Path, read_only: bool) -> io::Result<File> {
    let open = |flags| {
        OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC | flags)
            .open(backing)
    };
    match open(libc::O_DIRECT) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(0),
        r => r,
    }
    .map_err(|e| context(e, &format!("opening backing file {}", backing.display())))
}

fn open_loop(path: &Path, write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

fn flags_for(read_only: bool) -> u32 {
    LO_FLAGS_DIRECT_IO | LO_FLAGS_AUTOCLEAR | if read_only { LO_FLAGS_READ_ONLY } else { 0 }
}

fn configure(dev: &File, backing: &File, read_only: bool) -> io::Result<()> {
    let mut info = LoopInfo64::zeroed();
    info.lo_flags = flags_for(read_only);
    let mut config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: BLOCK_SIZE,
        info,
        reserved: [0; 8],
    };
    ioctl_ptr(dev.as_fd(), LOOP_CONFIGURE, &mut config)
}

/// Pre-5.8 kernels: bind, then set each property. Read-only comes from the backing file's
/// open mode. On failure after binding, unbinds again.
fn configure_legacy(dev: &File, backing: &File) -> io::Result<()> {
    ioctl_int(
        dev.as_fd(),
        LOOP_SET_FD,
        backing.as_raw_fd() as libc::c_ulong,
    )?;
    let settle = || -> io::Result<()> {
        let mut info = LoopInfo64::zeroed();
        ioctl_ptr(dev.as_fd(), LOOP_GET_STATUS64, &mut info)?;
        info.lo_flags |= LO_FLAGS_AUTOCLEAR;
        ioctl_ptr(dev.as_fd(), LOOP_SET_STATUS64, &mut info)?;
        ioctl_int(
            dev.as_fd(),
            LOOP_SET_BLOCK_SIZE,
            libc::c_ulong::from(BLOCK_SIZE),
        )?;
        // Like LOOP_CONFIGURE, treat a backing file that cannot do direct I/O as not fatal:
        // the status shows it.
        match ioctl_int(dev.as_fd(), LOOP_SET_DIRECT_IO, 1) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            r => r.map(|_| ()),
        }
    };
    if let Err(e) = settle() {
        let _ = ioctl_int(dev.as_fd(), LOOP_CLR_FD, 0);
        return Err(e);
    }
    Ok(())
}

/// Whether a failed `LOOP_CONFIGURE` means the kernel does not know the ioctl. Unknown loop
/// ioctls fail with `EINVAL` (or `ENOTTY`), which a bad argument also gives, so `EINVAL`
/// counts only on kernels older than 5.8.
fn configure_unsupported(e: &io::Error) -> bool {
    match e.raw_os_error() {
        Some(libc::ENOTTY) => true,
        Some(libc::EINVAL) => kernel_version().is_some_and(|v| v < (5, 8)),
        _ => false,
    }
}

fn kernel_version() -> Option<(u32, u32)> {
    let s = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut it = s.trim().split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn sysfs_path(number: u32, rel: &str) -> PathBuf {
    PathBuf::from(format!("/sys/block/loop{number}/{rel}"))
}

fn read_sysfs(number: u32, rel: &str) -> io::Result<String> {
    let s = fs::read_to_string(sysfs_path(number, rel))?;
    Ok(s.trim_end_matches('\n').to_string())
}

/// The path in sysfs `backing_file`, without the kernel's " (deleted)" mark.
fn backing_of(number: u32) -> io::Result<PathBuf> {
    let raw = fs::read(sysfs_path(number, "loop/backing_file"))?;
    let mut s: &[u8] = &raw;
    if let Some(t) = s.strip_suffix(b"\n") {
        s = t;
    }
    Ok(PathBuf::from(OsStr::from_bytes(s)))
}

impl LoopDevice {
    /// Swaps the descriptor that configured the device for a read-only one to hold (see the
    /// module doc). The kernel makes the device read-only unless it is configured through a
    /// writable descriptor, so configuring needs one; holding one could block the mount.
    fn holding(
        configured: File,
        number: u32,
        path: PathBuf,
        legacy: bool,
    ) -> io::Result<LoopDevice> {
        // `configured` keeps the autoclear device attached until the new descriptor is open.
        let file = open_loop(&path, false)
            .map_err(|e| context(e, &format!("reopening {}", path.display())))?;
        drop(configured);
        Ok(LoopDevice {
            file,
            number,
            path,
            legacy,
        })
    }

    /// Opens the existing loop device `/dev/loop<number>` (to inspect or detach it).
    ///
    /// Careful with autoclear devices: if nothing else holds the device, dropping the handle
    /// detaches it.
    pub fn open(number: u32) -> io::Result<LoopDevice> {
        let path = PathBuf::from(format!("/dev/loop{number}"));
        let file = open_loop(&path, false)
            .map_err(|e| context(e, &format!("opening {}", path.display())))?;
        Ok(LoopDevice {
            file,
            number,
            path,
            legacy: false,
        })
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether [`attach`] had to use the pre-5.8 ioctls because the kernel has no
    /// `LOOP_CONFIGURE`. The result is the same, but the settings were applied one by one
    /// after binding: a process killed in between leaves a bound device without autoclear.
    pub fn attached_legacy(&self) -> bool {
        self.legacy
    }

    /// N of `/dev/loopN`.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The device's state (`LOOP_GET_STATUS64` and sysfs). Fails with `ENXIO` if the device
    /// is not attached.
    pub fn status(&self) -> io::Result<LoopStatus> {
        let mut info = LoopInfo64::zeroed();
        ioctl_ptr(self.file.as_fd(), LOOP_GET_STATUS64, &mut info)
            .map_err(|e| context(e, &format!("reading the status of {}", self.path.display())))?;
        let backing_file = backing_of(self.number).unwrap_or_else(|_| {
            let n = info
                .lo_file_name
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(LO_NAME_SIZE);
            PathBuf::from(OsStr::from_bytes(&info.lo_file_name[..n]))
        });
        let direct_io = match read_sysfs(self.number, "loop/dio") {
            Ok(s) => s.trim() == "1",
            Err(_) => info.lo_flags & LO_FLAGS_DIRECT_IO != 0,
        };
        let logical_block_size = read_sysfs(self.number, "queue/logical_block_size")
            .map_err(|e| {
                context(
                    e,
                    &format!("reading the block size of {}", self.path.display()),
                )
            })?
            .trim()
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}")))?;
        Ok(LoopStatus {
            number: self.number,
            backing_file,
            flags: info.lo_flags,
            read_only: info.lo_flags & LO_FLAGS_READ_ONLY != 0,
            autoclear: info.lo_flags & LO_FLAGS_AUTOCLEAR != 0,
            direct_io,
            logical_block_size,
            offset: info.lo_offset,
            size_limit: info.lo_sizelimit,
        })
    }

    /// Detaches the device (`LOOP_CLR_FD`) and closes our descriptor.
    ///
    /// If someone else still holds the device (a mounted filesystem), the kernel only marks it
    /// autoclear and detaches it when that last user closes it; this still returns `Ok`.
    /// Detaching a device that is not attached fails with `ENXIO`.
    pub fn detach(self) -> io::Result<()> {
        ioctl_int(self.file.as_fd(), LOOP_CLR_FD, 0)
            .map_err(|e| context(e, &format!("detaching {}", self.path.display())))?;
        Ok(())
    }
}

impl AsFd for LoopDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Numbers of the loop devices whose backing file is `backing`, sorted (scans
/// `/sys/block/loop*/loop/backing_file`). `backing` is made absolute and canonical first when
/// it exists, as the kernel reports canonical paths.
pub fn find_by_backing_file(backing: &Path) -> io::Result<Vec<u32>> {
    let want = backing
        .canonicalize()
        .or_else(|_| std::path::absolute(backing))?;
    let deleted = {
        let mut p = want.clone().into_os_string();
        p.push(" (deleted)");
        PathBuf::from(p)
    };
    let mut found = Vec::new();
    for entry in fs::read_dir("/sys/block")? {
        let name = entry?.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|s| s.strip_prefix("loop"))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Not attached (no `loop/` directory) or detached while we scan.
        let Ok(path) = backing_of(number) else {
            continue;
        };
        if path == want || path == deleted {
            found.push(number);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Detaches every loop device backed by `backing` (see [`LoopDevice::detach`]); returns their
/// numbers.
pub fn detach_by_backing_file(backing: &Path) -> io::Result<Vec<u32>> {
    let numbers = find_by_backing_file(backing)?;
    for &n in &numbers {
        match LoopDevice::open(n).and_then(LoopDevice::detach) {
            Ok(()) => {}
            // Detached by someone else (or by autoclear) meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(numbers)
}

#[cfg(test)]
mod tests;
