//! The block snapshotter: every containerd snapshot is a layer of the layer store, i.e. a
//! thin pool device holding ext4, and its mount is that device attached by us (a loop
//! device over our FUSE file: direct I/O, 4096-byte blocks), as containerd's devmapper
//! snapshotter does with device-mapper.
//!
//! Owns the mapping from containerd keys to layers (`meta`), the snapshot kinds and the
//! rules containerd relies on: keys are unique; a parent must be committed; a snapshot
//! with children cannot be removed; commit renames an active snapshot and makes it
//! immutable; List is complete (containerd's GC removes what List shows and its database
//! does not know). Devices live in the pool namespace `containerd/`, which the Docker
//! graphdriver never uses.
//!
//! Layout: layer `N` (device `containerd/N`, N from a counter never reused) is a snapshot of
//! its parent's layer, or of the base volume (`containerd/.base-SIZE`, ext4 with an empty
//! root and no `lost+found`). Views and active snapshots are attached when prepared and
//! stay attached until removed (or committed: commit detaches); committed snapshots are
//! attached read-only only if someone asks for their mounts.
//!
//! Crash consistency (pool operations are durable on return; the metadata file is replaced
//! atomically): prepare makes the layer first and records it second; remove forgets it
//! first and removes the layer second; commit changes the record only. A crash in between
//! leaves a layer no record names, which [`BlockSnapshotter::open`] and `cleanup` remove,
//! never a record without its layer.
//!
//! Locking: one mutex over the metadata, held for every check-and-change; a prepare
//! reserves its key there, makes the layer (mkfs of the base volume on first use takes a
//! while) without it, and takes it again to record the result.

mod meta;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use hpm_engine::Pool;
use hpm_layers::{BlockDevices, LayerStore, Layout, StoreOptions};
use parking_lot::Mutex;

use crate::{Code, Error, Info, Kind, Labels, Mount, Result, Snapshotter, Usage};
use meta::{now_ns, MetaFile, Op, Record};

/// The pool device-name prefix of containerd's snapshots.
pub const NAMESPACE: &str = "containerd/";

/// Default size of a snapshot without parent: 10 GiB, as devmapper's `base_image_size`.
pub const DEFAULT_BASE_SIZE: u64 = 10 << 30;

/// Options of [`BlockSnapshotter::open`].
#[derive(Debug, Clone)]
pub struct BlockOptions {
    /// Where the metadata file (`snapshots.json`) and the layer store's mountpoints live;
    /// created (mode 0700) if missing. It belongs with the pool: keep it on the same machine
    /// and back it up with the pool.
    pub state_dir: PathBuf,
    /// Size of the filesystem of a snapshot without parent (a multiple of 4096).
    pub base_size: u64,
    /// New snapshots are refused while less than this percentage of the pool is free
    /// (see [`hpm_layers::StoreOptions::min_free_space`]).
    pub min_free_space: u8,
}

/// The snapshotter; see the module doc.
pub struct BlockSnapshotter {
    store: LayerStore,
    state: Mutex<State>,
}

/// The metadata and the prepares in flight.
struct State {
    file: MetaFile,
    /// Keys being prepared, with their parent and layer id: reserved, not yet recorded.
    pending: BTreeMap<String, (Option<String>, u64)>,
}

impl State {
    /// Whether `key` is taken, recorded or being prepared.
    fn taken(&self, key: &str) -> bool {
        self.file.table.snapshots.contains_key(key) || self.pending.contains_key(key)
    }

    /// Keys, recorded or being prepared, whose parent is `key`.
    fn children(&self, key: &str) -> Vec<String> {
        let mut c: Vec<String> = self
            .file
            .children(key)
            .into_iter()
            .map(str::to_string)
            .collect();
        c.extend(
            self.pending
                .iter()
                .filter(|(_, (p, _))| p.as_deref() == Some(key))
                .map(|(k, _)| k.clone()),
        );
        c
    }
}

impl BlockSnapshotter {
    /// Opens the snapshotter over `pool`: reads the metadata, opens the layer store of
    /// namespace [`NAMESPACE`], and removes layers no record names (a crash between making a
    /// layer and recording it, or between forgetting and removing it).
    pub fn open(pool: Pool, devices: Arc<dyn BlockDevices>, opts: BlockOptions) -> Result<Self> {
        make_private_dir(&opts.state_dir)?;
        let file = MetaFile::open(&opts.state_dir)?;
        let mut so = StoreOptions::new(NAMESPACE, &opts.state_dir);
        so.base_size = opts.base_size;
        so.min_free_space = opts.min_free_space;
        so.layout = Layout::FsRoot;
        let store = LayerStore::open(pool, devices, so).map_err(store_error)?;
        let s = Self {
            store,
            state: Mutex::new(State {
                file,
                pending: BTreeMap::new(),
            }),
        };
        s.reconcile()?;
        Ok(s)
    }

