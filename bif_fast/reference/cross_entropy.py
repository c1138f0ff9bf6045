"""Pure-PyTorch per-token cross-entropy forward that never holds the ``[N, V]`` logits: the CPU fallback
and the oracle of the Triton forward kernels.

For token n with hidden state ``h_n ∈ R^H``, the lm_head ``W ∈ R^{V×H}`` (and optional bias ``b``),
logits ``z_n = W h_n + b`` and target ``t_n``::

    loss_n = logsumexp_v(z_nv) - z_{n t_n}          (0 where t_n == ignore_index)

The vocabulary is processed in chunks of ``chunk`` rows of W with an online logsumexp: keeping the
running maximum ``m`` and the rescaled sum ``s = Σ exp(z - m)``, a new chunk with maximum ``m_c`` and
sum ``s_c`` merges as ``m' = max(m, m_c)``, ``s' = s·exp(m - m') + s_c·exp(m_c - m')``. Tokens are
processed in blocks so that one ``[rows, chunk]`` tile holds at most ``TILE_ELEMS`` logits: the working
set is one tile plus O(N) vectors, whatever V and N are.

Backward (the SGLD gradient flows through the same loss): with ``p_nv = exp(z_nv - lse_n)`` and
upstream gradient ``g_n`` (0 on ignored tokens), ``∂loss/∂z = g ⊙ (p - onehot(t))``, so chunk by
chunk ``dh += (g ⊙ (p - 1_t))_c W_c``, ``dW_c = (g ⊙ (p - 1_t))_cᵀ h``, ``db_c = Σ_n (…)``: the logits
of a chunk are recomputed from the saved ``lse`` instead of being stored. That backward runs after
every forward, Triton's included, so it lives with the ops in ``bif_fast/ops/cross_entropy.py`` (it
reuses this module's blocking helpers); this module holds the forward twins only.

All accumulation is fp32 (inputs may be bf16/fp16/fp32); results are fp32 losses, gradients in the
inputs' dtypes.
"""

from __future__ import annotations

import torch

__all__ = [
    "per_token_cross_entropy_fwd",
    "cross_entropy_from_logits_fwd",
    "row_block",
    "target_in_chunk",
    "DEFAULT_CHUNK",
    "TILE_ELEMS",
]

DEFAULT_CHUNK = 4096
TILE_ELEMS = 1 << 22  # largest logits tile (16 MB in fp32): tokens are blocked to fit it


def _merge_lse(m: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a chunk of logits z [N, C] into the running (max m [N], rescaled sum s [N]). Overwrites z."""
    m_new = torch.maximum(m, z.max(dim=1).values)
    s = s * torch.exp(m - m_new) + z.sub_(m_new[:, None]).exp_().sum(dim=1)
    return m_new, s


def target_in_chunk(targets: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which targets `[N]` fall in the vocabulary chunk ``[v0, v1)`` (bool `[N]`), and their column in it
    (int64 `[N]`, clamped into the chunk where they do not, so it is always a valid gather index)."""
    hit = (targets >= v0) & (targets < v1)
    return hit, (targets - v0).clamp(0, v1 - v0 - 1)


def row_block(n: int, cols: int) -> int:
    """Tokens per block, so that one block's logits tile `[rows, cols]` holds at most ``TILE_ELEMS`` values
    (read at call time; the forward here and the backward in ``bif_fast/ops/cross_entropy.py`` share it)."""
    return max(1, min(n, TILE_ELEMS // max(cols, 1)))


def per_token_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses `[N]` fp32 and logsumexp `[N]` fp32 of ``hidden @ weight.T (+ bias)``: tokens in blocks and
    the vocabulary in chunks, so the working set is one `[rows, chunk]` tile whatever N and V are."""
    n, v = hidden.shape[0], weight.shape[0]
    rb = row_block(n, min(chunk, v))
    if rb >= n:
        return _fwd_rows(hidden, weight, targets, bias, ignore_index, chunk)
    loss = torch.empty(n, device=hidden.device)
    lse = torch.empty(n, device=hidden.device)
    for r0 in range(0, n, rb):
        r1 = min(n, r0 + rb)
        loss[r0:r1], lse[r0:r1] = _fwd_rows(hidden[r0:r1], weight, targets[r0:r1], bias, ignore_index, chunk)
    return loss, lse


def _fwd_rows(hidden, weight, targets, bias, ignore_index: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, v = hidden.shape[0], weight.shape[0]
    h = hidden.float()
    m = torch.full((n,), float("-inf"), device=hidden.device)
    s = torch.zeros(n, device=hidden.device)
    target_logit = torch.zeros(n, device=hidden.device)
    for v0 in range(0, v, chunk):
        v1 = min(v, v0 + chunk)
        z = h @ weight[v0:v1].float().T  # [N, C]
        if bias is not None:
            z += bias[v0:v1].float()
        hit, col = target_in_chunk(targets, v0, v1)
        target_logit += torch.where(hit, z.gather(1, col[:, None]).squeeze(1), 0.0)
        m, s = _merge_lse(m, s, z)
    lse = m + torch.log(s)
    valid = targets != ignore_index
    loss = torch.where(valid, lse - target_logit, 0.0)
    return loss, lse


def cross_entropy_from_logits_fwd(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, chunk: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses `[N]` and logsumexp `[N]` (fp32) of existing logits `[N, V]`, streaming over V."""
    n, v = logits.shape
    m = torch.full((n,), float("-inf"), device=logits.device)
    s = torch.zeros(n, device=logits.device)
    target_logit = torch.zeros(n, device=logits.device)
    for v0 in range(0, v, chunk):
        v1 = min(v, v0 + chunk)
        z = logits[:, v0:v1].to(torch.float32, copy=True)  # [N, C]; _merge_lse overwrites it
        hit, col = target_in_chunk(targets, v0, v1)
        target_logit += torch.where(hit, z.gather(1, col[:, None]).squeeze(1), 0.0)
        m, s = _merge_lse(m, s, z)
    lse = m + torch.log(s)
    loss = torch.where(targets != ignore_index, lse - target_logit, 0.0)
    return loss, lse
