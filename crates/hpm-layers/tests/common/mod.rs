//! Shared test helpers: a root check, layer tars built entry by entry (hostile names
//! included), and a tree snapshot that compares everything a layer can carry.

// Each test binary uses a different subset of the helpers.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tar::{EntryType, Header};

/// Device nodes and foreign owners need root. Under CI (root) a missing root fails loudly;
/// elsewhere the test is skipped with a note.
pub fn have_root(test: &str) -> bool {
    hpm_testkit::host::require(test, true, &[], &[])
}

/// A temporary directory on /var/tmp (ext4 here: user.* xattrs work, unlike some tmpfs).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("hpm-layers-")
        .tempdir_in("/var/tmp")
        .expect("creating a temporary directory in /var/tmp")
}

/// `cp -a src dst`.
pub fn cp_a(src: &Path, dst: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dst)
        .status()
        .expect("running cp -a");
    assert!(
        status.success(),
        "cp -a {} {}",
        src.display(),
        dst.display()
    );
}

/// Metadata of a tar entry.
#[derive(Clone)]
pub struct Meta {
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    pub fn mode(mode: u32) -> Self {
        Self {
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            xattrs: Vec::new(),
        }
    }

    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }

    pub fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        self.xattrs.push((name.to_string(), value.to_vec()));
        self
    }
}

/// A layer tar under construction. Names are written into the header as given, without
/// the tar crate's checks, so hostile names (`..`, absolute) can be built.
pub struct Layer {
    builder: tar::Builder<Vec<u8>>,
    /// Sum of the entries' sizes: what applying the layer must return.
    pub size: u64,
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
            size: 0,
        }
    }

    pub fn entry(
        mut self,
        name: &str,
        kind: EntryType,
        link: Option<&str>,
        data: &[u8],
        meta: &Meta,
    ) -> Self {
        if !meta.xattrs.is_empty() {
            let records: Vec<(String, &[u8])> = meta
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), &v[..]))
                .collect();
            self.builder
                .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap();
        }
        let mut header = Header::new_gnu();
        set_raw(&mut header.as_old_mut().name, name.as_bytes());
        if let Some(link) = link {
            set_raw(&mut header.as_old_mut().linkname, link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_mode(meta.mode);
        header.set_uid(meta.uid);
        header.set_gid(meta.gid);
        header.set_mtime(meta.mtime);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.builder.append(&header, data).unwrap();
        self.size += data.len() as u64;
        self
    }

    pub fn dir(self, name: &str, meta: &Meta) -> Self {
        self.entry(name, EntryType::Directory, None, b"", meta)
    }

    pub fn file(self, name: &str, data: &[u8], meta: &Meta) -> Self {
        self.entry(name, EntryType::Regular, None, data, meta)
    }

    pub fn symlink(self, name: &str, target: &str, meta: &Meta) -> Self {
        self.entry(name, EntryType::Symlink, Some(target), b"", meta)
    }

    pub fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(name, EntryType::Link, Some(target), b"", &Meta::mode(0o644))
    }

    pub fn fifo(self, name: &str, meta: &Meta) -> Self {
        self.entry(name, EntryType::Fifo, None, b"", meta)
    }

    pub fn device(
        mut self,
        name: &str,
        kind: EntryType,
        major: u32,
        minor: u32,
        meta: &Meta,
    ) -> Self {
        let mut header = Header::new_gnu();
        set_raw(&mut header.as_old_mut().name, name.as_bytes());
        header.set_entry_type(kind);
        header.set_mode(meta.mode);
        header.set_uid(meta.uid);
        header.set_gid(meta.gid);
        header.set_mtime(meta.mtime);
        header.set_size(0);
        header.set_device_major(major).unwrap();
        header.set_device_minor(minor).unwrap();
        header.set_cksum();
        self.builder.append(&header, &b""[..]).unwrap();
        self
    }

    /// An empty regular file: how whiteouts and opaque markers are written.
    pub fn marker(self, name: &str) -> Self {
        self.file(name, b"", &Meta::mode(0))
    }

    /// The tar bytes and the sum of the entries' sizes.
    pub fn finish(self) -> (Vec<u8>, u64) {
        (self.builder.into_inner().unwrap(), self.size)
    }
}

