//! The transmission phase of one connection: many requests in flight, replies as they
//! complete.
//!
//! This module owns the request pipeline. A reader parses requests and has `command`
//! validate them; the blocking device call runs on tokio's blocking pool, and a writer sends
//! those replies in completion order from a channel. A request alone in its connection (a
//! client at queue depth 1) runs in place (see `InPlace`) and the reader sends its reply
//! itself; the two share the write half through an async mutex. Two semaphores bound
//! what a connection holds: `MAX_IN_FLIGHT` requests and `MAX_IN_FLIGHT_BYTES` of payload
//! (write data read, read data not yet sent); their permits travel with the reply and are
//! released once it is written.
//!
//! Ordering: a reply is sent only after its device call returned, so a FLUSH (a pool-wide
//! commit) covers every write the client has seen completed; a FUA write flushes before
//! its reply. It must never read a WRITE payload it cannot bound (more than `MAX_PAYLOAD`
//! closes the connection), never send a simple reply with data when structured replies
//! were negotiated, and never panic on anything the client sends.

use crate::command::{execute, op_of, prepare};
use crate::errors::{nbd_errno, Failure};
use crate::handshake::{End, Export};
use crate::proto::{self, chunk, cmd, Request};
use crate::stats::Counters;
use crate::Shutdown;
use hpm_engine::Device;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Mutex, Notify, OwnedSemaphorePermit, Semaphore};

/// Requests in flight per connection.
pub(crate) const MAX_IN_FLIGHT: usize = 64;
/// Payload bytes held per connection; at least `MAX_PAYLOAD`, so any one request fits.
pub(crate) const MAX_IN_FLIGHT_BYTES: u32 = 2 * proto::MAX_PAYLOAD;
/// How long replies may take to drain after shutdown before a client that does not read
/// them is cut off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A finished request on its way to the writer.
struct Done {
    handle: u64,
    offset: u64,
    kind: u16,
    /// The data of a successful READ or BLOCK_STATUS (empty otherwise), or why the request
    /// failed.
    result: Result<Vec<u8>, (u32, String)>,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

/// Serves requests until the client disconnects, breaks the protocol, or `shutdown`.
/// Returns once every request in flight has been answered (or the socket failed).
pub(crate) async fn serve<R, W>(
    r: &mut BufReader<R>,
    w: &mut W,
    export: Export,
    counters: &Arc<Counters>,
    shutdown: &Shutdown,
    in_place: InPlace,
) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, rx) = mpsc::unbounded_channel::<Done>();
    let writer_failed = Notify::new();
    let out = Out {
        w: Mutex::new(w),
        structured: export.structured,
    };
    let session = Session {
        device: Arc::new(export.device),
        base_allocation: export.base_allocation,
        counters: counters.clone(),
        count: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        bytes: Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES as usize)),
        in_place,
    };
    let reader = async {
        // `tx` moves in here, so the channel closes once the reader and every request in
        // flight are done; that is what ends the writer.
        let tx = tx;
        session
            .read_requests(r, &tx, &out, shutdown, &writer_failed)
            .await
    };
    let writer = write_replies(&out, rx, &writer_failed, shutdown);
    let (read_result, ()) = tokio::join!(reader, writer);
    // Closing a device takes the engine's metadata lock: not on the runtime's threads.
    let device = session.device;
    let _ = tokio::task::spawn_blocking(move || drop(device)).await;
    read_result
}

struct Session {
    device: Arc<Device>,
    /// The context id of `base:allocation` if the client selected it.
    base_allocation: Option<u32>,
    counters: Arc<Counters>,
    count: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    /// How a request alone in the connection runs.
    in_place: InPlace,
}

/// Waits for `fut` unless the connection is ending first: `None` once `shutdown` is
/// triggered or the writer has failed. Used wherever the reader waits for the client or for
/// room, never around a reply: a request that ran is answered.
async fn unless_ending<T>(
    fut: impl Future<Output = T>,
    shutdown: &Shutdown,
    writer_failed: &Notify,
) -> Option<T> {
    tokio::select! {
        v = fut => Some(v),
        _ = shutdown.triggered() => None,
        _ = writer_failed.notified() => None,
    }
}

