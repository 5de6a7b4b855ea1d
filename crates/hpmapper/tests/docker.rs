//! The real dockerd 20.10 on the real `hpmapper daemon --docker`: the everyday Docker
//! workflow, equivalence with a driver we did not write (`vfs`), restarts of dockerd and of
//! the daemon, 16 containers at once and the space they give back, hostile layers, and the
//! `size` storage option.
//!
//! Each test runs a daemon and a private dockerd of its own (plugin `hpmtest-<pid>-<n>`, data
//! in a temporary directory on /var/tmp), so they run in parallel; see `docker_env`. The
//! images hold only a static busybox and what the tests write.
//!
//! Needs root, /dev/fuse, loop devices, dockerd and the docker.io 20.10 client
//! (/usr/bin/docker), a static busybox (/usr/bin/busybox), mkfs.ext4 and sha256sum: a
//! missing one fails the test under CI=true and skips it otherwise.

#[allow(dead_code)] // the Docker tests use a part of the daemon tests' harness
mod daemon_env;
mod docker_env;

use docker_env::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An image on `bb:base` whose layers add, change and delete files: `/data/gone` (a
/// directory tree), `/data/victim` and `/bin/stat` (from the base layer) are deleted
/// (whiteouts), `/data/opq` is deleted and made again with other content.
const BUILT_DOCKERFILE: &str = "FROM bb:base
RUN mkdir -p /data/keep /data/gone/sub /data/opq \
 && echo keep > /data/keep/f && echo gone > /data/gone/sub/f \
 && echo old > /data/opq/old && echo victim > /data/victim
RUN rm -r /data/gone /data/victim /data/opq /bin/stat \
 && mkdir /data/opq && echo new > /data/opq/new && echo changed > /data/keep/f
";

/// What `find /data | sort` shows in `BUILT_DOCKERFILE`'s image.
const BUILT_DATA: &str = "/data\n/data/keep\n/data/keep/f\n/data/opq\n/data/opq/new";

/// The layer tars of a `docker save` archive, bottom first, as (name, header, data) entries.
fn saved_layers(archive: &[u8]) -> Vec<Vec<(String, tar::Header, Vec<u8>)>> {
    let files: BTreeMap<String, Vec<u8>> = tar_entries(archive)
        .into_iter()
        .map(|(name, _, data)| (name, data))
        .collect();
    let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    manifest[0]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| tar_entries(&files[l.as_str().unwrap()]))
        .collect()
}

