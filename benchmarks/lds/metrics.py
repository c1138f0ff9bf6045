"""The linear datamodelling score (Park et al. 2023; the BIF paper's Appendix B.2).

For K subsets S_k of the training set (each point kept with probability alpha) and retrained query losses
``f_j(S_k)``, the LDS of a score matrix is the mean over queries j of the Spearman rank correlation, across
the K subsets, between ``g_j(S_k) = sum_{i in S_k} scores[i, j]`` and ``f_j(S_k)``; its standard error is
the standard deviation over queries divided by sqrt(number of queries). See ``benchmarks/lds/__init__.py``
for the sign convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LDS", "lds", "predicted_losses", "spearman"]


@dataclass(frozen=True)
class LDS:
    mean: float
    stderr: float
    per_query: torch.Tensor  # [n_query] Spearman correlation of each query (NaN for a constant column)

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.stderr:.3f}"


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along dim 0 (0-based), ties given their average rank."""
    x = x.double()
    order = x.argsort(dim=0, stable=True)
    ranks = torch.empty_like(x)
    ranks.scatter_(0, order, torch.arange(x.shape[0], dtype=x.dtype).unsqueeze(1).expand_as(x).contiguous())
    for j in range(x.shape[1]):
        col = x[:, j]
        values, counts = torch.unique(col, return_counts=True)
        for v in values[counts > 1]:
            tied = col == v
            ranks[tied, j] = ranks[tied, j].mean()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-wise Spearman correlation of ``a``, ``b`` `[K, m]` -> `[m]` (NaN where a column is constant)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"spearman needs two [K, m] tensors of one shape, got {list(a.shape)} and {list(b.shape)}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    denom = ra.norm(dim=0) * rb.norm(dim=0)
    return torch.where(denom > 0, (ra * rb).sum(0) / denom, torch.nan)


def predicted_losses(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """`[K, n_query]`: ``sum_{i in S_k} scores[i, j]`` for subset masks ``masks`` `[K, n_train]`."""
    return masks.double() @ scores.double()


def lds(scores: torch.Tensor, masks: torch.Tensor, retrained: torch.Tensor) -> LDS:
    """LDS of ``scores`` `[n_train, n_query]` against the query losses ``retrained`` `[K, n_query]` measured after
    retraining on the subsets ``masks`` `[K, n_train]` (bool). Queries whose predicted or measured losses do
    not vary across subsets are left out of the mean."""
    if scores.dim() != 2 or masks.dim() != 2 or retrained.dim() != 2:
        raise ValueError("lds needs scores [n_train, n_query], masks [K, n_train] and retrained [K, n_query]")
    if masks.shape[1] != scores.shape[0] or retrained.shape != (masks.shape[0], scores.shape[1]):
        raise ValueError(f"shapes do not agree: scores {list(scores.shape)}, masks {list(masks.shape)}, "
                         f"retrained {list(retrained.shape)}")  # fmt: skip
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores hold NaN or Inf")
    rho = spearman(predicted_losses(scores, masks), retrained.double())
    ok = rho[~rho.isnan()]
    if ok.numel() == 0:
        return LDS(float("nan"), float("nan"), rho)
    se = float(ok.std(unbiased=True) / ok.numel() ** 0.5) if ok.numel() > 1 else float("nan")
    return LDS(float(ok.mean()), se, rho)


def subset(score: LDS, keep: torch.Tensor) -> LDS:
    """The LDS over the queries ``keep`` (bool ``[n_query]``) only: the mean and s.e. of their correlations."""
    rho = score.per_query[keep.to(score.per_query.device)]
    ok = rho[~rho.isnan()]
    if ok.numel() == 0:
        return LDS(float("nan"), float("nan"), rho)
    se = float(ok.std(unbiased=True) / ok.numel() ** 0.5) if ok.numel() > 1 else float("nan")
    return LDS(float(ok.mean()), se, rho)
