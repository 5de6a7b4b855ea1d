//! The server: accept loops for Unix and TCP listeners, one thread per connection, and the
//! Unix socket helper.
//!
//! This module owns connection lifetimes: each accepted connection is served on a thread of
//! its own running a single-threaded runtime, and the accept loop's `JoinSet` holds a task
//! that waits for that thread, so `serve_*` returns only after every connection (and every
//! device handle it opened) is gone, and the caller may then close the pool. A thread of its
//! own lets a request alone in its connection run right where it was read (see
//! `transmission`). It must never let one connection's failure (protocol violation, socket
//! error, even a panic) stop the loop.

use crate::handshake::{self, End};
use crate::stats::{ConnectionGuard, Counters, NbdStats};
use crate::transmission::InPlace;
use crate::{transmission, Shutdown};
use hpm_engine::Pool;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;

/// Read buffer per connection (request headers are read through it).
const READ_BUFFER: usize = 128 << 10;
/// Write buffer per connection (replies are batched through it).
const WRITE_BUFFER: usize = 64 << 10;
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Bounds on what clients may hold of the server before they are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time a client has from connecting to the end of its handshake (qemu-nbd's
    /// `--handshake-limit` is 10 s too); a client still negotiating then is disconnected.
    pub handshake: Duration,
    /// Connections served at once per listener (so clients of a TCP listener cannot take
    /// the root-only Unix socket's); one more is closed at once. Each holds a thread and up
    /// to 64 MiB of request payload in flight.
    pub connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            connections: 128,
        }
    }
}

/// An NBD server exporting every device of a pool; the export name is the device name.
/// Cheap to clone; clones share the pool and the counters.
#[derive(Clone)]
pub struct NbdServer {
    pool: Pool,
    counters: Arc<Counters>,
    limits: Limits,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl NbdServer {
    /// A server for `pool`'s devices. Devices are looked up when a client connects, so
    /// devices created later are served too.
    pub fn new(pool: Pool) -> Self {
        Self::with_limits(pool, Limits::default())
    }

    /// `new` with other [`Limits`].
    pub fn with_limits(pool: Pool, limits: Limits) -> Self {
        Self {
            pool,
            counters: Arc::new(Counters::default()),
            limits,
        }
    }

    /// Counters since the server was created.
    pub fn stats(&self) -> NbdStats {
        self.counters.snapshot()
    }

    /// Serves connections from `listener` until `shutdown` is triggered, then waits for
    /// every connection to finish its requests in flight and close. Accept errors (such as
    /// running out of file descriptors) are logged and retried, never fatal.
    pub async fn serve_unix(&self, listener: UnixListener, shutdown: Shutdown) {
        self.serve(Listener::Unix(listener), shutdown).await
    }

    /// As `serve_unix`, for TCP. NBD has no authentication here: bind only addresses the
    /// clients are trusted on.
    pub async fn serve_tcp(&self, listener: TcpListener, shutdown: Shutdown) {
        self.serve(Listener::Tcp(listener), shutdown).await
    }

    /// Serves one already-connected stream (e.g. a socket-activated or in-process client)
    /// until it closes or `shutdown` is triggered.
    pub async fn serve_stream<S>(&self, stream: S, shutdown: Shutdown)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let open = self.counters.connection(None);
        self.connection(r, w, shutdown, InPlace::of_this_runtime(), open)
            .await
    }

