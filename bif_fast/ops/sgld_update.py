"""The sampler step ``sgld_update_``, its noise ``philox_normal_`` and the start of a chain's state.

The update rules are in ``bif_fast/reference/sgld_update.py`` and the noise stream in
``bif_fast/reference/philox.py``; the Triton kernels (``bif_fast/kernels/sgld_update.py``) and the fused
C++ loop (``csrc/sgld_update_cpu.cpp``) follow the reference's operation order. ``sgld_update_`` validates
its buffers and resolves the backend; ``sgld_update_resolved_`` is the step alone, for a caller (the
``bif_fast.SGLD`` optimizer) that checked its buffers once when it packed them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from bif_fast._backend import RESOLVED_BACKENDS, Backend, ResolvedBackend, resolve_backend
from bif_fast.config import SGLDConfig
from bif_fast.ops._common import check_flat

__all__ = [
    "init_sampler_state_",
    "philox_normal_",
    "philox_normal_rows_",
    "sgld_update_",
    "sgld_update_resolved_",
    "sgld_update_rows_resolved_",
]


def _check_counters(**counters: int) -> None:
    """Noise key and counters: non-negative ints, the seed within 64 bits and the rest within 32."""
    for name, value in counters.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if counters.get("seed", 0) >= 2**64 or counters.get("chain", 0) >= 2**32 or counters.get("step", 0) >= 2**32:
        raise ValueError("seed must fit in 64 bits, chain and step in 32 bits")


def _check_resolved(backend: str) -> None:
    if backend not in RESOLVED_BACKENDS:
        raise ValueError(f"backend must be a resolved backend, one of {RESOLVED_BACKENDS}, got {backend!r}")


def sgld_update_(
    w: torch.Tensor,
    grad: torch.Tensor,
    anchor: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    config: SGLDConfig,
    seed: int = 0,
    chain: int = 0,
    step: int = 0,
    offset: int = 0,
    noise: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    diverged: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> None:
    """One SGLD / RMSprop-SGLD / BAOAB step over a flat parameter buffer, in place, in one launch.

    The update rules and the noise stream are documented in ``bif_fast/reference/sgld_update.py``
    and ``bif_fast/reference/philox.py``. ``bif_fast.SGLD`` packs a model's parameters into such
    buffers and calls this once per dtype per step.

    Args:
        w (Tensor): `[N]` fp32, contiguous: the parameters (master copy), updated in place.
        grad (Tensor): `[N]` gradient of the mean minibatch loss, any float dtype.
        anchor (Tensor): `[N]` w*, any float dtype.
        state (Tensor | None): `[N]` fp32 RMSprop V or BAOAB velocity (required for those, see
            ``SGLDConfig.needs_state`` and ``init_sampler_state_``); ignored for plain SGLD.
        config (SGLDConfig): hyperparameters.
        seed (int): 64-bit noise key. chain (int), step (int): 32-bit counter words. Default: 0.
        offset (int): canonical index of ``w[0]``. Default: 0.
        noise (Tensor | None): `[N]` fp32 explicit noise (tests, custom streams). Default: Philox.
        out (Tensor | None): `[N]` tensor (e.g. bf16 model parameters) that receives the new w.
        diverged (Tensor | None): `[1]` int32 flag set to 1 if any new value is NaN or Inf.
        backend (Backend): ``auto`` | ``triton`` (CUDA, or the CPU interpreter) | ``ext`` (fused C++
            loop, CPU) | ``torch`` (the reference). ``auto``: Triton on CUDA, the extension on CPU.

    Raises:
        ValueError: bad shapes, dtypes, devices or a missing state.

    Examples:
        >>> w = torch.zeros(10); g = torch.ones(10)
        >>> from bif_fast import SGLDConfig
        >>> sgld_update_(w, g, torch.zeros(10), config=SGLDConfig(lr=1e-2), backend="torch")
    """
    if not isinstance(config, SGLDConfig):
        raise ValueError(f"config must be an SGLDConfig, got {type(config).__name__}")
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"w must be a torch.Tensor, got {type(w).__name__}")
    check_flat("w", w, w.numel(), w.device, dtype=torch.float32)
    n, device = w.numel(), w.device
    check_flat("grad", grad, n, device)
    check_flat("anchor", anchor, n, device)
    if config.needs_state:
        if state is None:
            raise ValueError(f"sampler={config.sampler!r}, precondition={config.precondition!r} needs a state tensor")
        check_flat("state", state, n, device, dtype=torch.float32)
    if noise is not None:
        check_flat("noise", noise, n, device, dtype=torch.float32)
    if out is not None:
        check_flat("out", out, n, device)
    if diverged is not None:
        check_flat("diverged", diverged, 1, device, dtype=torch.int32)
    _check_counters(seed=seed, chain=chain, step=step, offset=offset)
    resolved = resolve_backend("sgld_update", device, backend)
    sgld_update_resolved_(
        resolved, w, grad, anchor, state if config.needs_state else None, config=config, seed=seed, chain=chain,
        step=step, offset=offset, noise=noise, out=out, diverged=diverged,
    )  # fmt: skip


def sgld_update_resolved_(
    backend: ResolvedBackend,
    w: torch.Tensor,
    grad: torch.Tensor,
    anchor: torch.Tensor,
    state: torch.Tensor | None,
    *,
    config: SGLDConfig,
    seed: int,
    chain: int,
    step: int,
    offset: int = 0,
    noise: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    diverged: torch.Tensor | None = None,
) -> None:
    """``sgld_update_`` without its checks, on an already-resolved backend: the per-step path of an
    optimizer that validated its buffers once, when it packed them.

    The caller has validated the buffers: every tensor is the one ``sgld_update_`` would accept (flat,
    contiguous, on one device, ``w`` and ``state`` fp32), ``state`` is None exactly when
    ``config.needs_state`` is False, and the counters are in range. Nothing here checks that again.

    Args:
        backend (ResolvedBackend): ``triton`` | ``ext`` | ``torch``, from ``resolve_backend("sgld_update", ...)``.
        w, grad, anchor, state, config, seed, chain, step, offset, noise, out, diverged: as in
            ``sgld_update_``.

    Raises:
        ValueError: ``backend`` is not a resolved backend name.
    """
    kwargs: dict[str, Any] = {"config": config, "seed": seed, "chain": chain, "step": step, "offset": offset,
                              "noise": noise, "out": out, "diverged": diverged}  # fmt: skip
    if backend == "triton":
        from bif_fast.kernels.sgld_update import sgld_update_triton

        sgld_update_triton(w, grad, anchor, state, **kwargs)
    elif backend == "ext":
        _sgld_update_ext(w, grad, anchor, state, **kwargs)
    elif backend == "torch":
        from bif_fast.reference.sgld_update import sgld_update_ as sgld_update_torch

        sgld_update_torch(w, grad, anchor, state, **kwargs)
    else:
        _check_resolved(backend)


def sgld_update_rows_resolved_(
    backend: ResolvedBackend,
    w: torch.Tensor,
    grad: torch.Tensor,
    anchor: torch.Tensor,
    state: torch.Tensor | None,
    *,
    config: SGLDConfig,
    seed: int,
    chains: list[int],
    step: int,
    noise: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    diverged: torch.Tensor | None = None,
) -> None:
    """``sgld_update_resolved_`` for C chains stacked as the rows of ``[C, N]`` buffers: row r is chain
    ``chains[r]``, with that chain's Philox stream, so each row gets exactly what a flat call on it gives.

    ``w``, ``grad``, ``state``, ``noise`` and ``out`` are ``[C, N]`` and contiguous, ``anchor`` is the
    shared ``[N]`` w*, ``diverged`` a ``[C]`` int32 flag per row. The extension steps every row in one
    call (its threads split rows and chunks alike, so a batch of small chains keeps every core busy and
    pays one dispatch); the other backends step the rows one by one.
    """
    if backend == "ext":
        _sgld_update_ext(w, grad, anchor, state, config=config, seed=seed, chain=chains, step=step, offset=0,
                         noise=noise, out=out, diverged=diverged)  # fmt: skip
        return
    for r, chain in enumerate(chains):
        sgld_update_resolved_(
            backend, w[r], grad[r], anchor, None if state is None else state[r], config=config, seed=seed,
            chain=chain, step=step, noise=None if noise is None else noise[r], out=None if out is None else out[r],
            diverged=None if diverged is None else diverged[r : r + 1],
        )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _coefficients(config: SGLDConfig, first_step: bool) -> dict[str, float]:
    """The step's host scalars; only BAOAB's opening kick differs between step 0 and later steps."""
    from bif_fast.reference.sgld_update import step_coefficients

    return step_coefficients(config, 0 if first_step else 1)


def _sgld_update_ext(
    w: torch.Tensor,
    grad: torch.Tensor,
    anchor: torch.Tensor,
    state: torch.Tensor | None,
    *,
    config: SGLDConfig,
    seed: int,
    chain: int | list[int],
    step: int,
    offset: int,
    noise: torch.Tensor | None,
    out: torch.Tensor | None,
    diverged: torch.Tensor | None,
) -> None:
    """The fused C++ CPU step: one flat buffer (``chain`` an int) or ``[C, N]`` rows (``chain`` the rows'
    chain ids). It reads grad and anchor in one dtype and writes ``out`` in that dtype."""
    from bif_fast import _ext
    from bif_fast.reference.sgld_update import sampler_code

    if grad.dtype != anchor.dtype:
        grad = grad.to(anchor.dtype)
    direct_out = out if out is None or out.dtype == anchor.dtype else None
    entry = _ext.C.sgld_update_cpu_ if isinstance(chain, int) else _ext.C.sgld_update_rows_cpu_
    entry(
        w, grad, anchor, state, noise, direct_out, diverged, sampler_code(config),
        config.bounding_box_size is not None, offset, seed, chain, step, _coefficients(config, step == 0),
    )  # fmt: skip
    if out is not None and direct_out is None:
        out.copy_(w)


def _philox_normal_resolved(
    backend: ResolvedBackend, out: torch.Tensor, *, seed: int, chain: int, step: int, offset: int
) -> torch.Tensor:
    """``philox_normal_`` on a resolved backend, for an already-checked fp32 ``out``."""
    if backend == "triton":
        from bif_fast.kernels.sgld_update import philox_normal_triton

        return philox_normal_triton(out, seed=seed, chain=chain, step=step, offset=offset)
    if backend == "ext":
        from bif_fast import _ext

        _ext.C.philox_normal_cpu_(out, seed, chain, step, offset)
        return out
    _check_resolved(backend)
    from bif_fast.reference.philox import philox_normal

    return out.copy_(philox_normal(out.numel(), seed=seed, chain=chain, step=step, offset=offset))


def philox_normal_rows_(
    out: torch.Tensor, *, seed: int, chains: list[int], step: int, backend: ResolvedBackend
) -> None:
    """``philox_normal_`` for the rows of a contiguous fp32 ``[C, N]`` buffer, row r filled with chain
    ``chains[r]``'s noise (canonical elements ``0 .. N-1``): one call on the extension, row by row elsewhere."""
    if backend == "ext":
        from bif_fast import _ext

        _ext.C.philox_normal_rows_cpu_(out, seed, chains, step, 0)
        return
    for r, chain in enumerate(chains):
        _philox_normal_resolved(backend, out[r], seed=seed, chain=chain, step=step, offset=0)


