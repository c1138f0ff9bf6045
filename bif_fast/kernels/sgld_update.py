"""Triton kernels of the sampler step: one launch updates a whole flat parameter buffer.

The math and the noise stream are documented in ``bif_fast/reference/sgld_update.py`` and
``bif_fast/reference/philox.py``; this module follows their operation order so kernel and reference
agree to 1 ulp (bit for bit for the noise under the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bif_fast.config import SGLDConfig
from bif_fast.reference.philox import INIT_VELOCITY_STEP
from bif_fast.reference.sgld_update import sampler_code, step_coefficients

__all__ = ["sgld_update_triton", "philox_normal_triton"]


@triton.jit
def _uniform(x):
    # [BLOCK_G] uint32 -> fp32 in (0, 1): the top 24 bits, centred in their interval.
    return (x >> 8).to(tl.float32) * 5.9604644775390625e-08 + 2.9802322387695312e-08


@triton.jit
def _normal4(seed, chain, step, groups):
    """[BLOCK_G] int64 group ids -> [BLOCK_G, 4] fp32 standard normals, lane-major."""
    c0 = (groups & 0xFFFFFFFF).to(tl.uint32)
    c1 = (groups >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + step.to(tl.uint32)
    c3 = tl.zeros_like(c0) + chain.to(tl.uint32)
    x0, x1, x2, x3 = tl.philox(seed, c0, c1, c2, c3)
    u0 = _uniform(x0)
    u1 = _uniform(x1)
    u2 = _uniform(x2)
    u3 = _uniform(x3)
    r01 = tl.sqrt_rn(-2.0 * tl.log(u0))
    t01 = 6.283185307179586 * u1
    r23 = tl.sqrt_rn(-2.0 * tl.log(u2))
    t23 = 6.283185307179586 * u3
    z0 = r01 * tl.cos(t01)
    z1 = r01 * tl.sin(t01)
    z2 = r23 * tl.cos(t23)
    z3 = r23 * tl.sin(t23)
    # join(join(z0, z2), join(z1, z3))[b, i, j] = z_{2i + j}
    z = tl.join(tl.join(z0, z2), tl.join(z1, z3))  # [BLOCK_G, 2, 2]
    return tl.reshape(z, (z0.shape[0], 4))


@triton.jit(do_not_specialize=["numel", "offset", "seed", "chain", "step"])
def _philox_normal_kernel(out_ptr, numel, offset, seed, chain, step, BLOCK_G: tl.constexpr):
    """out[i] = xi of canonical element offset + i. out_ptr: [numel] fp32."""
    pid = tl.program_id(0).to(tl.int64)
    groups = offset // 4 + pid * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)  # [BLOCK_G]
    idx = groups[:, None] * 4 + tl.arange(0, 4)[None, :] - offset  # [BLOCK_G, 4] local index
    mask = (idx >= 0) & (idx < numel)
    xi = _normal4(seed, chain, step, groups)
    tl.store(out_ptr + idx, xi, mask=mask)


@triton.jit(do_not_specialize=["numel", "offset", "seed", "chain", "step"])
def _sgld_update_fwd_kernel(
    w_ptr,  # [numel] fp32 master parameters (in/out)
    g_ptr,  # [numel] gradient, any float dtype
    a_ptr,  # [numel] anchor w*, any float dtype
    s_ptr,  # [numel] fp32 RMSprop V or BAOAB velocity (in/out); unused for plain SGLD
    noise_ptr,  # [numel] fp32 explicit noise, read when HAS_NOISE
    out_ptr,  # [numel] model copy of the parameters (bf16/fp16/fp32), written when HAS_OUT
    flag_ptr,  # [1] int32 divergence flag, atomically max-ed
    numel,
    offset,  # canonical index of element 0
    seed,
    chain,
    step,
    half_lr,
    lr,
    nbeta,
    localization,
    weight_decay,
    noise_level,
    noise_scale,
    alpha,
    one_minus_alpha,
    eps,
    kick,
    fric_c,
    fric_noise,
    bbox,
    SAMPLER: tl.constexpr,  # 0 sgld, 1 rmsprop-sgld, 2 baoab (reference.sgld_update.SAMPLER_CODES)
    HAS_NOISE: tl.constexpr,
    HAS_OUT: tl.constexpr,
    HAS_BBOX: tl.constexpr,
    BLOCK_G: tl.constexpr,  # groups of 4 elements per program
):
    pid = tl.program_id(0).to(tl.int64)
    groups = offset // 4 + pid * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)  # [BLOCK_G]
    idx = groups[:, None] * 4 + tl.arange(0, 4)[None, :] - offset  # [BLOCK_G, 4]
    mask = (idx >= 0) & (idx < numel)

    w = tl.load(w_ptr + idx, mask=mask, other=0.0)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:  # noqa: SIM108  (a constexpr branch: only one side is compiled)
        xi = tl.load(noise_ptr + idx, mask=mask, other=0.0)
    else:
        xi = _normal4(seed, chain, step, groups)

    drift = nbeta * g + weight_decay * w + localization * (w - a)
    if SAMPLER == 2:
        v = tl.load(s_ptr + idx, mask=mask, other=0.0)
        v = v - kick * drift
        w_new = w + half_lr * v
        v = fric_c * v + fric_noise * xi
        w_new = w_new + half_lr * v
        tl.store(s_ptr + idx, v, mask=mask)
    elif SAMPLER == 1:
        v = tl.load(s_ptr + idx, mask=mask, other=0.0)
        v = alpha * v + one_minus_alpha * g * g
        precond = tl.div_rn(1.0, tl.sqrt_rn(v) + eps)
        w_new = w - (half_lr * precond) * drift + tl.sqrt_rn(lr * precond) * noise_level * xi
        tl.store(s_ptr + idx, v, mask=mask)
    else:
        w_new = w - half_lr * drift + noise_scale * xi
    if HAS_BBOX:
        w_new = tl.minimum(tl.maximum(w_new, a - bbox), a + bbox)

    tl.store(w_ptr + idx, w_new, mask=mask)
    if HAS_OUT:
        tl.store(out_ptr + idx, w_new.to(out_ptr.dtype.element_ty), mask=mask)
    # Non-finite results (NaN gradients, blow-ups) mark the chain as diverged; NaN fails the compare.
    bad = mask & ~(tl.abs(w_new) <= 3.4028234663852886e38)
    any_bad = tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0)
    tl.atomic_max(flag_ptr, any_bad)


def _block_g(device: torch.device) -> int:
    # On a GPU 256 groups (1,024 elements) per program; the CPU interpreter pays per program, so it
    # takes far larger blocks. The noise does not depend on this choice.
    return 256 if device.type == "cuda" else 16384


def _grid(numel: int, offset: int, block_g: int) -> tuple[int]:
    n_groups = (offset + numel - 1) // 4 - offset // 4 + 1
    return (triton.cdiv(n_groups, block_g),)


def sgld_update_triton(
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
    """Triton launcher with the signature of ``reference.sgld_update.sgld_update_``."""
    numel = w.numel()
    if numel == 0:
        return
    k = step_coefficients(config, step)
    code = sampler_code(config)
    if diverged is None:
        diverged = torch.zeros(1, dtype=torch.int32, device=w.device)
    block_g = _block_g(w.device)
    _sgld_update_fwd_kernel[_grid(numel, offset, block_g)](
        w,
        grad,
        anchor,
        state if state is not None else w,
        noise if noise is not None else w,
        out if out is not None else w,
        diverged,
        numel,
        offset,
        seed,
        chain,
        step,
        k["half_lr"],
        k["lr"],
        k["nbeta"],
        k["localization"],
        k["weight_decay"],
        k["noise_level"],
        k["noise_scale"],
        k["alpha"],
        k["one_minus_alpha"],
        k["eps"],
        k["kick"],
        k["fric_c"],
        k["fric_noise"],
        k["bbox"],
        SAMPLER=code,
        HAS_NOISE=noise is not None,
        HAS_OUT=out is not None,
        HAS_BBOX=config.bounding_box_size is not None,
        BLOCK_G=block_g,
        num_warps=4,
    )


def philox_normal_triton(
    out: torch.Tensor, *, seed: int, chain: int, step: int = INIT_VELOCITY_STEP, offset: int = 0
) -> torch.Tensor:
    """Fill fp32 ``out`` `[N]` with the noise of canonical elements ``offset .. offset + N - 1``."""
    numel = out.numel()
    if numel:
        block_g = _block_g(out.device)
        _philox_normal_kernel[_grid(numel, offset, block_g)](out, numel, offset, seed, chain, step, BLOCK_G=block_g)
    return out
