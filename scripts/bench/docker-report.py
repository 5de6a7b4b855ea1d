"""Report for scripts/bench/docker: reads its raw TSV, prints docs/bench/docker.md (markdown)."""
import datetime, os, platform, sys

from reportlib import med, mr, sh

raw, rounds, full, git, elapsed, active, skipped, bench_dir = sys.argv[1:9]
halt_poll = sys.argv[9] if len(sys.argv) > 9 else "?"
peers = active.split()
cow, start, start0, io = {}, {}, {}, {}
for line in open(raw):
    f = line.rstrip("\n").split("\t")
    if f[0] == "cow":
        cow.setdefault((f[1], f[4], int(f[3])), []).append(float(f[5]))
    elif f[0] in ("start", "start0"):
        (start if f[0] == "start" else start0).setdefault((f[1], int(f[3])), []).append(float(f[4]))
    elif f[0] == "io":
        io.setdefault((f[1], int(f[3])), []).append(int(f[4]))
sizes = [s for s in ["4K", "64K", "1M", "16M", "256M", "1G"] if any(k[1] == s for k in cow)]
ns = sorted({k[1] for k in start} | {k[1] for k in start0} | {k[1] for k in io})
yes = lambda b: "yes" if b else "**NOT met**"

cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
mem = sh("free -g | awk '/Mem:/ {print $2}'")
disk = sh(f"df --output=source,fstype {bench_dir} | tail -1")
print("# Docker storage drivers: `scripts/bench/docker`\n")
peers_env = "" if peers == ["overlay2", "vfs", "btrfs", "hpmapper", "dm-like"] or skipped else \
    f"PEERS=\"{' '.join(peers)}\" "
hp_env = "" if "HALT_POLL_NS" not in halt_poll else f"HALT_POLL_NS={halt_poll.split()[0]} "
experiments = os.environ.get("EXPERIMENTS", "cow startup io")
if experiments.split() != ["cow", "startup", "io"]:
    hp_env += f"EXPERIMENTS=\"{experiments}\" "
if "hpmapper-alt" in peers:
    hp_env += f"ALT_BIN={os.environ.get('ALT_BIN', '?')} "
print(f"Date {datetime.date.today()}, command `{hp_env}ROUNDS={rounds} FULL={full} {peers_env}scripts/bench/docker`, "
      f"tree {git}, {elapsed} s. Machine: {os.cpu_count()} cores ({cpu}), {mem} GiB RAM, kernel "
      f"{platform.release()}, bench directory {bench_dir} on `{disk}`, Docker "
      f"{sh('dockerd --version')}; guest halt polling (cpuidle haltpoll guest_halt_poll_ns): "
      f"{halt_poll}.\n")
print("## Method\n")
print("One private dockerd per peer (own data-root, exec-root, socket and containerd namespaces; "
      "the system dockerd is not touched), all up at once; every measurement is taken on every "
      f"peer in turn (interleaved) in each of {rounds} rounds; figures are medians (min-max) over rounds.\n")
method = {
    "overlay2": "- **overlay2**: `--storage-driver overlay2`, data-root on the bench directory (ext4).",
    "vfs": "- **vfs**: `--storage-driver vfs` (full copies).",
    "btrfs": "- **btrfs**: `--storage-driver btrfs`, data-root a loop-mounted 20 GiB btrfs file.",
    "hpmapper": "- **hpmapper**: `hpmapper pool create` (block CoW, 512K chunks), `hpmapper daemon "
                "--docker` (shared cache, default 512M), graphdriver plugin socket in "
                "/run/docker/plugins.",
    "hpmapper-direct": "- **hpmapper-direct**: hpmapper with `hpmapper daemon --data-io direct` "
                       "(the pool's data file read and written with O_DIRECT, as dm-thin's "
                       "bios reach its data device; pool data cached only by the block cache).",
    "hpmapper-uring": "- **hpmapper-uring**: hpmapper with `hpmapper daemon --fuse-io-uring on` "
                      "(FUSE over io_uring; the kernel's `fuse.enable_uring` on for the run).",
    "hpmapper-alt": "- **hpmapper-alt**: hpmapper as the `hpmapper` peer, run from another build "
                    f"(`ALT_BIN` = {os.environ.get('ALT_DESC', 'unknown')}).",
    "dm-like": "- **dm-like** (devicemapper-like baseline): `hpmapper pool create --cow-granularity "
               "chunk --chunk-size 64K`, `hpmapper daemon --cache-mode per-device --docker` (a "
               "cache per device, and, like dm-thin's bios to its data device, no shared cache "
               "below it: each block read from the data file is dropped from the host page cache "
               "at once).",
}
for p in peers:
    print(method.get(p, f"- **{p}**"))
