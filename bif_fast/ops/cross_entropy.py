"""Per-token cross-entropy without ``[N, V]`` logits: ``per_token_cross_entropy`` (from the hidden states
and the lm_head) and ``cross_entropy_from_logits``, with their autograd Functions and backward.

The forward runs on a resolved backend: the Triton kernels (``bif_fast/kernels/cross_entropy.py``) or
the chunked torch twins (``bif_fast/reference/cross_entropy.py``, where the math is written out). Both
save one fp32 logsumexp per token; the backward below recomputes the logits chunk by chunk from it, the
same torch code after either forward (the SGLD gradient of a language model flows through it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bif_fast._backend import Backend, ResolvedBackend, resolve_backend
from bif_fast.reference import cross_entropy as _ref
from bif_fast.reference.cross_entropy import DEFAULT_CHUNK

__all__ = [
    "cross_entropy_from_logits",
    "cross_entropy_from_logits_bwd",
    "per_token_cross_entropy",
    "per_token_cross_entropy_bwd",
]


def per_token_cross_entropy_bwd(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int = -100,
    chunk: int = DEFAULT_CHUNK,
    need_weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of ``per_token_cross_entropy_fwd`` (either backend's): gradients in the inputs' dtypes.

    Recomputes the logits chunk by chunk from the forward's logsumexp (the math is in
    ``bif_fast/reference/cross_entropy.py``); the working set is one token block × ``chunk`` tile.

    Args:
        grad_loss (Tensor): `[N]` upstream gradient of the per-token losses.
        hidden (Tensor): `[N, H]` fp32/bf16/fp16.
        weight (Tensor): `[V, H]`, same dtype.
        targets (Tensor): `[N]` int64 ids in ``[0, V)`` or ``ignore_index``.
        bias (Tensor | None): `[V]`, same dtype, or None.
        lse (Tensor): `[N]` fp32 logsumexp saved by the forward.
        ignore_index (int): targets equal to it get no gradient. Default: -100.
        chunk (int): vocabulary rows per tile. Default: ``DEFAULT_CHUNK``.
        need_weight_grad (bool): compute d weight (skipped when weight needs no gradient). Default: True.

    Returns:
        tuple[Tensor, Tensor | None, Tensor | None]: d hidden `[N, H]`, d weight `[V, H]` (None unless
        ``need_weight_grad``), d bias `[V]` (None without a bias).
    """
    n, v = hidden.shape[0], weight.shape[0]
    h = hidden.float()
    g = torch.where(targets != ignore_index, grad_loss.float(), 0.0)  # [N]
    dh = torch.zeros_like(h)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
    db = torch.zeros(v, dtype=torch.float32, device=weight.device) if bias is not None else None
    # Token blocks 4x taller than the forward's: every extra block re-reads and re-writes each dW chunk, and
    # an SGLD minibatch then rarely needs more than one block.
    rb = _ref.row_block(n, min(chunk, v) // 4 or 1)
    for r0 in range(0, n, rb):
        r1 = min(n, r0 + rb)
        h_r, t_r = h[r0:r1], targets[r0:r1]
        rows = torch.arange(r1 - r0, device=hidden.device)
        for v0 in range(0, v, chunk):
            v1 = min(v, v0 + chunk)
            w_c = weight[v0:v1].float()
            z = h_r @ w_c.T
            if bias is not None:
                z += bias[v0:v1].float()
            p = z.sub_(lse[r0:r1, None]).exp_()  # softmax over the full vocabulary, this chunk's columns
            hit, col = _ref.target_in_chunk(t_r, v0, v1)
            p[rows[hit], col[hit]] -= 1.0
            p *= g[r0:r1, None]
            dh[r0:r1].addmm_(p, w_c)
            if dw is not None:
                dw[v0:v1].addmm_(p.T, h_r)
            if db is not None:
                db[v0:v1] += p.sum(dim=0)
    return (
        dh.to(hidden.dtype),
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )


def cross_entropy_from_logits_bwd(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int = -100,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Backward of ``cross_entropy_from_logits_fwd`` (either backend's), streaming over the vocabulary.

    Args:
        grad_loss (Tensor): `[N]` upstream gradient of the per-token losses.
        logits (Tensor): `[N, V]` fp32/bf16/fp16.
        targets (Tensor): `[N]` int64 ids in ``[0, V)`` or ``ignore_index``.
        lse (Tensor): `[N]` fp32 logsumexp saved by the forward.
        ignore_index (int): targets equal to it get no gradient. Default: -100.
        chunk (int): vocabulary columns per step. Default: ``DEFAULT_CHUNK``.

    Returns:
        Tensor: d logits `[N, V]` in the logits' dtype (the one ``[N, V]`` tensor a logits gradient must be).
    """
    n, v = logits.shape
    g = torch.where(targets != ignore_index, grad_loss.float(), 0.0)
    out = torch.empty_like(logits)
    rows = torch.arange(n, device=logits.device)
    for v0 in range(0, v, chunk):
        v1 = min(v, v0 + chunk)
        p = torch.exp(logits[:, v0:v1].float() - lse[:, None])
        hit, col = _ref.target_in_chunk(targets, v0, v1)
        p[rows[hit], col[hit]] -= 1.0
        out[:, v0:v1] = p * g[:, None]
    return out


def _ce_forward_impl(backend: ResolvedBackend) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The (per_token, from_logits) forward functions of a resolved backend; both return (loss, lse)."""
    if backend == "triton":
        from bif_fast.kernels import cross_entropy as k

        return k.per_token_cross_entropy_fwd_triton, k.cross_entropy_from_logits_fwd_triton
    return _ref.per_token_cross_entropy_fwd, _ref.cross_entropy_from_logits_fwd


class _PerTokenCrossEntropy(torch.autograd.Function):
    """Loss and logsumexp `[N]` of ``hidden @ weight.T (+ bias)``; the backward reuses the saved logsumexp."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, backend):  # type: ignore[override]
        fwd = _ce_forward_impl(backend)[0]
        loss, lse = fwd(hidden, weight, targets, bias, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dh, dw, db = per_token_cross_entropy_bwd(
            grad_loss, hidden, weight, targets, bias, lse, ctx.ignore_index, need_weight_grad=ctx.needs_input_grad[1]
        )
        return dh, dw, db, None, None, None


class _CrossEntropyFromLogits(torch.autograd.Function):
    """Loss `[N]` of existing logits; the backward reuses the forward's saved logsumexp."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, backend):  # type: ignore[override]
        loss, lse = _ce_forward_impl(backend)[1](logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors
        return cross_entropy_from_logits_bwd(grad_loss, logits, targets, lse, ctx.ignore_index), None, None, None


def _check_targets(
    targets: Any, shape: tuple[int, ...], device: torch.device, vocab: int, ignore_index: int, validate: bool
) -> None:
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if tuple(targets.shape) != shape:
        raise ValueError(f"targets must have shape {list(shape)}, got {list(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device} but the inputs are on {device}")
    if validate and targets.numel():
        bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
        if bool(bad.any()):
            first = targets[bad][0].item()
            raise ValueError(
                f"target {first} is out of range for a vocabulary of {vocab} (ignore_index={ignore_index})"
            )


def per_token_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    validate: bool = True,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T (+ bias)`` without forming the logits.

    A Triton kernel (CUDA) tiles tokens and vocabulary and keeps an online logsumexp; the torch
    fallback streams the vocabulary in chunks. Either way memory grows with N, not N·V. Differentiable
    (the backward recomputes logits chunk by chunk from the saved logsumexp), so the same loss can drive
    the SGLD gradient.

    Args:
        hidden (Tensor): `[..., H]` fp32/bf16/fp16, the last hidden states.
        weight (Tensor): `[V, H]`, same dtype: the lm_head / output embedding.
        targets (Tensor): `[...]` integer token ids in ``[0, V)`` or ``ignore_index``.
        bias (Tensor | None): `[V]` lm_head bias, same dtype. Default: None.
        ignore_index (int): targets equal to it give loss 0. Default: -100.
        validate (bool): check targets are in range (on CUDA this reads one flag back). Default: True.
        backend (Backend): ``auto`` | ``triton`` | ``torch``. Default: ``auto`` (Triton on CUDA).

    Returns:
        Tensor `[...]` (the shape of targets), fp32.

    Raises:
        ValueError: shape, dtype or device mismatches, or out-of-range targets.

    Examples:
        >>> h, w = torch.randn(6, 16), torch.randn(50, 16)
        >>> t = torch.tensor([1, 2, 3, -100, 4, 49])
        >>> per_token_cross_entropy(h, w, t, backend="torch").shape
        torch.Size([6])
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden [..., H] and weight [V, H] must agree on H, got {list(hidden.shape)} and {list(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be a [{weight.shape[0]}] tensor")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError("bias must have the dtype and device of weight")
    _check_targets(targets, tuple(hidden.shape[:-1]), hidden.device, weight.shape[0], ignore_index, validate)
    resolved = resolve_backend("cross_entropy", hidden.device, backend)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    w2 = weight if weight.stride(-1) == 1 else weight.contiguous()
    loss, _ = _PerTokenCrossEntropy.apply(h2, w2, bias, targets.reshape(-1).long(), ignore_index, resolved)
    return loss.reshape(targets.shape)


def cross_entropy_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    validate: bool = True,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Per-token cross-entropy of existing logits, streaming over the vocabulary (no log-softmax tensor).

    Args:
        logits (Tensor): `[..., V]` fp32/bf16/fp16.
        targets (Tensor): `[...]` integer ids in ``[0, V)`` or ``ignore_index``.
        ignore_index (int): targets equal to it give loss 0. Default: -100.
        validate (bool): check targets are in range. Default: True.
        backend (Backend): ``auto`` | ``triton`` | ``torch``. Default: ``auto`` (Triton on CUDA).

    Returns:
        Tensor of ``targets.shape``, fp32.

    Examples:
        >>> z = torch.randn(2, 3, 11)
        >>> cross_entropy_from_logits(z, torch.randint(0, 11, (2, 3)), backend="torch").shape
        torch.Size([2, 3])
    """
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point or logits.dim() < 1:
        raise ValueError("logits must be a floating-point tensor [..., V]")
    if logits.shape[-1] == 0:
        raise ValueError("logits have an empty vocabulary")
    _check_targets(targets, tuple(logits.shape[:-1]), logits.device, logits.shape[-1], ignore_index, validate)
    resolved = resolve_backend("cross_entropy", logits.device, backend)
    z2 = logits.reshape(-1, logits.shape[-1])
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    loss = _CrossEntropyFromLogits.apply(z2, targets.reshape(-1).long(), ignore_index, resolved)
    return loss.reshape(targets.shape)