    async fn serve(&self, listener: Listener, shutdown: Shutdown) {
        let mut conns = JoinSet::new();
        // Connections of this listener; only this loop adds to it.
        let here = Arc::new(AtomicU64::new(0));
        // Whether the last connection was refused for the limit (warned once per episode).
        let mut full = false;
        loop {
            // Reap finished connections so the set does not grow with the total count.
            while let Some(res) = conns.try_join_next() {
                log_join(res);
            }
            let accepted = tokio::select! {
                _ = shutdown.triggered() => break,
                a = accept(&listener) => a,
            };
            if let Ok(Accepted::Tcp(ref s)) = accepted {
                // Replies are batched already; do not let Nagle delay the last one.
                let _ = s.set_nodelay(true);
            }
            let served = here.load(Ordering::Relaxed);
            if accepted.is_ok() && served >= self.limits.connections as u64 {
                if !full {
                    tracing::warn!(
                        limit = self.limits.connections,
                        "NBD server: connection limit reached; closing new connections until one ends"
                    );
                }
                full = true;
                continue; // dropping the stream closes it
            }
            full = false;
            match accepted.and_then(Accepted::into_std) {
                Ok(s) => {
                    // Counted from here, so a burst of connections cannot pass the limit.
                    let open = self.counters.connection(Some(&here));
                    let (me, sd) = (self.clone(), shutdown.clone());
                    conns.spawn(async move { me.on_own_thread(s, sd, open).await });
                }
                Err(e) => {
                    tracing::warn!("NBD server: accepting a connection failed: {e}; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
        while let Some(res) = conns.join_next().await {
            log_join(res);
        }
    }

    /// Serves `stream` on a new thread with a single-threaded runtime of its own; completes
    /// when that thread is done with it.
    async fn on_own_thread(&self, stream: StdStream, shutdown: Shutdown, open: ConnectionGuard) {
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("hpm-nbd-conn".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::warn!("NBD server: no runtime for a connection: {e}");
                        return;
                    }
                };
                rt.block_on(me.serve_std(stream, shutdown, open));
                drop(rt);
                let _ = done.send(());
            });
        if let Err(e) = spawned {
            tracing::warn!("NBD server: cannot start a thread for a connection: {e}");
            return;
        }
        if finished.await.is_err() {
            tracing::error!("an NBD connection thread panicked; other connections go on");
        }
    }

    /// A connection on its own thread: the socket joins this thread's runtime.
    async fn serve_std(&self, stream: StdStream, shutdown: Shutdown, open: ConnectionGuard) {
        let registered = match stream {
            StdStream::Unix(s) => tokio::net::UnixStream::from_std(s).map(|s| {
                let (r, w) = s.into_split();
                (Box::new(r) as BoxRead, Box::new(w) as BoxWrite)
            }),
            StdStream::Tcp(s) => tokio::net::TcpStream::from_std(s).map(|s| {
                let (r, w) = s.into_split();
                (Box::new(r) as BoxRead, Box::new(w) as BoxWrite)
            }),
        };
        match registered {
            Ok((r, w)) => self.connection(r, w, shutdown, InPlace::Direct, open).await,
            Err(e) => tracing::warn!("NBD server: cannot register a connection: {e}"),
        }
    }

    /// One connection: handshake, then transmission. Never returns an error: whatever
    /// ends the connection is logged and counted here.
    async fn connection<R, W>(
        &self,
        r: R,
        w: W,
        shutdown: Shutdown,
        in_place: InPlace,
        open: ConnectionGuard,
    ) where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut r = BufReader::with_capacity(READ_BUFFER, r);
        let mut w = BufWriter::with_capacity(WRITE_BUFFER, w);
        let negotiated = tokio::select! {
            res = tokio::time::timeout(
                self.limits.handshake,
                handshake::negotiate(&mut r, &mut w, &self.pool),
            ) => match res {
                Ok(res) => res,
                Err(_) => Err(End::Violation(format!(
                    "no export chosen within {:?} of connecting",
                    self.limits.handshake
                ))),
            },
            _ = shutdown.triggered() => return,
        };
        let end = match negotiated {
            Ok(export) => {
                let name = export.device.name().to_string();
                tracing::debug!(export = %name, "NBD client entered transmission");
                transmission::serve(&mut r, &mut w, export, &self.counters, &shutdown, in_place)
                    .await
            }
            Err(end) => Err(end),
        };
        match end {
            Ok(()) | Err(End::Closed) => {}
            Err(End::Violation(why)) => {
                Counters::add(&self.counters.protocol_errors, 1);
                tracing::info!("NBD client broke the protocol ({why}); connection closed");
            }
            Err(End::Io(e)) => tracing::debug!("NBD connection ended: {e}"),
        }
        // Counted closed before the socket closes (with `r` and `w`, after this): a client
        // that sees the close finds the slot free again.
        drop(open);
    }
}

enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl Accepted {
    /// The socket, deregistered from this runtime (still non-blocking) to move to another.
    fn into_std(self) -> io::Result<StdStream> {
        Ok(match self {
            Accepted::Unix(s) => StdStream::Unix(s.into_std()?),
            Accepted::Tcp(s) => StdStream::Tcp(s.into_std()?),
        })
    }
}

/// An accepted socket on its way to its connection thread.
enum StdStream {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

async fn accept(l: &Listener) -> io::Result<Accepted> {
    match l {
        Listener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        Listener::Tcp(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
    }
}

fn log_join(res: Result<(), tokio::task::JoinError>) {
    if let Err(e) = res {
        if e.is_panic() {
            tracing::error!("an NBD connection task panicked: {e}; other connections go on");
        }
    }
}

/// Binds a root-only Unix socket at `path` (see `hpm_io::socket::bind_private`: mode 0600,
/// stale sockets replaced, live ones refused), ready for `serve_unix`. Must be called
/// within a tokio runtime.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    UnixListener::from_std(hpm_io::socket::bind_private(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    #[tokio::test]
    async fn bind_unix_restricts_replaces_stale_and_refuses_live_or_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let live = bind_unix(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
        // Still accepting: refused.
        let e = bind_unix(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        // Stale (its listener gone, the file left behind): replaced.
        drop(live);
        assert!(path.exists());
        let _again = bind_unix(&path).unwrap();
        // Not a socket: left alone.
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        let e = bind_unix(&file).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }
}
