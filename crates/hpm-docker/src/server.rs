//! The listening socket and connection lifetimes: [`bind`] places the socket where dockerd
//! finds it, [`serve`] accepts connections until shutdown and serves each with hyper's
//! HTTP/1.1 (keep-alive: dockerd pools connections and runs calls for different layers on
//! several at once).

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::handler::handle;
use crate::GraphDriver;

/// Where dockerd looks for a legacy (v1) plugin named `hpmapper`:
/// `/run/docker/plugins/<name>.sock`. dockerd is then started with `--experimental -s hpmapper`.
pub const DEFAULT_SOCKET_PATH: &str = "/run/docker/plugins/hpmapper.sock";

/// Pause after a failed accept (out of file descriptors, ...) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Binds the plugin socket at `path` (normally [`DEFAULT_SOCKET_PATH`]), so only root
/// (dockerd) can connect: see `hpm_io::socket::bind_private` (mode 0600, stale sockets
/// replaced, live ones refused, never visible before it listens).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    UnixListener::from_std(hpm_io::socket::bind_private(path)?)
}

/// Serves the graphdriver plugin protocol on `listener` with `driver` until `shutdown`
/// becomes true (or its sender is dropped): then it stops accepting, closes idle
/// connections, lets requests in flight finish (an ApplyDiff may take a while), and returns.
/// Needs a tokio runtime with the blocking pool (every driver call runs there); it never
/// blocks its own threads. Dropping the future instead aborts every connection; a driver
/// call in progress then sees its stream fail.
///
/// Accept errors (out of file descriptors, ...) are logged and retried, so today this only
/// returns `Ok`. It leaves the socket file in place: the caller removes it after this
/// returns, so that a later dockerd does not find a socket nobody answers on.
pub async fn serve(
    listener: UnixListener,
    driver: Arc<dyn GraphDriver>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    info!(
        addr = ?listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf)),
        "graphdriver plugin serving"
    );
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown_requested(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, driver.clone(), shutdown.clone()));
                }
                Err(e) => {
                    warn!("accepting a graphdriver plugin connection failed: {e}; retrying");
                    tokio::select! {
                        () = shutdown_requested(&mut shutdown) => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            },
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                log_connection_end(joined);
            }
        }
    }
    drop(listener);
    debug!(
        connections = connections.len(),
        "graphdriver plugin shutting down"
    );
    while let Some(joined) = connections.join_next().await {
        log_connection_end(joined);
    }
    info!("graphdriver plugin stopped");
    Ok(())
}

/// Resolves once shutdown is asked for: the value is true, or the sender is gone.
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn log_connection_end(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        if e.is_panic() {
            warn!("a graphdriver plugin connection panicked: {e}");
        }
    }
}

/// One connection, until the client closes it or shutdown closes it after its request in
/// flight.
async fn serve_connection(
    stream: UnixStream,
    driver: Arc<dyn GraphDriver>,
    mut shutdown: watch::Receiver<bool>,
) {
    let service = service_fn(move |req| handle(driver.clone(), req));
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!("graphdriver plugin connection ended: {e}");
                }
                return;
            }
            () = shutdown_requested(&mut shutdown), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    #[tokio::test]
    async fn bind_restricts_replaces_stale_and_refuses_live_or_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugins/hpmapper.sock");
        let live = bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let plugins = path.parent().unwrap();
        assert_eq!(
            std::fs::metadata(plugins).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            std::fs::read_dir(plugins).unwrap().count(),
            1,
            "nothing left beside the socket"
        );
        // Still accepting: refused.
        let e = bind(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        // Stale (its listener gone, the file left behind): replaced.
        drop(live);
        assert!(path.exists());
        let _again = bind(&path).unwrap();
        // Not a socket: left alone.
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        let e = bind(&file).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }
}
