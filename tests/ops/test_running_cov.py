"""RunningCrossCovariance: the extension and the torch reference against numpy float64 np.cov/np.corrcoef."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import bif_fast
from bif_fast import RunningCrossCovariance
from tests.conftest import require_ext


def _stream(draws: int, n: int, p: int, *, loc: float, spread: float, seed: int, dtype=torch.float64):
    """Correlated streams: y mixes x so the cross-covariance is far from zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(draws, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, p, generator=g, dtype=torch.float64) / n**0.5
    y = 0.7 * x @ mix + 0.5 * torch.randn(draws, p, generator=g, dtype=torch.float64)
    offsets_x = loc * (1 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64))
    offsets_y = loc * (1 + 0.1 * torch.rand(p, generator=g, dtype=torch.float64))
    return (offsets_x + spread * x).to(dtype), (offsets_y + spread * y).to(dtype)


def _np_reference(x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """np.cov / np.corrcoef of the stacked stream, in float64, cross block only."""
    n = x.shape[1]
    z = np.concatenate([x.double().numpy(), y.double().numpy()], axis=1).T
    return np.cov(z)[:n, n:], np.corrcoef(z)[:n, n:]


def _rel_err(out: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(out.double().numpy() - ref).max() / np.abs(ref).max())


def _feed(acc: RunningCrossCovariance, x: torch.Tensor, y: torch.Tensor, blocks) -> None:
    start = 0
    for size in blocks:
        acc.update(x[start : start + size], y[start : start + size])
        start += size
    assert start == x.shape[0]


def _blocks(total: int, k: int) -> list[int]:
    return [k] * (total // k) + ([total % k] if total % k else [])


def _snapshot(acc: RunningCrossCovariance) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in acc.state_dict().items()}


def _assert_same_state(acc: RunningCrossCovariance, snap: dict) -> None:
    for k, v in acc.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, snap[k]), f"state {k} changed"
        else:
            assert v == snap[k], f"state {k} changed"


@pytest.mark.parametrize("n,p", [(1, 1), (17, 5), (64, 33)])
def test_float64_hard_stream_matches_numpy(cov_backend, n, p):
    # Means around 1e3, spread 1e-3: raw sums lose every digit here (see the next test).
    x, y = _stream(301, n, p, loc=1e3, spread=1e-3, seed=n * 100 + p)
    acc = RunningCrossCovariance(n, p, backend=cov_backend)
    _feed(acc, x, y, _blocks(301, 32))
    cov_ref, corr_ref = _np_reference(x, y)
    assert acc.count == 301
    assert _rel_err(acc.covariance(), cov_ref) <= 1e-8
    assert _rel_err(acc.correlation(), corr_ref) <= 1e-8
    np.testing.assert_allclose(acc.mean_x.numpy(), x.mean(0).numpy(), rtol=1e-14)
    np.testing.assert_allclose(acc.var_x.numpy(), x.var(0).numpy(), rtol=1e-8)
    np.testing.assert_allclose(acc.var_y.numpy(), y.var(0).numpy(), rtol=1e-8)


def test_raw_sums_fail_the_float64_bound():
    """The tolerance above is meaningful: the textbook raw-sum formula misses it by orders of magnitude."""
    x, y = _stream(301, 17, 5, loc=1e3, spread=1e-3, seed=1705)
    cov_ref, _ = _np_reference(x, y)
    n = x.shape[0]
    raw = (x.T @ y - n * torch.outer(x.mean(0), y.mean(0))) / (n - 1)
    assert _rel_err(raw, cov_ref) > 1e-6


