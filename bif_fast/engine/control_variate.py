"""Minibatch gradients with a control variate at w*: ``g_b(w) - g_b(w*) + g(w*)`` (Baker et al. 2019).

A plain minibatch gradient ``g_b(w)`` is unbiased, but its noise does not shrink near w*: at large nbeta
the force ``nbeta g_b`` carries minibatch noise of order ``nbeta / sqrt(b)`` against the injected noise
of order ``sqrt(nbeta)``, and the chains sample a wider law than the posterior. Subtracting the same
minibatch's gradient at w* and adding the full-batch gradient at w* keeps the estimator unbiased
(``E_b[g_b(w*)] = g(w*)``) while its noise becomes ``(H_b - H)(w - w*)`` to first order: it vanishes
at w* and stays small in a localised posterior. The price is a second gradient of the same minibatch
per step, at w* (a ``torch.func.grad`` of the functional model, so the model's own weights are not
touched), and one full-batch gradient before the chains start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bif_fast.engine.data import leading_dims
from bif_fast.engine.units import LossModule, loss_module_names

__all__ = ["ControlVariate"]


class ControlVariate:
    """The correction ``g(w*) - g_b(w*)`` that turns a minibatch gradient ``g_b(w)`` into the control-variate one.

    Args:
        model (nn.Module): the model (its parameters are not changed).
        params (list[Tensor]): the sampled parameters, canonical order (as the sampler flattens them).
        loss_fn, per_token: as in ``compute_bif``.
        full_gradient (Tensor): ``[N]`` the gradient of the mean training loss at w*, flat, canonical order.

    Raises:
        ValueError: a parameter that is not part of ``model``, or a gradient of the wrong size.
    """

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.Tensor], loss_fn, per_token: bool,
                 full_gradient: torch.Tensor):  # fmt: skip
        self.names = loss_module_names(model, params)
        numel = sum(p.numel() for p in params)
        if full_gradient.numel() != numel:
            raise ValueError(f"the full gradient has {full_gradient.numel()} elements, the parameters {numel}")
        self.anchor = {n: p.detach().clone() for n, p in zip(self.names, params, strict=True)}
        # float64 weights keep float64 corrections; anything else gets float32 (the sampler's precision)
        self.dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        self.full = full_gradient.detach().to(self.dtype).reshape(-1)
        self.wrapper = LossModule(model, loss_fn, per_token)
        self._grad = torch.func.grad(self._loss)

    def _loss(self, weights: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return torch.func.functional_call(self.wrapper, weights, (batch, True))

    def _flat(self, grads: dict[str, torch.Tensor], lead: tuple[int, ...]) -> torch.Tensor:
        return torch.cat([grads[n].reshape(*lead, -1).to(self.dtype) for n in self.names], -1)

    def correction(self, batch: Any) -> torch.Tensor:
        """``[N]`` ``g(w*) - g_b(w*)`` for one minibatch (float64 for float64 weights, else float32)."""
        with torch.enable_grad():
            grads = self._grad(self.anchor, batch)
        return self.full - self._flat(grads, ())

    def batched_correction(self, batch: Any) -> torch.Tensor:
        """``[C, N]`` corrections for C minibatches stacked along dim 0 (one per chain)."""
        with torch.enable_grad():
            grads = torch.func.vmap(self._grad, in_dims=(None, leading_dims(batch)))(self.anchor, batch)
        c = next(iter(grads.values())).shape[0]
        return self.full - self._flat(grads, (c,))

    def batched_share_correction(self, local_batch: Any, shares: torch.Tensor, world: int) -> torch.Tensor:
        """``[C, N]`` this rank's parts of C chains' corrections under row shards (``apply_share_`` per chain):
        ``g(w*) / world - shares[c] g_local_c(w*)``, ``local_batch`` this rank's rows of each minibatch, stacked."""
        with torch.enable_grad():
            grads = torch.func.vmap(self._grad, in_dims=(None, leading_dims(local_batch)))(self.anchor, local_batch)
        local = self._flat(grads, (shares.numel(),))
        return self.full / world - shares.to(local.device, local.dtype)[:, None] * torch.nan_to_num(local)

    def apply_(self, params: Sequence[torch.Tensor], batch: Any) -> None:
        """Add the correction of ``batch`` to the ``.grad`` of ``params`` (after the backward at w)."""
        self._add_(params, self.correction(batch))

    def apply_share_(self, params: Sequence[torch.Tensor], local_batch: Any, share: float, world: int) -> None:
        """Row shards (``BIFConfig.shard_rows``): add this rank's part of the correction, ``g(w*) / world -
        share g_local(w*)``, to the ``.grad`` of ``params`` before the ranks' gradients are summed; ``share``
        is this rank's part of the minibatch's count (rows, or positions that count), ``g_local`` the mean
        gradient over its ``local_batch``. Summed over the ranks it is the whole correction."""
        corr = self.full / world
        if share > 0:
            with torch.enable_grad():
                grads = self._grad(self.anchor, local_batch)
            corr = corr - share * self._flat(grads, ())
        self._add_(params, corr)

    def _add_(self, params: Sequence[torch.Tensor], corr: torch.Tensor) -> None:
        start = 0
        for p in params:
            piece = corr[start : start + p.numel()].view_as(p).to(p.dtype)
            start += p.numel()
            if p.grad is None:
                p.grad = piece.clone()
            else:
                p.grad.add_(piece)
