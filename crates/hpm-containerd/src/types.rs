//! What a snapshotter is, in our own types: the [`Snapshotter`] trait the gRPC service calls,
//! and the values it passes. Owns nothing of the wire (see `service`) and nothing of storage
//! (see `block`).
//!
//! Keys and names are opaque strings (containerd's metadata layer sends
//! `<namespace>/<seq>/<client key>`, with slashes and spaces): implementations must never
//! use them as file names.

use std::collections::BTreeMap;
use std::time::SystemTime;

/// Labels of a snapshot.
pub type Labels = BTreeMap<String, String>;

/// The kind of a snapshot (containerd's `snapshots.Kind`, never `UNKNOWN` here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A read-only snapshot of a committed parent, never committed itself.
    View,
    /// A writable snapshot that may be committed.
    Active,
    /// A committed, immutable snapshot: a parent of others.
    Committed,
}

impl Kind {
    /// The lowercase name containerd's filters and `ctr` use: `view`, `active`, `committed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// What containerd knows of a snapshot (`snapshots.v1.Info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The key (active, view) or name (committed).
    pub name: String,
    /// The committed parent's name; `None` for a snapshot without parent.
    pub parent: Option<String>,
    /// The kind.
    pub kind: Kind,
    /// When it was made (immutable).
    pub created: SystemTime,
    /// When it was last changed (prepared, committed, labels updated).
    pub updated: SystemTime,
    /// Labels (mutable through `update`).
    pub labels: Labels,
}

/// Space a snapshot uses (`snapshots.v1.UsageResponse`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes the snapshot owns (not shared with its parent).
    pub size: i64,
    /// Inodes it uses; 0 when not known.
    pub inodes: i64,
}

/// A mount to perform to see a snapshot (`containerd.types.Mount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type, e.g. `ext4` (the proto's `type`).
    pub fs_type: String,
    /// What to mount, e.g. `/dev/loop3`.
    pub source: String,
    /// Mount options, e.g. `ro`.
    pub options: Vec<String>,
}

/// gRPC status codes a snapshotter answers with; containerd turns them into its errdefs
/// (NotFound drives unpacking, AlreadyExists means "the layer is there").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// No such key (`NOT_FOUND`).
    NotFound,
    /// The key exists already (`ALREADY_EXISTS`).
    AlreadyExists,
    /// Not in a state that allows it, e.g. removing a parent (`FAILED_PRECONDITION`).
    FailedPrecondition,
    /// Bad arguments (`INVALID_ARGUMENT`).
    InvalidArgument,
    /// Not supported by this snapshotter (`UNIMPLEMENTED`).
    Unimplemented,
    /// The pool is full (`RESOURCE_EXHAUSTED`).
    ResourceExhausted,
    /// Shutting down or not ready (`UNAVAILABLE`).
    Unavailable,
    /// Anything else: I/O errors, bugs (`INTERNAL`).
    Internal,
}

/// An error of a snapshotter call: a code and one clear line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// What containerd is told.
    pub code: Code,
    /// Why, for humans (containerd logs it).
    pub message: String,
}

impl Error {
    /// An error with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Result of snapshotter calls.
pub type Result<T> = std::result::Result<T, Error>;

/// A containerd snapshotter. Calls are blocking (mkfs, attach, metadata fsync); the service
/// runs each on tokio's blocking pool, never on an async thread. Calls may come in parallel.
pub trait Snapshotter: Send + Sync + 'static {
    /// Info of `key`; `NotFound` when there is none.
    fn stat(&self, key: &str) -> Result<Info>;
    /// Updates the mutable fields of `info.name` (labels; `updated` is set by the
    /// snapshotter). `fieldpaths` empty: replace all labels with `info.labels`; else each
    /// path is `labels` (replace all) or `labels.<key>` (set that key to its value in
    /// `info.labels`, or delete it when absent there); any other path is `InvalidArgument`.
    /// Returns the info after the update.
    fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info>;
    /// Space used by `key`.
    fn usage(&self, key: &str) -> Result<Usage>;
    /// The mounts of `key` (active: writable; view and committed: `ro`).
    fn mounts(&self, key: &str) -> Result<Vec<Mount>>;
    /// A new active snapshot `key` on committed `parent` (none: empty filesystem).
    fn prepare(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>>;
    /// A new view `key` of committed `parent` (none: empty filesystem).
    fn view(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>>;
    /// Commits active snapshot `key` as `name` (`key` is gone afterwards).
    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()>;
    /// Removes `key`; `FailedPrecondition` while it has children.
    fn remove(&self, key: &str) -> Result<()>;
    /// Every snapshot (the service applies containerd's filters on the result).
    fn list(&self) -> Result<Vec<Info>>;
    /// Releases resources nothing refers to any more (containerd calls it after its GC).
    fn cleanup(&self) -> Result<()>;
}
