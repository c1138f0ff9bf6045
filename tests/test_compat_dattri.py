"""``bif_fast.compat.dattri.BIFAttributor`` against dattri 0.3.0 itself: its base class, its task, its LDS."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

pytest.importorskip("dattri", reason="dattri is not installed; the attributor is tested against it")

from dattri.algorithm.base import BaseAttributor  # noqa: E402
from dattri.algorithm.influence_function import IFAttributorExplicit  # noqa: E402
from dattri.metric import lds  # noqa: E402
from dattri.task import AttributionTask  # noqa: E402

from bif_fast import BIFConfig, SGLDConfig, compute_bif  # noqa: E402
from bif_fast.compat.dattri import BIFAttributor  # noqa: E402

N, D, M, WD = 60, 5, 16, 0.05  # training points, features, test points, the objective's weight decay


def _ridge(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The exact minimiser [w; b] of mean((x w + b - y)^2) + (WD / 2) |[w; b]|^2."""
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    lhs = 2 * xa.T @ xa / len(x) + WD * torch.eye(xa.shape[1], dtype=x.dtype)
    return torch.linalg.solve(lhs, 2 * xa.T @ y / len(x))


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N + M, D, generator=g, dtype=torch.float64)
    noise = torch.randn(N + M, generator=g, dtype=torch.float64)
    y = x @ torch.randn(D, generator=g, dtype=torch.float64) + 0.7 * noise
    model = torch.nn.Linear(D, 1)
    theta = _ridge(x[:N], y[:N])
    with torch.no_grad():
        model.weight.copy_(theta[:D].float()[None])
        model.bias.copy_(theta[D:].float())
    train = TensorDataset(x[:N].float(), y[:N].float())
    test = TensorDataset(x[N:].float(), y[N:].float())
    return model, train, test, (x, y)


def _task(model, checkpoints=None, target=None):
    def loss(params, data):  # dattri's convention: one example with a leading batch dimension of 1
        x, y = data
        pred = torch.func.functional_call(model, params, (x,)).squeeze(-1)
        return ((pred - y) ** 2).mean()

    return AttributionTask(loss_func=loss, model=model, target_func=target,
                           checkpoints=model.state_dict() if checkpoints is None else checkpoints)  # fmt: skip


def _config(seed: int = 0) -> BIFConfig:
    sgld = SGLDConfig(lr=0.05, nbeta=float(N), localization=1.0, sampler="baoab", friction=5.0)
    return BIFConfig(sgld=sgld, num_chains=2, num_draws=150, batch_size="full", seed=seed)


def _loader(data, **kw) -> DataLoader:
    return DataLoader(data, batch_size=kw.pop("batch_size", 16), shuffle=kw.pop("shuffle", False), **kw)


