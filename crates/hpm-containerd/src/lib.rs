//! hpmapper's containerd snapshotter: containerd's `snapshots.v1` gRPC service over a unix
//! socket (a containerd "proxy plugin"), in front of any store that implements
//! [`Snapshotter`]. The wire side (this crate's `service`, `wire`, `filters` and the
//! generated [`api`]) never knows how snapshots are stored, and never runs a snapshotter
//! call on an async thread (every call goes to tokio's blocking pool).
//!
//! Wire summary (containerd 1.6 `api/services/snapshots/v1/snapshots.proto`, driven by its
//! `snapshots/proxy` client):
//! - service `containerd.services.snapshots.v1.Snapshots`, HTTP/2 gRPC over the unix socket
//!   registered as `[proxy_plugins.<name>] type = "snapshot" address = "<socket>"`; the
//!   requests' `snapshotter` field (the plugin name) is ignored;
//! - Prepare, View, Mounts answer `containerd.types.Mount`s (`type`, `source`, `options`;
//!   `target` empty); Commit, Remove, Cleanup answer `google.protobuf.Empty`; Stat and
//!   Update answer an `Info` (kind VIEW=1, ACTIVE=2, COMMITTED=3, times as `Timestamp`);
//!   Usage answers `size` and `inodes`;
//! - List is server streaming: the snapshots that pass the request's filters (containerd's
//!   filter syntax, see `filters`), in messages of at most 100 infos, none when empty;
//! - an empty `parent` means none; an empty key or name, or a label whose key and value
//!   exceed 4096 bytes together, is `INVALID_ARGUMENT`;
//! - Update passes the mask's paths (`labels`, `labels.<key>`; none: all mutable fields) and
//!   the info's name and labels; kind, parent and times in the request are ignored;
//! - errors carry the snapshotter's [`Code`] as the gRPC code (NOT_FOUND, ALREADY_EXISTS,
//!   FAILED_PRECONDITION, INVALID_ARGUMENT, UNIMPLEMENTED, RESOURCE_EXHAUSTED, UNAVAILABLE,
//!   INTERNAL) and its message, which containerd turns back into its errdefs.
//!
//! Wiring, for the daemon: bind before containerd starts (it dials the plugin when it first
//! needs it, and a missing socket fails pulls), serve on a multi-threaded runtime, flip the
//! watch channel at shutdown, and remove the socket file afterwards.
//!
//! ```no_run
//! # async fn run(store: std::sync::Arc<dyn hpm_containerd::Snapshotter>) -> std::io::Result<()> {
//! let socket = std::path::Path::new("/run/hpmapper/containerd.sock");
//! let listener = hpm_containerd::bind(socket)?;
//! let (stop, stopped) = tokio::sync::watch::channel(false);
//! let serving = tokio::spawn(hpm_containerd::serve(listener, store, stopped));
//! // ... on SIGTERM:
//! let _ = stop.send(true);
//! serving.await??;
//! std::fs::remove_file(socket)?;
//! # Ok(()) }
//! ```
//!
//! Modules: `types` (the [`Snapshotter`] trait and its values, in our own types), `block`
//! ([`block::BlockSnapshotter`], snapshots as thin devices of the pool), [`api`] (generated
//! from our copies of containerd's protos), `wire` (checks, conversions, the one
//! error-to-status mapping), `filters` (List filters), `service` (socket, server, RPCs).

#![forbid(unsafe_code)]

pub mod api;
pub mod block;
mod filters;
mod service;
mod types;
mod wire;

pub use service::{bind, serve};
pub use types::{Code, Error, Info, Kind, Labels, Mount, Result, Snapshotter, Usage};