impl Session {
    async fn read_requests<R, W>(
        &self,
        r: &mut BufReader<R>,
        tx: &mpsc::UnboundedSender<Done>,
        out: &Out<'_, W>,
        shutdown: &Shutdown,
        writer_failed: &Notify,
    ) -> Result<(), End>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let read_only = self.device.read_only();
        loop {
            let mut hdr = [0u8; proto::REQUEST_LEN];
            match unless_ending(r.read_exact(&mut hdr), shutdown, writer_failed).await {
                Some(res) => res?,
                None => return Ok(()),
            };
            let Some(req) = Request::decode(&hdr) else {
                return Err(End::Violation("request without the request magic".into()));
            };
            Counters::add(&self.counters.requests, 1);
            if req.kind == cmd::DISC {
                return Ok(());
            }
            let payload_len = match req.kind {
                cmd::WRITE if req.length > proto::MAX_PAYLOAD => {
                    // The payload cannot be skipped without reading it all: close.
                    return Err(End::Violation(format!(
                        "WRITE of {} bytes is above the maximum of {}",
                        req.length,
                        proto::MAX_PAYLOAD
                    )));
                }
                cmd::WRITE => req.length,
                cmd::READ if req.length <= proto::MAX_PAYLOAD => req.length,
                _ => 0,
            };
            // Alone: nothing in flight and no next request waiting in our buffer.
            let alone = self.count.available_permits() == MAX_IN_FLIGHT && r.buffer().is_empty();
            let Some(permits) =
                unless_ending(self.acquire(payload_len), shutdown, writer_failed).await
            else {
                return Ok(());
            };
            let mut payload = Vec::new();
            if req.kind == cmd::WRITE {
                payload = vec![0u8; req.length as usize];
                match unless_ending(r.read_exact(&mut payload), shutdown, writer_failed).await {
                    Some(res) => res?,
                    None => return Ok(()),
                };
            }
            // Everything that touches the device, its size included (it takes the
            // engine's metadata lock, which a checkpoint can hold for a while), blocks: a
            // request alone in its connection (a client at queue depth 1) runs right here
            // (see `InPlace`), so its reply needs no hop to the blocking pool and back (each
            // hop is a thread wake-up, tens of microseconds on an idle vCPU); otherwise it
            // goes to the blocking pool so requests overlap. The in-place reply is sent from
            // here, not queued for the writer: waking the writer (a future of this same task)
            // from inside the task makes tokio requeue the task and wake another worker
            // thread, which then sends the reply; on an idle vCPU that wake-up costs as much
            // as the read itself.
            if alone && self.in_place != InPlace::Never {
                let (dev, meta) = (&self.device, self.base_allocation);
                let result = match self.in_place {
                    InPlace::Direct => run(dev, &req, read_only, payload, meta),
                    _ => tokio::task::block_in_place(|| run(dev, &req, read_only, payload, meta)),
                };
                let done = finish(&self.counters, &req, result, permits);
                let sent = tokio::select! {
                    res = out.send(&done, true) => res,
                    _ = give_up(shutdown) => Err(client_too_slow()),
                };
                sent.map_err(End::Io)?;
                continue;
            }
            let (dev, counters, tx) = (self.device.clone(), self.counters.clone(), tx.clone());
            let meta = self.base_allocation;
            tokio::task::spawn_blocking(move || {
                let result = run(&dev, &req, read_only, payload, meta);
                // Released before the reply is queued: once the writer has seen the last
                // reply, no request holds the device, so `serve` ends with it closed.
                drop(dev);
                // The writer may be gone (client disconnected): nothing to tell.
                let _ = tx.send(finish(&counters, &req, result, permits));
            });
        }
    }

    async fn acquire(&self, bytes: u32) -> (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>) {
        // Neither semaphore is ever closed, so acquiring cannot fail.
        let count = self
            .count
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let bytes = if bytes == 0 {
            None
        } else {
            Some(
                self.bytes
                    .clone()
                    .acquire_many_owned(bytes)
                    .await
                    .expect("semaphore never closed"),
            )
        };
        (count, bytes)
    }
}

/// Validates and executes one request on the device (blocking).
fn run(
    dev: &Device,
    req: &Request,
    read_only: bool,
    payload: Vec<u8>,
    base_allocation: Option<u32>,
) -> Result<Vec<u8>, Failure> {
    prepare(req, dev.size(), read_only, payload, base_allocation)
        .and_then(|work| execute(dev, work))
}

/// How a request alone in its connection runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InPlace {
    /// On the reader's thread, blocking it: the connection has a thread and a
    /// single-threaded runtime to itself (`server`), so nothing else waits on it.
    Direct,
    /// Under `block_in_place` on a shared multi-threaded runtime, which first hands the
    /// worker's other tasks to another thread (a wake-up of its own, about 30 us here).
    HandOff,
    /// Never: a shared single-threaded runtime (where `block_in_place` would panic).
    Never,
}

impl InPlace {
    /// For a connection served on the caller's runtime.
    pub(crate) fn of_this_runtime() -> InPlace {
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi {
            InPlace::HandOff
        } else {
            InPlace::Never
        }
    }
}

