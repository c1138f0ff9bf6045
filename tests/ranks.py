"""Spawn gloo process groups on loopback from inside the test suite (file rendezvous in the test's tmp dir).

``spawn_ranks(worker, world, tmp_path, case)`` starts ``world`` processes that each join the group, call
``worker(rank, world, tmp, case)`` (a module-level function returning a JSON-able dict, or raising) and write
what it gave, or the exception, to ``{case}-rank{r}.json``; the parent reads them back, or fails the test when
a rank hangs (a collective that some rank never joins).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

TIMEOUT_S = 300  # three spawned ranks importing torch on a loaded 2-core machine


def _entry(rank: int, world: int, tmp: str, case: str, worker: Callable[[int, int, str, str], dict]) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous-{case}", rank=rank,
                                         world_size=world)  # fmt: skip
    try:
        out = {"ok": True, **worker(rank, world, tmp, case)}
    except Exception as e:
        out = {"ok": False, "type": type(e).__name__, "message": str(e), "rank": getattr(e, "rank", None)}
    finally:
        torch.distributed.destroy_process_group()
    (Path(tmp) / f"{case}-rank{rank}.json").write_text(json.dumps(out))
    # Leave without the interpreter's teardown: after FSDP ran on gloo, a rank's C++ background threads
    # were seen to abort the process at exit ("terminate called without an active exception") in 2 of ~40
    # runs under load, after its result was written.
    os._exit(0)


def spawn_ranks(worker: Callable[[int, int, str, str], dict], world: int, tmp_path: Path, case: str) -> list[dict]:
    """Every rank's dict (``ok`` False with ``type`` / ``message`` / ``rank`` where ``worker`` raised)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_entry, args=(world, str(tmp_path), case, worker), nprocs=world, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish in {TIMEOUT_S} s (a rank waiting in a collective?)")
    return [json.loads((tmp_path / f"{case}-rank{r}.json").read_text()) for r in range(world)]
