//! The device files themselves, without a loop device: block-device semantics (size, short
//! writes at the end, no resize), fallocate modes, fsync, read-only devices, remove while
//! open, names, request sizes, worker threads. Needs root and /dev/fuse.

mod common;

use common::*;
use hpm_fuse::{FuseExport, FuseOptions};
use rustix::fs::{fallocate, FallocateFlags};
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const SIZE: u64 = 16 * MIB;

fn errno_of(e: std::io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("not an OS error: {e}"))
}

#[test]
fn device_files_behave_like_block_devices() {
    if !requirements("device file semantics", false, &[]) {
        return;
    }
    let env = Env::new(&FuseOptions {
        threads: 4,
        ..Default::default()
    });
    let path = env.device("a/b c", SIZE);
    assert_eq!(path.file_name().unwrap(), "a%2Fb%20c");
    let md = fs::metadata(&path).unwrap();
    assert!(md.is_file());
    assert_eq!(md.len(), SIZE);
    assert_eq!(md.mode() & 0o7777, 0o600);
    assert_eq!((md.uid(), md.gid()), (0, 0));
    let names: Vec<String> = fs::read_dir(env.export.mountpoint())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["a%2Fb%20c".to_string()]);

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut buf = vec![0u8; 8192];
    f.write_all_at(&[1u8; 8192], 4096).unwrap();
    f.read_exact_at(&mut buf, 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 1));
    // Unwritten space reads as zeros.
    f.read_exact_at(&mut buf, 8 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0));

    // The end is a wall: short write across it, ENOSPC at it, short read, EOF after.
    assert_eq!(f.write_at(&[2u8; 8192], SIZE - 4096).unwrap(), 4096);
    assert_eq!(
        errno_of(f.write_at(&[2u8; 10], SIZE).unwrap_err()),
        libc::ENOSPC
    );
    assert_eq!(f.read_at(&mut buf, SIZE - 100).unwrap(), 100);
    assert!(buf[..100].iter().all(|&b| b == 2));
    assert_eq!(f.read_at(&mut buf, SIZE).unwrap(), 0);

    // No resize, no chmod; restating the size is fine.
    f.set_len(SIZE).unwrap();
    assert_eq!(errno_of(f.set_len(SIZE / 2).unwrap_err()), libc::EPERM);
    assert_eq!(errno_of(f.set_len(SIZE * 2).unwrap_err()), libc::EPERM);
    let e = fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap_err();
    assert_eq!(errno_of(e), libc::EPERM);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), SIZE);

    // Names come and go only through the export.
    assert_eq!(errno_of(fs::remove_file(&path).unwrap_err()), libc::EPERM);
    let e = fs::write(env.export.mountpoint().join("new"), b"x").unwrap_err();
    assert_eq!(errno_of(e), libc::EPERM);

    // fallocate: punch hole (aligned and not), zero range, and nothing else.
    let base = env.export.stats();
    f.write_all_at(&vec![0xAA; 64 << 10], MIB).unwrap();
    fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        MIB,
        8192,
    )
    .unwrap();
    fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        MIB + 16384 + 100,
        5000,
    )
    .unwrap();
    fallocate(&f, FallocateFlags::ZERO_RANGE, MIB + 32768 + 7, 3).unwrap();
    let mut got = vec![0u8; 64 << 10];
    f.read_exact_at(&mut got, MIB).unwrap();
    for (i, &b) in got.iter().enumerate() {
        let zero =
            i < 8192 || (16384 + 100..16384 + 5100).contains(&i) || (32775..32778).contains(&i);
        assert_eq!(b, if zero { 0 } else { 0xAA }, "byte {i}");
    }
    let e = fallocate(&f, FallocateFlags::empty(), 0, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), libc::EOPNOTSUPP);
    let e = fallocate(&f, FallocateFlags::ZERO_RANGE, SIZE - 4096, 8192).unwrap_err();
    assert_eq!(e.raw_os_error(), libc::EFBIG);
    // Past the end with KEEP_SIZE: cut at the end, as a regular file does.
    fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        SIZE - 4096,
        1 << 30,
    )
    .unwrap();
    let st = env.export.stats();
    assert_eq!(st.discards - base.discards, 3);
    assert_eq!(st.zero_ranges - base.zero_ranges, 1);

    // fsync flushes the device; close does not.
    let before = env.export.stats().flushes;
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    assert_eq!(env.export.stats().flushes - before, 2);

    // One 1 MiB O_DIRECT write arrives as one request (max_write 1 MiB negotiated).
    {
        let d = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        let mut raw = vec![0x5Au8; 3 * MIB as usize];
        let at = raw.as_ptr().align_offset(4096);
        d.write_all_at(&raw[at..at + MIB as usize], 4 * MIB)
            .unwrap();
        raw.clear();
    }
    assert_eq!(env.export.stats().largest_request, MIB);

    // Read-only snapshot: 0400, EROFS for writers, same data for readers.
    env.pool.snapshot("a/b c", "a/b c@ro", true).unwrap();
    let ro = env
        .export
        .add(env.pool.open_device("a/b c@ro").unwrap())
        .unwrap();
    assert_eq!(fs::metadata(&ro).unwrap().mode() & 0o7777, 0o400);
    let e = OpenOptions::new().write(true).open(&ro).unwrap_err();
    assert_eq!(errno_of(e), libc::EROFS);
    let r = fs::File::open(&ro).unwrap();
    r.read_exact_at(&mut buf, 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 1));

    // Adding a name twice is refused; list shows both with their open handles.
    let dup = env.export.add(env.pool.open_device("a/b c").unwrap());
    assert_eq!(dup.unwrap_err().kind(), ErrorKind::AlreadyExists);
    // The O_DIRECT handle's RELEASE is a background request that close() does not wait
    // for: wait until it is in.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let list = loop {
        let list = env.export.list();
        if list[0].open_handles == 1 || std::time::Instant::now() > deadline {
            break list;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].name, "a/b c");
    assert_eq!(list[0].open_handles, 1);
    assert_eq!(list[1].name, "a/b c@ro");
    assert!(list[1].read_only);
    assert_eq!(env.export.path("a/b c@ro"), Some(ro.clone()));

    // Busy while open; removable once closed; the name is then gone from the directory.
    // (Device has no Debug, hence err().unwrap().)
    let e = env.export.remove("a/b c").err().unwrap();
    assert_eq!(e.kind(), ErrorKind::ResourceBusy, "{e}");
    drop(f);
    drop(r);
    let dev = env
        .export
        .remove_timeout("a/b c", Duration::from_secs(5))
        .ok()
        .unwrap();
    assert_eq!(dev.name(), "a/b c");
    assert_eq!(errno_of(fs::metadata(&path).unwrap_err()), libc::ENOENT);
    assert_eq!(
        env.export.remove("a/b c").err().unwrap().kind(),
        ErrorKind::NotFound
    );
    // Added again, under the same name, with its data.
    assert_eq!(env.export.add(dev).unwrap(), path);
    let f = fs::File::open(&path).unwrap();
    f.read_exact_at(&mut buf, 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 1));
    drop(f);

    let st = env.export.stats();
    assert!(st.errors >= 7, "{st:?}");
    assert!(st.requests > st.reads + st.writes, "{st:?}");
}

