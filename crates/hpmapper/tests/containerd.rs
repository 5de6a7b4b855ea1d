//! The real containerd 1.6 (Debian's) on the real `hpmapper daemon --containerd-socket`,
//! registered as the proxy snapshotter `hpmapper`: image import and unpack, containers run
//! with `ctr run`, `ctr snapshots` (ls, info, usage, label, prepare, view, mounts, commit,
//! rm) with the errors containerd expects, garbage collection down to no device, restarts of
//! containerd and of the daemon, and the same file tree as containerd's own overlayfs
//! snapshotter.
//!
//! Each test runs a daemon and a private containerd of its own (see `containerd_env`), so
//! they run in parallel. The images hold only a static busybox and what the tests write.
//!
//! Needs root, /dev/fuse, loop devices, containerd, ctr, runc, containerd-shim-runc-v2, a
//! static busybox, mkfs.ext4 and sha256sum: a missing one fails the test under CI=true and
//! skips it otherwise.

mod containerd_env;
#[allow(dead_code)] // a part of the daemon tests' harness
mod daemon_env;
#[allow(dead_code)] // image helpers of the Docker tests' harness
mod docker_env;

use containerd_env::*;
use docker_env::{busybox_rootfs, image_archive, LayerTar};
use std::collections::BTreeSet;

/// The test image: busybox, then a layer with `/data`, then one deleting `/data/victim`
/// (a whiteout) and making `/data/opq` opaque.
fn test_image(tag: &str) -> Vec<u8> {
    let l2 = LayerTar::new()
        .dir("data/", 0o755)
        .dir("data/keep/", 0o755)
        .file("data/keep/x", 0o644, b"x\n")
        .file("data/keep/y", 0o644, b"y\n")
        .file("data/victim", 0o644, b"victim\n")
        .dir("data/opq/", 0o755)
        .file("data/opq/old", 0o644, b"old\n")
        .file("data/big", 0o644, &vec![7u8; 3 << 20])
        .finish();
    let l3 = LayerTar::new()
        .dir("data/", 0o755)
        .file("data/.wh.victim", 0o644, b"")
        .dir("data/opq/", 0o755)
        .file("data/opq/.wh..wh..opq", 0o644, b"")
        .file("data/opq/new", 0o600, b"new\n")
        .finish();
    image_archive(tag, &[busybox_rootfs(), l2, l3])
}

/// The image's full name in containerd.
const IMAGE: &str = "docker.io/library/hpm:1";

/// A container workload: changes files, then prints the tree of /data and /bin with modes,
/// owners, types, link targets, and sizes and checksums of regular files.
const WORKLOAD: &str = "echo new > /data/new && rm /data/keep/y && chmod 600 /data/keep/x \
 && mkdir -p /data/d/e && ln -s ../keep /data/d/link && echo more >> /data/big \
 && rm /bin/wc /data/opq/new && mkdir /data/opq/again; \
 find /data /bin | sort | while read f; do \
   if [ -f \"$f\" ] && [ ! -L \"$f\" ]; then echo \"$f $(stat -c '%a %u %g %s' \"$f\") $(md5sum < \"$f\")\"; \
   else echo \"$f $(stat -c '%a %u %g %F %N' \"$f\")\"; fi; done";

