//! Test harness: a pool in a tempdir served on a Unix socket by a background runtime, and
//! helpers to run real NBD clients (which must exist under CI=true).

#![allow(dead_code)] // Each test binary uses a different subset.

pub mod raw;

use hpm_engine::{CacheConfig, Pool, PoolOptions};
use hpm_nbd::{Limits, NbdServer, NbdStats, Shutdown};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;

pub const MIB: u64 = 1 << 20;

/// A pool and an NBD server on `<tempdir>/nbd.sock`, stopped on drop.
pub struct Served {
    pub dir: tempfile::TempDir,
    pub pool: Pool,
    pub socket: PathBuf,
    pub server: NbdServer,
    shutdown: Shutdown,
    thread: Option<JoinHandle<()>>,
}

impl Served {
    /// Creates a 256 MiB pool with `devices` (name, size) and serves it.
    pub fn start(devices: &[(&str, u64)]) -> Served {
        Self::start_with(devices, Limits::default())
    }

    /// `start`, the server with `limits`.
    pub fn start_with(devices: &[(&str, u64)], limits: Limits) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let opts = PoolOptions {
            capacity: Some(256 * MIB),
            cache: CacheConfig {
                size: 16 * MIB,
                ..CacheConfig::default()
            },
            ..PoolOptions::default()
        };
        let pool = Pool::create(&dir.path().join("pool"), &opts).unwrap();
        for (name, size) in devices {
            pool.create_device(name, *size).unwrap();
        }
        let socket = dir.path().join("nbd.sock");
        let server = NbdServer::with_limits(pool.clone(), limits);
        let shutdown = Shutdown::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (server, shutdown, socket) = (server.clone(), shutdown.clone(), socket.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = hpm_nbd::bind_unix(&socket).unwrap();
                    ready_tx.send(()).unwrap();
                    server.serve_unix(listener, shutdown).await;
                });
            })
        };
        ready_rx.recv().expect("the server thread failed to start");
        Served {
            dir,
            pool,
            socket,
            server,
            shutdown,
            thread: Some(thread),
        }
    }

    /// The NBD URI of export `name`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Triggers shutdown, waits for the server to return, and gives its final counters.
    /// The pool stays usable, and the server holds no device open any more.
    pub fn stop(&mut self) -> NbdStats {
        self.shutdown.trigger();
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread panicked");
        }
        self.server.stats()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `bin` is installed. Missing under CI=true is a failure, not a skip.
pub fn have(bin: &str) -> bool {
    hpm_testkit::host::require(&format!("a test that runs {bin}"), false, &[], &[bin])
}

/// Output of a finished client: exit code and stdout+stderr.
pub struct Out {
    pub code: Option<i32>,
    pub text: String,
}

/// Runs `bin args` with a 60 s timeout (a hung server must fail the test, not hang it).
pub fn run(bin: &str, args: &[&str]) -> Out {
    let out = Command::new("timeout")
        .arg("60")
        .arg(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Out {
        code: out.status.code(),
        text,
    }
}

/// Runs a client that must succeed; returns its output.
pub fn run_ok(bin: &str, args: &[&str]) -> String {
    let out = run(bin, args);
    assert_eq!(out.code, Some(0), "{bin} {args:?} failed:\n{}", out.text);
    out.text
}

/// Runs qemu-io with `commands` on `uri`; every command must succeed and every pattern
/// verify. `extra` goes before the image (e.g. `-r`).
pub fn qemu_io(uri: &str, extra: &[&str], commands: &[&str]) -> String {
    let mut args: Vec<&str> = vec!["-f", "raw"];
    args.extend_from_slice(extra);
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let text = run_ok("qemu-io", &args);
    for bad in ["Pattern verification failed", "failed", "error", "Error"] {
        assert!(
            !text.contains(bad),
            "qemu-io {commands:?} printed {bad:?}:\n{text}"
        );
    }
    text
}

/// A file of `size` bytes: random data with some zero runs (so holes and data alternate).
pub fn make_image(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut data = vec![0u8; size];
    rng.fill(&mut data[..]);
    let mut at = 0;
    while at < size {
        let len = rng.random_range(1..(size / 8).max(2)).min(size - at);
        if rng.random_bool(0.3) {
            data[at..at + len].fill(0);
        }
        at += len;
    }
    std::fs::write(path, &data).unwrap();
    data
}