#[test]
fn workers_are_io_flushers_where_permitted() {
    if !requirements("FUSE worker IO_FLUSHER", false, &[]) {
        return;
    }
    let env = Env::new(&FuseOptions {
        threads: 3,
        ..Default::default()
    });
    if !env.export.io_flusher() {
        // Not a missing test requirement but a documented degradation (containers may drop
        // CAP_SYS_RESOURCE even for root): the export must still work.
        let e = hpm_io::set_io_flusher().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        eprintln!("note: no CAP_SYS_RESOURCE here; FUSE workers run without IO_FLUSHER");
        return;
    }
    let path = env.device("x", MIB);
    // Served by a worker, so the session runs; the others start around the same time.
    fs::metadata(&path).unwrap();
    // PF_MEMALLOC_NOIO, set by PR_SET_IO_FLUSHER (with PF_LOCAL_THROTTLE).
    const PF_MEMALLOC_NOIO: u64 = 0x0008_0000;
    // Counted, not asserted, per pass: a ring worker of another test in this process sets
    // the flag as its first step, a moment after it has its name.
    let (mut workers, mut without) = (0, Vec::new());
    for _ in 0..200 {
        (workers, without) = (0, Vec::new());
        for task in fs::read_dir("/proc/self/task").unwrap() {
            let dir = task.unwrap().path();
            let Ok(comm) = fs::read_to_string(dir.join("comm")) else {
                continue;
            };
            // /dev/fuse workers, or io_uring ones (HPM_TEST_FUSE_IO_URING=1) and fuser's
            // one thread beside them.
            if !comm.starts_with("fuser-")
                && !comm.starts_with("hpm-fuse-w")
                && !comm.starts_with("hpm-fuse-q")
            {
                continue;
            }
            let stat = fs::read_to_string(dir.join("stat")).unwrap();
            // Fields after "(comm)": state ppid pgrp session tty tpgid flags ...
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let flags: u64 = rest.split(' ').nth(6).unwrap().parse().unwrap();
            if flags & PF_MEMALLOC_NOIO == 0 {
                without.push(format!("{} flags {flags:#x}", comm.trim()));
            }
            workers += 1;
        }
        if workers >= 3 && without.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(workers >= 3, "found {workers} FUSE worker threads");
    assert!(
        without.is_empty(),
        "workers without IO_FLUSHER: {without:?}"
    );
}

#[test]
fn unmount_with_an_open_file_detaches_lazily() {
    if !requirements("lazy unmount", false, &[]) {
        return;
    }
    let env = Env::new(&FuseOptions::default());
    let path = env.device("held", MIB);
    let mountpoint = env.export.mountpoint().to_path_buf();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let Env { export, pool, dir } = env;
    let e = export.unmount().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceBusy, "{e}");
    assert!(e.to_string().contains("held"), "{e}");
    // Out of the namespace at once ...
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(mountpoint.to_str().unwrap()),
        "still mounted: {mounts}"
    );
    // ... while the open file is still served.
    f.write_all_at(b"still here", 0).unwrap();
    let mut buf = [0u8; 10];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"still here");
    drop(f);
    drop(pool);
    drop(dir);
}

