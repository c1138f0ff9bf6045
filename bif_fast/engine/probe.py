"""The re-fit probe of the calibration: a few cheap, warm-started re-trainings that score candidate settings
the way the linear datamodelling score (LDS) does, so the defaults are chosen by how well they predict
retraining on this model rather than assumed.

Each re-fit starts at w* and takes ``steps`` full-batch Adam steps on the mean loss of a random half of the
training sequences (the objective's own regulariser is unknown here and left out: the changes it would add
are nearly the same for every subset, so they cancel in a rank correlation across subsets). The probe
records which sequences each re-fit kept and how every query unit's loss moved. A candidate's BIF
``B [n, p]`` predicts, for re-fit k and query unit j, ``sum over kept units i of B[i, j]`` (the sign of
``compute_bif``: a proponent has negative BIF and lowers the query loss when kept); its probe score is the
mean over query units of the Spearman correlation, across re-fits, between prediction and the observed
change, as the LDS is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bif_fast.engine.data import batch_len
from bif_fast.engine.distributed import RowShard, in_lockstep
from bif_fast.engine.units import LossFn, Units, evaluate, loss_and_mask

__all__ = ["RefitProbe", "extrapolated_score", "jackknife_se", "probe_loo_scores", "probe_noise_fractions",
           "probe_score", "probe_score_and_se", "refit_probe"]


@dataclass
class RefitProbe:
    """Re-fits on random halves: ``kept`` ``[K, n_train_units]`` (1 where the unit's sequence was trained
    on), ``delta`` ``[K, n_query_units]`` (query loss after the re-fit minus at w*), their cost. With row
    shards ``kept`` covers this rank's units and ``shard`` sums each prediction over every rank's."""

    kept: torch.Tensor
    delta: torch.Tensor
    seconds: float
    gradient_evaluations: int
    shard: RowShard | None = None


def _sequence_of_units(units: Units, n_sequences: int, device: torch.device) -> torch.Tensor:
    """``[n_units]`` the training sequence of each unit (per sample: the unit itself)."""
    if units.index is None:
        return torch.arange(n_sequences, device=device)
    return units.index[:, 0].to(device)


def refit_probe(model: torch.nn.Module, params: Sequence[torch.Tensor], loss_fn: LossFn, train_batches: list,
                train_units: Units, query_batches: list, query_units: Units, query_at_w_star: torch.Tensor, *,
                per_token: bool, refits: int, steps: int, seed: int,
                shard: RowShard | None = None) -> RefitProbe:  # fmt: skip
    """``refits`` warm-started re-fits on random halves (see the module docstring). The weights are left
    exactly as they were. With ``shard`` (row shards) ``train_batches`` are this rank's sequences
    ``shard.lo ..``: the halves are drawn over every rank's, and each Adam step takes the gradient summed
    across the ranks, as the single process's would be."""
    t0 = time.perf_counter()
    device = params[0].device
    sizes = [int(batch_len(b) or 0) for b in train_batches]
    n_seq = sum(sizes)
    total = n_seq if shard is None else int(shard.check(None, torch.tensor([float(n_seq)]))[0])
    gen = torch.Generator().manual_seed(seed + 0x5EED)
    halves = torch.rand(refits, total, generator=gen) < 0.5
    if shard is not None:
        halves = halves[:, shard.lo : shard.lo + n_seq]
    w0 = [p.detach().clone() for p in params]
    scale = max(float(torch.cat([w.reshape(-1).float() for w in w0]).square().mean().sqrt()), 1e-3)
    deltas = []
    for k in range(refits):
        weights = _subset_weights(model, loss_fn, train_batches, sizes, halves[k].to(device), per_token, shard)
        opt = torch.optim.Adam(params, lr=1e-2 * scale)
        try:
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                _subset_backward(model, loss_fn, train_batches, weights, per_token, params, shard)
                opt.step()
            deltas.append(_query_change(model, query_batches, loss_fn, per_token, query_units, query_at_w_star, shard))
        finally:  # every re-fit starts at w*, and the model ends there even when one raises
            with torch.no_grad():
                for p, w in zip(params, w0, strict=True):
                    p.copy_(w)
    seq = _sequence_of_units(train_units, n_seq, device)
    kept = halves.to(device)[:, seq].float()
    return RefitProbe(kept, torch.stack(deltas), time.perf_counter() - t0, refits * steps * total, shard)


