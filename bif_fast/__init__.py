"""bif_fast: fast, device-resident local Bayesian influence functions for PyTorch models.

The local BIF between a training unit i and a query observable j is minus the covariance of their
losses over draws from a posterior localised at the trained weights w*::

    BIF(i, j) = -Cov_w(l_i(w), phi_j(w))

``import bif_fast`` is cheap and never touches Triton, CUDA or the compiled extension; each op picks
its backend on first use (see ``python -m bif_fast info``). The submodules ``bif_fast.losses`` and
``bif_fast.compat`` are imported on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

from bif_fast._backend import available_backends
from bif_fast.api import compute_bif
from bif_fast.calibration import calibrate
from bif_fast.config import BIFConfig, SGLDConfig
from bif_fast.ops import (
    RunningCrossCovariance,
    cross_entropy_from_logits,
    per_token_cross_entropy,
    philox_normal_,
    sgld_update_,
)
from bif_fast.result import BIFError, BIFResult
from bif_fast.sampler import SGLD

__version__ = "0.1.0"

__all__ = [
    "BIFConfig",
    "BIFError",
    "BIFResult",
    "RunningCrossCovariance",
    "SGLD",
    "SGLDConfig",
    "cross_entropy_from_logits",
    "per_token_cross_entropy",
    "philox_normal_",
    "sgld_update_",
    "available_backends",
    "calibrate",
    "compute_bif",
    "__version__",
]

# Public submodules reachable as attributes (``bif_fast.losses.causal_lm``) without importing them here.
_LAZY_SUBMODULES = ("losses", "compat")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"bif_fast.{name}")
    raise AttributeError(f"module 'bif_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY_SUBMODULES])
