"""Attribution methods of the retraining benchmark, each returning scores under the convention of
``benchmarks/lds/__init__.py`` (the predicted change of query j's loss when training point i is included),
with its wall time and its count of per-example gradient evaluations."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.func import functional_call, grad, vmap

from benchmarks.lds.settings import Setting

__all__ = ["Attribution", "bif", "bif_sharded", "exact_if", "float32_problem", "graddot", "gradsim",
           "per_example_grads"]


@dataclass
class Attribution:
    method: str
    scores: torch.Tensor  # [n_train, n_query]
    seconds: float
    grad_evals: float  # per-example gradient evaluations (a forward-only loss evaluation counts 1/2)
    info: dict = field(default_factory=dict)


def _flat_params(model: torch.nn.Module) -> tuple[torch.Tensor, Callable[[torch.Tensor], dict]]:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflatten(w: torch.Tensor) -> dict[str, torch.Tensor]:
        out, s = {}, 0
        for n, shape in zip(names, shapes, strict=True):
            k = int(torch.Size(shape).numel())
            out[n] = w[s : s + k].view(shape)
            s += k
        return out

    return flat, unflatten


def per_example_grads(setting: Setting, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`[B, P]` gradients of each example's loss at the model's weights (no weight decay: that is not data)."""
    w, unflatten = _flat_params(model)

    def one(w_: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, unflatten(w_), (xi[None],))
        return setting.loss(out, yi[None]).sum()

    return vmap(grad(one), in_dims=(None, 0, 0))(w, x, y)


def graddot(setting: Setting, model: torch.nn.Module) -> Attribution:
    t0 = time.perf_counter()
    gt = per_example_grads(setting, model, setting.x_train, setting.y_train)
    gq = per_example_grads(setting, model, setting.x_query, setting.y_query)
    scores = -(gt @ gq.T)
    return Attribution("GradDot", scores, time.perf_counter() - t0, gt.shape[0] + gq.shape[0])


def gradsim(setting: Setting, model: torch.nn.Module) -> Attribution:
    t0 = time.perf_counter()
    gt = per_example_grads(setting, model, setting.x_train, setting.y_train)
    gq = per_example_grads(setting, model, setting.x_query, setting.y_query)
    unit = lambda g: g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)  # noqa: E731
    scores = -(unit(gt) @ unit(gq).T)
    return Attribution("GradSim", scores, time.perf_counter() - t0, gt.shape[0] + gq.shape[0])


def hessian(setting: Setting, model: torch.nn.Module, chunk: int = 512) -> torch.Tensor:
    """`[P, P]` Hessian of the training objective at the model's weights (float64), by chunked HVPs."""
    w, unflatten = _flat_params(model)

    def obj(w_: torch.Tensor) -> torch.Tensor:
        reg = w_.square().sum()
        out = functional_call(model, unflatten(w_), (setting.x_train,))
        return setting.loss(out, setting.y_train).mean() + 0.5 * setting.weight_decay * reg

    return torch.func.jacrev(torch.func.grad(obj), chunk_size=chunk)(w)


def exact_if(setting: Setting, model: torch.nn.Module, dampings: tuple[float, ...]) -> list[Attribution]:
    """The influence function ``-g_i^T (H + lambda I)^-1 g_j`` with the exact Hessian of the objective, for each
    damping. Negative eigenvalues (a non-convex point) are clamped to 0 before damping (a Gauss-Newton-like
    positive part), so every damping gives a positive-definite system."""
    t0 = time.perf_counter()
    h = hessian(setting, model)
    evals, evecs = torch.linalg.eigh(h)
    gt = per_example_grads(setting, model, setting.x_train, setting.y_train) @ evecs
    gq = per_example_grads(setting, model, setting.x_query, setting.y_query) @ evecs
    shared = time.perf_counter() - t0
    out = []
    for lam in dampings:
        t1 = time.perf_counter()
        scores = -(gt / (evals.clamp_min(0) + lam)) @ gq.T
        info = {"damping": lam, "min_eig": float(evals.min()), "max_eig": float(evals.max())}
        # One HVP over the training set per parameter, plus the per-example gradients.
        evaluations = h.shape[0] * setting.n_train + gt.shape[0] + gq.shape[0]
        out.append(Attribution(f"IF (exact H, damping {lam:g})", scores, shared + time.perf_counter() - t1,
                               evaluations, info))  # fmt: skip
    return out


def bif(setting: Setting, model: torch.nn.Module, config=None, label: str = "BIF (defaults)") -> Attribution:
    """``bif_fast.compute_bif`` on the float32 copy of the model, per-example losses, ``config`` (None: the
    library's defaults, as a new user calls it)."""
    import bif_fast

    m32, train, query = float32_problem(setting, model)
    t0 = time.perf_counter()
    res = bif_fast.compute_bif(m32, train, query, loss_fn=setting.loss_fn, config=config)
    seconds = time.perf_counter() - t0
    info = {"diverged": res.diagnostics["diverged"], "config": res.config.to_dict()}
    return Attribution(label, res.bif.double(), seconds, _bif_grad_evals(setting, res.config, res.diagnostics), info)


def _bif_grad_evals(setting: Setting, cfg, diagnostics: dict) -> float:
    steps = cfg.num_chains * (cfg.num_burnin_steps + (cfg.num_draws - 1) * cfg.num_steps_bw_draws)
    full = cfg.batch_size == "full"
    reused = diagnostics.get("forward_reuse", False)  # a draw's training losses come from the step's forward
    n_eval = (0 if reused else setting.n_train) + setting.x_query.shape[0]
    evals = steps * (setting.n_train if full else min(cfg.batch_size, setting.n_train)) + 0.5 * cfg.total_draws * n_eval
    return evals + (cfg.calibration or {}).get("gradient_evaluations", 0)  # the calibrated defaults' own cost