@pytest.mark.parametrize("n,p", [(17, 5), (129, 64)])
def test_float32_state_is_accurate_because_centred(cov_backend, n, p):
    # Values around 10 with spread 1e-2, accumulated in float32; the reference is float64 numpy on the
    # same float32-rounded data. Blocks are centred in float64 (the state vectors' dtype) and rounded
    # once into the float32 co-moment: ~1e-6, where centring in float32 gave 8.7e-5.
    x, y = _stream(500, n, p, loc=10.0, spread=1e-2, seed=7 + n, dtype=torch.float32)
    acc = RunningCrossCovariance(n, p, dtype=torch.float32, backend=cov_backend)
    _feed(acc, x, y, _blocks(500, 32))
    cov_ref, corr_ref = _np_reference(x, y)
    assert acc.covariance().dtype == torch.float32
    assert _rel_err(acc.covariance(), cov_ref) <= 2e-6
    assert _rel_err(acc.correlation(), corr_ref) <= 2e-6
    assert acc.correlation().dtype == acc.mean_x.dtype == acc.var_y.dtype == torch.float32
    # Raw float32 sums on the same data are far off.
    xs, ys = x.float(), y.float()
    raw = (xs.T @ ys - 500 * torch.outer(xs.mean(0), ys.mean(0))) / 499
    assert _rel_err(raw, cov_ref) > 1e-2


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_are_upcast(cov_backend, in_dtype):
    x, y = _stream(64, 9, 4, loc=0.0, spread=1.0, seed=3, dtype=in_dtype)
    acc = RunningCrossCovariance(9, 4, backend=cov_backend)
    _feed(acc, x, y, _blocks(64, 10))
    cov_ref, _ = _np_reference(x, y)  # on the rounded data, in float64
    assert _rel_err(acc.covariance(), cov_ref) <= 1e-12


@pytest.mark.parametrize(
    "blocks",
    [[1] * 200, _blocks(200, 7), _blocks(200, 64), [3, 50, 1, 97, 2, 47], [200]],
    ids=["k1", "k7", "k64", "uneven", "one-block"],
)
def test_any_block_split_gives_the_same_result(cov_backend, blocks):
    x, y = _stream(200, 23, 11, loc=5.0, spread=0.3, seed=11)
    ref = RunningCrossCovariance(23, 11, backend="torch")
    _feed(ref, x, y, [200])
    acc = RunningCrossCovariance(23, 11, backend=cov_backend)
    _feed(acc, x, y, blocks)
    # Only rounding differs between splits: compare in units of the largest entry.
    assert _rel_err(acc.covariance(), ref.covariance().numpy()) <= 1e-13
    assert _rel_err(acc.correlation(), ref.correlation().numpy()) <= 1e-13
    torch.testing.assert_close(acc.var_x, ref.var_x, rtol=1e-12, atol=0)


def test_single_draw_vectors_are_accepted(cov_backend):
    x, y = _stream(20, 6, 3, loc=1.0, spread=1.0, seed=5)
    acc = RunningCrossCovariance(6, 3, backend=cov_backend)
    for t in range(20):
        acc.update(x[t], y[t])
    cov_ref, _ = _np_reference(x, y)
    assert _rel_err(acc.covariance(), cov_ref) <= 1e-12


@pytest.mark.parametrize("other_dtype", [torch.float64, torch.float32])
def test_merge_of_two_halves_equals_one_pass(cov_backend, other_dtype):
    x, y = _stream(300, 19, 7, loc=100.0, spread=0.1, seed=21)
    one = RunningCrossCovariance(19, 7, backend=cov_backend)
    _feed(one, x, y, _blocks(300, 32))
    a = RunningCrossCovariance(19, 7, backend=cov_backend)
    b = RunningCrossCovariance(19, 7, backend=cov_backend, dtype=other_dtype)
    _feed(a, x[:110], y[:110], _blocks(110, 32))
    _feed(b, x[110:], y[110:], _blocks(190, 13))
    assert a.merge(b) is a
    assert a.count == 300
    tol = 1e-12 if other_dtype == torch.float64 else 1e-4
    assert _rel_err(a.covariance(), one.covariance().numpy()) <= tol
    torch.testing.assert_close(a.mean_x, one.mean_x, rtol=tol, atol=0)
    torch.testing.assert_close(a.var_y, one.var_y, rtol=tol, atol=0)
    # Merging into an empty accumulator copies; merging an empty one changes nothing.
    empty = RunningCrossCovariance(19, 7, backend=cov_backend)
    empty.merge(one)
    torch.testing.assert_close(empty.covariance(), one.covariance(), rtol=1e-15, atol=0)
    snap = _snapshot(one)
    one.merge(RunningCrossCovariance(19, 7, backend=cov_backend))
    _assert_same_state(one, snap)


