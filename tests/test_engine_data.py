"""engine.data: one tree-map over any batch structure (moves, stacking, vmap dims, sizes)."""

from __future__ import annotations

from collections import UserDict, namedtuple

import pytest
import torch

from bif_fast.engine.data import batch_len, leading_dims, sgld_batches, stack_batches, to_device

Pair = namedtuple("Pair", ["ids", "mask"])


class _Encoding(UserDict):
    """A Mapping type pytree does not know (like a tokenizer's BatchEncoding)."""


def _nested(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {"a": [torch.randn(3, 2, generator=g), (torch.arange(3), "tag")], "b": Pair(torch.ones(3), None)}


def test_to_device_keeps_any_structure_and_moves_every_tensor():
    batch = _nested(0)
    out = to_device(batch, torch.device("cpu"))
    assert isinstance(out["b"], Pair) and out["a"][1][1] == "tag" and out["b"].mask is None
    assert torch.equal(out["a"][0], batch["a"][0])
    enc = to_device(_Encoding(input_ids=torch.zeros(2, 5)), torch.device("cpu"))
    assert set(enc) == {"input_ids"} and enc["input_ids"].shape == (2, 5)
    assert batch_len(batch) == 3 and batch_len(_Encoding(x=torch.zeros(4, 1))) == 4 and batch_len(["x"]) is None


def test_stack_batches_and_leading_dims():
    batches = [_nested(s) for s in range(3)]
    stacked = stack_batches(batches)
    assert stacked["a"][0].shape == (3, 3, 2) and stacked["a"][1][1] == "tag"
    assert torch.equal(stacked["a"][0][2], batches[2]["a"][0])
    dims = leading_dims(stacked)
    assert dims["a"][0] == 0 and dims["a"][1] == (0, None) and dims["b"] == Pair(0, None)
    with pytest.raises(ValueError, match="differ between chains"):
        stack_batches([{"x": torch.zeros(1), "k": 1}, {"x": torch.zeros(1), "k": 2}])


def test_sgld_batches_are_a_function_of_seed_and_chain_only():
    data = torch.utils.data.TensorDataset(torch.arange(20.0)[:, None])

    def first(chain: int, seed: int = 0) -> torch.Tensor:
        return next(sgld_batches(data, 5, seed, chain, torch.device("cpu")))[0]

    assert torch.equal(first(1), first(1)) and not torch.equal(first(0), first(1))
    assert not torch.equal(first(0, seed=1), first(0))

    class PerChain:
        def minibatches(self, chain):
            while True:
                yield torch.full((2,), float(chain))

    assert next(sgld_batches(PerChain(), 5, 0, 7, torch.device("cpu"))).tolist() == [7.0, 7.0]
