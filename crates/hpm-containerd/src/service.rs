//! The `containerd.services.snapshots.v1.Snapshots` gRPC service in front of any
//! [`Snapshotter`]: [`bind`] places the root-only socket containerd's proxy plugin dials,
//! [`serve`] answers on it until shutdown. Each RPC checks and converts its request (`wire`),
//! runs the snapshotter call on tokio's blocking pool (never on an async thread: calls run
//! mkfs, attach devices and fsync metadata), and converts the result or maps the error.
//!
//! Logs: every call at debug (RPC, key, parent, how long it took). Errors at warn with the
//! RPC, except NotFound and AlreadyExists, which are containerd's normal control flow (Stat
//! of a layer not yet unpacked, Prepare of a layer already there) and stay at debug.
//!
//! A call whose client goes away (containerd's deadline, a cancelled pull) still runs to its
//! end on the blocking pool; its result is dropped, and containerd's garbage collection
//! removes what it made.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::api::snapshots as pb;
use crate::api::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use crate::filters::Filters;
use crate::types::{Code, Error, Result, Snapshotter};
use crate::wire;

/// Pause after a failed accept (out of file descriptors, ...) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Binds the snapshotter socket at `path` (the `address` of containerd's
/// `[proxy_plugins.<name>]`), so only root (containerd) can connect: see
/// `hpm_io::socket::bind_private` (mode 0600, stale sockets replaced, live ones refused,
/// never visible before it listens).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    UnixListener::from_std(hpm_io::socket::bind_private(path)?)
}

/// Serves the snapshots API on `listener` with `snapshotter` until `shutdown` becomes true
/// (or its sender is dropped): then it stops accepting, lets the calls in flight finish,
/// closes the connections (HTTP/2 GOAWAY), and returns. Needs a tokio runtime with the
/// blocking pool (every snapshotter call runs there). Dropping the future instead aborts
/// every connection.
///
/// Accept errors (out of file descriptors, ...) are logged and retried after a pause. It
/// leaves the socket file in place: the caller removes it after this returns, so that
/// containerd does not later dial a socket nobody answers on.
pub async fn serve(
    listener: UnixListener,
    snapshotter: Arc<dyn Snapshotter>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    info!(
        addr = ?listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf)),
        "containerd snapshotter serving"
    );
    // One service, so no router: SnapshotsServer answers UNIMPLEMENTED for any other path.
    tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(
            SnapshotsServer::new(Service { snapshotter }),
            Incoming::new(listener),
            async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
                debug!("containerd snapshotter shutting down");
            },
        )
        .await
        .map_err(|e| io::Error::other(format!("the containerd snapshotter server failed: {e}")))?;
    info!("containerd snapshotter stopped");
    Ok(())
}

/// The accepted connections of a listener. Unlike tonic's own handling of an incoming
/// stream (which retries a failed accept at once, spinning while out of file descriptors),
/// a failed accept is logged and retried after [`ACCEPT_BACKOFF`]; the stream never ends
/// and never yields an error. Dropped (closing the listener) when shutdown starts.
struct Incoming {
    listener: UnixListener,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Incoming {
    fn new(listener: UnixListener) -> Self {
        Self {
            listener,
            backoff: None,
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<UnixStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pause) = self.backoff.as_mut() {
                ready!(pause.as_mut().poll(cx));
                self.backoff = None;
            }
            match ready!(self.listener.poll_accept(cx)) {
                Ok((stream, _)) => return Poll::Ready(Some(Ok(stream))),
                Err(e) => {
                    warn!("accepting a containerd connection failed: {e}; retrying");
                    self.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
            }
        }
    }
}

/// The tonic service: the snapshotter and nothing else (all state is the snapshotter's).
struct Service {
    snapshotter: Arc<dyn Snapshotter>,
}

/// One RPC in progress, for its log lines.
struct Call {
    rpc: &'static str,
    key: String,
    parent: String,
    started: Instant,
}

impl Call {
    fn start(rpc: &'static str, key: &str, parent: &str) -> Self {
        Self {
            rpc,
            key: key.to_owned(),
            parent: parent.to_owned(),
            started: Instant::now(),
        }
    }