#[test]
fn import_build_run_exec_diff_commit_save_load_rm_rmi() {
    if !docker_requirements("the Docker workflow") {
        return;
    }
    let h = HpmDocker::start();
    let d = &h.dockerd;

    // import and build: deleted files, a deleted tree, a directory deleted and made again.
    d.import("bb:base", &busybox_rootfs());
    d.build("bb:built", BUILT_DOCKERFILE);
    let out = d.ok(&[
        "run",
        "--rm",
        "bb:built",
        "sh",
        "-c",
        "find /data | sort; cat /data/keep/f; [ -e /bin/stat ] || echo no-stat",
    ]);
    assert_eq!(out, format!("{BUILT_DATA}\nchanged\nno-stat"));

    // The build's last layer (our Diff, replayed by dockerd from its tar-split record and
    // our Get) carries the deletions as whiteouts and nothing of the deleted tree.
    let saved = d.save("built.tar", &["bb:built"]);
    let layers = saved_layers(&saved);
    assert_eq!(layers.len(), 3, "base + 2 RUN layers");
    let names: BTreeSet<&str> = layers[2].iter().map(|(n, _, _)| n.as_str()).collect();
    for want in [
        "bin/.wh.stat",
        "data/.wh.gone",
        "data/.wh.victim",
        "data/opq/.wh.old",
        "data/opq/new",
        "data/keep/f",
    ] {
        assert!(
            names.contains(want),
            "no {want} in the last layer: {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n.starts_with("data/gone/")),
        "{names:?}"
    );

    // Opaque directories and whiteouts as overlay2 writes them, through ApplyDiff: a
    // hand-made image whose third layer makes /op and /op2 opaque (the marker before and
    // after the new content: it hides only what lower layers had) and deletes /keep/x.
    let l1 = LayerTar::new()
        .dir("op/", 0o755)
        .file("op/a", 0o644, b"a\n")
        .dir("op/sub/", 0o755)
        .file("op/sub/b", 0o644, b"b\n")
        .dir("op2/", 0o755)
        .file("op2/old", 0o644, b"old\n")
        .dir("keep/", 0o755)
        .file("keep/x", 0o644, b"x\n")
        .file("keep/y", 0o644, b"y\n")
        .finish();
    let l2 = LayerTar::new()
        .dir("op/", 0o755)
        .file("op/.wh..wh..opq", 0o644, b"")
        .file("op/new", 0o600, b"new\n")
        .dir("op2/", 0o755)
        .file("op2/new2", 0o644, b"new2\n")
        .file("op2/.wh..wh..opq", 0o644, b"")
        .dir("keep/", 0o755)
        .file("keep/.wh.x", 0o644, b"")
        .finish();
    let args = ["load"];
    let loaded = d.succeeded(
        &args,
        d.load(&image_archive("hand:opq", &[busybox_rootfs(), l1, l2])),
    );
    assert!(loaded.contains("hand:opq"), "{loaded}");
    let out = d.ok(&[
        "run",
        "--rm",
        "hand:opq",
        "sh",
        "-c",
        "find /op /op2 /keep | sort; cat /op/new; stat -c %a /op/new",
    ]);
    assert_eq!(
        out,
        "/keep\n/keep/y\n/op\n/op/new\n/op2\n/op2/new2\nnew\n600"
    );

    // run -d, exec, diff.
    d.ok(&["run", "-d", "--name", "c1", "bb:built", "sleep", "60"]);
    d.ok(&[
        "exec",
        "c1",
        "sh",
        "-c",
        "echo added > /data/added && echo more >> /data/keep/f && rm /data/opq/new \
         && mkdir /data/newdir",
    ]);
    assert_eq!(d.ok(&["exec", "c1", "cat", "/data/added"]), "added");
    assert_eq!(
        d.diff("c1"),
        [
            "A /data/added",
            "A /data/newdir",
            "C /data",
            "C /data/keep",
            "C /data/keep/f",
            "C /data/opq",
            "D /data/opq/new",
        ]
    );

    // commit, and a container of the committed image sees the changes.
    d.ok(&["commit", "c1", "bb:committed"]);
    let check =
        "cat /data/added /data/keep/f; ls -A /data/opq | wc -l; [ -d /data/newdir ] && echo dir";
    let want = "added\nchanged\nmore\n0\ndir";
    assert_eq!(
        d.ok(&["run", "--rm", "bb:committed", "sh", "-c", check]),
        want
    );

    // save, rm, rmi, load, run again.
    let saved = d.save("committed.tar", &["bb:committed"]);
    assert_eq!(saved_layers(&saved).len(), 4, "3 image layers + the commit");
    d.ok(&["rm", "-f", "c1"]);
    d.ok(&["rmi", "bb:committed"]);
    assert!(!d
        .run(&["image", "inspect", "bb:committed"])
        .status
        .success());
    let loaded = d.succeeded(&args, d.load(&saved));
    assert!(loaded.contains("Loaded image: bb:committed"), "{loaded}");
    assert_eq!(
        d.ok(&["run", "--rm", "bb:committed", "sh", "-c", check]),
        want
    );

    // rmi of everything leaves no layer in the pool (only the base volume).
    assert_eq!(d.ok(&["ps", "-aq"]), "");
    d.ok(&["rmi", "bb:committed", "bb:built", "bb:base", "hand:opq"]);
    assert_eq!(d.ok(&["images", "-aq"]), "");
    assert_eq!(h.layer_devices(), Vec::<String>::new());
}

/// What a tar entry of `docker export` says about one path, but its name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    link: Option<String>,
    dev: (u32, u32),
    xattrs: BTreeMap<String, Vec<u8>>,
    data: Vec<u8>,
}

/// `docker export`'s tar as path (no leading `./` or `/`, no trailing `/`; "" for the
/// root) -> node.
fn export_tree(archive: &[u8]) -> BTreeMap<String, Node> {
    let mut a = tar::Archive::new(archive);
    let mut tree = BTreeMap::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let raw = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        let path = raw
            .trim_start_matches("./")
            .trim_start_matches('/')
            .trim_end_matches('/')
            .to_string();
        let path = if path == "." { String::new() } else { path };
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8(l.into_owned()).unwrap());
        let mut xattrs = BTreeMap::new();
        if let Some(pax) = e.pax_extensions().unwrap() {
            for x in pax {
                let x = x.unwrap();
                if let Some(k) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(k.to_string(), x.value_bytes().to_vec());
                }
            }
        }
        let h = e.header();
        let mut node = Node {
            kind: h.entry_type().as_byte(),
            mode: h.mode().unwrap(),
            uid: h.uid().unwrap(),
            gid: h.gid().unwrap(),
            mtime: h.mtime().unwrap(),
            link,
            dev: (
                h.device_major().unwrap().unwrap_or(0),
                h.device_minor().unwrap().unwrap_or(0),
            ),
            xattrs,
            data: Vec::new(),
        };
        e.read_to_end(&mut node.data).unwrap();
        assert!(tree.insert(path.clone(), node).is_none(), "{path} twice");
    }
    tree
}

