//! hpmapper's Docker graphdriver plugin: the legacy (v1) plugin protocol, HTTP/1.1 over a
//! unix socket, in front of any layer store that implements [`GraphDriver`]. This crate owns
//! the wire (endpoints, exact JSON field names, the streamed ApplyDiff and Diff bodies,
//! error replies); it must never know how layers are stored, and it never runs a driver
//! call on an async thread (every call goes to tokio's blocking pool).
//!
//! Wire summary (moby `daemon/graphdriver/proxy.go`, dockerd 20.10 to 26):
//! - every call is `POST /<Method>`; `/Plugin.Activate` answers
//!   `{"Implements":["GraphDriver"]}`;
//! - JSON requests carry `ID`, `Parent`, `MountLabel`, `StorageOpt` (all optional); Init
//!   carries `Home`, `Opts`, `UIDMaps`, `GIDMaps` (maps must be null or empty: user
//!   namespace remapping is refused);
//! - JSON replies carry `Err` (absent on success) and the endpoint's `Dir`, `Exists`,
//!   `Status`, `Changes`, `Size`, `Metadata` or `Capabilities`
//!   (`{"ReproducesExactDiffs": false}`), with content type
//!   `application/vnd.docker.plugins.v1+json`;
//! - a logical error is HTTP 200 with `{"Err": "..."}`; an unknown endpoint is 404 and a
//!   Diff failing before its first byte is 500, both with `{"Err"}` too;
//! - ApplyDiff's body is the raw layer tar (chunked, any length) with the ids in the query
//!   string `?id=<id>&parent=<parent>`; it streams into the driver through a bounded
//!   channel, and the reply `{"Size": n}` goes out after the whole body;
//! - Diff's reply body is the raw tar the driver writes, streamed through a bounded channel;
//!   a failure mid-stream cuts the connection so dockerd never takes a short tar for a
//!   whole one.
//!
//! Wiring, for the daemon: bind before dockerd starts (dockerd looks the plugin up once, at
//! its start, and then needs `--experimental -s hpmapper`), serve on a multi-threaded
//! runtime, flip the watch channel at shutdown, and remove the socket file afterwards.
//!
//! ```no_run
//! # async fn run(store: std::sync::Arc<dyn hpm_docker::GraphDriver>) -> std::io::Result<()> {
//! let socket = std::path::Path::new(hpm_docker::DEFAULT_SOCKET_PATH);
//! let listener = hpm_docker::bind(socket)?;
//! let (stop, stopped) = tokio::sync::watch::channel(false);
//! let serving = tokio::spawn(hpm_docker::serve(listener, store, stopped));
//! // ... on SIGTERM:
//! let _ = stop.send(true);
//! serving.await??;
//! std::fs::remove_file(socket)?;
//! # Ok(()) }
//! ```
//!
//! Modules: `driver` (the trait), `error` (the error type), `wire` (JSON shapes and names,
//! pure), `stream` (the bounded channels between hyper bodies and blocking `Read`/`Write`),
//! `reply` (replies, and the one error-to-reply mapping), `handler` (one request),
//! `server` (socket and connections).

#![forbid(unsafe_code)]

mod driver;
mod error;
mod handler;
mod reply;
mod server;
mod stream;
mod wire;

pub use driver::{parse_key_values, GraphDriver, CHANGE_ADD, CHANGE_DELETE, CHANGE_MODIFY};
pub use error::{DriverError, DriverErrorKind};
pub use server::{bind, serve, DEFAULT_SOCKET_PATH};
