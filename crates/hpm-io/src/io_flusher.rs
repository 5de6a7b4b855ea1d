//! The `IO_FLUSHER` state of a thread (`prctl(PR_SET_IO_FLUSHER)`, Linux 5.6+).
//!
//! A thread that serves block I/O for the kernel (a FUSE worker behind a loop device, an NBD
//! worker) can be asked to make progress while the kernel is itself writing back dirty pages
//! to that device. If such a thread allocates memory and the allocation enters reclaim, the
//! reclaim may wait on writeback that only this thread can finish: a deadlock. In the
//! `IO_FLUSHER` state the kernel allocates for the thread without entering I/O reclaim
//! (`PF_MEMALLOC_NOIO`) and does not throttle it as a dirtier (`PF_LOCAL_THROTTLE`).
//!
//! This module owns only the two prctl calls; deciding which threads need the state belongs to
//! the exports.

use std::io;

/// `PR_SET_IO_FLUSHER`, missing from the `libc` crate for Linux.
const PR_SET_IO_FLUSHER: libc::c_int = 57;
/// `PR_GET_IO_FLUSHER`.
const PR_GET_IO_FLUSHER: libc::c_int = 58;

/// An unused prctl argument (the prototype reads unsigned longs).
const ZERO: libc::c_ulong = 0;

/// Puts the calling thread in the `IO_FLUSHER` state.
///
/// The state belongs to the calling thread and is inherited by threads it creates afterwards.
/// Needs `CAP_SYS_RESOURCE` (fails with `EPERM` otherwise) and Linux 5.6 or newer (fails with
/// `EINVAL` before).
pub fn set_io_flusher() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_IO_FLUSHER takes only integer arguments (arg2 = 1, the rest
    // 0, each an unsigned long as the variadic prototype reads them) and touches no memory
    // of ours.
    let r = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, ZERO, ZERO, ZERO) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the calling thread is in the `IO_FLUSHER` state.
pub fn is_io_flusher() -> io::Result<bool> {
    // SAFETY: prctl with PR_GET_IO_FLUSHER takes no pointer arguments and touches no memory of
    // ours; it returns the state or -1 with errno.
    let r = unsafe { libc::prctl(PR_GET_IO_FLUSHER, ZERO, ZERO, ZERO, ZERO) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_then_get_on_a_fresh_thread() {
        std::thread::spawn(|| match set_io_flusher() {
            Ok(()) => assert!(is_io_flusher().unwrap()),
            // Not root or an old kernel: the call must fail cleanly, not crash.
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EINVAL)),
                "{e}"
            ),
        })
        .join()
        .unwrap();
    }

    #[test]
    fn inherited_by_threads_created_afterwards() {
        std::thread::spawn(|| {
            if let Err(e) = set_io_flusher() {
                eprintln!("skipped: cannot set IO_FLUSHER here ({e}; needs CAP_SYS_RESOURCE)");
                return;
            }
            let child = std::thread::spawn(|| is_io_flusher().unwrap());
            assert!(child.join().unwrap());
        })
        .join()
        .unwrap();
    }
}