/// The image of the equivalence test: on `bb:base`, every kind of entry (directories with
/// sticky and setuid bits, owners, hard links, symlinks, a fifo, a character device, a sparse
/// file, a name with a space, a path longer than 100 bytes) and a second layer deleting a
/// directory and making it again, deleting a file of the base layer and setting a time.
const EQ_DOCKERFILE: &str = "FROM bb:base
RUN mkdir -p /data/keep /data/deep/a/b /data/opq /data/empty '/data/sp ace' \
 && echo keep > /data/keep/f && echo mode > /data/keep/mode && echo owned > /data/keep/owned \
 && echo moveme > /data/keep/moveme && echo deep > /data/deep/a/b/f && echo old > /data/opq/old \
 && echo hard > /data/keep/h1 && ln /data/keep/h1 /data/keep/h2 && ln /data/keep/h1 /data/h3 \
 && ln -s ../keep/f /data/opq/sym && ln -s /data/keep /data/abs \
 && chmod 4755 /data/keep/mode && chown 123:456 /data/keep/owned && chmod 1777 /data/empty \
 && mkfifo /data/fifo && mknod /data/null c 1 3 \
 && dd if=/bin/busybox of=/data/sparse bs=4096 count=3 skip=1 seek=100 2>/dev/null \
 && L=/data/long/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb \
 && mkdir -p $L && echo long > $L/a-file-name-that-makes-the-path-longer-than-one-hundred-bytes
RUN rm -r /data/opq && mkdir /data/opq && echo new > /data/opq/new && echo changed >> /data/keep/f \
 && rm /bin/stat && touch -d @1600000000 /data/keep/mode && chmod 700 /data/deep
";

/// What the equivalence test runs in a container of `EQ_DOCKERFILE`'s image: adds, changes
/// and deletes files in directories of the lower layers (it must print nothing).
const EQ_SCRIPT: &str = "set -e
echo added > /data/keep/added
echo more >> /data/keep/f
rm /data/opq/new
rm -r /data/deep/a
mkdir -p /data/deep/a && echo other > /data/deep/a/new
chmod 600 /data/keep/owned
chown -h 7:8 /data/abs
ln /data/keep/f /data/keep/hf
ln -s /nowhere /data/dangling
mv /data/keep/moveme /data/moved
rm /bin/md5sum /data/fifo /data/keep/h2
echo x > '/data/sp ace/new file'
dd if=/bin/busybox of=/data/copy bs=1000 count=7 2>/dev/null
dd if=/bin/busybox of=/data/sparse bs=4096 count=1 seek=50 conv=notrunc 2>/dev/null
mkdir /data/empty/sub && chmod 2750 /data/empty/sub && chown 9:10 /data/empty/sub
";

/// Paths of the container's init layer that dockerd writes at each `docker create`: their
/// times differ between two containers (their contents do not: same hostname, and the
/// files it bind-mounts are empty placeholders in the rootfs).
const DOCKERD_WRITES: &[&str] = &[
    "",
    ".dockerenv",
    "dev",
    "dev/console",
    "dev/pts",
    "dev/shm",
    "etc",
    "etc/hostname",
    "etc/hosts",
    "etc/mtab",
    "etc/resolv.conf",
    "proc",
    "sys",
];

