//! The harness of the containerd tests: a private containerd 1.6 (its own root, state,
//! sockets and config in a temporary directory on /var/tmp, CRI disabled) with hpmapper
//! registered as the proxy snapshotter `hpmapper`, on the real `hpmapper daemon
//! --containerd-socket`; and `ctr` pointed at it.
//!
//! Teardown order (the guard): containerd first (SIGTERM, wait, SIGKILL after 20 s, then the
//! shims of its namespace), then `daemon_env::Env`'s own guard: unmount what is left under
//! the temporary directory, stop the hpmapper daemon, detach our loop devices.

use crate::daemon_env::{append, requirements, signal, stop, tail, Env};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The containerd namespace the tests use.
pub const NS: &str = "hpmtest";
/// The proxy snapshotter's name in containerd's config.
pub const SNAPSHOTTER: &str = "hpmapper";
/// Where the temporary directories go (not /tmp, which may be a small tmpfs).
pub const TMP_PARENT: &str = "/var/tmp";

const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether this machine can run a containerd test: root, /dev/fuse, loop devices,
/// containerd, ctr, runc and its shim, a static busybox, mkfs.ext4, sha256sum. Missing ones
/// fail the test under CI=true and skip it otherwise.
pub fn containerd_requirements(test: &str) -> bool {
    requirements(
        test,
        true,
        &[
            "containerd",
            "ctr",
            "runc",
            "containerd-shim-runc-v2",
            crate::docker_env::BUSYBOX,
            "mkfs.ext4",
            "sha256sum",
        ],
    )
}

/// A private containerd. Stopped when dropped.
pub struct Containerd {
    dir: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    /// A containerd with everything in `dir` (created) and the proxy snapshotter at
    /// `snapshotter_socket`. Not started.
    pub fn new(dir: PathBuf, snapshotter_socket: &Path) -> Containerd {
        fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{d}/c.sock"

[ttrpc]
  address = "{d}/c.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[proxy_plugins]
  [proxy_plugins.{SNAPSHOTTER}]
    type = "snapshot"
    address = "{}"
"#,
            snapshotter_socket.display()
        );
        fs::write(dir.join("config.toml"), config).unwrap();
        Containerd { dir, child: None }
    }

    /// `dir/rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn log_path(&self) -> PathBuf {
        self.path("containerd.log")
    }

    /// The last `lines` lines of containerd's output.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }

    /// Starts containerd and waits until it answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "containerd is already running");
        let log = append(&self.log_path());
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.path("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("containerd exited at start ({st}):\n{}", self.log_tail(40));
            }
            if self.run(&["version"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer within {START_TIMEOUT:?}:\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to 15 s until `ctr snapshots --snapshotter hpmapper ls` succeeds.
    pub fn wait_snapshotter(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = self.run(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not reach the snapshotter within 15 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM and wait; SIGKILL after 20 s, and then the shims of our namespace.
    pub fn stop(&mut self) {
        let Some(child) = self.child.take() else {
            return;
        };
        if stop(child, STOP_TIMEOUT).is_none() {
            eprintln!("containerd did not stop within {STOP_TIMEOUT:?}: SIGKILL");
            self.kill_shims();
        }
    }

    /// Kills the shims started by this containerd (their command line names its address).
    fn kill_shims(&self) {
        let address = self.path("c.sock");
        for p in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let cmdline = fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            let args: Vec<&str> = cmdline.split('\0').collect();
            if args.first().is_some_and(|a| a.contains("containerd-shim"))
                && args.contains(&address.to_str().unwrap())
            {
                signal(pid, "KILL");
            }
        }
    }

    /// `ctr --address A --namespace hpmtest args...`, stdin empty.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.path("c.sock"))
            .args(["--namespace", NS])
            .args(args)
            .env_remove("CONTAINERD_SNAPSHOTTER")
            .env_remove("CONTAINERD_NAMESPACE")
            .stdin(Stdio::null());
        c
    }

    /// Runs ctr.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs ctr; panics with its output and containerd's log unless it succeeded; returns
    /// stdout, trimmed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({}):\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(30)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs ctr; panics unless it failed; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "ctr {args:?} succeeded but should have failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    }

    /// `ctr images import --snapshotter S` of `archive` (written to a file first).
    pub fn import(&self, snapshotter: &str, archive: &[u8]) -> String {
        let file = self.path("import.tar");
        fs::write(&file, archive).unwrap();
        self.ok(&[
            "images",
            "import",
            "--snapshotter",
            snapshotter,
            file.to_str().unwrap(),
        ])
    }

    /// `ctr snapshots --snapshotter S ls`: (key, parent, kind) rows. The columns are cut
    /// where the header's names start (tabwriter aligns them; keys may hold spaces).
    pub fn snapshots(&self, snapshotter: &str) -> Vec<(String, String, String)> {
        let out = self.ok(&["snapshots", "--snapshotter", snapshotter, "ls"]);
        let mut lines = out.lines();
        let Some(header) = lines.next() else {
            return Vec::new();
        };
        let (Some(p), Some(k)) = (header.find("PARENT"), header.find("KIND")) else {
            panic!("unexpected `ctr snapshots ls` header {header:?}");
        };
        lines
            .map(|l| {
                let cut = |a: usize, b: usize| l.get(a..b.min(l.len())).unwrap_or("").trim();
                (
                    cut(0, p).to_string(),
                    cut(p, k).to_string(),
                    cut(k, l.len()).to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "containerd log ({}), last lines:\n{}",
                self.log_path().display(),
                self.log_tail(60)
            );
        }
        self.stop();
    }
}

/// A pool (20 GiB, sparse), the hpmapper daemon serving the snapshotter on a socket in the
/// temporary directory (base size 1 GiB), and a private containerd using it.
pub struct HpmContainerd {
    /// Declared first: dropped (stopped) before the daemon it uses.
    pub containerd: Containerd,
    /// The pool, the daemon and the guard of its mounts and loop devices.
    pub env: Env,
}

impl HpmContainerd {
    /// Starts the daemon, then containerd.
    pub fn start() -> HpmContainerd {
        let mut env = Env::new_in(Path::new(TMP_PARENT), "20G");
        let socket = env.path("snap.sock");
        env.set_daemon_args(&[
            "--containerd-socket",
            socket.to_str().unwrap(),
            "--containerd-base-size",
            "1G",
        ]);
        env.start_daemon();
        let mut containerd = Containerd::new(env.path("ctd"), &socket);
        containerd.start();
        HpmContainerd { containerd, env }
    }

    /// Restarts the hpmapper daemon (SIGTERM, start again), then waits until containerd,
    /// if running, has reconnected (its proxy client backs off up to 3 s between attempts).
    pub fn restart_daemon(&mut self) {
        let st = self
            .env
            .terminate_daemon(Duration::from_secs(20))
            .expect("the daemon did not stop on SIGTERM");
        assert!(
            st.success(),
            "the daemon exited with {st}:\n{}",
            self.env.log()
        );
        self.env.start_daemon();
        if self.containerd.child.is_some() {
            self.containerd.wait_snapshotter();
        }
    }

    /// The pool devices of containerd's namespace, base volumes included.
    pub fn devices(&self) -> Vec<String> {
        let list = self.env.json(&["device", "list", "--json"]);
        list.as_array()
            .unwrap()
            .iter()
            .filter_map(|d| d["name"].as_str())
            .filter(|n| n.starts_with("containerd/"))
            .map(str::to_string)
            .collect()
    }
}
