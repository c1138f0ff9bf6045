"""FSDP2-sharded sampling (``fully_shard`` on 2 and 3 gloo processes) against the unsharded sampler.

The sampler updates each rank's local piece of every ``DTensor`` with the noise of each element keyed by its
index in the unsharded flattening, so the gathered weights after any number of steps are the unsharded
chain's. The shapes shard unevenly (7 rows over 3 ranks are 3 + 3 + 1, 2 rows leave rank 2 nothing).
"""

from __future__ import annotations

import pytest
import torch

from bif_fast import SGLD, SGLDConfig
from tests.ranks import spawn_ranks

pytest.importorskip("torch.distributed.fsdp")

STEPS = 6
CONFIGS = {
    "sgld": SGLDConfig(lr=1e-2, nbeta=30.0, localization=10.0),
    "rmsprop": SGLDConfig(lr=1e-2, nbeta=30.0, localization=10.0, precondition="rmsprop"),
    "baoab": SGLDConfig(lr=1e-2, nbeta=30.0, localization=10.0, sampler="baoab", friction=3.0),
}


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2), torch.nn.Tanh(),
                                torch.nn.Linear(2, 3))  # fmt: skip
    return model.to(dtype)


def _data(dtype: torch.dtype):
    g = torch.Generator().manual_seed(5)
    return torch.randn(12, 5, generator=g).to(dtype), torch.randn(12, 3, generator=g).to(dtype)


def _steps(model, opt, x, y, rows: slice, scale: float) -> list[float]:
    """STEPS sampler steps on the mean squared error over all 12 rows, of which this process computes
    ``rows`` (its sum over the global count, times ``scale`` to undo FSDP's mean over the ranks)."""
    distances = []
    for _ in range(STEPS):
        opt.zero_grad()
        ((model(x[rows]) - y[rows]).square().sum() / x.shape[0] * scale).backward()
        opt.step()
        distances.append(float(opt.distance()))
    return distances


def _sharded_worker(rank: int, world: int, tmp: str, case: str) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    name, dtype_name, split = case.split("-")
    dtype = getattr(torch, dtype_name)
    model = _model(dtype)
    # bf16 gradients reduced in fp32: the mean of equal gradients is then exactly each of them.
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    opt = SGLD(model.parameters(), CONFIGS[name], seed=4, chain=2)
    x, y = _data(dtype)
    # "rows": each rank its rows of the batch, as data parallelism does; "same": every rank the whole batch.
    rows = slice(rank, None, world) if split == "rows" else slice(None)
    distances = _steps(model, opt, x, y, rows, float(world) if split == "rows" else 1.0)
    full = [p.full_tensor().double().tolist() for p in model.parameters()]
    return {"params": full, "distances": distances, "diverged": opt.diverged,
            "local": [list(p.to_local().shape) for p in model.parameters()]}  # fmt: skip


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp_sharded_sampling_is_the_unsharded_chain(tmp_path, world, name, dtype):
    torch.set_num_threads(1)
    model = _model(getattr(torch, dtype))
    opt = SGLD(model.parameters(), CONFIGS[name], seed=4, chain=2)
    x, y = _data(getattr(torch, dtype))
    distances = _steps(model, opt, x, y, slice(None), 1.0)
    start = _model(getattr(torch, dtype)).parameters()
    pairs = zip(model.parameters(), start, strict=True)
    moved = sum(float((p.detach().double() - q.detach().double()).abs().max()) for p, q in pairs)
    assert moved > 1e-2  # the chain went somewhere, so agreeing with it means something
    # Ranks given the same batch average equal gradients exactly (fp32 with two ranks; bf16 reduced in fp32),
    # so the chains agree bit for bit. A bf16 gradient summed from rows in another order moves a weight by
    # rounding, which RMSprop amplifies in a few steps (to 0.04 in one process too, accumulating two halves of
    # the batch), so bf16 runs the same batch; fp32 with three ranks splits the rows, as data parallelism does.
    exact = world == 2 or dtype == "bfloat16"
    split = "same" if exact else "rows"
    statuses = spawn_ranks(_sharded_worker, world, tmp_path, f"{name}-{dtype}-{split}")
    assert all(s["ok"] for s in statuses), statuses
    if world == 3:
        assert statuses[2]["local"][2] == [0, 7]  # the 2-row weight has no rows on rank 2
    tol = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-5, "atol": 1e-6}
    for s in statuses:
        assert not s["diverged"]
        for got, want in zip(s["params"], model.parameters(), strict=True):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want.detach().double(), **tol)
        torch.testing.assert_close(torch.tensor(s["distances"]), torch.tensor(distances),
                                   rtol=1e-5 if dtype == "float32" else 2e-2, atol=1e-7)  # fmt: skip


def _bif_worker(rank: int, world: int, tmp: str, case: str) -> dict:
    from pathlib import Path

    from torch.distributed.fsdp import fully_shard

    from bif_fast import compute_bif
    from tests.test_distributed import _config, _loss, _problem

    model, train, query = _problem(case)
    fully_shard(model[0])
    fully_shard(model)
    before = [p.full_tensor().clone() for p in model.parameters()]
    res = compute_bif(model, train, query, loss_fn=_loss, config=_config(case), per_token="token" in case)
    res.save(Path(tmp) / f"{case}-rank{rank}")
    restored = all(torch.equal(p.full_tensor(), q) for p, q in zip(model.parameters(), before, strict=True))
    values, rows = res.topk(3, normalized=False)
    return {"restored": restored, "topk": [values.tolist(), rows.tolist()]}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ["shard_sample", "shard_token", "shard_full"])
