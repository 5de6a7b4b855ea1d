//! The snapshotter's own metadata: which containerd key is which layer, its kind, parent,
//! labels and times. One JSON file, `snapshots.json` in the state directory, replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory) after every
//! change; its format is normative in docs/design.md ("containerd snapshot metadata").
//!
//! Owns the file and the in-memory table. Must never hold anything the pool owns (sizes,
//! usage of active snapshots): those are read from the layer store. Never interprets keys:
//! they are opaque strings, used only as map keys in the file.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Code, Error, Info, Kind, Labels, Result};

/// The file's name in the state directory.
pub(super) const FILE: &str = "snapshots.json";
/// The format version this code reads and writes.
const VERSION: u32 = 1;

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Record {
    /// Layer id in the store (the pool device is `containerd/<id>`).
    pub(super) id: u64,
    pub(super) kind: Kind,
    /// The committed parent's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) parent: Option<String>,
    /// Nanoseconds since the Unix epoch.
    pub(super) created_ns: u64,
    pub(super) updated_ns: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) labels: Labels,
    /// Bytes the snapshot owned when it was committed (committed snapshots only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) usage: Option<u64>,
}

impl Record {
    /// The layer id as the store spells it.
    pub(super) fn layer(&self) -> String {
        self.id.to_string()
    }

    /// containerd's view of the record named `name`.
    pub(super) fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_string(),
            parent: self.parent.clone(),
            kind: self.kind,
            created: from_ns(self.created_ns),
            updated: from_ns(self.updated_ns),
            labels: self.labels.clone(),
        }
    }
}

/// The file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Table {
    version: u32,
    /// The next layer id to hand out; ids are never reused.
    pub(super) next_id: u64,
    /// Snapshots by key (or name, once committed).
    pub(super) snapshots: BTreeMap<String, Record>,
}

/// The table and where it lives.
pub(super) struct MetaFile {
    path: PathBuf,
    pub(super) table: Table,
}

impl MetaFile {
    /// Reads `dir/snapshots.json`; an absent file is an empty table. A file that does not
    /// parse is an error naming it: nothing is guessed or overwritten.
    pub(super) fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        let table = match fs::read(&path) {
            Ok(bytes) => {
                let t: Table = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::new(
                        Code::Internal,
                        format!(
                            "the snapshot metadata {} is corrupt ({e}); move it away to start with no containerd snapshots",
                            path.display()
                        ),
                    )
                })?;
                if t.version != VERSION {
                    return Err(Error::new(
                        Code::Internal,
                        format!(
                            "the snapshot metadata {} has format version {}, this hpmapper reads version {VERSION}",
                            path.display(),
                            t.version
                        ),
                    ));
                }
                t
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Table {
                version: VERSION,
                next_id: 1,
                snapshots: BTreeMap::new(),
            },
            Err(e) => return Err(io(format!("reading {}", path.display()), e)),
        };
        Ok(Self { path, table })
    }

    /// Writes the table durably: on return the file holds it, whatever crashes later.
    pub(super) fn save(&self) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.table)
            .map_err(|e| Error::new(Code::Internal, format!("encoding the metadata: {e}")))?;
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| io(format!("writing {}", self.path.display()), e))
    }

    /// Changes the snapshots with `change` and saves the table; if saving fails, the table
    /// is left as it was, so memory never holds what the file does not.
    pub(super) fn apply(
        &mut self,
        change: impl FnOnce(&mut BTreeMap<String, Record>),
    ) -> Result<()> {
        let before = self.table.snapshots.clone();
        change(&mut self.table.snapshots);
        self.save().inspect_err(|_| self.table.snapshots = before)
    }

    /// The record of `key`, or `NotFound`.
    pub(super) fn get(&self, key: &str) -> Result<&Record> {
        self.table.snapshots.get(key).ok_or_else(|| not_found(key))
    }

    /// Keys whose parent is `key`.
    pub(super) fn children(&self, key: &str) -> Vec<&str> {
        self.table
            .snapshots
            .iter()
            .filter(|(_, r)| r.parent.as_deref() == Some(key))
            .map(|(k, _)| k.as_str())
            .collect()
    }
}

/// `NotFound` for `key`.
fn not_found(key: &str) -> Error {
    Error::new(Code::NotFound, format!("snapshot {key:?} does not exist"))
}

/// An I/O error with context.
pub(super) fn io(context: String, e: std::io::Error) -> Error {
    Error::new(Code::Internal, format!("{context}: {e}"))
}

/// Now, in nanoseconds since the epoch.
pub(super) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn from_ns(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, kind: Kind, parent: Option<&str>) -> Record {
        Record {
            id,
            kind,
            parent: parent.map(str::to_string),
            created_ns: 1_700_000_000_123_456_789,
            updated_ns: 1_700_000_001_000_000_000,
            labels: Labels::from([("containerd.io/snapshot.ref".into(), "sha256:ab".into())]),
            usage: (kind == Kind::Committed).then_some(8192),
        }
    }

    #[test]
    fn the_table_survives_a_round_trip_with_opaque_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetaFile::open(dir.path()).unwrap();
        assert_eq!(m.table.next_id, 1);
        m.table.next_id = 3;
        m.table.snapshots.insert(
            "default/1/sha256:aa bb/ü".into(),
            record(1, Kind::Committed, None),
        );
        m.table.snapshots.insert(
            "default/2/extract-1 sha256:cc".into(),
            record(2, Kind::Active, Some("default/1/sha256:aa bb/ü")),
        );
        m.save().unwrap();
        let again = MetaFile::open(dir.path()).unwrap();
        assert_eq!(again.table.next_id, 3);
        assert_eq!(again.table.snapshots, m.table.snapshots);
        assert_eq!(
            again.children("default/1/sha256:aa bb/ü"),
            ["default/2/extract-1 sha256:cc"]
        );
        let info = again
            .get("default/2/extract-1 sha256:cc")
            .unwrap()
            .info("x");
        assert_eq!(info.created, from_ns(1_700_000_000_123_456_789));
        assert!(!dir.path().join("snapshots.json.tmp").exists());
    }

    #[test]
    fn a_corrupt_or_newer_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), b"{\"version\": 1, \"next_").unwrap();
        let e = MetaFile::open(dir.path()).err().unwrap();
        assert!(e.message.contains("corrupt"), "{e}");
        assert!(e.message.contains("snapshots.json"), "{e}");
        fs::write(
            dir.path().join(FILE),
            br#"{"version": 9, "next_id": 1, "snapshots": {}}"#,
        )
        .unwrap();
        let e = MetaFile::open(dir.path()).err().unwrap();
        assert!(e.message.contains("version 9"), "{e}");
    }

    #[test]
    fn a_failed_save_leaves_the_table_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        let mut m = MetaFile::open(&state).unwrap();
        m.apply(|s| {
            s.insert("kept".into(), record(1, Kind::Committed, None));
        })
        .unwrap();
        fs::remove_dir_all(&state).unwrap();
        let e = m
            .apply(|s| {
                s.remove("kept");
                s.insert("new".into(), record(2, Kind::Active, Some("kept")));
            })
            .unwrap_err();
        assert_eq!(e.code, Code::Internal, "{e}");
        assert_eq!(m.table.snapshots.keys().collect::<Vec<_>>(), ["kept"]);
    }

    #[test]
    fn unknown_keys_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaFile::open(dir.path()).unwrap();
        assert_eq!(m.get("nope").unwrap_err().code, Code::NotFound);
    }
}
