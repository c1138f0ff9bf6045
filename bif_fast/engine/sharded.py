"""Parameters sharded by FSDP (``torch.distributed.fsdp.fully_shard``): where each rank's piece sits.

FSDP2 holds every parameter as a ``DTensor`` split along its first dimension over a 1-D mesh (the
``torch.chunk`` rule: ``ceil(rows / world)`` rows per rank, the last ranks possibly fewer or none). A
rank's piece of a row-major parameter is one contiguous run of its flattened elements, so the sampler,
whose update is elementwise, runs on the local piece alone with each element's noise keyed by its index
in the unsharded canonical flattening: the chain is the same whatever the sharding.

FSDP keeps the root module's gathered weights after a forward (expecting a backward to follow). A forward
without backward (an evaluation) therefore leaves weights gathered that the next in-place update of the
pieces makes stale; the engine reshards the model (``fsdp_modules``) after evaluations and before it
changes the pieces, so that every forward gathers the current weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LocalPiece", "any_sharded", "checksums", "fsdp_modules", "is_sharded", "local_piece", "sharded_group"]


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ``DTensor`` (an FSDP2 parameter or another distributed tensor)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def any_sharded(params: Sequence[torch.Tensor]) -> bool:
    return any(is_sharded(p) for p in params)


@dataclass(frozen=True)
class LocalPiece:
    """This rank's piece of a sharded parameter: ``local`` (a view of the storage FSDP gathers from) holds
    the elements ``start .. start + local.numel()`` of the parameter flattened row-major."""

    local: torch.Tensor
    start: int


def local_piece(p: torch.Tensor, index: int) -> LocalPiece:
    """The local piece of DTensor ``p`` (parameter ``index`` in the error messages).

    Raises:
        ValueError: a placement other than ``Shard(0)`` on a 1-D mesh (the layout of ``fully_shard``), or a
            local shape that does not follow the ``torch.chunk`` rule.
    """
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"parameter {index}: bif_fast samples DTensors sharded along dim 0 over a 1-D mesh (FSDP2's "
                         f"fully_shard), got placements {list(placements)} on a {mesh.ndim}-D mesh")  # fmt: skip
    local = p.to_local().detach()  # the same storage, outside autograd
    rows, world, rank = p.shape[0] if p.dim() else 1, mesh.size(), mesh.get_local_rank()
    chunk = -(-rows // world)
    first = min(rank * chunk, rows)
    expected = [min(chunk, rows - first), *p.shape[1:]]
    if list(local.shape) != expected or not local.is_contiguous():
        raise ValueError(f"parameter {index}: local shard of shape {list(local.shape)} on rank {rank} of {world}, "
                         f"expected a contiguous {expected} (torch.chunk rows of {list(p.shape)})")  # fmt: skip
    row_numel = p.numel() // rows if rows else 0
    return LocalPiece(local, first * row_numel)


def sharded_group(params: Sequence[torch.Tensor]) -> Any:
    """The process group the sharded parameters' meshes span (each ``fully_shard`` call makes its own mesh
    object; they must all cover one group).

    Raises:
        ValueError: the parameters are sharded over different groups, or some are sharded and some not.
    """
    groups = {id(g): g for g in (p.device_mesh.get_group() for p in params if is_sharded(p))}
    if len(groups) != 1 or not all(is_sharded(p) for p in params):
        raise ValueError("the sampled parameters must be all plain tensors or all DTensors over one process group "
                         f"(FSDP2 fully_shard), got {sum(is_sharded(p) for p in params)} DTensors of {len(params)} "
                         f"over {len(groups)} group(s)")  # fmt: skip
    return next(iter(groups.values()))


@torch.no_grad()
def checksums(p: torch.Tensor) -> list[float]:
    """Sum and sum of squares of ``p``'s elements in float64; of a DTensor, over every rank's piece (a
    collective), so that every rank reports the same figures for the same model."""
    if not is_sharded(p):
        return [float(p.double().sum()), float(p.double().square().sum())]
    local = p.to_local().double()
    sums = torch.stack([local.sum(), local.square().sum()]).cpu()
    torch.distributed.all_reduce(sums, group=p.device_mesh.get_group())
    return sums.tolist()


def fsdp_modules(model: torch.nn.Module) -> list[Any]:
    """The submodules of ``model`` that ``fully_shard`` wrapped (their ``reshard()`` frees gathered weights)."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]
