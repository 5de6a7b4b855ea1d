//! Bounded channels between hyper's async bodies and the driver's blocking `Read`/`Write`:
//! the ApplyDiff request body becomes a [`BodyReader`], the Diff response body is fed by a
//! [`TarWriter`]. Neither side ever holds more than a few chunks, so a multi-GiB layer
//! streams through in constant memory, and a slow side slows the other (backpressure).
//!
//! Both directions end with an explicit end marker. A channel that closes without one means
//! the other side was dropped mid-stream (the connection died, the driver panicked), and
//! that is reported as an error, never as end of file: a cut-short layer tar must not be
//! mistaken for a complete one. (hyper's `Incoming` itself ends cleanly when its connection
//! is dropped, which is why the pump runs inside the request's future: dropping the
//! connection drops the pump and its sender with it, before any end marker.)

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use crate::DriverError;

/// Request body chunks in flight to the driver (each one a hyper frame, at most hyper's read
/// buffer, about 400 KiB; dockerd's chunks are 32 KiB).
const REQUEST_CHUNKS: usize = 8;
/// Size of the pieces the Diff stream is cut into.
pub(crate) const TAR_CHUNK: usize = 64 * 1024;
/// Diff chunks in flight to the client.
const RESPONSE_CHUNKS: usize = 4;

/// One message from the request body pump to the driver.
#[derive(Debug)]
pub(crate) enum BodyChunk {
    Data(Bytes),
    /// The body ended where HTTP says it ends.
    End,
    /// Reading the body failed (the client went away, bad chunked framing).
    Failed(io::Error),
}

/// The ApplyDiff request body as a blocking [`Read`], for the driver's thread.
#[derive(Debug)]
pub(crate) struct BodyReader {
    rx: mpsc::Receiver<BodyChunk>,
    current: Bytes,
    state: ReadState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Open,
    Ended,
    Failed,
}

/// A reader and the sender that [`pump`] feeds it through.
pub(crate) fn body_channel() -> (mpsc::Sender<BodyChunk>, BodyReader) {
    let (tx, rx) = mpsc::channel(REQUEST_CHUNKS);
    (
        tx,
        BodyReader {
            rx,
            current: Bytes::new(),
            state: ReadState::Open,
        },
    )
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.current.is_empty() {
            match self.state {
                ReadState::Ended => return Ok(0),
                ReadState::Failed => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the ApplyDiff request body already failed",
                    ))
                }
                ReadState::Open => {}
            }
            // Runs on a blocking-pool thread, where blocking_recv is allowed.
            match self.rx.blocking_recv() {
                Some(BodyChunk::Data(chunk)) => self.current = chunk,
                Some(BodyChunk::End) => self.state = ReadState::Ended,
                Some(BodyChunk::Failed(e)) => {
                    self.state = ReadState::Failed;
                    return Err(e);
                }
                None => {
                    self.state = ReadState::Failed;
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the ApplyDiff request was abandoned before its body ended \
                         (the connection to dockerd was closed)",
                    ));
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// How a pumped request body ended.
#[derive(Debug)]
pub(crate) enum PumpEnd {
    /// Every byte arrived (some perhaps discarded after the reader stopped reading).
    Complete,
    /// The body broke off; the reader was told.
    Broken(io::Error),
}

/// Forwards `body` into `tx` until it ends, waiting whenever the channel is full. Once the
/// reader is gone (the driver returned early), the rest of the body is read and discarded,
/// so that the reply goes out after the whole request, as HTTP/1.1 clients expect.
pub(crate) async fn pump<B>(mut body: B, tx: mpsc::Sender<BodyChunk>) -> PumpEnd
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut reader_alive = true;
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers carry nothing for us
                };
                if reader_alive && !data.is_empty() {
                    reader_alive = tx.send(BodyChunk::Data(data)).await.is_ok();
                }
            }
            Some(Err(e)) => {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the ApplyDiff request body broke off: {e}"),
                );
                let kept = io::Error::new(e.kind(), e.to_string());
                if reader_alive {
                    let _ = tx.send(BodyChunk::Failed(e)).await;
                }
                return PumpEnd::Broken(kept);
            }
            None => {
                if reader_alive {
                    let _ = tx.send(BodyChunk::End).await;
                }
                return PumpEnd::Complete;
            }
        }
    }
}