def _ground_truth(xy, subsets: int = 40, seed: int = 1):
    """dattri's LDS ground truth for the exact ridge re-fits on random halves: (-test losses, indices)."""
    x, y = xy
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(N, generator=g)[: N // 2] for _ in range(subsets)])
    values = []
    for idx in indices:
        theta = _ridge(x[idx], y[idx])
        pred = x[N:] @ theta[:D] + theta[D:]
        values.append(-((pred - y[N:]) ** 2))  # dattri flips the target: larger = better
    return torch.stack(values).float(), indices


def test_is_a_dattri_attributor_and_sign_matches_dattri_lds():
    model, train, test, xy = _problem()
    task = _task(model)
    attributor = BIFAttributor(task, budget_seconds=6.0)  # the calibrated defaults
    assert isinstance(attributor, BaseAttributor)
    attributor.cache(_loader(train, shuffle=True))  # the full set may shuffle: order does not matter there
    scores = attributor.attribute(_loader(train), _loader(test))
    assert scores.shape == (N, M) and bool(torch.isfinite(scores).all())
    gt = _ground_truth(xy)
    ours = float(lds(scores, gt)[0].mean())
    flipped = float(lds(-scores, gt)[0].mean())
    exact = IFAttributorExplicit(_task(model), regularization=WD)
    exact.cache(_loader(train))
    reference = float(lds(exact.attribute(_loader(train), _loader(test)).detach(), gt)[0].mean())
    assert reference > 0.5, reference  # the harness itself is informative
    assert ours > 0.5 and flipped < -0.5, (ours, flipped)
    assert ours > reference - 0.15, (ours, reference)
    assert attributor.results[0].diagnostics["calibration"]  # the defaults ran and say what they chose


@pytest.mark.parametrize("chain_batch", [1, 2], ids=["chains_one_by_one", "chains_under_vmap"])
@pytest.mark.parametrize("per_token", [False, True])
def test_scores_are_minus_compute_bif(per_token, chain_batch):
    model, train, test, _ = _problem()
    out = 3 if per_token else 1
    model = torch.nn.Linear(D, out)
    targets = lambda data: data[1][:, None].expand(-1, out)  # noqa: E731

    def loss(params, data):
        pred = torch.func.functional_call(model, params, (data[0],))
        per_position = ((pred - targets(data)) ** 2)[0]  # [out]
        return per_position if per_token else per_position.mean()

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    config = dataclasses.replace(_config(), chain_batch=chain_batch)  # the task's functional_call, nested in vmap
    attributor = BIFAttributor(task, config=config, per_token=per_token)
    attributor.cache(_loader(train))
    scores = attributor.attribute(_loader(train), _loader(test))
    assert attributor.results[0].diagnostics["chain_batch"] == chain_batch

    def loss_fn(m, batch):
        per_position = (m(batch[0]) - targets(batch)) ** 2
        return per_position if per_token else per_position.mean(1)

    res = compute_bif(model, train, test, loss_fn=loss_fn, config=config, per_token=per_token)
    assert scores.shape == res.bif.shape == ((N * out, M * out) if per_token else (N, M))
    torch.testing.assert_close(scores, -res.bif.float(), rtol=1e-4, atol=1e-6 * float(res.bif.abs().max()))


def test_target_function_gives_the_columns():
    model, train, test, _ = _problem()
    base = _task(model)
    doubled = _task(model, target=lambda params, data: 2 * base.original_loss_func(params, data))
    runs = []
    for task in (base, doubled):
        attributor = BIFAttributor(task, config=_config())
        attributor.cache(_loader(train))
        runs.append(attributor.attribute(_loader(train), _loader(test)))
    torch.testing.assert_close(runs[1], 2 * runs[0], rtol=1e-4, atol=1e-7)


def test_subset_rows_keep_the_full_posterior():
    model, train, test, _ = _problem()
    attributor = BIFAttributor(_task(model), config=_config())
    attributor.cache(_loader(train))
    full = attributor.attribute(_loader(train), _loader(test))
    rows = list(range(3, N, 4))
    part = attributor.attribute(_loader(Subset(train, rows), batch_size=7), _loader(test))
    assert part.shape == (len(rows), M)
    # The same chains (same noise, the full set's gradient), so the same rows up to rounding.
    torch.testing.assert_close(part, full[rows], rtol=1e-3, atol=1e-4 * float(full.abs().max()))


def test_checkpoints_average():
    model, train, test, _ = _problem()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    second = {k: v + 0.05 for k, v in first.items()}
    singles = []
    for ckpt in (first, second):
        attributor = BIFAttributor(_task(model, checkpoints=ckpt), config=_config())
        attributor.cache(_loader(train))
        singles.append(attributor.attribute(_loader(train), _loader(test)))
    both = BIFAttributor(_task(model, checkpoints=[first, second]), config=_config())
    both.cache(_loader(train))
    averaged = both.attribute(_loader(train), _loader(test))
    assert len(both.results) == 2
    assert not torch.allclose(singles[0], singles[1])
    torch.testing.assert_close(averaged, (singles[0] + singles[1]) / 2, rtol=1e-4, atol=1e-7)


def test_bad_input_is_refused():
    model, train, test, _ = _problem()
    with pytest.raises(ValueError, match="AttributionTask"):
        BIFAttributor(object())
    with pytest.raises(ValueError, match="BIFConfig"):
        BIFAttributor(_task(model), config={"num_draws": 10})
    attributor = BIFAttributor(_task(model), config=_config())
    attributor.cache(_loader(train))
    with pytest.raises(ValueError, match="train_dataloader shuffles"):
        attributor.attribute(_loader(train, shuffle=True), _loader(test))
    with pytest.raises(ValueError, match="test_dataloader shuffles"):
        attributor.attribute(_loader(train), _loader(test, shuffle=True))
    with pytest.raises(ValueError, match="empty"):
        attributor.attribute(_loader(Subset(train, [])), _loader(test))


def test_without_cache_the_train_loader_is_the_full_set():
    model, train, test, _ = _problem()
    attributor = BIFAttributor(_task(model), config=_config())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = attributor.attribute(_loader(train), _loader(test))
    assert any("cache was not called" in str(w.message) for w in caught)
    cached = BIFAttributor(_task(model), config=_config())
    cached.cache(_loader(train))
    torch.testing.assert_close(scores, cached.attribute(_loader(train), _loader(test)))
