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

from bif_fast.config import SGLDConfig
from bif_fast.engine.distributed import RowShard
from bif_fast.engine.mass import LowRankMass, curvature_mass
from bif_fast.engine.units import LossFn, loss_and_mask, minibatch_loss

__all__ = ["KineticSettings", "curvature_mass_at_w_star", "full_gradient", "hessian_vector_product", "kinetic_settings",
           "lanczos_iters", "top_curvature", "top_eigenpairs"]


def full_gradient(model, params: Sequence[torch.Tensor], loss_fn: LossFn, batches: list, per_token: bool, *,
                  dtype: torch.dtype = torch.float32, shard: RowShard | None = None) -> torch.Tensor:  # fmt: skip
    """Flat gradient of the mean loss over ``batches`` (weighted by their sizes), in ``dtype``.

    With ``shard`` (``BIFConfig.shard_rows``) ``batches`` are this rank's rows and the mean is over every
    rank's: the weighted sums and the counts are summed across the ranks, after a check that no rank's
    ``loss_fn`` raised (which makes every rank raise instead of waiting in the sum)."""
    total, weight, error = None, 0, None
    try:
        for batch in batches:
            out, mask = loss_and_mask(loss_fn, model, batch, per_token)
            size = int(mask.sum()) if mask is not None else out.numel()
            grads = torch.autograd.grad(minibatch_loss(out, mask, per_token), list(params), allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).to(dtype) for p, g in
                              zip(params, grads, strict=True)])  # fmt: skip
            total = flat * size if total is None else total.add_(flat, alpha=size)
            weight += size
    except Exception as e:
        if shard is None:
            raise
        error = e
    if shard is None:
        return total / max(weight, 1)
    weight = float(shard.check(error, torch.tensor([float(weight)]))[0])
    if total is None:  # a rank without rows
        total = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=dtype)
    return shard.sum_(total) / max(weight, 1.0)


def top_curvature(model: torch.nn.Module, params: Sequence[torch.Tensor], loss_fn: LossFn, batches: list, *,
                  per_token: bool = False, iters: int = 30, rtol: float = 1e-3, seed: int = 0,
                  shard: RowShard | None = None) -> dict[str, Any]:  # fmt: skip
    """The largest eigenvalue of the Hessian of the mean loss over ``batches`` at the current weights.

    Returns:
        dict with ``lam_max`` (float), ``iters`` (power iterations run), ``hvps`` (products formed; two
        gradient evaluations each). The weights are left exactly as they were.
    """
    w0 = [p.detach().clone() for p in params]
    v = torch.randn(sum(p.numel() for p in w0), generator=torch.Generator().manual_seed(seed))
    v = v.to(w0[0].device) / v.norm()
    lam, done = 0.0, 0
    for done in range(1, iters + 1):
        hv = hessian_vector_product(model, params, w0, v, loss_fn, batches, per_token, shard=shard)
        new = float(v @ hv)
        v = hv / hv.norm().clamp_min(1e-30)
        if done > 3 and abs(new - lam) <= rtol * abs(new):
            lam = new
            break
        lam = new
    return {"lam_max": lam, "iters": done, "hvps": done}


def hessian_vector_product(model, params: Sequence[torch.Tensor], w0: Sequence[torch.Tensor], v: torch.Tensor,
                           loss_fn: LossFn, batches: list, per_token: bool, *,
                           shard: RowShard | None = None) -> torch.Tensor:  # fmt: skip
    """``H v`` at the weights ``w0`` by a central difference of full-batch gradients (step 1e-3 x the rms
    weight along the unit vector v; with ``shard``, of every rank's rows); the parameters are put back at
    ``w0`` exactly."""
    eps = 1e-3 * max(math.sqrt(sum(float(w.float().square().sum()) for w in w0) / max(v.numel(), 1)), 1e-3)
    try:
        plus = _shifted_gradient(model, params, w0, v, eps, loss_fn, batches, per_token, shard)
        return (plus - _shifted_gradient(model, params, w0, v, -eps, loss_fn, batches, per_token, shard)) / (2 * eps)
    finally:
        with torch.no_grad():
            for p, w in zip(params, w0, strict=True):
                p.copy_(w)


