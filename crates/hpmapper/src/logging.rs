//! Diagnostics to stderr through `tracing`: warnings by default, more with `--log-level`
//! or `RUST_LOG`. Command output never goes through here.

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// How much the engine and the CLI log to stderr, from least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn directive(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// Installs the stderr subscriber: `--log-level` wins, then a valid `RUST_LOG`, then warn.
pub fn init(level: Option<LogLevel>) {
    // fuser logs every request it does not implement (ioctl, getxattr) at warn level, and a
    // redundant unmount at shutdown: noise for our users, so only its errors show unless
    // debugging.
    let quiet = |l: &str| match l {
        "debug" | "trace" => l.to_string(),
        l => format!("{l},fuser=error"),
    };
    let filter = match level {
        Some(l) => EnvFilter::new(quiet(l.directive())),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(quiet("warn"))),
    };
    // `try_init` only fails if a subscriber is already set, which leaves logging working.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
