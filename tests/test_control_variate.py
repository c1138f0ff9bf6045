"""Minibatch gradients with a control variate at w* (``BIFConfig.control_variate``): exact where every
example has the same Hessian, and close to the closed-form BIF at large nbeta where plain minibatches are not."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from bif_fast import BIFConfig, SGLDConfig, compute_bif
from bif_fast.engine.calibrate import full_gradient
from bif_fast.engine.control_variate import ControlVariate


class _Location(torch.nn.Module):
    """``l_i(w) = |w - y_i|^2 / 2``: every example's Hessian is I, so g_b(w) - g_b(w*) + g(w*) = g(w) exactly."""

    def __init__(self, d: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def forward(self, y):
        return 0.5 * (self.w - y).square().sum(-1)


def _location(n: int = 37, d: int = 3, seed: int = 0):
    y = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    model = _Location(d)
    with torch.no_grad():
        model.w.copy_(y.mean(0))
    return model, TensorDataset(y)


def _loc_loss(model, batch):
    return model(batch[0])


@pytest.mark.parametrize("chain_batch", [1, 3])
def test_control_variate_is_the_full_gradient_when_every_hessian_is_the_same(chain_batch):
    """The chains (same Philox noise) are then the full-batch chains: the BIF agrees to rounding, while
    plain minibatches of 5 give another law."""
    model, data = _location()
    sgld = SGLDConfig(lr=2e-3, nbeta=500.0, localization=50.0)
    cfg = BIFConfig(sgld=sgld, num_chains=3, num_draws=80, batch_size=5, control_variate=True,
                    chain_batch=chain_batch, seed=4)  # fmt: skip
    cv = compute_bif(model, data, data, loss_fn=_loc_loss, config=cfg)
    full = compute_bif(model, data, data, loss_fn=_loc_loss, config=dataclasses.replace(
        cfg, batch_size="full", control_variate=False))  # fmt: skip
    plain = compute_bif(model, data, data, loss_fn=_loc_loss, config=dataclasses.replace(cfg, control_variate=False))
    scale = float(full.bif.abs().max())
    assert cv.diagnostics["chain_batch"] == chain_batch
    assert torch.allclose(cv.bif, full.bif, rtol=1e-8, atol=1e-10 * scale)
    assert float((plain.bif - full.bif).abs().max()) > 1e-2 * scale
    assert torch.equal(model.w.detach(), data.tensors[0].mean(0))  # the model is left at w*


def test_correction_vanishes_in_expectation_and_batches_agree():
    """The correction g(w*) - g_b(w*) is zero for the whole training set and sums to zero over a partition;
    the vmapped corrections of stacked minibatches equal the one-by-one ones."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
    x, y = torch.randn(24, 4, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    loss = lambda m, b: 0.5 * (m(b[0]).squeeze(1) - b[1]).square()  # noqa: E731
    params = list(model.parameters())
    grad = full_gradient(model, params, loss, [(x, y)], False, dtype=torch.float64)
    cv = ControlVariate(model, params, loss, False, grad)
    assert float(cv.correction((x, y)).abs().max()) < 1e-12
    parts = [cv.correction((x[i : i + 6], y[i : i + 6])) for i in range(0, 24, 6)]
    assert float(torch.stack(parts).sum(0).abs().max()) < 1e-12
    stacked = cv.batched_correction((x.view(4, 6, 4), y.view(4, 6)))
    assert torch.allclose(stacked, torch.stack(parts), rtol=1e-10, atol=1e-14)
    assert stacked.dtype == torch.float64 and float(parts[0].abs().max()) > 1e-3


def _regression(n: int = 120, d: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)
    return model, x, y


def _sq(model, batch):
    x, y = batch
    return 0.5 * (model(x).squeeze(1) - y).square()


def test_control_variate_keeps_the_closed_form_bif_where_plain_minibatches_lose_it():
    """Linear regression at nbeta = 100 n: the posterior is N(w*, (nbeta H + loc)^-1) and the BIF has a closed
    form. With minibatches of 16 (of 120) the control variate comes within 25% of it (full batch: 7%), plain
    minibatches are off by more than ten times that (their noise ~ nbeta / b swamps the injected noise)."""
    model, x, y = _regression()
    data = TensorDataset(x, y)
    n = x.shape[0]
    h = x.T @ x / n
    nbeta = 100.0 * n
    loc = nbeta * float(torch.linalg.eigvalsh(h).min())
    a_max = nbeta * float(x.square().sum(1).max()) + loc  # the stiffest a minibatch can be
    sgld = SGLDConfig(lr=0.8 * 2 / math.sqrt(a_max), nbeta=nbeta, localization=loc, sampler="baoab",
                      friction=2 * math.sqrt(loc))  # fmt: skip
    cfg = BIFConfig(sgld=sgld, num_chains=4, num_draws=1500, batch_size=16, control_variate=True, seed=2)
    sigma = torch.linalg.inv(nbeta * h + loc * torch.eye(h.shape[0], dtype=torch.float64))
    r = (x @ model.weight.detach().T).squeeze(1) - y
    s = x @ sigma @ x.T
    exact = -(r[:, None] * r[None, :] * s + 0.5 * s.square())
    err = lambda b: float((b - exact).norm() / exact.norm())  # noqa: E731
    cv = compute_bif(model, data, data, loss_fn=_sq, config=cfg)
    plain = compute_bif(model, data, data, loss_fn=_sq, config=dataclasses.replace(cfg, control_variate=False))
    assert not any(cv.diagnostics["diverged"])
    assert err(cv.bif) < 0.25, err(cv.bif)
    assert err(plain.bif) > 10 * err(cv.bif), (err(plain.bif), err(cv.bif))


def test_control_variate_over_a_larger_sgld_data_is_the_full_gradient_of_that_data():
    """With sgld_data (a larger corpus than the evaluated train set) the full gradient at w* is over sgld_data:
    on the location model the chains are then the full-batch chains of that corpus, so the BIF rows of the
    train subset equal those of a full-batch run whose train set is the whole corpus."""
    model, corpus = _location(n=41)
    train = TensorDataset(corpus.tensors[0][:9])
    query = TensorDataset(corpus.tensors[0][30:])
    sgld = SGLDConfig(lr=2e-3, nbeta=500.0, localization=50.0)
    cfg = BIFConfig(sgld=sgld, num_chains=2, num_draws=60, batch_size=7, control_variate=True, seed=1)
    cv = compute_bif(model, train, query, loss_fn=_loc_loss, config=cfg, sgld_data=corpus)
    full = compute_bif(model, corpus, query, loss_fn=_loc_loss, config=dataclasses.replace(
        cfg, batch_size="full", control_variate=False))  # fmt: skip
    assert torch.allclose(cv.bif, full.bif[:9], rtol=1e-8, atol=1e-10 * float(full.bif.abs().max()))


def test_control_variate_settings_are_validated():
    model, data = _location()
    with pytest.raises(ValueError, match="control_variate"):
        BIFConfig(batch_size="full", control_variate=True)
    with pytest.raises(ValueError, match="control_variate"):
        BIFConfig(control_variate=1)
    cfg = BIFConfig(sgld=SGLDConfig(lr=1e-3, nbeta=10.0), num_chains=1, num_draws=4, batch_size=4,
                    control_variate=True)  # fmt: skip

    class Streams:
        def minibatches(self, chain):
            while True:
                yield data[:4]

    with pytest.raises(ValueError, match="whole SGLD data"):
        compute_bif(model, data, data, loss_fn=_loc_loss, config=cfg, sgld_data=Streams())
