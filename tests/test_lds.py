"""The LDS metric of the retraining benchmark (benchmarks/lds): exact values on known score matrices, the sign
convention, ties, and bad input. The benchmark itself runs in benchmarks/, not here."""

from __future__ import annotations

import pytest
import torch

from benchmarks.lds.metrics import lds, predicted_losses, spearman


def test_spearman_matches_hand_computed_values_with_ties():
    a = torch.tensor([[1.0, 1.0], [2.0, 3.0], [3.0, 3.0], [4.0, 2.0]])
    b = torch.tensor([[10.0, 4.0], [20.0, 3.0], [30.0, 2.0], [40.0, 1.0]])
    rho = spearman(a, b)
    assert rho[0] == pytest.approx(1.0)
    # column 2: ranks of a = [0, 2.5, 2.5, 1], ranks of b = [3, 2, 1, 0]; Pearson of the ranks
    ra, rb = torch.tensor([0, 2.5, 2.5, 1.0]), torch.tensor([3, 2, 1, 0.0])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    assert rho[1] == pytest.approx(float((ra * rb).sum() / (ra.norm() * rb.norm())))
    assert torch.isnan(spearman(torch.ones(4, 1), b[:, :1]))[0]


def test_lds_of_known_scores_and_the_sign_convention():
    """Retrained losses generated exactly by a linear datamodel: its own scores give LDS 1, their negation -1
    (the sign is part of the convention: scores are the loss change from including a point), a monotone
    transform of the prediction changes nothing, and independent scores give ~0."""
    g = torch.Generator().manual_seed(0)
    n, q, k = 30, 7, 200
    true = torch.randn(n, q, generator=g, dtype=torch.float64)
    masks = torch.rand(k, n, generator=g) < 0.5
    retrained = 3.0 + predicted_losses(true, masks)
    assert lds(true, masks, retrained).mean == pytest.approx(1.0)
    assert lds(-true, masks, retrained).mean == pytest.approx(-1.0)
    assert lds(5.0 * true, masks, retrained.exp()).mean == pytest.approx(1.0)  # ranks only
    noise = lds(torch.randn(n, q, generator=g, dtype=torch.float64), masks, retrained)
    assert abs(noise.mean) < 4 * noise.stderr + 0.05
    assert noise.per_query.shape == (q,)


def test_lds_stderr_is_the_spread_over_queries():
    g = torch.Generator().manual_seed(1)
    n, q, k = 20, 9, 60
    scores = torch.randn(n, q, generator=g, dtype=torch.float64)
    masks = torch.rand(k, n, generator=g) < 0.5
    retrained = predicted_losses(scores, masks) + 2.0 * torch.randn(k, q, generator=g, dtype=torch.float64)
    res = lds(scores, masks, retrained)
    rho = res.per_query
    assert res.mean == pytest.approx(float(rho.mean())) and res.stderr == pytest.approx(float(rho.std() / q**0.5))
    assert 0 < res.mean < 1


def test_lds_rejects_bad_input():
    with pytest.raises(ValueError, match="shapes"):
        lds(torch.zeros(3, 2), torch.zeros(5, 4, dtype=torch.bool), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="NaN"):
        lds(torch.full((3, 2), float("nan")), torch.zeros(5, 3, dtype=torch.bool), torch.zeros(5, 2))