    /// Detaches every block device it handed out (daemon shutdown); data stays.
    pub fn shutdown(&self) -> Result<()> {
        self.store.cleanup().map_err(store_error)
    }

    /// How many snapshots there are, by kind: (views, active, committed).
    pub fn counts(&self) -> (usize, usize, usize) {
        let st = self.state.lock();
        let n = |k| {
            st.file
                .table
                .snapshots
                .values()
                .filter(|r| r.kind == k)
                .count()
        };
        (n(Kind::View), n(Kind::Active), n(Kind::Committed))
    }

    /// Removes layers no record names, drops records whose layer is gone (with a warning:
    /// the pool lost them), and keeps the id counter above every layer id.
    fn reconcile(&self) -> Result<()> {
        let layers = self.store.layers();
        let mut st = self.state.lock();
        let mut changed = false;
        let known: HashSet<String> = st
            .file
            .table
            .snapshots
            .values()
            .map(Record::layer)
            .collect();
        for layer in &layers {
            if known.contains(layer) {
                continue;
            }
            tracing::warn!(layer, "removing a containerd layer no snapshot names (left by a crash or an interrupted call)");
            if let Err(e) = self.store.remove(layer) {
                tracing::warn!(layer, "could not remove it: {e}");
            }
        }
        let present: HashSet<&String> = layers.iter().collect();
        let lost: Vec<String> = st
            .file
            .table
            .snapshots
            .iter()
            .filter(|(_, r)| !present.contains(&r.layer()))
            .map(|(k, _)| k.clone())
            .collect();
        for key in lost {
            tracing::warn!(key, "forgetting a snapshot whose pool device is missing");
            st.file.table.snapshots.remove(&key);
            changed = true;
        }
        let top = layers
            .iter()
            .filter_map(|l| l.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        if st.file.table.next_id <= top {
            st.file.table.next_id = top + 1;
            changed = true;
        }
        if changed {
            st.file.save()?;
        }
        Ok(())
    }

    /// Detaches `layer` (of snapshot `key`) for `what` (commit, remove), with the state
    /// lock free: refused while a client still has it mounted.
    fn unexport(&self, layer: &str, what: &str, key: &str) -> Result<()> {
        self.store.unexport(layer).map_err(|e| {
            Error::new(
                Code::FailedPrecondition,
                format!("cannot {what} {key:?}: {e}; unmount it first"),
            )
        })
    }

    /// With the state lock held again after [`Self::unexport`]: `key` must still be the
    /// snapshot of `layer`, and nobody may have asked for its mounts meanwhile.
    fn still_unexported(&self, r: &Record, layer: &str, what: &str, key: &str) -> Result<()> {
        if r.layer() != layer || self.store.exported(layer).is_some() {
            return Err(Error::new(
                Code::FailedPrecondition,
                format!(
                    "cannot {what} {key:?}: it was changed or mounted again meanwhile; try again"
                ),
            ));
        }
        Ok(())
    }

    /// Prepare and View: a new snapshot `key` of `kind` on `parent`.
    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        check_key(key)?;
        let (id, parent_layer) = {
            let mut st = self.state.lock();
            if st.taken(key) {
                return Err(Error::new(
                    Code::AlreadyExists,
                    format!("snapshot {key:?} already exists"),
                ));
            }
            let parent_layer = match parent {
                None => None,
                Some(p) => {
                    let r = st.file.get(p).map_err(|_| {
                        Error::new(
                            Code::NotFound,
                            format!("parent snapshot {p:?} of {key:?} does not exist"),
                        )
                    })?;
                    if r.kind != Kind::Committed {
                        return Err(Error::new(
                            Code::InvalidArgument,
                            format!(
                                "parent {p:?} of {key:?} is not a committed snapshot (it is {})",
                                r.kind.as_str()
                            ),
                        ));
                    }
                    Some(r.layer())
                }
            };
            let id = st.file.table.next_id;
            st.file.table.next_id += 1;
            st.pending
                .insert(key.to_string(), (parent.map(str::to_string), id));
            (id, parent_layer)
        };
        let layer = id.to_string();
        let made = self
            .store
            .create(&layer, parent_layer.as_deref(), None)
            .map_err(store_error)
            .and_then(|()| {
                self.store
                    .export(&layer, kind != Kind::Active)
                    .map_err(store_error)
            });
        let mut st = self.state.lock();
        st.pending.remove(key);
        let recorded = made.and_then(|block| {
            let now = now_ns();
            let record = Record {
                id,
                kind,
                parent: parent.map(str::to_string),
                created_ns: now,
                updated_ns: now,
                labels,
                usage: None,
            };
            st.file
                .apply(vec![Op::Put {
                    key: key.to_string(),
                    record,
                }])
                .map(|()| block)
        });
        match recorded {
            Ok(block) => {
                tracing::info!(key, parent, layer, kind = kind.as_str(), "snapshot made");
                Ok(vec![mount_of(block, kind)])
            }
            Err(e) => {
                drop(st);
                if let Err(r) = self.store.remove(&layer) {
                    tracing::warn!(layer, "removing the layer of failed {key:?}: {r}");
                }
                Err(e)
            }
        }
    }
}

