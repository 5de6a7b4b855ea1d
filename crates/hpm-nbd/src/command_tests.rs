//! Request validation, without sockets or devices.

use super::*;
use crate::errors::{nbd_errno, EINVAL, ENOSPC, EPERM};

fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
    Request {
        flags,
        kind,
        handle: 9,
        offset,
        length,
    }
}

fn errno_of(r: &Request, size: u64, read_only: bool) -> Option<u32> {
    errno_with(r, size, read_only, None)
}

fn errno_with(r: &Request, size: u64, read_only: bool, meta: Option<u32>) -> Option<u32> {
    prepare(r, size, read_only, vec![0; r.length as usize], meta)
        .err()
        .map(|f| nbd_errno(op_of(r.kind), &f))
}

#[test]
fn requests_are_checked_against_the_export() {
    const S: u64 = 1 << 20;
    let table: &[(Request, bool, Option<u32>)] = &[
        (req(cmd::READ, 0, 0, 4096), false, None),
        (req(cmd::READ, cflag::DF | cflag::FUA, S - 1, 1), true, None),
        (req(cmd::READ, 0, S - 1, 2), false, Some(EINVAL)),
        (req(cmd::READ, 0, u64::MAX, 1), false, Some(EINVAL)),
        (
            req(cmd::READ, 0, 0, proto::MAX_PAYLOAD + 1),
            false,
            Some(EINVAL),
        ),
        (req(cmd::READ, cflag::NO_HOLE, 0, 1), false, Some(EINVAL)),
        (req(cmd::WRITE, cflag::FUA, 0, 512), false, None),
        (req(cmd::WRITE, 0, S, 1), false, Some(ENOSPC)),
        (req(cmd::WRITE, 0, 0, 1), true, Some(EPERM)),
        (req(cmd::WRITE, 1 << 15, 0, 1), false, Some(EINVAL)),
        (req(cmd::TRIM, 0, 0, S as u32), false, None),
        (req(cmd::TRIM, 0, 0, u32::MAX), false, Some(EINVAL)),
        (req(cmd::TRIM, 0, 0, 4096), true, Some(EPERM)),
        (
            req(cmd::WRITE_ZEROES, cflag::NO_HOLE | cflag::FUA, 0, 8),
            false,
            None,
        ),
        (req(cmd::WRITE_ZEROES, 0, 0, u32::MAX), false, Some(ENOSPC)),
        (req(cmd::WRITE_ZEROES, 0, 0, 1), true, Some(EPERM)),
        (req(cmd::FLUSH, 0, 0, 0), true, None),
        (req(cmd::CACHE, 0, 0, 4096), true, None),
        (req(cmd::CACHE, cflag::FUA, S - 1, 1), false, None),
        (req(cmd::CACHE, 0, S - 1, 2), false, Some(EINVAL)),
        (req(cmd::CACHE, cflag::DF, 0, 1), false, Some(EINVAL)),
        (req(7, 0, 0, 4096), false, Some(EINVAL)), // BLOCK_STATUS: no context selected
        (req(0xffff, 0, 0, 0), false, Some(EINVAL)),
    ];
    for (r, ro, want) in table {
        assert_eq!(errno_of(r, S, *ro), *want, "{r:?} read_only={ro}");
    }
}

#[test]
fn block_status_needs_its_context_and_a_range_within_the_export() {
    const S: u64 = 1 << 20;
    let meta = Some(proto::BASE_ALLOCATION_ID);
    let table: &[(Request, bool, Option<u32>)] = &[
        (req(cmd::BLOCK_STATUS, 0, 0, S as u32), false, None),
        (req(cmd::BLOCK_STATUS, cflag::REQ_ONE, 4096, 1), true, None),
        (req(cmd::BLOCK_STATUS, cflag::FUA, 0, 512), false, None),
        (req(cmd::BLOCK_STATUS, 0, 0, 0), false, Some(EINVAL)),
        (req(cmd::BLOCK_STATUS, 0, S - 1, 2), false, Some(EINVAL)),
        (
            req(cmd::BLOCK_STATUS, cflag::DF, 0, 512),
            false,
            Some(EINVAL),
        ),
    ];
    for (r, ro, want) in table {
        assert_eq!(errno_with(r, S, *ro, meta), *want, "{r:?} read_only={ro}");
    }
    match prepare(
        &req(cmd::BLOCK_STATUS, cflag::REQ_ONE, 8, 100),
        S,
        true,
        Vec::new(),
        meta,
    ) {
        Ok(Work::Status {
            offset: 8,
            length: 100,
            one: true,
            id,
        }) => assert_eq!(id, proto::BASE_ALLOCATION_ID),
        other => panic!("{other:?}"),
    }
}
