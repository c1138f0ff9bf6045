"""compute_bif inside a torch.distributed process group: 2 and 3 gloo processes on loopback against one.

Each case spawns ``world`` processes that join a gloo group (file rendezvous in the test's tmp dir), call
``compute_bif`` with the same arguments, and write what they got; the parent runs the same call alone and
compares. Chains are split by global index (``c % world``), so the ranks run different numbers of chains
(5 chains over 2 or 3 ranks) and a rank's pool is merged with others that hold different counts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from bif_fast import BIFConfig, SGLDConfig, compute_bif
from tests.ranks import spawn_ranks

CHAINS = 5


def _problem(case: str):
    g = torch.Generator().manual_seed(7)
    if "token" in case:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        x, y = torch.randn(9, 6, 3, generator=g), torch.randn(9, 6, generator=g)
        train, query = TensorDataset(x[:6], y[:6]), TensorDataset(x[6:], y[6:])
    else:
        model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
        x, y = torch.randn(37, 3, generator=g), torch.randn(37, generator=g)
        train, query = TensorDataset(x[:30], y[:30]), TensorDataset(x[30:], y[30:])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, train, query


def _loss(model, batch):
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y).square()


def _config(case: str) -> BIFConfig:
    if case.startswith("shard"):  # rows split across the ranks, every chain on every rank
        sgld = SGLDConfig(lr=2e-3, nbeta=50.0, localization=20.0)
        if case.endswith("mass"):  # BAOAB with the curvature mass, its Lanczos over every rank's rows
            sgld = SGLDConfig(lr=0.02, nbeta=50.0, localization=20.0, sampler="baoab", friction=5.0,
                              mass="curvature", mass_rank=3)  # fmt: skip
        batch_size = "full" if case.startswith("shard_full") else 8
        per_update = 5 if "ckpt" in case else 32  # resumable cases: several accumulator updates (and writes) a chain
        # "time": far more draws than its time limit allows
        draws, limit = (100000, 1.0) if case.endswith("time") else (30, None)
        return BIFConfig(sgld=sgld, num_chains=3, num_draws=draws, num_steps_bw_draws=2, batch_size=batch_size,
                         seed=3, shard_rows=True, draws_per_update=per_update, time_limit=limit,
                         control_variate=case.endswith("cv"))  # fmt: skip
    if case.endswith("mass"):  # BAOAB with the curvature mass (computed on rank 0, broadcast), full batch
        sgld = SGLDConfig(lr=0.02, nbeta=50.0, localization=20.0, sampler="baoab", friction=5.0,
                          mass="curvature", mass_rank=3)  # fmt: skip
        return BIFConfig(sgld=sgld, num_chains=CHAINS, num_draws=30, batch_size="full", seed=3, chain_batch=2)
    sgld = SGLDConfig(lr=2e-3, nbeta=50.0, localization=20.0)
    # One chain at a time, so that loss_fn's calls count the chains a rank ran.
    return BIFConfig(sgld=sgld, num_chains=CHAINS, num_draws=30, num_steps_bw_draws=2, batch_size=8, seed=3,
                     chain_batch=1)  # fmt: skip


class _CountingLoss:
    def __init__(self):
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        return _loss(model, batch)


class _FailingLoss:
    """``_loss`` that raises on rank ``rank`` at its ``at``-th call (a crash mid-run on one rank only)."""

    def __init__(self, rank: int, at: int):
        self.rank, self.at, self.calls = rank, at, 0

    def __call__(self, model, batch):
        self.calls += 1
        if torch.distributed.get_rank() == self.rank and self.calls >= self.at:
            raise FloatingPointError(f"boom on rank {self.rank}")
        return _loss(model, batch)


def _worker(rank: int, world: int, tmp: str, case: str) -> dict:
    model, train, query = _problem(case)
    loss_fn = _CountingLoss()
    if case.startswith("fail"):
        loss_fn = _FailingLoss(rank=1, at=40) if case == "fail_sampling" else _FailingLoss(rank=world - 1, at=1)
    elif case == "ckpt_fail":  # rank 1 fails in its second chain, after its first was written
        loss_fn = _FailingLoss(rank=1, at=200)
    elif case in ("ckpt_done", "shard_ckpt_done"):  # a finished run: nothing may be evaluated again
        loss_fn = _FailingLoss(rank=rank, at=1)
    elif "_fail_" in case:  # "shard[_full]_fail_{at}": rank 1 alone fails at its call `at`
        loss_fn = _FailingLoss(rank=1, at=int(case.rsplit("_", 1)[1]))
    elif case == "shard_ckpt_stop":  # the whole job stops past the middle of its one group of 3 chains (every rank)
        loss_fn = _FailingLoss(rank=rank, at=100)
    if case == "mismatch" and rank == 1:  # a model initialised differently on one rank
        with torch.no_grad():
            model[0].weight.add_(1e-3)
    checkpoint = Path(tmp) / "ck" if case.startswith(("ckpt", "shard_ckpt")) else None
    if case.startswith("shard_ckpt"):
        os.environ["BIF_FAST_CHECKPOINT_SECONDS"] = "0"  # a write after every accumulator update
        checkpoint = Path(tmp) / ("ck_full" if case == "shard_ckpt_full" else "ck")
    res = compute_bif(model, train, query, loss_fn=loss_fn, config=_config(case),
                      per_token="token" in case, checkpoint=checkpoint)  # fmt: skip
    res.save(Path(tmp) / f"{case}-rank{rank}")
    out: dict = {"loss_calls": loss_fn.calls}
    if case.startswith("shard"):  # across the shards: every rank calls it
        values, rows = res.topk(3, normalized=False)
        out["topk"] = [values.tolist(), rows.tolist()]
    out["time_limit"] = res.diagnostics["time_limit"]
    return out


def _spawn(tmp_path: Path, world: int, case: str) -> list[dict]:
    return spawn_ranks(_worker, world, tmp_path, case)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ["sample", "token", "sample_mass"])
def test_every_rank_returns_the_single_process_result(tmp_path, world, case):
    from bif_fast import BIFResult

    torch.set_num_threads(1)
    model, train, query = _problem(case)
    counting = _CountingLoss()
    alone = compute_bif(model, train, query, loss_fn=counting, config=_config(case), per_token=case == "token")
    statuses = _spawn(tmp_path, world, case)
    assert all(s["ok"] for s in statuses), statuses
    if alone.diagnostics["chain_batch"] == 1:  # each rank ran its share of the chains (rank 0: ceil(5 / world))
        assert max(s["loss_calls"] for s in statuses) < 0.75 * counting.calls, (statuses, counting.calls)
    scale = alone.bif.abs().max()
    for rank in range(world):
        got = BIFResult.load(tmp_path / f"{case}-rank{rank}")
        assert got.diagnostics["world_size"] == world
        assert got.diagnostics["num_draws_used"] == alone.diagnostics["num_draws_used"] == CHAINS * 30
        assert got.diagnostics["num_chains_used"] == CHAINS
        torch.testing.assert_close(got.bif, alone.bif, rtol=1e-4, atol=1e-5 * float(scale))
        torch.testing.assert_close(got.bif_normalized, alone.bif_normalized, rtol=1e-4, atol=1e-5)
        assert got.stderr is not None and alone.stderr is not None
        torch.testing.assert_close(got.stderr, alone.stderr, rtol=1e-3, atol=1e-5 * float(scale))
        # Every chain's trace arrived, from whichever rank ran it.
        torch.testing.assert_close(torch.tensor(got.diagnostics["chain_mean_train_loss"]),
                                   torch.tensor(alone.diagnostics["chain_mean_train_loss"]), rtol=1e-4,
                                   atol=1e-6)  # fmt: skip
        if case == "token":
            assert torch.equal(got.train_index, alone.train_index)


@pytest.mark.parametrize("case", ["fail_sampling", "fail_setup"])
def test_a_failing_rank_fails_every_rank_with_its_error(tmp_path, case):
    world = 3
    statuses = _spawn(tmp_path, world, case)
    failed = 1 if case == "fail_sampling" else world - 1
    assert statuses[failed]["type"] == "FloatingPointError" and f"boom on rank {failed}" in statuses[failed]["message"]
    for rank in range(world):
        if rank != failed:
            assert statuses[rank]["type"] == "RankFailure", statuses[rank]
            assert statuses[rank]["rank"] == failed
            assert f"rank {failed} of {world} failed" in statuses[rank]["message"]
            assert "boom" in statuses[rank]["message"]
        assert not (tmp_path / f"{case}-rank{rank}").exists()  # nothing half-written


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ["shard_sample", "shard_token", "shard_full", "shard_full_mass", "shard_sample_cv",
                                  "shard_token_cv"])
def test_row_shards_put_together_are_the_single_process_result(tmp_path, world, case):
    """shard_rows: every rank holds its rows of the BIF (global indices in train_rows), runs every chain with
    the gradient summed across the ranks, and topk across the shards is the single process's."""
    from bif_fast import BIFResult

    torch.set_num_threads(1)
    model, train, query = _problem(case)
    per_token = "token" in case
    alone = compute_bif(model, train, query, loss_fn=_loss, config=_config(case), per_token=per_token)
    statuses = _spawn(tmp_path, world, case)
    assert all(s["ok"] for s in statuses), statuses
    shards = [BIFResult.load(tmp_path / f"{case}-rank{r}") for r in range(world)]
    rows = torch.cat([sh.train_rows for sh in shards])
    assert torch.equal(rows, torch.arange(alone.bif.shape[0]))  # contiguous slices, in rank order, all rows
    assert min(sh.bif.shape[0] for sh in shards) > 0
    scale = float(alone.bif.abs().max())
    # The mass's Hessian-vector products are differences of gradients over 2e-3 x the weights: the ranks' sum
    # of the gradient rounds differently, and the difference carries that rounding up ~500-fold.
    loose = 10.0 if case.endswith("mass") else 1.0
    for name in ("bif", "bif_normalized", "stderr"):
        got = torch.cat([getattr(sh, name) for sh in shards])
        tol = loose * (1e-5 if name == "bif_normalized" else 1e-5 * scale)
        torch.testing.assert_close(got, getattr(alone, name), rtol=1e-3, atol=tol)
    if per_token:
        assert torch.equal(torch.cat([sh.train_index for sh in shards]), alone.train_index)
    # The shards batch their chains as one process does.
    assert alone.diagnostics["chain_batch"] == 3
    for sh in shards:
        assert sh.diagnostics["chain_batch"] == 3
        assert sh.diagnostics["num_draws_used"] == alone.diagnostics["num_draws_used"]
        torch.testing.assert_close(torch.tensor(sh.diagnostics["chain_mean_train_loss"]),
                                   torch.tensor(alone.diagnostics["chain_mean_train_loss"]), rtol=1e-4,
                                   atol=1e-6)  # fmt: skip
    values, idx = alone.topk(3, normalized=False)
    for s in statuses:  # every rank got the global top 3 from the shards' candidates
        torch.testing.assert_close(torch.tensor(s["topk"][0]), values, rtol=1e-3, atol=1e-5 * scale)
        assert torch.equal(torch.tensor(s["topk"][1]), idx)


