"""``RunningCrossCovariance``: the streaming centred cross-covariance behind every BIF estimate.

The math (Chan's rank-k update and parallel merge) is in ``bif_fast/reference/running_cov.py``, the
pure-torch twin of the compiled ``bif_fast._C`` entry points this class dispatches to.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch

from bif_fast._backend import Backend, resolve_backend
from bif_fast.ops._common import normalize_device
from bif_fast.reference import running_cov as _ref_cov

__all__ = ["RunningCrossCovariance"]

_STATE_DTYPES = (torch.float32, torch.float64)


def _running_cov_impl(backend: str) -> ModuleType:
    """The module-like object holding the ``running_cov_*`` functions of a resolved backend."""
    if backend == "ext":
        from bif_fast import _ext

        return _ext.C
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
        backend (Backend): ``auto`` | ``ext`` | ``torch``. Default: ``auto`` (the compiled extension when
            it is built, else the torch reference, with a one-time warning).

    Examples:
        >>> acc = RunningCrossCovariance(3, 2)
        >>> acc.update(torch.randn(32, 3), torch.randn(32, 2))
        >>> acc.update(torch.randn(5, 3), torch.randn(5, 2))
        >>> acc.count, acc.covariance().shape
        (37, torch.Size([3, 2]))
        >>> acc.finite(), [m.shape for m in acc.means()]
        (True, [torch.Size([3]), torch.Size([2])])
    """

    def __init__(
        self,
        n: int,
        p: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        backend: Backend = "auto",
    ) -> None:
        for name, value in (("n", n), ("p", p)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dtype not in _STATE_DTYPES:
            raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
        self.n, self.p = n, p
        self.dtype = dtype
        self.device = normalize_device(device)
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
        # Set by take_comoment(): the co-moment storage belongs to the caller until reset().
        self._taken = False

    def __repr__(self) -> str:
        taken = ", co-moment taken" if self._taken else ""
        return (
            f"RunningCrossCovariance(n={self.n}, p={self.p}, count={self._count}, device={self.device}, "
            f"dtype={self.dtype}, backend={self.backend!r}{taken})"
        )

    @property
    def count(self) -> int:
        """Number of draws accumulated."""
        return self._count

    @property
    def mean_x(self) -> torch.Tensor:
        """`[n]` running mean of ``x`` (a copy, in the accumulator's dtype)."""
        self._require_usable("read mean_x")
        return self._mean_x.to(self.dtype, copy=True)

    @property
    def mean_y(self) -> torch.Tensor:
        """`[p]` running mean of ``y`` (a copy, in the accumulator's dtype)."""
        self._require_usable("read mean_y")
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

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 copies of the running means, whatever the accumulator's dtype.

        Returns:
            tuple[Tensor, Tensor]: `[n]` mean of ``x`` and `[p]` mean of ``y``, float64, on the
            accumulator's device.
        """
        self._require_usable("call means()")
        return self._mean_x.clone(), self._mean_y.clone()

    def finite(self) -> bool:
        """Whether every accumulated draw was finite (True with no draws).

        Read off the float64 means, with one host read: a NaN or Inf in any draw makes a mean non-finite
        for good (``update(..., check_finite=False)`` lets such draws in).
        """
        self._require_usable("call finite()")
        return bool((torch.isfinite(self._mean_x).all() & torch.isfinite(self._mean_y).all()).item())

    @property
    def comoment(self) -> torch.Tensor:
        """`[n, p]` the live co-moment: the sum of centred products, in the accumulator's dtype.

        ``covariance = comoment / (count - 1)``. This is the accumulator's own state, not a copy: do not
        modify it in place unless you ``take_comoment()`` it first.
        """
        self._require_usable("read comoment")
        return self._comoment

    def take_comoment(self) -> torch.Tensor:
        """Hand the live `[n, p]` co-moment tensor over to the caller, who may then overwrite it.

        Lets a caller build its result in the accumulator's own storage (e.g. the covariance, in place)
        so the peak memory stays at one ``n × p`` matrix. Afterwards the accumulator holds 0 draws and
        refuses every use (``update``, ``merge`` into or from it, ``covariance``, ``correlation``,
        ``state_dict``, ...) until ``reset()``, which zeroes this same storage and reclaims it.

        Returns:
            Tensor: `[n, p]` the co-moment (the same storage as ``comoment``), in the accumulator's dtype.

        Examples:
            >>> acc = RunningCrossCovariance(3, 2)
            >>> acc.update(torch.randn(8, 3), torch.randn(8, 2))
            >>> count = acc.count
            >>> cov = acc.take_comoment().div_(count - 1)  # the covariance, in place
            >>> acc.count
            0
        """
        self._require_usable("call take_comoment()")
        comoment = self._comoment
        self._count = 0
        self._taken = True
        return comoment

    def _state(self) -> tuple[torch.Tensor, ...]:
        return (self._comoment, self._mean_x, self._mean_y, self._m2_x, self._m2_y)

    def _require_usable(self, what: str) -> None:
        if self._taken:
            raise ValueError(
                f"cannot {what}: this accumulator's co-moment was handed over by take_comoment(), so it "
                "holds no draws; call reset() to use it again"
            )

    def _require_two_draws(self, what: str) -> None:
        self._require_usable(f"compute {what}")
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
                ``check_finite``). The state is left exactly as it was. Also after ``take_comoment()``.
        """
        self._require_usable("call update()")
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

        Raises:
            ValueError: ``other`` is not an accumulator of the same shape, is ``self``, or either one's
                co-moment was handed over by ``take_comoment()``.
        """
        if not isinstance(other, RunningCrossCovariance):
            raise ValueError(f"can only merge a RunningCrossCovariance, got {type(other).__name__}")
        if (other.n, other.p) != (self.n, self.p):
            raise ValueError(f"cannot merge a ({other.n}, {other.p}) accumulator into a ({self.n}, {self.p}) one")
        if other is self:
            raise ValueError("cannot merge an accumulator into itself")
        self._require_usable("call merge()")
        if other._taken:
            raise ValueError(
                "cannot merge an accumulator whose co-moment was handed over by take_comoment(); reset() it first"
            )
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
        """Forget every draw, keeping the allocation (also the co-moment handed out by ``take_comoment()``,
        which is zeroed and becomes the accumulator's own again)."""
        self._count = 0
        self._taken = False
        for t in self._state():
            t.zero_()

    def state_dict(self) -> dict[str, Any]:
        """The state, as references to the live tensors (``torch.save`` it, or copy it).

        Raises:
            ValueError: after ``take_comoment()`` (the co-moment is no longer the accumulator's).
        """
        self._require_usable("call state_dict()")
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
            ValueError: missing keys or mismatched shapes, the state is then unchanged; or after
                ``take_comoment()``, as loading would overwrite the co-moment handed out (``reset()`` first).
        """
        self._require_usable("call load_state_dict()")
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
