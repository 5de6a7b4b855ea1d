//! Shared helpers of the kernel-facing tests: requirement checks (fail under CI=true, skip
//! otherwise), a pool with a mounted export, and guards that unmount and detach even when a
//! test fails half way.
#![allow(dead_code, missing_docs)]

use hpm_engine::{Pool, PoolOptions};
use hpm_fuse::{FuseExport, FuseOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const MIB: u64 = 1 << 20;

/// Whether the machine can run a kernel-facing test needing `tools` (and loop devices if
/// `needs_loop`). A missing requirement fails the test under CI=true and skips it otherwise.
pub fn requirements(test: &str, needs_loop: bool, tools: &[&str]) -> bool {
    let devices: &[&str] = if needs_loop {
        &["/dev/fuse", "/dev/loop-control"]
    } else {
        &["/dev/fuse"]
    };
    hpm_testkit::host::require(test, true, devices, tools)
}

/// A pool in a temporary directory and an export mounted in it. Fields drop in order: the
/// export (unmount) before the pool, the directory last.
pub struct Env {
    pub export: FuseExport,
    pub pool: Pool,
    pub dir: tempfile::TempDir,
}

impl Env {
    /// A pool and an export with `opts`; over io_uring instead when HPM_TEST_FUSE_IO_URING=1
    /// (scripts/test runs this crate's tests a second time so, with the kernel's FUSE
    /// io_uring on), and then the export must really serve over io_uring.
    pub fn new(opts: &FuseOptions) -> Env {
        if std::env::var("HPM_TEST_FUSE_IO_URING").is_ok_and(|v| v == "1") {
            let env = Env::exact(&FuseOptions {
                io_uring: true,
                ..opts.clone()
            });
            assert!(
                env.export.io_uring_workers() > 0,
                "HPM_TEST_FUSE_IO_URING=1 but the export serves /dev/fuse only"
            );
            return env;
        }
        Env::exact(opts)
    }

    /// An export beside `pool` (a pool the test built on stores of its own), with `opts`
    /// or, as `new`, over io_uring when HPM_TEST_FUSE_IO_URING=1.
    pub fn on_pool(pool: Pool, opts: &FuseOptions) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let uring = std::env::var("HPM_TEST_FUSE_IO_URING").is_ok_and(|v| v == "1");
        let opts = FuseOptions {
            io_uring: uring || opts.io_uring,
            ..opts.clone()
        };
        let export = FuseExport::mount(&dir.path().join("dev"), &opts).unwrap();
        assert!(
            !uring || export.io_uring_workers() > 0,
            "HPM_TEST_FUSE_IO_URING=1 but the export serves /dev/fuse only"
        );
        Env { export, pool, dir }
    }

    /// A pool and an export with exactly `opts`.
    pub fn exact(opts: &FuseOptions) -> Env {
        // Under /tmp or $TMPDIR; not tmpfs here, but the pool file never needs O_DIRECT.
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::create(
            &dir.path().join("pool"),
            &PoolOptions {
                capacity: Some(512 * MIB),
                ..Default::default()
            },
        )
        .unwrap();
        let export = FuseExport::mount(&dir.path().join("dev"), opts).unwrap();
        Env { export, pool, dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Creates device `name` of `size` bytes and exports it; returns the file's path.
    pub fn device(&self, name: &str, size: u64) -> PathBuf {
        self.pool.create_device(name, size).unwrap();
        self.export
            .add(self.pool.open_device(name).unwrap())
            .unwrap()
    }
}

/// Runs a command; panics with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Detaches every loop device backed by a file when dropped.
pub struct LoopGuard(pub PathBuf);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let _ = hpm_io::loopdev::detach_by_backing_file(&self.0);
    }
}

/// A filesystem mounted at a directory; unmounted when dropped (lazily if busy).
pub struct Mounted {
    pub target: PathBuf,
    mounted: bool,
}

impl Mounted {
    pub fn new(device: &Path, target: &Path) -> Mounted {
        std::fs::create_dir_all(target).unwrap();
        run(Command::new("mount").arg(device).arg(target));
        Mounted {
            target: target.to_path_buf(),
            mounted: true,
        }
    }

    pub fn umount(mut self) {
        self.mounted = false;
        run(Command::new("umount").arg(&self.target));
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        let ok = Command::new("umount")
            .arg(&self.target)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.target).status();
        }
    }
}

/// Attaches `file` to a loop device, makes an ext4 filesystem (unless `mkfs` is false), and
/// mounts it at `target`. The loop device goes away by itself after umount (autoclear).
pub fn attach_and_mount(file: &Path, target: &Path, mkfs: bool) -> Mounted {
    let lo = hpm_io::loopdev::attach(file, false).unwrap();
    let st = lo.status().unwrap();
    assert!(st.direct_io, "loop direct I/O is off: {st:?}");
    assert_eq!(st.logical_block_size, 4096, "{st:?}");
    assert!(st.autoclear, "{st:?}");
    if mkfs {
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-E", "nodiscard"])
            .arg(lo.path()));
    }
    let m = Mounted::new(lo.path(), target);
    // The mount holds the device now; ours is no longer needed.
    drop(lo);
    m
}

/// e2fsck -fn on a device file; panics with its report unless the filesystem is clean.
pub fn fsck_clean(file: &Path) {
    run(Command::new("e2fsck").arg("-fn").arg(file));
}

/// Waits until no loop device is backed by `file` (autoclear runs when the last user goes).
pub fn wait_detached(file: &Path) {
    for _ in 0..500 {
        if hpm_io::loopdev::find_by_backing_file(file)
            .unwrap()
            .is_empty()
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("a loop device still holds {}", file.display());
}

/// A deterministic 32-byte-period pattern that differs for every 8-byte word of a file.
pub fn pattern(seed: u64, off: u64, buf: &mut [u8]) {
    assert!(off.is_multiple_of(8) && buf.len().is_multiple_of(8));
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let x = (off / 8 + i as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(seed);
        w.copy_from_slice(&x.to_le_bytes());
    }
}