def _query_change(model, batches: list, loss_fn: LossFn, per_token: bool, units: Units, at_w_star: torch.Tensor,
                  shard: RowShard | None) -> torch.Tensor:  # fmt: skip
    """The query units' losses now minus at w* (with ``shard``: a rank that fails makes every rank raise)."""

    def change() -> torch.Tensor:
        outs, _ = evaluate(model, batches, loss_fn, per_token, "query")
        return units.gather(outs) - at_w_star

    return in_lockstep(shard, change)


def _subset_weights(model, loss_fn: LossFn, batches: list, sizes: list[int], keep: torch.Tensor,
                    per_token: bool, shard: RowShard | None) -> list[torch.Tensor]:  # fmt: skip
    """Per batch, the weight of each loss in the mean over the kept sequences (per token: over their counted
    positions; with ``shard``, every rank's), so that the weighted sum of the losses is that mean."""
    weights, start, error = [], 0, None
    with torch.no_grad():
        try:
            for batch, size in zip(batches, sizes, strict=True):
                out, mask = loss_and_mask(loss_fn, model, batch, per_token)
                rows = keep[start : start + size].to(out.dtype)
                start += size
                if out.dim() == 2:
                    rows = rows[:, None] * (torch.ones_like(out) if mask is None else mask.to(out.dtype))
                weights.append(rows)
        except Exception as e:
            if shard is None:
                raise
            error = e
        count = float(sum(w.sum() for w in weights))
        if shard is not None:
            count = float(shard.check(error, torch.tensor([count]))[0])
    return [w / max(count, 1.0) for w in weights]


def _subset_backward(model, loss_fn: LossFn, batches: list, weights: list[torch.Tensor], per_token: bool,
                     params: Sequence[torch.Tensor], shard: RowShard | None) -> None:  # fmt: skip
    """The gradient of the weighted mean into ``params``' ``.grad`` (with ``shard``: summed over the ranks)."""
    error = None
    try:
        if batches:
            _subset_loss(model, loss_fn, batches, weights, per_token).backward()
    except Exception as e:
        if shard is None:
            raise
        error = e
    if shard is None:
        return
    shard.check(error)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = shard.sum_(torch.cat([g.reshape(-1) for g in grads]))  # one reduction for every parameter
    start = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[start : start + g.numel()].view_as(g).to(g.dtype)
        start += g.numel()


def _subset_loss(model, loss_fn: LossFn, batches: list, weights: list[torch.Tensor], per_token: bool) -> torch.Tensor:
    total = 0.0
    for batch, weight in zip(batches, weights, strict=True):
        out, _ = loss_and_mask(loss_fn, model, batch, per_token)
        total = total + (out * weight).sum()
    return total


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along dim 0 (ties broken by order; the observed changes are continuous)."""
    return x.argsort(0).argsort(0).to(torch.float64)


def _correlations(pred: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``[p]`` Spearman correlation of each column of ``pred`` with the same column of ``delta`` (rows: re-fits)."""
    a, b = _ranks(pred), _ranks(delta)
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-30)


def _predictions(bif: torch.Tensor, probe: RefitProbe) -> tuple[torch.Tensor, torch.Tensor]:
    """``[K, p]`` the BIF's predicted change of each query unit per re-fit, and the observed change."""
    pred = probe.kept.to(torch.float64) @ bif.to(probe.kept.device, torch.float64)
    if probe.shard is not None:  # each rank's units' share of the sums
        probe.shard.sum_(pred)
    return pred, probe.delta.to(torch.float64)


