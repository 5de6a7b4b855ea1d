//! The fixed newstyle handshake: greeting, client flags, and the option loop (`LIST`,
//! `INFO`, `GO`, `EXPORT_NAME`, `ABORT`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//! `SET_META_CONTEXT` for `base:allocation`; everything else, `STARTTLS` included, is
//! answered `NBD_REP_ERR_UNSUP`).
//!
//! This module owns the negotiation state (structured replies, no-zeroes) and the choice of
//! export and transmission flags. It opens the device only when the client enters
//! transmission, so `LIST` and `INFO` never pin a device. It must never reply to an option
//! before reading all of its data, and never read more than `MAX_OPTION_DATA` bytes of one
//! option: a client that sends more is closed, not buffered.

use crate::proto::{self, opt, rep, tflag, InfoRequest, MetaRequest, OptionHeader};
use hpm_engine::{Device, ErrorKind, Pool};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What the negotiation settled on.
pub(crate) struct Export {
    /// The open device.
    pub device: Device,
    /// Whether READ replies must be structured.
    pub structured: bool,
    /// The id of `base:allocation` if the client selected it for this export (then
    /// `BLOCK_STATUS` is answered).
    pub base_allocation: Option<u32>,
}

/// Why a negotiation ended without an export.
#[derive(Debug)]
pub(crate) enum End {
    /// The client aborted, disconnected, or asked for an export that cannot be served
    /// through `EXPORT_NAME` (which cannot report errors).
    Closed,
    /// The client broke the protocol; the connection is closed.
    Violation(String),
    /// Reading or writing the socket failed.
    Io(io::Error),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            End::Closed
        } else {
            End::Io(e)
        }
    }
}

/// Transmission flags of an export. Read-only exports offer only what they can do (as
/// nbdkit and qemu-nbd do): no FUA, TRIM or WRITE_ZEROES, which would all fail with EPERM.
pub(crate) fn transmission_flags(read_only: bool) -> u16 {
    // CAN_MULTI_CONN is safe: FLUSH commits the whole pool, and all connections share
    // one engine (and its cache).
    let common = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::CAN_MULTI_CONN | tflag::SEND_CACHE;
    if read_only {
        common | tflag::READ_ONLY
    } else {
        common | tflag::SEND_FUA | tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES
    }
}

#[cfg(test)]
#[test]
fn flags_offer_writes_only_on_writable_exports() {
    assert_eq!(transmission_flags(false), 0b101_0110_1101);
    assert_eq!(transmission_flags(true), 0b101_0000_0111);
}

struct Negotiation<'a, R, W> {
    r: &'a mut R,
    w: &'a mut W,
    pool: &'a Pool,
    structured: bool,
    no_zeroes: bool,
    /// The export `base:allocation` was selected for by the last `SET_META_CONTEXT`.
    meta_for: Option<Vec<u8>>,
}

