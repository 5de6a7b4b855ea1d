//! The real `hpmapper daemon` driven as a user would: the CLI through its control socket,
//! kernel block devices (FUSE file + loop) with ext4 on them, NBD with qemu-io, a SIGKILL in
//! the middle of an fsync workload, a clean SIGTERM, and the Prometheus endpoint.
//!
//! Needs root, /dev/fuse, loop devices, e2fsprogs, util-linux mount and qemu-io: a missing
//! one fails the test under CI=true and skips it otherwise (see `daemon_env::requirements`).

mod daemon_env;

use daemon_env::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `device list --json` (or status's `devices`), by name.
fn find<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no device {name:?} in {list}"))
}

/// The address of status's endpoint `what`.
fn endpoint(status: &Value, what: &str) -> String {
    status["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["what"] == what)
        .and_then(|e| e["address"].as_str())
        .unwrap_or_else(|| panic!("no {what} endpoint in {status}"))
        .to_string()
}

#[test]
fn every_cli_command_runs_through_the_daemon() {
    if !requirements("CLI through the daemon", false, &[]) {
        return;
    }
    let mut env = Env::new();
    // A run directory that is a symlink (anyone could have planted it in a shared place) is
    // refused before anything is served from it (`timeout`: a daemon that started anyway
    // would not return).
    fs::create_dir(env.path("elsewhere")).unwrap();
    let link = env.path("run-link");
    std::os::unix::fs::symlink(env.path("elsewhere"), &link).unwrap();
    let out = Command::new("timeout")
        .args(["20", BIN, "daemon", "--pool"])
        .arg(&env.pool)
        .arg("--run-dir")
        .arg(&link)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let e = failed(&["daemon"], out);
    assert!(e.contains("not a directory owned by this user"), "{e}");
    assert_eq!(fs::read_dir(env.path("elsewhere")).unwrap().count(), 0);

    // A run directory anyone may enter: the daemon must make it private.
    fs::create_dir(&env.run_dir).unwrap();
    fs::set_permissions(&env.run_dir, fs::Permissions::from_mode(0o755)).unwrap();
    env.start_daemon();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode();
    assert_eq!(mode(&env.run_dir) & 0o7777, 0o700);
    let sock = env.run_dir.join("control.sock");
    assert!(fs::metadata(&sock).unwrap().file_type().is_socket());
    assert_eq!(mode(&sock) & 0o7777, 0o600);

    // The daemon holds the pool's lock from here on, so every command that succeeds below
    // ran in the daemon (a CLI opening the pool itself would get "in use").
    env.ok(&["device", "create", "a", "--size", "8M"]);
    // Relative paths are the client's, not the daemon's: run in a directory of our own.
    let work = env.path("work");
    fs::create_dir(&work).unwrap();
    let in_work = |args: &[&str]| {
        let out = env.command(args).current_dir(&work).output().unwrap();
        env.succeeded(args, out)
    };
    let data = pattern(3 * 4096 + 100, 1);
    fs::write(work.join("data.bin"), &data).unwrap();
    in_work(&["device", "write", "a", "--offset", "4096", "data.bin"]);
    assert_eq!(env.read("a", 4096, data.len()), data);
    in_work(&[
        "device", "read", "a", "--offset", "4096", "--length", "12388", "out.bin",
    ]);
    assert_eq!(fs::read(work.join("out.bin")).unwrap(), data);

    // stdin reaches the daemon.
    let from_stdin = pattern(64 << 10, 2);
    let args = ["device", "write", "a", "--offset", "1M", "-"];
    env.succeeded(&args, env.run_with_stdin(&args, &from_stdin));
    assert_eq!(env.read("a", MIB, from_stdin.len()), from_stdin);

    // Snapshots are isolated from their origin.
    env.ok(&["device", "snapshot", "a", "s"]);
    let patch = pattern(100, 3);
    let args = ["device", "write", "s", "--offset", "4200", "-"];
    env.succeeded(&args, env.run_with_stdin(&args, &patch));
    assert_eq!(env.read("a", 4096, data.len()), data, "the origin changed");
    let mut want = data.clone();
    want[104..204].copy_from_slice(&patch);
    assert_eq!(env.read("s", 4096, data.len()), want);

    // Export and import with relative paths, then resize and remove.
    in_work(&["device", "export", "a", "a.raw"]);
    let image = fs::read(work.join("a.raw")).unwrap();
    assert_eq!(image.len(), 8 * MIB);
    assert_eq!(&image[4096..4096 + data.len()], &data[..]);
    assert_eq!(&image[MIB..MIB + from_stdin.len()], &from_stdin[..]);
    in_work(&["device", "import", "b", "a.raw"]);
    assert_eq!(env.read("b", 0, 2 * MIB), image[..2 * MIB]);
    env.ok(&["device", "resize", "a", "--size", "16M"]);

    let list = env.json(&["device", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    assert_eq!(find(&list, "a")["size"], 16 * MIB);
    assert_eq!(find(&list, "s")["origin"], "a");
    assert_eq!(find(&list, "b")["size"], 8 * MIB);
    env.ok(&["device", "remove", "b"]);
    let list = env.json(&["device", "list", "--json"]);
    assert!(
        list.as_array().unwrap().iter().all(|d| d["name"] != "b"),
        "{list}"
    );

    let info = env.json(&["pool", "info", "--json"]);
    assert_eq!(info["devices"], 2, "{info}");
    assert_eq!(info["capacity_bytes"], 2u64 << 30, "{info}");
    assert_eq!(
        env.ok_text(&["pool", "grow", "--capacity", "3G"]).trim(),
        "capacity: 3 GiB"
    );
    let info = env.json(&["pool", "info", "--json"]);
    assert_eq!(info["capacity_bytes"], 3u64 << 30, "{info}");
    let check = env.ok_text(&["check"]);
    assert!(check.contains("consistent: 2 devices"), "{check}");

    // Failures come back as one line and exit 1, as without a daemon.
    let e = env.fails(&["device", "read", "nope", "--offset", "0", "--length", "1"]);
    assert!(e.contains("no device named \"nope\""), "{e}");
    // The daemon holds the pool: a command that opens it directly is refused.
    let e = env.fails(&["bench", "shared-read", "--clones", "1", "--size", "1M"]);
    assert!(e.contains("in use") || e.contains("stop the daemon"), "{e}");

    // --pool and --run-dir instead of the environment.
    let out = Command::new(BIN)
        .args(["status", "--json", "--pool"])
        .arg(&env.pool)
        .arg("--run-dir")
        .arg(&env.run_dir)
        .env_remove("HPMAPPER_POOL")
        .env_remove("HPMAPPER_RUN_DIR")
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&env.succeeded(&["status"], out)).unwrap();
    assert_eq!(find(&status["devices"], "a")["size"], 16 * MIB);
    assert_eq!(find(&status["devices"], "s")["origin"], "a");
    assert_eq!(status["attachments"], serde_json::json!([]));
    assert_eq!(endpoint(&status, "control"), sock.display().to_string());
    assert_eq!(
        endpoint(&status, "devices"),
        env.run_dir.join("dev").display().to_string()
    );
    let nbd = endpoint(&status, "nbd");
    assert!(
        nbd.starts_with("nbd+unix://")
            && nbd.contains(&format!("{}/nbd.sock", env.run_dir.display())),
        "{nbd}"
    );
    let engine = &status["engine"];
    assert!(engine["writes"].as_u64().unwrap() > 0, "{status}");
    assert!(engine["reads"].as_u64().unwrap() > 0, "{status}");
    assert!(engine["cow_blocks"].as_u64().unwrap() >= 1, "{status}");
    for key in ["hits", "misses", "intercepted", "cached_bytes", "size"] {
        assert!(status["cache"][key].is_u64(), "no cache.{key} in {status}");
    }
    for key in ["fuse_requests_total", "nbd_connections_total"] {
        assert!(
            status["servers"][key].is_u64(),
            "no servers.{key} in {status}"
        );
    }
    let text = env.ok_text(&["status"]);
    assert!(text.contains("devices:     2"), "{text}");

    // `cache drop` empties the cache: blocks a and s share, read through s, were cached.
    assert_eq!(env.read("s", MIB, from_stdin.len()), from_stdin);
    let cached = env.json(&["status", "--json"])["cache"]["cached_bytes"]
        .as_u64()
        .unwrap();
    assert!(cached >= from_stdin.len() as u64, "{cached}");
    let out = env.ok_text(&["cache", "drop"]);
    assert_eq!(
        out.trim(),
        format!("dropped {cached} bytes from the block cache")
    );
    let status = env.json(&["status", "--json"]);
    assert_eq!(status["cache"]["cached_bytes"], 0, "{status}");
    assert_eq!(env.read("s", MIB, from_stdin.len()), from_stdin);
}

#[test]
fn ext4_on_attached_devices_and_their_snapshots() {
    if !requirements(
        "ext4 on attached devices",
        true,
        &["mkfs.ext4", "e2fsck", "mount", "umount"],
    ) {
        return;
    }
    ext4_flow(&Env::with_daemon(&[]));
}

/// The daemon with `--data-io direct` (O_DIRECT on the data file): unaligned NBD writes
/// (read-modify-write of the blocks they cover in part) land exactly, and ext4 on attached
/// devices and snapshots works as with the page cache.
#[test]
fn direct_data_io_serves_unaligned_nbd_writes_and_ext4() {
    if !requirements(
        "direct data I/O",
        true,
        &["mkfs.ext4", "e2fsck", "mount", "umount", "qemu-io"],
    ) {
        return;
    }
    let env = Env::with_daemon(&["--data-io", "direct"]);
    let info = env.json(&["pool", "info", "--json"]);
    assert_eq!(info["data_io"], "direct", "{info}");
    env.ok(&["device", "create", "disk", "--size", "4M"]);
    let uri = format!(
        "nbd+unix:///disk?socket={}",
        env.run_dir.join("nbd.sock").display()
    );
    let mut want = vec![0u8; 3 * 4096];
    let mut cmds = Vec::new();
    for (pat, off, len) in [
        (0x11u8, 0, 12288),
        (0x22, 100, 5000),
        (0x33, 8190, 3),
        (0x44, 4096, 1),
    ] {
        cmds.push(format!("write -P {pat:#x} {off} {len}"));
        want[off..off + len].fill(pat);
    }
    for (pat, off, len) in [
        (0x11u8, 0, 100),
        (0x22, 100, 3996),
        (0x44, 4096, 1),
        (0x22, 4097, 1003),
        (0x33, 8190, 3),
        (0x11, 8193, 4095),
    ] {
        assert!(want[off..off + len].iter().all(|&b| b == pat));
        cmds.push(format!("read -P {pat:#x} {off} {len}"));
    }
    let mut qemu = Command::new("qemu-io");
    qemu.args(["-f", "raw", &uri]);
    for c in &cmds {
        qemu.args(["-c", c]);
    }
    let out = run_tool(&mut qemu);
    assert!(!out.contains("fail") && !out.contains("error"), "{out}");
    assert_eq!(out.matches("wrote ").count(), 4, "{out}");
    assert_eq!(out.matches("read ").count(), 6, "{out}");
    assert!(
        env.read("disk", 0, want.len()) == want,
        "the CLI does not see the writes"
    );
    ext4_flow(&env);
}

/// `--fuse-io-uring on` with the kernel's FUSE io_uring on: ext4 on attached devices and
/// snapshots works as over /dev/fuse, and the requests did come over io_uring (metrics).
/// The kernel parameter is put back afterwards; the other tests' daemons leave io_uring off.
#[test]
fn fuse_over_io_uring_serves_ext4_on_attached_devices() {
    if !requirements(
        "FUSE over io_uring",
        true,
        &["mkfs.ext4", "e2fsck", "mount", "umount"],
    ) || !hpm_testkit::host::require(
        "FUSE over io_uring",
        true,
        &[hpm_testkit::host::FUSE_URING_PARAM],
        &[],
    ) {
        return;
    }
    let _param = hpm_testkit::host::FuseUring::set(true).unwrap();
    let env = Env::with_daemon(&["--fuse-io-uring", "on", "--metrics", "0"]);
    let port = metrics_port(&env);
    ext4_flow(&env);
    let body = http_get(port, "/metrics");
    let ring = body
        .lines()
        .find_map(|l| l.strip_prefix("hpmapper_fuse_io_uring_requests_total "))
        .unwrap_or_else(|| panic!("no io_uring request count in {body}"));
    let ring: u64 = ring.trim().parse().unwrap();
    assert!(ring > 100, "only {ring} requests over io_uring:\n{body}");
}

/// mkfs, mount, write, snapshot, change both sides, fsck both: the common part of the ext4
/// tests.
fn ext4_flow(env: &Env) {
    env.ok(&["device", "create", "vol", "--size", "256M"]);
    env.ok(&["device", "mkfs", "vol"]);
    let lo = env.attach("vol");
    let sys = Path::new("/sys/block").join(lo.file_name().unwrap());
    let sysfs = |rel: &str| {
        fs::read_to_string(sys.join(rel))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(
        sysfs("loop/dio"),
        "1",
        "direct I/O is off on {}",
        lo.display()
    );
    assert_eq!(sysfs("queue/logical_block_size"), "4096");
    assert_eq!(
        Path::new(&sysfs("loop/backing_file")),
        env.device_file("vol")
    );
    let status = env.json(&["status", "--json"]);
    assert_eq!(
        status["attachments"],
        serde_json::json!([{"device": "vol", "block_device": lo, "read_only": false}])
    );

    let mnt = env.path("mnt-vol");
    mount(&lo, &mnt);
    fs::write(mnt.join("hello.txt"), "hello from the origin\n").unwrap();
    fs::create_dir(mnt.join("dir")).unwrap();
    for i in 0..20 {
        fs::write(mnt.join(format!("dir/f{i}")), format!("file {i}\n")).unwrap();
    }
    let big = pattern(6 * MIB, 7);
    let mut f = fs::File::create(mnt.join("big")).unwrap();
    f.write_all(&big).unwrap();
    f.sync_all().unwrap();
    drop(f);
    run_tool(Command::new("sync").arg("-f").arg(&mnt));

    let e = env.fails(&["device", "detach", "vol"]);
    assert!(e.contains("in use") && e.contains("unmount"), "{e}");
    assert_eq!(
        env.loops_backed_by(&env.device_file("vol")),
        vec![lo.clone()]
    );
    umount(&mnt);
    env.ok(&["device", "detach", "vol"]);
    env.wait_no_loop(&env.device_file("vol"));
    assert_eq!(
        env.json(&["status", "--json"])["attachments"],
        serde_json::json!([])
    );

    // A snapshot of the unmounted filesystem; each side changes, the other must not see it.
    env.ok(&["device", "snapshot", "vol", "snap"]);
    let lo_vol = env.attach("vol");
    let lo_snap = env.attach("snap");
    assert_ne!(lo_vol, lo_snap);
    let attached = env.json(&["status", "--json"])["attachments"].clone();
    assert_eq!(attached.as_array().unwrap().len(), 2, "{attached}");
    let (mv, ms) = (env.path("mnt-vol"), env.path("mnt-snap"));
    mount(&lo_vol, &mv);
    mount(&lo_snap, &ms);
    assert_eq!(fs::read(ms.join("big")).unwrap(), big);
    assert_eq!(fs::read_to_string(ms.join("dir/f7")).unwrap(), "file 7\n");
    fs::write(mv.join("hello.txt"), "changed in the origin\n").unwrap();
    fs::write(mv.join("only-origin"), "o").unwrap();
    fs::write(ms.join("only-snap"), "s").unwrap();
    fs::remove_file(ms.join("dir/f3")).unwrap();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(ms.join("big"))
        .unwrap();
    f.write_all(&pattern(MIB, 8)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    run_tool(Command::new("sync").arg("-f").arg(&mv));
    run_tool(Command::new("sync").arg("-f").arg(&ms));
    let isolated = |mv: &Path, ms: &Path| {
        assert_eq!(
            fs::read_to_string(mv.join("hello.txt")).unwrap(),
            "changed in the origin\n"
        );
        assert_eq!(
            fs::read_to_string(ms.join("hello.txt")).unwrap(),
            "hello from the origin\n"
        );
        assert!(mv.join("only-origin").exists() && !ms.join("only-origin").exists());
        assert!(ms.join("only-snap").exists() && !mv.join("only-snap").exists());
        assert!(mv.join("dir/f3").exists() && !ms.join("dir/f3").exists());
        assert_eq!(fs::read(mv.join("big")).unwrap(), big);
        let snap_big = fs::read(ms.join("big")).unwrap();
        assert!(snap_big[..MIB] == pattern(MIB, 8)[..] && snap_big[MIB..] == big[MIB..]);
    };
    isolated(&mv, &ms);
    umount(&mv);
    umount(&ms);
    fsck_clean(&lo_vol);
    fsck_clean(&lo_snap);
    // From the devices again, cold: the changes reached the pool, each on its own side.
    mount(&lo_vol, &mv);
    mount(&lo_snap, &ms);
    isolated(&mv, &ms);
    umount(&mv);
    umount(&ms);
    env.ok(&["device", "detach", "vol"]);
    env.ok(&["device", "detach", "snap"]);
    env.wait_no_loop(&env.device_file("vol"));
    env.wait_no_loop(&env.device_file("snap"));
    assert_eq!(
        env.json(&["status", "--json"])["attachments"],
        serde_json::json!([])
    );
    let status = env.json(&["status", "--json"]);
    assert!(
        status["engine"]["cow_blocks"].as_u64().unwrap() > 0,
        "{status}"
    );
    assert_eq!(status["servers"]["fuse_errors_total"], 0, "{status}");
    env.ok(&["check"]);
}

#[test]
fn qemu_io_over_nbd_and_the_cli_see_the_same_bytes() {
    if !requirements("NBD through the daemon", false, &["qemu-io"]) {
        return;
    }
    let env = Env::with_daemon(&[]);
    env.ok(&["device", "create", "disk", "--size", "4M"]);
    let uri = format!(
        "nbd+unix:///disk?socket={}",
        env.run_dir.join("nbd.sock").display()
    );
    let out = run_tool(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x5a 0 1M",
        "-c",
        "read -P 0x5a 0 1M",
    ]));
    // qemu-io reports a failed command or pattern check on stdout and still exits 0.
    assert!(
        out.contains("wrote 1048576/1048576") && out.contains("read 1048576/1048576"),
        "{out}"
    );
    assert!(!out.contains("fail") && !out.contains("error"), "{out}");
    let got = env.read("disk", 0, 2 * MIB);
    assert!(
        got[..MIB].iter().all(|&b| b == 0x5a),
        "the CLI does not see the pattern"
    );
    assert!(
        got[MIB..].iter().all(|&b| b == 0),
        "bytes past the write changed"
    );
    let status = env.json(&["status", "--json"]);
    let servers = &status["servers"];
    assert!(
        servers["nbd_connections_total"].as_u64().unwrap() >= 1,
        "{status}"
    );
    assert!(
        servers["nbd_write_bytes_total"].as_u64().unwrap() >= MIB as u64,
        "{status}"
    );
    assert_eq!(servers["nbd_errors_total"], 0, "{status}");
}

/// File `i` of the durability workload.
fn numbered(dir: &Path, i: u64) -> PathBuf {
    dir.join(format!("f{i:05}"))
}

/// Writes numbered 64 KiB files into `dir`, fsyncing each file and then the directory, and
/// appends each number to `log` once both fsyncs returned. Stops at `stop` or at the first
/// error (the daemon under the filesystem was killed); returns that error.
fn fsync_workload(dir: &Path, log: &Path, stop: &AtomicBool) -> Option<std::io::Error> {
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let run = |i: u64| -> std::io::Result<()> {
        let mut f = fs::File::create(numbered(dir, i))?;
        f.write_all(&pattern(64 << 10, i))?;
        f.sync_all()?;
        fs::File::open(dir)?.sync_all()
    };
    for i in 0.. {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        if let Err(e) = run(i) {
            return Some(e);
        }
        // IMPORTANT: only after the fsyncs returned; the log is outside the mount.
        writeln!(log, "{i}").unwrap();
    }
    None
}

/// Sets its flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The numbers in the workload's log.
fn logged(log: &Path) -> BTreeSet<u64> {
    fs::File::open(log)
        .map(|f| {
            std::io::BufReader::new(f)
                .lines()
                .map(|l| l.unwrap().parse().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn fsynced_files_survive_a_sigkill_of_the_daemon() {
    if !requirements(
        "SIGKILL durability",
        true,
        &["mkfs.ext4", "e2fsck", "mount", "umount"],
    ) {
        return;
    }
    let mut env = Env::with_daemon(&[]);
    env.ok(&["device", "create", "dur", "--size", "256M"]);
    env.ok(&["device", "mkfs", "dur"]);
    let lo = env.attach("dur");
    let mnt = env.path("mnt");
    mount(&lo, &mnt);

    let log = env.path("fsynced.log");
    // Stops the workload if the test fails before the kill (dropped before `env`).
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let (done_tx, done) = std::sync::mpsc::channel();
    {
        let (mnt, log, stop) = (mnt.clone(), log.clone(), stop.0.clone());
        std::thread::spawn(move || {
            let _ = done_tx.send(fsync_workload(&mnt, &log, &stop));
        });
    }
    // Only a guard against a hang: a loaded machine can take long over these fsyncs.
    let deadline = Instant::now() + Duration::from_secs(180);
    while logged(&log).len() < 64 {
        if let Ok(e) = done.try_recv() {
            panic!("the workload stopped before the kill: {e:?}");
        }
        assert!(Instant::now() < deadline, "64 fsyncs took over 180 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    env.kill_daemon();
    // The workload runs on: the export's connection died with the daemon, so its next
    // write or fsync must fail (not hang, and not succeed).
    let ended = done
        .recv_timeout(Duration::from_secs(30))
        .expect("the workload hangs after the daemon was killed");
    let error = ended.expect("the workload stopped without an error");
    let durable = logged(&log);
    eprintln!(
        "killed after {} fsynced files; the workload then failed with: {error}",
        durable.len()
    );

    // The dead filesystem and its loop device go; the FUSE mount at run/dev is dead too and
    // the next daemon replaces it.
    run_tool(Command::new("umount").arg("-l").arg(&mnt));
    let file = env.device_file("dur");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.loops_backed_by(&file).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for dev in env.loops_backed_by(&file) {
        // Autoclear did not run (a holder is left): detach by hand.
        detach_loop(&dev);
    }
    // The crashed pool checks clean directly (journal replay happens at open).
    let check = env.ok_text(&["check"]);
    assert!(check.contains("consistent: 1 device"), "{check}");

    env.start_daemon();
    let check = env.ok_text(&["check"]);
    assert!(check.contains("consistent: 1 device"), "{check}");
    let lo = env.attach("dur");
    // ext4's journal may need recovery: mounting replays it.
    mount(&lo, &mnt);
    for &i in &durable {
        let got = fs::read(numbered(&mnt, i))
            .unwrap_or_else(|e| panic!("fsynced file {i} is gone after the crash: {e}"));
        assert!(
            got == pattern(64 << 10, i),
            "fsynced file {i} has other content after the crash ({} bytes)",
            got.len()
        );
    }
    umount(&mnt);
    fsck_clean(&lo);
    env.ok(&["device", "detach", "dur"]);
    env.wait_no_loop(&file);
    env.ok(&["check"]);
}

#[test]
fn a_detached_device_still_open_elsewhere_is_never_attached_twice() {
    if !requirements("detach while open", true, &[]) {
        return;
    }
    let env = Env::with_daemon(&[]);
    env.ok(&["device", "create", "held", "--size", "1M"]);
    let file = env.device_file("held");
    let lo = env.attach("held");
    // Someone (a prober, a backup tool) has the block device open, not mounted: detach
    // succeeds, and the kernel clears the device on that holder's last close.
    let holder = fs::File::open(&lo).unwrap();
    env.ok(&["device", "detach", "held"]);
    assert_eq!(env.loops_backed_by(&file), std::slice::from_ref(&lo));
    let e = env.fails(&["device", "attach", "held"]);
    assert!(
        e.contains("still attached as") && e.contains("\"held\""),
        "{e}"
    );
    assert_eq!(env.loops_backed_by(&file), std::slice::from_ref(&lo));
    drop(holder);
    env.wait_no_loop(&file);
    let again = env.attach("held");
    assert_eq!(env.loops_backed_by(&file), [again]);
    env.ok(&["device", "detach", "held"]);
    env.wait_no_loop(&file);
}

#[test]
fn sigterm_detaches_closes_the_pool_and_exits_0() {
    if !requirements("SIGTERM", true, &[]) {
        return;
    }
    let mut env = Env::with_daemon(&[]);
    env.ok(&["device", "create", "t1", "--size", "1M"]);
    let data = pattern(10_000, 9);
    let args = ["device", "write", "t1", "--offset", "0", "-"];
    env.succeeded(&args, env.run_with_stdin(&args, &data));
    env.ok(&["device", "snapshot", "t1", "t2", "--read-only"]);
    // Attached but not mounted: the daemon detaches it on the way out.
    env.attach("t1");

    let status = env
        .terminate_daemon(Duration::from_secs(20))
        .expect("the daemon did not exit within 20 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "{status}\n{}", env.log());
    assert!(
        !env.run_dir.join("control.sock").exists(),
        "the control socket is left behind"
    );
    assert!(env.mounts().is_empty(), "still mounted: {:?}", env.mounts());
    assert_eq!(
        env.loops_backed_by(&env.device_file("t1")),
        Vec::<PathBuf>::new()
    );

    // Without a daemon the CLI opens the pool itself: closed cleanly, nothing to replay.
    let check = env.ok_text(&["check"]);
    assert!(check.contains("consistent: 2 devices"), "{check}");
    assert!(!check.contains("not closed cleanly"), "{check}");
    let list = env.json(&["device", "list", "--json"]);
    assert_eq!(find(&list, "t2")["read_only"], true);
    assert_eq!(env.read("t2", 0, data.len()), data);
    let e = env.fails(&["status"]);
    assert!(e.contains("no hpmapper daemon"), "{e}");
}

/// A control command running when SIGTERM comes finishes and gets its reply before the
/// daemon closes the pool and exits 0.
#[test]
fn sigterm_lets_a_running_control_command_finish_and_reply() {
    if !requirements("SIGTERM with a command running", false, &["mkfifo"]) {
        return;
    }
    let mut env = Env::with_daemon(&[]);
    env.ok(&["device", "create", "a", "--size", "1M"]);
    // The daemon writes from a FIFO: the command runs until the FIFO's writer closes it.
    let fifo = env.path("fifo");
    run_tool(Command::new("mkfifo").arg(&fifo));
    let client = env
        .command(&[
            "device",
            "write",
            "a",
            "--offset",
            "0",
            fifo.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Opening for writing returns once the daemon has opened it: the command is running.
    let mut writer = fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    env.signal_daemon("TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !env.log().contains("SIGTERM: shutting down") {
        assert!(
            Instant::now() < deadline,
            "no SIGTERM in the log:\n{}",
            env.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let data = pattern(3 * 4096, 5);
    writer.write_all(&data).unwrap();
    drop(writer);
    let out = client.wait_with_output().unwrap();
    env.succeeded(&["device", "write"], out);
    let status = env
        .terminate_daemon(Duration::from_secs(20))
        .expect("the daemon did not exit after the command");
    assert_eq!(status.code(), Some(0), "{status}\n{}", env.log());
    assert!(env.log().contains("pool closed cleanly"), "{}", env.log());
    assert_eq!(env.read("a", 0, data.len()), data);
}

/// The port of the metrics endpoint a daemon started with `--metrics 0` (the kernel's
/// choice, so no other process can take it first) reports in `status --json`.
fn metrics_port(env: &Env) -> u16 {
    let url = endpoint(&env.json(&["status", "--json"]), "metrics");
    let port = url
        .strip_prefix("http://127.0.0.1:")
        .and_then(|r| r.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("metrics endpoint {url}"));
    port.parse().unwrap()
}

/// One HTTP/1.1 GET; the whole response. The request goes out in two segments, as a
/// client may send it: the server must read up to the end of the head.
fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"GET ").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    write!(s, "{path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp
}

/// Whether a TCP socket listens on 127.0.0.1:`port` (/proc/net/tcp: local address in hex,
/// state 0A = LISTEN), and on no other IPv4 address.
fn listens_on_loopback_only(port: u16) -> bool {
    let table = fs::read_to_string("/proc/net/tcp").unwrap();
    let listening: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(3) == Some(&"0A")).then(|| f[1].to_string())
        })
        .filter(|local| local.ends_with(&format!(":{port:04X}")))
        .collect();
    listening == [format!("0100007F:{port:04X}")]
}

#[test]
fn metrics_serve_prometheus_text_on_loopback() {
    if !requirements("metrics", false, &[]) {
        return;
    }
    let env = Env::with_daemon(&["--metrics", "0"]);
    let port = metrics_port(&env);
    env.ok(&["device", "create", "m", "--size", "1M"]);
    let args = ["device", "write", "m", "--offset", "0", "-"];
    env.succeeded(&args, env.run_with_stdin(&args, &pattern(8192, 4)));
    env.read("m", 0, 8192);

    let status = env.json(&["status", "--json"]);
    assert_eq!(
        endpoint(&status, "metrics"),
        format!("http://127.0.0.1:{port}/metrics")
    );
    assert!(
        listens_on_loopback_only(port),
        "{}",
        fs::read_to_string("/proc/net/tcp").unwrap()
    );

    let resp = http_get(port, "/metrics");
    let (head, body) = resp.split_once("\r\n\r\n").expect("no HTTP header end");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("Content-Type: text/plain"), "{head}");
    let mut values = std::collections::BTreeMap::new();
    for line in body.lines() {
        if let Some(comment) = line.strip_prefix('#') {
            assert!(
                comment.starts_with(" HELP hpmapper_") || comment.starts_with(" TYPE hpmapper_"),
                "{line}"
            );
            continue;
        }
        let (name, v) = line.split_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        assert!(name.starts_with("hpmapper_"), "{line}");
        values.insert(name.to_string(), v.parse::<u64>().unwrap());
    }
    assert!(
        body.contains("# TYPE hpmapper_reads_total counter"),
        "{body}"
    );
    assert!(values["hpmapper_reads_total"] > 0, "{body}");
    assert!(values["hpmapper_writes_total"] > 0, "{body}");
    assert!(values["hpmapper_write_bytes_total"] >= 8192, "{body}");
    assert_eq!(values["hpmapper_pool_devices"], 1, "{body}");
    assert_eq!(values["hpmapper_pool_capacity_bytes"], 2 << 30, "{body}");
    for name in [
        "hpmapper_cache_hits_total",
        "hpmapper_cache_misses_total",
        "hpmapper_cache_intercepted_total",
        "hpmapper_attachments",
        "hpmapper_fuse_requests_total",
        "hpmapper_fuse_read_cache_bytes_total",
        "hpmapper_nbd_connections_total",
    ] {
        assert!(values.contains_key(name), "no {name} in {body}");
    }
    let resp = http_get(port, "/other");
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
}

/// A full pool under ext4: the writes that find no space fail (the writer sees an error,
/// the daemon logs why), the daemon and the other devices carry on, nothing flushed before
/// is lost, `check` stays clean; after `pool grow` (while the daemon runs) the space is
/// there for new writes.
#[test]
fn a_full_pool_fails_writes_clearly_and_takes_them_again_after_growing() {
    if !requirements(
        "full pool under ext4",
        true,
        &["mkfs.ext4", "e2fsck", "mount", "umount"],
    ) {
        return;
    }
    let mut env = Env::new_in(&std::env::temp_dir(), "192M");
    env.start_daemon();
    for name in ["filler", "bystander"] {
        env.ok(&["device", "create", name, "--size", "512M"]);
        env.ok(&["device", "mkfs", name]);
    }
    let (lo_f, lo_b) = (env.attach("filler"), env.attach("bystander"));
    let (mnt_f, mnt_b) = (env.path("mnt-filler"), env.path("mnt-bystander"));
    mount(&lo_f, &mnt_f);
    // The bystander writes nothing while the pool is full (no atime updates, its dirty
    // metadata written home first): its ext4 must stay clean for the fsck at the end.
    fs::create_dir_all(&mnt_b).unwrap();
    let st = Command::new("mount")
        .args(["-o", "noatime"])
        .arg(&lo_b)
        .arg(&mnt_b)
        .status()
        .unwrap();
    assert!(st.success(), "mount -o noatime: {st}");
    let kept = pattern(MIB, 11);
    fs::write(mnt_b.join("kept"), &kept).unwrap();
    assert!(Command::new("sync").status().unwrap().success());

    // Write until the pool is full: 256 MiB into a 192 MiB pool fails, at the latest at
    // the fsync.
    let chunk = pattern(4 * MIB, 12);
    let failed = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(mnt_f.join("big"))?;
        for _ in 0..64 {
            f.write_all(&chunk)?;
        }
        f.sync_all()
    })();
    let e = failed.expect_err("256 MiB fit in a 192 MiB pool");
    // ENOSPC (28) or EIO (5), as ext4 reports a failed write-back.
    assert!(matches!(e.raw_os_error(), Some(28) | Some(5)), "{e}");
    let log = env.log();
    assert!(
        log.contains("the pool is full: no free block for device \"filler\""),
        "{log}"
    );
    // (Nearly) every block in use: a few may have been freed since the last refusal.
    let info = env.json(&["pool", "info", "--json"]);
    let (used, capacity) = (info["used_bytes"].as_u64(), info["capacity_bytes"].as_u64());
    assert!(used.unwrap() > capacity.unwrap() / 100 * 99, "{info}");

    // The rest carries on: the bystander reads what it flushed (a write of its own needing
    // a new block would fail too), and the pool's metadata is consistent.
    assert_eq!(fs::read(mnt_b.join("kept")).unwrap(), kept);
    let check = env.ok_text(&["check"]);
    assert!(check.contains("consistent"), "{check}");

    // More space, while everything stays mounted: new writes land.
    env.ok(&["pool", "grow", "--capacity", "512M"]);
    let more = pattern(32 * MIB, 14);
    fs::write(mnt_b.join("more"), &more).unwrap();
    fs::File::open(mnt_b.join("more"))
        .unwrap()
        .sync_all()
        .unwrap();
    umount(&mnt_b);
    fsck_clean(&lo_b);
    mount(&lo_b, &mnt_b);
    assert_eq!(fs::read(mnt_b.join("more")).unwrap(), more);
    assert_eq!(fs::read(mnt_b.join("kept")).unwrap(), kept);
    umount(&mnt_b);
    // The filler's filesystem saw write errors (as on a full dm-thin pool); it unmounts.
    umount(&mnt_f);
    env.ok(&["device", "detach", "filler"]);
    env.ok(&["device", "detach", "bystander"]);
    let check = env.ok_text(&["check"]);
    assert!(check.contains("consistent: 2 devices"), "{check}");
}
