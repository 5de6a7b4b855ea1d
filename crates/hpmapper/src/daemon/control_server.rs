//! The control socket's server side: one command per connection, run on a blocking thread
//! with the daemon's pool (see `control` for the wire format).

use super::Daemon;
use crate::cli::{self, Cli, Ctx};
use crate::control::{Outcome, Request, Response, MAX_STDIN};
use anyhow::{Context, Result};
use clap::Parser;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Binds the control socket, root only (mode 0600 from the start), replacing a stale one;
/// a live one (another daemon on this run directory) or a file that is not a socket is
/// refused. See `hpm_io::socket::bind_private`.
pub fn bind(path: &Path) -> Result<UnixListener> {
    hpm_io::socket::bind_private(path)
        .and_then(UnixListener::from_std)
        .with_context(|| format!("binding the control socket {}", path.display()))
}

/// How long a client may take to read its reply once the daemon is stopping.
const REPLY_GRACE: Duration = Duration::from_secs(10);

/// Accepts connections until `stop`; then waits for every command already running to finish
/// and reply (a command still being sent is dropped), so that shutdown closes the pool after
/// it, not under it.
pub async fn serve(d: Arc<Daemon>, l: UnixListener, mut stop: watch::Receiver<bool>) -> Result<()> {
    let mut running = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            r = l.accept() => {
                let (s, _) = r.context("accepting on the control socket")?;
                running.spawn(handle(d.clone(), s, stop.clone()));
            }
            Some(done) = running.join_next(), if !running.is_empty() => log_end(done),
        }
    }
    drop(l);
    if !running.is_empty() {
        tracing::info!(
            commands = running.len(),
            "waiting for the control commands already running"
        );
    }
    while let Some(done) = running.join_next().await {
        log_end(done);
    }
    Ok(())
}

fn log_end(done: Result<Result<()>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("control connection: {e:#}"),
        Err(e) => tracing::error!("a control connection panicked: {e}"),
    }
}

/// Resolves once the daemon is stopping.
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn handle(d: Arc<Daemon>, s: UnixStream, mut stop: watch::Receiver<bool>) -> Result<()> {
    let (r, mut w) = s.into_split();
    let read = async {
        let mut r = BufReader::new(r);
        let mut line = String::new();
        (&mut r)
            .take(64 << 10)
            .read_line(&mut line)
            .await
            .context("reading the request")?;
        let req: Request = serde_json::from_str(&line).context("decoding the request")?;
        anyhow::ensure!(
            req.stdin <= MAX_STDIN,
            "stdin of {} bytes is too large",
            req.stdin
        );
        let mut stdin = vec![0u8; req.stdin as usize];
        r.read_exact(&mut stdin)
            .await
            .context("reading the request's stdin")?;
        anyhow::Ok((req, stdin))
    };
    // A command not yet received when the daemon stops is not started.
    let (req, stdin) = tokio::select! {
        read = read => read?,
        () = stopping(&mut stop) => return Ok(()),
    };
    // One received runs to its end, whatever happens meanwhile.
    let (outcome, stdout) = tokio::task::spawn_blocking(move || run(&d, req, stdin)).await?;
    let reply = async {
        let mut header = serde_json::to_vec(&Response {
            outcome,
            stdout: stdout.len() as u64,
        })?;
        header.push(b'\n');
        w.write_all(&header).await?;
        w.write_all(&stdout).await?;
        w.shutdown().await?;
        anyhow::Ok(())
    };
    tokio::select! {
        replied = reply => replied,
        () = async {
            stopping(&mut stop).await;
            tokio::time::sleep(REPLY_GRACE).await;
        } => anyhow::bail!(
            "the client did not take its reply within {REPLY_GRACE:?} of shutdown; dropped"
        ),
    }
}

fn run(d: &Daemon, req: Request, stdin: Vec<u8>) -> (Outcome, Vec<u8>) {
    if req.pool != d.pool_dir() {
        return (Outcome::OtherPool(d.pool_dir().to_path_buf()), Vec::new());
    }
    let mut out = Vec::new();
    let cli = match Cli::try_parse_from(&req.argv) {
        Ok(c) => c,
        Err(e) => {
            return (
                Outcome::Failed(
                    e.to_string()
                        .lines()
                        .next()
                        .unwrap_or("bad command")
                        .to_string(),
                ),
                out,
            )
        }
    };
    let mut input: &[u8] = &stdin;
    let mut ctx = Ctx {
        cwd: req.cwd,
        stdin: &mut input,
        daemon: Some(d),
    };
    match cli::execute(d.pool(), cli.command, &mut ctx, &mut out) {
        Ok(()) => (Outcome::Ok, out),
        Err(e) => (Outcome::Failed(format!("{e:#}").replace('\n', " ")), out),
    }
}
