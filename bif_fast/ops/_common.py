"""Argument checks shared by the public ops: user-facing ``ValueError`` messages before any kernel runs."""

from __future__ import annotations

from typing import Any

import torch


def normalize_device(device: torch.device | str | None) -> torch.device:
    """The device an op's state lives on: CPU for None, and ``cuda`` with its current index filled in, so
    that device comparisons against tensors (which always carry an index) are exact."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_flat(name: str, t: Any, numel: int, device: torch.device, *, dtype: torch.dtype | None = None) -> None:
    """Require ``t`` to be a contiguous 1-D tensor of ``numel`` elements on ``device``.

    Args:
        name (str): the argument's name in the error message.
        t (Any): the argument.
        numel (int): required number of elements.
        device (torch.device): required device (the device of ``w``).
        dtype (torch.dtype | None): required dtype; None accepts any floating-point dtype. Default: None.

    Raises:
        ValueError: ``t`` is not such a tensor.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.numel() != numel or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of {numel} elements, got shape {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but w is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if dtype is None and not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
