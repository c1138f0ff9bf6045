"""compute_bif(..., checkpoint=PATH): an interrupted run resumes to exactly the uninterrupted result; a
finished one returns its result at once; another run's or a damaged checkpoint is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bif_fast import BIFConfig, SGLDConfig, compute_bif

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import _config, _loss, _problem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class _Crash:
    """``_loss`` that raises at its ``at``-th call (a run killed part way); counts its calls."""

    def __init__(self, at: int | None = None):
        self.at, self.calls = at, 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.at is not None and self.calls >= self.at:
            raise RuntimeError("interrupted")
        return _loss(model, batch)


def _state(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path / "state-rank0-of-1.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["bif_fast"])


def _assert_same(a, b):
    assert torch.equal(a.bif, b.bif)
    assert torch.equal(a.bif_normalized, b.bif_normalized)
    assert (a.stderr is None) == (b.stderr is None)
    if a.stderr is not None:
        assert torch.equal(a.stderr, b.stderr)


@pytest.mark.parametrize("case", ["sample", "token", "sample_mass"])
def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_result(tmp_path, case):
    model, train, query = _problem(case)
    per_token = case == "token"
    counted = _Crash()
    whole = compute_bif(model, train, query, loss_fn=counted, config=_config(case), per_token=per_token)
    with pytest.raises(RuntimeError, match="interrupted"):
        compute_bif(model, train, query, loss_fn=_Crash(at=counted.calls // 2), config=_config(case),
                    per_token=per_token, checkpoint=tmp_path)  # fmt: skip
    finished = _state(tmp_path)["traces"]["finished"]
    assert 0 < len(finished) < 5, finished  # some chains were kept, some were not
    again = _Crash()
    resumed = compute_bif(model, train, query, loss_fn=again, config=_config(case), per_token=per_token,
                          checkpoint=tmp_path)  # fmt: skip
    _assert_same(whole, resumed)
    assert again.calls < counted.calls  # the finished chains were not run again
    assert resumed.diagnostics["num_draws_used"] == whole.diagnostics["num_draws_used"]
    torch.testing.assert_close(torch.tensor(resumed.diagnostics["chain_mean_train_loss"]),
                               torch.tensor(whole.diagnostics["chain_mean_train_loss"]), rtol=0, atol=0)  # fmt: skip
    # Finished: the result is stored, and the same call returns it without evaluating anything.
    assert (tmp_path / "result" / "tensors.safetensors").exists()
    stored = compute_bif(model, train, query, loss_fn=_Crash(at=1), config=_config(case), per_token=per_token,
                         checkpoint=tmp_path)  # fmt: skip
    _assert_same(whole, stored)


@pytest.mark.parametrize("case", ["sample", "token", "sample_mass", "lag1", "sample_traces", "sample_in_place"])
def test_a_run_killed_inside_a_chain_resumes_there_exactly(tmp_path, monkeypatch, case):
    """With writes inside chains (every accumulator update here), a crash in the middle of the first group of
    chains resumes from that draw: sampler state, minibatch stream, accumulators (a co-moment of their own or,
    ``sample_traces``, the chain's draws) and traces so far. ``sample_in_place``: every weight stepped in
    the model's own storage (the layout of large weights), which the crash leaves at w*."""
    import bif_fast.sampler as sampler_module
    from bif_fast.engine import pool

    monkeypatch.setenv("BIF_FAST_CHECKPOINT_SECONDS", "0")
    if case == "sample_in_place":
        monkeypatch.setattr(sampler_module, "IN_PLACE_MIN_NUMEL", 1)
    if case == "sample_traces":
        monkeypatch.setattr(pool.Pool, "chain_state", property(lambda self: "traces", lambda self, v: None),
                            raising=False)  # fmt: skip
    model, train, query = _problem(case)
    config = BIFConfig(**{**_config(case).__dict__, "draws_per_update": 4})  # a write every 4 draws
    if case == "lag1":
        config = BIFConfig(**{**config.__dict__, "estimator": "lag1", "num_steps_bw_draws": 1})
    per_token = case == "token"
    counted = _Crash()
    whole = compute_bif(model, train, query, loss_fn=counted, config=config, per_token=per_token)
    with pytest.raises(RuntimeError, match="interrupted"):
        # Inside the first group of chains (the mass's Lanczos calls loss_fn before the chains start).
        at = counted.calls // (3 if case == "sample_mass" else 12)
        w_star = [p.detach().clone() for p in model.parameters()]
        compute_bif(model, train, query, loss_fn=_Crash(at=at), config=config, per_token=per_token,
                    checkpoint=tmp_path)  # fmt: skip
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w_star, strict=True))
    state = _state(tmp_path)
    assert state["traces"]["finished"] == [] and 0 < state["running"]["next_draw"] < config.num_draws, state
    again = _Crash()
    resumed = compute_bif(model, train, query, loss_fn=again, config=config, per_token=per_token,
                          checkpoint=tmp_path)  # fmt: skip
    _assert_same(whole, resumed)
    assert again.calls < counted.calls
    assert torch.equal(torch.tensor(resumed.diagnostics["rms_distance_from_w_star"]),
                       torch.tensor(whole.diagnostics["rms_distance_from_w_star"]))  # fmt: skip


