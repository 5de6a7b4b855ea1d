//! Hostile layers: every way out of the layer root is refused with an error naming the
//! entry, and a sentinel directory next to the root is untouched.

mod common;

use std::fs;
use std::path::Path;

use common::{snapshot, Layer, Meta};
use hpm_layers::{apply_layer, ErrorKind};
use tar::EntryType;

/// `tmp/root` (the layer root, with a file of its own) and `tmp/outside/` (a sentinel file and
/// directory).
fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = common::tempdir();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(root.join("ok")).unwrap();
    fs::write(root.join("ok/file"), b"inside").unwrap();
    fs::create_dir_all(outside.join("dir")).unwrap();
    fs::write(outside.join("sentinel"), b"do not touch").unwrap();
    fs::write(outside.join("dir/inner"), b"do not touch either").unwrap();
    (tmp, root, outside)
}

/// Builds a layer given the sentinel directory's path.
type BuildLayer = Box<dyn Fn(&Path) -> Layer>;

fn file_meta() -> Meta {
    Meta::mode(0o644)
}

fn link_meta() -> Meta {
    Meta::mode(0o777)
}

/// The outside directory's absolute path as a name inside the root (`var/tmp/.../outside`),
/// so that a layer following `evil -> /` would land in the sentinel, not in the host's /etc.
fn outside_rel(outside: &Path) -> String {
    outside
        .to_str()
        .unwrap()
        .trim_start_matches('/')
        .to_string()
}

#[test]
fn escapes_are_refused_and_nothing_outside_changes() {
    if !common::have_root("escapes_are_refused_and_nothing_outside_changes") {
        return;
    }
    // (what, layer, kind, text the message must contain)
    let cases: Vec<(&str, BuildLayer, ErrorKind, &str)> = vec![
        (
            "dot-dot path",
            Box::new(|_| Layer::new().file("../../etc/x", b"x", &Meta::mode(0o644))),
            ErrorKind::Escape,
            "layer entry \"../../etc/x\" climbs out of the layer root",
        ),
        (
            "dot-dot to the sentinel",
            Box::new(|_| Layer::new().file("../outside/pwned", b"x", &Meta::mode(0o644))),
            ErrorKind::Escape,
            "\"../outside/pwned\" climbs out",
        ),
        (
            "dot-dot after a component",
            Box::new(|_| Layer::new().file("a/../../outside/pwned", b"x", &Meta::mode(0o644))),
            ErrorKind::Escape,
            "\"a/../../outside/pwned\" climbs out",
        ),
        (
            "file through a symlink to /",
            Box::new(|outside| {
                Layer::new().symlink("evil", "/", &link_meta()).file(
                    &format!("evil/{}/pwned", outside_rel(outside)),
                    b"x",
                    &file_meta(),
                )
            }),
            ErrorKind::Escape,
            "goes through the symlink evil",
        ),
        (
            "file through a symlink to ..",
            Box::new(|_| {
                Layer::new()
                    .symlink("evil", "../outside", &link_meta())
                    .file("evil/pwned", b"x", &file_meta())
            }),
            ErrorKind::Escape,
            "layer entry \"evil/pwned\" goes through the symlink evil",
        ),
        (
            "file through an absolute symlink to the sentinel",
            Box::new(|outside| {
                Layer::new()
                    .symlink("abs", outside.to_str().unwrap(), &link_meta())
                    .file("abs/pwned", b"x", &file_meta())
            }),
            ErrorKind::Escape,
            "layer entry \"abs/pwned\" goes through the symlink abs",
        ),
        (
            "directory through a deeper symlink",
            Box::new(|_| {
                Layer::new()
                    .symlink("ok/evil", "../../outside", &link_meta())
                    .dir("ok/evil/dir/sub/", &Meta::mode(0o755))
            }),
            ErrorKind::Escape,
            "goes through the symlink ok/evil",
        ),
        (
            "file overwriting through a symlinked directory",
            Box::new(|_| {
                Layer::new()
                    .symlink("evil", "../outside", &link_meta())
                    .file("evil/sentinel", b"pwned", &file_meta())
            }),
            ErrorKind::Escape,
            "\"evil/sentinel\" goes through the symlink evil",
        ),
        (
            "symlink created through a symlink",
            Box::new(|_| {
                Layer::new()
                    .symlink("evil", "../outside", &link_meta())
                    .symlink("evil/s", "x", &link_meta())
            }),
            ErrorKind::Escape,
            "\"evil/s\" goes through the symlink evil",
        ),
        (
            "device node through a symlink",
            Box::new(|_| {
                Layer::new()
                    .symlink("evil", "../outside", &link_meta())
                    .device("evil/null", EntryType::Char, 1, 3, &Meta::mode(0o666))
            }),
            ErrorKind::Escape,
            "\"evil/null\" goes through the symlink evil",
        ),
        (
            "hard link to an absolute path (the root's /etc/passwd, missing)",
            Box::new(|_| Layer::new().hardlink("h", "/etc/passwd")),
            ErrorKind::NotFound,
            "hard link \"h\" points to \"/etc/passwd\", which does not exist in the layer root",
        ),
        (
            "hard link to ../outside",
            Box::new(|_| Layer::new().hardlink("h", "../outside/sentinel")),
            ErrorKind::Escape,
            "hard link \"h\" points to \"../outside/sentinel\", outside the layer root",
        ),
        (
            "hard link to ../../etc/passwd",
            Box::new(|_| Layer::new().hardlink("h", "../../etc/passwd")),
            ErrorKind::Escape,
            "hard link \"h\" points to \"../../etc/passwd\", outside the layer root",
        ),
        (
            "hard link through a symlinked directory",
            Box::new(|_| {
                Layer::new()
                    .symlink("lnk", "../outside", &link_meta())
                    .hardlink("h", "lnk/sentinel")
            }),
            ErrorKind::Escape,
            "\"h\" (hard link target \"lnk/sentinel\") goes through the symlink lnk",
        ),
        (
            "hard link placed through a symlinked directory",
            Box::new(|_| {
                Layer::new()
                    .symlink("evil", "../outside", &link_meta())
                    .hardlink("evil/h", "ok/file")
            }),
            ErrorKind::Escape,
            "\"evil/h\" goes through the symlink evil",
        ),
        (
            "whiteout climbing out",
            Box::new(|_| Layer::new().marker("../.wh.outside")),
            ErrorKind::Escape,
            "\"../.wh.outside\" climbs out",
        ),
        (
            "whiteout through a symlink",
            Box::new(|_| {
                Layer::new()
                    .symlink("evil", "../outside", &link_meta())
                    .marker("evil/.wh.sentinel")
            }),
            ErrorKind::Escape,
            "\"evil/.wh.sentinel\" goes through the symlink evil",
        ),
        (
            "opaque marker through a symlink",
            Box::new(|_| {
                Layer::new()
                    .symlink("evil", "../outside", &link_meta())
                    .marker("evil/.wh..wh..opq")
            }),
            ErrorKind::Escape,
            "\"evil/.wh..wh..opq\" goes through the symlink evil",
        ),
    ];

    for (what, layer, kind, message) in cases {
        let (_tmp, root, outside) = setup();
        let before = snapshot(&outside);
        let (tar, _) = layer(&outside).finish();
        let err = apply_layer(&root, &tar[..]).expect_err(what);
        eprintln!("{what}: {err}");
        assert_eq!(err.kind(), kind, "{what}: {err}");
        assert!(
            err.to_string().contains(message),
            "{what}: message {:?} lacks {message:?}",
            err.to_string()
        );
        common::assert_same_tree(&snapshot(&outside), &before);
        assert_eq!(fs::read(root.join("ok/file")).unwrap(), b"inside", "{what}");
        assert!(!Path::new("/etc/x").exists() && !Path::new("/etc/pwned").exists());
    }
}

