"""Pooling of the per-chain accumulators into the BIF, and its batch-means standard error.

Each chain accumulates into its own ``RunningCrossCovariance``, checked once when the chain ends (one
host read) and merged into the pool only if it stayed finite: a diverged chain is reported and left out,
never mixed in as NaN.

Standard error without a matrix for the mean of the per-chain covariances: with every chain holding the
same k draws, the pooled co-moment is the sum of the chains' co-moments plus the between-chain scatter
``k * sum_c (mu_c - mu)(mu_c - mu)^T`` (rank < chains, from the stored per-chain mean vectors), so that
mean is read off the pool. Each chain's deviation from it goes into ``m2`` by Welford's update over
chains (no ``E[c^2] - E[c]^2`` cancellation in float32).

A running chain keeps either its own co-moment (``RunningCrossCovariance``, n x p) or, when that is the
larger of the two (per token: draws x (n + p) is far below n x p), its draws as they are (``ChainTraces``),
folded into the pool and ``m2`` at the chain's end in row blocks of its covariance, so no third n x p
matrix ever exists: the n x p state while sampling is the pool and ``m2``.
"""

from __future__ import annotations

import logging

import torch

from bif_fast.config import BIFConfig
from bif_fast.engine.distributed import Ranks
from bif_fast.ops import RunningCrossCovariance

__all__ = ["Pool"]

logger = logging.getLogger("bif_fast")


#: Bytes of one row block of a chain's covariance when its draws are folded in (``ChainTraces``).
FOLD_BLOCK_BYTES = 64 << 20


