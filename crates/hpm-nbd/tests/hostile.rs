//! Malformed and hostile input over raw Unix sockets, while qemu-io keeps working on
//! another connection: every case gets an error reply or a closed connection, never a
//! crash, and the server goes on serving.

mod common;

use common::raw::*;
use common::{have, qemu_io, Served, MIB};
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 16 * MIB;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// Runs qemu-io sessions on `name` in a loop until `stop`; returns how many succeeded.
fn background_client(
    s: &Served,
    name: &str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    let uri = s.uri(name);
    std::thread::spawn(move || {
        let mut n = 0u32;
        while !stop.load(Ordering::Relaxed) || n == 0 {
            let p = format!("0x{:02x}", 0x10 + n % 200);
            qemu_io(
                &uri,
                &[],
                &[
                    &format!("write -P {p} 0 1M"),
                    &format!("aio_write -P {p} 1M 256k"),
                    "aio_flush",
                    &format!("read -P {p} 0 1280k"),
                ],
            );
            n += 1;
        }
        n
    })
}

fn handshake_abuse(s: &Served) {
    // Unknown client flags: close.
    let mut c = Raw::connect(&s.socket);
    c.send(&0x8000_0001u32.to_be_bytes());
    assert!(c.closed(), "unknown client flags");
    // An option without IHAVEOPT: close.
    let mut c = Raw::start(&s.socket, false);
    c.send(b"IHAVEOPX\0\0\0\x03\0\0\0\0");
    assert!(c.closed(), "bad option magic");
    // Unknown options and STARTTLS are ERR_UNSUP; bad data ERR_INVALID; no export
    // ERR_UNKNOWN; the negotiation goes on after each.
    let mut c = Raw::start(&s.socket, false);
    c.option(99, b"xyz");
    assert_eq!(c.option_reply().1, REP_ERR_UNSUP);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.option_reply().1, REP_ERR_UNSUP);
    c.option(OPT_LIST, b"junk");
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.option(OPT_INFO, &[0, 0, 0, 200, b'd']);
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.option(OPT_GO, &Raw::info_data("nope", &[]));
    let (_, kind, msg) = c.option_reply();
    assert_eq!(kind, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("nope"));
    c.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (_, kind, data) = c.option_reply();
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_SERVER);
        let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
    }
    assert_eq!(names, ["busy", "disk"]);
    // INFO answers EXPORT, NAME (asked for) and BLOCK_SIZE, then ACK, and stays in options.
    c.option(OPT_INFO, &Raw::info_data("disk", &[1, 3]));
    let mut items = Vec::new();
    loop {
        let (opt, kind, data) = c.option_reply();
        assert_eq!(opt, OPT_INFO);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_INFO);
        items.push(data);
    }
    assert!(items
        .iter()
        .any(|d| d[..2] == [0, 0] && d[2..10] == SIZE.to_be_bytes()));
    assert!(items.iter().any(|d| d[..2] == [0, 1] && &d[2..] == b"disk"));
    let bs = items.iter().find(|d| d[..2] == [0, 3]).expect("BLOCK_SIZE");
    assert_eq!(&bs[2..], &[0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
    // Option data above the limit: close without reading it all.
    c.send(b"IHAVEOPT\0\0\0\x07\0\x10\0\0");
    assert!(c.closed(), "oversized option");
    // ABORT is acknowledged, then the server closes.
    let mut c = Raw::start(&s.socket, false);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    assert!(c.closed());
    // EXPORT_NAME cannot report errors: unknown export closes; a known one is served with
    // the 124 zero bytes (no NO_ZEROES here).
    let mut c = Raw::start(&s.socket, false);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed(), "EXPORT_NAME of a missing export");
    let mut c = Raw::start(&s.socket, false);
    c.option(OPT_EXPORT_NAME, b"disk");
    let reply = c.bytes(134);
    assert_eq!(&reply[..8], &SIZE.to_be_bytes());
    assert!(reply[10..].iter().all(|&b| b == 0));
    c.request(0, CMD_READ, 1, 0, 8);
    assert_eq!(c.simple_reply(), (0, 1));
    c.bytes(8);
    // Hanging up mid-option.
    let mut c = Raw::start(&s.socket, false);
    c.send(b"IHAVEOPT\0\0\0\x07");
}

