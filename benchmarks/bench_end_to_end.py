"""End to end: ``compute_bif`` against devinterp 2.0.1's ``bif()``, and against the bare passes it must do.

Two problems, each with the same model, data, SGLD hyperparameters, draw schedule and number of draws
on both sides, CPU, ``torch.set_num_threads(1)`` in every process:

- ``mlp`` (sequence level): an MLP 24-128-48-10 (9,882 parameters), trained with 30 full-batch Adam
  steps on 1,000 samples whose labels are drawn from a softmax teacher (no sample fitted exactly);
  BIF of the 1,000 training samples against 200 query samples; 4 chains x 200 draws, SGLD minibatch
  100, lr 1e-3, nbeta 300, localization 1,000. bif_fast: ``compute_bif(model, train, query,
  loss_fn=per-sample cross-entropy)``, the [1000, 200] train x query block. devinterp: ``bif(...,
  correlation_method="sequence")`` with observables ``{"train": the 1,000 samples, "query": the 200}``;
  it only computes the joint 1,200 x 1,200 matrix, whose train x query block is compared.
- ``lm`` (per token): a randomly initialised GPT-NeoX (vocabulary 512, 2 layers, width 64, 4 heads,
  ~165k parameters; built from a config, nothing downloaded) on 64-token sequences of a sparse random
  Markov chain; 8 query sequences against 128, 256 and 512 training sequences (63 x 63 token pairs per
  sequence pair); 2 chains x 40 draws, SGLD minibatch 8, lr 1e-4, nbeta 300, localization 1e4 (strong,
  so a chain relaxes in ~2 steps and 80 draws are close to independent). bif_fast: ``compute_bif(...,
  per_token=True, loss_fn=bif_fast.losses.causal_lm(model))``. devinterp: ``bif(...,
  correlation_method="token")`` with its default loss (cross-entropy from the logits); it returns the
  joint (N, N, 63, 63) array over all N = train + query sequences, built from (2T) x (2T) correlation
  blocks per sequence pair. The draw count is small so that the whole run stays well under 25 minutes
  on a 2-core machine; ``--devinterp-max-train`` drops devinterp from the larger sizes if needed (its
  token covariance grows as N^2; at 512 it takes ~1.5 min and ~4.3 GB here, so by default it runs).

Every child runs with glibc malloc's mmap/trim thresholds pinned (``--malloc pinned``, see
``benchmarks.utils.PINNED_MALLOC``): with glibc's adaptive defaults, a process that frees large buffers
early (compute_bif's accumulators) serves its later model temporaries from a retained heap, while one
that does not (the floor) pays fresh zeroed pages on every evaluation, ~10% of its time here, which put
the "floor" above bif_fast. Pinned, every provider gets the retained heap.

Providers, each (provider, repeat) in a fresh subprocess, interleaved, so peak resident memory above
the process's baseline is that provider's own. The baseline is taken after imports, after a tiny
warm-up run of the same provider, and after building the model and data; the kernel's high-water mark
is reset there (``/proc/self/clear_refs``) and the peak read from ``VmHWM`` (``getrusage``'s
ru_maxrss also counts the parent's resident set carried over fork/exec, which here exceeds a child's
baseline). Every child reports a checksum of w* and the data; the parent checks they all match.

- ``floor``                the forward/backward passes bif_fast must do, in a plain loop over
                           pre-stacked tensors: per chain the same number of SGLD-minibatch
                           forward+backward passes (burn-in + steps between draws) and, at every draw,
                           no-grad forwards of every train and query unit in compute_bif's default
                           evaluation batches (256 samples; per token 32 sequences = 2,048 loss
                           positions, ``eval_max_tokens="auto"`` on a CPU); no sampler, no covariance,
                           no DataLoader
- ``bif_fast``             ``compute_bif`` given ``TensorDataset``s, as a user calls it
                           (``compute_stderr=False``, as devinterp has no standard error; every other
                           engine setting at its default: float32 co-moment for these float32 losses,
                           ``cov_dtype="auto"``; evaluation batches as in the floor)
- ``bif_fast-prebatched``  the same call, but train and query passed as non-shuffling DataLoaders over
                           batches collated once (``--prebatched-on``, default mlp only): isolates the
                           cost of re-collating the evaluation batches item by item at every draw
- ``bif_fast-stderr``      the same call with the standard error on (``compute_stderr=True``, the
                           engine's default): its memory is the per-token state with m2 (``--stderr-on``,
                           default lm only)
- ``bif_fast-f64``         the same call with ``cov_dtype="float64"`` (``--f64-on``, default lm only):
                           the same chains with float64 n x p state, so its agreement with ``bif_fast``
                           is the float32 co-moment's rounding (relRMS ~1e-6), and its memory the
                           cost of float64 state
- ``devinterp``            ``devinterp.slt.bif.bif`` (its zarr store in a temporary directory, as with
                           its default ``output_path=None``, removed afterwards)

How devinterp is fed and aligned (it is written for language-model data with ``input_ids``):

- MLP: every sample is an item ``{"input_ids": [k, k]}`` (length 2, so one "target position"), k
  indexing one table of the train and query features; a custom ``loss_fn(model, input_ids)`` looks the
  features and labels up and returns the per-sample cross-entropy as ``[B, 1]``. The sequence-level
  loss (the mean over one position) is then the sample's loss, and the SGLD loss the minibatch mean, as
  in bif_fast. The table look-up (a gather of B rows) is the only extra work this costs devinterp.
- Schedule: devinterp takes draw d after SGLD step d (``num_burnin_steps=0``), ``compute_bif`` draws
  before stepping, so bif_fast gets ``num_burnin_steps=1``: both take 200 (lm: 40) SGLD steps and
  200 (40) evaluations per chain. ``num_init_loss_batches=1`` (devinterp's default 32 adds forwards
  bif_fast does not do).
- devinterp picks observable sequences with ``random.Random(obs_seed).sample`` and concatenates the
  observables in sorted name order; its rows are mapped back through the ``input_ids`` it returns.
- Sign: devinterp returns +Corr, bif_fast stores -Corr / -Cov, so devinterp's matrices are negated.
  devinterp's Cov (for the covariance agreement) is computed after the timed call, untimed, from the
  same zarr store by its own ``compute_bif(..., compute_covariance=True)`` on the train x query pairs.
- Seeds: repeat r uses bif_fast ``seed=r`` and devinterp ``init_seed=100+1000r`` (devinterp seeds
  chain c with init_seed + c, so consecutive init_seeds would share chains). The agreement of
  independent runs of one engine (seed to seed) calibrates the Monte-Carlo error against which the
  cross-engine agreement is to be read.

Correctness gate (before timing): on reduced problems with ``noise_level=0`` (deterministic SGLD),
bif_fast is fed devinterp's minibatch order (the first epoch of its seeded shuffling loader, replayed);
both engines then follow the same trajectory, and after the mapping above their train x query -Corr
(abs) and -Cov (relative to its max) must agree within 5e-3 and 2e-3: rounding only (fused vs
logits cross-entropy). This covers the index mapping, the sign and the schedule alignment.

Reported per problem: median wall time and peak memory above baseline (p20-p80 over repeats); the
ratios devinterp / bif_fast of the medians; bif_fast's overhead over the floor; the agreement of the
train x query blocks (Pearson r of matching entries, relative RMS difference ``rms(a - b) / rms(b)``
with b = bif_fast) for -Corr, -Cov and, per token, -Cov summed per sequence pair, across engines (same
repeat) and seed to seed within each engine (medians). Targets of the issue: mlp >= 3x faster than
devinterp; lm at 256 sequences >= 1.5x faster and >= 10x less memory above baseline; overhead over the
floor <= 15%. Rows go to ``results/end_to_end.csv``.

    python benchmarks/bench_end_to_end.py                  # the issue's problems, 3 repeats (~20 min, 2 cores)
    python benchmarks/bench_end_to_end.py --quick          # smoke run: small sizes, 1 repeat, not recorded
    python benchmarks/bench_end_to_end.py --problems mlp --repeats 5
    python benchmarks/bench_end_to_end.py --problems lm --lm-train 128,256 --devinterp-max-train 256
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.utils import (  # noqa: E402
    PINNED_MALLOC,
    current_rss_mb,
    peak_rss_mb,
    quantiles,
    reset_peak_rss,
    run_child,
    write_rows,
)

PROVIDERS = ["floor", "bif_fast", "bif_fast-prebatched", "bif_fast-f64", "bif_fast-stderr", "devinterp"]
OBS_SEED = 1337  # devinterp's default obs_seed
MEM = "peak_rss_above_base_mb"

# ---------------------------------------------------------------------------------------------------
# Problems (built deterministically in every process, so every provider sees the same w* and data)
# ---------------------------------------------------------------------------------------------------


def _mlp(d_in: int = 24, classes: int = 10) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, 128),
        torch.nn.GELU(),
        torch.nn.Linear(128, 48),
        torch.nn.GELU(),
        torch.nn.Linear(48, classes),
    )


def build_mlp(spec: dict) -> dict:
    """Labels drawn from a softmax teacher (so no sample is fitted exactly); the MLP trained to w* with 30
    full-batch Adam steps (train loss ~0.9, no loss near 0, so no correlation is 0/0)."""
    g = torch.Generator().manual_seed(1)
    n, q = spec["n_train"], spec["n_query"]
    x = torch.randn(n + q, 24, generator=g)
    teacher = torch.randn(24, 10, generator=g) * (4 / 24**0.5)
    y = torch.multinomial(torch.softmax(x @ teacher, 1), 1, generator=g).squeeze(1)
    torch.manual_seed(3)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:n]), y[:n]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return {"model": model, "x": x, "y": y, "n": n, "q": q}


def mlp_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """Per-sample cross-entropy, ``[B]``."""
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def build_lm(spec: dict) -> dict:
    """A random GPT-NeoX and sequences from a sparse random Markov chain over its vocabulary."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    vocab, n, q, length = 512, spec["n_train"], spec["n_query"], spec["seq_len"]
    g = torch.Generator().manual_seed(1)
    succ = torch.randint(0, vocab, (vocab, 8), generator=g)  # 8 likely successors per token
    e = -torch.log(torch.rand(vocab, 8, generator=g))  # Dirichlet(1, ..., 1) rows, from g (not the global RNG)
    weights = e / e.sum(1, keepdim=True)
    ids = torch.empty(n + q, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (n + q,), generator=g)
    for t in range(1, length):
        choice = torch.multinomial(weights[ids[:, t - 1]], 1, generator=g).squeeze(1)
        nxt = succ[ids[:, t - 1], choice]
        jump = torch.rand(n + q, generator=g) < 0.1
        ids[:, t] = torch.where(jump, torch.randint(0, vocab, (n + q,), generator=g), nxt)
    torch.manual_seed(3)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=length)  # fmt: skip
    model = GPTNeoXForCausalLM(cfg)
    return {"model": model, "ids": ids, "n": n, "q": q}


