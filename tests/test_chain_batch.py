"""Batched chains (torch.func.vmap over stacked weights) against the same chains run one by one."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch.utils.data import TensorDataset

import bif_fast.engine.batched as batched_mod
import bif_fast.sampler as sampler_mod
from bif_fast import BIFConfig, BIFError, SGLDConfig, compute_bif
from bif_fast.engine.chains import chain_batch_size

SAMPLERS = {
    "sgld": SGLDConfig(lr=2e-3, nbeta=50.0, localization=100.0),
    "rmsprop": SGLDConfig(lr=2e-4, nbeta=50.0, localization=100.0, precondition="rmsprop"),
    "baoab": SGLDConfig(lr=2e-3, nbeta=50.0, localization=100.0, sampler="baoab", bounding_box_size=0.5),
}


def _mlp_problem(dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)
    x = torch.randn(61, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (61,), generator=g)
    return model, TensorDataset(x[:47], y[:47]), TensorDataset(x[47:], y[47:])


def _ce(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def _config(sgld: SGLDConfig, **kw) -> BIFConfig:
    base = dict(sgld=sgld, num_chains=5, num_draws=23, num_burnin_steps=4, num_steps_bw_draws=2, batch_size=9,
                eval_batch_size=20, draws_per_update=7, seed=3)  # fmt: skip
    base.update(kw)
    return BIFConfig(**base)


def _assert_same(a, b, rtol: float, atol: float = 0.0) -> None:
    for name in ("bif", "bif_normalized", "stderr"):
        x, y = getattr(a, name), getattr(b, name)
        assert not torch.isnan(x).any()
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol * float(y.abs().max()), msg=name)
    # (the distance is a float32 norm of the float32 master weights, reduced in another order when batched)
    for key, tol in (("chain_mean_train_loss", rtol), ("rms_distance_from_w_star", max(rtol, 1e-5))):
        torch.testing.assert_close(torch.tensor(a.diagnostics[key]), torch.tensor(b.diagnostics[key]), rtol=tol,
                                   atol=0.0, equal_nan=True, msg=key)  # fmt: skip
    assert a.diagnostics["diverged"] == b.diagnostics["diverged"]
    assert a.diagnostics["num_draws_used"] == b.diagnostics["num_draws_used"]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("group", [2, 5])
def test_batched_chains_equal_sequential_chains(sampler, group):
    """Same noise (chain c's Philox stream), same minibatches ((seed, c)), same schedule: in float64 the only
    difference is the rounding of batched vs plain matrix products."""
    model, train, query = _mlp_problem()
    before = [p.detach().clone() for p in model.parameters()]
    cfg = _config(SAMPLERS[sampler])
    one = compute_bif(model, train, query, loss_fn=_ce, config=dataclasses.replace(cfg, chain_batch=1))
    many = compute_bif(model, train, query, loss_fn=_ce, config=dataclasses.replace(cfg, chain_batch=group))
    assert one.diagnostics["chain_batch"] == 1 and many.diagnostics["chain_batch"] == group
    _assert_same(many, one, rtol=1e-9)
    # the chains moved (the comparison is not between two copies of w*) and the model is back at w*
    assert min(min(r[1:]) for r in one.diagnostics["rms_distance_from_w_star"]) > 1e-4
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_batched_chains_float32_and_a_parameter_subset():
    model, train, query = _mlp_problem(torch.float32)
    cfg = _config(SAMPLERS["sgld"])
    params = list(model[2].parameters())
    one = compute_bif(model, train, query, loss_fn=_ce, config=dataclasses.replace(cfg, chain_batch=1), params=params)
    many = compute_bif(model, train, query, loss_fn=_ce, config=dataclasses.replace(cfg, chain_batch=3), params=params)
    _assert_same(many, one, rtol=2e-4, atol=1e-5)
    assert all(p.grad is None for p in model[0].parameters())


def test_batched_chains_with_the_curvature_mass_equal_sequential_chains():
    """The default sampler (BAOAB with the low-rank mass, fp32): one call steps the batch's rows, each row
    with its own chain's noise, so the chains are the sequential ones up to fp32 rounding of the products."""
    model, train, query = _mlp_problem(torch.float32)
    sgld = SGLDConfig(lr=2e-3, nbeta=50.0, localization=100.0, sampler="baoab", friction=20.0, mass="curvature",
                      mass_rank=3)  # fmt: skip
    cfg = _config(sgld, batch_size="full", num_steps_bw_draws=1)
    one = compute_bif(model, train, query, loss_fn=_ce, config=dataclasses.replace(cfg, chain_batch=1))
    many = compute_bif(model, train, query, loss_fn=_ce, config=dataclasses.replace(cfg, chain_batch=3))
    assert many.diagnostics["chain_batch"] == 3
    _assert_same(many, one, rtol=2e-4, atol=1e-5)
    assert min(min(r[1:]) for r in one.diagnostics["rms_distance_from_w_star"]) > 1e-4


def _token_problem():
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Linear(4, 1).double()
    x = torch.randn(9, 6, 4, generator=g, dtype=torch.float64)
    y = torch.randn(9, 6, generator=g, dtype=torch.float64)
    return model, TensorDataset(x[:6], y[:6]), TensorDataset(x[6:], y[6:])


def _token_loss(model, batch):
    x, y = batch
    out = 0.5 * (model(x).squeeze(-1) - y).square()
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[:, -1] = False  # the last position is declared ignored
    return out, mask


def test_batched_per_token_equals_sequential():
    model, train, query = _token_problem()
    cfg = _config(SAMPLERS["rmsprop"], num_chains=3, batch_size=2)
    one = compute_bif(model, train, query, loss_fn=_token_loss, config=dataclasses.replace(cfg, chain_batch=1),
                      per_token=True)  # fmt: skip
    many = compute_bif(model, train, query, loss_fn=_token_loss, config=dataclasses.replace(cfg, chain_batch=3),
                       per_token=True)  # fmt: skip
    assert many.bif.shape == (6 * 5, 3 * 5)
    _assert_same(many, one, rtol=1e-9)
    assert torch.equal(many.train_index, one.train_index)


def _poison_chains(monkeypatch, chains: set[int], at_step: int) -> None:
    """Make `chains` produce NaN weights at step `at_step`, in both the sequential and the batched path."""
    real = sampler_mod.sgld_update_resolved_

    def poisoned(backend, w, grad, anchor, state, **kw):
        real(backend, w, grad, anchor, state, **kw)
        if kw["chain"] in chains and kw["step"] == at_step:
            w.fill_(float("nan"))
            if kw["out"] is not None:
                kw["out"].fill_(float("nan"))
            kw["diverged"].fill_(1)

    real_rows = batched_mod.sgld_update_rows_resolved_

    def poisoned_rows(backend, w, grad, anchor, state, **kw):
        real_rows(backend, w, grad, anchor, state, **kw)
        for r, chain in enumerate(kw["chains"]):
            if chain in chains and kw["step"] == at_step:
                w[r].fill_(float("nan"))
                if kw["out"] is not None:
                    kw["out"][r].fill_(float("nan"))
                kw["diverged"][r] = 1

    monkeypatch.setattr(sampler_mod, "sgld_update_resolved_", poisoned)
    monkeypatch.setattr(batched_mod, "sgld_update_rows_resolved_", poisoned_rows)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_a_diverged_chain_in_a_batch_is_reported_and_left_out(monkeypatch, group):
    model, train, query = _mlp_problem()
    _poison_chains(monkeypatch, {2}, at_step=10)
    cfg = _config(SAMPLERS["sgld"], num_chains=4, chain_batch=group)
    res = compute_bif(model, train, query, loss_fn=_ce, config=cfg)
    assert res.diagnostics["diverged"] == [False, False, True, False]
    assert res.diagnostics["num_chains_used"] == 3 and res.diagnostics["num_draws_used"] == 3 * 23
    assert torch.isfinite(res.bif).all() and torch.isfinite(res.stderr).all()
    if group > 1:  # the batched result equals the sequential one without chain 2
        ref = compute_bif(model, train, query, loss_fn=_ce, config=dataclasses.replace(cfg, chain_batch=1))
        _assert_same(res, ref, rtol=1e-9)


def test_every_chain_of_a_batch_diverging_raises(monkeypatch):
    model, train, query = _mlp_problem()
    _poison_chains(monkeypatch, {0, 1, 2}, at_step=7)
    cfg = _config(SAMPLERS["rmsprop"], num_chains=3, chain_batch=3)
    with pytest.raises(BIFError, match="every chain diverged") as info:
        compute_bif(model, train, query, loss_fn=_ce, config=cfg)
    assert info.value.diagnostics["diverged"] == [True] * 3 and info.value.diagnostics["chain_batch"] == 3


class _Noisy(torch.nn.Module):
    """Dropout and BatchNorm in train mode: vmap cannot run these chains unchanged."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 3).double()
        self.bn = torch.nn.BatchNorm1d(3).double()
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.bn(self.lin(x)))


def test_models_vmap_cannot_run_fall_back_to_sequential_chains(caplog):
    _, train, query = _mlp_problem()
    model = _Noisy()
    cfg = _config(SAMPLERS["sgld"], num_chains=3)
    torch.manual_seed(0)
    one = compute_bif(model, train, query, loss_fn=_ce, config=dataclasses.replace(cfg, chain_batch=1))
    with caplog.at_level(logging.WARNING, logger="bif_fast"):
        torch.manual_seed(0)
        many = compute_bif(model, train, query, loss_fn=_ce, config=dataclasses.replace(cfg, chain_batch=3))
    assert many.diagnostics["chain_batch"] == 1
    assert any("one by one" in r.getMessage() for r in caplog.records)
    assert torch.equal(many.bif, one.bif)  # the fallback is the sequential path itself
    assert model.training and model.bn.training  # modes restored


def test_a_loss_fn_vmap_cannot_trace_falls_back():
    model, train, query = _mlp_problem()

    def loss_fn(m, batch):
        out = _ce(m, batch)
        if float(out.detach().sum()) > -1.0:  # data-dependent Python control flow: fine alone, not under vmap
            return out
        return out * 2

    cfg = _config(SAMPLERS["sgld"], num_chains=2, chain_batch=2)
    res = compute_bif(model, train, query, loss_fn=loss_fn, config=cfg)
    assert res.diagnostics["chain_batch"] == 1 and torch.isfinite(res.bif).all()


def test_auto_policy():
    cfg = BIFConfig(num_chains=8)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    f64 = torch.float64
    assert chain_batch_size(cfg, cpu, 200, 100, 30, f64, eval_rows=130) == 8  # tiny: dispatch-bound, batched
    assert chain_batch_size(cfg, cpu, 9882, 1000, 200, f64, eval_rows=1200) == 1  # compute-bound on a CPU
    # Full-batch gradients (the calibrated defaults): products large enough for the batched ones to pay.
    full = dataclasses.replace(cfg, batch_size="full")
    assert chain_batch_size(full, cpu, 9882, 1000, 200, f64, eval_rows=1200) == 8
    assert chain_batch_size(full, cpu, 100_000, 1000, 200, f64, eval_rows=1200) == 1
    assert chain_batch_size(cfg, cuda, 9882, 1000, 200, f64, eval_rows=1200) == 8
    assert chain_batch_size(cfg, cuda, 10**8, 1000, 200, f64, eval_rows=1200) == 1  # not a small model
    assert chain_batch_size(cfg, cuda, 9882, 100_000, 10_000, f64, eval_rows=1200) == 1  # accumulators too big
    assert chain_batch_size(dataclasses.replace(cfg, chain_batch=3), cpu, 10**8, 9, 9, f64, eval_rows=9) == 3
    assert chain_batch_size(dataclasses.replace(cfg, chain_batch=30), cpu, 1, 9, 9, f64, eval_rows=9) == 8
    assert chain_batch_size(BIFConfig(num_chains=1), cuda, 1, 9, 9, f64, eval_rows=9) == 1


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "all"])
def test_chain_batch_is_validated(value):
    with pytest.raises(ValueError, match="chain_batch"):
        BIFConfig(chain_batch=value)


@pytest.mark.cuda
def test_batched_chains_on_cuda_equal_sequential_and_auto_batches():
    model, train, query = _mlp_problem(torch.float32)
    model = model.cuda()
    train = TensorDataset(*(t.cuda() for t in train.tensors))
    query = TensorDataset(*(t.cuda() for t in query.tensors))
    cfg = _config(SAMPLERS["rmsprop"])
    one = compute_bif(model, train, query, loss_fn=_ce, config=dataclasses.replace(cfg, chain_batch=1))
    auto = compute_bif(model, train, query, loss_fn=_ce, config=cfg)
    assert auto.diagnostics["chain_batch"] == 5 and auto.bif.is_cuda
    _assert_same(auto, one, rtol=2e-4, atol=1e-5)