/// The server of `a_new_mount_replaces_a_dead_one`, run by that test in a child process
/// and killed there; does nothing when run by the test harness itself.
#[test]
fn dead_server_child() {
    let Ok(mp) = std::env::var(DEAD_SERVER) else {
        return;
    };
    let export = FuseExport::mount(Path::new(&mp), &FuseOptions::default()).unwrap();
    println!("mounted");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
    drop(export);
}

const DEAD_SERVER: &str = "HPM_FUSE_TEST_DEAD_SERVER";

/// Kills the child server and detaches its mount, also if the test fails.
struct ChildGuard(std::process::Child, PathBuf);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = rustix::mount::unmount(&self.1, rustix::mount::UnmountFlags::DETACH);
    }
}

#[test]
fn a_new_mount_replaces_a_dead_one() {
    if !requirements("stale mount", false, &[]) {
        return;
    }
    let env = Env::new(&FuseOptions::default());
    let mp = env.path("stale");
    fs::create_dir(&mp).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["dead_server_child", "--exact", "--nocapture"])
        .env(DEAD_SERVER, &mp)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(child, mp.clone());
    let out = guard.0.stdout.take().unwrap();
    let mounted = BufReader::new(out)
        .lines()
        .any(|l| l.is_ok_and(|l| l.contains("mounted")));
    assert!(mounted, "the child server did not mount");
    // The daemon crashes: its /dev/fuse descriptor closes, the mount stays, dead.
    guard.0.kill().unwrap();
    guard.0.wait().unwrap();
    assert_eq!(errno_of(fs::metadata(&mp).unwrap_err()), libc::ENOTCONN);

    // The restarted daemon mounts at the same place.
    let export = FuseExport::mount(&mp, &FuseOptions::default()).unwrap();
    env.pool.create_device("again", MIB).unwrap();
    let path = export.add(env.pool.open_device("again").unwrap()).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), MIB);
    export.unmount().unwrap();
    // Nothing is left mounted there: neither ours nor the dead one.
    assert!(fs::read_dir(&mp).unwrap().next().is_none());
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(mp.to_str().unwrap()), "{mounts}");
    drop(guard);
}

