"""Streaming cross-covariance against the way devinterp computes it: store every trace, then torch.cov.

Default problem (the issue's): n = 20,000 training losses and p = 500 query losses per draw,
2,000 draws arriving k = 32 at a time, float64. Providers:

- ``bif_fast``           RunningCrossCovariance, backend ``ext`` (the compiled extension) when built
- ``bif_fast-torch``     RunningCrossCovariance, backend ``torch`` (the pure-torch reference)
- ``devinterp-style``    keep every block, stack to [draws, n + p], ``torch.cov`` of the stack (the full
                         (n+p)² matrix, as devinterp does), slice the cross block
- ``store+cross-gemm``   a stronger two-pass baseline: keep every block, centre, one ``Xcᵀ Yc`` GEMM
- ``generate-only``      draws the same blocks and does nothing: the floor every provider pays

Each (provider, repeat) runs in a fresh subprocess, so peak resident memory above the process's
baseline (after imports) is that provider's own. Draws are generated block by block from a seeded
generator, the way SGLD produces them. Before timing, a reduced problem checks that every provider
returns the same matrix (the correctness gate). Figures: median of ``--repeats`` runs, and ratios
against devinterp-style measured in the same invocation. On CUDA the co-moment update is
memory-bound: achieved GB/s = (read + write of the n × p co-moment per update) / time per update.

    python benchmarks/bench_running_cov.py                  # the issue's problem, CPU, 1 thread
    python benchmarks/bench_running_cov.py --n 2000 --draws 500 --repeats 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.utils import current_rss_mb, peak_rss_mb, quantiles, reset_peak_rss, run_child, write_rows  # noqa: E402

PROVIDERS = ["generate-only", "bif_fast", "bif_fast-torch", "store+cross-gemm", "devinterp-style"]


def _block(i: int, k: int, n: int, p: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(1000 + i)
    z = torch.randn(k, n + p, generator=g, device=device, dtype=dtype)
    # Correlate y with the first x entries and put the streams far from zero (like losses).
    z[:, n:] += 0.5 * z[:, : min(n, p)].sum(dim=1, keepdim=True) / max(1, min(n, p)) ** 0.5
    z += 3.0
    return z[:, :n], z[:, n:]


def _blocks(n: int, p: int, draws: int, k: int, device: str, dtype: torch.dtype):
    done, i = 0, 0
    while done < draws:
        kk = min(k, draws - done)
        yield _block(i, kk, n, p, device, dtype)
        done += kk
        i += 1


def run_provider(provider: str, n: int, p: int, draws: int, k: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Compute the [n, p] cross-covariance of the stream with one provider."""
    import bif_fast

    if provider in ("bif_fast", "bif_fast-torch"):
        backend = "torch" if provider == "bif_fast-torch" else "auto"
        acc = bif_fast.RunningCrossCovariance(n, p, device=device, dtype=dtype, backend=backend)
        for x, y in _blocks(n, p, draws, k, device, dtype):
            acc.update(x, y, check_finite=False)
        return acc.covariance()
    if provider == "generate-only":
        last = None
        for x, _ in _blocks(n, p, draws, k, device, dtype):
            last = x
        return last
    xs, ys = [], []
    for x, y in _blocks(n, p, draws, k, device, dtype):
        xs.append(x.clone())
        ys.append(y.clone())
    x = torch.cat(xs)
    y = torch.cat(ys)
    del xs, ys
    if provider == "devinterp-style":
        full = torch.cov(torch.cat([x, y], dim=1).T)  # [(n + p), (n + p)]
        return full[:n, n:].clone()
    if provider == "store+cross-gemm":
        x -= x.mean(0)
        y -= y.mean(0)
        return (x.T @ y) / (draws - 1)
    raise ValueError(provider)