/// One message from the driver's Diff to the response body.
#[derive(Debug)]
pub(crate) enum TarChunk {
    Data(Bytes),
    /// The driver finished the tar.
    End,
    /// The driver failed.
    Failed(DriverError),
}

/// The Diff response body as a blocking [`Write`], for the driver's thread. Bytes are sent
/// in pieces of [`TAR_CHUNK`]; call [`TarWriter::finish`] with the driver's result.
#[derive(Debug)]
pub(crate) struct TarWriter {
    tx: mpsc::Sender<TarChunk>,
    buf: BytesMut,
}

/// A writer and the receiver that a [`ReplyBody::tar`] drains.
pub(crate) fn tar_channel() -> (TarWriter, mpsc::Receiver<TarChunk>) {
    let (tx, rx) = mpsc::channel(RESPONSE_CHUNKS);
    (
        TarWriter {
            tx,
            buf: BytesMut::new(),
        },
        rx,
    )
}

impl TarWriter {
    fn send(&mut self, chunk: TarChunk) -> io::Result<()> {
        self.tx.blocking_send(chunk).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the client closed the GraphDriver.Diff stream before it ended",
            )
        })
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.send(TarChunk::Data(chunk))
    }

    /// Ends the stream: on success the buffered rest and the end marker go out; on failure
    /// the buffered rest is dropped and the error goes out instead, so an error before the
    /// first chunk reaches dockerd as an error reply.
    pub(crate) fn finish(mut self, result: Result<(), DriverError>) {
        let _ = match result {
            Ok(()) => self.send_buffered().and_then(|()| self.send(TarChunk::End)),
            Err(e) => self.send(TarChunk::Failed(e)),
        };
    }
}

impl Write for TarWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.tx.is_closed() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the client closed the GraphDriver.Diff stream before it ended",
            ));
        }
        // A partial write keeps every chunk at most TAR_CHUNK; write_all loops.
        let n = data.len().min(TAR_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == TAR_CHUNK {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()
    }
}

/// Every reply body: a JSON document, or the Diff tar stream.
#[derive(Debug)]
pub(crate) enum ReplyBody {
    Full(Option<Bytes>),
    Tar {
        first: Option<Bytes>,
        rx: mpsc::Receiver<TarChunk>,
        ended: bool,
    },
}

impl ReplyBody {
    /// A complete body.
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        ReplyBody::Full(Some(bytes.into()))
    }

    /// The tar stream: `first` (already received) then the rest of `rx`.
    pub(crate) fn tar(first: Bytes, rx: mpsc::Receiver<TarChunk>) -> Self {
        ReplyBody::Tar {
            first: Some(first),
            rx,
            ended: false,
        }
    }
}

impl Body for ReplyBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match &mut *self {
            ReplyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ReplyBody::Tar { first, rx, ended } => {
                if let Some(b) = first.take() {
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                if *ended {
                    return Poll::Ready(None);
                }
                // An error frame makes hyper cut the connection without the final chunk, so
                // dockerd sees a broken stream, not a short tar.
                Poll::Ready(match ready!(rx.poll_recv(cx)) {
                    Some(TarChunk::Data(b)) => Some(Ok(Frame::data(b))),
                    Some(TarChunk::End) => {
                        *ended = true;
                        None
                    }
                    Some(TarChunk::Failed(e)) => Some(Err(io::Error::other(format!(
                        "GraphDriver.Diff failed mid-stream: {e}"
                    )))),
                    None => Some(Err(io::Error::other(
                        "GraphDriver.Diff stopped without finishing the tar (the driver panicked)",
                    ))),
                })
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReplyBody::Full(bytes) => bytes.is_none(),
            ReplyBody::Tar { first, ended, .. } => first.is_none() && *ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReplyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ReplyBody::Tar { .. } => SizeHint::default(),
        }
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
