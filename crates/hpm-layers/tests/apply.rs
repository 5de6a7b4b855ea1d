//! Applying layer tars: every entry type, owners, modes, times, xattrs, then whiteouts and
//! opaque directories on top, each checked against the exact expected tree.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{mtime, snapshot, tree, Item, Kind, Layer, Meta};
use hpm_layers::{apply_layer, ErrorKind};
use tar::EntryType;

fn base_layer() -> (Vec<u8>, u64) {
    let m = Meta::mode;
    Layer::new()
        .dir("./", &m(0o755).mtime(1_234_567_890))
        .dir("etc/", &m(0o755))
        .file(
            "etc/passwd",
            b"root:x:0:0::/root:/bin/sh\n",
            &m(0o644).mtime(1_600_000_123),
        )
        // No entries for usr/ and usr/bin/: created as 0755 root directories.
        .file("usr/bin/tool", b"tool", &m(0o755))
        .file("usr/bin/su", b"su", &m(0o4755))
        .file(
            "usr/bin/ping",
            b"ping",
            &m(0o755).xattr("security.capability", &common::CAP_NET_BIND_SERVICE),
        )
        .hardlink("usr/bin/su-link", "usr/bin/su")
        .dir("home/user/", &m(0o750).owner(1000, 1000))
        .file(
            "home/user/notes",
            b"notes",
            &m(0o600).owner(1000, 1000).xattr("user.comment", b"hi"),
        )
        .symlink(
            "home/user/link",
            "/etc/passwd",
            &m(0o777).owner(1000, 1000).mtime(1_400_000_000),
        )
        .symlink(
            "bin",
            "usr/bin",
            &m(0o777).xattr("trusted.note", b"on a symlink"),
        )
        .fifo(
            "run/fifo",
            &m(0o640).owner(0, 5).xattr("trusted.note", b"on a fifo"),
        )
        .device("dev/null", EntryType::Char, 1, 3, &m(0o666))
        .device("dev/loop9", EntryType::Block, 7, 9, &m(0o660).owner(0, 6))
        .dir("tmp/", &m(0o1777))
        .dir("var/mail/", &m(0o2775).owner(0, 8))
        .file("var/mail/root", b"", &m(0o660).owner(0, 8))
        .dir("srv/", &m(0o755).mtime(1_500_000_000))
        // Written after srv/: the directory's time is set at the end.
        .file("srv/www/index.html", b"<html>", &m(0o644))
        .dir("opq/", &m(0o755))
        .file("opq/keep", b"keep", &m(0o644))
        .dir("opq/sub/", &m(0o755))
        .file("opq/sub/old", b"old", &m(0o644))
        // AUFS metadata: skipped, nothing created.
        .file(".wh..wh.plnk/123", b"aufs", &m(0o644))
        .finish()
}

