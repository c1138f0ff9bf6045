"""compute_bif on 1 and 2 processes (torch.distributed, gloo on CPU): draws per second and the final merge.

The same call, the same seed and chains, run alone and split over 2 ranks (chain c on rank c % 2), each
rank a process with one torch thread (this machine has two cores). Reported per problem, medians over
``--repeats`` (world sizes interleaved):

- ``draws_per_s``: all chains' draws over the wall time of the whole ``compute_bif`` call on rank 0;
  the ratio of the 2-rank figure to the 1-rank one is the scaling;
- ``merge_ms``: the time of the merge across ranks on rank 0 (``Pool.merge_ranks``: the float64
  vectors gathered, the n x p co-moment and the standard error's m2 all-reduced, plus the traces);
- ``max_abs_diff``: the largest difference between rank 0's BIF and the 1-process BIF, relative to the
  largest |BIF| (rounding only).

Problems: ``mlp`` (per sample: 64-128-10 tanh MLP, 1,000 x 200 synthetic samples, SGLD minibatch 100,
8 chains x 200 draws) and ``token`` (per token: an embedding-MLP next-token model on 256 x 32-token
training and 16 query sequences of a random vocabulary of 64, so n x p = 7,936 x 496; 4 chains x 100
draws, minibatch 16), both with the standard error on.

    python benchmarks/bench_distributed.py              # 3 repeats, records benchmarks/results/distributed.csv
    python benchmarks/bench_distributed.py --repeats 1 --no-record

On a GPU (one lent to a session), the per-token BIF of a Pythia-410M-shaped model belongs here too
(issue 12's GPU figures); it is not written yet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from benchmarks.utils import quantiles, write_rows  # noqa: E402


def _seeded(model: torch.nn.Module, g: torch.Generator) -> torch.nn.Module:
    """The same weights in every process (a module's default init draws from the process's own RNG)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _problem(name: str):
    g = torch.Generator().manual_seed(0)
    from bif_fast import BIFConfig, SGLDConfig

    if name == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
        x, y = torch.randn(1200, 64, generator=g), torch.randint(0, 10, (1200,), generator=g)
        train, query = TensorDataset(x[:1000], y[:1000]), TensorDataset(x[1000:], y[1000:])
        config = BIFConfig(sgld=SGLDConfig(lr=1e-3, nbeta=300.0, localization=1000.0), num_chains=8, num_draws=200,
                           batch_size=100, seed=0)  # fmt: skip

        def loss_fn(m, b):
            return torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

        return _seeded(model, g), train, query, loss_fn, config, False
    model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 64))
    tokens = torch.randint(0, 64, (272, 32), generator=g)
    train, query = TensorDataset(tokens[:256]), TensorDataset(tokens[256:])
    config = BIFConfig(sgld=SGLDConfig(lr=1e-3, nbeta=300.0, localization=1000.0), num_chains=4, num_draws=100,
                       batch_size=16, seed=0)  # fmt: skip

    def token_loss(m, b):
        (ids,) = b
        logits = m(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")

    return _seeded(model, g), train, query, token_loss, config, True


def _worker(rank: int, world: int, tmp: str, name: str) -> None:
    torch.set_num_threads(1)
    from bif_fast import compute_bif
    from bif_fast.engine import pool

    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                                             world_size=world)  # fmt: skip
    merge = pool.Pool.merge_ranks
    timing = {"merge": 0.0}

    def timed_merge(self, ranks):
        t = time.perf_counter()
        merge(self, ranks)
        timing["merge"] += time.perf_counter() - t

    pool.Pool.merge_ranks = timed_merge
    model, train, query, loss_fn, config, per_token = _problem(name)
    t0 = time.perf_counter()
    res = compute_bif(model, train, query, loss_fn=loss_fn, config=config, per_token=per_token)
    seconds = time.perf_counter() - t0
    if rank == 0:
        from safetensors.torch import save_file

        save_file({"bif": res.bif.contiguous()}, f"{tmp}/bif.safetensors")
        out = {"seconds": seconds, "merge": timing["merge"], "draws": res.diagnostics["num_draws_used"],
               "n": res.bif.shape[0], "p": res.bif.shape[1]}  # fmt: skip
        Path(f"{tmp}/out.json").write_text(json.dumps(out))
    if world > 1:
        torch.distributed.destroy_process_group()


def _run(world: int, name: str) -> tuple[dict, torch.Tensor]:
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, tmp, name), nprocs=world, start_method="spawn")
        out = json.loads(Path(f"{tmp}/out.json").read_text())
        return out, load_file(f"{tmp}/bif.safetensors")["bif"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default="mlp,token")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    rows = []
    for name in args.problems.split(","):
        got: dict[int, list[dict]] = {1: [], 2: []}
        diffs = []
        for _ in range(args.repeats):
            alone, bif1 = _run(1, name)
            split, bif2 = _run(2, name)
            got[1].append(alone)
            got[2].append(split)
            diffs.append(float((bif2 - bif1).abs().max() / bif1.abs().max()))
        shape = f"{name}:n={got[1][0]['n']},p={got[1][0]['p']},draws={got[1][0]['draws']}"
        rates = {w: [r["draws"] / r["seconds"] for r in got[w]] for w in (1, 2)}
        scaling = statistics.median(b / a for a, b in zip(rates[1], rates[2], strict=True))
        for w in (1, 2):
            p50, p20, p80 = quantiles(rates[w])
            m50, m20, m80 = quantiles([1e3 * r["merge"] for r in got[w]])
            print(f"{shape:42s} {w} rank(s): {p50:8.0f} draws/s [{p20:.0f}, {p80:.0f}]   merge {m50:7.1f} ms")
            common = {"provider": f"world{w}", "mode": "gloo,1 thread/rank", "shape": shape, "dtype": "float32",
                      "n_runs": args.repeats}  # fmt: skip
            rows.append({**common, "metric": "draws_per_s", "unit": "1/s", "p50": p50, "p20": p20, "p80": p80})
            rows.append({**common, "metric": "merge_ms", "unit": "ms", "p50": m50, "p20": m20, "p80": m80})
        print(f"{shape:42s} 2 ranks / 1: {scaling:.2f}x   max |BIF_2 - BIF_1| / max |BIF_1|: {max(diffs):.1e}")
        common = {"provider": "world2", "mode": "gloo,1 thread/rank", "shape": shape, "dtype": "float32",
                  "n_runs": args.repeats}  # fmt: skip
        rows.append({**common, "metric": "scaling_vs_world1", "unit": "x", "p50": scaling, "p20": scaling,
                     "p80": scaling})  # fmt: skip
        rows.append({**common, "metric": "max_rel_diff_vs_world1", "unit": "ratio", "p50": max(diffs),
                     "p20": min(diffs), "p80": max(diffs)})  # fmt: skip
    if not args.no_record:
        print(f"recorded in {write_rows('distributed', rows)}")


if __name__ == "__main__":
    main()
