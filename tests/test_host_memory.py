"""engine.host_memory: one freed mmap'd block raises glibc's adaptive malloc thresholds, so the large
temporaries of a CPU sampling loop come from the heap instead of fresh pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bif_fast.engine.host_memory import _glibc

pytestmark = pytest.mark.skipif(not _glibc() or sys.maxsize < 2**32, reason="glibc malloc on 64-bit only")

# A 24 MiB malloc is mmap'd (counted in mallinfo's hblks) under glibc's starting threshold, and comes from
# the heap once the threshold has adapted to a freed 32 MiB block.
_PROBE = """
import ctypes, sys
import torch  # imported first, as in any run
from bif_fast.engine.host_memory import raise_glibc_malloc_thresholds
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                            "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
did = raise_glibc_malloc_thresholds() if sys.argv[1] == "warm" else None
again = raise_glibc_malloc_thresholds() if sys.argv[1] == "warm" else None
before = libc.mallinfo().hblks
p = libc.malloc(24 * 2**20)
mapped = libc.mallinfo().hblks - before
libc.free(p)
print(did, again, mapped)
"""


def _probe(mode: str, **env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=120)  # fmt: skip
    return out.stdout.split()


def test_a_large_block_is_mmapped_until_the_thresholds_are_raised_once():
    assert _probe("cold") == ["None", "None", "1"]
    assert _probe("warm") == ["True", "False", "0"]


def test_the_switch_leaves_malloc_alone():
    assert _probe("warm", BIF_FAST_MALLOC_WARMUP="0") == ["False", "False", "1"]


def test_compute_bif_raises_them_before_sampling_on_cpu(monkeypatch):
    import torch
    from torch.utils.data import TensorDataset

    import bif_fast.engine.run as run_mod
    from bif_fast import BIFConfig, SGLDConfig, compute_bif

    calls = []
    monkeypatch.setattr(run_mod, "raise_glibc_malloc_thresholds", lambda: calls.append(1) or True)
    model = torch.nn.Linear(3, 1).double()
    data = TensorDataset(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64))
    loss = lambda m, b: 0.5 * (m(b[0]).squeeze(-1) - b[1]).square()  # noqa: E731
    cfg = BIFConfig(sgld=SGLDConfig(lr=1e-3, nbeta=10.0), num_chains=2, num_draws=3, batch_size="full")
    compute_bif(model, data, data, loss_fn=loss, config=cfg)
    assert calls == [1]
