//! The harness of the Docker tests: a private dockerd 20.10 (its own data root, exec root,
//! API socket, pidfile, config file and containerd namespaces in a temporary directory on
//! /var/tmp) on the real `hpmapper daemon --docker`, or on the built-in `vfs` driver as a
//! reference; image helpers (a busybox rootfs, hand-made `docker save` archives); and a guard
//! that leaves nothing behind when a test fails half way.
//!
//! Every environment serves a plugin name of its own, `hpmtest-<pid>-<n>` (socket
//! `/run/docker/plugins/<name>.sock`, `--storage-driver <name>`), so tests run in parallel and
//! never touch the real `/run/docker/plugins/hpmapper.sock`.
//!
//! Teardown order (the guard): dockerd first (SIGTERM, wait until the pidfile's process has
//! exited, SIGKILL after 20 s, then its containerd too), then the plugin socket if the
//! daemon left one, then `daemon_env::Env`'s own guard: unmount what is left under the
//! temporary directory, stop the hpmapper daemon, detach our loop devices.

use crate::daemon_env::{append, output_with_stdin, requirements, signal, tail, Env};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Debian's docker.io 20.10 client (`/usr/local/bin/docker` may be a newer one).
pub const DOCKER: &str = "/usr/bin/docker";
/// A static busybox: the only binary of the test images.
pub const BUSYBOX: &str = "/usr/bin/busybox";
/// Where the temporary directories go (not /tmp, which may be a small tmpfs).
pub const TMP_PARENT: &str = "/var/tmp";
/// The base size the hpmapper dockerds are started with.
pub const BASE_SIZE: &str = "1G";

/// How long dockerd may take to answer after start.
const DOCKERD_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long dockerd may take to exit after SIGTERM before it is SIGKILLed.
const DOCKERD_STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the hpmapper daemon may take to exit after SIGTERM.
pub const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The busybox applets linked in the test images' /bin.
const APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "rm", "mkdir", "dd", "md5sum", "sleep", "true", "find", "stat",
    "df", "ln", "chmod", "chown", "mv", "touch", "mkfifo", "mknod", "sort", "head", "wc",
];

/// Whether this machine can run a Docker test: root, /dev/fuse, loop devices, dockerd, the
/// 20.10 client, a static busybox, mkfs.ext4 and sha256sum. Missing ones fail the test under
/// CI=true and skip it with a note otherwise.
pub fn docker_requirements(test: &str) -> bool {
    // A dynamic busybox would not run in an image holding nothing else: report it as the
    // package to install.
    let busybox = if static_or_missing(BUSYBOX) {
        BUSYBOX
    } else {
        "busybox-static"
    };
    requirements(
        test,
        true,
        &["dockerd", DOCKER, busybox, "mkfs.ext4", "sha256sum"],
    )
}

/// A dynamic ELF names its interpreter (`/lib64/ld-linux-x86-64.so.2`, `ld-musl-...`) in its
/// first pages.
fn static_or_missing(path: &str) -> bool {
    let mut head = vec![0; 8192];
    let Ok(mut f) = fs::File::open(path) else {
        return true;
    };
    let n = f.read(&mut head).unwrap_or(0);
    let head = &head[..n];
    let has = |needle: &[u8]| head.windows(needle.len()).any(|w| w == needle);
    !has(b"ld-linux") && !has(b"ld-musl")
}

/// `hpmtest-<pid>-<n>`: a plugin name (and containerd namespace) no other test uses.
pub fn unique_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "hpmtest-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A private dockerd. Stopped (see [`Dockerd::stop`]) when dropped.
pub struct Dockerd {
    dir: PathBuf,
    driver: String,
    storage_opts: Vec<String>,
    namespace: String,
    child: Option<Child>,
    _tmp: Option<TempDir>,
}

impl Dockerd {
    /// A dockerd with everything in `dir` (created), `--storage-driver driver`, one
    /// `--storage-opt` per item of `storage_opts`, containerd namespaces `namespace` and
    /// `<namespace>-plugins`. Not started.
    pub fn new(dir: PathBuf, driver: &str, storage_opts: &[&str], namespace: &str) -> Dockerd {
        fs::create_dir_all(dir.join("client")).unwrap();
        // An empty config file of its own: /etc/docker/daemon.json must not apply, and
        // dockerd keeps its key.json next to it, not in /etc/docker.
        fs::write(dir.join("daemon.json"), "{}\n").unwrap();
        Dockerd {
            dir,
            driver: driver.into(),
            storage_opts: storage_opts.iter().map(|s| s.to_string()).collect(),
            namespace: namespace.into(),
            child: None,
            _tmp: None,
        }
    }

