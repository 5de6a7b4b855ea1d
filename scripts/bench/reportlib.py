"""Helpers shared by the benchmark report scripts (docker-report.py, containerd-report.py)."""
import statistics
import subprocess

med = statistics.median


def mr(v, fmt="{:.2f}"):
    """Median of `v` with its range: "m (min-max)"."""
    return f"{fmt.format(med(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def sh(cmd):
    """A shell command's standard output, stripped; "?" if it cannot run."""
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return "?"
