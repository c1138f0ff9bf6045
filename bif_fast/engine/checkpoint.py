"""Resumable runs: ``compute_bif(..., checkpoint=PATH)``.

``PATH`` is a directory. Each rank keeps one file, ``state-rank{r}-of-{w}.safetensors``: its pool (the
merged accumulators of its finished chains, the standard error's state), its finished chains' traces and
escape statistics, the mass, and in the safetensors header a JSON record of what made it (the format,
the bif_fast version, the config, the sampled parameters' shapes, dtypes and checksums, the data sizes,
the world size) and a SHA-256 of every tensor. The file is rewritten after every finished group of
chains and, inside a group, after an accumulator update once ``Checkpoint.interval_s`` (300 s) have
passed since the last write; such a write also holds the running chains: their weights, sampler state and
step counter (which keys their noise), the model's buffers, their accumulators and traces so far, and
(by the step count) where their minibatch streams are. Every write goes to a temporary name, is flushed
to disk, then renamed over the old file, so a kill at any moment leaves either the previous state or the
new one, never a mixture. The finished run's result goes
to ``PATH/result/`` the same way (a temporary directory renamed), written by rank 0.

With ``shard_rows`` the ranks run the same chains in lockstep (their gradients are summed at every step),
so they must resume from the same point. Their writes are agreed (a write inside a chain happens when it
is due on some rank, on every rank at the same draw) and numbered (``generation``), and each rank keeps
its previous state too (``prev-state-rank{r}-of-{w}.safetensors``, a hard link to the replaced file): a kill
in the middle of a write leaves every rank holding the last generation all of them finished, from which
they all resume. Each rank's shard of the result goes to ``PATH/result-rank{r}-of-{w}/``.

Resuming restores the pool's float64 state bit for bit, continues a running group from its last draw
and runs the chains not yet started with the same keys (noise by ``(seed, chain, step)``, minibatches by
chain, replayed past the batches already used), so the result equals an uninterrupted run's on the same
backend. A state written for another config, model or data is refused with a
``ValueError`` naming every difference; a truncated or altered file with a ``ValueError`` saying it is
damaged. Neither ever starts afresh silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bif_fast.engine.distributed import Ranks
from bif_fast.engine.sharded import checksums

__all__ = ["Checkpoint", "Restored", "json_normal", "run_identity"]

FORMAT = 1
_META_KEY = "bif_fast"


def _data_len(data: Any) -> int | None:
    from torch.utils.data import DataLoader

    dataset = data.dataset if isinstance(data, DataLoader) else data
    try:
        return len(dataset)
    except TypeError:
        return None


def run_identity(sampled: Sequence[torch.Tensor], train: Any, query: Any, *, config: dict[str, Any] | None,
                 per_token: bool, world: int) -> dict[str, Any]:  # fmt: skip
    """What a checkpoint must agree on with the call that resumes it (``config`` None: calibrated defaults,
    whose chosen config the checkpoint itself supplies)."""
    from bif_fast import __version__

    sums = [checksums(p) for p in sampled]
    config = None if config is None else {k: v for k, v in config.items() if k not in ("progress", "calibration")}
    return json_normal({
        "format": FORMAT,
        "version": __version__,
        "config": config,
        "per_token": per_token,
        "params": [[list(p.shape), str(p.dtype).removeprefix("torch.")] for p in sampled],
        "param_checksums": sums,
        "train_len": _data_len(train),
        "query_len": _data_len(query),
        "world_size": world,
    })


def json_normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so records compare with what was stored."""
    return json.loads(json.dumps(value))