def _child(args: argparse.Namespace) -> None:
    """Run one provider once; print a JSON line with time and memory."""
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = args.device
    import bif_fast  # noqa: F401  (imports and extension load are part of the baseline)

    # Warm up kernels and the allocator on a tiny problem so first-call costs are not timed.
    run_provider(args.provider, 64, 8, 64, args.k, device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    reset_peak_rss()
    base_rss = current_rss_mb()
    t0 = time.perf_counter()
    out = run_provider(args.provider, args.n, args.p, args.draws, args.k, device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    result = {"seconds": seconds, "peak_rss_above_base_mb": peak_rss_mb() - base_rss}
    if device == "cuda":
        result["peak_cuda_above_base_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    result["checksum"] = float(out.double().sum())
    print(json.dumps(result))


def _gate(device: str, dtype: torch.dtype) -> None:
    n, p, draws, k = 300, 40, 200, 32
    ref = run_provider("devinterp-style", n, p, draws, k, device, dtype)
    for provider in ("bif_fast", "bif_fast-torch", "store+cross-gemm"):
        out = run_provider(provider, n, p, draws, k, device, dtype)
        err = float((out - ref).abs().max() / ref.abs().max())
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        if not err <= tol:
            raise SystemExit(f"correctness gate failed: {provider} differs from devinterp-style by {err:.2e}")
        print(f"gate: {provider:<18} max rel. diff vs devinterp-style {err:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--p", type=int, default=500)
    ap.add_argument("--draws", type=int, default=2_000)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the same for every provider")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--no-record", action="store_true", help="do not append rows to benchmarks/results/")
    ap.add_argument("--provider", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.provider:
        _child(args)
        return

    torch.set_num_threads(args.threads)
    _gate(args.device, getattr(torch, args.dtype))
    shape = f"n={args.n},p={args.p},draws={args.draws},k={args.k}"
    print(f"{shape} {args.dtype} on {args.device}, {args.threads} thread(s), {args.repeats} repeat(s)")
    results: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for provider in args.providers.split(","):
            argv = ["--provider", provider] + [
                f"--{a}={getattr(args, a)}" for a in ("n", "p", "draws", "k", "dtype", "device", "threads")
            ]
            res = run_child(__file__, argv)
            results.setdefault(provider, []).append(res)
            print(f"  run {rep + 1} {provider:<18} {res['seconds']:8.2f} s  +{res['peak_rss_above_base_mb']:8.0f} MB")

    mem_key = "peak_cuda_above_base_mb" if args.device == "cuda" else "peak_rss_above_base_mb"
    summary = {
        p: (quantiles([r["seconds"] for r in rs]), quantiles([r[mem_key] for r in rs])) for p, rs in results.items()
    }
    base_t = summary.get("devinterp-style", (None,))[0]
    base_m = summary.get("devinterp-style", (None, None))[1]
    rows = []
    print(
        f"\n{'provider':<18} {'median s':>9} {'peak MB':>9} {'time ratio':>11} {'mem ratio':>10}  (vs devinterp-style)"
    )
    for provider, ((t50, t20, t80), (m50, m20, m80)) in summary.items():
        tr = f"{base_t[0] / t50:.1f}x" if base_t else "-"
        mr = f"{base_m[0] / max(m50, 1.0):.0f}x" if base_m else "-"
        print(f"{provider:<18} {t50:9.2f} {m50:9.0f} {tr:>11} {mr:>10}")
        common = {"provider": provider, "mode": "stream", "shape": shape, "dtype": args.dtype, "n_runs": args.repeats}
        rows.append({**common, "metric": "time", "unit": "s", "p50": t50, "p20": t20, "p80": t80})
        rows.append({**common, "metric": "peak_mem_above_base", "unit": "MB", "p50": m50, "p20": m20, "p80": m80})
        if base_t and provider != "devinterp-style":
            rows.append({**common, "metric": "speedup_vs_devinterp-style", "unit": "x", "p50": base_t[0] / t50})
            rows.append(
                {**common, "metric": "mem_ratio_vs_devinterp-style", "unit": "x", "p50": base_m[0] / max(m50, 1.0)}
            )
    if args.device == "cuda" and "bif_fast" in summary:
        updates = -(-args.draws // args.k)
        nbytes = 2 * args.n * args.p * torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
        gbs = nbytes * updates / summary["bif_fast"][0][0] / 1e9
        print(f"bif_fast co-moment traffic: {gbs:.0f} GB/s (H200 copy roofline ~4300 GB/s: {gbs / 4300:.0%})")
        rows.append({"provider": "bif_fast", "mode": "stream", "shape": shape, "dtype": args.dtype,
                     "metric": "achieved_bandwidth", "unit": "GB/s", "p50": gbs})  # fmt: skip
    if not args.no_record:
        print(f"recorded in {write_rows('running_cov', rows)}")


if __name__ == "__main__":
    main()
