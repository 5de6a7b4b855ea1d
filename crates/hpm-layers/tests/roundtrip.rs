//! Diff round trip: apply A to an empty tree (orig), copy it and apply B (copy); the changes
//! of copy against orig, exported as a tar and applied to another copy of orig, give copy
//! back exactly.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{snapshot, Layer, Meta};
use hpm_layers::{apply_layer, changes, diff_size, export_changes, Change, ChangeKind};
use tar::EntryType;

fn layer_a() -> Vec<u8> {
    let m = Meta::mode;
    Layer::new()
        .dir("etc/", &m(0o755))
        .file("etc/conf", b"v1", &m(0o644))
        .file("etc/mode", b"m", &m(0o644))
        .file("etc/owner", b"o", &m(0o644))
        .file("etc/attr", b"a", &m(0o644).xattr("user.k", b"v1"))
        .file("etc/del", b"d", &m(0o644))
        .file("etc/same", b"same", &m(0o644))
        .dir("gone/", &m(0o755))
        .file("gone/x", b"x", &m(0o644))
        .file("gone/sub/y", b"y", &m(0o644))
        .file("file2dir", b"f", &m(0o644))
        .dir("dir2file/", &m(0o755))
        .file("dir2file/kid", b"k", &m(0o644))
        .dir("opq/", &m(0o755))
        .file("opq/old", b"old", &m(0o644))
        .file("opq/olddir/z", b"z", &m(0o644))
        .dir("a/", &m(0o755))
        .file("a/h1", b"linked", &m(0o644))
        .hardlink("a/h2", "a/h1")
        .dir("d/", &m(0o755))
        .file("d/keep", b"keep", &m(0o644))
        .symlink("link", "etc/conf", &m(0o777).xattr("trusted.t", b"1"))
        .dir("bin/", &m(0o755))
        .file(
            "bin/cap",
            b"cap",
            &m(0o755).xattr("security.capability", &common::CAP_NET_BIND_SERVICE),
        )
        .device("dev/null", EntryType::Char, 1, 3, &m(0o666))
        .fifo("run/fifo", &m(0o600).xattr("trusted.f", b"fifo"))
        .finish()
        .0
}

fn layer_b() -> Vec<u8> {
    let m = Meta::mode;
    Layer::new()
        .file("etc/conf", b"v2 longer", &m(0o644).mtime(1_700_000_000))
        .file("etc/mode", b"m", &m(0o600))
        .file("etc/owner", b"o", &m(0o644).owner(1000, 1000))
        .file("etc/attr", b"a", &m(0o644).xattr("user.k", b"v2"))
        .marker("etc/.wh.del")
        .marker(".wh.gone")
        .dir("file2dir/", &m(0o755))
        .file("file2dir/child", b"c", &m(0o644))
        .file("dir2file", b"now a file", &m(0o644))
        .file("opq/fresh", b"fresh", &m(0o644))
        .marker("opq/.wh..wh..opq")
        .hardlink("a/h3", "a/h1")
        .dir("d/", &m(0o700))
        .symlink("link", "etc/same", &m(0o777))
        .file("bin/suid", b"s", &m(0o4755))
        .device("dev/zero", EntryType::Char, 1, 5, &m(0o666))
        .fifo("run/newfifo", &m(0o644))
        .file("new/deep/file", b"deep", &m(0o644).xattr("user.n", b"1"))
        .finish()
        .0
}

fn expected_changes() -> Vec<Change> {
    use ChangeKind::{Add, Delete, Modify};
    let mut out: Vec<Change> = [
        ("/a", Modify),
        ("/a/h1", Modify),
        ("/a/h2", Modify),
        ("/a/h3", Add),
        ("/bin", Modify),
        ("/bin/suid", Add),
        ("/d", Modify),
        ("/dev", Modify),
        ("/dev/zero", Add),
        ("/dir2file", Modify),
        ("/etc", Modify),
        ("/etc/attr", Modify),
        ("/etc/conf", Modify),
        ("/etc/del", Delete),
        ("/etc/mode", Modify),
        ("/etc/owner", Modify),
        ("/file2dir", Modify),
        ("/file2dir/child", Add),
        ("/gone", Delete),
        ("/link", Modify),
        ("/new", Add),
        ("/new/deep", Add),
        ("/new/deep/file", Add),
        ("/opq", Modify),
        ("/opq/fresh", Add),
        ("/opq/old", Delete),
        ("/opq/olddir", Delete),
        ("/run", Modify),
        ("/run/newfifo", Add),
    ]
    .into_iter()
    .map(|(path, kind)| Change {
        path: path.into(),
        kind,
    })
    .collect();
    out.sort();
    out
}