#[test]
fn ctr_import_run_inspect_and_gc_to_no_device() {
    if !containerd_requirements("the containerd workflow") {
        return;
    }
    let h = HpmContainerd::start();
    let c = &h.containerd;
    let imported = c.import(SNAPSHOTTER, &test_image("hpm:1"));
    assert!(imported.contains("hpm:1"), "{imported}");

    // Three layers unpacked: committed snapshots in a chain.
    let snaps = c.snapshots(SNAPSHOTTER);
    assert_eq!(snaps.len(), 3, "{snaps:?}");
    assert!(
        snaps.iter().all(|(_, _, kind)| kind == "Committed"),
        "{snaps:?}"
    );
    let roots: Vec<_> = snaps.iter().filter(|(_, p, _)| p.is_empty()).collect();
    assert_eq!(roots.len(), 1, "{snaps:?}");

    // A container that reads the image and writes: the whiteout and the opaque directory
    // are honoured.
    let out = c.ok(&[
        "run",
        "--rm",
        "--snapshotter",
        SNAPSHOTTER,
        IMAGE,
        "c0",
        "sh",
        "-c",
        "ls /data /data/opq; cat /data/keep/x; echo hello > /data/hello; cat /data/hello; \
         grep -c . /proc/mounts >/dev/null && grep ' / ' /proc/mounts | cut -d' ' -f3",
    ]);
    assert_eq!(
        out, "/data:\nbig\nkeep\nopq\n\n/data/opq:\nnew\nx\nhello\next4",
        "{out}"
    );

    // A container kept after it ran: its active snapshot, its usage, labels.
    c.ok(&[
        "run",
        "--snapshotter",
        SNAPSHOTTER,
        IMAGE,
        "c1",
        "sh",
        "-c",
        "dd if=/dev/zero of=/data/blob bs=64k count=16 2>/dev/null; sync",
    ]);
    let snaps = c.snapshots(SNAPSHOTTER);
    let active: Vec<_> = snaps.iter().filter(|(k, _, _)| k == "c1").collect();
    assert_eq!(active.len(), 1, "{snaps:?}");
    assert_eq!(active[0].2, "Active");
    let top = active[0].1.clone();
    let usage = c.ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "usage", "c1"]);
    let bytes = usage_bytes(&usage, "c1");
    assert!(
        bytes >= 1 << 20,
        "c1 wrote 1 MiB but owns {bytes} bytes: {usage}"
    );
    let base_usage = usage_bytes(
        &c.ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "usage", &top]),
        &top,
    );
    assert!(base_usage > 0, "the top layer owns nothing");
    c.ok(&[
        "snapshots",
        "--snapshotter",
        SNAPSHOTTER,
        "label",
        "c1",
        "hpmapper.test/colour=blue",
    ]);
    let info = c.ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "info", "c1"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["Kind"], "Active", "{info}");
    assert_eq!(info["Parent"], top.as_str(), "{info}");
    assert_eq!(info["Labels"]["hpmapper.test/colour"], "blue", "{info}");

    // A parent with children cannot go.
    let err = c.fails(&["snapshots", "--snapshotter", SNAPSHOTTER, "rm", &top]);
    assert!(
        err.contains("precondition") || err.contains("children"),
        "{err}"
    );

    // Devices: one per snapshot plus the base volume. containerd removes c0's snapshot
    // (`run --rm`) from its metadata at once but from the snapshotter in its next garbage
    // collection, which runs in the background: wait for it.
    let devices = wait_for(|| {
        let d = h.devices();
        (d.len() == 5).then_some(d)
    });
    assert!(devices.is_some(), "{:?}", h.devices());

    // Everything removed, then containerd's GC: no device is left in the pool.
    c.ok(&["containers", "rm", "c1"]);
    c.ok(&["images", "rm", "--sync", IMAGE]);
    let snaps = wait_for(|| {
        let s = c.snapshots(SNAPSHOTTER);
        s.is_empty().then_some(s)
    });
    assert!(
        snaps.is_some(),
        "snapshots left: {:?}",
        c.snapshots(SNAPSHOTTER)
    );
    let devices = wait_for(|| {
        let d = h.devices();
        d.is_empty().then_some(d)
    });
    assert!(
        devices.is_some(),
        "devices left after GC: {:?}",
        h.devices()
    );
    h.env.ok(&["check"]);
}

