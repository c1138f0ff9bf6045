"""``compute_bif``: the local Bayesian influence function of any differentiable PyTorch model.

This module validates the call and wraps the result; the chain machinery is in ``bif_fast.engine``
(the draw loop in ``engine/run.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from bif_fast._backend import Backend
from bif_fast.calibration import Calibrated, calibrate_with_mass
from bif_fast.config import BIFConfig
from bif_fast.engine.checkpoint import Checkpoint, run_identity
from bif_fast.engine.data import check_eval_data, check_sgld_data
from bif_fast.engine.distributed import Ranks
from bif_fast.engine.run import run_bif
from bif_fast.engine.sharded import any_sharded
from bif_fast.engine.units import LossFn
from bif_fast.result import BIFError, BIFResult

__all__ = ["compute_bif", "BIFResult", "BIFError"]


def compute_bif(
    model: torch.nn.Module,
    train: Dataset | DataLoader,
    query: Dataset | DataLoader,
    *,
    loss_fn: LossFn,
    config: BIFConfig | None = None,
    per_token: bool = False,
    sgld_data: Any = None,
    params: Sequence[torch.Tensor] | None = None,
    backend: Backend = "auto",
    checkpoint: str | os.PathLike | None = None,
) -> BIFResult:
    """Local BIF between every training unit and every query unit (paper Algorithm 1).

    Args:
        model (nn.Module): the trained model; its current weights are w*. Left exactly as it was.
        train (Dataset | DataLoader): training data; its order defines the rows.
        query (Dataset | DataLoader): query data; its order defines the columns.
        loss_fn (callable): ``loss_fn(model, batch) -> Tensor[B]`` per-sample losses, or ``Tensor[B, T]``
            per-token losses with ``per_token=True``. Per token, the positions that count are declared:
            ``loss_fn`` returns ``(losses, mask)`` with ``mask`` true where a position counts, or has a
            ``loss_mask(batch)`` method (``bif_fast.losses.causal_lm`` does); otherwise every position
            is a unit. The mean of the same function over an SGLD minibatch (over the positions that
            count, per token) drives the sampler.
        config (BIFConfig | None): sampling and evaluation settings, used exactly as given. Default (None): the
            calibrated settings ``bif_fast.calibrate`` chooses from the model and the data (curvature, the
            re-fit probe, a 30-second budget), recorded in ``res.diagnostics["calibration"]``.
        per_token (bool): one unit per counted token instead of per sample. Default: False.
        sgld_data (Dataset | DataLoader | ChainMinibatches | None): source of SGLD minibatches. Default:
            ``train``, shuffled by a generator seeded with (seed, chain). A DataLoader is iterated as
            given (its own order, restarted for every chain); an object with ``minibatches(chain)`` gives
            each chain its own stream (``bif_fast.engine.data.ChainMinibatches``).
        params (Sequence[Tensor] | None): parameters to sample; the rest stay at w*. Default: all
            parameters with ``requires_grad``.
        backend (str): sampler backend (``auto`` | ``triton`` | ``ext`` | ``torch``).
        checkpoint (str | PathLike | None): a directory for a resumable run (``bif_fast.engine.checkpoint``):
            the state is written atomically after every finished group of chains, the same call resumes from
            it and returns exactly the uninterrupted result, and once finished returns the stored result at
            once. A checkpoint of another config, model or data is refused (``ValueError``). Default: None.

    Inside an initialised ``torch.distributed`` default process group (e.g. under ``torchrun``), chain c runs
    on rank ``c % world_size`` and every rank returns the full result, equal to one process's
    (``bif_fast.engine.distributed``); rank 0 calibrates for all. With ``BIFConfig(shard_rows=True)`` each
    rank holds a slice of the training rows instead (``res.train_rows``) and runs every chain; the calibrated
    settings for that mode come from ``bif_fast.calibrate(..., shard_rows=True)`` called on every rank.

    Returns:
        BIFResult.

    Raises:
        ValueError: bad arguments, empty data, losses of the wrong shape, or non-finite losses at w*.
        BIFError: every chain diverged (the diagnostics are attached).

    Examples:
        >>> model = torch.nn.Linear(3, 1)
        >>> data = torch.utils.data.TensorDataset(torch.randn(20, 3), torch.randn(20, 1))
        >>> loss_fn = lambda m, b: (m(b[0]) - b[1]).pow(2).squeeze(1)
        >>> cfg = BIFConfig(sgld=SGLDConfig(lr=1e-3, nbeta=20.0), num_chains=2, num_draws=50)
        >>> compute_bif(model, data, data, loss_fn=loss_fn, config=cfg).bif.shape  # doctest: +SKIP
        torch.Size([20, 20])
    """
    if config is not None and not isinstance(config, BIFConfig):
        raise ValueError(f"config must be a BIFConfig, got {type(config).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise ValueError("loss_fn must be callable as loss_fn(model, batch)")
    sampled = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not sampled:
        raise ValueError("no parameters to sample (pass params= or set requires_grad)")
    check_eval_data(train, "train")
    check_eval_data(query, "query")
    if config is None and sgld_data is not None:
        raise ValueError("the calibrated defaults (config=None) take full-batch gradients of train; pass a "
                         "config to sample with sgld_data")  # fmt: skip
    if any_sharded(sampled) and (config is None or not config.shard_rows):
        raise ValueError("an FSDP-sharded model samples every chain on every rank over its own rows: pass "
                         "config=BIFConfig(..., shard_rows=True) (the calibrated defaults, config=None, run on "
                         "rank 0 alone, which cannot run a sharded model)")  # fmt: skip
    if config is not None and config.shard_rows:
        _check_shard_rows(config, train, sampled)
    device, ranks, mass, ckpt = sampled[0].device, Ranks.current(), None, None
    if checkpoint is not None:
        ckpt = _open_checkpoint(checkpoint, ranks, sampled, train, query, per_token, config)
        done = ckpt.agreed_result(device)
        if done is not None:
            return done
        if config is None:  # a calibrated run resumes with the config and mass it chose
            config, mass = ckpt.calibrated(device)
    if config is None:
        # In a process group rank 0 calibrates and every rank samples with its choice (the lengths come
        # from timings, which differ between ranks).
        calibrated = ranks.from_root(
            lambda: calibrate_with_mass(model, train, query, loss_fn=loss_fn, per_token=per_token, params=sampled,
                                        backend=backend),
            to_wire=lambda c: Calibrated(c.config, None if c.mass is None else c.mass.to(torch.device("cpu"))),
            from_wire=lambda c: Calibrated(c.config, None if c.mass is None else c.mass.to(device)))  # fmt: skip
        config, mass = calibrated.config, calibrated.mass
    if config.batch_size == "full" and sgld_data is not None:
        raise ValueError("batch_size='full' takes its gradients from train itself; pass sgld_data=None")
    sgld_source = check_sgld_data(train if sgld_data is None else sgld_data)
    out = run_bif(model, sampled, train, query, loss_fn=loss_fn, config=config, per_token=per_token,
                  sgld_source=sgld_source, backend=backend, mass=mass, checkpoint=ckpt)  # fmt: skip
    if config.calibration is not None:
        out.diagnostics["calibration"] = config.calibration
    res = BIFResult(
        bif=out.bif,
        bif_normalized=out.bif_normalized,
        stderr=out.stderr,
        diagnostics=out.diagnostics,
        config=config,
        per_token=per_token,
        train_index=out.train_index,
        query_index=out.query_index,
        train_rows=out.train_rows,
    )
    if ckpt is not None:
        ckpt.write_result(res)
    return res


def _open_checkpoint(path: str | os.PathLike, ranks: Ranks, sampled: list, train: Any, query: Any, per_token: bool,
                     config: BIFConfig | None) -> Checkpoint:  # fmt: skip
    """The run's checkpoint directory; with row shards the ranks write and resume in lockstep."""
    identity = run_identity(sampled, train, query, per_token=per_token, world=ranks.world,
                            config=None if config is None else config.to_dict())
    return Checkpoint(path, ranks, identity, lockstep=config is not None and config.shard_rows and ranks.active)


def _check_shard_rows(config: BIFConfig, train: Any, sampled: list) -> None:
    """What ``shard_rows`` does not combine with yet, refused before any work."""
    if isinstance(train, DataLoader):
        raise ValueError("shard_rows slices train by sequence: pass a Dataset, not a DataLoader")
    if config.sgld.mass == "curvature" and any_sharded(sampled):
        raise ValueError("shard_rows on an FSDP-sharded model does not combine with mass='curvature' yet (its "
                         "Lanczos differentiates the whole weights)")  # fmt: skip
    if config.control_variate and any_sharded(sampled):
        raise ValueError("shard_rows on an FSDP-sharded model does not combine with control_variate yet (its "
                         "gradient at w* differentiates the whole weights)")  # fmt: skip
