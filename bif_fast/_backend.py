"""Backend selection for every op: ``auto`` | ``triton`` | ``ext`` | ``torch``.

``auto`` resolves per op and device: Triton kernels for CUDA tensors (or on CPU under
``TRITON_INTERPRET=1``), the compiled extension where it is built, else the pure-torch reference. An
automatic fallback warns once with its reason; an explicit request for an unavailable backend raises
``RuntimeError`` with that reason. ``BIF_FAST_BACKEND`` overrides the requested backend of every op.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Literal

import torch

Backend = Literal["auto", "triton", "ext", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "ext", "torch")

# Which fast backend each op has, besides the torch reference.
_OP_FAST_BACKEND: dict[str, str] = {
    "running_cov": "ext",
    "sgld_update": "triton",
    "cross_entropy": "triton",
}

_warned: set[tuple[str, str]] = set()


def _warn_once(op: str, reason: str) -> None:
    key = (op, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"bif_fast: {reason}; using the torch backend for {op}", RuntimeWarning, stacklevel=4)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device``, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpret():
        return None
    return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device.type}"


def ext_unavailable_reason(device: torch.device) -> str | None:
    """Why the compiled extension cannot run on ``device``, or None when it can."""
    from bif_fast import _ext

    if not _ext.HAS_EXT:
        return _ext.EXT_IMPORT_ERROR or "bif_fast._C is not available"
    if device.type == "cpu":
        return None
    if device.type == "cuda" and torch.version.cuda is not None:
        return None
    return f"bif_fast._C does not run on {device.type} tensors"


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    if backend == "torch":
        return None
    if backend == "ext":
        return ext_unavailable_reason(device)
    if backend == "triton":
        return triton_unavailable_reason(device)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def resolve_backend(op: str, device: torch.device | str, requested: str = "auto") -> str:
    """Resolve the backend for ``op`` on ``device``.

    Args:
        op (str): one of ``running_cov``, ``sgld_update``, ``cross_entropy``.
        device (torch.device | str): where the op's tensors live.
        requested (str): ``auto`` | ``triton`` | ``ext`` | ``torch``; ``BIF_FAST_BACKEND`` overrides it.

    Returns:
        The concrete backend name (never ``auto``).

    Raises:
        ValueError: unknown op or backend name.
        RuntimeError: an explicitly requested backend is unavailable (with the reason).
    """
    if op not in _OP_FAST_BACKEND:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_OP_FAST_BACKEND)}")
    device = torch.device(device)
    requested = os.environ.get("BIF_FAST_BACKEND", requested) or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r} (from argument or BIF_FAST_BACKEND); expected one of {BACKENDS}")
    if requested != "auto":
        if requested not in ("torch", _OP_FAST_BACKEND[op]):
            raise RuntimeError(f"op {op} has no {requested} backend; it has {_OP_FAST_BACKEND[op]} and torch")
        reason = _unavailable_reason(requested, device)
        if reason is not None:
            raise RuntimeError(f"backend {requested!r} requested for {op} but unavailable: {reason}")
        return requested
    fast = _OP_FAST_BACKEND[op]
    reason = _unavailable_reason(fast, device)
    if reason is None:
        return fast
    # On CPU without the interpreter, torch is the intended path for Triton ops: no warning.
    if not (fast == "triton" and device.type == "cpu"):
        _warn_once(op, reason)
    return "torch"


def available_backends() -> dict[str, dict[str, str]]:
    """For each op, the backend ``auto`` picks on CPU and on CUDA, or why the fast one is unavailable.

    Examples:
        >>> import bif_fast
        >>> bif_fast.available_backends()["running_cov"]["cpu"]  # doctest: +SKIP
        'ext'
    """
    out: dict[str, dict[str, str]] = {}
    for op, fast in _OP_FAST_BACKEND.items():
        row: dict[str, str] = {}
        for dev in ("cpu", "cuda"):
            if dev == "cuda" and not torch.cuda.is_available():
                row[dev] = "no CUDA device"
                continue
            reason = _unavailable_reason(fast, torch.device(dev))
            row[dev] = fast if reason is None else f"torch ({reason})"
        out[op] = row
    return out
