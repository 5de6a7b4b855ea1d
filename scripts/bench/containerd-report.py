"""Report for scripts/bench/containerd: reads its raw TSV, prints docs/bench/containerd.md."""
import datetime, os, platform, sys

from reportlib import med, mr, sh

raw, rounds, git, elapsed, active, bench_dir, disk = sys.argv[1:8]
peers = active.split()
start, io = {}, {}
for line in open(raw):
    f = line.rstrip("\n").split("\t")
    if f[0] == "start":
        start.setdefault((f[1], int(f[3])), []).append(float(f[4]))
    elif f[0] == "io":
        io.setdefault((f[1], int(f[3])), []).append(tuple(int(x) for x in f[4:7]))
ns = sorted({k[1] for k in start} | {k[1] for k in io})
MIB = 1 << 20

cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
fs = sh(f"df --output=source,fstype {bench_dir} | tail -1")
print("# containerd snapshotters: `scripts/bench/containerd`\n")
print(f"Date {datetime.date.today()}, command `ROUNDS={rounds} scripts/bench/containerd`, tree {git}, "
      f"{elapsed} s. Machine: {os.cpu_count()} cores ({cpu}), kernel {platform.release()}, bench "
      f"directory {bench_dir} on `{fs}` (disk `{disk}`), {sh('containerd --version')}.\n")
print("## Method\n")
print("One private containerd (own root, state and sockets, CRI plugin disabled) with three "
      "snapshotters: **overlayfs** and **native** (containerd's own; native copies the parent's "
      "tree for every snapshot) and **hpmapper** (`hpmapper daemon --containerd-socket`, "
      "registered as `[proxy_plugins.hpmapper]`; pool with 512K chunks, shared cache 512M). "
      "The images are docker archives made by the script (a static busybox; no registry) and "
      "`ctr images import --snapshotter` unpacks them into each snapshotter. Every measurement "
      f"runs on each snapshotter in turn in each of {rounds} rounds; figures are medians "
      "(min-max) over rounds. Before every run: `sync; echo 3 > /proc/sys/vm/drop_caches` and "
      "`hpmapper cache drop` (cold caches everywhere).\n")
print("1. **Startup**: N `ctr run --snapshotter S` at once, each container `cat`s 25 x 4 MiB "
      "random files (100 MiB) of the image; seconds from the first `ctr run` until all N have "
      "exited 0 (container removal is not timed).")
print("2. **Redundant I/O**: N containers `cat` one 256 MiB image file at once; bytes read from "
      f"and written to disk `{disk}` (/proc/diskstats, whole disk: includes anything else the "
      "machine did) and, for hpmapper, bytes the daemon read from its pool's data file "
      "(`status --json` cache.backend_read_bytes).\n")

print("## 1. Startup, seconds until all N containers exited\n")
print("| N | " + " | ".join(peers) + " | hpmapper vs overlayfs | hpmapper vs native |")
print("|---|" + "---:|" * len(peers) + "---:|---:|")
for n in ns:
    row = [mr(start[(p, n)]) if (p, n) in start else "-" for p in peers]
    def ratio(a, b):
        if (a, n) in start and (b, n) in start:
            return f"{med(start[(b, n)]) / med(start[(a, n)]):.2f}x"
        return "-"
    print(f"| {n} | " + " | ".join(row) + f" | {ratio('hpmapper', 'overlayfs')} | {ratio('hpmapper', 'native')} |")
print("\n(ratios: the peer's median time divided by hpmapper's; above 1 means hpmapper is faster)\n")

print("## 2. Redundant I/O: N containers read one 256 MiB file\n")
print("| N | snapshotter | disk read MiB | disk written MiB | pool data read MiB | pool read / file |")
print("|---|---|---:|---:|---:|---:|")
for n in ns:
    for p in peers:
        v = io.get((p, n))
        if not v:
            continue
        rd = [x[0] / MIB for x in v]; wr = [x[1] / MIB for x in v]; pool = [x[2] / MIB for x in v]
        pr = f"{med(pool) / 256:.2f}x" if p == "hpmapper" else "-"
        pl = mr(pool, "{:.0f}") if p == "hpmapper" else "-"
        print(f"| {n} | {p} | {mr(rd, '{:.0f}')} | {mr(wr, '{:.0f}')} | {pl} | {pr} |")
print()
print("Raw rows: `docs/bench/containerd.tsv` (start: peer, round, N, seconds; io: peer, round, N, "
      "disk read bytes, disk written bytes, pool data read bytes).")
