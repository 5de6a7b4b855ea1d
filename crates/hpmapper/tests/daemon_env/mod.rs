//! The harness of the daemon tests: a pool and a run directory in a temporary directory, the
//! real `hpmapper daemon` running on them, the CLI pointed at both, and a guard that leaves
//! nothing behind when a test fails half way: it unmounts what the test mounted under the
//! temporary directory, stops the daemon (SIGTERM, then SIGKILL), lazily detaches what is
//! left mounted there (a dead FUSE mount) and detaches the loop devices backed by files in it.
//!
//! It never touches a mount or a loop device outside its own temporary directory: other
//! tests (and other processes) use loop devices at the same time.

use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_hpmapper");
/// One mebibyte.
pub const MIB: usize = 1 << 20;

/// How long the daemon may take to answer after start, or to exit after SIGTERM.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether this machine can run `test`: root, /dev/fuse (the daemon always mounts its FUSE
/// export), loop devices if `needs_loop`, and `tools` on the PATH. A missing requirement fails
/// the test under CI=true and skips it with a note otherwise.
pub fn requirements(test: &str, needs_loop: bool, tools: &[&str]) -> bool {
    let devices: &[&str] = if needs_loop {
        &["/dev/fuse", "/dev/loop-control"]
    } else {
        &["/dev/fuse"]
    };
    hpm_testkit::host::require(test, true, devices, tools)
}

/// A pool at `<tmp>/pool`, a run directory at `<tmp>/run`, and the daemon serving them.
pub struct Env {
    /// Removed when the guard drops, after `Drop::drop` unmounted and detached.
    _tmp: TempDir,
    /// The temporary directory, canonical (as /proc/self/mountinfo and sysfs report paths).
    root: PathBuf,
    /// The pool directory.
    pub pool: PathBuf,
    /// The daemon's run directory.
    pub run_dir: PathBuf,
    daemon: Option<Child>,
    daemon_args: Vec<String>,
}

impl Env {
    /// A fresh 2 GiB pool (sparse) and no daemon yet.
    pub fn new() -> Env {
        Env::new_in(&std::env::temp_dir(), "2G")
    }

