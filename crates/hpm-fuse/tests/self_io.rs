//! The process that serves the export does I/O on a filesystem that sits on one of its own
//! devices (ext4 on loop on our FUSE file), as the daemon does when it untars a layer: writes
//! and fsyncs from several of its threads, with fewer FUSE workers than writers, while its
//! control plane adds and removes other devices. Nothing may deadlock. Needs root, /dev/fuse,
//! loop devices and mkfs.ext4.

mod common;

use common::*;
use hpm_fuse::FuseOptions;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WRITERS: u64 = 6;
const FILE: u64 = 4 * MIB;
/// Far above what the work needs (about a second), far below the CI limit.
const DEADLINE: Duration = Duration::from_secs(120);

/// Aborts the FUSE connection under `mountpoint` so that a hung test fails instead of
/// hanging (and its guards can unmount): through fusectl, or by ending the process.
fn abort_connection(mountpoint: &Path) -> ! {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(mountpoint).map(|m| m.dev()).unwrap_or(0);
    let minor = rustix::fs::minor(dev);
    let ctl = Path::new("/sys/fs/fuse/connections");
    if fs::read_dir(ctl).is_ok_and(|mut d| d.next().is_none()) {
        let _ = Command::new("mount")
            .args(["-t", "fusectl", "fusectl"])
            .arg(ctl)
            .status();
    }
    if fs::write(ctl.join(minor.to_string()).join("abort"), "1").is_ok() {
        panic!("deadlock: I/O of the serving process did not finish in {DEADLINE:?}");
    }
    eprintln!("deadlock: I/O of the serving process did not finish in {DEADLINE:?}; aborting");
    std::process::abort();
}

#[test]
fn the_serving_process_writes_and_fsyncs_on_its_own_filesystem() {
    if !requirements("self I/O deadlock test", true, &["mkfs.ext4", "mount"]) {
        return;
    }
    // Fewer workers than writers: a worker that waited on anything of the writers' would
    // stall everyone.
    let env = Env::new(&FuseOptions {
        threads: 2,
        ..Default::default()
    });
    let file = env.device("self", 256 * MIB);
    let _lg = LoopGuard(file.clone());
    let mnt = env.path("mnt");
    let m = attach_and_mount(&file, &mnt, true);

    let (tx, rx) = mpsc::channel();
    let dir = mnt.clone();
    let writer = std::thread::spawn(move || {
        std::thread::scope(|s| {
            for w in 0..WRITERS {
                let dir = &dir;
                s.spawn(move || {
                    // A big file, fsynced every MiB.
                    let path = dir.join(format!("big-{w}"));
                    let mut f = fs::File::create(&path).unwrap();
                    let mut buf = vec![0u8; 256 << 10];
                    for off in (0..FILE).step_by(buf.len()) {
                        pattern(w, off, &mut buf);
                        f.write_all(&buf).unwrap();
                        if (off + buf.len() as u64).is_multiple_of(MIB) {
                            f.sync_data().unwrap();
                        }
                    }
                    f.sync_all().unwrap();
                    // Many small files, as an untar makes, then the directory fsynced.
                    let sub = dir.join(format!("small-{w}"));
                    fs::create_dir(&sub).unwrap();
                    for i in 0..200 {
                        fs::write(sub.join(i.to_string()), format!("{w}/{i}")).unwrap();
                    }
                    fs::File::open(&sub).unwrap().sync_all().unwrap();
                });
            }
        });
        // syncfs of the whole filesystem from this process too.
        run(Command::new("sync").arg("-f").arg(&dir));
        let _ = tx.send(());
    });

    // The control plane keeps working meanwhile.
    let start = Instant::now();
    let mut k = 0;
    loop {
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(()) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break, // the writer panicked
        }
        if start.elapsed() > DEADLINE {
            abort_connection(env.export.mountpoint());
        }
        let name = format!("extra-{k}");
        let path = env.device(&name, MIB);
        fs::metadata(&path).unwrap();
        assert!(env.export.list().len() >= 2);
        let _ = env.export.stats();
        drop(env.export.remove(&name).map_err(|e| e.to_string()).unwrap());
        env.pool.remove_device(&name).unwrap();
        k += 1;
    }
    writer.join().expect("a writer thread failed");
    eprintln!("control-plane rounds during the I/O: {k}");
    assert!(k > 0);

    // The data is there, read back through a cold cache.
    m.umount();
    wait_detached(&file);
    let m = attach_and_mount(&file, &mnt, false);
    let mut got = vec![0u8; MIB as usize];
    let mut want = vec![0u8; MIB as usize];
    for w in 0..WRITERS {
        let f = fs::File::open(mnt.join(format!("big-{w}"))).unwrap();
        for off in (0..FILE).step_by(MIB as usize) {
            f.read_exact_at(&mut got, off).unwrap();
            pattern(w, off, &mut want);
            assert!(got == want, "big-{w} differs at {off}");
        }
        for i in [0, 99, 199] {
            assert_eq!(
                fs::read_to_string(mnt.join(format!("small-{w}/{i}"))).unwrap(),
                format!("{w}/{i}")
            );
        }
    }
    m.umount();
    wait_detached(&file);
    let st = env.export.stats();
    assert_eq!(st.errors, 0, "{st:?}");
    // One writer's fsyncs each need a flush of their own (each follows the last one's
    // return); concurrent writers' may share one journal commit and its flush.
    assert!(st.flushes >= FILE / MIB, "{st:?}");
}
