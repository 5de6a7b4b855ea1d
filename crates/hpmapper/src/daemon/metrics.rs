//! `--metrics ADDR`: the daemon's counters in Prometheus text format over plain HTTP
//! (`GET /metrics`). Off by default; a bare port binds loopback.

use super::Daemon;
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The counters as Prometheus text.
pub fn render(d: &Daemon) -> String {
    let mut s = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = writeln!(
            s,
            "# HELP hpmapper_{name} {help}\n# TYPE hpmapper_{name} {kind}\nhpmapper_{name} {v}"
        );
    };
    let e = d.pool().stats();
    let c = d.pool().cache_stats();
    metric("reads_total", "counter", "Device read requests.", e.reads);
    metric(
        "read_bytes_total",
        "counter",
        "Bytes read by devices.",
        e.read_bytes,
    );
    metric(
        "writes_total",
        "counter",
        "Device write requests.",
        e.writes,
    );
    metric(
        "write_bytes_total",
        "counter",
        "Bytes written by devices.",
        e.write_bytes,
    );
    metric(
        "backend_read_bytes_total",
        "counter",
        "Bytes read from the data store.",
        e.backend_read_bytes,
    );
    metric(
        "backend_write_bytes_total",
        "counter",
        "Bytes written to the data store.",
        e.backend_write_bytes,
    );
    metric(
        "cow_blocks_total",
        "counter",
        "Blocks copied on write.",
        e.cow_blocks,
    );
    metric(
        "cow_copied_bytes_total",
        "counter",
        "Bytes copied from shared blocks by copy-on-write.",
        e.cow_copied_bytes,
    );
    metric("commits_total", "counter", "Journal commits.", e.commits);
    metric(
        "cache_hits_total",
        "counter",
        "Block reads served by the cache.",
        c.hits,
    );
    metric(
        "cache_misses_total",
        "counter",
        "Block reads that went to the data store.",
        c.misses,
    );
    metric(
        "cache_intercepted_total",
        "counter",
        "Block reads that joined a read already in flight.",
        c.coalesced,
    );
    metric(
        "cache_bytes",
        "gauge",
        "Bytes held by the block cache.",
        c.cached_bytes,
    );
    metric(
        "cache_per_device_bytes",
        "gauge",
        "Bytes per-device caches would hold for the same reads.",
        c.per_device_bytes,
    );
    if let Ok(info) = d.pool().info() {
        metric(
            "pool_capacity_bytes",
            "gauge",
            "Pool data capacity.",
            info.capacity_bytes,
        );
        metric(
            "pool_used_bytes",
            "gauge",
            "Pool data in use.",
            info.used_bytes,
        );
        metric(
            "pool_devices",
            "gauge",
            "Devices in the pool.",
            info.devices as u64,
        );
    }
    metric(
        "attachments",
        "gauge",
        "Devices attached as loop devices.",
        d.attachments().len() as u64,
    );
    for (name, v) in super::attach::server_counters(d) {
        metric(&name, "counter", "Export server counter.", v);
    }
    s
}

/// Serves until `stop`.
pub async fn serve(d: Arc<Daemon>, l: TcpListener, mut stop: watch::Receiver<bool>) -> Result<()> {
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            r = l.accept() => {
                let (mut s, _) = r.context("accepting on the metrics endpoint")?;
                let d = d.clone();
                tokio::spawn(async move {
                    let Ok(Some(req)) = tokio::time::timeout(std::time::Duration::from_secs(5), read_head(&mut s)).await else {
                        return;
                    };
                    let ok = req.starts_with(b"GET /metrics ") || req.starts_with(b"GET / ");
                    let (status, body) = if ok {
                        ("200 OK", render(&d))
                    } else {
                        ("404 Not Found", "only GET /metrics is served\n".to_string())
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        }
    }
}

/// Reads a request's head: up to the blank line that ends it, the end of the stream, or
/// 4 KiB. One `read` is not enough: a client may send the request line in several segments
/// (a first read of "GET " alone was answered 404 and the connection reset under the client).
async fn read_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut req = vec![0u8; 4096];
    let mut n = 0;
    while n < req.len() && !req[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut req[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return None,
        }
    }
    req.truncate(n);
    Some(req)
}