def test_row_shards_stop_together_at_their_time_limit(tmp_path):
    """A time limit under row shards: the ranks stop at the same draw (the first past the limit on any
    rank), and the shards are one process's run of that many draws (full batch: the 3 chains are one
    group, so every chain stops there)."""
    import dataclasses

    from bif_fast import BIFResult

    torch.set_num_threads(1)
    case = "shard_full_time"
    statuses = _spawn(tmp_path, 2, case)
    assert all(s["ok"] for s in statuses), statuses
    limits = [s["time_limit"] for s in statuses]
    assert limits[0] == {**limits[1], "seconds": limits[0]["seconds"]} and limits[0]["applied"]
    draws = limits[0]["draws_after_stop"]
    assert limits[0]["stopped_chains"] and 2 <= draws < _config(case).num_draws
    model, train, query = _problem(case)
    alone = compute_bif(model, train, query, loss_fn=_loss, config=dataclasses.replace(_config(case), num_draws=draws,
                                                                                       time_limit=None))  # fmt: skip
    shards = [BIFResult.load(tmp_path / f"{case}-rank{r}") for r in range(2)]
    assert all(sh.diagnostics["num_draws_used"] == 3 * draws for sh in shards)
    scale = float(alone.bif.abs().max())
    torch.testing.assert_close(torch.cat([sh.bif for sh in shards]), alone.bif, rtol=1e-3, atol=1e-5 * scale)


