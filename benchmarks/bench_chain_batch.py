"""Batched chains (``BIFConfig.chain_batch``, vmap over stacked weights) against the same chains one by one.

``compute_bif`` on MLPs of growing size, sequence level, with ``chain_batch=1`` (one chain at a time)
and ``chain_batch=num_chains`` (all chains in one vmapped forward/backward), interleaved in one process,
medians over ``--repeats``. Both paths run the same chains (same noise, same minibatches); the script
checks their BIF matrices agree (relative max difference) before timing counts. The loss is the
per-sample cross-entropy or squared error (vmap's batching rule for ``cross_entropy`` is slower than
its plain kernel, so both are shown). On a CPU the batched path pays where per-call dispatch
dominates (small models, little data per draw) and loses where the matrix products dominate; this is
what ``chain_batch='auto'`` encodes (``bif_fast.engine.chains._AUTO_BATCH_CPU_WORK``: parameters x evaluation
rows). On a GPU, where every small launch costs microseconds, the batched path is the default for
models up to 4M sampled parameters.

    python benchmarks/bench_chain_batch.py                 # 3 sizes x 2 losses, 5 repeats, 1 thread
    python benchmarks/bench_chain_batch.py --device cuda
    python benchmarks/bench_chain_batch.py --calibrated digits,relu,regression,lm,gelu --threads 2

``--calibrated`` instead runs the LDS harness's reference models (``benchmarks/lds``, their cached minima)
at the settings ``bif_fast.calibrate`` picks for each (full-batch gradients, BAOAB, curvature mass), 8
chains, and compares the chain-steps per second of the sampling loop one by one and all at once: the
figures behind the CPU bound for full-batch runs (``_AUTO_BATCH_CPU_FULL_WORK``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.utils import quantiles, write_rows  # noqa: E402

# (d_in, hidden, n_train, n_query, chains, sgld batch)
SIZES = [(8, 16, 128, 32, 8, 16), (24, 64, 256, 64, 8, 32), (24, 128, 1000, 200, 4, 100)]


def _losses():
    def ce(model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y, reduction="none")

    def mse(model, batch):
        x, y = batch
        return (model(x) - torch.nn.functional.one_hot(y, 4).to(x.dtype)).square().sum(1)

    return {"cross_entropy": ce, "squared_error": mse}


def calibrated_settings(names: list[str], repeats: int, draws: int) -> list[dict]:
    """Chain-steps per second, one by one vs batched, at each LDS setting's calibrated settings."""
    from benchmarks.lds.ground_truth import ground_truth
    from benchmarks.lds.methods import float32_problem
    from benchmarks.lds.run import _reference_model
    from benchmarks.lds.settings import SETTINGS
    from bif_fast import calibrate, compute_bif

    rows = []
    for name in names:
        setting = SETTINGS[name]()
        model = _reference_model(setting, ground_truth(setting, log=lambda *a: None))
        model, train, query = float32_problem(setting, model)
        cfg = calibrate(model, train, query, loss_fn=setting.loss_fn, budget_seconds=10.0)
        rates: dict[int, list[float]] = {1: [], cfg.num_chains: []}
        for rep in range(repeats + 1):  # the first round warms up and is not counted
            for size in rates:
                fixed = dataclasses.replace(cfg, num_draws=draws, chain_batch=size, time_limit=None)
                run = compute_bif(model, train, query, loss_fn=setting.loss_fn, config=fixed)
                d = run.diagnostics
                if d["chain_batch"] != size:
                    raise SystemExit(f"{name}: asked for chain_batch {size}, ran {d['chain_batch']}")
                if rep > 0:
                    rates[size].append(cfg.num_chains * (draws - 1) / sum(d["chain_seconds"][::size]))
        numel = sum(p.numel() for p in model.parameters())
        one, many = statistics.median(rates[1]), statistics.median(rates[cfg.num_chains])
        print(f"{name:<10} {numel:7d} params {len(train) + len(query):5d} rows  one by one {one:7.0f}  "
              f"batched {many:7.0f} chain-steps/s  {many / one:.2f}x")  # fmt: skip
        shape = f"lds {name},params={numel},rows={len(train) + len(query)},chains={cfg.num_chains},draws={draws}"
        for size, key in ((1, "one_by_one"), (cfg.num_chains, "batched")):
            p50, p20, p80 = quantiles(rates[size])
            rows.append({"provider": key, "mode": "calibrated,full-batch", "shape": shape, "dtype": "float32",
                         "metric": "chain_steps_per_s", "unit": "1/s", "p50": p50, "p20": p20, "p80": p80,
                         "n_runs": repeats})  # fmt: skip
        rows.append({"provider": "batched", "mode": "calibrated,full-batch", "shape": shape, "dtype": "float32",
                     "metric": "speedup_vs_one_by_one", "unit": "x", "p50": many / one, "n_runs": repeats})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--calibrated", default="", help="comma-separated LDS settings (see the module docstring)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.calibrated:
        rows = calibrated_settings(args.calibrated.split(","), args.repeats, args.draws)
        if not args.no_record:
            print("rows ->", write_rows("chain_batch", rows))
        return
    from bif_fast import BIFConfig, SGLDConfig, compute_bif

    device = torch.device(args.device)
    rows = []
    print(f"{'model':<10} {'params':>7} {'rows':>5} {'chains':>6} {'loss':<14} {'1-by-1 s':>9} {'batched s':>10} "
          f"{'speedup':>8} {'max rel diff':>13}")  # fmt: skip
    for d_in, hidden, n, q, chains, bs in SIZES:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 4))
        model = model.to(device)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(n + q, d_in, generator=g).to(device), torch.randint(0, 4, (n + q,), generator=g).to(device)
        train = torch.utils.data.TensorDataset(x[:n], y[:n])
        query = torch.utils.data.TensorDataset(x[n:], y[n:])
        numel = sum(p.numel() for p in model.parameters())
        for name, loss_fn in _losses().items():
            base = BIFConfig(sgld=SGLDConfig(lr=1e-3, nbeta=100.0, localization=100.0), num_chains=chains,
                             num_draws=args.draws, batch_size=bs, compute_stderr=False)  # fmt: skip
            configs = {"one_by_one": dataclasses.replace(base, chain_batch=1),
                       "batched": dataclasses.replace(base, chain_batch=chains)}  # fmt: skip
            times: dict[str, list[float]] = {k: [] for k in configs}
            results = {}
            for rep in range(args.repeats + 1):  # the first round warms up and is not counted
                for key, cfg in configs.items():
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    res = compute_bif(model, train, query, loss_fn=loss_fn, config=cfg)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if rep > 0:
                        times[key].append(time.perf_counter() - t)
                    results[key] = res
            if results["batched"].diagnostics["chain_batch"] != chains:
                raise SystemExit(f"the batched run fell back to one-by-one chains for {name}")
            a, b = results["batched"].bif, results["one_by_one"].bif
            diff = float((a - b).abs().max() / b.abs().max())
            if not diff < 1e-3:
                raise SystemExit(f"batched and one-by-one chains disagree: max rel diff {diff:.2e}")
            t1, tb = statistics.median(times["one_by_one"]), statistics.median(times["batched"])
            shape = f"mlp {d_in}-{hidden}-4,params={numel},train={n},query={q},chains={chains},draws={args.draws}"
            print(f"{d_in}-{hidden}-4{'':<3} {numel:7d} {n + q:5d} {chains:6d} {name:<14} {t1:9.3f} {tb:10.3f} "
                  f"{t1 / tb:7.2f}x {diff:13.1e}")  # fmt: skip
            for key in configs:
                p50, p20, p80 = quantiles(times[key])
                rows.append({"provider": key, "mode": name, "shape": shape, "dtype": "float32", "metric": "time",
                             "unit": "s", "p50": p50, "p20": p20, "p80": p80, "n_runs": len(times[key])})  # fmt: skip
            rows.append({"provider": "batched", "mode": name, "shape": shape, "dtype": "float32", "unit": "x",
                         "metric": "speedup_vs_one_by_one", "p50": t1 / tb, "n_runs": args.repeats})  # fmt: skip
    if not args.no_record:
        print("rows ->", write_rows("chain_batch", rows))


if __name__ == "__main__":
    main()