/// Symlinks to the outside are data: creating, replacing, whiting out, hard linking them
/// or making their directory opaque never touches their target.
#[test]
fn symlinks_out_are_data_and_never_followed() {
    if !common::have_root("symlinks_out_are_data_and_never_followed") {
        return;
    }
    let (_tmp, root, outside) = setup();
    let before = snapshot(&outside);
    let l = Meta::mode(0o777);
    let m = Meta::mode(0o644);
    let (tar, _) = Layer::new()
        .symlink("abs", outside.join("sentinel").to_str().unwrap(), &l)
        .symlink("rel", "../outside/sentinel", &l)
        .symlink("dir", "../outside/dir", &l)
        .symlink("gone", "../outside", &l)
        .symlink("keep/link", "../../outside/dir", &l)
        // A hard link to a symlink links the symlink itself.
        .hardlink("hl", "abs")
        // Replacing a symlink replaces the link, not its target.
        .file("rel", b"replaced", &m)
        .dir("dir/", &Meta::mode(0o755))
        .marker(".wh.gone")
        .file("keep/new", b"new", &m)
        .marker("keep/.wh..wh..opq")
        .finish();
    apply_layer(&root, &tar[..]).unwrap();

    common::assert_same_tree(&snapshot(&outside), &before);
    assert_eq!(fs::read(root.join("rel")).unwrap(), b"replaced");
    assert!(root.join("dir").is_dir() && !root.join("dir").is_symlink());
    assert!(!root.join("gone").exists() && !root.join("gone").is_symlink());
    assert!(root.join("hl").is_symlink());
    assert_eq!(
        fs::read_link(root.join("hl")).unwrap(),
        outside.join("sentinel")
    );
    assert!(
        root.join("keep/link").is_symlink(),
        "written by this layer: kept"
    );

    // An opaque marker over a directory holding a symlink out removes the link only.
    let (tar, _) = Layer::new().marker("keep/.wh..wh..opq").finish();
    apply_layer(&root, &tar[..]).unwrap();
    assert!(!root.join("keep/link").is_symlink());
    common::assert_same_tree(&snapshot(&outside), &before);
}

/// A stream: `head`, then `b'a'` up to `total` bytes; counts what was read.
struct Stream {
    head: Vec<u8>,
    total: u64,
    sent: u64,
}

impl std::io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.total - self.sent;
        let n = (buf.len() as u64).min(left) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = *self
                .head
                .get((self.sent as usize).saturating_add(i))
                .unwrap_or(&b'a');
        }
        self.sent += n as u64;
        Ok(n)
    }
}

/// An extension header (a GNU long name here) claiming 8 GiB: the tar crate would read it
/// whole into memory; it is refused at its header, as Go's archive/tar refuses those over
/// 1 MiB.
#[test]
fn an_oversized_extension_header_is_refused_before_it_is_read() {
    let (_tmp, root, _outside) = setup();
    let mut h = tar::Header::new_gnu();
    h.set_path("././@LongLink").unwrap();
    h.set_entry_type(EntryType::GNULongName);
    h.set_size(8 << 30);
    h.set_cksum();
    // Ends after 64 MiB, so that a reader without the limit fails this test quickly.
    let mut stream = Stream {
        head: h.as_bytes().to_vec(),
        total: 64 << 20,
        sent: 0,
    };
    let e = apply_layer(&root, &mut stream).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("GNU long name"), "{e}");
    assert!(stream.sent < 1 << 20, "read {} bytes of it", stream.sent);
}
