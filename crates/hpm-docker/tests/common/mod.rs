//! The test harness: an in-memory [`FakeDriver`] that records every call, a plugin server on
//! a socket in a temporary directory, and an HTTP/1.1 client over the socket that sends
//! exactly what dockerd sends.

#![allow(dead_code, unused_imports)] // each test binary uses a part

pub mod client;
pub mod fake;

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use client::Client;
pub use fake::{Event, FakeDriver};

/// A running plugin server with a fake driver.
pub struct Plugin {
    pub driver: Arc<FakeDriver>,
    pub socket: PathBuf,
    stop: watch::Sender<bool>,
    serving: JoinHandle<io::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Plugin {
    /// Binds a socket in a fresh directory and serves it.
    pub async fn start() -> Plugin {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/docker/plugins/hpmapper.sock");
        Plugin::start_at(socket, dir).await
    }

    /// Serves on `socket`; `dir` is kept until the plugin is dropped.
    pub async fn start_at(socket: PathBuf, dir: tempfile::TempDir) -> Plugin {
        let driver = Arc::new(FakeDriver::new());
        let listener = hpm_docker::bind(&socket).unwrap();
        let (stop, stopped) = watch::channel(false);
        let serving = tokio::spawn(hpm_docker::serve(listener, driver.clone(), stopped));
        Plugin {
            driver,
            socket,
            stop,
            serving,
            _dir: dir,
        }
    }

    /// A new connection, as one of dockerd's pooled ones.
    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await
    }

    /// Asks the server to stop and waits until `serve` returns.
    pub async fn stop(self) {
        self.stop.send(true).unwrap();
        self.serving.await.unwrap().unwrap();
    }

    /// Signals shutdown and hands back the serving task, to watch it end.
    pub fn signal_stop(&self) {
        self.stop.send(true).unwrap();
    }

    /// The serving task (after [`Plugin::signal_stop`]) and what must outlive it.
    pub fn into_serving(
        self,
    ) -> (
        JoinHandle<io::Result<()>>,
        watch::Sender<bool>,
        tempfile::TempDir,
    ) {
        (self.serving, self.stop, self._dir)
    }
}

/// Guards a test against hanging forever on a bug (a stream that never ends): not a timing
/// assertion, just a bound far beyond what any of these tests needs.
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("the test hung")
}

/// A deterministic multi-MiB layer tar: files of pseudo-random bytes in a few directories,
/// plus a whiteout. Returns the tar and the sum of its entries' sizes.
pub fn layer_tar(files: usize, file_size: usize, seed: u64) -> (Vec<u8>, u64) {
    let mut builder = tar::Builder::new(Vec::new());
    let mut state = seed | 1;
    let mut sum = 0;
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    builder.append_data(&mut dir, "usr/", io::empty()).unwrap();
    for i in 0..files {
        let data: Vec<u8> = (0..file_size + i)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        builder
            .append_data(&mut header, format!("usr/lib/file{i}"), &data[..])
            .unwrap();
        sum += data.len() as u64;
    }
    let mut wh = tar::Header::new_gnu();
    wh.set_mode(0o644);
    wh.set_size(0);
    builder
        .append_data(&mut wh, "etc/.wh.motd", io::empty())
        .unwrap();
    (builder.into_inner().unwrap(), sum)
}