def test_a_checkpoint_of_another_run_is_refused_naming_the_difference(tmp_path):
    model, train, query = _problem("sample")
    with pytest.raises(RuntimeError):
        compute_bif(model, train, query, loss_fn=_Crash(at=200), config=_config("sample"), checkpoint=tmp_path)
    other = _config("sample")
    other = BIFConfig(**{**other.__dict__, "num_draws": 31})
    with pytest.raises(ValueError, match=r"config\.num_draws: checkpoint 30, this call 31"):
        compute_bif(model, train, query, loss_fn=_loss, config=other, checkpoint=tmp_path)
    hotter = BIFConfig(**{**_config("sample").__dict__, "sgld": SGLDConfig(lr=2e-3, nbeta=60.0, localization=20.0)})
    with pytest.raises(ValueError, match=r"config\.sgld\.nbeta: checkpoint 50\.0, this call 60\.0"):
        compute_bif(model, train, query, loss_fn=_loss, config=hotter, checkpoint=tmp_path)
    smaller = torch.utils.data.Subset(train, range(20))
    with pytest.raises(ValueError, match=r"train_len: checkpoint 30, this call 20"):
        compute_bif(model, smaller, query, loss_fn=_loss, config=_config("sample"), checkpoint=tmp_path)
    with torch.no_grad():
        model[0].weight.add_(1e-3)
    with pytest.raises(ValueError, match=r"param_checksums"):
        compute_bif(model, train, query, loss_fn=_loss, config=_config("sample"), checkpoint=tmp_path)
    wider = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    with pytest.raises(ValueError, match=r"params: checkpoint \[\[\[5, 3\]"):
        compute_bif(wider, train, query, loss_fn=_loss, config=_config("sample"), checkpoint=tmp_path)


def _interrupted(tmp_path: Path) -> tuple:
    model, train, query = _problem("sample")
    with pytest.raises(RuntimeError):
        compute_bif(model, train, query, loss_fn=_Crash(at=200), config=_config("sample"), checkpoint=tmp_path)
    return model, train, query, tmp_path / "state-rank0-of-1.safetensors"


def test_a_truncated_checkpoint_is_refused(tmp_path):
    model, train, query, state = _interrupted(tmp_path)
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is damaged"):
        compute_bif(model, train, query, loss_fn=_loss, config=_config("sample"), checkpoint=tmp_path)
    state.write_bytes(b"")
    with pytest.raises(ValueError, match="is damaged"):
        compute_bif(model, train, query, loss_fn=_loss, config=_config("sample"), checkpoint=tmp_path)