fn base_tree() -> Vec<(&'static str, Item)> {
    vec![
        ("etc", Item::dir(0o755)),
        (
            "etc/passwd",
            Item::file(b"root:x:0:0::/root:/bin/sh\n", 0o644),
        ),
        ("usr", Item::dir(0o755)),
        ("usr/bin", Item::dir(0o755)),
        ("usr/bin/tool", Item::file(b"tool", 0o755)),
        (
            "usr/bin/su",
            Item::file(b"su", 0o4755).linked_to("usr/bin/su"),
        ),
        (
            "usr/bin/su-link",
            Item::file(b"su", 0o4755).linked_to("usr/bin/su"),
        ),
        (
            "usr/bin/ping",
            Item::file(b"ping", 0o755).xattr("security.capability", &common::CAP_NET_BIND_SERVICE),
        ),
        ("home", Item::dir(0o755)),
        ("home/user", Item::dir(0o750).owner(1000, 1000)),
        (
            "home/user/notes",
            Item::file(b"notes", 0o600)
                .owner(1000, 1000)
                .xattr("user.comment", b"hi"),
        ),
        (
            "home/user/link",
            Item::symlink("/etc/passwd").owner(1000, 1000),
        ),
        (
            "bin",
            Item::symlink("usr/bin").xattr("trusted.note", b"on a symlink"),
        ),
        ("run", Item::dir(0o755)),
        (
            "run/fifo",
            Item::new(Kind::Fifo, 0o640)
                .owner(0, 5)
                .xattr("trusted.note", b"on a fifo"),
        ),
        ("dev", Item::dir(0o755)),
        ("dev/null", Item::new(Kind::Char(1, 3), 0o666)),
        ("dev/loop9", Item::new(Kind::Block(7, 9), 0o660).owner(0, 6)),
        ("tmp", Item::dir(0o1777)),
        ("var", Item::dir(0o755)),
        ("var/mail", Item::dir(0o2775).owner(0, 8)),
        ("var/mail/root", Item::file(b"", 0o660).owner(0, 8)),
        ("srv", Item::dir(0o755)),
        ("srv/www", Item::dir(0o755)),
        ("srv/www/index.html", Item::file(b"<html>", 0o644)),
        ("opq", Item::dir(0o755)),
        ("opq/keep", Item::file(b"keep", 0o644)),
        ("opq/sub", Item::dir(0o755)),
        ("opq/sub/old", Item::file(b"old", 0o644)),
    ]
}

#[test]
fn every_entry_type_with_its_metadata() {
    if !common::have_root("every_entry_type_with_its_metadata") {
        return;
    }
    let tmp = common::tempdir();
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    let (tar, size) = base_layer();

    assert_eq!(apply_layer(&root, &tar[..]).unwrap(), size);

    common::assert_same_tree(&snapshot(&root), &tree(base_tree()));
    assert_eq!(fs::metadata(&root).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(mtime(&root), (1_234_567_890, 0));
    assert_eq!(mtime(&root.join("etc/passwd")), (1_600_000_123, 0));
    assert_eq!(mtime(&root.join("home/user/link")), (1_400_000_000, 0));
    assert_eq!(mtime(&root.join("run/fifo")), (1_600_000_000, 0));
    assert_eq!(mtime(&root.join("dev/null")), (1_600_000_000, 0));
    // Set after srv/www/index.html was created inside it.
    assert_eq!(mtime(&root.join("srv")), (1_500_000_000, 0));
}

#[test]
fn whiteouts_opaque_dirs_and_replacements() {
    if !common::have_root("whiteouts_opaque_dirs_and_replacements") {
        return;
    }
    let tmp = common::tempdir();
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    apply_layer(&root, &base_layer().0[..]).unwrap();

    let m = Meta::mode;
    let (tar, size) = Layer::new()
        .marker("etc/.wh.passwd")
        // The opaque marker comes after an entry of the same directory, which stays.
        .file("home/user/new", b"new", &m(0o644).owner(1000, 1000))
        .marker("home/user/.wh..wh..opq")
        .marker(".wh.bin")
        // A directory replaces a file; the file's other hard link keeps the data.
        .dir("usr/bin/su/", &m(0o755))
        // Dir-on-dir: only the metadata changes, the contents stay.
        .dir("srv/", &m(0o700).mtime(1_500_000_001))
        .file(".wh..wh.plnk/456", b"aufs", &m(0o644))
        .marker("usr/.wh..wh.foo")
        .marker("var/.wh.mail")
        // opq/sub exists below and gets no entry; the marker keeps what this layer wrote.
        .file("opq/sub/new", b"new", &m(0o644))
        .marker("opq/.wh..wh..opq")
        // A file replaces a device node.
        .file("dev/null", b"not a device", &m(0o644))
        // A whiteout of something that does not exist is fine.
        .marker("etc/.wh.nothing")
        .finish();

    assert_eq!(apply_layer(&root, &tar[..]).unwrap(), size);

    let mut expected = tree(base_tree());
    for gone in [
        "etc/passwd",
        "home/user/notes",
        "home/user/link",
        "bin",
        "var/mail",
        "var/mail/root",
        "opq/keep",
        "opq/sub/old",
        "usr/bin/su",
    ] {
        expected.remove(Path::new(gone)).unwrap();
    }
    let add = |expected: &mut std::collections::BTreeMap<_, _>, path: &str, item: Item| {
        expected.insert(path.into(), item);
    };
    add(
        &mut expected,
        "home/user/new",
        Item::file(b"new", 0o644).owner(1000, 1000),
    );
    add(&mut expected, "usr/bin/su", Item::dir(0o755));
    add(&mut expected, "usr/bin/su-link", Item::file(b"su", 0o4755));
    add(&mut expected, "srv", Item::dir(0o700));
    add(&mut expected, "opq/sub/new", Item::file(b"new", 0o644));
    add(
        &mut expected,
        "dev/null",
        Item::file(b"not a device", 0o644),
    );
    common::assert_same_tree(&snapshot(&root), &expected);
    assert_eq!(mtime(&root.join("srv")), (1_500_000_001, 0));
}

#[test]
fn pax_times_and_long_names() {
    if !common::have_root("pax_times_and_long_names") {
        return;
    }
    let tmp = common::tempdir();
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    // The tar crate's own builder: GNU long names, PAX mtime with nanoseconds.
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(150));
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_pax_extensions([("mtime", &b"1700000000.123456789"[..])])
        .unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(EntryType::Regular);
    header.set_mode(0o640);
    header.set_size(3);
    builder
        .append_data(&mut header, &long, &b"abc"[..])
        .unwrap();
    let tar = builder.into_inner().unwrap();

    assert_eq!(apply_layer(&root, &tar[..]).unwrap(), 3);
    let path = root.join(&long);
    assert_eq!(fs::read(&path).unwrap(), b"abc");
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);
    assert_eq!(mtime(&path), (1_700_000_000, 123_456_789));
}