fn transmission_abuse(s: &Served) {
    let mut c = Raw::start(&s.socket, true);
    assert_eq!(c.go("disk").0, SIZE);
    let mut h = 100;
    let mut expect =
        |c: &mut Raw, flags: u16, kind: u16, off: u64, len: u32, payload: usize, errno: u32| {
            h += 1;
            c.request(flags, kind, h, off, len);
            c.send(&vec![0x77; payload]);
            assert_eq!(
                c.simple_reply(),
                (errno, h),
                "cmd {kind} flags {flags:#x} at {off}+{len}"
            );
        };
    expect(&mut c, 0, 42, 0, 0, 0, EINVAL); // unknown command
    expect(&mut c, 0, 5, 0, 4096, 0, 0); // CACHE: advice, done
    expect(&mut c, 0, 5, SIZE, 1, 0, EINVAL); // CACHE past the end
    expect(&mut c, 0, 8, 0, 4096, 0, EINVAL); // RESIZE: not offered
    expect(&mut c, 0, CMD_READ, SIZE - 4096, 8192, 0, EINVAL); // read past the end
    expect(&mut c, 0, CMD_READ, u64::MAX - 10, 100, 0, EINVAL); // offset overflow
    expect(&mut c, 0, CMD_READ, 0, 64 << 20, 0, EINVAL); // above the maximum payload
    expect(&mut c, 0, CMD_WRITE, SIZE, 512, 512, ENOSPC); // write past the end
    expect(&mut c, 0x8000, CMD_WRITE, 0, 512, 512, EINVAL); // unknown flag, payload skipped
    expect(&mut c, 0, CMD_TRIM, 0, u32::MAX, 0, EINVAL); // trim past the end: no disconnect
    expect(&mut c, 0, CMD_WRITE_ZEROES, 4096, u32::MAX, 0, ENOSPC);
    expect(&mut c, 0, CMD_TRIM, 0, SIZE as u32, 0, 0); // a whole-device trim is fine
    expect(&mut c, 1 << 4, CMD_WRITE_ZEROES, 0, 4096, 0, EINVAL); // FAST_ZERO: not offered
                                                                  // Still in step: a write and a read of it.
    expect(&mut c, 1, CMD_WRITE, 8192, 4096, 4096, 0);
    c.request(0, CMD_READ, 7, 8190, 6);
    assert_eq!(c.simple_reply(), (0, 7));
    assert_eq!(c.bytes(6), [0, 0, 0x77, 0x77, 0x77, 0x77]);
    expect(&mut c, 0, CMD_FLUSH, 0, 0, 0, 0);
    // A WRITE whose payload is above the maximum cannot be skipped: close.
    c.request(0, CMD_WRITE, 8, 0, 64 << 20);
    assert!(c.closed(), "oversized WRITE");

    // Bad request magic: close.
    let mut c = Raw::start(&s.socket, true);
    c.go("disk");
    c.send(&[0xde; 28]);
    assert!(c.closed(), "bad request magic");
}

fn structured_replies(s: &Served) {
    let mut c = Raw::start(&s.socket, true);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    c.go("disk");
    c.request(0, CMD_READ, 1, 8192, 16);
    let (flags, kind, handle, data) = c.chunk();
    assert_eq!((flags, kind, handle), (1, 1, 1), "OFFSET_DATA, DONE");
    assert_eq!(&data[..8], &8192u64.to_be_bytes());
    assert_eq!(data.len(), 8 + 16);
    c.request(0, CMD_READ, 2, SIZE, 1);
    let (flags, kind, handle, data) = c.chunk();
    assert_eq!((flags, kind, handle), (1, 0x8001, 2), "ERROR, DONE");
    assert_eq!(&data[..4], &EINVAL.to_be_bytes());
    let mlen = u16::from_be_bytes([data[4], data[5]]) as usize;
    assert!(String::from_utf8_lossy(&data[6..6 + mlen]).contains("past the end"));
    c.request(0, CMD_READ, 3, 0, 0);
    assert_eq!(c.chunk().1, 0, "empty READ: NONE chunk");
    c.request(0, CMD_FLUSH, 4, 0, 0);
    assert_eq!(c.simple_reply(), (0, 4));
    // CACHE: advice, answered without data; past the end, EINVAL.
    c.request(0, CMD_CACHE, 6, 0, 1 << 20);
    assert_eq!(c.simple_reply(), (0, 6));
    c.request(0, CMD_CACHE, 7, SIZE - 1, 2);
    let (_, kind, handle, data) = c.chunk();
    assert_eq!((kind, handle), (0x8001, 7));
    assert_eq!(&data[..4], &EINVAL.to_be_bytes());
    c.request(0, CMD_DISC, 5, 0, 0);
    assert!(c.closed());
}

