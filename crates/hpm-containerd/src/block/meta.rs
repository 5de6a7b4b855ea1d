//! The snapshotter's own metadata: which containerd key is which layer, its kind, parent,
//! labels and times. A checkpoint, `snapshots.json` in the state directory, replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory), and a log,
//! `snapshots.log`, with one checksummed line per change appended and fdatasynced; the log
//! is folded into a new checkpoint once it outgrows it, so a change costs one small append
//! whatever the number of snapshots. The format is normative in docs/design.md ("containerd
//! snapshot metadata").
//!
//! Owns the files and the in-memory table. Must never hold anything the pool owns (sizes,
//! usage of active snapshots): those are read from the layer store. Never interprets keys:
//! they are opaque strings, used only as map keys in the files.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Code, Error, Info, Kind, Labels, Result};

/// The checkpoint's name in the state directory.
pub(super) const FILE: &str = "snapshots.json";
/// The log's name in the state directory.
pub(super) const LOG: &str = "snapshots.log";
/// The checkpoint version this code writes; it reads this one and 1 (no log, no `seq`).
const VERSION: u32 = 2;
/// The log is folded into a new checkpoint once it is longer than this and than the
/// checkpoint itself.
const MIN_LOG_BYTES: u64 = 64 << 10;

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

/// One change of the table, as the log records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Op {
    /// Sets the record of `key`.
    Put { key: String, record: Record },
    /// Forgets `key`.
    Del { key: String },
}

/// One line of the log: the changes of one operation, all or none.
#[derive(Debug, Serialize, Deserialize)]
struct LogLine {
    /// One more than the line before (or the checkpoint's `seq`).
    seq: u64,
    /// The table's `next_id` after the change.
    next_id: u64,
    ops: Vec<Op>,
}

/// The checkpoint's content.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(super) struct Table {
    version: u32,
    /// The `seq` of the last log line folded in (0: none).
    #[serde(default)]
    seq: u64,
    /// The next layer id to hand out; ids are never reused.
    pub(super) next_id: u64,
    /// Snapshots by key (or name, once committed).
    pub(super) snapshots: BTreeMap<String, Record>,
}

impl Table {
    fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Put { key, record } => {
                    self.snapshots.insert(key.clone(), record.clone());
                }
                Op::Del { key } => {
                    self.snapshots.remove(key);
                }
            }
        }
    }
}

/// The table and where it lives.
pub(super) struct MetaFile {
    path: PathBuf,
    log_path: PathBuf,
    /// The log, open for appending.
    log: File,
    /// Bytes of the log that hold whole lines (a failed append is cut back to this).
    log_len: u64,
    /// Bytes of the last checkpoint written or read.
    checkpoint_len: u64,
    /// Set when a failed append could not be cut back: the next change is written as a
    /// checkpoint, which empties the log.
    log_damaged: bool,
    pub(super) table: Table,
}