def test_a_distributed_run_resumes_from_its_checkpoint(tmp_path):
    from bif_fast import BIFResult

    torch.set_num_threads(1)
    world = 2
    model, train, query = _problem("sample")
    alone = compute_bif(model, train, query, loss_fn=_loss, config=_config("sample"))
    failed = _spawn(tmp_path, world, "ckpt_fail")
    assert [s["ok"] for s in failed] == [False, False] and failed[0]["type"] == "RankFailure"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["state-rank0-of-2.safetensors",
                                                                   "state-rank1-of-2.safetensors"]  # fmt: skip
    resumed = _spawn(tmp_path, world, "ckpt")
    assert all(s["ok"] for s in resumed), resumed
    assert resumed[0]["loss_calls"] < 10  # rank 0 had finished its chains: it only set up and merged
    for rank in range(world):
        got = BIFResult.load(tmp_path / f"ckpt-rank{rank}")
        torch.testing.assert_close(got.bif, alone.bif, rtol=1e-4, atol=1e-5 * float(alone.bif.abs().max()))
        torch.testing.assert_close(got.stderr, alone.stderr, rtol=1e-3, atol=1e-5 * float(alone.bif.abs().max()))
    done = _spawn(tmp_path, world, "ckpt_done")
    assert all(s["ok"] and s["loss_calls"] == 0 for s in done), done
    for rank in range(world):
        assert torch.equal(BIFResult.load(tmp_path / f"ckpt_done-rank{rank}").bif,
                           BIFResult.load(tmp_path / "ckpt-rank0").bif)  # fmt: skip