def _differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, this call {b!r}")
    return out


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(list(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Restored:
    """A rank's state read back: the tensors and the JSON record (``meta``)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    finished: list[int] = field(default_factory=list)


class Checkpoint:
    """One run's checkpoint directory, as seen from one rank.

    Attributes:
        interval_s (float): seconds between writes inside a chain (between groups of chains a write follows
            every group). Default 300, or the environment's ``BIF_FAST_CHECKPOINT_SECONDS``.
    """

    def __init__(self, path: str | os.PathLike, ranks: Ranks, identity: dict[str, Any], *, lockstep: bool = False):
        self.dir = Path(path)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"checkpoint {self.dir} exists and is not a directory")
        self.ranks, self.identity = ranks, identity
        self.lockstep = lockstep  # shard_rows: ranks write and resume together (module docstring)
        self.interval_s = float(os.environ.get("BIF_FAST_CHECKPOINT_SECONDS", "300"))

    @property
    def state_file(self) -> Path:
        return self.dir / f"state-rank{self.ranks.rank}-of-{self.ranks.world}.safetensors"

    @property
    def previous_file(self) -> Path:
        """Lockstep: the state this rank replaced last (its generation is one below the state file's)."""
        return self.dir / f"prev-{self.state_file.name}"

    @property
    def result_dir(self) -> Path:
        if self.lockstep:
            return self.dir / f"result-rank{self.ranks.rank}-of-{self.ranks.world}"
        return self.dir / "result"

    def _check_world(self) -> None:
        others = sorted(p.name for p in self.dir.glob("state-rank*-of-*.safetensors")
                        if not p.name.endswith(f"-of-{self.ranks.world}.safetensors"))  # fmt: skip
        if others:
            raise ValueError(f"checkpoint {self.dir} was written by another number of processes ({others[0]}); "
                             f"this run has {self.ranks.world}: resume with as many, or use a new path")

    def read(self, path: Path | None = None) -> Restored | None:
        """This rank's state, checked against this call (None: nothing written yet)."""
        if self.dir.exists():
            self._check_world()
        path = self.state_file if path is None else path
        if not path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[_META_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        except Exception as e:
            raise ValueError(f"checkpoint {path} is damaged ({type(e).__name__}: {e}); delete it to start afresh "
                             f"or restore an intact copy") from e  # fmt: skip
        if meta.get("sha256") != _digest(tensors):
            raise ValueError(f"checkpoint {path} is damaged (its tensors do not match the checksum it recorded); "
                             f"delete it to start afresh or restore an intact copy")  # fmt: skip
        self.check(meta["identity"], path)
        return Restored(tensors, meta, list(meta.get("finished", [])))

    def check(self, stored: dict[str, Any], path: Path, skip: tuple[str, ...] = ()) -> None:
        """Refuse a record made by another run, naming what differs (``config`` None on either side: the
        calibrated defaults, whose config comes from the checkpoint)."""
        current = {k: v for k, v in self.identity.items() if k not in skip}
        if current.get("config") is None or stored.get("config") is None:
            stored = {k: v for k, v in stored.items() if k != "config"}
            current.pop("config", None)
        diffs = _differences(stored, current)
        if diffs:
            raise ValueError(f"checkpoint {path} was written by a different run: " + "; ".join(diffs))

    def write(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Replace this rank's state atomically (temporary file, fsync, rename)."""
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(self.state_file.name + ".tmp-*"):  # a write a kill cut short
            stale.unlink(missing_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        record = dict(meta, identity=self.identity, sha256=_digest(tensors))
        tmp = self.state_file.with_name(self.state_file.name + f".tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(record)})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            if self.lockstep and self.state_file.exists():
                self._keep_previous()
            os.replace(tmp, self.state_file)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(self.dir)

    def _keep_previous(self) -> None:
        """The state file about to be replaced, kept as ``previous_file`` (a hard link, or a copy where the
        filesystem has none), itself replaced atomically."""
        tmp = self.previous_file.with_name(self.previous_file.name + f".tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(self.state_file, tmp)
        except OSError:
            shutil.copy2(self.state_file, tmp)
        os.replace(tmp, self.previous_file)

    def _generation(self, path: Path) -> int:
        """The generation recorded in a state file's header (its tensors are not read).

        Raises:
            ValueError: the header cannot be read.
        """
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return int(json.loads((f.metadata() or {})[_META_KEY]).get("generation", 0))
        except Exception as e:
            raise ValueError(f"checkpoint {path} is damaged ({type(e).__name__}: {e}); delete it to start afresh "
                             f"or restore an intact copy") from e  # fmt: skip

    def read_common(self) -> Restored | None:
        """Lockstep: the newest generation that every rank holds (as its state or its previous state), read
        on every rank; None when no rank has written anything but a generation 0 (which holds no work).

        Raises:
            ValueError: a damaged file on some rank, or a rank missing the generation the others resume from.
        """
        error, found = None, {}
        try:  # the headers only: the chosen file alone is read whole and verified, below
            for path in (self.previous_file, self.state_file):  # the state file wins a tie
                if path.exists():
                    found[self._generation(path)] = path
        except Exception as e:  # every rank learns of it, then raises
            error = e
        self.ranks.raise_if_any_failed(error)
        held = self.ranks.all_gather(sorted(found))
        newest = [max(g, default=-1) for g in held]
        target = min(newest)
        if target < 0:
            if max(newest) > 0:
                raise ValueError(f"checkpoint {self.dir}: ranks {[r for r, g in enumerate(held) if not g]} hold no "
                                 f"state while others hold generation {max(newest)}: restore the missing files "
                                 f"or use a new path")  # fmt: skip
            return None
        lacking = [r for r, g in enumerate(held) if target not in g]
        if lacking:
            raise ValueError(f"checkpoint {self.dir}: ranks {lacking} lack generation {target}, the newest every "
                             f"other rank holds (files were lost or replaced): use a new path")  # fmt: skip
        path, restored = found[target], None
        try:
            restored = self.read(path)
        except Exception as e:
            error = e
        self.ranks.raise_if_any_failed(error)
        if path != self.state_file:  # this rank got further: its newer state is dropped, so that its next
            os.replace(path, self.state_file)  # write keeps generation `target` as the previous one
            _fsync_dir(self.dir)
        return restored

    def write_result(self, result) -> None:
        """``result`` (a ``BIFResult``) into ``result/``, atomically (rank 0 only; lockstep: every rank its
        own shard)."""
        if (self.ranks.rank != 0 and not self.lockstep) or self.result_dir.exists():
            return
        tmp = self.dir / f"result.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        result.save(tmp)
        (tmp / "identity.json").write_text(json.dumps(self.identity, indent=1))
        os.replace(tmp, self.result_dir)
        _fsync_dir(self.dir)

    def read_result(self, device: torch.device):
        """The finished run's result, if there is one and it is this call's (else None)."""
        from bif_fast.result import BIFResult

        if not self.result_dir.exists():
            return None
        try:
            stored = json.loads((self.result_dir / "identity.json").read_text())
            result = BIFResult.load(self.result_dir, device=device)
        except Exception as e:
            raise ValueError(f"checkpoint result {self.result_dir} is damaged ({type(e).__name__}: {e}); delete "
                             f"it to recompute it from the chains' state") from e  # fmt: skip
        if self.lockstep:  # a shard of the rows: made by as many processes
            self.check(stored, self.result_dir)
        else:  # the result does not depend on how many processes made it
            self.check({k: v for k, v in stored.items() if k != "world_size"}, self.result_dir,
                       skip=("world_size",))  # fmt: skip
        return result

    def agreed_result(self, device: torch.device):
        """The stored result if every rank finds it (None if none does); a clear error if only some do
        (lockstep: None, and every rank rebuilds its shard from its state)."""
        error, result = None, None
        try:
            result = self.read_result(device)
        except Exception as e:  # every rank learns of it, then raises
            error = e
        self.ranks.raise_if_any_failed(error)
        found = self.ranks.all_gather(result is not None)
        if self.lockstep and not all(found):  # a kill between the shards' writes: all finish from their state
            return None
        if any(found) and not all(found):
            raise ValueError(f"checkpoint {self.result_dir} holds the finished result for ranks "
                             f"{[r for r, f in enumerate(found) if f]} only: give every rank a path it can read "
                             f"(a shared filesystem)")  # fmt: skip
        return result

    def calibrated(self, device: torch.device) -> tuple[Any, Any]:
        """``(config, mass)`` of a calibrated run stored on rank 0, for every rank (``(None, None)``: none)."""
        from bif_fast.config import BIFConfig
        from bif_fast.engine.mass import LowRankMass

        def stored():
            restored = self.read()
            if restored is None:
                return None
            t, meta = restored.tensors, restored.meta
            mass = (t["mass.basis"], t["mass.scale"], meta["mass_a_ref"]) if "mass.basis" in t else None
            return meta["config"], mass

        got = self.ranks.from_root(stored)
        if got is None:
            return None, None
        config, mass = got
        if mass is not None:
            mass = LowRankMass(mass[0].to(device), mass[1].to(device), mass[2])
        return BIFConfig.from_dict(config), mass