def _shifted_gradient(model, params, w0, v: torch.Tensor, eps: float, loss_fn, batches, per_token,
                      shard: RowShard | None) -> torch.Tensor:  # fmt: skip
    with torch.no_grad():
        start = 0
        for p, w in zip(params, w0, strict=True):
            p.copy_(w + eps * v[start : start + w.numel()].view_as(w).to(w.dtype))
            start += w.numel()
    return full_gradient(model, params, loss_fn, batches, per_token, shard=shard)


def lanczos_iters(rank: int, numel: int) -> int:
    """Lanczos steps for ``rank`` converged top eigenpairs (and the next eigenvalue): twice the rank plus a
    margin, at most the dimension."""
    return min(numel, 2 * rank + 8)


def top_eigenpairs(model: torch.nn.Module, params: Sequence[torch.Tensor], loss_fn: LossFn, batches: list, *,
                   rank: int, per_token: bool = False, seed: int = 0,
                   shard: RowShard | None = None) -> dict[str, Any]:  # fmt: skip
    """The top ``rank + 1`` eigenvalues and ``rank`` eigenvectors of the Hessian of the mean loss over
    ``batches`` at the current weights: Lanczos with full reorthogonalisation on central-difference
    Hessian-vector products (``lanczos_iters(rank, N)`` products, two gradient evaluations each).

    Returns:
        dict with ``eigvals`` ``[rank + 1]`` (descending), ``eigvecs`` ``[N, rank]`` fp32 orthonormal,
        ``hvps``. The weights are left exactly as they were.
    """
    w0 = [p.detach().clone() for p in params]
    numel = sum(p.numel() for p in w0)
    m = lanczos_iters(rank, numel)
    if m < 2:
        raise ValueError("Lanczos needs at least two sampled weights")
    basis = torch.zeros(m, numel, device=w0[0].device)
    q = torch.randn(numel, generator=torch.Generator().manual_seed(seed)).to(w0[0].device)
    basis[0] = q / q.norm()
    alphas, betas = [], []
    for j in range(m):
        hv = hessian_vector_product(model, params, w0, basis[j], loss_fn, batches, per_token, shard=shard)
        alphas.append(float(basis[j] @ hv))
        for _ in range(2):  # full reorthogonalisation, twice (classical Gram-Schmidt loses orthogonality once)
            hv -= basis[: j + 1].T @ (basis[: j + 1] @ hv)
        beta = float(hv.norm())
        if shard is not None:  # every rank stops at the same step (its sums are the same; its rounding might not be)
            beta = shard.ranks.agree(beta)
        if j + 1 == m or beta <= 1e-10 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        basis[j + 1] = hv / beta
    size = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if size > 1:
        off = torch.tensor(betas[: size - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(t)
    order = evals.argsort(descending=True)
    evals, evecs = evals[order], evecs[:, order]
    keep = min(rank, size - 1)
    vecs = basis[:size].T @ evecs[:, :keep].to(basis)
    return {"eigvals": evals[: keep + 1].float(), "eigvecs": vecs, "hvps": size}


def curvature_mass_at_w_star(model, params: Sequence[torch.Tensor], loss_fn: LossFn, batches: list,
                             config: SGLDConfig, per_token: bool, *, seed: int = 0,
                             shard: RowShard | None = None) -> LowRankMass:  # fmt: skip
    """``config``'s low-rank mass (``mass="curvature"``, ``mass_rank``) from the Hessian at the current weights
    (with ``shard``: of every rank's rows, computed on every rank together)."""
    pairs = top_eigenpairs(model, params, loss_fn, batches, rank=config.mass_rank, per_token=per_token, seed=seed,
                           shard=shard)  # fmt: skip
    return curvature_mass(pairs["eigvals"], pairs["eigvecs"], nbeta=config.nbeta,
                          a_min=config.weight_decay + config.localization)  # fmt: skip


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