def bif_sharded(name: str, setting: Setting, model: torch.nn.Module, world: int = 2) -> Attribution:
    """The calibrated defaults over row shards: ``world`` gloo processes on loopback, one torch thread each,
    each calling ``bif_fast.calibrate(..., shard_rows=True)`` and then ``compute_bif`` with its config; the
    shards put together by their global rows. The wall time is rank 0's, from the calibration's start to
    the result (process start-up and imports excluded)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(float32_problem(setting, model), f"{tmp}/problem.pt")
        mp.start_processes(_sharded_worker, args=(world, tmp, name), nprocs=world, start_method="spawn")
        parts = [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(world)]
    rows = torch.cat([p["rows"] for p in parts])
    if not torch.equal(rows, torch.arange(setting.n_train)):
        raise RuntimeError(f"the shards' rows are not the training set's: {rows.tolist()[:10]} ...")
    scores = torch.cat([p["bif"] for p in parts]).double()
    from bif_fast import BIFConfig

    cfg = BIFConfig.from_dict(parts[0]["config"])
    info = {"diverged": parts[0]["diverged"], "config": parts[0]["config"], "world": world}
    return Attribution(f"BIF (defaults, {world} row shards)", scores, parts[0]["seconds"],
                       _bif_grad_evals(setting, cfg, parts[0]["diagnostics"]), info)  # fmt: skip


def _sharded_worker(rank: int, world: int, tmp: str, name: str) -> None:
    import torch.distributed as dist

    import bif_fast
    from benchmarks.lds.settings import SETTINGS

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        setting = SETTINGS[name]()
        m32, train, query = torch.load(f"{tmp}/problem.pt", weights_only=False)
        t0 = time.perf_counter()
        cfg = bif_fast.calibrate(m32, train, query, loss_fn=setting.loss_fn, shard_rows=True)
        res = bif_fast.compute_bif(m32, train, query, loss_fn=setting.loss_fn, config=cfg)
        seconds = time.perf_counter() - t0
        keep = {"forward_reuse": res.diagnostics.get("forward_reuse", False)}
        torch.save({"bif": res.bif, "rows": res.train_rows, "seconds": seconds, "config": cfg.to_dict(),
                    "diverged": res.diagnostics["diverged"], "diagnostics": keep}, f"{tmp}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def _float32_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).float()


def float32_problem(setting: Setting, model: torch.nn.Module):
    """(a float32 copy of ``model``, the training and query sets as float32 ``TensorDataset``s): what
    ``compute_bif`` is run on (token ids stay integers)."""
    f32 = lambda t: t.float() if t.dtype.is_floating_point else t  # noqa: E731
    train = torch.utils.data.TensorDataset(f32(setting.x_train), f32(setting.y_train))
    query = torch.utils.data.TensorDataset(f32(setting.x_query), f32(setting.y_query))
    return _float32_copy(model), train, query


def top_curvature(setting: Setting, model: torch.nn.Module, iters: int = 40) -> float:
    """The largest eigenvalue of the Hessian of the mean training loss (no weight decay), by power iteration
    on exact (forward-over-reverse) Hessian-vector products of the float64 reference model; the library's
    ``bif_fast.engine.calibrate.top_curvature`` forms them by differences of gradients for any model."""
    w, unflatten = _flat_params(model)

    def data_loss(w_: torch.Tensor) -> torch.Tensor:
        return setting.loss(functional_call(model, unflatten(w_), (setting.x_train,)), setting.y_train).mean()

    v = torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=w.dtype)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        hv = torch.func.jvp(torch.func.grad(data_loss), (w,), (v,))[1]
        lam = float(v @ hv)
        v = hv / hv.norm()
    return lam


def bif_kinetic(setting: Setting, model: torch.nn.Module, *, nbeta: float, damping: float, chains: int = 8,
                draws: int = 600, label: str | None = None) -> Attribution:  # fmt: skip
    """The BIF with settings chosen by hand from the curvature: BAOAB at 0.8 x its stability limit, friction at
    critical damping of the slowest mode, full-batch gradients, the objective's weight decay scaled into the
    potential, localization = damping x nbeta (to first order a damped IF with that damping)."""
    from bif_fast import BIFConfig, SGLDConfig
    from bif_fast.engine.calibrate import kinetic_settings

    t0 = time.perf_counter()
    lam_max = top_curvature(setting, model)
    curvature_seconds = time.perf_counter() - t0
    wd = nbeta * setting.weight_decay
    loc = damping * nbeta
    ks = kinetic_settings(lam_max, nbeta=nbeta, localization=loc, weight_decay=wd)
    lr = ks.lr
    sgld = SGLDConfig(lr=lr, nbeta=nbeta, localization=loc, weight_decay=wd, sampler="baoab", friction=ks.friction)
    cfg = BIFConfig(sgld=sgld, num_chains=chains, num_draws=draws, num_steps_bw_draws=1, batch_size=setting.n_train,
                    eval_batch_size=2048, compute_stderr=False)  # fmt: skip
    att = bif(setting, model, cfg, label or f"BIF (BAOAB, nbeta {nbeta:g}, damping {damping:g}, {chains}x{draws})")
    att.seconds += curvature_seconds  # the choice of the step is part of the method's cost
    att.info.update(lam_max=lam_max, lr=lr, curvature_seconds=curvature_seconds)
    return att