#[test]
fn reads_of_shared_blocks_are_answered_from_the_cache_with_the_right_bytes() {
    if !requirements("cached reads through the device file", false, &[]) {
        return;
    }
    let env = Env::new(&FuseOptions {
        threads: 4,
        ..Default::default()
    });
    let origin = env.device("origin", SIZE);
    let mut image = vec![0u8; SIZE as usize];
    pattern(3, 0, &mut image);
    // Every other MiB written: the snapshot's reads mix cached blocks and unmapped ones.
    {
        let f = OpenOptions::new().write(true).open(&origin).unwrap();
        for off in (0..SIZE).step_by(2 * MIB as usize) {
            f.write_all_at(&image[off as usize..(off + MIB) as usize], off)
                .unwrap();
            image[(off + MIB) as usize..(off + 2 * MIB) as usize].fill(0);
        }
        f.sync_all().unwrap();
    }
    env.pool.snapshot("origin", "snap", false).unwrap();
    let snap = env
        .export
        .add(env.pool.open_device("snap").unwrap())
        .unwrap();
    // Private blocks in the snapshot too: an unaligned copy-on-write of shared blocks.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&snap)
        .unwrap();
    f.write_all_at(&[0x5a; 5000], 2 * MIB + 100).unwrap();
    image[(2 * MIB + 100) as usize..(2 * MIB + 5100) as usize].fill(0x5a);
    let hits_before = env.pool.cache_stats().hits;
    let cache_bytes_before = env.export.stats().read_cache_bytes;
    // Twice: the first pass fills the cache, the second is served from it.
    for pass in 0..2 {
        let mut buf = vec![0u8; MIB as usize];
        for off in (0..SIZE).step_by(MIB as usize) {
            f.read_exact_at(&mut buf, off).unwrap();
            assert!(
                buf[..] == image[off as usize..(off + MIB) as usize],
                "pass {pass}: 1 MiB at {off} differs"
            );
        }
        // Unaligned reads across cached, private and unmapped blocks.
        for (off, len) in [
            (4095, 2),
            (MIB - 10, 20_000),
            (3 * MIB, 9000),
            (5 * MIB + 7, 300),
        ] {
            let mut b = vec![0u8; len];
            f.read_exact_at(&mut b, off).unwrap();
            assert!(
                b[..] == image[off as usize..off as usize + len],
                "pass {pass}: {len} bytes at {off} differ"
            );
        }
    }
    assert!(
        env.pool.cache_stats().hits > hits_before,
        "the snapshot's shared blocks were read from the cache"
    );
    if env.export.io_uring_workers() == 0 {
        // The /dev/fuse workers wrote the second pass's shared blocks straight from the
        // cache: at least the 8 mapped MiB, less the copied-on-write block.
        let from_cache = env.export.stats().read_cache_bytes - cache_bytes_before;
        assert!(
            from_cache >= 8 * MIB - 2 * 4096,
            "only {from_cache} bytes of replies came straight from the cache"
        );
    }
}

