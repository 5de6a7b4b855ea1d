//! The NBD wire format: magic numbers, option/command/flag values, and the codecs of every
//! message this server reads or writes (all integers big-endian).
//!
//! This module owns the byte layout and nothing else: it is pure (no I/O, no engine), so
//! every decoder can be fed arbitrary bytes in tests. It must never panic on any input;
//! decoders return `None` or an error value for anything malformed and leave the policy
//! (reply with an error or close) to `handshake` and `transmission`.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags the server sends.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server may omit the 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zero padding after `EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options (client → server during the handshake).
pub mod opt {
    /// Enter transmission on the named export; cannot report errors.
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS (unsupported here).
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission on it.
    pub const GO: u32 = 7;
    /// Use structured replies in transmission.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List the metadata contexts that match queries.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts for `BLOCK_STATUS`.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// One export of a `LIST`.
    pub const SERVER: u32 = 2;
    /// One `NBD_INFO_*` item of an `INFO` or `GO`.
    pub const INFO: u32 = 3;
    /// One metadata context of a `LIST_META_CONTEXT` or `SET_META_CONTEXT`.
    pub const META_CONTEXT: u32 = 4;
    /// The option is not known to this server.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// The option is known but refused by policy.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// The option's data is malformed.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// No export of that name.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
}

/// `NBD_INFO_*` item types inside an `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The export's name.
    pub const NAME: u16 = 1;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (per export).
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes are refused.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// The `FUA` command flag is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `FLUSH` and `FUA` on one connection cover all connections.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `CACHE` (prefetch) is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
}

/// Command types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (carries a payload).
    pub const WRITE: u16 = 1;
    /// Disconnect (no reply).
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim (discard).
    pub const TRIM: u16 = 4;
    /// Prefetch a range (advice: no data in the reply).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Which parts of a range are allocated (`base:allocation`).
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Force unit access: durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes must allocate, not punch holes.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Do not fragment a structured read reply.
    pub const DF: u16 = 1 << 2;
    /// `BLOCK_STATUS`: one extent is enough.
    pub const REQ_ONE: u16 = 1 << 3;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// The last chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// No payload (a successful reply with nothing to say).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Extents of a `BLOCK_STATUS` reply.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error with a message.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a client option header (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Largest READ or WRITE payload accepted (and advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE` (the engine's block size).
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest option data accepted during the handshake; more closes the connection.
pub const MAX_OPTION_DATA: u32 = 64 << 10;
/// Longest export name or message the protocol allows.
pub const MAX_STRING: usize = 4096;

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`cflag`).
    pub flags: u16,
    /// Command type (`cmd`); unknown values are kept for the error reply.
    pub kind: u16,
    /// The client's cookie, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (of the payload, for WRITE).
    pub length: u32,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl Request {
    /// Decodes a request header; `None` if the magic is wrong (the stream cannot be parsed).
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if u32_at(b, 0)? != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: u16_at(b, 4)?,
            kind: u16_at(b, 6)?,
            handle: u64_at(b, 8)?,
            offset: u64_at(b, 16)?,
            length: u32_at(b, 24)?,
        })
    }

    /// Encodes the header (clients and tests).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A client option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option (`opt`).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Decodes an option header; `None` if it does not start with `IHAVEOPT`.
    pub fn decode(b: &[u8; OPTION_HEADER_LEN]) -> Option<OptionHeader> {
        if u64_at(b, 0)? != IHAVEOPT {
            return None;
        }
        Some(OptionHeader {
            option: u32_at(b, 8)?,
            length: u32_at(b, 12)?,
        })
    }

    /// Encodes the header (clients and tests).
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// The data of an `INFO` or `GO` option: an export name and the info items requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name as sent (not necessarily UTF-8).
    pub name: Vec<u8>,
    /// `NBD_INFO_*` types the client asked for.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Decodes `u32 name length, name, u16 count, count × u16`; `None` if the lengths do not
    /// add up to exactly `data.len()`.
    pub fn decode(data: &[u8]) -> Option<InfoRequest> {
        let name_len = usize::try_from(u32_at(data, 0)?).ok()?;
        let name_end = 4usize.checked_add(name_len)?;
        let name = data.get(4..name_end)?.to_vec();
        let count = usize::from(u16_at(data, name_end)?);
        let reqs_start = name_end + 2;
        if data.len() != reqs_start.checked_add(count * 2)? {
            return None;
        }
        let requests = (0..count)
            .map(|i| u16_at(data, reqs_start + 2 * i))
            .collect::<Option<Vec<_>>>()?;
        Some(InfoRequest { name, requests })
    }

    /// Encodes the option data (clients and tests).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        v.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        v.extend_from_slice(&self.name);
        v.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }
}

