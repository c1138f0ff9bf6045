"""Public ops and their backend dispatch.

Each op has a pure-torch reference in ``bif_fast.reference`` with the same signature as its fast
path (``bif_fast._C`` for the running covariance); ``backend="auto"`` picks the fast one where it is
available and says once why when it is not.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from bif_fast._backend import resolve_backend
from bif_fast.reference import running_cov as _ref_cov

__all__ = [
    "RunningCrossCovariance",
    "cross_entropy_from_logits",
    "per_token_cross_entropy",
    "philox_normal_",
    "sgld_update_",
]

_STATE_DTYPES = (torch.float32, torch.float64)


def _normalize_device(device: torch.device | str | None) -> torch.device:
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _running_cov_impl(backend: str) -> Any:
    if backend == "ext":
        from bif_fast import _ext

        return _ext._C
    return _ref_cov


class RunningCrossCovariance:
    """Streaming centred cross-covariance of two streams, kept on one device.

    Accumulates draws of ``x`` (n-vectors, e.g. the losses of n training units) and ``y`` (p-vectors,
    e.g. p query observables) and gives their unbiased cross-covariance ``[n, p]`` and Pearson
    correlation without storing the draws. ``update`` merges k draws at once as a rank-k Chan update:
    the incoming block is centred and the co-moment grows by one GEMM with inner dimension k + 1, with
    no ``n × p`` temporary and no host synchronisation (except the optional finiteness check on CUDA,
    see ``update``). The math is in ``bif_fast/reference/running_cov.py``.

    Args:
        n (int): length of each ``x`` draw (rows of the result).
        p (int): length of each ``y`` draw (columns of the result).
        device (torch.device | str | None): where the state lives. Default: CPU.
        dtype (torch.dtype): dtype of the `[n, p]` co-moment (and of the results), float64 or float32.
            Default: float64. The means and sums of squares are float64 either way and blocks are
            centred in float64, so float32 halves the memory at about 1e-6 relative accuracy.
        backend (str): ``auto`` | ``ext`` | ``torch``. Default: ``auto`` (the compiled extension when
            it is built, else the torch reference, with a one-time warning).

    Examples:
        >>> acc = RunningCrossCovariance(3, 2)
        >>> acc.update(torch.randn(32, 3), torch.randn(32, 2))
        >>> acc.update(torch.randn(5, 3), torch.randn(5, 2))
        >>> acc.count, acc.covariance().shape
        (37, torch.Size([3, 2]))
    """

    def __init__(
        self,
        n: int,
        p: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        backend: str = "auto",
    ) -> None:
        for name, value in (("n", n), ("p", p)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dtype not in _STATE_DTYPES:
            raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
        self.n, self.p = n, p
        self.dtype = dtype
        self.device = _normalize_device(device)
        self.backend = resolve_backend("running_cov", self.device, backend)
        self._impl = _running_cov_impl(self.backend)
        self._fused = self.device.type == "cuda" and os.environ.get("BIF_FAST_COV_FUSED", "0") == "1"
        vec = {"device": self.device, "dtype": torch.float64}  # the state vectors are float64 always
        self._count = 0
        self._mean_x = torch.zeros(n, **vec)
        self._mean_y = torch.zeros(p, **vec)
        self._m2_x = torch.zeros(n, **vec)
        self._m2_y = torch.zeros(p, **vec)
        self._comoment = torch.zeros(n, p, device=self.device, dtype=dtype)

    def __repr__(self) -> str:
        return (
            f"RunningCrossCovariance(n={self.n}, p={self.p}, count={self._count}, device={self.device}, "
            f"dtype={self.dtype}, backend={self.backend!r})"
        )

    @property
    def count(self) -> int:
        """Number of draws accumulated."""
        return self._count

    @property
    def mean_x(self) -> torch.Tensor:
        """`[n]` running mean of ``x`` (a copy, in the accumulator's dtype)."""
        return self._mean_x.to(self.dtype, copy=True)

    @property
    def mean_y(self) -> torch.Tensor:
        """`[p]` running mean of ``y`` (a copy, in the accumulator's dtype)."""
        return self._mean_y.to(self.dtype, copy=True)

    @property
    def var_x(self) -> torch.Tensor:
        """`[n]` unbiased variance of ``x``."""
        self._require_two_draws("var_x")
        return (self._m2_x / (self._count - 1)).to(self.dtype)

    @property
    def var_y(self) -> torch.Tensor:
        """`[p]` unbiased variance of ``y``."""
        self._require_two_draws("var_y")
        return (self._m2_y / (self._count - 1)).to(self.dtype)

    def _state(self) -> tuple[torch.Tensor, ...]:
        return (self._comoment, self._mean_x, self._mean_y, self._m2_x, self._m2_y)

    def _require_two_draws(self, what: str) -> None:
        if self._count < 2:
            raise ValueError(f"{what} needs at least 2 draws, the accumulator has {self._count}")

    def _check_block(self, name: str, z: Any, width: int) -> torch.Tensor:
        if not isinstance(z, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() == 1:
            z = z.unsqueeze(0)
        if z.dim() != 2 or z.shape[1] != width:
            raise ValueError(f"{name} must have shape [k, {width}] (or [{width}]), got {list(z.shape)}")
        if not z.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {z.dtype}")
        if z.device != self.device:
            raise ValueError(f"{name} is on {z.device} but the accumulator is on {self.device}")
        return z

    def update(self, x: torch.Tensor, y: torch.Tensor, *, check_finite: bool = True) -> None:
        """Merge k draws at once (a rank-k update).

        Args:
            x (Tensor): `[k, n]` (or `[n]` for one draw), any floating dtype, on the accumulator's device.
            y (Tensor): `[k, p]` (or `[p]`), same k.
            check_finite (bool): reject blocks holding NaN or Inf. On CUDA this reads one flag back to the
                host (the only synchronisation of ``update``); hot loops that check finiteness
                elsewhere (``compute_bif`` checks each chain once) pass ``False``, and a non-finite value
                then propagates into the state. Default: True.

        Raises:
            ValueError: wrong type, shape, dtype or device, or a non-finite value (with
                ``check_finite``). The state is left exactly as it was.
        """
        x = self._check_block("x", x, self.n)
        y = self._check_block("y", y, self.p)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must hold the same number of draws, got {x.shape[0]} and {y.shape[0]}")
        if x.shape[0] == 0:
            return
        if check_finite:
            for name, z in (("x", x), ("y", y)):
                if not bool(torch.isfinite(z).all()):
                    bad = (~torch.isfinite(z)).nonzero()[0].tolist()
                    raise ValueError(
                        f"{name} holds non-finite values (first at draw {bad[0]}, index {bad[1]}); "
                        "the accumulator is unchanged"
                    )
        if self._impl is _ref_cov:
            self._impl.running_cov_update_(*self._state(), self._count, x, y)
        else:
            self._impl.running_cov_update_(*self._state(), self._count, x, y, self._fused)
        self._count += x.shape[0]

    def merge(self, other: RunningCrossCovariance) -> RunningCrossCovariance:
        """Fold another accumulator of the same shape into this one, in place (Chan's parallel merge).

        ``other`` may live on another device or use another dtype; its state is copied here first.

        Returns:
            self.
        """
        if not isinstance(other, RunningCrossCovariance):
            raise ValueError(f"can only merge a RunningCrossCovariance, got {type(other).__name__}")
        if (other.n, other.p) != (self.n, self.p):
            raise ValueError(f"cannot merge a ({other.n}, {other.p}) accumulator into a ({self.n}, {self.p}) one")
        if other is self:
            raise ValueError("cannot merge an accumulator into itself")
        if other._count == 0:
            return self
        theirs = [t.to(device=self.device, dtype=self.dtype if i == 0 else torch.float64)
                  for i, t in enumerate(other._state())]  # fmt: skip
        self._impl.running_cov_merge_(*self._state(), self._count, *theirs, other._count)
        self._count += other._count
        return self

    def covariance(self) -> torch.Tensor:
        """`[n, p]` unbiased (ddof = 1) cross-covariance, a new tensor on the accumulator's device."""
        self._require_two_draws("covariance()")
        return self._impl.running_cov_covariance(self._comoment, self._count)

    def correlation(self) -> torch.Tensor:
        """`[n, p]` Pearson cross-correlation, clamped to [-1, 1].

        A stream with (numerically) zero variance, i.e. sample std at most 16 ulps of its |mean|,
        has correlation 0 with every other stream, never NaN.
        """
        self._require_two_draws("correlation()")
        return self._impl.running_cov_correlation(*self._state(), self._count)

    def reset(self) -> None:
        """Forget every draw (keeps the allocation)."""
        self._count = 0
        for t in self._state():
            t.zero_()

    def state_dict(self) -> dict[str, Any]:
        """The state, as references to the live tensors (``torch.save`` it, or copy it)."""
        return {
            "n": self.n,
            "p": self.p,
            "count": self._count,
            "comoment": self._comoment,
            "mean_x": self._mean_x,
            "mean_y": self._mean_y,
            "m2_x": self._m2_x,
            "m2_y": self._m2_y,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by ``state_dict`` (copied onto this device and dtype).

        Raises:
            ValueError: missing keys or mismatched shapes; the state is then unchanged.
        """
        keys = ("n", "p", "count", "comoment", "mean_x", "mean_y", "m2_x", "m2_y")
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict misses {missing}")
        if (int(state_dict["n"]), int(state_dict["p"])) != (self.n, self.p):
            raise ValueError(f"state_dict is for n={state_dict['n']}, p={state_dict['p']}, not ({self.n}, {self.p})")
        count = int(state_dict["count"])
        if count < 0:
            raise ValueError(f"state_dict count must be non-negative, got {count}")
        shapes = {"comoment": (self.n, self.p), "mean_x": (self.n,), "mean_y": (self.p,), "m2_x": (self.n,)}
        shapes["m2_y"] = (self.p,)
        for k, shape in shapes.items():
            if tuple(state_dict[k].shape) != shape:
                raise ValueError(f"state_dict[{k!r}] has shape {tuple(state_dict[k].shape)}, expected {shape}")
        for k, dst in zip(("comoment", "mean_x", "mean_y", "m2_x", "m2_y"), self._state(), strict=True):
            dst.copy_(state_dict[k])
        self._count = count


def _check_flat(name: str, t: Any, numel: int, device: torch.device, *, dtype: torch.dtype | None = None) -> None:
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


def sgld_update_(
    w: torch.Tensor,
    grad: torch.Tensor,
    anchor: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    config: Any,
    seed: int = 0,
    chain: int = 0,
    step: int = 0,
    offset: int = 0,
    noise: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    diverged: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """One SGLD / RMSprop-SGLD / BAOAB step over a flat parameter buffer, in place, in one launch.

    The update rules and the noise stream are documented in ``bif_fast/reference/sgld_update.py``
    and ``bif_fast/reference/philox.py``. ``bif_fast.SGLD`` packs a model's parameters into such
    buffers and calls this once per dtype per step.

    Args:
        w (Tensor): `[N]` fp32, contiguous: the parameters (master copy), updated in place.
        grad (Tensor): `[N]` gradient of the mean minibatch loss, any float dtype.
        anchor (Tensor): `[N]` w*, any float dtype.
        state (Tensor | None): `[N]` fp32 RMSprop V or BAOAB velocity (required for those), else None.
        config (SGLDConfig): hyperparameters.
        seed (int): 64-bit noise key. chain (int), step (int): 32-bit counter words. Default: 0.
        offset (int): canonical index of ``w[0]``. Default: 0.
        noise (Tensor | None): `[N]` fp32 explicit noise (tests, custom streams). Default: Philox.
        out (Tensor | None): `[N]` tensor (e.g. bf16 model parameters) that receives the new w.
        diverged (Tensor | None): `[1]` int32 flag set to 1 if any new value is NaN or Inf.
        backend (str): ``auto`` | ``triton`` (CUDA, or the CPU interpreter) | ``ext`` (fused C++ loop,
            CPU) | ``torch`` (the reference). ``auto``: Triton on CUDA, the extension on CPU.

    Raises:
        ValueError: bad shapes, dtypes, devices or a missing state.

    Examples:
        >>> w = torch.zeros(10); g = torch.ones(10)
        >>> from bif_fast import SGLDConfig
        >>> sgld_update_(w, g, torch.zeros(10), config=SGLDConfig(lr=1e-2), backend="torch")
    """
    from bif_fast.config import SGLDConfig

    if not isinstance(config, SGLDConfig):
        raise ValueError(f"config must be an SGLDConfig, got {type(config).__name__}")
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"w must be a torch.Tensor, got {type(w).__name__}")
    _check_flat("w", w, w.numel(), w.device, dtype=torch.float32)
    n, device = w.numel(), w.device
    _check_flat("grad", grad, n, device)
    _check_flat("anchor", anchor, n, device)
    needs_state = config.sampler == "baoab" or config.precondition == "rmsprop"
    if needs_state:
        if state is None:
            raise ValueError(f"sampler={config.sampler!r}, precondition={config.precondition!r} needs a state tensor")
        _check_flat("state", state, n, device, dtype=torch.float32)
    if noise is not None:
        _check_flat("noise", noise, n, device, dtype=torch.float32)
    if out is not None:
        _check_flat("out", out, n, device)
    if diverged is not None:
        _check_flat("diverged", diverged, 1, device, dtype=torch.int32)
    for name, value in (("seed", seed), ("chain", chain), ("step", step), ("offset", offset)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if seed >= 2**64 or chain >= 2**32 or step >= 2**32:
        raise ValueError("seed must fit in 64 bits, chain and step in 32 bits")
    resolved = resolve_backend("sgld_update", device, backend)
    _sgld_update_resolved(
        resolved, w, grad, anchor, state if needs_state else None, config=config, seed=seed, chain=chain, step=step,
        offset=offset, noise=noise, out=out, diverged=diverged,
    )  # fmt: skip


def _sgld_update_resolved(resolved: str, w, grad, anchor, state, **kwargs) -> None:
    """``sgld_update_`` after validation, on a resolved backend (the optimizer's per-step path: its buffers
    were checked once when it packed them). ``state`` is None for plain SGLD."""
    if resolved == "triton":
        from bif_fast.kernels.sgld_update import sgld_update_triton

        sgld_update_triton(w, grad, anchor, state, **kwargs)
    elif resolved == "ext":
        _sgld_update_ext(w, grad, anchor, state, **kwargs)
    else:
        from bif_fast.reference.sgld_update import sgld_update_ as sgld_update_torch

        sgld_update_torch(w, grad, anchor, state, **kwargs)


_SAMPLER_CODE = {("sgld", "none"): 0, ("sgld", "rmsprop"): 1, ("baoab", "none"): 2}


@functools.lru_cache(maxsize=64)
def _coefficients(config, first_step: bool) -> dict[str, float]:
    from bif_fast.reference.sgld_update import step_coefficients

    return step_coefficients(config, 0 if first_step else 1)


def _sgld_update_ext(w, grad, anchor, state, *, config, seed, chain, step, offset, noise, out, diverged) -> None:
    """The fused C++ CPU step. It reads grad and anchor in one dtype and writes ``out`` in that dtype."""
    from bif_fast import _ext

    if grad.dtype != anchor.dtype:
        grad = grad.to(anchor.dtype)
    direct_out = out if out is None or out.dtype == anchor.dtype else None
    _ext._C.sgld_update_cpu_(
        w, grad, anchor, state, noise, direct_out, diverged, _SAMPLER_CODE[(config.sampler, config.precondition)],
        config.bounding_box_size is not None, offset, seed, chain, step, _coefficients(config, step == 0),
    )  # fmt: skip
    if out is not None and direct_out is None:
        out.copy_(w)


def philox_normal_(
    out: torch.Tensor, *, seed: int, chain: int, step: int, offset: int = 0, backend: str = "auto"
) -> torch.Tensor:
    """Fill fp32 ``out`` `[N]` with the sampler's noise for canonical elements ``offset ..``."""
    _check_flat("out", out, out.numel(), out.device, dtype=torch.float32)
    resolved = resolve_backend("sgld_update", out.device, backend)
    if resolved == "triton":
        from bif_fast.kernels.sgld_update import philox_normal_triton

        return philox_normal_triton(out, seed=seed, chain=chain, step=step, offset=offset)
    if resolved == "ext":
        from bif_fast import _ext

        _ext._C.philox_normal_cpu_(out, seed, chain, step, offset)
        return out
    from bif_fast.reference.philox import philox_normal

    return out.copy_(philox_normal(out.numel(), seed=seed, chain=chain, step=step, offset=offset))


def _ce_forward_impl(backend: str):
    if backend == "triton":
        from bif_fast.kernels import cross_entropy as k

        return k.per_token_cross_entropy_fwd_triton, k.cross_entropy_from_logits_fwd_triton
    from bif_fast.reference import cross_entropy as r

    return r.per_token_cross_entropy_fwd, r.cross_entropy_from_logits_fwd


class _PerTokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, backend):  # type: ignore[override]
        fwd = _ce_forward_impl(backend)[0]
        loss, lse = fwd(hidden, weight, targets, bias, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):  # type: ignore[override]
        from bif_fast.reference.cross_entropy import per_token_cross_entropy_bwd

        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dh, dw, db = per_token_cross_entropy_bwd(
            grad_loss, hidden, weight, targets, bias, lse, ctx.ignore_index, need_weight_grad=ctx.needs_input_grad[1]
        )
        return dh, dw, db, None, None, None


class _CrossEntropyFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, backend):  # type: ignore[override]
        loss, lse = _ce_forward_impl(backend)[1](logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        from bif_fast.reference.cross_entropy import cross_entropy_from_logits_bwd

        logits, targets, lse = ctx.saved_tensors
        return cross_entropy_from_logits_bwd(grad_loss, logits, targets, lse, ctx.ignore_index), None, None, None


def _check_targets(
    targets: Any, shape: tuple[int, ...], device: torch.device, vocab: int, ignore_index: int, validate: bool
) -> None:
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if tuple(targets.shape) != shape:
        raise ValueError(f"targets must have shape {list(shape)}, got {list(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device} but the inputs are on {device}")
    if validate and targets.numel():
        bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
        if bool(bad.any()):
            first = targets[bad][0].item()
            raise ValueError(
                f"target {first} is out of range for a vocabulary of {vocab} (ignore_index={ignore_index})"
            )


def per_token_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T (+ bias)`` without forming the logits.

    A Triton kernel (CUDA) tiles tokens and vocabulary and keeps an online logsumexp; the torch
    fallback streams the vocabulary in chunks. Either way memory grows with N, not N·V. Differentiable
    (the backward recomputes logits chunk by chunk from the saved logsumexp), so the same loss can drive
    the SGLD gradient.

    Args:
        hidden (Tensor): `[..., H]` fp32/bf16/fp16, the last hidden states.
        weight (Tensor): `[V, H]`, same dtype: the lm_head / output embedding.
        targets (Tensor): `[...]` integer token ids in ``[0, V)`` or ``ignore_index``.
        bias (Tensor | None): `[V]` lm_head bias, same dtype. Default: None.
        ignore_index (int): targets equal to it give loss 0. Default: -100.
        validate (bool): check targets are in range (on CUDA this reads one flag back). Default: True.
        backend (str): ``auto`` | ``triton`` | ``torch``.

    Returns:
        Tensor `[...]` (the shape of targets), fp32.

    Raises:
        ValueError: shape, dtype or device mismatches, or out-of-range targets.

    Examples:
        >>> h, w = torch.randn(6, 16), torch.randn(50, 16)
        >>> t = torch.tensor([1, 2, 3, -100, 4, 49])
        >>> per_token_cross_entropy(h, w, t, backend="torch").shape
        torch.Size([6])
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden [..., H] and weight [V, H] must agree on H, got {list(hidden.shape)} and {list(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be a [{weight.shape[0]}] tensor")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError("bias must have the dtype and device of weight")
    _check_targets(targets, tuple(hidden.shape[:-1]), hidden.device, weight.shape[0], ignore_index, validate)
    resolved = resolve_backend("cross_entropy", hidden.device, backend)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    w2 = weight if weight.stride(-1) == 1 else weight.contiguous()
    loss, _ = _PerTokenCrossEntropy.apply(h2, w2, bias, targets.reshape(-1).long(), ignore_index, resolved)
    return loss.reshape(targets.shape)


def cross_entropy_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token cross-entropy of existing logits, streaming over the vocabulary (no log-softmax tensor).

    Args:
        logits (Tensor): `[..., V]` fp32/bf16/fp16.
        targets (Tensor): `[...]` integer ids in ``[0, V)`` or ``ignore_index``.
        ignore_index (int): targets equal to it give loss 0. Default: -100.
        validate (bool): check targets are in range. Default: True.
        backend (str): ``auto`` | ``triton`` | ``torch``.

    Returns:
        Tensor of ``targets.shape``, fp32.

    Examples:
        >>> z = torch.randn(2, 3, 11)
        >>> cross_entropy_from_logits(z, torch.randint(0, 11, (2, 3)), backend="torch").shape
        torch.Size([2, 3])
    """
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point or logits.dim() < 1:
        raise ValueError("logits must be a floating-point tensor [..., V]")
    if logits.shape[-1] == 0:
        raise ValueError("logits have an empty vocabulary")
    _check_targets(targets, tuple(logits.shape[:-1]), logits.device, logits.shape[-1], ignore_index, validate)
    resolved = resolve_backend("cross_entropy", logits.device, backend)
    z2 = logits.reshape(-1, logits.shape[-1])
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    loss = _CrossEntropyFromLogits.apply(z2, targets.reshape(-1).long(), ignore_index, resolved)
    return loss.reshape(targets.shape)
