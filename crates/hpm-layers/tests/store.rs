//! The layer store on real devices: ext4 on loop devices over FUSE files of a pool, driven
//! the way dockerd drives a graphdriver (Create, ApplyDiff, Get/Put, Diff, Remove, a
//! restart). Needs root, /dev/fuse, loop devices and e2fsprogs.

mod common;
#[path = "store/env.rs"]
mod env;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{assert_same_tree, snapshot, Layer, Meta};
use env::{df_size, is_mounted, requirements, Env, BASE, MIB, NAMESPACE};
use hpm_layers::{apply_layer, changes, diff_size, Change, ChangeKind, ErrorKind};
use rustix::mount::MountFlags;

fn layer_a() -> Layer {
    let m = Meta::mode;
    Layer::new()
        .dir("etc/", &m(0o755))
        .file("etc/hosts", b"127.0.0.1 localhost\n", &m(0o644))
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", &m(0o644))
        .dir("usr/", &m(0o755))
        .dir("usr/bin/", &m(0o755))
        .file("usr/bin/tool", b"#!/bin/sh\necho tool\n", &m(0o755))
        .dir("opq/", &m(0o755))
        .file("opq/old", b"old", &m(0o644))
        .file("opq/sub/older", b"older", &m(0o644))
        .file("gone", b"gone", &m(0o644))
        .dir("keep/", &m(0o700))
        .file("keep/a", b"a", &m(0o600))
        .file("keep/b", b"b", &m(0o600))
        .symlink("hosts", "etc/hosts", &m(0o777))
}

/// On top of A: a whiteout, an opaque directory, a modified file, an added file.
fn layer_b() -> Layer {
    let m = Meta::mode;
    Layer::new()
        .file(
            "etc/hosts",
            b"127.0.0.1 localhost\n10.0.0.2 db\n",
            &m(0o644).mtime(1_700_000_000),
        )
        .marker(".wh.gone")
        .marker("keep/.wh.a")
        .dir("opq/", &m(0o755))
        .marker("opq/.wh..wh..opq")
        .file("opq/new", b"new", &m(0o644))
        .file("usr/bin/added", b"added by B", &m(0o755))
}

/// A and then B applied to plain directories: the oracle of the store's trees and diffs.
struct Oracle {
    _tmp: tempfile::TempDir,
    a: PathBuf,
    ab: PathBuf,
}