@pytest.mark.parametrize("case", ["shard_fail_3", "shard_fail_60", "shard_fail_61", "shard_fail_62", "shard_fail_63",
                                  "shard_full_fail_60", "shard_full_fail_61"])  # fmt: skip
def test_a_rank_failing_inside_a_row_sharded_chain_fails_every_rank(tmp_path, case):
    """Row shards run in lockstep (every step sums the gradient over the ranks): a rank whose loss_fn raises
    in an evaluation or an SGLD step (the calls chosen here fall on both) makes every rank raise at the end of
    that step, the others a RankFailure naming it, instead of leaving them waiting in the next collective."""
    statuses = _spawn(tmp_path, 2, case)
    assert [s["ok"] for s in statuses] == [False, False], statuses
    assert statuses[1]["type"] == "FloatingPointError" and "boom on rank 1" in statuses[1]["message"]
    assert statuses[0]["type"] == "RankFailure" and "rank 1 of 2 failed" in statuses[0]["message"]


def test_a_row_sharded_run_resumes_in_lockstep_exactly(tmp_path):
    """shard_rows with checkpoint=: the ranks write at the same draws, so a job stopped inside a chain resumes
    on every rank from the same draw, even when a kill cut one rank's last write short (here rank 1's state
    rolled back one generation: both resume from the generation both hold), and every shard equals the
    uninterrupted run's bit for bit; a finished run returns its shards without evaluating anything."""
    import shutil

    from bif_fast import BIFResult

    torch.set_num_threads(1)
    world = 2
    full = _spawn(tmp_path, world, "shard_ckpt_full")
    assert all(s["ok"] for s in full), full
    stopped = _spawn(tmp_path, world, "shard_ckpt_stop")
    assert [s["ok"] for s in stopped] == [False, False], stopped
    ck = tmp_path / "ck"
    assert sorted(p.name for p in ck.iterdir()) == [
        "prev-state-rank0-of-2.safetensors", "prev-state-rank1-of-2.safetensors",
        "state-rank0-of-2.safetensors", "state-rank1-of-2.safetensors"]  # fmt: skip
    shutil.copy(ck / "prev-state-rank1-of-2.safetensors", ck / "state-rank1-of-2.safetensors")
    resumed = _spawn(tmp_path, world, "shard_ckpt")
    assert all(s["ok"] for s in resumed), resumed
    assert resumed[0]["loss_calls"] < full[0]["loss_calls"] - 50  # the draws before the stop were not redone
    done = _spawn(tmp_path, world, "shard_ckpt_done")
    assert all(s["ok"] and s["loss_calls"] == 0 for s in done), done
    for rank in range(world):
        want = BIFResult.load(tmp_path / f"shard_ckpt_full-rank{rank}")
        for case in ("shard_ckpt", "shard_ckpt_done"):
            got = BIFResult.load(tmp_path / f"{case}-rank{rank}")
            for name in ("bif", "bif_normalized", "stderr", "train_rows"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (case, rank, name)
    assert (ck / "result-rank1-of-2").is_dir()


def test_ranks_given_different_models_are_refused(tmp_path):
    statuses = _spawn(tmp_path, 2, "mismatch")
    for s in statuses:
        assert s["type"] == "ValueError" and "param_checksums on rank 1" in s["message"], s


def test_outside_a_process_group_nothing_changes():
    from bif_fast.engine.distributed import Ranks

    assert not torch.distributed.is_initialized()
    ranks = Ranks.current()
    assert (ranks.rank, ranks.world, ranks.active) == (0, 1, False)
    assert ranks.chains(4) == [0, 1, 2, 3]
    assert Ranks(1, 3).chains(7) == [1, 4]
    with pytest.raises(KeyError):
        ranks.raise_if_any_failed(KeyError("x"))
    ranks.raise_if_any_failed(None)
    assert ranks.from_root(lambda: 5) == 5


def test_shard_rows_refuses_what_it_does_not_combine_with(tmp_path):
    import dataclasses

    model, train, query = _problem("sample")
    config = _config("shard_sample")
    loader = torch.utils.data.DataLoader(train, batch_size=8)
    with pytest.raises(ValueError, match="pass a Dataset, not a DataLoader"):
        compute_bif(model, loader, query, loss_fn=_loss, config=config)
    assert not (tmp_path / "state-rank0-of-1.safetensors").exists()
    # Outside a process group the option changes nothing: every row is here.
    alone = compute_bif(model, train, query, loss_fn=_loss, config=dataclasses.replace(config, shard_rows=False))
    same = compute_bif(model, train, query, loss_fn=_loss, config=config)
    assert same.train_rows is None and torch.equal(same.bif, alone.bif)
