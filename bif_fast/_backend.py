"""Backend selection for every op: ``auto`` | ``triton`` | ``ext`` | ``torch``.

``auto`` resolves per op and device: Triton kernels for CUDA tensors, the compiled extension where it
is built (the CPU sampler step, the covariance on either device), else the pure-torch reference.
Triton on CPU tensors (the interpreter, ``TRITON_INTERPRET=1``) runs only when asked for by name. An
automatic fallback warns once with its reason; an explicit request for an unavailable backend raises
``RuntimeError`` with that reason. ``BIF_FAST_BACKEND`` overrides the requested backend of every op.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Literal, cast

import torch

# What a caller may request, and what ``resolve_backend`` turns it into (never ``auto``).
Backend = Literal["auto", "triton", "ext", "torch"]
ResolvedBackend = Literal["triton", "ext", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "ext", "torch")
RESOLVED_BACKENDS: tuple[str, ...] = ("triton", "ext", "torch")

# The fast backends of each op, besides the torch reference, in the order `auto` tries them on a CUDA
# device; on the CPU the compiled extension goes first (Triton there is only the test interpreter).
_OP_FAST_BACKENDS: dict[str, tuple[str, ...]] = {
    "running_cov": ("ext",),
    "sgld_update": ("triton", "ext"),
    "cross_entropy": ("triton",),
}
# Devices each op's extension code runs on.
_EXT_DEVICES: dict[str, tuple[str, ...]] = {"running_cov": ("cpu", "cuda"), "sgld_update": ("cpu",)}

_warned: set[tuple[str, str]] = set()


def _warn_once(op: str, reason: str) -> None:
    key = (op, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"bif_fast: {reason}; using the torch backend for {op}", RuntimeWarning, stacklevel=4)


def triton_interpret() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
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


def ext_unavailable_reason(device: torch.device, op: str = "running_cov") -> str | None:
    """Why the compiled extension cannot run ``op`` on ``device``, or None when it can."""
    from bif_fast import _ext

    if not _ext.HAS_EXT:
        return _ext.EXT_IMPORT_ERROR or "bif_fast._C is not available"
    if device.type not in _EXT_DEVICES.get(op, ()):
        return f"bif_fast._C has no {device.type} code for {op}"
    if device.type == "cuda" and torch.version.cuda is None:
        return "torch is a CPU build"
    return None


def _unavailable_reason(backend: str, device: torch.device, op: str) -> str | None:
    if backend == "torch":
        return None
    if backend == "ext":
        return ext_unavailable_reason(device, op)
    if backend == "triton":
        return triton_unavailable_reason(device)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def resolve_backend(op: str, device: torch.device | str, requested: Backend = "auto") -> ResolvedBackend:
    """Resolve the backend for ``op`` on ``device``.

    Args:
        op (str): one of ``running_cov``, ``sgld_update``, ``cross_entropy``.
        device (torch.device | str): where the op's tensors live.
        requested (Backend): ``auto`` | ``triton`` | ``ext`` | ``torch``; ``BIF_FAST_BACKEND`` overrides it.
            Default: ``auto``.

    Returns:
        The concrete backend name (never ``auto``).

    Raises:
        ValueError: unknown op or backend name.
        RuntimeError: an explicitly requested backend is unavailable (with the reason).
    """
    if op not in _OP_FAST_BACKENDS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_OP_FAST_BACKENDS)}")
    device = torch.device(device)
    name = os.environ.get("BIF_FAST_BACKEND", requested) or "auto"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (from argument or BIF_FAST_BACKEND); expected one of {BACKENDS}")
    fast = _candidates(op, device, name)
    if name != "auto":
        if name != "torch" and name not in fast:
            raise RuntimeError(f"op {op} has no {name} backend; it has {', '.join(fast)} and torch")
        reason = _unavailable_reason(name, device, op)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} requested for {op} but unavailable: {reason}")
        return cast(ResolvedBackend, name)
    reasons = []
    for backend in fast:
        reason = _unavailable_reason(backend, device, op)
        if reason is None:
            return cast(ResolvedBackend, backend)
        reasons.append(reason)
    if reasons:
        _warn_once(op, "; ".join(reasons))
    return "torch"


def _candidates(op: str, device: torch.device, requested: str = "auto") -> tuple[str, ...]:
    fast = _OP_FAST_BACKENDS[op]
    if device.type == "cpu" and requested == "auto":
        # Triton on CPU tensors is the interpreter, a debugging and test tool far slower than the torch
        # reference: `auto` never picks it; backend="triton" (with TRITON_INTERPRET=1) still does.
        fast = tuple(b for b in fast if b != "triton")
    return fast


def available_backends() -> dict[str, dict[str, str]]:
    """For each op, the backend ``auto`` picks on CPU and on CUDA, or why the fast one is unavailable.

    Examples:
        >>> import bif_fast
        >>> bif_fast.available_backends()["running_cov"]["cpu"]  # doctest: +SKIP
        'ext'
    """
    out: dict[str, dict[str, str]] = {}
    for op in _OP_FAST_BACKENDS:
        row: dict[str, str] = {}
        for dev in ("cpu", "cuda"):
            if dev == "cuda" and not torch.cuda.is_available():
                row[dev] = "no CUDA device"
                continue
            device = torch.device(dev)
            reasons = {b: _unavailable_reason(b, device, op) for b in _candidates(op, device)}
            usable = [b for b, r in reasons.items() if r is None]
            why = "; ".join(r for r in reasons.values() if r) or "its fast path is a CUDA kernel"
            row[dev] = usable[0] if usable else f"torch ({why})"
        out[op] = row
    return out