#[test]
fn unmount_ends_even_when_another_mount_namespace_holds_a_copy() {
    if !requirements("unmount with a copy elsewhere", false, &["unshare"]) {
        return;
    }
    let env = Env::new(&FuseOptions::default());
    let path = env.device("d", MIB);
    // A process in a mount namespace made now holds a copy of the export's mount (as a
    // service restarted with its own namespace would): unmounting ours does not end the
    // connection, which lives on in the copy.
    let mut copy = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sleep", "60"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let Env { export, pool, dir } = env;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(export.unmount());
    });
    let done = rx.recv_timeout(Duration::from_secs(30));
    copy.kill().unwrap();
    copy.wait().unwrap();
    done.expect("unmount still waiting for its workers after 30 s")
        .unwrap();
    drop(path);
    drop(pool);
    drop(dir);
}

#[test]
fn unmount_returns_when_a_file_open_in_another_namespace_keeps_the_connection() {
    if !requirements(
        "unmount with a file open elsewhere",
        false,
        &["unshare", "sh"],
    ) {
        return;
    }
    let env = Env::new(&FuseOptions::default());
    let path = env.device("d", MIB);
    // Another namespace's copy of the mount, with the device file open in it: our unmount
    // succeeds (our mount is not busy), but the connection lives on for that open file.
    let mut holder = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("exec 3<'{}'; sleep 60", path.display()))
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !env.export.list().iter().any(|d| d.open_handles > 0) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the file was never opened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let Env { export, pool, dir } = env;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(export.unmount());
    });
    let done = rx.recv_timeout(Duration::from_secs(40));
    holder.kill().unwrap();
    holder.wait().unwrap();
    done.expect("unmount still waiting for its workers after 40 s")
        .unwrap();
    drop(pool);
    drop(dir);
}

/// A panic in the handling of a request (here: in the pool's data store, as a bug would)
/// is answered with EIO, not left unanswered, and costs no worker: with two workers, eight
/// panics in a row, each followed by a good read, all answered in time.
#[test]
fn a_panic_while_serving_a_read_answers_eio_and_the_workers_go_on() {
    if !requirements("a panic while serving a FUSE request", false, &[]) {
        return;
    }
    use hpm_engine::{Pool, PoolOptions, PoolStorage};
    use hpm_io::MemBackend;
    use hpm_testkit::fault::PanicBackend;
    use std::sync::Arc;
    let data = Arc::new(PanicBackend::new(Arc::new(MemBackend::new())));
    let storage = PoolStorage {
        superblock: Box::new(MemBackend::new()),
        meta: [Box::new(MemBackend::new()), Box::new(MemBackend::new())],
        data: Box::new(data.clone()),
    };
    let pool = Pool::create_on(
        storage,
        &PoolOptions::default(),
        64 * MIB,
        String::new(),
        None,
    )
    .unwrap();
    let env = Env::on_pool(
        pool,
        &FuseOptions {
            threads: 2,
            ..Default::default()
        },
    );
    let path = env.device("p", SIZE);
    let mut image = vec![0u8; SIZE as usize];
    pattern(5, 0, &mut image);
    {
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&image, 0).unwrap();
        f.sync_all().unwrap();
    }
    // O_DIRECT: every read reaches the daemon. Each read runs in a thread with a deadline,
    // so an unanswered request fails the test instead of hanging it.
    let read = |off: u64| -> std::io::Result<Vec<u8>> {
        let path = path.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = (|| {
                let f = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path)?;
                let mut raw = Vec::new();
                let buf = hpm_io::aligned_prefix(&mut raw, 64 << 10);
                f.read_exact_at(buf, off)?;
                Ok(buf.to_vec())
            })();
            let _ = tx.send(r);
        });
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the read at {off} was not answered within 30 s"))
    };
    for k in 0..8u64 {
        let off = k * MIB;
        data.panic_on_next_read();
        let e = read(off).expect_err("the read whose handling panicked fails");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        let got = read(off).expect("the next read works");
        assert!(
            got[..] == image[off as usize..off as usize + (64 << 10)],
            "bytes at {off}"
        );
    }
}
