//! `hpmapper daemon`: owns the pool for as long as it runs, serves its devices to the kernel
//! (FUSE device files under loop devices) and to NBD clients, runs CLI commands sent to its
//! control socket, and shuts down cleanly on SIGTERM or SIGINT: stops serving, detaches,
//! flushes, checkpoints and releases the pool.
//!
//! This module owns the daemon's lifecycle and state (attachments, servers). The command
//! functions it runs are the CLI's own (`cli::execute`); the wire format is in `control`.

mod attach;
mod containerd;
mod control_server;
mod devices;
mod docker;
mod metrics;

pub use attach::{server_counters_json, Attachment};

use crate::cli::parse_size;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use hpm_engine::{CacheConfig, Pool};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// `daemon --fuse-io-uring`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FuseIoUring {
    /// `/dev/fuse` only.
    Off,
    /// Over io_uring when the kernel allows it (else `/dev/fuse`, with a warning).
    On,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Block cache size [default: 512M].
    #[arg(long, value_name = "SIZE")]
    cache_size: Option<String>,
    /// Cache mode: `shared` (hpmapper), `per-device` (the devicemapper-like baseline, for
    /// benchmarks only) or `off`.
    #[arg(long, value_enum, default_value_t = crate::cli::CacheModeArg::Shared)]
    cache_mode: crate::cli::CacheModeArg,
    /// FUSE worker threads serving the device files. Each handles one request at a time,
    /// so this bounds the device requests in flight (a read waits for the disk in its thread).
    #[arg(long, value_name = "N", default_value_t = hpm_fuse::DEFAULT_THREADS,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    fuse_threads: u16,
    /// Serve the device files over io_uring (`on`; FUSE_OVER_IO_URING, Linux 6.14+, when the
    /// kernel allows it: `echo Y > /sys/module/fuse/parameters/enable_uring`) or through
    /// `/dev/fuse` (`off`). Over io_uring a request goes to workers of the CPU that made it,
    /// one system call per request instead of two.
    #[arg(long, value_name = "MODE", default_value = "off")]
    fuse_io_uring: FuseIoUring,
    /// How the daemon reads and writes the pool's data store: `buffered` (through the host
    /// page cache) or `direct` (O_DIRECT, as dm-thin writes its data device: nothing cached
    /// twice, the block cache is the only cache of pool data).
    #[arg(long, value_name = "MODE", default_value = "buffered")]
    data_io: hpm_engine::IoMode,
    /// NBD server on this unix socket [default: RUN_DIR/nbd.sock].
    #[arg(long, value_name = "PATH")]
    nbd_unix: Option<PathBuf>,
    /// Also serve NBD on TCP: PORT (loopback) or ADDR:PORT. Off by default.
    #[arg(long, value_name = "ADDR")]
    nbd_tcp: Option<String>,
    /// Serve Prometheus metrics over HTTP: PORT (loopback) or ADDR:PORT. Off by default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Serve the Docker graphdriver plugin (start dockerd with `--experimental
    /// --storage-driver NAME`, NAME being the socket's file name without `.sock`).
    #[arg(long)]
    docker: bool,
    /// The graphdriver plugin socket [default: /run/docker/plugins/hpmapper.sock].
    #[arg(long, value_name = "PATH", requires = "docker")]
    docker_socket: Option<PathBuf>,
    /// Serve the containerd snapshotter (snapshots.v1 gRPC) on this unix socket: the
    /// `address` of a `[proxy_plugins.hpmapper]` entry of type "snapshot" in containerd's
    /// config.toml. Off by default.
    #[arg(long, value_name = "PATH")]
    containerd_socket: Option<PathBuf>,
    /// Filesystem size of containerd snapshots without parent [default: 10G].
    #[arg(long, value_name = "SIZE", requires = "containerd_socket")]
    containerd_base_size: Option<String>,
    /// Refuse new containerd snapshots while less than this share of the pool is free, so
    /// running containers keep room to write (Docker: `--storage-opt
    /// hpmapper.min_free_space=PERCENT`); 0 never refuses [default: 10%].
    #[arg(long, value_name = "PERCENT", requires = "containerd_socket")]
    containerd_min_free_space: Option<String>,
}

/// A TCP address from `PORT` (loopback) or `ADDR:PORT`.
pub fn tcp_addr(flag: &str, s: &str) -> Result<SocketAddr> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().with_context(|| {
        format!("{flag}: {s:?} is neither PORT nor ADDR:PORT (e.g. 127.0.0.1:10809)")
    })
}

