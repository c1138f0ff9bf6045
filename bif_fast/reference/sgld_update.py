"""Pure-PyTorch SGLD / RMSprop-SGLD / BAOAB step: the CPU fallback and the oracle of the Triton kernel.

Notation: w the sampled parameters (fp32 master copy), g the gradient of the *mean* minibatch loss at
w, w* the anchor (the trained weights), xi ~ N(0, I) from ``reference/philox.py``. The drift is the
gradient of the localised, tempered potential

    grad U(w) = nbeta * g + weight_decay * w + localization * (w - w*)

and the samplers are (devinterp's parametrisation; ``nbeta = beta * n`` in the paper's Algorithm 1):

    sgld:     w <- w - lr/2 * grad U + sqrt(lr) * noise_level * xi
    rmsprop:  V <- alpha V + (1 - alpha) g^2,  G = 1 / (sqrt(V) + eps)
              w <- w - lr/2 * G * grad U + sqrt(lr * G) * noise_level * xi
    baoab:    (kinetic Langevin, unit mass, velocity v, c = exp(-friction * lr))
              B: v <- v - lr/2 * grad U(w)     A: w <- w + lr/2 * v
              O: v <- c v + sqrt(1 - c^2) * noise_level * xi
              A: w <- w + lr/2 * v             B: v <- v - lr/2 * grad U(w_new)

For BAOAB the closing B of one step and the opening B of the next use the same gradient, so one
``step`` applies them together as ``v <- v - kick * grad U(w)`` with ``kick = lr/2`` on step 0 and
``lr`` afterwards, then A O A; the velocity kept between steps therefore lacks its closing half-kick,
which never affects the positions. v starts as N(0, I) drawn at the reserved step ``2^32 - 1``
(``bif_fast.ops.init_sampler_state_`` sets it up; RMSprop's V starts at 0).

Stationary laws (full-batch gradients, quadratic loss ``L(w) = ½ (w - m)ᵀ H (w - m)``, precision
``P = nbeta H + localization I = V diag(λ) Vᵀ``): plain SGLD's discretised chain is Gaussian with
covariance ``V diag(1 / (λ (1 - lr λ / 4))) Vᵀ``; BAOAB's position marginal is exactly ``P⁻¹`` for any
stable lr. With ``weight_decay`` the precision gains ``weight_decay I``.

Optional ``bounding_box_size`` b clamps w to ``[w* - b, w* + b]`` after the update.

Mapping to the paper and devinterp: ``lr`` = epsilon, ``localization`` = gamma, ``nbeta`` = beta n
(devinterp's ``nbeta``; the paper multiplies the minibatch *sum* by ``beta n / m``, which equals
``nbeta`` times the minibatch *mean*), ``noise_level`` = devinterp's ``noise_level``.

Low-precision parameters: the update is computed and kept in an fp32 master copy ``w``; the model's
bf16/fp16 tensors (``out``) receive the rounded result, so updates below bf16 resolution accumulate in
the master instead of being lost.

All arithmetic is fp32 and follows the kernel's operation order, so the two agree to 1 ulp.
"""

from __future__ import annotations

import math

import torch

from bif_fast.config import SGLDConfig
from bif_fast.reference.philox import philox_normal

__all__ = ["SAMPLER_CODES", "sampler_code", "sgld_update_", "step_coefficients"]

_FLT_MAX = torch.finfo(torch.float32).max

# The integer each compiled step receives for (sampler, precondition): the Triton kernel's SAMPLER constexpr
# and the ``sampler`` argument of ``bif_fast._C.sgld_update_cpu_`` (csrc/sgld_update_cpu.cpp, which branches
# on 2 for BAOAB, 1 for RMSprop-SGLD and 0 otherwise, and rejects codes outside 0..2).
SAMPLER_CODES: dict[tuple[str, str], int] = {("sgld", "none"): 0, ("sgld", "rmsprop"): 1, ("baoab", "none"): 2}