if skipped:
    print(f"- SKIPPED: {skipped}.")
print()
print("Images are built in each dockerd from a static busybox rootfs (no registry). "
      "1. CoW latency: in a fresh container per round, the static helper "
      "`scripts/bench/cowprobe` first writes and fsyncs a new file outside the image (warm-up: the "
      "container's first journal commit and allocation would otherwise be charged to whichever "
      "image file comes first, always the 4 KiB one), then times open + 4 KiB pwrite at offset 0 + fsync + close on image "
      "files of each size; pass 1 is the first write (the copy-on-write), pass 2 at once, pass 3 "
      "20 ms later (before each file). CoW cost = pass 1 - pass 3. "
      "2. Startup: `sync; echo 3 > /proc/sys/vm/drop_caches` and `hpmapper cache drop` in both hpmapper daemons, then N `docker run -d` in parallel, "
      "each `cat /app/lib/* > /dev/null` over 25 x 4 MiB random files (100 MiB) in the image; time "
      "from the first `docker run` until `docker wait` has returned 0 for all N. "
      "3. Redundant I/O: for each round and N, a new image layer holding a fresh 256 MiB random "
      "file is built (the shared cache outlives containers, so reusing one file would measure a "
      "warm cache); host caches dropped; N containers `cat` it at once; "
      "`hpmapper status --json` cache.backend_read_bytes before/after.\n")
print("Cold starts: experiment 2 drops the host page cache and both hpmapper daemons' block "
      "caches (`hpmapper cache drop`) before every run. The dm-like daemon also drops from the "
      "host page cache every block it reads from its data file, as dm-thin's reads reach the "
      "disk without a shared cache.\n")

if cow:
    print("## 1. Copy-on-write latency (ms)\n")
    print("| driver | size | pass 1 | pass 2 | pass 3 | pass1/pass3 | CoW cost (p1-p3) |")
    print("|---|---|---|---|---|---|---|")
    for p in peers:
        for s in sizes:
            if (p, s, 1) not in cow: continue
            p1, p2, p3 = cow[(p, s, 1)], cow[(p, s, 2)], cow[(p, s, 3)]
            print(f"| {p} | {s} | {mr(p1, '{:.3f}')} | {mr(p2, '{:.3f}')} | {mr(p3, '{:.3f}')} | "
                  f"{med(p1)/med(p3):.2f} | {med(p1)-med(p3):.3f} |")
    print("\nPass 1 (first write) medians, ms, by driver:\n")
    print("| size | " + " | ".join(peers) + " | overlay2 / hpmapper |")
    print("|---|" + "---|" * (len(peers) + 1))
    for s in sizes:
        row = [f"{med(cow[(p, s, 1)]):.3f}" if (p, s, 1) in cow else "-" for p in peers]
        ratio = (f"{med(cow[('overlay2', s, 1)]) / med(cow[('hpmapper', s, 1)]):.1f}x"
                 if ("overlay2", s, 1) in cow and ("hpmapper", s, 1) in cow else "-")
        print(f"| {s} | " + " | ".join(row) + f" | {ratio} |")
    if ("hpmapper", sizes[0], 1) in cow:
        print("\nTargets for hpmapper:\n")
        print("| size | pass1/pass3 | <= 1.2x (BENCHMARKS.md) | <= 2x (the issue) | pass1/pass2 (for reference) | overlay2 / hpmapper pass 1 | >= 10x from 16M up |")
        print("|---|---|---|---|---|---|---|")
        for s in sizes:
            q = med(cow[("hpmapper", s, 1)]) / med(cow[("hpmapper", s, 3)])
            o = (med(cow[("overlay2", s, 1)]) / med(cow[("hpmapper", s, 1)])
                 if ("overlay2", s, 1) in cow else None)
            big = s in ("16M", "256M", "1G")
            q2 = med(cow[("hpmapper", s, 1)]) / med(cow[("hpmapper", s, 2)])
            print(f"| {s} | {q:.2f} | {yes(q <= 1.2)} | {yes(q <= 2.0)} | {q2:.2f} | "
                  f"{'-' if o is None else f'{o:.1f}x'} | {(yes(o >= 10) if o is not None else '-') if big else 'n/a'} |")
    if any(med(cow[("hpmapper", s, 3)]) > med(cow[("hpmapper", s, 1)]) for s in sizes if ("hpmapper", s, 3) in cow):
        print("\nNote: hpmapper's pass 3 (after 20 ms) is slower than its pass 1 here, so the pass1/pass3 "
              "targets are met with room to spare partly because pass 3 is expensive, not only because "
              "pass 1 is cheap; pass1/pass2 (both in one timestamp tick) is shown as a second view of "
              "the CoW cost.")
    print()

