"""One BIF run (the paper's Algorithm 1): evaluation sets at w*, chains, the draw loop, the pooled result.

SGLD chains start at w*; at every draw the losses of all training units and all query units are
evaluated and go straight into device-resident ``RunningCrossCovariance`` accumulators (k draws per
rank-k update, no stored traces, no host synchronisation inside a chain); ``BIF = -Cov`` pooled over
all draws of all chains around the grand mean (ddof = 1), and ``bif_normalized = -Corr``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from bif_fast._backend import Backend
from bif_fast.config import BIFConfig
from bif_fast.engine.calibrate import curvature_mass_at_w_star, full_gradient
from bif_fast.engine.chains import Chains, FullBatch, chain_batch_size, make_chains
from bif_fast.engine.checkpoint import Checkpoint, Restored, json_normal, run_identity
from bif_fast.engine.control_variate import ControlVariate
from bif_fast.engine.data import ChainMinibatches, eval_batches, first_item, to_device, token_capped_batch_size
from bif_fast.engine.distributed import Ranks, RowShard, in_lockstep
from bif_fast.engine.host_memory import raise_glibc_malloc_thresholds
from bif_fast.engine.mass import LowRankMass
from bif_fast.engine.model_state import ModelState
from bif_fast.engine.pool import Pool
from bif_fast.engine.sharded import any_sharded
from bif_fast.engine.units import LossFn, Units, check_loss, evaluate, loss_and_mask
from bif_fast.result import BIFError
from bif_fast.sampler import SGLD

logger = logging.getLogger("bif_fast")

__all__ = ["EvalSet", "RunOutput", "eval_set", "run_bif"]

#: ``eval_max_tokens="auto"``: loss positions per evaluation batch, by device type (the CPU figure is the
#: fastest measured, benchmarks/results/end_to_end.csv; on a GPU larger batches keep the device busy).
AUTO_EVAL_TOKENS = {"cpu": 2048}
AUTO_EVAL_TOKENS_DEFAULT = 16384


@dataclass
class EvalSet:
    """One side of the BIF (train or query): its evaluation batches, its units and its losses at w*."""

    name: str
    batches: list
    units: Units
    at_w_star: torch.Tensor  # [n] losses of the units at w*
    batch_size: int | None  # sequences per evaluation batch (None: a DataLoader's batch_sampler)


@dataclass
class RunOutput:
    bif: torch.Tensor
    bif_normalized: torch.Tensor
    stderr: torch.Tensor | None
    diagnostics: dict[str, Any]
    train_index: torch.Tensor | None
    query_index: torch.Tensor | None
    train_rows: torch.Tensor | None = None  # shard_rows: the global index of each local row


def run_bif(model: torch.nn.Module, sampled: Sequence[torch.Tensor], train: Any, query: Any, *, loss_fn: LossFn,
            config: BIFConfig, per_token: bool, sgld_source: Any, backend: Backend,
            mass: LowRankMass | None = None, checkpoint: Checkpoint | None = None) -> RunOutput:  # fmt: skip
    """Sample the chains and pool their draws; the model is left exactly as it was. With ``checkpoint`` the
    state is written after every finished group of chains and a stored state is resumed.

    Inside a process group each rank samples its own chains (``engine.distributed``) and every rank returns
    the pool of all of them; with ``shard_rows`` every rank samples every chain over its own rows. The ranks
    meet at fixed points, each reached by every rank even when one failed: after the evaluation sets, at
    the mass (computed on rank 0), and before the merge."""
    t_start = time.perf_counter()
    device = sampled[0].device
    if device.type == "cpu":
        raise_glibc_malloc_thresholds()
    ranks = Ranks.current()
    shard = RowShard.of(ranks, len(train), any_sharded(sampled)) if config.shard_rows and ranks.active else None
    with ModelState(model, sampled) as state:
        state.eval_mode()
        error, sides, restored = None, None, None
        try:
            mine = train if shard is None else Subset(train, range(shard.lo, shard.hi))
            sides = [eval_set(model, data, loss_fn, config, per_token, device, name, shard if name == "train" else None)
                     for data, name in ((mine, "train"), (query, "query"))]  # fmt: skip
        except Exception as e:  # every rank learns of it below, then raises
            error = e
        ranks.raise_if_any_failed(error)
        restored = None if checkpoint is None else _restore(checkpoint, config, sides)
        if ranks.active:  # w*'s checksums read every sampled weight: only where there is another rank
            ranks.check_same(run_identity(sampled, train, query, config=config.to_dict(), per_token=per_token,
                                          world=ranks.world))  # fmt: skip
        rows = _Rows.of(shard, sides[0])
        if restored is not None and "mass.basis" in restored.tensors:
            mass = LowRankMass(restored.tensors["mass.basis"].to(device), restored.tensors["mass.scale"].to(device),
                               restored.meta["mass_a_ref"])  # fmt: skip
        if config.sgld.mass == "curvature" and mass is None:
            mass = _curvature_mass(model, sampled, loss_fn, sides[0].batches, config, per_token, ranks, shard)
        run = None
        try:
            saver = None if checkpoint is None else _Saver(checkpoint, config, mass, sides, restored, shard)
            run = _sample(model, state, sampled, train, sides, loss_fn, config, per_token, sgld_source, backend,
                          mass, ranks, restored, saver, rows)  # fmt: skip
        except Exception as e:
            error = e
        ranks.raise_if_any_failed(error)
        if shard is None:
            run.pool.merge_ranks(ranks)
            _merge_traces(run.traces, ranks, config.num_chains)
        diagnostics = _diagnostics(sides, run.pool, run.traces, config, run.opt, run.chains, run.pool.dtype, t_start)
        diagnostics["forward_reuse"] = run.reuse
        diagnostics["time_limit"] = run.time_limit
        diagnostics["world_size"] = ranks.world
        if shard is not None:
            diagnostics["shard"] = {"sequences": [shard.lo, shard.hi], "rows": [rows.offset, rows.offset + rows.n],
                                    "n_train_units_total": rows.total}  # fmt: skip
        if run.pool.pooled.count < 2:
            raise BIFError(f"every chain diverged ({sum(run.pool.diverged)} of {config.num_chains}); no BIF",
                           diagnostics)  # fmt: skip
        bif, bif_normalized, stderr = run.pool.outputs(scale=0.25 if config.estimator == "lag1" else 1.0)
    return RunOutput(bif, bif_normalized, stderr, diagnostics, rows.global_index(sides[0].units.index),
                     sides[1].units.index, rows.global_rows(device))  # fmt: skip


def _curvature_mass(model, sampled, loss_fn: LossFn, batches: list, config: BIFConfig, per_token: bool,
                    ranks: Ranks, shard: RowShard | None) -> LowRankMass:  # fmt: skip
    """The curvature mass at w*: on rank 0 and given to every rank; with row shards every rank takes part in
    each Hessian-vector product (its rows' share of the gradient), and rank 0's result is still the one
    every rank keeps, so that every rank's chains step with the same bits."""
    device = sampled[0].device
    if shard is None:
        return ranks.from_root(lambda: curvature_mass_at_w_star(model, sampled, loss_fn, batches, config.sgld,
                                                                per_token, seed=config.seed),
                               to_wire=lambda m: m.to(torch.device("cpu")), from_wire=lambda m: m.to(device))
    mass = curvature_mass_at_w_star(model, sampled, loss_fn, batches, config.sgld, per_token, seed=config.seed,
                                    shard=shard)  # fmt: skip
    ranks.broadcast_(mass.basis)
    ranks.broadcast_(mass.scale)
    return LowRankMass(mass.basis, mass.scale, ranks.agree(mass.a_ref))


@dataclass
class _Rows:
    """The training rows this rank holds: all of them, or with ``shard_rows`` units ``offset ..`` of ``total``
    (its sequences ``shard.lo ..``)."""

    shard: RowShard | None
    offset: int
    n: int
    total: int

    @classmethod
    def of(cls, shard: RowShard | None, train: EvalSet) -> _Rows:
        n = train.units.n
        if shard is None:
            return cls(None, 0, n, n)
        counts = shard.ranks.all_gather(n)
        return cls(shard, sum(counts[: shard.ranks.rank]), n, sum(counts))

    def mean(self, values: torch.Tensor) -> float:
        """The mean of ``values`` (one per local row) over every rank's rows."""
        if self.shard is None:
            return float(values.mean())
        return float(self.shard.ranks.small_sum(values.double().sum().reshape(1))[0]) / max(self.total, 1)

    def global_index(self, index: torch.Tensor | None) -> torch.Tensor | None:
        """Per token: (sequence, position) of each local row with the sequence counted over all of train."""
        if index is None or self.shard is None:
            return index
        return index + torch.tensor([self.shard.lo, 0], dtype=index.dtype)

    def global_rows(self, device: torch.device) -> torch.Tensor | None:
        if self.shard is None:
            return None
        return torch.arange(self.offset, self.offset + self.n, device=device)


@dataclass
class _Sampled:
    opt: SGLD
    chains: Chains
    pool: Pool
    traces: _Traces
    reuse: bool
    time_limit: dict[str, Any] | None = None


def _sample(model, state: ModelState, sampled, train: Any, sides: list[EvalSet], loss_fn: LossFn,
            config: BIFConfig, per_token: bool, sgld_source: Any, backend: Backend, mass: LowRankMass | None,
            ranks: Ranks, restored: Restored | None, saver: _Saver | None, rows: _Rows) -> _Sampled:  # fmt: skip
    """This rank's chains not finished yet, drawn into its pool (restored from ``restored``)."""
    device = sampled[0].device
    # Losses are kept in float64 when loss_fn gives float64, else float32.
    loss_dtype = torch.promote_types(sides[0].at_w_star.dtype, sides[1].at_w_star.dtype)
    cov_dtype = loss_dtype if config.cov_dtype == "auto" else getattr(torch, config.cov_dtype)
    n, p = sides[0].units.n, sides[1].units.n
    full = FullBatch(sides[0].batches, rows.total) if config.batch_size == "full" else None
    opt = in_lockstep(rows.shard, lambda: SGLD(sampled, config.sgld, seed=config.seed, chain=0, backend=backend,
                                           mass=mass))  # fmt: skip
    if opt.in_place:  # weights stepped in place get w* copied back; packed weights are re-pointed
        state.restore_with(opt.put_back)
    eval_rows = sum(s.units.num_sequences for s in sides)  # rows of the loss outputs per draw
    size = chain_batch_size(config, device, opt.numel, n, p, cov_dtype, eval_rows)
    if rows.shard is not None:  # the ranks' rows differ, their chain groups must not
        size = min(rows.shard.ranks.all_gather(size))
    checks = [(s.batches, s.units, s.at_w_star) for s in sides]
    control = None
    if config.control_variate:  # with row shards train's batches are this rank's rows; another source is whole
        control = in_lockstep(rows.shard, lambda: _control_variate(
            model, state, sampled, loss_fn, _source_batches(sgld_source, train, sides[0], config, device), per_token,
            rows.shard if sgld_source is train else None))  # fmt: skip
    chains = make_chains(model, state, opt, loss_fn, sgld_source, config, per_token, size, checks, full, control,
                         rows.shard)  # fmt: skip
    pool = Pool(n, p, device, cov_dtype, config, loss_dtype)
    reuse = full is not None and state.modes_agree
    traces = _Traces.empty(config, device)
    if restored is not None:
        pool.restore(restored.tensors, restored.meta["pool"])
        traces.restore(restored)
    if saver is not None:
        saver(pool, traces)  # before the first chain: the config and mass this run samples with
    ours = range(config.num_chains) if rows.shard is not None else ranks.chains(config.num_chains)
    mine = [c for c in ours if c not in traces.finished]
    limit = _TimeLimit.of(config, mine, chains.size, saver is not None, ranks.active and rows.shard is None)
    _DrawLoop(chains, pool, sides, config, loss_dtype, device, reuse, traces, saver, rows).run(mine, restored, limit)
    return _Sampled(opt, chains, pool, traces, reuse, None if limit is None else limit.record())


class _TimeLimit:
    """``BIFConfig.time_limit`` over this run's groups of chains: a group may run until its share of the time
    left (over the groups left) and stops at its next draw past it; the first group stopped early caps the
    draws of every later group at its own, so the chains keep one length where they can. Off (``applied``
    False, with the reason) where a run must be exact and reproducible: with a checkpoint, or with the chains
    split across ranks. Row shards step every chain in lockstep and stop together, at the first draw past the
    time on any rank."""

    def __init__(self, seconds: float, groups: int, why_not: str | None):
        self.seconds, self.groups_left, self.why_not = seconds, groups, why_not
        self.t0 = time.perf_counter()
        self.cap: int | None = None  # draws per chain from the first early stop on
        self.stopped: list[int] = []  # the chains stopped early

    @classmethod
    def of(cls, config: BIFConfig, mine: list[int], size: int, checkpointed: bool, split_chains: bool):
        if config.time_limit is None:
            return None
        why_not = ("a checkpointed run resumes exactly, which a time limit would not" if checkpointed else
                   "ranks would stop at different draws" if split_chains else None)  # fmt: skip
        return cls(float(config.time_limit), -(-len(mine) // max(1, size)), why_not)

    @property
    def applied(self) -> bool:
        return self.why_not is None

    def group_deadline(self) -> float | None:
        """The time (``perf_counter``) the next group must stop by, or None (no limit applied)."""
        if not self.applied:
            return None
        now = time.perf_counter()
        share = max(0.0, self.t0 + self.seconds - now) / max(1, self.groups_left)
        self.groups_left -= 1
        return now + share

    def stop(self, ids: list[int], draws: int) -> None:
        self.stopped += ids
        if self.cap is None:
            self.cap = draws
        logger.info("bif_fast: chains %s stopped at draw %d by the time limit (%.3g s)", ids, draws, self.seconds)

    def record(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "applied": self.applied, "why_not": self.why_not,
                "stopped_chains": self.stopped, "draws_after_stop": self.cap,
                "rule": "each group of chains its share of the time left; the first early stop sets later "
                        "groups' draws"}  # fmt: skip


def _merge_traces(traces: _Traces, ranks: Ranks, num_chains: int) -> None:
    """Every rank's rows of the per-chain traces, on every rank."""
    if not ranks.active:
        return
    mine = ranks.chains(num_chains)
    parts = ranks.all_gather({c: (traces.mean_train_loss[c].cpu(), traces.distance[c].cpu(), traces.seconds[c])
                              for c in mine})  # fmt: skip
    for part in parts:
        for c, (loss, dist, seconds) in part.items():
            traces.mean_train_loss[c] = loss.to(traces.mean_train_loss.device)
            traces.distance[c] = dist.to(traces.distance.device)
            traces.seconds[c] = seconds


def _source_batches(sgld_source: Any, train: Any, train_side: EvalSet, config: BIFConfig, device: torch.device):
    """The SGLD data in evaluation batches, for the control variate's full gradient at w*: train's own batches,
    or the source's streamed once (a large corpus is never held whole)."""
    if sgld_source is train:
        return train_side.batches
    if isinstance(sgld_source, ChainMinibatches):
        raise ValueError("control_variate needs the whole SGLD data for its gradient at w*: sgld_data must be a "
                         "Dataset or a DataLoader, not per-chain minibatch streams")  # fmt: skip
    loader = sgld_source if isinstance(sgld_source, DataLoader) else DataLoader(sgld_source,
                                                                                batch_size=config.eval_batch_size)
    return (to_device(b, device) for b in loader)


def _control_variate(model, state: ModelState, sampled, loss_fn: LossFn, batches, per_token: bool,
                     shard: RowShard | None):  # fmt: skip
    """The control variate at w*: its full-batch gradient in the model's own mode (the mode of the steps;
    with ``shard``, ``batches`` are this rank's training rows and the gradient is every rank's)."""
    state.own_mode()
    dtype = torch.float64 if sampled[0].dtype == torch.float64 else torch.float32
    try:
        grad = full_gradient(model, sampled, loss_fn, batches, per_token, dtype=dtype, shard=shard)
        return ControlVariate(model, sampled, loss_fn, per_token, grad)
    finally:
        state.eval_mode()


def eval_set(model, data: Any, loss_fn: LossFn, config: BIFConfig, per_token: bool, device: torch.device,
             name: str, shard: RowShard | None = None) -> EvalSet:  # fmt: skip
    """Collate the evaluation batches once, on the model's device, and find the units from the losses at w*
    (a shard of an FSDP model's rows: in as many batches as every other rank's)."""
    size = _eval_batch_size(model, data, loss_fn, config, per_token, device, name)
    batches = eval_batches(data, size, device)
    if shard is not None:
        batches = shard.same_count(batches)
    outs, masks = evaluate(model, batches, loss_fn, per_token, name, check=True)
    units = Units(per_token)
    units.discover(outs, masks, name)
    at_w_star = units.gather(outs)
    if not bool(torch.isfinite(at_w_star).all()):
        raise ValueError(f"loss_fn gives non-finite losses at w* for {name} (before any sampling)")
    reported = data.batch_size if isinstance(data, DataLoader) else size
    return EvalSet(name, batches, units, at_w_star, reported)


def _eval_batch_size(model, data: Any, loss_fn: LossFn, config: BIFConfig, per_token: bool, device: torch.device,
                     name: str) -> int:  # fmt: skip
    """Units per evaluation batch: ``eval_batch_size``, or per token fewer sequences, so that a batch holds
    at most ``eval_max_tokens`` loss positions (counted on ``loss_fn``'s output for the first item)."""
    cap = config.eval_max_tokens
    if not per_token or cap is None or isinstance(data, DataLoader):
        return config.eval_batch_size
    if cap == "auto":
        cap = AUTO_EVAL_TOKENS.get(device.type, AUTO_EVAL_TOKENS_DEFAULT)
    first = first_item(data, device)
    with torch.no_grad():
        out, mask = loss_and_mask(loss_fn, model, first, per_token)
        positions = check_loss(out, mask, 1, per_token, name).shape[1]
    return token_capped_batch_size(config.eval_batch_size, cap, positions)


@dataclass
class _Traces:
    """Per chain of the run: the traces of the finished ones, and what the escape check has seen."""

    mean_train_loss: torch.Tensor  # [chains, draws]
    distance: torch.Tensor  # [chains, draws] rms distance from w*
    seconds: list[float]
    typical: list[tuple[float, float]]  # the kept chains' (level, spread) of their training-loss rise
    finished: list[int]  # this rank's finished chains, in the order they finished

    @classmethod
    def empty(cls, config: BIFConfig, device: torch.device) -> _Traces:
        shape = (config.num_chains, config.num_draws)
        return cls(torch.full(shape, float("nan"), device=device), torch.full(shape, float("nan"), device=device),
                   [0.0] * config.num_chains, [], [])  # fmt: skip

    def restore(self, restored: Restored) -> None:
        self.mean_train_loss.copy_(restored.tensors["traces.mean_train_loss"])
        self.distance.copy_(restored.tensors["traces.distance"])
        record = restored.meta["traces"]
        self.seconds = list(record["seconds"])
        self.typical = [tuple(t) for t in record["typical"]]
        self.finished = list(record["finished"])


class _Saver:
    """Writes this rank's state: the pool, the traces, the config and the mass the run samples with, numbered
    by ``generation`` (continuing a restored state's); with row shards every rank writes at the same draws."""

    def __init__(self, checkpoint: Checkpoint, config: BIFConfig, mass: LowRankMass | None, sides: list[EvalSet],
                 restored: Restored | None, shard: RowShard | None):  # fmt: skip
        self.checkpoint, self.shard, self.last = checkpoint, shard, time.monotonic()
        self.generation = 0 if restored is None else int(restored.meta.get("generation", 0)) + 1
        self.meta: dict[str, Any] = {"config": config.to_dict(), "n": sides[0].units.n, "p": sides[1].units.n}
        self.fixed: dict[str, torch.Tensor] = {}
        if mass is not None:
            self.fixed = {"mass.basis": mass.basis, "mass.scale": mass.scale}
            self.meta["mass_a_ref"] = mass.a_ref

    def due(self) -> bool:
        """Whether a write inside a chain is due (``Checkpoint.interval_s`` since the last one; with row
        shards: on some rank, a collective every rank enters at the same draw)."""
        due = time.monotonic() - self.last >= self.checkpoint.interval_s
        return due if self.shard is None else self.shard.any([due])[0]

    def __call__(self, pool: Pool, traces: _Traces, running: tuple[dict, dict] | None = None) -> None:
        """Write the state; ``running``: the group in progress (``_DrawLoop._snapshot``), else none is."""
        tensors, record = pool.state()
        tensors.update(self.fixed, **{"traces.mean_train_loss": traces.mean_train_loss,
                                      "traces.distance": traces.distance})  # fmt: skip
        meta = dict(self.meta, pool=record, generation=self.generation,
                    traces={"seconds": traces.seconds, "typical": traces.typical, "finished": traces.finished})
        if running is not None:
            tensors.update(running[0])
            meta["running"] = running[1]
        if self.shard is None:
            self.checkpoint.write(tensors, meta)
        else:  # e.g. a full disk on one rank: every rank learns of it and raises
            self.shard.checked(lambda: self.checkpoint.write(tensors, meta))
        self.generation += 1
        self.last = time.monotonic()


def _restore(checkpoint: Checkpoint, config: BIFConfig, sides: list[EvalSet]) -> Restored | None:
    """This rank's stored state, if it is this run's: the same config (the calibrated one included) and units
    (with row shards: the generation every rank holds). A refusal on any rank is raised on every rank."""
    error, restored = None, None
    try:
        if not checkpoint.lockstep:
            restored = checkpoint.read()
    except Exception as e:
        error = e
    checkpoint.ranks.raise_if_any_failed(error)
    if checkpoint.lockstep:
        restored = checkpoint.read_common()
    if restored is None:
        return None
    skip = ("progress", "calibration")
    stored = {k: v for k, v in restored.meta["config"].items() if k not in skip}
    current = json_normal(config.to_dict())
    diffs = [f"config.{k}: checkpoint {stored.get(k)!r}, this call {v!r}" for k, v in current.items()
             if k not in skip and stored.get(k) != v]  # fmt: skip
    units = (restored.meta["n"], restored.meta["p"]), (sides[0].units.n, sides[1].units.n)
    if units[0] != units[1]:
        diffs.append(f"units (train, query): checkpoint {units[0]}, this call {units[1]}")
    error = None
    if diffs:
        error = ValueError(f"checkpoint {checkpoint.state_file} was written by a different run: " + "; ".join(diffs))
    checkpoint.ranks.raise_if_any_failed(error)
    return restored


class _DrawLoop:
    """This rank's chains' draws into their accumulators, k at a time; each chain is folded into the pool at
    its end. ``reuse``: the training losses of a draw come from the forward of the full-batch step that
    follows it. With a ``saver`` the state is written after every group of chains and, inside a group, after
    an accumulator update once ``saver.due()`` (the chains' sampler state and accumulators with it), so a
    long chain resumes where it was.

    With ``estimator="lag1"`` the accumulator gets the sums of consecutive draws (one fewer per chain): a
    quarter of their covariance is the lag-1 symmetrised covariance (``Pool.outputs`` applies the 1/4)."""

    def __init__(self, chains: Chains, pool: Pool, sides: list[EvalSet], config: BIFConfig, loss_dtype: torch.dtype,
                 device: torch.device, reuse: bool, traces: _Traces, saver: _Saver | None, rows: _Rows):  # fmt: skip
        self.chains, self.pool, self.sides, self.config, self.reuse = chains, pool, sides, config, reuse
        self.rows = rows
        self.traces, self.saver, self.device = traces, saver, device
        self.w_star_loss = rows.mean(sides[0].at_w_star)  # the escape check's baseline: over every rank's rows
        self.k = min(config.draws_per_update, config.num_draws)
        self.bufs = [torch.empty(self.k, chains.size, s.units.n, device=device, dtype=loss_dtype) for s in sides]
        self.pairs = _Pairs(self.bufs) if config.estimator == "lag1" else None

    def run(self, mine: list[int], restored: Restored | None, limit: _TimeLimit | None = None) -> None:
        running = None if restored is None else restored.meta.get("running")
        bar = _progress(self.config)
        for first in range(0, len(mine), self.chains.size):
            ids = mine[first : first + self.chains.size]
            self._group(ids, restored if running is not None and running["ids"] == ids else None, bar, limit)
        if bar is not None:
            bar.close()

    def _group(self, ids: list[int], resume: Restored | None, bar, limit: _TimeLimit | None) -> None:
        chains, sides, bufs, config = self.chains, self.sides, self.bufs, self.config
        c = len(ids)
        num_draws = config.num_draws if limit is None or limit.cap is None else min(config.num_draws, limit.cap)
        deadline = None if limit is None else limit.group_deadline()
        last = num_draws - 1  # the group's last draw (earlier where the time limit stops it)
        first_stop = 2 if config.estimator == "lag1" else 1  # a stop keeps 2 draws (lag-1: 3, i.e. 2 pairs)
        accs = self.pool.chain_accumulators(c)
        chains.reset(ids)
        if resume is None:
            chains.steps(config.num_burnin_steps)
            start, dists, means, elapsed = 0, [], [], 0.0
        else:
            start, dists, means, elapsed = self._resume(resume, accs)
        t_group, filled = time.perf_counter() - elapsed, 0
        for d in range(start, num_draws):
            if deadline is not None and first_stop <= d < last and self._past(deadline):
                last = d
                limit.stop(ids, d + 1)
            dists.append(chains.distance())
            steps = config.num_steps_bw_draws if d < last else 0
            if self.reuse and steps:  # the step's full-batch forward gives the training losses at this draw
                sides[1].units.gather_rows(chains.evaluate(sides[1].batches), out=bufs[1][filled, :c])
                sides[0].units.gather_rows(chains.step_with_losses(), out=bufs[0][filled, :c])
                steps -= 1
            else:
                for s, buf in zip(sides, bufs, strict=True):
                    s.units.gather_rows(chains.evaluate(s.batches), out=buf[filled, :c])
            means.append(bufs[0][filled, :c].mean(1))
            filled += 1 if self.pairs is None else self.pairs.pair(filled, c, first_draw=d == 0)
            if filled == self.k or (d == last and filled > 0):
                for i in range(c):
                    accs[i].update(bufs[0][:filled, i], bufs[1][:filled, i], check_finite=False)
                filled = 0
            chains.steps(steps)
            if bar is not None:
                bar.update(c)
            if filled == 0 and d < last and self.saver is not None and self.saver.due():
                running = self._snapshot(ids, d + 1, accs, dists, means, time.perf_counter() - t_group)
                self.saver(self.pool, self.traces, running)
            if d == last:
                break
        self._finish(ids, accs, dists, means, t_group)

    def _past(self, deadline: float) -> bool:
        """Whether the group's time is up; with row shards, on any rank (the ranks stop at the same draw)."""
        past = time.perf_counter() >= deadline
        return past if self.rows.shard is None else self.rows.shard.any([past])[0]

    def _finish(self, ids: list[int], accs: list, dists: list, means: list, t_group: float) -> None:
        traces, rows, shard = self.traces, ids, self.rows.shard
        mean = torch.stack(means, 1).double()
        if shard is not None:  # the mean over every rank's rows, so that every rank sees the same trace
            mean = shard.ranks.small_sum(mean.mul_(self.rows.n)).div_(self.rows.total)
        taken = mean.shape[1]  # draws of this group (fewer than num_draws where the time limit stopped it)
        traces.mean_train_loss[rows, :taken] = mean.to(traces.mean_train_loss.dtype)
        dist = torch.stack(dists, 1).div_(max(self.chains.numel, 1) ** 0.5)
        traces.distance[rows, :taken] = dist.to(traces.distance.dtype)
        escapes = escaped_chains(traces.mean_train_loss[rows, :taken], self.w_star_loss, self.config.max_excursion,
                                 traces.typical)  # fmt: skip
        flags = self.chains.diverged()
        if shard is not None:  # a chain is kept on every rank or on none, for the same reason
            flags = shard.any([f or not acc.finite() for f, acc in zip(flags, accs, strict=False)])
            escapes = shard.ranks.agree(escapes)
        for i, (chain, flag) in enumerate(zip(ids, flags, strict=True)):
            traces.seconds[chain] = time.perf_counter() - t_group
            self.pool.add(chain, accs[i], flag, traces.seconds[chain], escaped=escapes[i])
        traces.finished += ids
        if self.saver is not None:
            self.saver(self.pool, traces)

    def _snapshot(self, ids: list[int], next_draw: int, accs: list, dists: list, means: list,
                  seconds: float) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
        """The running group, between two draws: its chains, accumulators, traces so far (and lag-1 pairs)."""
        tensors = {f"run.chain.{k}": v for k, v in self.chains.snapshot().items()}
        for i, acc in enumerate(accs):  # a co-moment of its own, or the chain's draws (Pool.chain_state)
            tensors.update({f"run.acc{i}.{k}": v for k, v in acc.state_dict().items() if isinstance(v, torch.Tensor)})
        tensors["run.dists"], tensors["run.means"] = torch.stack(dists, 1), torch.stack(means, 1)
        if self.pairs is not None:
            tensors.update({f"run.prev{j}": prev[: len(ids)] for j, prev in enumerate(self.pairs.prev)})
        record = {"ids": ids, "next_draw": next_draw, "counts": [acc.count for acc in accs], "seconds": seconds}
        return tensors, record

    def _resume(self, restored: Restored, accs: list) -> tuple[int, list, list, float]:
        t, record = restored.tensors, restored.meta["running"]
        self.chains.resume({k.removeprefix("run.chain."): v for k, v in t.items() if k.startswith("run.chain.")})
        for i, acc in enumerate(accs):
            prefix = f"run.acc{i}."
            state = {k.removeprefix(prefix): v for k, v in t.items() if k.startswith(prefix)}
            acc.load_state_dict({"n": acc.n, "p": acc.p, "count": record["counts"][i], **state})
        if self.pairs is not None:
            for j, prev in enumerate(self.pairs.prev):
                prev[: len(accs)].copy_(t[f"run.prev{j}"])
        dists = list(t["run.dists"].to(self.device).unbind(1))
        means = list(t["run.means"].to(self.device).unbind(1))
        return record["next_draw"], dists, means, record["seconds"]


def escaped_chains(mean_train_loss: torch.Tensor, at_w_star: float, factor: float | None,
                   typical: list[tuple[float, float]]) -> list[str | None]:  # fmt: skip
    """Per chain of ``mean_train_loss`` ``[c, draws]``: why it left w*'s basin, or None. The rise of the mean
    training loss above w*'s has a typical level (its median over the draws) and spread (the median absolute
    deviation); a chain escapes when its highest rise exceeds the level by more than ``factor`` spreads, each
    the chain's own or the earlier kept chains' median when smaller (the spread floored at 1e-6 of the loss):
    a chain that found a far higher-loss region without reaching NaN/Inf, whose draws would dominate every
    covariance. ``typical`` collects the kept chains' (level, spread). A chain that escapes from its first
    draws on, with no earlier chain to compare it with, is not caught."""
    if factor is None:
        return [None] * mean_train_loss.shape[0]
    rise = (mean_train_loss.double() - at_w_star).cpu()
    out: list[str | None] = []
    for row in rise:
        row = row[torch.isfinite(row)]
        if row.numel() == 0:
            out.append(None)
            continue
        level = float(row.median())
        spread = float((row - level).abs().median())
        ref_level, ref_spread = level, spread
        if typical:
            ref_level = min(level, sorted(t[0] for t in typical)[len(typical) // 2])
            ref_spread = min(spread, sorted(t[1] for t in typical)[len(typical) // 2])
        ref_spread = max(ref_spread, 1e-6 * abs(at_w_star), 1e-12)
        excess = (float(row.max()) - ref_level) / ref_spread
        if excess > factor:
            out.append(f"mean training loss rose {float(row.max()):.3g} above w*'s, {excess:.3g} spreads "
                       f"({ref_spread:.2g}) above its typical {ref_level:.3g}")  # fmt: skip
        else:
            out.append(None)
            typical.append((level, spread))
    return out


class _Pairs:
    """Turns row ``filled`` of the draw buffers into the sum of this draw and the chain's previous one."""

    def __init__(self, bufs: list[torch.Tensor]):
        self.bufs = bufs
        self.prev = [torch.empty_like(b[0]) for b in bufs]  # [size, n] the previous draw of each chain

    def pair(self, filled: int, c: int, *, first_draw: bool) -> int:
        """Returns how many rows became ready (0 for a chain's first draw, which is only remembered)."""
        for buf, prev in zip(self.bufs, self.prev, strict=True):
            cur = buf[filled, :c]
            if first_draw:
                prev[:c].copy_(cur)
                continue
            total = cur + prev[:c]
            prev[:c].copy_(cur)
            cur.copy_(total)
        return 0 if first_draw else 1


def _diagnostics(sides: list[EvalSet], pool: Pool, traces: _Traces, config: BIFConfig, opt: SGLD, chains: Chains,
                 cov_dtype: torch.dtype, t_start: float) -> dict[str, Any]:  # fmt: skip
    train, query = sides
    return {
        "chain_mean_train_loss": traces.mean_train_loss.cpu().tolist(),
        "rms_distance_from_w_star": traces.distance.cpu().tolist(),
        "diverged": pool.diverged,
        "escaped": {str(c): why for c, why in pool.escaped.items()},
        "num_chains_used": pool.survivors,
        "num_draws_used": pool.pooled.count,
        "w_star_mean_train_loss": float(train.at_w_star.mean()),
        "w_star_mean_query_loss": float(query.at_w_star.mean()),
        "n_train_units": train.units.n,
        "n_query_units": query.units.n,
        "n_train_sequences": train.units.num_sequences,
        "n_query_sequences": query.units.num_sequences,
        "chain_seconds": traces.seconds,
        "seconds": time.perf_counter() - t_start,
        "sampler_backend": opt.resolved_backend,
        "chain_batch": chains.size,
        "capture": chains.capture_status(),
        "cov_dtype": str(cov_dtype).removeprefix("torch."),
        "chain_state": pool.chain_state,  # a running chain's co-moment, or its draws (engine.pool)
        "estimator": config.estimator,
        # A DataLoader's own batch size (None: batches from its batch_sampler).
        "eval_batch_size": {s.name: s.batch_size for s in sides},
    }


def _progress(config: BIFConfig):
    if not config.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=config.total_draws, desc="bif_fast draws", unit="draw")
