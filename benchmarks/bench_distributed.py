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

``--pythia 410m`` (on a GPU) is the paper's scaling setting instead, in one process: the per-token BIF of
a randomly initialised Pythia-410M-shaped GPT-NeoX (24 layers, width 1,024, 16 heads, MLP 4,096,
vocabulary 50,304, parallel residual, rotary on a quarter of each head) in bf16, its attention and MLP
weights sampled (SGLD, minibatch 8), 400 training sequences x 150 tokens against 18 queries
(n x p = 59,600 x 2,682 tokens), a few draws. It prints and records the time per draw, the tokens
evaluated per second, the peak device memory, and the share of a draw spent outside the model's own
forward and backward (the transformer trunk, timed alone over the same batches). ``--pythia tiny`` is the
same at toy size, for a CPU check that the script runs.

    python benchmarks/bench_distributed.py --pythia 410m --device cuda --draws 8
    python benchmarks/bench_distributed.py --pythia tiny --device cpu --draws 3 --no-record
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


# (width, layers, heads, MLP width, vocabulary, training sequences, queries, tokens per sequence)
PYTHIA = {"410m": (1024, 24, 16, 4096, 50304, 400, 18, 150), "tiny": (64, 2, 4, 256, 512, 16, 3, 24)}


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _trunk_seconds(model, batches: list, device: torch.device, backward: bool, repeats: int = 3) -> float:
    """Median time of the transformer trunk (``model.base_model``) alone over ``batches``: forward, or
    forward and backward of its output's sum."""
    times = []
    for _ in range(repeats):
        t0 = _sync(device)
        for batch in batches:
            with torch.set_grad_enabled(backward):
                out = model.base_model(input_ids=batch["input_ids"]).last_hidden_state
                if backward:
                    out.float().sum().backward()
        times.append(_sync(device) - t0)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def pythia(scale: str, device: torch.device, draws: int, chains: int = 1) -> dict:
    """The scaling setting's figures (module docstring) as a dict."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from bif_fast import BIFConfig, SGLDConfig, compute_bif
    from bif_fast.engine.data import eval_batches
    from bif_fast.losses import causal_lm

    width, layers, heads, mlp, vocab, n_train, n_query, length = PYTHIA[scale]
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=mlp, rotary_pct=0.25, max_position_embeddings=2048,
                        use_parallel_residual=True)  # fmt: skip
    with torch.device(device):
        model = GPTNeoXForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, vocab, (n_train + n_query, length), generator=torch.Generator().manual_seed(0))
    train, query = _Tokens(ids[:n_train]), _Tokens(ids[n_train:])
    params = [p for n, p in model.named_parameters() if (".attention." in n or ".mlp." in n) and n.endswith("weight")]
    config = BIFConfig(sgld=SGLDConfig(lr=1e-6, nbeta=100.0, localization=1e4), num_chains=chains, num_draws=draws,
                       batch_size=8, seed=0)  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t0 = _sync(device)
    res = compute_bif(model, train, query, loss_fn=causal_lm(model), config=config, per_token=True, params=params)
    seconds = _sync(device) - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    d = res.diagnostics
    loop = sum(d["chain_seconds"])  # the chains' sampling loops (one chain at a time here)
    per_draw = loop / d["num_draws_used"]
    rows_per_batch = d["eval_batch_size"]["train"] or config.eval_batch_size  # the run's evaluation batches
    evals = [b for side in (train, query) for b in eval_batches(side, rows_per_batch, device)]
    sgld = eval_batches(train, config.batch_size, device)[:1]
    # A draw: every training and query sequence forward, then num_steps_bw_draws SGLD steps of 8 sequences.
    trunk = _trunk_seconds(model, evals, device, backward=False) + config.num_steps_bw_draws * _trunk_seconds(
        model, sgld, device, backward=True)
    n, p = res.bif.shape
    sampled = sum(q.numel() for q in params)
    return {"n": n, "p": p, "draws": d["num_draws_used"], "seconds": seconds, "seconds_per_draw": per_draw,
            "tokens_per_s": (n_train + n_query) * (length - 1) / per_draw, "peak_gb": peak / 2**30,
            "model_gb": base / 2**30, "sampled_params": sampled, "trunk_seconds_per_draw": trunk,
            "share_outside_trunk": max(0.0, 1.0 - trunk / per_draw), "diverged": d["diverged"]}  # fmt: skip


def _pythia_main(args) -> None:
    device = torch.device(args.device)
    got = pythia(args.pythia, device, args.draws)
    for key, value in got.items():
        print(f"{key:24s} {value:.4g}" if isinstance(value, float) else f"{key:24s} {value}")
    shape = f"pythia-{args.pythia}:n={got['n']},p={got['p']},draws={got['draws']}"
    common = {"provider": "bif_fast", "mode": f"per-token,bf16,{device.type}", "shape": shape, "dtype": "bfloat16",
              "n_runs": 1}  # fmt: skip
    units = {"seconds_per_draw": "s", "tokens_per_s": "1/s", "peak_gb": "GiB", "share_outside_trunk": "ratio"}
    rows = [{**common, "metric": k, "unit": u, "p50": got[k], "p20": got[k], "p80": got[k]} for k, u in units.items()]
    if not args.no_record:
        print(f"recorded in {write_rows('distributed', rows)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default="mlp,token")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--pythia", choices=sorted(PYTHIA), help="the Pythia-410M-shaped scaling setting instead")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--draws", type=int, default=8)
    args = ap.parse_args()
    if args.pythia:
        _pythia_main(args)
        return
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
