//! Attach, inspect and detach real loop devices (root and /dev/loop-control; under CI=true
//! their absence fails the tests, elsewhere it skips them).

use super::*;
use std::os::unix::fs::FileExt;

/// Root and `/dev/loop-control`, or why not. Under CI=true a missing requirement fails.
fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    let why = if !root {
        "not root"
    } else if !Path::new("/dev/loop-control").exists() {
        "no /dev/loop-control"
    } else {
        return true;
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("loop device test cannot run under CI: {why}");
    }
    eprintln!("skipping loop device test: {why}");
    false
}

/// Detaches whatever the test attached, also when it fails half way.
struct Guard(PathBuf);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = detach_by_backing_file(&self.0);
    }
}

fn round_trip(method: Method, read_only: bool) {
    if !can_run() {
        return;
    }
    // Not /dev/shm: the backing file must be on a filesystem with O_DIRECT.
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let backing = dir.path().join("backing");
    let f = File::create(&backing).unwrap();
    f.set_len(16 << 20).unwrap();
    f.write_all_at(b"hello from the file", 8192).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let _guard = Guard(backing.clone());

    let dev = attach_with(&backing, read_only, method).unwrap();
    assert!(dev.path().to_str().unwrap().starts_with("/dev/loop"));
    assert_eq!(dev.attached_legacy(), method == Method::Legacy);
    let st = dev.status().unwrap();
    assert_eq!(st.number, dev.number());
    assert_eq!(st.backing_file, backing.canonicalize().unwrap());
    assert!(st.direct_io, "direct I/O is off: {st:?}");
    assert!(st.autoclear, "{st:?}");
    assert_eq!(st.read_only, read_only, "{st:?}");
    assert_eq!(st.logical_block_size, 4096, "{st:?}");
    assert_eq!(find_by_backing_file(&backing).unwrap(), vec![dev.number()]);

    let mut buf = vec![0u8; 4096];
    {
        let blk = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_DIRECT)
            .open(dev.path())
            .unwrap();
        // O_DIRECT needs an aligned buffer; a 4096-aligned slice of a larger Vec.
        let mut raw = vec![0u8; 3 * 4096];
        let at = raw.as_ptr().align_offset(4096);
        let aligned = &mut raw[at..at + 4096];
        blk.read_exact_at(aligned, 8192).unwrap();
        assert_eq!(&aligned[..19], b"hello from the file");
        if read_only {
            let w = OpenOptions::new().write(true).open(dev.path());
            let e = w.and_then(|w| w.write_all_at(aligned, 0)).unwrap_err();
            // The block layer refuses writes to a read-only disk with EPERM.
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        } else {
            aligned.fill(0xA5);
            blk.write_all_at(aligned, 4096 * 100).unwrap();
            blk.sync_all().unwrap();
        }
    }
    let number = dev.number();
    dev.detach().unwrap();
    wait_detached(&backing);
    // The number may already serve another test's file (tests run in parallel).
    let now = read_sysfs(number, "loop/backing_file").unwrap_or_default();
    assert_ne!(
        Path::new(now.trim()),
        backing.canonicalize().unwrap(),
        "loop{number} still serves the file"
    );
    if !read_only {
        File::open(&backing)
            .unwrap()
            .read_exact_at(&mut buf, 4096 * 100)
            .unwrap();
        assert!(buf.iter().all(|&b| b == 0xA5));
    }
}

#[test]
fn attach_with_loop_configure() {
    round_trip(Method::Configure, false);
}

#[test]
fn attach_read_only() {
    round_trip(Method::Configure, true);
}

#[test]
fn attach_the_pre_5_8_way() {
    round_trip(Method::Legacy, false);
}

#[test]
fn autoclear_detaches_when_the_last_holder_closes() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let backing = dir.path().join("backing");
    File::create(&backing).unwrap().set_len(1 << 20).unwrap();
    let _guard = Guard(backing.clone());
    let dev = attach(&backing, false).unwrap();
    let again = LoopDevice::open(dev.number()).unwrap();
    drop(dev);
    // Still held by `again`.
    assert_eq!(
        find_by_backing_file(&backing).unwrap(),
        vec![again.number()]
    );
    drop(again);
    wait_detached(&backing);
}

/// Waits until no loop device serves `backing`: the kernel tears a device down when its last
/// opener closes, which a prober (udev's blkid) may be for a moment after we close ours.
fn wait_detached(backing: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !find_by_backing_file(backing).unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "a loop device still serves {} 5 s after detach",
            backing.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn many_attach_at_once_get_distinct_devices() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let paths: Vec<PathBuf> = (0..4)
        .map(|i| {
            let p = dir.path().join(format!("b{i}"));
            File::create(&p).unwrap().set_len(1 << 20).unwrap();
            p
        })
        .collect();
    let _guards: Vec<Guard> = paths.iter().map(|p| Guard(p.clone())).collect();
    let devs: Vec<LoopDevice> = std::thread::scope(|s| {
        let hs: Vec<_> = paths
            .iter()
            .map(|p| s.spawn(move || attach(p, false).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut numbers: Vec<u32> = devs.iter().map(|d| d.number()).collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), 4);
    for (p, d) in paths.iter().zip(&devs) {
        assert_eq!(d.status().unwrap().backing_file, p.canonicalize().unwrap());
    }
}

#[test]
fn kernel_version_parses() {
    let (major, _) = kernel_version().unwrap();
    assert!(major >= 3);
}
