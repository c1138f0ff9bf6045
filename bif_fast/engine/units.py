"""Units (the rows and columns of the BIF) and the checks and reductions of ``loss_fn``'s output.

Per sample, a unit is an example. Per token, a unit is a position that is not ignored, and which
positions are ignored is *declared*, never read off the loss value (a confidently predicted token whose
float32 loss rounds to 0 is a unit like any other). ``loss_fn`` declares it in one of two ways:

* it returns ``(losses [B, T], mask [B, T])``, ``mask`` true where a position counts; or
* it has a method ``loss_mask(batch) -> [B, T]`` (``bif_fast.losses.causal_lm`` does: its mask is the
  non-padding targets), and returns the losses alone.

A loss function that declares nothing makes every position a unit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bif_fast.engine.data import batch_len

__all__ = ["LossModule", "Units", "check_loss", "evaluate", "full_batch_term", "loss_and_mask", "loss_module_names",
           "minibatch_loss"]

LossFn = Callable[[torch.nn.Module, Any], Any]


def loss_and_mask(loss_fn: LossFn, model: torch.nn.Module, batch: Any, per_token: bool) -> tuple[Any, Any]:
    """``loss_fn``'s losses and, per token, its declared mask of the positions that count (None: all)."""
    out = loss_fn(model, batch)
    mask = None
    if isinstance(out, (tuple, list)) and len(out) == 2:
        out, mask = out
    if per_token and mask is None:
        declare = getattr(loss_fn, "loss_mask", None)
        if callable(declare):
            mask = declare(batch)
    return out, (mask if per_token else None)


def check_loss(out: Any, mask: Any, batch_len_: int | None, per_token: bool, name: str) -> torch.Tensor:
    """``out`` as a validated loss tensor: floating point, ``[B]`` (or ``[B, T]`` per token), one per example;
    a declared mask must be a boolean (or 0/1 integer) tensor of the same shape."""
    if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
        raise ValueError(f"loss_fn must return a floating-point tensor for {name}, got {type(out).__name__}")
    want = 2 if per_token else 1
    if out.dim() != want:
        shape = "[B, T] per-token losses (per_token=True)" if per_token else "[B] per-sample losses"
        raise ValueError(f"loss_fn must return {shape} for {name}, got shape {list(out.shape)}")
    if batch_len_ is not None and out.shape[0] != batch_len_:
        raise ValueError(f"loss_fn returned {out.shape[0]} losses for a batch of {batch_len_} ({name})")
    bad_mask = not isinstance(mask, torch.Tensor) or mask.dtype.is_floating_point or mask.shape != out.shape
    if mask is not None and bad_mask:
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"the loss mask for {name} must be a boolean tensor of shape {list(out.shape)}, got {got}")
    return out


def minibatch_loss(out: torch.Tensor, mask: torch.Tensor | None, per_token: bool) -> torch.Tensor:
    """The loss whose gradient drives SGLD: the minibatch mean (per token: over the positions that count)."""
    if not per_token or mask is None:
        return out.mean()
    mask = mask.bool()
    return torch.where(mask, out, 0.0).sum() / mask.sum().clamp_min(1)


def full_batch_term(out: torch.Tensor, mask: torch.Tensor | None, count: int, per_token: bool) -> torch.Tensor:
    """One evaluation batch's share of the mean loss over the whole training set (``count`` units in all):
    summed over the batches, the full-batch SGLD loss."""
    if per_token and mask is not None:
        return torch.where(mask.bool(), out, 0.0).sum() / count
    return out.sum() / count


