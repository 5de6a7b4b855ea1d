//! The control socket's server side: one command per connection, run on a blocking thread
//! with the daemon's pool (see `control` for the wire format).

use super::Daemon;
use crate::cli::{self, Cli, Ctx};
use crate::control::{Outcome, Request, Response, MAX_STDIN};
use anyhow::{Context, Result};
use clap::Parser;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

/// Binds the control socket, root only (mode 0600 from the start), replacing a stale one;
/// a live one (another daemon on this run directory) or a file that is not a socket is
/// refused. See `hpm_io::socket::bind_private`.
pub fn bind(path: &Path) -> Result<UnixListener> {
    hpm_io::socket::bind_private(path)
        .and_then(UnixListener::from_std)
        .with_context(|| format!("binding the control socket {}", path.display()))
}

/// Accepts connections until `stop`.
pub async fn serve(d: Arc<Daemon>, l: UnixListener, mut stop: watch::Receiver<bool>) -> Result<()> {
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            r = l.accept() => {
                let (s, _) = r.context("accepting on the control socket")?;
                let d = d.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(d, s).await {
                        tracing::warn!("control connection: {e:#}");
                    }
                });
            }
        }
    }
}

async fn handle(d: Arc<Daemon>, s: UnixStream) -> Result<()> {
    let (r, mut w) = s.into_split();
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
    let (outcome, stdout) = tokio::task::spawn_blocking(move || run(&d, req, stdin)).await?;
    let mut header = serde_json::to_vec(&Response {
        outcome,
        stdout: stdout.len() as u64,
    })?;
    header.push(b'\n');
    w.write_all(&header).await?;
    w.write_all(&stdout).await?;
    w.shutdown().await?;
    Ok(())
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