    /// A started dockerd on the built-in `vfs` driver (plain directory copies: moby's code,
    /// none of ours), in a temporary directory of its own.
    pub fn vfs() -> Dockerd {
        let tmp = tempfile::Builder::new()
            .prefix("hpmv")
            .tempdir_in(TMP_PARENT)
            .unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        let mut d = Dockerd::new(dir, "vfs", &[], &unique_name());
        d._tmp = Some(tmp);
        d.start();
        d
    }

    /// Replaces dockerd's configuration file (JSON, e.g. `{"live-restore": true}`); it
    /// applies from the next start.
    pub fn set_config(&self, json: &str) {
        fs::write(self.path("daemon.json"), json).unwrap();
    }

    /// `dir/rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn host(&self) -> String {
        format!("unix://{}", self.path("docker.sock").display())
    }

    fn log_path(&self) -> PathBuf {
        self.path("dockerd.log")
    }

    /// The last `lines` lines of dockerd's output (every start of it).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }

    /// Starts dockerd and waits until its API answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "dockerd is already running");
        let log = append(&self.log_path());
        let mut c = Command::new("dockerd");
        c.args(["--experimental", "--storage-driver", &self.driver]);
        for o in &self.storage_opts {
            c.args(["--storage-opt", o]);
        }
        c.arg("--config-file")
            .arg(self.path("daemon.json"))
            .arg("--data-root")
            .arg(self.path("root"))
            .arg("--exec-root")
            .arg(self.path("exec"))
            .args(["-H", &self.host()])
            .arg("--pidfile")
            .arg(self.path("docker.pid"))
            .args(["--bridge=none", "--iptables=false", "--ip-masq=false"])
            .args(["--containerd-namespace", &self.namespace])
            .args([
                "--containerd-plugins-namespace",
                &format!("{}-plugins", self.namespace),
            ])
            // Containers still running at shutdown are killed after 2 s, not 15.
            .args(["--shutdown-timeout", "2"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(c.spawn().expect("starting dockerd"));
        let deadline = Instant::now() + DOCKERD_START_TIMEOUT;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("dockerd exited at start ({st}):\n{}", self.log_tail(40));
            }
            if self
                .run(&["version", "--format", "{{.Server.Version}}"])
                .status
                .success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer within {DOCKERD_START_TIMEOUT:?}:\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits until the pidfile's process (our child) has exited; SIGKILL after
    /// 20 s, and then its containerd too. Returns whether SIGTERM was enough (true if it was
    /// not running).
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let pid = fs::read_to_string(self.path("docker.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(child.id());
        assert_eq!(pid, child.id(), "dockerd's pidfile names another process");
        signal(pid, "TERM");
        let deadline = Instant::now() + DOCKERD_STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("dockerd did not stop within {DOCKERD_STOP_TIMEOUT:?}: SIGKILL");
        let _ = child.kill();
        let _ = child.wait();
        self.kill_orphans();
        let _ = fs::remove_file(self.path("docker.pid"));
        false
    }

    /// After dockerd was SIGKILLed: what it started outlives it and would keep our layers
    /// mounted. Kills the containers (the init process runc recorded for each, PID 1 of
    /// their PID namespace, so the kernel kills the rest), their shims (those of our
    /// containerd namespace) and dockerd's containerd (its pidfile). Nothing else: every
    /// process is identified by a path or a name of this dockerd's.
    fn kill_orphans(&self) {
        let runc = self.path("exec/runtime-runc").join(&self.namespace);
        for state in fs::read_dir(runc).into_iter().flatten().flatten() {
            let state: Option<serde_json::Value> = fs::read(state.path().join("state.json"))
                .ok()
                .and_then(|s| serde_json::from_slice(&s).ok());
            if let Some(pid) = state.and_then(|s| s["init_process_pid"].as_u64()) {
                signal(pid as u32, "KILL");
            }
        }
        let address = self.path("exec/containerd/containerd.sock");
        let ours = |args: &[&str]| {
            args.first().is_some_and(|a| a.contains("containerd-shim"))
                && args
                    .windows(2)
                    .any(|w| w == ["-namespace", self.namespace.as_str()])
                && args.contains(&address.to_str().unwrap())
        };
        for p in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let cmdline = fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            let args: Vec<&str> = cmdline.split('\0').collect();
            if ours(&args) {
                signal(pid, "KILL");
            }
        }
        let containerd = self.path("exec/containerd/containerd.pid");
        if let Some(pid) = fs::read_to_string(containerd)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("containerd") {
                signal(pid, "KILL");
            }
        }
    }

    /// The docker client on this dockerd, stdin empty.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(DOCKER);
        c.env("DOCKER_CONFIG", self.path("client"))
            .env("DOCKER_BUILDKIT", "0")
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .args(["-H", &self.host()])
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Runs the client.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs the client with `input` on stdin.
    pub fn run_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        output_with_stdin(self.command(args), input)
    }

    /// Checks that a client command succeeded (panics with its output and dockerd's log
    /// otherwise); returns its stdout, trimmed.
    pub fn succeeded(&self, args: &[&str], out: Output) -> String {
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndockerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(30)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs a client command that must succeed; returns its stdout, trimmed.
    pub fn ok(&self, args: &[&str]) -> String {
        self.succeeded(args, self.run(args))
    }

    /// Checks that a client command failed; returns its stderr.
    pub fn failed(&self, args: &[&str], out: Output) -> String {
        assert!(
            !out.status.success(),
            "docker {args:?} succeeded, it should have failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `docker import - tag` of an uncompressed rootfs tar.
    pub fn import(&self, tag: &str, rootfs_tar: &[u8]) {
        let args = ["import", "-", tag];
        self.succeeded(&args, self.run_with_stdin(&args, rootfs_tar));
    }

    /// `docker build -q -t tag` (the classic builder) of a context holding only `dockerfile`;
    /// returns the image id.
    pub fn build(&self, tag: &str, dockerfile: &str) -> String {
        let ctx = self.path(&format!("build-{}", tag.replace([':', '/'], "-")));
        fs::create_dir_all(&ctx).unwrap();
        fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
        self.ok(&["build", "-q", "-t", tag, ctx.to_str().unwrap()])
    }

    /// `docker load` of an archive given on stdin.
    pub fn load(&self, archive: &[u8]) -> Output {
        self.run_with_stdin(&["load"], archive)
    }

    /// `docker save -o file image...`; returns the archive.
    pub fn save(&self, file: &str, images: &[&str]) -> Vec<u8> {
        let path = self.path(file);
        let mut args = vec!["save", "-o", path.to_str().unwrap()];
        args.extend_from_slice(images);
        self.ok(&args);
        fs::read(path).unwrap()
    }

    /// `docker diff CONTAINER` as sorted lines (`A /path`, `C /path`, `D /path`).
    pub fn diff(&self, container: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .ok(&["diff", container])
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "dockerd log ({}), last lines:\n{}",
                self.log_path().display(),
                self.log_tail(60)
            );
        }
        self.stop();
    }
}