def probe_score(bif: torch.Tensor, probe: RefitProbe) -> float:
    """Mean over query units of the Spearman correlation across re-fits between the BIF's prediction
    and the observed change of the query loss."""
    return float(_correlations(*_predictions(bif, probe)).mean())


def probe_noise_fractions(half_a: torch.Tensor, half_b: torch.Tensor,
                          probe: RefitProbe) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per query unit, the pooled BIF's probe correlation and the share of its predictions' spread across
    re-fits that is Monte-Carlo noise, from the BIFs of two independent halves of a run.

    The spread of a unit's predicted changes across re-fits is signal plus noise. The halves' difference
    has no signal and twice the noise variance of either half, so the pool's noise variance is a quarter of
    the difference's.

    Returns:
        (``[p]`` correlations of the pool, ``[p]`` noise variance over total variance: 0 for no noise, about
        1 when the spread is all noise, and above 1 by chance).
    """
    pa, delta = _predictions(half_a, probe)
    pb, _ = _predictions(half_b, probe)
    pooled = (pa + pb) / 2
    noise = (pa - pb).var(0) / 4
    return _correlations(pooled, delta).cpu(), (noise / pooled.var(0).clamp_min(1e-300)).cpu()


def extrapolated_score(correlations: torch.Tensor, noise_fractions: torch.Tensor, gain: float, *,
                       max_noise_ratio: float) -> tuple[float, float]:  # fmt: skip
    """The mean probe correlation with ``gain`` times the draws.

    A correlation measured through noise of noise-to-signal ratio ``c`` is attenuated by ``1 / sqrt(1 + c)``,
    and ``gain`` times the draws divides ``c`` by ``gain``, so the score is carried over by
    ``sqrt((1 + c) / (1 + c / gain))``. ``c`` comes from the units' mean noise fraction ``f`` as
    ``f / (1 - f)``, capped at ``max_noise_ratio``: a mean over units is stable where one unit's ratio of
    two variances from a dozen re-fits is not.

    Returns:
        (the extrapolated score, the noise-to-signal ratio ``c`` used).
    """
    f = float(noise_fractions.mean())
    c = max_noise_ratio if f >= 1 else min(f / (1 - f), max_noise_ratio)
    return float(correlations.mean()) * math.sqrt((1 + c) / (1 + c / gain)), c


def probe_score_and_se(bif: torch.Tensor, probe: RefitProbe) -> tuple[float, float]:
    """``probe_score`` and its jackknife standard error over the re-fits (each left out in turn): how far the
    score could move with other random halves. The query units share the re-fits, so their correlations are
    not independent and the spread over units would understate it."""
    return probe_score(bif, probe), jackknife_se(probe_loo_scores(bif, probe))


def probe_loo_scores(bif: torch.Tensor, probe: RefitProbe) -> torch.Tensor:
    """``[K]`` the probe score with re-fit k left out, for each k (empty with fewer than 4 re-fits). Two
    candidates' left-out scores, differenced, give the jackknife error of their difference: the re-fits
    are shared, so a difference is known far better than either score."""
    pred, delta = _predictions(bif, probe)
    k = pred.shape[0]
    if k < 4:
        return torch.empty(0, dtype=torch.float64)
    keep = ~torch.eye(k, dtype=torch.bool, device=pred.device)
    return torch.stack([_correlations(pred[keep[i]], delta[keep[i]]).mean() for i in range(k)]).cpu()


def jackknife_se(loo: torch.Tensor) -> float:
    """The jackknife standard error from leave-one-out values (NaN for fewer than 4)."""
    k = loo.numel()
    if k < 4:
        return float("nan")
    return float(((k - 1) / k * (loo - loo.mean()).square().sum()).sqrt())
