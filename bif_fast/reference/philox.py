"""Counter-based Gaussian noise, bit for bit the same as the Triton kernels' (numpy, CPU).

Every element of the sampled parameters has a fixed index ``e`` in one canonical flattening. Its
noise at step ``t`` of chain ``c`` under seed ``s`` is a pure function of ``(s, c, t, e)``:

    group g = e // 4, lane = e % 4
    (x0, x1, x2, x3) = Philox4x32-10(key = (s mod 2^32, s >> 32), counter = (g mod 2^32, g >> 32, t, c))
    u_i = (x_i >> 8) · 2^-24 + 2^-25                    uniform on (0, 1), exact in float32
    (z0, z1) = BoxMuller(u0, u1), (z2, z3) = BoxMuller(u2, u3)
    BoxMuller(a, b) = (r cos θ, r sin θ),  r = sqrt(-2 ln a),  θ = 2π b     (float32)
    xi_e = z_lane

One Philox call yields the noise of four consecutive elements, so the kernel spends one Philox
evaluation per four parameters and stays memory-bound. The stream does not depend on the block size,
the grid or how the parameters are split into tensors; chains differ in the counter word ``c`` and so
draw independent streams. Step ``2^32 - 1`` is reserved for the BAOAB initial velocity.

The Philox rounds follow Salmon et al. (2011) with the constants of Triton's ``tl.philox``;
``tests/ops/test_sgld_update.py`` checks this module against ``tl.philox`` and the kernel bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["philox4x32", "philox_normal", "INIT_VELOCITY_STEP"]

INIT_VELOCITY_STEP = 0xFFFFFFFF

_M32 = np.uint64(0xFFFFFFFF)
_KEY_A = np.uint64(0x9E3779B9)
_KEY_B = np.uint64(0xBB67AE85)
_ROUND_A = np.uint64(0xD2511F53)
_ROUND_B = np.uint64(0xCD9E8D57)
_SHIFT = np.uint64(32)
_TWO_PI = np.float32(6.283185307179586)
_INV_2_24 = np.float32(2.0**-24)
_HALF_ULP = np.float32(2.0**-25)


def philox4x32(
    c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, c3: np.ndarray, seed: int, rounds: int = 10
) -> tuple[np.ndarray, ...]:
    """Philox4x32 on uint64 arrays holding 32-bit words (products of two words fit in uint64 exactly)."""
    k0 = np.uint64(seed & 0xFFFFFFFF)
    k1 = np.uint64((seed >> 32) & 0xFFFFFFFF)
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _M32 for c in (c0, c1, c2, c3))  # scalars broadcast
    for _ in range(rounds):
        prod_b = _ROUND_B * c2
        prod_a = _ROUND_A * c0
        c0, c1, c2, c3 = (
            (prod_b >> _SHIFT) ^ c1 ^ k0,
            prod_b & _M32,
            (prod_a >> _SHIFT) ^ c3 ^ k1,
            prod_a & _M32,
        )
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform(x: np.ndarray) -> np.ndarray:
    return (x >> np.uint64(8)).astype(np.float32) * _INV_2_24 + _HALF_ULP


def _box_muller(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.sqrt(np.float32(-2.0) * np.log(a))
    theta = _TWO_PI * b
    return r * np.cos(theta), r * np.sin(theta)


def philox_normal(
    numel: int, *, seed: int, chain: int, step: int, offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard normal noise `[numel]` fp32 for canonical elements ``offset .. offset + numel - 1``.

    Args:
        numel (int): number of elements.
        seed (int): 64-bit key. chain (int), step (int): 32-bit counter words.
        offset (int): canonical index of the first element. Default: 0.
        device: where the returned tensor goes (computed on the CPU).

    Examples:
        >>> a = philox_normal(10, seed=1, chain=0, step=3)
        >>> b = philox_normal(6, seed=1, chain=0, step=3, offset=4)
        >>> bool((a[4:] == b).all())
        True
    """
    if numel == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    first_group = offset // 4
    last_group = (offset + numel - 1) // 4
    groups = np.arange(first_group, last_group + 1, dtype=np.uint64)
    x = philox4x32(
        groups & _M32,
        groups >> _SHIFT,
        np.uint64(step & 0xFFFFFFFF),
        np.uint64(chain & 0xFFFFFFFF),
        seed,
    )
    z0, z1 = _box_muller(_uniform(x[0]), _uniform(x[1]))
    z2, z3 = _box_muller(_uniform(x[2]), _uniform(x[3]))
    z = np.stack([z0, z1, z2, z3], axis=1).reshape(-1)  # lane-major within each group
    start = offset - 4 * first_group
    return torch.from_numpy(np.ascontiguousarray(z[start : start + numel])).to(device)