/// Entry names and types of a tar, in order.
fn tar_entries(tar: &[u8]) -> Vec<(PathBuf, EntryType, Option<PathBuf>)> {
    let mut archive = tar::Archive::new(tar);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let link = e.link_name().unwrap().map(|l| l.into_owned());
            (
                e.path().unwrap().into_owned(),
                e.header().entry_type(),
                link,
            )
        })
        .collect()
}

#[test]
fn changes_exported_and_applied_reproduce_the_tree() {
    if !common::have_root("changes_exported_and_applied_reproduce_the_tree") {
        return;
    }
    let tmp = common::tempdir();
    let orig = tmp.path().join("orig");
    let copy = tmp.path().join("copy");
    let replay = tmp.path().join("replay");
    fs::create_dir(&orig).unwrap();
    apply_layer(&orig, &layer_a()[..]).unwrap();
    common::cp_a(&orig, &copy);
    // cp -a alone is not a change.
    assert_eq!(changes(&copy, Some(&orig)).unwrap(), vec![]);
    apply_layer(&copy, &layer_b()[..]).unwrap();

    let found = changes(&copy, Some(&orig)).unwrap();
    assert_eq!(found, expected_changes());
    // Regular files added or modified, the three links of a/h1 counted once.
    let linked = "linked".len() as u64;
    let files = [
        "s",
        "now a file",
        "a",
        "v2 longer",
        "m",
        "o",
        "c",
        "deep",
        "fresh",
    ];
    let expected_size = linked + files.iter().map(|f| f.len() as u64).sum::<u64>();
    assert_eq!(diff_size(&copy, Some(&orig)).unwrap(), expected_size);

    let tar = export_changes(&copy, &found, Vec::new()).unwrap();
    let entries = tar_entries(&tar);
    let find = |name: &str| {
        entries
            .iter()
            .find(|(p, _, _)| p == Path::new(name))
            .unwrap_or_else(|| panic!("{name} not in {entries:?}"))
    };
    // Deletions are whiteouts; the shared inode is one file plus hard links to it.
    assert_eq!(find("etc/.wh.del").1, EntryType::Regular);
    assert_eq!(find(".wh.gone").1, EntryType::Regular);
    assert_eq!(find("opq/.wh.old").1, EntryType::Regular);
    assert_eq!(find("a/h1").1, EntryType::Regular);
    assert_eq!(find("a/h2").1, EntryType::Link);
    assert_eq!(find("a/h2").2.as_deref(), Some(Path::new("a/h1")));
    assert_eq!(find("a/h3").1, EntryType::Link);
    assert_eq!(find("dev/zero").1, EntryType::Char);
    assert!(entries.iter().all(|(p, _, _)| !p.ends_with(".wh..wh..opq")));

    common::cp_a(&orig, &replay);
    apply_layer(&replay, &tar[..]).unwrap();
    let want = snapshot(&copy);
    common::assert_same_tree(&snapshot(&replay), &want);
    // Spot checks that the snapshot saw what matters.
    let item = |p: &str| want[Path::new(p)].clone();
    assert_eq!(item("bin/suid").mode, 0o4755);
    assert_eq!(item("a/h3").linked_to.as_deref(), Some(Path::new("a/h1")));
    assert_eq!(item("etc/owner").uid, 1000);
    assert_eq!(item("etc/attr").xattrs["user.k"], b"v2");
    assert_eq!(
        item("bin/cap").xattrs["security.capability"],
        common::CAP_NET_BIND_SERVICE
    );
    // And the replayed tree has no changes left against the copy.
    assert_eq!(changes(&replay, Some(&copy)).unwrap(), vec![]);
}

