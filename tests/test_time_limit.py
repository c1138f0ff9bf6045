"""BIFConfig.time_limit: the sampling stops at its time, each group of chains at its share, with one length
for the chains where it can, and never where a run must be exact (a checkpoint)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import TensorDataset

from bif_fast import BIFConfig, SGLDConfig, compute_bif


def _problem():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, TensorDataset(x[:30], y[:30]), TensorDataset(x[30:], y[30:])


def _ce(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def _config(**kw) -> BIFConfig:
    sgld = SGLDConfig(lr=2e-3, nbeta=50.0, localization=100.0, sampler="baoab", friction=10.0)
    base = dict(sgld=sgld, num_chains=3, num_draws=40, batch_size="full", eval_batch_size=64, seed=1)
    base.update(kw)
    return BIFConfig(**base)


def _same(a, b) -> None:
    for name in ("bif", "bif_normalized", "stderr"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-9, atol=0.0, msg=name)


@pytest.mark.parametrize("chain_batch", [1, 3])
def test_a_run_out_of_time_is_the_run_with_that_many_draws(chain_batch):
    """A limit that has passed at the first check stops the first group at its second draw, and every later
    group gets the same two draws: exactly the run asked for two draws, with its standard error."""
    model, train, query = _problem()
    stopped = compute_bif(model, train, query, loss_fn=_ce, config=_config(time_limit=1e-9, chain_batch=chain_batch))
    short = compute_bif(model, train, query, loss_fn=_ce, config=_config(num_draws=2, chain_batch=chain_batch))
    _same(stopped, short)
    record = stopped.diagnostics["time_limit"]
    assert record["applied"] and record["draws_after_stop"] == 2
    assert record["stopped_chains"] == ([0] if chain_batch == 1 else [0, 1, 2])
    assert stopped.diagnostics["num_draws_used"] == 3 * 2 and stopped.stderr is not None
    traces = torch.tensor(stopped.diagnostics["chain_mean_train_loss"])
    assert traces.shape == (3, 40) and torch.isfinite(traces[:, :2]).all() and torch.isnan(traces[:, 2:]).all()


def test_a_limit_not_reached_changes_nothing():
    model, train, query = _problem()
    limited = compute_bif(model, train, query, loss_fn=_ce, config=_config(time_limit=1e6))
    free = compute_bif(model, train, query, loss_fn=_ce, config=_config())
    _same(limited, free)
    assert limited.diagnostics["time_limit"]["stopped_chains"] == [] and free.diagnostics["time_limit"] is None
    assert limited.diagnostics["num_draws_used"] == 3 * 40


def test_the_lag1_estimator_keeps_two_pairs_before_a_stop():
    model, train, query = _problem()
    stopped = compute_bif(model, train, query, loss_fn=_ce, config=_config(time_limit=1e-9, estimator="lag1"))
    short = compute_bif(model, train, query, loss_fn=_ce, config=_config(num_draws=3, estimator="lag1"))
    _same(stopped, short)
    assert stopped.diagnostics["time_limit"]["draws_after_stop"] == 3


def test_a_checkpointed_run_ignores_the_limit_and_says_why(tmp_path):
    model, train, query = _problem()
    cfg = _config(time_limit=1e-9)
    res = compute_bif(model, train, query, loss_fn=_ce, config=cfg, checkpoint=tmp_path / "ckpt")
    free = compute_bif(model, train, query, loss_fn=_ce, config=dataclasses.replace(cfg, time_limit=None))
    _same(res, free)
    record = res.diagnostics["time_limit"]
    assert not record["applied"] and "checkpoint" in record["why_not"] and record["stopped_chains"] == []


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "10"])
def test_bad_time_limits_are_refused(bad):
    with pytest.raises(ValueError, match="time_limit"):
        _config(time_limit=bad)