/// The running daemon, shared by its servers.
pub struct Daemon {
    pool: Pool,
    pool_dir: PathBuf,
    run_dir: PathBuf,
    started: Instant,
    attachments: Mutex<BTreeMap<String, Attachment>>,
    endpoints: Mutex<Vec<(String, String)>>,
    fuse: Mutex<Option<hpm_fuse::FuseExport>>,
    fuse_threads: usize,
    fuse_io_uring: bool,
    nbd: Mutex<Option<Arc<hpm_nbd::NbdServer>>>,
    docker: Mutex<Option<Arc<docker::DockerDriver>>>,
    containerd: Mutex<Option<Arc<hpm_containerd::block::BlockSnapshotter>>>,
}

impl Daemon {
    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The pool directory.
    pub fn pool_dir(&self) -> &Path {
        &self.pool_dir
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Seconds since start.
    pub fn uptime(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// What the daemon serves where: (what, address).
    pub fn endpoints(&self) -> Vec<(String, String)> {
        self.endpoints.lock().clone()
    }

    /// Current attachments: device name -> attachment.
    pub fn attachments(&self) -> Vec<(String, PathBuf, bool)> {
        self.attachments
            .lock()
            .iter()
            .map(|(n, a)| (n.clone(), a.dev_path(), a.read_only()))
            .collect()
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(pool_dir: &Path, run_dir: &Path, args: DaemonArgs) -> Result<()> {
    let mut cache = CacheConfig {
        mode: args.cache_mode.into(),
        ..CacheConfig::default()
    };
    if let Some(s) = &args.cache_size {
        cache.size = parse_size("--cache-size", s)?;
    }
    let containerd_base = args
        .containerd_base_size
        .as_deref()
        .map(|s| {
            let size = parse_size("--containerd-base-size", s)?;
            if size < hpm_layers::store::MIN_BASE_SIZE || !size.is_multiple_of(4096) {
                bail!("--containerd-base-size: {s} must be a multiple of 4K and at least 16M");
            }
            Ok(size)
        })
        .transpose()?
        .unwrap_or(hpm_containerd::block::DEFAULT_BASE_SIZE);
    let containerd_min_free = args
        .containerd_min_free_space
        .as_deref()
        .map(|s| {
            crate::size::parse_percent(s).map_err(|e| anyhow!("--containerd-min-free-space: {e}"))
        })
        .transpose()?
        .unwrap_or(hpm_layers::store::DEFAULT_MIN_FREE_SPACE);
    let nbd_tcp = args
        .nbd_tcp
        .as_deref()
        .map(|a| tcp_addr("--nbd-tcp", a))
        .transpose()?;
    let metrics = args
        .metrics
        .as_deref()
        .map(|a| tcp_addr("--metrics", a))
        .transpose()?;
    crate::cli::require_dir(pool_dir).context("starting the daemon")?;
    prepare_run_dir(run_dir)?;
    let pool = Pool::open_with_io(pool_dir, cache, args.data_io)
        .with_context(|| format!("opening pool {}", pool_dir.display()))?;
    let pool_dir = std::fs::canonicalize(pool_dir).context("resolving the pool directory")?;
    let daemon = Arc::new(Daemon {
        pool,
        pool_dir,
        run_dir: run_dir.to_path_buf(),
        started: Instant::now(),
        attachments: Mutex::new(BTreeMap::new()),
        endpoints: Mutex::new(Vec::new()),
        fuse: Mutex::new(None),
        fuse_threads: usize::from(args.fuse_threads),
        fuse_io_uring: args.fuse_io_uring == FuseIoUring::On,
        nbd: Mutex::new(None),
        docker: Mutex::new(None),
        containerd: Mutex::new(None),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hpmapper-daemon")
        .build()
        .context("starting the async runtime")?;
    let docker = args.docker.then(|| {
        args.docker_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(hpm_docker::DEFAULT_SOCKET_PATH))
    });
    let containerd = args
        .containerd_socket
        .clone()
        .map(|socket| (socket, containerd_base, containerd_min_free));
    let served = rt.block_on(serve(
        daemon.clone(),
        args.nbd_unix.clone(),
        nbd_tcp,
        metrics,
        docker,
        containerd,
    ));
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    let closed = shutdown(daemon);
    served.and(closed)
}

/// The run directory: created 0700 if missing; refused if it is not a directory of ours (a
/// symlink, or one another user made first in a shared place) or if another daemon answers
/// there.
fn prepare_run_dir(run_dir: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let md = std::fs::symlink_metadata(run_dir)
        .with_context(|| format!("inspecting {}", run_dir.display()))?;
    let me = rustix::process::geteuid().as_raw();
    if !md.is_dir() || md.uid() != me {
        bail!(
            "run directory {} is not a directory owned by this user (uid {me}): refusing to serve sockets from it",
            run_dir.display()
        );
    }
    std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", run_dir.display()))?;
    let sock = run_dir.join(crate::control::SOCKET);
    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        bail!(
            "another hpmapper daemon is running with run directory {} (its control socket answers)",
            run_dir.display()
        );
    }
    Ok(())
}

async fn serve(
    d: Arc<Daemon>,
    nbd_unix: Option<PathBuf>,
    nbd_tcp: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    docker: Option<PathBuf>,
    containerd: Option<(PathBuf, u64, u8)>,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let control = control_server::bind(&d.run_dir.join(crate::control::SOCKET))?;
    d.endpoints.lock().push((
        "control".into(),
        d.run_dir.join(crate::control::SOCKET).display().to_string(),
    ));
    if let Some(addr) = metrics {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics endpoint {addr}"))?;
        d.endpoints.lock().push((
            "metrics".into(),
            format!("http://{}/metrics", l.local_addr()?),
        ));
        tasks.spawn(metrics::serve(d.clone(), l, stop.clone()));
    }
    attach::start_servers(&d, &mut tasks, nbd_unix, nbd_tcp, stop.clone()).await?;
    if let Some(path) = docker {
        let l = hpm_docker::bind(&path)
            .with_context(|| format!("binding the Docker plugin socket {}", path.display()))?;
        let driver = Arc::new(docker::DockerDriver::new(&d));
        *d.docker.lock() = Some(driver.clone());
        d.endpoints
            .lock()
            .push(("docker".into(), path.display().to_string()));
        let stop = stop.clone();
        tasks.spawn(async move {
            let served = hpm_docker::serve(l, driver, stop)
                .await
                .context("the Docker plugin server");
            // `serve` leaves the socket file to its caller. Left in place, a dockerd started
            // while no daemon runs finds it and retries for ~30 s instead of failing at once
            // (found by tests/docker.rs: the socket outlived every SIGTERM).
            let _ = std::fs::remove_file(&path);
            served
        });
    }
    if let Some((path, base_size, min_free_space)) = containerd {
        // Opened before binding: containerd finding the socket means the snapshotter works.
        let snapshotter = containerd::open(&d, base_size, min_free_space)?;
        let l = hpm_containerd::bind(&path).with_context(|| {
            format!(
                "binding the containerd snapshotter socket {}",
                path.display()
            )
        })?;
        *d.containerd.lock() = Some(snapshotter.clone());
        d.endpoints
            .lock()
            .push(("containerd".into(), path.display().to_string()));
        let stop = stop.clone();
        tasks.spawn(async move {
            let served = hpm_containerd::serve(l, snapshotter, stop)
                .await
                .context("the containerd snapshotter server");
            let _ = std::fs::remove_file(&path);
            served
        });
    }
    // Served only now: a client that sees the daemon answer (`hpmapper status`) can attach
    // devices at once. Until then its requests wait in the socket's backlog.
    tasks.spawn(control_server::serve(d.clone(), control, stop.clone()));
    tracing::info!(pool = %d.pool_dir.display(), run_dir = %d.run_dir.display(), "hpmapper daemon ready");
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        Some(r) = tasks.join_next() => {
            // A server ended on its own: that is an error worth stopping for.
            let _ = stop_tx.send(true);
            r.context("a server task panicked")??;
            bail!("a server stopped unexpectedly");
        }
    }
    let _ = stop_tx.send(true);
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.context("a server task panicked").and_then(|r| r) {
            tracing::warn!("while stopping: {e:#}");
        }
    }
    Ok(())
}

/// Detaches everything, then flushes, checkpoints and releases the pool.
fn shutdown(d: Arc<Daemon>) -> Result<()> {
    if let Some(driver) = d.docker.lock().take() {
        driver.shutdown();
    }
    if let Some(s) = d.containerd.lock().take() {
        if let Err(e) = s.shutdown() {
            tracing::warn!("detaching containerd snapshots at shutdown: {e}");
        }
    }
    attach::detach_all(&d);
    let _ = std::fs::remove_file(d.run_dir.join(crate::control::SOCKET));
    let _ = std::fs::remove_file(d.run_dir.join("nbd.sock"));
    let d =
        Arc::try_unwrap(d).map_err(|_| anyhow!("a server still holds the daemon at shutdown"))?;
    d.pool.close().context("closing the pool")?;
    tracing::info!("pool closed cleanly");
    Ok(())
}