def evaluate(model, batches: list, loss_fn: LossFn, per_token: bool, name: str, *,
             check: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:  # fmt: skip
    """Losses (and, with ``check``, declared masks) of every batch, without gradients (float64 kept,
    anything else as float32). ``check`` validates each output (done once, at w*; at the draws
    the shapes are known and a changed shape fails in the gather)."""
    outs, masks = [], []
    with torch.no_grad():
        for batch in batches:
            out, mask = loss_and_mask(loss_fn, model, batch, per_token and check)
            if check:
                out = check_loss(out, mask, batch_len(batch), per_token, name)
            want = torch.float64 if out.dtype == torch.float64 else torch.float32
            outs.append(out if out.dtype == want else out.to(want))
            masks.append(mask)
    return outs, masks


class Units:
    """Maps a loss_fn's outputs to the flat vector of units (samples, or the declared tokens)."""

    def __init__(self, per_token: bool):
        self.per_token = per_token
        self.flat_index: list[torch.Tensor | None] = []  # per batch, positions of units in out.reshape(-1)
        self.index_rows: list[torch.Tensor] = []  # per batch, (sequence, position) of each unit
        self.n = 0
        self.num_sequences = 0

    def discover(self, outs: list[torch.Tensor], masks: list[torch.Tensor | None], name: str) -> None:
        """Record the units of every evaluation batch from the losses at w* and their declared masks."""
        seq = 0
        for out, mask in zip(outs, masks, strict=True):
            if self.per_token:
                keep = torch.ones_like(out, dtype=torch.bool) if mask is None else mask.bool()
                pos = keep.nonzero()  # [u, 2] (row in batch, position)
                self.flat_index.append(None if mask is None else keep.reshape(-1).nonzero().squeeze(1))
                self.index_rows.append(torch.stack([pos[:, 0] + seq, pos[:, 1]], dim=1).cpu())
            seq += out.shape[0]
        self.num_sequences = seq
        self.n = sum(int(i.shape[0]) for i in self.index_rows) if self.per_token else seq
        if self.n == 0:
            raise ValueError(f"{name} has no units to attribute (its loss mask excludes every position)")

    def gather(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """The units of one evaluation at w* as one vector."""
        return self.gather_rows([o.unsqueeze(0) for o in outs], None).squeeze(0)

    def gather_rows(self, outs: list[torch.Tensor], out: torch.Tensor | None) -> torch.Tensor:
        """``outs`` are ``[C, B(, T)]`` (C chains); row c of ``out`` ``[C, n]`` gets chain c's units."""
        if not self.per_token:
            return torch.cat(outs, dim=1) if out is None else torch.cat(outs, dim=1, out=out)
        if out is None:
            out = torch.empty(outs[0].shape[0], self.n, dtype=outs[0].dtype, device=outs[0].device)
        start = 0
        for o, i in zip(outs, self.flat_index, strict=True):
            flat = o.reshape(o.shape[0], -1)
            width = flat.shape[1] if i is None else i.numel()
            out[:, start : start + width] = flat if i is None else flat.index_select(1, i)
            start += width
        return out

    @property
    def index(self) -> torch.Tensor | None:
        """`[n, 2]` (sequence, position) of each unit, per token; None per sample."""
        return torch.cat(self.index_rows) if self.per_token else None


class LossModule(torch.nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can swap the model's parameters.
    ``forward`` gives the losses; ``minibatch`` the SGLD loss of one chain's minibatch."""

    def __init__(self, model: torch.nn.Module, loss_fn, per_token: bool):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.per_token = per_token

    def forward(self, batch: Any, minibatch: bool = False, with_mask: bool = False) -> Any:
        out, mask = loss_and_mask(self.loss_fn, self.model, batch, self.per_token and (minibatch or with_mask))
        if with_mask:
            return out, mask
        return minibatch_loss(out, mask, self.per_token) if minibatch else out


def loss_module_names(model: torch.nn.Module, params) -> list[str]:
    """The names of ``params`` as ``LossModule(model, ...)`` knows them (for ``functional_call``).

    Raises:
        ValueError: a parameter that is not part of ``model``.
    """
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), "model." + name)
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"sampled parameters {missing} are not parameters of the model")
    return [names[id(p)] for p in params]