impl Snapshotter for BlockSnapshotter {
    fn stat(&self, key: &str) -> Result<Info> {
        let st = self.state.lock();
        Ok(st.file.get(key)?.info(key))
    }

    fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info> {
        let mut st = self.state.lock();
        let key = info.name.as_str();
        let mut new = st.file.get(key)?.clone();
        let mut labels = new.labels.clone();
        if fieldpaths.is_empty() {
            labels = info.labels.clone();
        }
        for path in fieldpaths {
            if path == "labels" {
                labels = info.labels.clone();
            } else if let Some(label) = path.strip_prefix("labels.") {
                match info.labels.get(label) {
                    Some(v) => labels.insert(label.to_string(), v.clone()),
                    None => labels.remove(label),
                };
            } else {
                return Err(Error::new(
                    Code::InvalidArgument,
                    format!(
                        "cannot update field {path:?} of snapshot {key:?}: only labels are mutable"
                    ),
                ));
            }
        }
        new.labels = labels;
        new.updated_ns = now_ns();
        let info = new.info(key);
        st.file.apply(vec![Op::Put {
            key: key.to_string(),
            record: new,
        }])?;
        Ok(info)
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        let r = self.state.lock().file.get(key)?.clone();
        let size = match (r.kind, r.usage) {
            (Kind::Committed, Some(u)) => u,
            _ => {
                self.store
                    .info(&r.layer())
                    .map_err(store_error)?
                    .exclusive_bytes
            }
        };
        Ok(Usage {
            size: i64::try_from(size).unwrap_or(i64::MAX),
            inodes: 0,
        })
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let r = self.state.lock().file.get(key)?.clone();
        let layer = r.layer();
        // Without the state lock: an export may wait seconds for a device still held since
        // its last use (see Commit). Checked again after, with the lock: a Commit or Remove
        // that ran meanwhile (and so did not see this export) must not have its layer handed
        // out, a committed one above all, which must never be writable. Never swapping an
        // export's mode keeps a stale call from turning another call's read-only export of
        // the committed layer writable; taking back only a writable export of ours (no
        // other call can make one of a committed layer) never takes back another call's.
        let read_only = r.kind != Kind::Active;
        let block = self
            .store
            .export_same_mode(&layer, read_only)
            .map_err(store_error)?;
        let unchanged = {
            let st = self.state.lock();
            st.file
                .get(key)
                .is_ok_and(|now| now.layer() == layer && now.kind == r.kind)
        };
        if !unchanged {
            if self.store.exported(&layer) == Some((block, false)) {
                if let Err(e) = self.store.unexport(&layer) {
                    tracing::warn!(
                        key,
                        layer,
                        "taking back the export of a changed snapshot: {e}"
                    );
                }
            }
            return Err(Error::new(
                Code::FailedPrecondition,
                format!("snapshot {key:?} was committed, removed or replaced meanwhile; try again"),
            ));
        }
        Ok(vec![mount_of(block, r.kind)])
    }