def sampler_code(config: SGLDConfig) -> int:
    """The compiled kernels' code of ``config``'s sampler: 0 plain SGLD, 1 RMSprop-SGLD, 2 BAOAB.

    The same integers select the branch of the Triton kernel (``SAMPLER`` in
    ``bif_fast/kernels/sgld_update.py``) and of the C++ loop (``csrc/sgld_update_cpu.cpp``).

    Args:
        config (SGLDConfig): the sampler's hyperparameters.

    Returns:
        int: the code, from ``SAMPLER_CODES``.

    Examples:
        >>> sampler_code(SGLDConfig(sampler="baoab"))
        2
    """
    return SAMPLER_CODES[(config.sampler, config.precondition)]


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root (torch's vectorised CPU sqrt can be 1 ulp off; the kernel's is not)."""
    return torch.sqrt(x.double()).float()


def step_coefficients(config: SGLDConfig, step: int) -> dict[str, float]:
    """Scalars of one step, computed once on the host in float64 (the kernel receives them as fp32)."""
    c = math.exp(-config.friction * config.lr)
    return {
        "half_lr": config.lr / 2,
        "lr": config.lr,
        "nbeta": config.nbeta,
        "localization": config.localization,
        "weight_decay": config.weight_decay,
        "noise_level": config.noise_level,
        "noise_scale": math.sqrt(config.lr) * config.noise_level,
        "alpha": config.rmsprop_alpha,
        "one_minus_alpha": 1.0 - config.rmsprop_alpha,
        "eps": config.rmsprop_eps,
        "kick": config.lr / 2 if step == 0 else config.lr,
        "fric_c": c,
        "fric_noise": math.sqrt(max(0.0, 1.0 - c * c)) * config.noise_level,
        "bbox": config.bounding_box_size or 0.0,
    }


def sgld_update_(
    w: torch.Tensor,
    grad: torch.Tensor,
    anchor: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    config: SGLDConfig,
    seed: int = 0,
    chain: int = 0,
    step: int = 0,
    offset: int = 0,
    noise: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    diverged: torch.Tensor | None = None,
) -> None:
    """One sampler step on flat tensors, in place. Same signature as the Triton launcher.

    Args:
        w (Tensor): `[N]` fp32 parameters (master copy), updated in place.
        grad (Tensor): `[N]` gradient of the mean minibatch loss, any float dtype.
        anchor (Tensor): `[N]` w*, any float dtype.
        state (Tensor | None): `[N]` fp32: RMSprop's V (``precondition="rmsprop"``) or BAOAB's velocity;
            None for plain SGLD.
        config (SGLDConfig): hyperparameters.
        seed (int), chain (int), step (int): key and counter of the noise.
        offset (int): canonical index of ``w[0]`` (for a tensor that is a piece of the parameters).
        noise (Tensor | None): `[N]` fp32 explicit noise instead of the Philox stream.
        out (Tensor | None): `[N]` bf16/fp16/fp32 tensor that receives the updated w (the model's copy).
        diverged (Tensor | None): `[1]` int32 flag, set to 1 when any updated value is not finite.
    """
    k = step_coefficients(config, step)
    n = w.numel()
    xi = noise.float() if noise is not None else philox_normal(n, seed=seed, chain=chain, step=step, offset=offset)
    xi = xi.to(w.device)
    g = grad.float()
    a = anchor.float()
    drift = k["nbeta"] * g + k["weight_decay"] * w + k["localization"] * (w - a)
    if config.sampler == "baoab":
        v = state
        v.sub_(k["kick"] * drift)
        w_new = w + k["half_lr"] * v
        v.copy_(k["fric_c"] * v + k["fric_noise"] * xi)
        w_new = w_new + k["half_lr"] * v
    elif config.precondition == "rmsprop":
        v = state
        v.copy_(k["alpha"] * v + k["one_minus_alpha"] * g * g)
        precond = 1.0 / (_sqrt_rn(v) + k["eps"])
        w_new = w - (k["half_lr"] * precond) * drift + _sqrt_rn(k["lr"] * precond) * k["noise_level"] * xi
    else:
        w_new = w - k["half_lr"] * drift + k["noise_scale"] * xi
    if config.bounding_box_size is not None:
        w_new = torch.minimum(torch.maximum(w_new, a - k["bbox"]), a + k["bbox"])
    w.copy_(w_new)
    if out is not None:
        out.copy_(w_new)
    if diverged is not None:
        bad = ~(w_new.abs() <= _FLT_MAX)  # NaN compares false
        diverged.copy_(torch.maximum(diverged, bad.any().to(diverged.dtype)))
