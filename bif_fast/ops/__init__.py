"""Public ops and their backend dispatch, one module per op (the name it has in ``kernels/``,
``reference/``, ``tests/ops/`` and ``benchmarks/``).

Each op has a pure-torch reference in ``bif_fast.reference`` with the same signature as its fast path
(the Triton launchers in ``bif_fast.kernels``, ``bif_fast._C`` for the running covariance and the CPU
sampler step); ``backend="auto"`` picks the fast one where it is available and says once why when it
is not. Importing this package loads neither Triton nor the kernels: each op imports its fast path on
first use.
"""

from __future__ import annotations

from bif_fast.ops.cross_entropy import cross_entropy_from_logits, per_token_cross_entropy
from bif_fast.ops.running_cov import RunningCrossCovariance
from bif_fast.ops.sgld_update import (
    init_sampler_state_,
    philox_normal_,
    philox_normal_rows_,
    sgld_update_,
    sgld_update_resolved_,
    sgld_update_rows_resolved_,
)

__all__ = [
    "RunningCrossCovariance",
    "cross_entropy_from_logits",
    "init_sampler_state_",
    "per_token_cross_entropy",
    "philox_normal_",
    "philox_normal_rows_",
    "sgld_update_",
    "sgld_update_resolved_",
    "sgld_update_rows_resolved_",
]
