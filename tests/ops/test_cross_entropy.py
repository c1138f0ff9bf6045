"""Per-token cross-entropy: Triton kernels (interpreter on CPU) and the chunked torch twin against
F.cross_entropy in float64, gradients, low precision, memory, and bad input."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bif_fast import cross_entropy_from_logits, per_token_cross_entropy
from bif_fast.ops import cross_entropy as ops_ce

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = [
    "torch",
    pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(not HAS_TRITON, reason="no triton")]),
]
# Forwards the gradient tests watch (the Triton module is importable only with triton installed).
SPIED_BACKENDS = ["torch", "triton"] if HAS_TRITON else ["torch"]
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


# The forward launcher of each backend, by op: (module, name) as ops/cross_entropy.py looks it up per call.
_FORWARDS = {
    "per_token": {
        "torch": ("bif_fast.reference.cross_entropy", "per_token_cross_entropy_fwd"),
        "triton": ("bif_fast.kernels.cross_entropy", "per_token_cross_entropy_fwd_triton"),
    },
    "from_logits": {
        "torch": ("bif_fast.reference.cross_entropy", "cross_entropy_from_logits_fwd"),
        "triton": ("bif_fast.kernels.cross_entropy", "cross_entropy_from_logits_fwd_triton"),
    },
}
_BACKWARDS = {"per_token": "per_token_cross_entropy_bwd", "from_logits": "cross_entropy_from_logits_bwd"}


def _spy_lse(monkeypatch, op: str, backends: list[str]) -> dict[str, list[torch.Tensor]]:
    """Record the logsumexp each backend's forward returns and the one the backward receives.

    The backward is the same torch code after either forward; what a backend changes is the saved
    logsumexp it is fed, so the gradient tests check that it is exactly the forward's (same storage).
    """

    def recording(fwd, log: list[torch.Tensor]):
        def fwd_spy(*args, **kwargs):
            loss, lse = fwd(*args, **kwargs)
            log.append(lse)
            return loss, lse

        return fwd_spy

    seen: dict[str, list[torch.Tensor]] = {"bwd": []}
    for backend in backends:
        module, name = _FORWARDS[op][backend]
        mod = importlib.import_module(module)
        seen[backend] = []
        monkeypatch.setattr(mod, name, recording(getattr(mod, name), seen[backend]))
    bwd = getattr(ops_ce, _BACKWARDS[op])

    def bwd_spy(*args, **kwargs):
        seen["bwd"].append(inspect.signature(bwd).bind(*args, **kwargs).arguments["lse"])
        return bwd(*args, **kwargs)

    monkeypatch.setattr(ops_ce, _BACKWARDS[op], bwd_spy)
    return seen


def _assert_backward_used_forward_lse(seen: dict[str, list[torch.Tensor]], backend: str) -> None:
    others = [b for b in seen if b not in (backend, "bwd")]
    assert len(seen[backend]) == 1, f"the {backend} forward ran {len(seen[backend])} times"
    assert all(not seen[b] for b in others), f"another backend's forward ran: {others}"
    assert len(seen["bwd"]) == 1
    fwd_lse, bwd_lse = seen[backend][0], seen["bwd"][0]
    assert bwd_lse.data_ptr() == fwd_lse.data_ptr() and torch.equal(bwd_lse, fwd_lse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,h,v", [(37, 64, 7), (33, 96, 5003)])
def test_gradients_match_float64_autograd(monkeypatch, backend, n, h, v):
    """Gradients through the backward fed this backend's saved logsumexp (for "triton": the Triton
    forward's, under the interpreter on CPU) match float64 autograd."""
    hidden, weight, b, targets = _inputs(n, h, v, seed=3)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
    upstream = torch.randn(n)
    seen = _spy_lse(monkeypatch, "per_token", SPIED_BACKENDS)
    per_token_cross_entropy(leaves[0], leaves[1], targets, bias=leaves[2], backend=backend).backward(upstream)
    _assert_backward_used_forward_lse(seen, backend)
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
def test_from_logits_matches_float64(monkeypatch, backend, n, v):
    g = torch.Generator().manual_seed(v)
    logits = 3 * torch.randn(n, v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::4] = -100
    z = logits.clone().requires_grad_(True)
    seen = _spy_lse(monkeypatch, "from_logits", SPIED_BACKENDS)
    out = cross_entropy_from_logits(z, targets, backend=backend)
    ref_z = logits.double().requires_grad_(True)
    ref = F.cross_entropy(ref_z, targets, reduction="none", ignore_index=-100)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=2e-5)
    upstream = torch.randn(n)
    out.backward(upstream)
    _assert_backward_used_forward_lse(seen, backend)
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
    from bif_fast.ops.cross_entropy import per_token_cross_entropy_bwd
    from bif_fast.reference import cross_entropy as ref

    # The forward and the backward both block tokens with reference.cross_entropy.row_block.
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
    dh, dw, db = per_token_cross_entropy_bwd(g.float(), hidden.detach(), weight.detach(), targets, b.detach(), lse,
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