/// Counts a finished request and packs it for the writer.
fn finish(
    counters: &Counters,
    req: &Request,
    result: Result<Vec<u8>, Failure>,
    permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
) -> Done {
    let result = match result {
        Ok(data) => {
            match req.kind {
                cmd::READ => Counters::add(&counters.bytes_read, u64::from(req.length)),
                cmd::WRITE => Counters::add(&counters.bytes_written, u64::from(req.length)),
                _ => {}
            }
            Ok(data)
        }
        Err(f) => {
            Counters::add(&counters.errors, 1);
            let errno = nbd_errno(op_of(req.kind), &f);
            tracing::debug!(
                handle = req.handle,
                kind = req.kind,
                errno,
                "NBD request failed: {f}"
            );
            Err((errno, f.to_string()))
        }
    };
    Done {
        handle: req.handle,
        offset: req.offset,
        kind: req.kind,
        result,
        _permits: permits,
    }
}

/// Sends replies until the channel closes. On a socket error, or when a client still has
/// not taken its replies `SHUTDOWN_GRACE` after shutdown, it tells the reader to stop and
/// keeps draining the channel, so requests in flight still finish (and release the device)
/// before the connection ends.
async fn write_replies<W>(
    out: &Out<'_, W>,
    mut rx: mpsc::UnboundedReceiver<Done>,
    failed: &Notify,
    shutdown: &Shutdown,
) where
    W: AsyncWrite + Unpin,
{
    let give_up = give_up(shutdown);
    tokio::pin!(give_up);
    let mut ok = true;
    while let Some(done) = rx.recv().await {
        // Once `ok` is false `give_up` is never polled again (it may have completed).
        if !ok {
            continue;
        }
        let res = tokio::select! {
            r = out.send(&done, rx.is_empty()) => r,
            _ = &mut give_up => Err(client_too_slow()),
        };
        drop(done);
        if let Err(e) = res {
            tracing::debug!("NBD connection: cannot send replies: {e}");
            ok = false;
            failed.notify_one();
        }
    }
    if ok {
        tokio::select! {
            _ = out.flush() => {}
            _ = &mut give_up => {}
        }
    }
}

/// Completes `SHUTDOWN_GRACE` after `shutdown` is triggered: how long a client may take to
/// read its replies once the server is stopping.
async fn give_up(shutdown: &Shutdown) {
    shutdown.triggered().await;
    tokio::time::sleep(SHUTDOWN_GRACE).await;
}

fn client_too_slow() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the client did not take its replies during shutdown",
    )
}

/// The write half, shared by the writer and the reader's in-place replies.
struct Out<'a, W> {
    w: Mutex<&'a mut W>,
    structured: bool,
}

impl<W: AsyncWrite + Unpin> Out<'_, W> {
    /// Writes one reply whole (no other reply interleaves), then flushes if `flush`.
    async fn send(&self, done: &Done, flush: bool) -> std::io::Result<()> {
        let mut w = self.w.lock().await;
        write_reply(&mut **w, done, self.structured).await?;
        if flush {
            w.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> std::io::Result<()> {
        self.w.lock().await.flush().await
    }
}

async fn write_reply<W>(w: &mut W, done: &Done, structured: bool) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    match (&done.result, structured) {
        (Ok(data), false) => {
            w.write_all(&proto::simple_reply(0, done.handle)).await?;
            w.write_all(data).await
        }
        (Err((errno, _)), false) => w.write_all(&proto::simple_reply(*errno, done.handle)).await,
        (Ok(data), true) if done.kind == cmd::READ && data.is_empty() => {
            let h = proto::chunk_header(chunk::FLAG_DONE, chunk::NONE, done.handle, 0);
            w.write_all(&h).await
        }
        (Ok(payload), true) if done.kind == cmd::BLOCK_STATUS => {
            let len = payload.len() as u32;
            let h = proto::chunk_header(chunk::FLAG_DONE, chunk::BLOCK_STATUS, done.handle, len);
            w.write_all(&h).await?;
            w.write_all(payload).await
        }
        (Ok(data), true) if done.kind == cmd::READ => {
            let len = 8 + data.len() as u32;
            let h = proto::chunk_header(chunk::FLAG_DONE, chunk::OFFSET_DATA, done.handle, len);
            w.write_all(&h).await?;
            w.write_all(&done.offset.to_be_bytes()).await?;
            w.write_all(data).await
        }
        // Structured replies allow a simple reply for anything without data.
        (Ok(_), true) => w.write_all(&proto::simple_reply(0, done.handle)).await,
        (Err((errno, msg)), true) => {
            w.write_all(&proto::error_chunk(done.handle, *errno, msg))
                .await
        }
    }
}

#[cfg(test)]
#[path = "transmission_tests.rs"]
mod tests;
