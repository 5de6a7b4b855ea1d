//! Codec tests: fixed layouts from the spec, round trips, and random bytes never panic.

use super::*;
use proptest::prelude::*;

#[test]
fn greeting_is_magic_then_fixed_newstyle_and_no_zeroes() {
    let g = greeting();
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(u16::from_be_bytes([g[16], g[17]]), 0b11);
}

#[test]
fn request_layout_matches_the_spec() {
    let raw: [u8; REQUEST_LEN] = [
        0x25, 0x60, 0x95, 0x13, // magic
        0x00, 0x01, // flags: FUA
        0x00, 0x01, // WRITE
        1, 2, 3, 4, 5, 6, 7, 8, // handle
        0, 0, 0, 0, 0, 0, 0x10, 0, // offset 4096
        0, 0, 0x02, 0, // length 512
    ];
    let r = Request::decode(&raw).unwrap();
    assert_eq!(
        r,
        Request {
            flags: cflag::FUA,
            kind: cmd::WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        }
    );
    assert_eq!(r.encode(), raw);
}

#[test]
fn a_request_with_bad_magic_is_refused() {
    let mut raw = Request {
        flags: 0,
        kind: cmd::READ,
        handle: 1,
        offset: 0,
        length: 1,
    }
    .encode();
    raw[0] ^= 1;
    assert_eq!(Request::decode(&raw), None);
}

#[test]
fn option_header_needs_ihaveopt() {
    let h = OptionHeader {
        option: opt::GO,
        length: 9,
    };
    assert_eq!(OptionHeader::decode(&h.encode()), Some(h));
    let mut raw = h.encode();
    raw[3] = b'x';
    assert_eq!(OptionHeader::decode(&raw), None);
}

#[test]
fn info_request_lengths_must_add_up_exactly() {
    let r = InfoRequest {
        name: b"disk".to_vec(),
        requests: vec![info::BLOCK_SIZE, info::NAME],
    };
    let data = r.encode();
    assert_eq!(data.len(), 4 + 4 + 2 + 4);
    assert_eq!(InfoRequest::decode(&data), Some(r));
    // One byte short, one byte too many, a name length past the end.
    assert_eq!(InfoRequest::decode(&data[..data.len() - 1]), None);
    let mut long = data.clone();
    long.push(0);
    assert_eq!(InfoRequest::decode(&long), None);
    let mut bad = data;
    bad[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(InfoRequest::decode(&bad), None);
    assert_eq!(InfoRequest::decode(&[]), None);
}

#[test]
fn info_items_have_their_spec_lengths() {
    assert_eq!(info_export(1 << 30, 0x1ed).len(), 12);
    assert_eq!(info_block_size().len(), 14);
    let bs = info_block_size();
    assert_eq!(&bs[2..6], &1u32.to_be_bytes());
    assert_eq!(&bs[6..10], &4096u32.to_be_bytes());
    assert_eq!(&bs[10..14], &(32u32 << 20).to_be_bytes());
}

#[test]
fn export_name_reply_pads_unless_told_not_to() {
    assert_eq!(export_name_reply(4096, 1, false).len(), 134);
    assert_eq!(export_name_reply(4096, 1, true).len(), 10);
}

#[test]
fn option_reply_layout() {
    let r = option_reply(opt::LIST, rep::SERVER, &server_entry("a"));
    assert_eq!(&r[0..8], &OPT_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&r[8..12], &opt::LIST.to_be_bytes());
    assert_eq!(&r[12..16], &rep::SERVER.to_be_bytes());
    assert_eq!(&r[16..20], &5u32.to_be_bytes());
    assert_eq!(&r[20..], &[0, 0, 0, 1, b'a']);
}

#[test]
fn error_chunk_is_final_and_cuts_long_messages_at_char_boundaries() {
    let msg = "é".repeat(3000); // 6000 bytes
    let c = error_chunk(7, 22, &msg);
    assert_eq!(&c[4..6], &chunk::FLAG_DONE.to_be_bytes());
    assert_eq!(&c[6..8], &chunk::ERROR.to_be_bytes());
    let len = u32::from_be_bytes(c[16..20].try_into().unwrap()) as usize;
    assert_eq!(c.len(), 20 + len);
    let mlen = u16::from_be_bytes([c[24], c[25]]) as usize;
    assert!(mlen <= MAX_STRING);
    assert!(std::str::from_utf8(&c[26..26 + mlen]).is_ok());
}

proptest! {
    #[test]
    fn random_bytes_never_panic_the_decoders(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut req = [0u8; REQUEST_LEN];
        let n = data.len().min(REQUEST_LEN);
        req[..n].copy_from_slice(&data[..n]);
        let _ = Request::decode(&req);
        let mut oh = [0u8; OPTION_HEADER_LEN];
        let n = data.len().min(OPTION_HEADER_LEN);
        oh[..n].copy_from_slice(&data[..n]);
        let _ = OptionHeader::decode(&oh);
        if let Some(r) = InfoRequest::decode(&data) {
            prop_assert_eq!(r.encode(), data);
        }
    }

    #[test]
    fn requests_round_trip(flags: u16, kind: u16, handle: u64, offset: u64, length: u32) {
        let r = Request { flags, kind, handle, offset, length };
        prop_assert_eq!(Request::decode(&r.encode()), Some(r));
    }

    #[test]
    fn info_requests_round_trip(
        name in proptest::collection::vec(any::<u8>(), 0..300),
        requests in proptest::collection::vec(any::<u16>(), 0..20),
    ) {
        let r = InfoRequest { name, requests };
        prop_assert_eq!(InfoRequest::decode(&r.encode()), Some(r));
    }
}

proptest! {
    #[test]
    fn meta_requests_round_trip(
        name in proptest::collection::vec(any::<u8>(), 0..300),
        queries in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8),
    ) {
        let r = MetaRequest { name, queries };
        prop_assert_eq!(MetaRequest::decode(&r.encode()), Some(r));
    }

    /// Arbitrary bytes never panic the decoder, and whatever decodes re-encodes to them.
    #[test]
    fn meta_request_decoding_is_total(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Some(r) = MetaRequest::decode(&data) {
            prop_assert_eq!(r.encode(), data);
        }
    }
}

#[test]
fn meta_requests_with_bad_lengths_are_refused() {
    let good = MetaRequest {
        name: b"disk".to_vec(),
        queries: vec![BASE_ALLOCATION.as_bytes().to_vec()],
    }
    .encode();
    assert!(MetaRequest::decode(&good).is_some());
    assert!(
        MetaRequest::decode(&good[..good.len() - 1]).is_none(),
        "short"
    );
    let mut long = good.clone();
    long.push(0);
    assert!(MetaRequest::decode(&long).is_none(), "trailing byte");
    let mut many = good.clone();
    many[8..12].copy_from_slice(&u32::MAX.to_be_bytes()); // query count
    assert!(
        MetaRequest::decode(&many).is_none(),
        "count beyond the data"
    );
    let huge = MetaRequest {
        name: vec![b'x'; MAX_STRING + 1],
        queries: vec![],
    }
    .encode();
    assert!(
        MetaRequest::decode(&huge).is_none(),
        "name above MAX_STRING"
    );
}