#[test]
fn containers_match_the_vfs_driver() {
    if !docker_requirements("equivalence with vfs") {
        return;
    }
    let h = HpmDocker::start();
    let vfs = Dockerd::vfs();
    let d = &h.dockerd;
    d.import("bb:base", &busybox_rootfs());
    d.build("bb:eq", EQ_DOCKERFILE);
    // vfs (moby's diff) takes a write that keeps /data/sparse's size, made in the same second
    // as the file's whole-second time in the image, for no change; ours lists it
    // (hpm-layers src/diff.rs). Both containers run in a later second, so both must list it.
    let into_second = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    std::thread::sleep(Duration::from_nanos(1_000_000_000 - u64::from(into_second)));
    let archive = d.save("eq.tar", &["bb:eq"]);
    vfs.succeeded(&["load"], vfs.load(&archive));
    let id = "{{.Id}} {{json .RootFS.Layers}}";
    assert_eq!(
        d.ok(&["image", "inspect", "--format", id, "bb:eq"]),
        vfs.ok(&["image", "inspect", "--format", id, "bb:eq"]),
        "the same image on both"
    );

    let mut diffs = Vec::new();
    let mut trees = Vec::new();
    for (driver, dockerd) in [("hpmapper", d), ("vfs", &vfs)] {
        let out = dockerd.ok(&[
            "run",
            "--name",
            "eq",
            "--hostname",
            "eq",
            "bb:eq",
            "sh",
            "-c",
            EQ_SCRIPT,
        ]);
        assert_eq!(out, "", "{driver}");
        diffs.push(dockerd.diff("eq"));
        let export = dockerd.path("eq-export.tar");
        dockerd.ok(&["export", "-o", export.to_str().unwrap(), "eq"]);
        trees.push(export_tree(&fs::read(&export).unwrap()));
    }
    let (hpm, reference) = (&trees[0], &trees[1]);

    // `docker diff`: our Changes against moby's naive diff on vfs. They agree but where
    // hpm-layers is deliberately stricter (src/diff.rs: it compares hard link counts, so
    // that hard link groups survive a commit): it also lists /data/h3 and /data/keep/h1,
    // which lost their link /data/keep/h2.
    let only_in = |a: &Vec<String>, b: &Vec<String>| -> Vec<String> {
        a.iter().filter(|l| !b.contains(l)).cloned().collect()
    };
    assert_eq!(
        (only_in(&diffs[0], &diffs[1]), only_in(&diffs[1], &diffs[0])),
        (
            vec!["C /data/h3".to_string(), "C /data/keep/h1".to_string()],
            vec![]
        ),
        "docker diff lines only on hpmapper, only on vfs; all on hpmapper: {:?}",
        diffs[0]
    );
    assert!(
        diffs[0].contains(&"D /data/opq/new".to_string()),
        "{diffs:?}"
    );

    // The same paths...
    let only = |a: &BTreeMap<String, Node>, b: &BTreeMap<String, Node>| -> Vec<String> {
        a.keys().filter(|k| !b.contains_key(*k)).cloned().collect()
    };
    assert_eq!(
        (only(hpm, reference), only(reference, hpm)),
        (vec![], vec![]),
        "paths only on hpmapper, only on vfs"
    );
    assert!(hpm.len() > 40, "{} paths", hpm.len());
    // ... with the same type, contents, mode, owner, link target, device numbers and
    // extended attributes; the same time too but where this container or dockerd wrote.
    let touched: BTreeSet<&str> = diffs
        .iter()
        .flatten()
        .map(|l| l[2..].trim_start_matches('/'))
        .chain(DOCKERD_WRITES.iter().copied())
        .collect();
    let mut differ = Vec::new();
    for (path, a) in hpm {
        let mut b = reference[path].clone();
        if touched.contains(path.as_str()) {
            b.mtime = a.mtime;
        }
        if *a != b {
            let show = |n: &Node| {
                let mut n = n.clone();
                n.data = format!("{} bytes", n.data.len()).into_bytes();
                format!("{n:?}")
            };
            differ.push(format!(
                "{path}:\n  hpmapper {}\n  vfs      {}{}",
                show(a),
                show(&b),
                if a.data != b.data {
                    " (contents differ)"
                } else {
                    ""
                }
            ));
        }
    }
    assert!(differ.is_empty(), "entries differ:\n{}", differ.join("\n"));

    // Spot checks that the script ran as meant (both trees are equal by now).
    let kind = |p: &str| hpm[p].kind;
    assert_eq!(hpm["data/keep/f"].data, b"keep\nchanged\nmore\n");
    assert_eq!(hpm["data/keep/hf"].link.as_deref(), Some("data/keep/f"));
    assert_eq!(kind("data/keep/hf"), b'1');
    assert_eq!(hpm["data/dangling"].link.as_deref(), Some("/nowhere"));
    assert_eq!(kind("data/null"), b'3');
    assert_eq!(hpm["data/null"].dev, (1, 3));
    assert_eq!(hpm["data/keep/mode"].mode & 0o7777, 0o4755);
    assert_eq!(hpm["data/keep/owned"].mode & 0o7777, 0o600);
    assert_eq!((hpm["data/abs"].uid, hpm["data/abs"].gid), (7, 8));
    assert_eq!(hpm["data/keep/mode"].mtime, 1_600_000_000);
    assert_eq!(
        (hpm["data/keep/owned"].uid, hpm["data/keep/owned"].gid),
        (123, 456)
    );
    assert_eq!(hpm["data/empty/sub"].mode & 0o7777, 0o2750);
    assert_eq!(hpm["data/sparse"].data.len(), 103 * 4096);
    for gone in [
        "data/opq/old",
        "data/opq/new",
        "data/fifo",
        "bin/md5sum",
        "bin/stat",
    ] {
        assert!(!hpm.contains_key(gone), "{gone}");
    }
    assert!(hpm.keys().any(|k| k.len() > 100));
}

