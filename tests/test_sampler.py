"""SGLD optimizer: exact stationary laws on a Gaussian target, reproducibility, bf16 masters, subsets."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from bif_fast import SGLD, SGLDConfig

HAS_TRITON = importlib.util.find_spec("triton") is not None

# A quadratic loss L(w) = ½ (w - m)ᵀ H (w - m) with known H, anchored away from its minimum.
_Q, _ = torch.linalg.qr(torch.tensor([[1.0, 0.3, -0.2], [0.1, 1.0, 0.4], [-0.3, 0.2, 1.0]], dtype=torch.float64))
H = _Q @ torch.diag(torch.tensor([0.5, 2.0, 5.0], dtype=torch.float64)) @ _Q.T
M = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
W_STAR = torch.tensor([0.1, 0.05, -0.1], dtype=torch.float64)
NBETA, LOC = 20.0, 5.0
PRECISION = NBETA * H + LOC * torch.eye(3, dtype=torch.float64)  # eigenvalues 15, 45, 105
MEAN = torch.linalg.solve(PRECISION, NBETA * H @ M + LOC * W_STAR)


def _sample(cfg: SGLDConfig, *, replicas: int, burnin: int, collections: int, every: int, seed: int = 0):
    """Run `replicas` independent copies of the chain (rows of one parameter); collect spaced states."""
    w = torch.nn.Parameter(W_STAR.float().repeat(replicas, 1))
    opt = SGLD([w], cfg, seed=seed, chain=0, backend="torch")
    h, m = H.float(), M.float()
    draws = []
    for t in range(burnin + collections * every):
        w.grad.copy_((w.detach() - m) @ h)  # gradient of the mean loss of each replica
        opt.step()
        if t >= burnin and (t - burnin) % every == every - 1:
            draws.append(w.detach().double().clone())
    return torch.cat(draws)  # [collections * replicas, 3]


def _sgld_stationary_cov(lr: float) -> torch.Tensor:
    lam, vec = torch.linalg.eigh(PRECISION)
    return vec @ torch.diag(1.0 / (lam * (1 - lr * lam / 4))) @ vec.T


def _cov_z(samples: torch.Tensor, target: torch.Tensor, n_eff: float) -> torch.Tensor:
    """Elementwise |Σ̂ - Σ| in Monte-Carlo standard errors, se² = (Σ_ii Σ_jj + Σ_ij²) / n_eff."""
    est = torch.cov(samples.T)
    se = ((target.diagonal()[:, None] * target.diagonal()[None, :] + target.square()) / n_eff).sqrt()
    return (est - target).abs() / se


def test_sgld_matches_the_discretised_stationary_gaussian():
    lr = 0.01
    cfg = SGLDConfig(lr=lr, nbeta=NBETA, localization=LOC)
    samples = _sample(cfg, replicas=4000, burnin=150, collections=48, every=20)
    n = samples.shape[0]
    exact = _sgld_stationary_cov(lr)
    # Spaced collections are nearly independent; halve n for the slowest mode's autocorrelation.
    z = _cov_z(samples, exact, n / 2)
    assert z.max() < 5, f"covariance off by {z.max():.1f} standard errors"
    mean_se = (exact.diagonal() / (n / 2)).sqrt()
    assert ((samples.mean(0) - MEAN).abs() / mean_se).max() < 5
    # The test can tell the discretised law from the continuous one (which is off by lr·λ/4 ≈ 26%).
    assert _cov_z(samples, torch.linalg.inv(PRECISION), n / 2).max() > 20
    # Convergence: the error shrinks as draws grow.
    err = lambda s: float((torch.cov(s.T) - exact).norm() / exact.norm())  # noqa: E731
    assert err(samples) < err(samples[: n // 16]) and err(samples) < 0.02


def test_baoab_position_marginal_is_the_exact_target():
    cfg = SGLDConfig(lr=0.05, nbeta=NBETA, localization=LOC, sampler="baoab", friction=5.0)
    samples = _sample(cfg, replicas=4000, burnin=150, collections=48, every=20)
    n = samples.shape[0]
    exact = torch.linalg.inv(PRECISION)
    z = _cov_z(samples, exact, n / 2)
    assert z.max() < 5, f"covariance off by {z.max():.1f} standard errors"
    assert ((samples.mean(0) - MEAN).abs() / (exact.diagonal() / (n / 2)).sqrt()).max() < 5
    # At this step plain SGLD would be unstable for the stiffest mode (lr·λ = 5.25 > 4).
    assert 0.05 * 105 > 4


def _mlp(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def _run_chain(model, opt, steps: int, data_seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(data_seed)
    x = torch.randn(16, 5, generator=g)
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        model(x.to(next(model.parameters()).dtype)).float().pow(2).mean().backward()
        opt.step()
        traj.append(torch.cat([p.detach().float().reshape(-1) for p in model.parameters()]))
    return traj


CFG = SGLDConfig(lr=1e-3, nbeta=50.0, localization=10.0)
RULES = [CFG, dataclasses.replace(CFG, precondition="rmsprop"), dataclasses.replace(CFG, sampler="baoab")]


@pytest.mark.parametrize("cfg", RULES, ids=["sgld", "rmsprop", "baoab"])
def test_same_seed_same_chain_is_bitwise_reproducible(cfg):
    runs = []
    for chain in (0, 0, 1):
        model = _mlp()
        runs.append(_run_chain(model, SGLD(model.parameters(), cfg, seed=3, chain=chain, backend="torch"), 5))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not torch.equal(runs[0][-1], runs[2][-1])


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("cfg", RULES, ids=["sgld", "rmsprop", "baoab"])
def test_triton_and_torch_backends_give_the_same_chain(cfg):
    trajs = []
    for backend in ("triton", "torch"):
        model = _mlp()
        trajs.append(_run_chain(model, SGLD(model.parameters(), cfg, seed=1, chain=2, backend=backend), 8))
    for a, b in zip(*trajs, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


def test_splitting_a_tensor_does_not_change_the_chain():
    """Noise depends on the canonical element index only: [W] and [W[:2], W[2:]] sample identically."""
    whole = torch.nn.Parameter(torch.linspace(-1, 1, 4 * 5).reshape(4, 5))
    top = torch.nn.Parameter(whole.detach()[:2].clone())
    bottom = torch.nn.Parameter(whole.detach()[2:].clone())
    opt_a = SGLD([whole], CFG, seed=9, backend="torch")
    opt_b = SGLD([top, bottom], CFG, seed=9, backend="torch")
    for _ in range(4):
        whole.grad.copy_(whole.detach().sin())
        top.grad.copy_(top.detach().sin())
        bottom.grad.copy_(bottom.detach().sin())
        opt_a.step()
        opt_b.step()
    assert torch.equal(whole.detach(), torch.cat([top.detach(), bottom.detach()]))


def test_bf16_parameters_keep_an_fp32_master():
    """Updates far below bf16 resolution accumulate in the master instead of being rounded away."""
    p = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    cfg = SGLDConfig(lr=1e-4, nbeta=1.0, localization=0.0, noise_level=0.0)
    opt = SGLD([p], cfg, backend="torch")
    for _ in range(100):
        p.grad.fill_(-2.0)  # each step moves w by +lr/2 * 2 = 1e-4; bf16 spacing at 1.0 is 7.8e-3
        opt.step()
    master = opt.master_of(p)
    assert master.dtype == torch.float32
    torch.testing.assert_close(master, torch.full((64,), 1.01), rtol=0, atol=1e-5)
    assert torch.equal(p.detach(), master.to(torch.bfloat16))
    assert (p.detach() > 1.0).all()  # a bf16-only update would still read exactly 1.0
    assert torch.equal(opt.anchor_of(p), torch.ones(64, dtype=torch.bfloat16))


def test_only_the_given_parameters_are_sampled():
    model = _mlp()
    frozen = {k: v.detach().clone() for k, v in model[2].named_parameters()}
    before = model[0].weight.detach().clone()
    opt = SGLD(model[0].parameters(), CFG, backend="torch")
    _run_chain(model, opt, 3)
    assert not torch.equal(model[0].weight.detach(), before)
    for k, v in model[2].named_parameters():
        assert torch.equal(v.detach(), frozen[k])
    assert opt.numel == sum(p.numel() for p in model[0].parameters())


def test_reset_restores_w_star_exactly_and_restarts_the_chain():
    model = _mlp()
    w_star = [p.detach().clone() for p in model.parameters()]
    opt = SGLD(model.parameters(), dataclasses.replace(CFG, sampler="baoab"), seed=4, backend="torch")
    first = _run_chain(model, opt, 4)
    opt.reset()
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), w_star, strict=True))
    assert opt.num_steps == 0
    again = _run_chain(model, opt, 4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_grads_replaced_by_the_user_are_still_used():
    """model.zero_grad() sets grads to None; the next backward's fresh grads must still drive the step."""
    model_a, model_b = _mlp(), _mlp()
    opt_a = SGLD(model_a.parameters(), CFG, backend="torch")
    opt_b = SGLD(model_b.parameters(), CFG, backend="torch")
    x = torch.randn(8, 5)
    for _ in range(3):
        opt_a.zero_grad()
        model_b.zero_grad(set_to_none=True)
        for model in (model_a, model_b):
            model(x).pow(2).mean().backward()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa.detach(), pb.detach())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_diverging_chain_is_flagged(backend):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    model = _mlp()
    opt = SGLD(model.parameters(), SGLDConfig(lr=10.0, nbeta=1e6, localization=0.0), backend=backend)
    assert not opt.diverged
    x = torch.randn(8, 5)
    for _ in range(30):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert opt.diverged
    opt.reset()
    assert not opt.diverged


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("lr", 0.0, "SGLDConfig.lr must be > 0"),
        ("lr", float("nan"), "SGLDConfig.lr must be a finite number"),
        ("nbeta", -1.0, "SGLDConfig.nbeta must be > 0"),
        ("localization", -0.1, "SGLDConfig.localization must be >= 0"),
        ("noise_level", -1.0, "SGLDConfig.noise_level must be >= 0"),
        ("rmsprop_alpha", 1.0, "SGLDConfig.rmsprop_alpha must be in"),
        ("rmsprop_eps", 0.0, "SGLDConfig.rmsprop_eps must be a finite number > 0"),
        ("friction", -2.0, "SGLDConfig.friction"),
        ("sampler", "hmc", "SGLDConfig.sampler must be"),
        ("precondition", "adam", "SGLDConfig.precondition must be"),
        ("bounding_box_size", 0.0, "SGLDConfig.bounding_box_size"),
        ("lr", "1e-3", "SGLDConfig.lr must be a finite number"),
    ],
)
def test_invalid_hyperparameters_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        SGLDConfig(**{field: value})


