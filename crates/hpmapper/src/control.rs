//! The daemon's control socket: how a CLI command reaches the daemon that holds its pool.
//!
//! One request per connection: a JSON line (`Request`) then `stdin` raw bytes; one reply: a
//! JSON line (`Response`) then `stdout` raw bytes. The daemon parses the same command line
//! with the same grammar and runs the same command functions on the pool it holds, so a
//! command behaves alike with and without a daemon. The socket is created mode 0600 in a
//! 0700 directory: root only.
//!
//! This module owns the wire format and the client side; `daemon::control_server` serves it.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// The control socket's file name in the run directory.
pub const SOCKET: &str = "control.sock";
/// Largest request header or stdin the daemon accepts.
pub const MAX_STDIN: u64 = 1 << 30;

/// A command for the daemon.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// The command line, as the client got it.
    pub argv: Vec<String>,
    /// The client's working directory.
    pub cwd: PathBuf,
    /// The pool the client means (canonical path).
    pub pool: PathBuf,
    /// Bytes of stdin that follow.
    pub stdin: u64,
}

/// What came of it.
#[derive(Debug, Serialize, Deserialize)]
pub enum Outcome {
    /// Done.
    Ok,
    /// Failed: the one-line error.
    Failed(String),
    /// This daemon holds another pool; the client should open its pool itself.
    OtherPool(PathBuf),
}

/// The reply header.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    /// What came of it.
    pub outcome: Outcome,
    /// Bytes of stdout that follow.
    pub stdout: u64,
}

/// Sends this process's command line to the daemon at `run_dir` if one serves `pool`.
/// `Ok(None)`: no daemon (or one for another pool), run the command here.
pub fn forward(
    run_dir: &Path,
    pool: &Path,
    send_stdin: bool,
    out: &mut dyn Write,
) -> Result<Option<()>> {
    let Ok(pool) = std::fs::canonicalize(pool) else {
        return Ok(None);
    };
    let Ok(mut stream) = UnixStream::connect(run_dir.join(SOCKET)) else {
        return Ok(None);
    };
    let argv = std::env::args_os()
        .map(|a| {
            a.into_string()
                .map_err(|a| anyhow::anyhow!("argument {a:?} is not UTF-8"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut input = Vec::new();
    if send_stdin {
        std::io::stdin()
            .lock()
            .take(MAX_STDIN + 1)
            .read_to_end(&mut input)
            .context("reading stdin")?;
        if input.len() as u64 > MAX_STDIN {
            bail!(
                "stdin is larger than the {} bytes the daemon accepts; write from a file instead",
                MAX_STDIN
            );
        }
    }
    let req = Request {
        argv,
        cwd: std::env::current_dir().context("reading the working directory")?,
        pool,
        stdin: input.len() as u64,
    };
    let mut talk = || -> std::io::Result<(Response, BufReader<UnixStream>)> {
        let mut line = serde_json::to_vec(&req)?;
        line.push(b'\n');
        stream.write_all(&line)?;
        stream.write_all(&input)?;
        stream.flush()?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut header = String::new();
        reader.read_line(&mut header)?;
        Ok((serde_json::from_str(&header)?, reader))
    };
    let (resp, mut reader) = talk().with_context(|| {
        format!(
            "talking to the daemon at {}",
            run_dir.join(SOCKET).display()
        )
    })?;
    if let Outcome::OtherPool(_) = resp.outcome {
        return Ok(None);
    }
    std::io::copy(&mut (&mut reader).take(resp.stdout), out)
        .context("copying the daemon's output")?;
    match resp.outcome {
        Outcome::Ok => Ok(Some(())),
        Outcome::Failed(e) => Err(anyhow::anyhow!(e)),
        Outcome::OtherPool(_) => unreachable!("handled above"),
    }
}
