"""``benchmarks/bench_distributed.py --pythia``: the scaling setting's script runs end to end at toy size on
the CPU (its figures at full size need a GPU), and what it reports is of the setting it describes."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")


def test_the_pythia_scaling_benchmark_runs_at_toy_size():
    from benchmarks.bench_distributed import PYTHIA, pythia

    width, layers, _, mlp, _, n_train, n_query, length = PYTHIA["tiny"]
    got = pythia("tiny", torch.device("cpu"), draws=3)
    # Every counted position is a unit: the targets of tokens 2 .. length of each sequence.
    assert (got["n"], got["p"], got["draws"]) == (n_train * (length - 1), n_query * (length - 1), 3)
    # The attention (fused QKV and output) and MLP weights of every layer are sampled, nothing else.
    assert got["sampled_params"] == layers * (4 * width * width + 2 * width * mlp)
    assert got["diverged"] == [False]
    for key in ("seconds", "seconds_per_draw", "tokens_per_s", "trunk_seconds_per_draw"):
        assert math.isfinite(got[key]) and got[key] > 0, key
    assert got["seconds_per_draw"] < got["seconds"]
    assert 0.0 <= got["share_outside_trunk"] < 1.0