/// The one metadata context this server offers: which extents are allocated.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its context id in transmission (`LIST_META_CONTEXT` replies carry 0, as the spec asks).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// `base:allocation` flags of an extent: not allocated, and reads as zeros.
pub mod state {
    /// Not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeros.
    pub const ZERO: u32 = 1 << 1;
}

/// The data of a `LIST_META_CONTEXT` or `SET_META_CONTEXT` option: an export name and
/// queries (strings naming contexts, or namespaces to list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name as sent (not necessarily UTF-8).
    pub name: Vec<u8>,
    /// The queries as sent.
    pub queries: Vec<Vec<u8>>,
}

impl MetaRequest {
    /// Decodes `u32 name length, name, u32 count, count × (u32 length, query)`; `None` if
    /// the lengths do not add up to exactly `data.len()` or a string exceeds `MAX_STRING`.
    pub fn decode(data: &[u8]) -> Option<MetaRequest> {
        let name_len = usize::try_from(u32_at(data, 0)?).ok()?;
        if name_len > MAX_STRING {
            return None;
        }
        let mut at = 4 + name_len;
        let name = data.get(4..at)?.to_vec();
        let count = u32_at(data, at)?;
        at += 4;
        let mut queries = Vec::new();
        for _ in 0..count {
            let len = usize::try_from(u32_at(data, at)?).ok()?;
            if len > MAX_STRING {
                return None;
            }
            let q = data.get(at + 4..at + 4 + len)?;
            queries.push(q.to_vec());
            at += 4 + len;
        }
        (at == data.len()).then_some(MetaRequest { name, queries })
    }

    /// Encodes the option data (clients and tests).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        v.extend_from_slice(&self.name);
        v.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            v.extend_from_slice(&(q.len() as u32).to_be_bytes());
            v.extend_from_slice(q);
        }
        v
    }
}

/// The data of an `NBD_REP_META_CONTEXT`: context id and name.
pub fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// The payload of a `BLOCK_STATUS` chunk: context id, then (length, flags) per extent.
pub fn block_status_payload(id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + 8 * extents.len());
    v.extend_from_slice(&id.to_be_bytes());
    for (len, flags) in extents {
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
    }
    v
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option reply: header then `data`.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// `NBD_REP_SERVER` data: the name's length and the name.
pub fn server_entry(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// `NBD_INFO_EXPORT` item: size and transmission flags (12 bytes).
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&info::EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// `NBD_INFO_NAME` item.
pub fn info_name(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + name.len());
    v.extend_from_slice(&info::NAME.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// `NBD_INFO_BLOCK_SIZE` item: minimum 1, preferred 4096, maximum `MAX_PAYLOAD` (14 bytes).
pub fn info_block_size() -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&1u32.to_be_bytes());
    v.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
    v.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    v
}

/// The reply to `EXPORT_NAME`: size, flags and, unless the client opted out, 124 zeros.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(134);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        v.resize(v.len() + 124, 0);
    }
    v
}

/// A simple reply header; a successful READ's data follows it.
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header; `length` bytes of payload follow it.
pub fn chunk_header(flags: u16, kind: u16, handle: u64, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk: header, errno, message length, message (cut to
/// `MAX_STRING` bytes at a character boundary).
pub fn error_chunk(handle: u64, errno: u32, message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_STRING);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let len = 6 + msg.len();
    let mut v = Vec::with_capacity(20 + len);
    v.extend_from_slice(&chunk_header(
        chunk::FLAG_DONE,
        chunk::ERROR,
        handle,
        len as u32,
    ));
    v.extend_from_slice(&errno.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

#[cfg(test)]
#[path = "proto_tests.rs"]
mod tests;
