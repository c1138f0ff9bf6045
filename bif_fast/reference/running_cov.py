"""Pure-PyTorch running cross-covariance: the CPU fallback and the test oracle of ``bif_fast._C``.

The state of an accumulator after ``N`` draws of two streams ``x_t ∈ R^n`` and ``y_t ∈ R^p`` is

    count = N
    mean_x = (1/N) Σ_t x_t                           [n]
    mean_y = (1/N) Σ_t y_t                           [p]
    m2_x   = Σ_t (x_t - mean_x)²                     [n]
    m2_y   = Σ_t (y_t - mean_y)²                     [p]
    comoment = Σ_t (x_t - mean_x)(y_t - mean_y)ᵀ     [n, p]

so that ``Cov = comoment / (N - 1)`` (unbiased) and ``Corr = comoment / sqrt(m2_x m2_y ᵀ)``. The
vectors (means, m2) are always float64; the ``[n, p]`` co-moment is float64 or float32 (the
accumulator's dtype). Blocks are centred in float64 and rounded once into a float32 co-moment, so a
float32 accumulator loses nothing to a mean that is large against the spread of its stream.

Rank-k update (Chan, Golub & LeVeque 1979). A block of ``k = n_b`` draws with block means ``b_x, b_y``
and centred rows ``X_c = X - b_x``, ``Y_c = Y - b_y`` is merged into a state of ``n_a`` draws by

    δ_x = b_x - mean_x,  δ_y = b_y - mean_y,  s = sqrt(n_a n_b / (n_a + n_b))
    comoment += X_cᵀ Y_c + s² δ_x δ_yᵀ
    m2_x     += Σ_rows X_c² + s² δ_x²
    mean_x   += (n_b / (n_a + n_b)) δ_x

Appending the correction row ``s δ_x`` to ``X_c`` (and ``s δ_y`` to ``Y_c``) turns the comoment update
into one GEMM with inner dimension ``k + 1``, and the ``m2`` update into the column sums of squares of
the same augmented block. Nothing of size ``n × p`` is allocated besides the state itself. Because
only centred quantities enter the products, the update keeps its accuracy when the spread of a stream
is tiny against its mean (losses of 1e3 ± 1e-3), where the raw-sum formula ``Σxyᵀ - N x̄ȳᵀ`` loses
every digit.

Merging two full accumulators (``a`` absorbs ``b``) is the same formula with the block replaced by
the other state: ``comoment_a += comoment_b + s² δ_x δ_yᵀ``, ``m2_a += m2_b + s² δ²``.

Correlation of a stream with (numerically) zero variance is defined as 0: a constant loss carries no
linear information about any other. A stream counts as constant when its sample standard deviation
is at most ``16 · eps(dtype) · |mean|`` (or exactly zero), the level at which centred arithmetic can
no longer tell its spread from rounding noise.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "running_cov_update_",
    "running_cov_merge_",
    "running_cov_covariance",
    "running_cov_correlation",
    "constant_mask",
]

# A stream whose std is below this many ulps of its mean is treated as constant (see module docstring).
_CONSTANT_ULPS = 16.0


def _augmented_block(z: torch.Tensor, mean: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre a ``[k, d]`` block and append the Chan correction row ``scale * (block_mean - mean)``."""
    k, d = z.shape
    block_mean = z.mean(dim=0)  # [d]
    aug = torch.empty((k + 1, d), dtype=mean.dtype, device=mean.device)
    torch.sub(z, block_mean, out=aug[:k])
    delta = block_mean - mean  # [d]
    torch.mul(delta, scale, out=aug[k])
    return aug, delta