def test_baoab_with_rmsprop_is_rejected_and_config_round_trips():
    with pytest.raises(ValueError, match="SGLDConfig.precondition must be 'none' with sampler='baoab'"):
        SGLDConfig(sampler="baoab", precondition="rmsprop")
    cfg = SGLDConfig(lr=2e-4, sampler="baoab", friction=3.0, bounding_box_size=0.5)
    assert SGLDConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown SGLDConfig fields"):
        SGLDConfig.from_dict({"lr": 1e-3, "temperature": 1.0})


@pytest.mark.parametrize(
    "params,match",
    [
        ([], "empty parameter list"),
        ([torch.zeros(3, dtype=torch.int64)], "floating-point"),
        ([{"params": [torch.zeros(3)]}], "parameter groups"),
        ([torch.zeros(3, device="meta"), torch.zeros(3)], "one device"),
    ],
)
def test_bad_parameters_raise(params, match):
    with pytest.raises(ValueError, match=match):
        SGLD(params, CFG)


class _TrackAllocations:
    """Every tensor any op allocates while active, held weakly: ``live_bytes()`` sums the storages still alive."""

    def __enter__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        refs = self.refs = []

        class Track(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                refs.extend(weakref.ref(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
                return out

        self._mode = Track()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)

    def live_bytes(self, *, beside: list[torch.Tensor] = ()) -> int:
        """Bytes of the storages still alive that were made inside, leaving out those of ``beside``."""
        import gc

        gc.collect()
        live = {}
        for ref in self.refs:
            t = ref()
            if t is not None:
                live[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        for t in beside:
            live.pop(t.untyped_storage().data_ptr(), None)
        return sum(live.values())


# (dtype, sampler, layout, bytes per sampled parameter held between steps, bytes more while the gradient exists)
_MEMORY = [
    (torch.bfloat16, "sgld", "packed", 10, 0), (torch.bfloat16, "rmsprop", "packed", 14, 0),
    (torch.bfloat16, "baoab", "packed", 14, 0),
    (torch.float32, "sgld", "packed", 12, 0), (torch.float32, "rmsprop", "packed", 16, 0),
    (torch.float32, "baoab", "packed", 16, 0),
    (torch.bfloat16, "sgld", "in_place", 6, 2), (torch.bfloat16, "rmsprop", "in_place", 10, 2),
    (torch.bfloat16, "baoab", "in_place", 10, 2), (torch.float16, "sgld", "in_place", 6, 2),
    (torch.float32, "sgld", "in_place", 4, 4), (torch.float32, "rmsprop", "in_place", 8, 4),
    (torch.float32, "baoab", "in_place", 8, 4),
]  # fmt: skip


@pytest.mark.parametrize("dtype, sampler, layout, held, grad", _MEMORY)
def test_sampler_memory_per_sampled_parameter(dtype, sampler, layout, held, grad):
    """The bytes SGLD allocates per sampled parameter, tracked through every allocation (the README's
    table). Packed: a copy of the weights, w*, the gradient (each in the parameters' dtype), the fp32
    master (the weights themselves in fp32) and the fp32 state of RMSprop / BAOAB. In place: only the fp32
    master (bf16/fp16), w* and the state, plus the gradient from a backward until ``zero_grad``. Nothing
    for the unsampled weights."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    sampled = [model[0].weight, model[1].weight]  # a subset: the biases stay as they are
    for p in sampled:
        p.requires_grad_(True)
    numel = sum(p.numel() for p in sampled)
    kw = {"rmsprop": {"precondition": "rmsprop"}, "baoab": {"sampler": "baoab", "friction": 1.0}}.get(sampler, {})
    x = torch.randn(8, 64, dtype=dtype)
    # The model itself: its weights' storage as compute_bif keeps it (to restore a packed weight exactly).
    model_storage = [p.data for p in model.parameters()]
    with _TrackAllocations() as tracked:
        opt = SGLD(sampled, SGLDConfig(lr=1e-4, nbeta=10.0, **kw), seed=0, backend="torch", layout=layout)
        before = model[0].weight.detach().clone()
        model_storage.append(before)
        for _ in range(2):
            model(x).sum().backward()
            opt.step()
            stepping = tracked.live_bytes(beside=model_storage) / numel
            opt.zero_grad()
        del x
    between = tracked.live_bytes(beside=model_storage) / numel
    assert held <= between <= held + 0.05, between
    assert held + grad <= stepping <= held + grad + 0.05, stepping
    assert not torch.equal(model[0].weight.detach(), before)  # the model's weights moved
    assert opt.in_place == (layout == "in_place")


class _Mixed(torch.nn.Module):
    """fp32 and bf16 weights of several sizes, one of them not contiguous (always packed)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.a = torch.nn.Parameter(torch.randn(9, 7, generator=g))
        self.bias = torch.nn.Parameter(torch.randn(9, generator=g))
        self.b = torch.nn.Parameter(torch.randn(9, 11, generator=g).to(torch.bfloat16))
        self.t = torch.nn.Parameter(torch.randn(11, 6, generator=g).t())  # [6, 11], strides (1, 6)
        self.c = torch.nn.Parameter(torch.randn(6, 3, generator=g).to(torch.bfloat16))

    def forward(self, x):
        h = torch.tanh(x @ self.a.T + self.bias)
        h = torch.tanh(h @ self.b.float()) @ self.t.T
        return (h @ self.c.float()).square().mean()


@pytest.mark.parametrize("cfg", RULES, ids=["sgld", "rmsprop", "baoab"])
def test_every_layout_gives_the_same_chain_bit_for_bit(cfg, monkeypatch):
    """Packed, in place and mixed (runs of small parameters packed between large ones in place, here at a
    40-element threshold) update every element with the same arithmetic and noise."""
    import bif_fast.sampler as sampler_module

    monkeypatch.setattr(sampler_module, "IN_PLACE_MIN_NUMEL", 40)
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(1))
    runs = []
    for layout in ("packed", "in_place", "auto"):
        model = _Mixed()
        assert not model.t.is_contiguous()
        opt = SGLD(model.parameters(), cfg, seed=2, chain=1, backend="torch", layout=layout)
        for _ in range(5):
            opt.zero_grad()
            model(x).backward()
            opt.step()
        runs.append(([p.detach().clone() for p in model.parameters()],
                     [opt.master_of(p).clone() for p in model.parameters()], opt.distance()))  # fmt: skip
        # Canonical order: fp32 a, bias, t, then bf16 b, c; True for a segment in place, False for a packed run.
        kinds = {"packed": [False, False], "in_place": [True, True, False, True, True],
                 "auto": [True, False, True, False]}[layout]  # fmt: skip
        assert [seg.local_shape is not None for seg in opt._segments] == kinds
        opt.reset()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), _Mixed().parameters(), strict=True))
    for other in runs[1:]:
        for a, b in zip(runs[0][0] + runs[0][1], other[0] + other[1], strict=True):
            assert torch.equal(a, b)
        torch.testing.assert_close(runs[0][2], other[2], rtol=1e-6, atol=0)  # summed in another order


def test_layouts_that_cannot_hold_the_parameters_are_refused():
    from bif_fast.engine.mass import LowRankMass

    with pytest.raises(ValueError, match="layout must be"):
        SGLD([torch.nn.Parameter(torch.zeros(3))], CFG, layout="flat")
    cfg = SGLDConfig(lr=1e-3, nbeta=10.0, sampler="baoab", mass="curvature", mass_rank=1)
    mass = LowRankMass(torch.eye(3, 1), torch.full((1,), 0.5), 1.0)
    with pytest.raises(ValueError, match="curvature mass acts on one packed buffer"):
        SGLD([torch.nn.Parameter(torch.zeros(3))], cfg, mass=mass, layout="in_place")
    big = torch.nn.Parameter(torch.zeros(1 << 16))  # in place under "auto", but the mass packs it
    eye = LowRankMass(torch.eye(1 << 16, 1), torch.full((1,), 0.5), 1.0)
    assert not SGLD([big], cfg, mass=eye).in_place
