"""The calibrated defaults inside a torch.distributed process group, on 2 gloo processes against one.

``compute_bif(config=None)``: rank 0 calibrates while the others wait, then the chains are split. Under
``calibrate(..., shard_rows=True)`` every rank holds a slice of the training rows and the calibration runs on
every rank together (its Hessian-vector products, re-fits and pilots sum the ranks' gradients, its times are
rank 0's): every rank must choose the settings one process chooses, and the sharded run with them must give
one process's BIF. The model is the ridge-regression oracle of ``test_calibration``, per sample and per token.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import bif_fast.calibration as calibration
from bif_fast import BIFConfig, BIFResult, calibrate, compute_bif
from tests.ranks import spawn_ranks
from tests.test_calibration import WD, _ridge, _sq

BUDGET = 60.0  # seconds: long enough that every length is at its cap (below) on both sides, even under load
CAPS = {"MAX_DRAWS": 400, "REFITS": 8, "REFIT_STEPS": 40}  # test_calibration's short runs
SHARDED_DRAWS = 60  # draws per chain of the sharded run with the calibrated settings


def _short_runs() -> None:
    for name, value in CAPS.items():
        setattr(calibration, name, value)


def _ridge_tokens(seed: int = 1, n: int = 30, t: int = 3, d: int = 4):
    """Ridge regression with ``t`` observations a sequence, each a unit; w* minimises the mean over every
    observation of 1/2 (x w - y)^2 + WD/2 |w|^2."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([3.0, 1.5, 0.8, 0.4], dtype=torch.float64)[:d]
    x = torch.randn(n + 6, t, d, generator=g, dtype=torch.float64) * scales
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n + 6, t, generator=g,
                                                                                  dtype=torch.float64)  # fmt: skip
    flat, target = x[:n].reshape(-1, d), y[:n].reshape(-1)
    h = flat.T @ flat / flat.shape[0]
    w_star = torch.linalg.solve(h + WD * torch.eye(d, dtype=torch.float64), flat.T @ target / flat.shape[0])
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_star.float()[None])
    return model, TensorDataset(x[:n].float(), y[:n].float()), TensorDataset(x[n:].float(), y[n:].float())


def _sq_tokens(model, batch):
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y).square()