/// A pool (20 GiB, sparse), the hpmapper daemon serving it with the graphdriver plugin on a
/// socket of its own, and a private dockerd using it with base size 1 GiB.
pub struct HpmDocker {
    /// Declared first: dropped (stopped) before the daemon it uses.
    pub dockerd: Dockerd,
    /// The pool, the daemon and the guard of its mounts and loop devices.
    pub env: Env,
    /// The plugin socket, `/run/docker/plugins/<name>.sock`.
    pub socket: PathBuf,
}

impl HpmDocker {
    /// Starts the daemon, then dockerd.
    pub fn start() -> HpmDocker {
        HpmDocker::start_with(&[])
    }

    /// Starts the daemon, then dockerd with `storage_opts` after the base size.
    pub fn start_with(storage_opts: &[&str]) -> HpmDocker {
        let name = unique_name();
        let socket = PathBuf::from(format!("/run/docker/plugins/{name}.sock"));
        let mut env = Env::new_in(Path::new(TMP_PARENT), "20G");
        env.set_daemon_args(&["--docker", "--docker-socket", socket.to_str().unwrap()]);
        env.start_daemon();
        let base = format!("hpmapper.basesize={BASE_SIZE}");
        let mut opts = vec![base.as_str()];
        opts.extend_from_slice(storage_opts);
        let dockerd = Dockerd::new(env.path("d"), &name, &opts, &name);
        let mut h = HpmDocker {
            dockerd,
            env,
            socket,
        };
        h.dockerd.start();
        h
    }

    /// The pool's `used_bytes`, asked through the daemon.
    pub fn used_bytes(&self) -> u64 {
        self.pool_figure("used_bytes")
    }

    /// The pool's `capacity_bytes`, asked through the daemon.
    pub fn capacity_bytes(&self) -> u64 {
        self.pool_figure("capacity_bytes")
    }