def test_state_dict_round_trip_and_continue(cov_backend):
    x, y = _stream(150, 8, 5, loc=3.0, spread=1.0, seed=4)
    acc = RunningCrossCovariance(8, 5, backend=cov_backend)
    _feed(acc, x[:70], y[:70], _blocks(70, 16))
    buf = io.BytesIO()
    torch.save(acc.state_dict(), buf)
    buf.seek(0)
    restored = RunningCrossCovariance(8, 5, backend=cov_backend)
    restored.load_state_dict(torch.load(buf))
    for a in (acc, restored):
        _feed(a, x[70:], y[70:], _blocks(80, 16))
    assert restored.count == acc.count == 150
    assert torch.equal(restored.covariance(), acc.covariance())
    with pytest.raises(ValueError, match="n=8, p=5"):
        RunningCrossCovariance(5, 8, backend=cov_backend).load_state_dict(acc.state_dict())
    bad = dict(acc.state_dict())
    del bad["m2_x"]
    snap = _snapshot(restored)
    with pytest.raises(ValueError, match="misses"):
        restored.load_state_dict(bad)
    _assert_same_state(restored, snap)


def test_correlation_of_constant_streams_is_zero_not_nan(cov_backend):
    draws = 50
    x, y = _stream(draws, 4, 3, loc=0.0, spread=1.0, seed=8)
    x[:, 1] = 0.1  # constant that is not exactly representable: centring leaves rounding noise
    x[:, 2] = 0.0  # exactly zero
    y[:, 0] = 1e3 / 3
    acc = RunningCrossCovariance(4, 3, backend=cov_backend)
    _feed(acc, x, y, _blocks(draws, 7))
    corr = acc.correlation()
    assert torch.isfinite(corr).all()
    assert (corr[1] == 0).all() and (corr[2] == 0).all() and (corr[:, 0] == 0).all()
    _, corr_ref = _np_reference(x[:, [0, 3]], y[:, 1:])
    np.testing.assert_allclose(corr[[0, 3]][:, 1:].numpy(), corr_ref, rtol=1e-10)
    assert corr.abs().max() <= 1.0


def test_too_few_draws_raise(cov_backend):
    acc = RunningCrossCovariance(3, 2, backend=cov_backend)
    with pytest.raises(ValueError, match="at least 2 draws"):
        acc.covariance()
    acc.update(torch.zeros(1, 3), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="at least 2 draws"):
        acc.correlation()
    with pytest.raises(ValueError, match="at least 2 draws"):
        _ = acc.var_x


def _bad_updates():
    n, p = 5, 3
    nan_x = torch.randn(4, n)
    nan_x[2, 3] = float("nan")
    inf_y = torch.randn(4, p)
    inf_y[0, 1] = float("-inf")
    return [
        ("x width", torch.randn(4, n + 1), torch.randn(4, p), "shape \\[k, 5\\]"),
        ("y width", torch.randn(4, n), torch.randn(4, p - 1), "shape \\[k, 3\\]"),
        ("x 3-D", torch.randn(4, n, 1), torch.randn(4, p), "shape"),
        ("draw count", torch.randn(4, n), torch.randn(3, p), "same number of draws"),
        ("int dtype", torch.ones(4, n, dtype=torch.int64), torch.randn(4, p), "floating-point"),
        ("complex dtype", torch.randn(4, n, dtype=torch.complex64), torch.randn(4, p), "floating-point"),
        ("device", torch.randn(4, n, device="meta"), torch.randn(4, p), "is on meta"),
        ("not a tensor", np.zeros((4, n)), torch.randn(4, p), "torch.Tensor"),
        ("nan", nan_x, torch.randn(4, p), "non-finite values \\(first at draw 2, index 3\\)"),
        ("inf", torch.randn(4, n), inf_y, "non-finite"),
    ]


@pytest.mark.parametrize("case", _bad_updates(), ids=lambda c: c[0])
def test_bad_update_raises_and_leaves_state_unchanged(cov_backend, case):
    _, bx, by, match = case
    x, y = _stream(40, 5, 3, loc=1.0, spread=1.0, seed=2)
    acc = RunningCrossCovariance(5, 3, backend=cov_backend)
    _feed(acc, x, y, [16, 24])
    snap = _snapshot(acc)
    with pytest.raises(ValueError, match=match):
        acc.update(bx, by)
    _assert_same_state(acc, snap)
    # Still usable afterwards.
    acc.update(x[:4], y[:4])
    assert acc.count == 44