impl MetaFile {
    /// Reads `dir/snapshots.json` and replays `dir/snapshots.log` over it; an absent
    /// checkpoint is an empty table. A torn last log line (a crash during its append) is cut
    /// off; anything else that does not parse is an error naming the file: nothing is
    /// guessed or overwritten.
    pub(super) fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        let log_path = dir.join(LOG);
        let (mut table, checkpoint_len) = match fs::read(&path) {
            Ok(bytes) => (parse_checkpoint(&path, &bytes)?, bytes.len() as u64),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                Table {
                    version: VERSION,
                    seq: 0,
                    next_id: 1,
                    snapshots: BTreeMap::new(),
                },
                0,
            ),
            Err(e) => return Err(io(format!("reading {}", path.display()), e)),
        };
        let log_len = replay(&log_path, &mut table)?;
        if table.version == 1 && log_len > 0 {
            // Version 1 never had a log: this checkpoint is older than the log (restored
            // from a copy, or written by an older hpmapper after this one), and replaying
            // the log over it would bring back what it no longer holds.
            return Err(Error::new(
                Code::Internal,
                format!(
                    "the snapshot metadata {} is version 1 but {} holds changes: the two do not belong together; restore both from one copy, or move both away to start with no containerd snapshots",
                    path.display(),
                    log_path.display()
                ),
            ));
        }
        let created = !log_path.exists();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| io(format!("opening {}", log_path.display()), e))?;
        if created {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io(format!("creating {}", log_path.display()), e))?;
        }
        // Whatever followed the last whole line was a torn append: cut it off for good.
        if log.metadata().map(|m| m.len()).unwrap_or(0) != log_len {
            log.set_len(log_len)
                .and_then(|()| log.sync_all())
                .map_err(|e| io(format!("cutting the torn end of {}", log_path.display()), e))?;
        }
        let upgrade = checkpoint_len == 0 || table.version != VERSION;
        table.version = VERSION;
        let mut m = Self {
            path,
            log_path,
            log,
            log_len,
            checkpoint_len,
            log_damaged: false,
            table,
        };
        // A version 2 checkpoint before any change goes to the log: an older hpmapper then
        // refuses the files rather than read an empty or stale table and miss the log.
        if upgrade {
            m.save()?;
        }
        Ok(m)
    }

    /// Writes the whole table as a new checkpoint, durably, then empties the log: on return
    /// the files hold the table, whatever crashes later.
    pub(super) fn save(&mut self) -> Result<()> {
        let table = self.table.clone();
        self.write_checkpoint(&table)
    }

    /// Replaces the checkpoint with `table` and empties the log. Until all of it has
    /// succeeded the log counts as damaged: a failure after the rename leaves a checkpoint
    /// whose `seq` memory has not reached, so the next change must be a checkpoint too
    /// (appending it would reuse that `seq`, and the next open would skip it).
    fn write_checkpoint(&mut self, table: &Table) -> Result<()> {
        self.log_damaged = true;
        self.checkpoint_len = self.write_table(table)?;
        // The checkpoint holds every line (its `seq` says so): a crash before the log is
        // emptied only leaves lines that the next open skips.
        if self.log_len > 0 {
            self.log
                .set_len(0)
                .and_then(|()| self.log.sync_all())
                .map_err(|e| io(format!("emptying {}", self.log_path.display()), e))?;
            self.log_len = 0;
        }
        self.log_damaged = false;
        Ok(())
    }

    /// Writes `table` as the checkpoint, durably (temporary file, fsync, rename, directory
    /// fsync); returns its length.
    fn write_table(&self, table: &Table) -> Result<u64> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(table)
            .map_err(|e| Error::new(Code::Internal, format!("encoding the metadata: {e}")))?;
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            File::open(dir)?.sync_all()
        };
        write().map_err(|e| io(format!("writing {}", self.path.display()), e))?;
        Ok(bytes.len() as u64)
    }

    /// Makes `ops` (the changes of one operation) durable and then applies them to the
    /// table; if that fails, the table is left as it was, so memory never holds what the
    /// files do not.
    pub(super) fn apply(&mut self, ops: Vec<Op>) -> Result<()> {
        let line = LogLine {
            seq: self.table.seq + 1,
            next_id: self.table.next_id,
            ops,
        };
        let json = serde_json::to_string(&line)
            .map_err(|e| Error::new(Code::Internal, format!("encoding a change: {e}")))?;
        let text = format!("{:08x} {json}\n", crc32c::crc32c(json.as_bytes()));
        if self.log_damaged
            || self.log_len + text.len() as u64 > MIN_LOG_BYTES.max(self.checkpoint_len)
        {
            let mut next = self.table.clone();
            next.apply(&line.ops);
            next.seq = line.seq;
            self.write_checkpoint(&next)?;
            self.table = next;
            return Ok(());
        }
        let appended = self
            .log
            .write_all(text.as_bytes())
            .and_then(|()| self.log.sync_data());
        if let Err(e) = appended {
            // Cut the partial line off, so the next append starts on a line of its own.
            if self.log.set_len(self.log_len).is_err() {
                self.log_damaged = true;
            }
            return Err(io(format!("appending to {}", self.log_path.display()), e));
        }
        self.log_len += text.len() as u64;
        self.table.apply(&line.ops);
        self.table.seq = line.seq;
        Ok(())
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

/// The checkpoint in `bytes`, read from `path`: version 1 or 2.
fn parse_checkpoint(path: &Path, bytes: &[u8]) -> Result<Table> {
    let t: Table = serde_json::from_slice(bytes).map_err(|e| {
        Error::new(
            Code::Internal,
            format!(
                "the snapshot metadata {} is corrupt ({e}); move it and {LOG} away to start with no containerd snapshots",
                path.display()
            ),
        )
    })?;
    if t.version != VERSION && t.version != 1 {
        return Err(Error::new(
            Code::Internal,
            format!(
                "the snapshot metadata {} has format version {}, this hpmapper reads versions 1 and {VERSION}",
                path.display(),
                t.version
            ),
        ));
    }
    Ok(t)
}

/// Applies the lines of the log at `path` that follow `table`'s `seq`; returns the length of
/// the whole lines. A last line that is cut short or does not check out is a torn append and
/// ends the log; a bad line with lines after it, or a gap in `seq`, is corruption.
fn replay(path: &Path, table: &mut Table) -> Result<u64> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(format!("reading {}", path.display()), e)),
    };
    let corrupt = |n: usize, what: &str| {
        Error::new(
            Code::Internal,
            format!(
                "the snapshot metadata log {} is corrupt at line {n}: {what}; move it and {FILE} away to start with no containerd snapshots",
                path.display()
            ),
        )
    };
    let mut good = 0usize;
    let mut rest = &bytes[..];
    let mut n = 0;
    while !rest.is_empty() {
        n += 1;
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            break; // torn: no end of line
        };
        let parsed = parse_line(&rest[..end]);
        let after = &rest[end + 1..];
        let line = match parsed {
            Some(line) => line,
            None if after.is_empty() => break, // torn: the last line does not check out
            None => return Err(corrupt(n, "its checksum or content is wrong")),
        };
        if line.seq > table.seq {
            if line.seq != table.seq + 1 {
                return Err(corrupt(
                    n,
                    &format!("change {} follows change {}", line.seq, table.seq),
                ));
            }
            table.apply(&line.ops);
            table.seq = line.seq;
            table.next_id = table.next_id.max(line.next_id);
        }
        good += end + 1;
        rest = after;
    }
    Ok(good as u64)
}

