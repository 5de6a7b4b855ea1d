//! What a test needs of the machine it runs on (root, device nodes, programs), and the one
//! rule for when it is missing: under `CI=true` the test fails, naming what is missing
//! (CI installs everything and runs as root, so a skip there would hide a broken setup);
//! elsewhere it is skipped with a note on stderr.

use std::path::Path;
use std::process::Command;

/// Whether the machine has everything test `test` needs: root if `root`, each path of
/// `devices` (e.g. `/dev/fuse`), each program of `tools` on the PATH. Panics under `CI=true`
/// when something is missing; otherwise prints a note and returns `false` (skip the test).
pub fn require(test: &str, root: bool, devices: &[&str], tools: &[&str]) -> bool {
    let mut missing: Vec<String> = Vec::new();
    if root && !is_root() {
        missing.push("root".into());
    }
    missing.extend(
        devices
            .iter()
            .filter(|d| !Path::new(d).exists())
            .map(|d| d.to_string()),
    );
    missing.extend(tools.iter().filter(|t| !on_path(t)).map(|t| t.to_string()));
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: cannot run under CI=true, missing {missing:?} (scripts/test installs the tools; CI runs as root with /dev/fuse and loop devices)");
    }
    eprintln!("skipping {test}: missing {missing:?} (under CI=true this is a failure)");
    false
}

/// Whether program `tool` is on the PATH (`command -v`).
pub fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether the effective uid is 0 (third field of `Uid:` in /proc/self/status).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
            .unwrap_or(false)
    })
}

/// The kernel's switch for FUSE over io_uring (off by default), global to the machine.
pub const FUSE_URING_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Keeps `fuse.enable_uring` set while alive and puts the machine's value back when dropped.
/// The switch is global: tests that set it must take turns, and run where no other test
/// cares (a test binary of their own, or daemons that say which transport they want).
pub struct FuseUring {
    old: String,
}

impl FuseUring {
    /// Sets the switch on or off. Needs root and a kernel with FUSE io_uring (6.14+).
    pub fn set(on: bool) -> std::io::Result<FuseUring> {
        let old = std::fs::read_to_string(FUSE_URING_PARAM)?
            .trim()
            .to_string();
        std::fs::write(FUSE_URING_PARAM, if on { "Y" } else { "N" })?;
        Ok(FuseUring { old })
    }
}

impl Drop for FuseUring {
    fn drop(&mut self) {
        let _ = std::fs::write(FUSE_URING_PARAM, &self.old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_things_are_found_and_absent_ones_are_not() {
        assert!(on_path("sh"));
        assert!(!on_path("hpm-no-such-program"));
        assert!(require("x", false, &["/"], &["sh"]));
    }
}
