"""Per-token loss without logits: bif_fast.per_token_cross_entropy against F.cross_entropy(lm_head(h)).

N = 4,096 tokens, H ∈ {512, 2,560}, V = 50,304 (Pythia's padded vocabulary). Modes: ``fwd`` (what the
BIF evaluates at every draw) and ``fwd+bwd`` (the SGLD gradient). Providers:

- ``bif_fast``   per_token_cross_entropy (Triton on CUDA; on CPU the chunked torch fallback)
- ``torch``      F.cross_entropy(h @ W.T, reduction="none"): the [N, V] logits (and their
                 log-softmax) are materialised

Each (provider, mode, shape) run is a fresh process, so peak memory above the process's baseline is the
provider's own (CUDA: max_memory_allocated; CPU: peak RSS). A correctness gate compares the providers
before timing. On CUDA, TFLOP/s counts the lm_head GEMM (2·N·V·H forward, 3× that with backward)
against the H200's ~790 TFLOP/s bf16 rate.

    python benchmarks/bench_cross_entropy.py                     # CPU: fp32; CUDA: bf16
    python benchmarks/bench_cross_entropy.py --hidden 512 --repeats 1
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
import torch.nn.functional as F  # noqa: E402

from benchmarks.utils import current_rss_mb, peak_rss_mb, quantiles, reset_peak_rss, run_child, write_rows  # noqa: E402

BF16_PEAK_TFLOPS = 790.0


def _inputs(n: int, h: int, v: int, device: str, dtype: torch.dtype, grad: bool):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device=device, dtype=dtype).requires_grad_(grad)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight, targets


def _loss(provider: str, hidden, weight, targets):
    if provider == "bif_fast":
        import bif_fast

        return bif_fast.per_token_cross_entropy(hidden, weight, targets)
    return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")


def _run_once(provider: str, mode: str, hidden, weight, targets, device: str) -> float:
    t0 = time.perf_counter()
    loss = _loss(provider, hidden, weight, targets)
    if mode == "fwd+bwd":
        loss.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _child(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    grad = args.mode == "fwd+bwd"
    import bif_fast  # noqa: F401

    hidden, weight, targets = _inputs(args.n, args.hidden, args.vocab, args.device, dtype, grad)
    small = _inputs(64, args.hidden, 1000, args.device, dtype, grad)
    _run_once(args.provider, args.mode, *small, args.device)  # warm-up: kernel compile, allocator
    times = []
    for rep in range(args.inner):
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated()
        reset_peak_rss()
        base = current_rss_mb()
        hidden.grad = weight.grad = None
        times.append(_run_once(args.provider, args.mode, hidden, weight, targets, args.device))
        if rep == 0:
            mem = peak_rss_mb() - base
            if args.device == "cuda":
                mem = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    print(json.dumps({"seconds": sorted(times)[len(times) // 2], "peak_mb": mem}))


def _gate(device: str, dtype: torch.dtype) -> None:
    hidden, weight, targets = _inputs(256, 64, 5003, device, dtype, False)
    a = _loss("bif_fast", hidden, weight, targets)
    b = _loss("torch", hidden, weight, targets)
    err = float((a - b).abs().max() / b.abs().max())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if not err <= tol:
        raise SystemExit(f"correctness gate failed: relative difference {err:.2e}")
    print(f"gate: bif_fast vs torch max rel. diff {err:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--hidden", default="512,2560")
    ap.add_argument("--vocab", type=int, default=50_304)
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per (provider, mode, shape)")
    ap.add_argument("--inner", type=int, default=1, help="timed runs inside each process (median)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--provider", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.provider:
        args.hidden = int(args.hidden)
        _child(args)
        return
    _gate(args.device, getattr(torch, args.dtype))
    rows = []
    for h in (int(x) for x in args.hidden.split(",")):
        for mode in args.modes.split(","):
            res: dict[str, list[dict]] = {"bif_fast": [], "torch": []}
            for _ in range(args.repeats):
                for provider in res:
                    argv = [f"--provider={provider}", f"--mode={mode}", f"--n={args.n}", f"--hidden={h}",
                            f"--vocab={args.vocab}", f"--device={args.device}", f"--dtype={args.dtype}",
                            f"--inner={args.inner}"]  # fmt: skip
                    res[provider].append(run_child(__file__, argv))
            shape = f"N={args.n},H={h},V={args.vocab}"
            t = {p: quantiles([r["seconds"] for r in rs]) for p, rs in res.items()}
            m = {p: quantiles([r["peak_mb"] for r in rs]) for p, rs in res.items()}
            print(f"\n{shape} {args.dtype} {mode} on {args.device}")
            flops = 2 * args.n * args.vocab * h * (3 if mode == "fwd+bwd" else 1)
            for p in res:
                extra = ""
                if args.device == "cuda":
                    tflops = flops / t[p][0] / 1e12
                    extra = f"  {tflops:6.1f} TFLOP/s ({tflops / BF16_PEAK_TFLOPS:.0%} of bf16 peak)"
                    rows.append({"provider": p, "mode": mode, "shape": shape, "dtype": args.dtype,
                                 "metric": "tflops", "unit": "TFLOP/s", "p50": tflops})  # fmt: skip
                print(f"  {p:<9} {t[p][0] * 1e3:10.1f} ms  peak +{m[p][0]:8.0f} MB{extra}")
                common = {"provider": p, "mode": mode, "shape": shape, "dtype": args.dtype, "n_runs": args.repeats}
                rows.append({**common, "metric": "time", "unit": "ms", "p50": t[p][0] * 1e3, "p20": t[p][1] * 1e3,
                             "p80": t[p][2] * 1e3})  # fmt: skip
                rows.append({**common, "metric": "peak_mem_above_base", "unit": "MB", "p50": m[p][0], "p20": m[p][1],
                             "p80": m[p][2]})  # fmt: skip
            speed, mem = t["torch"][0] / t["bif_fast"][0], m["torch"][0] / max(m["bif_fast"][0], 1.0)
            print(f"  bif_fast: {speed:.2f}x the speed, {mem:.1f}x less peak memory than torch")
            common = {"provider": "bif_fast", "mode": mode, "shape": shape, "dtype": args.dtype, "n_runs": args.repeats}
            rows.append({**common, "metric": "speedup_vs_torch", "unit": "x", "p50": speed})
            rows.append({**common, "metric": "mem_ratio_vs_torch", "unit": "x", "p50": mem})
    if not args.no_record:
        print(f"\nrecorded in {write_rows('cross_entropy', rows)}")


if __name__ == "__main__":
    main()
