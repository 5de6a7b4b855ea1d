//! Real clients on the export: ext4 on a loop device (direct I/O, 4096-byte blocks) on a
//! device file, snapshots isolated from their origin, e2fsck, and fio with verification.
//! Needs root, /dev/fuse, loop devices, e2fsprogs and fio.

mod common;

use common::*;
use hpm_fuse::FuseOptions;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const BIG: u64 = 32 * MIB;

fn write_big(path: &Path, seed: u64) {
    let mut f = fs::File::create(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..BIG / MIB {
        pattern(seed, i * MIB, &mut buf);
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

fn check_big(path: &Path, seed: u64) {
    let f = fs::File::open(path).unwrap();
    assert_eq!(f.metadata().unwrap().len(), BIG);
    let (mut got, mut want) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    for i in 0..BIG / MIB {
        f.read_exact_at(&mut got, i * MIB).unwrap();
        pattern(seed, i * MIB, &mut want);
        assert!(got == want, "{} differs in MiB {i}", path.display());
    }
}

#[test]
fn ext4_files_survive_remount_and_snapshots_are_isolated() {
    if !requirements(
        "ext4 on loop on FUSE",
        true,
        &["mkfs.ext4", "e2fsck", "mount", "fstrim"],
    ) {
        return;
    }
    let env = Env::new(&FuseOptions::default());
    // A name with '/' as containerd keys have: exported under an escaped flat name.
    let a_file = env.device("vol/a", 256 * MIB);
    assert_eq!(a_file, env.export.mountpoint().join("vol%2Fa"));
    let _a_loop = LoopGuard(a_file.clone());
    let mnt_a = env.path("mnt-a");

    let m = attach_and_mount(&a_file, &mnt_a, true);
    fs::write(mnt_a.join("hello.txt"), b"hello from ext4 on hpmapper\n").unwrap();
    fs::create_dir_all(mnt_a.join("dir/sub")).unwrap();
    for i in 0..100 {
        fs::write(mnt_a.join(format!("dir/sub/f{i}")), format!("file {i}\n")).unwrap();
    }
    write_big(&mnt_a.join("big"), 1);
    run(Command::new("sync").arg("-f").arg(&mnt_a));
    m.umount();
    wait_detached(&a_file);
    let stats = env.export.stats();
    assert!(stats.write_bytes >= BIG, "{stats:?}");
    assert!(
        stats.flushes > 0,
        "ext4 journal commits must reach fsync: {stats:?}"
    );
    // Requests larger than FUSE's default 128 KiB prove that max_write 1 MiB took effect.
    assert!(stats.largest_request > 128 << 10, "{stats:?}");
    assert!(stats.largest_request <= MIB, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");

    // Everything read back through a fresh loop device and a cold page cache.
    let m = attach_and_mount(&a_file, &mnt_a, false);
    assert_eq!(
        fs::read(mnt_a.join("hello.txt")).unwrap(),
        b"hello from ext4 on hpmapper\n"
    );
    for i in 0..100 {
        assert_eq!(
            fs::read_to_string(mnt_a.join(format!("dir/sub/f{i}"))).unwrap(),
            format!("file {i}\n")
        );
    }
    check_big(&mnt_a.join("big"), 1);
    m.umount();
    wait_detached(&a_file);

    // Snapshot the unmounted filesystem, export the snapshot and mount both.
    env.pool.snapshot("vol/a", "vol/a@snap", false).unwrap();
    let b_file = env
        .export
        .add(env.pool.open_device("vol/a@snap").unwrap())
        .unwrap();
    assert_eq!(b_file, env.export.mountpoint().join("vol%2Fa%40snap"));
    let _b_loop = LoopGuard(b_file.clone());
    let mnt_b = env.path("mnt-b");
    let ma = attach_and_mount(&a_file, &mnt_a, false);
    let mb = attach_and_mount(&b_file, &mnt_b, false);

    fs::write(mnt_a.join("hello.txt"), b"changed in the origin\n").unwrap();
    fs::write(mnt_a.join("only-in-origin"), b"a").unwrap();
    write_big(&mnt_a.join("big"), 2);
    fs::remove_file(mnt_b.join("dir/sub/f7")).unwrap();
    fs::write(mnt_b.join("only-in-snapshot"), b"b").unwrap();
    {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(mnt_b.join("dir/sub/f8"))
            .unwrap();
        f.write_all(b"appended in the snapshot\n").unwrap();
        f.sync_all().unwrap();
    }
    run(Command::new("sync").arg("-f").arg(&mnt_a));
    run(Command::new("sync").arg("-f").arg(&mnt_b));
    // Freed space goes back to the pool: fstrim -> loop discard -> fallocate punch hole.
    let before = env.export.stats();
    let used_before = env.pool.device_info("vol/a@snap").unwrap().mapped_bytes;
    write_big(&mnt_b.join("trim-me"), 3);
    fs::remove_file(mnt_b.join("trim-me")).unwrap();
    run(Command::new("sync").arg("-f").arg(&mnt_b));
    run(Command::new("fstrim").arg(&mnt_b));
    let after = env.export.stats();
    assert!(after.discards > before.discards, "{after:?}");
    assert!(
        after.discard_bytes - before.discard_bytes >= BIG,
        "{after:?}"
    );
    let used_after = env.pool.device_info("vol/a@snap").unwrap().mapped_bytes;
    assert!(
        used_after < used_before + BIG / 2,
        "trimmed blocks stay mapped: {used_before} -> {used_after}"
    );
    ma.umount();
    mb.umount();
    wait_detached(&a_file);
    wait_detached(&b_file);

    // Check each side after a remount, so nothing comes from the page cache.
    let ma = attach_and_mount(&a_file, &mnt_a, false);
    let mb = attach_and_mount(&b_file, &mnt_b, false);
    assert_eq!(
        fs::read(mnt_a.join("hello.txt")).unwrap(),
        b"changed in the origin\n"
    );
    assert_eq!(
        fs::read(mnt_b.join("hello.txt")).unwrap(),
        b"hello from ext4 on hpmapper\n"
    );
    assert!(mnt_a.join("only-in-origin").exists());
    assert!(!mnt_b.join("only-in-origin").exists());
    assert!(mnt_b.join("only-in-snapshot").exists());
    assert!(!mnt_a.join("only-in-snapshot").exists());
    assert!(mnt_a.join("dir/sub/f7").exists());
    assert!(!mnt_b.join("dir/sub/f7").exists());
    assert_eq!(
        fs::read_to_string(mnt_a.join("dir/sub/f8")).unwrap(),
        "file 8\n"
    );
    assert_eq!(
        fs::read_to_string(mnt_b.join("dir/sub/f8")).unwrap(),
        "file 8\nappended in the snapshot\n"
    );
    check_big(&mnt_a.join("big"), 2);
    check_big(&mnt_b.join("big"), 1);
    ma.umount();
    mb.umount();
    wait_detached(&a_file);
    wait_detached(&b_file);

    // Both filesystems clean, checked through the device files themselves.
    fsck_clean(&a_file);
    fsck_clean(&b_file);

    // Out of the export, the engine can delete the snapshot.
    let snap = env
        .export
        .remove_timeout("vol/a@snap", Duration::from_secs(5))
        .map_err(|e| e.to_string())
        .unwrap();
    drop(snap);
    env.pool.remove_device("vol/a@snap").unwrap();
    assert_eq!(env.export.list().len(), 1);
    assert_eq!(env.export.stats().errors, 0);
}

#[test]
fn fio_verifies_random_writes_on_ext4() {
    if !requirements("fio on ext4 on FUSE", true, &["mkfs.ext4", "mount", "fio"]) {
        return;
    }
    let env = Env::new(&FuseOptions::default());
    let file = env.device("fio", 256 * MIB);
    let _lg = LoopGuard(file.clone());
    let mnt = env.path("mnt");
    let m = attach_and_mount(&file, &mnt, true);
    let out = run(Command::new("fio").arg("--verify_state_save=0").args([
        "--name=v",
        &format!("--directory={}", mnt.display()),
        "--size=64M",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--ioengine=libaio",
        "--direct=1",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=terse",
    ]));
    // terse v3: field 5 is the error code of the job.
    let fields: Vec<&str> = out.trim().lines().last().unwrap().split(';').collect();
    assert_eq!(fields.get(4), Some(&"0"), "fio reported an error:\n{out}");
    m.umount();
    wait_detached(&file);
    let stats = env.export.stats();
    assert!(stats.write_bytes >= 64 * MIB, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
}