fn set_raw(slot: &mut [u8], value: &[u8]) {
    assert!(
        value.len() <= slot.len(),
        "test names must fit the old header"
    );
    slot.fill(0);
    slot[..value.len()].copy_from_slice(value);
}

/// What a path is, with the data that identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(PathBuf),
    Fifo,
    Char(u32, u32),
    Block(u32, u32),
    Socket,
}

/// Everything a layer carries about one path (directory sizes and times excluded: they
/// depend on the filesystem and on the order of creation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// For a non-directory with several links: the smallest path of the inode in the tree.
    pub linked_to: Option<PathBuf>,
}

impl Item {
    pub fn new(kind: Kind, mode: u32) -> Self {
        Self {
            kind,
            mode,
            uid: 0,
            gid: 0,
            xattrs: BTreeMap::new(),
            linked_to: None,
        }
    }

    pub fn file(data: &[u8], mode: u32) -> Self {
        Self::new(Kind::File(data.to_vec()), mode)
    }

    pub fn dir(mode: u32) -> Self {
        Self::new(Kind::Dir, mode)
    }

    pub fn symlink(target: &str) -> Self {
        Self::new(Kind::Symlink(target.into()), 0o777)
    }

    pub fn owner(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        self.xattrs.insert(name.to_string(), value.to_vec());
        self
    }

    pub fn linked_to(mut self, first: &str) -> Self {
        self.linked_to = Some(first.into());
        self
    }
}

/// Every path under `root` (relative, root excluded) with its [`Item`].
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Item> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    walk(root, root, &mut out, &mut inodes);
    for paths in inodes.values() {
        if paths.len() > 1 {
            let first = paths.iter().min().unwrap().clone();
            for p in paths {
                out.get_mut(p).unwrap().linked_to = Some(first.clone());
            }
        }
    }
    out
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<PathBuf, Item>,
    inodes: &mut HashMap<(u64, u64), Vec<PathBuf>>,
) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let md = fs::symlink_metadata(&path).unwrap();
        let ft = md.file_type();
        let rdev = md.rdev();
        let dev = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File(fs::read(&path).unwrap())
        } else if ft.is_symlink() {
            Kind::Symlink(fs::read_link(&path).unwrap())
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_char_device() {
            Kind::Char(dev.0, dev.1)
        } else if ft.is_block_device() {
            Kind::Block(dev.0, dev.1)
        } else {
            Kind::Socket
        };
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        if !ft.is_dir() && md.nlink() > 1 {
            inodes
                .entry((md.dev(), md.ino()))
                .or_default()
                .push(rel.clone());
        }
        let item = Item {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            xattrs: xattrs(&path),
            linked_to: None,
        };
        out.insert(rel, item);
        if ft.is_dir() {
            walk(root, &path, out, inodes);
        }
    }
}

/// All extended attributes of `path` (not following a symlink).
pub fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut names = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(path, &mut names[..]).unwrap();
    let mut out = BTreeMap::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 4096];
        let len = rustix::fs::lgetxattr(path, OsStr::from_bytes(name), &mut value[..]).unwrap();
        value.truncate(len);
        out.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    out
}

/// Modification time of `path` (not following a symlink): (seconds, nanoseconds).
pub fn mtime(path: &Path) -> (i64, i64) {
    let md = fs::symlink_metadata(path).unwrap();
    (md.mtime(), md.mtime_nsec())
}

/// Asserts two snapshots are equal, showing only the paths that differ.
pub fn assert_same_tree(left: &BTreeMap<PathBuf, Item>, right: &BTreeMap<PathBuf, Item>) {
    let mut diffs = Vec::new();
    for (path, item) in left {
        match right.get(path) {
            Some(other) if other == item => {}
            other => diffs.push(format!(
                "{}:\n  left:  {item:?}\n  right: {other:?}",
                path.display()
            )),
        }
    }
    for (path, item) in right {
        if !left.contains_key(path) {
            diffs.push(format!(
                "{}:\n  left:  None\n  right: {item:?}",
                path.display()
            ));
        }
    }
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));
}

/// A valid `security.capability` value (revision 2, effective, cap_net_bind_service).
pub const CAP_NET_BIND_SERVICE: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// Builds the expected map from `(path, item)` pairs.
pub fn tree(items: Vec<(&str, Item)>) -> BTreeMap<PathBuf, Item> {
    items
        .into_iter()
        .map(|(p, i)| (PathBuf::from(p), i))
        .collect()
}
