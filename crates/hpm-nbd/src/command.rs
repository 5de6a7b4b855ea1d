//! What each command does to the device: validation against the export (range, flags,
//! read-only) and the blocking device call.
//!
//! This module owns the meaning of READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE and
//! BLOCK_STATUS in engine terms. It is synchronous and knows nothing of sockets; `prepare`
//! must never touch the device and `execute` must never be called on the async runtime's
//! threads.

use crate::errors::{Failure, Op};
use crate::proto::{self, cflag, cmd, Request};
use hpm_engine::Device;

/// Zeros written per call when WRITE_ZEROES must allocate (`NO_HOLE`).
const ZERO_PIECE: usize = 1 << 20;

/// Most extents in one BLOCK_STATUS reply (32 KiB of descriptors); a request whose range
/// needs more is answered for a prefix, which the spec allows (the client asks again from
/// where the reply ends).
pub(crate) const MAX_EXTENTS: usize = 4096;

/// Most bytes one CACHE request prefetches (the rest of a longer range is let be: CACHE is
/// advice), read `ZERO_PIECE` at a time.
const MAX_PREFETCH: u32 = proto::MAX_PAYLOAD;

/// A validated request, ready for the device.
#[derive(Debug)]
pub(crate) enum Work {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
    },
    Status {
        offset: u64,
        length: u32,
        one: bool,
        id: u32,
    },
    Cache {
        offset: u64,
        length: u32,
    },
}

pub(crate) fn op_of(kind: u16) -> Op {
    match kind {
        cmd::READ => Op::Read,
        cmd::WRITE | cmd::WRITE_ZEROES => Op::Write,
        cmd::TRIM => Op::Trim,
        cmd::FLUSH => Op::Flush,
        _ => Op::Other,
    }
}

/// Checks a request against the export and turns it into work. `payload` is the WRITE data;
/// `base_allocation` the context id of `base:allocation` if the client selected it.
pub(crate) fn prepare(
    req: &Request,
    size: u64,
    read_only: bool,
    payload: Vec<u8>,
    base_allocation: Option<u32>,
) -> Result<Work, Failure> {
    let allowed = match req.kind {
        // DF is harmless: a READ reply is never fragmented.
        cmd::READ => cflag::FUA | cflag::DF,
        cmd::WRITE | cmd::FLUSH | cmd::TRIM => cflag::FUA,
        cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE,
        // FUA is valid on every command (and means nothing here).
        cmd::BLOCK_STATUS => cflag::FUA | cflag::REQ_ONE,
        cmd::CACHE => cflag::FUA,
        other => return Err(Failure::UnknownCommand(other)),
    };
    if req.flags & !allowed != 0 {
        return Err(Failure::BadFlags(req.flags));
    }
    let fua = req.flags & cflag::FUA != 0;
    let (offset, length) = (req.offset, req.length);
    if req.kind == cmd::FLUSH {
        return Ok(Work::Flush);
    }
    // Refused for want of a context before any range check, as for an unknown command.
    let status_id = match req.kind {
        cmd::BLOCK_STATUS => {
            let id = base_allocation.ok_or(Failure::NoMetaContext)?;
            if length == 0 {
                return Err(Failure::Empty);
            }
            id
        }
        _ => 0,
    };
    if !matches!(req.kind, cmd::READ | cmd::BLOCK_STATUS | cmd::CACHE) && read_only {
        return Err(Failure::ReadOnly);
    }
    if req.kind == cmd::READ && length > proto::MAX_PAYLOAD {
        return Err(Failure::TooLarge(length));
    }
    if offset
        .checked_add(u64::from(length))
        .is_none_or(|end| end > size)
    {
        return Err(Failure::PastEnd {
            offset,
            length: u64::from(length),
            size,
        });
    }
    Ok(match req.kind {
        cmd::READ => Work::Read { offset, length },
        cmd::WRITE => Work::Write {
            offset,
            data: payload,
            fua,
        },
        cmd::TRIM => Work::Trim {
            offset,
            length,
            fua,
        },
        cmd::CACHE => Work::Cache { offset, length },
        cmd::BLOCK_STATUS => Work::Status {
            offset,
            length,
            one: req.flags & cflag::REQ_ONE != 0,
            id: status_id,
        },
        _ => Work::Zeroes {
            offset,
            length,
            fua,
            no_hole: req.flags & cflag::NO_HOLE != 0,
        },
    })
}

/// Does the device I/O of one request (blocking).
pub(crate) fn execute(dev: &Device, work: Work) -> Result<Vec<u8>, Failure> {
    let fua = match work {
        Work::Read { offset, length } => {
            let mut buf = vec![0u8; length as usize];
            dev.read_at(&mut buf, offset).map_err(Failure::Engine)?;
            return Ok(buf);
        }
        Work::Write { offset, data, fua } => {
            dev.write_at(&data, offset).map_err(Failure::Engine)?;
            fua
        }
        Work::Flush => true,
        Work::Cache { offset, length } => {
            // Read and let go: the blocks several devices share land in the pool's cache,
            // the others in the host page cache of the data file.
            let mut buf = vec![0u8; ZERO_PIECE.min(length as usize)];
            let end = offset + u64::from(length.min(MAX_PREFETCH));
            let mut at = offset;
            while at < end {
                let n = (end - at).min(buf.len() as u64) as usize;
                dev.read_at(&mut buf[..n], at).map_err(Failure::Engine)?;
                at += n as u64;
            }
            return Ok(Vec::new());
        }
        Work::Status {
            offset,
            length,
            one,
            id,
        } => {
            let max = if one { 1 } else { MAX_EXTENTS };
            let extents = dev
                .allocation(offset, u64::from(length), max)
                .map_err(Failure::Engine)?;
            let descriptors: Vec<(u32, u32)> = extents
                .iter()
                .map(|&(len, mapped)| {
                    let flags = if mapped {
                        0
                    } else {
                        proto::state::HOLE | proto::state::ZERO
                    };
                    // Within the request's own u32 length.
                    (len as u32, flags)
                })
                .collect();
            return Ok(proto::block_status_payload(id, &descriptors));
        }
        Work::Trim {
            offset,
            length,
            fua,
        } => {
            dev.discard(offset, u64::from(length))
                .map_err(Failure::Engine)?;
            fua
        }
        Work::Zeroes {
            offset,
            length,
            fua,
            no_hole,
        } => {
            if no_hole {
                // The client wants the range allocated: write real zeros, piece by piece.
                let zeros = vec![0u8; ZERO_PIECE.min(length as usize)];
                let end = offset + u64::from(length);
                let mut at = offset;
                while at < end {
                    let n = (end - at).min(zeros.len() as u64) as usize;
                    dev.write_at(&zeros[..n], at).map_err(Failure::Engine)?;
                    at += n as u64;
                }
            } else {
                dev.write_zeroes(offset, u64::from(length))
                    .map_err(Failure::Engine)?;
            }
            fua
        }
    };
    if fua {
        dev.flush().map_err(Failure::Engine)?;
    }
    Ok(Vec::new())
}

#[cfg(test)]
#[path = "command_tests.rs"]
mod tests;