class ChainTraces:
    """One running chain's draws as they are, ``[draws, n]`` and ``[draws, p]``: what the draw loop's
    accumulator interface needs (``update``, ``count``, ``finite``, ``means``, state dicts), without an
    ``n x p`` co-moment. ``Pool.add`` folds them in."""

    def __init__(self, n: int, p: int, capacity: int, device: torch.device, dtype: torch.dtype):
        self.n, self.p = n, p
        self.x = torch.empty(capacity, n, device=device, dtype=dtype)
        self.y = torch.empty(capacity, p, device=device, dtype=dtype)
        self.count = 0

    def reset(self) -> None:
        self.count = 0

    def update(self, x: torch.Tensor, y: torch.Tensor, *, check_finite: bool = False) -> None:
        k = x.shape[0]
        if self.count + k > self.x.shape[0]:
            raise ValueError(f"a chain holds at most {self.x.shape[0]} draws")
        self.x[self.count : self.count + k].copy_(x)
        self.y[self.count : self.count + k].copy_(y)
        self.count += k

    def draws(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[: self.count], self.y[: self.count]

    def finite(self) -> bool:
        x, y = self.draws()
        return bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.draws()
        return x.double().mean(0), y.double().mean(0)

    def state_dict(self) -> dict:
        x, y = self.draws()
        return {"count": self.count, "x": x, "y": y}

    def load_state_dict(self, state: dict) -> None:
        self.count = 0
        self.update(state["x"].to(self.x), state["y"].to(self.y))


class Pool:
    """The pooled accumulator, the per-chain accumulators it hands out, the standard error, and which chains
    diverged.

    Args:
        n, p (int): units of the training and query sides.
        device, dtype: where and in which dtype the n x p state lives.
        config (BIFConfig): ``num_chains``, ``num_draws`` and ``compute_stderr``.
        loss_dtype: the draws' dtype (for ``ChainTraces``).
    """

    def __init__(self, n: int, p: int, device: torch.device, dtype: torch.dtype, config: BIFConfig,
                 loss_dtype: torch.dtype = torch.float32):  # fmt: skip
        self.n, self.p, self.device, self.dtype, self.loss_dtype = n, p, device, dtype, loss_dtype
        self.capacity = config.num_draws
        size = torch.empty((), dtype=dtype).element_size(), torch.empty((), dtype=loss_dtype).element_size()
        # The running chains keep their draws when that is smaller than a co-moment of their own.
        self.chain_state = "traces" if self.capacity * (n + p) * size[1] < n * p * size[0] else "co-moment"
        self.num_chains = config.num_chains
        self.pooled = RunningCrossCovariance(n, p, device=device, dtype=dtype)
        self.stderr_on = config.compute_stderr and config.num_chains > 1
        self.m2 = torch.zeros(n, p, device=device, dtype=dtype) if self.stderr_on else None
        self.means: list[tuple[torch.Tensor, torch.Tensor]] = []  # per chain in the stderr: (mean_x, mean_y)
        self.mean_chains: list[int] = []  # which chain each entry of ``means`` is
        self.k: int | None = None
        self.diverged = [False] * config.num_chains
        self.escaped: dict[int, str] = {}  # chains left out for leaving w*'s basin, and why
        self.survivors = 0
        self._chain_accs: list[RunningCrossCovariance | ChainTraces] = []

    def chain_accumulators(self, count: int) -> list[RunningCrossCovariance | ChainTraces]:
        """``count`` empty accumulators for the chains about to run (the pool itself for a single chain, which
        saves one n x p matrix), of the kind ``chain_state`` says."""
        if self.num_chains == 1:
            return [self.pooled]
        while len(self._chain_accs) < count:
            if self.chain_state == "traces":
                acc = ChainTraces(self.n, self.p, self.capacity, self.device, self.loss_dtype)
            else:
                acc = RunningCrossCovariance(self.n, self.p, device=self.device, dtype=self.dtype)
            self._chain_accs.append(acc)
        for acc in self._chain_accs[:count]:
            acc.reset()
        return self._chain_accs[:count]

    def add(self, c: int, acc: RunningCrossCovariance | ChainTraces, sampler_diverged: bool, seconds: float,
            escaped: str | None = None) -> None:  # fmt: skip
        """Fold chain ``c`` in. ``acc`` (if not the pool itself) is consumed: it must be reset before reuse.
        ``escaped``: why the chain left w*'s basin (``engine.run.escaped_chains``); it is then left out."""
        if sampler_diverged or not acc.finite() or escaped:
            self.diverged[c] = True
            if escaped and not sampler_diverged:
                self.escaped[c] = escaped
                logger.warning("bif_fast: chain %d left w*'s basin (%s); it is left out of the BIF", c, escaped)
            else:
                logger.warning("bif_fast: chain %d diverged (NaN/Inf); it is left out of the BIF", c)
            if acc is self.pooled:
                self.pooled.reset()
            return
        self.survivors += 1
        logger.info("bif_fast: chain %d done in %.2f s", c, seconds)
        if acc is self.pooled:
            return
        if self.stderr_on and (acc.count < 2 or self.k not in (None, acc.count)):
            self._drop_stderr(f"chain {c} has {acc.count} draws")
        if self.stderr_on:
            self.means.append(acc.means())
            self.mean_chains.append(c)
            self.k = acc.count
        if isinstance(acc, ChainTraces):
            self._fold(acc)
            return
        self.pooled.merge(acc)
        if self.stderr_on and len(self.means) >= 2:
            self._welford(acc)

    def _fold(self, acc: ChainTraces) -> None:
        """A chain's draws into the pool (rank-k updates) and its covariance into ``m2``, in row blocks."""
        x, y = acc.draws()
        for i in range(0, x.shape[0], 32):
            self.pooled.update(x[i : i + 32], y[i : i + 32], check_finite=False)
        if not (self.stderr_on and len(self.means) >= 2):
            return
        k, m = self.k, len(self.means)
        mx, my = acc.means()
        xc, yc = (x.double() - mx).to(self.dtype), (y.double() - my).to(self.dtype)
        dx, dy = self._chain_mean_scatter()
        rows = max(1, FOLD_BLOCK_BYTES // max(1, self.p * xc.element_size()))
        for r in range(0, self.n, rows):
            e = xc[:, r : r + rows].T @ yc  # the chain's co-moment, rows r.. (then as in _welford)
            e.mul_(1.0 / (k - 1)).sub_(self.pooled.comoment[r : r + rows], alpha=1.0 / ((k - 1) * m))
            e.addmm_(dx[:, r : r + rows].T, dy, alpha=k / ((k - 1) * m))
            self.m2[r : r + rows].addcmul_(e, e, value=m / (m - 1))

    def _chain_mean_scatter(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The chains' means about their mean, ``[m, n]`` and ``[m, p]`` in the pool's dtype."""
        mx = torch.stack([x for x, _ in self.means])  # [m, n] float64
        my = torch.stack([y for _, y in self.means])  # [m, p]
        return (mx - mx.mean(0)).to(self.dtype), (my - my.mean(0)).to(self.dtype)

    def _welford(self, acc: RunningCrossCovariance) -> None:
        k, m = self.k, len(self.means)
        dx, dy = self._chain_mean_scatter()
        # e = cov_c - mean of the m chain covariances, built in the chain's co-moment (merged above):
        # mean = (pooled - k dx^T dy) / ((k - 1) m).
        e = acc.take_comoment().mul_(1.0 / (k - 1)).sub_(self.pooled.comoment, alpha=1.0 / ((k - 1) * m))
        e.addmm_(dx.T, dy, alpha=k / ((k - 1) * m))
        self.m2.addcmul_(e, e, value=m / (m - 1))  # Welford: (c - mean_old)(c - mean_new)

    def _drop_stderr(self, why: str) -> None:
        logger.warning("bif_fast: no standard error (%s; batch means need >= 2 draws, the same in every chain)", why)
        self.stderr_on, self.m2, self.means, self.mean_chains = False, None, [], []

    def release_chain_accumulators(self) -> None:
        """Free the per-chain accumulators (the outputs are built with only the pool alive)."""
        self._chain_accs = []

    def stderr(self) -> torch.Tensor | None:
        """Batch-means standard error of the BIF over the surviving chains, built in place (frees ``m2``)."""
        m2, m = self.m2, len(self.means)
        self.m2 = None
        if not self.stderr_on or m < 2:
            return None
        return m2.div_(m * (m - 1)).sqrt_()

    def outputs(self, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(bif, bif_normalized, stderr)``, built in place so the peak stays at the pool's n x p matrices;
        the pool is spent afterwards. ``scale`` multiplies the covariance and its standard error (the lag-1
        estimator's 1/4; the correlation does not change)."""
        self.release_chain_accumulators()
        stderr = self.stderr()
        if stderr is not None and scale != 1.0:
            stderr.mul_(scale)
        bif_normalized = self.pooled.correlation().neg_()
        count = self.pooled.count
        bif = self.pooled.take_comoment().div_(count - 1).mul_(-scale)
        return bif, bif_normalized, stderr

    # -- many processes --------------------------------------------------------------------------------

    def merge_ranks(self, ranks: Ranks) -> None:
        """Make this pool the pool of every rank's chains, on every rank (rank r ran ``ranks.chains``).

        Chan's merge over ranks: the float64 counts, means and sums of squares are merged from every rank's
        copy (the same arithmetic on every rank, so the ranks agree bit for bit); the ``n x p`` co-moment is
        the sum of the ranks' plus the scatter of their means about the grand mean (rank < world), reduced
        once. The standard error's ``m2`` (the chains' covariances about their mean) merges the same way,
        with the ranks' mean covariances read off their pools; a second ``n x p`` reduction."""
        if not ranks.active:
            return
        state = self.pooled.state_dict()
        vecs = ("mean_x", "mean_y", "m2_x", "m2_y")
        parts = ranks.all_gather({
            "count": self.pooled.count, "vecs": [state[v].cpu() for v in vecs], "survivors": self.survivors,
            "diverged": [c for c, d in enumerate(self.diverged) if d], "escaped": self.escaped, "k": self.k,
            "stderr_on": self.stderr_on, "means": [(c, mx.cpu(), my.cpu()) for c, (mx, my) in
                                                   zip(self.mean_chains, self.means, strict=True)]})  # fmt: skip
        counts = [part["count"] for part in parts]
        total = sum(counts)
        grand = [sum(cnt * part["vecs"][i] for cnt, part in zip(counts, parts, strict=True)) / max(total, 1)
                 for i in (0, 1)]  # fmt: skip
        m2 = [sum(part["vecs"][i] + cnt * (part["vecs"][i - 2] - grand[i - 2]).square()
                  for cnt, part in zip(counts, parts, strict=True)) for i in (2, 3)]  # fmt: skip
        stderr = self._merge_stderr_plan(parts)
        spread = self._mean_covariance() if stderr and self.means else None  # this rank's, before the merge
        mine = counts[ranks.rank]
        if mine:
            dx, dy = ((state[v] - g.to(self.device)).to(self.dtype) for v, g in zip(vecs[:2], grand, strict=True))
            state["comoment"].addr_(dx, dy, alpha=float(mine))
        ranks.all_reduce_(state["comoment"])
        if stderr:
            self._merge_m2(ranks, parts, spread, grand, state["comoment"])
        merged = {v: t.to(self.device) for v, t in zip(vecs, grand + m2, strict=True)}
        self.pooled.load_state_dict({"n": self.n, "p": self.p, "count": total, "comoment": state["comoment"], **merged})
        self.diverged = [any(c in part["diverged"] for part in parts) for c in range(self.num_chains)]
        self.escaped = {c: why for part in parts for c, why in part["escaped"].items()}
        self.survivors = sum(part["survivors"] for part in parts)

    def _merge_stderr_plan(self, parts: list[dict]) -> bool:
        """Whether the merged pool keeps a standard error (every rank kept one, with one draw count)."""
        if not self.stderr_on and not any(part["stderr_on"] for part in parts):
            return False
        ks = {part["k"] for part in parts if part["means"]}
        if all(part["stderr_on"] for part in parts) and len(ks) <= 1:
            return True
        if self.stderr_on:
            self._drop_stderr("the ranks' chains differ in draws, or a rank dropped its standard error")
        return False

    def _mean_covariance(self) -> torch.Tensor:
        """This pool's mean of its chains' covariances, ``[n, p]`` (a new matrix)."""
        k, m = self.k, len(self.means)
        mx = torch.stack([x for x, _ in self.means])
        my = torch.stack([y for _, y in self.means])
        dx, dy = (mx - mx.mean(0)).to(self.dtype), (my - my.mean(0)).to(self.dtype)
        return self.pooled.comoment.clone().addmm_(dx.T, dy, alpha=-k).div_((k - 1) * m)

    def _merge_m2(self, ranks: Ranks, parts: list[dict], spread: torch.Tensor | None, grand: list[torch.Tensor],
                  comoment: torch.Tensor) -> None:  # fmt: skip
        """``m2`` of all chains: the ranks' own plus ``m_r (mean_r - mean)^2``, summed over the ranks."""
        chains = sorted((c, mx, my) for part in parts for c, mx, my in part["means"])
        k, m = next(part["k"] for part in parts if part["means"]), len(chains)
        self.means = [(mx.to(self.device), my.to(self.device)) for _, mx, my in chains]
        self.mean_chains, self.k = [c for c, _, _ in chains], k
        mine = len(parts[ranks.rank]["means"])
        if spread is not None and m >= 2:
            dx = torch.stack([x for x, _ in self.means]).sub_(grand[0].to(self.device)).to(self.dtype)
            dy = torch.stack([y for _, y in self.means]).sub_(grand[1].to(self.device)).to(self.dtype)
            spread.sub_(comoment, alpha=1.0 / ((k - 1) * m)).addmm_(dx.T, dy, alpha=k / ((k - 1) * m))
            self.m2.addcmul_(spread, spread, value=float(mine))
        del spread
        ranks.all_reduce_(self.m2)

    # -- checkpoints -----------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The pool as tensors (live references) and a JSON-able record, for a checkpoint."""
        acc = self.pooled.state_dict()
        tensors = {f"pool.{k}": acc[k] for k in ("comoment", "mean_x", "mean_y", "m2_x", "m2_y")}
        if self.m2 is not None:
            tensors["pool.m2"] = self.m2
        if self.means:
            tensors["pool.chain_mean_x"] = torch.stack([x for x, _ in self.means])
            tensors["pool.chain_mean_y"] = torch.stack([y for _, y in self.means])
        record = {"count": self.pooled.count, "k": self.k, "stderr_on": self.stderr_on, "survivors": self.survivors,
                  "mean_chains": self.mean_chains, "diverged": self.diverged,
                  "escaped": {str(c): why for c, why in self.escaped.items()}}  # fmt: skip
        return tensors, record

    def restore(self, tensors: dict[str, torch.Tensor], record: dict) -> None:
        """Put back a state from ``state`` (copied onto this pool's device and dtypes)."""
        acc = {k: tensors[f"pool.{k}"] for k in ("comoment", "mean_x", "mean_y", "m2_x", "m2_y")}
        self.pooled.load_state_dict({"n": self.n, "p": self.p, "count": record["count"], **acc})
        self.stderr_on, self.k, self.survivors = record["stderr_on"], record["k"], record["survivors"]
        self.m2 = tensors["pool.m2"].to(self.device, self.dtype) if self.stderr_on else None
        self.mean_chains = list(record["mean_chains"])
        self.means = []
        if self.mean_chains:
            mx, my = (tensors[f"pool.chain_mean_{s}"].to(self.device) for s in ("x", "y"))
            self.means = list(zip(mx.unbind(0), my.unbind(0), strict=True))
        self.diverged = list(record["diverged"])
        self.escaped = {int(c): why for c, why in record["escaped"].items()}