    fn pool_figure(&self, key: &str) -> u64 {
        let info = self.env.json(&["pool", "info", "--json"]);
        info[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no {key} in {info}"))
    }

    /// The pool devices holding Docker layers (`docker/<id>`), without the base volumes.
    pub fn layer_devices(&self) -> Vec<String> {
        let list = self.env.json(&["device", "list", "--json"]);
        list.as_array()
            .unwrap()
            .iter()
            .filter_map(|d| d["name"].as_str())
            .filter(|n| n.starts_with("docker/") && !n.starts_with("docker/.base"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for HpmDocker {
    fn drop(&mut self) {
        self.dockerd.stop();
        // The daemon removes its socket when it exits cleanly; one it left (it was killed)
        // is ours alone to remove, its name being unique.
        if fs::symlink_metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket())
            && std::os::unix::net::UnixStream::connect(&self.socket).is_err()
        {
            let _ = fs::remove_file(&self.socket);
        }
        // Then `env` drops: unmounts, stops the daemon, detaches loop devices, and removes
        // the socket if the daemon still served it (it does so on SIGTERM).
    }
}

/// A layer tar being written by hand: raw names (`..` included), fixed times, owner 0.
pub struct LayerTar(tar::Builder<Vec<u8>>);

/// The modification time of hand-made entries.
pub const MTIME: u64 = 1_700_000_000;

impl LayerTar {
    /// An empty layer.
    pub fn new() -> LayerTar {
        LayerTar(tar::Builder::new(Vec::new()))
    }

    /// An entry named exactly `name` (up to 99 bytes, not checked or cleaned as the tar
    /// crate's `set_path` would).
    pub fn entry(
        mut self,
        name: &str,
        kind: tar::EntryType,
        mode: u32,
        link: Option<&str>,
        data: &[u8],
    ) -> Self {
        let mut h = tar::Header::new_ustar();
        let n = name.as_bytes();
        assert!(n.len() < 100, "{name}: too long for a ustar name");
        h.as_old_mut().name[..n.len()].copy_from_slice(n);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    /// A directory (`name` ending in `/`).
    pub fn dir(self, name: &str, mode: u32) -> Self {
        self.entry(name, tar::EntryType::Directory, mode, None, &[])
    }

    /// A regular file.
    pub fn file(self, name: &str, mode: u32, data: &[u8]) -> Self {
        self.entry(name, tar::EntryType::Regular, mode, None, data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(name, tar::EntryType::Symlink, 0o777, Some(target), &[])
    }

    /// A hard link to `target`.
    pub fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(name, tar::EntryType::Link, 0o644, Some(target), &[])
    }

    /// The finished tar.
    pub fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// The rootfs of the test images as a tar: `bin/busybox` (static) and `bin/<applet>`
/// symlinks to it.
pub fn busybox_rootfs() -> Vec<u8> {
    let busybox = fs::read(BUSYBOX).unwrap();
    let mut t = LayerTar::new()
        .dir("bin/", 0o755)
        .file("bin/busybox", 0o755, &busybox);
    for a in APPLETS {
        t = t.symlink(&format!("bin/{a}"), "busybox");
    }
    t.finish()
}

/// The SHA-256 of `data` in hex (`sha256sum`: no hashing crate in the workspace).
pub fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    let hex = String::from_utf8(out.stdout).unwrap();
    hex[..64].to_string()
}

/// A `docker save` archive (manifest.json, the config named by its digest, one
/// `<diffID>/layer.tar` per layer) of an image tagged `tag` with `layers` (uncompressed
/// tars, bottom first): the diffIDs and the config digest are the real SHA-256s, so
/// dockerd takes it as far as applying each layer.
pub fn image_archive(tag: &str, layers: &[Vec<u8>]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256_hex(l)).collect();
    let quoted: Vec<String> = diff_ids.iter().map(|d| format!("\"sha256:{d}\"")).collect();
    let history: Vec<&str> =
        vec![r#"{"created":"2023-11-14T22:13:20Z","created_by":"hpmapper test"}"#; layers.len()];
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","created":"2023-11-14T22:13:20Z","config":{{"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":[{}]}},"history":[{}]}}"#,
        quoted.join(","),
        history.join(",")
    );
    let config_name = format!("{}.json", sha256_hex(config.as_bytes()));
    let layer_names: Vec<String> = diff_ids
        .iter()
        .map(|d| format!("\"{d}/layer.tar\""))
        .collect();
    let manifest = format!(
        r#"[{{"Config":"{config_name}","RepoTags":["{tag}"],"Layers":[{}]}}]"#,
        layer_names.join(",")
    );
    let mut archive = LayerTar::new()
        .file("manifest.json", 0o644, manifest.as_bytes())
        .file(&config_name, 0o644, config.as_bytes());
    for (d, l) in diff_ids.iter().zip(layers) {
        archive = archive
            .dir(&format!("{d}/"), 0o755)
            .file(&format!("{d}/layer.tar"), 0o644, l);
    }
    archive.finish()
}

/// The entries of a tar: (name, header, data), in order.
pub fn tar_entries(data: &[u8]) -> Vec<(String, tar::Header, Vec<u8>)> {
    let mut a = tar::Archive::new(data);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            let header = e.header().clone();
            let mut body = Vec::new();
            e.read_to_end(&mut body).unwrap();
            (name, header, body)
        })
        .collect()
}