#[test]
fn images_and_containers_survive_restarts() {
    if !docker_requirements("restarts") {
        return;
    }
    let mut h = HpmDocker::start();
    h.dockerd.import("bb:base", &busybox_rootfs());
    h.dockerd.build("bb:built", BUILT_DOCKERFILE);
    // A stopped container with data of its own in its layer.
    let run = "echo run >> /data/log && cat /data/log";
    let out = h
        .dockerd
        .ok(&["run", "--name", "keeper", "bb:built", "sh", "-c", run]);
    assert_eq!(out, "run");
    let new_container = ["run", "--rm", "bb:built", "sh", "-c", "find /data | sort"];

    // dockerd restarts while the daemon keeps running (Init again on the same store).
    assert!(h.dockerd.stop(), "dockerd did not stop on SIGTERM");
    h.dockerd.start();
    assert_eq!(h.dockerd.ok(&["start", "-a", "keeper"]), "run\nrun");
    assert_eq!(h.dockerd.ok(&new_container), BUILT_DATA);

    // Both stop, and start in the other order: dockerd, the daemon; the daemon, dockerd.
    assert!(h.dockerd.stop(), "dockerd did not stop on SIGTERM");
    let st = h.env.terminate_daemon(DAEMON_STOP_TIMEOUT);
    assert!(
        st.is_some_and(|s| s.success()),
        "the daemon did not exit 0 on SIGTERM: {st:?}\n{}",
        h.env.log()
    );
    assert!(
        !h.socket.exists(),
        "the daemon left its plugin socket {}",
        h.socket.display()
    );
    assert_eq!(h.env.mounts(), vec![], "mounted after both stopped");
    h.env.start_daemon();
    let check = h.env.ok_text(&["check"]);
    assert!(check.contains("consistent"), "{check}");
    h.dockerd.start();
    let images = h
        .dockerd
        .ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    let images: BTreeSet<&str> = images.lines().collect();
    assert_eq!(images, BTreeSet::from(["bb:base", "bb:built"]));
    let ps = h
        .dockerd
        .ok(&["ps", "-a", "--format", "{{.Names}} {{.Status}}"]);
    assert!(ps.starts_with("keeper Exited (0)"), "{ps}");
    assert_eq!(h.dockerd.ok(&["start", "-a", "keeper"]), "run\nrun\nrun");
    assert_eq!(h.dockerd.ok(&new_container), BUILT_DATA);
}

/// Runs its command (best effort) when dropped.
struct RemoveOnDrop(std::process::Command);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = self.0.output();
    }
}

