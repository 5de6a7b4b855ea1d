//! Reply encoding, without sockets or devices.

use super::*;
use crate::errors::{EINVAL, EPERM};

async fn encode(
    result: Result<Vec<u8>, (u32, String)>,
    is_read: bool,
    structured: bool,
) -> Vec<u8> {
    let sem = Arc::new(Semaphore::new(1));
    let done = Done {
        handle: 0x55,
        offset: 4096,
        kind: if is_read { cmd::READ } else { cmd::WRITE },
        result,
        _permits: (sem.acquire_owned().await.unwrap(), None),
    };
    let mut out = Vec::new();
    write_reply(&mut out, &done, structured).await.unwrap();
    out
}

#[tokio::test]
async fn simple_replies_carry_read_data_only_on_success() {
    let ok = encode(Ok(vec![7; 3]), true, false).await;
    assert_eq!(&ok[..16], &proto::simple_reply(0, 0x55));
    assert_eq!(&ok[16..], &[7, 7, 7]);
    let err = encode(Err((EINVAL, "bad".into())), true, false).await;
    assert_eq!(err, proto::simple_reply(EINVAL, 0x55));
}

#[tokio::test]
async fn structured_reads_use_offset_data_and_error_chunks() {
    let ok = encode(Ok(vec![1, 2]), true, true).await;
    assert_eq!(
        &ok[..20],
        &proto::chunk_header(chunk::FLAG_DONE, chunk::OFFSET_DATA, 0x55, 10)
    );
    assert_eq!(&ok[20..28], &4096u64.to_be_bytes());
    assert_eq!(&ok[28..], &[1, 2]);
    let empty = encode(Ok(vec![]), true, true).await;
    assert_eq!(
        empty,
        proto::chunk_header(chunk::FLAG_DONE, chunk::NONE, 0x55, 0)
    );
    let err = encode(Err((EPERM, "read-only".into())), false, true).await;
    assert_eq!(err, proto::error_chunk(0x55, EPERM, "read-only"));
    let flushed = encode(Ok(vec![]), false, true).await;
    assert_eq!(flushed, proto::simple_reply(0, 0x55));
}

#[tokio::test]
async fn block_status_replies_are_one_final_block_status_chunk() {
    let sem = Arc::new(Semaphore::new(1));
    let payload = proto::block_status_payload(1, &[(8192, 0), (4096, 3)]);
    let done = Done {
        handle: 0x77,
        offset: 0,
        kind: cmd::BLOCK_STATUS,
        result: Ok(payload.clone()),
        _permits: (sem.acquire_owned().await.unwrap(), None),
    };
    let mut out = Vec::new();
    write_reply(&mut out, &done, true).await.unwrap();
    let h = proto::chunk_header(chunk::FLAG_DONE, chunk::BLOCK_STATUS, 0x77, 20);
    assert_eq!(&out[..20], &h);
    assert_eq!(&out[20..], &payload[..]);
    assert_eq!(&payload[..4], &1u32.to_be_bytes());
    assert_eq!(&payload[4..12], &[0, 0, 0x20, 0, 0, 0, 0, 0]);
    assert_eq!(&payload[12..20], &[0, 0, 0x10, 0, 0, 0, 0, 3]);
}