if start:
    print("## 2. Container startup, cold host cache (seconds until all N have exited)\n")
    print("| N | " + " | ".join(peers) + " |")
    print("|---|" + "---|" * len(peers))
    for n in ns:
        print(f"| {n} | " + " | ".join(mr(start[(p, n)]) if (p, n) in start else "-" for p in peers) + " |")
    if ("hpmapper", 16) in start:
        h = med(start[("hpmapper", 16)])
        print("\nTargets at N = 16:\n")
        print("| target | ratio | met |")
        print("|---|---|---|")
        if ("dm-like", 16) in start:
            d = med(start[("dm-like", 16)])
            print(f"| hpmapper at least 2.0x faster than dm-like | dm-like / hpmapper = {d/h:.2f}x | {yes(d/h >= 2.0)} |")
        if ("overlay2", 16) in start:
            o = med(start[("overlay2", 16)])
            print(f"| hpmapper within 1.3x of overlay2 | hpmapper / overlay2 = {h/o:.2f}x | {yes(h/o <= 1.3)} |")
        for variant in ("hpmapper-direct", "hpmapper-uring", "hpmapper-alt"):
            if (variant, 16) not in start:
                continue
            hd = med(start[(variant, 16)])
            if ("dm-like", 16) in start:
                print(f"| (the same, {variant}) | dm-like / {variant} = {med(start[('dm-like', 16)])/hd:.2f}x | {yes(med(start[('dm-like', 16)])/hd >= 2.0)} |")
            if ("overlay2", 16) in start:
                print(f"| (the same, {variant}) | {variant} / overlay2 = {hd/med(start[('overlay2', 16)]):.2f}x | {yes(hd/med(start[('overlay2', 16)]) <= 1.3)} |")
    print()

if start0:
    print("## 2b. Container startup without reads (experiment startup-empty: each container runs `true`)\n")
    print("The same as experiment 2 (caches dropped, N `docker run -d` at once, until all have exited), but the "
          "containers read nothing: the cost of creating, mounting and starting them alone. "
          "Experiment 2's time minus this one's is roughly what reading the 100 MiB startup set costs.\n")
    print("| N | " + " | ".join(peers) + " |")
    print("|---|" + "---|" * len(peers))
    for n in ns:
        if any((p, n) in start0 for p in peers):
            print(f"| {n} | " + " | ".join(mr(start0[(p, n)]) if (p, n) in start0 else "-" for p in peers) + " |")
    if ("hpmapper", 16) in start0 and ("overlay2", 16) in start0:
        line = (f"\nAt N = 16: hpmapper / overlay2 = "
                f"{med(start0[('hpmapper', 16)]) / med(start0[('overlay2', 16)]):.2f}x without reads")
        if ("hpmapper", 16) in start and ("overlay2", 16) in start:
            dh = med(start[("hpmapper", 16)]) - med(start0[("hpmapper", 16)])
            do = med(start[("overlay2", 16)]) - med(start0[("overlay2", 16)])
            line += (f"; the reads add {dh:.2f} s to hpmapper's time and {do:.2f} s to overlay2's "
                     "(differences of medians)")
        print(line + ".")
    print()

if io:
    MiB = 1 << 20
    F = 256 * MiB
    print("## 3. Redundant I/O: bytes read from the pool's data file, N containers reading one 256 MiB file\n")
    print("| N | driver | backend read MiB | x file | target | met |")
    print("|---|---|---|---|---|---|")
    for n in ns:
        for p in ("hpmapper", "hpmapper-direct", "hpmapper-uring", "hpmapper-alt", "dm-like"):
            if (p, n) not in io: continue
            v = io[(p, n)]
            x = med(v) / F
            if p.startswith("hpmapper"):
                tgt, ok = "about 1x (<= 1.1x)", x <= 1.1
            else:
                tgt, ok = f"about {n}x (baseline)", abs(x - n) <= 0.1 * n
            print(f"| {n} | {p} | {med(v)/MiB:.0f} ({min(v)/MiB:.0f}-{max(v)/MiB:.0f}) | {x:.2f} | {tgt} | {yes(ok)} |")
    print()
print(f"Raw figures: `{os.path.basename(os.environ.get('HPM_RAW_NAME', 'docker.tsv'))}` beside this file. "
      "No plots: matplotlib is not installed on this machine.")
