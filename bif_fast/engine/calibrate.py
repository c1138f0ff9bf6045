"""Calibration building blocks: the curvature of the training loss at w*, and the kinetic sampler's step and
friction from it.

The top eigenvalue of the Hessian of the mean training loss comes from power iteration on Hessian-vector
products formed by central differences of gradients, ``Hv ~ (g(w + e v) - g(w - e v)) / 2e``: two gradient
evaluations per product and first derivatives only, so any model whose loss has a backward works
(including custom autograd Functions with no double backward, like the fused cross-entropy).

For the localised potential ``U = nbeta L + (weight_decay / 2) |w|^2 + (localization / 2) |w - w*|^2`` the
curvatures are ``a = nbeta h + weight_decay + localization`` over the Hessian's eigenvalues h. BAOAB with
unit mass is stable for steps ``lr < 2 / sqrt(a_max)``; critical damping of the slowest mode
(``a_min >= weight_decay + localization``) is ``friction = 2 sqrt(a_min)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bif_fast.engine.units import LossFn, loss_and_mask, minibatch_loss

__all__ = ["KineticSettings", "kinetic_settings", "top_curvature"]


def _gradient(model, params: Sequence[torch.Tensor], loss_fn: LossFn, batches: list, per_token: bool) -> torch.Tensor:
    """Flat gradient of the mean loss over ``batches`` (weighted by their sizes), float32."""
    total, weight = None, 0
    for batch in batches:
        out, mask = loss_and_mask(loss_fn, model, batch, per_token)
        size = int(mask.sum()) if mask is not None else out.numel()
        grads = torch.autograd.grad(minibatch_loss(out, mask, per_token), list(params), allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for p, g in
                          zip(params, grads, strict=True)])  # fmt: skip
        total = flat * size if total is None else total.add_(flat, alpha=size)
        weight += size
    return total / max(weight, 1)


def top_curvature(model: torch.nn.Module, params: Sequence[torch.Tensor], loss_fn: LossFn, batches: list, *,
                  per_token: bool = False, iters: int = 30, rtol: float = 1e-3,
                  seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """The largest eigenvalue of the Hessian of the mean loss over ``batches`` at the current weights.

    Returns:
        dict with ``lam_max`` (float), ``iters`` (power iterations run), ``hvps`` (products formed; two
        gradient evaluations each). The weights are left exactly as they were.
    """
    w0 = [p.detach().clone() for p in params]
    scale = math.sqrt(sum(float(p.float().square().sum()) for p in w0) / max(sum(p.numel() for p in w0), 1))
    v = torch.randn(sum(p.numel() for p in w0), generator=torch.Generator().manual_seed(seed))
    v = v.to(w0[0].device) / v.norm()
    lam, done = 0.0, 0
    try:
        for done in range(1, iters + 1):
            eps = 1e-3 * max(scale, 1e-3)
            hv = (_shifted_gradient(model, params, w0, v, eps, loss_fn, batches, per_token)
                  - _shifted_gradient(model, params, w0, v, -eps, loss_fn, batches, per_token)) / (2 * eps)  # fmt: skip
            new = float(v @ hv)
            v = hv / hv.norm().clamp_min(1e-30)
            if done > 3 and abs(new - lam) <= rtol * abs(new):
                lam = new
                break
            lam = new
    finally:
        with torch.no_grad():
            for p, w in zip(params, w0, strict=True):
                p.copy_(w)
    return {"lam_max": lam, "iters": done, "hvps": done}


def _shifted_gradient(model, params, w0, v: torch.Tensor, eps: float, loss_fn, batches, per_token) -> torch.Tensor:
    with torch.no_grad():
        start = 0
        for p, w in zip(params, w0, strict=True):
            p.copy_(w + eps * v[start : start + w.numel()].view_as(w).to(w.dtype))
            start += w.numel()
    return _gradient(model, params, loss_fn, batches, per_token)


@dataclass(frozen=True)
class KineticSettings:
    lr: float
    friction: float
    a_max: float
    a_min: float


def kinetic_settings(lam_max: float, *, nbeta: float, localization: float, weight_decay: float = 0.0,
                     safety: float = 0.8) -> KineticSettings:  # fmt: skip
    """BAOAB step at ``safety`` x its stability limit ``2 / sqrt(a_max)`` and friction at critical damping of
    the slowest mode, for the potential's curvatures ``a = nbeta h + weight_decay + localization``."""
    if not (lam_max >= 0 and math.isfinite(lam_max)):
        raise ValueError(f"lam_max must be a finite number >= 0, got {lam_max!r}")
    if not 0 < safety < 1:
        raise ValueError(f"safety must be in (0, 1), got {safety!r}")
    a_min = weight_decay + localization
    if a_min <= 0:
        raise ValueError("the potential needs localization + weight_decay > 0 for a stable kinetic sampler")
    a_max = nbeta * lam_max + a_min
    return KineticSettings(lr=safety * 2.0 / math.sqrt(a_max), friction=2.0 * math.sqrt(a_min), a_max=a_max,
                           a_min=a_min)  # fmt: skip
