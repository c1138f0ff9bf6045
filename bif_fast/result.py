"""``BIFResult`` (the matrices, how they were obtained, save/load, top-k, aggregates) and ``BIFError``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from bif_fast.config import BIFConfig

__all__ = ["BIFResult", "BIFError"]


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
        per_token (bool): whether rows and columns are tokens.
        train_index, query_index (Tensor | None): per-token mode: `[n_units, 2]` (sequence, position)
            of each row / column.
        train_rows (Tensor | None): ``shard_rows``: `[n_local]` the global index of each of this rank's rows
            (None when every row is here).

    Examples:
        >>> res = compute_bif(model, train, query, loss_fn=loss_fn)  # doctest: +SKIP
        >>> values, rows = res.topk(5)  # doctest: +SKIP
        >>> res.save("out"); BIFResult.load("out")  # doctest: +SKIP
    """

    bif: torch.Tensor
    bif_normalized: torch.Tensor
    stderr: torch.Tensor | None
    diagnostics: dict[str, Any]
    config: BIFConfig
    per_token: bool = False
    train_index: torch.Tensor | None = None
    query_index: torch.Tensor | None = None
    train_rows: torch.Tensor | None = None

    #: The tensor attributes, in the order ``save`` writes them.
    tensor_names: ClassVar[tuple[str, ...]] = ("bif", "bif_normalized", "stderr", "train_index", "query_index",
                                               "train_rows")  # fmt: skip

    def topk(self, k: int = 10, *, normalized: bool = True, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """For every query column, the k training units with the largest (or smallest) BIF.

        With ``shard_rows`` (``train_rows`` set) the indices are global rows, and inside the process group
        that made the result the top k are those of every shard (each rank's own k candidates gathered, not
        the matrix; every rank must call it). Outside it, the top k of this shard.

        Returns:
            (values, indices), each `[k, n_query]`.
        """
        m = self.bif_normalized if normalized else self.bif
        values, idx = torch.topk(m, min(k, m.shape[0]), dim=0, largest=largest)
        if self.train_rows is None:
            return values, idx
        rows = self.train_rows.to(idx.device)[idx]
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return values, rows
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (values.cpu(), rows.cpu()))
        values = torch.cat([v for v, _ in parts]).to(m.device)
        rows = torch.cat([r for _, r in parts]).to(m.device)
        best, pick = torch.topk(values, min(k, values.shape[0]), dim=0, largest=largest)
        return best, rows.gather(0, pick)

    def sequence_bif(self) -> torch.Tensor:
        """Per-token mode: the sequence-level BIF of summed losses, `[n_train_seq, n_query_seq]`.

        Covariance is bilinear, so ``Cov(Σ_t l_it, Σ_s phi_js) = Σ_ts Cov(l_it, phi_js)``: summing the
        token blocks of ``bif`` gives exactly the BIF of the summed per-sequence losses.
        """
        return self.aggregate(train="sequence", query="sequence")

    def aggregate(
        self,
        *,
        train: Literal["token", "sequence"] = "token",
        query: Literal["token", "sequence"] = "sequence",
        normalized: bool = False,
        reduce: Literal["sum", "mean"] = "sum",
    ) -> torch.Tensor:
        """Per-token mode: ``bif`` (or ``bif_normalized``) reduced over the tokens of each training and/or
        query sequence.

        Sums of covariances are covariances of sums, so every sum of ``bif`` is the exact BIF of summed
        losses: ``train="token", query="sequence"`` (the default) is the influence of each training token
        on each query's total loss, `[n_train_tokens, n_query_seq]` (the per-token influence EK-FAC
        reports, paper Appendix B.2); ``train="sequence", query="sequence"`` is ``sequence_bif()``.
        ``normalized=True, reduce="mean"`` averages the correlations over token pairs instead, a score
        that does not favour long sequences for their length.

        Args:
            train (str): ``"token"`` (keep the rows) or ``"sequence"`` (reduce them per training sequence).
            query (str): the same for the columns.
            normalized (bool): reduce ``bif_normalized`` instead of ``bif``. Default: False.
            reduce (str): ``"sum"`` or ``"mean"`` over the tokens of a sequence. Default: ``"sum"``.

        Returns:
            Tensor `[n_train_tokens | n_train_seq, n_query_tokens | n_query_seq]`, in the result's dtype; a
            sequence without units is a zero row / column.

        Raises:
            ValueError: not a per-token result, or an unknown option.
        """
        if not self.per_token or self.train_index is None or self.query_index is None:
            raise ValueError("aggregate / sequence_bif need a per-token result")
        for name, how in (("train", train), ("query", query)):
            if how not in ("token", "sequence"):
                raise ValueError(f"{name} must be 'token' or 'sequence', got {how!r}")
        if reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
        out = self.bif_normalized if normalized else self.bif
        if train == "sequence":
            out = _reduce_rows(out, self.train_index[:, 0], self._sequences("train"), reduce)
        if query == "sequence":
            out = _reduce_rows(out.T, self.query_index[:, 0], self._sequences("query"), reduce).T
        return out

    def _sequences(self, side: str) -> int:
        index = self.train_index if side == "train" else self.query_index
        recorded = self.diagnostics.get(f"n_{side}_sequences")
        return int(recorded) if recorded is not None else int(index[:, 0].max()) + 1

    def save(self, path: str | Path) -> Path:
        """Write ``path/`` with ``tensors.safetensors`` and ``result.json`` (config and diagnostics)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            n: getattr(self, n).detach().cpu().contiguous() for n in self.tensor_names if getattr(self, n) is not None
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
            train_rows=tensors.get("train_rows"),
        )


def _reduce_rows(m: torch.Tensor, groups: torch.Tensor, size: int, reduce: str) -> torch.Tensor:
    """`[size, m.shape[1]]`: the rows of ``m`` summed (or averaged) by their group index."""
    groups = groups.to(m.device)
    out = torch.zeros(size, m.shape[1], dtype=m.dtype, device=m.device).index_add_(0, groups, m)
    if reduce == "mean":
        out.div_(torch.bincount(groups, minlength=size).clamp_min(1).to(m.dtype)[:, None])
    return out