class _MixedRidge(torch.nn.Module):
    """The ridge model with a bf16 offset beside its fp32 weight (sampled weights of two dtypes)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear
        self.offset = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.offset.float()


def _problem(case: str):
    if "token" in case:
        return (*_ridge_tokens(), _sq_tokens)
    model, train, query, *_ = _ridge()
    if "mixed" in case:
        model = _MixedRidge(model)
    return model, train, query, _sq


def _sharded_config(cfg: BIFConfig) -> BIFConfig:
    return dataclasses.replace(cfg, num_draws=SHARDED_DRAWS, time_limit=None)


class _FailingOnQuery:
    """``loss_fn`` that raises on rank 1 at its ``at``-th call on the query set (the 2nd: the probe's first
    re-fit evaluating the queries; later ones: the pilots' draws)."""

    def __init__(self, loss_fn, query_rows: int, at: int):
        self.loss_fn, self.query_rows, self.at, self.calls = loss_fn, query_rows, at, 0

    def __call__(self, model, batch):
        if batch[0].shape[0] == self.query_rows:
            self.calls += 1
            if torch.distributed.get_rank() == 1 and self.calls >= self.at:
                raise FloatingPointError("boom on rank 1")
        return self.loss_fn(model, batch)


def _worker(rank: int, world: int, tmp: str, case: str) -> dict:
    _short_runs()
    model, train, query, loss_fn = _problem(case)
    if "fail" in case:  # "[everywhere_]fail_{at}"
        loss_fn = _FailingOnQuery(loss_fn, len(query), int(case.rsplit("_", 1)[1]))
    per_token = "token" in case
    if case == "defaults":
        res = compute_bif(model, train, query, loss_fn=loss_fn)
        res.save(Path(tmp) / f"{case}-rank{rank}")
        return {"config": res.config.to_dict()}
    if case.startswith("everywhere"):  # calibrate called on every rank, chains split: the pilots' too
        return {"config": calibrate(model, train, query, loss_fn=loss_fn, budget_seconds=BUDGET).to_dict()}
    cfg = calibrate(model, train, query, loss_fn=loss_fn, per_token=per_token, budget_seconds=BUDGET, shard_rows=True)
    res = compute_bif(model, train, query, loss_fn=loss_fn, per_token=per_token, config=_sharded_config(cfg))
    res.save(Path(tmp) / f"{case}-rank{rank}")
    return {"config": cfg.to_dict()}


def _configs(statuses: list[dict]) -> list[BIFConfig]:
    assert all(s["ok"] for s in statuses), statuses
    return [BIFConfig.from_dict(json.loads(json.dumps(s["config"]))) for s in statuses]


def test_calibrated_defaults_in_a_process_group_are_chosen_on_rank_0_for_every_rank(tmp_path):
    """config=None under torchrun: rank 0 calibrates alone (its pilots see a group of one) and every rank
    samples its chains with rank 0's settings; every rank returns the same pooled BIF, that of one process
    with those settings."""
    statuses = spawn_ranks(_worker, 2, tmp_path, "defaults")
    configs = _configs(statuses)
    assert configs[0] == configs[1] and configs[0].calibration is not None
    got = [BIFResult.load(tmp_path / f"defaults-rank{r}") for r in range(2)]
    assert torch.equal(got[0].bif, got[1].bif) and got[0].diagnostics["world_size"] == 2
    assert got[0].diagnostics["calibration"]["damping"] == configs[0].calibration["damping"]
    model, train, query, loss_fn = _problem("defaults")
    # One process with the same settings (no time limit, which the ranks do not apply). The mass is rebuilt
    # from the config by the same seeded Lanczos, whose float32 products let the chains drift ~1e-6 apart.
    alone = compute_bif(model, train, query, loss_fn=loss_fn, config=dataclasses.replace(configs[0], time_limit=None))
    scale = float(alone.bif.abs().max())
    torch.testing.assert_close(got[0].bif, alone.bif, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("at", [2, 12])
def test_a_rank_failing_inside_the_sharded_calibration_fails_every_rank(tmp_path, at):
    """Rank 1's loss_fn raising on the queries, in the probe's first re-fit (at=2) or in a pilot (at=12):
    every rank raises at the end of that step (rank 0 a RankFailure naming rank 1), none waits."""
    statuses = spawn_ranks(_worker, 2, tmp_path, f"fail_{at}")
    assert statuses[1]["type"] == "FloatingPointError" and "boom on rank 1" in statuses[1]["message"], statuses
    assert statuses[0]["type"] == "RankFailure" and "rank 1 of 2 failed" in statuses[0]["message"], statuses


def test_a_rank_failing_in_calibrate_on_every_rank_fails_every_rank(tmp_path):
    """calibrate() on every rank without shard_rows: rank 1 raising in the probe (which it runs alone, over
    every row) makes rank 0 raise a RankFailure at the next agreement instead of waiting there."""
    statuses = spawn_ranks(_worker, 2, tmp_path, "everywhere_fail_2")
    assert statuses[1]["type"] == "FloatingPointError", statuses
    assert statuses[0]["type"] == "RankFailure" and "rank 1 of 2 failed" in statuses[0]["message"], statuses


def test_sharded_calibration_of_weights_of_two_dtypes(tmp_path):
    """An fp32 weight and a bf16 offset sampled together: the probe's summed gradients go back in each
    weight's dtype, and every rank returns the same config."""
    configs = _configs(spawn_ranks(_worker, 2, tmp_path, "shard_mixed"))
    assert configs[0] == configs[1] and configs[0].shard_rows
    assert configs[0].calibration["curvature"]["mass_rank"] == 0  # the mass needs fp32 weights: unit mass


def test_calibrate_on_every_rank_returns_one_config(tmp_path):
    """calibrate() called on every rank of a group (no shard_rows): the pilots split their chains across the
    ranks and every time measured is rank 0's, so every rank returns the same settings."""
    configs = _configs(spawn_ranks(_worker, 2, tmp_path, "everywhere"))
    assert configs[0] == configs[1] and not configs[0].shard_rows
    assert configs[0].calibration["length"]["draws"] == configs[0].num_draws


@pytest.mark.parametrize("case", ["shard_sample", "shard_token"])
def test_calibration_over_row_shards_chooses_what_one_process_chooses(tmp_path, monkeypatch, case):
    for name, value in CAPS.items():
        monkeypatch.setattr(calibration, name, value)
    model, train, query, loss_fn = _problem(case)
    per_token = "token" in case
    alone = calibrate(model, train, query, loss_fn=loss_fn, per_token=per_token, budget_seconds=BUDGET)
    configs = _configs(spawn_ranks(_worker, 2, tmp_path, case))
    assert configs[0] == configs[1]  # every rank the same settings, the record of every time measured included
    got = configs[0]
    assert got.shard_rows and not alone.shard_rows
    cal, ref = got.calibration, alone.calibration
    # The same choices from the same curvature, weight decay and probe (up to the rounding of the ranks' sums).
    big = calibration.NBETA_PER_SEQUENCE * len(train)  # of every rank's sequences, not this rank's
    assert cal["nbeta"]["value"] == ref["nbeta"]["value"] and cal["nbeta"]["value"] in (big, big * 0.01)
    assert cal["damping"]["value"] == pytest.approx(ref["damping"]["value"], rel=1e-3)
    assert cal["curvature"]["lam_max"] == pytest.approx(ref["curvature"]["lam_max"], rel=1e-3)
    assert cal["curvature"]["implied_weight_decay"]["value"] == pytest.approx(WD, rel=1e-2)
    for key in ("lr", "friction", "localization", "weight_decay"):
        assert getattr(got.sgld, key) == pytest.approx(getattr(alone.sgld, key), rel=1e-3), key
    assert got.sgld.mass == alone.sgld.mass == "curvature" and got.sgld.mass_rank == alone.sgld.mass_rank
    assert got.num_draws == alone.num_draws == CAPS["MAX_DRAWS"]
    assert cal["probe"]["pilot_draws"] == ref["probe"]["pilot_draws"] == calibration.PILOT_DRAWS
    assert cal["probe"]["steps"] == ref["probe"]["steps"] == CAPS["REFIT_STEPS"]
    scores = [[c["probe_lds"] for c in row["candidates"]] for row in (cal, ref)]
    assert len(scores[0]) == len(scores[1]) and None not in scores[0]
    torch.testing.assert_close(torch.tensor(scores[0]), torch.tensor(scores[1]), rtol=0, atol=1e-2)
    # The sharded run with those settings: its shards put together are one process's BIF with them.
    shards = [BIFResult.load(tmp_path / f"{case}-rank{r}") for r in range(2)]
    ref_run = compute_bif(model, train, query, loss_fn=loss_fn, per_token=per_token, config=_sharded_config(got))
    assert torch.equal(torch.cat([sh.train_rows for sh in shards]), torch.arange(ref_run.bif.shape[0]))
    scale = float(ref_run.bif.abs().max())
    torch.testing.assert_close(torch.cat([sh.bif for sh in shards]), ref_run.bif, rtol=1e-3, atol=1e-4 * scale)
    if per_token:
        assert torch.equal(torch.cat([sh.train_index for sh in shards]), ref_run.train_index)
