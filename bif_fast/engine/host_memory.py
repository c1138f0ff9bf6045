"""glibc malloc's adaptive thresholds, raised once before the first CPU sampling run of a process.

glibc serves blocks above its mmap threshold (128 KiB at start) with fresh mmap'd pages, and returns a
freed heap top above its trim threshold to the operating system, so a sampling loop that allocates and
frees multi-megabyte activations at every step can take a page fault on every page of them (measured on
the LDS harness's digits MLP: ~1,300 minor faults per batched full-batch step of 8 chains, a quarter of
the step). glibc raises both thresholds by itself whenever a program frees an mmap'd block larger than the
current threshold (to that block's size, at most 32 MiB on 64-bit systems; the trim threshold to twice
that). Freeing one block just under that maximum puts the process where any program that has once freed
such a buffer already is, without fixing a malloc setting (glibc keeps adapting): it costs one mmap and
one munmap, and up to 64 MiB of freed heap may stay with the process instead of going back to the
system. ``BIF_FAST_MALLOC_WARMUP=0`` leaves malloc alone.
"""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["raise_glibc_malloc_thresholds"]

#: Under glibc's largest adaptive mmap threshold (32 MiB on 64-bit), with room for the chunk header.
WARMUP_BYTES = 32 * 2**20 - 2**16

_done = False


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def raise_glibc_malloc_thresholds() -> bool:
    """Free one mmap'd block of ``WARMUP_BYTES`` (once per process, on 64-bit glibc); True if it did now."""
    global _done
    if _done or os.environ.get("BIF_FAST_MALLOC_WARMUP", "1") == "0":
        return False
    _done = True
    if sys.maxsize < 2**32 or not _glibc():
        return False
    block = torch.empty(WARMUP_BYTES, dtype=torch.uint8)  # never touched: no page is faulted in
    del block
    return True