/// Runs the handshake on a fresh connection. Returns the export to serve once the client
/// sends `GO` or `EXPORT_NAME` for an existing device.
pub(crate) async fn negotiate<R, W>(r: &mut R, w: &mut W, pool: &Pool) -> Result<Export, End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_all(&proto::greeting()).await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(End::Violation(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let mut n = Negotiation {
        r,
        w,
        pool,
        structured: false,
        no_zeroes: client_flags & proto::FLAG_C_NO_ZEROES != 0,
        meta_for: None,
    };
    loop {
        if let Some(export) = n.option().await? {
            return Ok(export);
        }
    }
}

impl<R, W> Negotiation<'_, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Reads and answers one option.
    async fn option(&mut self) -> Result<Option<Export>, End> {
        let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
        self.r.read_exact(&mut hdr).await?;
        let Some(h) = OptionHeader::decode(&hdr) else {
            return Err(End::Violation("option without IHAVEOPT magic".into()));
        };
        if h.length > proto::MAX_OPTION_DATA {
            return Err(End::Violation(format!(
                "option {} carries {} bytes, above the limit of {}",
                h.option,
                h.length,
                proto::MAX_OPTION_DATA
            )));
        }
        let mut data = vec![0u8; h.length as usize];
        self.r.read_exact(&mut data).await?;
        match h.option {
            opt::EXPORT_NAME => return self.export_name(&data).await,
            opt::ABORT => {
                // The client may already be gone; it owes us nothing more.
                let _ = self.reply(h.option, rep::ACK, &[]).await;
                return Err(End::Closed);
            }
            opt::LIST if !data.is_empty() => {
                self.error(h.option, rep::ERR_INVALID, "LIST takes no data")
                    .await?
            }
            opt::LIST => {
                let pool = self.pool.clone();
                for d in blocking(move || pool.list_devices()).await? {
                    self.send(h.option, rep::SERVER, &proto::server_entry(&d.name))
                        .await?;
                }
                self.reply(h.option, rep::ACK, &[]).await?;
            }
            opt::INFO | opt::GO => return self.info_or_go(h.option, &data).await,
            opt::STRUCTURED_REPLY if !data.is_empty() => {
                self.error(h.option, rep::ERR_INVALID, "STRUCTURED_REPLY takes no data")
                    .await?
            }
            opt::STRUCTURED_REPLY => {
                self.structured = true;
                self.reply(h.option, rep::ACK, &[]).await?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(h.option, &data).await?
            }
            opt::STARTTLS => {
                self.error(
                    h.option,
                    rep::ERR_UNSUP,
                    "TLS is not offered by this server",
                )
                .await?
            }
            other => {
                let msg = format!("option {other} is not supported");
                self.error(other, rep::ERR_UNSUP, &msg).await?
            }
        }
        Ok(None)
    }

    async fn export_name(&mut self, data: &[u8]) -> Result<Option<Export>, End> {
        let Some((device, size)) = self.open(data).await? else {
            // EXPORT_NAME cannot answer with an error: the spec says close.
            tracing::debug!(
                name = %String::from_utf8_lossy(data),
                "EXPORT_NAME for an unknown export; closing"
            );
            return Err(End::Closed);
        };
        let flags = transmission_flags(device.read_only());
        let reply = proto::export_name_reply(size, flags, self.no_zeroes);
        self.w.write_all(&reply).await?;
        self.w.flush().await?;
        Ok(Some(Export {
            device,
            structured: self.structured,
            base_allocation: self.base_allocation_for(data),
        }))
    }

    /// The context id of `base:allocation` for export `name`, if the client selected it
    /// for that export (a selection made for another export does not carry over).
    fn base_allocation_for(&self, name: &[u8]) -> Option<u32> {
        (self.meta_for.as_deref() == Some(name)).then_some(proto::BASE_ALLOCATION_ID)
    }

    /// `LIST_META_CONTEXT` and `SET_META_CONTEXT`. The one context is `base:allocation`;
    /// a list with no query, or the query `base:`, lists it; a set selects it only by its
    /// full name, and replaces any earlier selection, even when it fails.
    async fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), End> {
        if option == opt::SET_META_CONTEXT {
            // A set replaces the selection even when it fails (the spec).
            self.meta_for = None;
        }
        if !self.structured {
            let msg = "metadata contexts need structured replies: send STRUCTURED_REPLY first";
            self.error(option, rep::ERR_INVALID, msg).await?;
            return Ok(());
        }
        let Some(req) = MetaRequest::decode(data) else {
            let msg = "malformed metadata context data: the lengths do not add up";
            self.error(option, rep::ERR_INVALID, msg).await?;
            return Ok(());
        };
        let name = String::from_utf8_lossy(&req.name).into_owned();
        let valid = std::str::from_utf8(&req.name).is_ok();
        let (pool, n) = (self.pool.clone(), name.clone());
        if !(valid && blocking(move || pool.device_info(&n).is_ok()).await?) {
            self.unknown(option, &name).await?;
            return Ok(());
        }
        let list = option == opt::LIST_META_CONTEXT;
        let wanted = (list && req.queries.is_empty())
            || req
                .queries
                .iter()
                .any(|q| q == proto::BASE_ALLOCATION.as_bytes() || (list && q == b"base:"));
        if !list {
            self.meta_for = wanted.then_some(req.name);
        }
        if wanted {
            let id = if list { 0 } else { proto::BASE_ALLOCATION_ID };
            let ctx = proto::meta_context(id, proto::BASE_ALLOCATION);
            self.send(option, rep::META_CONTEXT, &ctx).await?;
        }
        self.reply(option, rep::ACK, &[]).await?;
        Ok(())
    }

    async fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Option<Export>, End> {
        let Some(req) = InfoRequest::decode(data) else {
            let msg = "malformed INFO/GO data: the name and request lengths do not add up";
            self.error(option, rep::ERR_INVALID, msg).await?;
            return Ok(None);
        };
        if req.name.len() > proto::MAX_STRING {
            self.error(option, rep::ERR_INVALID, "export name too long")
                .await?;
            return Ok(None);
        }
        let name = String::from_utf8_lossy(&req.name).into_owned();
        // GO opens the device (and holds it for the connection); INFO only looks.
        let (size, read_only, device) = if option == opt::GO {
            match self.open(&req.name).await? {
                Some((d, size)) => (size, d.read_only(), Some(d)),
                None => return self.unknown(option, &name).await,
            }
        } else {
            let (pool, n) = (self.pool.clone(), name.clone());
            let valid = std::str::from_utf8(&req.name).is_ok();
            match blocking(move || pool.device_info(&n).ok()).await? {
                Some(i) if valid => (i.size, i.read_only, None),
                _ => return self.unknown(option, &name).await,
            }
        };
        let flags = transmission_flags(read_only);
        self.send(option, rep::INFO, &proto::info_export(size, flags))
            .await?;
        if req.requests.contains(&proto::info::NAME) {
            self.send(option, rep::INFO, &proto::info_name(&name))
                .await?;
        }
        // Always sent: with minimum 1 it constrains nothing, and it tells the maximum.
        self.send(option, rep::INFO, &proto::info_block_size())
            .await?;
        self.reply(option, rep::ACK, &[]).await?;
        Ok(device.map(|device| Export {
            device,
            structured: self.structured,
            base_allocation: self.base_allocation_for(&req.name),
        }))
    }

    async fn unknown(&mut self, option: u32, name: &str) -> Result<Option<Export>, End> {
        let msg = if name.is_empty() {
            "there is no default export: name a device (nbd+unix:///NAME?socket=PATH)".into()
        } else {
            format!("no export named {name:?}; list them with nbdinfo --list")
        };
        self.error(option, rep::ERR_UNKNOWN, &msg).await?;
        Ok(None)
    }

    /// Opens the device named `name` and reads its size, or `None` if there is no such
    /// device (or it cannot be opened).
    async fn open(&self, name: &[u8]) -> Result<Option<(Device, u64)>, End> {
        let Ok(name) = std::str::from_utf8(name) else {
            return Ok(None);
        };
        let (pool, name) = (self.pool.clone(), name.to_string());
        blocking(move || match pool.open_device(&name) {
            Ok(d) => {
                let size = d.size();
                Some((d, size))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!("opening device {name:?} for NBD: {e}");
                None
            }
        })
        .await
    }

    async fn send(&mut self, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
        self.w
            .write_all(&proto::option_reply(option, reply, data))
            .await
    }

    /// Sends a final reply and flushes.
    async fn reply(&mut self, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
        self.send(option, reply, data).await?;
        self.w.flush().await
    }

    async fn error(&mut self, option: u32, reply: u32, message: &str) -> io::Result<()> {
        let mut end = message.len().min(proto::MAX_STRING);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.reply(option, reply, &message.as_bytes()[..end]).await
    }
}

/// Runs an engine call on the blocking pool: the engine's metadata lock can be held for a
/// while by a checkpoint, and the runtime's threads must never wait for it.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, End> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| End::Io(io::Error::other(format!("engine call failed: {e}"))))
}
