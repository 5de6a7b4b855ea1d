//! dockerd's side of the wire: a hyper HTTP/1.1 client over the plugin socket, sending the
//! headers and bodies dockerd's plugin client sends (JSON with Go's trailing newline, the
//! ApplyDiff tar chunked with no length).

use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// dockerd's Accept header (moby pkg/plugins `VersionMimetype`).
pub const ACCEPT: &str = "application/vnd.docker.plugins.v1.2+json";

/// A request body: all at once (with a length) or chunk by chunk (chunked, no length).
pub enum SendBody {
    Full(Option<Bytes>),
    Chunks(mpsc::Receiver<Bytes>),
}

impl Body for SendBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut *self {
            SendBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            SendBody::Chunks(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            SendBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            SendBody::Chunks(_) => SizeHint::default(),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, SendBody::Full(None))
    }
}

/// A whole reply.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "reply is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts a 200 JSON reply without `Err` and returns it.
    pub fn ok_json(&self) -> serde_json::Value {
        assert_eq!(self.status, StatusCode::OK, "{:?}", self.body);
        assert_eq!(
            self.headers["content-type"],
            "application/vnd.docker.plugins.v1+json"
        );
        let v = self.json();
        assert!(
            v.get("Err").is_none_or(|e| e == ""),
            "unexpected error reply {v}"
        );
        v
    }

    /// Asserts a `{"Err": ...}` reply with `status` and returns the message.
    pub fn err(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "{:?}", self.body);
        let v = self.json();
        let err = v["Err"].as_str().unwrap_or_else(|| panic!("no Err in {v}"));
        assert!(!err.is_empty(), "empty Err means success: {v}");
        err.to_owned()
    }
}

/// One connection to the plugin.
pub struct Client {
    sender: http1::SendRequest<SendBody>,
}

impl Client {
    pub async fn connect(socket: &Path) -> Client {
        let stream = UnixStream::connect(socket).await.unwrap();
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Client { sender }
    }

    fn request(path: &str, body: SendBody) -> Request<SendBody> {
        Request::post(path)
            .header("host", "plugin")
            .header("accept", ACCEPT)
            .body(body)
            .unwrap()
    }

    /// Sends a request and returns the reply with its body unread.
    pub async fn send(&mut self, path: &str, body: SendBody) -> hyper::Result<Response<Incoming>> {
        self.sender.ready().await?;
        self.sender.send_request(Self::request(path, body)).await
    }

    /// POSTs `body` as it is and reads the whole reply.
    pub async fn post(&mut self, path: &str, body: &str) -> Reply {
        let reply = self
            .send(
                path,
                SendBody::Full(Some(Bytes::copy_from_slice(body.as_bytes()))),
            )
            .await
            .unwrap();
        read_all(reply).await
    }

    /// POSTs a JSON body the way Go's json.Encoder writes it (with a trailing newline).
    pub async fn call(&mut self, method: &str, json: &str) -> Reply {
        self.post(&format!("/{method}"), &format!("{json}\n")).await
    }

    /// ApplyDiff with the tar sent chunked, in `chunk`-byte pieces (Go's io.Copy: 32 KiB).
    pub async fn apply_diff(&mut self, query: &str, tar: &[u8], chunk: usize) -> Reply {
        let (tx, rx) = mpsc::channel(4);
        let pieces: Vec<Bytes> = tar.chunks(chunk).map(Bytes::copy_from_slice).collect();
        let feeding = tokio::spawn(async move {
            for piece in pieces {
                if tx.send(piece).await.is_err() {
                    break;
                }
            }
        });
        let reply = self
            .send(
                &format!("/GraphDriver.ApplyDiff?{query}"),
                SendBody::Chunks(rx),
            )
            .await
            .unwrap();
        let reply = read_all(reply).await;
        feeding.await.unwrap();
        reply
    }
}

/// Reads a whole reply.
pub async fn read_all(reply: Response<Incoming>) -> Reply {
    let (parts, body) = reply.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}