def build(spec: dict) -> dict:
    return build_mlp(spec) if spec["problem"] == "mlp" else build_lm(spec)


def _sgld_config(spec: dict, noise_level: float = 1.0):
    from bif_fast import SGLDConfig

    return SGLDConfig(lr=spec["lr"], nbeta=spec["nbeta"], localization=spec["localization"], noise_level=noise_level)


# ---------------------------------------------------------------------------------------------------
# Providers. Each returns (-Corr, -Cov) of the train x query block in bif_fast's layout, or None.
# ---------------------------------------------------------------------------------------------------


def _bif_fast_data(prob: dict, spec: dict):
    from torch.utils.data import TensorDataset

    n = prob["n"]
    if spec["problem"] == "mlp":
        return TensorDataset(prob["x"][:n], prob["y"][:n]), TensorDataset(prob["x"][n:], prob["y"][n:])
    return TensorDataset(prob["ids"][:n]), TensorDataset(prob["ids"][n:])


def _bif_fast_loss(prob: dict, spec: dict):
    if spec["problem"] == "mlp":
        return mlp_loss
    from bif_fast.losses import causal_lm

    return causal_lm(prob["model"])


def _prebatched(dataset, batch_size: int):
    """A non-shuffling DataLoader over batches collated once up front (what a user can pass instead of a Dataset)."""
    tensors = dataset.tensors
    batches = [tuple(t[i : i + batch_size] for t in tensors) for i in range(0, len(tensors[0]), batch_size)]
    return torch.utils.data.DataLoader(batches, batch_size=None)