#[test]
fn malformed_layers_are_refused_with_a_clear_error() {
    if !common::have_root("malformed_layers_are_refused_with_a_clear_error") {
        return;
    }
    let tmp = common::tempdir();
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    let m = Meta::mode(0o644);

    let cases: Vec<(&str, Vec<u8>, ErrorKind, &str)> = vec![
        (
            "whiteout of nothing",
            Layer::new().marker("a/.wh.").finish().0,
            ErrorKind::Invalid,
            "\"a/.wh.\" is a whiteout that names no file",
        ),
        (
            "hard link to a missing file",
            Layer::new().hardlink("h", "missing").finish().0,
            ErrorKind::NotFound,
            "hard link \"h\" points to \"missing\", which does not exist",
        ),
        (
            "file under a file",
            Layer::new()
                .file("f", b"x", &m)
                .file("f/g", b"y", &m)
                .finish()
                .0,
            ErrorKind::Invalid,
            "layer entry \"f/g\" needs f in",
        ),
        (
            "the root as a file",
            Layer::new().file("./", b"", &m).finish().0,
            ErrorKind::Invalid,
            "names the layer root but is a Regular",
        ),
        (
            "unknown entry type",
            Layer::new()
                .entry("x", EntryType::new(b'Z'), None, b"", &m)
                .finish()
                .0,
            ErrorKind::Unsupported,
            "layer entry \"x\" has tar type",
        ),
        (
            "truncated data",
            {
                let mut tar = Layer::new().file("big", &[7u8; 4096], &m).finish().0;
                tar.truncate(512 + 1000);
                tar
            },
            ErrorKind::Invalid,
            "\"big\"",
        ),
    ];
    for (what, tar, kind, message) in cases {
        let err = apply_layer(&root, &tar[..]).expect_err(what);
        assert_eq!(err.kind(), kind, "{what}: {err}");
        assert!(err.to_string().contains(message), "{what}: {err}");
    }
}