#[test]
fn a_running_container_keeps_its_layer_across_a_live_restore_of_dockerd() {
    if !docker_requirements("live restore") {
        return;
    }
    let mut h = HpmDocker::start();
    assert!(h.dockerd.stop(), "dockerd did not stop on SIGTERM");
    h.dockerd.set_config(r#"{"live-restore": true}"#);
    h.dockerd.start();
    h.dockerd.import("bb:base", &busybox_rootfs());
    let image_layers = h.layer_devices().len();
    // A container that keeps writing into its own layer, counting on from what it finds
    // there (started again, it must go past where it stopped however long that took).
    let counter = "i=$(cat /n 2>/dev/null || echo 0); \
                   while :; do i=$((i+1)); echo $i > /n.tmp && mv /n.tmp /n; sleep 0.05; done";
    h.dockerd.ok(&[
        "run", "-d", "--name", "live", "bb:base", "sh", "-c", counter,
    ]);
    // With live restore, stopping dockerd (the harness does on the way out) leaves the
    // container running: if the test fails half way, remove it first.
    let _remove = RemoveOnDrop(h.dockerd.command(&["rm", "-f", "live"]));
    let count = |h: &HpmDocker| -> u64 {
        let out = h
            .dockerd
            .ok(&["exec", "live", "sh", "-c", "cat /n 2>/dev/null || echo 0"]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("/n holds {out:?}"))
    };
    let wait_past = |h: &HpmDocker, n: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let now = count(h);
            if now > n {
                return now;
            }
            assert!(std::time::Instant::now() < deadline, "/n stuck at {now}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let before = wait_past(&h, 0);

    // dockerd goes while the container runs on, writing (with live restore it leaves the
    // layer mounted: no Put, no Cleanup); it comes back and adopts the container (a Get
    // and a Put of its layer, to learn its path).
    assert!(h.dockerd.stop(), "dockerd did not stop on SIGTERM");
    std::thread::sleep(std::time::Duration::from_millis(500));
    h.dockerd.start();
    let ps = h.dockerd.ok(&["ps", "--format", "{{.Names}}"]);
    assert_eq!(ps, "live", "{}", h.dockerd.log_tail(30));
    let during = wait_past(&h, before);

    // Stopped, it has kept every write; started again, it runs on its own layer.
    h.dockerd.ok(&["stop", "-t", "1", "live"]);
    let args = ["cp", "live:/n", "-"];
    let out = h.dockerd.run(&args);
    h.dockerd.succeeded(&args, out.clone());
    let files = tar_entries(&out.stdout);
    let last: u64 = String::from_utf8_lossy(&files[0].2).trim().parse().unwrap();
    assert!(last >= during, "stopped at {last}, after {during} was seen");
    h.dockerd.ok(&["start", "live"]);
    wait_past(&h, last);
    h.dockerd.ok(&["rm", "-f", "live"]);
    assert_eq!(h.layer_devices().len(), image_layers);
    let check = h.env.ok_text(&["check"]);
    assert!(check.contains("consistent"), "{check}");
}

#[test]
fn sixteen_containers_at_once_then_the_space_comes_back() {
    if !docker_requirements("16 concurrent containers") {
        return;
    }
    let h = HpmDocker::start();
    let d = &h.dockerd;
    d.import("bb:base", &busybox_rootfs());
    let before = h.used_bytes();
    const N: usize = 16;
    // Each writes its number and 1 MiB of random data (zero blocks would not be stored).
    std::thread::scope(|s| {
        let started: Vec<_> = (0..N)
            .map(|i| {
                s.spawn(move || {
                    let name = format!("par{i}");
                    let script = format!(
                        "echo {i} > /out && dd if=/dev/urandom of=/big bs=64k count=16 2>/dev/null"
                    );
                    d.ok(&["run", "-d", "--name", &name, "bb:base", "sh", "-c", &script])
                })
            })
            .collect();
        for t in started {
            t.join().unwrap();
        }
    });
    for i in 0..N {
        let name = format!("par{i}");
        assert_eq!(d.ok(&["wait", &name]), "0", "{name}");
        assert_eq!(d.diff(&name), ["A /big", "A /out"], "{name}");
        // `docker cp CONTAINER:/out -` writes a tar of the one file.
        let args = ["cp", &format!("{name}:/out"), "-"];
        let out = d.run(&args);
        d.succeeded(&args, out.clone());
        let files: Vec<(String, Vec<u8>)> = tar_entries(&out.stdout)
            .into_iter()
            .map(|(n, _, data)| (n, data))
            .collect();
        assert_eq!(files, [("out".to_string(), format!("{i}\n").into_bytes())]);
    }
    let during = h.used_bytes();
    assert!(
        during >= before + (N as u64) * (1 << 20),
        "used {during} with the containers, {before} before"
    );
    let mut rm = vec!["rm".to_string()];
    rm.extend((0..N).map(|i| format!("par{i}")));
    let rm: Vec<&str> = rm.iter().map(String::as_str).collect();
    d.ok(&rm);
    assert_eq!(h.layer_devices().len(), 1, "only the image's layer is left");
    // No tolerance: the pool is back to the very same count. The image layer is never
    // written by its containers (each writes only snapshots of its own, the -init layer and
    // the container layer), removing a snapshot frees every block it holds alone, and
    // nothing else is written meanwhile (the base volume and the image layer stay unmounted).
    let after = h.used_bytes();
    assert_eq!(
        after, before,
        "used bytes after removing the containers, then before them"
    );
}

/// Whether a file named `name` exists anywhere under `dir` (symlinks not followed).
fn find_name(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for e in fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if e.file_name() == name {
            return Some(p);
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            if let Some(found) = find_name(&p, name) {
                return Some(found);
            }
        }
    }
    None
}

#[test]
fn hostile_layers_are_refused_by_apply_diff() {
    if !docker_requirements("hostile layers") {
        return;
    }
    let h = HpmDocker::start();
    let d = &h.dockerd;
    let sentinel = format!("pwned-{}", unique_name());
    let passwd = fs::read("/etc/passwd").unwrap();
    let passwd_links = fs::metadata("/etc/passwd").unwrap().nlink();
    let up = |n: usize| "../".repeat(n);
    // (what, layer, what the error must name)
    let cases = [
        (
            "a path climbing three levels",
            LayerTar::new()
                .file(&format!("{}tmp/{sentinel}", up(3)), 0o644, b"pwned")
                .finish(),
            sentinel.clone(),
        ),
        (
            "a path climbing to /",
            LayerTar::new()
                .dir("a/", 0o755)
                .file(&format!("a/{}tmp/{sentinel}", up(13)), 0o644, b"pwned")
                .finish(),
            sentinel.clone(),
        ),
        (
            "a file through a symlink to /tmp",
            LayerTar::new()
                .symlink("evil", "/tmp")
                .file(&format!("evil/{sentinel}"), 0o644, b"pwned")
                .finish(),
            format!("evil/{sentinel}"),
        ),
        (
            "a hard link to /etc/passwd",
            LayerTar::new().hardlink("passwd", "/etc/passwd").finish(),
            "passwd".to_string(),
        ),
        (
            "a hard link climbing to /etc/passwd",
            LayerTar::new()
                .hardlink("passwd", &format!("{}etc/passwd", up(12)))
                .finish(),
            "etc/passwd".to_string(),
        ),
    ];
    for (i, (what, layer, names)) in cases.into_iter().enumerate() {
        let tag = format!("evil:{i}");
        let err = d.failed(&["load"], d.load(&image_archive(&tag, &[layer])));
        eprintln!("{what}: {}", err.trim());
        let lower = err.to_lowercase();
        assert!(
            err.contains(&names)
                && [
                    "escape",
                    "outside",
                    "climbs out",
                    "does not exist",
                    "symlink"
                ]
                .iter()
                .any(|w| lower.contains(w)),
            "{what}: the error does not say what was refused: {err}"
        );
        assert!(
            !d.run(&["image", "inspect", &tag]).status.success(),
            "{what}"
        );
    }
    // Nothing landed outside: not in /tmp, not anywhere in the test's directory (where a
    // path climbing three levels from a layer's root would go), /etc/passwd untouched.
    assert!(!Path::new("/tmp").join(&sentinel).exists());
    assert_eq!(find_name(&h.env.path(""), &sentinel), None);
    assert_eq!(fs::read("/etc/passwd").unwrap(), passwd);
    assert_eq!(fs::metadata("/etc/passwd").unwrap().nlink(), passwd_links);
    // dockerd removed the layers it could not apply, and the daemon still works.
    assert_eq!(h.layer_devices(), Vec::<String>::new());
    d.import("bb:base", &busybox_rootfs());
    assert_eq!(d.ok(&["run", "--rm", "bb:base", "echo", "alive"]), "alive");
}

/// The size of `/` in bytes (`df -B1 /` in a container of `bb:base`, with `opts`).
fn root_size(d: &Dockerd, opts: &[&str]) -> u64 {
    let mut args = vec!["run", "--rm"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&["bb:base", "df", "-B1", "/"]);
    let out = d.ok(&args);
    let line = out.lines().nth(1).unwrap_or_else(|| panic!("df: {out}"));
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("df: {out}"))
}

