"""Evaluation and SGLD batches: checks, device moves, the per-token cap, and stacking for batched chains.

Batches are arbitrary nestings of tensors in lists, tuples, dicts and other registered pytree nodes
(``torch.utils._pytree``); one tree-map moves, stacks or describes them, whatever their structure.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.utils._pytree as pytree
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

__all__ = [
    "ChainMinibatches",
    "batch_len",
    "check_eval_data",
    "check_sgld_data",
    "eval_batches",
    "first_item",
    "leading_dims",
    "sgld_batches",
    "stack_batches",
    "to_device",
    "token_capped_batch_size",
]


@runtime_checkable
class ChainMinibatches(Protocol):
    """A source of SGLD minibatches that differ by chain: ``minibatches(chain)`` is chain ``chain``'s endless
    stream. ``compute_bif`` asks for each chain's stream by its global index, so the stream a chain gets
    does not depend on how many chains run at once or in which order."""

    def minibatches(self, chain: int) -> Iterator[Any]: ...


def _as_tree(batch: Any) -> Any:
    # Mapping types pytree does not know (e.g. a tokenizer's BatchEncoding) are walked as plain dicts.
    if isinstance(batch, Mapping) and not isinstance(batch, dict) and type(batch) not in pytree.SUPPORTED_NODES:
        return dict(batch)
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of ``batch`` on ``device`` (non-blocking), the structure kept."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(device, non_blocking=True), _as_tree(batch))


def batch_len(batch: Any) -> int | None:
    """The leading size of the first tensor of ``batch`` (its number of examples), or None."""
    leaves = [t for t in pytree.tree_leaves(_as_tree(batch)) if isinstance(t, torch.Tensor) and t.dim() > 0]
    return leaves[0].shape[0] if leaves else None


def stack_batches(batches: list[Any]) -> Any:
    """Stack the minibatches of C chains along a new leading dimension, keeping the structure. Non-tensor
    entries must be equal in every chain."""

    def stack(first: Any, *rest: Any) -> Any:
        if isinstance(first, torch.Tensor):
            return torch.stack([first, *rest])
        if all(r == first for r in rest):
            return first
        raise ValueError(f"cannot stack minibatch entries of type {type(first).__name__} that differ between chains")

    return pytree.tree_map(stack, *[_as_tree(b) for b in batches])


def leading_dims(batch: Any) -> Any:
    """vmap ``in_dims`` for a stacked batch: 0 for every tensor, None for anything else."""
    return pytree.tree_map(lambda x: 0 if isinstance(x, torch.Tensor) else None, _as_tree(batch))


def check_eval_data(data: Any, name: str) -> None:
    """``train`` / ``query`` must be a Dataset (non-empty) or a DataLoader that does not shuffle."""
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            raise ValueError(
                f"{name} is a shuffling DataLoader; its order defines the BIF's axes, so it must not shuffle"
            )
        return
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise ValueError(f"{name} must be a torch Dataset or a non-shuffling DataLoader, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty")


def check_sgld_data(data: Any) -> Any:
    """The SGLD minibatch source: a non-empty Dataset, a DataLoader, or a ``ChainMinibatches``."""
    if isinstance(data, (DataLoader, ChainMinibatches)):
        return data
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise ValueError(
            f"sgld_data must be a Dataset, a DataLoader or have minibatches(chain), got {type(data).__name__}"
        )
    if len(data) == 0:
        raise ValueError("sgld_data is empty")
    return data


def first_item(data: Any, device: torch.device) -> Any:
    """A batch of the first item of a Dataset, collated as its evaluation batches are."""
    if isinstance(data, TensorDataset):
        return [t[:1].to(device) for t in data.tensors]
    return to_device(next(iter(DataLoader(data, batch_size=1, shuffle=False))), device)


def token_capped_batch_size(batch_size: int, cap: int, positions: int) -> int:
    """Sequences per evaluation batch so that one holds at most ``cap`` loss positions."""
    return max(1, min(batch_size, cap // max(positions, 1)))


def eval_batches(data: Any, batch_size: int, device: torch.device) -> list:
    """The evaluation batches on ``device``, collated once. A TensorDataset is sliced directly (what its
    DataLoader would collate item by item, as the same list of tensors); a DataLoader's own batches are
    kept."""
    if isinstance(data, TensorDataset):
        tensors = [t.to(device) for t in data.tensors]
        n = len(data)
        return [[t[i : i + batch_size] for t in tensors] for i in range(0, n, batch_size)]
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    return [to_device(b, device) for b in loader]


def sgld_batches(data: Any, batch_size: int, seed: int, chain: int, device: torch.device) -> Iterator:
    """Chain ``chain``'s endless minibatches on ``device``; the order is a function of (seed, chain) only.

    A ``ChainMinibatches`` gives its own stream for the chain; a DataLoader is replayed as given (the same
    for every chain); a Dataset is shuffled by a generator seeded with (seed, chain)."""
    if isinstance(data, ChainMinibatches):
        return (to_device(b, device) for b in data.minibatches(chain))
    if isinstance(data, DataLoader):
        return (to_device(b, device) for b in _forever(data))
    gen = torch.Generator().manual_seed((seed * 1_000_003 + chain * 7_919) % 2**63)
    bs = min(batch_size, len(data))
    if isinstance(data, TensorDataset):
        return _tensor_minibatches(data, bs, gen, device)
    loader = DataLoader(data, batch_size=bs, shuffle=True, generator=gen, drop_last=True)
    return (to_device(b, device) for b in _forever(loader))


def _forever(loader: Any) -> Iterator:
    while True:
        yield from loader


def _tensor_minibatches(data: TensorDataset, bs: int, gen: torch.Generator, device: torch.device) -> Iterator:
    # The tensors are already stacked: index whole minibatches on the device instead of collating items.
    tensors = [t.to(device) for t in data.tensors]
    while True:
        perm = torch.randperm(len(data), generator=gen).to(device)
        for i in range(len(data) // bs):
            idx = perm[i * bs : (i + 1) * bs]
            yield [t[idx] for t in tensors]