/// Metadata contexts: refused before structured replies, for unknown exports and with
/// malformed data; listed and selected as `base:allocation`; BLOCK_STATUS answered with one
/// final BLOCK_STATUS chunk on the export it was selected for, and refused (EINVAL) on
/// another, or for nothing.
fn meta_contexts(s: &Served) {
    let meta = |c: &mut Raw, opt: u32, name: &str, q: &[&str]| -> Vec<(u32, Vec<u8>)> {
        c.option(opt, &Raw::meta_data(name, q));
        let mut replies = Vec::new();
        loop {
            let (o, kind, data) = c.option_reply();
            assert_eq!(o, opt);
            let last = kind != REP_META_CONTEXT;
            replies.push((kind, data));
            if last {
                return replies;
            }
        }
    };
    let ctx = |id: u32| {
        let mut v = id.to_be_bytes().to_vec();
        v.extend_from_slice(b"base:allocation");
        (REP_META_CONTEXT, v)
    };
    let ack = (REP_ACK, Vec::new());
    let mut c = Raw::start(&s.socket, true);
    let r = meta(&mut c, OPT_SET_META_CONTEXT, "disk", &["base:allocation"]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, REP_ERR_INVALID, "before STRUCTURED_REPLY");
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    assert_eq!(
        meta(&mut c, OPT_LIST_META_CONTEXT, "disk", &[]),
        vec![ctx(0), ack.clone()]
    );
    assert_eq!(
        meta(&mut c, OPT_LIST_META_CONTEXT, "disk", &["base:"]),
        vec![ctx(0), ack.clone()]
    );
    assert_eq!(
        meta(&mut c, OPT_LIST_META_CONTEXT, "disk", &["x-other:thing"]),
        vec![ack.clone()]
    );
    assert_eq!(
        meta(&mut c, OPT_SET_META_CONTEXT, "nope", &["base:allocation"])[0].0,
        REP_ERR_UNKNOWN
    );
    let mut bad = Raw::meta_data("disk", &["base:allocation"]);
    bad.pop();
    c.option(OPT_SET_META_CONTEXT, &bad);
    assert_eq!(c.option_reply().1, REP_ERR_INVALID, "truncated data");
    assert_eq!(
        meta(&mut c, OPT_SET_META_CONTEXT, "disk", &["base:allocation"]),
        vec![ctx(1), ack.clone()]
    );
    c.go("disk");
    c.request(0, CMD_BLOCK_STATUS, 8, 0, SIZE as u32);
    let (flags, kind, handle, full) = c.chunk();
    assert_eq!((flags, kind, handle), (1, 5, 8), "BLOCK_STATUS, DONE");
    assert_eq!(
        &full[..4],
        &1u32.to_be_bytes(),
        "the id SET_META_CONTEXT gave"
    );
    let total: u64 = full[4..]
        .chunks(8)
        .map(|d| u64::from(u32::from_be_bytes(d[..4].try_into().unwrap())))
        .sum();
    assert_eq!(total, SIZE, "descriptors cover the request");
    c.request(FLAG_REQ_ONE, CMD_BLOCK_STATUS, 7, 0, SIZE as u32);
    let (flags, kind, handle, one) = c.chunk();
    assert_eq!((flags, kind, handle), (1, 5, 7));
    assert_eq!(
        one,
        full[..12].to_vec(),
        "REQ_ONE: the first descriptor alone"
    );
    for (len, handle) in [(0u32, 9u64), (2, 10)] {
        let off = if len == 0 { 0 } else { SIZE - 1 };
        c.request(0, CMD_BLOCK_STATUS, handle, off, len);
        let (_, kind, h, data) = c.chunk();
        assert_eq!((kind, h), (0x8001, handle), "empty or past the end: ERROR");
        assert_eq!(&data[..4], &EINVAL.to_be_bytes());
    }
    c.request(0, CMD_DISC, 11, 0, 0);
    assert!(c.closed());
    // Selected for `disk`, then `between` runs, then GO to `export`: BLOCK_STATUS must be
    // refused there (nothing selected for it).
    let refused = |between: &dyn Fn(&mut Raw), export: &str| {
        let mut c = Raw::start(&s.socket, true);
        c.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(c.option_reply().1, REP_ACK);
        meta(&mut c, OPT_SET_META_CONTEXT, "disk", &["base:allocation"]);
        between(&mut c);
        c.go(export);
        c.request(0, CMD_BLOCK_STATUS, 1, 0, 4096);
        let (_, kind, _, data) = c.chunk();
        assert_eq!(kind, 0x8001, "BLOCK_STATUS on {export:?} refused");
        assert_eq!(&data[..4], &EINVAL.to_be_bytes());
        c.request(0, CMD_DISC, 2, 0, 0);
        assert!(c.closed());
    };
    // Selected for one export, used on another: not negotiated there.
    refused(&|_| {}, "busy");
    // A failed SET_META_CONTEXT still replaces the selection: nothing is selected.
    refused(
        &|c| {
            let mut bad = Raw::meta_data("disk", &["base:allocation"]);
            bad.push(0);
            c.option(OPT_SET_META_CONTEXT, &bad);
            assert_eq!(c.option_reply().1, REP_ERR_INVALID, "a trailing byte");
        },
        "disk",
    );
}

