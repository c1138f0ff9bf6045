"""Calibration building blocks on the Gaussian oracle: the curvature estimate against the exact Hessian, and
the kinetic sampler's step against its analytic stability limit."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from bif_fast import BIFConfig, SGLDConfig, compute_bif
from bif_fast.engine.calibrate import kinetic_settings, top_curvature


def _linear(seed: int = 0, n: int = 64, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.2])
    y = x @ torch.randn(d, generator=g) + 0.1 * torch.randn(n, generator=g)
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)
    return model, x, y


def _sq(model, batch):
    x, y = batch
    return 0.5 * (model(x).squeeze(1) - y).square()


def test_top_curvature_is_the_exact_hessians_and_leaves_the_weights():
    model, x, y = _linear()
    w = model.weight.detach().clone()
    exact = float(torch.linalg.eigvalsh(x.double().T @ x.double() / x.shape[0]).max())
    batches = [[x[:40], y[:40]], [x[40:], y[40:]]]  # the mean over both batches, weighted by size
    got = top_curvature(model, list(model.parameters()), _sq, batches)
    assert got["lam_max"] == pytest.approx(exact, rel=2e-3)
    assert got["iters"] <= 30 and torch.equal(model.weight.detach(), w)


def test_kinetic_step_is_stable_and_within_a_stated_factor_of_the_limit():
    """0.8 x the analytic BAOAB limit 2 / sqrt(a_max): the chains stay finite; at 1.2 x the limit they blow up."""
    model, x, y = _linear(n=200)
    lam = top_curvature(model, list(model.parameters()), _sq, [[x, y]])["lam_max"]
    nbeta, loc = 1e4, 30.0
    ks = kinetic_settings(lam, nbeta=nbeta, localization=loc)
    exact_max = nbeta * float(torch.linalg.eigvalsh(x.double().T @ x.double() / 200).max()) + loc
    assert ks.lr == pytest.approx(0.8 * 2 / math.sqrt(exact_max), rel=1e-3)
    assert ks.friction == pytest.approx(2 * math.sqrt(loc))
    data = TensorDataset(x, y)

    def run(lr: float):
        sgld = SGLDConfig(lr=lr, nbeta=nbeta, localization=loc, sampler="baoab", friction=ks.friction)
        cfg = BIFConfig(sgld=sgld, num_chains=2, num_draws=300, batch_size=200, chain_batch=1)
        return compute_bif(model, data, data, loss_fn=_sq, config=cfg)

    assert run(ks.lr).diagnostics["diverged"] == [False, False]
    unstable = dataclasses.replace(ks, lr=1.2 * 2 / math.sqrt(exact_max))
    with pytest.raises(Exception, match="diverged"):
        run(unstable.lr)


def test_kinetic_settings_reject_bad_input():
    with pytest.raises(ValueError, match="localization"):
        kinetic_settings(1.0, nbeta=10.0, localization=0.0)
    with pytest.raises(ValueError, match="lam_max"):
        kinetic_settings(float("nan"), nbeta=10.0, localization=1.0)