/// A log line without its newline: 8 hex digits of the CRC-32C of the JSON, a space, the
/// JSON. `None` unless all of it checks out.
fn parse_line(raw: &[u8]) -> Option<LogLine> {
    let text = std::str::from_utf8(raw).ok()?;
    let (crc, json) = text.split_once(' ')?;
    if crc.len() != 8 || u32::from_str_radix(crc, 16).ok()? != crc32c::crc32c(json.as_bytes()) {
        return None;
    }
    serde_json::from_str(json).ok()
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

    fn put(key: &str, r: Record) -> Op {
        Op::Put {
            key: key.to_string(),
            record: r,
        }
    }

    fn del(key: &str) -> Op {
        Op::Del {
            key: key.to_string(),
        }
    }

    fn log_len(dir: &Path) -> u64 {
        fs::metadata(dir.join(LOG)).map_or(0, |m| m.len())
    }

    #[test]
    fn the_table_survives_a_round_trip_with_opaque_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetaFile::open(dir.path()).unwrap();
        assert_eq!(m.table.next_id, 1);
        m.table.next_id = 3;
        let (k1, k2) = ("default/1/sha256:aa bb/ü", "default/2/extract-1 sha256:cc");
        m.apply(vec![put(k1, record(1, Kind::Committed, None))])
            .unwrap();
        m.apply(vec![put(k2, record(2, Kind::Active, Some(k1)))])
            .unwrap();
        // Changes go to the log, not to a rewritten checkpoint (the one written at open,
        // empty, stays).
        let empty = fs::read(dir.path().join(FILE)).unwrap();
        assert!(String::from_utf8_lossy(&empty).contains("\"version\": 2"));
        m.apply(vec![del("none")]).unwrap();
        assert_eq!(fs::read(dir.path().join(FILE)).unwrap(), empty);
        assert!(log_len(dir.path()) > 0);
        let again = MetaFile::open(dir.path()).unwrap();
        assert_eq!(again.table.next_id, 3);
        assert_eq!(again.table.snapshots, m.table.snapshots);
        assert_eq!(again.children(k1), [k2]);
        let info = again.get(k2).unwrap().info("x");
        assert_eq!(info.created, from_ns(1_700_000_000_123_456_789));
        // A checkpoint holds all of it and empties the log.
        m.save().unwrap();
        assert_eq!(log_len(dir.path()), 0);
        let again = MetaFile::open(dir.path()).unwrap();
        assert_eq!(again.table.snapshots, m.table.snapshots);
        assert!(!dir.path().join("snapshots.json.tmp").exists());
    }

    #[test]
    fn a_commit_is_one_change_and_a_long_log_is_folded_into_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetaFile::open(dir.path()).unwrap();
        m.apply(vec![put("a", record(1, Kind::Active, None))])
            .unwrap();
        m.apply(vec![del("a"), put("c", record(1, Kind::Committed, None))])
            .unwrap();
        let again = MetaFile::open(dir.path()).unwrap();
        assert_eq!(again.table.snapshots.keys().collect::<Vec<_>>(), ["c"]);
        // Many changes: the log never grows much past the larger of its floor and the
        // checkpoint, and what the files hold is the table.
        for i in 2..2000u64 {
            m.table.next_id = i + 1;
            m.apply(vec![put(
                &format!("k{i}"),
                record(i, Kind::Committed, None),
            )])
            .unwrap();
            if i % 3 == 0 {
                m.apply(vec![del(&format!("k{}", i - 1))]).unwrap();
            }
        }
        assert!(dir.path().join(FILE).exists());
        let checkpoint = fs::metadata(dir.path().join(FILE)).unwrap().len();
        assert!(log_len(dir.path()) <= MIN_LOG_BYTES.max(checkpoint));
        let again = MetaFile::open(dir.path()).unwrap();
        assert_eq!(again.table.snapshots, m.table.snapshots);
        assert_eq!(again.table.next_id, 2000);
        assert_eq!(again.table.seq, m.table.seq);
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_a_bad_line_before_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetaFile::open(dir.path()).unwrap();
        m.apply(vec![put("a", record(1, Kind::Committed, None))])
            .unwrap();
        m.apply(vec![put("b", record(2, Kind::Committed, None))])
            .unwrap();
        let log = dir.path().join(LOG);
        let whole = fs::read(&log).unwrap();
        drop(m);
        // A crash half way through the second append: the first change stays.
        for cut in [whole.len() - 1, whole.len() - 20] {
            fs::write(&log, &whole[..cut]).unwrap();
            let m = MetaFile::open(dir.path()).unwrap();
            assert_eq!(m.table.snapshots.keys().collect::<Vec<_>>(), ["a"]);
            // The torn end is gone, and the next change follows the first.
            drop(m);
            let first = whole.iter().position(|&b| b == b'\n').unwrap() + 1;
            assert_eq!(log_len(dir.path()), first as u64);
        }
        // A whole last line whose checksum fails is torn too.
        let mut bad = whole.clone();
        let n = bad.len();
        bad[n - 3] ^= 1;
        fs::write(&log, &bad).unwrap();
        let mut m = MetaFile::open(dir.path()).unwrap();
        assert_eq!(m.table.snapshots.keys().collect::<Vec<_>>(), ["a"]);
        m.apply(vec![put("c", record(3, Kind::Committed, None))])
            .unwrap();
        drop(m);
        let m = MetaFile::open(dir.path()).unwrap();
        assert_eq!(m.table.snapshots.keys().collect::<Vec<_>>(), ["a", "c"]);
        drop(m);
        // But a damaged line with a good one after it is corruption: refused, named.
        let mut bad = fs::read(&log).unwrap();
        bad[12] ^= 1;
        fs::write(&log, &bad).unwrap();
        let e = MetaFile::open(dir.path()).err().unwrap();
        assert!(
            e.message.contains("snapshots.log") && e.message.contains("line 1"),
            "{e}"
        );
        // So is a gap in the changes.
        let lines: Vec<&[u8]> = whole.split_inclusive(|&b| b == b'\n').collect();
        fs::write(&log, lines[1]).unwrap();
        let e = MetaFile::open(dir.path()).err().unwrap();
        assert!(e.message.contains("change 2 follows change 0"), "{e}");
    }

    #[test]
    fn lines_already_in_the_checkpoint_are_skipped() {
        // A crash after a checkpoint was renamed in but before the log was emptied.
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetaFile::open(dir.path()).unwrap();
        m.apply(vec![put("a", record(1, Kind::Committed, None))])
            .unwrap();
        m.apply(vec![del("a"), put("b", record(2, Kind::Committed, None))])
            .unwrap();
        let old_log = fs::read(dir.path().join(LOG)).unwrap();
        m.save().unwrap();
        m.apply(vec![put("c", record(3, Kind::Committed, None))])
            .unwrap();
        let new_line = fs::read(dir.path().join(LOG)).unwrap();
        drop(m);
        fs::write(dir.path().join(LOG), [old_log, new_line].concat()).unwrap();
        let m = MetaFile::open(dir.path()).unwrap();
        assert_eq!(m.table.snapshots.keys().collect::<Vec<_>>(), ["b", "c"]);
    }

    #[test]
    fn a_version_1_file_is_read_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = serde_json::json!({
            "version": 1,
            "next_id": 5,
            "snapshots": {"x": record(4, Kind::Committed, None)},
        });
        fs::write(dir.path().join(FILE), v1.to_string()).unwrap();
        let mut m = MetaFile::open(dir.path()).unwrap();
        assert_eq!(m.table.next_id, 5);
        assert_eq!(m.get("x").unwrap().id, 4);
        // Rewritten as version 2 at once, before any change is logged: an older hpmapper
        // refuses it rather than miss the log.
        let now: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(FILE)).unwrap()).unwrap();
        assert_eq!(now["version"], 2);
        m.apply(vec![del("x")]).unwrap();
        drop(m);
        let m = MetaFile::open(dir.path()).unwrap();
        assert!(m.table.snapshots.is_empty());
        drop(m);
        // A version 1 checkpoint beside a log with changes (a restored copy): refused.
        fs::write(dir.path().join(FILE), v1.to_string()).unwrap();
        let e = MetaFile::open(dir.path()).err().unwrap();
        assert!(e.message.contains("version 1 but"), "{e}");
        fs::write(
            dir.path().join(FILE),
            br#"{"version": 9, "next_id": 1, "snapshots": {}}"#,
        )
        .unwrap();
        let e = MetaFile::open(dir.path()).err().unwrap();
        assert!(e.message.contains("version 9"), "{e}");
    }

    #[test]
    fn a_corrupt_checkpoint_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), b"{\"version\": 1, \"next_").unwrap();
        let e = MetaFile::open(dir.path()).err().unwrap();
        assert!(e.message.contains("corrupt"), "{e}");
        assert!(e.message.contains("snapshots.json"), "{e}");
    }

    #[test]
    fn a_failed_change_leaves_the_table_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        let mut m = MetaFile::open(&state).unwrap();
        m.apply(vec![put("kept", record(1, Kind::Committed, None))])
            .unwrap();
        // The checkpoint path fails (no directory): so does a change that must write one.
        fs::remove_dir_all(&state).unwrap();
        let e = m.save().unwrap_err();
        assert_eq!(e.code, Code::Internal, "{e}");
        m.log_damaged = true;
        let e = m
            .apply(vec![
                del("kept"),
                put("new", record(2, Kind::Active, Some("kept"))),
            ])
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
/// The cost of one change against the number of snapshots, for `scripts/bench/containerd-meta`
/// (ignored in normal runs: it times, it does not test). Prints one TSV row per table size:
/// snapshots, microseconds per logged change, microseconds per whole-table rewrite (what
/// every change cost before the log).
#[cfg(test)]
mod bench {
    use super::*;

