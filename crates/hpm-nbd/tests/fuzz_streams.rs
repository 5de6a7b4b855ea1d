//! Random client byte streams, some after a valid negotiation and mixing well-formed
//! requests with garbage, fed straight to `serve_stream`: the connection task must end
//! without panicking, and the device must still be served afterwards.

mod common;

use common::{Served, MIB};
use hpm_nbd::Shutdown;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(b"IHAVEOPT");
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn go(out: &mut Vec<u8>, name: &str) {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    option(out, 7, &d);
}

/// Mostly plausible values, sometimes near the limit, rarely anything at all.
fn number(rng: &mut SmallRng, limit: u64) -> u64 {
    match rng.random_range(0..20) {
        0 => rng.random(),
        1..=4 => limit - rng.random_range(0..limit.min(8192)),
        _ => rng.random_range(0..limit),
    }
}

fn stream(rng: &mut SmallRng) -> Vec<u8> {
    let mut out = Vec::new();
    // 0: garbage from the start; 1: client flags, then garbage; 2, 3: into transmission.
    let negotiated = rng.random_range(0..4);
    if negotiated > 0 {
        out.extend_from_slice(&rng.random_range(0u32..4).to_be_bytes());
    }
    if negotiated > 1 {
        if rng.random_bool(0.5) {
            option(&mut out, 8, &[]);
        }
        go(&mut out, if rng.random_bool(0.95) { "disk" } else { "" });
    }
    for _ in 0..rng.random_range(0..40) {
        if rng.random_bool(0.02) {
            let n = rng.random_range(1..64);
            out.extend((0..n).map(|_| rng.random::<u8>()));
            continue;
        }
        // Mostly commands 0..8 without DISC (2), which ends the stream early.
        let kind: u16 = match rng.random_range(0..50) {
            0 => 2,
            1..=3 => rng.random(),
            _ => [0, 1, 3, 4, 5, 6, 7][rng.random_range(0..7)],
        };
        let flags: u16 = match rng.random_range(0..10) {
            0 => rng.random(),
            1..=3 => rng.random_range(0..4),
            _ => 0,
        };
        let offset = number(rng, 16 * MIB);
        let length = number(rng, 1 << 16) as u32;
        out.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&rng.random::<u64>().to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
        if kind == 1 && length <= 1 << 16 {
            // Usually the whole payload, sometimes cut short (the stream then desyncs).
            let n = if rng.random_bool(0.97) {
                length
            } else {
                rng.random_range(0..=length)
            };
            out.extend(std::iter::repeat_n(0x5a, n as usize));
        }
    }
    out
}

#[test]
fn random_streams_end_their_connection_without_panicking() {
    let s = Served::start(&[("disk", 16 * MIB)]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rng = SmallRng::seed_from_u64(0x6e6264);
    rt.block_on(async {
        for case in 0..300 {
            let bytes = stream(&mut rng);
            let (client, server_end) = tokio::io::duplex(1 << 20);
            let server = s.server.clone();
            let task =
                tokio::spawn(async move { server.serve_stream(server_end, Shutdown::new()).await });
            // Take every reply, so the server runs until it has read the whole stream.
            let (mut from_server, mut to_server) = tokio::io::split(client);
            let drain = tokio::spawn(async move {
                tokio::io::copy(&mut from_server, &mut tokio::io::sink()).await
            });
            let _ = to_server.write_all(&bytes).await;
            // Half-close: the server sees EOF after the last byte.
            let _ = to_server.shutdown().await;
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .unwrap_or_else(|_| panic!("case {case} did not end"))
                .unwrap_or_else(|e| panic!("case {case} panicked: {e}"));
            drop(to_server);
            let _ = drain.await;
        }
    });
    let stats = s.server.stats();
    assert!(stats.requests > 1000 && stats.errors > 100, "{stats:?}");
    assert!(stats.protocol_errors > 10, "{stats:?}");
    assert_eq!(stats.connections_open, 0);
    // Still served, and the data the fuzzer wrote reads back consistently over NBD.
    if common::have("qemu-io") {
        common::qemu_io(
            &s.uri("disk"),
            &[],
            &["write -P 0x42 0 64k", "read -P 0x42 0 64k"],
        );
    }
}