#[test]
fn a_whole_tree_exported_from_nothing_rebuilds_it() {
    if !common::have_root("a_whole_tree_exported_from_nothing_rebuilds_it") {
        return;
    }
    let tmp = common::tempdir();
    let orig = tmp.path().join("orig");
    let rebuilt = tmp.path().join("rebuilt");
    fs::create_dir(&orig).unwrap();
    fs::create_dir(&rebuilt).unwrap();
    apply_layer(&orig, &layer_a()[..]).unwrap();

    let all = changes(&orig, None).unwrap();
    assert!(all.iter().all(|c| c.kind == ChangeKind::Add));
    assert_eq!(all.len(), snapshot(&orig).len());
    let tar = export_changes(&orig, &all, Vec::new()).unwrap();
    apply_layer(&rebuilt, &tar[..]).unwrap();
    common::assert_same_tree(&snapshot(&rebuilt), &snapshot(&orig));
}

/// A real client's tar: GNU tar in PAX format (xattrs, sub-second times, hard links,
/// devices) applies to the same tree.
#[test]
fn a_tree_tarred_by_gnu_tar_applies_identically() {
    if !common::have_root("a_tree_tarred_by_gnu_tar_applies_identically") {
        return;
    }
    let tmp = common::tempdir();
    let orig = tmp.path().join("orig");
    let rebuilt = tmp.path().join("rebuilt");
    fs::create_dir(&orig).unwrap();
    fs::create_dir(&rebuilt).unwrap();
    apply_layer(&orig, &layer_a()[..]).unwrap();
    let tar = std::process::Command::new("tar")
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--format=posix",
            "--numeric-owner",
        ])
        .arg("-C")
        .arg(&orig)
        .args(["-cf", "-", "."])
        .output()
        .expect("running GNU tar");
    assert!(
        tar.status.success(),
        "{}",
        String::from_utf8_lossy(&tar.stderr)
    );

    apply_layer(&rebuilt, &tar.stdout[..]).unwrap();
    common::assert_same_tree(&snapshot(&rebuilt), &snapshot(&orig));
    assert_eq!(changes(&rebuilt, Some(&orig)).unwrap(), vec![]);
}

/// A write that keeps a file's size, made in the same second as the file's whole-second time
/// from the image, is a change (moby's rule takes those times as equal and would lose it).
#[test]
fn a_same_size_write_in_the_second_of_the_image_time_is_a_change() {
    if !common::have_root("a_same_size_write_in_the_second_of_the_image_time_is_a_change") {
        return;
    }
    let tmp = common::tempdir();
    let orig = tmp.path().join("orig");
    let copy = tmp.path().join("copy");
    fs::create_dir(&orig).unwrap();
    let image = Layer::new()
        .file("f", b"old", &Meta::mode(0o644).mtime(1_700_000_000))
        .file("g", b"same", &Meta::mode(0o644).mtime(1_700_000_000))
        .finish()
        .0;
    apply_layer(&orig, &image[..]).unwrap();
    common::cp_a(&orig, &copy);
    assert_eq!(common::mtime(&copy.join("f")), (1_700_000_000, 0));

    let f = fs::OpenOptions::new()
        .write(true)
        .open(copy.join("f"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"new", 0).unwrap();
    let written = std::time::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 500_000_000);
    f.set_times(fs::FileTimes::new().set_modified(written))
        .unwrap();
    drop(f);

    let found = changes(&copy, Some(&orig)).unwrap();
    assert_eq!(
        found
            .iter()
            .map(|c| (c.path.clone(), c.kind))
            .collect::<Vec<_>>(),
        vec![(PathBuf::from("/f"), ChangeKind::Modify)]
    );
    let tar = export_changes(&copy, &found, Vec::new()).unwrap();
    let replay = tmp.path().join("replay");
    common::cp_a(&orig, &replay);
    apply_layer(&replay, &tar[..]).unwrap();
    assert_eq!(fs::read(replay.join("f")).unwrap(), b"new");
}