    #[test]
    #[ignore]
    fn bench_change_cost() {
        let dir = std::env::var("HPM_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
        let rec = |i: u64| Record {
            id: i,
            kind: Kind::Committed,
            parent: Some(format!("default/{i}/sha256:{}", "a".repeat(64))),
            created_ns: 1_700_000_000_000_000_000,
            updated_ns: 1_700_000_000_000_000_000,
            labels: Labels::from([
                (
                    "containerd.io/snapshot.ref".into(),
                    format!("sha256:{}", "b".repeat(64)),
                ),
                (
                    "containerd.io/snapshot/cri.layer-digest".into(),
                    format!("sha256:{}", "c".repeat(64)),
                ),
            ]),
            usage: Some(1 << 20),
        };
        for n in [10u64, 100, 1000, 5000] {
            let dir = tempfile::tempdir_in(&dir).unwrap();
            let mut m = MetaFile::open(dir.path()).unwrap();
            for i in 0..n {
                let key = format!("default/{i}/sha256:{}", "d".repeat(64));
                m.table.snapshots.insert(key, rec(i));
            }
            m.save().unwrap();
            let changes = 400;
            let t = std::time::Instant::now();
            for i in 0..changes {
                let key = format!("new/{i}");
                m.apply(vec![Op::Put {
                    key,
                    record: rec(i),
                }])
                .unwrap();
            }
            let logged = t.elapsed().as_secs_f64() * 1e6 / changes as f64;
            let rewrites = 40;
            let t = std::time::Instant::now();
            for _ in 0..rewrites {
                m.write_table(&m.table).unwrap();
            }
            let whole = t.elapsed().as_secs_f64() * 1e6 / rewrites as f64;
            println!("BENCH\t{n}\t{logged:.0}\t{whole:.0}");
        }
    }
}