#[test]
fn storage_opt_size_grows_and_refuses_below_the_base_size() {
    if !docker_requirements("--storage-opt size") {
        return;
    }
    let h = HpmDocker::start();
    let d = &h.dockerd;
    d.import("bb:base", &busybox_rootfs());
    let base = root_size(d, &[]);
    assert!(
        base > 900_000_000 && base < 1 << 30,
        "/ is {base} bytes with base size {BASE_SIZE}"
    );
    let big = root_size(d, &["--storage-opt", "size=2GB"]);
    assert!(
        big > 1_500_000_000 && big < 2 << 30,
        "/ is {big} bytes with size=2GB (binary, as Docker reads it)"
    );
    let args = [
        "run",
        "--rm",
        "--storage-opt",
        "size=512M",
        "bb:base",
        "true",
    ];
    let err = d.failed(&args, d.run(&args));
    assert!(err.contains("base size"), "{err}");
    assert_eq!(d.ok(&["ps", "-aq"]), "");
    assert_eq!(h.layer_devices().len(), 1, "only the image's layer is left");

    // Init again (a dockerd restarted on the same home) with other storage options: refused
    // rather than taken silently (the store keeps the first ones); with the same, accepted.
    let init = |home: &str, opts: &[String]| -> String {
        let body = serde_json::json!({"Home": home, "Opts": opts, "UIDMaps": [], "GIDMaps": []});
        let reply = plugin_call(&h.socket, "GraphDriver.Init", &body.to_string());
        reply["Err"].as_str().unwrap_or_default().to_string() // success: no Err
    };
    let other = init("/nonexistent", &[]);
    let home = other
        .split("already initialized with home ")
        .nth(1)
        .and_then(|rest| rest.split(", not").next())
        .unwrap_or_else(|| panic!("{other}"))
        .to_string();
    let same = [format!("hpmapper.basesize={BASE_SIZE}")];
    assert_eq!(init(&home, &same), "");
    let bigger = ["hpmapper.basesize=20GB".to_string()];
    let e = init(&home, &bigger);
    assert!(e.contains("restart the hpmapper daemon"), "{e}");
    d.ok(&["run", "--rm", "bb:base", "true"]);
}

