"""``compute_bif``: the local Bayesian influence function of any differentiable PyTorch model.

The engine follows the paper's Algorithm 1: SGLD chains start at the trained weights w*; at every
draw the losses of all training units (samples or tokens) and all query units are evaluated and go
straight into a device-resident ``RunningCrossCovariance`` (k draws per rank-k update, no stored
traces, no host synchronisation inside a chain); ``BIF = -Cov`` pooled over all draws of all chains
around the grand mean (ddof = 1), and ``bif_normalized = -Corr``.

Each chain accumulates into its own accumulator, which is checked once when the chain ends (one host
read) and merged into the pooled one only if the chain stayed finite: a diverged chain is reported in
the diagnostics and left out, never mixed in as NaN. Chain c draws its noise from stream c of the
Philox generator and its minibatches from a generator seeded by (seed, c), so results do not depend
on how chains are scheduled.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from bif_fast._batched import ChainBatch, stack_batches
from bif_fast.config import BIFConfig
from bif_fast.ops import RunningCrossCovariance
from bif_fast.sampler import SGLD

__all__ = ["compute_bif", "BIFResult", "BIFError"]

logger = logging.getLogger("bif_fast")

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


class BIFError(RuntimeError):
    """Raised when no BIF can be formed (e.g. every chain diverged); ``diagnostics`` says what happened."""

    def __init__(self, message: str, diagnostics: dict[str, Any]):
        super().__init__(message)
        self.diagnostics = diagnostics


@dataclass
class BIFResult:
    """The BIF matrices and how they were obtained.

    Attributes:
        bif (Tensor): `[n_train, n_query]` ``-Cov(l_i, phi_j)`` (per token: over non-ignored tokens).
        bif_normalized (Tensor): `[n_train, n_query]` ``-Corr`` (0 for constant losses).
        stderr (Tensor | None): `[n_train, n_query]` Monte-Carlo standard error of ``bif`` from per-chain
            batch means (None with fewer than 2 surviving chains or ``compute_stderr=False``).
        diagnostics (dict): per-chain mean-loss traces, divergence flags, timings, draws used.
        config (BIFConfig): the configuration used.
        train_index, query_index (Tensor | None): per-token mode: `[n_units, 2]` (sequence, position)
            of each row / column.
    """

    bif: torch.Tensor
    bif_normalized: torch.Tensor
    stderr: torch.Tensor | None
    diagnostics: dict[str, Any]
    config: BIFConfig
    per_token: bool = False
    train_index: torch.Tensor | None = None
    query_index: torch.Tensor | None = None
    _tensor_names: tuple[str, ...] = field(
        default=("bif", "bif_normalized", "stderr", "train_index", "query_index"), repr=False
    )

    def topk(self, k: int = 10, *, normalized: bool = True, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """For every query column, the k training units with the largest (or smallest) BIF.

        Returns:
            (values, indices), each `[k, n_query]`.
        """
        m = self.bif_normalized if normalized else self.bif
        k = min(k, m.shape[0])
        return torch.topk(m, k, dim=0, largest=largest)

    def sequence_bif(self) -> torch.Tensor:
        """Per-token mode: the sequence-level BIF of summed losses, `[n_train_seq, n_query_seq]`.

        Covariance is bilinear, so ``Cov(Σ_t l_it, Σ_s phi_js) = Σ_ts Cov(l_it, phi_js)``: summing the
        token blocks of ``bif`` gives exactly the BIF of the summed per-sequence losses.
        """
        return self.aggregate(train="sequence", query="sequence")

    def aggregate(
        self, *, train: Literal["token", "sequence"] = "token", query: Literal["token", "sequence"] = "sequence"
    ) -> torch.Tensor:
        """Per-token mode: ``bif`` summed over the tokens of each training and/or query sequence.

        Sums of covariances are covariances of sums, so every aggregate is the exact BIF of summed losses:
        ``train="token", query="sequence"`` (the default) is the influence of each training token on each
        query's total loss, `[n_train_tokens, n_query_seq]` (the per-token influence EK-FAC reports, paper
        Appendix B.2); ``train="sequence", query="sequence"`` is ``sequence_bif()``; ``train="sequence",
        query="token"`` is each training sequence's influence on each query token.
        """
        if not self.per_token or self.train_index is None or self.query_index is None:
            raise ValueError("aggregate / sequence_bif need a per-token result")
        for name, how in (("train", train), ("query", query)):
            if how not in ("token", "sequence"):
                raise ValueError(f"{name} must be 'token' or 'sequence', got {how!r}")
        out = self.bif
        if train == "sequence":
            rows = self.train_index[:, 0].to(out.device)
            by_row = torch.zeros(int(rows.max()) + 1, out.shape[1], dtype=out.dtype, device=out.device)
            out = by_row.index_add_(0, rows, out)
        if query == "sequence":
            cols = self.query_index[:, 0].to(out.device)
            by_col = torch.zeros(out.shape[0], int(cols.max()) + 1, dtype=out.dtype, device=out.device)
            out = by_col.index_add_(1, cols, out)
        return out

    def save(self, path: str | Path) -> Path:
        """Write ``path/`` with ``tensors.safetensors`` and ``result.json`` (config and diagnostics)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            n: getattr(self, n).detach().cpu().contiguous() for n in self._tensor_names if getattr(self, n) is not None
        }
        save_file(tensors, str(path / "tensors.safetensors"))
        meta = {"config": self.config.to_dict(), "diagnostics": self.diagnostics, "per_token": self.per_token}
        (path / "result.json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str = "cpu") -> BIFResult:
        """Read a result written by ``save``."""
        from safetensors.torch import load_file

        path = Path(path)
        tensors = load_file(str(path / "tensors.safetensors"), device=str(device))
        meta = json.loads((path / "result.json").read_text())
        return cls(
            bif=tensors["bif"],
            bif_normalized=tensors["bif_normalized"],
            stderr=tensors.get("stderr"),
            diagnostics=meta["diagnostics"],
            config=BIFConfig.from_dict(meta["config"]),
            per_token=meta["per_token"],
            train_index=tensors.get("train_index"),
            query_index=tensors.get("query_index"),
        )


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _check_eval_data(data: Any, name: str) -> None:
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            raise ValueError(
                f"{name} is a shuffling DataLoader; its order defines the BIF's axes, so it must not shuffle"
            )
        return
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise ValueError(f"{name} must be a torch Dataset or a non-shuffling DataLoader, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty")


#: ``eval_max_tokens="auto"``: loss positions per evaluation batch, by device type. On the 2-core CPU,
#: per-token BIF of a 64-token GPT-NeoX at 256 training sequences: 2,048 positions per batch ran 1.2x
#: faster than 16,384 and held ~120 MB less; on a GPU larger batches keep the device busy (not measured).
AUTO_EVAL_TOKENS = {"cpu": 2048}
AUTO_EVAL_TOKENS_DEFAULT = 16384


def _eval_batch_size(model, data: Any, loss_fn, config: BIFConfig, per_token: bool, device, name: str) -> int:
    """Units per evaluation batch: ``eval_batch_size``, or per token fewer sequences, so that a batch holds
    at most ``eval_max_tokens`` loss positions (counted on ``loss_fn``'s output for the first item)."""
    cap = config.eval_max_tokens
    if not per_token or cap is None or isinstance(data, DataLoader):
        return config.eval_batch_size
    if cap == "auto":
        cap = AUTO_EVAL_TOKENS.get(device.type, AUTO_EVAL_TOKENS_DEFAULT)
    if isinstance(data, TensorDataset):
        first = [t[:1].to(device) for t in data.tensors]
    else:
        first = _to_device(next(iter(DataLoader(data, batch_size=1, shuffle=False))), device)
    with torch.no_grad():
        positions = _check_loss(loss_fn(model, first), 1, per_token, name).shape[1]
    return max(1, min(config.eval_batch_size, cap // max(positions, 1)))


def _eval_batches(data: Any, batch_size: int, device: torch.device) -> list:
    """The evaluation batches on the model's device, collated once. A TensorDataset is sliced directly
    (what its DataLoader would collate item by item, as the same list of tensors); a DataLoader's own
    batches are kept."""
    if isinstance(data, TensorDataset):
        tensors = [t.to(device) for t in data.tensors]
        n = len(data)
        return [[t[i : i + batch_size] for t in tensors] for i in range(0, n, batch_size)]
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    return [_to_device(b, device) for b in loader]


def _sgld_batches(data: Any, batch_size: int, seed: int, chain: int, device: torch.device) -> Iterator:
    """Endless minibatches; the order is a function of (seed, chain) only."""
    if isinstance(data, DataLoader):
        while True:
            yield from data
    gen = torch.Generator().manual_seed((seed * 1_000_003 + chain * 7_919) % 2**63)
    bs = min(batch_size, len(data))
    if isinstance(data, TensorDataset):
        # Tensors already stacked: index whole minibatches on the device instead of collating items.
        tensors = [t.to(device) for t in data.tensors]
        while True:
            perm = torch.randperm(len(data), generator=gen).to(device)
            for i in range(len(data) // bs):
                idx = perm[i * bs : (i + 1) * bs]
                yield [t[idx] for t in tensors]
    loader = DataLoader(data, batch_size=bs, shuffle=True, generator=gen, drop_last=True)
    while True:
        yield from loader


class _Units:
    """Maps a loss_fn's outputs to the flat vector of units (samples, or non-ignored tokens)."""

    def __init__(self, per_token: bool):
        self.per_token = per_token
        self.flat_index: list[torch.Tensor] = []  # per batch, positions of units in out.reshape(-1)
        self.index_rows: list[torch.Tensor] = []  # per batch, (sequence, position) of each unit
        self.n = 0

    def discover(self, outs: list[torch.Tensor], name: str) -> None:
        seq = 0
        for out in outs:
            if self.per_token:
                mask = out != 0
                pos = mask.nonzero()  # [u, 2] (row in batch, position)
                self.flat_index.append(mask.reshape(-1).nonzero().squeeze(1))
                self.index_rows.append(torch.stack([pos[:, 0] + seq, pos[:, 1]], dim=1).cpu())
            seq += out.shape[0]
        self.n = sum(int(i.numel()) for i in self.flat_index) if self.per_token else seq
        if self.n == 0:
            raise ValueError(f"{name} has no units to attribute (every per-token loss is 0, i.e. ignored)")

    def gather(self, outs: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """The units of one evaluation as one vector, written into ``out`` when given."""
        if not self.per_token:
            return torch.cat(outs) if out is None else torch.cat(outs, out=out)
        if out is None:
            return torch.cat([o.reshape(-1)[i] for o, i in zip(outs, self.flat_index, strict=True)])
        start = 0
        for o, i in zip(outs, self.flat_index, strict=True):
            torch.index_select(o.reshape(-1), 0, i, out=out[start : start + i.numel()])
            start += i.numel()
        return out

    def gather_rows(self, outs: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Batched chains: ``outs`` are ``[C, B(, T)]``; row c of ``out`` ``[C, n]`` gets chain c's units."""
        if not self.per_token:
            return torch.cat(outs, dim=1, out=out)
        start = 0
        for o, i in zip(outs, self.flat_index, strict=True):
            out[:, start : start + i.numel()] = o.reshape(o.shape[0], -1).index_select(1, i)
            start += i.numel()
        return out

    @property
    def index(self) -> torch.Tensor | None:
        return torch.cat(self.index_rows) if self.per_token else None


def _check_loss(out: Any, batch_len: int | None, per_token: bool, name: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
        raise ValueError(f"loss_fn must return a floating-point tensor for {name}, got {type(out).__name__}")
    want = 2 if per_token else 1
    if out.dim() != want:
        shape = "[B, T] per-token losses (per_token=True)" if per_token else "[B] per-sample losses"
        raise ValueError(f"loss_fn must return {shape} for {name}, got shape {list(out.shape)}")
    if batch_len is not None and out.shape[0] != batch_len:
        raise ValueError(f"loss_fn returned {out.shape[0]} losses for a batch of {batch_len} ({name})")
    return out


def _batch_len(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        return None if first is None else first.shape[0]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].shape[0]
    return None


def _evaluate(model, batches: list, loss_fn, per_token, name, check: bool = True,
              dtype: torch.dtype | None = None) -> list[torch.Tensor]:  # fmt: skip
    """Losses of every batch, in ``dtype`` (default: float64 kept, anything else as float32). ``check``:
    validate each output (done once, at w*; at the draws the shapes are known and a changed shape fails
    in the gather)."""
    outs = []
    with torch.no_grad():
        for batch in batches:
            out = loss_fn(model, batch)
            if check:
                out = _check_loss(out, _batch_len(batch), per_token, name)
            want = dtype if dtype is not None else (torch.float64 if out.dtype == torch.float64 else torch.float32)
            outs.append(out if out.dtype == want else out.to(want))
    return outs


def compute_bif(
    model: torch.nn.Module,
    train: Dataset | DataLoader,
    query: Dataset | DataLoader,
    *,
    loss_fn: LossFn,
    config: BIFConfig | None = None,
    per_token: bool = False,
    sgld_data: Dataset | DataLoader | None = None,
    params: Sequence[torch.Tensor] | None = None,
    backend: str = "auto",
) -> BIFResult:
    """Local BIF between every training unit and every query unit (paper Algorithm 1).

    Args:
        model (nn.Module): the trained model; its current weights are w*. Left exactly as it was.
        train (Dataset | DataLoader): training data; its order defines the rows.
        query (Dataset | DataLoader): query data; its order defines the columns.
        loss_fn (callable): ``loss_fn(model, batch) -> Tensor[B]`` per-sample losses, or
            ``Tensor[B, T]`` per-token losses with ``per_token=True``. Ignored positions must return
            exactly 0: the units are the positions whose loss at w* is non-zero. The mean of the same
            function over an SGLD minibatch (over non-zero positions, per token) drives the sampler.
        config (BIFConfig | None): sampling and evaluation settings. Default: ``BIFConfig()``.
        per_token (bool): one unit per non-ignored token instead of per sample. Default: False.
        sgld_data (Dataset | DataLoader | None): source of SGLD minibatches. Default: ``train``, shuffled
            by a generator seeded with (seed, chain). A DataLoader is iterated as given (its own order,
            restarted for every chain).
        params (Sequence[Tensor] | None): parameters to sample; the rest stay at w*. Default: all
            parameters with ``requires_grad``.
        backend (str): sampler backend (``auto`` | ``triton`` | ``ext`` | ``torch``).

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
    config = BIFConfig() if config is None else config
    if not isinstance(config, BIFConfig):
        raise ValueError(f"config must be a BIFConfig, got {type(config).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise ValueError("loss_fn must be callable as loss_fn(model, batch)")
    sampled = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not sampled:
        raise ValueError("no parameters to sample (pass params= or set requires_grad)")
    device = sampled[0].device
    _check_eval_data(train, "train")
    _check_eval_data(query, "query")
    sgld_source = train if sgld_data is None else sgld_data
    if not isinstance(sgld_source, DataLoader) and len(sgld_source) == 0:
        raise ValueError("sgld_data is empty")

    originals = [(p, p.data, p.grad) for p in sampled]
    # Parameters left out of `params` stay at w*: no gradient is computed (or left behind) for them.
    sampled_ids = {id(p) for p in sampled}
    frozen = [(p, p.grad) for p in model.parameters() if p.requires_grad and id(p) not in sampled_ids]
    for p, _ in frozen:
        p.requires_grad_(False)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    t_start = time.perf_counter()
    modes = _Modes(model)
    try:
        modes.eval()
        train_units, query_units = _Units(per_token), _Units(per_token)
        # The evaluation batches are the same at every draw: collate them once, on the model's device.
        eval_sizes = [_eval_batch_size(model, data, loss_fn, config, per_token, device, name)
                      for data, name in ((train, "train"), (query, "query"))]  # fmt: skip
        train_batches = _eval_batches(train, eval_sizes[0], device)
        query_batches = _eval_batches(query, eval_sizes[1], device)
        outs_train = _evaluate(model, train_batches, loss_fn, per_token, "train")
        outs_query = _evaluate(model, query_batches, loss_fn, per_token, "query")
        train_units.discover(outs_train, "train")
        query_units.discover(outs_query, "query")
        # Losses are kept in float64 when loss_fn gives float64, else rounded to float32.
        loss_dtype = torch.float64 if any(o.dtype == torch.float64 for o in outs_train + outs_query) else torch.float32
        cov_dtype = loss_dtype if config.cov_dtype == "auto" else getattr(torch, config.cov_dtype)
        x0 = train_units.gather(outs_train).to(loss_dtype)
        y0 = query_units.gather(outs_query).to(loss_dtype)
        if not (bool(torch.isfinite(x0).all()) and bool(torch.isfinite(y0).all())):
            raise ValueError("loss_fn gives non-finite losses at w* (before any sampling)")
        n, p = train_units.n, query_units.n
        opt = SGLD(sampled, config.sgld, seed=config.seed, chain=0, backend=backend)
        pool = _Pool(n, p, device, cov_dtype, config)
        pooled = pool.pooled
        k = min(config.draws_per_update, config.num_draws)
        traces = torch.full((config.num_chains, config.num_draws), float("nan"), device=device)
        distance = torch.full((config.num_chains, config.num_draws), float("nan"), device=device)
        chain_seconds = [0.0] * config.num_chains

        eval_rows = sum(o.shape[0] for o in outs_train) + sum(o.shape[0] for o in outs_query)
        group = _chain_batch_size(config, device, opt.numel, n, p, cov_dtype, eval_rows)
        batch, why_not = None, None
        if group > 1:
            batch, why_not = _try_chain_batch(
                model, opt, loss_fn, config, group, per_token, sgld_source, device, modes,
                (train_batches, train_units, x0), (query_batches, query_units, y0),
            )  # fmt: skip
            if batch is None:
                log = logger.warning if config.chain_batch != "auto" else logger.info
                log("bif_fast: running the chains one by one (batched chains unavailable: %s)", why_not)
                group = 1
        if group == 1 and config.num_chains == 1:
            accs = [pooled]
        else:
            accs = [RunningCrossCovariance(n, p, device=device, dtype=cov_dtype) for _ in range(group)]
        xbuf = torch.empty(k, group, n, device=device, dtype=loss_dtype)
        ybuf = torch.empty(k, group, p, device=device, dtype=loss_dtype)

        bar = _progress(config)
        for first in range(0, config.num_chains, group):
            chains = list(range(first, min(config.num_chains, first + group)))
            rows = slice(chains[0], chains[-1] + 1)
            t_group = time.perf_counter()
            for b, saved in buffers:
                b.copy_(saved)
            _reset_all(a for a in accs[: len(chains)] if a is not pooled)  # (no loop variable outlives `accs`)
            if batch is None:
                c = chains[0]
                opt.reset(chain=c)
                iters = [_sgld_batches(sgld_source, config.batch_size, config.seed, c, device)]
            else:
                batch.reset(chains)
                iters = [_sgld_batches(sgld_source, config.batch_size, config.seed, c, device) for c in chains]

            _steps(model, opt, batch, iters, loss_fn, device, config.num_burnin_steps, modes, per_token)
            filled = 0
            dists = []
            for d in range(config.num_draws):
                modes.eval()
                if batch is None:
                    outs_x = _evaluate(model, train_batches, loss_fn, per_token, "train", False, loss_dtype)
                    outs_y = _evaluate(model, query_batches, loss_fn, per_token, "query", False, loss_dtype)
                    train_units.gather(outs_x, out=xbuf[filled, 0])
                    query_units.gather(outs_y, out=ybuf[filled, 0])
                    dists.append(_distance(opt).unsqueeze(0))
                else:
                    train_units.gather_rows(batch.evaluate(train_batches), out=xbuf[filled, : len(chains)])
                    query_units.gather_rows(batch.evaluate(query_batches), out=ybuf[filled, : len(chains)])
                    dists.append(batch.distance())
                filled += 1
                if filled == k or d == config.num_draws - 1:
                    for i in range(len(chains)):
                        accs[i].update(xbuf[:filled, i], ybuf[:filled, i], check_finite=False)
                    traces[rows, d + 1 - filled : d + 1] = xbuf[:filled, : len(chains)].mean(2).T
                    filled = 0
                if d < config.num_draws - 1:
                    _steps(model, opt, batch, iters, loss_fn, device, config.num_steps_bw_draws, modes, per_token)
                if bar is not None:
                    bar.update(len(chains))
            distance[rows] = torch.stack(dists, 1).div_(max(opt.numel, 1) ** 0.5)  # rms distance
            flags = [opt.diverged] if batch is None else batch.diverged()
            for i, c in enumerate(chains):
                chain_seconds[c] = time.perf_counter() - t_group
                pool.add(c, accs[i], flags[i], chain_seconds[c])
        if bar is not None:
            bar.close()
        diagnostics = {
            "chain_mean_train_loss": traces.cpu().tolist(),
            "rms_distance_from_w_star": distance.cpu().tolist(),
            "diverged": pool.diverged,
            "num_chains_used": pool.survivors,
            "num_draws_used": pooled.count,
            "w_star_mean_train_loss": float(x0.mean()),
            "w_star_mean_query_loss": float(y0.mean()),
            "n_train_units": n,
            "n_query_units": p,
            "chain_seconds": chain_seconds,
            "seconds": time.perf_counter() - t_start,
            "sampler_backend": opt.resolved_backend,
            "chain_batch": group,
            "cov_dtype": str(cov_dtype).removeprefix("torch."),
            "eval_batch_size": {  # a DataLoader's own batch size (None: batches from its batch_sampler)
                name: data.batch_size if isinstance(data, DataLoader) else size
                for name, data, size in (("train", train, eval_sizes[0]), ("query", query, eval_sizes[1]))
            },
        }
        if pooled.count < 2:
            raise BIFError(f"every chain diverged ({sum(pool.diverged)} of {config.num_chains}); no BIF", diagnostics)
        # Build the outputs in place, so the peak stays at the accumulators' own n x p matrices.
        del accs
        stderr = pool.stderr()
        bif_normalized = pooled.correlation().neg_()
        bif = pooled._comoment.div_(pooled.count - 1).neg_()  # the pooled accumulator is not used again
        return BIFResult(
            bif=bif,
            bif_normalized=bif_normalized,
            stderr=stderr,
            diagnostics=diagnostics,
            config=config,
            per_token=per_token,
            train_index=train_units.index,
            query_index=query_units.index,
        )
    finally:
        with torch.no_grad():
            for p_, data, grad in originals:
                p_.data = data
                p_.grad = grad
            for b, saved in buffers:
                b.copy_(saved)
            for p_, grad in frozen:
                p_.requires_grad_(True)
                p_.grad = grad
        modes.restore()


# Auto chain batching. On a GPU: models of at most _AUTO_BATCH_MAX_PARAMS sampled parameters, as many
# chains as the per-chain accumulators allow within _AUTO_BATCH_ACC_BYTES. On a CPU, vmap only pays where
# per-call dispatch dominates: measured on 2 cores (1 thread, issue-5 notes), an MLP of 212 parameters on
# 160 evaluation rows ran 1.5-2.0x faster batched and one of 1.9k parameters on 320 rows 1.3-1.6x, while
# one of 3.7k parameters on 1,200 rows ran 0.8-0.9x (vmap's batched cross-entropy is slow); so a CPU run
# is batched when parameters x evaluation rows <= _AUTO_BATCH_CPU_WORK. The rule is deterministic, so
# the same call always takes the same path (the paths agree only up to rounding).
_AUTO_BATCH_MAX_PARAMS = 1 << 22
_AUTO_BATCH_ACC_BYTES = 2 << 30
_AUTO_BATCH_CPU_WORK = 1 << 20


def _chain_batch_size(config: BIFConfig, device: torch.device, numel: int, n: int, p: int, dtype,
                      eval_rows: int) -> int:  # fmt: skip
    """How many chains run at once: ``config.chain_batch``, or the 'auto' policy above."""
    if config.num_chains == 1:
        return 1
    if config.chain_batch != "auto":
        return min(config.chain_batch, config.num_chains)
    if device.type not in ("cpu", "cuda") or numel > _AUTO_BATCH_MAX_PARAMS:
        return 1
    if device.type == "cpu" and numel * eval_rows > _AUTO_BATCH_CPU_WORK:
        return 1
    per_chain = n * p * torch.empty(0, dtype=dtype).element_size()
    return max(1, min(config.num_chains, _AUTO_BATCH_ACC_BYTES // max(per_chain, 1)))


def _try_chain_batch(model, opt: SGLD, loss_fn, config: BIFConfig, size: int, per_token: bool, sgld_source, device,
                     modes: _Modes, train, query) -> tuple[ChainBatch | None, str | None]:  # fmt: skip
    """Build a ``ChainBatch`` and check it against the plain model at w*: every chain's losses on all
    evaluation batches, and its gradient on one SGLD minibatch. Returns (batch, None) or (None, reason).
    Warnings raised by the trial itself (e.g. torch's "no batching rule, falling back" for an op vmap
    runs slowly) are held back: the outcome is logged instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = [q for seg in opt._segments for q in seg.params]
        try:
            batch = ChainBatch(model, params, loss_fn, config.sgld, seed=config.seed, size=size,
                               backend=opt.resolved_backend, per_token=per_token)  # fmt: skip
            batch.reset(list(range(size)))
            modes.eval()
            for batches, units, ref in (train, query):
                got = units.gather_rows(batch.evaluate(batches), out=torch.empty(size, units.n, device=device))
                err = float((got - ref).abs().max())
                if not err <= 1e-4 * (1.0 + float(ref.abs().max())):
                    return None, f"vmapped losses differ from the model's at w* (max abs {err:.3g})"
            modes.restore()
            trial = _to_device(next(_sgld_batches(sgld_source, config.batch_size, config.seed, 0, device)), device)
            got = batch.gradient(stack_batches([trial] * size)).clone()
            loss = _minibatch_loss(loss_fn(model, trial), per_token)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            want = torch.cat(
                [(torch.zeros_like(q) if g is None else g).reshape(-1) for q, g in zip(params, grads, strict=True)]
            )
            scale = float(want.abs().max())
            err = float((got.float() - want.float()).abs().max())
            if not err <= 1e-3 * scale + 1e-6:
                return None, f"vmapped gradients differ from the model's at w* (max abs {err:.3g}, scale {scale:.3g})"
        except Exception as exc:  # vmap cannot run this model or loss_fn unchanged
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return batch, None


class _Pool:
    """The pooled accumulator, the per-chain batch-means state for the standard error, and which chains
    diverged. A chain's accumulator is checked once (one host read) and merged only if it is finite.

    Standard error without a matrix for the mean of the per-chain covariances: with every chain holding
    the same k draws, the pooled co-moment is the sum of the chains' co-moments plus the between-chain
    scatter ``k * sum_c (mu_c - mu)(mu_c - mu)^T`` (rank < chains, from the stored per-chain mean
    vectors), so that mean is read off the pool. Each chain's deviation from it goes into ``m2`` by
    Welford's update over chains (no E[c^2] - E[c]^2 cancellation in float32). The n x p state is then
    the pool, the chain's own accumulator and ``m2``."""

    def __init__(self, n: int, p: int, device, dtype, config: BIFConfig):
        self.pooled = RunningCrossCovariance(n, p, device=device, dtype=dtype)
        self.stderr_on = config.compute_stderr and config.num_chains > 1
        self.m2 = torch.zeros(n, p, device=device, dtype=dtype) if self.stderr_on else None
        self.means: list[tuple[torch.Tensor, torch.Tensor]] = []  # per chain in the stderr: (mean_x, mean_y)
        self.k: int | None = None
        self.diverged = [False] * config.num_chains
        self.survivors = 0

    def add(self, c: int, acc: RunningCrossCovariance, sampler_diverged: bool, seconds: float) -> None:
        """Fold chain ``c`` in. ``acc`` (if not the pool itself) is consumed: its co-moment is overwritten."""
        finite = bool(torch.isfinite(acc._mean_x).all() & torch.isfinite(acc._mean_y).all())
        if sampler_diverged or not finite:
            self.diverged[c] = True
            logger.warning("bif_fast: chain %d diverged (NaN/Inf); it is left out of the BIF", c)
            if acc is self.pooled:
                self.pooled.reset()
            return
        self.survivors += 1
        if acc is self.pooled:
            logger.info("bif_fast: chain %d done in %.2f s", c, seconds)
            return
        if self.stderr_on and (acc.count < 2 or self.k not in (None, acc.count)):
            self._drop_stderr(f"chain {c} has {acc.count} draws")
        if self.stderr_on:
            self.means.append((acc._mean_x.clone(), acc._mean_y.clone()))
            self.k = acc.count
        self.pooled.merge(acc)
        m = len(self.means)
        if self.stderr_on and m >= 2:
            k = self.k
            mx = torch.stack([x for x, _ in self.means])  # [m, n] float64
            my = torch.stack([y for _, y in self.means])  # [m, p]
            dx, dy = mx - mx.mean(0), my - my.mean(0)
            # e = cov_c - mean of the m chain covariances, built in the chain's co-moment (merged above):
            # mean = (pooled - k dx^T dy) / ((k - 1) m).
            e = acc._comoment.mul_(1.0 / (k - 1)).sub_(self.pooled._comoment, alpha=1.0 / ((k - 1) * m))
            e.addmm_(dx.T.to(e.dtype), dy.to(e.dtype), alpha=k / ((k - 1) * m))
            self.m2.addcmul_(e, e, value=m / (m - 1))  # Welford: (c - mean_old)(c - mean_new)
            acc._count = 0  # its state is no longer a valid accumulator until reset
        logger.info("bif_fast: chain %d done in %.2f s", c, seconds)

    def _drop_stderr(self, why: str) -> None:
        logger.warning("bif_fast: no standard error (%s; batch means need >= 2 draws, the same in every chain)", why)
        self.stderr_on, self.m2, self.means = False, None, []

    def stderr(self) -> torch.Tensor | None:
        """Batch-means standard error of the BIF over the surviving chains, built in place (frees ``m2``)."""
        m2, m = self.m2, len(self.means)
        self.m2 = None
        if not self.stderr_on or m < 2:
            return None
        return m2.div_(m * (m - 1)).sqrt_()


def _reset_all(accs: Iterable[RunningCrossCovariance]) -> None:
    for acc in accs:
        acc.reset()


def _steps(model, opt: SGLD, batch: ChainBatch | None, iters: list, loss_fn, device, count: int, modes: _Modes,
           per_token: bool) -> None:  # fmt: skip
    """``count`` SGLD steps of the current chain (``batch is None``) or of every chain of the batch."""
    if batch is None:
        _sgld_steps(model, opt, loss_fn, iters[0], device, count, modes, per_token)
    elif count > 0:
        modes.restore()
        for _ in range(count):
            batch.step(stack_batches([_to_device(next(it), device) for it in iters]))


def _sgld_steps(model, opt: SGLD, loss_fn, batches, device, steps: int, modes: _Modes, per_token: bool) -> None:
    if steps == 0:
        return
    modes.restore()
    for _ in range(steps):
        batch = _to_device(next(batches), device)
        opt.zero_grad()
        _minibatch_loss(loss_fn(model, batch), per_token).backward()
        opt._step()


def _minibatch_loss(out: torch.Tensor, per_token: bool) -> torch.Tensor:
    """The loss whose gradient drives SGLD: the minibatch mean (per token: over the non-ignored positions)."""
    if per_token:
        return out.sum() / (out.detach() != 0).sum().clamp_min(1)
    return out.mean()


class _Modes:
    """Switches a model between eval mode (loss evaluations) and its own configuration (SGLD steps),
    restoring every submodule's own flag, and skipping switches to the mode it is already in.

    When no module overrides ``train()``, the flags are set directly (``Module.__setattr__`` on every
    submodule twice per draw is a measurable cost for small models); otherwise ``model.eval()`` runs.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.own = [(m, m.training) for m in model.modules()]
        self.direct = all(type(m).train is torch.nn.Module.train and "training" in vars(m) for m, _ in self.own)
        self.current: str | None = None

    def eval(self) -> None:
        if self.current != "eval":
            if self.direct:
                for m, _ in self.own:
                    vars(m)["training"] = False
            else:
                self.model.eval()
            self.current = "eval"

    def restore(self) -> None:
        if self.current != "own":
            if self.direct:
                for m, training in self.own:
                    vars(m)["training"] = training
            else:
                for m, training in self.own:
                    m.training = training
            self.current = "own"


def _distance(opt: SGLD) -> torch.Tensor:
    """||w - w*|| over the sampled parameters, a 0-d tensor (no sync): the chain's excursion from w*."""
    segs = opt._segments
    if len(segs) == 1 and segs[0].anchor.dtype == torch.float32:
        return torch.dist(segs[0].master, segs[0].anchor)
    return sum((seg.master - seg.anchor.float()).square().sum() for seg in segs).sqrt()


def _progress(config: BIFConfig):
    if not config.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=config.total_draws, desc="bif_fast draws", unit="draw")
