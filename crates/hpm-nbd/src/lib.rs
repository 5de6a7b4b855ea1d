//! hpmapper's NBD server: serves every device of a pool over the Network Block Device
//! protocol, with the device name as the export name.
//!
//! Fixed newstyle handshake (`LIST`, `INFO`, `GO`, `EXPORT_NAME`, `ABORT`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` / `SET_META_CONTEXT` for `base:allocation`);
//! READ, WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS and DISC with many
//! requests in flight per connection; multi-conn (FLUSH commits the whole pool); read-only
//! exports for read-only devices. Simple replies always work (the Linux kernel client
//! speaks nothing else); READs use structured replies when the client negotiates them.
//!
//! Wiring, for the daemon: bind the socket with [`bind_unix`] (mode 0600, stale socket
//! replaced), run [`NbdServer::serve_unix`] on a tokio runtime (it only accepts there: each
//! connection is served on a thread of its own with a single-threaded runtime, a request
//! alone in its connection runs on that thread, overlapping requests on that runtime's
//! blocking pool), and on shutdown call [`Shutdown::trigger`]: the server stops
//! accepting, lets requests in flight finish, closes every connection and returns; by then
//! it holds no device open, so the pool can be closed. TCP ([`NbdServer::serve_tcp`]) only
//! when asked: NBD has no authentication.
//!
//! ```no_run
//! # async fn run(pool: hpm_engine::Pool) -> std::io::Result<()> {
//! let server = hpm_nbd::NbdServer::new(pool.clone());
//! let shutdown = hpm_nbd::Shutdown::new();
//! let listener = hpm_nbd::bind_unix(std::path::Path::new("/run/hpmapper/nbd.sock"))?;
//! let serving = tokio::spawn({
//!     let (server, shutdown) = (server.clone(), shutdown.clone());
//!     async move { server.serve_unix(listener, shutdown).await }
//! });
//! // ... on SIGTERM:
//! shutdown.trigger();
//! serving.await?;
//! drop(server);
//! pool.close().map_err(std::io::Error::other)?;
//! # Ok(()) }
//! ```
//!
//! Modules: `proto` (the wire format, pure), `handshake` (option negotiation),
//! `transmission` (the request pipeline of one connection), `command` (what each command
//! does to the device), `errors` (the one errno mapping), `server` (listeners and
//! connection lifetimes), `stats`, `shutdown`.

#![forbid(unsafe_code)]

mod command;
mod errors;
mod handshake;
pub mod proto;
mod server;
mod shutdown;
mod stats;
mod transmission;

pub use server::{bind_unix, Limits, NbdServer};
pub use shutdown::Shutdown;
pub use stats::NbdStats;
