//! FUSE over io_uring: asked for, and with the kernel's `fuse.enable_uring` on, the export
//! serves its requests through per-CPU rings (every request but FORGET and INTERRUPT), with
//! the same answers as over `/dev/fuse`; off (in the kernel or in the options), through
//! `/dev/fuse`.
//! scripts/test also runs every other test of this crate over io_uring. Needs root,
//! /dev/fuse, a kernel with FUSE io_uring (6.14+), loop devices and e2fsprogs.
//!
//! The kernel parameter is global: the tests here take turns (one lock) and put it back.

mod common;

use common::*;
use hpm_fuse::FuseOptions;
use hpm_testkit::host::{FuseUring, FUSE_URING_PARAM};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Mutex;
use std::time::Duration;

/// Tests here take turns with the kernel's switch.
static KERNEL_PARAM: Mutex<()> = Mutex::new(());

fn needs(test: &str) -> bool {
    requirements(test, true, &["mkfs.ext4", "e2fsck", "mount"])
        && hpm_testkit::host::require(test, true, &[FUSE_URING_PARAM], &[])
}

fn errno_of(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap()
}

fn ring_threads() -> usize {
    fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|comm| comm.starts_with("hpm-fuse-q"))
        .count()
}

#[test]
fn requests_go_over_io_uring_with_the_answers_of_dev_fuse() {
    if !needs("FUSE over io_uring") {
        return;
    }
    let _turn = KERNEL_PARAM.lock().unwrap_or_else(|e| e.into_inner());
    let _param = FuseUring::set(true).unwrap();
    let env = Env::exact(&FuseOptions {
        io_uring: true,
        ..FuseOptions::default()
    });
    assert!(env.export.io_uring_workers() > 0);
    let path = env.device("vol/a", 64 * MIB);
    env.pool.snapshot("vol/a", "snap", true).unwrap();
    env.export
        .add(env.pool.open_device("snap").unwrap())
        .unwrap();
    let before = env.export.stats();

    // Names, attributes, the directory (lookup, getattr, readdir over the ring).
    let mut names: Vec<String> = fs::read_dir(env.export.mountpoint())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["snap", "vol%2Fa"]);
    let md = fs::metadata(&path).unwrap();
    assert_eq!(
        (md.len(), md.mode() & 0o7777, md.uid()),
        (64 * MIB, 0o600, 0)
    );
    let snap = env.export.mountpoint().join("snap");
    assert_eq!(fs::metadata(&snap).unwrap().mode() & 0o7777, 0o400);

    // Data: written, read back, zeros where unwritten, the end a wall.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut data = vec![0u8; 3 * MIB as usize];
    pattern(7, 0, &mut data);
    f.write_all_at(&data, 4096).unwrap();
    let mut got = vec![0u8; data.len()];
    f.read_exact_at(&mut got, 4096).unwrap();
    assert!(got == data);
    f.read_exact_at(&mut got[..8192], 32 * MIB).unwrap();
    assert!(got[..8192].iter().all(|&b| b == 0));
    assert_eq!(f.write_at(&[2u8; 8192], 64 * MIB - 4096).unwrap(), 4096);
    assert_eq!(
        errno_of(f.write_at(&[2u8; 10], 64 * MIB).unwrap_err()),
        libc::ENOSPC
    );
    assert_eq!(f.read_at(&mut got, 64 * MIB).unwrap(), 0);
    f.sync_all().unwrap();

    // Refusals: resize, unlink, create, writing a read-only snapshot.
    assert_eq!(errno_of(f.set_len(MIB).unwrap_err()), libc::EPERM);
    f.set_len(64 * MIB).unwrap();
    assert_eq!(errno_of(fs::remove_file(&path).unwrap_err()), libc::EPERM);
    let e = fs::write(env.export.mountpoint().join("new"), b"x").unwrap_err();
    assert_eq!(errno_of(e), libc::EPERM);
    let e = OpenOptions::new().write(true).open(&snap).unwrap_err();
    assert_eq!(errno_of(e), libc::EROFS);

    // Punching a hole (fallocate) reads back as zeros.
    rustix::fs::fallocate(
        &f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        4096,
        MIB,
    )
    .unwrap();
    f.read_exact_at(&mut got[..MIB as usize], 4096).unwrap();
    assert!(got[..MIB as usize].iter().all(|&b| b == 0));
    drop(f);

    let after = env.export.stats();
    let served = after.ring_requests - before.ring_requests;
    assert!(
        served > 20,
        "only {served} of {} requests came over io_uring",
        after.requests - before.requests
    );
    assert!(after.writes > before.writes && after.reads > before.reads);

    // ext4 on a loop device, checked by e2fsck, through the rings.
    let _loop = LoopGuard(path.clone());
    let mnt = env.path("mnt");
    let m = attach_and_mount(&path, &mnt, true);
    for i in 0..50 {
        let mut buf = vec![0u8; 64 * 1024];
        pattern(i, 0, &mut buf);
        fs::write(mnt.join(format!("f{i}")), &buf).unwrap();
    }
    m.umount();
    wait_detached(&path);
    fsck_clean(&path);
    let m = attach_and_mount(&path, &mnt, false);
    for i in 0..50 {
        let mut want = vec![0u8; 64 * 1024];
        pattern(i, 0, &mut want);
        assert!(fs::read(mnt.join(format!("f{i}"))).unwrap() == want, "f{i}");
    }
    m.umount();
    wait_detached(&path);

    // Unmounting ends the connection, and every ring worker with it.
    assert!(ring_threads() > 0);
    let Env { export, pool, dir } = env;
    export.unmount().unwrap();
    // A joined thread can linger in /proc/self/task for a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ring_threads() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(ring_threads(), 0);
    drop((pool, dir));
}

