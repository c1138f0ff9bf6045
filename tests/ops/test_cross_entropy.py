"""Per-token cross-entropy: Triton kernels (interpreter on CPU) and the chunked torch twin against
F.cross_entropy in float64, gradients, low precision, memory, and bad input."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bif_fast import cross_entropy_from_logits, per_token_cross_entropy

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = [
    "torch",
    pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(not HAS_TRITON, reason="no triton")]),
]
SHAPES = [(1, 16, 1), (37, 64, 7), (130, 48, 1), (33, 96, 50_277), (70, 20, 300)]


def _inputs(n: int, h: int, v: int, seed: int, dtype=torch.float32, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 3).to(dtype)
    b = (0.5 * torch.randn(v, generator=g)).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -100
    return hidden, weight, b, targets


def _ref64(hidden, weight, bias, targets):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    return F.cross_entropy(z, targets, reduction="none", ignore_index=-100)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_cross_entropy(backend, n, h, v, bias):
    hidden, weight, b, targets = _inputs(n, h, v, seed=n + v, bias=bias)
    out = per_token_cross_entropy(hidden, weight, targets, bias=b, backend=backend)
    ref = _ref64(hidden, weight, b, targets)
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)
    assert (out[targets == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,h,v", [(37, 64, 7), (33, 96, 5003)])
def test_gradients_match_float64_autograd(backend, n, h, v):
    hidden, weight, b, targets = _inputs(n, h, v, seed=3)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
    upstream = torch.randn(n)
    per_token_cross_entropy(leaves[0], leaves[1], targets, bias=leaves[2], backend=backend).backward(upstream)
    ref_leaves = [t.double().requires_grad_(True) for t in (hidden, weight, b)]
    _ref64(*ref_leaves, targets).backward(upstream.double())
    for name, ours, ref in zip(("d_hidden", "d_weight", "d_bias"), leaves, ref_leaves, strict=True):
        torch.testing.assert_close(
            ours.grad.double(), ref.grad, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    # Ignored tokens get no gradient.
    assert (leaves[0].grad[targets == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_torchs_own_error(backend, dtype):
    n, h, v = 64, 128, 3001
    hidden, weight, b, targets = _inputs(n, h, v, seed=11, dtype=dtype)
    ref = _ref64(hidden, weight, b, targets)  # exact math on the rounded inputs
    ours = per_token_cross_entropy(hidden, weight, targets, bias=b, backend=backend).double()
    torch_lowp = F.cross_entropy(
        (hidden @ weight.T + b).float(), targets, reduction="none", ignore_index=-100
    ).double()  # torch's own low-precision logits
    err_ours = float((ours - ref).abs().max())
    err_torch = float((torch_lowp - ref).abs().max())
    assert err_ours <= 2 * err_torch + 1e-4, (err_ours, err_torch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,v", [(1, 1), (37, 7), (9, 50_277), (70, 4097)])
def test_from_logits_matches_float64(backend, n, v):
    g = torch.Generator().manual_seed(v)
    logits = 3 * torch.randn(n, v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::4] = -100
    z = logits.clone().requires_grad_(True)
    out = cross_entropy_from_logits(z, targets, backend=backend)
    ref_z = logits.double().requires_grad_(True)
    ref = F.cross_entropy(ref_z, targets, reduction="none", ignore_index=-100)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=2e-5)
    upstream = torch.randn(n)
    out.backward(upstream)
    ref.backward(upstream.double())
    torch.testing.assert_close(z.grad.double(), ref_z.grad, rtol=1e-5, atol=1e-6)


def test_any_leading_shape_and_deterministic():
    hidden, weight, b, targets = _inputs(24, 32, 101, seed=5)
    flat = per_token_cross_entropy(hidden, weight, targets, bias=b, backend="torch")
    shaped = per_token_cross_entropy(hidden.reshape(4, 6, 32), weight, targets.reshape(4, 6), bias=b, backend="torch")
    assert shaped.shape == (4, 6) and torch.equal(shaped.reshape(-1), flat)
    again = per_token_cross_entropy(hidden, weight, targets, bias=b, backend="torch")
    assert torch.equal(again, flat)


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_triton_is_deterministic():
    hidden, weight, b, targets = _inputs(70, 20, 3000, seed=9)
    a = per_token_cross_entropy(hidden, weight, targets, bias=b, backend="triton")
    assert torch.equal(a, per_token_cross_entropy(hidden, weight, targets, bias=b, backend="triton"))


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op produces (an upper bound on a single allocation's size)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _largest(n: int, v: int, h: int = 16) -> int:
    hidden, weight, b, targets = _inputs(n, h, v, seed=1)
    hidden.requires_grad_(True)
    with _LargestAllocation() as mode:
        per_token_cross_entropy(hidden, weight, targets, bias=b, backend="torch").sum().backward()
    return mode.largest


def test_fallback_memory_grows_with_n_not_n_times_v():
    """The torch fallback (forward and backward) never holds [N, V]: its largest tensor is N × chunk,
    plus the [V, H] weight gradient that any backward must return."""
    n, v, h = 64, 50_304, 16
    full_logits = n * v * 4
    largest = _largest(n, v, h)
    assert largest <= max(n * 4096 * 4, v * h * 4) < full_logits / 2
    # Doubling V leaves the working set alone (beyond the weight-sized gradient); doubling N doubles it.
    assert _largest(n, 2 * v, h) <= max(n * 4096 * 4, 2 * v * h * 4)
    assert _largest(2 * n, v, h) <= 2 * max(n * 4096 * 4, v * h * 4)


def test_fallback_blocks_tokens_to_a_bounded_tile(monkeypatch):
    """Many tokens: the fallback works through blocks of tokens, each tile at most TILE_ELEMS logits; the
    blocks (odd sizes, last one short) give the float64 losses and gradients, and the working set stops
    growing with N."""
    from bif_fast.reference import cross_entropy as ref

    monkeypatch.setattr(ref, "TILE_ELEMS", 37 * 64)  # rows per block: 37 with chunk 64
    n, h, v = 301, 12, 150
    hidden, weight, b, targets = _inputs(n, h, v, seed=5)
    targets[::7] = -100
    hidden.requires_grad_(True), weight.requires_grad_(True), b.requires_grad_(True)
    loss, lse = ref.per_token_cross_entropy_fwd(hidden, weight, targets, b, chunk=64)
    h64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (hidden, weight, b))
    want = torch.nn.functional.cross_entropy(h64 @ w64.T + b64, targets, reduction="none", ignore_index=-100)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    g = torch.randn(n, dtype=torch.float64)
    dh, dw, db = ref.per_token_cross_entropy_bwd(g.float(), hidden.detach(), weight.detach(), targets, b.detach(), lse,
                                                 chunk=64)  # fmt: skip
    want_grads = torch.autograd.grad((want * g).sum(), (h64, w64, b64))
    for got, ref_grad in zip((dh, dw, db), want_grads, strict=True):
        torch.testing.assert_close(got.double(), ref_grad, rtol=1e-4, atol=1e-5)
    with _LargestAllocation() as mode:
        ref.per_token_cross_entropy_fwd(hidden.detach(), weight.detach(), targets, b.detach(), chunk=64)
    # (views of the [N, H] input count as tensors of its size)
    assert mode.largest <= max(37 * 64 * 4, v * h * 4, n * h * 4) < n * 64 * 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"weight": torch.randn(7, 5)}, "agree on H"),
        ({"weight": torch.randn(7, 4, dtype=torch.float64)}, "same dtype"),
        ({"targets": torch.tensor([0, 1, 7])}, "target 7 is out of range for a vocabulary of 7"),
        ({"targets": torch.tensor([0, 1, -3])}, "target -3 is out of range"),
        ({"targets": torch.tensor([0, 1])}, "targets must have shape \\[3\\]"),
        ({"targets": torch.tensor([0.0, 1.0, 2.0])}, "integer tensor"),
        ({"bias": torch.randn(6)}, "bias must be a \\[7\\] tensor"),
        ({"hidden": torch.randn(3, 4, device="meta")}, "weight is on cpu but hidden is on meta"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = {"hidden": torch.randn(3, 4), "weight": torch.randn(7, 4), "targets": torch.tensor([0, 1, 6])}
    args.update({k: v for k, v in kwargs.items() if k != "bias"})
    with pytest.raises(ValueError, match=match):
        per_token_cross_entropy(
            args["hidden"], args["weight"], args["targets"], bias=kwargs.get("bias"), backend="torch"
        )


def test_from_logits_bad_input_raises():
    with pytest.raises(ValueError, match="out of range"):
        cross_entropy_from_logits(torch.randn(2, 5), torch.tensor([0, 5]), backend="torch")
    with pytest.raises(ValueError, match="floating-point"):
        cross_entropy_from_logits(torch.ones(2, 5, dtype=torch.int64), torch.tensor([0, 1]), backend="torch")
