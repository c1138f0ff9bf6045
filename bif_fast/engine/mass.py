"""A low-rank mass matrix for the kinetic (BAOAB) sampler, built from the curvature at w*.

The localised potential ``U = nbeta L + (weight_decay / 2) |w|^2 + (localization / 2) |w - w*|^2`` has
curvatures ``a = nbeta h + a_min`` over the Hessian's eigenvalues h (``a_min = weight_decay +
localization``). Unit-mass BAOAB must step below ``2 / sqrt(a_max)`` and mixes its slowest mode in about
``sqrt(a_max / a_min)`` steps; a neural network's Hessian has a few large outlying eigenvalues, so most of
that ratio comes from a handful of directions. With the top k eigenpairs ``(h_i, u_i)`` the sampler runs in
the coordinates ``w = w* + P y``, ``P = I + U diag(s - 1) U^T``, ``s_i = sqrt(a_ref / a_i) <= 1`` and
``a_ref = nbeta h_{k+1} + a_min``: the stiff directions are slowed to the pace of the (k+1)-th, so the
stability limit becomes ``2 / sqrt(a_ref)``. Written in w (velocity ``u = P v``), one BAOAB step is

    B: u <- u - kick * P^2 grad U(w)    A: w <- w + lr/2 u    O: u <- c u + sqrt(1 - c^2) P xi    A: w <- w + lr/2 u

i.e. the unit-mass step of the fused kernel fed the preconditioned force ``P^2 grad U`` (with nbeta = 1
and no weight decay or localization terms of its own) and the noise ``P xi``. The stationary law of w is
the same ``exp(-U)`` (for a Gaussian target BAOAB's position marginal stays exact for any stable lr); only
the speed changes. ``P`` is symmetric positive definite for any orthonormal U and s > 0, so an inaccurate
eigenvector costs speed, never correctness.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from bif_fast._backend import ResolvedBackend
from bif_fast.config import SGLDConfig
from bif_fast.ops import philox_normal_, philox_normal_rows_, sgld_update_resolved_, sgld_update_rows_resolved_

__all__ = ["LowRankMass", "curvature_mass", "init_mass_velocity_", "kinetic_force", "mass_step_", "mass_steps_"]


@dataclasses.dataclass
class LowRankMass:
    """``P = I + U diag(s - 1) U^T`` (the inverse square root of the mass) over the canonical flat weights.

    Attributes:
        basis (Tensor): ``[N, k]`` fp32 orthonormal columns.
        scale (Tensor): ``[k]`` fp32, each in (0, 1].
        a_ref (float): the curvature every preconditioned direction is brought down to (nbeta h_{k+1} + a_min).
    """

    basis: torch.Tensor
    scale: torch.Tensor
    a_ref: float

    @property
    def rank(self) -> int:
        return int(self.scale.numel())

    def _apply(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``x + ((x U) * factor) U^T`` for ``x`` of shape ``[N]`` or ``[C, N]``."""
        coeff = (x @ self.basis) * factor
        return x + coeff @ self.basis.T

    def inv_mass(self, x: torch.Tensor) -> torch.Tensor:
        """``P^2 x`` (the inverse mass applied to a force)."""
        return self._apply(x, self.scale.square() - 1)

    def inv_sqrt_mass(self, x: torch.Tensor) -> torch.Tensor:
        """``P x`` (the noise and the initial velocity)."""
        return self._apply(x, self.scale - 1)

    def to(self, device: torch.device) -> LowRankMass:
        return LowRankMass(self.basis.to(device), self.scale.to(device), self.a_ref)


