"""Calibration building blocks on the Gaussian oracle: the curvature estimates (power iteration, Lanczos)
against the exact Hessian, the kinetic sampler's step against its analytic stability limit, the curvature
mass against the closed-form BIF, and the full-batch gradient with its reused forward."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from bif_fast import SGLD, BIFConfig, SGLDConfig, compute_bif
from bif_fast.engine.calibrate import kinetic_settings, top_curvature, top_eigenpairs
from bif_fast.engine.mass import curvature_mass


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


def _spread(seed: int = 0, n: int = 120, d: int = 8):
    """A least-squares problem with a spread Hessian spectrum (a few stiff directions, as in networks)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([6.0, 4.0, 3.0, 1.0, 0.6, 0.4, 0.3, 0.2])[:d]
    x = torch.randn(n, d, generator=g) * scales
    y = x @ torch.randn(d, generator=g) + 0.3 * torch.randn(n, generator=g)
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)
    return model, x, y


def test_top_eigenpairs_match_the_exact_hessian_and_leave_the_weights():
    model, x, y = _spread()
    w = model.weight.detach().clone()
    h = x.double().T @ x.double() / x.shape[0]
    evals, evecs = torch.linalg.eigh(h)
    evals, evecs = evals.flip(0), evecs.flip(1)
    got = top_eigenpairs(model, list(model.parameters()), _sq, [[x[:50], y[:50]], [x[50:], y[50:]]], rank=3)
    assert got["eigvals"].shape == (4,) and got["eigvecs"].shape == (8, 3)
    assert torch.allclose(got["eigvals"].double(), evals[:4], rtol=2e-3)
    cos = (got["eigvecs"].double() * evecs[:, :3]).sum(0).abs()
    assert bool((cos > 0.999).all()), cos
    assert torch.equal(model.weight.detach(), w)


def test_curvature_mass_brings_every_stiff_direction_down_to_a_ref():
    model, x, y = _spread()
    h = x.double().T @ x.double() / x.shape[0]
    evals, evecs = torch.linalg.eigh(h)
    evals, evecs = evals.flip(0), evecs.flip(1)
    nbeta, a_min = 500.0, 3.0
    mass = curvature_mass(evals[:4], evecs[:, :3], nbeta=nbeta, a_min=a_min)
    assert mass.a_ref == pytest.approx(nbeta * float(evals[3]) + a_min)
    eye = torch.eye(8)
    p = mass.inv_sqrt_mass(eye).double()  # rows of P (symmetric)
    assert torch.allclose(p, p.T, atol=1e-6)
    assert torch.allclose(mass.inv_mass(eye).double(), p @ p, atol=1e-5)
    pap = p @ (nbeta * h + a_min * torch.eye(8, dtype=torch.float64)) @ p
    top = float(torch.linalg.eigvalsh(pap).max())
    assert top == pytest.approx(mass.a_ref, rel=1e-4)  # was nbeta * lam_max + a_min, 4.4x larger here
    assert nbeta * float(evals[0]) + a_min > 4 * top


def _kinetic_mass_config(model, x, y, *, draws: int, chains: int = 4, shrink: float = 1.0):
    h = x.double().T @ x.double() / x.shape[0]
    evals, evecs = torch.linalg.eigh(h)
    nbeta, loc = 2000.0, 40.0
    a_ref = nbeta * float(evals.flip(0)[3]) + loc
    sgld = SGLDConfig(lr=shrink * 0.8 * 2 / math.sqrt(a_ref), nbeta=nbeta, localization=loc, sampler="baoab",
                      friction=2 * math.sqrt(loc), mass="curvature", mass_rank=3)  # fmt: skip
    cfg = BIFConfig(sgld=sgld, num_chains=chains, num_draws=draws, batch_size="full", eval_batch_size=64, seed=3)
    sigma = torch.linalg.inv(nbeta * h + loc * torch.eye(h.shape[0], dtype=torch.float64))
    return cfg, sigma


def test_kinetic_sampler_with_the_curvature_mass_matches_the_closed_form_bif():
    """BAOAB's position marginal is exact for a Gaussian target at any stable step, with or without a mass;
    the mass lets the step exceed the unit-mass limit (where the unit-mass sampler blows up)."""
    model, x, y = _spread()
    data = TensorDataset(x, y)
    cfg, sigma = _kinetic_mass_config(model, x, y, draws=2500)
    res = compute_bif(model, data, data, loss_fn=_sq, config=cfg)
    r = (x @ model.weight.detach().T).squeeze(1).double() - y.double()
    s = x.double() @ sigma @ x.double().T
    exact = -(r[:, None] * r[None, :] * s + 0.5 * s.square())
    err = lambda b: float((b.double() - exact).norm() / exact.norm())  # noqa: E731
    assert err(res.bif) < 0.08, err(res.bif)
    short = compute_bif(model, data, data, loss_fn=_sq, config=dataclasses.replace(cfg, num_draws=150))
    assert err(res.bif) < err(short.bif)
    unit = dataclasses.replace(cfg, sgld=dataclasses.replace(cfg.sgld, mass="identity"), num_draws=200)
    with pytest.raises(Exception, match="diverged"):
        compute_bif(model, data, data, loss_fn=_sq, config=unit)


