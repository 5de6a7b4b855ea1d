# Shared by scripts/demo, scripts/test and scripts/bench/*: toolchain on PATH, system packages.
# shellcheck shell=bash

export PATH="$HOME/.cargo/bin:/usr/local/cargo/bin:$PATH"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export ROOT

say() { printf '\n== %s\n' "$*"; }

# ensure_packages CMD:PKG ...: installs the Debian package PKG when command CMD is missing.
ensure_packages() {
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages: ${missing[*]}; run as root or install them" >&2
        return 1
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo not found: install Rust 1.95 (rustup) first" >&2
        return 1
    fi
}

# Benchmarks only: the guest's cpuidle-haltpoll window (how long an idle vCPU of a KVM guest
# polls before it halts; a halted vCPU takes tens of microseconds to wake). halt_poll_now
# prints it ("none" without the haltpoll driver); halt_poll_set NS sets it, remembering the
# machine's own value (HALT_POLL_OLD) the first time; halt_poll_restore puts that back (call
# it on exit); halt_poll_desc says what a run used, for reports.
HALT_POLL_PARAM=/sys/module/haltpoll/parameters/guest_halt_poll_ns
HALT_POLL_OLD=""
halt_poll_now() { cat "$HALT_POLL_PARAM" 2>/dev/null || echo none; }
halt_poll_set() {
    local old
    old=$(cat "$HALT_POLL_PARAM" 2>/dev/null) || {
        echo "error: HALT_POLL_NS given but this machine has no $HALT_POLL_PARAM" >&2
        return 1
    }
    [ -n "$HALT_POLL_OLD" ] || HALT_POLL_OLD=$old
    echo "$1" >"$HALT_POLL_PARAM"
}
halt_poll_restore() {
    if [ -n "$HALT_POLL_OLD" ]; then echo "$HALT_POLL_OLD" >"$HALT_POLL_PARAM"; fi
}
halt_poll_desc() {
    if [ -n "$HALT_POLL_OLD" ]; then
        echo "$(halt_poll_now) ns, set by HALT_POLL_NS for this run (the machine's own: $HALT_POLL_OLD)"
    else
        echo "$(halt_poll_now) (the machine's own setting)"
    fi
}

# The kernel's switch for FUSE over io_uring (off by default; hpmapper uses it with `daemon
# --fuse-io-uring on`). fuse_uring_on turns it on, remembering the machine's own value
# (FUSE_URING_OLD) the first time; fuse_uring_restore puts that back (call it on exit).
FUSE_URING_PARAM=/sys/module/fuse/parameters/enable_uring
FUSE_URING_OLD=""
fuse_uring_on() {
    local old
    old=$(cat "$FUSE_URING_PARAM" 2>/dev/null) || {
        echo "error: this kernel has no $FUSE_URING_PARAM (FUSE over io_uring needs 6.14+)" >&2
        return 1
    }
    [ -n "$FUSE_URING_OLD" ] || FUSE_URING_OLD=$old
    echo Y >"$FUSE_URING_PARAM"
}
fuse_uring_restore() {
    if [ -n "$FUSE_URING_OLD" ]; then echo "$FUSE_URING_OLD" >"$FUSE_URING_PARAM"; fi
}