#[test]
fn snapshot_calls_and_their_errors() {
    if !containerd_requirements("ctr snapshots calls") {
        return;
    }
    let h = HpmContainerd::start();
    let c = &h.containerd;
    let s = ["snapshots", "--snapshotter", SNAPSHOTTER];
    let sn =
        |args: &[&str]| -> Vec<String> { s.iter().chain(args).map(|a| a.to_string()).collect() };
    let ok = |args: &[&str]| {
        let v = sn(args);
        c.ok(&v.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let fails = |args: &[&str]| {
        let v = sn(args);
        c.fails(&v.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // Keys are opaque: spaces and slashes.
    let k = "a key/with slashes and spaces";
    ok(&["prepare", k]);
    let mnt = h.env.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let cmd = ok(&["mounts", mnt.to_str().unwrap(), k]);
    assert!(cmd.starts_with("mount -t ext4 /dev/loop"), "{cmd}");
    run_sh(&cmd);
    std::fs::write(mnt.join("file"), b"in the layer\n").unwrap();
    assert!(
        !mnt.join("lost+found").exists(),
        "the root holds lost+found"
    );
    run_sh(&format!("umount {}", mnt.display()));

    // Duplicate keys, unknown parents, parents that are not committed.
    assert!(fails(&["prepare", k]).contains("already exists"));
    assert!(fails(&["prepare", "x", "no such parent"]).contains("not found"));
    let e = fails(&["prepare", "x", k]);
    assert!(
        e.contains("not a committed") || e.contains("invalid"),
        "{e}"
    );

    // Commit, then a child (prepare) and a view of it.
    ok(&["commit", "layer one", k]);
    assert!(fails(&["info", k]).contains("not found"));
    ok(&["prepare", "child", "layer one"]);
    ok(&["view", "a view", "layer one"]);
    let cmd = ok(&["mounts", mnt.to_str().unwrap(), "child"]);
    run_sh(&cmd);
    assert_eq!(
        std::fs::read(mnt.join("file")).unwrap(),
        b"in the layer\n",
        "the child does not see its parent's file"
    );
    std::fs::write(mnt.join("file"), b"changed by the child\n").unwrap();
    run_sh(&format!("umount {}", mnt.display()));
    let cmd = ok(&["mounts", mnt.to_str().unwrap(), "a view"]);
    assert!(cmd.contains("ro"), "a view mounts read-write: {cmd}");
    run_sh(&cmd);
    assert_eq!(std::fs::read(mnt.join("file")).unwrap(), b"in the layer\n");
    assert!(
        std::fs::write(mnt.join("other"), b"x").is_err(),
        "a view is writable"
    );
    run_sh(&format!("umount {}", mnt.display()));

    // Kinds, removal order.
    let kinds: BTreeSet<(String, String)> = c
        .snapshots(SNAPSHOTTER)
        .into_iter()
        .map(|(k, _, kind)| (k, kind))
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            ("a view".to_string(), "View".to_string()),
            ("child".to_string(), "Active".to_string()),
            ("layer one".to_string(), "Committed".to_string()),
        ])
    );
    let e = fails(&["commit", "x", "a view"]);
    assert!(
        e.contains("not active") || e.contains("precondition"),
        "{e}"
    );
    let e = fails(&["rm", "layer one"]);
    assert!(e.contains("precondition") || e.contains("children"), "{e}");
    ok(&["rm", "a view"]);
    ok(&["rm", "child"]);
    ok(&["rm", "layer one"]);
    assert!(c.snapshots(SNAPSHOTTER).is_empty());
    h.env.ok(&["check"]);
}

/// First run: writes /data/state; later runs print it.
const KEEP_SCRIPT: &str =
    "if [ -e /data/state ]; then echo found: $(cat /data/state); else echo before > /data/state; fi";

#[test]
fn snapshots_survive_restarts_of_containerd_and_the_daemon() {
    if !containerd_requirements("containerd restarts") {
        return;
    }
    let mut h = HpmContainerd::start();
    h.containerd.import(SNAPSHOTTER, &test_image("hpm:1"));
    h.containerd.ok(&[
        "run",
        "--snapshotter",
        SNAPSHOTTER,
        IMAGE,
        "keep",
        "sh",
        "-c",
        KEEP_SCRIPT,
    ]);
    let before = h.containerd.snapshots(SNAPSHOTTER);

    // containerd restarts, then the daemon, then both in the other order.
    h.containerd.stop();
    h.containerd.start();
    assert_eq!(h.containerd.snapshots(SNAPSHOTTER), before);
    h.restart_daemon();
    assert_eq!(h.containerd.snapshots(SNAPSHOTTER), before);
    h.containerd.stop();
    h.restart_daemon();
    h.containerd.start();
    assert_eq!(h.containerd.snapshots(SNAPSHOTTER), before);

    // The kept container runs again on its snapshot and finds what it wrote; a new one
    // runs on the image.
    let out = h.containerd.ok(&["tasks", "start", "keep"]);
    assert_eq!(out, "found: before");
    h.containerd.ok(&["containers", "rm", "keep"]);
    let out = h.containerd.ok(&[
        "run",
        "--rm",
        "--snapshotter",
        SNAPSHOTTER,
        IMAGE,
        "again",
        "cat",
        "/data/keep/x",
    ]);
    assert_eq!(out, "x");
    h.env.ok(&["check"]);
}

#[test]
fn the_same_tree_as_containerds_overlayfs_snapshotter() {
    if !containerd_requirements("equivalence with overlayfs") {
        return;
    }
    let h = HpmContainerd::start();
    let c = &h.containerd;
    c.import(SNAPSHOTTER, &test_image("hpm:1"));
    c.import("overlayfs", &test_image("hpm:1"));
    let ours = c.ok(&[
        "run",
        "--rm",
        "--snapshotter",
        SNAPSHOTTER,
        IMAGE,
        "ours",
        "sh",
        "-c",
        WORKLOAD,
    ]);
    let theirs = c.ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "overlayfs",
        IMAGE,
        "theirs",
        "sh",
        "-c",
        WORKLOAD,
    ]);
    assert!(ours.lines().count() > 20, "{ours}");
    assert!(ours.contains("/data/d/link"), "{ours}");
    assert!(
        !ours.contains("/bin/wc") && !ours.contains("/data/keep/y"),
        "{ours}"
    );
    assert_eq!(ours, theirs, "hpmapper and overlayfs trees differ");
}