def philox_normal_(
    out: torch.Tensor, *, seed: int, chain: int, step: int, offset: int = 0, backend: Backend = "auto"
) -> torch.Tensor:
    """Fill fp32 ``out`` `[N]` with the sampler's noise for canonical elements ``offset ..``.

    Args:
        out (Tensor): `[N]` fp32, contiguous, filled in place.
        seed (int): 64-bit noise key. chain (int), step (int): 32-bit counter words.
        offset (int): canonical index of ``out[0]``. Default: 0.
        backend (Backend): ``auto`` | ``triton`` | ``ext`` | ``torch``, as in ``sgld_update_``.

    Returns:
        Tensor: ``out``.

    Examples:
        >>> xi = philox_normal_(torch.empty(8), seed=0, chain=0, step=3, backend="torch")
        >>> bool(torch.equal(xi[4:], philox_normal_(torch.empty(4), seed=0, chain=0, step=3, offset=4)))
        True
    """
    check_flat("out", out, out.numel(), out.device, dtype=torch.float32)
    resolved = resolve_backend("sgld_update", out.device, backend)
    return _philox_normal_resolved(resolved, out, seed=seed, chain=chain, step=step, offset=offset)


def init_sampler_state_(
    state: torch.Tensor | None,
    config: SGLDConfig,
    *,
    seed: int,
    chain: int,
    offset: int = 0,
    backend: ResolvedBackend,
) -> None:
    """Set up the sampler state at the start of a chain, in place: the one place that defines it.

    BAOAB: the initial velocity v ~ N(0, I), drawn from the Philox stream of ``(seed, chain)`` at the
    reserved step ``INIT_VELOCITY_STEP`` (so it never coincides with a step's noise). RMSprop-SGLD: V = 0.
    Plain SGLD keeps no state, so ``state`` must be None and nothing happens.

    Args:
        state (Tensor | None): `[N]` fp32, contiguous: the state of canonical elements ``offset ..
            offset + N - 1``, overwritten; None exactly when ``config.needs_state`` is False.
        config (SGLDConfig): the sampler's hyperparameters.
        seed (int): 64-bit noise key.
        chain (int): 32-bit chain index.
        offset (int): canonical index of ``state[0]``. Default: 0.
        backend (ResolvedBackend): ``triton`` | ``ext`` | ``torch``, from
            ``resolve_backend("sgld_update", ...)``; the velocity is bit for bit the same on each.

    Raises:
        ValueError: a missing state for BAOAB / RMSprop-SGLD, a state for plain SGLD, a state that is not
            a flat contiguous fp32 tensor, bad counters, or an unresolved backend name.

    Examples:
        >>> from bif_fast import SGLDConfig
        >>> v = torch.empty(6)
        >>> init_sampler_state_(v, SGLDConfig(sampler="baoab"), seed=0, chain=1, backend="torch")
        >>> init_sampler_state_(None, SGLDConfig(), seed=0, chain=1, backend="torch")  # plain SGLD: no state
    """
    if not isinstance(config, SGLDConfig):
        raise ValueError(f"config must be an SGLDConfig, got {type(config).__name__}")
    _check_resolved(backend)
    _check_counters(seed=seed, chain=chain, offset=offset)
    if not config.needs_state:
        if state is not None:
            raise ValueError("plain SGLD (sampler='sgld', precondition='none') keeps no state; pass state=None")
        return
    if state is None:
        raise ValueError(f"sampler={config.sampler!r}, precondition={config.precondition!r} needs a state tensor")
    if not isinstance(state, torch.Tensor):
        raise ValueError(f"state must be a torch.Tensor, got {type(state).__name__}")
    check_flat("state", state, state.numel(), state.device, dtype=torch.float32)
    if config.sampler == "baoab":
        from bif_fast.reference.philox import INIT_VELOCITY_STEP

        _philox_normal_resolved(backend, state, seed=seed, chain=chain, step=INIT_VELOCITY_STEP, offset=offset)
    else:
        state.zero_()