fn hang_ups(s: &Served) {
    // Mid-payload.
    let mut c = Raw::start(&s.socket, true);
    c.go("disk");
    c.request(0, CMD_WRITE, 1, 0, 1 << 20);
    c.send(&[1; 1000]);
    drop(c);
    // With many large requests in flight and replies never read.
    let mut c = Raw::start(&s.socket, true);
    c.go("disk");
    for h in 0..200 {
        c.request(0, CMD_READ, h, 0, 1 << 20);
    }
    drop(c);
    // Random bytes, before and after a valid negotiation.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    for i in 0..40 {
        let junk: Vec<u8> = (0..rng.random_range(1..600))
            .map(|_| rng.random())
            .collect();
        let mut c = if i % 2 == 0 {
            Raw::connect(&s.socket)
        } else {
            let mut c = Raw::start(&s.socket, true);
            c.go("disk");
            c
        };
        let _ = c.s.write_all(&junk);
    }
}

#[test]
fn malformed_input_gets_errors_or_a_close_while_others_carry_on() {
    if !have("qemu-io") {
        return;
    }
    let mut s = Served::start(&[("disk", SIZE), ("busy", SIZE)]);
    let stop = Arc::new(AtomicBool::new(false));
    let bg = background_client(&s, "busy", stop.clone());
    handshake_abuse(&s);
    transmission_abuse(&s);
    structured_replies(&s);
    meta_contexts(&s);
    hang_ups(&s);
    stop.store(true, Ordering::Relaxed);
    let sessions = bg
        .join()
        .expect("qemu-io on another connection failed meanwhile");
    assert!(sessions >= 1);
    // Every hostile connection is gone soon, and the server still serves.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.server.stats().connections_open > 0 {
        assert!(
            Instant::now() < deadline,
            "connections left open: {:?}",
            s.server.stats()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    qemu_io(
        &s.uri("disk"),
        &[],
        &["write -P 0x99 0 64k", "read -P 0x99 0 64k"],
    );
    let stats = s.stop();
    assert!(stats.protocol_errors >= 6, "{stats:?}");
    assert!(stats.errors >= 11, "{stats:?}");
    assert_eq!(stats.connections_open, 0);
}

#[test]
fn read_only_exports_answer_eperm_to_every_write_type_command() {
    let s = Served::start(&[("disk", SIZE)]);
    s.pool.snapshot("disk", "layer", true).unwrap();
    let mut c = Raw::start(&s.socket, true);
    let (_, flags) = c.go("layer");
    assert_eq!(
        flags & 0b0110_1000,
        0,
        "no FUA, TRIM or WRITE_ZEROES offered"
    );
    for (h, (kind, payload)) in [(CMD_WRITE, 4096), (CMD_TRIM, 0), (CMD_WRITE_ZEROES, 0)]
        .into_iter()
        .enumerate()
    {
        c.request(0, kind, h as u64, 0, 4096);
        c.send(&vec![0; payload]);
        assert_eq!(c.simple_reply(), (EPERM, h as u64));
    }
    c.request(0, CMD_FLUSH, 9, 0, 0);
    assert_eq!(c.simple_reply(), (0, 9));
}

#[test]
fn shutdown_cuts_off_a_client_that_does_not_read_its_replies() {
    let mut s = Served::start(&[("disk", SIZE)]);
    let mut c = Raw::start(&s.socket, true);
    c.go("disk");
    for h in 0..200 {
        c.request(0, CMD_READ, h, 0, 1 << 20);
    }
    // Wait until the server is stuck: it reads no more requests, because the in-flight limit
    // is reached or (if the first request arrived alone and ran in place) because its reader
    // is blocked sending a reply nobody takes.
    let mut seen = (0, Instant::now());
    loop {
        let n = s.server.stats().requests;
        if n != seen.0 {
            seen = (n, Instant::now());
        } else if n > 0 && seen.1.elapsed() > Duration::from_millis(300) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Neither reading nor closing: shutdown must still finish (after its grace period).
    let stats = s.stop();
    assert_eq!(stats.connections_open, 0);
    drop(c);
}

/// One request alone in its connection runs in place and the reader sends its reply
/// itself; a client that does not take that reply must not hold up shutdown either.
#[test]
fn shutdown_cuts_off_a_client_that_does_not_read_a_reply_sent_in_place() {
    let mut s = Served::start(&[("disk", SIZE)]);
    let mut c = Raw::start(&s.socket, true);
    c.go("disk");
    // Larger than any socket buffer, so the send blocks until shutdown gives up on it.
    c.request(0, CMD_READ, 1, 0, 8 << 20);
    while s.server.stats().requests < 1 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = s.stop();
    assert_eq!(stats.connections_open, 0);
    drop(c);
}

/// Reads from `s` until the server closes it; panics if it does not within 10 s.
fn closed_by_server(s: &mut std::os::unix::net::UnixStream) {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the server kept the connection: {e}"),
        }
    }
}