    /// A fresh sparse pool of `capacity` (a CLI size) in a new temporary directory under
    /// `parent`, and no daemon yet. Its name is short (`hpm` + 6 characters): dockerd and
    /// containerd put unix sockets below it, whose paths must stay under 108 bytes.
    pub fn new_in(parent: &Path, capacity: &str) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("hpm")
            .tempdir_in(parent)
            .unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let env = Env {
            pool: root.join("pool"),
            run_dir: root.join("run"),
            root,
            _tmp: tmp,
            daemon: None,
            daemon_args: Vec::new(),
        };
        env.ok(&["pool", "create", "--capacity", capacity]);
        env
    }

    /// A fresh pool with the daemon started and answering.
    pub fn with_daemon(extra_args: &[&str]) -> Env {
        let mut env = Env::new();
        env.set_daemon_args(extra_args);
        env.start_daemon();
        env
    }

    /// The arguments every later `start_daemon` adds to `daemon --pool P --run-dir R`.
    pub fn set_daemon_args(&mut self, extra_args: &[&str]) {
        self.daemon_args = extra_args.iter().map(|s| s.to_string()).collect();
    }

    /// `<tmp>/rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// The daemon's log (stderr of every daemon this environment started).
    fn log_path(&self) -> PathBuf {
        self.root.join("daemon.log")
    }

    /// Starts `hpmapper daemon --pool P --run-dir R` and waits until it answers.
    pub fn start_daemon(&mut self) {
        assert!(self.daemon.is_none(), "a daemon is already running");
        let log = append(&self.log_path());
        let child = Command::new(BIN)
            .arg("daemon")
            .arg("--pool")
            .arg(&self.pool)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .args(["--log-level", "info"])
            .args(&self.daemon_args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        self.wait_ready();
    }

    /// Polls until `run/control.sock` exists and `hpmapper status` succeeds; panics with the
    /// daemon's log if it exits or does not answer in time.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        loop {
            if let Some(st) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                self.daemon = None;
                panic!("the daemon exited at start ({st}):\n{}", self.log());
            }
            // A socket left by a killed daemon exists but refuses connections, so `status`
            // is what tells that this daemon answers.
            if self.run_dir.join("control.sock").exists() && self.run(&["status"]).status.success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not answer within {DAEMON_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the daemons wrote on stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILLs the daemon and reaps it.
    pub fn kill_daemon(&mut self) {
        let mut child = self.daemon.take().expect("no daemon running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends the running daemon `sig` (a `kill` signal name), leaving it to exit.
    #[allow(dead_code)] // not every test binary uses it
    pub fn signal_daemon(&self, sig: &str) {
        signal(self.daemon.as_ref().expect("no daemon running").id(), sig);
    }

    /// SIGTERMs the daemon; returns its exit status, or None if it did not exit within
    /// `timeout` (it is then SIGKILLed).
    pub fn terminate_daemon(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.daemon.take().expect("no daemon running");
        stop(child, timeout)
    }

    /// The CLI with `$HPMAPPER_POOL` and `$HPMAPPER_RUN_DIR` pointing here, stdin empty.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("HPMAPPER_POOL", &self.pool)
            .env("HPMAPPER_RUN_DIR", &self.run_dir)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }

    /// Runs the CLI.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs the CLI with `input` on stdin.
    pub fn run_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        output_with_stdin(self.command(args), input)
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> Vec<u8> {
        self.succeeded(args, self.run(args))
    }

    /// `ok`, as text.
    pub fn ok_text(&self, args: &[&str]) -> String {
        String::from_utf8(self.ok(args)).unwrap()
    }

    /// Runs a command that must succeed and print JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "{args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out)
            )
        })
    }

    /// Checks that a command succeeded (panics with its output and the daemon's log
    /// otherwise); returns its stdout.
    pub fn succeeded(&self, args: &[&str], out: Output) -> Vec<u8> {
        assert!(
            out.status.success(),
            "{}\ndaemon log:\n{}",
            show(args, &out),
            self.log()
        );
        out.stdout
    }

    /// Runs a command that must fail with status 1 and one line on stderr; returns the line.
    pub fn fails(&self, args: &[&str]) -> String {
        failed(args, self.run(args))
    }

    /// `device read NAME --offset OFF --length LEN` to stdout.
    pub fn read(&self, name: &str, offset: usize, length: usize) -> Vec<u8> {
        let (offset, length) = (offset.to_string(), length.to_string());
        self.ok(&[
            "device", "read", name, "--offset", &offset, "--length", &length,
        ])
    }

    /// `device attach NAME`: checks that it printed one `/dev/loopN` line; returns it.
    pub fn attach(&self, name: &str) -> PathBuf {
        let out = self.ok_text(&["device", "attach", name]);
        let dev = out.trim_end();
        assert!(
            out.lines().count() == 1
                && dev
                    .strip_prefix("/dev/loop")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
            "`device attach {name}` printed {out:?}, not /dev/loopN"
        );
        PathBuf::from(dev)
    }

    /// The daemon's FUSE file of device `name` (a loop device's backing file).
    pub fn device_file(&self, name: &str) -> PathBuf {
        self.run_dir.join("dev").join(name)
    }

    /// Loop devices (`/dev/loopN`) whose backing file is `file`.
    pub fn loops_backed_by(&self, file: &Path) -> Vec<PathBuf> {
        loops_where(|b| b == file)
    }

    /// Waits until no loop device is backed by `file` (autoclear detaches one once its last
    /// holder closes it, which can lag a detach or a lazy umount).
    pub fn wait_no_loop(&self, file: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.loops_backed_by(file).is_empty() {
            assert!(
                Instant::now() < deadline,
                "{:?} still backed by {} after 10 s",
                self.loops_backed_by(file),
                file.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Mount points under the temporary directory with their filesystem type, deepest first.
    pub fn mounts(&self) -> Vec<(PathBuf, String)> {
        let mut v: Vec<(PathBuf, String)> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE ...
                let mut fields = l.split(' ');
                let mountpoint = unescape_mountinfo(fields.nth(4)?);
                let fstype = fields.skip_while(|&f| f != "-").nth(1)?.to_string();
                Some((mountpoint, fstype))
            })
            .filter(|(m, _)| m.starts_with(&self.root))
            .collect();
        v.sort_by_key(|(m, _)| std::cmp::Reverse(m.as_os_str().len()));
        v
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "daemon log ({}):\n{}",
                self.log_path().display(),
                self.log()
            );
        }
        // Filesystems on our loop devices first, while the daemon still serves them.
        for (m, fstype) in self.mounts() {
            if !fstype.starts_with("fuse") {
                umount_or_detach(&m);
            }
        }
        if let Some(child) = self.daemon.take() {
            stop(child, DAEMON_TIMEOUT);
        }
        // What is left is dead (the FUSE export of a killed daemon) or stuck: detach it.
        for (m, _) in self.mounts() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        let root = self.root.clone();
        for dev in loops_where(|b| b.starts_with(&root)) {
            detach_loop(&dev);
        }
    }
}