    /// Logs the outcome and turns an error into the status containerd gets.
    fn finish<T>(self, result: Result<T>) -> std::result::Result<T, Status> {
        let elapsed = self.started.elapsed();
        let (rpc, key, parent) = (self.rpc, &self.key, &self.parent);
        match result {
            Ok(value) => {
                debug!(rpc, key, parent, ?elapsed, "snapshot call done");
                Ok(value)
            }
            Err(err) => {
                let code = err.code;
                if matches!(code, Code::NotFound | Code::AlreadyExists) {
                    debug!(rpc, key, parent, ?elapsed, ?code, "snapshot call: {err}");
                } else {
                    warn!(
                        rpc,
                        key,
                        parent,
                        ?elapsed,
                        ?code,
                        "snapshot call failed: {err}"
                    );
                }
                Err(wire::status(&err))
            }
        }
    }
}

impl Service {
    /// Runs `work` on the checked arguments on the blocking pool, logs, maps the error. A
    /// check that failed is logged and answered the same way, without a blocking thread.
    async fn run<A, T>(
        &self,
        call: Call,
        args: Result<A>,
        work: impl FnOnce(&dyn Snapshotter, A) -> Result<T> + Send + 'static,
    ) -> std::result::Result<T, Status>
    where
        A: Send + 'static,
        T: Send + 'static,
    {
        let result = match args {
            Ok(args) => {
                let snapshotter = self.snapshotter.clone();
                tokio::task::spawn_blocking(move || work(snapshotter.as_ref(), args))
                    .await
                    .unwrap_or_else(|e| {
                        Err(Error::new(
                            Code::Internal,
                            format!("the snapshotter call did not finish: {e}; see the daemon log"),
                        ))
                    })
            }
            Err(err) => Err(err),
        };
        call.finish(result)
    }
}

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> std::result::Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let req = request.into_inner();
        let call = Call::start("Prepare", &req.key, &req.parent);
        let args = wire::new_snapshot(req.key, req.parent, req.labels);
        let mounts = self
            .run(call, args, |s, (key, parent, labels)| {
                s.prepare(&key, parent.as_deref(), labels)
            })
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: wire::mounts(mounts),
        }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> std::result::Result<Response<pb::ViewSnapshotResponse>, Status> {
        let req = request.into_inner();
        let call = Call::start("View", &req.key, &req.parent);
        let args = wire::new_snapshot(req.key, req.parent, req.labels);
        let mounts = self
            .run(call, args, |s, (key, parent, labels)| {
                s.view(&key, parent.as_deref(), labels)
            })
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: wire::mounts(mounts),
        }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> std::result::Result<Response<pb::MountsResponse>, Status> {
        let req = request.into_inner();
        let call = Call::start("Mounts", &req.key, "");
        let args = wire::required("key", req.key);
        let mounts = self.run(call, args, |s, key| s.mounts(&key)).await?;
        Ok(Response::new(pb::MountsResponse {
            mounts: wire::mounts(mounts),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let req = request.into_inner();
        // The log's "parent" of a commit is the active snapshot it comes from.
        let call = Call::start("Commit", &req.name, &req.key);
        let args = wire::required("name", req.name).and_then(|name| {
            Ok((
                name,
                wire::required("key", req.key)?,
                wire::labels(req.labels)?,
            ))
        });
        self.run(call, args, |s, (name, key, labels)| {
            s.commit(&name, &key, labels)
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let req = request.into_inner();
        let call = Call::start("Remove", &req.key, "");
        let args = wire::required("key", req.key);
        self.run(call, args, |s, key| s.remove(&key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> std::result::Result<Response<pb::StatSnapshotResponse>, Status> {
        let req = request.into_inner();
        let call = Call::start("Stat", &req.key, "");
        let args = wire::required("key", req.key);
        let info = self.run(call, args, |s, key| s.stat(&key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(wire::info(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> std::result::Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let name = req.info.as_ref().map(|i| i.name.as_str()).unwrap_or("");
        let call = Call::start("Update", name, "");
        let args = wire::update(req.info, req.update_mask);
        let info = self
            .run(call, args, |s, (info, paths)| s.update(info, &paths))
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(wire::info(info)),
        }))
    }

    type ListStream = tokio_stream::Iter<
        std::vec::IntoIter<std::result::Result<pb::ListSnapshotsResponse, Status>>,
    >;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> std::result::Result<Response<Self::ListStream>, Status> {
        let req = request.into_inner();
        let call = Call::start("List", "", "");
        let args = Filters::parse(&req.filters).map_err(Error::from);
        // Filtering runs on the blocking pool too: regular expressions over every snapshot.
        let infos = self
            .run(call, args, |s, filters| {
                let mut infos = s.list()?;
                infos.retain(|i| filters.matches(i));
                Ok(infos)
            })
            .await?;
        let batches = wire::list_batches(infos)
            .into_iter()
            .map(Ok)
            .collect::<Vec<_>>();
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> std::result::Result<Response<pb::UsageResponse>, Status> {
        let req = request.into_inner();
        let call = Call::start("Usage", &req.key, "");
        let args = wire::required("key", req.key);
        let usage = self.run(call, args, |s, key| s.usage(&key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: usage.size,
            inodes: usage.inodes,
        }))
    }

    async fn cleanup(
        &self,
        _request: Request<pb::CleanupRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let call = Call::start("Cleanup", "", "");
        self.run(call, Ok(()), |s, ()| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