/// One graphdriver plugin request over the plugin's socket, as dockerd makes it; the JSON
/// reply.
fn plugin_call(socket: &Path, endpoint: &str, body: &str) -> serde_json::Value {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(
        s,
        "POST /{endpoint} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (_, json) = reply
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{reply}"));
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {reply}"))
}

#[test]
fn a_nearly_full_pool_refuses_new_containers_and_running_ones_keep_writing() {
    if !docker_requirements("hpmapper.min_free_space") {
        return;
    }
    // 99% of the pool kept free: new layers are refused once more than 1% of it is in use.
    let h = HpmDocker::start_with(&["hpmapper.min_free_space=99%"]);
    let d = &h.dockerd;
    d.import("bb:base", &busybox_rootfs());
    let status = d.ok(&["info", "--format", "{{json .DriverStatus}}"]);
    assert!(
        status.contains(r#"["Minimum Free Space","99%"]"#),
        "{status}"
    );
    d.ok(&["run", "-d", "--name", "running", "bb:base", "sleep", "600"]);

    // Something outside Docker takes the pool past 1% in use.
    let (capacity, used) = (h.capacity_bytes(), h.used_bytes());
    assert!(
        used < capacity / 100,
        "{used} of {capacity} in use before filling"
    );
    let fill = (capacity / 100 - used + (16 << 20)).next_multiple_of(1 << 20);
    let file = h.env.path("fill");
    fs::write(&file, vec![0x5a_u8; fill as usize]).unwrap();
    h.env
        .ok(&["device", "create", "filler", "--size", &fill.to_string()]);
    h.env.ok(&[
        "device",
        "write",
        "filler",
        "--offset",
        "0",
        file.to_str().unwrap(),
    ]);
    fs::remove_file(&file).unwrap();

    // A new container is refused with the reason; nothing of it is left.
    let args = ["run", "--name", "refused", "bb:base", "true"];
    let err = d.failed(&args, d.run(&args));
    assert!(err.contains("minimum free space of 99%"), "{err}");
    assert!(err.contains("remove unused containers and images"), "{err}");
    assert_eq!(d.ok(&["ps", "-aq", "--filter", "name=refused"]), "");
    // The running container still writes into the room kept for it.
    let written = d.ok(&[
        "exec",
        "running",
        "sh",
        "-c",
        "dd if=/dev/zero of=/f bs=1M count=8 2>/dev/null && sync && wc -c < /f",
    ]);
    assert_eq!(written.trim(), "8388608");

    // A bigger pool (grown while dockerd and the container run): containers start again.
    h.env
        .ok(&["pool", "grow", "--capacity", &(4 * capacity).to_string()]);
    assert_eq!(d.ok(&["run", "--rm", "bb:base", "echo", "grown"]), "grown");
    let status = d.ok(&["info", "--format", "{{json .DriverStatus}}"]);
    assert!(
        status.contains(r#"["Data Space Total","85.9GB"]"#),
        "{status}"
    );

    // Or space freed: the filler goes, and the pool's use drops back under the minimum.
    h.env.ok(&["device", "remove", "filler"]);
    assert!(h.used_bytes() < capacity / 100, "{} in use", h.used_bytes());
    assert_eq!(d.ok(&["run", "--rm", "bb:base", "echo", "ok"]), "ok");
    d.ok(&["rm", "-f", "running"]);
}