#[test]
fn slow_handshakes_and_connections_past_the_limit_are_cut_off() {
    let limits = hpm_nbd::Limits {
        // Long enough for a handshake on a loaded machine, short for a test.
        handshake: Duration::from_secs(2),
        connections: 3,
    };
    let mut s = Served::start_with(&[("disk", SIZE)], limits);
    // A client that connects and never chooses an export is disconnected.
    let mut idle = Raw::connect(&s.socket);
    closed_by_server(&mut idle.s);
    // Three clients in transmission hold every connection; a fourth is closed at once,
    // without a greeting, however long it waits.
    let mut held: Vec<Raw> = (0..3)
        .map(|_| {
            let mut c = Raw::start(&s.socket, true);
            c.go("disk");
            c
        })
        .collect();
    let mut extra = std::os::unix::net::UnixStream::connect(&s.socket).unwrap();
    closed_by_server(&mut extra);
    // The held ones still work, past the handshake limit.
    std::thread::sleep(Duration::from_millis(2500));
    for (h, c) in held.iter_mut().enumerate() {
        c.request(0, CMD_READ, h as u64, 0, 4096);
        let (error, handle) = c.simple_reply();
        assert_eq!((error, handle), (0, h as u64));
        c.bytes(4096);
    }
    // Once one ends, a new client is served again.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.server.stats().connections_open > 2 {
        assert!(Instant::now() < deadline, "{:?}", s.server.stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut again = Raw::start(&s.socket, true);
    again.go("disk");
    drop((again, held));
    let stats = s.stop();
    assert!(stats.protocol_errors >= 1, "{stats:?}");
}