def test_compute_bif_of_an_fsdp_model_is_the_unsharded_result(tmp_path, world, case):
    """compute_bif on a model sharded with fully_shard (shard_rows: every rank its rows and every chain, the
    gradient reduced by FSDP's backward) equals one process's unsharded run, and leaves w* in place."""
    from bif_fast import BIFResult, compute_bif
    from tests.test_distributed import _config, _loss, _problem

    torch.set_num_threads(1)
    model, train, query = _problem(case)
    alone = compute_bif(model, train, query, loss_fn=_loss, config=_config(case), per_token="token" in case)
    statuses = spawn_ranks(_bif_worker, world, tmp_path, case)
    assert all(s["ok"] for s in statuses), statuses
    assert all(s["restored"] for s in statuses)
    shards = [BIFResult.load(tmp_path / f"{case}-rank{r}") for r in range(world)]
    assert torch.equal(torch.cat([sh.train_rows for sh in shards]), torch.arange(alone.bif.shape[0]))
    scale = float(alone.bif.abs().max())
    for name in ("bif", "bif_normalized", "stderr"):
        got = torch.cat([getattr(sh, name) for sh in shards])
        torch.testing.assert_close(got, getattr(alone, name), rtol=1e-3,
                                   atol=1e-5 if name == "bif_normalized" else 1e-5 * scale)  # fmt: skip
    for sh in shards:
        got, want = (torch.tensor(r.diagnostics["rms_distance_from_w_star"]) for r in (sh, alone))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    values, idx = alone.topk(3, normalized=False)
    for s in statuses:
        assert torch.equal(torch.tensor(s["topk"][1]), idx)


@pytest.mark.parametrize(("case", "says"), [("refuse", "shard_rows=True"), ("refuse_mass", "mass='curvature'"),
                                            ("refuse_cv", "control_variate"),
                                            ("refuse_calibrate", "FSDP-sharded model")])  # fmt: skip
def test_what_an_fsdp_model_does_not_take_is_refused_on_every_rank(tmp_path, case, says):
    """Without shard_rows; with the curvature mass; calibrated over row shards (its re-fits and
    Hessian-vector products differentiate the whole weights)."""
    statuses = spawn_ranks(_refusal_worker, 2, tmp_path, case)
    for s in statuses:
        assert s["type"] == "ValueError" and says in s["message"], s


def _refusal_worker(rank: int, world: int, tmp: str, case: str) -> dict:
    import dataclasses

    from torch.distributed.fsdp import fully_shard

    from bif_fast import calibrate, compute_bif
    from tests.test_distributed import _config, _loss, _problem

    model, train, query = _problem("shard_sample")
    fully_shard(model)
    if case == "refuse_calibrate":
        calibrate(model, train, query, loss_fn=_loss, shard_rows=True)
    config = {"refuse_mass": _config("shard_full_mass"), "refuse_cv": _config("shard_sample_cv")}.get(
        case, dataclasses.replace(_config("shard_sample"), shard_rows=False))
    compute_bif(model, train, query, loss_fn=_loss, config=config)
    return {}


def _ckpt_worker(rank: int, world: int, tmp: str, case: str) -> dict:
    import os
    from pathlib import Path

    from torch.distributed.fsdp import fully_shard

    from bif_fast import compute_bif
    from tests.test_distributed import _config, _FailingLoss, _loss, _problem

    os.environ["BIF_FAST_CHECKPOINT_SECONDS"] = "0"  # a write after every accumulator update
    model, train, query = _problem("shard_sample")
    fully_shard(model[0])
    fully_shard(model)
    before = [p.full_tensor().clone() for p in model.parameters()]
    loss_fn = _FailingLoss(rank=rank, at=200) if case == "stop" else _loss
    path = Path(tmp) / ("ck_full" if case == "full" else "ck")
    out = {}
    try:
        res = compute_bif(model, train, query, loss_fn=loss_fn, config=_config("shard_ckpt"), checkpoint=path)
        res.save(Path(tmp) / f"{case}-rank{rank}")
    except Exception as e:
        out["error"] = type(e).__name__
    out["restored"] = all(torch.equal(p.full_tensor(), q) for p, q in zip(model.parameters(), before, strict=True))
    return out


def test_an_fsdp_run_stopped_inside_a_chain_resumes_exactly(tmp_path):
    """An FSDP-sharded run with checkpoint=: stopped inside the second chain (w* still put back in the shards),
    resumed, it gives every rank's rows bit for bit as the uninterrupted run does."""
    from bif_fast import BIFResult

    torch.set_num_threads(1)
    runs = {case: spawn_ranks(_ckpt_worker, 2, tmp_path, case) for case in ("full", "stop", "resume")}
    assert all(s["ok"] and s["restored"] for ss in runs.values() for s in ss), runs
    assert [s.get("error") for s in runs["stop"]] == ["FloatingPointError"] * 2  # each rank its own error
    assert "error" not in runs["full"][0] and "error" not in runs["resume"][0]
    for rank in range(2):
        got, want = (BIFResult.load(tmp_path / f"{c}-rank{rank}") for c in ("resume", "full"))
        for name in ("bif", "bif_normalized", "stderr", "train_rows"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (rank, name)
