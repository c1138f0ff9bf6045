"""Frozen, validated configuration objects. Change one with ``dataclasses.replace``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["SGLDConfig"]

Sampler = Literal["sgld", "baoab"]
Precondition = Literal["none", "rmsprop"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, kw_only=True)
class SGLDConfig:
    """Hyperparameters of the localised posterior sampler (devinterp's names and parametrisation).

    The update rules are written out once, in ``bif_fast/reference/sgld_update.py``. ``nbeta``
    multiplies the gradient of the *mean* minibatch loss, so ``nbeta = beta * n`` in the paper's
    Algorithm 1 (whose step uses ``beta * n / m`` times the *sum* over a minibatch of m), and
    ``localization`` is the paper's gamma.

    Examples:
        >>> cfg = SGLDConfig(lr=1e-4, nbeta=100.0, localization=100.0)
        >>> import dataclasses
        >>> dataclasses.replace(cfg, precondition="rmsprop").precondition
        'rmsprop'
    """

    lr: float = field(default=1e-4, metadata=_help("step size epsilon (> 0)"))
    nbeta: float = field(default=100.0, metadata=_help("inverse temperature times dataset size (> 0)"))
    localization: float = field(default=100.0, metadata=_help("gamma: strength of the pull back to w* (>= 0)"))
    weight_decay: float = field(default=0.0, metadata=_help("L2 prior centred at 0 (>= 0)"))
    noise_level: float = field(default=1.0, metadata=_help("multiplies the injected noise (>= 0); 1 is exact SGLD"))
    sampler: Sampler = field(default="sgld", metadata=_help("'sgld' (overdamped) or 'baoab' (kinetic Langevin)"))
    precondition: Precondition = field(default="none", metadata=_help("'none' or 'rmsprop' (sgld only)"))
    rmsprop_alpha: float = field(default=0.99, metadata=_help("RMSprop decay of the squared-gradient average"))
    rmsprop_eps: float = field(default=0.1, metadata=_help("RMSprop damping added to sqrt(V) (> 0)"))
    friction: float = field(default=1.0, metadata=_help("BAOAB friction coefficient (> 0)"))
    bounding_box_size: float | None = field(default=None, metadata=_help("clamp w to w* ± this (> 0), or None"))

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"SGLDConfig.{name} {why}, got {getattr(self, name)!r}")

        for name in ("lr", "nbeta", "localization", "weight_decay", "noise_level", "rmsprop_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(name, "must be a finite number")
        for name in ("rmsprop_eps", "friction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                fail(name, "must be a finite number > 0")
        if self.lr <= 0:
            fail("lr", "must be > 0")
        if self.nbeta <= 0:
            fail("nbeta", "must be > 0")
        for name in ("localization", "weight_decay", "noise_level"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if not 0.0 <= self.rmsprop_alpha < 1.0:
            fail("rmsprop_alpha", "must be in [0, 1)")
        if self.sampler not in ("sgld", "baoab"):
            fail("sampler", "must be 'sgld' or 'baoab'")
        if self.precondition not in ("none", "rmsprop"):
            fail("precondition", "must be 'none' or 'rmsprop'")
        if self.sampler == "baoab" and self.precondition != "none":
            fail("precondition", "must be 'none' with sampler='baoab'")
        if self.bounding_box_size is not None and not (
            isinstance(self.bounding_box_size, (int, float)) and 0 < self.bounding_box_size < math.inf
        ):
            fail("bounding_box_size", "must be None or a finite number > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SGLDConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SGLDConfig fields {sorted(unknown)}")
        return cls(**d)
