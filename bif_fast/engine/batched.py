"""Several SGLD chains of one model at once: stacked weights, ``torch.func.functional_call`` + ``vmap``.

``compute_bif`` runs a group of chains through ``ChainBatch`` (behind ``engine.chains.BatchedChains``)
when ``BIFConfig.chain_batch`` asks for it. Every chain is still the chain it is when run alone: chain c
keeps its own Philox noise stream (``chain=c``), its own minibatch stream (the source's stream for c), the
same step counter and the same canonical flattening of the sampled parameters, so the results equal the
sequential ones up to the rounding of the batched matrix products (bit-identical noise, same minibatches,
same schedule).

The weights of chain i are row i of one ``[C, N]`` buffer; each sampled parameter is a ``[C, *shape]``
view of it, passed to ``functional_call`` under ``vmap``. One vmapped forward (and backward, for an
SGLD step) serves all C chains, which amortises the per-call costs that dominate small models (kernel
launches on a GPU, framework dispatch on a CPU); the sampler update is one fused launch per chain. With
graph capture (``capture_off=None``) the full-batch gradient and the evaluations, which see the same
batches at every step, are traced once and replayed as straight-line ATen graphs (``engine.capture``),
without vmap's and autograd's per-op overhead.

Models that vmap cannot run unchanged (data-dependent Python control flow, ``.item()``, in-place
updates of buffers in train mode such as BatchNorm statistics, dropout in train mode, custom autograd
Functions without a vmap rule) are detected before sampling (``compute_bif`` checks a batch's losses
and gradient against the plain model at w*) and the chains then run one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bif_fast._backend import ResolvedBackend
from bif_fast.config import SGLDConfig
from bif_fast.engine.capture import GraphCache
from bif_fast.engine.data import leading_dims
from bif_fast.engine.mass import LowRankMass, init_mass_velocity_, mass_steps_
from bif_fast.engine.units import LossModule, full_batch_term, loss_module_names
from bif_fast.ops import init_sampler_state_, sgld_update_rows_resolved_
from bif_fast.sampler import load_sampler_state_

__all__ = ["ChainBatch"]


class ChainBatch:
    """C chains of the sampled parameters of ``model`` as rows of one buffer, stepped and evaluated with vmap.

    Args:
        model (nn.Module): the model (its parameters stay at w*; the chains live in this object).
        params (list[Tensor]): the sampled parameters, deduplicated, all of one floating dtype.
        loss_fn (callable): ``loss_fn(model, batch)``.
        config (SGLDConfig): sampler hyperparameters.
        seed (int): noise key.
        size (int): the largest number of chains run at once.
        backend (str): resolved sampler backend (``triton`` | ``ext`` | ``torch``).
        per_token (bool): per-token losses (SGLD loss = mean over the declared positions, per chain).
        mass (LowRankMass | None): the curvature mass of a kinetic sampler, or None.
        capture_off (str | None): None replays the full-batch gradient and the evaluations as traced
            graphs (``engine.capture``); otherwise why not (run eagerly). Default: "off".

    Raises:
        ValueError: parameters of several dtypes, or a parameter that is not part of ``model``.
    """

    def __init__(self, model, params, loss_fn, config: SGLDConfig, *, seed: int, size: int, backend: ResolvedBackend,
                 per_token: bool, mass: LowRankMass | None = None, capture_off: str | None = "off"):  # fmt: skip
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"batched chains need one parameter dtype, got {sorted(map(str, dtypes))}")
        self.names = loss_module_names(model, params)
        self.shapes = [tuple(p.shape) for p in params]
        self.starts, total = [], 0
        for p in params:
            self.starts.append(total)
            total += p.numel()
        self.numel = total
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.config, self.seed, self.size, self.backend, self.per_token = config, seed, size, backend, per_token
        self.wrapper = LossModule(model, loss_fn, per_token)
        self._eval_fn = torch.func.vmap(self._call, in_dims=(0, None))  # stacked weights, shared batch
        with torch.no_grad():
            self.anchor = torch.cat([p.detach().reshape(-1) for p in params])  # [N] w*, canonical order
        # [size, N] parameters in the model's dtype and the fp32 master (the same buffer for fp32 models).
        self.param = self.anchor.expand(size, total).clone()
        self.master = self.param if self.dtype == torch.float32 else self.param.float()
        self.grad = torch.zeros(size, total, dtype=self.dtype, device=self.device)
        self._views_of: dict[int, list[torch.Tensor]] = {}  # chains -> per-parameter views of param[:c]
        self.graphs = GraphCache(capture_off)
        self.state = torch.zeros(size, total, device=self.device) if config.needs_state else None
        self.diverged_flags = torch.zeros(size, dtype=torch.int32, device=self.device)
        self.mass = mass
        self.noise = torch.empty(size, total, device=self.device) if mass is not None else None
        self.chains: list[int] = []
        self.num_steps = 0

    # -- state -------------------------------------------------------------------------------------

    def reset(self, chains: list[int]) -> None:
        """Start chains ``chains`` (at most ``size``) at w*, as ``SGLD.reset(chain=c)`` would."""
        if not 1 <= len(chains) <= self.size:
            raise ValueError(f"a chain batch holds 1..{self.size} chains, got {len(chains)}")
        self.chains = list(chains)
        with torch.no_grad():
            self.param.copy_(self.anchor)
            if self.master is not self.param:
                self.master.copy_(self.anchor)
            for i, c in enumerate(self.chains):
                init_sampler_state_(None if self.state is None else self.state[i], self.config, seed=self.seed,
                                    chain=c, offset=0, backend=self.backend)  # fmt: skip
                if self.mass is not None:
                    init_mass_velocity_(self.state[i], self.mass)
        self.diverged_flags.zero_()
        self.num_steps = 0

    @property
    def c(self) -> int:
        return len(self.chains)

    def _split(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """``[c, *shape]`` views of each parameter's columns of ``rows`` (``[c, N]``)."""
        c = rows.shape[0]
        return [rows[:, s : s + int(torch.Size(shape).numel())].view(c, *shape)
                for s, shape in zip(self.starts, self.shapes, strict=True)]  # fmt: skip

    def _param_views(self) -> list[torch.Tensor]:
        """The running chains' parameters, one ``[c, *shape]`` view of ``param[:c]`` per parameter.

        Gradients are taken with respect to detached copies of these, one leaf per parameter
        (``torch.autograd.grad``), so the backward hands over each parameter's ``[c, *shape]`` gradient as
        it produces it; views of one ``[c, N]`` leaf would make it scatter every parameter's gradient into
        a zero-filled ``[c, N]`` tensor and sum them."""
        c = self.c
        if c not in self._views_of:
            self._views_of[c] = self._split(self.param[:c])
        return self._views_of[c]

    @staticmethod
    def _perturbed(args: tuple) -> tuple:
        """``args`` with every chain's weights moved apart, for checking a new graph away from w*: each
        parameter plus 1% of its largest magnitude times fixed standard normal noise, different per chain."""
        views, *rest = args
        g = torch.Generator().manual_seed(0x5EED)
        moved = []
        for v in views:
            noise = torch.randn(v.shape, generator=g, dtype=torch.float32).to(device=v.device, dtype=v.dtype)
            moved.append(v + noise * (0.01 * v.detach().abs().amax().clamp_min(1e-3)))
        return (moved, *rest)

    def _graph_key(self) -> tuple:
        """What a captured graph of this batch bakes in besides the batch: the chain count, the model's mode."""
        return (self.c, self.wrapper.model.training)

    def _store_grads(self, grads: tuple[torch.Tensor | None, ...], accumulate: bool) -> None:
        """Write (or add) per-parameter gradients into ``grad[:c]``; a parameter the loss does not touch
        gets zero."""
        for view, g in zip(self._split(self.grad[: self.c]), grads, strict=True):
            if g is None:
                if not accumulate:
                    view.zero_()
            elif accumulate:
                view.add_(g)
            else:
                view.copy_(g)

    # -- evaluation and steps ------------------------------------------------------------------------

    def evaluate(self, batches: list) -> list[torch.Tensor]:
        """Losses of every evaluation batch at the current weights of every chain: ``[C, B(, T)]`` each,
        float64 kept, anything else as float32 (as the sequential evaluation)."""
        views, outs = self._param_views(), []
        for batch in batches:
            out = self.graphs.call("evaluate", batch, self._graph_key(), self._evaluate_one, views, batch,
                                   perturbed=self._perturbed)  # fmt: skip
            outs.append(out if out.dtype in (torch.float32, torch.float64) else out.float())
        return outs

    def _evaluate_one(self, views: list[torch.Tensor], batch: Any) -> torch.Tensor:
        with torch.no_grad():
            return self._eval_fn(dict(zip(self.names, views, strict=True)), batch)

    def _call(self, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return torch.func.functional_call(self.wrapper, params, (batch,))

    def _minibatch(self, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return torch.func.functional_call(self.wrapper, params, (batch, True))

    def gradient(self, batch: Any) -> torch.Tensor:
        """Gradients of each chain's mean minibatch loss, ``[C, N]`` (``batch`` stacked, one per chain).
        Not captured: the minibatches change from step to step."""
        leaves = [v.detach().requires_grad_(True) for v in self._param_views()]
        with torch.enable_grad():
            views = dict(zip(self.names, leaves, strict=True))
            losses = torch.func.vmap(self._minibatch, in_dims=(0, leading_dims(batch)))(views, batch)  # [C]
            grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        self._store_grads(grads, accumulate=False)
        return self.grad[: self.c]

    def sharded_gradient(self, batch: Any, totals: Callable[[torch.Tensor | None, Exception | None], torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Row shards: each chain's gradient of its local losses' sum over its whole minibatch's count
        (``batch``: this rank's rows of each chain's minibatch, stacked). ``totals(counts, error)`` sums the
        chains' local counts (rows, or positions that count) over the ranks after the forward, and raises on
        every rank if any rank's forward failed (``error``). Returns (``[C, N]`` gradients in ``self.grad``,
        ``[C]`` this rank's share of each chain's count)."""
        leaves = [v.detach().requires_grad_(True) for v in self._param_views()]
        sums = counts = error = None
        with torch.enable_grad():
            try:
                views = dict(zip(self.names, leaves, strict=True))
                sums, counts = torch.func.vmap(self._minibatch_sum, in_dims=(0, leading_dims(batch)))(views, batch)
            except Exception as e:  # every rank learns of it in totals
                error = e
            total = totals(None if counts is None else counts.detach(), error).to(sums.dtype).clamp_min(1)
            grads = torch.autograd.grad((sums / total).sum(), leaves, allow_unused=True)
        self._store_grads(grads, accumulate=False)
        return self.grad[: self.c], counts.detach().double() / total.double()

    def _minibatch_sum(self, params: dict[str, torch.Tensor], batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out, mask = torch.func.functional_call(self.wrapper, params, (batch,), {"with_mask": True})
        if self.per_token and mask is not None:
            mask = mask.bool()
            return torch.where(mask, out, 0.0).sum(), mask.sum().to(out.dtype)
        return out.sum(), torch.full((), out.numel(), dtype=out.dtype, device=out.device)

    def full_gradient(self, batches: list, count: int) -> list[torch.Tensor]:
        """Gradients (into ``self.grad``) of each chain's mean loss over ``batches`` (``count`` units in all),
        and the losses of its forward, ``[C, B(, T)]`` per batch (float32, or float64 kept)."""
        views, outs = self._param_views(), []
        for i, batch in enumerate(batches):
            out, grads = self.graphs.call("full_gradient", batch, (*self._graph_key(), count), self._full_gradient_one,
                                          views, batch, count, perturbed=self._perturbed)  # fmt: skip
            self._store_grads(grads, accumulate=i > 0)
            outs.append(out if out.dtype in (torch.float32, torch.float64) else out.float())
        if not batches:
            self.grad[: self.c].zero_()
        return outs

    def _full_gradient_one(self, views: list[torch.Tensor], batch: Any, count: int) -> tuple[torch.Tensor, tuple]:
        """(losses ``[C, B(, T)]``, per-parameter gradients of each chain's share of the full-batch loss)."""
        leaves = [v.detach().requires_grad_(True) for v in views]
        with torch.enable_grad():
            params = dict(zip(self.names, leaves, strict=True))
            out, total = torch.func.vmap(self._full_term, in_dims=(0, None, None))(params, batch, count)
            # chains are independent: d(sum_c L_c)/dw_c = dL_c/dw_c
            grads = torch.autograd.grad(total.sum(), leaves, allow_unused=True)
        return out.detach(), grads

    def _full_term(self, params: dict[str, torch.Tensor], batch: Any, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        out, mask = torch.func.functional_call(self.wrapper, params, (batch,), {"with_mask": True})
        return out, full_batch_term(out, mask, count, self.per_token)

    def step(self, batch: Any) -> None:
        """One SGLD step of every chain on its own minibatch (``batch`` stacked along dim 0)."""
        self.gradient(batch)
        self.update()

    def update(self) -> None:
        """The sampler update of every chain from the gradients in ``self.grad``."""
        with torch.no_grad():
            if self.mass is not None:
                c = self.c
                mass_steps_(self.backend, self.master[:c], self.grad[:c], self.anchor, self.state[:c],
                            config=self.config, mass=self.mass, seed=self.seed, chains=self.chains,
                            step=self.num_steps, noise=self.noise[:c], diverged=self.diverged_flags[:c])  # fmt: skip
                self.num_steps += 1
                return
            c = self.c
            sgld_update_rows_resolved_(
                self.backend, self.master[:c], self.grad[:c], self.anchor,
                None if self.state is None else self.state[:c], config=self.config, seed=self.seed,
                chains=self.chains, step=self.num_steps,
                out=None if self.master is self.param else self.param[:c], diverged=self.diverged_flags[:c],
            )  # fmt: skip
        self.num_steps += 1

    def sampler_state(self) -> dict[str, torch.Tensor]:
        """The running chains' position (live references, rows ``[: c]``): weights, fp32 master, sampler
        state, divergence flags, and the step counter that keys the next step's noise."""
        c = self.c
        out = {"num_steps": torch.tensor(self.num_steps, dtype=torch.int64), "param": self.param[:c],
               "diverged": self.diverged_flags[:c]}  # fmt: skip
        if self.master is not self.param:
            out["master"] = self.master[:c]
        if self.state is not None:
            out["state"] = self.state[:c]
        return out

    def load_sampler_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continue the running chains from ``sampler_state()``.

        Raises:
            ValueError: a buffer is missing or has another shape.
        """
        self.num_steps = load_sampler_state_(self.sampler_state(), state)

    def distance(self) -> torch.Tensor:
        """``[C]`` ||w - w*|| of each chain (no sync)."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self.master[: self.c] - self.anchor.float(), dim=1)

    def diverged(self) -> list[bool]:
        """Which chains produced a NaN/Inf weight (one read from the device)."""
        return [bool(v) for v in self.diverged_flags[: self.c].tolist()]
