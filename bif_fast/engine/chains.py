"""Running chains: one protocol, a sequential and a batched implementation, and the choice between them.

``Chains`` is what the draw loop (``engine.run``) needs of a group of chains: start them at w*, step
them, evaluate the losses at their current weights, and report their distance from w* and whether they
diverged. ``SequentialChains`` runs one chain at a time through the model and ``bif_fast.SGLD``;
``BatchedChains`` runs several at once through ``ChainBatch`` (stacked weights under ``vmap``). Chain c
is the same chain either way: its Philox noise stream is c, its minibatch stream is the source's stream
for c, and its steps and canonical flattening are the same, so the two agree up to the rounding of the
batched matrix products.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch

from bif_fast.config import BIFConfig
from bif_fast.engine.batched import ChainBatch
from bif_fast.engine.control_variate import ControlVariate
from bif_fast.engine.data import sgld_batches, stack_batches
from bif_fast.engine.distributed import RowShard, in_lockstep
from bif_fast.engine.model_state import ModelState
from bif_fast.engine.units import LossFn, Units, evaluate, full_batch_term, loss_and_mask, minibatch_loss
from bif_fast.sampler import SGLD

__all__ = [
    "CAPTURE_MIN_STEPS",
    "BatchedChains",
    "Chains",
    "FullBatch",
    "SequentialChains",
    "capture_off_reason",
    "chain_batch_size",
    "make_chains",
]

logger = logging.getLogger("bif_fast")


class Chains(Protocol):
    """A group of at most ``size`` chains, run together."""

    size: int
    numel: int

    def reset(self, chains: list[int]) -> None:
        """Start chains ``chains`` (global indices) at w* (the model's buffers as at entry), with fresh
        sampler state and minibatch streams."""

    def steps(self, count: int) -> None:
        """``count`` sampler steps of every chain of the group."""

    def step_with_losses(self) -> list[torch.Tensor]:
        """One full-batch step (``batch_size="full"``) that also returns the training losses of its
        forward, i.e. at the weights before the step, ``[C, B(, T)]`` per evaluation batch."""

    def evaluate(self, batches: list) -> list[torch.Tensor]:
        """The losses of every evaluation batch at each chain's weights, ``[C, B(, T)]`` each."""

    def distance(self) -> torch.Tensor:
        """``[C]`` ``||w - w*||`` of each chain, without a host sync."""

    def diverged(self) -> list[bool]:
        """Which chains produced a NaN/Inf weight (one host read)."""

    def capture_status(self) -> dict[str, Any]:
        """For ``diagnostics["capture"]``: whether graph capture (``engine.capture``) ran, and why not."""

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Where the running chains are (a checkpoint mid-chain): sampler state and the model's buffers."""

    def resume(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Continue the chains just ``reset`` from ``snapshot``: the sampler state, the buffers, and each
        minibatch stream advanced past the batches the steps so far consumed."""


class _Run:
    """What both implementations share: the model's state, the loss, and the minibatch source."""

    def __init__(self, model, state: ModelState, loss_fn: LossFn, sgld_source: Any, config: BIFConfig,
                 device: torch.device, per_token: bool, full: FullBatch | None,
                 control: ControlVariate | None = None, shard: RowShard | None = None):  # fmt: skip
        self.model, self.state, self.loss_fn, self.sgld_source = model, state, loss_fn, sgld_source
        self.config, self.device, self.per_token, self.full = config, device, per_token, full
        self.control, self.shard = control, shard
        self.share = 1.0  # shard_rows: this rank's part of the last minibatch's count

    def sharded_minibatch_loss(self, batch: Any) -> torch.Tensor:
        """This rank's part of the minibatch mean loss (``shard_rows``): its losses' sum over the count of the
        whole minibatch (per token: the positions that count, summed across the ranks). The count's sum is
        the lockstep check after the forward (``RowShard.check``): a rank whose ``loss_fn`` raised makes every
        rank raise here."""
        error, total, count = None, None, torch.zeros(1, dtype=torch.float64)
        try:
            out, mask = loss_and_mask(self.loss_fn, self.model, self.shard.local_batch(batch), self.per_token)
            if self.per_token and mask is not None:
                mask = mask.bool()
                total, count = torch.where(mask, out, 0.0).sum(), mask.sum().to(torch.float64)
            else:
                total, count = out.sum(), torch.tensor(float(out.numel()), dtype=torch.float64)
        except Exception as e:
            error = e
        local = count.reshape(1).cpu()
        count = self.shard.check(error, local)
        self.share = float(local[0]) / max(float(count[0]), 1.0)
        return total / count.to(total.device, total.dtype).clamp_min(1) * self.shard.loss_scale

    def checked(self, fn: Callable[[], Any]) -> Any:
        """``fn()``; with row shards a lockstep check follows, so that a rank failing in it makes every rank
        raise instead of leaving the others waiting in the next collective."""
        return in_lockstep(self.shard, fn)

    def minibatches(self, chain: int, skip: int = 0):
        """Chain ``chain``'s minibatch stream, past its first ``skip`` batches (a resumed chain's)."""
        if self.full is not None:
            return iter(())
        stream = sgld_batches(self.sgld_source, self.config.batch_size, self.config.seed, chain, self.device)
        for _ in range(skip):
            next(stream)
        return stream

    def buffers(self) -> dict[str, torch.Tensor]:
        return {f"buffer.{name}": b for name, b in self.model.named_buffers()}

    def load_buffers(self, snapshot: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, b in self.buffers().items():
                b.copy_(snapshot[name])


class FullBatch:
    """The whole training set as the SGLD batch: its evaluation batches and its number of units."""

    def __init__(self, batches: list, count: int):
        self.batches, self.count = batches, count


class SequentialChains:
    """One chain at a time: the model's own forward and backward, and ``SGLD.raw_step``."""

    size = 1

    def __init__(self, run: _Run, opt: SGLD):
        self.run, self.opt = run, opt
        self.numel = opt.total_numel
        self._batches: Any = None

    def reset(self, chains: list[int]) -> None:
        (c,) = chains
        self.run.state.reset_buffers()
        self.run.state.reshard()
        self.opt.reset(chain=c)
        self._batches = self.run.minibatches(c)

    def steps(self, count: int) -> None:
        if count == 0:
            return
        run = self.run
        run.state.own_mode()
        for _ in range(count):
            if run.full is not None:
                self.step_with_losses()
                continue
            batch = next(self._batches)
            self.opt.zero_grad()
            if run.shard is not None:
                run.checked(self._sharded_backward(batch))
                self._sum_grads()
            else:
                minibatch_loss(*loss_and_mask(run.loss_fn, run.model, batch, run.per_token), run.per_token).backward()
                if run.control is not None:
                    run.control.apply_(self.opt.params, batch)
            self.opt.raw_step()
            self.opt.release_grads()

    def _sharded_backward(self, batch: Any) -> Callable[[], None]:
        """This rank's part of the minibatch gradient (and of the control variate's correction) into ``.grad``:
        the forward (a lockstep check of its own), then the rest as one function for ``checked``."""
        run = self.run
        loss = run.sharded_minibatch_loss(batch)

        def backward() -> None:
            loss.backward()
            if run.control is not None:
                shard = run.shard
                run.control.apply_share_(self.opt.params, shard.local_batch(batch), run.share, shard.ranks.world)

        return backward

    def _sum_grads(self) -> None:
        self.run.shard.reduce_grads_(self.opt.flat_grads())

    def step_with_losses(self) -> list[torch.Tensor]:
        run, full = self.run, self.run.full
        run.state.own_mode()
        self.opt.zero_grad()
        scale = 1.0 if run.shard is None else run.shard.loss_scale

        def forward_backward() -> list[torch.Tensor]:
            outs = []
            for batch in full.batches:
                out, mask = loss_and_mask(run.loss_fn, run.model, batch, run.per_token)
                (full_batch_term(out, mask, full.count, run.per_token) * scale).backward()
                outs.append(out.detach().unsqueeze(0))
            return outs

        outs = run.checked(forward_backward)
        if run.shard is not None:  # this rank's rows of the full batch; full.count is every rank's
            self._sum_grads()
        self.opt.raw_step()
        self.opt.release_grads()
        return outs

    def evaluate(self, batches: list) -> list[torch.Tensor]:
        self.run.state.eval_mode()
        outs, _ = self.run.checked(lambda: evaluate(self.run.model, batches, self.run.loss_fn, self.run.per_token, ""))
        self.run.state.reshard()
        return [o.unsqueeze(0) for o in outs]

    def distance(self) -> torch.Tensor:
        return self.opt.distance().unsqueeze(0)

    def diverged(self) -> list[bool]:
        return [self.opt.diverged]

    def capture_status(self) -> dict[str, Any]:
        return {"enabled": False, "reason": "chains run one by one"}

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {**{f"opt.{k}": v for k, v in self.opt.sampler_state().items()}, **self.run.buffers()}

    def resume(self, snapshot: dict[str, torch.Tensor]) -> None:
        self.run.state.reshard()
        self.opt.load_sampler_state({k[4:]: v for k, v in snapshot.items() if k.startswith("opt.")})
        self.run.load_buffers(snapshot)
        self._batches = self.run.minibatches(self.opt.chain, skip=self.opt.num_steps)


class BatchedChains:
    """Up to ``size`` chains at once through a ``ChainBatch``."""

    def __init__(self, run: _Run, batch: ChainBatch):
        self.run, self.batch = run, batch
        self.size, self.numel = batch.size, batch.numel
        self._batches: list = []

    def reset(self, chains: list[int]) -> None:
        self.run.state.reset_buffers()
        self.batch.reset(chains)
        self._batches = [self.run.minibatches(c) for c in chains]

    def steps(self, count: int) -> None:
        if count == 0:
            return
        self.run.state.own_mode()
        for _ in range(count):
            if self.run.full is not None:
                self.step_with_losses()
                continue
            if self.run.shard is not None:
                self._sharded_step()
                continue
            batch = stack_batches([next(it) for it in self._batches])
            grad = self.batch.gradient(batch)
            if self.run.control is not None:
                grad.add_(self.run.control.batched_correction(batch).to(grad.dtype))
            self.batch.update()

    def _sharded_step(self) -> None:
        """One step of every chain over row shards: this rank's rows of each chain's minibatch, the chains'
        counts summed over the ranks after the forward, the gradients (and control-variate corrections) of
        this rank's part summed before the update."""
        run, shard = self.run, self.run.shard
        local = stack_batches([shard.local_batch(next(it)) for it in self._batches])
        c = self.batch.c

        def totals(counts: torch.Tensor | None, error: Exception | None) -> torch.Tensor:
            values = torch.zeros(c, dtype=torch.float64) if counts is None else counts.double().cpu()
            return shard.check(error, values)

        def gradient() -> torch.Tensor:
            grad, shares = self.batch.sharded_gradient(local, totals)
            if run.control is not None:
                grad.add_(run.control.batched_share_correction(local, shares, shard.ranks.world).to(grad.dtype))
            return grad

        shard.sum_(shard.checked(gradient))
        self.batch.update()

    def step_with_losses(self) -> list[torch.Tensor]:
        run = self.run
        run.state.own_mode()
        outs = run.checked(lambda: self.batch.full_gradient(run.full.batches, run.full.count))
        if run.shard is not None:  # this rank's rows of the full batch; full.count is every rank's
            run.shard.sum_(self.batch.grad[: self.batch.c])
        self.batch.update()
        return outs

    def evaluate(self, batches: list) -> list[torch.Tensor]:
        self.run.state.eval_mode()
        return self.run.checked(lambda: self.batch.evaluate(batches))

    def distance(self) -> torch.Tensor:
        return self.batch.distance()

    def diverged(self) -> list[bool]:
        return self.batch.diverged()

    def capture_status(self) -> dict[str, Any]:
        return self.batch.graphs.status()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {**{f"batch.{k}": v for k, v in self.batch.sampler_state().items()}, **self.run.buffers()}

    def resume(self, snapshot: dict[str, torch.Tensor]) -> None:
        self.batch.load_sampler_state({k[6:]: v for k, v in snapshot.items() if k.startswith("batch.")})
        self.run.load_buffers(snapshot)
        self._batches = [self.run.minibatches(c, skip=self.batch.num_steps) for c in self.batch.chains]


# Auto chain batching. On a GPU: models of at most _AUTO_BATCH_MAX_PARAMS sampled parameters, as many
# chains as the per-chain accumulators allow within _AUTO_BATCH_ACC_BYTES. On a CPU, vmap pays only where
# per-call dispatch dominates (benchmarks/results/chain_batch.csv: 1.2-1.5x for MLPs of 212 and 1,860
# parameters, 0.6-0.9x at 3,716, where vmap's batched cross-entropy is slow), so a CPU run with minibatch
# gradients is batched when parameters x evaluation rows <= _AUTO_BATCH_CPU_WORK. With full-batch gradients
# (the calibrated defaults) the matrix products are large enough for the batched ones to pay: 1.07-2.1x on
# the five LDS settings at their calibrated settings (385-9,610 parameters, 320-1,200 rows, 2 threads), and
# 1.5-5.1x once the batched steps replay captured graphs (capture, below), so the bound there is
# _AUTO_BATCH_CPU_FULL_WORK. The rule is deterministic, so the same call always takes
# the same path (the paths agree only up to rounding).
_AUTO_BATCH_MAX_PARAMS = 1 << 22
_AUTO_BATCH_ACC_BYTES = 2 << 30
_AUTO_BATCH_CPU_WORK = 1 << 20
_AUTO_BATCH_CPU_FULL_WORK = 1 << 24
# capture='auto': graphs are traced where a chain takes at least this many steps. Tracing a graph costs
# ~50 ms on the digits MLP (plus ~0.7 s once per process for make_fx's set-up) and replaying the gradient
# and the query evaluation saves ~1.3 ms per step there, so the trace pays for itself after ~100 steps.
CAPTURE_MIN_STEPS = 150


def capture_off_reason(config: BIFConfig) -> str | None:
    """Why batched chains do not capture graphs under ``config.capture`` (None: they do). 'auto' follows
    the rule above, deterministic, so a resumed run takes the same path as the run it continues."""
    if config.capture != "auto":
        return None if config.capture else "BIFConfig.capture=False"
    steps = config.num_burnin_steps + config.num_draws * config.num_steps_bw_draws
    if steps < CAPTURE_MIN_STEPS:
        return f"capture='auto': {steps} steps per chain, fewer than {CAPTURE_MIN_STEPS}"
    return None


def chain_batch_size(config: BIFConfig, device: torch.device, numel: int, n: int, p: int, dtype: torch.dtype,
                     eval_rows: int) -> int:  # fmt: skip
    """How many chains run at once: ``config.chain_batch``, or the 'auto' policy above."""
    if config.num_chains == 1:
        return 1
    if config.chain_batch != "auto":
        return min(config.chain_batch, config.num_chains)
    if device.type not in ("cpu", "cuda") or numel > _AUTO_BATCH_MAX_PARAMS:
        return 1
    cpu_work = _AUTO_BATCH_CPU_FULL_WORK if config.batch_size == "full" else _AUTO_BATCH_CPU_WORK
    if device.type == "cpu" and numel * eval_rows > cpu_work:
        return 1
    per_chain = n * p * torch.empty(0, dtype=dtype).element_size()
    return max(1, min(config.num_chains, _AUTO_BATCH_ACC_BYTES // max(per_chain, 1)))


def make_chains(model, state: ModelState, opt: SGLD, loss_fn: LossFn, sgld_source: Any, config: BIFConfig,
                per_token: bool, size: int, checks: list[tuple[list, Units, torch.Tensor]],
                full: FullBatch | None = None, control: ControlVariate | None = None,
                shard: RowShard | None = None) -> Chains:  # fmt: skip
    """``BatchedChains`` of ``size`` chains when ``size > 1`` and they pass the trial against the model at w*
    (``checks``: evaluation batches, their units and the losses at w*), else ``SequentialChains``. ``full``:
    full-batch steps over these batches; ``control``: minibatch gradients with that control variate;
    ``shard``: gradients summed across the ranks (``shard_rows``; batched for a model that is not
    FSDP-sharded where every rank's trial passes, else one by one)."""
    run = _Run(model, state, loss_fn, sgld_source, config, opt.device, per_token, full, control, shard)
    if size > 1 and (shard is None or not shard.fsdp):
        batch, why_not = _try_chain_batch(run, opt, size, checks)
        if shard is not None and shard.any([batch is None])[0]:  # every rank takes the same path
            batch, why_not = None, why_not or "another rank's trial of batched chains failed"
        if batch is not None:
            return BatchedChains(run, batch)
        log = logger.warning if config.chain_batch != "auto" else logger.info
        log("bif_fast: running the chains one by one (batched chains unavailable: %s)", why_not)
    return SequentialChains(run, opt)


def _try_chain_batch(run: _Run, opt: SGLD, size: int, checks) -> tuple[ChainBatch | None, str | None]:
    """Build a ``ChainBatch`` and check it against the plain model at w*: every chain's losses on all
    evaluation batches, and its gradient on chain 0's first SGLD minibatch. Returns (batch, None) or
    (None, reason). Warnings raised by the trial itself (e.g. torch's "no batching rule, falling back" for
    an op vmap runs slowly) are held back: the outcome is logged instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            batch = ChainBatch(run.model, opt.params, run.loss_fn, run.config.sgld, seed=run.config.seed, size=size,
                               backend=opt.resolved_backend, per_token=run.per_token, mass=opt.mass,
                               capture_off=capture_off_reason(run.config))  # fmt: skip
            batch.reset(list(range(size)))
            run.state.eval_mode()
            for batches, units, ref in checks:
                got = units.gather_rows(batch.evaluate(batches), None)
                err = float((got - ref).abs().max())
                if not err <= 1e-4 * (1.0 + float(ref.abs().max())):
                    return None, f"vmapped losses differ from the model's at w* (max abs {err:.3g})"
            run.state.own_mode()
            why_not = _check_gradient(run, opt, batch, size)
            return (None, why_not) if why_not else (batch, None)
        except Exception as exc:  # vmap cannot run this model or loss_fn unchanged
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _check_gradient(run: _Run, opt: SGLD, batch: ChainBatch, size: int) -> str | None:
    if run.full is not None:
        trial = run.full.batches[0]
        batch.full_gradient([trial], run.full.count)
        got = batch.grad[0].clone()
        out, mask = loss_and_mask(run.loss_fn, run.model, trial, run.per_token)
        loss = full_batch_term(out, mask, run.full.count, run.per_token)
    else:
        trial = next(run.minibatches(0))
        got = batch.gradient(stack_batches([trial] * size)).clone()
        loss = minibatch_loss(*loss_and_mask(run.loss_fn, run.model, trial, run.per_token), run.per_token)
    grads = torch.autograd.grad(loss, opt.params, allow_unused=True)
    want = torch.cat([(torch.zeros_like(q) if g is None else g).reshape(-1) for q, g in zip(opt.params, grads,
                                                                                           strict=True)])  # fmt: skip
    scale = float(want.abs().max())
    err = float((got.float() - want.float()).abs().max())
    if not err <= 1e-3 * scale + 1e-6:
        return f"vmapped gradients differ from the model's at w* (max abs {err:.3g}, scale {scale:.3g})"
    return None
