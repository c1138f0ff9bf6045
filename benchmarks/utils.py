"""Shared benchmark helpers: environment metadata, peak-memory probes and the CSV row writer.

Every measurement is appended as one row to ``benchmarks/results/<op>.csv`` with the columns of
``FIELDS``, so figures from different machines and commits can be compared.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import resource
import statistics
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = [
    "op", "provider", "mode", "shape", "dtype", "metric", "unit", "p50", "p20", "p80", "n_runs",
    "hardware", "torch", "triton", "cuda", "bif_fast_version", "git_sha", "timestamp",
]  # fmt: skip


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} cpu, {torch.get_num_threads()} threads"


def reset_peak_rss() -> None:
    """Reset this process's resident-memory high-water mark (Linux: ``clear_refs`` 5), so a peak read
    later is this measurement's own and not, e.g., a parent's carried over the fork."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory in MB (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) of a list of measurements."""
    v = sorted(values)
    if len(v) == 1:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=10, method="inclusive")
    return statistics.median(v), q[1], q[7]


def write_rows(op: str, rows: list[dict]) -> Path:
    """Append rows (dicts with at least provider/metric/unit/p50) to results/<op>.csv."""
    import bif_fast

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{op}.csv"
    new = not path.exists()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    meta = {
        "op": op,
        "hardware": hardware(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "bif_fast_version": bif_fast.__version__,
        "git_sha": git_sha(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({k: v for k, v in {**meta, **row}.items() if k in FIELDS})
    return path


#: glibc malloc with its mmap and trim thresholds pinned (they otherwise grow with the first large frees):
#: temporaries up to 32 MB are then served from a retained heap instead of freshly zeroed pages, in
#: every process alike. Without it, a process that happens to allocate and free large buffers early
#: runs its later model passes faster (measured: GPT-NeoX evaluation 85-92 ms per draw in a fresh
#: process, 78-81 ms after a compute_bif run or with these settings).
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def run_child(script: str, argv: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``python script *argv`` in a fresh process (so its peak memory is its own) and return the
    JSON object it prints on its last line. ``env``: extra environment variables."""
    import json
    import sys

    out = subprocess.run(
        [sys.executable, script, *argv], capture_output=True, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"{script} {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