def curvature_mass(eigvals: torch.Tensor, eigvecs: torch.Tensor, *, nbeta: float, a_min: float) -> LowRankMass:
    """The mass of the top eigenpairs: ``eigvals`` ``[k + 1]`` descending (the last one sets ``a_ref`` and
    gets no direction of its own) and ``eigvecs`` ``[N, >= k]`` orthonormal."""
    k = eigvals.numel() - 1
    if k < 1:
        raise ValueError("a curvature mass needs at least two eigenvalues (k directions and the (k+1)-th)")
    lam = eigvals.double().clamp_min(0.0)
    a = nbeta * lam[:k] + a_min
    a_ref = float(nbeta * lam[k] + a_min)
    scale = (a_ref / a).sqrt().clamp(max=1.0).float()
    return LowRankMass(eigvecs[:, :k].float().contiguous(), scale.to(eigvecs.device), a_ref)


def kinetic_force(grad: torch.Tensor, w: torch.Tensor, anchor: torch.Tensor, config: SGLDConfig) -> torch.Tensor:
    """``grad U(w) = nbeta g + weight_decay w + localization (w - w*)`` in fp32, for ``[N]`` or ``[C, N]``."""
    force = grad.float() * config.nbeta
    if config.weight_decay:
        force.add_(w, alpha=config.weight_decay)
    if config.localization:
        force.add_(w - anchor.float(), alpha=config.localization)
    return force


@functools.lru_cache(maxsize=16)
def _unit_kernel_config(config: SGLDConfig) -> SGLDConfig:
    """The config the fused kernel gets with a mass: the force arrives whole (``nbeta = 1``, no prior terms)."""
    return dataclasses.replace(config, nbeta=1.0, weight_decay=0.0, localization=0.0, mass="identity")


def init_mass_velocity_(state: torch.Tensor, mass: LowRankMass) -> None:
    """BAOAB's initial velocity ``u = P xi`` from the unit-mass one ``xi`` (already in ``state``)."""
    state.copy_(mass.inv_sqrt_mass(state))


def mass_step_(backend: ResolvedBackend, w: torch.Tensor, grad: torch.Tensor, anchor: torch.Tensor,
               state: torch.Tensor, *, config: SGLDConfig, mass: LowRankMass, seed: int, chain: int, step: int,
               noise: torch.Tensor, out: torch.Tensor | None, diverged: torch.Tensor | None) -> None:  # fmt: skip
    """One BAOAB step with the low-rank mass (module docstring): the force and the Philox noise of
    ``(seed, chain, step)`` are preconditioned here and the fused kernel does the rest. ``noise`` is an
    ``[N]`` fp32 scratch buffer."""
    force = mass.inv_mass(kinetic_force(grad, w, anchor, config))
    philox_normal_(noise, seed=seed, chain=chain, step=step, backend=backend)
    sgld_update_resolved_(backend, w, force, anchor, state, config=_unit_kernel_config(config), seed=seed,
                          chain=chain, step=step, noise=mass.inv_sqrt_mass(noise), out=out,
                          diverged=diverged)  # fmt: skip


def mass_steps_(backend: ResolvedBackend, w: torch.Tensor, grad: torch.Tensor, anchor: torch.Tensor,
                state: torch.Tensor, *, config: SGLDConfig, mass: LowRankMass, seed: int, chains: list[int], step: int,
                noise: torch.Tensor, diverged: torch.Tensor) -> None:  # fmt: skip
    """``mass_step_`` for C chains at once (``w``, ``grad``, ``state``, ``noise``: ``[C, N]``; ``diverged``:
    ``[C]`` int32): the force and the noise are preconditioned in one ``[C, N] x [N, k]`` product each, as
    a batch of chains steps in one call; each chain keeps its own Philox stream ``(seed, chains[i], step)``,
    so the chains are the ones ``mass_step_`` makes, up to the rounding of the batched products."""
    force = mass.inv_mass(kinetic_force(grad, w, anchor, config))
    philox_normal_rows_(noise, seed=seed, chains=chains, step=step, backend=backend)
    unit = _unit_kernel_config(config)
    sgld_update_rows_resolved_(backend, w, force, anchor, state, config=unit, seed=seed, chains=chains, step=step,
                               noise=mass.inv_sqrt_mass(noise), diverged=diverged)  # fmt: skip