#[test]
fn dev_fuse_serves_when_io_uring_is_off_in_the_kernel_or_the_options() {
    if !needs("FUSE over io_uring off") {
        return;
    }
    let _turn = KERNEL_PARAM.lock().unwrap_or_else(|e| e.into_inner());
    for (kernel, option) in [(false, true), (true, false)] {
        let _param = FuseUring::set(kernel).unwrap();
        let env = Env::exact(&FuseOptions {
            io_uring: option,
            ..FuseOptions::default()
        });
        assert_eq!(
            env.export.io_uring_workers(),
            0,
            "kernel {kernel}, option {option}"
        );
        let path = env.device("vol", 8 * MIB);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.write_all_at(&[5u8; 65536], 0).unwrap();
        let mut got = vec![0u8; 65536];
        f.read_exact_at(&mut got, 0).unwrap();
        assert!(got.iter().all(|&b| b == 5));
        let s = env.export.stats();
        assert!(s.requests > 0);
        assert_eq!(s.ring_requests, 0, "kernel {kernel}, option {option}");
    }
}

/// Keeps `kernel.io_uring_disabled` at a value while alive; puts the old one back on drop.
struct IoUringDisabled(String);

const IO_URING_DISABLED: &str = "/proc/sys/kernel/io_uring_disabled";

impl IoUringDisabled {
    fn set(v: &str) -> IoUringDisabled {
        let old = fs::read_to_string(IO_URING_DISABLED).unwrap();
        fs::write(IO_URING_DISABLED, v).unwrap();
        IoUringDisabled(old.trim().to_string())
    }
}

impl Drop for IoUringDisabled {
    fn drop(&mut self) {
        let _ = fs::write(IO_URING_DISABLED, &self.0);
    }
}

#[test]
fn rings_refused_after_init_remount_the_export_on_dev_fuse() {
    let test = "FUSE over io_uring refused";
    if !needs(test) || !hpm_testkit::host::require(test, true, &[IO_URING_DISABLED], &[]) {
        return;
    }
    let _turn = KERNEL_PARAM.lock().unwrap_or_else(|e| e.into_inner());
    let _param = FuseUring::set(true).unwrap();
    // FUSE offers io_uring at INIT, then the kernel refuses to make rings at all (as a
    // hardened host may): the export is mounted again on /dev/fuse with all its threads.
    // The sysctl is machine-wide, set only for the mount: the other tests of this binary
    // (the only ones that make rings, cargo runs test binaries one at a time) wait on the
    // lock meanwhile.
    let env = {
        let _off = IoUringDisabled::set("2");
        Env::exact(&FuseOptions {
            io_uring: true,
            ..FuseOptions::default()
        })
    };
    assert_eq!(env.export.io_uring_workers(), 0);
    let path = env.device("vol", 8 * MIB);
    let _loop = LoopGuard(path.clone());
    let m = attach_and_mount(&path, &env.path("mnt"), true);
    fs::write(env.path("mnt").join("f"), [7u8; 100_000]).unwrap();
    m.umount();
    wait_detached(&path);
    fsck_clean(&path);
    let s = env.export.stats();
    assert!(s.requests > 100, "{} requests", s.requests);
    assert_eq!(s.ring_requests, 0);
}
