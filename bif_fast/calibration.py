"""``calibrate``: the sampler settings ``compute_bif`` uses when it is given no config, chosen from the model
and the data, with the reason for each in ``BIFConfig.calibration``.

The rules, in order (each estimate and its cost is recorded):

1. **Curvature.** The top eigenpairs of the Hessian of the mean training loss at w* (Lanczos on
   central-difference Hessian-vector products, ``engine.calibrate.top_eigenpairs``) and its most
   negative eigenvalue (power iteration on ``lam_max I - H``).
2. **The objective's weight decay.** At a minimum of ``L + (wd / 2) |w|^2`` the data gradient is
   ``-wd w*``; when the gradient at w* points along ``-w*`` (cosine > 0.9) that ``wd`` is taken into the
   potential (``weight_decay = nbeta wd``), as the posterior of the trained objective has it.
3. **nbeta** = 1000 x the number of training sequences: a localised posterior in its Gaussian regime
   (losses move by ~1e-3 of their size), where the BIF is, to first order, the damped influence function
   ``g_i^T (H + damping)^-1 g_j`` and its cost does not depend on nbeta; a hundredfold smaller nbeta (a
   wider, non-Gaussian posterior, which helped on non-smooth minima) is a candidate of the probe too.
4. **Sampler.** BAOAB (kinetic Langevin) with the low-rank curvature mass (``engine.mass``), step
   ``0.8 x 2 / sqrt(a_ref)`` (the stability limit of the preconditioned potential), friction at critical
   damping of the slowest mode ``2 sqrt(a_min)``, full-batch gradients (their forward reused for the
   draws). A pilot that diverges (NaN/Inf, or a chain that leaves w*'s basin: ``BIFConfig.max_excursion``)
   halves the step and is run again, and the log says so; the later pilots and the final run keep the
   smaller step.
5. **Damping** (``localization = damping x nbeta``): ``1e-3 x lam_max`` (never below twice the negative
   curvature not covered by the weight decay), checked by the re-fit probe (``engine.probe``: warm-started
   re-fits on random halves, scored like the LDS) against ``1e-1 x lam_max`` on short pilot runs; the
   smaller is then tried against the hundredfold smaller nbeta. The two dampings are the ends the BIF
   interpolates between: the influence function (small damping; in the Gaussian regime the BIF's
   infinite-draw limit is the influence function damped there) and the gradient similarity (large damping:
   the least Monte-Carlo noise). The larger damping is taken only where its score, carried to the final
   run's length, beats the smaller's by more than one jackknife standard error of their paired difference.
   The probe is not trusted to place the damping finer than that: the pilots are mostly Monte-Carlo noise
   (70-95% of their predictions' spread), which costs the small damping most, and on the tanh digits MLP it
   scored 1e-2 x lam_max above 1e-3 x lam_max even with the noise taken out, where full-length runs score
   0.73 and 0.80 (short warm-started re-fits likely under-fit the flat directions a small damping keeps).
   When no score exceeds two jackknife standard errors (the probe cannot see this model's re-fits, e.g. a
   few memorised queries scored token by token), the larger damping is taken: the least Monte-Carlo
   noise, at the robust end.
6. **Length.** 8 chains and as many draws as the time left in ``budget_seconds`` allows (at least the
   calibration's time and 100 draws per chain) at the speed of a short trial of the final run's shape
   (eight chains at once run faster per chain-step than the pilots' pairs; the pilots' speed where the
   trial fails). The run may sample for the time it was planned for (``BIFConfig.time_limit``; at least
   1.5 x the trial's estimate of 100 draws per chain): a machine that slows down mid-run stops it early
   instead of overrunning the budget. The probe's scores are carried to that length: a correlation measured through
   Monte-Carlo noise of noise-to-signal ratio c shrinks by ``1 / sqrt(1 + c)``, N times the draws divide
   c by N, and each pilot's two independent halves measure its c (``engine.probe.extrapolated_score``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from bif_fast._backend import Backend
from bif_fast.config import BIFConfig, SGLDConfig
from bif_fast.engine.calibrate import full_gradient, hessian_vector_product, lanczos_iters, top_eigenpairs
from bif_fast.engine.data import check_eval_data
from bif_fast.engine.distributed import Ranks, RowShard
from bif_fast.engine.mass import LowRankMass, curvature_mass
from bif_fast.engine.model_state import ModelState
from bif_fast.engine.probe import (
    RefitProbe,
    extrapolated_score,
    jackknife_se,
    probe_loo_scores,
    probe_noise_fractions,
    probe_score,
    refit_probe,
)
from bif_fast.engine.run import eval_set, run_bif
from bif_fast.engine.sharded import any_sharded
from bif_fast.engine.units import LossFn
from bif_fast.result import BIFError

__all__ = ["Calibrated", "calibrate", "calibrate_with_mass"]

logger = logging.getLogger("bif_fast")

DAMPINGS = (1e-3, 1e-1)  # x lam_max: the influence-function end (the default) and the robust end
PILOTS = len(DAMPINGS) + 1  # and the small nbeta
NBETA_PER_SEQUENCE = 1000.0
SMALL_NBETA_FACTOR = 0.01
MASS_RANK = 32
MASS_BYTES = 1 << 30  # Lanczos basis budget; above it the sampler runs with unit mass
PILOT_CHAINS, PILOT_DRAWS, MIN_PILOT_DRAWS = 4, 60, 20
FINAL_CHAINS, MIN_DRAWS, MAX_DRAWS = 8, 100, 20000
FINAL_CAPTURE = True  # the final run and its speed trial replay traced graphs (BIFConfig.capture): the final
# run takes thousands of steps, and the trial must run at the final run's speed
LIMIT_SLACK = 1.5  # the final run's time limit over the estimated time of MIN_DRAWS draws
TRIAL_SHARE, MIN_TRIAL_DRAWS, MAX_TRIAL_DRAWS = 0.03, 8, 200  # the final shape's speed trial: its share of the
# sampling time (a trial of tens of milliseconds misjudged the speed by 30%) and its bounds in draws
REFITS, REFIT_STEPS, MIN_REFIT_STEPS = 12, 100, 20
PROBE_SHARE, PILOT_SHARE = 0.15, 0.3  # of the budget: the re-fits and the pilots scale down to fit them
SAFETY = 0.8
# Where a pilot at the chosen nbeta diverged, the final run's step is this fraction of the step the pilots
# survived with: the curvature the chains meet exceeds the estimate at w*, and the final chains run many times
# more steps than a pilot's, so a step that only just held for a pilot is likely to fail in some final chain.
FINAL_BACKOFF = 0.5
EVAL_BATCH = 1024  # sequences per evaluation batch (and per slice of the full-batch gradient)
SAMPLING_SHARE = 0.9  # of the time left after calibration (the final run's set-up is measured apart)
MIN_SAMPLING_FACTOR = 1.0  # the final run gets at least the calibration's own time
MAX_EXCURSION = 50.0  # a chain whose loss rises this many spreads above its typical level has left the basin
TIE_SE = 1.0  # candidates closer than this many standard errors of their difference count as tied
INFORMATIVE_SE = 2.0  # the probe's best must exceed this many standard errors to be believed
MAX_NOISE_RATIO = 3.0  # cap of the pilots' estimated noise-to-signal ratio c / N (the extrapolation's reach)


@dataclass
class Calibrated:
    config: BIFConfig
    mass: LowRankMass | None


def calibrate(model: torch.nn.Module, train: Any, query: Any = None, *, loss_fn: LossFn, per_token: bool = False,
              params: Sequence[torch.Tensor] | None = None, budget_seconds: float = 30.0, seed: int = 0,
              backend: Backend = "auto", shard_rows: bool = False) -> BIFConfig:  # fmt: skip
    """The ``BIFConfig`` that ``compute_bif(model, train, query, loss_fn=loss_fn)`` uses when given no config.

    Args:
        model, train, loss_fn, per_token, params, backend: as in ``compute_bif``.
        query (Dataset | DataLoader | None): the observables the probe scores predictions of (default: train).
        budget_seconds (float): wall time for calibration and sampling together. The sampling loop gets 90% of
            what the calibration leaves (less the run's measured set-up), but at least the calibration's own
            time (a model too slow for the budget still gets a useful run) and at least 100 draws per chain.
            Default: 30.
        seed (int): seed of the probe, the pilots and the returned config.
        shard_rows (bool): inside a ``torch.distributed`` process group, calibrate over row shards
            (``BIFConfig.shard_rows``): every rank holds its slice of the training sequences, every gradient
            (the curvature's, the re-fits', the pilots') is summed across the ranks, every time measured is
            rank 0's, and every rank returns the same config, with ``shard_rows=True``, for
            ``compute_bif(..., config=...)`` on the same ranks. Every rank must call it. Default: False
            (outside a process group it changes nothing but the returned config's ``shard_rows``).

    Returns:
        BIFConfig: the settings, with ``calibration`` holding each estimate, the rule behind each choice,
        the probe's candidate scores and the costs. The model is left exactly as it was.

    Raises:
        ValueError: bad arguments (with ``shard_rows``: a DataLoader as train, or an FSDP-sharded model).
        BIFError: every pilot diverged even at the smallest step tried.
    """
    return calibrate_with_mass(model, train, query, loss_fn=loss_fn, per_token=per_token, params=params,
                               budget_seconds=budget_seconds, seed=seed, backend=backend,
                               shard_rows=shard_rows).config  # fmt: skip


def calibrate_with_mass(model: torch.nn.Module, train: Any, query: Any = None, *, loss_fn: LossFn,
                        per_token: bool = False, params: Sequence[torch.Tensor] | None = None,
                        budget_seconds: float = 30.0, seed: int = 0, backend: Backend = "auto",
                        shard_rows: bool = False) -> Calibrated:  # fmt: skip
    """``calibrate``, also returning the chosen mass (so ``compute_bif`` need not rebuild it)."""
    t0 = time.perf_counter()
    if not (isinstance(budget_seconds, (int, float)) and budget_seconds > 0 and math.isfinite(budget_seconds)):
        raise ValueError(f"budget_seconds must be a finite number > 0, got {budget_seconds!r}")
    query = train if query is None else query
    check_eval_data(train, "train")
    check_eval_data(query, "query")
    sampled = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not sampled:
        raise ValueError("no parameters to sample (pass params= or set requires_grad)")
    ranks, shard = Ranks.current(), _shard(shard_rows, train, sampled)
    probe_config = BIFConfig(batch_size="full", eval_batch_size=EVAL_BATCH, seed=seed)
    with ModelState(model, sampled) as state:
        state.eval_mode()
        device = sampled[0].device
        mine = train if shard is None else Subset(train, range(shard.lo, shard.hi))
        sides = _eval_sets(model, mine, query, loss_fn, probe_config, per_token, device, ranks, shard)
        curv = _agreed_curvature(ranks, ranks.checked(lambda: _curvature(model, sampled, loss_fn, sides[0].batches,
                                                                         per_token, seed, shard)))  # fmt: skip
        curv["implied_weight_decay"] = ranks.agree(ranks.checked(lambda: _implied_weight_decay(
            model, sampled, loss_fn, sides[0].batches, per_token, shard)))  # fmt: skip
        # One full-batch gradient costs about this much (the curvature took two per Hessian-vector product).
        per_gradient = curv["seconds"] / max(2 * curv["hvps"], 1)
        steps = int(min(REFIT_STEPS, max(MIN_REFIT_STEPS, PROBE_SHARE * budget_seconds / per_gradient / REFITS)))
        probe = ranks.checked(lambda: refit_probe(model, sampled, loss_fn, sides[0].batches, sides[0].units,
                                                  sides[1].batches, sides[1].units, sides[1].at_w_star,
                                                  per_token=per_token, refits=REFITS, steps=steps, seed=seed,
                                                  shard=shard))  # fmt: skip
        probe.seconds = ranks.agree(probe.seconds)
        pilot_steps = PILOT_SHARE * budget_seconds / (1.5 * per_gradient) / PILOTS
        pilot_draws = int(min(PILOT_DRAWS, max(MIN_PILOT_DRAWS, pilot_steps / PILOT_CHAINS)))
    logger.info("bif_fast calibrate: lam_max %.4g, lam_min %.3g, implied weight decay %s, probe %.1f s",
                curv["lam_max"], curv["lam_min"], curv["implied_weight_decay"]["value"], probe.seconds)
    n_sequences = len(train) if shard is not None else sides[0].units.num_sequences
    search = _Search(model, sampled, train, query, loss_fn, per_token, backend, curv, probe, seed,
                     n_sequences=n_sequences, pilot_draws=pilot_draws, ranks=ranks, shard=shard,
                     shard_rows=shard_rows)  # fmt: skip
    best = search.run(budget_seconds - ranks.agree(time.perf_counter() - t0))
    elapsed = ranks.agree(time.perf_counter() - t0)
    return search.final(best, max(SAMPLING_SHARE * (budget_seconds - elapsed), MIN_SAMPLING_FACTOR * elapsed), t0)


def _shard(shard_rows: bool, train: Any, sampled: list[torch.Tensor]) -> RowShard | None:
    """This rank's rows when calibrating over row shards inside a process group, else None."""
    if not isinstance(shard_rows, bool):
        raise ValueError(f"shard_rows must be a bool, got {shard_rows!r}")
    if not shard_rows:
        return None
    if isinstance(train, DataLoader):
        raise ValueError("shard_rows slices train by sequence: pass a Dataset, not a DataLoader")
    if any_sharded(sampled):
        raise ValueError("calibrate(shard_rows=True) does not take an FSDP-sharded model yet (its re-fits and "
                         "Hessian-vector products differentiate the whole weights); pass a BIFConfig")  # fmt: skip
    ranks = Ranks.current()
    return RowShard.of(ranks, len(train)) if ranks.active else None


def _eval_sets(model, train: Any, query: Any, loss_fn: LossFn, config: BIFConfig, per_token: bool,
               device: torch.device, ranks: Ranks, shard: RowShard | None) -> list:  # fmt: skip
    """The probe's evaluation sets at w* (with ``shard``: this rank's training rows); inside a process group
    a rank that fails makes every rank raise."""
    return ranks.checked(lambda: [eval_set(model, d, loss_fn, config, per_token, device, name)
                                  for d, name in ((train, "train"), (query, "query"))])  # fmt: skip


def _agreed_curvature(ranks: Ranks, curv: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's curvature on every rank (the figures and the eigenvectors)."""
    if not ranks.active:
        return curv
    eigvecs = curv.pop("eigvecs")
    curv = ranks.agree(curv)
    if eigvecs is not None:
        ranks.broadcast_(eigvecs)
    return {**curv, "eigvecs": eigvecs}


def _curvature(model, sampled, loss_fn, batches, per_token: bool, seed: int,
               shard: RowShard | None = None) -> dict[str, Any]:  # fmt: skip
    """Top eigenpairs (Lanczos) and the most negative eigenvalue of the Hessian of the mean training loss
    (with ``shard``: of every rank's rows, formed together)."""
    t0 = time.perf_counter()
    numel = sum(p.numel() for p in sampled)
    rank = min(MASS_RANK, numel - 1)
    # The mass needs fp32 weights (the fused step takes the preconditioned force in the weights' dtype).
    fp32 = all(p.dtype == torch.float32 for p in sampled)
    fits = (lanczos_iters(rank, numel) + 1) * numel * 4 <= MASS_BYTES and rank >= 1 and fp32
    pairs = top_eigenpairs(model, sampled, loss_fn, batches, rank=rank if fits else 1, per_token=per_token,
                           seed=seed, shard=shard)  # fmt: skip
    eigvals = pairs["eigvals"]
    lam_max = float(eigvals[0])
    lam_min, hvps = _lowest_eigenvalue(model, sampled, loss_fn, batches, per_token, lam_max, seed, shard=shard)
    return {"lam_max": lam_max, "lam_min": lam_min, "eigvals": [float(x) for x in eigvals],
            "eigvecs": pairs["eigvecs"] if fits else None, "mass_rank": rank if fits else 0,
            "hvps": pairs["hvps"] + hvps, "seconds": time.perf_counter() - t0,
            "rule": "Lanczos on central-difference Hessian-vector products of the full-batch mean loss at w*",
            }  # fmt: skip


def _lowest_eigenvalue(model, sampled, loss_fn, batches, per_token: bool, lam_max: float, seed: int,
                       iters: int = 20, shard: RowShard | None = None) -> tuple[float, int]:  # fmt: skip
    """Power iteration on ``lam_max I - H``: the most negative curvature (0 when H is positive semi-definite)."""
    w0 = [p.detach().clone() for p in sampled]
    v = torch.randn(sum(p.numel() for p in w0), generator=torch.Generator().manual_seed(seed + 1)).to(w0[0].device)
    v /= v.norm()
    shifted = 0.0
    for _ in range(iters):
        hv = lam_max * v - hessian_vector_product(model, sampled, w0, v, loss_fn, batches, per_token, shard=shard)
        shifted = float(v @ hv)
        v = hv / hv.norm().clamp_min(1e-30)
    return min(0.0, lam_max - shifted), iters


def _implied_weight_decay(model, sampled, loss_fn, batches, per_token: bool,
                          shard: RowShard | None = None) -> dict[str, Any]:  # fmt: skip
    """``wd`` with ``grad L(w*) = -wd w*`` when the gradient points along ``-w*``, else 0."""
    g = full_gradient(model, sampled, loss_fn, batches, per_token, shard=shard)
    w = torch.cat([p.detach().reshape(-1).float() for p in sampled])
    cos = float(-(g @ w) / (g.norm() * w.norm()).clamp_min(1e-30))
    wd = float(-(g @ w) / (w @ w).clamp_min(1e-30))
    used = cos > 0.9 and wd > 0
    return {"value": wd if used else 0.0, "cosine": cos, "gradient_norm": float(g.norm()),
            "rule": "grad L(w*) = -wd w* at a minimum of L + wd/2 |w|^2; used when the cosine exceeds 0.9"}  # fmt: skip


class _Search:
    """Pilot runs of the candidate settings, scored by the probe, and the final config."""

    def __init__(self, model, sampled, train, query, loss_fn, per_token, backend, curv, probe: RefitProbe, seed,
                 *, n_sequences: int, pilot_draws: int, ranks: Ranks, shard: RowShard | None,
                 shard_rows: bool):  # fmt: skip
        self.model, self.sampled, self.train, self.query = model, sampled, train, query
        # With row shards every rank runs every pilot over its rows, and every time measured is rank 0's (the
        # ranks' clocks differ; the lengths chosen from them must not).
        self.ranks, self.shard, self.shard_rows = ranks, shard, shard_rows
        self.loss_fn, self.per_token, self.backend, self.curv, self.probe = loss_fn, per_token, backend, curv, probe
        self.seed, self.n_sequences, self.pilot_draws = seed, n_sequences, pilot_draws
        self.wd = curv["implied_weight_decay"]["value"]
        self.candidates: list[dict[str, Any]] = []
        self.pilot_seconds, self.pilot_steps = 0.0, 0
        # The pilots' sampling loops alone (their chain-steps and seconds) and their runs' whole seconds: the
        # speed of a step, and the fixed cost of a run (evaluation at w*, set-up), are measured apart.
        self.loop_seconds, self.loop_steps, self.run_seconds, self.runs = 0.0, 0, 0.0, 0
        self.final_draws = FINAL_CHAINS * MIN_DRAWS  # updated from the budget before the ranking
        self.shrink: dict[float, float] = {}  # per nbeta, the step factor pilots start from (halved for good
        # when one diverges)
        # A one-parameter posterior's loss rise is a chi-square of one degree of freedom, whose largest of
        # 20,000 draws is ~48 spreads above its median: the escape check needs a few dimensions.
        self.max_excursion = MAX_EXCURSION if sum(p.numel() for p in sampled) >= 3 else None
        self.loo: dict[int, torch.Tensor] = {}  # id(row) -> the probe's leave-one-re-fit-out scores
        self.noise: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(row) -> per query unit, the pool's
        # probe correlation and Monte-Carlo noise-to-signal ratio
        self.trial: dict[str, Any] | None = None  # the final shape's speed trial (None: pilots' speed used)
        self.informative = True  # whether the probe's best beat chance (else the largest damping is taken)

    def settings(self, nbeta: float, damping: float,
                 shrink: float = 1.0) -> tuple[SGLDConfig, LowRankMass | None, dict]:  # fmt: skip
        """BAOAB settings at (nbeta, damping): step from the preconditioned curvature, critical friction."""
        curv, a_min = self.curv, nbeta * (self.wd + damping)
        eig = curv["eigvals"]
        mass = None
        if curv["eigvecs"] is not None:
            shifted = torch.tensor(eig) + self.wd
            mass = curvature_mass(shifted, curv["eigvecs"], nbeta=nbeta, a_min=nbeta * damping)
            a_ref = mass.a_ref
        else:
            a_ref = nbeta * (eig[0] + self.wd) + nbeta * damping
        lr = shrink * SAFETY * 2.0 / math.sqrt(a_ref)
        sgld = SGLDConfig(lr=lr, nbeta=nbeta, localization=nbeta * damping, weight_decay=nbeta * self.wd,
                          sampler="baoab", friction=2.0 * math.sqrt(a_min),
                          mass="curvature" if mass is not None else "identity",
                          mass_rank=max(mass.rank if mass is not None else MASS_RANK, 1))  # fmt: skip
        why = {"a_ref": a_ref, "a_min": a_min, "condition": a_ref / a_min, "step_shrink": shrink}
        return sgld, mass, why

    def pilot(self, nbeta: float, damping: float) -> dict[str, Any]:
        """A short run at (nbeta, damping) in two independent halves, scored by the probe; a diverging pilot
        is retried at half the step, and every later pilot starts from the step that worked (a divergence
        says the curvature at w* understates the curvature the chains meet at this nbeta, whatever the
        damping)."""
        start = self.shrink.get(nbeta, 1.0)
        for shrink in (start, start / 2, start / 4):
            sgld, mass, why = self.settings(nbeta, damping, shrink)
            t0 = time.perf_counter()
            halves = [self._half(sgld, mass, h) for h in range(2)]
            seconds = self.ranks.agree(time.perf_counter() - t0)
            self.pilot_seconds += seconds
            self.pilot_steps += 2 * (PILOT_CHAINS // 2) * (self.pilot_draws - 1)
            diverged = any(h is None for h in halves)
            row = {"nbeta": nbeta, "damping": damping, **why, "seconds": seconds, "diverged": diverged}
            if not diverged:
                self.shrink[nbeta] = shrink
                pooled = (halves[0] + halves[1]) / 2
                row["probe_lds"] = probe_score(pooled, self.probe)
                self.noise[id(row)] = probe_noise_fractions(*halves, self.probe)
                self.loo[id(row)] = probe_loo_scores(pooled, self.probe)
                row["probe_se"] = jackknife_se(self.loo[id(row)])
                self.candidates.append(row)
                return row
            logger.warning("bif_fast calibrate: the pilot at nbeta %.3g, damping %.3g diverged at step %.3g; "
                           "halving the step", nbeta, damping, sgld.lr)  # fmt: skip
            self.candidates.append({**row, "probe_lds": None})
        return {**row, "probe_lds": None}

    def _half(self, sgld: SGLDConfig, mass: LowRankMass | None, half: int) -> torch.Tensor | None:
        """One half of a pilot: its BIF, or None when a chain diverged."""
        cfg, out = self._short_run(sgld, mass, PILOT_CHAINS // 2, self.pilot_draws, self.seed + 1 + half)
        if out is None:
            return None
        d = out.diagnostics
        loop, whole = self.ranks.agree((sum(d["chain_seconds"][:: max(d["chain_batch"], 1)]), d["seconds"]))
        self.loop_seconds += loop  # a group's chains share its time
        self.loop_steps += cfg.num_chains * (cfg.num_draws - 1)
        self.run_seconds += whole
        self.runs += 1
        return None if any(d["diverged"]) else out.bif

    def _short_run(self, sgld: SGLDConfig, mass: LowRankMass | None, chains: int, draws: int, seed: int,
                   capture: bool | str = "auto"):  # fmt: skip
        """A full-batch run of these settings: (its config, its result or None when it raised BIFError)."""
        cfg = BIFConfig(sgld=sgld, num_chains=chains, num_draws=draws, batch_size="full", eval_batch_size=EVAL_BATCH,
                        compute_stderr=False, seed=seed, max_excursion=self.max_excursion, capture=capture,
                        shard_rows=self.shard is not None)  # fmt: skip
        try:
            return cfg, run_bif(self.model, self.sampled, self.train, self.query, loss_fn=self.loss_fn, config=cfg,
                                per_token=self.per_token, sgld_source=self.train, backend=self.backend,
                                mass=mass)  # fmt: skip
        except BIFError:
            return cfg, None

    def speed(self) -> tuple[float, float]:
        """(seconds per chain-step of the sampling loop, fixed seconds per run), from the pilots so far."""
        if self.loop_steps == 0:
            return self.pilot_seconds / max(self.pilot_steps, 1), 0.0
        return self.loop_seconds / self.loop_steps, max(self.run_seconds - self.loop_seconds, 0.0) / self.runs

    def run(self, seconds_left: float) -> dict[str, Any]:
        lam_max, lam_min = self.curv["lam_max"], self.curv["lam_min"]
        floor = 2.0 * max(0.0, -lam_min - self.wd)
        nbeta = NBETA_PER_SEQUENCE * self.n_sequences
        rows = [self.pilot(nbeta, max(DAMPINGS[0] * lam_max, floor))]
        # The first pilot's speed sets the final run's length, and so the draws the scores are carried to.
        per_pilot = self.pilot_seconds
        per_step, overhead = self.speed()
        left = seconds_left - (PILOTS - 1) * per_pilot
        least = MIN_SAMPLING_FACTOR * PILOTS * per_pilot
        self.final_draws = self.draws_for(max(SAMPLING_SHARE * left - overhead, least), per_step) * FINAL_CHAINS
        rows += [self.pilot(nbeta, max(f * lam_max, floor)) for f in DAMPINGS[1:]]
        best = self.agreed(self.best(rows))
        small = self.pilot(nbeta * SMALL_NBETA_FACTOR, best["damping"])
        if small["probe_lds"] is not None and self.predicted(small) > self.predicted(best):
            best = small
        if not best["probe_lds"] > INFORMATIVE_SE * best["probe_se"]:
            # No candidate predicts the re-fits better than chance: take the one with the least Monte-Carlo
            # noise, the largest damping (the fastest-mixing, narrowest posterior; the gradient-similarity end).
            self.informative = False
            logger.info("bif_fast calibrate: the probe's best score %.3g is within %g standard errors (%.3g) of "
                        "chance; taking the largest damping", best["probe_lds"], INFORMATIVE_SE, best["probe_se"])
            best = max((r for r in rows if r["probe_lds"] is not None), key=lambda r: r["damping"])
        return self.agreed(best)

    def agreed(self, row: dict[str, Any]) -> dict[str, Any]:
        """Rank 0's choice among the candidates: the ranks' scores come from the same sums, and should a
        rounding ever tell them apart, every rank still goes on with one setting."""
        if not self.ranks.active:
            return row
        return self.candidates[self.ranks.agree(next(i for i, r in enumerate(self.candidates) if r is row))]

    def best(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The highest predicted score, or the smallest damping the probe cannot tell from it: a difference
        within ``TIE_SE`` jackknife standard errors of the paired difference (the re-fits are shared). Of
        candidates it cannot separate, the smaller damping is nearer the posterior's own BIF (the
        influence-function end, best at many draws on smooth models), and the prediction already charges it
        for its extra Monte-Carlo noise."""
        scored = [r for r in rows if r["probe_lds"] is not None]
        if not scored:
            raise BIFError("every calibration pilot diverged, even at a quarter of the stability step", {
                "calibration": {"candidates": self.candidates}})  # fmt: skip
        for row in scored:
            row.pop("tied_with_damping", None)
        top = max(scored, key=self.predicted)
        scale = self.predicted(top) / top["probe_lds"] if top["probe_lds"] > 0 else 1.0
        for row in sorted(scored, key=lambda r: r["damping"]):
            if row["damping"] >= top["damping"] or row["nbeta"] != top["nbeta"]:
                continue
            se = jackknife_se(self.loo[id(top)] - self.loo[id(row)])
            if self.predicted(top) - self.predicted(row) <= TIE_SE * scale * se:
                row["tied_with_damping"] = top["damping"]
                return row
        return top

    def predicted(self, row: dict[str, Any]) -> float:
        """The probe score a candidate would reach with the final run's draws (``engine.probe``'s
        ``extrapolated_score``: each query unit's correlation disattenuated by its Monte-Carlo noise-to-signal
        ratio at the pilot's draws, then attenuated by it at the final run's)."""
        if "predicted" not in row:
            gain = self.final_draws / (PILOT_CHAINS * self.pilot_draws)
            row["predicted"], row["noise_ratio"] = extrapolated_score(*self.noise[id(row)], gain,
                                                                       max_noise_ratio=MAX_NOISE_RATIO)
        return row["predicted"]

    def final_speed(self, sgld: SGLDConfig, mass: LowRankMass | None, seconds: float) -> tuple[float, float]:
        """(seconds per chain-step, fixed seconds per run) of the final run's own shape: a trial of
        ``FINAL_CHAINS`` chains for about ``seconds`` (the pilots' groups of two chains run slower per
        chain-step than eight at once under vmap), or the pilots' figures where the trial fails."""
        per_step, overhead = self.speed()
        draws = int(min(MAX_TRIAL_DRAWS, max(MIN_TRIAL_DRAWS, seconds / max(per_step * FINAL_CHAINS, 1e-9))))
        _, out = self._short_run(sgld, mass, FINAL_CHAINS, draws, self.seed, capture=FINAL_CAPTURE)
        if out is None:
            return per_step, overhead
        d = out.diagnostics
        loop, whole = self.ranks.agree((sum(d["chain_seconds"][:: max(d["chain_batch"], 1)]), d["seconds"]))
        d = {**d, "seconds": whole}
        self.trial = {"chain_batch": d["chain_batch"], "draws": draws, "seconds": d["seconds"], "loop_seconds": loop}
        return loop / (FINAL_CHAINS * (draws - 1)), max(d["seconds"] - loop, 0.0)

    def gradient_evaluations(self) -> int:
        """Per-sequence gradients the calibration took: two full batches per Hessian-vector product and one
        for the weight decay, the probe's re-fit steps, and a full batch per chain-step of the pilots and
        the speed trial (their forward-only query evaluations are not counted)."""
        trial_steps = 0 if self.trial is None else FINAL_CHAINS * (self.trial["draws"] - 1)
        full_batches = 2 * self.curv["hvps"] + 1 + self.pilot_steps + trial_steps
        return int(self.n_sequences * full_batches + self.probe.gradient_evaluations)

    @staticmethod
    def draws_for(seconds: float, per_step: float) -> int:
        return int(min(MAX_DRAWS, max(MIN_DRAWS, seconds / max(per_step, 1e-9) / FINAL_CHAINS)))

    def final(self, best: dict[str, Any], seconds_left: float, t0: float) -> Calibrated:
        shrink = min(best["step_shrink"], self.shrink[best["nbeta"]])
        backoff = FINAL_BACKOFF if shrink < 1.0 else 1.0
        sgld, mass, why = self.settings(best["nbeta"], best["damping"], shrink * backoff)
        t_trial = time.perf_counter()
        per_step, overhead = self.final_speed(sgld, mass, TRIAL_SHARE * seconds_left)
        seconds_left -= self.ranks.agree(time.perf_counter() - t_trial)
        draws = self.draws_for(seconds_left - overhead, per_step)
        time_limit = max(seconds_left - overhead, LIMIT_SLACK * per_step * FINAL_CHAINS * MIN_DRAWS)
        curv = {k: v for k, v in self.curv.items() if k != "eigvecs"}
        calibration = {
            "curvature": curv,
            "nbeta": {"value": sgld.nbeta, "rule": f"{NBETA_PER_SEQUENCE:g} x training sequences (Gaussian regime), "
                      f"or {SMALL_NBETA_FACTOR:g} x that where the probe prefers it"},
            "damping": {"value": best["damping"], "probe_informative": self.informative,
                        "rule": f"{DAMPINGS[0]:g} x lam_max unless the probe scores {DAMPINGS[-1]:g} x lam_max "
                        f"higher by more than {TIE_SE:g} jackknife s.e. at the final length; the larger when no "
                        f"score exceeds {INFORMATIVE_SE:g} jackknife s.e."},
            "sampler": {"lr": sgld.lr, "friction": sgld.friction, **why, "mass_rank": mass.rank if mass else 0,
                        "final_backoff": backoff,
                        "rule": f"BAOAB, curvature mass, lr = {SAFETY:g} x 2/sqrt(a_ref) x step_shrink (halved per "
                        f"diverged pilot, and by {FINAL_BACKOFF:g} more for the final run where a pilot diverged), "
                        f"friction 2 sqrt(a_min)"},
            "candidates": self.candidates,
            "probe": {"refits": REFITS, "steps": self.probe.gradient_evaluations // max(REFITS * self.n_sequences, 1),
                      "pilot_draws": self.pilot_draws, "seconds": self.probe.seconds,
                      "gradient_evaluations": self.probe.gradient_evaluations},
            "length": {"chains": FINAL_CHAINS, "draws": draws, "seconds_per_chain_step": per_step,
                       "seconds_per_run": overhead, "speed_trial": self.trial,
                       "seconds_left": seconds_left, "time_limit": time_limit,
                       "rule": "as many draws as the time budget leaves, sampling stopped at the time planned for "
                               f"them (at least {LIMIT_SLACK:g} x the estimate of {MIN_DRAWS} draws)"},
            "pilot_seconds": self.pilot_seconds,
            "gradient_evaluations": self.gradient_evaluations(),
            "seconds": self.ranks.agree(time.perf_counter() - t0),
        }  # fmt: skip
        logger.info("bif_fast calibrate: nbeta %.3g, damping %.3g, lr %.3g, %d x %d draws (%.1f s)", sgld.nbeta,
                    best["damping"], sgld.lr, FINAL_CHAINS, draws, calibration["seconds"])  # fmt: skip
        config = BIFConfig(sgld=sgld, num_chains=FINAL_CHAINS, num_draws=draws, batch_size="full",
                           eval_batch_size=EVAL_BATCH, seed=self.seed, max_excursion=self.max_excursion,
                           time_limit=time_limit, capture=FINAL_CAPTURE, calibration=calibration,
                           shard_rows=self.shard_rows)  # fmt: skip
        return Calibrated(config, mass)
