"""sgld_update_: the Triton kernel (interpreter on CPU) against the pure-torch twin, and the noise stream."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bif_fast import SGLDConfig, philox_normal_, sgld_update_
from bif_fast.ops import init_sampler_state_, philox_normal_rows_, sgld_update_resolved_, sgld_update_rows_resolved_
from bif_fast.reference.philox import INIT_VELOCITY_STEP, philox4x32, philox_normal
from bif_fast.reference.sgld_update import SAMPLER_CODES, sampler_code
from tests.conftest import require_ext

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

CONFIGS = {
    "sgld": SGLDConfig(lr=1e-3, nbeta=30.0, localization=50.0, weight_decay=0.1, noise_level=0.7),
    "rmsprop": SGLDConfig(lr=1e-3, nbeta=30.0, localization=50.0, precondition="rmsprop", rmsprop_eps=0.05),
    "baoab": SGLDConfig(lr=1e-2, nbeta=30.0, localization=50.0, sampler="baoab", friction=2.0),
    "sgld-bbox": SGLDConfig(lr=1e-1, nbeta=30.0, localization=5.0, bounding_box_size=0.05),
}


def _inputs(n: int, param_dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    anchor = torch.randn(n, generator=g).to(param_dtype)
    w = anchor.float() + 0.01 * torch.randn(n, generator=g)
    grad = torch.randn(n, generator=g).to(param_dtype)
    state = torch.rand(n, generator=g)  # a valid V (>= 0) and a velocity alike
    noise = torch.randn(n, generator=g)
    return w, grad, anchor, state, noise


def _ulp_close(out: torch.Tensor, ref: torch.Tensor, ulps: int = 1) -> None:
    """|out - ref| <= ulps * spacing(ref), in the dtype of ref."""
    mag = ref.abs()
    spacing = (torch.nextafter(mag, torch.tensor(float("inf"), dtype=ref.dtype)) - mag).double()
    if ref.dtype == torch.bfloat16:  # nextafter is not implemented for bf16 on every build
        spacing = mag.double().clamp_min(1e-30) * 2.0**-7
    err = (out.double() - ref.double()).abs()
    bad = err > ulps * spacing
    assert not bad.any(), f"{int(bad.sum())} elements off by more than {ulps} ulp; worst {float(err.max()):.3e}"


def _run(backend: str, cfg: SGLDConfig, w, grad, anchor, state, *, noise=None, out=None, step=3, offset=0):
    w, state = w.clone(), state.clone()
    flag = torch.zeros(1, dtype=torch.int32, device=w.device)
    sgld_update_(
        w, grad, anchor, state, config=cfg, seed=123, chain=2, step=step, offset=offset, noise=noise, out=out,
        diverged=flag, backend=backend,
    )  # fmt: skip
    return w, state, flag


FAST = [pytest.param("triton", marks=[needs_triton, pytest.mark.triton]), pytest.param("ext", marks=pytest.mark.ext)]


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("n", [1, 1000, 2**20 + 3])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("explicit_noise", [True, False], ids=["noise-arg", "philox"])
def test_fast_path_matches_twin(fast, n, param_dtype, name, explicit_noise):
    """Triton (interpreter) and the C++ CPU loop against the torch twin, to 1 ulp of fp32.

    The interpreter's noise is bit for bit the twin's. The C++ loop draws the same Philox words but
    its logf/sinf/cosf may differ from numpy's by an ulp, so in Philox mode its twin is fed the C++
    noise (the stream itself is checked in test_ext_noise_is_the_same_stream).
    """
    if fast == "ext":
        require_ext()
    cfg = CONFIGS[name]
    step = 0 if name == "baoab" else 3
    w, grad, anchor, state, noise = _inputs(n, param_dtype, seed=n)
    fast_noise = noise if explicit_noise else None
    twin_noise = fast_noise
    if fast == "ext" and not explicit_noise:
        twin_noise = torch.empty(n)
        philox_normal_(twin_noise, seed=123, chain=2, step=step, backend="ext")
    outs = {}
    for backend, nz in ((fast, fast_noise), ("torch", twin_noise)):
        out = torch.full((n,), float("nan"), dtype=param_dtype) if param_dtype != torch.float32 else None
        wn, sn, flag = _run(backend, cfg, w, grad, anchor, state, noise=nz, out=out, step=step)
        outs[backend] = (wn, sn, flag, out)
    (wk, sk, fk, ok), (wr, sr, fr, orf) = outs[fast], outs["torch"]
    assert torch.isfinite(wk).all() and not torch.equal(wk, w)
    _ulp_close(wk, wr)
    if name in ("rmsprop", "baoab"):
        _ulp_close(sk, sr)
    if ok is not None:
        assert not torch.isnan(ok).any(), "kernel left model-copy elements unwritten"
        # The interpreter truncates fp32 -> bf16 stores; a GPU rounds to nearest: 1 bf16 ulp either way.
        _ulp_close(ok, orf)
    assert fk.item() == fr.item() == 0


@pytest.mark.ext
def test_ext_noise_is_the_same_stream():
    require_ext()
    # 2**34 - 4 * 13 + 1: the group counter's low word carries inside the run (the vector path hands the
    # block that would carry to the scalar path)
    for offset in (0, 3, 2**33 + 1, 2**34 - 4 * 13 + 1):
        out = torch.full((4099,), float("nan"))
        philox_normal_(out, seed=2**40 + 17, chain=5, step=11, offset=offset, backend="ext")
        ref = philox_normal(4099, seed=2**40 + 17, chain=5, step=11, offset=offset)
        # Same Philox words, other logf/sinf/cosf: a few ulp apart (absolute near zeros of sin/cos),
        # where another stream would be O(1) apart.
        assert float((out - ref).abs().max()) < 1e-6
        assert float((out - ref).abs().mean()) < 1e-7


@needs_triton
@pytest.mark.triton
def test_noise_is_bitwise_the_numpy_philox():
    for offset in (0, 1, 3, 4097, 2**33 + 1):
        out = torch.full((999,), float("nan"))
        philox_normal_(out, seed=2**40 + 17, chain=5, step=11, offset=offset, backend="triton")
        assert torch.equal(out, philox_normal(999, seed=2**40 + 17, chain=5, step=11, offset=offset))


@needs_triton
@pytest.mark.triton
def test_numpy_philox_matches_tl_philox():
    """The reference's Philox rounds are Triton's tl.philox, word for word."""
    import triton
    import triton.language as tl

    @triton.jit
    def _k(out_ptr, seed, c2, c3, N: tl.constexpr):
        i = tl.arange(0, N)
        c0 = (i * 7919 + 13).to(tl.uint32)
        c1 = (i * 31).to(tl.uint32)
        x0, x1, x2, x3 = tl.philox(seed, c0, c1, tl.zeros_like(c0) + c2, tl.zeros_like(c0) + c3)
        tl.store(out_ptr + i * 4 + 0, x0.to(tl.int64))
        tl.store(out_ptr + i * 4 + 1, x1.to(tl.int64))
        tl.store(out_ptr + i * 4 + 2, x2.to(tl.int64))
        tl.store(out_ptr + i * 4 + 3, x3.to(tl.int64))

    out = torch.zeros(64 * 4, dtype=torch.int64)
    seed = 0xDEADBEEF12345
    _k[(1,)](out, seed, 77, 3, N=64)
    i = np.arange(64, dtype=np.uint64)
    ref = philox4x32(i * np.uint64(7919) + np.uint64(13), i * np.uint64(31), np.full(64, 77), np.full(64, 3), seed)
    np.testing.assert_array_equal(out.numpy().reshape(64, 4), np.stack(ref, axis=1).astype(np.int64))


def test_noise_is_reproducible_and_split_invariant():
    a = philox_normal(10_000, seed=7, chain=1, step=4)
    assert torch.equal(a, philox_normal(10_000, seed=7, chain=1, step=4))
    # Any split into pieces at canonical offsets reproduces the whole.
    pieces = [philox_normal(m, seed=7, chain=1, step=4, offset=o) for o, m in ((0, 3), (3, 4094), (4097, 5903))]
    assert torch.equal(torch.cat(pieces), a)
    assert not torch.equal(a, philox_normal(10_000, seed=7, chain=1, step=5))
    assert not torch.equal(a, philox_normal(10_000, seed=8, chain=1, step=4))


def test_noise_moments_and_chain_independence():
    n = 2**20
    z = philox_normal(n, seed=3, chain=0, step=0).double()
    se = 1 / n**0.5
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * 2**0.5 * se
    assert abs((z**4).mean() - 3) < 5 * 96**0.5 * se  # Gaussian kurtosis, not just two moments
    lag1 = float((z[1:] * z[:-1]).mean())
    assert abs(lag1) < 5 * se
    other_chain = philox_normal(n, seed=3, chain=1, step=0).double()
    other_step = philox_normal(n, seed=3, chain=0, step=1).double()
    for other in (other_chain, other_step):
        assert abs(float(torch.corrcoef(torch.stack([z, other]))[0, 1])) < 5 * se


@pytest.mark.parametrize("backend", ["torch", *FAST])
def test_update_is_split_invariant(backend):
    """Updating two pieces at their canonical offsets equals updating the whole buffer, bit for bit."""
    if backend == "ext":
        require_ext()
    cfg = CONFIGS["rmsprop"]
    w, grad, anchor, state, _ = _inputs(5003, torch.float32, seed=1)
    whole_w, whole_s, _ = _run(backend, cfg, w, grad, anchor, state)
    cut = 1237  # not a multiple of 4: the pieces share a Philox group
    w1, s1, _ = _run(backend, cfg, w[:cut], grad[:cut], anchor[:cut], state[:cut], offset=0)
    w2, s2, _ = _run(backend, cfg, w[cut:], grad[cut:], anchor[cut:], state[cut:], offset=cut)
    assert torch.equal(torch.cat([w1, w2]), whole_w)
    assert torch.equal(torch.cat([s1, s2]), whole_s)


@pytest.mark.parametrize("backend", ["torch", *FAST])
def test_non_finite_gradient_sets_the_diverged_flag(backend):
    if backend == "ext":
        require_ext()
    cfg = CONFIGS["sgld"]
    w, grad, anchor, state, _ = _inputs(3000, torch.float32, seed=2)
    _, _, flag = _run(backend, cfg, w, grad, anchor, state)
    assert flag.item() == 0
    grad = grad.clone()
    grad[2999] = float("nan")
    _, _, flag = _run(backend, cfg, w, grad, anchor, state)
    assert flag.item() == 1
    grad[2999] = float("inf")
    _, _, flag = _run(backend, cfg, w, grad, anchor, state)
    assert flag.item() == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"w": torch.zeros(4, dtype=torch.float64)}, "w must be torch.float32"),
        ({"grad": torch.zeros(5)}, "grad must be a 1-D tensor of 4"),
        ({"anchor": torch.zeros(4, dtype=torch.int32)}, "anchor must be floating point"),
        ({"state": None, "config": CONFIGS["baoab"]}, "needs a state tensor"),
        ({"noise": torch.zeros(4, dtype=torch.float16)}, "noise must be torch.float32"),
        ({"step": -1}, "step must be a non-negative int"),
        ({"chain": 2**32}, "32 bits"),
        ({"config": {"lr": 1.0}}, "config must be an SGLDConfig"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"w": torch.zeros(4), "grad": torch.zeros(4), "anchor": torch.zeros(4), "state": torch.zeros(4)}
    args.update({k: v for k, v in kwargs.items() if k in args})
    rest = {"config": CONFIGS["sgld"], "seed": 0, "chain": 0, "step": 0}
    rest.update({k: v for k, v in kwargs.items() if k not in args})
    with pytest.raises(ValueError, match=match):
        sgld_update_(args["w"], args["grad"], args["anchor"], args["state"], backend="torch", **rest)


ALL_BACKENDS = ["torch", *FAST]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("offset", [0, 5])
def test_init_sampler_state_starts_each_sampler(backend, offset):
    """BAOAB: v is the chain's Philox stream at the reserved step (the same words on every backend);
    RMSprop: V = 0 whatever the buffer held; plain SGLD: no state at all."""
    if backend == "ext":
        require_ext()
    n = 1003
    v = torch.full((n,), float("nan"))
    init_sampler_state_(v, CONFIGS["baoab"], seed=7, chain=3, offset=offset, backend=backend)
    want = philox_normal(n, seed=7, chain=3, step=INIT_VELOCITY_STEP, offset=offset)
    if backend == "ext":  # same Philox words, the C library's logf/sinf/cosf: a few ulp from numpy's
        assert float((v - want).abs().max()) < 1e-6
    else:
        assert torch.equal(v, want)
    other_chain = torch.empty(n)
    init_sampler_state_(other_chain, CONFIGS["baoab"], seed=7, chain=4, offset=offset, backend=backend)
    assert float((other_chain - v).abs().max()) > 1.0
    rms = torch.full((n,), float("nan"))
    init_sampler_state_(rms, CONFIGS["rmsprop"], seed=7, chain=3, offset=offset, backend=backend)
    assert torch.equal(rms, torch.zeros(n))
    init_sampler_state_(None, CONFIGS["sgld"], seed=7, chain=3, offset=offset, backend=backend)


@pytest.mark.parametrize(
    "state,name,kwargs,match",
    [
        (None, "baoab", {}, "needs a state tensor"),
        (None, "rmsprop", {}, "needs a state tensor"),
        (torch.zeros(4), "sgld", {}, "keeps no state"),
        (torch.zeros(4, dtype=torch.float64), "baoab", {}, "state must be torch.float32"),
        (torch.zeros(2, 2), "rmsprop", {}, "1-D tensor"),
        (torch.zeros(4), "baoab", {"backend": "auto"}, "resolved backend"),
        (torch.zeros(4), "baoab", {"chain": -1}, "chain must be a non-negative int"),
    ],
)
def test_init_sampler_state_rejects_bad_arguments(state, name, kwargs, match):
    args = {"seed": 0, "chain": 0, "backend": "torch", **kwargs}
    with pytest.raises(ValueError, match=match):
        init_sampler_state_(state, CONFIGS[name], **args)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resolved_step_is_the_checked_step(name):
    """sgld_update_resolved_ (the optimizer's per-step path) is sgld_update_ minus the checks."""
    cfg = CONFIGS[name]
    w, grad, anchor, state, _ = _inputs(257, torch.float32, seed=4)
    checked_w, checked_state, checked_flag = _run("torch", cfg, w, grad, anchor, state, step=3, offset=9)
    w2, state2 = w.clone(), state.clone() if cfg.needs_state else None
    flag = torch.zeros(1, dtype=torch.int32)
    sgld_update_resolved_("torch", w2, grad, anchor, state2, config=cfg, seed=123, chain=2, step=3, offset=9,
                          diverged=flag)  # fmt: skip
    assert torch.equal(w2, checked_w) and torch.equal(flag, checked_flag)
    if cfg.needs_state:
        assert torch.equal(state2, checked_state)
    with pytest.raises(ValueError, match="resolved backend"):
        sgld_update_resolved_("auto", w2, grad, anchor, state2, config=cfg, seed=0, chain=0, step=0)


ROW_CHAINS = [7, 2, 40]  # not 0..C-1: each row must be keyed by its own chain id


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("n", [1, 1237, 70003])  # 70003: more than two of the extension's 32K-element chunks
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_rows_step_is_each_rows_flat_step(backend, n, param_dtype, name):
    """sgld_update_rows_resolved_ on [C, N] rows gives each row, bit for bit, what a flat step keyed by
    that row's chain gives (weights, state, the bf16 copy), and flags exactly the rows that diverged."""
    if backend == "ext":
        require_ext()
    if backend == "triton" and n == 70003:
        pytest.skip("the interpreter is slow; the row loop is the same for every size")
    cfg = CONFIGS[name]
    rows = [_inputs(n, param_dtype, seed=10 + r) for r in range(len(ROW_CHAINS))]
    anchor = rows[0][2]
    w, grad, state = (torch.stack([row[i] for row in rows]) for i in (0, 1, 3))
    grad[1, n // 2] = float("nan")  # the middle row diverges, the others must not be flagged
    step = 0 if name == "baoab" else 3  # BAOAB's first step has its own (half) kick
    state_arg = state.clone() if cfg.needs_state else None
    rows_w = w.clone()
    out = None if param_dtype == torch.float32 else torch.full((len(ROW_CHAINS), n), float("nan"), dtype=param_dtype)
    flags = torch.zeros(len(ROW_CHAINS), dtype=torch.int32)
    sgld_update_rows_resolved_(backend, rows_w, grad, anchor, state_arg, config=cfg, seed=99, chains=ROW_CHAINS,
                               step=step, out=out, diverged=flags)  # fmt: skip
    for r, chain in enumerate(ROW_CHAINS):
        flat_w, flat_state = w[r].clone(), state[r].clone() if cfg.needs_state else None
        flat_out = None if out is None else torch.empty(n, dtype=param_dtype)
        flag = torch.zeros(1, dtype=torch.int32)
        sgld_update_resolved_(backend, flat_w, grad[r], anchor, flat_state, config=cfg, seed=99, chain=chain,
                              step=step, out=flat_out, diverged=flag)  # fmt: skip
        assert torch.equal(rows_w[r], flat_w) or (r == 1 and torch.equal(rows_w[r].isnan(), flat_w.isnan()))
        if cfg.needs_state and r != 1:
            assert torch.equal(state_arg[r], flat_state)
        if out is not None and r != 1:
            assert torch.equal(out[r], flat_out)
        assert int(flags[r]) == int(flag)
        if cfg.bounding_box_size is None:  # the box clamps a NaN step back into it
            assert int(flag) == (1 if r == 1 else 0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rows_noise_is_each_chains_stream(backend):
    """philox_normal_rows_ fills row r with chain chains[r]'s stream, bit for bit as philox_normal_ does."""
    if backend == "ext":
        require_ext()
    n = 70003 if backend != "triton" else 1237
    out = torch.full((len(ROW_CHAINS), n), float("nan"))
    philox_normal_rows_(out, seed=2**33 + 5, chains=ROW_CHAINS, step=17, backend=backend)
    for r, chain in enumerate(ROW_CHAINS):
        flat = philox_normal_(torch.empty(n), seed=2**33 + 5, chain=chain, step=17, backend=backend)
        assert torch.equal(out[r], flat)


@pytest.mark.ext
def test_rows_entry_points_reject_bad_shapes():
    require_ext()
    from bif_fast import _ext
    from bif_fast.ops.sgld_update import _coefficients

    cfg = CONFIGS["sgld"]
    w, grad, anchor = torch.zeros(3, 8), torch.zeros(3, 8), torch.zeros(8)
    call = lambda *args, chains=(0, 1, 2): _ext.C.sgld_update_rows_cpu_(  # noqa: E731
        *args, None, None, None, None, 0, False, 0, 0, list(chains), 1, _coefficients(cfg, False))
    with pytest.raises(ValueError, match="one row per chain"):
        call(w, grad, anchor, chains=(0, 1))
    with pytest.raises(ValueError, match="anchor must be a contiguous CPU tensor of 8"):
        call(w, grad, torch.zeros(9))
    with pytest.raises(ValueError, match="grad must be a contiguous CPU tensor of 24"):
        call(w, torch.zeros(3, 9), anchor)
    with pytest.raises(ValueError, match="32 bits"):
        call(w, grad, anchor, chains=(0, 1, 2**32))
    with pytest.raises(ValueError, match="one row per chain"):
        _ext.C.philox_normal_rows_cpu_(torch.zeros(3, 8), 0, [0, 1], 0, 0)


def test_needs_state_and_sampler_codes():
    """One table of sampler codes (the kernels' SAMPLER and the C++ loop's branch) and of who keeps state."""
    assert {name: (cfg.needs_state, sampler_code(cfg)) for name, cfg in CONFIGS.items()} == {
        "sgld": (False, 0),
        "rmsprop": (True, 1),
        "baoab": (True, 2),
        "sgld-bbox": (False, 0),
    }
    assert sorted(SAMPLER_CODES.values()) == [0, 1, 2]


@needs_triton
@pytest.mark.triton
def test_kernels_compile_for_sm90():
    """Compile-only: PTX/cubin for sm_90 without a GPU (catches codegen errors the interpreter cannot)."""
    out = subprocess.run(
        [sys.executable, "-m", "bif_fast.tools.compile_check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**__import__("os").environ, "TRITON_INTERPRET": "0"},
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all kernels: sm_90 OK" in out.stdout
    for name in ("sgld_update[sampler=2,bf16]", "philox_normal", "per_token_ce[bf16]", "ce_from_logits[fp32]"):
        assert f"{name}: sm_90 OK" in out.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cuda_kernel_matches_twin(param_dtype, name):
    """On a GPU, against the twin fed the same noise: 2 ulp (the GPU may contract a*b+c into an FMA).
    The GPU's own Philox normals match numpy's to a few ulp (libdevice vs numpy transcendentals)."""
    cfg = CONFIGS[name]
    n = 2**20 + 3
    step = 0 if name == "baoab" else 3
    w, grad, anchor, state, noise = _inputs(n, param_dtype, seed=5)
    gpu_noise = torch.empty(n, device="cuda")
    philox_normal_(gpu_noise, seed=123, chain=2, step=step, backend="triton")
    assert float((gpu_noise.cpu() - philox_normal(n, seed=123, chain=2, step=step)).abs().max()) < 1e-6
    for explicit in (True, False):
        twin_noise = noise if explicit else gpu_noise.cpu()
        wr, sr, _ = _run("torch", cfg, w, grad, anchor, state, noise=twin_noise, step=step)
        dev = [t.cuda() for t in (w, grad, anchor, state, noise)]
        out = torch.full((n,), float("nan"), dtype=param_dtype, device="cuda")
        wk, sk, flag = _run("triton", cfg, *dev[:4], noise=dev[4] if explicit else None, out=out, step=step)
        _ulp_close(wk.cpu(), wr, ulps=2)
        if name in ("rmsprop", "baoab"):
            _ulp_close(sk.cpu(), sr, ulps=2)
        assert not torch.isnan(out).any() and flag.item() == 0
