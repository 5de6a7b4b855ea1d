//! More readers for a FUSE connection: `FUSE_DEV_IOC_CLONE` gives a new `/dev/fuse`
//! descriptor that reads the requests of an existing connection, with its own list of
//! requests being processed (so workers on separate clones do not contend for one).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// `FUSE_DEV_IOC_CLONE`: `_IOR(229, 0, uint32_t)`.
const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;

/// A new descriptor on the connection of `session`, a `/dev/fuse` descriptor of a mounted
/// (INIT answered) filesystem.
pub fn fuse_dev_clone(session: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let dev = rustix::fs::open(
        "/dev/fuse",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let mut source = u32::try_from(session.as_raw_fd())
        .map_err(|_| io::Error::other("a negative file descriptor"))?;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the source descriptor) through the pointer,
    // which points to a live u32; `dev` is an open descriptor we own.
    if unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_CLONE, &mut source) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(dev)
}
