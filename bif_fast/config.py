"""Frozen, validated configuration objects. Change one with ``dataclasses.replace``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["BIFConfig", "SGLDConfig"]

Sampler = Literal["sgld", "baoab"]
Precondition = Literal["none", "rmsprop"]
Mass = Literal["identity", "curvature"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, kw_only=True)
class SGLDConfig:
    """Hyperparameters of the localised posterior sampler (devinterp's names and parametrisation).

    The update rules are written out once, in ``bif_fast/reference/sgld_update.py``. ``nbeta``
    multiplies the gradient of the *mean* minibatch loss, so ``nbeta = beta * n`` in the paper's
    Algorithm 1 (whose step uses ``beta * n / m`` times the *sum* over a minibatch of m), and
    ``localization`` is the paper's gamma.

    Examples:
        >>> cfg = SGLDConfig(lr=1e-4, nbeta=100.0, localization=100.0)
        >>> import dataclasses
        >>> dataclasses.replace(cfg, precondition="rmsprop").precondition
        'rmsprop'
    """

    lr: float = field(default=1e-4, metadata=_help("step size epsilon (> 0)"))
    nbeta: float = field(default=100.0, metadata=_help("inverse temperature times dataset size (> 0)"))
    localization: float = field(default=100.0, metadata=_help("gamma: strength of the pull back to w* (>= 0)"))
    weight_decay: float = field(default=0.0, metadata=_help("L2 prior centred at 0 (>= 0)"))
    noise_level: float = field(default=1.0, metadata=_help("multiplies the injected noise (>= 0); 1 is exact SGLD"))
    sampler: Sampler = field(default="sgld", metadata=_help("'sgld' (overdamped) or 'baoab' (kinetic Langevin)"))
    precondition: Precondition = field(default="none", metadata=_help("'none' or 'rmsprop' (sgld only)"))
    rmsprop_alpha: float = field(default=0.99, metadata=_help("RMSprop decay of the squared-gradient average"))
    rmsprop_eps: float = field(default=0.1, metadata=_help("RMSprop damping added to sqrt(V) (> 0)"))
    friction: float = field(default=1.0, metadata=_help("BAOAB friction coefficient (> 0)"))
    mass: Mass = field(
        default="identity",
        metadata=_help(
            "BAOAB mass matrix: 'identity', or 'curvature': a low-rank mass from the top mass_rank eigenpairs of the "
            "Hessian of the mean training loss at w* (Lanczos), which slows the stiff directions to the pace of the "
            "rest so that lr can be far larger (compute_bif builds it; bif_fast.engine.mass)"
        ),
    )
    mass_rank: int = field(default=32, metadata=_help("eigenpairs of the curvature mass (>= 1)"))
    bounding_box_size: float | None = field(default=None, metadata=_help("clamp w to w* ± this (> 0), or None"))

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"SGLDConfig.{name} {why}, got {getattr(self, name)!r}")

        for name in ("lr", "nbeta", "localization", "weight_decay", "noise_level", "rmsprop_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(name, "must be a finite number")
        for name in ("rmsprop_eps", "friction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                fail(name, "must be a finite number > 0")
        if self.lr <= 0:
            fail("lr", "must be > 0")
        if self.nbeta <= 0:
            fail("nbeta", "must be > 0")
        for name in ("localization", "weight_decay", "noise_level"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if not 0.0 <= self.rmsprop_alpha < 1.0:
            fail("rmsprop_alpha", "must be in [0, 1)")
        if self.sampler not in ("sgld", "baoab"):
            fail("sampler", "must be 'sgld' or 'baoab'")
        if self.precondition not in ("none", "rmsprop"):
            fail("precondition", "must be 'none' or 'rmsprop'")
        if self.sampler == "baoab" and self.precondition != "none":
            fail("precondition", "must be 'none' with sampler='baoab'")
        if self.mass not in ("identity", "curvature"):
            fail("mass", "must be 'identity' or 'curvature'")
        if self.mass == "curvature" and self.sampler != "baoab":
            fail("mass", "must be 'identity' unless sampler='baoab'")
        if isinstance(self.mass_rank, bool) or not isinstance(self.mass_rank, int) or self.mass_rank < 1:
            fail("mass_rank", "must be an int >= 1")
        if self.bounding_box_size is not None and not (
            isinstance(self.bounding_box_size, (int, float)) and 0 < self.bounding_box_size < math.inf
        ):
            fail("bounding_box_size", "must be None or a finite number > 0")

    @property
    def needs_state(self) -> bool:
        """Whether the sampler keeps a per-parameter fp32 state between steps: BAOAB's velocity or
        RMSprop's squared-gradient average V (plain SGLD keeps none)."""
        return self.sampler == "baoab" or self.precondition == "rmsprop"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SGLDConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SGLDConfig fields {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True, kw_only=True)
class BIFConfig:
    """How ``compute_bif`` samples and evaluates.

    Draw schedule of each chain (the paper's Algorithm 1, with burn-in and thinning): start at w*,
    take ``num_burnin_steps`` SGLD steps, then ``num_draws`` times: evaluate every training and query
    loss (a draw), then take ``num_steps_bw_draws`` SGLD steps. With no burn-in the first draw is at w*.

    Examples:
        >>> cfg = BIFConfig(sgld=SGLDConfig(lr=1e-4, nbeta=100.0), num_chains=4, num_draws=200)
        >>> cfg.total_draws
        800
    """

    sgld: SGLDConfig = field(default_factory=SGLDConfig, metadata=_help("sampler hyperparameters"))
    num_chains: int = field(default=4, metadata=_help("independent chains (>= 1), seeded by their index"))
    num_draws: int = field(default=200, metadata=_help("draws per chain (>= 2 in total)"))
    num_burnin_steps: int = field(default=0, metadata=_help("SGLD steps discarded before the first draw"))
    num_steps_bw_draws: int = field(default=1, metadata=_help("SGLD steps between draws (>= 1)"))
    batch_size: int | Literal["full"] = field(
        default=32,
        metadata=_help(
            "SGLD minibatch size, or 'full': the gradient of the mean loss over the whole training set at every step "
            "(accumulated over the evaluation batches; its forward also gives the draw's training losses, so they are "
            "not evaluated again). 'full' samples from train itself (sgld_data must be None)"
        ),
    )
    control_variate: bool = field(
        default=False,
        metadata=_help(
            "minibatch gradients with a control variate at w*, g_b(w) - g_b(w*) + g(w*) (Baker et al. 2019): unbiased, "
            "with a noise that vanishes at w* (plain minibatch noise grows like nbeta / batch_size against the "
            "injected noise); costs one full-batch gradient at the start and a second minibatch gradient (at w*) "
            "per step. Needs an int batch_size; the full gradient is over sgld_data (a Dataset or DataLoader, "
            "streamed once) or train"
        ),
    )
    eval_batch_size: int = field(default=256, metadata=_help("batch size of the loss evaluations"))
    eval_max_tokens: int | Literal["auto"] | None = field(
        default="auto",
        metadata=_help(
            "per token: at most this many loss positions (sequences x positions) per evaluation batch, fewer "
            "sequences than eval_batch_size when they are long; 'auto': 2048 on a CPU (the fastest measured "
            "there), 16384 on a GPU; None: no cap. Batches of a DataLoader are kept as given"
        ),
    )
    seed: int = field(default=0, metadata=_help("key of the sampler noise and of the minibatch order"))
    draws_per_update: int = field(default=32, metadata=_help("draws buffered per rank-k covariance update"))
    cov_dtype: Literal["auto", "float64", "float32"] = field(
        default="auto",
        metadata=_help(
            "dtype of the n x p co-moment and of the outputs (means and sums of squares are always float64); "
            "'auto': float64 when loss_fn returns float64 losses, else float32"
        ),
    )
    compute_stderr: bool = field(default=True, metadata=_help("per-chain batch-means standard errors"))
    progress: bool = field(default=False, metadata=_help("show a tqdm progress bar (if tqdm is installed)"))
    chain_batch: int | Literal["auto"] = field(
        default="auto",
        metadata=_help(
            "chains run at once through torch.func.vmap over stacked weights (1 = one by one); 'auto' batches "
            "small models on a GPU, and on a CPU where parameters x evaluation rows is small (larger with "
            "full-batch gradients). Results equal the sequential ones up to rounding"
        ),
    )
    capture: bool | Literal["auto"] = field(
        default="auto",
        metadata=_help(
            "batched chains replay their full-batch gradient and their evaluations, which see the same batches at "
            "every step, as graphs of ATen ops traced once (without vmap's, functional_call's and autograd's per-op "
            "overhead; CPU (log_)softmax over fewer than 16 classes decomposed), each checked against the eager "
            "call first and dropped, with the reason in diagnostics['capture'], where it cannot be traced or "
            "differs. 'auto': on where a chain takes at least 150 steps (tracing costs about as much as 100 "
            "steps save on a small MLP). Results agree with capture off up to float rounding"
        ),
    )
    estimator: Literal["plain", "lag1"] = field(
        default="plain",
        metadata=_help(
            "'plain': the covariance of the draws; 'lag1': the lag-1 symmetrised covariance "
            "1/2 [C(0) + 1/2 (C(+1) + C(-1))], which removes the step-size bias of SGLD for observables linear in "
            "the weights of a Gaussian target (computed as 1/4 the covariance of sums of consecutive draws; needs "
            "num_steps_bw_draws=1; for plain SGLD: BAOAB's position marginal has no such bias)"
        ),
    )
    max_excursion: float | None = field(
        default=None,
        metadata=_help(
            "leave out a chain whose mean training loss rises above its typical level (the median rise above w*'s) by "
            "more than this many spreads (median absolute deviations; the chain's own or the earlier kept chains' "
            "when smaller): a chain that left w*'s basin without reaching NaN/Inf, whose draws would dominate every "
            "covariance (reported in diagnostics['escaped']). None: only NaN/Inf chains are left out. The calibrated "
            "defaults use 50"
        ),
    )
    shard_rows: bool = field(
        default=False,
        metadata=_help(
            "inside a torch.distributed process group: each rank owns a contiguous slice of the training sequences "
            "(the rows), evaluates only those and keeps only their rows of the n x p state; every rank runs every "
            "chain, its SGLD gradient summed across ranks as DDP does (each rank's share of every minibatch, or "
            "its rows of the full batch). res.bif is the local rows, res.train_rows their global indices, and "
            "res.topk works across the shards. False: the chains are split across the ranks instead"
        ),
    )
    time_limit: float | None = field(
        default=None,
        metadata=_help(
            "seconds the sampling may run (the draws of every chain, from the first chain's start): each group of "
            "chains run together may use its share of the time left, and stops at its next draw past it (keeping "
            "at least 2 draws, 3 with estimator='lag1'); the first group stopped early sets the draws of every "
            "later one, so the chains keep one length. diagnostics['time_limit'] says whether and where it "
            "stopped. Not applied (said there) "
            "with a checkpoint or inside a process group, whose runs are exact and reproducible. None: no limit. "
            "The calibrated defaults set the sampling time they planned"
        ),
    )
    calibration: dict[str, Any] | None = field(
        default=None,
        compare=False,
        metadata=_help(
            "what bif_fast.calibrate chose and why (its estimates, the rule behind each setting, the probe's scores "
            "and costs); informational only: compute_bif copies it into res.diagnostics['calibration']"
        ),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.sgld, SGLDConfig):
            raise ValueError(f"BIFConfig.sgld must be an SGLDConfig, got {type(self.sgld).__name__}")
        minimum = {"num_chains": 1, "num_draws": 1, "num_burnin_steps": 0, "num_steps_bw_draws": 1, "batch_size": 1,
                   "eval_batch_size": 1, "seed": 0, "draws_per_update": 1}  # fmt: skip
        if self.batch_size == "full":
            minimum.pop("batch_size")
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"BIFConfig.{name} must be an int >= {low}, got {value!r}")
        if not isinstance(self.shard_rows, bool):
            raise ValueError(f"BIFConfig.shard_rows must be a bool, got {self.shard_rows!r}")
        if not isinstance(self.control_variate, bool):
            raise ValueError(f"BIFConfig.control_variate must be a bool, got {self.control_variate!r}")
        if self.control_variate and self.batch_size == "full":
            raise ValueError("BIFConfig.control_variate corrects minibatch gradients; batch_size='full' has none")
        if self.num_chains * self.num_draws < 2:
            raise ValueError("BIFConfig needs at least 2 draws in total (num_chains * num_draws)")
        if self.chain_batch != "auto" and (
            isinstance(self.chain_batch, bool) or not isinstance(self.chain_batch, int) or self.chain_batch < 1
        ):
            raise ValueError(f"BIFConfig.chain_batch must be 'auto' or an int >= 1, got {self.chain_batch!r}")
        if self.capture != "auto" and not isinstance(self.capture, bool):
            raise ValueError(f"BIFConfig.capture must be 'auto' or a bool, got {self.capture!r}")
        if self.estimator not in ("plain", "lag1"):
            raise ValueError(f"BIFConfig.estimator must be 'plain' or 'lag1', got {self.estimator!r}")
        if self.estimator == "lag1" and self.num_draws < 3:
            raise ValueError(f"BIFConfig.estimator='lag1' needs num_draws >= 3, got {self.num_draws}")
        if self.estimator == "lag1" and self.num_steps_bw_draws != 1:
            raise ValueError("BIFConfig.estimator='lag1' corrects the covariance of consecutive SGLD steps: it needs "
                             f"num_steps_bw_draws=1, got {self.num_steps_bw_draws}")  # fmt: skip
        ex = self.max_excursion
        if ex is not None and (isinstance(ex, bool) or not isinstance(ex, (int, float)) or not ex > 1):
            raise ValueError(f"BIFConfig.max_excursion must be None or a number > 1, got {ex!r}")
        if self.cov_dtype not in ("auto", "float64", "float32"):
            raise ValueError(f"BIFConfig.cov_dtype must be 'auto', 'float64' or 'float32', got {self.cov_dtype!r}")
        limit = self.time_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                                  or not (limit > 0 and math.isfinite(limit))):  # fmt: skip
            raise ValueError(f"BIFConfig.time_limit must be None or a finite number of seconds > 0, got {limit!r}")
        cap = self.eval_max_tokens
        if cap is not None and cap != "auto" and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"BIFConfig.eval_max_tokens must be 'auto', None or an int >= 1, got {cap!r}")

    @property
    def total_draws(self) -> int:
        return self.num_chains * self.num_draws

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sgld"] = self.sgld.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BIFConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown BIFConfig fields {sorted(unknown)}")
        if isinstance(d.get("sgld"), dict):
            d["sgld"] = SGLDConfig.from_dict(d["sgld"])
        return cls(**d)