def running_cov_update_(
    comoment: torch.Tensor,
    mean_x: torch.Tensor,
    mean_y: torch.Tensor,
    m2_x: torch.Tensor,
    m2_y: torch.Tensor,
    count: int,
    x: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """Merge ``k`` draws into the state, in place (rank-k Chan update, one GEMM).

    Args:
        comoment (Tensor): `[n, p]` centred co-moment, updated in place.
        mean_x (Tensor): `[n]`, updated in place.
        mean_y (Tensor): `[p]`, updated in place.
        m2_x (Tensor): `[n]` centred sum of squares, updated in place.
        m2_y (Tensor): `[p]`, updated in place.
        count (int): draws already in the state.
        x (Tensor): `[k, n]` new draws of the first stream, any floating dtype, same device.
        y (Tensor): `[k, p]` new draws of the second stream.
    """
    k = x.shape[0]
    if k == 0:
        return
    x = x.to(mean_x.dtype)  # centred in float64, the state vectors' dtype
    y = y.to(mean_y.dtype)
    total = count + k
    scale = math.sqrt(count * k / total)
    xa, dx = _augmented_block(x, mean_x, scale)
    ya, dy = _augmented_block(y, mean_y, scale)
    comoment.addmm_(xa.t().to(comoment.dtype), ya.to(comoment.dtype))
    m2_x.add_(xa.square().sum(dim=0))
    m2_y.add_(ya.square().sum(dim=0))
    mean_x.add_(dx, alpha=k / total)
    mean_y.add_(dy, alpha=k / total)


def running_cov_merge_(
    comoment: torch.Tensor,
    mean_x: torch.Tensor,
    mean_y: torch.Tensor,
    m2_x: torch.Tensor,
    m2_y: torch.Tensor,
    count: int,
    other_comoment: torch.Tensor,
    other_mean_x: torch.Tensor,
    other_mean_y: torch.Tensor,
    other_m2_x: torch.Tensor,
    other_m2_y: torch.Tensor,
    other_count: int,
) -> None:
    """Merge another accumulator's state into this one, in place (Chan's parallel formula)."""
    if other_count == 0:
        return
    cd = comoment.dtype
    total = count + other_count
    coef = count * other_count / total
    dx = other_mean_x.to(mean_x.dtype) - mean_x
    dy = other_mean_y.to(mean_y.dtype) - mean_y
    comoment.add_(other_comoment.to(cd))
    comoment.addr_(dx.to(cd), dy.to(cd), alpha=coef)
    m2_x.add_(other_m2_x.to(m2_x.dtype)).add_(dx.square(), alpha=coef)
    m2_y.add_(other_m2_y.to(m2_y.dtype)).add_(dy.square(), alpha=coef)
    mean_x.add_(dx, alpha=other_count / total)
    mean_y.add_(dy, alpha=other_count / total)


def running_cov_covariance(comoment: torch.Tensor, count: int) -> torch.Tensor:
    """Unbiased cross-covariance ``comoment / (count - 1)``, `[n, p]`, a new tensor."""
    return comoment / (count - 1)


def constant_mask(m2: torch.Tensor, mean: torch.Tensor, count: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Boolean mask of streams treated as constant: std at most 16 ulps of |mean| in ``dtype`` (the
    accumulator's dtype; default ``m2.dtype``), or exactly 0."""
    eps = torch.finfo(dtype or m2.dtype).eps
    floor = (_CONSTANT_ULPS * eps) ** 2 * count * mean.square()
    return m2 <= floor


def _inv_sqrt_or_zero(m2: torch.Tensor, mean: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    const = constant_mask(m2, mean, count, dtype)
    inv = m2.clamp_min(torch.finfo(m2.dtype).tiny).rsqrt()
    return inv.masked_fill_(const, 0.0).to(dtype)


def running_cov_correlation(
    comoment: torch.Tensor,
    mean_x: torch.Tensor,
    mean_y: torch.Tensor,
    m2_x: torch.Tensor,
    m2_y: torch.Tensor,
    count: int,
) -> torch.Tensor:
    """Pearson cross-correlation `[n, p]` in [-1, 1] in the co-moment's dtype; 0 wherever either stream is
    constant."""
    inv_x = _inv_sqrt_or_zero(m2_x, mean_x, count, comoment.dtype)  # [n]
    inv_y = _inv_sqrt_or_zero(m2_y, mean_y, count, comoment.dtype)  # [p]
    out = comoment * inv_x.unsqueeze(1)
    out.mul_(inv_y.unsqueeze(0))
    return out.clamp_(-1.0, 1.0)