fn oracle() -> Oracle {
    let tmp = common::tempdir();
    let (a, ab) = (tmp.path().join("a"), tmp.path().join("ab"));
    fs::create_dir(&a).unwrap();
    apply_layer(&a, &layer_a().finish().0[..]).unwrap();
    common::cp_a(&a, &ab);
    apply_layer(&ab, &layer_b().finish().0[..]).unwrap();
    Oracle { _tmp: tmp, a, ab }
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

#[test]
fn layers_stack_diff_and_survive_a_restart() {
    if !requirements("layers_stack_diff_and_survive_a_restart") {
        return;
    }
    let mut env = Env::new();
    let oracle = oracle();
    let s = env.store();

    // A parent-less layer is an empty filesystem; the container root leaves lost+found out.
    s.create("base1", None, None).unwrap();
    assert!(s.exists("base1") && !s.exists("child"));
    let rootfs = s.get("base1", "").unwrap();
    assert_eq!(rootfs, s.mountpoint("base1").join("rootfs"));
    assert!(names(&rootfs).is_empty(), "{:?}", names(&rootfs));
    assert_eq!(
        fs::metadata(&rootfs).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    assert_eq!(
        names(&s.mountpoint("base1")),
        BTreeSet::from(["lost+found".into(), "rootfs".into()])
    );
    s.put("base1").unwrap();

    let (tar_a, size_a) = layer_a().finish();
    assert_eq!(s.apply_diff("base1", None, &tar_a[..]).unwrap(), size_a);
    s.create("child", Some("base1"), None).unwrap();
    let (tar_b, size_b) = layer_b().finish();
    assert_eq!(
        s.apply_diff("child", Some("base1"), &tar_b[..]).unwrap(),
        size_b
    );
    assert_eq!(s.parent("child").unwrap().as_deref(), Some("base1"));
    assert_eq!(s.parent("base1").unwrap(), None);

    // The merged tree: B's whiteouts and opaque directory took effect over A.
    let child = s.get("child", "").unwrap();
    assert_same_tree(&snapshot(&child), &snapshot(&oracle.ab));
    for gone in ["gone", "keep/a", "opq/old", "opq/sub"] {
        assert!(!child.join(gone).exists(), "{gone}");
    }
    assert_eq!(fs::read(child.join("opq/new")).unwrap(), b"new");
    assert_eq!(fs::read(child.join("keep/b")).unwrap(), b"b");
    // The parent is untouched.
    let parent = s.get("base1", "").unwrap();
    assert_same_tree(&snapshot(&parent), &snapshot(&oracle.a));
    s.put("base1").unwrap();
    s.put("child").unwrap();

    // Changes, size and diff tar of the child against its parent are what B did.
    let got = s.changes("child", Some("base1")).unwrap();
    assert_eq!(got, changes(&oracle.ab, Some(&oracle.a)).unwrap());
    let change = |path: &str, kind| Change {
        path: path.into(),
        kind,
    };
    for c in [
        change("/etc/hosts", ChangeKind::Modify),
        change("/gone", ChangeKind::Delete),
        change("/keep/a", ChangeKind::Delete),
        change("/opq/old", ChangeKind::Delete),
        change("/opq/sub", ChangeKind::Delete),
        change("/opq/new", ChangeKind::Add),
        change("/usr/bin/added", ChangeKind::Add),
    ] {
        assert!(got.contains(&c), "{c:?} missing from {got:?}");
    }
    assert!(!got.iter().any(|c| c.path == Path::new("/etc/passwd")));
    let size = s.diff_size("child", Some("base1")).unwrap();
    assert_eq!(size, diff_size(&oracle.ab, Some(&oracle.a)).unwrap());
    let hosts = "127.0.0.1 localhost\n10.0.0.2 db\n";
    assert_eq!(
        size,
        (hosts.len() + "new".len() + "added by B".len()) as u64
    );
    let mut diff = Vec::new();
    s.diff("child", Some("base1"), &mut diff).unwrap();
    let replay = common::tempdir();
    let replayed = replay.path().join("a");
    common::cp_a(&oracle.a, &replayed);
    apply_layer(&replayed, &diff[..]).unwrap();
    assert_same_tree(&snapshot(&replayed), &snapshot(&oracle.ab));
    // Without a parent the diff is the whole tree.
    let mut full = Vec::new();
    s.diff("base1", None, &mut full).unwrap();
    let whole = replay.path().join("whole");
    fs::create_dir(&whole).unwrap();
    apply_layer(&whole, &full[..]).unwrap();
    assert_same_tree(&snapshot(&whole), &snapshot(&oracle.a));
    // Everything was put back.
    assert_eq!(s.mount_count("child") + s.mount_count("base1"), 0);
    assert!(env.devices.attached().is_empty());

    // What a crash leaves: a mount and an empty mountpoint under mnt, a half-made base.
    let stale = s.mountpoint("stale");
    let empty = s.mountpoint("empty");
    fs::create_dir(&stale).unwrap();
    fs::create_dir(&empty).unwrap();
    rustix::mount::mount("tmpfs", &stale, "tmpfs", MountFlags::empty(), None).unwrap();
    let partial = format!("{NAMESPACE}.base-{}.partial", 64 * MIB);
    env.pool.create_device(&partial, 64 * MIB).unwrap();

    // A restart of the daemon: the new store finds the layers and their trees in the pool,
    // and tidies up.
    env.restart();
    let s = env.store();
    assert!(!is_mounted(&stale));
    assert!(!stale.exists() && !empty.exists());
    assert!(env.pool.device_info(&partial).is_err());
    assert_eq!(s.layers(), ["base1", "child"]);
    assert_eq!(s.parent("child").unwrap().as_deref(), Some("base1"));
    let child = s.get("child", "").unwrap();
    assert_same_tree(&snapshot(&child), &snapshot(&oracle.ab));
    s.put("child").unwrap();

    // Removing a parent is allowed: the child is an independent snapshot.
    s.remove("base1").unwrap();
    assert!(!s.exists("base1"));
    assert!(!s.mountpoint("base1").exists());
    assert_eq!(s.parent("child").unwrap(), None);
    let child = s.get("child", "").unwrap();
    assert_same_tree(&snapshot(&child), &snapshot(&oracle.ab));
    s.put("child").unwrap();
    s.remove("child").unwrap();
    s.remove("never-existed").unwrap();
    assert!(s.layers().is_empty());
    // Only the base volume is left in the pool.
    let left: Vec<String> = env
        .pool
        .list_devices()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(left, [format!("{NAMESPACE}.base-{BASE}")]);
    let status = s.status();
    let field = |k: &str| status.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(field("Layers").as_deref(), Some("0"));
    assert_eq!(field("Base Device Size").as_deref(), Some("268.4MB"));
    assert_eq!(field("Data Space Total").as_deref(), Some("2.147GB"));
}

#[test]
fn get_and_put_are_counted_and_busy_layers_stay_safe() {
    if !requirements("get_and_put_are_counted_and_busy_layers_stay_safe") {
        return;
    }
    let env = Env::new();
    let s = env.store();
    let dev = format!("{NAMESPACE}rc");
    s.create("rc", None, None).unwrap();
    assert_eq!(
        s.create("rc", None, None).unwrap_err().kind(),
        ErrorKind::Exists
    );
    assert_eq!(
        s.create("orphan", Some("missing"), None)
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );

    // A quote in the SELinux label would end the quoted context= early and pass the rest
    // as more mount options: refused, nothing left mounted.
    let e = s.get("rc", "system_u:object_r:x:s0\",dax").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert_eq!(s.mount_count("rc"), 0);
    assert!(!is_mounted(&s.mountpoint("rc")));

    let rootfs = s.get("rc", "").unwrap();
    assert_eq!(s.get("rc", "").unwrap(), rootfs);
    assert_eq!(s.mount_count("rc"), 2);
    let md = s.metadata("rc").unwrap();
    assert_eq!(md["DeviceName"], dev);
    assert_eq!(md["DeviceSize"], BASE.to_string());
    assert_eq!(md["MountCount"], "2");
    let block = PathBuf::from(&md["BlockDevice"]);
    assert!(
        block.to_str().unwrap().starts_with("/dev/loop"),
        "{block:?}"
    );
    fs::write(rootfs.join("data"), b"kept").unwrap();

    s.put("rc").unwrap();
    assert!(is_mounted(&s.mountpoint("rc")));
    assert_eq!(env.devices.attached(), std::slice::from_ref(&dev));
    let e = s.remove("rc").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert!(e.to_string().contains("\"rc\""), "{e}");
    s.put("rc").unwrap();
    assert!(!is_mounted(&s.mountpoint("rc")));
    assert!(env.devices.attached().is_empty() && env.devices.exported().is_empty());
    // The loop device number may already serve another test: look for our file instead.
    assert!(
        env.devices.loops_of(&dev).is_empty(),
        "{} still attached",
        block.display()
    );
    assert!(!s.metadata("rc").unwrap().contains_key("BlockDevice"));
    // Puts without a get are harmless; an unknown layer is an error.
    s.put("rc").unwrap();
    assert_eq!(s.put("nope").unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(s.get("nope", "").unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(s.get("../x", "").unwrap_err().kind(), ErrorKind::Invalid);

    // Concurrent gets and puts of several layers, some on the same id; new parent-less
    // layers made at the same time share one base volume.
    std::thread::scope(|scope| {
        for t in 0..3 {
            scope.spawn(move || s.create(&format!("par{t}"), None, None).unwrap());
        }
    });
    std::thread::scope(|scope| {
        for t in 0..6 {
            scope.spawn(move || {
                let id = ["rc", "par0", "par1", "par2"][t % 4];
                for _ in 0..3 {
                    let root = s.get(id, "").unwrap();
                    assert!(root.is_dir());
                    s.put(id).unwrap();
                }
            });
        }
    });
    let bases = env
        .pool
        .list_devices()
        .iter()
        .filter(|d| d.name.contains(".base-"))
        .count();
    assert_eq!(bases, 1);
    assert!(env.devices.attached().is_empty());

    // A process inside at the last put: the unmount is lazy, the device lingers and is
    // reused by the next get, and remove waits until it is really free.
    let rootfs = s.get("rc", "").unwrap();
    let held = fs::File::open(rootfs.join("data")).unwrap();
    s.put("rc").unwrap();
    assert!(!is_mounted(&s.mountpoint("rc")));
    assert_eq!(env.devices.attached(), std::slice::from_ref(&dev));
    assert_eq!(s.remove("rc").unwrap_err().kind(), ErrorKind::Busy);
    let rootfs = s.get("rc", "").unwrap();
    assert_eq!(fs::read(rootfs.join("data")).unwrap(), b"kept");
    drop(held);
    s.put("rc").unwrap();
    assert!(env.devices.attached().is_empty());

    // Cleanup unmounts whatever the counts and keeps the data.
    s.get("rc", "").unwrap();
    s.get("rc", "").unwrap();
    s.get("par0", "").unwrap();
    s.cleanup().unwrap();
    assert_eq!(s.mount_count("rc"), 0);
    assert!(!is_mounted(&s.mountpoint("rc")) && env.devices.attached().is_empty());
    let rootfs = s.get("rc", "").unwrap();
    assert_eq!(fs::read(rootfs.join("data")).unwrap(), b"kept");
    s.put("rc").unwrap();
    s.remove("rc").unwrap();
}

#[test]
fn a_parent_still_in_use_after_its_put_is_snapshotted_only_when_free() {
    if !requirements("a_parent_still_in_use_after_its_put_is_snapshotted_only_when_free") {
        return;
    }
    let env = Env::new();
    let s = env.store();
    s.create("p", None, None).unwrap();
    // A writer inside at the last put (as a mount namespace that copied the mount holds
    // it): the unmount is lazy and the new data is still in the page cache of a filesystem
    // that lives on. A snapshot of the device now would not have it.
    let rootfs = s.get("p", "").unwrap();
    let mut held = fs::File::create(rootfs.join("late")).unwrap();
    s.put("p").unwrap();
    assert!(!is_mounted(&s.mountpoint("p")));
    std::io::Write::write_all(&mut held, b"written after the put").unwrap();

    // Held past the wait: refused, and nothing is made.
    let e = s.create("c1", Some("p"), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(e.to_string().contains("\"p\""), "{e}");
    assert!(!s.exists("c1"));

    // Let go during the wait: the child is made once the filesystem is gone, with it all.
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(held);
    });
    s.create("c1", Some("p"), None).unwrap();
    releaser.join().unwrap();
    assert!(env.devices.attached().is_empty());
    let root = s.get("c1", "").unwrap();
    assert_eq!(
        fs::read(root.join("late")).unwrap(),
        b"written after the put"
    );
    s.put("c1").unwrap();
    s.remove("c1").unwrap();
    s.remove("p").unwrap();
}

#[test]
fn cleanup_names_what_stays_busy_and_finishes_once_it_is_free() {
    if !requirements("cleanup_names_what_stays_busy_and_finishes_once_it_is_free") {
        return;
    }
    let env = Env::new();
    let s = env.store();
    for id in ["lazy", "handed", "idle"] {
        s.create(id, None, None).unwrap();
    }
    // A process inside one layer (its unmount is lazy and its device lingers), a client's
    // mount of another's exported device, a third simply mounted.
    let held = fs::File::open(s.get("lazy", "").unwrap()).unwrap();
    let block = s.export("handed", false).unwrap();
    let mnt = env.dir.path().join("client");
    fs::create_dir_all(&mnt).unwrap();
    rustix::mount::mount(&block, &mnt, "ext4", MountFlags::empty(), None).unwrap();
    s.get("idle", "").unwrap();

    let e = s.cleanup().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("\"lazy\"") && msg.contains("\"handed\""),
        "{msg}"
    );
    assert!(!msg.contains("\"idle\""), "{msg}");
    assert!(!is_mounted(&s.mountpoint("idle")) && !is_mounted(&s.mountpoint("lazy")));
    assert_eq!(s.mount_count("idle"), 0);

    drop(held);
    rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty()).unwrap();
    s.cleanup().unwrap();
    assert!(env.devices.attached().is_empty());
    assert_eq!(s.exported("handed"), None);
    for id in ["lazy", "handed", "idle"] {
        s.remove(id).unwrap();
    }
}

#[test]
fn size_option_grows_the_filesystem_and_refuses_to_shrink() {
    if !requirements("size_option_grows_the_filesystem_and_refuses_to_shrink") {
        return;
    }
    let env = Env::new();
    let s = env.store();
    s.create("normal", None, None).unwrap();
    let normal = df_size(&s.get("normal", "").unwrap());
    assert!(normal <= BASE, "{normal}");
    s.put("normal").unwrap();

    // Parent-less and bigger than the base size.
    s.create("big", None, Some(512 * MIB)).unwrap();
    assert_eq!(
        s.metadata("big").unwrap()["DeviceSize"],
        (512 * MIB).to_string()
    );
    let rootfs = s.get("big", "").unwrap();
    let big = df_size(&rootfs);
    assert!(big > 400 * MIB && big <= 512 * MIB, "{big}");
    fs::write(rootfs.join("file"), b"in big").unwrap();

    // A child of a mounted layer, bigger still: the parent is flushed before the snapshot,
    // whose journal then needs recovery, so e2fsck runs before resize2fs.
    s.create("bigger", Some("big"), Some(768 * MIB + 1))
        .unwrap();
    s.put("big").unwrap();
    assert_eq!(
        s.metadata("bigger").unwrap()["DeviceSize"],
        (768 * MIB + 4096).to_string()
    );
    let rootfs = s.get("bigger", "").unwrap();
    assert!(df_size(&rootfs) > 650 * MIB, "{}", df_size(&rootfs));
    assert_eq!(fs::read(rootfs.join("file")).unwrap(), b"in big");
    s.put("bigger").unwrap();
    // The same size as the parent is fine and changes nothing.
    s.create("same", Some("big"), Some(512 * MIB)).unwrap();

    for (id, parent, size) in [
        ("small", None, 128 * MIB),
        ("smaller", Some("big"), 300 * MIB),
    ] {
        let e = s.create(id, parent, Some(size)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert!(
            e.to_string()
                .contains("cannot be smaller than the base size"),
            "{e}"
        );
        assert!(!s.exists(id));
    }
}

#[test]
fn new_layers_are_refused_below_the_minimum_free_space() {
    if !requirements("new_layers_are_refused_below_the_minimum_free_space") {
        return;
    }
    let env = Env::build(hpm_layers::Layout::RootfsDir, 512 * MIB, 25);
    let s = env.store();
    s.create("image", None, None).unwrap();
    s.create("running", Some("image"), None).unwrap();
    let rootfs = s.get("running", "").unwrap();
    let status = s.status();
    assert!(
        status.contains(&("Minimum Free Space".to_string(), "25%".to_string())),
        "{status:?}"
    );

    // Something else fills the pool until less than 25% of it is free.
    let (capacity, used) = env.pool.space();
    let fill = (capacity - used - capacity / 4 + 8 * MIB).next_multiple_of(MIB);
    env.pool.create_device("filler", fill).unwrap();
    let filler = env.pool.open_device("filler").unwrap();
    let chunk = vec![0x5a_u8; MIB as usize];
    for off in (0..fill).step_by(MIB as usize) {
        filler.write_at(&chunk, off).unwrap();
    }
    drop(filler);

    // A new layer, with or without a parent, is refused and leaves nothing behind...
    for (id, parent) in [("child", Some("image")), ("fresh", None)] {
        let e = s.create(id, parent, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
        let msg = e.to_string();
        for want in [
            format!("creating layer {id:?}"),
            "minimum free space of 25%".to_string(),
            "remove unused containers and images".to_string(),
        ] {
            assert!(msg.contains(&want), "{msg:?} lacks {want:?}");
        }
        assert!(!s.exists(id));
    }
    // ... while the running layer still writes into the room that was kept for it.
    fs::write(rootfs.join("log"), vec![7u8; 4 * MIB as usize]).unwrap();
    s.put("running").unwrap();

    // Space freed: layers can be made again.
    env.pool.remove_device("filler").unwrap();
    s.create("child", Some("image"), None).unwrap();
    assert_eq!(
        fs::read(s.get("running", "").unwrap().join("log"))
            .unwrap()
            .len(),
        4 * MIB as usize
    );
    s.put("running").unwrap();

    // Out-of-range settings are refused at open.
    let mut opts = hpm_layers::StoreOptions::new(NAMESPACE, env.dir.path().join("other"));
    opts.min_free_space = 100;
    let e = hpm_layers::LayerStore::open(env.pool.clone(), env.devices.clone(), opts)
        .err()
        .expect("100% accepted");
    assert_eq!(e.kind(), ErrorKind::Invalid);
    assert!(e.to_string().contains("between 0% and 99%"), "{e}");
}

#[test]
fn hostile_layers_are_refused_and_write_nothing_outside_rootfs() {
    if !requirements("hostile_layers_are_refused_and_write_nothing_outside_rootfs") {
        return;
    }
    let env = Env::new();
    let s = env.store();
    s.create("h", None, None).unwrap();
    let sentinel = env.dir.path().join("sentinel");
    fs::create_dir(&sentinel).unwrap();
    let sentinel_str = sentinel.to_str().unwrap().to_string();
    let m = Meta::mode;
    let hostile = [
        Layer::new()
            .file("fine", b"ok", &m(0o644))
            .file("../escaped", b"x", &m(0o644)),
        Layer::new()
            .symlink("evil", &sentinel_str, &m(0o777))
            .file("evil/pwned", b"x", &m(0o644)),
        Layer::new()
            .symlink("up", "..", &m(0o777))
            .file("up/lost+found/pwned", b"x", &m(0o644)),
        Layer::new().hardlink("pw", "../../../../../../etc/passwd"),
    ];
    for layer in hostile {
        let (tar, _) = layer.finish();
        let e = s.apply_diff("h", None, &tar[..]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Escape, "{e}");
        assert_eq!(s.mount_count("h"), 0);
    }
    assert!(env.devices.attached().is_empty());
    assert!(names(&sentinel).is_empty());
    let rootfs = s.get("h", "").unwrap();
    let fs_root = s.mountpoint("h");
    assert_eq!(
        names(&fs_root),
        BTreeSet::from(["lost+found".into(), "rootfs".into()])
    );
    assert!(names(&fs_root.join("lost+found")).is_empty());
    assert!(!s.mountpoint("escaped").exists() && !fs_root.join("escaped").exists());
    assert!(names(&rootfs)
        .iter()
        .all(|n| ["fine", "evil", "up"].contains(&n.as_str())));
    s.put("h").unwrap();
}

#[test]
fn fs_root_layers_are_handed_out_as_block_devices() {
    if !requirements("fs_root_layers_are_handed_out_as_block_devices") {
        return;
    }
    let env = Env::with_layout(hpm_layers::Layout::FsRoot);
    let s = env.store();
    s.create("a", None, None).unwrap();
    let block = s.export("a", false).unwrap();
    assert!(
        block.to_str().unwrap().starts_with("/dev/loop"),
        "{block:?}"
    );
    assert_eq!(
        s.export("a", false).unwrap(),
        block,
        "a second export attaches again"
    );
    assert_eq!(s.exported("a"), Some((block.clone(), false)));

    // The client mounts it: the filesystem root is the container root, empty, 0755.
    let mnt = env.dir.path().join("client");
    fs::create_dir(&mnt).unwrap();
    rustix::mount::mount(&block, &mnt, "ext4", MountFlags::empty(), None).unwrap();
    assert!(names(&mnt).is_empty(), "{:?}", names(&mnt));
    assert_eq!(
        fs::metadata(&mnt).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    fs::write(mnt.join("file"), b"from a").unwrap();

    // While handed out, the store neither mounts it nor removes it.
    assert_eq!(s.get("a", "").unwrap_err().kind(), ErrorKind::Busy);
    assert_eq!(s.remove("a").unwrap_err().kind(), ErrorKind::Busy);
    assert_eq!(s.unexport("a").unwrap_err().kind(), ErrorKind::Busy);
    rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty()).unwrap();
    s.unexport("a").unwrap();
    assert_eq!(s.exported("a"), None);
    assert!(env.devices.attached().is_empty());

    // A child, handed out read-only, sees its parent's file and refuses writes.
    s.create("b", Some("a"), None).unwrap();
    let ro = s.export("b", true).unwrap();
    rustix::mount::mount(&ro, &mnt, "ext4", MountFlags::RDONLY, None).unwrap();
    assert_eq!(fs::read(mnt.join("file")).unwrap(), b"from a");
    assert!(fs::write(mnt.join("other"), b"x").is_err());
    rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty()).unwrap();
    // Asking for it writable swaps the attachment.
    let rw = s.export("b", false).unwrap();
    assert_eq!(s.exported("b"), Some((rw.clone(), false)));
    // Unless asked not to: the other mode is then refused, and the export stays as it is.
    let e = s.export_same_mode("b", true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(e.to_string().contains("writable"), "{e}");
    assert_eq!(s.exported("b"), Some((rw.clone(), false)));
    assert_eq!(s.export_same_mode("b", false).unwrap(), rw);

    // remove detaches; once no layer is left the base volume can go too.
    s.remove("b").unwrap();
    s.remove("a").unwrap();
    assert!(env.devices.attached().is_empty());
    assert_eq!(s.remove_base_volumes().unwrap(), 1);
    assert!(env.pool.list_devices().is_empty());
}