def test_empty_update_is_a_no_op(cov_backend):
    acc = RunningCrossCovariance(5, 3, backend=cov_backend)
    acc.update(torch.randn(10, 5), torch.randn(10, 3))
    snap = _snapshot(acc)
    acc.update(torch.empty(0, 5), torch.empty(0, 3))
    _assert_same_state(acc, snap)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n": 0, "p": 3}, "n must be a positive int"),
        ({"n": 3, "p": -1}, "p must be a positive int"),
        ({"n": 2.0, "p": 3}, "n must be a positive int"),
        ({"n": 3, "p": 3, "dtype": torch.float16}, "float64 or torch.float32"),
        ({"n": 3, "p": 3, "backend": "nope"}, "unknown backend"),
    ],
)
def test_bad_construction_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunningCrossCovariance(**kwargs)


def test_merge_rejects_mismatch(cov_backend):
    a = RunningCrossCovariance(4, 3, backend=cov_backend)
    with pytest.raises(ValueError, match="cannot merge a \\(3, 4\\)"):
        a.merge(RunningCrossCovariance(3, 4, backend=cov_backend))
    with pytest.raises(ValueError, match="into itself"):
        a.merge(a)
    with pytest.raises(ValueError, match="RunningCrossCovariance"):
        a.merge("acc")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_finite_and_means_are_float64_reads(cov_backend, dtype):
    x, y = _stream(40, 6, 4, loc=2.0, spread=1.0, seed=12)
    acc = RunningCrossCovariance(6, 4, dtype=dtype, backend=cov_backend)
    assert acc.finite()  # no draws: nothing non-finite was seen
    _feed(acc, x, y, _blocks(40, 16))
    assert acc.finite()
    mean_x, mean_y = acc.means()
    assert mean_x.dtype == mean_y.dtype == torch.float64 and mean_x.shape == (6,) and mean_y.shape == (4,)
    np.testing.assert_allclose(mean_x.numpy(), x.mean(0).numpy(), rtol=1e-14)
    np.testing.assert_allclose(mean_y.numpy(), y.mean(0).numpy(), rtol=1e-14)
    mean_x.fill_(float("nan"))  # a copy: the accumulator is not touched
    assert acc.finite() and torch.equal(acc.means()[1], mean_y)
    for bad in (float("nan"), float("inf")):
        poisoned = RunningCrossCovariance(6, 4, dtype=dtype, backend=cov_backend)
        poisoned.update(x[:3], y[:3])
        y_bad = y[3:9].clone()
        y_bad[2, 1] = bad
        poisoned.update(x[3:9], y_bad, check_finite=False)
        poisoned.update(x[9:], y[9:])  # later finite draws do not wash it out
        assert not poisoned.finite()


def test_comoment_is_the_live_state(cov_backend):
    x, y = _stream(30, 5, 3, loc=1.0, spread=1.0, seed=13)
    acc = RunningCrossCovariance(5, 3, dtype=torch.float32, backend=cov_backend)
    _feed(acc, x, y, [30])
    comoment = acc.comoment
    assert comoment is acc.state_dict()["comoment"] and comoment.dtype == torch.float32
    torch.testing.assert_close(comoment / (acc.count - 1), acc.covariance(), rtol=1e-6, atol=0)
    before = comoment.clone()
    acc.update(x[:4], y[:4])
    assert comoment.data_ptr() == acc.comoment.data_ptr() and not torch.equal(comoment, before)


def test_take_comoment_hands_over_the_storage_until_reset(cov_backend):
    x, y = _stream(60, 7, 4, loc=5.0, spread=0.5, seed=14)
    acc = RunningCrossCovariance(7, 4, backend=cov_backend)
    _feed(acc, x[:30], y[:30], _blocks(30, 8))
    cov = acc.covariance()
    ptr, count = acc.comoment.data_ptr(), acc.count
    taken = acc.take_comoment()
    assert taken.data_ptr() == ptr and acc.count == 0
    torch.testing.assert_close(taken.div_(count - 1), cov, rtol=1e-14, atol=0)  # the covariance, in place
    other = RunningCrossCovariance(7, 4, backend=cov_backend)
    other.update(x[30:], y[30:])
    refused = {
        "update": lambda: acc.update(x[:2], y[:2]),
        "merge into it": lambda: acc.merge(other),
        "merge from it": lambda: other.merge(acc),
        "covariance": acc.covariance,
        "correlation": acc.correlation,
        "state_dict": acc.state_dict,
        "load_state_dict": lambda: acc.load_state_dict(other.state_dict()),
        "take again": acc.take_comoment,
        "comoment": lambda: acc.comoment,
        "means": acc.means,
        "finite": acc.finite,
        "mean_x": lambda: acc.mean_x,
        "var_y": lambda: acc.var_y,
    }
    snap_other = _snapshot(other)
    for what, call in refused.items():
        with pytest.raises(ValueError, match="take_comoment"):
            call()
            pytest.fail(f"{what} worked on an accumulator whose co-moment was taken")
    _assert_same_state(other, snap_other)
    torch.testing.assert_close(taken, cov, rtol=1e-14, atol=0)  # nothing wrote into the handed-out tensor
    acc.reset()
    assert acc.comoment.data_ptr() == ptr and (taken == 0).all()  # the same storage, zeroed
    _feed(acc, x, y, _blocks(60, 16))
    fresh = RunningCrossCovariance(7, 4, backend=cov_backend)
    _feed(fresh, x, y, _blocks(60, 16))
    assert acc.count == 60 and torch.equal(acc.covariance(), fresh.covariance())