def run_bif_fast(
    prob: dict,
    spec: dict,
    *,
    sgld_data=None,
    noise_level: float = 1.0,
    prebatched: bool = False,
    f64: bool = False,
    stderr: bool = False,
):
    """``compute_bif`` as a user calls it; returns the BIFResult (``stderr``: with the standard error, the
    engine's default)."""
    from bif_fast import BIFConfig, compute_bif

    per_token = spec["problem"] == "lm"
    train, query = _bif_fast_data(prob, spec)
    config = BIFConfig(sgld=_sgld_config(spec, noise_level), num_chains=spec["chains"], num_draws=spec["draws"],
                       num_burnin_steps=1, num_steps_bw_draws=1, batch_size=spec["batch_size"], seed=spec["seed"],
                       compute_stderr=stderr)  # fmt: skip
    if f64:
        config = dataclasses.replace(config, cov_dtype="float64")
    if prebatched:
        sgld_data = train if sgld_data is None else sgld_data
        train, query = _prebatched(train, config.eval_batch_size), _prebatched(query, config.eval_batch_size)
    return compute_bif(prob["model"], train, query, loss_fn=_bif_fast_loss(prob, spec), config=config,
                       per_token=per_token, sgld_data=sgld_data)  # fmt: skip


def _bif_fast_mats(res, prob: dict, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(-Corr, -Cov) as float32; per token, check the rows are the full (sequence, position) grid."""
    if spec["problem"] == "lm":
        t = spec["seq_len"] - 1
        want = torch.stack(torch.meshgrid(torch.arange(prob["n"]), torch.arange(t), indexing="ij"), -1).reshape(-1, 2)
        if not torch.equal(res.train_index.cpu(), want):
            raise RuntimeError("bif_fast's per-token rows are not the full (sequence, position) grid")
    return res.bif_normalized.float(), res.bif.float()


def floor(prob: dict, spec: dict) -> None:
    """The bare passes: SGLD-minibatch forward+backward and no-grad evaluation forwards, nothing else."""
    model, n, per_token = prob["model"], prob["n"], spec["problem"] == "lm"
    loss_fn = _bif_fast_loss(prob, spec)
    if per_token:
        train, query = (prob["ids"][:n],), (prob["ids"][n:],)
    else:
        train, query = (prob["x"][:n], prob["y"][:n]), (prob["x"][n:], prob["y"][n:])
    # The evaluation batches compute_bif makes by default: eval_batch_size=256 units, and per token at
    # most eval_max_tokens="auto" loss positions (2,048 on a CPU: 32 sequences of 63 positions).
    from bif_fast import BIFConfig
    from bif_fast.engine.run import AUTO_EVAL_TOKENS

    ev, bs = BIFConfig().eval_batch_size, spec["batch_size"]
    if per_token:
        ev = max(1, min(ev, AUTO_EVAL_TOKENS["cpu"] // (spec["seq_len"] - 1)))
    eval_batches = [tuple(t[i : i + ev] for t in data) for data in (train, query) for i in range(0, len(data[0]), ev)]
    g = torch.Generator().manual_seed(spec["seed"])
    steps = 1 + (spec["draws"] - 1)  # num_burnin_steps=1, one step between draws
    for _ in range(spec["chains"]):
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-steps * bs // n))])
        for s in range(spec["draws"]):
            model.eval()
            with torch.no_grad():
                for b in eval_batches:
                    loss_fn(model, b if not per_token else b[0])
            if s < steps:
                model.train()
                idx = order[s * bs : (s + 1) * bs]
                batch = tuple(t[idx] for t in train)
                model.zero_grad(set_to_none=False)  # gradients accumulate in place, as in compute_bif
                # The sequences are unpadded, so per token every position counts: the SGLD loss is the mean.
                loss_fn(model, batch if not per_token else batch[0]).mean().backward()
    model.zero_grad(set_to_none=True)


class _Items(torch.utils.data.Dataset):
    """Items ``{"input_ids": LongTensor[L]}``, the only thing devinterp's bif() reads from a dataset."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i]}


class _TableLoss:
    """devinterp ``loss_fn(model, input_ids [B, 2]) -> [B, 1]`` for the MLP: ids index a feature table."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        k = input_ids[:, 0]
        return mlp_loss(model, (self.x[k], self.y[k]))[:, None]


def _devinterp_inputs(prob: dict, spec: dict):
    """(sgld dataset, observables, loss_fn, correlation_method) for devinterp, and the id rows of each unit."""
    n, q, bs = prob["n"], prob["q"], spec["batch_size"]
    if spec["problem"] == "mlp":
        rows = torch.arange(n + q)[:, None].expand(-1, 2).contiguous()  # item k: input_ids [k, k]
        loss_fn, method = _TableLoss(prob["x"], prob["y"]), "sequence"
    else:
        rows, loss_fn, method = prob["ids"], None, "token"
    if n % bs or q % bs:
        raise ValueError(f"devinterp observables come in batches: n_train={n} and n_query={q} must divide by {bs}")
    observables = {"train": (_Items(rows[:n]), n // bs), "query": (_Items(rows[n:]), q // bs)}
    return _Items(rows[:n]), observables, loss_fn, method, rows


def _positions(returned_ids: torch.Tensor, rows: torch.Tensor, n: int) -> tuple[list[int], list[int]]:
    """Positions along devinterp's batch axis of train units 0..n-1 and query units 0..q-1."""
    where = {tuple(r.tolist()): i for i, r in enumerate(rows)}
    if len(where) != rows.shape[0]:
        raise RuntimeError("duplicate sequences: cannot map devinterp's rows back")
    origin = [where[tuple(r.tolist())] for r in returned_ids]
    pos = {o: p for p, o in enumerate(origin)}
    return [pos[i] for i in range(n)], [pos[i] for i in range(n, rows.shape[0])]


def _to_bif_fast_layout(influences, train_pos, query_pos) -> torch.Tensor:
    """devinterp's +Corr/+Cov ``(batch_1, batch_2[, t, s])`` -> bif_fast's ``-`` [train units, query units]."""
    import numpy as np

    block = torch.from_numpy(np.ascontiguousarray(influences[np.ix_(train_pos, query_pos)]))
    if block.dim() == 4:  # (train seq, query seq, t, s) -> (train seq * T + t, query seq * T + s)
        a, b, t, s = block.shape
        block = block.permute(0, 2, 1, 3).reshape(a * t, b * s)
    return block.float().neg_()


def _devinterp_seed(spec: dict) -> int:
    """devinterp seeds chain c with init_seed + c, so runs whose init_seeds differ by less than num_chains
    share chains; space them by 1000."""
    return 100 + 1000 * spec["seed"]


def run_devinterp(prob: dict, spec: dict, workdir: str, *, noise_level: float = 1.0, timed=None):
    """devinterp's bif(); the timed part ends when it returns (``timed`` gets called then)."""
    import xarray as xr
    from devinterp.slt.bif import bif, compute_bif

    dataset, observables, loss_fn, method, rows = _devinterp_inputs(prob, spec)
    store = str(Path(workdir) / "samples.zarr")
    out = bif(prob["model"], dataset, observables, lr=spec["lr"], n_beta=spec["nbeta"],
              localization=spec["localization"], noise_level=noise_level, correlation_method=method,
              loss_fn=loss_fn, num_chains=spec["chains"], num_draws=spec["draws"], batch_size=spec["batch_size"],
              num_burnin_steps=0, num_steps_bw_draws=1, num_init_loss_batches=1, init_seed=_devinterp_seed(spec),
              obs_seed=OBS_SEED, device="cpu", output_path=store)  # fmt: skip
    if timed is not None:
        timed()
    train_pos, query_pos = _positions(torch.as_tensor(out["input_ids"].values), rows, prob["n"])
    corr = _to_bif_fast_layout(out["influences"].values, train_pos, query_pos)
    del out
    gc.collect()
    # Untimed: devinterp's covariance of the same traces, for the train x query pairs only.
    samples = xr.open_datatree(store, engine="zarr", consolidated=False)
    cov_ds = compute_bif(samples, correlation_method=method, compute_covariance=True,
                         batch_index_range_1=train_pos, batch_index_range_2=query_pos, device="cpu")  # fmt: skip
    n_tr, n_q = len(train_pos), len(query_pos)
    cov = _to_bif_fast_layout(cov_ds["influences"].values, list(range(n_tr)), list(range(n_q)))
    return corr, cov


# ---------------------------------------------------------------------------------------------------
# Child process: one provider, one repeat
# ---------------------------------------------------------------------------------------------------


def _fingerprint(prob: dict) -> float:
    """A checksum of w* and the data, so the parent can check every process built the same problem."""
    data = sum(float(prob[k].double().square().sum()) for k in ("x", "y", "ids") if k in prob)
    return data + sum(float(p.detach().double().square().sum()) for p in prob["model"].parameters())


def _warm_spec(spec: dict) -> dict:
    bs = spec["batch_size"]
    return {**spec, "n_train": bs, "n_query": bs, "chains": 2, "draws": 3}


def _child(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    import bif_fast  # noqa: F401  (imports are part of the baseline)

    if spec["provider"] == "devinterp":
        import devinterp.slt.bif  # noqa: F401
    if spec["problem"] == "lm":
        import transformers  # noqa: F401
    workdir = tempfile.mkdtemp(prefix="bench_e2e_")
    try:
        # Warm-up on a tiny problem (first-call costs, lazy imports), then the real problem's baseline.
        warm_dir = tempfile.mkdtemp(prefix="bench_e2e_warm_", dir=workdir)
        _run(build(_warm_spec(spec)), _warm_spec(spec), warm_dir)
        prob = build(spec)
        fingerprint = _fingerprint(prob)
        gc.collect()
        reset_peak_rss()
        base = current_rss_mb()
        t0 = time.perf_counter()
        mark = {}

        def stop() -> None:
            mark["seconds"] = time.perf_counter() - t0
            mark["peak"] = peak_rss_mb() - base

        mats = _run(prob, spec, workdir, timed=stop)
        if "seconds" not in mark:
            stop()
        result = {"seconds": mark["seconds"], "peak_rss_above_base_mb": mark["peak"], "problem": fingerprint}
        if mats is not None and spec.get("save"):
            torch.save({"corr": mats[0], "cov": mats[1]}, spec["save"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))


def _run(prob: dict, spec: dict, workdir: str, timed=None):
    provider = spec["provider"]
    if provider == "floor":
        return floor(prob, spec)
    if provider in ("bif_fast", "bif_fast-prebatched", "bif_fast-f64", "bif_fast-stderr"):
        res = run_bif_fast(prob, spec, prebatched=provider == "bif_fast-prebatched",
                           f64=provider == "bif_fast-f64", stderr=provider == "bif_fast-stderr")  # fmt: skip
        if timed is not None:
            timed()
        return _bif_fast_mats(res, prob, spec)
    if provider == "devinterp":
        return run_devinterp(prob, spec, workdir, timed=timed)
    raise ValueError(provider)


# ---------------------------------------------------------------------------------------------------
# Gate, agreement, main
# ---------------------------------------------------------------------------------------------------


class _ReplayFirstEpoch(torch.utils.data.Sampler):
    """devinterp's minibatch order: the first epoch of DataLoader(shuffle, seeded generator, drop_last),
    replayed forever; every iter() starts again (every chain sees the same batches, devinterp's default)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        loader = torch.utils.data.DataLoader(range(n), batch_size=batch_size, shuffle=True, drop_last=True,
                                             generator=torch.Generator().manual_seed(seed))  # fmt: skip
        self.batches = [b.tolist() for b in loader]

    def __iter__(self):
        return itertools.cycle(self.batches)


def _gate(spec: dict) -> None:
    """Noise-free SGLD, the same minibatches: both engines must give the same -Corr / -Cov block."""
    prob = build(spec)
    train, _ = _bif_fast_data(prob, spec)
    order = _ReplayFirstEpoch(prob["n"], spec["batch_size"], _devinterp_seed(spec))
    sgld_data = torch.utils.data.DataLoader(train, batch_sampler=order)
    corr_f, cov_f = _bif_fast_mats(run_bif_fast(prob, spec, sgld_data=sgld_data, noise_level=0.0), prob, spec)
    with tempfile.TemporaryDirectory(prefix="bench_e2e_gate_") as d:
        corr_d, cov_d = run_devinterp(prob, spec, d, noise_level=0.0)
    err_corr = float((corr_f - corr_d).abs().max())
    err_cov = float((cov_f - cov_d).abs().max() / cov_f.abs().max())
    ok = err_corr <= 5e-3 and err_cov <= 2e-3
    print(f"gate: {spec['problem']:<4} {tuple(corr_f.shape)} noise-free, same minibatches: max |d(-Corr)| "
          f"{err_corr:.1e}, max |d(-Cov)| / max|-Cov| {err_cov:.1e}  {'ok' if ok else 'FAILED'}")  # fmt: skip
    if not ok:
        raise SystemExit("correctness gate failed: bif_fast and devinterp disagree on a deterministic chain")


def _agree(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(Pearson r of matching entries, rms(a - b) / rms(b)); entries that are NaN in either are left out."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok], b[ok]
    r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return r, float((a - b).square().mean().sqrt() / b.square().mean().sqrt())


def _agreement(saved: dict[str, list[str]], spec: dict) -> dict[str, tuple[float, ...]]:
    """Median (r, relRMS) of -Corr and -Cov (and, per token, of -Cov summed per sequence pair) for each pair:
    across engines (same repeat index) and seed to seed within an engine."""
    mats = {p: [torch.load(f) for f in files] for p, files in saved.items()}
    pairs: dict[str, list[tuple]] = {}
    if "bif_fast" in mats and "devinterp" in mats:
        pairs["bif_fast vs devinterp"] = list(zip(mats["devinterp"], mats["bif_fast"], strict=False))
    if "bif_fast" in mats and "bif_fast-prebatched" in mats:  # the same computation: expect r = 1, relRMS = 0
        pairs["prebatched vs bif_fast"] = list(zip(mats["bif_fast-prebatched"], mats["bif_fast"], strict=False))
    if "bif_fast" in mats and "bif_fast-f64" in mats:  # the same chains: expect r = 1, relRMS ~ 1e-6
        pairs["f64 vs bif_fast"] = list(zip(mats["bif_fast-f64"], mats["bif_fast"], strict=False))
    for p in ("bif_fast", "devinterp"):
        if len(mats.get(p, [])) >= 2:
            pairs[f"{p} seed vs seed"] = list(itertools.combinations(mats[p], 2))

    def per_sequence(m: torch.Tensor) -> torch.Tensor:
        t = spec["seq_len"] - 1
        return m.reshape(spec["n_train"], t, spec["n_query"], t).sum((1, 3))

    out = {}
    for name, ps in pairs.items():
        vals = []
        for a, b in ps:
            v = (*_agree(a["corr"], b["corr"]), *_agree(a["cov"], b["cov"]))
            if spec["problem"] == "lm":
                v += _agree(per_sequence(a["cov"]), per_sequence(b["cov"]))
            vals.append(v)
        out[name] = tuple(statistics.median(v[i] for v in vals) for i in range(len(vals[0])))
    return out


def _specs(args: argparse.Namespace) -> list[dict]:
    common = {"threads": args.threads}
    specs = []
    if "mlp" in args.problems:
        specs.append({**common, "problem": "mlp", "n_train": args.mlp_train, "n_query": args.mlp_query,
                      "chains": args.mlp_chains, "draws": args.mlp_draws, "batch_size": 100,
                      "lr": 1e-3, "nbeta": 300.0, "localization": 1000.0})  # fmt: skip
    if "lm" in args.problems:
        for n in args.lm_train:
            specs.append({**common, "problem": "lm", "n_train": n, "n_query": args.lm_query, "seq_len": args.seq_len,
                          "chains": args.lm_chains, "draws": args.lm_draws, "batch_size": 8,
                          "lr": 1e-4, "nbeta": 300.0, "localization": 1e4})  # fmt: skip
    return specs


def _shape(spec: dict) -> str:
    s = f"{spec['problem']}:train={spec['n_train']},query={spec['n_query']}"
    if spec["problem"] == "lm":
        s += f",len={spec['seq_len']}"
    return s + f",chains={spec['chains']},draws={spec['draws']},bs={spec['batch_size']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default="mlp,lm", help="comma-separated: mlp, lm")
    ap.add_argument("--mlp-train", type=int, default=1000)
    ap.add_argument("--mlp-query", type=int, default=200)
    ap.add_argument("--mlp-chains", type=int, default=4)
    ap.add_argument("--mlp-draws", type=int, default=200)
    ap.add_argument("--lm-train", default="128,256,512", help="comma-separated training-set sizes (sequences)")
    ap.add_argument("--lm-query", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lm-chains", type=int, default=2)
    ap.add_argument("--lm-draws", type=int, default=40)
    ap.add_argument("--devinterp-max-train", type=int, default=512, help="lm: run devinterp only up to this size")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the same for every provider")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--prebatched-on", default="mlp", help="problems on which to run bif_fast-prebatched")
    ap.add_argument("--f64-on", default="lm", help="problems on which to run bif_fast-f64")
    ap.add_argument("--stderr-on", default="lm", help="problems on which to run bif_fast-stderr")
    ap.add_argument(
        "--malloc",
        choices=["pinned", "default"],
        default="pinned",
        help="children's glibc malloc thresholds: pinned (benchmarks.utils.PINNED_MALLOC) or glibc's own",
    )
    ap.add_argument("--no-gate", action="store_true", help="skip the correctness gate")
    ap.add_argument("--quick", action="store_true", help="smoke run: small problems, 1 repeat, not recorded")
    ap.add_argument("--no-record", action="store_true", help="do not append rows to benchmarks/results/")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    if args.quick:
        args.mlp_train, args.mlp_query, args.mlp_draws, args.mlp_chains = 200, 100, 20, 2
        args.lm_train, args.lm_query, args.seq_len, args.lm_chains, args.lm_draws = "16,32", 8, 32, 2, 5
        args.repeats, args.no_record = 1, True
    args.problems = args.problems.split(",")
    args.prebatched_on = args.prebatched_on.split(",")
    args.f64_on = args.f64_on.split(",")
    args.stderr_on = args.stderr_on.split(",")
    args.lm_train = [int(v) for v in str(args.lm_train).split(",")]
    providers = args.providers.split(",")
    torch.set_num_threads(args.threads)
    specs = _specs(args)

    if not args.no_gate and "devinterp" in providers:
        for spec in specs[:1] + [s for s in specs if s["problem"] == "lm"][:1]:
            small = {**spec, "n_train": 2 * spec["batch_size"] if spec["problem"] == "lm" else 200,
                     "n_query": spec["batch_size"], "chains": 2, "draws": 10, "seed": 0,
                     "seq_len": 16 if spec["problem"] == "lm" else None}  # fmt: skip
            _gate(small)

    print(f"{args.threads} thread(s) per process, {args.repeats} repeat(s), providers interleaved")
    results: dict[str, dict[str, list[dict]]] = {}
    spec_of = {_shape(spec): spec for spec in specs}
    saved: dict[str, dict[str, list[str]]] = {}
    tmp = tempfile.mkdtemp(prefix="bench_e2e_mats_")
    t_all = time.perf_counter()
    try:
        for rep in range(args.repeats):
            for spec in specs:
                shape = _shape(spec)
                for provider in providers:
                    too_big = spec["problem"] == "lm" and spec["n_train"] > args.devinterp_max_train
                    if provider == "devinterp" and too_big:
                        continue
                    if provider == "bif_fast-prebatched" and spec["problem"] not in args.prebatched_on:
                        continue
                    if provider == "bif_fast-f64" and spec["problem"] not in args.f64_on:
                        continue
                    if provider == "bif_fast-stderr" and spec["problem"] not in args.stderr_on:
                        continue
                    save = str(Path(tmp) / f"{len(results)}_{provider}_{rep}_{spec['problem']}{spec['n_train']}.pt")
                    child = {**spec, "provider": provider, "seed": rep, "save": save}
                    res = run_child(__file__, ["--child", json.dumps(child)],
                                    env=PINNED_MALLOC if args.malloc == "pinned" else None)  # fmt: skip
                    first = results.get(shape, {}) and next(iter(results[shape].values()))[0]["problem"]
                    if first and res["problem"] != first:
                        raise SystemExit(f"{shape}: {provider} built another problem ({res['problem']} != {first})")
                    results.setdefault(shape, {}).setdefault(provider, []).append(res)
                    if provider != "floor":
                        saved.setdefault(shape, {}).setdefault(provider, []).append(save)
                    print(f"  run {rep + 1} {shape:<58} {provider:<20} {res['seconds']:8.2f} s "
                          f"+{res['peak_rss_above_base_mb']:8.1f} MB", flush=True)  # fmt: skip
        agreement = {shape: _agreement(s, spec_of[shape]) for shape, s in saved.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"total {time.perf_counter() - t_all:.0f} s")

    rows = []
    w = max(len(shape) for shape in results) + 1
    print(f"\n{'problem':<{w}} {'provider':<20} {'median s':>9} {'p20-p80 s':>15} {'peak MB':>9} {'p20-p80 MB':>15}")
    for shape, by_provider in results.items():
        for provider, rs in by_provider.items():
            (t50, t20, t80), (m50, m20, m80) = (quantiles([r[k] for r in rs]) for k in ("seconds", MEM))
            print(f"{shape:<{w}} {provider:<20} {t50:9.2f} {f'{t20:.2f}-{t80:.2f}':>15} {m50:9.1f} "
                  f"{f'{m20:.1f}-{m80:.1f}':>15}")  # fmt: skip
            common = {"provider": provider, "mode": "end_to_end", "shape": shape, "dtype": "float32", "n_runs": len(rs)}
            rows.append({**common, "metric": "time", "unit": "s", "p50": t50, "p20": t20, "p80": t80})
            rows.append({**common, "metric": "peak_mem_above_base", "unit": "MB", "p50": m50, "p20": m20, "p80": m80})

    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    print(f"\n{'problem':<{w}} {'provider':<20} {'speedup':>8} {'mem ratio':>10} {'overhead/floor':>15}"
          "  (speedup, mem ratio: devinterp / provider, from the medians)")  # fmt: skip
    for shape, by_provider in results.items():
        med = {p: (quantiles([r["seconds"] for r in rs])[0], quantiles([r["peak_rss_above_base_mb"] for r in rs])[0])
               for p, rs in by_provider.items()}  # fmt: skip
        for provider in (p for p in med if p.startswith("bif_fast")):
            common = {"provider": provider, "mode": "end_to_end", "shape": shape, "dtype": "float32",
                      "n_runs": len(by_provider[provider])}  # fmt: skip
            speed = mem = over = None
            if "devinterp" in med:
                speed = med["devinterp"][0] / med[provider][0]
                mem = med["devinterp"][1] / max(med[provider][1], 1.0)
                rows.append({**common, "metric": "speedup_vs_devinterp", "unit": "x", "p50": speed})
                rows.append({**common, "metric": "mem_ratio_vs_devinterp", "unit": "x", "p50": mem})
            if "floor" in med:
                over = 100.0 * (med[provider][0] / med["floor"][0] - 1.0)
                rows.append({**common, "metric": "overhead_vs_floor", "unit": "%", "p50": over})
            print(f"{shape:<{w}} {provider:<20} {fmt(speed, '{:.2f}x'):>8} {fmt(mem, '{:.1f}x'):>10} "
                  f"{fmt(over, '{:+.1f}%'):>15}")  # fmt: skip

    print(f"\n{'problem':<{w}} {'pair':<24} {'r(-Corr)':>9} {'relRMS':>7} {'r(-Cov)':>8} {'relRMS':>7}"
          f" {'r(seq -Cov)':>12} {'relRMS':>7}   (train x query block; medians over repeats / pairs)")  # fmt: skip
    names = ("corr", "cov", "seqcov")
    for shape, pairs in agreement.items():
        for name, vals in pairs.items():
            cells = " ".join(f"{v:{(9, 7, 8, 7, 12, 7)[i]}.3f}" for i, v in enumerate(vals))
            print(f"{shape:<{w}} {name:<24} {cells}")
            provider = {"prebatched": "bif_fast-prebatched", "f64": "bif_fast-f64"}.get(
                name.split()[0], name.split()[0]
            )
            kind = "seed_to_seed" if "seed vs seed" in name else "vs_" + name.split()[-1]
            common = {"provider": provider, "mode": "end_to_end", "shape": shape, "dtype": "float32",
                      "n_runs": args.repeats}  # fmt: skip
            for i, v in enumerate(vals):
                metric = f"{'pearson' if i % 2 == 0 else 'relrms'}_{kind}_{names[i // 2]}"
                if math.isfinite(v):
                    rows.append({**common, "metric": metric, "unit": "r" if i % 2 == 0 else "ratio", "p50": v})
    if not args.no_record:
        print(f"recorded in {write_rows('end_to_end', rows)}")


if __name__ == "__main__":
    main()