class _Flagged(torch.nn.Module):
    """A user module in train mode whose forward ignores the flag; bif_fast cannot know that, so it
    evaluates the losses separately instead of reusing the full-batch forward."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_forward_reuse_equals_separate_evaluation():
    model, x, y = _spread()
    train, query = TensorDataset(x[:90], y[:90]), TensorDataset(x[90:], y[90:])
    cfg, _ = _kinetic_mass_config(model, x, y, draws=60, chains=2)
    reused = compute_bif(model.eval(), train, query, loss_fn=_sq, config=cfg)
    flagged = _Flagged(model).train()
    separate = compute_bif(flagged, train, query, loss_fn=_sq, config=cfg)
    assert reused.diagnostics["forward_reuse"] and not separate.diagnostics["forward_reuse"]
    assert torch.allclose(reused.bif, separate.bif, rtol=1e-5, atol=1e-9 * float(reused.bif.abs().max()))


def test_full_batch_gradient_is_the_mean_over_every_evaluation_batch():
    """In float64 (unit mass) the chains are the same whether the training set is one batch or seventeen."""
    model, x, y = _spread()
    model, x, y = model.double(), x.double(), y.double()
    data = TensorDataset(x, y)
    cfg, _ = _kinetic_mass_config(model, x, y, draws=40, chains=2, shrink=0.2)
    cfg = dataclasses.replace(cfg, sgld=dataclasses.replace(cfg.sgld, mass="identity"))
    one = compute_bif(model, data, data, loss_fn=_sq, config=cfg)
    many = compute_bif(model, data, data, loss_fn=_sq, config=dataclasses.replace(cfg, eval_batch_size=7))
    assert not any(one.diagnostics["diverged"])
    assert torch.allclose(one.bif, many.bif, rtol=1e-9, atol=1e-12 * float(one.bif.abs().max()))


def test_full_batch_and_mass_settings_are_validated():
    model, x, y = _spread()
    data = TensorDataset(x, y)
    cfg, _ = _kinetic_mass_config(model, x, y, draws=10, chains=1)
    with pytest.raises(ValueError, match="sgld_data"):
        compute_bif(model, data, data, loss_fn=_sq, config=cfg, sgld_data=data)
    with pytest.raises(ValueError, match="mass"):
        SGLDConfig(sampler="sgld", mass="curvature")
    with pytest.raises(ValueError, match="mass_rank"):
        SGLDConfig(sampler="baoab", mass="curvature", mass_rank=0)
    with pytest.raises(ValueError, match="batch_size"):
        BIFConfig(batch_size="half")
    with pytest.raises(ValueError, match="LowRankMass"):
        SGLD(model.parameters(), cfg.sgld)


def test_a_chain_that_leaves_the_basin_is_told_apart_from_healthy_ones():
    """``max_excursion``: a chain whose mean training loss jumps far above its typical rise is flagged with the
    reason; chi-square-like healthy traces (the rise of a Gaussian posterior) are not."""
    from bif_fast.engine.run import escaped_chains

    g = torch.Generator().manual_seed(0)
    at_w_star = 0.04
    healthy = at_w_star + 0.004 * torch.randn(4, 300, 8, generator=g).square().mean(-1)  # chi-square(8) / 8
    trace = healthy.clone()
    trace[2, 150:] += 5.0  # chain 2 escapes half-way
    typical: list[float] = []
    why = escaped_chains(trace, at_w_star, 50.0, typical)
    assert [w is None for w in why] == [True, True, False, True] and "rose 5" in why[2]
    assert len(typical) == 3 and all(0.003 < level < 0.005 and 0 < spread < 0.002 for level, spread in typical)
    # A chain that escapes from its first draw is caught against the earlier chains' typical rise.
    early = healthy[:1].clone() + 5.0
    assert escaped_chains(early, at_w_star, 50.0, typical)[0] is not None
    assert escaped_chains(early, at_w_star, 50.0, [])[0] is None  # with nothing to compare: not caught
    # A rise dominated by the linear term (w* off the data loss's minimum, e.g. under weight decay) is
    # centred near zero and often negative: its spread, not its level, is the yardstick.
    linear = at_w_star + 1e-3 * torch.randn(4, 2000, generator=g)
    assert escaped_chains(linear, at_w_star, 50.0, []) == [None] * 4
    assert escaped_chains(trace, at_w_star, None, []) == [None] * 4


def test_max_excursion_is_validated_and_off_for_explicit_configs():
    assert BIFConfig().max_excursion is None
    for bad in (1.0, 0.5, True, "20"):
        with pytest.raises(ValueError, match="max_excursion"):
            BIFConfig(max_excursion=bad)


def test_batched_chains_with_the_mass_are_the_sequential_chains():
    """The mass step of a chain batch (one preconditioning product for every chain) makes the same chains as
    one by one: same Philox streams, same force, up to the rounding of the batched products."""
    model, x, y = _spread()
    data = TensorDataset(x, y)
    cfg, _ = _kinetic_mass_config(model, x, y, draws=40, chains=3)
    one = compute_bif(model, data, data, loss_fn=_sq, config=dataclasses.replace(cfg, chain_batch=1))
    many = compute_bif(model, data, data, loss_fn=_sq, config=dataclasses.replace(cfg, chain_batch=3))
    assert one.diagnostics["chain_batch"] == 1 and many.diagnostics["chain_batch"] == 3
    assert not any(one.diagnostics["diverged"])
    assert torch.allclose(one.bif, many.bif, rtol=1e-3, atol=1e-5 * float(one.bif.abs().max()))