/// The size column of `ctr snapshots usage KEY` for `key`.
fn usage_bytes(out: &str, key: &str) -> u64 {
    // KEY  SIZE  INODES, SIZE in human units ("1.2 MiB"): ask for the row and parse.
    let line = out
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} in {out}"));
    let rest = line[key.len()..].trim();
    let mut f = rest.split_whitespace();
    let num: f64 = f.next().unwrap().parse().unwrap();
    let unit = f.next().unwrap_or("B");
    let mult = match unit {
        "B" => 1.0,
        "KiB" | "kB" => 1024.0,
        "MiB" | "MB" => 1048576.0,
        "GiB" | "GB" => 1073741824.0,
        _ => panic!("unit {unit} in {out}"),
    };
    (num * mult) as u64
}

/// `sh -c cmd`, which must succeed.
fn run_sh(cmd: &str) {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `f` for up to 120 s until it returns something (containerd's background garbage
/// collection waits longer between runs the longer a run took: long on a loaded machine).
fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn orphan_devices_are_removed_and_corrupt_metadata_is_refused() {
    if !daemon_env::requirements("snapshotter recovery", false, &[]) {
        return;
    }
    let mut env = daemon_env::Env::new();
    let socket = env.path("snap.sock");
    let args = ["--containerd-socket", socket.to_str().unwrap()];
    // A device of containerd's namespace that no snapshot names (a crash between making a
    // layer and recording it) and one of Docker's namespace.
    env.ok(&["device", "create", "containerd/42", "--size", "16M"]);
    env.ok(&["device", "create", "docker/keep", "--size", "16M"]);
    env.set_daemon_args(&args);
    env.start_daemon();
    let names: Vec<String> = env
        .json(&["device", "list", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["docker/keep"], "the orphan was not removed");
    assert!(env.log().contains("no snapshot names"), "{}", env.log());
    env.terminate_daemon(std::time::Duration::from_secs(20))
        .expect("the daemon did not stop");

    // Metadata that does not parse: the daemon refuses to start, naming the file, and
    // leaves the file as it was.
    let meta = env.pool.join("containerd/snapshots.json");
    std::fs::write(&meta, b"{\"version\": 1, \"next_id\": ").unwrap();
    let out = std::process::Command::new(daemon_env::BIN)
        .arg("daemon")
        .arg("--pool")
        .arg(&env.pool)
        .arg("--run-dir")
        .arg(&env.run_dir)
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("snapshots.json") && err.contains("corrupt"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&meta).unwrap(),
        b"{\"version\": 1, \"next_id\": "
    );
    assert!(!socket.exists(), "the socket outlived a failed start");
    env.ok(&["check"]);
}