def test_an_altered_checkpoint_is_refused(tmp_path):
    model, train, query, state = _interrupted(tmp_path)
    data = bytearray(state.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes: the header still parses
    state.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match the checksum"):
        compute_bif(model, train, query, loss_fn=_loss, config=_config("sample"), checkpoint=tmp_path)


def test_a_damaged_result_is_refused(tmp_path):
    model, train, query = _problem("sample")
    compute_bif(model, train, query, loss_fn=_loss, config=_config("sample"), checkpoint=tmp_path)
    (tmp_path / "result" / "result.json").write_text("{not json")
    with pytest.raises(ValueError, match="result .* is damaged"):
        compute_bif(model, train, query, loss_fn=_loss, config=_config("sample"), checkpoint=tmp_path)


def test_a_path_that_is_a_file_is_refused(tmp_path):
    model, train, query = _problem("sample")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        compute_bif(model, train, query, loss_fn=_loss, config=_config("sample"), checkpoint=tmp_path / "f")


_CHILD = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_distributed import _config, _loss, _problem
from bif_fast import compute_bif
torch.set_num_threads(1)
model, train, query = _problem("sample")
def slow(m, b):
    time.sleep(0.002)
    return _loss(m, b)
compute_bif(model, train, query, loss_fn=slow, config=_config("sample"), checkpoint={path!r})
"""


def test_sigkill_loses_at_most_the_work_since_the_last_write(tmp_path):
    torch.set_num_threads(1)
    model, train, query = _problem("sample")
    whole = compute_bif(model, train, query, loss_fn=_loss, config=_config("sample"))
    path = tmp_path / "ck"
    code = _CHILD.format(tests=str(ROOT / "tests"), path=str(path))
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            state = path / "state-rank0-of-1.safetensors"
            if state.exists() and len(_state(path)["traces"]["finished"]) >= 2:
                break
            time.sleep(0.01)
        assert child.poll() is None, "the child finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert not (path / "result").exists()
    assert 2 <= len(_state(path)["traces"]["finished"]) < 5
    resumed = compute_bif(model, train, query, loss_fn=_loss, config=_config("sample"), checkpoint=path)
    torch.testing.assert_close(resumed.bif, whole.bif, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(resumed.stderr, whole.stderr, rtol=1e-6, atol=1e-9)
    assert [p.name for p in path.iterdir() if ".tmp-" in p.name] == []  # a write cut short is cleared away


def test_lockstep_generations_resume_from_the_newest_every_rank_holds(tmp_path, monkeypatch):
    """The file protocol of row-sharded checkpoints, seen from one rank whose peers' generations are faked:
    every write keeps the replaced state as the previous one; resuming picks the newest generation all ranks
    hold, and a rank that got further drops its newer state, so that its next write keeps that generation as
    the previous one (a kill during that write must still leave a generation every rank holds)."""
    from bif_fast.engine.checkpoint import Checkpoint
    from bif_fast.engine.distributed import Ranks

    ranks = Ranks()
    ck = Checkpoint(tmp_path, ranks, {"run": 1}, lockstep=True)
    for g in range(3):
        ck.write({"x": torch.full((2,), float(g))}, {"generation": g})
    assert ck.state_file.exists() and ck.previous_file.exists()
    assert ck.read(ck.previous_file).meta["generation"] == 1
    monkeypatch.setattr(Ranks, "all_gather", lambda self, v: [v, [0, 1]])  # a peer one write behind
    restored = ck.read_common()
    assert restored.meta["generation"] == 1 and torch.equal(restored.tensors["x"], torch.full((2,), 1.0))
    assert ck.read().meta["generation"] == 1 and not ck.previous_file.exists()
    ck.write({"x": torch.full((2,), 2.5)}, {"generation": 2})
    assert ck.read(ck.previous_file).meta["generation"] == 1
    monkeypatch.setattr(Ranks, "all_gather", lambda self, v: [v, [2, 3]])  # a peer one write ahead
    assert ck.read_common().meta["generation"] == 2
    monkeypatch.setattr(Ranks, "all_gather", lambda self, v: [v, []])  # a peer with nothing while we hold 2
    with pytest.raises(ValueError, match="hold no state"):
        ck.read_common()
    ck.previous_file.unlink()
    ck.write({"x": torch.zeros(2)}, {"generation": 3})  # state 3, previous 2
    monkeypatch.setattr(Ranks, "all_gather", lambda self, v: [v, [0, 1]])
    with pytest.raises(ValueError, match=r"ranks \[0\] lack generation 1"):
        ck.read_common()