/// Detaches `/dev/loopN` (`LOOP_CLR_FD`: at once if no one holds it, else when the last
/// holder closes it). Errors are ignored: this is cleanup.
pub fn detach_loop(dev: &Path) {
    let n = dev.to_str().and_then(|d| d.strip_prefix("/dev/loop"));
    if let Some(n) = n.and_then(|n| n.parse().ok()) {
        let _ = hpm_io::loopdev::LoopDevice::open(n).and_then(|d| d.detach());
    }
}

/// SIGTERM, then SIGKILL after `timeout`; the exit status if SIGTERM ended it.
pub fn stop(mut child: Child, timeout: Duration) -> Option<ExitStatus> {
    signal(child.id(), "TERM");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// `umount TARGET`, and if that fails or hangs for 10 s, `umount -l TARGET`.
fn umount_or_detach(target: &Path) {
    if let Ok(mut c) = Command::new("umount")
        .arg(target)
        .stderr(Stdio::null())
        .spawn()
    {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match c.try_wait() {
                Ok(Some(st)) if st.success() => return,
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = Command::new("umount").arg("-l").arg(target).status();
}

/// Mount points in /proc/self/mountinfo escape space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(o) if b[i] == b'\\' => {
                out.push(o.iter().fold(0u8, |v, c| v * 8 + (c - b'0')));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Attached loop devices whose backing file (sysfs `loop/backing_file`, " (deleted)" cut)
/// satisfies `keep`.
fn loops_where(keep: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("loop")?;
            let mut backing = String::new();
            fs::File::open(format!("/sys/block/{name}/loop/backing_file"))
                .ok()?
                .read_to_string(&mut backing)
                .ok()?;
            let backing = backing.trim_end_matches('\n');
            let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
            keep(Path::new(backing)).then(|| PathBuf::from(format!("/dev/{name}")))
        })
        .collect();
    v.sort();
    v
}

/// A command's status and output, for failure messages.
pub fn show(args: &[&str], out: &Output) -> String {
    format!(
        "{args:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Checks that a CLI command failed with status 1 and one `hpmapper: ` line on stderr;
/// returns the line.
pub fn failed(args: &[&str], out: Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{}", show(args, &out));
    let stderr = String::from_utf8(out.stderr.clone()).unwrap();
    assert!(!stderr.contains("panicked"), "{}", show(args, &out));
    assert_eq!(stderr.lines().count(), 1, "{}", show(args, &out));
    assert!(stderr.starts_with("hpmapper: "), "{}", show(args, &out));
    stderr.trim_end().to_string()
}

/// Runs a tool; panics with its output unless it succeeds. Returns stdout.
pub fn run_tool(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Mounts `dev` at `target` (created).
pub fn mount(dev: &Path, target: &Path) {
    fs::create_dir_all(target).unwrap();
    run_tool(Command::new("mount").arg(dev).arg(target));
}

/// Unmounts `target`.
pub fn umount(target: &Path) {
    run_tool(Command::new("umount").arg(target));
}

/// `e2fsck -fn DEV`: panics with the report unless the filesystem is clean.
pub fn fsck_clean(dev: &Path) {
    run_tool(Command::new("e2fsck").arg("-fn").arg(dev));
}

/// `len` bytes that differ for every 8-byte word and every `seed`, with no zero block.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len.next_multiple_of(8));
    for i in 0..len.div_ceil(8) as u64 {
        let x = (i ^ seed.rotate_left(32))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(seed)
            | 1;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// `kill -SIG pid` with the shell's builtin: no procps needed, and std sends only SIGKILL.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -{sig} {pid}"))
        .stderr(Stdio::null())
        .status();
}

/// The last `lines` lines of the text file `path` (empty if it cannot be read).
#[allow(dead_code)] // for the dockerd and containerd harnesses
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Runs `cmd` with `input` on its stdin, written by a thread of its own (the command may
/// answer, and fail, before it has read all of it); returns its output.
pub fn output_with_stdin(mut cmd: Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// `path` opened for appending (created if missing): the log of a process a harness starts.
pub fn append(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}
