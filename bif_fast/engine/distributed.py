"""Chains on many processes: which rank runs which chain, agreement on a rank-0 value, and failures.

Inside an initialised default process group (``torch.distributed.is_initialized()``) ``compute_bif`` runs
chain ``c`` on rank ``c % world_size``. A chain is the same chain wherever it runs (its Philox noise is
keyed by ``(seed, c)``, its minibatch stream by ``c``), so the union of the ranks' chains is the chain set
of one process, and ``Pool.merge_ranks`` merges their accumulators exactly (Chan's merge).

Collectives are only entered where every rank arrives: a rank that raises while sampling keeps its
exception until the next agreement point (``raise_if_any_failed``), where every rank learns of it and
raises, instead of the healthy ranks waiting forever in a reduction the failed one never joins.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["RankFailure", "Ranks", "RowShard", "in_lockstep"]

T = TypeVar("T")

# True while rank 0 runs a ``Ranks.from_root`` function: code under it (e.g. the calibration's pilot runs)
# sees a group of one.
_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar("bif_fast_ranks_alone", default=False)


class RankFailure(RuntimeError):
    """Raised on the other ranks when one rank of a distributed ``compute_bif`` failed (``rank`` is its rank)."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in the default process group (rank 0 of 1 outside one)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The default group's ranks; rank 0 of 1 outside one, and inside ``from_root``'s ``fn`` (which rank 0
        runs while the others wait, so no collective may be entered there)."""
        dist = torch.distributed
        if _ALONE.get() or not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def active(self) -> bool:
        return self.world > 1

    def chains(self, num_chains: int) -> list[int]:
        """The global chain indices this rank runs: ``c % world == rank``."""
        return [c for c in range(num_chains) if c % self.world == self.rank]

    def raise_if_any_failed(self, error: BaseException | None) -> None:
        """Every rank reports whether it failed; if any did, every rank raises (the failed one its own
        exception, the others a ``RankFailure`` naming the lowest failed rank and its error)."""
        if not self.active:
            if error is not None:
                raise error
            return
        status = None if error is None else f"{type(error).__name__}: {error}"
        statuses: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(statuses, status)
        if error is not None:
            raise error
        failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
        if failed:
            r, why = failed[0]
            raise RankFailure(f"bif_fast: rank {r} of {self.world} failed ({why}); no BIF on any rank", r)

    def from_root(self, fn: Callable[[], T], to_wire: Callable[[T], Any] = lambda v: v,
                  from_wire: Callable[[Any], T] = lambda v: v) -> T:  # fmt: skip
        """``fn()`` run on rank 0 and given to every rank (the others wait), so that every rank uses the
        same value (e.g. a calibration, whose lengths come from timings). ``to_wire`` / ``from_wire``
        move the value to and from something picklable on the CPU. An error on rank 0 is raised on every rank."""
        if not self.active:
            return fn()
        payload: list[Any] = [None]
        error = None
        if self.rank == 0:
            token = _ALONE.set(True)
            try:
                payload[0] = ("ok", to_wire(fn()))
            except Exception as e:  # handed to every rank, then re-raised here
                error, payload[0] = e, ("error", f"{type(e).__name__}: {e}")
            finally:
                _ALONE.reset(token)
        torch.distributed.broadcast_object_list(payload, src=0, device=self._object_device())
        if error is not None:
            raise error
        kind, value = payload[0]
        if kind == "error":
            raise RankFailure(f"bif_fast: rank 0 of {self.world} failed ({value}); no BIF on any rank", 0)
        return from_wire(value)

    def checked(self, fn: Callable[[], T]) -> T | None:
        """``fn()``; inside a group every rank then learns whether any failed in it, and if one did every rank
        raises (``raise_if_any_failed``), instead of the others going on to a collective it never joins."""
        if not self.active:
            return fn()
        out, error = _attempt(fn)
        self.raise_if_any_failed(error)
        return out

    def agree(self, value: T) -> T:
        """Rank 0's ``value`` (picklable, small) on every rank: a number every rank measured (a time) or derived
        in step with the others, so that what follows from it is the same everywhere."""
        if not self.active:
            return value
        payload = [value]
        torch.distributed.broadcast_object_list(payload, src=0, device=self._object_device())
        return payload[0]

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` overwritten with rank 0's, in place (on the device the group's backend moves)."""
        if not self.active:
            return tensor
        wire = self._wire(tensor)
        if wire is tensor:
            torch.distributed.broadcast(tensor, src=0)
        else:
            torch.distributed.broadcast(wire, src=0)
            tensor.copy_(wire)
        return tensor

    @staticmethod
    def _backend_device() -> torch.device:
        """The device the group's backend moves tensors on: the current CUDA device under NCCL (which takes
        CUDA tensors only), else the CPU."""
        if "nccl" in str(torch.distributed.get_backend()) and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _object_device(self) -> torch.device | None:
        """Where an object collective stages its bytes: the backend's CUDA device under NCCL, else the default."""
        device = self._backend_device()
        return device if device.type == "cuda" else None

    def _wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` itself where the backend moves tensors of its device, else a copy on the device it does."""
        device = self._backend_device()
        return tensor if tensor.device.type == device.type else tensor.to(device)

    def check_same(self, record: dict[str, Any]) -> None:
        """Every rank must call with the same ``record`` (e.g. w*'s checksums, the data sizes, the config):
        a model initialised differently on one rank would otherwise sample another posterior there. Raises
        the same ``ValueError`` on every rank, naming what differs and where."""
        if not self.active:
            return
        records = self.all_gather(record)
        diffs = [f"{key} on rank {r}" for r, other in enumerate(records) for key in sorted(record)
                 if other.get(key) != records[0].get(key)]  # fmt: skip
        if diffs:
            raise ValueError("bif_fast: the ranks were not given the same run: " + ", ".join(diffs) + " differ(s) "
                             "from rank 0 (load the same trained weights and data on every rank)")  # fmt: skip

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable, small), in rank order."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place."""
        if self.active:
            torch.distributed.all_reduce(tensor)
        return tensor

    def small_sum(self, values: torch.Tensor) -> torch.Tensor:
        """A few values summed over the ranks, on the device the group's backend reduces on (NCCL takes CUDA
        tensors only), returned on ``values``' device."""
        if not self.active:
            return values
        out = values.to(self._backend_device(), copy=True)
        torch.distributed.all_reduce(out)
        return out.to(values.device)


@dataclasses.dataclass(frozen=True)
class RowShard:
    """``BIFConfig.shard_rows``: this rank's slice ``[lo, hi)`` of the training sequences.

    Every rank runs every chain, so the chains' weights must stay equal on every rank: each SGLD gradient is
    the sum over the ranks of each one's part (``local_batch`` of every minibatch, or its own rows of the
    full batch), reduced before the step, and decisions about a chain (divergence) are reduced too.

    With an FSDP model (``fsdp``) the model itself is sharded: its backward already reduces the gradient (a
    mean over the ranks, which ``loss_scale`` turns into the sum), every forward is a collective, so every
    rank must run as many forwards as the others (``same_count``), and the sampler steps each rank's piece."""

    ranks: Ranks
    lo: int
    hi: int
    fsdp: bool = False

    @classmethod
    def of(cls, ranks: Ranks, num_sequences: int, fsdp: bool = False) -> RowShard:
        lo = ranks.rank * num_sequences // ranks.world
        return cls(ranks, lo, (ranks.rank + 1) * num_sequences // ranks.world, fsdp)

    @property
    def loss_scale(self) -> float:
        """What this rank's part of the loss is multiplied by before backward: FSDP divides the summed
        gradient by the world size, which this undoes."""
        return float(self.ranks.world) if self.fsdp else 1.0

    def reduce_grads_(self, grads: list[torch.Tensor]) -> None:
        """The ranks' gradient parts summed in place (FSDP's backward has done it already)."""
        if not self.fsdp:
            for grad in grads:
                self.sum_(grad)

    def same_count(self, batches: list) -> list:
        """``batches`` split until this rank has as many as the rank with most (each evaluation then makes the
        same number of forwards, the collectives of an FSDP model, on every rank); unchanged without FSDP.

        Raises:
            ValueError: a rank has fewer batches and none of them has two rows to split.
        """
        if not self.fsdp:
            return batches
        target = max(self.ranks.all_gather(len(batches)))
        out = list(batches)
        while len(out) < target:
            sizes = [_batch_rows(b) or 0 for b in out]
            i = max(range(len(out)), key=sizes.__getitem__)
            if sizes[i] < 2:
                raise ValueError(f"an FSDP model needs the same number of evaluation batches on every rank: rank "
                                 f"{self.ranks.rank} has {len(out)} of single rows, another {target} (raise "
                                 "eval_batch_size)")  # fmt: skip
            half = sizes[i] // 2
            out[i : i + 1] = [_rows(out[i], slice(None, half), sizes[i]), _rows(out[i], slice(half, None), sizes[i])]
        return out

    def local_batch(self, batch: Any) -> Any:
        """This rank's share of a minibatch: rows ``rank::world`` of every tensor with the batch's length."""
        size = _batch_rows(batch)
        if size is not None and size < self.ranks.world:
            raise ValueError(f"shard_rows splits every SGLD minibatch across {self.ranks.world} ranks: it needs "
                             f"batch_size >= {self.ranks.world}, got a batch of {size}")  # fmt: skip
        return _rows(batch, slice(self.ranks.rank, None, self.ranks.world), size)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks in place (a device tensor under NCCL, e.g. a gradient)."""
        return self.ranks.all_reduce_(tensor)

    def any(self, flags: list[bool]) -> list[bool]:
        """Per chain: true on some rank."""
        if not self.ranks.active:
            return flags
        t = self.ranks.small_sum(torch.tensor([int(f) for f in flags], dtype=torch.int64))
        return [bool(v) for v in t.tolist()]

    def check(self, error: BaseException | None, values: torch.Tensor | None = None) -> torch.Tensor | None:
        """The end of a step of the lockstep in which this rank may have failed (``error``): every rank learns
        whether any did, and if so every rank raises (``Ranks.raise_if_any_failed``) instead of going on to a
        collective the failed rank will never enter. ``values`` (a few numbers, e.g. a count) are summed over
        the ranks in the same collective and returned."""
        if not self.ranks.active:
            if error is not None:
                raise error
            return values
        extra = torch.zeros(0, dtype=torch.float64) if values is None else values.detach().reshape(-1).double().cpu()
        t = self.ranks.small_sum(torch.cat([torch.tensor([float(error is not None)], dtype=torch.float64), extra]))
        if t[0] > 0:
            self.ranks.raise_if_any_failed(error)
        return None if values is None else t[1:].to(values.device).reshape(values.shape)

    def checked(self, fn: Callable[[], T]) -> T | None:
        """``fn()``, then ``check`` with what it raised: a rank failing in ``fn`` makes every rank raise."""
        out, error = _attempt(fn)
        self.check(error)
        return out


def in_lockstep(shard: RowShard | None, fn: Callable[[], T]) -> T | None:
    """``fn()``; with row shards followed by the lockstep check (``RowShard.checked``), so that a rank failing
    in it makes every rank raise before the next collective."""
    return fn() if shard is None else shard.checked(fn)


def _attempt(fn: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """(``fn()``, None), or (None, what it raised)."""
    try:
        return fn(), None
    except Exception as e:
        return None, e


def _batch_rows(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            rows = _batch_rows(item)
            if rows is not None:
                return rows
    return None


def _rows(batch: Any, index: slice, size: int | None) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[index] if batch.dim() and batch.shape[0] == size else batch
    if isinstance(batch, dict):
        return type(batch)((k, _rows(v, index, size)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        out = [_rows(v, index, size) for v in batch]
        if isinstance(batch, tuple):
            return type(batch)(*out) if hasattr(batch, "_fields") else type(batch)(out)
        return out
    return batch