def test_extension_and_reference_agree():
    """Both backends compute the same formula; they agree to rounding on a long uneven stream."""
    require_ext()
    x, y = _stream(777, 31, 13, loc=50.0, spread=0.05, seed=99)
    accs = [RunningCrossCovariance(31, 13, backend=b) for b in ("ext", "torch")]
    blocks = [5, 64, 1, 300, 7, 400]
    for acc in accs:
        _feed(acc, x, y, blocks)
    assert accs[0].backend == "ext" and accs[1].backend == "torch"
    assert _rel_err(accs[0].covariance(), accs[1].covariance().numpy()) <= 1e-13
    assert _rel_err(accs[0].correlation(), accs[1].correlation().numpy()) <= 1e-13


def test_auto_backend_uses_the_extension_when_built():
    require_ext()
    assert RunningCrossCovariance(2, 2).backend == "ext"
    assert bif_fast.available_backends()["running_cov"]["cpu"] == "ext"


def test_direct_extension_call_checks_arguments():
    require_ext()
    from bif_fast._ext import C as _C

    state = [torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4), torch.zeros(3), torch.zeros(4), torch.zeros(3)]
    state[1:] = [t.double() for t in state[1:]]
    with pytest.raises(ValueError, match="x.size\\(1\\) must be 4"):
        _C.running_cov_update_(*state, 0, torch.zeros(2, 5), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="float32 or float64"):
        _C.running_cov_update_(
            torch.zeros(4, 3, dtype=torch.float16), *state[1:], 0, torch.zeros(2, 4), torch.zeros(2, 3)
        )
    with pytest.raises(ValueError, match="state vectors .* must be float64"):
        _C.running_cov_update_(state[0].float(), *(t.float() for t in state[1:]), 0, torch.zeros(2, 4),
                               torch.zeros(2, 3))  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True], ids=["aten", "fused-kernel"])
@pytest.mark.parametrize("in_dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_matches_the_cpu_reference(monkeypatch, fused, in_dtype):
    require_ext()
    from bif_fast import _ext

    if fused and not _ext.ext_has_cuda():
        pytest.fail("the extension was built without its CUDA kernels")
    monkeypatch.setenv("BIF_FAST_COV_FUSED", "1" if fused else "0")
    x, y = _stream(333, 1031, 67, loc=1e2, spread=1e-2, seed=17, dtype=in_dtype)
    ref = RunningCrossCovariance(1031, 67, backend="torch")
    acc = RunningCrossCovariance(1031, 67, device="cuda")
    assert acc.backend == "ext" and acc._fused == fused
    _feed(ref, x, y, _blocks(333, 32))
    _feed(acc, x.cuda(), y.cuda(), _blocks(333, 32))
    assert _rel_err(acc.covariance().cpu(), ref.covariance().numpy()) <= 1e-12
    assert _rel_err(acc.correlation().cpu(), ref.correlation().numpy()) <= 1e-12
    other = RunningCrossCovariance(1031, 67, device="cuda")
    _feed(other, x[:100].cuda(), y[:100].cuda(), [100])
    acc.merge(other)
    ref.merge(other)  # a CUDA accumulator merges into a CPU one (its state is copied over)
    assert _rel_err(acc.covariance().cpu(), ref.covariance().numpy()) <= 1e-12
