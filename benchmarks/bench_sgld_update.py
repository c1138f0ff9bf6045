"""Time per sampler step: bif_fast's fused step against devinterp 2.0.1's optimizers and a naive torch loop.

Models are transformer-shaped parameter lists (12 blocks of qkv, out, up, down projections, two
LayerNorms each, plus embeddings): ~1M and ~50M parameters in ~100 tensors. Gradients are fixed
random tensors, so only the optimizer step is timed (median over ``--steps`` steps of each of
``--repeats`` runs, providers interleaved in one process). ``bif_fast`` is the default layout (tensors of
at least 65,536 elements updated in place, one launch each; smaller ones packed), ``bif_fast-packed``
every tensor packed into one buffer (one launch per step, a copy of the weights). Update rules:

- ``sgld``     bif_fast ``SGLD`` | devinterp ``SGMCMC.sgld`` | naive per-tensor torch loop
- ``rmsprop``  bif_fast ``SGLD(precondition="rmsprop")`` | devinterp ``SGMCMC.rmsprop_sgld`` | naive loop
- ``baoab``    bif_fast ``SGLD(sampler="baoab")`` | naive loop (devinterp has no kinetic sampler)

On CUDA it also reports the bandwidth the fused step achieves, counting the bytes it must move
(sgld: read w, g, w*, write w = 16 B/param in fp32; rmsprop and baoab add the state: 24 B/param),
against a device-to-device copy measured in the same run. devinterp is optional: without it those
rows are skipped with a message.

    python benchmarks/bench_sgld_update.py                       # both sizes, all rules, CPU or GPU
    python benchmarks/bench_sgld_update.py --sizes 1m --steps 5  # quick look
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import bif_fast  # noqa: E402
from benchmarks.utils import quantiles, write_rows  # noqa: E402

SIZES = {"1m": 80, "50m": 586}  # model width d: 12 blocks × 12 d² ≈ 1M / 50M
LR, NBETA, LOC = 1e-4, 100.0, 100.0


def transformer_params(d: int, device: str, dtype: torch.dtype, layers: int = 12, vocab: int = 256) -> list:
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    shapes += [(d,), (d,)]
    g = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.nn.Parameter((0.02 * torch.randn(s, generator=g)).to(device=device, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = (0.01 * torch.randn(p.shape, generator=g)).to(device=device, dtype=dtype)
    return params


class NaiveLoop:
    """The textbook per-tensor implementation: a handful of eager ops per tensor per step."""

    def __init__(self, params, rule: str):
        self.params, self.rule = params, rule
        self.anchor = [p.detach().clone() for p in params]
        self.state = [torch.zeros_like(p) if rule == "rmsprop" else torch.randn_like(p) for p in params]
        self.c = math.exp(-LR)
        self.first = True

    @torch.no_grad()
    def step(self):
        for p, a, s in zip(self.params, self.anchor, self.state, strict=True):
            g = p.grad
            drift = NBETA * g + LOC * (p - a)
            if self.rule == "sgld":
                p.add_(-LR / 2 * drift + math.sqrt(LR) * torch.randn_like(p))
            elif self.rule == "rmsprop":
                s.mul_(0.99).addcmul_(g, g, value=0.01)
                gc = 1.0 / (s.sqrt() + 0.1)
                p.add_(-LR / 2 * gc * drift + (LR * gc).sqrt() * torch.randn_like(p))
            else:
                s.sub_((LR / 2 if self.first else LR) * drift)
                p.add_(LR / 2 * s)
                s.mul_(self.c).add_(math.sqrt(1 - self.c**2) * torch.randn_like(p))
                p.add_(LR / 2 * s)
        self.first = False


def make_optimizer(provider: str, rule: str, params):
    if provider in ("bif_fast", "bif_fast-packed"):
        cfg = bif_fast.SGLDConfig(
            lr=LR, nbeta=NBETA, localization=LOC,
            sampler="baoab" if rule == "baoab" else "sgld",
            precondition="rmsprop" if rule == "rmsprop" else "none",
        )  # fmt: skip
        return bif_fast.SGLD(params, cfg, seed=0, layout="packed" if provider == "bif_fast-packed" else "auto")
    if provider == "naive-torch":
        return NaiveLoop(params, rule)
    if provider == "devinterp":
        from devinterp.optim.sgmcmc import SGMCMC

        factory = SGMCMC.rmsprop_sgld if rule == "rmsprop" else SGMCMC.sgld
        return factory(params, lr=LR, nbeta=NBETA, localization=LOC)
    raise ValueError(provider)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(opt, device: str, steps: int) -> list[float]:
    opt.step()  # warm-up: kernel compilation, allocator
    _sync(device)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def copy_bandwidth(numel: int, device: str) -> float:
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * 4 * numel / sorted(times)[len(times) // 2] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1m,50m")
    ap.add_argument("--rules", default="sgld,rmsprop,baoab")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import devinterp  # noqa: F401

        providers = ["bif_fast", "bif_fast-packed", "devinterp", "naive-torch"]
    except ImportError:
        print("devinterp is not installed: its rows are skipped (pip install devinterp==2.0.1)")
        providers = ["bif_fast", "bif_fast-packed", "naive-torch"]
    backend = bif_fast.available_backends()["sgld_update"]["cuda" if args.device == "cuda" else "cpu"]
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, bif_fast sgld_update backend: {backend}")
    rows = []
    for size in args.sizes.split(","):
        d = SIZES[size]
        for rule in args.rules.split(","):
            provs = [p for p in providers if not (p == "devinterp" and rule == "baoab")]
            times: dict[str, list[float]] = {p: [] for p in provs}
            numel = 0
            for _ in range(args.repeats):
                for provider in provs:  # interleaved, so machine noise hits every provider alike
                    params = transformer_params(d, args.device, torch.float32)
                    numel = sum(p.numel() for p in params)
                    opt = make_optimizer(provider, rule, params)
                    times[provider] += time_steps(opt, args.device, args.steps)
                    del opt, params
            shape = f"{size}:{numel}params"
            print(f"\n{rule} on {numel / 1e6:.1f}M parameters in {12 * 12 + 3} tensors")
            base = quantiles(times["devinterp"])[0] if "devinterp" in times else None
            naive = quantiles(times["naive-torch"])[0]
            for provider, ts in times.items():
                p50, p20, p80 = quantiles(ts)
                extra = ""
                if base:
                    extra += f"  {base / p50:5.2f}x vs devinterp"
                extra += f"  {naive / p50:5.2f}x vs naive"
                print(f"  {provider:<16} {p50 * 1e3:9.2f} ms/step{extra}")
                common = {"provider": provider, "mode": rule, "shape": shape, "dtype": "fp32", "n_runs": len(ts)}
                rows.append({**common, "metric": "step_time", "unit": "ms", "p50": p50 * 1e3, "p20": p20 * 1e3,
                             "p80": p80 * 1e3})  # fmt: skip
                if provider == "bif_fast-packed":
                    rows.append({**common, "metric": "speedup_vs_bif_fast", "unit": "x",
                                 "p50": quantiles(times["bif_fast"])[0] / p50})  # fmt: skip
                if provider == "bif_fast":
                    if base:
                        rows.append({**common, "metric": "speedup_vs_devinterp", "unit": "x", "p50": base / p50})
                    rows.append({**common, "metric": "speedup_vs_naive-torch", "unit": "x", "p50": naive / p50})
                    if args.device == "cuda":
                        nbytes = (16 if rule == "sgld" else 24) * numel
                        gbs = nbytes / p50 / 1e9
                        peak = copy_bandwidth(numel * 4, args.device)
                        print(f"  bif_fast moves {gbs:.0f} GB/s; device copy {peak:.0f} GB/s: {gbs / peak:.0%}")
                        rows.append({**common, "metric": "achieved_bandwidth", "unit": "GB/s", "p50": gbs})
                        rows.append({**common, "metric": "fraction_of_copy_bandwidth", "unit": "", "p50": gbs / peak})
    if not args.no_record:
        print(f"\nrecorded in {write_rows('sgld_update', rows)}")


if __name__ == "__main__":
    main()
