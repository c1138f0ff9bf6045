"""Triton forward kernels of the per-token cross-entropy: no ``[N, V]`` logits are ever written.

``_per_token_ce_fwd_kernel`` tiles tokens × vocabulary, computes the lm_head product tile by tile
(``tl.dot`` over chunks of H), keeps an online logsumexp per token and picks out the target logit;
``_ce_from_logits_fwd_kernel`` does the same streaming over rows of existing logits. Each writes one
fp32 loss and one fp32 logsumexp per token, from which the backward (``bif_fast/ops/cross_entropy.py``)
recomputes the logits; the math is in ``bif_fast/reference/cross_entropy.py``. No atomics: every token
is owned by one program, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bif_fast._backend import triton_interpret

__all__ = ["per_token_cross_entropy_fwd_triton", "cross_entropy_from_logits_fwd_triton"]


@triton.jit
def _online_lse(m, s, tlogit, z, cols, tgt, rmask):
    """Fold a [BLOCK_N, BLOCK_V] tile of logits z into the running max m, rescaled sum s and target
    logit of each row (columns past V hold -inf)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    # Rows past N may hold only -inf: keep their max finite so no NaN is formed (they are not stored).
    m_new = tl.where(rmask, m_new, 0.0)
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    tlogit += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    return m_new, s, tlogit


@triton.jit
def _per_token_ce_fwd_kernel(
    h_ptr,  # [N, H] hidden states, row stride stride_hn
    w_ptr,  # [V, H] lm_head weight, row stride stride_wv
    b_ptr,  # [V] bias, read when HAS_BIAS
    t_ptr,  # [N] int64 targets
    loss_ptr,  # [N] fp32 out
    lse_ptr,  # [N] fp32 out
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # compute the dot in fp32 (fp32 inputs, or the CPU interpreter)
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
    rmask = rows < N
    tgt = tl.load(t_ptr + rows, mask=rmask, other=ignore_index).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    tlogit = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # [BLOCK_V]
        cmask = cols < V
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)  # [BLOCK_H]
            kmask = ks < H
            hb = tl.load(
                h_ptr + rows[:, None] * stride_hn + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0
            )
            wb = tl.load(
                w_ptr + cols[:, None] * stride_wv + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0
            )
            if UPCAST:
                acc = tl.dot(hb.to(tl.float32), tl.trans(wb.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(hb, tl.trans(wb), acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(cmask[None, :], acc, float("-inf"))  # [BLOCK_N, BLOCK_V]
        m, s, tlogit = _online_lse(m, s, tlogit, acc, cols, tgt, rmask)
    lse = m + tl.log(tl.where(rmask, s, 1.0))
    loss = tl.where(tgt != ignore_index, lse - tlogit, 0.0)
    tl.store(loss_ptr + rows, loss, mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)


@triton.jit
def _ce_from_logits_fwd_kernel(
    z_ptr,  # [N, V] logits, row stride stride_zn
    t_ptr,  # [N] int64 targets
    loss_ptr,  # [N] fp32 out
    lse_ptr,  # [N] fp32 out
    N,
    V,
    stride_zn,
    ignore_index,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < N
    tgt = tl.load(t_ptr + rows, mask=rmask, other=ignore_index).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    tlogit = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask = rmask[:, None] & (cols < V)[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m, s, tlogit = _online_lse(m, s, tlogit, z, cols, tgt, rmask)
    lse = m + tl.log(tl.where(rmask, s, 1.0))
    loss = tl.where(tgt != ignore_index, lse - tlogit, 0.0)
    tl.store(loss_ptr + rows, loss, mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)


def per_token_cross_entropy_fwd_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher with the signature of ``reference.cross_entropy.per_token_cross_entropy_fwd``
    (``chunk`` is unused: the kernel's BLOCK_V plays its part)."""
    n, h = hidden.shape
    v = weight.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return loss, lse
    if triton_interpret():  # the interpreter pays per program and per loop trip: few, large tiles
        block_n, block_v, block_h, warps = 64, 1024, min(128, max(16, triton.next_power_of_2(h))), 4
    else:
        block_n, block_v, block_h, warps = 64, 128, 64, 8
    upcast = triton_interpret() or hidden.dtype == torch.float32
    _per_token_ce_fwd_kernel[(triton.cdiv(n, block_n),)](
        hidden, weight, bias if bias is not None else weight, targets, loss, lse,
        n, v, h, hidden.stride(0), weight.stride(0), ignore_index,
        HAS_BIAS=bias is not None, UPCAST=upcast, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
        num_warps=warps,
    )  # fmt: skip
    return loss, lse


def cross_entropy_from_logits_fwd_triton(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, chunk: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher with the signature of ``reference.cross_entropy.cross_entropy_from_logits_fwd``."""
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss, lse
    block_n, block_v = (16, 4096) if triton_interpret() else (4, 1024)
    _ce_from_logits_fwd_kernel[(triton.cdiv(n, block_n),)](
        logits, targets, loss, lse, n, v, logits.stride(0), ignore_index, BLOCK_N=block_n, BLOCK_V=block_v
    )
    return loss, lse