    fn prepare(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    fn view(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        check_key(name)?;
        let check = |st: &State| -> Result<Record> {
            let r = st.file.get(key)?.clone();
            if r.kind != Kind::Active {
                return Err(Error::new(
                    Code::FailedPrecondition,
                    format!(
                        "snapshot {key:?} is {}, only an active snapshot can be committed",
                        r.kind.as_str()
                    ),
                ));
            }
            if st.taken(name) {
                return Err(Error::new(
                    Code::AlreadyExists,
                    format!("snapshot {name:?} already exists"),
                ));
            }
            Ok(r)
        };
        let layer = check(&self.state.lock())?.layer();
        // Detach first: a committed snapshot must not change, so it must not stay writable.
        // Without the state lock: the detach may wait seconds for a client's unmount.
        self.unexport(&layer, "commit", key)?;
        let mut st = self.state.lock();
        let r = check(&st)?;
        self.still_unexported(&r, &layer, "commit", key)?;
        let usage = self
            .store
            .info(&layer)
            .map_err(store_error)?
            .exclusive_bytes;
        let now = now_ns();
        let committed = Record {
            kind: Kind::Committed,
            created_ns: now,
            updated_ns: now,
            labels,
            usage: Some(usage),
            ..r
        };
        st.file.apply(vec![
            Op::Del {
                key: key.to_string(),
            },
            Op::Put {
                key: name.to_string(),
                record: committed,
            },
        ])?;
        tracing::info!(key, name, layer, usage, "snapshot committed");
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<()> {
        let check = |st: &State| -> Result<Record> {
            let r = st.file.get(key)?.clone();
            let children = st.children(key);
            if !children.is_empty() {
                return Err(Error::new(
                    Code::FailedPrecondition,
                    format!(
                        "snapshot {key:?} has {} children (e.g. {:?}); remove them first",
                        children.len(),
                        children[0]
                    ),
                ));
            }
            Ok(r)
        };
        let layer = check(&self.state.lock())?.layer();
        self.unexport(&layer, "remove", key)?;
        let mut st = self.state.lock();
        let r = check(&st)?;
        self.still_unexported(&r, &layer, "remove", key)?;
        st.file.apply(vec![Op::Del {
            key: key.to_string(),
        }])?;
        drop(st);
        // Forgotten durably: a failure here leaves a layer that `cleanup` removes.
        if let Err(e) = self.store.remove(&layer) {
            tracing::warn!(key, layer, "removing the layer: {e}; cleanup retries");
        }
        tracing::info!(key, layer, "snapshot removed");
        Ok(())
    }

    fn list(&self) -> Result<Vec<Info>> {
        let st = self.state.lock();
        Ok(st
            .file
            .table
            .snapshots
            .iter()
            .map(|(k, r)| r.info(k))
            .collect())
    }

    fn cleanup(&self) -> Result<()> {
        // The layers a record names or a prepare in flight has (a layer, no record yet), and
        // the first id not handed out: a prepare starting later gets an id at or above it.
        let (named, next_id) = {
            let st = self.state.lock();
            let named: HashSet<u64> = st
                .file
                .table
                .snapshots
                .values()
                .map(|r| r.id)
                .chain(st.pending.values().map(|(_, id)| *id))
                .collect();
            (named, st.file.table.next_id)
        };
        let mut removed = 0;
        for layer in self.store.layers() {
            let id = layer.parse::<u64>().ok();
            if id.is_none_or(|id| id >= next_id || named.contains(&id)) {
                continue;
            }
            match self.store.remove(&layer) {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!(layer, "cleanup could not remove it: {e}"),
            }
        }
        // Held across the removal, so no prepare can start cloning a base volume meanwhile.
        let st = self.state.lock();
        if st.file.table.snapshots.is_empty() && st.pending.is_empty() {
            removed += self.store.remove_base_volumes().map_err(store_error)?;
        }
        drop(st);
        tracing::info!(removed, "cleanup");
        Ok(())
    }
}

/// The mount of a snapshot of `kind` whose device is `block`.
fn mount_of(block: PathBuf, kind: Kind) -> Mount {
    Mount {
        fs_type: "ext4".into(),
        source: block.display().to_string(),
        // "rw" rather than no option: `ctr snapshots mounts` prints `-o` with nothing else.
        options: vec![if kind == Kind::Active { "rw" } else { "ro" }.into()],
    }
}

/// Keys and names: any non-empty string (they are opaque; never used as file names).
fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::new(Code::InvalidArgument, "empty snapshot key"));
    }
    Ok(())
}

/// `dir`, created with mode 0700 if missing.
fn make_private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(meta::io(format!("creating {}", dir.display()), e)),
    }
}

/// A layer store error as a snapshotter error.
fn store_error(e: hpm_layers::Error) -> Error {
    use hpm_layers::ErrorKind as K;
    let code = match e.kind() {
        K::NotFound => Code::NotFound,
        K::Exists => Code::AlreadyExists,
        K::Busy | K::ReadOnly => Code::FailedPrecondition,
        K::NoSpace => Code::ResourceExhausted,
        K::Invalid | K::Escape => Code::InvalidArgument,
        K::Unsupported => Code::Unimplemented,
        _ => Code::Internal,
    };
    Error::new(code, e.to_string())
}
